//! The Vault transit custodian (vaultrs): one transit key per keyd installation; data keys from
//! `datakey/plaintext`, unwrapped with `decrypt`, existing data keys wrapped with `encrypt` (a
//! migration to Vault), and moved to the newest key version with `rewrap`, which never returns
//! the plaintext.
//!
//! The key must be created with `derived=true`: every call then carries the record's
//! associated data as the derivation `context`, so a wrapped key only unwraps for the record it
//! was made for (keyd's start-up check proves it, and refuses a key that ignores the context).
//! Ciphertexts are `vault:vN:...`; keyd records the version N, so a KEK rotation (a new key
//! version) knows what is left to rewrap. Auth: a token file, AppRole, or a Kubernetes
//! ServiceAccount JWT; keyd logs in again when Vault refuses its token. TLS: system roots plus
//! `ca_file`; `X-Vault-Namespace` for Vault Enterprise / HCP namespaces.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd_proto::kek::{VaultAuth, VaultTransitSpec};
use tokio::time::Instant;
use vaultrs::api::transit::requests::{
    DataKeyType, DecryptDataRequest, EncryptDataRequest, GenerateDataKeyRequest, RewrapDataRequest,
};
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use super::spec::CustodySettings;
use crate::seal::{
    FailureKind, Key256, KeyWrapper, SealContext, SealError, SealedRecord, WrappedKey,
};

const BACKEND: &str = "vault-transit";

/// Runs a transit call with the current session; if Vault refuses the token (revoked, expired),
/// logs in again and retries once.
macro_rules! call {
    ($self:ident, $op:expr, |$c:ident| $body:expr) => {{
        let session = $self.current().await?;
        let first = {
            let $c = &session.client;
            $body.await
        };
        match first {
            Err(ClientError::APIError { code: 403, .. }) => {
                $self.login(session.generation).await?;
                let session = $self.session();
                let $c = &session.client;
                $body.await.map_err(|e| $self.fail($op, &e))
            }
            other => other.map_err(|e| $self.fail($op, &e)),
        }
    }};
}

pub struct VaultTransit {
    spec: VaultTransitSpec,
    call_timeout: Duration,
    /// `[namespace/]mount/key`: the KEK id without its version.
    base_id: String,
    session: RwLock<Arc<Session>>,
    /// Serializes logins, so that many calls refused at once log in once.
    login_lock: tokio::sync::Mutex<()>,
    /// The newest key version Vault has wrapped with, as far as keyd has seen.
    latest: AtomicU64,
}

/// A client logged in with one token.
struct Session {
    client: VaultClient,
    /// When to log in again before the token's lease runs out (two thirds of it).
    renew_at: Option<Instant>,
    generation: u64,
}

impl fmt::Debug for VaultTransit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VaultTransit")
            .field("address", &self.spec.address)
            .field("key", &self.base_id)
            .field("auth", &self.spec.auth.method())
            .finish_non_exhaustive()
    }
}

/// The version of a `vault:vN:...` ciphertext.
pub fn ciphertext_version(ciphertext: &[u8]) -> Option<u64> {
    let rest = ciphertext.strip_prefix(b"vault:v")?;
    let end = rest.iter().position(|b| *b == b':')?;
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn split_version(kek_id: &str) -> (&str, Option<u64>) {
    match kek_id.rsplit_once(":v") {
        Some((base, v)) => match v.parse() {
            Ok(n) => (base, Some(n)),
            Err(_) => (kek_id, None),
        },
        None => (kek_id, None),
    }
}

impl VaultTransit {
    /// Builds the client and logs in (no transit call yet).
    pub async fn connect(
        spec: &VaultTransitSpec,
        settings: &CustodySettings,
    ) -> Result<Self, SealError> {
        let base_id = format!(
            "{}{}/{}",
            spec.namespace
                .as_deref()
                .map(|n| format!("{}/", n.trim_end_matches('/')))
                .unwrap_or_default(),
            spec.mount,
            spec.key
        );
        let me = Self {
            spec: spec.clone(),
            call_timeout: settings.call_timeout,
            base_id,
            session: RwLock::new(Arc::new(Session {
                client: build_client(spec, settings.call_timeout, "")
                    .map_err(|d| misconfigured(spec, "build client", d))?,
                renew_at: None,
                generation: 0,
            })),
            login_lock: tokio::sync::Mutex::new(()),
            latest: AtomicU64::new(0),
        };
        me.login(0).await?;
        Ok(me)
    }

    fn session(&self) -> Arc<Session> {
        Arc::clone(&self.session.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Logs in anew unless another call already did since session `seen`.
    async fn login(&self, seen: u64) -> Result<(), SealError> {
        let _guard = self.login_lock.lock().await;
        if self.session().generation != seen {
            return Ok(());
        }
        let unauthenticated = build_client(&self.spec, self.call_timeout, "")
            .map_err(|d| misconfigured(&self.spec, "build client", d))?;
        let read_secret = |what: &'static str, path: &std::path::Path| {
            std::fs::read_to_string(path)
                .map(|s| Zeroizing::new(s.trim().to_owned()))
                .map_err(|e| SealError::Custodian {
                    backend: BACKEND,
                    key_id: self.base_id.clone(),
                    op: what,
                    kind: FailureKind::Misconfigured,
                    detail: format!("{}: {e}", path.display()),
                })
        };
        let (token, lease) = match &self.spec.auth {
            VaultAuth::Token { token_file } => (read_secret("read token_file", token_file)?, 0),
            VaultAuth::Approle {
                mount,
                role_id,
                secret_id_file,
            } => {
                let secret_id = read_secret("read secret_id_file", secret_id_file)?;
                let auth =
                    vaultrs::auth::approle::login(&unauthenticated, mount, role_id, &secret_id)
                        .await
                        .map_err(|e| self.fail("approle login", &e))?;
                (Zeroizing::new(auth.client_token), auth.lease_duration)
            }
            VaultAuth::Kubernetes {
                mount,
                role,
                jwt_file,
            } => {
                let jwt = read_secret("read jwt_file", jwt_file)?;
                let auth = vaultrs::auth::kubernetes::login(&unauthenticated, mount, role, &jwt)
                    .await
                    .map_err(|e| self.fail("kubernetes login", &e))?;
                (Zeroizing::new(auth.client_token), auth.lease_duration)
            }
        };
        if token.is_empty() {
            return Err(SealError::Custodian {
                backend: BACKEND,
                key_id: self.base_id.clone(),
                op: "login",
                kind: FailureKind::PermissionDenied,
                detail: "the token is empty".into(),
            });
        }
        let client = build_client(&self.spec, self.call_timeout, &token)
            .map_err(|d| misconfigured(&self.spec, "build client", d))?;
        let renew_at = (lease > 0).then(|| Instant::now() + Duration::from_secs(lease * 2 / 3));
        *self.session.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(Session {
            client,
            renew_at,
            generation: seen + 1,
        });
        tracing::debug!(
            key = self.base_id,
            method = self.spec.auth.method(),
            "logged in to Vault"
        );
        Ok(())
    }

    /// The session to call with, logging in first when the token's lease is nearly over.
    async fn current(&self) -> Result<Arc<Session>, SealError> {
        let session = self.session();
        if session.renew_at.is_some_and(|t| Instant::now() >= t) {
            self.login(session.generation).await?;
            return Ok(self.session());
        }
        Ok(session)
    }

    fn fail(&self, op: &'static str, e: &ClientError) -> SealError {
        let (kind, detail) = classify(e);
        SealError::Custodian {
            backend: BACKEND,
            key_id: self.key_id(),
            op,
            kind,
            detail,
        }
    }

    fn context(ctx: &SealContext) -> String {
        STANDARD.encode(ctx.aad())
    }

    fn learn_version(&self, ciphertext: &str) {
        if let Some(v) = ciphertext_version(ciphertext.as_bytes()) {
            self.latest.fetch_max(v, Ordering::Relaxed);
        }
    }

    fn data_key(&self, op: &'static str, b64: &str) -> Result<Key256, SealError> {
        let raw = Zeroizing::new(STANDARD.decode(b64).map_err(|_| SealError::Custodian {
            backend: BACKEND,
            key_id: self.key_id(),
            op,
            kind: FailureKind::Rejected,
            detail: "Vault's plaintext is not base64".into(),
        })?);
        Key256::from_slice(&raw).ok_or_else(|| SealError::Custodian {
            backend: BACKEND,
            key_id: self.key_id(),
            op,
            kind: FailureKind::Rejected,
            detail: format!("Vault returned a {}-byte data key, expected 32", raw.len()),
        })
    }

    fn ciphertext<'a>(&self, wrapped: &'a WrappedKey) -> Result<&'a str, SealError> {
        std::str::from_utf8(&wrapped.0).map_err(|_| {
            SealError::Corrupt(format!(
                "a {BACKEND} wrapped key for {} is not a vault:vN: ciphertext",
                self.base_id
            ))
        })
    }
}

fn misconfigured(spec: &VaultTransitSpec, op: &'static str, detail: String) -> SealError {
    SealError::Custodian {
        backend: BACKEND,
        key_id: format!("{}/{}", spec.mount, spec.key),
        op,
        kind: FailureKind::Misconfigured,
        detail,
    }
}

fn build_client(
    spec: &VaultTransitSpec,
    timeout: Duration,
    token: &str,
) -> Result<VaultClient, String> {
    // vaultrs's address setter panics on a URL it cannot parse: parse it the same way first.
    url::Url::parse(&spec.address).map_err(|e| format!("address {:?}: {e}", spec.address))?;
    let mut b = VaultClientSettingsBuilder::default();
    // Every field that vaultrs would otherwise default from VAULT_* environment variables is
    // set explicitly: keyd's configuration is the only input.
    b.address(&spec.address)
        .token(token)
        .verify(true)
        .ca_certs(
            spec.ca_file
                .iter()
                .map(|p| p.to_string_lossy().into_owned())
                .collect(),
        )
        .identity(None)
        .timeout(Some(timeout))
        .namespace(spec.namespace.clone());
    let settings = b.build().map_err(|e| e.to_string())?;
    VaultClient::new(settings).map_err(|e| keyd_mtls::error_chain(&e))
}

/// Maps a Vault failure to its kind, by HTTP status and Vault's documented error messages.
fn classify(e: &ClientError) -> (FailureKind, String) {
    use rustify::errors::ClientError as Rest;
    match e {
        ClientError::APIError { code, errors } => {
            let msg = errors.join("; ");
            let has = |s: &str| msg.contains(s);
            let kind = match code {
                401 | 403 => FailureKind::PermissionDenied,
                404 => FailureKind::KeyNotFound,
                429 | 500..=599 => FailureKind::Unavailable,
                _ if has("encryption key not found")
                    || has("policy not found")
                    || has("no existing key named")
                    || has("version is too new") =>
                {
                    FailureKind::KeyNotFound
                }
                _ if has("message authentication failed") || has("could not decrypt") => {
                    FailureKind::ContextMismatch
                }
                _ if has("disallowed by policy (too old)") => FailureKind::KeyDisabled,
                _ if has("missing 'context' for key derivation") => FailureKind::Misconfigured,
                _ if has("invalid role") || has("invalid secret") || has("not authorized") => {
                    FailureKind::PermissionDenied
                }
                _ => FailureKind::Rejected,
            };
            let msg = if msg.is_empty() {
                "(no message)".into()
            } else {
                msg
            };
            (kind, format!("Vault answered {code}: {msg}"))
        }
        ClientError::RestClientError { source } => match source {
            Rest::ServerResponseError { code, .. } => {
                let kind = match code {
                    401 | 403 => FailureKind::PermissionDenied,
                    404 => FailureKind::KeyNotFound,
                    _ if *code >= 500 || *code == 429 => FailureKind::Unavailable,
                    _ => FailureKind::Rejected,
                };
                (
                    kind,
                    format!("Vault answered {code} without a Vault error body"),
                )
            }
            // The body may hold a data key: never quote it.
            Rest::ResponseParseError { .. } | Rest::ResponseConversionError { .. } => (
                FailureKind::Rejected,
                "Vault's answer could not be parsed".into(),
            ),
            other => {
                let chain = keyd_mtls::error_chain(other);
                // A certificate Vault's server does not match, or one keyd does not trust, is
                // configuration, not an outage.
                if chain.contains("certificate") || chain.contains("UnknownIssuer") {
                    (
                        FailureKind::Misconfigured,
                        format!("{chain} (check kek.vault.ca_file and the address's host name)"),
                    )
                } else {
                    (FailureKind::Unavailable, chain)
                }
            }
        },
        ClientError::ResponseEmptyError | ClientError::ResponseDataEmptyError => {
            (FailureKind::Rejected, "Vault's answer had no data".into())
        }
        other => (FailureKind::Rejected, keyd_mtls::error_chain(other)),
    }
}

#[async_trait]
impl KeyWrapper for VaultTransit {
    fn backend(&self) -> &'static str {
        BACKEND
    }

    fn key_id(&self) -> String {
        match self.latest.load(Ordering::Relaxed) {
            0 => self.base_id.clone(),
            v => format!("{}:v{v}", self.base_id),
        }
    }

    fn kek_id_of(&self, wrapped: &WrappedKey) -> String {
        match ciphertext_version(&wrapped.0) {
            Some(v) => format!("{}:v{v}", self.base_id),
            None => self.base_id.clone(),
        }
    }

    fn holds(&self, backend: &str, kek_id: &str) -> bool {
        backend == BACKEND && split_version(kek_id).0 == self.base_id
    }

    fn is_current(&self, kek_id: &str) -> bool {
        let (base, version) = split_version(kek_id);
        base == self.base_id && version.unwrap_or(0) >= self.latest.load(Ordering::Relaxed)
    }

    fn location(&self) -> String {
        format!(
            "{}|{}",
            self.spec.address.trim_end_matches('/'),
            self.spec.namespace.as_deref().unwrap_or("")
        )
    }

    async fn generate_data_key(
        &self,
        ctx: &SealContext,
    ) -> Result<(Key256, WrappedKey), SealError> {
        const OP: &str = "transit/datakey/plaintext";
        let context = Self::context(ctx);
        let (mount, key) = (&self.spec.mount, &self.spec.key);
        let out = call!(self, OP, |c| vaultrs::transit::generate::data_key(
            c,
            mount,
            key,
            DataKeyType::Plaintext,
            Some(
                GenerateDataKeyRequest::builder()
                    .context(context.clone())
                    .bits(256u16)
            ),
        ))?;
        self.learn_version(&out.ciphertext);
        let plaintext = Zeroizing::new(out.plaintext.unwrap_or_default());
        Ok((
            self.data_key(OP, &plaintext)?,
            WrappedKey(out.ciphertext.into_bytes()),
        ))
    }

    async fn unwrap_data_key(
        &self,
        wrapped: &WrappedKey,
        ctx: &SealContext,
    ) -> Result<Key256, SealError> {
        const OP: &str = "transit/decrypt";
        let ciphertext = self.ciphertext(wrapped)?;
        let context = Self::context(ctx);
        let (mount, key) = (&self.spec.mount, &self.spec.key);
        let out = call!(self, OP, |c| vaultrs::transit::data::decrypt(
            c,
            mount,
            key,
            ciphertext,
            Some(DecryptDataRequest::builder().context(context.clone())),
        ))?;
        let plaintext = Zeroizing::new(out.plaintext);
        self.data_key(OP, &plaintext)
    }

    async fn wrap_data_key(
        &self,
        dek: &Key256,
        ctx: &SealContext,
    ) -> Result<WrappedKey, SealError> {
        const OP: &str = "transit/encrypt";
        let plaintext = Zeroizing::new(STANDARD.encode(dek.expose()));
        let context = Self::context(ctx);
        let (mount, key) = (&self.spec.mount, &self.spec.key);
        let out = call!(self, OP, |c| vaultrs::transit::data::encrypt(
            c,
            mount,
            key,
            &plaintext,
            Some(EncryptDataRequest::builder().context(context.clone())),
        ))?;
        self.learn_version(&out.ciphertext);
        Ok(WrappedKey(out.ciphertext.into_bytes()))
    }

    /// Vault `rewrap`: an older version of this same key to the newest, inside Vault.
    async fn rewrap_from(
        &self,
        _source: &dyn KeyWrapper,
        record: &SealedRecord,
        ctx: &SealContext,
    ) -> Option<Result<WrappedKey, SealError>> {
        const OP: &str = "transit/rewrap";
        if !self.holds(&record.backend, &record.kek_id) {
            return None;
        }
        let ciphertext = match self.ciphertext(&record.wrapped_key) {
            Ok(c) => c,
            Err(e) => return Some(Err(e)),
        };
        let context = Self::context(ctx);
        let (mount, key) = (&self.spec.mount, &self.spec.key);
        let result: Result<_, SealError> = async {
            call!(self, OP, |c| vaultrs::transit::data::rewrap(
                c,
                mount,
                key,
                ciphertext,
                Some(RewrapDataRequest::builder().context(context.clone())),
            ))
        }
        .await;
        Some(result.map(|out| {
            self.learn_version(&out.ciphertext);
            WrappedKey(out.ciphertext.into_bytes())
        }))
    }

    async fn rotate_key_version(&self) -> Option<Result<(), SealError>> {
        let (mount, key) = (&self.spec.mount, &self.spec.key);
        let result: Result<(), SealError> = async {
            call!(self, "transit/keys/rotate", |c| {
                vaultrs::transit::key::rotate(c, mount, key)
            })
        }
        .await;
        Some(result)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_from_ciphertexts_and_kek_ids() {
        assert_eq!(ciphertext_version(b"vault:v12:abc="), Some(12));
        assert_eq!(ciphertext_version(b"vault:vx:abc="), None);
        assert_eq!(ciphertext_version(b"abc"), None);
        assert_eq!(
            split_version("ns/transit/keyd:v3"),
            ("ns/transit/keyd", Some(3))
        );
        assert_eq!(split_version("transit/keyd"), ("transit/keyd", None));
    }

    #[test]
    fn vault_errors_are_classified_by_status_and_message() {
        let api = |code, msg: &str| ClientError::APIError {
            code,
            errors: vec![msg.to_owned()],
        };
        let kind = |e| classify(&e).0;
        assert_eq!(
            kind(api(403, "permission denied")),
            FailureKind::PermissionDenied
        );
        assert_eq!(
            kind(api(400, "encryption key not found")),
            FailureKind::KeyNotFound
        );
        assert_eq!(
            kind(api(400, "cipher: message authentication failed")),
            FailureKind::ContextMismatch
        );
        assert_eq!(
            kind(api(
                400,
                "ciphertext or signature version is disallowed by policy (too old)"
            )),
            FailureKind::KeyDisabled
        );
        assert_eq!(kind(api(503, "Vault is sealed")), FailureKind::Unavailable);
        assert_eq!(
            kind(api(404, "no handler for route \"transit2/datakey\"")),
            FailureKind::KeyNotFound
        );
    }
}
