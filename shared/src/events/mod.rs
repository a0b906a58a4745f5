//! Run events: what a client sees of a run, in order, resumable.
//!
//! The worker (and, for `run.queued`, the API) appends each event to the run's Redis Stream —
//! the replay buffer — and publishes it on one pub/sub channel in the same Lua call, with a
//! per-run sequence number from a Redis counter. API processes hold one subscription each and
//! fan events out to their SSE clients ([`hub`]); a client that attaches late or reconnects
//! replays the Stream after its last seen seq ([`bus::EventBus::read_after`]). Postgres keeps
//! every non-delta event of a finished run (`run_events`), so a run whose Stream expired can be
//! rebuilt.
//!
//! The embedded mode (one process, one SQLite file) swaps Redis for the file's `event_buffer`
//! table and an in-process hub ([`LocalBus`]), behind the same [`EventBus`].

pub mod bus;
pub mod hub;
mod local_bus;
pub(crate) mod redis_bus;
mod types;

pub use bus::{EventBus, EventError};
pub use hub::{EventHub, HubMessage, Subscription};
pub use local_bus::LocalBus;
pub use redis_bus::RedisBus;
pub use types::{EventKind, RunEvent, StoredEvent};
