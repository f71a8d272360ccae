//! The webhook's HTTPS server from the outside, without an API server: hostile and broken
//! requests, keyd going away and coming back (with a real keyd over mTLS), readiness before the
//! caches sync, metrics, and the serving certificate replaced on disk.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Https, Keyd, SENSITIVE, ServingCert, pod_json, review_json};
use keyd_webhook::config::{Config, Flags, Limits};
use keyd_webhook::crd::{EncryptionPolicy, Labels};
use keyd_webhook::decision::{DecisionConfig, WhenKeydUnavailable};
use keyd_webhook::keyd::{
    AuditQueue, KeydClient, StatusCache, run_audit_flusher, run_status_poller,
};
use keyd_webhook::kube_cache::{ClusterSource, StaticCluster};
use keyd_webhook::metrics::Metrics;
use keyd_webhook::policy::PolicySet;
use keyd_webhook::server::{AppState, router, serve_tls};
use keyd_webhook::tls::{ServerTlsPaths, watch_server_config};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::watch;

const LIMITS: Limits = Limits {
    max_body_bytes: 64 * 1024,
    body_timeout: Duration::from_millis(500),
    handshake_timeout: Duration::from_secs(1),
};

/// A policy covering every pod of namespace `shop` with IPsec.
fn shop_policies() -> Arc<PolicySet> {
    let p: EncryptionPolicy = serde_json::from_value(json!({
        "apiVersion": "keyd.io/v1alpha1", "kind": "EncryptionPolicy",
        "metadata": {"name": "all", "namespace": "shop"},
        "spec": {"mode": "ipsec", "podSelector": {}}
    }))
    .unwrap();
    Arc::new(PolicySet::from_resources([&p], []))
}

fn cluster() -> ClusterSource {
    ClusterSource::Static(Arc::new(StaticCluster {
        policies: shop_policies(),
        namespaces: HashMap::from([
            ("shop".to_owned(), Arc::new(Labels::new())),
            ("blog".to_owned(), Arc::new(Labels::new())),
        ]),
    }))
}

struct Server {
    addr: SocketAddr,
    https: Https,
    state: AppState,
    stop: watch::Sender<bool>,
}

/// Serves `state` over TLS with `serving`'s certificate (reloaded every 50 ms).
async fn serve(state: AppState, serving: &ServingCert) -> Server {
    keyd_webhook::tls::install_default_provider();
    let (tls, _task) = watch_server_config(
        ServerTlsPaths {
            cert: serving.cert.clone(),
            key: serving.key.clone(),
            client_ca: None,
        },
        Duration::from_millis(50),
    )
    .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, mut rx) = watch::channel(false);
    let app = router(state.clone());
    tokio::spawn(async move {
        serve_tls(
            listener,
            tls,
            app,
            LIMITS.handshake_timeout,
            Duration::from_secs(1),
            async move {
                let _ = rx.wait_for(|s| *s).await;
            },
        )
        .await;
    });
    Server {
        addr,
        https: Https::new(addr, &serving.ca_pem),
        state,
        stop,
    }
}

/// State with keyd's status fixed as "IPsec ready".
fn fixed_state(decision: DecisionConfig) -> AppState {
    let ready = keyd_proto::ModeStatus {
        active: true,
        within_schedule: true,
        reason: None,
    };
    let metrics = Metrics::default();
    AppState {
        cluster: cluster(),
        keyd: Arc::new(StatusCache::fixed(keyd_proto::EnforcementStatus {
            at: keyd_proto::Timestamp::now(),
            ipsec: ready.clone(),
            wireguard: ready,
            rejected_policies: Vec::new(),
            rules_pending: false,
        })),
        audit: Arc::new(AuditQueue::new(100, metrics.clone())),
        decision: Arc::new(decision),
        limits: LIMITS,
        metrics,
    }
}

fn pod_review(uid: &str, ns: &str, name: &str, labels: &[(&str, &str)]) -> Vec<u8> {
    review_json(
        uid,
        ("", "v1", "Pod"),
        ns,
        "CREATE",
        "alice",
        &pod_json(name, labels, &[]),
    )
}

/// The `response` of an AdmissionReview answer.
fn response(status: u16, body: &[u8]) -> Value {
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(body));
    let v: Value = serde_json::from_slice(body).unwrap();
    assert_eq!(v["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(v["kind"], "AdmissionReview");
    v["response"].clone()
}

/// Writes `raw` on a fresh TLS connection and reads until the server closes it or 5 s pass.
async fn raw_exchange(s: &Server, raw: &[u8], then_wait: bool) -> (String, Duration) {
    let mut tls = tls_stream(s).await;
    tls.write_all(raw).await.unwrap();
    if !then_wait {
        tls.flush().await.unwrap();
    }
    let started = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut buf)).await;
    (
        String::from_utf8_lossy(&buf).into_owned(),
        started.elapsed(),
    )
}

async fn tls_stream(s: &Server) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(s.addr).await.unwrap();
    s.https
        .tls_connector()
        .connect(
            rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap(),
            tcp,
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn http_malformed_requests_get_a_4xx_or_a_denying_response_never_a_panic_or_hang() {
    let dir = tempfile::tempdir().unwrap();
    let serving = ServingCert::create(dir.path(), "webhook");
    let s = serve(fixed_state(DecisionConfig::default()), &serving).await;

    // Not an AdmissionReview at all: 400 with the reason.
    for (body, why) in [
        (b"not json".to_vec(), "not an AdmissionReview"),
        (b"".to_vec(), "not an AdmissionReview"),
        (br#"{"apiVersion":"admission.k8s.io/v2","kind":"AdmissionReview","request":{"uid":"x"}}"#.to_vec(), "admission.k8s.io/v2"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview"}"#.to_vec(), "no request"),
        (br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":""}}"#.to_vec(), "no uid"),
        (vec![b'['; 10_000], "not an AdmissionReview"),
    ] {
        let (status, text) = s.https.request("POST", "/validate", body).await;
        assert_eq!(status, 400);
        assert!(String::from_utf8_lossy(&text).contains(why), "{}", String::from_utf8_lossy(&text));
    }

    // An unknown kind is not the webhook's business: allowed.
    let cm = review_json(
        "u-cm",
        ("", "v1", "ConfigMap"),
        "shop",
        "CREATE",
        "alice",
        &json!({"metadata": {"name": "c"}}),
    );
    let (status, body) = s.https.request("POST", "/validate", cm).await;
    let r = response(status, &body);
    assert_eq!(
        (r["uid"].as_str(), r["allowed"].as_bool()),
        (Some("u-cm"), Some(true))
    );

    // A checked kind in an unknown version, or an object that does not parse: refused, code 400.
    let v9 = review_json(
        "u-v9",
        ("apps", "v9", "Deployment"),
        "shop",
        "CREATE",
        "alice",
        &json!({}),
    );
    let (status, body) = s.https.request("POST", "/validate", v9).await;
    let r = response(status, &body);
    assert_eq!(
        (r["allowed"].as_bool(), r["status"]["code"].as_u64()),
        (Some(false), Some(400))
    );
    assert!(
        r["status"]["message"]
            .as_str()
            .unwrap()
            .contains("matchPolicy: Equivalent")
    );
    let broken = review_json(
        "u-b",
        ("", "v1", "Pod"),
        "shop",
        "CREATE",
        "alice",
        &json!({"metadata": {"labels": [1, 2]}}),
    );
    let (status, body) = s.https.request("POST", "/validate", broken).await;
    let r = response(status, &body);
    assert_eq!(
        (r["allowed"].as_bool(), r["status"]["code"].as_u64()),
        (Some(false), Some(400))
    );

    // Too large: 413, whether declared up front or streamed in chunks.
    let big = vec![b' '; LIMITS.max_body_bytes + 1];
    assert_eq!(s.https.request("POST", "/validate", big).await.0, 413);
    let mut chunked =
        b"POST /validate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..80 {
        chunked.extend_from_slice(b"400\r\n");
        chunked.extend_from_slice(&[b' '; 0x400]);
        chunked.extend_from_slice(b"\r\n");
    }
    chunked.extend_from_slice(b"0\r\n\r\n");
    let (reply, _) = raw_exchange(&s, &chunked, false).await;
    assert!(reply.starts_with("HTTP/1.1 413"), "{reply}");

    // A body that never arrives: 408 after the body timeout, not a hung handler.
    let (reply, waited) = raw_exchange(
        &s,
        b"POST /validate HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"api",
        true,
    )
    .await;
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    // Headers that never finish: the connection is closed after the header timeout.
    let (reply, waited) = raw_exchange(&s, b"POST /validate HTTP/1.1\r\nHost: x\r\n", true).await;
    assert!(!reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");

    // Wrong method and unknown path.
    assert_eq!(s.https.request("GET", "/validate", vec![]).await.0, 405);
    assert_eq!(s.https.request("GET", "/nope", vec![]).await.0, 404);

    // After all that the server still answers, and decides.
    let (status, body) = s
        .https
        .request(
            "POST",
            "/validate",
            pod_review("u-ok", "blog", "p", &[SENSITIVE]),
        )
        .await;
    let r = response(status, &body);
    assert_eq!(r["allowed"], false);
    assert_eq!(r["status"]["code"], 403);
    assert!(
        r["status"]["message"]
            .as_str()
            .unwrap()
            .starts_with("keyd: Pod blog/p is refused")
    );
    assert_eq!(s.https.request("GET", "/healthz", vec![]).await.0, 200);
    let _ = s.stop.send(true);
}

#[tokio::test]
async fn http_metrics_count_decisions_by_outcome_and_mode_and_dry_runs_are_not_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let serving = ServingCert::create(dir.path(), "webhook");
    let s = serve(fixed_state(DecisionConfig::default()), &serving).await;
    let post = |b: Vec<u8>| {
        let h = s.https.clone();
        async move { h.request("POST", "/validate", b).await }
    };
    assert_eq!(
        response_of(post(pod_review("1", "shop", "a", &[SENSITIVE])).await)["allowed"],
        true
    );
    assert_eq!(
        response_of(post(pod_review("2", "blog", "b", &[SENSITIVE])).await)["allowed"],
        false
    );
    assert_eq!(
        response_of(post(pod_review("3", "blog", "c", &[("app", "x")])).await)["allowed"],
        true
    );
    let mut dry: Value =
        serde_json::from_slice(&pod_review("4", "blog", "d", &[SENSITIVE])).unwrap();
    dry["request"]["dryRun"] = json!(true);
    assert_eq!(
        response_of(post(serde_json::to_vec(&dry).unwrap()).await)["allowed"],
        false
    );

    // One denial recorded for keyd; the dry run was answered but not recorded.
    assert_eq!(s.state.audit.len(), 1);
    let (status, text) = s.https.request("GET", "/metrics", vec![]).await;
    assert_eq!(status, 200);
    let text = String::from_utf8(text).unwrap();
    for line in [
        r#"keyd_webhook_decisions_total{outcome="allowed",enforcement="enforce",reason="covered",kind="Pod"} 1"#,
        r#"keyd_webhook_decisions_total{outcome="denied",enforcement="enforce",reason="no_policy",kind="Pod"} 2"#,
        r#"keyd_webhook_decisions_total{outcome="allowed",enforcement="enforce",reason="not_sensitive",kind="Pod"} 1"#,
        "keyd_webhook_decision_duration_seconds_count 4",
        "keyd_webhook_review_duration_seconds_count 4",
    ] {
        assert!(text.contains(line), "missing {line} in\n{text}");
    }
    // No label carries a name.
    assert!(!text.contains("blog") && !text.contains("alice"), "{text}");
    // Every keyd_webhook_* metric the shipped alerting rules and dashboard query is served.
    let missing = keyd_tests::monitoring::missing(&text, "keyd_webhook_", &[]);
    assert!(
        missing.is_empty(),
        "deploy/monitoring/ queries {missing:?}:\n{text}"
    );
    let _ = s.stop.send(true);
}

fn response_of((status, body): (u16, Vec<u8>)) -> Value {
    response(status, &body)
}

#[tokio::test]
async fn http_keyd_unreachable_fails_closed_then_buffered_decisions_reach_keyd() {
    let dir = tempfile::tempdir().unwrap();
    let serving = ServingCert::create(dir.path(), "webhook");
    // The webhook's client certificate exists before keyd runs; keyd will listen on `port`.
    let setup = Keyd::prepare(&dir.path().join("keyd"));
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("https://127.0.0.1:{port}");
    let config = Config::parse(
        &common::webhook_toml(&serving, &setup, &url, ""),
        &Flags::default(),
    )
    .unwrap();
    keyd_webhook::tls::install_default_provider();
    let tls = keyd_webhook::tls::client_config(&config.keyd.tls).unwrap();
    let metrics = Metrics::default();
    let status = Arc::new(StatusCache::new(config.keyd.max_staleness));
    let audit = Arc::new(AuditQueue::new(100, metrics.clone()));
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(run_status_poller(
        Arc::new(KeydClient::new(&url, tls.clone(), config.keyd.timeout).unwrap()),
        status.clone(),
        config.keyd.refresh_interval,
        metrics.clone(),
        stop.clone(),
    ));
    tokio::spawn(run_audit_flusher(
        Arc::new(KeydClient::new(&url, tls, config.keyd.timeout).unwrap()),
        audit.clone(),
        stop.clone(),
    ));
    let state = AppState {
        cluster: cluster(),
        keyd: status.clone(),
        audit: audit.clone(),
        decision: Arc::new(config.decision.clone()),
        limits: LIMITS,
        metrics: metrics.clone(),
    };
    let s = serve(state.clone(), &serving).await;
    tokio::time::sleep(Duration::from_millis(400)).await;

    // keyd down: a sensitive pod that a policy selects cannot be confirmed, so it is refused.
    let (code, body) = s
        .https
        .request(
            "POST",
            "/validate",
            pod_review("1", "shop", "down-0", &[SENSITIVE]),
        )
        .await;
    let r = response(code, &body);
    assert_eq!(r["allowed"], false);
    let msg = r["status"]["message"].as_str().unwrap();
    assert!(msg.contains("keyd's status is unknown: keyd has not answered since the webhook started (last error: cannot connect to keyd"), "{msg}");
    assert!(msg.contains("keyd.when_unavailable = deny"), "{msg}");

    // The same situation with when_unavailable = allow: admitted with a warning.
    let open = AppState {
        decision: Arc::new(DecisionConfig {
            when_keyd_unavailable: WhenKeydUnavailable::Allow,
            ..config.decision.clone()
        }),
        ..state.clone()
    };
    let s_open = serve(open, &serving).await;
    let (code, body) = s_open
        .https
        .request(
            "POST",
            "/validate",
            pod_review("2", "shop", "open-0", &[SENSITIVE]),
        )
        .await;
    let r = response(code, &body);
    assert_eq!(r["allowed"], true);
    assert!(
        r["warnings"][0]
            .as_str()
            .unwrap()
            .contains("could not be confirmed"),
        "{r}"
    );
    assert_eq!(audit.len(), 2, "both decisions wait for keyd");

    // keyd comes up (IPsec ready): the webhook follows within its refresh interval, and the
    // decisions made while keyd was down are delivered to its audit log.
    let keyd = Keyd::start_on(&dir.path().join("keyd"), &format!("127.0.0.1:{port}")).await;
    keyd.rotate_ipsec().await;
    let mut admitted = false;
    for i in 0..100 {
        let (code, body) = s
            .https
            .request(
                "POST",
                "/validate",
                pod_review(&format!("u{i}"), "shop", "up-0", &[SENSITIVE]),
            )
            .await;
        if response(code, &body)["allowed"] == true {
            admitted = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        admitted,
        "a covered pod is admitted once keyd reports IPsec ready"
    );
    let (_, d) = keyd
        .wait_record(|a, d| a == "admission.denied" && d["name"] == "down-0")
        .await;
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("keyd's status is unknown"),
        "{d}"
    );
    keyd.wait_record(|a, d| a == "admission.warned" && d["name"] == "open-0")
        .await;

    // keyd goes away again: after max_staleness the cached status is no longer trusted.
    keyd.stop().await;
    tokio::time::sleep(config.keyd.max_staleness + Duration::from_millis(500)).await;
    let (code, body) = s
        .https
        .request(
            "POST",
            "/validate",
            pod_review("late", "shop", "late-0", &[SENSITIVE]),
        )
        .await;
    let r = response(code, &body);
    assert_eq!(r["allowed"], false);
    assert!(
        r["status"]["message"]
            .as_str()
            .unwrap()
            .contains("more than keyd.max_staleness"),
        "{r}"
    );
    let _ = stop_tx.send(true);
}

#[tokio::test]
async fn http_readyz_fails_until_the_caches_sync_and_health_and_metrics_answer() {
    // The real wiring (app::start) against an API server that is not there: the caches never
    // sync, so the webhook is alive but not ready.
    let dir = tempfile::tempdir().unwrap();
    let serving = ServingCert::create(dir.path(), "webhook");
    let setup = Keyd::prepare(&dir.path().join("keyd"));
    let config = Config::parse(
        &format!(
            "ops_listen = \"127.0.0.1:0\"\n{}",
            common::webhook_toml(&serving, &setup, "https://127.0.0.1:9", "")
        ),
        &Flags::default(),
    )
    .unwrap();
    let nowhere = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let kube_config = kube::Config::new(format!("https://{nowhere}").parse().unwrap());
    keyd_webhook::tls::install_default_provider();
    let client = kube::Client::try_from(kube_config).unwrap();
    let (stop, rx) = watch::channel(false);
    let running = keyd_webhook::app::start(config, client, rx).await.unwrap();
    let https = Https::new(running.addr, &serving.ca_pem);
    let ops = running.ops_addr.expect("ops listener");
    let task = tokio::spawn(running.serve());

    assert_eq!(https.request("GET", "/healthz", vec![]).await.0, 200);
    let (status, body) = https.request("GET", "/readyz", vec![]).await;
    assert_eq!(status, 503, "{}", String::from_utf8_lossy(&body));
    let (_, metrics) = https.request("GET", "/metrics", vec![]).await;
    assert!(
        String::from_utf8(metrics)
            .unwrap()
            .contains("keyd_webhook_ready 0")
    );

    // The plain ops port serves the same three, and not /validate.
    let plain = |path: &'static str| async move {
        let mut tcp = tokio::net::TcpStream::connect(ops).await.unwrap();
        tcp.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        tcp.read_to_string(&mut out).await.unwrap();
        out
    };
    assert!(plain("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(plain("/readyz").await.starts_with("HTTP/1.1 503"));
    assert!(
        plain("/validate").await.starts_with("HTTP/1.1 404")
            || plain("/validate").await.starts_with("HTTP/1.1 405")
    );

    // Shutdown is prompt even with nothing reachable.
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(15), task)
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn http_a_replaced_serving_certificate_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let serving = ServingCert::create(dir.path(), "webhook");
    let s = serve(fixed_state(DecisionConfig::default()), &serving).await;
    assert_eq!(s.https.request("GET", "/healthz", vec![]).await.0, 200);

    // A new CA and certificate, written where the old ones were (as cert-manager does).
    let next = ServingCert::create(dir.path(), "next");
    std::fs::rename(&next.key, &serving.key).unwrap();
    std::fs::rename(&next.cert, &serving.cert).unwrap();
    let fresh = Https::new(s.addr, &next.ca_pem);
    let mut ok = false;
    for _ in 0..50 {
        if let Ok((200, _)) = fresh.try_request("GET", "/healthz", vec![]).await {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "a client trusting only the new CA never got through");
    let _ = s.stop.send(true);
}

/// keyd renews the webhook's client certificate in its Secret and the kubelet updates the
/// mounted files: the next request to keyd uses the new certificate, without a restart.
#[tokio::test]
async fn http_a_renewed_client_certificate_for_keyd_is_used_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let keyd = Keyd::start(&dir.path().join("keyd")).await;
    let files = dir.path().join("client");
    std::fs::create_dir_all(&files).unwrap();
    let paths = keyd_webhook::tls::ClientTlsPaths {
        ca: files.join("ca.crt"),
        cert: files.join("tls.crt"),
        key: files.join("tls.key"),
    };
    // First a certificate keyd does not trust (another CA's).
    let other = keyd::pki::CertificateAuthority::generate("another CA").unwrap();
    let foreign = other
        .issue_client(
            &keyd_proto::identity::Identity::Webhook("webhook".into()),
            Duration::from_secs(3600),
        )
        .unwrap();
    std::fs::copy(&keyd.setup.pki.ca, &paths.ca).unwrap();
    foreign.write(&paths.cert, &paths.key).unwrap();
    keyd_webhook::tls::install_default_provider();
    let tls = keyd_webhook::tls::client_config(&paths).unwrap();
    let client = KeydClient::new(&keyd.url(), tls, Duration::from_secs(5))
        .unwrap()
        .with_reload(paths.clone());
    assert!(
        client.enforcement().await.is_err(),
        "keyd took another CA's certificate"
    );

    // The renewed files: keyd's own certificate for the webhook.
    std::fs::copy(&keyd.setup.pki.webhook.key, &paths.key).unwrap();
    std::fs::copy(&keyd.setup.pki.webhook.cert, &paths.cert).unwrap();
    client.enforcement().await.unwrap();

    // Without reloading, the same renewal is not seen: the test above depends on it.
    foreign.write(&paths.cert, &paths.key).unwrap();
    let fixed = KeydClient::new(
        &keyd.url(),
        keyd_webhook::tls::client_config(&paths).unwrap(),
        Duration::from_secs(5),
    )
    .unwrap();
    std::fs::copy(&keyd.setup.pki.webhook.key, &paths.key).unwrap();
    std::fs::copy(&keyd.setup.pki.webhook.cert, &paths.cert).unwrap();
    assert!(fixed.enforcement().await.is_err());
    keyd.stop().await;
}
