//! Benchmarks for the audit log and rollouts (a load generator, not a timed test).
//!
//! `cargo bench -p keyd --bench audit -- [append] [export] [fleet] [report]` (all by default).
//!
//! - append: durable audit appends (acknowledged = committed with fsync), one record per
//!   transaction (the baseline) against group commit with many concurrent writers.
//! - export: 1,000,000 records exported as JSON lines through keyd's streaming export, then
//!   verified with the offline verifier.
//! - fleet: 1,000 in-process nodes that long-poll their bundles, program what they get and
//!   acknowledge, through a full IPsec rollout; the time from rotate to retired, and a check
//!   after every node step that no two nodes ever lack a key that both hold.
//! - report: the evidence report over 100,000 and 1,000,000 records (mostly admission
//!   decisions, over 30 days): its time, and keyd's resident memory growth while it runs
//!   beside the same growth during an export of the same records (the baseline: the store's
//!   reads alone), to show the report's memory does not grow with the record count.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    missing_debug_implementations
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use keyd::audit::AuditWriter;
use keyd::clock::Clock;
use keyd::seal::{Key256, KeyWrapper, LocalKek};
use keyd::service::{Keyd, ServiceConfig};
use keyd::store::{AuditEvent, RedbStore, Store, Txn};
use keyd_proto::identity::Identity;
use keyd_proto::{Ack, KeyClass, NodeBundle, NodeRegistration, ScheduleUpdate};
use serde_json::json;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let want = |s: &str| args.is_empty() || args.iter().any(|a| a == s);
    if let Ok(filter) = std::env::var("BENCH_LOG") {
        keyd_mtls::ops::init_logging(keyd_mtls::ops::LogFormat::Text, &filter);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if want("append") {
        rt.block_on(append());
    }
    if want("export") {
        rt.block_on(export_and_verify());
    }
    if want("fleet") {
        rt.block_on(fleet());
    }
    if want("report") {
        rt.block_on(report());
    }
}

fn event(i: u64) -> AuditEvent {
    AuditEvent::new(
        "bundle.fetched",
        "node/bench-0001",
        json!({ "node": "bench-0001", "revision": format!("{i:024x}"), "ipsec_spis": [3, 4] }),
    )
}

async fn append() {
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("a.redb")).unwrap());

    // Baseline: one durable transaction per record.
    let s = Arc::clone(&store);
    let (n, secs) = tokio::task::spawn_blocking(move || {
        let start = Instant::now();
        let mut n = 0u64;
        while start.elapsed() < Duration::from_secs(3) {
            s.commit(Txn::default().audit(event(n))).unwrap();
            n += 1;
        }
        (n, start.elapsed().as_secs_f64())
    })
    .await
    .unwrap();
    println!(
        "append  one record per commit (baseline): {:>9.0} records/s  ({n} records)",
        n as f64 / secs
    );

    // Group commit: many concurrent writers share each durable transaction.
    let writer = AuditWriter::spawn(Arc::clone(&store), Clock::default());
    let writers = 1024;
    let run_for = Duration::from_secs(5);
    let start = Instant::now();
    let latencies = Arc::new(Mutex::new(Vec::new()));
    let mut tasks = Vec::new();
    for w in 0..writers {
        let writer = writer.clone();
        let latencies = Arc::clone(&latencies);
        tasks.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            let mut i = 0u64;
            while start.elapsed() < run_for {
                let t = Instant::now();
                writer.append(event(w * 1_000_000 + i)).await.unwrap();
                mine.push(t.elapsed());
                i += 1;
            }
            latencies.lock().unwrap().extend(mine);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let mut l = std::mem::take(&mut *latencies.lock().unwrap());
    l.sort();
    let n = l.len();
    let p = |q: f64| l[((n as f64 * q) as usize).min(n - 1)];
    println!(
        "append  group commit, {writers} writers:        {:>9.0} records/s  ({n} records; append latency p50 {:?} p99 {:?})",
        n as f64 / secs,
        p(0.5),
        p(0.99)
    );
    // The chain is intact after the run.
    let tail = store.audit_last().unwrap().unwrap();
    println!(
        "append  log tail seq {} (chain checked on export below)",
        tail.seq
    );
}

async fn export_and_verify() {
    const N: u64 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("e.redb")).unwrap());
    let started = Instant::now();
    fill(&store, N, event, |_| None).await;
    println!(
        "export  filled {N} records in {:.1?} (10,000 per transaction)",
        started.elapsed()
    );
    let wrapper: Arc<dyn KeyWrapper> = Arc::new(LocalKek::from_key(
        Key256::random().unwrap(),
        dir.path().join("kek"),
    ));
    let keyd = Keyd::open(
        Arc::clone(&store),
        wrapper,
        ServiceConfig::default(),
        Clock::default(),
    )
    .await
    .unwrap();
    let admin = Identity::Admin("bench".into());

    let start = Instant::now();
    let mut export = keyd
        .export_audit(
            &admin,
            keyd::service::ExportRange::default(),
            keyd::audit::Format::Jsonl,
        )
        .await
        .unwrap();
    let mut bytes = Vec::with_capacity(400 << 20);
    while let Some(chunk) = export.chunks.recv().await {
        bytes.extend_from_slice(&chunk.unwrap());
    }
    let export_time = start.elapsed();
    println!(
        "export  {} records, {:.0} MB as JSON lines in {:.2?} ({:.0} records/s)  target < 10 s",
        export.records,
        bytes.len() as f64 / 1e6,
        export_time,
        export.records as f64 / export_time.as_secs_f64()
    );

    let (key, _) = keyd.audit_public_key();
    let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, key).unwrap();
    let start = Instant::now();
    let report = tokio::task::spawn_blocking(move || keyd::audit::verify(&bytes[..], Some(&key)))
        .await
        .unwrap()
        .unwrap();
    let verify_time = start.elapsed();
    println!(
        "verify  {} records, {} checkpoints in {:.2?} ({:.0} records/s)  target < 10 s",
        report.records,
        report.checkpoints,
        verify_time,
        report.records as f64 / verify_time.as_secs_f64()
    );
}

/// One simulated node's kernel: the SPIs it holds and the one it sends with.
#[derive(Default, Clone)]
struct Kernel {
    installed: Vec<u8>,
    outbound: Option<u8>,
}

async fn fleet() {
    let nodes_n: usize = std::env::var("FLEET_NODES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let dir = tempfile::tempdir().unwrap();
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("f.redb")).unwrap());
    let wrapper: Arc<dyn KeyWrapper> = Arc::new(LocalKek::from_key(
        Key256::random().unwrap(),
        dir.path().join("kek"),
    ));
    let keyd = Arc::new(
        Keyd::open(store, wrapper, ServiceConfig::default(), Clock::default())
            .await
            .unwrap(),
    );
    let admin = Identity::Admin("bench".into());
    // Overlap 0: the measured time is the rollout's own (acknowledgements), not a timer.
    keyd.update_schedule(
        &admin,
        KeyClass::Ipsec,
        ScheduleUpdate {
            overlap: Some(Duration::ZERO),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    keyd.rotate_ipsec(&admin, Default::default()).await.unwrap();
    let names: Vec<String> = (0..nodes_n).map(|i| format!("bench-{i:04}")).collect();
    let setup = Instant::now();
    for (i, name) in names.iter().enumerate() {
        let reg = NodeRegistration {
            endpoint: format!("10.{}.{}.1", i / 250, i % 250).parse().unwrap(),
            pod_cidrs: vec![],
            wireguard_public_key: None,
            wireguard_key_epoch: None,
            boot_id: None,
        };
        keyd.register_node(&Identity::Node(name.clone()), name, reg)
            .await
            .unwrap();
    }
    println!(
        "fleet   registered {nodes_n} nodes in {:.1?}",
        setup.elapsed()
    );

    let kernels: Arc<Mutex<HashMap<String, Kernel>>> = Arc::new(Mutex::new(HashMap::new()));
    let violations = Arc::new(Mutex::new(0u64));
    let mut tasks = Vec::new();
    for name in names.clone() {
        let keyd = Arc::clone(&keyd);
        let kernels = Arc::clone(&kernels);
        let violations = Arc::clone(&violations);
        tasks.push(tokio::spawn(async move {
            let id = Identity::Node(name.clone());
            let mut etag = String::new();
            loop {
                let b = match keyd
                    .bundle_wait(&name, &etag, Duration::from_secs(30))
                    .await
                {
                    Ok(b) => b,
                    Err(e) => panic!("{name}: bundle: {e}"),
                };
                let Some(b) = b else { continue };
                etag = b.etag.clone();
                let body: NodeBundle = serde_json::from_slice(&b.body()).unwrap();
                let ipsec = body.ipsec.unwrap();
                let keys: Vec<u8> = ipsec.keys.iter().map(|k| k.spi).collect();
                // Program like node-shim: install new states, switch outbound, remove old ones;
                // check the fleet-wide invariant after each step.
                let step = |f: &dyn Fn(&mut Kernel)| {
                    let mut all = kernels.lock().unwrap();
                    f(all.entry(name.clone()).or_default());
                    let me = all[&name].clone();
                    let mut bad = 0;
                    for (other, k) in all.iter() {
                        if *other == name {
                            continue;
                        }
                        if me.outbound.is_some_and(|o| !k.installed.contains(&o)) {
                            bad += 1;
                        }
                        if k.outbound.is_some_and(|o| !me.installed.contains(&o)) {
                            bad += 1;
                        }
                    }
                    *violations.lock().unwrap() += bad;
                };
                step(&|k| {
                    for s in &keys {
                        if !k.installed.contains(s) {
                            k.installed.push(*s);
                        }
                    }
                });
                step(&|k| k.outbound = Some(ipsec.outbound_spi));
                step(&|k| k.installed.retain(|s| keys.contains(s)));
                let ack = Ack {
                    ipsec_spis: keys.clone(),
                    ipsec_outbound_spi: Some(ipsec.outbound_spi),
                    wireguard_epoch: None,
                };
                if let Err(e) = keyd.ack(&id, &name, ack).await {
                    panic!("{name}: ack: {e}");
                }
            }
        }));
    }
    // Let every node program key 1 first.
    let waited = Instant::now();
    let mut last_print = Instant::now();
    while kernels
        .lock()
        .unwrap()
        .values()
        .filter(|k| k.outbound == Some(1))
        .count()
        < nodes_n
    {
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "  {} nodes programmed key 1",
                kernels
                    .lock()
                    .unwrap()
                    .values()
                    .filter(|k| k.outbound == Some(1))
                    .count()
            );
            last_print = Instant::now();
        }
        assert!(
            !tasks.iter().any(|t| t.is_finished()),
            "a node task failed (see its panic above)"
        );
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "nodes did not program key 1: {} did",
            kernels
                .lock()
                .unwrap()
                .values()
                .filter(|k| k.outbound == Some(1))
                .count()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    *violations.lock().unwrap() = 0;
    eprintln!(
        "  every node programmed key 1 ({:.1?}); rotating",
        waited.elapsed()
    );
    let start = Instant::now();
    keyd.rotate_ipsec(&admin, Default::default()).await.unwrap();
    eprintln!("  rotate returned after {:.1?}", start.elapsed());
    let mut activated = None;
    loop {
        let s = keyd.ipsec_status();
        match &s.rollout {
            Some(r) if r.phase == "active" && activated.is_none() => {
                activated = Some(start.elapsed())
            }
            None => break,
            _ => {}
        }
        if std::env::var("FLEET_DEBUG").is_ok() {
            eprintln!(
                "  {:.1?} {:?}",
                start.elapsed(),
                s.rollout
                    .as_ref()
                    .map(|r| (r.phase.clone(), r.waiting_for.len()))
            );
        }
        keyd.tick().await.unwrap();
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(
            start.elapsed() < Duration::from_secs(600),
            "rollout did not complete"
        );
    }
    let total = start.elapsed();
    // Give the nodes a moment to remove the retired key, still checking the invariant.
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Abort rather than notify: a node busy acknowledging would miss a notification.
    for t in &tasks {
        t.abort();
    }
    println!(
        "fleet   {nodes_n} nodes: rotate -> active {:.2?}, rotate -> retired {total:.2?} (overlap 0); pairs lacking a shared key at any step: {}",
        activated.unwrap_or_default(),
        *violations.lock().unwrap()
    );
}

/// Appends `n` records made by `event`, 10,000 per transaction; `at(i)` dates the transaction
/// starting at record `i` (`None`: now).
async fn fill(
    store: &Arc<dyn Store>,
    n: u64,
    event: impl Fn(u64) -> AuditEvent + Send + 'static,
    at: impl Fn(u64) -> Option<keyd_proto::Timestamp> + Send + 'static,
) {
    let s = Arc::clone(store);
    tokio::task::spawn_blocking(move || {
        let mut i = 0;
        while i < n {
            let mut txn = Txn {
                audit: (i..(i + 10_000).min(n)).map(&event).collect(),
                ..Txn::default()
            };
            txn.at = at(i);
            i += txn.audit.len() as u64;
            s.commit(txn).unwrap();
        }
    })
    .await
    .unwrap();
}

/// keyd's resident set size, in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    pages * 4096
}

/// Runs `f`, sampling the resident set every 10 ms: (result, peak growth in bytes).
async fn peak_growth<T, F: std::future::Future<Output = T>>(f: F) -> (T, u64) {
    let base = rss();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let peak = Arc::new(std::sync::atomic::AtomicU64::new(base));
    let sampler = {
        let (stop, peak) = (Arc::clone(&stop), Arc::clone(&peak));
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let out = f.await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    sampler.join().unwrap();
    (
        out,
        peak.load(std::sync::atomic::Ordering::Relaxed)
            .saturating_sub(base),
    )
}

fn admission_event(i: u64) -> AuditEvent {
    let outcome = match i % 1000 {
        0 => "break_glass",
        1..=4 => "warned",
        5..=60 => "denied",
        _ => "allowed",
    };
    AuditEvent::new(
        &format!("admission.{outcome}"),
        "webhook/keyd-webhook",
        json!({ "at": keyd_proto::Timestamp(1_780_000_000 + i), "outcome": outcome,
                "enforcement": "enforce", "operation": "CREATE", "kind": "Pod",
                "namespace": format!("team-{}", i % 40), "name": format!("pod-{i}"),
                "user": "system:serviceaccount:ci:deployer", "policies": [format!("policy-{}", i % 7)],
                "reason": "covered" }),
    )
}

async fn report() {
    use keyd::report::ReportFormat;
    use keyd::service::{Progress, ReportRequest};
    for n in [100_000u64, 1_000_000] {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("r.redb")).unwrap());
        // 30 days of records, in time order.
        let start_at = keyd_proto::Timestamp::now().0 - 30 * 86_400;
        let mixed = |j: u64| {
            if j % 10 == 9 {
                event(j)
            } else {
                admission_event(j)
            }
        };
        fill(&store, n, mixed, move |i| {
            Some(keyd_proto::Timestamp(start_at + i * 30 * 86_400 / n))
        })
        .await;
        let wrapper: Arc<dyn KeyWrapper> = Arc::new(LocalKek::from_key(
            Key256::random().unwrap(),
            dir.path().join("kek"),
        ));
        let keyd = Keyd::open(store, wrapper, ServiceConfig::default(), Clock::default())
            .await
            .unwrap();
        let admin = Identity::Admin("bench".into());
        // Baseline: an export of the same records, read and thrown away.
        let t = Instant::now();
        let (records, export_growth) = peak_growth(async {
            let mut e = keyd
                .export_audit(
                    &admin,
                    keyd::service::ExportRange::default(),
                    keyd::audit::Format::Jsonl,
                )
                .await
                .unwrap();
            while let Some(c) = e.chunks.recv().await {
                c.unwrap();
            }
            e.records
        })
        .await;
        let export_time = t.elapsed();
        for format in [ReportFormat::Json, ReportFormat::Html] {
            let t = Instant::now();
            let (signed, growth) = peak_growth(keyd.evidence_report(
                &admin,
                ReportRequest {
                    since: None,
                    until: None,
                    format,
                },
                Arc::new(Progress::default()),
            ))
            .await;
            let signed = signed.unwrap();
            let secs = t.elapsed();
            println!(
                "report  {records} records, {}: {secs:.2?} ({:.0} records/s), file {} KB, RSS +{:.1} MB  \
                 (export of the same records: {export_time:.2?}, RSS +{:.1} MB)  target: seconds, flat memory",
                format.as_str(),
                records as f64 / secs.as_secs_f64(),
                signed.content.len() / 1024,
                growth as f64 / 1e6,
                export_growth as f64 / 1e6,
            );
            assert_eq!(
                signed.report.admission.totals.values().sum::<u64>(),
                n - n / 10,
                "every admission counted"
            );
        }
    }
}
