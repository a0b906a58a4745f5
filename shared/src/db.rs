//! The database: Postgres in production, or one SQLite file in the embedded mode
//! (`conveyor dev`), chosen by the URL's scheme. [`Db`] is the pool, [`Tx`] a transaction and
//! [`Ex`] whatever a store function runs on (a pool or a transaction); a store function holds
//! one statement per database side by side ([`per_db!`](crate::per_db)) around shared logic.
//!
//! Every binary migrates at start-up; sqlx takes a Postgres advisory lock for the duration, so
//! several processes starting at once apply each migration exactly once. SQLite's schema is
//! `migrations/sqlite/`, the same tables in SQLite's words.
//!
//! Commit durability is chosen per process: the API and the MCP server commit synchronously
//! (what they acknowledge must survive a Postgres crash); a worker's routine writes — claiming a
//! run, heartbeats, the tool-call journal — commit asynchronously, because each of them is
//! either re-derivable or guarded elsewhere (see [`CommitMode::Asynchronous`]), and only the
//! final commit of a run, whose events a client sees, waits for the WAL flush
//! ([`Db::begin_durable`]).
//!
//! SQLite runs in WAL mode with `synchronous = NORMAL`: a commit survives the process being
//! killed (what the embedded mode must survive), not a power cut. It has one writer at a time,
//! so its transactions begin `IMMEDIATE` (take the write lock up front: a transaction that read
//! first and wrote later could otherwise fail with "database is locked" instead of waiting),
//! and its lock-then-check steps need no row locks.

use std::{str::FromStr, time::Duration};

use sqlx::{
    Connection, Executor, PgConnection, Postgres, Sqlite, SqliteConnection, Transaction,
    postgres::{PgPool, PgPoolOptions},
    sqlite::{
        SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
    },
};

/// Postgres migrations, embedded from the workspace's `migrations/` folder.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations");
/// SQLite migrations, embedded from `migrations/sqlite/`.
pub static SQLITE_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../migrations/sqlite");

/// Errors from connecting to or migrating the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to the database (DATABASE_URL): {0}")]
    Connect(#[source] sqlx::Error),
    #[error("cannot apply migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("DATABASE_URL must start with postgres://, postgresql:// or sqlite: (got {0:?})")]
    Scheme(String),
}

/// A connection pool to the configured database. Cheap to clone.
#[derive(Debug, Clone)]
pub enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// An open transaction on a [`Db`]; dropped without [`Tx::commit`], it rolls back.
#[derive(Debug)]
pub enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// What a store function runs its statement on: a pool (autocommit) or a transaction.
#[derive(Debug)]
pub enum Ex<'c> {
    PgPool(&'c PgPool),
    Pg(&'c mut PgConnection),
    SqlitePool(&'c SqlitePool),
    Sqlite(&'c mut SqliteConnection),
}

impl<'c> From<&'c Db> for Ex<'c> {
    fn from(db: &'c Db) -> Self {
        match db {
            Db::Postgres(pool) => Self::PgPool(pool),
            Db::Sqlite(pool) => Self::SqlitePool(pool),
        }
    }
}

impl<'c> From<&'c mut Tx> for Ex<'c> {
    fn from(tx: &'c mut Tx) -> Self {
        match tx {
            Tx::Postgres(tx) => Self::Pg(tx),
            Tx::Sqlite(tx) => Self::Sqlite(tx),
        }
    }
}

impl<'c> From<&'c PgPool> for Ex<'c> {
    fn from(pool: &'c PgPool) -> Self {
        Self::PgPool(pool)
    }
}

impl<'c> From<&'c mut PgConnection> for Ex<'c> {
    fn from(conn: &'c mut PgConnection) -> Self {
        Self::Pg(conn)
    }
}

impl<'c> From<&'c SqlitePool> for Ex<'c> {
    fn from(pool: &'c SqlitePool) -> Self {
        Self::SqlitePool(pool)
    }
}

impl<'c> From<&'c mut SqliteConnection> for Ex<'c> {
    fn from(conn: &'c mut SqliteConnection) -> Self {
        Self::Sqlite(conn)
    }
}

impl<'c, 'r> From<&'r mut Ex<'c>> for Ex<'r> {
    /// Reborrows, so one executor can run several statements.
    fn from(ex: &'r mut Ex<'c>) -> Self {
        match ex {
            Ex::PgPool(pool) => Self::PgPool(pool),
            Ex::Pg(conn) => Self::Pg(conn),
            Ex::SqlitePool(pool) => Self::SqlitePool(pool),
            Ex::Sqlite(conn) => Self::Sqlite(conn),
        }
    }
}

/// Runs one statement on an [`Ex`]: `per_db!(ex, pg(e) => postgres_statement,
/// sqlite(e) => sqlite_statement)`. Each arm is written once and instantiated for a pool and for
/// a transaction; `e` is the sqlx executor.
///
/// SQLite has no data-modifying CTEs, so a Postgres statement that changes several tables
/// becomes several SQLite statements: `sqlite_tx(c) => …` runs them on `c: &mut
/// SqliteConnection` inside the caller's transaction, or in one of its own (`BEGIN IMMEDIATE`,
/// committed when the arm returns `Ok`) when called on the pool. Such a function must return
/// `sqlx::Result`.
#[macro_export]
macro_rules! per_db {
    ($ex:expr, pg($pg:ident) => $pg_body:expr, sqlite($lite:ident) => $lite_body:expr $(,)?) => {
        match ::core::convert::Into::<$crate::db::Ex<'_>>::into($ex) {
            $crate::db::Ex::PgPool($pg) => $pg_body,
            $crate::db::Ex::Pg($pg) => $pg_body,
            $crate::db::Ex::SqlitePool($lite) => $lite_body,
            $crate::db::Ex::Sqlite($lite) => $lite_body,
        }
    };
    ($ex:expr, pg($pg:ident) => $pg_body:expr, sqlite_tx($lite:ident) => $lite_body:expr $(,)?) => {
        match ::core::convert::Into::<$crate::db::Ex<'_>>::into($ex) {
            $crate::db::Ex::PgPool($pg) => $pg_body,
            $crate::db::Ex::Pg($pg) => $pg_body,
            $crate::db::Ex::SqlitePool(pool) => {
                let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
                let result = {
                    let $lite: &mut ::sqlx::SqliteConnection = &mut tx;
                    $lite_body
                };
                if result.is_ok() {
                    tx.commit().await?;
                }
                result
            }
            $crate::db::Ex::Sqlite($lite) => $lite_body,
        }
    };
}

impl Db {
    /// Opens a pool to `url` (`postgres://…` or `sqlite:PATH`) and applies pending migrations.
    pub async fn connect(
        url: &str,
        max_connections: u32,
        commit: CommitMode,
    ) -> Result<Self, DbError> {
        if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(connect_sqlite(url, max_connections).await?))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(
                connect_and_migrate(url, max_connections, commit).await?,
            ))
        } else {
            Err(DbError::Scheme(
                url.split(':').next().unwrap_or_default().to_owned(),
            ))
        }
    }

    /// Whether this is the embedded mode's SQLite file.
    pub fn is_sqlite(&self) -> bool {
        matches!(self, Self::Sqlite(_))
    }

    /// Begins a transaction in the pool's [`CommitMode`] (SQLite: `BEGIN IMMEDIATE`).
    pub async fn begin(&self) -> sqlx::Result<Tx> {
        match self {
            Self::Postgres(pool) => begin(pool).await.map(Tx::Postgres),
            Self::Sqlite(pool) => pool.begin_with("BEGIN IMMEDIATE").await.map(Tx::Sqlite),
        }
    }

    /// Begins a transaction whose commit is durable whatever the pool's [`CommitMode`]
    /// (see [`begin_durable`]).
    pub async fn begin_durable(&self) -> sqlx::Result<Tx> {
        match self {
            Self::Postgres(pool) => begin_durable(pool).await.map(Tx::Postgres),
            Self::Sqlite(pool) => pool.begin_with("BEGIN IMMEDIATE").await.map(Tx::Sqlite),
        }
    }

    /// Checks that the database answers.
    pub async fn ping(&self) -> sqlx::Result<()> {
        per_db!(self,
            pg(e) => e.execute("SELECT 1").await.map(drop),
            sqlite(e) => e.execute("SELECT 1").await.map(drop),
        )
    }
}

impl Tx {
    pub async fn commit(self) -> sqlx::Result<()> {
        match self {
            Self::Postgres(tx) => tx.commit().await,
            Self::Sqlite(tx) => tx.commit().await,
        }
    }

    pub async fn rollback(self) -> sqlx::Result<()> {
        match self {
            Self::Postgres(tx) => tx.rollback().await,
            Self::Sqlite(tx) => tx.rollback().await,
        }
    }
}

/// How long a SQLite statement waits for the write lock before it fails.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(10);

async fn connect_sqlite(url: &str, max_connections: u32) -> Result<SqlitePool, DbError> {
    let options = SqliteConnectOptions::from_str(url)
        .map_err(DbError::Connect)?
        .create_if_missing(true)
        .journal_mode(SqliteJournalMode::Wal)
        .synchronous(SqliteSynchronous::Normal)
        .busy_timeout(SQLITE_BUSY_TIMEOUT)
        .foreign_keys(true);
    let pool = SqlitePoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(5))
        .connect_with(options)
        .await
        .map_err(DbError::Connect)?;
    // sqlx takes no lock around SQLite migrations: several processes starting on a new file
    // would each try to create the tables. Migrating inside one `BEGIN IMMEDIATE` makes the
    // others wait for the write lock, then find the migrations applied.
    let mut tx = pool
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(DbError::Connect)?;
    SQLITE_MIGRATOR.run(&mut *tx).await?;
    tx.commit().await.map_err(DbError::Connect)?;
    Ok(pool)
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

/// A timestamp as the SQLite schema stores it (`strftime('%Y-%m-%dT%H:%M:%fZ')`), for binding:
/// stored times compare as text, so a bound one must have the same shape.
pub fn sqlite_time(time: chrono::DateTime<chrono::Utc>) -> String {
    time.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}
