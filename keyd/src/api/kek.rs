//! `/v1/kek`: the custodian's status, and KEK rotation and migration (admin only).

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyd_proto::kek::{KekMigrateRequest, KekRotateRequest};

use super::error::ApiError;
use super::extract::{Admin, ApiJson, AppState};
use crate::service::{migrate_kek, rotate_kek};

/// `GET /v1/kek`.
pub async fn status(State(s): State<AppState>, Admin(_): Admin) -> Response {
    Json(s.keyd.custody().status()).into_response()
}

/// `POST /v1/kek/rotate`: 202 with the migration's status; the rewrap runs in the background.
pub async fn rotate(
    State(s): State<AppState>,
    Admin(caller): Admin,
    ApiJson(req): ApiJson<KekRotateRequest>,
) -> Result<Response, ApiError> {
    let status = rotate_kek(&s.keyd, &caller.to_string(), req).await?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}

/// `POST /v1/kek/migrate`.
pub async fn migrate(
    State(s): State<AppState>,
    Admin(caller): Admin,
    ApiJson(req): ApiJson<KekMigrateRequest>,
) -> Result<Response, ApiError> {
    let status = migrate_kek(&s.keyd, &caller.to_string(), req.to).await?;
    Ok((StatusCode::ACCEPTED, Json(status)).into_response())
}
