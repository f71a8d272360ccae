//! Key custody benchmark (a load generator, not a timed test):
//!
//! - cold start: what `keyd serve` does before it binds, on a store of N sealed records
//!   (default 10,000): connect and check the custodian, open every record (one custodian
//!   unwrap each), load keyd's state;
//! - rewrap: a KEK rotation of the same N records (a new local KEK file, a new KMS key, a new
//!   Vault key version), from the API call until the migration completes, in records/s.
//!
//! Run: `cargo bench -p keyd --bench custody` (env: `KEYD_BENCH_RECORDS`, default 10000;
//! `KEYD_BENCH_BACKENDS`, default `local,aws-kms,vault-transit`). aws-kms runs against moto's
//! server (Python) and vault-transit against the in-process Vault test double, so those numbers
//! measure keyd's side plus a local test server, not AWS KMS or Vault.
#![allow(clippy::unwrap_used)]

#[path = "../tests/support/mod.rs"]
mod support;

use std::sync::Arc;
use std::time::Instant;

use keyd::custody::Custody;
use keyd::rewrap;
use keyd::seal::SealedRecord;
use keyd::service::Keyd;
use keyd::store::{Store, Table, Txn};
use keyd_proto::kek::KekRotateRequest;
use support::{Backend, Kind, ctx, open_store};

fn main() {
    let records: usize = std::env::var("KEYD_BENCH_RECORDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let backends = std::env::var("KEYD_BENCH_BACKENDS")
        .unwrap_or_else(|_| "local,aws-kms,vault-transit".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    println!(
        "| backend | records | concurrency | seed (s) | cold start (s) | unwraps/s at start | rewrap (s) | rewrap records/s |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for name in backends.split(',') {
        let kind = match name.trim() {
            "local" => Kind::Local,
            "aws-kms" => Kind::AwsKms,
            "vault-transit" => Kind::VaultTransit,
            other => panic!("unknown backend {other}"),
        };
        rt.block_on(run(kind, records));
    }
}

async fn run(kind: Kind, n: usize) {
    let Some(b) = Backend::new(kind).await else {
        println!("| {kind:?} | skipped: prerequisite missing |");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // keyd's defaults (16 custodian calls in flight).
    let s = keyd::custody::CustodySettings::default();
    // Seed: N records sealed through the custodian, written in batches.
    let t = Instant::now();
    {
        let store = open_store(dir.path());
        let custody = keyd::custody::bootstrap(&b.spec(), &s, &store)
            .await
            .unwrap();
        seed_concurrently(&store, &custody, n, s.concurrency).await;
    }
    let seed = t.elapsed();
    // Cold start, as `keyd serve` does it.
    let t = Instant::now();
    let store = open_store(dir.path());
    let custody = keyd::custody::bootstrap(&b.spec(), &s, &store)
        .await
        .unwrap();
    let opened = rewrap::verify_all(&store, &custody).await.unwrap();
    let keyd = Keyd::open_with_custody(
        Arc::clone(&store),
        Arc::clone(&custody),
        keyd::service::ServiceConfig::default(),
        keyd::clock::Clock::default(),
    )
    .await
    .unwrap();
    let cold = t.elapsed();
    // A KEK rotation of every record.
    let req = match kind {
        Kind::AwsKms => KekRotateRequest {
            key_id: Some(b.moto().create_key().await),
            rewrap_only: false,
        },
        _ => KekRotateRequest::default(),
    };
    let t = Instant::now();
    let started = keyd::service::rotate_kek(&keyd, "bench", req)
        .await
        .unwrap();
    let m = wait(&custody).await;
    let rewrap = t.elapsed();
    assert_eq!(m.failed, 0);
    assert_eq!(m.rewrapped, started.total);
    println!(
        "| {} | {} | {} | {:.1} | {:.2} | {:.0} | {:.2} | {:.0} |",
        b.name(),
        opened,
        s.concurrency,
        seed.as_secs_f64(),
        cold.as_secs_f64(),
        opened as f64 / cold.as_secs_f64(),
        rewrap.as_secs_f64(),
        m.rewrapped as f64 / rewrap.as_secs_f64(),
    );
}

async fn seed_concurrently(store: &Arc<dyn Store>, custody: &Arc<Custody>, n: usize, c: usize) {
    let mut set = tokio::task::JoinSet::new();
    let mut next = 0usize;
    let mut batch = Txn::default();
    let spawn = |set: &mut tokio::task::JoinSet<(String, SealedRecord)>, i: usize| {
        let custody = Arc::clone(custody);
        set.spawn(async move {
            let id = format!("test/{i:05}");
            let r = keyd::seal::seal(&*custody, &ctx(&id), format!("secret {i}").as_bytes())
                .await
                .unwrap();
            (id, r)
        });
    };
    while next < n.min(c) {
        spawn(&mut set, next);
        next += 1;
    }
    while let Some(done) = set.join_next().await {
        let (id, r) = done.unwrap();
        batch = batch.put(Table::Sealed, id, r.to_bytes());
        if batch.puts.len() >= 1000 {
            store.commit(std::mem::take(&mut batch)).unwrap();
        }
        if next < n {
            spawn(&mut set, next);
            next += 1;
        }
    }
    store.commit(batch).unwrap();
}

async fn wait(custody: &Custody) -> keyd_proto::kek::MigrationStatus {
    loop {
        if let Some(m) = custody.migration()
            && m.state == "completed"
        {
            return m;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}
