//! Accept loops: the mTLS API listener and the plain-HTTP ops listener.
//!
//! Each TLS connection's client certificate is verified by rustls during the handshake (no
//! certificate, or one from another CA, never gets an HTTP request through); its identity is
//! parsed once per connection and attached to every request on it. The server config comes from
//! a `watch` channel, so a certificate reloaded from disk applies to the next handshake.
//!
//! The loops themselves ([`serve_tls_with`], [`serve_plain_with`]) are shared with the webhook,
//! which brings its own HTTP settings and per-connection handling.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tower::ServiceExt as _;

use crate::api::PeerIdentity;
use crate::telemetry::{Metrics, Outcome};

/// How long connections may take to finish after shutdown begins.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum Handshake {
    /// The peer or rustls broke it off (a refused certificate, not TLS at all).
    Failed(std::io::Error),
    /// Not done within the handshake timeout.
    TimedOut,
}

/// Serves `router` over mTLS until `shutdown` resolves, then drains open connections.
pub async fn serve_tls(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    router: Router,
    handshake_timeout: Duration,
    metrics: Metrics,
    shutdown: impl Future<Output = ()>,
) {
    let count = move |outcome| {
        metrics
            .tls_handshakes
            .get_or_create(&Outcome { outcome })
            .inc();
    };
    let connection =
        move |peer: SocketAddr, handshake: Result<&TlsStream<TcpStream>, Handshake>| {
            let stream = match handshake {
                Ok(s) => s,
                Err(Handshake::Failed(e)) => {
                    count("failed");
                    tracing::info!(%peer, error = %e, "TLS handshake refused");
                    return None;
                }
                Err(Handshake::TimedOut) => {
                    count("timeout");
                    tracing::info!(%peer, "TLS handshake timed out");
                    return None;
                }
            };
            count("ok");
            let identity: PeerIdentity = crate::tls::peer_identity(
                stream.get_ref().1.peer_certificates().unwrap_or_default(),
            );
            Some(
                router
                    .clone()
                    .map_request(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(identity.clone());
                        req
                    }),
            )
        };
    let http = auto::Builder::new(TokioExecutor::new());
    serve_tls_with(
        listener,
        tls,
        http,
        handshake_timeout,
        DRAIN_TIMEOUT,
        shutdown,
        connection,
    )
    .await;
}

/// The TLS accept loop: until `shutdown` resolves, accepts connections, completes each handshake
/// (within `handshake_timeout`, with the latest config from `tls`) and serves HTTP on it with
/// `http`; then drains open connections for at most `drain`.
///
/// `connection` sees every handshake's outcome and returns the service for an established one
/// (`None` closes it). It runs on the connection's task, not the accept loop.
pub async fn serve_tls_with<F, S>(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    http: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    drain: Duration,
    shutdown: impl Future<Output = ()>,
    connection: F,
) where
    F: Fn(SocketAddr, Result<&TlsStream<TcpStream>, Handshake>) -> Option<S>
        + Send
        + Sync
        + 'static,
    S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let http = Arc::new(http);
    let connection = Arc::new(connection);
    tokio::pin!(shutdown);
    while let Some((tcp, peer)) = accept(&listener, shutdown.as_mut(), "accept failed").await {
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.borrow()));
        let http = Arc::clone(&http);
        let connection = Arc::clone(&connection);
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let stream = match tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    connection(peer, Err(Handshake::Failed(e)));
                    return;
                }
                Err(_) => {
                    connection(peer, Err(Handshake::TimedOut));
                    return;
                }
            };
            let Some(svc) = connection(peer, Ok(&stream)) else {
                return;
            };
            let conn = http
                .serve_connection(TokioIo::new(stream), TowerToHyperService::new(svc))
                .into_owned();
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
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
    serve_plain_with(
        listener,
        router,
        auto::Builder::new(TokioExecutor::new()),
        shutdown,
    )
    .await;
}

/// Serves `router` over plain HTTP with `http` until `shutdown` resolves; open connections are
/// not waited for.
pub async fn serve_plain_with(
    listener: TcpListener,
    router: Router,
    http: auto::Builder<TokioExecutor>,
    shutdown: impl Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    while let Some((tcp, _)) = accept(&listener, shutdown.as_mut(), "ops accept failed").await {
        let conn = http
            .serve_connection(TokioIo::new(tcp), TowerToHyperService::new(router.clone()))
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

/// The next connection, or `None` once `shutdown` resolves. An accept error (out of file
/// descriptors and similar) is logged as `failed` and retried after a pause instead of spinning.
async fn accept(
    listener: &TcpListener,
    mut shutdown: Pin<&mut impl Future<Output = ()>>,
    failed: &'static str,
) -> Option<(TcpStream, SocketAddr)> {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => return Some(a),
                Err(e) => {
                    tracing::warn!(error = %e, "{failed}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = shutdown.as_mut() => return None,
        }
    }
}
