//! Batch benchmark: one batch of N prompts through 1, 2, 4, … worker processes (each
//! `--queues chat,batch`) and the fake LLM with a realistic latency, on the machine's Postgres
//! and Redis; prints prompts/s per worker count and the interactive TTFT with and without the
//! batch running.
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo run --release -p conveyor-e2e --example batch -- [--prompts 10000] [--workers 1,2,4]
//!     [--concurrency 32] [--ttft-ms 300 --chunk-delay-ms 20 --chunks 20] [--probes 50]
//! ```
//!
//! Each worker count gets a fresh stack. First `--probes` chat turns are sent one after the other
//! with nothing else running (TTFT without a batch); then the batch is uploaded and, while it
//! runs, chat turns are sent one after the other again (TTFT with the batch running; a probe
//! counts only if the batch was still running when it got its first token). Throughput is the
//! batch's prompts divided by the time from the upload to the batch's `completed`, as a client
//! polling its status sees it. TTFT is measured on the client: from sending `POST /chat` (SSE)
//! to the first `message.delta`, so it includes the fake model's `--ttft-ms`.
//!
//! Every prompt is plain text (one LLM call, no tool), so the batch's work is the model's
//! latency plus the pipeline's overhead. A worker serving both queues gives batch runs half its
//! `--concurrency` (rounded up) and keeps the rest for chat.

use std::{
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};
use clap::Parser;
use conveyor_e2e::harness::{Mode, SseStream, Stack, StackOptions};
use serde_json::{Value, json};
use tokio::task::JoinSet;

#[derive(Debug, Parser)]
#[command(about = "Conveyor batch benchmark: prompts/s per worker count, chat TTFT beside a batch")]
struct Args {
    /// Prompts in the batch.
    #[arg(long, default_value_t = 10_000)]
    prompts: usize,
    /// Worker process counts; each gets its own fresh stack.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4")]
    workers: Vec<usize>,
    /// `--concurrency` of each worker (batch runs get half of it).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Fake model: time to first token of every LLM call.
    #[arg(long, default_value_t = 300)]
    ttft_ms: u64,
    /// Fake model: delay between two streamed chunks.
    #[arg(long, default_value_t = 20)]
    chunk_delay_ms: u64,
    /// Fake model: words (chunks) of each answer.
    #[arg(long, default_value_t = 20)]
    chunks: usize,
    /// Chat turns measured without the batch, and at most as many while it runs.
    #[arg(long, default_value_t = 50)]
    probes: usize,
    /// Pause between two chat probes.
    #[arg(long, default_value_t = 100)]
    probe_pause_ms: u64,
    /// Show the services' logs.
    #[arg(long)]
    logs: bool,
}

impl Args {
    fn stack_options(&self, workers: usize) -> StackOptions {
        StackOptions {
            mode: Mode::Distributed,
            workers,
            worker_concurrency: self.concurrency,
            fake_llm_args: vec![
                "--ttft-ms".to_owned(),
                self.ttft_ms.to_string(),
                "--chunk-delay-ms".to_owned(),
                self.chunk_delay_ms.to_string(),
                "--chunks".to_owned(),
                self.chunks.to_string(),
            ],
            quiet: !self.logs,
            log_file: None,
            // The benchmark measures the pipeline, not the per-user limits.
            env: vec![
                ("RATE_LIMIT_PER_MINUTE".to_owned(), "0".to_owned()),
                ("MAX_ACTIVE_RUNS_PER_USER".to_owned(), "0".to_owned()),
                (
                    "MAX_BATCH_LINES".to_owned(),
                    self.prompts.max(1).to_string(),
                ),
            ],
        }
    }
}

/// One worker count's figures.
struct Row {
    workers: usize,
    seconds: f64,
    prompts_per_sec: f64,
    idle: Vec<Duration>,
    busy: Vec<Duration>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    ensure!(args.prompts >= 1, "--prompts must be at least 1");
    ensure!(
        args.workers.iter().all(|&w| w >= 1),
        "--workers takes counts ≥ 1"
    );
    let mut rows = Vec::new();
    for &workers in &args.workers {
        eprintln!("{workers} worker(s): starting a fresh stack");
        rows.push(measure(&args, workers).await?);
    }
    println!("{}", table(&args, &rows));
    Ok(())
}

async fn measure(args: &Args, workers: usize) -> anyhow::Result<Row> {
    let stack = Stack::start(args.stack_options(workers)).await?;
    let http = reqwest::Client::new();
    // Warm up the connections and the workers' MCP servers.
    for _ in 0..3 {
        probe(&http, &stack.api_url).await?;
    }
    let mut idle = Vec::with_capacity(args.probes);
    for _ in 0..args.probes {
        idle.push(probe(&http, &stack.api_url).await?);
        tokio::time::sleep(Duration::from_millis(args.probe_pause_ms)).await;
    }

    let body: String = (0..args.prompts).fold(String::new(), |mut body, i| {
        let _ = writeln!(
            body,
            "{}",
            json!({"custom_id": format!("p{i:06}"), "message": format!("summarise item {i}")})
        );
        body
    });
    eprintln!("{workers} worker(s): uploading {} prompts", args.prompts);
    let started = Instant::now();
    let response = http
        .post(format!("{}/api/bench/batches", stack.api_url))
        .body(body)
        .send()
        .await?;
    ensure!(
        response.status() == 201,
        "upload answered {}",
        response.status()
    );
    let created: Value = response.json().await?;
    let id = created["id"].as_str().context("batch id")?.to_owned();

    let running = Arc::new(AtomicBool::new(true));
    let mut probes = JoinSet::new();
    {
        let http = http.clone();
        let api_url = stack.api_url.clone();
        let running = running.clone();
        let (count, pause) = (args.probes, Duration::from_millis(args.probe_pause_ms));
        probes.spawn(async move {
            let mut busy = Vec::with_capacity(count);
            while busy.len() < count && running.load(Ordering::Relaxed) {
                let ttft = probe(&http, &api_url).await?;
                if running.load(Ordering::Relaxed) {
                    busy.push(ttft);
                }
                tokio::time::sleep(pause).await;
            }
            anyhow::Ok(busy)
        });
    }
    let deadline = started + Duration::from_hours(2);
    let batch = loop {
        let batch: Value = http
            .get(format!("{}/api/bench/batches/{id}", stack.api_url))
            .send()
            .await?
            .json()
            .await?;
        if batch["status"] != "in_progress" {
            break batch;
        }
        ensure!(
            Instant::now() < deadline,
            "the batch did not finish: {batch}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let seconds = started.elapsed().as_secs_f64();
    running.store(false, Ordering::Relaxed);
    let busy = probes.join_next().await.context("the probe task")???;
    ensure!(batch["status"] == "completed", "the batch ended {batch}");
    ensure!(
        batch["counts"]["completed"] == args.prompts,
        "not every prompt completed: {batch}"
    );
    let row = Row {
        workers,
        seconds,
        prompts_per_sec: f64::from(u32::try_from(args.prompts)?) / seconds,
        idle,
        busy,
    };
    eprintln!(
        "{workers} worker(s): {:.1} s, {:.1} prompts/s",
        row.seconds, row.prompts_per_sec
    );
    Ok(row)
}

/// One chat turn in SSE mode; its time to first token.
async fn probe(http: &reqwest::Client, api_url: &str) -> anyhow::Result<Duration> {
    let sent = Instant::now();
    let request = http
        .post(format!("{api_url}/api/probe/chat"))
        .json(&json!({"message": "how are you"}));
    let mut stream = SseStream::open(request).await?;
    ensure!(stream.status == 200, "chat answered {}", stream.status);
    let mut ttft = None;
    while let Some(event) = tokio::time::timeout(Duration::from_mins(2), stream.next_event())
        .await
        .context("a chat probe stalled")??
    {
        if event.event == "message.delta" && ttft.is_none() {
            ttft = Some(sent.elapsed());
        }
        if event.is_terminal() {
            ensure!(
                event.event == "run.completed",
                "probe ended {}",
                event.event
            );
            break;
        }
    }
    ttft.context("a probe got no text")
}

/// The nearest-rank `p`th percentile in milliseconds.
fn percentile(samples: &[Duration], p: usize) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut ms: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e3).collect();
    ms.sort_by(f64::total_cmp);
    let rank = (p * ms.len()).div_ceil(100);
    Some(ms[rank.clamp(1, ms.len()) - 1])
}

fn table(args: &Args, rows: &[Row]) -> String {
    let ms = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), |v| format!("{v:.0}"));
    let mut out = format!(
        "batch of {} prompts; fake model {} ms TTFT + {} chunks × {} ms; worker --concurrency {} \
         (batch slots {})\n\n",
        args.prompts,
        args.ttft_ms,
        args.chunks,
        args.chunk_delay_ms,
        args.concurrency,
        args.concurrency.div_ceil(2),
    );
    out.push_str(
        "| workers | batch time (s) | prompts/s | chat TTFT p50 / p99 idle (ms) | chat TTFT p50 / p99 during batch (ms) | probes idle / during |\n",
    );
    out.push_str("| ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {:.1} | {:.1} | {} / {} | {} / {} | {} / {} |",
            row.workers,
            row.seconds,
            row.prompts_per_sec,
            ms(percentile(&row.idle, 50)),
            ms(percentile(&row.idle, 99)),
            ms(percentile(&row.busy, 50)),
            ms(percentile(&row.busy, 99)),
            row.idle.len(),
            row.busy.len(),
        );
    }
    out
}
