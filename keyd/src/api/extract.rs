//! Who is calling

use super::error::{ApiError, redact};
use crate::service::Keyd;
use crate::store::AuditEvent;
use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::{StatusCode, request::Parts};
use keyd_mtls::identity::PeerIdentity;
use keyd_proto::identity::Identity;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::sync::Arc;

/// The authenticated caller.
#[derive(Debug)]
pub struct Caller(pub Identity);

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // A connection outlives the handshake: a certificate that has expired since is no
        // longer an identity, whatever the connection.
        if let Some(v) = parts.extensions.get::<keyd_mtls::identity::PeerValidity>()
            && keyd_proto::Timestamp::now().0 > v.not_after
        {
            let who = match parts.extensions.get::<PeerIdentity>() {
                Some(Ok(id)) => id.to_string(),
                _ => "unidentified".to_owned(),
            };
            return Err(refuse(
                state,
                &who,
                parts,
                "the client certificate has expired since this connection was opened; reconnect with a current one",
            )
            .await);
        }
        match parts.extensions.get::<PeerIdentity>() {
            Some(Ok(Identity::Node(n))) => {
                let not_before = parts
                    .extensions
                    .get::<keyd_mtls::identity::PeerValidity>()
                    .map(|v| v.not_before);
                match state.keyd.node_certificate_refused(n, not_before) {
                    Some(why) => Err(refuse(
                        state,
                        &Identity::Node(n.clone()).to_string(),
                        parts,
                        &format!("certificate revoked: {why}"),
                    )
                    .await),
                    None => Ok(Caller(Identity::Node(n.clone()))),
                }
            }
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

/// A node certificate reading its own node's resources, or an admin reading any node's.
#[derive(Debug)]
pub struct NodeOrAdmin {
    pub caller: Identity,
    pub name: String,
}

impl FromRequestParts<AppState> for NodeOrAdmin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let Caller(caller) = Caller::from_request_parts(parts, state).await?;
        if matches!(caller, Identity::Admin(_)) {
            let Path(name) = Path::<String>::from_request_parts(parts, state)
                .await
                .map_err(|e| {
                    ApiError::new(StatusCode::BAD_REQUEST, "invalid_path", e.body_text())
                })?;
            return Ok(NodeOrAdmin { caller, name });
        }
        let OwnNode { caller, name } = OwnNode::from_request_parts(parts, state).await?;
        Ok(NodeOrAdmin { caller, name })
    }
}

/// Audits a refusal (who, what, why) and builds the 403.
pub(super) async fn refuse(state: &AppState, who: &str, parts: &Parts, why: &str) -> ApiError {
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

pub(super) fn json_rejection(r: JsonRejection) -> ApiError {
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

#[derive(Clone, Debug)]
pub struct AppState {
    pub keyd: Arc<Keyd>,
}
