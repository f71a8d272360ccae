//! The evidence report (`GET /v1/report/evidence`): one pass over the audit log, judged,
//! rendered and signed with the audit key; see [`crate::report`].

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd_proto::{KeyClass, Timestamp};
use serde_json::json;
use sha2::{Digest, Sha256};

use super::state::{Keyd, Result, ServiceError};
use crate::audit;
use crate::report::collect::{ClassRules, Collector, Window};
use crate::report::judge::{Context, assemble};
use crate::report::{
    CheckpointRef, EvidenceReport, ReportFormat, ReportSignature, SIGNATURE_FORMAT, html, pdf,
};
use crate::store::{AuditEvent, StoreError};

/// Records read per store call.
const BATCH: usize = 4096;

/// A report asked for.
#[derive(Debug, Clone, Copy)]
pub struct ReportRequest {
    /// Default: the log's first retained record.
    pub since: Option<Timestamp>,
    /// Default: now.
    pub until: Option<Timestamp>,
    pub format: ReportFormat,
}

/// How far the pass over the log has come, for a progress bar.
#[derive(Debug, Default)]
pub struct Progress {
    pub done: AtomicU64,
    pub total: AtomicU64,
}

/// A rendered, signed report.
#[derive(Debug, Clone)]
pub struct SignedReport {
    pub content: Vec<u8>,
    pub signature: ReportSignature,
    pub report: EvidenceReport,
}

impl Keyd {
    /// Builds, renders and signs an evidence report, and audits that it was handed out.
    pub async fn evidence_report(
        &self,
        actor: &(dyn fmt::Display + Sync),
        req: ReportRequest,
        progress: Arc<Progress>,
    ) -> Result<SignedReport> {
        let now = self.clock.now();
        // The tail gets a signed checkpoint first, so the whole period is vouched for.
        self.checkpoint(false).await?;
        let store = Arc::clone(&self.store);
        let head = store.audit_range(0, 1)?.first().map(|r| (r.seq, r.at));
        let tail = store.audit_last()?;
        let (Some((head_seq, head_at)), Some(tail)) = (head, tail) else {
            return Err(ServiceError::NotFound("the audit log is empty".into()));
        };
        let until = req.until.unwrap_or(now).min(now);
        let since = req.since.unwrap_or(head_at);
        if since > until {
            return Err(ServiceError::Invalid(format!(
                "since ({since}) is after until ({until})"
            )));
        }
        let cache = self.cache();
        let now_rules: BTreeMap<KeyClass, ClassRules> = KeyClass::ALL
            .iter()
            .map(|c| {
                let cs = cache.schedules.get(*c);
                (
                    *c,
                    ClassRules {
                        schedule: cs.schedule,
                        bounds: cs.bounds,
                    },
                )
            })
            .collect();
        drop(cache);
        let window = Window {
            since,
            until,
            now_rules,
            grace_secs: self.config.rollout_stuck_after.as_secs(),
        };
        let checkpoints = audit::checkpoints_between(self.store.as_ref(), head_seq, tail.seq)?;
        let public_key = self.signer.public_key().to_vec();
        progress
            .total
            .store(tail.seq + 1 - head_seq, Ordering::Relaxed);

        // The first retained record must link to the signed checkpoint a prune left at the
        // record before it; a log cut anywhere else has no such anchor.
        let (anchor, anchor_problem) = if head_seq > 1 {
            match audit::checkpoint_at(self.store.as_ref(), head_seq - 1)? {
                Some(cp) if cp.verify(&public_key) => (Some(cp.hash), None),
                Some(_) => (
                    None,
                    Some(format!(
                        "the checkpoint anchoring the log's first record {head_seq} does not verify"
                    )),
                ),
                None => (
                    None,
                    Some(format!(
                        "the log starts at record {head_seq} with no signed checkpoint before it: \
                         records were removed outside a prune"
                    )),
                ),
            }
        } else {
            (None, None)
        };
        // One pass over the log, off the async threads.
        let collector = Collector::new(window.clone(), checkpoints.iter().map(|c| c.seq), anchor);
        // Two threads: one reads and decodes batches, the other checks and gathers them, so
        // that the store's reads overlap the hashing (a bounded channel keeps memory flat).
        let (tx, rx) = std::sync::mpsc::sync_channel::<Vec<crate::store::AuditRecord>>(2);
        let reader = tokio::task::spawn_blocking(move || {
            let mut cursor = head_seq;
            while cursor <= tail.seq {
                let mut batch = store.audit_range(cursor, BATCH)?;
                batch.retain(|r| r.seq <= tail.seq);
                let Some(last) = batch.last().map(|r| r.seq) else {
                    break;
                };
                cursor = last + 1;
                if tx.send(batch).is_err() {
                    break; // the collector stopped
                }
            }
            Ok::<_, StoreError>(())
        });
        let p = Arc::clone(&progress);
        let gather = tokio::task::spawn_blocking(move || {
            let mut collector = collector;
            for batch in rx {
                for rec in &batch {
                    collector.feed(rec);
                }
                p.done.fetch_add(batch.len() as u64, Ordering::Relaxed);
            }
            let mut collected = collector.finish();
            if collected.chain_error.is_none() {
                collected.chain_error = anchor_problem;
            }
            collected
        });
        let joined = |e: tokio::task::JoinError| {
            ServiceError::Store(StoreError::Backend {
                op: "report task",
                source: Box::new(e),
            })
        };
        let read = reader.await.map_err(joined);
        let collected = gather.await.map_err(joined)?;
        read??;
        let custody = self.custody().status();
        let ctx = Context {
            generated_at: now,
            generated_by: actor.to_string(),
            // keyd's live view belongs in a report only when the period ends now.
            current: (now.0.saturating_sub(until.0) <= 60).then(|| self.report().classes),
            custody_backend: custody.backend.clone(),
            custody_key_id: custody.key_id.clone(),
            custody_health: match &custody.health.reason {
                Some(r) => format!("{}: {r}", custody.health.state),
                None => custody.health.state.clone(),
            },
            dataplane: self.dataplane_summary()?,
            rejected_policies: self
                .rejected_policies()
                .into_iter()
                .map(|r| (r.name, r.reason))
                .collect(),
            public_key: STANDARD.encode(&public_key),
            key_id: self.signer.key_id().to_owned(),
            checkpoints: checkpoints
                .iter()
                .map(|c| {
                    (
                        CheckpointRef {
                            seq: c.seq,
                            hash: c.hash.clone(),
                            at: c.at,
                        },
                        c.verify(&public_key),
                    )
                })
                .collect(),
        };
        let report = assemble(&window, collected, ctx);
        let content = match req.format {
            ReportFormat::Json => serde_json::to_vec_pretty(&report)
                .map_err(|e| ServiceError::Invalid(format!("cannot encode the report: {e}")))?,
            ReportFormat::Html => html::render(&report).into_bytes(),
            ReportFormat::Pdf => pdf::print(
                &html::render(&report),
                self.config.report_chromium.as_deref(),
            )
            .await
            .map_err(ServiceError::PdfUnavailable)?,
        };
        let mut signature = ReportSignature {
            format: SIGNATURE_FORMAT.into(),
            report_format: req.format,
            sha256: hex::encode(Sha256::digest(&content)),
            bytes: content.len() as u64,
            generated_at: now,
            since,
            until,
            key_id: self.signer.key_id().to_owned(),
            public_key: STANDARD.encode(&public_key),
            signature: String::new(),
        };
        signature.signature = self.signer.sign_message(&signature.message());
        self.audit(AuditEvent::new(
            "report.generated",
            actor,
            json!({ "format": req.format.as_str(), "since": since, "until": until,
                    "sha256": signature.sha256, "bytes": signature.bytes,
                    "compliant": report.compliant, "findings": report.findings.len(),
                    "records_in_period": report.integrity.records_in_period }),
        ))
        .await?;
        Ok(SignedReport {
            content,
            signature,
            report,
        })
    }
}
