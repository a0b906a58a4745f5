//! Liveness and readiness.

use axum::{Json, extract::State, http::StatusCode, response::IntoResponse};
use serde_json::json;

use crate::state::AppState;

/// The process is up.
pub async fn healthz() -> impl IntoResponse {
    Json(json!({"status": "ok"}))
}

/// Postgres and Redis answer.
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let postgres = sqlx::query_scalar!("SELECT 1 AS one")
        .fetch_one(&state.db)
        .await
        .is_ok();
    let redis = state.bus.ping().await.is_ok();
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
