//! One conformance suite for keyd's stores, run against each backend: the embedded redb file,
//! one real etcd member, and a real three-member etcd cluster (Debian's etcd-server, on
//! loopback). Each case states a property of the [`Store`] trait that keyd relies on: CAS
//! guards, all-or-nothing commits, ordered scans, the hash-chained audit log, large values,
//! concurrent writers (threads, and for etcd separate processes), and, for etcd, what happens
//! when members stop and come back.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use keyd::store::EtcdSettings;
use keyd::store::etcd::EtcdStore;
use keyd::store::etcd::Leadership;
use keyd::store::{
    AuditEvent, AuditRecord, GENESIS_HASH, RedbStore, Store, StoreError, Table, Txn,
};
use keyd_tests::etcd::EtcdCluster;
use serde_json::json;

// ---- backends -----------------------------------------------------------------------------

fn redb() -> (Box<dyn std::any::Any>, Arc<dyn Store>) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStore::open(&dir.path().join("s.redb")).unwrap();
    (Box::new(dir), Arc::new(store))
}

/// Connects, retrying while a fresh cluster elects its first leader.
fn connect(s: &EtcdSettings) -> EtcdStore {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match EtcdStore::connect(s) {
            Ok(store) => return store,
            Err(e) if Instant::now() < deadline => {
                eprintln!("etcd not ready yet: {}", keyd_mtls::error_chain(&e));
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("cannot connect to etcd: {}", keyd_mtls::error_chain(&e)),
        }
    }
}

/// A cluster shared by the cases of this process (each case writes under its own prefix);
/// its members stop when the process exits.
fn shared(members: usize) -> Option<Vec<String>> {
    static ONE: OnceLock<(tempfile::TempDir, EtcdCluster)> = OnceLock::new();
    static THREE: OnceLock<(tempfile::TempDir, EtcdCluster)> = OnceLock::new();
    if !keyd_tests::etcd::available() {
        return None;
    }
    let cell = if members == 1 { &ONE } else { &THREE };
    let (_, cluster) = cell.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let cluster = EtcdCluster::start(dir.path(), members);
        (dir, cluster)
    });
    Some(cluster.endpoints())
}

fn etcd(members: usize, case: &str) -> Option<(Box<dyn std::any::Any>, Arc<dyn Store>)> {
    let endpoints = shared(members)?;
    let store = connect(&keyd_tests::etcd::settings(
        &endpoints,
        &format!("/conformance/{case}/"),
    ));
    Some((Box::new(()), Arc::new(store)))
}

/// Runs `case` against every backend, each test named `<case>_<backend>`.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod redb_store {
            $(#[test] fn $case() { let (_keep, s) = super::redb(); super::$case(s.as_ref(), None); })*
        }
        mod etcd_one_member {
            $(#[test] fn $case() {
                if let Some((_keep, s)) = super::etcd(1, stringify!($case)) {
                    super::$case(s.as_ref(), Some(stringify!($case)));
                }
            })*
        }
        mod etcd_three_members {
            $(#[test] fn $case() {
                if let Some((_keep, s)) = super::etcd(3, stringify!($case)) {
                    super::$case(s.as_ref(), Some(stringify!($case)));
                }
            })*
        }
    };
}

conformance!(
    point_reads_writes_and_deletes,
    guards_compare_and_swap,
    a_failed_commit_writes_nothing,
    scans_are_ordered_and_per_table,
    the_audit_log_is_one_chain,
    pruning_keeps_the_chain_going,
    large_values_and_long_scans,
    concurrent_writers_serialise,
    oversized_transactions_are_refused_whole,
    whole_table_guards_on_shared_stores,
);

// ---- helpers ------------------------------------------------------------------------------

fn put(s: &dyn Store, table: Table, key: &str, value: &[u8]) {
    s.commit(Txn::default().put(table, key, value.to_vec()))
        .unwrap();
}

fn event(n: usize) -> AuditEvent {
    AuditEvent::new("test.event", "test", json!({ "n": n }))
}

/// Every record links to the one before and its hash is its own; returns how many.
fn verify_chain(records: &[AuditRecord], first_prev: &str) -> usize {
    let mut prev = first_prev.to_owned();
    for (i, r) in records.iter().enumerate() {
        if i > 0 {
            assert_eq!(r.seq, records[i - 1].seq + 1, "sequence gap at {}", r.seq);
        }
        assert_eq!(r.prev_hash, prev, "record {} does not link", r.seq);
        assert_eq!(r.hash, r.compute_hash(), "record {} hash", r.seq);
        prev = r.hash.clone();
    }
    records.len()
}

fn all_audit(s: &dyn Store) -> Vec<AuditRecord> {
    try_all_audit(s).unwrap()
}

/// The whole chain, or the first error: after members restart, a read routed to one that is
/// still catching up can time out, and the tests that restart members retry it.
fn try_all_audit(s: &dyn Store) -> Result<Vec<AuditRecord>, StoreError> {
    let mut out = Vec::new();
    let mut from = 0;
    loop {
        let page = s.audit_range(from, 1000)?;
        let Some(last) = page.last() else { break };
        from = last.seq + 1;
        out.extend(page);
    }
    Ok(out)
}

// ---- cases --------------------------------------------------------------------------------

fn point_reads_writes_and_deletes(s: &dyn Store, _: Option<&str>) {
    assert_eq!(s.get(Table::Meta, "absent").unwrap(), None);
    put(s, Table::Meta, "doc", b"one");
    assert_eq!(
        s.get(Table::Meta, "doc").unwrap().as_deref(),
        Some(&b"one"[..])
    );
    // The same key in another table is another entry.
    assert_eq!(s.get(Table::Nodes, "doc").unwrap(), None);
    put(s, Table::Meta, "doc", b"two");
    assert_eq!(
        s.get(Table::Meta, "doc").unwrap().as_deref(),
        Some(&b"two"[..])
    );
    // An empty value is a value, not an absence.
    put(s, Table::Meta, "empty", b"");
    assert_eq!(s.get(Table::Meta, "empty").unwrap(), Some(vec![]));
    s.commit(Txn::default().delete(Table::Meta, "doc")).unwrap();
    assert_eq!(s.get(Table::Meta, "doc").unwrap(), None);
    // Deleting what is absent is not an error.
    s.commit(Txn::default().delete(Table::Meta, "doc")).unwrap();
    // Keys with separators and non-ASCII text stay whole.
    for key in ["a/b", "ä-node", "node 1", "x.y:z"] {
        put(s, Table::Nodes, key, key.as_bytes());
        assert_eq!(
            s.get(Table::Nodes, key).unwrap().as_deref(),
            Some(key.as_bytes())
        );
    }
    // A put and a delete of one key in one transaction: the delete wins (puts apply first).
    s.commit(
        Txn::default()
            .put(Table::Meta, "both", b"v".to_vec())
            .delete(Table::Meta, "both"),
    )
    .unwrap();
    assert_eq!(s.get(Table::Meta, "both").unwrap(), None);
}

fn guards_compare_and_swap(s: &dyn Store, _: Option<&str>) {
    // "Absent" holds for a key never written.
    s.commit(
        Txn::default()
            .guard(Table::Meta, "k", None)
            .put(Table::Meta, "k", b"1".to_vec()),
    )
    .unwrap();
    // ... and not once it exists.
    let e = s
        .commit(
            Txn::default()
                .guard(Table::Meta, "k", None)
                .put(Table::Meta, "k", b"x".to_vec()),
        )
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { table: Table::Meta, key } if key == "k"),
        "{e:?}"
    );
    // The current value holds; a stale one does not, and the error names the key.
    s.commit(
        Txn::default()
            .guard(Table::Meta, "k", Some(b"1".to_vec()))
            .put(Table::Meta, "k", b"2".to_vec()),
    )
    .unwrap();
    let e = s
        .commit(
            Txn::default()
                .guard(Table::Meta, "k", Some(b"1".to_vec()))
                .put(Table::Meta, "k", b"3".to_vec()),
        )
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { key, .. } if key == "k"),
        "{e:?}"
    );
    assert!(!e.is_unavailable());
    assert_eq!(s.get(Table::Meta, "k").unwrap().as_deref(), Some(&b"2"[..]));
    // An empty expected value is not "absent", either way round.
    let e = s
        .commit(Txn::default().guard(Table::Meta, "never", Some(vec![])))
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    put(s, Table::Meta, "blank", b"");
    s.commit(Txn::default().guard(Table::Meta, "blank", Some(vec![])))
        .unwrap();
    let e = s
        .commit(Txn::default().guard(Table::Meta, "blank", None))
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    // With several guards, the one that fails is named.
    put(s, Table::Nodes, "n1", b"a");
    let e = s
        .commit(
            Txn::default()
                .guard(Table::Meta, "k", Some(b"2".to_vec()))
                .guard(Table::Nodes, "n1", Some(b"stale".to_vec()))
                .put(Table::Meta, "k", b"4".to_vec()),
        )
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { table: Table::Nodes, key } if key == "n1"),
        "{e:?}"
    );
}

fn a_failed_commit_writes_nothing(s: &dyn Store, _: Option<&str>) {
    put(s, Table::Meta, "guard", b"current");
    put(s, Table::Nodes, "keep", b"kept");
    let before = s.audit_last().unwrap();
    let e = s
        .commit(
            Txn::default()
                .guard(Table::Meta, "guard", Some(b"stale".to_vec()))
                .put(Table::Sealed, "new", b"sealed".to_vec())
                .put(Table::Meta, "guard", b"changed".to_vec())
                .delete(Table::Nodes, "keep")
                .audit(event(1)),
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict { .. }), "{e:?}");
    assert_eq!(s.get(Table::Sealed, "new").unwrap(), None);
    assert_eq!(
        s.get(Table::Meta, "guard").unwrap().as_deref(),
        Some(&b"current"[..])
    );
    assert_eq!(
        s.get(Table::Nodes, "keep").unwrap().as_deref(),
        Some(&b"kept"[..])
    );
    assert_eq!(
        s.audit_last().unwrap(),
        before,
        "no audit record for a failed commit"
    );
    // The same transaction with a true guard applies every part of it.
    s.commit(
        Txn::default()
            .guard(Table::Meta, "guard", Some(b"current".to_vec()))
            .put(Table::Sealed, "new", b"sealed".to_vec())
            .put(Table::Meta, "guard", b"changed".to_vec())
            .delete(Table::Nodes, "keep")
            .audit(event(1)),
    )
    .unwrap();
    assert_eq!(
        s.get(Table::Sealed, "new").unwrap().as_deref(),
        Some(&b"sealed"[..])
    );
    assert_eq!(s.get(Table::Nodes, "keep").unwrap(), None);
    let last = s.audit_last().unwrap().unwrap();
    assert_eq!(last.event, event(1));
}

fn scans_are_ordered_and_per_table(s: &dyn Store, _: Option<&str>) {
    assert!(s.scan(Table::Checkpoints).unwrap().is_empty());
    assert_eq!(s.last(Table::Checkpoints).unwrap(), None);
    let keys = ["b", "a", "c", "a0", "ab", "B"];
    let mut txn = Txn::default();
    for k in keys {
        txn = txn.put(Table::Checkpoints, k, k.as_bytes().to_vec());
    }
    s.commit(txn.put(Table::Dataplane, "zz", b"other table".to_vec()))
        .unwrap();
    let scanned: Vec<String> = s
        .scan(Table::Checkpoints)
        .unwrap()
        .into_iter()
        .map(|(k, v)| {
            assert_eq!(k.as_bytes(), v.as_slice());
            k
        })
        .collect();
    let mut sorted: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
    sorted.sort(); // byte order: "B" < "a" < "a0" < "ab" < "b" < "c"
    assert_eq!(scanned, sorted);
    let from: Vec<String> = s
        .scan_from(Table::Checkpoints, "a0", 3)
        .unwrap()
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(from, ["a0", "ab", "b"]);
    assert!(s.scan_from(Table::Checkpoints, "d", 10).unwrap().is_empty());
    assert_eq!(s.last(Table::Checkpoints).unwrap().unwrap().0, "c");
    assert_eq!(s.last(Table::Dataplane).unwrap().unwrap().0, "zz");
}

fn the_audit_log_is_one_chain(s: &dyn Store, _: Option<&str>) {
    assert_eq!(s.audit_last().unwrap(), None);
    assert!(s.audit_range(0, 10).unwrap().is_empty());
    s.commit(Txn::default().audit(event(1))).unwrap();
    s.commit(Txn::default().audit(event(2)).audit(event(3)).put(
        Table::Meta,
        "with",
        b"records".to_vec(),
    ))
    .unwrap();
    let records = all_audit(s);
    assert_eq!(records.iter().map(|r| r.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(verify_chain(&records, GENESIS_HASH), 3);
    assert_eq!(records[2].event, event(3));
    assert_eq!(s.audit_last().unwrap().unwrap(), records[2]);
    // The time stamped is the transaction's.
    let at = keyd_proto::Timestamp(1_700_000_000);
    s.commit(Txn {
        at: Some(at),
        ..Txn::default().audit(event(4))
    })
    .unwrap();
    assert_eq!(s.audit_last().unwrap().unwrap().at, at);
    // Ranges start where asked and stop at the limit.
    let mid = s.audit_range(2, 2).unwrap();
    assert_eq!(mid.iter().map(|r| r.seq).collect::<Vec<_>>(), [2, 3]);
}

fn pruning_keeps_the_chain_going(s: &dyn Store, _: Option<&str>) {
    for n in 0..10 {
        s.commit(Txn::default().audit(event(n))).unwrap();
    }
    let before = all_audit(s);
    // At most `limit` at a time, oldest first.
    assert_eq!(s.audit_delete_through(6, 4).unwrap(), 4);
    assert_eq!(all_audit(s).first().unwrap().seq, 5);
    assert_eq!(s.audit_delete_through(6, 100).unwrap(), 2);
    assert_eq!(s.audit_delete_through(6, 100).unwrap(), 0);
    let kept = all_audit(s);
    assert_eq!(kept.first().unwrap().seq, 7);
    // What is left still links to what was pruned, and appends continue the sequence.
    assert_eq!(kept[0].prev_hash, before[5].hash);
    s.commit(Txn::default().audit(event(99))).unwrap();
    let after = all_audit(s);
    assert_eq!(after.last().unwrap().seq, 11);
    verify_chain(&after, &before[5].hash);
}

fn large_values_and_long_scans(s: &dyn Store, _: Option<&str>) {
    // One large value: 1 MiB (etcd's default request limit is 1.5 MiB).
    let big: Vec<u8> = (0..1024 * 1024).map(|i| (i % 251) as u8).collect();
    put(s, Table::Sealed, "big", &big);
    assert_eq!(s.get(Table::Sealed, "big").unwrap().unwrap(), big);
    // More entries than one page of a paged scan, written in transactions the store accepts.
    let n = 1500;
    let per = s.max_txn_ops().min(100);
    let keys: Vec<String> = (0..n).map(|i| format!("node-{i:05}")).collect();
    for chunk in keys.chunks(per) {
        let mut txn = Txn::default();
        for k in chunk {
            txn = txn.put(Table::Nodes, k.clone(), vec![b'v'; 300]);
        }
        s.commit(txn).unwrap();
    }
    let scanned = s.scan(Table::Nodes).unwrap();
    assert_eq!(scanned.len(), n);
    assert!(
        scanned.windows(2).all(|w| w[0].0 < w[1].0),
        "scan out of order"
    );
    assert_eq!(
        scanned.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        keys
    );
    let tail = s.scan_from(Table::Nodes, "node-01000", usize::MAX).unwrap();
    assert_eq!(tail.len(), 500);
    assert_eq!(s.last(Table::Nodes).unwrap().unwrap().0, "node-01499");
    // Many audit records across pages.
    for chunk in (0..1200).collect::<Vec<_>>().chunks(per) {
        let mut txn = Txn::default();
        for n in chunk {
            txn = txn.audit(event(*n));
        }
        s.commit(txn).unwrap();
    }
    assert_eq!(verify_chain(&all_audit(s), GENESIS_HASH), 1200);
}

/// Increments a counter `n` times under CAS, retrying conflicts, each increment audited.
fn increment(s: &dyn Store, writer: &str, n: usize) -> Vec<u64> {
    let mut acknowledged = Vec::new();
    for i in 0..n {
        loop {
            let current = s.get(Table::Meta, "counter").unwrap();
            let value: u64 = current
                .as_deref()
                .map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
            let next = value + 1;
            let txn = Txn::default()
                .guard(Table::Meta, "counter", current)
                .put(Table::Meta, "counter", next.to_string().into_bytes())
                .put(
                    Table::Nodes,
                    format!("{writer}-{i}"),
                    next.to_string().into_bytes(),
                )
                .audit(AuditEvent::new(
                    "test.increment",
                    writer,
                    json!({ "to": next }),
                ));
            match s.commit(txn) {
                Ok(()) => {
                    acknowledged.push(next);
                    break;
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(e) => panic!("{writer}: {}", keyd_mtls::error_chain(&e)),
            }
        }
    }
    acknowledged
}

/// Checks the outcome of concurrent increments: every acknowledged value once, in one chain.
fn check_increments(s: &dyn Store, writers: &[String], per_writer: usize) {
    let total = (writers.len() * per_writer) as u64;
    let counter = s.get(Table::Meta, "counter").unwrap().unwrap();
    assert_eq!(std::str::from_utf8(&counter).unwrap(), total.to_string());
    // Every acknowledged write is there, and no value was handed out twice.
    let mut values = BTreeSet::new();
    for w in writers {
        for i in 0..per_writer {
            let v = s.get(Table::Nodes, &format!("{w}-{i}")).unwrap();
            let v = v.unwrap_or_else(|| panic!("acknowledged write {w}-{i} is missing"));
            assert!(
                values.insert(String::from_utf8(v).unwrap()),
                "a value was handed out twice"
            );
        }
    }
    assert_eq!(values.len() as u64, total);
    let records = all_audit(s);
    assert_eq!(verify_chain(&records, GENESIS_HASH) as u64, total);
    // The chain orders the increments as the counter did.
    for (i, r) in records.iter().enumerate() {
        assert_eq!(r.event.details["to"], json!(i as u64 + 1));
    }
}

fn concurrent_writers_serialise(s: &dyn Store, case: Option<&str>) {
    let per_writer = 25;
    let writers: Vec<String> = (0..4).map(|i| format!("thread-{i}")).collect();
    std::thread::scope(|scope| {
        for w in &writers {
            scope.spawn(move || increment(s, w, per_writer));
        }
    });
    check_increments(s, &writers, per_writer);
    // Writers that share nothing but the audit log: no guard conflicts, so only the log's head
    // orders them; every acknowledged record is in the one chain, once.
    let before = all_audit(s).len();
    std::thread::scope(|scope| {
        for w in &writers {
            scope.spawn(move || {
                for i in 0..per_writer {
                    s.commit(
                        Txn::default()
                            .put(Table::Dataplane, format!("{w}-{i}"), b"x".to_vec())
                            .audit(AuditEvent::new("test.disjoint", w, json!({ "i": i }))),
                    )
                    .unwrap();
                }
            });
        }
    });
    let records = all_audit(s);
    assert_eq!(
        verify_chain(&records, GENESIS_HASH),
        before + writers.len() * per_writer
    );
    let mut seen = BTreeSet::new();
    for r in &records[before..] {
        assert!(seen.insert((r.event.actor.clone(), r.event.details["i"].to_string())));
    }
    assert_eq!(
        s.scan(Table::Dataplane).unwrap().len(),
        writers.len() * per_writer
    );
    // etcd is shared by processes, too: three more processes write to the same keys.
    if let Some(case) = case {
        let endpoints = endpoints_of(s);
        let prefix = format!("/conformance/{case}-processes/");
        let children: Vec<_> = (0..3)
            .map(|i| {
                std::process::Command::new(std::env::current_exe().unwrap())
                    .args(["--exact", "writer_process", "--ignored", "--nocapture"])
                    .env("STORE_TEST_ENDPOINTS", endpoints.join(","))
                    .env("STORE_TEST_PREFIX", &prefix)
                    .env("STORE_TEST_WRITER", format!("process-{i}"))
                    .env("STORE_TEST_COUNT", per_writer.to_string())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success(), "a writer process failed");
        }
        let store = connect(&keyd_tests::etcd::settings(&endpoints, &prefix));
        let names: Vec<String> = (0..3).map(|i| format!("process-{i}")).collect();
        check_increments(&store, &names, per_writer);
    }
}

/// The endpoints of an etcd store, from its description (`etcd:URL,URL/prefix/`).
fn endpoints_of(s: &dyn Store) -> Vec<String> {
    let d = s.describe();
    let rest = d.strip_prefix("etcd:").expect("an etcd store");
    let urls = &rest[..rest.find("/conformance").unwrap()];
    urls.split(',').map(str::to_owned).collect()
}

/// One writer process of `concurrent_writers_serialise` (run only by it).
#[test]
#[ignore = "run by concurrent_writers_serialise as a separate process"]
fn writer_process() {
    let var = |k: &str| std::env::var(k).unwrap_or_else(|_| panic!("{k} not set"));
    let endpoints: Vec<String> = var("STORE_TEST_ENDPOINTS")
        .split(',')
        .map(str::to_owned)
        .collect();
    let store = connect(&keyd_tests::etcd::settings(
        &endpoints,
        &var("STORE_TEST_PREFIX"),
    ));
    let n: usize = var("STORE_TEST_COUNT").parse().unwrap();
    let acked = increment(&store, &var("STORE_TEST_WRITER"), n);
    assert_eq!(acked.len(), n);
}

/// `unchanged_since`: on a shared store a transaction fails whole when any entry of the table
/// was written after the revision (a decision read from the whole table is stale); other
/// tables and deletions do not count. A store with one writer ignores it (its callers decide
/// and write under one lock).
fn whole_table_guards_on_shared_stores(s: &dyn Store, _: Option<&str>) {
    let r1 = s
        .commit_at(Txn::default().put(Table::Nodes, "a", b"1".to_vec()))
        .unwrap();
    if !s.shared() {
        assert_eq!(r1, None);
        s.commit(
            Txn::default()
                .unchanged_since(Table::Nodes, "", Some(0))
                .put(Table::Nodes, "b", b"1".to_vec()),
        )
        .unwrap();
        return;
    }
    let r1 = r1.expect("a shared store names the revision of a commit");
    // Nothing written since: taken.
    let r2 = s
        .commit_at(
            Txn::default()
                .unchanged_since(Table::Nodes, "", Some(r1))
                .put(Table::Nodes, "b", b"1".to_vec()),
        )
        .unwrap()
        .unwrap();
    // Written since (by the commit above): refused whole, audit record included.
    let before = all_audit(s).len();
    let e = s
        .commit(
            Txn::default()
                .unchanged_since(Table::Nodes, "", Some(r1))
                .put(Table::Meta, "x", b"1".to_vec())
                .audit(event(1)),
        )
        .unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { table: Table::Nodes, key } if key == "*"),
        "{e:?}"
    );
    assert_eq!(s.get(Table::Meta, "x").unwrap(), None);
    assert_eq!(all_audit(s).len(), before);
    // Another table's writes do not count, nor does a deletion.
    let r3 = s
        .commit_at(Txn::default().put(Table::Meta, "y", b"1".to_vec()))
        .unwrap()
        .unwrap();
    assert!(r3 > r2);
    s.commit(
        Txn::default()
            .unchanged_since(Table::Nodes, "", Some(r2))
            .put(Table::Meta, "z", b"1".to_vec()),
    )
    .unwrap();
    s.commit(Txn::default().delete(Table::Nodes, "a")).unwrap();
    s.commit(
        Txn::default()
            .unchanged_since(Table::Nodes, "", Some(r2))
            .put(Table::Nodes, "c", b"1".to_vec()),
    )
    .unwrap();
    assert_eq!(
        s.get(Table::Nodes, "c").unwrap().as_deref(),
        Some(&b"1"[..])
    );
    // A prefix narrows the range: Meta "y" and "z" were written since r2, "mark..." was not.
    let narrowed = |r| {
        Txn::default()
            .unchanged_since(Table::Meta, "mark", Some(r))
            .put(Table::Meta, "mark", b"1".to_vec())
    };
    let r4 = s.commit_at(narrowed(r2)).unwrap().unwrap();
    let e = s.commit(narrowed(r2)).unwrap_err();
    assert!(
        matches!(&e, StoreError::Conflict { table: Table::Meta, key } if key == "mark*"),
        "{e:?}"
    );
    s.commit(narrowed(r4)).unwrap();
}

fn oversized_transactions_are_refused_whole(s: &dyn Store, _: Option<&str>) {
    let max = s.max_txn_ops();
    if max == usize::MAX {
        return; // redb takes any size: nothing to refuse
    }
    // The most a caller may put in one transaction is accepted by the real server: as many
    // guards as writes, and as many audit records (the store adds the head and the fence).
    let mut txn = Txn::default();
    for i in 0..max {
        txn = txn.guard(Table::Nodes, format!("full-{i:03}"), None).put(
            Table::Nodes,
            format!("full-{i:03}"),
            b"v".to_vec(),
        );
    }
    s.commit(txn).unwrap();
    let mut txn = Txn::default();
    for n in 0..max {
        txn = txn.audit(event(n));
    }
    s.commit(txn).unwrap();
    // More than etcd takes is refused whole, naming the setting.
    let mut txn = Txn::default();
    for i in 0..max + 3 {
        txn = txn.put(Table::Nodes, format!("over-{i}"), b"v".to_vec());
    }
    let e = s.commit(txn).unwrap_err();
    assert!(
        keyd_mtls::error_chain(&e).contains("max_txn_ops"),
        "{}",
        keyd_mtls::error_chain(&e)
    );
    assert!(s.scan_from(Table::Nodes, "over-", 1).unwrap().is_empty());
}

// ---- etcd outages ---------------------------------------------------------------------------

fn own_cluster(dir: &Path, members: usize) -> Option<EtcdCluster> {
    keyd_tests::etcd::available().then(|| EtcdCluster::start(dir, members))
}

/// Retries `f` until it succeeds or `within` passes.
fn eventually<T>(within: Duration, mut f: impl FnMut() -> Result<T, StoreError>) -> T {
    let deadline = Instant::now() + within;
    loop {
        match f() {
            Ok(v) => return v,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {}", keyd_mtls::error_chain(&e));
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => panic!("still failing: {}", keyd_mtls::error_chain(&e)),
        }
    }
}

#[test]
fn etcd_down_fails_fast_as_unavailable_and_recovers_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut cluster) = own_cluster(dir.path(), 1) else {
        return;
    };
    let store = connect(&keyd_tests::etcd::settings(
        &cluster.endpoints(),
        "/outage/",
    ));
    put(&store, Table::Meta, "before", b"1");
    store.commit(Txn::default().audit(event(1))).unwrap();
    cluster.stop(0);
    let started = Instant::now();
    let e = store.commit(
        Txn::default()
            .put(Table::Meta, "during", b"2".to_vec())
            .audit(event(2)),
    );
    let e = e.unwrap_err();
    assert!(e.is_unavailable() && e.is_unreachable(), "{e:?}");
    // Bounded by the configured timeout (3 s), not hanging.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    let e = store.get(Table::Meta, "before").unwrap_err();
    assert!(e.is_unavailable(), "{e:?}");
    cluster.restart(0);
    // The same store object reconnects; what was acknowledged is there, the failed write not.
    let v = eventually(Duration::from_secs(30), || store.get(Table::Meta, "before"));
    assert_eq!(v.as_deref(), Some(&b"1"[..]));
    assert_eq!(store.get(Table::Meta, "during").unwrap(), None);
    store.commit(Txn::default().audit(event(3))).unwrap();
    let records = eventually(Duration::from_secs(30), || try_all_audit(&store));
    assert_eq!(verify_chain(&records, GENESIS_HASH), 2);
}

#[test]
fn three_members_write_with_one_down_and_refuse_with_two() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut cluster) = own_cluster(dir.path(), 3) else {
        return;
    };
    let store = connect(&keyd_tests::etcd::settings(
        &cluster.endpoints(),
        "/quorum/",
    ));
    put(&store, Table::Meta, "k", b"0");
    // One member of three down: a quorum remains, writes go on.
    cluster.stop(2);
    // Guarded, so a retry after a timeout that did apply conflicts instead of applying twice.
    let set = |from: &[u8], to: &[u8], n: usize| match store.commit(
        Txn::default()
            .guard(Table::Meta, "k", Some(from.to_vec()))
            .put(Table::Meta, "k", to.to_vec())
            .audit(event(n)),
    ) {
        Err(StoreError::Conflict { .. })
            if store.get(Table::Meta, "k").ok().flatten().as_deref() == Some(to) =>
        {
            Ok(())
        }
        other => other,
    };
    eventually(Duration::from_secs(20), || set(b"0", b"1", 1));
    // Two down: no quorum. Once the last member knows it has no leader (reads refuse), a write
    // is refused before it is proposed, so it can never appear later. (A write that times out
    // while a leader still believes in its quorum is undecided until the cluster is back.)
    cluster.stop(1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.get(Table::Meta, "k").is_ok() {
        assert!(
            Instant::now() < deadline,
            "reads still served without quorum"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let e = store
        .commit(
            Txn::default()
                .put(Table::Meta, "k", b"2".to_vec())
                .audit(event(2)),
        )
        .unwrap_err();
    assert!(e.is_unavailable(), "{}", keyd_mtls::error_chain(&e));
    // Both come back: writes resume, and only the acknowledged ones are there.
    cluster.restart(1);
    cluster.restart(2);
    let v = eventually(Duration::from_secs(30), || store.get(Table::Meta, "k"));
    assert_eq!(v.as_deref(), Some(&b"1"[..]));
    eventually(Duration::from_secs(30), || set(b"1", b"3", 3));
    let records = eventually(Duration::from_secs(30), || try_all_audit(&store));
    assert_eq!(
        records
            .iter()
            .map(|r| r.event.details["n"].clone())
            .collect::<Vec<_>>(),
        [json!(1), json!(3)]
    );
    verify_chain(&records, GENESIS_HASH);
}

// ---- leadership -----------------------------------------------------------------------------

/// Two keyd on one etcd prefix: one leads, the other waits; the leader's writes carry its lease,
/// so once the lease is gone (here revoked, as its expiry would) a write of the old leader fails
/// whole as `Deposed` and the waiting process takes over.
#[test]
fn one_leader_at_a_time_and_a_deposed_leader_cannot_write() {
    let dir = tempfile::tempdir().unwrap();
    let Some(cluster) = own_cluster(dir.path(), 1) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = keyd_tests::etcd::settings(&cluster.endpoints(), "/lead/");
    let a = Arc::new(connect(&s));
    let b = Arc::new(connect(&s));
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let led_a: Leadership = rt
        .block_on(a.lead("keyd-a", Duration::from_secs(4), |_| {}, stop.clone()))
        .unwrap()
        .unwrap();
    assert_eq!(rt.block_on(b.leader()).unwrap().as_deref(), Some("keyd-a"));
    a.commit(
        Txn::default()
            .put(Table::Meta, "by", b"a".to_vec())
            .audit(event(1)),
    )
    .unwrap();
    // A leader's largest transaction (with its fence) is one the real server accepts.
    let mut full = Txn::default();
    for i in 0..a.max_txn_ops() {
        full = full.guard(Table::Nodes, format!("n{i:03}"), None).put(
            Table::Nodes,
            format!("n{i:03}"),
            b"v".to_vec(),
        );
    }
    a.commit(full).unwrap();
    // b waits while a leads, naming a.
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let b_task = {
        let (b, seen, stop) = (Arc::clone(&b), Arc::clone(&seen), stop.clone());
        rt.spawn(async move {
            b.lead(
                "keyd-b",
                Duration::from_secs(2),
                move |h| seen.lock().unwrap().push(h.to_owned()),
                stop,
            )
            .await
        })
    };
    std::thread::sleep(Duration::from_millis(800));
    assert!(!b_task.is_finished(), "b must not lead while a does");
    assert_eq!(seen.lock().unwrap().as_slice(), ["keyd-a"]);
    // a's lease ends as an expiry would end it: etcd deletes the leader key.
    a.resign_for_test();
    let started = Instant::now();
    let led_b = rt.block_on(b_task).unwrap().unwrap().unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(led_b.holder, "keyd-b");
    // a's next write is refused whole, and a knows it lost.
    let e = a
        .commit(
            Txn::default()
                .put(Table::Meta, "by", b"stale-a".to_vec())
                .audit(event(2)),
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::Deposed { .. }), "{e:?}");
    assert!(led_a.lost.borrow().is_some());
    assert!(a.audit_delete_through(1, 10).is_err());
    assert_eq!(
        b.get(Table::Meta, "by").unwrap().as_deref(),
        Some(&b"a"[..])
    );
    b.commit(
        Txn::default()
            .put(Table::Meta, "by", b"b".to_vec())
            .audit(event(3)),
    )
    .unwrap();
    let records = all_audit(b.as_ref());
    assert_eq!(verify_chain(&records, GENESIS_HASH), 2);
    assert!(led_b.lost.borrow().is_none());
}

/// A leader cut off from etcd gives leadership up by itself within two thirds of its lease,
/// before etcd can expire the lease and let another process lead.
#[test]
fn a_leader_that_cannot_renew_its_lease_steps_down_before_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut cluster) = own_cluster(dir.path(), 1) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = keyd_tests::etcd::settings(&cluster.endpoints(), "/stepdown/");
    let a = Arc::new(connect(&s));
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let led = rt
        .block_on(a.lead("keyd-a", Duration::from_secs(3), |_| {}, stop))
        .unwrap()
        .unwrap();
    let cut = Instant::now();
    cluster.stop(0);
    let mut lost = led.lost.clone();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(5), lost.wait_for(Option::is_some))
            .await
            .expect("the leader did not step down")
            .unwrap();
    });
    let after = cut.elapsed();
    // The last renewal answered was sent at most a third of the TTL (1 s) before the cut, and
    // etcd expires the lease a full TTL after it at the earliest: stepping down within two
    // thirds of the TTL of the cut (plus one retry) is before any expiry.
    assert!(
        after < Duration::from_millis(2000 + 300),
        "stepped down only after {after:?}"
    );
    eprintln!(
        "stepped down {after:?} after etcd went away: {:?}",
        led.lost.borrow()
    );
}

/// A leader whose etcd member restarts quickly renews on the new connection and stays leader:
/// one failed renewal is retried, not fatal.
#[test]
fn a_leader_rides_out_a_short_etcd_restart() {
    let dir = tempfile::tempdir().unwrap();
    let Some(mut cluster) = own_cluster(dir.path(), 1) else {
        return;
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let s = keyd_tests::etcd::settings(&cluster.endpoints(), "/blip/");
    let a = Arc::new(connect(&s));
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);
    let ttl = Duration::from_secs(6);
    let led = rt
        .block_on(a.lead("keyd-a", ttl, |_| {}, stop))
        .unwrap()
        .unwrap();
    cluster.stop(0);
    cluster.restart(0);
    // Longer than the lease: only renewals on the new connection keep it.
    std::thread::sleep(ttl + Duration::from_secs(1));
    assert!(led.lost.borrow().is_none(), "lost: {:?}", led.lost.borrow());
    eventually(Duration::from_secs(10), || {
        a.commit(Txn::default().put(Table::Meta, "still", b"leading".to_vec()))
    });
    assert_eq!(rt.block_on(a.leader()).unwrap().as_deref(), Some("keyd-a"));
}
