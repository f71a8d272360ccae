//! The eBPF data plane at run time: owns the steering program, keeps its maps equal to what the
//! rules (policy mode) or the bundle's peers (all mode) ask, tells the program which peers'
//! tunnels are ready, attaches it to new pod devices, and reports per-policy counters in
//! `/metrics`, `/status` and to keyd.
//!
//! It runs beside the agent: the agent publishes the peers and their readiness after each
//! reconcile ([`crate::status::PeerView`]); a fetcher long-polls keyd for this node's rules.
//! Every input change is applied within one pass (well under the 2 s a rule change may take end
//! to end); the program is never reloaded for it.

use std::collections::BTreeMap;
use std::time::Duration;

use keyd_proto::rules::{DataplaneReport, NodeRules, PolicyCounters};
use keyd_proto::{EncryptionMode, Timestamp};
use tokio::sync::watch;

use crate::config::{Config, Encrypt, Mode};
use crate::kernel::ebpf::{self, Counters, EbpfError, EbpfSettings, Hook, Steering};
use crate::keyd_client::KeydClient;
use crate::status::{PeerView, Shared};
use crate::steering::{self, ALL_SLOT, Contents, MapOp, NodeMode, Settings, SlotId, Slots};

#[derive(Debug, thiserror::Error)]
pub enum DataplaneError {
    #[error(transparent)]
    Ebpf(#[from] EbpfError),
    #[error("setting up policy routing for steered WireGuard packets")]
    Rules(#[source] crate::kernel::KernelError),
    #[error(
        "{0} is not on a bpffs: mount one (`mount -t bpf bpf /sys/fs/bpf`; in a pod, a hostPath \
         volume) or set steering.pin_dir = \"\" to pin nothing"
    )]
    NoBpffs(String),
}

/// How often devices are scanned and counters exported.
const TICK: Duration = Duration::from_secs(1);

pub struct Dataplane {
    node: String,
    mode: Mode,
    encrypt: Encrypt,
    local_cidrs: Vec<ipnet::IpNet>,
    /// This node's address (the underlay is the device holding it) ...
    endpoint: std::net::IpAddr,
    /// ... unless configured.
    underlay: Option<String>,
    steering_cfg: crate::config::SteeringSettings,
    ebpf: Steering,
    slots: Slots,
    /// What `keyd_policy_ids` and `keyd_node_ids` hold (slot -> id).
    ids_written: (BTreeMap<u32, SlotId>, BTreeMap<u32, SlotId>),
    have: Option<Contents>,
    ready_have: BTreeMap<u32, u32>,
    rules: Option<NodeRules>,
    peers: PeerView,
    /// Last counters read per slot, to turn them into metric increments.
    seen: BTreeMap<u32, Counters>,
    counting_since: Timestamp,
    shared: Shared,
    /// The programs are not attached yet: the maps are of a new layout and still empty (see
    /// [`Steering::replaces_another_layout`]).
    attach_deferred: bool,
}

impl std::fmt::Debug for Dataplane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dataplane")
            .field("node", &self.node)
            .finish_non_exhaustive()
    }
}

fn mechanism(mode: Mode) -> EncryptionMode {
    match mode {
        Mode::Wireguard => EncryptionMode::Wireguard,
        Mode::Ipsec => EncryptionMode::Ipsec,
    }
}

impl Dataplane {
    /// Loads the program (keeping what pinned maps hold), sets up policy routing for steered
    /// WireGuard traffic and attaches to the pod devices present now.
    pub fn start(cfg: &Config, shared: Shared) -> Result<Self, DataplaneError> {
        let s = &cfg.steering;
        if let Some(dir) = &s.pin_dir
            && !ebpf::is_bpffs(dir)
        {
            return Err(DataplaneError::NoBpffs(dir.display().to_string()));
        }
        if s.encrypt == Encrypt::Policy && cfg.mode == Mode::Wireguard {
            ebpf::ensure_mark_rules(
                s.marks.wireguard,
                s.marks.mask,
                s.route_table,
                s.rule_priority,
            )
            .map_err(DataplaneError::Rules)?;
        }
        let ebpf = Steering::load(EbpfSettings {
            attach: s.attach,
            pin_dir: s.pin_dir.clone(),
            priority: s.filter_priority,
        })?;
        // Pinned maps of an earlier run: start the diff from what they hold. Maps that cannot
        // be read are an error, not a fresh start: their stale entries would never be removed.
        let have = Some(ebpf.read()?).filter(|c| c.settings.node_mode != NodeMode::Off);
        let ready_have = ebpf.node_flags(steering::MAX_NODES)?;
        // Names get back the slots the maps' entries use.
        let (policy_ids, node_ids) = ebpf.read_slot_ids()?;
        let ids_written = (
            policy_ids.iter().map(|(id, s)| (*s, *id)).collect(),
            node_ids.iter().map(|(id, s)| (*s, *id)).collect(),
        );
        let slots = Slots::with_hints(policy_ids, node_ids);
        let mut dp = Dataplane {
            node: cfg.node_name.clone(),
            mode: cfg.mode,
            encrypt: s.encrypt,
            local_cidrs: cfg.pod_cidrs.clone(),
            endpoint: cfg.endpoint,
            underlay: cfg.ipsec.underlay_device.clone(),
            steering_cfg: s.clone(),
            ebpf,
            slots,
            ids_written,
            have,
            ready_have,
            rules: None,
            peers: PeerView::default(),
            seen: BTreeMap::new(),
            counting_since: Timestamp::now(),
            shared,
            attach_deferred: false,
        };
        // Counters restart with this process (`counting_since`): policy slots are zeroed as
        // they are assigned, the all-mode slot here.
        dp.ebpf.reset_counters(ALL_SLOT)?;
        // After an upgrade that changed the maps' layout, the new maps start empty while the
        // earlier version's programs, still attached, enforce with the old ones: attaching now
        // would leave a moment with no rules. The new programs go on once the first sync has
        // filled the new maps.
        dp.attach_deferred = dp.ebpf.replaces_another_layout();
        if dp.attach_deferred {
            tracing::warn!(
                "the steering maps' layout changed: the earlier programs stay attached until the new maps hold the rules"
            );
        } else {
            dp.scan_devices();
            dp.ebpf.remove_stale_pins();
        }
        Ok(dp)
    }

    /// New rules from keyd (what [`fetch_rules`] publishes); applied by the next [`Self::sync`].
    pub fn set_rules(&mut self, rules: Option<NodeRules>) {
        self.rules = rules;
    }

    /// New peers and readiness from the agent; applied by the next [`Self::sync`].
    pub fn set_peers(&mut self, peers: PeerView) {
        self.peers = peers;
    }

    /// One policy's counters (`all` in all mode), as last read by [`Self::export`].
    pub fn counters_of(&mut self, policy: &str) -> Option<PolicyCounters> {
        self.export()
            .policies
            .into_iter()
            .find(|p| p.name == policy)
    }

    fn base_settings(&self) -> Settings {
        Settings {
            node_mode: match self.encrypt {
                Encrypt::All => NodeMode::All,
                Encrypt::Policy => NodeMode::Policy,
            },
            all_mode: mechanism(self.mode),
            all_strict: self.steering_cfg.strict,
            marks: self.steering_cfg.marks,
        }
    }

    /// Attaches the steering program to pod devices that appeared and the guard to the underlay
    /// (`ipsec.underlay_device`, or the device holding this node's address); forgets devices
    /// that went.
    pub fn scan_devices(&mut self) {
        let (names, found) = match ebpf::link_names(self.endpoint) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %keyd_mtls::error_chain(&e), "cannot list links");
                return;
            }
        };
        let underlay = self.underlay.clone().or(found);
        let gone: Vec<String> = self
            .ebpf
            .attached()
            .filter(|(a, _)| !names.iter().any(|n| n == a))
            .map(|(a, _)| a.to_owned())
            .collect();
        for g in gone {
            self.ebpf.forget(&g);
        }
        let wanted = names
            .iter()
            .filter(|n| self.steering_cfg.matches(n))
            .map(|n| (n.clone(), Hook::PodIngress))
            .chain(underlay.map(|u| (u, Hook::UnderlayEgress)));
        for (n, hook) in wanted {
            if self.ebpf.attached().any(|(a, h)| a == n && h == hook) {
                continue;
            }
            match self.ebpf.attach(&n, hook) {
                Ok(()) => tracing::info!(device = %n, hook = hook.as_str(), "steering attached"),
                Err(e) => {
                    tracing::warn!(device = %n, hook = hook.as_str(), error = %keyd_mtls::error_chain(&e), "cannot attach steering")
                }
            }
        }
        let attached: Vec<String> = self
            .ebpf
            .attached()
            .map(|(d, h)| format!("{d} ({})", h.as_str()))
            .collect();
        self.shared.update(|s| s.steering.devices = attached);
    }

    /// Brings the maps to what the current rules (or peers) and readiness ask.
    pub fn sync(&mut self) -> Result<(), DataplaneError> {
        let base = self.base_settings();
        let before = self.slots.policies.clone();
        let (want, problems) = match (self.encrypt, &self.rules) {
            (Encrypt::Policy, Some(rules)) => {
                let remote: Vec<&str> = rules
                    .endpoints
                    .iter()
                    .filter(|e| e.node != self.node)
                    .map(|e| e.node.as_str())
                    .chain(self.peers.pod_cidrs.iter().map(|(n, _)| n.as_str()))
                    .collect();
                let full = self
                    .slots
                    .assign(rules.policies.iter().map(|p| p.name.as_str()), remote);
                let (c, mut problems) = steering::from_rules(rules, &self.node, &self.slots, base);
                let own = mechanism(self.mode);
                for p in rules.policies.iter().filter(|p| p.mode != own) {
                    problems.push(steering::Problem {
                        what: format!(
                            "{} asks for {:?} but this node encrypts with {own:?}: its covered traffic {}",
                            p.name,
                            p.mode,
                            if p.strict { "is dropped" } else { "goes in the clear" }
                        ),
                    });
                }
                problems.extend(full.into_iter().map(|n| steering::Problem {
                    what: format!("{n}: no free slot"),
                }));
                (c, problems)
            }
            // Policy mode before the first rules: nothing is covered yet, and strict policies
            // of an earlier run stay in the pinned maps until rules arrive.
            (Encrypt::Policy, None) => return Ok(()),
            (Encrypt::All, _) => {
                self.slots
                    .assign([], self.peers.pod_cidrs.iter().map(|(n, _)| n.as_str()));
                (
                    steering::for_all_mode(
                        &self.local_cidrs,
                        &self.peers.pod_cidrs,
                        &self.slots,
                        base,
                    ),
                    Vec::new(),
                )
            }
        };
        let mut ops = Vec::new();
        // A slot now held by another policy starts its counters from zero.
        for (name, slot) in &self.slots.policies {
            if before.iter().any(|(n, s)| s == slot && n != name) || !before.contains_key(name) {
                ops.push(*slot);
            }
        }
        for slot in ops {
            self.ebpf.reset_counters(slot)?;
            self.seen.remove(&slot);
        }
        let map_ops = steering::diff(self.have.as_ref(), &want);
        // Readiness before the settings switch a mode on, after the rest.
        let ready_want: BTreeMap<u32, u32> = self
            .peers
            .ready
            .iter()
            .filter_map(|(n, f)| self.slots.nodes.get(n).map(|s| (*s, *f)))
            .collect();
        let ready_ops = steering::readiness_ops(&self.ready_have, &ready_want);
        let (settings_last, rest): (Vec<MapOp>, Vec<MapOp>) = map_ops
            .into_iter()
            .partition(|o| matches!(o, MapOp::Settings(s) if s.node_mode != NodeMode::Off));
        self.ebpf.apply(&rest)?;
        self.ebpf.apply(&ready_ops)?;
        self.ebpf.apply(&settings_last)?;
        self.have = Some(want);
        self.ready_have = ready_want;
        self.record_slot_ids()?;
        if self.attach_deferred {
            self.attach_deferred = false;
            self.scan_devices();
            self.ebpf.remove_stale_pins();
        }
        let problems: Vec<String> = problems.into_iter().map(|p| p.what).collect();
        if !problems.is_empty() {
            tracing::warn!(problems = ?problems, "some rules could not be loaded");
        }
        let revision = self.rules.as_ref().map(|r| r.revision.clone());
        self.shared.update(|s| {
            s.steering.node_mode = self.encrypt.as_str().into();
            s.steering.rules_revision = revision;
            s.steering.problems = problems;
        });
        Ok(())
    }

    /// Writes who holds each slot into the maps, so that a restart gives names their slots back.
    fn record_slot_ids(&mut self) -> Result<(), DataplaneError> {
        for (nodes, names) in [(false, &self.slots.policies), (true, &self.slots.nodes)] {
            let written = if nodes {
                &mut self.ids_written.1
            } else {
                &mut self.ids_written.0
            };
            let want: BTreeMap<u32, SlotId> = names
                .iter()
                .map(|(n, s)| (*s, steering::slot_id(n)))
                .collect();
            let mut ops: Vec<(u32, SlotId)> = want
                .iter()
                .filter(|(s, id)| written.get(s) != Some(id))
                .map(|(s, id)| (*s, *id))
                .collect();
            ops.extend(
                written
                    .keys()
                    .filter(|s| !want.contains_key(s))
                    .map(|s| (*s, [0u8; 16])),
            );
            self.ebpf.write_slot_ids(nodes, &ops)?;
            *written = want;
        }
        Ok(())
    }

    /// Reads the counters into the metrics and `/status`; returns them as a report.
    pub fn export(&mut self) -> DataplaneReport {
        // Programmed: the policy has its slot and asks for this node's mechanism.
        let own = mechanism(self.mode);
        let modes: BTreeMap<&str, EncryptionMode> = self
            .rules
            .iter()
            .flat_map(|r| r.policies.iter().map(|p| (p.name.as_str(), p.mode)))
            .collect();
        let mut slots: Vec<(String, u32, bool)> = self
            .slots
            .policies
            .iter()
            .map(|(n, s)| (n.clone(), *s, modes.get(n.as_str()) == Some(&own)))
            .collect();
        if self.encrypt == Encrypt::All {
            slots = vec![("all".to_owned(), ALL_SLOT, true)];
        }
        let m = &self.shared.metrics;
        let mut out = Vec::new();
        for (name, slot, programmed) in slots {
            let Ok(now) = self.ebpf.counters(slot) else {
                continue;
            };
            let prev = self.seen.insert(slot, now).unwrap_or_default();
            for (outcome, packets, bytes) in [
                (
                    "encrypted",
                    now.encrypted_packets.saturating_sub(prev.encrypted_packets),
                    now.encrypted_bytes.saturating_sub(prev.encrypted_bytes),
                ),
                (
                    "dropped",
                    now.dropped_packets.saturating_sub(prev.dropped_packets),
                    now.dropped_bytes.saturating_sub(prev.dropped_bytes),
                ),
                (
                    "clear",
                    now.clear_packets.saturating_sub(prev.clear_packets),
                    now.clear_bytes.saturating_sub(prev.clear_bytes),
                ),
            ] {
                let labels = crate::status::PolicyOutcome {
                    policy: name.clone(),
                    outcome,
                };
                m.policy_packets.get_or_create(&labels).inc_by(packets);
                m.policy_bytes.get_or_create(&labels).inc_by(bytes);
            }
            out.push(PolicyCounters {
                name,
                programmed,
                encrypted_packets: now.encrypted_packets,
                encrypted_bytes: now.encrypted_bytes,
                dropped_packets: now.dropped_packets,
                dropped_bytes: now.dropped_bytes,
                clear_packets: now.clear_packets,
                clear_bytes: now.clear_bytes,
            });
        }
        let report = DataplaneReport {
            node_mode: self.encrypt.as_str().into(),
            rules_revision: self.rules.as_ref().map(|r| r.revision.clone()),
            counting_since: self.counting_since,
            at: Timestamp::now(),
            policies: out,
        };
        let copy = report.policies.clone();
        self.shared.update(|s| s.steering.policies = copy);
        report
    }

    /// Runs until `shutdown`: applies rule and peer changes as they come, scans devices and
    /// exports counters every second, reports to keyd every `report_interval`. Exiting leaves the program
    /// and (pinned) maps in place.
    pub async fn run(
        mut self,
        mut rules: watch::Receiver<Option<NodeRules>>,
        mut shutdown: watch::Receiver<bool>,
        reporter: Option<KeydClient>,
    ) {
        let mut peers = self.shared.peers.subscribe();
        let mut tick = tokio::time::interval(TICK);
        // Reports go out from their own task: a slow keyd must not hold up rule changes.
        let (report_tx, report_rx) = watch::channel(None);
        if let Some(client) = reporter {
            tokio::spawn(send_reports(client, report_rx, shutdown.clone()));
        }
        let report_every = u32::try_from(
            (self.steering_cfg.report_interval.as_millis() / TICK.as_millis()).max(1),
        )
        .unwrap_or(u32::MAX);
        let mut ticks = 0u32;
        let mut rules_open = true;
        loop {
            tokio::select! {
                r = rules.changed(), if rules_open => {
                    if r.is_err() { rules_open = false; continue; }
                    self.rules = rules.borrow_and_update().clone();
                }
                r = peers.changed() => {
                    if r.is_err() { return; }
                    self.peers = peers.borrow_and_update().clone();
                }
                _ = tick.tick() => {
                    ticks = ticks.wrapping_add(1);
                    if !self.attach_deferred {
                        self.scan_devices();
                    }
                    let report = self.export();
                    if ticks.is_multiple_of(report_every) {
                        report_tx.send_replace(Some(report));
                    }
                    continue;
                }
                _ = shutdown.changed() => {
                    if *shutdown.borrow() { return; }
                    continue;
                }
            }
            if let Err(e) = self.sync() {
                tracing::warn!(error = %keyd_mtls::error_chain(&e), "updating the steering maps failed; retrying on the next change");
                self.shared
                    .update(|s| s.steering.problems = vec![keyd_mtls::error_chain(&e)]);
            }
        }
    }
}

/// Sends each new report to keyd (the latest one only, if keyd is slower than the reports).
async fn send_reports(
    mut client: KeydClient,
    mut reports: watch::Receiver<Option<DataplaneReport>>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            r = reports.changed() => if r.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let Some(report) = reports.borrow_and_update().clone() else {
            continue;
        };
        if let Err(e) = client.report_dataplane(&report).await {
            tracing::debug!(error = %keyd_mtls::error_chain(&e), "data-plane report not accepted");
        }
    }
}

/// Long-polls keyd for this node's rules and publishes each new set. When keyd cannot give
/// them (not configured for policies, unreachable), the last rules stay in force and `/status`
/// says why.
pub async fn fetch_rules(
    mut client: KeydClient,
    tx: watch::Sender<Option<NodeRules>>,
    shared: Shared,
    long_poll: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut etag: Option<String> = None;
    let mut failures = 0u32;
    loop {
        let wait = etag.as_ref().map(|_| long_poll);
        let result = tokio::select! {
            r = client.fetch_rules(etag.as_deref(), wait) => r,
            _ = shutdown.changed() => return,
        };
        let delay = match result {
            Ok(Some((rules, tag))) => {
                failures = 0;
                tracing::info!(revision = %rules.revision, policies = rules.policies.len(), "rules from keyd");
                etag = Some(tag);
                tx.send_replace(Some(rules));
                shared.update(|s| s.steering.rules_error = None);
                Duration::ZERO
            }
            Ok(None) => {
                failures = 0;
                Duration::ZERO
            }
            Err(e) => {
                failures = failures.saturating_add(1);
                let text = keyd_mtls::error_chain(&e);
                tracing::warn!(error = %text, "cannot fetch this node's rules; the last ones stay in force");
                shared.update(|s| s.steering.rules_error = Some(text));
                crate::agent::backoff(
                    Duration::from_secs(1),
                    Duration::from_secs(30),
                    failures.saturating_sub(1),
                    crate::agent::random_unit(),
                )
            }
        };
        if !delay.is_zero() {
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                _ = shutdown.changed() => return,
            }
        }
    }
}
