//! Accept loops: the mTLS API listener and the plain-HTTP ops listener.
//!
//! Each TLS connection's client certificate is verified by rustls during the handshake (no
//! certificate, or one from another CA, never gets an HTTP request through); its identity is
//! parsed once per connection and attached to every request on it. The server config comes from
//! a `watch` channel, so a certificate reloaded from disk applies to the next handshake.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tower::ServiceExt as _;

use crate::api::PeerIdentity;
use crate::telemetry::{Metrics, Outcome};

/// How long connections may take to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `router` over mTLS until `shutdown` resolves, then drains open connections.
pub async fn serve_tls(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    router: Router,
    handshake_timeout: Duration,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    tokio::pin!(shutdown);
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.borrow()));
        let router = router.clone();
        let builder = Arc::clone(&builder);
        let metrics = metrics.clone();
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    metrics
                        .tls_handshakes
                        .get_or_create(&Outcome { outcome: "failed" })
                        .inc();
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    return;
                }
                Err(_) => {
                    metrics
                        .tls_handshakes
                        .get_or_create(&Outcome { outcome: "timeout" })
                        .inc();
                    tracing::info!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            metrics
                .tls_handshakes
                .get_or_create(&Outcome { outcome: "ok" })
                .inc();
            let identity: PeerIdentity = crate::tls::peer_identity(
                stream.get_ref().1.peer_certificates().unwrap_or_default(),
            );
            let svc = router.map_request(
                move |mut req: axum::extract::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(identity.clone());
                    req
                },
            );
            let conn =
                builder.serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc));
            if let Err(e) = watcher.watch(conn.into_owned()).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN_TIMEOUT, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("some connections did not finish within the drain timeout");
    }
}

/// Serves `router` over plain HTTP (the ops endpoints) until `shutdown` resolves.
pub async fn serve_plain(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let tcp = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, _)) => tcp,
                Err(e) => {
                    tracing::warn!(error = %e, "ops accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => return,
        };
        let conn = builder
            .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()))
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
