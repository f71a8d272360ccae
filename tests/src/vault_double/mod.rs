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
//! real Vault when `VAULT_ADDR` and `VAULT_TOKEN` are set (see docs/testing.md).

mod auth;
mod http;
mod state;
mod sys;
mod transit;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use tokio::net::TcpListener;

use self::http::{Tls, make_tls, serve};
use state::{Namespace, State, Token, random_bytes, random_hex, unix_now};

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
