//! HTTP: `/validate` (AdmissionReview), `/healthz`, `/readyz`, `/metrics`, over TLS with a
//! certificate reloaded from disk; optionally the last three over plain HTTP on an ops port.
//!
//! Nothing a client sends can panic or hang a handler: bodies are read with a size limit (413)
//! and a time limit (408), handshakes and request headers have timeouts, and every parse error
//! becomes a 400 or a denying AdmissionResponse.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http_body_util::{BodyExt as _, LengthLimitError, Limited};
use keyd_mtls::server::{Handshake, Limits as ListenerLimits};
use keyd_proto::{AdmissionDecision, Timestamp};
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Limits;
use crate::decision::{DecisionConfig, Input, decide};
use crate::keyd::{AuditQueue, StatusCache};
use crate::kube_cache::ClusterSource;
use crate::metrics::Metrics;
use crate::review::{self, Action, BadReview};

/// Everything a review needs.
#[derive(Debug, Clone)]
pub struct AppState {
    pub cluster: ClusterSource,
    pub keyd: Arc<StatusCache>,
    pub audit: Arc<AuditQueue>,
    pub decision: Arc<DecisionConfig>,
    pub limits: Limits,
    pub metrics: Metrics,
}

/// The TLS port's routes.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/validate", post(validate))
        .merge(ops_routes())
        .with_state(state)
}

/// Health and metrics only.
fn ops_routes() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
}

/// The ops port's router with its state.
pub fn ops_app(state: AppState) -> Router {
    ops_routes().with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.cluster.is_ready() {
        (StatusCode::OK, "ok\n").into_response()
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "policy and namespace caches have not synced yet\n",
        )
            .into_response()
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
        )],
        s.metrics.encode(),
    )
        .into_response()
}

fn plain(status: StatusCode, text: String) -> Response {
    (status, text).into_response()
}

async fn validate(State(s): State<AppState>, req: Request) -> Response {
    let max = s.limits.max_body_bytes;
    // Refuse early on a declared length; `Limited` enforces it for chunked bodies too.
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        Metrics::count(&s.metrics.reviews_undecided, "too_large");
        return plain(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("AdmissionReview larger than {max} bytes\n"),
        );
    }
    let body = Limited::new(req.into_body(), max);
    let bytes = match tokio::time::timeout(s.limits.body_timeout, body.collect()).await {
        Err(_) => {
            Metrics::count(&s.metrics.reviews_undecided, "body_timeout");
            return plain(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time\n".into(),
            );
        }
        Ok(Err(e)) if e.downcast_ref::<LengthLimitError>().is_some() => {
            Metrics::count(&s.metrics.reviews_undecided, "too_large");
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("AdmissionReview larger than {max} bytes\n"),
            );
        }
        Ok(Err(e)) => {
            Metrics::count(&s.metrics.reviews_undecided, "bad_request");
            return plain(
                StatusCode::BAD_REQUEST,
                format!("cannot read the request body: {e}\n"),
            );
        }
        Ok(Ok(c)) => c.to_bytes(),
    };
    let started = Instant::now();
    let result = handle(&s, &bytes).await;
    s.metrics
        .review_duration
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok(json) => (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            )],
            Body::from(json),
        )
            .into_response(),
        Err(e) => {
            Metrics::count(&s.metrics.reviews_undecided, "bad_request");
            tracing::info!(error = %e, "refused a request that is not an AdmissionReview");
            plain(StatusCode::BAD_REQUEST, format!("{e}\n"))
        }
    }
}

/// One AdmissionReview body to its response body.
pub async fn handle(s: &AppState, body: &[u8]) -> Result<Vec<u8>, BadReview> {
    let r = review::parse(body)?;
    let checked = match r.action {
        Action::Pass(why) => {
            Metrics::count(&s.metrics.reviews_undecided, "not_checked");
            tracing::debug!(uid = %r.uid, why, "allowed without a decision");
            return Ok(review::respond(r.api_version, &r.uid, true, None, &[]));
        }
        Action::Reject { code, message } => {
            Metrics::count(&s.metrics.reviews_undecided, "invalid_object");
            tracing::info!(uid = %r.uid, %message, "refused an object the webhook cannot read");
            return Ok(review::respond(
                r.api_version,
                &r.uid,
                false,
                Some((code, &message)),
                &[],
            ));
        }
        Action::Check(c) => c,
    };
    // An exempt namespace is decided without its labels: no lookup (and no API read on a miss).
    let ns = if s.decision.exempt_namespaces.contains(&checked.namespace) {
        None
    } else {
        s.cluster.namespace(&checked.namespace).await
    };
    let policies = s.cluster.policies();
    let keyd = s.keyd.view(Instant::now());
    let input = Input {
        operation: checked.operation,
        namespace: &checked.namespace,
        object: &checked.object,
        old_object: checked.old_object.as_ref(),
        user: &checked.user,
    };
    let t = Instant::now();
    let d = decide(
        &input,
        ns.as_ref().map(|n| n.labels()),
        &policies,
        &keyd,
        &s.decision,
    );
    s.metrics
        .decision_duration
        .observe(t.elapsed().as_secs_f64());
    s.metrics.record_decision(checked.kind, &d);
    if !d.allowed {
        tracing::info!(
            uid = %r.uid,
            kind = %checked.kind,
            namespace = %checked.namespace,
            name = %checked.object.display_name(),
            reason = d.reason.as_str(),
            "denied"
        );
    }
    // Dry runs are answered but not recorded: the webhook registers sideEffects NoneOnDryRun.
    if d.record && !checked.dry_run {
        s.audit.push(AdmissionDecision {
            at: Timestamp::now(),
            outcome: d.outcome.as_str().to_owned(),
            enforcement: d.enforcement.as_str().to_owned(),
            operation: checked.operation.as_str().to_owned(),
            kind: checked.kind.as_str().to_owned(),
            namespace: checked.namespace.clone(),
            name: checked.object.display_name(),
            user: checked.user.clone(),
            policies: d.policies.clone(),
            reason: d.summary.clone(),
        });
    }
    Ok(review::respond(
        r.api_version,
        &r.uid,
        d.allowed,
        Some((403, &d.message)),
        &d.warnings,
    ))
}

/// Serves `router` over TLS until `shutdown` resolves, then drains connections (at most
/// `drain`). Each handshake uses the latest config from `tls`; a client has `handshake_timeout`
/// for the handshake and again for each request's headers, and keyd_mtls's default connection
/// cap and idle timeout apply.
pub async fn serve_tls(
    listener: TcpListener,
    tls: watch::Receiver<Arc<ServerConfig>>,
    router: Router,
    handshake_timeout: Duration,
    drain: Duration,
    shutdown: impl Future<Output = ()>,
) {
    // The `&_` makes the closure accept a borrow of any lifetime.
    let connection = move |peer: SocketAddr, handshake: Result<&_, Handshake>| match handshake {
        Ok(_) => Some(router.clone()),
        Err(Handshake::Failed(e)) => {
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
            None
        }
        Err(Handshake::TimedOut) => {
            tracing::debug!(%peer, "TLS handshake timed out");
            None
        }
    };
    let limits = ListenerLimits {
        handshake_timeout,
        header_read_timeout: handshake_timeout,
        drain,
        ..ListenerLimits::default()
    };
    keyd_mtls::server::serve_tls(listener, tls, limits, shutdown, connection).await;
}

/// Serves `router` over plain HTTP until `shutdown` resolves; request headers within 5 s.
pub async fn serve_plain(
    listener: TcpListener,
    router: Router,
    shutdown: impl Future<Output = ()>,
) {
    let limits = ListenerLimits {
        header_read_timeout: Duration::from_secs(5),
        ..ListenerLimits::default()
    };
    keyd_mtls::server::serve_plain(listener, router, limits, shutdown).await;
}
