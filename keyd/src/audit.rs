//! The tamper-evident audit log: signed checkpoints, group-committed appends, export formats and
//! offline verification.
//!
//! Records are hash-chained by the store ([`crate::store::AuditRecord`]); this module adds:
//! - **checkpoints**: ed25519 signatures over (seq, hash, time) of a record, made at intervals,
//!   at shutdown, before an export and at segment ends. The signing key is a sealed record like
//!   every other key. A checkpoint authenticates its record and, through the chain, every record
//!   before it.
//! - **segments**: the log rolls into segments that end at a checkpoint marked `segment_end`.
//!   Old segments can be exported and then pruned; the segment-end checkpoint stays as the anchor
//!   to which the first kept record's `prev_hash` links, so what remains still verifies.
//! - **[`AuditWriter`]**: group commit for high-rate events (bundle fetches, refusals, admission
//!   decisions): many appends share one durable transaction, and each caller is answered only
//!   once its record is on disk.
//! - **export** as JSON lines (verifiable), OCSF or CEF, and **[`verify`]** for an exported file.

use std::fmt;
use std::io::BufRead;
use std::sync::Arc;

use aws_lc_rs::signature::{ED25519, Ed25519KeyPair, KeyPair as _, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd_proto::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::store::{AuditEvent, AuditRecord, GENESIS_HASH, Store, StoreError, Table, Txn};

/// The export format name written in headers.
pub const FORMAT: &str = "keyd-audit-v1";

/// A signed statement that the record `seq` has hash `hash`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub seq: u64,
    pub hash: String,
    pub at: Timestamp,
    /// Fingerprint of the signing public key.
    pub key_id: String,
    /// Base64 ed25519 signature over [`Checkpoint::message`].
    pub signature: String,
    /// Closes a segment: records up to here may be exported and pruned.
    #[serde(default)]
    pub segment_end: bool,
}

impl Checkpoint {
    pub fn message(seq: u64, hash: &str, at: Timestamp, segment_end: bool) -> Vec<u8> {
        format!(
            "keyd-audit-checkpoint-v1\n{seq}\n{hash}\n{}\n{segment_end}",
            at.0
        )
        .into_bytes()
    }

    pub fn store_key(seq: u64) -> String {
        format!("{seq:020}")
    }

    pub fn verify(&self, public_key: &[u8]) -> bool {
        let Ok(sig) = STANDARD.decode(&self.signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(
                &Self::message(self.seq, &self.hash, self.at, self.segment_end),
                &sig,
            )
            .is_ok()
    }
}

/// The checkpoint signing key (its seed is sealed in the store).
pub struct AuditSigner {
    pair: Ed25519KeyPair,
    key_id: String,
}

impl fmt::Debug for AuditSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditSigner")
            .field("key_id", &self.key_id)
            .finish_non_exhaustive()
    }
}

impl AuditSigner {
    pub fn from_seed(seed: &[u8]) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| "invalid ed25519 seed".to_owned())?;
        let key_id = key_id(pair.public_key().as_ref());
        Ok(Self { pair, key_id })
    }

    pub fn public_key(&self) -> &[u8] {
        self.pair.public_key().as_ref()
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn sign(&self, record: &AuditRecord, at: Timestamp, segment_end: bool) -> Checkpoint {
        let sig = self.pair.sign(&Checkpoint::message(
            record.seq,
            &record.hash,
            at,
            segment_end,
        ));
        Checkpoint {
            seq: record.seq,
            hash: record.hash.clone(),
            at,
            key_id: self.key_id.clone(),
            signature: STANDARD.encode(sig.as_ref()),
            segment_end,
        }
    }
}

impl AuditSigner {
    /// Signs a message of another kind (an evidence report's signature statement); every
    /// message starts with its own format line, so no signature passes for another kind.
    pub fn sign_message(&self, message: &[u8]) -> String {
        STANDARD.encode(self.pair.sign(message).as_ref())
    }

    /// Signs an export's range (see [`ExportHeader::range_signature`]).
    pub fn sign_range(
        &self,
        first_seq: Option<u64>,
        last_seq: Option<u64>,
        last_hash: Option<&str>,
    ) -> String {
        let sig = self
            .pair
            .sign(&ExportHeader::range_message(first_seq, last_seq, last_hash));
        STANDARD.encode(sig.as_ref())
    }
}

/// A fresh 32-byte ed25519 seed.
pub fn new_seed() -> Result<Zeroizing<Vec<u8>>, String> {
    let mut seed = Zeroizing::new(vec![0u8; 32]);
    getrandom::fill(&mut seed).map_err(|e| e.to_string())?;
    Ok(seed)
}

pub fn key_id(public_key: &[u8]) -> String {
    hex::encode(&Sha256::digest(public_key)[..8])
}

// ---- group commit ------------------------------------------------------------------------------

type Pending = (AuditEvent, oneshot::Sender<Result<(), Failure>>);

/// A failed group commit, as each waiter of the batch receives it: the message and whether the
/// store's disk was full or failed, so that each caller can answer as for its own commit.
#[derive(Debug, Clone)]
struct Failure {
    full: bool,
    io: bool,
    unreachable: bool,
    deposed: bool,
    why: String,
}

impl From<&StoreError> for Failure {
    fn from(e: &StoreError) -> Self {
        Self {
            full: e.is_full(),
            io: e.is_unavailable(),
            unreachable: e.is_unreachable(),
            deposed: matches!(e, StoreError::Deposed { .. }),
            why: keyd_mtls::error_chain(e),
        }
    }
}

/// Appends audit events with group commit: events arriving while a transaction is being written
/// go into the next one together.
#[derive(Clone)]
pub struct AuditWriter {
    tx: mpsc::Sender<Pending>,
}

impl fmt::Debug for AuditWriter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditWriter")
    }
}

/// Most events committed in one transaction.
const MAX_BATCH: usize = 8192;

impl AuditWriter {
    /// Starts the writer thread; it ends when every `AuditWriter` clone is dropped.
    pub fn spawn(store: Arc<dyn Store>, clock: crate::clock::Clock) -> Self {
        let (tx, mut rx) = mpsc::channel::<Pending>(MAX_BATCH * 4);
        // One record per event plus the chain's head must fit the store's transaction bound.
        let max_batch = MAX_BATCH.min(store.max_txn_ops().saturating_sub(1)).max(1);
        let spawned = std::thread::Builder::new()
            .name("keyd-audit".into())
            .spawn(move || {
                while let Some(first) = rx.blocking_recv() {
                    let mut batch = vec![first];
                    while batch.len() < max_batch {
                        match rx.try_recv() {
                            Ok(p) => batch.push(p),
                            Err(_) => break,
                        }
                    }
                    let (events, waiters): (Vec<_>, Vec<_>) = batch.into_iter().unzip();
                    let result = store
                        .commit(Txn {
                            audit: events,
                            at: Some(clock.now()),
                            ..Txn::default()
                        })
                        .map_err(|e| Failure::from(&e));
                    for w in waiters {
                        let _ = w.send(result.clone());
                    }
                }
            });
        if let Err(e) = spawned {
            // Without the thread every append reports the failure below; nothing is lost silently.
            tracing::error!(error = %e, "cannot start the audit writer thread");
        }
        Self { tx }
    }

    /// Appends one event and returns once it is durable.
    pub async fn append(&self, event: AuditEvent) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        let failed = |why: String| StoreError::Backend {
            op: "audit append",
            source: why.into(),
        };
        self.tx
            .send((event, done))
            .await
            .map_err(|_| failed("the audit writer has stopped".into()))?;
        wait.await
            .map_err(|_| failed("the audit writer has stopped".into()))?
            .map_err(|f| {
                let source = f.why.into();
                if f.deposed {
                    StoreError::Deposed { op: "audit append" }
                } else if f.full {
                    StoreError::Full {
                        op: "audit append",
                        source,
                    }
                } else if f.unreachable {
                    StoreError::Unavailable {
                        op: "audit append",
                        source,
                    }
                } else if f.io {
                    StoreError::Io {
                        op: "audit append",
                        source,
                    }
                } else {
                    StoreError::Backend {
                        op: "audit append",
                        source,
                    }
                }
            })
    }
}

// ---- export ------------------------------------------------------------------------------------

/// One line of a JSON-lines export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ExportLine {
    Header(ExportHeader),
    Record(AuditRecord),
    Checkpoint(Checkpoint),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExportHeader {
    pub format: String,
    /// Base64 ed25519 public key that signed the checkpoints. Compare it with the key you hold
    /// (`keyctl audit public-key`) rather than trusting the file.
    pub public_key: String,
    pub key_id: String,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    /// The checkpoint at `first_seq - 1`, when the export starts after pruned or skipped records.
    pub anchor: Option<Checkpoint>,
    /// The hash of record `last_seq`.
    #[serde(default)]
    pub last_hash: Option<String>,
    /// Base64 ed25519 signature over [`ExportHeader::range_message`]: binds the range and the
    /// last record's hash, so that a file cut short (even right after a checkpoint line, with
    /// the header edited to match) fails verification.
    #[serde(default)]
    pub range_signature: Option<String>,
}

impl ExportHeader {
    pub fn range_message(
        first_seq: Option<u64>,
        last_seq: Option<u64>,
        last_hash: Option<&str>,
    ) -> Vec<u8> {
        let opt = |v: Option<u64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
        format!(
            "keyd-audit-export-range-v1\n{}\n{}\n{}",
            opt(first_seq),
            opt(last_seq),
            last_hash.unwrap_or("-")
        )
        .into_bytes()
    }

    /// Whether `range_signature` is `public_key`'s signature over this header's range.
    pub fn range_verifies(&self, public_key: &[u8]) -> bool {
        let Some(sig) = self
            .range_signature
            .as_deref()
            .and_then(|s| STANDARD.decode(s).ok())
        else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, public_key)
            .verify(
                &Self::range_message(self.first_seq, self.last_seq, self.last_hash.as_deref()),
                &sig,
            )
            .is_ok()
    }
}

/// Export formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Jsonl,
    Ocsf,
    Cef,
}

impl Format {
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "jsonl" => Some(Format::Jsonl),
            "ocsf" => Some(Format::Ocsf),
            "cef" => Some(Format::Cef),
            _ => None,
        }
    }
}

/// Appends the line(s) for a record in `format` to `out`.
pub fn write_record(out: &mut Vec<u8>, format: Format, rec: &AuditRecord) {
    match format {
        Format::Jsonl => write_json_line(out, &ExportLine::Record(rec.clone())),
        Format::Ocsf => write_json_line(out, &to_ocsf(rec)),
        Format::Cef => {
            out.extend_from_slice(to_cef(rec).as_bytes());
            out.push(b'\n');
        }
    }
}

pub fn write_json_line<T: Serialize>(out: &mut Vec<u8>, v: &T) {
    // Serialising plain data into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, v);
    out.push(b'\n');
}

/// The OCSF class an action maps to (documented in docs/audit.md).
pub fn ocsf_class(action: &str) -> (u32, &'static str, u32, &'static str) {
    // (class_uid, class_name, activity_id, activity_name)
    let key_event = |activity: &str| match activity {
        "generated" | "imported" | "staged" => (1, "Create"),
        "exported" => (2, "Read"),
        "activated" | "rotated" => (3, "Update"),
        "retired" => (4, "Delete"),
        _ => (99, "Other"),
    };
    let last = action.rsplit('.').next().unwrap_or(action);
    if action.starts_with("node.") || action.starts_with("wireguard.node_key.") {
        // A node and its WireGuard identity key are the accounts of this system.
        let (id, name) = match last {
            "registered" => (1, "Create"),
            "updated" => (99, "Other"),
            _ => (99, "Other"),
        };
        return (3001, "Account Change", id, name);
    }
    if action.starts_with("ipsec.key.")
        || action.starts_with("wireguard.psk")
        || action.starts_with("wireguard.node_key_epoch")
        || action.starts_with("kek.")
        || action.starts_with("audit.signing_key.")
    {
        let (id, name) = key_event(last);
        return (3004, "Entity Management", id, name);
    }
    // Requests and decisions: who called what, and whether it was allowed.
    let (id, name) = match last {
        "fetched" | "exported" => (2, "Read"),
        "refused" | "denied" => (99, "Other"),
        _ => (3, "Update"),
    };
    (6003, "API Activity", id, name)
}

fn is_failure(action: &str) -> bool {
    action == "request.refused" || action == "admission.denied" || action.ends_with(".stuck")
}

/// The record as an OCSF 1.1 event.
pub fn to_ocsf(rec: &AuditRecord) -> Value {
    let (class_uid, class_name, activity_id, activity_name) = ocsf_class(&rec.event.action);
    let category = class_uid / 1000;
    let failure = is_failure(&rec.event.action);
    json!({
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category,
        "category_name": if category == 3 { "Identity & Access Management" } else { "Application Activity" },
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "time": rec.at.0 * 1000,
        "severity_id": if failure { 3 } else { 1 },
        "status_id": if failure { 2 } else { 1 },
        "status": if failure { "Failure" } else { "Success" },
        "message": rec.event.action,
        "actor": { "user": { "name": rec.event.actor, "type": actor_type(&rec.event.actor) } },
        "api": { "operation": rec.event.action, "service": { "name": "keyd" } },
        "metadata": {
            "version": "1.1.0",
            "uid": rec.seq.to_string(),
            "log_name": "keyd-audit",
            "product": { "name": "keyd", "vendor_name": "keyd", "version": env!("CARGO_PKG_VERSION") },
        },
        "unmapped": { "seq": rec.seq, "hash": rec.hash, "prev_hash": rec.prev_hash, "details": rec.event.details },
    })
}

fn actor_type(actor: &str) -> &'static str {
    match actor.split('/').next() {
        Some("admin") => "Admin",
        Some("node") | Some("webhook") | Some("keyd") => "System",
        _ => "Other",
    }
}

/// The record as an ArcSight CEF line.
pub fn to_cef(rec: &AuditRecord) -> String {
    let head = |s: &str| s.replace('\\', "\\\\").replace('|', "\\|");
    let ext = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('=', "\\=")
            .replace('\n', "\\n")
            .replace('\r', "\\r")
    };
    let severity = if is_failure(&rec.event.action) { 6 } else { 3 };
    format!(
        "CEF:0|keyd|keyd|{}|{}|{}|{}|rt={} suser={} cs1Label=seq cs1={} cs2Label=hash cs2={} cs3Label=prevHash cs3={} msg={}",
        env!("CARGO_PKG_VERSION"),
        head(&rec.event.action),
        head(&rec.event.action),
        severity,
        rec.at.0 * 1000,
        ext(&rec.event.actor),
        rec.seq,
        rec.hash,
        rec.prev_hash,
        ext(&rec.event.details.to_string()),
    )
}

// ---- verify ------------------------------------------------------------------------------------

/// What a successful verification found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub records: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub checkpoints: u64,
    /// Records after the last checkpoint: chained but not signed (a truncation there would not
    /// show).
    pub unsigned_tail: u64,
    /// The first record links to a verified anchor checkpoint (or is the log's first record).
    pub anchored: bool,
    /// The public key came from the file itself, not from the caller.
    pub key_from_file: bool,
    /// The header's range and last hash carry a valid signature (always so with a trusted key:
    /// without one the file is refused).
    pub range_signed: bool,
}

/// The first thing wrong with a file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}{}: {reason}", .seq.map(|s| format!(" (record {s})")).unwrap_or_default())]
pub struct VerifyError {
    pub line: u64,
    pub seq: Option<u64>,
    pub reason: String,
}

/// Verifies a JSON-lines export: every record's hash, the chain, the order, and every
/// checkpoint's signature. `public_key` (raw 32 bytes) is the key the caller trusts; without it
/// the key in the file's header is used and the report says so.
pub fn verify(input: impl BufRead, public_key: Option<&[u8]>) -> Result<VerifyReport, VerifyError> {
    let mut report = VerifyReport {
        records: 0,
        first_seq: None,
        last_seq: None,
        checkpoints: 0,
        unsigned_tail: 0,
        anchored: false,
        key_from_file: public_key.is_none(),
        range_signed: false,
    };
    let mut header: Option<ExportHeader> = None;
    let mut last_line = 0;
    let mut last_hash: Option<String> = None;
    let mut key: Option<Vec<u8>> = public_key.map(<[u8]>::to_vec);
    let mut anchor: Option<Checkpoint> = None;
    let mut prev: Option<(u64, String)> = None;
    let mut saw_header = false;
    for (i, line) in input.lines().enumerate() {
        let n = i as u64 + 1;
        let bad = |seq: Option<u64>, reason: String| VerifyError {
            line: n,
            seq,
            reason,
        };
        let line = line.map_err(|e| bad(None, format!("cannot read: {e}")))?;
        if line.trim().is_empty() {
            continue;
        }
        last_line = n;
        let parsed: ExportLine = serde_json::from_str(&line)
            .map_err(|e| bad(None, format!("not an export line: {e}")))?;
        match parsed {
            ExportLine::Header(h) => {
                if saw_header {
                    return Err(bad(None, "a second header".into()));
                }
                saw_header = true;
                if h.format != FORMAT {
                    return Err(bad(None, format!("format {:?} is not {FORMAT}", h.format)));
                }
                let file_key = STANDARD
                    .decode(&h.public_key)
                    .map_err(|_| bad(None, "header public_key is not base64".into()))?;
                match &key {
                    Some(k) if *k != file_key => {
                        return Err(bad(
                            None,
                            "the file was signed by a different key than the one given".into(),
                        ));
                    }
                    Some(_) => {}
                    None => key = Some(file_key),
                }
                anchor = h.anchor.clone();
                header = Some(h);
            }
            ExportLine::Record(rec) => {
                if !saw_header {
                    return Err(bad(Some(rec.seq), "record before the header".into()));
                }
                match &prev {
                    None => {
                        report.first_seq = Some(rec.seq);
                        if rec.seq == 1 {
                            if rec.prev_hash != GENESIS_HASH {
                                return Err(bad(
                                    Some(rec.seq),
                                    "the first record does not start the chain".into(),
                                ));
                            }
                            report.anchored = true;
                        } else if let Some(a) = &anchor {
                            let k = key.as_deref().unwrap_or_default();
                            if a.seq.checked_add(1) != Some(rec.seq) || !a.verify(k) {
                                return Err(bad(
                                    Some(rec.seq),
                                    "the anchor checkpoint is invalid or not for the record before"
                                        .into(),
                                ));
                            }
                            if a.hash != rec.prev_hash {
                                return Err(bad(
                                    Some(rec.seq),
                                    "the first record does not link to the anchor checkpoint"
                                        .into(),
                                ));
                            }
                            report.anchored = true;
                        }
                    }
                    Some((pseq, phash)) => {
                        if pseq.checked_add(1) != Some(rec.seq) {
                            return Err(bad(
                                Some(rec.seq),
                                format!(
                                    "follows record {pseq}: a record was deleted, inserted or reordered"
                                ),
                            ));
                        }
                        if rec.prev_hash != *phash {
                            return Err(bad(
                                Some(rec.seq),
                                format!(
                                    "does not chain to record {pseq}: a record before it was changed or replaced"
                                ),
                            ));
                        }
                    }
                }
                if rec.compute_hash() != rec.hash {
                    return Err(bad(
                        Some(rec.seq),
                        "its content does not match its hash: the record was edited".into(),
                    ));
                }
                report.records += 1;
                report.unsigned_tail += 1;
                report.last_seq = Some(rec.seq);
                last_hash = Some(rec.hash.clone());
                prev = Some((rec.seq, rec.hash));
            }
            ExportLine::Checkpoint(cp) => {
                let k = key.as_deref().unwrap_or_default();
                if !cp.verify(k) {
                    return Err(bad(Some(cp.seq), "checkpoint signature is invalid".into()));
                }
                match &prev {
                    Some((pseq, phash)) if *pseq == cp.seq && *phash == cp.hash => {}
                    _ => {
                        return Err(bad(
                            Some(cp.seq),
                            "checkpoint does not match the record it follows".into(),
                        ));
                    }
                }
                report.checkpoints += 1;
                report.unsigned_tail = 0;
            }
        }
    }
    let Some(header) = header else {
        return Err(VerifyError {
            line: 0,
            seq: None,
            reason: "no header: not a keyd audit export".into(),
        });
    };
    let at_end = |reason: String| VerifyError {
        line: last_line,
        seq: report.last_seq,
        reason,
    };
    // The file must hold exactly the range its header names: a file cut short (or extended)
    // shows here, and with a signed range even when the header was edited to match.
    if (header.first_seq, header.last_seq) != (report.first_seq, report.last_seq) {
        let range = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => format!("records {a}..{b}"),
            _ => "no records".to_owned(),
        };
        return Err(at_end(format!(
            "the header names {}, the file holds {}: the file was cut or added to",
            range(header.first_seq, header.last_seq),
            range(report.first_seq, report.last_seq)
        )));
    }
    if header.last_hash.is_some() && header.last_hash != last_hash {
        return Err(at_end(
            "the last record's hash is not the one the header names: the end was replaced".into(),
        ));
    }
    let k = key.as_deref().unwrap_or_default();
    match (&header.range_signature, public_key.is_some()) {
        (Some(_), _) if header.range_verifies(k) => report.range_signed = true,
        (Some(_), _) => {
            return Err(at_end("the header's range signature is invalid".into()));
        }
        (None, true) => {
            return Err(at_end(
                "the header's range is not signed (an export from an older keyd): a cut at \
                 its end would not show; export it again"
                    .into(),
            ));
        }
        (None, false) => {}
    }
    Ok(report)
}

/// Reads the checkpoints with `from <= seq <= to`.
/// The checkpoint stored for record `seq`, if any.
pub fn checkpoint_at(store: &dyn Store, seq: u64) -> Result<Option<Checkpoint>, StoreError> {
    store
        .get(Table::Checkpoints, &Checkpoint::store_key(seq))?
        .map(|v| {
            serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                what: format!("checkpoint {seq}"),
                why: e.to_string(),
            })
        })
        .transpose()
}

pub fn checkpoints_between(
    store: &dyn Store,
    from: u64,
    to: u64,
) -> Result<Vec<Checkpoint>, StoreError> {
    let mut out = Vec::new();
    let mut next = Checkpoint::store_key(from);
    loop {
        let batch = store.scan_from(Table::Checkpoints, &next, 1024)?;
        let done = batch.len() < 1024;
        for (k, v) in batch {
            let cp: Checkpoint = serde_json::from_slice(&v).map_err(|e| StoreError::Corrupt {
                what: format!("checkpoint {k}"),
                why: e.to_string(),
            })?;
            if cp.seq > to {
                return Ok(out);
            }
            next = Checkpoint::store_key(cp.seq + 1);
            out.push(cp);
        }
        if done {
            return Ok(out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::RedbStore;

    fn log(n: u64) -> (tempfile::TempDir, RedbStore, AuditSigner) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
        for i in 0..n {
            store
                .commit(Txn::default().audit(AuditEvent::new(
                    "ipsec.key.generated",
                    "admin/a",
                    json!({ "spi": i }),
                )))
                .unwrap();
        }
        (dir, store, AuditSigner::from_seed(&[7u8; 32]).unwrap())
    }

    /// The header keyd writes for `recs`, its range signed.
    fn header(
        signer: &AuditSigner,
        recs: &[AuditRecord],
        anchor: Option<Checkpoint>,
    ) -> ExportHeader {
        let (first_seq, last_seq) = (recs.first().map(|r| r.seq), recs.last().map(|r| r.seq));
        let last_hash = recs.last().map(|r| r.hash.clone());
        ExportHeader {
            format: FORMAT.into(),
            public_key: STANDARD.encode(signer.public_key()),
            key_id: signer.key_id().into(),
            first_seq,
            last_seq,
            anchor,
            range_signature: Some(signer.sign_range(first_seq, last_seq, last_hash.as_deref())),
            last_hash,
        }
    }

    fn export(store: &RedbStore, signer: &AuditSigner, checkpoint_every: u64) -> Vec<String> {
        let recs = store.audit_range(0, 10_000).unwrap();
        let mut out = Vec::new();
        write_json_line(&mut out, &ExportLine::Header(header(signer, &recs, None)));
        for r in &recs {
            write_record(&mut out, Format::Jsonl, r);
            if r.seq % checkpoint_every == 0 {
                write_json_line(
                    &mut out,
                    &ExportLine::Checkpoint(signer.sign(r, r.at, false)),
                );
            }
        }
        String::from_utf8(out)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    fn check(lines: &[String], key: Option<&[u8]>) -> Result<VerifyReport, VerifyError> {
        verify(lines.join("\n").as_bytes(), key)
    }

    #[test]
    fn a_clean_export_verifies() {
        let (_d, store, signer) = log(10);
        let lines = export(&store, &signer, 4);
        let r = check(&lines, Some(signer.public_key())).unwrap();
        assert_eq!(
            (r.records, r.checkpoints, r.unsigned_tail, r.anchored),
            (10, 2, 2, true)
        );
        assert!(!r.key_from_file);
        assert!(check(&lines, None).unwrap().key_from_file);
    }

    /// Line numbers: 1 header, then records and checkpoints. Each kind of tampering is caught
    /// and the first bad record is named.
    #[test]
    fn tampering_is_caught_at_the_first_bad_record() {
        let (_d, store, signer) = log(10);
        let lines = export(&store, &signer, 100);
        let key = Some(signer.public_key());
        // Edited: record 5's details.
        let mut edited = lines.clone();
        edited[5] = edited[5].replace("\"spi\":4", "\"spi\":44");
        let e = check(&edited, key).unwrap_err();
        assert_eq!((e.line, e.seq), (6, Some(5)), "{e}");
        assert!(e.reason.contains("edited"));
        // Deleted: record 5 removed.
        let mut deleted = lines.clone();
        deleted.remove(5);
        let e = check(&deleted, key).unwrap_err();
        assert_eq!(e.seq, Some(6), "{e}");
        assert!(e.reason.contains("deleted"));
        // Inserted: a copy of record 3 after record 5.
        let mut inserted = lines.clone();
        inserted.insert(6, lines[3].clone());
        assert_eq!(check(&inserted, key).unwrap_err().seq, Some(3));
        // Reordered: records 5 and 6 swapped.
        let mut swapped = lines.clone();
        swapped.swap(5, 6);
        assert_eq!(check(&swapped, key).unwrap_err().seq, Some(6));
        // Re-hashed after an edit: the edit is consistent within the record but breaks the chain.
        let mut rec: AuditRecord = match serde_json::from_str(&lines[5]).unwrap() {
            ExportLine::Record(r) => r,
            _ => unreachable!(),
        };
        rec.event.actor = "admin/mallory".into();
        rec.hash = rec.compute_hash();
        let mut rehashed = lines.clone();
        rehashed[5] = serde_json::to_string(&ExportLine::Record(rec)).unwrap();
        let e = check(&rehashed, key).unwrap_err();
        assert_eq!(e.seq, Some(6), "the next record no longer chains: {e}");
    }

    /// A file cut at its end: the header's signed range shows it, even when the cut falls
    /// right after a checkpoint and the header is edited to match.
    #[test]
    fn a_file_cut_short_fails_against_its_signed_range() {
        let (_d, store, signer) = log(10);
        let lines = export(&store, &signer, 4);
        let key = Some(signer.public_key());
        // Lines: 1 header, records 1-4, checkpoint 4, records 5-8, checkpoint 8, 9, 10.
        let cut: Vec<String> = lines[..11].to_vec();
        assert!(cut[10].contains("\"checkpoint\""), "{}", cut[10]);
        let e = check(&cut, key).unwrap_err();
        assert!(
            e.reason
                .contains("the header names records 1..10, the file holds records 1..8"),
            "{e}"
        );
        // The header edited to the cut: its range signature no longer verifies.
        let mut h: ExportHeader = match serde_json::from_str(&cut[0]).unwrap() {
            ExportLine::Header(h) => h,
            _ => unreachable!(),
        };
        h.last_seq = Some(8);
        let mut edited = cut.clone();
        edited[0] = serde_json::to_string(&ExportLine::Header(h.clone())).unwrap();
        let e = check(&edited, key).unwrap_err();
        assert!(e.reason.contains("not the one the header names"), "{e}");
        let rec8: AuditRecord = match serde_json::from_str(&cut[9]).unwrap() {
            ExportLine::Record(r) => r,
            _ => unreachable!(),
        };
        h.last_hash = Some(rec8.hash);
        edited[0] = serde_json::to_string(&ExportLine::Header(h.clone())).unwrap();
        let e = check(&edited, key).unwrap_err();
        assert!(e.reason.contains("range signature is invalid"), "{e}");
        // No range signature at all: refused with a trusted key, reported without one.
        h.range_signature = None;
        edited[0] = serde_json::to_string(&ExportLine::Header(h)).unwrap();
        let e = check(&edited, key).unwrap_err();
        assert!(e.reason.contains("range is not signed"), "{e}");
        let r = check(&edited, None).unwrap();
        assert!(!r.range_signed);
        assert!(check(&lines, key).unwrap().range_signed);
    }

    #[test]
    fn checkpoints_catch_a_rewritten_chain_and_a_foreign_key() {
        let (_d, store, signer) = log(6);
        let lines = export(&store, &signer, 3);
        // Whole chain rewritten from record 2 on, hashes recomputed: the checkpoint at 3 fails.
        let mut recs: Vec<AuditRecord> = lines
            .iter()
            .filter_map(|l| match serde_json::from_str(l).unwrap() {
                ExportLine::Record(r) => Some(r),
                _ => None,
            })
            .collect();
        recs[1].event.actor = "admin/mallory".into();
        for i in 1..recs.len() {
            recs[i].prev_hash = recs[i - 1].hash.clone();
            recs[i].hash = recs[i].compute_hash();
        }
        let mut forged = vec![lines[0].clone()];
        for (i, r) in recs.iter().enumerate() {
            forged.push(serde_json::to_string(&ExportLine::Record(r.clone())).unwrap());
            if i == 2 {
                forged.push(lines[4].clone());
            }
        }
        let e = check(&forged, Some(signer.public_key())).unwrap_err();
        assert_eq!(e.seq, Some(3), "{e}");
        // A file signed by another key is refused when the caller gives the key it trusts.
        let other = AuditSigner::from_seed(&[8u8; 32]).unwrap();
        assert!(
            check(&lines, Some(other.public_key()))
                .unwrap_err()
                .reason
                .contains("different key")
        );
    }

    #[test]
    fn a_pruned_log_verifies_from_its_anchor() {
        let (_d, store, signer) = log(8);
        let recs = store.audit_range(0, 100).unwrap();
        let anchor = signer.sign(&recs[3], recs[3].at, true);
        let mut out = Vec::new();
        let header = |anchor| header(&signer, &recs[4..], anchor);
        write_json_line(&mut out, &ExportLine::Header(header(Some(anchor.clone()))));
        for r in &recs[4..] {
            write_record(&mut out, Format::Jsonl, r);
        }
        let r = verify(&out[..], Some(signer.public_key())).unwrap();
        assert!(r.anchored);
        assert_eq!(r.first_seq, Some(5));
        // The wrong anchor (for record 3) is refused.
        let mut bad = Vec::new();
        write_json_line(
            &mut bad,
            &ExportLine::Header(header(Some(signer.sign(&recs[2], recs[2].at, true)))),
        );
        for r in &recs[4..] {
            write_record(&mut bad, Format::Jsonl, r);
        }
        assert!(verify(&bad[..], Some(signer.public_key())).is_err());
    }

    /// A crafted file (the record hash is unkeyed: anyone can write records that hash right)
    /// with sequence numbers at `u64::MAX` is refused; `seq + 1` used to overflow, a panic in
    /// a build with overflow checks (found reviewing what the audit_verify fuzz target reaches).
    #[test]
    fn sequence_numbers_at_the_end_of_u64_are_refused() {
        let (_d, store, signer) = log(2);
        let recs = store.audit_range(0, 10).unwrap();
        // An anchor that claims the last sequence number, before a record other than the first.
        let mut anchor = signer.sign(&recs[0], recs[0].at, true);
        anchor.seq = u64::MAX;
        let mut out = Vec::new();
        write_json_line(
            &mut out,
            &ExportLine::Header(header(&signer, &recs[1..], Some(anchor))),
        );
        write_record(&mut out, Format::Jsonl, &recs[1]);
        assert!(verify(&out[..], None).is_err());
        // A record numbered u64::MAX, its hash recomputed, followed by another.
        let mut last = recs[0].clone();
        last.seq = u64::MAX;
        last.prev_hash = recs[1].hash.clone();
        last.hash = last.compute_hash();
        let crafted = [last, recs[1].clone()];
        let mut out = Vec::new();
        write_json_line(
            &mut out,
            &ExportLine::Header(header(&signer, &crafted, None)),
        );
        for r in &crafted {
            write_record(&mut out, Format::Jsonl, r);
        }
        let e = verify(&out[..], None).unwrap_err();
        assert_eq!((e.line, e.seq), (3, Some(recs[1].seq)), "{}", e.reason);
    }

    #[test]
    fn ocsf_and_cef_shapes() {
        let (_d, store, _) = log(1);
        let rec = &store.audit_range(0, 1).unwrap()[0];
        let o = to_ocsf(rec);
        assert_eq!(o["class_uid"], 3004);
        assert_eq!(o["activity_name"], "Create");
        assert_eq!(o["type_uid"], 300401);
        assert_eq!(o["actor"]["user"]["name"], "admin/a");
        assert_eq!(ocsf_class("request.refused").0, 6003);
        assert_eq!(ocsf_class("node.registered").0, 3001);
        let c = to_cef(rec);
        assert!(c.starts_with("CEF:0|keyd|keyd|"), "{c}");
        assert!(c.contains("suser=admin/a") && c.contains("cs1=1"), "{c}");
        assert!(
            c.contains(r#"msg={"spi":0}"#) || c.contains(r#"msg={"spi"\=0}"#),
            "{c}"
        );
    }

    #[tokio::test]
    async fn the_writer_commits_concurrent_appends_in_order_and_durably() {
        let (_d, store, _) = log(0);
        let store: Arc<dyn Store> = Arc::new(store);
        let w = AuditWriter::spawn(Arc::clone(&store), crate::clock::Clock::default());
        let mut tasks = Vec::new();
        for i in 0..200 {
            let w = w.clone();
            tasks.push(tokio::spawn(async move {
                w.append(AuditEvent::new(
                    "bundle.fetched",
                    "node/x",
                    json!({ "i": i }),
                ))
                .await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let recs = store.audit_range(0, 1000).unwrap();
        assert_eq!(recs.len(), 200);
        for w in recs.windows(2) {
            assert_eq!(w[1].prev_hash, w[0].hash);
        }
    }
}
