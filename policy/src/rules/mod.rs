//! The compiler of per-node data-plane rules: a pure function from what the Kubernetes API and
//! keyd's node table say (registered nodes and their pod CIDRs, pods, namespaces, policies) to
//! one [`NodeRules`] per registered node. What the rules mean is documented with the wire types
//! in [`keyd_proto::rules`].
//!
//! A node's rules name the policies that concern it: those that select one of its pods, and
//! those whose peers include one of its pods while they select a pod on another node (traffic
//! between two pods of one node is left alone). Its endpoints are the addresses those policies
//! need on this node: its own selected and peer pods, the remote pods at the other end, and for a
//! policy with no peers (every peer) the other nodes' pod CIDRs (or this node's own, when the
//! selected pod is remote).
//!
//! Pods that take no part: host-network pods (their address is the node's), pods without an
//! address yet, pods on a node keyd does not know, and finished pods (`Succeeded`, `Failed`),
//! whose addresses may already belong to someone else.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use ipnet::IpNet;
use keyd_proto::rules::{
    L4Protocol, MAX_RULE_POLICIES, NodeRules, RejectedPolicy, RuleEndpoint, RulePolicy, RulePort,
};
use sha2::{Digest as _, Sha256};

use crate::crd::{
    ClusterEncryptionPolicy, EncryptionPolicy, LabelSelector, Labels, Mode, PeerSelector,
    PolicyPort, Protocol,
};
use crate::id::{PolicyKind, PolicyRef};
use crate::selector::{Selector, SelectorError};

#[cfg(test)]
mod tests;

/// A node registered with keyd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeInput {
    pub name: String,
    pub pod_cidrs: Vec<IpNet>,
}

/// A pod, reduced to what the rules need.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PodInput {
    pub namespace: String,
    pub name: String,
    pub labels: Labels,
    /// `spec.nodeName`; `None` while unscheduled.
    pub node: Option<String>,
    /// `status.podIPs`.
    pub ips: Vec<IpAddr>,
    /// `status.phase`.
    pub phase: Option<String>,
    pub host_network: bool,
}

/// One policy of either kind, in the shape the compiler reads.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicySource {
    pub id: PolicyRef,
    /// `ClusterEncryptionPolicy` only; an `EncryptionPolicy` applies to its own namespace.
    pub namespace_selector: Option<LabelSelector>,
    pub pod_selector: LabelSelector,
    pub mode: Mode,
    pub strict: bool,
    pub ports: Vec<PolicyPort>,
    pub peers: Vec<PeerSelector>,
}

impl From<&EncryptionPolicy> for PolicySource {
    fn from(p: &EncryptionPolicy) -> Self {
        Self {
            id: PolicyRef {
                kind: PolicyKind::Namespaced,
                namespace: p.metadata.namespace.clone().unwrap_or_default(),
                name: p.metadata.name.clone().unwrap_or_default(),
            },
            namespace_selector: None,
            pod_selector: p.spec.pod_selector.clone(),
            mode: p.spec.mode,
            strict: p.spec.is_strict(),
            ports: p.spec.ports.clone(),
            peers: p.spec.peers.clone(),
        }
    }
}

impl From<&ClusterEncryptionPolicy> for PolicySource {
    fn from(p: &ClusterEncryptionPolicy) -> Self {
        Self {
            id: PolicyRef {
                kind: PolicyKind::Cluster,
                namespace: String::new(),
                name: p.metadata.name.clone().unwrap_or_default(),
            },
            namespace_selector: Some(p.spec.namespace_selector.clone()),
            pod_selector: p.spec.pod_selector.clone(),
            mode: p.spec.mode,
            strict: p.spec.is_strict(),
            ports: p.spec.ports.clone(),
            peers: p.spec.peers.clone(),
        }
    }
}

/// Everything the compiler reads.
#[derive(Debug, Clone, Default)]
pub struct ClusterState {
    pub nodes: Vec<NodeInput>,
    /// Namespace name to its labels.
    pub namespaces: BTreeMap<String, Labels>,
    pub pods: Vec<PodInput>,
    pub policies: Vec<PolicySource>,
}

/// Why a policy is left out of a node's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("{field}: {error}; the policy selects nothing")]
    Selector { field: String, error: SelectorError },
    #[error(
        "node {node:?} is concerned by more than {MAX_RULE_POLICIES} policies, the most its maps hold; this one is past the limit"
    )]
    TooMany { node: String },
}

/// The rules of every registered node, by node name.
pub fn compile(state: &ClusterState) -> BTreeMap<String, NodeRules> {
    let pods = eligible_pods(state);
    let mut sources: Vec<&PolicySource> = state.policies.iter().collect();
    sources.sort_by(|a, b| a.id.cmp(&b.id));
    let mut compiled = Vec::new();
    let mut rejected = Vec::new();
    for source in sources {
        match Selectors::compile(source) {
            Ok(selectors) => compiled.push(Compiled::new(source, &selectors, &pods)),
            Err(reason) => rejected.push(RejectedPolicy {
                name: source.id.to_string(),
                reason: reason.to_string(),
            }),
        }
    }
    state
        .nodes
        .iter()
        .map(|node| {
            let rules = node_rules(node, &state.nodes, &compiled, &rejected, &pods);
            (node.name.clone(), rules)
        })
        .collect()
}

/// A pod that takes part, with its namespace's labels (`None`: the namespace is unknown, so no
/// namespace selector matches it).
#[derive(Debug)]
struct Pod<'a> {
    input: &'a PodInput,
    node: &'a str,
    ns_labels: Option<&'a Labels>,
}

/// The pods that take part, sorted by namespace and name so that the result does not depend on
/// the order the watches delivered them in (two pods claiming one address resolve alike on
/// every compile and every replica).
fn eligible_pods(state: &ClusterState) -> Vec<Pod<'_>> {
    let registered: BTreeSet<&str> = state.nodes.iter().map(|n| n.name.as_str()).collect();
    let mut sorted: Vec<&PodInput> = state.pods.iter().collect();
    sorted.sort_by(|a, b| (&a.namespace, &a.name).cmp(&(&b.namespace, &b.name)));
    sorted
        .into_iter()
        .filter(|p| !p.host_network && !p.ips.is_empty())
        .filter(|p| !matches!(p.phase.as_deref(), Some("Succeeded" | "Failed")))
        .filter_map(|p| {
            let node = p.node.as_deref().filter(|n| registered.contains(n))?;
            Some(Pod {
                input: p,
                node,
                ns_labels: state.namespaces.get(&p.namespace),
            })
        })
        .collect()
}

/// A policy's selectors, validated.
#[derive(Debug)]
struct Selectors {
    /// Cluster policies only.
    namespaces: Option<Selector>,
    pods: Selector,
    peers: Vec<PeerSelectors>,
}

#[derive(Debug)]
struct PeerSelectors {
    namespaces: Option<Selector>,
    pods: Option<Selector>,
}

fn compile_selector(field: String, s: &LabelSelector) -> Result<Selector, Rejection> {
    Selector::compile(s).map_err(|error| Rejection::Selector { field, error })
}

fn compile_optional(
    field: String,
    s: Option<&LabelSelector>,
) -> Result<Option<Selector>, Rejection> {
    s.map(|s| compile_selector(field, s)).transpose()
}

impl Selectors {
    fn compile(p: &PolicySource) -> Result<Self, Rejection> {
        let namespaces =
            compile_optional("namespaceSelector".into(), p.namespace_selector.as_ref())?;
        let pods = compile_selector("podSelector".into(), &p.pod_selector)?;
        let peers = p
            .peers
            .iter()
            .enumerate()
            .map(|(i, peer)| {
                Ok(PeerSelectors {
                    namespaces: compile_optional(
                        format!("peers[{i}].namespaceSelector"),
                        peer.namespace_selector.as_ref(),
                    )?,
                    pods: compile_optional(
                        format!("peers[{i}].podSelector"),
                        peer.pod_selector.as_ref(),
                    )?,
                })
            })
            .collect::<Result<_, Rejection>>()?;
        Ok(Self {
            namespaces,
            pods,
            peers,
        })
    }

    /// Whether the pod is in a namespace the policy applies to.
    fn in_scope(&self, p: &PolicySource, pod: &Pod<'_>) -> bool {
        match &self.namespaces {
            None => pod.input.namespace == p.id.namespace,
            Some(ns) => pod.ns_labels.is_some_and(|l| ns.matches(l)),
        }
    }

    fn selects(&self, p: &PolicySource, pod: &Pod<'_>) -> bool {
        self.in_scope(p, pod) && self.pods.matches(&pod.input.labels)
    }

    /// Whether one of the (listed) peers is this pod.
    fn is_peer(&self, p: &PolicySource, pod: &Pod<'_>) -> bool {
        self.peers.iter().any(|peer| {
            let namespace_ok = match &peer.namespaces {
                Some(s) => pod.ns_labels.is_some_and(|l| s.matches(l)),
                None => self.in_scope(p, pod),
            };
            namespace_ok
                && peer
                    .pods
                    .as_ref()
                    .is_none_or(|s| s.matches(&pod.input.labels))
        })
    }
}

/// Pod indexes by node name.
type PodsByNode<'a> = BTreeMap<&'a str, Vec<usize>>;

#[derive(Debug)]
enum Peers<'a> {
    /// No peers listed: every pod on another node.
    Every,
    Pods(PodsByNode<'a>),
}

/// A policy with its pods found.
#[derive(Debug)]
struct Compiled<'a> {
    rule: RulePolicy,
    selected: PodsByNode<'a>,
    peers: Peers<'a>,
}

impl<'a> Compiled<'a> {
    fn new(source: &PolicySource, selectors: &Selectors, pods: &[Pod<'a>]) -> Self {
        let by_node = |keep: &dyn Fn(&Pod<'a>) -> bool| {
            let mut m = PodsByNode::new();
            for (i, pod) in pods.iter().enumerate().filter(|(_, p)| keep(p)) {
                m.entry(pod.node).or_default().push(i);
            }
            m
        };
        let selected = by_node(&|p| selectors.selects(source, p));
        let peers = if source.peers.is_empty() {
            Peers::Every
        } else {
            Peers::Pods(by_node(&|p| selectors.is_peer(source, p)))
        };
        Self {
            rule: rule_policy(source),
            selected,
            peers,
        }
    }

    fn selects_on(&self, node: &str) -> bool {
        self.selected.contains_key(node)
    }

    fn selects_elsewhere(&self, node: &str) -> bool {
        self.selected.keys().any(|n| *n != node)
    }

    /// A pod of `node` is a peer of a selected pod on another node.
    fn remote_peer_on(&self, node: &str) -> bool {
        let peer_here = match &self.peers {
            Peers::Every => true,
            Peers::Pods(m) => m.contains_key(node),
        };
        peer_here && self.selects_elsewhere(node)
    }

    fn concerns(&self, node: &str) -> bool {
        self.selects_on(node) || self.remote_peer_on(node)
    }
}

fn rule_policy(p: &PolicySource) -> RulePolicy {
    let ports: BTreeSet<RulePort> = p
        .ports
        .iter()
        .map(|port| RulePort {
            protocol: match port.protocol {
                Protocol::Tcp => L4Protocol::Tcp,
                Protocol::Udp => L4Protocol::Udp,
                Protocol::Sctp => L4Protocol::Sctp,
            },
            port: port.port,
        })
        .collect();
    RulePolicy {
        name: p.id.to_string(),
        mode: p.mode.into(),
        strict: p.strict,
        ports: ports.into_iter().collect(),
    }
}

/// One node's rules: the policies that concern it (at most [`MAX_RULE_POLICIES`], the rest
/// rejected) and their endpoints.
fn node_rules(
    node: &NodeInput,
    nodes: &[NodeInput],
    compiled: &[Compiled<'_>],
    rejected_everywhere: &[RejectedPolicy],
    pods: &[Pod<'_>],
) -> NodeRules {
    let name = node.name.as_str();
    let concerning: Vec<&Compiled<'_>> = compiled.iter().filter(|c| c.concerns(name)).collect();
    let (kept, extra) = concerning.split_at(concerning.len().min(MAX_RULE_POLICIES));
    let mut rejected = rejected_everywhere.to_vec();
    rejected.extend(extra.iter().map(|c| {
        RejectedPolicy {
            name: c.rule.name.clone(),
            reason: Rejection::TooMany {
                node: node.name.clone(),
            }
            .to_string(),
        }
    }));
    let mut endpoints = Endpoints::default();
    for (index, c) in (0u32..).zip(kept) {
        endpoints.add_policy(index, c, node, nodes, pods);
    }
    with_revision(NodeRules {
        node: node.name.clone(),
        revision: String::new(),
        policies: kept.iter().map(|c| c.rule.clone()).collect(),
        endpoints: endpoints.into_rules(),
        rejected,
    })
}

/// Endpoints being collected, by prefix.
#[derive(Debug, Default)]
struct Endpoints(BTreeMap<IpNet, Entry>);

#[derive(Debug)]
struct Entry {
    node: String,
    selected_by: BTreeSet<u32>,
    peer_of: BTreeSet<u32>,
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Selected,
    Peer,
}

impl Endpoints {
    /// What policy `index` needs on `node`.
    fn add_policy(
        &mut self,
        index: u32,
        c: &Compiled<'_>,
        node: &NodeInput,
        nodes: &[NodeInput],
        pods: &[Pod<'_>],
    ) {
        let here = node.name.as_str();
        let (selects_here, remote_peer_here) = (c.selects_on(here), c.remote_peer_on(here));
        // Own selected pods always; remote ones when a pod here is their peer.
        for (on, list) in &c.selected {
            if *on == here || remote_peer_here {
                self.add_pods(index, Role::Selected, list, pods);
            }
        }
        match &c.peers {
            Peers::Pods(by_node) => {
                // Own peers when a selected pod is remote; remote peers when one is here.
                for (on, list) in by_node {
                    if (*on == here && remote_peer_here) || (*on != here && selects_here) {
                        self.add_pods(index, Role::Peer, list, pods);
                    }
                }
            }
            Peers::Every => {
                for n in nodes {
                    let own = n.name == here;
                    if (own && remote_peer_here) || (!own && selects_here) {
                        for cidr in &n.pod_cidrs {
                            self.add(cidr.trunc(), &n.name, index, Role::Peer);
                        }
                    }
                }
            }
        }
    }

    fn add_pods(&mut self, index: u32, role: Role, list: &[usize], pods: &[Pod<'_>]) {
        for pod in list.iter().filter_map(|&i| pods.get(i)) {
            for ip in &pod.input.ips {
                self.add(IpNet::from(*ip), pod.node, index, role);
            }
        }
    }

    /// Adds a role to a prefix. Two pods claiming one address (a stale view while one moves)
    /// keep the first node seen; the sets are merged, so no policy is lost.
    fn add(&mut self, prefix: IpNet, node: &str, index: u32, role: Role) {
        let e = self.0.entry(prefix).or_insert_with(|| Entry {
            node: node.to_owned(),
            selected_by: BTreeSet::new(),
            peer_of: BTreeSet::new(),
        });
        match role {
            Role::Selected => e.selected_by.insert(index),
            Role::Peer => e.peer_of.insert(index),
        };
    }

    fn into_rules(self) -> Vec<RuleEndpoint> {
        self.0
            .into_iter()
            .map(|(prefix, e)| RuleEndpoint {
                prefix,
                node: e.node,
                selected_by: e.selected_by.into_iter().collect(),
                peer_of: e.peer_of.into_iter().collect(),
            })
            .collect()
    }
}

/// Sets `revision` to a digest of everything else, so equal rules have equal revisions (across
/// recompiles and keyd replicas).
fn with_revision(mut rules: NodeRules) -> NodeRules {
    rules.revision.clear();
    // Serializing these plain structs (strings, numbers, prefixes) cannot fail; were it to, the
    // empty input would still give a stable revision.
    let bytes = serde_json::to_vec(&rules).unwrap_or_default();
    rules.revision = hex::encode(&Sha256::digest(&bytes)[..12]);
    rules
}
