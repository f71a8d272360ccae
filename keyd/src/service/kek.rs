//! KEK rotation and migration as the admin asks for them: the checks before a rewrap starts
//! (nothing else running, the target custodian valid and answering), then [`crate::rewrap`].

use std::fmt;
use std::path::Path;
use std::sync::Arc;

use keyd_proto::Timestamp;
use keyd_proto::kek::{KekRotateRequest, KekSpec, MigrationStatus};

use super::state::{Keyd, Result, ServiceError};
use crate::custody::spec::{check_spec_files, validate_spec};
use crate::custody::{Custody, Member};
use crate::rewrap::{self, Kind, RewrapError, RunOptions};
use crate::seal::SealError;
use crate::store::AuditEvent;
use serde_json::json;

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

/// KEK rotations and migrations run on the leader of a shared store: the other replicas load
/// the new keyring by restarting when they see it in the store.
fn leader_only(keyd: &Keyd) -> Result<(), RewrapError> {
    if keyd.is_leader() {
        return Ok(());
    }
    let leader = keyd
        .store()
        .replicas()
        .ok()
        .flatten()
        .and_then(|r| r.into_iter().find(|r| r.leader))
        .map_or_else(
            || "the leader".to_owned(),
            |r| format!("the leader ({} at {})", r.name, r.api),
        );
    Err(RewrapError::Busy(format!(
        "this replica does not lead the store: KEK rotations and migrations run on {leader}; \
         retry there (nothing was changed)"
    )))
}

/// A new KEK on the active backend: a new local key file, the given KMS key, or a new version
/// of the Vault transit key; then every record is rewrapped under it.
pub async fn rotate_kek(
    keyd: &Keyd,
    actor: &str,
    req: KekRotateRequest,
) -> Result<MigrationStatus, RewrapError> {
    leader_only(keyd)?;
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
        RunOptions {
            actor: keyd.system_actor("leader"),
            ..RunOptions::default()
        },
    )
    .await
}

/// Moves every record to the custodian `to`. A refusal (a busy custodian, a spec naming files
/// outside `kek.credential_dirs`, a target that fails its check) is audited as
/// `kek.migration.refused`.
pub async fn migrate_kek(
    keyd: &Keyd,
    actor: &str,
    to: KekSpec,
) -> Result<MigrationStatus, RewrapError> {
    let describe = to.describe();
    let backend = to.backend();
    let result = match leader_only(keyd) {
        Ok(()) => start_migration(keyd, actor, to).await,
        Err(e) => Err(e),
    };
    if let Err(e) = &result {
        let _ = keyd
            .audit(AuditEvent::new(
                "kek.migration.refused",
                actor,
                json!({ "to": describe, "backend": backend,
                        "reason": keyd_mtls::error_chain(e) }),
            ))
            .await;
    }
    result
}

async fn start_migration(
    keyd: &Keyd,
    actor: &str,
    to: KekSpec,
) -> Result<MigrationStatus, RewrapError> {
    let custody = Arc::clone(keyd.custody());
    busy(&custody)?;
    validate_spec(&to, "to")?;
    check_spec_files(&to, &custody.settings().credential_dirs, "to")?;
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
        RunOptions {
            actor: keyd.system_actor("leader"),
            ..RunOptions::default()
        },
    )
    .await
}

async fn connect(custody: &Custody, spec: KekSpec) -> Result<Member, RewrapError> {
    let wrapper = crate::custody::connect(&spec, custody.settings())
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

impl Keyd {
    /// A new KEK on the active custodian (a new local key file, a new Vault key version), with
    /// every record rewrapped in the background; see [`crate::rewrap`]. AWS KMS keys rotate by
    /// moving to a new key (`keyctl kek rotate --key-id`), so a scheduled rotation there is
    /// refused with that instruction and the report shows the class as due.
    pub(super) async fn rotate_kek(&self, actor: &(dyn fmt::Display + Sync)) -> Result<String> {
        let status = rotate_kek(self, &actor.to_string(), Default::default())
            .await
            .map_err(ServiceError::Kek)?;
        Ok(format!(
            "KEK rotation {} started: {} records to rewrap to {}",
            status.id, status.total, status.to
        ))
    }
}

/// The custodian outage in progress as the audit log last recorded it, so that an outage a
/// restart cut short is closed (keyd starts only once the custodian answers).
const OUTAGE_DOC: &str = "kek_outage";

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OpenOutage {
    /// keyd's time of the `kek.custodian.unavailable` record.
    recorded_at: Timestamp,
    backend: String,
    key_id: String,
}

impl Keyd {
    /// Audits the custodian's health changes since the last call: `kek.custodian.unavailable`
    /// when keyd starts serving held keys without it, `kek.custodian.recovered` with the
    /// outage's length when it answers again (the evidence report's outages come from these).
    /// The changes and the open-outage document commit together; on a store failure they are
    /// put back, in order, for the next call.
    pub async fn audit_custody_transitions(&self) -> Result<usize> {
        let custody = Arc::clone(self.custody());
        let _one_writer = custody.transitions_audit.lock().await;
        let (transitions, lost) = custody.take_transitions();
        if transitions.is_empty() && lost == 0 {
            return Ok(0);
        }
        let active = custody.active();
        let (backend, key_id) = (active.wrapper.backend(), active.wrapper.key_id());
        let now = self.clock.now();
        // Each replica records what it saw of the custodian: named, on a shared store.
        let custodian = self.system_actor("custodian");
        let doc = self.store.get(crate::store::Table::Meta, OUTAGE_DOC)?;
        let mut open = doc.is_some();
        let mut txn =
            crate::store::Txn::default().guard(crate::store::Table::Meta, OUTAGE_DOC, doc);
        for t in &transitions {
            match t {
                crate::custody::Transition::Down {
                    since,
                    kind,
                    reason,
                } => {
                    txn = txn.audit(AuditEvent::new(
                        "kek.custodian.unavailable",
                        &custodian,
                        json!({ "backend": backend, "key_id": key_id, "since": since,
                                "kind": kind.as_str(), "reason": reason }),
                    ));
                    open = true;
                }
                crate::custody::Transition::Up { since, seconds } => {
                    txn = txn.audit(AuditEvent::new(
                        "kek.custodian.recovered",
                        &custodian,
                        json!({ "backend": backend, "key_id": key_id, "since": since,
                                "seconds": seconds }),
                    ));
                    open = false;
                }
            }
        }
        if lost > 0 {
            txn = txn.audit(AuditEvent::new(
                "kek.custodian.transitions_lost",
                &custodian,
                json!({ "lost": lost }),
            ));
        }
        txn = if open {
            let outage = OpenOutage {
                recorded_at: now,
                backend: backend.to_owned(),
                key_id: key_id.clone(),
            };
            txn.put(
                crate::store::Table::Meta,
                OUTAGE_DOC,
                serde_json::to_vec(&outage).unwrap_or_default(),
            )
        } else {
            txn.delete(crate::store::Table::Meta, OUTAGE_DOC)
        };
        let n = transitions.len() + usize::from(lost > 0);
        if let Err(e) = self.commit_audit(txn).await {
            custody.requeue_transitions(transitions, lost);
            return Err(e);
        }
        Ok(n)
    }

    /// At start (the custodian has just answered): closes an outage the log still shows open
    /// because keyd stopped before the custodian came back.
    pub async fn close_outage_left_open(&self) -> Result<bool> {
        let Some(doc) = self.store.get(crate::store::Table::Meta, OUTAGE_DOC)? else {
            return Ok(false);
        };
        let open: Option<OpenOutage> = serde_json::from_slice(&doc).ok();
        let now = self.clock.now();
        let seconds = open
            .as_ref()
            .map_or(0, |o| now.0.saturating_sub(o.recorded_at.0));
        let txn = crate::store::Txn::default()
            .guard(crate::store::Table::Meta, OUTAGE_DOC, Some(doc))
            .delete(crate::store::Table::Meta, OUTAGE_DOC)
            .audit(AuditEvent::new(
                "kek.custodian.recovered",
                self.system_actor("leader"),
                json!({ "backend": open.as_ref().map(|o| o.backend.clone()),
                        "key_id": open.as_ref().map(|o| o.key_id.clone()),
                        "since": open.as_ref().map(|o| o.recorded_at), "seconds": seconds,
                        "closed_at_start": true }),
            ));
        self.commit_audit(txn).await?;
        Ok(true)
    }
}
