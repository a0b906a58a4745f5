//! The producer side of the queue: push a run and wake the workers.
//!
//! API handlers push after their Postgres transaction commits, and the sweeper re-pushes runs
//! whose push was lost; both share one [`JobProducer`] (it clones cheaply: one multiplexed,
//! auto-reconnecting Redis connection underneath).
//!
//! Why a `PUBLISH` after each push: apalis-redis's push always goes through its scheduled set
//! (`run_at` is clamped to "now", in whole seconds), and its Lua script publishes the
//! "available" event only for unscheduled jobs, so as shipped nothing ever tells an idle worker
//! that a job arrived. We publish on the same channel ourselves; an idle worker's wake-up
//! strategy then fetches at once (the fetch script promotes jobs whose second has come).

use apalis::prelude::TaskBuilder;
use apalis_redis::queries::push_tasks;
use redis::aio::ConnectionManager;

use super::{QueueError, QueueName, RunJob};
use crate::events::bus::{StaleConnection, retry_if_stale};

/// Producer, cheap to clone, shared by API handlers and the sweeper.
#[derive(Clone)]
pub struct JobProducer {
    conn: ConnectionManager,
    chat: Queue,
    batch: Queue,
}

/// What the producer needs to know about one queue.
#[derive(Clone)]
struct Queue {
    config: apalis_redis::Config,
    wake_channel: String,
}

impl Queue {
    fn new(name: QueueName, prefix: &str) -> Self {
        let config = name.apalis_config(prefix);
        let wake_channel = QueueName::wake_channel(&config);
        Self {
            config,
            wake_channel,
        }
    }
}

impl std::fmt::Debug for JobProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobProducer")
            .field("chat", &self.chat.config.queue.as_ref())
            .field("batch", &self.batch.config.queue.as_ref())
            .finish_non_exhaustive()
    }
}

impl JobProducer {
    /// Connects to Redis; fails if Redis is unreachable now. Afterwards the connection reconnects
    /// by itself after a Redis restart; a push made while Redis is down fails, and the run stays
    /// `queued` for the sweeper.
    pub async fn connect(redis_url: &str, prefix: &str) -> Result<Self, QueueError> {
        let client = crate::backends::redis_client(redis_url)?;
        let conn = ConnectionManager::new(client).await?;
        Ok(Self {
            conn,
            chat: Queue::new(QueueName::Chat, prefix),
            batch: Queue::new(QueueName::Batch, prefix),
        })
    }

    /// Enqueues `job` on `queue` and publishes a wake-up for idle workers.
    ///
    /// The push is durable once this returns `Ok`; a failed wake-up is only logged, because the
    /// workers' fallback poll picks the job up anyway (within about a second).
    pub async fn push(&self, queue: QueueName, job: RunJob) -> Result<(), QueueError> {
        let queue = match queue {
            QueueName::Chat => &self.chat,
            QueueName::Batch => &self.batch,
        };
        let payload = serde_json::to_vec(&job)?;
        let mut conn = self.conn.clone();
        // A connection that sat idle through a Redis restart fails its first command; without
        // the retry the first turn after a restart would wait for the sweeper (30 s). Repeating
        // a push that did land only delivers the job twice, which handlers tolerate.
        retry_if_stale(|| {
            let task = TaskBuilder::new(payload.clone()).build();
            let mut conn = conn.clone();
            async move { push_tasks(&mut conn, &queue.config, &[task]).await }
        })
        .await?;

        let woken: Result<u64, _> = redis::cmd("PUBLISH")
            .arg(&queue.wake_channel)
            .arg(&job.run_id)
            .query_async(&mut conn)
            .await;
        if let Err(error) = woken {
            tracing::warn!(run_id = %job.run_id, %error, "job pushed but the wake-up publish failed");
        }
        Ok(())
    }
}

impl JobProducer {
    /// The backlog of every queue, for the metrics.
    pub async fn stats(&self) -> Result<Vec<super::QueueStats>, QueueError> {
        let mut conn = self.conn.clone();
        let mut all = Vec::with_capacity(2);
        for (name, queue) in [
            (QueueName::Chat, &self.chat),
            (QueueName::Batch, &self.batch),
        ] {
            all.push(super::stats::read(&mut conn, &queue.config, name).await?);
        }
        Ok(all)
    }
}

impl StaleConnection for apalis_redis::Error {
    fn is_stale_connection(&self) -> bool {
        matches!(self, Self::Database(error) if error.is_stale_connection())
    }
}
