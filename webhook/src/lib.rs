//! The keyd validating admission webhook: sensitive pods are admitted only under an encryption
//! policy whose mode keyd reports ready.
//!
//! Layout, pure core first: [`crd`] (the policy resources), [`selector`] (label selectors),
//! [`policy`] (policies compiled and indexed), [`workload`] (the checked objects reduced to their
//! pod labels), [`decision`] (the pure decision). At the edges: [`review`] (AdmissionReview in and
//! out), [`config`], [`keyd`] (keyd's status cache and the buffered audit sink, over mTLS),
//! [`kube_cache`] (reflectors), [`server`] (axum + rustls), [`metrics`], [`status`] (policy
//! status), [`scan`] (the audit of running pods), [`manifests`] (generated YAML), [`app`]
//! (wiring). It talks to keyd only through the wire types in [`keyd_proto`].
#![forbid(unsafe_code)]

pub mod crd;
pub mod decision;
pub mod policy;
pub mod selector;
pub mod workload;

pub use keyd_proto as proto;
