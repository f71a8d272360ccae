//! The eBPF steering program (`bpf/steer.c`, compiled by build.rs) in the kernel: loading it
//! with aya, attaching it to the ingress of the devices local pods send on, writing its maps in
//! place and reading its per-CPU counters. What goes into the maps is decided by the pure
//! [`crate::steering`]; this module only encodes it (the byte layouts mirror steer.c's structs).
//!
//! Attachment uses TCX links on kernels that have them (6.6 and later) and classic `cls_bpf`
//! filters over netlink on older ones (Debian 12's 6.1). With a pin directory on a bpffs, the
//! maps and TCX links are pinned there and netlink filters stay in the kernel when node-shim
//! exits, so a restart neither empties the maps nor leaves a moment without the program: the new
//! program replaces the old one atomically (TCX) or is attached beside it before the old filter
//! goes (netlink).

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::{Path, PathBuf};

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{Array, HashMap as BpfHashMap, Map, MapData, MapError, PerCpuArray};
use aya::programs::links::{FdLink, LinkError, PinnedLink};
use aya::programs::tc::{NlOptions, SchedClassifierLink, TcAttachOptions, TcHandle};
use aya::programs::{LinkOrder, ProgramError, SchedClassifier, TcAttachType};
use aya::{EbpfLoader, VerifierLogLevel};
use ipnet::IpNet;

use crate::steering::{
    Bits, Endpoint, MAX_NODES, MAX_POLICIES, MapOp, NodeMode, Settings, SlotId, WORDS, mode_code,
};

/// The object build.rs compiled from bpf/steer.c.
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/steer.o"));

/// Where a program of steer.c runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Hook {
    /// Ingress of a device local pods send on: `keyd_steer` marks covered packets before
    /// routing.
    PodIngress,
    /// Egress of the underlay: `keyd_guard` drops covered packets that are still in the clear
    /// after routing, NAT and XFRM.
    UnderlayEgress,
}

impl Hook {
    const ALL: [Hook; 2] = [Hook::PodIngress, Hook::UnderlayEgress];

    fn program(self) -> &'static str {
        match self {
            Hook::PodIngress => "keyd_steer",
            Hook::UnderlayEgress => "keyd_guard",
        }
    }

    fn attach_type(self) -> TcAttachType {
        match self {
            Hook::PodIngress => TcAttachType::Ingress,
            Hook::UnderlayEgress => TcAttachType::Egress,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Hook::PodIngress => "ingress",
            Hook::UnderlayEgress => "egress",
        }
    }
}

const ENDPOINT_SIZE: usize = 8 + 2 * WORDS * 8;
type EndpointBytes = [u8; ENDPOINT_SIZE];
type BitsBytes = [u64; WORDS];

/// id -> slot, as read back from `keyd_policy_ids` or `keyd_node_ids`.
pub type SlotIds = HashMap<SlotId, u32>;

/// How the program is attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachMode {
    /// TCX where the kernel has it (6.6+), netlink otherwise.
    Auto,
    Tcx,
    Netlink,
}

#[derive(Debug, Clone)]
pub struct EbpfSettings {
    pub attach: AttachMode,
    /// Where maps and TCX links are pinned (a bpffs folder); `None`: nothing is pinned and
    /// everything goes with the process.
    pub pin_dir: Option<PathBuf>,
    /// The cls_bpf priority of netlink attachments; a restart attaches at the other one of
    /// `priority` and `priority + 1` before removing the old filter.
    pub priority: u16,
}

#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    #[error("loading the eBPF object failed")]
    Load(#[source] aya::EbpfError),
    #[error("the kernel refused the eBPF program {program}: {io}\nverifier log:\n{log}")]
    Verifier {
        program: &'static str,
        io: std::io::Error,
        log: String,
    },
    #[error("eBPF program {what}")]
    Program {
        what: String,
        #[source]
        source: ProgramError,
    },
    #[error("eBPF map {map}: {what}")]
    Map {
        map: &'static str,
        what: String,
        #[source]
        source: Option<MapError>,
    },
    #[error("attaching to {device} failed")]
    Attach {
        device: String,
        #[source]
        source: ProgramError,
    },
    #[error("pinning under {path} failed: {message}")]
    Pin { path: String, message: String },
}

/// Counters of one slot, summed over CPUs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub encrypted_packets: u64,
    pub encrypted_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub clear_packets: u64,
    pub clear_bytes: u64,
}

/// How one device has the program.
#[derive(Debug)]
enum Attachment {
    /// Owned by this process (no pin directory): detached when dropped.
    Owned(SchedClassifierLink),
    /// Pinned TCX link.
    Pinned(PinnedLink),
    /// A netlink filter left in the kernel on purpose, at this priority.
    Netlink { priority: u16 },
}

pub struct Steering {
    bpf: aya::Ebpf,
    settings: EbpfSettings,
    endpoints: LpmTrie<MapData, [u8; 16], EndpointBytes>,
    ports: BpfHashMap<MapData, [u8; 4], BitsBytes>,
    sets: Array<MapData, BitsBytes>,
    policies: Array<MapData, [u32; 2]>,
    nodes: Array<MapData, u32>,
    config: Array<MapData, [u32; 6]>,
    counters: PerCpuArray<MapData, [u64; 6]>,
    policy_ids: Array<MapData, SlotId>,
    node_ids: Array<MapData, SlotId>,
    attached: BTreeMap<(String, Hook), Attachment>,
    /// The maps were created by this load (nothing was pinned for this layout).
    fresh_maps: bool,
    /// Pinned maps of another layout (an earlier version's), to remove once the programs use
    /// the new ones.
    stale_pins: Vec<PathBuf>,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("attached", &self.attached.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

const MAPS: [&str; 9] = [
    "keyd_endpoints",
    "keyd_ports",
    "keyd_policy_sets",
    "keyd_policies",
    "keyd_nodes",
    "keyd_settings",
    "keyd_counters",
    "keyd_policy_ids",
    "keyd_node_ids",
];

/// Bump when a map's meaning changes while its sizes stay the same (sizes, types and entry
/// counts are in [`map_layout`] already).
const LAYOUT_REVISION: u32 = 1;

/// A name for the layout of the object's maps: their names, types, key and value sizes, entry
/// counts and flags, and [`LAYOUT_REVISION`]. Pinned maps live in `maps-<layout>` under the pin
/// directory, so a node-shim whose maps differ from an earlier version's never reuses (and
/// misreads) that version's pinned maps.
pub fn map_layout() -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(LAYOUT_REVISION.to_le_bytes());
    match aya_obj::Object::parse(OBJECT) {
        Ok(obj) => {
            for name in MAPS {
                h.update(name.as_bytes());
                if let Some(m) = obj.maps.get(name) {
                    for v in [
                        m.map_type(),
                        m.key_size(),
                        m.value_size(),
                        m.max_entries(),
                        m.map_flags(),
                    ] {
                        h.update(v.to_le_bytes());
                    }
                }
            }
        }
        // Unparsable here means the load fails anyway; any stable name will do.
        Err(_) => h.update(OBJECT),
    }
    hex::encode(&h.finalize()[..8])
}

impl Steering {
    /// Loads the program (reporting the verifier's log if the kernel refuses it) and opens or
    /// creates its maps (pinned ones of the same layout are reused, with what they hold).
    pub fn load(settings: EbpfSettings) -> Result<Self, EbpfError> {
        let mut loader = EbpfLoader::new();
        loader.verifier_log_level(VerifierLogLevel::DEBUG | VerifierLogLevel::STATS);
        let mut fresh_maps = true;
        let mut stale_pins = Vec::new();
        if let Some(dir) = &settings.pin_dir {
            let pin_err = |e: std::io::Error| EbpfError::Pin {
                path: dir.display().to_string(),
                message: e.to_string(),
            };
            let maps_dir = dir.join(format!("maps-{}", map_layout()));
            fresh_maps = !maps_dir.exists();
            std::fs::create_dir_all(&maps_dir).map_err(pin_err)?;
            for entry in std::fs::read_dir(dir).map_err(pin_err)? {
                let path = entry.map_err(pin_err)?.path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                // Another layout's folder, or maps pinned straight in the folder (before
                // layouts had folders).
                if (name.starts_with("maps-") && path != maps_dir) || MAPS.contains(&name) {
                    stale_pins.push(path);
                }
            }
            for m in MAPS {
                loader.map_pin_path(m, maps_dir.join(m));
            }
        }
        let mut bpf = loader.load(OBJECT).map_err(EbpfError::Load)?;
        for hook in Hook::ALL {
            let prog = program(&mut bpf, hook)?;
            if let Err(e) = prog.load() {
                return Err(match e {
                    ProgramError::LoadError {
                        io_error,
                        verifier_log,
                    } => EbpfError::Verifier {
                        program: hook.program(),
                        io: io_error,
                        log: verifier_log.to_string(),
                    },
                    other => EbpfError::Program {
                        what: format!("{}: load", hook.program()),
                        source: other,
                    },
                });
            }
        }
        let mut take = |name: &'static str| -> Result<Map, EbpfError> {
            bpf.take_map(name).ok_or(EbpfError::Map {
                map: name,
                what: "missing from the object".into(),
                source: None,
            })
        };
        let wrong = |map: &'static str| {
            move |e: MapError| EbpfError::Map {
                map,
                what: "has another layout than node-shim expects".into(),
                source: Some(e),
            }
        };
        let endpoints =
            LpmTrie::try_from(take("keyd_endpoints")?).map_err(wrong("keyd_endpoints"))?;
        let ports = BpfHashMap::try_from(take("keyd_ports")?).map_err(wrong("keyd_ports"))?;
        let sets = Array::try_from(take("keyd_policy_sets")?).map_err(wrong("keyd_policy_sets"))?;
        let policies = Array::try_from(take("keyd_policies")?).map_err(wrong("keyd_policies"))?;
        let nodes = Array::try_from(take("keyd_nodes")?).map_err(wrong("keyd_nodes"))?;
        let config = Array::try_from(take("keyd_settings")?).map_err(wrong("keyd_settings"))?;
        let counters =
            PerCpuArray::try_from(take("keyd_counters")?).map_err(wrong("keyd_counters"))?;
        let policy_ids =
            Array::try_from(take("keyd_policy_ids")?).map_err(wrong("keyd_policy_ids"))?;
        let node_ids = Array::try_from(take("keyd_node_ids")?).map_err(wrong("keyd_node_ids"))?;
        // The constant sets the program reads when a packet has no ports or a port no policy
        // names (steer.c's SET_NONE and SET_ALL).
        let mut sets = sets;
        sets.set(2, [0; WORDS], 0)
            .map_err(wrong("keyd_policy_sets"))?;
        sets.set(3, [u64::MAX; WORDS], 0)
            .map_err(wrong("keyd_policy_sets"))?;
        Ok(Self {
            bpf,
            settings,
            endpoints,
            ports,
            sets,
            policies,
            nodes,
            config,
            counters,
            policy_ids,
            node_ids,
            attached: BTreeMap::new(),
            fresh_maps,
            stale_pins,
        })
    }

    /// Whether this load created the maps, and pinned maps of another layout remain: the
    /// programs attached now (an earlier version's) still use those, so attaching the new
    /// programs should wait until the new maps hold the rules.
    pub fn replaces_another_layout(&self) -> bool {
        self.fresh_maps && !self.stale_pins.is_empty()
    }

    /// Removes the pins of other layouts (the maps go once no program uses them).
    pub fn remove_stale_pins(&mut self) {
        for p in std::mem::take(&mut self.stale_pins) {
            let r = if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            };
            match r {
                Ok(()) => {
                    tracing::info!(path = %p.display(), "removed the pinned maps of an earlier layout")
                }
                Err(e) => {
                    tracing::warn!(path = %p.display(), error = %e, "cannot remove old pinned maps")
                }
            }
        }
    }

    /// Instructions the verifier processed for a program (its cost to verify).
    pub fn verified_instructions(&mut self, hook: Hook) -> Option<u32> {
        let prog = program(&mut self.bpf, hook).ok()?;
        prog.info().ok()?.verified_instruction_count()
    }

    /// The devices and hooks the programs are attached to.
    pub fn attached(&self) -> impl Iterator<Item = (&str, Hook)> {
        self.attached.keys().map(|(d, h)| (d.as_str(), *h))
    }

    /// Attaches the hook's program to `device` (no-op if this process attached it already).
    /// It goes first among the device's TCX programs (a program ahead of it that passes or
    /// redirects would end the chain before it runs).
    pub fn attach(&mut self, device: &str, hook: Hook) -> Result<(), EbpfError> {
        if self.attached.contains_key(&(device.to_owned(), hook)) {
            return Ok(());
        }
        let use_tcx = match self.settings.attach {
            AttachMode::Tcx => true,
            AttachMode::Netlink => false,
            AttachMode::Auto => tcx_supported(),
        };
        let attachment = if use_tcx {
            self.attach_tcx(device, hook)?
        } else {
            self.attach_netlink(device, hook)?
        };
        self.attached.insert((device.to_owned(), hook), attachment);
        Ok(())
    }

    fn link_pin(&self, device: &str, hook: Hook) -> Option<PathBuf> {
        self.settings
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link-{device}-{}", hook.as_str())))
    }

    fn attach_tcx(&mut self, device: &str, hook: Hook) -> Result<Attachment, EbpfError> {
        let pin = self.link_pin(device, hook);
        let attach_err = |source| EbpfError::Attach {
            device: device.to_owned(),
            source,
        };
        let prog = program(&mut self.bpf, hook)?;
        // A pinned link of an earlier run: replace its program atomically.
        let previous = match &pin {
            Some(p) => match PinnedLink::from_pin(p) {
                Ok(old) => Some(old),
                Err(LinkError::SyscallError(e))
                    if e.io_error.kind() == std::io::ErrorKind::NotFound =>
                {
                    None
                }
                Err(e) => {
                    return Err(EbpfError::Pin {
                        path: p.display().to_string(),
                        message: e.to_string(),
                    });
                }
            },
            None => None,
        };
        let id = match previous {
            Some(old) => {
                let link: SchedClassifierLink =
                    FdLink::from(old)
                        .try_into()
                        .map_err(|e: LinkError| EbpfError::Pin {
                            path: device.to_owned(),
                            message: e.to_string(),
                        })?;
                prog.attach_to_link(link).map_err(attach_err)?
            }
            None => prog
                .attach_with_options(
                    device,
                    hook.attach_type(),
                    TcAttachOptions::TcxOrder(LinkOrder::first()),
                )
                .map_err(attach_err)?,
        };
        let link = prog.take_link(id).map_err(attach_err)?;
        match pin {
            None => Ok(Attachment::Owned(link)),
            Some(p) => {
                let fd: FdLink = link.try_into().map_err(|e: LinkError| EbpfError::Pin {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?;
                // Replacing a pinned link keeps its pin; pin only a new one.
                if p.exists() {
                    let _ = std::fs::remove_file(&p);
                }
                let pinned = fd.pin(&p).map_err(|e| EbpfError::Pin {
                    path: p.display().to_string(),
                    message: e.to_string(),
                })?;
                Ok(Attachment::Pinned(pinned))
            }
        }
    }

    fn attach_netlink(&mut self, device: &str, hook: Hook) -> Result<Attachment, EbpfError> {
        let attach_err = |source| EbpfError::Attach {
            device: device.to_owned(),
            source,
        };
        if let Err(e) = aya::programs::tc::qdisc_add_clsact(device) {
            // EEXIST: the qdisc is there already.
            let exists = matches!(&e, aya::programs::tc::TcError::NetlinkError(n)
                if n.raw_os_error() == Some(17));
            if !exists {
                return Err(attach_err(ProgramError::from(e)));
            }
        }
        let persist = self.settings.pin_dir.is_some();
        let base = self.settings.priority;
        let prog = program(&mut self.bpf, hook)?;
        let mut attached_at = None;
        let mut last_err = None;
        for priority in [base, base.wrapping_add(1)] {
            match prog.attach_with_options(
                device,
                hook.attach_type(),
                TcAttachOptions::Netlink(NlOptions {
                    priority,
                    handle: TcHandle::new(0, 1),
                    classid: None,
                }),
            ) {
                Ok(id) => {
                    attached_at = Some((priority, id));
                    break;
                }
                // A filter of an earlier run holds this priority: use the other one.
                Err(e) => last_err = Some(e),
            }
        }
        let Some((priority, id)) = attached_at else {
            return Err(attach_err(
                last_err.unwrap_or(ProgramError::AlreadyAttached),
            ));
        };
        let link = prog.take_link(id).map_err(attach_err)?;
        // The earlier run's filter at the other priority goes now that ours is in place.
        let other = if priority == base {
            base.wrapping_add(1)
        } else {
            base
        };
        if let Ok(old) = SchedClassifierLink::attached(
            device,
            hook.attach_type(),
            other,
            TcHandle::new(0, 1),
            None,
        ) {
            drop(old);
        }
        if persist {
            // Leave the filter in the kernel when this process exits.
            std::mem::forget(link);
            Ok(Attachment::Netlink { priority })
        } else {
            Ok(Attachment::Owned(link))
        }
    }

    /// Detaches the hook's program from `device` (also a pinned or persistent attachment).
    pub fn detach(&mut self, device: &str, hook: Hook) {
        match self.attached.remove(&(device.to_owned(), hook)) {
            Some(Attachment::Pinned(p)) => {
                let _ = p.unpin();
            }
            Some(Attachment::Netlink { priority }) => {
                if let Ok(l) = SchedClassifierLink::attached(
                    device,
                    hook.attach_type(),
                    priority,
                    TcHandle::new(0, 1),
                    None,
                ) {
                    drop(l);
                }
            }
            Some(Attachment::Owned(l)) => drop(l),
            None => {}
        }
    }

    /// Forgets a device that went away (its attachments went with it).
    pub fn forget(&mut self, device: &str) {
        for hook in Hook::ALL {
            if let Some(Attachment::Pinned(p)) = self.attached.remove(&(device.to_owned(), hook)) {
                let _ = p.unpin();
            }
        }
    }

    /// Applies map changes in order; stops at the first failure.
    pub fn apply(&mut self, ops: &[MapOp]) -> Result<(), EbpfError> {
        for op in ops {
            self.apply_one(op)?;
        }
        Ok(())
    }

    fn apply_one(&mut self, op: &MapOp) -> Result<(), EbpfError> {
        let fail = |map: &'static str, what: String| {
            move |e: MapError| EbpfError::Map {
                map,
                what,
                source: Some(e),
            }
        };
        match op {
            MapOp::Settings(s) => self
                .config
                .set(0, encode_settings(s), 0)
                .map_err(fail("keyd_settings", "write".into())),
            MapOp::Policy { slot, mode } => self
                .policies
                .set(*slot, [*mode, 0], 0)
                .map_err(fail("keyd_policies", format!("slot {slot}"))),
            MapOp::PolicySets { any_port, strict } => {
                self.sets
                    .set(0, any_port.0, 0)
                    .map_err(fail("keyd_policy_sets", "any-port set".into()))?;
                self.sets
                    .set(1, strict.0, 0)
                    .map_err(fail("keyd_policy_sets", "strict set".into()))
            }
            MapOp::PortSet { proto, port, bits } => self
                .ports
                .insert(port_key(*proto, *port), bits.0, 0)
                .map_err(fail("keyd_ports", format!("{proto}/{port}"))),
            MapOp::PortDel { proto, port } => {
                ignore_missing(self.ports.remove(&port_key(*proto, *port)))
                    .map_err(fail("keyd_ports", format!("remove {proto}/{port}")))
            }
            MapOp::EndpointSet { prefix, value } => self
                .endpoints
                .insert(&trie_key(prefix), encode_endpoint(value), 0)
                .map_err(fail("keyd_endpoints", prefix.to_string())),
            MapOp::EndpointDel { prefix } => {
                ignore_missing(self.endpoints.remove(&trie_key(prefix)))
                    .map_err(fail("keyd_endpoints", format!("remove {prefix}")))
            }
            MapOp::NodeReady { slot, flags } => self
                .nodes
                .set(*slot, *flags, 0)
                .map_err(fail("keyd_nodes", format!("slot {slot}"))),
        }
    }

    /// What the maps hold now (after a restart with pinned maps: what the last run left), for
    /// the first diff. Node readiness is read separately ([`Steering::node_flags`]).
    pub fn read(&self) -> Result<crate::steering::Contents, EbpfError> {
        let rd = |map: &'static str| {
            move |e: MapError| EbpfError::Map {
                map,
                what: "read".into(),
                source: Some(e),
            }
        };
        let cfg = self.config.get(&0, 0).map_err(rd("keyd_settings"))?;
        let settings = decode_settings(&cfg);
        let mut endpoints = BTreeMap::new();
        for item in self.endpoints.iter() {
            let (k, v) = item.map_err(rd("keyd_endpoints"))?;
            if let Some(prefix) = prefix_of(&k) {
                endpoints.insert(prefix, decode_endpoint(&v));
            }
        }
        let mut ports = BTreeMap::new();
        for item in self.ports.iter() {
            let (k, v) = item.map_err(rd("keyd_ports"))?;
            ports.insert((k[0], u16::from_ne_bytes([k[2], k[3]])), Bits(v));
        }
        let any_port = Bits(self.sets.get(&0, 0).map_err(rd("keyd_policy_sets"))?);
        let strict = Bits(self.sets.get(&1, 0).map_err(rd("keyd_policy_sets"))?);
        let mut policies = BTreeMap::new();
        for slot in 0..MAX_POLICIES as u32 {
            let [mode, _] = self.policies.get(&slot, 0).map_err(rd("keyd_policies"))?;
            if mode != 0 {
                policies.insert(slot, mode);
            }
        }
        Ok(crate::steering::Contents {
            settings,
            endpoints,
            ports,
            any_port,
            strict,
            policies,
        })
    }

    /// Readiness flags of the node slots below `end` that are not zero.
    pub fn node_flags(&self, end: u32) -> Result<BTreeMap<u32, u32>, EbpfError> {
        let mut out = BTreeMap::new();
        for slot in 0..end {
            let f = self.nodes.get(&slot, 0).map_err(|e| EbpfError::Map {
                map: "keyd_nodes",
                what: "read".into(),
                source: Some(e),
            })?;
            if f != 0 {
                out.insert(slot, f);
            }
        }
        Ok(out)
    }

    /// Who holds each policy and node slot, as written by [`Steering::write_slot_ids`] (of an
    /// earlier run, with pinned maps): id -> slot, for [`crate::steering::Slots::with_hints`].
    pub fn read_slot_ids(&self) -> Result<(SlotIds, SlotIds), EbpfError> {
        let read = |map: &Array<MapData, SlotId>, name: &'static str, end: u32| {
            let mut out = HashMap::new();
            for slot in 0..end {
                let id = map.get(&slot, 0).map_err(|e| EbpfError::Map {
                    map: name,
                    what: "read".into(),
                    source: Some(e),
                })?;
                if id != [0; 16] {
                    out.insert(id, slot);
                }
            }
            Ok(out)
        };
        Ok((
            read(&self.policy_ids, "keyd_policy_ids", MAX_POLICIES as u32)?,
            read(&self.node_ids, "keyd_node_ids", MAX_NODES)?,
        ))
    }

    /// Records who holds policy (`nodes: false`) or node slots; a zero id frees one.
    pub fn write_slot_ids(&mut self, nodes: bool, ids: &[(u32, SlotId)]) -> Result<(), EbpfError> {
        let (map, name) = if nodes {
            (&mut self.node_ids, "keyd_node_ids")
        } else {
            (&mut self.policy_ids, "keyd_policy_ids")
        };
        for (slot, id) in ids {
            map.set(*slot, *id, 0).map_err(|e| EbpfError::Map {
                map: name,
                what: format!("slot {slot}"),
                source: Some(e),
            })?;
        }
        Ok(())
    }

    /// Zeroes one slot's counters on every CPU (a slot given to another policy).
    pub fn reset_counters(&mut self, slot: u32) -> Result<(), EbpfError> {
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| EbpfError::Map {
            map: "keyd_counters",
            what: format!("counting CPUs: {e}"),
            source: None,
        })?;
        let zeros = aya::maps::PerCpuValues::try_from(vec![[0u64; 6]; cpus]).map_err(|e| {
            EbpfError::Map {
                map: "keyd_counters",
                what: format!("slot {slot}"),
                source: Some(MapError::from(e)),
            }
        })?;
        self.counters
            .set(slot, zeros, 0)
            .map_err(|e| EbpfError::Map {
                map: "keyd_counters",
                what: format!("reset slot {slot}"),
                source: Some(e),
            })
    }

    /// One slot's counters, summed over CPUs.
    pub fn counters(&self, slot: u32) -> Result<Counters, EbpfError> {
        let values = self.counters.get(&slot, 0).map_err(|e| EbpfError::Map {
            map: "keyd_counters",
            what: format!("slot {slot}"),
            source: Some(e),
        })?;
        let mut sum = [0u64; 6];
        for cpu in values.iter() {
            for (s, v) in sum.iter_mut().zip(cpu) {
                *s = s.wrapping_add(*v);
            }
        }
        Ok(Counters {
            encrypted_packets: sum[0],
            encrypted_bytes: sum[1],
            dropped_packets: sum[2],
            dropped_bytes: sum[3],
            clear_packets: sum[4],
            clear_bytes: sum[5],
        })
    }
}

/// The names of this network namespace's links, and the one holding `address` (the underlay).
pub fn link_names(
    address: IpAddr,
) -> Result<(Vec<String>, Option<String>), crate::kernel::KernelError> {
    let mut sock = route_socket()?;
    let links = crate::kernel::route::links(&mut sock)?;
    let underlay = crate::kernel::route::link_with_address(&mut sock, address)?
        .and_then(|i| links.iter().find(|(j, _)| *j == i).map(|(_, n)| n.clone()));
    Ok((links.into_iter().map(|(_, n)| n).collect(), underlay))
}

/// Policy routing for WireGuard-steered packets (see `route::ensure_mark_rules`).
pub fn ensure_mark_rules(
    mark: u32,
    mask: u32,
    table: u32,
    priority: u32,
) -> Result<(), crate::kernel::KernelError> {
    let mut sock = route_socket()?;
    crate::kernel::route::ensure_mark_rules(&mut sock, mark, mask, table, priority)
}

fn route_socket() -> Result<crate::kernel::nl::NlSocket, crate::kernel::KernelError> {
    crate::kernel::nl::NlSocket::open_for(netlink_sys::protocols::NETLINK_ROUTE, "route")
}

fn program(bpf: &mut aya::Ebpf, hook: Hook) -> Result<&mut SchedClassifier, EbpfError> {
    let name = hook.program();
    let p = bpf.program_mut(name).ok_or_else(|| EbpfError::Map {
        map: "program",
        what: format!("{name} is missing from the object"),
        source: None,
    })?;
    p.try_into().map_err(|source| EbpfError::Program {
        what: format!("{name} is not a tc classifier"),
        source,
    })
}

/// TCX links exist from Linux 6.6.
fn tcx_supported() -> bool {
    aya::util::KernelVersion::current()
        .map(|v| v >= aya::util::KernelVersion::new(6, 6, 0))
        .unwrap_or(false)
}

fn ignore_missing(r: Result<(), MapError>) -> Result<(), MapError> {
    match r {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(2) => Ok(()),
        other => other,
    }
}

fn trie_key(prefix: &IpNet) -> Key<[u8; 16]> {
    let (len, addr) = crate::steering::lpm_key(prefix);
    Key::new(len, addr)
}

fn prefix_of(k: &Key<[u8; 16]>) -> Option<IpNet> {
    let addr = std::net::Ipv6Addr::from(k.data());
    let len = u8::try_from(k.prefix_len()).ok()?;
    match addr.to_ipv4_mapped() {
        Some(v4) if len >= 96 => IpNet::new(IpAddr::V4(v4), len - 96).ok(),
        _ => IpNet::new(IpAddr::V6(addr), len).ok(),
    }
}

fn port_key(proto: u8, port: u16) -> [u8; 4] {
    let p = port.to_ne_bytes();
    [proto, 0, p[0], p[1]]
}

fn encode_endpoint(e: &Endpoint) -> EndpointBytes {
    let mut b = [0u8; ENDPOINT_SIZE];
    b[..4].copy_from_slice(&e.node.to_ne_bytes());
    for (i, w) in e.selected.0.iter().chain(e.peer.0.iter()).enumerate() {
        b[8 + i * 8..16 + i * 8].copy_from_slice(&w.to_ne_bytes());
    }
    b
}

fn decode_endpoint(b: &EndpointBytes) -> Endpoint {
    let word = |i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[8 + i * 8..16 + i * 8]);
        u64::from_ne_bytes(w)
    };
    let mut e = Endpoint {
        node: u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        ..Endpoint::default()
    };
    for i in 0..WORDS {
        e.selected.0[i] = word(i);
        e.peer.0[i] = word(WORDS + i);
    }
    e
}

fn encode_settings(s: &Settings) -> [u32; 6] {
    [
        s.node_mode as u32,
        mode_code(s.all_mode),
        u32::from(s.all_strict),
        s.marks.mask,
        s.marks.wireguard,
        s.marks.ipsec,
    ]
}

fn decode_settings(v: &[u32; 6]) -> Settings {
    Settings {
        node_mode: match v[0] {
            1 => NodeMode::All,
            2 => NodeMode::Policy,
            _ => NodeMode::Off,
        },
        all_mode: if v[1] == 2 {
            keyd_proto::EncryptionMode::Ipsec
        } else {
            keyd_proto::EncryptionMode::Wireguard
        },
        all_strict: v[2] != 0,
        marks: crate::steering::Marks {
            mask: v[3],
            wireguard: v[4],
            ipsec: v[5],
        },
    }
}

/// Whether `path` (or the nearest existing folder above it) is on a bpffs, which pinning needs.
pub fn is_bpffs(path: &Path) -> bool {
    let mut p = path.to_path_buf();
    while !p.exists() {
        if !p.pop() {
            return false;
        }
    }
    nix::sys::statfs::statfs(&p)
        .map(|s| s.filesystem_type() == nix::sys::statfs::BPF_FS_MAGIC)
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_and_key_encodings_round_trip() {
        let mut e = Endpoint {
            node: 7,
            ..Endpoint::default()
        };
        e.selected.set(3);
        e.peer.set(1023);
        assert_eq!(decode_endpoint(&encode_endpoint(&e)), e);
        for p in ["10.2.0.0/24", "10.2.0.7/32", "fd00:1::/64", "fd00::5/128"] {
            let net: IpNet = p.parse().unwrap();
            assert_eq!(prefix_of(&trie_key(&net)), Some(net), "{p}");
        }
        assert_eq!(port_key(6, 5432)[0], 6);
    }

    #[test]
    fn the_object_holds_the_program_and_its_maps() {
        let obj = aya_obj_names(OBJECT);
        for hook in Hook::ALL {
            assert!(obj.contains(hook.program()), "{hook:?} missing");
        }
        for m in MAPS {
            assert!(obj.contains(m), "{m} missing");
        }
    }

    /// The names in the object's string table (enough to see the build embedded steer.o).
    fn aya_obj_names(bytes: &[u8]) -> String {
        String::from_utf8_lossy(bytes).into_owned()
    }
}
