//! The policy watcher against a real kube-apiserver: keyd watches pods, namespaces and policies,
//! compiles each registered node's rules and serves a node only its own, conditionally and
//! long-polled like the bundle; and nodes' data-plane reports. Pods are created with a `nodeName` and their status (phase,
//! addresses) set through the status subresource, since no kubelet runs.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::Harness;
use http::{Method, StatusCode, header};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use keyd_mtls::client::Connection;
use keyd_policy::crd::{ClusterEncryptionPolicy, EncryptionPolicy};
use keyd_proto::rules::{DataplaneReport, DataplaneSummary, NodeRules, PolicyCounters};
use keyd_proto::{ErrorBody, NodeRegistration};
use keyd_tests::cluster::{self, Cluster};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

fn registration(ip: &str, cidr: &str) -> NodeRegistration {
    NodeRegistration {
        endpoint: ip.parse().unwrap(),
        pod_cidrs: vec![cidr.parse().unwrap()],
        wireguard_public_key: None,
        wireguard_key_epoch: None,
        boot_id: None,
    }
}

async fn apply<K>(api: &Api<K>, value: serde_json::Value)
where
    K: kube::Resource + Clone + serde::Serialize + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(value).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap();
}

/// A running pod on `node` with `ip`, labelled `app`.
async fn running_pod(client: &kube::Client, ns: &str, name: &str, app: &str, node: &str, ip: &str) {
    let pods = Api::<Pod>::namespaced(client.clone(), ns);
    apply(
        &pods,
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": {"app": app}},
            "spec": {"nodeName": node, "containers": [{"name": "c", "image": "example"}]}
        }),
    )
    .await;
    let status = json!({"status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

fn error_of(body: &[u8]) -> ErrorBody {
    serde_json::from_slice(body).unwrap()
}

/// Polls `GET /v1/nodes/{node}/rules` until `ok` holds (10 s at most).
async fn rules_until(
    conn: &mut Connection,
    node: &str,
    ok: impl Fn(&NodeRules) -> bool,
) -> (NodeRules, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let path = format!("/v1/nodes/{node}/rules");
    loop {
        let r = conn.get(&path).await.unwrap();
        if r.status == StatusCode::OK {
            let rules: NodeRules = serde_json::from_slice(&r.body).unwrap();
            if ok(&rules) {
                let etag = r.headers[header::ETAG].to_str().unwrap().to_owned();
                return (rules, etag);
            }
        }
        assert!(
            Instant::now() < deadline,
            "rules of {node} never matched; last answer {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs keyctl as the dev admin on a blocking thread (keyd serves on this runtime meanwhile).
async fn keyctl(h: &Harness, args: &[&str]) -> (i32, String, String) {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_keyctl"));
    cmd.arg("--config")
        .arg(&h.setup.keyctl_toml)
        .args(["--server", &format!("https://127.0.0.1:{}", h.api.port())])
        .args(args);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn show(rules: &NodeRules) -> Vec<String> {
    rules
        .endpoints
        .iter()
        .map(|e| {
            format!(
                "{} {} sel={:?} peer={:?}",
                e.prefix, e.node, e.selected_by, e.peer_of
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_get_their_rules_from_the_kubernetes_api_and_changes_reach_a_long_poll() {
    if !keyd_tests::prereq::require("kube-apiserver and etcd", cluster::binaries().map(drop)) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path()).await;
    let client = cluster.client().await;
    cluster.install_crds(&client).await;
    let token = dir.path().join("token");
    std::fs::write(&token, "admin-token").unwrap();
    let h = Harness::start_with_toml(&format!(
        "[policy]\nkube_api = {:?}\nkube_ca = {:?}\nkube_token_file = {:?}\n",
        cluster.url,
        dir.path().join("apiserver-ca.pem").display().to_string(),
        token.display().to_string(),
    ))
    .await;

    // Two registered nodes; a pod on each, in namespace a.
    for (name, ip, cidr) in [
        ("node-a", "192.0.2.1", "10.1.0.0/24"),
        ("node-b", "192.0.2.2", "10.2.0.0/24"),
    ] {
        let r = h
            .node(name)
            .await
            .put_json(&format!("/v1/nodes/{name}"), &registration(ip, cidr))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    let namespaces = Api::<Namespace>::all(client.clone());
    apply(
        &namespaces,
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a", "labels": {"team": "a"}}}),
    )
    .await;
    running_pod(&client, "a", "web", "web", "node-a", "10.1.0.10").await;
    running_pod(&client, "a", "db", "db", "node-b", "10.2.0.20").await;
    let policies = Api::<EncryptionPolicy>::namespaced(client.clone(), "a");
    apply(
        &policies,
        json!({
            "apiVersion": "keyd.io/v1alpha1", "kind": "EncryptionPolicy",
            "metadata": {"name": "web-db", "namespace": "a"},
            "spec": {"mode": "ipsec", "podSelector": {"matchLabels": {"app": "web"}},
                     "ports": [{"port": 443}], "peers": [{"podSelector": {"matchLabels": {"app": "db"}}}]}
        }),
    )
    .await;

    // node-a's rules: its selected pod, the remote peer.
    let mut a = h.node("node-a").await;
    let (rules, etag) = rules_until(&mut a, "node-a", |r| !r.policies.is_empty()).await;
    assert_eq!(rules.policies[0].name, "EncryptionPolicy a/web-db");
    assert!(rules.policies[0].strict, "strict unless said otherwise");
    assert_eq!(rules.policies[0].ports.len(), 1);
    assert_eq!(
        show(&rules),
        [
            "10.1.0.10/32 node-a sel=[0] peer=[]",
            "10.2.0.20/32 node-b sel=[] peer=[0]"
        ]
    );
    assert_eq!(etag, format!("\"{}\"", rules.revision));

    // Unchanged: 304.
    let path = "/v1/nodes/node-a/rules";
    let cond = [(header::IF_NONE_MATCH, etag.as_str())];
    let r = a.send(Method::GET, path, None, &cond).await.unwrap();
    assert_eq!(r.status, StatusCode::NOT_MODIFIED);

    // A node reads only its own rules; an admin reads any.
    let r = h.node("node-b").await.get(path).await.unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = h.admin().await.get(path).await.unwrap();
    assert_eq!(r.status, StatusCode::OK);

    // A change reaches a waiting long poll within 2 s.
    let waiting = {
        let mut a = h.node("node-a").await;
        let etag = etag.clone();
        tokio::spawn(async move {
            let cond = [(header::IF_NONE_MATCH, etag.as_str())];
            let r = a
                .send(Method::GET, &format!("{path}?wait=30s"), None, &cond)
                .await
                .unwrap();
            (r, Instant::now())
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let changed_at = Instant::now();
    policies
        .patch(
            "web-db",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"strict": false}})),
        )
        .await
        .unwrap();
    let (r, answered_at) = waiting.await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let elapsed = answered_at.duration_since(changed_at);
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    let rules: NodeRules = serde_json::from_slice(&r.body).unwrap();
    assert!(!rules.policies[0].strict);

    // The db pod moves to node-a (deleted at once: no kubelet confirms a graceful deletion):
    // node-b's rules empty out, and pods of one node leave each other alone.
    let now = kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    Api::<Pod>::namespaced(client.clone(), "a")
        .delete("db", &now)
        .await
        .unwrap();
    running_pod(&client, "a", "db-2", "db", "node-a", "10.1.0.20").await;
    let mut b = h.node("node-b").await;
    let (rules, _) = rules_until(&mut b, "node-b", |r| r.policies.is_empty()).await;
    assert!(rules.endpoints.is_empty());
    let (rules, _) = rules_until(&mut a, "node-a", |r| !r.policies[0].strict).await;
    assert_eq!(show(&rules), ["10.1.0.10/32 node-a sel=[0] peer=[]"]);

    // A malformed selector is reported to every node, not silently dropped.
    apply(
        &policies,
        json!({
            "apiVersion": "keyd.io/v1alpha1", "kind": "EncryptionPolicy",
            "metadata": {"name": "bad", "namespace": "a"},
            "spec": {"mode": "wireguard", "podSelector": {"matchExpressions": [
                {"key": "app", "operator": "In", "values": []}]}}
        }),
    )
    .await;
    let (rules, _) = rules_until(&mut b, "node-b", |r| !r.rejected.is_empty()).await;
    assert_eq!(rules.rejected[0].name, "EncryptionPolicy a/bad");
    assert!(
        rules.rejected[0].reason.contains("podSelector"),
        "{:?}",
        rules.rejected[0]
    );

    // A cluster policy selects by the namespace's labels (watched as metadata); with no peers,
    // node-b's own pod CIDR is the peer of node-a's web pod.
    apply(
        &Api::<ClusterEncryptionPolicy>::all(client.clone()),
        json!({
            "apiVersion": "keyd.io/v1alpha1", "kind": "ClusterEncryptionPolicy",
            "metadata": {"name": "team-a"},
            "spec": {"mode": "wireguard", "namespaceSelector": {"matchLabels": {"team": "a"}},
                     "podSelector": {"matchLabels": {"app": "web"}}}
        }),
    )
    .await;
    let (rules, _) = rules_until(&mut b, "node-b", |r| !r.policies.is_empty()).await;
    assert_eq!(rules.policies[0].name, "ClusterEncryptionPolicy team-a");
    assert_eq!(
        show(&rules),
        [
            "10.1.0.10/32 node-a sel=[0] peer=[]",
            "10.2.0.0/24 node-b sel=[] peer=[0]"
        ]
    );

    // keyctl shows a node's rules to an admin.
    let (code, stdout, stderr) = keyctl(&h, &["rules", "node-b"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("ClusterEncryptionPolicy team-a") && stdout.contains("10.2.0.0/24"),
        "{stdout}"
    );
    assert!(
        stdout.contains("rejected: EncryptionPolicy a/bad"),
        "{stdout}"
    );

    // The webhook learns from keyd's enforcement status that the policy covers nothing.
    let r = h.admin().await.get("/v1/enforcement").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let status: keyd_proto::EnforcementStatus = serde_json::from_slice(&r.body).unwrap();
    let why = status
        .rejection("EncryptionPolicy a/bad")
        .unwrap_or_else(|| {
            panic!("{:?}", status.rejected_policies);
        });
    assert!(
        why.contains("podSelector") && why.ends_with("(left out on 2 nodes)"),
        "{why}"
    );
    assert_eq!(status.rejected_policies.len(), 1, "{status:?}");
    assert!(!status.rules_pending, "{status:?}");

    // The watcher's metrics: ready, compiled, the rejected policy counted.
    let (status, body) = keyd_tests::http::request(h.ops, "GET", "/metrics", &[], vec![])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let text = String::from_utf8(body).unwrap();
    for line in [
        "keyd_policy_rules_ready 1",
        "keyd_policy_rules_rejected_policies 1",
    ] {
        assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
    }
    assert!(text.contains("keyd_policy_rules_fetches_total{outcome=\"not_modified\"}"));

    // A data-plane report may name the policies of the node's current rules.
    let r = a
        .post_json(
            "/v1/nodes/node-a/dataplane",
            &report("policy", vec![dropped("EncryptionPolicy a/web-db", 0)]),
        )
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
}

#[tokio::test]
async fn without_a_policy_section_the_rules_endpoint_says_so() {
    let h = Harness::start().await;
    let r = h
        .node("node-a")
        .await
        .get("/v1/nodes/node-a/rules")
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::NOT_FOUND);
    let e = error_of(&r.body);
    assert_eq!(e.error, "policy_not_configured");
    assert!(e.message.contains("[policy]"), "{}", e.message);
}

fn report(mode: &str, policies: Vec<PolicyCounters>) -> DataplaneReport {
    DataplaneReport {
        node_mode: mode.into(),
        rules_revision: None,
        counting_since: keyd_proto::Timestamp(1_000),
        at: keyd_proto::Timestamp(2_000),
        policies,
    }
}

fn dropped(name: &str, packets: u64) -> PolicyCounters {
    PolicyCounters {
        name: name.into(),
        programmed: true,
        encrypted_packets: 100,
        dropped_packets: packets,
        dropped_bytes: packets * 1_000,
        ..PolicyCounters::default()
    }
}

#[tokio::test]
async fn dataplane_reports_are_kept_summed_and_new_strict_drops_audited_once() {
    let h = Harness::start().await;
    for (name, ip, cidr) in [
        ("node-a", "192.0.2.1", "10.1.0.0/24"),
        ("node-b", "192.0.2.2", "10.2.0.0/24"),
    ] {
        let r = h
            .node(name)
            .await
            .put_json(&format!("/v1/nodes/{name}"), &registration(ip, cidr))
            .await
            .unwrap();
        assert_eq!(r.status, StatusCode::OK);
    }
    let mut a = h.node("node-a").await;
    let mut b = h.node("node-b").await;
    let post = "/v1/nodes/node-a/dataplane";
    let r = a
        .post_json(post, &report("all", vec![dropped("all", 5)]))
        .await
        .unwrap();
    assert_eq!(
        r.status,
        StatusCode::OK,
        "{}",
        String::from_utf8_lossy(&r.body)
    );
    // The same counters again: nothing new to audit.
    let r = a
        .post_json(post, &report("all", vec![dropped("all", 5)]))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let r = b
        .post_json(
            "/v1/nodes/node-b/dataplane",
            &report("all", vec![dropped("all", 0)]),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::OK);

    // Only its own node; only policies of its rules (this keyd compiles none) or `all`.
    let r = b
        .post_json(post, &report("all", vec![dropped("all", 1)]))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = a
        .post_json(
            post,
            &report("policy", vec![dropped("EncryptionPolicy x/y", 1)]),
        )
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_of(&r.body).error, "rules_not_ready");
    let r = a
        .post_json(post, &report("sometimes", vec![]))
        .await
        .unwrap();
    assert_eq!(r.status, StatusCode::UNPROCESSABLE_ENTITY);

    // The admin's view: per policy across nodes.
    let r = a.get("/v1/dataplane").await.unwrap();
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    let r = h.admin().await.get("/v1/dataplane").await.unwrap();
    assert_eq!(r.status, StatusCode::OK);
    let s: DataplaneSummary = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(s.nodes.len(), 2);
    assert_eq!(s.policies.len(), 1);
    let all = &s.policies[0];
    assert_eq!(
        (
            all.name.as_str(),
            all.nodes_reporting,
            all.nodes_programmed,
            all.dropped_packets,
            all.encrypted_packets
        ),
        ("all", 2, 2, 5, 200)
    );

    let (code, stdout, stderr) = keyctl(&h, &["report"]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("data plane (2 nodes reporting)") && stdout.contains("2/2"),
        "{stdout}"
    );

    // One audit record for the report with new drops, none for the repeat.
    let drops: Vec<_> = h
        .keyd
        .store()
        .audit_range(0, 1000)
        .unwrap()
        .into_iter()
        .filter(|r| r.event.action == "dataplane.strict_drops")
        .collect();
    assert_eq!(drops.len(), 1);
    assert_eq!(drops[0].event.actor, "node/node-a");
    assert_eq!(drops[0].event.details["drops"][0]["policy"], "all");
    assert_eq!(drops[0].event.details["drops"][0]["packets"], 5);
}
