//! A throwaway database per test (and per benchmark run), on either database the server
//! supports, so runs are isolated from each other and from the development database, and leave
//! nothing behind.
//!
//! Postgres: the admin connection comes from `TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); each `TestDb` creates
//! `conveyor_mcp_test_<ulid>` next to it, migrates it, and drops it `WITH (FORCE)` when dropped —
//! also when the test panicked. SQLite: a fresh file in its own temporary directory, which is
//! removed when dropped.

use std::path::PathBuf;

use conveyor_shared::{
    db::{CommitMode, Db},
    per_db,
};
use sqlx::{AssertSqlSafe, Connection, PgConnection};

const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Which database a test runs the server on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    /// A SQLite file (the embedded mode).
    Sqlite,
}

/// A freshly created and migrated database, dropped with the value.
pub struct TestDb {
    /// The server's `DATABASE_URL`.
    pub url: String,
    /// The test's own connections, to check what the server stored.
    pub db: Db,
    cleanup: Cleanup,
}

/// What dropping a [`TestDb`] removes.
enum Cleanup {
    Postgres { admin_url: String, name: String },
    Sqlite { _dir: TempDir },
}

/// A new, empty directory under the system's temporary directory, removed with the value.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn create() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "conveyor_mcp_test_{}",
            ulid::Ulid::new().to_string().to_lowercase()
        ));
        std::fs::create_dir(&dir).expect("create a temporary directory");
        Self(dir)
    }

    /// The path of a file named `name` in this directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// A `sqlite:` URL for a file named `name` in this directory.
    pub fn sqlite_url(&self, name: &str) -> String {
        format!("sqlite:{}", self.file(name).display())
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        // Pools still open on the files keep working on them until they close (Unix).
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("could not remove {}: {e}", self.0.display());
        }
    }
}

impl TestDb {
    pub async fn create(backend: Backend) -> Self {
        let (url, cleanup) = match backend {
            Backend::Postgres => {
                let name = format!(
                    "conveyor_mcp_test_{}",
                    ulid::Ulid::new().to_string().to_lowercase()
                );
                let admin_url = std::env::var("TEST_DATABASE_URL")
                    .unwrap_or_else(|_| DEFAULT_ADMIN_URL.to_owned());
                let mut admin = PgConnection::connect(&admin_url)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach the admin database {admin_url}: {e}"));
                // Identifiers cannot be bound as parameters; `name` is built above from
                // [a-z0-9_] only.
                sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
                    .execute(&mut admin)
                    .await
                    .expect("create the test database");
                let _ = admin.close().await;
                let url = with_database(&admin_url, &name);
                (url, Cleanup::Postgres { admin_url, name })
            }
            Backend::Sqlite => {
                let dir = TempDir::create();
                (dir.sqlite_url("tasks.db"), Cleanup::Sqlite { _dir: dir })
            }
        };
        let db = Db::connect(&url, 2, CommitMode::Synchronous)
            .await
            .expect("migrate the test database");
        Self { url, db, cleanup }
    }

    /// Runs `sql`, a `SELECT count(*) …` with one text parameter `$1` (which both databases
    /// accept), with `param`.
    pub async fn count(&self, sql: &'static str, param: &str) -> i64 {
        per_db!(&self.db,
            pg(e) => sqlx::query_scalar(sql).bind(param).fetch_one(e).await,
            sqlite(e) => sqlx::query_scalar(sql).bind(param).fetch_one(e).await,
        )
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Cleanup::Postgres { admin_url, name } = &self.cleanup {
            drop_postgres_database(admin_url, name);
        }
    }
}

fn drop_postgres_database(admin_url: &str, name: &str) {
    let admin_url = admin_url.to_owned();
    let database = name.to_owned();
    // Drop runs inside the test's runtime, which must not be blocked on; a short-lived
    // thread with its own runtime does the (best-effort) cleanup.
    let cleanup = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("cleanup runtime");
        runtime.block_on(async {
            let mut admin = PgConnection::connect(&admin_url).await?;
            sqlx::query(AssertSqlSafe(format!(
                "DROP DATABASE IF EXISTS {database} WITH (FORCE)"
            )))
            .execute(&mut admin)
            .await?;
            admin.close().await
        })
    });
    if let Ok(Err(e)) = cleanup.join() {
        eprintln!("could not drop test database {name}: {e}");
    }
}

/// `admin_url` with its database name replaced by `name` (query parameters kept).
fn with_database(admin_url: &str, name: &str) -> String {
    let (base, query) = admin_url
        .split_once('?')
        .map_or((admin_url, None), |(base, query)| (base, Some(query)));
    let authority_end = base.find("://").map_or(0, |i| i + 3);
    let server = match base[authority_end..].find('/') {
        Some(slash) => &base[..authority_end + slash],
        None => base,
    };
    match query {
        Some(query) => format!("{server}/{name}?{query}"),
        None => format!("{server}/{name}"),
    }
}
