//! Logs (tracing, JSON by default) and Prometheus metrics with bounded label sets.
//!
//! Labels are only ever route templates (`/v1/nodes/{name}/bundle`), status classes and fixed
//! outcome words; never a node name or anything from `Debug`, so cardinality stays bounded.

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteOnly {
    pub route: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub http_requests: Family<RouteLabels, Counter>,
    pub http_duration: Family<RouteOnly, Histogram>,
    pub tls_handshakes: Family<Outcome, Counter>,
    pub bundle_fetches: Family<Outcome, Counter>,
    pub ipsec_rotations: Counter,
    pub refused_requests: Counter,
    pub nodes: Gauge,
    pub rollouts_stuck: Counter,
    pub scheduled_rotation_failures: Counter,
    pub audit_checkpoints: Counter,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("keyd");
        let http_requests = Family::<RouteLabels, Counter>::default();
        let http_duration = Family::<RouteOnly, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
            ])
        });
        let tls_handshakes = Family::<Outcome, Counter>::default();
        let bundle_fetches = Family::<Outcome, Counter>::default();
        let ipsec_rotations = Counter::default();
        let refused_requests = Counter::default();
        let nodes = Gauge::default();
        let rollouts_stuck = Counter::default();
        let scheduled_rotation_failures = Counter::default();
        let audit_checkpoints = Counter::default();
        r.register(
            "ipsec_rollouts_stuck",
            "IPsec rollout phases that waited longer than the limit",
            rollouts_stuck.clone(),
        );
        r.register(
            "scheduled_rotation_failures",
            "Scheduled rotations that failed to start",
            scheduled_rotation_failures.clone(),
        );
        r.register(
            "audit_checkpoints",
            "Signed audit checkpoints",
            audit_checkpoints.clone(),
        );
        r.register(
            "http_requests",
            "HTTP requests by route template and status",
            http_requests.clone(),
        );
        r.register(
            "http_request_duration_seconds",
            "HTTP request latency by route template",
            http_duration.clone(),
        );
        r.register(
            "tls_handshakes",
            "mTLS handshakes by outcome",
            tls_handshakes.clone(),
        );
        r.register(
            "bundle_fetches",
            "Node bundle fetches: full or not_modified",
            bundle_fetches.clone(),
        );
        r.register(
            "ipsec_rotations",
            "IPsec keys installed (generated or imported)",
            ipsec_rotations.clone(),
        );
        r.register(
            "refused_requests",
            "Requests refused for authorization",
            refused_requests.clone(),
        );
        r.register("nodes", "Registered nodes", nodes.clone());
        Self {
            registry: Arc::new(r),
            http_requests,
            http_duration,
            tls_handshakes,
            bundle_fetches,
            ipsec_rotations,
            refused_requests,
            nodes,
            rollouts_stuck,
            scheduled_rotation_failures,
            audit_checkpoints,
        }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

/// Installs the global subscriber (stderr). `level` is an `EnvFilter` directive; `RUST_LOG`
/// overrides it.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}
