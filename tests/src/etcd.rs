//! A real etcd cluster on loopback (Debian's `etcd-server`): one member or several, each with
//! its own client and peer ports and data directory, stopped and restarted at will to test what
//! keyd does when members fail. Members run behind the same guardian as the API server's
//! (see [`crate::cluster`]), so none outlives the tests.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::cluster::{Guarded, free_port};

/// The etcd binary: `KUBE_TEST_ETCD`, else `etcd` on PATH.
pub fn binary() -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("KUBE_TEST_ETCD") {
        return Ok(PathBuf::from(p));
    }
    std::env::var_os("PATH")
        .and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("etcd"))
                .find(|p| p.is_file())
        })
        .ok_or_else(|| "etcd not found on PATH (apt-get install etcd-server)".to_owned())
}

/// Whether a test can run etcd; says why not (or, in CI, fails) otherwise.
pub fn available() -> bool {
    crate::prereq::require("etcd (Debian's etcd-server)", binary().map(|_| ()))
}

/// How keyd would be configured for a test cluster's `endpoints` under `prefix`: plain http on
/// loopback, a 3 s timeout, etcd's default operation limit, a 2 s leader lease.
pub fn settings(endpoints: &[String], prefix: &str) -> keyd::store::EtcdSettings {
    keyd::store::EtcdSettings {
        endpoints: endpoints.to_vec(),
        prefix: prefix.to_owned(),
        tls: None,
        timeout: Duration::from_secs(3),
        max_txn_ops: 128,
        lease_ttl: Duration::from_secs(2),
        max_unavailable: Duration::from_secs(3600),
    }
}

struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    process: Option<Guarded>,
}

/// An etcd cluster of one or more members.
pub struct EtcdCluster {
    dir: PathBuf,
    bin: PathBuf,
    members: Vec<Member>,
    /// Addresses the members take clients on besides loopback (one in a test's network
    /// namespace topology, say).
    also_on: Vec<std::net::IpAddr>,
    /// Clients speak TLS and must show a certificate of this CA (see [`Self::start_tls`]).
    tls: Option<ClientTls>,
}

/// What a client of a TLS cluster needs: the CA of the members' serving certificates, and a
/// client certificate that CA issued.
#[derive(Debug, Clone)]
pub struct ClientTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The members' serving certificate and key.
    server: (PathBuf, PathBuf),
}

impl std::fmt::Debug for EtcdCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdCluster")
            .field("dir", &self.dir)
            .field("endpoints", &self.endpoints())
            .finish()
    }
}

impl EtcdCluster {
    /// Starts `n` members in `dir` and waits until every one listens.
    pub fn start(dir: &Path, n: usize) -> Self {
        Self::start_also_on(dir, n, &[])
    }

    /// Like [`Self::start`], each member also taking clients on the same port at each address
    /// of `also_on` (which must exist: a veth's, for a keyd in another network namespace).
    pub fn start_also_on(dir: &Path, n: usize, also_on: &[std::net::IpAddr]) -> Self {
        Self::launch(dir, n, also_on, None)
    }

    /// Like [`Self::start_also_on`], with TLS on every client URL and client certificates
    /// required (`--client-cert-auth`), as production etcd runs: a new CA, a serving certificate
    /// for loopback and `also_on`, and one client certificate, in `dir/tls`.
    pub fn start_tls(dir: &Path, n: usize, also_on: &[std::net::IpAddr]) -> Self {
        let tls_dir = dir.join("tls");
        std::fs::create_dir_all(&tls_dir).unwrap();
        let ca = keyd::pki::CertificateAuthority::generate("keyd-test etcd CA").unwrap();
        let names: Vec<String> = ["127.0.0.1".to_owned(), "localhost".to_owned()]
            .into_iter()
            .chain(also_on.iter().map(ToString::to_string))
            .collect();
        let day = Duration::from_secs(86_400);
        let tls = ClientTls {
            ca: tls_dir.join("ca.pem"),
            cert: tls_dir.join("client.pem"),
            key: tls_dir.join("client-key.pem"),
            server: (tls_dir.join("server.pem"), tls_dir.join("server-key.pem")),
        };
        std::fs::write(&tls.ca, ca.cert_pem()).unwrap();
        ca.issue_server(&names, day)
            .unwrap()
            .write(&tls.server.0, &tls.server.1)
            .unwrap();
        ca.issue_client(&keyd_proto::identity::Identity::Admin("keyd".into()), day)
            .unwrap()
            .write(&tls.cert, &tls.key)
            .unwrap();
        Self::launch(dir, n, also_on, Some(tls))
    }

    /// The files a client of this cluster needs, if it runs TLS.
    pub fn client_tls(&self) -> Option<&ClientTls> {
        self.tls.as_ref()
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    fn launch(dir: &Path, n: usize, also_on: &[std::net::IpAddr], tls: Option<ClientTls>) -> Self {
        let bin = binary().unwrap();
        std::fs::create_dir_all(dir).unwrap();
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                process: None,
            })
            .collect();
        let mut cluster = Self {
            dir: dir.to_path_buf(),
            bin,
            members,
            also_on: also_on.to_vec(),
            tls,
        };
        for i in 0..n {
            cluster.spawn(i);
        }
        for i in 0..n {
            cluster.wait_listening(i);
        }
        cluster
    }

    fn initial_cluster(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn spawn(&mut self, i: usize) {
        let initial = self.initial_cluster();
        let m = &self.members[i];
        let scheme = self.scheme();
        let client = format!("{scheme}://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let listen: Vec<String> = std::iter::once(client.clone())
            .chain(self.also_on.iter().map(|ip| {
                format!(
                    "{scheme}://{}",
                    std::net::SocketAddr::from((*ip, m.client_port))
                )
            }))
            .collect();
        let mut args = vec![
            format!("--name={}", m.name),
            format!("--data-dir={}", self.dir.join(&m.name).display()),
            format!("--listen-client-urls={}", listen.join(",")),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-token=keyd-test".to_owned(),
            // Elections in a fraction of a second, so failover tests stay short.
            "--heartbeat-interval=50".to_owned(),
            "--election-timeout=500".to_owned(),
        ];
        if let Some(tls) = &self.tls {
            args.extend([
                format!("--cert-file={}", tls.server.0.display()),
                format!("--key-file={}", tls.server.1.display()),
                format!("--trusted-ca-file={}", tls.ca.display()),
                "--client-cert-auth".to_owned(),
            ]);
        }
        let log = self.dir.join(format!("{}.log", m.name));
        self.members[i].process = Some(Guarded::spawn("etcd", &self.bin, &args, log));
    }

    fn wait_listening(&mut self, i: usize) {
        let addr: SocketAddr = ([127, 0, 0, 1], self.members[i].client_port).into();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let g = self.members[i].process.as_mut().expect("member running");
            if g.exited() {
                panic!("etcd member {i} exited:\n{}", g.log_tail());
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("etcd member {i} is not listening on {addr}");
    }

    /// Every member's client URL at `host`, one of the addresses given to
    /// [`Self::start_also_on`].
    pub fn endpoints_on(&self, host: std::net::IpAddr) -> Vec<String> {
        self.members
            .iter()
            .map(|m| {
                format!(
                    "{}://{}",
                    self.scheme(),
                    std::net::SocketAddr::from((host, m.client_port))
                )
            })
            .collect()
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.endpoints_on(std::net::IpAddr::from([127, 0, 0, 1]))
    }

    /// Stops member `i` (its data directory stays).
    pub fn stop(&mut self, i: usize) {
        drop(self.members[i].process.take());
    }

    /// Starts member `i` again on its data directory and waits until it listens.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].process.is_none(), "member {i} is running");
        self.spawn(i);
        self.wait_listening(i);
    }

    /// The last lines of member `i`'s log.
    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(format!("{}.log", self.members[i].name)))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}
