//! Node bootstrap end to end (no privileges): node-shim's client against keyd's bootstrap
//! listener, with a stand-in for the Kubernetes API server's TokenReview and pod endpoints.
//! The stand-in answers in the API's own shapes; the test against a real kube-apiserver is in
//! the Kubernetes harness (see docs/testing.md).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use common::*;
use keyd::bootstrap::{KubeAuth, KubeError, NodeFacts, PodFacts, ReviewedUser, TokenReviewStatus};
use keyd_node_shim::bootstrap::{self, BootstrapError, Bootstrapper, Issued};
use keyd_node_shim::keyd_client::{KeydClient, KeydError};
use keyd_proto::{NodeRegistration, SecretString, Timestamp};

/// Tokens `token-<pod>` are valid bound tokens of keyd/node-shim for pod `<pod>`; pod
/// `shim-on-a` runs on node-a, `shim-on-b` on node-b; anything else is invalid.
/// `nodes_down`: reading a Node object fails, as with an API server that is away.
#[derive(Debug, Default)]
struct FakeKube {
    nodes_down: std::sync::atomic::AtomicBool,
}

#[async_trait::async_trait]
impl KubeAuth for FakeKube {
    async fn token_review(
        &self,
        token: &SecretString,
        audience: &str,
    ) -> Result<TokenReviewStatus, KubeError> {
        let Some(pod) = token.expose().strip_prefix("token-") else {
            return Ok(TokenReviewStatus {
                authenticated: false,
                error: Some("invalid bearer token".into()),
                ..Default::default()
            });
        };
        Ok(TokenReviewStatus {
            authenticated: true,
            user: ReviewedUser {
                username: "system:serviceaccount:keyd:node-shim".into(),
                uid: "sa-uid".into(),
                extra: BTreeMap::from([
                    (
                        "authentication.kubernetes.io/pod-name".to_owned(),
                        vec![pod.to_owned()],
                    ),
                    (
                        "authentication.kubernetes.io/pod-uid".to_owned(),
                        vec![format!("uid-{pod}")],
                    ),
                ]),
            },
            audiences: vec![audience.to_owned()],
            error: None,
        })
    }

    async fn pod(&self, namespace: &str, name: &str) -> Result<Option<PodFacts>, KubeError> {
        assert_eq!(namespace, "keyd");
        let node = match name {
            "shim-on-a" => "node-a",
            "shim-on-b" => "node-b",
            _ => return Ok(None),
        };
        Ok(Some(PodFacts {
            uid: format!("uid-{name}"),
            node_name: Some(node.into()),
            phase: Some("Running".into()),
        }))
    }

    async fn node(&self, name: &str) -> Result<Option<NodeFacts>, KubeError> {
        if self.nodes_down.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(KubeError::Timeout {
                what: "reading a node",
            });
        }
        let (address, cidr) = match name {
            "node-a" => ("192.168.0.1", "10.1.0.0/24"),
            "node-b" => ("192.168.0.2", "10.2.0.0/24"),
            "node-unreachable" => {
                return Err(KubeError::Timeout {
                    what: "reading a node",
                });
            }
            _ => return Ok(None),
        };
        Ok(Some(NodeFacts {
            addresses: vec![address.parse().unwrap()],
            pod_cidrs: vec![cidr.parse().unwrap()],
        }))
    }
}

fn bootstrapper(
    keyd: &KeydHarness,
    dir: &std::path::Path,
    node: &str,
    token: &str,
) -> Bootstrapper {
    let token_path = dir.join(format!("{node}-token"));
    std::fs::write(&token_path, format!("{token}\n")).unwrap();
    Bootstrapper {
        server: format!("https://127.0.0.1:{}", keyd.bootstrap.unwrap().port()),
        ca: keyd.setup.pki.ca.clone(),
        token_path,
        cert_dir: dir.join(node),
        node: node.into(),
    }
}

#[tokio::test]
async fn a_projected_token_buys_a_short_lived_node_certificate() {
    let keyd = KeydHarness::start_with_bootstrap(Arc::new(FakeKube::default())).await;
    let dir = tempfile::tempdir().unwrap();
    let b = bootstrapper(&keyd, dir.path(), "node-a", "token-shim-on-a");
    let issued = b.obtain().await.unwrap();
    let life = issued.not_after.0 - issued.not_before.0;
    // 1m validity plus keyd's 5-minute backdating of not_before.
    assert!((360..=361).contains(&life), "lifetime {life}s");
    let paths = bootstrap::paths(&b.cert_dir, &b.ca);
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&paths.key).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    // The certificate is node-a's identity on the mTLS API, and only node-a's.
    let mut client = KeydClient::new(&keyd_url(&keyd), "node-a", paths.clone());
    client.register(&a_registration()).await.unwrap();
    let mut as_b = KeydClient::new(&keyd_url(&keyd), "node-b", paths);
    let e = as_b.fetch_bundle(None, None).await.unwrap_err();
    assert!(
        matches!(&e, KeydError::Status { status, .. } if status.as_u16() == 403),
        "{e}"
    );
}

/// With the Kubernetes API, a node registers only the addresses and pod CIDRs of its Node object;
/// a node without one registers nothing, and an unreachable API server refuses for now (503),
/// never accepts.
#[tokio::test]
async fn a_node_registers_only_what_its_node_object_says() {
    let kube = Arc::new(FakeKube::default());
    let keyd = KeydHarness::start_with_bootstrap(Arc::clone(&kube) as Arc<dyn KubeAuth>).await;
    let dir = tempfile::tempdir().unwrap();
    let b = bootstrapper(&keyd, dir.path(), "node-a", "token-shim-on-a");
    b.obtain().await.unwrap();
    let mut client = KeydClient::new(
        &keyd_url(&keyd),
        "node-a",
        bootstrap::paths(&b.cert_dir, &b.ca),
    );
    let mut reg = a_registration();
    reg.pod_cidrs = vec!["10.1.0.0/25".parse().unwrap()];
    client.register(&reg).await.unwrap();
    for (endpoint, cidr, why) in [
        (
            "192.168.0.2",
            "10.1.0.0/24",
            "endpoint 192.168.0.2 is not among",
        ),
        (
            "192.168.0.1",
            "10.2.0.0/24",
            "pod CIDR 10.2.0.0/24 does not lie inside",
        ),
    ] {
        reg.endpoint = endpoint.parse().unwrap();
        reg.pod_cidrs = vec![cidr.parse().unwrap()];
        let e = client.register(&reg).await.unwrap_err();
        match &e {
            KeydError::Status { status, message } => {
                assert_eq!(status.as_u16(), 403, "{e}");
                assert!(
                    message.contains(why) && message.contains("Node object"),
                    "{message}"
                );
            }
            other => panic!("{other}"),
        }
    }
    assert_eq!(
        keyd.keyd.list_nodes()[0].pod_cidrs,
        vec!["10.1.0.0/25".parse::<ipnet::IpNet>().unwrap()]
    );
    let register = |name: &'static str| {
        let k = Arc::clone(&keyd.keyd);
        async move {
            k.register_node(
                &keyd_proto::identity::Identity::Node(name.into()),
                name,
                a_registration(),
            )
            .await
            .unwrap_err()
            .to_string()
        }
    };
    // With the API server away, the registration keyd holds is accepted again (a restarting
    // node), a changed one is not (503), and nothing is accepted on the node's word alone.
    kube.nodes_down
        .store(true, std::sync::atomic::Ordering::SeqCst);
    reg.endpoint = "192.168.0.1".parse().unwrap();
    reg.pod_cidrs = vec!["10.1.0.0/25".parse().unwrap()];
    client.register(&reg).await.unwrap();
    reg.pod_cidrs = vec!["10.1.0.0/24".parse().unwrap()];
    let e = client.register(&reg).await.unwrap_err();
    assert!(
        matches!(&e, KeydError::Status { status, message }
            if status.as_u16() == 503 && message.contains("cannot check")),
        "{e}"
    );
    kube.nodes_down
        .store(false, std::sync::atomic::Ordering::SeqCst);
    client.register(&reg).await.unwrap();
    let why = register("node-ghost").await;
    assert!(why.contains("no Node object \"node-ghost\""), "{why}");
    let why = register("node-unreachable").await;
    assert!(
        why.contains("cannot check node \"node-unreachable\""),
        "{why}"
    );
}

/// node-a's registration (an address, nothing else).
fn a_registration() -> NodeRegistration {
    NodeRegistration {
        endpoint: "192.168.0.1".parse().unwrap(),
        pod_cidrs: vec![],
        wireguard_public_key: None,
        wireguard_key_epoch: None,
        boot_id: None,
    }
}

fn keyd_url(k: &KeydHarness) -> String {
    format!("https://127.0.0.1:{}", k.api.port())
}

#[tokio::test]
async fn refusals_name_the_reason() {
    let keyd = KeydHarness::start_with_bootstrap(Arc::new(FakeKube::default())).await;
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("node-a", "not-a-token", "not valid"),
        // A pod on node-b asking for node-a's identity.
        ("node-a", "token-shim-on-b", "runs on node \"node-b\""),
        ("node-a", "token-gone", "does not exist"),
    ];
    for (node, token, why) in cases {
        let e = bootstrapper(&keyd, dir.path(), node, token)
            .obtain()
            .await
            .unwrap_err();
        match &e {
            BootstrapError::Refused { status, message } => {
                assert_eq!(*status, 403, "{e}");
                assert!(message.contains(why), "{message}");
            }
            other => panic!("{token}: {other}"),
        }
        assert!(!dir.path().join(node).join("node.pem").exists());
    }
}

/// A removed node gets no certificate from bootstrap until an admin readmits it.
#[tokio::test]
async fn a_removed_node_cannot_bootstrap_until_readmitted() {
    let keyd = KeydHarness::start_with_bootstrap(Arc::new(FakeKube::default())).await;
    let dir = tempfile::tempdir().unwrap();
    keyd.keyd
        .register_node(
            &keyd_proto::identity::Identity::Node("node-a".into()),
            "node-a",
            a_registration(),
        )
        .await
        .unwrap();
    keyd.keyd
        .remove_node(&"admin/test", "node-a", false)
        .await
        .unwrap();
    let e = bootstrapper(&keyd, dir.path(), "node-a", "token-shim-on-a")
        .obtain()
        .await
        .unwrap_err();
    match &e {
        BootstrapError::Refused { status, message } => {
            assert_eq!(*status, 403);
            assert!(message.contains("was removed"), "{message}");
        }
        other => panic!("{other}"),
    }
    keyd.keyd
        .readmit_node(&"admin/test", "node-a")
        .await
        .unwrap();
    let b = bootstrapper(&keyd, dir.path(), "node-a", "token-shim-on-a");
    b.obtain().await.unwrap();
    // The new certificate postdates the removal (bootstrap backdates no further), so the mTLS
    // API accepts it.
    let mut client = KeydClient::new(
        &keyd_url(&keyd),
        "node-a",
        bootstrap::paths(&b.cert_dir, &b.ca),
    );
    client.register(&a_registration()).await.unwrap();
}

#[tokio::test]
async fn renews_before_expiry() {
    let keyd = KeydHarness::start_with_bootstrap(Arc::new(FakeKube::default())).await;
    let dir = tempfile::tempdir().unwrap();
    let b = bootstrapper(&keyd, dir.path(), "node-a", "token-shim-on-a");
    b.obtain().await.unwrap();
    let cert = bootstrap::paths(&b.cert_dir, &b.ca).cert;
    let first = std::fs::read_to_string(&cert).unwrap();
    // Pretend the certificate is two thirds through its life already.
    let now = Timestamp::from_system(SystemTime::now()).0;
    let issued = Issued {
        not_before: Timestamp(now - 20),
        not_after: Timestamp(now + 10),
    };
    let (stop, rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(b.clone().renew_loop(issued, Duration::from_millis(100), rx));
    let mut renewed = false;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if std::fs::read_to_string(&cert).unwrap() != first {
            renewed = true;
            break;
        }
    }
    stop.send(true).unwrap();
    task.await.unwrap();
    assert!(renewed, "the certificate was not renewed");
}

#[tokio::test]
async fn a_restart_starts_on_the_certificate_it_already_has() {
    let keyd = KeydHarness::start_with_bootstrap(Arc::new(FakeKube::default())).await;
    let dir = tempfile::tempdir().unwrap();
    let b = bootstrapper(&keyd, dir.path(), "node-a", "token-shim-on-a");
    assert_eq!(b.existing(), None, "nothing obtained yet");
    let issued = b.obtain().await.unwrap();
    assert_eq!(b.existing(), Some(issued));

    // Usable without a token or keyd: what a restart during an API server outage needs.
    let mut offline = b.clone();
    offline.token_path = dir.path().join("no-such-token");
    offline.server = "https://127.0.0.1:9".into();
    assert_eq!(offline.existing(), Some(issued));

    // Not another node's, and not with a key that does not match.
    let mut other = b.clone();
    other.node = "node-b".into();
    assert_eq!(other.existing(), None, "names node-a, not node-b");
    let p = bootstrap::paths(&b.cert_dir, &b.ca);
    let stranger = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(&p.key, stranger.serialize_pem()).unwrap();
    assert_eq!(b.existing(), None, "the key does not match the certificate");
}

/// A loop of bad requests from one address: after `max_requests_per_minute` (30 by default)
/// they get 429 with Retry-After, and the audit log holds one full refusal (the node name cut
/// to a bounded length) plus one summary, written at the latest when keyd stops, not a record
/// per request.
#[tokio::test]
async fn a_flood_of_bad_requests_is_limited_and_summarised() {
    let keyd = KeydHarness::start_with_bootstrap(Arc::new(FakeKube::default())).await;
    let connector = keyd_mtls::client::Connector::new(
        &format!("https://127.0.0.1:{}", keyd.bootstrap.unwrap().port()),
        keyd_mtls::tls::server_auth_client_config(&keyd.setup.pki.ca).unwrap(),
    )
    .unwrap();
    let long_name = "x".repeat(60_000);
    let mut statuses: BTreeMap<u16, u32> = BTreeMap::new();
    let mut retry_after = None;
    for i in 0..40 {
        let node = if i == 0 { long_name.as_str() } else { "node-a" };
        let body = serde_json::json!({ "node": node, "token": "not-a-token", "csr": "x" });
        let r = connector
            .connect()
            .await
            .unwrap()
            .send(
                http::Method::POST,
                "/v1/bootstrap/node",
                Some(serde_json::to_vec(&body).unwrap()),
                &[(http::header::CONTENT_TYPE, "application/json")],
            )
            .await
            .unwrap();
        *statuses.entry(r.status.as_u16()).or_default() += 1;
        if r.status == 429 {
            retry_after = r.headers.get(http::header::RETRY_AFTER).cloned();
        }
    }
    assert_eq!(
        statuses,
        BTreeMap::from([(422, 1), (403, 29), (429, 10)]),
        "{statuses:?}"
    );
    let wait: u64 = retry_after
        .expect("Retry-After")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&wait), "{wait}");

    let records = |action: &str| {
        keyd.keyd
            .store()
            .audit_range(0, 10_000)
            .unwrap()
            .into_iter()
            .filter(|r| r.event.action == action)
            .collect::<Vec<_>>()
    };
    let full = records("bootstrap.refused");
    assert_eq!(full.len(), 1, "one full record per source and window");
    let node = full[0].event.details["node"].as_str().unwrap();
    assert!(
        node.len() < 300 && node.ends_with("(60000 bytes)"),
        "{node:.80}"
    );
    assert!(full[0].event.details["reason"].as_str().unwrap().len() < 600);
    assert_eq!(full[0].event.details["source"], "127.0.0.1");
    assert!(
        records("bootstrap.refused.summary").is_empty(),
        "the window is still open"
    );

    // Stopping keyd writes the summary of the open window.
    keyd.stop();
    let mut summary = Vec::new();
    for _ in 0..100 {
        summary = records("bootstrap.refused.summary");
        if !summary.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(summary.len(), 1, "{summary:?}");
    let d = &summary[0].event.details;
    assert_eq!(
        (d["refusals"].as_u64(), d["rate_limited"].as_u64()),
        (Some(29), Some(10))
    );
    assert_eq!(d["source"], "127.0.0.1");
    assert!(
        d["last_reason"].as_str().unwrap().contains("not valid"),
        "{d}"
    );
}
