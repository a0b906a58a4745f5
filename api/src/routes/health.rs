//! Liveness and readiness.

use std::time::Duration;

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde_json::json;

use crate::state::AppState;

/// How long each readiness probe may take. A backend that does not answer within it counts as
/// down: while Redis or Postgres is away, the Redis connection manager and the Postgres pool
/// wait for a reconnect (seconds) instead of failing, and a probe that waits with them would
/// leave `/readyz` hanging through the outage and answer 200 once it is over, never 503.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// The process is up.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Postgres and Redis answer (each within [`PROBE_TIMEOUT`]).
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = async { state.db.ping().await.is_ok() };
    let redis = async { state.bus.ping().await.is_ok() };
    let (postgres, redis) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, postgres),
        tokio::time::timeout(PROBE_TIMEOUT, redis),
    );
    let postgres = postgres.unwrap_or(false);
    let redis = redis.unwrap_or(false);
    let status = if postgres && redis {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"status": if status == StatusCode::OK { "ready" } else { "unavailable" }, "postgres": postgres, "redis": redis}),
        ),
    )
}
