//! The metrics the shipped alerting rules and dashboard read (deploy/monitoring/), from a real
//! `keyd dev` process's ops listener: every `keyd_*` name they query is exposed, and the key and
//! rollout gauges say what keyd's report and rollout say. An IPsec rollout that two live nodes
//! never acknowledge shows as 2 waiting nodes, then as stuck past `rollout_stuck_after`.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use http::Method;
use serde_json::json;

mod process;
use process::{Identity, Keyd, call, register_dev_node};

/// Polls keyd's `/metrics` (plain HTTP on the ops listener) until every line of `want` is
/// there, for up to 15 s; returns the exposition.
async fn metrics_with(k: &Keyd, want: &[String]) -> String {
    let addr = format!("127.0.0.1:{}", k.ops).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (status, body) = keyd_tests::http::request(addr, "GET", "/metrics", &[], vec![])
            .await
            .unwrap();
        assert_eq!(status, 200);
        let text = String::from_utf8(body).unwrap();
        let absent: Vec<&String> = want
            .iter()
            .filter(|w| !text.lines().any(|l| l == w.as_str()))
            .collect();
        if absent.is_empty() {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{absent:?} missing from /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerting_rules_read_metrics_keyd_exposes_with_the_rollouts_state() {
    keyd_mtls::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let mut k = Keyd::spawn(
        &dir.path().join("data"),
        &[("KEYD_ROLLOUT_STUCK_AFTER", "2s".into())],
    );
    k.ready().await.unwrap();
    let admin = |m: Method, path: &'static str, body: serde_json::Value| {
        let k = &k;
        async move { call(k, Identity::Admin, m, path, Some(body)).await.unwrap() }
    };
    admin(
        Method::PUT,
        "/v1/schedules/ipsec/bounds",
        json!({ "max_period": "365days" }),
    )
    .await;
    admin(
        Method::PUT,
        "/v1/schedules/ipsec",
        json!({ "overlap": "0s" }),
    )
    .await;
    admin(Method::POST, "/v1/ipsec/rotate", json!({})).await;
    // Two live nodes (registered, fetching) that never acknowledge the next key.
    for (i, name) in ["node-a", "node-b"].into_iter().enumerate() {
        register_dev_node(&k, name, i).await.unwrap();
        call(
            &k,
            Identity::Node(name),
            Method::GET,
            &format!("/v1/nodes/{name}/bundle"),
            None,
        )
        .await
        .unwrap();
    }
    admin(Method::POST, "/v1/ipsec/rotate", json!({})).await;

    // The compliance bound: max_period + overlap + the allowed rollout wait (2 s).
    let bound = 365 * 86_400 + 2;
    let text = metrics_with(
        &k,
        &[
            "keyd_ipsec_rollout_waiting_nodes 2".into(),
            "keyd_ipsec_rollout_stuck 1".into(),
            format!("keyd_key_max_age_seconds{{class=\"ipsec\"}} {bound}"),
            "keyd_key_rotation_overdue{class=\"ipsec\"} 0".into(),
            "keyd_key_within_bounds{class=\"ipsec\"} 1".into(),
            "keyd_key_schedule_paused{class=\"ipsec\"} 0".into(),
        ],
    )
    .await;
    for class in ["ipsec", "wireguard-psk", "wireguard-node-keys", "kek"] {
        assert!(
            text.contains(&format!("keyd_key_age_seconds{{class=\"{class}\"}} ")),
            "no key age for {class}:\n{text}"
        );
    }
    // No bound set on the others: no bound exposed, so no ratio against one.
    assert!(
        !text.contains("keyd_key_max_age_seconds{class=\"kek\"}"),
        "{text}"
    );
    let last_pass: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("keyd_scheduler_last_pass_timestamp_seconds "))
        .unwrap()
        .parse()
        .unwrap();
    let now = keyd_proto::Timestamp::now().0;
    assert!(
        now.abs_diff(last_pass) < 30,
        "last pass {last_pass}, now {now}"
    );

    // A certificate's expiry has samples only with [cluster_pki] (keyd/tests/cluster_pki.rs).
    let missing = keyd_tests::monitoring::missing(
        &text,
        "keyd_",
        &["keyd_webhook_", "keyd_cluster_pki_certificate_"],
    );
    assert!(
        missing.is_empty(),
        "deploy/monitoring/ queries metrics keyd does not expose: {missing:?}"
    );

    // A paused schedule shows (KeydKeySchedulePaused reads it).
    admin(
        Method::PUT,
        "/v1/schedules/ipsec",
        json!({ "paused": true }),
    )
    .await;
    metrics_with(&k, &["keyd_key_schedule_paused{class=\"ipsec\"} 1".into()]).await;
    k.stop().await;
}
