//! Adapts the application's job handler to an apalis service, and maps its outcome to what
//! apalis-redis does next.
//!
//! apalis-redis's result script reschedules every failed job up to 25 times (attempt N waits N
//! seconds) and ignores the task's `max_attempts`; only an [`AbortError`] (status `Killed`)
//! goes straight to the dead set. So the retry budget is enforced here: a
//! [`JobError::Retry`] becomes a plain error (rescheduled) while attempts remain and an
//! `AbortError` once they are used up; a [`JobError::Abort`] is always an `AbortError`.
//!
//! Each handler runs on its own tokio task (so one worker's jobs use every core) that belongs to
//! the worker's [`TaskTracker`]; the task is aborted when apalis drops the job's future (the
//! worker stopped on an error, or the shutdown deadline passed), so no handler outlives its
//! worker. A panicking handler counts as a transient failure.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    task::{Context, Poll},
};

use apalis::prelude::{AbortError, BoxDynError, Task};
use futures::future::BoxFuture;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use super::{JobError, QueueName, RunJob, metrics::ConsumerMetrics};

/// The apalis service of one queue's worker.
pub(crate) struct JobService<H> {
    pub(crate) handler: H,
    pub(crate) queue: QueueName,
    pub(crate) max_attempts: usize,
    pub(crate) tracker: TaskTracker,
    pub(crate) metrics: Arc<ConsumerMetrics>,
    /// Jobs apalis has handed to this service; the shutdown drain compares it with the jobs
    /// apalis has finished with.
    pub(crate) dispatched: Arc<AtomicUsize>,
}

impl<H, Fut> tower::Service<Task<Value>> for JobService<H>
where
    H: Fn(RunJob) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), JobError>> + Send + 'static,
{
    type Response = ();
    type Error = BoxDynError;
    type Future = BoxFuture<'static, Result<(), BoxDynError>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Concurrency is limited by the worker's `.concurrency(n)` layer in front of us.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, task: Task<Value>) -> Self::Future {
        self.dispatched.fetch_add(1, Ordering::Relaxed);
        let handler = self.handler.clone();
        let queue = self.queue;
        let max_attempts = self.max_attempts;
        let tracker = self.tracker.clone();
        let metrics = Arc::clone(&self.metrics);
        let task_id = task.ctx().task_id().map(ToString::to_string);
        // apalis bumps this shared counter when it first polls the returned future, so it is read
        // inside: 1 on the first delivery.
        let attempt = task.ctx().raw_attempt().clone();
        let payload = task.args;

        Box::pin(async move {
            let attempt = attempt.current();
            let job: RunJob = match serde_json::from_value(payload) {
                Ok(job) => job,
                Err(error) => {
                    metrics.job_dead();
                    tracing::error!(%queue, task_id, %error, "undecodable job dead-lettered");
                    return Err(AbortError::new(error).into());
                }
            };
            let span = tracing::info_span!(
                "job",
                %queue,
                run_id = %job.run_id,
                attempt,
                task_id,
            );
            metrics.job_started();
            let busy = metrics.busy(queue);
            let outcome = OwnedTask(tracker.spawn(handler(job).instrument(span.clone()))).await;
            drop(busy);

            let _entered = span.enter();
            let reason = match outcome {
                Ok(Ok(())) => {
                    metrics.job_succeeded();
                    return Ok(());
                }
                Ok(Err(JobError::Abort(reason))) => {
                    metrics.job_dead();
                    tracing::warn!(%reason, "job aborted; not retrying");
                    return Err(AbortError::new(reason).into());
                }
                Ok(Err(JobError::Retry(reason))) => reason,
                Err(join_error) => format!("handler task failed: {join_error}"),
            };
            if attempt >= max_attempts {
                metrics.job_dead();
                tracing::error!(%reason, max_attempts, "job failed on its last attempt; giving up");
                Err(AbortError::new(format!("gave up after {attempt} attempts: {reason}")).into())
            } else {
                metrics.job_retried();
                tracing::warn!(%reason, retry_in_s = attempt, "job failed; retrying");
                Err(reason.into())
            }
        })
    }
}

/// A handler task that is aborted if whoever awaits it goes away.
struct OwnedTask<T>(JoinHandle<T>);

impl<T> Future for OwnedTask<T> {
    type Output = Result<T, tokio::task::JoinError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.0).poll(cx)
    }
}

impl<T> Drop for OwnedTask<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}
