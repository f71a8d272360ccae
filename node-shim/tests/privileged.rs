//! Privileged tests on the host kernel, each in fresh network namespaces: XFRM policies, the
//! reconciler against real netlink, and userspace WireGuard (boringtun) end to end with keyd.
//!
//! They need root (CAP_NET_ADMIN, namespaces, TUN). Without it they print why and pass, except
//! in CI (`CI=true`), where a missing prerequisite fails the test. The host kernel has no ESP
//! and no WireGuard module, so ESP states and kernel WireGuard are tested in the VM harness
//! (tests/vm) instead.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use keyd_node_shim::kernel::Kernel;
use keyd_node_shim::kernel::netlink::{NetlinkKernel, WgImpl};
use keyd_node_shim::model::{Op, PolicyDir, PolicyId, PolicySpec, Template};
use keyd_node_shim::reconcile::{self, Inputs};
use keyd_node_shim::secret::Key32;
use keyd_proto::{NodeBundle, SecretBytes, WireguardBundle, WireguardPeer};

#[test]
fn privileged_xfrm_policies_in_a_fresh_netns() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let ns = NetNs::new("xfrm");
    ns.sh("ip link add ul0 type veth peer name ul1 && ip addr add 192.168.77.1/24 dev ul0 && ip link set ul0 up && ip link set ul1 up");
    // Someone else's policy: must be neither reported nor touched.
    ns.sh("ip xfrm policy add src 10.9.0.0/24 dst 10.8.0.0/24 dir out tmpl src 192.168.77.1 dst 192.168.77.9 proto esp mode tunnel reqid 7");
    let cfg = config_ipsec("node-a", "192.168.77.1", "10.1.0.0/24");
    let mut k = ns.run(move || NetlinkKernel::open(&cfg).unwrap());
    assert!(
        k.observe().unwrap().policies.is_empty(),
        "foreign policy reported"
    );

    let out = |spi| PolicySpec {
        id: PolicyId {
            src: "10.1.0.0/24".parse().unwrap(),
            dst: "10.2.0.0/24".parse().unwrap(),
            dir: PolicyDir::Out,
            mark: None,
        },
        priority: 0x2000,
        tmpl: Template {
            src: "192.168.77.1".parse().unwrap(),
            dst: "192.168.77.2".parse().unwrap(),
            spi,
            reqid: keyd_node_shim::config::DEFAULT_REQID,
            optional: false,
        },
    };
    let inbound = |dir| PolicySpec {
        id: PolicyId {
            src: "10.2.0.0/24".parse().unwrap(),
            dst: "10.1.0.0/24".parse().unwrap(),
            dir,
            mark: None,
        },
        priority: 0x2000,
        tmpl: Template {
            src: "192.168.77.2".parse().unwrap(),
            dst: "192.168.77.1".parse().unwrap(),
            spi: 0,
            reqid: keyd_node_shim::config::DEFAULT_REQID,
            optional: false,
        },
    };
    let want = [out(1), inbound(PolicyDir::In), inbound(PolicyDir::Fwd)];
    k.apply(&want.map(Op::XfrmPolicySet)).unwrap();
    let got = k.observe().unwrap().policies;
    assert_eq!(got.len(), 3);
    for p in &want {
        assert_eq!(got.get(&p.id), Some(p), "{p:?}");
    }
    let shown = ns.sh("ip xfrm policy show");
    assert!(shown.contains("spi 0x00000001"), "{shown}");
    assert!(shown.contains("dir fwd"), "{shown}");

    // The outbound switch: the policy is updated in place, to the new SPI.
    k.apply(&[Op::XfrmPolicySet(out(2))]).unwrap();
    let got = k.observe().unwrap().policies;
    assert_eq!(got[&out(2).id].tmpl.spi, 2);
    // Idempotent.
    k.apply(&[Op::XfrmPolicySet(out(2))]).unwrap();

    // Policy mode's outbound policy matches only marked packets: a policy of its own beside the
    // unmarked one, told apart by the mark, and deleted by it.
    let mut marked = out(3);
    marked.id.mark = Some(keyd_node_shim::model::Mark {
        value: 0x20,
        mask: 0xf0,
    });
    k.apply(&[Op::XfrmPolicySet(marked)]).unwrap();
    let got = k.observe().unwrap().policies;
    assert_eq!(got.len(), 4, "{got:?}");
    assert_eq!(got.get(&marked.id), Some(&marked));
    assert_eq!(got[&out(2).id].tmpl.spi, 2, "the unmarked one is untouched");
    let shown = ns.sh("ip xfrm policy show");
    assert!(shown.contains("mark 0x20/0xf0"), "{shown}");
    k.apply(&[Op::XfrmPolicyDel(marked.id)]).unwrap();
    assert_eq!(k.observe().unwrap().policies.len(), 3);

    k.apply(&want.map(|p| Op::XfrmPolicyDel(p.id))).unwrap();
    assert!(k.observe().unwrap().policies.is_empty());
    let shown = ns.sh("ip xfrm policy show");
    assert!(
        shown.contains("10.9.0.0/24"),
        "foreign policy removed: {shown}"
    );
    // Deleting what is not there is an error (the reconciler never asks for it).
    let e = k.apply(&[Op::XfrmPolicyDel(out(1).id)]).unwrap_err();
    assert_eq!(e.source.errno(), Some(2), "{e}");
}

fn wg_bundle(own: &str, peers: &[(&str, &Key32, &str, &str, u8)], epoch: u64) -> NodeBundle {
    NodeBundle {
        node: own.into(),
        revision: format!("r{epoch}"),
        ipsec: None,
        wireguard: WireguardBundle {
            epoch,
            node_key_epoch: 1,
            peers: peers
                .iter()
                .map(|(node, key, ip, cidr, psk)| WireguardPeer {
                    node: (*node).into(),
                    public_key: key.public_key().to_base64(),
                    endpoint: ip.parse().unwrap(),
                    allowed_ips: cidr.split(',').map(|c| c.parse().unwrap()).collect(),
                    preshared_key: SecretBytes::new(vec![*psk; 32]),
                })
                .collect(),
        },
    }
}

#[test]
fn privileged_reconciler_against_real_netlink() {
    if !prerequisites(&["ip"]) {
        return;
    }
    let ns = NetNs::new("recon");
    ns.sh("ip link add ul0 type veth peer name ul1 && ip addr add 192.168.78.1/24 dev ul0 && ip link set ul0 up && ip link set ul1 up");
    let cfg = config_wg_userspace("node-a", "192.168.78.1", "10.1.0.0/24", "kswg0");
    let cfg2 = cfg.clone();
    let mut k = ns.run(move || NetlinkKernel::open(&cfg2).unwrap());
    assert_eq!(k.wg_impl(), Some(WgImpl::Userspace));
    let facts = reconcile::NodeFacts {
        name: "node-a".into(),
        endpoint: "192.168.78.1".parse().unwrap(),
        pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        boot_id: "11111111-2222-3333-4444-555555555555".into(),
    };
    let own = Key32::random().unwrap();
    let (kb, kc, kd) = (
        Key32::random().unwrap(),
        Key32::random().unwrap(),
        Key32::random().unwrap(),
    );
    let marks = BTreeMap::new();
    let sync = |k: &mut NetlinkKernel, bundle: &NodeBundle| {
        let observed = k.observe().unwrap();
        let c = reconcile::desired(&Inputs {
            bundle,
            facts: &facts,
            config: &cfg,
            wg_private_key: Some(&own),
            wg_key_epoch: 1,
            outbound_spi: None,
            marks: &marks,
        });
        let p = reconcile::plan(&c.desired, &observed);
        k.apply(&p.ensure).unwrap();
        k.apply(&p.remove).unwrap();
        let after = k.observe().unwrap();
        (
            p,
            reconcile::ack(&c, &after, cfg.mode, bundle.wireguard.epoch),
            after,
        )
    };

    let b1 = wg_bundle(
        "node-a",
        &[
            // IPv4 and IPv6: the kernel lists an IPv6 route added without a metric with 1024.
            ("node-b", &kb, "192.168.78.2", "10.2.0.0/24,fd00:2::/64", 1),
            ("node-c", &kc, "192.168.78.3", "10.3.0.0/24", 2),
        ],
        1,
    );
    let (p, ack, after) = sync(&mut k, &b1);
    assert!(!p.ensure.is_empty());
    assert_eq!(ack.wireguard_epoch, Some(1), "all peers programmed");
    let wg = after.wg.unwrap();
    assert!(wg.up);
    assert_eq!(wg.public_key, Some(own.public_key()));
    assert_eq!(wg.listen_port, 51871);
    assert_eq!(wg.peers.len(), 2);
    assert_eq!(wg.routes.len(), 3);
    let routes = ns.sh("ip route show");
    assert!(
        routes.contains("10.2.0.0/24 dev kswg0 proto 199"),
        "{routes}"
    );
    // A route someone else put on the device is not ours: untouched, unreported.
    ns.sh("ip route add 10.200.0.0/24 dev kswg0");

    // Real kernel, second pass: nothing to do (the IPv6 route reads back as it is desired).
    let (p, _, _) = sync(&mut k, &b1);
    assert!(p.is_empty(), "not idempotent: {p:?}");

    // New epoch (new preshared keys), c leaves, d joins.
    let b2 = wg_bundle(
        "node-a",
        &[
            ("node-b", &kb, "192.168.78.2", "10.2.0.0/24,fd00:2::/64", 3),
            ("node-d", &kd, "192.168.78.4", "10.4.0.0/24", 4),
        ],
        2,
    );
    let (p, ack, after) = sync(&mut k, &b2);
    let upserted: usize = p
        .ensure
        .iter()
        .map(|o| match o {
            Op::WgUpsertPeers(v) => v.len(),
            _ => 0,
        })
        .sum();
    assert_eq!(upserted, 2, "b (new psk) and d: {p:?}");
    assert_eq!(ack.wireguard_epoch, Some(2), "{after:?}");
    let wg = after.wg.unwrap();
    assert_eq!(
        wg.peers.keys().copied().collect::<Vec<_>>().len(),
        2,
        "c removed"
    );
    assert!(!wg.peers.contains_key(&kc.public_key()));
    assert_eq!(
        wg.peers[&kb.public_key()].preshared_key,
        Some(Key32::from_bytes([3; 32]).fingerprint())
    );
    let routes = ns.sh("ip route show");
    assert!(!routes.contains("10.3.0.0/24"), "{routes}");
    assert!(routes.contains("10.4.0.0/24 dev kswg0"), "{routes}");
    assert!(
        routes.contains("10.200.0.0/24 dev kswg0"),
        "foreign route removed: {routes}"
    );
    let (p, _, _) = sync(&mut k, &b2);
    assert!(p.is_empty(), "{p:?}");
    k.delete_wg_device().unwrap();
    drop(k);
    // boringtun's device goes away with its threads.
    for _ in 0..50 {
        if !ns.sh("ip link show").contains("kswg0") {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("userspace device still present");
}

#[test]
fn privileged_userspace_wireguard_end_to_end() {
    if !prerequisites(&["ip", "ping", "tcpdump"]) {
        return;
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let keyd = KeydHarness::start().await;
        // Two nodes joined by an underlay link; each routes a pod CIDR held on its loopback.
        let a = NetNs::new("usa");
        let b = NetNs::new("usb");
        link_pair(&a, "ul", "192.168.79.1/24", &b, "ul", "192.168.79.2/24");
        a.sh("ip addr add 10.1.0.1/32 dev lo && ip link set lo up");
        b.sh("ip addr add 10.2.0.1/32 dev lo && ip link set lo up");

        let mut agents = Vec::new();
        for (ns, name, ip, cidr) in [
            (&a, "node-a", "192.168.79.1", "10.1.0.0/24"),
            (&b, "node-b", "192.168.79.2", "10.2.0.0/24"),
        ] {
            let cfg = config_wg_userspace(name, ip, cidr, "uswg0");
            let cfg = keyd.point_at(cfg, name);
            agents.push(start_agent(ns, cfg).await);
        }
        // Two rounds each: register (peers appear once both have), then program.
        for _ in 0..3 {
            for (agent, _) in &mut agents {
                agent.step().await;
            }
        }
        for (_, shared) in &agents {
            let s = shared.snapshot();
            assert_eq!(s.peers, 1, "{s:?}");
            assert_eq!(
                s.acked.as_ref().and_then(|a| a.wireguard_epoch),
                Some(1),
                "{s:?}"
            );
        }
        let capture = Capture::start(&a, "ul");
        let out =
            a.sh_status("ping -c 3 -W 2 -i 0.3 -p 4b4559442d4d41524b4552 -I 10.1.0.1 10.2.0.1");
        assert!(out.0, "ping through userspace WireGuard failed:\n{}", out.1);
        let pcap = capture.stop();
        assert!(
            !contains(&pcap, b"KEYD-MARKER"),
            "plaintext marker on the wire"
        );
        let summary = Capture::summarize(&pcap);
        eprintln!("capture: {} bytes\n{summary}", pcap.len());
        assert!(summary.contains("UDP, length"), "{summary}");
        assert!(
            summary.contains("192.168.79.1.51871 > 192.168.79.2.51871"),
            "{summary}"
        );
        // Every IPv4 packet on the underlay is WireGuard UDP (ARP and IPv6 neighbour discovery
        // are link housekeeping, not pod traffic).
        for line in summary.lines().filter(|l| l.contains(" IP ")) {
            assert!(
                line.contains(".51871 > ") && line.contains("UDP"),
                "not WireGuard: {line}"
            );
        }
        // keyd recorded the acknowledgements.
        let nodes = keyd.keyd.list_nodes();
        assert!(
            nodes.iter().all(|n| n.acked.ack.wireguard_epoch == Some(1)),
            "{nodes:?}"
        );
        for (agent, _) in &mut agents {
            agent.kernel_mut().delete_wg_device().unwrap();
        }
    });
}
