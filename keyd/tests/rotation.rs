//! Rotation schedules and rollout-aware IPsec rotation, over real mTLS with keyd's clock moved
//! forward by the tests (the scheduler is driven by `tick()`, not wall time).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{Harness, drive_rollout};
use http::{Method, StatusCode, header};
use keyd_proto::{IpsecStatus, NodeBundle, Report};
use serde_json::json;

const HOUR: Duration = Duration::from_secs(3600);

async fn register(h: &Harness, name: &str, seed: u8) {
    let pk = {
        use base64::Engine as _;
        let s = x25519_dalek::StaticSecret::from([seed; 32]);
        base64::engine::general_purpose::STANDARD.encode(x25519_dalek::PublicKey::from(&s))
    };
    let r = h
        .node(name)
        .await
        .put_json(
            &format!("/v1/nodes/{name}"),
            &json!({ "endpoint": format!("192.0.2.{seed}"), "pod_cidrs": [format!("10.0.{seed}.0/24")],
                     "wireguard_public_key": pk }),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.error_message());
}

async fn ack(h: &Harness, name: &str, spis: &[u8], outbound: u8) {
    let r = h
        .node(name)
        .await
        .post_json(
            &format!("/v1/nodes/{name}/ack"),
            &json!({ "ipsec_spis": spis, "ipsec_outbound_spi": outbound }),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.error_message());
}

fn actions(h: &Harness) -> Vec<String> {
    h.keyd
        .store()
        .audit_range(0, 100_000)
        .unwrap()
        .into_iter()
        .map(|r| r.event.action)
        .collect()
}

async fn ipsec(h: &Harness) -> IpsecStatus {
    serde_json::from_slice(&h.admin().await.get("/v1/ipsec").await.unwrap().body).unwrap()
}

#[tokio::test]
async fn a_rollout_is_staged_then_active_then_retired_as_nodes_acknowledge() {
    let h = Harness::start().await;
    register(&h, "node-a", 1).await;
    register(&h, "node-b", 2).await;
    let mut admin = h.admin().await;
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    ack(&h, "node-a", &[1], 1).await;
    ack(&h, "node-b", &[1], 1).await;
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    let s = ipsec(&h).await;
    let r = s.rollout.clone().unwrap();
    assert_eq!((r.from_spi, r.to_spi, r.phase.as_str()), (1, 2, "staged"));
    assert_eq!(r.waiting_for, vec!["node-a", "node-b"]);
    assert_eq!(
        s.outbound_spi,
        Some(1),
        "outbound stays on the old key while staged"
    );
    // A second rotation waits for this one.
    let refused = admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    assert_eq!(refused.status, StatusCode::CONFLICT);

    ack(&h, "node-a", &[1, 2], 1).await;
    assert_eq!(ipsec(&h).await.rollout.unwrap().waiting_for, vec!["node-b"]);
    ack(&h, "node-b", &[1, 2], 1).await;
    // The last acknowledgement moves it on at once.
    let s = ipsec(&h).await;
    assert_eq!(s.rollout.as_ref().unwrap().phase, "active");
    assert_eq!(s.outbound_spi, Some(2));

    ack(&h, "node-a", &[1, 2], 2).await;
    ack(&h, "node-b", &[1, 2], 2).await;
    h.keyd.tick().await.unwrap();
    assert!(
        ipsec(&h).await.rollout.is_some(),
        "the overlap has not passed yet"
    );
    h.clock.advance(Duration::from_secs(301));
    h.keyd.tick().await.unwrap();
    let s = ipsec(&h).await;
    assert!(s.rollout.is_none());
    assert_eq!(s.keys.iter().map(|k| k.spi).collect::<Vec<_>>(), vec![2]);

    let a = actions(&h);
    let pos = |x: &str| a.iter().rposition(|y| y == x).unwrap();
    assert!(pos("ipsec.key.staged") < pos("ipsec.key.activated"));
    assert!(pos("ipsec.key.activated") < pos("ipsec.key.retired"));
}

#[tokio::test]
async fn keyd_restarts_mid_rollout_and_continues() {
    let h = Harness::start().await;
    register(&h, "node-a", 1).await;
    let mut admin = h.admin().await;
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    ack(&h, "node-a", &[1], 1).await;
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    let before = ipsec(&h).await.rollout.unwrap();

    let h = h.restart().await;
    let after = ipsec(&h).await.rollout.unwrap();
    assert_eq!(
        (after.from_spi, after.to_spi, after.phase.clone()),
        (before.from_spi, before.to_spi, before.phase)
    );
    ack(&h, "node-a", &[1, 2], 1).await;
    assert_eq!(ipsec(&h).await.rollout.unwrap().phase, "active");
    let h = h.restart().await;
    drive_rollout(&h, &["node-a"]).await;
    assert_eq!(ipsec(&h).await.outbound_spi, Some(2));
}

#[tokio::test]
async fn a_dead_node_stops_blocking_and_a_stuck_rollout_raises_the_alarm() {
    let h = Harness::start().await;
    register(&h, "node-a", 1).await;
    register(&h, "node-b", 2).await;
    let mut admin = h.admin().await;
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    // node-b stays alive (it re-registers) but never installs key 2.
    for _ in 0..7 {
        h.clock.advance(Duration::from_secs(300));
        register(&h, "node-b", 2).await;
        ack(&h, "node-a", &[1], 1).await;
        h.keyd.tick().await.unwrap();
    }
    let s = ipsec(&h).await;
    let r = s.rollout.unwrap();
    assert!(r.stuck, "35 minutes waiting on a live node: {r:?}");
    assert_eq!(r.waiting_for, vec!["node-a", "node-b"]);
    assert_eq!(
        actions(&h)
            .iter()
            .filter(|a| *a == "ipsec.rollout.stuck")
            .count(),
        1,
        "alarm raised once"
    );
    let metrics = h.keyd.metrics.encode();
    assert!(
        metrics.contains("keyd_ipsec_rollouts_stuck_total 1"),
        "{metrics}"
    );

    // node-b dies: after the liveness timeout it no longer blocks; node-a alone completes it.
    ack(&h, "node-a", &[1, 2], 1).await;
    h.clock.advance(Duration::from_secs(301));
    ack(&h, "node-a", &[1, 2], 1).await;
    h.keyd.tick().await.unwrap();
    let r = ipsec(&h).await.rollout.unwrap();
    assert_eq!(r.phase, "active");
    assert_eq!(r.not_live, vec!["node-b"]);
    drive_rollout(&h, &["node-a"]).await;
    // When node-b returns it gets the current key.
    let b: NodeBundle = serde_json::from_slice(
        &h.node("node-b")
            .await
            .get("/v1/nodes/node-b/bundle")
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(
        b.ipsec
            .unwrap()
            .keys
            .iter()
            .map(|k| k.spi)
            .collect::<Vec<_>>(),
        vec![2]
    );
}

/// A live node that polls but never acknowledges holds a rollout forever; `keyctl rollout skip`
/// (audited) stops waiting for it, and the rollout completes with the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_can_skip_a_node_that_never_acknowledges() {
    let h = Harness::start().await;
    register(&h, "node-a", 1).await;
    register(&h, "node-b", 2).await;
    let mut admin = h.admin().await;
    let skip = |node: &str| json!({ "node": node });
    // No rollout yet.
    let r = admin
        .post_json("/v1/ipsec/rollout/skip", &skip("node-b"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::CONFLICT, "{}", r.error_message());
    for _ in 0..2 {
        admin
            .post_json("/v1/ipsec/rotate", &json!({}))
            .await
            .unwrap();
    }
    ack(&h, "node-a", &[1, 2], 1).await;
    register(&h, "node-b", 2).await;
    h.keyd.tick().await.unwrap();
    let r = ipsec(&h).await.rollout.unwrap();
    assert_eq!(
        (r.phase.as_str(), r.waiting_for.clone()),
        ("staged", vec!["node-b".to_owned()])
    );
    // Only a node it waits for; nodes cannot do it.
    let r = admin
        .post_json("/v1/ipsec/rollout/skip", &skip("node-a"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        r.error_message().contains("waiting for: node-b"),
        "{}",
        r.error_message()
    );
    let r = h
        .node("node-b")
        .await
        .post_json("/v1/ipsec/rollout/skip", &skip("node-b"))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);

    let out = keyctl(&h, &["rollout", "skip", "node-b"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("no longer waiting for node-b")
            && text.contains("skipped (keyctl rollout skip): node-b"),
        "{text}"
    );
    // Staged -> active at once (node-a has key 2); then node-a switches and it retires.
    let r = ipsec(&h).await.rollout.unwrap();
    assert_eq!(r.phase, "active", "{r:?}");
    assert_eq!(r.skipped, vec!["node-b"]);
    drive_rollout(&h, &["node-a"]).await;
    assert!(ipsec(&h).await.rollout.is_none());
    let skipped: Vec<_> = h
        .keyd
        .store()
        .audit_range(0, 100_000)
        .unwrap()
        .into_iter()
        .filter(|r| r.event.action == "ipsec.rollout.node_skipped")
        .collect();
    assert_eq!(skipped.len(), 1);
    assert_eq!(skipped[0].event.details["node"], "node-b");
    assert_eq!(skipped[0].event.details["phase"], "staged");
    assert_eq!(skipped[0].event.actor, "admin/admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyctl_removes_and_readmits_a_node() {
    let h = Harness::start().await;
    register(&h, "node-a", 1).await;
    register(&h, "node-b", 2).await;
    let out = keyctl(&h, &["nodes", "remove", "node-b", "--no-rotate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("removed node-b") && text.contains("IPsec: not rotated"),
        "{text}"
    );
    let out = keyctl(&h, &["nodes", "-o", "json"]);
    let nodes: Vec<keyd_proto::NodeInfo> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        nodes.iter().map(|n| n.name.as_str()).collect::<Vec<_>>(),
        ["node-a"]
    );
    let out = keyctl(&h, &["nodes", "readmit", "node-b"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("readmitted node-b"));
    let out = keyctl(&h, &["nodes", "readmit", "node-x"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("was not removed"));
}

#[tokio::test]
async fn schedules_rotate_when_due_and_never_twice() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    let r = admin
        .put_json("/v1/schedules/wireguard-psk", &json!({ "period": "1h" }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    h.keyd.tick().await.unwrap();
    assert_eq!(h.keyd.status().wireguard.psk_epoch, 1, "not due yet");
    h.clock.advance(HOUR);
    h.keyd.tick().await.unwrap();
    h.keyd.tick().await.unwrap();
    assert_eq!(
        h.keyd.status().wireguard.psk_epoch,
        2,
        "due once, rotated once"
    );
    let recs = h.keyd.store().audit_range(0, 1000).unwrap();
    let rotated: Vec<_> = recs
        .iter()
        .filter(|r| r.event.action == "wireguard.psk.rotated")
        .collect();
    assert_eq!(rotated.len(), 1);
    assert_eq!(rotated[0].event.actor, "keyd/scheduler");
    let changed = recs
        .iter()
        .find(|r| r.event.action == "schedule.changed")
        .unwrap();
    assert_eq!(changed.event.actor, "admin/admin");
    assert_eq!(changed.event.details["after"]["schedule"]["period"], "1h");

    // Due while keyd was down: it rotates at the first pass after the restart.
    h.clock.advance(2 * HOUR);
    let h = h.restart().await;
    h.keyd.tick().await.unwrap();
    assert_eq!(h.keyd.status().wireguard.psk_epoch, 3);

    // Paused: never rotated by the scheduler; manual rotation still works.
    let mut admin = h.admin().await;
    admin
        .put_json("/v1/schedules/wireguard-psk", &json!({ "paused": true }))
        .await
        .unwrap();
    h.clock.advance(5 * HOUR);
    h.keyd.tick().await.unwrap();
    assert_eq!(h.keyd.status().wireguard.psk_epoch, 3);
    let r = admin
        .send(Method::POST, "/v1/rotate/wireguard-psk", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    assert_eq!(h.keyd.status().wireguard.psk_epoch, 4);
    assert!(actions(&h).contains(&"schedule.paused".to_owned()));
}

#[tokio::test]
async fn a_maintenance_window_defers_the_rotation() {
    let h = Harness::start().await;
    let now = h.keyd.clock().now().0;
    // A window two hours from now, one hour wide (end_hour is 1..=24: 24 is midnight, so a
    // window starting at 23:00 ends at 24, not 0, which keyd refuses).
    let start = ((now % 86_400) / 3600 + 2) % 24;
    let mut admin = h.admin().await;
    let r = admin
        .put_json(
            "/v1/schedules/wireguard-psk",
            &json!({ "period": "1h", "window": { "days": [], "start_hour": start, "end_hour": start + 1 } }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    h.clock.advance(HOUR + Duration::from_secs(60));
    h.keyd.tick().await.unwrap();
    assert_eq!(
        h.keyd.status().wireguard.psk_epoch,
        1,
        "due, but outside the window"
    );
    // Move into the window.
    let into = 3600 - (h.keyd.clock().now().0 % 3600) + 60;
    h.clock.advance(Duration::from_secs(into));
    h.keyd.tick().await.unwrap();
    assert_eq!(h.keyd.status().wireguard.psk_epoch, 2);
}

#[tokio::test]
async fn bounds_refuse_schedules_and_name_the_bound() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    let r = admin
        .put_json(
            "/v1/schedules/ipsec/bounds",
            &json!({ "max_period": "30d", "min_period": "1d" }),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let r = admin
        .put_json("/v1/schedules/ipsec", &json!({ "period": "60d" }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let msg = r.error_message();
    assert!(msg.contains("max_period = 30d"), "{msg}");
    let r = admin
        .put_json("/v1/schedules/ipsec", &json!({ "period": "1h" }))
        .await
        .unwrap();
    assert!(r.error_message().contains("min_period = 1d"));
    // A bound the current schedule breaks is refused too.
    let r = admin
        .put_json("/v1/schedules/ipsec/bounds", &json!({ "max_period": "1d" }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);
    let r = admin
        .put_json("/v1/schedules/nonsense", &json!({ "period": "1d" }))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let r = admin
        .put_json(
            "/v1/schedules/ipsec",
            &json!({ "period": "1d", "cadence": "x" }),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "unknown fields are refused"
    );
    let bounds_changes = actions(&h)
        .iter()
        .filter(|a| *a == "schedule.bounds_changed")
        .count();
    assert_eq!(bounds_changes, 1);
}

// keyctl runs as a blocking child process while keyd serves on the other worker thread.
/// Runs keyctl as the admin against the harness's keyd.
fn keyctl(h: &Harness, args: &[&str]) -> std::process::Output {
    let p = h.paths_for(&keyd_proto::identity::Identity::Admin("admin".into()));
    std::process::Command::new(env!("CARGO_BIN_EXE_keyctl"))
        .args(["--server", &h.server_url(), "--ca"])
        .arg(&p.ca)
        .arg("--cert")
        .arg(&p.cert)
        .arg("--key")
        .arg(&p.key)
        .args(args)
        .env_remove("KEYCTL_CONFIG")
        .current_dir(h.dir.path())
        .output()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyctl_schedule_get_prints_durations_as_they_are_set() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    admin
        .put_json(
            "/v1/schedules/kek",
            &json!({ "period": "90d", "overlap": "36h" }),
        )
        .await
        .unwrap();
    let out = keyctl(&h, &["schedule", "get", "kek"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8(out.stdout).unwrap();
    let row = table.lines().nth(1).unwrap();
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(cells[..3], ["kek", "90d", "36h"], "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_flags_overdue_classes_and_keyctl_report_exits_non_zero() {
    let h = Harness::start().await;
    let mut admin = h.admin().await;
    admin
        .post_json("/v1/ipsec/rotate", &json!({}))
        .await
        .unwrap();
    let keyctl = |args: &[&str]| keyctl(&h, args);
    let out = keyctl(&["report"]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Paused schedules do not excuse old keys: 8 days on, IPsec (7d) is overdue.
    admin
        .put_json("/v1/schedules/ipsec", &json!({ "paused": true }))
        .await
        .unwrap();
    h.clock.advance(8 * 24 * HOUR);
    let r: Report = serde_json::from_slice(&admin.get("/v1/report").await.unwrap().body).unwrap();
    assert!(r.overdue);
    let ipsec = r
        .classes
        .iter()
        .find(|c| c.class == keyd_proto::KeyClass::Ipsec)
        .unwrap();
    assert!(ipsec.overdue && ipsec.paused && !ipsec.within_schedule);
    assert!(ipsec.oldest_key_age_secs.unwrap() >= 8 * 86_400);
    let out = keyctl(&["report", "-o", "json"]);
    assert_eq!(out.status.code(), Some(7));
    let json: Report = serde_json::from_slice(&out.stdout).unwrap();
    assert!(json.overdue);
    // The webhook sees the same: IPsec is active but not within schedule.
    let e = h.keyd.enforcement_status();
    assert!(e.ipsec.active && !e.ipsec.within_schedule, "{e:?}");
}

#[tokio::test]
async fn a_long_poll_learns_of_a_change_within_a_second() {
    let h = Harness::start().await;
    register(&h, "node-a", 1).await;
    register(&h, "node-b", 2).await;
    let mut a = h.node("node-a").await;
    let first = a.get("/v1/nodes/node-a/bundle").await.unwrap();
    let etag = first
        .headers
        .get(header::ETAG)
        .unwrap()
        .to_str()
        .unwrap()
        .to_owned();
    // Nothing changes: the poll returns 304 after its wait.
    let t = Instant::now();
    let r = a
        .send(
            Method::GET,
            "/v1/nodes/node-a/bundle?wait=300ms",
            None,
            &[(header::IF_NONE_MATCH, etag.as_str())],
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);
    assert!(t.elapsed() >= Duration::from_millis(250));

    let waiter = tokio::spawn(async move {
        let t = Instant::now();
        let r = a
            .send(
                Method::GET,
                "/v1/nodes/node-a/bundle?wait=20s",
                None,
                &[(header::IF_NONE_MATCH, etag.as_str())],
            )
            .await
            .unwrap();
        (r, Instant::now(), t)
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let changed_at = Instant::now();
    h.admin()
        .await
        .send(Method::POST, "/v1/rotate/wireguard-psk", None, &[])
        .await
        .unwrap();
    let (r, answered_at, _) = waiter.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let b: NodeBundle = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(b.wireguard.epoch, 2);
    assert!(
        answered_at.duration_since(changed_at) < Duration::from_secs(1),
        "took {:?}",
        answered_at.duration_since(changed_at)
    );
}

#[tokio::test]
async fn a_node_key_epoch_asks_nodes_for_new_keypairs() {
    let h = Harness::start().await;
    register(&h, "node-a", 1).await;
    register(&h, "node-b", 2).await;
    h.clock.advance(10 * 24 * HOUR);
    let r = h
        .admin()
        .await
        .send(Method::POST, "/v1/rotate/wireguard-node-keys", None, &[])
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    let b: NodeBundle = serde_json::from_slice(
        &h.node("node-a")
            .await
            .get("/v1/nodes/node-a/bundle")
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(b.wireguard.node_key_epoch, 2);
    let report = h.keyd.report();
    let nk = report
        .classes
        .iter()
        .find(|c| c.class == keyd_proto::KeyClass::WireguardNodeKeys)
        .unwrap();
    assert!(
        nk.oldest_key_age_secs.unwrap() >= 10 * 86_400,
        "old keys are still in use"
    );

    // node-a answers with a new keypair for epoch 2; node-b sees it as a peer.
    use base64::Engine as _;
    let new_pk = base64::engine::general_purpose::STANDARD.encode(x25519_dalek::PublicKey::from(
        &x25519_dalek::StaticSecret::from([9u8; 32]),
    ));
    let r = h
        .node("node-a")
        .await
        .put_json(
            "/v1/nodes/node-a",
            &json!({ "endpoint": "192.0.2.1", "pod_cidrs": ["10.0.1.0/24"],
            "wireguard_public_key": new_pk, "wireguard_key_epoch": 2 }),
        )
        .await
        .unwrap();
    assert!(r.status.is_success(), "{}", r.error_message());
    let r = h
        .node("node-a")
        .await
        .put_json("/v1/nodes/node-a", &json!({ "endpoint": "192.0.2.1", "wireguard_public_key": new_pk, "wireguard_key_epoch": 3 }))
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::UNPROCESSABLE_ENTITY,
        "an epoch keyd never asked for"
    );
    let b: NodeBundle = serde_json::from_slice(
        &h.node("node-b")
            .await
            .get("/v1/nodes/node-b/bundle")
            .await
            .unwrap()
            .body,
    )
    .unwrap();
    assert_eq!(b.wireguard.peers[0].public_key, new_pk);
    assert!(actions(&h).contains(&"wireguard.node_key_epoch.started".to_owned()));
}

/// Bundle fetches keep a node live without writing on the request path: the scheduler's next
/// pass writes every pending `last_seen` in one transaction. Until then, listings and rollouts
/// count the pending liveness.
#[tokio::test]
async fn fetches_keep_a_node_live_and_the_scheduler_writes_it() {
    let h = Harness::start().await;
    register(&h, "node-a", 1).await;
    let stored = |h: &Harness| -> keyd_proto::NodeInfo {
        let raw = h
            .keyd
            .store()
            .get(keyd::store::Table::Nodes, "node-a")
            .unwrap()
            .unwrap();
        serde_json::from_slice(&raw).unwrap()
    };
    let registered = stored(&h).last_seen;
    let mut node = h.node("node-a").await;
    let first = node.get("/v1/nodes/node-a/bundle").await.unwrap();
    assert!(first.status.is_success(), "{}", first.error_message());

    h.clock.advance(Duration::from_secs(31));
    // keyd's clock is wall-clock seconds plus the offset: the fetch happens between these two.
    let before = h.keyd.clock().now();
    let r = node.get("/v1/nodes/node-a/bundle").await.unwrap();
    let after = h.keyd.clock().now();
    assert!(r.status.is_success(), "{}", r.error_message());
    assert_eq!(
        r.headers.get(header::ETAG),
        first.headers.get(header::ETAG),
        "liveness is not part of the bundle"
    );
    assert_eq!(
        stored(&h).last_seen,
        registered,
        "no write on the fetch path"
    );
    let seen = h.keyd.list_nodes()[0].last_seen;
    assert!(
        before <= seen && seen <= after,
        "listing shows pending liveness: {seen} not in {before}..={after}"
    );

    h.clock.advance(Duration::from_secs(5));
    h.keyd.tick().await.unwrap();
    assert_eq!(stored(&h).last_seen, seen, "the scheduler pass wrote it");
    assert_eq!(
        h.keyd.list_nodes()[0].last_seen,
        seen,
        "and the cache has it"
    );
    assert_eq!(
        h.keyd.flush_liveness().await.unwrap(),
        0,
        "nothing left pending"
    );

    // Pending liveness counts for a rollout before any pass writes it: a node that polls but
    // has not acknowledged yet is waited for, not written off as dead.
    register(&h, "node-b", 2).await;
    let mut admin = h.admin().await;
    for _ in 0..2 {
        let r = admin
            .post_json("/v1/ipsec/rotate", &json!({}))
            .await
            .unwrap();
        assert!(r.status.is_success(), "{}", r.error_message());
    }
    h.clock.advance(Duration::from_secs(301));
    for name in ["node-a", "node-b"] {
        let path = format!("/v1/nodes/{name}/bundle");
        let r = h.node(name).await.get(&path).await.unwrap();
        assert!(r.status.is_success(), "{}", r.error_message());
    }
    let r = ipsec(&h).await.rollout.unwrap();
    assert!(r.not_live.is_empty(), "polling nodes are live: {r:?}");
    assert_eq!(r.waiting_for, vec!["node-a", "node-b"]);
    ack(&h, "node-a", &[1, 2], 1).await; // advances the rollout without a scheduler pass
    let r = ipsec(&h).await.rollout.unwrap();
    assert_eq!(r.phase, "staged", "still waiting for node-b: {r:?}");
    assert_eq!(r.waiting_for, vec!["node-b"]);

    // A stop writes what is pending; the restarted keyd has it, and the same bundle.
    let polled = h.keyd.list_nodes();
    let h = h.restart().await;
    let mut listed = h.keyd.list_nodes();
    listed.sort_by(|a, b| a.name.cmp(&b.name));
    assert_eq!(
        listed.iter().map(|n| n.last_seen).collect::<Vec<_>>(),
        polled.iter().map(|n| n.last_seen).collect::<Vec<_>>()
    );
    let again = h
        .node("node-a")
        .await
        .get("/v1/nodes/node-a/bundle")
        .await
        .unwrap();
    assert!(again.status.is_success(), "{}", again.error_message());
}
