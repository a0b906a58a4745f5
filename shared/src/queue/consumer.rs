//! The consumer side of the queue: run apalis workers for the configured queues until shutdown.
//!
//! One [`run_consumers`] call is one worker process's share of the queue. It owns:
//!
//! - one apalis worker per queue, each under a supervisor loop. An apalis-redis worker stops for
//!   good on any Redis error during a fetch, heartbeat or ack, and apalis's `Monitor` restarts
//!   instantly with no backoff (a busy loop while Redis is down), so the supervisor restarts it
//!   itself with exponential backoff, after handing back whatever the dead worker held;
//! - one pub/sub connection that wakes the workers (`wakeup.rs`);
//! - the handlers' tasks (`handler.rs`), which never outlive their worker.
//!
//! **Chat before batch.** Each queue gets its own apalis worker with its own concurrency limit:
//! chat runs up to [`ConsumerConfig::concurrency`] jobs, batch (when the process also serves
//! chat) at most [`ConsumerConfig::batch_concurrency`] (default 1). A chat turn therefore never
//! waits behind batch work: its slots are reserved, a burst of thousands of batch runs occupies
//! only the batch slots, and each queue is fetched independently as soon as it has a free slot.
//! The alternative, one shared pool that checks chat first, would still let batch runs fill every
//! slot while chat is idle and then make the next chat turn wait for a batch run to finish (runs
//! take seconds to minutes and are not preempted). Processes started for batch only give batch
//! the full `concurrency`; that is how batch throughput scales.
//!
//! **Heartbeats and orphans.** Every worker heart-beats every [`ConsumerConfig::heartbeat_interval`]
//! (default 3 s) and, in the same step, re-enqueues the jobs of workers silent for
//! `heartbeat_interval × missed_heartbeats` (default 3 × 3 s = 9 s). A job of a killed worker is
//! thus back in the queue 9–13 s after the kill (the next heartbeat of a live worker, plus
//! whole-second timestamps), and that worker fetches right after its heartbeat. apalis-redis's
//! defaults (30 s × 10) would take five minutes.
//!
//! **Prefetch is 1.** apalis fetches only when a slot is free, but fetches `batch_size` jobs at
//! once; the surplus sits in this worker's in-flight set until more slots free up, where idle
//! workers cannot take it, and while that buffer is non-empty apalis's persistence layer skips
//! heartbeats, so other workers would declare this one dead and run its jobs twice. With jobs
//! that take seconds, one Lua call per job costs nothing.
//!
//! **Shutdown.** On cancellation every worker stops fetching and waits for its in-flight
//! handlers until [`ConsumerConfig::shutdown_grace`]; handlers still running then are cancelled
//! and their jobs handed back to the head of the queue for another worker, with a wake-up.
//!
//! The worker is *paused* for that wait, not stopped. apalis acknowledges a finished job by
//! sending it down a bounded channel (`batch_size × 4` = 4 slots) that only its fetch-side loop
//! reads, and a stopped apalis worker no longer runs that loop until every job has finished. So
//! with more than four jobs finishing during a stopped worker's drain, the fifth job's future
//! waited forever for a slot, the worker never ended, and at the deadline jobs that had long
//! finished were handed back. A paused worker keeps reading the channel (and heart-beating)
//! while it fetches nothing; once apalis has finished the future of every job it started (its
//! event stream counts them), it is stopped, which writes the last acknowledgements and ends it.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use apalis::prelude::{
    BackendExt, Event, WorkerBuilder, WorkerBuilderExt, WorkerContext, WorkerError,
};
use apalis_redis::RedisStorage;
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{Stream, StreamExt};
use redis::aio::ConnectionManager;
use serde_json::Value;
use tokio::{sync::OnceCell, task::JoinSet, time::Instant};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{
    JobError, QueueError, QueueName, RunJob,
    handler::JobService,
    metrics::{ConsumerMetrics, MeteredConnection},
    wakeup::{self, QueueSignal, WakeStrategy},
};

/// A worker that ran at least this long before failing is considered to have been healthy, so
/// the next failure starts the restart backoff from the beginning.
const HEALTHY_RUN: Duration = Duration::from_mins(1);

/// How a worker process consumes the queue. Build it with [`ConsumerConfig::new`] and adjust
/// the public fields.
#[derive(Clone)]
pub struct ConsumerConfig {
    /// `redis://…`; `Debug` shows only the part after any credentials.
    pub redis_url: String,
    /// Key prefix of the queues (`{prefix}:chat`, `{prefix}:batch`); the producer must use the
    /// same one.
    pub prefix: String,
    /// Queues to serve. Default: chat and batch.
    pub queues: Vec<QueueName>,
    /// Jobs run at once on the chat queue (or on the batch queue when it is served alone).
    /// Default 4.
    pub concurrency: usize,
    /// Jobs run at once on the batch queue when chat is served too. Default 1.
    pub batch_concurrency: usize,
    /// Unique among all workers, alive or dead ([`unique_worker_name`]): apalis refuses to
    /// register a name whose previous owner heart-beat recently, and would hand a dead
    /// namesake's jobs to the new process.
    pub worker_name: String,
    /// How often an idle worker fetches without a wake-up; this bounds the delay of due retries,
    /// recovered orphans and any wake-up lost in a Redis outage. Default 1 s.
    pub fallback_poll: Duration,
    /// Liveness heartbeat. Whole seconds, at least 1 (apalis-redis keeps second timestamps).
    /// Default 3 s.
    pub heartbeat_interval: Duration,
    /// Heartbeats a worker may miss before its jobs are given to others. At least 2. Default 3.
    pub missed_heartbeats: u32,
    /// Deliveries of a job, first one included, before a [`JobError::Retry`] dead-letters it.
    /// Default 5 (retries after about 1, 2, 3 and 4 s).
    pub max_attempts: u32,
    /// Jobs fetched per Redis round trip (apalis `batch_size`). Keep it at 1; see the module
    /// docs.
    pub prefetch: usize,
    /// How long shutdown waits for running handlers before handing their jobs back. Default 30 s.
    pub shutdown_grace: Duration,
    /// Counters of this consumer; keep a clone to read them.
    pub metrics: Arc<ConsumerMetrics>,
}

impl std::fmt::Debug for ConsumerConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password; show only where it points.
        let redis_host = self
            .redis_url
            .rsplit_once('@')
            .map_or(self.redis_url.as_str(), |(_, host)| host);
        f.debug_struct("ConsumerConfig")
            .field("redis_host", &redis_host)
            .field("prefix", &self.prefix)
            .field("queues", &self.queues)
            .field("concurrency", &self.concurrency)
            .field("batch_concurrency", &self.batch_concurrency)
            .field("worker_name", &self.worker_name)
            .field("fallback_poll", &self.fallback_poll)
            .field("heartbeat_interval", &self.heartbeat_interval)
            .field("missed_heartbeats", &self.missed_heartbeats)
            .field("max_attempts", &self.max_attempts)
            .field("prefetch", &self.prefetch)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish_non_exhaustive()
    }
}

impl ConsumerConfig {
    pub fn new(
        redis_url: impl Into<String>,
        prefix: impl Into<String>,
        worker_name: impl Into<String>,
    ) -> Self {
        Self {
            redis_url: redis_url.into(),
            prefix: prefix.into(),
            queues: QueueName::ALL.to_vec(),
            concurrency: 4,
            batch_concurrency: 1,
            worker_name: worker_name.into(),
            fallback_poll: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(3),
            missed_heartbeats: 3,
            max_attempts: 5,
            prefetch: 1,
            shutdown_grace: Duration::from_secs(30),
            metrics: Arc::default(),
        }
    }

    /// How long a worker may stay silent before another one re-enqueues its jobs.
    pub fn orphan_timeout(&self) -> Duration {
        self.heartbeat_interval * self.missed_heartbeats
    }

    fn validate(&self) -> Result<(), QueueError> {
        let fail = |message: &str| Err(QueueError::InvalidConfig(message.to_owned()));
        if self.prefix.is_empty() {
            return fail("prefix is empty");
        }
        if self.worker_name.is_empty() {
            return fail("worker_name is empty");
        }
        if self.queues.is_empty() {
            return fail("no queues to consume");
        }
        if self.concurrency == 0 || self.batch_concurrency == 0 || self.prefetch == 0 {
            return fail("concurrency, batch_concurrency and prefetch must be at least 1");
        }
        if self.fallback_poll.is_zero() {
            return fail("fallback_poll must be positive");
        }
        if self.heartbeat_interval < Duration::from_secs(1)
            || self.heartbeat_interval.subsec_nanos() != 0
        {
            return fail("heartbeat_interval must be a whole number of seconds, at least 1");
        }
        if self.missed_heartbeats < 2 {
            return fail("missed_heartbeats must be at least 2");
        }
        if self.max_attempts == 0 {
            return fail("max_attempts must be at least 1");
        }
        Ok(())
    }

    /// Jobs run at once on `queue`.
    pub fn concurrency_of(&self, queue: QueueName) -> usize {
        queue_concurrency(
            &self.queues,
            self.concurrency,
            self.batch_concurrency,
            queue,
        )
    }
}

/// Jobs run at once on `queue` by a consumer of `queues`: batch gets its own smaller limit
/// when chat is served too (see the module docs).
pub(crate) fn queue_concurrency(
    queues: &[QueueName],
    concurrency: usize,
    batch_concurrency: usize,
    queue: QueueName,
) -> usize {
    match queue {
        QueueName::Batch if queues.contains(&QueueName::Chat) => batch_concurrency,
        QueueName::Chat | QueueName::Batch => concurrency,
    }
}

/// A worker name no other process will use: `{host}:{pid}:{random}`.
pub fn unique_worker_name(host: &str) -> String {
    let ulid = ulid::Ulid::new().to_string().to_ascii_lowercase();
    // A ULID's last 16 characters are its 80 random bits; 8 of them (40 bits) are plenty.
    let random = &ulid[ulid.len() - 8..];
    format!("{host}:{}:{random}", std::process::id())
}

/// Runs consumers for `config.queues` until `shutdown` is cancelled; then stops fetching, lets
/// in-flight handlers finish within `config.shutdown_grace`, hands back the rest and returns.
///
/// Redis being unreachable is not an error here: workers retry with backoff (and log it) for as
/// long as the process runs. Errors are an invalid configuration or a panic in the consumer
/// machinery itself (handler panics only fail their job).
pub async fn run_consumers<H, Fut>(
    config: ConsumerConfig,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), QueueError>
where
    H: Fn(RunJob) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    config.validate()?;
    let client = crate::backends::redis_client(config.redis_url.as_str())?;
    let mut queues = config.queues.clone();
    queues.sort();
    queues.dedup();

    // Stops everything if one of our own tasks dies, so the process can exit and be restarted.
    let stop = shutdown.child_token();
    let connection = Arc::new(SharedConnection {
        client: client.clone(),
        metrics: Arc::clone(&config.metrics),
        conn: OnceCell::new(),
    });
    let mut tasks = JoinSet::new();
    let mut routes = Vec::new();
    for queue in queues {
        let apalis = queue
            .apalis_config(&config.prefix)
            .batch_size(config.prefetch)
            .heartbeat_interval(config.heartbeat_interval)
            .missed_heartbeats(config.missed_heartbeats as usize);
        let signal = Arc::new(QueueSignal::default());
        let wake_channel = QueueName::wake_channel(&apalis);
        routes.push((wake_channel.clone(), Arc::clone(&signal)));
        let supervisor = Supervisor {
            queue,
            name: config.worker_name.clone(),
            apalis,
            wake_channel,
            signal,
            concurrency: config.concurrency_of(queue),
            max_attempts: config.max_attempts as usize,
            fallback_poll: config.fallback_poll,
            shutdown_grace: config.shutdown_grace,
            connection: Arc::clone(&connection),
            metrics: Arc::clone(&config.metrics),
        };
        tasks.spawn(supervisor.run(handler.clone(), stop.clone()));
    }
    tasks.spawn(wakeup::listen(
        client,
        routes,
        Arc::clone(&config.metrics),
        stop.clone(),
    ));

    let mut failure = None;
    while let Some(finished) = tasks.join_next().await {
        match finished {
            Err(error) if failure.is_none() => {
                tracing::error!(%error, "queue consumer task failed; stopping the consumers");
                stop.cancel();
                failure = Some(error.to_string());
            }
            Err(_) | Ok(()) => {}
        }
    }
    failure.map_or(Ok(()), |error| Err(QueueError::ConsumerPanicked(error)))
}

/// The consumers' one multiplexed Redis connection, opened on first use so that a worker
/// started before Redis is up retries instead of failing.
struct SharedConnection {
    client: redis::Client,
    metrics: Arc<ConsumerMetrics>,
    conn: OnceCell<MeteredConnection>,
}

impl SharedConnection {
    async fn get(&self) -> Result<MeteredConnection, redis::RedisError> {
        self.conn
            .get_or_try_init(|| async {
                let conn = ConnectionManager::new(self.client.clone()).await?;
                Ok(MeteredConnection::new(conn, Arc::clone(&self.metrics)))
            })
            .await
            .cloned()
    }
}

/// Why one run of an apalis worker ended.
#[derive(Debug, thiserror::Error)]
enum RunError {
    #[error("connecting to redis: {0}")]
    Connect(#[from] redis::RedisError),
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("the worker ended without an error")]
    EndedEarly,
}

/// Keeps one queue's apalis worker running: restarts it with backoff whenever it stops before
/// shutdown, and stops it gracefully on shutdown.
struct Supervisor {
    queue: QueueName,
    name: String,
    apalis: apalis_redis::Config,
    wake_channel: String,
    signal: Arc<QueueSignal>,
    concurrency: usize,
    max_attempts: usize,
    fallback_poll: Duration,
    shutdown_grace: Duration,
    connection: Arc<SharedConnection>,
    metrics: Arc<ConsumerMetrics>,
}

impl Supervisor {
    async fn run<H, Fut>(self, handler: H, stop: CancellationToken)
    where
        H: Fn(RunJob) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let queue = self.queue;
        let mut backoff = restart_backoff();
        while !stop.is_cancelled() {
            let started = Instant::now();
            let outcome = self.run_worker(handler.clone(), &stop).await;
            self.hand_back().await;
            if stop.is_cancelled() {
                if let Err(error) = outcome {
                    tracing::warn!(%queue, %error, "queue worker failed while shutting down");
                }
                break;
            }
            // Not shutting down, so the worker ended by itself: restart it even without an error
            // rather than silently stop consuming the queue.
            let error = outcome.err().unwrap_or(RunError::EndedEarly);
            self.metrics.worker_restarted();
            if started.elapsed() >= HEALTHY_RUN {
                backoff = restart_backoff();
            }
            let delay = backoff.next().unwrap_or(Duration::from_secs(10));
            tracing::warn!(
                %queue,
                %error,
                retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "queue worker stopped on an error; restarting",
            );
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(delay) => {}
            }
        }
        tracing::debug!(%queue, "queue worker stopped");
    }

    /// Runs one apalis worker until it fails, or until `stop` and a graceful drain.
    async fn run_worker<H, Fut>(&self, handler: H, stop: &CancellationToken) -> Result<(), RunError>
    where
        H: Fn(RunJob) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let conn = tokio::select! {
            () = stop.cancelled() => return Ok(()),
            conn = self.connection.get() => conn?,
        };
        let tracker = TaskTracker::new();
        let ctx = WorkerContext::new(&self.name);
        let backend = RedisStorage::<Value, _>::new(conn.clone())
            .with_config(self.apalis.clone())
            .poll_with_strategy(WakeStrategy::new(
                Arc::clone(&self.signal),
                self.fallback_poll,
            ));
        let dispatched = Arc::new(AtomicUsize::new(0));
        let worker = WorkerBuilder::new(&ctx)
            .backend(backend)
            .concurrency(self.concurrency)
            .build(JobService {
                handler,
                queue: self.queue,
                max_attempts: self.max_attempts,
                tracker: tracker.clone(),
                metrics: Arc::clone(&self.metrics),
                dispatched: Arc::clone(&dispatched),
            });
        // Driven as a stream rather than with `run()`: the drain needs to see each job end.
        let mut events = Box::pin(worker.stream());
        let mut settled = 0;
        tracing::debug!(queue = %self.queue, worker = %self.name, concurrency = self.concurrency, "queue worker starting");

        let outcome = loop {
            tokio::select! {
                event = events.next() => if let Some(end) = settle(event, &mut settled) {
                    break end;
                },
                () = stop.cancelled() => {
                    let jobs = Jobs { dispatched: &dispatched, settled };
                    break self.drain(events.as_mut(), &ctx, jobs, conn).await;
                }
            }
        };
        // Dropping the worker cancels whatever handlers it still runs; wait until they are gone
        // before their jobs are handed back.
        drop(events);
        tracker.close();
        tracker.wait().await;
        outcome
    }

    /// Stops fetching and waits for in-flight jobs, at most `shutdown_grace`: pauses the
    /// worker, lets it run until apalis has finished every job it started, then stops it (see
    /// the module docs for why it is not stopped at once).
    async fn drain(
        &self,
        mut events: Pin<&mut (impl Stream<Item = Result<Event, WorkerError>> + ?Sized)>,
        ctx: &WorkerContext,
        mut jobs: Jobs<'_>,
        mut conn: MeteredConnection,
    ) -> Result<(), RunError> {
        if ctx.pause().is_err() {
            // Never started: nothing fetched, nothing running.
            return Ok(());
        }
        let deadline = tokio::time::sleep(self.shutdown_grace);
        tokio::pin!(deadline);
        let mut keep_alive = tokio::time::interval(self.apalis.heartbeat_interval);
        let mut stopping = false;
        loop {
            if !stopping && jobs.all_settled() {
                // Every job's acknowledgement is queued; stopping writes them and ends the worker.
                stopping = true;
                if let Err(error) = ctx.stop() {
                    tracing::debug!(queue = %self.queue, %error, "stopping the drained worker");
                }
            }
            tokio::select! {
                event = events.next() => if let Some(end) = settle(event, &mut jobs.settled) {
                    return end;
                },
                () = &mut deadline => {
                    tracing::warn!(
                        queue = %self.queue,
                        in_flight = ctx.task_count(),
                        "shutdown deadline passed; cancelling the remaining jobs and handing them back",
                    );
                    return Ok(());
                }
                _ = keep_alive.tick() => {
                    // apalis heart-beats while paused but not once stopped (its last
                    // acknowledgements may wait on Redis); without this, other workers could take
                    // our still-running jobs after the orphan timeout.
                    let alive: Result<u64, _> = redis::cmd("ZADD")
                        .arg(self.apalis.workers_set())
                        .arg("XX")
                        .arg(unix_seconds())
                        .arg(&self.name)
                        .query_async(&mut conn)
                        .await;
                    if let Err(error) = alive {
                        tracing::debug!(queue = %self.queue, %error, "heartbeat during shutdown failed");
                    }
                }
            }
        }
    }

    /// Puts the jobs this worker still holds back at the head of the queue and deregisters it.
    /// Best effort: if Redis is unreachable, other workers recover the jobs after the orphan
    /// timeout, and so does this one when it registers again.
    async fn hand_back(&self) {
        static HAND_BACK: std::sync::LazyLock<redis::Script> =
            std::sync::LazyLock::new(|| redis::Script::new(include_str!("hand_back.lua")));
        let Some(mut conn) = self.connection.conn.get().cloned() else {
            return;
        };
        let worker = WorkerContext::new(&self.name);
        let handed_back: Result<u64, _> = HAND_BACK
            .key(self.apalis.inflight_set_for(&worker))
            .key(self.apalis.active_jobs_list())
            .key(self.apalis.signal_list())
            .key(self.apalis.workers_set())
            .key(self.apalis.job_meta_hash())
            .key(self.apalis.worker_metadata_key(&worker))
            .arg(&self.name)
            .arg(&self.wake_channel)
            .invoke_async(&mut conn)
            .await;
        match handed_back {
            Ok(0) => {}
            Ok(jobs) => {
                tracing::info!(queue = %self.queue, jobs, "handed unfinished jobs back to the queue");
            }
            Err(error) => {
                tracing::warn!(queue = %self.queue, %error, "could not hand jobs back; they will be recovered as orphans");
            }
        }
    }
}

/// Jobs apalis started for one worker, and how many of them it has finished with.
struct Jobs<'a> {
    /// Incremented by [`JobService`] as apalis hands it each job.
    dispatched: &'a AtomicUsize,
    /// Counted from the worker's event stream: one success or error event per job whose
    /// future has ended, i.e. whose acknowledgement is queued.
    settled: usize,
}

impl Jobs<'_> {
    fn all_settled(&self) -> bool {
        // `dispatched` only grows while the worker is polled, which only this task does.
        self.settled >= self.dispatched.load(Ordering::Relaxed)
    }
}

/// Accounts for one item of a worker's event stream; `Some` when the worker has ended.
fn settle(
    item: Option<Result<Event, WorkerError>>,
    settled: &mut usize,
) -> Option<Result<(), RunError>> {
    match item {
        None => Some(Ok(())),
        Some(Err(error)) => Some(Err(error.into())),
        Some(Ok(Event::Success(_) | Event::Error(_))) => {
            *settled += 1;
            None
        }
        Some(Ok(_)) => None,
    }
}

fn restart_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(250))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}
