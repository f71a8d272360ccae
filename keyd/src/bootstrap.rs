//! Node bootstrap, as SPIRE's `k8s_psat` attestor does it: a node agent that has no certificate
//! yet presents its projected ServiceAccount token; keyd asks the Kubernetes API server whether
//! the token is valid (TokenReview, with keyd's audience), whose it is (an allowed service
//! account) and which pod it was issued for, checks that this pod runs on the node the agent
//! names, and issues a short-lived client certificate for `spiffe://keyd/node/NODE` from keyd's
//! CA for the public key of the agent's CSR (whose signature proves the agent holds the key).
//!
//! It is served on a listener of its own (`[bootstrap] listen`) with server-authenticated TLS
//! only, so the mTLS API never accepts a client without a certificate. Every issuance and every
//! refusal is audited.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use http::{Method, header};
use keyd_proto::identity::{Identity, validate_name};
use keyd_proto::{BootstrapRequest, BootstrapResponse, ErrorBody, SecretString};
use serde::Deserialize;
use serde_json::json;
use tokio::net::TcpListener;

use crate::pki::CertificateAuthority;
pub use crate::service::NodeFacts;
use crate::service::{Keyd, NodeDirectory};
use crate::source_limit::{Admit, SourceLimiter, capped};
use crate::store::AuditEvent;
use keyd_mtls::client::Connector;
use keyd_mtls::server::RemoteAddr;
use std::time::Instant;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootstrapConfig {
    pub listen: SocketAddr,
    pub kube_api: String,
    pub kube_ca: PathBuf,
    pub kube_token_file: PathBuf,
    pub audience: String,
    /// (namespace, name)
    pub service_accounts: Vec<(String, String)>,
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub cert_validity: Duration,
    /// Requests per source address and minute (see [`crate::source_limit`]).
    pub max_requests_per_minute: u32,
}

/// Source addresses tracked at once by the rate limit.
const MAX_SOURCES: usize = 10_000;
/// The longest node name and reason a refusal record keeps.
const MAX_RECORDED_NAME: usize = 253;
const MAX_RECORDED_REASON: usize = 512;

/// What the API server said about a token (`TokenReview.status`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct TokenReviewStatus {
    #[serde(default)]
    pub authenticated: bool,
    #[serde(default)]
    pub user: ReviewedUser,
    #[serde(default)]
    pub audiences: Vec<String>,
    #[serde(default)]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ReviewedUser {
    #[serde(default)]
    pub username: String,
    #[serde(default)]
    pub uid: String,
    /// For a bound token: `authentication.kubernetes.io/pod-name` and `.../pod-uid`.
    #[serde(default)]
    pub extra: BTreeMap<String, Vec<String>>,
}

/// The facts about a pod that the decision needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodFacts {
    pub uid: String,
    pub node_name: Option<String>,
    pub phase: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum KubeError {
    #[error("cannot read keyd's Kubernetes token {path}")]
    Token {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the Kubernetes API server is unreachable")]
    Unreachable(#[source] keyd_mtls::client::ClientError),
    #[error("the Kubernetes API server answered {status} to {what}")]
    Status { what: &'static str, status: u16 },
    #[error("the Kubernetes API server's answer to {what} is not valid")]
    Decode { what: &'static str },
    #[error("the Kubernetes API server did not answer {what} within {}s", KUBE_TIMEOUT.as_secs())]
    Timeout { what: &'static str },
}

/// How long one call to the Kubernetes API server may take (connection, TLS and answer).
const KUBE_TIMEOUT: Duration = Duration::from_secs(10);

/// The two Kubernetes API calls bootstrap makes; a fake stands in for it in unit tests.
#[async_trait::async_trait]
pub trait KubeAuth: Send + Sync + fmt::Debug {
    async fn token_review(
        &self,
        token: &SecretString,
        audience: &str,
    ) -> Result<TokenReviewStatus, KubeError>;
    /// `None` if there is no such pod.
    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodFacts>, KubeError>;
    /// The Node object `name`'s addresses and pod CIDRs; `None` if there is no such node.
    async fn node(&self, name: &str) -> Result<Option<NodeFacts>, KubeError>;
}

/// Bootstrap's Kubernetes client as the service's source of Node objects, against which nodes'
/// claims are checked (`[nodes] claims = "node-object"`).
#[derive(Debug)]
pub struct KubeNodes(pub Arc<dyn KubeAuth>);

#[async_trait::async_trait]
impl NodeDirectory for KubeNodes {
    async fn node(&self, name: &str) -> Result<Option<NodeFacts>, String> {
        self.0.node(name).await.map_err(|e| e.to_string())
    }
}

/// The real API server, over HTTPS with keyd's bearer token.
#[derive(Debug)]
pub struct KubeApi {
    connector: Connector,
    token_file: PathBuf,
}

impl KubeApi {
    pub fn new(server: &str, ca: &Path, token_file: &Path) -> anyhow::Result<Self> {
        let config = keyd_mtls::tls::server_auth_client_config(ca)?;
        Ok(Self {
            connector: Connector::new(server, config)?,
            token_file: token_file.to_owned(),
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &'static str,
    ) -> Result<Option<bytes::Bytes>, KubeError> {
        tokio::time::timeout(KUBE_TIMEOUT, self.call_once(method, path, body, what))
            .await
            .map_err(|_| KubeError::Timeout { what })?
    }

    async fn call_once(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        what: &'static str,
    ) -> Result<Option<bytes::Bytes>, KubeError> {
        let token = zeroize::Zeroizing::new(std::fs::read_to_string(&self.token_file).map_err(
            |source| KubeError::Token {
                path: self.token_file.clone(),
                source,
            },
        )?);
        let auth = zeroize::Zeroizing::new(format!("Bearer {}", token.trim()));
        let mut conn = self
            .connector
            .connect()
            .await
            .map_err(KubeError::Unreachable)?;
        let resp = conn
            .send(
                method,
                path,
                body,
                &[
                    (header::AUTHORIZATION, auth.as_str()),
                    (header::ACCEPT, "application/json"),
                ],
            )
            .await
            .map_err(KubeError::Unreachable)?;
        if resp.status == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !resp.status.is_success() {
            return Err(KubeError::Status {
                what,
                status: resp.status.as_u16(),
            });
        }
        Ok(Some(resp.body))
    }
}

#[async_trait::async_trait]
impl KubeAuth for KubeApi {
    async fn token_review(
        &self,
        token: &SecretString,
        audience: &str,
    ) -> Result<TokenReviewStatus, KubeError> {
        let what = "a TokenReview";
        let body = zeroize::Zeroizing::new(
            serde_json::to_vec(&json!({
                "apiVersion": "authentication.k8s.io/v1",
                "kind": "TokenReview",
                "spec": { "token": token.expose(), "audiences": [audience] }
            }))
            .map_err(|_| KubeError::Decode { what })?,
        );
        let resp = self
            .call(
                Method::POST,
                "/apis/authentication.k8s.io/v1/tokenreviews",
                Some(body.to_vec()),
                what,
            )
            .await?
            .ok_or(KubeError::Status { what, status: 404 })?;
        #[derive(Deserialize)]
        struct Review {
            #[serde(default)]
            status: TokenReviewStatus,
        }
        serde_json::from_slice::<Review>(&resp)
            .map(|r| r.status)
            .map_err(|_| KubeError::Decode { what })
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodFacts>, KubeError> {
        let what = "reading a pod";
        let Some(body) = self
            .call(
                Method::GET,
                &format!("/api/v1/namespaces/{namespace}/pods/{name}"),
                None,
                what,
            )
            .await?
        else {
            return Ok(None);
        };
        #[derive(Deserialize)]
        struct Pod {
            metadata: Meta,
            #[serde(default)]
            spec: Spec,
            #[serde(default)]
            status: PodStatus,
        }
        #[derive(Deserialize)]
        struct Meta {
            uid: String,
        }
        #[derive(Deserialize, Default)]
        struct Spec {
            #[serde(rename = "nodeName")]
            node_name: Option<String>,
        }
        #[derive(Deserialize, Default)]
        struct PodStatus {
            phase: Option<String>,
        }
        let pod: Pod = serde_json::from_slice(&body).map_err(|_| KubeError::Decode { what })?;
        Ok(Some(PodFacts {
            uid: pod.metadata.uid,
            node_name: pod.spec.node_name,
            phase: pod.status.phase,
        }))
    }

    async fn node(&self, name: &str) -> Result<Option<NodeFacts>, KubeError> {
        let what = "reading a node";
        let Some(body) = self
            .call(Method::GET, &format!("/api/v1/nodes/{name}"), None, what)
            .await?
        else {
            return Ok(None);
        };
        node_facts(&body)
            .map(Some)
            .ok_or(KubeError::Decode { what })
    }
}

/// A Node object's IP addresses (`status.addresses` of type InternalIP or ExternalIP) and pod
/// CIDRs (`spec.podCIDRs`, else `spec.podCIDR`); `None` if `body` is not a Node.
pub fn node_facts(body: &[u8]) -> Option<NodeFacts> {
    #[derive(Deserialize)]
    struct Node {
        #[serde(default)]
        spec: Spec,
        #[serde(default)]
        status: Status,
    }
    #[derive(Deserialize, Default)]
    struct Spec {
        #[serde(rename = "podCIDR")]
        pod_cidr: Option<String>,
        #[serde(rename = "podCIDRs", default)]
        pod_cidrs: Vec<String>,
    }
    #[derive(Deserialize, Default)]
    struct Status {
        #[serde(default)]
        addresses: Vec<Address>,
    }
    #[derive(Deserialize)]
    struct Address {
        #[serde(rename = "type")]
        kind: String,
        address: String,
    }
    let node: Node = serde_json::from_slice(body).ok()?;
    let mut cidrs = node.spec.pod_cidrs;
    if cidrs.is_empty() {
        cidrs.extend(node.spec.pod_cidr);
    }
    Some(NodeFacts {
        addresses: node
            .status
            .addresses
            .iter()
            .filter(|a| matches!(a.kind.as_str(), "InternalIP" | "ExternalIP"))
            .filter_map(|a| a.address.parse().ok())
            .collect(),
        // A CIDR the API server accepted but that does not parse here allows nothing.
        pod_cidrs: cidrs.iter().filter_map(|c| c.parse().ok()).collect(),
    })
}

const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
/// Set by API servers from 1.30 on (ServiceAccountTokenPodNodeInfo): the node the pod was bound
/// to when the token was issued.
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";

/// Who the token proved to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attested {
    pub namespace: String,
    pub service_account: String,
    pub pod: String,
    pub pod_uid: String,
    /// The node the token names, where the API server puts it in.
    pub node: Option<String>,
}

/// The decision on the API server's answers: pure, so every refusal is unit-tested.
pub fn check_review(review: &TokenReviewStatus, cfg: &BootstrapConfig) -> Result<Attested, String> {
    if !review.authenticated {
        return Err(format!(
            "the token is not valid{}",
            review
                .error
                .as_deref()
                .map(|e| format!(": {e}"))
                .unwrap_or_default()
        ));
    }
    if !review.audiences.contains(&cfg.audience) {
        return Err(format!(
            "the token is not for audience {:?} (project it with `audience: {}`)",
            cfg.audience, cfg.audience
        ));
    }
    let (namespace, service_account) = review
        .user
        .username
        .strip_prefix("system:serviceaccount:")
        .and_then(|r| r.split_once(':'))
        .ok_or_else(|| format!("{:?} is not a service account", review.user.username))?;
    if !cfg
        .service_accounts
        .iter()
        .any(|(ns, n)| ns == namespace && n == service_account)
    {
        return Err(format!(
            "service account {namespace}/{service_account} may not bootstrap nodes"
        ));
    }
    let one = |k: &str| review.user.extra.get(k).and_then(|v| v.first()).cloned();
    let (Some(pod), Some(pod_uid)) = (one(POD_NAME), one(POD_UID)) else {
        return Err(
            "the token is not bound to a pod (use a projected service account token)".into(),
        );
    };
    Ok(Attested {
        namespace: namespace.to_owned(),
        service_account: service_account.to_owned(),
        pod,
        pod_uid,
        node: one(NODE_NAME),
    })
}

pub fn check_pod(a: &Attested, pod: Option<&PodFacts>, node: &str) -> Result<(), String> {
    if let Some(n) = a.node.as_deref().filter(|n| *n != node) {
        return Err(format!(
            "the token was issued for a pod on node {n:?}, not {node:?}"
        ));
    }
    let pod = pod.ok_or_else(|| format!("pod {}/{} does not exist", a.namespace, a.pod))?;
    if pod.uid != a.pod_uid {
        return Err(format!(
            "pod {}/{} was replaced since the token was issued",
            a.namespace, a.pod
        ));
    }
    match pod.node_name.as_deref() {
        Some(n) if n == node => {}
        Some(n) => {
            return Err(format!(
                "pod {}/{} runs on node {n:?}, not {node:?}",
                a.namespace, a.pod
            ));
        }
        None => return Err(format!("pod {}/{} is not scheduled", a.namespace, a.pod)),
    }
    match pod.phase.as_deref() {
        Some("Succeeded" | "Failed") => {
            Err(format!("pod {}/{} has terminated", a.namespace, a.pod))
        }
        Some("Running") => Ok(()),
        // A pod whose containers have not started cannot be asking; its token is elsewhere.
        other => Err(format!(
            "pod {}/{} is not running (phase {})",
            a.namespace,
            a.pod,
            other.unwrap_or("unknown")
        )),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Refused(String),
    #[error("cannot check the token")]
    Kube(#[source] KubeError),
    #[error("cannot issue the certificate")]
    Pki(#[source] crate::pki::PkiError),
    /// The issuance could not be recorded, so the certificate is not handed out.
    #[error("cannot record the issuance in the audit log")]
    Audit(#[source] crate::service::ServiceError),
}

#[derive(Clone)]
pub struct Bootstrap {
    cfg: Arc<BootstrapConfig>,
    ca: Arc<CertificateAuthority>,
    kube: Arc<dyn KubeAuth>,
    keyd: Arc<Keyd>,
    limiter: Arc<SourceLimiter>,
}

impl fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bootstrap")
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Bootstrap {
    pub fn new(
        cfg: BootstrapConfig,
        kube: Arc<dyn KubeAuth>,
        keyd: Arc<Keyd>,
    ) -> Result<Self, crate::pki::PkiError> {
        let ca = CertificateAuthority::load(&cfg.ca_cert, &cfg.ca_key)?;
        Ok(Self {
            limiter: Arc::new(SourceLimiter::new(cfg.max_requests_per_minute, MAX_SOURCES)),
            cfg: Arc::new(cfg),
            ca: Arc::new(ca),
            kube,
            keyd,
        })
    }

    /// Checks the token and the pod, then issues. Refusals are audited by the caller.
    pub async fn handle(
        &self,
        req: &BootstrapRequest,
    ) -> Result<BootstrapResponse, BootstrapError> {
        validate_name(&req.node).map_err(|e| BootstrapError::Invalid(format!("node: {e}")))?;
        // A removed node gets no new certificate until an admin readmits it, and a readmitted
        // one none that predates its removal.
        let removal = self.keyd.node_removal(&req.node);
        if let Some(r) = removal.as_ref().filter(|r| !r.readmitted) {
            return Err(BootstrapError::Refused(r.refusal(&req.node)));
        }
        if req.token.expose().is_empty() || req.token.expose().len() > 16 * 1024 {
            return Err(BootstrapError::Invalid("token: empty or too long".into()));
        }
        let review = self
            .kube
            .token_review(&req.token, &self.cfg.audience)
            .await
            .map_err(BootstrapError::Kube)?;
        let who = check_review(&review, &self.cfg).map_err(BootstrapError::Refused)?;
        let pod = self
            .kube
            .pod(&who.namespace, &who.pod)
            .await
            .map_err(BootstrapError::Kube)?;
        check_pod(&who, pod.as_ref(), &req.node).map_err(BootstrapError::Refused)?;
        if self
            .kube
            .node(&req.node)
            .await
            .map_err(BootstrapError::Kube)?
            .is_none()
        {
            return Err(BootstrapError::Refused(format!(
                "node {:?} does not exist in Kubernetes",
                req.node
            )));
        }
        let issued = self
            .ca
            .issue_client_for_csr(
                &Identity::Node(req.node.clone()),
                &req.csr,
                self.cfg.cert_validity,
                removal.map(|r| r.at.0),
            )
            .map_err(|e| match e {
                crate::pki::PkiError::Rcgen {
                    what: "parsing the CSR",
                    ..
                } => BootstrapError::Invalid(
                    "csr: not a PKCS#10 request in PEM with a valid signature".into(),
                ),
                other => BootstrapError::Pki(other),
            })?;
        // Durable before the certificate leaves: an issuance nobody can audit does not happen.
        self.keyd
            .audit(AuditEvent::new(
                "node.certificate.issued",
                Identity::Node(req.node.clone()),
                json!({ "node": req.node, "pod": format!("{}/{}", who.namespace, who.pod),
                        "service_account": format!("{}/{}", who.namespace, who.service_account),
                        "serial": issued.serial,
                        "not_after": issued.not_after.to_string(), "via": "bootstrap" }),
            ))
            .await
            .map_err(BootstrapError::Audit)?;
        Ok(BootstrapResponse {
            certificate: issued.cert_pem,
            not_before: issued.not_before,
            not_after: issued.not_after,
        })
    }
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        Json(ErrorBody {
            error: code.to_owned(),
            message,
        }),
    )
        .into_response()
}

async fn bootstrap_node(
    State(b): State<Bootstrap>,
    remote: Option<Extension<RemoteAddr>>,
    body: axum::body::Bytes,
) -> Response {
    let source = remote.map(|Extension(RemoteAddr(a))| a.ip());
    if let Some(ip) = source
        && let Admit::Limited(wait) = b.limiter.admit(ip, Instant::now())
    {
        let secs = wait.as_secs().max(1);
        let mut r = error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "more than {} bootstrap requests a minute from {ip}; try again in {secs} s",
                b.cfg.max_requests_per_minute
            ),
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, header::HeaderValue::from(secs));
        return r;
    }
    let req: BootstrapRequest = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => return error(StatusCode::BAD_REQUEST, "invalid_body", e.to_string()),
    };
    match b.handle(&req).await {
        Ok(resp) => {
            tracing::info!(node = %req.node, not_after = %resp.not_after, "node certificate issued");
            (StatusCode::OK, Json(resp)).into_response()
        }
        Err(e) => {
            let text = keyd_mtls::error_chain(&e);
            let node = capped(&req.node, MAX_RECORDED_NAME);
            let reason = capped(&text, MAX_RECORDED_REASON);
            tracing::warn!(%node, error = %reason, source = ?source, "bootstrap refused");
            // The first refusal of a source in a window is recorded in full; the rest of the
            // window is summarised (see `summarise`), so a loop of bad requests cannot fill the
            // disk.
            if source.is_none_or(|ip| b.limiter.refused(ip, &reason, Instant::now())) {
                let _ = b
                    .keyd
                    .audit(AuditEvent::new(
                        "bootstrap.refused",
                        "anonymous",
                        json!({ "node": node, "reason": reason, "source": source }),
                    ))
                    .await;
            }
            match e {
                BootstrapError::Invalid(m) => error(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m),
                BootstrapError::Refused(m) => error(StatusCode::FORBIDDEN, "forbidden", m),
                BootstrapError::Kube(_) => {
                    error(StatusCode::BAD_GATEWAY, "kubernetes_unavailable", text)
                }
                BootstrapError::Pki(_) => {
                    error(StatusCode::INTERNAL_SERVER_ERROR, "internal", text)
                }
                BootstrapError::Audit(_) => {
                    error(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", text)
                }
            }
        }
    }
}

pub fn router(b: Bootstrap) -> Router {
    Router::new()
        .route("/v1/bootstrap/node", post(bootstrap_node))
        .layer(axum::extract::DefaultBodyLimit::max(64 * 1024))
        .with_state(b)
}

/// Binds the bootstrap listener; the future serves until `shutdown`. It serves keyd's server
/// certificate without asking for a client certificate (a bootstrapping node has none yet), and
/// reloads it from disk like the API listener does.
pub async fn start(
    cfg: BootstrapConfig,
    tls: &keyd_mtls::tls::TlsPaths,
    reload_interval: Duration,
    keyd: Arc<Keyd>,
    kube: Arc<dyn KubeAuth>,
    limits: keyd_mtls::server::Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(
    SocketAddr,
    std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
)> {
    let paths = keyd_mtls::tls::ServerTlsPaths {
        cert: tls.cert.clone(),
        key: tls.key.clone(),
        client_ca: None,
    };
    let (rx, reloader) = keyd_mtls::tls::watch_server_config(paths, reload_interval)?;
    let listener = TcpListener::bind(cfg.listen).await?;
    let addr = listener.local_addr()?;
    let metrics = keyd.metrics.clone();
    let b = Bootstrap::new(cfg, kube, keyd)?;
    let limiter = Arc::clone(&b.limiter);
    let audit_to = Arc::clone(&b.keyd);
    let fut = async move {
        let serve = keyd_mtls::server::serve_tls_router(
            listener,
            rx,
            router(b),
            limits,
            move |outcome| {
                metrics
                    .tls_handshakes
                    .get_or_create(&crate::telemetry::Outcome { outcome })
                    .inc();
            },
            shutdown,
        );
        tokio::select! {
            () = serve => {}
            () = async {
                loop {
                    tokio::time::sleep(crate::source_limit::WINDOW / 4).await;
                    summarise(&limiter, &audit_to, false).await;
                }
            } => {}
        }
        summarise(&limiter, &audit_to, true).await;
        reloader.abort();
    };
    Ok((addr, Box::pin(fut)))
}

/// Records what the rate limit counted but did not record in full: one
/// `bootstrap.refused.summary` per source and window that had more than its first refusal.
async fn summarise(limiter: &SourceLimiter, keyd: &Keyd, flush: bool) {
    for s in limiter.take_summaries(Instant::now(), flush) {
        let _ = keyd
            .audit(AuditEvent::new(
                "bootstrap.refused.summary",
                "anonymous",
                json!({ "source": s.source.map_or_else(|| "other (table full)".to_owned(), |ip| ip.to_string()),
                        "refusals": s.refusals, "rate_limited": s.rate_limited,
                        "last_reason": s.last_reason,
                        "window_secs": crate::source_limit::WINDOW.as_secs() }),
            ))
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BootstrapConfig {
        BootstrapConfig {
            listen: "127.0.0.1:0".parse().unwrap(),
            kube_api: "https://k".into(),
            kube_ca: "/ca".into(),
            kube_token_file: "/t".into(),
            audience: "keyd".into(),
            service_accounts: vec![("keyd".into(), "node-shim".into())],
            ca_cert: "/c".into(),
            ca_key: "/k".into(),
            cert_validity: Duration::from_secs(3600),
            max_requests_per_minute: 30,
        }
    }

    fn review() -> TokenReviewStatus {
        TokenReviewStatus {
            authenticated: true,
            user: ReviewedUser {
                username: "system:serviceaccount:keyd:node-shim".into(),
                uid: "u".into(),
                extra: BTreeMap::from([
                    (POD_NAME.to_owned(), vec!["node-shim-abcde".to_owned()]),
                    (POD_UID.to_owned(), vec!["uid-1".to_owned()]),
                ]),
            },
            audiences: vec!["keyd".into()],
            error: None,
        }
    }

    #[test]
    fn accepts_a_bound_token_of_an_allowed_service_account() {
        let a = check_review(&review(), &cfg()).unwrap();
        assert_eq!(a.pod, "node-shim-abcde");
        let pod = PodFacts {
            uid: "uid-1".into(),
            node_name: Some("worker-1".into()),
            phase: Some("Running".into()),
        };
        check_pod(&a, Some(&pod), "worker-1").unwrap();
    }

    #[test]
    fn a_node_object_gives_its_ip_addresses_and_pod_cidrs() {
        let body = json!({
            "kind": "Node",
            "metadata": { "name": "node-a" },
            "spec": { "podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24", "fd00:1::/64"] },
            "status": { "addresses": [
                { "type": "InternalIP", "address": "192.168.0.1" },
                { "type": "ExternalIP", "address": "2001:db8::1" },
                { "type": "Hostname", "address": "node-a" },
                { "type": "InternalDNS", "address": "10.9.9.9" } ] }
        });
        let facts = node_facts(body.to_string().as_bytes()).unwrap();
        assert_eq!(
            facts.addresses,
            vec![
                "192.168.0.1".parse::<std::net::IpAddr>().unwrap(),
                "2001:db8::1".parse().unwrap()
            ]
        );
        assert_eq!(facts.pod_cidrs.len(), 2);
        // An older API server's single podCIDR; a Node without status or spec allows nothing.
        let old = json!({ "spec": { "podCIDR": "10.2.0.0/24" } });
        let facts = node_facts(old.to_string().as_bytes()).unwrap();
        assert_eq!(facts.pod_cidrs, vec!["10.2.0.0/24".parse().unwrap()]);
        assert!(facts.addresses.is_empty());
        assert_eq!(node_facts(b"{}").unwrap(), NodeFacts::default());
        assert_eq!(node_facts(b"[1]"), None);
    }

    #[test]
    fn refusals_say_why() {
        let c = cfg();
        let mut r = review();
        r.authenticated = false;
        r.error = Some("token expired".into());
        assert!(check_review(&r, &c).unwrap_err().contains("token expired"));
        let mut r = review();
        r.audiences = vec!["https://kubernetes.default.svc".into()];
        assert!(check_review(&r, &c).unwrap_err().contains("audience"));
        let mut r = review();
        r.user.username = "system:serviceaccount:default:default".into();
        assert!(
            check_review(&r, &c)
                .unwrap_err()
                .contains("may not bootstrap")
        );
        let mut r = review();
        r.user.username = "alice".into();
        assert!(
            check_review(&r, &c)
                .unwrap_err()
                .contains("not a service account")
        );
        let mut r = review();
        r.user.extra.clear();
        assert!(
            check_review(&r, &c)
                .unwrap_err()
                .contains("not bound to a pod")
        );

        let a = check_review(&review(), &c).unwrap();
        let pod = |uid: &str, node: Option<&str>, phase: &str| PodFacts {
            uid: uid.into(),
            node_name: node.map(str::to_owned),
            phase: Some(phase.into()),
        };
        assert!(
            check_pod(&a, None, "w")
                .unwrap_err()
                .contains("does not exist")
        );
        assert!(
            check_pod(&a, Some(&pod("other", Some("w"), "Running")), "w")
                .unwrap_err()
                .contains("replaced")
        );
        assert!(
            check_pod(&a, Some(&pod("uid-1", Some("w2"), "Running")), "w")
                .unwrap_err()
                .contains("runs on node")
        );
        assert!(
            check_pod(&a, Some(&pod("uid-1", None, "Pending")), "w")
                .unwrap_err()
                .contains("not scheduled")
        );
        assert!(
            check_pod(&a, Some(&pod("uid-1", Some("w"), "Failed")), "w")
                .unwrap_err()
                .contains("terminated")
        );
        assert!(
            check_pod(&a, Some(&pod("uid-1", Some("w"), "Pending")), "w")
                .unwrap_err()
                .contains("not running (phase Pending)")
        );
        // A token that names its node (API servers from 1.30 on) must name this one.
        let mut r = review();
        r.user.extra.insert(NODE_NAME.into(), vec!["w2".into()]);
        let a = check_review(&r, &c).unwrap();
        assert!(
            check_pod(&a, Some(&pod("uid-1", Some("w"), "Running")), "w")
                .unwrap_err()
                .contains("issued for a pod on node \"w2\"")
        );
        check_pod(&a, Some(&pod("uid-1", Some("w2"), "Running")), "w2").unwrap();
    }
}
