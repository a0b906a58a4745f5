//! Starts a real Conveyor — API, workers and the fake LLM as separate processes — against
//! the machine's Postgres and Redis, isolated per test: a fresh database and a fresh Redis key
//! prefix. Everything is stopped (and the database dropped) when the [`Stack`] is dropped.
//!
//! A stack runs in one of two [`Mode`]s: distributed (the above) or embedded, one
//! `conveyor dev` process on a fresh SQLite file beside the same fake LLM, which the test may
//! kill and start again on the same file ([`Stack::kill_embedded`],
//! [`Stack::restart_embedded`]). [`both_modes!`](crate::both_modes) runs one test body in
//! each; [`Stack::sql`] reads either database.
//!
//! For outage tests a stack can instead get a Redis of its own ([`RedisMode::Private`], a
//! `redis-server` the test may kill and restart) and reach Postgres through a proxy that can
//! cut every connection ([`Backends::postgres_proxy`]); faults are only ever injected there,
//! never into the machine's shared services.

mod db;
mod metrics;
mod modes;
mod pg_proxy;
mod private_redis;
mod sse;

use std::{
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::Stdio,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use serde_json::Value;
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

pub use db::{Bind, Column, Row, TestDb, TestPool, TestQuery};
pub use metrics::Scrape;
pub use modes::Mode;
pub use pg_proxy::PgProxy;
pub use private_redis::PrivateRedis;
pub use sse::{SseEvent, SseStream, assert_gap_free};

/// Where the machine's services are; `TEST_DATABASE_URL` / `TEST_REDIS_URL` override.
pub fn admin_database_url() -> String {
    std::env::var("TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

pub fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
}

/// The directory holding the workspace's built binaries: `CONVEYOR_BIN_DIR` when set (for a
/// target directory that several checkouts build into, whose binaries overwrite each other),
/// else next to this test executable.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("CONVEYOR_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

fn binary(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(
        path.exists(),
        "{} is missing: build the workspace binaries first (cargo build --workspace --bins, or run the tests with cargo test --workspace)",
        path.display()
    );
    path
}

fn free_addr() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    listener.local_addr().expect("local addr")
}

/// How to start a stack.
#[derive(Debug, Clone)]
pub struct StackOptions {
    /// Distributed processes on Postgres and Redis, or one embedded process on SQLite.
    pub mode: Mode,
    /// Worker processes (distributed mode). The embedded mode's worker pool is part of its one
    /// process; there this is not used (see [`Self::with_unfinished_runs`]).
    pub workers: usize,
    /// Runs in flight per worker process, or in the embedded process (`--concurrency`).
    pub worker_concurrency: usize,
    /// Extra flags for the fake LLM (e.g. `--ttft-ms 50`).
    pub fake_llm_args: Vec<String>,
    /// Extra environment for the API and workers, or the embedded process.
    pub env: Vec<(String, String)>,
    /// Discard the services' logs (unless `CONVEYOR_TEST_LOGS` is set).
    pub quiet: bool,
    /// Append the API's and workers' logs (stderr) to this file instead.
    pub log_file: Option<PathBuf>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            mode: Mode::default(),
            workers: 2,
            worker_concurrency: 8,
            fake_llm_args: Vec::new(),
            env: Vec::new(),
            quiet: std::env::var_os("CONVEYOR_TEST_LOGS").is_none(),
            log_file: None,
        }
    }
}

impl StackOptions {
    /// The default options in `mode`.
    pub fn in_mode(mode: Mode) -> Self {
        Self {
            mode,
            ..Self::default()
        }
    }

    /// Turns are accepted but no run ever finishes, for tests of what the API does with
    /// unfinished runs: no worker process in distributed mode (runs stay `queued`); in
    /// embedded mode, whose worker pool cannot be left out, a model that never answers (runs
    /// stay `running`).
    #[must_use]
    pub fn with_unfinished_runs(mut self) -> Self {
        match self.mode {
            Mode::Distributed => self.workers = 0,
            Mode::Embedded => self
                .fake_llm_args
                .extend(["--ttft-ms".to_owned(), "3600000".to_owned()]),
        }
        self
    }
}

/// Which Redis a stack uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RedisMode {
    /// The machine's Redis (`TEST_REDIS_URL`), under the stack's own key prefix.
    #[default]
    Shared,
    /// A `redis-server` of the stack's own ([`Stack::redis_server`]) that the test may kill and
    /// restart; `appendonly` is the production setting (`--appendonly yes --appendfsync
    /// always`), without it a restart loses every key.
    Private { appendonly: bool },
}

/// Where a stack's services find Redis and Postgres (see [`Stack::start_with`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Backends {
    pub redis: RedisMode,
    /// Every service reaches Postgres through a [`PgProxy`] ([`Stack::postgres_proxy`]), so
    /// the test can cut their connections. The test's own pool ([`TestDb::pool`]) connects
    /// directly.
    pub postgres_proxy: bool,
}

/// A running Conveyor.
pub struct Stack {
    pub db: TestDb,
    pub redis_prefix: String,
    pub api_url: String,
    pub llm_url: String,
    pub http: reqwest::Client,
    /// The stack's own Redis, with [`RedisMode::Private`].
    pub redis_server: Option<PrivateRedis>,
    /// The proxy between the services and Postgres, with [`Backends::postgres_proxy`].
    pub postgres_proxy: Option<PgProxy>,
    /// The Redis and Postgres URLs the services were given.
    services_redis_url: String,
    services_database_url: String,
    /// The API process, or in embedded mode the `conveyor dev` process.
    api: Child,
    api_addr: SocketAddr,
    /// More API replicas on the same backends ([`Stack::add_api`]).
    more_apis: Vec<Child>,
    workers: Vec<Child>,
    /// Each worker's metrics server (`http://127.0.0.1:PORT`), in start order.
    pub worker_metrics_urls: Vec<String>,
    fake_llm: Child,
    options: StackOptions,
}

impl Stack {
    /// A stack on the machine's Redis and Postgres.
    pub async fn start(options: StackOptions) -> anyhow::Result<Self> {
        Self::start_with(options, Backends::default()).await
    }

    /// A stack whose services reach Redis and Postgres as `backends` says.
    pub async fn start_with(options: StackOptions, backends: Backends) -> anyhow::Result<Self> {
        if options.mode == Mode::Embedded {
            anyhow::ensure!(
                backends == Backends::default(),
                "the embedded mode has no Redis or Postgres to reach differently: {backends:?}"
            );
            return Self::start_embedded(options).await;
        }
        let db = TestDb::create("conveyor_e2e").await?;
        let redis_prefix = format!("test:{}", ulid::Ulid::new().to_string().to_lowercase());
        let redis_server = match backends.redis {
            RedisMode::Shared => None,
            RedisMode::Private { appendonly } => {
                Some(PrivateRedis::start(appendonly, options.quiet).await?)
            }
        };
        let services_redis_url = redis_server
            .as_ref()
            .map_or_else(redis_url, PrivateRedis::url);
        let postgres_proxy = if backends.postgres_proxy {
            Some(PgProxy::start(postgres_addr(&db.url).await?)?)
        } else {
            None
        };
        let services_database_url = match &postgres_proxy {
            Some(proxy) => proxy.rewrite_url(&db.url)?,
            None => db.url.clone(),
        };
        let services = Services {
            database_url: &services_database_url,
            redis_url: &services_redis_url,
            redis_prefix: &redis_prefix,
        };

        let (fake_llm, llm_url) = start_fake_llm(&options).await?;

        let api_addr = free_addr();
        let mut stack = Self {
            api: spawn_api(&options, &services, api_addr)?,
            api_addr,
            more_apis: Vec::new(),
            workers: Vec::new(),
            worker_metrics_urls: Vec::new(),
            fake_llm,
            db,
            redis_prefix,
            redis_server,
            postgres_proxy,
            services_redis_url,
            services_database_url,
            api_url: format!("http://{api_addr}"),
            llm_url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_mins(1))
                .build()?,
            options,
        };
        stack.wait_healthy().await?;
        for _ in 0..stack.options.workers {
            stack.add_worker()?;
        }
        Ok(stack)
    }

    /// One `conveyor dev` process on a fresh SQLite file, with the fake LLM.
    async fn start_embedded(options: StackOptions) -> anyhow::Result<Self> {
        let db = TestDb::create_file("conveyor-e2e")?;
        let (fake_llm, llm_url) = start_fake_llm(&options).await?;
        let api_addr = free_addr();
        let mut stack = Self {
            api: spawn_embedded(&options, &db, api_addr, &llm_url)?,
            api_addr,
            more_apis: Vec::new(),
            workers: Vec::new(),
            worker_metrics_urls: Vec::new(),
            fake_llm,
            db,
            // Nothing is stored under it; kept so that the field means the same in both modes.
            redis_prefix: String::new(),
            redis_server: None,
            postgres_proxy: None,
            services_redis_url: String::new(),
            services_database_url: String::new(),
            api_url: format!("http://{api_addr}"),
            llm_url,
            http: reqwest::Client::builder()
                .timeout(Duration::from_mins(1))
                .build()?,
            options,
        };
        stack.wait_embedded_ready().await?;
        Ok(stack)
    }

    /// The mode the stack runs in.
    pub fn mode(&self) -> Mode {
        self.options.mode
    }

    /// Fails, naming `what`, unless the stack is distributed: the helpers for worker
    /// processes, API replicas, Redis and Postgres have nothing to act on in embedded mode.
    fn distributed_only(&self, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.options.mode == Mode::Distributed,
            "{what} needs a distributed stack: the embedded mode is one process on a SQLite \
             file, with no worker processes, Redis or Postgres of its own"
        );
        Ok(())
    }

    fn embedded_only(&self, what: &str) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.options.mode == Mode::Embedded,
            "{what} needs an embedded stack (StackOptions::mode = Mode::Embedded)"
        );
        Ok(())
    }

    /// The test's view of the stack's database, Postgres or SQLite (see [`TestPool`]).
    pub async fn sql(&self) -> anyhow::Result<TestPool> {
        self.db.sql().await
    }

    /// Kills the `conveyor dev` process with SIGKILL (no cleanup, like a crash) and waits
    /// until it is gone. Its SQLite file stays for [`Self::restart_embedded`].
    pub async fn kill_embedded(&mut self) -> anyhow::Result<()> {
        self.embedded_only("kill_embedded")?;
        self.api.kill().await?;
        Ok(())
    }

    /// How the `conveyor dev` process ended (a staged crash, say), or `None` while it runs.
    pub fn embedded_exit_status(&mut self) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.embedded_only("embedded_exit_status")?;
        Ok(self.api.try_wait()?)
    }

    /// Starts `conveyor dev` again on the same file and address once the last process has
    /// ended ([`Self::kill_embedded`], or a crash), and waits until it is ready.
    pub async fn restart_embedded(&mut self) -> anyhow::Result<()> {
        self.restart_embedded_with(|_| {}).await
    }

    /// [`Self::restart_embedded`] with the options changed first (to drop a fault injection
    /// from the environment, say); the change stays for later restarts.
    pub async fn restart_embedded_with(
        &mut self,
        change: impl FnOnce(&mut StackOptions),
    ) -> anyhow::Result<()> {
        self.embedded_only("restart_embedded")?;
        anyhow::ensure!(
            self.api.try_wait()?.is_some(),
            "conveyor dev is still running: kill_embedded first"
        );
        change(&mut self.options);
        self.api = spawn_embedded(&self.options, &self.db, self.api_addr, &self.llm_url)?;
        self.wait_embedded_ready().await
    }

    /// Waits until `conveyor dev` answers `/readyz`. If it exits first (its address was not
    /// free yet after a kill, say), it is started again until the deadline.
    async fn wait_embedded_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(response) = self.http.get(self.url("/readyz")).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if let Some(status) = self.api.try_wait()? {
                if Instant::now() > deadline {
                    bail!("conveyor dev exited before it was ready: {status}");
                }
                self.api = spawn_embedded(&self.options, &self.db, self.api_addr, &self.llm_url)?;
            }
            if Instant::now() > deadline {
                bail!("conveyor dev at {} did not become ready", self.api_url);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Where this stack's services find Postgres and Redis.
    fn services(&self) -> Services<'_> {
        Services {
            database_url: &self.services_database_url,
            redis_url: &self.services_redis_url,
            redis_prefix: &self.redis_prefix,
        }
    }

    fn common_env(&self, cmd: &mut Command) {
        common_env(cmd, &self.options, &self.services());
    }

    /// The Redis URL the services use (the private server's, or the machine's).
    ///
    /// # Panics
    /// In embedded mode, which has no Redis.
    pub fn redis_url(&self) -> &str {
        if let Err(error) = self.distributed_only("redis_url") {
            panic!("{error}");
        }
        &self.services_redis_url
    }

    /// Starts one more worker process.
    pub fn add_worker(&mut self) -> anyhow::Result<()> {
        self.add_worker_with_env(&[]).map(drop)
    }

    /// Starts one more worker process with `env` on top of the stack's environment (a fault
    /// injection for this worker only, say); returns its index.
    pub fn add_worker_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<usize> {
        self.distributed_only("add_worker")?;
        let mut cmd = Command::new(binary("conveyor-worker"));
        self.common_env(&mut cmd);
        cmd.envs(env.iter().copied());
        let metrics_addr = free_addr();
        cmd.env("WORKER_METRICS_ADDR", metrics_addr.to_string());
        self.worker_metrics_urls
            .push(format!("http://{metrics_addr}"));
        cmd.args([
            "--concurrency",
            &self.options.worker_concurrency.to_string(),
        ]);
        llm_env(&mut cmd, &self.llm_url);
        self.workers
            .push(cmd.spawn().context("spawn conveyor-worker")?);
        Ok(self.workers.len() - 1)
    }

    /// How the worker at `index` ended, or `None` while it runs.
    pub fn worker_exit_status(
        &mut self,
        index: usize,
    ) -> anyhow::Result<Option<std::process::ExitStatus>> {
        self.distributed_only("worker_exit_status")?;
        Ok(self.workers[index].try_wait()?)
    }

    /// The API process's id (in embedded mode, `conveyor dev`'s), for reading its memory and
    /// CPU time from `/proc` (benchmarks).
    pub fn api_pid(&self) -> Option<u32> {
        self.api.id()
    }

    /// The worker processes' ids (those still running).
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(Child::id).collect()
    }

    /// The fake LLM process's id.
    pub fn fake_llm_pid(&self) -> Option<u32> {
        self.fake_llm.id()
    }

    /// Kills a worker with SIGKILL (no cleanup).
    pub async fn kill_worker(&mut self, index: usize) -> anyhow::Result<()> {
        self.distributed_only("kill_worker")?;
        self.workers[index].kill().await?;
        Ok(())
    }

    /// Kills (SIGKILL) the worker process whose pid is `pid`; `false` if none has it.
    pub async fn kill_worker_with_pid(&mut self, pid: u32) -> anyhow::Result<bool> {
        self.distributed_only("kill_worker_with_pid")?;
        for worker in &mut self.workers {
            if worker.id() == Some(pid) {
                worker.kill().await?;
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The pid of the worker holding `run_id` (worker names are `host:pid:random`); in
    /// embedded mode, `conveyor dev`'s.
    pub async fn holder_pid(&self, run_id: &str) -> anyhow::Result<Option<u32>> {
        let worker: Option<String> = self
            .sql()
            .await?
            .query("SELECT worker FROM runs WHERE id = $1")
            .bind(run_id)
            .scalar()
            .await?;
        Ok(worker.and_then(|w| w.split(':').nth(1).and_then(|pid| pid.parse().ok())))
    }

    async fn wait_healthy(&self) -> anyhow::Result<()> {
        self.wait_ready(&self.api_url).await
    }

    async fn wait_ready(&self, api_url: &str) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(response) = self.http.get(format!("{api_url}/readyz")).send().await
                && response.status().is_success()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the API at {api_url} did not become ready");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Starts another API process on the same Postgres and Redis (a second replica behind a
    /// load balancer, say) and returns its base URL once it is ready.
    pub async fn add_api(&mut self) -> anyhow::Result<String> {
        self.distributed_only("add_api")?;
        let addr = free_addr();
        let api = spawn_api(&self.options, &self.services(), addr)?;
        self.more_apis.push(api);
        let url = format!("http://{addr}");
        self.wait_ready(&url).await?;
        Ok(url)
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_url)
    }

    /// `POST /api/{user}/chat` in JSON mode; returns the status and body.
    pub async fn post_chat(&self, user: &str, body: Value) -> anyhow::Result<(u16, Value)> {
        let response = self
            .http
            .post(self.url(&format!("/api/{user}/chat")))
            .header("accept", "application/json")
            .json(&body)
            .send()
            .await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// Opens an SSE stream with an optional `Last-Event-ID`.
    pub async fn open_sse(
        &self,
        path: &str,
        last_event_id: Option<u64>,
    ) -> anyhow::Result<SseStream> {
        let mut request = self
            .http
            .get(self.url(path))
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        SseStream::open(request).await
    }

    /// Reads a run's whole event stream from the start.
    pub async fn run_events(&self, user: &str, run_id: &str) -> anyhow::Result<Vec<SseEvent>> {
        let mut stream = self
            .open_sse(&format!("/api/{user}/runs/{run_id}/events"), None)
            .await?;
        stream.collect_until_terminal(Duration::from_secs(30)).await
    }

    /// Scrapes a `/metrics` endpoint: the API's (`None`; in embedded mode, `conveyor dev`'s)
    /// or a worker's (`Some(index)`).
    pub async fn scrape(&self, worker: Option<usize>) -> anyhow::Result<Scrape> {
        let base = match worker {
            None => self.api_url.as_str(),
            Some(index) => {
                self.distributed_only("scraping a worker")?;
                self.worker_metrics_urls[index].as_str()
            }
        };
        let response = self.http.get(format!("{base}/metrics")).send().await?;
        anyhow::ensure!(
            response.status().is_success(),
            "GET {base}/metrics answered {}",
            response.status()
        );
        Ok(Scrape::parse(&response.text().await?))
    }

    /// Scrapes every worker and adds their series up.
    pub async fn scrape_workers(&self) -> anyhow::Result<Vec<Scrape>> {
        let mut all = Vec::with_capacity(self.worker_metrics_urls.len());
        for index in 0..self.worker_metrics_urls.len() {
            all.push(self.scrape(Some(index)).await?);
        }
        Ok(all)
    }

    /// The fake LLM's counters (`GET /stats`).
    pub async fn llm_stats(&self) -> anyhow::Result<crate::fake_llm::FakeLlmStats> {
        let url = format!("{}/stats", self.llm_url.trim_end_matches("/v1"));
        Ok(self.http.get(url).send().await?.json().await?)
    }

    pub async fn get_json(&self, path: &str) -> anyhow::Result<(u16, Value)> {
        let response = self.http.get(self.url(path)).send().await?;
        let status = response.status().as_u16();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }
}

/// What the services are pointed at.
struct Services<'a> {
    database_url: &'a str,
    redis_url: &'a str,
    redis_prefix: &'a str,
}

fn common_env(cmd: &mut Command, options: &StackOptions, services: &Services<'_>) {
    cmd.env("DATABASE_URL", services.database_url)
        .env("REDIS_URL", services.redis_url)
        .env("REDIS_PREFIX", services.redis_prefix);
    process_env(cmd, options);
}

/// What every service process gets, in either mode: the log filter, the test's extra
/// environment, and where its output goes.
fn process_env(cmd: &mut Command, options: &StackOptions) {
    cmd.env(
        "RUST_LOG",
        std::env::var("CONVEYOR_TEST_LOGS").unwrap_or_else(|_| "warn".to_owned()),
    )
    .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
    .stdout(Stdio::null())
    .kill_on_drop(true);
    let log_file = options.log_file.as_ref().map(|path| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("open the services' log file")
    });
    if let Some(file) = log_file {
        cmd.stderr(file);
    } else if options.quiet {
        cmd.stderr(Stdio::null());
    }
}

/// Points a process's model at the fake LLM.
fn llm_env(cmd: &mut Command, llm_url: &str) {
    cmd.env("LLM_PROVIDER", "openai-compatible")
        .env("LLM_BASE_URL", llm_url)
        .env("LLM_MODEL", "fake")
        .env("LLM_API_KEY", "test-key");
}

/// Starts the fake LLM and returns it with its base URL.
async fn start_fake_llm(options: &StackOptions) -> anyhow::Result<(Child, String)> {
    let mut fake = Command::new(binary("fake-llm"));
    fake.args(["--addr", "127.0.0.1:0"])
        .args(&options.fake_llm_args)
        .stdout(Stdio::piped())
        .kill_on_drop(true);
    if options.quiet {
        fake.stderr(Stdio::null());
    }
    let mut fake_llm = fake.spawn().context("spawn fake-llm")?;
    let stdout = fake_llm.stdout.take().context("fake-llm stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    let first = tokio::time::timeout(Duration::from_secs(10), lines.next_line())
        .await
        .context("fake-llm did not start")??
        .unwrap_or_default();
    let llm_addr = first
        .strip_prefix("listening on ")
        .context("fake-llm's first line")?
        .trim()
        .to_owned();
    Ok((fake_llm, format!("http://{llm_addr}/v1")))
}

/// `conveyor dev` on the stack's file: the API's and the workers' environment, without
/// `DATABASE_URL`/`REDIS_URL` (the file is the flag).
fn spawn_embedded(
    options: &StackOptions,
    db: &TestDb,
    addr: SocketAddr,
    llm_url: &str,
) -> anyhow::Result<Child> {
    let path = db
        .sqlite_path()
        .context("an embedded stack's database is a file")?;
    let mut cmd = Command::new(binary("conveyor"));
    cmd.arg("dev")
        .arg("--db")
        .arg(&path)
        .args(["--addr", &addr.to_string()])
        .args(["--concurrency", &options.worker_concurrency.to_string()]);
    llm_env(&mut cmd, llm_url);
    process_env(&mut cmd, options);
    cmd.spawn().context("spawn conveyor dev")
}

fn spawn_api(
    options: &StackOptions,
    services: &Services<'_>,
    addr: SocketAddr,
) -> anyhow::Result<Child> {
    let mut cmd = Command::new(binary("conveyor-api"));
    common_env(&mut cmd, options, services);
    cmd.env("API_ADDR", addr.to_string());
    cmd.spawn().context("spawn conveyor-api")
}

impl Drop for Stack {
    fn drop(&mut self) {
        for child in self
            .workers
            .iter_mut()
            .chain(&mut self.more_apis)
            .chain([&mut self.api, &mut self.fake_llm])
        {
            let _ = child.start_kill();
        }
        if self.options.mode == Mode::Embedded {
            // The SQLite file goes away with `db`; there is no Redis.
            return;
        }
        if self.redis_server.is_some() {
            // The private server goes away with its directory; nothing to clean.
            return;
        }
        // Remove the test's Redis keys.
        let pattern = format!("{}:*", self.redis_prefix);
        let _ = std::thread::spawn(move || {
            let Ok(client) = redis::Client::open(redis_url()) else {
                return;
            };
            let Ok(mut conn) = client.get_connection() else {
                return;
            };
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(&pattern)
                .query(&mut conn)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<(), _> = redis::cmd("DEL").arg(keys).query(&mut conn);
            }
        })
        .join();
    }
}

/// The socket address of a `postgres://` URL's host (port 5432 unless it names one).
async fn postgres_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let authority = rest.split('/').next().unwrap_or_default();
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let host_port = if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5432")
    };
    tokio::net::lookup_host(&host_port)
        .await?
        .next()
        .with_context(|| format!("cannot resolve {host_port}"))
}

/// Polls `check` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(timeout: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
