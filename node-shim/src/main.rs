//! `node-shim`: the per-node agent. Exit status: 0 stopped by a signal, 1 runtime failure,
//! 64 invalid configuration (the message names the field).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::Parser;
use keyd_mtls::tls::TlsPaths;
use keyd_node_shim::agent::{self, Agent};
use keyd_node_shim::bootstrap::{self, Bootstrapper};
use keyd_node_shim::config::{self, IdentitySource};
use keyd_node_shim::dataplane;
use keyd_node_shim::kernel::netlink::NetlinkKernel;
use keyd_node_shim::keyd_client::KeydClient;
use keyd_node_shim::status::{self, Shared};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{mpsc, watch};

/// Fetches this node's keys from keyd over mTLS and programs WireGuard or IPsec (XFRM).
///
/// SIGTERM / SIGINT stop it without touching the kernel (the next start adopts what is there);
/// SIGUSR1 rotates the WireGuard keypair.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// The TOML configuration file (NODE_SHIM_* variables override it).
    #[arg(long, env = "NODE_SHIM_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let env: HashMap<String, String> = std::env::vars().collect();
    let cfg = match config::load(args.config.as_deref(), &env) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("node-shim: invalid configuration: {e}");
            return ExitCode::from(keyd_mtls::EXIT_CONFIG);
        }
    };
    if args.check {
        println!("configuration is valid");
        return ExitCode::SUCCESS;
    }
    keyd_mtls::ops::init_logging(
        if cfg.log_json {
            keyd_mtls::ops::LogFormat::Json
        } else {
            keyd_mtls::ops::LogFormat::Text
        },
        &cfg.log_level,
    );
    keyd_mtls::tls::install_default_provider();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("node-shim: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "node-shim failed");
            eprintln!("node-shim: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: config::Config) -> anyhow::Result<()> {
    let facts = agent::facts(&cfg).context("reading this node's facts")?;
    let (stop_tx, stop_rx) = watch::channel(false);

    let paths = match &cfg.keyd.identity {
        IdentitySource::Static { cert, key } => TlsPaths {
            ca: cfg.keyd.ca.clone(),
            cert: cert.clone(),
            key: key.clone(),
        },
        IdentitySource::Bootstrap {
            server,
            token_path,
            cert_dir,
        } => {
            let b = Bootstrapper {
                server: server.clone(),
                ca: cfg.keyd.ca.clone(),
                token_path: token_path.clone(),
                cert_dir: cert_dir.clone(),
                node: cfg.node_name.clone(),
            };
            let mut attempt = 0;
            let existing = b.existing();
            if let Some(i) = &existing {
                tracing::info!(not_after = %i.not_after, "starting on the node certificate already in cert_dir");
            }
            let issued = loop {
                if let Some(i) = existing {
                    break i;
                }
                match b.obtain().await {
                    Ok(i) => break i,
                    Err(e) => {
                        let wait = agent::backoff(
                            cfg.backoff_initial,
                            cfg.backoff_max,
                            attempt,
                            agent::random_unit(),
                        );
                        attempt += 1;
                        tracing::warn!(error = %keyd_mtls::error_chain(&e), retry_in = ?wait, "bootstrap failed");
                        tokio::time::sleep(wait).await;
                    }
                }
            };
            tracing::info!(not_after = %issued.not_after, "node certificate obtained");
            tokio::spawn(b.renew_loop(issued, Duration::from_secs(30), stop_rx.clone()));
            bootstrap::paths(cert_dir, &cfg.keyd.ca)
        }
    };

    let kernel = NetlinkKernel::open(&cfg).context("opening the kernel interfaces")?;
    let shared = Shared::default();
    let wg_impl = kernel.wg_impl().map(|w| w.as_str().to_owned());
    if let Some(i) = &wg_impl {
        tracing::info!(implementation = %i, device = %cfg.wireguard.device, "WireGuard");
    }
    shared.update(|s| s.wireguard_impl = wg_impl);

    if let Some(addr) = cfg.ops_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding ops_listen {addr}"))?;
        let mut rx = stop_rx.clone();
        tokio::spawn(keyd_mtls::server::serve_plain(
            listener,
            status::ops_router(shared.clone()),
            keyd_mtls::server::Limits::default(),
            async move {
                let _ = rx.changed().await;
            },
        ));
    }

    // The eBPF data plane, when [steering] names the devices pods send on. It starts before the
    // agent so that the first reconcile's peers reach a program that is already attached.
    let mut dataplane_task = None;
    if cfg.steering.enabled() {
        let dp = dataplane::Dataplane::start(&cfg, shared.clone())
            .context("starting the eBPF data plane (steering)")?;
        let (rules_tx, rules_rx) = tokio::sync::watch::channel(None);
        if cfg.steering.encrypt == config::Encrypt::Policy {
            let rules_client = KeydClient::new(&cfg.keyd.server, &cfg.node_name, paths.clone());
            tokio::spawn(dataplane::fetch_rules(
                rules_client,
                rules_tx,
                shared.clone(),
                cfg.long_poll.unwrap_or(Duration::from_secs(30)),
                stop_rx.clone(),
            ));
        }
        let reporter = KeydClient::new(&cfg.keyd.server, &cfg.node_name, paths.clone());
        dataplane_task = Some(tokio::spawn(dp.run(
            rules_rx,
            stop_rx.clone(),
            Some(reporter),
        )));
    }

    let client = KeydClient::new(&cfg.keyd.server, &cfg.node_name, paths);
    let agent =
        Agent::start(cfg, facts, kernel, client, shared).context("adopting the kernel's state")?;

    let (rotate_tx, rotate_rx) = mpsc::channel(1);
    let mut term = signal(SignalKind::terminate()).context("installing SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing SIGINT handler")?;
    let mut usr1 = signal(SignalKind::user_defined1()).context("installing SIGUSR1 handler")?;
    let agent_task = tokio::spawn(agent.run(stop_rx, rotate_rx));
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = usr1.recv() => {
                tracing::info!("SIGUSR1: rotating the WireGuard keypair");
                let _ = rotate_tx.try_send(());
            }
        }
    }
    let _ = stop_tx.send(true);
    let _ = agent_task.await;
    if let Some(t) = dataplane_task {
        let _ = t.await;
    }
    Ok(())
}
