//! The data layer: one module per table, plain functions over a pool or a transaction
//! ([`crate::db::Ex`]), each statement written for Postgres (compile-time checked) and beside it
//! for SQLite (the embedded mode), scoped by `user_id` wherever a person's data is read. Rules (who may do what, in which order) live in the services that call these.

pub mod batches;
pub mod conversations;
pub mod messages;
pub mod run_events;
pub mod run_steps;
pub mod runs;

/// Whether an error is a unique-constraint violation (a lost insert race), on either database.
pub fn is_unique_violation(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .is_some_and(|e| e.kind() == sqlx::error::ErrorKind::UniqueViolation)
}
