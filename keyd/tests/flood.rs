//! A flood of stalled connections on one of keyd's listeners does not stop the others: each
//! listener has its own connection cap and handshake/header timeouts. The test floods the mTLS
//! API with TCP connections that never start a handshake, and the ops listener with requests
//! whose headers never end (twice each one's cap), and meanwhile times requests on the other
//! listener. It prints the latencies (SECURITY.md's "Adversarial tests" table quotes them). The
//! assertions are about behaviour, not speed: every request on the other listener is answered,
//! the flooded API serves again once the handshake timeout clears the flood, and not before (so
//! the cap held).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::Harness;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// How many flood connections this process can hold: a quarter of its open-file limit (the
/// flood's sockets, keyd's side of them and everything else share it), at most 2,000.
fn flood_size() -> usize {
    let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
    let soft: usize = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    (soft / 4).min(2000)
}

/// One plain-HTTP GET on the ops listener, on a new connection; its latency.
async fn ops_get(ops: SocketAddr, path: &str) -> Duration {
    let start = Instant::now();
    let answer = tokio::time::timeout(Duration::from_secs(10), async {
        let mut s = TcpStream::connect(ops).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    })
    .await
    .expect("the ops listener did not answer within 10 s");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    start.elapsed()
}

/// One admin request on the mTLS API, on a new connection (handshake included); its latency.
async fn api_get(h: &Harness) -> Duration {
    let start = Instant::now();
    let status = tokio::time::timeout(Duration::from_secs(20), async {
        h.admin().await.get("/v1/status").await.unwrap().status
    })
    .await
    .expect("the API did not answer within 20 s");
    assert_eq!(status, http::StatusCode::OK);
    start.elapsed()
}

fn summary(samples: &mut [Duration]) -> (Duration, Duration) {
    samples.sort();
    (samples[samples.len() / 2], samples[samples.len() - 1])
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_on_one_listener_leaves_the_others_serving() {
    let n = flood_size();
    let cap = (n / 2).to_string();
    let h = Harness::start_with_env(&[
        ("KEYD_MAX_CONNECTIONS", cap.as_str()),
        ("KEYD_HANDSHAKE_TIMEOUT", "2s"), // HANDSHAKE_TIMEOUT
        ("KEYD_HEADER_READ_TIMEOUT", "2s"),
    ])
    .await;
    let mut ops_before = Vec::new();
    let mut api_before = Vec::new();
    for _ in 0..10 {
        ops_before.push(ops_get(h.ops, "/healthz").await);
        api_before.push(api_get(&h).await);
    }

    // The API: n connections that never send a byte, twice its cap.
    let flood_started = Instant::now();
    let mut flood = Vec::with_capacity(n);
    for _ in 0..n {
        flood.push(TcpStream::connect(h.api).await.unwrap());
    }
    let mut ops_during = Vec::new();
    for _ in 0..10 {
        ops_during.push(ops_get(h.ops, "/healthz").await);
    }
    // The API itself serves again once the handshake timeout has closed the stalled ones.
    let api_during = api_get(&h).await;
    // Not before the first stalled handshakes timed out: at the cap, keyd accepted no more.
    assert!(
        flood_started.elapsed() >= HANDSHAKE_TIMEOUT,
        "the API answered {:?} into a flood of twice its cap: the cap did not hold",
        flood_started.elapsed()
    );
    drop(flood);

    // The ops listener: n connections whose request headers never end (twice its cap).
    let mut flood = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(h.ops).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        flood.push(s);
    }
    let mut api_during_ops = Vec::new();
    for _ in 0..10 {
        api_during_ops.push(api_get(&h).await);
    }
    let ops_after = ops_get(h.ops, "/healthz").await;
    drop(flood);

    let (ob50, obmax) = summary(&mut ops_before);
    let (od50, odmax) = summary(&mut ops_during);
    let (ab50, abmax) = summary(&mut api_before);
    let (ad50, admax) = summary(&mut api_during_ops);
    println!(
        "flood: {n} stalled connections per listener, cap {cap}\n\
         ops /healthz while the API is flooded: p50 {:.1} ms, max {:.1} ms \
         (before: p50 {:.1} ms, max {:.1} ms; p50 ratio {:.2})\n\
         API /v1/status (new mTLS connection) while ops is flooded: p50 {:.1} ms, max {:.1} ms \
         (before: p50 {:.1} ms, max {:.1} ms; p50 ratio {:.2})\n\
         API while itself flooded (waits for the 2 s handshake timeout): {:.0} ms; \
         ops while itself flooded (2 s header timeout): {:.0} ms",
        ms(od50),
        ms(odmax),
        ms(ob50),
        ms(obmax),
        ms(od50) / ms(ob50),
        ms(ad50),
        ms(admax),
        ms(ab50),
        ms(abmax),
        ms(ad50) / ms(ab50),
        ms(api_during),
        ms(ops_after),
    );
}
