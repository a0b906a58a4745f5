//! `run_events`: the durable copy of a finished run's events (all but text deltas).

use serde_json::Value;
use sqlx::types::Json;

use crate::{
    db::Ex,
    events::{EventKind, StoredEvent},
    per_db,
};

/// Stores events (ignoring ones already stored: a retried commit is harmless).
pub async fn insert_many(
    ex: impl Into<Ex<'_>>,
    run_id: &str,
    events: &[StoredEvent],
) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => {
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
            .execute(e)
            .await
            .map(drop)
        },
        sqlite(e) => sqlx::query(
            r"INSERT INTO run_events (run_id, seq, kind, data)
              SELECT ?1, value ->> 'seq', value ->> 'kind', json(value -> 'data')
              FROM json_each(?2) WHERE true
              ON CONFLICT DO NOTHING",
        )
        .bind(run_id)
        .bind(Json(rows(events)))
        .execute(e)
        .await
        .map(drop),
    )
}

/// Events as the arrays of an `UNNEST($seqs::bigint[], $kinds::text[], $data::jsonb[])`.
pub(crate) fn columns(events: &[StoredEvent]) -> (Vec<i64>, Vec<&str>, Vec<Value>) {
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

/// Events as the JSON array of `{seq, kind, data}` objects a SQLite `json_each` reads.
pub(crate) fn rows(events: &[StoredEvent]) -> Vec<Value> {
    events
        .iter()
        .map(|e| {
            serde_json::json!({
                "seq": e.seq,
                "kind": e.kind.as_str(),
                "data": serde_json::from_str::<Value>(&e.data).unwrap_or_default(),
            })
        })
        .collect()
}

/// Stores the first event (seq 1) of many runs at once: a batch's `run.queued` events.
pub async fn insert_first_many(
    ex: impl Into<Ex<'_>>,
    run_ids: &[&str],
    kind: EventKind,
    data: &[Value],
) -> sqlx::Result<()> {
    per_db!(ex,
        pg(e) => sqlx::query!(
            r#"INSERT INTO run_events (run_id, seq, kind, data)
               SELECT run_id, 1, $1, data FROM UNNEST($2::text[], $3::jsonb[]) AS t(run_id, data)"#,
            kind.as_str(),
            run_ids as &[&str],
            data
        )
        .execute(e)
        .await
        .map(drop),
        sqlite(e) => sqlx::query(
            r"INSERT INTO run_events (run_id, seq, kind, data)
              SELECT r.value, 1, ?1, json(d.value)
              FROM json_each(?2) r JOIN json_each(?3) d ON d.key = r.key",
        )
        .bind(kind.as_str())
        .bind(Json(run_ids))
        .bind(Json(data))
        .execute(e)
        .await
        .map(drop),
    )
}

/// A stored event row, before its kind is parsed.
#[derive(sqlx::FromRow)]
struct EventRow {
    seq: i64,
    kind: String,
    data: Value,
}

/// A run's stored events in order.
pub async fn list(ex: impl Into<Ex<'_>>, run_id: &str) -> sqlx::Result<Vec<StoredEvent>> {
    let rows: Vec<EventRow> = per_db!(ex,
        pg(e) => sqlx::query_as!(
            EventRow,
            "SELECT seq, kind, data FROM run_events WHERE run_id = $1 ORDER BY seq",
            run_id
        )
        .fetch_all(e)
        .await?,
        sqlite(e) => sqlx::query_as("SELECT seq, kind, data FROM run_events WHERE run_id = ?1 ORDER BY seq")
            .bind(run_id)
            .fetch_all(e)
            .await?,
    );
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
pub async fn max_seq(ex: impl Into<Ex<'_>>, run_id: &str) -> sqlx::Result<u64> {
    let max: Option<i64> = per_db!(ex,
        pg(e) => sqlx::query_scalar!("SELECT max(seq) FROM run_events WHERE run_id = $1", run_id)
            .fetch_one(e)
            .await?,
        sqlite(e) => sqlx::query_scalar("SELECT max(seq) FROM run_events WHERE run_id = ?1")
            .bind(run_id)
            .fetch_one(e)
            .await?,
    );
    Ok(max.and_then(|m| u64::try_from(m).ok()).unwrap_or(0))
}
