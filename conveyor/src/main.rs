//! `conveyor`: Conveyor in one process. `conveyor dev` serves the API, the web page, a worker
//! pool and the task tools on one SQLite file; `conveyor mcp` is the bundled task MCP server
//! (what `dev` spawns for its tools).

use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(version, about = "Conveyor: durable tool-using chat agents")]
struct Args {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// API, workers and task tools in one process, on one SQLite file: no Postgres, no Redis.
    Dev(conveyor::dev::DevArgs),
    /// The task MCP server (stdio by default), the same as `conveyor-mcp`.
    Mcp(conveyor_mcp::Cli),
}

fn main() -> anyhow::Result<()> {
    match Args::parse().command {
        Command::Dev(args) => {
            conveyor_shared::telemetry::init_tracing();
            let runtime = tokio::runtime::Runtime::new()?;
            runtime.block_on(conveyor::dev::run(args))?;
            Ok(())
        }
        Command::Mcp(cli) => {
            let config = conveyor_mcp::Config::from_env(&cli)?;
            conveyor_mcp::telemetry::init();
            let runtime = tokio::runtime::Runtime::new()?;
            let result =
                runtime.block_on(conveyor_mcp::run(config, conveyor_mcp::shutdown_signal()));
            // Tokio reads stdin on a blocking thread that cannot be interrupted; don't wait.
            runtime.shutdown_timeout(Duration::from_millis(100));
            Ok(result?)
        }
    }
}
