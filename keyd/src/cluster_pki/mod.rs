//! keyd as its cluster's certificate issuer (`[cluster_pki]`), so that an install needs no
//! cert-manager.
//!
//! keyd keeps a CA in a Secret (created once, by whichever replica comes first), issues its own
//! serving certificate at every pod start (the key never leaves the pod), publishes the CA
//! certificate in a ConfigMap for node-shim, the webhook and keyctl, keeps the certificates the
//! configuration lists in Secrets of type `kubernetes.io/tls` (the webhook's serving and client
//! certificates, an admin certificate) and keeps the `caBundle` of the listed
//! ValidatingWebhookConfigurations equal to the CA. Every certificate is renewed with a third
//! of its lifetime left, or at once when its names, its identity or its CA no longer match.
//! Every issuance is audited before the certificate is stored (`pki.ca.created`,
//! `pki.certificate.issued`). Each replica keeps its own certificate; the leader keeps what
//! replicas share, puts a deleted CA Secret back, and a replica whose CA Secret changed
//! restarts to load it.
//!
//! A Secret or ConfigMap of the configured name that keyd did not create (it lacks the label
//! `app.kubernetes.io/managed-by: keyd`) is never overwritten: the pass reports it instead.

mod config;
#[cfg(feature = "kube")]
mod keeper;

pub use config::{ClusterPkiConfig, Issue, IssueKind, MANAGED_BY, canonical_names};
#[cfg(feature = "kube")]
pub use keeper::{Keeper, prepare};
