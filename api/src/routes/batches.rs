//! `/api/{user_id}/batches…`: create, list, status, results and cancel.

use axum::{
    Json,
    body::{Body, Bytes},
    extract::State,
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use futures::StreamExt;

use super::{Params, params};
use crate::{
    error::ApiError,
    extract::{BatchPath, UserPath, page_limit},
    services::batches::{self, BatchOptions, Line, UploadLimits, UploadReader},
    state::AppState,
};

/// `POST …/batches?completion_window=24h&metadata.key=value` with a JSONL body: `201` with the
/// batch, or `400` listing the bad lines (nothing created).
pub async fn create(
    State(state): State<AppState>,
    UserPath(user): UserPath,
    query: Params,
    body: Body,
) -> Result<Response, ApiError> {
    let query = params(query)?;
    let options = BatchOptions::from_query(query.iter().map(|(k, v)| (k.as_str(), v.as_str())))?;
    let limits = UploadLimits {
        max_lines: state.config.max_batch_lines,
        max_bytes: state.config.max_batch_bytes,
        max_message_chars: state.config.max_message_chars,
    };
    let lines = read_upload(body, limits).await?;
    let batch = batches::create(&state, &user, options, lines).await?;
    Ok((StatusCode::CREATED, Json(batch)).into_response())
}

/// Reads the upload through the line checker. Past the size limit the rest of the body is
/// read and dropped (up to the limit again), so that the client gets the `400` rather than a
/// connection reset while it is still sending.
async fn read_upload(body: Body, limits: UploadLimits) -> Result<Vec<Line>, ApiError> {
    let mut reader = UploadReader::new(limits);
    let mut stream = body.into_data_stream();
    let mut reading = true;
    let mut dropped = 0_usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk
            .map_err(|e| ApiError::bad_request(format!("cannot read the request body: {e}")))?;
        if reading {
            reading = reader.feed(&chunk);
        } else {
            dropped += chunk.len();
            if dropped > limits.max_bytes {
                break;
            }
        }
    }
    reader.finish()
}

pub async fn list(
    State(state): State<AppState>,
    UserPath(user): UserPath,
    query: Params,
) -> Result<impl IntoResponse, ApiError> {
    let query = params(query)?;
    let limit = page_limit(query.get("limit").map(String::as_str))?;
    Ok(Json(
        batches::list(
            &state,
            &user,
            limit,
            query.get("cursor").map(String::as_str),
        )
        .await?,
    ))
}

pub async fn get(
    State(state): State<AppState>,
    path: BatchPath,
) -> Result<Json<batches::BatchView>, ApiError> {
    Ok(Json(
        batches::get(&state, &path.user, &path.batch_id).await?,
    ))
}

/// The results so far as JSONL (`application/x-ndjson`), streamed.
pub async fn results(State(state): State<AppState>, path: BatchPath) -> Result<Response, ApiError> {
    let lines = batches::results(&state, &path.user, &path.batch_id).await?;
    let body =
        Body::from_stream(lines.map(|page| page.map(Bytes::from).map_err(std::io::Error::other)));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}

/// `POST …/cancel`: `202` when it changed something, `200` when the batch had already ended
/// or was being cancelled.
pub async fn cancel(State(state): State<AppState>, path: BatchPath) -> Result<Response, ApiError> {
    let (changed, batch) = batches::cancel(&state, &path.user, &path.batch_id).await?;
    let status = if changed {
        StatusCode::ACCEPTED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(batch)).into_response())
}
