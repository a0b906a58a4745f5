//! The Redis event bus: appending events to a run's replay buffer and publishing them,
//! atomically.
//!
//! One Lua call per event assigns the run's next sequence number, appends the event to the
//! run's Stream under the id `{seq}-1` (so a replay "after seq N" is a plain `XRANGE`), and
//! publishes it. Doing the three in one script keeps the Stream and the live channel in the
//! same order, and costs one round trip.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use redis::{AsyncCommands, aio::ConnectionManager};
use tokio::time::Instant;

use super::{
    EventError,
    types::{EventKind, RunEvent, StoredEvent},
};
use crate::ids::{RunId, Seq};

/// How long a live run's buffer is kept before its end (a safety net for runs that never end).
const LIVE_TTL: Duration = Duration::from_hours(24);

/// How far seqs jump when a run's counter is found lost (see the script). Larger than the
/// events an attempt can publish between two heartbeats (deltas are coalesced).
const LOST_COUNTER_GAP: Seq = 10_000;

const PUBLISH_SCRIPT: &str = r"
local mode = ARGV[1]
local ttl = tonumber(ARGV[7])
local seq
if mode == 'at' then
  seq = tonumber(ARGV[2])
else
  local stored = redis.call('GET', KEYS[1])
  local cur = tonumber(stored or '0')
  local floor = tonumber(ARGV[2])
  if not stored and floor > 1 then
    -- The counter of a run already under way is gone: Redis lost its data. The caller's floor
    -- can lag the seqs already handed out (a takeover knows only the last heartbeat's), so
    -- leave a gap rather than hand a seq out twice.
    floor = floor + tonumber(ARGV[8])
  end
  if cur < floor then cur = floor end
  if mode == 'reserve' then
    local n = tonumber(ARGV[3])
    redis.call('SET', KEYS[1], cur + n, 'EX', ttl)
    return cur + 1
  end
  seq = cur + 1
  redis.call('SET', KEYS[1], seq, 'EX', ttl)
end
redis.call('XADD', KEYS[2], seq .. '-1', 'k', ARGV[3], 'd', ARGV[4])
redis.call('EXPIRE', KEYS[2], ttl)
redis.call('EXPIRE', KEYS[1], ttl)
redis.call('PUBLISH', ARGV[6], ARGV[5] .. ' ' .. seq .. ' ' .. ARGV[3] .. ' ' .. ARGV[4])
return seq
";

/// The event bus over Redis (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct RedisBus {
    conn: ConnectionManager,
    prefix: String,
    finished_ttl: Duration,
    script: redis::Script,
    /// When Redis last answered a publish or a ping of this bus (any clone), as
    /// milliseconds since `created`.
    answered_ms: Arc<AtomicU64>,
    created: Instant,
}

impl std::fmt::Debug for RedisBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBus")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

enum Mode {
    /// The next seq, at least `floor + 1`.
    Next { floor: Seq },
    /// A seq reserved earlier.
    At(Seq),
}

impl RedisBus {
    /// Connects; the connection manager reconnects by itself after a Redis restart.
    pub async fn connect(
        redis_url: &str,
        prefix: &str,
        finished_ttl: Duration,
    ) -> Result<Self, EventError> {
        let client = crate::backends::redis_client(redis_url)?;
        let conn = client.get_connection_manager().await?;
        Ok(Self {
            conn,
            prefix: prefix.to_owned(),
            finished_ttl,
            script: redis::Script::new(PUBLISH_SCRIPT),
            answered_ms: Arc::new(AtomicU64::new(0)),
            created: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.created.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn answered(&self) {
        self.answered_ms.store(self.now_ms(), Ordering::Relaxed);
    }

    /// The pub/sub channel every event is published on.
    pub fn channel(&self) -> String {
        channel_name(&self.prefix)
    }

    fn counter_key(&self, run_id: &RunId) -> String {
        format!("{}:run:{run_id}:seq", self.prefix)
    }

    fn stream_key(&self, run_id: &RunId) -> String {
        format!("{}:run:{run_id}:events", self.prefix)
    }

    /// Appends and publishes `event` with the run's next seq (never below `floor + 1`: a
    /// worker passes the highest seq Postgres knows, so a Redis that lost the counter cannot
    /// hand out a seq twice). Returns the seq.
    pub async fn publish(
        &self,
        run_id: &RunId,
        event: &RunEvent,
        floor: Seq,
    ) -> Result<Seq, EventError> {
        self.invoke(
            run_id,
            Mode::Next { floor },
            event.kind(),
            &event.data_json(),
        )
        .await
    }

    /// Publishes `event` at a seq obtained from [`Self::reserve`].
    pub async fn publish_at(
        &self,
        run_id: &RunId,
        seq: Seq,
        event: &RunEvent,
    ) -> Result<(), EventError> {
        self.invoke(run_id, Mode::At(seq), event.kind(), &event.data_json())
            .await?;
        Ok(())
    }

    /// Reserves `n` consecutive seqs and returns the first. Used for the events that are
    /// committed to Postgres before they are published (the final answer and status).
    pub async fn reserve(&self, run_id: &RunId, n: u32, floor: Seq) -> Result<Seq, EventError> {
        let seq: Seq = self
            .script
            .key(self.counter_key(run_id))
            .key(self.stream_key(run_id))
            .arg("reserve")
            .arg(floor)
            .arg(n)
            .arg("")
            .arg("")
            .arg("")
            .arg(LIVE_TTL.as_secs())
            .arg(LOST_COUNTER_GAP)
            .invoke_async(&mut self.conn.clone())
            .await?;
        self.answered();
        Ok(seq)
    }

    async fn invoke(
        &self,
        run_id: &RunId,
        mode: Mode,
        kind: EventKind,
        data: &str,
    ) -> Result<Seq, EventError> {
        let (mode, number) = match mode {
            Mode::Next { floor } => ("next", floor),
            Mode::At(seq) => ("at", seq),
        };
        let ttl = if kind.is_terminal() {
            self.finished_ttl
        } else {
            LIVE_TTL
        };
        let seq: Seq = self
            .script
            .key(self.counter_key(run_id))
            .key(self.stream_key(run_id))
            .arg(mode)
            .arg(number)
            .arg(kind.as_str())
            .arg(data)
            .arg(run_id.as_str())
            .arg(self.channel())
            .arg(ttl.as_secs().max(1))
            .arg(LOST_COUNTER_GAP)
            .invoke_async(&mut self.conn.clone())
            .await?;
        self.answered();
        Ok(seq)
    }

    /// The run's buffered events after `after` (exclusive), or `None` when the run has no
    /// buffer (never published, or expired).
    pub async fn read_after(
        &self,
        run_id: &RunId,
        after: Seq,
    ) -> Result<Option<Vec<StoredEvent>>, EventError> {
        // Read-only, so safe to repeat on a connection that turned out to be dead.
        retry_if_stale(|| self.read_after_once(run_id, after)).await
    }

    async fn read_after_once(
        &self,
        run_id: &RunId,
        after: Seq,
    ) -> Result<Option<Vec<StoredEvent>>, EventError> {
        let key = self.stream_key(run_id);
        let mut conn = self.conn.clone();
        let mut events = Vec::new();
        let mut start = format!("{}-0", after + 1);
        loop {
            let page: Vec<(String, Vec<String>)> = redis::cmd("XRANGE")
                .arg(&key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(500)
                .query_async(&mut conn)
                .await?;
            let full = page.len() == 500;
            for (id, fields) in page {
                let event = parse_entry(&id, &fields)?;
                start = format!("{}-2", event.seq);
                events.push(event);
            }
            if !full {
                break;
            }
        }
        if events.is_empty() {
            let exists: bool = conn.exists(&key).await?;
            if !exists {
                return Ok(None);
            }
        }
        Ok(Some(events))
    }

    /// Whether Redis answers. Also refreshes a connection that died while it was idle (see
    /// [`retry_if_stale`]), so a worker pings before it claims a run.
    pub async fn ping(&self) -> Result<(), EventError> {
        retry_if_stale(|| async {
            let _: String = redis::cmd("PING")
                .query_async(&mut self.conn.clone())
                .await?;
            Ok::<(), EventError>(())
        })
        .await?;
        self.answered();
        Ok(())
    }

    /// [`Self::ping`], unless Redis answered this bus within `fresh` (a busy worker's
    /// connection is known to be alive; only an idle one may have died unnoticed).
    pub async fn ping_if_idle(&self, fresh: Duration) -> Result<(), EventError> {
        let idle_ms = self
            .now_ms()
            .saturating_sub(self.answered_ms.load(Ordering::Relaxed));
        if u128::from(idle_ms) < fresh.as_millis() {
            return Ok(());
        }
        self.ping().await
    }
}

/// A failure that comes back faster than this reports the state of a connection that was
/// already gone, not a reconnect attempt made for this command.
const STALE_FAILURE: Duration = Duration::from_millis(100);

/// Runs `op`, and once more if it failed at once on a dead connection.
///
/// Why: with RESP2 a [`ConnectionManager`] only learns that its connection died when a command
/// fails on it. One that sat idle through a Redis restart (an API's producer, a worker's bus
/// between runs) still holds the dead connection afterwards, so its first command fails with
/// "broken pipe" — as does the first command after a reconnect that gave up during a long
/// outage ("connection refused") — even though Redis is back. That failure makes the manager
/// reconnect, so one more try succeeds. A failure that took longer was a reconnect attempt
/// against a Redis that is still down: trying again would only double the wait.
///
/// Only for operations that are safe to repeat (the first try may have reached Redis before
/// the connection broke): reads, pings, and job pushes (jobs are at-least-once).
pub(crate) async fn retry_if_stale<T, E, F, Fut>(mut op: F) -> Result<T, E>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: StaleConnection,
{
    let started = Instant::now();
    match op().await {
        Err(error) if error.is_stale_connection() && started.elapsed() < STALE_FAILURE => {
            tracing::debug!("Redis connection was dead; retrying once on a fresh one");
            op().await
        }
        result => result,
    }
}

/// Errors that can tell whether the Redis connection was gone.
pub(crate) trait StaleConnection {
    fn is_stale_connection(&self) -> bool;
}

impl StaleConnection for redis::RedisError {
    fn is_stale_connection(&self) -> bool {
        self.is_connection_dropped() || self.is_connection_refusal()
    }
}

impl StaleConnection for EventError {
    fn is_stale_connection(&self) -> bool {
        match self {
            Self::Redis(error) => error.is_stale_connection(),
            Self::Sqlite(_) | Self::Malformed(_) => false,
        }
    }
}

/// The channel name for a key prefix.
pub fn channel_name(prefix: &str) -> String {
    format!("{prefix}:events")
}

fn parse_entry(id: &str, fields: &[String]) -> Result<StoredEvent, EventError> {
    let seq = id
        .split_once('-')
        .and_then(|(ms, _)| ms.parse().ok())
        .ok_or_else(|| EventError::Malformed(format!("stream id {id}")))?;
    let mut kind = None;
    let mut data = None;
    for pair in fields.chunks_exact(2) {
        match pair[0].as_str() {
            "k" => kind = pair[1].parse::<EventKind>().ok(),
            "d" => data = Some(pair[1].as_str()),
            _ => {}
        }
    }
    match (kind, data) {
        (Some(kind), Some(data)) => Ok(StoredEvent {
            seq,
            kind,
            data: data.into(),
        }),
        _ => Err(EventError::Malformed(format!("entry {id}"))),
    }
}

/// Parses a published message: `{run_id} {seq} {kind} {data}`.
pub(crate) fn parse_published(payload: &str) -> Option<(&str, StoredEvent)> {
    let mut parts = payload.splitn(4, ' ');
    let run_id = parts.next()?;
    let seq = parts.next()?.parse().ok()?;
    let kind = parts.next()?.parse().ok()?;
    let data = parts.next()?;
    Some((
        run_id,
        StoredEvent {
            seq,
            kind,
            data: data.into(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn broken_pipe() -> redis::RedisError {
        std::io::Error::from(std::io::ErrorKind::BrokenPipe).into()
    }

    #[tokio::test]
    async fn a_dead_connection_is_retried_once() {
        let calls = AtomicUsize::new(0);
        let result: Result<u8, redis::RedisError> = retry_if_stale(|| async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0 => Err(broken_pipe()),
                _ => Ok(7),
            }
        })
        .await;
        assert_eq!(result.unwrap(), 7);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn slow_or_other_failures_are_not_retried() {
        let calls = AtomicUsize::new(0);
        let slow: Result<(), redis::RedisError> = retry_if_stale(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(STALE_FAILURE * 2).await;
            Err(broken_pipe())
        })
        .await;
        assert!(slow.is_err());
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "Redis is down: no second wait"
        );

        let calls = AtomicUsize::new(0);
        let other: Result<(), EventError> = retry_if_stale(|| async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err(EventError::Malformed("x".into()))
        })
        .await;
        assert!(other.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
