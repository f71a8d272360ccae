//! node-shim, the per-node agent.
//!
//! It will hold: a pure reconciler from (bundle, node facts) to the desired kernel state, the
//! kernel access (XFRM states and policies, WireGuard devices, routes, tc eBPF steering) behind a
//! narrow trait with a stateful fake, and the mTLS client that registers the node with keyd,
//! fetches its [`keyd_proto::NodeBundle`] and acknowledges what it programmed. The netlink and
//! `unsafe` code will live under one `kernel` module. Nothing here is implemented yet (issue 6).
#![forbid(unsafe_code)]

pub use keyd_proto as proto;
