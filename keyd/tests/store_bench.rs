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
    /// CPU the keyd processes spent per request (summed over replicas).
    cpu_us: f64,
}

/// What each node does in a closed loop.
#[derive(Clone, Copy, PartialEq)]
enum Load {
    /// `If-None-Match` with the held ETag: a 304 per poll, what a fleet at rest costs.
    Poll,
    /// A full fetch of the bundle.
    Fetch,
    /// The node refreshes its registration (`PUT /v1/nodes/{name}`, unchanged): a write.
    Register,
}

fn keyd_cpu(replicas: &[Keyd]) -> f64 {
    replicas
        .iter()
        .filter_map(|k| keyd_tests::loadgen::cpu_seconds(k.child.id()))
        .sum()
}

/// Every node runs `load` in a closed loop for [`RUN`], each against its replica.
async fn run(replicas: &[Keyd], names: &[&'static str], load: Load) -> Figures {
    let mut tasks = Vec::new();
    let cpu_before = keyd_cpu(replicas);
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
        let registration = registration(i);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let held = [(http::header::IF_NONE_MATCH, etag.as_str())];
            let node = format!("/v1/nodes/{name}");
            while start.elapsed() < RUN {
                let t = Instant::now();
                let (r, want) = match load {
                    Load::Poll => (
                        c.send(Method::GET, &path, None, &held).await,
                        StatusCode::NOT_MODIFIED,
                    ),
                    Load::Fetch => (c.send(Method::GET, &path, None, &[]).await, StatusCode::OK),
                    Load::Register => (
                        c.send(Method::PUT, &node, Some(registration.clone()), &[])
                            .await,
                        StatusCode::OK,
                    ),
                };
                let r = r.unwrap();
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
    let cpu = keyd_cpu(replicas) - cpu_before;
    all.sort();
    Figures {
        per_sec: all.len() as f64 / took.as_secs_f64(),
        p50: all[all.len() / 2],
        p99: all[all.len() * 99 / 100],
        cpu_us: cpu * 1e6 / all.len() as f64,
    }
}

/// Node `i`'s registration, as [`put_dev_node`] sends it.
fn registration(i: usize) -> Vec<u8> {
    use base64::Engine as _;
    let seed = u8::try_from(i + 1).unwrap();
    let wg = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([seed; 32]));
    serde_json::to_vec(&json!({
        "endpoint": format!("192.0.2.{}", i + 1),
        "pod_cidrs": [format!("10.0.{i}.0/24")],
        "wireguard_public_key": base64::engine::general_purpose::STANDARD.encode(wg.as_bytes()),
    }))
    .unwrap()
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
    println!("| round | setup | load | per second | p50 | p99 | keyd CPU per request |");
    println!("|---|---|---|---|---|---|---|");
    for round in 1..=2 {
        for (label, replicas) in &setups {
            for (what, load) in [
                ("304 polls", Load::Poll),
                ("full fetches", Load::Fetch),
                ("registrations", Load::Register),
            ] {
                let f = run(replicas, &names, load).await;
                println!(
                    "| {round} | {label} | {what} | {:.0} | {:.2} ms | {:.2} ms | {:.0} us |",
                    f.per_sec,
                    f.p50.as_secs_f64() * 1e3,
                    f.p99.as_secs_f64() * 1e3,
                    f.cpu_us,
                );
            }
        }
    }
}
