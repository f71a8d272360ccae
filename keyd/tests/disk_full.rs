//! keyd on a full disk: the real binary with its data directory on a small tmpfs, which the test
//! fills with a filler file. Writes must fail with a clear answer (507 `store_full`, naming the
//! lack of space), reads must go on, nothing acknowledged may be lost, and once the filler is
//! deleted the same writes must succeed without a restart (the store reopens redb, which
//! poisons itself after an I/O error). Needs root for the mount: skipped with a printed reason
//! otherwise, and failed in CI.
#![allow(clippy::unwrap_used)]

mod process;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::{Method, StatusCode};
use keyd_proto::{IpsecAlgorithm, NodeBundle};
use process::{Identity, Keyd, audit_verifies, call, request};
use serde_json::{Value, json};

/// A tmpfs of `size` mounted on a fresh directory, unmounted on drop (also when the test
/// panics).
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(parent: &Path, size: &str) -> Self {
        let dir = parent.join("mnt");
        std::fs::create_dir(&dir).unwrap();
        let st = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}: {st}", dir.display());
        Self { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: keyd may still be exiting when a failed test unwinds.
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes zeros to `path` until the filesystem refuses more; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) => {
                assert_eq!(
                    e.raw_os_error(),
                    Some(28),
                    "filling {}: {e}",
                    path.display()
                );
                break;
            }
        }
    }
    // The last partial page too.
    while f.write(&[0u8; 512]).is_ok_and(|n| n > 0) {}
    let _ = f.sync_all();
    written
}

/// node-a's IPsec keys as its bundle serves them now.
async fn node_a_keys(k: &Keyd) -> Vec<(u8, String)> {
    let bundle = call(
        k,
        Identity::Node("node-a"),
        Method::GET,
        "/v1/nodes/node-a/bundle",
        None,
    )
    .await
    .unwrap();
    keys(&bundle)
}

fn keys(b: &Value) -> Vec<(u8, String)> {
    let b: NodeBundle = serde_json::from_value(b.clone()).unwrap();
    b.ipsec
        .map(|i| {
            i.keys
                .iter()
                .map(|k| match &k.algorithm {
                    IpsecAlgorithm::Aead { key, .. } => (k.spi, hex::encode(key.expose())),
                    other => (k.spi, format!("{other:?}")),
                })
                .collect()
        })
        .unwrap_or_default()
}

fn register_body(i: u8) -> Value {
    let wg = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([i + 1; 32]));
    json!({ "endpoint": format!("192.0.2.{}", i + 1), "pod_cidrs": [format!("10.0.{i}.0/24")],
            "wireguard_public_key": STANDARD.encode(wg.as_bytes()) })
}

/// The writes the test makes while the disk is full and again once it has space.
fn writes() -> Vec<(&'static str, Identity, Method, &'static str, Option<Value>)> {
    vec![
        (
            "register node-b",
            Identity::Node("node-b"),
            Method::PUT,
            "/v1/nodes/node-b",
            Some(register_body(1)),
        ),
        (
            "rotate the IPsec key",
            Identity::Admin,
            Method::POST,
            "/v1/ipsec/rotate",
            Some(json!({})),
        ),
        (
            "change a schedule",
            Identity::Admin,
            Method::PUT,
            "/v1/schedules/wireguard-psk",
            Some(json!({ "period": "3h" })),
        ),
        (
            "rotate the KEK",
            Identity::Admin,
            Method::POST,
            "/v1/kek/rotate",
            Some(json!({})),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_a_full_disk_refuses_writes_clearly_and_keyd_recovers_without_restart() {
    if !keyd_tests::prereq::require(
        "root (to mount a size-limited tmpfs for keyd's data directory)",
        if keyd_tests::prereq::is_root() {
            Ok(())
        } else {
            Err("not running as root".into())
        },
    ) {
        return;
    }
    keyd_mtls::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    // Declared first, dropped last: keyd is gone before the unmount.
    let fs = Tmpfs::mount(dir.path(), "16m");
    let data = fs.dir.join("data");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let mut k = Keyd::spawn_logging_to(&data, &logs, &[]);
    k.ready().await.unwrap();

    // Acknowledged before the disk fills: the first IPsec key and node-a.
    call(
        &k,
        Identity::Admin,
        Method::POST,
        "/v1/ipsec/rotate",
        Some(json!({})),
    )
    .await
    .unwrap();
    call(
        &k,
        Identity::Node("node-a"),
        Method::PUT,
        "/v1/nodes/node-a",
        Some(register_body(0)),
    )
    .await
    .unwrap();
    let before = node_a_keys(&k).await;
    assert_eq!(before.len(), 1);

    let filler = fs.dir.join("filler");
    let filled = fill(&filler);
    assert!(filled > 0);

    // Each write is refused with 507 store_full. redb may still have free pages inside its
    // file, so a write may succeed (and is then durable like any other); within a bounded
    // number of attempts every kind of write meets the full disk.
    for (what, who, method, path, body) in writes() {
        let mut refused = None;
        for attempt in 0..50 {
            let body = if path == "/v1/schedules/wireguard-psk" {
                Some(json!({ "period": format!("{}h", 3 + attempt) }))
            } else {
                body.clone()
            };
            let (status, answer) = request(&k, who.clone(), method.clone(), path, body)
                .await
                .unwrap_or_else(|_| panic!("keyd went away: {}", k.log()));
            if status.is_success() {
                // Acknowledged, so durable: the restart below checks the state it leaves. An
                // IPsec rotation that succeeded would start a rollout and refuse the next one.
                assert_ne!(path, "/v1/ipsec/rotate", "{what} succeeded on a full disk");
                continue;
            }
            refused = Some((status, answer));
            break;
        }
        let (status, answer) =
            refused.unwrap_or_else(|| panic!("{what}: never refused on a full disk"));
        assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE, "{what}: {answer}");
        assert_eq!(answer["error"], "store_full", "{what}: {answer}");
        let message = answer["message"].as_str().unwrap();
        assert!(message.contains("no space left"), "{what}: {message}");
        assert!(message.contains("nothing was changed"), "{what}: {message}");
        println!("{what} on a full disk: {status} {answer}");
    }

    // Reads go on: node-a's bundle, unchanged, and the status.
    let during = node_a_keys(&k).await;
    assert_eq!(during, before);
    call(&k, Identity::Admin, Method::GET, "/v1/status", None)
        .await
        .unwrap();
    // And keyd stays ready (perhaps degraded), so that it is not taken out of its Service.
    let (code, text) = k.readyz().await.unwrap();
    assert_eq!(code, 200, "{text}");
    println!("readyz on a full disk: {}", text.trim());

    // Space returns: the same writes succeed, with no restart.
    std::fs::remove_file(&filler).unwrap();
    for (what, who, method, path, body) in writes() {
        let (status, answer) = request(&k, who, method, path, body).await.unwrap();
        assert!(
            status.is_success(),
            "{what} after space returned: {status} {answer}\n{}",
            k.log()
        );
    }
    let after = node_a_keys(&k).await;
    assert_eq!(
        after.last(),
        before.last(),
        "the key from before the full disk is kept during the rollout"
    );
    assert_eq!(after.len(), 2, "the new key was staged: {after:?}");
    let log = k.log();
    assert!(log.contains("store reopened"), "{log}");

    // Nothing acknowledged is lost across a restart either, and the audit log verifies.
    k.stop().await;
    let mut k = Keyd::spawn_logging_to(&data, &logs, &[]);
    k.ready().await.unwrap();
    let restarted = node_a_keys(&k).await;
    assert_eq!(restarted, after);
    let nodes = call(&k, Identity::Admin, Method::GET, "/v1/nodes", None)
        .await
        .unwrap();
    assert_eq!(nodes.as_array().unwrap().len(), 2, "{nodes}");
    let schedules = call(&k, Identity::Admin, Method::GET, "/v1/schedules", None)
        .await
        .unwrap();
    assert!(
        schedules.to_string().contains("3h"),
        "the schedule set after recovery: {schedules}"
    );
    audit_verifies(&k, &logs).await;
    k.stop().await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    drop(fs);
}
