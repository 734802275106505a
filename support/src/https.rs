//! The HTTPS accept loop: TCP_NODELAY, TLS via rustls, HTTP/1.1 keep-alive and HTTP/2, a
//! bound on open connections, and a graceful drain of in-flight requests on shutdown.
//!
//! Written out (rather than hidden in a server crate) because the webhook's added latency is
//! the product's cost on every PVC and Pod create: Nagle's algorithm alone adds tens of ms
//! per response on keep-alive connections, and the bench harness reuses this exact loop for its
//! baseline so the two differ only in the handler.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// How long a client may take to finish the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections served at once by default (`--max-connections`). kube-apiserver keeps a few
/// keep-alive connections per replica; beyond the bound, new connections wait in the kernel's
/// backlog instead of each taking a task and a TLS session.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;

/// Serves `router` over TLS on `listener`, at most `max_connections` connections at once,
/// until `shutdown` resolves, then stops accepting and waits up to `drain` for in-flight
/// requests and connections to finish.
pub async fn serve_tls(
    listener: TcpListener,
    tls: Arc<rustls::ServerConfig>,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    max_connections: usize,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(max_connections.max(1)));
    let acceptor = TlsAcceptor::from(tls);
    let graceful = GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .keep_alive(true)
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(30));
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = Arc::clone(&slots).acquire_owned() => slot.expect("the semaphore is never closed"),
            () = &mut shutdown => break,
        };
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(conn) => conn,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let acceptor = acceptor.clone();
        let service = TowerToHyperService::new(router.clone());
        let builder = builder.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _slot = slot;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let conn = builder
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracing::info!(connections = graceful.count(), "draining connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections drained"),
        () = tokio::time::sleep(drain) => tracing::warn!("drain timeout reached; closing remaining connections"),
    }
}

/// Why [`serve_cert_dir`] could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("loading the serving certificate")]
    Tls(#[from] crate::tls::TlsError),
    #[error("listening on {addr}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
}

/// [`serve_tls`] on `listen` with the certificate in `cert_dir` (`tls.crt`, `tls.key`,
/// reloaded when they change), until `shutdown`: the agent API's and the peers' server.
pub async fn serve_cert_dir(
    listen: std::net::SocketAddr,
    cert_dir: &std::path::Path,
    router: axum::Router,
    shutdown: impl Future<Output = ()>,
    drain: Duration,
    max_connections: usize,
) -> Result<(), ServeError> {
    use crate::tls::{server_config, CertPaths, ReloadingCertResolver};
    let resolver = ReloadingCertResolver::load(CertPaths::in_dir(cert_dir))?;
    let _watch = resolver.watch()?;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    tracing::info!(addr = %listener.local_addr().unwrap_or(listen), "serving HTTPS");
    serve_tls(
        listener,
        server_config(resolver),
        router,
        shutdown,
        drain,
        max_connections,
    )
    .await;
    Ok(())
}
