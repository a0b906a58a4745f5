//! `conveyor-mcp` binary: read the configuration, start logging, serve until told to stop.

use std::time::Duration;

use clap::Parser;

fn main() -> anyhow::Result<()> {
    let _ = dotenvy::dotenv();
    let config = conveyor_mcp::Config::from_env(&conveyor_mcp::Cli::parse())?;
    conveyor_mcp::telemetry::init();
    let runtime = tokio::runtime::Runtime::new()?;
    let result = runtime.block_on(conveyor_mcp::run(config, conveyor_mcp::shutdown_signal()));
    // Tokio reads stdin on a blocking thread that cannot be interrupted; don't wait for it.
    runtime.shutdown_timeout(Duration::from_millis(100));
    Ok(result?)
}
