//! `keyd store copy`: moves a redb store into an empty etcd prefix, offline, for the move from
//! one keyd to keyd on etcd ([`crate::store::etcd`]).
//!
//! Nothing is trusted on faith, either side:
//! - before anything is written, every sealed record of the source opens under its custodian
//!   and the source's audit chain links and hashes correctly;
//! - the target must be empty (not one key under the prefix), and the copy holds the prefix's
//!   leader key while it writes, so no keyd can start leading it meanwhile; a marker key says
//!   "copy incomplete" until the last step, and keyd refuses to lead a prefix that has it;
//! - table entries are copied byte for byte, audit records with their numbers and hashes (the
//!   chain is moved, not re-chained, so exports and checkpoints signed before still verify);
//! - afterwards every entry is read back from etcd and compared, every sealed record is opened
//!   from etcd, and the chain is checked again there. The copy then appends one audit record,
//!   `store.copied`, to the target's chain.
//!
//! The source is only read (redb refuses to open a file another keyd holds: stop keyd first).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::Serialize;
use serde_json::json;

use crate::config::{Config, StoreConfig};
use crate::store::etcd::EtcdStore;
use crate::store::{AuditEvent, AuditRecord, GENESIS_HASH, RedbStore, Store, Table, Txn};

/// Audit records read per page.
const PAGE: usize = 4096;

/// What was copied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    pub from: String,
    pub to: String,
    /// Entries per table.
    pub tables: Vec<(String, usize)>,
    /// Sealed records that were opened, in the source and again in the target.
    pub sealed_records_opened: usize,
    pub audit_records: u64,
    pub audit_first_seq: Option<u64>,
    pub audit_last_seq: Option<u64>,
}

/// Checks that `records` continue the chain whose last hash is `prev` (`None` before the
/// first record, which links to the genesis hash or, after a prune, to a checkpoint).
fn check_links(prev: &mut Option<(u64, String)>, records: &[AuditRecord]) -> anyhow::Result<()> {
    for r in records {
        if r.hash != r.compute_hash() {
            bail!(
                "audit record {}: its hash does not match its contents",
                r.seq
            );
        }
        match prev {
            Some((seq, hash)) if r.seq != *seq + 1 || r.prev_hash != *hash => {
                bail!("audit record {} does not link to record {seq}", r.seq);
            }
            None if r.seq == 1 && r.prev_hash != GENESIS_HASH => {
                bail!("audit record 1 does not start the chain");
            }
            _ => {}
        }
        *prev = Some((r.seq, r.hash.clone()));
    }
    Ok(())
}

/// Copies the redb store at `from` into the etcd store that `config` names.
pub async fn copy(config: &Config, from: &Path) -> anyhow::Result<CopyReport> {
    let StoreConfig::Etcd(settings) = &config.store else {
        bail!(
            "the configuration's [store] backend is not \"etcd\": it names the copy's target \
             (set backend = \"etcd\" and [store.etcd])"
        );
    };
    if !from.is_file() {
        bail!("{}: no such store file", from.display());
    }
    let source: Arc<dyn Store> =
        Arc::new(RedbStore::open(from).with_context(|| {
            format!("opening {} (is keyd still running on it?)", from.display())
        })?);
    if crate::custody::doc::read_doc(source.as_ref())?.is_none() {
        bail!(
            "{} has no custody document: it is not a store keyd has used",
            from.display()
        );
    }
    let target = Arc::new(EtcdStore::connect(settings).context("connecting to etcd")?);
    let existing = target.count_keys()?;
    if existing > 0 && target.copy_incomplete()? {
        bail!(
            "the target {} holds an earlier `keyd store copy` that did not finish ({existing} \
             keys): delete the prefix with etcdctl (etcdctl del --prefix PREFIX) and copy again",
            target.location()
        );
    }
    if existing > 0 {
        bail!(
            "the target {} is not empty ({existing} keys under the prefix): refusing to \
             overwrite it. Copy into a new prefix ([store.etcd] prefix), or delete this one \
             deliberately with etcdctl first",
            target.location()
        );
    }
    // The source is sound before anything is written: every record opens, the chain holds.
    let custody = crate::custody::bootstrap(&config.kek, &config.custody, &source)
        .await
        .context("the source's KEK custodian")?;
    let sealed = crate::rewrap::verify_all(&source, &custody)
        .await
        .map_err(|(id, e)| anyhow::anyhow!("source record {id} does not open: {e}"))?;
    let mut prev = None;
    let mut next = 0;
    loop {
        let page = source.audit_range(next, PAGE)?;
        let Some(last) = page.last() else { break };
        next = last.seq + 1;
        check_links(&mut prev, &page).context("the source's audit chain")?;
    }
    let holder = format!("keyd store copy/{}", std::process::id());
    let (_never, stop) = tokio::sync::watch::channel(false);
    let lead = tokio::time::timeout(
        settings.timeout + Duration::from_secs(1),
        target.lead(&holder, settings.lease_ttl, |_| {}, stop),
    )
    .await
    .context("another process took the target's leader key")?
    .context("taking the target's leader key")?;
    if lead.is_none() {
        bail!("stopped before the copy began");
    }
    // Until the last step, the prefix says it is an unfinished copy: keyd refuses to lead it.
    let result = match target.set_copy_incomplete(true, &format!("from {}", from.display())) {
        Ok(()) => run(from, &source, &target, &custody, sealed).await,
        Err(e) => Err(e.into()),
    };
    let result = result.and_then(|report| {
        target.set_copy_incomplete(false, "")?;
        Ok(report)
    });
    target.resign();
    result
}

async fn run(
    from: &Path,
    source: &Arc<dyn Store>,
    target: &Arc<EtcdStore>,
    custody: &Arc<crate::custody::Custody>,
    sealed: usize,
) -> anyhow::Result<CopyReport> {
    let target_dyn: Arc<dyn Store> = Arc::clone(target) as Arc<dyn Store>;
    let mut report = CopyReport {
        from: source.describe(),
        to: target.location(),
        ..CopyReport::default()
    };
    report.sealed_records_opened = sealed;

    // 1. Tables, byte for byte, in transactions the target accepts.
    let per_txn = target.max_txn_ops().saturating_sub(1).max(1);
    for table in Table::ALL {
        let entries = source.scan(table)?;
        report.tables.push((table.name().to_owned(), entries.len()));
        for chunk in entries.chunks(per_txn) {
            let mut txn = Txn::default();
            for (k, v) in chunk {
                txn = txn
                    .guard(table, k.clone(), None)
                    .put(table, k.clone(), v.clone());
            }
            target
                .commit(txn)
                .with_context(|| format!("writing {} entries", table.name()))?;
        }
    }

    // 2. The audit chain as it is.
    let mut next = 0;
    loop {
        let page = source.audit_range(next, PAGE)?;
        let Some(last) = page.last() else { break };
        next = last.seq + 1;
        report.audit_first_seq.get_or_insert(page[0].seq);
        report.audit_last_seq = Some(last.seq);
        report.audit_records += page.len() as u64;
        for chunk in page.chunks(per_txn) {
            target
                .import_audit(chunk)
                .context("writing audit records")?;
        }
    }

    // 3. Read everything back from etcd.
    for table in Table::ALL {
        if source.scan(table)? != target.scan(table)? {
            bail!(
                "the target's {} table differs from the source's",
                table.name()
            );
        }
    }
    let mut prev = None;
    let mut next = 0;
    let mut copied = 0u64;
    loop {
        let page = target.audit_range(next, PAGE)?;
        let Some(last) = page.last() else { break };
        next = last.seq + 1;
        if page != source.audit_range(page[0].seq, page.len())? {
            bail!(
                "the target's audit records {}..={} differ",
                page[0].seq,
                last.seq
            );
        }
        check_links(&mut prev, &page).context("the target's audit chain")?;
        copied += page.len() as u64;
    }
    if copied != report.audit_records {
        bail!(
            "the target holds {copied} audit records, the source {}",
            report.audit_records
        );
    }
    let reopened = crate::rewrap::verify_all(&target_dyn, custody)
        .await
        .map_err(|(id, e)| anyhow::anyhow!("record {id} does not open from etcd: {e}"))?;
    if reopened != report.sealed_records_opened {
        bail!(
            "{reopened} sealed records open from etcd, {} from the source",
            report.sealed_records_opened
        );
    }

    // 4. The copy itself is on the record.
    target.commit(Txn::default().audit(AuditEvent::new(
        "store.copied",
        "keyd store copy",
        json!({
            "from": from.display().to_string(),
            "tables": report.tables,
            "sealed_records": report.sealed_records_opened,
            "audit_records": report.audit_records,
            "audit_last_seq": report.audit_last_seq,
        }),
    )))?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> Vec<AuditRecord> {
        let mut prev = GENESIS_HASH.to_owned();
        (1..=n)
            .map(|seq| {
                let r = AuditRecord::chain(
                    seq,
                    keyd_proto::Timestamp(seq),
                    AuditEvent::new("t", "a", json!({ "seq": seq })),
                    prev.clone(),
                );
                prev = r.hash.clone();
                r
            })
            .collect()
    }

    #[test]
    fn links_are_checked_across_pages() {
        let records = chain(6);
        let mut prev = None;
        check_links(&mut prev, &records[..3]).unwrap();
        check_links(&mut prev, &records[3..]).unwrap();
        // A gap, a changed record, a pruned start that is fine.
        let mut prev = None;
        check_links(&mut prev, &records[..2]).unwrap();
        assert!(check_links(&mut prev, &records[3..]).is_err());
        let mut changed = records.clone();
        changed[1].event.actor = "mallory".into();
        assert!(check_links(&mut None, &changed).is_err());
        check_links(&mut None, &records[2..]).unwrap();
    }
}
