//! Configuration, read once at start-up from the environment (and a `.env` file).
//!
//! Every variable is documented in the README's table. Parsing is strict: a value that is
//! present but invalid stops the process with a message naming the variable and what it
//! accepts, rather than running with a silent default. Parsing goes through [`Env`] so tests
//! can feed a map instead of mutating the process environment.

use std::{
    collections::HashMap, fmt, net::SocketAddr, path::PathBuf, str::FromStr, time::Duration,
};

use crate::llm::{LimitSettings, LlmSettings};

/// A configuration error; its message names the variable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("{var} is required{hint}")]
    Missing { var: String, hint: String },
    #[error("{var}={value:?} is invalid: expected {expected}")]
    Invalid {
        var: String,
        value: String,
        expected: String,
    },
}

/// Where configuration values come from.
pub trait Env {
    fn get(&self, key: &str) -> Option<String>;
}

/// The process environment; empty values count as unset.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl ProcessEnv {
    /// Loads `.env` (if present, never overriding real variables) and returns the environment.
    pub fn load() -> Self {
        // A missing .env file is the normal production case.
        let _ = dotenvy::dotenv();
        Self
    }
}

impl Env for ProcessEnv {
    fn get(&self, key: &str) -> Option<String> {
        std::env::var(key).ok().filter(|v| !v.trim().is_empty())
    }
}

impl<S: std::hash::BuildHasher> Env for HashMap<&str, &str, S> {
    fn get(&self, key: &str) -> Option<String> {
        HashMap::get(self, key)
            .map(|v| (*v).to_owned())
            .filter(|v| !v.trim().is_empty())
    }
}

/// Reads a required variable.
pub fn required(env: &dyn Env, var: &str) -> Result<String, ConfigError> {
    env.get(var).ok_or_else(|| ConfigError::Missing {
        var: var.to_owned(),
        hint: String::new(),
    })
}

/// Reads an optional variable parsed with `FromStr`, or `default` when unset.
pub fn parsed<T: FromStr>(
    env: &dyn Env,
    var: &str,
    default: T,
    expected: &str,
) -> Result<T, ConfigError> {
    match env.get(var) {
        None => Ok(default),
        Some(value) => value.trim().parse().map_err(|_| ConfigError::Invalid {
            var: var.to_owned(),
            value,
            expected: expected.to_owned(),
        }),
    }
}

/// Reads a duration given in whole seconds.
pub fn seconds(env: &dyn Env, var: &str, default: u64) -> Result<Duration, ConfigError> {
    parsed(env, var, default, "a whole number of seconds").map(Duration::from_secs)
}

/// Reads a duration given in milliseconds.
pub fn millis(env: &dyn Env, var: &str, default: u64) -> Result<Duration, ConfigError> {
    parsed(env, var, default, "a whole number of milliseconds").map(Duration::from_millis)
}

/// Checks a parsed number against its accepted range.
fn in_range<T: PartialOrd + ToString>(
    value: T,
    range: std::ops::RangeInclusive<T>,
    var: &str,
    expected: &str,
) -> Result<T, ConfigError> {
    if range.contains(&value) {
        Ok(value)
    } else {
        Err(ConfigError::Invalid {
            var: var.to_owned(),
            value: value.to_string(),
            expected: expected.to_owned(),
        })
    }
}

/// A URL or connection string that may embed a password; `Debug` hides it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(…)")
    }
}

/// What both the API and the worker need: where the data lives and how events are kept.
#[derive(Debug, Clone)]
pub struct CommonConfig {
    /// `DATABASE_URL`: Postgres, the source of truth.
    pub database_url: Secret,
    /// `REDIS_URL`: the queue, the event replay buffer and pub/sub.
    pub redis_url: Secret,
    /// `REDIS_PREFIX` (default `conveyor`): namespaces every Redis key, so deployments and
    /// tests can share a server.
    pub redis_prefix: String,
    /// `EVENT_STREAM_TTL_SECS` (default 3600): how long a finished run's replay buffer lives.
    pub event_stream_ttl: Duration,
    /// `DATABASE_POOL_SIZE` (default 10).
    pub database_pool_size: u32,
}

impl CommonConfig {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let redis_prefix = env
            .get("REDIS_PREFIX")
            .unwrap_or_else(|| "conveyor".to_owned());
        if redis_prefix.contains(char::is_whitespace) {
            return Err(ConfigError::Invalid {
                var: "REDIS_PREFIX".into(),
                value: redis_prefix,
                expected: "a key prefix without spaces".into(),
            });
        }
        Ok(Self {
            database_url: Secret::new(required(env, "DATABASE_URL")?),
            redis_url: Secret::new(
                env.get("REDIS_URL")
                    .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned()),
            ),
            redis_prefix,
            event_stream_ttl: seconds(env, "EVENT_STREAM_TTL_SECS", 3600)?,
            database_pool_size: parsed(env, "DATABASE_POOL_SIZE", 10, "a positive number")?,
        })
    }
}

/// The API process's configuration.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    pub common: CommonConfig,
    /// `API_ADDR` (default `127.0.0.1:8080`).
    pub addr: SocketAddr,
    /// `SWEEP_INTERVAL_SECS` (default 5): how often the API re-enqueues runs stuck in `queued`.
    pub sweep_interval: Duration,
    /// `SSE_KEEPALIVE_SECS` (default 15).
    pub sse_keepalive: Duration,
    /// `MAX_MESSAGE_CHARS` (default 32000).
    pub max_message_chars: usize,
    pub auth: AuthConfig,
    /// `RATE_LIMIT_PER_MINUTE` (default 600; 0 = off): requests per user per minute, counted
    /// in Redis so the limit holds across API replicas.
    pub rate_limit_per_minute: u32,
    /// `MAX_ACTIVE_RUNS_PER_USER` (default 20; 0 = off): unfinished runs a user may have.
    pub max_active_runs_per_user: u32,
    /// `MAX_SSE_STREAMS_PER_USER` (default 50; 0 = off): open event streams per user and API
    /// process.
    pub max_sse_streams_per_user: u32,
    /// `REQUEST_BODY_TIMEOUT_SECS` (default 30): how long a client may take to send a request
    /// body before it gets `400` (the body was not received in time).
    pub request_body_timeout: Duration,
    /// `CORS_ALLOWED_ORIGINS`: comma-separated origins allowed to call the API from a browser
    /// (none by default; the bundled page is same-origin).
    pub cors_allowed_origins: Vec<String>,
    /// `MAX_BATCH_LINES` (default 50000): prompts in one batch upload.
    pub max_batch_lines: usize,
    /// `MAX_BATCH_BYTES` (default 33554432, 32 MiB): size of one batch upload.
    pub max_batch_bytes: usize,
    /// `MAX_OPEN_BATCHES_PER_USER` (default 10; 0 = off): batches a user may have in progress.
    pub max_open_batches_per_user: u32,
}

/// How API requests are authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthKeys {
    /// No authentication: only allowed on a loopback address, or with
    /// `CONVEYOR_INSECURE_NO_AUTH=1`.
    None,
    /// `JWT_SECRET`: HS256 tokens signed with a shared secret.
    Secret(Secret),
    /// `JWT_JWKS_URL`: RS256/ES256 tokens verified with keys fetched from a JWKS endpoint.
    JwksUrl(String),
    /// `JWT_JWKS_FILE`: the same, with the key set read from a file at start-up.
    JwksFile(PathBuf),
}

/// Token verification settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthConfig {
    pub keys: AuthKeys,
    /// `JWT_ISSUER`: required `iss`, if set.
    pub issuer: Option<String>,
    /// `JWT_AUDIENCE`: required `aud`, if set.
    pub audience: Option<String>,
    /// `JWT_LEEWAY_SECS` (default 30): clock skew allowed on `exp` and `nbf`.
    pub leeway_secs: u64,
}

impl AuthConfig {
    fn from_env(env: &dyn Env, addr: SocketAddr) -> Result<Self, ConfigError> {
        let configured = [
            env.get("JWT_SECRET")
                .map(|s| AuthKeys::Secret(Secret::new(s))),
            env.get("JWT_JWKS_URL").map(AuthKeys::JwksUrl),
            env.get("JWT_JWKS_FILE")
                .map(|p| AuthKeys::JwksFile(PathBuf::from(p))),
        ];
        let mut configured = configured.into_iter().flatten();
        let keys = configured.next().unwrap_or(AuthKeys::None);
        if configured.next().is_some() {
            return Err(ConfigError::Invalid {
                var: "JWT_SECRET/JWT_JWKS_URL/JWT_JWKS_FILE".into(),
                value: "several".into(),
                expected: "exactly one of them".into(),
            });
        }
        let insecure = match env.get("CONVEYOR_INSECURE_NO_AUTH").as_deref() {
            None | Some("0" | "false") => false,
            Some("1" | "true") => true,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    var: "CONVEYOR_INSECURE_NO_AUTH".into(),
                    value: other.into(),
                    expected: "1 or 0".into(),
                });
            }
        };
        if keys == AuthKeys::None && !addr.ip().is_loopback() && !insecure {
            return Err(ConfigError::Missing {
                var: "JWT_SECRET".into(),
                hint: format!(
                    " (or JWT_JWKS_URL / JWT_JWKS_FILE) to serve on {addr}, a non-loopback API_ADDR; \
                     set CONVEYOR_INSECURE_NO_AUTH=1 to run without authentication anyway"
                ),
            });
        }
        Ok(Self {
            keys,
            issuer: env.get("JWT_ISSUER"),
            audience: env.get("JWT_AUDIENCE"),
            leeway_secs: parsed(env, "JWT_LEEWAY_SECS", 30, "a whole number of seconds")?,
        })
    }
}

impl ApiConfig {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let addr = parsed(
            env,
            "API_ADDR",
            SocketAddr::from(([127, 0, 0, 1], 8080)),
            "an address like 127.0.0.1:8080",
        )?;
        Ok(Self {
            common: CommonConfig::from_env(env)?,
            auth: AuthConfig::from_env(env, addr)?,
            addr,
            sweep_interval: seconds(env, "SWEEP_INTERVAL_SECS", 5)?,
            sse_keepalive: seconds(env, "SSE_KEEPALIVE_SECS", 15)?,
            max_message_chars: parsed(env, "MAX_MESSAGE_CHARS", 32_000, "a positive number")?,
            rate_limit_per_minute: parsed(
                env,
                "RATE_LIMIT_PER_MINUTE",
                600,
                "a whole number (0 = off)",
            )?,
            max_active_runs_per_user: parsed(
                env,
                "MAX_ACTIVE_RUNS_PER_USER",
                20,
                "a whole number (0 = off)",
            )?,
            max_sse_streams_per_user: parsed(
                env,
                "MAX_SSE_STREAMS_PER_USER",
                50,
                "a whole number (0 = off)",
            )?,
            request_body_timeout: seconds(env, "REQUEST_BODY_TIMEOUT_SECS", 30)?,
            cors_allowed_origins: env
                .get("CORS_ALLOWED_ORIGINS")
                .map(|v| {
                    v.split(',')
                        .map(|o| o.trim().to_owned())
                        .filter(|o| !o.is_empty())
                        .collect()
                })
                .unwrap_or_default(),
            max_batch_lines: parsed(env, "MAX_BATCH_LINES", 50_000, "a positive number").and_then(
                |n| {
                    in_range(
                        n,
                        1..=1_000_000,
                        "MAX_BATCH_LINES",
                        "a number from 1 to 1000000",
                    )
                },
            )?,
            max_batch_bytes: parsed(env, "MAX_BATCH_BYTES", 32 << 20, "a number of bytes")
                .and_then(|n| {
                    in_range(
                        n,
                        1024..=(1 << 30),
                        "MAX_BATCH_BYTES",
                        "a number of bytes from 1024 to 1073741824",
                    )
                })?,
            max_open_batches_per_user: parsed(
                env,
                "MAX_OPEN_BATCHES_PER_USER",
                10,
                "a whole number (0 = off)",
            )?,
        })
    }
}

/// The worker process's configuration.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    pub common: CommonConfig,
    pub llm: LlmSettings,
    /// `MCP_SERVERS_FILE`: an `mcpServers` JSON file; unset → the bundled `conveyor-mcp`.
    pub mcp_servers_file: Option<PathBuf>,
    /// `WORKER_METRICS_ADDR`: where the worker serves `/metrics` and `/healthz`; unset → not
    /// served (several workers on one host cannot share a fixed default port).
    pub metrics_addr: Option<SocketAddr>,
    /// `LLM_RATE_LIMIT_RPM`, `LLM_MAX_CONCURRENT` (unset or 0 = unlimited) and
    /// `LLM_RATE_LIMIT_MAX_WAIT_SECS` (default 120): the provider's limits, shared by all
    /// workers through Redis.
    pub llm_limits: LimitSettings,
    /// `AGENT_MAX_TURNS` (default 10): LLM calls per run before it fails.
    pub max_turns: u32,
    /// `AGENT_HISTORY_WINDOW` (default 40): stored messages sent to the model.
    pub history_window: u32,
    /// `MCP_CALL_TIMEOUT_SECS` (default 30).
    pub mcp_call_timeout: Duration,
    /// `DELTA_COALESCE_MS` (default 5): text deltas are merged over this window.
    pub delta_coalesce: Duration,
    /// `LLM_MAX_ATTEMPTS` (default 5): tries per LLM call before the attempt gives up.
    pub llm_max_attempts: usize,
    /// `LLM_RETRY_MIN_DELAY_MS` (default 200) and `LLM_RETRY_MAX_DELAY_MS` (default 10000):
    /// the exponential backoff's bounds (full jitter below them).
    pub llm_retry_min_delay: Duration,
    pub llm_retry_max_delay: Duration,
    /// `SHUTDOWN_GRACE_SECS` (default 30): on SIGTERM, how long in-flight runs may finish
    /// before they are handed back to the queue.
    pub shutdown_grace: Duration,
    /// `CONVEYOR_FAULT_INJECT` (tests only, unset in production): a crash to stage on purpose.
    pub fault_injection: Option<FaultInjection>,
}

/// A crash the worker stages on purpose so that the fault tests can hit a point no signal
/// from outside can hit reliably. Compiled into every build, inert unless
/// `CONVEYOR_FAULT_INJECT` names it; never set it outside tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultInjection {
    /// `abort_after_tool_call`: abort the process (no unwinding, no cleanup, like `kill -9`)
    /// right after a tool call of a run's first attempt has returned, before the call is
    /// written to the run's journal. The tool's side effect is then committed by the MCP
    /// server but unknown to Postgres's journal, the window its idempotency record covers.
    AbortAfterToolCall,
}

impl FaultInjection {
    const VAR: &str = "CONVEYOR_FAULT_INJECT";

    fn from_env(env: &dyn Env) -> Result<Option<Self>, ConfigError> {
        match env.get(Self::VAR).as_deref() {
            None => Ok(None),
            Some("abort_after_tool_call") => Ok(Some(Self::AbortAfterToolCall)),
            Some(other) => Err(ConfigError::Invalid {
                var: Self::VAR.into(),
                value: other.to_owned(),
                expected: "abort_after_tool_call (tests only), or unset".into(),
            }),
        }
    }
}

impl WorkerConfig {
    pub fn from_env(env: &dyn Env) -> Result<Self, ConfigError> {
        let metrics_addr = match env.get("WORKER_METRICS_ADDR") {
            None => None,
            Some(v) => Some(v.parse().map_err(|_| ConfigError::Invalid {
                var: "WORKER_METRICS_ADDR".into(),
                value: v,
                expected: "an address like 127.0.0.1:9091".into(),
            })?),
        };
        let max_turns = parsed(env, "AGENT_MAX_TURNS", 10, "a number from 1 to 100")
            .and_then(|n| in_range(n, 1..=100, "AGENT_MAX_TURNS", "a number from 1 to 100"))?;
        Ok(Self {
            common: CommonConfig::from_env(env)?,
            llm: LlmSettings::from_env(env)?,
            mcp_servers_file: env.get("MCP_SERVERS_FILE").map(PathBuf::from),
            metrics_addr,
            llm_limits: llm_limits(env)?,
            max_turns,
            history_window: parsed(env, "AGENT_HISTORY_WINDOW", 40, "a positive number")?,
            mcp_call_timeout: seconds(env, "MCP_CALL_TIMEOUT_SECS", 30)?,
            delta_coalesce: millis(env, "DELTA_COALESCE_MS", 5)?,
            llm_max_attempts: parsed(env, "LLM_MAX_ATTEMPTS", 5, "a number from 1 to 20")
                .and_then(|n| in_range(n, 1..=20, "LLM_MAX_ATTEMPTS", "a number from 1 to 20"))?,
            llm_retry_min_delay: millis(env, "LLM_RETRY_MIN_DELAY_MS", 200)?,
            llm_retry_max_delay: millis(env, "LLM_RETRY_MAX_DELAY_MS", 10_000)?,
            shutdown_grace: seconds(env, "SHUTDOWN_GRACE_SECS", 30)?,
            fault_injection: FaultInjection::from_env(env)?,
        })
    }
}

/// Reads the shared LLM rate limits; 0 or unset means no limit.
fn llm_limits(env: &dyn Env) -> Result<LimitSettings, ConfigError> {
    let limit = |var: &str| {
        parsed(env, var, 0u32, "a whole number (0 or unset = unlimited)")
            .map(|n| (n > 0).then_some(n))
    };
    let max_wait = parsed(
        env,
        "LLM_RATE_LIMIT_MAX_WAIT_SECS",
        120u64,
        "a number of seconds from 1 to 3600",
    )
    .and_then(|n| {
        in_range(
            n,
            1..=3600,
            "LLM_RATE_LIMIT_MAX_WAIT_SECS",
            "a number of seconds from 1 to 3600",
        )
    })?;
    Ok(LimitSettings {
        requests_per_minute: limit("LLM_RATE_LIMIT_RPM")?,
        max_concurrent: limit("LLM_MAX_CONCURRENT")?,
        max_wait: Duration::from_secs(max_wait),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&'static str, &'static str)]) -> HashMap<&'static str, &'static str> {
        pairs.iter().copied().collect()
    }

    #[test]
    fn api_config_has_documented_defaults() {
        let config = ApiConfig::from_env(&env(&[("DATABASE_URL", "postgres://x/y")])).unwrap();
        assert_eq!(config.addr.to_string(), "127.0.0.1:8080");
        assert_eq!(config.common.redis_prefix, "conveyor");
        assert_eq!(config.common.event_stream_ttl, Duration::from_hours(1));
        assert_eq!(config.sse_keepalive, Duration::from_secs(15));
    }

    #[test]
    fn missing_database_url_names_the_variable() {
        let err = ApiConfig::from_env(&env(&[])).unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }

    #[test]
    fn invalid_values_name_the_variable_and_what_is_accepted() {
        let err = ApiConfig::from_env(&env(&[("DATABASE_URL", "x"), ("API_ADDR", "nowhere")]))
            .unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("API_ADDR") && text.contains("127.0.0.1:8080"),
            "{text}"
        );

        let err = ApiConfig::from_env(&env(&[
            ("DATABASE_URL", "x"),
            ("EVENT_STREAM_TTL_SECS", "-1"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("EVENT_STREAM_TTL_SECS"), "{err}");
    }

    #[test]
    fn without_keys_the_api_only_runs_open_on_loopback() {
        let config = ApiConfig::from_env(&env(&[("DATABASE_URL", "x")])).unwrap();
        assert_eq!(config.auth.keys, AuthKeys::None);
        let err = ApiConfig::from_env(&env(&[("DATABASE_URL", "x"), ("API_ADDR", "0.0.0.0:8080")]))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("JWT_SECRET") && err.contains("CONVEYOR_INSECURE_NO_AUTH"),
            "{err}"
        );
        let open = ApiConfig::from_env(&env(&[
            ("DATABASE_URL", "x"),
            ("API_ADDR", "0.0.0.0:8080"),
            ("CONVEYOR_INSECURE_NO_AUTH", "1"),
        ]))
        .unwrap();
        assert_eq!(open.auth.keys, AuthKeys::None);
        let secured = ApiConfig::from_env(&env(&[
            ("DATABASE_URL", "x"),
            ("API_ADDR", "0.0.0.0:8080"),
            ("JWT_SECRET", "s3cret"),
        ]))
        .unwrap();
        assert!(matches!(secured.auth.keys, AuthKeys::Secret(_)));
        assert!(!format!("{secured:?}").contains("s3cret"));
        let err = ApiConfig::from_env(&env(&[
            ("DATABASE_URL", "x"),
            ("JWT_SECRET", "a"),
            ("JWT_JWKS_URL", "http://127.0.0.1/jwks"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("JWT_SECRET"), "{err}");
    }

    #[test]
    fn worker_config_rejects_out_of_range_turns() {
        let err = WorkerConfig::from_env(&env(&[
            ("DATABASE_URL", "x"),
            ("LLM_PROVIDER", "ollama"),
            ("AGENT_MAX_TURNS", "0"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("AGENT_MAX_TURNS"), "{err}");
    }

    #[test]
    fn fault_injection_is_off_unless_named() {
        let base = [("DATABASE_URL", "x"), ("LLM_PROVIDER", "ollama")];
        assert_eq!(
            WorkerConfig::from_env(&env(&base)).unwrap().fault_injection,
            None
        );
        let mut pairs = base.to_vec();
        pairs.push(("CONVEYOR_FAULT_INJECT", "abort_after_tool_call"));
        assert_eq!(
            WorkerConfig::from_env(&env(&pairs))
                .unwrap()
                .fault_injection,
            Some(FaultInjection::AbortAfterToolCall)
        );
        let mut pairs = base.to_vec();
        pairs.push(("CONVEYOR_FAULT_INJECT", "abort"));
        let err = WorkerConfig::from_env(&env(&pairs))
            .unwrap_err()
            .to_string();
        assert!(err.contains("CONVEYOR_FAULT_INJECT"), "{err}");
    }

    #[test]
    fn llm_limits_default_to_unlimited_and_reject_bad_values() {
        let base = [("DATABASE_URL", "x"), ("LLM_PROVIDER", "ollama")];
        let config = WorkerConfig::from_env(&env(&base)).unwrap();
        assert!(config.llm_limits.is_unlimited());

        let mut pairs = base.to_vec();
        pairs.extend([("LLM_RATE_LIMIT_RPM", "500"), ("LLM_MAX_CONCURRENT", "0")]);
        let config = WorkerConfig::from_env(&env(&pairs)).unwrap();
        assert_eq!(config.llm_limits.requests_per_minute, Some(500));
        assert_eq!(config.llm_limits.max_concurrent, None);

        for (var, value) in [
            ("LLM_RATE_LIMIT_RPM", "-1"),
            ("LLM_MAX_CONCURRENT", "lots"),
            ("LLM_RATE_LIMIT_MAX_WAIT_SECS", "0"),
        ] {
            let mut pairs = base.to_vec();
            pairs.push((var, value));
            let err = WorkerConfig::from_env(&env(&pairs))
                .unwrap_err()
                .to_string();
            assert!(err.contains(var), "{err}");
        }
    }

    #[test]
    fn secrets_are_redacted_in_debug_output() {
        let config =
            ApiConfig::from_env(&env(&[("DATABASE_URL", "postgres://user:hunter2@db/x")])).unwrap();
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}
