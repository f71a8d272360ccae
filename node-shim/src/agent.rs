//! The agent loop: register with keyd, fetch the bundle, reconcile the kernel, acknowledge.
//!
//! - keyd unreachable: the kernel keeps what it has; the last bundle is re-asserted (adds only,
//!   nothing removed) in case something else changed the kernel; requests are retried with
//!   exponential backoff and jitter; status and metrics say so.
//! - Start: the kernel's state is observed and adopted (WireGuard private key, states, policies,
//!   peers); nothing is removed until a bundle from keyd says what is stale.
//! - Removal of stale objects happens only in a full sync: a bundle fetched by this process and
//!   every add and update of the pass applied.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use keyd_proto::{Ack, NodeBundle, NodeRegistration, Timestamp};
use tokio::sync::{mpsc, watch};

use crate::config::{Config, Mode};
use crate::kernel::{ApplyError, Kernel, KernelError};
use crate::keyd_client::{Fetched, KeydClient, KeydError};
use crate::model::{Op, WgPeerSpec};
use crate::reconcile::{self, Inputs, NodeFacts};
use crate::secret::{Key32, PublicKey};
use crate::status::{KernelOp, OpOutcome, Outcome, PeerView, Shared, SkippedPeer};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot read the kernel's state")]
    Observe(#[source] KernelError),
    #[error("cannot read {path}")]
    ReadFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write {path}")]
    WriteFile {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} does not hold a WireGuard private key (base64 of 32 bytes, as `wg genkey` prints)"
    )]
    BadKeyFile { path: String },
    #[error("the operating system's random number generator failed")]
    Random,
}

/// Exponential backoff with equal jitter: attempt n waits between half and all of
/// `min(max, initial * 2^n)`. `unit` is a uniform random number in [0, 1).
pub fn backoff(initial: Duration, max: Duration, attempt: u32, unit: f64) -> Duration {
    let exp = initial.saturating_mul(1u32.checked_shl(attempt.min(20)).unwrap_or(u32::MAX));
    let cap = exp.min(max);
    cap / 2 + cap.mul_f64(unit.clamp(0.0, 1.0) / 2.0)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A uniform random number in [0, 1), for jitter.
pub fn random_unit() -> f64 {
    let mut b = [0u8; 8];
    // Jitter only spreads retries; a failing RNG just means no jitter.
    let _ = getrandom::fill(&mut b);
    (u64::from_le_bytes(b) >> 11) as f64 / (1u64 << 53) as f64
}

/// Reads the node's boot ID (per-tunnel IPsec keys are derived with it).
pub fn read_boot_id(path: &Path) -> Result<String, AgentError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|source| AgentError::ReadFile {
            path: path.display().to_string(),
            source,
        })
}

pub fn facts(cfg: &Config) -> Result<NodeFacts, AgentError> {
    Ok(NodeFacts {
        name: cfg.node_name.clone(),
        endpoint: cfg.endpoint,
        pod_cidrs: cfg.pod_cidrs.clone(),
        boot_id: read_boot_id(&cfg.boot_id_path)?,
    })
}

pub struct Agent<K: Kernel> {
    cfg: Config,
    facts: NodeFacts,
    kernel: K,
    client: KeydClient,
    shared: Shared,
    wg_key: Option<Key32>,
    wg_key_born: Instant,
    registered: Option<NodeRegistration>,
    bundle: Option<NodeBundle>,
    etag: Option<String>,
    /// The bundle came from keyd during this process's life (so it can say what is stale).
    fresh: bool,
    /// The kernel needs a pass even if keyd has nothing new (last pass failed, or a held-back
    /// outbound switch is due).
    dirty: bool,
    installed_since: BTreeMap<u8, Instant>,
    /// The outbound XFRM states seen after the last pass, as (destination, SPI).
    outbound_seen: BTreeSet<(IpAddr, u32)>,
    last_ack: Option<Ack>,
    recheck_at: Option<Instant>,
    /// When the kernel was last compared with the bundle (`resync_interval`).
    last_reconcile: Option<Instant>,
    failures: u32,
    /// keyd's node-key epoch the WireGuard keypair answers (`None`: a key made at start, which
    /// answers the epoch the first bundle names).
    wg_key_epoch: Option<u64>,
    long_poll: Option<Duration>,
    /// Peers added recently whose first handshake is awaited (see [`Agent::nudge_handshakes`]).
    handshakes: BTreeMap<PublicKey, Awaited>,
    /// The WireGuard peers last wanted, to re-add one without a new bundle.
    wanted_peers: BTreeMap<PublicKey, WgPeerSpec>,
}

/// A peer added at `since` (wall clock, seconds) that has not handshaken yet.
#[derive(Debug, Clone, Copy)]
struct Awaited {
    since: u64,
    next: Instant,
    attempts: u32,
}

/// When two nodes replace their keypairs at the same moment (a node-key epoch asks every node
/// at once), each may send its first handshake before the other has the new key; both are
/// dropped and WireGuard waits 5 s (REKEY_TIMEOUT) before trying again. A peer that has not
/// handshaken this long after being added is re-added, which makes the kernel handshake again at
/// once (a fresh peer has no rate limit, and the keepalive sends a packet).
const HANDSHAKE_NUDGE_AFTER: Duration = Duration::from_secs(1);
const HANDSHAKE_NUDGES: u32 = 5;

impl<K: Kernel> std::fmt::Debug for Agent<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent")
            .field("node", &self.cfg.node_name)
            .field("mode", &self.cfg.mode)
            .finish_non_exhaustive()
    }
}

impl<K: Kernel> Agent<K> {
    /// Observes the kernel and adopts what it holds. Fails only if the kernel cannot be read or
    /// a configured key file is unusable.
    pub fn start(
        cfg: Config,
        facts: NodeFacts,
        mut kernel: K,
        client: KeydClient,
        shared: Shared,
    ) -> Result<Self, AgentError> {
        let observed = kernel.observe().map_err(AgentError::Observe)?;
        let now = Instant::now();
        let mut installed_since = BTreeMap::new();
        for id in observed.states.keys() {
            if let Ok(spi) = u8::try_from(id.spi) {
                // Adopted keys count as just installed: a held-back switch waits the full delay.
                installed_since.insert(spi, now);
            }
        }
        let mut wg_key = None;
        let mut adopted_key = false;
        if cfg.mode == Mode::Wireguard {
            wg_key = match &cfg.wireguard.private_key_file {
                Some(path) if path.exists() => Some(read_key_file(path)?),
                Some(path) => {
                    let k = Key32::random().map_err(|_| AgentError::Random)?;
                    write_key_file(path, &k)?;
                    Some(k)
                }
                None => match observed.wg.as_ref().and_then(|w| w.private_key.clone()) {
                    Some(k) => {
                        adopted_key = true;
                        Some(k)
                    }
                    None => Some(Key32::random().map_err(|_| AgentError::Random)?),
                },
            };
        }
        // The epoch a key answers is kept with it in the kernel (the device alias); a key read
        // from a file is the kernel's key if the device has it.
        let wg_key_epoch = match (&wg_key, &observed.wg) {
            (Some(k), Some(w)) if w.public_key == Some(k.public_key()) => {
                Some(w.key_epoch.unwrap_or(0))
            }
            _ => None,
        };
        let cfg_long_poll = cfg.long_poll;
        let public = wg_key.as_ref().map(|k| k.public_key().to_base64());
        shared.update(|s| {
            s.node = cfg.node_name.clone();
            s.mode = match cfg.mode {
                Mode::Ipsec => "ipsec".into(),
                Mode::Wireguard => "wireguard".into(),
            };
            s.keyd.server = cfg.keyd.server.clone();
            s.adopted.xfrm_states = observed.states.len();
            s.adopted.xfrm_policies = observed.policies.len();
            s.adopted.wireguard_peers = observed.wg.as_ref().map_or(0, |w| w.peers.len());
            s.adopted.wireguard_private_key = adopted_key;
            s.wireguard_public_key = public;
            s.ipsec_outbound_spi = reconcile::current_outbound(&observed);
        });
        tracing::info!(
            xfrm_states = observed.states.len(),
            xfrm_policies = observed.policies.len(),
            wireguard_peers = observed.wg.as_ref().map_or(0, |w| w.peers.len()),
            adopted_private_key = adopted_key,
            "adopted the kernel's state"
        );
        Ok(Agent {
            cfg,
            facts,
            kernel,
            client,
            shared,
            wg_key,
            wg_key_born: now,
            registered: None,
            bundle: None,
            etag: None,
            fresh: false,
            dirty: false,
            installed_since,
            outbound_seen: BTreeSet::new(),
            last_ack: None,
            recheck_at: None,
            last_reconcile: None,
            failures: 0,
            wg_key_epoch,
            long_poll: cfg_long_poll,
            handshakes: BTreeMap::new(),
            wanted_peers: BTreeMap::new(),
        })
    }

    pub fn kernel_mut(&mut self) -> &mut K {
        &mut self.kernel
    }

    pub fn public_key(&self) -> Option<crate::secret::PublicKey> {
        self.wg_key.as_ref().map(Key32::public_key)
    }

    fn registration(&self) -> NodeRegistration {
        NodeRegistration {
            endpoint: self.facts.endpoint,
            pod_cidrs: self.facts.pod_cidrs.clone(),
            wireguard_public_key: self.wg_key.as_ref().map(|k| k.public_key().to_base64()),
            wireguard_key_epoch: self.wg_key.as_ref().and(self.wg_key_epoch),
            boot_id: Some(self.facts.boot_id.clone()),
        }
    }

    fn keyd_ok(&mut self, op: &'static str, outcome: &'static str) {
        self.failures = 0;
        let m = &self.shared.metrics;
        m.keyd_requests
            .get_or_create(&OpOutcome { op, outcome })
            .inc();
        m.keyd_reachable.set(1);
        m.keyd_consecutive_failures.set(0);
        self.shared.update(|s| {
            s.keyd.reachable = true;
            s.keyd.last_contact = Some(Timestamp::now());
            s.keyd.consecutive_failures = 0;
            s.keyd.last_error = None;
        });
    }

    fn keyd_failed(&mut self, op: &'static str, e: &KeydError) {
        self.failures = self.failures.saturating_add(1);
        let m = &self.shared.metrics;
        m.keyd_requests
            .get_or_create(&OpOutcome {
                op,
                outcome: e.label(),
            })
            .inc();
        // Reachable means keyd answered (even with an error).
        let reachable = matches!(e, KeydError::Status { .. } | KeydError::Decode(_));
        m.keyd_reachable.set(i64::from(reachable));
        m.keyd_consecutive_failures.set(i64::from(self.failures));
        let text = keyd_mtls::error_chain(e);
        tracing::warn!(op, error = %text, failures = self.failures, "keyd request failed; the kernel keeps its state");
        let failures = self.failures;
        self.shared.update(|s| {
            s.keyd.reachable = reachable;
            s.keyd.consecutive_failures = failures;
            s.keyd.last_error = Some(text);
        });
    }

    fn backoff(&self) -> Duration {
        backoff(
            self.cfg.backoff_initial,
            self.cfg.backoff_max,
            self.failures.saturating_sub(1),
            random_unit(),
        )
    }

    /// One round: register if needed, fetch, reconcile when something changed, acknowledge.
    /// Returns how long to wait before the next round.
    pub async fn step(&mut self) -> Duration {
        if !self.ensure_registered().await {
            self.reassert();
            return self.backoff();
        }
        let wait = self.long_poll_wait();
        let asked = Instant::now();
        let mut not_modified = false;
        match self.client.fetch_bundle(self.etag.as_deref(), wait).await {
            Ok(Fetched::NotModified) => {
                self.keyd_ok("fetch", "not_modified");
                not_modified = true;
            }
            Ok(Fetched::Bundle { bundle, etag }) => {
                self.keyd_ok("fetch", "ok");
                self.bundle = Some(*bundle);
                self.etag = Some(etag);
                self.fresh = true;
                self.dirty = true;
            }
            Err(e) if wait.is_some() && e.is_bad_request() => {
                tracing::warn!(error = %keyd_mtls::error_chain(&e), "keyd refuses long polls; polling every poll_interval instead");
                self.long_poll = None;
                return Duration::ZERO;
            }
            Err(e) if e.is_not_found() => {
                // keyd does not know this node (its store was reset): register again.
                self.keyd_failed("fetch", &e);
                self.registered = None;
                self.etag = None;
                return self.backoff();
            }
            Err(e) => {
                self.keyd_failed("fetch", &e);
                self.reassert();
                return self.backoff();
            }
        }
        if self.cfg.mode == Mode::Wireguard
            && let Some(want) = self.bundle.as_ref().map(|b| b.wireguard.node_key_epoch)
        {
            match self.wg_key_epoch {
                // A key made at start answers whatever epoch is current.
                None => self.wg_key_epoch = Some(want),
                Some(have) if want > have => {
                    tracing::info!(
                        epoch = want,
                        key_epoch = have,
                        "keyd asks for a new WireGuard keypair"
                    );
                    if self.rotate_keypair().await.is_err() {
                        return self.backoff();
                    }
                }
                Some(_) => {}
            }
        }
        self.nudge_handshakes();
        // A held-back step is due, or the periodic comparison that repairs drift.
        let due = self.recheck_at.is_some_and(|t| Instant::now() >= t)
            || self
                .last_reconcile
                .is_none_or(|t| t.elapsed() >= self.cfg.resync_interval);
        if (self.dirty || due)
            && let Err(e) = self.reconcile(true)
        {
            tracing::warn!(error = %keyd_mtls::error_chain(&e), "reconcile failed; retrying");
            return self.cfg.backoff_initial.min(self.cfg.poll_interval);
        }
        // Every step, not only after a reconcile: an acknowledgement that failed (keyd away)
        // must reach keyd once it is back, and by then the unchanged bundle answers 304, which
        // does not make anything dirty. A no-op when keyd already has this one.
        self.send_ack().await;
        // The registration may have learned the key's epoch.
        self.ensure_registered().await;
        match wait {
            // The long poll did the waiting. A 304 long before the wait was up means keyd does
            // not hold long polls: fall back to the poll interval rather than spin.
            Some(w) if not_modified && asked.elapsed() < w / 2 && w >= Duration::from_secs(1) => {
                self.next_delay()
            }
            Some(_) => Duration::ZERO,
            None => self.next_delay(),
        }
    }

    /// Re-adds peers that were added a while ago and have not handshaken yet (see
    /// [`HANDSHAKE_NUDGE_AFTER`]); gives up on a peer after [`HANDSHAKE_NUDGES`] tries, leaving
    /// WireGuard's own retries.
    fn nudge_handshakes(&mut self) {
        let now = Instant::now();
        if !self.handshakes.values().any(|a| a.next <= now) {
            return;
        }
        let Ok(observed) = self.kernel.observe() else {
            return;
        };
        let peers = observed.wg.map(|w| w.peers).unwrap_or_default();
        let mut readd = Vec::new();
        self.handshakes.retain(|k, a| {
            let done = peers
                .get(k)
                .and_then(|p| p.last_handshake)
                .is_some_and(|t| t + 1 >= a.since);
            if done || a.attempts >= HANDSHAKE_NUDGES {
                return false;
            }
            if a.next <= now {
                a.attempts += 1;
                a.next = now + HANDSHAKE_NUDGE_AFTER;
                readd.push(*k);
            }
            true
        });
        let specs: Vec<WgPeerSpec> = readd
            .iter()
            .filter_map(|k| self.wanted_peers.get(k).cloned())
            .collect();
        if specs.is_empty() {
            return;
        }
        tracing::info!(
            peers = specs.len(),
            "no handshake yet with new peer(s): adding them again to handshake at once"
        );
        let ops = [Op::WgRemovePeers(readd), Op::WgUpsertPeers(specs)];
        if let Err(e) = self.kernel.apply(&ops) {
            tracing::warn!(error = %keyd_mtls::error_chain(&e), "re-adding peers failed");
        } else {
            for op in &ops {
                self.shared
                    .metrics
                    .kernel_ops
                    .get_or_create(&KernelOp { op: op.kind() })
                    .inc();
            }
        }
    }

    /// Registers (or re-registers) when what keyd should know about this node changed.
    /// Returns whether keyd has the current registration.
    async fn ensure_registered(&mut self) -> bool {
        let reg = self.registration();
        if self.registered.as_ref() == Some(&reg) {
            return true;
        }
        match self.client.register(&reg).await {
            Ok(_) => {
                self.keyd_ok("register", "ok");
                self.registered = Some(reg);
                true
            }
            Err(e) => {
                self.keyd_failed("register", &e);
                false
            }
        }
    }

    /// How long the next fetch may wait for a change: the long-poll time, cut short by a
    /// held-back outbound switch or a keypair that is due.
    fn long_poll_wait(&self) -> Option<Duration> {
        let lp = self.long_poll?;
        self.etag.as_ref()?;
        if self.dirty {
            return None;
        }
        Some(self.deadline_within(lp).max(Duration::from_millis(1)))
    }

    fn deadline_within(&self, mut d: Duration) -> Duration {
        let now = Instant::now();
        if let Some(t) = self.handshakes.values().map(|a| a.next).min() {
            d = d.min(t.saturating_duration_since(now));
        }
        if let Some(t) = self.recheck_at {
            d = d.min(t.saturating_duration_since(now));
        }
        if let Some(t) = self.last_reconcile {
            d = d.min((t + self.cfg.resync_interval).saturating_duration_since(now));
        }
        if let (Mode::Wireguard, Some(max)) = (self.cfg.mode, self.cfg.wireguard.keypair_max_age) {
            d = d.min((self.wg_key_born + max).saturating_duration_since(now));
        }
        d
    }

    fn next_delay(&self) -> Duration {
        self.deadline_within(self.cfg.poll_interval)
    }

    async fn send_ack(&mut self) {
        let Some(ack) = self.shared.snapshot().acked else {
            return;
        };
        if self.last_ack.as_ref() == Some(&ack) {
            return;
        }
        match self.client.ack(&ack).await {
            Ok(()) => {
                self.keyd_ok("ack", "ok");
                tracing::info!(
                    ipsec_spis = ?ack.ipsec_spis,
                    ipsec_outbound_spi = ?ack.ipsec_outbound_spi,
                    wireguard_epoch = ?ack.wireguard_epoch,
                    "acknowledged to keyd"
                );
                self.last_ack = Some(ack);
            }
            Err(e) => self.keyd_failed("ack", &e),
        }
    }

    /// While keyd is away: put back what the last bundle asks for, remove nothing.
    fn reassert(&mut self) {
        if self.bundle.is_some()
            && let Err(e) = self.reconcile(false)
        {
            tracing::warn!(error = %keyd_mtls::error_chain(&e), "re-asserting the last bundle failed");
        }
    }

    /// Observe, plan, apply (removals only if `full` and the bundle is fresh), observe again and
    /// record what to acknowledge.
    pub fn reconcile(&mut self, full: bool) -> Result<(), ReconcileError> {
        let Some(revision) = self.bundle.as_ref().map(|b| b.revision.clone()) else {
            return Ok(());
        };
        let started = Instant::now();
        let result = self.reconcile_inner(full);
        // From its end: a pass slower than resync_interval must not start the next at once.
        self.last_reconcile = Some(Instant::now());
        let m = &self.shared.metrics;
        m.reconcile_seconds.observe(started.elapsed().as_secs_f64());
        match &result {
            Ok(()) => {
                m.reconciles.get_or_create(&Outcome { outcome: "ok" }).inc();
                m.last_sync_timestamp.set(Timestamp::now().0 as i64);
                self.dirty = false;
                self.shared.update(|s| {
                    s.bundle_revision = Some(revision);
                    s.last_sync = Some(Timestamp::now());
                    s.last_sync_error = None;
                    s.ready = true;
                });
            }
            Err(e) => {
                m.reconciles
                    .get_or_create(&Outcome { outcome: "error" })
                    .inc();
                self.dirty = true;
                let text = keyd_mtls::error_chain(e);
                self.shared.update(|s| s.last_sync_error = Some(text));
            }
        }
        result
    }

    fn reconcile_inner(&mut self, full: bool) -> Result<(), ReconcileError> {
        let Some(bundle) = self.bundle.as_ref() else {
            return Ok(());
        };
        let now = Instant::now();
        let observed = self.kernel.observe().map_err(ReconcileError::Observe)?;
        let (outbound, recheck) = match (&self.cfg.mode, &bundle.ipsec) {
            (Mode::Ipsec, Some(ipsec)) => {
                let spis: Vec<u8> = ipsec.keys.iter().map(|k| k.spi).collect();
                let (spi, at) = reconcile::choose_outbound(
                    ipsec.outbound_spi,
                    reconcile::current_outbound(&observed),
                    &spis,
                    &self.installed_since,
                    now,
                    self.cfg.ipsec.outbound_switch_delay,
                );
                (Some(spi), at.map(|t| (ipsec.outbound_spi, t)))
            }
            _ => (None, None),
        };
        let marks = match &bundle.ipsec {
            Some(ipsec) if self.cfg.mode == Mode::Ipsec => reconcile::assign_marks(
                ipsec
                    .peers
                    .iter()
                    .filter(|p| p.node != self.facts.name)
                    .map(|p| p.endpoint),
                &observed,
                self.cfg.ipsec.mark_mask,
            ),
            _ => BTreeMap::new(),
        };
        let computed = reconcile::desired(&Inputs {
            bundle,
            facts: &self.facts,
            config: &self.cfg,
            wg_private_key: self.wg_key.as_ref(),
            wg_key_epoch: self.wg_key_epoch.unwrap_or(bundle.wireguard.node_key_epoch),
            outbound_spi: outbound,
            marks: &marks,
        });
        let plan = reconcile::plan(&computed.desired, &observed);
        // Peers new to the kernel: watch for their first handshake.
        let added: Vec<PublicKey> = computed
            .desired
            .wg
            .as_ref()
            .map(|w| {
                w.peers
                    .keys()
                    .filter(|k| {
                        observed
                            .wg
                            .as_ref()
                            .is_none_or(|o| !o.peers.contains_key(k))
                    })
                    .copied()
                    .collect()
            })
            .unwrap_or_default();
        let metrics = self.shared.metrics.clone();
        let count = |ops: &[crate::model::Op], upto: usize| {
            for op in &ops[..upto] {
                metrics
                    .kernel_ops
                    .get_or_create(&KernelOp { op: op.kind() })
                    .inc();
            }
        };
        for op in &plan.ensure {
            tracing::debug!(%op, "applying");
            // An outbound state this node had, gone (a flush behind its back): added again, its
            // sequence numbers restart, and the peer's inbound state refuses them as replays.
            if let crate::model::Op::XfrmStateAdd(st) = op
                && self.outbound_seen.contains(&(st.id.dst, st.id.spi))
            {
                tracing::warn!(state = %st.id, "an outbound XFRM state disappeared and is added again; the peer refuses its packets as replays until the next key: run `keyctl ipsec rotate`");
                self.shared.metrics.ipsec_states_recreated.inc();
            }
        }
        if let Err(e) = self.kernel.apply(&plan.ensure) {
            count(&plan.ensure, e.applied);
            return Err(ReconcileError::Apply(e));
        }
        count(&plan.ensure, plan.ensure.len());
        if full && self.fresh && !plan.remove.is_empty() {
            for op in &plan.remove {
                tracing::info!(%op, "removing what the bundle no longer lists");
            }
            if let Err(e) = self.kernel.apply(&plan.remove) {
                count(&plan.remove, e.applied);
                return Err(ReconcileError::Apply(e));
            }
            count(&plan.remove, plan.remove.len());
        }
        if !plan.ensure.is_empty() {
            tracing::info!(ops = plan.ensure.len(), removed = if full { plan.remove.len() } else { 0 }, revision = %bundle.revision, "kernel updated");
        }
        let after = self.kernel.observe().map_err(ReconcileError::Observe)?;
        let own = self.facts.endpoint;
        self.outbound_seen = after
            .states
            .keys()
            .filter(|id| id.src == own)
            .map(|id| (id.dst, id.spi))
            .collect();
        if let Some(w) = &computed.desired.wg {
            self.wanted_peers = w.peers.clone();
            let wall = unix_now();
            for k in added {
                self.handshakes.insert(
                    k,
                    Awaited {
                        since: wall,
                        next: now + HANDSHAKE_NUDGE_AFTER,
                        attempts: 0,
                    },
                );
            }
            self.handshakes.retain(|k, _| w.peers.contains_key(k));
        }
        let ack = reconcile::ack(&computed, &after, self.cfg.mode, bundle.wireguard.epoch);
        let view = PeerView {
            pod_cidrs: peer_cidrs(bundle, &self.facts.name, self.cfg.mode),
            ready: reconcile::readiness(bundle, &computed, &after, self.cfg.mode),
        };
        self.shared.peers.send_if_modified(|v| {
            let changed = *v != view;
            *v = view;
            changed
        });
        for spi in &ack.ipsec_spis {
            self.installed_since.entry(*spi).or_insert(now);
        }
        self.installed_since
            .retain(|spi, _| ack.ipsec_spis.contains(spi));
        self.recheck_at = recheck.map(|(_, t)| t);
        let skipped: Vec<SkippedPeer> = computed
            .skipped
            .iter()
            .map(|s| SkippedPeer {
                node: s.node.clone(),
                reason: s.reason.clone(),
            })
            .collect();
        let peers = match self.cfg.mode {
            Mode::Ipsec => computed.desired.filters.len(),
            Mode::Wireguard => computed.desired.wg.as_ref().map_or(0, |w| w.peers.len()),
        };
        let m = &self.shared.metrics;
        m.peers.set(peers as i64);
        m.skipped_peers.set(skipped.len() as i64);
        let outbound_now = reconcile::current_outbound(&after);
        m.ipsec_outbound_spi
            .set(i64::from(outbound_now.unwrap_or(0)));
        let pending = recheck.map(|(spi, at)| {
            let wait = at.saturating_duration_since(Instant::now());
            (
                spi,
                Timestamp::from_system(std::time::SystemTime::now() + wait),
            )
        });
        self.shared.update(|s| {
            s.acked = Some(ack);
            s.ipsec_outbound_spi = outbound_now;
            s.ipsec_pending_outbound = pending;
            s.peers = peers;
            s.skipped = skipped;
            s.dropped_cidrs = computed.dropped.iter().map(ToString::to_string).collect();
        });
        Ok(())
    }

    /// Generates a new WireGuard keypair: registers its public key with keyd first (so peers can
    /// learn it on their next fetch), then programs the private key. On failure the old keypair
    /// stays.
    pub async fn rotate_keypair(&mut self) -> Result<(), KeydError> {
        if self.cfg.mode != Mode::Wireguard {
            return Ok(());
        }
        let new = Key32::random()
            .map_err(|_| KeydError::Decode("random number generator failed".into()))?;
        // The new key answers the epoch keyd asks for now (never ahead of it).
        let epoch = self
            .bundle
            .as_ref()
            .map(|b| b.wireguard.node_key_epoch)
            .or(self.wg_key_epoch);
        let mut reg = self.registration();
        reg.wireguard_public_key = Some(new.public_key().to_base64());
        reg.wireguard_key_epoch = epoch;
        if let Err(e) = self.client.register(&reg).await {
            self.keyd_failed("register", &e);
            return Err(e);
        }
        self.keyd_ok("register", "ok");
        if let Some(path) = &self.cfg.wireguard.private_key_file
            && let Err(e) = write_key_file(path, &new)
        {
            tracing::error!(error = %keyd_mtls::error_chain(&e), "cannot persist the new private key; keeping it in memory only");
        }
        let public = new.public_key();
        self.wg_key = Some(new);
        self.wg_key_epoch = epoch;
        self.wg_key_born = Instant::now();
        self.registered = Some(reg);
        self.dirty = true;
        self.shared.metrics.keypair_rotations.inc();
        self.shared
            .update(|s| s.wireguard_public_key = Some(public.to_base64()));
        tracing::info!(public_key = %public, "WireGuard keypair rotated");
        if let Err(e) = self.reconcile(true) {
            tracing::warn!(error = %keyd_mtls::error_chain(&e), "programming the new private key failed; retrying");
        }
        Ok(())
    }

    /// Runs until `shutdown` turns true. A message on `rotate` rotates the WireGuard keypair.
    /// Leaving touches nothing: the kernel keeps encrypting, and the next start adopts it.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut rotate: mpsc::Receiver<()>,
    ) {
        loop {
            if let (Mode::Wireguard, Some(max)) =
                (self.cfg.mode, self.cfg.wireguard.keypair_max_age)
                && self.wg_key_born.elapsed() >= max
            {
                let _ = self.rotate_keypair().await;
            }
            let delay = self.step().await;
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                Some(()) = rotate.recv() => {
                    let _ = self.rotate_keypair().await;
                }
                _ = shutdown.changed() => {}
            }
            if *shutdown.borrow() {
                tracing::info!("stopping; the kernel keeps its state");
                return;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("cannot read the kernel's state")]
    Observe(#[source] KernelError),
    #[error("cannot apply")]
    Apply(#[source] ApplyError),
}

/// Every other node's pod CIDRs, as the bundle of `mode` lists them.
fn peer_cidrs(bundle: &NodeBundle, own: &str, mode: Mode) -> Vec<(String, Vec<ipnet::IpNet>)> {
    match (mode, &bundle.ipsec) {
        (Mode::Ipsec, Some(ipsec)) => ipsec
            .peers
            .iter()
            .filter(|p| p.node != own)
            .map(|p| (p.node.clone(), p.pod_cidrs.clone()))
            .collect(),
        (Mode::Ipsec, None) => Vec::new(),
        (Mode::Wireguard, _) => bundle
            .wireguard
            .peers
            .iter()
            .filter(|p| p.node != own)
            .map(|p| (p.node.clone(), p.allowed_ips.clone()))
            .collect(),
    }
}

fn read_key_file(path: &Path) -> Result<Key32, AgentError> {
    use base64::Engine as _;
    let text = zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
        AgentError::ReadFile {
            path: path.display().to_string(),
            source,
        }
    })?);
    let raw = zeroize::Zeroizing::new(
        base64::engine::general_purpose::STANDARD
            .decode(text.trim())
            .map_err(|_| AgentError::BadKeyFile {
                path: path.display().to_string(),
            })?,
    );
    Key32::from_slice(&raw).ok_or(AgentError::BadKeyFile {
        path: path.display().to_string(),
    })
}

/// Writes the key as base64 (mode 0600), atomically.
fn write_key_file(path: &Path, key: &Key32) -> Result<(), AgentError> {
    use base64::Engine as _;
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let err = |source| AgentError::WriteFile {
        path: path.display().to_string(),
        source,
    };
    let text =
        zeroize::Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(key.expose()));
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(err)?;
    f.write_all(text.as_bytes()).map_err(err)?;
    f.write_all(b"\n").map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let i = Duration::from_secs(1);
        let m = Duration::from_secs(60);
        assert_eq!(backoff(i, m, 0, 0.0), Duration::from_millis(500));
        assert_eq!(backoff(i, m, 0, 1.0), Duration::from_secs(1));
        assert_eq!(backoff(i, m, 3, 0.0), Duration::from_secs(4));
        assert_eq!(backoff(i, m, 30, 1.0), m);
        assert!(backoff(i, m, 30, 0.0) >= m / 2);
        let u = random_unit();
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn key_file_round_trip_is_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("wg.key");
        let k = Key32::from_bytes([3; 32]);
        write_key_file(&p, &k).unwrap();
        assert_eq!(read_key_file(&p).unwrap(), k);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&p, "nope").unwrap();
        assert!(matches!(
            read_key_file(&p),
            Err(AgentError::BadKeyFile { .. })
        ));
    }
}
