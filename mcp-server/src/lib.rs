//! `conveyor-mcp`: the task MCP server Conveyor's workers call tools on.
//!
//! Six tools (`add_task`, `list_tasks`, `complete_task`, `delete_task`, `update_task`,
//! `set_priority`) over Postgres or a SQLite file (`DATABASE_URL=sqlite:PATH`, the embedded
//! mode), each scoped by a required `user_id`. Mutating calls that carry
//! `_meta["conveyor/idempotency_key"]` are exactly-once.
//!
//! Layers, calls going one way: [`transport`] (stdio or streamable HTTP) → [`tools`]
//! ([`TaskServer`]: argument rules and the answers a model reads) → [`store`] ([`TaskStore`]:
//! SQL). [`domain`] holds the validated values passed between them.

pub mod config;
pub mod domain;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod transport;

use std::future::Future;

use conveyor_shared::db::{CommitMode, Db};
use tokio_util::sync::CancellationToken;

pub use crate::config::{Cli, Config, ConfigError, Transport};
pub use crate::store::{StoreError, TaskStore};
pub use crate::tools::{IDEMPOTENCY_META_KEY, TaskServer};
pub use crate::transport::{HTTP_PATH, ServeError, serve_http, serve_stdio};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Database(#[from] conveyor_shared::db::DbError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Connects to the database (migrating it), then serves on the configured transport until the
/// client leaves (stdio) or `shutdown` completes.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    let token = CancellationToken::new();
    let serve = serve(config, token.clone());
    tokio::pin!(serve);
    tokio::select! {
        result = &mut serve => result,
        () = shutdown => {
            tracing::info!("shutting down");
            token.cancel();
            serve.await
        }
    }
}

async fn serve(config: Config, shutdown: CancellationToken) -> Result<(), RunError> {
    let db = Db::connect(
        &config.database_url,
        config.pool_size,
        CommitMode::Synchronous,
    )
    .await?;
    match config.transport {
        Transport::Stdio => serve_stdio(db, shutdown).await?,
        Transport::Http(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| RunError::Bind { addr, source })?;
            serve_http(db, listener, shutdown).await?;
        }
    }
    Ok(())
}

/// Completes on Ctrl-C or, on Unix, SIGTERM (what `docker stop` and process supervisors send).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}
