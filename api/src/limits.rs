//! Per-user limits: request rate (counted in Redis, so it holds across API replicas, or in
//! process memory in the embedded mode, which has one API process), active runs (counted in
//! the database under a per-user lock, exact across replicas) and open event streams (per
//! process).

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use conveyor_shared::ids::UserId;
use prometheus_client::metrics::gauge::Gauge;
use redis::aio::ConnectionManager;
use tokio::time::Instant;

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
    requests: RequestCounter,
    per_minute: u32,
    max_streams: u32,
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

/// Where requests are counted.
#[derive(Clone)]
enum RequestCounter {
    Redis {
        conn: ConnectionManager,
        prefix: String,
        script: redis::Script,
    },
    Local(Arc<Mutex<Windows>>),
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
            requests: RequestCounter::Redis {
                conn: redis,
                prefix: prefix.to_owned(),
                script: redis::Script::new(RATE_SCRIPT),
            },
            per_minute,
            max_streams,
            streams: Arc::default(),
            open_streams,
        })
    }

    /// The embedded mode's limiter: requests are counted in this process, the only API there
    /// is. Same windows and answers as with Redis.
    pub fn local(per_minute: u32, max_streams: u32, open_streams: Gauge) -> Self {
        Self {
            requests: RequestCounter::Local(Arc::default()),
            per_minute,
            max_streams,
            streams: Arc::default(),
            open_streams,
        }
    }

    /// Counts a request of `user`; `429` with the seconds until the window resets when over.
    /// Fails open when Redis is unreachable: availability over strictness.
    pub async fn check_rate(&self, user: &UserId) -> Result<(), ApiError> {
        if self.per_minute == 0 {
            return Ok(());
        }
        let (count, reset_in) = match &self.requests {
            RequestCounter::Redis {
                conn,
                prefix,
                script,
            } => {
                let key = format!("{prefix}:ratelimit:{user}");
                let result: Result<(u64, i64), _> = script
                    .key(key)
                    .arg(u64::try_from(WINDOW.as_millis()).unwrap_or(60_000))
                    .invoke_async(&mut conn.clone())
                    .await;
                match result {
                    Ok((count, ttl_ms)) => (
                        count,
                        Duration::from_millis(u64::try_from(ttl_ms.max(0)).unwrap_or(0)),
                    ),
                    Err(error) => {
                        tracing::warn!(%error, "rate limiter unavailable; letting the request through");
                        return Ok(());
                    }
                }
            }
            RequestCounter::Local(windows) => windows
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .count(user.as_str(), Instant::now()),
        };
        if count > u64::from(self.per_minute) {
            return Err(ApiError::RateLimited {
                retry_after_secs: u64::try_from(reset_in.as_millis())
                    .unwrap_or(u64::MAX)
                    .div_ceil(1000)
                    .max(1),
                message: format!("more than {} requests a minute", self.per_minute),
            });
        }
        Ok(())
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

/// Fixed one-minute windows per user, in memory: a user's window starts with their first
/// request and counts every request until it ends, like the Redis key that expires a minute
/// after its first `INCR`.
#[derive(Debug, Default)]
struct Windows {
    users: HashMap<String, Window>,
    /// When ended windows were last dropped.
    pruned: Option<Instant>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started: Instant,
    requests: u64,
}

impl Windows {
    /// Counts a request of `user` at `now`: the requests in the user's window so far, this one
    /// included, and the time until the window ends.
    fn count(&mut self, user: &str, now: Instant) -> (u64, Duration) {
        self.prune(now);
        let window = self.users.entry(user.to_owned()).or_insert(Window {
            started: now,
            requests: 0,
        });
        if now.duration_since(window.started) >= WINDOW {
            *window = Window {
                started: now,
                requests: 0,
            };
        }
        window.requests += 1;
        let ends = window.started + WINDOW;
        (window.requests, ends.duration_since(now))
    }

    /// Drops ended windows, once a window's length at most, so the map holds only users seen
    /// in the last two minutes.
    fn prune(&mut self, now: Instant) {
        if self
            .pruned
            .is_some_and(|at| now.duration_since(at) < WINDOW)
        {
            return;
        }
        self.pruned = Some(now);
        self.users
            .retain(|_, window| now.duration_since(window.started) < WINDOW);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    #[tokio::test]
    async fn the_local_limiter_answers_429_after_the_limit() {
        let limits = Limits::local(3, 0, Gauge::default());
        let alice = user("alice");
        for _ in 0..3 {
            limits.check_rate(&alice).await.unwrap();
        }
        match limits.check_rate(&alice).await {
            Err(ApiError::RateLimited {
                retry_after_secs, ..
            }) => assert!((1..=60).contains(&retry_after_secs), "{retry_after_secs}"),
            other => panic!("expected 429, got {other:?}"),
        }
        // Other users have their own window.
        limits.check_rate(&user("bob")).await.unwrap();
        // No limit configured: never limited.
        let unlimited = Limits::local(0, 0, Gauge::default());
        for _ in 0..100 {
            unlimited.check_rate(&alice).await.unwrap();
        }
    }

    #[test]
    fn a_window_lasts_a_minute_from_its_first_request() {
        let mut windows = Windows::default();
        let start = Instant::now();
        assert_eq!(windows.count("a", start), (1, WINDOW));
        let later = start + Duration::from_secs(20);
        assert_eq!(
            windows.count("a", later),
            (2, Duration::from_secs(40)),
            "the window does not slide"
        );
        // A new window starts once the minute is over.
        let next = start + WINDOW;
        assert_eq!(windows.count("a", next), (1, WINDOW));
    }

    #[test]
    fn ended_windows_are_pruned() {
        let mut windows = Windows::default();
        let start = Instant::now();
        windows.count("gone", start);
        windows.count("stays", start + Duration::from_secs(50));
        assert_eq!(windows.users.len(), 2);
        // Pruned at most once a minute…
        windows.count("other", start + Duration::from_secs(55));
        assert_eq!(windows.users.len(), 3);
        // …dropping only the windows that ended.
        windows.count("other", start + Duration::from_secs(61));
        let mut left: Vec<&str> = windows.users.keys().map(String::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["other", "stays"]);
    }
}
