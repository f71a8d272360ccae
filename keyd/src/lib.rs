//! keyd: holds the IPsec PSKs and WireGuard key schedule for a cluster, sealed under a
//! key-encryption key, and serves each node its keys over mTLS.
//!
//! Layout: [`config`] (file, env, flags; validated before anything binds), [`seal`] (envelope
//! encryption behind the `KeyWrapper` custodian trait), [`store`] (the transactional store trait
//! and its redb default), [`kms`] (the KEK custodians: local, AWS KMS, Vault transit, and the
//! keyring with its health) and [`rewrap`] (KEK rotation and migration), [`ipsec`] and
//! [`wireguard`] (key formats and derivations),
//! [`service`] (the operations, each one store transaction with its audit records), [`api`] and
//! [`server`] (HTTP over mTLS), [`tls`] and [`pki`] (certificates), [`client`] (for keyctl).
#![forbid(unsafe_code)]

pub mod api;
pub mod app;
pub mod audit;
pub mod bootstrap;
pub mod clock;
pub mod cluster_pki;
pub mod config;
pub mod custody;
#[cfg(feature = "fault-injection")]
pub mod faults;
pub mod fsutil;
pub mod ipsec;
pub mod pki;
pub mod policy_watch;
pub mod report;
pub mod rewrap;
pub mod rotation;
pub mod seal;
pub mod service;
pub mod source_limit;
pub mod store;
#[cfg(feature = "etcd")]
pub mod store_copy;
pub mod telemetry;
pub mod wireguard;

#[cfg(test)]
mod fuzz_corpus;
