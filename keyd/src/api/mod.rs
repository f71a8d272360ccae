//! The HTTP API served over mTLS, and the plain-HTTP ops endpoints.
//!
//! The caller's identity comes from its client certificate (see [`keyd_mtls::identity::peer_identity`])
//! and reaches handlers as a request extension set per connection by [`keyd_mtls::server`]. A node
//! certificate may touch only its own node's resources; the rest of `/v1` needs an admin
//! certificate. Every refusal is a JSON [`ErrorBody`], and every authorization refusal is
//! audited.

use std::time::{Duration, Instant};

use axum::extract::rejection::QueryRejection;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use keyd_mtls::identity::PeerValidity;
use keyd_proto::{Ack, ImportRequest, NodeRegistration, RotateRequest};
use serde::Deserialize;
use serde_json::json;

mod audit;
mod conditional;
mod error;
mod evidence;
mod extract;
mod kek;

pub use audit::{PruneRequest, RECORDS_HEADER};
pub use error::ApiError;
pub use extract::{
    Admin, ApiJson, AppState, Caller, NodeOrAdmin, OwnNode, Webhook, WebhookOrAdmin,
};

use conditional::{Conditional, WaitQuery, fetch, full_json, not_modified};

/// The `/v1` API. Bodies larger than `max_body` bytes are refused with 413.
pub fn router(state: AppState, max_body: usize) -> Router {
    let metrics_state = state.clone();
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", put(register_node).delete(remove_node))
        .route("/v1/nodes/{name}/readmit", post(readmit_node))
        .route(
            "/v1/nodes/{name}/allocation",
            put(allocate_node).delete(remove_allocation),
        )
        .route("/v1/allocations", get(list_allocations))
        .route("/v1/nodes/{name}/bundle", get(bundle))
        .route("/v1/nodes/{name}/rules", get(rules))
        // A report may name every policy of a node's rules (up to 1024, each with its counters),
        // more than the general body limit allows.
        .route(
            "/v1/nodes/{name}/dataplane",
            post(dataplane_report).layer(axum::extract::DefaultBodyLimit::max(
                MAX_DATAPLANE_REPORT_BYTES,
            )),
        )
        .route("/v1/dataplane", get(dataplane_summary))
        .route("/v1/nodes/{name}/ack", post(ack))
        .route("/v1/status", get(status))
        .route("/v1/ipsec", get(ipsec_show))
        .route("/v1/ipsec/rotate", post(ipsec_rotate))
        .route("/v1/ipsec/import", post(ipsec_import))
        .route("/v1/ipsec/rollout/skip", post(ipsec_rollout_skip))
        .route("/v1/ipsec/cilium", get(ipsec_cilium))
        .route("/v1/enforcement", get(enforcement))
        .route("/v1/schedules", get(schedules_list))
        .route("/v1/schedules/{class}", put(schedule_update))
        .route("/v1/schedules/{class}/bounds", put(schedule_bounds))
        .route("/v1/rotate/{class}", post(rotate_class))
        .route("/v1/report", get(report))
        .route("/v1/report/evidence", get(evidence::evidence))
        .route("/v1/audit/export", get(audit::audit_export))
        .route("/v1/audit/public-key", get(audit::audit_public_key))
        .route("/v1/audit/segments", get(audit::audit_segments))
        .route("/v1/audit/prune", post(audit::audit_prune))
        .route("/v1/audit/admission", post(admission_decisions))
        .route("/v1/kek", get(kek::status))
        .route("/v1/kek/rotate", post(kek::rotate))
        .route("/v1/kek/migrate", post(kek::migrate))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
        })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this endpoint",
            )
        })
        .layer(axum::extract::DefaultBodyLimit::max(max_body))
        .layer(middleware::from_fn_with_state(metrics_state, observe))
        .with_state(state)
}

/// `/healthz`, `/readyz` and `/metrics`, for probes and scrapers that hold no client certificate.
/// They reveal no key material and no node names.
pub fn ops_router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Response {
    // Ready once the store answers; the cache was filled before the listener opened. While the
    // KEK custodian cannot be used keyd stays ready (it serves the keys it holds) and says so,
    // until kek.max_unavailable has passed.
    if let Err(e) = s.keyd.custody().serving_check() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response();
    }
    if let Some((since, why, until)) = s.keyd.store_outage() {
        if let Err(e) = s.keyd.store_serving_check() {
            return (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response();
        }
        return (
            StatusCode::OK,
            format!(
                "ready (degraded: cut off from the store since {since}: {why}; serving held \
                 bundles until {until}; writes are refused){}\n",
                role(&s.keyd)
            ),
        )
            .into_response();
    }
    let health = s.keyd.custody().health();
    match s.keyd.store().get(crate::store::Table::Meta, "wireguard") {
        Ok(Some(_)) if health.is_down() => {
            let status = s.keyd.custody().status().health;
            (
                StatusCode::OK,
                format!(
                    "ready (degraded: the KEK custodian cannot be used: {}; serving held keys until {}; rotations and imports are refused)\n",
                    status.reason.unwrap_or_default(),
                    status.serving_until.map(|t| t.to_string()).unwrap_or_default()
                ),
            )
                .into_response()
        }
        Ok(Some(_)) => (StatusCode::OK, format!("ready{}\n", role(&s.keyd))).into_response(),
        Ok(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store not initialised\n",
        )
            .into_response(),
        // A full or failing disk: keyd still serves every key it holds from memory, so it stays
        // in the Service's endpoints; writes are refused (507/503) until the store is back.
        Err(e) if e.is_unavailable() => (
            StatusCode::OK,
            format!(
                "ready (degraded: {e}; serving held keys; writes are refused until the store can \
                 be written)\n"
            ),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
    }
}

/// On a shared store, which part this replica plays.
fn role(keyd: &crate::service::Keyd) -> &'static str {
    match (keyd.store().shared(), keyd.is_leader()) {
        (false, _) => "",
        (true, true) => " (leader)",
        (true, false) => " (replica; another keyd leads)",
    }
}

async fn metrics(State(s): State<AppState>) -> Response {
    s.keyd.metrics.nodes.set(s.keyd.list_nodes().len() as i64);
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        s.keyd.metrics.encode(),
    )
        .into_response()
}

async fn observe(State(s): State<AppState>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let method = req.method().clone();
    let start = Instant::now();
    let resp = next.run(req).await;
    let elapsed = start.elapsed();
    let status = resp.status();
    let m = &s.keyd.metrics;
    m.http_requests
        .get_or_create(&crate::telemetry::RouteLabels {
            route: route.clone(),
            status: status.as_u16().to_string(),
        })
        .inc();
    m.http_duration
        .get_or_create(&crate::telemetry::RouteOnly {
            route: route.clone(),
        })
        .observe(elapsed.as_secs_f64());
    tracing::debug!(%method, route, status = status.as_u16(), micros = elapsed.as_micros() as u64, "request");
    resp
}

// ---- errors --------------------------------------------------------------------------------------

async fn register_node(
    State(s): State<AppState>,
    OwnNode { caller, name }: OwnNode,
    ApiJson(reg): ApiJson<NodeRegistration>,
) -> Result<Response, ApiError> {
    let info = s.keyd.register_node(&caller, &name, reg).await?;
    Ok(Json(info).into_response())
}

#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RemoveQuery {
    /// Rotate the IPsec key and start a preshared-key epoch afterwards (default true).
    rotate: Option<bool>,
}

async fn remove_node(
    State(s): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    query: Result<Query<RemoveQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let out = s
        .keyd
        .remove_node(&caller, &name, q.rotate.unwrap_or(true))
        .await?;
    Ok(Json(out).into_response())
}

async fn readmit_node(
    State(s): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.keyd.readmit_node(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// A long poll ends when the caller's certificate expires at the latest: an identity is not
/// kept alive by a request it started while it was valid.
fn within_certificate(wait: Duration, validity: Option<&PeerValidity>) -> Duration {
    match validity {
        Some(v) => wait.min(Duration::from_secs(
            v.not_after.saturating_sub(keyd_proto::Timestamp::now().0),
        )),
        None => wait,
    }
}

async fn bundle(
    State(s): State<AppState>,
    OwnNode { name, .. }: OwnNode,
    validity: Option<Extension<PeerValidity>>,
    headers: HeaderMap,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let c = Conditional::parse(&headers, query)?;
    let validity = validity.map(|Extension(v)| v);
    s.keyd.bundle_after(c.held()).await?;
    let waited = c.long_poll().map(|(etag, wait)| {
        s.keyd
            .bundle_wait(&name, etag, within_certificate(wait, validity.as_ref()))
    });
    let b = fetch(waited, s.keyd.bundle(&name)).await?;
    // Equal content is not modified, whichever replica (store revision) rendered it.
    let holds = c.held().is_some_and(|h| {
        crate::service::bundle_content(h) == crate::service::bundle_content(&b.etag)
    });
    let outcome = if holds { "not_modified" } else { "full" };
    s.keyd
        .metrics
        .bundle_fetches
        .get_or_create(&crate::telemetry::Outcome { outcome })
        .inc();
    if holds {
        return not_modified(&b.etag);
    }
    s.keyd.audit_bundle_fetch(&name, &b).await?;
    full_json(&b.etag, b.body())
}

/// `GET /v1/nodes/{name}/rules`: a node reads its own rules, an admin any node's. Conditional
/// and long-polled like the bundle.
async fn rules(
    State(s): State<AppState>,
    NodeOrAdmin { name, .. }: NodeOrAdmin,
    headers: HeaderMap,
    query: Result<Query<WaitQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let c = Conditional::parse(&headers, query)?;
    let waited = c
        .long_poll()
        .map(|(etag, wait)| s.keyd.node_rules_wait(&name, etag, wait));
    let r = fetch(waited, std::future::ready(s.keyd.node_rules(&name))).await?;
    if c.holds(&r.etag) {
        s.keyd.count_rules_fetch("not_modified");
        return not_modified(&r.etag);
    }
    s.keyd.count_rules_fetch("full");
    full_json(&r.etag, r.body.clone())
}

/// The largest data-plane report: 1025 entries of a long policy name and eight counters.
const MAX_DATAPLANE_REPORT_BYTES: usize = 1024 * 1024;

/// `POST /v1/nodes/{name}/dataplane`: a node's data-plane report, kept as its latest.
async fn dataplane_report(
    State(s): State<AppState>,
    OwnNode { caller, name }: OwnNode,
    ApiJson(report): ApiJson<keyd_proto::rules::DataplaneReport>,
) -> Result<Response, ApiError> {
    let drops = s.keyd.record_dataplane(&caller, &name, report).await?;
    Ok(Json(json!({ "recorded": true, "policies_with_new_strict_drops": drops })).into_response())
}

async fn dataplane_summary(
    State(s): State<AppState>,
    Admin(_): Admin,
) -> Result<Response, ApiError> {
    Ok(Json(s.keyd.dataplane_summary()?).into_response())
}

async fn ack(
    State(s): State<AppState>,
    OwnNode { caller, name }: OwnNode,
    ApiJson(ack): ApiJson<Ack>,
) -> Result<Response, ApiError> {
    Ok(Json(s.keyd.ack(&caller, &name, ack).await?).into_response())
}

async fn allocate_node(
    State(s): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
    ApiJson(allocation): ApiJson<keyd_proto::NodeAllocation>,
) -> Result<Response, ApiError> {
    keyd_proto::identity::validate_name(&name)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string()))?;
    let (allocation, warning) = s.keyd.allocate_node(&caller, &name, allocation).await?;
    Ok(Json(keyd_proto::AllocationSet {
        node: name,
        allocation,
        warning,
    })
    .into_response())
}

async fn remove_allocation(
    State(s): State<AppState>,
    Admin(caller): Admin,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    s.keyd.remove_allocation(&caller, &name).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_allocations(State(s): State<AppState>, Admin(_): Admin) -> Response {
    Json(s.keyd.allocations()).into_response()
}

async fn list_nodes(State(s): State<AppState>, Admin(_): Admin) -> Response {
    Json(s.keyd.list_nodes()).into_response()
}

async fn status(State(s): State<AppState>, Admin(_): Admin) -> Response {
    Json(s.keyd.status()).into_response()
}

async fn ipsec_show(State(s): State<AppState>, Admin(_): Admin) -> Response {
    Json(s.keyd.ipsec_status()).into_response()
}

async fn ipsec_rotate(
    State(s): State<AppState>,
    Admin(caller): Admin,
    ApiJson(req): ApiJson<RotateRequest>,
) -> Result<Response, ApiError> {
    Ok(Json(s.keyd.rotate_ipsec(&caller, req).await?).into_response())
}

async fn ipsec_rollout_skip(
    State(s): State<AppState>,
    Admin(caller): Admin,
    ApiJson(req): ApiJson<keyd_proto::SkipRequest>,
) -> Result<Response, ApiError> {
    Ok(Json(s.keyd.skip_rollout_node(&caller, &req.node).await?).into_response())
}

async fn ipsec_import(
    State(s): State<AppState>,
    Admin(caller): Admin,
    ApiJson(req): ApiJson<ImportRequest>,
) -> Result<Response, ApiError> {
    Ok(Json(s.keyd.import_ipsec(&caller, req.keys.expose()).await?).into_response())
}

async fn enforcement(State(s): State<AppState>, WebhookOrAdmin(_): WebhookOrAdmin) -> Response {
    Json(s.keyd.enforcement_status()).into_response()
}

/// Most decisions one report may carry; the webhook sends smaller batches.
const MAX_DECISIONS_PER_REPORT: usize = 1000;

async fn admission_decisions(
    State(s): State<AppState>,
    Webhook(caller): Webhook,
    ApiJson(batch): ApiJson<keyd_proto::AdmissionDecisions>,
) -> Result<Response, ApiError> {
    if batch.decisions.len() > MAX_DECISIONS_PER_REPORT {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid",
            format!("at most {MAX_DECISIONS_PER_REPORT} decisions per report"),
        ));
    }
    let n = batch.decisions.len();
    s.keyd
        .record_admission_decisions(&caller, batch.decisions)
        .await?;
    Ok(Json(json!({ "recorded": n })).into_response())
}

fn parse_class(class: &str) -> Result<keyd_proto::KeyClass, ApiError> {
    keyd_proto::KeyClass::parse(class).ok_or_else(|| {
        let all: Vec<&str> = keyd_proto::KeyClass::ALL
            .iter()
            .map(|c| c.as_str())
            .collect();
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("key class {class:?} is not one of {}", all.join(", ")),
        )
    })
}

async fn schedules_list(State(s): State<AppState>, Admin(_): Admin) -> Response {
    Json(s.keyd.schedules()).into_response()
}

async fn schedule_update(
    State(s): State<AppState>,
    Admin(caller): Admin,
    Path(class): Path<String>,
    ApiJson(update): ApiJson<keyd_proto::ScheduleUpdate>,
) -> Result<Response, ApiError> {
    let class = parse_class(&class)?;
    Ok(Json(s.keyd.update_schedule(&caller, class, update).await?).into_response())
}

async fn schedule_bounds(
    State(s): State<AppState>,
    Admin(caller): Admin,
    Path(class): Path<String>,
    ApiJson(bounds): ApiJson<keyd_proto::Bounds>,
) -> Result<Response, ApiError> {
    let class = parse_class(&class)?;
    Ok(Json(s.keyd.set_bounds(&caller, class, bounds).await?).into_response())
}

async fn rotate_class(
    State(s): State<AppState>,
    Admin(caller): Admin,
    Path(class): Path<String>,
) -> Result<Response, ApiError> {
    let class = parse_class(&class)?;
    let what = s.keyd.rotate_class(&caller, class).await?;
    Ok(Json(json!({ "class": class, "result": what })).into_response())
}

async fn report(State(s): State<AppState>, Admin(_): Admin) -> Response {
    Json(s.keyd.report()).into_response()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CiliumQuery {
    /// `line` (default) or `secret`.
    #[serde(default)]
    format: Option<String>,
    /// Namespace of the Secret; `kube-system` by default.
    #[serde(default)]
    namespace: Option<String>,
}

async fn ipsec_cilium(
    State(s): State<AppState>,
    Admin(caller): Admin,
    query: Result<Query<CiliumQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let (namespace, content_type) = match q.format.as_deref().unwrap_or("line") {
        "line" => (None, "text/plain; charset=utf-8"),
        "secret" => (
            Some(q.namespace.as_deref().unwrap_or("kube-system")),
            "application/yaml",
        ),
        other => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_query",
                format!("format {other:?} is neither \"line\" nor \"secret\""),
            ));
        }
    };
    let text = s.keyd.cilium_export(&caller, namespace).await?;
    let body = bytes::Bytes::from_owner(ZeroizingText(text));
    Ok((
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response())
}

/// Lets a response body own a zeroizing string, so the key text is wiped after sending.
struct ZeroizingText(zeroize::Zeroizing<String>);

impl AsRef<[u8]> for ZeroizingText {
    fn as_ref(&self) -> &[u8] {
        self.0.as_bytes()
    }
}
