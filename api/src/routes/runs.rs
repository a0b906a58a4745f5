//! `GET /api/{user_id}/runs/{run_id}` and its `/events`.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};

use super::{Params, events_cursor, follow_run};
use crate::{error::ApiError, extract::RunPath, services::runs, state::AppState};

pub async fn get(
    State(state): State<AppState>,
    path: RunPath,
) -> Result<Json<runs::RunView>, ApiError> {
    Ok(Json(runs::get(&state, &path.user, &path.run_id).await?))
}

/// `POST …/cancel`: `202` when it changed something, `200` when the run had already ended.
pub async fn cancel(State(state): State<AppState>, path: RunPath) -> Result<Response, ApiError> {
    let (changed, run) = runs::cancel(&state, &path.user, &path.run_id).await?;
    let status = if changed {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(run)).into_response())
}

/// The run's events after the cursor; `204` when the cursor is at or past its end.
pub async fn events(
    State(state): State<AppState>,
    path: RunPath,
    headers: HeaderMap,
    query: Params,
) -> Result<Response, ApiError> {
    let after = events_cursor(&headers, query)?;
    follow_run(&state, &path.user, path.run_id, after).await
}
