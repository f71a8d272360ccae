//! `keyd`: the key service. `keyd serve --config FILE` in production, `keyd dev` to try it.
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use keyd::config::{self, EXIT_CONFIG, Flags};

#[derive(Debug, Parser)]
#[command(
    name = "keyd",
    version,
    about = "Encryption key management for Kubernetes pod-to-pod traffic"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve with a configuration file (then KEYD_* environment variables, then these flags).
    ///
    /// Environment variables: KEYD_DATA_DIR, KEYD_LISTEN, KEYD_OPS_LISTEN, KEYD_TLS_CA,
    /// KEYD_TLS_CERT, KEYD_TLS_KEY, KEYD_TLS_RELOAD_INTERVAL, KEYD_KEK_BACKEND,
    /// KEYD_KEK_LOCAL_PATH, KEYD_MAX_BODY_BYTES, KEYD_HANDSHAKE_TIMEOUT, KEYD_LOG_FORMAT,
    /// KEYD_LOG_LEVEL, and the KEYD_KEK_* variables of the custodian (KEYD_KEK_AWS_*,
    /// KEYD_KEK_VAULT_*, KEYD_KEK_MAX_UNAVAILABLE, ...; see docs/custody.md).
    /// Invalid configuration exits with status 64 naming the field. Before it listens, keyd
    /// checks its KEK custodian with a wrap and unwrap round trip and opens every sealed record.
    Serve {
        #[arg(long)]
        config: PathBuf,
        #[command(flatten)]
        overrides: Overrides,
    },
    /// Run on the embedded default with no external service: creates (once) a dev CA, server,
    /// admin and two demo node certificates and a local KEK under --data-dir, writes
    /// keyd.toml and keyctl.toml there, and serves until Ctrl-C. Restarting keeps all state.
    Dev {
        #[arg(long, default_value = "keyd-dev")]
        data_dir: PathBuf,
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: String,
        #[arg(long, default_value = "127.0.0.1:9443")]
        ops_listen: String,
    },
    /// Work on a store offline.
    Store {
        #[command(subcommand)]
        command: StoreCommand,
    },
}

#[derive(Debug, Subcommand)]
enum StoreCommand {
    /// Copy a redb store into the empty etcd prefix that --config's [store] names (keyd
    /// stopped). Before writing, every sealed record of the source must open (with the
    /// configuration's [kek]) and its audit chain must verify; afterwards every entry is read
    /// back from etcd and compared, and every record is opened from etcd. Refuses a target that
    /// holds any key. Prints the report as JSON; exits 1 on any failure.
    Copy {
        /// keyd's configuration: [store] names the etcd target, [kek] the custodian.
        #[arg(long)]
        config: PathBuf,
        /// The redb file to copy (DATA_DIR/keyd.redb).
        #[arg(long)]
        from: PathBuf,
    },
}

#[derive(Debug, clap::Args)]
struct Overrides {
    #[arg(long)]
    data_dir: Option<PathBuf>,
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    ops_listen: Option<String>,
    #[arg(long)]
    log_level: Option<String>,
    #[arg(long)]
    log_format: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let env: HashMap<String, String> = std::env::vars()
        .filter(|(k, _)| k.starts_with("KEYD_"))
        .collect();
    let (config, dev) = match cli.command {
        Command::Store {
            command: StoreCommand::Copy { config, from },
        } => {
            return match config::load(Some(&config), &env, &Flags::default()) {
                Ok(c) => store_copy(c, &from),
                Err(e) => config_error(&e),
            };
        }
        Command::Serve {
            config,
            overrides: o,
        } => {
            let flags = Flags {
                data_dir: o.data_dir,
                listen: o.listen,
                ops_listen: o.ops_listen,
                log_level: o.log_level,
                log_format: o.log_format,
            };
            match config::load(Some(&config), &env, &flags) {
                Ok(c) => (c, None),
                Err(e) => return config_error(&e),
            }
        }
        Command::Dev {
            data_dir,
            listen,
            ops_listen,
        } => {
            let setup = match keyd::app::prepare_dev(&data_dir, &listen, &ops_listen) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("keyd dev: {e:#}");
                    return ExitCode::from(EXIT_CONFIG);
                }
            };
            match config::load(Some(&setup.keyd_toml), &env, &Flags::default()) {
                Ok(c) => (c, Some(setup)),
                Err(e) => return config_error(&e),
            }
        }
    };
    keyd_mtls::ops::init_logging(config.log_format, &config.log_level);
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    runtime.block_on(async move {
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let running = match keyd::app::start(config, stop_rx).await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "keyd cannot start");
                eprintln!("keyd: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        if let Some(setup) = dev {
            print_next_steps(&setup, &running);
        }
        tokio::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutting down");
            let _ = stop_tx.send(true);
        });
        running.serve().await;
        ExitCode::SUCCESS
    })
}

#[cfg(feature = "etcd")]
fn store_copy(config: config::Config, from: &std::path::Path) -> ExitCode {
    keyd_mtls::ops::init_logging(config.log_format, &config.log_level);
    keyd_mtls::tls::install_default_provider();
    let runtime = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    match runtime.block_on(keyd::store_copy::copy(&config, from)) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("keyd store copy: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Without the etcd feature the configuration already refuses an etcd target.
#[cfg(not(feature = "etcd"))]
fn store_copy(_config: config::Config, _from: &std::path::Path) -> ExitCode {
    eprintln!(
        "keyd store copy: the target must be etcd, and this keyd was built without it \
         (--features etcd)"
    );
    ExitCode::from(EXIT_CONFIG)
}

/// keyd's multi-thread runtime, or the exit code after saying why there is none.
fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("keyd: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

fn config_error(e: &config::ConfigError) -> ExitCode {
    eprintln!("keyd: invalid configuration: {e}");
    ExitCode::from(EXIT_CONFIG)
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
}

fn print_next_steps(setup: &keyd::app::DevSetup, running: &keyd::app::Running) {
    let cfg = setup.keyctl_toml.display();
    println!(
        "\nkeyd dev is serving mTLS on https://{api} (ops: http://{ops}/metrics)\n\
         data, KEK and certificates: {dir}\n\n\
         Next, in another terminal:\n  \
         export KEYCTL_CONFIG={cfg}\n  \
         cargo run -q -p keyd --bin keyctl -- status\n  \
         cargo run -q -p keyd --bin keyctl -- ipsec rotate\n  \
         cargo run -q -p keyd --bin keyctl -- ipsec cilium-secret\n\n\
         Demo node certificates: {nodes}\nPress Ctrl-C to stop; state is kept for the next start.\n",
        api = running.api_addr,
        ops = running.ops_addr,
        dir = setup.data_dir.display(),
        nodes = setup
            .pki
            .nodes
            .iter()
            .map(|(n, p)| format!("{n} ({})", p.cert.display()))
            .collect::<Vec<_>>()
            .join(", "),
    );
}
