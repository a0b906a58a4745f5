//! `conveyor-api`: read the config, then serve until SIGTERM/ctrl-c.

use conveyor_shared::config::{ApiConfig, ProcessEnv};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor_shared::telemetry::init_tracing();
    let config = ApiConfig::from_env(&ProcessEnv::load())?;
    conveyor_api::run(config, conveyor_shared::shutdown::on_signal()).await?;
    Ok(())
}
