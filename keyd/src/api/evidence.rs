//! `GET /v1/report/evidence`: the signed evidence report, streamed as JSON lines (progress,
//! then the report) so that a long pass over a large log shows a progress bar.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::Deserialize;

use super::audit::time_param;
use super::error::ApiError;
use super::extract::{Admin, AppState};
use crate::report::{ReportFormat, ReportLine};
use crate::service::{Progress, ReportRequest};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EvidenceQuery {
    #[serde(default)]
    since: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(default)]
    format: Option<String>,
}

fn line(l: &ReportLine) -> bytes::Bytes {
    let mut v = serde_json::to_vec(l).unwrap_or_default();
    v.push(b'\n');
    v.into()
}

pub(super) async fn evidence(
    State(s): State<AppState>,
    Admin(caller): Admin,
    query: Result<Query<EvidenceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(q) = query
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", e.body_text()))?;
    let bad = |m: String| ApiError::new(StatusCode::BAD_REQUEST, "invalid_query", m);
    let name = q.format.as_deref().unwrap_or("json");
    let format = ReportFormat::parse(name)
        .ok_or_else(|| bad(format!("format {name:?} is not one of json, html, pdf")))?;
    let req = ReportRequest {
        since: time_param("since", q.since.as_deref())?,
        until: time_param("until", q.until.as_deref())?,
        format,
    };
    if let (Some(a), Some(b)) = (req.since, req.until)
        && a > b
    {
        return Err(bad(format!("since ({a}) is after until ({b})")));
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<bytes::Bytes, std::io::Error>>(4);
    let progress = Arc::new(Progress::default());
    let keyd = Arc::clone(&s.keyd);
    let p = Arc::clone(&progress);
    tokio::spawn(async move {
        let caller = caller;
        let work = keyd.evidence_report(&caller, req, Arc::clone(&p));
        tokio::pin!(work);
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let result = loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tick.tick() => {
                    let l = ReportLine::Progress {
                        done: p.done.load(Ordering::Relaxed),
                        total: p.total.load(Ordering::Relaxed),
                    };
                    if tx.send(Ok(line(&l))).await.is_err() {
                        return; // the client went away
                    }
                }
            }
        };
        let last = match result {
            Ok(r) => ReportLine::Report {
                content: STANDARD.encode(&r.content),
                compliant: r.report.compliant,
                signature: r.signature,
            },
            Err(e) => {
                let e = ApiError::from(e);
                ReportLine::Error {
                    status: e.status.as_u16(),
                    error: e.body.error,
                    message: e.body.message,
                }
            }
        };
        let _ = tx.send(Ok(line(&last))).await;
    });
    let body = axum::body::Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx));
    Ok(([(header::CONTENT_TYPE, "application/x-ndjson")], body).into_response())
}
