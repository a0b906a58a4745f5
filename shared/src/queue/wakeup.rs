//! Fast idle pickup: a pub/sub listener that wakes the apalis worker of a queue.
//!
//! apalis only fetches when its worker is polled; after an empty fetch nothing polls it again
//! until its heartbeat (or an interval strategy) fires. Polling every few milliseconds gives low
//! latency but costs hundreds of Redis round trips per second per idle worker. Instead:
//!
//! - the producer `PUBLISH`es on the queue's "available" channel after each push;
//! - each consumer process holds **one** pub/sub connection ([`listen`]), reconnecting with
//!   backoff and pinging to notice a dead link, and bumps the [`QueueSignal`] of the queue a
//!   message names;
//! - the queue's [`WakeStrategy`] wakes the worker, which fetches at once.
//!
//! A wake-up can arrive while a fetch that started *before* the push is still in flight; that
//! fetch comes back empty and the wake-up would be lost. So the strategy registers its waker
//! before it checks the signal, and checks again [`RECHECK_AFTER_WAKE`] after every wake-up. A
//! fallback tick (default 1 s) covers everything without a message: lost pub/sub messages
//! (Redis restarts), retries and orphaned jobs that become due, and producers' clock skew (the
//! fetch script promotes a job once the consumer's clock reaches the producer's second).

use std::{
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use apalis::prelude::{PollSnapshot, PollStrategy};
use backon::{BackoffBuilder, ExponentialBuilder};
use futures::{StreamExt, task::AtomicWaker};
use tokio::time::{Instant, Sleep};
use tokio_util::sync::CancellationToken;

use super::metrics::ConsumerMetrics;

/// How long after a wake-up the strategy fetches once more (see the module docs).
pub(crate) const RECHECK_AFTER_WAKE: Duration = Duration::from_millis(5);
/// How often the listener pings its pub/sub connection, and how long it waits for the answer.
const PING_EVERY: Duration = Duration::from_secs(15);
const PING_TIMEOUT: Duration = Duration::from_secs(5);

/// "Something may have arrived on this queue": a counter plus the waker of the queue's worker.
#[derive(Debug, Default)]
pub(crate) struct QueueSignal {
    seq: AtomicU64,
    waker: AtomicWaker,
}

impl QueueSignal {
    pub(crate) fn notify(&self) {
        self.seq.fetch_add(1, Ordering::Release);
        self.waker.wake();
    }
}

/// The apalis poll strategy of one queue: wake on a signal, re-check shortly after, and tick.
///
/// apalis's `PollWith` calls [`PollStrategy::poll_drive`] before every fetch attempt and fetches
/// whatever it returns; the strategy's job is to leave a waker registered for every reason to
/// fetch again.
pub(crate) struct WakeStrategy {
    signal: Arc<QueueSignal>,
    seen: u64,
    fallback: Duration,
    tick: Pin<Box<Sleep>>,
    recheck: Option<Pin<Box<Sleep>>>,
}

impl WakeStrategy {
    pub(crate) fn new(signal: Arc<QueueSignal>, fallback: Duration) -> Self {
        let seen = signal.seq.load(Ordering::Acquire);
        Self {
            signal,
            seen,
            fallback,
            tick: Box::pin(tokio::time::sleep(fallback)),
            recheck: None,
        }
    }
}

impl PollStrategy for WakeStrategy {
    fn poll_drive(&mut self, cx: &mut Context<'_>, _: &PollSnapshot) -> Poll<Option<()>> {
        // Register first: a notify() after this point wakes us even if we miss its increment.
        self.signal.waker.register(cx.waker());
        let mut due = false;

        let seq = self.signal.seq.load(Ordering::Acquire);
        if seq != self.seen {
            self.seen = seq;
            self.recheck = Some(Box::pin(tokio::time::sleep(RECHECK_AFTER_WAKE)));
            due = true;
        }
        if let Some(recheck) = self.recheck.as_mut()
            && recheck.as_mut().poll(cx).is_ready()
        {
            self.recheck = None;
            due = true;
        }
        // Re-arm until the timer is pending again, so its waker stays registered.
        while self.tick.as_mut().poll(cx).is_ready() {
            self.tick.as_mut().reset(Instant::now() + self.fallback);
            due = true;
        }

        if due {
            Poll::Ready(Some(()))
        } else {
            Poll::Pending
        }
    }
}

/// Keeps one pub/sub connection subscribed to the queues' wake channels until `shutdown`.
///
/// Reconnects with backoff when the connection breaks or stops answering pings. After every
/// (re)subscribe all queues are signalled once, since messages sent while we were not
/// subscribed are gone.
pub(crate) async fn listen(
    client: redis::Client,
    routes: Vec<(String, Arc<QueueSignal>)>,
    metrics: Arc<ConsumerMetrics>,
    shutdown: CancellationToken,
) {
    let channels: Vec<&str> = routes.iter().map(|(channel, _)| channel.as_str()).collect();
    let mut backoff = reconnect_backoff();
    loop {
        let subscribe = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(&channels).await?;
            Ok::<_, redis::RedisError>(pubsub)
        };
        let pubsub = tokio::select! {
            () = shutdown.cancelled() => return,
            pubsub = subscribe => pubsub,
        };
        match pubsub {
            Ok(pubsub) => {
                tracing::debug!(?channels, "listening for queue wake-ups");
                backoff = reconnect_backoff();
                for (_, signal) in &routes {
                    signal.notify();
                }
                let (mut sink, mut messages) = pubsub.split();
                let mut ping_timer =
                    tokio::time::interval_at(Instant::now() + PING_EVERY, PING_EVERY);
                loop {
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        message = messages.next() => {
                            let Some(message) = message else {
                                tracing::warn!("queue wake-up connection closed; reconnecting");
                                break;
                            };
                            let channel = message.get_channel_name();
                            if let Some((_, signal)) = routes.iter().find(|(c, _)| c == channel) {
                                metrics.wakeup();
                                signal.notify();
                            }
                        }
                        _ = ping_timer.tick() => {
                            let pong = tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await;
                            if !matches!(pong, Ok(Ok(_))) {
                                tracing::warn!("queue wake-up connection stopped answering; reconnecting");
                                break;
                            }
                        }
                    }
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot subscribe to queue wake-ups; retrying");
            }
        }
        let delay = backoff.next().unwrap_or(Duration::from_secs(5));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::new()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
