//! HTTP routes: thin handlers that parse, call one service function and map the result.

mod chat;
mod conversations;
mod health;
mod page;
mod runs;

use std::collections::HashMap;

use axum::{
    Router,
    extract::{Query, rejection::QueryRejection},
    routing::{get, post},
};

use crate::{error::ApiError, state::AppState};

/// The API's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(page::index))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/api/{user_id}/chat", post(chat::create))
        .route("/api/{user_id}/runs/{run_id}", get(runs::get))
        .route("/api/{user_id}/runs/{run_id}/events", get(runs::events))
        .route("/api/{user_id}/runs/{run_id}/cancel", post(runs::cancel))
        .route("/api/{user_id}/conversations", get(conversations::list))
        .route(
            "/api/{user_id}/conversations/{conversation_id}",
            axum::routing::delete(conversations::delete),
        )
        .route(
            "/api/{user_id}/conversations/{conversation_id}/messages",
            get(conversations::messages),
        )
        .route(
            "/api/{user_id}/conversations/{conversation_id}/stream",
            get(conversations::stream),
        )
        .fallback(|| async { ApiError::NotFound("route") })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
}

/// Query parameters, with a malformed query string answered as a JSON 400.
type Params = Result<Query<HashMap<String, String>>, QueryRejection>;

fn params(query: Params) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))
}
