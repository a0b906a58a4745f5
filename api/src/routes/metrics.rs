//! `GET /metrics`: Prometheus text, unauthenticated like `/healthz` (see the README on exposing
//! it).

use axum::{extract::State, http::header, response::IntoResponse};
use conveyor_shared::metrics::CONTENT_TYPE;

use crate::state::AppState;

pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let text = state
        .metrics
        .render(&state.db, &state.producer, &state.hub)
        .await;
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
}
