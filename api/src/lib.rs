//! `conveyor-api`: the HTTP face of Conveyor. Handlers accept chat turns (persisted, then
//! enqueued), serve runs and conversations, and relay run events over SSE from the process's
//! single Redis subscription.

pub mod auth;
pub mod error;
pub mod extract;
pub mod limits;
pub mod metrics;
mod routes;
pub mod services;
pub mod sse;
pub mod state;
pub mod sweeper;

use std::{future::IntoFuture, sync::Arc};

use axum::{Router, serve::ListenerExt};
use conveyor_shared::{backends::Backends, config::ApiConfig, db::CommitMode, events::EventHub};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};

use crate::state::AppState;

/// The largest request body accepted (batch uploads aside).
pub const BODY_LIMIT: usize = 256 * 1024;

/// A start-up failure.
#[derive(Debug, thiserror::Error)]
pub enum ApiStartError {
    #[error(transparent)]
    Backends(#[from] conveyor_shared::backends::BackendError),
    #[error("Redis (REDIS_URL): {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Auth(#[from] auth::AuthSetupError),
    #[error("cannot listen on API_ADDR {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(std::io::Error),
}

/// The application with its middleware: body limit, a body read timeout for slow clients,
/// request ids (`x-request-id`, generated when absent, echoed back and in the logs), security
/// headers and, when configured, CORS.
pub fn app(state: AppState) -> Router {
    use axum::http::{HeaderName, HeaderValue, Method, header};
    use tower_http::{
        cors::{AllowOrigin, CorsLayer},
        request_id::{MakeRequestId, PropagateRequestIdLayer, RequestId, SetRequestIdLayer},
        set_header::SetResponseHeaderLayer,
        timeout::RequestBodyTimeoutLayer,
    };

    #[derive(Clone, Copy)]
    struct UlidRequestId;
    impl MakeRequestId for UlidRequestId {
        fn make_request_id<B>(&mut self, _: &axum::http::Request<B>) -> Option<RequestId> {
            HeaderValue::from_str(&ulid::Ulid::new().to_string())
                .ok()
                .map(RequestId::new)
        }
    }

    let request_id = HeaderName::from_static("x-request-id");
    let origins: Vec<HeaderValue> = state
        .config
        .cors_allowed_origins
        .iter()
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let mut router = routes::router()
        .layer(axum::extract::DefaultBodyLimit::max(BODY_LIMIT))
        .layer(RequestBodyTimeoutLayer::new(state.config.request_body_timeout))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(|request: &axum::http::Request<_>| {
            let id = request.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or_default();
            tracing::info_span!("request", method = %request.method(), path = %request.uri().path(), request_id = %id)
        }))
        .layer(PropagateRequestIdLayer::new(request_id.clone()))
        .layer(SetRequestIdLayer::new(request_id, UlidRequestId))
        .layer(SetResponseHeaderLayer::if_not_present(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff")))
        .layer(SetResponseHeaderLayer::if_not_present(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY")))
        .layer(SetResponseHeaderLayer::if_not_present(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer")));
    if !origins.is_empty() {
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST, Method::DELETE])
                .allow_headers([
                    header::AUTHORIZATION,
                    header::CONTENT_TYPE,
                    header::ACCEPT,
                    HeaderName::from_static("last-event-id"),
                    HeaderName::from_static("idempotency-key"),
                ]),
        );
    }
    router.with_state(state)
}

/// What the API runs on: the database, the event bus and its subscriber hub, the job producer
/// and the rate limiter's counters. [`connect`] opens the distributed set (Postgres + Redis);
/// the embedded mode builds its in-process set and calls [`serve_with`].
#[derive(Debug)]
pub struct ApiBackends {
    pub backends: Backends,
    pub hub: EventHub,
    pub limits: limits::Limits,
    pub metrics: metrics::ApiMetrics,
}

/// Connects to Postgres and Redis and starts the process's event subscription on `tracker`
/// (it ends when `streams_stop` is cancelled, which ends every SSE stream).
pub async fn connect(
    config: &ApiConfig,
    tracker: &TaskTracker,
    streams_stop: CancellationToken,
) -> Result<ApiBackends, ApiStartError> {
    let common = &config.common;
    let backends = Backends::connect(common, CommitMode::Synchronous).await?;
    let hub = EventHub::start(
        common.redis_url.expose(),
        backends.bus.channel(),
        tracker,
        streams_stop,
    )?;
    let metrics = metrics::ApiMetrics::new();
    let limits = limits::Limits::connect(
        common.redis_url.expose(),
        &common.redis_prefix,
        config.rate_limit_per_minute,
        config.max_sse_streams_per_user,
        metrics.sse_streams.clone(),
    )
    .await?;
    Ok(ApiBackends {
        backends,
        hub,
        limits,
        metrics,
    })
}

/// Runs the API on `listener` until `shutdown`; in-flight requests get a graceful end and SSE
/// streams close (clients resume with `Last-Event-ID`).
pub async fn serve(
    config: ApiConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), ApiStartError> {
    let tracker = TaskTracker::new();
    // SSE streams end when the hub stops; it stops with the server.
    let streams_stop = CancellationToken::new();
    let backends = connect(&config, &tracker, streams_stop.clone()).await?;
    serve_with(config, listener, backends, tracker, streams_stop, shutdown).await
}

/// [`serve`] on backends the caller opened; `streams_stop` is cancelled when the server stops
/// (ending SSE streams), and the server waits for `tracker`'s tasks before it returns.
pub async fn serve_with(
    config: ApiConfig,
    listener: TcpListener,
    backends: ApiBackends,
    tracker: TaskTracker,
    streams_stop: CancellationToken,
    shutdown: CancellationToken,
) -> Result<(), ApiStartError> {
    let ApiBackends {
        backends: Backends { db, bus, producer },
        hub,
        limits,
        metrics,
    } = backends;
    let sweep_interval = config.sweep_interval;
    let auth = auth::Authenticator::new(&config.auth)?;
    if !auth.is_enabled() {
        tracing::warn!(
            "authentication is off (no JWT_SECRET, JWT_JWKS_URL or JWT_JWKS_FILE): anyone who can reach the API can act as any user"
        );
    }
    let state = AppState {
        db,
        bus,
        hub,
        producer,
        auth,
        limits,
        metrics,
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
    let server = axum::serve(
        // Without TCP_NODELAY, Nagle's algorithm holds each small SSE event until the client's
        // delayed ACK (~40 ms) arrives.
        listener.tap_io(|tcp| {
            if let Err(error) = tcp.set_nodelay(true) {
                tracing::debug!(%error, "cannot set TCP_NODELAY");
            }
        }),
        // Built once: `Router` as a service would rebuild the routes and clone the state for
        // every connection (~57 KB each, which idle SSE clients hold on to).
        app(state).into_make_service(),
    )
    .with_graceful_shutdown(async move {
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
