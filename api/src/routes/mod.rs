//! HTTP routes: thin handlers that parse, call one service function and map the result.

mod batches;
mod chat;
mod conversations;
mod health;
mod metrics;
mod page;
mod runs;

use std::collections::HashMap;

use axum::{
    Router,
    extract::{DefaultBodyLimit, Query, rejection::QueryRejection},
    routing::{get, post},
};

use axum::{
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};
use conveyor_shared::ids::{RunId, Seq, UserId};

use crate::{error::ApiError, extract::resume_cursor, services, state::AppState};

/// The API's routes.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(page::index))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics::metrics))
        .route("/api/{user_id}/chat", post(chat::create))
        .route("/api/{user_id}/runs/{run_id}", get(runs::get))
        .route("/api/{user_id}/runs/{run_id}/events", get(runs::events))
        .route("/api/{user_id}/runs/{run_id}/cancel", post(runs::cancel))
        .route(
            "/api/{user_id}/batches",
            // Uploads count their own bytes against MAX_BATCH_BYTES (to name the line where
            // the limit falls), so the router's body limit does not apply here.
            post(batches::create)
                .layer(DefaultBodyLimit::disable())
                .get(batches::list),
        )
        .route("/api/{user_id}/batches/{batch_id}", get(batches::get))
        .route(
            "/api/{user_id}/batches/{batch_id}/results",
            get(batches::results),
        )
        .route(
            "/api/{user_id}/batches/{batch_id}/cancel",
            post(batches::cancel),
        )
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

/// The resume cursor of an events request (`Last-Event-ID`, `?after=`, `?starting_after=`).
fn events_cursor(headers: &HeaderMap, query: Params) -> Result<Seq, ApiError> {
    let query = params(query)?;
    resume_cursor(
        headers,
        query.get("after").map(String::as_str),
        query.get("starting_after").map(String::as_str),
    )
}

/// A run's events after `after` as SSE, or `204` when nothing more will come.
async fn follow_run(
    state: &AppState,
    user: &UserId,
    run_id: RunId,
    after: Seq,
) -> Result<Response, ApiError> {
    match services::runs::attach(state, user, &run_id, after).await? {
        services::runs::Attach::Finished => Ok(StatusCode::NO_CONTENT.into_response()),
        services::runs::Attach::Events(events) => Ok(crate::sse::response(
            state.limits.open_stream(user)?,
            run_id,
            events,
            state.config.sse_keepalive,
        )),
    }
}

fn params(query: Params) -> Result<HashMap<String, String>, ApiError> {
    query
        .map(|Query(q)| q)
        .map_err(|e| ApiError::bad_request(format!("malformed query string: {e}")))
}
