//! Reading runs and following their events.
//!
//! Attaching to a run's events: register for live events first, then replay the Stream after
//! the client's cursor, then relay live events, dropping any seq already sent. A gap in the
//! live feed (or a resubscription after a Redis outage) is filled from the Stream. A finished
//! run whose Stream expired is replayed from Postgres.

use chrono::{DateTime, Utc};
use conveyor_shared::{
    events::{HubMessage, StoredEvent},
    ids::{RunId, Seq, UserId},
    queue::{QueueName, RunJob},
    run_control,
    store::{run_events, runs},
};
use futures::Stream;
use serde::Serialize;

use crate::{error::ApiError, state::AppState};

/// `GET /api/{user_id}/runs/{run_id}`.
#[derive(Debug, Serialize)]
pub struct RunView {
    pub id: String,
    pub conversation_id: String,
    pub status: String,
    pub attempt: i32,
    pub error: Option<serde_json::Value>,
    pub batch_id: Option<String>,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

pub async fn get(state: &AppState, user: &UserId, run_id: &RunId) -> Result<RunView, ApiError> {
    let run = runs::get(&state.db, user, run_id.as_str())
        .await?
        .ok_or(ApiError::NotFound("run"))?;
    Ok(RunView {
        id: run.id,
        conversation_id: run.conversation_id,
        status: run.status,
        attempt: run.attempt,
        error: run.error,
        batch_id: run.batch_id,
        queued_at: run.queued_at,
        started_at: run.started_at,
        finished_at: run.finished_at,
    })
}

/// Cancels a run: a queued one at once, a running one by asking its worker (it stops within
/// about a second and commits what it has). Returns whether anything changed.
pub async fn cancel(
    state: &AppState,
    user: &UserId,
    run_id: &RunId,
) -> Result<(bool, RunView), ApiError> {
    let mut tx = state.db.begin().await?;
    let run = runs::lock_owned(&mut tx, user, run_id.as_str())
        .await?
        .ok_or(ApiError::NotFound("run"))?;
    if is_terminal(&run.status) {
        drop(tx);
        return Ok((false, get(state, user, run_id).await?));
    }
    runs::request_cancel(&mut tx, run_id.as_str()).await?;
    tx.commit().await?;
    if run.status == "queued" {
        match run_control::cancel_queued(&state.db, &state.bus, run_id).await {
            Ok(true) => enqueue_next(state, &run.conversation_id).await,
            Ok(false) => {}
            // The run is marked; the worker that takes its job finishes the cancel.
            Err(error) => tracing::warn!(run_id = %run_id, %error, "cannot finish the cancel now"),
        }
    }
    tracing::info!(run_id = %run_id, user_id = %user, "run cancel requested");
    Ok((true, get(state, user, run_id).await?))
}

/// Pushes the conversation's next queued run (it waited for the cancelled one).
async fn enqueue_next(state: &AppState, conversation_id: &str) {
    match runs::next_in_conversation(&state.db, conversation_id).await {
        Ok(Some((next, batch_id))) => {
            let queue = if batch_id.is_some() {
                QueueName::Batch
            } else {
                QueueName::Chat
            };
            if let Err(error) = state.producer.push(queue, RunJob::new(next.as_str())).await {
                tracing::warn!(run_id = next, %error, "cannot enqueue; the sweeper will");
            }
        }
        Ok(None) => {}
        Err(error) => tracing::warn!(conversation_id, %error, "cannot look up the next run"),
    }
}

/// What attaching to a run's events gives.
pub enum Attach<S> {
    /// The cursor is at or past the run's terminal event: nothing more will come.
    Finished,
    Events(S),
}

/// Attaches to `run_id`'s events after `after` (exclusive).
pub async fn attach(
    state: &AppState,
    user: &UserId,
    run_id: &RunId,
    after: Seq,
) -> Result<Attach<impl Stream<Item = StoredEvent> + Send + 'static>, ApiError> {
    let run = runs::get(&state.db, user, run_id.as_str())
        .await?
        .ok_or(ApiError::NotFound("run"))?;
    if is_terminal(&run.status) && after > 0 {
        let stored = run_events::list(&state.db, run_id.as_str()).await?;
        if let Some(end) = stored.iter().find(|e| e.kind.is_terminal())
            && after >= end.seq
        {
            return Ok(Attach::Finished);
        }
    }
    Ok(Attach::Events(follow(state.clone(), run_id.clone(), after)))
}

fn is_terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "cancelled")
}

fn follow(
    state: AppState,
    run_id: RunId,
    after: Seq,
) -> impl Stream<Item = StoredEvent> + Send + 'static {
    async_stream::stream! {
        let mut live = state.hub.subscribe(&run_id);
        let mut last = after;
        let mut replay_needed = true;
        let mut resynced = false;
        loop {
            if replay_needed {
                replay_needed = false;
                let buffered = match state.bus.read_after(&run_id, last).await {
                    Ok(events) => events,
                    Err(error) => {
                        tracing::warn!(run_id = %run_id, %error, "cannot replay the event buffer");
                        Some(Vec::new())
                    }
                };
                let mut events = match buffered {
                    Some(events) => events,
                    // No buffer: expired after the end, or lost with Redis. Postgres has the
                    // durable events of a finished run.
                    None => durable_after(&state, &run_id, last).await,
                };
                // The buffer starts later than the cursor: a batch run's `run.queued` is only
                // in Postgres (the API does not publish thousands of them to nobody).
                if let Some(first) = events.first().map(|e| e.seq)
                    && first > last + 1
                {
                    let mut earlier = stored_between(&state, &run_id, last, first).await;
                    earlier.append(&mut events);
                    events = earlier;
                }
                // After an outage the run may have ended while its terminal events could not
                // be published: Postgres has them.
                if std::mem::take(&mut resynced) && !events.iter().any(|e| e.kind.is_terminal()) {
                    let known = events.last().map_or(last, |e| e.seq);
                    events.extend(durable_after(&state, &run_id, known).await);
                }
                for event in events {
                    if event.seq > last {
                        last = event.seq;
                        let end = event.kind.is_terminal();
                        yield event;
                        if end {
                            return;
                        }
                    }
                }
            }
            match live.recv().await {
                None => return,
                Some(HubMessage::Resync) => {
                    replay_needed = true;
                    resynced = true;
                }
                Some(HubMessage::Event(event)) => {
                    if event.seq <= last {
                        continue;
                    }
                    if event.seq > last + 1 {
                        // Missed something live: the Stream has it (and this event).
                        replay_needed = true;
                        continue;
                    }
                    last = event.seq;
                    let end = event.kind.is_terminal();
                    yield StoredEvent::clone(&event);
                    if end {
                        return;
                    }
                }
            }
        }
    }
}

/// Stored events with a seq strictly between `after` and `before`.
async fn stored_between(
    state: &AppState,
    run_id: &RunId,
    after: Seq,
    before: Seq,
) -> Vec<StoredEvent> {
    match run_events::list(&state.db, run_id.as_str()).await {
        Ok(events) => events
            .into_iter()
            .filter(|e| e.seq > after && e.seq < before)
            .collect(),
        Err(error) => {
            tracing::warn!(run_id = %run_id, %error, "cannot read stored events");
            Vec::new()
        }
    }
}

/// Durable events after `after` if the run has finished (else none: it is still going).
async fn durable_after(state: &AppState, run_id: &RunId, after: Seq) -> Vec<StoredEvent> {
    match run_events::list(&state.db, run_id.as_str()).await {
        Ok(events) if events.iter().any(|e| e.kind.is_terminal()) => {
            events.into_iter().filter(|e| e.seq > after).collect()
        }
        Ok(_) => Vec::new(),
        Err(error) => {
            tracing::warn!(run_id = %run_id, %error, "cannot read stored events");
            Vec::new()
        }
    }
}
