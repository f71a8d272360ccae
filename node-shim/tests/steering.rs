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
use keyd_node_shim::kernel::ebpf::{AttachMode, EbpfSettings, Steering};
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

fn rules(strict: bool, port: u16) -> NodeRules {
    NodeRules {
        node: "node-a".into(),
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
        endpoints: vec![
            RuleEndpoint {
                prefix: "10.1.0.5/32".parse().unwrap(),
                node: "node-a".into(),
                selected_by: vec![0],
                peer_of: vec![],
            },
            RuleEndpoint {
                prefix: "fd00:1::5/128".parse().unwrap(),
                node: "node-a".into(),
                selected_by: vec![0],
                peer_of: vec![],
            },
            RuleEndpoint {
                prefix: "10.2.0.0/24".parse().unwrap(),
                node: "node-b".into(),
                selected_by: vec![],
                peer_of: vec![0],
            },
            RuleEndpoint {
                prefix: "fd00:2::/64".parse().unwrap(),
                node: "node-b".into(),
                selected_by: vec![],
                peer_of: vec![0],
            },
        ],
        rejected: vec![],
    }
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
        st.attach("lxc0").expect("attach");
        st
    });
    if attach == AttachMode::Netlink {
        let shown = t.node.sh("tc filter show dev lxc0 ingress");
        assert!(shown.contains("keyd_steer"), "cls_bpf filter: {shown}");
    }
    let insns = st.verified_instructions();
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
    st.apply(&steering::readiness_ops(&ready, &BTreeMap::new()))
        .unwrap();
    let clear = peer_udp(&t.peer);
    send(&t.pod, "10.2.0.7", 8080, 6);
    assert_eq!(
        st.counters(slot).unwrap().dropped_packets - before.dropped_packets,
        6
    );
    assert_eq!(peer_udp(&t.peer), clear, "all-mode strict leaked");

    // Detached: nothing is counted any more.
    t.node.run(move || {
        st.detach("lxc0");
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
