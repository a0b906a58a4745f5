//! Run events: what a client sees of a run, in order, resumable.
//!
//! The worker (and, for `run.queued`, the API) appends each event to the run's Redis Stream —
//! the replay buffer — and publishes it on one pub/sub channel in the same Lua call, with a
//! per-run sequence number from a Redis counter. API processes hold one subscription each and
//! fan events out to their SSE clients ([`hub`]); a client that attaches late or reconnects
//! replays the Stream after its last seen seq ([`bus::EventBus::read_after`]). Postgres keeps
//! every non-delta event of a finished run (`run_events`), so a run whose Stream expired can be
//! rebuilt.

pub mod bus;
pub mod hub;
mod types;

pub use bus::{EventBus, EventError};
pub use hub::{EventHub, HubMessage, Subscription};
pub use types::{EventKind, RunEvent, StoredEvent};
