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

/// The database and the event bus answer (each within [`PROBE_TIMEOUT`]): Postgres and Redis,
/// or, in the embedded mode, the SQLite file (`database`) and the in-process bus (`events`).
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let database = async { state.db.ping().await.is_ok() };
    let events = async { state.bus.ping().await.is_ok() };
    let (database, events) = tokio::join!(
        tokio::time::timeout(PROBE_TIMEOUT, database),
        tokio::time::timeout(PROBE_TIMEOUT, events),
    );
    let database = database.unwrap_or(false);
    let events = events.unwrap_or(false);
    let status = if database && events {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let (database_key, events_key) = if state.db.is_sqlite() {
        ("database", "events")
    } else {
        ("postgres", "redis")
    };
    let mut body =
        json!({"status": if status == StatusCode::OK { "ready" } else { "unavailable" }});
    body[database_key] = database.into();
    body[events_key] = events.into();
    (status, Json(body))
}
