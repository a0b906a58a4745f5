//! A TCP proxy in front of Postgres, so a test can take "the database" away from the services
//! without touching the machine's shared server: [`PgProxy::cut`] closes every open connection
//! and stops listening (new connections are refused), [`PgProxy::resume`] listens again on the
//! same port. To the services this looks like a Postgres restart.

use std::{
    net::SocketAddr,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use anyhow::Context;
use tokio::{
    net::{TcpListener, TcpSocket, TcpStream},
    sync::watch,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

/// The proxy; stops (and drops every connection) when dropped.
pub struct PgProxy {
    addr: SocketAddr,
    /// Whether the proxy should listen; the accept loop follows it.
    accepting: watch::Sender<bool>,
    /// Whether the accept loop is listening right now.
    listening: watch::Receiver<bool>,
    /// The token of the current connections; a cut cancels it and installs a fresh one.
    connections: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicUsize>,
    stop: CancellationToken,
    tasks: TaskTracker,
}

impl PgProxy {
    /// Starts a proxy on a free 127.0.0.1 port that forwards to `upstream` (on the current
    /// tokio runtime).
    pub fn start(upstream: SocketAddr) -> anyhow::Result<Self> {
        let listener = bind(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let addr = listener.local_addr()?;
        let (accepting, accepting_rx) = watch::channel(true);
        let (listening_tx, listening) = watch::channel(true);
        let proxy = Self {
            addr,
            accepting,
            listening,
            connections: Arc::new(Mutex::new(CancellationToken::new())),
            accepted: Arc::default(),
            stop: CancellationToken::new(),
            tasks: TaskTracker::new(),
        };
        let accept_loop = AcceptLoop {
            addr,
            upstream,
            accepting: accepting_rx,
            listening: listening_tx,
            connections: Arc::clone(&proxy.connections),
            accepted: Arc::clone(&proxy.accepted),
            tasks: proxy.tasks.clone(),
        };
        let stop = proxy.stop.clone();
        proxy.tasks.spawn(async move {
            tokio::select! {
                () = stop.cancelled() => {}
                () = accept_loop.run(Some(listener)) => {}
            }
        });
        Ok(proxy)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `url` (a `postgres://` URL) pointed at the proxy instead of its host and port.
    pub fn rewrite_url(&self, url: &str) -> anyhow::Result<String> {
        let (scheme, rest) = url.split_once("://").context("a postgres:// URL")?;
        let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
        let credentials = authority
            .rsplit_once('@')
            .map_or(String::new(), |(user, _)| format!("{user}@"));
        Ok(format!("{scheme}://{credentials}{}/{path}", self.addr))
    }

    /// Connections accepted so far (to show that the services reconnected).
    pub fn accepted(&self) -> usize {
        self.accepted.load(Ordering::Relaxed)
    }

    /// Stops listening (new connections are refused) and closes every open connection.
    pub async fn cut(&self) {
        self.accepting.send_replace(false);
        let mut listening = self.listening.clone();
        // The accept loop drops its listener before it reports `false`; every connection it
        // accepted before that holds the current token.
        let _ = listening.wait_for(|listening| !*listening).await;
        let old = std::mem::replace(
            &mut *self
                .connections
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            CancellationToken::new(),
        );
        old.cancel();
    }

    /// Listens again on the same port.
    pub async fn resume(&self) {
        self.accepting.send_replace(true);
        let mut listening = self.listening.clone();
        let _ = listening.wait_for(|listening| *listening).await;
    }
}

impl Drop for PgProxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.connections
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .cancel();
        self.tasks.close();
    }
}

/// A listener with `SO_REUSEADDR`, so the port can be bound again right after a cut.
fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

struct AcceptLoop {
    addr: SocketAddr,
    upstream: SocketAddr,
    accepting: watch::Receiver<bool>,
    listening: watch::Sender<bool>,
    connections: Arc<Mutex<CancellationToken>>,
    accepted: Arc<AtomicUsize>,
    tasks: TaskTracker,
}

impl AcceptLoop {
    async fn run(mut self, mut listener: Option<TcpListener>) {
        loop {
            if self
                .accepting
                .wait_for(|accepting| *accepting)
                .await
                .is_err()
            {
                return;
            }
            let listener = match listener.take() {
                Some(listener) => listener,
                None => match bind(self.addr) {
                    Ok(listener) => listener,
                    Err(error) => {
                        tracing::warn!(%error, addr = %self.addr, "proxy cannot listen again; retrying");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            self.listening.send_replace(true);
            loop {
                tokio::select! {
                    changed = self.accepting.changed() => {
                        if changed.is_err() || !*self.accepting.borrow_and_update() {
                            break;
                        }
                    }
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        self.accepted.fetch_add(1, Ordering::Relaxed);
                        let token = self
                            .connections
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .clone();
                        self.tasks.spawn(pipe(client, self.upstream, token));
                    }
                }
            }
            drop(listener);
            self.listening.send_replace(false);
        }
    }
}

/// Relays one connection until either side closes or the proxy cuts it.
async fn pipe(mut client: TcpStream, upstream: SocketAddr, cut: CancellationToken) {
    let relay = async {
        let mut server = TcpStream::connect(upstream).await?;
        let _ = client.set_nodelay(true);
        let _ = server.set_nodelay(true);
        tokio::io::copy_bidirectional(&mut client, &mut server).await
    };
    tokio::select! {
        () = cut.cancelled() => {}
        _ = relay => {}
    }
}
