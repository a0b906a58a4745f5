//! `conveyor-worker`: takes run jobs from the queue and executes them — the agent loop against
//! the configured LLM, tools over held MCP connections, results committed to Postgres, events
//! streamed through Redis. Scale by starting more worker processes.

pub mod agent;
pub mod execution;
pub mod mcp;
pub mod metrics;

use std::{sync::Arc, time::Duration};

use conveyor_shared::{
    backends::Backends,
    config::WorkerConfig,
    db::CommitMode,
    llm::{LlmLimiter, build_client},
    queue::{
        ConsumerConfig, ConsumerMetrics, JobProducer, LocalConsumerConfig, QueueName,
        run_consumers, run_local_consumers, unique_worker_name,
    },
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::{
    agent::{Agent, RetryPolicy},
    execution::RunExecutor,
    mcp::McpPool,
    metrics::WorkerMetrics,
};

/// How this worker process consumes (from the command line).
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    pub queues: Vec<QueueName>,
    pub concurrency: usize,
}

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error(transparent)]
    Backends(#[from] conveyor_shared::backends::BackendError),
    #[error(transparent)]
    Queue(#[from] conveyor_shared::queue::QueueError),
    #[error(transparent)]
    Servers(#[from] mcp::ServersFileError),
    #[error("cannot build the HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the LLM rate limiter cannot reach Redis (REDIS_URL): {0}")]
    Limiter(#[from] redis::RedisError),
    #[error("cannot serve metrics on WORKER_METRICS_ADDR {addr}: {source}")]
    MetricsBind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// Runs the worker until `shutdown` is cancelled, then finishes or hands back in-flight runs.
pub async fn run(
    config: WorkerConfig,
    options: WorkerOptions,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let common = &config.common;
    let backends = Backends::connect(common, CommitMode::Asynchronous).await?;
    // Every LLM request of every worker takes its permit here (a no-op without limits).
    let limiter = LlmLimiter::connect(
        common.redis_url.expose(),
        &common.redis_prefix,
        config.llm.provider.name(),
        &config.llm.model,
        config.llm_limits,
    )
    .await?;
    let servers = mcp::load_servers(config.mcp_servers_file.as_deref())?;
    run_with(config, options, backends, limiter, servers, shutdown).await
}

/// [`run`] on backends, a limiter and MCP servers the caller chose (the embedded mode passes
/// its in-process ones).
pub async fn run_with(
    config: WorkerConfig,
    options: WorkerOptions,
    backends: Backends,
    limiter: LlmLimiter,
    servers: Vec<mcp::ServerSpec>,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let common = &config.common;
    let Backends { db, bus, producer } = backends;
    // The embedded mode's producer feeds in-process queues, which this worker then serves.
    let local_queue = match &producer {
        JobProducer::Local(queue) => Some(queue.clone()),
        JobProducer::Redis(_) => None,
    };
    let tracker = TaskTracker::new();

    let mut consumer = ConsumerConfig::new(
        common.redis_url.expose(),
        &common.redis_prefix,
        String::new(),
    );
    consumer.queues = options.queues;
    consumer.concurrency = options.concurrency;
    consumer.batch_concurrency = options.concurrency.div_ceil(2);
    consumer.shutdown_grace = config.shutdown_grace;
    consumer.metrics = Arc::new(ConsumerMetrics::default());
    let slots = consumer
        .queues
        .iter()
        .map(|queue| (*queue, consumer.concurrency_of(*queue)))
        .collect();
    let metrics = WorkerMetrics::new(Arc::clone(&consumer.metrics), slots);
    // The metrics server stops with the process, after the consumers have drained.
    let metrics_shutdown = CancellationToken::new();
    if let Some(addr) = config.metrics_addr {
        let listener = metrics::bind(addr).await?;
        tracing::info!(%addr, "worker metrics listening");
        let metrics = metrics.clone();
        let stop = metrics_shutdown.clone();
        tracker.spawn(async move {
            if let Err(error) = metrics::serve(listener, metrics, stop).await {
                tracing::error!(%error, "worker metrics server failed");
            }
        });
    }
    // The MCP servers stop only after the consumers: on SIGTERM, runs finishing within the
    // shutdown grace still call tools. Stopping the pool with `shutdown` killed the servers at
    // the signal, so those runs got "tool server failed" errors and their side effects were lost.
    let mcp_shutdown = CancellationToken::new();
    let mcp = McpPool::start(
        servers,
        config.mcp_call_timeout,
        &metrics.mcp,
        &tracker,
        &mcp_shutdown,
    );
    mcp.wait_started(Duration::from_secs(15)).await;

    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .pool_max_idle_per_host(options.concurrency.max(8))
        .build()?;
    let agent = Agent {
        llm: build_client(&config.llm, http),
        limiter,
        metrics: metrics.llm.clone(),
        model: config.llm.model.clone(),
        mcp,
        db: db.clone(),
        max_turns: config.max_turns,
        retry: RetryPolicy {
            max_attempts: config.llm_max_attempts,
            min_delay: config.llm_retry_min_delay,
            max_delay: config.llm_retry_max_delay.max(config.llm_retry_min_delay),
        },
        fault_injection: config.fault_injection,
    };
    if let Some(fault) = config.fault_injection {
        tracing::warn!(
            ?fault,
            "CONVEYOR_FAULT_INJECT is set: this worker will crash on purpose (tests only)"
        );
    }
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".to_owned());
    let worker_name = unique_worker_name(&host);
    let executor = RunExecutor {
        agent,
        db,
        bus,
        producer,
        worker_name: worker_name.clone(),
        history_window: i64::from(config.history_window),
        delta_coalesce: config.delta_coalesce,
        turns: metrics.turns.clone(),
    };
    tracing::info!(worker = %worker_name, provider = %config.llm.provider, model = %config.llm.model, concurrency = options.concurrency, "worker started");

    consumer.worker_name = worker_name;
    let handler = move |job| {
        let executor = executor.clone();
        async move { executor.handle(job).await }
    };
    let result = match local_queue {
        Some(queue) => {
            let config = LocalConsumerConfig::from(&consumer);
            run_local_consumers(queue, config, handler, shutdown.clone()).await
        }
        None => run_consumers(consumer, handler, shutdown.clone()).await,
    };
    shutdown.cancel();
    mcp_shutdown.cancel();
    metrics_shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    result.map_err(Into::into)
}
