//! Per-user limits: request rate (counted in Redis, so it holds across API replicas), active
//! runs (counted in Postgres under a per-user lock, exact across replicas) and open event
//! streams (per process).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use conveyor_shared::ids::UserId;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::ConnectionManager;

use crate::error::ApiError;

const WINDOW: Duration = Duration::from_mins(1);

const RATE_SCRIPT: &str = r"
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return {n, redis.call('PTTL', KEYS[1])}
";

/// The API's limiter. Cheap to clone.
#[derive(Clone)]
pub struct Limits {
    redis: ConnectionManager,
    prefix: String,
    per_minute: u32,
    max_streams: u32,
    script: redis::Script,
    streams: Arc<Mutex<HashMap<String, u32>>>,
    /// Open streams of all users (the `conveyor_sse_streams_active` metric).
    open_streams: Gauge,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("per_minute", &self.per_minute)
            .finish_non_exhaustive()
    }
}

impl Limits {
    pub async fn connect(
        redis_url: &str,
        prefix: &str,
        per_minute: u32,
        max_streams: u32,
        open_streams: Gauge,
    ) -> Result<Self, redis::RedisError> {
        let redis = conveyor_shared::backends::redis_client(redis_url)?
            .get_connection_manager()
            .await?;
        Ok(Self {
            redis,
            prefix: prefix.to_owned(),
            per_minute,
            max_streams,
            script: redis::Script::new(RATE_SCRIPT),
            streams: Arc::default(),
            open_streams,
        })
    }

    /// Counts a request of `user`; `429` with the seconds until the window resets when over.
    /// Fails open when Redis is unreachable: availability over strictness.
    pub async fn check_rate(&self, user: &UserId) -> Result<(), ApiError> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let key = format!("{}:ratelimit:{user}", self.prefix);
        let result: Result<(u64, i64), _> = self
            .script
            .key(key)
            .arg(u64::try_from(WINDOW.as_millis()).unwrap_or(60_000))
            .invoke_async(&mut self.redis.clone())
            .await;
        match result {
            Ok((count, ttl_ms)) if count > u64::from(self.per_minute) => {
                Err(ApiError::RateLimited {
                    retry_after_secs: u64::try_from(ttl_ms.max(0))
                        .unwrap_or(0)
                        .div_ceil(1000)
                        .max(1),
                    message: format!("more than {} requests a minute", self.per_minute),
                })
            }
            Ok(_) => Ok(()),
            Err(error) => {
                tracing::warn!(%error, "rate limiter unavailable; letting the request through");
                Ok(())
            }
        }
    }

    /// Registers an event stream of `user`; the guard releases it.
    pub fn open_stream(&self, user: &UserId) -> Result<StreamGuard, ApiError> {
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let open = streams.entry(user.to_string()).or_default();
        if self.max_streams > 0 && *open >= self.max_streams {
            return Err(ApiError::RateLimited {
                retry_after_secs: 1,
                message: format!("at most {} open event streams per user", self.max_streams),
            });
        }
        *open += 1;
        self.open_streams.inc();
        Ok(StreamGuard {
            streams: self.streams.clone(),
            user: user.to_string(),
            open_streams: self.open_streams.clone(),
        })
    }
}

/// An open event stream's place in the per-user count.
#[derive(Debug)]
pub struct StreamGuard {
    streams: Arc<Mutex<HashMap<String, u32>>>,
    user: String,
    open_streams: Gauge,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.open_streams.dec();
        let mut streams = self
            .streams
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(open) = streams.get_mut(&self.user) {
            *open = open.saturating_sub(1);
            if *open == 0 {
                streams.remove(&self.user);
            }
        }
    }
}
