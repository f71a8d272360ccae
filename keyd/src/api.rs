//! The HTTP API served over mTLS, and the plain-HTTP ops endpoints.
//!
//! The caller's identity comes from its client certificate (see [`keyd_mtls::identity::peer_identity`])
//! and reaches handlers as a request extension set per connection by [`keyd_mtls::server`]. A node
//! certificate may touch only its own node's resources; the rest of `/v1` needs an admin
//! certificate. Every refusal is a JSON [`ErrorBody`], and every authorization refusal is
//! audited.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use keyd_proto::identity::Identity;
use keyd_proto::{Ack, ErrorBody, ImportRequest, NodeRegistration, RotateRequest};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::service::{Keyd, ServiceError};
use crate::store::AuditEvent;
use keyd_mtls::identity::PeerIdentity;

#[derive(Clone, Debug)]
pub struct AppState {
    pub keyd: Arc<Keyd>,
}

/// The `/v1` API. Bodies larger than `max_body` bytes are refused with 413.
pub fn router(state: AppState, max_body: usize) -> Router {
    let metrics_state = state.clone();
    Router::new()
        .route("/v1/nodes", get(list_nodes))
        .route("/v1/nodes/{name}", put(register_node))
        .route("/v1/nodes/{name}/bundle", get(bundle))
        .route("/v1/nodes/{name}/ack", post(ack))
        .route("/v1/status", get(status))
        .route("/v1/ipsec", get(ipsec_show))
        .route("/v1/ipsec/rotate", post(ipsec_rotate))
        .route("/v1/ipsec/import", post(ipsec_import))
        .route("/v1/ipsec/cilium", get(ipsec_cilium))
        .route("/v1/enforcement", get(enforcement))
        .route("/v1/schedules", get(schedules_list))
        .route("/v1/schedules/{class}", put(schedule_update))
        .route("/v1/schedules/{class}/bounds", put(schedule_bounds))
        .route("/v1/rotate/{class}", post(rotate_class))
        .route("/v1/report", get(report))
        .route("/v1/audit/export", get(audit_export))
        .route("/v1/audit/public-key", get(audit_public_key))
        .route("/v1/audit/segments", get(audit_segments))
        .route("/v1/audit/prune", post(audit_prune))
        .route("/v1/audit/admission", post(admission_decisions))
        .route("/v1/kek", get(crate::kms::http::status))
        .route("/v1/kek/rotate", post(crate::kms::http::rotate))
        .route("/v1/kek/migrate", post(crate::kms::http::migrate))
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
        Ok(Some(_)) => (StatusCode::OK, "ready\n").into_response(),
        Ok(None) => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: store not initialised\n",
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {e}\n")).into_response(),
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

#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    body: ErrorBody,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &str, message: impl Into<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                error: code.to_owned(),
                message: message.into(),
            },
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        use crate::store::StoreError;
        match &e {
            ServiceError::NotFound(m) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", m.clone())
            }
            ServiceError::Invalid(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m.clone())
            }
            ServiceError::Ipsec(e) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_key",
                e.to_string(),
            ),
            ServiceError::Conflict(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m.clone()),
            ServiceError::Rollout(r) => {
                ApiError::new(StatusCode::CONFLICT, "rollout_in_progress", r.to_string())
            }
            ServiceError::Store(StoreError::Conflict { .. }) => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{e}; nothing was changed"),
            ),
            ServiceError::Seal(s) => crate::kms::http::custodian_error(s),
            ServiceError::Store(_) => {
                tracing::error!(error = %e, "internal error");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "internal",
                    format!("{e}; nothing was changed"),
                )
            }
        }
    }
}

// ---- extractors ------------------------------------------------------------------------------

/// The authenticated caller.
#[derive(Debug)]
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        match parts.extensions.get::<PeerIdentity>() {
            Some(Ok(id)) => Ok(Caller(id.clone())),
            Some(Err(e)) => Err(refuse(
                state,
                "unidentified",
                parts,
                &format!("client certificate: {e}"),
            )
            .await),
            None => Err(ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                "no client certificate on this connection",
            )),
        }
    }
}

/// A caller with an admin certificate.
#[derive(Debug)]
pub struct Admin(pub Identity);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(id) = Caller::from_request_parts(parts, state).await?;
        match id {
            Identity::Admin(_) => Ok(Admin(id)),
            Identity::Node(_) | Identity::Webhook(_) => Err(refuse(
                state,
                &id.to_string(),
                parts,
                "this endpoint needs an admin certificate",
            )
            .await),
        }
    }
}

/// The admission webhook, or an admin (who may read whatever the webhook reads).
#[derive(Debug)]
pub struct WebhookOrAdmin(pub Identity);

impl FromRequestParts<AppState> for WebhookOrAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(id) = Caller::from_request_parts(parts, state).await?;
        match id {
            Identity::Admin(_) | Identity::Webhook(_) => Ok(WebhookOrAdmin(id)),
            Identity::Node(_) => Err(refuse(
                state,
                &id.to_string(),
                parts,
                "this endpoint needs a webhook or admin certificate",
            )
            .await),
        }
    }
}

/// The admission webhook only.
#[derive(Debug)]
pub struct Webhook(pub Identity);

impl FromRequestParts<AppState> for Webhook {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(id) = Caller::from_request_parts(parts, state).await?;
        match id {
            Identity::Webhook(_) => Ok(Webhook(id)),
            Identity::Node(_) | Identity::Admin(_) => Err(refuse(
                state,
                &id.to_string(),
                parts,
                "this endpoint needs a webhook certificate",
            )
            .await),
        }
    }
}

/// A node certificate acting on its own node (`{name}` in the path). Being a parts extractor, it
/// runs before any body is read, so an unauthorized caller learns nothing about the body schema.
#[derive(Debug)]
pub struct OwnNode {
    pub caller: Identity,
    pub name: String,
}

impl FromRequestParts<AppState> for OwnNode {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(caller) = Caller::from_request_parts(parts, state).await?;
        let Path(name) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.body_text()))?;
        match &caller {
            Identity::Node(n) if *n == name => Ok(OwnNode { caller, name }),
            Identity::Node(n) => Err(refuse(
                state,
                &caller.to_string(),
                parts,
                &format!("node {n:?} may only access its own resources, not node {name:?}'s"),
            )
            .await),
            Identity::Admin(_) | Identity::Webhook(_) => Err(refuse(
                state,
                &caller.to_string(),
                parts,
                "node endpoints need that node's own certificate",
            )
            .await),
        }
    }
}

/// Audits a refusal (who, what, why) and builds the 403.
async fn refuse(state: &AppState, who: &str, parts: &Parts, why: &str) -> ApiError {
    state.keyd.metrics.refused_requests.inc();
    let what = format!("{} {}", parts.method, parts.uri.path());
    tracing::info!(who, what, why, "request refused");
    if let Err(e) = state
        .keyd
        .audit(AuditEvent::new(
            "request.refused",
            who,
            json!({ "request": what, "reason": why }),
        ))
        .await
    {
        tracing::error!(error = %e, "cannot audit a refused request");
    }
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", why)
}

/// `axum::Json` with JSON error bodies; serde messages have quoted string values redacted, since a
/// misplaced field could carry key material.
pub struct ApiJson<T>(pub T);

impl<T> std::fmt::Debug for ApiJson<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiJson(..)")
    }
}

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> ApiError {
    let status = r.status();
    let (code, message) = match &r {
        JsonRejection::MissingJsonContentType(_) => (
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json`".to_owned(),
        ),
        JsonRejection::JsonSyntaxError(_) => (
            "invalid_json",
            format!("body is not valid JSON: {}", redact(&r.body_text())),
        ),
        JsonRejection::JsonDataError(_) => ("invalid_body", redact(&r.body_text())),
        _ if status == StatusCode::PAYLOAD_TOO_LARGE => (
            "body_too_large",
            "request body is larger than the limit".to_owned(),
        ),
        _ => ("invalid_body", redact(&r.body_text())),
    };
    ApiError::new(status, code, message)
}

/// Replaces every `"..."` string literal in a serde message by `"<redacted>"`.
fn redact(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut in_quote = false;
    for c in msg.chars() {
        match (c, in_quote) {
            ('"', false) => {
                in_quote = true;
                out.push_str("\"<redacted>");
            }
            ('"', true) => {
                in_quote = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

// ---- handlers --------------------------------------------------------------------------------

async fn register_node(
    State(s): State<AppState>,
    OwnNode { caller, name }: OwnNode,
    ApiJson(reg): ApiJson<NodeRegistration>,
) -> Result<Response, ApiError> {
    let info = s.keyd.register_node(&caller, &name, reg).await?;
    Ok(Json(info).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct BundleQuery {
    /// Long poll: with `If-None-Match`, wait up to this long (e.g. `30s`, at most 5m) for the
    /// bundle to change before answering 304.
    #[serde(default)]
    wait: Option<String>,
}

/// The longest a long poll may wait.
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(300);

async fn bundle(
    State(s): State<AppState>,
    OwnNode { name, .. }: OwnNode,
    headers: HeaderMap,
    query: Result<Query<BundleQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let wait = match q.wait.as_deref() {
        None => None,
        Some(w) => Some(
            humantime::parse_duration(w)
                .map_err(|e| {
                    ApiError::new(
                        StatusCode::BAD_REQUEST,
                        "invalid_query",
                        format!("wait={w:?}: {e}"),
                    )
                })?
                .min(MAX_WAIT),
        ),
    };
    let if_none_match = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let b = match (&if_none_match, wait) {
        (Some(etag), Some(wait)) => match s.keyd.bundle_wait(&name, etag, wait).await? {
            Some(b) => b,
            None => s.keyd.bundle(&name).await?,
        },
        _ => s.keyd.bundle(&name).await?,
    };
    let etag = HeaderValue::from_str(&b.etag)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "etag"))?;
    if if_none_match.as_deref() == Some(b.etag.as_str()) {
        s.keyd
            .metrics
            .bundle_fetches
            .get_or_create(&crate::telemetry::Outcome {
                outcome: "not_modified",
            })
            .inc();
        return Ok((StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response());
    }
    s.keyd.audit_bundle_fetch(&name, &b).await?;
    s.keyd
        .metrics
        .bundle_fetches
        .get_or_create(&crate::telemetry::Outcome { outcome: "full" })
        .inc();
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        b.body(),
    )
        .into_response())
}

async fn ack(
    State(s): State<AppState>,
    OwnNode { caller, name }: OwnNode,
    ApiJson(ack): ApiJson<Ack>,
) -> Result<Response, ApiError> {
    Ok(Json(s.keyd.ack(&caller, &name, ack).await?).into_response())
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
struct ExportQuery {
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    from_seq: Option<u64>,
    #[serde(default)]
    to_seq: Option<u64>,
    #[serde(default)]
    format: Option<String>,
}

/// Header carrying the number of records an export will stream (for progress bars).
pub const RECORDS_HEADER: &str = "x-keyd-audit-records";

async fn audit_export(
    State(s): State<AppState>,
    Admin(caller): Admin,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", m);
    let time =
        |name: &str, v: &Option<String>| -> Result<Option<keyd_proto::Timestamp>, ApiError> {
            v.as_deref()
                .map(|t| {
                    humantime::parse_rfc3339_weak(t)
                        .map(keyd_proto::Timestamp::from_system)
                        .map_err(|e| {
                            bad(format!(
                                "{name}={t:?}: {e} (use RFC 3339, e.g. 2026-11-21T00:00:00Z)"
                            ))
                        })
                })
                .transpose()
        };
    let format_name = q.format.as_deref().unwrap_or("jsonl");
    let format = crate::audit::Format::parse(format_name).ok_or_else(|| {
        bad(format!(
            "format {format_name:?} is not one of jsonl, ocsf, cef"
        ))
    })?;
    let range = crate::service::ExportRange {
        since: time("since", &q.since)?,
        until: time("until", &q.until)?,
        from_seq: q.from_seq,
        to_seq: q.to_seq,
    };
    let export = s.keyd.export_audit(&caller, range, format).await?;
    let content_type = if format == crate::audit::Format::Cef {
        "text/plain; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    let body =
        axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(export.chunks));
    Ok((
        [
            (header::CONTENT_TYPE, content_type.to_owned()),
            (
                header::HeaderName::from_static(RECORDS_HEADER),
                export.records.to_string(),
            ),
        ],
        body,
    )
        .into_response())
}

async fn audit_public_key(State(s): State<AppState>, Admin(_): Admin) -> Response {
    let (public_key, key_id) = s.keyd.audit_public_key();
    Json(json!({ "public_key": public_key, "key_id": key_id, "algorithm": "ed25519" }))
        .into_response()
}

async fn audit_segments(State(s): State<AppState>, Admin(_): Admin) -> Result<Response, ApiError> {
    Ok(Json(s.keyd.audit_segments()?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PruneRequest {
    through_seq: u64,
    last_hash: String,
}

async fn audit_prune(
    State(s): State<AppState>,
    Admin(caller): Admin,
    ApiJson(req): ApiJson<PruneRequest>,
) -> Result<Response, ApiError> {
    let deleted = s
        .keyd
        .prune_audit(&caller, req.through_seq, &req.last_hash)
        .await?;
    Ok(Json(json!({ "pruned": deleted, "through_seq": req.through_seq })).into_response())
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

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redacts_string_literals() {
        assert_eq!(
            redact(r#"invalid value: string "3+ rfc4106 abcd 128", expected x at line 1"#),
            r#"invalid value: string "<redacted>", expected x at line 1"#
        );
        assert_eq!(redact("unknown field `foo`"), "unknown field `foo`");
    }
}
