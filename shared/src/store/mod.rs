//! The Postgres data layer: one module per table, plain functions over a pool or a
//! transaction, every query compile-time checked and scoped by `user_id` wherever a person's
//! data is read. Rules (who may do what, in which order) live in the services that call these.

pub mod batches;
pub mod conversations;
pub mod messages;
pub mod run_events;
pub mod run_steps;
pub mod runs;

/// A Postgres executor: a pool, a connection or a transaction.
pub use sqlx::PgExecutor as Executor;

/// Whether an error is a unique-constraint violation (a lost insert race).
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.code().as_deref() == Some("23505"))
}
