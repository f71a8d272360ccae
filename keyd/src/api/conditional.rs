//! Conditional GETs with a long poll, one code path for every resource that has one (a node's
//! key bundle, a node's rules): `If-None-Match` with the last `ETag` answers 304 when nothing
//! changed, and `?wait=30s` with it holds the request until a change or the wait ends.

use std::time::Duration;

use axum::extract::Query;
use axum::extract::rejection::QueryRejection;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::Deserialize;

use super::error::ApiError;
use crate::service::ServiceError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct WaitQuery {
    /// Long poll: with `If-None-Match`, wait up to this long (e.g. `30s`, at most 5m) for the
    /// resource to change before answering 304.
    #[serde(default)]
    wait: Option<String>,
}

/// The longest a long poll may wait.
const MAX_WAIT: Duration = Duration::from_secs(300);

/// What the caller asked: the ETag it holds, and how long it will wait for another.
#[derive(Debug)]
pub(super) struct Conditional {
    if_none_match: Option<String>,
    wait: Option<Duration>,
}

impl Conditional {
    pub(super) fn parse(
        headers: &HeaderMap,
        query: Result<Query<WaitQuery>, QueryRejection>,
    ) -> Result<Self, ApiError> {
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
        Ok(Self {
            if_none_match,
            wait,
        })
    }

    /// The ETag held and how long to wait for another, when the caller long-polls.
    pub(super) fn long_poll(&self) -> Option<(&str, Duration)> {
        Some((self.if_none_match.as_deref()?, self.wait?))
    }

    /// The ETag the caller holds, if any.
    pub(super) fn held(&self) -> Option<&str> {
        self.if_none_match.as_deref()
    }

    /// Whether the caller already holds `etag` (answer 304).
    pub(super) fn holds(&self, etag: &str) -> bool {
        self.if_none_match.as_deref() == Some(etag)
    }
}

/// The resource: `waited` (the long poll, when there is one) if it saw a change, else `now`.
/// Both are futures, so `now` runs only when needed.
pub(super) async fn fetch<T>(
    waited: Option<impl Future<Output = Result<Option<T>, ServiceError>>>,
    now: impl Future<Output = Result<T, ServiceError>>,
) -> Result<T, ApiError> {
    if let Some(w) = waited
        && let Some(v) = w.await?
    {
        return Ok(v);
    }
    Ok(now.await?)
}

fn etag_header(etag: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(etag)
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "etag"))
}

/// 304 with the ETag.
pub(super) fn not_modified(etag: &str) -> Result<Response, ApiError> {
    Ok((
        StatusCode::NOT_MODIFIED,
        [(header::ETAG, etag_header(etag)?)],
    )
        .into_response())
}

/// 200 with a JSON body and its ETag, never cached by intermediaries.
pub(super) fn full_json(etag: &str, body: Bytes) -> Result<Response, ApiError> {
    Ok((
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            ),
            (header::ETAG, etag_header(etag)?),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-store")),
        ],
        body,
    )
        .into_response())
}
