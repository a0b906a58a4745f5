//! The API's Prometheus metrics: what this process holds (open SSE streams, runs with live
//! subscribers) and the cluster-wide backlog, read at scrape time — queue depth and oldest-job
//! age from Redis, unfinished runs by status from Postgres.
//!
//! The cluster-wide series are served by the API rather than by every worker: the API is
//! always deployed, usually as few replicas, so a scrape costs one small Redis pipeline and one
//! index-only Postgres query per replica (cached for [`SCRAPE_CACHE`], so several scrapers do
//! not multiply it). Aggregate them with `max` across API replicas, not `sum`.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use conveyor_shared::{
    events::EventHub,
    metrics::encode,
    queue::{JobProducer, QueueStats},
    store::runs::{self, ActiveCounts},
};
use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::time::Instant;

/// How long a scrape's backlog reading is reused.
const SCRAPE_CACHE: Duration = Duration::from_secs(1);
/// How long a backlog reading may take before the scrape answers without it.
const READ_TIMEOUT: Duration = Duration::from_secs(2);

type QueueLabels = [(&'static str, &'static str); 1];

/// The API's metrics. Cheap to clone.
#[derive(Clone, Debug)]
pub struct ApiMetrics {
    registry: Arc<Registry>,
    /// Open SSE responses of this process.
    pub sse_streams: Gauge,
    subscribed_runs: Gauge,
    queue_waiting: Family<QueueLabels, Gauge>,
    queue_scheduled: Family<QueueLabels, Gauge>,
    queue_dead: Family<QueueLabels, Gauge>,
    queue_oldest_age: Family<QueueLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    runs: Family<QueueLabels, Gauge>,
    oldest_queued_run_age: Gauge<f64, std::sync::atomic::AtomicU64>,
    backlog_read_at: Arc<Mutex<Option<Instant>>>,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ApiMetrics {
    pub fn new() -> Self {
        let metrics = Self {
            registry: Arc::default(),
            sse_streams: Gauge::default(),
            subscribed_runs: Gauge::default(),
            queue_waiting: Family::default(),
            queue_scheduled: Family::default(),
            queue_dead: Family::default(),
            queue_oldest_age: Family::default(),
            runs: Family::default(),
            oldest_queued_run_age: Gauge::default(),
            backlog_read_at: Arc::default(),
        };
        let mut registry = Registry::with_prefix("conveyor");
        registry.register(
            "sse_streams_active",
            "SSE event streams open on this API process",
            metrics.sse_streams.clone(),
        );
        registry.register(
            "sse_subscribed_runs",
            "Runs with at least one live SSE client on this API process",
            metrics.subscribed_runs.clone(),
        );
        registry.register(
            "queue_depth",
            "Jobs waiting in the queue that a worker could take now",
            metrics.queue_waiting.clone(),
        );
        registry.register(
            "queue_scheduled",
            "Job retries waiting for their time",
            metrics.queue_scheduled.clone(),
        );
        registry.register(
            "queue_dead",
            "Jobs the queue gave up on",
            metrics.queue_dead.clone(),
        );
        registry.register(
            "queue_oldest_job_age_seconds",
            "Age of the oldest waiting job (0 when none waits)",
            metrics.queue_oldest_age.clone(),
        );
        registry.register(
            "runs",
            "Unfinished runs by status (queued, running), from Postgres",
            metrics.runs.clone(),
        );
        registry.register(
            "runs_oldest_queued_age_seconds",
            "Age of the oldest queued run (0 when none is queued), from Postgres",
            metrics.oldest_queued_run_age.clone(),
        );
        Self {
            registry: Arc::new(registry),
            ..metrics
        }
    }

    /// Refreshes the scrape-time series (at most once per [`SCRAPE_CACHE`]) and renders all.
    pub async fn render(
        &self,
        db: &conveyor_shared::db::Db,
        producer: &JobProducer,
        hub: &EventHub,
    ) -> String {
        self.subscribed_runs
            .set(i64::try_from(hub.active_runs()).unwrap_or(i64::MAX));
        let due = {
            let mut read_at = self
                .backlog_read_at
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let due = read_at.is_none_or(|at| at.elapsed() >= SCRAPE_CACHE);
            if due {
                *read_at = Some(Instant::now());
            }
            due
        };
        if due {
            let (queues, runs) = tokio::join!(
                tokio::time::timeout(READ_TIMEOUT, producer.stats()),
                tokio::time::timeout(READ_TIMEOUT, runs::active_counts(db)),
            );
            match queues {
                Ok(Ok(queues)) => self.set_queues(&queues),
                Ok(Err(error)) => tracing::warn!(%error, "metrics: cannot read the queues"),
                Err(_) => tracing::warn!("metrics: reading the queues timed out"),
            }
            match runs {
                Ok(Ok(runs)) => self.set_runs(runs),
                Ok(Err(error)) => tracing::warn!(%error, "metrics: cannot count runs"),
                Err(_) => tracing::warn!("metrics: counting runs timed out"),
            }
        }
        encode(&self.registry)
    }

    fn set_queues(&self, queues: &[QueueStats]) {
        for stats in queues {
            let labels = [("queue", stats.queue.as_str())];
            let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
            self.queue_waiting
                .get_or_create(&labels)
                .set(count(stats.waiting));
            self.queue_scheduled
                .get_or_create(&labels)
                .set(count(stats.scheduled));
            self.queue_dead
                .get_or_create(&labels)
                .set(count(stats.dead));
            self.queue_oldest_age
                .get_or_create(&labels)
                .set(stats.oldest_age_secs);
        }
    }

    fn set_runs(&self, counts: ActiveCounts) {
        self.runs
            .get_or_create(&[("status", "queued")])
            .set(counts.queued);
        self.runs
            .get_or_create(&[("status", "running")])
            .set(counts.running);
        self.oldest_queued_run_age.set(counts.oldest_queued_secs);
    }
}
