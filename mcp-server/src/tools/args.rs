//! The tools' arguments as they arrive on the wire, and the JSON schemas a model sees.
//!
//! These structs are deliberately loose where the model is most likely to err: titles,
//! descriptions, priorities and statuses are plain strings here, so that a wrong value becomes a
//! tool error the model can read and fix (see [`crate::domain`], where they are parsed), not a
//! JSON-RPC error it never sees. The schemas still carry the exact rules — enums and lengths —
//! so a model that reads them gets it right the first time. A value of the wrong JSON type, a
//! missing required field or an unknown field is refused by deserialisation, which rmcp also
//! reports as a tool error ("failed to deserialize parameters: unknown field `due`, …").
//!
//! Field doc comments become the schema descriptions a model reads, so each is one line.

use schemars::JsonSchema;
use serde::Deserialize;

use crate::domain::{TaskId, TaskPriority, TaskStatusFilter};

/// Arguments of `add_task`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AddTaskArgs {
    /// Id of the user whose task list this is. Conveyor fills it in; never invent or change it.
    #[schemars(length(min = 1, max = 128))]
    pub user_id: String,
    /// Short summary of the task, e.g. "Buy milk". 1–500 characters; surrounding whitespace is trimmed.
    #[schemars(length(min = 1, max = 500))]
    pub title: String,
    /// Optional details: notes, links, steps. 1–5,000 characters. Leave it out when there is nothing to add.
    #[schemars(length(min = 1, max = 5000))]
    #[serde(default)]
    pub description: Option<String>,
    /// How urgent the task is: "low", "medium" or "high". Defaults to "medium".
    #[schemars(with = "TaskPriority", extend("default" = "medium"))]
    #[serde(default)]
    pub priority: Option<String>,
}

/// Arguments of `list_tasks`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListTasksArgs {
    /// Id of the user whose task list this is. Conveyor fills it in; never invent or change it.
    #[schemars(length(min = 1, max = 128))]
    pub user_id: String,
    /// Which tasks to return: "all" (default), "pending" (not yet completed) or "completed".
    #[schemars(with = "TaskStatusFilter", extend("default" = "all"))]
    #[serde(default)]
    pub status: Option<String>,
}

/// Arguments of `complete_task` and `delete_task`: one task of one user.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TaskRefArgs {
    /// Id of the user whose task list this is. Conveyor fills it in; never invent or change it.
    #[schemars(length(min = 1, max = 128))]
    pub user_id: String,
    /// Id of the task, as shown by list_tasks or returned by add_task.
    pub task_id: TaskId,
}

/// Arguments of `update_task`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateTaskArgs {
    /// Id of the user whose task list this is. Conveyor fills it in; never invent or change it.
    #[schemars(length(min = 1, max = 128))]
    pub user_id: String,
    /// Id of the task, as shown by list_tasks or returned by add_task.
    pub task_id: TaskId,
    /// New title, 1–500 characters (trimmed). Leave it out to keep the current title.
    #[schemars(length(min = 1, max = 500))]
    #[serde(default)]
    pub title: Option<String>,
    /// New description, 1–5,000 characters; replaces the old one. Leave it out to keep the current description.
    #[schemars(length(min = 1, max = 5000))]
    #[serde(default)]
    pub description: Option<String>,
}

/// Arguments of `set_priority`.
#[derive(Debug, Clone, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPriorityArgs {
    /// Id of the user whose task list this is. Conveyor fills it in; never invent or change it.
    #[schemars(length(min = 1, max = 128))]
    pub user_id: String,
    /// Id of the task, as shown by list_tasks or returned by add_task.
    pub task_id: TaskId,
    /// The new priority: "low", "medium" or "high".
    #[schemars(with = "TaskPriority")]
    pub priority: String,
}
