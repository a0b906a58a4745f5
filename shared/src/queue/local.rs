//! The embedded mode's job queue: in-process queues (chat, batch) and their consumer, for the
//! single process that serves the API and runs the jobs (`conveyor dev`).
//!
//! **Nothing here persists.** The durable record of every queued run is its `runs` row in the
//! SQLite file, and at start-up the embedding program pushes the runs that are still `queued`
//! or were `running` again. A job lost with the process (waiting, running, or waiting for its
//! retry) is therefore run again after a restart, as a Redis job of a dead worker would be;
//! handlers are idempotent either way.
//!
//! **Pickup is immediate.** A push wakes the queue's consumer through a [`Notify`]; nothing
//! polls.
//!
//! **The Redis consumer's rules** (`handler.rs`, `consumer.rs`), kept so that the worker's
//! handler behaves the same in both modes: every job runs on its own task of one
//! [`TaskTracker`]; each queue has its own concurrency limit (chat ahead of batch: batch gets
//! [`LocalConsumerConfig::batch_concurrency`] when chat is served too); a
//! [`JobError::Retry`] is pushed again after about `attempt` × [`LocalConsumerConfig::retry_delay`]
//! until [`LocalConsumerConfig::max_attempts`] deliveries, then given up; a [`JobError::Abort`]
//! is given up at once; a panicking handler counts as a transient failure; the
//! [`ConsumerMetrics`] move the same way.
//!
//! **Shutdown.** Taking jobs stops at once; handlers already running get up to
//! [`LocalConsumerConfig::shutdown_grace`] to finish, then the rest are dropped (cancelled at
//! their next `.await`). Their runs stay `running` in the database, which the next start's
//! recovery takes over. Retries waiting for their time are dropped the same way.

use std::{
    collections::VecDeque,
    panic::AssertUnwindSafe,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::FutureExt;
use tokio::{
    sync::{Notify, OwnedSemaphorePermit, Semaphore},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::Instrument;

use super::{
    JobError, QueueError, QueueName, QueueStats, RunJob,
    consumer::{ConsumerConfig, queue_concurrency},
    metrics::ConsumerMetrics,
};

/// The in-process queues. Cheap to clone: every clone is the same queues. The producer side is
/// [`JobProducer::local`](super::JobProducer::local), the consumer [`run_local_consumers`].
#[derive(Clone, Default)]
pub struct LocalQueue {
    lanes: Arc<Lanes>,
}

#[derive(Default)]
struct Lanes {
    chat: Lane,
    batch: Lane,
}

/// One queue.
#[derive(Default)]
struct Lane {
    waiting: Mutex<VecDeque<Queued>>,
    /// Wakes a consumer waiting for a job.
    ready: Notify,
    /// Retries waiting for their time.
    scheduled: AtomicU64,
    /// Jobs given up on.
    dead: AtomicU64,
}

/// A job waiting in a queue.
struct Queued {
    job: RunJob,
    /// Deliveries so far (0 for a fresh push).
    deliveries: u32,
    /// Since when it waits.
    since: Instant,
}

impl std::fmt::Debug for LocalQueue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalQueue")
            .field("chat", &self.pending(QueueName::Chat))
            .field("batch", &self.pending(QueueName::Batch))
            .finish()
    }
}

impl LocalQueue {
    /// Empty queues.
    pub fn new() -> Self {
        Self::default()
    }

    /// Enqueues `job` on `queue` and wakes an idle consumer.
    pub fn push(&self, queue: QueueName, job: RunJob) {
        self.lane(queue).push(Queued {
            job,
            deliveries: 0,
            since: Instant::now(),
        });
    }

    /// Enqueues `jobs` on `queue`, in order.
    pub fn push_many(&self, queue: QueueName, jobs: impl IntoIterator<Item = RunJob>) {
        let lane = self.lane(queue);
        let since = Instant::now();
        lane.waiting().extend(jobs.into_iter().map(|job| Queued {
            job,
            deliveries: 0,
            since,
        }));
        // One wake-up: a consumer that takes a job passes it on while jobs remain.
        lane.ready.notify_one();
    }

    /// The backlog of every queue.
    pub fn stats(&self) -> Vec<QueueStats> {
        QueueName::ALL
            .into_iter()
            .map(|queue| {
                let lane = self.lane(queue);
                let (waiting, oldest) = {
                    let waiting = lane.waiting();
                    (waiting.len(), waiting.front().map(|q| q.since))
                };
                QueueStats {
                    queue,
                    waiting: u64::try_from(waiting).unwrap_or(u64::MAX),
                    scheduled: lane.scheduled.load(Ordering::Relaxed),
                    dead: lane.dead.load(Ordering::Relaxed),
                    oldest_age_secs: oldest.map_or(0.0, |since| since.elapsed().as_secs_f64()),
                }
            })
            .collect()
    }

    /// Jobs waiting in `queue` (ready or scheduled for a retry), not counting running ones.
    pub fn pending(&self, queue: QueueName) -> u64 {
        let lane = self.lane(queue);
        let waiting = u64::try_from(lane.waiting().len()).unwrap_or(u64::MAX);
        waiting + lane.scheduled.load(Ordering::Relaxed)
    }

    fn lane(&self, queue: QueueName) -> &Lane {
        match queue {
            QueueName::Chat => &self.lanes.chat,
            QueueName::Batch => &self.lanes.batch,
        }
    }
}

impl Lane {
    fn waiting(&self) -> MutexGuard<'_, VecDeque<Queued>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn push(&self, queued: Queued) {
        self.waiting().push_back(queued);
        self.ready.notify_one();
    }

    /// The next job, as soon as there is one.
    async fn take(&self) -> Queued {
        loop {
            // Registered before the check, so a push between the check and the wait still
            // wakes us.
            let notified = self.ready.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let (next, more) = {
                let mut waiting = self.waiting();
                (waiting.pop_front(), !waiting.is_empty())
            };
            if let Some(next) = next {
                if more {
                    // Pass the wake-up on: another consumer of this queue may be idle.
                    self.ready.notify_one();
                }
                return next;
            }
            notified.await;
        }
    }
}

/// How [`run_local_consumers`] runs jobs. [`Default`] has the Redis consumer's defaults;
/// `From<&ConsumerConfig>` takes a worker's settings over.
#[derive(Clone, Debug)]
pub struct LocalConsumerConfig {
    /// Queues to serve. Default: chat and batch.
    pub queues: Vec<QueueName>,
    /// Jobs run at once on the chat queue (or on the batch queue when it is served alone).
    /// Default 4.
    pub concurrency: usize,
    /// Jobs run at once on the batch queue when chat is served too. Default 1.
    pub batch_concurrency: usize,
    /// Deliveries of a job, first one included, before a [`JobError::Retry`] gives it up.
    /// Default 5.
    pub max_attempts: u32,
    /// Attempt N of a job waits N times this before it is delivered again. Default 1 s (the
    /// Redis queue's whole seconds).
    pub retry_delay: Duration,
    /// How long shutdown waits for running handlers before dropping them. Default 30 s.
    pub shutdown_grace: Duration,
    /// Counters of this consumer; keep a clone to read them.
    pub metrics: Arc<ConsumerMetrics>,
}

impl Default for LocalConsumerConfig {
    fn default() -> Self {
        Self {
            queues: QueueName::ALL.to_vec(),
            concurrency: 4,
            batch_concurrency: 1,
            max_attempts: 5,
            retry_delay: Duration::from_secs(1),
            shutdown_grace: Duration::from_secs(30),
            metrics: Arc::default(),
        }
    }
}

impl From<&ConsumerConfig> for LocalConsumerConfig {
    fn from(config: &ConsumerConfig) -> Self {
        Self {
            queues: config.queues.clone(),
            concurrency: config.concurrency,
            batch_concurrency: config.batch_concurrency,
            max_attempts: config.max_attempts,
            shutdown_grace: config.shutdown_grace,
            metrics: Arc::clone(&config.metrics),
            ..Self::default()
        }
    }
}

impl LocalConsumerConfig {
    /// Jobs run at once on `queue`.
    pub fn concurrency_of(&self, queue: QueueName) -> usize {
        queue_concurrency(
            &self.queues,
            self.concurrency,
            self.batch_concurrency,
            queue,
        )
    }

    fn validate(&self) -> Result<(), QueueError> {
        let fail = |message: &str| Err(QueueError::InvalidConfig(message.to_owned()));
        if self.queues.is_empty() {
            return fail("no queues to consume");
        }
        if self.concurrency == 0 || self.batch_concurrency == 0 {
            return fail("concurrency and batch_concurrency must be at least 1");
        }
        if self.max_attempts == 0 {
            return fail("max_attempts must be at least 1");
        }
        Ok(())
    }
}

/// Runs the jobs of `queue` for `config.queues` with `handler` until `shutdown` is cancelled;
/// then stops taking jobs, lets running handlers finish within `config.shutdown_grace`, drops
/// the rest and returns (see the module docs). The only error is an invalid configuration.
pub async fn run_local_consumers<H, Fut>(
    queue: LocalQueue,
    config: LocalConsumerConfig,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), QueueError>
where
    H: Fn(RunJob) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    config.validate()?;
    let mut names = config.queues.clone();
    names.sort();
    names.dedup();
    let consumer = Arc::new(Consumer {
        queue,
        handler,
        max_attempts: config.max_attempts,
        retry_delay: config.retry_delay,
        metrics: Arc::clone(&config.metrics),
        jobs: TaskTracker::new(),
        shutdown,
        cut: CancellationToken::new(),
    });
    let lanes = names.into_iter().map(|name| {
        let slots = config.concurrency_of(name);
        tracing::debug!(queue = %name, concurrency = slots, "local queue consumer starting");
        Arc::clone(&consumer).serve(name, slots)
    });
    futures::future::join_all(lanes).await;

    consumer.jobs.close();
    if tokio::time::timeout(config.shutdown_grace, consumer.jobs.wait())
        .await
        .is_err()
    {
        let busy = config.metrics.snapshot();
        tracing::warn!(
            in_flight = busy.busy_chat + busy.busy_batch,
            "shutdown deadline passed; dropping the remaining jobs (their runs are recovered at the next start)",
        );
        consumer.cut.cancel();
        consumer.jobs.wait().await;
    }
    tracing::debug!("local queue consumers stopped");
    Ok(())
}

/// What every job task of one [`run_local_consumers`] call shares.
struct Consumer<H> {
    queue: LocalQueue,
    handler: H,
    max_attempts: u32,
    retry_delay: Duration,
    metrics: Arc<ConsumerMetrics>,
    /// Job and retry tasks.
    jobs: TaskTracker,
    /// Stops taking jobs and drops waiting retries.
    shutdown: CancellationToken,
    /// Drops the handlers still running after the shutdown grace.
    cut: CancellationToken,
}

impl<H, Fut> Consumer<H>
where
    H: Fn(RunJob) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    /// Takes jobs of `name` while it has a free slot, until shutdown.
    async fn serve(self: Arc<Self>, name: QueueName, slots: usize) {
        let slots = Arc::new(Semaphore::new(slots));
        let lane = self.queue.lane(name);
        loop {
            let slot = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                slot = Arc::clone(&slots).acquire_owned() => slot,
            };
            // The semaphore is never closed.
            let Ok(slot) = slot else { break };
            let queued = tokio::select! {
                biased;
                () = self.shutdown.cancelled() => break,
                queued = lane.take() => queued,
            };
            self.jobs
                .spawn(Arc::clone(&self).run_job(name, queued, slot));
        }
    }

    /// Runs one delivery of a job and settles its outcome.
    async fn run_job(
        self: Arc<Self>,
        queue: QueueName,
        queued: Queued,
        slot: OwnedSemaphorePermit,
    ) {
        let attempt = queued.deliveries + 1;
        let span = tracing::info_span!("job", %queue, run_id = %queued.job.run_id, attempt);
        self.metrics.job_started();
        let busy = self.metrics.busy(queue);
        let handler = &self.handler;
        let job = queued.job.clone();
        let work = AssertUnwindSafe(async move { handler(job).await })
            .catch_unwind()
            .instrument(span.clone());
        let outcome = tokio::select! {
            outcome = work => outcome,
            // Past the shutdown grace: dropping the handler cancels it.
            () = self.cut.cancelled() => return,
        };
        drop(busy);
        drop(slot);

        let _entered = span.enter();
        let lane = self.queue.lane(queue);
        let reason = match outcome {
            Ok(Ok(())) => {
                self.metrics.job_succeeded();
                return;
            }
            Ok(Err(JobError::Abort(reason))) => {
                self.metrics.job_dead();
                lane.dead.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%reason, "job aborted; not retrying");
                return;
            }
            Ok(Err(JobError::Retry(reason))) => reason,
            Err(panic) => format!("handler panicked: {}", panic_message(&*panic)),
        };
        if attempt >= self.max_attempts {
            self.metrics.job_dead();
            lane.dead.fetch_add(1, Ordering::Relaxed);
            tracing::error!(%reason, max_attempts = self.max_attempts, "job failed on its last attempt; giving up");
            return;
        }
        self.metrics.job_retried();
        let delay = self.retry_delay * attempt;
        tracing::warn!(
            %reason,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "job failed; retrying",
        );
        lane.scheduled.fetch_add(1, Ordering::Relaxed);
        let consumer = Arc::clone(&self);
        self.jobs.spawn(async move {
            let lane = consumer.queue.lane(queue);
            tokio::select! {
                () = tokio::time::sleep(delay) => lane.push(Queued {
                    job: queued.job,
                    deliveries: attempt,
                    since: Instant::now(),
                }),
                // The run stays in the database; the next start runs it again.
                () = consumer.shutdown.cancelled() => {}
            }
            lane.scheduled.fetch_sub(1, Ordering::Relaxed);
        });
    }
}

/// The message of a caught panic, when it has one.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use std::{
        collections::HashMap,
        sync::atomic::{AtomicBool, AtomicUsize},
    };

    use tokio::task::JoinHandle;

    use super::*;
    use crate::queue::{ConsumerMetricsSnapshot, JobProducer};

    /// A running `run_local_consumers` call on a fresh queue.
    struct Running {
        queue: LocalQueue,
        producer: JobProducer,
        metrics: Arc<ConsumerMetrics>,
        shutdown: CancellationToken,
        task: JoinHandle<Result<(), QueueError>>,
    }

    impl Running {
        fn start<H, Fut>(config: LocalConsumerConfig, handler: H) -> Self
        where
            H: Fn(RunJob) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<(), JobError>> + Send + 'static,
        {
            let queue = LocalQueue::new();
            let metrics = Arc::clone(&config.metrics);
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(run_local_consumers(
                queue.clone(),
                config,
                handler,
                shutdown.clone(),
            ));
            Self {
                producer: JobProducer::local(queue.clone()),
                queue,
                metrics,
                shutdown,
                task,
            }
        }

        async fn push(&self, run_id: &str) {
            self.producer
                .push(QueueName::Chat, RunJob::new(run_id))
                .await
                .unwrap();
        }

        async fn until(&self, what: &str, done: impl Fn(ConsumerMetricsSnapshot) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !done(self.metrics.snapshot()) {
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting until {what}: {:?}",
                    self.metrics.snapshot()
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }

        async fn stop(self) -> LocalQueue {
            self.shutdown.cancel();
            tokio::time::timeout(Duration::from_secs(5), self.task)
                .await
                .expect("consumers stop within 5 s")
                .unwrap()
                .unwrap();
            self.queue
        }
    }

    fn fast() -> LocalConsumerConfig {
        LocalConsumerConfig {
            retry_delay: Duration::from_millis(5),
            ..LocalConsumerConfig::default()
        }
    }

    /// A door handlers wait at until the test opens it.
    #[derive(Clone)]
    struct Gate(Arc<Semaphore>);

    impl Default for Gate {
        fn default() -> Self {
            Self(Arc::new(Semaphore::new(0)))
        }
    }

    impl Gate {
        async fn pass(&self) {
            drop(self.0.acquire().await);
        }
        fn open(&self) {
            self.0.add_permits(Semaphore::MAX_PERMITS / 2);
        }
    }

    #[tokio::test]
    async fn a_pushed_job_is_picked_up_at_once() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let t = Running::start(fast(), move |job: RunJob| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((job.run_id, Instant::now()));
                Ok(())
            }
        });
        // Each push finds the consumer idle; a polling consumer would answer some of them
        // late.
        for i in 0..5 {
            let pushed = Instant::now();
            t.push(&format!("run-{i}")).await;
            let (run_id, started) = tokio::time::timeout(Duration::from_secs(5), rx.recv())
                .await
                .expect("picked up")
                .unwrap();
            assert_eq!(run_id, format!("run-{i}"));
            let waited = started.duration_since(pushed);
            assert!(
                waited < Duration::from_millis(250),
                "picked up after {waited:?}"
            );
        }
        t.until("all succeeded", |m| m.jobs_succeeded == 5).await;
        let queue = t.stop().await;
        assert_eq!(queue.pending(QueueName::Chat), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn each_queue_runs_at_most_its_concurrency() {
        let gate = Gate::default();
        let running: Arc<Mutex<HashMap<String, (usize, usize)>>> = Arc::default();
        let config = LocalConsumerConfig {
            concurrency: 3,
            batch_concurrency: 1,
            ..fast()
        };
        let handler = {
            let (gate, running) = (gate.clone(), Arc::clone(&running));
            move |job: RunJob| {
                let (gate, running) = (gate.clone(), Arc::clone(&running));
                async move {
                    let queue = job.run_id.split('-').next().unwrap_or_default().to_owned();
                    {
                        let mut running = running.lock().unwrap();
                        let (now, max) = running.entry(queue.clone()).or_default();
                        *now += 1;
                        *max = (*max).max(*now);
                    }
                    gate.pass().await;
                    running.lock().unwrap().get_mut(&queue).unwrap().0 -= 1;
                    Ok(())
                }
            }
        };
        let t = Running::start(config, handler);
        let jobs = |queue: &str, n: usize| {
            (0..n)
                .map(|i| RunJob::new(format!("{queue}-{i}")))
                .collect::<Vec<_>>()
        };
        t.producer
            .push_many(QueueName::Chat, &jobs("chat", 7))
            .await
            .unwrap();
        t.producer
            .push_many(QueueName::Batch, &jobs("batch", 4))
            .await
            .unwrap();
        t.until("every slot is busy", |m| {
            m.busy_chat == 3 && m.busy_batch == 1
        })
        .await;
        let stats = t.producer.stats().await.unwrap();
        assert_eq!(
            stats
                .iter()
                .map(|s| (s.queue, s.waiting))
                .collect::<Vec<_>>(),
            [(QueueName::Chat, 4), (QueueName::Batch, 3)]
        );
        assert!(stats[0].oldest_age_secs >= 0.0);

        gate.open();
        t.until("all succeeded", |m| m.jobs_succeeded == 11).await;
        let max = |queue: &str| running.lock().unwrap()[queue].1;
        assert_eq!((max("chat"), max("batch")), (3, 1));
        let snapshot = t.metrics.snapshot();
        assert_eq!((snapshot.busy_chat, snapshot.busy_batch), (0, 0));
        assert_eq!(t.producer.pending(QueueName::Batch).await.unwrap(), 0);
        t.stop().await;
    }

    #[tokio::test]
    async fn a_retried_job_runs_again_until_it_succeeds() {
        let calls = Arc::new(AtomicUsize::new(0));
        let t = Running::start(fast(), {
            let calls = Arc::clone(&calls);
            move |_job: RunJob| {
                let call = calls.fetch_add(1, Ordering::SeqCst);
                async move {
                    match call {
                        0 => Err(JobError::Retry("flaky".into())),
                        1 => panic!("a panic is transient too"),
                        _ => Ok(()),
                    }
                }
            }
        });
        t.push("run-1").await;
        t.until("it succeeded", |m| m.jobs_succeeded == 1).await;
        let m = t.metrics.snapshot();
        assert_eq!((m.jobs_started, m.jobs_retried, m.jobs_dead), (3, 2, 0));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        t.stop().await;
    }

    #[tokio::test]
    async fn a_job_is_given_up_after_its_last_attempt() {
        let config = LocalConsumerConfig {
            max_attempts: 3,
            ..fast()
        };
        let t = Running::start(config, |_job: RunJob| async {
            Err(JobError::Retry("always".into()))
        });
        t.push("run-1").await;
        t.until("it is dead", |m| m.jobs_dead == 1).await;
        let m = t.metrics.snapshot();
        assert_eq!((m.jobs_started, m.jobs_retried), (3, 2));
        let stats = t.queue.stats();
        assert_eq!(
            (stats[0].waiting, stats[0].scheduled, stats[0].dead),
            (0, 0, 1)
        );
        t.stop().await;
    }

    #[tokio::test]
    async fn an_aborted_job_is_not_retried() {
        let t = Running::start(fast(), |job: RunJob| async move {
            if job.run_id == "doomed" {
                Err(JobError::Abort("bad run".into()))
            } else {
                Ok(())
            }
        });
        t.push("doomed").await;
        t.until("it is dead", |m| m.jobs_dead == 1).await;
        // Given up at once: never scheduled, never run again (a later job runs alone).
        assert_eq!(t.queue.pending(QueueName::Chat), 0);
        t.push("fine").await;
        t.until("the next job succeeded", |m| m.jobs_succeeded == 1)
            .await;
        let m = t.metrics.snapshot();
        assert_eq!((m.jobs_started, m.jobs_retried, m.jobs_dead), (2, 0, 1));
        t.stop().await;
    }

    #[tokio::test]
    async fn shutdown_stops_taking_jobs_and_waits_for_running_ones() {
        let gate = Gate::default();
        let t = Running::start(fast(), {
            let gate = gate.clone();
            move |_job: RunJob| {
                let gate = gate.clone();
                async move {
                    gate.pass().await;
                    Ok(())
                }
            }
        });
        t.push("running").await;
        t.until("the job runs", |m| m.busy_chat == 1).await;
        t.shutdown.cancel();
        t.push("too late").await;
        let Running {
            queue,
            metrics,
            mut task,
            ..
        } = t;
        // Still draining: the handler has not finished.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), &mut task)
                .await
                .is_err()
        );
        gate.open();
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("returns once the handler finished")
            .unwrap()
            .unwrap();
        let m = metrics.snapshot();
        assert_eq!((m.jobs_started, m.jobs_succeeded), (1, 1));
        // The job pushed after shutdown was not taken; it waits for the next start.
        assert_eq!(queue.pending(QueueName::Chat), 1);
    }

    #[tokio::test]
    async fn shutdown_drops_handlers_still_running_after_the_grace() {
        struct Flag(Arc<AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(AtomicBool::new(false));
        let config = LocalConsumerConfig {
            shutdown_grace: Duration::from_millis(50),
            ..fast()
        };
        let t = Running::start(config, {
            let dropped = Arc::clone(&dropped);
            move |_job: RunJob| {
                let flag = Flag(Arc::clone(&dropped));
                async move {
                    let _flag = flag;
                    std::future::pending::<Result<(), JobError>>().await
                }
            }
        });
        t.push("stuck").await;
        t.until("the job runs", |m| m.busy_chat == 1).await;
        let metrics = Arc::clone(&t.metrics);
        t.stop().await;
        assert!(
            dropped.load(Ordering::SeqCst),
            "the stuck handler was dropped"
        );
        let m = metrics.snapshot();
        assert_eq!((m.busy_chat, m.jobs_succeeded, m.jobs_dead), (0, 0, 0));
    }

    #[tokio::test]
    async fn an_invalid_configuration_is_refused() {
        for config in [
            LocalConsumerConfig {
                queues: Vec::new(),
                ..fast()
            },
            LocalConsumerConfig {
                concurrency: 0,
                ..fast()
            },
            LocalConsumerConfig {
                max_attempts: 0,
                ..fast()
            },
        ] {
            let result = run_local_consumers(
                LocalQueue::new(),
                config,
                |_job: RunJob| async { Ok(()) },
                CancellationToken::new(),
            )
            .await;
            assert!(matches!(result, Err(QueueError::InvalidConfig(_))));
        }
    }
}
