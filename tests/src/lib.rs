//! Cross-component tests and harnesses for keyd, the webhook and node-shim.
//!
//! [`cluster`] runs a real etcd + kube-apiserver on loopback; [`kubelet`] adds kube-scheduler,
//! containerd and a kubelet to make a one-node cluster that runs pods from locally built images. Key custody harnesses: [`vault_double`] (a test double of Vault's HTTP API), [`vault_admin`]
//! (sets up transit keys, policies and logins on the double or on a real Vault when
//! `VAULT_ADDR` and `VAULT_TOKEN` are set), and [`moto`] (moto's KMS server on loopback).
//! [`loadgen`] is the keyd benchmark behind `cargo run --release -p keyd-tests --bin loadgen`
//! (results and method in `docs/benchmarks.md`); its scenario code is also run briefly by
//! `tests/loadgen_smoke.rs` so that the harness cannot silently rot. [`monitoring`] reads the
//! metric names the shipped alerting rules and dashboard query. [`manifests`] reads, renders and
//! validates the Kubernetes manifests under `deploy/` (`tests/manifests.rs` applies them).
#![forbid(unsafe_code)]

pub mod cluster;
pub mod etcd;
pub mod http;
pub mod kubelet;
pub mod loadgen;
pub mod manifests;
pub mod monitoring;
pub mod moto;
pub mod prereq;
pub mod vault_admin;
pub mod vault_double;
