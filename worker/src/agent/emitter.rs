//! A run attempt's event writer: publishes events in order, remembers the durable ones for
//! the final commit, and coalesces text deltas.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use conveyor_shared::{
    events::{EventBus, EventError, RunEvent, StoredEvent},
    ids::{RunId, Seq},
};
use tokio::time::Instant;

/// Publishes one attempt's events.
pub struct Emitter {
    bus: EventBus,
    run_id: RunId,
    last_seq: Seq,
    /// `last_seq`, readable by the attempt's heartbeat while the agent loop holds the emitter.
    published: Arc<AtomicU64>,
    durable: Vec<StoredEvent>,
    coalesce: Duration,
    pending: String,
    flush_at: Option<Instant>,
    /// Whether this LLM call has published any text (a retry must then say so).
    streamed: bool,
    /// The text of the current LLM call so far (kept as the partial answer on cancel).
    current_text: String,
}

impl Emitter {
    /// `floor`: the highest seq Postgres knows for the run.
    pub fn new(bus: EventBus, run_id: RunId, floor: Seq, coalesce: Duration) -> Self {
        Self {
            bus,
            run_id,
            last_seq: floor,
            published: Arc::new(AtomicU64::new(floor)),
            durable: Vec::new(),
            coalesce,
            pending: String::new(),
            flush_at: None,
            streamed: false,
            current_text: String::new(),
        }
    }

    pub fn run_id(&self) -> &RunId {
        &self.run_id
    }

    pub fn bus(&self) -> &EventBus {
        &self.bus
    }

    /// The highest seq this attempt has used.
    pub fn last_seq(&self) -> Seq {
        self.last_seq
    }

    /// A live view of [`Self::last_seq`] for another task.
    pub fn published_seq(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.published)
    }

    /// Durable events of this attempt, for `run_events`.
    pub fn durable(&self) -> &[StoredEvent] {
        &self.durable
    }

    /// Publishes an event (after any pending text).
    pub async fn emit(&mut self, event: &RunEvent) -> Result<Seq, EventError> {
        self.flush().await?;
        self.publish(event).await
    }

    async fn publish(&mut self, event: &RunEvent) -> Result<Seq, EventError> {
        let seq = self.bus.publish(&self.run_id, event, self.last_seq).await?;
        self.last_seq = seq;
        self.published.store(seq, Ordering::Relaxed);
        if event.kind().is_durable() {
            self.durable.push(StoredEvent {
                seq,
                kind: event.kind(),
                data: event.data_json().into(),
            });
        }
        Ok(seq)
    }

    /// Buffers a text delta; it goes out at [`Self::flush_deadline`] or with the next event.
    pub fn push_text(&mut self, text: &str) {
        if text.is_empty() {
            return;
        }
        self.pending.push_str(text);
        self.current_text.push_str(text);
        if self.flush_at.is_none() {
            self.flush_at = Some(Instant::now() + self.coalesce);
        }
    }

    /// When buffered text must be sent.
    pub fn flush_deadline(&self) -> Option<Instant> {
        self.flush_at
    }

    /// Sends buffered text as one `message.delta`.
    pub async fn flush(&mut self) -> Result<(), EventError> {
        self.flush_at = None;
        if self.pending.is_empty() {
            return Ok(());
        }
        let text = std::mem::take(&mut self.pending);
        self.publish(&RunEvent::Delta { text }).await?;
        self.streamed = true;
        Ok(())
    }

    /// Starts a new LLM call: reports whether the previous one had published text (unsent
    /// text is dropped), and resets.
    pub fn take_streamed(&mut self) -> bool {
        self.pending.clear();
        self.current_text.clear();
        self.flush_at = None;
        std::mem::take(&mut self.streamed)
    }

    /// The text the current LLM call has streamed so far.
    pub fn current_text(&self) -> &str {
        &self.current_text
    }
}
