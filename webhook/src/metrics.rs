//! Prometheus metrics. Every label comes from a fixed set of words (outcome, enforcement mode,
//! reason, kind, result); never an object, namespace or user name, so cardinality is bounded.

use std::fmt;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::decision::Decision;
use crate::workload::WorkloadKind;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub outcome: &'static str,
    pub enforcement: &'static str,
    pub reason: &'static str,
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    /// Decisions by outcome, enforcement mode, reason and kind.
    pub decisions: Family<DecisionLabels, Counter>,
    /// Time in the pure decision function.
    pub decision_duration: Histogram,
    /// Time from a received body to the response body (parse, lookups, decision, encode).
    pub review_duration: Histogram,
    /// Reviews that did not reach a decision, by why: `not_checked`, `invalid_object`,
    /// `bad_request`, `too_large`, `body_timeout`.
    pub reviews_undecided: Family<ResultLabel, Counter>,
    pub keyd_status_fetches: Family<ResultLabel, Counter>,
    pub keyd_status_last_success: Gauge<f64, std::sync::atomic::AtomicU64>,
    /// Audit records: `sent`, `dropped` (queue full), `retried` (keyd refused or unreachable).
    pub audit_records: Family<ResultLabel, Counter>,
    pub audit_queue_depth: Gauge,
    /// Namespace lookups: `cache`, `api` (cache miss, read from the API), `missing`.
    pub namespace_lookups: Family<ResultLabel, Counter>,
    pub policies: Gauge,
    pub ready: Gauge,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("keyd_webhook");
        let decisions = Family::<DecisionLabels, Counter>::default();
        // From 1 us: the decision itself is microseconds; the review adds parsing.
        let decision_duration = Histogram::new([
            1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 1e-2,
        ]);
        let review_duration = Histogram::new([
            1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 0.1, 1.0,
        ]);
        let reviews_undecided = Family::<ResultLabel, Counter>::default();
        let keyd_status_fetches = Family::<ResultLabel, Counter>::default();
        let keyd_status_last_success = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        let audit_records = Family::<ResultLabel, Counter>::default();
        let audit_queue_depth = Gauge::default();
        let namespace_lookups = Family::<ResultLabel, Counter>::default();
        let policies = Gauge::default();
        let ready = Gauge::default();
        r.register(
            "decisions",
            "Admission decisions by outcome, enforcement mode, reason and kind",
            decisions.clone(),
        );
        r.register(
            "decision_duration_seconds",
            "Time spent in the admission decision function",
            decision_duration.clone(),
        );
        r.register(
            "review_duration_seconds",
            "Time to handle one AdmissionReview, body received to response encoded",
            review_duration.clone(),
        );
        r.register(
            "reviews_undecided",
            "AdmissionReviews answered without a decision, by why",
            reviews_undecided.clone(),
        );
        r.register(
            "keyd_status_fetches",
            "Fetches of keyd's enforcement status by result",
            keyd_status_fetches.clone(),
        );
        r.register(
            "keyd_status_last_success_timestamp_seconds",
            "Unix time of the last successful keyd status fetch",
            keyd_status_last_success.clone(),
        );
        r.register(
            "audit_records",
            "Decisions for keyd's audit log: sent, dropped (queue full), retried",
            audit_records.clone(),
        );
        r.register(
            "audit_queue_depth",
            "Decisions waiting to be sent to keyd's audit log",
            audit_queue_depth.clone(),
        );
        r.register(
            "namespace_lookups",
            "Namespace label lookups: cache, api (cache miss), missing",
            namespace_lookups.clone(),
        );
        r.register("policies", "Policies in force", policies.clone());
        r.register(
            "ready",
            "1 once the policy and namespace caches have synced",
            ready.clone(),
        );
        Self {
            registry: Arc::new(r),
            decisions,
            decision_duration,
            review_duration,
            reviews_undecided,
            keyd_status_fetches,
            keyd_status_last_success,
            audit_records,
            audit_queue_depth,
            namespace_lookups,
            policies,
            ready,
        }
    }
}

impl Metrics {
    pub fn record_decision(&self, kind: WorkloadKind, d: &Decision) {
        self.decisions
            .get_or_create(&DecisionLabels {
                outcome: d.outcome.as_str(),
                enforcement: d.enforcement.as_str(),
                reason: d.reason.as_str(),
                kind: kind.as_str(),
            })
            .inc();
    }

    pub fn count(family: &Family<ResultLabel, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabel { result }).inc();
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
