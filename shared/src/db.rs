//! Postgres connection pool and schema migrations.
//!
//! Every binary migrates at start-up; sqlx takes a Postgres advisory lock for the duration, so
//! several processes starting at once apply each migration exactly once.

use std::time::Duration;

use sqlx::postgres::{PgPool, PgPoolOptions};

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

/// Opens a pool to `url` and applies pending migrations.
pub async fn connect_and_migrate(url: &str, max_connections: u32) -> Result<PgPool, DbError> {
    let pool = PgPoolOptions::new()
        .max_connections(max_connections)
        .acquire_timeout(Duration::from_secs(5))
        .connect(url)
        .await
        .map_err(DbError::Connect)?;
    MIGRATOR.run(&pool).await?;
    Ok(pool)
}
