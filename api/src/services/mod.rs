//! The API's rules, between the thin handlers and the stores: no HTTP types here.

pub mod batches;
pub mod conversations;
pub mod runs;
pub mod turns;
