#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::RawConfig;
use crate::kernel::Kernel;
use crate::kernel::fake::FakeKernel;
use keyd_proto::{IpsecBundle, IpsecPeer, KeyRole, SecretBytes, WireguardBundle, WireguardPeer};

const BOOT_A: &str = "11111111-2222-3333-4444-555555555555";
const BOOT_B: &str = "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee";
const BOOT_C: &str = "cccccccc-bbbb-cccc-dddd-eeeeeeeeeeee";

fn config(mode: &str, name: &str) -> Config {
    RawConfig::from_toml(&format!(
        r#"
node_name = "{name}"
endpoint = "192.168.0.1"
pod_cidrs = ["10.1.0.0/24"]
mode = "{mode}"
[keyd]
server = "https://127.0.0.1:8443"
ca = "/ca.pem"
cert = "/c.pem"
key = "/k.pem"
"#
    ))
    .unwrap()
    .validate()
    .unwrap()
}

fn facts(name: &str, ip: &str, cidr: &str, boot: &str) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        endpoint: ip.parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
        boot_id: boot.into(),
    }
}

fn gcm_key(spi: u8, role: KeyRole, byte: u8) -> IpsecKey {
    IpsecKey {
        spi,
        role,
        per_tunnel: true,
        algorithm: IpsecAlgorithm::Aead {
            name: "rfc4106(gcm(aes))".into(),
            key: SecretBytes::new(vec![byte; 20]),
            icv_bits: 128,
        },
    }
}

fn peer(name: &str, ip: &str, cidr: &str, boot: Option<&str>) -> IpsecPeer {
    IpsecPeer {
        node: name.into(),
        endpoint: ip.parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
        boot_id: boot.map(str::to_owned),
    }
}

fn ipsec_bundle(node: &str, keys: Vec<IpsecKey>, peers: Vec<IpsecPeer>) -> NodeBundle {
    NodeBundle {
        node: node.into(),
        revision: "r".into(),
        ipsec: Some(IpsecBundle {
            outbound_spi: keys[0].spi,
            keys,
            peers,
        }),
        wireguard: WireguardBundle {
            epoch: 1,
            node_key_epoch: 1,
            peers: vec![],
        },
    }
}

fn node_a() -> NodeFacts {
    facts("a", "192.168.0.1", "10.1.0.0/24", BOOT_A)
}

fn peers_bc() -> Vec<IpsecPeer> {
    vec![
        peer("a", "192.168.0.1", "10.1.0.0/24", Some(BOOT_A)),
        peer("b", "192.168.0.2", "10.2.0.0/24", Some(BOOT_B)),
        peer("c", "192.168.0.3", "10.3.0.0/24", Some(BOOT_C)),
    ]
}

struct Ctx {
    config: Config,
    facts: NodeFacts,
    kernel: FakeKernel,
}

impl Ctx {
    fn ipsec() -> Self {
        Ctx {
            config: config("ipsec", "a"),
            facts: node_a(),
            kernel: FakeKernel::new(),
        }
    }

    /// One reconcile pass as the agent does it: marks from the kernel, desired, plan, apply all.
    fn sync(
        &mut self,
        bundle: &NodeBundle,
        outbound: Option<u8>,
        removals: bool,
    ) -> (Computed, Plan) {
        let observed = self.kernel.observe().unwrap();
        let peers = bundle
            .ipsec
            .as_ref()
            .map(|i| i.peers.iter().map(|p| p.endpoint).collect::<Vec<_>>())
            .unwrap_or_default();
        let marks = assign_marks(peers, &observed, self.config.ipsec.mark_mask);
        let computed = desired(&Inputs {
            bundle,
            facts: &self.facts,
            config: &self.config,
            wg_private_key: None,
            wg_key_epoch: 0,
            outbound_spi: outbound,
            marks: &marks,
        });
        let p = plan(&computed.desired, &observed);
        self.kernel.apply(&p.ensure).unwrap();
        if removals {
            self.kernel.apply(&p.remove).unwrap();
        }
        (computed, p)
    }

    fn ack(&mut self, computed: &Computed) -> Ack {
        let observed = self.kernel.observe().unwrap();
        ack(computed, &observed, self.config.mode, 1)
    }
}

#[test]
fn ipsec_layout_per_peer_and_key() {
    let mut ctx = Ctx::ipsec();
    let bundle = ipsec_bundle(
        "a",
        vec![
            gcm_key(2, KeyRole::Current, 2),
            gcm_key(1, KeyRole::Previous, 1),
        ],
        peers_bc(),
    );
    let (computed, p) = ctx.sync(&bundle, None, true);
    let d = &computed.desired;
    // 2 peers x 2 keys x (in, out)
    assert_eq!(d.states.len(), 8);
    // 2 peers x 1 local CIDR x 1 remote CIDR x (out, in, fwd)
    assert_eq!(d.policies.len(), 6);
    assert_eq!(d.filters.len(), 2);
    assert!(computed.skipped.is_empty(), "{:?}", computed.skipped);
    assert!(p.remove.is_empty());
    for pol in d.policies.values() {
        match pol.id.dir {
            PolicyDir::Out => assert_eq!(pol.tmpl.spi, 2, "outbound names keyd's outbound key"),
            _ => {
                assert_eq!(pol.tmpl.spi, 0, "inbound accepts both keys");
                assert!(!pol.tmpl.optional, "inbound requires ESP by default");
            }
        }
    }
    // Inbound states of different peers differ only by mark.
    let inbound: Vec<_> = d
        .states
        .keys()
        .filter(|id| id.dst == ctx.facts.endpoint)
        .collect();
    assert_eq!(inbound.len(), 4);
    let marks: BTreeSet<_> = inbound.iter().map(|id| (id.spi, id.mark)).collect();
    assert_eq!(marks.len(), 4);
    assert!(inbound.iter().all(|id| id.mark.is_some()));
    // Every inbound state clears its mark bits after decryption.
    assert!(d.states.values().filter(|s| s.id.mark.is_some()).all(|s| {
        s.shape.output_mark
            == Some(Mark {
                value: 0,
                mask: ctx.config.ipsec.mark_mask,
            })
    }));
    assert_eq!(
        ctx.ack(&computed),
        Ack {
            ipsec_spis: vec![1, 2],
            ipsec_outbound_spi: Some(2),
            wireguard_epoch: None
        }
    );
    // A second pass changes nothing.
    let (_, again) = ctx.sync(&bundle, None, true);
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn both_ends_derive_the_same_key_per_direction() {
    let bundle_for =
        |node: &str| ipsec_bundle(node, vec![gcm_key(1, KeyRole::Current, 9)], peers_bc());
    let mut a = Ctx::ipsec();
    let mut b = Ctx {
        config: config("ipsec", "b"),
        facts: facts("b", "192.168.0.2", "10.2.0.0/24", BOOT_B),
        kernel: FakeKernel::new(),
    };
    let (ca, _) = a.sync(&bundle_for("a"), None, true);
    let (cb, _) = b.sync(&bundle_for("b"), None, true);
    let fp = |c: &Computed, src: &str, dst: &str| {
        c.desired
            .states
            .values()
            .find(|s| s.id.src.to_string() == src && s.id.dst.to_string() == dst)
            .unwrap()
            .algo
            .fingerprint()
    };
    assert_eq!(
        fp(&ca, "192.168.0.1", "192.168.0.2"),
        fp(&cb, "192.168.0.1", "192.168.0.2")
    );
    assert_eq!(
        fp(&ca, "192.168.0.2", "192.168.0.1"),
        fp(&cb, "192.168.0.2", "192.168.0.1")
    );
    assert_ne!(
        fp(&ca, "192.168.0.1", "192.168.0.2"),
        fp(&ca, "192.168.0.2", "192.168.0.1")
    );
    // A third node's tunnel with a has its own key.
    assert_ne!(
        fp(&ca, "192.168.0.1", "192.168.0.2"),
        fp(&ca, "192.168.0.1", "192.168.0.3")
    );
}

#[test]
fn rotation_installs_switches_then_retires_each_step_acked() {
    let mut ctx = Ctx::ipsec();
    let t0 = Instant::now();
    let delay = Duration::from_secs(10);
    let k1 = || gcm_key(1, KeyRole::Current, 1);
    let b1 = ipsec_bundle("a", vec![k1()], peers_bc());
    let (c, _) = ctx.sync(&b1, None, true);
    assert_eq!(ctx.ack(&c).ipsec_outbound_spi, Some(1));

    // keyd rotates: key 2 is current, key 1 previous. Key 2 was just installed here, so outbound
    // stays on 1 for `delay`.
    let b2 = ipsec_bundle(
        "a",
        vec![
            gcm_key(2, KeyRole::Current, 2),
            gcm_key(1, KeyRole::Previous, 1),
        ],
        peers_bc(),
    );
    let current = current_outbound(&ctx.kernel.observe().unwrap());
    assert_eq!(current, Some(1));
    let mut installed = BTreeMap::from([(1u8, t0)]);
    let (out, recheck) = choose_outbound(2, current, &[2, 1], &installed, t0, delay);
    assert_eq!((out, recheck), (1, Some(t0 + delay)));
    let (c, p) = ctx.sync(&b2, Some(out), true);
    assert!(
        p.ensure.iter().all(|o| matches!(o, Op::XfrmStateAdd(_))),
        "{p:?}"
    );
    assert_eq!(
        ctx.ack(&c),
        Ack {
            ipsec_spis: vec![1, 2],
            ipsec_outbound_spi: Some(1),
            wireguard_epoch: None
        },
        "step 1 acked: new key installed, outbound unchanged"
    );
    installed.insert(2, t0);

    // After the delay, outbound moves: only the out policies change.
    let (out, recheck) = choose_outbound(2, Some(1), &[2, 1], &installed, t0 + delay, delay);
    assert_eq!((out, recheck), (2, None));
    let (c, p) = ctx.sync(&b2, Some(out), true);
    assert_eq!(p.ensure.len(), 2, "one out policy per peer: {p:?}");
    assert!(p.ensure.iter().all(
        |o| matches!(o, Op::XfrmPolicySet(s) if s.id.dir == PolicyDir::Out && s.tmpl.spi == 2)
    ));
    assert_eq!(
        ctx.ack(&c).ipsec_outbound_spi,
        Some(2),
        "step 2 acked: outbound switched"
    );

    // keyd retires key 1: its states go, but only in the removal phase.
    let b3 = ipsec_bundle("a", vec![gcm_key(2, KeyRole::Current, 2)], peers_bc());
    let (c, p) = ctx.sync(&b3, Some(2), false);
    assert!(p.ensure.is_empty());
    assert_eq!(p.remove.len(), 4, "in and out state of key 1 for each peer");
    assert!(
        ctx.kernel.state().states.keys().any(|id| id.spi == 1),
        "kept without a full sync"
    );
    let (c2, _) = ctx.sync(&b3, Some(2), true);
    assert_eq!(c, c2);
    assert!(!ctx.kernel.state().states.keys().any(|id| id.spi == 1));
    assert_eq!(
        ctx.ack(&c2),
        Ack {
            ipsec_spis: vec![2],
            ipsec_outbound_spi: Some(2),
            wireguard_epoch: None
        },
        "step 3 acked: old key gone"
    );
}

#[test]
fn outbound_choice() {
    let t0 = Instant::now();
    let d = Duration::from_secs(5);
    let none = BTreeMap::new();
    // Fresh node: take keyd's.
    assert_eq!(choose_outbound(3, None, &[3, 2], &none, t0, d), (3, None));
    // Current no longer listed by keyd: nothing to hold on to.
    assert_eq!(
        choose_outbound(3, Some(1), &[3, 2], &none, t0, d),
        (3, None)
    );
    // Already there.
    assert_eq!(
        choose_outbound(3, Some(3), &[3, 2], &none, t0, d),
        (3, None)
    );
    // Not installed yet: hold and look again after the delay.
    assert_eq!(
        choose_outbound(3, Some(2), &[3, 2], &none, t0, d),
        (2, Some(t0 + d))
    );
    // Installed long enough ago (a staging keyd): switch at once.
    let old = BTreeMap::from([(3u8, t0)]);
    assert_eq!(
        choose_outbound(3, Some(2), &[3, 2], &old, t0 + d * 3, d),
        (3, None)
    );
}

#[test]
fn peer_reboot_replaces_its_states() {
    let mut ctx = Ctx::ipsec();
    let b1 = ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers_bc());
    ctx.sync(&b1, None, true);
    let mut peers = peers_bc();
    peers[1].boot_id = Some("bbbbbbbb-0000-cccc-dddd-eeeeeeeeeeee".into());
    let b2 = ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers);
    let (_, p) = ctx.sync(&b2, None, true);
    let dels = p
        .ensure
        .iter()
        .filter(|o| matches!(o, Op::XfrmStateDel(_)))
        .count();
    let adds = p
        .ensure
        .iter()
        .filter(|o| matches!(o, Op::XfrmStateAdd(_)))
        .count();
    assert_eq!((dels, adds), (2, 2), "b's in and out states: {p:?}");
    assert!(p.remove.is_empty());
}

#[test]
fn unkeyable_peer_fails_closed_and_is_not_acked_against() {
    let mut ctx = Ctx::ipsec();
    let mut peers = peers_bc();
    peers[2].boot_id = None;
    let b = ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers);
    let (c, _) = ctx.sync(&b, None, true);
    assert_eq!(c.skipped.len(), 1);
    assert_eq!(c.skipped[0].node, "c");
    assert!(
        c.skipped[0].reason.contains("boot ID"),
        "{}",
        c.skipped[0].reason
    );
    // c's policies exist (so its traffic is dropped, not sent in the clear), its states do not.
    assert!(
        c.desired
            .policies
            .values()
            .any(|p| p.tmpl.dst.to_string() == "192.168.0.3")
    );
    assert!(
        !c.desired
            .states
            .keys()
            .any(|id| id.dst.to_string() == "192.168.0.3")
    );
    assert_eq!(ctx.ack(&c).ipsec_spis, vec![1]);
}

#[test]
fn failed_install_is_not_acknowledged() {
    let mut ctx = Ctx::ipsec();
    let b1 = ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers_bc());
    ctx.sync(&b1, None, true);
    ctx.kernel.state().fail_kind = Some(("xfrm_state_add", 22));
    let b2 = ipsec_bundle(
        "a",
        vec![
            gcm_key(2, KeyRole::Current, 2),
            gcm_key(1, KeyRole::Previous, 1),
        ],
        peers_bc(),
    );
    let observed = ctx.kernel.observe().unwrap();
    let marks = assign_marks(
        b2.ipsec.as_ref().unwrap().peers.iter().map(|p| p.endpoint),
        &observed,
        ctx.config.ipsec.mark_mask,
    );
    let c = desired(&Inputs {
        bundle: &b2,
        facts: &ctx.facts,
        config: &ctx.config,
        wg_private_key: None,
        wg_key_epoch: 0,
        outbound_spi: Some(1),
        marks: &marks,
    });
    let p = plan(&c.desired, &observed);
    let e = ctx.kernel.apply(&p.ensure).unwrap_err();
    assert_eq!(e.kind, "xfrm_state_add");
    assert_eq!(e.source.errno(), Some(22));
    assert_eq!(ctx.ack(&c).ipsec_spis, vec![1], "key 2 is not installed");
}

#[test]
fn stale_peers_go_only_in_the_removal_phase() {
    let mut ctx = Ctx::ipsec();
    ctx.sync(
        &ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers_bc()),
        None,
        true,
    );
    let mut peers = peers_bc();
    peers.pop();
    let (_, p) = ctx.sync(
        &ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers),
        None,
        false,
    );
    assert!(p.ensure.is_empty());
    // c: 3 policies, 2 states, 1 filter; policies first.
    assert_eq!(p.remove.len(), 6);
    assert!(matches!(p.remove[0], Op::XfrmPolicyDel(_)));
    assert!(matches!(p.remove[5], Op::FilterDel(_)));
}

#[test]
fn marks_are_stable_and_bounded() {
    let mut observed = Observed::default();
    let ip = |s: &str| -> IpAddr { s.parse().unwrap() };
    observed.filters.insert(
        2,
        MarkFilter {
            handle: 2,
            src: ip("192.168.0.9"),
            mark: Mark {
                value: 2 << 16,
                mask: 0x3fff_0000,
            },
        },
    );
    let m = assign_marks(
        [ip("192.168.0.8"), ip("192.168.0.9"), ip("192.168.0.7")],
        &observed,
        0x3fff_0000,
    );
    assert_eq!(m[&ip("192.168.0.9")], 2, "kept");
    assert_eq!(m[&ip("192.168.0.8")], 1);
    assert_eq!(m[&ip("192.168.0.7")], 3, "2 is taken");
    // A 2-bit mask has room for 3 peers.
    let m = assign_marks(
        (1..=5).map(|i| ip(&format!("192.168.1.{i}"))),
        &Observed::default(),
        0b11 << 4,
    );
    assert_eq!(m.len(), 3);
}

#[test]
fn duplicate_pod_cidr_is_skipped() {
    let mut ctx = Ctx::ipsec();
    let mut peers = peers_bc();
    peers[2].pod_cidrs = peers[1].pod_cidrs.clone();
    let (c, _) = ctx.sync(
        &ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers),
        None,
        true,
    );
    assert_eq!(c.skipped.len(), 1);
    assert!(c.skipped[0].reason.contains("already routed"));
}

#[test]
fn overlapping_pod_cidr_is_skipped() {
    let mut ctx = Ctx::ipsec();
    let mut peers = peers_bc();
    // c claims the upper half of b's CIDR: its XFRM selectors would take part of b's traffic.
    peers[2].pod_cidrs = vec!["10.2.0.128/25".parse().unwrap()];
    let (c, _) = ctx.sync(
        &ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers.clone()),
        None,
        true,
    );
    assert_eq!(c.skipped.len(), 1, "{:?}", c.skipped);
    assert_eq!(c.skipped[0].node, peers[2].node);
    assert!(c.skipped[0].reason.contains("overlaps"), "{:?}", c.skipped);
}

/// A peer skipped for a claim around another's: the part of its CIDR no programmed peer holds is
/// dropped by policies that no state answers, one priority step below the peers' own; the
/// programmed peer's more specific CIDR keeps its policies.
#[test]
fn a_skipped_peers_traffic_is_dropped_not_sent_in_the_clear() {
    let mut ctx = Ctx::ipsec();
    let mut peers = peers_bc();
    peers[2].pod_cidrs = vec!["10.2.0.0/16".parse().unwrap()];
    let (c, _) = ctx.sync(
        &ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers),
        None,
        true,
    );
    assert_eq!(c.skipped.len(), 1, "{:?}", c.skipped);
    let wide: IpNet = "10.2.0.0/16".parse().unwrap();
    assert_eq!(c.dropped, vec![wide]);
    let observed = ctx.kernel.observe().unwrap();
    let priority = ctx.config.ipsec.policy_priority;
    let drop_out = observed
        .policies
        .values()
        .find(|p| p.id.dst == wide && p.id.dir == PolicyDir::Out)
        .expect("an outbound policy for the skipped CIDR");
    assert_eq!(drop_out.priority, priority + 1);
    assert!(!drop_out.tmpl.optional);
    // No state answers its template: the kernel drops what it matches.
    assert!(
        observed
            .states
            .keys()
            .all(|s| s.dst != drop_out.tmpl.dst && s.src != drop_out.tmpl.dst)
    );
    for dir in [PolicyDir::In, PolicyDir::Fwd] {
        assert!(
            observed
                .policies
                .values()
                .any(|p| p.id.src == wide && p.id.dir == dir && !p.tmpl.optional),
            "{dir:?}"
        );
    }
    let b_out = observed
        .policies
        .values()
        .find(|p| p.id.dst == "10.2.0.0/24".parse::<IpNet>().unwrap() && p.id.dir == PolicyDir::Out)
        .unwrap();
    assert_eq!(b_out.priority, priority);
}

/// Out of mark indexes: the peer that got none is skipped and its traffic dropped (a peer skipped
/// after its CIDRs were claimed must not count as programmed).
#[test]
fn a_peer_without_a_mark_index_is_dropped() {
    let mut ctx = Ctx::ipsec();
    // One bit: one index, which node a's own entry in the peer list takes first.
    ctx.config.ipsec.mark_mask = 0x100;
    let (c, _) = ctx.sync(
        &ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 1)], peers_bc()),
        None,
        true,
    );
    assert_eq!(c.skipped.len(), 2, "{:?}", c.skipped);
    assert!(
        c.skipped.iter().all(|s| s.reason.contains("mark index")),
        "{:?}",
        c.skipped
    );
    let both: Vec<IpNet> = vec![
        "10.2.0.0/24".parse().unwrap(),
        "10.3.0.0/24".parse().unwrap(),
    ];
    assert_eq!(c.dropped, both);
    let observed = ctx.kernel.observe().unwrap();
    for n in both {
        assert!(
            observed
                .policies
                .values()
                .any(|p| p.id.dst == n && p.id.dir == PolicyDir::Out),
            "{n}"
        );
    }
}

#[test]
fn fail_closed_never_touches_local_traffic_or_the_tunnels() {
    let claimed: BTreeSet<IpNet> = ["10.2.0.0/24".parse().unwrap()].into();
    let local: Vec<IpNet> = vec!["10.1.0.0/24".parse().unwrap()];
    let endpoints: Vec<IpAddr> = vec!["192.168.0.1".parse().unwrap()];
    let cidrs: Vec<IpNet> = [
        "10.2.0.128/25",  // inside a programmed peer's: encrypted to that peer
        "10.1.0.0/25",    // this node's own pods
        "10.0.0.0/8",     // around this node's own pods
        "192.168.0.0/16", // holds a node's endpoint
        "10.5.0.7/24",    // dropped (as its network)
        "10.5.0.0/24",
    ]
    .iter()
    .map(|c| c.parse().unwrap())
    .collect();
    assert_eq!(
        fail_closed(&cidrs, &claimed, &local, &endpoints),
        vec!["10.5.0.0/24".parse::<IpNet>().unwrap()]
    );
}

// ---- WireGuard ---------------------------------------------------------------------------------

fn wg_peer(node: &str, key: &Key32, ip: &str, cidr: &str, psk: u8) -> WireguardPeer {
    WireguardPeer {
        node: node.into(),
        public_key: key.public_key().to_base64(),
        endpoint: ip.parse().unwrap(),
        allowed_ips: vec![cidr.parse().unwrap()],
        preshared_key: SecretBytes::new(vec![psk; 32]),
    }
}

fn wg_bundle(epoch: u64, peers: Vec<WireguardPeer>) -> NodeBundle {
    NodeBundle {
        node: "a".into(),
        revision: "r".into(),
        ipsec: None,
        wireguard: WireguardBundle {
            epoch,
            node_key_epoch: 1,
            peers,
        },
    }
}

fn wg_sync(
    kernel: &mut FakeKernel,
    cfg: &Config,
    key: &Key32,
    bundle: &NodeBundle,
) -> (Computed, Plan) {
    let observed = kernel.observe().unwrap();
    let c = desired(&Inputs {
        bundle,
        facts: &node_a(),
        config: cfg,
        wg_private_key: Some(key),
        wg_key_epoch: 1,
        outbound_spi: None,
        marks: &BTreeMap::new(),
    });
    let p = plan(&c.desired, &observed);
    kernel.apply(&p.ensure).unwrap();
    kernel.apply(&p.remove).unwrap();
    (c, p)
}

/// One WireGuard sync of node a with peers b (10.2.0.0/24) and then c (`c_cidr`): the kernel,
/// b's key and what was computed.
fn wg_b_then_c(c_cidr: &str) -> (FakeKernel, Key32, Computed) {
    let cfg = config("wireguard", "a");
    let mut k = FakeKernel::new();
    let own = Key32::from_bytes([1; 32]);
    let kb = Key32::from_bytes([2; 32]);
    let kc = Key32::from_bytes([3; 32]);
    let b = wg_bundle(
        1,
        vec![
            wg_peer("b", &kb, "192.168.0.2", "10.2.0.0/24", 0x11),
            wg_peer("c", &kc, "192.168.0.3", c_cidr, 0x12),
        ],
    );
    let (c, _) = wg_sync(&mut k, &cfg, &own, &b);
    (k, kb, c)
}

#[test]
fn wireguard_overlapping_allowed_ips_are_skipped() {
    // c claims a more specific part of b's CIDR: as an allowed IP it would take that traffic.
    let (mut k, kb, c) = wg_b_then_c("10.2.0.128/25");
    assert_eq!(c.skipped.len(), 1, "{:?}", c.skipped);
    assert_eq!(c.skipped[0].node, "c");
    assert!(
        c.skipped[0].reason.contains("overlaps 10.2.0.0/24"),
        "{:?}",
        c.skipped
    );
    let w = k.observe().unwrap().wg.unwrap();
    assert_eq!(w.peers.len(), 1);
    assert!(w.peers.contains_key(&kb.public_key()));
}

/// WireGuard: a skipped peer's CIDR (here around another's) is routed into the device with no
/// peer to take it, so WireGuard drops it; the programmed peer keeps its more specific part.
#[test]
fn wireguard_drops_a_skipped_peers_traffic() {
    let (mut k, _, c) = wg_b_then_c("10.2.0.0/16");
    let wide: IpNet = "10.2.0.0/16".parse().unwrap();
    assert_eq!(c.dropped, vec![wide]);
    let o = k.observe().unwrap();
    let w = o.wg.unwrap();
    assert_eq!(w.peers.len(), 1);
    assert!(w.peers.values().all(|p| !p.allowed_ips.contains(&wide)));
    let dsts: Vec<IpNet> = w.routes.iter().map(|r| r.dst).collect();
    assert!(
        dsts.contains(&wide) && dsts.contains(&"10.2.0.0/24".parse().unwrap()),
        "{dsts:?}"
    );
}

#[test]
fn wireguard_device_peers_routes_and_epochs() {
    let cfg = config("wireguard", "a");
    let mut k = FakeKernel::new();
    let own = Key32::from_bytes([1; 32]);
    let kb = Key32::from_bytes([2; 32]);
    let kc = Key32::from_bytes([3; 32]);
    let b1 = wg_bundle(
        1,
        vec![
            wg_peer("b", &kb, "192.168.0.2", "10.2.0.0/24", 0x11),
            wg_peer("c", &kc, "192.168.0.3", "10.3.0.0/24", 0x12),
        ],
    );
    let (c, p) = wg_sync(&mut k, &cfg, &own, &b1);
    assert_eq!(
        p.ensure.iter().map(Op::kind).collect::<Vec<_>>(),
        [
            "wg_device",
            "wg_configure",
            "wg_peers_set",
            "route_add",
            "route_add"
        ]
    );
    let o = k.observe().unwrap();
    assert_eq!(ack(&c, &o, Mode::Wireguard, 1).wireguard_epoch, Some(1));
    let w = o.wg.unwrap();
    assert_eq!(w.listen_port, 51871);
    assert_eq!(w.peers.len(), 2);
    assert_eq!(
        w.peers[&kb.public_key()].endpoint,
        Some("192.168.0.2:51871".parse().unwrap())
    );

    // A new preshared-key epoch: every peer is updated in place, nothing removed.
    let b2 = wg_bundle(
        2,
        vec![
            wg_peer("b", &kb, "192.168.0.2", "10.2.0.0/24", 0x21),
            wg_peer("c", &kc, "192.168.0.3", "10.3.0.0/24", 0x22),
        ],
    );
    let (c, p) = wg_sync(&mut k, &cfg, &own, &b2);
    assert!(
        matches!(&p.ensure[..], [Op::WgUpsertPeers(v)] if v.len() == 2),
        "{p:?}"
    );
    assert!(p.remove.is_empty());
    assert_eq!(
        ack(&c, &k.observe().unwrap(), Mode::Wireguard, 2).wireguard_epoch,
        Some(2)
    );

    // b rotates its keypair: the new key takes b's pod CIDR, the old key is removed.
    let kb2 = Key32::from_bytes([4; 32]);
    let b3 = wg_bundle(
        2,
        vec![
            wg_peer("b", &kb2, "192.168.0.2", "10.2.0.0/24", 0x21),
            wg_peer("c", &kc, "192.168.0.3", "10.3.0.0/24", 0x22),
        ],
    );
    let (_, p) = wg_sync(&mut k, &cfg, &own, &b3);
    assert!(matches!(&p.ensure[..], [Op::WgUpsertPeers(v)] if v.len() == 1));
    assert_eq!(p.remove, vec![Op::WgRemovePeers(vec![kb.public_key()])]);
    let w = k.observe().unwrap().wg.unwrap();
    assert!(!w.peers.contains_key(&kb.public_key()));
    assert_eq!(w.routes.len(), 2, "routes unchanged");

    // Our own keypair rotates: only the device configuration changes.
    let own2 = Key32::from_bytes([5; 32]);
    let (_, p) = wg_sync(&mut k, &cfg, &own2, &b3);
    assert!(matches!(&p.ensure[..], [Op::WgConfigure(_)]), "{p:?}");

    // Nothing left to do.
    let (_, p) = wg_sync(&mut k, &cfg, &own2, &b3);
    assert!(p.is_empty());
}

#[test]
fn wireguard_skips_bad_peers() {
    let cfg = config("wireguard", "a");
    let own = Key32::from_bytes([1; 32]);
    let kb = Key32::from_bytes([2; 32]);
    let mut bad_psk = wg_peer(
        "d",
        &Key32::from_bytes([6; 32]),
        "192.168.0.4",
        "10.4.0.0/24",
        1,
    );
    bad_psk.preshared_key = SecretBytes::new(vec![1; 31]);
    let mut bad_key = wg_peer("e", &kb, "192.168.0.5", "10.5.0.0/24", 1);
    bad_key.public_key = "not a key".into();
    let b = wg_bundle(
        1,
        vec![
            wg_peer("b", &kb, "192.168.0.2", "10.2.0.0/24", 1),
            wg_peer(
                "c",
                &Key32::from_bytes([3; 32]),
                "192.168.0.3",
                "10.2.0.0/24",
                1,
            ),
            wg_peer("self-key", &own, "192.168.0.6", "10.6.0.0/24", 1),
            bad_psk,
            bad_key,
        ],
    );
    let c = desired(&Inputs {
        bundle: &b,
        facts: &node_a(),
        config: &cfg,
        wg_private_key: Some(&own),
        wg_key_epoch: 1,
        outbound_spi: None,
        marks: &BTreeMap::new(),
    });
    let skipped: Vec<&str> = c.skipped.iter().map(|s| s.node.as_str()).collect();
    assert_eq!(skipped, ["c", "self-key", "d", "e"]);
    assert_eq!(c.desired.wg.unwrap().peers.len(), 1);
}

#[test]
fn userspace_observation_without_private_key_is_not_a_change() {
    let cfg = config("wireguard", "a");
    let mut k = FakeKernel::new();
    k.state().hide_private_key = true;
    let own = Key32::from_bytes([1; 32]);
    let b = wg_bundle(1, vec![]);
    wg_sync(&mut k, &cfg, &own, &b);
    let (_, p) = wg_sync(&mut k, &cfg, &own, &b);
    assert!(p.is_empty(), "{p:?}");
}

#[test]
fn debug_of_plans_never_shows_keys() {
    let mut ctx = Ctx::ipsec();
    let b = ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 0xAB)], peers_bc());
    let (_, p) = ctx.sync(&b, None, true);
    let text = format!("{p:?}");
    assert!(text.contains("redacted"), "{text}");
    assert!(!text.to_lowercase().contains("abab"), "{text}");
    assert!(!text.contains("171, 171"), "{text}");
}

#[test]
fn ipsec_readiness_follows_what_the_kernel_holds() {
    let mut ctx = Ctx::ipsec();
    let mut peers = peers_bc();
    // c has no boot ID yet: its traffic is dropped, and it is not ready.
    peers[2].boot_id = None;
    let bundle = ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 7)], peers);
    let (computed, _) = ctx.sync(&bundle, None, true);
    let observed = ctx.kernel.observe().unwrap();
    let ready = readiness(&bundle, &computed, &observed, Mode::Ipsec);
    assert_eq!(
        ready,
        BTreeMap::from([("b".to_owned(), crate::steering::READY_IPSEC)])
    );
    // b's outbound state disappears behind our back: no longer ready.
    let out_b = computed
        .desired
        .states
        .values()
        .find(|s| s.id.dst == "192.168.0.2".parse::<IpAddr>().unwrap())
        .unwrap()
        .id;
    ctx.kernel.apply(&[Op::XfrmStateDel(out_b)]).unwrap();
    let observed = ctx.kernel.observe().unwrap();
    assert!(readiness(&bundle, &computed, &observed, Mode::Ipsec).is_empty());
}

#[test]
fn ipsec_policy_mode_marks_outbound_policies_and_accepts_clear_inbound() {
    let text = r#"
node_name = "a"
endpoint = "192.168.0.1"
pod_cidrs = ["10.1.0.0/24"]
mode = "ipsec"
[keyd]
server = "https://127.0.0.1:8443"
ca = "/ca.pem"
cert = "/c.pem"
key = "/k.pem"
[steering]
encrypt = "policy"
devices = ["lxc*"]
"#;
    let mut ctx = Ctx::ipsec();
    ctx.config = RawConfig::from_toml(text).unwrap().validate().unwrap();
    let bundle = ipsec_bundle("a", vec![gcm_key(1, KeyRole::Current, 7)], peers_bc());
    let (computed, _) = ctx.sync(&bundle, None, true);
    let policies: Vec<&PolicySpec> = computed.desired.policies.values().collect();
    assert!(!policies.is_empty());
    for p in policies {
        match p.id.dir {
            PolicyDir::Out => assert_eq!(
                p.id.mark,
                Some(Mark {
                    value: 0x20,
                    mask: 0xf0
                }),
                "{p:?}"
            ),
            PolicyDir::In | PolicyDir::Fwd => {
                assert_eq!(p.id.mark, None);
                assert!(
                    p.tmpl.optional,
                    "uncovered traffic arrives in the clear: {p:?}"
                );
            }
        }
    }
    // Switching back to all mode replaces the marked policies by unmarked ones.
    ctx.config = config("ipsec", "a");
    let (computed, plan) = ctx.sync(&bundle, None, true);
    assert!(
        plan.remove
            .iter()
            .any(|o| matches!(o, Op::XfrmPolicyDel(id) if id.mark.is_some()))
    );
    let observed = ctx.kernel.observe().unwrap();
    assert!(observed.policies.keys().all(|id| id.mark.is_none()));
    assert_eq!(observed.policies.len(), computed.desired.policies.len());
}

#[test]
fn wireguard_readiness_needs_the_peer_and_its_routes() {
    let cfg = config("wireguard", "a");
    let mut k = FakeKernel::new();
    let own = Key32::from_bytes([1; 32]);
    let kb = Key32::from_bytes([2; 32]);
    let kc = Key32::from_bytes([3; 32]);
    let bundle = wg_bundle(
        1,
        vec![
            wg_peer("b", &kb, "192.168.0.2", "10.2.0.0/24", 9),
            // c claims b's CIDR: skipped, so never ready.
            wg_peer("c", &kc, "192.168.0.3", "10.2.0.0/24", 9),
        ],
    );
    let (c, _) = wg_sync(&mut k, &cfg, &own, &bundle);
    let observed = k.observe().unwrap();
    assert_eq!(
        readiness(&bundle, &c, &observed, Mode::Wireguard),
        BTreeMap::from([("b".to_owned(), crate::steering::READY_WIREGUARD)])
    );
    let route = *c.desired.wg.as_ref().unwrap().routes.iter().next().unwrap();
    k.apply(&[Op::RouteDel(route)]).unwrap();
    let observed = k.observe().unwrap();
    assert!(readiness(&bundle, &c, &observed, Mode::Wireguard).is_empty());
}
