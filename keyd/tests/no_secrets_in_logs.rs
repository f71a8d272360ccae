//! A full run of the real `keyd` and `keyctl` binaries with logging at `trace`, then a search of
//! every log line and CLI error for every secret that existed during the run: the KEK, the
//! private keys of all certificates, the IPsec keys (hex and base64), the WireGuard PSKs, and a
//! key line that was refused on import.
#![allow(clippy::unwrap_used)]

use std::io::Write as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd_mtls::client::Connector;
use keyd_mtls::tls::TlsPaths;
use keyd_proto::{IpsecAlgorithm, NodeBundle};
use serde_json::json;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn keyctl(config: &Path, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_keyctl"))
        .arg("--config")
        .arg(config)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every spelling of a secret that could plausibly be printed.
fn spellings(bytes: &[u8]) -> Vec<String> {
    vec![
        hex::encode(bytes),
        hex::encode_upper(bytes),
        STANDARD.encode(bytes),
        format!("{bytes:?}"),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_run_logs_no_key_material() {
    keyd_mtls::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("dev");
    let (api, ops) = (free_port(), free_port());
    let log_path = dir.path().join("keyd.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut keyd = Command::new(env!("CARGO_BIN_EXE_keyd"))
        .args(["dev", "--data-dir"])
        .arg(&data)
        .args([
            "--listen",
            &format!("127.0.0.1:{api}"),
            "--ops-listen",
            &format!("127.0.0.1:{ops}"),
        ])
        .env("KEYD_LOG_LEVEL", "trace")
        .env("KEYD_LOG_FORMAT", "json")
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let cfg = data.join("keyctl.toml");
    let deadline = Instant::now() + Duration::from_secs(30);
    while keyctl(&cfg, &["status"], None).0 != 0 {
        assert!(
            Instant::now() < deadline,
            "keyd did not come up: {}",
            std::fs::read_to_string(&log_path).unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut cli_output = String::new();
    let mut run = |args: &[&str], stdin: Option<&str>, want: i32| {
        let (code, out, err) = keyctl(&cfg, args, stdin);
        assert_eq!(code, want, "keyctl {args:?}: {out}{err}");
        cli_output.push_str(&err);
        out
    };
    run(&["ipsec", "rotate"], None, 0);
    // Refused imports: a reused ID and a malformed key field, both carrying key-like hex.
    let refused_a = format!("1+ rfc4106(gcm(aes)) {} 128", "7c".repeat(20));
    let refused_b = format!("2+ rfc4106(gcm(aes)) {} 128", "9d".repeat(19));
    run(&["ipsec", "import"], Some(&refused_a), 6);
    run(&["ipsec", "import"], Some(&refused_b), 6);
    // A valid import rolls out after key 1 (no nodes yet: it is active at once).
    let imported = format!("2+ rfc4106(gcm(aes)) {} 128", "5e".repeat(20));
    run(&["ipsec", "import"], Some(&imported), 0);
    let secret_yaml = run(&["ipsec", "cilium-secret"], None, 0);
    let line = run(&["ipsec", "cilium-secret", "--line"], None, 0);
    run(&["status", "-o", "json"], None, 0);

    // Two nodes register WireGuard keys, fetch bundles and acknowledge.
    let mut psks = Vec::new();
    let mut ipsec_keys = Vec::new();
    let mut conns = Vec::new();
    for (i, name) in ["node-a", "node-b"].iter().enumerate() {
        let pki = data.join("pki");
        let paths = TlsPaths {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("node-{name}.pem")),
            key: pki.join(format!("node-{name}-key.pem")),
        };
        let mut conn = Connector::new(
            &format!("https://127.0.0.1:{api}"),
            keyd_mtls::tls::client_config(&paths).unwrap(),
        )
        .unwrap()
        .connect()
        .await
        .unwrap();
        let wg =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([i as u8 + 1; 32]));
        let r = conn
            .put_json(
                &format!("/v1/nodes/{name}"),
                &json!({ "endpoint": format!("192.0.2.{}", i + 1), "pod_cidrs": [format!("10.0.{i}.0/24")],
                         "wireguard_public_key": STANDARD.encode(wg.as_bytes()) }),
            )
            .await
            .unwrap();
        assert!(r.status.is_success(), "{}", r.error_message());
        conns.push((*name, conn));
    }
    for (name, mut conn) in conns {
        // Refused: node-a asks for node-b's bundle.
        let other = if name == "node-a" { "node-b" } else { "node-a" };
        let _ = conn
            .get(&format!("/v1/nodes/{other}/bundle"))
            .await
            .unwrap();
        let b: NodeBundle = serde_json::from_slice(
            &conn
                .get(&format!("/v1/nodes/{name}/bundle"))
                .await
                .unwrap()
                .body,
        )
        .unwrap();
        for p in &b.wireguard.peers {
            psks.push(p.preshared_key.expose().to_vec());
        }
        for k in &b.ipsec.as_ref().unwrap().keys {
            if let IpsecAlgorithm::Aead { key, .. } = &k.algorithm {
                ipsec_keys.push(key.expose().to_vec());
            }
        }
        let r = conn
            .post_json(
                &format!("/v1/nodes/{name}/ack"),
                &json!({ "ipsec_spis": [2, 1], "ipsec_outbound_spi": 2 }),
            )
            .await
            .unwrap();
        assert!(r.status.is_success(), "{}", r.error_message());
    }
    assert_eq!(psks.len(), 2);
    assert_eq!(
        ipsec_keys.len(),
        4,
        "current and previous key, from each node"
    );

    // Stop keyd the way an operator would.
    Command::new("kill")
        .arg("-TERM")
        .arg(keyd.id().to_string())
        .status()
        .unwrap();
    let status = keyd.wait().unwrap();
    assert!(status.success(), "keyd exited with {status}");
    let logs = std::fs::read_to_string(&log_path).unwrap();
    let all = format!("{logs}\n{cli_output}");

    // The run really was logged (so the search below searches something).
    assert!(logs.contains("keyd is serving"), "{logs}");
    assert!(logs.contains("request refused"), "refusals are logged");
    assert!(
        logs.contains("\"route\":\"/v1/nodes/{name}/bundle\""),
        "per-request debug lines are logged: {logs}"
    );
    assert!(
        logs.lines().count() > 20,
        "trace logging produced only {} lines",
        logs.lines().count()
    );
    assert!(!secret_yaml.is_empty() && line.starts_with("2+ "), "{line}");

    let mut secrets: Vec<(String, String)> = Vec::new();
    let kek = std::fs::read_to_string(data.join("kek.key")).unwrap();
    secrets.push(("KEK".into(), kek.trim().to_owned()));
    for s in spellings(&STANDARD.decode(kek.trim()).unwrap()) {
        secrets.push(("KEK bytes".into(), s));
    }
    for entry in std::fs::read_dir(data.join("pki")).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with("-key.pem") {
            for l in std::fs::read_to_string(&path)
                .unwrap()
                .lines()
                .filter(|l| !l.starts_with("-----"))
            {
                secrets.push((format!("private key {}", path.display()), l.to_owned()));
            }
        }
    }
    for l in [&imported, &refused_a, &refused_b] {
        secrets.push((
            "key line hex".into(),
            l.split_whitespace().nth(2).unwrap().to_owned(),
        ));
    }
    let current_hex = line.split_whitespace().nth(2).unwrap().to_owned();
    secrets.push(("current key".into(), current_hex));
    for k in ipsec_keys.iter().chain(&psks) {
        for s in spellings(k) {
            secrets.push(("bundle key".into(), s));
        }
    }
    for (what, s) in &secrets {
        assert!(
            s.len() >= 16,
            "{what} is too short to search for meaningfully"
        );
        assert!(
            !all.contains(s.as_str()),
            "{what} appears in the logs or CLI errors"
        );
    }
}
