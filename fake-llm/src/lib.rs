//! A deterministic, fast, OpenAI-compatible chat completions server for Conveyor's tests,
//! benchmarks and demos.
//!
//! No test may call a real provider, yet the worker's agent loop, retries and streaming must be
//! exercised against something that behaves like one: streamed chunks, tool-call deltas,
//! latency, and the failures real providers produce (429, 500, a stream cut before `[DONE]`).
//! This server answers from the request alone, so the same input always gets the same answer,
//! and it sleeps only for the latency it was asked to simulate.
//!
//! It runs as the `fake-llm` binary (the end-to-end harness, the benchmarks, the compose
//! `demo` profile) or inside another program, which is why it is a crate of its own.
//!
//! # In-process use
//!
//! [`start`] binds `config.addr` and serves on a task of its own; [`start_on`] serves on a
//! listener the caller bound, and stops when the caller's [`CancellationToken`] is cancelled.
//! Either returns a [`FakeLlm`] handle: [`FakeLlm::base_url`] is the URL to give an
//! OpenAI-compatible client, [`FakeLlm::shutdown`] stops the server and waits for it, and
//! dropping the handle stops it too. [`FakeLlmConfig::demo`] paces the answers for a person
//! watching them stream; [`FakeLlmConfig::default`] answers at once, as the tests want.
//!
//! ```
//! use conveyor_fake_llm::FakeLlmConfig;
//! use tokio::net::TcpListener;
//! use tokio_util::sync::CancellationToken;
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! // The embedding program's own shutdown signal.
//! let shutdown = CancellationToken::new();
//! let listener = TcpListener::bind("127.0.0.1:0").await?;
//! let llm = conveyor_fake_llm::start_on(listener, FakeLlmConfig::demo(), &shutdown)?;
//! // `http://127.0.0.1:PORT/v1`; any model name and any API key are accepted.
//! let base_url = llm.base_url();
//! assert!(base_url.starts_with("http://127.0.0.1:") && base_url.ends_with("/v1"));
//!
//! shutdown.cancel();
//! llm.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! # Endpoints
//!
//! - `POST /v1/chat/completions` (also `/chat/completions`): OpenAI Chat Completions.
//!   Non-streaming → one `chat.completion` object; `"stream": true` → `text/event-stream` of
//!   `chat.completion.chunk`s as `data: {json}\n\n`, ending in `data: [DONE]\n\n`. The first
//!   chunk has `delta.role = "assistant"`; text arrives in `delta.content`; a tool call arrives as
//!   `delta.tool_calls[{index: 0, id, type: "function", function: {name, arguments: ""}}]`
//!   followed by two deltas carrying the halves of the arguments string; then a chunk with
//!   `finish_reason` `"stop"` or `"tool_calls"`, then (with `stream_options.include_usage`) a
//!   usage chunk with empty `choices`. Requests are parsed leniently; any model name is served.
//! - `GET /v1/models` (also `/models`): the `--models` names.
//! - `GET /healthz`: `ok`.
//! - `GET /stats`: [`FakeLlmStats`] as JSON,
//!   `{"requests", "streamed", "tool_calls", "in_flight", "max_in_flight",
//!   "faults": {"429", "500", "cut", "400", "401"}}` — `max_in_flight` is the most requests
//!   ever answered at once (a streamed answer counts until its last frame).
//!
//! # What the model answers
//!
//! - **Last message is `tool`** → text `Done. <first 200 chars of the tool content>`, or
//!   `The tool reported an error: <…>` when the content looks like an error (`isError: true`,
//!   a non-null `"error"` field, or text starting with "error").
//! - **Last message is `user`** → the intent grammar below (case-insensitive, whole words,
//!   trailing `.!?` ignored). When the intent's tool is offered — by exact name or a
//!   multi-server name ending in `__<name>` — the answer is ONE tool call whose arguments hold
//!   only the properties the tool's schema declares (all of them when it declares none;
//!   a number becomes a string where the schema wants a string). `user_id` is never added
//!   unless the `user_id=` directive asks for it.
//!
//!   | message | tool and arguments |
//!   | --- | --- |
//!   | `add <title>`, `add task <title>`, `remember to <title>` | `add_task {title, priority}` — priority only when the text says `high priority` / `medium priority` / `low priority` (the phrase, and a `with` before it, is removed from the title) |
//!   | `list…`, `show … tasks`, `what are my tasks` | `list_tasks {status}` — `pending` / `completed` only when that word appears |
//!   | `complete <n>`, `complete task <n>`, `done <n>` (`#n` too) | `complete_task {task_id}` |
//!   | `delete <n>`, `delete task <n>` | `delete_task {task_id}` |
//!   | `update <n> to <title>`, `rename [task] <n> to <title>` | `update_task {task_id, title}` |
//!   | `prioritise`/`prioritize`/`set priority [of] [task] <n> [to] <low\|medium\|high>` | `set_priority {task_id, priority}` |
//!
//!   The tool call id is `call_<16 hex>`, a hash of the message count, the user message and
//!   the tool name: stable for one input, distinct within a conversation.
//! - **Otherwise** (no intent, tool not offered, or any other last role) → text
//!   `You said: <message>.` (message without directives, whitespace collapsed), then filler
//!   words (`This is a deterministic answer from the fake model.`, cycled) until the answer has
//!   `chunks` words. Each streamed content chunk is one word plus the whitespace after it, so
//!   the chunks concatenate to exactly the answer text.
//!
//! # Directives
//!
//! A user message may carry `[[key=value …]]` blocks, e.g.
//! `add buy milk [[ttft_ms=0 chunks=5 chunk_delay_ms=10 fail=429 fail_times=2 user_id=mallory]]`.
//! They are removed before intent matching and echoing. Directives are read from the latest
//! `user` message, so they also apply to the follow-up request after a tool result in the same
//! turn. Unknown keys and bad values are ignored.
//!
//! - `ttft_ms=N`, `chunk_delay_ms=N`, `chunks=N` — override the config for this request.
//! - `fail=429|500|cut|400|401` — inject that fault. 429 carries `Retry-After` (seconds, rounded
//!   up) and `retry-after-ms` (`--retry-after-ms`). `cut` while streaming sends the role chunk
//!   and about half the content (or the tool call's first arguments piece), then drops the
//!   connection without a finish chunk or `[DONE]`; without streaming it sends the headers and
//!   half of the JSON body, then drops the connection.
//! - `fail_times=N` — inject `fail` only on the first N requests whose latest user message is
//!   exactly this text (the whole message, directive included), so retries then succeed. The
//!   count lives as long as the server: give each test its own message text.
//! - `user_id=X` — add `"user_id": "X"` to the tool arguments (the worker must override it).
//! - `text=…` — answer with exactly this text instead (also after a tool result); it takes the
//!   rest of the block up to `]]`, spaces and markup included, so put it last:
//!   `[[chunks=3 text=<script>alert(1)</script>]]`.
//!
//! # Timing
//!
//! Streaming: the headers go out at once; `ttft_ms` is slept before the first chunk (role plus
//! first content, or role plus tool-call header), then `chunk_delay_ms` before every further
//! content chunk (and before each of the two arguments pieces). The finish chunk, usage and
//! `[DONE]` follow the last content chunk without delay. Non-streaming: the response comes
//! after the same total time. Sleeps are `tokio::time::sleep`, i.e. simulated model time, and
//! steps without a delay are written in one go.
//!
//! # Random faults
//!
//! With `--fault-rate R` each request (the n-th one received, counting from 0) gets a fault
//! with probability R, of a kind picked from `--faults`; the decision for the n-th request is
//! a pure function of `--seed` and n. A `fail=` directive that applies takes precedence.

mod answer;
mod config;
mod directives;
mod intent;
mod request;
mod server;
mod stats;
mod wire;

#[cfg(test)]
mod tests;

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, PoisonError};

use axum::serve::ListenerExt;
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::{DEFAULT_MODEL, FakeLlmConfig, FaultKind, UnknownFault};
pub use stats::{FakeLlmStats, FaultStats};

use server::Shared;

/// Binds `config.addr` and serves the fake LLM on a task owned by the returned handle.
pub async fn start(config: FakeLlmConfig) -> io::Result<FakeLlm> {
    let listener = TcpListener::bind(config.addr).await?;
    start_on(listener, config, &CancellationToken::new())
}

/// Serves the fake LLM on `listener` (`config.addr` is not used) on a task owned by the
/// returned handle, until `shutdown` is cancelled or the handle is shut down or dropped.
/// Stopping the handle does not cancel `shutdown`, which belongs to the caller.
///
/// Must be called from within a Tokio runtime.
pub fn start_on(
    listener: TcpListener,
    config: FakeLlmConfig,
    shutdown: &CancellationToken,
) -> io::Result<FakeLlm> {
    let addr = listener.local_addr()?;
    let shutdown = shutdown.child_token();
    let shared = Arc::new(Shared::new(config, shutdown.clone()));
    let app = server::router(Arc::clone(&shared));
    // Without TCP_NODELAY, Nagle's algorithm would hold back small SSE frames and distort the
    // simulated timing.
    let listener = listener.tap_io(|tcp| {
        if let Err(err) = tcp.set_nodelay(true) {
            tracing::debug!(%err, "fake LLM: could not set TCP_NODELAY");
        }
    });
    let signal = shutdown.clone().cancelled_owned();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(signal)
            .await
    });
    tracing::info!(%addr, "fake LLM listening");
    Ok(FakeLlm {
        addr,
        shared,
        shutdown,
        task: Some(task),
    })
}

/// A running fake LLM server. Dropping it stops the server (in-flight streams are cut);
/// [`FakeLlm::shutdown`] also waits until it has stopped.
pub struct FakeLlm {
    addr: SocketAddr,
    shared: Arc<Shared>,
    shutdown: CancellationToken,
    task: Option<JoinHandle<io::Result<()>>>,
}

impl FakeLlm {
    /// The bound address (the real port when the config asked for port 0).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The OpenAI base URL to configure a client with, e.g. `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The counters so far (the same numbers as `GET /stats`).
    pub fn stats(&self) -> FakeLlmStats {
        self.shared.counters.snapshot()
    }

    /// Every chat completion request body received so far, in arrival order; empty unless
    /// `config.record_requests` was set. Lets a test check what the worker sent (system
    /// prompt, tool schemas without `user_id`, `parallel_tool_calls`).
    pub fn recorded_requests(&self) -> Vec<Value> {
        self.shared
            .recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops accepting connections, cuts in-flight streams and waits for the server task.
    pub async fn shutdown(mut self) -> io::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await.map_err(io::Error::other)?,
            None => Ok(()),
        }
    }
}

impl Drop for FakeLlm {
    fn drop(&mut self) {
        // The task sees the cancellation and ends on its own; there is nothing to await here.
        self.shutdown.cancel();
    }
}
