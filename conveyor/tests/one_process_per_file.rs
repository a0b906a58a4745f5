//! `conveyor dev` refuses a file another `conveyor dev` is using: its start-up would take the
//! other process's running runs for orphans and run them a second time.

use std::{process::Stdio, time::Duration};

use tokio::process::Command;

#[tokio::test]
async fn a_second_dev_process_on_the_same_file_is_refused() -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("conveyor-lock-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let db = dir.join("dev.db");
    let start = |port: &str| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_conveyor"));
        cmd.args(["dev", "--demo", "--db"])
            .arg(&db)
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd
    };
    let mut first = start("0").spawn()?;
    // The first process holds the lock once the file's lock cannot be taken from here.
    let lock_path = dir.join("dev.db.lock");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held = std::fs::File::open(&lock_path).is_ok_and(|f| f.try_lock().is_err());
        if held {
            break;
        }
        anyhow::ensure!(first.try_wait()?.is_none(), "the first process exited");
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the lock was never taken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let second = tokio::time::timeout(Duration::from_secs(20), start("0").output()).await??;
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "{stderr}");
    assert!(
        stderr.contains("another conveyor dev is running on"),
        "{stderr}"
    );
    assert!(
        first.try_wait()?.is_none(),
        "the first process is unaffected"
    );

    // Once the first is gone (killed: the OS drops its lock), the file can be used again.
    first.kill().await?;
    let mut third = start("0").spawn()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let held = std::fs::File::open(&lock_path).is_ok_and(|f| f.try_lock().is_err());
        if held {
            break;
        }
        anyhow::ensure!(third.try_wait()?.is_none(), "the restarted process exited");
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the lock was never retaken"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    third.kill().await?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
