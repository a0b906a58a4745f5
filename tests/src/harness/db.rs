//! A stack's database as the test sees it: a fresh Postgres database (distributed mode) or a
//! fresh SQLite file (embedded mode), removed when dropped, and [`TestPool`], one way to read
//! either so that a test body runs unchanged in both modes.
//!
//! [`TestPool`] wraps the two native pools rather than sqlx's `Any` driver: values decode
//! with each database's own types, and the services' sqlx features stay as they are. sqlx on
//! SQLite accepts Postgres's `$1` placeholders, so one SQL string serves both as long as it
//! keeps to what both dialects share; SQLite booleans are integers and its timestamps ISO
//! text, so shared assertions compare counts and strings.

use std::path::{Path, PathBuf};

use anyhow::bail;
use sqlx::{
    Decode, FromRow, Postgres, Sqlite, Type,
    postgres::{PgPool, PgRow},
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqliteRow},
};

use super::admin_database_url;

/// A fresh database, removed with the value.
pub struct TestDb {
    /// The Postgres database's name, or the SQLite file's name.
    pub name: String,
    /// `postgres://…/NAME` or `sqlite:PATH`.
    pub url: String,
    /// The directory holding the SQLite file (and its WAL), for an embedded stack.
    sqlite_dir: Option<PathBuf>,
}

impl TestDb {
    /// A fresh Postgres database on the machine's server (`TEST_DATABASE_URL`).
    pub async fn create(prefix: &str) -> anyhow::Result<Self> {
        let name = format!("{prefix}_{}", ulid::Ulid::new().to_string().to_lowercase());
        let admin = admin_database_url();
        let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        // The database is the URL's path; its query (e.g. `?host=/var/run/postgresql` for the
        // Unix socket) applies to the new database too.
        let (location, query) = admin
            .split_once('?')
            .map_or((admin.as_str(), ""), |(location, query)| (location, query));
        let base = location.rsplit_once('/').map_or(location, |(base, _)| base);
        let query = if query.is_empty() {
            String::new()
        } else {
            format!("?{query}")
        };
        Ok(Self {
            url: format!("{base}/{name}{query}"),
            name,
            sqlite_dir: None,
        })
    }

    /// A path for a fresh SQLite file, in a directory of its own (the file and its `-wal` and
    /// `-shm` companions go away with it). The file itself is created by whoever opens it
    /// first: `conveyor dev`.
    pub fn create_file(prefix: &str) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "{prefix}-{}",
            ulid::Ulid::new().to_string().to_lowercase()
        ));
        std::fs::create_dir_all(&dir)?;
        let name = "conveyor.db".to_owned();
        Ok(Self {
            url: format!("sqlite:{}", dir.join(&name).display()),
            name,
            sqlite_dir: Some(dir),
        })
    }

    /// The SQLite file, for an embedded stack.
    pub fn sqlite_path(&self) -> Option<PathBuf> {
        self.sqlite_dir.as_ref().map(|dir| dir.join(&self.name))
    }

    /// A pool on the Postgres database, for the tests that inspect Postgres-specific state.
    /// Tests that run in both modes use [`Self::sql`].
    pub async fn pool(&self) -> anyhow::Result<PgPool> {
        if let Some(path) = self.sqlite_path() {
            bail!(
                "this stack keeps its data in the SQLite file {} (embedded mode), not in \
                 Postgres: read it with TestDb::sql",
                path.display()
            );
        }
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .connect(&self.url)
            .await?)
    }

    /// A pool on whichever database this is.
    pub async fn sql(&self) -> anyhow::Result<TestPool> {
        match self.sqlite_path() {
            None => Ok(TestPool::Postgres(self.pool().await?)),
            Some(path) => Ok(TestPool::Sqlite(open_sqlite(&path).await?)),
        }
    }
}

/// Opens the file `conveyor dev` created. WAL is set explicitly: a connection that asked for
/// another journal mode would switch the live file out of WAL.
async fn open_sqlite(path: &Path) -> anyhow::Result<SqlitePool> {
    let options = SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(false)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(std::time::Duration::from_secs(10));
    Ok(sqlx::sqlite::SqlitePoolOptions::new()
        .max_connections(2)
        .connect_with(options)
        .await?)
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(dir) = &self.sqlite_dir {
            let _ = std::fs::remove_dir_all(dir);
            return;
        }
        let name = self.name.clone();
        let admin = admin_database_url();
        // Dropping needs async I/O; a short-lived thread with its own runtime does it even while
        // the test's runtime is shutting down.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut conn) =
                    <sqlx::PgConnection as sqlx::Connection>::connect(&admin).await
                {
                    let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
                        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            });
        })
        .join();
    }
}

/// The test's view of a stack's database, Postgres or SQLite: `db.query(SQL).bind(…)` then
/// `scalar`, `scalars`, `row` or `rows`, decoding with the database's own types (or
/// `execute`, for the rare test that stages a state itself).
#[derive(Clone)]
pub enum TestPool {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl TestPool {
    /// A statement to bind values to and run. Use `$1`, `$2`, … for parameters.
    pub fn query(&self, sql: &str) -> TestQuery<'_> {
        TestQuery {
            pool: self,
            sql: sql.to_owned(),
            binds: Vec::new(),
        }
    }
}

/// A value bound to a [`TestQuery`].
#[derive(Debug, Clone)]
pub enum Bind {
    Text(String),
    Int(i64),
}

impl From<&str> for Bind {
    fn from(value: &str) -> Self {
        Self::Text(value.to_owned())
    }
}

impl From<&String> for Bind {
    fn from(value: &String) -> Self {
        Self::Text(value.clone())
    }
}

impl From<String> for Bind {
    fn from(value: String) -> Self {
        Self::Text(value)
    }
}

impl From<i64> for Bind {
    fn from(value: i64) -> Self {
        Self::Int(value)
    }
}

/// A statement on a [`TestPool`] (see [`TestPool::query`]).
pub struct TestQuery<'a> {
    pool: &'a TestPool,
    sql: String,
    binds: Vec<Bind>,
}

/// What a column decodes to on both databases.
pub trait Column:
    for<'r> Decode<'r, Postgres> + Type<Postgres> + for<'r> Decode<'r, Sqlite> + Type<Sqlite>
{
}

impl<T> Column for T where
    T: for<'r> Decode<'r, Postgres> + Type<Postgres> + for<'r> Decode<'r, Sqlite> + Type<Sqlite>
{
}

/// What a row decodes to on both databases (a tuple of [`Column`]s, say).
pub trait Row: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> {}

impl<T> Row for T where T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> {}

impl TestQuery<'_> {
    #[must_use]
    pub fn bind(mut self, value: impl Into<Bind>) -> Self {
        self.binds.push(value.into());
        self
    }

    /// Runs a statement that returns no rows; returns how many rows it changed.
    pub async fn execute(self) -> anyhow::Result<u64> {
        let sql = sqlx::AssertSqlSafe(self.sql);
        Ok(match self.pool {
            TestPool::Postgres(pool) => {
                let mut query = sqlx::query::<Postgres>(sql);
                for bind in self.binds {
                    query = match bind {
                        Bind::Text(v) => query.bind(v),
                        Bind::Int(v) => query.bind(v),
                    };
                }
                query.execute(pool).await?.rows_affected()
            }
            TestPool::Sqlite(pool) => {
                let mut query = sqlx::query::<Sqlite>(sql);
                for bind in self.binds {
                    query = match bind {
                        Bind::Text(v) => query.bind(v),
                        Bind::Int(v) => query.bind(v),
                    };
                }
                query.execute(pool).await?.rows_affected()
            }
        })
    }

    /// Every row.
    pub async fn rows<T: Row + Send + Unpin>(self) -> anyhow::Result<Vec<T>> {
        let sql = sqlx::AssertSqlSafe(self.sql);
        Ok(match self.pool {
            TestPool::Postgres(pool) => {
                let mut query = sqlx::query_as::<Postgres, T>(sql);
                for bind in self.binds {
                    query = match bind {
                        Bind::Text(v) => query.bind(v),
                        Bind::Int(v) => query.bind(v),
                    };
                }
                query.fetch_all(pool).await?
            }
            TestPool::Sqlite(pool) => {
                let mut query = sqlx::query_as::<Sqlite, T>(sql);
                for bind in self.binds {
                    query = match bind {
                        Bind::Text(v) => query.bind(v),
                        Bind::Int(v) => query.bind(v),
                    };
                }
                query.fetch_all(pool).await?
            }
        })
    }

    /// The one row; an error if there is none.
    pub async fn row<T: Row + Send + Unpin>(self) -> anyhow::Result<T> {
        let sql = self.sql.clone();
        self.rows()
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow::anyhow!("no row for {sql}"))
    }

    /// The first column of every row.
    pub async fn scalars<T: Column + Send + Unpin>(self) -> anyhow::Result<Vec<T>> {
        Ok(self
            .rows::<(T,)>()
            .await?
            .into_iter()
            .map(|(v,)| v)
            .collect())
    }

    /// The first column of the one row.
    pub async fn scalar<T: Column + Send + Unpin>(self) -> anyhow::Result<T> {
        Ok(self.row::<(T,)>().await?.0)
    }
}
