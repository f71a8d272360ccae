//! Accept loops: mTLS (or server-auth-only TLS) and plain HTTP, with the limits every listener
//! of the project gets.
//!
//! A TLS client certificate is verified by rustls during the handshake (no certificate, or one
//! from another CA, never gets an HTTP request through when the config asks for one); with
//! [`serve_tls_router`] its identity is parsed once per connection and attached to every request
//! on it. The server config comes from a `watch` channel, so a certificate reloaded from disk
//! applies to the next handshake.
//!
//! [`Limits`] bound what a client can hold without sending anything useful:
//! - a connection cap: at the cap, the loop stops accepting until a connection ends (the kernel's
//!   backlog holds the rest), so stalled clients cannot exhaust file descriptors;
//! - a TLS handshake timeout;
//! - an HTTP/1 header-read timeout (hyper's, from the connection's start and for every request);
//! - an idle timeout: a connection with no request in flight that moves no byte for that long is
//!   closed gracefully. A long poll is a request in flight, so it is never idle.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use axum::extract::Request;
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_rustls::server::TlsStream;
use tower::ServiceExt as _;

use crate::identity::{PeerIdentity, peer_identity};

/// What one listener allows a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Time to complete the TLS handshake.
    pub handshake_timeout: Duration,
    /// Time to send a request's headers (HTTP/1), from the connection's start and after each
    /// response.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight and no byte moved for this long is closed.
    pub idle_timeout: Duration,
    /// Open connections at most; at the cap no new one is accepted until one ends.
    pub max_connections: usize,
    /// After shutdown begins, how long open connections may take to finish (TLS listeners).
    pub drain: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(120),
            max_connections: 10_000,
            drain: Duration::from_secs(10),
        }
    }
}

/// Why a TLS handshake did not complete.
#[derive(Debug)]
pub enum Handshake {
    /// The peer or rustls broke it off (a refused certificate, not TLS at all).
    Failed(io::Error),
    /// Not done within the handshake timeout.
    TimedOut,
}

impl Handshake {
    /// The bounded label for a metric: `failed` or `timeout`.
    pub fn outcome(&self) -> &'static str {
        match self {
            Handshake::Failed(_) => "failed",
            Handshake::TimedOut => "timeout",
        }
    }
}

/// HTTP/1.1 and HTTP/2 with the header-read timeout of `limits` (one builder for every
/// listener).
pub fn http_builder(limits: &Limits) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);
    b
}

/// The address a request's connection came from (a request extension of [`serve_tls_router`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteAddr(pub SocketAddr);

/// Serves `router` over mTLS until `shutdown` resolves, then drains open connections. Every
/// request carries the connection's [`PeerIdentity`] as an extension; `on_handshake` is told
/// each handshake's outcome (`ok`, `failed`, `timeout`) for a metric.
pub async fn serve_tls_router(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    router: Router,
    limits: Limits,
    on_handshake: impl Fn(&'static str) + Send + Sync + 'static,
    shutdown: impl Future<Output = ()>,
) {
    let connection =
        move |peer: SocketAddr, handshake: Result<&TlsStream<TcpStream>, Handshake>| {
            let stream = match handshake {
                Ok(s) => s,
                Err(e) => {
                    on_handshake(e.outcome());
                    match e {
                        Handshake::Failed(e) => {
                            tracing::info!(%peer, error = %e, "TLS handshake refused");
                        }
                        Handshake::TimedOut => tracing::info!(%peer, "TLS handshake timed out"),
                    }
                    return None;
                }
            };
            on_handshake("ok");
            let chain = stream.get_ref().1.peer_certificates().unwrap_or_default();
            let identity: PeerIdentity = peer_identity(chain);
            let validity = crate::identity::peer_validity(chain);
            Some(
                router
                    .clone()
                    .map_request(move |mut req: Request<Incoming>| {
                        req.extensions_mut().insert(identity.clone());
                        req.extensions_mut().insert(RemoteAddr(peer));
                        if let Some(v) = validity {
                            req.extensions_mut().insert(v);
                        }
                        req
                    }),
            )
        };
    serve_tls(listener, tls, limits, shutdown, connection).await;
}

/// The TLS accept loop: until `shutdown` resolves, accepts connections (at most
/// `limits.max_connections` at once), completes each handshake (within
/// `limits.handshake_timeout`, with the latest config from `tls`) and serves HTTP on it; then
/// drains open connections for at most `limits.drain`.
///
/// `connection` sees every handshake's outcome and returns the service for an established one
/// (`None` closes it). It runs on the connection's task, not the accept loop.
pub async fn serve_tls<F, S>(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    limits: Limits,
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
    let connection = Arc::new(connection);
    let open = move |tcp: TcpStream, peer: SocketAddr, ctx: ConnCtx| {
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::clone(&tls.borrow()));
        let connection = Arc::clone(&connection);
        async move {
            let handshake = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(tcp));
            let stream = match handshake.await {
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
            if let Some(svc) = connection(peer, Ok(&stream)) {
                let expires = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(crate::identity::peer_validity)
                    .and_then(|v| instant_of(v.not_after));
                ctx.serve(stream, svc, peer, expires).await;
            }
        }
    };
    accept_loop(listener, limits, shutdown, "accept failed", open).await;
}

/// Serves `router` over plain HTTP (the ops endpoints) until `shutdown` resolves; open
/// connections are closed gracefully but not waited for.
pub async fn serve_plain(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
) {
    let limits = Limits {
        drain: Duration::ZERO,
        ..limits
    };
    let open = move |tcp: TcpStream, peer: SocketAddr, ctx: ConnCtx| {
        let router = router.clone();
        async move { ctx.serve(tcp, router, peer, None).await }
    };
    accept_loop(listener, limits, shutdown, "ops accept failed", open).await;
}

/// What a connection's task needs from its listener.
#[derive(Clone)]
struct ConnCtx {
    http: Arc<auto::Builder<TokioExecutor>>,
    idle_timeout: Duration,
    shutdown: watch::Receiver<bool>,
}

/// Until `shutdown` resolves: waits for a free place under the cap, accepts, and runs `open` on
/// a task of its own that holds the place. Then tells every connection to finish and waits for
/// them at most `limits.drain`.
async fn accept_loop<F, Fut>(
    listener: TcpListener,
    limits: Limits,
    shutdown: impl Future<Output = ()>,
    failed: &'static str,
    mut open: F,
) where
    F: FnMut(TcpStream, SocketAddr, ConnCtx) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (stop, stopped) = watch::channel(false);
    let ctx = ConnCtx {
        http: Arc::new(http_builder(&limits)),
        idle_timeout: limits.idle_timeout,
        shutdown: stopped,
    };
    let places = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let mut tasks = JoinSet::new();
    let mut at_cap = false;
    tokio::pin!(shutdown);
    loop {
        while tasks.try_join_next().is_some() {}
        let place = match Arc::clone(&places).try_acquire_owned() {
            Ok(p) => {
                at_cap = false;
                p
            }
            Err(_) => {
                if !at_cap {
                    tracing::warn!(
                        max_connections = limits.max_connections,
                        "connection cap reached; not accepting until a connection ends"
                    );
                    at_cap = true;
                }
                tokio::select! {
                    p = Arc::clone(&places).acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break,
                    },
                    () = shutdown.as_mut() => break,
                }
            }
        };
        let Some((tcp, peer)) = accept(&listener, shutdown.as_mut(), failed).await else {
            break;
        };
        let _ = tcp.set_nodelay(true);
        let conn = open(tcp, peer, ctx.clone());
        tasks.spawn(async move {
            let _place = place;
            conn.await;
        });
    }
    drop(listener);
    let _ = stop.send(true);
    if limits.drain.is_zero() {
        tasks.detach_all();
        return;
    }
    let drained = tokio::time::timeout(limits.drain, async {
        while tasks.join_next().await.is_some() {}
    });
    if drained.await.is_err() {
        tracing::warn!("some connections did not finish within the drain timeout");
    }
}

impl ConnCtx {
    /// HTTP on one established connection until it ends, it is idle for `idle_timeout`, its
    /// client certificate expires (`expires`), or the listener shuts down (all close it
    /// gracefully: requests in flight finish first).
    async fn serve<I, S>(self, io: I, svc: S, peer: SocketAddr, expires: Option<Instant>)
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible>
            + Clone
            + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let activity = Arc::new(Activity::new());
        let io = Tracked {
            inner: io,
            activity: Arc::clone(&activity),
        };
        let svc = Counted {
            inner: svc,
            activity: Arc::clone(&activity),
        };
        let conn = self
            .http
            .serve_connection(TokioIo::new(io), TowerToHyperService::new(svc))
            .into_owned();
        tokio::pin!(conn);
        let mut shutdown = self.shutdown;
        let mut closing = *shutdown.borrow();
        if closing {
            conn.as_mut().graceful_shutdown();
        }
        loop {
            let deadline = activity.idle_deadline(self.idle_timeout);
            tokio::select! {
                ended = conn.as_mut() => {
                    if let Err(e) = ended {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                    return;
                }
                () = tokio::time::sleep_until(deadline), if !closing => {
                    if activity.is_idle(self.idle_timeout) {
                        tracing::debug!(%peer, "closing an idle connection");
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
                () = sleep_until_or_never(expires), if !closing => {
                    tracing::debug!(%peer, "closing a connection whose client certificate expired");
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
                // A request still in flight gets a moment to finish, not the certificate's
                // identity for ever.
                () = sleep_until_or_never(expires.map(|e| e + EXPIRED_GRACE)) => {
                    tracing::debug!(%peer, "dropping a connection whose client certificate expired");
                    return;
                }
                changed = shutdown.changed(), if !closing => {
                    if changed.is_err() || *shutdown.borrow() {
                        conn.as_mut().graceful_shutdown();
                        closing = true;
                    }
                }
            }
        }
    }
}

/// How long a request in flight may finish after its connection's client certificate expired;
/// then the connection is dropped.
const EXPIRED_GRACE: Duration = Duration::from_secs(10);

/// The monotonic instant of `unix_seconds` (now, if that has passed; `None` if it is too far
/// ahead to represent, which is never).
fn instant_of(unix_seconds: u64) -> Option<Instant> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    Instant::now()
        .checked_add(Duration::from_secs(unix_seconds).saturating_sub(now))?
        .checked_add(EXPIRED_GRACE)
        .map(|t| t - EXPIRED_GRACE)
}

async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// When a connection last moved a byte or finished a request, and how many requests it has in
/// flight.
#[derive(Debug)]
struct Activity {
    start: Instant,
    /// Milliseconds after `start`.
    last: AtomicU64,
    in_flight: AtomicUsize,
}

impl Activity {
    fn new() -> Self {
        Activity {
            start: Instant::now(),
            last: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.start + Duration::from_millis(self.last.load(Ordering::Relaxed))
    }

    fn is_idle(&self, timeout: Duration) -> bool {
        self.in_flight.load(Ordering::Relaxed) == 0 && self.last().elapsed() >= timeout
    }

    /// When to look again: `timeout` after the last activity, or a full `timeout` from now while
    /// a request is in flight (it touches the clock when it ends).
    fn idle_deadline(&self, timeout: Duration) -> Instant {
        if self.in_flight.load(Ordering::Relaxed) > 0 {
            Instant::now() + timeout
        } else {
            self.last() + timeout
        }
    }
}

/// The connection's byte stream, touching [`Activity`] on every read or write that moves data.
struct Tracked<I> {
    inner: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Tracked<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Tracked<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The connection's service, counting requests in flight in [`Activity`].
#[derive(Clone)]
struct Counted<S> {
    inner: S,
    activity: Arc<Activity>,
}

/// Decrements the in-flight count when the request's future ends or is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

impl<S> tower::Service<Request<Incoming>> for Counted<S>
where
    S: tower::Service<Request<Incoming>, Response = Response, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Incoming>) -> Self::Future {
        self.activity.in_flight.fetch_add(1, Ordering::Relaxed);
        let guard = InFlight(Arc::clone(&self.activity));
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await;
            drop(guard);
            response
        })
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

#[cfg(test)]
mod tests {
    use axum::routing::get;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    use super::*;

    /// A plain listener with `limits` serving `/` (answers at once) and `/slow` (answers after
    /// 300 ms, like a long poll).
    async fn plain(limits: Limits) -> (SocketAddr, watch::Sender<bool>) {
        let router = Router::new().route("/", get(|| async { "ok" })).route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(300)).await;
                "slow"
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = watch::channel(false);
        tokio::spawn(serve_plain(listener, router, limits, async move {
            let _ = rx.wait_for(|s| *s).await;
        }));
        (addr, tx)
    }

    async fn get_on(tcp: &mut TcpStream, path: &str) -> String {
        let req = format!("GET {path} HTTP/1.1\r\nhost: x\r\n\r\n");
        tcp.write_all(req.as_bytes()).await.unwrap();
        let mut buf = vec![0; 1024];
        let n = tcp.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    /// Reads until the peer closes; `true` if it did within `within`.
    async fn closed_within(tcp: &mut TcpStream, within: Duration) -> bool {
        let mut buf = [0u8; 64];
        matches!(
            tokio::time::timeout(within, tcp.read(&mut buf)).await,
            Ok(Ok(0) | Err(_))
        )
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_and_a_long_request_is_not_idle() {
        let limits = Limits {
            idle_timeout: Duration::from_millis(150),
            header_read_timeout: Duration::from_secs(5),
            ..Limits::default()
        };
        let (addr, _stop) = plain(limits).await;
        // Connected and silent: closed after the idle timeout.
        let mut silent = TcpStream::connect(addr).await.unwrap();
        assert!(closed_within(&mut silent, Duration::from_secs(3)).await);
        // A request that takes twice the idle timeout is answered, then the idle clock runs.
        let mut busy = TcpStream::connect(addr).await.unwrap();
        let answer = get_on(&mut busy, "/slow").await;
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow"),
            "{answer}"
        );
        assert!(closed_within(&mut busy, Duration::from_secs(3)).await);
    }

    #[tokio::test]
    async fn at_the_cap_the_next_connection_waits_for_a_place() {
        let limits = Limits {
            max_connections: 1,
            idle_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let (addr, _stop) = plain(limits).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        assert!(get_on(&mut first, "/").await.starts_with("HTTP/1.1 200"));
        // The kernel completes the second connection (backlog), but keyd does not serve it.
        let mut second = TcpStream::connect(addr).await.unwrap();
        second
            .write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        let mut buf = vec![0; 1024];
        let early = tokio::time::timeout(Duration::from_millis(300), second.read(&mut buf)).await;
        assert!(early.is_err(), "served beyond the cap");
        // The first one leaves: the second gets its place and its answer.
        drop(first);
        let n = tokio::time::timeout(Duration::from_secs(3), second.read(&mut buf))
            .await
            .expect("served once a place was free")
            .unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    }

    #[tokio::test]
    async fn headers_must_arrive_within_the_header_read_timeout() {
        let limits = Limits {
            header_read_timeout: Duration::from_millis(200),
            idle_timeout: Duration::from_secs(30),
            ..Limits::default()
        };
        let (addr, _stop) = plain(limits).await;
        let mut slow = TcpStream::connect(addr).await.unwrap();
        // Half a request line, then nothing: a slowloris.
        slow.write_all(b"GET / HT").await.unwrap();
        let mut buf = vec![0; 1024];
        let closed = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match slow.read(&mut buf).await {
                    Ok(0) | Err(_) => return true,
                    Ok(_) => {} // hyper may answer 408 before it closes
                }
            }
        })
        .await;
        assert_eq!(closed, Ok(true));
    }
}
