//! `conveyor-api`: read the config, then serve until SIGTERM/ctrl-c.

use conveyor_shared::config::{ApiConfig, ProcessEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor_shared::telemetry::init_tracing();
    let config = ApiConfig::from_env(&ProcessEnv::load())?;
    conveyor_shared::shutdown::run_until_signal(|shutdown| conveyor_api::run(config, shutdown))
        .await?;
    Ok(())
}
