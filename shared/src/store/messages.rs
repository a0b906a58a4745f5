//! `messages`: a conversation's history, in order.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use crate::{
    db::{Ex, sqlite_time},
    ids::{ConversationId, MessageId, UserId},
    per_db,
};

/// A stored message.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Message {
    pub id: String,
    pub seq: i64,
    pub role: String,
    pub content: String,
    pub tool_calls: Value,
    pub tool_call_id: Option<String>,
    pub run_id: Option<String>,
    pub status: Option<String>,
    pub created_at: DateTime<Utc>,
    /// When the message's run was queued (its place in the conversation).
    pub run_queued_at: Option<DateTime<Utc>>,
}

/// A message a run adds to its conversation (see [`super::runs::finish_attempt`]).
#[derive(Debug, Clone)]
pub struct NewMessage<'a> {
    pub id: MessageId,
    pub role: &'a str,
    pub content: &'a str,
    pub tool_calls: Value,
    pub tool_call_id: Option<&'a str>,
    pub status: Option<&'a str>,
}

/// The user messages of many runs at once (a batch's lines), each with status `NULL`.
#[derive(Debug, Clone, Copy)]
pub struct NewUserMessages<'a> {
    pub user_id: &'a str,
    pub ids: &'a [&'a str],
    pub conversation_ids: &'a [&'a str],
    pub run_ids: &'a [&'a str],
    pub contents: &'a [&'a str],
}

pub async fn insert_user_many(ex: impl Into<Ex<'_>>, m: NewUserMessages<'_>) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            r#"INSERT INTO messages (id, conversation_id, user_id, run_id, role, content)
               SELECT id, conversation_id, $1, run_id, 'user', content
               FROM UNNEST($2::text[], $3::text[], $4::text[], $5::text[])
                    AS t(id, conversation_id, run_id, content)"#,
            m.user_id,
            m.ids as &[&str],
            m.conversation_ids as &[&str],
            m.run_ids as &[&str],
            m.contents as &[&str]
        )
        .execute(e)
        .await
        .map(drop),
        // `ORDER BY i.key` numbers the rows in slice order.
        sqlite(e) => sqlx::query(
            r"INSERT INTO messages (id, conversation_id, user_id, run_id, role, content)
              SELECT i.value, c.value, ?1, r.value, 'user', t.value
              FROM json_each(?2) i
                   JOIN json_each(?3) c ON c.key = i.key
                   JOIN json_each(?4) r ON r.key = i.key
                   JOIN json_each(?5) t ON t.key = i.key
              ORDER BY i.key",
        )
        .bind(m.user_id)
        .bind(Json(m.ids))
        .bind(Json(m.conversation_ids))
        .bind(Json(m.run_ids))
        .bind(Json(m.contents))
        .execute(e)
        .await
        .map(drop),
    )
}

/// A position in a conversation's history. Messages are ordered by their run's place in the
/// conversation, then by insertion: a turn enqueued behind a running one stores its user
/// message early, but it belongs after the earlier run's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryCursor {
    pub run_queued_at: DateTime<Utc>,
    pub run_id: String,
    pub seq: i64,
}

impl Message {
    /// This message's position, for the next page's cursor.
    pub fn cursor(&self) -> Option<HistoryCursor> {
        Some(HistoryCursor {
            run_queued_at: self.run_queued_at?,
            run_id: self.run_id.clone()?,
            seq: self.seq,
        })
    }
}

/// What the model sees of the conversation when it answers `run_id`: the last `window`
/// messages of this run and the runs before it, oldest first.
pub async fn history_for_run(
    ex: impl Into<Ex<'_>>,
    conversation_id: &str,
    run_id: &str,
    window: i64,
) -> sqlx::Result<Vec<Message>> {
    let mut rows: Vec<Message> = per_db!(ex,
        pg(e) => sqlx::query_as!(
            Message,
            r#"SELECT m.id, m.seq, m.role, m.content, m.tool_calls, m.tool_call_id, m.run_id, m.status,
                      m.created_at, r.queued_at AS "run_queued_at?"
               FROM messages m JOIN runs r ON r.id = m.run_id
               WHERE m.conversation_id = $1
                 AND (r.queued_at, r.id) <= (SELECT queued_at, id FROM runs WHERE id = $2)
               ORDER BY r.queued_at DESC, r.id DESC, m.seq DESC LIMIT $3"#,
            conversation_id,
            run_id,
            window
        )
        .fetch_all(e)
        .await?,
        sqlite(e) => sqlx::query_as(
            r"SELECT m.id, m.seq, m.role, m.content, m.tool_calls, m.tool_call_id, m.run_id, m.status,
                     m.created_at, r.queued_at AS run_queued_at
              FROM messages m JOIN runs r ON r.id = m.run_id
              WHERE m.conversation_id = ?1
                AND (r.queued_at, r.id) <= (SELECT queued_at, id FROM runs WHERE id = ?2)
              ORDER BY r.queued_at DESC, r.id DESC, m.seq DESC LIMIT ?3",
        )
        .bind(conversation_id)
        .bind(run_id)
        .bind(window)
        .fetch_all(e)
        .await?,
    );
    rows.reverse();
    Ok(rows)
}

/// A page of the user's conversation history in order, after `cursor`.
pub async fn list(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    conversation_id: &ConversationId,
    limit: i64,
    cursor: Option<&HistoryCursor>,
) -> sqlx::Result<Vec<Message>> {
    per_db!(ex,
        pg(e) => sqlx::query_as!(
            Message,
            r#"SELECT m.id, m.seq, m.role, m.content, m.tool_calls, m.tool_call_id, m.run_id, m.status,
                      m.created_at, r.queued_at AS "run_queued_at?"
               FROM messages m JOIN runs r ON r.id = m.run_id
               WHERE m.conversation_id = $1 AND m.user_id = $2
                 AND ($3::timestamptz IS NULL OR (r.queued_at, r.id, m.seq) > ($3, $4::text, $5::bigint))
               ORDER BY r.queued_at, r.id, m.seq LIMIT $6"#,
            conversation_id.as_str(),
            user.as_str(),
            cursor.map(|c| c.run_queued_at),
            cursor.map(|c| c.run_id.as_str()),
            cursor.map(|c| c.seq),
            limit
        )
        .fetch_all(e)
        .await,
        sqlite(e) => sqlx::query_as(
            r"SELECT m.id, m.seq, m.role, m.content, m.tool_calls, m.tool_call_id, m.run_id, m.status,
                     m.created_at, r.queued_at AS run_queued_at
              FROM messages m JOIN runs r ON r.id = m.run_id
              WHERE m.conversation_id = ?1 AND m.user_id = ?2
                AND (?3 IS NULL OR (r.queued_at, r.id, m.seq) > (?3, ?4, ?5))
              ORDER BY r.queued_at, r.id, m.seq LIMIT ?6",
        )
        .bind(conversation_id.as_str())
        .bind(user.as_str())
        .bind(cursor.map(|c| sqlite_time(c.run_queued_at)))
        .bind(cursor.map(|c| c.run_id.as_str()))
        .bind(cursor.map(|c| c.seq))
        .bind(limit)
        .fetch_all(e)
        .await,
    )
}
