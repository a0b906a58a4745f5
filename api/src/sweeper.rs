//! The sweeper: Postgres is the source of truth, so runs that Postgres says are waiting but
//! that no queue may hold — a push that failed after the commit, a Redis that lost its data,
//! a worker that died mid-run — are pushed again. Duplicate jobs are harmless: a worker only
//! claims a run that is queued or whose worker went silent.

use std::time::Duration;

use conveyor_shared::{
    queue::{QueueName, RunJob},
    store::runs,
};
use tokio_util::sync::CancellationToken;

use crate::state::AppState;

/// How long a run may sit `queued` before the sweeper pushes it again.
const QUEUED_GRACE: Duration = Duration::from_secs(30);
/// A running run whose worker has not sent a heartbeat for this long is re-enqueued.
pub const RUNNING_STALE: Duration = Duration::from_secs(15);
/// Batch runs pushed again per sweep, at most.
const BATCH_SWEEP_CHUNK: i64 = 5_000;

/// Sweeps every `interval` until `shutdown`.
pub async fn run(state: AppState, interval: Duration, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        if let Err(error) = sweep(&state).await {
            tracing::warn!(%error, "sweep failed");
        }
        if let Err(error) = sweep_batch_queue(&state).await {
            tracing::warn!(%error, "batch queue sweep failed");
        }
        if let Err(error) = crate::services::batches::sweep(&state).await {
            tracing::warn!(%error, "batch sweep failed");
        }
    }
}

/// Batch runs wait in their queue for as long as the batch takes, so "queued for a while" does
/// not mean lost. Only when the batch queue holds no job at all can nothing be carrying the
/// batch runs Postgres still calls queued (a push that failed, a Redis that lost its data);
/// then they are pushed again, a chunk per sweep.
async fn sweep_batch_queue(state: &AppState) -> Result<(), SweepError> {
    if state.producer.pending(QueueName::Batch).await? > 0 {
        return Ok(());
    }
    let due =
        runs::queued_batch_runs(&state.db, QUEUED_GRACE.as_secs_f64(), BATCH_SWEEP_CHUNK).await?;
    if due.is_empty() {
        return Ok(());
    }
    let jobs: Vec<RunJob> = due.iter().map(|id| RunJob::new(id.as_str())).collect();
    state
        .producer
        .push_many(QueueName::Batch, &jobs)
        .await
        .map_err(|(_, error)| error)?;
    tracing::info!(runs = jobs.len(), "sweeper re-enqueued batch runs");
    Ok(())
}

/// Why a sweep of the batch queue failed.
#[derive(Debug, thiserror::Error)]
enum SweepError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("queue: {0}")]
    Queue(#[from] conveyor_shared::queue::QueueError),
}

async fn sweep(state: &AppState) -> Result<(), sqlx::Error> {
    let due = runs::due_for_sweep(
        &state.db,
        QUEUED_GRACE.as_secs_f64(),
        RUNNING_STALE.as_secs_f64(),
        500,
    )
    .await?;
    for (run_id, batch_id) in due {
        let queue = if batch_id.is_some() {
            QueueName::Batch
        } else {
            QueueName::Chat
        };
        match state
            .producer
            .push(queue, RunJob::new(run_id.as_str()))
            .await
        {
            Ok(()) => tracing::info!(run_id, "sweeper re-enqueued a run"),
            Err(error) => {
                tracing::warn!(run_id, %error, "sweeper cannot enqueue");
                break;
            }
        }
    }
    Ok(())
}
