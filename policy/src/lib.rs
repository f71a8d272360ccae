//! The encryption policies: the custom resources ([`crd`]), their label selectors
//! ([`selector`]), and the pure compiler ([`rules`]) from the cluster's pods, namespaces, nodes
//! and policies to each node's data-plane rules ([`keyd_proto::rules::NodeRules`]).
//!
//! Used by keyd (which serves the rules) and the admission webhook (which admits pods under the
//! policies). node-shim never depends on it: it reads the compiled rules from keyd.
#![forbid(unsafe_code)]

pub mod crd;
pub mod id;
pub mod rules;
pub mod selector;
