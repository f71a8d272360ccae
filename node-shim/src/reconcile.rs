//! The pure core: the kernel state a bundle asks for, the changes that get the kernel there, and
//! what to acknowledge to keyd afterwards. No IO here; every function is tested on plain data.
//!
//! IPsec layout, per peer P (outer addresses: this node L, peer P) and per key SPI s:
//! - outbound state `L -> P spi s`, key derived for (L, P) when the key is per-tunnel;
//! - inbound state `P -> L spi s mark m(P)`, key derived for (P, L). Every peer's inbound state
//!   for s has the same destination and SPI, which is how the kernel looks states up, so each
//!   peer gets a node-local mark index and a tc ingress filter on the underlay sets `m(P)` on
//!   ESP from P (Cilium does the same with a node ID in the mark, set from BPF);
//! - for each (local pod CIDR, peer pod CIDR): an `out` policy whose template names the outbound
//!   SPI, and `in` and `fwd` policies whose templates accept any SPI, so that during a rotation
//!   both keys decrypt while outbound moves from one to the other.
//!
//! A peer whose key cannot be derived (no boot ID yet) still gets its policies: traffic to it is
//! dropped for want of a state rather than sent in the clear.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use ipnet::IpNet;
use keyd_proto::{Ack, IpsecAlgorithm, IpsecKey, NodeBundle};

use crate::config::{Config, Mode};
use crate::derive;
use crate::model::{
    Desired, DesiredWg, Mark, MarkFilter, Observed, Op, PolicyDir, PolicyId, PolicySpec, RouteSpec,
    StateId, StateShape, Template, WgDeviceConfig, WgPeerSpec, XfrmAlgo, XfrmStateSpec,
};
use crate::secret::{Key32, PublicKey};

/// What node-shim knows about its own node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFacts {
    pub name: String,
    pub endpoint: IpAddr,
    pub pod_cidrs: Vec<IpNet>,
    pub boot_id: String,
}

/// Everything the desired state is a function of.
#[derive(Debug, Clone, Copy)]
pub struct Inputs<'a> {
    pub bundle: &'a NodeBundle,
    pub facts: &'a NodeFacts,
    pub config: &'a Config,
    /// WireGuard mode: this node's private key, and keyd's node-key epoch it answers.
    pub wg_private_key: Option<&'a Key32>,
    pub wg_key_epoch: u64,
    /// IPsec mode: the SPI outbound traffic uses (see [`choose_outbound`]).
    pub outbound_spi: Option<u8>,
    /// IPsec mode: peer address -> mark index (see [`assign_marks`]).
    pub marks: &'a BTreeMap<IpAddr, u32>,
}

/// A peer that is not (fully) programmed, and why. Reported in status, never an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub node: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Computed {
    pub desired: Desired,
    pub skipped: Vec<Skipped>,
    /// Pod CIDRs of skipped peers whose traffic is dropped rather than sent in the clear (see
    /// [`fail_closed`]).
    pub dropped: Vec<IpNet>,
    /// IPsec mode: the SPIs of the bundle's keys.
    pub spis: Vec<u8>,
    pub outbound_spi: Option<u8>,
}

/// The desired kernel state for `inputs`.
pub fn desired(inputs: &Inputs<'_>) -> Computed {
    match inputs.config.mode {
        Mode::Ipsec => desired_ipsec(inputs),
        Mode::Wireguard => desired_wireguard(inputs),
    }
}

fn desired_ipsec(inputs: &Inputs<'_>) -> Computed {
    let mut out = Computed::default();
    let Some(ipsec) = &inputs.bundle.ipsec else {
        return out;
    };
    let cfg = &inputs.config.ipsec;
    let facts = inputs.facts;
    let local = facts.endpoint;
    let outbound = inputs.outbound_spi.unwrap_or(ipsec.outbound_spi);
    out.spis = ipsec.keys.iter().map(|k| k.spi).collect();
    out.outbound_spi = Some(outbound);
    let shift = cfg.mark_mask.trailing_zeros();
    // Policy mode: outbound ESP only for what the eBPF program marked (a policy covers it).
    let steering = &inputs.config.steering;
    let policy_mode = steering.encrypt == crate::config::Encrypt::Policy;
    let out_mark = policy_mode.then_some(Mark {
        value: steering.marks.ipsec,
        mask: steering.marks.mask,
    });
    let mut endpoints = BTreeSet::new();
    let mut claimed: BTreeSet<IpNet> = BTreeSet::new();
    // The CIDRs that got policies: traffic to them is encrypted (or, keyless, dropped).
    let mut programmed: BTreeSet<IpNet> = BTreeSet::new();
    for peer in &ipsec.peers {
        if peer.node == facts.name {
            continue;
        }
        let mut skip = |reason: String| {
            out.skipped.push(Skipped {
                node: peer.node.clone(),
                reason,
            })
        };
        if peer.endpoint == local {
            skip(format!("its endpoint {} is this node's", peer.endpoint));
            continue;
        }
        if peer.endpoint.is_ipv4() != local.is_ipv4() {
            skip(format!(
                "its endpoint {} is not the address family of this node's {local}",
                peer.endpoint
            ));
            continue;
        }
        if !endpoints.insert(peer.endpoint) {
            skip(format!(
                "another node already uses endpoint {}",
                peer.endpoint
            ));
            continue;
        }
        let cidrs: Vec<IpNet> = peer.pod_cidrs.iter().map(IpNet::trunc).collect();
        if let Some(clash) = overlap(&claimed, &cidrs) {
            skip(clash);
            continue;
        }
        claimed.extend(cidrs);
        let Some(&index) = inputs.marks.get(&peer.endpoint) else {
            skip("no free mark index (ipsec.mark_mask is too small for this many peers)".into());
            continue;
        };
        let mark = Mark {
            value: index << shift,
            mask: cfg.mark_mask,
        };

        // Policies first: they are installed even when the states cannot be, so that traffic
        // fails closed.
        let mut policies = Vec::new();
        for lc in &facts.pod_cidrs {
            for pc in peer
                .pod_cidrs
                .iter()
                .filter(|pc| pc.addr().is_ipv4() == lc.addr().is_ipv4())
            {
                let outbound_tmpl = Template {
                    src: local,
                    dst: peer.endpoint,
                    spi: u32::from(outbound),
                    reqid: cfg.reqid,
                    optional: false,
                };
                let inbound_tmpl = Template {
                    src: peer.endpoint,
                    dst: local,
                    spi: 0,
                    reqid: cfg.reqid,
                    // Policy mode: uncovered traffic from the peer's pods arrives in the clear.
                    optional: !cfg.require_inbound_esp || policy_mode,
                };
                policies.push(PolicySpec {
                    id: PolicyId {
                        src: *lc,
                        dst: *pc,
                        dir: PolicyDir::Out,
                        mark: out_mark,
                    },
                    priority: cfg.policy_priority,
                    tmpl: outbound_tmpl,
                });
                for dir in [PolicyDir::In, PolicyDir::Fwd] {
                    policies.push(PolicySpec {
                        id: PolicyId {
                            src: *pc,
                            dst: *lc,
                            dir,
                            mark: None,
                        },
                        priority: cfg.policy_priority,
                        tmpl: inbound_tmpl,
                    });
                }
            }
        }
        if let Some(clash) = policies
            .iter()
            .find(|p| out.desired.policies.contains_key(&p.id))
        {
            skip(format!(
                "pod CIDR {} is already routed to another node",
                if clash.id.dir == PolicyDir::Out {
                    clash.id.dst
                } else {
                    clash.id.src
                }
            ));
            continue;
        }
        for p in policies {
            out.desired.policies.insert(p.id, p);
        }
        programmed.extend(peer.pod_cidrs.iter().map(IpNet::trunc));

        let mut states = Vec::new();
        let mut failure = None;
        for key in &ipsec.keys {
            let shape_out = StateShape {
                reqid: cfg.reqid,
                replay_window: cfg.replay_window,
                esn: true,
                output_mark: None,
            };
            let shape_in = StateShape {
                output_mark: Some(Mark {
                    value: 0,
                    mask: cfg.mark_mask,
                }),
                ..shape_out
            };
            let algo_out = materialize(
                key,
                local,
                peer.endpoint,
                &facts.boot_id,
                peer.boot_id.as_deref(),
            );
            let algo_in = materialize(
                key,
                peer.endpoint,
                local,
                peer.boot_id.as_deref().unwrap_or(""),
                Some(&facts.boot_id),
            );
            match (algo_out, algo_in) {
                (Ok(algo_out), Ok(algo_in)) => {
                    states.push(XfrmStateSpec {
                        id: StateId {
                            src: local,
                            dst: peer.endpoint,
                            spi: u32::from(key.spi),
                            mark: None,
                        },
                        shape: shape_out,
                        algo: algo_out,
                    });
                    states.push(XfrmStateSpec {
                        id: StateId {
                            src: peer.endpoint,
                            dst: local,
                            spi: u32::from(key.spi),
                            mark: Some(mark),
                        },
                        shape: shape_in,
                        algo: algo_in,
                    });
                }
                (Err(e), _) | (_, Err(e)) => {
                    failure = Some(format!("key {}: {e}", key.spi));
                    break;
                }
            }
        }
        if let Some(reason) = failure {
            skip(format!(
                "{reason}; its traffic is dropped until it can be keyed"
            ));
            continue;
        }
        out.desired.filters.insert(
            index,
            MarkFilter {
                handle: index,
                src: peer.endpoint,
                mark,
            },
        );
        for s in states {
            out.desired.states.insert(s.id, s);
        }
    }
    // A skipped peer's pod CIDRs get policies whose template no state matches: the kernel drops
    // that traffic instead of sending it in the clear. One priority step below the peers' own
    // policies, so a more specific CIDR a programmed peer holds keeps its policies.
    let skipped_cidrs = skipped_peers(
        &out.skipped,
        ipsec.peers.iter().map(|p| (&p.node, &p.pod_cidrs)),
    );
    let mut peer_endpoints: Vec<IpAddr> = ipsec.peers.iter().map(|p| p.endpoint).collect();
    peer_endpoints.push(local);
    out.dropped = fail_closed(
        &skipped_cidrs,
        &programmed,
        &facts.pod_cidrs,
        &peer_endpoints,
    )
    .into_iter()
    // Drop policies go from this node's pod CIDRs of the same family; with none, nothing is.
    .filter(|n| {
        facts
            .pod_cidrs
            .iter()
            .any(|lc| lc.addr().is_ipv4() == n.addr().is_ipv4())
    })
    .collect();
    for n in &out.dropped {
        for lc in facts
            .pod_cidrs
            .iter()
            .filter(|lc| lc.addr().is_ipv4() == n.addr().is_ipv4())
        {
            let tmpl = |src, dst| Template {
                src,
                dst,
                spi: 0,
                reqid: cfg.reqid,
                optional: false,
            };
            let out_policy = PolicySpec {
                id: PolicyId {
                    src: *lc,
                    dst: *n,
                    dir: PolicyDir::Out,
                    mark: out_mark,
                },
                priority: cfg.policy_priority.saturating_add(1),
                tmpl: tmpl(local, n.network()),
            };
            out.desired.policies.insert(out_policy.id, out_policy);
            for dir in [PolicyDir::In, PolicyDir::Fwd] {
                let p = PolicySpec {
                    id: PolicyId {
                        src: *n,
                        dst: *lc,
                        dir,
                        mark: None,
                    },
                    priority: cfg.policy_priority.saturating_add(1),
                    tmpl: tmpl(n.network(), local),
                };
                out.desired.policies.insert(p.id, p);
            }
        }
    }
    out
}

/// The pod CIDRs of the peers in `skipped`, from `(node, cidrs)` of every peer.
fn skipped_peers<'a>(
    skipped: &[Skipped],
    peers: impl Iterator<Item = (&'a String, &'a Vec<IpNet>)>,
) -> Vec<IpNet> {
    let names: BTreeSet<&str> = skipped.iter().map(|s| s.node.as_str()).collect();
    peers
        .filter(|(node, _)| names.contains(node.as_str()))
        .flat_map(|(_, cidrs)| cidrs.iter().map(IpNet::trunc))
        .collect()
}

/// Which of skipped peers' `cidrs` to drop traffic to (fail closed) rather than leave to the
/// underlay in the clear: all but those inside a CIDR a programmed peer holds (that traffic is
/// encrypted to that peer), those overlapping this node's own pod CIDRs (local traffic is never
/// touched), and those holding a node's endpoint (the tunnels themselves run there). The last two
/// are left whole, not split around the excepted part: such a claim is a misconfiguration or an
/// attack, and is reported.
pub(crate) fn fail_closed(
    cidrs: &[IpNet],
    claimed: &BTreeSet<IpNet>,
    local: &[IpNet],
    endpoints: &[IpAddr],
) -> Vec<IpNet> {
    let mut out: Vec<IpNet> = cidrs
        .iter()
        .map(IpNet::trunc)
        .filter(|n| !claimed.iter().any(|c| c.contains(n)))
        .filter(|n| !local.iter().any(|l| l.contains(n) || n.contains(l)))
        .filter(|n| !endpoints.iter().any(|e| n.contains(e)))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// Why `cidrs` cannot be given to a peer: one of them is, contains or lies inside a CIDR already
/// given to another. (A more specific WireGuard allowed IP or XFRM selector would take part of
/// the other node's traffic; keyd refuses such claims, this keeps a bundle from an older keyd
/// from doing it.)
fn overlap(claimed: &BTreeSet<IpNet>, cidrs: &[IpNet]) -> Option<String> {
    cidrs.iter().find_map(|n| {
        claimed
            .iter()
            .find(|c| c.contains(n) || n.contains(*c))
            .map(|c| {
                if c == n {
                    format!("pod CIDR {n} is already routed to another node")
                } else {
                    format!("pod CIDR {n} overlaps {c}, which is already routed to another node")
                }
            })
    })
}

/// The transform for one direction of one peer pair.
fn materialize(
    key: &IpsecKey,
    src: IpAddr,
    dst: IpAddr,
    src_boot: &str,
    dst_boot: Option<&str>,
) -> Result<XfrmAlgo, String> {
    let derive_one = |global: &keyd_proto::SecretBytes| {
        if !key.per_tunnel {
            return Ok(global.clone());
        }
        let dst_boot = dst_boot.ok_or("the peer has not registered a boot ID")?;
        derive::tunnel_key(global.expose(), src, dst, src_boot, dst_boot).map_err(|e| e.to_string())
    };
    match &key.algorithm {
        IpsecAlgorithm::Aead {
            name,
            key: k,
            icv_bits,
        } => Ok(XfrmAlgo::Aead {
            name: name.clone(),
            key: derive_one(k)?,
            icv_bits: u32::from(*icv_bits),
        }),
        IpsecAlgorithm::AuthEnc {
            auth_name,
            auth_key,
            enc_name,
            enc_key,
        } => Ok(XfrmAlgo::AuthEnc {
            auth_name: auth_name.clone(),
            auth_key: derive_one(auth_key)?,
            // RFC 4868: HMAC-SHA-256 truncated to 128 bits.
            trunc_bits: 128,
            enc_name: enc_name.clone(),
            enc_key: derive_one(enc_key)?,
        }),
    }
}

fn desired_wireguard(inputs: &Inputs<'_>) -> Computed {
    let mut out = Computed::default();
    let Some(private_key) = inputs.wg_private_key else {
        return out;
    };
    let cfg = &inputs.config.wireguard;
    let own_public = private_key.public_key();
    let mut peers = BTreeMap::new();
    let mut routes = BTreeSet::new();
    let mut claimed: BTreeSet<IpNet> = BTreeSet::new();
    for p in &inputs.bundle.wireguard.peers {
        if p.node == inputs.facts.name {
            continue;
        }
        let mut skip = |reason: String| {
            out.skipped.push(Skipped {
                node: p.node.clone(),
                reason,
            })
        };
        let public_key: PublicKey = match p.public_key.parse() {
            Ok(k) => k,
            Err(e) => {
                skip(e);
                continue;
            }
        };
        if public_key == own_public {
            skip("it has this node's public key".into());
            continue;
        }
        if peers.contains_key(&public_key) {
            skip("another node has the same public key".into());
            continue;
        }
        let Some(preshared_key) = Key32::from_proto(&p.preshared_key) else {
            skip(format!(
                "its preshared key has {} bytes, not 32",
                p.preshared_key.len()
            ));
            continue;
        };
        let mut allowed: Vec<IpNet> = p.allowed_ips.iter().map(IpNet::trunc).collect();
        allowed.sort();
        allowed.dedup();
        if let Some(clash) = overlap(&claimed, &allowed) {
            skip(clash);
            continue;
        }
        claimed.extend(allowed.iter().copied());
        for dst in &allowed {
            routes.insert(RouteSpec::new(*dst, cfg.route_table, cfg.route_metric));
        }
        peers.insert(
            public_key,
            WgPeerSpec {
                public_key,
                preshared_key,
                endpoint: SocketAddr::new(p.endpoint, cfg.peer_port),
                allowed_ips: allowed,
                keepalive: cfg.persistent_keepalive,
            },
        );
    }
    // A skipped peer's allowed IPs are routed into the device all the same: with no peer to
    // take them, WireGuard drops the packets, which would otherwise leave in the clear.
    let skipped_cidrs = skipped_peers(
        &out.skipped,
        inputs
            .bundle
            .wireguard
            .peers
            .iter()
            .map(|p| (&p.node, &p.allowed_ips)),
    );
    let mut endpoints: Vec<IpAddr> = inputs
        .bundle
        .wireguard
        .peers
        .iter()
        .map(|p| p.endpoint)
        .collect();
    endpoints.push(inputs.facts.endpoint);
    out.dropped = fail_closed(
        &skipped_cidrs,
        &claimed,
        &inputs.facts.pod_cidrs,
        &endpoints,
    );
    for n in &out.dropped {
        routes.insert(RouteSpec::new(*n, cfg.route_table, cfg.route_metric));
    }
    out.desired.wg = Some(DesiredWg {
        config: WgDeviceConfig {
            private_key: private_key.clone(),
            listen_port: cfg.listen_port,
            fwmark: cfg.fwmark,
            key_epoch: inputs.wg_key_epoch,
        },
        peers,
        routes,
    });
    out
}

/// The changes from `observed` to `desired`: `ensure` adds and updates (safe at any time),
/// `remove` takes away what is no longer wanted and is applied only after a full sync (a bundle
/// fetched by this process and every `ensure` op applied).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub ensure: Vec<Op>,
    pub remove: Vec<Op>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ensure.is_empty() && self.remove.is_empty()
    }
}

pub fn plan(desired: &Desired, observed: &Observed) -> Plan {
    let mut p = Plan::default();

    if let Some(dw) = &desired.wg {
        match &observed.wg {
            None => {
                p.ensure.push(Op::WgEnsureDevice);
                p.ensure.push(Op::WgConfigure(dw.config.clone()));
                if !dw.peers.is_empty() {
                    p.ensure
                        .push(Op::WgUpsertPeers(dw.peers.values().cloned().collect()));
                }
                p.ensure.extend(dw.routes.iter().copied().map(Op::RouteAdd));
            }
            Some(ow) => {
                if !ow.up {
                    p.ensure.push(Op::WgEnsureDevice);
                }
                let key_ok = match &ow.private_key {
                    Some(k) => *k == dw.config.private_key,
                    // The userspace implementation does not return its private key.
                    None => ow.public_key == Some(dw.config.private_key.public_key()),
                };
                if !key_ok
                    || ow.listen_port != dw.config.listen_port
                    || ow.fwmark != dw.config.fwmark
                    || ow.key_epoch != Some(dw.config.key_epoch)
                {
                    p.ensure.push(Op::WgConfigure(dw.config.clone()));
                }
                let upserts: Vec<WgPeerSpec> = dw
                    .peers
                    .values()
                    .filter(|want| match ow.peers.get(&want.public_key) {
                        None => true,
                        Some(have) => {
                            have.preshared_key != Some(want.preshared_key.fingerprint())
                                || have.endpoint != Some(want.endpoint)
                                || have.allowed_ips != want.allowed_ips
                                || have.keepalive != want.keepalive
                        }
                    })
                    .cloned()
                    .collect();
                if !upserts.is_empty() {
                    p.ensure.push(Op::WgUpsertPeers(upserts));
                }
                p.ensure
                    .extend(dw.routes.difference(&ow.routes).copied().map(Op::RouteAdd));
                p.remove
                    .extend(ow.routes.difference(&dw.routes).copied().map(Op::RouteDel));
                let stale: Vec<PublicKey> = ow
                    .peers
                    .keys()
                    .filter(|k| !dw.peers.contains_key(k))
                    .copied()
                    .collect();
                if !stale.is_empty() {
                    p.remove.push(Op::WgRemovePeers(stale));
                }
            }
        }
    }

    for (handle, want) in &desired.filters {
        if observed.filters.get(handle) != Some(want) {
            p.ensure.push(Op::FilterSet(*want));
        }
    }

    // States: the kernel identifies a state by (destination, SPI, mark). A kernel state with the
    // same identity but other contents (a peer rebooted, so its derived key changed) is
    // replaced: deleted, then added.
    let kernel_key = |id: &StateId| (id.dst, id.spi, id.mark);
    let observed_by_key: BTreeMap<_, _> = observed
        .states
        .values()
        .map(|s| (kernel_key(&s.id), s))
        .collect();
    let mut replaced = BTreeSet::new();
    for want in desired.states.values() {
        match observed_by_key.get(&kernel_key(&want.id)) {
            Some(have)
                if have.id == want.id
                    && have.shape == want.shape
                    && have.fingerprint == want.algo.fingerprint() => {}
            Some(have) => {
                p.ensure.push(Op::XfrmStateDel(have.id));
                replaced.insert(have.id);
                p.ensure.push(Op::XfrmStateAdd(want.clone()));
            }
            None => p.ensure.push(Op::XfrmStateAdd(want.clone())),
        }
    }
    for (id, want) in &desired.policies {
        if observed.policies.get(id) != Some(want) {
            p.ensure.push(Op::XfrmPolicySet(*want));
        }
    }

    // Removals, policies before the states they use.
    for id in observed.policies.keys() {
        if !desired.policies.contains_key(id) {
            p.remove.push(Op::XfrmPolicyDel(*id));
        }
    }
    let wanted_keys: BTreeSet<_> = desired.states.values().map(|s| kernel_key(&s.id)).collect();
    for have in observed.states.values() {
        if !wanted_keys.contains(&kernel_key(&have.id)) && !replaced.contains(&have.id) {
            p.remove.push(Op::XfrmStateDel(have.id));
        }
    }
    for (handle, have) in &observed.filters {
        if !desired.filters.contains_key(handle) {
            p.remove.push(Op::FilterDel(*have));
        }
    }
    // WireGuard removals come last so that routes and peers go after the XFRM objects.
    let wg_removals: Vec<Op> = p
        .remove
        .iter()
        .filter(|o| matches!(o, Op::RouteDel(_) | Op::WgRemovePeers(_)))
        .cloned()
        .collect();
    p.remove
        .retain(|o| !matches!(o, Op::RouteDel(_) | Op::WgRemovePeers(_)));
    p.remove.extend(wg_removals);
    p
}

/// What to acknowledge to keyd: only what `observed` shows is programmed.
pub fn ack(computed: &Computed, observed: &Observed, mode: Mode, wg_epoch: u64) -> Ack {
    match mode {
        Mode::Ipsec => {
            let d = &computed.desired;
            let installed = |spi: u8| {
                d.states
                    .values()
                    .filter(|s| s.id.spi == u32::from(spi))
                    .all(|want| {
                        observed.states.get(&want.id).is_some_and(|have| {
                            have.shape == want.shape && have.fingerprint == want.algo.fingerprint()
                        })
                    })
            };
            let mut spis: Vec<u8> = computed
                .spis
                .iter()
                .copied()
                .filter(|s| installed(*s))
                .collect();
            // keyd stores them sorted; so does the status document.
            spis.sort_unstable();
            let outbound = computed.outbound_spi.filter(|out| {
                spis.contains(out)
                    && d.policies
                        .values()
                        .filter(|p| p.id.dir == PolicyDir::Out)
                        .all(|want| observed.policies.get(&want.id) == Some(want))
            });
            Ack {
                ipsec_spis: spis,
                ipsec_outbound_spi: outbound,
                wireguard_epoch: None,
            }
        }
        Mode::Wireguard => {
            let programmed = computed.desired.wg.as_ref().is_some_and(|dw| {
                observed.wg.as_ref().is_some_and(|ow| {
                    dw.peers.values().all(|want| {
                        ow.peers.get(&want.public_key).is_some_and(|have| {
                            have.preshared_key == Some(want.preshared_key.fingerprint())
                                && have.allowed_ips == want.allowed_ips
                        })
                    })
                })
            });
            Ack {
                ipsec_spis: vec![],
                ipsec_outbound_spi: None,
                wireguard_epoch: programmed.then_some(wg_epoch),
            }
        }
    }
}

/// Which peers' tunnels the kernel holds as the bundle asks (by node name, with
/// [`crate::steering::READY_WIREGUARD`] or [`crate::steering::READY_IPSEC`]): what the eBPF
/// program checks before it steers a covered packet to a peer. A peer that was skipped, or whose
/// objects are missing or differ in the kernel, is not ready.
pub fn readiness(
    bundle: &NodeBundle,
    computed: &Computed,
    observed: &Observed,
    mode: Mode,
) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    match mode {
        Mode::Wireguard => {
            let (Some(dw), Some(ow)) = (&computed.desired.wg, &observed.wg) else {
                return out;
            };
            if !ow.up {
                return out;
            }
            for p in &bundle.wireguard.peers {
                let Ok(key) = p.public_key.parse::<PublicKey>() else {
                    continue;
                };
                let Some(want) = dw.peers.get(&key) else {
                    continue;
                };
                let programmed = ow.peers.get(&key).is_some_and(|have| {
                    have.preshared_key == Some(want.preshared_key.fingerprint())
                        && have.allowed_ips == want.allowed_ips
                });
                // Every allowed prefix has its route(s), and there is at least one.
                let routed = want.allowed_ips.iter().all(|dst| {
                    let mut routes = dw.routes.iter().filter(|r| r.dst == *dst).peekable();
                    routes.peek().is_some() && routes.all(|r| ow.routes.contains(r))
                });
                if programmed && routed {
                    out.insert(p.node.clone(), crate::steering::READY_WIREGUARD);
                }
            }
        }
        Mode::Ipsec => {
            let (Some(ipsec), Some(spi)) = (&bundle.ipsec, computed.outbound_spi) else {
                return out;
            };
            let d = &computed.desired;
            for p in &ipsec.peers {
                let state_ok = d
                    .states
                    .values()
                    .filter(|s| s.id.dst == p.endpoint && s.id.spi == u32::from(spi))
                    .any(|want| {
                        observed.states.get(&want.id).is_some_and(|have| {
                            have.shape == want.shape && have.fingerprint == want.algo.fingerprint()
                        })
                    });
                let mut outs = d
                    .policies
                    .values()
                    .filter(|pol| pol.id.dir == PolicyDir::Out && pol.tmpl.dst == p.endpoint)
                    .peekable();
                let policies_ok = outs.peek().is_some()
                    && outs.all(|want| observed.policies.get(&want.id) == Some(want));
                if state_ok && policies_ok {
                    out.insert(p.node.clone(), crate::steering::READY_IPSEC);
                }
            }
        }
    }
    out
}

/// The SPI outbound traffic uses, and when to look again if the switch to keyd's choice is held
/// back.
///
/// keyd names the outbound SPI. When it names a key this node installed only moments ago, the
/// peers may not have installed it yet (they learn of it on their own next fetch), so the switch
/// waits until the key has been installed here for `delay`; meanwhile the current outbound key
/// keeps working, since keyd lists it until every node moved on. A keyd that stages keys and
/// switches outbound only after every node acknowledged the new one makes the wait moot: by the
/// time it names the key, the key was installed here long before.
pub fn choose_outbound(
    wanted: u8,
    current: Option<u8>,
    bundle_spis: &[u8],
    installed_since: &BTreeMap<u8, Instant>,
    now: Instant,
    delay: Duration,
) -> (u8, Option<Instant>) {
    let Some(current) = current else {
        return (wanted, None);
    };
    if current == wanted || !bundle_spis.contains(&current) {
        return (wanted, None);
    }
    match installed_since.get(&wanted) {
        Some(since) if now.saturating_duration_since(*since) >= delay => (wanted, None),
        Some(since) => (current, Some(*since + delay)),
        None => (current, Some(now + delay)),
    }
}

/// The outbound SPI the kernel uses now: that of the `out` policies (if they agree).
pub fn current_outbound(observed: &Observed) -> Option<u8> {
    let mut spis = observed
        .policies
        .values()
        .filter(|p| p.id.dir == PolicyDir::Out)
        .map(|p| p.tmpl.spi);
    let first = spis.next()?;
    if spis.all(|s| s == first) {
        u8::try_from(first).ok()
    } else {
        None
    }
}

/// Node-local mark indexes for `peers` (by address): existing filters keep theirs, new peers get
/// the lowest index no filter uses. A peer left without one (mask exhausted) is absent.
pub fn assign_marks(
    peers: impl IntoIterator<Item = IpAddr>,
    observed: &Observed,
    mask: u32,
) -> BTreeMap<IpAddr, u32> {
    let max = mask >> mask.trailing_zeros();
    let mut used: BTreeSet<u32> = observed.filters.keys().copied().collect();
    let existing: BTreeMap<IpAddr, u32> = observed
        .filters
        .values()
        .filter(|f| f.handle >= 1 && f.handle <= max)
        .map(|f| (f.src, f.handle))
        .collect();
    let mut out = BTreeMap::new();
    let mut fresh = Vec::new();
    for peer in peers {
        match existing.get(&peer) {
            Some(i) => {
                out.insert(peer, *i);
            }
            None => fresh.push(peer),
        }
    }
    let mut next = 1u32;
    for peer in fresh {
        if out.contains_key(&peer) {
            continue;
        }
        while used.contains(&next) && next <= max {
            next += 1;
        }
        if next > max {
            break;
        }
        used.insert(next);
        out.insert(peer, next);
    }
    out
}

#[cfg(test)]
mod tests;
