//! Postgres connection pool and schema migrations.
//!
//! Every binary migrates at start-up; sqlx takes a Postgres advisory lock for the duration, so
//! several processes starting at once apply each migration exactly once.
//!
//! Commit durability is chosen per process: the API and the MCP server commit synchronously
//! (what they acknowledge must survive a Postgres crash); a worker's routine writes — claiming a
//! run, heartbeats, the tool-call journal — commit asynchronously, because each of them is
//! either re-derivable or guarded elsewhere (see [`CommitMode::Asynchronous`]), and only the
//! final commit of a run, whose events a client sees, waits for the WAL flush
//! ([`begin_durable`]).

use std::time::Duration;

use sqlx::{
    Connection, Executor, Postgres, Transaction,
    postgres::{PgPool, PgPoolOptions},
};

/// Migrations embedded from the workspace's `migrations/` folder.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");

/// Errors from connecting to or migrating the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to Postgres (DATABASE_URL): {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// A pooled connection idle for longer than this is pinged before use.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// Opens a pool to `url` and applies pending migrations.
///
/// sqlx's default `test_before_acquire` pings every connection on every checkout: a full extra
/// round trip before each transaction, on a path (a chat turn) that is otherwise a handful of
/// statements. Here only a connection that sat idle for a while (when a Postgres restart may
/// have killed it) is pinged; a connection that dies while busy fails its statement and is
/// discarded by sqlx, and the caller's own retry takes over.
pub async fn connect_and_migrate(
    url: &str,
    max_connections: u32,
    commit: CommitMode,
) -> Result<PgPool, DbError> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .after_connect(move |conn, _meta| {
            Box::pin(async move {
                if commit == CommitMode::Asynchronous {
                    conn.execute("SET synchronous_commit = off").await?;
                }
                Ok(())
            })
        })
        .before_acquire(|conn, meta| {
            Box::pin(async move {
                if meta.idle_for >= PING_WHEN_IDLE_FOR {
                    conn.ping().await?;
                }
                Ok(true)
            })
        })
        .connect(url)
        .await
        .map_err(DbError::Connect)?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}

/// How a pool's transactions commit unless they say otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitMode {
    /// Every commit waits for its WAL record to reach the disk (Postgres's default).
    Synchronous,
    /// Commits return before the WAL flush (`synchronous_commit = off`). Only a crash of the
    /// Postgres server itself (not of a client) can lose such a commit, and only the last few
    /// hundred milliseconds of them; the database stays consistent. Writes that a client is
    /// told about must use [`begin_durable`].
    Asynchronous,
}

/// Begins a transaction in the pool's [`CommitMode`], on a live connection (see
/// [`begin_durable`]).
pub async fn begin(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    on_a_live_connection(|| pool.begin()).await
}

/// Begins a transaction whose commit waits for the WAL flush, whatever the pool's
/// [`CommitMode`] (the setting rides on the `BEGIN`, so it costs no extra round trip).
///
/// Pooled connections are pinged only after an idle second, so after a Postgres restart a
/// recently used connection may be dead; its `BEGIN` fails at once, sqlx discards it, and the
/// `BEGIN` is tried again on another connection (a few times: several may be dead). Callers
/// can then rely on a transaction that started on a working connection.
pub async fn begin_durable(pool: &PgPool) -> sqlx::Result<Transaction<'static, Postgres>> {
    on_a_live_connection(|| pool.begin_with("BEGIN; SET LOCAL synchronous_commit = on")).await
}

/// Dead connections a `BEGIN` skips before it gives up.
const DEAD_CONNECTIONS_SKIPPED: usize = 3;

async fn on_a_live_connection<T, F, Fut>(begin: F) -> sqlx::Result<T>
where
    F: Fn() -> Fut,
    Fut: Future<Output = sqlx::Result<T>>,
{
    let mut skipped = 0;
    loop {
        match begin().await {
            Err(sqlx::Error::Io(error)) if skipped < DEAD_CONNECTIONS_SKIPPED => {
                tracing::debug!(%error, "a pooled connection was dead; beginning on another");
                skipped += 1;
            }
            result => return result,
        }
    }
}
