//! `/v1/kek`: the custodian's status, and KEK rotation and migration (admin only).

use std::path::Path;
use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use keyd_proto::Timestamp;
use keyd_proto::kek::{KekMigrateRequest, KekRotateRequest, KekSpec, MigrationStatus};

use super::{Custody, Member, config::validate_spec};
use crate::api::{Admin, ApiError, ApiJson, AppState};
use crate::rewrap::{self, Kind, RewrapError, RunOptions};
use crate::seal::SealError;
use crate::service::Keyd;

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

impl From<RewrapError> for ApiError {
    fn from(e: RewrapError) -> Self {
        match &e {
            RewrapError::Busy(m) => ApiError::new(StatusCode::CONFLICT, "conflict", m.clone()),
            RewrapError::Invalid(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", m.clone())
            }
            RewrapError::Config(c) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid", c.to_string())
            }
            RewrapError::TargetCheck(s) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "custodian_check_failed",
                format!(
                    "the new custodian failed its wrap and unwrap check: {s}; nothing was changed"
                ),
            ),
            RewrapError::Seal(s) => custodian_error(s),
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
}

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

fn busy(custody: &Custody) -> Result<(), RewrapError> {
    match custody.migration() {
        Some(m) if m.state != "completed" => Err(RewrapError::Busy(format!(
            "KEK {} {} to {} is still running ({} of {} records rewrapped); wait for it to \
             complete (keyctl kek status)",
            m.kind, m.id, m.to, m.rewrapped, m.total
        ))),
        _ => Ok(()),
    }
}

/// A new KEK on the active backend: a new local key file, the given KMS key, or a new version
/// of the Vault transit key; then every record is rewrapped under it.
pub async fn rotate_kek(
    keyd: &Keyd,
    actor: &str,
    req: KekRotateRequest,
) -> Result<MigrationStatus, RewrapError> {
    let custody = Arc::clone(keyd.custody());
    busy(&custody)?;
    let active = custody.active();
    let spec = active.spec.clone().ok_or_else(|| {
        RewrapError::Invalid("the active custodian was not configured from a spec".into())
    })?;
    let target = match &spec {
        KekSpec::Local { path } => {
            if req.key_id.is_some() || req.rewrap_only {
                return Err(RewrapError::Invalid(
                    "key_id and rewrap_only apply to aws-kms and vault-transit; a local KEK \
                     rotates to a new key file"
                        .into(),
                ));
            }
            let new_spec = KekSpec::Local {
                path: next_local_path(path)?,
            };
            connect(&custody, new_spec).await?
        }
        KekSpec::AwsKms(a) => {
            let key_id = req.key_id.ok_or_else(|| {
                RewrapError::Invalid(
                    "aws-kms: give the new KMS key (keyctl kek rotate --key-id ARN); KMS's own \
                     automatic rotation keeps the key id and needs no rewrap"
                        .into(),
                )
            })?;
            if req.rewrap_only {
                return Err(RewrapError::Invalid(
                    "rewrap_only applies to vault-transit".into(),
                ));
            }
            let mut next = a.clone();
            if key_id.starts_with("arn:") {
                // The ARN names its region.
                next.region = None;
            }
            next.key_id = key_id;
            let new_spec = KekSpec::AwsKms(next);
            if new_spec.same_key(&spec) {
                return Err(RewrapError::Invalid(format!(
                    "{} is already the active KMS key",
                    a.key_id
                )));
            }
            validate_spec(&new_spec, "key_id")?;
            connect(&custody, new_spec).await?
        }
        KekSpec::VaultTransit(_) => {
            if req.key_id.is_some() {
                return Err(RewrapError::Invalid(
                    "vault-transit rotates its key to a new version; to move to another key, \
                     use keyctl kek migrate"
                        .into(),
                ));
            }
            if !req.rewrap_only
                && let Some(r) = active.wrapper.rotate_key_version().await
            {
                r?;
            }
            active
        }
    };
    rewrap::start(
        Arc::clone(keyd.store()),
        custody,
        actor,
        Kind::Rotate,
        target,
        RunOptions::default(),
    )
    .await
}

/// Moves every record to the custodian `to`.
pub async fn migrate_kek(
    keyd: &Keyd,
    actor: &str,
    to: KekSpec,
) -> Result<MigrationStatus, RewrapError> {
    let custody = Arc::clone(keyd.custody());
    busy(&custody)?;
    validate_spec(&to, "to")?;
    if custody
        .active()
        .spec
        .is_some_and(|active| active.same_key(&to))
    {
        return Err(RewrapError::Invalid(format!(
            "{} is already the active custodian (keyctl kek rotate makes a new key on it)",
            to.describe()
        )));
    }
    let target = connect(&custody, to).await?;
    rewrap::start(
        Arc::clone(keyd.store()),
        custody,
        actor,
        Kind::Migrate,
        target,
        RunOptions::default(),
    )
    .await
}

async fn connect(custody: &Custody, spec: KekSpec) -> Result<Member, RewrapError> {
    let wrapper = super::connect(&spec, custody.settings())
        .await
        .map_err(RewrapError::TargetCheck)?;
    Ok(Member::new(Some(spec), wrapper))
}

/// A new local KEK file next to the current one: `kek-<unix seconds>-<random>.key`.
fn next_local_path(current: &Path) -> Result<std::path::PathBuf, RewrapError> {
    let dir = current
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut suffix = [0u8; 3];
    getrandom::fill(&mut suffix).map_err(|e| SealError::Random(e.to_string()))?;
    Ok(dir.join(format!(
        "kek-{}-{}.key",
        Timestamp::now().0,
        hex::encode(suffix)
    )))
}
