//! Tables of named cases over a small cluster: three nodes, two namespaces, three pods.

use super::*;
use crate::crd::LabelSelectorRequirement;

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

fn selector(pairs: &[(&str, &str)]) -> LabelSelector {
    LabelSelector {
        match_labels: labels(pairs),
        match_expressions: vec![],
    }
}

fn net(s: &str) -> IpNet {
    s.parse().expect("test prefix")
}

fn node(name: &str, cidrs: &[&str]) -> NodeInput {
    NodeInput {
        name: name.into(),
        pod_cidrs: cidrs.iter().map(|c| net(c)).collect(),
    }
}

fn pod(ns: &str, name: &str, app: &str, on: &str, ips: &[&str]) -> PodInput {
    PodInput {
        namespace: ns.into(),
        name: name.into(),
        labels: labels(&[("app", app)]),
        node: Some(on.into()),
        ips: ips
            .iter()
            .map(|ip| ip.parse().expect("test address"))
            .collect(),
        phase: Some("Running".into()),
        host_network: false,
    }
}

fn policy(ns: &str, name: &str, app: &str) -> PolicySource {
    PolicySource {
        id: PolicyRef {
            kind: PolicyKind::Namespaced,
            namespace: ns.into(),
            name: name.into(),
        },
        namespace_selector: None,
        pod_selector: selector(&[("app", app)]),
        mode: Mode::Ipsec,
        strict: true,
        ports: vec![],
        peers: vec![],
    }
}

fn cluster_policy(name: &str, namespaces: &[(&str, &str)]) -> PolicySource {
    PolicySource {
        id: PolicyRef {
            kind: PolicyKind::Cluster,
            namespace: String::new(),
            name: name.into(),
        },
        namespace_selector: Some(selector(namespaces)),
        pod_selector: LabelSelector::default(),
        mode: Mode::Wireguard,
        strict: true,
        ports: vec![],
        peers: vec![],
    }
}

fn peer_pods(app: &str) -> PeerSelector {
    PeerSelector {
        pod_selector: Some(selector(&[("app", app)])),
        namespace_selector: None,
    }
}

fn peer_namespaces(pairs: &[(&str, &str)]) -> PeerSelector {
    PeerSelector {
        pod_selector: None,
        namespace_selector: Some(selector(pairs)),
    }
}

fn port(port: u16, protocol: Protocol) -> PolicyPort {
    PolicyPort { port, protocol }
}

/// n1 runs a/web, n2 runs a/db, n3 runs b/client; namespace a is team=a, b is team=b.
fn cluster(policies: Vec<PolicySource>) -> ClusterState {
    ClusterState {
        nodes: vec![
            node("n1", &["10.1.0.0/24"]),
            node("n2", &["10.2.0.0/24"]),
            node("n3", &["10.3.0.0/24"]),
        ],
        namespaces: [
            ("a".to_owned(), labels(&[("team", "a")])),
            ("b".to_owned(), labels(&[("team", "b")])),
        ]
        .into(),
        pods: vec![
            pod("a", "web", "web", "n1", &["10.1.0.10"]),
            pod("a", "db", "db", "n2", &["10.2.0.20"]),
            pod("b", "client", "client", "n3", &["10.3.0.30"]),
        ],
        policies,
    }
}

fn with(mut state: ClusterState, change: impl FnOnce(&mut ClusterState)) -> ClusterState {
    change(&mut state);
    state
}

/// `NAME MODE strict|lenient [PORTS]`
fn show_policy(p: &RulePolicy) -> String {
    let mode = match p.mode {
        keyd_proto::EncryptionMode::Ipsec => "ipsec",
        keyd_proto::EncryptionMode::Wireguard => "wireguard",
    };
    let strict = if p.strict { "strict" } else { "lenient" };
    let ports: Vec<String> = p
        .ports
        .iter()
        .map(|p| format!("{:?}/{}", p.protocol, p.port))
        .collect();
    format!("{} {mode} {strict} [{}]", p.name, ports.join(","))
}

/// `PREFIX NODE sel=[..] peer=[..]`
fn show_endpoint(e: &RuleEndpoint) -> String {
    format!(
        "{} {} sel={:?} peer={:?}",
        e.prefix, e.node, e.selected_by, e.peer_of
    )
}

struct Case {
    name: &'static str,
    state: ClusterState,
    node: &'static str,
    policies: &'static [&'static str],
    endpoints: &'static [&'static str],
    /// Each rejected policy as `NAME: a part of the reason`.
    rejected: &'static [&'static str],
}

fn check(case: &Case) {
    let all = compile(&case.state);
    let rules = all
        .get(case.node)
        .unwrap_or_else(|| panic!("{}: no rules for {}", case.name, case.node));
    assert_eq!(rules.node, case.node, "{}", case.name);
    let policies: Vec<String> = rules.policies.iter().map(show_policy).collect();
    assert_eq!(policies, case.policies, "{}: policies", case.name);
    let endpoints: Vec<String> = rules.endpoints.iter().map(show_endpoint).collect();
    assert_eq!(endpoints, case.endpoints, "{}: endpoints", case.name);
    assert_eq!(
        rules.rejected.len(),
        case.rejected.len(),
        "{}: rejected {:?}",
        case.name,
        rules.rejected
    );
    for (got, want) in rules.rejected.iter().zip(case.rejected) {
        let (name, reason) = want.split_once(": ").expect("NAME: REASON");
        assert_eq!(got.name, name, "{}", case.name);
        assert!(
            got.reason.contains(reason),
            "{}: {:?} does not say {reason:?}",
            case.name,
            got.reason
        );
    }
}

#[test]
fn which_policies_and_endpoints_a_node_gets() {
    let web_all = || policy("a", "web-all", "web");
    let web_db = || PolicySource {
        peers: vec![peer_pods("db")],
        ..policy("a", "web-db", "web")
    };
    let web_team_b = || PolicySource {
        peers: vec![peer_namespaces(&[("team", "b")])],
        ..policy("a", "web-b", "web")
    };
    let cases = [
        Case {
            name: "no policy: empty rules, still one per node",
            state: cluster(vec![]),
            node: "n1",
            policies: &[],
            endpoints: &[],
            rejected: &[],
        },
        Case {
            name: "every peer, the selected pod here: the other nodes' pod CIDRs are peers",
            state: cluster(vec![web_all()]),
            node: "n1",
            policies: &["EncryptionPolicy a/web-all ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.0/24 n2 sel=[] peer=[0]",
                "10.3.0.0/24 n3 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "every peer, the selected pod remote: this node's own pod CIDR is the peer",
            state: cluster(vec![web_all()]),
            node: "n2",
            policies: &["EncryptionPolicy a/web-all ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.0/24 n2 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "peers by pod selector, from the selected side",
            state: cluster(vec![web_db()]),
            node: "n1",
            policies: &["EncryptionPolicy a/web-db ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.20/32 n2 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "peers by pod selector, from the peer side (the other direction)",
            state: cluster(vec![web_db()]),
            node: "n2",
            policies: &["EncryptionPolicy a/web-db ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.20/32 n2 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "peers by pod selector: a node with neither gets nothing",
            state: cluster(vec![web_db()]),
            node: "n3",
            policies: &[],
            endpoints: &[],
            rejected: &[],
        },
        Case {
            name: "peers by namespace selector: the peer namespace's pods",
            state: cluster(vec![web_team_b()]),
            node: "n3",
            policies: &["EncryptionPolicy a/web-b ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.3.0.30/32 n3 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "peers by namespace selector: a pod of another namespace is no peer",
            state: cluster(vec![web_team_b()]),
            node: "n2",
            policies: &[],
            endpoints: &[],
            rejected: &[],
        },
        Case {
            name: "ports sorted and deduplicated, strict and mode as written",
            state: cluster(vec![PolicySource {
                ports: vec![
                    port(8443, Protocol::Tcp),
                    port(53, Protocol::Udp),
                    port(443, Protocol::Tcp),
                    port(8443, Protocol::Tcp),
                    port(9, Protocol::Sctp),
                ],
                strict: false,
                mode: Mode::Wireguard,
                ..web_db()
            }]),
            node: "n1",
            policies: &[
                "EncryptionPolicy a/web-db wireguard lenient [Tcp/443,Tcp/8443,Udp/53,Sctp/9]",
            ],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.20/32 n2 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "a cluster policy selects by namespace labels",
            state: cluster(vec![cluster_policy("team-b", &[("team", "b")])]),
            node: "n3",
            policies: &["ClusterEncryptionPolicy team-b wireguard strict []"],
            endpoints: &[
                "10.1.0.0/24 n1 sel=[] peer=[0]",
                "10.2.0.0/24 n2 sel=[] peer=[0]",
                "10.3.0.30/32 n3 sel=[0] peer=[]",
            ],
            rejected: &[],
        },
        Case {
            name: "cluster and namespaced policies, sorted by kind then namespace and name",
            state: cluster(vec![
                cluster_policy("team-a", &[("team", "a")]),
                web_db(),
                web_all(),
            ]),
            node: "n2",
            policies: &[
                "EncryptionPolicy a/web-all ipsec strict []",
                "EncryptionPolicy a/web-db ipsec strict []",
                "ClusterEncryptionPolicy team-a wireguard strict []",
            ],
            endpoints: &[
                "10.1.0.0/24 n1 sel=[] peer=[2]",
                "10.1.0.10/32 n1 sel=[0, 1, 2] peer=[]",
                "10.2.0.0/24 n2 sel=[] peer=[0, 2]",
                "10.2.0.20/32 n2 sel=[2] peer=[1]",
                "10.3.0.0/24 n3 sel=[] peer=[2]",
            ],
            rejected: &[],
        },
        Case {
            name: "a pod moved to another node: its old node loses the rules",
            state: with(cluster(vec![web_db()]), |s| {
                s.pods[1].node = Some("n3".into());
                s.pods[1].ips = vec!["10.3.0.21".parse().expect("address")];
            }),
            node: "n2",
            policies: &[],
            endpoints: &[],
            rejected: &[],
        },
        Case {
            name: "a pod moved to another node: its new node gains them",
            state: with(cluster(vec![web_db()]), |s| {
                s.pods[1].node = Some("n3".into());
                s.pods[1].ips = vec!["10.3.0.21".parse().expect("address")];
            }),
            node: "n3",
            policies: &["EncryptionPolicy a/web-db ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.3.0.21/32 n3 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "IPv4 and IPv6 addresses of one pod",
            state: with(cluster(vec![web_db()]), |s| {
                s.pods[0].ips.push("fd00:1::10".parse().expect("address"));
                s.nodes[0].pod_cidrs.push(net("fd00:1::/64"));
            }),
            node: "n2",
            policies: &["EncryptionPolicy a/web-db ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.20/32 n2 sel=[] peer=[0]",
                "fd00:1::10/128 n1 sel=[0] peer=[]",
            ],
            rejected: &[],
        },
        Case {
            name: "IPv6 pod CIDRs of every-peer policies",
            state: with(cluster(vec![web_all()]), |s| {
                s.nodes[1].pod_cidrs.push(net("fd00:2::/64"));
                s.nodes.truncate(2);
            }),
            node: "n1",
            policies: &["EncryptionPolicy a/web-all ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.0/24 n2 sel=[] peer=[0]",
                "fd00:2::/64 n2 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "pods that take no part: host network, no address, finished, unknown node",
            state: with(cluster(vec![web_db()]), |s| {
                let db = s.pods[1].clone();
                s.pods[1].host_network = true;
                s.pods.push(PodInput {
                    name: "no-ip".into(),
                    ips: vec![],
                    ..db.clone()
                });
                s.pods.push(PodInput {
                    name: "done".into(),
                    phase: Some("Succeeded".into()),
                    ips: vec!["10.2.0.30".parse().expect("address")],
                    ..db.clone()
                });
                s.pods.push(PodInput {
                    name: "failed".into(),
                    phase: Some("Failed".into()),
                    ips: vec!["10.2.0.31".parse().expect("address")],
                    ..db.clone()
                });
                s.pods.push(PodInput {
                    name: "elsewhere".into(),
                    node: Some("n9".into()),
                    ips: vec!["10.9.0.1".parse().expect("address")],
                    ..db.clone()
                });
                s.pods.push(PodInput {
                    name: "pending".into(),
                    phase: Some("Pending".into()),
                    ips: vec!["10.2.0.32".parse().expect("address")],
                    ..db
                });
            }),
            node: "n1",
            policies: &["EncryptionPolicy a/web-db ipsec strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.32/32 n2 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
        Case {
            name: "a malformed selector: rejected on every node, with the place and reason",
            state: cluster(vec![
                PolicySource {
                    peers: vec![PeerSelector {
                        pod_selector: Some(LabelSelector {
                            match_labels: Labels::new(),
                            match_expressions: vec![LabelSelectorRequirement {
                                key: "app".into(),
                                operator: "Equals".into(),
                                values: vec!["db".into()],
                            }],
                        }),
                        namespace_selector: None,
                    }],
                    ..policy("a", "bad", "web")
                },
                web_db(),
            ]),
            node: "n3",
            policies: &[],
            endpoints: &[],
            rejected: &[
                "EncryptionPolicy a/bad: peers[0].podSelector: matchExpressions[0]: unknown operator \"Equals\"",
            ],
        },
        Case {
            name: "a cluster policy's namespace selector does not match an unknown namespace",
            state: with(cluster(vec![cluster_policy("all", &[])]), |s| {
                s.namespaces.remove("b");
            }),
            node: "n3",
            policies: &["ClusterEncryptionPolicy all wireguard strict []"],
            endpoints: &[
                "10.1.0.10/32 n1 sel=[0] peer=[]",
                "10.2.0.20/32 n2 sel=[0] peer=[]",
                "10.3.0.0/24 n3 sel=[] peer=[0]",
            ],
            rejected: &[],
        },
    ];
    for case in &cases {
        check(case);
    }
}

#[test]
fn past_the_limit_policies_are_rejected_on_that_node() {
    let policies = (0..=MAX_RULE_POLICIES)
        .map(|i| policy("a", &format!("p{i:04}"), "web"))
        .collect();
    let all = compile(&cluster(policies));
    let n1 = &all["n1"];
    assert_eq!(n1.policies.len(), MAX_RULE_POLICIES);
    assert_eq!(n1.rejected.len(), 1);
    assert_eq!(n1.rejected[0].name, "EncryptionPolicy a/p1024");
    assert!(n1.rejected[0].reason.contains("n1"), "{:?}", n1.rejected[0]);
    let last = u32::try_from(MAX_RULE_POLICIES - 1).expect("fits");
    assert!(
        n1.endpoints
            .iter()
            .all(|e| e.selected_by.last() <= Some(&last) && e.peer_of.last() <= Some(&last))
    );
}

#[test]
fn the_revision_follows_the_content_only() {
    let web_db = PolicySource {
        peers: vec![peer_pods("db")],
        ..policy("a", "web-db", "web")
    };
    let a = compile(&cluster(vec![
        web_db.clone(),
        policy("a", "web-all", "web"),
    ]));
    // The same content listed in another order.
    let mut state = cluster(vec![policy("a", "web-all", "web"), web_db.clone()]);
    state.pods.reverse();
    let b = compile(&state);
    assert_eq!(a, b);
    assert_eq!(a["n1"].revision.len(), 24);
    assert_ne!(
        a["n1"].revision, a["n2"].revision,
        "the node name is content"
    );
    let c = compile(&cluster(vec![PolicySource {
        strict: false,
        ..web_db
    }]));
    assert_ne!(a["n1"].revision, c["n1"].revision);
    let again = compile(&cluster(vec![]));
    assert_eq!(again["n3"], compile(&cluster(vec![]))["n3"]);
}

#[test]
fn two_pods_claiming_one_address_resolve_the_same_whatever_the_order() {
    // A stale view while a pod moves: the old and the new pod share an address.
    let mut state = cluster(vec![policy("a", "web-all", "web")]);
    let mut twin = state.pods[0].clone();
    twin.name = "web-new".into();
    twin.node = Some("n2".into());
    state.pods.push(twin);
    let forward = compile(&state);
    state.pods.reverse();
    assert_eq!(forward, compile(&state));
    let ep = forward["n3"]
        .endpoints
        .iter()
        .find(|e| e.prefix == net("10.1.0.10/32"))
        .expect("the shared address");
    assert_eq!(ep.node, "n1", "the first pod by namespace and name");
}

#[test]
fn sources_from_the_custom_resources() {
    let mut p = EncryptionPolicy::new(
        "web",
        crate::crd::EncryptionPolicySpec {
            pod_selector: selector(&[("app", "web")]),
            mode: Mode::Ipsec,
            strict: None,
            ports: vec![],
            peers: vec![],
        },
    );
    p.metadata.namespace = Some("a".into());
    let s = PolicySource::from(&p);
    assert_eq!(s.id.to_string(), "EncryptionPolicy a/web");
    assert!(s.strict, "absent strict is strict");
    assert!(s.namespace_selector.is_none());
    let c = ClusterEncryptionPolicy::new(
        "pci",
        crate::crd::ClusterEncryptionPolicySpec {
            namespace_selector: selector(&[("team", "b")]),
            pod_selector: LabelSelector::default(),
            mode: Mode::Wireguard,
            strict: Some(false),
            ports: vec![],
            peers: vec![],
        },
    );
    let s = PolicySource::from(&c);
    assert_eq!(s.id.to_string(), "ClusterEncryptionPolicy pci");
    assert!(!s.strict);
    assert!(s.namespace_selector.is_some());
}

/// A size check, not a benchmark: 200 nodes, 6,000 pods, 60 policies (a third of them with every
/// peer) compile in well under the watcher's budget even unoptimized. `cargo test -p keyd-policy
/// --release -- --ignored --nocapture compile_time` prints the time.
#[test]
#[ignore = "a timing printout; run by hand"]
fn compile_time() {
    let nodes: Vec<NodeInput> = (0..200)
        .map(|n| {
            node(
                &format!("n{n}"),
                &[&format!("10.{}.{}.0/24", n / 250, n % 250)],
            )
        })
        .collect();
    let pods = (0..6000)
        .map(|i| {
            let n = i % 200;
            pod(
                &format!("ns{}", i % 20),
                &format!("p{i}"),
                &format!("app{}", i % 30),
                &format!("n{n}"),
                &[&format!("10.{}.{}.{}", n / 250, n % 250, 2 + i / 200)],
            )
        })
        .collect();
    let policies = (0..60)
        .map(|i| {
            let mut p = policy(
                &format!("ns{}", i % 20),
                &format!("pol{i}"),
                &format!("app{}", i % 30),
            );
            if i % 3 != 0 {
                p.peers = vec![peer_pods(&format!("app{}", (i + 1) % 30))];
            }
            p
        })
        .collect();
    let state = ClusterState {
        nodes,
        namespaces: (0..20).map(|i| (format!("ns{i}"), Labels::new())).collect(),
        pods,
        policies,
    };
    let started = std::time::Instant::now();
    let all = compile(&state);
    let endpoints: usize = all.values().map(|r| r.endpoints.len()).sum();
    println!(
        "compiled {} nodes, {endpoints} endpoints in {:?}",
        all.len(),
        started.elapsed()
    );
}
