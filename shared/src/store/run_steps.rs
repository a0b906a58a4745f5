//! `run_steps`: the journal of a run's executed tool calls, so that a retried attempt reuses
//! a recorded result instead of repeating the side effect.

use serde_json::Value;
use sqlx::PgExecutor;

/// One executed tool call.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub step: i32,
    pub tool_call_id: String,
    pub name: String,
    pub arguments: Value,
    pub ok: bool,
    pub result: Value,
}

/// Records a step; a step already recorded (by an earlier attempt) is kept as it was.
pub async fn insert(conn: impl PgExecutor<'_>, run_id: &str, step: &Step) -> sqlx::Result<()> {
    sqlx::query!(
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
    .execute(conn)
    .await?;
    Ok(())
}

/// The run's journal in step order.
pub async fn list(conn: impl PgExecutor<'_>, run_id: &str) -> sqlx::Result<Vec<Step>> {
    sqlx::query_as!(
        Step,
        "SELECT step, tool_call_id, name, arguments, ok, result FROM run_steps WHERE run_id = $1 ORDER BY step",
        run_id
    )
    .fetch_all(conn)
    .await
}
