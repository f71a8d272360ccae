//! The API's error answer

use crate::rewrap::RewrapError;
use crate::seal::SealError;
use crate::service::ServiceError;
use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyd_proto::ErrorBody;

/// Replaces every `"..."` string literal in a serde message by `"<redacted>"`.
pub(super) fn redact(msg: &str) -> String {
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

#[derive(Debug)]
pub struct ApiError {
    pub(super) status: StatusCode,
    pub(super) body: ErrorBody,
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
            ServiceError::Forbidden(m) => {
                ApiError::new(StatusCode::FORBIDDEN, "forbidden", m.clone())
            }
            ServiceError::ClaimsUnverifiable(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "claims_unverifiable",
                m.clone(),
            ),
            ServiceError::PolicyNotConfigured => ApiError::new(
                StatusCode::NOT_FOUND,
                "policy_not_configured",
                e.to_string(),
            ),
            ServiceError::Behind(m) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "replica_behind", m.clone())
            }
            ServiceError::RulesNotReady(m) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "rules_not_ready",
                m.clone(),
            ),
            ServiceError::PdfUnavailable(m) => {
                ApiError::new(StatusCode::NOT_IMPLEMENTED, "pdf_unavailable", m.clone())
            }
            ServiceError::Rollout(r) => {
                ApiError::new(StatusCode::CONFLICT, "rollout_in_progress", r.to_string())
            }
            ServiceError::Store(StoreError::Conflict { .. }) => ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!("{e}; nothing was changed"),
            ),
            ServiceError::Seal(s) => custodian_error(s),
            ServiceError::Kek(k) => rewrap_error(k),
            ServiceError::Store(s) if s.is_unavailable() => store_unavailable(s),
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

impl From<RewrapError> for ApiError {
    fn from(e: RewrapError) -> Self {
        rewrap_error(&e)
    }
}

/// A KEK rotation or migration that could not start or failed: the same answer whichever
/// endpoint asked for it (`/v1/kek/rotate`, or `/v1/rotate/kek` through the schedules).
fn rewrap_error(e: &RewrapError) -> ApiError {
    match e {
        RewrapError::Busy(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m.clone()),
        RewrapError::Invalid(m) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m.clone())
        }
        RewrapError::Spec(c) => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", c.to_string())
        }
        RewrapError::TargetCheck(s) if s.is_no_space() => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "store_full",
            format!(
                "{}: no space left on that filesystem; nothing was changed. Free space there \
                 and retry",
                keyd_mtls::error_chain(s)
            ),
        ),
        RewrapError::TargetCheck(s) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "custodian_check_failed",
            format!("the new custodian failed its wrap and unwrap check: {s}; nothing was changed"),
        ),
        RewrapError::Seal(s) => custodian_error(s),
        RewrapError::Store(s) if s.is_unavailable() => store_unavailable(s),
        RewrapError::Store(_) => {
            tracing::error!(error = %e, "internal error");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("{e}; nothing was changed"),
            )
        }
    }
}

/// The store's disk is full (507 `store_full`) or failed (503 `store_unavailable`): nothing was
/// changed, keyd keeps serving what it holds, and the same request succeeds once the disk has
/// space again (keyd reopens its store by itself, no restart).
pub fn store_unavailable(e: &crate::store::StoreError) -> ApiError {
    tracing::error!(error = %keyd_mtls::error_chain(e), "store write failed");
    if e.is_full() {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "store_full",
            format!(
                "{e}; nothing was changed. keyd keeps serving the keys it holds; writes succeed \
                 again once the filesystem has space, without a restart"
            ),
        )
    } else if e.is_unreachable() {
        // A request that timed out may still have been applied by etcd: say so.
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!(
                "{e}; the change was not confirmed (a request that timed out may still apply): \
                 read the state before retrying"
            ),
        )
    } else {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("{e}; nothing was changed"),
        )
    }
}

// ---- extractors ------------------------------------------------------------------------------

/// A custodian failure as an API error: 503 while the custodian cannot be used (keyd serves
/// the keys it holds and refuses what needs a new wrap), 500 for anything else.
pub fn custodian_error(e: &SealError) -> ApiError {
    match e.kind() {
        Some(kind) if kind.is_custodian_down() => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "custodian_unavailable",
            format!(
                "{e}; nothing was changed. keyd keeps serving the keys it holds; key rotations, \
                 imports and KEK changes are refused until the custodian answers again \
                 (keyctl status shows its health)"
            ),
        ),
        _ => {
            tracing::error!(error = %e, "internal error");
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("{e}; nothing was changed"),
            )
        }
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
