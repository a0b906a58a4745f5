//! Conversations: list, history, delete, and attaching to the active run.

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, StatusCode},
    response::{IntoResponse, Response},
};

use super::{Params, events_cursor, follow_run, params};
use crate::{
    error::ApiError,
    extract::{ConversationPath, UserPath, page_limit},
    services::conversations,
    state::AppState,
};

pub async fn list(
    State(state): State<AppState>,
    UserPath(user): UserPath,
    query: Params,
) -> Result<impl IntoResponse, ApiError> {
    let query = params(query)?;
    let limit = page_limit(query.get("limit").map(String::as_str))?;
    Ok(Json(
        conversations::list(
            &state.db,
            &user,
            limit,
            query.get("cursor").map(String::as_str),
        )
        .await?,
    ))
}

pub async fn messages(
    State(state): State<AppState>,
    path: ConversationPath,
    query: Params,
) -> Result<impl IntoResponse, ApiError> {
    let query = params(query)?;
    let limit = page_limit(query.get("limit").map(String::as_str))?;
    Ok(Json(
        conversations::messages(
            &state.db,
            &path.user,
            &path.conversation_id,
            limit,
            query.get("cursor").map(String::as_str),
        )
        .await?,
    ))
}

pub async fn delete(
    State(state): State<AppState>,
    path: ConversationPath,
) -> Result<StatusCode, ApiError> {
    conversations::delete(&state.db, &path.user, &path.conversation_id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// SSE of the conversation's active run (after a page reload); `204` when there is none.
pub async fn stream(
    State(state): State<AppState>,
    path: ConversationPath,
    headers: HeaderMap,
    query: Params,
) -> Result<Response, ApiError> {
    let after = events_cursor(&headers, query)?;
    let Some(run_id) =
        conversations::active_run(&state.db, &path.user, &path.conversation_id).await?
    else {
        return Ok(StatusCode::NO_CONTENT.into_response());
    };
    follow_run(&state, &path.user, run_id, after).await
}
