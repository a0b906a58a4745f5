//! `conveyor-api`: the HTTP face of Conveyor. Handlers accept chat turns (persisted, then
//! enqueued), serve runs and conversations, and relay run events over SSE from the process's
//! single Redis subscription.

pub mod error;
pub mod extract;
mod routes;
pub mod services;
pub mod sse;
pub mod state;
pub mod sweeper;

use std::{future::IntoFuture, sync::Arc};

use axum::Router;
use conveyor_shared::{
    config::ApiConfig,
    events::{EventBus, EventHub},
    queue::JobProducer,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::state::AppState;

/// The largest request body accepted (batch uploads aside).
pub const BODY_LIMIT: usize = 256 * 1024;

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error(transparent)]
    Db(#[from] conveyor_shared::db::DbError),
    #[error(transparent)]
    Events(#[from] conveyor_shared::events::EventError),
    #[error(transparent)]
    Queue(#[from] conveyor_shared::queue::QueueError),
    #[error("Redis (REDIS_URL): {0}")]
    Redis(#[from] redis_error::RedisError),
    #[error("cannot listen on API_ADDR {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
}

mod redis_error {
    pub use conveyor_shared::events::hub::RedisError;
}

/// The application with its middleware.
pub fn app(state: AppState) -> Router {
    routes::router()
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}

/// Runs the API on `listener` until `shutdown`; in-flight requests get a graceful end and SSE
/// streams close (clients resume with `Last-Event-ID`).
pub async fn serve(
    config: ApiConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ApiStartError> {
    let common = &config.common;
    let db = conveyor_shared::db::connect_and_migrate(
        common.database_url.expose(),
        common.database_pool_size,
    )
    .await?;
    let bus = EventBus::connect(
        common.redis_url.expose(),
        &common.redis_prefix,
        common.event_stream_ttl,
    )
    .await?;
    let producer = JobProducer::connect(common.redis_url.expose(), &common.redis_prefix).await?;
    let tracker = TaskTracker::new();
    // SSE streams end when the hub stops; it stops with the server.
    let streams_stop = CancellationToken::new();
    let hub = EventHub::start(
        common.redis_url.expose(),
        bus.channel(),
        &tracker,
        streams_stop.clone(),
    )?;
    let sweep_interval = config.sweep_interval;
    let state = AppState {
        db,
        bus,
        hub,
        producer,
        config: Arc::new(config),
    };
    tracker.spawn(sweeper::run(
        state.clone(),
        sweep_interval,
        shutdown.clone(),
    ));

    let addr = listener.local_addr().map_err(ApiStartError::Serve)?;
    tracing::info!(%addr, "API listening");
    let stop = shutdown.clone();
    let server = axum::serve(listener, app(state)).with_graceful_shutdown(async move {
        stop.cancelled().await;
        streams_stop.cancel();
    });
    let result = server.into_future().await.map_err(ApiStartError::Serve);
    shutdown.cancel();
    tracker.close();
    tracker.wait().await;
    result
}

/// Binds `config.addr` and serves.
pub async fn run(config: ApiConfig, shutdown: CancellationToken) -> Result<(), ApiStartError> {
    let listener = TcpListener::bind(config.addr)
        .await
        .map_err(|source| ApiStartError::Bind {
            addr: config.addr,
            source,
        })?;
    serve(config, listener, shutdown).await
}
