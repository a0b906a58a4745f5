//! The LLM provider's rate limit, shared by every worker through Redis.
//!
//! A provider limits an API key, not a process: ten workers that each stay under the limit
//! still get 429s together. So every LLM request first takes a permit from Redis, keyed by
//! provider and model under the deployment's key prefix, and scaling the workers out only
//! lengthens the wait for a permit, never the number of 429s.
//!
//! Two limits, both optional (unset = no Redis round trip at all):
//!
//! - **requests per minute**: a sliding-window log (a sorted set of the last minute's request
//!   times), so no 60-second window ever holds more than the limit;
//! - **concurrent requests**: a sorted set of leases scored by their expiry. A permit's lease
//!   is renewed while its request streams and removed when it ends; a worker killed mid-request
//!   stops renewing, and its slot frees itself once the lease expires ([`LEASE_TTL`]).
//!
//! One Lua script checks both and takes both at once, with Redis's clock, so workers on hosts
//! with skewed clocks agree. A full limit makes [`LlmLimiter::acquire`] wait (polling, with the
//! window's exact reopening time when it is the minute limit) until a permit is free, the run is
//! cancelled, or [`LimitSettings::max_wait`] passes. If Redis does not answer, the request goes
//! ahead without a permit (fail open, logged once per outage): the provider's own 429s and the
//! worker's backoff still protect it, and a Redis outage must not stop every run.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use redis::aio::ConnectionManager;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// How long a concurrency lease lives without renewal: a killed worker's slot is free again
/// within this time.
pub const LEASE_TTL: Duration = Duration::from_secs(15);
/// How often a held lease is renewed.
const RENEW_EVERY: Duration = Duration::from_secs(5);
/// The requests-per-minute window.
const WINDOW: Duration = Duration::from_mins(1);
/// A Redis call slower than this counts as Redis being down (fail open).
const REDIS_TIMEOUT: Duration = Duration::from_secs(1);
/// Polling bounds while every concurrency slot is taken.
const POLL_MIN: Duration = Duration::from_millis(10);
const POLL_MAX: Duration = Duration::from_millis(250);

/// Checks both limits and, when both have room, records the request and takes a lease.
/// Returns `{1, 0}` when granted, `{0, wait_ms}` when not (`wait_ms` = 0: unknown, poll).
const ACQUIRE_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm = tonumber(ARGV[1])
local max_concurrent = tonumber(ARGV[2])
local id = ARGV[3]
local ttl = tonumber(ARGV[4])
local window = tonumber(ARGV[5])
local blocked = false
local wait = 0
if max_concurrent > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
  if redis.call('ZCARD', KEYS[2]) >= max_concurrent then
    blocked = true
  end
end
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
  if redis.call('ZCARD', KEYS[1]) >= rpm then
    blocked = true
    local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
    wait = math.max(1, tonumber(oldest[2]) + window - now)
  end
end
if blocked then
  return {0, wait}
end
if rpm > 0 then
  redis.call('ZADD', KEYS[1], now, id)
  redis.call('PEXPIRE', KEYS[1], window)
end
if max_concurrent > 0 then
  redis.call('ZADD', KEYS[2], now + ttl, id)
  redis.call('PEXPIRE', KEYS[2], ttl)
end
return {1, 0}
";

/// Extends a lease that still exists (an expired one is not brought back: its slot may have
/// been handed out already).
const RENEW_SCRIPT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local renewed = redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ttl)
return renewed
";

/// The limits (from `LLM_RATE_LIMIT_RPM`, `LLM_MAX_CONCURRENT`, `LLM_RATE_LIMIT_MAX_WAIT_SECS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimitSettings {
    /// Requests per minute across all workers; `None` = unlimited.
    pub requests_per_minute: Option<u32>,
    /// Requests in flight at once across all workers; `None` = unlimited.
    pub max_concurrent: Option<u32>,
    /// How long one request may wait for a permit before the wait counts as a transient failure
    /// (retried like a 429).
    pub max_wait: Duration,
}

impl LimitSettings {
    /// No limits.
    pub const UNLIMITED: Self = Self {
        requests_per_minute: None,
        max_concurrent: None,
        max_wait: Duration::from_mins(2),
    };

    pub fn is_unlimited(&self) -> bool {
        self.requests_per_minute.is_none() && self.max_concurrent.is_none()
    }
}

/// Why no permit was granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AcquireError {
    #[error("cancelled while waiting for the LLM rate limit")]
    Cancelled,
    #[error("waited {} s for the shared LLM rate limit", .0.as_secs())]
    TimedOut(Duration),
}

/// The shared limiter of one provider and model. Cheap to clone.
#[derive(Clone)]
pub struct LlmLimiter {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    conn: ConnectionManager,
    rpm_key: String,
    lease_key: String,
    settings: LimitSettings,
    acquire: redis::Script,
    renew: redis::Script,
    /// Set while Redis is unreachable, so the outage is logged once, not per request.
    failing_open: AtomicBool,
}

impl std::fmt::Debug for LlmLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LlmLimiter")
            .field("settings", &self.inner.as_ref().map(|i| i.settings))
            .finish_non_exhaustive()
    }
}

impl LlmLimiter {
    /// A limiter that grants everything at once, without Redis.
    pub fn unlimited() -> Self {
        Self { inner: None }
    }

    /// The limiter for `provider`/`model`; with no limit set it is [`Self::unlimited`] and
    /// opens no connection.
    pub async fn connect(
        redis_url: &str,
        prefix: &str,
        provider: &str,
        model: &str,
        settings: LimitSettings,
    ) -> Result<Self, redis::RedisError> {
        if settings.is_unlimited() {
            return Ok(Self::unlimited());
        }
        let conn = crate::backends::redis_client(redis_url)?
            .get_connection_manager()
            .await?;
        let base = format!("{prefix}:llm_limit:{provider}:{model}");
        Ok(Self {
            inner: Some(Arc::new(Inner {
                conn,
                rpm_key: format!("{base}:rpm"),
                lease_key: format!("{base}:leases"),
                settings,
                acquire: redis::Script::new(ACQUIRE_SCRIPT),
                renew: redis::Script::new(RENEW_SCRIPT),
                failing_open: AtomicBool::new(false),
            })),
        })
    }

    /// Waits for a permit for one request. Returns at once when unlimited or when Redis is
    /// unreachable (fail open); otherwise when both limits have room, `cancel` fires, or the
    /// maximum wait passes.
    pub async fn acquire(&self, cancel: &CancellationToken) -> Result<Permit, AcquireError> {
        let started = Instant::now();
        let Some(inner) = &self.inner else {
            return Ok(Permit::free(started));
        };
        let deadline = started + inner.settings.max_wait;
        let id = ulid::Ulid::new().to_string();
        let mut poll = POLL_MIN;
        loop {
            if cancel.is_cancelled() {
                return Err(AcquireError::Cancelled);
            }
            let wait = match inner.try_acquire(&id).await {
                Ok(None) => {
                    inner.redis_answered();
                    return Ok(Permit {
                        lease: Some((Arc::clone(inner), id)),
                        waited: started.elapsed(),
                        failed_open: false,
                    });
                }
                Ok(Some(wait)) => {
                    inner.redis_answered();
                    wait
                }
                Err(error) => {
                    inner.redis_failed(&error);
                    let mut permit = Permit::free(started);
                    permit.failed_open = true;
                    return Ok(permit);
                }
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(AcquireError::TimedOut(inner.settings.max_wait));
            }
            // A known reopening time (the minute window) is slept to exactly, plus a little
            // jitter so that waiters do not all retry in the same millisecond; a full
            // concurrency limit is polled, backing off to POLL_MAX.
            let sleep = if let Some(known) = wait {
                known + Duration::from_millis(jitter_ms(20))
            } else {
                poll = (poll * 2).min(POLL_MAX);
                poll / 2 + Duration::from_millis(jitter_ms(poll.as_millis() / 2))
            };
            let until = (now + sleep).min(deadline);
            tokio::select! {
                () = cancel.cancelled() => return Err(AcquireError::Cancelled),
                () = tokio::time::sleep_until(until) => {}
            }
        }
    }
}

/// A random number of milliseconds below `below` (jitter).
fn jitter_ms(below: u128) -> u64 {
    fastrand::u64(..u64::try_from(below.max(1)).unwrap_or(u64::MAX))
}

impl Inner {
    /// `Ok(None)`: granted; `Ok(Some(wait))`: blocked, with the time until the minute window
    /// reopens if that is what blocks (`None` inside: poll).
    async fn try_acquire(&self, id: &str) -> Result<Option<Option<Duration>>, String> {
        let settings = &self.settings;
        let mut conn = self.conn.clone();
        let mut invocation = self.acquire.key(&self.rpm_key);
        invocation
            .key(&self.lease_key)
            .arg(settings.requests_per_minute.unwrap_or(0))
            .arg(settings.max_concurrent.unwrap_or(0))
            .arg(id)
            .arg(millis(LEASE_TTL))
            .arg(millis(WINDOW));
        let call = invocation.invoke_async::<(u8, u64)>(&mut conn);
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Err(_) => Err("Redis did not answer in time".to_owned()),
            Ok(Err(error)) => Err(error.to_string()),
            Ok(Ok((1, _))) => Ok(None),
            Ok(Ok((_, 0))) => Ok(Some(None)),
            Ok(Ok((_, wait_ms))) => Ok(Some(Some(Duration::from_millis(wait_ms)))),
        }
    }

    fn redis_failed(&self, error: &str) {
        if !self.failing_open.swap(true, Ordering::Relaxed) {
            tracing::warn!(%error, "LLM rate limiter unavailable; sending LLM requests without it until Redis answers");
        }
    }

    fn redis_answered(&self) {
        if self.failing_open.swap(false, Ordering::Relaxed) {
            tracing::info!("LLM rate limiter available again");
        }
    }

    async fn renew(&self, id: &str) {
        let mut conn = self.conn.clone();
        let mut invocation = self.renew.key(&self.lease_key);
        invocation.arg(id).arg(millis(LEASE_TTL));
        let call = invocation.invoke_async::<u8>(&mut conn);
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::debug!(%error, "cannot renew an LLM rate-limit lease"),
            Err(_) => tracing::debug!("renewing an LLM rate-limit lease timed out"),
        }
    }

    async fn release(&self, id: &str) {
        let mut conn = self.conn.clone();
        let mut command = redis::cmd("ZREM");
        command.arg(&self.lease_key).arg(id);
        let call = command.query_async::<u8>(&mut conn);
        // Best effort: a lease that could not be removed expires by itself.
        match tokio::time::timeout(REDIS_TIMEOUT, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => tracing::debug!(%error, "cannot release an LLM rate-limit lease"),
            Err(_) => tracing::debug!("releasing an LLM rate-limit lease timed out"),
        }
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// Permission to send one LLM request. Hold the request with [`Permit::hold`] (which keeps
/// the lease alive), then [`Permit::release`] it. A dropped permit's lease expires by itself.
#[derive(Debug)]
pub struct Permit {
    lease: Option<(Arc<Inner>, String)>,
    waited: Duration,
    failed_open: bool,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inner")
            .field("lease_key", &self.lease_key)
            .finish_non_exhaustive()
    }
}

impl Permit {
    fn free(started: Instant) -> Self {
        Self {
            lease: None,
            waited: started.elapsed(),
            failed_open: false,
        }
    }

    /// How long the permit took to get.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Whether it was granted without Redis because Redis did not answer.
    pub fn failed_open(&self) -> bool {
        self.failed_open
    }

    /// Runs `request`, renewing the concurrency lease while it runs.
    pub async fn hold<F: Future>(&self, request: F) -> F::Output {
        let Some((inner, id)) = self
            .lease
            .as_ref()
            .filter(|(inner, _)| inner.settings.max_concurrent.is_some())
        else {
            return request.await;
        };
        tokio::pin!(request);
        let mut renew = tokio::time::interval_at(Instant::now() + RENEW_EVERY, RENEW_EVERY);
        loop {
            tokio::select! {
                output = &mut request => return output,
                _ = renew.tick() => inner.renew(id).await,
            }
        }
    }

    /// Frees the concurrency slot (the request still counts towards the minute's limit).
    pub async fn release(self) {
        if let Some((inner, id)) = &self.lease
            && inner.settings.max_concurrent.is_some()
        {
            inner.release(id).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redis_url() -> String {
        std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned())
    }

    async fn limiter(prefix: &str, settings: LimitSettings) -> LlmLimiter {
        LlmLimiter::connect(&redis_url(), prefix, "test", "model", settings)
            .await
            .expect("Redis at TEST_REDIS_URL")
    }

    fn prefix() -> String {
        format!("test:{}", ulid::Ulid::new().to_string().to_lowercase())
    }

    async fn cleanup(prefix: &str) {
        let mut conn = redis::Client::open(redis_url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut conn)
            .await
            .unwrap();
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(keys)
                .query_async(&mut conn)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn unlimited_grants_without_redis() {
        let limiter = LlmLimiter::connect(
            "redis://127.0.0.1:1",
            "x",
            "p",
            "m",
            LimitSettings::UNLIMITED,
        )
        .await
        .unwrap();
        let permit = limiter.acquire(&CancellationToken::new()).await.unwrap();
        assert!(!permit.failed_open());
        permit.release().await;
    }

    #[tokio::test]
    async fn concurrency_slots_are_shared_and_freed_on_release() {
        let prefix = prefix();
        let settings = LimitSettings {
            max_concurrent: Some(2),
            max_wait: Duration::from_secs(10),
            ..LimitSettings::UNLIMITED
        };
        // Two limiters stand for two worker processes.
        let a = limiter(&prefix, settings).await;
        let b = limiter(&prefix, settings).await;
        let cancel = CancellationToken::new();
        let first = a.acquire(&cancel).await.unwrap();
        let second = b.acquire(&cancel).await.unwrap();

        // A third request, from either process, waits while both slots are held …
        let impatient = limiter(
            &prefix,
            LimitSettings {
                max_wait: Duration::from_millis(200),
                ..settings
            },
        )
        .await;
        assert!(matches!(
            impatient.acquire(&cancel).await,
            Err(AcquireError::TimedOut(_))
        ));
        // … and a cancelled wait ends at once.
        let waiting = CancellationToken::new();
        let (third, ()) = tokio::join!(a.acquire(&waiting), async {
            tokio::task::yield_now().await;
            waiting.cancel();
        });
        assert_eq!(third.unwrap_err(), AcquireError::Cancelled);

        first.release().await;
        let again = b.acquire(&cancel).await.unwrap();
        second.release().await;
        again.release().await;
        cleanup(&prefix).await;
    }

    #[tokio::test]
    async fn the_minute_limit_blocks_once_used_up() {
        let prefix = prefix();
        let settings = LimitSettings {
            requests_per_minute: Some(3),
            max_wait: Duration::from_millis(300),
            ..LimitSettings::UNLIMITED
        };
        let limiter = limiter(&prefix, settings).await;
        let cancel = CancellationToken::new();
        for _ in 0..3 {
            limiter.acquire(&cancel).await.unwrap().release().await;
        }
        // The window reopens only a minute after the first request: the wait runs out.
        assert!(matches!(
            limiter.acquire(&cancel).await,
            Err(AcquireError::TimedOut(_))
        ));
        cleanup(&prefix).await;
    }

    #[tokio::test]
    async fn a_failing_redis_fails_open() {
        let prefix = prefix();
        let settings = LimitSettings {
            max_concurrent: Some(1),
            max_wait: Duration::from_secs(5),
            ..LimitSettings::UNLIMITED
        };
        let limiter = limiter(&prefix, settings).await;
        let inner = limiter.inner.as_ref().unwrap();
        // A key of the wrong type makes the script fail, as a Redis that does not answer would.
        let mut conn = inner.conn.clone();
        let _: () = redis::cmd("SET")
            .arg(&inner.lease_key)
            .arg("not a sorted set")
            .query_async(&mut conn)
            .await
            .unwrap();
        let permit = limiter.acquire(&CancellationToken::new()).await.unwrap();
        assert!(permit.failed_open());
        permit.release().await;
        cleanup(&prefix).await;
    }
}
