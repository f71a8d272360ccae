//! The audit log's upkeep (checkpoints, segments), export and pruning.

use std::fmt;
use std::sync::Arc;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use keyd_proto::Timestamp;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::state::{Keyd, Result, ServiceError, from_json, to_json};
use crate::audit::{self, Checkpoint, ExportHeader, ExportLine, Format};
use crate::store::{AuditEvent, Store, StoreError, Table, Txn};

const SEGMENTS_DOC: &str = "audit_segments";
/// Records read per store call while exporting.
const EXPORT_BATCH: usize = 4096;
/// Records deleted per transaction while pruning: small transactions, as the store trait asks.
const PRUNE_BATCH: usize = 10_000;

/// The closed segments of the log (each ends at a signed `segment_end` checkpoint).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Segments {
    /// Records up to here were pruned (0: none).
    #[serde(default)]
    pruned_through: u64,
    ends: Vec<SegmentEnd>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct SegmentEnd {
    seq: u64,
    at: Timestamp,
}

/// One segment of the log, for `keyctl audit segments`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    pub first_seq: u64,
    pub last_seq: u64,
    /// When it was closed; `None` for the open segment at the tail.
    pub closed_at: Option<Timestamp>,
    /// The hash of the last record: give it to `prune` to show the segment was exported.
    pub last_hash: Option<String>,
}

/// What to export.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportRange {
    pub since: Option<Timestamp>,
    pub until: Option<Timestamp>,
    pub from_seq: Option<u64>,
    pub to_seq: Option<u64>,
}

/// A started export: its size, and the body arriving in chunks.
#[derive(Debug)]
pub struct Export {
    pub records: u64,
    pub chunks: tokio::sync::mpsc::Receiver<std::result::Result<Bytes, std::io::Error>>,
}

impl Keyd {
    /// The checkpoint signing key (base64) and its id.
    pub fn audit_public_key(&self) -> (String, String) {
        (
            STANDARD.encode(self.signer.public_key()),
            self.signer.key_id().to_owned(),
        )
    }

    fn segments_doc(&self) -> Result<(Option<Vec<u8>>, Segments)> {
        let doc = self.store.get(Table::Meta, SEGMENTS_DOC)?;
        let segs = match &doc {
            Some(d) => from_json(d, "audit segments")?,
            None => Segments::default(),
        };
        Ok((doc, segs))
    }

    /// Signs a checkpoint for the newest record, unless it has one already (then that one is
    /// returned, marked as a segment end if asked). `None` when the log is empty.
    pub async fn checkpoint(&self, segment_end: bool) -> Result<Option<Checkpoint>> {
        let store = Arc::clone(&self.store);
        let Some(last) = blocking(move || store.audit_last()).await? else {
            return Ok(None);
        };
        let key = Checkpoint::store_key(last.seq);
        if let Some(cp) = audit::checkpoint_at(self.store.as_ref(), last.seq)?
            && (cp.segment_end || !segment_end)
        {
            return Ok(Some(cp));
        }
        let cp = self.signer.sign(&last, self.clock.now(), segment_end);
        let mut txn = Txn::default().put(Table::Checkpoints, key, to_json(&cp));
        if segment_end {
            let (doc, mut segs) = self.segments_doc()?;
            segs.ends.push(SegmentEnd {
                seq: cp.seq,
                at: cp.at,
            });
            txn = txn.guard(Table::Meta, SEGMENTS_DOC, doc).put(
                Table::Meta,
                SEGMENTS_DOC,
                to_json(&segs),
            );
        }
        let store = Arc::clone(&self.store);
        blocking(move || store.commit(txn)).await?;
        self.metrics.audit_checkpoints.inc();
        Ok(Some(cp))
    }

    /// Deletes what a recorded prune left (all of it, or the rest after a crash): the records
    /// up to the segments' `pruned_through`. Returns how many it deleted.
    async fn finish_prune(&self) -> Result<u64> {
        let (_, segs) = self.segments_doc()?;
        let through = segs.pruned_through;
        let mut deleted = 0u64;
        if through == 0 {
            return Ok(0);
        }
        loop {
            let store = Arc::clone(&self.store);
            let n = blocking(move || store.audit_delete_through(through, PRUNE_BATCH)).await?;
            deleted += n as u64;
            if n < PRUNE_BATCH {
                break;
            }
        }
        // Then the checkpoints before the anchor (they cover deleted records only), in
        // transactions the store takes.
        let stale = audit::checkpoints_between(self.store.as_ref(), 0, through.saturating_sub(1))?;
        for chunk in stale.chunks(self.store.max_txn_ops().max(1)) {
            let mut txn = Txn::default();
            for cp in chunk {
                txn = txn.delete(Table::Checkpoints, Checkpoint::store_key(cp.seq));
            }
            let store = Arc::clone(&self.store);
            blocking(move || store.commit(txn)).await?;
        }
        Ok(deleted)
    }

    /// Whether a prune left checkpoints before its anchor (it stopped before deleting them).
    fn stale_checkpoints(&self, pruned_through: u64) -> Result<bool> {
        Ok(pruned_through > 0
            && self
                .store
                .scan_from(Table::Checkpoints, "", 1)?
                .first()
                .is_some_and(|(k, _)| *k < Checkpoint::store_key(pruned_through)))
    }

    /// Checkpoints at the configured interval, and closes the segment when it is full or old.
    pub(super) async fn maintain_audit_log(&self, now: Timestamp) -> Result<()> {
        let pruning = self.prune_lock.lock().await;
        let (_, segs) = self.segments_doc()?;
        if self
            .store
            .audit_range(0, 1)?
            .first()
            .is_some_and(|r| r.seq <= segs.pruned_through)
            || self.stale_checkpoints(segs.pruned_through)?
        {
            let n = self.finish_prune().await?;
            tracing::warn!(
                records = n,
                through_seq = segs.pruned_through,
                "completed an interrupted audit prune"
            );
        }
        drop(pruning);
        let store = Arc::clone(&self.store);
        let Some(last) = blocking(move || store.audit_last()).await? else {
            return Ok(());
        };
        let last_cp: Option<Checkpoint> = self
            .store
            .last(Table::Checkpoints)?
            .map(|(_, v)| from_json(&v, "checkpoint"))
            .transpose()?;
        let segment_start = segs.ends.last().map_or(segs.pruned_through, |e| e.seq) + 1;
        let first_at = self
            .store
            .audit_range(segment_start, 1)?
            .first()
            .map(|r| r.at);
        let full = last.seq + 1 - segment_start >= self.config.segment_records;
        let old = first_at
            .is_some_and(|t| now.0.saturating_sub(t.0) >= self.config.segment_age.as_secs());
        if last.seq >= segment_start && (full || old) {
            self.checkpoint(true).await?;
        } else if last_cp.as_ref().is_none_or(|c| {
            c.seq < last.seq
                && now.0.saturating_sub(c.at.0) >= self.config.checkpoint_interval.as_secs()
        }) {
            self.checkpoint(false).await?;
        }
        Ok(())
    }

    pub fn audit_segments(&self) -> Result<Vec<Segment>> {
        let (_, segs) = self.segments_doc()?;
        let mut out = Vec::new();
        let mut first = segs.pruned_through + 1;
        for end in segs.ends.iter().filter(|e| e.seq > segs.pruned_through) {
            let hash = self
                .store
                .audit_range(end.seq, 1)?
                .into_iter()
                .next()
                .filter(|r| r.seq == end.seq)
                .map(|r| r.hash);
            out.push(Segment {
                first_seq: first,
                last_seq: end.seq,
                closed_at: Some(end.at),
                last_hash: hash,
            });
            first = end.seq + 1;
        }
        if let Some(last) = self.store.audit_last()?
            && last.seq >= first
        {
            out.push(Segment {
                first_seq: first,
                last_seq: last.seq,
                closed_at: None,
                last_hash: None,
            });
        }
        Ok(out)
    }

    /// Deletes the records of closed segments up to `through_seq`, which must end a segment;
    /// `last_hash` must be that record's hash, proving the caller holds the exported segment.
    /// The segment-end checkpoint stays as the anchor of what remains.
    pub async fn prune_audit(
        &self,
        actor: &(dyn fmt::Display + Sync),
        through_seq: u64,
        last_hash: &str,
    ) -> Result<u64> {
        let _pruning = self.prune_lock.lock().await;
        let (doc, mut segs) = self.segments_doc()?;
        if through_seq <= segs.pruned_through {
            self.finish_prune().await?;
            return Err(ServiceError::NotFound(format!(
                "record {through_seq} was already pruned"
            )));
        }
        if !segs.ends.iter().any(|e| e.seq == through_seq) {
            return Err(ServiceError::Invalid(format!(
                "record {through_seq} does not end a closed segment (see `keyctl audit segments`)"
            )));
        }
        let rec = self
            .store
            .audit_range(through_seq, 1)?
            .into_iter()
            .next()
            .filter(|r| r.seq == through_seq);
        match rec {
            None => {
                return Err(ServiceError::NotFound(format!(
                    "record {through_seq} was already pruned"
                )));
            }
            Some(r) if r.hash != last_hash => {
                return Err(ServiceError::Invalid(format!(
                    "hash does not match record {through_seq}: export the segment first and pass its last record's hash"
                )));
            }
            Some(_) => {}
        }
        // The record and the new segment bounds go first, in one transaction: the chain goes on
        // from this record (which comes after `through_seq`, so it is never pruned and the log
        // never restarts at sequence 1), and a crash during the deletions leaves a record of
        // them that the next tick completes (`finish_prune`). The segment-end checkpoint at
        // `through_seq` stays as the signed anchor of what remains.
        let head = self
            .store
            .audit_range(0, 1)?
            .first()
            .map_or(through_seq, |r| r.seq);
        let records = (through_seq + 1).saturating_sub(head);
        let txn = Txn::default();
        segs.pruned_through = through_seq;
        segs.ends.retain(|e| e.seq >= through_seq);
        let mut txn = txn
            .guard(Table::Meta, SEGMENTS_DOC, doc)
            .put(Table::Meta, SEGMENTS_DOC, to_json(&segs))
            .audit(AuditEvent::new(
                "audit.pruned",
                actor,
                json!({ "through_seq": through_seq, "records": records }),
            ));
        txn.at = Some(self.clock.now());
        let store = Arc::clone(&self.store);
        blocking(move || store.commit(txn)).await?;
        let deleted = self.finish_prune().await?;
        Ok(deleted)
    }

    /// Starts an export. A checkpoint is signed first, so an export reaching the tail ends signed.
    pub async fn export_audit(
        &self,
        actor: &(dyn fmt::Display + Sync),
        range: ExportRange,
        format: Format,
    ) -> Result<Export> {
        self.audit(AuditEvent::new(
            "audit.exported",
            actor,
            json!({ "since": range.since, "until": range.until, "from_seq": range.from_seq, "to_seq": range.to_seq,
                    "format": format!("{format:?}").to_lowercase() }),
        ))
        .await?;
        self.checkpoint(false).await?;
        let store = Arc::clone(&self.store);
        let Some(tail) = store.audit_last()? else {
            return Err(ServiceError::NotFound("the audit log is empty".into()));
        };
        let head = store.audit_range(0, 1)?.first().map_or(tail.seq, |r| r.seq);
        let mut first = range.from_seq.unwrap_or(head).max(head);
        let mut last = range.to_seq.unwrap_or(tail.seq).min(tail.seq);
        if let Some(t) = range.since {
            first = first.max(first_seq_at_or_after(store.as_ref(), t, head, tail.seq)?);
        }
        if let Some(t) = range.until {
            // The last record with at <= until is the one before the first with at > until.
            last = last.min(
                first_seq_at_or_after(
                    store.as_ref(),
                    Timestamp(t.0.saturating_add(1)),
                    head,
                    tail.seq + 1,
                )?
                .saturating_sub(1),
            );
        }
        let records = if last >= first { last - first + 1 } else { 0 };
        let anchor = match first.checked_sub(1).filter(|s| *s > 0) {
            Some(s) => audit::checkpoint_at(store.as_ref(), s)?,
            None => None,
        };
        let (first_seq, last_seq) = (
            (records > 0).then_some(first),
            (records > 0).then_some(last),
        );
        let last_hash = match last_seq {
            Some(seq) => Some(self.chained_hash(seq, tail.seq).await?),
            None => None,
        };
        let header = ExportHeader {
            format: audit::FORMAT.into(),
            public_key: STANDARD.encode(self.signer.public_key()),
            key_id: self.signer.key_id().into(),
            first_seq,
            last_seq,
            anchor,
            range_signature: Some(self.signer.sign_range(
                first_seq,
                last_seq,
                last_hash.as_deref(),
            )),
            last_hash,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tokio::task::spawn_blocking(move || {
            let mut out = Vec::with_capacity(1 << 20);
            if format == Format::Jsonl {
                audit::write_json_line(&mut out, &ExportLine::Header(header));
            }
            let mut cursor = first;
            while records > 0 && cursor <= last {
                let batch = match store.audit_range(cursor, EXPORT_BATCH) {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                        return;
                    }
                };
                let Some(batch_last) = batch.last().map(|r| r.seq) else {
                    break;
                };
                let cps = if format == Format::Jsonl {
                    audit::checkpoints_between(store.as_ref(), cursor, batch_last.min(last))
                        .unwrap_or_default()
                } else {
                    vec![]
                };
                let mut cps = cps.into_iter().peekable();
                for rec in batch.iter().take_while(|r| r.seq <= last) {
                    audit::write_record(&mut out, format, rec);
                    while let Some(cp) = cps.next_if(|c| c.seq <= rec.seq) {
                        if cp.seq == rec.seq {
                            audit::write_json_line(&mut out, &ExportLine::Checkpoint(cp));
                        }
                    }
                }
                cursor = batch_last + 1;
                if out.len() >= 1 << 20 || cursor > last {
                    let chunk =
                        Bytes::from(std::mem::replace(&mut out, Vec::with_capacity(1 << 20)));
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return; // the client went away
                    }
                }
            }
            if !out.is_empty() {
                let _ = tx.blocking_send(Ok(Bytes::from(out)));
            }
        });
        Ok(Export {
            records,
            chunks: rx,
        })
    }
}

impl Keyd {
    /// The hash of record `seq`, once the stored chain from it to the next signed checkpoint
    /// (at most one checkpoint interval; the tail has one, signed before every export) checks
    /// out: the export's range signature then vouches only for what a checkpoint already
    /// covers, never for a record changed in the store behind keyd's back.
    async fn chained_hash(&self, seq: u64, tail: u64) -> Result<String> {
        let store = Arc::clone(&self.store);
        let public_key = self.signer.public_key().to_vec();
        blocking(move || {
            let corrupt = |why: String| StoreError::Corrupt {
                what: format!("audit record {seq}"),
                why,
            };
            let cp = audit::checkpoints_between(store.as_ref(), seq, tail)?
                .into_iter()
                .next()
                .filter(|c| c.verify(&public_key))
                .ok_or_else(|| corrupt("no valid signed checkpoint follows it".into()))?;
            let mut hash: Option<String> = None;
            let mut own: Option<String> = None;
            let mut cursor = seq;
            while cursor <= cp.seq {
                let batch = store.audit_range(cursor, EXPORT_BATCH)?;
                if batch.is_empty() {
                    break;
                }
                for rec in batch.iter().take_while(|r| r.seq <= cp.seq) {
                    if rec.compute_hash() != rec.hash
                        || hash.as_ref().is_some_and(|h| *h != rec.prev_hash)
                    {
                        return Err(corrupt(format!(
                            "the chain to checkpoint {} is broken at record {}",
                            cp.seq, rec.seq
                        )));
                    }
                    if rec.seq == seq {
                        own = Some(rec.hash.clone());
                    }
                    hash = Some(rec.hash.clone());
                    cursor = rec.seq + 1;
                }
                if batch.last().is_some_and(|r| r.seq > cp.seq) {
                    break;
                }
            }
            if cursor != cp.seq + 1 || hash.as_deref() != Some(cp.hash.as_str()) {
                return Err(corrupt(format!(
                    "the chain does not reach checkpoint {}",
                    cp.seq
                )));
            }
            own.ok_or_else(|| corrupt("it is not in the store".into()))
        })
        .await
    }
}

/// The lowest seq in `lo..hi` whose record is at or after `t` (`hi` if none): a binary search,
/// since records are appended in time order.
fn first_seq_at_or_after(store: &dyn Store, t: Timestamp, mut lo: u64, mut hi: u64) -> Result<u64> {
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let at = store.audit_range(mid, 1)?.first().map(|r| r.at);
        match at {
            Some(at) if at >= t => hi = mid,
            Some(_) => lo = mid + 1,
            None => hi = mid,
        }
    }
    Ok(lo)
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> std::result::Result<T, StoreError> + Send + 'static,
) -> Result<T> {
    Ok(tokio::task::spawn_blocking(f).await.map_err(|e| {
        ServiceError::Store(StoreError::Backend {
            op: "store task",
            source: Box::new(e),
        })
    })??)
}
