//! What is waiting in the queues, read from apalis-redis's keys for the metrics.
//!
//! A pushed job sits in the queue's scheduled set (apalis-redis schedules every push, at "now"
//! for a plain push) until a fetch moves it to the active list, and a failed job goes back to
//! the scheduled set for its retry time. So "waiting" is the active list plus every scheduled
//! job that is due, "scheduled" the retries whose time has not come. Job ids are ULIDs, so the
//! oldest waiting job's age comes from its id (its first push) or, for a due scheduled job,
//! from its score.

use redis::aio::ConnectionLike;

use super::{QueueError, QueueName};

/// One queue's backlog.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QueueStats {
    pub queue: QueueName,
    /// Jobs a worker could take now.
    pub waiting: u64,
    /// Retries waiting for their time.
    pub scheduled: u64,
    /// Jobs given up on.
    pub dead: u64,
    /// Seconds since the oldest waiting job was pushed (0 when none waits).
    pub oldest_age_secs: f64,
}

/// What one pipeline reads: the active list's length and head, due and later scheduled jobs,
/// the first due one, the dead set's size.
type Readings = (u64, Option<String>, u64, u64, Vec<(String, f64)>, u64);

/// Reads one queue's backlog in one round trip.
pub(crate) async fn read(
    conn: &mut impl ConnectionLike,
    config: &apalis_redis::Config,
    queue: QueueName,
) -> Result<QueueStats, QueueError> {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
    // apalis-redis scores are whole seconds.
    let now_secs = now_ms / 1000;
    let scheduled = config.scheduled_jobs_set();
    let active = config.active_jobs_list();
    let (active_len, head, due, later, first_due, dead): Readings = redis::pipe()
        .llen(&active)
        .lindex(&active, 0)
        .zcount(&scheduled, "-inf", now_secs)
        .zcount(&scheduled, format!("({now_secs}"), "+inf")
        .zrangebyscore_limit_withscores(&scheduled, "-inf", now_secs, 0, 1)
        .zcard(config.dead_jobs_set())
        .query_async(conn)
        .await?;
    let head_pushed_ms = head
        .and_then(|id| ulid::Ulid::from_string(&id).ok())
        .map(|id| id.timestamp_ms());
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "scores are whole seconds since the epoch"
    )]
    let due_pushed_ms = first_due.first().map(|(_, score)| *score as u64 * 1000);
    let oldest = [head_pushed_ms, due_pushed_ms].into_iter().flatten().min();
    #[expect(
        clippy::cast_precision_loss,
        reason = "an age in milliseconds fits an f64 exactly"
    )]
    let oldest_age_secs = oldest.map_or(0.0, |ms| now_ms.saturating_sub(ms) as f64 / 1000.0);
    Ok(QueueStats {
        queue,
        waiting: active_len + due,
        scheduled: later,
        dead,
        oldest_age_secs,
    })
}
