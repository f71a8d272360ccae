use keyd_proto::rules::{L4Protocol, RuleEndpoint, RulePolicy, RulePort};

use super::*;

fn base() -> Settings {
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

fn policy(name: &str, mode: EncryptionMode, strict: bool, ports: &[u16]) -> RulePolicy {
    RulePolicy {
        name: name.into(),
        mode,
        strict,
        ports: ports
            .iter()
            .map(|p| RulePort {
                protocol: L4Protocol::Tcp,
                port: *p,
            })
            .collect(),
    }
}

fn ep(prefix: &str, node: &str, selected_by: &[u32], peer_of: &[u32]) -> RuleEndpoint {
    RuleEndpoint {
        prefix: prefix.parse().unwrap(),
        node: node.into(),
        selected_by: selected_by.to_vec(),
        peer_of: peer_of.to_vec(),
    }
}

/// Two policies: `db` (WireGuard, strict, port 5432) selects a local pod, its peers are every
/// pod of node-b (its pod CIDR); `cache` (IPsec, not strict, every port) selects a pod on
/// node-b whose peer is the same local pod.
fn rules() -> NodeRules {
    NodeRules {
        node: "node-a".into(),
        revision: "r1".into(),
        policies: vec![
            policy(
                "EncryptionPolicy shop/cache",
                EncryptionMode::Ipsec,
                false,
                &[],
            ),
            policy(
                "EncryptionPolicy shop/db",
                EncryptionMode::Wireguard,
                true,
                &[5432],
            ),
        ],
        endpoints: vec![
            ep("10.1.0.5/32", "node-a", &[1], &[0]),
            ep("10.2.0.0/24", "node-b", &[], &[1]),
            ep("10.2.0.7/32", "node-b", &[0], &[]),
        ],
        rejected: vec![],
    }
}

fn slots_for(r: &NodeRules) -> Slots {
    let mut s = Slots::default();
    let full = s.assign(
        r.policies.iter().map(|p| p.name.as_str()),
        r.endpoints
            .iter()
            .filter(|e| e.node != r.node)
            .map(|e| e.node.as_str()),
    );
    assert!(full.is_empty());
    s
}

#[test]
fn rules_become_bitmaps_and_pod_entries_inherit_their_cidr() {
    let r = rules();
    let slots = slots_for(&r);
    let cache = slots.policies["EncryptionPolicy shop/cache"];
    let db = slots.policies["EncryptionPolicy shop/db"];
    let b = slots.nodes["node-b"];
    assert_ne!(b, 0, "slot 0 is this node");
    let (c, problems) = from_rules(&r, "node-a", &slots, base());
    assert!(problems.is_empty(), "{problems:?}");
    assert_eq!(c.settings.node_mode, NodeMode::Policy);
    assert_eq!(c.policies[&cache], 2, "IPsec");
    assert_eq!(c.policies[&db], 1, "WireGuard");
    assert!(c.strict.get(db) && !c.strict.get(cache));
    assert!(c.any_port.get(cache) && !c.any_port.get(db));
    assert!(c.ports[&(6, 5432)].get(db));

    let local = c.endpoints[&"10.1.0.5/32".parse().unwrap()];
    assert_eq!(local.node, 0);
    assert!(local.selected.get(db) && local.peer.get(cache));
    let cidr = c.endpoints[&"10.2.0.0/24".parse().unwrap()];
    assert_eq!(cidr.node, b);
    assert!(cidr.peer.get(db) && cidr.selected.is_empty());
    // The pod's own entry carries its CIDR's peer bit: the trie returns only the longest match.
    let pod = c.endpoints[&"10.2.0.7/32".parse().unwrap()];
    assert!(pod.selected.get(cache) && pod.peer.get(db), "{pod:?}");
}

#[test]
fn slots_stay_put_and_are_reused_only_once_free() {
    let mut s = Slots::default();
    s.assign(["p/a", "p/c"], ["n1", "n2"]);
    let a = s.policies["p/a"];
    let c = s.policies["p/c"];
    // A policy sorting between them does not move them.
    s.assign(["p/a", "p/b", "p/c"], ["n1", "n2"]);
    assert_eq!((s.policies["p/a"], s.policies["p/c"]), (a, c));
    let b = s.policies["p/b"];
    assert!(b != a && b != c);
    // Removing one frees its slot for the next newcomer.
    s.assign(["p/b", "p/c"], ["n2"]);
    assert!(!s.policies.contains_key("p/a"));
    assert!(!s.nodes.contains_key("n1"));
    s.assign(["p/b", "p/c", "p/d"], ["n2"]);
    assert_eq!(s.policies["p/d"], a);
}

#[test]
fn a_slot_freed_and_wanted_in_one_change_is_not_reused_by_it() {
    let mut s = Slots::default();
    s.assign(["p/a"], ["n1"]);
    let a = s.policies["p/a"];
    let n1 = s.nodes["n1"];
    // p/a goes and p/b comes in the same change: p/b must not take p/a's slot, whose entries
    // are still in the maps until this change is applied.
    s.assign(["p/b"], ["n2"]);
    assert_ne!(s.policies["p/b"], a);
    assert_ne!(s.nodes["n2"], n1);
    // The change after that may reuse it.
    s.assign(["p/b", "p/c"], ["n2", "n3"]);
    assert_eq!(s.policies["p/c"], a);
    assert_eq!(s.nodes["n3"], n1);
}

#[test]
fn slots_run_out_by_name() {
    let names: Vec<String> = (0..MAX_POLICIES + 2).map(|i| format!("p{i:05}")).collect();
    let mut s = Slots::default();
    let full = s.assign(names.iter().map(String::as_str), []);
    assert_eq!(full, ["p01024", "p01025"]);
}

#[test]
fn unknown_index_and_node_are_problems_not_panics() {
    let mut r = rules();
    r.endpoints.push(ep("10.9.0.1/32", "node-z", &[0], &[]));
    r.endpoints.push(ep("10.1.0.6/32", "node-a", &[7], &[]));
    let mut slots = slots_for(&rules());
    slots.nodes.remove("node-z");
    let (c, problems) = from_rules(&r, "node-a", &slots, base());
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(!c.endpoints.contains_key(&"10.9.0.1/32".parse().unwrap()));
    assert!(
        c.endpoints[&"10.1.0.6/32".parse().unwrap()]
            .selected
            .is_empty()
    );
}

#[test]
fn a_prefix_claimed_by_two_nodes_keeps_the_first() {
    let mut r = rules();
    r.endpoints.push(ep("10.2.0.0/24", "node-c", &[], &[0]));
    let mut slots = slots_for(&r);
    slots.assign(
        r.policies.iter().map(|p| p.name.as_str()),
        ["node-b", "node-c"],
    );
    let (c, problems) = from_rules(&r, "node-a", &slots, base());
    assert_eq!(problems.len(), 1);
    assert_eq!(
        c.endpoints[&"10.2.0.0/24".parse().unwrap()].node,
        slots.nodes["node-b"]
    );
}

#[test]
fn all_mode_maps_pod_cidrs_to_nodes_and_keeps_ours() {
    let mut slots = Slots::default();
    slots.assign([], ["node-b", "node-c"]);
    let c = for_all_mode(
        &["10.1.0.0/24".parse().unwrap()],
        &[
            ("node-b".into(), vec!["10.2.0.0/24".parse().unwrap()]),
            ("node-c".into(), vec!["10.1.0.0/24".parse().unwrap()]),
        ],
        &slots,
        base(),
    );
    assert_eq!(c.settings.node_mode, NodeMode::All);
    assert_eq!(c.endpoints[&"10.1.0.0/24".parse().unwrap()].node, 0);
    assert_eq!(
        c.endpoints[&"10.2.0.0/24".parse().unwrap()].node,
        slots.nodes["node-b"]
    );
}

#[test]
fn first_load_writes_settings_last_and_a_reload_writes_nothing() {
    let r = rules();
    let slots = slots_for(&r);
    let (c, _) = from_rules(&r, "node-a", &slots, base());
    let ops = diff(None, &c);
    assert!(matches!(ops.first(), Some(MapOp::Policy { .. })), "{ops:?}");
    assert!(matches!(ops.last(), Some(MapOp::Settings(_))), "{ops:?}");
    assert!(diff(Some(&c), &c).is_empty());
}

#[test]
fn a_change_touches_only_what_changed_widening_before_narrowing() {
    let r = rules();
    let slots = slots_for(&r);
    let (old, _) = from_rules(&r, "node-a", &slots, base());
    let db = slots.policies["EncryptionPolicy shop/db"];
    // db moves from 5432 to 6379, and the local pod leaves it.
    let mut r2 = rules();
    r2.policies[1].ports[0].port = 6379;
    r2.endpoints[0].selected_by.clear();
    let (new, _) = from_rules(&r2, "node-a", &slots, base());
    let ops = diff(Some(&old), &new);
    let pos = |f: &dyn Fn(&MapOp) -> bool| ops.iter().position(f).unwrap();
    let add = pos(&|o| matches!(o, MapOp::PortSet { port: 6379, .. }));
    let ep = pos(&|o| matches!(o, MapOp::EndpointSet { .. }));
    let del = pos(&|o| matches!(o, MapOp::PortDel { port: 5432, .. }));
    assert!(add < ep && ep < del, "{ops:?}");
    assert_eq!(
        ops.iter()
            .filter(|o| matches!(o, MapOp::EndpointSet { .. }))
            .count(),
        1,
        "{ops:?}"
    );
    assert!(!ops.iter().any(|o| matches!(o, MapOp::Settings(_))));
    let MapOp::PortSet { bits, .. } = &ops[add] else {
        unreachable!()
    };
    assert!(bits.get(db));
}

#[test]
fn turning_off_writes_settings_first() {
    let r = rules();
    let slots = slots_for(&r);
    let (old, _) = from_rules(&r, "node-a", &slots, base());
    let off = Contents {
        settings: Settings {
            node_mode: NodeMode::Off,
            ..base()
        },
        endpoints: BTreeMap::new(),
        ports: BTreeMap::new(),
        any_port: Bits::default(),
        strict: Bits::default(),
        policies: BTreeMap::new(),
    };
    let ops = diff(Some(&old), &off);
    assert!(matches!(ops.first(), Some(MapOp::Settings(s)) if s.node_mode == NodeMode::Off));
}

#[test]
fn readiness_changes_and_forgets() {
    let have = BTreeMap::from([(1, READY_WIREGUARD), (2, READY_IPSEC)]);
    let want = BTreeMap::from([(1, READY_WIREGUARD | READY_IPSEC)]);
    assert_eq!(
        readiness_ops(&have, &want),
        [
            MapOp::NodeReady {
                slot: 1,
                flags: READY_WIREGUARD | READY_IPSEC
            },
            MapOp::NodeReady { slot: 2, flags: 0 }
        ]
    );
}

#[test]
fn ipv4_keys_are_mapped_into_ipv6() {
    let (len, addr) = lpm_key(&"10.2.0.0/24".parse().unwrap());
    assert_eq!(len, 120);
    assert_eq!(&addr[10..], &[0xff, 0xff, 10, 2, 0, 0]);
    let (len, addr) = lpm_key(&"fd00::/64".parse().unwrap());
    assert_eq!(len, 64);
    assert_eq!(addr[0], 0xfd);
}

#[test]
fn mapped_ipv6_prefixes_are_refused() {
    let mut r = rules();
    r.endpoints
        .push(ep("::ffff:10.2.0.0/120", "node-b", &[0], &[]));
    let slots = slots_for(&r);
    let (c, problems) = from_rules(&r, "node-a", &slots, base());
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].what.contains("IPv4-mapped"));
    assert_eq!(c.endpoints.len(), 3);
}

#[test]
fn names_of_an_earlier_run_get_their_slots_back() {
    let mut before = Slots::default();
    before.assign(["p/a", "p/b", "p/c"], ["n1", "n2"]);
    // A restart: only the pinned ids are left. p/b is gone, p/0 is new and sorts first.
    let ids = |m: &BTreeMap<String, u32>| m.iter().map(|(n, s)| (slot_id(n), *s)).collect();
    let mut after = Slots::with_hints(ids(&before.policies), ids(&before.nodes));
    after.assign(["p/0", "p/a", "p/c"], ["n2"]);
    assert_eq!(after.policies["p/a"], before.policies["p/a"]);
    assert_eq!(after.policies["p/c"], before.policies["p/c"]);
    assert_eq!(after.nodes["n2"], before.nodes["n2"]);
    // The newcomer does not take the slot p/b held: its entries are still in the maps.
    assert_ne!(after.policies["p/0"], before.policies["p/b"]);
    assert_ne!(after.policies["p/0"], before.policies["p/a"]);
}
