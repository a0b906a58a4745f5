//! `runs`: one row per chat turn, the source of truth for its status.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::types::Json;

use super::messages::NewMessage;
use crate::{
    db::{Ex, Tx},
    events::StoredEvent,
    ids::UserId,
    per_db,
};

/// The columns of a [`Run`], for the SQLite statements (the Postgres ones are checked
/// literals).
macro_rules! run_columns {
    () => {
        "id, user_id, conversation_id, status, attempt, error, batch_id, idempotency_key, \
         request_hash, cancel_requested, queued_at, started_at, finished_at"
    };
}

/// A stored run.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Run {
    pub id: String,
    pub user_id: String,
    pub conversation_id: String,
    pub status: String,
    pub attempt: i32,
    pub error: Option<Value>,
    pub batch_id: Option<String>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub cancel_requested: bool,
    pub queued_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// A chat turn to store: its run (status `queued`), the user's message and the run's first
/// event; the conversation is inserted when `new_conversation_title` is set and touched
/// otherwise.
#[derive(Debug, Clone, Copy)]
pub struct NewTurn<'a> {
    pub run_id: &'a str,
    pub user_id: &'a str,
    pub conversation_id: &'a str,
    pub new_conversation_title: Option<&'a str>,
    pub idempotency_key: Option<&'a str>,
    pub request_hash: &'a str,
    pub message_id: &'a str,
    pub message: &'a str,
    pub first_event: &'a StoredEvent,
}

/// Stores a turn with one statement (one round trip: acceptance is on every turn's critical
/// path). On a pool it commits on its own; in a transaction it joins it. Fails with a unique
/// violation when the user already has a run with the idempotency key.
pub async fn insert_turn(ex: impl Into<Ex<'_>>, turn: NewTurn<'_>) -> sqlx::Result<()> {
    let event_data: Value = serde_json::from_str(&turn.first_event.data).unwrap_or_default();
    let event_seq = i64::try_from(turn.first_event.seq).unwrap_or(1);
    per_db!(ex,
    // Data-modifying CTEs run with one snapshot, and the foreign-key checks at the end of the
    // statement see the conversation inserted by the same statement.
    pg(e) => sqlx::query!(
        r#"WITH conversation AS (
               INSERT INTO conversations (id, user_id, title)
               SELECT $3, $2, $4::text WHERE $4::text IS NOT NULL),
           touched AS (
               UPDATE conversations SET updated_at = now()
               WHERE id = $3 AND $4::text IS NULL),
           run AS (
               INSERT INTO runs (id, user_id, conversation_id, status, idempotency_key, request_hash)
               VALUES ($1, $2, $3, 'queued', $5, $6)),
           message AS (
               INSERT INTO messages (id, conversation_id, user_id, run_id, role, content)
               VALUES ($7, $3, $2, $1, 'user', $8))
           INSERT INTO run_events (run_id, seq, kind, data)
           VALUES ($1, $9, $10, $11)"#,
        turn.run_id,
        turn.user_id,
        turn.conversation_id,
        turn.new_conversation_title,
        turn.idempotency_key,
        turn.request_hash,
        turn.message_id,
        turn.message,
        event_seq,
        turn.first_event.kind.as_str(),
        event_data
    )
    .execute(e)
    .await
    .map(drop),
    sqlite_tx(c) => {
        if let Some(title) = turn.new_conversation_title {
            sqlx::query("INSERT INTO conversations (id, user_id, title) VALUES (?1, ?2, ?3)")
                .bind(turn.conversation_id)
                .bind(turn.user_id)
                .bind(title)
                .execute(&mut *c)
                .await?;
        } else {
            sqlx::query(
                "UPDATE conversations SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1",
            )
            .bind(turn.conversation_id)
            .execute(&mut *c)
            .await?;
        }
        sqlx::query(
            r"INSERT INTO runs (id, user_id, conversation_id, status, idempotency_key, request_hash)
              VALUES (?1, ?2, ?3, 'queued', ?4, ?5)",
        )
        .bind(turn.run_id)
        .bind(turn.user_id)
        .bind(turn.conversation_id)
        .bind(turn.idempotency_key)
        .bind(turn.request_hash)
        .execute(&mut *c)
        .await?;
        sqlx::query(
            r"INSERT INTO messages (id, conversation_id, user_id, run_id, role, content)
              VALUES (?1, ?2, ?3, ?4, 'user', ?5)",
        )
        .bind(turn.message_id)
        .bind(turn.conversation_id)
        .bind(turn.user_id)
        .bind(turn.run_id)
        .bind(turn.message)
        .execute(&mut *c)
        .await?;
        sqlx::query("INSERT INTO run_events (run_id, seq, kind, data) VALUES (?1, ?2, ?3, ?4)")
            .bind(turn.run_id)
            .bind(event_seq)
            .bind(turn.first_event.kind.as_str())
            .bind(&event_data)
            .execute(&mut *c)
            .await
            .map(drop)
    },
    )
}

/// The runs of a batch, one per line, to insert at once (status `queued`).
#[derive(Debug, Clone, Copy)]
pub struct NewBatchRuns<'a> {
    pub user_id: &'a str,
    pub batch_id: &'a str,
    pub ids: &'a [&'a str],
    pub conversation_ids: &'a [&'a str],
    pub custom_ids: &'a [&'a str],
}

pub async fn insert_batch_runs(ex: impl Into<Ex<'_>>, runs: NewBatchRuns<'_>) -> sqlx::Result<()> {
    per_db!(ex,
    pg(e) => sqlx::query!(
        r#"INSERT INTO runs (id, user_id, conversation_id, status, batch_id, custom_id)
           SELECT id, $1, conversation_id, 'queued', $2, custom_id
           FROM UNNEST($3::text[], $4::text[], $5::text[]) AS t(id, conversation_id, custom_id)"#,
        runs.user_id,
        runs.batch_id,
        runs.ids as &[&str],
        runs.conversation_ids as &[&str],
        runs.custom_ids as &[&str]
    )
    .execute(e)
    .await
    .map(drop),
    sqlite(e) => sqlx::query(
        r"INSERT INTO runs (id, user_id, conversation_id, status, batch_id, custom_id)
          SELECT i.value, ?1, c.value, 'queued', ?2, x.value
          FROM json_each(?3) i
               JOIN json_each(?4) c ON c.key = i.key
               JOIN json_each(?5) x ON x.key = i.key",
    )
    .bind(runs.user_id)
    .bind(runs.batch_id)
    .bind(Json(runs.ids))
    .bind(Json(runs.conversation_ids))
    .bind(Json(runs.custom_ids))
    .execute(e)
    .await
    .map(drop),
    )
}

/// The user's run, or `None` when it is not theirs.
pub async fn get(ex: impl Into<Ex<'_>>, user: &UserId, id: &str) -> sqlx::Result<Option<Run>> {
    per_db!(ex,
    pg(e) => sqlx::query_as!(
        Run,
        r#"SELECT id, user_id, conversation_id, status, attempt, error, batch_id, idempotency_key,
                  request_hash, cancel_requested, queued_at, started_at, finished_at
           FROM runs WHERE id = $1 AND user_id = $2"#,
        id,
        user.as_str()
    )
    .fetch_optional(e)
    .await,
    sqlite(e) => sqlx::query_as(concat!("SELECT ", run_columns!(), " FROM runs WHERE id = ?1 AND user_id = ?2"))
        .bind(id)
        .bind(user.as_str())
        .fetch_optional(e)
        .await,
    )
}

pub async fn by_idempotency_key(
    ex: impl Into<Ex<'_>>,
    user: &UserId,
    key: &str,
) -> sqlx::Result<Option<Run>> {
    per_db!(ex,
    pg(e) => sqlx::query_as!(
        Run,
        r#"SELECT id, user_id, conversation_id, status, attempt, error, batch_id, idempotency_key,
                  request_hash, cancel_requested, queued_at, started_at, finished_at
           FROM runs WHERE user_id = $1 AND idempotency_key = $2"#,
        user.as_str(),
        key
    )
    .fetch_optional(e)
    .await,
    sqlite(e) => sqlx::query_as(concat!("SELECT ", run_columns!(), " FROM runs WHERE user_id = ?1 AND idempotency_key = ?2"))
        .bind(user.as_str())
        .bind(key)
        .fetch_optional(e)
        .await,
    )
}

/// Serialises run creation per user for the rest of the transaction, then counts the user's
/// unfinished runs: an exact limit even with several API processes.
/// On SQLite the transaction's write lock already serialises it.
pub async fn lock_user_and_count_active(tx: &mut Tx, user: &UserId) -> sqlx::Result<i64> {
    // Batch runs do not count: a batch may queue thousands, and must not lock its owner out of
    // chat (batches have their own limit).
    match tx {
        Tx::Postgres(tx) => {
            sqlx::query!("SELECT pg_advisory_xact_lock(hashtext($1))", user.as_str())
                .execute(&mut **tx)
                .await?;
            sqlx::query_scalar!(
                r#"SELECT count(*) AS "n!" FROM runs
                   WHERE user_id = $1 AND batch_id IS NULL AND status IN ('queued', 'running')"#,
                user.as_str()
            )
            .fetch_one(&mut **tx)
            .await
        }
        Tx::Sqlite(tx) => {
            sqlx::query_scalar(
                r"SELECT count(*) FROM runs
                  WHERE user_id = ?1 AND batch_id IS NULL AND status IN ('queued', 'running')",
            )
            .bind(user.as_str())
            .fetch_one(&mut **tx)
            .await
        }
    }
}

/// The conversation's oldest unfinished run, if any.
pub async fn active_in_conversation(
    ex: impl Into<Ex<'_>>,
    conversation_id: &str,
) -> sqlx::Result<Option<String>> {
    per_db!(ex,
        pg(e) => sqlx::query_scalar!(
            r#"SELECT id FROM runs WHERE conversation_id = $1 AND status IN ('queued', 'running')
               ORDER BY queued_at, id LIMIT 1"#,
            conversation_id
        )
        .fetch_optional(e)
        .await,
        sqlite(e) => sqlx::query_scalar(
            r"SELECT id FROM runs WHERE conversation_id = ?1 AND status IN ('queued', 'running')
              ORDER BY queued_at, id LIMIT 1",
        )
        .bind(conversation_id)
        .fetch_optional(e)
        .await,
    )
}

/// Unfinished runs queued ahead of `run_id` in its conversation.
pub async fn position_in_conversation(
    ex: impl Into<Ex<'_>>,
    conversation_id: &str,
    run_id: &str,
) -> sqlx::Result<i64> {
    per_db!(ex,
        pg(e) => sqlx::query_scalar!(
            r#"SELECT count(*) AS "n!" FROM runs WHERE conversation_id = $1 AND id < $2
               AND status IN ('queued', 'running')"#,
            conversation_id,
            run_id
        )
        .fetch_one(e)
        .await,
        sqlite(e) => sqlx::query_scalar(
            r"SELECT count(*) FROM runs WHERE conversation_id = ?1 AND id < ?2
              AND status IN ('queued', 'running')",
        )
        .bind(conversation_id)
        .bind(run_id)
        .fetch_one(e)
        .await,
    )
}

/// What a worker finds when it tries to claim a run for a new attempt.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claim {
    pub user_id: String,
    pub conversation_id: String,
    pub batch_id: Option<String>,
    /// The run's status before the claim (`running` means a takeover from a dead worker).
    pub status: String,
    pub cancel_requested: bool,
    /// The new attempt's number, when this worker now holds the run.
    pub attempt: Option<i32>,
    /// The highest seq the run is known to have used: its stored events, or what its last
    /// attempt's heartbeat recorded (the floor of this attempt's seqs).
    pub max_seq: i64,
}

/// Claims a run for `worker` (one statement: the worker's pickup path is latency-critical).
/// The claim succeeds if the run is `queued` and not cancelled, or `running` with a heartbeat
/// older than `stale_after_secs` (its worker died; cancelled or not), and no earlier run of its
/// conversation is unfinished. `None` when the run does not exist.
pub async fn claim(
    ex: impl Into<Ex<'_>>,
    id: &str,
    worker: &str,
    stale_after_secs: f64,
) -> sqlx::Result<Option<Claim>> {
    per_db!(ex,
    // The outer SELECT reads the statement's snapshot, taken before the UPDATE: it reports the
    // status the claim started from.
    pg(e) => sqlx::query_as!(
        Claim,
        r#"WITH claimed AS (
               UPDATE runs SET status = 'running', attempt = attempt + 1, worker = $2,
                      started_at = COALESCE(started_at, now()), heartbeat_at = now()
               -- A dead worker's run is taken over even when a cancel was asked for: the new
               -- attempt ends it cancelled (nothing else would end it).
               WHERE id = $1
                 AND ((status = 'queued' AND NOT cancel_requested)
                      OR (status = 'running' AND heartbeat_at < now() - make_interval(secs => $3)))
                 -- A batch run not started within the batch's completion window never starts
                 -- (the sweeper ends it as expired).
                 AND NOT (status = 'queued' AND batch_id IS NOT NULL AND EXISTS (
                     SELECT 1 FROM batches b WHERE b.id = runs.batch_id AND b.expires_at <= now()))
                 -- Runs of one conversation execute in order: not before every earlier one ended.
                 AND NOT EXISTS (
                     SELECT 1 FROM runs earlier
                     WHERE earlier.conversation_id = runs.conversation_id
                       AND (earlier.status = 'running'
                            OR (earlier.status = 'queued' AND NOT earlier.cancel_requested))
                       AND (earlier.queued_at, earlier.id) < (runs.queued_at, runs.id))
               RETURNING id, attempt)
           SELECT r.user_id, r.conversation_id, r.batch_id, r.status, r.cancel_requested,
                  claimed.attempt AS "attempt?",
                  GREATEST(r.seq_floor,
                           (SELECT max(seq) FROM run_events e WHERE e.run_id = r.id))
                      AS "max_seq!"
           FROM runs r LEFT JOIN claimed ON claimed.id = r.id
           WHERE r.id = $1"#,
        id,
        worker,
        stale_after_secs
    )
    .fetch_optional(e)
    .await,
    // The same conditions in two statements: the state before the claim, then the claim.
    sqlite_tx(c) => {
        let before: Option<Claim> = sqlx::query_as(
            r"SELECT r.user_id, r.conversation_id, r.batch_id, r.status, r.cancel_requested,
                     NULL AS attempt,
                     max(r.seq_floor, coalesce((SELECT max(seq) FROM run_events e WHERE e.run_id = r.id), 0))
                         AS max_seq
              FROM runs r WHERE r.id = ?1",
        )
        .bind(id)
        .fetch_optional(&mut *c)
        .await?;
        let Some(mut claim) = before else {
            return Ok(None);
        };
        claim.attempt = sqlx::query_scalar(
            r"UPDATE runs SET status = 'running', attempt = attempt + 1, worker = ?2,
                     started_at = coalesce(started_at, strftime('%Y-%m-%dT%H:%M:%fZ', 'now')),
                     heartbeat_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
              WHERE id = ?1
                AND ((status = 'queued' AND NOT cancel_requested)
                     OR (status = 'running'
                         AND heartbeat_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || ?3 || ' seconds')))
                AND NOT (status = 'queued' AND batch_id IS NOT NULL AND EXISTS (
                    SELECT 1 FROM batches b WHERE b.id = runs.batch_id
                    AND b.expires_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))
                AND NOT EXISTS (
                    SELECT 1 FROM runs earlier
                    WHERE earlier.conversation_id = runs.conversation_id
                      AND (earlier.status = 'running'
                           OR (earlier.status = 'queued' AND NOT earlier.cancel_requested))
                      AND (earlier.queued_at, earlier.id) < (runs.queued_at, runs.id))
              RETURNING attempt",
        )
        .bind(id)
        .bind(worker)
        .bind(stale_after_secs)
        .fetch_optional(&mut *c)
        .await?;
        Ok(Some(claim))
    },
    )
}

/// The conversation's next run waiting for its turn, with its batch (to pick the queue):
/// its first unfinished run, if that one is queued.
pub async fn next_in_conversation(
    ex: impl Into<Ex<'_>>,
    conversation_id: &str,
) -> sqlx::Result<Option<(String, Option<String>)>> {
    // Shaped to walk `runs_conversation_active` (conversation_id, queued_at, id). With
    // `status = 'queued' ORDER BY queued_at` alone, a cached generic plan may instead walk
    // every queued run of every conversation in queue order, dead index entries included.
    let row: Option<(String, Option<String>, String)> = per_db!(ex,
        pg(e) => sqlx::query!(
            r#"SELECT id, batch_id, status FROM runs
               WHERE conversation_id = $1 AND status IN ('queued', 'running')
               ORDER BY conversation_id, queued_at, id LIMIT 1"#,
            conversation_id
        )
        .fetch_optional(e)
        .await?
        .map(|r| (r.id, r.batch_id, r.status)),
        sqlite(e) => sqlx::query_as(
            r"SELECT id, batch_id, status FROM runs
              WHERE conversation_id = ?1 AND status IN ('queued', 'running')
              ORDER BY conversation_id, queued_at, id LIMIT 1",
        )
        .bind(conversation_id)
        .fetch_optional(e)
        .await?,
    );
    Ok(row
        .filter(|(_, _, status)| status == "queued")
        .map(|(id, batch_id, _)| (id, batch_id)))
}

/// Locks the user's run for a status change.
pub async fn lock_owned(
    tx: impl Into<Ex<'_>>,
    user: &UserId,
    id: &str,
) -> sqlx::Result<Option<Run>> {
    per_db!(tx,
    pg(e) => sqlx::query_as!(
        Run,
        r#"SELECT id, user_id, conversation_id, status, attempt, error, batch_id, idempotency_key,
                  request_hash, cancel_requested, queued_at, started_at, finished_at
           FROM runs WHERE id = $1 AND user_id = $2 FOR UPDATE"#,
        id,
        user.as_str()
    )
    .fetch_optional(e)
    .await,
    // The transaction's write lock is the lock.
    sqlite(e) => get(e, user, id).await,
    )
}

/// Asks every unfinished run of a conversation to stop; returns the ids of those still queued.
pub async fn cancel_active_in_conversation(
    ex: impl Into<Ex<'_>>,
    conversation_id: &str,
) -> sqlx::Result<Vec<String>> {
    let rows: Vec<(String, String)> = per_db!(ex,
        pg(e) => sqlx::query!(
            r#"UPDATE runs SET cancel_requested = true
               WHERE conversation_id = $1 AND status IN ('queued', 'running')
               RETURNING id, status"#,
            conversation_id
        )
        .fetch_all(e)
        .await?
        .into_iter()
        .map(|r| (r.id, r.status))
        .collect(),
        sqlite(e) => sqlx::query_as(
            r"UPDATE runs SET cancel_requested = 1
              WHERE conversation_id = ?1 AND status IN ('queued', 'running')
              RETURNING id, status",
        )
        .bind(conversation_id)
        .fetch_all(e)
        .await?,
    );
    Ok(rows
        .into_iter()
        .filter(|(_, status)| status == "queued")
        .map(|(id, _)| id)
        .collect())
}

/// Asks the run's worker to stop it.
pub async fn request_cancel(ex: impl Into<Ex<'_>>, id: &str) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!("UPDATE runs SET cancel_requested = true WHERE id = $1", id)
            .execute(e)
            .await
            .map(drop),
        sqlite(e) => sqlx::query("UPDATE runs SET cancel_requested = 1 WHERE id = ?1")
            .bind(id)
            .execute(e)
            .await
            .map(drop),
    )
}

/// Says the attempt is alive; returns whether a cancel was requested, or `None` when the
/// attempt is no longer the run's current one.
pub async fn heartbeat(
    ex: impl Into<Ex<'_>>,
    id: &str,
    attempt: i32,
    worker: &str,
    last_seq: i64,
) -> sqlx::Result<Option<bool>> {
    per_db!(ex,
    pg(e) => sqlx::query_scalar!(
        r#"UPDATE runs SET heartbeat_at = now(), seq_floor = GREATEST(seq_floor, $4)
           WHERE id = $1 AND attempt = $2 AND worker = $3 AND status = 'running'
           RETURNING cancel_requested"#,
        id,
        attempt,
        worker,
        last_seq
    )
    .fetch_optional(e)
    .await,
    sqlite(e) => sqlx::query_scalar(
        r"UPDATE runs SET heartbeat_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'),
                 seq_floor = max(seq_floor, ?4)
          WHERE id = ?1 AND attempt = ?2 AND worker = ?3 AND status = 'running'
          RETURNING cancel_requested",
    )
    .bind(id)
    .bind(attempt)
    .bind(worker)
    .bind(last_seq)
    .fetch_optional(e)
    .await,
    )
}

/// Gives up a failed attempt's hold on the run so the next claim need not wait for its
/// heartbeat to go stale.
pub async fn release(
    ex: impl Into<Ex<'_>>,
    id: &str,
    attempt: i32,
    worker: &str,
) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            r#"UPDATE runs SET heartbeat_at = 'epoch'
               WHERE id = $1 AND attempt = $2 AND worker = $3 AND status = 'running'"#,
            id,
            attempt,
            worker
        )
        .execute(e)
        .await
        .map(drop),
        sqlite(e) => sqlx::query(
            r"UPDATE runs SET heartbeat_at = '1970-01-01T00:00:00.000Z'
              WHERE id = ?1 AND attempt = ?2 AND worker = ?3 AND status = 'running'",
        )
        .bind(id)
        .bind(attempt)
        .bind(worker)
        .execute(e)
        .await
        .map(drop),
    )
}

/// Releases every run held by a worker of this process's previous life: the embedded mode
/// runs one process per database file, so at start-up a `running` run has no live worker.
/// Returns how many runs were released.
pub async fn release_all_running(pool: &sqlx::SqlitePool) -> sqlx::Result<u64> {
    let done = sqlx::query(
        "UPDATE runs SET heartbeat_at = '1970-01-01T00:00:00.000Z' WHERE status = 'running'",
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Locks the run for a final commit and returns its status and attempt.
pub async fn lock(tx: impl Into<Ex<'_>>, id: &str) -> sqlx::Result<Option<(String, i32)>> {
    per_db!(tx,
        pg(e) => Ok(sqlx::query!(
            "SELECT status, attempt FROM runs WHERE id = $1 FOR UPDATE",
            id
        )
        .fetch_optional(e)
        .await?
        .map(|r| (r.status, r.attempt))),
        sqlite(e) => sqlx::query_as("SELECT status, attempt FROM runs WHERE id = ?1")
            .bind(id)
            .fetch_optional(e)
            .await,
    )
}

/// Ends a run with a terminal status.
pub async fn finish(
    ex: impl Into<Ex<'_>>,
    id: &str,
    status: &str,
    error: Option<&Value>,
) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            "UPDATE runs SET status = $2, error = $3, finished_at = now(), worker = NULL WHERE id = $1",
            id,
            status,
            error
        )
        .execute(e)
        .await
        .map(drop),
        sqlite(e) => sqlx::query(
            r"UPDATE runs SET status = ?2, error = ?3,
                     finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), worker = NULL
              WHERE id = ?1",
        )
        .bind(id)
        .bind(status)
        .bind(error)
        .execute(e)
        .await
        .map(drop),
    )
}

/// Runs the sweeper must push again: chat runs `queued` for longer than `queued_secs` (their
/// push may have failed) and any run `running` without a heartbeat for `silent_secs` (its
/// worker died). Queued batch runs are not here: they legitimately wait in their queue for
/// long, see [`queued_batch_runs`].
pub async fn due_for_sweep(
    ex: impl Into<Ex<'_>>,
    queued_secs: f64,
    silent_secs: f64,
    limit: i64,
) -> sqlx::Result<Vec<(String, Option<String>)>> {
    per_db!(ex,
    pg(e) => Ok(sqlx::query!(
        r#"(SELECT id AS "id!", batch_id, queued_at AS "queued_at!" FROM runs
            WHERE status = 'queued' AND batch_id IS NULL
              AND queued_at < now() - make_interval(secs => $1)
            ORDER BY queued_at LIMIT $3)
           UNION ALL
           (SELECT id, batch_id, queued_at FROM runs
            WHERE status = 'running' AND heartbeat_at < now() - make_interval(secs => $2)
            ORDER BY queued_at LIMIT $3)
           ORDER BY 3 LIMIT $3"#,
        queued_secs,
        silent_secs,
        limit
    )
    .fetch_all(e)
    .await?
    .into_iter()
    .map(|r| (r.id, r.batch_id))
    .collect()),
    sqlite(e) => sqlx::query_as(
        r"SELECT id, batch_id FROM runs
          WHERE (status = 'queued' AND batch_id IS NULL
                 AND queued_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || ?1 || ' seconds'))
             OR (status = 'running'
                 AND heartbeat_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || ?2 || ' seconds'))
          ORDER BY queued_at LIMIT ?3",
    )
    .bind(queued_secs)
    .bind(silent_secs)
    .bind(limit)
    .fetch_all(e)
    .await,
    )
}

/// How an attempt ended: what [`finish_attempt`] writes.
#[derive(Debug, Clone, Copy)]
pub struct FinishedAttempt<'a> {
    pub id: &'a str,
    pub attempt: i32,
    pub worker: &'a str,
    pub status: &'a str,
    pub error: Option<&'a Value>,
    /// The messages the attempt adds to the conversation, in history order.
    pub messages: &'a [NewMessage<'a>],
    /// The run's durable events (events already stored are left as they are).
    pub events: &'a [StoredEvent],
}

/// Ends `attempt` of a run held by `worker`: its status, its messages and its events, and
/// touches its conversation — one statement, so the final commit costs one round trip. `false`
/// (and nothing written) when the attempt no longer holds the run: a newer attempt took it
/// over. The row lock this takes serialises the commit against a concurrent takeover.
pub async fn finish_attempt(tx: impl Into<Ex<'_>>, end: FinishedAttempt<'_>) -> sqlx::Result<bool> {
    per_db!(tx,
        pg(e) => finish_attempt_pg(e, end).await,
        sqlite_tx(c) => finish_attempt_sqlite(c, end).await,
    )
}

async fn finish_attempt_pg(
    e: impl sqlx::PgExecutor<'_>,
    end: FinishedAttempt<'_>,
) -> sqlx::Result<bool> {
    fn column<'m, T>(
        messages: &'m [NewMessage<'_>],
        f: impl Fn(&'m NewMessage<'_>) -> T,
    ) -> Vec<T> {
        messages.iter().map(f).collect()
    }
    let m = end.messages;
    let message_ids = column(m, |m| m.id.as_str());
    let roles = column(m, |m| m.role);
    let contents = column(m, |m| m.content);
    let tool_calls = column(m, |m| m.tool_calls.clone());
    let tool_call_ids = column(m, |m| m.tool_call_id);
    let statuses = column(m, |m| m.status);
    let (seqs, kinds, data) = super::run_events::columns(end.events);
    // The inserts read `finished`, so they write nothing when the guard matched no row.
    // `ORDER BY n` makes the messages' identity column number them in slice order.
    sqlx::query_scalar!(
        r#"WITH finished AS (
               UPDATE runs SET status = $4, error = $5, finished_at = now(), worker = NULL
               WHERE id = $1 AND attempt = $2 AND worker = $3 AND status = 'running'
               RETURNING user_id, conversation_id),
           touched AS (
               UPDATE conversations SET updated_at = now()
               WHERE id IN (SELECT conversation_id FROM finished)),
           answer AS (
               INSERT INTO messages (id, conversation_id, user_id, run_id, role, content,
                                     tool_calls, tool_call_id, status)
               SELECT m.id, f.conversation_id, f.user_id, $1, m.role, m.content, m.tool_calls,
                      m.tool_call_id, m.status
               FROM finished f,
                    UNNEST($6::text[], $7::text[], $8::text[], $9::jsonb[], $10::text[],
                           $11::text[])
                    WITH ORDINALITY AS m(id, role, content, tool_calls, tool_call_id, status, n)
               ORDER BY m.n),
           events AS (
               INSERT INTO run_events (run_id, seq, kind, data)
               SELECT $1, e.seq, e.kind, e.data
               FROM finished,
                    UNNEST($12::bigint[], $13::text[], $14::jsonb[]) AS e(seq, kind, data)
               ON CONFLICT DO NOTHING)
           SELECT EXISTS (SELECT 1 FROM finished) AS "finished!""#,
        end.id,
        end.attempt,
        end.worker,
        end.status,
        end.error,
        &message_ids as &[&str],
        &roles as &[&str],
        &contents as &[&str],
        &tool_calls,
        &tool_call_ids as &[Option<&str>],
        &statuses as &[Option<&str>],
        &seqs,
        &kinds as &[&str],
        &data
    )
    .fetch_one(e)
    .await
}

/// [`finish_attempt`] on SQLite: the same writes as statements of one transaction.
async fn finish_attempt_sqlite(
    c: &mut sqlx::SqliteConnection,
    end: FinishedAttempt<'_>,
) -> sqlx::Result<bool> {
    let finished: Option<(String,)> = sqlx::query_as(
        r"UPDATE runs SET status = ?4, error = ?5,
                 finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), worker = NULL
          WHERE id = ?1 AND attempt = ?2 AND worker = ?3 AND status = 'running'
          RETURNING conversation_id",
    )
    .bind(end.id)
    .bind(end.attempt)
    .bind(end.worker)
    .bind(end.status)
    .bind(end.error)
    .fetch_optional(&mut *c)
    .await?;
    let Some((conversation_id,)) = finished else {
        return Ok(false);
    };
    sqlx::query(
        "UPDATE conversations SET updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?1",
    )
    .bind(&conversation_id)
    .execute(&mut *c)
    .await?;
    let messages: Vec<Value> = end
        .messages
        .iter()
        .map(|m| {
            serde_json::json!({
                "id": m.id.as_str(), "role": m.role, "content": m.content,
                "tool_calls": m.tool_calls, "tool_call_id": m.tool_call_id, "status": m.status,
            })
        })
        .collect();
    // `ORDER BY key` numbers the messages (their `seq` rowid) in slice order.
    sqlx::query(
        r"INSERT INTO messages (id, conversation_id, user_id, run_id, role, content, tool_calls,
                                tool_call_id, status)
          SELECT value ->> 'id', r.conversation_id, r.user_id, r.id, value ->> 'role',
                 value ->> 'content', json(value -> 'tool_calls'), value ->> 'tool_call_id',
                 value ->> 'status'
          FROM runs r, json_each(?2) WHERE r.id = ?1 ORDER BY key",
    )
    .bind(end.id)
    .bind(Json(&messages))
    .execute(&mut *c)
    .await?;
    super::run_events::insert_many(&mut *c, end.id, end.events).await?;
    Ok(true)
}

/// Unfinished runs by status (`queued`, `running`) and the age of the oldest queued one, for
/// the metrics. Served by the partial index on active runs, so it stays cheap however many
/// finished runs the table holds.
pub async fn active_counts(ex: impl Into<Ex<'_>>) -> sqlx::Result<ActiveCounts> {
    per_db!(ex,
    pg(e) => {
    let row = sqlx::query!(
        r#"SELECT count(*) FILTER (WHERE status = 'queued') AS "queued!",
                  count(*) FILTER (WHERE status = 'running') AS "running!",
                  EXTRACT(EPOCH FROM now() - min(queued_at) FILTER (WHERE status = 'queued'))::float8
                      AS oldest_queued_secs
           FROM runs WHERE status IN ('queued', 'running')"#
    )
    .fetch_one(e)
    .await?;
    Ok(ActiveCounts {
        queued: row.queued,
        running: row.running,
        oldest_queued_secs: row.oldest_queued_secs.unwrap_or(0.0),
    })
    },
    sqlite(e) => {
        let (queued, running, oldest): (i64, i64, Option<f64>) = sqlx::query_as(
            r"SELECT count(*) FILTER (WHERE status = 'queued'),
                     count(*) FILTER (WHERE status = 'running'),
                     (julianday('now') - julianday(min(queued_at) FILTER (WHERE status = 'queued')))
                         * 86400.0
              FROM runs WHERE status IN ('queued', 'running')",
        )
        .fetch_one(e)
        .await?;
        Ok(ActiveCounts {
            queued,
            running,
            oldest_queued_secs: oldest.unwrap_or(0.0),
        })
    },
    )
}

/// What [`active_counts`] reads.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ActiveCounts {
    pub queued: i64,
    pub running: i64,
    /// 0 when nothing is queued.
    pub oldest_queued_secs: f64,
}

/// Batch runs `queued` for longer than `queued_secs`, oldest first: the sweeper pushes them
/// again only when the batch queue holds no job at all (then nothing can be carrying them).
pub async fn queued_batch_runs(
    ex: impl Into<Ex<'_>>,
    queued_secs: f64,
    limit: i64,
) -> sqlx::Result<Vec<String>> {
    per_db!(ex,
    pg(e) => sqlx::query_scalar!(
        r#"SELECT id FROM runs
           WHERE status = 'queued' AND batch_id IS NOT NULL
             AND queued_at < now() - make_interval(secs => $1)
           ORDER BY queued_at, id LIMIT $2"#,
        queued_secs,
        limit
    )
    .fetch_all(e)
    .await,
    sqlite(e) => sqlx::query_scalar(
        r"SELECT id FROM runs
          WHERE status = 'queued' AND batch_id IS NOT NULL
            AND queued_at < strftime('%Y-%m-%dT%H:%M:%fZ', 'now', '-' || ?1 || ' seconds')
          ORDER BY queued_at, id LIMIT ?2",
    )
    .bind(queued_secs)
    .bind(limit)
    .fetch_all(e)
    .await,
    )
}
