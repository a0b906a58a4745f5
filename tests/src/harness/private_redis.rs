//! A Redis of the test's own: a `redis-server` process on a free port with its own data
//! directory, which a test may kill and start again on the same port (a Redis restart, with or
//! without its append-only file). The machine's shared Redis is never touched.

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tokio::process::{Child, Command};

use super::free_addr;

/// How long a starting `redis-server` may take to answer `PING` (it replays its AOF first).
const START_TIMEOUT: Duration = Duration::from_secs(15);

/// A private `redis-server`; killed and its directory removed on drop.
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    appendonly: bool,
    quiet: bool,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts `redis-server` on a free port. `appendonly` is the production setting
    /// (`--appendonly yes --appendfsync always`); without it the server keeps nothing on disk,
    /// so a restart comes back empty.
    pub async fn start(appendonly: bool, quiet: bool) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "conveyor-e2e-redis-{}",
            ulid::Ulid::new().to_string().to_lowercase()
        ));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let mut redis = Self {
            port: free_addr().port(),
            dir,
            appendonly,
            quiet,
            child: None,
        };
        redis.restart().await?;
        Ok(redis)
    }

    /// `redis://127.0.0.1:{port}`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Whether the server process is running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|child| matches!(child.try_wait(), Ok(None)))
    }

    /// Kills the server with SIGKILL (a crash: no shutdown save) and waits until it is gone, so
    /// its port refuses connections.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await.context("kill redis-server")?;
        }
        Ok(())
    }

    /// Starts the server (again) on the same port and data directory and waits until it
    /// answers `PING`. With the append-only file on, it comes back with every acknowledged
    /// write.
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        if self.is_running() {
            bail!("redis-server is already running on port {}", self.port);
        }
        let mut cmd = Command::new("redis-server");
        cmd.args(["--bind", "127.0.0.1", "--port"])
            .arg(self.port.to_string())
            .arg("--dir")
            .arg(&self.dir)
            .args(["--save", "", "--protected-mode", "no", "--daemonize", "no"])
            .args(if self.appendonly {
                ["--appendonly", "yes", "--appendfsync", "always"]
            } else {
                ["--appendonly", "no", "--appendfsync", "everysec"]
            })
            .stdin(Stdio::null())
            .stdout(if self.quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .stderr(if self.quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .kill_on_drop(true);
        let mut child = cmd.spawn().context("spawn redis-server (is it on PATH?)")?;
        let deadline = Instant::now() + START_TIMEOUT;
        let client = redis::Client::open(self.url())?;
        loop {
            if let Some(status) = child.try_wait()? {
                bail!(
                    "redis-server on port {} exited at start: {status}",
                    self.port
                );
            }
            let pong: Result<String, redis::RedisError> = async {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async(&mut conn).await
            }
            .await;
            if pong.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.start_kill();
                bail!(
                    "redis-server on port {} did not answer within {START_TIMEOUT:?}",
                    self.port
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.child = Some(child);
        Ok(())
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.start_kill();
            // Give the process a moment to die so it does not write into the removed directory.
            let deadline = Instant::now() + Duration::from_secs(2);
            while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
