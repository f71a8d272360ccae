//! The audit log end to end: export over mTLS, offline verification with `keyctl audit verify`,
//! tampering, OCSF and CEF, segments and pruning, and the checkpoint signed at shutdown.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use common::Harness;
use http::{Method, StatusCode};
use keyd::audit::ExportLine;
use keyd::store::Table;
use serde_json::{Value, json};

/// Some audited activity: schedule changes, rotations, refusals.
async fn activity(h: &Harness, rounds: usize) {
    let mut admin = h.admin().await;
    for i in 0..rounds {
        let period = format!("{}h", 2 + i);
        let r = admin
            .put_json("/v1/schedules/wireguard-psk", &json!({ "period": period }))
            .await
            .unwrap();
        assert!(r.status.is_success(), "{}", r.error_message());
        admin
            .send(Method::POST, "/v1/rotate/wireguard-psk", None, &[])
            .await
            .unwrap();
        // A refusal: a node calling an admin endpoint.
        h.node("node-a").await.get("/v1/status").await.unwrap();
    }
}

async fn export(h: &Harness, query: &str) -> String {
    let r = h
        .admin()
        .await
        .get(&format!("/v1/audit/export?{query}"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    String::from_utf8(r.body.to_vec()).unwrap()
}

fn verify(file: &Path, key: Option<&str>) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keyctl"));
    cmd.args(["audit", "verify"]).arg(file);
    if let Some(k) = key {
        cmd.args(["--public-key", k]);
    }
    cmd.output().unwrap()
}

/// Exports `query` to `file` and checks that `keyctl audit verify --public-key` passes it.
async fn exported_and_verified(h: &Harness, query: &str, file: &Path, key: &str) -> Output {
    std::fs::write(file, export(h, query).await).unwrap();
    let out = verify(file, Some(key));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

async fn public_key(h: &Harness) -> String {
    let v: Value = serde_json::from_slice(
        &h.admin()
            .await
            .get("/v1/audit/public-key")
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    v["public_key"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_verifies_offline_and_tampering_is_caught() {
    let h = Harness::start().await;
    activity(&h, 5).await;
    let text = export(&h, "format=jsonl").await;
    let key = public_key(&h).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("audit.jsonl");
    std::fs::write(&file, &text).unwrap();
    let out = verify(&file, Some(&key));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("OK: "), "{stdout}");
    assert!(
        !stdout.contains("unsigned") && !stdout.contains("no --public-key"),
        "ends with a checkpoint: {stdout}"
    );

    // Edit one record's details.
    let lines: Vec<&str> = text.lines().collect();
    let (idx, victim) = lines
        .iter()
        .enumerate()
        .find(|(_, l)| l.contains("\"schedule.changed\""))
        .unwrap();
    let seq = match serde_json::from_str::<ExportLine>(victim).unwrap() {
        ExportLine::Record(r) => r.seq,
        _ => unreachable!(),
    };
    let mut edited = lines.clone();
    let changed = victim.replace("\"admin/admin\"", "\"admin/mallory\"");
    edited[idx] = &changed;
    std::fs::write(&file, edited.join("\n")).unwrap();
    let out = verify(&file, Some(&key));
    assert_eq!(out.status.code(), Some(7));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("record {seq}")) && err.contains("TAMPERED"),
        "{err}"
    );

    // Delete one record.
    let mut deleted = lines.clone();
    deleted.remove(idx);
    std::fs::write(&file, deleted.join("\n")).unwrap();
    let out = verify(&file, Some(&key));
    assert_eq!(out.status.code(), Some(7));
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("record {}", seq + 1)));

    // Cut short (the last two records and the checkpoint after them), with the header edited
    // to the cut: the header's signed range catches it.
    let last_cp = lines
        .iter()
        .rposition(|l| l.contains("\"type\":\"checkpoint\""))
        .unwrap();
    assert_eq!(last_cp, lines.len() - 1, "the export ends signed");
    let mut cut: Vec<String> = lines[..last_cp - 2].iter().map(|l| l.to_string()).collect();
    let last_rec = cut
        .iter()
        .rev()
        .find_map(|l| match serde_json::from_str::<ExportLine>(l).unwrap() {
            ExportLine::Record(r) => Some(r),
            _ => None,
        })
        .unwrap();
    let mut header = match serde_json::from_str::<ExportLine>(&cut[0]).unwrap() {
        ExportLine::Header(h) => h,
        _ => unreachable!(),
    };
    header.last_seq = Some(last_rec.seq);
    header.last_hash = Some(last_rec.hash);
    cut[0] = serde_json::to_string(&ExportLine::Header(header)).unwrap();
    std::fs::write(&file, cut.join("\n")).unwrap();
    let out = verify(&file, Some(&key));
    assert_eq!(out.status.code(), Some(7), "a cut export verified");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("range signature is invalid"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A different trusted key.
    std::fs::write(&file, &text).unwrap();
    let other = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, [1u8; 32]);
    assert_eq!(verify(&file, Some(&other)).status.code(), Some(7));
    // Without a key it verifies against the file's own, and says so.
    let out = verify(&file, None);
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no --public-key"));
}

#[tokio::test]
async fn ocsf_and_cef_exports_carry_every_record() {
    let h = Harness::start().await;
    activity(&h, 3).await;
    let jsonl = export(&h, "format=jsonl").await;
    let records = jsonl
        .lines()
        .filter(|l| l.contains("\"type\":\"record\""))
        .count();
    let ocsf = export(&h, "format=ocsf").await;
    // The export itself is audited, so each later export holds one more record.
    assert_eq!(ocsf.lines().count(), records + 1);
    for line in ocsf.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        assert!(
            [3001, 3004, 6003].contains(&v["class_uid"].as_u64().unwrap()),
            "{v}"
        );
        assert_eq!(v["metadata"]["product"]["name"], "keyd");
    }
    let refused = ocsf
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["message"] == "request.refused")
        .unwrap();
    assert_eq!(
        (refused["class_uid"].as_u64(), refused["status"].as_str()),
        (Some(6003), Some("Failure"))
    );
    let cef = export(&h, "format=cef").await;
    assert_eq!(cef.lines().count(), records + 2);
    assert!(cef.lines().all(|l| l.starts_with("CEF:0|keyd|keyd|")));
    let r = h
        .admin()
        .await
        .get("/v1/audit/export?format=xml")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::BAD_REQUEST);
}

#[tokio::test]
async fn time_ranges_select_records() {
    let h = Harness::start().await;
    activity(&h, 2).await;
    let boundary = h.keyd.clock().now();
    h.clock.advance(Duration::from_secs(3600));
    activity(&h, 2).await;
    let since = humantime::format_rfc3339_seconds(
        std::time::UNIX_EPOCH + Duration::from_secs(boundary.0 + 1),
    );
    let later = export(&h, &format!("format=jsonl&since={since}")).await;
    let recs: Vec<keyd::store::AuditRecord> = later
        .lines()
        .filter_map(|l| match serde_json::from_str(l).unwrap() {
            ExportLine::Record(r) => Some(r),
            _ => None,
        })
        .collect();
    assert!(!recs.is_empty());
    assert!(recs.iter().all(|r| r.at.0 > boundary.0));
    let until =
        humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(boundary.0));
    let earlier = export(&h, &format!("format=jsonl&until={until}")).await;
    assert!(
        earlier
            .lines()
            .filter_map(|l| match serde_json::from_str(l).unwrap() {
                ExportLine::Record(r) => Some(r),
                _ => None,
            })
            .all(|r| r.at.0 <= boundary.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_segments_export_prune_and_the_rest_still_verifies() {
    let h = Harness::start_with_env(&[("KEYD_AUDIT_SEGMENT_RECORDS", "10")]).await;
    activity(&h, 6).await;
    h.keyd.tick().await.unwrap();
    activity(&h, 2).await;
    let segs: Vec<keyd::service::Segment> = serde_json::from_slice(
        &h.admin()
            .await
            .get("/v1/audit/segments")
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    assert!(segs.len() >= 2, "{segs:?}");
    let closed = &segs[0];
    assert!(closed.closed_at.is_some());
    let dir = tempfile::tempdir().unwrap();
    let key = public_key(&h).await;

    // Export the closed segment; it verifies and ends at its signed checkpoint.
    let query = format!(
        "format=jsonl&from_seq={}&to_seq={}",
        closed.first_seq, closed.last_seq
    );
    let out = exported_and_verified(&h, &query, &dir.path().join("segment.jsonl"), &key).await;
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("unsigned"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // A range ending where no checkpoint is: keyd checks the stored chain on to the next
    // checkpoint and signs the range, so it verifies with the key too.
    let query = format!(
        "format=jsonl&from_seq={}&to_seq={}",
        closed.first_seq,
        closed.last_seq - 3
    );
    exported_and_verified(&h, &query, &dir.path().join("part.jsonl"), &key).await;

    // Prune needs the segment's last hash: the wrong one is refused.
    let mut admin = h.admin().await;
    let r = admin
        .post_json(
            "/v1/audit/prune",
            &json!({ "through_seq": closed.last_seq, "last_hash": "00" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = admin
        .post_json(
            "/v1/audit/prune",
            &json!({ "through_seq": closed.last_seq - 1, "last_hash": "00" }),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "not a segment end"
    );
    let hash = closed.last_hash.clone().unwrap();
    let r = admin
        .post_json(
            "/v1/audit/prune",
            &json!({ "through_seq": closed.last_seq, "last_hash": hash }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    assert_eq!(
        h.keyd.store().audit_range(0, 1).unwrap()[0].seq,
        closed.last_seq + 1
    );

    // What remains verifies, anchored to the kept segment-end checkpoint.
    let rest_file = dir.path().join("rest.jsonl");
    exported_and_verified(&h, "format=jsonl", &rest_file, &key).await;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_keyctl"))
        .args(["audit", "verify", "-o", "json", "--public-key", &key])
        .arg(&rest_file)
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["anchored"], true, "{report}");
    assert_eq!(report["first_seq"], closed.last_seq + 1);
    assert!(
        h.keyd
            .store()
            .audit_range(0, 10_000)
            .unwrap()
            .iter()
            .any(|r| r.event.action == "audit.pruned")
    );
}

/// Pruning the newest segment (nothing after it) must not empty the log: the chain goes on
/// from the prune's own record, anchored to the segment-end checkpoint, and never restarts at
/// sequence 1. A prune cut short by a crash (its record written, some records not yet
/// deleted) is completed by the next tick.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pruning_the_newest_segment_keeps_the_chain_going() {
    let h = Harness::start().await;
    activity(&h, 2).await;
    let end = h.keyd.checkpoint(true).await.unwrap().unwrap();
    assert_eq!(h.keyd.store().audit_last().unwrap().unwrap().seq, end.seq);
    let deleted = h
        .keyd
        .prune_audit(&"admin/admin", end.seq, &end.hash)
        .await
        .unwrap();
    assert_eq!(deleted, end.seq);
    let recs = h.keyd.store().audit_range(0, 100).unwrap();
    assert_eq!(recs.len(), 1, "{recs:?}");
    let pruned = &recs[0];
    assert_eq!(pruned.event.action, "audit.pruned");
    assert_eq!((pruned.seq, &pruned.prev_hash), (end.seq + 1, &end.hash));
    assert_eq!(pruned.event.details["records"], end.seq);
    activity(&h, 1).await;
    let after = h.keyd.store().audit_range(0, 100).unwrap();
    assert!(
        after
            .windows(2)
            .all(|w| w[1].seq == w[0].seq + 1 && w[1].prev_hash == w[0].hash)
    );
    let dir = tempfile::tempdir().unwrap();
    let key = public_key(&h).await;
    exported_and_verified(&h, "format=jsonl", &dir.path().join("rest.jsonl"), &key).await;
    // Pruning the same range again: already done.
    assert!(
        h.keyd
            .prune_audit(&"admin/admin", end.seq, &end.hash)
            .await
            .is_err()
    );

    // A crash after the prune's transaction and before its deletions: the segments document
    // says pruned through `cut`, the records are still there. The next tick deletes them.
    let cut = h.keyd.store().audit_last().unwrap().unwrap().seq - 1;
    let store = h.keyd.store();
    let doc = store.get(Table::Meta, "audit_segments").unwrap().unwrap();
    let mut segs: Value = serde_json::from_slice(&doc).unwrap();
    segs["pruned_through"] = json!(cut);
    store
        .commit(
            keyd::store::Txn::default()
                .guard(Table::Meta, "audit_segments", Some(doc))
                .put(
                    Table::Meta,
                    "audit_segments",
                    serde_json::to_vec(&segs).unwrap(),
                ),
        )
        .unwrap();
    assert!(store.audit_range(0, 1).unwrap()[0].seq <= cut);
    h.keyd.tick().await.unwrap();
    assert_eq!(store.audit_range(0, 1).unwrap()[0].seq, cut + 1);
}

#[tokio::test]
async fn a_checkpoint_is_signed_at_shutdown() {
    let h = Harness::start().await;
    activity(&h, 1).await;
    let last = h.keyd.store().audit_last().unwrap().unwrap();
    let h = h.restart().await;
    let cp = h
        .keyd
        .store()
        .get(
            keyd::store::Table::Checkpoints,
            &keyd::audit::Checkpoint::store_key(last.seq),
        )
        .unwrap();
    let cp: keyd::audit::Checkpoint =
        serde_json::from_slice(&cp.expect("checkpoint at the last record")).unwrap();
    let (key, _) = h.keyd.audit_public_key();
    let key = base64::Engine::decode(&base64::engine::general_purpose::STANDARD, key).unwrap();
    assert!(cp.verify(&key));
    assert_eq!(cp.hash, last.hash);
}
