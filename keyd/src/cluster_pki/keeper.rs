//! The Kubernetes side of `[cluster_pki]`: the CA Secret, keyd's own certificate, the kept
//! Secrets, the trust ConfigMap and the webhook configurations' `caBundle`.

use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, PostParams};
use serde_json::json;
use sha2::{Digest as _, Sha256};
use zeroize::{Zeroize as _, Zeroizing};

use super::config::{ClusterPkiConfig, Issue, IssueKind, MANAGED_BY, canonical_names};
use crate::pki::{CertificateAuthority, CertificateInfo, IssuedCert, inspect, key_matches};
use crate::service::Keyd;
use crate::store::AuditEvent;

const CERT_MODE: u32 = 0o644;
/// The longest one pass (or the start's reading of the CA) may wait for the API server.
const PASS_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);
const KEY_MODE: u32 = 0o600;

/// Keeps the certificates of `[cluster_pki]` current; [`Keeper::run`] checks them every
/// `check_interval`.
pub struct Keeper {
    cfg: ClusterPkiConfig,
    keyd: Arc<Keyd>,
    client: kube::Client,
    ca: CertificateAuthority,
    verifiers: Verifiers,
}

/// rustls' verifiers trusting only the CA: a kept certificate is good when they accept it.
struct Verifiers {
    server: Arc<rustls::client::WebPkiServerVerifier>,
    client: Arc<dyn rustls::server::danger::ClientCertVerifier>,
}

impl Verifiers {
    fn of(ca: &CertificateAuthority) -> anyhow::Result<Self> {
        let der = inspect(&ca.cert_pem())
            .map_err(|e| anyhow!("the CA certificate {e}"))?
            .der;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls_pki_types::CertificateDer::from(der))
            .context("the CA certificate as a trust anchor")?;
        let roots = Arc::new(roots);
        let provider = keyd_mtls::tls::provider();
        Ok(Self {
            server: rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::clone(&roots),
                Arc::clone(&provider),
            )
            .build()
            .context("a verifier for the CA")?,
            client: rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
                .build()
                .context("a verifier for the CA")?,
        })
    }
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("namespace", &self.cfg.namespace)
            .field("ca", &self.ca)
            .finish_non_exhaustive()
    }
}

/// Before keyd's listeners start: the CA from its Secret (created when there is none) and
/// keyd's own serving certificate, written to `cfg.dir` where `tls.*` and `bootstrap.ca_key`
/// point.
///
/// When the API server cannot be reached, a restarted container of the same pod starts from
/// the CA and certificate an earlier start wrote to `cfg.dir`; the keeper catches up later.
pub async fn prepare(cfg: &ClusterPkiConfig, keyd: &Arc<Keyd>) -> anyhow::Result<Keeper> {
    use std::os::unix::fs::PermissionsExt as _;
    crate::fsutil::create_private_dir(&cfg.dir)
        .and_then(|()| std::fs::set_permissions(&cfg.dir, std::fs::Permissions::from_mode(0o700)))
        .with_context(|| format!("creating cluster_pki.dir {}", cfg.dir.display()))?;
    let client = crate::policy_watch::client(&cfg.kube)
        .context("building the Kubernetes client for [cluster_pki]")?;
    let ca = match tokio::time::timeout(PASS_TIMEOUT, ensure_ca(cfg, keyd, &client)).await {
        Ok(Ok(ca)) => ca,
        outcome => {
            let e = match outcome {
                Ok(Err(e)) => e,
                _ => anyhow!("the API server did not answer within {PASS_TIMEOUT:?}"),
            };
            let own = std::fs::read_to_string(cfg.server_cert_path()).ok();
            match CertificateAuthority::load(&cfg.ca_cert_path(), &cfg.ca_key_path()) {
                Ok(ca) if own.is_some() => {
                    tracing::warn!(
                        error = format!("{e:#}"),
                        "cluster_pki: cannot read the CA's Secret; starting from the CA and certificate this pod already holds"
                    );
                    ca
                }
                _ => return Err(e),
            }
        }
    };
    let keeper = Keeper {
        cfg: cfg.clone(),
        keyd: Arc::clone(keyd),
        client,
        verifiers: Verifiers::of(&ca)?,
        ca,
    };
    keeper.keep_own().await?;
    Ok(keeper)
}

/// Reads the CA Secret, or creates it with a new CA when there is none. Two replicas starting
/// at once both try; the API server lets one create it and the other reads that one.
async fn ensure_ca(
    cfg: &ClusterPkiConfig,
    keyd: &Keyd,
    client: &kube::Client,
) -> anyhow::Result<CertificateAuthority> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &cfg.namespace);
    let what = format!("Secret {}/{}", cfg.namespace, cfg.ca_secret);
    for _ in 0..3 {
        if let Some(mut secret) = secrets
            .get_opt(&cfg.ca_secret)
            .await
            .with_context(|| format!("reading {what}"))?
        {
            let data = secret.data.take().unwrap_or_default();
            let result = write_ca_files(cfg, &data);
            zeroize_data(data);
            result.with_context(|| format!("{what} does not hold a CA keyd can use"))?;
            return CertificateAuthority::load(&cfg.ca_cert_path(), &cfg.ca_key_path())
                .with_context(|| format!("{what} does not hold a CA keyd can use"));
        }
        let ca = CertificateAuthority::generate("keyd CA").context("generating the CA")?;
        // Durable before the CA is stored: a CA nobody can audit does not come to exist. A
        // replica that loses the race below has recorded a CA that was never stored.
        match store_ca(cfg, keyd, &secrets, &ca, "pki.ca.created").await? {
            Ok(_) => {
                tracing::info!(secret = %what, "created the cluster CA");
                ca.write(&cfg.ca_cert_path(), &cfg.ca_key_path())
                    .context("writing the CA to cluster_pki.dir")?;
                return Ok(ca);
            }
            Err(e) if is_conflict(&e) => {
                tracing::info!(secret = %what, "another replica created the CA first; using it");
            }
            Err(e) => return Err(e).with_context(|| format!("creating {what}")),
        }
    }
    bail!("{what} was created and then disappeared three times over; is something deleting it?")
}

/// Audits `action` for `ca`, then creates its Secret. The outer error: the audit failed and
/// nothing was created; the inner: what the API server answered.
async fn store_ca(
    cfg: &ClusterPkiConfig,
    keyd: &Keyd,
    secrets: &Api<Secret>,
    ca: &CertificateAuthority,
    action: &str,
) -> anyhow::Result<Result<Secret, kube::Error>> {
    let cert_pem = ca.cert_pem();
    let info = inspect(&cert_pem).map_err(|e| anyhow!("the CA certificate {e}"))?;
    keyd.audit(AuditEvent::new(
        action,
        keyd.system_actor("pki"),
        json!({ "secret": format!("{}/{}", cfg.namespace, cfg.ca_secret),
                "serial": info.serial, "sha256": hex::encode(Sha256::digest(&info.der)),
                "not_after": info.not_after }),
    ))
    .await
    .context("auditing the CA")?;
    let key_pem = ca.key_pem();
    let data = BTreeMap::from([
        ("tls.crt".to_owned(), ByteString(cert_pem.into_bytes())),
        (
            "tls.key".to_owned(),
            ByteString(key_pem.as_bytes().to_vec()),
        ),
    ]);
    let mut secret = tls_secret(cfg, &cfg.ca_secret, data);
    let created = secrets.create(&PostParams::default(), &secret).await;
    zeroize_data(secret.data.take().unwrap_or_default());
    Ok(created)
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn write_ca_files(
    cfg: &ClusterPkiConfig,
    data: &BTreeMap<String, ByteString>,
) -> anyhow::Result<()> {
    let (Some(cert), Some(key)) = (data.get("tls.crt"), data.get("tls.key")) else {
        bail!("it lacks tls.crt or tls.key");
    };
    // Key first: a certificate on disk always has its key beside it.
    crate::fsutil::write_atomic(&cfg.ca_key_path(), &key.0, KEY_MODE)
        .with_context(|| format!("writing {}", cfg.ca_key_path().display()))?;
    crate::fsutil::write_atomic(&cfg.ca_cert_path(), &cert.0, CERT_MODE)
        .with_context(|| format!("writing {}", cfg.ca_cert_path().display()))
}

fn zeroize_data(mut data: BTreeMap<String, ByteString>) {
    for v in data.values_mut() {
        v.0.zeroize();
    }
}

fn managed_meta(cfg: &ClusterPkiConfig, name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(cfg.namespace.clone()),
        labels: Some(BTreeMap::from([(
            MANAGED_BY.0.to_owned(),
            MANAGED_BY.1.to_owned(),
        )])),
        ..ObjectMeta::default()
    }
}

fn tls_secret(cfg: &ClusterPkiConfig, name: &str, data: BTreeMap<String, ByteString>) -> Secret {
    Secret {
        metadata: managed_meta(cfg, name),
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(data),
        ..Secret::default()
    }
}

fn is_managed(meta: &ObjectMeta) -> bool {
    meta.labels
        .as_ref()
        .and_then(|l| l.get(MANAGED_BY.0))
        .is_some_and(|v| v == MANAGED_BY.1)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// What a certificate is for, to compare a stored one against.
enum Want<'a> {
    Server(&'a [String]),
    Client(&'a keyd_proto::identity::Identity),
}

impl Keeper {
    /// Checks every certificate every `check_interval` until `shutdown`. A pass that takes
    /// longer than [`PASS_TIMEOUT`] (an API server that stopped answering) counts as failed.
    pub async fn run(self, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        loop {
            let outcome = tokio::select! {
                o = tokio::time::timeout(PASS_TIMEOUT, self.pass()) => o,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match outcome {
                Ok(Ok(())) => {
                    self.keyd.metrics.pki.last_success.set(now() as i64);
                }
                Ok(Err(e)) => {
                    self.keyd.metrics.pki.failures.inc();
                    tracing::warn!(error = format!("{e:#}"), "cluster_pki: a pass failed");
                }
                Err(_) => {
                    self.keyd.metrics.pki.failures.inc();
                    tracing::warn!(
                        "cluster_pki: a pass failed: the API server did not answer within {PASS_TIMEOUT:?}"
                    );
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(self.cfg.check_interval) => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
        }
    }

    /// One check of everything; an error in one part does not keep the others from running.
    /// Every replica keeps its own certificate; what replicas share (the CA's Secret, the
    /// ConfigMap, the Secrets, the caBundle) only the leader writes.
    pub async fn pass(&self) -> anyhow::Result<()> {
        let mut errors = Vec::new();
        if let Err(e) = self.keep_own().await {
            errors.push(e);
        }
        if let Ok(info) = inspect(&self.ca.cert_pem()) {
            self.record(&self.cfg.ca_secret, &info);
        }
        match self.check_ca().await {
            Err(e) => errors.push(e),
            Ok(()) if !self.keyd.is_leader() => {}
            Ok(()) => {
                if let Err(e) = self.keep_trust().await {
                    errors.push(e);
                }
                let mut serving_ok = true;
                for issue in &self.cfg.issue {
                    if let Err(e) = self.keep_secret(issue).await {
                        serving_ok &= !matches!(issue.kind, IssueKind::Server(_));
                        errors.push(e);
                    }
                }
                // The API server trusts the CA for the webhooks only once their serving
                // certificates are keyd's: a Secret keyd leaves alone (cert-manager's, during
                // a move) keeps its caBundle.
                for name in &self.cfg.webhook_configurations {
                    let kept = if serving_ok {
                        self.keep_ca_bundle(name).await
                    } else {
                        Err(anyhow!(
                            "ValidatingWebhookConfiguration {name}: caBundle left as it is while a \
                             serving certificate is not keyd's"
                        ))
                    };
                    if let Err(e) = kept {
                        errors.push(e);
                    }
                }
            }
        }
        match errors.len() {
            0 => Ok(()),
            1 => Err(errors.remove(0)),
            n => Err(anyhow!(
                "{n} errors: {}",
                errors
                    .iter()
                    .map(|e| format!("{e:#}"))
                    .collect::<Vec<_>>()
                    .join("; ")
            )),
        }
    }

    /// The CA's Secret still holds the CA this process signs with. Deleted, the leader puts it
    /// back. Changed (an operator replacing the CA), this process restarts to load it, and
    /// writes nothing with the old one meanwhile.
    async fn check_ca(&self) -> anyhow::Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        let what = format!("Secret {}/{}", self.cfg.namespace, self.cfg.ca_secret);
        let stored = secrets
            .get_opt(&self.cfg.ca_secret)
            .await
            .with_context(|| format!("reading {what}"))?;
        match stored {
            None if self.keyd.is_leader() => {
                match store_ca(&self.cfg, &self.keyd, &secrets, &self.ca, "pki.ca.restored").await?
                {
                    Ok(_) => {
                        tracing::warn!(secret = %what, "the CA's Secret was deleted; put it back");
                        Ok(())
                    }
                    Err(e) if is_conflict(&e) => Ok(()),
                    Err(e) => Err(e).with_context(|| format!("restoring {what}")),
                }
            }
            None => bail!("{what} is gone; the leader puts it back"),
            Some(mut secret) => {
                let data = secret.data.take().unwrap_or_default();
                let same = data.get("tls.crt").map(|c| c.0.as_slice())
                    == Some(self.ca.cert_pem().as_bytes());
                zeroize_data(data);
                if same {
                    return Ok(());
                }
                let why = format!("{what} holds another CA than the one this keyd loaded");
                self.keyd.want_restart(why.clone());
                bail!("{why}: restarting to load it")
            }
        }
    }
    /// Why a certificate must be issued anew, or `None` while it is good. `cert` and `key`
    /// are what is stored, if anything.
    fn due(
        &self,
        cert: Option<&str>,
        key: Option<&str>,
        ca: Option<&str>,
        want: &Want<'_>,
    ) -> Option<&'static str> {
        let (Some(cert), Some(key)) = (cert, key) else {
            return Some("missing");
        };
        let Ok(info) = inspect(cert) else {
            return Some("unreadable");
        };
        if !key_matches(&info, key) {
            return Some("unreadable");
        }
        if ca.is_some_and(|ca| ca != self.ca.cert_pem()) || !self.signed_by_ca(&info, want) {
            return Some("ca_changed");
        }
        let matches = match want {
            Want::Server(names) => {
                canonical_names(names) == canonical_names(&info.server_names)
                    && info.uris.is_empty()
            }
            Want::Client(id) => info.uris == [id.uri()] && info.server_names.is_empty(),
        };
        if !matches {
            return Some("names_changed");
        }
        let left = info.not_after.saturating_sub(now());
        if left < self.cfg.validity.as_secs() / 3 {
            return Some("renewal");
        }
        None
    }

    /// Whether a TLS peer trusting only the CA accepts this certificate for `want`'s use: the
    /// CA's signature, the validity period and the key usage, as rustls checks them.
    fn signed_by_ca(&self, info: &CertificateInfo, want: &Want<'_>) -> bool {
        use rustls::client::danger::ServerCertVerifier as _;
        let leaf = rustls_pki_types::CertificateDer::from(info.der.clone());
        let now = rustls_pki_types::UnixTime::now();
        match want {
            Want::Server(names) => {
                let Some(name) = names
                    .first()
                    .and_then(|n| rustls_pki_types::ServerName::try_from(n.clone()).ok())
                else {
                    return false;
                };
                self.verifiers
                    .server
                    .verify_server_cert(&leaf, &[], &name, &[], now)
                    .is_ok()
            }
            Want::Client(_) => self
                .verifiers
                .client
                .verify_client_cert(&leaf, &[], now)
                .is_ok(),
        }
    }

    fn record(&self, label: &str, info: &CertificateInfo) {
        self.keyd
            .metrics
            .pki
            .not_after
            .get_or_create(&crate::telemetry::CertificateLabel {
                certificate: label.to_owned(),
            })
            .set(info.not_after as i64);
    }

    /// Issues for `want`, audited before it is stored (`where_` says where it goes).
    async fn issue(
        &self,
        want: &Want<'_>,
        where_: serde_json::Value,
        reason: &str,
    ) -> anyhow::Result<(IssuedCert, CertificateInfo)> {
        let issued = match want {
            Want::Server(names) => self.ca.issue_server(names, self.cfg.validity),
            Want::Client(id) => self.ca.issue_client(id, self.cfg.validity),
        }
        .context("issuing a certificate")?;
        let info = inspect(&issued.cert_pem).map_err(|e| anyhow!("the issued certificate {e}"))?;
        let names = match want {
            Want::Server(names) => json!({ "server_names": names }),
            Want::Client(id) => json!({ "identity": id.uri() }),
        };
        self.keyd
            .audit(AuditEvent::new(
                "pki.certificate.issued",
                self.keyd.system_actor("pki"),
                json!({ "to": where_, "for": names, "serial": info.serial,
                        "not_after": info.not_after, "reason": reason }),
            ))
            .await
            .context("auditing a certificate's issuance")?;
        Ok((issued, info))
    }

    /// keyd's own serving certificate in `dir`: issued at the first start of the pod, renewed
    /// in place (the listeners reload it).
    async fn keep_own(&self) -> anyhow::Result<()> {
        let cert = std::fs::read_to_string(self.cfg.server_cert_path()).ok();
        let key = keyd_mtls::tls::read_secret(&self.cfg.server_key_path())
            .ok()
            .map(|k| Zeroizing::new(String::from_utf8_lossy(&k).into_owned()));
        let want = Want::Server(&self.cfg.server_names);
        let Some(reason) = self.due(
            cert.as_deref(),
            key.as_deref().map(|k| k.as_str()),
            None,
            &want,
        ) else {
            if let Some(info) = cert.as_deref().and_then(|c| inspect(c).ok()) {
                self.record("keyd-server", &info);
            }
            return Ok(());
        };
        let file = self.cfg.server_cert_path().display().to_string();
        let (issued, info) = self.issue(&want, json!({ "file": file }), reason).await?;
        issued
            .write(&self.cfg.server_cert_path(), &self.cfg.server_key_path())
            .context("writing keyd's serving certificate")?;
        tracing::info!(
            reason,
            serial = info.serial,
            "issued keyd's serving certificate"
        );
        self.record("keyd-server", &info);
        Ok(())
    }

    /// The ConfigMap holding the CA certificate as `ca.crt`.
    async fn keep_trust(&self) -> anyhow::Result<()> {
        let maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        let name = &self.cfg.trust_config_map;
        let what = format!("ConfigMap {}/{name}", self.cfg.namespace);
        let ca = self.ca.cert_pem();
        let data = BTreeMap::from([("ca.crt".to_owned(), ca.clone())]);
        match maps
            .get_opt(name)
            .await
            .with_context(|| format!("reading {what}"))?
        {
            None => {
                let map = ConfigMap {
                    metadata: managed_meta(&self.cfg, name),
                    data: Some(data),
                    ..ConfigMap::default()
                };
                maps.create(&PostParams::default(), &map)
                    .await
                    .with_context(|| format!("creating {what}"))?;
                tracing::info!(config_map = %what, "published the CA certificate");
            }
            Some(mut map) => {
                if map.data.as_ref().and_then(|d| d.get("ca.crt")) == Some(&ca) {
                    return Ok(());
                }
                if !is_managed(&map.metadata) {
                    bail!(
                        "{what} exists but keyd did not create it (no label {}={}); keyd leaves \
                         it alone: delete it or set cluster_pki.trust_config_map",
                        MANAGED_BY.0,
                        MANAGED_BY.1
                    );
                }
                map.data = Some(data);
                maps.replace(name, &PostParams::default(), &map)
                    .await
                    .with_context(|| format!("updating {what}"))?;
                tracing::info!(config_map = %what, "updated the CA certificate");
            }
        }
        Ok(())
    }

    /// One `[[cluster_pki.issue]]` Secret.
    async fn keep_secret(&self, issue: &Issue) -> anyhow::Result<()> {
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.cfg.namespace);
        let what = format!("Secret {}/{}", self.cfg.namespace, issue.secret);
        let want = match &issue.kind {
            IssueKind::Server(names) => Want::Server(names),
            IssueKind::Client(id) => Want::Client(id),
        };
        let existing = secrets
            .get_opt(&issue.secret)
            .await
            .with_context(|| format!("reading {what}"))?;
        let mut existing = match existing {
            Some(mut s) if !is_managed(&s.metadata) => {
                zeroize_data(s.data.take().unwrap_or_default());
                bail!(
                    "{what} exists but keyd did not create it (no label {}={}); keyd leaves it \
                     alone: delete it or name another Secret in [[cluster_pki.issue]]",
                    MANAGED_BY.0,
                    MANAGED_BY.1
                )
            }
            other => other,
        };
        let data = existing
            .as_mut()
            .and_then(|s| s.data.take())
            .unwrap_or_default();
        let text = |k: &str| data.get(k).and_then(|v| std::str::from_utf8(&v.0).ok());
        let reason = self.due(
            text("tls.crt"),
            text("tls.key"),
            Some(text("ca.crt").unwrap_or("")),
            &want,
        );
        if reason.is_none()
            && let Some(info) = text("tls.crt").and_then(|c| inspect(c).ok())
        {
            self.record(&issue.secret, &info);
        }
        zeroize_data(data);
        let Some(reason) = reason else {
            return Ok(());
        };
        let (issued, info) = self
            .issue(
                &want,
                json!({ "secret": format!("{}/{}", self.cfg.namespace, issue.secret) }),
                reason,
            )
            .await?;
        let data = BTreeMap::from([
            (
                "tls.crt".to_owned(),
                ByteString(issued.cert_pem.clone().into_bytes()),
            ),
            (
                "tls.key".to_owned(),
                ByteString(issued.key_pem.as_bytes().to_vec()),
            ),
            (
                "ca.crt".to_owned(),
                ByteString(self.ca.cert_pem().into_bytes()),
            ),
        ]);
        let mut secret = tls_secret(&self.cfg, &issue.secret, data);
        let written = match existing {
            None => secrets.create(&PostParams::default(), &secret).await,
            Some(old) => {
                // Optimistic: a write meanwhile (a replica that led a moment ago) makes this
                // one fail with 409, and the next pass checks what is there. Labels and
                // annotations other tools added stay.
                let mut labels = old.metadata.labels.unwrap_or_default();
                labels.insert(MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned());
                secret.metadata.labels = Some(labels);
                secret.metadata.annotations = old.metadata.annotations;
                secret.metadata.resource_version = old.metadata.resource_version;
                secrets
                    .replace(&issue.secret, &PostParams::default(), &secret)
                    .await
            }
        };
        zeroize_data(secret.data.take().unwrap_or_default());
        match written {
            Ok(_) => {}
            Err(e) if is_conflict(&e) => {
                tracing::info!(secret = %what, "written meanwhile by another keyd; checked again next pass");
                return Ok(());
            }
            Err(e) => return Err(e).with_context(|| format!("writing {what}")),
        }
        tracing::info!(secret = %what, reason, serial = info.serial, "issued a certificate");
        self.record(&issue.secret, &info);
        Ok(())
    }

    /// Every webhook of the ValidatingWebhookConfiguration `name` trusts the CA.
    async fn keep_ca_bundle(&self, name: &str) -> anyhow::Result<()> {
        let api: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        let what = format!("ValidatingWebhookConfiguration {name}");
        let Some(mut vwc) = api
            .get_opt(name)
            .await
            .with_context(|| format!("reading {what}"))?
        else {
            bail!("{what} does not exist (yet): its caBundle cannot be set");
        };
        let bundle = ByteString(self.ca.cert_pem().into_bytes());
        let mut changed = false;
        for webhook in vwc.webhooks.iter_mut().flatten() {
            if webhook.client_config.ca_bundle.as_ref() != Some(&bundle) {
                webhook.client_config.ca_bundle = Some(bundle.clone());
                changed = true;
            }
        }
        if changed {
            api.replace(name, &PostParams::default(), &vwc)
                .await
                .with_context(|| format!("updating {what}"))?;
            tracing::info!(configuration = name, "set the webhooks' caBundle to the CA");
        }
        Ok(())
    }
}
