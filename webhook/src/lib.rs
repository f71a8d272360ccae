//! The keyd validating admission webhook: sensitive pods are admitted only under an encryption
//! policy whose mode keyd reports ready.
//!
//! Layout, pure core first: [`crd`] (the policy resources), [`selector`] (label selectors),
//! [`policy`] (policies compiled and indexed), [`workload`] (the checked objects reduced to their
//! pod labels), [`decision`] (the pure decision), [`scan`] (the same decision over running
//! pods). At the edges: [`review`] (AdmissionReview in and out), [`config`], [`keyd`] (keyd's
//! status cache and the buffered audit sink, over mTLS), [`kube_cache`] (reflectors),
//! [`server`] (axum + rustls), [`tls`], [`metrics`], [`status`] (policy status),
//! [`manifests`] (generated YAML), [`app`] (wiring). It talks to keyd only through the wire
//! types in [`keyd_proto`].
#![forbid(unsafe_code)]

use std::fmt;

pub mod app;
pub mod config;
pub mod crd;
pub mod decision;
pub mod keyd;
pub mod kube_cache;
pub mod manifests;
pub mod metrics;
pub mod policy;
pub mod review;
pub mod scan;
pub mod selector;
pub mod server;
pub mod status;
pub mod tls;
pub mod workload;

pub use keyd_proto as proto;

/// Displays an error with its sources, `a: b: c`, for log lines.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Installs the global log subscriber (stderr). `level` is an `EnvFilter` directive; `RUST_LOG`
/// overrides it.
pub fn init_logging(format: config::LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        config::LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        config::LogFormat::Text => builder.try_init(),
    };
}
