//! KEK rotation and migration: every sealed record's data key rewrapped under a new KEK, in
//! the background, without downtime, resumable after a crash.
//!
//! A rotation (a new local KEK, a new KMS key, a new Vault key version) and a migration to
//! another backend are one operation. It starts by making the target the active custodian (new
//! records are sealed under it at once) while the previous one stays in the keyring, so every
//! record opens at every moment. A background task then rewraps each record not yet under the
//! target: the custodian rewraps server-side where it can (Vault `rewrap`, KMS `ReEncrypt`),
//! otherwise keyd unwraps with the old custodian and wraps with the new; either way the new
//! wrapped key is *verified* before it is written, by unwrapping it with the target and opening
//! the record with it (AES-GCM authenticates the result). Only the wrapped key changes; the
//! record's ciphertext, and so its plaintext, does not. Each chunk of records is one store
//! transaction, guarded by the records' previous bytes, that also records the progress: a crash
//! loses at most the chunk in flight, and keyd resumes where the store says it stopped. The
//! state lives in the `kek_custody` document, which is also where keyd finds, at start, which
//! custodians records may be under.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Instant;

use keyd_proto::Timestamp;
use keyd_proto::kek::{KekSpec, MigrationStatus};
use serde_json::json;

use crate::custody::doc::{
    CUSTODY_DOC, CustodyDoc, MAX_LISTED_FAILURES, MigrationDoc, commit, initialise, read_doc,
    to_bytes,
};
use crate::custody::spec::SpecError;
use crate::custody::{Custody, Member};
use crate::seal::{self, KeyWrapper, SealContext, SealError, SealedRecord};
use crate::store::{AuditEvent, Store, StoreError, Table, Txn};

/// Why a migration could not start, or what it hit.
#[derive(Debug, thiserror::Error)]
pub enum RewrapError {
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Spec(#[from] SpecError),
    /// The new custodian failed its wrap and unwrap round trip (or could not be reached).
    #[error(transparent)]
    TargetCheck(SealError),
    #[error(transparent)]
    Seal(#[from] SealError),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Test hooks; the defaults are what keyd runs with.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Records per store transaction.
    pub chunk: usize,
    /// Stop (as a crash would) after this many committed chunks.
    pub halt_after_chunks: Option<usize>,
    /// The actor of the records the migration writes by itself (resumed, completed): `keyd`,
    /// or on a shared store the leader (`keyd/leader@NAME`, see `Keyd::system_actor`).
    pub actor: String,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            chunk: 256,
            halt_after_chunks: None,
            actor: "keyd".to_owned(),
        }
    }
}

/// The kind of KEK change asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Rotate,
    Migrate,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Rotate => "rotate",
            Kind::Migrate => "migrate",
        }
    }
}

/// Starts a rotation or migration to `target` (already connected) and returns at once; the
/// rewrap runs in the background. Refused while another one runs, while the active custodian
/// is unavailable, or if the target fails its round-trip check.
pub async fn start(
    store: Arc<dyn Store>,
    custody: Arc<Custody>,
    actor: &str,
    kind: Kind,
    target: Member,
    options: RunOptions,
) -> Result<MigrationStatus, RewrapError> {
    let guard = custody.migration_lock.try_lock().map_err(|_| {
        RewrapError::Busy("a KEK rotation or migration is being started; try again".into())
    })?;
    // Refuse to start on a custodian that cannot be used: its records could not be moved.
    if let Err(e) = custody.probe().await {
        return Err(RewrapError::Seal(e));
    }
    target
        .wrapper
        .check()
        .await
        .map_err(RewrapError::TargetCheck)?;
    let (doc, doc_bytes) = match read_doc(store.as_ref())? {
        Some(d) => d,
        None => {
            let active = custody.active().spec.ok_or_else(|| {
                RewrapError::Invalid("the active custodian has no spec to record".into())
            })?;
            let doc = initialise(&store, &active).await?;
            let bytes = to_bytes(&doc);
            (doc, bytes)
        }
    };
    if let Some(m) = doc.migration.as_ref().filter(|m| !m.completed) {
        return Err(RewrapError::Busy(format!(
            "KEK {} {} to {} is still running ({} of {} records rewrapped); wait for it to \
             complete (keyctl kek status)",
            m.kind, m.id, m.to, m.rewrapped, m.total
        )));
    }
    let target_spec = target
        .spec
        .clone()
        .ok_or_else(|| RewrapError::Invalid("the target custodian has no spec to record".into()))?;
    let records = store.scan(Table::Sealed)?;
    let mut from = BTreeSet::new();
    for (_, bytes) in &records {
        if let Ok(r) = SealedRecord::from_bytes(bytes)
            && !(target.wrapper.holds(&r.backend, &r.kek_id)
                && target.wrapper.is_current(&r.kek_id))
        {
            from.insert(format!("{} {}", r.backend, r.kek_id));
        }
    }
    let old_active = custody.active();
    let same_key = old_active
        .spec
        .as_ref()
        .is_some_and(|s| s.same_key(&target_spec));
    let mut retired = doc.retired.clone();
    if !same_key
        && let Some(old) = &old_active.spec
        && !retired.iter().any(|r| r.same_key(old))
    {
        retired.push(old.clone());
    }
    retired.retain(|r| !r.same_key(&target_spec));
    let id = doc.migration.as_ref().map_or(1, |m| m.id + 1);
    let migration = MigrationDoc {
        id,
        kind: kind.as_str().into(),
        from: from.iter().cloned().collect(),
        to: format!("{} {}", target.wrapper.backend(), target.wrapper.key_id()),
        started_at: Timestamp::now(),
        started_by: actor.to_owned(),
        finished_at: None,
        total: from_count(&records, &*target.wrapper),
        rewrapped: 0,
        failed: 0,
        failures: vec![],
        failed_ids: BTreeSet::new(),
        completed: false,
    };
    let new_doc = CustodyDoc {
        active: target_spec.clone(),
        retired,
        migration: Some(migration.clone()),
    };
    commit(
        &store,
        Txn::default()
            .guard(Table::Meta, CUSTODY_DOC, Some(doc_bytes))
            .put(Table::Meta, CUSTODY_DOC, to_bytes(&new_doc))
            .audit(AuditEvent::new(
                "kek.migration.started",
                actor,
                json!({ "id": id, "kind": kind.as_str(), "from": migration.from, "to": migration.to,
                        "target": target_spec.describe(), "records": migration.total }),
            )),
    )
    .await?;
    if !same_key {
        custody.activate(target);
    }
    let status = migration.status(None);
    custody.set_migration(Some(status.clone()));
    custody.metrics().set_progress(migration.total, 0, 0);
    tracing::info!(
        id,
        kind = kind.as_str(),
        to = migration.to,
        records = migration.total,
        "KEK migration started"
    );
    drop(guard);
    spawn(store, custody, options);
    Ok(status)
}

fn from_count(records: &[(String, Vec<u8>)], target: &dyn KeyWrapper) -> u64 {
    records
        .iter()
        .filter(|(_, b)| {
            SealedRecord::from_bytes(b).is_ok_and(|r| {
                !(target.holds(&r.backend, &r.kek_id) && target.is_current(&r.kek_id))
            })
        })
        .count() as u64
}

/// Resumes an unfinished migration found in the store at start-up.
pub async fn resume(
    store: Arc<dyn Store>,
    custody: Arc<Custody>,
    options: RunOptions,
) -> Result<bool, RewrapError> {
    let Some((doc, _)) = read_doc(store.as_ref())? else {
        return Ok(false);
    };
    match &doc.migration {
        Some(m) if !m.completed => {
            custody.set_migration(Some(m.status(None)));
            custody
                .metrics()
                .set_progress(m.total, m.rewrapped, m.failed);
            commit(
                &store,
                Txn::default().audit(AuditEvent::new(
                    "kek.migration.resumed",
                    &options.actor,
                    json!({ "id": m.id, "rewrapped": m.rewrapped, "total": m.total }),
                )),
            )
            .await?;
            tracing::info!(
                id = m.id,
                rewrapped = m.rewrapped,
                total = m.total,
                "resuming the KEK migration"
            );
            spawn(store, custody, options);
            Ok(true)
        }
        Some(m) => {
            custody.set_migration(Some(m.status(None)));
            Ok(false)
        }
        None => Ok(false),
    }
}

fn spawn(store: Arc<dyn Store>, custody: Arc<Custody>, options: RunOptions) {
    tokio::spawn(async move {
        custody.metrics().migration_running.set(1);
        if let Err(e) = run(&store, &custody, &options).await {
            tracing::error!(error = %e, "the KEK migration stopped; it resumes at the next start");
            let msg = e.to_string();
            custody.update_migration(|m| m.last_error = Some(msg));
        }
        custody.metrics().migration_running.set(0);
    });
}

/// What happened to one record.
enum Outcome {
    Rewrapped {
        id: String,
        old: Vec<u8>,
        new: Vec<u8>,
    },
    /// The record cannot be opened under its own KEK: left as it is, reported.
    Failed { id: String, reason: String },
    /// A custodian cannot be used now: retry later.
    Paused(SealError),
}

/// The rewrap loop: until no record is left under an old KEK (or a test halt).
async fn run(
    store: &Arc<dyn Store>,
    custody: &Arc<Custody>,
    options: &RunOptions,
) -> Result<(), RewrapError> {
    let started = Instant::now();
    let mut chunks_done = 0usize;
    let mut backoff = std::time::Duration::from_millis(500);
    loop {
        let (doc, _) = read_doc(store.as_ref())?.ok_or_else(|| StoreError::Corrupt {
            what: CUSTODY_DOC.into(),
            why: "missing during a migration".into(),
        })?;
        let Some(m) = doc.migration.clone().filter(|m| !m.completed) else {
            return Ok(());
        };
        let target = custody.active().wrapper;
        let pending: Vec<(String, Vec<u8>)> = store
            .scan(Table::Sealed)?
            .into_iter()
            .filter(|(id, bytes)| {
                !m.failed_ids.contains(id)
                    && SealedRecord::from_bytes(bytes).map_or(true, |r| {
                        !(target.holds(&r.backend, &r.kek_id) && target.is_current(&r.kek_id))
                    })
            })
            // A chunk is one transaction: a guard and a write per record, plus the custody doc's.
            .take(
                options
                    .chunk
                    .min(store.max_txn_ops().saturating_sub(1))
                    .max(1),
            )
            .collect();
        if pending.is_empty() {
            return complete(store, custody, m, started, &options.actor).await;
        }
        let limit = custody.settings().concurrency;
        let outcomes = bounded(pending, limit, {
            let custody = Arc::clone(custody);
            move |(id, bytes)| {
                let custody = Arc::clone(&custody);
                async move { rewrap_one(&custody, id, bytes).await }
            }
        })
        .await;
        let mut txn = Txn::default();
        let mut next = m.clone();
        let mut paused = None;
        for o in outcomes {
            match o {
                Outcome::Rewrapped { id, old, new } => {
                    txn =
                        txn.guard(Table::Sealed, id.clone(), Some(old))
                            .put(Table::Sealed, id, new);
                    next.rewrapped += 1;
                }
                Outcome::Failed { id, reason } => {
                    tracing::warn!(record = id, reason, "record left under its old KEK");
                    next.failed += 1;
                    if next.failures.len() < MAX_LISTED_FAILURES {
                        next.failures.push(format!("{id}: {reason}"));
                    }
                    next.failed_ids.insert(id);
                }
                Outcome::Paused(e) => paused = Some(e),
            }
        }
        if next != m {
            let (_, doc_bytes) = read_doc(store.as_ref())?.ok_or_else(|| StoreError::Corrupt {
                what: CUSTODY_DOC.into(),
                why: "missing during a migration".into(),
            })?;
            let new_doc = CustodyDoc {
                migration: Some(next.clone()),
                ..doc.clone()
            };
            txn = txn.guard(Table::Meta, CUSTODY_DOC, Some(doc_bytes)).put(
                Table::Meta,
                CUSTODY_DOC,
                to_bytes(&new_doc),
            );
            match commit(store, txn).await {
                Ok(()) => {
                    custody
                        .metrics()
                        .rewrapped_records
                        .inc_by(next.rewrapped - m.rewrapped);
                }
                // A record was deleted or changed meanwhile (an IPsec key retired): rescan.
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        custody.metrics().set_progress(
            next.total.max(next.rewrapped + next.failed),
            next.rewrapped,
            next.failed,
        );
        let paused_msg = paused.as_ref().map(ToString::to_string);
        custody.set_migration(Some(next.status(paused_msg.as_deref())));
        chunks_done += 1;
        if options.halt_after_chunks.is_some_and(|n| chunks_done >= n) {
            return Ok(());
        }
        if let Some(e) = paused {
            tracing::warn!(error = %e, retry_in = ?backoff, "KEK migration paused: a custodian cannot be used");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(std::time::Duration::from_secs(30));
        } else {
            backoff = std::time::Duration::from_millis(500);
        }
    }
}

async fn complete(
    store: &Arc<dyn Store>,
    custody: &Arc<Custody>,
    mut m: MigrationDoc,
    started: Instant,
    actor: &str,
) -> Result<(), RewrapError> {
    let (doc, doc_bytes) = read_doc(store.as_ref())?.ok_or_else(|| StoreError::Corrupt {
        what: CUSTODY_DOC.into(),
        why: "missing during a migration".into(),
    })?;
    // Keep only the retired custodians some record is still under (failed ones).
    let records: Vec<SealedRecord> = store
        .scan(Table::Sealed)?
        .iter()
        .filter_map(|(_, b)| SealedRecord::from_bytes(b).ok())
        .collect();
    let still_used = |w: &dyn KeyWrapper| records.iter().any(|r| w.holds(&r.backend, &r.kek_id));
    let others = custody.others();
    let retired: Vec<KekSpec> = doc
        .retired
        .iter()
        .filter(|spec| {
            others
                .iter()
                .filter(|o| o.spec.as_ref().is_some_and(|s| s.same_key(spec)))
                .any(|o| still_used(&*o.wrapper))
        })
        .cloned()
        .collect();
    m.completed = true;
    m.finished_at = Some(Timestamp::now());
    let new_doc = CustodyDoc {
        retired,
        migration: Some(m.clone()),
        ..doc
    };
    commit(
        store,
        Txn::default()
            .guard(Table::Meta, CUSTODY_DOC, Some(doc_bytes))
            .put(Table::Meta, CUSTODY_DOC, to_bytes(&new_doc))
            .audit(AuditEvent::new(
                "kek.migration.completed",
                actor,
                json!({ "id": m.id, "kind": m.kind, "to": m.to, "rewrapped": m.rewrapped,
                        "failed": m.failed, "failures": m.failures,
                        "seconds_this_run": started.elapsed().as_secs() }),
            )),
    )
    .await?;
    custody.mark_drained(|o| still_used(&*o.wrapper));
    custody.set_migration(Some(m.status(None)));
    custody
        .metrics()
        .set_progress(m.total.max(m.rewrapped + m.failed), m.rewrapped, m.failed);
    tracing::info!(
        id = m.id,
        rewrapped = m.rewrapped,
        failed = m.failed,
        "KEK migration completed"
    );
    Ok(())
}

/// Rewraps one record under the active custodian and verifies the result.
async fn rewrap_one(custody: &Custody, id: String, old: Vec<u8>) -> Outcome {
    let record = match SealedRecord::from_bytes(&old) {
        Ok(r) => r,
        Err(e) => {
            return Outcome::Failed {
                id,
                reason: e.to_string(),
            };
        }
    };
    let ctx = SealContext::of_record(&id, &record);
    match rewrap_record(custody, &record, &ctx).await {
        Ok(new) => Outcome::Rewrapped {
            id,
            old,
            new: new.to_bytes(),
        },
        Err(e) if is_pause(&e) => Outcome::Paused(e),
        Err(e) => Outcome::Failed {
            id,
            reason: e.to_string(),
        },
    }
}

/// Custodian-wide failures pause the migration; anything about the record fails the record.
fn is_pause(e: &SealError) -> bool {
    matches!(e, SealError::Custodian { kind, .. } if kind.is_custodian_down())
}

/// The record with its data key wrapped under the active custodian, verified.
pub async fn rewrap_record(
    custody: &Custody,
    record: &SealedRecord,
    ctx: &SealContext,
) -> Result<SealedRecord, SealError> {
    let target = custody.active().wrapper;
    let source = custody
        .holder(&record.backend, &record.kek_id)
        .ok_or_else(|| SealError::NoCustodian {
            backend: record.backend.clone(),
            kek_id: record.kek_id.clone(),
        })?
        .wrapper;
    let wrapped = match target.rewrap_from(&*source, record, ctx).await {
        Some(r) => r?,
        None => {
            let dek = source.unwrap_data_key(&record.wrapped_key, ctx).await?;
            target.wrap_data_key(&dek, ctx).await?
        }
    };
    // Verify before anything is written: the target unwraps what it wrapped, and that key opens
    // this record (AES-GCM fails on any other key).
    let dek = target.unwrap_data_key(&wrapped, ctx).await?;
    drop(seal::open_with(&dek, ctx, record)?);
    Ok(SealedRecord {
        backend: target.backend().to_owned(),
        kek_id: target.kek_id_of(&wrapped),
        wrapped_key: wrapped,
        ..record.clone()
    })
}

/// Opens every sealed record (start-up verification; the cold-start benchmark). Returns how
/// many opened, or the first record that did not and why.
pub async fn verify_all(
    store: &Arc<dyn Store>,
    custody: &Arc<Custody>,
) -> Result<usize, (String, SealError)> {
    let records = {
        let store = Arc::clone(store);
        tokio::task::spawn_blocking(move || store.scan(Table::Sealed))
            .await
            .map_err(|e| ("<scan>".to_owned(), SealError::Corrupt(e.to_string())))?
            .map_err(|e| ("<scan>".to_owned(), SealError::Corrupt(e.to_string())))?
    };
    let n = records.len();
    let results = bounded(records, custody.settings().concurrency, {
        let custody = Arc::clone(custody);
        move |(id, bytes)| {
            let custody = Arc::clone(&custody);
            async move {
                let record = SealedRecord::from_bytes(&bytes).map_err(|e| (id.clone(), e))?;
                let ctx = SealContext::of_record(&id, &record);
                seal::open(&*custody, &ctx, &record)
                    .await
                    .map(drop)
                    .map_err(|e| (id, e))
            }
        }
    })
    .await;
    if results.len() != n {
        return Err((
            "<verification>".into(),
            SealError::Corrupt("a verification task failed".into()),
        ));
    }
    for r in results {
        r?;
    }
    Ok(n)
}

/// Runs `f` over `items` with at most `limit` in flight.
async fn bounded<I, T, F, Fut>(items: Vec<I>, limit: usize, f: F) -> Vec<T>
where
    F: Fn(I) -> Fut,
    Fut: Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut set = tokio::task::JoinSet::new();
    let mut out = Vec::with_capacity(items.len());
    let mut rest = items.into_iter();
    for item in rest.by_ref().take(limit.max(1)) {
        set.spawn(f(item));
    }
    while let Some(done) = set.join_next().await {
        match done {
            Ok(v) => out.push(v),
            // A panicked task loses its item; the caller's next pass (a rescan) retries it.
            Err(e) => tracing::error!(error = %e, "a rewrap task failed"),
        }
        if let Some(item) = rest.next() {
            set.spawn(f(item));
        }
    }
    out
}
