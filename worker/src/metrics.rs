//! The worker's Prometheus metrics and the small HTTP server that serves them.
//!
//! Everything here is per process: a scrape of each worker shows its own LLM traffic, turns,
//! MCP calls and busy slots (cluster-wide numbers such as queue depth come from the API).
//! Label children are resolved once, at start-up, so recording an event is an atomic add.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, http::header, response::IntoResponse, routing::get};
use conveyor_shared::{
    metrics::{AtomicHistogram, CONTENT_TYPE, encode},
    queue::{ConsumerMetrics, QueueName},
};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::{ConstGauge, Gauge},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

type Labels = [(&'static str, &'static str); 1];
type ServerLabels = [(&'static str, String); 1];
type ServerReasonLabels = [(&'static str, String); 2];

/// Why an LLM request failed, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LlmFailure {
    /// HTTP 429.
    RateLimited,
    /// HTTP 5xx (and 408/409/425).
    ServerError,
    /// Another 4xx: the request itself is wrong; not retried.
    ClientError,
    /// The connection failed.
    Connection,
    /// The stream ended without a finish reason.
    StreamCut,
    /// The stream broke or carried an error or an unreadable chunk.
    StreamError,
    /// No permit from the shared rate limiter within its maximum wait.
    LimiterTimeout,
}

impl LlmFailure {
    const ALL: [Self; 7] = [
        Self::RateLimited,
        Self::ServerError,
        Self::ClientError,
        Self::Connection,
        Self::StreamCut,
        Self::StreamError,
        Self::LimiterTimeout,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::ServerError => "server_error",
            Self::ClientError => "client_error",
            Self::Connection => "connection",
            Self::StreamCut => "stream_cut",
            Self::StreamError => "stream_error",
            Self::LimiterTimeout => "limiter_timeout",
        }
    }
}

/// How a run attempt ended, as the `outcome` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnOutcome {
    Completed,
    Failed,
    Cancelled,
    /// It failed transiently and goes back to the queue.
    Retried,
}

impl TurnOutcome {
    const ALL: [Self; 4] = [
        Self::Completed,
        Self::Failed,
        Self::Cancelled,
        Self::Retried,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Retried => "retried",
        }
    }
}

/// Why an MCP call failed, as the `reason` label says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum McpFailure {
    /// The tool answered with `isError` (e.g. "task 7 not found").
    ToolError,
    /// The server rejected the call (a JSON-RPC error such as invalid params).
    Rejected,
    /// No answer within the per-call timeout.
    Timeout,
    /// The connection to the server failed during the call.
    Transport,
    /// The server was restarting; the call was not sent.
    Unavailable,
}

impl McpFailure {
    const ALL: [Self; 5] = [
        Self::ToolError,
        Self::Rejected,
        Self::Timeout,
        Self::Transport,
        Self::Unavailable,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::ToolError => "tool_error",
            Self::Rejected => "rejected",
            Self::Timeout => "timeout",
            Self::Transport => "transport",
            Self::Unavailable => "unavailable",
        }
    }
}

/// LLM traffic of this worker.
#[derive(Debug, Clone)]
pub struct LlmMetrics {
    requests: Counter,
    errors: [Counter; LlmFailure::ALL.len()],
    retries: [Counter; LlmFailure::ALL.len()],
    prompt_tokens: Counter,
    completion_tokens: Counter,
    ttft: AtomicHistogram,
    duration: AtomicHistogram,
    limiter_wait: AtomicHistogram,
    limiter_waiting: Gauge,
    limiter_fail_open: Counter,
}

impl LlmMetrics {
    /// A request is about to be sent.
    pub fn request(&self) {
        self.requests.inc();
    }

    pub fn error(&self, reason: LlmFailure) {
        self.errors[reason as usize].inc();
    }

    pub fn retry(&self, reason: LlmFailure) {
        self.retries[reason as usize].inc();
    }

    pub fn tokens(&self, prompt: u64, completion: u64) {
        self.prompt_tokens.inc_by(prompt);
        self.completion_tokens.inc_by(completion);
    }

    /// Time from sending a request to its first token (text or tool call).
    pub fn first_token(&self, elapsed: Duration) {
        self.ttft.observe(elapsed);
    }

    /// Time from sending a request to the end of its stream (successful requests).
    pub fn completed(&self, elapsed: Duration) {
        self.duration.observe(elapsed);
    }

    /// Marks a request waiting for a rate-limit permit until the guard drops.
    pub fn waiting_for_permit(&self) -> WaitingGuard {
        self.limiter_waiting.inc();
        WaitingGuard(self.limiter_waiting.clone())
    }

    pub fn permit(&self, waited: Duration, failed_open: bool) {
        self.limiter_wait.observe(waited);
        if failed_open {
            self.limiter_fail_open.inc();
        }
    }
}

/// A request's place in the "waiting for a permit" gauge.
#[derive(Debug)]
pub struct WaitingGuard(Gauge);

impl Drop for WaitingGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Run attempts of this worker.
#[derive(Debug, Clone)]
pub struct TurnMetrics {
    duration: [AtomicHistogram; TurnOutcome::ALL.len()],
}

impl TurnMetrics {
    /// An attempt ended after `elapsed` (from its claim to its commit).
    pub fn finished(&self, outcome: TurnOutcome, elapsed: Duration) {
        self.duration[outcome as usize].observe(elapsed);
    }
}

/// Families of the MCP metrics; [`McpMetrics::server`] resolves one server's children.
#[derive(Debug, Clone)]
pub struct McpMetrics {
    calls: Family<ServerLabels, AtomicHistogram, fn() -> AtomicHistogram>,
    errors: Family<ServerReasonLabels, Counter>,
    restarts: Family<ServerLabels, Counter>,
    up: Family<ServerLabels, Gauge>,
}

impl McpMetrics {
    pub fn server(&self, name: &str) -> McpServerMetrics {
        let server = [("server", name.to_owned())];
        let calls = self.calls.get_or_create(&server).clone();
        let restarts = self.restarts.get_or_create(&server).clone();
        let up = self.up.get_or_create(&server).clone();
        let errors = McpFailure::ALL.map(|reason| {
            self.errors
                .get_or_create(&[
                    ("server", name.to_owned()),
                    ("reason", reason.label().to_owned()),
                ])
                .clone()
        });
        McpServerMetrics {
            calls,
            errors,
            restarts,
            up,
        }
    }
}

/// One MCP server's metrics.
#[derive(Debug, Clone)]
pub struct McpServerMetrics {
    calls: AtomicHistogram,
    errors: [Counter; McpFailure::ALL.len()],
    restarts: Counter,
    up: Gauge,
}

impl McpServerMetrics {
    /// A call that reached the server took `elapsed`.
    pub fn call(&self, elapsed: Duration) {
        self.calls.observe(elapsed);
    }

    pub fn error(&self, reason: McpFailure) {
        self.errors[reason as usize].inc();
    }

    /// The server is connected (`true`) or down.
    pub fn up(&self, up: bool) {
        self.up.set(i64::from(up));
    }

    /// The server died and is being started again.
    pub fn restarted(&self) {
        self.restarts.inc();
    }
}

/// All of the worker's metrics. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerMetrics {
    registry: Arc<Registry>,
    pub llm: LlmMetrics,
    pub turns: TurnMetrics,
    pub mcp: McpMetrics,
}

impl WorkerMetrics {
    /// Registers every series; `consumer` and `slots` feed the queue series at scrape time.
    pub fn new(consumer: Arc<ConsumerMetrics>, slots: Vec<(QueueName, usize)>) -> Self {
        let mut registry = Registry::with_prefix("conveyor");

        let requests = Counter::default();
        registry.register(
            "llm_requests",
            "LLM requests sent (each retry counts)",
            requests.clone(),
        );
        let errors = Family::<Labels, Counter>::default();
        registry.register(
            "llm_errors",
            "Failed LLM requests by reason",
            errors.clone(),
        );
        let retries = Family::<Labels, Counter>::default();
        registry.register(
            "llm_retries",
            "LLM requests retried after a failure, by the failure's reason",
            retries.clone(),
        );
        let tokens = Family::<Labels, Counter>::default();
        registry.register(
            "llm_tokens",
            "Tokens the provider reported, by kind (prompt, completion)",
            tokens.clone(),
        );
        let ttft = AtomicHistogram::latency();
        registry.register(
            "llm_time_to_first_token_seconds",
            "Time from sending an LLM request to its first token",
            ttft.clone(),
        );
        let duration = AtomicHistogram::latency();
        registry.register(
            "llm_request_duration_seconds",
            "Time from sending an LLM request to the end of its stream (successful requests)",
            duration.clone(),
        );
        let limiter_wait = AtomicHistogram::latency();
        registry.register(
            "llm_rate_limit_wait_seconds",
            "Time an LLM request waited for a permit of the shared rate limiter",
            limiter_wait.clone(),
        );
        let limiter_waiting = Gauge::default();
        registry.register(
            "llm_rate_limit_waiting",
            "LLM requests waiting for a permit of the shared rate limiter right now",
            limiter_waiting.clone(),
        );
        let limiter_fail_open = Counter::default();
        registry.register(
            "llm_rate_limit_fail_open",
            "LLM requests sent without a permit because Redis did not answer",
            limiter_fail_open.clone(),
        );
        // Children are cloned out in closures or statements of their own: a `get_or_create`
        // guard that lives on (a temporary in a struct literal lives to the end of the `let`)
        // deadlocks the next `get_or_create` of the same family.
        let child = |family: &Family<Labels, Counter>, label: (&'static str, &'static str)| {
            family.get_or_create(&[label]).clone()
        };
        let llm = LlmMetrics {
            requests,
            errors: LlmFailure::ALL.map(|f| child(&errors, ("reason", f.label()))),
            retries: LlmFailure::ALL.map(|f| child(&retries, ("reason", f.label()))),
            prompt_tokens: child(&tokens, ("kind", "prompt")),
            completion_tokens: child(&tokens, ("kind", "completion")),
            ttft,
            duration,
            limiter_wait,
            limiter_waiting,
            limiter_fail_open,
        };

        let turn_duration: Family<Labels, AtomicHistogram, fn() -> AtomicHistogram> =
            Family::new_with_constructor(AtomicHistogram::latency);
        registry.register(
            "turn_duration_seconds",
            "Run attempts by outcome, timed from the claim to the commit",
            turn_duration.clone(),
        );
        let turns = TurnMetrics {
            duration: TurnOutcome::ALL.map(|outcome| {
                turn_duration
                    .get_or_create(&[("outcome", outcome.label())])
                    .clone()
            }),
        };

        let mcp = McpMetrics {
            calls: Family::new_with_constructor(AtomicHistogram::latency),
            errors: Family::default(),
            restarts: Family::default(),
            up: Family::default(),
        };
        registry.register(
            "mcp_call_duration_seconds",
            "MCP tool calls that reached their server, by server",
            mcp.calls.clone(),
        );
        registry.register(
            "mcp_call_errors",
            "Failed MCP tool calls by server and reason",
            mcp.errors.clone(),
        );
        registry.register(
            "mcp_server_restarts",
            "MCP servers respawned after they died",
            mcp.restarts.clone(),
        );
        registry.register(
            "mcp_server_up",
            "1 while the MCP server is connected",
            mcp.up.clone(),
        );

        registry.register_collector(Box::new(QueueCollector { consumer, slots }));
        Self {
            registry: Arc::new(registry),
            llm,
            turns,
            mcp,
        }
    }

    /// The OpenMetrics text of a scrape.
    pub fn render(&self) -> String {
        encode(&self.registry)
    }
}

/// Reads the consumer's counters at scrape time.
#[derive(Debug)]
struct QueueCollector {
    consumer: Arc<ConsumerMetrics>,
    slots: Vec<(QueueName, usize)>,
}

impl Collector for QueueCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.consumer.snapshot();
        let busy = |queue: QueueName| match queue {
            QueueName::Chat => snapshot.busy_chat,
            QueueName::Batch => snapshot.busy_batch,
        };
        let slots = ConstGauge::new(0i64);
        let mut family = encoder.encode_descriptor(
            "worker_slots",
            "Runs this worker executes at once, by queue",
            None,
            slots.metric_type(),
        )?;
        for (queue, slots) in &self.slots {
            let gauge = ConstGauge::new(i64::try_from(*slots).unwrap_or(i64::MAX));
            gauge.encode(family.encode_family(&[("queue", queue.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "worker_busy_slots",
            "Runs this worker is executing right now, by queue",
            None,
            slots.metric_type(),
        )?;
        for (queue, _) in &self.slots {
            let gauge = ConstGauge::new(i64::try_from(busy(*queue)).unwrap_or(i64::MAX));
            gauge.encode(family.encode_family(&[("queue", queue.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "worker_jobs",
            "Jobs this worker handled, by outcome (started, succeeded, retried, dead)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (outcome, value) in [
            ("started", snapshot.jobs_started),
            ("succeeded", snapshot.jobs_succeeded),
            ("retried", snapshot.jobs_retried),
            ("dead", snapshot.jobs_dead),
        ] {
            ConstCounter::new(value).encode(family.encode_family(&[("outcome", outcome)])?)?;
        }
        for (name, help, value) in [
            (
                "worker_redis_commands",
                "Redis commands sent by this worker's queue consumers",
                snapshot.redis_commands,
            ),
            (
                "worker_fetches",
                "Queue fetches by this worker (empty or not)",
                snapshot.fetches,
            ),
            (
                "worker_wakeups",
                "Wake-ups this worker received for new jobs",
                snapshot.wakeups,
            ),
            (
                "worker_consumer_restarts",
                "Queue consumers restarted after an error",
                snapshot.worker_restarts,
            ),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// Serves `/metrics` and `/healthz` on `addr` until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    metrics: WorkerMetrics,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let app = Router::new()
        .route(
            "/metrics",
            get(move || {
                let metrics = metrics.clone();
                async move { ([(header::CONTENT_TYPE, CONTENT_TYPE)], metrics.render()) }
            }),
        )
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .fallback(|| async { (axum::http::StatusCode::NOT_FOUND, "not found").into_response() });
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

/// Binds the metrics address (a start-up error names the variable).
pub async fn bind(addr: SocketAddr) -> Result<TcpListener, crate::WorkerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| crate::WorkerError::MetricsBind { addr, source })
}
