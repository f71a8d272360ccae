//! The eBPF steering program, measured on this machine's kernel (root needed):
//!
//! 1. Map updates: a rule set of 10,000 pods and 1,000 policies compiled and written into the
//!    maps from empty, then one change (a pod joins a policy), side by side with the floor: the
//!    same number of bare map writes of the same entries.
//! 2. Per-packet cost: TCP throughput from a pod through the node to a peer (veths in network
//!    namespaces) with the program attached and steering every packet, against the same path
//!    without the program, alternated over rounds.
//! 3. The instructions the verifier processed.
//!
//! `cargo bench -p keyd-node-shim --bench steering`; results go to docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{Read as _, Write as _};
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use keyd_node_shim::kernel::ebpf::{AttachMode, EbpfSettings, Hook, Steering};
use keyd_node_shim::steering::{self, Marks, NodeMode, READY_WIREGUARD, Settings, Slots};
use keyd_proto::EncryptionMode;
use keyd_proto::rules::{L4Protocol, NodeRules, RuleEndpoint, RulePolicy, RulePort};

const ROUNDS: usize = 3;

fn sh(ns: &str, cmd: &str) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "sh", "-c", cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn in_ns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let path = PathBuf::from("/run/netns").join(ns);
    std::thread::spawn(move || {
        let fd = std::fs::File::open(&path).unwrap();
        nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
    .join()
    .unwrap()
}

fn settings() -> Settings {
    Settings {
        node_mode: NodeMode::Policy,
        all_mode: EncryptionMode::Wireguard,
        all_strict: true,
        marks: Marks {
            mask: 0xf0,
            wireguard: 0x10,
            ipsec: 0x20,
        },
    }
}

/// 100 local pods and 9,900 remote ones on 99 nodes; policy i selects local pod i % 100 and has
/// ten remote pods as peers, on port 1000 + i.
fn big_rules() -> NodeRules {
    let mut endpoints = Vec::new();
    let mut selected: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    let mut peer_of: BTreeMap<u32, Vec<u32>> = BTreeMap::new();
    for i in 0..1000u32 {
        selected.entry(i % 100).or_default().push(i);
        for k in 0..10 {
            peer_of.entry((i * 7 + k) % 9900).or_default().push(i);
        }
    }
    for p in 0..100u32 {
        endpoints.push(RuleEndpoint {
            prefix: format!("10.0.0.{}/32", p + 1).parse().unwrap(),
            node: "node-0".into(),
            selected_by: selected.remove(&p).unwrap_or_default(),
            peer_of: vec![],
        });
    }
    for r in 0..9900u32 {
        let node = 1 + r / 100;
        endpoints.push(RuleEndpoint {
            prefix: format!("10.{}.{}.{}/32", node / 250 + 1, node % 250, r % 100 + 1)
                .parse()
                .unwrap(),
            node: format!("node-{node}"),
            selected_by: vec![],
            peer_of: peer_of.remove(&r).unwrap_or_default(),
        });
    }
    NodeRules {
        node: "node-0".into(),
        revision: "big".into(),
        policies: (0..1000)
            .map(|i| RulePolicy {
                name: format!("EncryptionPolicy ns/p{i:04}"),
                mode: EncryptionMode::Wireguard,
                strict: true,
                ports: vec![RulePort {
                    protocol: L4Protocol::Tcp,
                    port: 1000 + i as u16,
                }],
            })
            .collect(),
        endpoints,
        rejected: vec![],
    }
}

fn compile(r: &NodeRules, slots: &mut Slots) -> steering::Contents {
    let remote: Vec<&str> = r
        .endpoints
        .iter()
        .filter(|e| e.node != r.node)
        .map(|e| e.node.as_str())
        .collect();
    slots.assign(r.policies.iter().map(|p| p.name.as_str()), remote);
    steering::from_rules(r, &r.node, slots, settings()).0
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn maps() {
    let rules = big_rules();
    let mut full = Vec::new();
    let mut floor = Vec::new();
    let mut one = Vec::new();
    let mut ops_full = 0;
    let mut ops_one = 0;
    for _ in 0..ROUNDS {
        let mut st = Steering::load(EbpfSettings {
            attach: AttachMode::Auto,
            pin_dir: None,
            priority: 0x6b65,
        })
        .unwrap();
        let t = Instant::now();
        let mut slots = Slots::default();
        let c = compile(&rules, &mut slots);
        let ops = steering::diff(None, &c);
        st.apply(&ops).unwrap();
        full.push(t.elapsed().as_secs_f64());
        ops_full = ops.len();
        // The floor: the same writes with nothing computed.
        let t = Instant::now();
        st.apply(&ops).unwrap();
        floor.push(t.elapsed().as_secs_f64());
        // One change: a remote pod becomes a peer of policy 0.
        let mut changed = rules.clone();
        changed.endpoints[500].peer_of.push(0);
        let t = Instant::now();
        let c2 = compile(&changed, &mut slots);
        let ops = steering::diff(Some(&c), &c2);
        st.apply(&ops).unwrap();
        one.push(t.elapsed().as_secs_f64());
        ops_one = ops.len();
    }
    let (full, floor, one) = (median(full), median(floor), median(one));
    println!(
        "maps: 10,000 pods, 1,000 policies from empty: {:.1} ms ({ops_full} map writes), bare writes {:.1} ms, ratio {:.2}",
        full * 1e3,
        floor * 1e3,
        full / floor
    );
    println!(
        "maps: one change: {:.2} ms ({ops_one} map writes; compile and diff of the whole set included)",
        one * 1e3
    );
}

struct Ns(String);
impl Drop for Ns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ns(tag: &str) -> Ns {
    let name = format!("bst{tag}{}", std::process::id());
    assert!(
        Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success()
    );
    sh(&name, "ip link set lo up");
    Ns(name)
}

fn link(a: &Ns, an: &str, aip: &str, b: &Ns, bn: &str, bip: &str) {
    sh(
        &a.0,
        &format!(
            "ip link add {an} type veth peer name {bn}x && ip link set {bn}x netns {}",
            b.0
        ),
    );
    sh(&b.0, &format!("ip link set {bn}x name {bn}"));
    sh(
        &a.0,
        &format!("ip addr add {aip} dev {an} && ip link set {an} up"),
    );
    sh(
        &b.0,
        &format!("ip addr add {bip} dev {bn} && ip link set {bn} up"),
    );
}

/// Bytes per second of one TCP stream from the pod to the peer for `secs`.
fn stream(pod: &str, peer: &str, secs: f64) -> f64 {
    let listener = in_ns(peer, || {
        std::net::TcpListener::bind("10.2.0.7:5432").unwrap()
    });
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0u64;
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        total
    });
    let took = in_ns(pod, move || {
        let mut c = std::net::TcpStream::connect("10.2.0.7:5432").unwrap();
        let buf = vec![0x5au8; 1 << 16];
        let t = Instant::now();
        while t.elapsed().as_secs_f64() < secs {
            c.write_all(&buf).unwrap();
        }
        t.elapsed().as_secs_f64()
    });
    let bytes = server.join().unwrap();
    bytes as f64 / took
}

fn throughput() {
    let pod = ns("pod");
    let node = ns("node");
    let peer = ns("peer");
    link(&node, "lxc0", "10.1.0.1/24", &pod, "pod0", "10.1.0.5/24");
    link(
        &node,
        "ul0",
        "192.168.90.1/24",
        &peer,
        "ul1",
        "192.168.90.2/24",
    );
    sh(&pod.0, "ip route add default via 10.1.0.1");
    sh(
        &peer.0,
        "ip addr add 10.2.0.7/32 dev lo && ip route add 10.1.0.0/24 via 192.168.90.1",
    );
    sh(
        &node.0,
        "sysctl -qw net.ipv4.ip_forward=1 && ip route add 10.2.0.0/24 via 192.168.90.2",
    );
    // Marked packets take the same path, so the two runs differ only by the program.
    sh(
        &node.0,
        "ip route add 10.2.0.0/24 via 192.168.90.2 table 100 && ip rule add fwmark 0x10/0xf0 lookup 100",
    );
    let rules = NodeRules {
        node: "node-a".into(),
        revision: "r".into(),
        policies: vec![RulePolicy {
            name: "p".into(),
            mode: EncryptionMode::Wireguard,
            strict: true,
            ports: vec![RulePort {
                protocol: L4Protocol::Tcp,
                port: 5432,
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
                prefix: "10.2.0.0/24".parse().unwrap(),
                node: "node-b".into(),
                selected_by: vec![],
                peer_of: vec![0],
            },
        ],
        rejected: vec![],
    };
    let mut slots = Slots::default();
    slots.assign(["p"], ["node-b"]);
    let c = steering::from_rules(&rules, "node-a", &slots, settings()).0;
    let ready = BTreeMap::from([(slots.nodes["node-b"], READY_WIREGUARD)]);
    let mut st = in_ns(&node.0, || {
        Steering::load(EbpfSettings {
            attach: AttachMode::Auto,
            pin_dir: None,
            priority: 0x6b65,
        })
        .unwrap()
    });
    st.apply(&steering::diff(None, &c)).unwrap();
    st.apply(&steering::readiness_ops(&BTreeMap::new(), &ready))
        .unwrap();
    let _ = stream(&pod.0, &peer.0, 0.5); // warm up
    let (mut with, mut without) = (Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        without.push(stream(&pod.0, &peer.0, 2.0));
        st = in_ns(&node.0, move || {
            st.attach("lxc0", Hook::PodIngress).unwrap();
            st
        });
        with.push(stream(&pod.0, &peer.0, 2.0));
        st = in_ns(&node.0, move || {
            st.detach("lxc0", Hook::PodIngress);
            st
        });
    }
    let slot = slots.policies["p"];
    let steered = st.counters(slot).unwrap().encrypted_packets;
    assert!(steered > 0, "the program steered nothing");
    let (w, wo) = (median(with), median(without));
    println!(
        "throughput: TCP through the node, program steering every packet {:.2} Gbit/s, without it {:.2} Gbit/s, ratio {:.3} (medians of {ROUNDS}; {steered} packets steered)",
        w * 8.0 / 1e9,
        wo * 8.0 / 1e9,
        w / wo
    );
    let insns = in_ns(&node.0, move || st.verified_instructions(Hook::PodIngress));
    println!("verifier: {insns:?} instructions processed");
}

fn main() {
    if !keyd_tests::prereq::is_root() {
        eprintln!("the steering benchmark needs root (BPF and network namespaces)");
        std::process::exit(1);
    }
    println!(
        "kernel {}",
        std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap()
            .trim()
    );
    maps();
    throughput();
}
