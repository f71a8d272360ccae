//! **A test double of HashiCorp Vault's HTTP API** — not Vault. No Vault (or OpenBao) server
//! can be installed on the machines this project is built on, so keyd's vault-transit backend
//! is tested against this server, which implements the parts of Vault's documented HTTP API
//! that keyd uses, with Vault's request and response shapes, status codes and error messages:
//!
//! - transit (`/v1/<mount>/...`): `keys/:name` (create, read, delete), `keys/:name/config`
//!   (`min_decryption_version`, `min_encryption_version`, `deletion_allowed`),
//!   `keys/:name/rotate`, `datakey/{plaintext,wrapped}/:name`, `encrypt/:name` (with the
//!   create-capability upsert), `decrypt/:name`, `rewrap/:name`. Keys are `aes256-gcm96`;
//!   derived keys use HKDF-SHA256 over the key version with the request's `context` (Vault's
//!   default KDF); ciphertexts are `vault:vN:base64(nonce || ciphertext || tag)`.
//! - auth: tokens (`auth/token/create`, `lookup-self`, `revoke-self`, TTLs), AppRole
//!   (`role/:name`, `role-id`, `secret-id`, `login`), Kubernetes (`config`, `role/:name`,
//!   `login`). The Kubernetes TokenReview that Vault makes against the API server is answered
//!   by this double's simulated API server: [`VaultDouble::issue_service_account_token`] mints
//!   a ServiceAccount JWT it will accept; `pem_keys` signature checks are not modelled.
//! - `sys/mounts/:path`, `sys/auth/:path`, `sys/policies/acl/:name` (JSON or the simple HCL
//!   `path "..." { capabilities = [...] }` form), `sys/health`; ACL enforcement with exact,
//!   `*` (prefix) and `+` (segment) paths, 403 `permission denied` otherwise.
//! - `X-Vault-Namespace` and `sys/namespaces/:path` (Vault Enterprise / HCP): each namespace
//!   has its own mounts, policies and tokens.
//! - Faults for tests: [`VaultDouble::stop`] / [`VaultDouble::start_again`] (the listener and
//!   every open connection go away, state is kept), [`VaultDouble::seal`] (503 `Vault is
//!   sealed`), TLS with its own CA ([`VaultDouble::start_tls`]).
//!
//! Not modelled: batch input, convergent encryption, key export, non-AES key types, leases on
//! secrets, response wrapping, path-prefixed namespaces. keyd's suite runs unchanged against a
//! real Vault when `VAULT_ADDR` and `VAULT_TOKEN` are set (see the README).

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt as _, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{Value, json};
use tokio::net::TcpListener;
use tokio::task::JoinSet;

/// The permission-denied body, as Vault writes it (a Go multierror).
const PERMISSION_DENIED: &str = "1 error occurred:\n\t* permission denied\n\n";
const MISSING_CONTEXT: &str = "missing 'context' for key derivation; the key was created using a derived key, which means additional, per-request information must be included in order to perform operations with the key";

/// A running test double; see the module documentation.
pub struct VaultDouble {
    state: Arc<Mutex<State>>,
    addr: SocketAddr,
    tls: Option<Tls>,
    root_token: String,
    server: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for VaultDouble {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VaultDouble")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish_non_exhaustive()
    }
}

#[derive(Clone)]
struct Tls {
    acceptor: tokio_rustls::TlsAcceptor,
    ca_pem: String,
}

#[derive(Default)]
struct State {
    sealed: bool,
    namespaces: HashMap<String, Namespace>,
    tokens: HashMap<String, Token>,
    /// The simulated Kubernetes API server's valid ServiceAccount tokens.
    sa_tokens: HashMap<String, ()>,
    /// Requests by `METHOD path` (without `/v1/`), for tests that count calls.
    requests: BTreeMap<String, u64>,
    /// Every plaintext the transit engine received or returned, so that a test can search
    /// logs for them.
    plaintexts: Vec<Vec<u8>>,
    next_id: u64,
}

#[derive(Default)]
struct Namespace {
    transit: HashMap<String, HashMap<String, TransitKey>>,
    approle: HashMap<String, HashMap<String, AppRole>>,
    kubernetes: HashMap<String, Kubernetes>,
    policies: HashMap<String, Vec<Rule>>,
}

struct TransitKey {
    derived: bool,
    versions: Vec<([u8; 32], u64)>,
    min_decryption_version: u64,
    min_encryption_version: u64,
    deletion_allowed: bool,
}

#[derive(Clone)]
struct Token {
    namespace: String,
    policies: Vec<String>,
    expires: Option<Instant>,
    ttl: u64,
}

struct AppRole {
    role_id: String,
    secret_ids: Vec<String>,
    policies: Vec<String>,
    ttl: u64,
}

#[derive(Default)]
struct Kubernetes {
    configured: bool,
    issuer: Option<String>,
    disable_iss_validation: bool,
    roles: HashMap<String, K8sRole>,
}

struct K8sRole {
    names: Vec<String>,
    namespaces: Vec<String>,
    policies: Vec<String>,
    ttl: u64,
    audience: Option<String>,
}

#[derive(Clone, Debug)]
struct Rule {
    path: String,
    caps: Vec<String>,
}

impl VaultDouble {
    /// Starts the double over plain HTTP on a loopback port, with a root token.
    pub async fn start() -> Self {
        Self::start_with(None).await
    }

    /// Starts the double over HTTPS with a certificate for 127.0.0.1 from its own CA
    /// ([`VaultDouble::ca_pem`]).
    pub async fn start_tls() -> Self {
        Self::start_with(Some(make_tls())).await
    }

    async fn start_with(tls: Option<Tls>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let root_token = format!("hvs.root-{}", random_hex(12));
        let mut state = State::default();
        state.namespaces.insert(String::new(), Namespace::default());
        state.tokens.insert(
            root_token.clone(),
            Token {
                namespace: String::new(),
                policies: vec!["root".into()],
                expires: None,
                ttl: 0,
            },
        );
        let state = Arc::new(Mutex::new(state));
        let server = tokio::spawn(serve(listener, Arc::clone(&state), tls.clone()));
        Self {
            state,
            addr,
            tls,
            root_token,
            server: Mutex::new(Some(server)),
        }
    }

    /// `http://127.0.0.1:PORT` or `https://127.0.0.1:PORT`.
    pub fn address(&self) -> String {
        format!(
            "{}://{}",
            if self.tls.is_some() { "https" } else { "http" },
            self.addr
        )
    }

    pub fn root_token(&self) -> &str {
        &self.root_token
    }

    /// The CA certificate (PEM) that signed the double's server certificate.
    pub fn ca_pem(&self) -> Option<&str> {
        self.tls.as_ref().map(|t| t.ca_pem.as_str())
    }

    /// Closes the listener and every open connection; the state is kept.
    pub async fn stop(&self) {
        let task = self.server.lock().expect("lock").take();
        if let Some(t) = task {
            t.abort();
            let _ = t.await;
        }
    }

    /// Listens again on the same port after [`VaultDouble::stop`].
    pub async fn start_again(&self) {
        let mut tries = 0;
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(l) => break l,
                Err(e) if tries < 50 => {
                    tries += 1;
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("rebinding {}: {e}", self.addr),
            }
        };
        let task = tokio::spawn(serve(listener, Arc::clone(&self.state), self.tls.clone()));
        *self.server.lock().expect("lock") = Some(task);
    }

    /// Seals or unseals: while sealed every request but `sys/health` answers 503.
    pub fn seal(&self, sealed: bool) {
        self.state.lock().expect("lock").sealed = sealed;
    }

    /// How many requests were made to paths ending with `suffix` (e.g. `decrypt/keyd`).
    pub fn requests(&self, suffix: &str) -> u64 {
        self.state
            .lock()
            .expect("lock")
            .requests
            .iter()
            .filter(|(k, _)| k.ends_with(suffix))
            .map(|(_, v)| v)
            .sum()
    }

    /// Every plaintext (data keys) transit received or returned so far.
    pub fn plaintexts(&self) -> Vec<Vec<u8>> {
        self.state.lock().expect("lock").plaintexts.clone()
    }

    /// Every token the double has issued and not revoked (the root token included).
    pub fn tokens(&self) -> Vec<String> {
        self.state
            .lock()
            .expect("lock")
            .tokens
            .keys()
            .cloned()
            .collect()
    }

    /// Revokes a Vault token (as `vault token revoke` would).
    pub fn revoke_token(&self, token: &str) {
        self.state.lock().expect("lock").tokens.remove(token);
    }

    /// Mints a projected ServiceAccount token (JWT) for `namespace/name` that the simulated
    /// Kubernetes API server accepts in its TokenReview.
    pub fn issue_service_account_token(&self, namespace: &str, name: &str) -> String {
        let now = unix_now();
        let header = URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","kid":"vault-double"}"#);
        let claims = URL_SAFE_NO_PAD.encode(
            json!({
                "aud": ["https://kubernetes.default.svc"],
                "exp": now + 3600, "iat": now, "nbf": now,
                "iss": "https://kubernetes.default.svc",
                "sub": format!("system:serviceaccount:{namespace}:{name}"),
                "kubernetes.io": {
                    "namespace": namespace,
                    "serviceaccount": { "name": name, "uid": format!("uid-{}", random_hex(8)) }
                }
            })
            .to_string(),
        );
        // The signature is not checked locally (as Vault without pem_keys): the simulated API
        // server knows the tokens it issued.
        let jwt = format!(
            "{header}.{claims}.{}",
            URL_SAFE_NO_PAD.encode(random_bytes(32))
        );
        self.state
            .lock()
            .expect("lock")
            .sa_tokens
            .insert(jwt.clone(), ());
        jwt
    }

    /// Makes the simulated API server reject a ServiceAccount token (deleted ServiceAccount).
    pub fn revoke_service_account_token(&self, jwt: &str) {
        self.state.lock().expect("lock").sa_tokens.remove(jwt);
    }
}

impl Drop for VaultDouble {
    fn drop(&mut self) {
        if let Ok(mut s) = self.server.lock()
            && let Some(t) = s.take()
        {
            t.abort();
        }
    }
}

async fn serve(listener: TcpListener, state: Arc<Mutex<State>>, tls: Option<Tls>) {
    // Connections live in this set, so that aborting the server closes them all (an outage).
    let mut conns = JoinSet::new();
    loop {
        let (tcp, _) = tokio::select! {
            a = listener.accept() => match a { Ok(a) => a, Err(_) => continue },
            Some(_) = conns.join_next(), if !conns.is_empty() => continue,
        };
        let state = Arc::clone(&state);
        let tls = tls.clone();
        conns.spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let state = Arc::clone(&state);
                async move { Ok::<_, std::convert::Infallible>(handle(&state, req).await) }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                Some(t) => {
                    if let Ok(stream) = t.acceptor.accept(tcp).await {
                        let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                    }
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(tcp), svc).await;
                }
            }
        });
    }
}

type Reply = (StatusCode, Value);

fn errors(status: StatusCode, msg: &str) -> Reply {
    (status, json!({ "errors": [msg] }))
}

fn bad(msg: &str) -> Reply {
    errors(StatusCode::BAD_REQUEST, msg)
}

fn denied() -> Reply {
    errors(StatusCode::FORBIDDEN, PERMISSION_DENIED)
}

fn no_route(path: &str) -> Reply {
    errors(
        StatusCode::NOT_FOUND,
        &format!("no handler for route {path:?}. route entry not found."),
    )
}

async fn handle(state: &Arc<Mutex<State>>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let token = header("x-vault-token");
    let namespace = header("x-vault-namespace")
        .unwrap_or_default()
        .trim_matches('/')
        .to_owned();
    let method = parts.method.clone();
    let path = parts.uri.path().to_owned();
    let reply = {
        let mut st = state.lock().expect("lock");
        route(&mut st, &method, &path, &namespace, token.as_deref(), &body)
    };
    let (status, value) = reply;
    let bytes = if status == StatusCode::NO_CONTENT {
        Bytes::new()
    } else {
        Bytes::from(value.to_string())
    };
    let mut resp = Response::new(Full::new(bytes));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

fn route(
    st: &mut State,
    method: &Method,
    full_path: &str,
    ns: &str,
    token: Option<&str>,
    body: &[u8],
) -> Reply {
    let Some(path) = full_path.strip_prefix("/v1/") else {
        return no_route(full_path);
    };
    let path = path.trim_end_matches('/').to_owned();
    *st.requests.entry(format!("{method} {path}")).or_default() += 1;
    if path == "sys/health" {
        return if st.sealed {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"initialized": true, "sealed": true, "standby": false}),
            )
        } else {
            (
                StatusCode::OK,
                json!({"initialized": true, "sealed": false, "standby": false, "version": "test-double"}),
            )
        };
    }
    if st.sealed {
        return errors(StatusCode::SERVICE_UNAVAILABLE, "Vault is sealed");
    }
    let req: Value = if body.is_empty() {
        json!({})
    } else {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => return bad(&format!("failed to parse JSON input: {e}")),
        }
    };
    if !st.namespaces.contains_key(ns) {
        return no_route(&path);
    }
    // Logins need no token.
    let segs: Vec<&str> = path.split('/').collect();
    if segs.first() == Some(&"auth") && segs.last() == Some(&"login") && segs.len() == 3 {
        return login(st, ns, segs[1], &req);
    }
    let Some(tok) = token.and_then(|t| st.tokens.get(t).cloned()) else {
        return denied();
    };
    if tok.expires.is_some_and(|e| Instant::now() >= e) {
        if let Some(t) = token {
            st.tokens.remove(t);
        }
        return denied();
    }
    if tok.namespace != ns && !tok.policies.iter().any(|p| p == "root") {
        return denied();
    }
    let token = token.unwrap_or_default().to_owned();
    // What the request needs: Vault asks for `create` when an upsert creates the key.
    let transit_missing_key = |st: &State| {
        let mount = segs.first().copied().unwrap_or("");
        segs.get(1) == Some(&"encrypt")
            && segs.len() == 3
            && st.namespaces[ns]
                .transit
                .get(mount)
                .is_some_and(|m| !m.contains_key(segs[2]))
    };
    let cap = match *method {
        Method::GET => "read",
        Method::DELETE => "delete",
        ref m if m.as_str() == "LIST" => "list",
        _ if transit_missing_key(st) => "create",
        _ => "update",
    };
    if !allowed(&st.namespaces[ns], &tok.policies, &path, cap) {
        return denied();
    }
    match (method.as_str(), segs.as_slice()) {
        ("GET", ["auth", "token", "lookup-self"]) => (
            StatusCode::OK,
            envelope(
                st,
                json!({"policies": tok.policies, "creation_ttl": tok.ttl, "ttl": tok.expires.map_or(0, |e| e.saturating_duration_since(Instant::now()).as_secs()),
                       "namespace_path": if ns.is_empty() { String::new() } else { format!("{ns}/") }}),
            ),
        ),
        ("POST" | "PUT", ["auth", "token", "revoke-self"]) => {
            st.tokens.remove(&token);
            (StatusCode::NO_CONTENT, Value::Null)
        }
        ("POST" | "PUT", ["auth", "token", "revoke"]) => {
            if let Some(t) = req["token"].as_str() {
                st.tokens.remove(t);
            }
            (StatusCode::NO_CONTENT, Value::Null)
        }
        ("POST" | "PUT", ["auth", "token", "create"]) => {
            let policies = strings(&req["policies"]);
            let ttl = parse_ttl(&req["ttl"]).unwrap_or(0);
            let mut policies = policies;
            if !req["no_default_policy"].as_bool().unwrap_or(false) {
                policies.push("default".into());
            }
            issue_token(st, ns, policies, ttl, json!({}))
        }
        ("POST" | "PUT", ["sys", "namespaces", rest @ ..]) => {
            // Vault Enterprise namespaces: a child of the caller's namespace.
            let child = rest.join("/");
            let full = if ns.is_empty() {
                child
            } else {
                format!("{ns}/{child}")
            };
            st.namespaces.entry(full.clone()).or_default();
            (
                StatusCode::OK,
                envelope(
                    st,
                    json!({ "path": format!("{full}/"), "id": random_hex(4) }),
                ),
            )
        }
        ("POST" | "PUT", ["sys", "mounts", rest @ ..]) => {
            let mount = rest.join("/");
            let n = ns_mut(st, ns);
            match req["type"].as_str() {
                Some("transit") => {
                    if n.transit.contains_key(&mount) {
                        return bad(&format!("path is already in use at {mount}/"));
                    }
                    n.transit.insert(mount, HashMap::new());
                    (StatusCode::NO_CONTENT, Value::Null)
                }
                other => bad(&format!(
                    "plugin not found in the catalog: {}",
                    other.unwrap_or("")
                )),
            }
        }
        ("DELETE", ["sys", "mounts", rest @ ..]) => {
            ns_mut(st, ns).transit.remove(&rest.join("/"));
            (StatusCode::NO_CONTENT, Value::Null)
        }
        ("POST" | "PUT", ["sys", "auth", rest @ ..]) => {
            let mount = rest.join("/");
            let n = ns_mut(st, ns);
            match req["type"].as_str() {
                Some("approle") => {
                    n.approle.entry(mount).or_default();
                    (StatusCode::NO_CONTENT, Value::Null)
                }
                Some("kubernetes") => {
                    n.kubernetes.entry(mount).or_default();
                    (StatusCode::NO_CONTENT, Value::Null)
                }
                other => bad(&format!(
                    "plugin not found in the catalog: {}",
                    other.unwrap_or("")
                )),
            }
        }
        ("POST" | "PUT", ["sys", "policies", "acl", name])
        | ("POST" | "PUT", ["sys", "policy", name]) => {
            match parse_policy(req["policy"].as_str().unwrap_or("")) {
                Ok(rules) => {
                    ns_mut(st, ns).policies.insert((*name).to_owned(), rules);
                    (StatusCode::NO_CONTENT, Value::Null)
                }
                Err(e) => bad(&format!("failed to parse policy: {e}")),
            }
        }
        (m, ["auth", mount, rest @ ..]) => auth_admin(st, ns, m, mount, rest, &req),
        (m, [mount, rest @ ..]) if st.namespaces[ns].transit.contains_key(*mount) => {
            transit(st, ns, m, mount, rest, &req)
        }
        _ => no_route(&path),
    }
}

fn ns_mut<'a>(st: &'a mut State, ns: &str) -> &'a mut Namespace {
    st.namespaces.entry(ns.to_owned()).or_default()
}

fn envelope(st: &mut State, data: Value) -> Value {
    st.next_id += 1;
    json!({
        "request_id": format!("00000000-0000-0000-0000-{:012}", st.next_id),
        "lease_id": "", "renewable": false, "lease_duration": 0,
        "data": data, "wrap_info": null, "warnings": null, "auth": null
    })
}

fn issue_token(
    st: &mut State,
    ns: &str,
    policies: Vec<String>,
    ttl: u64,
    metadata: Value,
) -> Reply {
    let token = format!("hvs.{}", random_hex(16));
    st.tokens.insert(
        token.clone(),
        Token {
            namespace: ns.to_owned(),
            policies: policies.clone(),
            expires: (ttl > 0).then(|| Instant::now() + Duration::from_secs(ttl)),
            ttl,
        },
    );
    st.next_id += 1;
    (
        StatusCode::OK,
        json!({
            "request_id": format!("00000000-0000-0000-0000-{:012}", st.next_id),
            "lease_id": "", "renewable": false, "lease_duration": 0, "data": null,
            "wrap_info": null, "warnings": null,
            "auth": {
                "client_token": token, "accessor": random_hex(12),
                "policies": policies, "token_policies": policies,
                "metadata": metadata, "lease_duration": ttl, "renewable": ttl > 0,
                "entity_id": "", "token_type": "service", "orphan": true
            }
        }),
    )
}

fn login(st: &mut State, ns: &str, mount: &str, req: &Value) -> Reply {
    let n = ns_mut(st, ns);
    if let Some(roles) = n.approle.get(mount) {
        let role_id = req["role_id"].as_str().unwrap_or("");
        let secret_id = req["secret_id"].as_str().unwrap_or("");
        if role_id.is_empty() {
            return bad("missing role_id");
        }
        let Some((name, role)) = roles.iter().find(|(_, r)| r.role_id == role_id) else {
            return bad("invalid role or secret ID");
        };
        if !role.secret_ids.iter().any(|s| s == secret_id) {
            return bad("invalid role or secret ID");
        }
        let (policies, ttl, name) = (role.policies.clone(), role.ttl, name.clone());
        return issue_token(
            st,
            ns,
            with_default(policies),
            ttl,
            json!({ "role_name": name }),
        );
    }
    if let Some(k) = n.kubernetes.get(mount) {
        let role_name = req["role"].as_str().unwrap_or("");
        let jwt = req["jwt"].as_str().unwrap_or("");
        if role_name.is_empty() {
            return bad("missing role");
        }
        if jwt.is_empty() {
            return bad("missing jwt");
        }
        let Some(role) = k.roles.get(role_name) else {
            return bad(&format!("invalid role name {role_name:?}"));
        };
        if !k.configured {
            return errors(
                StatusCode::INTERNAL_SERVER_ERROR,
                "could not load backend configuration",
            );
        }
        let Some(claims) = jwt_claims(jwt) else {
            return errors(StatusCode::FORBIDDEN, "failed to parse the JWT");
        };
        if !k.disable_iss_validation {
            let want = k.issuer.as_deref().unwrap_or("kubernetes/serviceaccount");
            if claims["iss"].as_str() != Some(want) {
                return errors(StatusCode::FORBIDDEN, "invalid issuer (iss) claim");
            }
        }
        if let Some(aud) = &role.audience
            && !strings(&claims["aud"]).contains(aud)
        {
            return errors(StatusCode::FORBIDDEN, "invalid audience (aud) claim");
        }
        let (sa_ns, sa_name) = match claims.get("kubernetes.io") {
            Some(k8s) => (
                k8s["namespace"].as_str().unwrap_or("").to_owned(),
                k8s["serviceaccount"]["name"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            ),
            None => (
                claims["kubernetes.io/serviceaccount/namespace"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                claims["kubernetes.io/serviceaccount/service-account.name"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
            ),
        };
        let glob = |list: &[String], v: &str| {
            list.iter().any(|p| {
                p == "*" || p == v || p.strip_suffix('*').is_some_and(|pre| v.starts_with(pre))
            })
        };
        if !glob(&role.names, &sa_name) {
            return errors(StatusCode::FORBIDDEN, "service account name not authorized");
        }
        if !glob(&role.namespaces, &sa_ns) {
            return errors(StatusCode::FORBIDDEN, "namespace not authorized");
        }
        let (policies, ttl) = (role.policies.clone(), role.ttl);
        // The TokenReview against the (simulated) API server.
        if !st.sa_tokens.contains_key(jwt) {
            return denied();
        }
        return issue_token(
            st,
            ns,
            with_default(policies),
            ttl,
            json!({ "role": role_name, "service_account_name": sa_name,
                    "service_account_namespace": sa_ns }),
        );
    }
    no_route(&format!("auth/{mount}/login"))
}

fn with_default(mut p: Vec<String>) -> Vec<String> {
    if !p.iter().any(|x| x == "default") {
        p.push("default".into());
    }
    p
}

fn jwt_claims(jwt: &str) -> Option<Value> {
    let mut parts = jwt.split('.');
    let header: Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next()?).ok()?).ok()?;
    // Kubernetes signs with RSA, ECDSA or RSA-PSS; anything else is refused at parse.
    const ALLOWED: [&str; 9] = [
        "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
    ];
    if !ALLOWED.contains(&header["alg"].as_str()?) {
        return None;
    }
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts.next()?).ok()?).ok()
}

fn auth_admin(
    st: &mut State,
    ns: &str,
    method: &str,
    mount: &str,
    rest: &[&str],
    req: &Value,
) -> Reply {
    let write = matches!(method, "POST" | "PUT");
    let n = ns_mut(st, ns);
    if let Some(roles) = n.approle.get_mut(mount) {
        return match (method, rest) {
            (_, ["role", name]) if write => {
                let role = roles.entry((*name).to_owned()).or_insert_with(|| AppRole {
                    role_id: format!("role-{}", random_hex(8)),
                    secret_ids: vec![],
                    policies: vec![],
                    ttl: 0,
                });
                role.policies = strings(&req["token_policies"]);
                if role.policies.is_empty() {
                    role.policies = strings(&req["policies"]);
                }
                role.ttl = parse_ttl(&req["token_ttl"]).unwrap_or(0);
                (StatusCode::NO_CONTENT, Value::Null)
            }
            ("GET", ["role", name, "role-id"]) => match roles.get(*name) {
                Some(r) => {
                    let id = r.role_id.clone();
                    (StatusCode::OK, envelope(st, json!({ "role_id": id })))
                }
                None => errors(StatusCode::NOT_FOUND, ""),
            },
            (_, ["role", name, "secret-id"]) if write => match roles.get_mut(*name) {
                Some(r) => {
                    let secret = random_uuid();
                    r.secret_ids.push(secret.clone());
                    (
                        StatusCode::OK,
                        envelope(
                            st,
                            json!({ "secret_id": secret, "secret_id_accessor": random_uuid(),
                                    "secret_id_ttl": 0, "secret_id_num_uses": 0 }),
                        ),
                    )
                }
                None => bad(&format!("role \"{name}\" does not exist")),
            },
            _ => no_route(&format!("auth/{mount}/{}", rest.join("/"))),
        };
    }
    if let Some(k) = n.kubernetes.get_mut(mount) {
        return match rest {
            ["config"] if write => {
                if req["kubernetes_host"].as_str().unwrap_or("").is_empty() {
                    return bad("no host provided");
                }
                k.configured = true;
                k.issuer = req["issuer"].as_str().map(str::to_owned);
                k.disable_iss_validation = req["disable_iss_validation"].as_bool().unwrap_or(true);
                (StatusCode::NO_CONTENT, Value::Null)
            }
            ["role", name] if write => {
                let names = strings(&req["bound_service_account_names"]);
                let namespaces = strings(&req["bound_service_account_namespaces"]);
                if names.is_empty() {
                    return bad("\"bound_service_account_names\" can not be empty");
                }
                if namespaces.is_empty() {
                    return bad("\"bound_service_account_namespaces\" can not be empty");
                }
                let mut policies = strings(&req["token_policies"]);
                if policies.is_empty() {
                    policies = strings(&req["policies"]);
                }
                k.roles.insert(
                    (*name).to_owned(),
                    K8sRole {
                        names,
                        namespaces,
                        policies,
                        ttl: parse_ttl(&req["token_ttl"]).unwrap_or(0),
                        audience: req["audience"]
                            .as_str()
                            .filter(|a| !a.is_empty())
                            .map(str::to_owned),
                    },
                );
                (StatusCode::NO_CONTENT, Value::Null)
            }
            _ => no_route(&format!("auth/{mount}/{}", rest.join("/"))),
        };
    }
    no_route(&format!("auth/{mount}/{}", rest.join("/")))
}

fn transit(
    st: &mut State,
    ns: &str,
    method: &str,
    mount: &str,
    rest: &[&str],
    req: &Value,
) -> Reply {
    let write = matches!(method, "POST" | "PUT");
    let keys = ns_mut(st, ns).transit.get_mut(mount).expect("mount exists");
    let reply: Result<Value, Reply> = match (method, rest) {
        (_, ["keys", name]) if write => {
            let kind = req["type"].as_str().unwrap_or("aes256-gcm96");
            if kind != "aes256-gcm96" {
                return bad(&format!(
                    "unknown key type {kind} (this test double models aes256-gcm96 only)"
                ));
            }
            keys.entry((*name).to_owned())
                .or_insert_with(|| TransitKey {
                    derived: req["derived"].as_bool().unwrap_or(false),
                    versions: vec![(random_key(), unix_now())],
                    min_decryption_version: 1,
                    min_encryption_version: 0,
                    deletion_allowed: false,
                });
            return (StatusCode::NO_CONTENT, Value::Null);
        }
        ("GET", ["keys", name]) => match keys.get(*name) {
            Some(k) => Ok(key_info(name, k)),
            None => return errors(StatusCode::NOT_FOUND, ""),
        },
        ("DELETE", ["keys", name]) => match keys.get(*name) {
            None => return (StatusCode::NO_CONTENT, Value::Null),
            Some(k) if !k.deletion_allowed => {
                return bad(&format!(
                    "error deleting policy {name}: deletion is not allowed for this key"
                ));
            }
            Some(_) => {
                keys.remove(*name);
                return (StatusCode::NO_CONTENT, Value::Null);
            }
        },
        (_, ["keys", name, "config"]) if write => match keys.get_mut(*name) {
            None => return bad(&format!("no existing key named {name} could be found")),
            Some(k) => {
                if let Some(v) = req["min_decryption_version"].as_u64() {
                    if v as usize > k.versions.len() {
                        return bad(&format!(
                            "cannot set min decryption version of {v}, latest key version is {}",
                            k.versions.len()
                        ));
                    }
                    k.min_decryption_version = v.max(1);
                }
                if let Some(v) = req["min_encryption_version"].as_u64() {
                    if v > 0 && v < k.min_decryption_version {
                        return bad(
                            "min encryption version must be 0 or greater than or equal to min decryption version",
                        );
                    }
                    k.min_encryption_version = v;
                }
                if let Some(v) = req["deletion_allowed"].as_bool() {
                    k.deletion_allowed = v;
                }
                Ok(key_info(name, k))
            }
        },
        (_, ["keys", name, "rotate"]) if write => match keys.get_mut(*name) {
            None => return bad(&format!("no existing key named {name} could be found")),
            Some(k) => {
                k.versions.push((random_key(), unix_now()));
                Ok(key_info(name, k))
            }
        },
        (_, ["datakey", kind, name]) if write => {
            let plaintext = match *kind {
                "plaintext" => true,
                "wrapped" => false,
                _ => return bad("Invalid path, must be 'plaintext' or 'wrapped'"),
            };
            let bits = req["bits"].as_u64().unwrap_or(256);
            let len = match bits {
                128 => 16,
                256 => 32,
                512 => 64,
                _ => return bad("invalid bit length"),
            };
            match keys.get(*name) {
                None => return bad("encryption key not found"),
                Some(k) => {
                    let dk = random_bytes(len);
                    encrypt(k, req, &dk).map(|(ct, v)| {
                        let mut out = json!({ "ciphertext": ct, "key_version": v });
                        if plaintext {
                            out["plaintext"] = json!(STANDARD.encode(&dk));
                        }
                        out
                    })
                }
            }
        }
        (_, ["encrypt", name]) if write => {
            if !keys.contains_key(*name) {
                // The upsert (the caller had `create`): derived iff a context is given.
                keys.insert(
                    (*name).to_owned(),
                    TransitKey {
                        derived: !req["context"].as_str().unwrap_or("").is_empty(),
                        versions: vec![(random_key(), unix_now())],
                        min_decryption_version: 1,
                        min_encryption_version: 0,
                        deletion_allowed: false,
                    },
                );
            }
            let k = &keys[*name];
            match STANDARD.decode(req["plaintext"].as_str().unwrap_or("")) {
                Err(_) => return bad("failed to base64-decode plaintext"),
                Ok(pt) => encrypt(k, req, &pt)
                    .map(|(ct, v)| json!({ "ciphertext": ct, "key_version": v })),
            }
        }
        (_, ["decrypt", name]) if write => match keys.get(*name) {
            None => return bad("encryption key not found"),
            Some(k) => {
                let ct = req["ciphertext"].as_str().unwrap_or("");
                if ct.is_empty() {
                    return bad("missing ciphertext to decrypt");
                }
                decrypt(k, req, ct).map(|pt| json!({ "plaintext": STANDARD.encode(pt) }))
            }
        },
        (_, ["rewrap", name]) if write => match keys.get(*name) {
            None => return bad("encryption key not found"),
            Some(k) => {
                let ct = req["ciphertext"].as_str().unwrap_or("");
                if ct.is_empty() {
                    return bad("missing ciphertext to decrypt");
                }
                decrypt(k, req, ct)
                    .and_then(|pt| encrypt(k, req, &pt))
                    .map(|(ct, v)| json!({ "ciphertext": ct, "key_version": v }))
            }
        },
        _ => return no_route(&format!("{mount}/{}", rest.join("/"))),
    };
    match reply {
        Ok(data) => {
            for field in [&data["plaintext"], &req["plaintext"]] {
                if let Some(p) = field.as_str().and_then(|p| STANDARD.decode(p).ok()) {
                    st.plaintexts.push(p);
                }
            }
            (StatusCode::OK, envelope(st, data))
        }
        Err(e) => e,
    }
}

fn key_info(name: &str, k: &TransitKey) -> Value {
    let versions: serde_json::Map<String, Value> = k
        .versions
        .iter()
        .enumerate()
        .map(|(i, (_, t))| ((i + 1).to_string(), json!(t)))
        .collect();
    json!({
        "name": name, "type": "aes256-gcm96", "derived": k.derived, "kdf": if k.derived { "hkdf_sha256" } else { "" },
        "keys": versions, "latest_version": k.versions.len(),
        "min_decryption_version": k.min_decryption_version,
        "min_encryption_version": k.min_encryption_version,
        "deletion_allowed": k.deletion_allowed, "exportable": false,
        "supports_encryption": true, "supports_decryption": true, "supports_derivation": true,
        "supports_signing": false, "imported": false
    })
}

/// The key for `version` under `context` (Vault's `hkdf_sha256` KDF for derived keys).
fn version_key(k: &TransitKey, version: usize, context: &[u8]) -> Result<[u8; 32], Reply> {
    let raw = k.versions[version - 1].0;
    if !k.derived {
        return Ok(raw);
    }
    if context.is_empty() {
        return Err(bad(MISSING_CONTEXT));
    }
    let mut out = [0u8; 32];
    hkdf::Hkdf::<sha2::Sha256>::new(None, &raw)
        .expand(context, &mut out)
        .map_err(|_| errors(StatusCode::INTERNAL_SERVER_ERROR, "key derivation failed"))?;
    Ok(out)
}

fn context_of(req: &Value) -> Result<Vec<u8>, Reply> {
    STANDARD
        .decode(req["context"].as_str().unwrap_or(""))
        .map_err(|_| bad("failed to base64-decode context"))
}

fn encrypt(k: &TransitKey, req: &Value, plaintext: &[u8]) -> Result<(String, usize), Reply> {
    let latest = k.versions.len();
    let version = match req["key_version"].as_u64().unwrap_or(0) as usize {
        0 => latest,
        v if v > latest => {
            return Err(bad(
                "requested version for encryption is higher than the latest key version",
            ));
        }
        v => v,
    };
    if (version as u64) < k.min_encryption_version {
        return Err(bad(
            "requested version for encryption is less than the minimum encryption key version",
        ));
    }
    let key = version_key(k, version, &context_of(req)?)?;
    let nonce = random_bytes(12);
    let ct = Aes256Gcm::new(&key.into())
        .encrypt(
            &Nonce::try_from(nonce.as_slice())
                .map_err(|_| errors(StatusCode::INTERNAL_SERVER_ERROR, "nonce"))?,
            Payload {
                msg: plaintext,
                aad: b"",
            },
        )
        .map_err(|_| errors(StatusCode::INTERNAL_SERVER_ERROR, "encryption failed"))?;
    let mut blob = nonce;
    blob.extend_from_slice(&ct);
    Ok((
        format!("vault:v{version}:{}", STANDARD.encode(blob)),
        version,
    ))
}

fn decrypt(k: &TransitKey, req: &Value, ciphertext: &str) -> Result<Vec<u8>, Reply> {
    let Some(rest) = ciphertext.strip_prefix("vault:v") else {
        return Err(bad("invalid ciphertext: no prefix"));
    };
    let Some((version, b64)) = rest.split_once(':') else {
        return Err(bad("invalid ciphertext: wrong number of fields"));
    };
    let Ok(mut version) = version.parse::<usize>() else {
        return Err(bad(
            "invalid ciphertext: version number could not be decoded",
        ));
    };
    if version == 0 {
        version = 1;
    }
    if version > k.versions.len() {
        return Err(bad("invalid ciphertext: version is too new"));
    }
    if k.min_decryption_version > 0 && (version as u64) < k.min_decryption_version {
        return Err(bad(
            "ciphertext or signature version is disallowed by policy (too old)",
        ));
    }
    let Ok(blob) = STANDARD.decode(b64) else {
        return Err(bad("invalid ciphertext: could not decode base64"));
    };
    let key = version_key(k, version, &context_of(req)?)?;
    if blob.len() < 12 {
        return Err(bad("invalid ciphertext length"));
    }
    let (nonce, ct) = blob.split_at(12);
    Aes256Gcm::new(&key.into())
        .decrypt(
            &Nonce::try_from(nonce).map_err(|_| bad("invalid ciphertext length"))?,
            Payload { msg: ct, aad: b"" },
        )
        .map_err(|_| bad("cipher: message authentication failed"))
}

fn allowed(ns: &Namespace, policies: &[String], path: &str, cap: &str) -> bool {
    if policies.iter().any(|p| p == "root") {
        return true;
    }
    // Every token may look itself up and revoke itself (the `default` policy).
    if matches!(
        path,
        "auth/token/lookup-self" | "auth/token/revoke-self" | "auth/token/renew-self"
    ) {
        return true;
    }
    let mut best: Option<&Rule> = None;
    for p in policies {
        for r in ns.policies.get(p).into_iter().flatten() {
            if path_matches(&r.path, path) {
                // The most specific (longest) matching path wins, as in Vault.
                if best.is_none_or(|b| r.path.len() > b.path.len()) {
                    best = Some(r);
                }
            }
        }
    }
    best.is_some_and(|r| !r.caps.iter().any(|c| c == "deny") && r.caps.iter().any(|c| c == cap))
}

fn path_matches(pattern: &str, path: &str) -> bool {
    if let Some(prefix) = pattern.strip_suffix('*') {
        return path.starts_with(prefix) || path_matches(prefix.trim_end_matches('/'), path);
    }
    let p: Vec<&str> = pattern.split('/').collect();
    let s: Vec<&str> = path.split('/').collect();
    p.len() == s.len() && p.iter().zip(&s).all(|(a, b)| *a == "+" || a == b)
}

/// A policy in JSON (`{"path": {"P": {"capabilities": [...]}}}`) or in the simple HCL form.
fn parse_policy(text: &str) -> Result<Vec<Rule>, String> {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        let paths = v["path"].as_object().ok_or("no \"path\" object")?;
        return Ok(paths
            .iter()
            .map(|(p, r)| Rule {
                path: p.clone(),
                caps: strings(&r["capabilities"]),
            })
            .collect());
    }
    let mut rules = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("path") {
        rest = &rest[i + 4..];
        let open = rest.find('"').ok_or("expected a quoted path")?;
        let close = rest[open + 1..].find('"').ok_or("unterminated path")? + open + 1;
        let path = rest[open + 1..close].to_owned();
        let lb = rest[close..].find('[').ok_or("expected capabilities")? + close;
        let rb = rest[lb..].find(']').ok_or("unterminated capabilities")? + lb;
        let caps = rest[lb + 1..rb]
            .split(',')
            .map(|c| c.trim().trim_matches('"').to_owned())
            .filter(|c| !c.is_empty())
            .collect();
        rules.push(Rule { path, caps });
        rest = &rest[rb..];
    }
    if rules.is_empty() {
        return Err("no path rules".into());
    }
    Ok(rules)
}

fn strings(v: &Value) -> Vec<String> {
    match v {
        Value::Array(a) => a
            .iter()
            .filter_map(|x| x.as_str().map(str::to_owned))
            .collect(),
        Value::String(s) if !s.is_empty() => s.split(',').map(|x| x.trim().to_owned()).collect(),
        _ => vec![],
    }
}

/// A TTL as seconds or a duration string (`"1h"`, `"30s"`, `"90"`).
fn parse_ttl(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64(),
        Value::String(s) if s.is_empty() => None,
        Value::String(s) => s.parse().ok().or_else(|| {
            let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
            let n: u64 = n.parse().ok()?;
            Some(match unit {
                "s" => n,
                "m" => n * 60,
                "h" => n * 3600,
                _ => return None,
            })
        }),
        _ => None,
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut b = vec![0u8; n];
    getrandom::fill(&mut b).expect("randomness");
    b
}

fn random_key() -> [u8; 32] {
    let mut k = [0u8; 32];
    getrandom::fill(&mut k).expect("randomness");
    k
}

fn random_hex(n: usize) -> String {
    hex::encode(random_bytes(n))
}

fn random_uuid() -> String {
    let h = random_hex(16);
    format!(
        "{}-{}-{}-{}-{}",
        &h[..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..]
    )
}

fn make_tls() -> Tls {
    let ca_key = rcgen::KeyPair::generate().expect("CA key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "vault test double CA");
    let ca = ca_params.self_signed(&ca_key).expect("CA cert");
    let key = rcgen::KeyPair::generate().expect("server key");
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])
            .expect("server params");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let cert = params.signed_by(&key, &issuer).expect("server cert");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .expect("server config");
    Tls {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
        ca_pem: ca.pem(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_paths_match_like_vault() {
        assert!(path_matches(
            "transit/datakey/plaintext/keyd",
            "transit/datakey/plaintext/keyd"
        ));
        assert!(path_matches("transit/+/keyd", "transit/decrypt/keyd"));
        assert!(!path_matches(
            "transit/+/keyd",
            "transit/datakey/plaintext/keyd"
        ));
        assert!(path_matches("transit/*", "transit/decrypt/keyd"));
        let rules =
            parse_policy("path \"transit/decrypt/keyd\" {\n  capabilities = [\"update\"]\n}\n")
                .unwrap();
        assert_eq!(rules[0].path, "transit/decrypt/keyd");
        assert_eq!(rules[0].caps, vec!["update".to_owned()]);
    }

    #[test]
    fn derived_keys_bind_the_context_and_versions_are_policed() {
        let mut k = TransitKey {
            derived: true,
            versions: vec![(random_key(), 0)],
            min_decryption_version: 1,
            min_encryption_version: 0,
            deletion_allowed: false,
        };
        let ctx = |c: &str| json!({ "context": STANDARD.encode(c) });
        let (ct, v) = encrypt(&k, &ctx("a"), b"secret").unwrap();
        assert_eq!(v, 1);
        assert!(ct.starts_with("vault:v1:"));
        assert_eq!(decrypt(&k, &ctx("a"), &ct).unwrap(), b"secret");
        let err = decrypt(&k, &ctx("b"), &ct).unwrap_err();
        assert_eq!(err.1["errors"][0], "cipher: message authentication failed");
        let err = decrypt(&k, &json!({}), &ct).unwrap_err();
        assert_eq!(err.1["errors"][0], MISSING_CONTEXT);
        k.versions.push((random_key(), 0));
        k.min_decryption_version = 2;
        let err = decrypt(&k, &ctx("a"), &ct).unwrap_err();
        assert_eq!(
            err.1["errors"][0],
            "ciphertext or signature version is disallowed by policy (too old)"
        );
    }
}
