//! The writer and replay side of run events, over one of two backends.
//!
//! [`EventBus`] is what the API and the worker hold; which backend is underneath is decided once,
//! at start-up:
//!
//! - [`RedisBus`]: a Redis Stream per run as the replay buffer, pub/sub as the live feed, both
//!   written by one Lua call. Any number of API and worker processes share it.
//! - [`LocalBus`]: the embedded mode (`conveyor dev`, one process, one SQLite file). The replay
//!   buffer is the file's `event_buffer` table, the live feed an in-process [`EventHub`].
//!
//! Both keep the same contract: one counter per run hands out seqs (never below the caller's
//! floor), a run's events reach the buffer and the live feed in the same order, and
//! [`EventBus::read_after`] answers `None` once a run's buffer is gone.

use std::time::Duration;

use sqlx::SqlitePool;

use super::{
    hub::EventHub,
    local_bus::LocalBus,
    redis_bus::RedisBus,
    types::{RunEvent, StoredEvent},
};
use crate::ids::{RunId, Seq};

pub use super::redis_bus::channel_name;

/// A failure of the event bus's backend.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("event bus: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("event buffer: {0}")]
    Sqlite(#[from] sqlx::Error),
    #[error("event bus: malformed stored event: {0}")]
    Malformed(String),
}

/// The writer and replay side of the event bus. Cheap to clone.
#[derive(Clone, Debug)]
pub enum EventBus {
    Redis(RedisBus),
    Local(LocalBus),
}

impl EventBus {
    /// Connects to Redis; the connection manager reconnects by itself after a Redis restart.
    pub async fn connect(
        redis_url: &str,
        prefix: &str,
        finished_ttl: Duration,
    ) -> Result<Self, EventError> {
        RedisBus::connect(redis_url, prefix, finished_ttl)
            .await
            .map(Self::Redis)
    }

    /// The embedded mode's bus: events are buffered in `pool`'s `event_buffer` table and
    /// delivered live to `hub` (built with [`EventHub::local`]); a finished run's buffer is
    /// kept for `finished_ttl`.
    pub fn local(pool: SqlitePool, hub: EventHub, finished_ttl: Duration) -> Self {
        Self::Local(LocalBus::new(pool, hub, finished_ttl))
    }

    /// The pub/sub channel every event is published on. The embedded mode has none: empty.
    pub fn channel(&self) -> String {
        match self {
            Self::Redis(bus) => bus.channel(),
            Self::Local(_) => String::new(),
        }
    }

    /// Appends and publishes `event` with the run's next seq (never below `floor + 1`: a
    /// worker passes the highest seq the database knows, so a counter that was lost cannot
    /// hand out a seq twice). Returns the seq.
    pub async fn publish(
        &self,
        run_id: &RunId,
        event: &RunEvent,
        floor: Seq,
    ) -> Result<Seq, EventError> {
        match self {
            Self::Redis(bus) => bus.publish(run_id, event, floor).await,
            Self::Local(bus) => bus.publish(run_id, event, floor).await,
        }
    }

    /// Publishes `event` at a seq obtained from [`Self::reserve`].
    pub async fn publish_at(
        &self,
        run_id: &RunId,
        seq: Seq,
        event: &RunEvent,
    ) -> Result<(), EventError> {
        match self {
            Self::Redis(bus) => bus.publish_at(run_id, seq, event).await,
            Self::Local(bus) => bus.publish_at(run_id, seq, event).await,
        }
    }

    /// Reserves `n` consecutive seqs and returns the first. Used for the events that are
    /// committed to the database before they are published (the final answer and status).
    pub async fn reserve(&self, run_id: &RunId, n: u32, floor: Seq) -> Result<Seq, EventError> {
        match self {
            Self::Redis(bus) => bus.reserve(run_id, n, floor).await,
            Self::Local(bus) => bus.reserve(run_id, n, floor).await,
        }
    }

    /// The run's buffered events after `after` (exclusive), or `None` when the run has no
    /// buffer (never published, or expired).
    pub async fn read_after(
        &self,
        run_id: &RunId,
        after: Seq,
    ) -> Result<Option<Vec<StoredEvent>>, EventError> {
        match self {
            Self::Redis(bus) => bus.read_after(run_id, after).await,
            Self::Local(bus) => bus.read_after(run_id, after).await,
        }
    }

    /// Whether the backend answers. Redis: also refreshes a connection that died while it was
    /// idle, so a worker pings before it claims a run.
    pub async fn ping(&self) -> Result<(), EventError> {
        match self {
            Self::Redis(bus) => bus.ping().await,
            Self::Local(bus) => bus.ping().await,
        }
    }

    /// [`Self::ping`], unless the backend answered within `fresh` (a busy worker's connection
    /// is known to be alive; only an idle one may have died unnoticed).
    pub async fn ping_if_idle(&self, fresh: Duration) -> Result<(), EventError> {
        match self {
            Self::Redis(bus) => bus.ping_if_idle(fresh).await,
            Self::Local(bus) => bus.ping_if_idle(fresh).await,
        }
    }
}
