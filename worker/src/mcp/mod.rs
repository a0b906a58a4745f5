//! The worker's MCP client side: servers from an `mcpServers` file, spawned once, supervised,
//! their tools listed and cached, connections held and shared by every run of the worker.

mod pool;
mod servers_file;

pub use pool::{CallContext, IDEMPOTENCY_META_KEY, McpPool, ToolOutcome};
pub use servers_file::{ServerSpec, ServersFileError, load_servers};
