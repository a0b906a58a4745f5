//! The store layer: every SQL statement the task tools run, and nothing else.
//!
//! Each statement filters by `user_id`, so a task id that belongs to someone else behaves exactly
//! like an id that does not exist. A mutation that carries an idempotency key records its resulting
//! row in `tool_idempotency` atomically with the change, which makes its effect exactly-once even
//! when a caller retries or two copies of one call race.
//!
//! The database is Postgres or, in the embedded mode, a SQLite file ([`Db`]). Each statement is
//! written for both, side by side ([`per_db!`]); the logic around them is shared. SQLite has no
//! data-modifying CTEs, so where Postgres changes a task and records the key in one statement,
//! SQLite runs two statements in one `BEGIN IMMEDIATE` transaction.

use chrono::{DateTime, Utc};
use conveyor_shared::{
    db::{Db, Ex, Tx},
    per_db,
};
use serde::Deserialize;
use serde_json::Value;
use sqlx::types::Json;

use crate::domain::{
    IdempotencyKey, Task, TaskChange, TaskDescription, TaskId, TaskPriority, TaskStatusFilter,
    TaskTitle, UserId,
};

/// Why a store operation did not produce a result.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// No task with this id belongs to the user (it may not exist, or be someone else's).
    #[error("task {0} not found")]
    TaskNotFound(TaskId),
    /// The idempotency key was first used for a different tool.
    #[error("idempotency key was already used for {tool}")]
    KeyReused { tool: String },
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A row did not decode into the domain (a stored result from an incompatible version,
    /// or a priority the schema's CHECK should have refused).
    #[error("stored data cannot be read: {0}")]
    Corrupt(String),
}

/// Storage for tasks and for the results of idempotent tool calls, on Postgres or SQLite.
#[derive(Debug, Clone)]
pub struct TaskStore {
    db: Db,
}

/// A `tasks` row as the database returns it, before its priority is parsed. (SQLite stores
/// `completed` as 0/1 and the timestamps as ISO-8601 text; both decode into these types.)
#[derive(sqlx::FromRow)]
struct TaskRow {
    id: i64,
    title: String,
    description: Option<String>,
    priority: String,
    completed: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl TryFrom<TaskRow> for Task {
    type Error = StoreError;

    fn try_from(row: TaskRow) -> Result<Self, StoreError> {
        let priority = TaskPriority::parse(&row.priority).map_err(|_| {
            StoreError::Corrupt(format!("task {} has priority {:?}", row.id, row.priority))
        })?;
        Ok(Self {
            id: TaskId(row.id),
            title: row.title,
            description: row.description,
            priority,
            completed: row.completed,
            created_at: row.created_at,
            updated_at: row.updated_at,
        })
    }
}

impl TaskStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    /// The user's tasks matching `filter`, oldest first (ids grow with creation time).
    pub async fn list(
        &self,
        user: &UserId,
        filter: TaskStatusFilter,
    ) -> Result<Vec<Task>, StoreError> {
        let rows = per_db!(&self.db,
            pg(e) => sqlx::query_as!(
                TaskRow,
                r#"SELECT id, title, description, priority, completed, created_at, updated_at
               FROM tasks
               WHERE user_id = $1 AND ($2::boolean IS NULL OR completed = $2)
               ORDER BY id"#,
                user.as_str(),
                filter.completed(),
            )
            .fetch_all(e)
            .await,
            sqlite(e) => sqlx::query_as::<_, TaskRow>(
                "SELECT id, title, description, priority, completed, created_at, updated_at
                 FROM tasks
                 WHERE user_id = ?1 AND (?2 IS NULL OR completed = ?2)
                 ORDER BY id",
            )
            .bind(user.as_str())
            .bind(filter.completed())
            .fetch_all(e)
            .await,
        )?;
        rows.into_iter().map(Task::try_from).collect()
    }

    /// Applies `change` for `user` and returns `render(&task)`, where `task` is the row after
    /// the change (for a delete: the row that was deleted).
    ///
    /// With a `key`, the task row is stored under `(user, key)` in the same statement
    /// (Postgres) or transaction (SQLite) as the change, so the effect and its record commit
    /// together. A later call with that key conflicts on the record, which undoes its change,
    /// and answers from the stored row instead (`render` of the same change and row gives the
    /// same reply). Two concurrent calls with one key both run the change, but only one can
    /// insert the key: the other's insert waits for the first to commit, fails, and answers the
    /// stored row. (SQLite has one writer at a time: the second call's transaction waits for
    /// the first to commit, then fails on the key the same way.) A failed change (e.g. an
    /// unknown task) stores nothing, so it may be retried.
    pub async fn apply<R, F>(
        &self,
        user: &UserId,
        change: &TaskChange,
        key: Option<&IdempotencyKey>,
        render: F,
    ) -> Result<R, StoreError>
    where
        F: FnOnce(&Task) -> R,
    {
        let applied = run_change(&self.db, user, change, key).await;
        let Some(key) = key else {
            return applied.map(|task| render(&task));
        };
        match applied {
            Ok(task) => Ok(render(&task)),
            // The key was used before: a repeat (or the call that raced this one) committed.
            Err(StoreError::Database(sqlx::Error::Database(e))) if e.is_unique_violation() => {
                let task = self.stored_task(user, key, change).await?.ok_or_else(|| {
                    StoreError::Corrupt("idempotency key vanished after a conflict".to_owned())
                })?;
                Ok(render(&task))
            }
            // A repeat of a call whose first run deleted the task (or, for another tool, a
            // task that is really gone).
            Err(StoreError::TaskNotFound(id)) => match self.stored_task(user, key, change).await? {
                Some(task) => Ok(render(&task)),
                None => Err(StoreError::TaskNotFound(id)),
            },
            Err(error) => Err(error),
        }
    }

    /// The task row stored for `(user, key)`, if a call with that key already succeeded.
    async fn stored_task(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
        change: &TaskChange,
    ) -> Result<Option<Task>, StoreError> {
        let kept = per_db!(&self.db,
            pg(e) => sqlx::query!(
                "SELECT tool, result FROM tool_idempotency WHERE user_id = $1 AND key = $2",
                user.as_str(),
                key.as_str(),
            )
            .fetch_optional(e)
            .await
            .map(|row| row.map(|row| KeptRow { tool: row.tool, result: Json(row.result) })),
            sqlite(e) => sqlx::query_as::<_, KeptRow>(
                "SELECT tool, result FROM tool_idempotency WHERE user_id = ?1 AND key = ?2",
            )
            .bind(user.as_str())
            .bind(key.as_str())
            .fetch_optional(e)
            .await,
        )?;
        let Some(row) = kept else {
            return Ok(None);
        };
        if row.tool != change.tool_name() {
            return Err(StoreError::KeyReused { tool: row.tool });
        }
        tracing::debug!(
            user_id = user.as_str(),
            key = key.as_str(),
            tool = row.tool,
            "answering a repeated call from its stored result"
        );
        let stored: StoredTask = serde_json::from_value(row.result.0)
            .map_err(|e| StoreError::Corrupt(format!("stored result of {}: {e}", row.tool)))?;
        TaskRow::from(stored).try_into().map(Some)
    }
}

/// A `tool_idempotency` row: the tool a key was first used for and the task row it produced.
#[derive(sqlx::FromRow)]
struct KeptRow {
    tool: String,
    result: Json<Value>,
}

/// A task row as it is stored in `tool_idempotency.result`: by `to_jsonb` on Postgres, by
/// serializing the [`Task`] on SQLite (the same fields, the priority as its name).
#[derive(Deserialize)]
struct StoredTask {
    id: i64,
    title: String,
    description: Option<String>,
    priority: String,
    completed: bool,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
}

impl From<StoredTask> for TaskRow {
    fn from(t: StoredTask) -> Self {
        Self {
            id: t.id,
            title: t.title,
            description: t.description,
            priority: t.priority,
            completed: t.completed,
            created_at: t.created_at,
            updated_at: t.updated_at,
        }
    }
}

/// Makes `change` and, with a `key`, records the resulting row under it, atomically (see
/// [`TaskStore::apply`]).
///
/// Postgres does both in the change's own statement. SQLite has no data-modifying CTEs, so a
/// keyed change there is the change, then the record, in one transaction; `BEGIN IMMEDIATE`
/// takes the write lock first, so a racing copy of the call waits for this one to commit and
/// then fails on the key, as on Postgres. A change without a key is one statement on both.
async fn run_change(
    db: &Db,
    user: &UserId,
    change: &TaskChange,
    key: Option<&IdempotencyKey>,
) -> Result<Task, StoreError> {
    let (Db::Sqlite(_), Some(key)) = (db, key) else {
        // Postgres, or no key: one statement, in autocommit.
        return changed(db.into(), user, change, key).await;
    };
    let mut tx = db.begin().await?;
    let task = changed((&mut tx).into(), user, change, Some(key)).await?;
    keep(&mut tx, user, key, change.tool_name(), &task).await?;
    tx.commit().await?;
    Ok(task)
}

/// Records `task` as the result of the call keyed `key`: SQLite's second statement of a keyed
/// change. A key already used fails here with a unique violation, which rolls the change back.
async fn keep(
    tx: &mut Tx,
    user: &UserId,
    key: &IdempotencyKey,
    tool: &str,
    task: &Task,
) -> Result<(), StoreError> {
    per_db!(tx,
        // Recorded by the change's own statement (its `kept` CTE).
        pg(_e) => Ok(()),
        sqlite(e) => sqlx::query(
            "INSERT INTO tool_idempotency (user_id, key, tool, result) VALUES (?1, ?2, ?3, ?4)",
        )
        .bind(user.as_str())
        .bind(key.as_str())
        .bind(tool)
        .bind(Json(task))
        .execute(e)
        .await
        .map(drop),
    )?;
    Ok(())
}

/// Runs the statement that makes `change` on `ex`; on Postgres it also records the resulting
/// row under `key`.
///
/// Each Postgres statement has the same shape: the change in a `task` CTE, the record inserted
/// from it (`WHERE $key IS NOT NULL`: nothing without a key), the row returned. The SQLite
/// twin is the change alone, with `RETURNING`.
async fn changed(
    ex: Ex<'_>,
    user: &UserId,
    change: &TaskChange,
    key: Option<&IdempotencyKey>,
) -> Result<Task, StoreError> {
    let user = user.as_str();
    let key = key.map(IdempotencyKey::as_str);
    let tool = change.tool_name();
    let (row, id) = match change {
        TaskChange::Add {
            title,
            description,
            priority,
        } => {
            let row = per_db!(ex,
                pg(e) => sqlx::query_as!(
                    TaskRow,
                    r#"WITH task AS (
                       INSERT INTO tasks (user_id, title, description, priority)
                       VALUES ($1, $4, $5, $6)
                       RETURNING id, title, description, priority, completed, created_at, updated_at),
                   kept AS (
                       INSERT INTO tool_idempotency (user_id, key, tool, result)
                       SELECT $1, $2::text, $3, to_jsonb(task) FROM task WHERE $2::text IS NOT NULL)
                   SELECT id AS "id!", title AS "title!", description, priority AS "priority!",
                          completed AS "completed!", created_at AS "created_at!",
                          updated_at AS "updated_at!"
                   FROM task"#,
                    user,
                    key,
                    tool,
                    title.as_str(),
                    description.as_ref().map(TaskDescription::as_str),
                    priority.as_str(),
                )
                .fetch_one(e)
                .await,
                sqlite(e) => sqlx::query_as::<_, TaskRow>(
                    "INSERT INTO tasks (user_id, title, description, priority)
                     VALUES (?1, ?2, ?3, ?4)
                     RETURNING id, title, description, priority, completed, created_at, updated_at",
                )
                .bind(user)
                .bind(title.as_str())
                .bind(description.as_ref().map(TaskDescription::as_str))
                .bind(priority.as_str())
                .fetch_one(e)
                .await,
            )?;
            return row.try_into();
        }
        TaskChange::Complete(id) => {
            // `updated_at` moves only when the task actually changes.
            let row = per_db!(ex,
                pg(e) => sqlx::query_as!(
                    TaskRow,
                    r#"WITH task AS (
                       UPDATE tasks
                       SET completed = true,
                           updated_at = CASE WHEN completed THEN updated_at ELSE now() END
                       WHERE id = $4 AND user_id = $1
                       RETURNING id, title, description, priority, completed, created_at, updated_at),
                   kept AS (
                       INSERT INTO tool_idempotency (user_id, key, tool, result)
                       SELECT $1, $2::text, $3, to_jsonb(task) FROM task WHERE $2::text IS NOT NULL)
                   SELECT id AS "id!", title AS "title!", description, priority AS "priority!",
                          completed AS "completed!", created_at AS "created_at!",
                          updated_at AS "updated_at!"
                   FROM task"#,
                    user,
                    key,
                    tool,
                    id.0,
                )
                .fetch_optional(e)
                .await,
                sqlite(e) => sqlx::query_as::<_, TaskRow>(
                    "UPDATE tasks
                     SET completed = 1,
                         updated_at = CASE WHEN completed THEN updated_at
                                           ELSE strftime('%Y-%m-%dT%H:%M:%fZ', 'now') END
                     WHERE id = ?2 AND user_id = ?1
                     RETURNING id, title, description, priority, completed, created_at, updated_at",
                )
                .bind(user)
                .bind(id.0)
                .fetch_optional(e)
                .await,
            )?;
            (row, *id)
        }
        TaskChange::Delete(id) => {
            let row = per_db!(ex,
                pg(e) => sqlx::query_as!(
                    TaskRow,
                    r#"WITH task AS (
                       DELETE FROM tasks
                       WHERE id = $4 AND user_id = $1
                       RETURNING id, title, description, priority, completed, created_at, updated_at),
                   kept AS (
                       INSERT INTO tool_idempotency (user_id, key, tool, result)
                       SELECT $1, $2::text, $3, to_jsonb(task) FROM task WHERE $2::text IS NOT NULL)
                   SELECT id AS "id!", title AS "title!", description, priority AS "priority!",
                          completed AS "completed!", created_at AS "created_at!",
                          updated_at AS "updated_at!"
                   FROM task"#,
                    user,
                    key,
                    tool,
                    id.0,
                )
                .fetch_optional(e)
                .await,
                sqlite(e) => sqlx::query_as::<_, TaskRow>(
                    "DELETE FROM tasks
                     WHERE id = ?2 AND user_id = ?1
                     RETURNING id, title, description, priority, completed, created_at, updated_at",
                )
                .bind(user)
                .bind(id.0)
                .fetch_optional(e)
                .await,
            )?;
            (row, *id)
        }
        TaskChange::Update {
            id,
            title,
            description,
        } => {
            let row = per_db!(ex,
                pg(e) => sqlx::query_as!(
                    TaskRow,
                    r#"WITH task AS (
                       UPDATE tasks
                       SET title = COALESCE($5, title),
                           description = COALESCE($6, description),
                           updated_at = now()
                       WHERE id = $4 AND user_id = $1
                       RETURNING id, title, description, priority, completed, created_at, updated_at),
                   kept AS (
                       INSERT INTO tool_idempotency (user_id, key, tool, result)
                       SELECT $1, $2::text, $3, to_jsonb(task) FROM task WHERE $2::text IS NOT NULL)
                   SELECT id AS "id!", title AS "title!", description, priority AS "priority!",
                          completed AS "completed!", created_at AS "created_at!",
                          updated_at AS "updated_at!"
                   FROM task"#,
                    user,
                    key,
                    tool,
                    id.0,
                    title.as_ref().map(TaskTitle::as_str),
                    description.as_ref().map(TaskDescription::as_str),
                )
                .fetch_optional(e)
                .await,
                sqlite(e) => sqlx::query_as::<_, TaskRow>(
                    "UPDATE tasks
                     SET title = COALESCE(?3, title),
                         description = COALESCE(?4, description),
                         updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                     WHERE id = ?2 AND user_id = ?1
                     RETURNING id, title, description, priority, completed, created_at, updated_at",
                )
                .bind(user)
                .bind(id.0)
                .bind(title.as_ref().map(TaskTitle::as_str))
                .bind(description.as_ref().map(TaskDescription::as_str))
                .fetch_optional(e)
                .await,
            )?;
            (row, *id)
        }
        TaskChange::SetPriority { id, priority } => {
            let row = per_db!(ex,
                pg(e) => sqlx::query_as!(
                    TaskRow,
                    r#"WITH task AS (
                       UPDATE tasks
                       SET priority = $5, updated_at = now()
                       WHERE id = $4 AND user_id = $1
                       RETURNING id, title, description, priority, completed, created_at, updated_at),
                   kept AS (
                       INSERT INTO tool_idempotency (user_id, key, tool, result)
                       SELECT $1, $2::text, $3, to_jsonb(task) FROM task WHERE $2::text IS NOT NULL)
                   SELECT id AS "id!", title AS "title!", description, priority AS "priority!",
                          completed AS "completed!", created_at AS "created_at!",
                          updated_at AS "updated_at!"
                   FROM task"#,
                    user,
                    key,
                    tool,
                    id.0,
                    priority.as_str(),
                )
                .fetch_optional(e)
                .await,
                sqlite(e) => sqlx::query_as::<_, TaskRow>(
                    "UPDATE tasks
                     SET priority = ?3, updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')
                     WHERE id = ?2 AND user_id = ?1
                     RETURNING id, title, description, priority, completed, created_at, updated_at",
                )
                .bind(user)
                .bind(id.0)
                .bind(priority.as_str())
                .fetch_optional(e)
                .await,
            )?;
            (row, *id)
        }
    };
    row.ok_or(StoreError::TaskNotFound(id))?.try_into()
}
