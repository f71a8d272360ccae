//! Helpers for the privileged tests: network namespaces, a keyd on loopback, agents, captures.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use keyd::config::Flags;
use keyd::service::Keyd;
use keyd_node_shim::agent::{self, Agent};
use keyd_node_shim::config::{Config, RawConfig};
use keyd_node_shim::kernel::netlink::NetlinkKernel;
use keyd_node_shim::keyd_client::KeydClient;
use keyd_node_shim::status::Shared;
use tokio::sync::watch;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Whether the test can run. Outside CI a missing prerequisite skips (with the reason printed);
/// in CI (`CI=true`) it fails, so a misconfigured runner cannot pass silently.
pub fn prerequisites(tools: &[&str]) -> bool {
    let mut missing = Vec::new();
    if !keyd_tests::prereq::is_root() {
        missing.push("root (CAP_NET_ADMIN and namespaces)".to_owned());
    }
    for t in tools {
        if !have(t) {
            missing.push(format!("the `{t}` command"));
        }
    }
    if !std::path::Path::new("/dev/net/tun").exists() {
        missing.push("/dev/net/tun".to_owned());
    }
    if missing.is_empty() {
        return true;
    }
    let why = format!("needs {}", missing.join(", "));
    if std::env::var("CI").is_ok_and(|v| v == "true" || v == "1") {
        panic!("privileged test cannot run in CI: {why}");
    }
    eprintln!("SKIPPED: {why}");
    false
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// A named network namespace, deleted (with everything in it) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(tag: &str) -> Self {
        let name = format!(
            "t6{tag}{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        );
        let st = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap();
        assert!(st.success(), "ip netns add {name}");
        let ns = NetNs { name };
        ns.sh("ip link set lo up");
        ns
    }

    pub fn sh_status(&self, cmd: &str) -> (bool, String) {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    pub fn sh(&self, cmd: &str) -> String {
        let (ok, text) = self.sh_status(cmd);
        assert!(ok, "in {}: {cmd}\n{text}", self.name);
        text
    }

    /// Runs `f` on a thread inside the namespace: sockets it opens belong to the namespace.
    pub fn run<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = PathBuf::from("/run/netns").join(&self.name);
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(&fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A veth pair from `a` (device `an`, address `aip`) to `b` (`bn`, `bip`), both up.
pub fn link_pair(a: &NetNs, an: &str, aip: &str, b: &NetNs, bn: &str, bip: &str) {
    a.sh(&format!(
        "ip link add {an} type veth peer name {bn}x && ip link set {bn}x netns {}",
        b.name
    ));
    b.sh(&format!("ip link set {bn}x name {bn}"));
    a.sh(&format!(
        "ip addr add {aip} dev {an} && ip link set {an} up"
    ));
    b.sh(&format!(
        "ip addr add {bip} dev {bn} && ip link set {bn} up"
    ));
}

fn base_toml(name: &str, ip: &str, cidr: &str) -> String {
    format!(
        r#"
node_name = "{name}"
endpoint = "{ip}"
pod_cidrs = ["{cidr}"]
poll_interval = "200ms"
long_poll = "off"
backoff_initial = "100ms"
backoff_max = "1s"
[keyd]
server = "https://127.0.0.1:1"
ca = "/nonexistent/ca.pem"
cert = "/nonexistent/cert.pem"
key = "/nonexistent/key.pem"
[log]
format = "text"
"#
    )
}

pub fn config_ipsec(name: &str, ip: &str, cidr: &str) -> Config {
    let text = format!("mode = \"ipsec\"\n{}", base_toml(name, ip, cidr));
    RawConfig::from_toml(&text).unwrap().validate().unwrap()
}

pub fn config_wg_userspace(name: &str, ip: &str, cidr: &str, device: &str) -> Config {
    let text = format!(
        "mode = \"wireguard\"\n{}\n[wireguard]\nbackend = \"userspace\"\ndevice = \"{device}\"\n",
        base_toml(name, ip, cidr)
    );
    RawConfig::from_toml(&text).unwrap().validate().unwrap()
}

/// What keyd's bootstrap asks: a stand-in, or a real API server.
pub enum Kube {
    Fake(Arc<dyn keyd::bootstrap::KubeAuth>),
    Real {
        url: String,
        ca: PathBuf,
        token: PathBuf,
    },
}

/// keyd in this process on loopback, with the dev PKI (certificates for node-a and node-b).
pub struct KeydHarness {
    pub dir: tempfile::TempDir,
    pub setup: keyd::app::DevSetup,
    pub api: std::net::SocketAddr,
    /// The node bootstrap listener (only from [`KeydHarness::start_with_bootstrap`]).
    pub bootstrap: Option<std::net::SocketAddr>,
    pub keyd: Arc<Keyd>,
    stop: watch::Sender<bool>,
}

impl KeydHarness {
    pub async fn start() -> Self {
        Self::start_inner(None).await
    }

    /// keyd with its node bootstrap listener; `kube` stands in for the Kubernetes API server.
    pub async fn start_with_bootstrap(kube: Arc<dyn keyd::bootstrap::KubeAuth>) -> Self {
        Self::start_inner(Some(Kube::Fake(kube))).await
    }

    /// keyd with its node bootstrap listener asking the API server at `url` (CA `ca`, keyd's
    /// credential in `token`).
    pub async fn start_with_bootstrap_at(
        url: &str,
        ca: &std::path::Path,
        token: &std::path::Path,
    ) -> Self {
        Self::start_inner(Some(Kube::Real {
            url: url.to_owned(),
            ca: ca.to_owned(),
            token: token.to_owned(),
        }))
        .await
    }

    async fn start_inner(kube: Option<Kube>) -> Self {
        keyd_mtls::tls::install_default_provider();
        let dir = tempfile::tempdir().unwrap();
        let setup = keyd::app::prepare_dev(dir.path(), "127.0.0.1:0", "127.0.0.1:0").unwrap();
        if let Some(k) = &kube {
            let (url, ca, token) = match k {
                Kube::Real { url, ca, token } => (url.clone(), ca.clone(), token.clone()),
                Kube::Fake(_) => {
                    let token = dir.path().join("keyd-kube-token");
                    std::fs::write(&token, "keyd's own token\n").unwrap();
                    (
                        "https://127.0.0.1:1".to_owned(),
                        setup.pki.ca.clone(),
                        token,
                    )
                }
            };
            let extra = format!(
                "\n[bootstrap]\nlisten = \"127.0.0.1:0\"\nkube_api = {url:?}\nkube_ca = {:?}\nkube_token_file = {:?}\nservice_accounts = [\"keyd/node-shim\"]\nca_key = {:?}\ncert_validity = \"1m\"\n",
                ca.display().to_string(),
                token.display().to_string(),
                setup.pki.dir.join("ca-key.pem").display().to_string(),
            );
            let mut text = std::fs::read_to_string(&setup.keyd_toml).unwrap();
            text.push_str(&extra);
            std::fs::write(&setup.keyd_toml, text).unwrap();
        }
        let flags = Flags {
            listen: Some("127.0.0.1:0".into()),
            ops_listen: Some("127.0.0.1:0".into()),
            ..Flags::default()
        };
        // With the Kubernetes API, nodes' claims are checked against their Node objects, as in a
        // cluster (`keyd dev` alone accepts any free claim).
        let env = match kube {
            Some(_) => HashMap::from([("KEYD_NODE_CLAIMS".to_owned(), "node-object".to_owned())]),
            None => HashMap::new(),
        };
        let config = keyd::config::load(Some(&setup.keyd_toml), &env, &flags).unwrap();
        let (stop, rx) = watch::channel(false);
        let running = match kube {
            Some(Kube::Fake(k)) => keyd::app::start_with_kube(config, rx, k).await.unwrap(),
            _ => keyd::app::start(config, rx).await.unwrap(),
        };
        let api = running.api_addr;
        let bootstrap = running.bootstrap_addr;
        let keyd = Arc::clone(&running.keyd);
        tokio::spawn(running.serve());
        KeydHarness {
            dir,
            setup,
            api,
            bootstrap,
            keyd,
            stop,
        }
    }

    /// `cfg` with keyd's address and the node's dev certificate.
    pub fn point_at(&self, mut cfg: Config, node: &str) -> Config {
        let pair = &self
            .setup
            .pki
            .nodes
            .iter()
            .find(|(n, _)| n == node)
            .expect("dev PKI has certificates for node-a and node-b")
            .1;
        cfg.keyd.server = format!("https://127.0.0.1:{}", self.api.port());
        cfg.keyd.ca = self.setup.pki.ca.clone();
        cfg.keyd.identity = keyd_node_shim::config::IdentitySource::Static {
            cert: pair.cert.clone(),
            key: pair.key.clone(),
        };
        cfg
    }
}

impl KeydHarness {
    /// Stops serving (the data directory and certificates stay).
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

impl Drop for KeydHarness {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// An agent whose kernel handle lives in `ns` (its keyd connection in this namespace).
pub async fn start_agent(ns: &NetNs, cfg: Config) -> (Agent<NetlinkKernel>, Shared) {
    let c2 = cfg.clone();
    let kernel = ns.run(move || NetlinkKernel::open(&c2).unwrap());
    let facts = agent::facts(&cfg).unwrap();
    let paths = match &cfg.keyd.identity {
        keyd_node_shim::config::IdentitySource::Static { cert, key } => keyd_mtls::tls::TlsPaths {
            ca: cfg.keyd.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        other => panic!("static identity expected, got {other:?}"),
    };
    let client = KeydClient::new(&cfg.keyd.server, &cfg.node_name, paths);
    let shared = Shared::default();
    let agent = Agent::start(cfg, facts, kernel, client, shared.clone()).unwrap();
    (agent, shared)
}

/// tcpdump writing a pcap file, inside a namespace.
pub struct Capture {
    child: Child,
    file: tempfile::NamedTempFile,
}

impl Capture {
    pub fn start(ns: &NetNs, dev: &str) -> Self {
        let file = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "tcpdump",
                "--immediate-mode",
                "-i",
                dev,
                "-n",
                "-U",
                "-s",
                "0",
                "-w",
            ])
            .arg(file.path())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // tcpdump says "listening on ..." once the socket is open.
        let stderr = child.stderr.take().unwrap();
        let mut reader = BufReader::new(stderr);
        let mut line = String::new();
        reader.read_line(&mut line).unwrap();
        assert!(line.contains("listening"), "tcpdump: {line}");
        // Keep draining: tcpdump writes its statistics there when it stops.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
        });
        Capture { child, file }
    }

    pub fn stop(mut self) -> Vec<u8> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        let _ = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        std::fs::read(self.file.path()).unwrap()
    }

    /// `tcpdump -r` of a capture.
    pub fn summarize(pcap: &[u8]) -> String {
        let f = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(f.path(), pcap).unwrap();
        let out = Command::new("tcpdump")
            .args(["-n", "-r"])
            .arg(f.path())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

pub fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// An agent on the stateful fake kernel; the returned `FakeKernel` shares its state.
pub fn start_fake_agent(
    cfg: Config,
    kernel: keyd_node_shim::kernel::fake::FakeKernel,
) -> (Agent<keyd_node_shim::kernel::fake::FakeKernel>, Shared) {
    let facts = agent::facts(&cfg).unwrap();
    let paths = match &cfg.keyd.identity {
        keyd_node_shim::config::IdentitySource::Static { cert, key } => keyd_mtls::tls::TlsPaths {
            ca: cfg.keyd.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        other => panic!("static identity expected, got {other:?}"),
    };
    let client = KeydClient::new(&cfg.keyd.server, &cfg.node_name, paths);
    let shared = Shared::default();
    let agent = Agent::start(cfg, facts, kernel, client, shared.clone()).unwrap();
    (agent, shared)
}

pub fn config_wg(name: &str, ip: &str, cidr: &str) -> Config {
    let text = format!("mode = \"wireguard\"\n{}", base_toml(name, ip, cidr));
    RawConfig::from_toml(&text).unwrap().validate().unwrap()
}
