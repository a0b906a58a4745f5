//! `POST /api/{user_id}/chat`.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde_json::json;

use super::{Params, params};
use crate::{
    error::ApiError,
    extract::{JsonBody, UserPath},
    services::{runs, turns},
    sse,
    state::AppState,
};

/// Accepts a turn; answers its SSE stream, or `202` JSON when asked for JSON.
pub async fn create(
    State(state): State<AppState>,
    UserPath(user): UserPath,
    headers: HeaderMap,
    query: Params,
    JsonBody(body): JsonBody<turns::ChatRequest>,
) -> Result<Response, ApiError> {
    let query = params(query)?;
    let key = match headers.get("idempotency-key") {
        None => None,
        Some(value) => {
            let key = value.to_str().map_err(|_| {
                ApiError::validation("Idempotency-Key", "Idempotency-Key must be visible ASCII")
            })?;
            turns::validate_idempotency_key(key)?;
            Some(key)
        }
    };
    let wants_json = match query.get("stream").map(String::as_str) {
        Some("false") => true,
        Some("true") | None => headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|accept| {
                accept.contains("application/json") && !accept.contains("text/event-stream")
            }),
        Some(_) => {
            return Err(ApiError::validation(
                "stream",
                "stream must be true or false",
            ));
        }
    };
    // Refuse before accepting: a turn the client cannot follow would be a surprise.
    let guard = if wants_json {
        None
    } else {
        Some(state.limits.open_stream(&user)?)
    };
    let turn = turns::accept(&state, &user, body, key).await?;
    if wants_json {
        let body = json!({
            "run_id": turn.run_id,
            "conversation_id": turn.conversation_id,
            "stream_url": format!("/api/{user}/runs/{}/events", turn.run_id),
        });
        return Ok((StatusCode::ACCEPTED, Json(body)).into_response());
    }
    match runs::attach(&state, &user, &turn.run_id, 0).await? {
        runs::Attach::Finished => Ok(StatusCode::NO_CONTENT.into_response()),
        runs::Attach::Events(events) => Ok(sse::response(
            guard.ok_or(ApiError::Internal("no stream guard".into()))?,
            turn.run_id,
            events,
            state.config.sse_keepalive,
        )),
    }
}
