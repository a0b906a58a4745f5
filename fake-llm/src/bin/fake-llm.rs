//! `fake-llm`: the fake OpenAI-compatible server as a process, for the README demo, the
//! benchmark and anything that cannot link the library. Prints `listening on ADDR` as its first
//! stdout line, then serves until SIGINT/SIGTERM.

use std::io::Write;

use clap::Parser;
use conveyor_fake_llm::{self as fake_llm, FakeLlmConfig};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = FakeLlmConfig::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let server = fake_llm::start(config).await?;
    {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {}", server.addr())?;
        stdout.flush()?;
    }
    shutdown_signal().await?;
    server.shutdown().await?;
    Ok(())
}

async fn shutdown_signal() -> std::io::Result<()> {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            result = tokio::signal::ctrl_c() => result,
            _ = term.recv() => Ok(()),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await
    }
}
