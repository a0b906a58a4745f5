//! The store layer: every SQL statement the task tools run, and nothing else.
//!
//! Each statement filters by `user_id`, so a task id that belongs to someone else behaves exactly
//! like an id that does not exist. Mutations that carry an idempotency key run in one transaction
//! with the row that records their result in `tool_idempotency`, which makes their effect
//! exactly-once even when a caller retries or two copies of one call race.

use chrono::{DateTime, Utc};
use serde::{Serialize, de::DeserializeOwned};
use sqlx::{PgExecutor, PgPool};

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
    /// With a `key`, the rendered result is stored under `(user, key)` in the same transaction
    /// as the change, and any later call with that key returns the stored result without
    /// touching the tasks again. Two concurrent calls with one key both run the change, but
    /// only one can insert the key: the other's insert waits for the first to commit, fails
    /// with a unique violation, rolls its change back and answers the stored result.
    /// A failed change (e.g. an unknown task) stores nothing, so it may be retried.
    pub async fn apply<R, F>(
        &self,
        user: &UserId,
        change: &TaskChange,
        key: Option<&IdempotencyKey>,
        render: F,
    ) -> Result<R, StoreError>
    where
        R: Serialize + DeserializeOwned + Send,
        F: FnOnce(&Task) -> R + Send,
    {
        let Some(key) = key else {
            let task = run_change(&self.pool, user, change).await?;
            return Ok(render(&task));
        };
        if let Some(stored) = self.stored_result(user, key, change).await? {
            return Ok(stored);
        }

        let mut tx = self.pool.begin().await?;
        let task = run_change(&mut *tx, user, change).await?;
        let result = render(&task);
        let value = serde_json::to_value(&result)
            .map_err(|e| StoreError::Corrupt(format!("result does not serialise: {e}")))?;
        let inserted = sqlx::query!(
            "INSERT INTO tool_idempotency (user_id, key, tool, result) VALUES ($1, $2, $3, $4)",
            user.as_str(),
            key.as_str(),
            change.tool_name(),
            value,
        )
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(_) => {
                tx.commit().await?;
                Ok(result)
            }
            Err(sqlx::Error::Database(e)) if e.is_unique_violation() => {
                // A concurrent call with the same key committed first: undo ours, answer its.
                drop(tx);
                tracing::debug!(
                    user_id = user.as_str(),
                    key = key.as_str(),
                    "idempotency key raced; answering the stored result"
                );
                self.stored_result(user, key, change).await?.ok_or_else(|| {
                    StoreError::Corrupt("idempotency key vanished after a conflict".to_owned())
                })
            }
            Err(e) => Err(e.into()),
        }
    }

    /// The result stored for `(user, key)`, if a call with that key already succeeded.
    async fn stored_result<R: DeserializeOwned>(
        &self,
        user: &UserId,
        key: &IdempotencyKey,
        change: &TaskChange,
    ) -> Result<Option<R>, StoreError> {
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
        serde_json::from_value(row.result)
            .map(Some)
            .map_err(|e| StoreError::Corrupt(format!("stored result of {}: {e}", row.tool)))
    }
}

/// Runs the one statement that makes `change`, on a pool or inside a transaction.
async fn run_change<'e, E: PgExecutor<'e>>(
    executor: E,
    user: &UserId,
    change: &TaskChange,
) -> Result<Task, StoreError> {
    let (row, id) = match change {
        TaskChange::Add {
            title,
            description,
            priority,
        } => {
            let row = sqlx::query_as!(
                TaskRow,
                r#"INSERT INTO tasks (user_id, title, description, priority)
                   VALUES ($1, $2, $3, $4)
                   RETURNING id, title, description, priority, completed, created_at, updated_at"#,
                user.as_str(),
                title.as_str(),
                description.as_ref().map(TaskDescription::as_str),
                priority.as_str(),
            )
            .fetch_one(executor)
            .await?;
            return row.try_into();
        }
        TaskChange::Complete(id) => {
            // `updated_at` moves only when the task actually changes.
            let row = sqlx::query_as!(
                TaskRow,
                r#"UPDATE tasks
                   SET completed = true,
                       updated_at = CASE WHEN completed THEN updated_at ELSE now() END
                   WHERE id = $1 AND user_id = $2
                   RETURNING id, title, description, priority, completed, created_at, updated_at"#,
                id.0,
                user.as_str(),
            )
            .fetch_optional(executor)
            .await?;
            (row, *id)
        }
        TaskChange::Delete(id) => {
            let row = sqlx::query_as!(
                TaskRow,
                r#"DELETE FROM tasks
                   WHERE id = $1 AND user_id = $2
                   RETURNING id, title, description, priority, completed, created_at, updated_at"#,
                id.0,
                user.as_str(),
            )
            .fetch_optional(executor)
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
                r#"UPDATE tasks
                   SET title = COALESCE($3, title),
                       description = COALESCE($4, description),
                       updated_at = now()
                   WHERE id = $1 AND user_id = $2
                   RETURNING id, title, description, priority, completed, created_at, updated_at"#,
                id.0,
                user.as_str(),
                title.as_ref().map(TaskTitle::as_str),
                description.as_ref().map(TaskDescription::as_str),
            )
            .fetch_optional(executor)
            .await?;
            (row, *id)
        }
        TaskChange::SetPriority { id, priority } => {
            let row = sqlx::query_as!(
                TaskRow,
                r#"UPDATE tasks
                   SET priority = $3, updated_at = now()
                   WHERE id = $1 AND user_id = $2
                   RETURNING id, title, description, priority, completed, created_at, updated_at"#,
                id.0,
                user.as_str(),
                priority.as_str(),
            )
            .fetch_optional(executor)
            .await?;
            (row, *id)
        }
    };
    row.ok_or(StoreError::TaskNotFound(id))?.try_into()
}
