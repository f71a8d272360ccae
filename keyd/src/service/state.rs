//! The service's state: the cache of what the store holds, the [`Keyd`] handle, its errors, and
//! the few operations every other part of the service builds on (opening, committing a
//! transaction with its audit records, reloading the cache).

use crate::audit::{AuditSigner, AuditWriter};
use crate::clock::Clock;
use crate::custody::Custody;
use crate::ipsec::{CiliumKey, IpsecError};
use crate::rotation::{self, Phase, Rollout};
use crate::seal::{self, Key256, KeyWrapper, SealContext, SealError, SealedRecord};
use crate::store::{AuditEvent, Change, Store, StoreError, Table, Txn};
use bytes::Bytes;
use keyd_proto::{Bounds, ClassSchedule, Schedule};
use keyd_proto::{KeyClass, KeyRole, NodeInfo, Timestamp};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use zeroize::Zeroizing;

pub(super) const IPSEC_DOC: &str = "ipsec";

pub(super) const WIREGUARD_DOC: &str = "wireguard";

pub(super) const PURPOSE_IPSEC: &str = "ipsec-psk";

pub(super) const PURPOSE_WG_MASTER: &str = "wireguard-psk-master";

pub(super) const PURPOSE_AUDIT_SIGNING: &str = "audit-signing-key";

pub(super) const AUDIT_SIGNING_RECORD: &str = "audit/signing/1";

pub(super) const KEK_DOC: &str = "kek";

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
    /// Import Cilium keys without `+` (one key and salt for every tunnel).
    pub allow_global_ipsec_import: bool,
    /// What a node's endpoint and pod CIDRs are checked against when it registers.
    pub claims: ClaimCheck,
    /// The Chromium that prints PDF reports (`[report] chromium`); `None`: found on `PATH`.
    pub report_chromium: Option<std::path::PathBuf>,
}

/// What a node's registration (its endpoint and pod CIDRs) is checked against (`[nodes] claims`).
/// An administrator's allocation (`keyctl nodes allow`), where one exists, binds in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimCheck {
    /// The Node object: an address in `status.addresses`, pod CIDRs inside `spec.podCIDRs`. The
    /// default where keyd has the Kubernetes API (`[bootstrap]`).
    NodeObject,
    /// Only an allocation: a node without one cannot register. The default elsewhere.
    Allocation,
    /// Any claim no other node holds (`keyd dev`, tests): a node's certificate alone lets it
    /// claim a free address or CIDR.
    Open,
}

impl ClaimCheck {
    pub const NAMES: &'static str = "\"node-object\", \"allocation\" or \"open\"";

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "node-object" => Some(Self::NodeObject),
            "allocation" => Some(Self::Allocation),
            "open" => Some(Self::Open),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::NodeObject => "node-object",
            Self::Allocation => "allocation",
            Self::Open => "open",
        }
    }
}

/// What the cluster says a node has: its Node object's addresses and pod CIDRs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// `status.addresses` that are IP addresses (InternalIP, ExternalIP).
    pub addresses: Vec<std::net::IpAddr>,
    /// `spec.podCIDRs` (or `spec.podCIDR`).
    pub pod_cidrs: Vec<ipnet::IpNet>,
}

/// Where Node objects are read from (the Kubernetes API, through bootstrap's client).
#[async_trait::async_trait]
pub trait NodeDirectory: Send + Sync + fmt::Debug {
    /// The Node object `name`, `None` if there is none; `Err` names why it could not be read.
    async fn node(&self, name: &str) -> std::result::Result<Option<NodeFacts>, String>;
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            node_liveness_timeout: Duration::from_secs(300),
            rollout_stuck_after: Duration::from_secs(1800),
            checkpoint_interval: Duration::from_secs(60),
            segment_records: 100_000,
            segment_age: Duration::from_secs(86_400),
            allow_global_ipsec_import: false,
            // What `[nodes] claims` defaults to without `[bootstrap]`: never fail open.
            claims: ClaimCheck::Allocation,
            report_chromium: None,
        }
    }
}

/// Clears [`Keyd::following`] when the feed stops, however it stops.
struct StopFollowing<'a>(&'a std::sync::atomic::AtomicBool);

impl Drop for StopFollowing<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
    }
}

/// Since when, and why, a replica has been cut off from a shared store.
#[derive(Debug)]
pub(super) struct StoreOutage {
    since: std::time::Instant,
    since_wall: Timestamp,
    why: String,
}

/// How long a replica waits for its cache to reach a store revision before answering 503.
pub(super) const CATCH_UP_WITHIN: Duration = Duration::from_secs(5);

/// How stale a node's stored `last_seen` may get before a bundle fetch marks it for rewriting.
/// Marked nodes are written together by the scheduler's next pass ([`Keyd::flush_liveness`]),
/// so polls never turn into disk writes on the request path.
pub(super) const LAST_SEEN_WRITE_INTERVAL: Duration = Duration::from_secs(30);

/// The IPsec key set as stored (non-secret; the keys are sealed records).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct IpsecState {
    /// Record ids are `ipsec/<serial>`; serials never repeat, unlike key IDs, which wrap.
    pub(super) next_serial: u64,
    /// Newest first. Without a rollout: the current key. Staged: the new (next) key, then the
    /// current one. Active: the new current key, then the previous one.
    pub(super) keys: Vec<IpsecKeyEntry>,
    #[serde(default)]
    pub(super) rollout: Option<Rollout>,
    /// When the last rotation (or the first key) started.
    #[serde(default)]
    pub(super) last_rotation: Option<Timestamp>,
}

impl IpsecState {
    pub(super) fn roles(&self) -> Vec<KeyRole> {
        (0..self.keys.len())
            .map(|i| match (&self.rollout, i) {
                (Some(r), 0) if r.phase == Phase::Staged => KeyRole::Next,
                (Some(r), 1) if r.phase == Phase::Staged => KeyRole::Current,
                (_, 0) => KeyRole::Current,
                _ => KeyRole::Previous,
            })
            .collect()
    }

    pub(super) fn outbound_spi(&self) -> Option<u8> {
        match &self.rollout {
            Some(r) if r.phase == Phase::Staged => Some(r.from_spi),
            _ => self.keys.first().map(|k| k.spi),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct IpsecKeyEntry {
    pub(super) serial: u64,
    pub(super) spi: u8,
    pub(super) created_at: Timestamp,
    pub(super) origin: String,
}

impl IpsecKeyEntry {
    pub(super) fn ctx(&self) -> SealContext {
        SealContext::new(format!("ipsec/{}", self.serial), PURPOSE_IPSEC)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct WireguardState {
    pub(super) psk_epoch: u64,
    pub(super) master_serial: u64,
    #[serde(default)]
    pub(super) psk_epoch_since: Timestamp,
    /// Nodes are asked for a keypair of this epoch.
    #[serde(default)]
    pub(super) node_key_epoch: u64,
    #[serde(default)]
    pub(super) node_key_epoch_since: Timestamp,
}

/// When the key-encryption key was created or last rotated (maintained by KEK rotation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct KekState {
    pub(super) since: Timestamp,
}

impl WireguardState {
    pub(super) fn master_ctx(&self) -> SealContext {
        SealContext::new(
            format!("wireguard/master/{}", self.master_serial),
            PURPOSE_WG_MASTER,
        )
    }
}

/// What is rebuilt from the store: never the only copy of anything.
#[derive(Clone)]
pub(super) struct Cache {
    pub(super) ipsec_doc: Option<Vec<u8>>,
    pub(super) ipsec_state: IpsecState,
    pub(super) ipsec: Vec<(IpsecKeyEntry, CiliumKey)>,
    pub(super) schedules_doc: Option<Vec<u8>>,
    pub(super) schedules: StoredSchedules,
    pub(super) kek: KekState,
    pub(super) wg_doc: Vec<u8>,
    pub(super) wg: WireguardState,
    pub(super) wg_master: Key256,
    /// Shared entries, so that patching one node copies pointers, not records.
    pub(super) nodes: BTreeMap<String, Arc<NodeInfo>>,
    /// Bumped whenever something that bundles carry changes; rendered bundles of an older
    /// generation are stale.
    pub(super) generation: u64,
    pub(super) removed_doc: Option<Vec<u8>>,
    /// Nodes an administrator removed: their certificates are refused (see
    /// [`Keyd::node_certificate_refused`]).
    pub(super) removed: BTreeMap<String, RemovedNode>,
    /// Administrators' allocations, by node name (Meta `allocation/NAME`).
    pub(super) allocations: BTreeMap<String, keyd_proto::NodeAllocation>,
    /// On a shared store: the store revision this cache is a snapshot of (0 otherwise).
    pub(super) revision: u64,
}

/// The Meta key prefix of allocations: one key per node, so that setting one writes one record.
pub(super) const ALLOCATION_PREFIX: &str = "allocation/";

pub(super) const REMOVED_DOC: &str = "removed_nodes";

/// A node an administrator removed (`keyctl nodes remove`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemovedNode {
    pub at: Timestamp,
    pub by: String,
    /// Readmitted (`keyctl nodes readmit`): certificates issued after the removal are accepted
    /// again; those from before stay refused.
    #[serde(default)]
    pub readmitted: bool,
    /// What the node held when it was removed with `rotate`; keyd replaces these keys (and
    /// finishes doing so after a crash, on its next tick) while they are still the newest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held: Option<HeldKeys>,
}

/// The newest keys a removed node knew: the IPsec SPI (the target of a rollout in progress,
/// else the outbound key) and the WireGuard preshared-key epoch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldKeys {
    pub ipsec_spi: Option<u8>,
    pub psk_epoch: u64,
}

impl RemovedNode {
    /// Why node `name`'s certificate or request is refused, for the caller.
    pub fn refusal(&self, name: &str) -> String {
        format!(
            "node {name:?} was removed at {} by {}{}",
            self.at,
            self.by,
            if self.readmitted {
                "; it was readmitted, but this certificate is from before the removal"
            } else {
                "; an admin can readmit it (keyctl nodes readmit)"
            }
        )
    }
}

/// A serialized bundle, kept until the state changes. The body holds key bytes: it is zeroized
/// when the last response referring to it is dropped.
pub struct RenderedBundle {
    pub etag: String,
    pub(super) body: Zeroizing<Vec<u8>>,
    pub(super) generation: u64,
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

pub(super) struct BundleBody(Arc<RenderedBundle>);

impl AsRef<[u8]> for BundleBody {
    fn as_ref(&self) -> &[u8] {
        &self.0.body
    }
}

pub struct Keyd {
    pub(super) store: Arc<dyn Store>,
    /// The KEK custodian keyring (see [`crate::custody`]).
    pub(super) wrapper: Arc<Custody>,
    pub(super) cache: RwLock<Arc<Cache>>,
    pub(super) bundles: RwLock<HashMap<String, Arc<RenderedBundle>>>,
    /// Serializes this replica's writers so they do not race each other's CAS guards.
    pub(super) write_lock: tokio::sync::Mutex<()>,
    /// Held while audit records are deleted (a prune, or the tick completing one), so that the
    /// tick never races the prune that an API call is still carrying out in this process.
    pub(super) prune_lock: tokio::sync::Mutex<()>,
    /// Serializes updates of the cache, so that two cannot each start from the same cache and
    /// one lose the other's change.
    pub(super) refreshing: tokio::sync::Mutex<()>,
    /// See [`Keyd::is_leader`].
    pub(super) leading: std::sync::atomic::AtomicBool,
    /// On a shared store: the revision through which every change is in the cache.
    pub(super) applied: tokio::sync::watch::Sender<u64>,
    /// Wakes the scheduler to move the rollout on (a node acknowledged on another replica).
    pub(super) nudge: tokio::sync::Notify,
    /// Set while the store's change feed is broken (see [`Keyd::store_serving_check`]).
    pub(super) store_lost: Mutex<Option<StoreOutage>>,
    /// See [`Keyd::restart_wanted`].
    pub(super) restart: tokio::sync::watch::Sender<Option<String>>,
    /// Set once [`Keyd::follow_store`] runs: from then on writes wait for the feed to bring them
    /// into the cache (before, while keyd opens, the cache is read whole afterwards).
    pub(super) following: std::sync::atomic::AtomicBool,
    /// This process's name among the replicas of a shared store (set when it announces itself).
    pub(super) replica_name: std::sync::OnceLock<String>,
    /// Serialises replacing removed nodes' keys (a removal and the tick may both try).
    pub(super) removals: tokio::sync::Mutex<()>,
    pub metrics: crate::telemetry::Metrics,
    pub(super) config: ServiceConfig,
    pub(super) clock: Clock,
    pub(super) audit: AuditWriter,
    pub(super) signer: AuditSigner,
    /// Bumped after every refresh, for long-polling nodes.
    pub(super) changed: tokio::sync::watch::Sender<u64>,
    /// The bundle revision last audited as fetched, per node: a fetch of the same revision by
    /// the same node is recorded once.
    pub(super) audited_fetches: Mutex<HashMap<String, String>>,
    /// When a scheduled rotation of a class last failed: retried at most hourly, so a rotation
    /// that needs an operator (a new KMS key) does not fail on every tick.
    pub(super) failed_rotations: Mutex<HashMap<KeyClass, Timestamp>>,
    /// Nodes seen fetching since their stored `last_seen` went stale, and when: written in one
    /// transaction by the next scheduler pass. Losing it in a crash costs only liveness
    /// precision (the node's next fetch marks it again), never a key or an audit record.
    pub(super) pending_seen: Mutex<HashMap<String, Timestamp>>,
    /// Each node's compiled data-plane rules, published by the policy watcher; its receivers are
    /// the rules' long polls.
    pub(super) rules: tokio::sync::watch::Sender<super::rules_view::RulesView>,
    /// Where Node objects are read from, for [`ClaimCheck::NodeObject`] (set at start when
    /// `[bootstrap]` gives keyd the Kubernetes API).
    pub(super) node_directory: std::sync::OnceLock<Arc<dyn NodeDirectory>>,
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
    /// Refused for who the caller is (a removed node).
    #[error("{0}")]
    Forbidden(String),
    /// A node's claims could not be checked (the Kubernetes API is unreachable): 503.
    #[error("{0}")]
    ClaimsUnverifiable(String),
    /// A replica of a shared store could not confirm it holds the newest state in time: 503.
    #[error("{0}")]
    Behind(String),
    /// `GET /v1/nodes/{name}/rules` on a keyd without a `[policy]` section.
    #[error(
        "this keyd does not compile data-plane rules: its configuration has no [policy] section \
         (see docs/configuration.md)"
    )]
    PolicyNotConfigured,
    /// The rules exist but are not compiled yet.
    #[error("{0}")]
    RulesNotReady(String),
    /// A PDF report was asked for and this keyd cannot print one (no Chromium, or it failed).
    #[error("{0}")]
    PdfUnavailable(String),
    #[error(transparent)]
    Ipsec(#[from] IpsecError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Rollout(#[from] rotation::RolloutError),
    /// A KEK rotation that could not start or failed (custodian down, one already running).
    #[error(transparent)]
    Kek(#[from] crate::rewrap::RewrapError),
}

pub(super) type Result<T, E = ServiceError> = std::result::Result<T, E>;

/// Whether a Meta entry is one the [`Cache`] holds (the others are read where they are used).
fn cached_meta(key: &str) -> bool {
    [
        IPSEC_DOC,
        WIREGUARD_DOC,
        SCHEDULES_DOC,
        KEK_DOC,
        REMOVED_DOC,
    ]
    .contains(&key)
        || key.starts_with(ALLOCATION_PREFIX)
}

/// What bundles carry of a node: a change to any of these re-renders every bundle.
fn bundle_facts(n: &NodeInfo) -> impl PartialEq + use<'_> {
    (
        n.endpoint,
        &n.pod_cidrs,
        &n.wireguard_public_key,
        &n.boot_id,
    )
}

/// Reads the state from the store as of store revision `at` (the newest: `None`), keeping
/// `nodes` instead of scanning the node table when given. Sealed records are immutable (a record
/// id is never reused), so those already open in `prev` are reused rather than unwrapped again:
/// with a remote KEK custodian a refresh costs no custodian call unless a new record appeared.
async fn load_cache(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
    prev: Option<&Cache>,
    nodes: Option<BTreeMap<String, Arc<NodeInfo>>>,
    at: Option<u64>,
) -> Result<Cache> {
    let generation = prev.map_or(0, |p| p.generation + 1);
    let ipsec_doc = store.get_at(Table::Meta, IPSEC_DOC, at)?;
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
            let line = open_record_at(store, wrapper, &entry.ctx(), at).await?;
            let text = std::str::from_utf8(&line)
                .map_err(|_| corrupt(&entry.ctx().record_id, "sealed IPsec key is not text"))?;
            let key = CiliumKey::parse_line(text)
                .map_err(|e| corrupt(&entry.ctx().record_id, &e.to_string()))?;
            ipsec.push((entry, key));
        }
    }
    let wg_doc = store
        .get_at(Table::Meta, WIREGUARD_DOC, at)?
        .ok_or_else(|| corrupt(WIREGUARD_DOC, "missing"))?;
    let wg: WireguardState = from_json(&wg_doc, "WireGuard state")?;
    let schedules_doc = store.get_at(Table::Meta, SCHEDULES_DOC, at)?;
    let schedules = match &schedules_doc {
        Some(doc) => from_json(doc, "schedules")?,
        None => StoredSchedules::default(),
    };
    let kek: KekState = match store.get_at(Table::Meta, KEK_DOC, at)? {
        Some(doc) => from_json(&doc, "KEK state")?,
        None => KekState {
            since: Timestamp::now(),
        },
    };
    let wg_master = match prev.filter(|p| p.wg.master_serial == wg.master_serial) {
        Some(p) => p.wg_master.clone(),
        None => {
            let master = open_record_at(store, wrapper, &wg.master_ctx(), at).await?;
            Key256::from_slice(&master)
                .ok_or_else(|| corrupt(&wg.master_ctx().record_id, "master secret length"))?
        }
    };
    let removed_doc = store.get_at(Table::Meta, REMOVED_DOC, at)?;
    let removed = match &removed_doc {
        Some(doc) => from_json(doc, "removed nodes")?,
        None => BTreeMap::new(),
    };
    let mut allocations = BTreeMap::new();
    for (key, bytes) in store.scan_from_at(Table::Meta, ALLOCATION_PREFIX, usize::MAX, at)? {
        let Some(name) = key.strip_prefix(ALLOCATION_PREFIX) else {
            break;
        };
        allocations.insert(name.to_owned(), from_json(&bytes, "node allocation")?);
    }
    let nodes = match nodes {
        Some(nodes) => nodes,
        None => {
            let mut nodes = BTreeMap::new();
            for (name, bytes) in store.scan_from_at(Table::Nodes, "", usize::MAX, at)? {
                nodes.insert(name, Arc::new(from_json(&bytes, "node record")?));
            }
            nodes
        }
    };
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
        removed_doc,
        removed,
        allocations,
        revision: at.unwrap_or(0),
    })
}

pub(super) async fn open_record(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
    ctx: &SealContext,
) -> Result<Zeroizing<Vec<u8>>> {
    open_record_at(store, wrapper, ctx, None).await
}

/// [`open_record`] as of store revision `at` (a retired key's record is deleted later).
async fn open_record_at(
    store: &dyn Store,
    wrapper: &dyn KeyWrapper,
    ctx: &SealContext,
    at: Option<u64>,
) -> Result<Zeroizing<Vec<u8>>> {
    let bytes = store
        .get_at(Table::Sealed, &ctx.record_id, at)?
        .ok_or_else(|| corrupt(&ctx.record_id, "sealed record missing"))?;
    Ok(seal::open(wrapper, ctx, &SealedRecord::from_bytes(&bytes)?).await?)
}

/// A guarded first-time write that another replica already made is fine.
pub(super) fn ignore_lost_race(r: Result<(), StoreError>) -> Result<()> {
    match r {
        Ok(()) | Err(StoreError::Conflict { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether two CIDRs share an address: one is, or lies inside, the other.
pub(super) fn cidrs_overlap(a: &ipnet::IpNet, b: &ipnet::IpNet) -> bool {
    a.contains(b) || b.contains(a)
}

pub(super) fn not_registered(name: &str) -> ServiceError {
    ServiceError::NotFound(format!(
        "node {name:?} is not registered: PUT /v1/nodes/{name} first"
    ))
}

pub(super) fn corrupt(what: &str, why: &str) -> ServiceError {
    ServiceError::Store(StoreError::Corrupt {
        what: what.to_owned(),
        why: why.to_owned(),
    })
}

pub(super) fn to_json<T: Serialize>(v: &T) -> Vec<u8> {
    // Only plain state documents (strings, numbers, vectors) pass through here.
    serde_json::to_vec(v).unwrap_or_default()
}

pub(super) fn from_json<T: for<'de> Deserialize<'de>>(bytes: &[u8], what: &str) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| corrupt(what, &e.to_string()))
}

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
        // One snapshot: on a shared store another replica may retire a key (and delete its
        // record) between two reads.
        let at = store.current_revision()?;
        let cache = load_cache(store.as_ref(), &*wrapper, None, None, at).await?;
        // Alone on its store, this process leads; on a shared one, once it is told so.
        let leading = !store.shared();
        let audit = AuditWriter::spawn(Arc::clone(&store), clock.clone());
        let metrics = crate::telemetry::Metrics::new(wrapper.metrics().clone());
        Ok(Self {
            store,
            wrapper,
            cache: RwLock::new(Arc::new(cache)),
            bundles: RwLock::new(HashMap::new()),
            write_lock: tokio::sync::Mutex::new(()),
            prune_lock: tokio::sync::Mutex::new(()),
            refreshing: tokio::sync::Mutex::new(()),
            leading: std::sync::atomic::AtomicBool::new(leading),
            applied: tokio::sync::watch::Sender::new(0),
            nudge: tokio::sync::Notify::new(),
            store_lost: Mutex::new(None),
            restart: tokio::sync::watch::Sender::new(None),
            following: std::sync::atomic::AtomicBool::new(false),
            replica_name: std::sync::OnceLock::new(),
            removals: tokio::sync::Mutex::new(()),
            metrics,
            config,
            clock,
            audit,
            signer,
            changed: tokio::sync::watch::channel(0).0,
            audited_fetches: Mutex::new(HashMap::new()),
            failed_rotations: Mutex::new(HashMap::new()),
            pending_seen: Mutex::new(HashMap::new()),
            rules: tokio::sync::watch::Sender::new(super::rules_view::RulesView::default()),
            node_directory: std::sync::OnceLock::new(),
        })
    }

    /// Whether this process runs what must run once (schedules, rollouts, checkpoints): always
    /// on a store only it writes; on etcd, while it holds the leader key.
    pub fn is_leader(&self) -> bool {
        self.leading.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Marks this process as the leader, or as a replica that leaves schedules to another.
    pub fn set_leader(&self, leading: bool) {
        self.leading
            .store(leading, std::sync::atomic::Ordering::Release);
    }

    /// Names this process among the replicas of a shared store (for `keyctl status`).
    pub fn set_replica_name(&self, name: String) {
        let _ = self.replica_name.set(name);
    }

    /// This replica's name on a shared store (`None` on redb).
    pub fn replica_name(&self) -> Option<String> {
        self.replica_name.get().cloned()
    }

    /// The actor of what keyd does by itself in `role` (`keyd/rollout`), naming the replica on
    /// a shared store (`keyd/rollout@NAME`): the audit log then shows which replica acted, and
    /// that only the term's leader ran what only a leader runs.
    pub fn system_actor(&self, role: &str) -> String {
        match self.replica_name.get() {
            Some(name) => format!("keyd/{role}@{name}"),
            None => format!("keyd/{role}"),
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    pub fn config(&self) -> &ServiceConfig {
        &self.config
    }

    pub(super) fn cache(&self) -> Arc<Cache> {
        // A poisoned lock means a panic while swapping an Arc, which leaves it intact.
        Arc::clone(&self.cache.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads everything cached again, as of store revision `at` (the newest: `None`): when the
    /// store's change feed starts or says changes may have been missed.
    pub(super) async fn refresh(&self, at: Option<u64>) -> Result<()> {
        let _one_at_a_time = self.refreshing.lock().await;
        let prev = self.cache();
        let fresh = load_cache(self.store.as_ref(), &*self.wrapper, Some(&prev), None, at).await?;
        self.install(fresh, true);
        Ok(())
    }

    /// Makes `next` the cache; when `bundles_change`, drops the rendered bundles and wakes the
    /// long polls. Called with [`Keyd::refreshing`] held.
    fn install(&self, next: Cache, bundles_change: bool) {
        let generation = next.generation;
        *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
        if bundles_change {
            self.bundles
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            self.changed.send_replace(generation);
        }
    }

    /// Brings the cache up to date with entries that changed in the store, written by this
    /// process or (reported by [`Store::follow`], with the revision `at` of the last of them)
    /// by any replica. The state documents are read again when one of them changed, and nodes
    /// one by one: the node table is never read whole, so a change costs the same at ten nodes
    /// and at ten thousand. Everything is read as of `at`, so the cache stays a snapshot of one
    /// revision.
    pub(super) async fn apply_changes(
        &self,
        touched: &[(Table, String)],
        at: Option<u64>,
    ) -> Result<()> {
        let meta = touched
            .iter()
            .any(|(t, k)| *t == Table::Meta && cached_meta(k));
        let mut names: Vec<&str> = touched
            .iter()
            .filter(|(t, _)| *t == Table::Nodes)
            .map(|(_, k)| k.as_str())
            .collect();
        names.sort_unstable();
        names.dedup();
        let _one_at_a_time = self.refreshing.lock().await;
        let prev = self.cache();
        // Never older than the cache already is (a retry may have read past this change).
        let at = at.map(|r| r.max(prev.revision));
        if !meta && names.is_empty() {
            if at.is_some_and(|r| r > prev.revision) {
                let mut next = (*prev).clone();
                next.revision = at.unwrap_or(0);
                *self.cache.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
            }
            return Ok(());
        }
        let mut next = if meta {
            load_cache(
                self.store.as_ref(),
                &*self.wrapper,
                Some(&prev),
                Some(prev.nodes.clone()),
                at,
            )
            .await?
        } else {
            let mut next = (*prev).clone();
            next.revision = at.unwrap_or(0);
            next
        };
        let mut bundles_change = meta;
        for name in names {
            match self.store.get_at(Table::Nodes, name, at)? {
                Some(bytes) => {
                    let info: NodeInfo = from_json(&bytes, "node record")?;
                    bundles_change |= prev
                        .nodes
                        .get(name)
                        .is_none_or(|old| bundle_facts(old) != bundle_facts(&info));
                    next.nodes.insert(name.to_owned(), Arc::new(info));
                }
                None => bundles_change |= next.nodes.remove(name).is_some(),
            }
        }
        if bundles_change && !meta {
            next.generation += 1;
        }
        self.install(next, bundles_change);
        Ok(())
    }

    /// Keeps the cache coherent with what every replica writes, until `stop`: applies the
    /// store's change feed (nothing to do on a store only this process writes). While the store
    /// cannot be read the cache keeps what it has, and is read again whole once it can.
    pub async fn follow_store(&self, mut stop: tokio::sync::watch::Receiver<bool>) {
        let Some(mut feed) = self.store.follow() else {
            return;
        };
        self.following
            .store(true, std::sync::atomic::Ordering::Release);
        let _stopped = StopFollowing(&self.following);
        // Set when applying failed: everything is read again, as of `behind`'s revision or
        // later.
        let mut behind: Option<u64> = None;
        // Why the feed is down, from its `Lost` until its next `Resync`: while it is, the
        // cache cannot be current whatever reads succeed.
        let mut feed_down: Option<String> = None;
        loop {
            let next = if behind.is_some() {
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => None,
                    _ = stop.wait_for(|s| *s) => return,
                }
            } else {
                tokio::select! {
                    c = feed.recv() => match c {
                        Some(c) => Some(c),
                        None => return,
                    },
                    _ = stop.wait_for(|s| *s) => return,
                }
            };
            // Everything queued is applied together, as of the newest revision in it.
            let mut resync = behind;
            let mut keys = Vec::new();
            let mut revision = behind.unwrap_or(0);
            let mut take = |c: Change| match c {
                Change::Lost { why } => feed_down = Some(why),
                Change::Resync { revision: r } => {
                    resync = Some(r);
                    revision = revision.max(r);
                    feed_down = None;
                }
                Change::Keys {
                    keys: k,
                    revision: r,
                } => {
                    keys.extend(k);
                    revision = revision.max(r);
                }
                Change::Progress { revision: r } => revision = revision.max(r),
            };
            if let Some(c) = next {
                take(c);
            }
            while let Ok(c) = feed.try_recv() {
                take(c);
            }
            let mut revision = revision.max(*self.applied.borrow());
            if behind.is_some() {
                // A retry reads the newest state: the revision that failed may since have been
                // compacted, and the feed may have moved on.
                match self.current_revision().await {
                    Ok(Some(now)) => revision = revision.max(now),
                    Ok(None) => {}
                    Err(e) => {
                        self.store_lost(keyd_mtls::error_chain(&e));
                        continue;
                    }
                }
            }
            let custody_changed = keys
                .iter()
                .any(|(t, k)| *t == Table::Meta && k == crate::custody::doc::CUSTODY_DOC);
            let nodes_changed = resync.is_some() || keys.iter().any(|(t, _)| *t == Table::Nodes);
            let applied = if resync.is_some() {
                self.refresh(Some(revision)).await
            } else {
                self.apply_changes(&keys, Some(revision)).await
            };
            behind = match applied {
                Ok(()) => {
                    self.applied.send_if_modified(|a| {
                        let newer = revision > *a;
                        *a = (*a).max(revision);
                        newer
                    });
                    match &feed_down {
                        Some(why) => self.store_lost(why.clone()),
                        None => self.store_back(),
                    }
                    if custody_changed {
                        self.check_custody_current();
                    }
                    None
                }
                Err(e) => {
                    self.store_lost(keyd_mtls::error_chain(&e));
                    if behind.is_none() {
                        tracing::warn!(
                            error = %e,
                            "cannot read what the store changed; serving what this replica holds \
                             and reading everything again once the store answers"
                        );
                    }
                    Some(revision)
                }
            };
            // An acknowledgement taken by another replica may be the last one a rollout phase
            // was waiting for: the scheduler looks at once (not here: a write waits for this
            // feed, which must not wait for itself).
            if behind.is_none() && nodes_changed && self.is_leader() {
                self.nudge.notify_one();
            }
        }
    }

    /// The store's newest revision, read on a blocking thread.
    pub(super) async fn current_revision(&self) -> Result<Option<u64>> {
        let store = Arc::clone(&self.store);
        Ok(
            tokio::task::spawn_blocking(move || store.current_revision())
                .await
                .map_err(|e| {
                    ServiceError::Store(StoreError::Backend {
                        op: "read the store revision",
                        source: Box::new(e),
                    })
                })??,
        )
    }

    /// After another replica changed the custody document: if the KEK that new records are
    /// sealed under is no longer this process's, it must restart to load the new keyring
    /// (KEK rotations and migrations run on the leader; see [`Keyd::restart_wanted`]).
    fn check_custody_current(&self) {
        if self.is_leader() {
            return; // the leader ran the change and activated the new KEK itself
        }
        let Ok(Some((doc, _))) = crate::custody::doc::read_doc(self.store.as_ref()) else {
            return;
        };
        let mine = self.wrapper.active().spec;
        if mine.as_ref().is_some_and(|m| m.same_key(&doc.active)) {
            return;
        }
        self.restart.send_replace(Some(format!(
            "the store's records are now sealed under {}, which this replica has not loaded",
            doc.active.describe()
        )));
    }

    /// Asks for this process to restart (`keyd serve` exits with status 75, and its supervisor
    /// starts it again): what it loaded at start is no longer what it must serve with.
    pub fn want_restart(&self, why: String) {
        self.restart.send_replace(Some(why));
    }

    /// Becomes `Some(why)` when this process must restart to go on serving (the KEK custodian
    /// changed on another replica, the cluster CA was replaced); `keyd serve` then exits with
    /// status 75.
    pub fn restart_wanted(&self) -> tokio::sync::watch::Receiver<Option<String>> {
        self.restart.subscribe()
    }

    /// The change feed broke: from now (unless already) this replica serves what it holds for
    /// at most `store.etcd.max_unavailable`.
    fn store_lost(&self, why: String) {
        let mut lost = self.store_lost.lock().unwrap_or_else(|p| p.into_inner());
        if lost.is_none() {
            tracing::warn!(
                why,
                "cut off from the store; serving what this replica holds"
            );
            *lost = Some(StoreOutage {
                since: std::time::Instant::now(),
                since_wall: self.clock.now(),
                why,
            });
        }
    }

    /// The change feed is back and the cache read again.
    fn store_back(&self) {
        if self
            .store_lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .is_some()
        {
            tracing::info!("the store can be read again; the cache is current");
        }
    }

    /// While this replica is cut off from a shared store: since when, why, and until when it
    /// hands out what it holds.
    pub fn store_outage(&self) -> Option<(Timestamp, String, Timestamp)> {
        let lost = self.store_lost.lock().unwrap_or_else(|p| p.into_inner());
        let l = lost.as_ref()?;
        let bound = self.store.max_unavailable().unwrap_or(Duration::MAX);
        let until = Timestamp(l.since_wall.0.saturating_add(bound.as_secs()));
        Some((l.since_wall, l.why.clone(), until))
    }

    /// Refuses to hand out keys once this replica has been cut off from a shared store for
    /// longer than `store.etcd.max_unavailable`: it cannot know whether the keys it holds were
    /// rotated or a node removed meanwhile.
    pub fn store_serving_check(&self) -> Result<()> {
        let lost = self.store_lost.lock().unwrap_or_else(|p| p.into_inner());
        let Some(l) = lost.as_ref() else {
            return Ok(());
        };
        let bound = self.store.max_unavailable().unwrap_or(Duration::MAX);
        if l.since.elapsed() <= bound {
            return Ok(());
        }
        Err(ServiceError::Behind(format!(
            "this replica has been cut off from the store since {} ({}), longer than \
             store.etcd.max_unavailable ({}): it hands out no keys until it reaches etcd again",
            l.since_wall,
            l.why,
            humantime::format_duration(bound)
        )))
    }

    /// On a shared store: waits until the cache holds every change up to store revision
    /// `revision` (a write of this replica, or what a node saw on another replica). Bounded:
    /// a replica cut off from the store answers 503 instead of serving what may be stale.
    pub(super) async fn caught_up_to(&self, revision: u64) -> Result<()> {
        // Before the feed starts the cache was just read whole at the newest revision; after it
        // stopped (shutdown) nothing would move it.
        if !self.following.load(std::sync::atomic::Ordering::Acquire) {
            return Ok(());
        }
        let mut applied = self.applied.subscribe();
        let start = tokio::time::Instant::now();
        let deadline = start + CATCH_UP_WITHIN;
        loop {
            if *applied.borrow_and_update() >= revision {
                return Ok(());
            }
            let now = tokio::time::Instant::now();
            // The feed reports every write of every keyd; only writes of another user of the
            // same etcd move the revision without it. Then a progress report moves it on.
            if now - start >= Duration::from_secs(1) {
                self.store.request_progress();
            }
            if now >= deadline {
                return Err(ServiceError::Behind(format!(
                    "this replica has applied the store up to revision {} and not yet revision \
                     {revision} after {} (it may be cut off from etcd); nothing was changed: \
                     retry, on another replica if this persists",
                    *applied.borrow(),
                    humantime::format_duration(CATCH_UP_WITHIN)
                )));
            }
            let step = (deadline - now).min(Duration::from_millis(200));
            let _ = tokio::time::timeout(step, applied.changed()).await;
        }
    }

    /// On a shared store: waits until the cache holds everything the store holds now, so that
    /// a read-modify-write starts from the newest state (a linearizable read). Nothing to do on
    /// a store only this process writes.
    pub(super) async fn catch_up(&self) -> Result<()> {
        if !self.store.shared() {
            return Ok(());
        }
        match self.current_revision().await? {
            Some(r) => self.caught_up_to(r).await,
            None => Ok(()),
        }
    }

    /// Takes this replica's write lock, starting from the store's newest state.
    pub(super) async fn writer(&self) -> Result<tokio::sync::MutexGuard<'_, ()>> {
        let guard = self.write_lock.lock().await;
        self.catch_up().await?;
        Ok(guard)
    }

    /// Commits on a blocking thread (redb fsyncs) and brings the cache up to date with what
    /// the transaction wrote.
    pub(super) async fn commit(&self, txn: Txn) -> Result<()> {
        let touched = txn.touched();
        self.commit_only(txn).await?;
        if self.following.load(std::sync::atomic::Ordering::Acquire) {
            // commit_only waited for the change feed, which applied it.
            return Ok(());
        }
        self.apply_changes(&touched, None).await
    }

    /// Commits on a blocking thread (redb fsyncs), without touching the cache.
    /// On a shared store, returns once the change feed has brought the write into this
    /// replica's cache (read-your-writes).
    pub(super) async fn commit_only(&self, mut txn: Txn) -> Result<()> {
        txn.at.get_or_insert_with(|| self.clock.now());
        let cached = !txn.touched().is_empty();
        let store = Arc::clone(&self.store);
        let revision = tokio::task::spawn_blocking(move || store.commit_at(txn))
            .await
            .map_err(|e| {
                ServiceError::Store(StoreError::Backend {
                    op: "commit task",
                    source: Box::new(e),
                })
            })??;
        let following = self.following.load(std::sync::atomic::Ordering::Acquire);
        if let Some(r) = revision.filter(|_| cached && following)
            && let Err(e) = self.caught_up_to(r).await
        {
            // Written and durable: the cache follows once the feed delivers it.
            tracing::warn!(error = %e, "a write is not in this replica's cache yet");
        }
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

    pub(super) async fn commit_audit(&self, txn: Txn) -> Result<()> {
        self.commit_only(txn).await
    }

    /// Appends an audit record for something refused or otherwise notable outside a state
    /// change; group-committed with concurrent appends, and durable when this returns.
    pub async fn audit(&self, event: AuditEvent) -> Result<()> {
        Ok(self.audit.append(event).await?)
    }
}

pub(super) const SCHEDULES_DOC: &str = "schedules";
/// Schedules and bounds as stored; a class absent here has its default schedule and no bounds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredSchedules(BTreeMap<KeyClass, StoredClass>);

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct StoredClass {
    schedule: Schedule,
    #[serde(default)]
    bounds: Bounds,
}

impl StoredSchedules {
    pub fn get(&self, class: KeyClass) -> ClassSchedule {
        match self.0.get(&class) {
            Some(c) => ClassSchedule {
                class,
                schedule: c.schedule.clone(),
                bounds: c.bounds.clone(),
            },
            None => ClassSchedule {
                class,
                schedule: rotation::default_schedule(class),
                bounds: Bounds::default(),
            },
        }
    }

    pub(super) fn set(&mut self, c: ClassSchedule) {
        self.0.insert(
            c.class,
            StoredClass {
                schedule: c.schedule,
                bounds: c.bounds,
            },
        );
    }
}
