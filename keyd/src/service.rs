//! keyd's core: the operations the API exposes, over the store and the key custodian.
//!
//! Every change is one [`Txn`]: the sealed records, the state document it updates (guarded by
//! compare-and-swap on its previous bytes) and the audit events describing it commit together or
//! not at all. The in-memory [`Cache`] holds only what can be rebuilt from the store (unsealed
//! keys, the node table, rendered bundles); it is refreshed from the store after each commit.
//! A replicated backend will additionally need a store watch to refresh it on other replicas.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use keyd_proto::identity::Identity;
use keyd_proto::{
    Ack, Acked, EnforcementStatus, IpsecBundle, IpsecPeer, IpsecStatus, KeyRole, KeySpec,
    ModeStatus, NodeBundle, NodeInfo, NodeRegistration, RotateRequest, Status, Timestamp,
    WireguardBundle, WireguardStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::ipsec::{CiliumKey, IpsecError};
use crate::seal::{self, Key256, KeyWrapper, SealContext, SealError, SealedRecord};
use crate::store::{AuditEvent, Store, StoreError, Table, Txn};
use crate::wireguard;

const IPSEC_DOC: &str = "ipsec";
const WIREGUARD_DOC: &str = "wireguard";
const PURPOSE_IPSEC: &str = "ipsec-psk";
const PURPOSE_WG_MASTER: &str = "wireguard-psk-master";

/// How stale a node's stored `last_seen` may get before a bundle fetch rewrites it. Keeps polls
/// from turning into a disk write each.
const LAST_SEEN_WRITE_INTERVAL: Duration = Duration::from_secs(30);

/// The IPsec key set as stored (non-secret; the keys are sealed records).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct IpsecState {
    /// Record ids are `ipsec/<serial>`; serials never repeat, unlike key IDs, which wrap.
    next_serial: u64,
    /// Newest first: the current key, then the previous one.
    keys: Vec<IpsecKeyEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct IpsecKeyEntry {
    serial: u64,
    spi: u8,
    created_at: Timestamp,
    origin: String,
}

impl IpsecKeyEntry {
    fn ctx(&self) -> SealContext {
        SealContext {
            record_id: format!("ipsec/{}", self.serial),
            purpose: PURPOSE_IPSEC,
            version: 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WireguardState {
    psk_epoch: u64,
    master_serial: u64,
}

impl WireguardState {
    fn master_ctx(&self) -> SealContext {
        SealContext {
            record_id: format!("wireguard/master/{}", self.master_serial),
            purpose: PURPOSE_WG_MASTER,
            version: 1,
        }
    }
}

/// What is rebuilt from the store: never the only copy of anything.
struct Cache {
    ipsec_doc: Option<Vec<u8>>,
    ipsec: Vec<(IpsecKeyEntry, CiliumKey)>,
    wg: WireguardState,
    wg_master: Key256,
    nodes: BTreeMap<String, NodeInfo>,
    /// Bumped on every refresh; rendered bundles of an older generation are stale.
    generation: u64,
}

/// A serialized bundle, kept until the state changes. The body holds key bytes: it is zeroized
/// when the last response referring to it is dropped.
pub struct RenderedBundle {
    pub etag: String,
    body: Zeroizing<Vec<u8>>,
    generation: u64,
}

impl RenderedBundle {
    /// The body as `Bytes` sharing this allocation (no copy to forget to zeroize).
    pub fn body(self: &Arc<Self>) -> Bytes {
        Bytes::from_owner(BundleBody(Arc::clone(self)))
    }
}

impl fmt::Debug for RenderedBundle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RenderedBundle")
            .field("etag", &self.etag)
            .finish_non_exhaustive()
    }
}

struct BundleBody(Arc<RenderedBundle>);

impl AsRef<[u8]> for BundleBody {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
}

pub struct Keyd {
    store: Arc<dyn Store>,
    wrapper: Arc<dyn KeyWrapper>,
    cache: RwLock<Arc<Cache>>,
    bundles: RwLock<HashMap<String, Arc<RenderedBundle>>>,
    /// Serializes this replica's writers so they do not race each other's CAS guards.
    write_lock: tokio::sync::Mutex<()>,
    pub metrics: crate::telemetry::Metrics,
}

impl fmt::Debug for Keyd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keyd")
            .field("store", &self.store)
            .field("wrapper", &self.wrapper)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Ipsec(#[from] IpsecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
}

type Result<T, E = ServiceError> = std::result::Result<T, E>;

impl Keyd {
    /// Opens keyd over a store: creates the WireGuard master secret on first start, unseals what
    /// the store holds and fails if any record does not open (wrong KEK, tampering).
    pub async fn open(store: Arc<dyn Store>, wrapper: Arc<dyn KeyWrapper>) -> Result<Self> {
        if store.get(Table::Meta, WIREGUARD_DOC)?.is_none() {
            let state = WireguardState {
                psk_epoch: 1,
                master_serial: 1,
            };
            let master = Key256::random()?;
            let sealed = seal::seal(wrapper.as_ref(), &state.master_ctx(), master.expose()).await?;
            let txn = Txn::default()
                .guard(Table::Meta, WIREGUARD_DOC, None)
                .put(
                    Table::Sealed,
                    state.master_ctx().record_id,
                    sealed.to_bytes(),
                )
                .put(Table::Meta, WIREGUARD_DOC, to_json(&state))
                .audit(AuditEvent::new(
                    "wireguard.psk_master.generated",
                    "keyd",
                    json!({ "epoch": state.psk_epoch, "kek": wrapper.key_id() }),
                ));
            match store.commit(txn) {
                Ok(()) | Err(StoreError::Conflict { .. }) => {} // another replica won the race
                Err(e) => return Err(e.into()),
            }
        }
        let cache = load_cache(store.as_ref(), wrapper.as_ref(), None).await?;
        Ok(Self {
            store,
            wrapper,
            cache: RwLock::new(Arc::new(cache)),
            bundles: RwLock::new(HashMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
            metrics: crate::telemetry::Metrics::default(),
        })
    }

    fn cache(&self) -> Arc<Cache> {
        // A poisoned lock means a panic while swapping an Arc, which leaves it intact.
        Arc::clone(&self.cache.read().unwrap_or_else(|p| p.into_inner()))
    }

    async fn refresh(&self) -> Result<()> {
        let prev = self.cache();
        let fresh = load_cache(self.store.as_ref(), self.wrapper.as_ref(), Some(&prev)).await?;
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        self.bundles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        Ok(())
    }

    /// Commits on a blocking thread (redb fsyncs) and refreshes the cache.
    async fn commit(&self, txn: Txn) -> Result<()> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.commit(txn))
            .await
            .map_err(|e| {
                ServiceError::Store(StoreError::Backend {
                    op: "commit task",
                    source: Box::new(e),
                })
            })??;
        self.refresh().await
    }

    pub fn describe_store(&self) -> String {
        self.store.describe()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    // ---- nodes -------------------------------------------------------------------------------

    pub async fn register_node(
        &self,
        actor: &Identity,
        name: &str,
        reg: NodeRegistration,
    ) -> Result<NodeInfo> {
        if let Some(key) = &reg.wireguard_public_key {
            wireguard::validate_public_key(key).map_err(ServiceError::Invalid)?;
        }
        if let Some(boot_id) = &reg.boot_id
            && (boot_id.is_empty() || boot_id.len() > 64)
        {
            return Err(ServiceError::Invalid(
                "boot_id must be 1 to 64 characters".into(),
            ));
        }
        let _w = self.write_lock.lock().await;
        let cache = self.cache();
        if let Some(key) = &reg.wireguard_public_key
            && let Some(other) = cache
                .nodes
                .values()
                .find(|n| n.name != name && n.wireguard_public_key.as_ref() == Some(key))
        {
            return Err(ServiceError::Conflict(format!(
                "this WireGuard public key is already registered by node {:?}; every node needs its own keypair",
                other.name
            )));
        }
        let previous = self.store.get(Table::Nodes, name)?;
        let old: Option<NodeInfo> = previous
            .as_deref()
            .map(|b| from_json(b, "node record"))
            .transpose()?;
        let now = Timestamp::now();
        let info = NodeInfo {
            name: name.to_owned(),
            endpoint: reg.endpoint,
            pod_cidrs: reg.pod_cidrs,
            wireguard_public_key: reg.wireguard_public_key,
            boot_id: reg.boot_id,
            registered_at: old.as_ref().map_or(now, |o| o.registered_at),
            last_seen: now,
            acked: old.as_ref().map(|o| o.acked.clone()).unwrap_or_default(),
        };
        let mut txn = Txn::default().guard(Table::Nodes, name, previous).put(
            Table::Nodes,
            name,
            to_json(&info),
        );
        let details =
            json!({ "node": name, "endpoint": info.endpoint, "pod_cidrs": info.pod_cidrs });
        match &old {
            None => txn = txn.audit(AuditEvent::new("node.registered", actor, details)),
            Some(o)
                if (&o.endpoint, &o.pod_cidrs, &o.boot_id)
                    != (&info.endpoint, &info.pod_cidrs, &info.boot_id) =>
            {
                txn = txn.audit(AuditEvent::new("node.updated", actor, details));
            }
            Some(_) => {}
        }
        if old.as_ref().and_then(|o| o.wireguard_public_key.as_ref())
            != info.wireguard_public_key.as_ref()
        {
            txn = txn.audit(AuditEvent::new(
                "wireguard.node_key.registered",
                actor,
                json!({ "node": name, "public_key": info.wireguard_public_key }),
            ));
        }
        self.commit(txn).await?;
        Ok(info)
    }

    pub fn list_nodes(&self) -> Vec<NodeInfo> {
        self.cache().nodes.values().cloned().collect()
    }

    pub async fn ack(&self, actor: &Identity, name: &str, mut ack: Ack) -> Result<NodeInfo> {
        let cache = self.cache();
        for spi in &ack.ipsec_spis {
            if !cache.ipsec.iter().any(|(e, _)| e.spi == *spi) {
                return Err(ServiceError::Invalid(format!(
                    "SPI {spi} is not a key keyd holds"
                )));
            }
        }
        if let Some(out) = ack.ipsec_outbound_spi
            && !ack.ipsec_spis.contains(&out)
        {
            return Err(ServiceError::Invalid(format!(
                "ipsec_outbound_spi {out} is not among ipsec_spis"
            )));
        }
        if let Some(epoch) = ack.wireguard_epoch
            && epoch != cache.wg.psk_epoch
        {
            return Err(ServiceError::Invalid(format!(
                "wireguard_epoch {epoch} is not the current epoch {}",
                cache.wg.psk_epoch
            )));
        }
        ack.ipsec_spis.sort_unstable();
        ack.ipsec_spis.dedup();
        let _w = self.write_lock.lock().await;
        let previous = self
            .store
            .get(Table::Nodes, name)?
            .ok_or_else(|| not_registered(name))?;
        let mut info: NodeInfo = from_json(&previous, "node record")?;
        let changed = info.acked.ack != ack;
        let now = Timestamp::now();
        info.acked = Acked { ack, at: Some(now) };
        info.last_seen = now;
        let mut txn = Txn::default()
            .guard(Table::Nodes, name, Some(previous))
            .put(Table::Nodes, name, to_json(&info));
        if changed {
            txn = txn.audit(AuditEvent::new(
                "node.keys.acknowledged",
                actor,
                json!({ "node": name, "ipsec_spis": info.acked.ack.ipsec_spis,
                        "ipsec_outbound_spi": info.acked.ack.ipsec_outbound_spi,
                        "wireguard_epoch": info.acked.ack.wireguard_epoch }),
            ));
        }
        self.commit(txn).await?;
        Ok(info)
    }

    /// The node's bundle, rendered once per state generation and shared between fetches.
    pub async fn bundle(&self, name: &str) -> Result<Arc<RenderedBundle>> {
        let cache = self.cache();
        let node = cache.nodes.get(name).ok_or_else(|| not_registered(name))?;
        if Timestamp::now().0.saturating_sub(node.last_seen.0) >= LAST_SEEN_WRITE_INTERVAL.as_secs()
        {
            self.touch(name).await?;
        }
        if let Some(b) = self
            .bundles
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            && b.generation == cache.generation
        {
            return Ok(Arc::clone(b));
        }
        let rendered = Arc::new(render_bundle(&cache, name));
        self.bundles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), Arc::clone(&rendered));
        Ok(rendered)
    }

    /// Records that a node is alive without changing anything else about it.
    async fn touch(&self, name: &str) -> Result<()> {
        let _w = self.write_lock.lock().await;
        let Some(previous) = self.store.get(Table::Nodes, name)? else {
            return Ok(());
        };
        let mut info: NodeInfo = from_json(&previous, "node record")?;
        info.last_seen = Timestamp::now();
        self.commit(
            Txn::default()
                .guard(Table::Nodes, name, Some(previous))
                .put(Table::Nodes, name, to_json(&info)),
        )
        .await
    }

    // ---- IPsec -------------------------------------------------------------------------------

    pub fn ipsec_status(&self) -> IpsecStatus {
        ipsec_status(&self.cache())
    }

    /// Generates the next key (or the first one) and makes it current; the current key becomes
    /// the previous one and the key before it is retired.
    pub async fn rotate_ipsec(&self, actor: &Identity, req: RotateRequest) -> Result<IpsecStatus> {
        let _w = self.write_lock.lock().await;
        let cache = self.cache();
        let new_key = match (cache.ipsec.first(), req.algorithm) {
            (None, spec) => CiliumKey::generate(
                crate::ipsec::KeyId::new(1)?,
                spec.unwrap_or(KeySpec::Gcm128),
                true,
            )?,
            (Some((_, current)), None) => current.rotated()?,
            (Some((_, current)), Some(spec)) => {
                let probe = CiliumKey::generate(current.id.next(), spec, current.per_tunnel)?;
                if probe.spec() != current.spec() {
                    return Err(ServiceError::Invalid(format!(
                        "the algorithm cannot change in a rotation (current: {} {} bits); \
                         Cilium requires the algorithm and key length to stay fixed",
                        current.spec().algorithm,
                        current.spec().key_bits
                    )));
                }
                probe
            }
        };
        self.install_ipsec_key(actor, &cache, new_key, "generated")
            .await
    }

    /// Imports a Cilium `keys` line as the new current key, by the same rules as a rotation.
    pub async fn import_ipsec(&self, actor: &Identity, line: &str) -> Result<IpsecStatus> {
        let key = CiliumKey::parse_line(line)?;
        let _w = self.write_lock.lock().await;
        let cache = self.cache();
        if let Some((_, current)) = cache.ipsec.first() {
            key.check_replaces(current)?;
        }
        self.install_ipsec_key(actor, &cache, key, "imported").await
    }

    async fn install_ipsec_key(
        &self,
        actor: &Identity,
        cache: &Cache,
        key: CiliumKey,
        origin: &str,
    ) -> Result<IpsecStatus> {
        let mut state: IpsecState = match &cache.ipsec_doc {
            Some(b) => from_json(b, "IPsec state")?,
            None => IpsecState {
                next_serial: 1,
                keys: vec![],
            },
        };
        let entry = IpsecKeyEntry {
            serial: state.next_serial,
            spi: key.id.get(),
            created_at: Timestamp::now(),
            origin: origin.into(),
        };
        let line = key.to_line();
        let sealed = seal::seal(self.wrapper.as_ref(), &entry.ctx(), line.as_bytes()).await?;
        let spec = key.spec();
        let mut txn = Txn::default()
            .guard(Table::Meta, IPSEC_DOC, cache.ipsec_doc.clone())
            .put(Table::Sealed, entry.ctx().record_id, sealed.to_bytes())
            .audit(AuditEvent::new(
                &format!("ipsec.key.{origin}"),
                actor,
                json!({ "spi": entry.spi, "record": entry.ctx().record_id, "algorithm": spec.algorithm,
                        "key_bits": spec.key_bits, "per_tunnel": key.per_tunnel, "kek": self.wrapper.key_id() }),
            ))
            .audit(AuditEvent::new("ipsec.key.activated", actor, json!({ "spi": entry.spi })));
        state.next_serial += 1;
        state.keys.insert(0, entry);
        // Keep the current and the previous key; older ones are retired.
        for retired in state.keys.split_off(2.min(state.keys.len())) {
            txn = txn
                .delete(Table::Sealed, retired.ctx().record_id)
                .audit(AuditEvent::new(
                    "ipsec.key.retired",
                    actor,
                    json!({ "spi": retired.spi, "record": retired.ctx().record_id }),
                ));
        }
        txn = txn.put(Table::Meta, IPSEC_DOC, to_json(&state));
        self.commit(txn).await?;
        self.metrics.ipsec_rotations.inc();
        Ok(self.ipsec_status())
    }

    /// The current key as Cilium's `keys` line, or as the `cilium-ipsec-keys` Secret. Audited:
    /// it hands key material out of keyd.
    pub async fn cilium_export(
        &self,
        actor: &Identity,
        secret_namespace: Option<&str>,
    ) -> Result<Zeroizing<String>> {
        let cache = self.cache();
        let (entry, key) = cache.ipsec.first().ok_or_else(|| {
            ServiceError::NotFound(
                "no IPsec key yet: run `keyctl ipsec rotate` or `keyctl ipsec import`".into(),
            )
        })?;
        let out = match secret_namespace {
            Some(ns) => {
                keyd_proto::identity::validate_name(ns)
                    .map_err(|e| ServiceError::Invalid(format!("namespace: {e}")))?;
                crate::ipsec::render_secret_yaml(key, ns)
            }
            None => key.to_line(),
        };
        self.commit(Txn::default().audit(AuditEvent::new(
            "ipsec.key.exported",
            actor,
            json!({ "spi": entry.spi, "format": if secret_namespace.is_some() { "secret" } else { "line" } }),
        )))
        .await?;
        Ok(out)
    }

    // ---- status ------------------------------------------------------------------------------

    pub fn status(&self) -> Status {
        let cache = self.cache();
        Status {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            store: self.store.describe(),
            kek_backend: self.wrapper.backend().to_owned(),
            kek_id: self.wrapper.key_id(),
            nodes: cache.nodes.len(),
            ipsec: ipsec_status(&cache),
            wireguard: WireguardStatus {
                psk_epoch: cache.wg.psk_epoch,
                nodes_with_public_key: cache
                    .nodes
                    .values()
                    .filter(|n| n.wireguard_public_key.is_some())
                    .count(),
            },
        }
    }

    /// Whether each encryption mode can be relied on (for the admission webhook).
    pub fn enforcement_status(&self) -> EnforcementStatus {
        let cache = self.cache();
        let ipsec = match cache.ipsec.first() {
            Some(_) => ModeStatus {
                active: true,
                within_schedule: true,
                reason: None,
            },
            None => ModeStatus {
                active: false,
                within_schedule: false,
                reason: Some("keyd holds no IPsec key yet (keyctl ipsec rotate)".into()),
            },
        };
        let wg_nodes = cache
            .nodes
            .values()
            .filter(|n| n.wireguard_public_key.is_some())
            .count();
        let wireguard = if wg_nodes > 0 {
            ModeStatus {
                active: true,
                within_schedule: true,
                reason: None,
            }
        } else {
            ModeStatus {
                active: false,
                within_schedule: false,
                reason: Some("no node has registered a WireGuard public key".into()),
            }
        };
        EnforcementStatus {
            at: Timestamp::now(),
            ipsec,
            wireguard,
        }
    }

    /// Appends the webhook's admission decisions to the audit log, one record each.
    pub async fn record_admission_decisions(
        &self,
        actor: &Identity,
        decisions: Vec<keyd_proto::AdmissionDecision>,
    ) -> Result<()> {
        const OUTCOMES: [&str; 5] = ["allowed", "denied", "warned", "audited", "break_glass"];
        const ENFORCEMENTS: [&str; 3] = ["enforce", "warn", "audit"];
        let mut txn = Txn::default();
        for d in decisions {
            if !OUTCOMES.contains(&d.outcome.as_str()) {
                return Err(ServiceError::Invalid(format!(
                    "outcome {:?} is not one of {OUTCOMES:?}",
                    d.outcome
                )));
            }
            if !ENFORCEMENTS.contains(&d.enforcement.as_str()) {
                return Err(ServiceError::Invalid(format!(
                    "enforcement {:?} is not one of {ENFORCEMENTS:?}",
                    d.enforcement
                )));
            }
            let details =
                serde_json::to_value(&d).map_err(|e| ServiceError::Invalid(e.to_string()))?;
            txn = txn.audit(AuditEvent::new(
                &format!("admission.{}", d.outcome),
                actor,
                details,
            ));
        }
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.commit(txn))
            .await
            .map_err(|e| {
                ServiceError::Store(StoreError::Backend {
                    op: "audit task",
                    source: Box::new(e),
                })
            })??;
        Ok(())
    }

    /// Appends an audit record for something refused or otherwise notable outside a state change.
    pub async fn audit(&self, event: AuditEvent) -> Result<()> {
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.commit(Txn::default().audit(event)))
            .await
            .map_err(|e| {
                ServiceError::Store(StoreError::Backend {
                    op: "audit task",
                    source: Box::new(e),
                })
            })??;
        Ok(())
    }
}

fn ipsec_status(cache: &Cache) -> IpsecStatus {
    IpsecStatus {
        outbound_spi: cache.ipsec.first().map(|(e, _)| e.spi),
        keys: cache
            .ipsec
            .iter()
            .enumerate()
            .map(|(i, (e, k))| k.info(role(i), e.created_at, &e.origin))
            .collect(),
    }
}

fn role(index: usize) -> KeyRole {
    if index == 0 {
        KeyRole::Current
    } else {
        KeyRole::Previous
    }
}

fn render_bundle(cache: &Cache, name: &str) -> RenderedBundle {
    let ipsec = cache.ipsec.first().map(|(current, _)| IpsecBundle {
        outbound_spi: current.spi,
        keys: cache
            .ipsec
            .iter()
            .enumerate()
            .map(|(i, (_, k))| k.to_proto(role(i)))
            .collect(),
        peers: cache
            .nodes
            .values()
            .filter(|n| n.name != name)
            .map(|n| IpsecPeer {
                node: n.name.clone(),
                endpoint: n.endpoint,
                pod_cidrs: n.pod_cidrs.clone(),
                boot_id: n.boot_id.clone(),
            })
            .collect(),
    });
    let wireguard = WireguardBundle {
        epoch: cache.wg.psk_epoch,
        peers: wireguard::peers_for(
            name,
            cache.nodes.values(),
            &cache.wg_master,
            cache.wg.psk_epoch,
        ),
    };
    let mut bundle = NodeBundle {
        node: name.to_owned(),
        revision: String::new(),
        ipsec,
        wireguard,
    };
    // The revision is a digest of the content, so equal bundles have equal revisions across
    // restarts and replicas.
    let unrevised = Zeroizing::new(serde_json::to_vec(&bundle).unwrap_or_default());
    bundle.revision = hex::encode(&Sha256::digest(&unrevised)[..12]);
    let body = Zeroizing::new(serde_json::to_vec(&bundle).unwrap_or_default());
    RenderedBundle {
        etag: format!("\"{}\"", bundle.revision),
        body,
        generation: cache.generation,
    }
}

/// Reads the state from the store. Sealed records are immutable (a record id is never reused),
/// so those already open in `prev` are reused rather than unwrapped again: with a remote KEK
/// custodian a refresh costs no custodian call unless a new record appeared.
async fn load_cache(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
    prev: Option<&Cache>,
) -> Result<Cache> {
    let generation = prev.map_or(0, |p| p.generation + 1);
    let ipsec_doc = store.get(Table::Meta, IPSEC_DOC)?;
    let mut ipsec = Vec::new();
    if let Some(doc) = &ipsec_doc {
        let state: IpsecState = from_json(doc, "IPsec state")?;
        for entry in state.keys {
            if let Some((_, key)) =
                prev.and_then(|p| p.ipsec.iter().find(|(e, _)| e.serial == entry.serial))
            {
                ipsec.push((entry, key.clone()));
                continue;
            }
            let line = open_record(store, wrapper, &entry.ctx()).await?;
            let text = std::str::from_utf8(&line)
                .map_err(|_| corrupt(&entry.ctx().record_id, "sealed IPsec key is not text"))?;
            let key = CiliumKey::parse_line(text)
                .map_err(|e| corrupt(&entry.ctx().record_id, &e.to_string()))?;
            ipsec.push((entry, key));
        }
    }
    let wg_doc = store
        .get(Table::Meta, WIREGUARD_DOC)?
        .ok_or_else(|| corrupt(WIREGUARD_DOC, "missing"))?;
    let wg: WireguardState = from_json(&wg_doc, "WireGuard state")?;
    let wg_master = match prev.filter(|p| p.wg.master_serial == wg.master_serial) {
        Some(p) => p.wg_master.clone(),
        None => {
            let master = open_record(store, wrapper, &wg.master_ctx()).await?;
            Key256::from_slice(&master)
                .ok_or_else(|| corrupt(&wg.master_ctx().record_id, "master secret length"))?
        }
    };
    let mut nodes = BTreeMap::new();
    for (name, bytes) in store.scan(Table::Nodes)? {
        nodes.insert(name, from_json(&bytes, "node record")?);
    }
    Ok(Cache {
        ipsec_doc,
        ipsec,
        wg,
        wg_master,
        nodes,
        generation,
    })
}

async fn open_record(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
    ctx: &SealContext,
) -> Result<Zeroizing<Vec<u8>>> {
    let bytes = store
        .get(Table::Sealed, &ctx.record_id)?
        .ok_or_else(|| corrupt(&ctx.record_id, "sealed record missing"))?;
    Ok(seal::open(wrapper, ctx, &SealedRecord::from_bytes(&bytes)?).await?)
}

fn not_registered(name: &str) -> ServiceError {
    ServiceError::NotFound(format!(
        "node {name:?} is not registered: PUT /v1/nodes/{name} first"
    ))
}

fn corrupt(what: &str, why: &str) -> ServiceError {
    ServiceError::Store(StoreError::Corrupt {
        what: what.to_owned(),
        why: why.to_owned(),
    })
}

fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Only plain state documents (strings, numbers, vectors) pass through here.
    serde_json::to_vec(v).unwrap_or_default()
}

fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(what, &e.to_string()))
}
