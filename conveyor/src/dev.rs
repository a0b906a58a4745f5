//! `conveyor dev`: the whole service in one process on one SQLite file.
//!
//! The same API, SSE events, resume semantics, web page, agent loop and task tools as the
//! distributed deployment, with the backends swapped for in-process ones:
//!
//! | distributed | embedded |
//! | --- | --- |
//! | Postgres | the SQLite file (WAL) |
//! | apalis queue in Redis | in-process queues; the `runs` table in the same file is the durable record |
//! | Redis Streams + pub/sub | the file's `event_buffer` table + in-process fan-out |
//! | `conveyor-mcp` on Postgres | `conveyor mcp` on the same file, spawned as a child |
//! | Redis rate-limit counters | in-process counters |
//!
//! A restart resumes what the last process left: runs still `queued` are queued again, runs
//! that were `running` are taken over from their journal (no tool call repeats) or, when a
//! cancel was requested that the last process did not live to carry out, end `cancelled`; a
//! client resuming with `Last-Event-ID` replays the buffer written before the restart,
//! gap-free.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf};

use conveyor_api::{ApiBackends, limits::Limits, metrics::ApiMetrics};
use conveyor_shared::{
    backends::Backends,
    config::{ApiConfig, ConfigError, Env, ProcessEnv, WorkerConfig},
    db::{CommitMode, Db},
    events::{EventBus, EventHub},
    llm::LlmLimiter,
    queue::{JobProducer, LocalQueue, QueueName, RunJob},
    store::runs,
};
use conveyor_worker::{WorkerOptions, mcp::ServerSpec};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// `conveyor dev`'s flags.
#[derive(Debug, clap::Args)]
pub struct DevArgs {
    /// Answer with a built-in scripted model instead of a real LLM, so that the page and the
    /// task tools can be tried at once ("add buy milk", "list my tasks", "complete 1").
    #[arg(long)]
    pub demo: bool,
    /// The SQLite file that holds everything: conversations, runs, the queue, the event
    /// buffer and the tasks (created if missing).
    #[arg(long, env = "CONVEYOR_DEV_DB", default_value = "conveyor-dev.db")]
    pub db: PathBuf,
    /// Where the API and the web page listen.
    #[arg(long, env = "API_ADDR", default_value = "127.0.0.1:8080")]
    pub addr: SocketAddr,
    /// Runs executed at once.
    #[arg(long, env = "WORKER_CONCURRENCY", default_value_t = 8)]
    pub concurrency: usize,
}

/// Why `conveyor dev` could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    #[error(
        "{0}\n\nconveyor dev needs a model. Set the key (or LLM_PROVIDER=ollama for a local \
         Ollama), or try Conveyor at once with the built-in scripted model:\n\n    conveyor dev --demo\n"
    )]
    NoModel(ConfigError),
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot start the demo model: {0}")]
    Demo(std::io::Error),
    #[error(
        "another conveyor dev is running on {0} (one process per file: its runs would be taken \
         over twice); stop it or pick another --db"
    )]
    InUse(PathBuf),
    #[error("cannot lock {path}: {source}")]
    Lock {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] conveyor_shared::db::DbError),
    #[error("database: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("cannot listen on {addr} (--addr / API_ADDR): {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Api(#[from] conveyor_api::ApiStartError),
    #[error(transparent)]
    Worker(#[from] conveyor_worker::WorkerError),
    #[error(transparent)]
    Queue(#[from] conveyor_shared::queue::QueueError),
}

/// The process environment with the embedded mode's settings laid over it.
struct DevEnv {
    set: HashMap<&'static str, String>,
}

impl Env for DevEnv {
    fn get(&self, key: &str) -> Option<String> {
        self.set.get(key).cloned().or_else(|| ProcessEnv.get(key))
    }
}

/// The model the demo answers with.
const DEMO_MODEL: &str = "conveyor-demo";

/// Runs until SIGTERM or ctrl-c.
pub async fn run(args: DevArgs) -> Result<(), DevError> {
    let _ = ProcessEnv::load();
    conveyor_shared::shutdown::run_until_signal(|shutdown| serve(args, shutdown)).await
}

/// Serves until `shutdown` is cancelled.
pub async fn serve(args: DevArgs, shutdown: CancellationToken) -> Result<(), DevError> {
    // Held for the life of the process: at start-up every `running` run is taken to be an
    // orphan of the last process, which is only true when no other process uses the file.
    let _lock = lock_file(&args.db)?;
    let database_url = format!("sqlite:{}", args.db.display());
    let mut env = DevEnv {
        set: HashMap::from([
            ("DATABASE_URL", database_url.clone()),
            ("API_ADDR", args.addr.to_string()),
        ]),
    };
    let _demo = if args.demo {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(DevError::Demo)?;
        let config = conveyor_fake_llm::FakeLlmConfig {
            models: vec![DEMO_MODEL.to_owned()],
            ..conveyor_fake_llm::FakeLlmConfig::demo()
        };
        let model =
            conveyor_fake_llm::start_on(listener, config, &shutdown).map_err(DevError::Demo)?;
        env.set.extend([
            ("LLM_PROVIDER", "openai-compatible".to_owned()),
            ("LLM_BASE_URL", model.base_url()),
            ("LLM_MODEL", DEMO_MODEL.to_owned()),
            ("LLM_API_KEY", "demo".to_owned()),
        ]);
        Some(model)
    } else {
        None
    };
    let api_config = ApiConfig::from_env(&env)?;
    let worker_config = match WorkerConfig::from_env(&env) {
        Err(ConfigError::Missing { var, hint }) if var.ends_with("API_KEY") => {
            return Err(DevError::NoModel(ConfigError::Missing { var, hint }));
        }
        other => other?,
    };
    if worker_config.llm_limits.requests_per_minute.is_some()
        || worker_config.llm_limits.max_concurrent.is_some()
    {
        tracing::warn!("LLM_RATE_LIMIT_RPM and LLM_MAX_CONCURRENT are not applied by conveyor dev");
    }

    let db = Db::connect(&database_url, 8, CommitMode::Synchronous).await?;
    let Db::Sqlite(pool) = &db else {
        unreachable!("conveyor dev opens a sqlite: URL")
    };
    let released = runs::release_all_running(pool).await?;
    if released > 0 {
        tracing::info!(
            runs = released,
            "resuming runs interrupted by the last stop"
        );
    }

    let tracker = TaskTracker::new();
    let streams_stop = CancellationToken::new();
    let hub = EventHub::local(&tracker, streams_stop.clone());
    let bus = EventBus::local(
        pool.clone(),
        hub.clone(),
        api_config.common.event_stream_ttl,
    );
    let producer = JobProducer::local(LocalQueue::default());
    let metrics = ApiMetrics::new();
    let limits = Limits::local(
        api_config.rate_limit_per_minute,
        api_config.max_sse_streams_per_user,
        metrics.sse_streams.clone(),
    );
    requeue_unfinished(&db, &producer).await?;

    let listener = TcpListener::bind(args.addr)
        .await
        .map_err(|source| DevError::Bind {
            addr: args.addr,
            source,
        })?;
    let backends = Backends { db, bus, producer };
    // The bundled tools are this executable's `mcp` subcommand on the same file; a servers
    // file, when given, replaces them as it does for a worker.
    let servers = match worker_config.mcp_servers_file.as_deref() {
        Some(file) => conveyor_worker::mcp::load_servers(Some(file))
            .map_err(conveyor_worker::WorkerError::from)?,
        None => vec![ServerSpec::bundled(
            std::env::current_exe().map_or_else(|_| "conveyor".into(), |p| p.display().to_string()),
            vec!["mcp".to_owned()],
            [("DATABASE_URL".to_owned(), database_url)].into(),
        )],
    };
    println!(
        "Conveyor dev: http://{}/ (data in {}{})",
        args.addr,
        args.db.display(),
        if args.demo { ", demo model" } else { "" }
    );
    // The worker pool and the API run side by side in this task; whichever stops first (the
    // signal, or a failure) stops the other.
    let worker = async {
        let result = conveyor_worker::run_with(
            worker_config,
            WorkerOptions {
                queues: QueueName::ALL.to_vec(),
                concurrency: args.concurrency,
            },
            backends.clone(),
            LlmLimiter::unlimited(),
            servers,
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        result
    };
    let api = async {
        let result = conveyor_api::serve_with(
            api_config,
            listener,
            ApiBackends {
                backends: backends.clone(),
                hub,
                limits,
                metrics,
            },
            tracker,
            streams_stop,
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        result
    };
    let (api, worker) = tokio::join!(api, worker);
    api?;
    worker?;
    Ok(())
}

/// Queues again every run the last process left unfinished (the in-process queues start empty).
async fn requeue_unfinished(db: &Db, producer: &JobProducer) -> Result<(), DevError> {
    let chat = runs::due_for_sweep(db, 0.0, 0.0, i64::MAX).await?;
    let batch = runs::queued_batch_runs(db, 0.0, i64::MAX).await?;
    for (run_id, batch_id) in chat {
        let queue = if batch_id.is_some() {
            QueueName::Batch
        } else {
            QueueName::Chat
        };
        producer.push(queue, RunJob::new(run_id)).await?;
    }
    for run_id in batch {
        producer.push(QueueName::Batch, RunJob::new(run_id)).await?;
    }
    Ok(())
}

/// Takes the exclusive lock of `{db}.lock` (released by the OS when the process ends, even
/// when it is killed).
fn lock_file(db: &std::path::Path) -> Result<std::fs::File, DevError> {
    let mut path = db.as_os_str().to_owned();
    path.push(".lock");
    let path = PathBuf::from(path);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|source| DevError::Lock {
            path: path.clone(),
            source,
        })?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DevError::InUse(db.to_owned())),
        Err(std::fs::TryLockError::Error(source)) => Err(DevError::Lock { path, source }),
    }
}
