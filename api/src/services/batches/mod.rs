//! Batches: many prompts uploaded at once, each run like a chat turn on the lower-priority
//! `batch` queue.
//!
//! Creating a batch is all or nothing: the upload is checked line by line first ([`upload`]),
//! then the batch, its runs, their user messages (and fresh conversations) and their
//! `run.queued` events are inserted in one transaction with one multi-row statement per table,
//! and the jobs are pushed afterwards in chunks. As with a chat turn, the commit is the
//! durability point: a push that fails leaves runs `queued` for the sweeper.

pub mod upload;

use std::time::Duration;

use chrono::{DateTime, Utc};
use conveyor_shared::{
    events::EventKind,
    ids::{BatchId, ConversationId, MessageId, RunId, UserId},
    queue::{QueueName, RunJob},
    store::{batches, conversations, messages, run_events, runs},
};
use futures::Stream;
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::{error::ApiError, services::conversations::Page, state::AppState};

pub use upload::{Line, UploadLimits, UploadReader};

/// Results are read from Postgres this many lines at a time.
const RESULTS_PAGE: i64 = 500;
/// Metadata: at most this many keys, of at most 64 characters, with values of at most 512.
const MAX_METADATA_KEYS: usize = 16;
const MAX_METADATA_KEY_CHARS: usize = 64;
const MAX_METADATA_VALUE_CHARS: usize = 512;
/// The completion window when none is given, and the longest accepted.
pub const DEFAULT_COMPLETION_WINDOW: &str = "24h";
const MAX_COMPLETION_WINDOW: Duration = Duration::from_hours(24 * 30);

/// The error stored on a run that its batch's deadline cancelled before it started.
pub fn expired_error() -> Value {
    json!({"code": "batch_expired", "message": "the batch's completion window ended before this line started"})
}

/// How a batch is created, besides its lines (from the query string).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    /// `metadata.{key}={value}` pairs.
    pub metadata: Option<Value>,
    /// As written (`24h`), and as a duration.
    pub completion_window: (String, Duration),
}

impl BatchOptions {
    /// Reads `completion_window` and `metadata.*` query parameters; anything else is refused.
    pub fn from_query<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, ApiError> {
        let mut window = None;
        let mut metadata = Map::new();
        for (key, value) in params {
            if key == "completion_window" {
                window = Some(value);
            } else if let Some(name) = key.strip_prefix("metadata.") {
                if name.is_empty() || name.chars().count() > MAX_METADATA_KEY_CHARS {
                    return Err(ApiError::validation(
                        key,
                        format!("metadata keys are 1–{MAX_METADATA_KEY_CHARS} characters"),
                    ));
                }
                if value.chars().count() > MAX_METADATA_VALUE_CHARS {
                    return Err(ApiError::validation(
                        key,
                        format!(
                            "metadata values are at most {MAX_METADATA_VALUE_CHARS} characters"
                        ),
                    ));
                }
                metadata.insert(name.to_owned(), Value::from(value));
            } else {
                return Err(ApiError::validation(
                    key,
                    format!(
                        "unknown parameter {key:?}: expected completion_window or metadata.<key>"
                    ),
                ));
            }
        }
        if metadata.len() > MAX_METADATA_KEYS {
            return Err(ApiError::validation(
                "metadata",
                format!("at most {MAX_METADATA_KEYS} metadata keys"),
            ));
        }
        let window = window.unwrap_or(DEFAULT_COMPLETION_WINDOW).trim();
        let duration = parse_window(window).ok_or_else(|| {
            ApiError::validation(
                "completion_window",
                "completion_window is a whole number of s, m, h or d (e.g. 24h), at most 30d",
            )
        })?;
        Ok(Self {
            metadata: (!metadata.is_empty()).then_some(Value::Object(metadata)),
            completion_window: (window.to_owned(), duration),
        })
    }
}

/// `90s`, `30m`, `24h`, `7d` → a duration of 1 s to 30 days.
fn parse_window(window: &str) -> Option<Duration> {
    let unit = window.chars().last()?;
    let number: u64 = window[..window.len() - unit.len_utf8()].parse().ok()?;
    let secs = match unit {
        's' => number,
        'm' => number.checked_mul(60)?,
        'h' => number.checked_mul(3_600)?,
        'd' => number.checked_mul(86_400)?,
        _ => return None,
    };
    let duration = Duration::from_secs(secs);
    (secs > 0 && duration <= MAX_COMPLETION_WINDOW).then_some(duration)
}

/// A batch as the API shows it.
#[derive(Debug, Serialize)]
pub struct BatchView {
    pub id: String,
    pub status: String,
    pub counts: Counts,
    pub metadata: Option<Value>,
    pub completion_window: Option<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub results_url: String,
}

/// How many lines there are and how many ended each way (the rest are queued or running).
#[derive(Debug, Serialize)]
pub struct Counts {
    pub total: i64,
    pub completed: i64,
    pub failed: i64,
    pub cancelled: i64,
}

fn view(user: &UserId, batch: batches::Batch) -> BatchView {
    BatchView {
        results_url: format!("/api/{user}/batches/{}/results", batch.id),
        id: batch.id,
        status: batch.status,
        counts: Counts {
            total: i64::from(batch.total),
            completed: batch.completed,
            failed: batch.failed,
            cancelled: batch.cancelled,
        },
        metadata: batch.metadata,
        completion_window: batch.completion_window,
        created_at: batch.created_at,
        expires_at: batch.expires_at,
        cancel_requested_at: batch.cancel_requested_at,
        finished_at: batch.finished_at,
    }
}

/// Creates a batch of `lines` (already checked) for `user`: one run per line on the batch
/// queue. A `conversation_id` that is not the user's is a line error; a line without one gets
/// a fresh conversation.
pub async fn create(
    state: &AppState,
    user: &UserId,
    options: BatchOptions,
    lines: Vec<Line>,
) -> Result<BatchView, ApiError> {
    let total = i32::try_from(lines.len())
        .map_err(|_| ApiError::Internal("more lines than a batch can hold".into()))?;
    let mut given: Vec<&str> = lines
        .iter()
        .filter_map(|l| l.conversation_id.as_ref().map(ConversationId::as_str))
        .collect();
    given.sort_unstable();
    given.dedup();

    let mut tx = state.db.begin().await?;
    let limit = state.config.max_open_batches_per_user;
    if limit > 0 && batches::lock_user_and_count_open(&mut tx, user).await? >= i64::from(limit) {
        return Err(ApiError::RateLimited {
            retry_after_secs: 60,
            message: format!("at most {limit} batches in progress per user"),
        });
    }
    if !given.is_empty() {
        let owned = conversations::owned_among(&mut tx, user, &given).await?;
        let errors: Vec<(usize, String)> = lines
            .iter()
            .filter_map(|l| {
                let id = l.conversation_id.as_ref()?;
                (!owned.iter().any(|o| o == id.as_str()))
                    .then(|| (l.number, format!("conversation {id} not found")))
            })
            .collect();
        if !errors.is_empty() {
            return Err(upload::rejection(errors));
        }
    }

    let batch_id = BatchId::new();
    let ids = LineIds::new(&lines);
    batches::insert(
        &mut tx,
        batches::NewBatch {
            id: batch_id.as_str(),
            user_id: user.as_str(),
            metadata: options.metadata.as_ref(),
            completion_window: &options.completion_window.0,
            expires_at: Utc::now()
                + chrono::Duration::from_std(options.completion_window.1)
                    .map_err(|e| ApiError::Internal(format!("completion window: {e}")))?,
            total,
        },
    )
    .await?;
    let new_conversations: Vec<(&str, String)> = lines
        .iter()
        .zip(&ids.conversations)
        .filter(|(line, _)| line.conversation_id.is_none())
        .map(|(line, id)| (id.as_str(), super::turns::title_of(&line.message)))
        .collect();
    if !new_conversations.is_empty() {
        let conversation_ids: Vec<&str> = new_conversations.iter().map(|(id, _)| *id).collect();
        let titles: Vec<&str> = new_conversations.iter().map(|(_, t)| t.as_str()).collect();
        conversations::insert_many(&mut tx, user, &conversation_ids, &titles).await?;
    }
    let run_ids: Vec<&str> = ids.runs.iter().map(RunId::as_str).collect();
    let conversation_ids: Vec<&str> = ids.conversations.iter().map(String::as_str).collect();
    let custom_ids: Vec<&str> = lines.iter().map(|l| l.custom_id.as_str()).collect();
    runs::insert_batch_runs(
        &mut tx,
        runs::NewBatchRuns {
            user_id: user.as_str(),
            batch_id: batch_id.as_str(),
            ids: &run_ids,
            conversation_ids: &conversation_ids,
            custom_ids: &custom_ids,
        },
    )
    .await?;
    let message_ids: Vec<MessageId> = lines.iter().map(|_| MessageId::new()).collect();
    let message_ids: Vec<&str> = message_ids.iter().map(MessageId::as_str).collect();
    let contents: Vec<&str> = lines.iter().map(|l| l.message.as_str()).collect();
    messages::insert_user_many(
        &mut tx,
        messages::NewUserMessages {
            user_id: user.as_str(),
            ids: &message_ids,
            conversation_ids: &conversation_ids,
            run_ids: &run_ids,
            contents: &contents,
        },
    )
    .await?;
    let queued: Vec<Value> = conversation_ids
        .iter()
        .map(|conversation_id| json!({"conversation_id": conversation_id, "position": 0}))
        .collect();
    run_events::insert_first_many(&mut tx, &run_ids, EventKind::RunQueued, &queued).await?;
    if !given.is_empty() {
        conversations::touch_many(&mut tx, &given).await?;
    }
    tx.commit().await?;

    // After the commit nothing can lose a line: runs whose push failed stay queued for the
    // sweeper.
    let jobs: Vec<RunJob> = run_ids.iter().map(|id| RunJob::new(*id)).collect();
    if let Err((pushed, error)) = state.producer.push_many(QueueName::Batch, &jobs).await {
        tracing::warn!(batch_id = %batch_id, pushed, %error, "cannot enqueue the whole batch; the sweeper will");
    }
    tracing::info!(batch_id = %batch_id, user_id = %user, total, "batch accepted");
    get(state, user, &batch_id).await
}

/// The ids one batch's lines get. Run ids are monotonic in line order, so lines that continue
/// one conversation run in the order they were written.
struct LineIds {
    runs: Vec<RunId>,
    conversations: Vec<String>,
}

impl LineIds {
    fn new(lines: &[Line]) -> Self {
        let mut generator = ulid::Generator::new();
        let runs = lines
            .iter()
            .map(|_| {
                let ulid = generator.generate().unwrap_or_else(|_| ulid::Ulid::new());
                RunId::from_trusted(format!("{}{ulid}", RunId::PREFIX))
            })
            .collect();
        let conversations = lines
            .iter()
            .map(|line| match &line.conversation_id {
                Some(id) => id.as_str().to_owned(),
                None => ConversationId::new().as_str().to_owned(),
            })
            .collect();
        Self {
            runs,
            conversations,
        }
    }
}

/// The user's batch with its counts.
pub async fn get(state: &AppState, user: &UserId, id: &BatchId) -> Result<BatchView, ApiError> {
    let batch = batches::get(&state.db, user, id.as_str())
        .await?
        .ok_or(ApiError::NotFound("batch"))?;
    let ended = batch.completed + batch.failed + batch.cancelled;
    if batches::OPEN_STATUSES.contains(&batch.status.as_str()) && ended >= i64::from(batch.total) {
        // Every run ended but nobody settled the batch yet (its last worker died between its
        // commit and the settle): settle it now rather than at the next sweep.
        if batches::settle(&state.db, id.as_str()).await?.is_some() {
            let batch = batches::get(&state.db, user, id.as_str())
                .await?
                .ok_or(ApiError::NotFound("batch"))?;
            return Ok(view(user, batch));
        }
    }
    Ok(view(user, batch))
}

/// Batch cursors are `{created_at µs}.{id}`.
fn encode_cursor(batch: &BatchView) -> String {
    format!("{}.{}", batch.created_at.timestamp_micros(), batch.id)
}

fn decode_cursor(cursor: &str) -> Result<batches::ListCursor, ApiError> {
    let invalid = || ApiError::validation("cursor", "cursor is not one this API returned");
    let (micros, id) = cursor.split_once('.').ok_or_else(invalid)?;
    let micros: i64 = micros.parse().map_err(|_| invalid())?;
    let created_at = DateTime::from_timestamp_micros(micros).ok_or_else(invalid)?;
    let id = BatchId::parse(id).map_err(|_| invalid())?;
    Ok(batches::ListCursor {
        created_at,
        id: id.as_str().to_owned(),
    })
}

/// The user's batches, newest first.
pub async fn list(
    state: &AppState,
    user: &UserId,
    limit: i64,
    cursor: Option<&str>,
) -> Result<Page<BatchView>, ApiError> {
    let cursor = cursor.map(decode_cursor).transpose()?;
    let mut rows = batches::list(&state.db, user, limit + 1, cursor.as_ref()).await?;
    let more = rows.len() > usize::try_from(limit).unwrap_or(usize::MAX);
    rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
    let data: Vec<BatchView> = rows.into_iter().map(|b| view(user, b)).collect();
    let next_cursor = if more {
        data.last().map(encode_cursor)
    } else {
        None
    };
    Ok(Page { data, next_cursor })
}

/// Cancels the rest of a batch: its queued runs end `cancelled` at once (a worker that takes
/// one of their jobs finds nothing to do), running ones are asked to stop, and the batch is
/// `cancelling` until they have. Returns whether anything changed.
pub async fn cancel(
    state: &AppState,
    user: &UserId,
    id: &BatchId,
) -> Result<(bool, BatchView), ApiError> {
    let mut tx = state.db.begin().await?;
    let before = batches::request_cancel(&mut tx, user, id.as_str())
        .await?
        .ok_or(ApiError::NotFound("batch"))?;
    if before != "in_progress" {
        drop(tx);
        return Ok((false, get(state, user, id).await?));
    }
    let cancelled = batches::cancel_queued_runs(&mut tx, id.as_str(), None).await?;
    batches::request_cancel_running_runs(&mut tx, id.as_str()).await?;
    tx.commit().await?;
    batches::settle(&state.db, id.as_str()).await?;
    tracing::info!(batch_id = %id, user_id = %user, cancelled, "batch cancel requested");
    Ok((true, get(state, user, id).await?))
}

/// One line of the results.
#[derive(Debug, Serialize)]
struct ResultLine<'a> {
    custom_id: &'a str,
    run_id: &'a str,
    conversation_id: &'a str,
    status: &'a str,
    response: Response<'a>,
    error: Option<&'a Value>,
}

#[derive(Debug, Serialize)]
struct Response<'a> {
    text: Option<&'a str>,
    tool_calls: &'a Value,
}

/// The results of the batch's runs that have ended so far, as JSONL in `custom_id` order,
/// read from Postgres a page at a time while the client reads (never the whole in memory).
/// `404` before the first byte when the batch is not the user's.
pub async fn results(
    state: &AppState,
    user: &UserId,
    id: &BatchId,
) -> Result<impl Stream<Item = Result<Vec<u8>, sqlx::Error>> + Send + 'static, ApiError> {
    if batches::get(&state.db, user, id.as_str()).await?.is_none() {
        return Err(ApiError::NotFound("batch"));
    }
    let db = state.db.clone();
    let user = user.clone();
    let id = id.clone();
    Ok(async_stream::stream! {
        let mut after: Option<String> = None;
        loop {
            let rows = match batches::results_page(&db, &user, id.as_str(), after.as_deref(), RESULTS_PAGE).await {
                Ok(rows) => rows,
                Err(error) => {
                    tracing::warn!(batch_id = %id, %error, "cannot read the batch's results");
                    yield Err(error);
                    return;
                }
            };
            let last_page = rows.len() < usize::try_from(RESULTS_PAGE).unwrap_or(usize::MAX);
            let mut out = Vec::with_capacity(rows.len() * 256);
            for row in &rows {
                let line = ResultLine {
                    custom_id: &row.custom_id,
                    run_id: &row.run_id,
                    conversation_id: &row.conversation_id,
                    status: &row.status,
                    response: Response {
                        text: row.text.as_deref(),
                        tool_calls: &row.tool_calls,
                    },
                    error: row.error.as_ref(),
                };
                if serde_json::to_writer(&mut out, &line).is_ok() {
                    out.push(b'\n');
                }
            }
            after = rows.last().map(|r| r.custom_id.clone());
            if !out.is_empty() {
                yield Ok(out);
            }
            if last_page {
                return;
            }
        }
    })
}

/// Ends the queued runs of batches whose completion window is over (`expired`) and settles
/// every open batch whose runs have all ended. Called by the sweeper.
pub async fn sweep(state: &AppState) -> Result<(), sqlx::Error> {
    let error = expired_error();
    for batch_id in batches::past_deadline(&state.db, 100).await? {
        let mut tx = state.db.begin().await?;
        let expired = batches::cancel_queued_runs(&mut tx, &batch_id, Some(&error)).await?;
        tx.commit().await?;
        if expired > 0 {
            tracing::info!(
                batch_id,
                expired,
                "batch deadline passed; its queued lines expired"
            );
        }
    }
    for batch_id in batches::open(&state.db, 1_000).await? {
        if let Some(status) = batches::settle(&state.db, &batch_id).await? {
            tracing::info!(batch_id, status, "batch finished");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(query: &[(&str, &str)]) -> Result<BatchOptions, ApiError> {
        BatchOptions::from_query(query.iter().copied())
    }

    #[test]
    fn windows_are_bounded_whole_units() {
        assert_eq!(parse_window("24h"), Some(Duration::from_hours(24)));
        assert_eq!(parse_window("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_window("30d"), Some(Duration::from_hours(720)));
        for bad in ["", "h", "0h", "31d", "1.5h", "-1h", "10w", "10"] {
            assert_eq!(parse_window(bad), None, "{bad}");
        }
    }

    #[test]
    fn options_come_from_the_query() {
        let default = options(&[]).unwrap();
        assert_eq!(default.completion_window.0, "24h");
        assert_eq!(default.metadata, None);
        let given = options(&[("completion_window", "1h"), ("metadata.project", "x")]).unwrap();
        assert_eq!(given.completion_window.1, Duration::from_hours(1));
        assert_eq!(given.metadata, Some(json!({"project": "x"})));
        assert!(options(&[("bogus", "1")]).is_err());
        assert!(options(&[("metadata.", "1")]).is_err());
        assert!(options(&[("completion_window", "forever")]).is_err());
    }

    #[test]
    fn cursors_round_trip() {
        let id = BatchId::new();
        let cursor = format!("1700000000123456.{id}");
        let decoded = decode_cursor(&cursor).unwrap();
        assert_eq!(decoded.id, id.as_str());
        assert!(decode_cursor("x").is_err());
        assert!(decode_cursor("1.conv_x").is_err());
    }
}
