//! The loop of one run attempt: model → tools → model … → text.

use conveyor_shared::{
    config::FaultInjection,
    events::RunEvent,
    llm::{LlmClient, LlmLimiter},
    store::run_steps,
};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{
    Emitter, LlmError, RetryPolicy,
    completion::{Completion, LlmChannel, complete_with_retries},
    prompt::assistant_message,
};
use crate::{
    mcp::{CallContext, McpPool, ToolOutcome},
    metrics::LlmMetrics,
};

/// What the loop needs from the worker; shared by all runs.
#[derive(Clone)]
pub struct Agent {
    pub llm: LlmClient,
    /// The provider's rate limit, shared with every other worker.
    pub limiter: LlmLimiter,
    pub metrics: LlmMetrics,
    pub model: String,
    pub mcp: McpPool,
    pub db: conveyor_shared::db::Db,
    pub max_turns: u32,
    pub retry: RetryPolicy,
    /// A crash staged for the fault tests (`CONVEYOR_FAULT_INJECT`); `None` in production.
    pub fault_injection: Option<FaultInjection>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("model", &self.model)
            .finish_non_exhaustive()
    }
}

/// A tool call the loop executed (or reused from the journal).
#[derive(Debug, Clone, PartialEq)]
pub struct ExecutedCall {
    pub id: String,
    pub name: String,
    pub arguments: Value,
    pub outcome: ToolOutcome,
}

/// One model answer that asked for tools.
#[derive(Debug, Clone, PartialEq)]
pub struct Step {
    pub text: String,
    pub calls: Vec<ExecutedCall>,
}

/// The loop's result: tool steps, then the final text.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentOutput {
    pub steps: Vec<Step>,
    pub text: String,
}

/// Why an attempt stopped without an answer.
#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error(transparent)]
    Llm(#[from] LlmError),
    #[error("the model asked for tools {0} times without answering")]
    MaxTurns(u32),
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("event bus: {0}")]
    Events(#[from] conveyor_shared::events::EventError),
}

/// Who the run is for, as tools see it.
#[derive(Debug, Clone, Copy)]
pub struct RunScope<'a> {
    pub run_id: &'a str,
    pub user_id: &'a str,
    pub conversation_id: &'a str,
    pub attempt: i32,
}

impl Agent {
    /// Runs the loop from `messages` (system + history). Tool calls already journaled for the
    /// run (by an earlier attempt) are answered from the journal, not executed again.
    pub async fn run(
        &self,
        scope: RunScope<'_>,
        mut messages: Vec<Value>,
        emitter: &mut Emitter,
        cancel: &CancellationToken,
        partial: &mut AgentOutput,
    ) -> Result<(), TurnError> {
        // Only an earlier attempt can have journaled anything. (A journal row is committed
        // after the claim that numbered its attempt, so if Postgres lost that claim, it lost
        // the row too, and the attempt number that comes back is 1 again.)
        let journal = if scope.attempt > 1 {
            run_steps::list(&self.db, scope.run_id).await?
        } else {
            Vec::new()
        };
        let tools = self.mcp.openai_tools();
        let mut step_index: i32 = 0;
        for _ in 0..self.max_turns {
            if cancel.is_cancelled() {
                return Err(LlmError::Cancelled.into());
            }
            let mut request = json!({
                "model": self.model,
                "messages": messages,
                "stream": true,
                // The token counts for the metrics arrive in the stream's last chunk.
                "stream_options": {"include_usage": true},
            });
            if !tools.is_empty() {
                request["tools"] = Value::Array(tools.as_ref().clone());
                request["parallel_tool_calls"] = Value::Bool(false);
            }
            let channel = LlmChannel {
                client: &self.llm,
                limiter: &self.limiter,
                metrics: &self.metrics,
            };
            let completion: Completion = complete_with_retries(
                channel,
                &request,
                self.retry,
                emitter,
                scope.attempt,
                cancel,
            )
            .await?;
            if completion.tool_calls.is_empty() {
                partial.text = completion.text;
                return Ok(());
            }
            let mut step = Step {
                text: completion.text,
                calls: Vec::with_capacity(completion.tool_calls.len()),
            };
            for call in completion.tool_calls {
                let arguments =
                    match serde_json::from_str::<Value>(if call.arguments.trim().is_empty() {
                        "{}"
                    } else {
                        &call.arguments
                    }) {
                        Ok(Value::Object(map)) => Value::Object(map),
                        _ => Value::Null,
                    };
                let shown_arguments = if arguments.is_null() {
                    json!({})
                } else {
                    arguments.clone()
                };
                emitter
                    .emit(&RunEvent::ToolCall {
                        call_id: call.id.clone(),
                        name: call.name.clone(),
                        arguments: shown_arguments.clone(),
                    })
                    .await?;
                let outcome = if arguments.is_null() {
                    ToolOutcome::error(format!(
                        "the arguments of {} were not a valid JSON object",
                        call.name
                    ))
                } else {
                    self.execute(
                        scope, step_index, &call.id, &call.name, &arguments, &journal,
                    )
                    .await?
                };
                step_index += 1;
                emitter
                    .emit(&RunEvent::ToolResult {
                        call_id: call.id.clone(),
                        name: call.name.clone(),
                        outcome: if outcome.ok {
                            Ok(outcome.result.clone())
                        } else {
                            Err(outcome.result.as_str().unwrap_or(&outcome.text).to_owned())
                        },
                    })
                    .await?;
                step.calls.push(ExecutedCall {
                    id: call.id,
                    name: call.name,
                    arguments: shown_arguments,
                    outcome,
                });
            }
            let stored_calls: Vec<Value> = step
                .calls
                .iter()
                .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
                .collect();
            messages.push(assistant_message(&step.text, &Value::Array(stored_calls)));
            for call in &step.calls {
                messages.push(
                    json!({"role": "tool", "tool_call_id": call.id, "content": call.outcome.text}),
                );
            }
            partial.steps.push(step);
        }
        Err(TurnError::MaxTurns(self.max_turns))
    }

    /// Executes one tool call, or reuses the journaled result of the same call at this step.
    async fn execute(
        &self,
        scope: RunScope<'_>,
        step: i32,
        call_id: &str,
        name: &str,
        arguments: &Value,
        journal: &[run_steps::Step],
    ) -> Result<ToolOutcome, TurnError> {
        if let Some(done) = journal
            .iter()
            .find(|s| s.step == step && s.name == name && &s.arguments == arguments)
        {
            tracing::info!(
                run_id = scope.run_id,
                step,
                tool = name,
                "reusing journaled tool result"
            );
            let text = if done.ok {
                done.result.to_string()
            } else {
                format!("Error: {}", done.result.as_str().unwrap_or_default())
            };
            return Ok(ToolOutcome {
                ok: done.ok,
                result: done.result.clone(),
                text,
            });
        }
        let ctx = CallContext {
            user_id: scope.user_id,
            run_id: scope.run_id,
            conversation_id: scope.conversation_id,
        };
        let key = format!("{}:{step}", scope.run_id);
        let outcome = self.mcp.call(name, arguments, ctx, &key).await;
        if self.fault_injection == Some(FaultInjection::AbortAfterToolCall) && scope.attempt == 1 {
            // The fault tests' crash point: the server has committed the effect, the journal
            // has not. Only first attempts, so a takeover by a worker with the same setting
            // still finishes the run.
            tracing::error!(
                run_id = scope.run_id,
                step,
                tool = name,
                "CONVEYOR_FAULT_INJECT=abort_after_tool_call: aborting before the journal write"
            );
            std::process::abort();
        }
        run_steps::insert(
            &self.db,
            scope.run_id,
            &run_steps::Step {
                step,
                tool_call_id: call_id.to_owned(),
                name: name.to_owned(),
                arguments: arguments.clone(),
                ok: outcome.ok,
                result: outcome.result.clone(),
            },
        )
        .await?;
        Ok(outcome)
    }
}
