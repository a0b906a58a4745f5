//! `conveyor-shared`: everything the API, the worker and the MCP server have in common —
//! configuration, domain types, storage, the job queue, the event bus and the LLM provider
//! factory. The binaries stay thin; the rules live here, behind narrow interfaces.

pub mod backends;
pub mod config;
pub mod db;
pub mod domain;
pub mod events;
pub mod ids;
pub mod llm;
pub mod metrics;
pub mod queue;
pub mod run_control;
pub mod shutdown;
pub mod store;
pub mod telemetry;
