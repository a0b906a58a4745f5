//! `conversations`: the threads a user sees in the list.

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgExecutor};

use crate::ids::{ConversationId, UserId};

/// A stored conversation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Conversation {
    pub id: String,
    pub title: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A keyset position in the newest-first list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    pub updated_at: DateTime<Utc>,
    pub id: String,
}

pub async fn insert(
    conn: &mut PgConnection,
    user: &UserId,
    id: &ConversationId,
    title: &str,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO conversations (id, user_id, title) VALUES ($1, $2, $3)",
        id.as_str(),
        user.as_str(),
        title
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Locks the user's conversation for the rest of the transaction; `false` if it is not theirs
/// or does not exist. Serialises turn creation per conversation (the busy check).
pub async fn lock_owned(
    conn: &mut PgConnection,
    user: &UserId,
    id: &ConversationId,
) -> sqlx::Result<bool> {
    let row = sqlx::query_scalar!(
        "SELECT 1 AS one FROM conversations WHERE id = $1 AND user_id = $2 FOR UPDATE",
        id.as_str(),
        user.as_str()
    )
    .fetch_optional(conn)
    .await?;
    Ok(row.is_some())
}

/// Inserts many conversations of one user at once (a batch's fresh conversations).
pub async fn insert_many(
    conn: &mut PgConnection,
    user: &UserId,
    ids: &[&str],
    titles: &[&str],
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"INSERT INTO conversations (id, user_id, title)
           SELECT id, $1, title FROM UNNEST($2::text[], $3::text[]) AS t(id, title)"#,
        user.as_str(),
        ids as &[&str],
        titles as &[&str]
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Which of `ids` are the user's conversations.
pub async fn owned_among(
    conn: impl PgExecutor<'_>,
    user: &UserId,
    ids: &[&str],
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        "SELECT id FROM conversations WHERE user_id = $1 AND id = ANY($2)",
        user.as_str(),
        ids as &[&str]
    )
    .fetch_all(conn)
    .await
}

/// Marks conversations as updated now.
pub async fn touch_many(conn: impl PgExecutor<'_>, ids: &[&str]) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE conversations SET updated_at = now() WHERE id = ANY($1)",
        ids as &[&str]
    )
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn get(
    conn: impl PgExecutor<'_>,
    user: &UserId,
    id: &ConversationId,
) -> sqlx::Result<Option<Conversation>> {
    sqlx::query_as!(
        Conversation,
        "SELECT id, title, created_at, updated_at FROM conversations WHERE id = $1 AND user_id = $2",
        id.as_str(),
        user.as_str()
    )
    .fetch_optional(conn)
    .await
}

/// Newest-updated first, `limit` rows after `cursor`.
pub async fn list(
    conn: impl PgExecutor<'_>,
    user: &UserId,
    limit: i64,
    cursor: Option<&ListCursor>,
) -> sqlx::Result<Vec<Conversation>> {
    let (after_time, after_id) = match cursor {
        Some(c) => (Some(c.updated_at), Some(c.id.as_str())),
        None => (None, None),
    };
    sqlx::query_as!(
        Conversation,
        r#"SELECT id, title, created_at, updated_at FROM conversations
           WHERE user_id = $1
             AND ($2::timestamptz IS NULL OR (updated_at, id) < ($2, $3::text))
           ORDER BY updated_at DESC, id DESC
           LIMIT $4"#,
        user.as_str(),
        after_time,
        after_id,
        limit
    )
    .fetch_all(conn)
    .await
}

/// Deletes the conversation with its messages and runs; `false` if it was not the user's.
pub async fn delete(
    conn: impl PgExecutor<'_>,
    user: &UserId,
    id: &ConversationId,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "DELETE FROM conversations WHERE id = $1 AND user_id = $2",
        id.as_str(),
        user.as_str()
    )
    .execute(conn)
    .await?;
    Ok(done.rows_affected() > 0)
}
