//! Process shutdown: SIGTERM or ctrl-c cancels a token that every task watches.

use std::future::Future;

use tokio_util::sync::CancellationToken;

/// Runs the service built by `service` with a shutdown token that SIGTERM or ctrl-c cancels,
/// and returns when the service has finished. The signal is awaited here, beside the service,
/// so no listener task outlives it.
pub async fn run_until_signal<F, Fut, T>(service: F) -> T
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: Future<Output = T>,
{
    let token = CancellationToken::new();
    let service = service(token.clone());
    tokio::pin!(service);
    tokio::select! {
        result = &mut service => return result,
        () = signal() => {}
    }
    tracing::info!("shutdown requested");
    token.cancel();
    service.await
}

/// Resolves on SIGTERM or ctrl-c.
async fn signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    () = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(error) => {
                tracing::warn!(%error, "cannot listen for SIGTERM; only ctrl-c stops the process");
                ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    ctrl_c.await;
}
