//! The keyd benchmark: N simulated nodes, each holding its own client certificate, fetch their
//! key bundles from a real keyd over mTLS; the same traffic is then sent to a *ceiling*, a
//! minimal rustls + hyper server that answers every request with the same bytes (no store, no
//! authorization), and keyd is reported as a ratio of it.
//!
//! keyd and the ceiling are separate child processes, so the load generator's own CPU use is
//! the same against both; all three share the machine's cores, and the report says how many.
//!
//! Flow of [`run`]: issue N node certificates from keyd's dev CA, register every node, rotate
//! the IPsec key once (so bundles carry keys), start the ceiling with node 0's real bundle, run
//! each scenario against keyd and then the ceiling; for the WireGuard scenarios, re-register
//! every node with its own x25519 public key (a full mesh) and restart the ceiling with a mesh
//! bundle. Performance targets live here and in `docs/benchmarks.md`, never in timed tests.

mod ceiling;
mod fleet;
mod procs;
mod report;
mod scenario;

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use http::StatusCode;

pub use ceiling::{CeilingArgs, run_ceiling};
pub use fleet::Fleet;
pub use procs::{ChildGuard, cpu_seconds};
pub use report::{Report, RunRecord, Setup, TargetCheck};
pub use scenario::{RunParams, Scenario, Second, ServerKind, Target};

/// The targets from the issue, for 1,000 nodes on a 2-core machine.
pub const TARGET_NODES: usize = 1000;
pub const TARGET_FETCHES_PER_SEC: f64 = 20_000.0;
pub const TARGET_FETCH_P99_MS: f64 = 5.0;
pub const TARGET_HANDSHAKES_PER_SEC: f64 = 1_500.0;

/// Largest `--nodes`: pod CIDRs are `10.a.b.0/24`, and every node holds one open connection.
pub const MAX_NODES: usize = 10_000;

/// What one benchmark invocation does.
#[derive(Debug, Clone)]
pub struct Options {
    /// Simulated nodes, each with its own certificate and (in the keep-alive scenarios) its own
    /// connection.
    pub nodes: usize,
    /// Worker tasks, each with one request in flight.
    pub concurrency: usize,
    /// Unmeasured load before each measured run.
    pub warmup: Duration,
    /// Length of each measured run.
    pub duration: Duration,
    /// Which scenarios, in this order (each against keyd, then the ceiling).
    pub scenarios: Vec<Scenario>,
    /// Stop a run after this many measured requests, even before `duration` is up.
    pub max_requests: Option<u64>,
    /// A request (or, in the handshake scenario, connect + handshake + request) slower than
    /// this is an error.
    pub request_timeout: Duration,
    /// Open loop at this many requests (or handshakes) per second in total; `None` (the
    /// default): closed loop, each worker as fast as it is answered.
    pub rate: Option<f64>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            nodes: TARGET_NODES,
            concurrency: 64,
            warmup: Duration::from_secs(2),
            duration: Duration::from_secs(10),
            scenarios: Scenario::ALL.to_vec(),
            max_requests: None,
            request_timeout: Duration::from_secs(5),
            rate: None,
        }
    }
}

impl Options {
    /// Checks every option before anything is started.
    pub fn validate(&self) -> Result<(), Error> {
        let bad = |field: &'static str, reason: String| Err(Error::Option { field, reason });
        if !(1..=MAX_NODES).contains(&self.nodes) {
            return bad("nodes", format!("{} is not in 1..={MAX_NODES}", self.nodes));
        }
        if !(1..=4096).contains(&self.concurrency) {
            return bad(
                "concurrency",
                format!("{} is not in 1..=4096", self.concurrency),
            );
        }
        if self.duration.is_zero() || self.duration > Duration::from_secs(3600) {
            return bad(
                "seconds",
                format!("{:?} must be more than 0 and at most 3600 s", self.duration),
            );
        }
        if self.warmup > Duration::from_secs(600) {
            return bad("warmup", format!("{:?} is more than 600 s", self.warmup));
        }
        if self.scenarios.is_empty() {
            return bad("scenarios", "select at least one scenario".into());
        }
        // The mesh cannot be undone (a key can be replaced, not removed), so the IPsec-only
        // scenarios must run first; `Scenario::ALL` is in that order.
        if let Some(w) = self.scenarios.iter().position(|s| s.wireguard())
            && let Some(late) = self.scenarios[w..].iter().find(|s| !s.wireguard())
        {
            return bad(
                "scenarios",
                format!("{} must come before the WireGuard scenarios", late.name()),
            );
        }
        if self.max_requests == Some(0) {
            return bad("max-requests", "must be at least 1".into());
        }
        if let Some(rate) = self.rate
            && !(1.0..=10_000_000.0).contains(&rate)
        {
            return bad("rate", format!("{rate} is not in 1..=10000000 requests/s"));
        }
        if self.request_timeout.is_zero() {
            return bad("request-timeout-ms", "must be more than 0".into());
        }
        Ok(())
    }
}

/// A keyd that is serving: its mTLS address, its dev PKI, and (for a child process) its pid.
#[derive(Debug, Clone)]
pub struct KeydTarget {
    pub api: SocketAddr,
    /// `<data_dir>/pki` as `keyd dev` writes it: `ca.pem`, `ca-key.pem`, `server.pem`,
    /// `server-key.pem`, `admin.pem`, `admin-key.pem`.
    pub pki_dir: PathBuf,
    /// For CPU accounting; `None` when keyd runs inside this process (tests).
    pub pid: Option<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid option --{field}: {reason}")]
    Option { field: &'static str, reason: String },
    #[error(
        "keyd binary not found at {}: build it with `cargo build --release -p keyd`, or pass --keyd PATH",
        path.display()
    )]
    KeydMissing { path: PathBuf },
    #[error("cannot start {what} ({})", path.display())]
    Spawn {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{what} exited early ({status}); the end of its output:\n{output}")]
    Exited {
        what: &'static str,
        status: std::process::ExitStatus,
        output: String,
    },
    #[error("{what} was not ready within {waited:?}; the end of its output:\n{output}")]
    NotReady {
        what: &'static str,
        waited: Duration,
        output: String,
    },
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("issuing a certificate for {node}")]
    Pki {
        node: String,
        #[source]
        source: Box<keyd::pki::PkiError>,
    },
    #[error("loading {what}")]
    Tls {
        what: String,
        #[source]
        source: Box<keyd_mtls::tls::TlsError>,
    },
    #[error("{what}")]
    Rustls {
        what: String,
        #[source]
        source: rustls::Error,
    },
    #[error("{what} is not valid PEM")]
    Pem {
        what: String,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("{what}")]
    Client {
        what: String,
        #[source]
        source: Box<keyd_mtls::client::ClientError>,
    },
    #[error("{what}: HTTP {status}: {message}")]
    Status {
        what: String,
        status: StatusCode,
        message: String,
    },
    #[error("{what}: {reason}")]
    Protocol { what: String, reason: String },
    #[error("{what} timed out after {after:?}")]
    Timeout { what: String, after: Duration },
    #[error("a load-generator task failed")]
    Join(#[source] tokio::task::JoinError),
    #[error("encoding the JSON report")]
    Json(#[source] serde_json::Error),
}

/// The whole benchmark against a `keyd dev` child process started from `keyd_exe`, in a new
/// temporary directory that is removed afterwards. Children are killed when this returns, fails,
/// or is dropped (say on Ctrl-C).
pub async fn bench(opts: &Options, keyd_exe: &Path, ceiling_exe: &Path) -> Result<Report, Error> {
    opts.validate()?;
    if !keyd_exe.is_file() {
        return Err(Error::KeydMissing {
            path: keyd_exe.to_owned(),
        });
    }
    let tmp = tempfile::Builder::new()
        .prefix("keyd-loadgen-")
        .tempdir()
        .map_err(|source| Error::Io {
            what: "creating a temporary directory".into(),
            source,
        })?;
    // Declared after `tmp`, so dropped before it: the child stops before its files go.
    let (mut keyd, api, ops) = procs::spawn_keyd(keyd_exe, tmp.path())?;
    procs::wait_keyd_ready(&mut keyd, ops, Duration::from_secs(30)).await?;
    let target = KeydTarget {
        api,
        pki_dir: tmp.path().join("keyd").join("pki"),
        pid: Some(keyd.pid()),
    };
    let result = run(opts, &target, ceiling_exe, tmp.path()).await;
    // A keyd that died explains any failure better than the failed requests do.
    keyd.check_alive()?;
    let mut report = result?;
    report.setup.keyd_binary = Some(keyd_exe.display().to_string());
    Ok(report)
}

/// Sets up the nodes on an already running keyd and runs the selected scenarios against it and
/// against a ceiling child process started from `ceiling_exe` (this binary's hidden `ceiling`
/// subcommand). `work_dir` receives the ceiling's body file and log.
pub async fn run(
    opts: &Options,
    keyd: &KeydTarget,
    ceiling_exe: &Path,
    work_dir: &Path,
) -> Result<Report, Error> {
    opts.validate()?;
    keyd_mtls::tls::install_default_provider();
    let began = Instant::now();
    let mut setup = Setup::new(opts);

    progress(&format!("issuing {} node certificates", opts.nodes));
    let pki_dir = keyd.pki_dir.clone();
    let count = opts.nodes;
    let fleet = tokio::task::spawn_blocking(move || Fleet::issue(&pki_dir, count))
        .await
        .map_err(Error::Join)??;

    progress(&format!("registering {} nodes", opts.nodes));
    let t = Instant::now();
    fleet.register(keyd.api, false).await?;
    setup.register_seconds = t.elapsed().as_secs_f64();
    fleet.rotate_ipsec(keyd.api).await?;
    let mut registered_at = Instant::now();

    let params = RunParams {
        concurrency: opts.concurrency,
        warmup: opts.warmup,
        duration: opts.duration,
        max_requests: opts.max_requests,
        request_timeout: opts.request_timeout,
        rate: opts.rate,
    };
    let keyd_target = Target {
        server: ServerKind::Keyd,
        addr: keyd.api,
        pid: keyd.pid,
    };
    let mut records = Vec::new();
    let mut ceiling: Option<(ChildGuard, Target)> = None;
    let mut wireguard = false;
    for &scenario in &opts.scenarios {
        if scenario.wireguard() && !wireguard {
            progress(&format!(
                "registering {} nodes with WireGuard keys (full mesh)",
                opts.nodes
            ));
            let t = Instant::now();
            fleet.register(keyd.api, true).await?;
            setup.wireguard_register_seconds = Some(t.elapsed().as_secs_f64());
            registered_at = Instant::now();
            wireguard = true;
            // The bundles changed: the ceiling must serve the new one.
            drop(ceiling.take());
        }
        if ceiling.is_none() {
            // The ceiling serves exactly the bytes keyd serves node 0 right now.
            let (body, etag) = fleet.fetch_bundle(0, keyd.api).await?;
            if wireguard {
                setup.wireguard_bundle_bytes = Some(body.len());
                setup.wireguard_peers = Some(count_peers(&body)?);
            } else {
                setup.ipsec_bundle_bytes = Some(body.len());
            }
            let name = if wireguard { "wg-mesh" } else { "ipsec" };
            let (guard, addr) =
                procs::spawn_ceiling(ceiling_exe, &keyd.pki_dir, work_dir, name, &body, &etag)?;
            let target = Target {
                server: ServerKind::Ceiling,
                addr,
                pid: Some(guard.pid()),
            };
            ceiling = Some((guard, target));
        }
        let Some((guard, ceiling_target)) = ceiling.as_mut() else {
            // Invariant: the block above always leaves a ceiling running.
            continue;
        };
        for target in [&keyd_target, &*ceiling_target] {
            progress(&format!(
                "{} against {} ({:?} warm-up + {:?})",
                scenario.name(),
                target.server.name(),
                opts.warmup,
                opts.duration
            ));
            let started = began.elapsed().as_secs_f64();
            let since_registration = registered_at.elapsed().as_secs_f64();
            let m = match scenario::run(&fleet, scenario, target, &params).await {
                Ok(m) => m,
                Err(e) => {
                    // A ceiling that died explains the failure better, with its output.
                    guard.check_alive()?;
                    return Err(e);
                }
            };
            records.push(RunRecord::new(
                scenario,
                target.server,
                &m,
                opts.duration,
                started,
                since_registration,
            ));
            // Let the closed connections drain before the next run.
            tokio::time::sleep(opts.warmup.min(Duration::from_millis(300))).await;
        }
        guard.check_alive()?;
    }
    drop(ceiling);
    Ok(Report::new(setup, records))
}

fn count_peers(body: &[u8]) -> Result<usize, Error> {
    let bundle: keyd_proto::NodeBundle =
        serde_json::from_slice(body).map_err(|e| Error::Protocol {
            what: "node 0's bundle".into(),
            reason: format!("not a NodeBundle: {e}"),
        })?;
    Ok(bundle.wireguard.peers.len())
}

/// Progress lines go to stderr, so stdout holds only the report.
fn progress(msg: &str) {
    eprintln!("[loadgen] {msg}");
}

pub use keyd_mtls::error_chain;
