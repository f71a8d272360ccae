//! Wiring: from a validated [`Config`] to running listeners; and `keyd dev`.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::api::{self, AppState};
use crate::config::Config;
use crate::service::Keyd;
use crate::store::Store;

/// A keyd whose listeners are bound and which is ready to serve.
pub struct Running {
    pub api_addr: std::net::SocketAddr,
    pub ops_addr: std::net::SocketAddr,
    /// The node bootstrap listener, when `[bootstrap]` is configured.
    pub bootstrap_addr: Option<std::net::SocketAddr>,
    pub keyd: Arc<Keyd>,
    serve: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("api_addr", &self.api_addr)
            .field("ops_addr", &self.ops_addr)
            .finish()
    }
}

impl Running {
    /// Serves until `shutdown` resolves, then drains connections.
    pub async fn serve(self) {
        self.serve.await;
    }
}

/// Opens the store and the KEK, loads every key (failing if any does not unseal), loads the TLS
/// files, and binds both listeners. Nothing is served until [`Running::serve`].
pub async fn start(
    config: Config,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Running> {
    start_with_clock(config, shutdown, crate::clock::Clock::default()).await
}

/// [`start`] with a clock that tests can move forward.
pub async fn start_with_clock(
    config: Config,
    shutdown: tokio::sync::watch::Receiver<bool>,
    clock: crate::clock::Clock,
) -> anyhow::Result<Running> {
    start_with(config, shutdown, clock, None).await
}

/// The certificates of removed nodes, refused at the TLS handshake. Weak: the TLS configuration
/// does not keep the service alive.
#[derive(Debug)]
struct RemovedNodes(std::sync::Weak<Keyd>);

impl keyd_mtls::identity::DenyList for RemovedNodes {
    fn refused(
        &self,
        identity: &keyd_proto::identity::Identity,
        not_before: u64,
    ) -> Option<String> {
        match identity {
            keyd_proto::identity::Identity::Node(name) => self
                .0
                .upgrade()?
                .node_certificate_refused(name, Some(not_before)),
            _ => None,
        }
    }
}

/// [`start`], with `kube` standing in for the Kubernetes API server that node bootstrap asks
/// (tests).
pub async fn start_with_kube(
    config: Config,
    shutdown: tokio::sync::watch::Receiver<bool>,
    kube: Arc<dyn crate::bootstrap::KubeAuth>,
) -> anyhow::Result<Running> {
    start_with(config, shutdown, crate::clock::Clock::default(), Some(kube)).await
}

async fn start_with(
    config: Config,
    shutdown: tokio::sync::watch::Receiver<bool>,
    clock: crate::clock::Clock,
    kube: Option<Arc<dyn crate::bootstrap::KubeAuth>>,
) -> anyhow::Result<Running> {
    keyd_mtls::tls::install_default_provider();
    create_private_dir(&config.data_dir)?;
    let (store, shared) = open_store(&config, shutdown.clone()).await?;
    // The custodian answers a wrap and unwrap round trip before anything else happens.
    let custody = crate::custody::bootstrap(&config.kek, &config.custody, &store).await?;
    if config.custody.verify_on_start {
        let n = crate::rewrap::verify_all(&store, &custody)
            .await
            .map_err(|(id, e)| anyhow::anyhow!("sealed record {id} does not open: {e}"))?;
        tracing::info!(records = n, "every sealed record opens");
    }
    let keyd = Arc::new(
        Keyd::open_with_custody(store, Arc::clone(&custody), config.service.clone(), clock)
            .await
            .context("loading keys from the store")?,
    );
    let _monitor = custody.spawn_monitor(shutdown.clone());
    match &shared {
        None => take_over(&keyd).await?,
        // Named before anything this replica audits (its certificates, its term).
        #[cfg(feature = "etcd")]
        Some(_) => keyd.set_replica_name(holder_name()),
        #[cfg(not(feature = "etcd"))]
        Some(never) => match *never {},
    }
    let custody_audit = spawn_custody_audit(Arc::clone(&keyd), shutdown.clone());
    // A replica that must reload its KEK keyring restarts (its supervisor starts it again).
    let mut restart = keyd.restart_wanted();
    let _restart = tokio::spawn(async move {
        if let Ok(why) = restart.wait_for(Option::is_some).await {
            tracing::warn!(
                why = why.clone().unwrap_or_default(),
                "restarting to load the store's KEK keyring"
            );
            std::process::exit(EXIT_DEPOSED);
        }
    });
    // Before anything binds: a Kubernetes client that cannot be built fails the start here.
    let policy_watch = policy_watch(&config, &keyd, shutdown.clone())?;
    // The CA and keyd's certificate, before the listeners load them.
    let cluster_pki = cluster_pki(&config, &keyd, shutdown.clone()).await?;
    let (tls_rx, _reloader) = keyd_mtls::tls::watch_server_config_denying(
        config.tls.clone(),
        config.tls_reload_interval,
        Some(Arc::new(RemovedNodes(Arc::downgrade(&keyd)))),
    )
    .context("loading the server certificate")?;
    let api_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("binding listen {}", config.listen))?;
    let ops_listener = TcpListener::bind(config.ops_listen)
        .await
        .with_context(|| format!("binding ops_listen {}", config.ops_listen))?;
    let api_addr = api_listener.local_addr()?;
    let ops_addr = ops_listener.local_addr()?;
    let state = AppState {
        keyd: Arc::clone(&keyd),
    };
    let router = api::router(state.clone(), config.max_body_bytes);
    let ops = api::ops_router(state);
    let metrics = keyd.metrics.clone();
    let wait = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let (bootstrap_addr, bootstrap) = match &config.bootstrap {
        Some(b) => {
            let kube = match kube {
                Some(k) => k,
                None => Arc::new(
                    crate::bootstrap::KubeApi::new(&b.kube_api, &b.kube_ca, &b.kube_token_file)
                        .context("setting up the Kubernetes client for node bootstrap")?,
                ),
            };
            keyd.set_node_directory(Arc::new(crate::bootstrap::KubeNodes(Arc::clone(&kube))));
            let (addr, fut) = crate::bootstrap::start(
                b.clone(),
                &config.tls,
                config.tls_reload_interval,
                Arc::clone(&keyd),
                kube,
                config.listener,
                wait(shutdown.clone()),
            )
            .await
            .with_context(|| format!("starting the bootstrap listener on {}", b.listen))?;
            (Some(addr), Some(fut))
        }
        None => (None, None),
    };
    // On etcd: announce this replica, and stand for leader in the background.
    let leader: Option<Candidacy> = match shared {
        #[cfg(feature = "etcd")]
        Some(etcd) => Some(replicate(
            etcd,
            &config,
            api_addr,
            Arc::clone(&keyd),
            shutdown.clone(),
        )),
        _ => None,
    };
    let follow_keyd = Arc::clone(&keyd);
    let follow_stop = shutdown.clone();
    let scheduler_keyd = Arc::clone(&keyd);
    let final_keyd = Arc::clone(&keyd);
    let serve = async move {
        tokio::join!(
            async move {
                if let Some(f) = bootstrap {
                    f.await;
                }
            },
            async move {
                if let Some(f) = policy_watch {
                    f.await;
                }
            },
            async move {
                if let Some(f) = cluster_pki {
                    f.await;
                }
            },
            keyd_mtls::server::serve_tls_router(
                api_listener,
                tls_rx,
                router,
                config.listener,
                move |outcome| {
                    metrics
                        .tls_handshakes
                        .get_or_create(&crate::telemetry::Outcome { outcome })
                        .inc();
                },
                wait(shutdown.clone())
            ),
            keyd_mtls::server::serve_plain(
                ops_listener,
                ops,
                config.listener,
                wait(shutdown.clone())
            ),
            scheduler_keyd.run_scheduler(config.scheduler_tick, shutdown),
            follow_keyd.follow_store(follow_stop),
        );
        // Its last record is written on shutdown; the store stays open until it is.
        let _ = custody_audit.await;
        if let Err(e) = final_keyd.flush_liveness().await {
            tracing::warn!(error = %e, "cannot write node liveness at shutdown");
        }
        // A signed checkpoint at shutdown covers every record written (the leader's to sign).
        if final_keyd.is_leader() {
            match final_keyd.checkpoint(false).await {
                Ok(Some(cp)) => {
                    tracing::info!(seq = cp.seq, "audit checkpoint signed at shutdown");
                }
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, "cannot sign the shutdown audit checkpoint"),
            }
        }
        // Last: another replica leads at once instead of waiting out the lease.
        if let Some(leader) = leader {
            leader.resign();
        }
    };
    tracing::info!(%api_addr, %ops_addr, store = keyd.describe_store(), "keyd is serving");
    Ok(Running {
        api_addr,
        ops_addr,
        bootstrap_addr,
        keyd,
        serve: Box::pin(serve),
    })
}

/// Exit status of a keyd that lost the leadership of its etcd store (EX_TEMPFAIL): its
/// supervisor restarts it, and it comes back as a standby.
pub const EXIT_DEPOSED: i32 = 75;

/// Held while this process leads an etcd store; dropping it resigns.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
struct Leader {
    #[cfg(feature = "etcd")]
    store: Arc<crate::store::etcd::EtcdStore>,
    /// Ends the process when leadership is lost; stopped first when keyd resigns.
    #[cfg(feature = "etcd")]
    watch_loss: tokio::task::JoinHandle<()>,
}

impl Drop for Leader {
    fn drop(&mut self) {
        #[cfg(feature = "etcd")]
        {
            self.watch_loss.abort();
            self.store.resign();
        }
    }
}

/// A replica's candidacy: the election running in the background, and the leadership once won.
#[cfg_attr(not(feature = "etcd"), allow(dead_code))]
struct Candidacy {
    election: tokio::task::JoinHandle<()>,
    held: Arc<std::sync::Mutex<Option<Leader>>>,
}

impl Candidacy {
    /// Stops standing, and gives up the leadership if this process holds it.
    fn resign(self) {
        self.election.abort();
        drop(self.held.lock().unwrap_or_else(|p| p.into_inner()).take());
    }
}

/// What only the leader does when it starts leading: close a KEK custodian outage the log
/// still shows open (a leader stopped during it; this one got here only because its custodian
/// answered), and finish a KEK migration that one left unfinished.
async fn take_over(keyd: &Arc<Keyd>) -> anyhow::Result<()> {
    if keyd
        .close_outage_left_open()
        .await
        .context("closing the KEK outage a restart left open")?
    {
        tracing::info!("closed a KEK custodian outage left open by the last run");
    }
    crate::rewrap::resume(
        Arc::clone(keyd.store()),
        Arc::clone(keyd.custody()),
        crate::rewrap::RunOptions {
            actor: keyd.system_actor("leader"),
            ..crate::rewrap::RunOptions::default()
        },
    )
    .await
    .context("resuming the KEK migration")?;
    Ok(())
}

/// Serving an etcd store: announces this replica (for `keyctl status`) and stands for leader in
/// the background. Every replica serves the API; the one that leads also runs the schedules,
/// rollouts and checkpoints (see [`Keyd::is_leader`]). Losing the leadership (the lease not
/// renewed in time, or a write refused by the fence) ends the process with [`EXIT_DEPOSED`]
/// before another can take over, so two never act as leader at once.
#[cfg(feature = "etcd")]
fn replicate(
    etcd: Arc<crate::store::etcd::EtcdStore>,
    config: &Config,
    api_addr: std::net::SocketAddr,
    keyd: Arc<Keyd>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> Candidacy {
    let crate::config::StoreConfig::Etcd(settings) = &config.store else {
        unreachable!("replicate is called for an etcd store only")
    };
    let name = keyd
        .replica_name()
        .expect("start names a replica on a shared store");
    etcd.announce(
        &keyd_proto::Replica {
            name: name.clone(),
            api: api_addr.to_string(),
            since: keyd.clock().now(),
            leader: false,
        },
        settings.lease_ttl,
    );
    let ttl = settings.lease_ttl;
    let held = Arc::new(std::sync::Mutex::new(None));
    let holding = Arc::clone(&held);
    let election = tokio::spawn(async move {
        let led = etcd
            .lead(
                &name,
                ttl,
                |h| tracing::info!(leader = h, "serving as a replica: another keyd leads"),
                shutdown,
            )
            .await;
        let leadership = match led {
            Ok(Some(l)) => l,
            Ok(None) => return,
            Err(e) => {
                tracing::error!(error = %keyd_mtls::error_chain(&e), "cannot stand for leader");
                std::process::exit(EXIT_DEPOSED);
            }
        };
        let mut lost = leadership.lost;
        let watch_loss = tokio::spawn(async move {
            if let Ok(reason) = lost.wait_for(Option::is_some).await {
                let reason = reason.clone().unwrap_or_default();
                tracing::error!(
                    reason,
                    "lost the leadership of the etcd store; exiting so that this process \
                     restarts as a replica"
                );
                std::process::exit(EXIT_DEPOSED);
            }
        });
        *holding.lock().unwrap_or_else(|p| p.into_inner()) = Some(Leader {
            store: etcd,
            watch_loss,
        });
        tracing::info!(holder = leadership.holder, "this keyd leads the etcd store");
        // The term opens in the audit log, before anything the leader does in it (fenced, as
        // every write of the leader): an auditor sees who led when.
        let elected = keyd
            .audit(crate::store::AuditEvent::new(
                "store.leader.elected",
                keyd.system_actor("leader"),
                serde_json::json!({ "replica": leadership.holder, "term": format!("{:x}", leadership.term) }),
            ))
            .await;
        if let Err(e) = elected {
            tracing::error!(error = %e, "cannot record the election; resigning");
            drop(holding.lock().unwrap_or_else(|p| p.into_inner()).take());
            std::process::exit(EXIT_DEPOSED);
        }
        if let Err(e) = take_over(&keyd).await {
            tracing::error!(error = %format!("{e:#}"), "cannot take over as leader; resigning");
            drop(holding.lock().unwrap_or_else(|p| p.into_inner()).take());
            std::process::exit(EXIT_DEPOSED);
        }
        keyd.set_leader(true);
    });
    Candidacy { election, held }
}

/// Opens the configured store. On etcd, connects (waiting as long as etcd cannot be reached,
/// with the ops port answering `/healthz`, and `/readyz` with 503) and returns the store to
/// replicate as well.
async fn open_store(
    config: &Config,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<(Arc<dyn Store>, Option<SharedStore>)> {
    let described = || {
        format!(
            "opening the store ({})",
            config.store.describe(&config.data_dir)
        )
    };
    match &config.store {
        #[cfg(feature = "etcd")]
        crate::config::StoreConfig::Etcd(settings) => {
            let (stop_standby, standby) = standby_ops(config.ops_listen).await?;
            // etcd may be down when keyd (re)starts: wait for it, not in a crash loop. Anything
            // else (a TLS file, a refused request) ends the start.
            let mut shutdown = shutdown;
            let etcd = loop {
                let settings = settings.clone();
                let connected = tokio::task::spawn_blocking(move || {
                    crate::store::etcd::EtcdStore::connect(&settings)
                })
                .await
                .context("connecting to etcd")?;
                match connected {
                    Ok(store) => break Arc::new(store),
                    Err(e) if e.is_unreachable() => {
                        tracing::warn!(
                            error = %keyd_mtls::error_chain(&e),
                            "etcd cannot be reached; waiting for it"
                        );
                        tokio::select! {
                            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
                            _ = shutdown.wait_for(|s| *s) => {
                                tracing::info!("stopped while waiting for etcd");
                                std::process::exit(0);
                            }
                        }
                    }
                    Err(e) => return Err(anyhow::Error::new(e).context(described())),
                }
            };
            let _ = stop_standby.send(true);
            let _ = standby.await;
            if etcd.copy_incomplete()? {
                anyhow::bail!(
                    "{}: a `keyd store copy` into this prefix did not finish; delete the prefix \
                     with etcdctl and copy again",
                    etcd.location()
                );
            }
            let store: Arc<dyn Store> = Arc::clone(&etcd) as Arc<dyn Store>;
            Ok((store, Some(etcd)))
        }
        other => {
            let _ = shutdown; // only a keyd waiting for etcd watches it here
            let store =
                crate::config::store::open(other, &config.data_dir).with_context(described)?;
            Ok((store, None))
        }
    }
}

/// An etcd store, which several keyd share.
#[cfg(feature = "etcd")]
type SharedStore = Arc<crate::store::etcd::EtcdStore>;
#[cfg(not(feature = "etcd"))]
type SharedStore = std::convert::Infallible;

/// This process in the leader key: the host (a pod's name) and the process id.
#[cfg(feature = "etcd")]
fn holder_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "unknown-host".to_owned());
    // A restarted container has the same host name and often the same pid: a random part
    // tells processes apart in logs and in /readyz.
    let mut nonce = [0u8; 4];
    let _ = getrandom::fill(&mut nonce);
    format!("{host}/{}/{}", std::process::id(), hex::encode(nonce))
}

/// The ops listener of a keyd waiting for etcd: alive, not ready.
#[cfg(feature = "etcd")]
async fn standby_ops(
    addr: std::net::SocketAddr,
) -> anyhow::Result<(
    tokio::sync::watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
)> {
    use axum::routing::get;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding ops_listen {addr}"))?;
    let router = axum::Router::new()
        .route("/healthz", get(|| async { "ok (waiting for etcd)\n" }))
        .route(
            "/readyz",
            get(|| async {
                (
                    http::StatusCode::SERVICE_UNAVAILABLE,
                    "not ready: waiting for etcd (no member answers)\n",
                )
            }),
        );
    let (tx, mut rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(keyd_mtls::server::serve_plain(
        listener,
        router,
        keyd_mtls::server::Limits::default(),
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        },
    ));
    Ok((tx, task))
}

/// The policy watcher's future when `[policy]` is configured (the config refuses the section in
/// a build without the `kube` feature).
#[cfg(feature = "kube")]
fn policy_watch(
    config: &Config,
    keyd: &Arc<Keyd>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>> {
    let Some(p) = &config.policy else {
        return Ok(None);
    };
    let fut = crate::policy_watch::start(Arc::clone(keyd), p, shutdown)
        .context("starting the policy watcher ([policy])")?;
    Ok(Some(Box::pin(fut)))
}

/// `[cluster_pki]`: the CA and keyd's own certificate now, then what keeps them and the
/// Secrets current (until `shutdown`).
#[cfg(feature = "kube")]
async fn cluster_pki(
    config: &Config,
    keyd: &Arc<Keyd>,
    shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>> {
    let Some(c) = &config.cluster_pki else {
        return Ok(None);
    };
    let keeper = crate::cluster_pki::prepare(c, keyd)
        .await
        .context("preparing keyd's certificates ([cluster_pki])")?;
    Ok(Some(Box::pin(keeper.run(shutdown))))
}

#[cfg(not(feature = "kube"))]
async fn cluster_pki(
    _config: &Config,
    _keyd: &Arc<Keyd>,
    _shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>> {
    Ok(None)
}

#[cfg(not(feature = "kube"))]
fn policy_watch(
    _config: &Config,
    _keyd: &Arc<Keyd>,
    _shutdown: tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<Option<std::pin::Pin<Box<dyn Future<Output = ()> + Send>>>> {
    Ok(None)
}

fn create_private_dir(dir: &Path) -> anyhow::Result<()> {
    crate::fsutil::create_private_dir(dir)
        .with_context(|| format!("creating data_dir {}", dir.display()))
}

/// What `keyd dev` prepared.
#[derive(Debug)]
pub struct DevSetup {
    pub data_dir: PathBuf,
    pub keyd_toml: PathBuf,
    pub keyctl_toml: PathBuf,
    pub pki: crate::pki::DevPki,
}

/// Node names that get demo certificates in `keyd dev`.
pub const DEV_NODES: [&str; 2] = ["node-a", "node-b"];

/// Creates (once) the dev PKI under `data_dir` and (re)writes `keyd.toml` and `keyctl.toml`
/// for the given addresses. Certificates, the KEK and the store are never overwritten.
pub fn prepare_dev(data_dir: &Path, listen: &str, ops_listen: &str) -> anyhow::Result<DevSetup> {
    create_private_dir(data_dir)?;
    let data_dir = data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", data_dir.display()))?;
    let listen_addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen:?} is not an address like 127.0.0.1:8443"))?;
    let mut names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    if !listen_addr.ip().is_unspecified() && !names.contains(&listen_addr.ip().to_string()) {
        names.push(listen_addr.ip().to_string());
    }
    let pki = crate::pki::ensure_dev_pki(&data_dir, &names, &DEV_NODES)?;
    let keyd_toml = data_dir.join("keyd.toml");
    let text = format!(
        "# Written by `keyd dev`; rewritten at every start.\n\
         data_dir = {dir:?}\nlisten = {listen:?}\nops_listen = {ops_listen:?}\n\n\
         [tls]\nca = {ca:?}\ncert = {cert:?}\nkey = {key:?}\n\n[kek]\nbackend = \"local\"\n\n[log]\nformat = \"text\"\n\n\
         # A trial on one machine: a node may claim any address and pod CIDR no other node holds.\n\
         # Production checks claims against Node objects or allocations (docs/configuration.md).\n\
         [nodes]\nclaims = \"open\"\n",
        dir = data_dir.display().to_string(),
        ca = pki.ca.display().to_string(),
        cert = pki.server.cert.display().to_string(),
        key = pki.server.key.display().to_string(),
    );
    std::fs::write(&keyd_toml, text).with_context(|| format!("writing {}", keyd_toml.display()))?;
    let connect_host = if listen_addr.ip().is_unspecified() {
        "127.0.0.1".to_owned()
    } else {
        listen_addr.ip().to_string()
    };
    let server = match listen_addr.ip() {
        std::net::IpAddr::V6(_) if connect_host != "127.0.0.1" => {
            format!("https://[{connect_host}]:{}", listen_addr.port())
        }
        _ => format!("https://{connect_host}:{}", listen_addr.port()),
    };
    let settings = keyd_mtls::client::ClientSettings {
        server,
        ca: pki.ca.clone(),
        cert: pki.admin.cert.clone(),
        key: pki.admin.key.clone(),
    };
    let keyctl_toml = data_dir.join("keyctl.toml");
    let text = format!(
        "# Written by `keyd dev`: keyctl --config {} status\n{}",
        keyctl_toml.display(),
        toml::to_string(&settings)?
    );
    std::fs::write(&keyctl_toml, text)
        .with_context(|| format!("writing {}", keyctl_toml.display()))?;
    Ok(DevSetup {
        data_dir,
        keyd_toml,
        keyctl_toml,
        pki,
    })
}

/// Audits the KEK custodian's outages and recoveries as they happen (and once more at shutdown).
fn spawn_custody_audit(
    keyd: Arc<Keyd>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let stopping = tokio::select! {
                () = keyd.custody().transition_pending() => false,
                _ = shutdown.wait_for(|s| *s) => true,
            };
            if let Err(e) = keyd.audit_custody_transitions().await {
                tracing::error!(error = %e, "cannot audit the KEK custodian's health change");
            }
            if stopping {
                return;
            }
        }
    })
}
