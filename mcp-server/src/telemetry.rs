//! Logging. Everything goes to stderr: on the stdio transport, stdout is the protocol, and a
//! single stray log line there would corrupt the client's message stream.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Installs a stderr `tracing` subscriber filtered by `RUST_LOG` (default `info`). Does nothing
/// if one is already installed (tests, embedding binaries).
pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}
