//! What the stdio and HTTP test suites share: a database per test, the real binary started
//! on either transport, tool-call helpers, and the scenarios themselves — each scenario is one
//! function taking a connected client, run by both suites on both databases (Postgres and a
//! SQLite file) through [`transport_scenarios!`].

pub mod db;

use std::time::Duration;

use rmcp::{
    RoleClient,
    model::{CallToolRequestParams, CallToolResult, MetaObject, RequestMetaObject},
    service::{Peer, RunningService, ServiceError},
};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncRead, BufReader},
    process::{Child, Command},
    task::JoinHandle,
};

pub use self::db::{Backend, TestDb};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_conveyor-mcp");
/// Upper bound for anything a test waits for; generous because CI machines are slow.
pub const DEADLINE: Duration = Duration::from_mins(1);

/// A client connected to a running `conveyor-mcp`, and what keeps that server alive.
pub struct Connected {
    pub client: RunningService<RoleClient, ()>,
    pub db: TestDb,
    _server: ServerProcess,
}

impl Connected {
    /// Bundles a connected client with the database and the server process it talks to
    /// (`child` when the test spawned the process itself; rmcp's child transport owns its own).
    pub fn new(
        client: RunningService<RoleClient, ()>,
        db: TestDb,
        child: Option<Child>,
        logs: JoinHandle<()>,
    ) -> Self {
        Self {
            client,
            db,
            _server: ServerProcess {
                _child: child,
                logs,
            },
        }
    }

    pub fn peer(&self) -> &Peer<RoleClient> {
        self.client.peer()
    }

    pub async fn close(mut self) {
        let _ = self.client.close().await;
    }
}

/// The server's process (when the test owns it directly) and the task copying its stderr
/// into the test's output. Both end when this is dropped.
struct ServerProcess {
    _child: Option<Child>,
    logs: JoinHandle<()>,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.logs.abort();
    }
}

/// A `conveyor-mcp` command against `database_url`, logging at `info` to a pipe.
pub fn server_command(database_url: &str) -> Command {
    let mut command = Command::new(BIN);
    command
        .env("DATABASE_URL", database_url)
        .env("RUST_LOG", "info")
        .kill_on_drop(true);
    command
}

/// Copies a child's stderr into the test output line by line (shown when a test fails).
pub fn forward_logs(stderr: impl AsyncRead + Unpin + Send + 'static) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("[conveyor-mcp] {line}");
        }
    })
}

/// Calls `tool` with `arguments`, optionally with an idempotency key in `_meta`.
pub async fn try_call(
    peer: &Peer<RoleClient>,
    tool: &str,
    arguments: Value,
    key: Option<&str>,
) -> Result<CallToolResult, ServiceError> {
    let Value::Object(arguments) = arguments else {
        panic!("tool arguments must be a JSON object");
    };
    let mut params = CallToolRequestParams::new(tool.to_owned()).with_arguments(arguments);
    if let Some(key) = key {
        let mut meta = serde_json::Map::new();
        meta.insert(conveyor_mcp::IDEMPOTENCY_META_KEY.to_owned(), json!(key));
        params.meta = Some(RequestMetaObject(MetaObject(meta)));
    }
    tokio::time::timeout(DEADLINE, peer.call_tool(params))
        .await
        .expect("tool answered in time")
}

/// Calls a tool that must answer (success or tool error), not fail at the protocol level.
pub async fn call(peer: &Peer<RoleClient>, tool: &str, arguments: Value) -> CallToolResult {
    try_call(peer, tool, arguments, None)
        .await
        .unwrap_or_else(|e| panic!("{tool} failed at the protocol level: {e}"))
}

pub async fn call_keyed(
    peer: &Peer<RoleClient>,
    tool: &str,
    arguments: Value,
    key: &str,
) -> CallToolResult {
    try_call(peer, tool, arguments, Some(key))
        .await
        .unwrap_or_else(|e| panic!("{tool} failed at the protocol level: {e}"))
}

/// The text of a result's first content block.
pub fn text(result: &CallToolResult) -> String {
    result
        .content
        .first()
        .and_then(|c| c.as_text())
        .map(|t| t.text.clone())
        .unwrap_or_default()
}

/// Asserts success and returns `(summary, structured content)`.
pub fn ok(result: CallToolResult) -> (String, Value) {
    assert_eq!(
        result.is_error,
        Some(false),
        "expected success, got {result:?}"
    );
    let summary = text(&result);
    let structured = result.structured_content.expect("structured content");
    (summary, structured)
}

/// Asserts a tool error (`isError: true`) and returns its message.
pub fn tool_error(result: &CallToolResult) -> String {
    assert_eq!(
        result.is_error,
        Some(true),
        "expected a tool error, got {result:?}"
    );
    assert!(result.structured_content.is_none());
    text(result)
}

/// The structured `task` of a single-task answer.
pub fn task_of(result: CallToolResult) -> Value {
    ok(result).1["task"].clone()
}

pub fn id_of(task: &Value) -> i64 {
    task["id"].as_i64().expect("task id")
}

/// The user's tasks as `list_tasks` reports them.
pub async fn list(peer: &Peer<RoleClient>, user: &str, status: &str) -> Vec<Value> {
    let (_, structured) = ok(call(
        peer,
        "list_tasks",
        json!({"user_id": user, "status": status}),
    )
    .await);
    let tasks = structured["tasks"].as_array().expect("tasks").clone();
    assert_eq!(structured["count"], json!(tasks.len()));
    tasks
}

pub async fn add(peer: &Peer<RoleClient>, user: &str, title: &str) -> Value {
    task_of(call(peer, "add_task", json!({"user_id": user, "title": title})).await)
}

/// Rows in a table for a user, straight from the database (to prove nothing changed).
pub async fn count_rows(db: &TestDb, table: Table, user: &str) -> i64 {
    // Static SQL per table; the tests check the store through the database, not through it.
    let sql = match table {
        Table::Tasks => "SELECT count(*) FROM tasks WHERE user_id = $1",
        Table::ToolIdempotency => "SELECT count(*) FROM tool_idempotency WHERE user_id = $1",
    };
    db.count(sql, user).await
}

#[derive(Debug, Clone, Copy)]
pub enum Table {
    Tasks,
    ToolIdempotency,
}

/// The scenarios both transports must pass.
pub mod scenarios {
    use std::collections::BTreeSet;

    use futures::future::join_all;
    use rmcp::model::ErrorCode;

    use super::*;

    pub async fn tools_are_listed_with_their_schemas(c: &Connected) {
        let tools = c.peer().list_all_tools().await.expect("list tools");
        let names: BTreeSet<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
        assert_eq!(
            names,
            BTreeSet::from([
                "add_task",
                "complete_task",
                "delete_task",
                "list_tasks",
                "set_priority",
                "update_task"
            ])
        );
        for tool in &tools {
            let schema = Value::Object((*tool.input_schema).clone());
            let required = schema["required"].as_array().expect("required list");
            assert!(
                required.contains(&json!("user_id")),
                "{} must require user_id",
                tool.name
            );
            assert_eq!(schema["properties"]["user_id"]["maxLength"], json!(128));
            assert_eq!(schema["properties"]["user_id"]["minLength"], json!(1));
            assert_eq!(
                schema["additionalProperties"],
                json!(false),
                "{}",
                tool.name
            );
            assert!(
                tool.description.as_deref().is_some_and(|d| d.len() > 40),
                "{} needs a real description",
                tool.name
            );
            assert!(tool.output_schema.is_some(), "{} output schema", tool.name);
        }
        let schema = |name: &str| {
            let tool = tools.iter().find(|t| t.name == name).expect(name);
            Value::Object((*tool.input_schema).clone())
        };
        let priorities = json!(["low", "medium", "high"]);
        let add = schema("add_task");
        assert_eq!(add["properties"]["priority"]["enum"], priorities);
        assert_eq!(add["properties"]["priority"]["default"], json!("medium"));
        assert_eq!(add["properties"]["title"]["maxLength"], json!(500));
        assert_eq!(add["properties"]["description"]["maxLength"], json!(5000));
        assert_eq!(add["required"], json!(["user_id", "title"]));
        assert_eq!(
            schema("set_priority")["properties"]["priority"]["enum"],
            priorities
        );
        assert_eq!(
            schema("list_tasks")["properties"]["status"]["enum"],
            json!(["all", "pending", "completed"])
        );
        assert_eq!(
            schema("complete_task")["properties"]["task_id"]["type"],
            json!("integer")
        );
        let list = tools.iter().find(|t| t.name == "list_tasks").unwrap();
        assert_eq!(
            list.annotations.as_ref().and_then(|a| a.read_only_hint),
            Some(true)
        );
    }

    pub async fn full_task_flow(c: &Connected) {
        let peer = c.peer();
        let (summary, added) = ok(call(
            peer,
            "add_task",
            json!({"user_id": "alice", "title": "  Buy milk  ", "description": "2 litres", "priority": "high"}),
        )
        .await);
        let milk = added["task"].clone();
        let milk_id = id_of(&milk);
        assert_eq!(summary, format!("Added task {milk_id}: Buy milk"));
        assert_eq!(milk["title"], json!("Buy milk"), "title is stored trimmed");
        assert_eq!(milk["description"], json!("2 litres"));
        assert_eq!(milk["priority"], json!("high"));
        assert_eq!(milk["completed"], json!(false));

        let report = add(peer, "alice", "Write report").await;
        let report_id = id_of(&report);
        assert_eq!(report["priority"], json!("medium"), "default priority");
        assert_eq!(report["description"], Value::Null);

        let all = list(peer, "alice", "all").await;
        assert_eq!(all, vec![milk.clone(), report.clone()], "oldest first");
        let (summary, _) = ok(call(peer, "list_tasks", json!({"user_id": "alice"})).await);
        assert!(summary.starts_with("2 tasks:"), "{summary}");
        assert!(
            summary.contains(&format!("{milk_id}: Buy milk [pending, high priority]")),
            "{summary}"
        );

        let (summary, updated) = ok(call(
            peer,
            "update_task",
            json!({"user_id": "alice", "task_id": milk_id, "title": "Buy oat milk"}),
        )
        .await);
        assert_eq!(
            summary,
            format!("Updated the title of task {milk_id}: Buy oat milk")
        );
        assert_eq!(updated["task"]["title"], json!("Buy oat milk"));
        assert_eq!(
            updated["task"]["description"],
            json!("2 litres"),
            "untouched"
        );
        let updated = task_of(
            call(
                peer,
                "update_task",
                json!({"user_id": "alice", "task_id": milk_id, "description": "1 litre"}),
            )
            .await,
        );
        assert_eq!(updated["title"], json!("Buy oat milk"));
        assert_eq!(updated["description"], json!("1 litre"));

        let (summary, prioritised) = ok(call(
            peer,
            "set_priority",
            json!({"user_id": "alice", "task_id": report_id, "priority": "low"}),
        )
        .await);
        assert_eq!(
            summary,
            format!("Set the priority of task {report_id} to low: Write report")
        );
        assert_eq!(prioritised["task"]["priority"], json!("low"));

        let (summary, completed) = ok(call(
            peer,
            "complete_task",
            json!({"user_id": "alice", "task_id": milk_id}),
        )
        .await);
        assert_eq!(summary, format!("Completed task {milk_id}: Buy oat milk"));
        assert_eq!(completed["task"]["completed"], json!(true));

        let done = list(peer, "alice", "completed").await;
        assert_eq!(done.len(), 1);
        assert_eq!(done[0]["id"], json!(milk_id));
        let pending = list(peer, "alice", "pending").await;
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0]["id"], json!(report_id));
        assert_eq!(pending[0]["priority"], json!("low"));

        let (summary, deleted) = ok(call(
            peer,
            "delete_task",
            json!({"user_id": "alice", "task_id": report_id}),
        )
        .await);
        assert_eq!(summary, format!("Deleted task {report_id}: Write report"));
        assert_eq!(deleted["task"]["id"], json!(report_id));
        let remaining = list(peer, "alice", "all").await;
        assert_eq!(remaining.len(), 1);
        assert_eq!(remaining[0]["id"], json!(milk_id));
        assert_eq!(count_rows(&c.db, Table::Tasks, "alice").await, 1);

        // Completing twice is harmless.
        let again = task_of(
            call(
                peer,
                "complete_task",
                json!({"user_id": "alice", "task_id": milk_id}),
            )
            .await,
        );
        assert_eq!(again["completed"], json!(true));
        assert_eq!(again["updated_at"], completed["task"]["updated_at"]);
    }

    pub async fn users_cannot_see_or_change_each_others_tasks(c: &Connected) {
        let peer = c.peer();
        let secret = add(peer, "alice", "Alice's secret").await;
        let id = id_of(&secret);
        let missing = id + 1_000;

        assert!(list(peer, "bob", "all").await.is_empty());
        let (summary, _) = ok(call(peer, "list_tasks", json!({"user_id": "bob"})).await);
        assert_eq!(summary, "No tasks.");

        let attempts = [
            ("complete_task", json!({})),
            ("delete_task", json!({})),
            ("update_task", json!({"title": "pwned"})),
            ("set_priority", json!({"priority": "low"})),
        ];
        for (tool, extra) in attempts {
            let with = |task_id: i64| {
                let mut args = json!({"user_id": "bob", "task_id": task_id});
                args.as_object_mut()
                    .unwrap()
                    .extend(extra.as_object().unwrap().clone());
                args
            };
            let foreign = tool_error(&call(peer, tool, with(id)).await);
            let unknown = tool_error(&call(peer, tool, with(missing)).await);
            assert_eq!(
                foreign,
                format!("task {id} not found. Call list_tasks to see this user's task ids")
            );
            assert_eq!(
                foreign.replace(&id.to_string(), "N"),
                unknown.replace(&missing.to_string(), "N"),
                "{tool}: another user's task must look exactly like a missing one"
            );
        }
        assert_eq!(list(peer, "alice", "all").await, vec![secret]);
        assert_eq!(count_rows(&c.db, Table::Tasks, "bob").await, 0);
    }

    pub async fn bad_inputs_are_tool_errors_and_change_nothing(c: &Connected) {
        let peer = c.peer();
        let task = add(peer, "alice", "Keep me").await;
        let id = id_of(&task);
        let long_title = "t".repeat(501);
        let long_description = "d".repeat(5_001);
        let too_long_user = "u".repeat(129);

        let cases: Vec<(&str, Value, Option<&str>, &str)> = vec![
            (
                "add_task",
                json!({"user_id": "alice", "title": ""}),
                None,
                "title must not be empty",
            ),
            (
                "add_task",
                json!({"user_id": "alice", "title": " \n\t "}),
                None,
                "title must not be empty",
            ),
            (
                "add_task",
                json!({"user_id": "alice", "title": long_title}),
                None,
                "title is 501 characters long; the limit is 500",
            ),
            (
                "add_task",
                json!({"user_id": "alice", "title": "x", "description": ""}),
                None,
                "description must not be empty",
            ),
            (
                "add_task",
                json!({"user_id": "alice", "title": "x", "description": long_description}),
                None,
                "description is 5001 characters long; the limit is 5000",
            ),
            (
                "add_task",
                json!({"user_id": "alice", "title": "x", "priority": "urgent"}),
                None,
                r#"priority must be one of "low", "medium", "high" (got "urgent")"#,
            ),
            (
                "add_task",
                json!({"user_id": "", "title": "x"}),
                None,
                "user_id must be 1 to 128 characters long",
            ),
            (
                "add_task",
                json!({"user_id": too_long_user, "title": "x"}),
                None,
                "user_id must be 1 to 128 characters long",
            ),
            (
                "list_tasks",
                json!({"user_id": "alice", "status": "done"}),
                None,
                r#"status must be one of "all", "pending", "completed" (got "done")"#,
            ),
            (
                "list_tasks",
                json!({"user_id": ""}),
                None,
                "user_id must be 1 to 128 characters long",
            ),
            (
                "update_task",
                json!({"user_id": "alice", "task_id": id}),
                None,
                "nothing to update",
            ),
            (
                "update_task",
                json!({"user_id": "alice", "task_id": id, "title": null, "description": null}),
                None,
                "nothing to update",
            ),
            (
                "update_task",
                json!({"user_id": "alice", "task_id": id, "title": "  "}),
                None,
                "title must not be empty",
            ),
            (
                "update_task",
                json!({"user_id": "alice", "task_id": id, "title": long_title}),
                None,
                "the limit is 500",
            ),
            (
                "update_task",
                json!({"user_id": "alice", "task_id": id, "title": "ok", "description": long_description}),
                None,
                "the limit is 5000",
            ),
            (
                "update_task",
                json!({"user_id": "alice", "task_id": id, "description": ""}),
                None,
                "description must not be empty",
            ),
            (
                "set_priority",
                json!({"user_id": "alice", "task_id": id, "priority": "critical"}),
                None,
                "priority must be one of",
            ),
            (
                "complete_task",
                json!({"user_id": "alice", "task_id": 999_999}),
                None,
                "task 999999 not found",
            ),
            (
                "delete_task",
                json!({"user_id": "alice", "task_id": -1}),
                None,
                "task -1 not found",
            ),
            (
                "update_task",
                json!({"user_id": "alice", "task_id": 999_999, "title": "x"}),
                None,
                "task 999999 not found",
            ),
            (
                "set_priority",
                json!({"user_id": "alice", "task_id": 999_999, "priority": "low"}),
                None,
                "task 999999 not found",
            ),
            // A failed call stores nothing under its key either.
            (
                "complete_task",
                json!({"user_id": "alice", "task_id": 999_999}),
                Some("failed-key"),
                "task 999999 not found",
            ),
            (
                "add_task",
                json!({"user_id": "alice", "title": ""}),
                Some("failed-key"),
                "title must not be empty",
            ),
        ];
        for (tool, arguments, key, expected) in cases {
            let result = try_call(peer, tool, arguments.clone(), key)
                .await
                .unwrap_or_else(|e| panic!("{tool} {arguments}: protocol error {e}"));
            let message = tool_error(&result);
            assert!(
                message.contains(expected),
                "{tool} {arguments}: {message:?} should contain {expected:?}"
            );
        }

        // An idempotency key that is not a usable string is refused, not ignored.
        for key in [json!(42), json!(""), json!("k".repeat(256))] {
            let mut params = rmcp::model::CallToolRequestParams::new("add_task").with_arguments(
                json!({"user_id": "alice", "title": "x"})
                    .as_object()
                    .unwrap()
                    .clone(),
            );
            let mut meta = serde_json::Map::new();
            meta.insert(conveyor_mcp::IDEMPOTENCY_META_KEY.to_owned(), key);
            params.meta = Some(RequestMetaObject(MetaObject(meta)));
            let result = peer.call_tool(params).await.expect("a tool answer");
            assert!(tool_error(&result).contains("conveyor/idempotency_key"));
        }

        // Arguments that break the schema (wrong JSON type, missing, unknown) are refused
        // before the tool runs; rmcp reports that as a tool error too, naming the field.
        for (tool, arguments, expected) in [
            (
                "complete_task",
                json!({"user_id": "alice", "task_id": "seven"}),
                "invalid type: string \"seven\", expected i64",
            ),
            (
                "add_task",
                json!({"user_id": "alice", "title": 7}),
                "invalid type: integer `7`, expected a string",
            ),
            (
                "add_task",
                json!({"title": "no user"}),
                "missing field `user_id`",
            ),
            (
                "add_task",
                json!({"user_id": "alice", "title": "x", "due": "tomorrow"}),
                "unknown field `due`",
            ),
        ] {
            match try_call(peer, tool, arguments.clone(), None).await {
                Ok(result) => {
                    let message = tool_error(&result);
                    assert!(message.contains(expected), "{tool} {arguments}: {message}");
                }
                // The contract also allows a JSON-RPC invalid-params error here.
                Err(ServiceError::McpError(error)) => {
                    assert_eq!(error.code, ErrorCode::INVALID_PARAMS, "{tool} {arguments}");
                }
                Err(e) => panic!("{tool} {arguments}: {e}"),
            }
        }

        // Limits are inclusive.
        let longest = task_of(
            call(
                peer,
                "add_task",
                json!({"user_id": "alice", "title": "é".repeat(500), "description": "d".repeat(5_000)}),
            )
            .await,
        );
        assert_eq!(longest["title"].as_str().unwrap().chars().count(), 500);

        let tasks = list(peer, "alice", "all").await;
        assert_eq!(tasks.len(), 2);
        assert_eq!(tasks[0], task, "the first task is untouched");
        assert_eq!(count_rows(&c.db, Table::Tasks, "alice").await, 2);
        assert_eq!(count_rows(&c.db, Table::ToolIdempotency, "alice").await, 0);
        assert_eq!(count_rows(&c.db, Table::Tasks, "").await, 0);
    }

    pub async fn idempotency_keys_make_effects_exactly_once(c: &Connected) {
        let peer = c.peer();
        let args = json!({"user_id": "alice", "title": "Pay rent"});
        let first = call_keyed(peer, "add_task", args.clone(), "call-1").await;
        let second = call_keyed(peer, "add_task", args.clone(), "call-1").await;
        assert_eq!(first, second, "a repeat answers the stored result");
        let rent = task_of(first);
        assert_eq!(count_rows(&c.db, Table::Tasks, "alice").await, 1);

        // Keys are per user: bob's "call-1" is his own call.
        let bobs = task_of(
            call_keyed(
                peer,
                "add_task",
                json!({"user_id": "bob", "title": "Pay rent"}),
                "call-1",
            )
            .await,
        );
        assert_ne!(bobs["id"], rent["id"]);
        assert_eq!(count_rows(&c.db, Table::Tasks, "bob").await, 1);

        // A repeated delete answers what the first one did, not "not found".
        let target = json!({"user_id": "alice", "task_id": id_of(&rent)});
        let deleted = call_keyed(peer, "delete_task", target.clone(), "call-2").await;
        let repeated = call_keyed(peer, "delete_task", target.clone(), "call-2").await;
        assert_eq!(deleted, repeated);
        assert_eq!(
            text(&repeated),
            format!("Deleted task {}: Pay rent", id_of(&rent))
        );
        assert!(list(peer, "alice", "all").await.is_empty());

        // The same key for another tool is refused rather than answered with the wrong result.
        let reused = call_keyed(peer, "complete_task", target.clone(), "call-1").await;
        assert!(
            tool_error(&reused).contains("already used for add_task"),
            "{reused:?}"
        );

        // list_tasks ignores keys.
        let listed = call_keyed(peer, "list_tasks", json!({"user_id": "alice"}), "call-1").await;
        assert_eq!(ok(listed).1["count"], json!(0));

        // Every mutating tool honours its key.
        let task = add(peer, "alice", "Water plants").await;
        let id = id_of(&task);
        for (tool, args, key) in [
            (
                "complete_task",
                json!({"user_id": "alice", "task_id": id}),
                "call-3",
            ),
            (
                "update_task",
                json!({"user_id": "alice", "task_id": id, "title": "Water the plants"}),
                "call-4",
            ),
            (
                "set_priority",
                json!({"user_id": "alice", "task_id": id, "priority": "high"}),
                "call-5",
            ),
        ] {
            let first = call_keyed(peer, tool, args.clone(), key).await;
            let second = call_keyed(peer, tool, args, key).await;
            assert_eq!(first, second, "{tool}");
            assert_eq!(first.is_error, Some(false), "{tool}");
        }
        // call-1 (add), call-2 (delete), 3, 4, 5.
        assert_eq!(count_rows(&c.db, Table::ToolIdempotency, "alice").await, 5);

        // Concurrent copies of one call race for the key: one effect, one answer.
        let racing = json!({"user_id": "carol", "title": "Only once"});
        let results =
            join_all((0..8).map(|_| call_keyed(peer, "add_task", racing.clone(), "race"))).await;
        for result in &results {
            assert_eq!(result, &results[0]);
        }
        assert_eq!(results[0].is_error, Some(false));
        assert_eq!(count_rows(&c.db, Table::Tasks, "carol").await, 1);
    }
}

/// Expands to one `#[tokio::test]` per shared scenario and database, connected by
/// `$connect(Backend)`: `postgres::<scenario>` and `sqlite::<scenario>`.
#[macro_export]
macro_rules! transport_scenarios {
    ($connect:path) => {
        $crate::transport_scenarios!(@database $connect; postgres, Postgres);
        $crate::transport_scenarios!(@database $connect; sqlite, Sqlite);
    };
    (@database $connect:path; $module:ident, $backend:ident) => {
        mod $module {
            use super::*;

            $crate::transport_scenarios!(@tests $connect, $backend;
                tools_are_listed_with_their_schemas,
                full_task_flow,
                users_cannot_see_or_change_each_others_tasks,
                bad_inputs_are_tool_errors_and_change_nothing,
                idempotency_keys_make_effects_exactly_once,
            );
        }
    };
    (@tests $connect:path, $backend:ident; $($scenario:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $scenario() {
                let connected = $connect(support::Backend::$backend).await;
                tokio::time::timeout(
                    support::DEADLINE,
                    support::scenarios::$scenario(&connected),
                )
                .await
                .expect("scenario finished in time");
                connected.close().await;
            }
        )*
    };
}
