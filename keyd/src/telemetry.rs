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

/// A custodian call (`generate`, `unwrap`, `wrap`, `rewrap`, `check`) and its outcome (`ok`
/// or a [`crate::seal::FailureKind`] name).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CallLabels {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecordState {
    pub state: &'static str,
}

/// The KEK custodian's metrics; owned by [`crate::custody::Custody`], registered with [`Metrics`].
#[derive(Clone, Default)]
pub struct CustodyMetrics {
    pub custodian_up: Gauge,
    pub custodian_calls: Family<CallLabels, Counter>,
    /// Progress of the running or last KEK migration: `total`, `rewrapped`, `failed`,
    /// `remaining`.
    pub rewrap_records: Family<RecordState, Gauge>,
    pub rewrapped_records: Counter,
    pub migration_running: Gauge,
}

impl fmt::Debug for CustodyMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CustodyMetrics")
    }
}

impl CustodyMetrics {
    pub fn record_call(&self, op: &'static str, outcome: &'static str) {
        self.custodian_calls
            .get_or_create(&CallLabels { op, outcome })
            .inc();
    }

    pub fn set_progress(&self, total: u64, rewrapped: u64, failed: u64) {
        let set = |state, v: u64| {
            self.rewrap_records
                .get_or_create(&RecordState { state })
                .set(i64::try_from(v).unwrap_or(i64::MAX));
        };
        set("total", total);
        set("rewrapped", rewrapped);
        set("failed", failed);
        set("remaining", total.saturating_sub(rewrapped + failed));
    }

    fn register(&self, r: &mut Registry) {
        r.register(
            "kek_custodian_up",
            "1 while the active KEK custodian answers, 0 while it cannot be used",
            self.custodian_up.clone(),
        );
        r.register(
            "kek_custodian_calls",
            "KEK custodian calls by operation and outcome",
            self.custodian_calls.clone(),
        );
        r.register(
            "kek_rewrap_records",
            "Sealed records of the running or last KEK migration, by state",
            self.rewrap_records.clone(),
        );
        r.register(
            "kek_rewrapped_records",
            "Sealed records rewrapped under a new KEK",
            self.rewrapped_records.clone(),
        );
        r.register(
            "kek_migration_running",
            "1 while a KEK rotation or migration is rewrapping records",
            self.migration_running.clone(),
        );
    }
}

/// The policy watcher's and the data-plane endpoints' metrics.
#[derive(Clone)]
pub struct RulesMetrics {
    /// 1 once the watcher has published rules.
    pub ready: Gauge,
    pub compiles: Counter,
    pub compile_duration: Histogram,
    /// Distinct policies rejected on some node (a malformed selector, over the node's limit).
    pub rejected_policies: Gauge,
    /// `full` or `not_modified`.
    pub fetches: Family<Outcome, Counter>,
    pub dataplane_reports: Counter,
}

impl Default for RulesMetrics {
    fn default() -> Self {
        Self {
            ready: Gauge::default(),
            compiles: Counter::default(),
            compile_duration: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            rejected_policies: Gauge::default(),
            fetches: Family::default(),
            dataplane_reports: Counter::default(),
        }
    }
}

impl fmt::Debug for RulesMetrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RulesMetrics")
    }
}

impl RulesMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "policy_rules_ready",
            "1 once node rules have been compiled from the Kubernetes API ([policy])",
            self.ready.clone(),
        );
        r.register(
            "policy_rules_compiles",
            "Compiles of every node's data-plane rules",
            self.compiles.clone(),
        );
        r.register(
            "policy_rules_compile_seconds",
            "Time to compile every node's data-plane rules",
            self.compile_duration.clone(),
        );
        r.register(
            "policy_rules_rejected_policies",
            "Policies rejected on at least one node (malformed selector, over a node's limit)",
            self.rejected_policies.clone(),
        );
        r.register(
            "policy_rules_fetches",
            "Node rules fetches: full or not_modified",
            self.fetches.clone(),
        );
        r.register(
            "dataplane_reports",
            "Data-plane reports accepted from nodes",
            self.dataplane_reports.clone(),
        );
    }
}

/// A key class (`ipsec`, `wireguard-psk`, `wireguard-node-keys`, `kek`): bounded.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClassLabel {
    pub class: &'static str,
}

/// What alerting rules ask about keys (deploy/monitoring/): per key class the age of the oldest
/// key in use against its schedule and its compliance bound, and the IPsec rollout's progress.
/// Set from the same report `keyctl report` prints, on every scheduler pass.
#[derive(Debug, Default, Clone)]
pub struct KeyMetrics {
    /// Age of the oldest key of the class still in use.
    pub age: Family<ClassLabel, Gauge>,
    /// The age past which the class is overdue: period + overlap + the rollout's allowed wait.
    pub overdue_after: Family<ClassLabel, Gauge>,
    /// The compliance bound: `max_period` + overlap + the rollout's allowed wait; only for a
    /// class whose bounds set `max_period`.
    pub max_age: Family<ClassLabel, Gauge>,
    pub overdue: Family<ClassLabel, Gauge>,
    pub within_bounds: Family<ClassLabel, Gauge>,
    pub paused: Family<ClassLabel, Gauge>,
    /// Live nodes the current IPsec rollout phase waits for (0 without a rollout).
    pub rollout_waiting_nodes: Gauge,
    /// How long the current IPsec rollout phase has lasted (0 without a rollout).
    pub rollout_phase_seconds: Gauge,
    /// 1 while the current IPsec rollout phase has waited past the limit.
    pub rollout_stuck: Gauge,
    /// Unix time of the last scheduler pass that completed.
    pub scheduler_last_pass: Gauge,
}

impl KeyMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "key_age_seconds",
            "Age of the oldest key of the class still in use",
            self.age.clone(),
        );
        r.register(
            "key_overdue_after_seconds",
            "Key age past which the class is overdue (period + overlap + allowed rollout wait)",
            self.overdue_after.clone(),
        );
        r.register(
            "key_max_age_seconds",
            "Key age the class's compliance bound allows (max_period + overlap + allowed rollout wait)",
            self.max_age.clone(),
        );
        r.register(
            "key_rotation_overdue",
            "1 while the class is overdue for rotation (keyctl report exits 7)",
            self.overdue.clone(),
        );
        r.register(
            "key_within_bounds",
            "1 while the class's schedule and keys are within its compliance bounds",
            self.within_bounds.clone(),
        );
        r.register(
            "key_schedule_paused",
            "1 while the class's schedule is paused",
            self.paused.clone(),
        );
        r.register(
            "ipsec_rollout_waiting_nodes",
            "Live nodes the current IPsec rollout phase waits for",
            self.rollout_waiting_nodes.clone(),
        );
        r.register(
            "ipsec_rollout_phase_seconds",
            "How long the current IPsec rollout phase has lasted (0: no rollout)",
            self.rollout_phase_seconds.clone(),
        );
        r.register(
            "ipsec_rollout_stuck",
            "1 while the current IPsec rollout phase has waited past the limit",
            self.rollout_stuck.clone(),
        );
        r.register(
            "scheduler_last_pass_timestamp_seconds",
            "Unix time of the last scheduler pass that completed",
            self.scheduler_last_pass.clone(),
        );
    }
}

/// Names one certificate `[cluster_pki]` keeps: a Secret's name, or `keyd-server` for keyd's own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabel {
    pub certificate: String,
}

/// `[cluster_pki]`: when each kept certificate expires, and whether the keeper's passes succeed.
#[derive(Debug, Default, Clone)]
pub struct PkiMetrics {
    /// Unix time the certificate stops being valid.
    pub not_after: Family<CertificateLabel, Gauge>,
    /// Unix time of the last pass that checked every certificate without an error.
    pub last_success: Gauge,
    /// Passes that ended with an error (the API server refused, a Secret not keyd's, ...).
    pub failures: Counter,
}

impl PkiMetrics {
    fn register(&self, r: &mut Registry) {
        r.register(
            "cluster_pki_certificate_not_after_timestamp_seconds",
            "Unix time a certificate kept by [cluster_pki] expires",
            self.not_after.clone(),
        );
        r.register(
            "cluster_pki_last_success_timestamp_seconds",
            "Unix time of the last [cluster_pki] pass that completed without an error",
            self.last_success.clone(),
        );
        r.register(
            "cluster_pki_failures",
            "[cluster_pki] passes that ended with an error",
            self.failures.clone(),
        );
    }
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
    pub liveness_write_failures: Counter,
    pub audit_checkpoints: Counter,
    pub custody: CustodyMetrics,
    pub rules: RulesMetrics,
    pub keys: KeyMetrics,
    pub pki: PkiMetrics,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(CustodyMetrics::default())
    }
}

impl Metrics {
    /// Metrics registering the custodian's own (see [`crate::custody::Custody::metrics`]).
    pub fn new(custody: CustodyMetrics) -> Self {
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
        let liveness_write_failures = Counter::default();
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
            "liveness_write_failures",
            "Scheduler passes that could not write node liveness seen by bundle fetches",
            liveness_write_failures.clone(),
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
        custody.register(&mut r);
        let rules = RulesMetrics::default();
        rules.register(&mut r);
        let keys = KeyMetrics::default();
        keys.register(&mut r);
        let pki = PkiMetrics::default();
        pki.register(&mut r);
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
            liveness_write_failures,
            audit_checkpoints,
            custody,
            rules,
            keys,
            pki,
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
