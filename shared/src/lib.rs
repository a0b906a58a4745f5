//! `conveyor-shared`: everything the API, the worker and the MCP server have in common —
//! configuration, domain types, storage, the job queue, the event bus and the LLM provider
//! factory. The binaries stay thin; the rules live here, behind narrow interfaces.

pub mod db;
