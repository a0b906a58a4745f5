//! The producer side of the queue: push a run and wake the workers.
//!
//! API handlers push after their database transaction commits, and the sweeper re-pushes runs
//! whose push was lost; both share one [`JobProducer`]. It is one of two backends, chosen at
//! start-up:
//!
//! - [`RedisProducer`]: apalis-redis queues in Redis (one multiplexed, auto-reconnecting
//!   connection underneath), consumed by any number of worker processes ([`run_consumers`]).
//! - [`LocalQueue`]: the embedded mode's in-process queues, consumed by the same process
//!   ([`run_local_consumers`]).
//!
//! Why a `PUBLISH` after each Redis push: apalis-redis's push always goes through its scheduled
//! set (`run_at` is clamped to "now", in whole seconds), and its Lua script publishes the
//! "available" event only for unscheduled jobs, so as shipped nothing ever tells an idle worker
//! that a job arrived. We publish on the same channel ourselves; an idle worker's wake-up
//! strategy then fetches at once (the fetch script promotes jobs whose second has come).
//!
//! [`run_consumers`]: super::run_consumers
//! [`run_local_consumers`]: super::run_local_consumers

use apalis::prelude::TaskBuilder;
use apalis_redis::queries::push_tasks;
use redis::aio::ConnectionManager;

use super::{QueueError, QueueName, QueueStats, RunJob, local::LocalQueue};
use crate::events::redis_bus::{StaleConnection, retry_if_stale};

/// Producer, cheap to clone, shared by API handlers and the sweeper.
#[derive(Clone, Debug)]
#[expect(
    clippy::large_enum_variant,
    reason = "as large as the Redis producer it wraps, which was cloned the same way; a box would cost an allocation per clone"
)]
pub enum JobProducer {
    Redis(RedisProducer),
    Local(LocalQueue),
}

impl JobProducer {
    /// Connects to Redis; fails if Redis is unreachable now. Afterwards the connection reconnects
    /// by itself after a Redis restart; a push made while Redis is down fails, and the run stays
    /// `queued` for the sweeper.
    pub async fn connect(redis_url: &str, prefix: &str) -> Result<Self, QueueError> {
        RedisProducer::connect(redis_url, prefix)
            .await
            .map(Self::Redis)
    }

    /// A producer onto the embedded mode's in-process queues; `queue` is also what
    /// [`run_local_consumers`](super::run_local_consumers) takes jobs from.
    pub fn local(queue: LocalQueue) -> Self {
        Self::Local(queue)
    }

    /// Jobs per Redis call in [`Self::push_many`]: big enough that a 50,000-line batch takes
    /// 50 round trips, small enough that one Lua call does not block Redis for long.
    pub const PUSH_CHUNK: usize = RedisProducer::PUSH_CHUNK;

    /// Enqueues `job` on `queue` and wakes an idle worker.
    ///
    /// Redis: the push is durable once this returns `Ok`. In-process: the job is in memory
    /// only; the run's `queued` row is what survives a restart.
    pub async fn push(&self, queue: QueueName, job: RunJob) -> Result<(), QueueError> {
        match self {
            Self::Redis(producer) => producer.push(queue, job).await,
            Self::Local(local) => {
                local.push(queue, job);
                Ok(())
            }
        }
    }

    /// Enqueues many jobs on `queue`. Returns how many were pushed before a failure, with the
    /// error: the caller's runs are in the database, so the rest is the sweeper's.
    pub async fn push_many(
        &self,
        queue: QueueName,
        jobs: &[RunJob],
    ) -> Result<(), (usize, QueueError)> {
        match self {
            Self::Redis(producer) => producer.push_many(queue, jobs).await,
            Self::Local(local) => {
                local.push_many(queue, jobs.iter().cloned());
                Ok(())
            }
        }
    }

    /// The backlog of every queue, for the metrics.
    pub async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
        match self {
            Self::Redis(producer) => producer.stats().await,
            Self::Local(local) => Ok(local.stats()),
        }
    }

    /// Jobs waiting in `queue` (ready or scheduled for a retry), not counting those a worker
    /// holds.
    pub async fn pending(&self, queue: QueueName) -> Result<u64, QueueError> {
        match self {
            Self::Redis(producer) => producer.pending(queue).await,
            Self::Local(local) => Ok(local.pending(queue)),
        }
    }
}

/// The Redis producer (see the module docs).
#[derive(Clone)]
pub struct RedisProducer {
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

impl std::fmt::Debug for RedisProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisProducer")
            .field("chat", &self.chat.config.queue.as_ref())
            .field("batch", &self.batch.config.queue.as_ref())
            .finish_non_exhaustive()
    }
}

impl RedisProducer {
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
        let queue = self.queue(queue);
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

impl RedisProducer {
    /// The backlog of every queue, for the metrics.
    pub async fn stats(&self) -> Result<Vec<QueueStats>, QueueError> {
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

    /// Jobs per Redis call in [`Self::push_many`]: big enough that a 50,000-line batch takes
    /// 50 round trips, small enough that one Lua call does not block Redis for long.
    pub const PUSH_CHUNK: usize = 1_000;

    /// Enqueues many jobs on `queue`, [`Self::PUSH_CHUNK`] per Redis call, each chunk followed
    /// by one wake-up. Returns how many were pushed before a failure, with the error: the
    /// caller's runs are in Postgres, so the rest is the sweeper's.
    pub async fn push_many(
        &self,
        queue: QueueName,
        jobs: &[RunJob],
    ) -> Result<(), (usize, QueueError)> {
        let name = queue;
        let queue = self.queue(queue);
        let mut pushed = 0;
        for chunk in jobs.chunks(Self::PUSH_CHUNK) {
            let payloads = chunk
                .iter()
                .map(serde_json::to_vec)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| (pushed, e.into()))?;
            let conn = self.conn.clone();
            retry_if_stale(|| {
                let tasks: Vec<_> = payloads
                    .iter()
                    .map(|p| TaskBuilder::new(p.clone()).build())
                    .collect();
                let mut conn = conn.clone();
                async move { push_tasks(&mut conn, &queue.config, &tasks).await }
            })
            .await
            .map_err(|e| (pushed, e.into()))?;
            pushed += chunk.len();
            let woken: Result<u64, _> = redis::cmd("PUBLISH")
                .arg(&queue.wake_channel)
                .arg(name.as_str())
                .query_async(&mut self.conn.clone())
                .await;
            if let Err(error) = woken {
                tracing::warn!(queue = %name, %error, "jobs pushed but the wake-up publish failed");
            }
        }
        Ok(())
    }

    /// Jobs waiting in `queue` (ready or scheduled for a retry), not counting those a worker
    /// holds.
    pub async fn pending(&self, queue: QueueName) -> Result<u64, QueueError> {
        let config = &self.queue(queue).config;
        let (ready, scheduled): (u64, u64) = redis::pipe()
            .llen(config.active_jobs_list())
            .zcard(config.scheduled_jobs_set())
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(ready + scheduled)
    }

    fn queue(&self, queue: QueueName) -> &Queue {
        match queue {
            QueueName::Chat => &self.chat,
            QueueName::Batch => &self.batch,
        }
    }
}

impl StaleConnection for apalis_redis::Error {
    fn is_stale_connection(&self) -> bool {
        matches!(self, Self::Database(error) if error.is_stale_connection())
    }
}
