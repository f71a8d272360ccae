//! keyd's API over real mTLS on loopback: authorization by certificate, handshake refusals,
//! persistence across restarts, key bundles, and bad input.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;

use base64::Engine as _;
use common::{Harness, drive_rollout};
use http::{Method, StatusCode, header};
use keyd::pki::CertificateAuthority;
use keyd_mtls::client::{Connector, Response};
use keyd_proto::identity::Identity;
use keyd_proto::{ErrorBody, IpsecStatus, KeyRole, NodeBundle, NodeInfo, NodeRegistration, Status};
use serde_json::json;

fn wg_public_key(seed: u8) -> String {
    let secret = x25519_dalek::StaticSecret::from([seed; 32]);
    base64::engine::general_purpose::STANDARD.encode(x25519_dalek::PublicKey::from(&secret))
}

fn registration(ip: &str, cidr: &str, wg_seed: u8) -> NodeRegistration {
    NodeRegistration {
        endpoint: ip.parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
        wireguard_public_key: Some(wg_public_key(wg_seed)),
        wireguard_key_epoch: None,
        boot_id: Some(format!("boot-{wg_seed}")),
    }
}

fn error_of(resp: &Response) -> ErrorBody {
    serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("not a JSON error body ({e}): {resp:?}"))
}

async fn register_both(h: &Harness) {
    for (name, ip, cidr, seed) in [
        ("node-a", "192.0.2.1", "10.0.1.0/24", 1),
        ("node-b", "192.0.2.2", "10.0.2.0/24", 2),
    ] {
        let r = h
            .node(name)
            .await
            .put_json(&format!("/v1/nodes/{name}"), &registration(ip, cidr, seed))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    }
}

#[tokio::test]
async fn node_a_cannot_touch_node_b() {
    let h = Harness::start().await;
    register_both(&h).await;
    let mut a = h.node("node-a").await;
    for (method, path) in [
        (Method::GET, "/v1/nodes/node-b/bundle"),
        (Method::PUT, "/v1/nodes/node-b"),
        (Method::POST, "/v1/nodes/node-b/ack"),
    ] {
        let r = a
            .send(method.clone(), path, Some(b"{}".to_vec()), &[])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path}");
        let e = error_of(&r);
        assert_eq!(e.error, "forbidden");
        assert!(
            e.message.contains("node-a") && e.message.contains("node-b"),
            "{}",
            e.message
        );
    }
    // Its own bundle is fine.
    let r = a.get("/v1/nodes/node-a/bundle").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    // And the refusals are in the audit log, with who, what and why.
    let refused: Vec<_> = h
        .keyd
        .store()
        .audit_range(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|r| r.event.action == "request.refused")
        .collect();
    assert_eq!(refused.len(), 3);
    assert!(refused.iter().all(|r| r.event.actor == "node/node-a"));
    assert_eq!(
        refused[0].event.details["request"],
        "GET /v1/nodes/node-b/bundle"
    );
}

#[tokio::test]
async fn admin_endpoints_refuse_node_certificates() {
    let h = Harness::start().await;
    let mut a = h.node("node-a").await;
    for (method, path) in [
        (Method::GET, "/v1/status"),
        (Method::GET, "/v1/nodes"),
        (Method::GET, "/v1/ipsec"),
        (Method::POST, "/v1/ipsec/rotate"),
        (Method::POST, "/v1/ipsec/import"),
        (Method::GET, "/v1/ipsec/cilium"),
    ] {
        let r = a
            .send(method.clone(), path, Some(b"{}".to_vec()), &[])
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{method} {path}");
        assert!(error_of(&r).message.contains("admin certificate"));
    }
    // Admins cannot fetch a node's bundle either: node endpoints need that node's certificate.
    let r = h
        .admin()
        .await
        .get("/v1/nodes/node-a/bundle")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(h.keyd.status().ipsec.keys.len(), 0, "nothing was rotated");
}

/// Expects the server to refuse the client during TLS: either the handshake fails or (TLS 1.3,
/// where the server checks the client certificate after the client finished) the first request
/// gets no HTTP response at all.
async fn assert_refused_in_tls(connector: Connector) {
    match connector.connect().await {
        Err(e) => assert!(
            matches!(e, keyd_mtls::client::ClientError::Handshake { .. }),
            "{e}"
        ),
        Ok(mut conn) => {
            let r = conn.get("/v1/status").await;
            assert!(
                r.is_err(),
                "got an HTTP response through a refused handshake: {r:?}"
            );
        }
    }
}

/// A connector to `h` with a client certificate `ca` issues for `id` (files under `dir`).
fn connector_with(
    h: &Harness,
    ca: &CertificateAuthority,
    id: &Identity,
    validity: std::time::Duration,
    dir: &std::path::Path,
) -> Connector {
    let cert = ca.issue_client(id, validity).unwrap();
    cert.write(&dir.join("c.pem"), &dir.join("k.pem")).unwrap();
    let tls = keyd_mtls::tls::client_config(&keyd_mtls::tls::TlsPaths {
        ca: h.setup.pki.ca.clone(),
        cert: dir.join("c.pem"),
        key: dir.join("k.pem"),
    })
    .unwrap();
    Connector::new(&h.server_url(), tls).unwrap()
}

#[tokio::test]
async fn wrong_ca_and_no_certificate_fail_the_handshake() {
    let h = Harness::start().await;
    let failed_before = h.keyd.metrics.encode();
    // A client certificate from another CA, claiming to be the admin.
    let rogue = CertificateAuthority::generate("rogue").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let connector = connector_with(
        &h,
        &rogue,
        &Identity::Admin("admin".into()),
        std::time::Duration::from_secs(3600),
        dir.path(),
    );
    assert_refused_in_tls(connector).await;

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&h.setup.pki.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let no_cert = rustls::ClientConfig::builder_with_provider(keyd_mtls::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    assert_refused_in_tls(Connector::new(&h.server_url(), Arc::new(no_cert)).unwrap()).await;

    // The server counted both refusals.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let metrics = h.keyd.metrics.encode();
    assert!(!failed_before.contains("outcome=\"failed\""));
    assert!(
        metrics.contains("keyd_tls_handshakes_total{outcome=\"failed\"} 2"),
        "{metrics}"
    );
}

use rustls_pki_types::pem::PemObject as _;

/// A connection does not outlive its client certificate: a long poll started while it was valid
/// ends when it expires, and keyd then closes the connection. (Should a request still arrive on
/// it, it is refused as expired: `Caller` checks the validity of every request.)
#[tokio::test]
async fn a_connection_whose_certificate_expired_is_refused() {
    let h = Harness::start().await;
    let ca =
        CertificateAuthority::load(&h.setup.pki.ca, &h.setup.pki.dir.join("ca-key.pem")).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut c = connector_with(
        &h,
        &ca,
        &Identity::Node("node-a".into()),
        std::time::Duration::from_secs(3),
        dir.path(),
    )
    .connect()
    .await
    .unwrap();
    let r = c
        .put_json(
            "/v1/nodes/node-a",
            &registration("192.0.2.1", "10.0.1.0/24", 1),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let r = c.get("/v1/nodes/node-a/bundle").await.unwrap();
    let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
    let t = std::time::Instant::now();
    let r = c
        .send(
            Method::GET,
            "/v1/nodes/node-a/bundle?wait=60s",
            None,
            &[(header::IF_NONE_MATCH, etag.as_str())],
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(10),
        "the long poll outlived the certificate: {:?}",
        t.elapsed()
    );
    // At expiry keyd closes the connection itself.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let e = c
        .get("/v1/nodes/node-a/bundle")
        .await
        .expect_err("the connection outlived its certificate");
    assert!(
        !keyd_mtls::error_chain(&e).contains("timed out"),
        "{}",
        keyd_mtls::error_chain(&e)
    );
}

#[tokio::test]
async fn restart_keeps_every_key() {
    let h = Harness::start().await;
    register_both(&h).await;
    let mut admin = h.admin().await;
    for _ in 0..3 {
        let r = admin
            .post_json("/v1/ipsec/rotate", &json!({}))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
        drive_rollout(&h, &["node-a", "node-b"]).await;
    }
    let line_before = admin
        .get("/v1/ipsec/cilium?format=line")
        .await
        .unwrap()
        .body;
    let status_before: Status =
        serde_json::from_slice(&admin.get("/v1/status").await.unwrap().body).unwrap();
    let bundle_before = h
        .node("node-a")
        .await
        .get("/v1/nodes/node-a/bundle")
        .await
        .unwrap()
        .body;
    let audit_before = h.keyd.store().audit_range(0, 10_000).unwrap();

    let h = h.restart().await;
    let mut admin = h.admin().await;
    assert_eq!(
        admin
            .get("/v1/ipsec/cilium?format=line")
            .await
            .unwrap()
            .body,
        line_before
    );
    let mut status_after: Status =
        serde_json::from_slice(&admin.get("/v1/status").await.unwrap().body).unwrap();
    // The custodian's last health check is, rightly, newer after a restart.
    let mut status_before = status_before;
    for s in [&mut status_before, &mut status_after] {
        if let Some(c) = s.custody.as_mut() {
            c.health.last_check = None;
        }
    }
    assert_eq!(status_after, status_before);
    assert_eq!(status_after.ipsec.outbound_spi, Some(3));
    assert_eq!(status_after.nodes, 2);
    let bundle_after = h
        .node("node-a")
        .await
        .get("/v1/nodes/node-a/bundle")
        .await
        .unwrap()
        .body;
    assert_eq!(
        bundle_after, bundle_before,
        "same keys, peers and PSKs after restart"
    );
    let audit_after = h.keyd.store().audit_range(0, 10_000).unwrap();
    assert_eq!(&audit_after[..audit_before.len()], &audit_before[..]);
}

#[tokio::test]
async fn bundles_carry_keys_peers_and_matching_psks() {
    let h = Harness::start().await;
    register_both(&h).await;
    let mut admin = h.admin().await;
    admin
        .post_json("/v1/ipsec/rotate", &json!({ "algorithm": "gcm256" }))
        .await
        .unwrap();
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    // Key 2 is staged: inbound only, key 1 still outbound.
    let staged: NodeBundle = serde_json::from_slice(
        &h.node("node-a")
            .await
            .get("/v1/nodes/node-a/bundle")
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    let ipsec = staged.ipsec.unwrap();
    assert_eq!(ipsec.outbound_spi, 1);
    assert_eq!(
        ipsec
            .keys
            .iter()
            .map(|k| (k.spi, k.role))
            .collect::<Vec<_>>(),
        vec![(2, KeyRole::Next), (1, KeyRole::Current)]
    );
    // Both nodes install key 2: the rollout turns active, key 1 stays for inbound.
    for n in ["node-a", "node-b"] {
        let r = h
            .node(n)
            .await
            .post_json(
                &format!("/v1/nodes/{n}/ack"),
                &json!({ "ipsec_spis": [1, 2], "ipsec_outbound_spi": 1 }),
            )
            .await
            .unwrap();
        assert!(r.status.is_success(), "{}", r.error_message());
    }

    let mut a = h.node("node-a").await;
    let resp = a.get("/v1/nodes/node-a/bundle").await.unwrap();
    let etag = resp
        .headers
        .get(header::ETAG)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    let ba: NodeBundle = serde_json::from_slice(&resp.body).unwrap();
    let bb: NodeBundle = serde_json::from_slice(
        &h.node("node-b")
            .await
            .get("/v1/nodes/node-b/bundle")
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(etag, format!("\"{}\"", ba.revision));
    let ipsec = ba.ipsec.as_ref().unwrap();
    assert_eq!(ipsec.outbound_spi, 2);
    assert_eq!(
        ipsec
            .keys
            .iter()
            .map(|k| (k.spi, k.role))
            .collect::<Vec<_>>(),
        vec![(2, KeyRole::Current), (1, KeyRole::Previous)],
        "current and previous"
    );
    let ipsec_b = bb.ipsec.as_ref().unwrap();
    assert_eq!(
        (ipsec.outbound_spi, &ipsec.keys),
        (ipsec_b.outbound_spi, &ipsec_b.keys),
        "every node holds the same PSKs"
    );
    // Each node's bundle lists the other nodes as IPsec peers (per-tunnel keys need their
    // addresses and boot IDs).
    assert_eq!(
        ipsec
            .peers
            .iter()
            .map(|p| p.node.as_str())
            .collect::<Vec<_>>(),
        ["node-b"]
    );
    assert_eq!(ipsec.peers[0].boot_id.as_deref(), Some("boot-2"));

    assert_eq!(ba.wireguard.peers.len(), 1);
    assert_eq!(ba.wireguard.peers[0].node, "node-b");
    assert_eq!(ba.wireguard.peers[0].public_key, wg_public_key(2));
    assert_eq!(
        ba.wireguard.peers[0].allowed_ips,
        vec!["10.0.2.0/24".parse::<ipnet::IpNet>().unwrap()]
    );
    assert_eq!(
        ba.wireguard.peers[0].preshared_key, bb.wireguard.peers[0].preshared_key,
        "both ends share the PSK"
    );
    assert_eq!(ba.wireguard.peers[0].preshared_key.len(), 32);

    // Conditional fetch: unchanged state answers 304 without a body.
    let cond = [(header::IF_NONE_MATCH, etag.as_str())];
    let r = a
        .send(Method::GET, "/v1/nodes/node-a/bundle", None, &cond)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(r.body.is_empty());
    // Completing the rollout changes the bundle: key 1 retires.
    drive_rollout(&h, &["node-a", "node-b"]).await;
    let r = a
        .send(Method::GET, "/v1/nodes/node-a/bundle", None, &cond)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let b2: NodeBundle = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        b2.ipsec
            .unwrap()
            .keys
            .iter()
            .map(|k| k.spi)
            .collect::<Vec<_>>(),
        vec![2],
        "key 1 retired"
    );

    // Acknowledge what was programmed; keyd records it.
    let r = a
        .post_json(
            "/v1/nodes/node-a/ack",
            &json!({ "ipsec_spis": [2], "ipsec_outbound_spi": 2, "wireguard_epoch": 1 }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let nodes: Vec<NodeInfo> =
        serde_json::from_slice(&admin.get("/v1/nodes").await.unwrap().body).unwrap();
    let na = nodes.iter().find(|n| n.name == "node-a").unwrap();
    assert_eq!(na.acked.ack.ipsec_spis, vec![2]);
    assert_eq!(na.acked.ack.ipsec_outbound_spi, Some(2));
    // An ack for a key keyd never issued is refused.
    let r = a
        .post_json("/v1/nodes/node-a/ack", &json!({ "ipsec_spis": [9] }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

#[tokio::test]
async fn every_key_event_is_audited_without_key_bytes() {
    let h = Harness::start().await;
    register_both(&h).await;
    let mut admin = h.admin().await;
    for _ in 0..3 {
        admin
            .post_json("/v1/ipsec/rotate", &json!({}))
            .await
            .unwrap();
        drive_rollout(&h, &["node-a", "node-b"]).await;
    }
    let line = String::from_utf8(
        admin
            .get("/v1/ipsec/cilium?format=line")
            .await
            .unwrap()
            .body
            .to_vec(),
    )
    .unwrap();
    let records = h.keyd.store().audit_range(0, 1000).unwrap();
    let actions: Vec<&str> = records.iter().map(|r| r.event.action.as_str()).collect();
    for expected in [
        "wireguard.psk_master.generated",
        "node.registered",
        "wireguard.node_key.registered",
        "ipsec.key.generated",
        "ipsec.key.staged",
        "ipsec.key.activated",
        "ipsec.key.retired",
        "ipsec.key.exported",
        "bundle.fetched",
        "node.keys.acknowledged",
    ] {
        assert!(actions.contains(&expected), "no {expected} in {actions:?}");
    }
    assert_eq!(
        actions
            .iter()
            .filter(|a| **a == "ipsec.key.generated")
            .count(),
        3
    );
    let gen3 = records
        .iter()
        .rev()
        .find(|r| r.event.action == "ipsec.key.generated")
        .unwrap();
    assert_eq!(gen3.event.actor, "admin/admin");
    assert_eq!(gen3.event.details["spi"], 3);
    let hex = line.split_whitespace().nth(2).unwrap();
    let all = serde_json::to_string(&records).unwrap();
    assert!(!all.contains(hex), "audit log holds key bytes");
}

#[tokio::test]
async fn import_follows_ciliums_rules() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    let import = |line: &str| json!({ "keys": line });
    let key = "a".repeat(40);
    let r = admin
        .post_json(
            "/v1/ipsec/import",
            &import(&format!("7+ rfc4106(gcm(aes)) {key} 128\n")),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let s: IpsecStatus = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(s.outbound_spi, Some(7));
    assert_eq!(s.keys[0].origin, "imported");
    // Key ID must increase.
    let r = admin
        .post_json(
            "/v1/ipsec/import",
            &import(&format!("5+ rfc4106(gcm(aes)) {} 128", "b".repeat(40))),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let e = error_of(&r);
    assert!(
        e.message.contains('5') && e.message.contains('7'),
        "{}",
        e.message
    );
    assert!(!e.message.contains(&"b".repeat(40)), "error leaks the key");
    // Algorithm / key length cannot change.
    let r = admin
        .post_json(
            "/v1/ipsec/import",
            &import(&format!("8+ rfc4106(gcm(aes)) {} 128", "c".repeat(72))),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // A malformed line names what is wrong.
    let r = admin
        .post_json("/v1/ipsec/import", &import("0+ rfc4106(gcm(aes)) zz 128"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // Nothing of the refused imports was kept.
    let s: IpsecStatus =
        serde_json::from_slice(&admin.get("/v1/ipsec").await.unwrap().body).unwrap();
    assert_eq!(s.keys.len(), 1);
    let line = admin
        .get("/v1/ipsec/cilium?format=line")
        .await
        .unwrap()
        .body;
    assert_eq!(
        &line[..],
        format!("7+ rfc4106(gcm(aes)) {key} 128").as_bytes()
    );
}

/// A global key (no `+`: one key and salt for every tunnel) is refused unless a legacy import
/// is configured, and the rotation after such an import is per-tunnel.
#[tokio::test]
async fn global_ipsec_keys_need_a_legacy_import_and_rotate_per_tunnel() {
    let global = json!({ "keys": format!("3 rfc4106(gcm(aes)) {} 128", "a".repeat(40)) });
    let h = Harness::start().await;
    let r = h
        .admin()
        .await
        .post_json("/v1/ipsec/import", &global)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let msg = error_of(&r).message;
    assert!(
        msg.contains("global") && msg.contains("'3+'") && msg.contains("allow_global_import"),
        "{msg}"
    );
    assert!(h.keyd.ipsec_status().keys.is_empty());

    let h = Harness::start_with_env(&[("KEYD_IPSEC_ALLOW_GLOBAL_IMPORT", "true")]).await;
    let mut admin = h.admin().await;
    let r = admin.post_json("/v1/ipsec/import", &global).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let s: IpsecStatus = serde_json::from_slice(&r.body).unwrap();
    assert!(!s.keys[0].per_tunnel);
    let r = admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let s: IpsecStatus = serde_json::from_slice(&r.body).unwrap();
    let next = s.keys.iter().find(|k| k.spi == 4).unwrap();
    assert!(next.per_tunnel, "{s:?}");
}

/// node-b registers with `seed`'s WireGuard key, written as `spelling` makes it.
async fn register_spelled(
    b: &mut keyd_mtls::client::Connection,
    seed: u8,
    spelling: fn(String) -> String,
) -> Response {
    let mut reg = registration("192.0.2.2", "10.0.2.0/24", seed);
    reg.wireguard_public_key = Some(spelling(wg_public_key(seed)));
    b.put_json("/v1/nodes/node-b", &reg).await.unwrap()
}

#[tokio::test]
async fn bad_input_gets_a_json_4xx_and_changes_nothing() {
    let h = Harness::start().await;
    let mut a = h.node("node-a").await;
    let put = |body: &[u8]| (Method::PUT, "/v1/nodes/node-a", Some(body.to_vec()));

    let (m, p, b) = put(b"{not json");
    let r = a.send(m, p, b, &[]).await.unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
    assert_eq!(error_of(&r).error, "invalid_json");

    let (m, p, b) = put(br#"{"endpoint":"192.0.2.1","podCidr":"10.0.0.0/24"}"#);
    let r = a.send(m, p, b, &[]).await.unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        error_of(&r).message.contains("podCidr"),
        "names the unknown field"
    );

    let (m, p, b) = put(br#"{"endpoint":"not-an-ip"}"#);
    let r = a.send(m, p, b, &[]).await.unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        !error_of(&r).message.contains("not-an-ip"),
        "string values are redacted from serde messages"
    );

    let big = format!(
        r#"{{"endpoint":"192.0.2.1","boot_id":"{}"}}"#,
        "x".repeat(100_000)
    );
    let r = a
        .send(Method::PUT, "/v1/nodes/node-a", Some(big.into_bytes()), &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(error_of(&r).error, "body_too_large");

    // Wrong content type.
    let r = a
        .send(
            Method::PUT,
            "/v1/nodes/node-a",
            None,
            &[(header::CONTENT_TYPE, "text/plain")],
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    assert_eq!(error_of(&r).error, "unsupported_media_type");

    // Semantically invalid: a WireGuard key that is not 32 bytes.
    let r = a
        .put_json(
            "/v1/nodes/node-a",
            &json!({ "endpoint": "192.0.2.1", "wireguard_public_key": "AAAA" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Unknown endpoint and wrong method.
    let r = a.get("/v1/nope").await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    assert_eq!(error_of(&r).error, "not_found");
    let r = a
        .send(Method::PATCH, "/v1/nodes/node-a", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::METHOD_NOT_ALLOWED);
    error_of(&r);

    // The connection still works and nothing was registered.
    assert!(h.keyd.list_nodes().is_empty());
    let r = a
        .put_json(
            "/v1/nodes/node-a",
            &registration("192.0.2.1", "10.0.1.0/24", 1),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    // A second node may not reuse node-a's WireGuard key, under any spelling of it (keyd trims
    // what it validates); a key is stored as one spelling.
    let mut b = h.node("node-b").await;
    for spelling in [|k| k, |k| format!(" {k}\n")] {
        let r = register_spelled(&mut b, 1, spelling).await;
        assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.error_message());
        assert!(error_of(&r).message.contains("node-a"));
    }
    let r = register_spelled(&mut b, 2, |k| format!("{k}\n")).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let info: NodeInfo = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(info.wireguard_public_key, Some(wg_public_key(2)));
}

#[tokio::test]
async fn ops_endpoints_answer_without_a_client_certificate() {
    let h = Harness::start().await;
    let get = |path: &str| {
        let addr = h.ops;
        let path = path.to_owned();
        async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
            s.write_all(
                format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
            )
            .await
            .unwrap();
            let mut out = String::new();
            s.read_to_string(&mut out).await.unwrap();
            out
        }
    };
    assert!(get("/healthz").await.starts_with("HTTP/1.1 200"));
    assert!(get("/readyz").await.starts_with("HTTP/1.1 200"));
    let m = get("/metrics").await;
    assert!(m.contains("keyd_nodes"), "{m}");
}

#[tokio::test]
async fn a_node_cannot_claim_another_nodes_address_or_pod_cidrs() {
    let h = Harness::start().await;
    register_both(&h).await;
    let mut b = h.node("node-b").await;
    let before = h.keyd.list_nodes();
    for (endpoint, cidrs, what) in [
        ("192.0.2.1", vec!["10.0.2.0/24"], "endpoint 192.0.2.1"),
        ("192.0.2.2", vec!["10.0.1.0/24"], "pod CIDR 10.0.1.0/24"),
        (
            "192.0.2.2",
            vec!["10.0.2.0/24", "10.0.1.128/25"],
            "pod CIDR 10.0.1.128/25 (it overlaps 10.0.1.0/24)",
        ),
        (
            "192.0.2.2",
            vec!["0.0.0.0/1"],
            "pod CIDR 0.0.0.0/1 (it overlaps 10.0.1.0/24)",
        ),
    ] {
        let mut reg = registration(endpoint, "10.0.2.0/24", 2);
        reg.pod_cidrs = cidrs.iter().map(|c| c.parse().unwrap()).collect();
        let r = b.put_json("/v1/nodes/node-b", &reg).await.unwrap();
        assert_eq!(r.status, StatusCode::CONFLICT, "{cidrs:?}");
        let msg = error_of(&r).message;
        assert!(
            msg.starts_with(&format!("{what} is held by node \"node-a\"")),
            "{msg}"
        );
    }
    assert_eq!(h.keyd.list_nodes().len(), before.len());
    for (old, now) in before.iter().zip(h.keyd.list_nodes()) {
        assert_eq!(
            (&old.endpoint, &old.pod_cidrs),
            (&now.endpoint, &now.pod_cidrs)
        );
    }
    let refused: Vec<_> = h
        .keyd
        .store()
        .audit_range(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|r| r.event.action == "node.claim_refused")
        .collect();
    assert_eq!(refused.len(), 4);
    assert_eq!(refused[0].event.details["held_by"], "node-a");
    assert_eq!(refused[0].event.actor, "node/node-b");
    // Its own facts, and other families, are fine; so is a CIDR next to node-a's.
    let mut reg = registration("192.0.2.2", "10.0.2.0/24", 2);
    reg.pod_cidrs.push("10.0.0.0/24".parse().unwrap());
    reg.pod_cidrs.push("fd00:2::/64".parse().unwrap());
    let r = b.put_json("/v1/nodes/node-b", &reg).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    // A bounded number of CIDRs.
    reg.pod_cidrs = (0..9)
        .map(|i| format!("10.9.{i}.0/24").parse().unwrap())
        .collect();
    let r = b.put_json("/v1/nodes/node-b", &reg).await.unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
}

/// `keyctl nodes remove`: the node leaves every bundle, its certificate is refused at once (on
/// a connection it already holds too), a new IPsec key and preshared-key epoch follow, all
/// audited; readmitting it does not revive a certificate from before the removal.
async fn bundle(c: &mut keyd_mtls::client::Connection, name: &str) -> Response {
    c.get(&format!("/v1/nodes/{name}/bundle")).await.unwrap()
}

/// The error of a new connection with node `name`'s certificate, which must fail: at the
/// handshake, or (TLS 1.3 sends the server's verdict on the client certificate after the client
/// finished) at the first request.
async fn handshake_refused(h: &Harness, name: &str) -> String {
    refused_by(&node_connector(h, name), name).await
}

/// A connector with node `name`'s certificate; it keeps the TLS sessions it is given, so it
/// resumes when the server allows it.
fn node_connector(h: &Harness, name: &str) -> Connector {
    let tls = keyd_mtls::tls::client_config(&h.paths_for(&Identity::Node(name.into()))).unwrap();
    Connector::new(&h.server_url(), tls).unwrap()
}

async fn refused_by(connector: &Connector, name: &str) -> String {
    let e = match connector.connect().await {
        Err(e) => e,
        Ok(mut c) => c
            .get(&format!("/v1/nodes/{name}/bundle"))
            .await
            .expect_err("the connection must be refused"),
    };
    keyd_mtls::error_chain(&e)
}

#[tokio::test]
async fn a_removed_node_leaves_the_bundles_and_its_certificate_is_refused() {
    let h = Harness::start().await;
    register_both(&h).await;
    let mut admin = h.admin().await;
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    let mut a = h.node("node-a").await;
    let mut b = h.node("node-b").await;
    assert_eq!(bundle(&mut b, "node-b").await.status, StatusCode::OK);
    // A connector that has had a session: it would resume one if keyd offered resumption.
    let resuming = node_connector(&h, "node-b");
    let mut c = resuming.connect().await.unwrap();
    assert_eq!(bundle(&mut c, "node-b").await.status, StatusCode::OK);
    drop(c);
    // Only an admin removes.
    let r = a
        .send(Method::DELETE, "/v1/nodes/node-b", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let r = admin
        .send(Method::DELETE, "/v1/nodes/node-b", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let removal: keyd_proto::NodeRemoval = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(removal.ipsec, "rollout to key 2 started");
    assert_eq!(removal.wireguard_psk_epoch, Some(2));

    // node-b's open connection and a new one are refused; so is registering again.
    let r = bundle(&mut b, "node-b").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.error_message().contains("certificate revoked"),
        "{}",
        r.error_message()
    );
    // A new connection fails at the TLS handshake: the certificate is revoked; also for a
    // client that would resume an earlier session.
    let why = handshake_refused(&h, "node-b").await;
    assert!(why.contains("CertificateRevoked"), "{why}");
    let why = refused_by(&resuming, "node-b").await;
    assert!(why.contains("CertificateRevoked"), "{why}");
    // node-a no longer has node-b as a peer.
    let ba: NodeBundle = serde_json::from_slice(&bundle(&mut a, "node-a").await.body).unwrap();
    assert!(ba.wireguard.peers.iter().all(|p| p.node != "node-b"));
    assert!(ba.ipsec.unwrap().peers.iter().all(|p| p.node != "node-b"));
    assert_eq!(ba.wireguard.epoch, 2);
    let actions: Vec<_> = h
        .keyd
        .store()
        .audit_range(0, 10_000)
        .unwrap()
        .into_iter()
        .map(|r| (r.event.action, r.event.actor))
        .collect();
    assert!(actions.contains(&("node.removed".into(), "admin/admin".into())));
    assert!(actions.contains(&("request.refused".into(), "node/node-b".into())));

    // Readmitted: this certificate is from before the removal, so it stays refused.
    let r = admin
        .send(Method::POST, "/v1/nodes/node-b/readmit", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT, "{}", r.error_message());
    let r = bundle(&mut b, "node-b").await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(
        r.error_message().contains("from before the removal"),
        "{}",
        r.error_message()
    );
    let why = handshake_refused(&h, "node-b").await;
    assert!(why.contains("CertificateRevoked"), "{why}");
    // Other nodes' handshakes are untouched.
    assert_eq!(
        bundle(&mut h.node("node-a").await, "node-a").await.status,
        StatusCode::OK
    );
    // Removing a node that is not registered.
    let r = admin
        .send(Method::DELETE, "/v1/nodes/node-z", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
}

async fn wireguard(webhook: &mut keyd_mtls::client::Connection) -> keyd_proto::ModeStatus {
    let r = webhook.get("/v1/enforcement").await.unwrap();
    serde_json::from_slice::<keyd_proto::EnforcementStatus>(&r.body)
        .unwrap()
        .wireguard
}

#[tokio::test]
async fn the_webhook_reads_enforcement_and_reports_decisions() {
    let h = Harness::start().await;
    let mut webhook = h.connect_as(&Identity::Webhook("webhook".into())).await;
    let r = webhook.get("/v1/enforcement").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let e: keyd_proto::EnforcementStatus = serde_json::from_slice(&r.body).unwrap();
    assert!(
        !e.ipsec.active && e.ipsec.reason.is_some(),
        "no key yet: {e:?}"
    );
    h.admin()
        .await
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    let e: keyd_proto::EnforcementStatus =
        serde_json::from_slice(&webhook.get("/v1/enforcement").await.unwrap().body).unwrap();
    assert!(e.ipsec.active && e.ipsec.within_schedule);

    // WireGuard: not active while fewer than two nodes have a key and have programmed their
    // peers (one node alone encrypts nothing).
    let w = wireguard(&mut webhook).await;
    assert!(!w.active, "{w:?}");
    assert_eq!(
        w.reason.as_deref(),
        Some("no node has registered a WireGuard public key")
    );
    for (name, ip, cidr, seed) in [
        ("node-a", "192.0.2.1", "10.0.1.0/24", 1),
        ("node-b", "192.0.2.2", "10.0.2.0/24", 2),
    ] {
        let mut node = h.node(name).await;
        let r = node
            .put_json(&format!("/v1/nodes/{name}"), &registration(ip, cidr, seed))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
        let w = wireguard(&mut webhook).await;
        assert!(!w.active, "{name} registered, nothing acknowledged: {w:?}");
        let r = node
            .post_json(
                &format!("/v1/nodes/{name}/ack"),
                &json!({ "wireguard_epoch": 1 }),
            )
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    }
    let w = wireguard(&mut webhook).await;
    assert!(w.active && w.within_schedule, "{w:?}");

    let decision = json!({ "at": "2026-11-21T08:00:00Z", "outcome": "denied", "enforcement": "enforce",
        "operation": "CREATE", "kind": "Pod", "namespace": "payments", "name": "api-0",
        "user": "alice", "policies": [], "reason": "no EncryptionPolicy selects this pod" });
    let r = webhook
        .post_json("/v1/audit/admission", &json!({ "decisions": [decision] }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let rec = h
        .keyd
        .store()
        .audit_range(0, 1000)
        .unwrap()
        .into_iter()
        .find(|r| r.event.action == "admission.denied")
        .unwrap();
    assert_eq!(rec.event.actor, "webhook/webhook");
    assert_eq!(rec.event.details["namespace"], "payments");
    // An outcome outside the fixed set is refused (it names an audit action).
    let mut bad = decision.clone();
    bad["outcome"] = json!("whatever");
    let r = webhook
        .post_json("/v1/audit/admission", &json!({ "decisions": [bad] }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    // The webhook certificate cannot act as admin or node; nodes cannot read enforcement.
    assert_eq!(
        webhook.get("/v1/status").await.unwrap().status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        webhook.get("/v1/nodes/node-a/bundle").await.unwrap().status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        h.node("node-a")
            .await
            .get("/v1/enforcement")
            .await
            .unwrap()
            .status,
        StatusCode::FORBIDDEN
    );
    let r = h
        .admin()
        .await
        .post_json("/v1/audit/admission", &json!({ "decisions": [] }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn with_allocations_a_node_claims_only_what_an_admin_allowed() {
    let h = Harness::start_with_env(&[("KEYD_NODE_CLAIMS", "allocation")]).await;
    let mut a = h.node("node-a").await;
    let mut admin = h.admin().await;
    let audited = |action: &str| {
        h.keyd
            .store()
            .audit_range(0, 1000)
            .unwrap()
            .into_iter()
            .filter(|r| r.event.action == action)
            .collect::<Vec<_>>()
    };

    // No allocation: refused, with what to do, and audited.
    let reg = registration("192.0.2.1", "10.0.1.0/24", 1);
    let r = a.put_json("/v1/nodes/node-a", &reg).await.unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let msg = error_of(&r).message;
    assert!(
        msg.contains("has no allocation") && msg.contains("keyctl nodes allow node-a"),
        "{msg}"
    );
    assert_eq!(audited("node.claim_refused").len(), 1);
    assert!(h.keyd.list_nodes().is_empty());

    // Only an admin allocates.
    let allocation = json!({ "endpoints": ["192.0.2.1"], "pod_cidrs": ["10.0.1.0/24"] });
    let r = a
        .put_json("/v1/nodes/node-a/allocation", &allocation)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = admin
        .put_json("/v1/nodes/node-a/allocation", &allocation)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    assert_eq!(audited("node.allocated").len(), 1);

    // Inside it: fine (a part of the CIDR too); outside: refused, naming what and where from.
    let r = a.put_json("/v1/nodes/node-a", &reg).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let part = registration("192.0.2.1", "10.0.1.128/25", 1);
    let r = a.put_json("/v1/nodes/node-a", &part).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    for (endpoint, cidr, what) in [
        ("192.0.2.9", "10.0.1.0/24", "endpoint 192.0.2.9"),
        ("192.0.2.1", "10.0.0.0/23", "pod CIDR 10.0.0.0/23"),
    ] {
        let r = a
            .put_json("/v1/nodes/node-a", &registration(endpoint, cidr, 1))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::FORBIDDEN, "{endpoint} {cidr}");
        let msg = error_of(&r).message;
        assert!(msg.starts_with(what) && msg.contains("allocation"), "{msg}");
    }
    assert_eq!(h.keyd.list_nodes()[0].pod_cidrs, part.pod_cidrs);

    // Another node's allocation may not overlap this one.
    for body in [
        json!({ "endpoints": ["192.0.2.1"] }),
        json!({ "endpoints": ["192.0.2.2"], "pod_cidrs": ["10.0.0.0/16"] }),
    ] {
        let r = admin
            .put_json("/v1/nodes/node-b/allocation", &body)
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::CONFLICT, "{body}");
        assert!(error_of(&r).message.contains("node-a"));
    }
    let r = admin
        .put_json("/v1/nodes/node-b/allocation", &json!({ "endpoints": [] }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // Moving node-a's allocation away from its registration warns.
    let moved = json!({ "endpoints": ["192.0.2.3"], "pod_cidrs": ["10.0.1.0/24"] });
    let r = admin
        .put_json("/v1/nodes/node-a/allocation", &moved)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let set: keyd_proto::AllocationSet = serde_json::from_slice(&r.body).unwrap();
    let warning = set.warning.expect("a warning");
    assert!(warning.contains("endpoint 192.0.2.1"), "{warning}");
    assert_eq!(set.allocation.set_by.as_deref(), Some("admin/admin"));

    // The list shows it; removing it refuses the node again (no allocation).
    let r = admin.get("/v1/allocations").await.unwrap();
    let all: std::collections::BTreeMap<String, keyd_proto::NodeAllocation> =
        serde_json::from_slice(&r.body).unwrap();
    assert_eq!(
        all["node-a"].endpoints,
        vec!["192.0.2.3".parse::<std::net::IpAddr>().unwrap()]
    );
    let r = admin
        .send(Method::DELETE, "/v1/nodes/node-a/allocation", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    let r = a.put_json("/v1/nodes/node-a", &reg).await.unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert_eq!(audited("node.allocation_removed").len(), 1);
    // Allocations survive a restart (they are in the store, not in memory), and bind in every
    // mode: the restarted keyd runs `keyd dev`'s "open".
    let r = admin
        .put_json("/v1/nodes/node-a/allocation", &allocation)
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let h = h.restart().await;
    assert_eq!(h.keyd.allocations().len(), 1);
    let mut a = h.node("node-a").await;
    let r = a
        .put_json(
            "/v1/nodes/node-a",
            &registration("192.0.2.9", "10.0.1.0/24", 1),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a.put_json("/v1/nodes/node-a", &reg).await.unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
}

/// Each request checks its certificate's validity, whatever the connection: keyd closes a
/// connection at its certificate's expiry, and a request that slips in (a clock step, a request
/// already read) is refused. Driven through the router with the extensions the accept loop sets.
#[tokio::test]
async fn a_request_with_an_expired_certificate_is_refused() {
    use tower::ServiceExt as _;
    let h = Harness::start().await;
    let router = keyd::api::router(
        keyd::api::AppState {
            keyd: std::sync::Arc::clone(&h.keyd),
        },
        64 * 1024,
    );
    let now = keyd_proto::Timestamp::now().0;
    let request = |not_after: u64| {
        let mut req = http::Request::builder()
            .uri("/v1/status")
            .body(axum::body::Body::empty())
            .unwrap();
        req.extensions_mut()
            .insert::<keyd_mtls::identity::PeerIdentity>(Ok(Identity::Admin("admin".into())));
        req.extensions_mut()
            .insert(keyd_mtls::identity::PeerValidity {
                not_before: now - 60,
                not_after,
            });
        req
    };
    let r = router.clone().oneshot(request(now + 60)).await.unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = router.oneshot(request(now - 1)).await.unwrap();
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
    let e: ErrorBody = serde_json::from_slice(&body).unwrap();
    assert!(e.message.contains("has expired"), "{}", e.message);
}
