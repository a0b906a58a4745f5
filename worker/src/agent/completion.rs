//! One streamed chat completion, parsed leniently, with retries.
//!
//! Providers differ in small ways (missing `index` on tool-call deltas, `null` where a list
//! is expected, odd `finish_reason`s), so chunks are read into permissive types rather than
//! async-openai's strict ones. A stream that ends without a `finish_reason` was cut and is
//! retried like a 5xx.
//!
//! Every request, retries included, first takes a permit from the shared rate limiter (a no-op
//! when no limit is configured) and gives it back when its stream ends.

use std::time::Duration;

use async_openai::error::OpenAIError;
use backon::BackoffBuilder;
use conveyor_shared::{
    events::RunEvent,
    llm::{AcquireError, LlmClient, LlmHttpError, LlmLimiter},
};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::Value;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Emitter;
use crate::metrics::{LlmFailure, LlmMetrics};

/// A finished completion: text and/or tool calls.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Completion {
    pub text: String,
    pub tool_calls: Vec<PendingCall>,
}

/// A tool call as the model produced it (arguments still a JSON string).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PendingCall {
    pub id: String,
    pub name: String,
    pub arguments: String,
}

/// Why a completion failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LlmError {
    /// Worth retrying: 429, 5xx, connection trouble, a cut stream.
    #[error("{reason}")]
    Transient {
        reason: String,
        retry_after: Option<Duration>,
        kind: LlmFailure,
    },
    /// Never retried: the request itself is wrong (400/401/403/404…).
    #[error("{message}")]
    Permanent { code: String, message: String },
    /// The run was cancelled while the model was answering.
    #[error("cancelled")]
    Cancelled,
    /// The event bus failed.
    #[error("event bus: {0}")]
    Events(String),
}

/// How LLM calls are retried: exponential backoff with full jitter, honouring `Retry-After`.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub max_attempts: usize,
    pub min_delay: Duration,
    pub max_delay: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            min_delay: Duration::from_millis(200),
            max_delay: Duration::from_secs(10),
        }
    }
}

impl RetryPolicy {
    /// The delays between attempts (full jitter: uniform in `0..=exponential delay`).
    fn delays(self) -> impl Iterator<Item = Duration> {
        backon::ExponentialBuilder::default()
            .with_min_delay(self.min_delay)
            .with_max_delay(self.max_delay)
            .with_max_times(self.max_attempts.saturating_sub(1))
            .build()
            .map(|d| d.mul_f64(fastrand::f64()))
    }
}

#[derive(Debug, Deserialize, Default)]
struct Chunk {
    #[serde(default)]
    choices: Option<Vec<Choice>>,
    #[serde(default)]
    error: Option<Value>,
    /// Sent in the last chunk when the request asks for `stream_options.include_usage`.
    #[serde(default)]
    usage: Option<Usage>,
}

#[derive(Debug, Deserialize, Default)]
struct Usage {
    #[serde(default)]
    prompt_tokens: Option<u64>,
    #[serde(default)]
    completion_tokens: Option<u64>,
}

#[derive(Debug, Deserialize, Default)]
struct Choice {
    #[serde(default)]
    delta: Option<Delta>,
    #[serde(default)]
    finish_reason: Option<String>,
}

#[derive(Debug, Deserialize, Default)]
struct Delta {
    #[serde(default)]
    content: Option<String>,
    #[serde(default)]
    tool_calls: Option<Vec<ToolCallDelta>>,
}

#[derive(Debug, Deserialize, Default)]
struct ToolCallDelta {
    #[serde(default)]
    index: Option<usize>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    function: Option<FunctionDelta>,
}

#[derive(Debug, Deserialize, Default)]
struct FunctionDelta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    arguments: Option<String>,
}

/// What a completion is sent through: the client, the shared rate limiter and the metrics.
#[derive(Debug, Clone, Copy)]
pub struct LlmChannel<'a> {
    pub client: &'a LlmClient,
    pub limiter: &'a LlmLimiter,
    pub metrics: &'a LlmMetrics,
}

/// Streams one completion with retries; text goes out through `emitter` as it arrives. A
/// retry after text was streamed emits `run.retrying` so clients drop the partial answer.
pub async fn complete_with_retries(
    channel: LlmChannel<'_>,
    request: &Value,
    policy: RetryPolicy,
    emitter: &mut Emitter,
    run_attempt: i32,
    cancel: &CancellationToken,
) -> Result<Completion, LlmError> {
    let mut delays = policy.delays();
    loop {
        emitter.take_streamed();
        let error = match send(channel, request, emitter, cancel).await {
            Ok(completion) => {
                emitter
                    .flush()
                    .await
                    .map_err(|e| LlmError::Events(e.to_string()))?;
                // The text now belongs to the completion; a later cancel keeps only newer text.
                emitter.take_streamed();
                return Ok(completion);
            }
            Err(LlmError::Transient {
                reason,
                retry_after,
                kind,
            }) => (reason, retry_after, kind),
            Err(other) => return Err(other),
        };
        let (reason, retry_after, kind) = error;
        let Some(backoff) = delays.next() else {
            return Err(LlmError::Transient {
                reason,
                retry_after,
                kind,
            });
        };
        channel.metrics.retry(kind);
        let delay = retry_after.map_or(backoff, |server| server.min(policy.max_delay));
        tracing::warn!(run_id = %emitter.run_id(), %reason, delay_ms = delay.as_millis(), "LLM call failed; retrying");
        if emitter.take_streamed() {
            let event = RunEvent::Retrying {
                attempt: run_attempt,
                reason: reason.clone(),
                retry_in_ms: u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            };
            emitter
                .emit(&event)
                .await
                .map_err(|e| LlmError::Events(e.to_string()))?;
        }
        tokio::select! {
            () = cancel.cancelled() => return Err(LlmError::Cancelled),
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// One request: wait for a permit, stream the answer while holding it, give it back.
async fn send(
    channel: LlmChannel<'_>,
    request: &Value,
    emitter: &mut Emitter,
    cancel: &CancellationToken,
) -> Result<Completion, LlmError> {
    let metrics = channel.metrics;
    let permit = {
        let _waiting = metrics.waiting_for_permit();
        channel.limiter.acquire(cancel).await
    };
    let permit = match permit {
        Ok(permit) => permit,
        Err(AcquireError::Cancelled) => return Err(LlmError::Cancelled),
        Err(error @ AcquireError::TimedOut(_)) => {
            metrics.error(LlmFailure::LimiterTimeout);
            return Err(LlmError::Transient {
                reason: error.to_string(),
                retry_after: None,
                kind: LlmFailure::LimiterTimeout,
            });
        }
    };
    metrics.permit(permit.waited(), permit.failed_open());
    metrics.request();
    let started = Instant::now();
    let result = permit
        .hold(stream_once(channel, request, emitter, cancel, started))
        .await;
    permit.release().await;
    match &result {
        Ok(_) => metrics.completed(started.elapsed()),
        Err(LlmError::Transient { kind, .. }) => metrics.error(*kind),
        Err(LlmError::Permanent { .. }) => metrics.error(LlmFailure::ClientError),
        Err(LlmError::Cancelled | LlmError::Events(_)) => {}
    }
    result
}

async fn stream_once(
    channel: LlmChannel<'_>,
    request: &Value,
    emitter: &mut Emitter,
    cancel: &CancellationToken,
    started: Instant,
) -> Result<Completion, LlmError> {
    let chat = channel.client.chat();
    let mut stream = tokio::select! {
        () = cancel.cancelled() => return Err(LlmError::Cancelled),
        stream = chat.create_stream_byot::<&Value, Chunk>(request) => stream.map_err(classify)?,
    };
    let mut completion = Completion::default();
    let mut finished = false;
    let mut first_token = true;
    loop {
        let next = if let Some(deadline) = emitter.flush_deadline() {
            tokio::select! {
                () = cancel.cancelled() => return Err(LlmError::Cancelled),
                () = tokio::time::sleep_until(deadline) => {
                    emitter.flush().await.map_err(|e| LlmError::Events(e.to_string()))?;
                    continue;
                }
                next = stream.next() => next,
            }
        } else {
            tokio::select! {
                () = cancel.cancelled() => return Err(LlmError::Cancelled),
                next = stream.next() => next,
            }
        };
        let Some(chunk) = next else { break };
        let chunk = chunk.map_err(classify)?;
        if let Some(error) = chunk.error {
            return Err(LlmError::Transient {
                reason: format!("provider error in stream: {error}"),
                retry_after: None,
                kind: LlmFailure::StreamError,
            });
        }
        if let Some(usage) = chunk.usage {
            channel.metrics.tokens(
                usage.prompt_tokens.unwrap_or(0),
                usage.completion_tokens.unwrap_or(0),
            );
        }
        for choice in chunk.choices.unwrap_or_default() {
            if let Some(delta) = choice.delta {
                if first_token && (delta.content.is_some() || delta.tool_calls.is_some()) {
                    first_token = false;
                    channel.metrics.first_token(started.elapsed());
                }
                if let Some(text) = delta.content {
                    completion.text.push_str(&text);
                    emitter.push_text(&text);
                }
                for (position, call) in delta.tool_calls.unwrap_or_default().into_iter().enumerate()
                {
                    accumulate(&mut completion.tool_calls, position, call);
                }
            }
            if choice.finish_reason.is_some() {
                finished = true;
            }
        }
    }
    if !finished {
        return Err(LlmError::Transient {
            reason: "the model's stream was cut before it finished".to_owned(),
            retry_after: None,
            kind: LlmFailure::StreamCut,
        });
    }
    for call in &mut completion.tool_calls {
        if call.id.is_empty() {
            call.id = format!("call_{}", ulid_string());
        }
    }
    completion.tool_calls.retain(|c| !c.name.is_empty());
    Ok(completion)
}

fn ulid_string() -> String {
    conveyor_shared::ids::MessageId::new()
        .as_str()
        .trim_start_matches("msg_")
        .to_owned()
}

/// Merges a tool-call delta into the call at its index (or its position, for providers that
/// send no index).
fn accumulate(calls: &mut Vec<PendingCall>, position: usize, delta: ToolCallDelta) {
    let index = delta.index.unwrap_or(position);
    if calls.len() <= index {
        calls.resize_with(index + 1, PendingCall::default);
    }
    let call = &mut calls[index];
    if let Some(id) = delta.id.filter(|id| !id.is_empty()) {
        call.id = id;
    }
    if let Some(function) = delta.function {
        if let Some(name) = function.name {
            call.name.push_str(&name);
        }
        if let Some(arguments) = function.arguments {
            call.arguments.push_str(&arguments);
        }
    }
}

/// Sorts an async-openai error into transient and permanent.
fn classify(error: OpenAIError) -> LlmError {
    match error {
        OpenAIError::Boxed(boxed) => match boxed.downcast::<LlmHttpError>() {
            Ok(http) => {
                let kind = match http.status {
                    429 => Some(LlmFailure::RateLimited),
                    408 | 409 | 425 => Some(LlmFailure::ServerError),
                    status if status >= 500 => Some(LlmFailure::ServerError),
                    _ => None,
                };
                if let Some(kind) = kind {
                    LlmError::Transient {
                        reason: format!("HTTP {}: {}", http.status, http.message),
                        retry_after: http.retry_after,
                        kind,
                    }
                } else {
                    LlmError::Permanent {
                        code: format!("llm_http_{}", http.status),
                        message: format!(
                            "the model provider refused the request (HTTP {}): {}",
                            http.status, http.message
                        ),
                    }
                }
            }
            Err(other) => LlmError::Transient {
                reason: other.to_string(),
                retry_after: None,
                kind: LlmFailure::Connection,
            },
        },
        OpenAIError::Reqwest(e) => LlmError::Transient {
            reason: format!("connection to the model provider failed: {e}"),
            retry_after: None,
            kind: LlmFailure::Connection,
        },
        OpenAIError::StreamError(e) => LlmError::Transient {
            reason: format!("the model's stream broke: {e}"),
            retry_after: None,
            kind: LlmFailure::StreamError,
        },
        OpenAIError::JSONDeserialize(e, _) => LlmError::Transient {
            reason: format!("unreadable answer from the model provider: {e}"),
            retry_after: None,
            kind: LlmFailure::StreamError,
        },
        other => LlmError::Permanent {
            code: "llm_request_invalid".to_owned(),
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delta(
        index: Option<usize>,
        id: Option<&str>,
        name: Option<&str>,
        args: Option<&str>,
    ) -> ToolCallDelta {
        ToolCallDelta {
            index,
            id: id.map(str::to_owned),
            function: Some(FunctionDelta {
                name: name.map(str::to_owned),
                arguments: args.map(str::to_owned),
            }),
        }
    }

    #[test]
    fn tool_call_deltas_accumulate_by_index() {
        let mut calls = Vec::new();
        accumulate(
            &mut calls,
            0,
            delta(Some(0), Some("c1"), Some("add_task"), Some("")),
        );
        accumulate(
            &mut calls,
            0,
            delta(Some(1), Some("c2"), Some("list_tasks"), Some("{}")),
        );
        accumulate(
            &mut calls,
            0,
            delta(Some(0), None, None, Some("{\"title\":")),
        );
        accumulate(&mut calls, 0, delta(Some(0), None, None, Some("\"milk\"}")));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[0].id, "c1");
        assert_eq!(calls[0].name, "add_task");
        assert_eq!(calls[0].arguments, "{\"title\":\"milk\"}");
        assert_eq!(calls[1].name, "list_tasks");
    }

    #[test]
    fn deltas_without_index_use_their_position() {
        let mut calls = Vec::new();
        accumulate(&mut calls, 0, delta(None, Some("a"), Some("x"), Some("{}")));
        accumulate(&mut calls, 1, delta(None, Some("b"), Some("y"), Some("{}")));
        assert_eq!(calls.len(), 2);
        assert_eq!(calls[1].id, "b");
    }

    #[test]
    fn lenient_chunks_accept_nulls_and_missing_fields() {
        let chunk: Chunk = serde_json::from_str(
            r#"{"choices":[{"delta":{"content":null,"tool_calls":null},"finish_reason":null}]}"#,
        )
        .unwrap();
        assert_eq!(chunk.choices.unwrap().len(), 1);
        let chunk: Chunk =
            serde_json::from_str(r#"{"id":"x","object":"chat.completion.chunk"}"#).unwrap();
        assert!(chunk.choices.is_none());
    }

    #[test]
    fn http_statuses_are_classified() {
        let http = |status| {
            classify(OpenAIError::Boxed(Box::new(LlmHttpError {
                status,
                retry_after: Some(Duration::from_millis(100)),
                message: "m".into(),
            })))
        };
        for status in [429, 500, 502, 503] {
            assert!(
                matches!(http(status), LlmError::Transient { .. }),
                "{status}"
            );
        }
        for status in [400, 401, 403, 404] {
            assert!(
                matches!(http(status), LlmError::Permanent { .. }),
                "{status}"
            );
        }
        let LlmError::Transient { retry_after, .. } = http(429) else {
            unreachable!()
        };
        assert_eq!(retry_after, Some(Duration::from_millis(100)));
    }

    #[test]
    fn backoff_delays_are_bounded_and_limited() {
        let policy = RetryPolicy {
            max_attempts: 4,
            min_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(40),
        };
        let delays: Vec<_> = policy.delays().collect();
        assert_eq!(delays.len(), 3);
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(40)));
    }
}
