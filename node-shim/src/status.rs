//! What node-shim reports about itself: a JSON status document and Prometheus metrics, served on
//! the plain-HTTP ops listener (`/healthz`, `/readyz`, `/status`, `/metrics`). Neither holds key
//! material; labels are fixed words, never node names.

use std::fmt;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use keyd_proto::Timestamp;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use serde::Serialize;

#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct SkippedPeer {
    pub node: String,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct KeydStatus {
    pub server: String,
    pub reachable: bool,
    pub last_contact: Option<Timestamp>,
    pub consecutive_failures: u32,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Status {
    pub node: String,
    pub mode: String,
    /// `kernel` or `userspace` (WireGuard mode).
    pub wireguard_impl: Option<String>,
    pub keyd: KeydStatus,
    /// Revision of the bundle the kernel was last programmed from.
    pub bundle_revision: Option<String>,
    pub last_sync: Option<Timestamp>,
    pub last_sync_error: Option<String>,
    /// The kernel state adopted at start instead of being flushed.
    pub adopted: Adopted,
    /// What was last acknowledged to keyd.
    pub acked: Option<keyd_proto::Ack>,
    pub ipsec_outbound_spi: Option<u8>,
    /// Set while outbound waits for a new key to settle: (SPI, RFC 3339 time of the switch).
    pub ipsec_pending_outbound: Option<(u8, Timestamp)>,
    pub wireguard_public_key: Option<String>,
    pub peers: usize,
    pub skipped: Vec<SkippedPeer>,
    /// Skipped peers' pod CIDRs whose traffic is dropped, not sent in the clear.
    pub dropped_cidrs: Vec<String>,
    pub ready: bool,
    /// The eBPF data plane (empty when `[steering]` attaches nothing).
    pub steering: SteeringStatus,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct SteeringStatus {
    /// `all` or `policy`.
    pub node_mode: String,
    /// Devices the program is attached to.
    pub devices: Vec<String>,
    /// The revision of keyd's rules in the maps (policy mode).
    pub rules_revision: Option<String>,
    /// Why the last fetch of the rules failed, if it did (the last rules stay in force).
    pub rules_error: Option<String>,
    /// Parts of the rules that could not be loaded.
    pub problems: Vec<String>,
    /// Per policy (or `all`): packets and bytes steered into encryption, dropped (strict) and
    /// sent in the clear, since the counters were created.
    pub policies: Vec<keyd_proto::rules::PolicyCounters>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Adopted {
    pub xfrm_states: usize,
    pub xfrm_policies: usize,
    pub wireguard_peers: usize,
    pub wireguard_private_key: bool,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpOutcome {
    pub op: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct Outcome {
    pub outcome: &'static str,
}

/// A policy's name (an administrator's object, bounded; never a pod's) and what happened to its
/// covered packets: `encrypted`, `dropped` or `clear`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PolicyOutcome {
    pub policy: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KernelOp {
    pub op: &'static str,
}

#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Registry>,
    pub keyd_requests: Family<OpOutcome, Counter>,
    pub keyd_reachable: Gauge,
    pub keyd_consecutive_failures: Gauge,
    pub reconciles: Family<Outcome, Counter>,
    pub reconcile_seconds: Histogram,
    pub kernel_ops: Family<KernelOp, Counter>,
    pub last_sync_timestamp: Gauge,
    pub ipsec_outbound_spi: Gauge,
    pub peers: Gauge,
    pub skipped_peers: Gauge,
    pub keypair_rotations: Counter,
    pub ipsec_states_recreated: Counter,
    pub policy_packets: Family<PolicyOutcome, Counter>,
    pub policy_bytes: Family<PolicyOutcome, Counter>,
}

impl fmt::Debug for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut r = Registry::with_prefix("node_shim");
        let m = Metrics {
            registry: Arc::new(Registry::default()),
            keyd_requests: Family::default(),
            keyd_reachable: Gauge::default(),
            keyd_consecutive_failures: Gauge::default(),
            reconciles: Family::default(),
            reconcile_seconds: Histogram::new([0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0]),
            kernel_ops: Family::default(),
            last_sync_timestamp: Gauge::default(),
            ipsec_outbound_spi: Gauge::default(),
            peers: Gauge::default(),
            skipped_peers: Gauge::default(),
            keypair_rotations: Counter::default(),
            ipsec_states_recreated: Counter::default(),
            policy_packets: Family::default(),
            policy_bytes: Family::default(),
        };
        r.register(
            "keyd_requests",
            "Requests to keyd by operation and outcome",
            m.keyd_requests.clone(),
        );
        r.register(
            "keyd_reachable",
            "1 if the last request to keyd got an answer",
            m.keyd_reachable.clone(),
        );
        r.register(
            "keyd_consecutive_failures",
            "Failed keyd requests since the last success",
            m.keyd_consecutive_failures.clone(),
        );
        r.register(
            "reconciles",
            "Reconcile passes by outcome",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_seconds",
            "Time to observe the kernel, plan and apply",
            m.reconcile_seconds.clone(),
        );
        r.register(
            "kernel_ops",
            "Kernel changes applied, by kind",
            m.kernel_ops.clone(),
        );
        r.register(
            "last_sync_timestamp_seconds",
            "Unix time of the last successful reconcile",
            m.last_sync_timestamp.clone(),
        );
        r.register(
            "ipsec_outbound_spi",
            "The SPI outbound ESP uses (0: none)",
            m.ipsec_outbound_spi.clone(),
        );
        r.register("peers", "Peers programmed", m.peers.clone());
        r.register(
            "skipped_peers",
            "Peers that could not be programmed (see /status)",
            m.skipped_peers.clone(),
        );
        r.register(
            "wireguard_keypair_rotations",
            "WireGuard keypairs generated after the first",
            m.keypair_rotations.clone(),
        );
        r.register(
            "ipsec_states_recreated",
            "Outbound XFRM states that disappeared and were added again (the peer refuses them as replays until the next IPsec rotation)",
            m.ipsec_states_recreated.clone(),
        );
        r.register(
            "policy_packets",
            "Packets an EncryptionPolicy covers, by policy (`all` in all mode) and outcome: encrypted, dropped (strict), clear",
            m.policy_packets.clone(),
        );
        r.register(
            "policy_bytes",
            "Bytes of those packets",
            m.policy_bytes.clone(),
        );
        Metrics {
            registry: Arc::new(r),
            ..m
        }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

/// Status and metrics, shared between the agent, the data plane and the ops server.
#[derive(Debug, Clone)]
pub struct Shared {
    pub status: Arc<Mutex<Status>>,
    pub metrics: Metrics,
    /// The peers and which of their tunnels the kernel holds, published by the agent after each
    /// reconcile for the eBPF data plane.
    pub peers: tokio::sync::watch::Sender<PeerView>,
}

impl Default for Shared {
    fn default() -> Self {
        Self {
            status: Arc::default(),
            metrics: Metrics::default(),
            peers: tokio::sync::watch::Sender::new(PeerView::default()),
        }
    }
}

/// Other nodes as the data plane needs them: their pod CIDRs, and the readiness flags of the
/// tunnel to each (see [`crate::reconcile::readiness`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerView {
    pub pod_cidrs: Vec<(String, Vec<ipnet::IpNet>)>,
    pub ready: std::collections::BTreeMap<String, u32>,
}

impl Shared {
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        // A panic while holding the lock leaves a status document that is still readable.
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut s);
    }

    pub fn snapshot(&self) -> Status {
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

pub fn ops_router(shared: Shared) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .with_state(shared)
}

async fn readyz(State(s): State<Shared>) -> Response {
    if s.snapshot().ready {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: the kernel has not been programmed yet\n",
        )
            .into_response()
    }
}

async fn status(State(s): State<Shared>) -> Response {
    axum::Json(s.snapshot()).into_response()
}

async fn metrics(State(s): State<Shared>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.metrics.encode(),
    )
        .into_response()
}
