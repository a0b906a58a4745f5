//! The store layer: every SQL statement the task tools run, and nothing else.
//!
//! Each statement filters by `user_id`, so a task id that belongs to someone else behaves exactly
//! like an id that does not exist. A mutation that carries an idempotency key records its resulting
//! row in `tool_idempotency` in the same statement as the change, which makes its effect
//! exactly-once even when a caller retries or two copies of one call race.

use chrono::{DateTime, Utc};
use serde::Deserialize;
use sqlx::PgPool;

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

/// Postgres-backed storage for tasks and for the results of idempotent tool calls.
#[derive(Debug, Clone)]
pub struct TaskStore {
    pool: PgPool,
}

/// A `tasks` row as Postgres returns it, before its priority is parsed.
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
    pub fn new(pool: PgPool) -> Self {
        Self { pool }
    }

    /// The user's tasks matching `filter`, oldest first (ids grow with creation time).
    pub async fn list(
        &self,
        user: &UserId,
        filter: TaskStatusFilter,
    ) -> Result<Vec<Task>, StoreError> {
        let rows = sqlx::query_as!(
            TaskRow,
            r#"SELECT id, title, description, priority, completed, created_at, updated_at
               FROM tasks
               WHERE user_id = $1 AND ($2::boolean IS NULL OR completed = $2)
               ORDER BY id"#,
            user.as_str(),
            filter.completed(),
        )
        .fetch_all(&self.pool)
        .await?;
        rows.into_iter().map(Task::try_from).collect()
    }

    /// Applies `change` for `user` and returns `render(&task)`, where `task` is the row after
    /// the change (for a delete: the row that was deleted).
    ///
    /// With a `key`, the same statement stores the task row under `(user, key)`, so the effect
    /// and its record commit together. A later call with that key conflicts on the record,
    /// which undoes its change, and answers from the stored row instead (`render` of the same
    /// change and row gives the same reply). Two concurrent calls with one key both run the
    /// change, but only one can insert the key: the other's insert waits for the first to
    /// commit, fails, and answers the stored row. A failed change (e.g. an unknown task)
    /// stores nothing, so it may be retried.
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
        let applied = run_change(&self.pool, user, change, key).await;
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
        let Some(row) = sqlx::query!(
            "SELECT tool, result FROM tool_idempotency WHERE user_id = $1 AND key = $2",
            user.as_str(),
            key.as_str(),
        )
        .fetch_optional(&self.pool)
        .await?
        else {
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
        let stored: StoredTask = serde_json::from_value(row.result)
            .map_err(|e| StoreError::Corrupt(format!("stored result of {}: {e}", row.tool)))?;
        TaskRow::from(stored).try_into().map(Some)
    }
}

/// A task row as `to_jsonb` stores it in `tool_idempotency.result`.
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

/// Runs the one statement that makes `change` and, with a `key`, records the resulting row
/// under it (see [`TaskStore::apply`]).
///
/// Each statement has the same shape: the change in a `task` CTE, the record inserted from it
/// (`WHERE $key IS NOT NULL`: nothing without a key), the row returned.
async fn run_change(
    pool: &PgPool,
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
            let row = sqlx::query_as!(
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
            .fetch_one(pool)
            .await?;
            return row.try_into();
        }
        TaskChange::Complete(id) => {
            // `updated_at` moves only when the task actually changes.
            let row = sqlx::query_as!(
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
            .fetch_optional(pool)
            .await?;
            (row, *id)
        }
        TaskChange::Delete(id) => {
            let row = sqlx::query_as!(
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
            .fetch_optional(pool)
            .await?;
            (row, *id)
        }
        TaskChange::Update {
            id,
            title,
            description,
        } => {
            let row = sqlx::query_as!(
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
            .fetch_optional(pool)
            .await?;
            (row, *id)
        }
        TaskChange::SetPriority { id, priority } => {
            let row = sqlx::query_as!(
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
            .fetch_optional(pool)
            .await?;
            (row, *id)
        }
    };
    row.ok_or(StoreError::TaskNotFound(id))?.try_into()
}
