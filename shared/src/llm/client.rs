//! A configured async-openai client that leaves retrying to us.
//!
//! async-openai retries 429/5xx on its own by default and drops the `Retry-After` header on the
//! way; the worker needs both decisions in its hands (to emit `run.retrying`, honour the
//! server's delay and share one backoff policy). So the client runs over a transport that does
//! no retries and turns an unsuccessful status into an [`LlmHttpError`] carrying the status
//! and the server's requested delay.

use std::{
    task::{Context, Poll},
    time::Duration,
};

use async_openai::{
    config::OpenAIConfig,
    error::OpenAIError,
    middleware::{HttpRequestFactory, ReqwestService},
};
use futures::future::BoxFuture;

use super::LlmSettings;

/// The client type the worker uses.
pub type LlmClient = async_openai::Client<OpenAIConfig>;

/// An unsuccessful HTTP answer from the provider.
#[derive(Debug, Clone, thiserror::Error)]
#[error("LLM provider answered HTTP {status}: {message}")]
pub struct LlmHttpError {
    pub status: u16,
    /// From `retry-after-ms` or `Retry-After` (seconds), when the provider sent one.
    pub retry_after: Option<Duration>,
    /// The provider's error message, cut to a readable length.
    pub message: String,
}

/// Builds the client for `settings` over the given HTTP client (shared connection pool).
pub fn build_client(settings: &LlmSettings, http: reqwest::Client) -> LlmClient {
    let mut config = OpenAIConfig::new().with_api_base(&settings.base_url);
    if !settings.api_key.expose().is_empty() {
        config = config.with_api_key(settings.api_key.expose());
    }
    async_openai::Client::with_config(config).with_http_service(StatusTransport {
        inner: ReqwestService::new(http),
    })
}

/// The transport: plain reqwest, with non-2xx answers turned into [`LlmHttpError`].
#[derive(Clone, Debug)]
struct StatusTransport {
    inner: ReqwestService,
}

impl tower::Service<HttpRequestFactory> for StatusTransport {
    type Response = reqwest::Response;
    type Error = OpenAIError;
    type Future = BoxFuture<'static, Result<reqwest::Response, OpenAIError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), OpenAIError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: HttpRequestFactory) -> Self::Future {
        let call = self.inner.call(request);
        Box::pin(async move {
            let response = call.await?;
            if response.status().is_success() {
                return Ok(response);
            }
            let status = response.status().as_u16();
            let retry_after = retry_after(response.headers());
            let body = response.text().await.unwrap_or_default();
            Err(OpenAIError::Boxed(Box::new(LlmHttpError {
                status,
                retry_after,
                message: error_message(&body),
            })))
        })
    }
}

/// Reads `retry-after-ms` (OpenAI's) or `Retry-After` in seconds.
fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(ms) = header("retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok()) {
        return Some(Duration::from_secs_f64(ms.max(0.0) / 1000.0));
    }
    header("retry-after")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|s| Duration::from_secs_f64(s.max(0.0)))
}

/// The `error.message` of an OpenAI-style body, else the body's start.
fn error_message(body: &str) -> String {
    let parsed = serde_json::from_str::<serde_json::Value>(body).ok();
    let message = parsed
        .as_ref()
        .and_then(|v| v.pointer("/error/message").and_then(|m| m.as_str()))
        .unwrap_or(body);
    message.chars().take(300).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert("retry-after", "2".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_secs(2)));
        headers.insert("retry-after-ms", "150".parse().unwrap());
        assert_eq!(retry_after(&headers), Some(Duration::from_millis(150)));
    }

    #[test]
    fn error_message_reads_openai_error_bodies() {
        assert_eq!(
            error_message(r#"{"error":{"message":"slow down"}}"#),
            "slow down"
        );
        assert_eq!(error_message("plain text"), "plain text");
    }
}
