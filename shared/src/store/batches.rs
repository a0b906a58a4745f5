//! `batches`: a user's uploaded set of prompts, each line a run (`runs.batch_id`).
//!
//! A batch row holds only what does not change per line: owner, total, metadata, deadline and
//! the final status. Counts are derived from the runs with one aggregate, so no counter can
//! drift from the truth; the final status is set by [`settle`] once no run of the batch is
//! left, by whoever ends the last one (a worker, a cancel, the sweeper).

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use crate::{
    db::{Ex, Tx, sqlite_time},
    ids::UserId,
    per_db,
};

/// Statuses in which a batch still has work (or a cancel) in flight.
pub const OPEN_STATUSES: [&str; 3] = ["validating", "in_progress", "cancelling"];

/// A stored batch with its counts.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Batch {
    pub id: String,
    pub status: String,
    pub metadata: Option<Value>,
    pub completion_window: Option<String>,
    pub total: i32,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A batch to insert (status `in_progress`: lines are validated before anything is stored).
#[derive(Debug, Clone)]
pub struct NewBatch<'a> {
    pub id: &'a str,
    pub user_id: &'a str,
    pub metadata: Option<&'a Value>,
    pub completion_window: &'a str,
    pub expires_at: DateTime<Utc>,
    pub total: i32,
}

/// A keyset position in the newest-first list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListCursor {
    pub created_at: DateTime<Utc>,
    pub id: String,
}

pub async fn insert(ex: impl Into<Ex<'_>>, batch: NewBatch<'_>) -> sqlx::Result<()> {
    per_db!(ex,
    pg(e) => sqlx::query!(
        r#"INSERT INTO batches (id, user_id, status, metadata, completion_window, expires_at, total)
           VALUES ($1, $2, 'in_progress', $3, $4, $5, $6)"#,
        batch.id,
        batch.user_id,
        batch.metadata,
        batch.completion_window,
        batch.expires_at,
        batch.total
    )
    .execute(e)
    .await
    .map(drop),
    sqlite(e) => sqlx::query(
        r"INSERT INTO batches (id, user_id, status, metadata, completion_window, expires_at, total)
          VALUES (?1, ?2, 'in_progress', ?3, ?4, ?5, ?6)",
    )
    .bind(batch.id)
    .bind(batch.user_id)
    .bind(batch.metadata)
    .bind(batch.completion_window)
    .bind(sqlite_time(batch.expires_at))
    .bind(batch.total)
    .execute(e)
    .await
    .map(drop),
    )
}

/// Serialises batch creation per user for the rest of the transaction, then counts the user's
/// open batches (on SQLite the transaction's write lock already serialises it).
pub async fn lock_user_and_count_open(tx: &mut Tx, user: &UserId) -> sqlx::Result<i64> {
    match tx {
        Tx::Postgres(tx) => {
            sqlx::query!(
                "SELECT pg_advisory_xact_lock(hashtext('batches:' || $1))",
                user.as_str()
            )
            .execute(&mut **tx)
            .await?;
            sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM batches WHERE user_id = $1 AND status = ANY($2)"#,
                user.as_str(),
                &OPEN_STATUSES as &[&str]
            )
            .fetch_one(&mut **tx)
            .await
        }
        Tx::Sqlite(tx) => {
            sqlx::query_scalar(
                "SELECT count(*) FROM batches WHERE user_id = ?1 AND status IN (SELECT value FROM json_each(?2))",
            )
            .bind(user.as_str())
            .bind(Json(OPEN_STATUSES))
            .fetch_one(&mut **tx)
            .await
        }
    }
}

/// A batch with its counts, for the SQLite statements (Postgres's are checked literals).
macro_rules! sqlite_batch_select {
    ($from:literal) => {
        concat!(
            "SELECT b.id, b.status, b.metadata, b.completion_window, b.total, ",
            "(SELECT count(*) FROM runs r WHERE r.batch_id = b.id AND r.status = 'completed') AS completed, ",
            "(SELECT count(*) FROM runs r WHERE r.batch_id = b.id AND r.status = 'failed') AS failed, ",
            "(SELECT count(*) FROM runs r WHERE r.batch_id = b.id AND r.status = 'cancelled') AS cancelled, ",
            "b.created_at, b.expires_at, b.cancel_requested_at, b.finished_at FROM ",
            $from
        )
    };
}

/// The user's batch with its counts, or `None` when it is not theirs.
pub async fn get(ex: impl Into<Ex<'_>>, user: &UserId, id: &str) -> sqlx::Result<Option<Batch>> {
    per_db!(ex,
    pg(e) => sqlx::query_as!(
        Batch,
        r#"SELECT b.id, b.status, b.metadata, b.completion_window, b.total,
                  c.completed AS "completed!", c.failed AS "failed!", c.cancelled AS "cancelled!",
                  b.created_at, b.expires_at, b.cancel_requested_at, b.finished_at
           FROM batches b
           CROSS JOIN LATERAL (
               SELECT count(*) FILTER (WHERE r.status = 'completed') AS completed,
                      count(*) FILTER (WHERE r.status = 'failed') AS failed,
                      count(*) FILTER (WHERE r.status = 'cancelled') AS cancelled
               FROM runs r WHERE r.batch_id = b.id) c
           WHERE b.id = $1 AND b.user_id = $2"#,
        id,
        user.as_str()
    )
    .fetch_optional(e)
    .await,
    sqlite(e) => sqlx::query_as(sqlite_batch_select!("batches b WHERE b.id = ?1 AND b.user_id = ?2"))
        .bind(id)
        .bind(user.as_str())
        .fetch_optional(e)
        .await,
    )
}

/// The user's batches, newest first, `limit` rows after `cursor`.
pub async fn list(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    limit: i64,
    cursor: Option<&ListCursor>,
) -> sqlx::Result<Vec<Batch>> {
    per_db!(ex,
    pg(e) => sqlx::query_as!(
        Batch,
        r#"SELECT b.id, b.status, b.metadata, b.completion_window, b.total,
                  c.completed AS "completed!", c.failed AS "failed!", c.cancelled AS "cancelled!",
                  b.created_at, b.expires_at, b.cancel_requested_at, b.finished_at
           FROM (SELECT * FROM batches
                 WHERE user_id = $1
                   AND ($2::timestamptz IS NULL OR (created_at, id) < ($2, $3::text))
                 ORDER BY created_at DESC, id DESC
                 LIMIT $4) b
           CROSS JOIN LATERAL (
               SELECT count(*) FILTER (WHERE r.status = 'completed') AS completed,
                      count(*) FILTER (WHERE r.status = 'failed') AS failed,
                      count(*) FILTER (WHERE r.status = 'cancelled') AS cancelled
               FROM runs r WHERE r.batch_id = b.id) c
           ORDER BY b.created_at DESC, b.id DESC"#,
        user.as_str(),
        cursor.map(|c| c.created_at),
        cursor.map(|c| c.id.as_str()),
        limit
    )
    .fetch_all(e)
    .await,
    sqlite(e) => sqlx::query_as(sqlite_batch_select!(
        "batches b WHERE b.user_id = ?1 AND (?2 IS NULL OR (b.created_at, b.id) < (?2, ?3)) \
         ORDER BY b.created_at DESC, b.id DESC LIMIT ?4"
    ))
    .bind(user.as_str())
    .bind(cursor.map(|c| sqlite_time(c.created_at)))
    .bind(cursor.map(|c| c.id.as_str()))
    .bind(limit)
    .fetch_all(e)
    .await,
    )
}

/// Marks the user's open batch as cancelling; `None` when it is not theirs, else its status
/// before (only an `in_progress` batch changes).
pub async fn request_cancel(tx: &mut Tx, user: &UserId, id: &str) -> sqlx::Result<Option<String>> {
    let before: Option<String> = per_db!(&mut *tx,
        pg(e) => sqlx::query_scalar!(
            "SELECT status FROM batches WHERE id = $1 AND user_id = $2 FOR UPDATE",
            id,
            user.as_str()
        )
        .fetch_optional(e)
        .await?,
        sqlite(e) => sqlx::query_scalar("SELECT status FROM batches WHERE id = ?1 AND user_id = ?2")
            .bind(id)
            .bind(user.as_str())
            .fetch_optional(e)
            .await?,
    );
    if before.as_deref() == Some("in_progress") {
        per_db!(tx,
            pg(e) => sqlx::query!(
                r#"UPDATE batches SET status = 'cancelling', cancel_requested_at = now(), updated_at = now()
                   WHERE id = $1"#,
                id
            )
            .execute(e)
            .await
            .map(drop)?,
            sqlite(e) => sqlx::query(
                r"UPDATE batches SET status = 'cancelling',
                         cancel_requested_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                  WHERE id = ?1",
            )
            .bind(id)
            .execute(e)
            .await
            .map(drop)?,
        );
    }
    Ok(before)
}

/// Ends every queued run of the batch as `cancelled` (with `error`, if given) and stores each
/// one's `run.cancelled` event; returns how many. A worker that later takes such a run's job
/// finds it finished and does nothing.
pub async fn cancel_queued_runs(
    ex: impl Into<Ex<'_>>,
    batch_id: &str,
    error: Option<&Value>,
) -> sqlx::Result<u64> {
    per_db!(ex,
    pg(e) => Ok(sqlx::query!(
        r#"WITH cancelled AS (
               UPDATE runs SET status = 'cancelled', cancel_requested = true, error = $2,
                      finished_at = now(), worker = NULL
               WHERE batch_id = $1 AND status = 'queued'
               RETURNING id)
           INSERT INTO run_events (run_id, seq, kind, data)
           SELECT c.id,
                  COALESCE((SELECT max(e.seq) FROM run_events e WHERE e.run_id = c.id), 0) + 1,
                  'run.cancelled', '{"status": "cancelled"}'::jsonb
           FROM cancelled c
           ON CONFLICT DO NOTHING"#,
        batch_id,
        error
    )
    .execute(e)
    .await?
    .rows_affected()),
    sqlite_tx(c) => {
        let cancelled: Vec<String> = sqlx::query_scalar(
            r"UPDATE runs SET status = 'cancelled', cancel_requested = 1, error = ?2,
                     finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), worker = NULL
              WHERE batch_id = ?1 AND status = 'queued'
              RETURNING id",
        )
        .bind(batch_id)
        .bind(error)
        .fetch_all(&mut *c)
        .await?;
        let done = sqlx::query(
            r#"INSERT INTO run_events (run_id, seq, kind, data)
               SELECT c.value,
                      coalesce((SELECT max(e.seq) FROM run_events e WHERE e.run_id = c.value), 0) + 1,
                      'run.cancelled', '{"status": "cancelled"}'
               FROM json_each(?1) c WHERE true
               ON CONFLICT DO NOTHING"#,
        )
        .bind(Json(&cancelled))
        .execute(&mut *c)
        .await?;
        Ok(done.rows_affected())
    },
    )
}

/// Asks the workers running the batch's runs to stop them (they do within about a second).
pub async fn request_cancel_running_runs(
    ex: impl Into<Ex<'_>>,
    batch_id: &str,
) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            "UPDATE runs SET cancel_requested = true WHERE batch_id = $1 AND status = 'running'",
            batch_id
        )
        .execute(e)
        .await
        .map(drop),
        sqlite(e) => sqlx::query(
            "UPDATE runs SET cancel_requested = 1 WHERE batch_id = ?1 AND status = 'running'",
        )
        .bind(batch_id)
        .execute(e)
        .await
        .map(drop),
    )
}

/// Gives the batch its final status if no run of it is queued or running any more; returns
/// the status when this call set it. Cheap when runs remain (one index probe), so it is safe to
/// call after every run of the batch ends.
///
/// `cancelling` ends `cancelled`; a batch whose deadline cancelled runs ends `expired`; one
/// whose every run failed ends `failed`; otherwise `completed` (individual lines may still
/// have failed: their results say so).
pub async fn settle(ex: impl Into<Ex<'_>>, batch_id: &str) -> sqlx::Result<Option<String>> {
    per_db!(ex,
    pg(e) => sqlx::query_scalar!(
        r#"UPDATE batches b SET
               status = CASE
                   WHEN b.status = 'cancelling' THEN 'cancelled'
                   WHEN b.expires_at <= now() AND EXISTS (
                       SELECT 1 FROM runs r
                       WHERE r.batch_id = b.id AND r.error->>'code' = 'batch_expired') THEN 'expired'
                   WHEN NOT EXISTS (
                       SELECT 1 FROM runs r WHERE r.batch_id = b.id AND r.status <> 'failed') THEN 'failed'
                   ELSE 'completed' END,
               finished_at = now(), updated_at = now()
           WHERE b.id = $1 AND b.status IN ('in_progress', 'cancelling')
             AND NOT EXISTS (
                 SELECT 1 FROM runs r
                 WHERE r.batch_id = b.id AND r.status IN ('queued', 'running'))
           RETURNING b.status"#,
        batch_id
    )
    .fetch_optional(e)
    .await,
    sqlite(e) => sqlx::query_scalar(
        r"UPDATE batches AS b SET
              status = CASE
                  WHEN b.status = 'cancelling' THEN 'cancelled'
                  WHEN b.expires_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now') AND EXISTS (
                      SELECT 1 FROM runs r
                      WHERE r.batch_id = b.id AND r.error ->> 'code' = 'batch_expired') THEN 'expired'
                  WHEN NOT EXISTS (
                      SELECT 1 FROM runs r WHERE r.batch_id = b.id AND r.status <> 'failed') THEN 'failed'
                  ELSE 'completed' END,
              finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
              updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
          WHERE b.id = ?1 AND b.status IN ('in_progress', 'cancelling')
            AND NOT EXISTS (
                SELECT 1 FROM runs r
                WHERE r.batch_id = b.id AND r.status IN ('queued', 'running'))
          RETURNING status",
    )
    .bind(batch_id)
    .fetch_optional(e)
    .await,
    )
}

/// Open batches (for the sweeper, which settles any whose last run ended without it, e.g. its
/// worker died between the final commit and the settle).
pub async fn open(ex: impl Into<Ex<'_>>, limit: i64) -> sqlx::Result<Vec<String>> {
    per_db!(ex,
        pg(e) => sqlx::query_scalar!(
            r#"SELECT id FROM batches WHERE status IN ('in_progress', 'cancelling')
               ORDER BY expires_at LIMIT $1"#,
            limit
        )
        .fetch_all(e)
        .await,
        sqlite(e) => sqlx::query_scalar(
            r"SELECT id FROM batches WHERE status IN ('in_progress', 'cancelling')
              ORDER BY expires_at LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(e)
        .await,
    )
}

/// In-progress batches whose completion window has ended.
pub async fn past_deadline(ex: impl Into<Ex<'_>>, limit: i64) -> sqlx::Result<Vec<String>> {
    per_db!(ex,
        pg(e) => sqlx::query_scalar!(
            r#"SELECT id FROM batches WHERE status = 'in_progress' AND expires_at <= now()
               ORDER BY expires_at LIMIT $1"#,
            limit
        )
        .fetch_all(e)
        .await,
        sqlite(e) => sqlx::query_scalar(
            r"SELECT id FROM batches
              WHERE status = 'in_progress' AND expires_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
              ORDER BY expires_at LIMIT ?1",
        )
        .bind(limit)
        .fetch_all(e)
        .await,
    )
}

/// One line of a batch's results: a run that ended.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ResultRow {
    pub run_id: String,
    pub custom_id: String,
    pub conversation_id: String,
    pub status: String,
    pub error: Option<Value>,
    /// The final assistant text (absent when the run failed before answering).
    pub text: Option<String>,
    /// `[{id, name, arguments, ok, result}]` in call order.
    pub tool_calls: Value,
}

/// A page of the batch's finished runs in `custom_id` order, after `after`.
pub async fn results_page(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    batch_id: &str,
    after: Option<&str>,
    limit: i64,
) -> sqlx::Result<Vec<ResultRow>> {
    per_db!(ex,
    pg(e) => sqlx::query_as!(
        ResultRow,
        r#"SELECT r.id AS run_id, r.custom_id AS "custom_id!", r.conversation_id, r.status, r.error,
                  m.content AS "text?",
                  COALESCE((SELECT jsonb_agg(jsonb_build_object(
                                'id', s.tool_call_id, 'name', s.name, 'arguments', s.arguments,
                                'ok', s.ok, 'result', s.result) ORDER BY s.step)
                            FROM run_steps s WHERE s.run_id = r.id), '[]'::jsonb) AS "tool_calls!"
           -- The page is chosen first, so the answer and tool calls are looked up for its rows
           -- only, whatever plan the page gets (without statistics on a fresh batch, Postgres
           -- may sort the batch's remaining rows instead of walking the index).
           FROM (SELECT id, custom_id, conversation_id, status, error FROM runs
                 WHERE batch_id = $1 AND user_id = $2
                   AND status IN ('completed', 'failed', 'cancelled')
                   -- custom_ids are never empty, so '' is before the first; a plain comparison
                   -- keeps the keyset an index range (`IS NULL OR` would scan from the start).
                   AND custom_id > COALESCE($3::text, '')
                 ORDER BY custom_id
                 LIMIT $4) r
           LEFT JOIN LATERAL (
               SELECT content FROM messages
               WHERE run_id = r.id AND role = 'assistant' AND tool_calls = '[]'::jsonb
               ORDER BY seq DESC LIMIT 1) m ON true
           ORDER BY r.custom_id"#,
        batch_id,
        user.as_str(),
        after,
        limit
    )
    .fetch_all(e)
    .await,
    sqlite(e) => sqlx::query_as(
        r"SELECT r.id AS run_id, r.custom_id, r.conversation_id, r.status, r.error,
                 (SELECT content FROM messages
                  WHERE run_id = r.id AND role = 'assistant' AND tool_calls = '[]'
                  ORDER BY seq DESC LIMIT 1) AS text,
                 coalesce((SELECT json_group_array(json_object(
                               'id', s.tool_call_id, 'name', s.name, 'arguments', json(s.arguments),
                               'ok', json(CASE WHEN s.ok THEN 'true' ELSE 'false' END),
                               'result', json(s.result)))
                           FROM (SELECT * FROM run_steps WHERE run_id = r.id ORDER BY step) s),
                          '[]') AS tool_calls
          FROM runs r
          WHERE r.batch_id = ?1 AND r.user_id = ?2
            AND r.status IN ('completed', 'failed', 'cancelled')
            AND r.custom_id > coalesce(?3, '')
          ORDER BY r.custom_id
          LIMIT ?4",
    )
    .bind(batch_id)
    .bind(user.as_str())
    .bind(after)
    .bind(limit)
    .fetch_all(e)
    .await,
    )
}
