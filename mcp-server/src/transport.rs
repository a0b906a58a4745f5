//! How the server is reached: stdio (the default, one client per process — how Conveyor's
//! workers run it) or streamable HTTP (many clients; handy for inspectors and remote agents).
//!
//! Both take a [`CancellationToken`] so that the caller decides when to stop and tests can stop
//! a server they started in-process.

use std::io;

use conveyor_shared::db::Db;
use rmcp::{
    ServiceExt,
    service::ServerInitializeError,
    transport::streamable_http_server::{
        StreamableHttpServerConfig, StreamableHttpService, session::local::LocalSessionManager,
    },
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{store::TaskStore, tools::TaskServer};

/// The path the streamable HTTP endpoint is mounted at.
pub const HTTP_PATH: &str = "/mcp";

/// Why serving stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("MCP handshake on stdio failed: {0}")]
    Handshake(#[source] Box<ServerInitializeError>),
    #[error("the MCP session task failed: {0}")]
    Session(#[from] tokio::task::JoinError),
    #[error("HTTP server failed: {0}")]
    Http(#[source] io::Error),
}

/// Serves one MCP client on stdin/stdout until it disconnects (EOF) or `shutdown` fires.
///
/// When stdin and stdout are pipes (how MCP clients start servers) they are driven by Tokio's
/// reactor rather than its blocking pool, which saves a thread hand-off per message and lets
/// shutdown interrupt a pending read; a terminal or file falls back to blocking stdio.
///
/// stdout carries only protocol messages; logs go to stderr. A line that is not JSON is
/// ignored and well-formed JSON that is not a JSON-RPC message gets an "Invalid request"
/// error (rmcp's transport does both), so one bad line never ends the session.
pub async fn serve_stdio(db: Db, shutdown: CancellationToken) -> Result<(), ServeError> {
    let server = TaskServer::new(TaskStore::new(db));
    let running = match server
        .serve_with_ct(rmcp::transport::stdio_pipes(), shutdown)
        .await
    {
        Ok(running) => running,
        // Stopped, or the client went away before it said hello: nothing was lost.
        Err(ServerInitializeError::Cancelled | ServerInitializeError::ConnectionClosed(_)) => {
            tracing::info!("stdio client left before the MCP handshake");
            return Ok(());
        }
        Err(e) => return Err(ServeError::Handshake(Box::new(e))),
    };
    let reason = running.waiting().await?;
    tracing::info!(?reason, "stdio session ended");
    Ok(())
}

/// Serves MCP over streamable HTTP at [`HTTP_PATH`] on `listener` until `shutdown` fires.
///
/// Logs `listening on ADDR` once bound, so a caller that asked for port 0 can find the port.
/// rmcp only accepts loopback `Host` headers by default (DNS-rebinding protection); this
/// server has no authentication of its own, so keep it on loopback.
pub async fn serve_http(
    db: Db,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let server = TaskServer::new(TaskStore::new(db));
    let service: StreamableHttpService<TaskServer, LocalSessionManager> =
        StreamableHttpService::new(
            move || Ok(server.clone()),
            LocalSessionManager::default().into(),
            // The child token ends open SSE streams on shutdown, which graceful shutdown
            // would otherwise wait for.
            StreamableHttpServerConfig::default().with_cancellation_token(shutdown.child_token()),
        );
    let router = axum::Router::new().nest_service(HTTP_PATH, service);
    let addr = listener.local_addr().map_err(ServeError::Http)?;
    tracing::info!("listening on {addr}");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
        .map_err(ServeError::Http)?;
    tracing::info!("HTTP server stopped");
    Ok(())
}
