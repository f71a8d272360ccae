//! Benchmark, not a test (ignored; run it with
//! `cargo test --release -p keyd --test store_bench -- --ignored --nocapture`): the same bundle
//! traffic against one keyd on redb (the baseline), one keyd on etcd, and three keyd replicas
//! on etcd with the nodes spread over them, side by side in one run, twice. Results and how to
//! read them: docs/benchmarks.md.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use keyd_tests::etcd::EtcdCluster;
use serde_json::json;

mod process;
use process::{Identity, Keyd, call, put_dev_node};

/// Simulated nodes, each with its own certificate and one persistent connection.
const NODES: usize = 32;
const RUN: Duration = Duration::from_secs(5);

fn node_names() -> Vec<&'static str> {
    (0..NODES)
        .map(|i| &*Box::leak(format!("bench-{i:02}").into_boxed_str()))
        .collect()
}

struct Figures {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

/// Every node polls its bundle in a closed loop for [`RUN`]: with `If-None-Match` (a 304 per
/// poll, what a fleet at rest costs) or without (a full, audited-once fetch).
async fn poll(replicas: &[Keyd], names: &[&'static str], conditional: bool) -> Figures {
    let mut tasks = Vec::new();
    let start = Instant::now();
    for (i, &name) in names.iter().enumerate() {
        let mut c = replicas[i % replicas.len()]
            .connect(&Identity::Node(name))
            .await
            .unwrap();
        let path = format!("/v1/nodes/{name}/bundle");
        let r = c.get(&path).await.unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
        let etag = r.headers[http::header::ETAG].to_str().unwrap().to_owned();
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let held = [(http::header::IF_NONE_MATCH, etag.as_str())];
            let headers: &[_] = if conditional { &held } else { &[] };
            while start.elapsed() < RUN {
                let t = Instant::now();
                let r = c.send(Method::GET, &path, None, headers).await.unwrap();
                let want = if conditional {
                    StatusCode::NOT_MODIFIED
                } else {
                    StatusCode::OK
                };
                assert_eq!(r.status, want, "{}", r.error_message());
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    let took = start.elapsed();
    all.sort();
    Figures {
        per_sec: all.len() as f64 / took.as_secs_f64(),
        p50: all[all.len() / 2],
        p99: all[all.len() * 99 / 100],
    }
}

/// keyd processes on `data` with `env`, ready, every node registered and an IPsec key.
async fn start(data: &std::path::Path, env: &[(&str, String)], count: usize) -> Vec<Keyd> {
    let mut replicas = Vec::new();
    for _ in 0..count {
        let mut k = Keyd::spawn(data, env);
        k.ready()
            .await
            .unwrap_or_else(|s| panic!("keyd exited {s}: {}", k.log()));
        replicas.push(k);
    }
    replicas
}

async fn prepare(replicas: &[Keyd], names: &[&'static str]) {
    call(
        &replicas[0],
        Identity::Admin,
        Method::POST,
        "/v1/ipsec/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    for (i, name) in names.iter().enumerate() {
        let (status, body) = put_dev_node(
            &replicas[i % replicas.len()],
            name,
            i,
            &format!("192.0.2.{}", i + 1),
        )
        .await
        .unwrap();
        assert!(status.is_success(), "{status} {body}");
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a benchmark: run with --release --ignored --nocapture"]
async fn bundle_polls_on_redb_etcd_and_three_replicas() {
    if !keyd_tests::etcd::available() {
        panic!("the benchmark needs etcd (Debian's etcd-server)");
    }
    let dir = tempfile::tempdir().unwrap();
    let names = node_names();
    let server_names: Vec<String> = ["localhost", "127.0.0.1", "::1"].map(String::from).into();
    let etcd = EtcdCluster::start(&dir.path().join("etcd"), 3);
    let etcd_env = |prefix: &str| {
        vec![
            ("KEYD_STORE_BACKEND", "etcd".to_owned()),
            ("KEYD_STORE_ETCD_ENDPOINTS", etcd.endpoints().join(",")),
            ("KEYD_STORE_ETCD_PREFIX", prefix.to_owned()),
        ]
    };
    let mut setups = Vec::new();
    for (label, env, count) in [
        ("redb, 1 keyd", vec![], 1),
        ("etcd, 1 keyd", etcd_env("/one/"), 1),
        ("etcd, 3 replicas", etcd_env("/three/"), 3),
    ] {
        let data = dir.path().join(label.replace([',', ' '], "-"));
        keyd::pki::ensure_dev_pki(&data, &server_names, &names).unwrap();
        let replicas = start(&data, &env, count).await;
        prepare(&replicas, &names).await;
        setups.push((label, replicas));
    }
    println!(
        "{NODES} nodes, one connection each, closed loop, {}s per run; etcd: 3 members on this machine",
        RUN.as_secs()
    );
    println!("| round | setup | 304 polls/s | p50 | p99 | full fetches/s | p50 | p99 |");
    println!("|---|---|---|---|---|---|---|---|");
    for round in 1..=2 {
        for (label, replicas) in &setups {
            let cond = poll(replicas, &names, true).await;
            let full = poll(replicas, &names, false).await;
            println!(
                "| {round} | {label} | {:.0} | {:.2} ms | {:.2} ms | {:.0} | {:.2} ms | {:.2} ms |",
                cond.per_sec,
                cond.p50.as_secs_f64() * 1e3,
                cond.p99.as_secs_f64() * 1e3,
                full.per_sec,
                full.p50.as_secs_f64() * 1e3,
                full.p99.as_secs_f64() * 1e3,
            );
        }
    }
}
