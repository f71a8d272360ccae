//! A real `keyd` process (`keyd dev` on a data directory, or `keyd serve` on a configuration
//! written next to it) and an mTLS client for it, for the tests that kill keyd or starve its
//! disk.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use keyd_mtls::client::{Connection, Connector};
use keyd_mtls::tls::TlsPaths;
use serde_json::Value;

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One keyd process on a data directory.
pub struct Keyd {
    pub child: Child,
    pub data: PathBuf,
    pub api: u16,
    /// The ops listener (plain HTTP: `/healthz`, `/readyz`, `/metrics`).
    pub ops: u16,
    /// The address both listeners are on (loopback, unless it runs in a network namespace).
    pub host: std::net::IpAddr,
    log: PathBuf,
}

impl Keyd {
    /// `keyd dev` (dev PKI and local KEK, created once per data directory) with a short scheduler
    /// tick, so that rollouts, rewraps and prunes resume within a fraction of a second.
    /// Its log goes next to the data directory.
    pub fn spawn(data: &Path, env: &[(&str, String)]) -> Self {
        Self::spawn_logging_to(data, data.parent().unwrap(), env)
    }

    /// With its log in `log_dir` (not on a filesystem the test fills up).
    pub fn spawn_logging_to(data: &Path, log_dir: &Path, env: &[(&str, String)]) -> Self {
        Self::launch(data, log_dir, None, None, env)
    }

    /// `keyd dev` inside network namespace `netns` (`ip netns exec`, which execs keyd: the
    /// child is keyd itself), listening on `host`, an address of that namespace. Its server
    /// certificate must name `host` (see [`keyd::pki::ensure_dev_pki`]).
    pub fn spawn_in_netns(
        data: &Path,
        netns: &str,
        host: std::net::IpAddr,
        env: &[(&str, String)],
    ) -> Self {
        Self::launch(data, data.parent().unwrap(), None, Some((netns, host)), env)
    }

    /// `keyd serve --config CONFIG` on `data`, which [`prepare_dev`] set up (its dev PKI and
    /// `keyd.toml`, whose text `CONFIG` extends), with the same tick and log as [`Self::spawn`].
    pub fn spawn_serving(data: &Path, config: &Path, env: &[(&str, String)]) -> Self {
        Self::launch(data, data.parent().unwrap(), Some(config), None, env)
    }

    fn launch(
        data: &Path,
        log_dir: &Path,
        config: Option<&Path>,
        netns: Option<(&str, std::net::IpAddr)>,
        env: &[(&str, String)],
    ) -> Self {
        let (api, ops) = (free_port(), free_port());
        let log = log_dir.join(format!("keyd-{api}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let host = netns.map_or(std::net::IpAddr::from([127, 0, 0, 1]), |(_, h)| h);
        let mut cmd = match netns {
            None => Command::new(env!("CARGO_BIN_EXE_keyd")),
            Some((ns, _)) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, env!("CARGO_BIN_EXE_keyd")]);
                c
            }
        };
        match config {
            None => cmd.args(["dev", "--data-dir"]).arg(data),
            Some(c) => cmd.args(["serve", "--config"]).arg(c),
        };
        let child = cmd
            .args([
                "--listen",
                &std::net::SocketAddr::from((host, api)).to_string(),
                "--ops-listen",
                &std::net::SocketAddr::from((host, ops)).to_string(),
            ])
            .env("KEYD_SCHEDULER_TICK", "100ms")
            .env("KEYD_LOG_LEVEL", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap();
        Self {
            child,
            data: data.to_owned(),
            api,
            ops,
            host,
            log,
        }
    }

    /// `/readyz` on the ops port: its status and text, or `None` while nothing answers there.
    pub async fn readyz(&self) -> Option<(u16, String)> {
        let (code, body) =
            keyd_tests::http::request((self.host, self.ops).into(), "GET", "/readyz", &[], vec![])
                .await
                .ok()?;
        Some((code, String::from_utf8_lossy(&body).into_owned()))
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits (up to 30 s) until keyd answers; `Err` with its exit status if it exits first.
    pub async fn ready(&mut self) -> Result<(), ExitStatus> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Err(status);
            }
            if let Some(mut c) = self.connect(&Identity::Admin).await
                && c.get("/v1/status")
                    .await
                    .is_ok_and(|r| r.status == StatusCode::OK)
            {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "keyd did not come up: {}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn connect(&self, who: &Identity) -> Option<Connection> {
        let pki = self.data.join("pki");
        let name = match who {
            Identity::Admin => "admin".to_owned(),
            Identity::Node(n) => format!("node-{n}"),
        };
        let paths = TlsPaths {
            ca: pki.join("ca.pem"),
            cert: pki.join(format!("{name}.pem")),
            key: pki.join(format!("{name}-key.pem")),
        };
        let tls = keyd_mtls::tls::client_config(&paths).ok()?;
        let at = std::net::SocketAddr::from((self.host, self.api));
        Connector::new(&format!("https://{at}"), tls)
            .unwrap()
            .connect()
            .await
            .ok()
    }

    /// Waits (up to 10 s) for the process to end.
    pub async fn exited(&mut self) -> Option<ExitStatus> {
        for _ in 0..200 {
            if let Some(s) = self.child.try_wait().unwrap() {
                return Some(s);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    }

    /// Stops keyd the way an operator would (SIGTERM) and waits for it.
    pub async fn stop(mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        if self.exited().await.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// What `keyd dev` prepares on `data` before it serves (dev PKI, local KEK, `keyd.toml`),
/// without serving: for a test that runs `keyd serve` with more configuration.
pub fn prepare_dev(data: &Path) -> keyd::app::DevSetup {
    keyd::app::prepare_dev(data, "127.0.0.1:8443", "127.0.0.1:9443").unwrap()
}

impl Drop for Keyd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Debug, Clone)]
pub enum Identity {
    Admin,
    Node(&'static str),
}

/// The request failed at the transport: keyd is gone (the crash the run is waiting for).
#[derive(Debug)]
pub struct Gone;

/// Sends a request; a transport failure is [`Gone`], an HTTP error a test failure.
pub async fn call(
    k: &Keyd,
    who: Identity,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Gone> {
    let mut c = k.connect(&who).await.ok_or(Gone)?;
    let r = c
        .send(
            method.clone(),
            path,
            body.map(|b| serde_json::to_vec(&b).unwrap()),
            &[],
        )
        .await
        .map_err(|_| Gone)?;
    assert!(
        r.status.is_success(),
        "{method} {path}: {} {}",
        r.status,
        r.error_message()
    );
    Ok(serde_json::from_slice(&r.body).unwrap_or(Value::Null))
}

/// Sends a request and returns the status and the JSON body (`Null` if none), whatever the
/// status; `Gone` when keyd does not answer.
pub async fn request(
    k: &Keyd,
    who: Identity,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value), Gone> {
    let mut c = k.connect(&who).await.ok_or(Gone)?;
    let r = c
        .send(
            method,
            path,
            body.map(|b| serde_json::to_vec(&b).unwrap()),
            &[],
        )
        .await
        .map_err(|_| Gone)?;
    Ok((
        r.status,
        serde_json::from_slice(&r.body).unwrap_or(Value::Null),
    ))
}

/// Registers node `name` (with its own certificate) as node number `i`: endpoint 192.0.2.(i+1),
/// pod CIDR 10.0.i.0/24, a WireGuard key of its own.
pub async fn register_dev_node(k: &Keyd, name: &'static str, i: usize) -> Result<(), Gone> {
    let (status, body) = put_dev_node(k, name, i, &format!("192.0.2.{}", i + 1)).await?;
    assert!(status.is_success(), "PUT /v1/nodes/{name}: {status} {body}");
    Ok(())
}

/// Registers or updates node `name` as node number `i` (pod CIDR 10.0.i.0/24, its own
/// WireGuard key) at `endpoint`, and returns keyd's answer, whatever it is.
pub async fn put_dev_node(
    k: &Keyd,
    name: &'static str,
    i: usize,
    endpoint: &str,
) -> Result<(StatusCode, Value), Gone> {
    use base64::Engine as _;
    let seed = u8::try_from(i + 1).unwrap();
    let wg = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([seed; 32]));
    request(
        k,
        Identity::Node(name),
        Method::PUT,
        &format!("/v1/nodes/{name}"),
        Some(serde_json::json!({
            "endpoint": endpoint,
            "pod_cidrs": [format!("10.0.{i}.0/24")],
            "wireguard_public_key":
                base64::engine::general_purpose::STANDARD.encode(wg.as_bytes()) })),
    )
    .await
}

/// The audit log as `keyctl audit export` gets it (JSON lines).
pub async fn export(k: &Keyd) -> Result<String, Gone> {
    let mut c = k.connect(&Identity::Admin).await.ok_or(Gone)?;
    let r = c
        .get("/v1/audit/export?format=jsonl")
        .await
        .map_err(|_| Gone)?;
    assert_eq!(r.status, StatusCode::OK, "{}", r.error_message());
    Ok(String::from_utf8(r.body.to_vec()).unwrap())
}

/// Exports the audit log into `dir` and verifies it offline with `keyctl audit verify
/// --public-key`, as an auditor would.
pub async fn audit_verifies(k: &Keyd, dir: &Path) {
    let key = call(
        k,
        Identity::Admin,
        Method::GET,
        "/v1/audit/public-key",
        None,
    )
    .await
    .unwrap();
    let file = dir.join("audit.jsonl");
    std::fs::write(&file, export(k).await.unwrap()).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyctl"))
        .args([
            "audit",
            "verify",
            "--public-key",
            key["public_key"].as_str().unwrap(),
        ])
        .arg(&file)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "audit verify: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
