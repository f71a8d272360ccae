//! The keyd validating admission webhook: sensitive pods are admitted only under an encryption
//! policy whose mode keyd reports ready.
//!
//! Layout, pure core first: [`crd`] (the policy resources) and [`selector`] (label selectors),
//! both from [`keyd_policy`],
//! [`policy`] (policies compiled and indexed), [`workload`] (the checked objects reduced to their
//! pod labels), [`decision`] (the pure decision), [`scan`] (the same decision over running
//! pods). At the edges: [`review`] (AdmissionReview in and out), [`config`], [`keyd`] (keyd's
//! status cache and the buffered audit sink, over mTLS), [`kube_cache`] (reflectors),
//! [`server`] (axum + rustls), [`tls`], [`metrics`], [`status`] (policy status),
//! [`manifests`] (generated YAML), [`app`] (wiring). It talks to keyd only through the wire
//! types in [`keyd_proto`].
#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod decision;
pub mod keyd;
pub mod kube_cache;
pub mod manifests;
pub mod metrics;
pub mod policy;
pub mod review;
pub mod scan;
pub mod server;
pub mod status;
pub mod tls;
pub mod workload;

/// The policy resources and label selectors live in [`keyd_policy`], shared with keyd.
pub use keyd_policy::{crd, selector};

pub use keyd_proto as proto;

pub use keyd_mtls::ErrorChain;
pub use keyd_mtls::ops::init_logging;
