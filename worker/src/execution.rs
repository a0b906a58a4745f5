//! Executing one run job: claim the run, run the agent, commit the outcome.
//!
//! Jobs arrive at least once, so everything here is idempotent: a finished run is acknowledged
//! untouched; each attempt bumps the run's `attempt`, and the final commit only lands if the
//! attempt is still the current one — a stale worker cannot overwrite a newer attempt.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::Duration,
};

use conveyor_shared::{
    domain::ErrorBody,
    events::{EventBus, EventError, RunEvent, StoredEvent},
    ids::{MessageId, RunId},
    queue::{JobError, JobProducer, QueueName, RunJob},
    run_control,
    store::{batches, messages, runs},
};
use serde_json::{Value, json};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{
    agent::{Agent, AgentOutput, Emitter, LlmError, RunScope, TurnError, history_messages},
    metrics::{TurnMetrics, TurnOutcome},
};

/// Attempts a run gets before a transient failure becomes final.
pub const MAX_RUN_ATTEMPTS: i32 = 5;
/// How often a running attempt says it is alive (and checks for a cancel request).
const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// How recently the event bus must have answered for a claim to skip pinging it.
const BUS_FRESH: Duration = Duration::from_secs(1);
/// A running run whose heartbeat is older than this may be taken over by another worker.
const CLAIM_STALE_AFTER: Duration = Duration::from_secs(10);

/// Executes run jobs; shared by all of a worker's consumers.
#[derive(Clone, Debug)]
pub struct RunExecutor {
    pub agent: Agent,
    pub db: conveyor_shared::db::Db,
    pub bus: EventBus,
    pub producer: JobProducer,
    pub worker_name: String,
    pub history_window: i64,
    pub delta_coalesce: Duration,
    pub turns: TurnMetrics,
}

/// How an attempt ended.
enum Outcome {
    Completed(AgentOutput),
    Failed(AgentOutput, ErrorBody),
    Cancelled(AgentOutput),
}

impl RunExecutor {
    /// The job handler.
    pub async fn handle(&self, job: RunJob) -> Result<(), JobError> {
        let Ok(run_id) = RunId::parse(&job.run_id) else {
            return Err(JobError::Abort(format!(
                "malformed run id {:?}",
                job.run_id
            )));
        };
        self.execute(&run_id).await.map_err(|error| {
            tracing::warn!(run_id = %run_id, %error, "run attempt failed; it will be retried");
            JobError::Retry(error.to_string())
        })
    }

    async fn execute(&self, run_id: &RunId) -> Result<(), ExecError> {
        // Claim only when the event bus answers. A claimed run whose first event cannot be
        // published stays locked to this failed attempt until its heartbeat is stale (10 s), and
        // the job's retries may run out meanwhile. The ping also replaces a bus connection that
        // died while this worker was idle (a Redis restart), which would otherwise fail exactly
        // that first event. A connection that answered within the last second is alive: the
        // ping would only cost the round trip.
        self.bus.ping_if_idle(BUS_FRESH).await?;
        let claim = runs::claim(
            &self.db,
            run_id.as_str(),
            &self.worker_name,
            CLAIM_STALE_AFTER.as_secs_f64(),
        )
        .await?;
        let Some(claim) = claim else {
            tracing::info!(run_id = %run_id, "job for a deleted run; acknowledged");
            return Ok(());
        };
        let Some(attempt) = claim.attempt else {
            return match claim.status.as_str() {
                "queued" if claim.cancel_requested => {
                    if run_control::cancel_queued(&self.db, &self.bus, run_id).await? {
                        self.enqueue_next(&claim.conversation_id).await;
                        self.settle_batch(claim.batch_id.as_deref()).await;
                    }
                    Ok(())
                }
                // Another worker holds it (a duplicate job). Come back later: if that worker
                // dies, its heartbeat goes stale and this job takes the run over.
                "running" => Err(ExecError::Transient(
                    "the run is held by another worker".to_owned(),
                )),
                // Queued behind an earlier run of its conversation (that run's end enqueues
                // it), or already finished (a duplicate job).
                _ => Ok(()),
            };
        };
        if claim.cancel_requested && claim.status == "running" {
            // Its worker died after the cancel was asked for, before it saw it: end it now
            // with what was committed (the dead attempt's answer is gone).
            if run_control::cancel_abandoned(&self.db, &self.bus, run_id).await? {
                tracing::info!(run_id = %run_id, "cancelled a run whose worker died");
                self.enqueue_next(&claim.conversation_id).await;
                self.settle_batch(claim.batch_id.as_deref()).await;
            }
            return Ok(());
        }
        let result = self.run_claimed(&claim, run_id, attempt).await;
        if result.is_err() {
            // Let the retry (or another worker) take the run at once instead of waiting for
            // this attempt's heartbeat to go stale.
            let released =
                runs::release(&self.db, run_id.as_str(), attempt, &self.worker_name).await;
            if let Err(error) = released {
                tracing::warn!(run_id = %run_id, %error, "cannot release the run");
            }
        }
        result
    }

    /// Runs a claimed attempt to its commit.
    async fn run_claimed(
        &self,
        run: &runs::Claim,
        run_id: &RunId,
        attempt: i32,
    ) -> Result<(), ExecError> {
        let started = Instant::now();
        let result = self.run_attempt(run, run_id, attempt).await;
        let outcome = match &result {
            Ok(outcome) => *outcome,
            Err(_) => TurnOutcome::Retried,
        };
        self.turns.finished(outcome, started.elapsed());
        result.map(drop)
    }

    /// The body of [`Self::run_claimed`]; says how the attempt ended.
    async fn run_attempt(
        &self,
        run: &runs::Claim,
        run_id: &RunId,
        attempt: i32,
    ) -> Result<TurnOutcome, ExecError> {
        let floor = u64::try_from(run.max_seq).unwrap_or(0);
        let mut emitter =
            Emitter::new(self.bus.clone(), run_id.clone(), floor, self.delta_coalesce);
        if run.status == "running" {
            // Taking over from a worker that died mid-run: clients drop its partial answer.
            let takeover = RunEvent::Retrying {
                attempt: attempt - 1,
                reason: "the worker running this turn stopped; resuming it".to_owned(),
                retry_in_ms: 0,
            };
            emitter.emit(&takeover).await?;
        }
        emitter
            .emit(&RunEvent::Started {
                attempt,
                worker: self.worker_name.clone(),
            })
            .await?;

        let history = messages::history_for_run(
            &self.db,
            &run.conversation_id,
            run_id.as_str(),
            self.history_window,
        )
        .await?;
        let scope = RunScope {
            run_id: run_id.as_str(),
            user_id: &run.user_id,
            conversation_id: &run.conversation_id,
            attempt,
        };
        let cancel = CancellationToken::new();
        let mut output = AgentOutput::default();
        let published = emitter.published_seq();
        let result = tokio::select! {
            result = self.agent.run(scope, history_messages(&history), &mut emitter, &cancel, &mut output) => result,
            stale = self.heartbeat(run_id, attempt, &published, &cancel) => return stale.map(|()| TurnOutcome::Retried),
        };
        let outcome = match result {
            Ok(()) => Outcome::Completed(output),
            Err(TurnError::Llm(LlmError::Cancelled)) => {
                output.text = emitter.current_text().to_owned();
                Outcome::Cancelled(output)
            }
            Err(TurnError::Llm(LlmError::Permanent { code, message })) => {
                Outcome::Failed(output, ErrorBody::new(code, message))
            }
            Err(TurnError::MaxTurns(n)) => Outcome::Failed(
                output,
                ErrorBody::new(
                    "max_turns_exceeded",
                    format!("the model asked for tools {n} times without answering"),
                ),
            ),
            Err(TurnError::Llm(LlmError::Transient { reason, .. }))
                if attempt >= MAX_RUN_ATTEMPTS =>
            {
                Outcome::Failed(
                    output,
                    ErrorBody::new(
                        "llm_unavailable",
                        format!("the model provider kept failing: {reason}"),
                    ),
                )
            }
            Err(error) => {
                let reason = error.to_string();
                let retry = RunEvent::Retrying {
                    attempt,
                    reason: reason.clone(),
                    retry_in_ms: u64::try_from(attempt).unwrap_or(1) * 1000,
                };
                // Best effort: the client learns the partial answer is void; the next attempt
                // starts over either way.
                let _ = emitter.emit(&retry).await;
                return Err(ExecError::Transient(reason));
            }
        };
        let ended = match &outcome {
            Outcome::Completed(_) => TurnOutcome::Completed,
            Outcome::Failed(..) => TurnOutcome::Failed,
            Outcome::Cancelled(_) => TurnOutcome::Cancelled,
        };
        self.commit(run, attempt, &mut emitter, outcome).await?;
        Ok(ended)
    }

    /// Keeps the run's heartbeat fresh while the attempt runs and turns a requested cancel
    /// into `cancel`. Returns only if the attempt was superseded (then its work is dropped).
    async fn heartbeat(
        &self,
        run_id: &RunId,
        attempt: i32,
        published: &AtomicU64,
        cancel: &CancellationToken,
    ) -> Result<(), ExecError> {
        loop {
            tokio::time::sleep(HEARTBEAT_INTERVAL).await;
            let last_seq = i64::try_from(published.load(Ordering::Relaxed)).unwrap_or(i64::MAX);
            let beat = runs::heartbeat(
                &self.db,
                run_id.as_str(),
                attempt,
                &self.worker_name,
                last_seq,
            );
            match beat.await {
                Ok(Some(true)) => cancel.cancel(),
                Ok(Some(false)) => {}
                Ok(None) => {
                    tracing::info!(run_id = %run_id, attempt, "attempt superseded; stopping it");
                    return Ok(());
                }
                Err(error) => tracing::warn!(run_id = %run_id, %error, "heartbeat failed"),
            }
        }
    }

    /// Commits messages, durable events and the final status in one transaction guarded by
    /// `attempt`, then publishes the terminal events.
    async fn commit(
        &self,
        run: &runs::Claim,
        attempt: i32,
        emitter: &mut Emitter,
        outcome: Outcome,
    ) -> Result<(), ExecError> {
        let run_id = emitter.run_id().clone();
        let (output, status) = match &outcome {
            Outcome::Completed(o) => (o, "completed"),
            Outcome::Failed(o, _) => (o, "failed"),
            Outcome::Cancelled(o) => (o, "cancelled"),
        };
        let message_id = MessageId::new();
        let mut terminal: Vec<RunEvent> = Vec::with_capacity(2);
        let final_text_status = match &outcome {
            Outcome::Completed(o) => {
                terminal.push(RunEvent::MessageCompleted {
                    message_id: message_id.clone(),
                    text: o.text.clone(),
                });
                terminal.push(RunEvent::Completed {
                    message_id: message_id.clone(),
                });
                Some("completed")
            }
            Outcome::Failed(_, error) => {
                terminal.push(RunEvent::Failed {
                    error: error.clone(),
                });
                None
            }
            Outcome::Cancelled(o) => {
                terminal.push(RunEvent::Cancelled);
                (!o.text.is_empty()).then_some("cancelled")
            }
        };
        emitter.flush().await?;
        // Begin on a live connection before reserving seqs: a commit that fails after the
        // reservation leaves a gap in the run's seqs.
        let mut tx = self.db.begin_durable().await?;
        let count = u32::try_from(terminal.len()).unwrap_or(2);
        let first = self.bus.reserve(&run_id, count, emitter.last_seq()).await?;
        let terminal: Vec<(u64, RunEvent)> = terminal
            .into_iter()
            .enumerate()
            .map(|(i, e)| (first + i as u64, e))
            .collect();

        let error = match &outcome {
            Outcome::Failed(_, error) => Some(serde_json::to_value(error).unwrap_or_default()),
            _ => None,
        };
        let answer = answer_messages(output, final_text_status, &message_id);
        let mut durable: Vec<StoredEvent> = emitter.durable().to_vec();
        durable.extend(terminal.iter().map(|(seq, e)| StoredEvent {
            seq: *seq,
            kind: e.kind(),
            data: e.data_json().into(),
        }));
        let end = runs::FinishedAttempt {
            id: run_id.as_str(),
            attempt,
            worker: &self.worker_name,
            status,
            error: error.as_ref(),
            messages: &answer,
            events: &durable,
        };
        if !runs::finish_attempt(&mut tx, end).await? {
            tracing::info!(run_id = %run_id, attempt, "stale attempt; its result is dropped");
            return Ok(());
        }
        tx.commit().await?;

        for (seq, event) in &terminal {
            self.bus.publish_at(&run_id, *seq, event).await?;
        }
        tracing::info!(run_id = %run_id, attempt, status, "run finished");
        self.enqueue_next(&run.conversation_id).await;
        self.settle_batch(run.batch_id.as_deref()).await;
        Ok(())
    }

    /// After a batch run ended: if it was the batch's last, give the batch its final status.
    /// Checked after the run's commit, so of two runs ending at once the later check sees both
    /// ended. A failure only delays it: the API's sweeper settles open batches too.
    async fn settle_batch(&self, batch_id: Option<&str>) {
        let Some(batch_id) = batch_id else { return };
        match batches::settle(&self.db, batch_id).await {
            Ok(Some(status)) => tracing::info!(batch_id, status, "batch finished"),
            Ok(None) => {}
            Err(error) => tracing::warn!(batch_id, %error, "cannot settle the batch"),
        }
    }

    /// Pushes the conversation's next queued run, which waited for this one to end. A failure
    /// only delays it: the API's sweeper pushes runs left queued.
    async fn enqueue_next(&self, conversation_id: &str) {
        let next = match runs::next_in_conversation(&self.db, conversation_id).await {
            Ok(Some(next)) => next,
            Ok(None) => return,
            Err(error) => {
                tracing::warn!(conversation_id, %error, "cannot look up the next run");
                return;
            }
        };
        let (run_id, batch_id) = next;
        let queue = if batch_id.is_some() {
            QueueName::Batch
        } else {
            QueueName::Chat
        };
        if let Err(error) = self
            .producer
            .push(queue, RunJob::new(run_id.as_str()))
            .await
        {
            tracing::warn!(run_id, %error, "cannot enqueue the next run of the conversation");
        }
    }
}

/// The messages an attempt adds to the conversation, in history order: per model step the
/// assistant message (its text and tool calls) and one tool message per call, then the final
/// answer when there is one (`final_status`).
fn answer_messages<'a>(
    output: &'a AgentOutput,
    final_status: Option<&'a str>,
    final_id: &'a MessageId,
) -> Vec<messages::NewMessage<'a>> {
    let base = messages::NewMessage {
        id: final_id.clone(),
        role: "assistant",
        content: "",
        tool_calls: json!([]),
        tool_call_id: None,
        status: Some("completed"),
    };
    let mut answer = Vec::new();
    for step in &output.steps {
        let calls: Vec<Value> = step
            .calls
            .iter()
            .map(|c| json!({"id": c.id, "name": c.name, "arguments": c.arguments}))
            .collect();
        answer.push(messages::NewMessage {
            id: MessageId::new(),
            content: &step.text,
            tool_calls: Value::Array(calls),
            ..base.clone()
        });
        for call in &step.calls {
            answer.push(messages::NewMessage {
                id: MessageId::new(),
                role: "tool",
                content: &call.outcome.text,
                tool_call_id: Some(&call.id),
                status: None,
                ..base.clone()
            });
        }
    }
    if let Some(status) = final_status {
        answer.push(messages::NewMessage {
            content: &output.text,
            status: Some(status),
            ..base
        });
    }
    answer
}

/// Why an attempt must be retried.
#[derive(Debug, thiserror::Error)]
enum ExecError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error(transparent)]
    Events(#[from] EventError),
    #[error(transparent)]
    Control(#[from] run_control::ControlError),
    #[error("{0}")]
    Transient(String),
}
