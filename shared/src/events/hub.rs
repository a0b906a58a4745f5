//! The API side of live events: one pub/sub subscription per process, fanned out to the SSE
//! clients of each run.
//!
//! A client registers for a run before it replays the Stream, so no event can fall between
//! the replay and the live feed; duplicates are dropped by seq on the client's side. When the
//! subscription drops (Redis restart) every client gets [`HubMessage::Resync`] after it is
//! back, and replays what it missed from the Stream.
//!
//! In the embedded mode ([`EventHub::local`]) there is no subscription: the process's
//! [`LocalBus`](super::LocalBus) hands each event to the hub right after buffering it, so the
//! fan-out and the client's side are the same.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use backon::BackoffBuilder;
use futures::StreamExt;
use tokio::sync::broadcast;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use super::{redis_bus::parse_published, types::StoredEvent};
use crate::ids::RunId;

/// What a run's subscribers receive.
#[derive(Debug, Clone)]
pub enum HubMessage {
    Event(Arc<StoredEvent>),
    /// Live delivery may have missed events: replay from the Stream.
    Resync,
}

/// Per-run fan-out of the process's single subscription. Cheap to clone.
#[derive(Clone, Debug)]
pub struct EventHub {
    runs: Arc<Mutex<HashMap<String, broadcast::Sender<HubMessage>>>>,
}

/// A client's registration for one run's live events; unregisters on drop.
#[derive(Debug)]
pub struct Subscription {
    rx: Option<broadcast::Receiver<HubMessage>>,
    run_id: String,
    hub: EventHub,
}

impl Subscription {
    /// The next live message; a lagging receiver gets `Resync` instead of the lost events.
    /// `None` when the hub shut down.
    pub async fn recv(&mut self) -> Option<HubMessage> {
        let rx = self.rx.as_mut()?;
        match rx.recv().await {
            Ok(message) => Some(message),
            Err(broadcast::error::RecvError::Lagged(_)) => Some(HubMessage::Resync),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        drop(self.rx.take());
        let mut runs = self
            .hub
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if runs
            .get(&self.run_id)
            .is_some_and(|tx| tx.receiver_count() == 0)
        {
            runs.remove(&self.run_id);
        }
    }
}

impl EventHub {
    /// Starts the subscriber task on `tracker`; it reconnects with backoff until `shutdown`.
    pub fn start(
        redis_url: &str,
        channel: String,
        tracker: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Result<Self, redis::RedisError> {
        let client = crate::backends::redis_client(redis_url)?;
        let hub = Self {
            runs: Arc::default(),
        };
        let task_hub = hub.clone();
        tracker.spawn(async move {
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = task_hub.subscribe_forever(client, channel) => {}
            }
            // Dropping the senders ends every subscriber's stream.
            task_hub.lock().clear();
        });
        Ok(hub)
    }

    /// A hub fed in-process by the embedded mode's [`LocalBus`](super::LocalBus): no
    /// subscriber task. When `shutdown` is cancelled every subscription ends, as with
    /// [`Self::start`]; the task that waits for it belongs to `tracker`.
    pub fn local(tracker: &TaskTracker, shutdown: CancellationToken) -> Self {
        let hub = Self {
            runs: Arc::default(),
        };
        let task_hub = hub.clone();
        tracker.spawn(async move {
            shutdown.cancelled().await;
            task_hub.lock().clear();
        });
        hub
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, broadcast::Sender<HubMessage>>> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Registers for `run_id`'s live events.
    pub fn subscribe(&self, run_id: &RunId) -> Subscription {
        let rx = self
            .lock()
            .entry(run_id.to_string())
            .or_insert_with(|| broadcast::channel(1024).0)
            .subscribe();
        Subscription {
            rx: Some(rx),
            run_id: run_id.to_string(),
            hub: self.clone(),
        }
    }

    /// Runs registered right now (a gauge for metrics).
    pub fn active_runs(&self) -> usize {
        self.lock().len()
    }

    async fn subscribe_forever(&self, client: redis::Client, channel: String) {
        let mut delays = backoff();
        loop {
            match client.get_async_pubsub().await {
                Ok(mut pubsub) => match pubsub.subscribe(&channel).await {
                    Ok(()) => {
                        delays = backoff();
                        tracing::info!(%channel, "event subscription up");
                        // Anything published while we were away is only in the Streams.
                        self.broadcast_resync();
                        let mut messages = pubsub.on_message();
                        while let Some(msg) = messages.next().await {
                            self.dispatch(msg.get_payload_bytes());
                        }
                        tracing::warn!(%channel, "event subscription lost; reconnecting");
                    }
                    Err(error) => tracing::warn!(%error, "cannot subscribe to events"),
                },
                Err(error) => tracing::warn!(%error, "cannot connect to Redis for events"),
            }
            self.broadcast_resync();
            tokio::time::sleep(delays.next().unwrap_or(Duration::from_secs(5))).await;
        }
    }

    fn dispatch(&self, payload: &[u8]) {
        let Ok(payload) = std::str::from_utf8(payload) else {
            return;
        };
        let Some((run_id, event)) = parse_published(payload) else {
            tracing::warn!("ignoring a malformed event message");
            return;
        };
        self.deliver(run_id, event);
    }

    /// Hands `event` to the subscribers of `run_id`, if it has any.
    pub(crate) fn deliver(&self, run_id: &str, event: StoredEvent) {
        let tx = self.lock().get(run_id).cloned();
        if let Some(tx) = tx {
            let _ = tx.send(HubMessage::Event(Arc::new(event)));
        }
    }

    fn broadcast_resync(&self) {
        for tx in self.lock().values() {
            let _ = tx.send(HubMessage::Resync);
        }
    }
}

fn backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(50))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
