//! Talking to keyd over mTLS: register the node, fetch its bundle (`If-None-Match`), acknowledge.
//!
//! One keep-alive connection is reused; any transport error drops it and the next call connects
//! again. The client certificate is re-read when its files change on disk (a renewal by the
//! bootstrap task or by the cluster's own PKI), so no restart is needed.

use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use http::{Method, StatusCode, header};
use keyd_mtls::client::{ClientError, Connection, Connector, Response};
use keyd_mtls::tls::TlsPaths;
use keyd_proto::rules::{DataplaneReport, NodeRules};
use keyd_proto::{Ack, NodeBundle, NodeInfo, NodeRegistration};

#[derive(Debug, thiserror::Error)]
pub enum KeydError {
    /// keyd could not be reached or the exchange broke off: retry with backoff.
    #[error("keyd is unreachable")]
    Unreachable(#[source] ClientError),
    #[error("cannot load the client certificate")]
    Tls(#[source] keyd_mtls::tls::TlsError),
    /// keyd answered with an error status.
    #[error("keyd answered {status}: {message}")]
    Status { status: StatusCode, message: String },
    #[error("keyd's reply is not valid: {0}")]
    Decode(String),
}

impl KeydError {
    pub fn is_not_found(&self) -> bool {
        matches!(self, KeydError::Status { status, .. } if *status == StatusCode::NOT_FOUND)
    }

    /// keyd refused the request's form (a keyd without long polls refuses `?wait=`).
    pub fn is_bad_request(&self) -> bool {
        matches!(self, KeydError::Status { status, .. } if *status == StatusCode::BAD_REQUEST)
    }

    /// A short, bounded label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            KeydError::Unreachable(_) => "unreachable",
            KeydError::Tls(_) => "tls",
            KeydError::Status { status, .. } if status.is_client_error() => "refused",
            KeydError::Status { .. } => "server_error",
            KeydError::Decode(_) => "decode",
        }
    }
}

/// The result of a bundle fetch.
#[derive(Debug)]
pub enum Fetched {
    NotModified,
    Bundle {
        bundle: Box<NodeBundle>,
        etag: String,
    },
}

#[derive(Debug)]
pub struct KeydClient {
    server: String,
    node: String,
    paths: TlsPaths,
    /// Modification times of the certificate files the current connector was built from.
    loaded: Option<(Option<SystemTime>, Option<SystemTime>, Option<SystemTime>)>,
    connector: Option<Connector>,
    conn: Option<Connection>,
    timeout: Duration,
}

fn mtime(p: &PathBuf) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl KeydClient {
    pub fn new(server: &str, node: &str, paths: TlsPaths) -> Self {
        Self {
            server: server.to_owned(),
            node: node.to_owned(),
            paths,
            loaded: None,
            connector: None,
            conn: None,
            timeout: Duration::from_secs(15),
        }
    }

    fn connector(&mut self) -> Result<&Connector, KeydError> {
        let now = (
            mtime(&self.paths.ca),
            mtime(&self.paths.cert),
            mtime(&self.paths.key),
        );
        if self.connector.is_none() || self.loaded != Some(now) {
            let tls = keyd_mtls::tls::client_config(&self.paths).map_err(KeydError::Tls)?;
            self.connector =
                Some(Connector::new(&self.server, tls).map_err(KeydError::Unreachable)?);
            self.loaded = Some(now);
            // A new certificate: the old connection still speaks with the old one.
            self.conn = None;
        }
        // Just set when absent.
        self.connector
            .as_ref()
            .ok_or_else(|| KeydError::Decode("no connector".into()))
    }

    async fn send(
        &mut self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        extra: &[(header::HeaderName, &str)],
    ) -> Result<Response, KeydError> {
        self.send_within(self.timeout, method, path, body, extra)
            .await
    }

    async fn send_within(
        &mut self,
        timeout: Duration,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        extra: &[(header::HeaderName, &str)],
    ) -> Result<Response, KeydError> {
        let connector = self.connector()?.clone();
        if self.conn.is_none() {
            self.conn = Some(connector.connect().await.map_err(KeydError::Unreachable)?);
        }
        let conn = self
            .conn
            .as_mut()
            .ok_or_else(|| KeydError::Decode("no connection".into()))?;
        match tokio::time::timeout(timeout, conn.send(method, path, body, extra)).await {
            Ok(Ok(r)) => Ok(r),
            Ok(Err(e)) => {
                self.conn = None;
                Err(KeydError::Unreachable(e))
            }
            Err(_) => {
                self.conn = None;
                Err(KeydError::Unreachable(ClientError::Timeout {
                    addr: self.server.clone(),
                }))
            }
        }
    }

    fn status_error(r: &Response) -> KeydError {
        KeydError::Status {
            status: r.status,
            message: r.error_message(),
        }
    }

    /// `PUT /v1/nodes/{name}`.
    pub async fn register(&mut self, reg: &NodeRegistration) -> Result<NodeInfo, KeydError> {
        let body = serde_json::to_vec(reg).map_err(|e| KeydError::Decode(e.to_string()))?;
        let path = format!("/v1/nodes/{}", self.node);
        let r = self.send(Method::PUT, &path, Some(body), &[]).await?;
        if !r.status.is_success() {
            return Err(Self::status_error(&r));
        }
        serde_json::from_slice(&r.body).map_err(|e| KeydError::Decode(e.to_string()))
    }

    /// `GET /v1/nodes/{name}/bundle`, conditional on `etag`. The body holds keys: it is parsed
    /// straight into zeroizing types, and keyd's `Bytes` buffer is not copied.
    ///
    /// With `wait` (and an `etag`), a long poll: keyd answers as soon as the bundle changes, or
    /// 304 when `wait` has passed.
    pub async fn fetch_bundle(
        &mut self,
        etag: Option<&str>,
        wait: Option<Duration>,
    ) -> Result<Fetched, KeydError> {
        let Some((r, etag)) = self.get_polled("bundle", etag, wait).await? else {
            return Ok(Fetched::NotModified);
        };
        // serde_json's error names a position, never the input.
        let parsed = serde_json::from_slice::<NodeBundle>(&r.body);
        // The body holds the keys in base64: zero it (when no one else holds the buffer).
        if let Ok(mut body) = r.body.try_into_mut() {
            zeroize::Zeroize::zeroize(&mut body[..]);
        }
        let bundle = parsed.map_err(|e| KeydError::Decode(e.to_string()))?;
        let etag = etag.unwrap_or_else(|| format!("\"{}\"", bundle.revision));
        Ok(Fetched::Bundle {
            bundle: Box::new(bundle),
            etag,
        })
    }

    /// `GET /v1/nodes/{name}/rules`: this node's compiled EncryptionPolicy rules, long-polled
    /// like the bundle. `Ok(None)`: unchanged since `etag`.
    pub async fn fetch_rules(
        &mut self,
        etag: Option<&str>,
        wait: Option<Duration>,
    ) -> Result<Option<(NodeRules, String)>, KeydError> {
        let Some((r, etag)) = self.get_polled("rules", etag, wait).await? else {
            return Ok(None);
        };
        let rules = serde_json::from_slice::<NodeRules>(&r.body)
            .map_err(|e| KeydError::Decode(e.to_string()))?;
        if rules.node != self.node {
            return Err(KeydError::Decode(format!(
                "keyd sent the rules of node {:?}",
                rules.node
            )));
        }
        let etag = etag.unwrap_or_else(|| format!("\"{}\"", rules.revision));
        Ok(Some((rules, etag)))
    }

    /// `GET /v1/nodes/{name}/{resource}`, with `If-None-Match` and, given both, a long poll.
    /// `Ok(None)` for 304; otherwise the response and its `ETag`.
    async fn get_polled(
        &mut self,
        resource: &str,
        etag: Option<&str>,
        wait: Option<Duration>,
    ) -> Result<Option<(Response, Option<String>)>, KeydError> {
        let path = match (etag, wait) {
            (Some(_), Some(w)) => format!(
                "/v1/nodes/{}/{resource}?wait={}ms",
                self.node,
                w.as_millis().max(1)
            ),
            _ => format!("/v1/nodes/{}/{resource}", self.node),
        };
        let budget = self.timeout + wait.unwrap_or_default();
        let extra: Vec<(header::HeaderName, &str)> = etag
            .map(|e| vec![(header::IF_NONE_MATCH, e)])
            .unwrap_or_default();
        let r = self
            .send_within(budget, Method::GET, &path, None, &extra)
            .await?;
        if r.status == StatusCode::NOT_MODIFIED {
            return Ok(None);
        }
        if !r.status.is_success() {
            return Err(Self::status_error(&r));
        }
        let etag = r
            .headers
            .get(header::ETAG)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok(Some((r, etag)))
    }

    /// `POST /v1/nodes/{name}/dataplane`: what this node's data plane enforces and counted.
    pub async fn report_dataplane(&mut self, report: &DataplaneReport) -> Result<(), KeydError> {
        let body = serde_json::to_vec(report).map_err(|e| KeydError::Decode(e.to_string()))?;
        let path = format!("/v1/nodes/{}/dataplane", self.node);
        let r = self
            .send(
                Method::POST,
                &path,
                Some(body),
                &[(header::CONTENT_TYPE, "application/json")],
            )
            .await?;
        if !r.status.is_success() {
            return Err(Self::status_error(&r));
        }
        Ok(())
    }

    pub async fn ack(&mut self, ack: &Ack) -> Result<(), KeydError> {
        let body = serde_json::to_vec(ack).map_err(|e| KeydError::Decode(e.to_string()))?;
        let path = format!("/v1/nodes/{}/ack", self.node);
        let r = self.send(Method::POST, &path, Some(body), &[]).await?;
        if !r.status.is_success() {
            return Err(Self::status_error(&r));
        }
        Ok(())
    }
}
