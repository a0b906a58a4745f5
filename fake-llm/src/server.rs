//! The HTTP side: routes, fault injection and the shared state of one server.
//!
//! Handlers stay thin: parse leniently, decide a fault, ask [`answer::decide`] what to say and
//! [`wire`] how to send it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::answer::{self, Answer};
use super::config::{DEFAULT_MODEL, FakeLlmConfig, FaultKind};
use super::directives::{self, Directives};
use super::request::{ChatRequest, Message};
use super::stats::Counters;
use super::wire::{self, Meta, Timing};

/// State shared by all requests of one server.
pub(crate) struct Shared {
    pub config: FakeLlmConfig,
    pub counters: Arc<Counters>,
    /// Requests seen per `fail_times` message (hash of the user message), so retries of the
    /// same message eventually succeed.
    fail_counts: Mutex<HashMap<u64, u32>>,
    pub recorded: Mutex<Vec<Value>>,
    pub shutdown: CancellationToken,
    models_body: Bytes,
}

impl Shared {
    pub fn new(config: FakeLlmConfig, shutdown: CancellationToken) -> Self {
        let data: Vec<Value> = config
            .models
            .iter()
            .map(|id| json!({"id": id, "object": "model", "created": 0, "owned_by": "conveyor-fake-llm"}))
            .collect();
        let models_body = Bytes::from(json!({"object": "list", "data": data}).to_string());
        Self {
            config,
            counters: Arc::default(),
            fail_counts: Mutex::new(HashMap::new()),
            recorded: Mutex::new(Vec::new()),
            shutdown,
            models_body,
        }
    }

    fn fault_for(
        &self,
        request_no: u64,
        raw_user: &str,
        directives: &Directives<'_>,
    ) -> Option<FaultKind> {
        if let Some(kind) = directives.fail {
            let Some(times) = directives.fail_times else {
                return Some(kind);
            };
            let mut hasher = DefaultHasher::new();
            raw_user.hash(&mut hasher);
            let mut counts = self
                .fail_counts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let seen = counts.entry(hasher.finish()).or_insert(0);
            let hit = *seen < times;
            *seen = seen.saturating_add(1);
            if hit {
                return Some(kind);
            }
        }
        random_fault(&self.config, request_no)
    }

    fn default_model(&self) -> &str {
        self.config
            .models
            .first()
            .map_or(DEFAULT_MODEL, String::as_str)
    }
}

/// The `request_no`-th decision of the seeded fault sequence (SplitMix64, so no RNG crate and
/// no shared mutable generator).
fn random_fault(config: &FakeLlmConfig, request_no: u64) -> Option<FaultKind> {
    if config.fault_rate <= 0.0 || config.faults.is_empty() {
        return None;
    }
    let r = splitmix64(config.seed ^ splitmix64(request_no));
    #[expect(
        clippy::cast_precision_loss,
        reason = "53 random bits fit an f64 mantissa exactly"
    )]
    let unit = (r >> 11) as f64 / (1u64 << 53) as f64;
    if unit >= config.fault_rate {
        return None;
    }
    let len = config.faults.len() as u64;
    #[expect(
        clippy::cast_possible_truncation,
        reason = "the index is < faults.len()"
    )]
    let index = (splitmix64(r) % len) as usize;
    Some(config.faults[index])
}

fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/models", get(models))
        .route("/healthz", get(|| async { "ok" }))
        .route("/stats", get(stats))
        .fallback(not_found)
        .with_state(shared)
}

async fn chat_completions(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let request_no = Counters::bump(&shared.counters.requests);
    let in_flight = shared.counters.start();
    let request: ChatRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(err) => {
            return error_response(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                None,
                &format!("request body is not valid JSON: {err}"),
            );
        }
    };
    if shared.config.record_requests
        && let Ok(value) = serde_json::from_slice(&body)
    {
        shared
            .recorded
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(value);
    }
    let stream = request.is_stream();
    if stream {
        Counters::bump(&shared.counters.streamed);
    }

    let last_user = request
        .messages()
        .iter()
        .rev()
        .find(|m| m.role() == "user")
        .map(Message::text);
    let raw_user = last_user.as_deref().unwrap_or_default();
    let (user_text, directives) = directives::parse(raw_user);

    let fault = shared.fault_for(request_no, raw_user, &directives);
    tracing::debug!(
        request_no,
        stream,
        fault = fault.map(FaultKind::as_str),
        "fake LLM: chat completion"
    );
    if let Some(kind) = fault {
        shared.counters.fault(kind);
        if kind != FaultKind::Cut {
            return fault_response(kind, shared.config.retry_after_ms);
        }
    }
    let cut = fault == Some(FaultKind::Cut);

    let answer = answer::decide(
        &request,
        raw_user,
        &user_text,
        &directives,
        shared.config.chunks,
    );
    if matches!(answer, Answer::ToolCall(_)) {
        Counters::bump(&shared.counters.tool_calls);
    }
    let timing = Timing {
        ttft: Duration::from_millis(directives.ttft_ms.unwrap_or(shared.config.ttft_ms)),
        chunk_delay: Duration::from_millis(
            directives
                .chunk_delay_ms
                .unwrap_or(shared.config.chunk_delay_ms),
        ),
    };
    let prompt_chars: usize = request.messages().iter().map(Message::approx_len).sum();
    let meta = Meta {
        id: request_no,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        model: request
            .model
            .as_deref()
            .filter(|m| !m.is_empty())
            .unwrap_or_else(|| shared.default_model()),
        include_usage: request.include_usage(),
        prompt_tokens: (prompt_chars as u64).div_ceil(4),
    };

    if stream {
        let frames = wire::stream_frames(&answer, &meta, timing, cut);
        let body = wire::body(frames, cut, shared.shutdown.clone(), in_flight);
        return (
            [
                (
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                ),
                (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
            ],
            body,
        )
            .into_response();
    }

    // A non-streaming answer arrives after the whole simulated generation.
    let delay = timing.ttft
        + timing
            .chunk_delay
            .saturating_mul(u32::try_from(answer.delayed_steps()).unwrap_or(u32::MAX));
    if !delay.is_zero() {
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            () = shared.shutdown.cancelled() => {
                return error_response(StatusCode::SERVICE_UNAVAILABLE, "server_error", None, "fake LLM shutting down");
            }
        }
    }
    let json = wire::completion_json(&answer, &meta);
    let body = if cut {
        // Half a JSON object never parses.
        let half = json.len() / 2;
        let partial = Bytes::from(json).slice(..half);
        wire::body(
            vec![(Duration::ZERO, partial)],
            true,
            shared.shutdown.clone(),
            in_flight,
        )
    } else {
        Body::from(json)
    };
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        body,
    )
        .into_response()
}

fn fault_response(kind: FaultKind, retry_after_ms: u64) -> Response {
    match kind {
        FaultKind::RateLimited => {
            let mut response = error_response(
                StatusCode::TOO_MANY_REQUESTS,
                "requests",
                Some("rate_limit_exceeded"),
                "Rate limit reached (injected by the fake LLM).",
            );
            let headers = response.headers_mut();
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after_ms.div_ceil(1000)),
            );
            headers.insert("retry-after-ms", HeaderValue::from(retry_after_ms));
            response
        }
        FaultKind::ServerError | FaultKind::Cut => error_response(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            None,
            "The server had an error while processing your request (injected by the fake LLM).",
        ),
        FaultKind::BadRequest => error_response(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "Invalid request (injected by the fake LLM).",
        ),
        FaultKind::Unauthorized => error_response(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "Incorrect API key provided (injected by the fake LLM).",
        ),
    }
}

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`.
fn error_response(status: StatusCode, kind: &str, code: Option<&str>, message: &str) -> Response {
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    (status, axum::Json(body)).into_response()
}

async fn models(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        shared.models_body.clone(),
    )
        .into_response()
}

async fn stats(State(shared): State<Arc<Shared>>) -> axum::Json<super::FakeLlmStats> {
    axum::Json(shared.counters.snapshot())
}

async fn not_found() -> Response {
    error_response(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        Some("unknown_url"),
        "Unknown path on the fake LLM server.",
    )
}
