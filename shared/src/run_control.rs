//! Ending a run from outside its worker: cancelling one that has not started, or one whose
//! worker is gone.
//!
//! Shared by the API (`POST …/cancel`, `multitask=interrupt`) and the worker (a job for a run
//! whose cancel was requested before it started, or a dead worker's run whose cancel it never
//! saw), so all end it the same way: final status, the durable `run.cancelled` event and the
//! live one at the same seq.

use crate::{
    db::Db,
    events::{EventBus, EventError, RunEvent, StoredEvent},
    ids::RunId,
    store::{run_events, runs},
};

/// A failure to end a run.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Events(#[from] EventError),
}

/// Cancels `run_id` if it is still queued; `false` if it had started or ended meanwhile.
pub async fn cancel_queued(db: &Db, bus: &EventBus, run_id: &RunId) -> Result<bool, ControlError> {
    cancel_in_status(db, bus, run_id, "queued").await
}

/// Cancels `run_id` if it is `running` with no live worker, which only the caller can know (a
/// worker that has just taken over a dead worker's run whose cancel was requested). The dead
/// attempt's uncommitted answer is gone; the run ends with what was committed.
pub async fn cancel_abandoned(
    db: &Db,
    bus: &EventBus,
    run_id: &RunId,
) -> Result<bool, ControlError> {
    cancel_in_status(db, bus, run_id, "running").await
}

/// Cancels `run_id` if its status is still `expected`.
async fn cancel_in_status(
    db: &Db,
    bus: &EventBus,
    run_id: &RunId,
    expected: &str,
) -> Result<bool, ControlError> {
    let floor = run_events::max_seq(db, run_id.as_str()).await?;
    let mut tx = db.begin_durable().await?;
    match runs::lock(&mut tx, run_id.as_str()).await? {
        Some((status, _)) if status == expected => {}
        _ => return Ok(false),
    }
    let seq = bus.reserve(run_id, 1, floor).await?;
    let event = RunEvent::Cancelled;
    runs::finish(&mut tx, run_id.as_str(), "cancelled", None).await?;
    run_events::insert_many(
        &mut tx,
        run_id.as_str(),
        &[StoredEvent {
            seq,
            kind: event.kind(),
            data: event.data_json().into(),
        }],
    )
    .await?;
    tx.commit().await?;
    bus.publish_at(run_id, seq, &event).await?;
    Ok(true)
}
