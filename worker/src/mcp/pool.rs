//! Held, supervised MCP connections and the tool catalog the model sees.
//!
//! Spawning a stdio server costs milliseconds; a call on a held connection costs ~150 µs. So
//! each worker spawns its servers once and every run shares the connections (an rmcp peer
//! takes concurrent calls). A supervisor task per server respawns a dead child with backoff;
//! meanwhile its tools answer a clear tool error at once, and the other servers keep working.
//!
//! The catalog hides the arguments the worker fills itself (`user_id` by default) from the
//! schemas the model sees, and overwrites whatever the model puts there: a prompt can never
//! reach another user's data.

use std::{
    collections::HashMap,
    sync::{Arc, RwLock},
    time::Duration,
};

use backon::BackoffBuilder;
use rmcp::{
    RoleClient, ServiceExt,
    model::{
        CallToolRequestParams, CallToolResult, JsonObject, MetaObject, RequestMetaObject, Tool,
    },
    service::Peer,
    transport::TokioChildProcess,
};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::ServerSpec;
use crate::metrics::{McpFailure, McpMetrics, McpServerMetrics};

/// The key of the exactly-once token in a tool call's `_meta`.
pub const IDEMPOTENCY_META_KEY: &str = "conveyor/idempotency_key";

/// Who a tool call acts for: the values of injected arguments.
#[derive(Debug, Clone, Copy)]
pub struct CallContext<'a> {
    pub user_id: &'a str,
    pub run_id: &'a str,
    pub conversation_id: &'a str,
}

/// The result of a tool call as the agent uses it.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolOutcome {
    pub ok: bool,
    /// Structured result (or `{"text": …}`), or the error message for a failure.
    pub result: Value,
    /// What the model is told.
    pub text: String,
}

impl ToolOutcome {
    /// A failure: the model reads it as `Error: …`, events and the journal keep the message.
    pub fn error(message: impl Into<String>) -> Self {
        let message = message.into();
        Self {
            ok: false,
            text: format!("Error: {message}"),
            result: Value::String(message),
        }
    }
}

struct ServerSlot {
    spec: ServerSpec,
    metrics: McpServerMetrics,
    timeout: Duration,
    peer: RwLock<Option<Peer<RoleClient>>>,
    tools: RwLock<Vec<Tool>>,
}

struct CatalogEntry {
    server: usize,
    tool: String,
}

#[derive(Default)]
struct Catalog {
    entries: HashMap<String, CatalogEntry>,
    /// The `tools` array of a Chat Completions request.
    openai_tools: Arc<Vec<Value>>,
}

/// The worker's MCP servers. Cheap to clone.
#[derive(Clone)]
pub struct McpPool {
    slots: Arc<Vec<ServerSlot>>,
    catalog: Arc<RwLock<Catalog>>,
    /// Counts servers that finished their first start attempt (good or bad).
    started: watch::Receiver<usize>,
}

impl std::fmt::Debug for McpPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("McpPool")
            .field("servers", &self.slots.len())
            .finish_non_exhaustive()
    }
}

fn read<T>(lock: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    lock.read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn write<T>(lock: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    lock.write()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl McpPool {
    /// Starts a supervisor per server on `tracker`. Use [`Self::wait_started`] to wait for
    /// the first connections.
    pub fn start(
        specs: Vec<ServerSpec>,
        default_timeout: Duration,
        metrics: &McpMetrics,
        tracker: &TaskTracker,
        shutdown: &CancellationToken,
    ) -> Self {
        let slots: Arc<Vec<ServerSlot>> = Arc::new(
            specs
                .into_iter()
                .map(|spec| ServerSlot {
                    timeout: spec.timeout(default_timeout),
                    metrics: metrics.server(&spec.name),
                    spec,
                    peer: RwLock::new(None),
                    tools: RwLock::new(Vec::new()),
                })
                .collect(),
        );
        let (started_tx, started) = watch::channel(0usize);
        let pool = Self {
            slots,
            catalog: Arc::default(),
            started,
        };
        for index in 0..pool.slots.len() {
            let pool = pool.clone();
            let shutdown = shutdown.clone();
            let started_tx = started_tx.clone();
            tracker.spawn(async move { pool.supervise(index, started_tx, shutdown).await });
        }
        pool
    }

    /// Waits until every server has had its first start attempt, or `timeout`.
    pub async fn wait_started(&self, timeout: Duration) {
        let mut started = self.started.clone();
        let all = self.slots.len();
        let _ = tokio::time::timeout(timeout, started.wait_for(|n| *n >= all)).await;
    }

    /// The tools offered to the model, in Chat Completions form.
    pub fn openai_tools(&self) -> Arc<Vec<Value>> {
        read(&self.catalog).openai_tools.clone()
    }

    async fn supervise(
        &self,
        index: usize,
        started: watch::Sender<usize>,
        shutdown: CancellationToken,
    ) {
        let slot = &self.slots[index];
        let name = slot.spec.name.clone();
        let mut first = true;
        let mut delays = respawn_backoff();
        loop {
            if !first {
                slot.metrics.restarted();
            }
            let connected = tokio::select! {
                () = shutdown.cancelled() => return,
                connected = connect(&slot.spec) => connected,
            };
            match connected {
                Ok((service, tools)) => {
                    tracing::info!(server = %name, tools = tools.len(), "MCP server ready");
                    delays = respawn_backoff();
                    *write(&slot.tools) = tools;
                    *write(&slot.peer) = Some(service.peer().clone());
                    slot.metrics.up(true);
                    self.rebuild_catalog();
                    if std::mem::take(&mut first) {
                        started.send_modify(|n| *n += 1);
                    }
                    tokio::select! {
                        // Dropping the service stops its task, which kills the child.
                        () = shutdown.cancelled() => return,
                        _ = service.waiting() => {}
                    }
                    *write(&slot.peer) = None;
                    slot.metrics.up(false);
                    tracing::warn!(server = %name, "MCP server exited; respawning");
                }
                Err(error) => {
                    tracing::error!(server = %name, %error, "cannot start MCP server");
                    if std::mem::take(&mut first) {
                        started.send_modify(|n| *n += 1);
                    }
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(10));
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn rebuild_catalog(&self) {
        let prefixed = self.slots.len() > 1;
        let mut entries = HashMap::new();
        let mut openai_tools = Vec::new();
        for (server, slot) in self.slots.iter().enumerate() {
            for tool in read(&slot.tools).iter() {
                let exposed = if prefixed {
                    format!("{}__{}", slot.spec.name, tool.name)
                } else {
                    tool.name.to_string()
                };
                let schema = model_schema(&tool.input_schema, &slot.spec.injected_arguments);
                openai_tools.push(json!({
                    "type": "function",
                    "function": {
                        "name": exposed,
                        "description": tool.description.as_deref().unwrap_or_default(),
                        "parameters": schema,
                    }
                }));
                entries.insert(
                    exposed,
                    CatalogEntry {
                        server,
                        tool: tool.name.to_string(),
                    },
                );
            }
        }
        *write(&self.catalog) = Catalog {
            entries,
            openai_tools: Arc::new(openai_tools),
        };
    }

    /// Calls the tool the model named, with the injected arguments filled from `ctx` and the
    /// exactly-once key in the request's `_meta`. Every failure is a [`ToolOutcome`] error the
    /// model can read.
    pub async fn call(
        &self,
        name: &str,
        arguments: &Value,
        ctx: CallContext<'_>,
        idempotency_key: &str,
    ) -> ToolOutcome {
        let (server, tool) = {
            let catalog = read(&self.catalog);
            match catalog.entries.get(name) {
                Some(entry) => (entry.server, entry.tool.clone()),
                None => return ToolOutcome::error(format!("unknown tool {name:?}")),
            }
        };
        let slot = &self.slots[server];
        let Some(peer) = read(&slot.peer).clone() else {
            slot.metrics.error(McpFailure::Unavailable);
            return ToolOutcome::error(format!(
                "the {:?} tool server is restarting; {name} is unavailable right now, try again shortly",
                slot.spec.name
            ));
        };
        let mut args: JsonObject = match arguments {
            Value::Object(map) => map.clone(),
            Value::Null => JsonObject::new(),
            _ => return ToolOutcome::error(format!("arguments of {name} must be a JSON object")),
        };
        for hidden in &slot.spec.injected_arguments {
            let value = match hidden.as_str() {
                "user_id" => ctx.user_id,
                "run_id" => ctx.run_id,
                "conversation_id" => ctx.conversation_id,
                _ => continue,
            };
            args.insert(hidden.clone(), Value::String(value.to_owned()));
        }
        let mut params = CallToolRequestParams::new(tool).with_arguments(args);
        let mut meta = JsonObject::new();
        meta.insert(
            IDEMPOTENCY_META_KEY.to_owned(),
            Value::String(idempotency_key.to_owned()),
        );
        params.meta = Some(RequestMetaObject(MetaObject(meta)));

        let started = tokio::time::Instant::now();
        let answer = tokio::time::timeout(slot.timeout, peer.call_tool(params)).await;
        slot.metrics.call(started.elapsed());
        let (outcome, failure) = match answer {
            Err(_) => (
                ToolOutcome::error(format!(
                    "{name} timed out after {} s",
                    slot.timeout.as_secs()
                )),
                Some(McpFailure::Timeout),
            ),
            Ok(Err(rmcp::ServiceError::McpError(error))) => (
                ToolOutcome::error(format!("{name} rejected the call: {}", error.message)),
                Some(McpFailure::Rejected),
            ),
            Ok(Err(error)) => {
                tracing::warn!(server = %slot.spec.name, tool = name, %error, "MCP call failed");
                (
                    ToolOutcome::error(format!(
                        "the {:?} tool server failed during {name}; try again shortly",
                        slot.spec.name
                    )),
                    Some(McpFailure::Transport),
                )
            }
            Ok(Ok(result)) => {
                let outcome = outcome_of(result);
                let failure = (!outcome.ok).then_some(McpFailure::ToolError);
                (outcome, failure)
            }
        };
        if let Some(failure) = failure {
            slot.metrics.error(failure);
        }
        outcome
    }
}

/// Spawns a server, initializes the session and lists its tools.
async fn connect(
    spec: &ServerSpec,
) -> Result<(rmcp::service::RunningService<RoleClient, ()>, Vec<Tool>), String> {
    let mut command = tokio::process::Command::new(&spec.command);
    command.args(&spec.args).envs(&spec.env).kill_on_drop(true);
    let (transport, _) = TokioChildProcess::builder(command)
        .stderr(std::process::Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot spawn {:?}: {e}", spec.command))?;
    let service = ().serve(transport).await.map_err(|e| format!("MCP initialize failed: {e}"))?;
    let tools = tokio::time::timeout(Duration::from_secs(10), service.list_all_tools())
        .await
        .map_err(|_| "tools/list timed out".to_owned())?
        .map_err(|e| format!("tools/list failed: {e}"))?;
    Ok((service, tools))
}

/// The schema the model sees: the tool's, without the injected properties.
fn model_schema(schema: &JsonObject, hidden: &[String]) -> Value {
    let mut schema = schema.clone();
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        for name in hidden {
            properties.remove(name);
        }
    }
    if let Some(Value::Array(required)) = schema.get_mut("required") {
        required.retain(|r| r.as_str().is_none_or(|r| !hidden.iter().any(|h| h == r)));
    }
    Value::Object(schema)
}

fn outcome_of(result: CallToolResult) -> ToolOutcome {
    let text: Vec<&str> = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
        .collect();
    let text = text.join("\n");
    if result.is_error == Some(true) {
        return ToolOutcome::error(if text.is_empty() {
            "the tool failed".to_owned()
        } else {
            text
        });
    }
    let structured = result.structured_content;
    let model_text = match &structured {
        Some(value) if text.is_empty() => value.to_string(),
        Some(value) => format!("{text}\n{value}"),
        None => text.clone(),
    };
    ToolOutcome {
        ok: true,
        result: structured.unwrap_or_else(|| json!({ "text": text })),
        text: model_text,
    }
}

fn respawn_backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(10))
        .with_jitter()
        .without_max_times()
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn injected_arguments_are_hidden_from_the_model() {
        let schema: JsonObject = serde_json::from_value(json!({
            "type": "object",
            "properties": {"user_id": {"type": "string"}, "title": {"type": "string"}},
            "required": ["user_id", "title"]
        }))
        .unwrap();
        let seen = model_schema(&schema, &["user_id".to_owned()]);
        assert!(seen["properties"].get("user_id").is_none());
        assert_eq!(seen["properties"]["title"]["type"], "string");
        assert_eq!(seen["required"], json!(["title"]));
    }

    #[test]
    fn tool_errors_keep_the_message() {
        let mut result =
            CallToolResult::error(vec![rmcp::model::ContentBlock::text("task 7 not found")]);
        result.is_error = Some(true);
        let outcome = outcome_of(result);
        assert!(!outcome.ok);
        assert_eq!(outcome.text, "Error: task 7 not found");
        assert_eq!(outcome.result, "task 7 not found");
    }
}
