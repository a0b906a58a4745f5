//! `conversations`: the threads a user sees in the list.

use chrono::{DateTime, Utc};
use sqlx::types::Json;

use crate::{
    db::{Ex, sqlite_time},
    ids::{ConversationId, UserId},
    per_db,
};

/// A stored conversation.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
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
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    id: &ConversationId,
    title: &str,
) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            "INSERT INTO conversations (id, user_id, title) VALUES ($1, $2, $3)",
            id.as_str(),
            user.as_str(),
            title
        )
        .execute(e)
        .await
        .map(drop),
        sqlite(e) => sqlx::query("INSERT INTO conversations (id, user_id, title) VALUES (?1, ?2, ?3)")
            .bind(id.as_str())
            .bind(user.as_str())
            .bind(title)
            .execute(e)
            .await
            .map(drop),
    )
}

/// Locks the user's conversation for the rest of the transaction; `false` if it is not theirs
/// or does not exist. Serialises turn creation per conversation (the busy check). On SQLite the
/// transaction's write lock already serialises it.
pub async fn lock_owned(
    tx: impl Into<Ex<'_>>,
    user: &UserId,
    id: &ConversationId,
) -> sqlx::Result<bool> {
    let row = per_db!(tx,
        pg(e) => sqlx::query_scalar!(
            "SELECT 1 AS one FROM conversations WHERE id = $1 AND user_id = $2 FOR UPDATE",
            id.as_str(),
            user.as_str()
        )
        .fetch_optional(e)
        .await?,
        sqlite(e) => sqlx::query_scalar("SELECT 1 FROM conversations WHERE id = ?1 AND user_id = ?2")
            .bind(id.as_str())
            .bind(user.as_str())
            .fetch_optional(e)
            .await?,
    );
    Ok(row.is_some())
}

/// Inserts many conversations of one user at once (a batch's fresh conversations).
pub async fn insert_many(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    ids: &[&str],
    titles: &[&str],
) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            r#"INSERT INTO conversations (id, user_id, title)
               SELECT id, $1, title FROM UNNEST($2::text[], $3::text[]) AS t(id, title)"#,
            user.as_str(),
            ids as &[&str],
            titles as &[&str]
        )
        .execute(e)
        .await
        .map(drop),
        sqlite(e) => sqlx::query(
            r"INSERT INTO conversations (id, user_id, title)
              SELECT i.value, ?1, t.value FROM json_each(?2) i JOIN json_each(?3) t ON t.key = i.key",
        )
        .bind(user.as_str())
        .bind(Json(ids))
        .bind(Json(titles))
        .execute(e)
        .await
        .map(drop),
    )
}

/// Which of `ids` are the user's conversations.
pub async fn owned_among(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    ids: &[&str],
) -> sqlx::Result<Vec<String>> {
    per_db!(ex,
        pg(e) => sqlx::query_scalar!(
            "SELECT id FROM conversations WHERE user_id = $1 AND id = ANY($2)",
            user.as_str(),
            ids as &[&str]
        )
        .fetch_all(e)
        .await,
        sqlite(e) => sqlx::query_scalar(
            "SELECT id FROM conversations WHERE user_id = ?1 AND id IN (SELECT value FROM json_each(?2))",
        )
        .bind(user.as_str())
        .bind(Json(ids))
        .fetch_all(e)
        .await,
    )
}

/// Marks conversations as updated now.
pub async fn touch_many(ex: impl Into<Ex<'_>>, ids: &[&str]) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            "UPDATE conversations SET updated_at = now() WHERE id = ANY($1)",
            ids as &[&str]
        )
        .execute(e)
        .await
        .map(drop),
        sqlite(e) => sqlx::query(
            r"UPDATE conversations SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
              WHERE id IN (SELECT value FROM json_each(?1))",
        )
        .bind(Json(ids))
        .execute(e)
        .await
        .map(drop),
    )
}

pub async fn get(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    id: &ConversationId,
) -> sqlx::Result<Option<Conversation>> {
    per_db!(ex,
        pg(e) => sqlx::query_as!(
            Conversation,
            "SELECT id, title, created_at, updated_at FROM conversations WHERE id = $1 AND user_id = $2",
            id.as_str(),
            user.as_str()
        )
        .fetch_optional(e)
        .await,
        sqlite(e) => sqlx::query_as(
            "SELECT id, title, created_at, updated_at FROM conversations WHERE id = ?1 AND user_id = ?2",
        )
        .bind(id.as_str())
        .bind(user.as_str())
        .fetch_optional(e)
        .await,
    )
}

/// Newest-updated first, `limit` rows after `cursor`.
pub async fn list(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    limit: i64,
    cursor: Option<&ListCursor>,
) -> sqlx::Result<Vec<Conversation>> {
    let (after_time, after_id) = match cursor {
        Some(c) => (Some(c.updated_at), Some(c.id.as_str())),
        None => (None, None),
    };
    per_db!(ex,
        pg(e) => sqlx::query_as!(
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
        .fetch_all(e)
        .await,
        sqlite(e) => sqlx::query_as(
            r"SELECT id, title, created_at, updated_at FROM conversations
              WHERE user_id = ?1 AND (?2 IS NULL OR (updated_at, id) < (?2, ?3))
              ORDER BY updated_at DESC, id DESC
              LIMIT ?4",
        )
        .bind(user.as_str())
        .bind(after_time.map(sqlite_time))
        .bind(after_id)
        .bind(limit)
        .fetch_all(e)
        .await,
    )
}

/// Deletes the conversation with its messages and runs; `false` if it was not the user's.
pub async fn delete(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    id: &ConversationId,
) -> sqlx::Result<bool> {
    let deleted = per_db!(ex,
        pg(e) => sqlx::query!(
            "DELETE FROM conversations WHERE id = $1 AND user_id = $2",
            id.as_str(),
            user.as_str()
        )
        .execute(e)
        .await?
        .rows_affected(),
        sqlite(e) => sqlx::query("DELETE FROM conversations WHERE id = ?1 AND user_id = ?2")
            .bind(id.as_str())
            .bind(user.as_str())
            .execute(e)
            .await?
            .rows_affected(),
    );
    Ok(deleted > 0)
}
