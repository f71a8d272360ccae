//! keyd: holds the IPsec PSKs and WireGuard key schedule for a cluster, sealed under a
//! key-encryption key, and serves each node its keys over mTLS.
#![forbid(unsafe_code)]

pub mod fsutil;
pub mod seal;
pub mod store;
