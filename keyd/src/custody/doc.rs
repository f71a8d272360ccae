//! The custody document (`kek_custody` in the store's `Meta` table): which custodians the
//! store's records may be under, and the running or last KEK migration. keyd reads it at start
//! to build its keyring; [`crate::rewrap`] updates it as a migration moves records.

use std::collections::BTreeSet;
use std::sync::Arc;

use keyd_proto::Timestamp;
use keyd_proto::kek::{KekSpec, MigrationStatus};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::store::{AuditEvent, Store, StoreError, Table, Txn};

/// The `Meta` document holding custody state.
pub const CUSTODY_DOC: &str = "kek_custody";

/// Failures kept by name in the document (the count is always exact).
pub(crate) const MAX_LISTED_FAILURES: usize = 100;

/// Which custodians the store's records may be under, and the running or last migration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodyDoc {
    /// New records are sealed under this custodian.
    pub active: KekSpec,
    /// Custodians some records may still be under (until a migration moves them).
    #[serde(default)]
    pub retired: Vec<KekSpec>,
    #[serde(default)]
    pub migration: Option<MigrationDoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationDoc {
    pub id: u64,
    pub kind: String,
    pub from: Vec<String>,
    pub to: String,
    pub started_at: Timestamp,
    pub started_by: String,
    #[serde(default)]
    pub finished_at: Option<Timestamp>,
    pub total: u64,
    pub rewrapped: u64,
    #[serde(default)]
    pub failed: u64,
    /// `record id: reason`, at most [`MAX_LISTED_FAILURES`].
    #[serde(default)]
    pub failures: Vec<String>,
    #[serde(default)]
    pub failed_ids: BTreeSet<String>,
    pub completed: bool,
}

impl MigrationDoc {
    pub(crate) fn status(&self, paused: Option<&str>) -> MigrationStatus {
        MigrationStatus {
            id: self.id,
            kind: self.kind.clone(),
            from: self.from.clone(),
            to: self.to.clone(),
            state: if self.completed {
                "completed".into()
            } else if paused.is_some() {
                "paused".into()
            } else {
                "running".into()
            },
            started_at: self.started_at,
            started_by: self.started_by.clone(),
            finished_at: self.finished_at,
            total: self.total,
            rewrapped: self.rewrapped,
            failed: self.failed,
            failures: self.failures.clone(),
            last_error: paused.map(str::to_owned),
        }
    }
}

pub fn read_doc(store: &dyn Store) -> Result<Option<(CustodyDoc, Vec<u8>)>, StoreError> {
    match store.get(Table::Meta, CUSTODY_DOC)? {
        None => Ok(None),
        Some(bytes) => {
            let doc = serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
                what: CUSTODY_DOC.into(),
                why: e.to_string(),
            })?;
            Ok(Some((doc, bytes)))
        }
    }
}

pub(crate) fn to_bytes(doc: &CustodyDoc) -> Vec<u8> {
    // Plain data (strings, numbers, paths as strings) always serializes.
    serde_json::to_vec(doc).unwrap_or_default()
}

pub(crate) async fn commit(store: &Arc<dyn Store>, txn: Txn) -> Result<(), StoreError> {
    let store = Arc::clone(store);
    tokio::task::spawn_blocking(move || store.commit(txn))
        .await
        .map_err(|e| StoreError::Backend {
            op: "commit task",
            source: Box::new(e),
        })?
}

/// Writes the first custody document (a new store, or one from before custody was tracked).
pub async fn initialise(
    store: &Arc<dyn Store>,
    active: &KekSpec,
) -> Result<CustodyDoc, StoreError> {
    let doc = CustodyDoc {
        active: active.clone(),
        retired: vec![],
        migration: None,
    };
    let txn = Txn::default()
        .guard(Table::Meta, CUSTODY_DOC, None)
        .put(Table::Meta, CUSTODY_DOC, to_bytes(&doc))
        .audit(AuditEvent::new(
            "kek.custodian.initialised",
            "keyd",
            json!({ "custodian": active.describe(), "backend": active.backend() }),
        ));
    match commit(store, txn).await {
        Ok(()) => Ok(doc),
        // Another replica wrote it first: use theirs.
        Err(StoreError::Conflict { .. }) => {
            read_doc(store.as_ref())?
                .map(|(d, _)| d)
                .ok_or_else(|| StoreError::Corrupt {
                    what: CUSTODY_DOC.into(),
                    why: "vanished after a conflicting write".into(),
                })
        }
        Err(e) => Err(e),
    }
}
