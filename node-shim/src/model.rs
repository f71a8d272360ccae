//! The kernel objects node-shim owns, as plain data: what the reconciler wants ([`Desired`]),
//! what the kernel holds ([`Observed`]) and the changes between them ([`Op`]).
//!
//! Secrets appear only inside [`Key32`] and [`SecretBytes`], whose `Debug` is redacted, so every
//! type here may be printed. Observed objects carry a [`Fingerprint`] of their key instead of the
//! key itself (except the WireGuard private key, which node-shim adopts after a restart).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};

use ipnet::IpNet;
use keyd_proto::SecretBytes;

use crate::secret::{Fingerprint, Key32, PublicKey};

/// An XFRM mark: matches when `skb.mark & mask == value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

/// What identifies an ESP state in the kernel: destination, SPI and mark (the source is kept
/// because deleting a state names it too, and it makes states readable).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StateId {
    pub src: IpAddr,
    pub dst: IpAddr,
    pub spi: u32,
    pub mark: Option<Mark>,
}

impl fmt::Display for StateId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}->{} spi {}", self.src, self.dst, self.spi)?;
        if let Some(m) = self.mark {
            write!(f, " mark {:#x}/{:#x}", m.value, m.mask)?;
        }
        Ok(())
    }
}

/// The transform of an ESP state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum XfrmAlgo {
    /// e.g. `rfc4106(gcm(aes))`; `key` includes the 4-byte salt.
    Aead {
        name: String,
        key: SecretBytes,
        icv_bits: u32,
    },
    /// e.g. `hmac(sha256)` truncated to `trunc_bits`, with `cbc(aes)`.
    AuthEnc {
        auth_name: String,
        auth_key: SecretBytes,
        trunc_bits: u32,
        enc_name: String,
        enc_key: SecretBytes,
    },
}

impl XfrmAlgo {
    pub fn fingerprint(&self) -> Fingerprint {
        match self {
            XfrmAlgo::Aead {
                name,
                key,
                icv_bits,
            } => Fingerprint::of(&[
                b"aead",
                name.as_bytes(),
                key.expose(),
                &icv_bits.to_be_bytes(),
            ]),
            XfrmAlgo::AuthEnc {
                auth_name,
                auth_key,
                trunc_bits,
                enc_name,
                enc_key,
            } => Fingerprint::of(&[
                b"authenc",
                auth_name.as_bytes(),
                auth_key.expose(),
                &trunc_bits.to_be_bytes(),
                enc_name.as_bytes(),
                enc_key.expose(),
            ]),
        }
    }
}

/// The settings of an ESP state other than its key: if the kernel's differ, the state is
/// replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StateShape {
    pub reqid: u32,
    pub replay_window: u32,
    pub esn: bool,
    /// Set on the packet after the transform (inbound: clears the mark bits used to pick the
    /// state, so they do not leak into routing decisions).
    pub output_mark: Option<Mark>,
}

/// An ESP tunnel-mode state to install.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct XfrmStateSpec {
    pub id: StateId,
    pub shape: StateShape,
    pub algo: XfrmAlgo,
}

/// An ESP state as the kernel holds it (key reduced to a fingerprint).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedState {
    pub id: StateId,
    pub shape: StateShape,
    pub fingerprint: Fingerprint,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyDir {
    In,
    Out,
    Fwd,
}

impl fmt::Display for PolicyDir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PolicyDir::In => "in",
            PolicyDir::Out => "out",
            PolicyDir::Fwd => "fwd",
        })
    }
}

/// What identifies an XFRM policy: its selector, direction and mark (policy mode: an `out`
/// policy matches only packets the eBPF program marked for IPsec).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyId {
    pub src: IpNet,
    pub dst: IpNet,
    pub dir: PolicyDir,
    pub mark: Option<Mark>,
}

impl fmt::Display for PolicyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}->{}", self.dir, self.src, self.dst)?;
        if let Some(m) = self.mark {
            write!(f, " mark {:#x}/{:#x}", m.value, m.mask)?;
        }
        Ok(())
    }
}

/// The one ESP tunnel template of a policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Template {
    /// Outer source and destination: the two nodes' addresses.
    pub src: IpAddr,
    pub dst: IpAddr,
    /// 0 accepts any SPI (inbound, so that old and new keys both match during a rotation); an
    /// outbound template names the SPI to encrypt with.
    pub spi: u32,
    pub reqid: u32,
    /// An optional template lets packets through that were not transformed.
    pub optional: bool,
}

/// An XFRM policy (no secrets; observed policies use the same type).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PolicySpec {
    pub id: PolicyId,
    pub priority: u32,
    pub tmpl: Template,
}

/// A tc ingress filter on the underlay device that marks ESP from one peer, so that the peer's
/// inbound states (same destination and SPI as every other peer's) can be told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MarkFilter {
    /// Also the peer's mark index: `mark.value = handle << shift`.
    pub handle: u32,
    pub src: IpAddr,
    pub mark: Mark,
}

/// A route to a remote pod CIDR through the WireGuard device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RouteSpec {
    pub dst: IpNet,
    pub table: u32,
    pub metric: u32,
}

/// The metric the kernel gives an IPv6 route added without one (`IP6_RT_PRIO_USER`).
pub const IPV6_DEFAULT_METRIC: u32 = 1024;

impl RouteSpec {
    /// A route as the kernel will list it: an IPv6 route asked for with metric 0 is stored with
    /// 1024, and a desired route must compare equal to what is read back (else every pass would
    /// replace it, and the tunnel would never count as routed).
    pub fn new(dst: IpNet, table: u32, metric: u32) -> Self {
        let metric = match dst {
            IpNet::V6(_) if metric == 0 => IPV6_DEFAULT_METRIC,
            _ => metric,
        };
        RouteSpec { dst, table, metric }
    }
}

/// The device-level WireGuard settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgDeviceConfig {
    pub private_key: Key32,
    pub listen_port: u16,
    pub fwmark: u32,
    /// keyd's node-key epoch this keypair answers. Kept in the device's alias, so that a restarted
    /// node-shim that adopts the key also knows how old it is.
    pub key_epoch: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WgPeerSpec {
    pub public_key: PublicKey,
    pub preshared_key: Key32,
    pub endpoint: SocketAddr,
    /// Sorted, no duplicates.
    pub allowed_ips: Vec<IpNet>,
    /// Seconds; 0 is off.
    pub keepalive: u16,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObservedPeer {
    pub public_key: PublicKey,
    pub preshared_key: Option<Fingerprint>,
    pub endpoint: Option<SocketAddr>,
    pub allowed_ips: Vec<IpNet>,
    pub keepalive: u16,
    /// Seconds since the Unix epoch of the last completed handshake, if any.
    pub last_handshake: Option<u64>,
}

/// The WireGuard device as the kernel (or the userspace implementation) holds it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ObservedWg {
    pub up: bool,
    /// The private key, read back so that a restarted node-shim keeps its identity (only the
    /// kernel implementation returns it).
    pub private_key: Option<Key32>,
    pub public_key: Option<PublicKey>,
    pub listen_port: u16,
    pub fwmark: u32,
    /// From the device alias (`keyd-node-shim key-epoch=N`).
    pub key_epoch: Option<u64>,
    pub peers: BTreeMap<PublicKey, ObservedPeer>,
    pub routes: BTreeSet<RouteSpec>,
}

/// Everything node-shim owns in the kernel. Objects of other software are never observed, so
/// they are never changed or removed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Observed {
    pub states: BTreeMap<StateId, ObservedState>,
    pub policies: BTreeMap<PolicyId, PolicySpec>,
    pub filters: BTreeMap<u32, MarkFilter>,
    /// `None` when the device does not exist.
    pub wg: Option<ObservedWg>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredWg {
    pub config: WgDeviceConfig,
    pub peers: BTreeMap<PublicKey, WgPeerSpec>,
    pub routes: BTreeSet<RouteSpec>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Desired {
    pub states: BTreeMap<StateId, XfrmStateSpec>,
    pub policies: BTreeMap<PolicyId, PolicySpec>,
    pub filters: BTreeMap<u32, MarkFilter>,
    pub wg: Option<DesiredWg>,
}

/// One change to the kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create the WireGuard device if missing and bring it up.
    WgEnsureDevice,
    WgConfigure(WgDeviceConfig),
    /// Add peers or bring existing ones to this configuration (allowed IPs replaced).
    WgUpsertPeers(Vec<WgPeerSpec>),
    WgRemovePeers(Vec<PublicKey>),
    RouteAdd(RouteSpec),
    RouteDel(RouteSpec),
    FilterSet(MarkFilter),
    FilterDel(MarkFilter),
    XfrmStateAdd(XfrmStateSpec),
    XfrmStateDel(StateId),
    /// Add or update.
    XfrmPolicySet(PolicySpec),
    XfrmPolicyDel(PolicyId),
}

impl Op {
    /// A short name for metrics labels (bounded).
    pub fn kind(&self) -> &'static str {
        match self {
            Op::WgEnsureDevice => "wg_device",
            Op::WgConfigure(_) => "wg_configure",
            Op::WgUpsertPeers(_) => "wg_peers_set",
            Op::WgRemovePeers(_) => "wg_peers_remove",
            Op::RouteAdd(_) => "route_add",
            Op::RouteDel(_) => "route_del",
            Op::FilterSet(_) => "filter_set",
            Op::FilterDel(_) => "filter_del",
            Op::XfrmStateAdd(_) => "xfrm_state_add",
            Op::XfrmStateDel(_) => "xfrm_state_del",
            Op::XfrmPolicySet(_) => "xfrm_policy_set",
            Op::XfrmPolicyDel(_) => "xfrm_policy_del",
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::WgEnsureDevice => f.write_str("ensure WireGuard device"),
            Op::WgConfigure(c) => write!(
                f,
                "configure WireGuard device (port {}, fwmark {:#x})",
                c.listen_port, c.fwmark
            ),
            Op::WgUpsertPeers(p) => write!(f, "set {} WireGuard peer(s)", p.len()),
            Op::WgRemovePeers(p) => write!(f, "remove {} WireGuard peer(s)", p.len()),
            Op::RouteAdd(r) => write!(f, "add route {} table {}", r.dst, r.table),
            Op::RouteDel(r) => write!(f, "delete route {} table {}", r.dst, r.table),
            Op::FilterSet(m) => write!(f, "mark ESP from {} with {:#x}", m.src, m.mark.value),
            Op::FilterDel(m) => write!(f, "remove ESP mark filter for {}", m.src),
            Op::XfrmStateAdd(s) => write!(f, "add state {}", s.id),
            Op::XfrmStateDel(id) => write!(f, "delete state {id}"),
            Op::XfrmPolicySet(p) => write!(f, "set policy {} spi {}", p.id, p.tmpl.spi),
            Op::XfrmPolicyDel(id) => write!(f, "delete policy {id}"),
        }
    }
}
