//! Pipeline benchmark: U concurrent users × T tool-call turns through the real API (SSE), one
//! worker and the fake LLM, on the machine's Postgres and Redis; then the API's memory with
//! many idle SSE connections.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p conveyor-e2e --example pipeline -- [--users 1,32] [--turns 50]
//!     [--ttft-ms 0 --chunk-delay-ms 0 --chunks 8] [--idle-sse 10000]
//! ```
//!
//! Every turn is `add <unique title>`: the fake model answers with an `add_task` call, the
//! worker calls the MCP server, the model answers in text — 2 LLM calls + 1 MCP call. Each
//! user runs its turns one after the other, each in a new conversation (so history does not
//! grow and no turn waits on another). Each U gets its own fresh stack, so one run's queue,
//! database and caches cannot colour the next. Numbers are measured on the client, from the
//! moment the POST is sent; the run timestamps Postgres recorded are printed beside them.
//! The program prints a Markdown table and exits by itself: every loop is bounded by a count
//! and a deadline.
//!
//! The fake model's time is 0 by default, so the overhead is the whole turn latency; with
//! `--ttft-ms`/`--chunk-delay-ms` it is subtracted per turn as 2·ttft + (w + 1)·chunk_delay,
//! w being the words of the final answer (the tool call streams two argument pieces).
//!
//! Diagnostics: `--server-stats` counts Postgres rows/commits and Redis commands per turn;
//! `--client raw|raw-quickack` (with `--fresh-connections`) separates the network's share of
//! the latency; `--idle-pause-secs` leaves time to attach a heap profiler to the API.
//! The idle SSE part needs `--idle-sse` + 512 open files; the soft limit is raised to the hard
//! one with `prlimit` when needed, else the program says to run `ulimit -n` first.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use conveyor_e2e::harness::{Mode, SseStream, Stack, StackOptions};
use futures::StreamExt;
use serde_json::json;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    task::JoinSet,
};

/// Linux reports per-process CPU time in ticks of this size (USER_HZ is 100 on every
/// architecture Conveyor runs on).
const TICKS_PER_SEC: f64 = 100.0;

/// File descriptors kept free for everything besides the idle SSE sockets.
const SPARE_FDS: u64 = 512;

#[derive(Debug, Parser)]
#[command(about = "Conveyor pipeline benchmark: turns/s, TTFT, latency, overhead, idle SSE RSS")]
struct Args {
    /// Concurrent users per run; each value gets its own fresh stack.
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    users: Vec<usize>,
    /// Deployments to measure, each U in each, in this order: `distributed` (conveyor-api +
    /// workers on Postgres and Redis) and `embedded` (`conveyor dev`: one process, one SQLite
    /// file; `--workers` does not apply, `--worker-concurrency` is its concurrency).
    #[arg(
        long,
        value_delimiter = ',',
        value_enum,
        default_value = "distributed,embedded"
    )]
    modes: Vec<ModeArg>,
    /// Measured turns per user (sequential, each in a new conversation); 0 skips the turn runs.
    #[arg(long, default_value_t = 50)]
    turns: usize,
    /// Unmeasured warm-up turns per user before the measured phase.
    #[arg(long, default_value_t = 3)]
    warmup: usize,
    /// Fake model: time to first token of every LLM call.
    #[arg(long, default_value_t = 0)]
    ttft_ms: u64,
    /// Fake model: delay between two streamed chunks.
    #[arg(long, default_value_t = 0)]
    chunk_delay_ms: u64,
    /// Fake model: words of an echo answer (passed to fake-llm; the answer after a tool result
    /// is `Done. <tool result>`, whose length does not depend on it).
    #[arg(long)]
    chunks: Option<usize>,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Runs in flight per worker (raised to at least U).
    #[arg(long, default_value_t = 64)]
    worker_concurrency: usize,
    /// Idle SSE connections to hold open for the memory measurement (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    idle_sse: usize,
    /// Idle SSE connections being opened at once.
    #[arg(long, default_value_t = 200)]
    open_concurrency: usize,
    /// Before opening the idle SSE connections, print the API's pid and wait this long (to
    /// attach a profiler such as `heaptrack -p PID`).
    #[arg(long, default_value_t = 0)]
    idle_pause_secs: u64,
    /// Upper bound on each phase (warm-up, measured turns, idle SSE).
    #[arg(long, default_value_t = 300)]
    deadline_secs: u64,
    /// The HTTP client of the turns: `reqwest` (pooled keep-alive connections, like an app),
    /// `raw` (hand-written HTTP/1.1 on one keep-alive connection per user) or `raw-quickack`
    /// (the same, re-arming TCP_QUICKACK after every read — a diagnostic that takes the
    /// client's delayed ACKs out of the path).
    #[arg(long, value_enum, default_value_t = ClientKind::Reqwest)]
    client: ClientKind,
    /// With a raw client, open a new connection for every turn instead of keeping one per
    /// user.
    #[arg(long)]
    fresh_connections: bool,
    /// Also count what Postgres (this stack's database) and Redis (all of it: it is shared) did
    /// per turn; waits ~11 s around each measured phase for Postgres' statistics to be flushed.
    #[arg(long)]
    server_stats: bool,
    /// Show the services' logs (stderr) instead of silencing them.
    #[arg(long)]
    logs: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ModeArg {
    Distributed,
    Embedded,
}

impl ModeArg {
    fn mode(self) -> Mode {
        match self {
            Self::Distributed => Mode::Distributed,
            Self::Embedded => Mode::Embedded,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ClientKind {
    Reqwest,
    Raw,
    RawQuickack,
}

impl Args {
    fn stack_options(&self, mode: Mode, workers: usize, users: usize) -> StackOptions {
        let mut fake_llm_args = vec![
            "--ttft-ms".to_owned(),
            self.ttft_ms.to_string(),
            "--chunk-delay-ms".to_owned(),
            self.chunk_delay_ms.to_string(),
        ];
        if let Some(chunks) = self.chunks {
            fake_llm_args.extend(["--chunks".to_owned(), chunks.to_string()]);
        }
        StackOptions {
            mode,
            workers,
            worker_concurrency: self.worker_concurrency.max(users),
            fake_llm_args,
            quiet: !self.logs,
            log_file: None,
            // The benchmark measures the pipeline, not the per-user limits.
            env: vec![
                ("RATE_LIMIT_PER_MINUTE".to_owned(), "0".to_owned()),
                ("MAX_ACTIVE_RUNS_PER_USER".to_owned(), "0".to_owned()),
                ("MAX_SSE_STREAMS_PER_USER".to_owned(), "0".to_owned()),
            ],
        }
    }

    fn deadline(&self) -> Duration {
        Duration::from_secs(self.deadline_secs)
    }
}

/// What one measured turn looked like from the client.
#[derive(Debug, Clone, Copy)]
struct Timings {
    ttft: Duration,
    latency: Duration,
    /// `run.queued` → `run.started` as received.
    pickup: Duration,
    model: Duration,
}

#[derive(Debug)]
struct Turn {
    run_id: Option<String>,
    outcome: Result<Timings, String>,
}

/// The results of one U in one mode.
struct PhaseReport {
    mode: Mode,
    users: usize,
    worker_concurrency: usize,
    turns: Vec<Timings>,
    errors: BTreeMap<String, usize>,
    wall: Duration,
    db_pickup: Vec<Duration>,
    db_run: Vec<Duration>,
    cpu: Vec<(String, f64)>,
    server_stats: Option<ServerStats>,
    api_rss_kb: Option<u64>,
    worker_rss_kb: Option<u64>,
}

struct IdleReport {
    wanted: usize,
    opened: usize,
    failures: BTreeMap<String, usize>,
    open_time: Duration,
    rss_before_kb: u64,
    rss_after_kb: u64,
    rss_closed_kb: Option<u64>,
    api_fds: Option<usize>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.users.iter().all(|&u| u >= 1),
        "--users takes counts ≥ 1"
    );
    if args.idle_sse > 0 {
        ensure_fd_limit(args.idle_sse as u64 + SPARE_FDS)?;
    }
    let mut phases = Vec::new();
    for &mode in &args.modes {
        for &users in args.users.iter().filter(|_| args.turns > 0) {
            eprintln!("pipeline: {mode:?} U={users} × T={} …", args.turns);
            phases.push(throughput(&args, mode.mode(), users).await?);
        }
    }
    let idle = if args.idle_sse > 0 {
        eprintln!("pipeline: {} idle SSE connections …", args.idle_sse);
        Some(idle_sse(&args).await?)
    } else {
        None
    };
    print!("{}", render(&args, &phases, idle.as_ref()));
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Throughput and latency

async fn throughput(args: &Args, mode: Mode, users: usize) -> anyhow::Result<PhaseReport> {
    let options = args.stack_options(mode, args.workers, users);
    let worker_concurrency = options.worker_concurrency;
    let stack = Stack::start(options).await?;
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(users * 2)
        .build()?;
    let ctx = Arc::new(TurnContext {
        http,
        api_url: stack.api_url.clone(),
        client: args.client,
        fresh_connections: args.fresh_connections,
        ttft_ms: args.ttft_ms,
        chunk_delay_ms: args.chunk_delay_ms,
    });

    // Warm-up: connections, Postgres plans, the worker's MCP connection, allocator arenas.
    let warm = run_users(&ctx, users, args.warmup, "warm", args.deadline()).await;
    let warm_errors = warm.iter().filter(|t| t.outcome.is_err()).count();
    if warm_errors > 0 {
        eprintln!("pipeline: {warm_errors} warm-up turns failed (not counted)");
    }

    // Postgres and Redis counters describe the distributed deployment only.
    let distributed = mode == Mode::Distributed;
    let stats_before = if args.server_stats && distributed {
        Some(ServerStats::read(&stack).await?)
    } else {
        None
    };
    let pids = Pids::of(&stack);
    let pg = if distributed {
        Some(stack.db.pool().await?)
    } else {
        None
    };
    let cpu_before = pids.cpu_snapshot(&postgres_pids(pg.as_ref()).await?);
    let started = Instant::now();
    let turns = run_users(&ctx, users, args.turns, "turn", args.deadline()).await;
    let wall = started.elapsed();
    let cpu_after = pids.cpu_snapshot(&postgres_pids(pg.as_ref()).await?);
    if let Some(pg) = pg {
        pg.close().await;
    }
    let server_stats = match stats_before {
        Some(before) => Some(ServerStats::read(&stack).await?.since(&before)),
        None => None,
    };

    let mut report = PhaseReport {
        mode,
        users,
        worker_concurrency,
        turns: Vec::new(),
        errors: BTreeMap::new(),
        wall,
        db_pickup: Vec::new(),
        db_run: Vec::new(),
        cpu: cpu_after.since(&cpu_before),
        server_stats,
        api_rss_kb: pids.api.and_then(rss_kb),
        worker_rss_kb: pids.workers.first().copied().and_then(rss_kb),
    };
    let mut run_ids = Vec::new();
    for turn in turns {
        if let Some(id) = turn.run_id {
            run_ids.push(id);
        }
        match turn.outcome {
            Ok(timings) => report.turns.push(timings),
            Err(reason) => *report.errors.entry(reason).or_default() += 1,
        }
    }
    (report.db_pickup, report.db_run) = db_timings(&stack, &run_ids).await?;
    Ok(report)
}

/// What every turn task needs.
struct TurnContext {
    http: reqwest::Client,
    client: ClientKind,
    fresh_connections: bool,
    api_url: String,
    ttft_ms: u64,
    chunk_delay_ms: u64,
}

/// `users` tasks, each doing `turns` sequential turns; none starts a turn after `deadline`.
async fn run_users(
    ctx: &Arc<TurnContext>,
    users: usize,
    turns: usize,
    label: &'static str,
    deadline: Duration,
) -> Vec<Turn> {
    let deadline = tokio::time::Instant::now() + deadline;
    let nonce = ulid::Ulid::new().to_string().to_lowercase();
    let mut tasks = JoinSet::new();
    for u in 0..users {
        let ctx = Arc::clone(ctx);
        let nonce = nonce.clone();
        tasks.spawn(async move {
            let user = format!("user{u}");
            // The raw client's keep-alive connection, reused across this user's turns.
            let mut conn = None;
            let mut done = Vec::with_capacity(turns);
            for t in 0..turns {
                if tokio::time::Instant::now() >= deadline {
                    done.push(Turn {
                        run_id: None,
                        outcome: Err("not started before the deadline".to_owned()),
                    });
                    continue;
                }
                let title = format!("bench {label} {t} of {user} {nonce}");
                done.push(one_turn(&ctx, &mut conn, &user, &title, deadline).await);
            }
            done
        });
    }
    let mut all = Vec::with_capacity(users * turns);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(turns) => all.extend(turns),
            Err(err) => all.push(Turn {
                run_id: None,
                outcome: Err(format!("client task panicked: {err}")),
            }),
        }
    }
    all
}

/// One `add <title>` turn over `POST /chat` SSE, read to its terminal event.
async fn one_turn(
    ctx: &TurnContext,
    conn: &mut Option<TcpStream>,
    user: &str,
    title: &str,
    deadline: tokio::time::Instant,
) -> Turn {
    let mut run_id = None;
    let outcome = tokio::time::timeout_at(deadline, read_turn(ctx, conn, user, title, &mut run_id))
        .await
        .unwrap_or_else(|_| Err("no terminal event before the deadline".to_owned()));
    Turn { run_id, outcome }
}

async fn read_turn(
    ctx: &TurnContext,
    conn: &mut Option<TcpStream>,
    user: &str,
    title: &str,
    run_id: &mut Option<String>,
) -> Result<Timings, String> {
    let body = json!({ "message": format!("add {title}") });
    if ctx.client != ClientKind::Reqwest {
        return read_turn_raw(ctx, conn, user, &body.to_string(), run_id).await;
    }
    let request = ctx
        .http
        .post(format!("{}/api/{user}/chat", ctx.api_url))
        .header("accept", "text/event-stream")
        .json(&body);
    let mut tracker = TurnTracker::new(Instant::now());
    let mut sse = SseStream::open(request)
        .await
        .map_err(|err| format!("POST failed: {err:#}"))?;
    if sse.status != 200 {
        return Err(format!("POST answered HTTP {}", sse.status));
    }
    loop {
        let event = match sse.next_event().await {
            Ok(Some(event)) => event,
            Ok(None) => return Err("stream ended before a terminal event".to_owned()),
            Err(err) => return Err(format!("bad SSE: {err:#}")),
        };
        if let Some(done) = tracker.on_event(ctx, &event.event, &event.data, Instant::now()) {
            *run_id = tracker.run_id;
            return done;
        }
    }
}

/// The same turn on a raw socket: a hand-written HTTP/1.1 POST on the user's keep-alive
/// connection (or a new one per turn with `--fresh-connections`), with `TCP_QUICKACK`
/// re-armed after every read when asked. Quick ACKs from the client take away the stall that
/// delayed ACKs cause together with Nagle's algorithm on a server socket without
/// `TCP_NODELAY`: an A/B for where the turn latency goes.
async fn read_turn_raw(
    ctx: &TurnContext,
    conn: &mut Option<TcpStream>,
    user: &str,
    body: &str,
    run_id: &mut Option<String>,
) -> Result<Timings, String> {
    let quickack = ctx.client == ClientKind::RawQuickack;
    let addr = ctx.api_url.trim_start_matches("http://");
    let mut tracker = TurnTracker::new(Instant::now());
    // Taken out while in use: an error or a response that cannot be reused drops it.
    let mut stream = match conn.take() {
        Some(stream) if !ctx.fresh_connections => stream,
        _ => {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|err| format!("connect: {}", err.kind()))?;
            let _ = stream.set_nodelay(true);
            stream
        }
    };
    let request = format!(
        "POST /api/{user}/chat HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| format!("write: {}", err.kind()))?;
    let mut parser = RawSse::default();
    let mut buf = vec![0_u8; 16 * 1024];
    let mut outcome = None;
    // Until the terminal event, then on to the body's end so the connection can be reused.
    while !parser.ended {
        if quickack {
            let _ = stream.set_quickack(true);
        }
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|err| format!("read: {}", err.kind()))?;
        let now = Instant::now();
        if n == 0 {
            break;
        }
        for (kind, data) in parser.feed(&buf[..n])? {
            if outcome.is_none() {
                outcome = tracker.on_event(ctx, &kind, &data, now);
            }
        }
    }
    *run_id = tracker.run_id;
    if parser.ended && parser.chunked == Some(true) {
        *conn = Some(stream);
    }
    outcome.unwrap_or_else(|| Err("stream ended before a terminal event".to_owned()))
}

/// Client-side timestamps of one turn's events.
struct TurnTracker {
    sent: Instant,
    run_id: Option<String>,
    queued: Option<Instant>,
    started: Option<Instant>,
    first_delta: Option<Instant>,
    words: Option<usize>,
}

impl TurnTracker {
    fn new(sent: Instant) -> Self {
        Self {
            sent,
            run_id: None,
            queued: None,
            started: None,
            first_delta: None,
            words: None,
        }
    }

    /// Records an event received at `now`; the turn's outcome once it ended.
    fn on_event(
        &mut self,
        ctx: &TurnContext,
        kind: &str,
        data: &serde_json::Value,
        now: Instant,
    ) -> Option<Result<Timings, String>> {
        match kind {
            "run.queued" => {
                self.queued = Some(now);
                self.run_id = data["run_id"].as_str().map(str::to_owned);
            }
            "run.started" => self.started = self.started.or(Some(now)),
            "message.delta" => self.first_delta = self.first_delta.or(Some(now)),
            "message.completed" => {
                self.words = data["text"]
                    .as_str()
                    .map(|text| text.split_whitespace().count());
            }
            "run.completed" => {
                let (Some(queued), Some(started), Some(first_delta)) =
                    (self.queued, self.started, self.first_delta)
                else {
                    return Some(Err(
                        "completed without run.queued, run.started or a delta".to_owned()
                    ));
                };
                return Some(Ok(Timings {
                    ttft: first_delta - self.sent,
                    latency: now - self.sent,
                    pickup: started.saturating_duration_since(queued),
                    model: model_time(ctx.ttft_ms, ctx.chunk_delay_ms, self.words.unwrap_or(1)),
                }));
            }
            "run.failed" | "run.cancelled" => {
                let code = data["error"]["code"].as_str().unwrap_or("-");
                return Some(Err(format!("{kind} ({code})")));
            }
            _ => {}
        }
        None
    }
}

/// Just enough HTTP/1.1 (status, chunked body) and SSE (`event:` and `data:` lines) for the
/// raw client.
#[derive(Default)]
struct RawSse {
    raw: Vec<u8>,
    /// `None` until the headers were read; then whether the body is chunked.
    chunked: Option<bool>,
    text: String,
    /// The last chunk arrived: the response is over.
    ended: bool,
}

impl RawSse {
    fn feed(&mut self, bytes: &[u8]) -> Result<Vec<(String, serde_json::Value)>, String> {
        self.raw.extend_from_slice(bytes);
        if self.chunked.is_none() {
            let Some(end) = find(&self.raw, b"\r\n\r\n") else {
                return Ok(Vec::new());
            };
            let head = String::from_utf8_lossy(&self.raw[..end]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                let status = head.lines().next().unwrap_or_default().to_owned();
                return Err(format!("POST answered {status}"));
            }
            self.chunked = Some(head.contains("transfer-encoding: chunked"));
            self.raw.drain(..end + 4);
        }
        if self.chunked == Some(true) {
            while let Some(line_end) = find(&self.raw, b"\r\n") {
                let size_line = String::from_utf8_lossy(&self.raw[..line_end]);
                let size_hex = size_line.split(';').next().unwrap_or_default().trim();
                let size = usize::from_str_radix(size_hex, 16)
                    .map_err(|_| format!("bad chunk size {size_hex:?}"))?;
                if self.raw.len() < line_end + 2 + size + 2 {
                    break;
                }
                if size == 0 {
                    // No trailers are sent: the last chunk is `0\r\n\r\n`.
                    self.ended = true;
                    self.raw.clear();
                    break;
                }
                let chunk = &self.raw[line_end + 2..line_end + 2 + size];
                self.text.push_str(&String::from_utf8_lossy(chunk));
                self.raw.drain(..line_end + 2 + size + 2);
            }
        } else {
            self.text.push_str(&String::from_utf8_lossy(&self.raw));
            self.raw.clear();
        }
        let mut events = Vec::new();
        while let Some(end) = self.text.find("\n\n") {
            let block: String = self.text.drain(..end + 2).collect();
            let (mut kind, mut data) = (None, String::new());
            for line in block.lines() {
                if let Some(value) = line.strip_prefix("event:") {
                    kind = Some(value.trim().to_owned());
                } else if let Some(value) = line.strip_prefix("data:") {
                    data.push_str(value.strip_prefix(' ').unwrap_or(value));
                }
            }
            if let Some(kind) = kind {
                let data = serde_json::from_str(&data)
                    .map_err(|err| format!("event data is not JSON: {err}"))?;
                events.push((kind, data));
            }
        }
        Ok(events)
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The fake model's time for one tool-call turn whose final answer has `words` words: the
/// tool call (its first chunk after `ttft`, then two argument pieces one `chunk_delay` apart)
/// and the text answer (its first word after `ttft`, then one `chunk_delay` per further word).
fn model_time(ttft_ms: u64, chunk_delay_ms: u64, words: usize) -> Duration {
    let steps = 2 + u64::try_from(words.saturating_sub(1)).unwrap_or(u64::MAX);
    Duration::from_millis(2 * ttft_ms + chunk_delay_ms.saturating_mul(steps))
}

/// Postgres' own view of the measured runs: queued_at → started_at (pickup, including the
/// API's commit and the push) and started_at → finished_at (the worker's part).
async fn db_timings(
    stack: &Stack,
    run_ids: &[String],
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let rows: Vec<(Option<f64>, Option<f64>)> = if stack.mode() == Mode::Embedded {
        let path = stack
            .db
            .sqlite_path()
            .context("the embedded stack's file")?;
        let pool = sqlx::SqlitePool::connect(&format!("sqlite:{}", path.display())).await?;
        let rows = sqlx::query_as(
            "SELECT (julianday(started_at) - julianday(queued_at)) * 86400000.0,
                    (julianday(finished_at) - julianday(started_at)) * 86400000.0
             FROM runs WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(sqlx::types::Json(run_ids))
        .fetch_all(&pool)
        .await
        .context("read run timestamps")?;
        pool.close().await;
        rows
    } else {
        let pool = stack.db.pool().await?;
        let rows = sqlx::query_as(
            "SELECT (EXTRACT(EPOCH FROM started_at - queued_at) * 1000)::float8,
                    (EXTRACT(EPOCH FROM finished_at - started_at) * 1000)::float8
             FROM runs WHERE id = ANY($1)",
        )
        .bind(run_ids)
        .fetch_all(&pool)
        .await
        .context("read run timestamps")?;
        pool.close().await;
        rows
    };
    let ms = |v: Option<f64>| {
        v.filter(|v| *v >= 0.0)
            .map(|v| Duration::from_secs_f64(v / 1000.0))
    };
    Ok((
        rows.iter().filter_map(|r| ms(r.0)).collect(),
        rows.iter().filter_map(|r| ms(r.1)).collect(),
    ))
}

/// Counters of the stack's database (`pg_stat_database`, `pg_stat_user_tables`) and of Redis
/// (`INFO commandstats`), for "what does a turn cost the servers".
#[derive(Debug, Clone, Default)]
struct ServerStats {
    /// Commits, rollbacks, rows returned/fetched/inserted/updated/deleted.
    database: BTreeMap<&'static str, i64>,
    /// Per table: rows inserted/updated/deleted, sequential and index scans.
    tables: BTreeMap<String, [i64; 5]>,
    /// Per Redis command: calls and microseconds.
    redis: BTreeMap<String, (i64, i64)>,
}

impl ServerStats {
    async fn read(stack: &Stack) -> anyhow::Result<Self> {
        // Backends flush their counters when idle, at most every 10 s (PGSTAT_IDLE_INTERVAL).
        tokio::time::sleep(Duration::from_secs(11)).await;
        let pool = stack.db.pool().await?;
        let row: (i64, i64, i64, i64, i64, i64, i64) = sqlx::query_as(
            "SELECT xact_commit, xact_rollback, tup_returned, tup_fetched, tup_inserted,
                    tup_updated, tup_deleted
             FROM pg_stat_database WHERE datname = current_database()",
        )
        .fetch_one(&pool)
        .await?;
        let database = BTreeMap::from([
            ("commits", row.0),
            ("rollbacks", row.1),
            ("returned", row.2),
            ("fetched", row.3),
            ("inserted", row.4),
            ("updated", row.5),
            ("deleted", row.6),
        ]);
        let rows: Vec<(String, i64, i64, i64, i64, i64)> = sqlx::query_as(
            "SELECT relname::text, n_tup_ins, n_tup_upd, n_tup_del, coalesce(seq_scan, 0),
                    coalesce(idx_scan, 0)
             FROM pg_stat_user_tables",
        )
        .fetch_all(&pool)
        .await?;
        pool.close().await;
        let tables = rows
            .into_iter()
            .map(|(name, a, b, c, d, e)| (name, [a, b, c, d, e]))
            .collect();
        let client = redis::Client::open(conveyor_e2e::harness::redis_url())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let info: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await?;
        let redis = info
            .lines()
            .filter_map(|line| {
                let (name, fields) = line.strip_prefix("cmdstat_")?.split_once(':')?;
                let field = |key: &str| -> Option<i64> {
                    fields
                        .split(',')
                        .find_map(|f| f.strip_prefix(key)?.strip_prefix('='))?
                        .parse()
                        .ok()
                };
                Some((name.to_owned(), (field("calls")?, field("usec")?)))
            })
            .collect();
        Ok(Self {
            database,
            tables,
            redis,
        })
    }

    fn since(&self, before: &Self) -> Self {
        Self {
            database: self
                .database
                .iter()
                .map(|(k, v)| (*k, v - before.database.get(k).copied().unwrap_or(0)))
                .collect(),
            tables: self
                .tables
                .iter()
                .map(|(k, v)| {
                    let b = before.tables.get(k).copied().unwrap_or_default();
                    (k.clone(), std::array::from_fn(|i| v[i] - b[i]))
                })
                .collect(),
            redis: self
                .redis
                .iter()
                .map(|(k, (calls, usec))| {
                    let (c0, u0) = before.redis.get(k).copied().unwrap_or_default();
                    (k.clone(), (calls - c0, usec - u0))
                })
                .filter(|(_, (calls, _))| *calls > 0)
                .collect(),
        }
    }

    /// Lines of per-turn figures.
    fn per_turn(&self, turns: usize) -> Vec<String> {
        let turns = count_f64(turns).max(1.0);
        let per = |v: i64| i32::try_from(v).map_or(f64::MAX, f64::from) / turns;
        let mut lines = Vec::new();
        let db: Vec<String> = self
            .database
            .iter()
            .map(|(k, v)| format!("{k} {:.1}", per(*v)))
            .collect();
        lines.push(format!("Postgres per turn: {}", db.join(", ")));
        let tables: Vec<String> = self
            .tables
            .iter()
            .filter(|(_, v)| v.iter().any(|x| *x != 0))
            .map(|(k, v)| {
                format!(
                    "{k} ins {:.1} upd {:.1} del {:.1} seq-scan {:.1} idx-scan {:.1}",
                    per(v[0]),
                    per(v[1]),
                    per(v[2]),
                    per(v[3]),
                    per(v[4])
                )
            })
            .collect();
        lines.push(format!("Postgres tables per turn: {}", tables.join("; ")));
        let mut redis: Vec<(&String, &(i64, i64))> = self.redis.iter().collect();
        redis.sort_by_key(|(_, (calls, _))| std::cmp::Reverse(*calls));
        let total_calls: i64 = redis.iter().map(|(_, (c, _))| c).sum();
        let total_usec: i64 = redis.iter().map(|(_, (_, u))| u).sum();
        let cmds: Vec<String> = redis
            .iter()
            .map(|(k, (calls, _))| format!("{k} {:.1}", per(*calls)))
            .collect();
        lines.push(format!(
            "Redis calls per turn (whole server): {:.1} ({:.2} ms in commands): {}",
            per(total_calls),
            per(total_usec) / 1000.0,
            cmds.join(", ")
        ));
        lines
    }
}

// ---------------------------------------------------------------------------------------------
// Idle SSE connections

/// Holds `--idle-sse` connections open on one run that stays queued (a stack without workers),
/// and reads the API's resident memory before and after.
async fn idle_sse(args: &Args) -> anyhow::Result<IdleReport> {
    let stack = Stack::start(args.stack_options(Mode::Distributed, 0, 1)).await?;
    let (status, accepted) = stack
        .post_chat("idle", json!({"message": "add a run no worker will take"}))
        .await?;
    anyhow::ensure!(
        status == 202,
        "creating the run answered {status}: {accepted}"
    );
    let path = accepted["stream_url"]
        .as_str()
        .context("stream_url")?
        .to_owned();
    let addr = stack
        .api_url
        .strip_prefix("http://")
        .context("api_url is http://")?
        .to_owned();
    let pid = stack.api_pid().context("the API is running")?;

    if args.idle_pause_secs > 0 {
        eprintln!(
            "pipeline: API pid {pid}; opening the idle connections in {} s",
            args.idle_pause_secs
        );
        tokio::time::sleep(Duration::from_secs(args.idle_pause_secs)).await;
    }
    // One connection first, so that what the SSE path builds lazily is in "before".
    let first = open_idle(&addr, &path)
        .await
        .map_err(|reason| anyhow::anyhow!("first idle SSE connection: {reason}"))?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before_kb = rss_kb(pid).context("API RSS")?;

    let deadline = tokio::time::Instant::now() + args.deadline();
    let started = Instant::now();
    let results: Vec<Result<TcpStream, String>> = futures::stream::iter(0..args.idle_sse)
        .map(|_| {
            let (addr, path) = (&addr, &path);
            async move {
                tokio::time::timeout_at(deadline, open_idle(addr, path))
                    .await
                    .unwrap_or_else(|_| Err("not open before the deadline".to_owned()))
            }
        })
        .buffer_unordered(args.open_concurrency.max(1))
        .collect()
        .await;
    let open_time = started.elapsed();
    let mut held = Vec::with_capacity(results.len());
    let mut failures = BTreeMap::new();
    for result in results {
        match result {
            Ok(stream) => held.push(stream),
            Err(reason) => *failures.entry(reason).or_default() += 1,
        }
    }
    // Let the API finish whatever the burst left behind before reading its memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after_kb = rss_kb(pid).context("API RSS")?;
    let api_fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(Iterator::count);
    let opened = held.len();
    drop(held);
    drop(first);
    // Whether the memory goes back once they are gone (live state) or stays (allocator).
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_closed_kb = rss_kb(pid);
    Ok(IdleReport {
        wanted: args.idle_sse,
        opened,
        failures,
        open_time,
        rss_before_kb,
        rss_after_kb,
        rss_closed_kb,
        api_fds,
    })
}

/// A hand-written `GET …/events` on a raw socket (lighter than an HTTP client per
/// connection), read until the run's first event arrived; then it stays idle.
async fn open_idle(addr: &str, path: &str) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect(addr)
        .await
        .map_err(|err| format!("connect: {}", err.kind()))?;
    let request =
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|err| format!("write: {}", err.kind()))?;
    let mut seen = Vec::with_capacity(1024);
    let mut buf = [0_u8; 2048];
    while seen.len() < 64 * 1024 {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|err| format!("read: {}", err.kind()))?;
        if n == 0 {
            return Err("closed before the first event".to_owned());
        }
        seen.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&seen);
        if !text.starts_with("HTTP/1.1 200") && text.contains("\r\n") {
            let status = text.lines().next().unwrap_or_default().to_owned();
            return Err(format!("answered {status}"));
        }
        if text.contains("event: run.queued") {
            return Ok(stream);
        }
    }
    Err("no run.queued in the first 64 KiB".to_owned())
}

/// Raises this process's soft limit on open files to `needed` (up to the hard limit) before
/// the stack is spawned: the API inherits it and holds one socket per idle connection, as
/// does this client.
fn ensure_fd_limit(needed: u64) -> anyhow::Result<()> {
    let (soft, hard) = nofile_limits()?;
    if soft >= needed {
        return Ok(());
    }
    if hard > soft {
        // The workspace forbids unsafe code and has no setrlimit wrapper; util-linux's
        // prlimit sets the limit of a running process from outside.
        let target = needed.max(soft).min(hard);
        let status = std::process::Command::new("prlimit")
            .arg(format!("--pid={}", std::process::id()))
            .arg(format!("--nofile={target}:"))
            .status();
        if let Err(err) = status {
            eprintln!("pipeline: could not run prlimit ({err})");
        }
    }
    let (soft, hard) = nofile_limits()?;
    if soft < needed {
        bail!(
            "{needed} open files are needed for the idle SSE test (in this process and in the \
             API), but the limit is {soft} (hard {hard}). Raise it first, e.g. `ulimit -n 65536` \
             (the hard limit may need root or /etc/security/limits.conf), or pass a smaller \
             --idle-sse (or 0 to skip it)."
        );
    }
    Ok(())
}

/// The soft and hard `RLIMIT_NOFILE` of this process, from `/proc/self/limits`.
fn nofile_limits() -> anyhow::Result<(u64, u64)> {
    let limits = std::fs::read_to_string("/proc/self/limits").context("read /proc/self/limits")?;
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .context("no 'Max open files' in /proc/self/limits")?;
    let mut values = line["Max open files".len()..]
        .split_whitespace()
        .map(|v| v.parse::<u64>().unwrap_or(u64::MAX));
    let soft = values.next().context("soft limit")?;
    let hard = values.next().context("hard limit")?;
    Ok((soft, hard))
}

// ---------------------------------------------------------------------------------------------
// Process figures from /proc

/// The stack's processes, found once after start-up.
struct Pids {
    api: Option<u32>,
    workers: Vec<u32>,
    mcp: Vec<u32>,
    fake_llm: Option<u32>,
}

impl Pids {
    fn of(stack: &Stack) -> Self {
        let workers = stack.worker_pids();
        // Embedded, the one process is the API and the worker: its child is the MCP server.
        let mcp = workers
            .iter()
            .chain(stack.api_pid().iter().filter(|_| workers.is_empty()))
            .flat_map(|&pid| children(pid))
            .collect();
        Self {
            api: stack.api_pid(),
            workers,
            mcp,
            fake_llm: stack.fake_llm_pid(),
        }
    }

    /// CPU seconds used so far by each part's processes. Postgres counts the backends
    /// connected to this stack's database and the server's background processes (WAL writer,
    /// checkpointer, …, shared with anything else using the server); Redis is found by name
    /// and is shared too.
    fn cpu_snapshot(&self, pg: &PostgresPids) -> CpuSnapshot {
        let of = |pids: &[u32]| -> BTreeMap<u32, f64> {
            pids.iter()
                .filter_map(|&pid| Some((pid, process_cpu(pid)?)))
                .collect()
        };
        let named = processes_named(&["redis-server"]);
        CpuSnapshot {
            parts: vec![
                ("api", of(self.api.as_slice())),
                ("worker", of(&self.workers)),
                ("mcp", of(&self.mcp)),
                ("fake-llm", of(self.fake_llm.as_slice())),
                ("client", of(&[std::process::id()])),
                ("postgres", of(&pg.backends)),
                ("pg-bg", of(&pg.background)),
                ("redis", of(&named[0])),
            ],
            machine: machine_busy_seconds().unwrap_or(0.0),
        }
    }
}

/// CPU seconds per process of each part, and of the whole machine.
struct CpuSnapshot {
    parts: Vec<(&'static str, BTreeMap<u32, f64>)>,
    machine: f64,
}

impl CpuSnapshot {
    /// CPU seconds each part used since `before` (processes that exited meanwhile are left
    /// out, new ones count whole), then "machine" for the whole machine.
    fn since(&self, before: &Self) -> Vec<(String, f64)> {
        let mut out: Vec<(String, f64)> = self
            .parts
            .iter()
            .zip(&before.parts)
            .map(|((name, now), (_, then))| {
                let used = now
                    .iter()
                    .map(|(pid, s)| s - then.get(pid).copied().unwrap_or(0.0))
                    .sum();
                ((*name).to_owned(), used)
            })
            .collect();
        out.push(("machine".to_owned(), self.machine - before.machine));
        out
    }
}

/// Postgres server processes, from `pg_stat_activity`.
struct PostgresPids {
    /// Backends connected to the stack's database (not the one asking).
    backends: Vec<u32>,
    /// The server's own processes (WAL writer, checkpointer, autovacuum, …).
    background: Vec<u32>,
}

async fn postgres_pids(pool: Option<&sqlx::PgPool>) -> anyhow::Result<PostgresPids> {
    let Some(pool) = pool else {
        return Ok(PostgresPids {
            backends: Vec::new(),
            background: Vec::new(),
        });
    };
    let rows: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT pid, backend_type <> 'client backend'
         FROM pg_stat_activity
         WHERE pid <> pg_backend_pid()
           AND (datname = current_database() OR backend_type <> 'client backend')",
    )
    .fetch_all(pool)
    .await
    .context("read pg_stat_activity")?;
    let pick = |bg: bool| {
        rows.iter()
            .filter(|r| r.1 == bg)
            .filter_map(|r| u32::try_from(r.0).ok())
            .collect()
    };
    Ok(PostgresPids {
        backends: pick(false),
        background: pick(true),
    })
}

/// The ids of the processes whose command name is each of `names`.
fn processes_named(names: &[&str]) -> Vec<Vec<u32>> {
    let mut found = vec![Vec::new(); names.len()];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
            continue;
        };
        if let Some(i) = names.iter().position(|name| *name == comm.trim()) {
            found[i].push(pid);
        }
    }
    found
}

/// The children of `pid` (its MCP servers, for a worker).
fn children(pid: u32) -> Vec<u32> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .filter_map(Result::ok)
        .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
        .flat_map(|list| {
            list.split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect()
}

/// User + system CPU seconds of one process (`/proc/<pid>/stat` fields 14 and 15).
fn process_cpu(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; the fields after it are fixed.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u32>().ok()? + fields.get(12)?.parse::<u32>().ok()?;
    Some(f64::from(ticks) / TICKS_PER_SEC)
}

/// Busy CPU seconds of the whole machine, all cores (`/proc/stat`, everything but idle and
/// iowait).
fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_whitespace()
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let busy: u64 = fields.iter().take(8).sum::<u64>() - fields.get(3)? - fields.get(4)?;
    Some(u32::try_from(busy).map_or(f64::MAX, f64::from) / TICKS_PER_SEC)
}

/// `VmRSS` of a process, in KiB.
fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

// ---------------------------------------------------------------------------------------------
// Output

fn count_f64(n: usize) -> f64 {
    u32::try_from(n).map_or(f64::MAX, f64::from)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn mb(kb: u64) -> String {
    format!(
        "{:.1}",
        u32::try_from(kb).map_or(f64::MAX, f64::from) / 1024.0
    )
}

/// Nearest-rank percentile (`per_mille` 500 = p50) of sorted values.
fn percentile(sorted: &[Duration], per_mille: usize) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (sorted.len() * per_mille).div_ceil(1000).max(1);
    sorted[rank.min(sorted.len()) - 1]
}

/// `p50 / p99 / max` in milliseconds.
fn spread(mut values: Vec<Duration>) -> String {
    if values.is_empty() {
        return "–".to_owned();
    }
    values.sort_unstable();
    format!(
        "{} / {} / {}",
        ms(percentile(&values, 500)),
        ms(percentile(&values, 990)),
        ms(*values.last().unwrap_or(&Duration::ZERO))
    )
}

fn p50(mut values: Vec<Duration>) -> Duration {
    values.sort_unstable();
    percentile(&values, 500)
}

impl PhaseReport {
    fn turns_per_sec(&self) -> f64 {
        count_f64(self.turns.len()) / self.wall.as_secs_f64().max(1e-9)
    }

    fn column<T>(&self, f: impl Fn(&Timings) -> T) -> Vec<T> {
        self.turns.iter().map(f).collect()
    }

    fn overheads(&self) -> Vec<Duration> {
        self.column(|t| t.latency.saturating_sub(t.model))
    }

    fn errors(&self) -> usize {
        self.errors.values().sum()
    }

    /// CPU milliseconds per completed turn for each part, "other" being everything else on
    /// the machine (the kernel, short-lived processes, other users of the machine and of the
    /// shared Postgres).
    fn cpu_per_turn(&self) -> String {
        let turns = count_f64(self.turns.len()).max(1.0);
        let machine = self
            .cpu
            .iter()
            .find(|(name, _)| name == "machine")
            .map_or(0.0, |(_, s)| *s);
        let parts: Vec<&(String, f64)> = self
            .cpu
            .iter()
            .filter(|(name, _)| name != "machine")
            .collect();
        let listed: f64 = parts.iter().map(|(_, s)| s).sum();
        let mut out = String::new();
        for (name, seconds) in parts {
            let _ = write!(out, "{name} {:.2} · ", seconds * 1000.0 / turns);
        }
        let _ = write!(
            out,
            "other {:.2} · total {:.2}",
            (machine - listed).max(0.0) * 1000.0 / turns,
            machine * 1000.0 / turns
        );
        out
    }

    fn machine_busy(&self) -> String {
        let machine = self
            .cpu
            .iter()
            .find(|(name, _)| name == "machine")
            .map_or(0.0, |(_, s)| *s);
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        format!(
            "{:.0} % of {cores} cores",
            100.0 * machine / self.wall.as_secs_f64().max(1e-9) / count_f64(cores)
        )
    }
}

fn render(args: &Args, phases: &[PhaseReport], idle: Option<&IdleReport>) -> String {
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    let concurrency: Vec<String> = phases
        .iter()
        .map(|p| p.worker_concurrency.to_string())
        .collect();
    let model_zero = args.ttft_ms == 0 && args.chunk_delay_ms == 0;
    let _ = writeln!(out, "\n## Conveyor pipeline benchmark\n");
    let _ = writeln!(
        out,
        "- Stack: conveyor-api + {} × conveyor-worker (concurrency {}) with conveyor-mcp + \
         fake-llm + Postgres + Redis, all on this {cores}-CPU machine with the client; release \
         build; a fresh stack (database, Redis prefix) per column. `embedded` columns: \
         `conveyor dev` (API + worker pool in one process, same concurrency) with its \
         `conveyor mcp` child on one SQLite file, + fake-llm; no Postgres, no Redis.",
        args.workers,
        if concurrency.is_empty() {
            "–".to_owned()
        } else {
            concurrency.join("/")
        },
    );
    let _ = writeln!(
        out,
        "- Turn: `add <unique title>` via `POST /api/{{user}}/chat` (SSE) = 2 LLM calls + 1 MCP \
         call. U users (user0…) run concurrently; each runs T = {} turns one after another, \
         each in a new conversation, after {} unmeasured warm-up turns. Client: {}.",
        args.turns,
        args.warmup,
        match args.client {
            ClientKind::Reqwest => "reqwest, pooled keep-alive connections",
            ClientKind::Raw if args.fresh_connections => "raw HTTP/1.1, a new connection per turn",
            ClientKind::Raw => "raw HTTP/1.1, one keep-alive connection per user",
            ClientKind::RawQuickack if args.fresh_connections =>
                "raw HTTP/1.1, a new connection per turn, TCP_QUICKACK re-armed after each read",
            ClientKind::RawQuickack =>
                "raw HTTP/1.1, one keep-alive connection per user, TCP_QUICKACK re-armed after \
                 each read",
        }
    );
    let _ = writeln!(
        out,
        "- Fake model: ttft {} ms, chunk delay {} ms. Model time of a turn = 2·ttft + \
         (w + 1)·chunk_delay, w = words of the final answer (the tool call streams two argument \
         pieces){}.",
        args.ttft_ms,
        args.chunk_delay_ms,
        if model_zero { " = 0 here" } else { "" }
    );
    let _ = writeln!(
        out,
        "- TTFT = POST sent → first `message.delta`; turn latency = POST sent → \
         `run.completed`; overhead = turn latency − model time; turns/s = completed turns / \
         wall time of the measured phase; any run not ending in `run.completed` is an error."
    );
    let _ = writeln!(
        out,
        "- Queue pickup (client) = `run.queued` received → `run.started` received: both come \
         through the same Redis → API → SSE relay, so its latency mostly cancels. Postgres' \
         `queued_at → started_at` also counts the API's commit and the push.\n"
    );

    if !phases.is_empty() {
        let mut header = "| (ms unless noted) |".to_owned();
        let mut rule = "| --- |".to_owned();
        for phase in phases {
            let mode = match phase.mode {
                Mode::Distributed => "distributed",
                Mode::Embedded => "embedded",
            };
            let _ = write!(header, " {mode} U={} |", phase.users);
            rule.push_str(" ---: |");
        }
        let _ = writeln!(out, "{header}\n{rule}");
        let row = |out: &mut String, name: &str, f: &dyn Fn(&PhaseReport) -> String| {
            let _ = write!(out, "| {name} |");
            for phase in phases {
                let _ = write!(out, " {} |", f(phase));
            }
            out.push('\n');
        };
        row(&mut out, "turns completed (errors)", &|p| {
            format!("{} ({})", p.turns.len(), p.errors())
        });
        row(&mut out, "wall time (s)", &|p| {
            format!("{:.2}", p.wall.as_secs_f64())
        });
        row(&mut out, "**turns/s**", &|p| {
            format!("**{:.1}**", p.turns_per_sec())
        });
        row(&mut out, "TTFT p50 / p99 / max", &|p| {
            spread(p.column(|t| t.ttft))
        });
        row(&mut out, "turn latency p50 / p99 / max", &|p| {
            spread(p.column(|t| t.latency))
        });
        row(&mut out, "**overhead** p50 / p99 / max", &|p| {
            spread(p.overheads())
        });
        row(&mut out, "queue pickup, client, p50 / p99 / max", &|p| {
            spread(p.column(|t| t.pickup))
        });
        row(
            &mut out,
            "queue pickup, Postgres queued_at→started_at, p50 / p99 / max",
            &|p| spread(p.db_pickup.clone()),
        );
        row(
            &mut out,
            "worker part, Postgres started_at→finished_at, p50 / p99 / max",
            &|p| spread(p.db_run.clone()),
        );
        row(&mut out, "CPU ms per turn", &PhaseReport::cpu_per_turn);
        row(&mut out, "CPU busy", &PhaseReport::machine_busy);
        row(&mut out, "RSS after (MB): api / worker", &|p| {
            format!(
                "{} / {}",
                p.api_rss_kb.map_or_else(|| "–".to_owned(), mb),
                p.worker_rss_kb.map_or_else(|| "–".to_owned(), mb)
            )
        });
        for phase in phases {
            if let Some(stats) = &phase.server_stats {
                for line in stats.per_turn(phase.turns.len()) {
                    let _ = writeln!(out, "\nU={}: {line}", phase.users);
                }
            }
            for (reason, count) in &phase.errors {
                let _ = writeln!(out, "\nU={} error × {count}: {reason}", phase.users);
            }
        }
    }

    if let Some(idle) = idle {
        let grown = idle.rss_after_kb.saturating_sub(idle.rss_before_kb);
        let per_conn =
            u32::try_from(grown).map_or(f64::MAX, f64::from) / count_f64(idle.opened).max(1.0);
        let _ = writeln!(
            out,
            "\n| idle SSE (one queued run, no worker) | |\n| --- | ---: |"
        );
        let _ = writeln!(
            out,
            "| connections held (failed) | {} of {} ({}) |",
            idle.opened,
            idle.wanted,
            idle.wanted - idle.opened
        );
        let _ = writeln!(
            out,
            "| time to open them, {} at a time (s) | {:.2} |",
            args.open_concurrency,
            idle.open_time.as_secs_f64()
        );
        let _ = writeln!(
            out,
            "| API RSS before → with them (MB) | {} → **{}** |",
            mb(idle.rss_before_kb),
            mb(idle.rss_after_kb)
        );
        let _ = writeln!(out, "| RSS per connection (KiB) | {per_conn:.1} |");
        if let Some(closed) = idle.rss_closed_kb {
            let _ = writeln!(
                out,
                "| API RSS 2 s after closing them (MB) | {} |",
                mb(closed)
            );
        }
        if let Some(fds) = idle.api_fds {
            let _ = writeln!(out, "| API open file descriptors | {fds} |");
        }
        for (reason, count) in &idle.failures {
            let _ = writeln!(out, "\nidle SSE failure × {count}: {reason}");
        }
    }

    let _ = writeln!(out, "\n| target | measured | |\n| --- | ---: | --- |");
    let verdict = |ok: bool| if ok { "met" } else { "**missed**" };
    if let Some(phase) = phases.iter().find(|p| p.users == 1) {
        let overhead = p50(phase.overheads());
        let ok = phase.errors() == 0 && overhead <= Duration::from_millis(10);
        let _ = writeln!(
            out,
            "| overhead p50 ≤ 10 ms at U=1 | {} ms | {} |",
            ms(overhead),
            verdict(ok)
        );
    }
    if let Some(phase) = phases.iter().find(|p| p.users == 32) {
        let rate = phase.turns_per_sec();
        let ok = phase.errors() == 0 && rate >= 200.0;
        // The target is for a zero-time model; a slow one caps turns/s at U / model time.
        let _ = writeln!(
            out,
            "| ≥ 200 turns/s at U=32 (model time 0) | {rate:.1} turns/s | {} |",
            if model_zero {
                verdict(ok)
            } else {
                "n/a: model time is not 0"
            }
        );
    }
    if let Some(idle) = idle {
        let ok = idle.opened == idle.wanted && idle.rss_after_kb < 300 * 1024;
        let _ = writeln!(
            out,
            "| {} idle SSE streams < 300 MB API RSS | {} MB | {} |",
            idle.wanted,
            mb(idle.rss_after_kb),
            verdict(ok)
        );
    }
    out
}
