//! A real Kubernetes API server on loopback: Debian's etcd and a kube-apiserver built from
//! Debian's `kubernetes` source package (1.20; `scripts/kube-apiserver.sh` builds and caches it).
//!
//! Both run as child processes behind a small bash guardian whose stdin is a pipe from this
//! process: when the test process exits (even by a panic or a kill), the pipe closes and the
//! guardian kills its child, so no server outlives the tests.
//!
//! Shared by the webhook's tests and keyd's policy watcher tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::Write as _;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};

/// Where the binaries are: `KUBE_TEST_APISERVER` and `KUBE_TEST_ETCD`, else the build cache and PATH.
pub fn binaries() -> Result<(PathBuf, PathBuf), String> {
    let apiserver = std::env::var_os("KUBE_TEST_APISERVER")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/cache/keyd-test/kube-1.20/kube-apiserver"));
    if !apiserver.is_file() {
        return Err(format!(
            "kube-apiserver not found at {} (set KUBE_TEST_APISERVER or run scripts/kube-apiserver.sh)",
            apiserver.display()
        ));
    }
    let etcd = match std::env::var_os("KUBE_TEST_ETCD") {
        Some(p) => PathBuf::from(p),
        None => std::env::var_os("PATH")
            .into_iter()
            .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
            .map(|d| d.join("etcd"))
            .find(|p| p.is_file())
            .ok_or_else(|| "etcd not found on PATH (apt-get install etcd-server)".to_owned())?,
    };
    Ok((apiserver, etcd))
}

/// A child process that dies with this process.
pub(crate) struct Guarded {
    name: &'static str,
    guardian: Child,
    /// Closing it (drop, or this process exiting) makes the guardian kill the child.
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl Guarded {
    pub(crate) fn spawn(name: &'static str, program: &Path, args: &[String], log: PathBuf) -> Self {
        let out = std::fs::File::create(&log).unwrap();
        let err = out.try_clone().unwrap();
        // The child runs with stdin from /dev/null; the guardian waits for EOF on its own stdin
        // (our pipe), then kills the child.
        let guardian = Command::new("bash")
            .arg("-c")
            .arg(r#""$@" </dev/null & child=$!; cat >/dev/null; kill "$child" 2>/dev/null; wait "$child""#)
            .arg("guardian")
            .arg(program)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let mut g = Self {
            name,
            guardian,
            stdin: None,
            log,
        };
        g.stdin = g.guardian.stdin.take();
        g
    }

    pub(crate) fn log_tail(&self) -> String {
        self.log_tail_lines(30)
    }

    /// The last `n` lines of its output.
    pub(crate) fn log_tail_lines(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    pub(crate) fn exited(&mut self) -> bool {
        matches!(self.guardian.try_wait(), Ok(Some(_)))
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        if let Some(mut s) = self.stdin.take() {
            let _ = s.flush();
        }
        let _ = self.guardian.wait();
    }
}

/// Deletes a directory after this process exits (its stdin pipe closes), once the servers the
/// guardians kill have had a moment to stop writing into it.
struct Janitor {
    _process: Child,
    _stdin: Option<ChildStdin>,
}

impl Janitor {
    fn spawn(dir: &Path) -> Self {
        let mut process = Command::new("bash")
            .arg("-c")
            .arg(r#"cat >/dev/null; sleep 2; rm -rf -- "$1""#)
            .arg("janitor")
            .arg(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("cannot start the janitor");
        let stdin = process.stdin.take();
        Self {
            _process: process,
            _stdin: stdin,
        }
    }
}

pub(crate) fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How a cluster's API server is set up beyond what every test gets.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the API server may take to become ready (under emulation, as in the VM test, it
    /// starts several times slower).
    pub ready: Duration,
    /// Node names that kubelets join as. With any, the API server is set up as for real nodes:
    /// the Node authorizer and NodeRestriction, the ServiceAccount admission plugin (pods get
    /// their account and its token), privileged pods allowed, kubelets reached at their
    /// InternalIP; and each name gets a token in `system:nodes` ([`node_token`]). Without, pods
    /// get no service account (the webhook's tests have none to mount).
    pub nodes: Vec<String>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            ready: Duration::from_secs(90),
            nodes: Vec::new(),
        }
    }
}

/// The bearer token of node `name` (as `system:node:NAME` in `system:nodes`), when the cluster
/// was started with it in [`Options::nodes`].
pub fn node_token(name: &str) -> String {
    format!("node-{name}-token")
}

/// etcd + kube-apiserver, with an admin token and a kubeconfig.
pub struct Cluster {
    pub dir: PathBuf,
    pub url: String,
    pub kubeconfig: PathBuf,
    // Fields drop in declaration order: the controller manager, the API server, then etcd.
    controller_manager: Option<Guarded>,
    /// Removes `dir` once this process is gone (the shared test environment is never dropped).
    _janitor: Janitor,
    apiserver: Guarded,
    /// Held only to stop it last.
    _etcd: Guarded,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.url)
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Starts both servers under `dir` and waits until the API server is ready.
    pub async fn start(dir: &Path) -> Self {
        Self::start_with(dir, &Options::default()).await
    }

    /// As [`Cluster::start`], waiting up to `ready` for the API server (under emulation, as in
    /// the VM test, it starts several times slower).
    pub async fn start_within(dir: &Path, ready: Duration) -> Self {
        let options = Options {
            ready,
            ..Options::default()
        };
        Self::start_with(dir, &options).await
    }

    /// As [`Cluster::start`], set up as `options` say.
    pub async fn start_with(dir: &Path, options: &Options) -> Self {
        let (apiserver_bin, etcd_bin) = binaries().unwrap();
        let dir = dir.to_owned();
        // Certificates: our CA signs the API server's serving certificate for 127.0.0.1.
        let ca = keyd::pki::CertificateAuthority::generate("apiserver test CA").unwrap();
        let ca_pem = dir.join("apiserver-ca.pem");
        std::fs::write(&ca_pem, ca.cert_pem()).unwrap();
        let (cert, key) = (dir.join("apiserver.pem"), dir.join("apiserver-key.pem"));
        ca.issue_server(
            &["127.0.0.1".to_owned(), "localhost".to_owned()],
            Duration::from_secs(24 * 3600),
        )
        .unwrap()
        .write(&cert, &key)
        .unwrap();
        // The service-account token signing key (ECDSA P-256; PKCS#8 and SPKI PEM).
        let sa = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (sa_key, sa_pub) = (dir.join("sa.key"), dir.join("sa.pub"));
        std::fs::write(&sa_key, sa.serialize_pem()).unwrap();
        std::fs::write(&sa_pub, sa.public_key_pem()).unwrap();
        let tokens = dir.join("tokens.csv");
        let mut token_lines = "admin-token,admin,admin,\"system:masters\"\n".to_owned();
        for node in &options.nodes {
            token_lines.push_str(&format!(
                "{},system:node:{node},node-{node},\"system:nodes\"\n",
                node_token(node)
            ));
        }
        std::fs::write(&tokens, token_lines).unwrap();

        let (client_port, peer_port, api_port) = (free_port(), free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Guarded::spawn(
            "etcd",
            &etcd_bin,
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
        wait_tcp(&mut etcd, ([127, 0, 0, 1], client_port).into()).await;

        let mut args: Vec<String> = vec![
            format!("--etcd-servers={etcd_url}"),
            "--bind-address=127.0.0.1".into(),
            "--advertise-address=127.0.0.1".into(),
            "--endpoint-reconciler-type=none".into(),
            format!("--secure-port={api_port}"),
            format!("--cert-dir={}", dir.join("apiserver-certs").display()),
            format!("--tls-cert-file={}", cert.display()),
            format!("--tls-private-key-file={}", key.display()),
            "--service-cluster-ip-range=10.0.0.0/24".into(),
            "--service-account-issuer=https://kubernetes.default.svc".into(),
            format!("--service-account-key-file={}", sa_pub.display()),
            format!("--service-account-signing-key-file={}", sa_key.display()),
            format!("--token-auth-file={}", tokens.display()),
        ];
        if options.nodes.is_empty() {
            args.extend([
                "--authorization-mode=RBAC".into(),
                // Pods in these tests have no service account to mount.
                "--disable-admission-plugins=ServiceAccount".into(),
            ]);
        } else {
            args.extend([
                "--authorization-mode=Node,RBAC".into(),
                "--enable-admission-plugins=NodeRestriction".into(),
                // node-shim's pods are privileged.
                "--allow-privileged=true".into(),
                // A test node's name resolves nowhere; its InternalIP is a local address.
                "--kubelet-preferred-address-types=InternalIP".into(),
            ]);
        }
        let apiserver = Guarded::spawn(
            "kube-apiserver",
            &apiserver_bin,
            &args,
            dir.join("apiserver.log"),
        );
        let url = format!("https://127.0.0.1:{api_port}");
        let dir_for_janitor = dir.clone();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    \
                 certificate-authority: {}\nusers:\n- name: admin\n  user:\n    token: admin-token\n\
                 contexts:\n- name: test\n  context:\n    cluster: test\n    user: admin\n    namespace: default\n\
                 current-context: test\n",
                ca_pem.display()
            ),
        )
        .unwrap();
        let mut cluster = Cluster {
            dir,
            url,
            kubeconfig,
            controller_manager: None,
            _janitor: Janitor::spawn(&dir_for_janitor),
            apiserver,
            _etcd: etcd,
        };
        cluster.wait_ready(options.ready).await;
        cluster
    }

    /// Starts kube-controller-manager with only the Deployment and ReplicaSet controllers, so
    /// that workloads create pods (which the webhook then judges) as in a real cluster.
    pub fn start_controller_manager(&mut self) {
        self.start_controllers(&["deployment", "replicaset"]);
    }

    /// Starts kube-controller-manager with the named controllers (as its `--controllers` names
    /// them). It can sign service-account token secrets (`serviceaccount-token`) with the key
    /// the API server verifies them with, and puts this cluster's CA in them.
    pub fn start_controllers(&mut self, controllers: &[&str]) {
        let bin = binaries()
            .unwrap()
            .0
            .with_file_name("kube-controller-manager");
        assert!(
            bin.is_file(),
            "{} missing (scripts/kube-apiserver.sh builds it)",
            bin.display()
        );
        self.controller_manager = Some(Guarded::spawn(
            "kube-controller-manager",
            &bin,
            &[
                format!("--kubeconfig={}", self.kubeconfig.display()),
                format!("--controllers={}", controllers.join(",")),
                format!(
                    "--service-account-private-key-file={}",
                    self.dir.join("sa.key").display()
                ),
                format!("--root-ca-file={}", self.ca_pem().display()),
                "--leader-elect=false".into(),
                "--use-service-account-credentials=false".into(),
                // No listeners: nothing to collide with other tests on this machine.
                "--secure-port=0".into(),
                "--port=0".into(),
            ],
            self.dir.join("controller-manager.log"),
        ));
    }

    /// The CA that signed the API server's serving certificate.
    pub fn ca_pem(&self) -> PathBuf {
        self.dir.join("apiserver-ca.pem")
    }

    pub fn controller_manager_log(&self) -> String {
        self.controller_manager
            .as_ref()
            .map(Guarded::log_tail)
            .unwrap_or_default()
    }

    /// A client for the test's own runtime (kube clients hold connections on the runtime that
    /// made them).
    pub async fn client(&self) -> kube::Client {
        let kc = kube::config::Kubeconfig::read_from(&self.kubeconfig).unwrap();
        let config =
            kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default())
                .await
                .unwrap();
        kube::Client::try_from(config).unwrap()
    }

    async fn wait_ready(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        let mut last = String::new();
        while Instant::now() < deadline {
            if self.apiserver.exited() {
                panic!("kube-apiserver exited:\n{}", self.apiserver.log_tail());
            }
            let client = self.client().await;
            match client
                .request_text(http::Request::get("/readyz").body(Vec::new()).unwrap())
                .await
            {
                Ok(t) if t.trim() == "ok" => return,
                Ok(t) => last = t,
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "kube-apiserver not ready after {within:?} ({last}):\n{}",
            self.apiserver.log_tail()
        );
    }

    /// Creates the CRDs and waits until both are established.
    pub async fn install_crds(&self, client: &kube::Client) {
        let api = Api::<CustomResourceDefinition>::all(client.clone());
        for crd in keyd_policy::crd::crds() {
            api.create(&PostParams::default(), &crd).await.unwrap();
        }
        for crd in keyd_policy::crd::crds() {
            let name = crd.metadata.name.unwrap();
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                let c = api.get(&name).await.unwrap();
                let established = c.status.and_then(|s| s.conditions).is_some_and(|cs| {
                    cs.iter()
                        .any(|c| c.type_ == "Established" && c.status == "True")
                });
                if established {
                    break;
                }
                assert!(Instant::now() < deadline, "CRD {name} not established");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    pub fn apiserver_log(&self) -> String {
        self.apiserver.log_tail()
    }
}

async fn wait_tcp(g: &mut Guarded, addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if g.exited() {
            panic!("{} exited:\n{}", g.name, g.log_tail());
        }
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{} not listening on {addr}:\n{}", g.name, g.log_tail());
}
