//! What the tools answer: structured JSON for programs, a one-line summary for the model, and
//! tool errors (`isError: true`) whose text tells the model what to change.

use std::fmt::Write as _;

use rmcp::model::{CallToolResult, ContentBlock};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::domain::{IdempotencyKey, Task, TaskChange, TaskId, TaskStatusFilter, ValidationError};
use crate::store::StoreError;

/// Structured result of every tool that changes one task (for `delete_task`: the task as it
/// was before it was deleted).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TaskOutput {
    pub task: Task,
}

/// Structured result of `list_tasks`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TaskListOutput {
    pub tasks: Vec<Task>,
    pub count: usize,
}

/// A successful tool answer. It is also what an idempotent call stores, so a repeated call
/// answers byte-for-byte what the first one did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Reply {
    summary: String,
    structured: serde_json::Value,
}

impl Reply {
    /// The answer to a change of one task.
    pub fn changed(change: &TaskChange, task: &Task) -> Self {
        let id = task.id;
        let title = &task.title;
        let summary = match change {
            TaskChange::Add { .. } => format!("Added task {id}: {title}"),
            TaskChange::Complete(_) => format!("Completed task {id}: {title}"),
            TaskChange::Delete(_) => format!("Deleted task {id}: {title}"),
            TaskChange::Update {
                title: new_title,
                description,
                ..
            } => {
                let what = match (new_title.is_some(), description.is_some()) {
                    (true, true) => "title and description",
                    (true, false) => "title",
                    (false, _) => "description",
                };
                format!("Updated the {what} of task {id}: {title}")
            }
            TaskChange::SetPriority { priority, .. } => {
                format!("Set the priority of task {id} to {priority}: {title}")
            }
        };
        Self::new(summary, &TaskOutput { task: task.clone() })
    }

    /// The answer to `list_tasks`: one line per task, so a model that reads only the text
    /// still sees ids, states and priorities.
    pub fn listed(filter: TaskStatusFilter, tasks: Vec<Task>) -> Self {
        /// Descriptions in the summary are cut to this many characters; the structured
        /// content has them in full.
        const DESCRIPTION_PREVIEW_CHARS: usize = 120;

        let kind = match filter {
            TaskStatusFilter::All => "",
            TaskStatusFilter::Pending => "pending ",
            TaskStatusFilter::Completed => "completed ",
        };
        let mut summary = match tasks.len() {
            0 => format!("No {kind}tasks."),
            1 => format!("1 {kind}task:"),
            n => format!("{n} {kind}tasks:"),
        };
        for task in &tasks {
            let state = if task.completed {
                "completed"
            } else {
                "pending"
            };
            let _ = write!(
                summary,
                "\n- {}: {} [{state}, {} priority]",
                task.id, task.title, task.priority
            );
            if let Some(description) = &task.description {
                let mut preview: String = description
                    .chars()
                    .take(DESCRIPTION_PREVIEW_CHARS)
                    .collect();
                if preview.len() < description.len() {
                    preview.push('…');
                }
                let _ = write!(summary, " — {}", preview.replace('\n', " "));
            }
        }
        let count = tasks.len();
        Self::new(summary, &TaskListOutput { tasks, count })
    }

    fn new(summary: String, structured: &impl Serialize) -> Self {
        Self {
            summary,
            // Serialising plain data (strings, integers, timestamps) cannot fail.
            structured: serde_json::to_value(structured).unwrap_or_default(),
        }
    }

    pub fn into_result(self) -> CallToolResult {
        let mut result = CallToolResult::structured(self.structured);
        result.content = vec![ContentBlock::text(self.summary)];
        result
    }
}

/// Why a tool call failed, phrased for the model that made it.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Also the answer for another user's task: the two cases must be indistinguishable.
    #[error("task {0} not found. Call list_tasks to see this user's task ids")]
    NotFound(TaskId),
    #[error("idempotency key {key:?} was already used for {tool}; send this call with a new key")]
    KeyReused { key: String, tool: String },
    /// Database trouble; the details go to the log, not to the model.
    #[error("the task store is unavailable right now; try again shortly")]
    Unavailable,
}

impl ToolError {
    /// Maps a store failure, logging the ones that are ours (not the caller's) exactly once.
    pub fn from_store(
        error: StoreError,
        tool: &'static str,
        user_id: &str,
        key: Option<&IdempotencyKey>,
    ) -> Self {
        match error {
            StoreError::TaskNotFound(id) => Self::NotFound(id),
            StoreError::KeyReused { tool: first } => Self::KeyReused {
                key: key.map(|k| k.as_str().to_owned()).unwrap_or_default(),
                tool: first,
            },
            StoreError::Database(_) | StoreError::Corrupt(_) => {
                tracing::error!(tool, user_id, error = %error, "task tool failed");
                Self::Unavailable
            }
        }
    }

    pub fn into_result(self) -> CallToolResult {
        CallToolResult::error(vec![ContentBlock::text(self.to_string())])
    }
}
