//! keyd's core: the operations the API exposes, over the store and the key custodian.
//!
//! Every change is one [`Txn`]: the sealed records, the state document it updates (guarded by
//! compare-and-swap on its previous bytes) and the audit events describing it commit together or
//! not at all. The in-memory [`Cache`] holds only what can be rebuilt from the store (unsealed
//! keys, the node table, rendered bundles); it is refreshed from the store after each commit.
//! A replicated backend will additionally need a store watch to refresh it on other replicas.

mod audit_ops;
mod schedules;

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use keyd_proto::identity::Identity;
use keyd_proto::{
    Ack, Acked, EnforcementStatus, IpsecBundle, IpsecPeer, IpsecStatus, KeyClass, KeyRole, KeySpec,
    ModeStatus, NodeBundle, NodeInfo, NodeRegistration, RolloutStatus, RotateRequest, Status,
    Timestamp, WireguardBundle, WireguardStatus,
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

pub use audit_ops::{Export, ExportRange, Segment};
pub use schedules::StoredSchedules;

use crate::audit::{AuditSigner, AuditWriter};
use crate::ipsec::{CiliumKey, IpsecError};
use crate::kms::Custody;
use crate::rotation::{self, Effect, Event, NodeAcks, Phase, Rollout, RolloutConfig};
use crate::seal::{self, Key256, KeyWrapper, SealContext, SealError, SealedRecord};
use crate::store::{AuditEvent, Store, StoreError, Table, Txn};
use crate::wireguard;

const IPSEC_DOC: &str = "ipsec";
const WIREGUARD_DOC: &str = "wireguard";
const PURPOSE_IPSEC: &str = "ipsec-psk";
const PURPOSE_WG_MASTER: &str = "wireguard-psk-master";
const PURPOSE_AUDIT_SIGNING: &str = "audit-signing-key";
const AUDIT_SIGNING_RECORD: &str = "audit/signing/1";
const KEK_DOC: &str = "kek";

/// Timing of rollouts, liveness and the audit log.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceConfig {
    /// A node not seen for this long stops blocking rollouts.
    pub node_liveness_timeout: Duration,
    /// A rollout phase waiting longer raises the stuck alarm.
    pub rollout_stuck_after: Duration,
    /// Sign an audit checkpoint this often (when there are new records).
    pub checkpoint_interval: Duration,
    /// Close an audit segment after this many records...
    pub segment_records: u64,
    /// ...or when its first record is this old.
    pub segment_age: Duration,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            node_liveness_timeout: Duration::from_secs(300),
            rollout_stuck_after: Duration::from_secs(1800),
            checkpoint_interval: Duration::from_secs(60),
            segment_records: 100_000,
            segment_age: Duration::from_secs(86_400),
        }
    }
}

/// keyd's notion of now: the system clock plus an offset that tests can move forward.
#[derive(Debug, Clone, Default)]
pub struct Clock(Arc<AtomicI64>);

impl Clock {
    pub fn now(&self) -> Timestamp {
        Timestamp(
            Timestamp::now()
                .0
                .saturating_add_signed(self.0.load(Ordering::Relaxed)),
        )
    }

    /// Moves this clock (and every clone of it) forward.
    pub fn advance(&self, by: Duration) {
        self.0.fetch_add(
            i64::try_from(by.as_secs()).unwrap_or(i64::MAX),
            Ordering::Relaxed,
        );
    }
}

/// How stale a node's stored `last_seen` may get before a bundle fetch marks it for rewriting.
/// Marked nodes are written together by the scheduler's next pass ([`Keyd::flush_liveness`]),
/// so polls never turn into disk writes on the request path.
const LAST_SEEN_WRITE_INTERVAL: Duration = Duration::from_secs(30);

/// The IPsec key set as stored (non-secret; the keys are sealed records).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct IpsecState {
    /// Record ids are `ipsec/<serial>`; serials never repeat, unlike key IDs, which wrap.
    next_serial: u64,
    /// Newest first. Without a rollout: the current key. Staged: the new (next) key, then the
    /// current one. Active: the new current key, then the previous one.
    keys: Vec<IpsecKeyEntry>,
    #[serde(default)]
    rollout: Option<Rollout>,
    /// When the last rotation (or the first key) started.
    #[serde(default)]
    last_rotation: Option<Timestamp>,
}

impl IpsecState {
    fn roles(&self) -> Vec<KeyRole> {
        (0..self.keys.len())
            .map(|i| match (&self.rollout, i) {
                (Some(r), 0) if r.phase == Phase::Staged => KeyRole::Next,
                (Some(r), 1) if r.phase == Phase::Staged => KeyRole::Current,
                (_, 0) => KeyRole::Current,
                _ => KeyRole::Previous,
            })
            .collect()
    }

    fn outbound_spi(&self) -> Option<u8> {
        match &self.rollout {
            Some(r) if r.phase == Phase::Staged => Some(r.from_spi),
            _ => self.keys.first().map(|k| k.spi),
        }
    }
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
        SealContext::new(format!("ipsec/{}", self.serial), PURPOSE_IPSEC)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct WireguardState {
    psk_epoch: u64,
    master_serial: u64,
    #[serde(default)]
    psk_epoch_since: Timestamp,
    /// Nodes are asked for a keypair of this epoch.
    #[serde(default)]
    node_key_epoch: u64,
    #[serde(default)]
    node_key_epoch_since: Timestamp,
}

/// When the key-encryption key was created or last rotated (maintained by KEK rotation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct KekState {
    since: Timestamp,
}

impl WireguardState {
    fn master_ctx(&self) -> SealContext {
        SealContext::new(
            format!("wireguard/master/{}", self.master_serial),
            PURPOSE_WG_MASTER,
        )
    }
}

/// What is rebuilt from the store: never the only copy of anything.
#[derive(Clone)]
struct Cache {
    ipsec_doc: Option<Vec<u8>>,
    ipsec_state: IpsecState,
    ipsec: Vec<(IpsecKeyEntry, CiliumKey)>,
    schedules_doc: Option<Vec<u8>>,
    schedules: StoredSchedules,
    kek: KekState,
    wg_doc: Vec<u8>,
    wg: WireguardState,
    wg_master: Key256,
    /// Shared entries, so that patching one node copies pointers, not records.
    nodes: BTreeMap<String, Arc<NodeInfo>>,
    /// Bumped whenever something that bundles carry changes; rendered bundles of an older
    /// generation are stale.
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
    /// The KEK custodian keyring (see [`crate::kms`]).
    wrapper: Arc<Custody>,
    cache: RwLock<Arc<Cache>>,
    bundles: RwLock<HashMap<String, Arc<RenderedBundle>>>,
    /// Serializes this replica's writers so they do not race each other's CAS guards.
    write_lock: tokio::sync::Mutex<()>,
    pub metrics: crate::telemetry::Metrics,
    config: ServiceConfig,
    clock: Clock,
    audit: AuditWriter,
    signer: AuditSigner,
    /// Bumped after every refresh, for long-polling nodes.
    changed: tokio::sync::watch::Sender<u64>,
    /// The bundle revision last audited as fetched, per node: a fetch of the same revision by
    /// the same node is recorded once.
    audited_fetches: Mutex<HashMap<String, String>>,
    /// When a scheduled rotation of a class last failed: retried at most hourly, so a rotation
    /// that needs an operator (a new KMS key) does not fail on every tick.
    failed_rotations: Mutex<HashMap<KeyClass, Timestamp>>,
    /// Nodes seen fetching since their stored `last_seen` went stale, and when: written in one
    /// transaction by the next scheduler pass. Losing it in a crash costs only liveness
    /// precision (the node's next fetch marks it again), never a key or an audit record.
    pending_seen: Mutex<HashMap<String, Timestamp>>,
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
    #[error(transparent)]
    Rollout(#[from] rotation::RolloutError),
}

type Result<T, E = ServiceError> = std::result::Result<T, E>;

impl Keyd {
    /// Opens keyd over a store with a single custodian: creates the WireGuard master secret and
    /// the audit signing key on first start, unseals what the store holds and fails if any
    /// record does not open (wrong KEK, tampering).
    pub async fn open(
        store: Arc<dyn Store>,
        wrapper: Arc<dyn KeyWrapper>,
        config: ServiceConfig,
        clock: Clock,
    ) -> Result<Self> {
        Self::open_with_custody(store, Arc::new(Custody::single(wrapper)), config, clock).await
    }

    /// [`Keyd::open`] with a configured custodian keyring (what `keyd serve` runs).
    pub async fn open_with_custody(
        store: Arc<dyn Store>,
        wrapper: Arc<Custody>,
        config: ServiceConfig,
        clock: Clock,
    ) -> Result<Self> {
        let now = clock.now();
        if store.get(Table::Meta, WIREGUARD_DOC)?.is_none() {
            let state = WireguardState {
                psk_epoch: 1,
                master_serial: 1,
                psk_epoch_since: now,
                node_key_epoch: 1,
                node_key_epoch_since: now,
            };
            let master = Key256::random()?;
            let sealed = seal::seal(&*wrapper, &state.master_ctx(), master.expose()).await?;
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
            ignore_lost_race(store.commit(txn))?;
        }
        if store.get(Table::Meta, KEK_DOC)?.is_none() {
            // Only a timestamp for the report; the custodian's first use is audited by
            // `kms::bootstrap` as `kek.custodian.initialised`.
            let txn = Txn::default().guard(Table::Meta, KEK_DOC, None).put(
                Table::Meta,
                KEK_DOC,
                to_json(&KekState { since: now }),
            );
            ignore_lost_race(store.commit(txn))?;
        }
        let signing_ctx = SealContext::new(AUDIT_SIGNING_RECORD.into(), PURPOSE_AUDIT_SIGNING);
        if store.get(Table::Sealed, AUDIT_SIGNING_RECORD)?.is_none() {
            let seed = crate::audit::new_seed().map_err(ServiceError::Invalid)?;
            let signer = AuditSigner::from_seed(&seed).map_err(ServiceError::Invalid)?;
            let sealed = seal::seal(&*wrapper, &signing_ctx, &seed).await?;
            let txn = Txn::default()
                .guard(Table::Sealed, AUDIT_SIGNING_RECORD, None)
                .put(Table::Sealed, AUDIT_SIGNING_RECORD, sealed.to_bytes())
                .audit(AuditEvent::new(
                    "audit.signing_key.generated",
                    "keyd",
                    json!({ "key_id": signer.key_id(), "public_key": base64::Engine::encode(&base64::engine::general_purpose::STANDARD, signer.public_key()) }),
                ));
            ignore_lost_race(store.commit(txn))?;
        }
        let seed = open_record(store.as_ref(), &*wrapper, &signing_ctx).await?;
        let signer =
            AuditSigner::from_seed(&seed).map_err(|e| corrupt(AUDIT_SIGNING_RECORD, &e))?;
        let cache = load_cache(store.as_ref(), &*wrapper, None).await?;
        let audit = AuditWriter::spawn(Arc::clone(&store), clock.clone());
        let metrics = crate::telemetry::Metrics::new(wrapper.metrics().clone());
        Ok(Self {
            store,
            wrapper,
            cache: RwLock::new(Arc::new(cache)),
            bundles: RwLock::new(HashMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
            metrics,
            config,
            clock,
            audit,
            signer,
            changed: tokio::sync::watch::channel(0).0,
            audited_fetches: Mutex::new(HashMap::new()),
            failed_rotations: Mutex::new(HashMap::new()),
            pending_seen: Mutex::new(HashMap::new()),
        })
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    fn cache(&self) -> Arc<Cache> {
        // A poisoned lock means a panic while swapping an Arc, which leaves it intact.
        Arc::clone(&self.cache.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// After a write to one node's record only: patches that node into the cache. Bundles are
    /// invalidated (and long polls woken) only when a fact that bundles carry changed; an
    /// acknowledgement or a liveness update changes none, so a fleet acknowledging a rollout
    /// costs no re-rendering.
    async fn commit_node(&self, txn: Txn, info: NodeInfo) -> Result<()> {
        self.commit_only(txn).await?;
        let prev = self.cache();
        let relevant = |n: &NodeInfo| {
            (
                n.endpoint,
                n.pod_cidrs.clone(),
                n.wireguard_public_key.clone(),
                n.boot_id.clone(),
            )
        };
        let changes_bundles = prev
            .nodes
            .get(&info.name)
            .is_none_or(|old| relevant(old) != relevant(&info));
        let mut next = (*prev).clone();
        next.nodes.insert(info.name.clone(), Arc::new(info));
        if changes_bundles {
            next.generation += 1;
        }
        let generation = next.generation;
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        if changes_bundles {
            self.bundles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.changed.send_replace(generation);
        }
        Ok(())
    }

    async fn refresh(&self) -> Result<()> {
        let prev = self.cache();
        let fresh = load_cache(self.store.as_ref(), &*self.wrapper, Some(&prev)).await?;
        let generation = fresh.generation;
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fresh);
        self.bundles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        self.changed.send_replace(generation);
        Ok(())
    }

    /// Commits on a blocking thread (redb fsyncs) and refreshes the cache.
    async fn commit(&self, txn: Txn) -> Result<()> {
        self.commit_only(txn).await?;
        self.refresh().await
    }

    /// Commits on a blocking thread (redb fsyncs), without touching the cache.
    async fn commit_only(&self, mut txn: Txn) -> Result<()> {
        txn.at.get_or_insert_with(|| self.clock.now());
        let store = Arc::clone(&self.store);
        tokio::task::spawn_blocking(move || store.commit(txn))
            .await
            .map_err(|e| {
                ServiceError::Store(StoreError::Backend {
                    op: "commit task",
                    source: Box::new(e),
                })
            })??;
        Ok(())
    }

    pub fn describe_store(&self) -> String {
        self.store.describe()
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn custody(&self) -> &Arc<Custody> {
        &self.wrapper
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
        if reg.wireguard_key_epoch.is_some() && reg.wireguard_public_key.is_none() {
            return Err(ServiceError::Invalid(
                "wireguard_key_epoch needs wireguard_public_key".into(),
            ));
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
        if let Some(epoch) = reg.wireguard_key_epoch
            && epoch > cache.wg.node_key_epoch
        {
            return Err(ServiceError::Invalid(format!(
                "wireguard_key_epoch {epoch} is ahead of the node-key epoch {}",
                cache.wg.node_key_epoch
            )));
        }
        let previous = self.store.get(Table::Nodes, name)?;
        let old: Option<NodeInfo> = previous
            .as_deref()
            .map(|b| from_json(b, "node record"))
            .transpose()?;
        let now = self.clock.now();
        let key_changed = old.as_ref().and_then(|o| o.wireguard_public_key.as_ref())
            != reg.wireguard_public_key.as_ref();
        let wireguard_key_since = match (&reg.wireguard_public_key, &old) {
            (None, _) => None,
            (Some(_), Some(o)) if !key_changed => o.wireguard_key_since.or(Some(now)),
            (Some(_), _) => Some(now),
        };
        let info = NodeInfo {
            name: name.to_owned(),
            endpoint: reg.endpoint,
            pod_cidrs: reg.pod_cidrs,
            wireguard_key_epoch: reg
                .wireguard_public_key
                .as_ref()
                .map(|_| reg.wireguard_key_epoch.unwrap_or(0)),
            wireguard_key_since,
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
        if key_changed {
            txn = txn.audit(AuditEvent::new(
                "wireguard.node_key.registered",
                actor,
                json!({ "node": name, "public_key": info.wireguard_public_key,
                        "epoch": info.wireguard_key_epoch }),
            ));
        }
        self.commit_node(txn, info.clone()).await?;
        Ok(info)
    }

    /// Every registered node, with liveness not yet flushed to the store applied.
    pub fn list_nodes(&self) -> Vec<NodeInfo> {
        let pending = self.pending_seen();
        self.cache()
            .nodes
            .values()
            .map(|n| NodeInfo {
                last_seen: last_seen(n, &pending),
                ..NodeInfo::clone(n)
            })
            .collect()
    }

    pub async fn ack(&self, actor: &Identity, name: &str, mut ack: Ack) -> Result<NodeInfo> {
        if !self.cache().nodes.contains_key(name) {
            return Err(not_registered(name));
        }
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
        let now = self.clock.now();
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
        self.commit_node(txn, info.clone()).await?;
        drop(_w);
        // An acknowledgement may be the last one a rollout phase was waiting for.
        if changed {
            self.advance_rollout().await?;
        }
        Ok(info)
    }

    /// The node's bundle, rendered once per state generation and shared between fetches.
    pub async fn bundle(&self, name: &str) -> Result<Arc<RenderedBundle>> {
        // Held keys are served only for a bounded time while the custodian cannot be used.
        self.wrapper.serving_check()?;
        let cache = self.cache();
        let node = cache.nodes.get(name).ok_or_else(|| not_registered(name))?;
        let now = self.clock.now();
        if now.0.saturating_sub(node.last_seen.0) >= LAST_SEEN_WRITE_INTERVAL.as_secs() {
            self.pending_seen
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(name.to_owned(), now);
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
        drop(cache);
        self.bundles
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), Arc::clone(&rendered));
        Ok(rendered)
    }

    /// Long poll: returns the node's bundle once its revision differs from `etag`, or `None`
    /// when `wait` passes without a change. A node learns of a rotation within a second.
    pub async fn bundle_wait(
        &self,
        name: &str,
        etag: &str,
        wait: Duration,
    ) -> Result<Option<Arc<RenderedBundle>>> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut changed = self.changed.subscribe();
        loop {
            let b = self.bundle(name).await?;
            if b.etag != etag {
                return Ok(Some(b));
            }
            match tokio::time::timeout_at(deadline, changed.changed()).await {
                Ok(Ok(())) => continue,
                // The sender lives as long as `self`; a closed channel cannot happen here.
                Ok(Err(_)) | Err(_) => return Ok(None),
            }
        }
    }

    /// Audits a full bundle fetch (node, revision, key IDs; never key bytes), once per node and
    /// revision. Awaited: keys are handed out only after the record is durable.
    pub async fn audit_bundle_fetch(&self, name: &str, bundle: &RenderedBundle) -> Result<()> {
        let fresh = {
            let mut seen = self
                .audited_fetches
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            seen.insert(name.to_owned(), bundle.etag.clone()).as_deref()
                != Some(bundle.etag.as_str())
        };
        if !fresh {
            return Ok(());
        }
        let cache = self.cache();
        let details = json!({
            "node": name,
            "revision": bundle.etag.trim_matches('"'),
            "ipsec_spis": cache.ipsec.iter().map(|(e, _)| e.spi).collect::<Vec<_>>(),
            "wireguard_psk_epoch": cache.wg.psk_epoch,
            "wireguard_peers": cache.nodes.values().filter(|n| n.name != name && n.wireguard_public_key.is_some()).count(),
        });
        let result = self
            .audit(AuditEvent::new(
                "bundle.fetched",
                format!("node/{name}"),
                details,
            ))
            .await;
        if result.is_err() {
            // Not recorded, so not "seen": the next fetch tries again.
            self.audited_fetches
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(name);
        }
        result
    }

    /// Liveness seen by bundle fetches and not yet written to the store, by node.
    fn pending_seen(&self) -> HashMap<String, Timestamp> {
        self.pending_seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Writes the liveness that bundle fetches recorded since the last pass, in one transaction
    /// (one fsync however many nodes polled). Run by every scheduler pass, before the rollout
    /// looks at liveness, and at shutdown. Entries leave the pending map only once the store and
    /// the cache hold them, so readers never see a node's liveness go back; on failure they stay
    /// for the next pass. A node record that does not parse is skipped (and logged), not allowed
    /// to block everyone else's liveness.
    pub async fn flush_liveness(&self) -> Result<usize> {
        let _w = self.write_lock.lock().await;
        let pending = self.pending_seen();
        if pending.is_empty() {
            return Ok(0);
        }
        let mut txn = Txn::default();
        let mut written = Vec::with_capacity(pending.len());
        for (name, seen) in &pending {
            // Read from the store, not the cache: the CAS guard must hold the stored bytes.
            let Some(previous) = self.store.get(Table::Nodes, name)? else {
                continue; // deleted since it fetched
            };
            let mut info: NodeInfo = match from_json(&previous, "node record") {
                Ok(info) => info,
                Err(e) => {
                    tracing::error!(node = %name, error = %e, "cannot record liveness: unreadable node record");
                    continue;
                }
            };
            if info.last_seen >= *seen {
                continue; // an acknowledgement or registration wrote a newer one
            }
            info.last_seen = *seen;
            txn = txn.guard(Table::Nodes, name, Some(previous)).put(
                Table::Nodes,
                name,
                to_json(&info),
            );
            written.push((name.clone(), *seen));
        }
        if !written.is_empty() {
            self.commit_only(txn).await?;
            // Only `last_seen` is copied into the cached node: nothing a bundle carries changes
            // here, so rendered bundles stay valid and long polls stay asleep.
            let prev = self.cache();
            let mut next = (*prev).clone();
            for (name, seen) in &written {
                if let Some(node) = next.nodes.get_mut(name) {
                    Arc::make_mut(node).last_seen = *seen;
                }
            }
            *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        }
        let mut now_pending = self.pending_seen.lock().unwrap_or_else(|p| p.into_inner());
        for (name, seen) in &pending {
            // A fetch since the snapshot may have marked the node again, later.
            if now_pending.get(name).is_some_and(|t| t <= seen) {
                now_pending.remove(name);
            }
        }
        Ok(written.len())
    }

    // ---- IPsec -------------------------------------------------------------------------------

    pub fn ipsec_status(&self) -> IpsecStatus {
        ipsec_status(
            &self.cache(),
            &self.config,
            self.clock.now(),
            &self.pending_seen(),
        )
    }

    /// Starts a rotation: the first key becomes current at once; later keys roll out staged ->
    /// active -> retired (see [`crate::rotation`]). Refused while a rollout is in progress.
    pub async fn rotate_ipsec(
        &self,
        actor: &(dyn fmt::Display + Sync),
        req: RotateRequest,
    ) -> Result<IpsecStatus> {
        let _w = self.write_lock.lock().await;
        let cache = self.cache();
        if let Some(r) = &cache.ipsec_state.rollout {
            return Err(rotation::RolloutError::InProgress {
                from: r.from_spi,
                to: r.to_spi,
                phase: r.phase.as_str(),
            }
            .into());
        }
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

    /// Imports a Cilium `keys` line: the first key becomes current; otherwise it rolls out like a
    /// rotation, by the same rules (the ID must follow, the form must not change).
    pub async fn import_ipsec(
        &self,
        actor: &(dyn fmt::Display + Sync),
        line: &str,
    ) -> Result<IpsecStatus> {
        let key = CiliumKey::parse_line(line)?;
        let _w = self.write_lock.lock().await;
        let cache = self.cache();
        if let Some(r) = &cache.ipsec_state.rollout {
            return Err(rotation::RolloutError::InProgress {
                from: r.from_spi,
                to: r.to_spi,
                phase: r.phase.as_str(),
            }
            .into());
        }
        if let Some((_, current)) = cache.ipsec.first() {
            key.check_replaces(current)?;
        }
        self.install_ipsec_key(actor, &cache, key, "imported").await
    }

    async fn install_ipsec_key(
        &self,
        actor: &(dyn fmt::Display + Sync),
        cache: &Cache,
        key: CiliumKey,
        origin: &str,
    ) -> Result<IpsecStatus> {
        let now = self.clock.now();
        let mut state = cache.ipsec_state.clone();
        if state.next_serial == 0 {
            state.next_serial = 1;
        }
        let entry = IpsecKeyEntry {
            serial: state.next_serial,
            spi: key.id.get(),
            created_at: now,
            origin: origin.into(),
        };
        let line = key.to_line();
        let sealed = seal::seal(&*self.wrapper, &entry.ctx(), line.as_bytes()).await?;
        let spec = key.spec();
        let mut txn = Txn::default()
            .guard(Table::Meta, IPSEC_DOC, cache.ipsec_doc.clone())
            .put(Table::Sealed, entry.ctx().record_id, sealed.to_bytes())
            .audit(AuditEvent::new(
                &format!("ipsec.key.{origin}"),
                actor,
                json!({ "spi": entry.spi, "record": entry.ctx().record_id, "algorithm": spec.algorithm,
                        "key_bits": spec.key_bits, "per_tunnel": key.per_tunnel, "kek": self.wrapper.key_id() }),
            ));
        let from = state.keys.first().map(|e| e.spi);
        state.next_serial += 1;
        state.keys.insert(0, entry.clone());
        state.last_rotation = Some(now);
        match from {
            None => {
                txn = txn.audit(AuditEvent::new(
                    "ipsec.key.activated",
                    actor,
                    json!({ "spi": entry.spi, "first_key": true }),
                ));
            }
            Some(from) => {
                let (rollout, effects) = rotation::step(
                    None,
                    &Event::Rotate {
                        from,
                        to: entry.spi,
                    },
                    &node_acks(cache, &self.pending_seen()),
                    &self.rollout_config(cache),
                    now,
                )?;
                state.rollout = rollout;
                txn = self.apply_effects(&mut state, effects, txn, actor);
            }
        }
        txn = txn.put(Table::Meta, IPSEC_DOC, to_json(&state));
        self.commit(txn).await?;
        self.metrics.ipsec_rotations.inc();
        Ok(self.ipsec_status())
    }

    fn rollout_config(&self, cache: &Cache) -> RolloutConfig {
        RolloutConfig {
            liveness_timeout: self.config.node_liveness_timeout,
            stuck_after: self.config.rollout_stuck_after,
            overlap: cache.schedules.get(KeyClass::Ipsec).schedule.overlap,
        }
    }

    /// Carries out a rollout step's effects on the state and the transaction.
    fn apply_effects(
        &self,
        state: &mut IpsecState,
        effects: Vec<Effect>,
        mut txn: Txn,
        actor: &(dyn fmt::Display + Sync),
    ) -> Txn {
        for effect in effects {
            match effect {
                Effect::Staged { spi } => {
                    txn = txn.audit(AuditEvent::new(
                        "ipsec.key.staged",
                        actor,
                        json!({ "spi": spi }),
                    ));
                }
                Effect::Activated { spi } => {
                    txn = txn.audit(AuditEvent::new(
                        "ipsec.key.activated",
                        actor,
                        json!({ "spi": spi }),
                    ));
                }
                Effect::Retired { spi } => {
                    // Keep only the newest key; the rest leave the store for good.
                    for retired in state.keys.split_off(1.min(state.keys.len())) {
                        txn = txn.delete(Table::Sealed, retired.ctx().record_id).audit(AuditEvent::new(
                            "ipsec.key.retired",
                            actor,
                            json!({ "spi": retired.spi, "record": retired.ctx().record_id, "rollout_from": spi }),
                        ));
                    }
                }
                Effect::Stuck { phase, waiting_for } => {
                    self.metrics.rollouts_stuck.inc();
                    tracing::warn!(
                        phase = phase.as_str(),
                        waiting = waiting_for.len(),
                        "IPsec rollout is stuck"
                    );
                    txn = txn.audit(AuditEvent::new(
                        "ipsec.rollout.stuck",
                        actor,
                        json!({ "phase": phase.as_str(), "waiting_for": waiting_for }),
                    ));
                }
            }
        }
        txn
    }

    /// A new KEK on the active custodian (a new local key file, a new Vault key version), with
    /// every record rewrapped in the background; see [`crate::rewrap`]. AWS KMS keys rotate by
    /// moving to a new key (`keyctl kek rotate --key-id`), so a scheduled rotation there is
    /// refused with that instruction and the report shows the class as due.
    async fn rotate_kek(&self, actor: &(dyn fmt::Display + Sync)) -> Result<String> {
        let status = crate::kms::http::rotate_kek(self, &actor.to_string(), Default::default())
            .await
            .map_err(|e| ServiceError::Invalid(e.to_string()))?;
        Ok(format!(
            "KEK rotation {} started: {} records to rewrap to {}",
            status.id, status.total, status.to
        ))
    }

    /// Moves the rollout on if the nodes' acknowledgements and the time allow it.
    pub async fn advance_rollout(&self) -> Result<()> {
        let _w = self.write_lock.lock().await;
        let cache = self.cache();
        let Some(current) = cache.ipsec_state.rollout.clone() else {
            return Ok(());
        };
        let (next, effects) = rotation::step(
            Some(&current),
            &Event::Tick,
            &node_acks(&cache, &self.pending_seen()),
            &self.rollout_config(&cache),
            self.clock.now(),
        )?;
        if effects.is_empty() && next.as_ref() == Some(&current) {
            return Ok(());
        }
        let mut state = cache.ipsec_state.clone();
        state.rollout = next;
        let txn = Txn::default().guard(Table::Meta, IPSEC_DOC, cache.ipsec_doc.clone());
        let txn = self.apply_effects(&mut state, effects, txn, &"keyd/rollout");
        self.commit(txn.put(Table::Meta, IPSEC_DOC, to_json(&state)))
            .await
    }

    /// The current key as Cilium's `keys` line, or as the `cilium-ipsec-keys` Secret. Audited:
    /// it hands key material out of keyd.
    pub async fn cilium_export(
        &self,
        actor: &Identity,
        secret_namespace: Option<&str>,
    ) -> Result<Zeroizing<String>> {
        self.wrapper.serving_check()?;
        let cache = self.cache();
        // The key in outbound use: a staged key is not yet safe to hand to Cilium, which would
        // switch to it at once.
        let outbound = cache.ipsec_state.outbound_spi();
        let (entry, key) = cache
            .ipsec
            .iter()
            .find(|(e, _)| Some(e.spi) == outbound)
            .ok_or_else(|| {
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
        self.commit_only(Txn::default().audit(AuditEvent::new(
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
            ipsec: ipsec_status(&cache, &self.config, self.clock.now(), &self.pending_seen()),
            wireguard: WireguardStatus {
                psk_epoch: cache.wg.psk_epoch,
                nodes_with_public_key: cache
                    .nodes
                    .values()
                    .filter(|n| n.wireguard_public_key.is_some())
                    .count(),
            },
            custody: Some(self.wrapper.status()),
        }
    }

    /// Whether each encryption mode can be relied on (for the admission webhook): keys exist,
    /// and the classes it depends on are within schedule and bounds.
    pub fn enforcement_status(&self) -> EnforcementStatus {
        let cache = self.cache();
        let report = self.report();
        let class_ok = |classes: &[KeyClass]| -> Option<String> {
            let bad: Vec<String> = report
                .classes
                .iter()
                .filter(|c| classes.contains(&c.class) && !(c.within_schedule && c.within_bounds))
                .map(|c| {
                    format!(
                        "{}: {}",
                        c.class.as_str(),
                        c.detail.clone().unwrap_or_else(|| "overdue".into())
                    )
                })
                .collect();
            (!bad.is_empty()).then(|| bad.join("; "))
        };
        let mode =
            |active: Result<(), String>, classes: &[KeyClass]| match (active, class_ok(classes)) {
                (Err(why), _) => ModeStatus {
                    active: false,
                    within_schedule: false,
                    reason: Some(why),
                },
                (Ok(()), Some(why)) => ModeStatus {
                    active: true,
                    within_schedule: false,
                    reason: Some(why),
                },
                (Ok(()), None) => ModeStatus {
                    active: true,
                    within_schedule: true,
                    reason: None,
                },
            };
        let ipsec_active = match cache.ipsec.first() {
            Some(_) => Ok(()),
            None => Err("keyd holds no IPsec key yet (keyctl ipsec rotate)".to_owned()),
        };
        let wg_active = if cache
            .nodes
            .values()
            .any(|n| n.wireguard_public_key.is_some())
        {
            Ok(())
        } else {
            Err("no node has registered a WireGuard public key".to_owned())
        };
        EnforcementStatus {
            at: self.clock.now(),
            ipsec: mode(ipsec_active, &[KeyClass::Ipsec, KeyClass::Kek]),
            wireguard: mode(
                wg_active,
                &[
                    KeyClass::WireguardNodeKeys,
                    KeyClass::WireguardPsk,
                    KeyClass::Kek,
                ],
            ),
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
        let mut events = Vec::with_capacity(decisions.len());
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
            events.push(AuditEvent::new(
                &format!("admission.{}", d.outcome),
                actor,
                details,
            ));
        }
        // One durable transaction for the whole report.
        self.commit_audit(Txn {
            audit: events,
            ..Txn::default()
        })
        .await
    }

    async fn commit_audit(&self, txn: Txn) -> Result<()> {
        self.commit_only(txn).await
    }

    /// Appends an audit record for something refused or otherwise notable outside a state
    /// change; group-committed with concurrent appends, and durable when this returns.
    pub async fn audit(&self, event: AuditEvent) -> Result<()> {
        Ok(self.audit.append(event).await?)
    }
}

fn ipsec_status(
    cache: &Cache,
    cfg: &ServiceConfig,
    now: Timestamp,
    seen: &HashMap<String, Timestamp>,
) -> IpsecStatus {
    let roles = cache.ipsec_state.roles();
    IpsecStatus {
        outbound_spi: cache.ipsec_state.outbound_spi(),
        keys: cache
            .ipsec
            .iter()
            .zip(&roles)
            .map(|((e, k), role)| k.info(*role, e.created_at, &e.origin))
            .collect(),
        rollout: cache.ipsec_state.rollout.as_ref().map(|r| {
            let rc = RolloutConfig {
                liveness_timeout: cfg.node_liveness_timeout,
                stuck_after: cfg.rollout_stuck_after,
                overlap: Duration::ZERO,
            };
            let p = rotation::progress(r, &node_acks(cache, seen), &rc, now);
            RolloutStatus {
                from_spi: r.from_spi,
                to_spi: r.to_spi,
                phase: r.phase.as_str().to_owned(),
                started_at: r.started_at,
                phase_since: r.phase_since,
                waiting_for: p.waiting_for,
                not_live: p.not_live,
                stuck: r.stuck_reported,
            }
        }),
    }
}

/// Every node's acknowledgements and liveness; `seen` is liveness not yet written to the store
/// ([`Keyd::flush_liveness`]), so that a rollout never counts a polling node as dead.
fn node_acks(cache: &Cache, seen: &HashMap<String, Timestamp>) -> Vec<NodeAcks> {
    cache
        .nodes
        .values()
        .map(|n| NodeAcks {
            name: n.name.clone(),
            last_seen: last_seen(n, seen),
            installed: n.acked.ack.ipsec_spis.clone(),
            outbound: n.acked.ack.ipsec_outbound_spi,
        })
        .collect()
}

/// When the node was last seen: its stored time, or a later one not yet written (`seen`).
fn last_seen(node: &NodeInfo, seen: &HashMap<String, Timestamp>) -> Timestamp {
    seen.get(&node.name)
        .map_or(node.last_seen, |t| node.last_seen.max(*t))
}

fn render_bundle(cache: &Cache, name: &str) -> RenderedBundle {
    let roles = cache.ipsec_state.roles();
    let ipsec = cache
        .ipsec_state
        .outbound_spi()
        .map(|outbound_spi| IpsecBundle {
            outbound_spi,
            keys: cache
                .ipsec
                .iter()
                .zip(&roles)
                .map(|((_, k), role)| k.to_proto(*role))
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
        node_key_epoch: cache.wg.node_key_epoch,
        peers: wireguard::peers_for(
            name,
            cache.nodes.values().map(|n| n.as_ref()),
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
    let ipsec_state: IpsecState = match &ipsec_doc {
        Some(doc) => from_json(doc, "IPsec state")?,
        None => IpsecState::default(),
    };
    let mut ipsec = Vec::new();
    {
        for entry in ipsec_state.keys.clone() {
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
    let schedules_doc = store.get(Table::Meta, schedules::SCHEDULES_DOC)?;
    let schedules = match &schedules_doc {
        Some(doc) => from_json(doc, "schedules")?,
        None => StoredSchedules::default(),
    };
    let kek: KekState = match store.get(Table::Meta, KEK_DOC)? {
        Some(doc) => from_json(&doc, "KEK state")?,
        None => KekState {
            since: Timestamp::now(),
        },
    };
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
        nodes.insert(name, Arc::new(from_json(&bytes, "node record")?));
    }
    Ok(Cache {
        ipsec_doc,
        ipsec_state,
        ipsec,
        schedules_doc,
        schedules,
        kek,
        wg_doc,
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

/// A guarded first-time write that another replica already made is fine.
fn ignore_lost_race(r: Result<(), StoreError>) -> Result<()> {
    match r {
        Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
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
