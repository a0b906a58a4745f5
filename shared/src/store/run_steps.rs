//! `run_steps`: the journal of a run's executed tool calls, so that a retried attempt reuses
//! a recorded result instead of repeating the side effect.

use serde_json::Value;

use crate::{db::Ex, per_db};

/// One executed tool call.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Step {
    pub step: i32,
    pub tool_call_id: String,
    pub name: String,
    pub arguments: Value,
    pub ok: bool,
    pub result: Value,
}

/// Records a step; a step already recorded (by an earlier attempt) is kept as it was.
pub async fn insert(ex: impl Into<Ex<'_>>, run_id: &str, step: &Step) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            r#"INSERT INTO run_steps (run_id, step, tool_call_id, name, arguments, ok, result)
               VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (run_id, step) DO NOTHING"#,
            run_id,
            step.step,
            step.tool_call_id,
            step.name,
            step.arguments,
            step.ok,
            step.result
        )
        .execute(e)
        .await
        .map(drop),
        sqlite(e) => sqlx::query(
            r"INSERT INTO run_steps (run_id, step, tool_call_id, name, arguments, ok, result)
              VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7) ON CONFLICT (run_id, step) DO NOTHING",
        )
        .bind(run_id)
        .bind(step.step)
        .bind(&step.tool_call_id)
        .bind(&step.name)
        .bind(&step.arguments)
        .bind(step.ok)
        .bind(&step.result)
        .execute(e)
        .await
        .map(drop),
    )
}

/// The run's journal in step order.
pub async fn list(ex: impl Into<Ex<'_>>, run_id: &str) -> sqlx::Result<Vec<Step>> {
    per_db!(ex,
        pg(e) => sqlx::query_as!(
            Step,
            "SELECT step, tool_call_id, name, arguments, ok, result FROM run_steps WHERE run_id = $1 ORDER BY step",
            run_id
        )
        .fetch_all(e)
        .await,
        sqlite(e) => sqlx::query_as(
            "SELECT step, tool_call_id, name, arguments, ok, result FROM run_steps WHERE run_id = ?1 ORDER BY step",
        )
        .bind(run_id)
        .fetch_all(e)
        .await,
    )
}
