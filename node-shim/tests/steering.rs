//! The eBPF steering program on the host kernel, in fresh network namespaces: it loads (the
//! verifier accepts it), attaches with TCX and with classic cls_bpf over netlink, marks covered
//! packets so that a routing rule steers them, drops covered packets to a peer whose tunnel is
//! not ready under a strict policy, lets uncovered ones pass in the clear, counts per policy,
//! and takes rule changes in place while traffic flows. IPv4 and IPv6.
//!
//! Topology (all in namespaces this test makes):
//! ```text
//!   pod ns: pod0 10.1.0.5, fd00:1::5
//!     | veth (the program on the node side's ingress, `lxc0`)
//!   node ns: lxc0 10.1.0.1, fd00:1::1; ul0 192.168.50.1 ---- peer ns: ul1 192.168.50.2
//!            steer0 192.168.60.1 ---- sink ns: steer1 192.168.60.2  lo: 10.2.0.7, fd00:2::7
//! ```
//! In the node, the plain routes to the remote pod prefixes go over `ul0` (the CNI's path, in
//! the clear); `ip rule fwmark 0x10/0xf0` sends marked packets to a table whose routes go over
//! `steer0`, standing in for the WireGuard device. Both far ends hold the remote pod's address,
//! so a datagram the sink's UDP stack counts was steered, and one the peer's counts went in the
//! clear.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::{NetNs, prerequisites};
use keyd_node_shim::kernel::ebpf::{AttachMode, EbpfSettings, Hook, Steering};
use keyd_node_shim::steering::{
    self, Contents, MapOp, Marks, NodeMode, READY_IPSEC, READY_WIREGUARD, Settings, Slots,
};
use keyd_proto::EncryptionMode;
use keyd_proto::rules::{L4Protocol, NodeRules, RuleEndpoint, RulePolicy, RulePort};

const MARKS: Marks = Marks {
    mask: 0xf0,
    wireguard: 0x10,
    ipsec: 0x20,
};

fn base() -> Settings {
    Settings {
        node_mode: NodeMode::Policy,
        all_mode: EncryptionMode::Wireguard,
        all_strict: true,
        marks: MARKS,
    }
}

struct Topology {
    pod: NetNs,
    node: NetNs,
    peer: NetNs,
    /// The far end of `steer0`.
    sink: NetNs,
}

fn topology() -> Topology {
    let pod = NetNs::new("spod");
    let node = NetNs::new("snode");
    let peer = NetNs::new("speer");
    common::link_pair(&node, "lxc0", "10.1.0.1/24", &pod, "pod0", "10.1.0.5/24");
    node.sh("ip -6 addr add fd00:1::1/64 dev lxc0 nodad");
    pod.sh("ip -6 addr add fd00:1::5/64 dev pod0 nodad && ip route add default via 10.1.0.1 && ip -6 route add default via fd00:1::1");
    common::link_pair(
        &node,
        "ul0",
        "192.168.50.1/24",
        &peer,
        "ul1",
        "192.168.50.2/24",
    );
    node.sh("ip -6 addr add fd50::1/64 dev ul0 nodad");
    peer.sh("ip -6 addr add fd50::2/64 dev ul1 nodad");
    peer.sh("ip addr add 10.2.0.7/32 dev lo && ip -6 addr add fd00:2::7/128 dev lo");
    node.sh("sysctl -qw net.ipv4.ip_forward=1 net.ipv6.conf.all.forwarding=1");
    node.sh("ip route add 10.2.0.0/24 via 192.168.50.2 dev ul0 && ip -6 route add fd00:2::/64 via fd50::2 dev ul0");
    let sink = NetNs::new("ssink");
    common::link_pair(
        &node,
        "steer0",
        "192.168.60.1/24",
        &sink,
        "steer1",
        "192.168.60.2/24",
    );
    node.sh("ip -6 addr add fd60::1/64 dev steer0 nodad");
    sink.sh("ip -6 addr add fd60::2/64 dev steer1 nodad");
    sink.sh("ip addr add 10.2.0.7/32 dev lo && ip -6 addr add fd00:2::7/128 dev lo");
    node.sh("ip route add 10.2.0.0/24 via 192.168.60.2 dev steer0 table 100 && ip -6 route add fd00:2::/64 via fd60::2 dev steer0 table 100");
    node.sh(
        "ip rule add fwmark 0x10/0xf0 lookup 100 && ip -6 rule add fwmark 0x10/0xf0 lookup 100",
    );
    Topology {
        pod,
        node,
        peer,
        sink,
    }
}

/// UDP datagrams the peer's stack received (delivered or refused for want of a listener): what
/// reached it in the clear. Counted by the kernel, so ARP and neighbour discovery do not blur it.
fn peer_udp(ns: &NetNs) -> u64 {
    let text = ns.sh("cat /proc/net/snmp /proc/net/snmp6");
    let mut lines = text.lines();
    let mut total = 0;
    while let Some(l) = lines.next() {
        if l.starts_with("Udp: InDatagrams") {
            let names: Vec<&str> = l.split_whitespace().collect();
            let values: Vec<&str> = lines.next().unwrap().split_whitespace().collect();
            for (n, v) in names.iter().zip(&values) {
                if *n == "InDatagrams" || *n == "NoPorts" {
                    total += v.parse::<u64>().unwrap();
                }
            }
        } else if l.starts_with("Udp6InDatagrams") || l.starts_with("Udp6NoPorts") {
            total += l.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap();
        }
    }
    total
}

/// Sends `n` UDP datagrams from the pod to `dst`:`port` (bash's /dev/udp), then waits a moment:
/// a datagram may still be on its way through a softirq when the sender returns.
fn send(pod: &NetNs, dst: &str, port: u16, n: u32) {
    pod.sh(&format!(
        "bash -c 'for i in $(seq {n}); do echo keyd-marker > /dev/udp/{dst}/{port}; done'"
    ));
    std::thread::sleep(std::time::Duration::from_millis(150));
}

/// `peer_udp(ns)` once it reached `at_least`, or what it is after 3 s.
fn udp_reaches(ns: &NetNs, at_least: u64) -> u64 {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(3);
    loop {
        let n = peer_udp(ns);
        if n >= at_least || std::time::Instant::now() > deadline {
            return n;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `node`'s rules for one WireGuard policy, `EncryptionPolicy shop/db`, on UDP `port`: it
/// selects the prefixes in `selected` and has those in `peers` as peers (prefix, node).
fn one_policy(
    node: &str,
    strict: bool,
    port: u16,
    selected: &[(&str, &str)],
    peers: &[(&str, &str)],
) -> NodeRules {
    let entry = |(prefix, on): &(&str, &str), selected: bool| RuleEndpoint {
        prefix: prefix.parse().unwrap(),
        node: (*on).into(),
        selected_by: if selected { vec![0] } else { vec![] },
        peer_of: if selected { vec![] } else { vec![0] },
    };
    NodeRules {
        node: node.into(),
        revision: format!("r-{strict}-{port}"),
        policies: vec![RulePolicy {
            name: "EncryptionPolicy shop/db".into(),
            mode: EncryptionMode::Wireguard,
            strict,
            ports: vec![RulePort {
                protocol: L4Protocol::Udp,
                port,
            }],
        }],
        endpoints: selected
            .iter()
            .map(|e| entry(e, true))
            .chain(peers.iter().map(|e| entry(e, false)))
            .collect(),
        rejected: vec![],
    }
}

fn rules(strict: bool, port: u16) -> NodeRules {
    one_policy(
        "node-a",
        strict,
        port,
        &[("10.1.0.5/32", "node-a"), ("fd00:1::5/128", "node-a")],
        &[("10.2.0.0/24", "node-b"), ("fd00:2::/64", "node-b")],
    )
}

fn compile(r: &NodeRules, slots: &mut Slots) -> Contents {
    slots.assign(r.policies.iter().map(|p| p.name.as_str()), ["node-b"]);
    let (c, problems) = steering::from_rules(r, "node-a", slots, base());
    assert!(problems.is_empty(), "{problems:?}");
    c
}

/// The whole scenario, with the program attached one way.
fn scenario(attach: AttachMode) {
    let t = topology();
    let mut st = t.node.run(move || {
        let mut st = Steering::load(EbpfSettings {
            attach,
            pin_dir: None,
            priority: 0x6b65,
        })
        .expect("the verifier accepts the program");
        st.attach("lxc0", Hook::PodIngress).expect("attach");
        st
    });
    if attach == AttachMode::Netlink {
        let shown = t.node.sh("tc filter show dev lxc0 ingress");
        assert!(shown.contains("keyd_steer"), "cls_bpf filter: {shown}");
    }
    let insns = st.verified_instructions(Hook::PodIngress);
    println!("{attach:?}: verifier processed {insns:?} instructions");

    let mut slots = Slots::default();
    let c = compile(&rules(true, 5432), &mut slots);
    st.apply(&steering::diff(None, &c)).unwrap();
    let b = slots.nodes["node-b"];
    let db = slots.policies["EncryptionPolicy shop/db"];
    let ready = BTreeMap::from([(b, READY_WIREGUARD)]);
    st.apply(&steering::readiness_ops(&BTreeMap::new(), &ready))
        .unwrap();

    for dst in ["10.2.0.7", "fd00:2::7"] {
        let before = st.counters(db).unwrap();
        let steered = peer_udp(&t.sink);
        let clear = peer_udp(&t.peer);

        // Covered (UDP 5432): marked, routed to steer0, never seen by the peer.
        send(&t.pod, dst, 5432, 10);
        let after = st.counters(db).unwrap();
        assert_eq!(
            after.encrypted_packets - before.encrypted_packets,
            10,
            "{dst}"
        );
        assert!(udp_reaches(&t.sink, steered + 10) >= steered + 10, "{dst}");
        assert_eq!(
            peer_udp(&t.peer),
            clear,
            "{dst}: covered traffic in the clear"
        );

        // Uncovered (UDP 8080): untouched, in the clear to the peer.
        let steered = peer_udp(&t.sink);
        send(&t.pod, dst, 8080, 10);
        assert_eq!(peer_udp(&t.sink), steered, "{dst}");
        assert!(udp_reaches(&t.peer, clear + 10) >= clear + 10, "{dst}");
        assert_eq!(
            st.counters(db).unwrap(),
            after,
            "{dst}: uncovered traffic counted"
        );

        // The tunnel to node-b is not ready: strict drops covered traffic, counted.
        st.apply(&steering::readiness_ops(&ready, &BTreeMap::new()))
            .unwrap();
        let clear = peer_udp(&t.peer);
        let steered = peer_udp(&t.sink);
        send(&t.pod, dst, 5432, 7);
        let dropped = st.counters(db).unwrap();
        assert_eq!(dropped.dropped_packets - after.dropped_packets, 7, "{dst}");
        assert_eq!(peer_udp(&t.peer), clear, "{dst}: strict leaked");
        assert_eq!(peer_udp(&t.sink), steered, "{dst}");
        st.apply(&steering::readiness_ops(&BTreeMap::new(), &ready))
            .unwrap();
    }

    // Ready only for IPsec: a WireGuard policy's peer is in the wrong mode, so still dropped.
    let ipsec_only = BTreeMap::from([(b, READY_IPSEC)]);
    st.apply(&steering::readiness_ops(&ready, &ipsec_only))
        .unwrap();
    let before = st.counters(db).unwrap();
    send(&t.pod, "10.2.0.7", 5432, 3);
    assert_eq!(
        st.counters(db).unwrap().dropped_packets - before.dropped_packets,
        3
    );

    // Not strict: sent in the clear, and counted as such.
    let relaxed = compile(&rules(false, 5432), &mut slots);
    st.apply(&steering::diff(Some(&c), &relaxed)).unwrap();
    let clear = peer_udp(&t.peer);
    send(&t.pod, "10.2.0.7", 5432, 4);
    let now = st.counters(db).unwrap();
    assert_eq!(now.clear_packets - before.clear_packets, 4);
    assert!(udp_reaches(&t.peer, clear + 4) >= clear + 4);

    // A rule change in place while the program stays: the policy moves to port 6379.
    st.apply(&steering::readiness_ops(&ipsec_only, &ready))
        .unwrap();
    let moved = compile(&rules(true, 6379), &mut slots);
    let ops = steering::diff(Some(&relaxed), &moved);
    assert!(
        !ops.iter().any(|o| matches!(o, MapOp::Settings(_))),
        "{ops:?}"
    );
    st.apply(&ops).unwrap();
    assert_eq!(st.read().unwrap(), moved, "the maps read back as written");
    let before = st.counters(db).unwrap();
    let clear = peer_udp(&t.peer);
    send(&t.pod, "10.2.0.7", 6379, 5);
    send(&t.pod, "10.2.0.7", 5432, 5);
    let now = st.counters(db).unwrap();
    assert_eq!(now.encrypted_packets - before.encrypted_packets, 5);
    assert!(
        udp_reaches(&t.peer, clear + 5) >= clear + 5,
        "5432 is no longer covered"
    );

    // `all` mode: every cross-node pod packet counts; strict drops when the peer is not ready.
    let all = steering::for_all_mode(
        &["10.1.0.0/24".parse().unwrap()],
        &[("node-b".into(), vec!["10.2.0.0/24".parse().unwrap()])],
        &slots,
        Settings {
            node_mode: NodeMode::All,
            ..base()
        },
    );
    st.apply(&steering::diff(Some(&moved), &all)).unwrap();
    let slot = steering::ALL_SLOT;
    let before = st.counters(slot).unwrap();
    send(&t.pod, "10.2.0.7", 8080, 6);
    assert_eq!(
        st.counters(slot).unwrap().encrypted_packets - before.encrypted_packets,
        6
    );
    // The guard on the underlay's egress, with the steering program still on the pod device:
    // this topology has no tunnel, so what the program counted as encrypted leaves in the
    // clear, and the guard drops it and takes it back out of `encrypted`.
    st = t.node.run(move || {
        st.attach("ul0", Hook::UnderlayEgress)
            .expect("attach the guard");
        st
    });
    let before = st.counters(slot).unwrap();
    let clear = peer_udp(&t.peer);
    send(&t.pod, "10.2.0.7", 8080, 5);
    let now = st.counters(slot).unwrap();
    assert_eq!(now.dropped_packets - before.dropped_packets, 5);
    assert_eq!(
        (now.encrypted_packets, now.encrypted_bytes),
        (before.encrypted_packets, before.encrypted_bytes),
        "dropped by the guard, yet counted as encrypted"
    );
    assert_eq!(peer_udp(&t.peer), clear, "all-mode guard leaked");
    let before = now;
    st.apply(&steering::readiness_ops(&ready, &BTreeMap::new()))
        .unwrap();
    send(&t.pod, "10.2.0.7", 8080, 6);
    assert_eq!(
        st.counters(slot).unwrap().dropped_packets - before.dropped_packets,
        6
    );
    assert_eq!(peer_udp(&t.peer), clear, "all-mode strict leaked");

    // Policy mode, steered and then not encrypted: the route for marked packets went away
    // after the program marked them, so they leave on the underlay in the clear. A strict
    // policy's guard drops them; without strict they go, counted as clear. Either way they
    // are no longer counted as encrypted.
    st.apply(&steering::diff(Some(&all), &moved)).unwrap();
    st.apply(&steering::readiness_ops(&BTreeMap::new(), &ready))
        .unwrap();
    t.node
        .sh("ip route flush table 100 && ip -6 route flush table 100");
    let before = st.counters(db).unwrap();
    let clear = peer_udp(&t.peer);
    send(&t.pod, "10.2.0.7", 6379, 3);
    send(&t.pod, "fd00:2::7", 6379, 3);
    let now = st.counters(db).unwrap();
    assert_eq!(now.dropped_packets - before.dropped_packets, 6);
    assert_eq!(
        (now.encrypted_packets, now.encrypted_bytes),
        (before.encrypted_packets, before.encrypted_bytes),
        "dropped by the guard, yet counted as encrypted"
    );
    assert_eq!(
        peer_udp(&t.peer),
        clear,
        "the guard let steered plaintext out"
    );
    let relaxed = compile(&rules(false, 6379), &mut slots);
    st.apply(&steering::diff(Some(&moved), &relaxed)).unwrap();
    let before = st.counters(db).unwrap();
    send(&t.pod, "10.2.0.7", 6379, 4);
    let now = st.counters(db).unwrap();
    assert_eq!(now.clear_packets - before.clear_packets, 4);
    assert_eq!(now.encrypted_packets, before.encrypted_packets);
    assert_eq!(now.dropped_packets, before.dropped_packets);
    assert!(udp_reaches(&t.peer, clear + 4) >= clear + 4);
    st.apply(&steering::diff(Some(&relaxed), &moved)).unwrap();
    t.node.sh("ip route add 10.2.0.0/24 via 192.168.60.2 dev steer0 table 100 && ip -6 route add fd00:2::/64 via fd60::2 dev steer0 table 100");

    // The guard alone: when covered traffic was not steered (here the steering program is
    // detached, as if a Service's address had been translated after it, or another program
    // ahead of it had ended the chain), a strict policy drops it as it leaves.
    st = t.node.run(move || {
        st.detach("lxc0", Hook::PodIngress);
        st
    });
    let before = st.counters(db).unwrap();
    let clear = peer_udp(&t.peer);
    send(&t.pod, "10.2.0.7", 6379, 4);
    send(&t.pod, "fd00:2::7", 6379, 4);
    assert_eq!(
        st.counters(db).unwrap().dropped_packets - before.dropped_packets,
        8
    );
    assert_eq!(
        peer_udp(&t.peer),
        clear,
        "the guard let covered plaintext out"
    );
    send(&t.pod, "10.2.0.7", 8080, 3);
    assert!(
        udp_reaches(&t.peer, clear + 3) >= clear + 3,
        "the guard stopped uncovered traffic"
    );
    let insns = st.verified_instructions(Hook::UnderlayEgress);
    println!("{attach:?}: guard verified with {insns:?} instructions");
    st = t.node.run(move || {
        st.detach("ul0", Hook::UnderlayEgress);
        st.attach("lxc0", Hook::PodIngress).unwrap();
        st
    });

    // Detached: nothing is counted any more.
    t.node.run(move || {
        st.detach("lxc0", Hook::PodIngress);
        st
    });
    if attach == AttachMode::Netlink {
        let shown = t.node.sh("tc filter show dev lxc0 ingress");
        assert!(!shown.contains("keyd_steer"), "filter left behind: {shown}");
    }
}

#[test]
fn privileged_steering_attached_with_tcx() {
    if !prerequisites(&["ip", "bash"]) {
        return;
    }
    scenario(AttachMode::Tcx);
}

#[test]
fn privileged_steering_attached_with_netlink_cls_bpf() {
    if !prerequisites(&["ip", "bash", "tc"]) {
        return;
    }
    scenario(AttachMode::Netlink);
}

/// node-shim end to end on the host kernel, policy mode, userspace WireGuard: two nodes with a
/// pod each, a real keyd for the bundles, and rules covering UDP 5432 between the pods.
/// Before node-b has joined, covered traffic is dropped (strict) and counted while uncovered
/// traffic goes in the clear; once the tunnel is up, covered traffic crosses only inside
/// WireGuard; when the steering route to node-b disappears, covered packets are blackholed,
/// never routed in the clear.
#[test]
fn privileged_policy_mode_end_to_end_with_userspace_wireguard() {
    if !prerequisites(&["ip", "bash", "tcpdump"]) {
        return;
    }
    use common::{Capture, KeydHarness, contains, start_agent};
    use keyd_node_shim::config::RawConfig;
    use keyd_node_shim::dataplane::Dataplane;
    use keyd_node_shim::status::PeerView;

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let keyd = KeydHarness::start().await;
        let a = NetNs::new("pa");
        let b = NetNs::new("pb");
        let pod_a = NetNs::new("ppa");
        let pod_b = NetNs::new("ppb");
        common::link_pair(&a, "ul", "192.168.81.1/24", &b, "ul", "192.168.81.2/24");
        common::link_pair(&a, "lxca", "10.1.0.1/24", &pod_a, "pod0", "10.1.0.5/24");
        common::link_pair(&b, "lxcb", "10.2.0.1/24", &pod_b, "pod0", "10.2.0.7/24");
        pod_a.sh("ip route add default via 10.1.0.1");
        pod_b.sh("ip route add default via 10.2.0.1");
        // The CNI's own path between the nodes, in the clear.
        a.sh("sysctl -qw net.ipv4.ip_forward=1 && ip route add 10.2.0.0/24 via 192.168.81.2");
        b.sh("sysctl -qw net.ipv4.ip_forward=1 && ip route add 10.1.0.0/24 via 192.168.81.1");

        let toml = |name: &str, ip: &str, cidr: &str| {
            format!(
                r#"
node_name = "{name}"
endpoint = "{ip}"
pod_cidrs = ["{cidr}"]
mode = "wireguard"
poll_interval = "200ms"
long_poll = "off"
backoff_initial = "100ms"
backoff_max = "1s"
[keyd]
server = "https://127.0.0.1:1"
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/cert.pem"
key = "/nonexistent/key.pem"
[wireguard]
backend = "userspace"
device = "pwg0"
[steering]
encrypt = "policy"
devices = ["lxc*"]
pin_dir = ""
[log]
format = "text"
"#
            )
        };
        let cfg_a = RawConfig::from_toml(&toml("node-a", "192.168.81.1", "10.1.0.0/24"))
            .unwrap()
            .validate()
            .unwrap();
        let cfg_a = keyd.point_at(cfg_a, "node-a");
        assert_eq!(
            cfg_a.wireguard.route_table, 0x6b65,
            "policy mode routes in its table"
        );
        let (mut agent_a, shared_a) = start_agent(&a, cfg_a.clone()).await;
        let c = cfg_a.clone();
        let sh = shared_a.clone();
        let mut dp = a.run(move || Dataplane::start(&c, sh).expect("data plane starts"));
        let rules_shown = a.sh("ip rule show");
        assert!(
            rules_shown.contains("fwmark 0x10/0xf0 lookup 27493"),
            "{rules_shown}"
        );
        assert!(
            rules_shown.contains("fwmark 0x10/0xf0 blackhole"),
            "{rules_shown}"
        );

        let policy = "EncryptionPolicy shop/db";
        let pod_a_ip = ("10.1.0.5/32", "node-a");
        let cidr_b = ("10.2.0.0/24", "node-b");
        let rules = one_policy("node-a", true, 5432, &[pod_a_ip], &[cidr_b]);
        // The agent's view after its first passes (node-b not registered yet).
        for _ in 0..2 {
            agent_a.step().await;
        }
        let sync = |mut dp: Dataplane, rules: Option<NodeRules>, view: PeerView| {
            a.run(move || {
                dp.set_rules(rules);
                dp.set_peers(view);
                dp.scan_devices();
                dp.sync().expect("maps updated");
                dp
            })
        };
        dp = sync(dp, Some(rules.clone()), shared_a.peers.borrow().clone());
        let status = shared_a.snapshot();
        assert_eq!(
            status.steering.devices,
            ["lxca (ingress)", "ul (egress)"],
            "{status:?}"
        );

        // 1. node-b unknown: covered traffic is dropped and counted; uncovered goes in the clear.
        let capture = Capture::start(&a, "ul");
        let got_b = peer_udp(&pod_b);
        send(&pod_a, "10.2.0.7", 5432, 5);
        send(&pod_a, "10.2.0.7", 8080, 3);
        let pcap = capture.stop();
        let counts = dp.counters_of(policy).unwrap();
        assert_eq!(counts.dropped_packets, 5, "{counts:?}");
        assert_eq!(
            udp_reaches(&pod_b, got_b + 3),
            got_b + 3,
            "only the uncovered datagrams arrive"
        );
        assert!(
            contains(&pcap, b"keyd-marker"),
            "uncovered traffic is in the clear (selectivity)"
        );
        let summary = Capture::summarize(&pcap);
        assert!(
            !summary.contains(".5432:"),
            "covered datagram on the wire: {summary}"
        );

        // 2. node-b joins: the tunnel comes up, and covered traffic crosses only inside it.
        let cfg_b = RawConfig::from_toml(&toml("node-b", "192.168.81.2", "10.2.0.0/24"))
            .unwrap()
            .validate()
            .unwrap();
        let cfg_b = keyd.point_at(cfg_b, "node-b");
        let (mut agent_b, shared_b) = start_agent(&b, cfg_b.clone()).await;
        for _ in 0..3 {
            agent_a.step().await;
            agent_b.step().await;
        }
        let view = shared_a.peers.borrow().clone();
        assert_eq!(view.ready.get("node-b"), Some(&1), "{view:?}");
        dp = sync(dp, Some(rules.clone()), view);
        // node-b enforces the same policy from its side: the pod's answers (here the ICMP port
        // unreachable its stack sends back, which quotes the datagram) are covered too.
        let rules_b = one_policy("node-b", true, 5432, &[pod_a_ip], &[cidr_b]);
        let c = cfg_b.clone();
        let sh = shared_b.clone();
        let mut dp_b = b.run(move || Dataplane::start(&c, sh).expect("data plane starts on b"));
        let view_b = shared_b.peers.borrow().clone();
        assert_eq!(view_b.ready.get("node-a"), Some(&1), "{view_b:?}");
        dp_b = b.run(move || {
            dp_b.set_rules(Some(rules_b));
            dp_b.set_peers(view_b);
            dp_b.scan_devices();
            dp_b.sync().expect("maps updated on b");
            dp_b
        });
        let capture = Capture::start(&a, "ul");
        let got_b = peer_udp(&pod_b);
        send(&pod_a, "10.2.0.7", 5432, 6);
        let pcap = capture.stop();
        let counts = dp.counters_of(policy).unwrap();
        assert_eq!(counts.encrypted_packets, 6, "{counts:?}");
        assert_eq!(
            udp_reaches(&pod_b, got_b + 6),
            got_b + 6,
            "covered datagrams delivered"
        );
        assert!(
            !contains(&pcap, b"keyd-marker"),
            "plaintext marker on the wire"
        );
        let summary = Capture::summarize(&pcap);
        assert!(
            summary.contains("192.168.81.1.51871 > 192.168.81.2.51871"),
            "{summary}"
        );
        for line in summary.lines().filter(|l| l.contains(" IP ")) {
            assert!(line.contains(".51871 > "), "not WireGuard: {line}");
        }

        // 3. The steering route to node-b is removed behind node-shim's back: covered packets
        // hit the blackhole rule, never the clear path.
        a.sh("ip route del 10.2.0.0/24 table 27493");
        let capture = Capture::start(&a, "ul");
        let got_b = peer_udp(&pod_b);
        send(&pod_a, "10.2.0.7", 5432, 4);
        let pcap = capture.stop();
        assert_eq!(
            peer_udp(&pod_b),
            got_b,
            "a covered datagram arrived without its route"
        );
        assert!(
            !contains(&pcap, b"keyd-marker"),
            "plaintext marker on the wire: {}\n{}",
            Capture::summarize(&pcap),
            a.sh("ip rule show; ip route show table all | grep -v local")
        );
        // The agent's next pass puts the route back and says the tunnel is ready again.
        agent_a.reconcile(true).unwrap();
        assert_eq!(shared_a.peers.borrow().ready.get("node-b"), Some(&1));

        let metrics = shared_a.metrics.encode();
        assert!(
            metrics.contains(&format!(
                "node_shim_policy_packets_total{{policy=\"{policy}\",outcome=\"encrypted\"}} 6"
            )),
            "{metrics}"
        );
        // Every node_shim_* metric the shipped alerting rules and dashboard query is served by
        // an agent and data plane at work (deploy/monitoring/).
        let missing = keyd_tests::monitoring::missing(&metrics, "node_shim_", &[]);
        assert!(
            missing.is_empty(),
            "deploy/monitoring/ queries metrics node-shim does not serve: {missing:?}"
        );
        drop(dp);
        drop(dp_b);
        agent_a.kernel_mut().delete_wg_device().unwrap();
        agent_b.kernel_mut().delete_wg_device().unwrap();
    });
}

/// With a pin directory on a bpffs, node-shim's exit leaves the program attached and the maps
/// full, so strict policies keep dropping while it restarts; the next start replaces the
/// program without a gap and finds the maps as they were.
fn restart_scenario(attach: AttachMode) {
    let t = topology();
    let pins = tempfile::tempdir().unwrap();
    let mount = std::process::Command::new("mount")
        .args(["-t", "bpf", "bpf"])
        .arg(pins.path())
        .status()
        .unwrap();
    assert!(mount.success(), "mount -t bpf");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(pins.path().to_owned());
    let pin_dir = pins.path().join("keyd-node-shim");
    assert!(keyd_node_shim::kernel::ebpf::is_bpffs(&pin_dir));
    let settings = move || EbpfSettings {
        attach,
        pin_dir: Some(pin_dir.clone()),
        priority: 0x6b65,
    };

    let mut slots = Slots::default();
    let c = compile(&rules(true, 5432), &mut slots);
    let db = slots.policies["EncryptionPolicy shop/db"];
    let s1 = settings.clone();
    let c1 = c.clone();
    let ids: Vec<(u32, steering::SlotId)> = slots
        .policies
        .iter()
        .map(|(n, s)| (*s, steering::slot_id(n)))
        .collect();
    let node_ids: Vec<(u32, steering::SlotId)> = slots
        .nodes
        .iter()
        .map(|(n, s)| (*s, steering::slot_id(n)))
        .collect();
    let st = t.node.run(move || {
        let mut st = Steering::load(s1()).unwrap();
        st.attach("lxc0", Hook::PodIngress).unwrap();
        st.attach("ul0", Hook::UnderlayEgress).unwrap();
        st.apply(&steering::diff(None, &c1)).unwrap();
        st.write_slot_ids(false, &ids).unwrap();
        st.write_slot_ids(true, &node_ids).unwrap();
        st
    });
    // node-b not ready: strict drops. Then the process "exits".
    send(&t.pod, "10.2.0.7", 5432, 3);
    assert_eq!(st.counters(db).unwrap().dropped_packets, 3);
    drop(st);
    let clear = peer_udp(&t.peer);
    send(&t.pod, "10.2.0.7", 5432, 3);
    assert_eq!(
        peer_udp(&t.peer),
        clear,
        "covered traffic leaked while node-shim was away"
    );

    // The next starts: same maps (rules and counters), programs replaced in place, on the pod
    // device's ingress and on the underlay's egress alike (three starts: with netlink filters,
    // each takes the priority the last one left free and removes the last one's filter).
    for _ in 0..2 {
        let s2 = settings.clone();
        t.node.run(move || {
            let mut st = Steering::load(s2()).unwrap();
            st.attach("lxc0", Hook::PodIngress).unwrap();
            st.attach("ul0", Hook::UnderlayEgress).unwrap();
            // Exits without detaching (as a restart does).
            drop(st);
        });
    }
    let s2 = settings.clone();
    let st = t.node.run(move || {
        let mut st = Steering::load(s2()).unwrap();
        st.attach("lxc0", Hook::PodIngress).unwrap();
        st.attach("ul0", Hook::UnderlayEgress).unwrap();
        st
    });
    assert_eq!(st.read().unwrap(), c, "the pinned maps kept the rules");
    // ... and who holds each slot: the same rules compile to the same contents after a
    // restart, so the first update changes nothing.
    let (p_ids, n_ids) = st.read_slot_ids().unwrap();
    let mut fresh = Slots::with_hints(p_ids, n_ids);
    let again = compile(&rules(true, 5432), &mut fresh);
    assert_eq!(fresh.policies, slots.policies);
    assert_eq!(fresh.nodes, slots.nodes);
    assert!(steering::diff(Some(&c), &again).is_empty());
    assert_eq!(
        st.counters(db).unwrap().dropped_packets,
        6,
        "and the counters"
    );
    if attach == AttachMode::Netlink {
        let shown = t.node.sh("tc filter show dev lxc0 ingress");
        assert_eq!(
            shown.lines().filter(|l| l.contains("keyd_steer")).count(),
            1,
            "the old filter was replaced, not doubled: {shown}"
        );
        let shown = t.node.sh("tc filter show dev ul0 egress");
        assert_eq!(
            shown.lines().filter(|l| l.contains("keyd_guard")).count(),
            1,
            "the old guard was replaced, not doubled: {shown}"
        );
    }
    send(&t.pod, "10.2.0.7", 5432, 2);
    assert_eq!(st.counters(db).unwrap().dropped_packets, 8);

    // An upgrade whose maps have another layout: stand the current maps' folder in for an
    // earlier version's. The new load does not reuse (and misread) them: it creates its own,
    // empty, says it replaces another layout, and removes the old pins when told to.
    let layout = pins.path().join("keyd-node-shim").join(format!(
        "maps-{}",
        keyd_node_shim::kernel::ebpf::map_layout()
    ));
    let old = pins
        .path()
        .join("keyd-node-shim")
        .join("maps-0000000000000000");
    std::fs::rename(&layout, &old).unwrap();
    let s3 = settings.clone();
    let mut upgraded = t.node.run(move || Steering::load(s3()).unwrap());
    assert!(upgraded.replaces_another_layout());
    assert_eq!(
        upgraded.read().unwrap().settings.node_mode,
        NodeMode::Off,
        "new maps are empty"
    );
    // The attached program still enforces with the old maps meanwhile.
    let clear = peer_udp(&t.peer);
    send(&t.pod, "10.2.0.7", 5432, 2);
    assert_eq!(st.counters(db).unwrap().dropped_packets, 10);
    assert_eq!(peer_udp(&t.peer), clear);
    upgraded.remove_stale_pins();
    assert!(!old.exists());
    drop(upgraded);
    t.node.run(move || {
        let mut st = st;
        st.detach("lxc0", Hook::PodIngress);
        st.detach("ul0", Hook::UnderlayEgress);
    });
}

#[test]
fn privileged_steering_survives_a_restart_with_tcx_pins() {
    if !prerequisites(&["ip", "bash", "mount"]) {
        return;
    }
    restart_scenario(AttachMode::Tcx);
}

#[test]
fn privileged_steering_survives_a_restart_with_netlink_filters() {
    if !prerequisites(&["ip", "bash", "mount", "tc"]) {
        return;
    }
    restart_scenario(AttachMode::Netlink);
}
