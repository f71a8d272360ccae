//! keyd's persistent state behind a small transactional key-value trait.
//!
//! The trait is deliberately narrow, so that a replicated backend on an existing distributed
//! engine (etcd, TiKV, FoundationDB all offer this shape) can replace the embedded default:
//! point reads, table scans, and an all-or-nothing [`Txn`] with compare-and-swap guards, which
//! also appends audit records to a hash-chained log in the same commit. Nothing is acknowledged
//! before it is durable: the redb backend commits with `Durability::Immediate` (fsync).

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use keyd_proto::Timestamp;
use redb::{ReadableDatabase as _, ReadableTable as _, TableDefinition};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

#[cfg(feature = "etcd")]
pub mod etcd;

/// The tables keyd keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Table {
    /// Sealed key records, by record id. Values are [`crate::seal::SealedRecord`]s.
    Sealed,
    /// Non-secret state documents (the IPsec key set, the WireGuard epoch).
    Meta,
    /// Registered nodes, by node name.
    Nodes,
    /// Signed audit checkpoints, keyed by the zero-padded sequence number they cover.
    Checkpoints,
    /// Each node's latest data-plane report, by node name.
    Dataplane,
}

impl Table {
    pub const ALL: [Table; 5] = [
        Table::Sealed,
        Table::Meta,
        Table::Nodes,
        Table::Checkpoints,
        Table::Dataplane,
    ];

    /// The table's name in every backend (a redb table, an etcd key range).
    pub fn name(self) -> &'static str {
        match self {
            Table::Sealed => "sealed",
            Table::Meta => "meta",
            Table::Nodes => "nodes",
            Table::Checkpoints => "checkpoints",
            Table::Dataplane => "dataplane",
        }
    }

    /// The table named `name` (see [`Table::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    fn def(self) -> TableDefinition<'static, &'static str, &'static [u8]> {
        TableDefinition::new(self.name())
    }
}

const AUDIT: TableDefinition<'static, u64, &'static [u8]> = TableDefinition::new("audit");

/// One write to apply atomically.
#[derive(Default)]
pub struct Txn {
    /// Each guard must hold (the current value equals the given bytes, `None` = absent) or the
    /// whole transaction fails with [`StoreError::Conflict`] and nothing is written.
    pub guards: Vec<(Table, String, Option<Vec<u8>>)>,
    /// Each range named (the entries of a table whose keys start with a prefix) must have no
    /// entry written after the store revision given (else [`StoreError::Conflict`] with key
    /// `PREFIX*`): a decision read from many entries, such as "no other node claims this
    /// address", still holds when it is written. Shared stores only (see [`Store::shared`]); a
    /// store with one writer ignores it, its callers deciding and writing under one lock.
    pub unchanged_since: Vec<(Table, String, u64)>,
    pub puts: Vec<(Table, String, Vec<u8>)>,
    pub deletes: Vec<(Table, String)>,
    pub audit: Vec<AuditEvent>,
    /// The time stamped on the audit records; the system clock when absent.
    pub at: Option<Timestamp>,
}

// Values may be sealed records; list only what is touched.
impl fmt::Debug for Txn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = |v: &mut dyn Iterator<Item = (&Table, &String)>| -> Vec<String> {
            v.map(|(t, k)| format!("{t:?}/{k}")).collect()
        };
        f.debug_struct("Txn")
            .field(
                "guards",
                &keys(&mut self.guards.iter().map(|(t, k, _)| (t, k))),
            )
            .field("puts", &keys(&mut self.puts.iter().map(|(t, k, _)| (t, k))))
            .field(
                "deletes",
                &keys(&mut self.deletes.iter().map(|(t, k)| (t, k))),
            )
            .field("audit", &self.audit)
            .finish()
    }
}

impl Txn {
    pub fn guard(mut self, table: Table, key: impl Into<String>, current: Option<Vec<u8>>) -> Self {
        self.guards.push((table, key.into(), current));
        self
    }

    /// Requires that no entry of `table` whose key starts with `prefix` was written after store
    /// revision `revision` (a shared store's; `None`, a store with one writer, adds nothing).
    pub fn unchanged_since(
        mut self,
        table: Table,
        prefix: impl Into<String>,
        revision: Option<u64>,
    ) -> Self {
        if let Some(r) = revision {
            self.unchanged_since.push((table, prefix.into(), r));
        }
        self
    }

    pub fn put(mut self, table: Table, key: impl Into<String>, value: Vec<u8>) -> Self {
        self.puts.push((table, key.into(), value));
        self
    }

    pub fn delete(mut self, table: Table, key: impl Into<String>) -> Self {
        self.deletes.push((table, key.into()));
        self
    }

    pub fn audit(mut self, event: AuditEvent) -> Self {
        self.audit.push(event);
        self
    }
}

/// What happened, by whom; never key bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// e.g. `ipsec.key.generated`, `node.registered`.
    pub action: String,
    /// The identity that caused it (`admin/alice`, `node/worker-1`, `keyd`).
    pub actor: String,
    /// Structured, non-secret details (key IDs, node names, reasons).
    pub details: serde_json::Value,
}

impl AuditEvent {
    pub fn new(action: &str, actor: impl fmt::Display, details: serde_json::Value) -> Self {
        Self {
            action: action.to_owned(),
            actor: actor.to_string(),
            details,
        }
    }
}

/// An audit event as stored: numbered and chained to its predecessor by hash.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: Timestamp,
    #[serde(flatten)]
    pub event: AuditEvent,
    /// Hex SHA-256 of the previous record (`seq - 1`); all zeros for the first.
    pub prev_hash: String,
    /// Hex SHA-256 over `prev_hash` and this record's other fields.
    pub hash: String,
}

impl AuditRecord {
    pub(crate) fn chain(seq: u64, at: Timestamp, event: AuditEvent, prev_hash: String) -> Self {
        let mut r = Self {
            seq,
            at,
            event,
            prev_hash,
            hash: String::new(),
        };
        r.hash = r.compute_hash();
        r
    }

    /// Recomputes the hash from the record's fields; a verifier compares it with `hash`.
    pub fn compute_hash(&self) -> String {
        // The bytes are those of a JSON object with these keys in sorted order, written
        // compactly (as `serde_json::json!(..).to_string()` writes them): streamed into the
        // digest without building the object, which a pass over a million records feels.
        #[derive(Serialize)]
        struct Body<'a> {
            action: &'a str,
            actor: &'a str,
            at: Timestamp,
            details: &'a serde_json::Value,
            prev_hash: &'a str,
            seq: u64,
        }
        struct Digesting(Sha256);
        impl std::io::Write for Digesting {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.update(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut out = Digesting(Sha256::new_with_prefix(b"keyd audit v1\0"));
        let body = Body {
            action: &self.event.action,
            actor: &self.event.actor,
            at: self.at,
            details: &self.event.details,
            prev_hash: &self.prev_hash,
            seq: self.seq,
        };
        // Writing a Value into memory cannot fail.
        let _ = serde_json::to_writer(&mut out, &body);
        hex::encode(out.0.finalize())
    }
}

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// A validated `[store.etcd]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// `https://host:port` (or `http://` to a loopback address), one per member.
    pub endpoints: Vec<String>,
    /// Every key keyd writes starts with it; it ends with `/`.
    pub prefix: String,
    pub tls: Option<EtcdTls>,
    /// Bound on each request, and on connecting.
    pub timeout: Duration,
    /// etcd's `--max-txn-ops` (128 unless the cluster raised it).
    pub max_txn_ops: usize,
    /// The leader's lease: a standby takes over at most this long after the leader died.
    pub lease_ttl: Duration,
    /// How long a replica cut off from etcd keeps handing out the bundles it holds.
    pub max_unavailable: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdTls {
    /// The CA that signed the members' serving certificates.
    pub ca: PathBuf,
    /// keyd's client certificate and key, when etcd requires client certificates.
    pub client: Option<(PathBuf, PathBuf)>,
}

/// keyd's storage backend.
pub trait Store: Send + Sync + fmt::Debug + 'static {
    /// For status output, e.g. `redb:/var/lib/keyd/keyd.redb`.
    fn describe(&self) -> String;
    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every entry of a table, in key order.
    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// Applies `txn` atomically and durably, or not at all.
    fn commit(&self, txn: Txn) -> Result<(), StoreError>;
    /// Audit records with `seq >= from`, at most `limit`.
    fn audit_range(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError>;
    /// Entries of a table with keys `>= from`, in key order, at most `limit`.
    fn scan_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError>;
    /// The entry with the greatest key.
    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StoreError>;
    /// The newest audit record.
    fn audit_last(&self) -> Result<Option<AuditRecord>, StoreError>;
    /// Deletes audit records with `seq <= through`, at most `limit` of them (oldest first), in one
    /// transaction; returns how many were deleted. Called repeatedly to prune in small steps.
    fn audit_delete_through(&self, through: u64, limit: usize) -> Result<usize, StoreError>;
    /// The most guards, or the most writes (puts, deletes and audit records, plus one), that one
    /// [`Txn`] may carry; a larger one is refused whole. Writers of many independent entries
    /// (the audit group commit, the liveness flush, a rewrap chunk) split their work to fit.
    fn max_txn_ops(&self) -> usize {
        usize::MAX
    }
    /// The changes written to the tables from now on, by this process and every other, for a
    /// cache that several processes share the store behind. `None` for a store that only this
    /// process writes (redb: its own commits are all there is to follow).
    fn follow(&self) -> Option<tokio::sync::mpsc::UnboundedReceiver<Change>> {
        None
    }
    /// Whether other processes may write this store too (etcd): then one of them leads.
    fn shared(&self) -> bool {
        false
    }
    /// [`Store::get`] as of store revision `at` (a store without revisions reads the newest).
    fn get_at(
        &self,
        table: Table,
        key: &str,
        at: Option<u64>,
    ) -> Result<Option<Vec<u8>>, StoreError> {
        let _ = at;
        self.get(table, key)
    }
    /// [`Store::scan_from`] as of store revision `at`.
    fn scan_from_at(
        &self,
        table: Table,
        from: &str,
        limit: usize,
        at: Option<u64>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let _ = at;
        self.scan_from(table, from, limit)
    }
    /// [`Store::commit`], returning the store revision the write became (`None` for a store
    /// without revisions, or a transaction that wrote nothing).
    fn commit_at(&self, txn: Txn) -> Result<Option<u64>, StoreError> {
        self.commit(txn).map(|()| None)
    }
    /// The store's newest revision (`None` for a store without revisions).
    fn current_revision(&self) -> Result<Option<u64>, StoreError> {
        Ok(None)
    }
    /// How long a process cut off from a shared store keeps handing out what it holds
    /// (`store.etcd.max_unavailable`); `None` for a store only this process uses.
    fn max_unavailable(&self) -> Option<std::time::Duration> {
        None
    }
    /// Asks the change feed of [`Store::follow`] for a [`Change::Progress`] report (needed only
    /// when revisions move without a change the feed reports: another user of the same etcd).
    fn request_progress(&self) {}
    /// The keyd processes that announce themselves on a shared store, the leader marked;
    /// `None` on a store only this process uses.
    fn replicas(&self) -> Result<Option<Vec<keyd_proto::Replica>>, StoreError> {
        Ok(None)
    }
}

/// What [`Store::follow`] reports. Revisions are the store's (etcd's) and only grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// These entries were written or deleted, the last of them at `revision`: read them again
    /// as of `revision`.
    Keys {
        keys: Vec<(Table, String)>,
        revision: u64,
    },
    /// Changes may have been missed (the feed reconnected after an outage, or its history was
    /// compacted): everything cached must be read again, as of `revision`.
    Resync { revision: u64 },
    /// Every change up to `revision` has been reported (an answer to
    /// [`Store::request_progress`]).
    Progress { revision: u64 },
    /// The feed broke (`why`): nothing more is reported until the next [`Change::Resync`].
    Lost { why: String },
}

impl Txn {
    /// The entries this transaction writes or deletes.
    pub fn touched(&self) -> Vec<(Table, String)> {
        self.puts
            .iter()
            .map(|(t, k, _)| (*t, k.clone()))
            .chain(self.deletes.iter().cloned())
            .collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot open the store at {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: Box<redb::DatabaseError>,
    },
    #[error("store {op} failed")]
    Backend {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The filesystem holding the store has no space left (ENOSPC or a quota). keyd reopens
    /// the store on the next operation; writes succeed again once space is freed.
    #[error("store {op} failed: no space left on the filesystem holding the store")]
    Full {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// Any other I/O error from the store's file; keyd reopens the store on the next operation.
    #[error("store {op} failed with an I/O error; the store is reopened on the next request")]
    Io {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A replicated store's engine cannot be reached or has no quorum; nothing was written, and
    /// the same request may succeed later, unchanged.
    #[error("store {op} failed: the store cannot be reached")]
    Unavailable {
        op: &'static str,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// This keyd no longer leads the replicated store (its lease expired or another process
    /// took over): nothing was written, and this process stops acting as the leader.
    #[error("store {op} refused: this keyd is no longer the store's leader")]
    Deposed { op: &'static str },
    #[error("{table:?}/{key} changed concurrently; retry")]
    Conflict { table: Table, key: String },
    #[error("stored {what} is corrupt: {why}")]
    Corrupt { what: String, why: String },
}

impl StoreError {
    /// The store could not be written for lack of space (a 507 to API clients).
    pub fn is_full(&self) -> bool {
        matches!(self, StoreError::Full { .. })
    }

    /// The store's file failed or its engine cannot be reached (a 503: the request may succeed
    /// later, unchanged).
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            StoreError::Full { .. }
                | StoreError::Io { .. }
                | StoreError::Unavailable { .. }
                | StoreError::Deposed { .. }
        )
    }

    /// The store's engine cannot be reached (as opposed to its local file failing).
    pub fn is_unreachable(&self) -> bool {
        matches!(self, StoreError::Unavailable { .. })
    }
}

/// Whether an I/O error means "no space": ENOSPC or EDQUOT.
fn io_is_full(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
    )
}

/// What a redb error says about the file: `Some(full)` when it is an I/O failure, after which
/// redb refuses every operation of that `Database` (`PreviousIo`) until it is reopened.
fn io_failure(e: &redb::Error) -> Option<bool> {
    match e {
        redb::Error::Io(io) => Some(io_is_full(io)),
        redb::Error::PreviousIo => Some(false),
        _ => None,
    }
}

fn backend(op: &'static str) -> impl FnOnce(redb::Error) -> StoreError {
    move |e| match io_failure(&e) {
        Some(true) => StoreError::Full {
            op,
            source: Box::new(e),
        },
        Some(false) => StoreError::Io {
            op,
            source: Box::new(e),
        },
        None => StoreError::Backend {
            op,
            source: Box::new(e),
        },
    }
}

/// The embedded default: one redb file in the data directory.
///
/// After an I/O error (a full disk, typically) redb poisons its `Database`: every later read or
/// write fails with `PreviousIo`. The store then drops it and opens the file again, which runs
/// redb's recovery back to the last committed transaction; nothing committed is lost and the
/// failed transaction was never acknowledged. If reopening fails too (recovery needs to write,
/// and the disk may still be full), every operation tries again until it succeeds.
pub struct RedbStore {
    /// `None` while the file could not be reopened. Operations hold the read lock for their
    /// whole duration, so a reopen (write lock) waits until no transaction of the old `Database`
    /// is alive and redb has released the file.
    db: RwLock<Option<redb::Database>>,
    /// Bumped by every reopen, so that several operations failing together reopen once.
    generation: AtomicU64,
    /// The last I/O failure was "no space": a later `PreviousIo` is reported as that.
    full: AtomicBool,
    path: PathBuf,
}

impl fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl RedbStore {
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let db = Self::open_db(path)?;
        Ok(Self {
            db: RwLock::new(Some(db)),
            generation: AtomicU64::new(0),
            full: AtomicBool::new(false),
            path: path.to_owned(),
        })
    }

    fn open_db(path: &Path) -> Result<redb::Database, StoreError> {
        let db = redb::Database::create(path).map_err(|e| {
            let io = match &e {
                redb::DatabaseError::Storage(redb::StorageError::Io(io)) => Some(io_is_full(io)),
                _ => None,
            };
            match io {
                Some(true) => StoreError::Full {
                    op: "open",
                    source: Box::new(e),
                },
                _ => StoreError::Open {
                    path: path.to_owned(),
                    source: Box::new(e),
                },
            }
        })?;
        // Create every table once so that reads never meet a missing table.
        let w = db.begin_write().map_err(|e| backend("begin")(e.into()))?;
        for t in Table::ALL {
            w.open_table(t.def())
                .map_err(|e| backend("open table")(e.into()))?;
        }
        w.open_table(AUDIT)
            .map_err(|e| backend("open table")(e.into()))?;
        w.commit().map_err(|e| backend("commit")(e.into()))?;
        Ok(db)
    }

    /// Runs `f` on the database, reopening it first if an earlier I/O error poisoned it, and
    /// after `f` if `f` met one.
    fn with_db<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let Some(db) = guard.as_ref() else {
            drop(guard);
            self.reopen(generation)?;
            return self.with_db_open(f);
        };
        let result = f(db);
        drop(guard);
        self.after(result, generation)
    }

    /// [`Self::with_db`] once a reopen has succeeded: no second reopen before `f`.
    fn with_db_open<T>(
        &self,
        f: impl FnOnce(&redb::Database) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let generation = self.generation.load(Ordering::Acquire);
        let guard = self.db.read().unwrap_or_else(|p| p.into_inner());
        let result = match guard.as_ref() {
            Some(db) => f(db),
            None => Err(self.unavailable()),
        };
        drop(guard);
        self.after(result, generation)
    }

    fn after<T>(&self, result: Result<T, StoreError>, generation: u64) -> Result<T, StoreError> {
        match result {
            Err(e @ (StoreError::Full { .. } | StoreError::Io { .. })) => {
                let previous = e
                    .source_redb()
                    .is_some_and(|r| matches!(r, redb::Error::PreviousIo));
                let e = if previous && self.full.load(Ordering::Acquire) {
                    e.into_full()
                } else {
                    if !previous {
                        self.full.store(e.is_full(), Ordering::Release);
                    }
                    e
                };
                let store = self.path.display();
                tracing::warn!(%store, error = %keyd_mtls::error_chain(&e),
                    "store I/O failure; reopening the store");
                if let Err(again) = self.reopen(generation) {
                    tracing::warn!(%store, error = %keyd_mtls::error_chain(&again),
                        "the store cannot be reopened yet; retrying on the next operation");
                }
                Err(e)
            }
            other => other,
        }
    }

    /// Drops the (poisoned) database and opens the file again, unless another operation
    /// already did since `seen`. On failure the store stays closed until the next attempt.
    fn reopen(&self, seen: u64) -> Result<(), StoreError> {
        let mut guard = self.db.write().unwrap_or_else(|p| p.into_inner());
        if self.generation.load(Ordering::Acquire) != seen && guard.is_some() {
            return Ok(());
        }
        // redb releases the file (and its lock) only when the old `Database` is dropped.
        drop(guard.take());
        // Still failing is an I/O condition to retry (503 or 507), not a broken configuration.
        let db = Self::open_db(&self.path).map_err(|e| match e {
            StoreError::Open { source, .. } => StoreError::Io {
                op: "reopen",
                source,
            },
            other => other,
        })?;
        *guard = Some(db);
        self.generation.fetch_add(1, Ordering::AcqRel);
        tracing::info!(store = %self.path.display(), "store reopened");
        Ok(())
    }

    fn unavailable(&self) -> StoreError {
        let why = "the store is closed after an I/O error and could not be reopened yet";
        if self.full.load(Ordering::Acquire) {
            StoreError::Full {
                op: "reopen",
                source: why.into(),
            }
        } else {
            StoreError::Io {
                op: "reopen",
                source: why.into(),
            }
        }
    }
}

impl StoreError {
    fn source_redb(&self) -> Option<&redb::Error> {
        match self {
            StoreError::Full { source, .. } | StoreError::Io { source, .. } => {
                source.downcast_ref::<redb::Error>()
            }
            _ => None,
        }
    }

    fn into_full(self) -> StoreError {
        match self {
            StoreError::Io { op, source } => StoreError::Full { op, source },
            other => other,
        }
    }
}

/// A table as of now. redb's read-only tables keep their own snapshot alive, so the
/// transaction need not outlive this call.
fn read(
    db: &redb::Database,
    table: Table,
) -> Result<redb::ReadOnlyTable<&'static str, &'static [u8]>, StoreError> {
    let r = db
        .begin_read()
        .map_err(|e| backend("begin read")(e.into()))?;
    r.open_table(table.def())
        .map_err(|e| backend("open table")(e.into()))
}

fn read_audit(db: &redb::Database) -> Result<redb::ReadOnlyTable<u64, &'static [u8]>, StoreError> {
    let r = db
        .begin_read()
        .map_err(|e| backend("begin read")(e.into()))?;
    r.open_table(AUDIT)
        .map_err(|e| backend("open table")(e.into()))
}

/// What a commit point calls this transaction (see [`crate::faults`]).
#[cfg(feature = "fault-injection")]
fn point_label(txn: &Txn) -> String {
    if let Some(a) = txn.audit.first() {
        a.action.clone()
    } else if let Some((t, _, _)) = txn.puts.first() {
        format!("put:{t:?}")
    } else if let Some((t, _)) = txn.deletes.first() {
        format!("delete:{t:?}")
    } else {
        "empty".to_owned()
    }
}

/// Commits `w`, passing the transaction's two crash points when fault injection is built in.
fn commit_write(w: redb::WriteTransaction, label: &dyn Fn() -> String) -> Result<(), StoreError> {
    #[cfg(feature = "fault-injection")]
    let (label, n) = {
        let label = label();
        let n = crate::faults::begin(&label);
        crate::faults::reached(&label, n, crate::faults::Stage::Before);
        (label, n)
    };
    #[cfg(not(feature = "fault-injection"))]
    let _ = label;
    w.commit().map_err(|e| backend("commit")(e.into()))?;
    #[cfg(feature = "fault-injection")]
    crate::faults::reached(&label, n, crate::faults::Stage::After);
    Ok(())
}

fn commit_txn(db: &redb::Database, txn: Txn) -> Result<(), StoreError> {
    #[cfg(feature = "fault-injection")]
    let label = point_label(&txn);
    #[cfg(not(feature = "fault-injection"))]
    let label = String::new();
    let w = db
        .begin_write()
        .map_err(|e| backend("begin write")(e.into()))?;
    {
        for (table, key, expected) in &txn.guards {
            let t = w
                .open_table(table.def())
                .map_err(|e| backend("open table")(e.into()))?;
            let current = t.get(key.as_str()).map_err(|e| backend("get")(e.into()))?;
            if current.as_ref().map(|v| v.value()) != expected.as_deref() {
                // Dropping `w` without commit aborts the transaction.
                return Err(StoreError::Conflict {
                    table: *table,
                    key: key.clone(),
                });
            }
        }
        for (table, key, value) in &txn.puts {
            let mut t = w
                .open_table(table.def())
                .map_err(|e| backend("open table")(e.into()))?;
            t.insert(key.as_str(), value.as_slice())
                .map_err(|e| backend("insert")(e.into()))?;
        }
        for (table, key) in &txn.deletes {
            let mut t = w
                .open_table(table.def())
                .map_err(|e| backend("open table")(e.into()))?;
            t.remove(key.as_str())
                .map_err(|e| backend("remove")(e.into()))?;
        }
        if !txn.audit.is_empty() {
            let mut t = w
                .open_table(AUDIT)
                .map_err(|e| backend("open table")(e.into()))?;
            let (mut seq, mut prev) = match t.last().map_err(|e| backend("audit tail")(e.into()))? {
                Some((k, v)) => {
                    let rec: AuditRecord =
                        serde_json::from_slice(v.value()).map_err(|e| StoreError::Corrupt {
                            what: format!("audit record {}", k.value()),
                            why: e.to_string(),
                        })?;
                    (rec.seq + 1, rec.hash)
                }
                None => (1, GENESIS_HASH.to_owned()),
            };
            let at = txn.at.unwrap_or_else(Timestamp::now);
            for event in txn.audit {
                let rec = AuditRecord::chain(seq, at, event, prev);
                let bytes = serde_json::to_vec(&rec).map_err(|e| StoreError::Backend {
                    op: "encode audit record",
                    source: Box::new(e),
                })?;
                t.insert(seq, bytes.as_slice())
                    .map_err(|e| backend("audit append")(e.into()))?;
                prev = rec.hash;
                seq += 1;
            }
        }
    }
    commit_write(w, &|| label.clone())
}

impl Store for RedbStore {
    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }

    fn get(&self, table: Table, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with_db(|db| {
            let t = read(db, table)?;
            let v = t.get(key).map_err(|e| backend("get")(e.into()))?;
            Ok(v.map(|v| v.value().to_vec()))
        })
    }

    fn scan(&self, table: Table) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_db(|db| {
            let t = read(db, table)?;
            let mut out = Vec::new();
            for entry in t.iter().map_err(|e| backend("scan")(e.into()))? {
                let (k, v) = entry.map_err(|e| backend("scan")(e.into()))?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn commit(&self, txn: Txn) -> Result<(), StoreError> {
        let result = self.with_db(|db| commit_txn(db, txn));
        if result.is_ok() {
            self.full.store(false, Ordering::Release);
        }
        result
    }

    fn scan_from(
        &self,
        table: Table,
        from: &str,
        limit: usize,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with_db(|db| {
            let t = read(db, table)?;
            let mut out = Vec::new();
            for entry in t
                .range(from..)
                .map_err(|e| backend("scan")(e.into()))?
                .take(limit)
            {
                let (k, v) = entry.map_err(|e| backend("scan")(e.into()))?;
                out.push((k.value().to_owned(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn last(&self, table: Table) -> Result<Option<(String, Vec<u8>)>, StoreError> {
        self.with_db(|db| {
            let t = read(db, table)?;
            let last = t.last().map_err(|e| backend("last")(e.into()))?;
            Ok(last.map(|(k, v)| (k.value().to_owned(), v.value().to_vec())))
        })
    }

    fn audit_last(&self) -> Result<Option<AuditRecord>, StoreError> {
        self.with_db(|db| {
            let t = read_audit(db)?;
            match t.last().map_err(|e| backend("audit tail")(e.into()))? {
                Some((k, v)) => Ok(Some(decode_audit(k.value(), v.value())?)),
                None => Ok(None),
            }
        })
    }

    fn audit_delete_through(&self, through: u64, limit: usize) -> Result<usize, StoreError> {
        self.with_db(|db| {
            let w = db
                .begin_write()
                .map_err(|e| backend("begin write")(e.into()))?;
            let n = {
                let mut t = w
                    .open_table(AUDIT)
                    .map_err(|e| backend("open table")(e.into()))?;
                let keys: Vec<u64> = t
                    .range(..=through)
                    .map_err(|e| backend("audit range")(e.into()))?
                    .take(limit)
                    .map(|e| e.map(|(k, _)| k.value()))
                    .collect::<Result<_, _>>()
                    .map_err(|e| backend("audit range")(e.into()))?;
                for k in &keys {
                    t.remove(k).map_err(|e| backend("audit delete")(e.into()))?;
                }
                keys.len()
            };
            commit_write(w, &|| "audit.prune".to_owned())?;
            Ok(n)
        })
    }

    fn audit_range(&self, from: u64, limit: usize) -> Result<Vec<AuditRecord>, StoreError> {
        self.with_db(|db| {
            let t = read_audit(db)?;
            let mut out = Vec::new();
            for entry in t
                .range(from..)
                .map_err(|e| backend("audit range")(e.into()))?
                .take(limit)
            {
                let (k, v) = entry.map_err(|e| backend("audit range")(e.into()))?;
                out.push(decode_audit(k.value(), v.value())?);
            }
            Ok(out)
        })
    }
}

/// An audit record as stored under key `k` (its sequence number, or the backend's key for it).
fn decode_audit(k: impl fmt::Display, v: &[u8]) -> Result<AuditRecord, StoreError> {
    serde_json::from_slice(v).map_err(|e| StoreError::Corrupt {
        what: format!("audit record {k}"),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The hash as first defined: a `json!` object's compact text. Every stored chain was
    /// hashed this way, so the streamed form must give the same bytes.
    fn hash_as_defined(r: &AuditRecord) -> String {
        let body = serde_json::json!({
            "seq": r.seq, "at": r.at, "action": r.event.action, "actor": r.event.actor,
            "details": r.event.details, "prev_hash": r.prev_hash,
        });
        hex::encode(
            Sha256::new_with_prefix(b"keyd audit v1\0")
                .chain_update(body.to_string())
                .finalize(),
        )
    }

    #[test]
    fn the_streamed_hash_is_the_hash_as_defined() {
        let details = [
            serde_json::json!({}),
            serde_json::json!({ "z": 1, "a": [1, 2.5, -3e40, null, true], "m": { "y": "é\"\\\n\u{1}", "b": {} } }),
            serde_json::json!("a string"),
            serde_json::json!([{ "k": "v" }, 18446744073709551615u64, -9223372036854775808i64]),
            serde_json::Value::Null,
        ];
        for (i, d) in details.into_iter().enumerate() {
            let r = AuditRecord {
                seq: i as u64 * 1_000_003,
                at: Timestamp(1_780_000_000 + i as u64),
                event: AuditEvent::new("admission.break_glass", "webhook/w <x>", d),
                prev_hash: GENESIS_HASH.into(),
                hash: String::new(),
            };
            assert_eq!(r.compute_hash(), hash_as_defined(&r), "{r:?}");
        }
    }

    fn open() -> (tempfile::TempDir, RedbStore) {
        let dir = tempfile::tempdir().unwrap();
        let s = RedbStore::open(&dir.path().join("keyd.redb")).unwrap();
        (dir, s)
    }

    #[test]
    fn commit_is_all_or_nothing() {
        let (_d, s) = open();
        s.commit(Txn::default().put(Table::Meta, "a", b"1".to_vec()))
            .unwrap();
        let bad = Txn::default()
            .put(Table::Meta, "b", b"2".to_vec())
            .guard(Table::Meta, "a", Some(b"stale".to_vec()))
            .audit(AuditEvent::new("x", "t", serde_json::json!({})));
        assert!(matches!(s.commit(bad), Err(StoreError::Conflict { .. })));
        assert_eq!(s.get(Table::Meta, "b").unwrap(), None);
        assert!(s.audit_range(0, 10).unwrap().is_empty());
        let good = Txn::default()
            .guard(Table::Meta, "a", Some(b"1".to_vec()))
            .guard(Table::Meta, "b", None)
            .put(Table::Meta, "b", b"2".to_vec())
            .delete(Table::Meta, "a");
        s.commit(good).unwrap();
        assert_eq!(
            s.scan(Table::Meta).unwrap(),
            vec![("b".to_owned(), b"2".to_vec())]
        );
    }

    #[test]
    fn io_failures_are_told_apart_from_a_full_disk() {
        let full = backend("commit")(redb::Error::Io(std::io::Error::from_raw_os_error(28)));
        assert!(full.is_full() && full.is_unavailable(), "{full:?}");
        assert!(full.to_string().contains("no space left"), "{full}");
        let quota = backend("commit")(redb::Error::Io(std::io::Error::from(
            std::io::ErrorKind::QuotaExceeded,
        )));
        assert!(quota.is_full());
        let eio = backend("commit")(redb::Error::Io(std::io::Error::from_raw_os_error(5)));
        assert!(!eio.is_full() && eio.is_unavailable(), "{eio:?}");
        // After an I/O error redb answers PreviousIo to everything until reopened.
        let previous = backend("get")(redb::Error::PreviousIo);
        assert!(previous.is_unavailable() && !previous.is_full());
        assert!(previous.source_redb().is_some());
        let other = backend("get")(redb::Error::TableDoesNotExist("x".into()));
        assert!(!other.is_unavailable());
    }

    #[test]
    fn a_closed_store_reopens_on_the_next_operation() {
        let (_d, s) = open();
        s.commit(Txn::default().put(Table::Meta, "a", b"1".to_vec()))
            .unwrap();
        // What a failed reopen leaves: no database. The next operation opens the file again.
        drop(s.db.write().unwrap().take());
        assert_eq!(s.get(Table::Meta, "a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(s.generation.load(Ordering::Acquire), 1);
        // A reopen asked for by an operation that saw an older generation is skipped.
        s.reopen(0).unwrap();
        assert_eq!(s.generation.load(Ordering::Acquire), 1);
        s.reopen(1).unwrap();
        assert_eq!(s.generation.load(Ordering::Acquire), 2);
        s.commit(Txn::default().put(Table::Meta, "b", b"2".to_vec()))
            .unwrap();
        assert_eq!(s.scan(Table::Meta).unwrap().len(), 2);
    }

    #[test]
    fn audit_is_chained_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keyd.redb");
        {
            let s = RedbStore::open(&path).unwrap();
            for i in 0..3 {
                s.commit(Txn::default().audit(AuditEvent::new(
                    "e",
                    "t",
                    serde_json::json!({ "i": i }),
                )))
                .unwrap();
            }
        }
        let s = RedbStore::open(&path).unwrap();
        s.commit(Txn::default().audit(AuditEvent::new("e", "t", serde_json::json!({ "i": 3 }))))
            .unwrap();
        let recs = s.audit_range(0, 100).unwrap();
        assert_eq!(
            recs.iter().map(|r| r.seq).collect::<Vec<_>>(),
            vec![1, 2, 3, 4]
        );
        assert_eq!(recs[0].prev_hash, GENESIS_HASH);
        for w in recs.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash);
        }
        for r in &recs {
            assert_eq!(r.compute_hash(), r.hash);
        }
        let mut edited = recs[1].clone();
        edited.event.details = serde_json::json!({ "i": 99 });
        assert_ne!(edited.compute_hash(), edited.hash);
    }
}
