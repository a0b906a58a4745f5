//! `conveyor-mcp` on stdio, the way Conveyor's workers run it: the real binary as a child
//! process, each test with its own database (Postgres, or a SQLite file).

mod support;

use std::{process::Stdio, time::Duration};

use rmcp::{ServiceExt, transport::TokioChildProcess};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines},
    process::{Child, ChildStdin, ChildStdout},
};

use support::{Backend, Connected, DEADLINE, TestDb, db::TempDir};

transport_scenarios!(connect_stdio);

/// Starts the binary on stdio with a fresh database and connects rmcp's child-process client.
async fn connect_stdio(backend: Backend) -> Connected {
    let db = TestDb::create(backend).await;
    let (transport, stderr) = TokioChildProcess::builder(support::server_command(&db.url))
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn conveyor-mcp");
    let logs = support::forward_logs(stderr.expect("piped stderr"));
    let client = tokio::time::timeout(DEADLINE, ().serve(transport))
        .await
        .expect("stdio handshake in time")
        .expect("stdio handshake");
    Connected::new(client, db, None, logs)
}

/// The server driven with raw JSON-RPC lines, for what a well-behaved client never sends.
struct RawSession {
    child: Child,
    stdin: ChildStdin,
    stdout: Lines<BufReader<ChildStdout>>,
    /// Messages read while waiting for a particular response.
    others: Vec<Value>,
    _logs: tokio::task::JoinHandle<()>,
}

impl RawSession {
    /// Starts the server against `database_url` and completes the MCP handshake.
    async fn start(database_url: &str) -> Self {
        let mut child = support::server_command(database_url)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn conveyor-mcp");
        let logs = support::forward_logs(child.stderr.take().unwrap());
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut session = Self {
            child,
            stdin,
            stdout,
            others: Vec::new(),
            _logs: logs,
        };
        session
            .send(br#"{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":"2025-06-18","capabilities":{},"clientInfo":{"name":"raw","version":"1"}}}"#)
            .await;
        let initialized = session.response(1).await;
        assert!(
            initialized["result"]["serverInfo"].is_object(),
            "{initialized}"
        );
        session
            .send(br#"{"jsonrpc":"2.0","method":"notifications/initialized"}"#)
            .await;
        session
    }

    /// Writes `line` and a newline to the server's stdin.
    async fn send(&mut self, line: &[u8]) {
        self.stdin.write_all(line).await.expect("write stdin");
        self.stdin.write_all(b"\n").await.expect("write stdin");
        self.stdin.flush().await.expect("flush stdin");
    }

    /// The response to request `id`, read earlier or from stdout; every line must be JSON.
    async fn response(&mut self, id: i64) -> Value {
        if let Some(at) = self.others.iter().position(|m| m["id"] == json!(id)) {
            return self.others.remove(at);
        }
        tokio::time::timeout(DEADLINE, async {
            loop {
                let line = self
                    .stdout
                    .next_line()
                    .await
                    .expect("read stdout")
                    .expect("server closed stdout");
                let message: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("stdout carried a non-JSON line {line:?}: {e}"));
                if message["id"] == json!(id) {
                    return message;
                }
                self.others.push(message);
            }
        })
        .await
        .expect("response in time")
    }
}

#[tokio::test]
async fn survives_malformed_json_rpc_lines() {
    let db = TestDb::create(Backend::Postgres).await;
    let mut session = RawSession::start(&db.url).await;

    session.send(b"this is not json").await;
    session
        .send(br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":"#)
        .await;
    session.send(&[0xff, 0xfe, 0x00, b'{']).await;
    session.send(br#"{"hello":"world"}"#).await;
    session.send(b"[1, 2, 3]").await;
    session
        .send(br#"{"jsonrpc":"2.0","id":3,"method":"no/such/method"}"#)
        .await;

    session
        .send(br#"{"jsonrpc":"2.0","id":4,"method":"tools/call","params":{"name":"add_task","arguments":{"user_id":"alice","title":"Still here"}}}"#)
        .await;
    let added = session.response(4).await;
    assert_eq!(added["result"]["isError"], json!(false), "{added}");
    assert_eq!(
        added["result"]["structuredContent"]["task"]["title"],
        json!("Still here")
    );
    let unknown = session.response(3).await;
    assert!(unknown["error"].is_object(), "{unknown}");

    session
        .send(br#"{"jsonrpc":"2.0","id":5,"method":"tools/call","params":{"name":"list_tasks","arguments":{"user_id":"alice"}}}"#)
        .await;
    let listed = session.response(5).await;
    assert_eq!(listed["result"]["structuredContent"]["count"], json!(1));

    // Well-formed JSON that is not JSON-RPC gets an "Invalid request" error with no id;
    // unparsable lines get nothing at all.
    assert!(
        session
            .others
            .iter()
            .all(|m| m["error"].is_object() && m["id"].is_null()),
        "unexpected messages: {:?}",
        session.others
    );
    assert!(!session.others.is_empty());

    // Closing stdin ends the session cleanly.
    drop(session.stdin);
    let status = tokio::time::timeout(DEADLINE, session.child.wait())
        .await
        .expect("exit in time")
        .expect("exit status");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn exits_cleanly_on_sigterm_while_stdin_is_open() {
    let db = TestDb::create(Backend::Postgres).await;
    let mut session = RawSession::start(&db.url).await;
    let pid = session.child.id().expect("pid").to_string();
    let killed = tokio::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .await
        .expect("run kill");
    assert!(killed.success());
    let status = tokio::time::timeout(Duration::from_secs(10), session.child.wait())
        .await
        .expect("exit promptly although stdin is still open")
        .expect("exit status");
    assert!(status.success(), "{status}");
}

#[tokio::test]
async fn missing_database_url_is_a_clear_startup_error() {
    // Run outside the workspace so the `.env` file there is not found either.
    let output = tokio::process::Command::new(support::BIN)
        .env_remove("DATABASE_URL")
        .current_dir(std::env::temp_dir())
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(DEADLINE, output)
        .await
        .expect("exit in time")
        .expect("run conveyor-mcp");
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "stdout is for the protocol only");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("DATABASE_URL is not set"), "{stderr}");
}

#[tokio::test]
async fn unknown_database_url_scheme_is_a_clear_startup_error() {
    let output = tokio::process::Command::new(support::BIN)
        .env("DATABASE_URL", "mysql://root@127.0.0.1/conveyor")
        .stdin(Stdio::null())
        .output();
    let output = tokio::time::timeout(DEADLINE, output)
        .await
        .expect("exit in time")
        .expect("run conveyor-mcp");
    assert!(!output.status.success());
    assert!(output.stdout.is_empty(), "stdout is for the protocol only");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("DATABASE_URL must start with postgres://, postgresql:// or sqlite:"),
        "{stderr}"
    );
}

/// The embedded mode's promise: the SQLite file is created on first start, and what a call
/// acknowledged survives the server being killed — a keyed repeat after the restart answers
/// the stored result instead of adding the task again.
#[tokio::test]
async fn sqlite_file_is_created_and_a_killed_server_loses_nothing() {
    let dir = TempDir::create();
    let file = dir.file("tasks.db");
    let url = dir.sqlite_url("tasks.db");
    assert!(!file.exists());
    let add = br#"{"jsonrpc":"2.0","id":2,"method":"tools/call","params":{"name":"add_task","arguments":{"user_id":"alice","title":"Outlive the server"},"_meta":{"conveyor/idempotency_key":"call-1"}}}"#;
    let list = br#"{"jsonrpc":"2.0","id":3,"method":"tools/call","params":{"name":"list_tasks","arguments":{"user_id":"alice"}}}"#;

    let mut first = RawSession::start(&url).await;
    assert!(file.exists(), "the SQLite file is created at start-up");
    first.send(add).await;
    let added = first.response(2).await;
    assert_eq!(added["result"]["isError"], json!(false), "{added}");
    first.child.kill().await.expect("SIGKILL the server");

    let mut second = RawSession::start(&url).await;
    second.send(add).await;
    let repeated = second.response(2).await;
    assert_eq!(repeated["result"], added["result"]);
    second.send(list).await;
    let listed = second.response(3).await;
    assert_eq!(listed["result"]["structuredContent"]["count"], json!(1));
    assert_eq!(
        listed["result"]["structuredContent"]["tasks"][0],
        added["result"]["structuredContent"]["task"]
    );
}
