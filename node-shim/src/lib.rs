//! node-shim, the per-node agent: registers the node with keyd over mTLS, fetches its bundle,
//! programs WireGuard or IPsec (XFRM) in the kernel, and acknowledges what it programmed.
//!
//! - [`reconcile`]: the pure core. Desired kernel state as a function of (bundle, node facts),
//!   the plan from the kernel's actual state to it, and the acknowledgement.
//! - [`kernel`]: the [`kernel::Kernel`] trait, its stateful fake, and the netlink implementation
//!   (the only netlink code in the workspace).
//! - [`agent`]: the loop around them: fetch, reconcile, acknowledge, back off when keyd is away.
//! - [`keyd_client`], [`bootstrap`]: talking to keyd; static or bootstrapped identity.
//! - [`steering`]: the pure core of eBPF steering: map contents for a node's rules, and the
//!   in-place changes between two of them (the maps themselves: `kernel::ebpf`).
//! - [`config`], [`secret`], [`derive`], [`model`], [`status`].
#![forbid(unsafe_code)]

pub mod agent;
pub mod bootstrap;
pub mod config;
pub mod dataplane;
pub mod derive;
pub mod kernel;
pub mod keyd_client;
pub mod model;
pub mod reconcile;
pub mod secret;
pub mod status;
pub mod steering;

pub use keyd_proto as proto;
