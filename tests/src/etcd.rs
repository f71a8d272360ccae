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
        let client = format!("http://127.0.0.1:{}", m.client_port);
        let peer = format!("http://127.0.0.1:{}", m.peer_port);
        let args = vec![
            format!("--name={}", m.name),
            format!("--data-dir={}", self.dir.join(&m.name).display()),
            format!("--listen-client-urls={client}"),
            format!("--advertise-client-urls={client}"),
            format!("--listen-peer-urls={peer}"),
            format!("--initial-advertise-peer-urls={peer}"),
            format!("--initial-cluster={initial}"),
            "--initial-cluster-token=keyd-test".to_owned(),
            // Elections in a fraction of a second, so failover tests stay short.
            "--heartbeat-interval=50".to_owned(),
            "--election-timeout=500".to_owned(),
        ];
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

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
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
