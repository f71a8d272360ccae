//! The one-node kubelet cluster (`keyd_tests::kubelet`) runs pods from images built here from
//! the project's binaries: a pod runs `keyctl --version` to completion and its log is read
//! through the API server (which asks the kubelet for it); a hostNetwork DaemonSet's pod becomes
//! Ready by an exec probe; a pod sees a projected service-account token for audience `keyd`
//! that the API server then accepts. One cluster for all three: it takes half a minute to start.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use base64::Engine as _;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use keyd_tests::kubelet::image::Image;
use keyd_tests::kubelet::{self, KubeletCluster, NODE};
use keyd_tests::prereq;
use kube::api::{Api, LogParams, PostParams};

const IMAGE: &str = "keyd.test/keyctl:dev";

/// keyctl (the binary under test) and busybox (a long-running process and `cat` for the
/// DaemonSet and token pods), or why not.
fn programs() -> Result<(PathBuf, PathBuf), String> {
    let keyctl = kubelet::workspace_binary("keyctl")?;
    let busybox = kubelet::which("busybox")
        .ok_or("busybox not found on PATH (apt-get install busybox-static)")?;
    Ok((keyctl, busybox))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn privileged_kubelet_runs_pods_from_local_images() {
    if !prereq::require(
        "a kubelet node (kubelet, kube-scheduler, containerd, runc, CNI plugins, root)",
        kubelet::binaries().map(drop),
    ) {
        return;
    }
    let programs = programs();
    if !prereq::require("keyctl and busybox", programs.clone().map(drop)) {
        return;
    }
    let (keyctl, busybox) = programs.unwrap();
    let started = Instant::now();
    let node = KubeletCluster::start().await;
    eprintln!("cluster up, node Ready: {:.1?}", started.elapsed());
    let image = Image::new(IMAGE)
        .binary(&keyctl, "/usr/local/bin/keyctl")
        .unwrap()
        .binary(&busybox, "/bin/busybox")
        .unwrap();
    node.import(&image).unwrap();
    eprintln!("image imported: {:.1?}", started.elapsed());
    let client = node.client().await;
    let pods = Api::<Pod>::namespaced(client.clone(), "default");

    // 1. A project binary runs to completion; its output comes back through the API server.
    let expected = std::process::Command::new(&keyctl)
        .arg("--version")
        .output()
        .unwrap();
    let expected = String::from_utf8(expected.stdout).unwrap();
    assert!(expected.starts_with("keyctl "), "{expected}");
    pods.create(
        &PostParams::default(),
        &pod("keyctl-version", "keyctl --version"),
    )
    .await
    .unwrap();
    let done = wait_pod(&node, &pods, "keyctl-version", succeeded).await;
    let pod_ip = done.status.and_then(|s| s.pod_ip).unwrap_or_default();
    let subnet = node.node_ip().rsplit_once('.').unwrap().0.to_owned() + ".";
    assert!(
        pod_ip.starts_with(&subnet),
        "pod IP {pod_ip} not from the node's pod network {subnet}0/24"
    );
    let log = pods
        .logs("keyctl-version", &LogParams::default())
        .await
        .unwrap();
    assert_eq!(log, expected, "the pod's log");
    eprintln!("keyctl pod done: {:.1?}", started.elapsed());

    // 2. A hostNetwork DaemonSet's pod on the node, Ready by an exec probe (the kubelet runs a
    //    command in the container through containerd).
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), "default");
    daemonsets
        .create(&PostParams::default(), &daemonset("keyd-agent"))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    let agent = loop {
        let list = pods
            .list(&kube::api::ListParams::default().labels("app=keyd-agent"))
            .await
            .unwrap();
        if let Some(p) = list.items.into_iter().find(ready) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "DaemonSet pod not Ready after 90 s\n--- kubelet:\n{}\n--- controller manager:\n{}",
            node.kubelet_log(60),
            node.cluster().controller_manager_log()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let spec = agent.spec.unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(NODE));
    assert_eq!(
        agent.status.and_then(|s| s.pod_ip).as_deref(),
        Some(node.node_ip().as_str()),
        "a hostNetwork pod has the node's address"
    );
    eprintln!("DaemonSet pod Ready: {:.1?}", started.elapsed());

    // 3. A projected service-account token for audience `keyd`, as node-shim will present it.
    pods.create(&PostParams::default(), &token_pod("token-reader"))
        .await
        .unwrap();
    wait_pod(&node, &pods, "token-reader", succeeded).await;
    let token = pods
        .logs("token-reader", &LogParams::default())
        .await
        .unwrap();
    let claims = jwt_claims(&token);
    assert_eq!(claims["aud"], serde_json::json!(["keyd"]), "{claims}");
    assert_eq!(
        claims["sub"], "system:serviceaccount:default:default",
        "{claims}"
    );
    assert_eq!(
        claims["kubernetes.io"]["pod"]["name"], "token-reader",
        "the token is bound to its pod: {claims}"
    );
    let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
    assert_eq!(lifetime, 600, "expirationSeconds: {claims}");
    let review = Api::<TokenReview>::all(client.clone())
        .create(
            &PostParams::default(),
            &TokenReview {
                spec: TokenReviewSpec {
                    token: Some(token.trim().to_owned()),
                    audiences: Some(vec!["keyd".to_owned()]),
                },
                ..TokenReview::default()
            },
        )
        .await
        .unwrap();
    let status = review.status.unwrap();
    assert_eq!(status.authenticated, Some(true), "{status:?}");
    eprintln!("token pod done: {:.1?}", started.elapsed());

    let bridge = node.bridge().to_owned();
    let dir = node.dir().to_owned();
    let stopping = Instant::now();
    drop(node);
    eprintln!(
        "torn down in {:.1?}; start to teardown: {:.1?}",
        stopping.elapsed(),
        started.elapsed()
    );
    assert!(
        !std::path::Path::new("/sys/class/net")
            .join(&bridge)
            .exists(),
        "bridge {bridge} left behind"
    );
    assert!(!dir.exists(), "{} left behind", dir.display());
}

/// A pod that runs `command` (split at spaces) in the test image once.
fn pod(name: &str, command: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": false,
            "containers": [{
                "name": "main",
                "image": IMAGE,
                "imagePullPolicy": "Never",
                "command": command.split(' ').collect::<Vec<_>>(),
            }],
        },
    }))
    .unwrap()
}

fn daemonset(name: &str) -> DaemonSet {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "selector": { "matchLabels": { "app": name } },
            "template": {
                "metadata": { "labels": { "app": name } },
                "spec": {
                    "hostNetwork": true,
                    "automountServiceAccountToken": false,
                    "terminationGracePeriodSeconds": 1,
                    "containers": [{
                        "name": "main",
                        "image": IMAGE,
                        "imagePullPolicy": "Never",
                        "command": ["/bin/busybox", "sleep", "3600"],
                        "readinessProbe": {
                            "exec": { "command": ["keyctl", "--version"] },
                            "periodSeconds": 1,
                        },
                    }],
                },
            },
        },
    }))
    .unwrap()
}

/// A pod that prints its projected token for audience `keyd`.
fn token_pod(name: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": { "name": name },
        "spec": {
            "restartPolicy": "Never",
            "serviceAccountName": "default",
            "containers": [{
                "name": "main",
                "image": IMAGE,
                "imagePullPolicy": "Never",
                "command": ["/bin/busybox", "cat", "/var/run/secrets/keyd/token"],
                "volumeMounts": [{ "name": "keyd-token", "mountPath": "/var/run/secrets/keyd" }],
            }],
            "volumes": [{
                "name": "keyd-token",
                "projected": { "sources": [{ "serviceAccountToken": {
                    "audience": "keyd",
                    "expirationSeconds": 600,
                    "path": "token",
                }}]},
            }],
        },
    }))
    .unwrap()
}

fn succeeded(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// Waits up to 90 s for pod `name` to satisfy `done`; a pod that fails fails the test at once.
async fn wait_pod(
    node: &KubeletCluster,
    pods: &Api<Pod>,
    name: &str,
    done: fn(&Pod) -> bool,
) -> Pod {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let pod = pods.get_opt(name).await.unwrap();
        if let Some(pod) = &pod {
            if done(pod) {
                return pod.clone();
            }
            let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
            assert_ne!(
                phase,
                Some("Failed"),
                "pod {name} failed: {:?}\n--- kubelet:\n{}",
                pod.status,
                node.kubelet_log(40)
            );
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} not done after 90 s: {:?}\n--- kubelet:\n{}\n--- containerd:\n{}",
            pod.and_then(|p| p.status),
            node.kubelet_log(60),
            node.containerd_log(20)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The claims of a JWT (its signature is the API server's business: the TokenReview checks it).
fn jwt_claims(token: &str) -> serde_json::Value {
    let payload = token
        .trim()
        .split('.')
        .nth(1)
        .expect("a JWT has three parts");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}
