//! The Kubernetes manifests under `deploy/`, as a user gets them: every Kustomize folder rendered
//! with a current kustomize, every rendered object validated offline against the Kubernetes
//! schemas (`kubernetes-validate --strict`, at the versions of `SCHEMA_VERSIONS`), and the dev
//! overlay applied server-side to a real kube-apiserver (1.20, built by
//! `scripts/kube-apiserver.sh`) with Debian's kubectl, then read back; keyd's RBAC is checked there
//! by asking the API server what each account may do. The ha overlay is checked against the dev
//! overlay it changes, and applied over it to another API server as a user moves to it.
//!
//! A Rust test rather than a script: the API server harness (`keyd_tests::cluster`) and the
//! prerequisite rule (skip locally, fail under `CI=true`) are already here, and `cargo test` is
//! where a reader looks for what is tested.
//!
//! Needs the tools `./scripts/test.sh` installs (see `keyd_tests::manifests`). Without them the
//! tests print why and pass, except in CI (`CI=true`), where they fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use keyd_tests::cluster::Cluster;
use keyd_tests::manifests::{self, MountedFile, NO_SCHEMA, PodContainer, SCHEMA_VERSIONS, Tools};
use keyd_tests::prereq::require;
use serde_json::Value;

/// Every Kustomize folder: the overlays, and each base on its own (the cert-manager
/// component through its overlay).
const FOLDERS: [&str; 7] = [
    "overlays/dev",
    "overlays/ha",
    "overlays/cert-manager",
    "crds",
    "keyd",
    "node-shim",
    "webhook",
];

/// The field manager of the test's applies.
const MANAGER: &str = "keyd-manifests-test";

fn tools() -> Option<Tools> {
    Tools::required()
}

fn id(o: &Value) -> String {
    format!(
        "{} {}/{}",
        o["kind"].as_str().unwrap_or("?"),
        o["metadata"]["namespace"].as_str().unwrap_or("-"),
        o["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn has_schema(o: &Value) -> bool {
    !NO_SCHEMA
        .iter()
        .any(|(api, kind)| o["apiVersion"] == *api && o["kind"] == *kind)
}

#[test]
fn every_rendered_manifest_validates_offline() {
    let Some(tools) = tools() else { return };
    let scratch = tempfile::tempdir().unwrap();
    for folder in FOLDERS {
        let objects = manifests::render(&tools, &manifests::deploy_dir().join(folder))
            .unwrap_or_else(|e| panic!("rendering deploy/{folder}: {e}"));
        assert!(!objects.is_empty(), "deploy/{folder} renders nothing");
        // Keys never travel in manifests: certificates come from keyd or cert-manager (or, for
        // etcd, a Secret the user creates), the KEK is made by keyd on its volume or held by
        // Vault.
        for o in &objects {
            assert_ne!(
                o["kind"],
                "Secret",
                "deploy/{folder} holds a Secret: {}",
                id(o)
            );
        }
        for version in SCHEMA_VERSIONS {
            let passed = manifests::validate(&tools, &objects, version, scratch.path())
                .unwrap_or_else(|e| panic!("deploy/{folder}: {e}"));
            let with_schema = objects.iter().filter(|o| has_schema(o)).count();
            assert_eq!(passed, with_schema, "deploy/{folder} at {version}");
        }
    }
}

/// The dev overlay is the whole install: each part is in it once.
#[test]
fn the_dev_overlay_holds_every_part() {
    let Some(tools) = tools() else { return };
    let objects = manifests::render(&tools, &manifests::deploy_dir().join("overlays/dev")).unwrap();
    let ids: Vec<String> = objects.iter().map(id).collect();
    for want in [
        "Namespace -/keyd",
        "CustomResourceDefinition -/encryptionpolicies.keyd.io",
        "CustomResourceDefinition -/clusterencryptionpolicies.keyd.io",
        "StatefulSet keyd/keyd",
        "Service keyd/keyd",
        "ConfigMap keyd/keyd",
        "PodDisruptionBudget keyd/keyd",
        "NetworkPolicy keyd/keyd",
        "DaemonSet keyd/node-shim",
        "ConfigMap keyd/node-shim",
        "Deployment keyd/keyd-webhook",
        "NetworkPolicy keyd/keyd-webhook",
        "ValidatingWebhookConfiguration -/keyd-webhook",
    ] {
        assert_eq!(
            ids.iter().filter(|i| *i == want).count(),
            1,
            "{want} in {ids:#?}"
        );
    }
    // Everything namespaced lives in keyd.
    for o in &objects {
        if let Some(ns) = o["metadata"]["namespace"].as_str() {
            assert_eq!(ns, "keyd", "{}", id(o));
        }
    }
    let sts = objects.iter().find(|o| o["kind"] == "StatefulSet").unwrap();
    assert_eq!(sts["spec"]["replicas"], 1, "redb has one writer");
    assert_eq!(
        sts["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"][0],
        "ReadWriteOnce"
    );
}

/// The cert-manager overlay is the dev overlay with cert-manager issuing the certificates:
/// its Issuers and Certificates added, keyd's RBAC for [cluster_pki] gone, the CA injector's
/// annotation on the webhook configuration, and keyd and node-shim reading cert-manager's
/// Secrets. Nothing else changes. (keyd/tests/deploy_config.rs loads its keyd.toml.)
#[test]
fn the_cert_manager_overlay_swaps_keyds_pki_for_cert_managers() {
    let Some(tools) = tools() else { return };
    let dev = manifests::render(&tools, &manifests::deploy_dir().join("overlays/dev")).unwrap();
    let cm = manifests::render(
        &tools,
        &manifests::deploy_dir().join("overlays/cert-manager"),
    )
    .unwrap();
    let pki_rbac = [
        "Role keyd/keyd-pki",
        "RoleBinding keyd/keyd-pki",
        "ClusterRole -/keyd-webhook-ca-bundle",
        "ClusterRoleBinding -/keyd-webhook-ca-bundle",
    ];
    let changed = [
        "StatefulSet keyd/keyd",
        "ConfigMap keyd/keyd",
        "DaemonSet keyd/node-shim",
        "ValidatingWebhookConfiguration -/keyd-webhook",
    ];
    for d in &dev {
        let i = id(d);
        let there = cm.iter().find(|o| id(o) == i);
        if pki_rbac.contains(&i.as_str()) {
            assert!(there.is_none(), "{i} is still there");
        } else if changed.contains(&i.as_str()) {
            assert_ne!(there, Some(d), "{i} is the dev overlay's");
        } else {
            assert_eq!(there, Some(d), "{i} differs from the dev overlay's");
        }
    }
    let mut added: Vec<String> = cm
        .iter()
        .map(id)
        .filter(|i| !dev.iter().any(|d| id(d) == *i))
        .collect();
    added.sort();
    assert_eq!(added, CERT_MANAGER_OBJECTS);

    let vwc = manifests::find(&cm, "ValidatingWebhookConfiguration", "keyd-webhook");
    assert_eq!(
        vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"],
        "keyd/keyd-webhook"
    );
    let shim =
        PodContainer::of_workload(manifests::find(&cm, "DaemonSet", "node-shim"), "node-shim");
    assert_eq!(
        shim.file(Path::new("/etc/node-shim/keyd-ca/ca.crt")),
        Ok(MountedFile::Secret {
            secret: "keyd-node-shim-trust".into(),
            key: "ca.crt".into()
        })
    );
    let keyd = PodContainer::of_workload(manifests::find(&cm, "StatefulSet", "keyd"), "keyd");
    assert!(
        keyd.container["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["mountPath"] != "/run/keyd/pki"),
        "keyd still mounts [cluster_pki]'s volume"
    );
}

/// keyd's objects that the ha overlay changes; every other object is the dev overlay's.
const HA_CHANGES: [&str; 3] = [
    "StatefulSet keyd/keyd",
    "ConfigMap keyd/keyd",
    "PodDisruptionBudget keyd/keyd",
];

/// Whether a label selector (`matchLabels` only, as these manifests write them) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    assert!(
        selector.get("matchExpressions").is_none(),
        "matchExpressions are not read here: {selector}"
    );
    let wanted = selector["matchLabels"]
        .as_object()
        .unwrap_or_else(|| panic!("a selector with no matchLabels: {selector}"));
    !wanted.is_empty() && wanted.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The ha overlay is the dev overlay with keyd's StatefulSet, ConfigMap and budget changed, and
/// nothing else: three replicas with no volume of their own, spread over nodes, a budget that
/// keeps two of them, and etcd's client certificate read from a Secret mounted read-only, at the
/// paths keyd's environment names. (keyd/tests/deploy_config.rs loads its configuration.)
#[test]
fn the_ha_overlay_is_the_dev_overlay_with_three_keyd_over_etcd() {
    let Some(tools) = tools() else { return };
    let dev = manifests::render(&tools, &manifests::deploy_dir().join("overlays/dev")).unwrap();
    let ha = manifests::render(&tools, &manifests::deploy_dir().join("overlays/ha")).unwrap();
    let mut dev_ids: Vec<String> = dev.iter().map(id).collect();
    let mut ha_ids: Vec<String> = ha.iter().map(id).collect();
    dev_ids.sort();
    ha_ids.sort();
    assert_eq!(
        ha_ids, dev_ids,
        "the ha overlay installs what the dev overlay does"
    );
    for o in &ha {
        let same = dev.iter().find(|d| id(d) == id(o)).unwrap();
        if HA_CHANGES.contains(&id(o).as_str()) {
            assert_ne!(o, same, "{} is the dev overlay's", id(o));
        } else {
            assert_eq!(o, same, "{} differs from the dev overlay's", id(o));
        }
    }

    let sts = manifests::find(&ha, "StatefulSet", "keyd");
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["volumeClaimTemplates"], Value::Null, "no PVC");
    let pod_labels = &sts["spec"]["template"]["metadata"]["labels"];
    let pod = PodContainer::of_workload(sts, "keyd");
    // Nothing outlives a pod or ties it to a node: the state is in etcd.
    for v in pod.pod["volumes"].as_array().unwrap() {
        assert!(
            v.get("persistentVolumeClaim").is_none() && v.get("hostPath").is_none(),
            "{v}"
        );
    }
    assert!(
        pod.volume("data")["emptyDir"].is_object(),
        "data is an emptyDir"
    );

    // etcd's CA and keyd's client certificate: files of the Secret keyd-etcd-client, where
    // the variables point, on a read-only mount.
    let env = pod.resolved_env(&Default::default());
    for (var, key) in [
        ("KEYD_STORE_ETCD_CA", "ca.crt"),
        ("KEYD_STORE_ETCD_CERT", "tls.crt"),
        ("KEYD_STORE_ETCD_KEY", "tls.key"),
    ] {
        let path = env
            .get(var)
            .unwrap_or_else(|| panic!("{var} is not set: {env:?}"));
        assert_eq!(
            pod.file(Path::new(path)),
            Ok(MountedFile::Secret {
                secret: "keyd-etcd-client".into(),
                key: key.into()
            }),
            "{var}={path}"
        );
    }
    let etcd_volume = pod.pod["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["secret"]["secretName"] == "keyd-etcd-client")
        .unwrap();
    assert_eq!(
        pod.mount(etcd_volume["name"].as_str().unwrap())["readOnly"],
        true
    );

    // Spread over nodes where it can be, never refused a node: a preferred anti-affinity of
    // keyd's pods to each other, per node.
    let anti = &pod.pod["affinity"]["podAntiAffinity"];
    assert_eq!(
        anti["requiredDuringSchedulingIgnoredDuringExecution"],
        Value::Null,
        "a required anti-affinity leaves a replica pending on a cluster of fewer nodes"
    );
    let term = anti["preferredDuringSchedulingIgnoredDuringExecution"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|t| &t["podAffinityTerm"])
        .find(|t| t["topologyKey"] == "kubernetes.io/hostname")
        .unwrap_or_else(|| panic!("no preferred anti-affinity per node: {anti}"));
    assert!(selects(&term["labelSelector"], pod_labels), "{term}");

    // Probes as the base's: readiness is /readyz, which answers 200 on every replica that
    // serves ("ready (replica; ...)"), not only on the leader.
    pod.assert_ops_probes();

    // The budget keeps two of the three, and counts keyd's pods and no others.
    let pdb = manifests::find(&ha, "PodDisruptionBudget", "keyd");
    assert_eq!(pdb["spec"]["minAvailable"], 2);
    assert_eq!(
        pdb["spec"]["maxUnavailable"],
        Value::Null,
        "one of the two only"
    );
    assert!(selects(&pdb["spec"]["selector"], pod_labels), "{pdb}");
    for o in &ha {
        let labels = &o["spec"]["template"]["metadata"]["labels"];
        if labels.is_object() && id(o) != id(sts) {
            assert!(!selects(&pdb["spec"]["selector"], labels), "{}", id(o));
        }
    }
}

fn kubectl(bin: &Path, cluster: &Cluster) -> Command {
    let mut c = Command::new(bin);
    c.arg("--kubeconfig").arg(&cluster.kubeconfig);
    c
}

fn output(mut cmd: Command) -> (bool, String) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

/// `kind.group` as kubectl takes it.
fn resource(o: &Value) -> String {
    let kind = o["kind"].as_str().unwrap();
    match o["apiVersion"].as_str().unwrap().split_once('/') {
        Some((group, _)) => format!("{kind}.{group}"),
        None => kind.to_owned(),
    }
}

/// A rendered overlay as the 1.20 API server takes it: cert-manager's objects left out
/// (the test server has no cert-manager, whose CRDs are not this project's), and the
/// PodDisruptionBudgets as policy/v1beta1, the same fields under the version 1.20 serves
/// (policy/v1 came in 1.21; the offline validation checks them as policy/v1).
fn for_the_test_server(objects: Vec<Value>) -> (Vec<Value>, Vec<String>) {
    let mut apply = Vec::new();
    let mut left_out = Vec::new();
    for mut o in objects {
        if !has_schema(&o) {
            left_out.push(id(&o));
            continue;
        }
        if o["kind"] == "PodDisruptionBudget" {
            assert_eq!(o["apiVersion"], "policy/v1");
            o["apiVersion"] = "policy/v1beta1".into();
        }
        apply.push(o);
    }
    (apply, left_out)
}

fn write_objects(path: &Path, objects: &[Value]) {
    let mut text = String::new();
    for o in objects {
        text.push_str("---\n");
        text.push_str(&serde_norway::to_string(o).unwrap());
    }
    std::fs::write(path, text).unwrap();
}

fn apply(kubectl_bin: &Path, cluster: &Cluster, file: &Path) -> (bool, String) {
    let mut apply = kubectl(kubectl_bin, cluster);
    apply
        .args(["apply", "--server-side", "--field-manager", MANAGER, "-f"])
        .arg(file);
    output(apply)
}

/// The object as the API server holds it.
fn get(kubectl_bin: &Path, cluster: &Cluster, o: &Value) -> Value {
    let mut get = kubectl(kubectl_bin, cluster);
    get.args(["get", &resource(o), o["metadata"]["name"].as_str().unwrap()]);
    if let Some(ns) = o["metadata"]["namespace"].as_str() {
        get.args(["-n", ns]);
    }
    get.args(["-o", "json"]);
    let (ok, out) = output(get);
    assert!(ok, "{} is not there: {out}", id(o));
    serde_json::from_str(&out).unwrap()
}

/// Applies `file` server-side, which must succeed, and checks that `objects` (its content)
/// are all there.
fn apply_all(kubectl_bin: &Path, cluster: &Cluster, file: &Path, objects: &[Value]) {
    let (ok, out) = apply(kubectl_bin, cluster, file);
    assert!(
        ok,
        "server-side apply failed:\n{out}\n{}",
        cluster.apiserver_log()
    );
    assert_applied(kubectl_bin, cluster, objects);
}

/// Every object is there, owned by this test's applies.
fn assert_applied(kubectl_bin: &Path, cluster: &Cluster, objects: &[Value]) {
    for o in objects {
        let got = get(kubectl_bin, cluster, o);
        assert!(got["metadata"]["uid"].is_string(), "{}", id(o));
        let managers: Vec<&str> = got["metadata"]["managedFields"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["manager"].as_str())
            .collect();
        assert!(managers.contains(&MANAGER), "{}: {managers:?}", id(o));
    }
}

/// What the test server cannot take of an overlay: cert-manager's objects, all named here.
const CERT_MANAGER_OBJECTS: [&str; 9] = [
    "Certificate keyd/keyd-admin",
    "Certificate keyd/keyd-ca",
    "Certificate keyd/keyd-node-shim-trust",
    "Certificate keyd/keyd-server",
    "Certificate keyd/keyd-webhook",
    "Certificate keyd/keyd-webhook-client",
    "Issuer keyd/keyd-ca",
    "Issuer keyd/keyd-selfsigned",
    "Issuer keyd/keyd-webhook-selfsigned",
];

/// The overlay `folder` rendered as the test server takes it, written to `dir`.
fn overlay_for_the_test_server(tools: &Tools, folder: &str, dir: &Path) -> (Vec<Value>, PathBuf) {
    let rendered = manifests::render(tools, &manifests::deploy_dir().join(folder)).unwrap();
    let (objects, mut left_out) = for_the_test_server(rendered);
    // Only cert-manager's objects are left out, all of them named here, and only from the
    // overlay that asks for cert-manager: keyd issues the certificates in the others.
    left_out.sort();
    let expected: &[&str] = if folder == "overlays/cert-manager" {
        &CERT_MANAGER_OBJECTS
    } else {
        &[]
    };
    assert_eq!(left_out, expected, "deploy/{folder}");
    let file = dir.join(format!("{}.yaml", folder.replace('/', "-")));
    write_objects(&file, &objects);
    (objects, file)
}

/// Whether the test server and its kubectl are there (a failure in CI when not).
fn api_server_available() -> bool {
    require(
        "Debian's kubectl 1.20",
        manifests::apply_kubectl().map(|_| ()),
    ) && require(
        "kube-apiserver and etcd",
        keyd_tests::cluster::binaries().map(|_| ()),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_overlay_applies_server_side_to_a_real_api_server() {
    let Some(tools) = tools() else { return };
    if !api_server_available() {
        return;
    }
    let kubectl_bin = manifests::apply_kubectl().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path()).await;

    let (objects, file) = overlay_for_the_test_server(&tools, "overlays/dev", dir.path());
    apply_all(&kubectl_bin, &cluster, &file, &objects);

    // What the server kept is what was sent, where it matters most.
    let ds = get(
        &kubectl_bin,
        &cluster,
        manifests::find(&objects, "DaemonSet", "node-shim"),
    );
    let token = ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|v| v["projected"]["sources"][0]["serviceAccountToken"].as_object())
        .expect("the projected token");
    assert_eq!(token["audience"], "keyd");
    assert_eq!(token["expirationSeconds"], 600);
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);

    // The API server refuses what is not in its schema, so the apply above did check fields.
    let mut broken = manifests::find(&objects, "StatefulSet", "keyd").clone();
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["runAsNonRot"] =
        true.into();
    let broken_file = dir.path().join("broken.yaml");
    write_objects(&broken_file, &[broken]);
    let (ok, out) = apply(&kubectl_bin, &cluster, &broken_file);
    assert!(!ok, "a field the schema lacks was accepted: {out}");
    assert!(out.contains("runAsNonRot"), "{out}");

    check_rbac(&kubectl_bin, &cluster);
}

/// The ha overlay applied as a user moves to it from the dev overlay (its README's steps):
/// over the dev overlay, the StatefulSet is refused, because a StatefulSet's claim templates
/// and pod management cannot change; once it is deleted, everything applies. The server then
/// holds three replicas with no claim, the etcd variables, and a budget of minAvailable 2
/// alone (the dev overlay's maxUnavailable, which this test's field manager applied, is gone:
/// the server would refuse a budget with both).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ha_overlay_applies_server_side_over_the_dev_overlay() {
    let Some(tools) = tools() else { return };
    if !api_server_available() {
        return;
    }
    let kubectl_bin = manifests::apply_kubectl().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(dir.path()).await;

    let (_, dev_file) = overlay_for_the_test_server(&tools, "overlays/dev", dir.path());
    let (objects, ha_file) = overlay_for_the_test_server(&tools, "overlays/ha", dir.path());
    let (ok, out) = apply(&kubectl_bin, &cluster, &dev_file);
    assert!(ok, "the dev overlay: {out}\n{}", cluster.apiserver_log());

    let (ok, out) = apply(&kubectl_bin, &cluster, &ha_file);
    assert!(
        !ok,
        "the ha overlay applied over the dev overlay's StatefulSet: {out}"
    );
    assert!(
        out.contains("StatefulSet \"keyd\" is invalid")
            && out.contains("Forbidden: updates to statefulset spec"),
        "{out}"
    );

    let mut delete = kubectl(&kubectl_bin, &cluster);
    delete.args(["delete", "statefulset.apps", "keyd", "-n", "keyd"]);
    let (ok, out) = output(delete);
    assert!(ok, "{out}");
    apply_all(&kubectl_bin, &cluster, &ha_file, &objects);

    let sts = get(
        &kubectl_bin,
        &cluster,
        manifests::find(&objects, "StatefulSet", "keyd"),
    );
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["volumeClaimTemplates"], Value::Null);
    let env: Vec<&str> = sts["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["name"].as_str())
        .collect();
    for var in [
        "KEYD_STORE_ETCD_CA",
        "KEYD_STORE_ETCD_CERT",
        "KEYD_STORE_ETCD_KEY",
    ] {
        assert!(env.contains(&var), "{var} in {env:?}");
    }
    let pdb = get(
        &kubectl_bin,
        &cluster,
        manifests::find(&objects, "PodDisruptionBudget", "keyd"),
    );
    assert_eq!(pdb["spec"]["minAvailable"], 2, "{pdb}");
    assert_eq!(pdb["spec"]["maxUnavailable"], Value::Null, "{pdb}");
    let config = manifests::find(&objects, "ConfigMap", "keyd");
    let held = get(&kubectl_bin, &cluster, config);
    assert_eq!(held["data"], config["data"]);
}

/// keyd's account may make exactly the calls keyd makes (deploy/keyd/rbac.yaml says which code
/// makes each), node-shim's none, as the API server's authorizer answers for the applied RBAC.
fn check_rbac(kubectl_bin: &Path, cluster: &Cluster) {
    let keyd = "system:serviceaccount:keyd:keyd";
    let node_shim = "system:serviceaccount:keyd:node-shim";
    // (account, verb, resource, namespace: None for cluster-wide, allowed)
    let cases: &[(&str, &str, &str, Option<&str>, bool)] = &[
        // bootstrap: TokenReview, the token's pod in keyd's namespace, the named Node
        (
            keyd,
            "create",
            "tokenreviews.authentication.k8s.io",
            None,
            true,
        ),
        (keyd, "get", "pods", Some("keyd"), true),
        (keyd, "get", "nodes", None, true),
        // the policy watcher: list and watch, cluster-wide
        (keyd, "list", "pods", None, true),
        (keyd, "watch", "pods", None, true),
        (keyd, "list", "namespaces", None, true),
        (keyd, "watch", "namespaces", None, true),
        (keyd, "list", "encryptionpolicies.keyd.io", None, true),
        (keyd, "watch", "encryptionpolicies.keyd.io", None, true),
        (
            keyd,
            "list",
            "clusterencryptionpolicies.keyd.io",
            None,
            true,
        ),
        (
            keyd,
            "watch",
            "clusterencryptionpolicies.keyd.io",
            None,
            true,
        ),
        (keyd, "get", "pods", Some("default"), false),
        (keyd, "list", "nodes", None, false),
        (keyd, "watch", "nodes", None, false),
        // [cluster_pki]: its own Secrets and ConfigMap by name, creating them in its namespace,
        // and the one webhook configuration's caBundle
        (keyd, "get", "secrets/keyd-ca", Some("keyd"), true),
        (
            keyd,
            "update",
            "secrets/keyd-webhook-tls",
            Some("keyd"),
            true,
        ),
        (keyd, "get", "secrets/keyd-admin", Some("keyd"), true),
        (keyd, "create", "secrets", Some("keyd"), true),
        (keyd, "get", "configmaps/keyd-ca", Some("keyd"), true),
        (keyd, "update", "configmaps/keyd-ca", Some("keyd"), true),
        (
            keyd,
            "update",
            "validatingwebhookconfigurations.admissionregistration.k8s.io/keyd-webhook",
            None,
            true,
        ),
        // nothing else
        (keyd, "get", "secrets", Some("keyd"), false),
        (keyd, "get", "secrets/keyd-etcd-client", Some("keyd"), false),
        (keyd, "update", "secrets/someone-elses", Some("keyd"), false),
        (keyd, "delete", "secrets/keyd-ca", Some("keyd"), false),
        (keyd, "update", "secrets/keyd-ca", Some("keyd"), false),
        (keyd, "create", "secrets", Some("default"), false),
        (keyd, "list", "secrets", None, false),
        (keyd, "get", "configmaps", Some("keyd"), false),
        (keyd, "update", "configmaps/node-shim", Some("keyd"), false),
        (
            keyd,
            "update",
            "validatingwebhookconfigurations.admissionregistration.k8s.io/other",
            None,
            false,
        ),
        (
            keyd,
            "create",
            "validatingwebhookconfigurations.admissionregistration.k8s.io",
            None,
            false,
        ),
        (keyd, "create", "pods", Some("keyd"), false),
        (keyd, "delete", "pods", Some("keyd"), false),
        (
            keyd,
            "patch",
            "encryptionpolicies.keyd.io",
            Some("default"),
            false,
        ),
        (keyd, "update", "nodes", None, false),
        (keyd, "create", "serviceaccounts/token", Some("keyd"), false),
        (
            keyd,
            "create",
            "subjectaccessreviews.authorization.k8s.io",
            None,
            false,
        ),
        // node-shim never calls the API server
        (
            node_shim,
            "create",
            "tokenreviews.authentication.k8s.io",
            None,
            false,
        ),
        (node_shim, "get", "pods", Some("keyd"), false),
        (node_shim, "get", "nodes", None, false),
        (node_shim, "get", "secrets", Some("keyd"), false),
    ];
    for (account, verb, resource, namespace, allowed) in cases {
        let mut c = kubectl(kubectl_bin, cluster);
        c.args(["auth", "can-i", verb, resource, "--as", account]);
        match namespace {
            Some(ns) => c.args(["-n", ns]),
            None => c.arg("--all-namespaces"),
        };
        let (yes, out) = output(c);
        assert_eq!(
            yes,
            *allowed,
            "{account} {verb} {resource} in {}: {}",
            namespace.unwrap_or("every namespace"),
            out.trim()
        );
    }
}

/// The images the manifests run are the Containerfile's targets, each running a binary the
/// build stage builds from this workspace, as the user the workload runs as.
#[test]
fn the_containerfile_builds_what_the_manifests_run() {
    let root = manifests::deploy_dir().join("..");
    let text = std::fs::read_to_string(root.join("Containerfile")).unwrap();
    // Each stage: its name and its lines.
    let mut stages: Vec<(String, Vec<String>)> = Vec::new();
    let mut logical = String::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        logical.push_str(line.trim_end_matches('\\'));
        logical.push(' ');
        if line.ends_with('\\') {
            continue;
        }
        let l = std::mem::take(&mut logical).trim().to_owned();
        if let Some(from) = l.strip_prefix("FROM ") {
            let name = from
                .split(" AS ")
                .nth(1)
                .unwrap_or_default()
                .trim()
                .to_owned();
            stages.push((name, Vec::new()));
        } else if let Some((_, lines)) = stages.last_mut()
            && !l.is_empty()
        {
            lines.push(l);
        }
    }
    let stage = |name: &str| -> &Vec<String> {
        &stages
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("the Containerfile has no stage {name}"))
            .1
    };
    // The binaries the build stage builds, each a [[bin]] of the package it names.
    let mut built = Vec::new();
    for cmd in stage("build").iter().flat_map(|l| l.split("&&")) {
        let words: Vec<&str> = cmd.split_whitespace().collect();
        let Some(at) = words.windows(2).position(|w| w == ["cargo", "build"]) else {
            continue;
        };
        let words = &words[at..];
        let arg = |flag: &str| {
            words
                .windows(2)
                .filter(|w| w[0] == flag)
                .map(|w| w[1].to_owned())
                .collect::<Vec<_>>()
        };
        let [package] = &arg("-p")[..] else {
            panic!("one -p per cargo build: {cmd}")
        };
        let dir = match package.as_str() {
            "keyd" => "keyd",
            "keyd-webhook" => "webhook",
            "keyd-node-shim" => "node-shim",
            other => panic!("the Containerfile builds an unknown package {other}"),
        };
        let cargo: toml::Table =
            toml::from_str(&std::fs::read_to_string(root.join(dir).join("Cargo.toml")).unwrap())
                .unwrap();
        assert_eq!(cargo["package"]["name"].as_str(), Some(package.as_str()));
        let bins: Vec<&str> = cargo["bin"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|b| b["name"].as_str())
            .collect();
        for bin in arg("--bin") {
            assert!(
                bins.contains(&bin.as_str()),
                "{package} has no binary {bin}"
            );
            built.push(bin);
        }
        assert!(
            words.contains(&"--locked") && words.contains(&"--release"),
            "{cmd}"
        );
    }
    for (kind, name, container) in [
        ("StatefulSet", "keyd", "keyd"),
        ("Deployment", "keyd-webhook", "webhook"),
        ("DaemonSet", "node-shim", "node-shim"),
    ] {
        let file = match kind {
            "StatefulSet" => "keyd/statefulset.yaml",
            "Deployment" => "webhook/deployment.yaml",
            _ => "node-shim/daemonset.yaml",
        };
        let workload = manifests::object(file, kind, name);
        let pod = PodContainer::of_workload(&workload, container);
        let image = pod.container["image"].as_str().unwrap();
        let target = image
            .strip_prefix("ghcr.io/keyd/")
            .and_then(|i| i.split(':').next())
            .unwrap_or_else(|| panic!("{kind} {name} runs {image}, not an image of ours"));
        let lines = stage(target);
        let entry = lines
            .iter()
            .find_map(|l| l.strip_prefix("ENTRYPOINT "))
            .unwrap_or_else(|| panic!("stage {target} has no ENTRYPOINT"));
        let entry: Vec<String> = serde_json::from_str(entry).unwrap();
        let binary = entry[0].rsplit('/').next().unwrap();
        assert!(
            built.iter().any(|b| b == binary),
            "{target} runs {binary}, which is not built"
        );
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with("COPY --from=build ")
                    && l.contains(&format!("/out/{binary}"))),
            "{target} does not copy {binary}"
        );
        // The image's user is the one the workload runs as (node-shim: root, for its
        // capabilities).
        let run_as = pod.container["securityContext"]["runAsUser"]
            .as_u64()
            .or(pod.pod["securityContext"]["runAsUser"].as_u64());
        let user = lines.iter().find_map(|l| l.strip_prefix("USER "));
        match run_as {
            Some(0) | None => assert_eq!(
                user, None,
                "{target} sets a USER; {kind} {name} runs as root"
            ),
            Some(uid) => assert_eq!(user, Some(format!("{uid}:{uid}").as_str()), "{target}"),
        }
    }
}
