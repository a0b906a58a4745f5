//! Conversations and their history, as the list and history views page through them.

use chrono::{DateTime, Utc};
use conveyor_shared::{
    ids::{ConversationId, RunId, UserId},
    store::{conversations, messages, runs},
};
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;

/// A page of a list: `{"data": [...], "next_cursor": …}`.
#[derive(Debug, Serialize)]
pub struct Page<T> {
    pub data: Vec<T>,
    pub next_cursor: Option<String>,
}

/// A conversation in the list.
#[derive(Debug, Serialize)]
pub struct ConversationView {
    pub id: String,
    pub title: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A message of the history.
#[derive(Debug, Serialize)]
pub struct MessageView {
    pub id: String,
    pub role: String,
    pub content: String,
    pub tool_calls: Value,
    pub tool_call_id: Option<String>,
    pub run_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Conversation cursors are `{updated_at µs}.{id}`: opaque to clients, stable under inserts.
fn encode_cursor(c: &conversations::Conversation) -> String {
    format!("{}.{}", c.updated_at.timestamp_micros(), c.id)
}

fn decode_cursor(cursor: &str) -> Result<conversations::ListCursor, ApiError> {
    let invalid = || ApiError::validation("cursor", "cursor is not one this API returned");
    let (micros, id) = cursor.split_once('.').ok_or_else(invalid)?;
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let updated_at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    let id = ConversationId::parse(id).map_err(|_| invalid())?;
    Ok(conversations::ListCursor {
        updated_at,
        id: id.as_str().to_owned(),
    })
}

/// History cursors are `{run queued_at µs}.{run_id}.{seq}`.
fn encode_history_cursor(c: &messages::HistoryCursor) -> String {
    format!(
        "{}.{}.{}",
        c.run_queued_at.timestamp_micros(),
        c.run_id,
        c.seq
    )
}

fn decode_history_cursor(cursor: &str) -> Result<messages::HistoryCursor, ApiError> {
    let invalid = || ApiError::validation("cursor", "cursor is not one this API returned");
    let mut parts = cursor.splitn(3, '.');
    let micros: i64 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(invalid)?;
    let run_id = RunId::parse(parts.next().ok_or_else(invalid)?).map_err(|_| invalid())?;
    let seq: i64 = parts
        .next()
        .and_then(|p| p.parse().ok())
        .ok_or_else(invalid)?;
    Ok(messages::HistoryCursor {
        run_queued_at: DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?,
        run_id: run_id.as_str().to_owned(),
        seq,
    })
}

pub async fn list(
    db: &conveyor_shared::db::Db,
    user: &UserId,
    limit: i64,
    cursor: Option<&str>,
) -> Result<Page<ConversationView>, ApiError> {
    let cursor = cursor.map(decode_cursor).transpose()?;
    let mut rows = conversations::list(db, user, limit + 1, cursor.as_ref()).await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more {
        rows.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Page {
        data: rows
            .into_iter()
            .map(|c| ConversationView {
                id: c.id,
                title: c.title,
                created_at: c.created_at,
                updated_at: c.updated_at,
            })
            .collect(),
        next_cursor,
    })
}

pub async fn messages(
    db: &conveyor_shared::db::Db,
    user: &UserId,
    id: &ConversationId,
    limit: i64,
    cursor: Option<&str>,
) -> Result<Page<MessageView>, ApiError> {
    let after = cursor.map(decode_history_cursor).transpose()?;
    if conversations::get(db, user, id).await?.is_none() {
        return Err(ApiError::NotFound("conversation"));
    }
    let mut rows = messages::list(db, user, id, limit + 1, after.as_ref()).await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let next_cursor = if more {
        rows.last()
            .and_then(messages::Message::cursor)
            .map(|c| encode_history_cursor(&c))
    } else {
        None
    };
    Ok(Page {
        data: rows
            .into_iter()
            .map(|m| MessageView {
                id: m.id,
                role: m.role,
                content: m.content,
                tool_calls: m.tool_calls,
                tool_call_id: m.tool_call_id,
                run_id: m.run_id,
                status: m.status,
                created_at: m.created_at,
            })
            .collect(),
        next_cursor,
    })
}

pub async fn delete(
    db: &conveyor_shared::db::Db,
    user: &UserId,
    id: &ConversationId,
) -> Result<(), ApiError> {
    if conversations::delete(db, user, id).await? {
        Ok(())
    } else {
        Err(ApiError::NotFound("conversation"))
    }
}

/// The conversation's active run, if any (404 if the conversation is not the user's).
pub async fn active_run(
    db: &conveyor_shared::db::Db,
    user: &UserId,
    id: &ConversationId,
) -> Result<Option<RunId>, ApiError> {
    if conversations::get(db, user, id).await?.is_none() {
        return Err(ApiError::NotFound("conversation"));
    }
    Ok(runs::active_in_conversation(db, id.as_str())
        .await?
        .map(RunId::from_trusted))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = conversations::Conversation {
            id: ConversationId::new().to_string(),
            title: None,
            created_at: Utc::now(),
            updated_at: DateTime::from_timestamp_micros(1_700_000_000_123_456).unwrap(),
        };
        let decoded = decode_cursor(&encode_cursor(&c)).unwrap();
        assert_eq!(decoded.updated_at, c.updated_at);
        assert_eq!(decoded.id, c.id);
        assert!(decode_cursor("nope").is_err());
        assert!(decode_cursor("12.conv_bad").is_err());
    }
}
