//! A small mTLS HTTP/1.1 client for keyd's API: used by `keyctl`, the load generator and tests.
//!
//! One [`Connection`] is one keep-alive TLS connection; requests on it run one after another.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, header};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use serde::Deserialize;
use tokio::net::TcpStream;

use crate::tls::{TlsError, TlsPaths};

/// Where keyd is and which certificate to present: the `keyctl.toml` file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSettings {
    /// `https://HOST:PORT`.
    pub server: String,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("server {0:?} is not a URL like https://127.0.0.1:8443")]
    BadServer(String),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error("cannot connect to {addr}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed (is the client certificate issued by keyd's CA?)")]
    Handshake {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("connecting to {addr} timed out")]
    Timeout { addr: String },
    #[error("HTTP exchange failed")]
    Http(#[from] hyper::Error),
    #[error("cannot build request: {0}")]
    Request(String),
}

/// A connector: resolved target plus TLS settings; cheap to clone.
#[derive(Clone)]
pub struct Connector {
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    tls: tokio_rustls::TlsConnector,
    timeout: Duration,
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Connector({}:{})", self.host, self.port)
    }
}

impl Connector {
    pub fn from_settings(s: &ClientSettings) -> Result<Self, ClientError> {
        let tls = crate::tls::client_config(&TlsPaths {
            ca: s.ca.clone(),
            cert: s.cert.clone(),
            key: s.key.clone(),
        })?;
        Self::new(&s.server, tls)
    }

    pub fn new(server: &str, tls: Arc<ClientConfig>) -> Result<Self, ClientError> {
        let bad = || ClientError::BadServer(server.to_owned());
        let rest = server
            .strip_prefix("https://")
            .ok_or_else(bad)?
            .trim_end_matches('/');
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !h.is_empty() => (h, p.parse::<u16>().map_err(|_| bad())?),
            _ => (rest, 443),
        };
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host.clone()).map_err(|_| bad())?;
        Ok(Self {
            host,
            port,
            server_name,
            tls: tokio_rustls::TlsConnector::from(tls),
            timeout: Duration::from_secs(10),
        })
    }

    pub async fn connect(&self) -> Result<Connection, ClientError> {
        let addr = format!("{}:{}", self.host, self.port);
        let fut = async {
            let tcp = TcpStream::connect((self.host.as_str(), self.port))
                .await
                .map_err(|source| ClientError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            let tls = self
                .tls
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|source| ClientError::Handshake {
                    addr: addr.clone(),
                    source,
                })?;
            let (sender, conn) = http1::handshake(TokioIo::new(tls)).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Connection {
                sender,
                authority: addr.clone(),
            })
        };
        tokio::time::timeout(self.timeout, fut)
            .await
            .map_err(|_| ClientError::Timeout { addr: addr.clone() })?
    }
}

/// One keep-alive connection.
pub struct Connection {
    sender: http1::SendRequest<Full<Bytes>>,
    authority: String,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Connection({})", self.authority)
    }
}

/// A buffered response.
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

// Bodies may hold key material.
impl fmt::Debug for Response {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Response")
            .field("status", &self.status)
            .field("body_len", &self.body.len())
            .finish()
    }
}

impl Response {
    /// The server's error message, if the body is a keyd error.
    pub fn error_message(&self) -> String {
        serde_json::from_slice::<keyd_proto::ErrorBody>(&self.body)
            .map(|e| e.message)
            .unwrap_or_else(|_| {
                String::from_utf8_lossy(&self.body)
                    .chars()
                    .take(200)
                    .collect()
            })
    }
}

impl Connection {
    pub async fn send(
        &mut self,
        method: Method,
        path: &str,
        json: Option<Vec<u8>>,
        extra: &[(header::HeaderName, &str)],
    ) -> Result<Response, ClientError> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, &self.authority);
        if json.is_some() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        for (k, v) in extra {
            req = req.header(k, *v);
        }
        let req = req
            .body(Full::new(json.map(Bytes::from).unwrap_or_default()))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok(Response {
            status: parts.status,
            headers: parts.headers,
            body,
        })
    }

    /// Sends a GET and returns the response head with its body unread, for streaming large
    /// bodies (audit exports) without holding them in memory.
    pub async fn get_streaming(
        &mut self,
        path: &str,
    ) -> Result<http::Response<hyper::body::Incoming>, ClientError> {
        let req = Request::builder()
            .method(Method::GET)
            .uri(path)
            .header(header::HOST, &self.authority)
            .body(Full::new(Bytes::new()))
            .map_err(|e| ClientError::Request(e.to_string()))?;
        self.sender.ready().await?;
        Ok(self.sender.send_request(req).await?)
    }

    pub async fn get(&mut self, path: &str) -> Result<Response, ClientError> {
        self.send(Method::GET, path, None, &[]).await
    }

    pub async fn post_json<T: serde::Serialize>(
        &mut self,
        path: &str,
        body: &T,
    ) -> Result<Response, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| ClientError::Request(e.to_string()))?;
        self.send(Method::POST, path, Some(json), &[]).await
    }

    pub async fn put_json<T: serde::Serialize>(
        &mut self,
        path: &str,
        body: &T,
    ) -> Result<Response, ClientError> {
        let json = serde_json::to_vec(body).map_err(|e| ClientError::Request(e.to_string()))?;
        self.send(Method::PUT, path, Some(json), &[]).await
    }
}
