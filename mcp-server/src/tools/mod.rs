//! The tool layer: the six MCP tools, their descriptions and schemas, and the rules that turn
//! a model's arguments into domain values before anything touches the store.
//!
//! Every tool takes a `user_id`; the Conveyor worker fills it from the run and hides it from the
//! model, so scoping is enforced by the caller and by every SQL statement, never by the model.
//! Every failure comes back as a tool error (`isError: true`) with a message the model can act
//! on — including arguments that break the schema, which rmcp's router turns into tool errors.
//! Only protocol-level faults (an unknown tool name) are JSON-RPC errors.

mod args;
mod reply;

use rmcp::{
    ServerHandler,
    handler::server::{router::tool::ToolRouter, tool::schema_for_output, wrapper::Parameters},
    model::{CallToolResult, RequestMetaObject},
    tool, tool_handler, tool_router,
};
use serde_json::Value;

pub use self::args::{AddTaskArgs, ListTasksArgs, SetPriorityArgs, TaskRefArgs, UpdateTaskArgs};
use self::reply::{Reply, ToolError};
pub use self::reply::{TaskListOutput, TaskOutput};
use crate::domain::{
    IdempotencyKey, TaskChange, TaskDescription, TaskPriority, TaskStatusFilter, TaskTitle, UserId,
    ValidationError,
};
use crate::store::TaskStore;

/// The `_meta` entry that carries a mutating call's exactly-once key.
pub const IDEMPOTENCY_META_KEY: &str = "conveyor/idempotency_key";

const ADD_TASK: &str = "Create a new task in the user's task list and return it with its id. \
Use it when the user wants to remember, plan or do something. `title` is a short summary \
(1-500 characters); put any details in `description` (up to 5,000 characters). `priority` is \
\"low\", \"medium\" (default) or \"high\".";

const LIST_TASKS: &str = "List the user's tasks, oldest first, each with its id, title, \
description, priority and whether it is completed. `status` filters them: \"all\" (default), \
\"pending\" or \"completed\". Call this to find a task's id before changing or deleting it; \
never guess ids.";

const COMPLETE_TASK: &str = "Mark one of the user's tasks as completed (done). Needs the task's \
id from list_tasks or add_task. Completing an already completed task changes nothing.";

const DELETE_TASK: &str = "Permanently delete one of the user's tasks. Needs the task's id from \
list_tasks or add_task. This cannot be undone: when the user has finished a task, use \
complete_task instead.";

const UPDATE_TASK: &str = "Change the title and/or the description of one of the user's tasks. \
Needs the task's id from list_tasks or add_task and at least one of `title` (1-500 characters) \
or `description` (1-5,000 characters, replaces the old one); what you leave out stays as it is. \
Use set_priority to change the priority and complete_task to mark it done.";

const SET_PRIORITY: &str = "Set the priority of one of the user's tasks to \"low\", \"medium\" \
or \"high\". Needs the task's id from list_tasks or add_task.";

/// The MCP server: validates tool arguments, asks the [`TaskStore`], and phrases the answers.
/// Cheap to clone (a pool handle and the tool table), as the HTTP transport makes one per
/// session.
#[derive(Debug, Clone)]
pub struct TaskServer {
    store: TaskStore,
    tool_router: ToolRouter<Self>,
}

#[tool_router]
impl TaskServer {
    pub fn new(store: TaskStore) -> Self {
        Self {
            store,
            tool_router: Self::tool_router(),
        }
    }

    #[tool(
        name = "add_task",
        description = ADD_TASK,
        output_schema = schema_for_output::<TaskOutput>(),
        annotations(title = "Add a task", read_only_hint = false, destructive_hint = false, idempotent_hint = false, open_world_hint = false)
    )]
    async fn add_task(
        &self,
        Parameters(args): Parameters<AddTaskArgs>,
        meta: RequestMetaObject,
    ) -> CallToolResult {
        let change = (|| {
            Ok(TaskChange::Add {
                title: TaskTitle::parse(&args.title)?,
                description: TaskDescription::parse_optional(args.description.as_deref())?,
                priority: TaskPriority::parse_or_default(args.priority.as_deref())?,
            })
        })();
        self.change(args.user_id, &meta, change).await
    }

    #[tool(
        name = "list_tasks",
        description = LIST_TASKS,
        output_schema = schema_for_output::<TaskListOutput>(),
        annotations(title = "List tasks", read_only_hint = true, open_world_hint = false)
    )]
    async fn list_tasks(&self, Parameters(args): Parameters<ListTasksArgs>) -> CallToolResult {
        let parsed = UserId::parse(args.user_id.clone()).and_then(|user| {
            Ok((
                user,
                TaskStatusFilter::parse_or_default(args.status.as_deref())?,
            ))
        });
        let (user, filter) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => return ToolError::from(e).into_result(),
        };
        match self.store.list(&user, filter).await {
            Ok(tasks) => Reply::listed(filter, tasks).into_result(),
            Err(e) => ToolError::from_store(e, "list_tasks", user.as_str(), None).into_result(),
        }
    }

    #[tool(
        name = "complete_task",
        description = COMPLETE_TASK,
        output_schema = schema_for_output::<TaskOutput>(),
        annotations(title = "Complete a task", read_only_hint = false, destructive_hint = false, idempotent_hint = true, open_world_hint = false)
    )]
    async fn complete_task(
        &self,
        Parameters(args): Parameters<TaskRefArgs>,
        meta: RequestMetaObject,
    ) -> CallToolResult {
        let change = Ok(TaskChange::Complete(args.task_id));
        self.change(args.user_id, &meta, change).await
    }

    #[tool(
        name = "delete_task",
        description = DELETE_TASK,
        output_schema = schema_for_output::<TaskOutput>(),
        annotations(title = "Delete a task", read_only_hint = false, destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn delete_task(
        &self,
        Parameters(args): Parameters<TaskRefArgs>,
        meta: RequestMetaObject,
    ) -> CallToolResult {
        let change = Ok(TaskChange::Delete(args.task_id));
        self.change(args.user_id, &meta, change).await
    }

    #[tool(
        name = "update_task",
        description = UPDATE_TASK,
        output_schema = schema_for_output::<TaskOutput>(),
        annotations(title = "Update a task", read_only_hint = false, destructive_hint = true, idempotent_hint = true, open_world_hint = false)
    )]
    async fn update_task(
        &self,
        Parameters(args): Parameters<UpdateTaskArgs>,
        meta: RequestMetaObject,
    ) -> CallToolResult {
        let change = (|| {
            let title = args.title.as_deref().map(TaskTitle::parse).transpose()?;
            let description = TaskDescription::parse_optional(args.description.as_deref())?;
            if title.is_none() && description.is_none() {
                return Err(ValidationError::NothingToUpdate);
            }
            Ok(TaskChange::Update {
                id: args.task_id,
                title,
                description,
            })
        })();
        self.change(args.user_id, &meta, change).await
    }

    #[tool(
        name = "set_priority",
        description = SET_PRIORITY,
        output_schema = schema_for_output::<TaskOutput>(),
        annotations(title = "Set a task's priority", read_only_hint = false, destructive_hint = false, idempotent_hint = true, open_world_hint = false)
    )]
    async fn set_priority(
        &self,
        Parameters(args): Parameters<SetPriorityArgs>,
        meta: RequestMetaObject,
    ) -> CallToolResult {
        let change = TaskPriority::parse(&args.priority).map(|priority| TaskChange::SetPriority {
            id: args.task_id,
            priority,
        });
        self.change(args.user_id, &meta, change).await
    }
}

impl TaskServer {
    /// The path every mutating tool shares: check the user and the key, apply the change
    /// (exactly once when keyed), phrase the answer.
    async fn change(
        &self,
        user_id: String,
        meta: &RequestMetaObject,
        change: Result<TaskChange, ValidationError>,
    ) -> CallToolResult {
        let parsed =
            UserId::parse(user_id).and_then(|user| Ok((user, idempotency_key(meta)?, change?)));
        let (user, key, change) = match parsed {
            Ok(parsed) => parsed,
            Err(e) => return ToolError::from(e).into_result(),
        };
        let tool = change.tool_name();
        tracing::debug!(
            tool,
            user_id = user.as_str(),
            keyed = key.is_some(),
            "tool call"
        );
        match self
            .store
            .apply(&user, &change, key.as_ref(), |task| {
                Reply::changed(&change, task)
            })
            .await
        {
            Ok(reply) => reply.into_result(),
            Err(e) => ToolError::from_store(e, tool, user.as_str(), key.as_ref()).into_result(),
        }
    }
}

/// Reads the exactly-once key from the request's `_meta`. Absent or `null` means "no key";
/// anything else that is not a usable string is refused rather than ignored, since ignoring it
/// would silently give up the exactly-once promise the caller asked for.
fn idempotency_key(meta: &RequestMetaObject) -> Result<Option<IdempotencyKey>, ValidationError> {
    match meta.get(IDEMPOTENCY_META_KEY) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(raw)) => IdempotencyKey::parse(raw).map(Some),
        Some(_) => Err(ValidationError::BadIdempotencyKey),
    }
}

#[tool_handler(
    router = self.tool_router,
    name = "conveyor-mcp",
    instructions = "Conveyor's task list. Each user has their own tasks; every tool takes the user's `user_id`, which the caller supplies. Find task ids with list_tasks before changing a task, and never guess them."
)]
impl ServerHandler for TaskServer {}
