//! The job queue against the machine's Redis (`REDIS_URL`, default `redis://127.0.0.1:6379`).
//!
//! Every test uses its own key prefix (`test:<ulid>`) and deletes its keys when it ends, so the
//! tests run in parallel and leave nothing behind. Nothing sleeps to wait for a result: tests
//! poll for the state they expect, with a deadline.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::{Context as _, bail, ensure};
use conveyor_shared::queue::{
    ConsumerConfig, JobError, JobProducer, QueueName, RunJob, run_consumers, unique_worker_name,
};
use redis::{AsyncCommands as _, Commands as _};
use tokio::{task::JoinHandle, time::Instant};
use tokio_util::sync::CancellationToken;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// One test's slice of Redis: a fresh prefix, a producer, and cleanup on drop.
struct TestQueue {
    prefix: String,
    producer: JobProducer,
    redis: redis::aio::MultiplexedConnection,
}

impl TestQueue {
    async fn new() -> anyhow::Result<Self> {
        let prefix = format!("test:{}", ulid::Ulid::new());
        let producer = JobProducer::connect(&redis_url(), &prefix).await?;
        let redis = redis::Client::open(redis_url())?
            .get_multiplexed_async_connection()
            .await?;
        Ok(Self {
            prefix,
            producer,
            redis,
        })
    }

    fn config(&self) -> ConsumerConfig {
        let mut config = ConsumerConfig::new(redis_url(), &self.prefix, unique_worker_name("test"));
        config.shutdown_grace = Duration::from_secs(5);
        config
    }

    async fn push(&self, queue: QueueName, run_id: &str) -> anyhow::Result<()> {
        self.producer.push(queue, RunJob::new(run_id)).await?;
        Ok(())
    }

    fn key(&self, queue: QueueName, suffix: &str) -> String {
        format!("{}:{queue}:{suffix}", self.prefix)
    }

    async fn set_size(&self, queue: QueueName, set: &str) -> anyhow::Result<usize> {
        Ok(self.redis.clone().scard(self.key(queue, set)).await?)
    }

    async fn list_len(&self, queue: QueueName, list: &str) -> anyhow::Result<usize> {
        Ok(self.redis.clone().llen(self.key(queue, list)).await?)
    }

    async fn scheduled(&self, queue: QueueName) -> anyhow::Result<usize> {
        Ok(self
            .redis
            .clone()
            .zcard(self.key(queue, "scheduled"))
            .await?)
    }

    /// Status and attempts apalis recorded for the only job ever pushed on `queue`.
    async fn only_job_meta(&self, queue: QueueName) -> anyhow::Result<(String, u32)> {
        let ids: Vec<String> = self.redis.clone().hkeys(self.key(queue, "data")).await?;
        let [id] = ids.as_slice() else {
            bail!("expected one job on {queue}, found {}", ids.len());
        };
        let meta: HashMap<String, String> = self
            .redis
            .clone()
            .hgetall(self.key(queue, &format!("meta:{id}")))
            .await?;
        let status = meta.get("status").cloned().unwrap_or_default();
        let attempts = meta
            .get("attempts")
            .map(|a| a.parse())
            .transpose()?
            .unwrap_or(0);
        Ok((status, attempts))
    }
}

impl Drop for TestQueue {
    fn drop(&mut self) {
        let cleanup = || -> redis::RedisResult<()> {
            let mut conn = redis::Client::open(redis_url())?.get_connection()?;
            let keys = conn
                .scan_match(format!("{}:*", self.prefix))?
                .collect::<Result<Vec<String>, _>>()?;
            for chunk in keys.chunks(500) {
                redis::cmd("DEL").arg(chunk).exec(&mut conn)?;
            }
            // apalis-redis registers every queue in one global index.
            redis::cmd("ZREM")
                .arg("core:apalis:queues:list")
                .arg(format!("{}:chat:workers", self.prefix))
                .arg(format!("{}:batch:workers", self.prefix))
                .exec(&mut conn)
        };
        if let Err(error) = cleanup() {
            eprintln!("cleaning up {}: {error}", self.prefix);
        }
    }
}

/// Which run ids a handler saw, in order, with what it was doing at most at once.
#[derive(Clone, Default)]
struct Calls {
    seen: Arc<Mutex<Vec<String>>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

impl Calls {
    fn record(&self, run_id: &str) {
        self.seen
            .lock()
            .expect("calls lock")
            .push(run_id.to_owned());
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
    }

    fn finish(&self) {
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    fn total(&self) -> usize {
        self.seen.lock().expect("calls lock").len()
    }

    fn count(&self, run_id: &str) -> usize {
        self.seen
            .lock()
            .expect("calls lock")
            .iter()
            .filter(|seen| *seen == run_id)
            .count()
    }

    fn counts(&self) -> HashMap<String, usize> {
        let mut counts = HashMap::new();
        for run_id in self.seen.lock().expect("calls lock").iter() {
            *counts.entry(run_id.clone()).or_default() += 1;
        }
        counts
    }
}

/// A running `run_consumers` call.
struct Consumer {
    shutdown: CancellationToken,
    task: JoinHandle<Result<(), conveyor_shared::queue::QueueError>>,
}

impl Consumer {
    fn start<H, Fut>(config: ConsumerConfig, handler: H) -> Self
    where
        H: Fn(RunJob) -> Fut + Clone + Send + Sync + 'static,
        Fut: Future<Output = Result<(), JobError>> + Send + 'static,
    {
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(run_consumers(config, handler, shutdown.clone()));
        Self { shutdown, task }
    }

    async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .context("consumers did not stop")???;
        Ok(())
    }
}

/// A handler that records each call and succeeds.
fn recording(calls: &Calls) -> impl Fn(RunJob) -> BoxedJob + Clone + Send + Sync + 'static {
    let calls = calls.clone();
    move |job: RunJob| {
        let calls = calls.clone();
        Box::pin(async move {
            calls.record(&job.run_id);
            calls.finish();
            Ok(())
        })
    }
}

type BoxedJob = std::pin::Pin<Box<dyn Future<Output = Result<(), JobError>> + Send>>;

/// Polls `condition` every few milliseconds until it holds or `within` has passed.
async fn eventually<F, Fut>(within: Duration, what: &str, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + within;
    loop {
        if condition().await? {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("timed out after {within:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushed_job_is_handled_exactly_once() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let consumer = Consumer::start(queue.config(), recording(&calls));

    queue.push(QueueName::Chat, "run_once").await?;
    eventually(Duration::from_secs(5), "the job to be acked", || async {
        Ok(queue.set_size(QueueName::Chat, "done").await? == 1)
    })
    .await?;
    consumer.stop().await?;

    assert_eq!(calls.count("run_once"), 1);
    assert_eq!(calls.total(), 1);
    assert_eq!(
        queue.only_job_meta(QueueName::Chat).await?,
        ("Done".to_owned(), 1)
    );
    assert_eq!(queue.list_len(QueueName::Chat, "active").await?, 0);
    assert_eq!(queue.scheduled(QueueName::Chat).await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_jobs_with_concurrency_four_are_each_handled_once() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let mut config = queue.config();
    config.concurrency = 4;
    let handler = {
        let calls = calls.clone();
        move |job: RunJob| {
            let calls = calls.clone();
            async move {
                calls.record(&job.run_id);
                tokio::time::sleep(Duration::from_millis(2)).await;
                calls.finish();
                Ok(())
            }
        }
    };
    let consumer = Consumer::start(config, handler);

    for i in 0..200 {
        queue.push(QueueName::Chat, &format!("run_{i}")).await?;
    }
    eventually(Duration::from_secs(20), "200 acked jobs", || async {
        Ok(queue.set_size(QueueName::Chat, "done").await? == 200)
    })
    .await?;
    consumer.stop().await?;

    let counts = calls.counts();
    assert_eq!(counts.len(), 200, "every job handled");
    assert!(counts.values().all(|&n| n == 1), "no job handled twice");
    let max = calls.max_in_flight.load(Ordering::SeqCst);
    assert!(max <= 4, "at most 4 jobs at once, saw {max}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_runs_the_job_again_until_it_succeeds() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let handler = {
        let calls = calls.clone();
        move |job: RunJob| {
            let calls = calls.clone();
            async move {
                calls.record(&job.run_id);
                calls.finish();
                if calls.count(&job.run_id) < 3 {
                    Err(JobError::Retry("llm unavailable".to_owned()))
                } else {
                    Ok(())
                }
            }
        }
    };
    let consumer = Consumer::start(queue.config(), handler);

    queue.push(QueueName::Chat, "run_flaky").await?;
    // Attempt N is rescheduled N seconds later: about 3 s for three attempts.
    eventually(
        Duration::from_secs(15),
        "the third attempt to succeed",
        || async { Ok(queue.set_size(QueueName::Chat, "done").await? == 1) },
    )
    .await?;
    consumer.stop().await?;

    assert_eq!(calls.count("run_flaky"), 3);
    assert_eq!(
        queue.only_job_meta(QueueName::Chat).await?,
        ("Done".to_owned(), 3)
    );
    assert_eq!(queue.set_size(QueueName::Chat, "dead").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_gives_up_after_max_attempts() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let mut config = queue.config();
    config.max_attempts = 2;
    let handler = {
        let calls = calls.clone();
        move |job: RunJob| {
            let calls = calls.clone();
            async move {
                calls.record(&job.run_id);
                calls.finish();
                Err(JobError::Retry("still down".to_owned()))
            }
        }
    };
    let consumer = Consumer::start(config, handler);

    queue.push(QueueName::Chat, "run_hopeless").await?;
    eventually(
        Duration::from_secs(10),
        "the job to be dead-lettered",
        || async { Ok(queue.set_size(QueueName::Chat, "dead").await? == 1) },
    )
    .await?;
    consumer.stop().await?;

    assert_eq!(calls.count("run_hopeless"), 2);
    assert_eq!(
        queue.only_job_meta(QueueName::Chat).await?,
        ("Killed".to_owned(), 2)
    );
    assert_eq!(
        queue.scheduled(QueueName::Chat).await?,
        0,
        "no retry pending"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abort_is_handled_once_and_never_retried() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let handler = {
        let calls = calls.clone();
        move |job: RunJob| {
            let calls = calls.clone();
            async move {
                calls.record(&job.run_id);
                calls.finish();
                Err(JobError::Abort("conversation deleted".to_owned()))
            }
        }
    };
    let consumer = Consumer::start(queue.config(), handler);

    queue.push(QueueName::Chat, "run_doomed").await?;
    eventually(
        Duration::from_secs(5),
        "the job to be dead-lettered",
        || async { Ok(queue.set_size(QueueName::Chat, "dead").await? == 1) },
    )
    .await?;
    consumer.stop().await?;

    assert_eq!(calls.count("run_doomed"), 1);
    assert_eq!(
        queue.only_job_meta(QueueName::Chat).await?,
        ("Killed".to_owned(), 1)
    );
    // A failed (non-aborted) job would now sit in the scheduled set for its retry.
    assert_eq!(
        queue.scheduled(QueueName::Chat).await?,
        0,
        "no retry pending"
    );
    assert_eq!(queue.list_len(QueueName::Chat, "active").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_worker_picks_up_a_push_without_waiting_for_the_fallback_poll() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let mut config = queue.config();
    // Neither the fallback poll nor a heartbeat can fetch within the test; only a wake-up can.
    config.fallback_poll = Duration::from_secs(30);
    config.heartbeat_interval = Duration::from_secs(30);
    let metrics = Arc::clone(&config.metrics);
    let consumer = Consumer::start(config, recording(&calls));

    for round in 0..3 {
        // Idle: the previous job is acked and no fetch happened for a while (the ack's follow-up
        // fetch and the re-check after a wake-up are done).
        let last_fetches = AtomicUsize::new(usize::MAX);
        eventually(Duration::from_secs(5), "the worker to go idle", || async {
            tokio::time::sleep(Duration::from_millis(25)).await;
            let fetches = usize::try_from(metrics.snapshot().fetches)?;
            let quiet = last_fetches.swap(fetches, Ordering::SeqCst) == fetches;
            Ok(quiet && fetches > 0 && queue.set_size(QueueName::Chat, "done").await? == round)
        })
        .await?;

        let wakeups = metrics.snapshot().wakeups;
        let pushed = Instant::now();
        queue.push(QueueName::Chat, &format!("run_{round}")).await?;
        eventually(
            Duration::from_secs(2),
            "the pushed job to start",
            || async { Ok(calls.total() > round) },
        )
        .await?;
        let pickup = pushed.elapsed();
        assert!(
            pickup < Duration::from_millis(500),
            "pickup took {pickup:?}"
        );
        assert!(metrics.snapshot().wakeups > wakeups, "woken over pub/sub");
    }
    consumer.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_share_a_queue_without_duplicates() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let (calls_a, calls_b) = (Calls::default(), Calls::default());
    let slow = |calls: &Calls| {
        let calls = calls.clone();
        move |job: RunJob| {
            let calls = calls.clone();
            async move {
                calls.record(&job.run_id);
                tokio::time::sleep(Duration::from_millis(5)).await;
                calls.finish();
                Ok(())
            }
        }
    };
    let mut config_a = queue.config();
    let mut config_b = queue.config();
    config_a.concurrency = 2;
    config_b.concurrency = 2;
    assert_ne!(config_a.worker_name, config_b.worker_name);
    let consumer_a = Consumer::start(config_a, slow(&calls_a));
    let consumer_b = Consumer::start(config_b, slow(&calls_b));

    for i in 0..100 {
        queue.push(QueueName::Chat, &format!("run_{i}")).await?;
    }
    eventually(Duration::from_secs(20), "100 acked jobs", || async {
        Ok(queue.set_size(QueueName::Chat, "done").await? == 100)
    })
    .await?;
    consumer_a.stop().await?;
    consumer_b.stop().await?;

    let (a, b) = (calls_a.counts(), calls_b.counts());
    assert!(!a.is_empty() && !b.is_empty(), "both consumers took jobs");
    assert_eq!(a.len() + b.len(), 100, "every job handled");
    assert!(
        a.keys().all(|run_id| !b.contains_key(run_id)),
        "no job on both"
    );
    assert!(a.values().chain(b.values()).all(|&n| n == 1), "none twice");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_is_not_held_up_by_batch_work() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut config = queue.config();
    config.concurrency = 1;
    config.batch_concurrency = 1;
    let handler = {
        let (calls, gate) = (calls.clone(), Arc::clone(&gate));
        move |job: RunJob| {
            let (calls, gate) = (calls.clone(), Arc::clone(&gate));
            async move {
                calls.record(&job.run_id);
                if job.run_id.starts_with("batch") {
                    // Batch runs hold their slot until the test opens the gate.
                    let _permit = gate
                        .acquire()
                        .await
                        .map_err(|e| JobError::Retry(e.to_string()))?;
                }
                calls.finish();
                Ok(())
            }
        }
    };
    let consumer = Consumer::start(config, handler);

    for i in 0..3 {
        queue.push(QueueName::Batch, &format!("batch_{i}")).await?;
    }
    eventually(Duration::from_secs(5), "a batch run to start", || async {
        Ok(calls.total() == 1)
    })
    .await?;
    queue.push(QueueName::Chat, "chat_0").await?;
    eventually(Duration::from_secs(2), "the chat run to finish", || async {
        Ok(queue.set_size(QueueName::Chat, "done").await? == 1)
    })
    .await?;
    let batch_started = calls
        .counts()
        .keys()
        .filter(|run_id| run_id.starts_with("batch"))
        .count();
    assert_eq!(
        batch_started, 1,
        "batch held to its one slot; chat ran anyway"
    );

    gate.add_permits(3);
    eventually(
        Duration::from_secs(5),
        "the batch runs to finish",
        || async { Ok(queue.set_size(QueueName::Batch, "done").await? == 3) },
    )
    .await?;
    consumer.stop().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_waits_for_running_jobs() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let finished = Arc::new(AtomicUsize::new(0));
    let handler = {
        let (calls, finished) = (calls.clone(), Arc::clone(&finished));
        move |job: RunJob| {
            let (calls, finished) = (calls.clone(), Arc::clone(&finished));
            async move {
                calls.record(&job.run_id);
                tokio::time::sleep(Duration::from_millis(300)).await;
                finished.fetch_add(1, Ordering::SeqCst);
                calls.finish();
                Ok(())
            }
        }
    };
    let consumer = Consumer::start(queue.config(), handler);

    queue.push(QueueName::Chat, "run_long").await?;
    eventually(Duration::from_secs(5), "the job to start", || async {
        Ok(calls.total() == 1)
    })
    .await?;
    consumer.stop().await?;

    assert_eq!(finished.load(Ordering::SeqCst), 1, "handler ran to the end");
    assert_eq!(queue.set_size(QueueName::Chat, "done").await?, 1, "acked");
    assert_eq!(queue.list_len(QueueName::Chat, "active").await?, 0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_deadline_hands_unfinished_jobs_back() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let mut config = queue.config();
    config.shutdown_grace = Duration::from_millis(200);
    let worker_name = config.worker_name.clone();
    let stuck = {
        let calls = calls.clone();
        move |job: RunJob| {
            let calls = calls.clone();
            async move {
                calls.record(&job.run_id);
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    };
    let consumer = Consumer::start(config, stuck);

    queue.push(QueueName::Chat, "run_stuck").await?;
    eventually(Duration::from_secs(5), "the job to start", || async {
        Ok(calls.total() == 1)
    })
    .await?;
    let stopping = Instant::now();
    consumer.stop().await?;
    assert!(
        stopping.elapsed() < Duration::from_secs(2),
        "bounded by the grace period"
    );

    assert_eq!(
        queue.list_len(QueueName::Chat, "active").await?,
        1,
        "handed back"
    );
    let in_flight = format!("inflight:{worker_name}");
    assert_eq!(queue.set_size(QueueName::Chat, &in_flight).await?, 0);
    let registered: Option<f64> = queue
        .redis
        .clone()
        .zscore(queue.key(QueueName::Chat, "workers"), &worker_name)
        .await?;
    assert_eq!(registered, None, "worker deregistered");

    let next = Calls::default();
    let consumer = Consumer::start(queue.config(), recording(&next));
    eventually(
        Duration::from_secs(5),
        "another worker to finish it",
        || async { Ok(queue.set_size(QueueName::Chat, "done").await? == 1) },
    )
    .await?;
    consumer.stop().await?;
    assert_eq!(next.count("run_stuck"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_of_a_killed_worker_are_recovered_by_another() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let fast_orphans = |mut config: ConsumerConfig| {
        config.heartbeat_interval = Duration::from_secs(1);
        config.missed_heartbeats = 2;
        config
    };
    let calls = Calls::default();
    let stuck = {
        let calls = calls.clone();
        move |job: RunJob| {
            let calls = calls.clone();
            async move {
                calls.record(&job.run_id);
                std::future::pending::<()>().await;
                Ok(())
            }
        }
    };
    let doomed = Consumer::start(fast_orphans(queue.config()), stuck);
    queue.push(QueueName::Chat, "run_orphan").await?;
    eventually(Duration::from_secs(5), "the job to start", || async {
        Ok(calls.total() == 1)
    })
    .await?;
    // Like `kill -9`: no drain, no hand-back, the heartbeat just stops.
    doomed.task.abort();
    ensure!(doomed.task.await.is_err_and(|e| e.is_cancelled()));

    let rescuer = Calls::default();
    let killed = Instant::now();
    let consumer = Consumer::start(fast_orphans(queue.config()), recording(&rescuer));
    eventually(
        Duration::from_secs(10),
        "another worker to finish it",
        || async { Ok(queue.set_size(QueueName::Chat, "done").await? == 1) },
    )
    .await?;
    println!("recovered {:?} after the kill", killed.elapsed());
    consumer.stop().await?;
    assert_eq!(rescuer.count("run_orphan"), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_is_restarted_after_a_redis_error() -> anyhow::Result<()> {
    let queue = TestQueue::new().await?;
    let calls = Calls::default();
    let config = queue.config();
    let worker_name = config.worker_name.clone();
    let metrics = Arc::clone(&config.metrics);
    let consumer = Consumer::start(config, recording(&calls));

    queue.push(QueueName::Chat, "run_before").await?;
    eventually(Duration::from_secs(5), "the first job", || async {
        Ok(queue.set_size(QueueName::Chat, "done").await? == 1)
    })
    .await?;
    // Deregistering the worker behind its back makes its next fetch script fail, which stops
    // an apalis-redis worker for good unless something restarts it.
    let _: () = queue
        .redis
        .clone()
        .zrem(queue.key(QueueName::Chat, "workers"), &worker_name)
        .await?;
    queue.push(QueueName::Chat, "run_after").await?;
    eventually(
        Duration::from_secs(10),
        "the job after the error",
        || async { Ok(queue.set_size(QueueName::Chat, "done").await? == 2) },
    )
    .await?;
    consumer.stop().await?;

    assert!(
        metrics.snapshot().worker_restarts >= 1,
        "the worker was restarted"
    );
    assert_eq!(calls.count("run_before"), 1);
    assert_eq!(calls.count("run_after"), 1);
    Ok(())
}
