//! `/v1/audit`

use super::error::ApiError;
use super::extract::{Admin, ApiJson, AppState};
use axum::Json;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

pub(super) async fn audit_export(
    State(s): State<AppState>,
    Admin(caller): Admin,
    query: Result<Query<ExportQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", m);
    let format_name = q.format.as_deref().unwrap_or("jsonl");
    let format = crate::audit::Format::parse(format_name).ok_or_else(|| {
        bad(format!(
            "format {format_name:?} is not one of jsonl, ocsf, cef"
        ))
    })?;
    let range = crate::service::ExportRange {
        since: time_param("since", q.since.as_deref())?,
        until: time_param("until", q.until.as_deref())?,
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

pub(super) async fn audit_public_key(State(s): State<AppState>, Admin(_): Admin) -> Response {
    let (public_key, key_id) = s.keyd.audit_public_key();
    Json(json!({ "public_key": public_key, "key_id": key_id, "algorithm": "ed25519" }))
        .into_response()
}

pub(super) async fn audit_segments(
    State(s): State<AppState>,
    Admin(_): Admin,
) -> Result<Response, ApiError> {
    Ok(Json(s.keyd.audit_segments()?).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PruneRequest {
    through_seq: u64,
    last_hash: String,
}

pub(super) async fn audit_prune(
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

/// Header carrying the number of records an export will stream (for progress bars).
pub const RECORDS_HEADER: &str = "x-keyd-audit-records";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExportQuery {
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

/// A `since`/`until` query parameter: RFC 3339, or a 400 naming it.
pub(super) fn time_param(
    name: &str,
    v: Option<&str>,
) -> Result<Option<keyd_proto::Timestamp>, ApiError> {
    v.map(|t| {
        humantime::parse_rfc3339_weak(t)
            .map(keyd_proto::Timestamp::from_system)
            .map_err(|e| {
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "invalid_query",
                    format!("{name}={t:?}: {e} (use RFC 3339, e.g. 2026-11-21T00:00:00Z)"),
                )
            })
    })
    .transpose()
}
