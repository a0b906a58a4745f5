//! Accepting a chat turn: validate, persist (conversation, user message, run and its
//! `run.queued` event in one transaction), then publish and enqueue.
//!
//! The transaction is the durability point: once it commits, the turn cannot be lost. The
//! publish and the push after it may fail (Redis down); the run stays `queued` in Postgres and
//! the sweeper enqueues it again.

use conveyor_shared::{
    domain::Multitask,
    events::{RunEvent, StoredEvent},
    ids::{ConversationId, MessageId, RunId, UserId},
    queue::{QueueName, RunJob},
    run_control,
    store::{conversations, is_unique_violation, runs},
};
use std::fmt::Write as _;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::{error::ApiError, state::AppState};

/// The body of `POST /api/{user_id}/chat`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChatRequest {
    pub conversation_id: Option<ConversationId>,
    pub message: String,
    #[serde(default)]
    pub multitask: Option<Multitask>,
}

/// A turn that was accepted (now or by an earlier request with the same idempotency key).
#[derive(Debug, Clone)]
pub struct AcceptedTurn {
    pub run_id: RunId,
    pub conversation_id: ConversationId,
}

/// Checks the message: not blank, within the limit, no NUL.
pub(crate) fn validate_message(message: &str, max_chars: usize) -> Result<(), ApiError> {
    if message.trim().is_empty() {
        return Err(ApiError::validation("message", "message must not be empty"));
    }
    if message.contains('\0') {
        return Err(ApiError::validation(
            "message",
            "message must not contain NUL characters",
        ));
    }
    if message.chars().count() > max_chars {
        return Err(ApiError::validation(
            "message",
            format!("message must be at most {max_chars} characters"),
        ));
    }
    Ok(())
}

/// Checks an `Idempotency-Key` header value.
pub fn validate_idempotency_key(key: &str) -> Result<(), ApiError> {
    if key.is_empty() || key.len() > 255 || !key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ApiError::validation(
            "Idempotency-Key",
            "Idempotency-Key must be 1–255 visible ASCII characters",
        ));
    }
    Ok(())
}

fn request_hash(request: &ChatRequest) -> String {
    let mut hasher = Sha256::new();
    hasher.update(
        request
            .conversation_id
            .as_ref()
            .map_or("", ConversationId::as_str),
    );
    hasher.update([0]);
    hasher.update(&request.message);
    hasher.update([0]);
    hasher.update(format!("{:?}", request.multitask.unwrap_or_default()));
    hasher.finalize().iter().fold(String::new(), |mut hex, b| {
        let _ = write!(hex, "{b:02x}");
        hex
    })
}

/// Accepts a turn for `user`.
pub async fn accept(
    state: &AppState,
    user: &UserId,
    request: ChatRequest,
    idempotency_key: Option<&str>,
) -> Result<AcceptedTurn, ApiError> {
    validate_message(&request.message, state.config.max_message_chars)?;
    let hash = request_hash(&request);
    if let Some(key) = idempotency_key
        && let Some(existing) = runs::by_idempotency_key(&state.db, user, key).await?
    {
        return replay(&existing, &hash);
    }
    let multitask = request.multitask.unwrap_or_default();

    let run_id = RunId::new();
    let message_id = MessageId::new();
    let title = request
        .conversation_id
        .is_none()
        .then(|| title_of(&request.message));
    let conversation_id = request.conversation_id.clone().unwrap_or_default();
    let turn = |first_event| runs::NewTurn {
        run_id: run_id.as_str(),
        user_id: user.as_str(),
        conversation_id: conversation_id.as_str(),
        new_conversation_title: title.as_deref(),
        idempotency_key,
        request_hash: &hash,
        message_id: message_id.as_str(),
        message: &request.message,
        first_event,
    };
    let limit = state.config.max_active_runs_per_user;
    let mut interrupted = Vec::new();
    let (inserted, queued) = if title.is_some() && limit == 0 {
        // A new conversation with no per-user limit has nothing to check: one statement.
        let (queued, first) = queued_event(&conversation_id, 0);
        (
            runs::insert_turn(&state.db, turn(&first)).await,
            (queued, first.seq),
        )
    } else {
        let mut position = 0;
        let mut tx = state.db.begin().await?;
        if limit > 0 && runs::lock_user_and_count_active(&mut tx, user).await? >= i64::from(limit) {
            return Err(ApiError::RateLimited {
                retry_after_secs: 1,
                message: format!("at most {limit} unfinished runs per user"),
            });
        }
        if title.is_none() {
            if !conversations::lock_owned(&mut tx, user, &conversation_id).await? {
                return Err(ApiError::NotFound("conversation"));
            }
            let id = conversation_id.as_str();
            match (runs::active_in_conversation(&mut tx, id).await?, multitask) {
                (None, _) => {}
                (Some(active_run_id), Multitask::Reject) => {
                    return Err(ApiError::Busy { active_run_id });
                }
                (Some(_), Multitask::Interrupt) => {
                    interrupted = runs::cancel_active_in_conversation(&mut tx, id).await?;
                }
                (Some(_), Multitask::Enqueue) => {
                    position = runs::position_in_conversation(&mut tx, id, run_id.as_str()).await?;
                }
            }
        }
        let (queued, first) = queued_event(&conversation_id, position);
        let inserted = match runs::insert_turn(&mut tx, turn(&first)).await {
            Ok(()) => tx.commit().await,
            Err(error) => Err(error),
        };
        (inserted, (queued, first.seq))
    };
    match inserted {
        Ok(()) => {}
        Err(error) if is_unique_violation(&error) && idempotency_key.is_some() => {
            // A concurrent request with the same key won the race: answer with its run.
            let key = idempotency_key.unwrap_or_default();
            let existing = runs::by_idempotency_key(&state.db, user, key)
                .await?
                .ok_or(ApiError::Internal("idempotent run vanished".into()))?;
            return replay(&existing, &hash);
        }
        Err(error) => return Err(error.into()),
    }
    // After the commit nothing can lose the turn: failures below are repaired by the sweeper.
    for queued in interrupted {
        let queued = RunId::from_trusted(queued);
        if let Err(error) = run_control::cancel_queued(&state.db, &state.bus, &queued).await {
            // The worker that takes its job finishes the cancel.
            tracing::warn!(run_id = %queued, %error, "cannot cancel an interrupted run now");
        }
    }
    // Live at the seq it was stored with: a stream attached later replays it from the buffer.
    let (queued, queued_seq) = queued;
    if let Err(error) = state.bus.publish_at(&run_id, queued_seq, &queued).await {
        tracing::warn!(run_id = %run_id, %error, "cannot publish run.queued");
    }
    if let Err(error) = state
        .producer
        .push(QueueName::Chat, RunJob::new(run_id.as_str()))
        .await
    {
        tracing::warn!(run_id = %run_id, %error, "cannot enqueue the run; the sweeper will");
    }
    tracing::info!(run_id = %run_id, user_id = %user, conversation_id = %conversation_id, "turn accepted");
    Ok(AcceptedTurn {
        run_id,
        conversation_id,
    })
}

/// The run's first event, `run.queued`, and its stored form (seq 1).
fn queued_event(conversation_id: &ConversationId, position: i64) -> (RunEvent, StoredEvent) {
    let queued = RunEvent::Queued {
        conversation_id: conversation_id.clone(),
        position: u32::try_from(position).unwrap_or(u32::MAX),
    };
    let stored = StoredEvent {
        seq: 1,
        kind: queued.kind(),
        data: queued.data_json().into(),
    };
    (queued, stored)
}

fn replay(existing: &runs::Run, hash: &str) -> Result<AcceptedTurn, ApiError> {
    if existing.request_hash.as_deref() != Some(hash) {
        return Err(ApiError::IdempotencyKeyReused {
            run_id: existing.id.clone(),
        });
    }
    Ok(AcceptedTurn {
        run_id: RunId::from_trusted(existing.id.clone()),
        conversation_id: ConversationId::from_trusted(existing.conversation_id.clone()),
    })
}

/// A conversation's title: the start of its first message.
pub(crate) fn title_of(message: &str) -> String {
    let line = message.trim().lines().next().unwrap_or_default();
    let mut title: String = line.chars().take(80).collect();
    if line.chars().count() > 80 {
        title.push('…');
    }
    title
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_validated() {
        assert!(validate_message("hi", 10).is_ok());
        assert!(validate_message("   \n", 10).is_err());
        assert!(validate_message("a\0b", 10).is_err());
        assert!(validate_message(&"x".repeat(11), 10).is_err());
        assert!(validate_message(&"é".repeat(10), 10).is_ok());
    }

    #[test]
    fn titles_are_the_first_line_cut_short() {
        assert_eq!(title_of("  add milk\nand bread"), "add milk");
        assert_eq!(title_of(&"x".repeat(100)).chars().count(), 81);
    }

    #[test]
    fn the_request_hash_depends_on_every_field() {
        let a = ChatRequest {
            conversation_id: None,
            message: "hi".into(),
            multitask: None,
        };
        let b = ChatRequest {
            conversation_id: None,
            message: "ho".into(),
            multitask: None,
        };
        let c = ChatRequest {
            conversation_id: None,
            message: "hi".into(),
            multitask: Some(Multitask::Enqueue),
        };
        assert_ne!(request_hash(&a), request_hash(&b));
        assert_ne!(request_hash(&a), request_hash(&c));
        assert_eq!(
            request_hash(&a),
            request_hash(&ChatRequest {
                conversation_id: None,
                message: "hi".into(),
                multitask: Some(Multitask::Reject)
            })
        );
    }
}
