//! `conveyor-worker`: parse flags and config, then run the worker until SIGTERM/ctrl-c.

use clap::Parser;
use conveyor_shared::{
    config::{ProcessEnv, WorkerConfig},
    queue::QueueName,
};
use conveyor_worker::WorkerOptions;

#[derive(Debug, Parser)]
#[command(version, about = "Runs Conveyor chat turns from the queue")]
struct Args {
    /// Queues to consume, comma-separated: chat, batch.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "chat,batch",
        env = "WORKER_QUEUES"
    )]
    queues: Vec<QueueName>,
    /// Runs executed at once by this process.
    #[arg(long, default_value_t = 16, env = "WORKER_CONCURRENCY")]
    concurrency: usize,
    /// Serve Prometheus `/metrics` and `/healthz` here (overrides WORKER_METRICS_ADDR).
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    conveyor_shared::telemetry::init_tracing();
    let args = Args::parse();
    anyhow::ensure!(args.concurrency >= 1, "--concurrency must be at least 1");
    let mut config = WorkerConfig::from_env(&ProcessEnv::load())?;
    if args.metrics_addr.is_some() {
        config.metrics_addr = args.metrics_addr;
    }
    let options = WorkerOptions {
        queues: args.queues,
        concurrency: args.concurrency,
    };
    conveyor_shared::shutdown::run_until_signal(|shutdown| {
        conveyor_worker::run(config, options, shutdown)
    })
    .await?;
    Ok(())
}
