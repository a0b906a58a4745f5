//! `run_events`: the durable copy of a finished run's events (all but text deltas).

use sqlx::{PgConnection, PgExecutor};

use crate::events::{EventKind, StoredEvent};

/// Stores events (ignoring ones already stored: a retried commit is harmless).
pub async fn insert_many(
    conn: &mut PgConnection,
    run_id: &str,
    events: &[StoredEvent],
) -> sqlx::Result<()> {
    let (seqs, kinds, data) = columns(events);
    sqlx::query!(
        r#"INSERT INTO run_events (run_id, seq, kind, data)
           SELECT $1, * FROM UNNEST($2::bigint[], $3::text[], $4::jsonb[])
           ON CONFLICT DO NOTHING"#,
        run_id,
        &seqs,
        &kinds as &[&str],
        &data
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// Events as the arrays of an `UNNEST($seqs::bigint[], $kinds::text[], $data::jsonb[])`.
pub(crate) fn columns(events: &[StoredEvent]) -> (Vec<i64>, Vec<&str>, Vec<serde_json::Value>) {
    let seqs = events
        .iter()
        .map(|e| i64::try_from(e.seq).unwrap_or(i64::MAX))
        .collect();
    let kinds = events.iter().map(|e| e.kind.as_str()).collect();
    let data = events
        .iter()
        .map(|e| serde_json::from_str(&e.data).unwrap_or_default())
        .collect();
    (seqs, kinds, data)
}

/// Stores the first event (seq 1) of many runs at once: a batch's `run.queued` events.
pub async fn insert_first_many(
    conn: &mut PgConnection,
    run_ids: &[&str],
    kind: EventKind,
    data: &[serde_json::Value],
) -> sqlx::Result<()> {
    sqlx::query!(
        r#"INSERT INTO run_events (run_id, seq, kind, data)
           SELECT run_id, 1, $1, data FROM UNNEST($2::text[], $3::jsonb[]) AS t(run_id, data)"#,
        kind.as_str(),
        run_ids as &[&str],
        data
    )
    .execute(conn)
    .await?;
    Ok(())
}

/// A run's stored events in order.
pub async fn list(conn: impl PgExecutor<'_>, run_id: &str) -> sqlx::Result<Vec<StoredEvent>> {
    let rows = sqlx::query!(
        "SELECT seq, kind, data FROM run_events WHERE run_id = $1 ORDER BY seq",
        run_id
    )
    .fetch_all(conn)
    .await?;
    Ok(rows
        .into_iter()
        .filter_map(|row| {
            Some(StoredEvent {
                seq: u64::try_from(row.seq).ok()?,
                kind: row.kind.parse::<EventKind>().ok()?,
                data: row.data.to_string().into(),
            })
        })
        .collect())
}

/// The highest stored seq of a run (0 when none).
pub async fn max_seq(conn: impl PgExecutor<'_>, run_id: &str) -> sqlx::Result<u64> {
    let max = sqlx::query_scalar!("SELECT max(seq) FROM run_events WHERE run_id = $1", run_id)
        .fetch_one(conn)
        .await?;
    Ok(max.and_then(|m| u64::try_from(m).ok()).unwrap_or(0))
}
