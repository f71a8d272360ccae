//! Test harnesses: a real keyd in-process, the webhook in-process, and an HTTPS client for it.
//! The real etcd + kube-apiserver harness is `keyd_tests::cluster`, shared with keyd's tests.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use keyd::pki::CertificateAuthority;
use keyd_proto::identity::Identity;
use rustls_pki_types::ServerName;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Whether the suite runs in CI, where a missing prerequisite is a failure, not a skip.
pub fn ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true" || v == "1")
}

/// Fails in CI, prints the reason and returns otherwise (the caller then skips).
pub fn skip(reason: &str) {
    assert!(!ci(), "prerequisite missing in CI: {reason}");
    eprintln!("SKIPPED: {reason} (run ./scripts/test.sh to install it)");
}

/// A real keyd on loopback, in this process, with the dev PKI under `dir`.
pub struct Keyd {
    pub setup: keyd::app::DevSetup,
    pub addr: SocketAddr,
    pub keyd: Arc<keyd::service::Keyd>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl Keyd {
    pub async fn start(dir: &Path) -> Self {
        Self::start_on(dir, "127.0.0.1:0").await
    }

    /// Creates (once) the dev PKI under `dir`, without starting keyd: for a webhook that must
    /// hold keyd's client certificate before keyd runs.
    pub fn prepare(dir: &Path) -> keyd::app::DevSetup {
        keyd::app::prepare_dev(dir, "127.0.0.1:0", "127.0.0.1:0").unwrap()
    }

    /// Starts keyd listening on `listen`.
    pub async fn start_on(dir: &Path, listen: &str) -> Self {
        keyd_mtls::tls::install_default_provider();
        let setup = keyd::app::prepare_dev(dir, listen, "127.0.0.1:0").unwrap();
        let flags = keyd::config::Flags {
            listen: Some(listen.into()),
            ops_listen: Some("127.0.0.1:0".into()),
            ..keyd::config::Flags::default()
        };
        let config = keyd::config::load(Some(&setup.keyd_toml), &HashMap::new(), &flags).unwrap();
        let (stop, rx) = watch::channel(false);
        let running = keyd::app::start(config, rx).await.unwrap();
        let addr = running.api_addr;
        let keyd = Arc::clone(&running.keyd);
        let task = tokio::spawn(running.serve());
        Keyd {
            setup,
            addr,
            keyd,
            stop,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }

    /// Makes IPsec ready (a current key), as `keyctl ipsec rotate` would.
    pub async fn rotate_ipsec(&self) {
        self.keyd
            .rotate_ipsec(
                &Identity::Admin("admin".into()),
                keyd_proto::RotateRequest::default(),
            )
            .await
            .unwrap();
    }

    /// keyd's audit records for admission decisions, as (action, details).
    pub fn admission_records(&self) -> Vec<(String, serde_json::Value)> {
        self.keyd
            .store()
            .audit_range(0, 1_000_000)
            .unwrap()
            .into_iter()
            .filter(|r| r.event.action.starts_with("admission."))
            .map(|r| (r.event.action, r.event.details))
            .collect()
    }

    /// Waits (up to 10 s) for an admission record matching `pred`.
    pub async fn wait_record(
        &self,
        pred: impl Fn(&str, &serde_json::Value) -> bool,
    ) -> (String, serde_json::Value) {
        for _ in 0..100 {
            if let Some(r) = self
                .admission_records()
                .into_iter()
                .find(|(a, d)| pred(a, d))
            {
                return r;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no matching admission record in keyd's audit log; have: {:#?}",
            self.admission_records()
        );
    }

    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// A CA and a serving certificate for 127.0.0.1, written under `dir`.
pub struct ServingCert {
    pub ca: CertificateAuthority,
    pub ca_pem: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl ServingCert {
    pub fn create(dir: &Path, stem: &str) -> Self {
        let ca = CertificateAuthority::generate(&format!("{stem} test CA")).unwrap();
        let ca_pem = dir.join(format!("{stem}-ca.pem"));
        std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
        let cert = dir.join(format!("{stem}.pem"));
        let key = dir.join(format!("{stem}-key.pem"));
        ca.issue_server(
            &["127.0.0.1".to_owned(), "localhost".to_owned()],
            Duration::from_secs(24 * 3600),
        )
        .unwrap()
        .write(&cert, &key)
        .unwrap();
        Self {
            ca,
            ca_pem,
            cert,
            key,
        }
    }
}

/// A webhook config file's text: serving on 127.0.0.1:0 with `serving`, talking to keyd with
/// the dev PKI's webhook certificate. `extra` is appended (e.g. a `[policy]` table).
pub fn webhook_toml(
    serving: &ServingCert,
    keyd: &keyd::app::DevSetup,
    keyd_url: &str,
    extra: &str,
) -> String {
    let pki = &keyd.pki;
    format!(
        "listen = \"127.0.0.1:0\"\n\
         [tls]\ncert = {cert:?}\nkey = {key:?}\nreload_interval = \"100ms\"\n\
         [keyd]\nurl = {keyd_url:?}\nca = {ca:?}\ncert = {wcert:?}\nkey = {wkey:?}\n\
         refresh_interval = \"200ms\"\nmax_staleness = \"2s\"\ntimeout = \"1s\"\n\
         [status]\ninterval = \"500ms\"\n\
         [log]\nformat = \"text\"\nlevel = \"warn\"\n{extra}",
        cert = serving.cert.display().to_string(),
        key = serving.key.display().to_string(),
        ca = pki.ca.display().to_string(),
        wcert = pki.webhook.cert.display().to_string(),
        wkey = pki.webhook.key.display().to_string(),
    )
}

/// An HTTPS client for the webhook, trusting `ca_pem`; one connection per request.
#[derive(Clone)]
pub struct Https {
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

impl Https {
    pub fn new(addr: SocketAddr, ca_pem: &Path) -> Self {
        use rustls_pki_types::CertificateDer;
        use rustls_pki_types::pem::PemObject as _;
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(ca_pem).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let mut cfg = rustls::ClientConfig::builder_with_provider(keyd_webhook::tls::provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
        Self {
            addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        }
    }

    pub fn tls_connector(&self) -> tokio_rustls::TlsConnector {
        self.tls.clone()
    }

    async fn connect(&self) -> std::io::Result<http1::SendRequest<Full<Bytes>>> {
        let tcp = tokio::net::TcpStream::connect(self.addr).await?;
        let tls = self
            .tls
            .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
            .await?;
        let (sender, conn) = http1::handshake(TokioIo::new(tls))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }

    /// One request; (status, body), or why it failed (refused handshake, closed connection).
    pub async fn try_request(
        &self,
        method: &str,
        path: &str,
        body: Vec<u8>,
    ) -> std::io::Result<(u16, Vec<u8>)> {
        let mut s = self.connect().await?;
        let req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "127.0.0.1")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .unwrap();
        let resp = s.send_request(req).await.map_err(std::io::Error::other)?;
        let status = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes()
            .to_vec();
        Ok((status, body))
    }

    /// One request; (status, body).
    pub async fn request(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        self.try_request(method, path, body).await.unwrap()
    }
}

/// An AdmissionReview (v1) for `object` of kind `kind` (group/version/kind) in `namespace`.
pub fn review_json(
    uid: &str,
    gvk: (&str, &str, &str),
    namespace: &str,
    operation: &str,
    user: &str,
    object: &serde_json::Value,
) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": gvk.0, "version": gvk.1, "kind": gvk.2},
            "resource": {"group": gvk.0, "version": gvk.1, "resource": format!("{}s", gvk.2.to_lowercase())},
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": user},
            "object": object,
            "dryRun": false
        }
    }))
    .unwrap()
}

/// A pod manifest.
pub fn pod_json(
    name: &str,
    labels: &[(&str, &str)],
    annotations: &[(&str, &str)],
) -> serde_json::Value {
    let map = |kv: &[(&str, &str)]| -> serde_json::Map<String, serde_json::Value> {
        kv.iter()
            .map(|(k, v)| ((*k).to_owned(), serde_json::Value::from(*v)))
            .collect()
    };
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": map(labels), "annotations": map(annotations)},
        "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}
    })
}

pub const SENSITIVE: (&str, &str) = ("keyd.io/sensitive", "true");
