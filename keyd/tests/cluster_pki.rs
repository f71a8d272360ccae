//! `[cluster_pki]` against a real kube-apiserver: keyd creates its CA in a Secret, serves with a
//! certificate it issued itself, publishes the CA in a ConfigMap, keeps the webhook's and an
//! admin's certificates in Secrets and the webhook configuration's caBundle equal to the CA,
//! renews each with a third of its lifetime left or when its CA changed, never overwrites an
//! object it did not create, and audits every issuance.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::StatusCode;
use k8s_openapi::ByteString;
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret};
use keyd::app::Running;
use keyd::config::{self, Flags};
use keyd::pki::{CertificateAuthority, inspect};
use keyd_mtls::client::Connector;
use keyd_tests::cluster::{self, Cluster};
use kube::api::{Api, PostParams};
use serde_json::json;
use tokio::sync::watch;

const NS: &str = "keyd";

fn keyd_toml(cluster: &Cluster, dir: &Path, ns: &str, validity: &str) -> String {
    let token = dir.join("token");
    std::fs::write(&token, "admin-token").unwrap();
    format!(
        r#"
data_dir = "@DATA@"
listen = "127.0.0.1:0"
ops_listen = "127.0.0.1:0"

[tls]
reload_interval = "1s"

[log]
format = "text"
level = "warn"

[cluster_pki]
kube_api = {api:?}
kube_ca = {kube_ca:?}
kube_token_file = {token:?}
namespace = {ns:?}
validity = {validity:?}
check_interval = "1s"
webhook_configurations = ["keyd-webhook"]

[[cluster_pki.issue]]
secret = "keyd-webhook-tls"
server_names = ["keyd-webhook.keyd.svc", "keyd-webhook.keyd.svc.cluster.local"]

[[cluster_pki.issue]]
secret = "keyd-webhook-client"
identity = "spiffe://keyd/webhook/keyd-webhook"

[[cluster_pki.issue]]
secret = "keyd-admin"
identity = "spiffe://keyd/admin/admin"
"#,
        api = cluster.url,
        kube_ca = cluster.dir.join("apiserver-ca.pem").display().to_string(),
        token = token.display().to_string(),
    )
}

/// keyd serving in this test's runtime, its data in `DIR/data`.
struct Keyd {
    keyd: Arc<keyd::service::Keyd>,
    api: std::net::SocketAddr,
    ops: std::net::SocketAddr,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Keyd {
    async fn start(toml: &str, dir: &Path) -> anyhow::Result<Self> {
        keyd_mtls::tls::install_default_provider();
        std::fs::create_dir_all(dir).unwrap();
        let file = dir.join("keyd.toml");
        let data = dir.join("data").display().to_string();
        std::fs::write(&file, toml.replace("@DATA@", &data)).unwrap();
        let config = config::load(Some(&file), &HashMap::new(), &Flags::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (stop, stop_rx) = watch::channel(false);
        let running: Running = keyd::app::start(config, stop_rx).await?;
        Ok(Self {
            keyd: Arc::clone(&running.keyd),
            api: running.api_addr,
            ops: running.ops_addr,
            stop,
            task: tokio::spawn(running.serve()),
        })
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Starts again on `dir` once the stopped keyd's store is closed: its audit writer lets go
    /// of the store a moment after the rest.
    async fn restart(toml: &str, dir: &Path) -> Self {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match Self::start(toml, dir).await {
                Ok(k) => return k,
                Err(e)
                    if format!("{e:#}").contains("already open") && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("restarting keyd: {e:#}"),
            }
        }
    }

    /// Every audit record's action and details.
    fn audit(&self) -> Vec<(String, serde_json::Value)> {
        self.keyd
            .store()
            .audit_range(0, 100_000)
            .unwrap()
            .into_iter()
            .map(|r| (r.event.action, r.event.details))
            .collect()
    }

    fn issued_to(&self, to: serde_json::Value) -> Vec<serde_json::Value> {
        self.audit()
            .into_iter()
            .filter(|(a, d)| a == "pki.certificate.issued" && d["to"] == to)
            .map(|(_, d)| d)
            .collect()
    }
}

async fn until<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `Some` once every webhook of keyd's configuration trusts `bundle`.
async fn every_ca_bundle_is(
    vwcs: &Api<ValidatingWebhookConfiguration>,
    bundle: &ByteString,
) -> Option<()> {
    let vwc = vwcs.get("keyd-webhook").await.unwrap();
    vwc.webhooks
        .unwrap()
        .iter()
        .all(|w| w.client_config.ca_bundle.as_ref() == Some(bundle))
        .then_some(())
}

fn text(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8(v.0.clone()).unwrap())
}

async fn secret(client: &kube::Client, ns: &str, name: &str) -> Option<Secret> {
    Api::<Secret>::namespaced(client.clone(), ns)
        .get_opt(name)
        .await
        .unwrap()
}

async fn namespace(client: &kube::Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
}

async fn webhook_configuration(client: &kube::Client) -> ValidatingWebhookConfiguration {
    let api = Api::<ValidatingWebhookConfiguration>::all(client.clone());
    let vwc = serde_json::from_value(json!({
        "metadata": {"name": "keyd-webhook"},
        "webhooks": [{
            "name": "sensitive-pods.keyd.io",
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "clientConfig": {"service": {"name": "keyd-webhook", "namespace": NS, "path": "/validate"}},
            "rules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                       "resources": ["pods"]}],
            "objectSelector": {"matchLabels": {"keyd.io/test-never": "true"}}
        }]
    }))
    .unwrap();
    api.create(&PostParams::default(), &vwc).await.unwrap()
}

/// Connects to keyd's API as the holder of the certificate in Secret `name`, trusting the CA
/// keyd published in its ConfigMap, and GETs `path`.
async fn get_as(
    dir: &Path,
    secret: &Secret,
    ca: &str,
    api: std::net::SocketAddr,
    path: &str,
) -> StatusCode {
    let d = dir.join(format!(
        "client-{}",
        secret.metadata.name.as_deref().unwrap()
    ));
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("ca.pem"), ca).unwrap();
    std::fs::write(d.join("cert.pem"), text(secret, "tls.crt").unwrap()).unwrap();
    std::fs::write(d.join("key.pem"), text(secret, "tls.key").unwrap()).unwrap();
    let tls = keyd_mtls::tls::client_config(&keyd_mtls::tls::TlsPaths {
        ca: d.join("ca.pem"),
        cert: d.join("cert.pem"),
        key: d.join("key.pem"),
    })
    .unwrap();
    // keyd's own certificate names localhost and 127.0.0.1 by default.
    let connector = Connector::new(&format!("https://localhost:{}", api.port()), tls).unwrap();
    let mut conn = connector.connect().await.unwrap();
    conn.get(path).await.unwrap().status
}

/// A real API server with keyd's namespace and the webhook configuration keyd keeps.
async fn cluster_for_keyd(dir: &Path) -> (Cluster, kube::Client) {
    let cluster = Cluster::start(dir).await;
    let client = cluster.client().await;
    namespace(&client, NS).await;
    webhook_configuration(&client).await;
    (cluster, client)
}

fn require_cluster() -> bool {
    keyd_tests::prereq::require("kube-apiserver and etcd", cluster::binaries().map(drop))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyd_issues_and_keeps_the_clusters_certificates_without_cert_manager() {
    if !require_cluster() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = cluster_for_keyd(dir.path()).await;
    // A Secret of a configured name that keyd did not create: never overwritten.
    let foreign: Secret = serde_json::from_value(json!({
        "metadata": {"name": "keyd-admin", "namespace": NS},
        "stringData": {"note": "the operator's own"}
    }))
    .unwrap();
    let secrets = Api::<Secret>::namespaced(client.clone(), NS);
    secrets
        .create(&PostParams::default(), &foreign)
        .await
        .unwrap();

    // A 30 s lifetime: renewed with 10 s left, so within this test.
    let toml = keyd_toml(&cluster, dir.path(), NS, "30s");
    let k = Keyd::start(&toml, &dir.path().join("k1")).await.unwrap();

    // The CA, in its Secret and published in the ConfigMap.
    let ca_secret = secret(&client, NS, "keyd-ca").await.unwrap();
    let ca_pem = text(&ca_secret, "tls.crt").unwrap();
    assert_eq!(ca_secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert!(text(&ca_secret, "tls.key").unwrap().contains("PRIVATE KEY"));
    let trusted = until("the trust ConfigMap", Duration::from_secs(10), || async {
        Api::<ConfigMap>::namespaced(client.clone(), NS)
            .get_opt("keyd-ca")
            .await
            .unwrap()
            .and_then(|m| m.data?.get("ca.crt").cloned())
    })
    .await;
    assert_eq!(trusted, ca_pem);
    let ca_info = inspect(&ca_pem).unwrap();

    // The webhook's serving certificate: its names, from the CA, with the CA beside it.
    let serving = until(
        "the webhook's serving Secret",
        Duration::from_secs(10),
        || secret(&client, NS, "keyd-webhook-tls"),
    )
    .await;
    let info = inspect(&text(&serving, "tls.crt").unwrap()).unwrap();
    assert_eq!(
        info.server_names.iter().cloned().collect::<BTreeSet<_>>(),
        BTreeSet::from([
            "keyd-webhook.keyd.svc".to_owned(),
            "keyd-webhook.keyd.svc.cluster.local".to_owned()
        ])
    );
    assert_eq!(info.authority_key_id, ca_info.subject_key_id);
    assert_eq!(text(&serving, "ca.crt").unwrap(), ca_pem);
    assert_eq!(serving.type_.as_deref(), Some("kubernetes.io/tls"));

    // The webhook's client certificate opens keyd's API as the webhook, over keyd's own
    // serving certificate, trusting only the published CA.
    let client_secret = until(
        "the webhook's client Secret",
        Duration::from_secs(10),
        || secret(&client, NS, "keyd-webhook-client"),
    )
    .await;
    let webhook_uri = inspect(&text(&client_secret, "tls.crt").unwrap())
        .unwrap()
        .uris;
    assert_eq!(webhook_uri, ["spiffe://keyd/webhook/keyd-webhook"]);
    assert_eq!(
        get_as(
            dir.path(),
            &client_secret,
            &trusted,
            k.api,
            "/v1/enforcement"
        )
        .await,
        StatusCode::OK
    );

    // The caBundle, set on every webhook of the configuration.
    let vwcs = Api::<ValidatingWebhookConfiguration>::all(client.clone());
    let bundle = ByteString(ca_pem.clone().into_bytes());
    until("the caBundle", Duration::from_secs(10), || {
        every_ca_bundle_is(&vwcs, &bundle)
    })
    .await;

    // The operator's Secret is left as it was, and the failure shows in the metrics.
    let kept = secret(&client, NS, "keyd-admin").await.unwrap();
    assert_eq!(text(&kept, "note").as_deref(), Some("the operator's own"));
    assert!(text(&kept, "tls.key").is_none());
    until("the refusal counted", Duration::from_secs(10), || async {
        (k.keyd.metrics.pki.failures.get() > 0).then_some(())
    })
    .await;
    assert!(k.issued_to(json!({"secret": "keyd/keyd-admin"})).is_empty());
    // Once it is gone, keyd issues its own there.
    secrets
        .delete("keyd-admin", &Default::default())
        .await
        .unwrap();
    let admin = until("the admin Secret", Duration::from_secs(10), || async {
        secret(&client, NS, "keyd-admin")
            .await
            .filter(|s| text(s, "tls.crt").is_some())
    })
    .await;
    assert_eq!(
        get_as(dir.path(), &admin, &trusted, k.api, "/v1/nodes").await,
        StatusCode::OK
    );

    // Drift is put right: a caBundle edited away, a Secret holding another CA's certificate.
    let mut vwc = vwcs.get("keyd-webhook").await.unwrap();
    for w in vwc.webhooks.iter_mut().flatten() {
        w.client_config.ca_bundle = Some(ByteString(b"not a CA".to_vec()));
    }
    vwcs.replace("keyd-webhook", &PostParams::default(), &vwc)
        .await
        .unwrap();
    let other = CertificateAuthority::generate("someone else's CA").unwrap();
    let forged = other
        .issue_server(
            &["keyd-webhook.keyd.svc".to_owned()],
            Duration::from_secs(3600),
        )
        .unwrap();
    let mut s = secret(&client, NS, "keyd-webhook-tls").await.unwrap();
    s.data = Some(BTreeMap::from([
        (
            "tls.crt".to_owned(),
            ByteString(forged.cert_pem.clone().into_bytes()),
        ),
        (
            "tls.key".to_owned(),
            ByteString(forged.key_pem.as_bytes().to_vec()),
        ),
        (
            "ca.crt".to_owned(),
            ByteString(other.cert_pem().into_bytes()),
        ),
    ]));
    secrets
        .replace("keyd-webhook-tls", &PostParams::default(), &s)
        .await
        .unwrap();
    until("the caBundle put back", Duration::from_secs(10), || {
        every_ca_bundle_is(&vwcs, &bundle)
    })
    .await;
    until(
        "the forged certificate replaced",
        Duration::from_secs(10),
        || async {
            let s = secret(&client, NS, "keyd-webhook-tls").await?;
            (text(&s, "ca.crt")? == ca_pem).then_some(())
        },
    )
    .await;
    let reasons = |k: &Keyd, to| -> Vec<String> {
        k.issued_to(to)
            .iter()
            .map(|d| d["reason"].as_str().unwrap().to_owned())
            .collect()
    };
    // (A renewal may come between them on a slow machine: the order is what is checked.)
    let tls_reasons = reasons(&k, json!({"secret": "keyd/keyd-webhook-tls"}));
    assert_eq!(tls_reasons.first().map(String::as_str), Some("missing"));
    assert_eq!(
        tls_reasons.last().map(String::as_str),
        Some("ca_changed"),
        "{tls_reasons:?}"
    );

    // The CA's Secret deleted: put back from the CA keyd holds, audited.
    secrets
        .delete("keyd-ca", &Default::default())
        .await
        .unwrap();
    let restored = until(
        "the CA's Secret put back",
        Duration::from_secs(10),
        || async { secret(&client, NS, "keyd-ca").await },
    )
    .await;
    assert_eq!(text(&restored, "tls.crt").unwrap(), ca_pem);
    assert!(text(&restored, "tls.key").unwrap().contains("PRIVATE KEY"));
    assert!(
        k.audit()
            .iter()
            .any(|(a, d)| a == "pki.ca.restored" && d["serial"] == ca_info.serial)
    );

    // Renewal with a third of the lifetime left: keyd's own certificate (which new
    // connections then see) and a Secret's.
    let own_file = dir.path().join("k1/data/cluster-pki/server.pem");
    let own_before = inspect(&std::fs::read_to_string(&own_file).unwrap()).unwrap();
    let client_before = inspect(&text(&client_secret, "tls.crt").unwrap()).unwrap();
    let renewed = until(
        "the webhook client certificate renewed",
        Duration::from_secs(40),
        || async {
            let s = secret(&client, NS, "keyd-webhook-client").await?;
            let info = inspect(&text(&s, "tls.crt")?).ok()?;
            (info.serial != client_before.serial).then_some(s)
        },
    )
    .await;
    let client_reasons = reasons(&k, json!({"secret": "keyd/keyd-webhook-client"}));
    assert_eq!(client_reasons[0], "missing");
    assert!(
        client_reasons[1..].iter().all(|r| r == "renewal") && client_reasons.len() >= 2,
        "{client_reasons:?}"
    );
    let own_after = until(
        "keyd's own certificate renewed",
        Duration::from_secs(15),
        || async {
            let info = inspect(&std::fs::read_to_string(&own_file).ok()?).ok()?;
            (info.serial != own_before.serial).then_some(info)
        },
    )
    .await;
    assert!(own_after.not_after > own_before.not_after);
    assert_eq!(
        get_as(dir.path(), &renewed, &trusted, k.api, "/v1/enforcement").await,
        StatusCode::OK
    );

    // What the alerting rules read (deploy/monitoring/) is exposed, with each certificate's
    // expiry.
    let (status, body) = keyd_tests::http::request(k.ops, "GET", "/metrics", &[], vec![])
        .await
        .unwrap();
    assert_eq!(status, 200);
    let exposition = String::from_utf8(body).unwrap();
    let missing = keyd_tests::monitoring::missing(&exposition, "keyd_cluster_pki_", &[]);
    assert!(missing.is_empty(), "not in /metrics: {missing:?}");
    let expiry = format!(
        "keyd_cluster_pki_certificate_not_after_timestamp_seconds{{certificate=\"keyd-server\"}} {}",
        own_after.not_after
    );
    assert!(
        exposition.lines().any(|l| l == expiry),
        "no {expiry:?} in:\n{exposition}"
    );

    // Audited: the CA once, each issuance with its serial.
    let audit = k.audit();
    let created: Vec<_> = audit
        .iter()
        .filter(|(a, _)| a == "pki.ca.created")
        .collect();
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0].1["serial"], ca_info.serial);
    assert!(
        k.issued_to(json!({"file": own_file.display().to_string()}))
            .iter()
            .any(|d| d["serial"] == own_after.serial)
    );
    // No key material in any record.
    let all = serde_json::to_string(&audit).unwrap();
    assert!(!all.contains("PRIVATE KEY") && !all.contains("BEGIN CERTIFICATE"));

    // A restart keeps the CA: the same Secret, the same ConfigMap, nothing created again.
    k.stop().await;
    let k2 = Keyd::restart(&toml, &dir.path().join("k1")).await;
    let again = secret(&client, NS, "keyd-ca").await.unwrap();
    assert_eq!(text(&again, "tls.crt").unwrap(), ca_pem);
    assert!(
        k2.audit()
            .iter()
            .filter(|(a, _)| a == "pki.ca.created")
            .count()
            == 1
    );
    k2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_agree_on_one_ca() {
    if !require_cluster() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (cluster, client) = cluster_for_keyd(dir.path()).await;
    let toml = keyd_toml(&cluster, dir.path(), NS, "2160h");
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let (a, b) = tokio::join!(Keyd::start(&toml, &dir_a), Keyd::start(&toml, &dir_b));
    let (a, b) = (a.unwrap(), b.unwrap());
    let ca = text(&secret(&client, NS, "keyd-ca").await.unwrap(), "tls.crt").unwrap();
    for replica in ["a", "b"] {
        let written =
            std::fs::read_to_string(dir.path().join(replica).join("data/cluster-pki/ca.pem"))
                .unwrap();
        assert_eq!(written, ca, "replica {replica} uses another CA");
    }
    // Each replica has its own serving certificate from the one CA.
    let own = |r: &str| {
        inspect(
            &std::fs::read_to_string(dir.path().join(r).join("data/cluster-pki/server.pem"))
                .unwrap(),
        )
        .unwrap()
    };
    assert_ne!(own("a").serial, own("b").serial);
    assert_eq!(own("a").authority_key_id, own("b").authority_key_id);
    a.stop().await;
    b.stop().await;
}

#[test]
fn cluster_pki_refuses_what_it_would_contradict() {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("kube-ca.pem");
    std::fs::write(&ca, "x").unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t").unwrap();
    let base = format!(
        "data_dir = {:?}\n[cluster_pki]\nkube_api = \"https://127.0.0.1:6443\"\nkube_ca = {:?}\n\
         kube_token_file = {:?}\nnamespace = \"keyd\"\n",
        dir.path().display().to_string(),
        ca.display().to_string(),
        token.display().to_string()
    );
    let field = |extra: &str| {
        let file = dir.path().join("keyd.toml");
        // [tls] lines go before [cluster_pki]; issue tables after it.
        let text = match extra.strip_prefix("TLS:") {
            Some(tls) => format!("{base}[tls]\n{tls}\n"),
            None => format!("{base}{extra}"),
        };
        std::fs::write(&file, text).unwrap();
        match config::load(Some(&file), &HashMap::new(), &Flags::default()) {
            Ok(c) => format!("ok: {:?}", c.tls),
            Err(e) => e.to_string(),
        }
    };
    let ok = field("");
    assert!(
        ok.starts_with("ok:") && ok.contains("cluster-pki/server.pem"),
        "{ok}"
    );
    let e = field("TLS:cert = \"/etc/cert.pem\"");
    assert!(e.contains("tls.cert") && e.contains("[cluster_pki]"), "{e}");
    let e = field("[[cluster_pki.issue]]\nsecret = \"n\"\nidentity = \"spiffe://keyd/node/n1\"\n");
    assert!(
        e.contains("issue[0].identity") && e.contains("[bootstrap]"),
        "{e}"
    );
    let e = field(
        "[[cluster_pki.issue]]\nsecret = \"s\"\nidentity = \"spiffe://keyd/admin/a\"\n\
         server_names = [\"x\"]\n",
    );
    assert!(e.contains("exactly one"), "{e}");
    let e = field("[[cluster_pki.issue]]\nsecret = \"keyd-ca\"\nserver_names = [\"x\"]\n");
    assert!(e.contains("already used"), "{e}");
    let e = field("validity = \"1h\"\ncheck_interval = \"30m\"\n");
    assert!(e.contains("cluster_pki.check_interval"), "{e}");
    let e = field("server_names = [\"not a name\"]\n");
    assert!(e.contains("cluster_pki.server_names"), "{e}");
}
