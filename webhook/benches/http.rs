//! AdmissionReviews over TLS: the webhook's real `/validate` (1,000 policies, 10,000
//! namespaces) against a no-op TLS handler (reads the body, returns a fixed "allowed" review)
//! served by the same TLS and HTTP stack, in the same run, on the same cores. The no-op is the
//! ceiling of this machine's TLS + HTTP/1.1 for this load generator; the ratio says how much of
//! it the webhook keeps.
//!
//! Closed loop: C keep-alive HTTP/1.1 connections, each sending the next review as soon as the
//! previous answer arrives; latency is per request, send to full response. Client and servers
//! share the machine's cores, as they would share nothing in production: the numbers are a
//! floor. The two servers are measured in alternating one-second slices (five each per point),
//! so background load on a shared machine hits both alike and the ratio stays meaningful.
//!
//! `cargo bench -p keyd-webhook --bench http` (about a minute)
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::post;
use bytes::Bytes;
use common::{Rng, keyd_status, percentile, pick_namespace, pod_labels, pod_object};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use keyd_webhook::config::Limits;
use keyd_webhook::decision::DecisionConfig;
use keyd_webhook::keyd::{AuditQueue, StatusCache};
use keyd_webhook::kube_cache::ClusterSource;
use keyd_webhook::metrics::Metrics;
use keyd_webhook::server::{AppState, router, serve_tls};
use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::sync::watch;

/// Per point: ROUNDS slices of each server, alternating, so that both see the same background
/// load (the benchmark machine is shared); each slice warms up its connections first.
const ROUNDS: usize = 5;
const WARMUP: Duration = Duration::from_millis(300);
const MEASURE: Duration = Duration::from_secs(1);
const CONNECTIONS: [usize; 4] = [4, 8, 16, 32];
const BODIES: usize = 1_000;
/// Server threads' name, to read their CPU time from /proc.
const SERVER_THREAD: &str = "bench-server";

fn main() {
    keyd_webhook::tls::install_default_provider();
    // Servers and clients each get a 2-worker runtime: on a 2-core machine they compete for the
    // same cores, as a benchmark on one host must.
    let servers = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name(SERVER_THREAD)
        .enable_all()
        .build()
        .unwrap();
    let clients = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    let (server_tls, client_tls) = tls_pair();
    let (_stop, stop_rx) = watch::channel(false);
    let webhook_addr =
        servers.block_on(start(router(state()), server_tls.clone(), stop_rx.clone()));
    let noop_addr = servers.block_on(start(noop_router(), server_tls, stop_rx));
    let bodies = Arc::new(review_bodies());

    println!(
        "http: {} AdmissionReviews in rotation (~{} bytes each), {ROUNDS} x {MEASURE:?} per server and point\n",
        bodies.len(),
        bodies.iter().map(Vec::len).sum::<usize>() / bodies.len()
    );
    println!(
        "| connections | webhook req/s | p50 / p99 (ms) | server CPU per review (us) | no-op req/s | p50 / p99 (ms) | server CPU per request (us) | throughput webhook / no-op | CPU webhook / no-op |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut cpu_per_review = Vec::new();
    for c in CONNECTIONS {
        let (mut w, mut n) = (Slices::default(), Slices::default());
        for _ in 0..ROUNDS {
            w.add(
                &clients,
                load(webhook_addr, client_tls.clone(), bodies.clone(), c),
            );
            n.add(
                &clients,
                load(noop_addr, client_tls.clone(), bodies.clone(), c),
            );
        }
        let (ws, ns) = (
            summarize(std::mem::take(&mut w.latencies)),
            summarize(std::mem::take(&mut n.latencies)),
        );
        let (wc, nc) = (w.cpu_us_per_request(), n.cpu_us_per_request());
        cpu_per_review.push((wc, nc));
        println!(
            "| {c} | {:.0} | {:.2} / {:.2} | {wc:.0} | {:.0} | {:.2} / {:.2} | {nc:.0} | {:.2} | {:.2} |",
            ws.rate,
            ws.p50,
            ws.p99,
            ns.rate,
            ns.p50,
            ns.p99,
            ws.rate / ns.rate,
            wc / nc
        );
    }
    let (wc, nc) = cpu_per_review
        .iter()
        .fold((f64::MAX, f64::MAX), |(a, b), (w, n)| {
            (a.min(*w), b.min(*n))
        });
    println!(
        "\nServer CPU per request (best point): webhook {wc:.0} us, no-op {nc:.0} us; two dedicated cores \
         would serve about {:.0} reviews/s (no-op: {:.0}/s) before any client cost.",
        2e6 / wc,
        2e6 / nc
    );
}

/// What a server's slices add up to.
#[derive(Default)]
struct Slices {
    latencies: Vec<f64>,
    completed: usize,
    cpu_seconds: f64,
}

impl Slices {
    fn add(
        &mut self,
        rt: &tokio::runtime::Runtime,
        slice: impl Future<Output = (Vec<f64>, usize)>,
    ) {
        let before = server_cpu_seconds();
        let (latencies, completed) = rt.block_on(slice);
        self.cpu_seconds += server_cpu_seconds() - before;
        self.latencies.extend(latencies);
        self.completed += completed;
    }

    fn cpu_us_per_request(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.completed.max(1) as f64
    }
}

/// CPU time (user + system, seconds) used so far by the server runtime's threads, from
/// /proc/self/task/*/stat (fields 14 and 15, in clock ticks of 1/100 s on Linux).
fn server_cpu_seconds() -> f64 {
    let mut ticks = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() != SERVER_THREAD {
            continue;
        }
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        // After ") " come fields 3..: utime is field 14, stime field 15.
        if let Some((_, rest)) = stat.rsplit_once(')') {
            let f: Vec<&str> = rest.split_whitespace().collect();
            for i in [11, 12] {
                ticks += f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            }
        }
    }
    ticks as f64 / 100.0
}

fn state() -> AppState {
    let metrics = Metrics::default();
    AppState {
        cluster: ClusterSource::Static(common::static_cluster(100)),
        keyd: Arc::new(StatusCache::fixed(keyd_status())),
        // No flusher: the queue fills and then drops its oldest records, which costs the same
        // push per decision as delivering would.
        audit: Arc::new(AuditQueue::new(10_000, metrics.clone())),
        decision: Arc::new(DecisionConfig::default()),
        limits: Limits {
            max_body_bytes: 6 << 20,
            body_timeout: Duration::from_secs(10),
            handshake_timeout: Duration::from_secs(5),
        },
        metrics,
    }
}

/// Reads the body and answers a fixed allowed review: the least a webhook can do.
fn noop_router() -> Router {
    const ALLOWED: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"x","allowed":true}}"#;
    Router::new().route(
        "/validate",
        post(|body: Bytes| async move {
            std::hint::black_box(body);
            ([("content-type", "application/json")], ALLOWED)
        }),
    )
}

async fn start(
    app: Router,
    tls: Arc<rustls::ServerConfig>,
    stop: watch::Receiver<bool>,
) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (_tx, rx) = watch::channel(tls);
    // The sender must outlive the server; leak it for the process (a benchmark binary).
    std::mem::forget(_tx);
    let mut stop = stop;
    tokio::spawn(serve_tls(
        listener,
        rx,
        app,
        Duration::from_secs(5),
        Duration::from_secs(1),
        async move {
            let _ = stop.wait_for(|s| *s).await;
        },
    ));
    addr
}

fn tls_pair() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
    let ca = keyd::pki::CertificateAuthority::generate("bench CA").unwrap();
    let leaf = ca
        .issue_server(&["127.0.0.1".to_owned()], Duration::from_secs(3600))
        .unwrap();
    let chain = vec![CertificateDer::from_pem_slice(leaf.cert_pem.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(leaf.key_pem.as_bytes()).unwrap();
    let mut server = rustls::ServerConfig::builder_with_provider(keyd_webhook::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.cert_pem().as_bytes()).unwrap())
        .unwrap();
    let mut client = rustls::ClientConfig::builder_with_provider(keyd_webhook::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    (Arc::new(server), Arc::new(client))
}

/// Pod CREATE reviews over the benchmark cluster: half sensitive, so covered, denied, warned and
/// not-sensitive answers all occur.
fn review_bodies() -> Vec<Vec<u8>> {
    let mut rng = Rng::new(7);
    (0..BODIES)
        .map(|i| {
            let ns = pick_namespace(&mut rng, 100);
            let name = format!("app-{i}-7f9c4d-x{i:04}");
            let labels = pod_labels(&mut rng);
            serde_json::to_vec(&json!({
                "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
                "request": {
                    "uid": format!("0b7d6f0e-8c1a-4b57-9d3e-{i:012}"),
                    "kind": {"group": "", "version": "v1", "kind": "Pod"},
                    "resource": {"group": "", "version": "v1", "resource": "pods"},
                    "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
                    "requestResource": {"group": "", "version": "v1", "resource": "pods"},
                    "name": name, "namespace": ns, "operation": "CREATE",
                    "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller", "groups": ["system:serviceaccounts", "system:authenticated"]},
                    "object": pod_object(&name, &ns, &labels),
                    "oldObject": null, "dryRun": false,
                    "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
                }
            }))
            .unwrap()
        })
        .collect()
}

struct Result {
    rate: f64,
    p50: f64,
    p99: f64,
}

fn summarize(mut all: Vec<f64>) -> Result {
    all.sort_by(f64::total_cmp);
    Result {
        rate: all.len() as f64 / (MEASURE.as_secs_f64() * ROUNDS as f64),
        p50: percentile(&all, 50.0),
        p99: percentile(&all, 99.0),
    }
}

/// One slice: latencies (ms) of the requests sent and answered within the measured second, and
/// how many requests were answered in the whole slice (warm-up included, as the CPU time is).
async fn load(
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    bodies: Arc<Vec<Vec<u8>>>,
    connections: usize,
) -> (Vec<f64>, usize) {
    let start = Instant::now();
    let measure_from = start + WARMUP;
    let end = measure_from + MEASURE;
    let tasks: Vec<_> = (0..connections)
        .map(|c| {
            let tls = tls.clone();
            let bodies = bodies.clone();
            tokio::spawn(async move {
                let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
                tcp.set_nodelay(true).unwrap();
                let stream = tokio_rustls::TlsConnector::from(tls)
                    .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
                    .await
                    .unwrap();
                let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await.unwrap();
                tokio::spawn(async move {
                    let _ = conn.await;
                });
                let mut latencies = Vec::new();
                let mut completed = 0usize;
                let mut i = c * 7919;
                loop {
                    let body = Bytes::from(bodies[i % bodies.len()].clone());
                    i += 1;
                    let req = http::Request::post("/validate")
                        .header("host", "127.0.0.1")
                        .header("content-type", "application/json")
                        .body(Full::new(body))
                        .unwrap();
                    let t = Instant::now();
                    if t >= end {
                        return (latencies, completed);
                    }
                    sender.ready().await.unwrap();
                    let resp = sender.send_request(req).await.unwrap();
                    assert_eq!(resp.status(), 200);
                    let b = resp.into_body().collect().await.unwrap().to_bytes();
                    std::hint::black_box(b);
                    let done = Instant::now();
                    completed += 1;
                    if t >= measure_from && done <= end {
                        latencies.push((done - t).as_secs_f64() * 1e3);
                    }
                }
            })
        })
        .collect();
    let (mut all, mut completed) = (Vec::new(), 0);
    for t in tasks {
        let (l, n) = t.await.unwrap();
        all.extend(l);
        completed += n;
    }
    (all, completed)
}
