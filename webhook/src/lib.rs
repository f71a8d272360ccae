//! The keyd validating admission webhook.
//!
//! It will hold: the `EncryptionPolicy` / `ClusterEncryptionPolicy` CRD types, the pure admission
//! decision over (object, namespace, policies, keyd status, config), kube-rs reflectors for
//! policies and namespaces, and the axum + rustls server for `/validate`. It talks to keyd only
//! through the wire types in [`keyd_proto`]. Nothing here is implemented yet (issue 5).
#![forbid(unsafe_code)]

pub use keyd_proto as proto;
