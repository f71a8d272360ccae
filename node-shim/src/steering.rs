//! The pure core of eBPF steering: what the maps of `bpf/steer.c` must hold for a node's rules
//! (or, in `all` mode, for its bundle), and the changes that get the maps there in place.
//!
//! Policies and nodes get *slots* (bit positions, array indexes) that stay theirs while they
//! exist, so that adding one policy or node changes only its own entries; a slot is reused only
//! after the change that freed it was applied. Map updates are ordered so that no packet is
//! misjudged meanwhile: new policies' settings before the bits that point at them, changed
//! entries before stale ones are removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;

use ipnet::IpNet;
use keyd_proto::EncryptionMode;
use keyd_proto::rules::{MAX_RULE_POLICIES, NodeRules};

/// Entries of `keyd_endpoints` and `keyd_ports` (`MAX_ENDPOINTS`, `MAX_PORTS` in steer.c).
pub const MAX_ENDPOINTS: usize = 262_144;
pub const MAX_PORTS: usize = 65_536;
/// Policy slots: one bit each in the bitmaps (`MAX_POLICIES` in steer.c).
pub const MAX_POLICIES: usize = MAX_RULE_POLICIES;
/// u64 words of a policy bitmap.
pub const WORDS: usize = MAX_POLICIES / 64;
/// Node slots (`MAX_NODES` in steer.c); 0 is this node.
pub const MAX_NODES: u32 = 65536;
/// The counters slot of `all` mode.
pub const ALL_SLOT: u32 = MAX_POLICIES as u32;

/// `settings.node_mode` in steer.c.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeMode {
    Off = 0,
    All = 1,
    Policy = 2,
}

/// `MODE_*` in steer.c.
pub fn mode_code(m: EncryptionMode) -> u32 {
    match m {
        EncryptionMode::Wireguard => 1,
        EncryptionMode::Ipsec => 2,
    }
}

/// `READY_*` flags of `keyd_nodes`.
pub const READY_WIREGUARD: u32 = 1;
pub const READY_IPSEC: u32 = 2;

pub fn ready_flag(m: EncryptionMode) -> u32 {
    match m {
        EncryptionMode::Wireguard => READY_WIREGUARD,
        EncryptionMode::Ipsec => READY_IPSEC,
    }
}

/// A policy bitmap.
#[derive(Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Bits(pub [u64; WORDS]);

impl std::fmt::Debug for Bits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_set().entries(self.ones()).finish()
    }
}

impl Bits {
    pub fn set(&mut self, i: u32) {
        self.0[i as usize / 64] |= 1 << (i % 64);
    }

    pub fn get(&self, i: u32) -> bool {
        self.0[i as usize / 64] & (1 << (i % 64)) != 0
    }

    pub fn union(&mut self, other: &Bits) {
        for (a, b) in self.0.iter_mut().zip(other.0) {
            *a |= b;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.iter().all(|w| *w == 0)
    }

    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        (0..MAX_POLICIES as u32).filter(|i| self.get(*i))
    }
}

/// The value of a `keyd_endpoints` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Endpoint {
    pub node: u32,
    pub selected: Bits,
    pub peer: Bits,
}

/// `keyd_settings[0]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub node_mode: NodeMode,
    pub all_mode: EncryptionMode,
    pub all_strict: bool,
    pub marks: Marks,
}

/// The mark bits steering sets; configurable so that they stay clear of other agents' (Cilium
/// uses 0xFF00 and the bits from 16 up; kube-proxy 0x4000 and 0x8000).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    pub mask: u32,
    pub wireguard: u32,
    pub ipsec: u32,
}

/// Everything the maps hold, except counters and node readiness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contents {
    pub settings: Settings,
    /// Keyed by the truncated prefix.
    pub endpoints: BTreeMap<IpNet, Endpoint>,
    /// (IP protocol, port) -> the policies with that port.
    pub ports: BTreeMap<(u8, u16), Bits>,
    pub any_port: Bits,
    pub strict: Bits,
    /// Slot -> `MODE_*`.
    pub policies: BTreeMap<u32, u32>,
}

/// Which slot each policy and node holds. Kept by the agent across rule updates.
///
/// A slot freed by one [`Slots::assign`] is not given out again by that same call: the caller
/// applies the change that stops using it first, and the next call may reuse it. So no entry
/// ever points at a slot that already means another policy or node.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Slots {
    pub policies: BTreeMap<String, u32>,
    pub nodes: BTreeMap<String, u32>,
    retired_policies: BTreeSet<u32>,
    retired_nodes: BTreeSet<u32>,
    /// Slots an earlier run gave names (by [`slot_id`]), preferred when a name comes back.
    hints_policies: HashMap<SlotId, u32>,
    hints_nodes: HashMap<SlotId, u32>,
}

/// What the pinned `keyd_policy_ids` and `keyd_node_ids` maps hold per slot.
pub type SlotId = [u8; 16];

/// The first 16 bytes of SHA-256 over `name`.
pub fn slot_id(name: &str) -> SlotId {
    use sha2::Digest as _;
    let d = sha2::Sha256::digest(name.as_bytes());
    let mut id = [0u8; 16];
    id.copy_from_slice(&d[..16]);
    id
}

impl Slots {
    /// Slots as an earlier run left them in the pinned maps: a name that comes back takes its
    /// old slot, so the maps' entries keep meaning what they meant.
    pub fn with_hints(policies: HashMap<SlotId, u32>, nodes: HashMap<SlotId, u32>) -> Self {
        Slots {
            hints_policies: policies,
            hints_nodes: nodes,
            ..Slots::default()
        }
    }

    /// Gives every name in `policies` and `nodes` a slot (keeping existing ones) and forgets
    /// the names no longer present. Returns the names that found no free slot.
    pub fn assign<'a>(
        &mut self,
        policies: impl IntoIterator<Item = &'a str>,
        nodes: impl IntoIterator<Item = &'a str>,
    ) -> Vec<String> {
        let mut full = Vec::new();
        full.extend(assign(
            &mut self.policies,
            &mut self.retired_policies,
            &mut self.hints_policies,
            policies,
            0,
            MAX_POLICIES as u32,
        ));
        full.extend(assign(
            &mut self.nodes,
            &mut self.retired_nodes,
            &mut self.hints_nodes,
            nodes,
            1,
            MAX_NODES,
        ));
        full
    }
}

fn assign<'a>(
    slots: &mut BTreeMap<String, u32>,
    retired: &mut BTreeSet<u32>,
    hints: &mut HashMap<SlotId, u32>,
    names: impl IntoIterator<Item = &'a str>,
    first: u32,
    end: u32,
) -> Vec<String> {
    let wanted: BTreeSet<&str> = names.into_iter().collect();
    // Names of an earlier run come back to their slots (first assignment after a restart).
    let mut held = BTreeSet::new();
    if !hints.is_empty() {
        for name in &wanted {
            if let Some(slot) = hints.remove(&slot_id(name))
                && slot >= first
                && slot < end
                && !slots.values().any(|s| *s == slot)
            {
                slots.insert((*name).to_owned(), slot);
            }
        }
        // Slots of names that did not come back still hold their entries until this change
        // is applied: not reused by it.
        held.extend(hints.drain().map(|(_, s)| s));
    }
    let freed: BTreeSet<u32> = slots
        .iter()
        .filter(|(n, _)| !wanted.contains(n.as_str()))
        .map(|(_, s)| *s)
        .collect();
    slots.retain(|n, _| wanted.contains(n.as_str()));
    // Slots retired by the previous call were released by the change applied since.
    let mut used: BTreeSet<u32> = slots.values().copied().collect();
    used.extend(freed.iter().copied());
    used.extend(held.iter().copied());
    let mut next = first;
    let mut full = Vec::new();
    for name in wanted {
        if slots.contains_key(name) {
            continue;
        }
        while used.contains(&next) {
            next += 1;
        }
        if next >= end {
            full.push(name.to_owned());
            continue;
        }
        used.insert(next);
        slots.insert(name.to_owned(), next);
    }
    *retired = freed;
    retired.extend(held);
    full
}

/// What went wrong compiling rules into map contents (the rest is still loaded).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub what: String,
}

/// Map contents for `policy` mode from keyd's rules for this node. `slots` must have been
/// assigned for the rules' policies and every remote node they name.
pub fn from_rules(
    rules: &NodeRules,
    local_node: &str,
    slots: &Slots,
    base: Settings,
) -> (Contents, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut c = Contents {
        settings: Settings {
            node_mode: NodeMode::Policy,
            ..base
        },
        endpoints: BTreeMap::new(),
        ports: BTreeMap::new(),
        any_port: Bits::default(),
        strict: Bits::default(),
        policies: BTreeMap::new(),
    };
    // keyd's index -> our slot.
    let mut slot_of = Vec::with_capacity(rules.policies.len());
    for p in &rules.policies {
        let Some(&slot) = slots.policies.get(&p.name) else {
            problems.push(Problem {
                what: format!("{}: no free policy slot", p.name),
            });
            slot_of.push(None);
            continue;
        };
        slot_of.push(Some(slot));
        c.policies.insert(slot, mode_code(p.mode));
        if p.strict {
            c.strict.set(slot);
        }
        if p.ports.is_empty() {
            c.any_port.set(slot);
        }
        for port in &p.ports {
            c.ports
                .entry((port.protocol.number(), port.port))
                .or_default()
                .set(slot);
        }
    }
    let to_bits = |indexes: &[u32], problems: &mut Vec<Problem>, prefix: &IpNet| {
        let mut b = Bits::default();
        for i in indexes {
            match slot_of.get(*i as usize) {
                Some(Some(slot)) => b.set(*slot),
                Some(None) => {}
                None => problems.push(Problem {
                    what: format!("{prefix}: policy index {i} is out of range"),
                }),
            }
        }
        b
    };
    for e in &rules.endpoints {
        // `::ffff:0:0/96` is where IPv4 lives in the trie: an IPv6 prefix there would take
        // IPv4 addresses.
        if let IpNet::V6(v6) = e.prefix
            && v6.addr().to_ipv4_mapped().is_some()
        {
            problems.push(Problem {
                what: format!("{}: an IPv4-mapped IPv6 prefix is not accepted", e.prefix),
            });
            continue;
        }
        let node = if e.node == local_node {
            0
        } else {
            match slots.nodes.get(&e.node) {
                Some(n) => *n,
                None => {
                    problems.push(Problem {
                        what: format!("{}: no slot for node {}", e.prefix, e.node),
                    });
                    continue;
                }
            }
        };
        let prefix = e.prefix.trunc();
        let entry = c.endpoints.entry(prefix).or_insert(Endpoint {
            node,
            ..Endpoint::default()
        });
        if entry.node != node {
            problems.push(Problem {
                what: format!(
                    "{prefix} is listed for two nodes; kept the first ({})",
                    entry.node
                ),
            });
            continue;
        }
        let sel = to_bits(&e.selected_by, &mut problems, &prefix);
        let peer = to_bits(&e.peer_of, &mut problems, &prefix);
        entry.selected.union(&sel);
        entry.peer.union(&peer);
    }
    inherit(&mut c.endpoints);
    if c.endpoints.len() > MAX_ENDPOINTS {
        problems.push(Problem {
            what: format!(
                "{} endpoints exceed the map's {MAX_ENDPOINTS}; the rest are not loaded",
                c.endpoints.len()
            ),
        });
        let keep: BTreeMap<IpNet, Endpoint> = std::mem::take(&mut c.endpoints)
            .into_iter()
            .take(MAX_ENDPOINTS)
            .collect();
        c.endpoints = keep;
    }
    if c.ports.len() > MAX_PORTS {
        problems.push(Problem {
            what: format!(
                "{} ports exceed the map's {MAX_PORTS}; the rest are not loaded",
                c.ports.len()
            ),
        });
        let keep: BTreeMap<(u8, u16), Bits> = std::mem::take(&mut c.ports)
            .into_iter()
            .take(MAX_PORTS)
            .collect();
        c.ports = keep;
    }
    (c, problems)
}

/// Map contents for `all` mode: this node's pod CIDRs and every peer's, so that the program
/// knows cross-node pod traffic and which peer it goes to.
pub fn for_all_mode(
    local_cidrs: &[IpNet],
    peers: &[(String, Vec<IpNet>)],
    slots: &Slots,
    base: Settings,
) -> Contents {
    let mut endpoints = BTreeMap::new();
    for (name, cidrs) in peers {
        if let Some(n) = slots.nodes.get(name) {
            for c in cidrs {
                endpoints.entry(c.trunc()).or_insert(Endpoint {
                    node: *n,
                    ..Endpoint::default()
                });
            }
        }
    }
    // Our own last: a peer claiming our CIDR does not take it.
    for c in local_cidrs {
        endpoints.insert(c.trunc(), Endpoint::default());
    }
    Contents {
        settings: Settings {
            node_mode: NodeMode::All,
            ..base
        },
        endpoints,
        ports: BTreeMap::new(),
        any_port: Bits::default(),
        strict: Bits::default(),
        policies: BTreeMap::new(),
    }
}

/// The trie answers with the longest matching prefix only, so every entry carries the sets of
/// the shorter entries that contain it (an address's sets are the union over every prefix
/// containing it).
fn inherit(endpoints: &mut BTreeMap<IpNet, Endpoint>) {
    let containers: HashMap<IpNet, Endpoint> = endpoints
        .iter()
        .filter(|(p, _)| p.prefix_len() < p.max_prefix_len())
        .map(|(p, e)| (*p, *e))
        .collect();
    if containers.is_empty() {
        return;
    }
    for (prefix, e) in endpoints.iter_mut() {
        for len in (0..prefix.prefix_len()).rev() {
            let Ok(outer) = IpNet::new(prefix.addr(), len) else {
                continue;
            };
            if let Some(c) = containers.get(&outer.trunc()) {
                e.selected.union(&c.selected);
                e.peer.union(&c.peer);
            }
        }
    }
}

/// One change to the maps.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapOp {
    Settings(Settings),
    Policy { slot: u32, mode: u32 },
    PolicySets { any_port: Bits, strict: Bits },
    PortSet { proto: u8, port: u16, bits: Bits },
    PortDel { proto: u8, port: u16 },
    EndpointSet { prefix: IpNet, value: Endpoint },
    EndpointDel { prefix: IpNet },
    NodeReady { slot: u32, flags: u32 },
}

/// The changes from `have` (`None`: empty maps) to `want`, in an order that never lets a packet
/// be judged by a half-applied change: a new policy's mode is written before anything points at
/// it; additions and updates come before removals; settings last when switching a mode on, first
/// when switching it off.
pub fn diff(have: Option<&Contents>, want: &Contents) -> Vec<MapOp> {
    let empty = Contents {
        settings: Settings {
            node_mode: NodeMode::Off,
            ..want.settings
        },
        endpoints: BTreeMap::new(),
        ports: BTreeMap::new(),
        any_port: Bits::default(),
        strict: Bits::default(),
        policies: BTreeMap::new(),
    };
    let have = have.unwrap_or(&empty);
    let mut ops = Vec::new();
    let settings_changed = have.settings != want.settings;
    let turning_off = want.settings.node_mode == NodeMode::Off;
    if settings_changed && turning_off {
        ops.push(MapOp::Settings(want.settings));
    }
    for (slot, mode) in &want.policies {
        if have.policies.get(slot) != Some(mode) {
            ops.push(MapOp::Policy {
                slot: *slot,
                mode: *mode,
            });
        }
    }
    // Widening first: the union of old and new port and strict sets, so that while the
    // endpoints change no covered packet finds its port or strictness missing.
    let mut widened_any = have.any_port;
    widened_any.union(&want.any_port);
    let mut widened_strict = have.strict;
    widened_strict.union(&want.strict);
    let sets_change = have.any_port != want.any_port || have.strict != want.strict;
    if sets_change {
        ops.push(MapOp::PolicySets {
            any_port: widened_any,
            strict: widened_strict,
        });
    }
    for ((proto, port), bits) in &want.ports {
        let mut b = *bits;
        if let Some(old) = have.ports.get(&(*proto, *port)) {
            if old == bits {
                continue;
            }
            b.union(old);
        }
        ops.push(MapOp::PortSet {
            proto: *proto,
            port: *port,
            bits: b,
        });
    }
    for (prefix, value) in &want.endpoints {
        if have.endpoints.get(prefix) != Some(value) {
            ops.push(MapOp::EndpointSet {
                prefix: *prefix,
                value: *value,
            });
        }
    }
    for prefix in have.endpoints.keys() {
        if !want.endpoints.contains_key(prefix) {
            ops.push(MapOp::EndpointDel { prefix: *prefix });
        }
    }
    // Then narrow to exactly the new sets.
    for ((proto, port), bits) in &want.ports {
        if let Some(old) = have.ports.get(&(*proto, *port))
            && old != bits
            && (*old | *bits) != *bits
        {
            ops.push(MapOp::PortSet {
                proto: *proto,
                port: *port,
                bits: *bits,
            });
        }
    }
    for (proto, port) in have.ports.keys() {
        if !want.ports.contains_key(&(*proto, *port)) {
            ops.push(MapOp::PortDel {
                proto: *proto,
                port: *port,
            });
        }
    }
    if sets_change && (widened_any != want.any_port || widened_strict != want.strict) {
        ops.push(MapOp::PolicySets {
            any_port: want.any_port,
            strict: want.strict,
        });
    }
    if settings_changed && !turning_off {
        ops.push(MapOp::Settings(want.settings));
    }
    ops
}

impl std::ops::BitOr for Bits {
    type Output = Bits;
    fn bitor(mut self, rhs: Bits) -> Bits {
        self.union(&rhs);
        self
    }
}

/// The readiness flags of each node slot, from what the reconciler programmed: a node is ready
/// for a mode when the tunnel to it is programmed in the kernel (see `reconcile::readiness`).
pub fn readiness_ops(have: &BTreeMap<u32, u32>, want: &BTreeMap<u32, u32>) -> Vec<MapOp> {
    let mut ops = Vec::new();
    for (slot, flags) in want {
        if have.get(slot) != Some(flags) {
            ops.push(MapOp::NodeReady {
                slot: *slot,
                flags: *flags,
            });
        }
    }
    for slot in have.keys() {
        if !want.contains_key(slot) {
            ops.push(MapOp::NodeReady {
                slot: *slot,
                flags: 0,
            });
        }
    }
    ops
}

/// The key of `keyd_endpoints`: IPv4 as `::ffff:a.b.c.d` (prefix length + 96), so one trie
/// holds both families.
pub fn lpm_key(prefix: &IpNet) -> (u32, [u8; 16]) {
    match prefix.addr() {
        IpAddr::V4(a) => (
            u32::from(prefix.prefix_len()) + 96,
            a.to_ipv6_mapped().octets(),
        ),
        IpAddr::V6(a) => (u32::from(prefix.prefix_len()), a.octets()),
    }
}

#[cfg(test)]
mod tests;
