//! The seed corpus of keyd's fuzz targets (fuzz/corpus/): inputs keyd itself produces or
//! accepts, each checked here to reach past the parser into the code behind it.
//! `write_fuzz_corpus` rewrites the committed files:
//! `cargo test -p keyd --lib write_fuzz_corpus -- --ignored`.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use keyd_proto::identity::Identity;
use keyd_proto::{BootstrapRequest, KeySpec, SecretString};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde_json::json;

use crate::audit::Format;
use crate::clock::Clock;
use crate::ipsec::{CiliumKey, KeyId};
use crate::pki::CertificateAuthority;
use crate::seal::{Key256, KeyWrapper, LocalKek};
use crate::service::{ExportRange, Keyd, ServiceConfig};
use crate::store::{AuditEvent, RedbStore, Store};

type Seeds = Vec<(&'static str, String, Vec<u8>)>;

/// Cilium key lines in every form keyd generates and imports.
fn cilium_lines() -> Seeds {
    let mut out = Vec::new();
    for (name, spec, per_tunnel) in [
        ("gcm128-per-tunnel", KeySpec::Gcm128, true),
        ("gcm256-global", KeySpec::Gcm256, false),
        ("cbc-per-tunnel", KeySpec::HmacSha256CbcAes256, true),
    ] {
        let key = CiliumKey::generate(KeyId::new(3).unwrap(), spec, per_tunnel).unwrap();
        out.push((
            "cilium_key",
            name.to_owned(),
            key.to_line().as_bytes().to_vec(),
        ));
    }
    // Cilium's documented legacy spellings: 0x prefixes, upper case, a trailing newline.
    out.push((
        "cilium_key",
        "legacy-0x".to_owned(),
        format!("5+ rfc4106(gcm(aes)) 0x{} 128\n", "AB".repeat(20)).into_bytes(),
    ));
    out.push((
        "cilium_key",
        "legacy-cbc".to_owned(),
        format!(
            "1 hmac(sha256) 0x{} cbc(aes) 0x{}\n",
            "0f".repeat(32),
            "1e".repeat(32)
        )
        .into_bytes(),
    ));
    out
}

/// One body per `/v1` endpoint that takes one, after its selector letter (see
/// fuzz/fuzz_targets/api_bodies.rs).
fn api_bodies() -> Seeds {
    let line = cilium_lines()[0].2.clone();
    let bodies = [
        (
            'a',
            "register",
            json!({"endpoint": "192.0.2.1", "pod_cidrs": ["10.1.0.0/24", "fd00:1::/64"],
                   "wireguard_public_key": "CQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQkJCQk=",
                   "wireguard_key_epoch": 0, "boot_id": "3f1c2a9e-boot"}),
        ),
        (
            'b',
            "dataplane",
            json!({"node_mode": "policy", "rules_revision": "r7", "counting_since": "2026-12-06T16:00:00Z",
                   "at": "2026-12-06T16:01:00Z", "policies": [
                       {"name": "all", "programmed": true, "encrypted_packets": 10,
                        "encrypted_bytes": 1000, "dropped_packets": 0, "dropped_bytes": 0,
                        "clear_packets": 0, "clear_bytes": 0},
                       {"name": "payments/db", "programmed": true, "encrypted_packets": 5,
                        "encrypted_bytes": 500, "dropped_packets": 1, "dropped_bytes": 60,
                        "clear_packets": 0, "clear_bytes": 0}]}),
        ),
        (
            'c',
            "ack",
            json!({"ipsec_spis": [3, 4], "ipsec_outbound_spi": 4, "wireguard_epoch": 2}),
        ),
        ('d', "rotate", json!({"algorithm": "gcm256"})),
        ('e', "skip", json!({"node": "worker-3"})),
        (
            'f',
            "import",
            json!({"keys": String::from_utf8(line).unwrap()}),
        ),
        (
            'g',
            "admission",
            json!({"decisions": [{"at": "2026-12-06T16:00:00Z", "outcome": "denied", "enforcement": "enforce",
                   "operation": "CREATE", "kind": "Pod", "namespace": "payments", "name": "db-0",
                   "user": "system:serviceaccount:kube-system:replicaset-controller",
                   "policies": ["payments/db"], "reason": "no encryption policy"}]}),
        ),
        (
            'h',
            "schedule",
            json!({"period": "30d", "overlap": "1h", "paused": false,
                   "window": {"days": ["mon", "tue"], "start_hour": 2, "end_hour": 4}}),
        ),
        (
            'i',
            "bounds",
            json!({"min_period": "1d", "max_period": "90d"}),
        ),
        (
            'j',
            "prune",
            json!({"through_seq": 100, "last_hash": "ab".repeat(32)}),
        ),
        (
            'k',
            "kek-rotate",
            json!({"key_id": "arn:aws:kms:us-east-1:111122223333:key/1234abcd", "rewrap_only": false}),
        ),
        (
            'l',
            "kek-migrate",
            json!({"to": {"backend": "vault-transit", "address": "https://vault.example:8200",
                          "key": "keyd", "mount": "transit",
                          "auth": {"method": "token", "token_file": "/etc/keyd/vault-token"}}}),
        ),
        (
            'n',
            "allocation",
            json!({"endpoints": ["192.0.2.1", "2001:db8::1"],
                   "pod_cidrs": ["10.1.0.0/24", "fd00:1::/64"]}),
        ),
    ];
    bodies
        .into_iter()
        .map(|(sel, name, body)| {
            let mut input = vec![sel as u8];
            input.extend_from_slice(&serde_json::to_vec(&body).unwrap());
            ("api_bodies", name.to_owned(), input)
        })
        .collect()
}

/// A CSR as node-shim's bootstrap makes it, alone and in a bootstrap request body.
fn bootstrap() -> Seeds {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "worker-1");
    params.distinguished_name = dn;
    let uri = Identity::Node("worker-1".into()).uri();
    params.subject_alt_names = vec![rcgen::SanType::URI(uri.try_into().unwrap())];
    let csr = params.serialize_request(&key).unwrap().pem().unwrap();
    let body = serde_json::to_vec(&BootstrapRequest {
        node: "worker-1".into(),
        token: SecretString::new("eyJhbGciOiJSUzI1NiJ9.e30.c2ln".into()),
        csr: csr.clone(),
    })
    .unwrap();
    vec![
        (
            "bootstrap_csr",
            "csr-pem".into(),
            [b"c".as_slice(), csr.as_bytes()].concat(),
        ),
        (
            "bootstrap_csr",
            "request".into(),
            [b"b".as_slice(), &body].concat(),
        ),
    ]
}

/// Exports of a real audit log: the whole log (anchored at the genesis) and a range after a
/// checkpoint (anchored at it).
async fn audit_exports(dir: &Path) -> Seeds {
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.join("s.redb")).unwrap());
    let wrapper: Arc<dyn KeyWrapper> = Arc::new(LocalKek::from_key(
        Key256::random().unwrap(),
        dir.join("kek"),
    ));
    let keyd = Keyd::open(store, wrapper, ServiceConfig::default(), Clock::default())
        .await
        .unwrap();
    let admin = Identity::Admin("alice".into());
    for i in 0..4 {
        keyd.audit(AuditEvent::new(
            "node.registered",
            &admin,
            json!({"node": format!("worker-{i}"), "endpoint": format!("192.0.2.{i}")}),
        ))
        .await
        .unwrap();
    }
    keyd.checkpoint(true).await.unwrap();
    for i in 4..6 {
        keyd.audit(AuditEvent::new(
            "request.refused",
            "node/worker-9",
            json!({"request": "GET /v1/nodes/worker-1/bundle", "reason": format!("try {i}")}),
        ))
        .await
        .unwrap();
    }
    keyd.checkpoint(false).await.unwrap();
    keyd.audit(AuditEvent::new(
        "ipsec.key.generated",
        &admin,
        json!({"spi": 3}),
    ))
    .await
    .unwrap();
    let mut out = Vec::new();
    for (name, range) in [
        ("whole", ExportRange::default()),
        (
            "range",
            ExportRange {
                from_seq: Some(6),
                ..ExportRange::default()
            },
        ),
    ] {
        let mut export = keyd
            .export_audit(&admin, range, Format::Jsonl)
            .await
            .unwrap();
        let mut bytes = Vec::new();
        while let Some(chunk) = export.chunks.recv().await {
            bytes.extend_from_slice(&chunk.unwrap());
        }
        crate::audit::verify(&bytes[..], None).unwrap();
        out.push(("audit_verify", name.to_owned(), bytes));
    }
    out
}

async fn seeds() -> Seeds {
    let dir = tempfile::tempdir().unwrap();
    let mut out = cilium_lines();
    out.extend(api_bodies());
    out.extend(bootstrap());
    out.extend(audit_exports(dir.path()).await);
    out
}

/// Whether the endpoint `sel` picks takes `body` as its type.
fn accepted(sel: u8, body: &[u8]) -> serde_json::Result<()> {
    use keyd_proto::kek::{KekMigrateRequest, KekRotateRequest};
    use serde_json::from_slice as de;
    match sel {
        b'a' => de::<keyd_proto::NodeRegistration>(body).map(drop),
        b'b' => de::<keyd_proto::rules::DataplaneReport>(body).map(drop),
        b'c' => de::<keyd_proto::Ack>(body).map(drop),
        b'd' => de::<keyd_proto::RotateRequest>(body).map(drop),
        b'e' => de::<keyd_proto::SkipRequest>(body).map(drop),
        b'f' => de::<keyd_proto::ImportRequest>(body).map(drop),
        b'g' => de::<keyd_proto::AdmissionDecisions>(body).map(drop),
        b'h' => de::<keyd_proto::ScheduleUpdate>(body).map(drop),
        b'i' => de::<keyd_proto::Bounds>(body).map(drop),
        b'j' => de::<crate::api::PruneRequest>(body).map(drop),
        b'k' => de::<KekRotateRequest>(body).map(drop),
        b'l' => de::<KekMigrateRequest>(body).map(drop),
        b'n' => de::<keyd_proto::NodeAllocation>(body).map(drop),
        _ => de::<serde_json::Value>(body).map(drop),
    }
}

#[tokio::test]
async fn seeds_reach_past_the_parsers() {
    for (target, name, input) in seeds().await {
        match target {
            "cilium_key" => {
                CiliumKey::parse_line(std::str::from_utf8(&input).unwrap()).unwrap();
            }
            "bootstrap_csr" => {
                let ca = CertificateAuthority::generate("seed CA").unwrap();
                let pem = if input[0] == b'c' {
                    String::from_utf8(input[1..].to_vec()).unwrap()
                } else {
                    serde_json::from_slice::<BootstrapRequest>(&input[1..])
                        .unwrap()
                        .csr
                };
                ca.issue_client_for_csr(
                    &Identity::Node("worker-1".into()),
                    &pem,
                    Duration::from_secs(3600),
                    None,
                )
                .unwrap();
            }
            "api_bodies" => {
                accepted(input[0], &input[1..]).unwrap_or_else(|e| panic!("{name}: {e}"))
            }
            // The audit exports were verified when made.
            _ => {}
        }
    }
}

#[tokio::test]
#[ignore = "rewrites fuzz/corpus: run by hand after changing the seeds"]
async fn write_fuzz_corpus() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus");
    for (target, name, input) in seeds().await {
        let dir = root.join(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), input).unwrap();
    }
}
