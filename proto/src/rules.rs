//! The data-plane rules of one node: what keyd compiles from the `EncryptionPolicy` and
//! `ClusterEncryptionPolicy` resources, the pods and namespaces of the Kubernetes API and the
//! registered nodes, and what node-shim loads into its eBPF maps.
//!
//! keyd watches the API server once for the whole cluster and sends each node only the rules
//! that concern it (`GET /v1/nodes/{name}/rules`, long-polled like the bundle), so the API
//! server's load does not grow with nodes x pods.
//!
//! # What a policy covers
//! A policy covers a packet between addresses `A` and `B` on different nodes when one of them is
//! a pod the policy selects and the other one of its peers (no peers: every pod on another
//! node), in either direction, and the packet's protocol and source or destination port is one of
//! the policy's ports (no ports: every packet). Traffic between two pods of one node is left
//! alone, as Cilium does.
//!
//! # How the rules say it
//! [`NodeRules::policies`] lists the policies that matter to this node; everything else refers
//! to them by index. [`NodeRules::endpoints`] lists prefixes (a pod's address, or a node's pod
//! CIDR) with the policies that select them and the policies they are a peer of. An address's
//! sets are the union over every listed prefix that contains it: a pod's own entry need not repeat
//! what its node's pod CIDR entry says.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::EncryptionMode;

/// The most policies one node's rules may name (the eBPF maps hold a bitmap of this many bits).
pub const MAX_RULE_POLICIES: usize = 1024;

/// `GET /v1/nodes/{name}/rules`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRules {
    pub node: String,
    /// Changes whenever anything below changes; also sent as the `ETag`.
    pub revision: String,
    /// Indexed by position; at most [`MAX_RULE_POLICIES`].
    pub policies: Vec<RulePolicy>,
    pub endpoints: Vec<RuleEndpoint>,
    /// Policies keyd could not compile for this node, and why (e.g. more than
    /// [`MAX_RULE_POLICIES`]); the webhook treats their pods as uncovered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rejected: Vec<RejectedPolicy>,
}

/// One policy as the data plane needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RulePolicy {
    /// `EncryptionPolicy NAMESPACE/NAME` or `ClusterEncryptionPolicy NAME`: an administrator's
    /// object, so a bounded metrics label (never a pod's name).
    pub name: String,
    pub mode: EncryptionMode,
    /// Covered traffic that cannot be encrypted at this moment is dropped, never sent in the
    /// clear (the default). `false`: it is sent in the clear and counted.
    pub strict: bool,
    /// No ports: every packet between the pods is covered.
    #[serde(default)]
    pub ports: Vec<RulePort>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RulePort {
    pub protocol: L4Protocol,
    pub port: u16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum L4Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl L4Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            L4Protocol::Tcp => 6,
            L4Protocol::Udp => 17,
            L4Protocol::Sctp => 132,
        }
    }
}

/// A prefix and what it is to the policies.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleEndpoint {
    /// A pod's address (`/32`, `/128`) or a node's pod CIDR.
    pub prefix: IpNet,
    /// The node the prefix is on (this node for its own pods).
    pub node: String,
    /// Indexes into [`NodeRules::policies`] of the policies that select it.
    #[serde(default)]
    pub selected_by: Vec<u32>,
    /// Indexes of the policies it is a peer of.
    #[serde(default)]
    pub peer_of: Vec<u32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RejectedPolicy {
    pub name: String,
    pub reason: String,
}

/// `POST /v1/nodes/{name}/dataplane`: what a node's data plane enforces, and its counters. The
/// counters are cumulative since `counting_since` (the maps' creation); keyd turns reports into
/// per-period figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataplaneReport {
    /// `all` or `policy`.
    pub node_mode: String,
    /// The [`NodeRules::revision`] loaded into the maps (`None` in `all` mode or before the
    /// first rules arrived).
    #[serde(default)]
    pub rules_revision: Option<String>,
    pub counting_since: crate::Timestamp,
    pub at: crate::Timestamp,
    /// One entry per policy of the loaded rules; in `all` mode one entry named `all`.
    pub policies: Vec<PolicyCounters>,
}

/// One policy's figures on one node.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyCounters {
    pub name: String,
    /// Its rules are in this node's maps.
    pub programmed: bool,
    /// Covered packets steered into WireGuard or IPsec.
    pub encrypted_packets: u64,
    pub encrypted_bytes: u64,
    /// Covered packets dropped because they could not be encrypted (strict).
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    /// Covered packets sent in the clear because they could not be encrypted (not strict).
    pub clear_packets: u64,
    pub clear_bytes: u64,
}

/// `GET /v1/dataplane`: the latest report of every node, and per policy the sums across them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataplaneSummary {
    /// Sorted by name.
    pub nodes: Vec<NodeDataplane>,
    /// Sorted by name; `all` for nodes in `all` mode.
    pub policies: Vec<PolicyDataplane>,
}

/// What one node last reported.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeDataplane {
    pub node: String,
    pub node_mode: String,
    #[serde(default)]
    pub rules_revision: Option<String>,
    /// The node's time of the report.
    pub at: crate::Timestamp,
    /// keyd's time of receiving it.
    pub received_at: crate::Timestamp,
}

/// One policy across the nodes that report it: cumulative counters summed over their latest
/// reports.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyDataplane {
    pub name: String,
    /// Nodes whose latest report names the policy.
    pub nodes_reporting: u32,
    /// Of those, the nodes that report it programmed.
    pub nodes_programmed: u32,
    pub encrypted_packets: u64,
    pub encrypted_bytes: u64,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub clear_packets: u64,
    pub clear_bytes: u64,
}

impl PolicyDataplane {
    /// Adds one node's figures for this policy.
    pub fn add(&mut self, c: &PolicyCounters) {
        self.nodes_reporting += 1;
        self.nodes_programmed += u32::from(c.programmed);
        self.encrypted_packets = self.encrypted_packets.saturating_add(c.encrypted_packets);
        self.encrypted_bytes = self.encrypted_bytes.saturating_add(c.encrypted_bytes);
        self.dropped_packets = self.dropped_packets.saturating_add(c.dropped_packets);
        self.dropped_bytes = self.dropped_bytes.saturating_add(c.dropped_bytes);
        self.clear_packets = self.clear_packets.saturating_add(c.clear_packets);
        self.clear_bytes = self.clear_bytes.saturating_add(c.clear_bytes);
    }
}
