//! The ceiling: what serving a bundle costs with nothing of keyd's own in the way.
//!
//! It uses keyd's TLS configuration ([`keyd_mtls::tls::server_config`]: the same server
//! certificate, the same client-certificate verification, the same ALPN) and the same
//! hyper-util `auto` connection builder over tokio-rustls as `keyd::server`, and answers every
//! request with one fixed body: the exact bytes of a real keyd bundle. It has no store, no
//! router, no authorization, no identity parsing and no metrics; with `If-None-Match` equal to
//! its ETag it answers 304, as keyd does.

use std::convert::Infallible;
use std::io::Read as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls::ServerConfig;
use tokio::net::TcpListener;

use super::Error;

/// The ceiling's first stdout line is this followed by its address.
pub(crate) const LISTENING_PREFIX: &str = "listening on ";

/// Same as keyd's default `limits.handshake_timeout`.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The hidden `loadgen ceiling` subcommand's arguments.
#[derive(Debug, Clone)]
pub struct CeilingArgs {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The response body, served byte for byte.
    pub body: PathBuf,
    /// The ETag, quotes included, as keyd sent it.
    pub etag: String,
    pub listen: SocketAddr,
}

/// What every response carries.
#[derive(Debug)]
struct Payload {
    body: Bytes,
    etag: HeaderValue,
}

/// Runs the ceiling until its stdin closes (the load generator exited or dropped its guard).
/// Builds its own runtime: the same multi-threaded runtime with default settings as keyd's.
pub fn run_ceiling(args: &CeilingArgs) -> Result<(), Error> {
    keyd_mtls::tls::install_default_provider();
    let tls = keyd_mtls::tls::server_config(&keyd_mtls::tls::TlsPaths {
        ca: args.ca.clone(),
        cert: args.cert.clone(),
        key: args.key.clone(),
    })
    .map_err(|source| Error::Tls {
        what: "the ceiling's TLS configuration".into(),
        source: Box::new(source),
    })?;
    let body = std::fs::read(&args.body).map_err(|source| Error::Io {
        what: format!("reading the body file {}", args.body.display()),
        source,
    })?;
    let etag = HeaderValue::from_str(&args.etag).map_err(|_| Error::Option {
        field: "etag",
        reason: "not a valid header value".into(),
    })?;
    let payload = Arc::new(Payload {
        body: Bytes::from(body),
        etag,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|source| Error::Io {
            what: "starting the ceiling's runtime".into(),
            source,
        })?;
    // Exit when stdin reaches EOF, which happens however the parent ends.
    let (eof_tx, eof_rx) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let mut sink = [0u8; 64];
        while matches!(std::io::stdin().read(&mut sink), Ok(n) if n > 0) {}
        let _ = eof_tx.send(());
    });
    runtime.block_on(async move {
        let listener = TcpListener::bind(args.listen)
            .await
            .map_err(|source| Error::Io {
                what: format!("binding {}", args.listen),
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Error::Io {
            what: "reading the listening address".into(),
            source,
        })?;
        println!("{LISTENING_PREFIX}{addr}");
        tokio::select! {
            () = serve(listener, tls, payload) => {}
            _ = eof_rx => {}
        }
        Ok(())
    })
}

/// Accepts forever; each connection gets a TLS handshake and then HTTP/1.1 or HTTP/2.
async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, payload: Arc<Payload>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let builder = Arc::new(auto::Builder::new(TokioExecutor::new()));
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(_) => {
                // Out of file descriptors and similar: back off as keyd does.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let builder = Arc::clone(&builder);
        let payload = Arc::clone(&payload);
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await
            else {
                return;
            };
            let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let resp = respond(&req, &payload);
                async move { Ok::<_, Infallible>(resp) }
            });
            let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
        });
    }
}

/// The same status and headers keyd's bundle handler sends.
fn respond<B>(req: &Request<B>, payload: &Payload) -> Response<Full<Bytes>> {
    let mut resp = if req
        .headers()
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v == payload.etag)
    {
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = StatusCode::NOT_MODIFIED;
        r
    } else {
        let mut r = Response::new(Full::new(payload.body.clone()));
        let h = r.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        r
    };
    resp.headers_mut()
        .insert(header::ETAG, payload.etag.clone());
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_304_only_for_its_own_etag() {
        let payload = Payload {
            body: Bytes::from_static(b"{\"node\":\"n\"}"),
            etag: HeaderValue::from_static("\"abc\""),
        };
        let get = |inm: Option<&'static str>| {
            let mut b = Request::get("/v1/nodes/n/bundle");
            if let Some(v) = inm {
                b = b.header(header::IF_NONE_MATCH, v);
            }
            b.body(()).map(|r| respond(&r, &payload))
        };
        let full = get(None).expect("request");
        assert_eq!(full.status(), StatusCode::OK);
        assert_eq!(full.headers()[header::ETAG], "\"abc\"");
        let hit = get(Some("\"abc\"")).expect("request");
        assert_eq!(hit.status(), StatusCode::NOT_MODIFIED);
        let miss = get(Some("\"other\"")).expect("request");
        assert_eq!(miss.status(), StatusCode::OK);
    }
}
