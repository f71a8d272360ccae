//! Node bootstrap against a real Kubernetes API server (Debian's etcd and a kube-apiserver 1.20
//! built by `scripts/kube-apiserver.sh`): the token is a real bound ServiceAccount token from
//! the TokenRequest API, as kubelet projects it, and keyd checks it with the real TokenReview
//! API and reads the real pod.
//!
//! Needs the binaries (`KUBE_TEST_APISERVER`, else the build cache; `etcd` on PATH). Without them
//! it prints why and passes, except in CI (`CI=true`), where it fails.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::KeydHarness;
use http::Method;
use keyd_mtls::client::{Connection, Connector};
use keyd_node_shim::bootstrap::{BootstrapError, Bootstrapper};
use keyd_node_shim::keyd_client::KeydClient;
use keyd_proto::NodeRegistration;
use rustls_pki_types::pem::PemObject as _;
use serde_json::{Value, json};

fn apiserver_bin() -> Option<PathBuf> {
    let p = std::env::var_os("KUBE_TEST_APISERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/keyd-test/kube-1.20/kube-apiserver"));
    p.is_file().then_some(p)
}

fn etcd_bin() -> Option<PathBuf> {
    std::env::var_os("KUBE_TEST_ETCD")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("etcd"))
                .find(|p| p.is_file())
        })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A child process killed when dropped.
struct Proc(Child, PathBuf);

impl Proc {
    fn spawn(program: &Path, args: &[String], log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let child = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Proc(child, log)
    }

    fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.1).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Apiserver {
    url: String,
    ca: PathBuf,
    admin_token: PathBuf,
    _apiserver: Proc,
    _etcd: Proc,
}

impl Apiserver {
    async fn start(dir: &Path, apiserver: &Path, etcd: &Path) -> Self {
        let ca = keyd::pki::CertificateAuthority::generate("apiserver test CA").unwrap();
        let ca_pem = dir.join("apiserver-ca.pem");
        std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
        let (cert, key) = (dir.join("apiserver.pem"), dir.join("apiserver-key.pem"));
        ca.issue_server(&["127.0.0.1".to_owned()], Duration::from_secs(3600))
            .unwrap()
            .write(&cert, &key)
            .unwrap();
        let sa = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (sa_key, sa_pub) = (dir.join("sa.key"), dir.join("sa.pub"));
        std::fs::write(&sa_key, sa.serialize_pem()).unwrap();
        std::fs::write(&sa_pub, sa.public_key_pem()).unwrap();
        std::fs::write(
            dir.join("tokens.csv"),
            "admin-token,admin,admin,\"system:masters\"\n",
        )
        .unwrap();
        let admin_token = dir.join("admin-token");
        std::fs::write(&admin_token, "admin-token\n").unwrap();
        let (client, peer, api) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let etcd = Proc::spawn(
            etcd,
            &[
                format!("--data-dir={}", dir.join("etcd").display()),
                format!("--listen-client-urls={etcd_url}"),
                format!("--advertise-client-urls={etcd_url}"),
                format!("--listen-peer-urls={peer_url}"),
                format!("--initial-advertise-peer-urls={peer_url}"),
                format!("--initial-cluster=default={peer_url}"),
            ],
            dir.join("etcd.log"),
        );
        let apiserver = Proc::spawn(
            apiserver,
            &[
                format!("--etcd-servers={etcd_url}"),
                "--bind-address=127.0.0.1".into(),
                "--advertise-address=127.0.0.1".into(),
                "--endpoint-reconciler-type=none".into(),
                format!("--secure-port={api}"),
                format!("--cert-dir={}", dir.join("certs").display()),
                format!("--tls-cert-file={}", cert.display()),
                format!("--tls-private-key-file={}", key.display()),
                "--service-cluster-ip-range=10.0.0.0/24".into(),
                "--service-account-issuer=https://kubernetes.default.svc".into(),
                format!("--service-account-key-file={}", sa_pub.display()),
                format!("--service-account-signing-key-file={}", sa_key.display()),
                format!("--token-auth-file={}", dir.join("tokens.csv").display()),
                "--authorization-mode=RBAC".into(),
                "--disable-admission-plugins=ServiceAccount".into(),
            ],
            dir.join("apiserver.log"),
        );
        let s = Apiserver {
            url: format!("https://127.0.0.1:{api}"),
            ca: ca_pem,
            admin_token,
            _apiserver: apiserver,
            _etcd: etcd,
        };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Ok(mut c) = s.conn().await
                && let Ok(r) = c.get("/readyz").await
                && r.status.is_success()
            {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "kube-apiserver not ready:\n{}",
                s._apiserver.tail()
            );
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn conn(&self) -> Result<Connection, keyd_mtls::client::ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        for c in rustls_pki_types::CertificateDer::pem_file_iter(&self.ca).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let mut config = rustls::ClientConfig::builder_with_provider(keyd_mtls::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Connector::new(&self.url, Arc::new(config))?.connect().await
    }

    /// An admin call; panics unless it succeeds.
    async fn call(&self, method: Method, path: &str, body: Value) -> Value {
        let mut c = self.conn().await.unwrap();
        let body = if body.is_null() {
            None
        } else {
            Some(serde_json::to_vec(&body).unwrap())
        };
        let r = c
            .send(
                method,
                path,
                body,
                &[(http::header::AUTHORIZATION, "Bearer admin-token")],
            )
            .await
            .unwrap();
        assert!(
            r.status.is_success(),
            "{path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        serde_json::from_slice(&r.body).unwrap()
    }

    /// Sets a pod's phase to Running, as its kubelet would (there is no kubelet here).
    async fn mark_running(&self, pod: &str) {
        let path = format!("/api/v1/namespaces/keyd/pods/{pod}/status");
        let mut p = self.call(Method::GET, &path, Value::Null).await;
        p["status"]["phase"] = json!("Running");
        self.call(Method::PUT, &path, p).await;
    }

    /// A running pod of `node-shim` on `node`, and a bound token for it as kubelet would
    /// project it.
    async fn pod_token(&self, pod: &str, node: &str, audience: &str) -> String {
        self.pod_token_of("node-shim", pod, node, audience, true)
            .await
    }

    /// A pod of service account `sa` on `node` (Running, or left Pending), and a bound token
    /// for it.
    async fn pod_token_of(
        &self,
        sa: &str,
        pod: &str,
        node: &str,
        audience: &str,
        running: bool,
    ) -> String {
        let created = self
            .call(
                Method::POST,
                "/api/v1/namespaces/keyd/pods",
                json!({
                    "apiVersion": "v1", "kind": "Pod",
                    "metadata": { "name": pod },
                    "spec": { "serviceAccountName": sa, "nodeName": node,
                              "containers": [{ "name": "c", "image": "keyd/node-shim" }] }
                }),
            )
            .await;
        let uid = created["metadata"]["uid"].as_str().unwrap().to_owned();
        if running {
            self.mark_running(pod).await;
        }
        let tr = self
            .call(
                Method::POST,
                &format!("/api/v1/namespaces/keyd/serviceaccounts/{sa}/token"),
                json!({
                    "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                    "spec": { "audiences": [audience], "expirationSeconds": 600,
                              "boundObjectRef": { "apiVersion": "v1", "kind": "Pod", "name": pod, "uid": uid } }
                }),
            )
            .await;
        tr["status"]["token"].as_str().unwrap().to_owned()
    }
}

#[tokio::test]
async fn bootstrap_against_a_real_kube_apiserver() {
    let (Some(apiserver), Some(etcd)) = (apiserver_bin(), etcd_bin()) else {
        let why = "needs kube-apiserver (scripts/kube-apiserver.sh) and etcd";
        assert!(
            !std::env::var("CI").is_ok_and(|v| v == "true" || v == "1"),
            "cannot run in CI: {why}"
        );
        eprintln!("SKIPPED: {why}");
        return;
    };
    keyd_mtls::tls::install_default_provider();
    let dir = tempfile::tempdir().unwrap();
    let api = Apiserver::start(dir.path(), &apiserver, &etcd).await;
    api.call(
        Method::POST,
        "/api/v1/namespaces",
        json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": "keyd" } }),
    )
    .await;
    for sa in ["node-shim", "intruder"] {
        api.call(
            Method::POST,
            "/api/v1/namespaces/keyd/serviceaccounts",
            json!({ "apiVersion": "v1", "kind": "ServiceAccount", "metadata": { "name": sa } }),
        )
        .await;
    }
    // node-a is a Node; node-ghost, which a pod below names, is not.
    api.call(
        Method::POST,
        "/api/v1/nodes",
        // As kubelet registers it: its addresses in the status, its pod CIDR (node IPAM) in the
        // spec. keyd checks node-a's registration against them.
        json!({ "apiVersion": "v1", "kind": "Node", "metadata": { "name": "node-a" },
                "spec": { "podCIDR": "10.1.0.0/24", "podCIDRs": ["10.1.0.0/24"] },
                "status": { "addresses": [
                    { "type": "InternalIP", "address": "192.168.0.1" },
                    { "type": "Hostname", "address": "node-a" } ] } }),
    )
    .await;
    // keyd asks the API server with the admin token (system:masters may create TokenReviews and
    // read pods and nodes; a real deployment grants exactly those three).
    let keyd = KeydHarness::start_with_bootstrap_at(&api.url, &api.ca, &api.admin_token).await;
    let tokens = dir.path().join("tokens");
    std::fs::create_dir_all(&tokens).unwrap();
    let bootstrapper = |node: &str, token: &str, tag: &str| {
        let token_path = tokens.join(tag);
        std::fs::write(&token_path, token).unwrap();
        Bootstrapper {
            server: format!("https://127.0.0.1:{}", keyd.bootstrap.unwrap().port()),
            ca: keyd.setup.pki.ca.clone(),
            token_path,
            cert_dir: dir.path().join(tag),
            node: node.into(),
        }
    };

    // The pod on node-a gets node-a's certificate, and keyd's mTLS API accepts it.
    let token_a = api.pod_token("shim-a", "node-a", "keyd").await;
    let b = bootstrapper("node-a", &token_a, "a");
    let issued = b.obtain().await.unwrap();
    assert!(issued.not_after.0 > issued.not_before.0);
    let mut client = KeydClient::new(
        &format!("https://127.0.0.1:{}", keyd.api.port()),
        "node-a",
        keyd_node_shim::bootstrap::paths(&b.cert_dir, &b.ca),
    );
    let mut reg = NodeRegistration {
        endpoint: "192.168.0.1".parse().unwrap(),
        pod_cidrs: vec!["10.1.0.0/24".parse().unwrap()],
        wireguard_public_key: None,
        wireguard_key_epoch: None,
        boot_id: None,
    };
    client.register(&reg).await.unwrap();
    // An address the Node object does not have is refused (read from the real API server).
    reg.endpoint = "192.168.0.9".parse().unwrap();
    let e = client.register(&reg).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("not among the node's addresses in its Node object"),
        "{e}"
    );

    let refused = |e: BootstrapError| match e {
        BootstrapError::Refused { status, message } => (status, message),
        other => panic!("expected a refusal, got {other}"),
    };
    // The same pod asking for node-b's identity.
    let (status, why) = refused(
        bootstrapper("node-b", &token_a, "a-as-b")
            .obtain()
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 403);
    assert!(why.contains("runs on node \"node-a\""), "{why}");
    // A pod on a node that has no Node object.
    let token_ghost = api.pod_token("shim-ghost", "node-ghost", "keyd").await;
    let (status, why) = refused(
        bootstrapper("node-ghost", &token_ghost, "ghost")
            .obtain()
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 403);
    assert!(why.contains("node \"node-ghost\" does not exist"), "{why}");
    // A pod that has not started (Pending).
    let pending = api
        .pod_token_of("node-shim", "shim-pending", "node-a", "keyd", false)
        .await;
    let (status, why) = refused(
        bootstrapper("node-a", &pending, "pending")
            .obtain()
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 403);
    assert!(why.contains("not running (phase Pending)"), "{why}");
    // A token for another audience (the API server's own).
    let token_api = api
        .pod_token("shim-a2", "node-a", "https://kubernetes.default.svc")
        .await;
    let (status, why) = refused(
        bootstrapper("node-a", &token_api, "aud")
            .obtain()
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 403);
    assert!(
        why.contains("not valid") || why.contains("audience"),
        "{why}"
    );
    // A service account that is not allowed.
    let intruder = api
        .pod_token_of("intruder", "intruder", "node-a", "keyd", true)
        .await;
    let (status, why) = refused(
        bootstrapper("node-a", &intruder, "intruder")
            .obtain()
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 403);
    assert!(why.contains("may not bootstrap"), "{why}");
    // A deleted pod's token is no longer valid.
    api.call(
        Method::DELETE,
        "/api/v1/namespaces/keyd/pods/shim-a?gracePeriodSeconds=0",
        Value::Null,
    )
    .await;
    let (status, _) = refused(
        bootstrapper("node-a", &token_a, "deleted")
            .obtain()
            .await
            .unwrap_err(),
    );
    assert_eq!(status, 403);
}
