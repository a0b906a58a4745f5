//! The embedded mode's event bus: the replay buffer is the SQLite file's `event_buffer` table,
//! the live feed an in-process [`EventHub`].
//!
//! It keeps the Redis bus's contract ([`super::RedisBus`]) with no Redis:
//!
//! - **Seqs.** One counter per run, in memory: `publish` takes `max(counter, floor) + 1`,
//!   `reserve` takes a block of `n` the same way, `publish_at` writes at a reserved seq without
//!   touching the counter. A counter starts, on the run's first use in this process, from the
//!   highest seq the file holds for the run: its buffered events, and its `run_events` (events
//!   reserved and committed, whose publish a stopped process never made). The file is the one
//!   the caller's floor comes from, so unlike Redis a counter cannot be lost while the run
//!   goes on, and no safety gap is added.
//! - **Order.** A publish holds the bus's order lock from taking its seq, through writing the
//!   row, to handing the event to the hub, so the buffer and the live feed see the events of a
//!   run in the same order. One lock for all runs: SQLite takes one writer at a time anyway.
//!   `reserve` writes nothing and does not take the lock, because callers reserve inside their
//!   own open write transaction, which a publish waiting for SQLite's write lock would
//!   otherwise deadlock against. (For the same reason nobody may *publish* while holding a
//!   write transaction on the file: the publish would wait for that transaction's lock.)
//!   A publish that fails hands its seq back; one whose future is dropped half-way may leave a
//!   gap, never a duplicate.
//! - **Expiry.** As with the Stream's TTL: a live run's rows expire 24 hours after they are
//!   written (a safety net for runs that never end), and a terminal event moves all of the
//!   run's rows to `finished_ttl` from then. Expired rows are deleted by
//!   [`LocalBus::delete_expired`] (one `DELETE` by the `event_buffer_expiry` index), which the
//!   bus runs itself after writing a terminal event, at most once a minute. No timer task: only
//!   finishing runs make rows expire, so a bus with no run finishing has nothing new to delete;
//!   until the next sweep, an expired run still replays (harmless: it is the same data). The
//!   counters of runs whose rows expired are forgotten in the same step.
//! - **Restart.** The buffer is in the file, written before each live delivery, so after a
//!   restart a client that resumes replays everything after its cursor, deltas included, and
//!   the counters continue from the file.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use sqlx::SqlitePool;
use tokio::time::Instant;

use super::{
    EventError,
    hub::EventHub,
    types::{EventKind, RunEvent, StoredEvent},
};
use crate::ids::{RunId, Seq};

/// How long a live run's rows are kept, as on Redis: a safety net for runs that never end.
const LIVE_TTL: Duration = Duration::from_hours(24);

/// The least time between two deletions of expired rows.
const SWEEP_EVERY: Duration = Duration::from_mins(1);

/// The event bus of the embedded mode (see the module docs). Cheap to clone.
#[derive(Clone)]
pub struct LocalBus {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    hub: EventHub,
    finished_ttl: Duration,
    /// Held by a publish from its seq to its live delivery.
    order: tokio::sync::Mutex<()>,
    counters: Mutex<HashMap<String, Counter>>,
    last_sweep: Mutex<Option<Instant>>,
}

/// One run's counter.
#[derive(Debug, Clone, Copy)]
struct Counter {
    /// The last seq handed out.
    last: Seq,
    /// When it is forgotten: with the run's rows.
    expires: Instant,
}

impl std::fmt::Debug for LocalBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalBus")
            .field("finished_ttl", &self.inner.finished_ttl)
            .finish_non_exhaustive()
    }
}

impl LocalBus {
    pub(crate) fn new(pool: SqlitePool, hub: EventHub, finished_ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                pool,
                hub,
                finished_ttl,
                order: tokio::sync::Mutex::new(()),
                counters: Mutex::default(),
                last_sweep: Mutex::default(),
            }),
        }
    }

    /// Buffers and delivers `event` with the run's next seq, at least `floor + 1`.
    pub async fn publish(
        &self,
        run_id: &RunId,
        event: &RunEvent,
        floor: Seq,
    ) -> Result<Seq, EventError> {
        let kind = event.kind();
        let data: Arc<str> = event.data_json().into();
        let order = self.inner.order.lock().await;
        let seq = self.take(run_id, floor, 1, self.ttl(kind)).await?;
        if let Err(error) = self.append(run_id, seq, kind, &data).await {
            self.give_back(run_id, seq);
            return Err(error);
        }
        self.inner
            .hub
            .deliver(run_id.as_str(), StoredEvent { seq, kind, data });
        drop(order);
        self.after_append(kind).await;
        Ok(seq)
    }

    /// Buffers and delivers `event` at `seq`, obtained from [`Self::reserve`].
    pub async fn publish_at(
        &self,
        run_id: &RunId,
        seq: Seq,
        event: &RunEvent,
    ) -> Result<(), EventError> {
        let kind = event.kind();
        let data: Arc<str> = event.data_json().into();
        let order = self.inner.order.lock().await;
        self.append(run_id, seq, kind, &data).await?;
        if let Some(counter) = self.counters().get_mut(run_id.as_str()) {
            counter.expires = Instant::now() + self.ttl(kind);
        }
        self.inner
            .hub
            .deliver(run_id.as_str(), StoredEvent { seq, kind, data });
        drop(order);
        self.after_append(kind).await;
        Ok(())
    }

    /// Reserves `n` consecutive seqs, the first at least `floor + 1`, and returns the first.
    pub async fn reserve(&self, run_id: &RunId, n: u32, floor: Seq) -> Result<Seq, EventError> {
        self.take(run_id, floor, Seq::from(n), LIVE_TTL).await
    }

    /// The run's buffered events after `after` (exclusive), in seq order, or `None` when the
    /// run has no rows (never published, or expired and deleted).
    pub async fn read_after(
        &self,
        run_id: &RunId,
        after: Seq,
    ) -> Result<Option<Vec<StoredEvent>>, EventError> {
        let rows: Vec<(i64, String, String)> = sqlx::query_as(
            "SELECT seq, kind, data FROM event_buffer WHERE run_id = ? AND seq > ? ORDER BY seq",
        )
        .bind(run_id.as_str())
        .bind(i64::try_from(after).unwrap_or(i64::MAX))
        .fetch_all(&self.inner.pool)
        .await?;
        if rows.is_empty() {
            let exists: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM event_buffer WHERE run_id = ?)")
                    .bind(run_id.as_str())
                    .fetch_one(&self.inner.pool)
                    .await?;
            if !exists {
                return Ok(None);
            }
        }
        rows.into_iter()
            .map(|(seq, kind, data)| {
                let malformed = || EventError::Malformed(format!("run {run_id} seq {seq}"));
                Ok(StoredEvent {
                    seq: Seq::try_from(seq).map_err(|_| malformed())?,
                    kind: kind.parse().map_err(|_| malformed())?,
                    data: data.into(),
                })
            })
            .collect::<Result<Vec<_>, _>>()
            .map(Some)
    }

    /// Whether the file answers.
    pub async fn ping(&self) -> Result<(), EventError> {
        sqlx::query("SELECT 1").execute(&self.inner.pool).await?;
        Ok(())
    }

    /// Answers at once: there is no connection that could have died while idle.
    #[expect(
        clippy::unused_async,
        reason = "the same signature as the Redis bus's, which does wait"
    )]
    pub async fn ping_if_idle(&self, _fresh: Duration) -> Result<(), EventError> {
        Ok(())
    }

    /// Deletes the rows whose `expires_at` has passed and forgets the counters that expired
    /// with them; returns the rows deleted. The bus runs it itself (see the module docs); an
    /// embedding program may also call it, say at start-up.
    pub async fn delete_expired(&self) -> Result<u64, EventError> {
        let now = Instant::now();
        self.counters().retain(|_, counter| counter.expires > now);
        let deleted = sqlx::query(
            "DELETE FROM event_buffer WHERE expires_at IS NOT NULL \
             AND expires_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
        )
        .execute(&self.inner.pool)
        .await?;
        Ok(deleted.rows_affected())
    }

    fn counters(&self) -> MutexGuard<'_, HashMap<String, Counter>> {
        self.inner
            .counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// How long a run's rows (and counter) live after an event of `kind`.
    fn ttl(&self, kind: EventKind) -> Duration {
        if kind.is_terminal() {
            self.inner.finished_ttl
        } else {
            LIVE_TTL
        }
    }

    /// Takes `n` seqs from the run's counter (starting it from the file if this process has
    /// none) and returns the first.
    async fn take(
        &self,
        run_id: &RunId,
        floor: Seq,
        n: Seq,
        ttl: Duration,
    ) -> Result<Seq, EventError> {
        loop {
            let stored = if self.counters().contains_key(run_id.as_str()) {
                None
            } else {
                Some(self.highest_stored(run_id).await?)
            };
            let mut counters = self.counters();
            let known = counters.get(run_id.as_str()).map(|counter| counter.last);
            // A counter started meanwhile by another caller is at least what we read.
            let Some(last) = known.or(stored) else {
                // Forgotten between the check and now: read the file again.
                continue;
            };
            let first = last.max(floor).saturating_add(1);
            counters.insert(
                run_id.to_string(),
                Counter {
                    last: (first - 1).saturating_add(n),
                    expires: Instant::now() + ttl,
                },
            );
            return Ok(first);
        }
    }

    /// Undoes the [`Self::take`] of `seq` by a publish that failed, unless seqs were taken after
    /// it.
    fn give_back(&self, run_id: &RunId, seq: Seq) {
        if let Some(counter) = self.counters().get_mut(run_id.as_str())
            && counter.last == seq
        {
            counter.last = seq - 1;
        }
    }

    /// The highest seq the file holds for the run, buffered or committed (0 if none).
    async fn highest_stored(&self, run_id: &RunId) -> Result<Seq, EventError> {
        let highest: i64 = sqlx::query_scalar(
            "SELECT max(coalesce((SELECT max(seq) FROM event_buffer WHERE run_id = ?), 0), \
                        coalesce((SELECT max(seq) FROM run_events WHERE run_id = ?), 0))",
        )
        .bind(run_id.as_str())
        .bind(run_id.as_str())
        .fetch_one(&self.inner.pool)
        .await?;
        Ok(Seq::try_from(highest).unwrap_or(0))
    }

    /// Writes one event to the buffer. A terminal event also sets the expiry of all the run's
    /// rows, in the same transaction.
    async fn append(
        &self,
        run_id: &RunId,
        seq: Seq,
        kind: EventKind,
        data: &str,
    ) -> Result<(), EventError> {
        let seq = i64::try_from(seq)
            .map_err(|_| EventError::Malformed(format!("seq {seq} out of range")))?;
        // An SQLite date modifier: the row expires this long after now.
        let ttl = format!("+{:.3} seconds", self.ttl(kind).as_secs_f64());
        let insert = sqlx::query(
            "INSERT INTO event_buffer (run_id, seq, kind, data, expires_at) \
             VALUES (?, ?, ?, ?, strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?))",
        )
        .bind(run_id.as_str())
        .bind(seq)
        .bind(kind.as_str())
        .bind(data)
        .bind(&ttl);
        if !kind.is_terminal() {
            insert.execute(&self.inner.pool).await?;
            return Ok(());
        }
        let mut tx = self.inner.pool.begin_with("BEGIN IMMEDIATE").await?;
        insert.execute(&mut *tx).await?;
        sqlx::query(
            "UPDATE event_buffer SET expires_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now', ?) \
             WHERE run_id = ?",
        )
        .bind(&ttl)
        .bind(run_id.as_str())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }

    /// After a terminal event: deletes expired rows, if the last sweep was a while ago.
    async fn after_append(&self, kind: EventKind) {
        if !kind.is_terminal() || !self.sweep_due() {
            return;
        }
        match self.delete_expired().await {
            Ok(0) => {}
            Ok(rows) => tracing::debug!(rows, "deleted expired buffered events"),
            Err(error) => tracing::warn!(%error, "cannot delete expired buffered events"),
        }
    }

    fn sweep_due(&self) -> bool {
        let mut last = self
            .inner
            .last_sweep
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let now = Instant::now();
        if last.is_some_and(|at| now.duration_since(at) < SWEEP_EVERY) {
            return false;
        }
        *last = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use tokio_util::{sync::CancellationToken, task::TaskTracker};

    use super::*;
    use crate::{
        db::{CommitMode, Db},
        domain::ErrorBody,
        events::{EventBus, HubMessage},
    };

    /// A fresh SQLite file, migrated, removed (with its WAL files) when dropped.
    struct TempFile {
        path: PathBuf,
    }

    impl TempFile {
        fn new() -> Self {
            let name = format!("conveyor-bus-{}.sqlite", ulid::Ulid::new());
            Self {
                path: std::env::temp_dir().join(name),
            }
        }

        async fn open(&self) -> SqlitePool {
            let url = format!("sqlite:{}", self.path.display());
            match Db::connect(&url, 4, CommitMode::Synchronous).await {
                Ok(Db::Sqlite(pool)) => pool,
                Ok(Db::Postgres(_)) => unreachable!("a sqlite: URL opens SQLite"),
                Err(error) => panic!("cannot open {url}: {error}"),
            }
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            for suffix in ["", "-wal", "-shm"] {
                let mut path = self.path.clone().into_os_string();
                path.push(suffix);
                let _ = std::fs::remove_file(path);
            }
        }
    }

    /// A bus, its hub, and what stops the hub.
    struct Fixture {
        bus: EventBus,
        hub: EventHub,
        pool: SqlitePool,
        tracker: TaskTracker,
        shutdown: CancellationToken,
    }

    impl Fixture {
        fn new(pool: &SqlitePool, finished_ttl: Duration) -> Self {
            let tracker = TaskTracker::new();
            let shutdown = CancellationToken::new();
            let hub = EventHub::local(&tracker, shutdown.clone());
            let bus = EventBus::local(pool.clone(), hub.clone(), finished_ttl);
            Self {
                bus,
                hub,
                pool: pool.clone(),
                tracker,
                shutdown,
            }
        }

        fn local(&self) -> &LocalBus {
            match &self.bus {
                EventBus::Local(bus) => bus,
                EventBus::Redis(_) => unreachable!("built with EventBus::local"),
            }
        }

        async fn seqs(&self, run: &RunId) -> Vec<Seq> {
            self.bus
                .read_after(run, 0)
                .await
                .unwrap()
                .unwrap_or_default()
                .iter()
                .map(|e| e.seq)
                .collect()
        }
    }

    fn started() -> RunEvent {
        RunEvent::Started {
            attempt: 1,
            worker: "test".to_owned(),
        }
    }

    fn delta(text: &str) -> RunEvent {
        RunEvent::Delta {
            text: text.to_owned(),
        }
    }

    fn failed() -> RunEvent {
        RunEvent::Failed {
            error: ErrorBody {
                code: "internal".to_owned(),
                message: "test".to_owned(),
            },
        }
    }

    /// Polls `check` until it holds, failing after a few seconds.
    async fn eventually<F, Fut>(what: &str, mut check: F)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = bool>,
    {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !check().await {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn seqs_follow_the_counter_and_never_fall_below_the_floor() {
        let file = TempFile::new();
        let t = Fixture::new(&file.open().await, Duration::from_mins(1));
        let run = RunId::new();
        // A new run: seq 1, then on from the counter even when the floor is lower.
        assert_eq!(t.bus.publish(&run, &started(), 0).await.unwrap(), 1);
        assert_eq!(t.bus.publish(&run, &started(), 0).await.unwrap(), 2);
        // A floor above the counter wins.
        assert_eq!(t.bus.publish(&run, &started(), 7).await.unwrap(), 8);
        // Reserving hands out a block; the next event follows it.
        assert_eq!(t.bus.reserve(&run, 2, 0).await.unwrap(), 9);
        assert_eq!(t.bus.publish(&run, &started(), 0).await.unwrap(), 11);
        // A reserve honours the floor too.
        assert_eq!(t.bus.reserve(&run, 1, 20).await.unwrap(), 21);
        // Reserved seqs are written where they were reserved.
        t.bus.publish_at(&run, 9, &delta("a")).await.unwrap();
        t.bus.publish_at(&run, 10, &delta("b")).await.unwrap();
        t.bus.publish_at(&run, 21, &failed()).await.unwrap();
        assert_eq!(t.seqs(&run).await, [1, 2, 8, 9, 10, 11, 21]);
        // Each run has its own counter.
        let other = RunId::new();
        assert_eq!(t.bus.publish(&other, &started(), 0).await.unwrap(), 1);
    }

    #[tokio::test]
    async fn a_seq_is_written_once() {
        let file = TempFile::new();
        let t = Fixture::new(&file.open().await, Duration::from_mins(1));
        let run = RunId::new();
        let seq = t.bus.reserve(&run, 1, 0).await.unwrap();
        t.bus.publish_at(&run, seq, &started()).await.unwrap();
        let again = t.bus.publish_at(&run, seq, &delta("x")).await;
        assert!(matches!(again, Err(EventError::Sqlite(_))), "{again:?}");
        let events = t.bus.read_after(&run, 0).await.unwrap().unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::RunStarted);
    }

    #[tokio::test]
    async fn read_after_is_exclusive_ordered_and_none_without_a_buffer() {
        let file = TempFile::new();
        let t = Fixture::new(&file.open().await, Duration::from_mins(1));
        let run = RunId::new();
        assert_eq!(t.bus.read_after(&run, 0).await.unwrap(), None);
        // Written out of order (a reserved block published after a later event)…
        let first = t.bus.reserve(&run, 2, 0).await.unwrap();
        let later = t.bus.publish(&run, &delta("c"), 0).await.unwrap();
        t.bus
            .publish_at(&run, first + 1, &delta("b"))
            .await
            .unwrap();
        t.bus.publish_at(&run, first, &delta("a")).await.unwrap();
        // …and read back in seq order, with the data as published.
        let events = t.bus.read_after(&run, 0).await.unwrap().unwrap();
        let seqs: Vec<Seq> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [1, 2, later]);
        assert_eq!(&*events[0].data, delta("a").data_json());
        assert_eq!(events[0].kind, EventKind::MessageDelta);
        let after_one = t.bus.read_after(&run, 1).await.unwrap().unwrap();
        assert_eq!(after_one.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        // Past the end: an empty buffer, not a missing one.
        assert_eq!(t.bus.read_after(&run, 3).await.unwrap(), Some(Vec::new()));
        assert_eq!(
            t.bus.read_after(&run, u64::MAX).await.unwrap(),
            Some(Vec::new())
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscriber_sees_the_events_live_in_the_buffers_order() {
        let file = TempFile::new();
        let t = Fixture::new(&file.open().await, Duration::from_mins(1));
        let run = RunId::new();
        let mut live = t.hub.subscribe(&run);
        // Two writers at once, as a worker's emitter and a cancel would be.
        let mut writers = tokio::task::JoinSet::new();
        for writer in 0..2 {
            let (bus, run) = (t.bus.clone(), run.clone());
            writers.spawn(async move {
                for i in 0..25 {
                    bus.publish(&run, &delta(&format!("{writer}:{i}")), 0)
                        .await
                        .unwrap();
                }
            });
        }
        writers.join_all().await;
        t.bus.publish(&run, &failed(), 0).await.unwrap();

        let mut seen = Vec::new();
        while seen.len() < 51 {
            let message = tokio::time::timeout(Duration::from_secs(5), live.recv())
                .await
                .expect("live events within 5 s");
            match message {
                Some(HubMessage::Event(event)) => seen.push(StoredEvent::clone(&event)),
                other => panic!("expected an event, got {other:?}"),
            }
        }
        let buffered = t.bus.read_after(&run, 0).await.unwrap().unwrap();
        assert_eq!(seen, buffered, "live order is buffer order");
        assert_eq!(
            seen.iter().map(|e| e.seq).collect::<Vec<_>>(),
            (1..=51).collect::<Vec<_>>()
        );
        assert!(seen[50].kind.is_terminal());
        // Another run's subscriber hears nothing of this run.
        let mut quiet = t.hub.subscribe(&RunId::new());
        t.bus.publish(&run, &delta("late"), 0).await.unwrap();
        assert!(
            tokio::time::timeout(Duration::from_millis(50), quiet.recv())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn stopping_the_hub_ends_its_subscriptions() {
        let file = TempFile::new();
        let t = Fixture::new(&file.open().await, Duration::from_mins(1));
        let mut live = t.hub.subscribe(&RunId::new());
        assert_eq!(t.hub.active_runs(), 1);
        t.shutdown.cancel();
        let ended = tokio::time::timeout(Duration::from_secs(5), live.recv())
            .await
            .expect("the subscription ends within 5 s");
        assert!(ended.is_none());
        t.tracker.close();
        t.tracker.wait().await;
    }

    #[tokio::test]
    async fn the_buffer_and_the_counters_survive_a_restart() {
        let file = TempFile::new();
        let run = RunId::new();
        {
            let t = Fixture::new(&file.open().await, Duration::from_mins(1));
            for text in ["a", "b", "c"] {
                t.bus.publish(&run, &delta(text), 0).await.unwrap();
            }
            t.pool.close().await;
        }

        // A new process on the same file: a resumed client replays everything…
        let t = Fixture::new(&file.open().await, Duration::from_mins(1));
        let events = t.bus.read_after(&run, 1).await.unwrap().unwrap();
        assert_eq!(events.iter().map(|e| e.seq).collect::<Vec<_>>(), [2, 3]);
        assert_eq!(&*events[1].data, delta("c").data_json());
        // …and the run's seqs go on where they stopped, even with a lower floor.
        assert_eq!(t.bus.publish(&run, &delta("d"), 1).await.unwrap(), 4);
        assert_eq!(t.bus.reserve(&run, 2, 0).await.unwrap(), 5);
        assert_eq!(t.bus.publish(&run, &delta("e"), 0).await.unwrap(), 7);
    }

    #[tokio::test]
    async fn a_counter_starts_above_events_committed_but_never_published() {
        let file = TempFile::new();
        let pool = file.open().await;
        let run = RunId::new();
        // A process reserved 2 and 3, committed them with the run, and stopped before
        // publishing them.
        sqlx::query("INSERT INTO conversations (id, user_id) VALUES ('conv_test', 'u')")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query(
            "INSERT INTO runs (id, user_id, conversation_id, status, finished_at) \
             VALUES (?, 'u', 'conv_test', 'failed', 'now')",
        )
        .bind(run.as_str())
        .execute(&pool)
        .await
        .unwrap();
        for (seq, kind) in [(2, "message.completed"), (3, "run.failed")] {
            sqlx::query("INSERT INTO run_events (run_id, seq, kind, data) VALUES (?, ?, ?, '{}')")
                .bind(run.as_str())
                .bind(seq)
                .bind(kind)
                .execute(&pool)
                .await
                .unwrap();
        }
        let t = Fixture::new(&pool, Duration::from_mins(1));
        assert_eq!(t.bus.publish(&run, &delta("x"), 0).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn expiry_deletes_only_expired_rows() {
        let file = TempFile::new();
        let pool = file.open().await;
        // Two buses on one file, to have two finished-run TTLs.
        let short = Fixture::new(&pool, Duration::from_millis(1));
        let long = Fixture::new(&pool, Duration::from_hours(1));
        // Only the explicit calls below delete: the buses swept a moment ago.
        for t in [&short, &long] {
            *t.local().inner.last_sweep.lock().unwrap() = Some(Instant::now());
        }
        let (ended, kept, live) = (RunId::new(), RunId::new(), RunId::new());
        for (t, run) in [(&short, &ended), (&long, &kept)] {
            t.bus.publish(run, &started(), 0).await.unwrap();
            t.bus.publish(run, &delta("a"), 0).await.unwrap();
            t.bus.publish(run, &failed(), 0).await.unwrap();
        }
        short.bus.publish(&live, &delta("a"), 0).await.unwrap();

        // The rows of the run that ended with the short TTL go, all of them; nothing else.
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut deleted = 0;
        while deleted < 3 {
            assert!(
                Instant::now() < deadline,
                "the ended run's rows were not deleted"
            );
            deleted += short.local().delete_expired().await.unwrap();
            if deleted < 3 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        assert_eq!(deleted, 3);
        assert_eq!(short.bus.read_after(&ended, 0).await.unwrap(), None);
        assert_eq!(long.seqs(&kept).await, [1, 2, 3]);
        assert_eq!(short.seqs(&live).await, [1]);
        // The expired run's counter is forgotten with its rows; a later event starts from the
        // caller's floor.
        assert_eq!(short.bus.publish(&ended, &delta("b"), 3).await.unwrap(), 4);
    }

    #[tokio::test]
    async fn a_terminal_event_sweeps_expired_rows_at_most_once_a_minute() {
        let file = TempFile::new();
        let t = Fixture::new(&file.open().await, Duration::from_millis(1));
        let forget_last_sweep = || t.local().inner.last_sweep.lock().unwrap().take();
        let first = RunId::new();
        t.bus.publish(&first, &failed(), 0).await.unwrap();
        // Another run's end sweeps the first run's rows once they expired.
        eventually("the first run's rows are swept", || async {
            forget_last_sweep();
            t.bus.publish(&RunId::new(), &failed(), 0).await.unwrap();
            t.bus.read_after(&first, 0).await.unwrap().is_none()
        })
        .await;

        // Right after a sweep, the next end does not sweep again.
        let second = RunId::new();
        t.bus.publish(&second, &failed(), 0).await.unwrap();
        eventually("the second run's rows expire", || async {
            sqlx::query_scalar::<_, bool>(
                "SELECT expires_at <= strftime('%Y-%m-%dT%H:%M:%fZ', 'now') \
                 FROM event_buffer WHERE run_id = ?",
            )
            .bind(second.as_str())
            .fetch_one(&t.pool)
            .await
            .unwrap()
        })
        .await;
        t.bus.publish(&RunId::new(), &failed(), 0).await.unwrap();
        assert_eq!(t.seqs(&second).await, [1], "swept again within the minute");
    }
}
