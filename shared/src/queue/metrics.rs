//! Counters of one consumer process, for `/metrics` and for the pickup benchmark.
//!
//! The number worth watching is idle Redis traffic: plain interval polling costs hundreds of
//! commands per second per worker, the wake-up design about two. The counters are plain atomics
//! so the worker's metrics endpoint can render them without a metrics framework in `shared`.
//!
//! Redis commands are counted by wrapping the consumers' connection (`MeteredConnection`);
//! fetches are recognised by their shape, since apalis-redis runs them inside its own backend.

use std::sync::atomic::{AtomicU64, Ordering};

use redis::{
    Arg, Cmd, Pipeline, RedisFuture, Value,
    aio::{ConnectionLike, ConnectionManager},
};
use std::sync::Arc;

use super::QueueName;

/// `fetch_next.lua` is the only apalis-redis 1.0 script called with seven keys (push: 6,
/// results: 5, leases/orphans: 3–5, heartbeat: 1, register: 2).
const FETCH_SCRIPT_KEYS: &[u8] = b"7";

/// Counters of one [`run_consumers`](super::run_consumers) call. Create one, keep an `Arc`
/// clone, and pass it in [`ConsumerConfig::metrics`](super::ConsumerConfig::metrics).
#[derive(Debug, Default)]
pub struct ConsumerMetrics {
    redis_commands: AtomicU64,
    fetches: AtomicU64,
    wakeups: AtomicU64,
    jobs_started: AtomicU64,
    jobs_succeeded: AtomicU64,
    jobs_retried: AtomicU64,
    jobs_dead: AtomicU64,
    worker_restarts: AtomicU64,
    busy_chat: AtomicU64,
    busy_batch: AtomicU64,
}

/// A copy of the counters at one instant.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConsumerMetricsSnapshot {
    /// Commands the consumers sent on their shared connection (fetches, heartbeats, acks…).
    pub redis_commands: u64,
    /// Fetch scripts run (empty or not).
    pub fetches: u64,
    /// Wake-up messages received on the pub/sub connection.
    pub wakeups: u64,
    /// Handler invocations.
    pub jobs_started: u64,
    pub jobs_succeeded: u64,
    /// Handler failures that were rescheduled.
    pub jobs_retried: u64,
    /// Jobs dead-lettered: aborted, undecodable, or out of attempts.
    pub jobs_dead: u64,
    /// Times an apalis worker stopped on an error and was started again.
    pub worker_restarts: u64,
    /// Handlers running right now on the chat queue.
    pub busy_chat: u64,
    /// Handlers running right now on the batch queue.
    pub busy_batch: u64,
}

impl ConsumerMetrics {
    pub fn snapshot(&self) -> ConsumerMetricsSnapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        ConsumerMetricsSnapshot {
            redis_commands: get(&self.redis_commands),
            fetches: get(&self.fetches),
            wakeups: get(&self.wakeups),
            jobs_started: get(&self.jobs_started),
            jobs_succeeded: get(&self.jobs_succeeded),
            jobs_retried: get(&self.jobs_retried),
            jobs_dead: get(&self.jobs_dead),
            worker_restarts: get(&self.worker_restarts),
            busy_chat: get(&self.busy_chat),
            busy_batch: get(&self.busy_batch),
        }
    }

    pub(crate) fn wakeup(&self) {
        self.wakeups.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn job_started(&self) {
        self.jobs_started.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn job_succeeded(&self) {
        self.jobs_succeeded.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn job_retried(&self) {
        self.jobs_retried.fetch_add(1, Ordering::Relaxed);
    }
    pub(crate) fn job_dead(&self) {
        self.jobs_dead.fetch_add(1, Ordering::Relaxed);
    }
    /// Marks a handler of `queue` running until the returned guard drops.
    pub(crate) fn busy(self: &Arc<Self>, queue: QueueName) -> BusySlot {
        self.busy_counter(queue).fetch_add(1, Ordering::Relaxed);
        BusySlot {
            metrics: Arc::clone(self),
            queue,
        }
    }

    fn busy_counter(&self, queue: QueueName) -> &AtomicU64 {
        match queue {
            QueueName::Chat => &self.busy_chat,
            QueueName::Batch => &self.busy_batch,
        }
    }

    pub(crate) fn worker_restarted(&self) {
        self.worker_restarts.fetch_add(1, Ordering::Relaxed);
    }

    fn command(&self, cmd: &Cmd) {
        self.redis_commands.fetch_add(1, Ordering::Relaxed);
        let mut args = cmd.args_iter();
        let is_script = matches!(args.next(), Some(Arg::Simple(name)) if name.eq_ignore_ascii_case(b"EVALSHA") || name.eq_ignore_ascii_case(b"EVAL"));
        if is_script && matches!(args.nth(1), Some(Arg::Simple(keys)) if keys == FETCH_SCRIPT_KEYS)
        {
            self.fetches.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A running handler's place in the busy count.
pub(crate) struct BusySlot {
    metrics: Arc<ConsumerMetrics>,
    queue: QueueName,
}

impl Drop for BusySlot {
    fn drop(&mut self) {
        self.metrics
            .busy_counter(self.queue)
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// The consumers' Redis connection, counting what goes through it.
#[derive(Clone)]
pub(crate) struct MeteredConnection {
    inner: ConnectionManager,
    metrics: Arc<ConsumerMetrics>,
}

impl MeteredConnection {
    pub(crate) fn new(inner: ConnectionManager, metrics: Arc<ConsumerMetrics>) -> Self {
        Self { inner, metrics }
    }
}

impl ConnectionLike for MeteredConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        self.metrics.command(cmd);
        self.inner.req_packed_command(cmd)
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        for cmd in pipeline.cmd_iter() {
            self.metrics.command(cmd);
        }
        self.inner.req_packed_commands(pipeline, offset, count)
    }

    fn get_db(&self) -> i64 {
        self.inner.get_db()
    }
}
