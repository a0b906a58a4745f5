//! `conveyor-mcp --http`: the same scenarios over streamable HTTP, against the real binary
//! listening on a free port, each test with its own database (Postgres, or a SQLite file).

mod support;

use std::{net::SocketAddr, process::Stdio, time::Duration};

use rmcp::{ServiceExt, transport::StreamableHttpClientTransport};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::Child,
    task::JoinHandle,
};

use support::{Backend, Connected, DEADLINE, TestDb};

transport_scenarios!(connect_http);

/// Starts the binary with `--http 127.0.0.1:0`, learns its port from the `listening on` log
/// line, and connects rmcp's streamable HTTP client to `/mcp`.
async fn connect_http(backend: Backend) -> Connected {
    let db = TestDb::create(backend).await;
    let (child, addr, logs) = start_http_server(&db).await;
    let transport = StreamableHttpClientTransport::from_uri(format!("http://{addr}/mcp"));
    let client = tokio::time::timeout(DEADLINE, ().serve(transport))
        .await
        .expect("HTTP handshake in time")
        .expect("HTTP handshake");
    Connected::new(client, db, Some(child), logs)
}

/// Spawns the HTTP server and waits (with a deadline) until it says where it listens.
async fn start_http_server(db: &TestDb) -> (Child, SocketAddr, JoinHandle<()>) {
    let mut child = support::server_command(&db.url)
        .args(["--http", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn conveyor-mcp --http");
    let mut lines = BufReader::new(child.stderr.take().expect("piped stderr")).lines();
    let addr = tokio::time::timeout(DEADLINE, async {
        while let Some(line) = lines.next_line().await.expect("read server stderr") {
            eprintln!("[conveyor-mcp] {line}");
            if let Some(rest) = line.split("listening on ").nth(1) {
                let addr = rest.split_whitespace().next().unwrap_or_default();
                return addr.parse::<SocketAddr>().expect("a socket address");
            }
        }
        panic!("server exited before listening");
    })
    .await
    .expect("server listening in time");
    let logs = support::forward_logs(lines.into_inner().into_inner());
    (child, addr, logs)
}

#[tokio::test]
async fn exits_cleanly_on_sigterm() {
    let db = TestDb::create(Backend::Postgres).await;
    let (mut child, _addr, _logs) = start_http_server(&db).await;
    let pid = child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exit promptly")
        .expect("exit status");
    assert!(status.success(), "{status}");
}
