//! The job queue: how a run gets from the API (or the sweeper) to a worker.
//!
//! A job is only a run id ([`RunJob`]); the run's state lives in Postgres, so a job can be
//! delivered more than once (at-least-once) and handlers must be idempotent. Jobs live in Redis
//! under apalis-redis's key layout, namespaced by a configurable prefix (`{prefix}:chat`,
//! `{prefix}:batch`) so tests and deployments can share one Redis.
//!
//! Why this module is more than a thin wrapper around `RedisStorage`: apalis-redis 1.0 as shipped
//! picks an idle job up only on its next heartbeat (tens of seconds), and its pub/sub wake-up
//! factory never fires for normal pushes. Here the producer publishes a wake-up after every
//! push and each worker process listens on one pub/sub connection of its own (`wakeup`), so an
//! idle worker fetches within about a millisecond while polling Redis about once a second. The
//! consumer side ([`consumer`]) also supervises the apalis workers (a Redis error during a fetch
//! stops an apalis worker for good), enforces a small retry budget, keeps chat ahead of batch and
//! hands unfinished jobs back on shutdown.
//!
//! - [`producer`]: [`JobProducer`], used by the API handlers and the sweeper.
//! - [`consumer`]: [`run_consumers`] and its [`ConsumerConfig`], used by the worker.
//! - [`metrics`]: counters a worker can export ([`ConsumerMetrics`]).
//! - [`stats`]: the backlog of each queue ([`JobProducer::stats`]), for the API's metrics.
//! - [`local`]: the embedded mode's in-process queues ([`LocalQueue`], consumed by
//!   [`run_local_consumers`]), behind the same [`JobProducer`] and job handler.

pub mod consumer;
mod handler;
pub mod local;
pub mod metrics;
pub mod producer;
pub mod stats;
mod wakeup;

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

pub use consumer::{ConsumerConfig, run_consumers, unique_worker_name};
pub use local::{LocalConsumerConfig, LocalQueue, run_local_consumers};
pub use metrics::{ConsumerMetrics, ConsumerMetricsSnapshot};
pub use producer::{JobProducer, RedisProducer};
pub use stats::QueueStats;

/// The job: a run to execute. The payload is only the id; the run's state lives in Postgres.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct RunJob {
    pub run_id: String,
}

impl RunJob {
    pub fn new(run_id: impl Into<String>) -> Self {
        Self {
            run_id: run_id.into(),
        }
    }
}

/// The queues Conveyor uses. `Chat` holds interactive turns (someone is waiting on the answer);
/// `Batch` holds runs from the batch API, which may wait.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum QueueName {
    Chat,
    Batch,
}

impl QueueName {
    /// Every queue, chat first (the order in which a worker serving both starts them).
    pub const ALL: [Self; 2] = [Self::Chat, Self::Batch];

    /// The queue's name inside the key prefix (`chat`, `batch`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Batch => "batch",
        }
    }

    /// The apalis queue name: `{prefix}:{name}`; every Redis key of the queue starts with it.
    pub(crate) fn namespaced(self, prefix: &str) -> String {
        format!("{prefix}:{}", self.as_str())
    }

    /// apalis-redis's settings for this queue, with the defaults the producer needs (the consumer
    /// overrides heartbeats and batch size).
    pub(crate) fn apalis_config(self, prefix: &str) -> apalis_redis::Config {
        apalis_redis::Config::default().queue(self.namespaced(prefix))
    }

    /// The pub/sub channel that wakes this queue's consumers. It is the channel apalis-redis's own
    /// Lua scripts use for "a job became available" (`"tasks:" .. active_list .. ":available"` in
    /// `batch_push.lua` and `release_leases.lua`), so jobs it releases wake our workers too.
    pub(crate) fn wake_channel(config: &apalis_redis::Config) -> String {
        format!("tasks:{}:available", config.active_jobs_list())
    }
}

impl fmt::Display for QueueName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for QueueName {
    type Err = QueueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "chat" => Ok(Self::Chat),
            "batch" => Ok(Self::Batch),
            other => Err(QueueError::InvalidConfig(format!(
                "unknown queue {other:?} (expected chat or batch)"
            ))),
        }
    }
}

/// What a job handler reports when it did not finish the job.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    /// Transient: the job is rescheduled with backoff (attempt N waits about N seconds) until
    /// [`ConsumerConfig::max_attempts`] is used up, then it is dead-lettered.
    #[error("transient failure: {0}")]
    Retry(String),
    /// Permanent: the job is dead-lettered at once and never retried.
    #[error("permanent failure: {0}")]
    Abort(String),
}

/// Errors of the queue module.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("job backend: {0}")]
    Backend(#[from] apalis_redis::Error),
    #[error("encoding a job: {0}")]
    Encode(#[from] serde_json::Error),
    #[error("invalid queue configuration: {0}")]
    InvalidConfig(String),
    #[error("a queue consumer task failed: {0}")]
    ConsumerPanicked(String),
}
