//! Pickup latency and idle cost of the job queue, against the machine's Redis.
//!
//! One consumer (chat only, concurrency 4). Phases:
//! 1. idle for 5 s: Redis fetches and commands per second of an idle worker;
//! 2. 200 jobs pushed 20 ms apart: time from push to handler start, p50 / p99 / max;
//! 3. a burst of 5,000 jobs pushed back to back: time until all are handled (no stalls).
//!
//! `cargo run --release -p conveyor-shared --example queue_pickup` (`REDIS_URL` to override
//! `redis://127.0.0.1:6379`). Uses its own key prefix and deletes its keys at the end.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, bail};
use conveyor_shared::queue::{
    ConsumerConfig, ConsumerMetrics, JobProducer, QueueName, RunJob, run_consumers,
    unique_worker_name,
};
use redis::AsyncCommands as _;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const SPACED_JOBS: usize = 200;
const SPACING: Duration = Duration::from_millis(20);
const BURST_JOBS: usize = 5_000;
const IDLE_WINDOW: Duration = Duration::from_secs(5);

/// Push instants by run id, and the measured pickup latencies.
#[derive(Default)]
struct Pickups {
    pushed: HashMap<String, Instant>,
    latencies: Vec<Duration>,
    handled: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let redis_url =
        std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("bench:{}", ulid::Ulid::new());
    let result = run(&redis_url, &prefix).await;
    cleanup(&redis_url, &prefix).await?;
    result
}

async fn run(redis_url: &str, prefix: &str) -> anyhow::Result<()> {
    let producer = JobProducer::connect(redis_url, prefix).await?;
    let pickups = Arc::new(Mutex::new(Pickups::default()));
    let handler = {
        let pickups = Arc::clone(&pickups);
        move |job: RunJob| {
            let started = Instant::now();
            let pickups = Arc::clone(&pickups);
            async move {
                let mut pickups = pickups.lock().expect("pickups lock");
                if let Some(pushed) = pickups.pushed.remove(&job.run_id) {
                    pickups.latencies.push(started - pushed);
                }
                pickups.handled += 1;
                Ok(())
            }
        }
    };

    let mut config = ConsumerConfig::new(redis_url, prefix, unique_worker_name("bench"));
    config.queues = vec![QueueName::Chat];
    config.concurrency = 4;
    let metrics = Arc::clone(&config.metrics);
    println!(
        "consumer: concurrency {}, fallback poll {:?}, heartbeat {:?}",
        config.concurrency, config.fallback_poll, config.heartbeat_interval
    );
    let shutdown = CancellationToken::new();
    let mut consumer = tokio::task::JoinSet::new();
    consumer.spawn(run_consumers(config, handler, shutdown.clone()));

    let outcome = measure(&producer, &pickups, &metrics).await;
    shutdown.cancel();
    if let Some(finished) = consumer.join_next().await {
        finished??;
    }
    outcome
}

async fn measure(
    producer: &JobProducer,
    pickups: &Mutex<Pickups>,
    metrics: &ConsumerMetrics,
) -> anyhow::Result<()> {
    // 1. Idle cost, once the worker has registered and done its first fetches.
    wait_for(Duration::from_secs(10), || metrics.snapshot().fetches > 0).await?;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let before = metrics.snapshot();
    tokio::time::sleep(IDLE_WINDOW).await;
    let after = metrics.snapshot();
    let per_second = |n: u64| as_f64(n) / IDLE_WINDOW.as_secs_f64();
    println!(
        "idle: {:.2} fetches/s, {:.2} redis commands/s (over {IDLE_WINDOW:?})",
        per_second(after.fetches - before.fetches),
        per_second(after.redis_commands - before.redis_commands),
    );

    // 2. Spaced pushes: pickup latency of an idle worker.
    let mut ticks = tokio::time::interval(SPACING);
    for i in 0..SPACED_JOBS {
        ticks.tick().await;
        let run_id = format!("run_spaced_{i}");
        pickups
            .lock()
            .expect("pickups lock")
            .pushed
            .insert(run_id.clone(), Instant::now());
        producer.push(QueueName::Chat, RunJob::new(run_id)).await?;
    }
    wait_for(Duration::from_secs(10), || {
        pickups.lock().expect("pickups lock").handled == SPACED_JOBS
    })
    .await?;
    let mut latencies = std::mem::take(&mut pickups.lock().expect("pickups lock").latencies);
    latencies.sort();
    // Nearest rank: the smallest latency at or above `percent` of the samples.
    let quantile = |percent: usize| latencies[(latencies.len() * percent).div_ceil(100).max(1) - 1];
    println!(
        "pickup ({SPACED_JOBS} jobs, {SPACING:?} apart): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(quantile(50)),
        ms(quantile(99)),
        ms(quantile(100)),
    );

    // 3. Burst: everything handled, no stall waiting for a fallback tick.
    let burst_start = Instant::now();
    for i in 0..BURST_JOBS {
        producer
            .push(QueueName::Chat, RunJob::new(format!("run_burst_{i}")))
            .await?;
    }
    let pushed_in = burst_start.elapsed();
    wait_for(Duration::from_mins(2), || {
        pickups.lock().expect("pickups lock").handled == SPACED_JOBS + BURST_JOBS
    })
    .await?;
    let drained_in = burst_start.elapsed();
    println!(
        "burst: {BURST_JOBS} jobs pushed in {:.0} ms, all handled after {:.0} ms ({:.0} jobs/s)",
        ms(pushed_in),
        ms(drained_in),
        as_f64(BURST_JOBS as u64) / drained_in.as_secs_f64(),
    );
    let totals = metrics.snapshot();
    println!(
        "totals: {} fetches, {} redis commands, {} wake-ups, {} jobs, {} restarts",
        totals.fetches,
        totals.redis_commands,
        totals.wakeups,
        totals.jobs_succeeded,
        totals.worker_restarts
    );
    Ok(())
}

fn as_f64(n: u64) -> f64 {
    f64::from(u32::try_from(n).unwrap_or(u32::MAX))
}

fn ms(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

async fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    while !done() {
        if Instant::now() >= deadline {
            bail!("timed out after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    Ok(())
}

async fn cleanup(redis_url: &str, prefix: &str) -> anyhow::Result<()> {
    let mut conn = redis::Client::open(redis_url)?
        .get_multiplexed_async_connection()
        .await
        .context("cleanup connection")?;
    let mut keys: Vec<String> = Vec::new();
    {
        let mut scan = conn.scan_match::<_, String>(format!("{prefix}:*")).await?;
        while let Some(key) = futures::StreamExt::next(&mut scan).await {
            keys.push(key?);
        }
    }
    for chunk in keys.chunks(500) {
        let _: () = conn.del(chunk).await?;
    }
    let _: () = conn
        .zrem(
            "core:apalis:queues:list",
            &[
                format!("{prefix}:chat:workers"),
                format!("{prefix}:batch:workers"),
            ],
        )
        .await?;
    Ok(())
}
