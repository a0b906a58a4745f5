//! Latency and throughput of `conveyor-mcp` over one held stdio connection — the way a Conveyor
//! worker uses it.
//!
//! ```text
//! cargo run --release -p conveyor-mcp --example bench
//! BENCH_DB=sqlite cargo run --release -p conveyor-mcp --example bench
//! ```
//!
//! It creates its own database (see `tests/support/db.rs`): Postgres by default
//! (`TEST_DATABASE_URL` names the admin database), or a fresh SQLite file with
//! `BENCH_DB=sqlite` (the embedded mode). It builds and spawns the release binary
//! (`target/release/conveyor-mcp`, next to this example's `examples/` directory; set
//! `CONVEYOR_MCP_BIN` to use another binary), seeds 20 tasks for one user, then times `list_tasks` and `add_task` with 1 and 8 concurrent callers on the
//! one connection, plus MCP `ping` as the floor of the protocol path without a database.
//! `BENCH_CALLS` sets the calls per case (default 2,000); `MCP_DB_POOL_SIZE` is
//! passed through to the server. Writes go to a second user so the list stays at 20 tasks.

#[path = "../tests/support/db.rs"]
mod db;

use std::{
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use rmcp::{
    RoleClient, ServiceExt,
    model::{CallToolRequestParams, ClientRequest, PingRequest},
    service::Peer,
    transport::TokioChildProcess,
};
use serde_json::{Value, json};
use tokio::{process::Command, task::JoinSet};

const SEEDED_TASKS: usize = 20;
const READER: &str = "bench-reader";
const WRITER: &str = "bench-writer";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::var("BENCH_CALLS")
        .ok()
        .map(|raw| raw.parse())
        .transpose()
        .context("BENCH_CALLS must be a whole number")?
        .unwrap_or(2_000);
    let backend = match std::env::var("BENCH_DB").as_deref() {
        Err(_) | Ok("postgres") => db::Backend::Postgres,
        Ok("sqlite") => db::Backend::Sqlite,
        Ok(other) => bail!("BENCH_DB must be postgres or sqlite (got {other:?})"),
    };
    let bin = server_binary().await?;
    let db = db::TestDb::create(backend).await;

    let mut command = Command::new(&bin);
    command
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .kill_on_drop(true);
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("spawn {}", bin.display()))?;
    let client = ().serve(transport).await.context("MCP handshake")?;
    let peer = client.peer().clone();

    for i in 0..SEEDED_TASKS {
        call(
            &peer,
            "add_task",
            json!({"user_id": READER, "title": format!("Seeded task {i}"), "description": "Some details about this task.", "priority": "high"}),
        )
        .await?;
    }
    // Warm the server's pool and prepared statements before measuring.
    run_case(&peer, "list_tasks", 4, 200).await?;
    run_case(&peer, "add_task", 4, 200).await?;

    let pool = std::env::var("MCP_DB_POOL_SIZE")
        .unwrap_or_else(|_| conveyor_mcp::config::DEFAULT_POOL_SIZE.to_string());
    println!(
        "conveyor-mcp over one stdio connection: {calls} calls per case, {SEEDED_TASKS} tasks listed, {backend:?}, DB pool {pool}"
    );
    println!(
        "{:<11} {:>7} {:>9} {:>9} {:>9}",
        "tool", "callers", "p50 ms", "p99 ms", "calls/s"
    );
    for tool in ["ping", "list_tasks", "add_task"] {
        for callers in [1, 8] {
            let stats = run_case(&peer, tool, callers, calls).await?;
            println!(
                "{tool:<11} {callers:>7} {:>9.3} {:>9.3} {:>9.0}",
                millis(stats.p50),
                millis(stats.p99),
                stats.calls_per_sec
            );
        }
    }

    drop(peer);
    client.cancel().await.context("close the connection")?;

    // Every timed add_task call must have added exactly one task.
    let added = db
        .count("SELECT count(*) FROM tasks WHERE user_id = $1", WRITER)
        .await;
    let expected = 200 + 2 * calls;
    if usize::try_from(added)? != expected {
        bail!("expected {expected} tasks for {WRITER}, found {added}");
    }
    Ok(())
}

/// The server binary: `CONVEYOR_MCP_BIN`, or the release build next to this example, built
/// first (a no-op when fresh) so that the numbers are never those of a stale binary.
async fn server_binary() -> anyhow::Result<PathBuf> {
    if let Ok(bin) = std::env::var("CONVEYOR_MCP_BIN") {
        return Ok(PathBuf::from(bin));
    }
    let exe = std::env::current_exe()?;
    let profile_dir = exe
        .parent()
        .and_then(|examples| examples.parent())
        .context("the example should live in target/<profile>/examples")?;
    if let Ok(cargo) = std::env::var("CARGO") {
        let status = Command::new(cargo)
            .args([
                "build",
                "--release",
                "-p",
                "conveyor-mcp",
                "--bin",
                "conveyor-mcp",
            ])
            .status()
            .await?;
        if !status.success() {
            bail!("building conveyor-mcp failed");
        }
    }
    let bin = profile_dir.join("conveyor-mcp");
    if !bin.exists() {
        bail!(
            "{} not found: run `cargo build --release -p conveyor-mcp` or set CONVEYOR_MCP_BIN",
            bin.display()
        );
    }
    Ok(bin)
}

struct Stats {
    p50: Duration,
    p99: Duration,
    calls_per_sec: f64,
}

/// `calls` calls of `tool`, spread over `callers` concurrent callers sharing the connection.
async fn run_case(
    peer: &Peer<RoleClient>,
    tool: &'static str,
    callers: usize,
    calls: usize,
) -> anyhow::Result<Stats> {
    let started = Instant::now();
    let mut tasks = JoinSet::new();
    for caller in 0..callers {
        let peer = peer.clone();
        let share = calls / callers + usize::from(caller < calls % callers);
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(share);
            for i in 0..share {
                let arguments = match tool {
                    "list_tasks" => json!({"user_id": READER}),
                    _ => json!({"user_id": WRITER, "title": format!("Bench task {caller}-{i}")}),
                };
                let start = Instant::now();
                if tool == "ping" {
                    peer.send_request(ClientRequest::PingRequest(PingRequest::default()))
                        .await?;
                } else {
                    call(&peer, tool, arguments).await?;
                }
                latencies.push(start.elapsed());
            }
            anyhow::Ok(latencies)
        });
    }
    let mut latencies = Vec::with_capacity(calls);
    while let Some(joined) = tasks.join_next().await {
        latencies.extend(joined??);
    }
    let elapsed = started.elapsed();
    latencies.sort_unstable();
    let percentile = |p: usize| latencies[(latencies.len() * p / 100).min(latencies.len() - 1)];
    Ok(Stats {
        p50: percentile(50),
        p99: percentile(99),
        calls_per_sec: precise(latencies.len()) / elapsed.as_secs_f64(),
    })
}

async fn call(peer: &Peer<RoleClient>, tool: &'static str, arguments: Value) -> anyhow::Result<()> {
    let Value::Object(arguments) = arguments else {
        bail!("arguments must be an object");
    };
    let result = peer
        .call_tool(CallToolRequestParams::new(tool).with_arguments(arguments))
        .await?;
    if result.is_error == Some(true) {
        bail!("{tool} failed: {:?}", result.content);
    }
    Ok(())
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

#[expect(clippy::cast_precision_loss, reason = "call counts are far below 2^52")]
fn precise(count: usize) -> f64 {
    count as f64
}
