//! `keyd-webhook`: the validating admission webhook (`serve`), the audit of running pods
//! (`scan`), and the ValidatingWebhookConfiguration for a given config (`webhook-config`).
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use keyd_proto::{EnforcementStatus, ModeStatus, Timestamp};
use keyd_webhook::config::{Config, EXIT_CONFIG, Flags, LogFormat};
use keyd_webhook::crd::{ClusterEncryptionPolicy, EncryptionPolicy};
use keyd_webhook::decision::{DecisionConfig, KeydView};
use keyd_webhook::manifests::{self, Endpoint};
use keyd_webhook::policy::PolicySet;
use keyd_webhook::scan::{LivePod, scan};
use keyd_webhook::workload::Workload;
use kube::api::{Api, ListParams};

#[derive(Debug, Parser)]
#[command(
    name = "keyd-webhook",
    version,
    about = "Admission webhook: sensitive pods are admitted only under an encryption policy"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve the webhook. Kubernetes access comes from the in-cluster service account or
    /// KUBECONFIG. Invalid configuration exits with status 64 naming the field.
    Serve {
        #[arg(long)]
        config: PathBuf,
        #[arg(long)]
        listen: Option<String>,
        #[arg(long)]
        ops_listen: Option<String>,
        #[arg(long)]
        log_level: Option<String>,
        #[arg(long)]
        log_format: Option<String>,
    },
    /// List running sensitive pods that no policy covers (exit 1 with --fail if any).
    ///
    /// With --config, sensitivity settings come from the webhook's config and keyd is asked
    /// whether each policy's mode is ready; without it (or with --offline), the defaults apply
    /// and only policy selection is checked.
    Scan {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        offline: bool,
        #[arg(long, short = 'o', value_enum, default_value_t = Output::Text)]
        output: Output,
        #[arg(long)]
        fail: bool,
    },
    /// Print the ValidatingWebhookConfiguration (YAML) matching a config's sensitivity labels
    /// and exempt namespaces.
    WebhookConfig {
        #[arg(long)]
        config: Option<PathBuf>,
        /// `https://HOST:PORT` where the API server reaches the webhook.
        #[arg(long, conflicts_with = "service")]
        url: Option<String>,
        /// `NAMESPACE/NAME[:PORT]` of the webhook's Service (default keyd/keyd-webhook:443).
        #[arg(long)]
        service: Option<String>,
        /// PEM file of the CA that signed the serving certificate.
        #[arg(long)]
        ca_bundle: Option<PathBuf>,
        #[arg(long, default_value = manifests::WEBHOOK_CONFIGURATION_NAME)]
        name: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyd-webhook: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Serve {
            config,
            listen,
            ops_listen,
            log_level,
            log_format,
        } => {
            let flags = Flags {
                listen,
                ops_listen,
                log_level,
                log_format,
            };
            let config = match read_config(&config, &flags) {
                Ok(c) => c,
                Err(code) => return code,
            };
            keyd_webhook::init_logging(config.log_format, &config.log_level);
            runtime.block_on(serve(config))
        }
        Command::Scan {
            config,
            offline,
            output,
            fail,
        } => {
            let config = match config
                .map(|p| read_config(&p, &Flags::default()))
                .transpose()
            {
                Ok(c) => c,
                Err(code) => return code,
            };
            keyd_webhook::init_logging(LogFormat::Text, "warn");
            runtime.block_on(async {
                match run_scan(config, offline, output).await {
                    Ok(0) => ExitCode::SUCCESS,
                    Ok(_) if fail => ExitCode::FAILURE,
                    Ok(_) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("keyd-webhook scan: {e:#}");
                        ExitCode::FAILURE
                    }
                }
            })
        }
        Command::WebhookConfig {
            config,
            url,
            service,
            ca_bundle,
            name,
        } => {
            let decision = match config
                .map(|p| read_config(&p, &Flags::default()))
                .transpose()
            {
                Ok(c) => c.map(|c| c.decision).unwrap_or_default(),
                Err(code) => return code,
            };
            match webhook_config(&decision, url, service, ca_bundle, &name) {
                Ok(yaml) => {
                    print!("{yaml}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("keyd-webhook webhook-config: {e:#}");
                    ExitCode::from(EXIT_CONFIG)
                }
            }
        }
    }
}

fn read_config(path: &std::path::Path, flags: &Flags) -> Result<Config, ExitCode> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("keyd-webhook: cannot read {}: {e}", path.display());
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    Config::parse(&text, flags).map_err(|e| {
        eprintln!("keyd-webhook: {}: {e}", path.display());
        ExitCode::from(EXIT_CONFIG)
    })
}

async fn serve(config: Config) -> ExitCode {
    let client = match kube::Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %keyd_webhook::ErrorChain(&e), "no Kubernetes client configuration");
            eprintln!("keyd-webhook: no Kubernetes client configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let running = match keyd_webhook::app::start(config, client, stop_rx).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %keyd_webhook::ErrorChain(&e), "keyd-webhook cannot start");
            eprintln!("keyd-webhook: {}", keyd_webhook::ErrorChain(&e));
            return ExitCode::FAILURE;
        }
    };
    let serving = tokio::spawn(running.serve());
    wait_for_signal().await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = serving.await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

async fn run_scan(config: Option<Config>, offline: bool, output: Output) -> anyhow::Result<usize> {
    keyd_webhook::tls::install_default_provider();
    let client = kube::Client::try_default()
        .await
        .context("no Kubernetes client configuration")?;
    let decision = config
        .as_ref()
        .map(|c| c.decision.clone())
        .unwrap_or_default();
    let keyd = match (&config, offline) {
        (Some(c), false) => {
            let tls = keyd_webhook::tls::client_config(&c.keyd.tls)?;
            let k = keyd_webhook::keyd::KeydClient::new(&c.keyd.url, tls, c.keyd.timeout)?;
            match k.enforcement().await {
                Ok(s) => KeydView::Known(Arc::new(s)),
                Err(e) => KeydView::Unknown(keyd_webhook::ErrorChain(&e).to_string().into()),
            }
        }
        _ => {
            eprintln!("note: keyd not consulted; only policy selection is checked");
            let ready = ModeStatus {
                active: true,
                within_schedule: true,
                reason: None,
            };
            KeydView::Known(Arc::new(EnforcementStatus {
                at: Timestamp::now(),
                ipsec: ready.clone(),
                wireguard: ready,
                rejected_policies: Vec::new(),
                rules_pending: false,
            }))
        }
    };
    let namespaces: HashMap<String, _> = Api::<Namespace>::all(client.clone())
        .list_metadata(&ListParams::default())
        .await
        .context("listing namespaces")?
        .items
        .into_iter()
        .map(|n| {
            (
                n.metadata.name.unwrap_or_default(),
                n.metadata.labels.unwrap_or_default(),
            )
        })
        .collect();
    let namespaced = Api::<EncryptionPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing EncryptionPolicies (are the CRDs installed?)")?;
    let cluster = Api::<ClusterEncryptionPolicy>::all(client.clone())
        .list(&ListParams::default())
        .await
        .context("listing ClusterEncryptionPolicies")?;
    let policies = PolicySet::from_resources(&namespaced.items, &cluster.items);
    let pods: Vec<LivePod> = keyd_webhook::status::list_live_pods(&client)
        .await
        .context("listing pods")?
        .into_iter()
        .map(|p: kube::api::PartialObjectMeta<Pod>| LivePod {
            namespace: p.metadata.namespace.unwrap_or_default(),
            pod: Workload::pod(
                &p.metadata.name.unwrap_or_default(),
                p.metadata.labels.unwrap_or_default(),
                p.metadata.annotations.unwrap_or_default(),
            ),
        })
        .collect();
    let findings = scan(&pods, &namespaces, &policies, &keyd, &decision);
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(&findings)?),
        Output::Text => {
            if findings.is_empty() {
                println!(
                    "every running sensitive pod is covered ({} pods checked)",
                    pods.len()
                );
            } else {
                println!("POD\tREASON\tDETAIL");
                for f in &findings {
                    println!("{f}");
                }
            }
        }
    }
    Ok(findings.len())
}

fn webhook_config(
    decision: &DecisionConfig,
    url: Option<String>,
    service: Option<String>,
    ca_bundle: Option<PathBuf>,
    name: &str,
) -> anyhow::Result<String> {
    let endpoint = match (url, service) {
        (Some(u), _) => Endpoint::Url(u),
        (None, s) => {
            let s = s.unwrap_or_else(|| "keyd/keyd-webhook".into());
            let (ns, rest) = s
                .split_once('/')
                .with_context(|| format!("--service {s:?} is not NAMESPACE/NAME[:PORT]"))?;
            let (name, port) = match rest.split_once(':') {
                Some((n, p)) => (n, p.parse().with_context(|| format!("port in {s:?}"))?),
                None => (rest, 443),
            };
            Endpoint::Service {
                namespace: ns.into(),
                name: name.into(),
                port,
            }
        }
    };
    let ca = ca_bundle
        .map(|p| std::fs::read(&p).with_context(|| format!("reading {}", p.display())))
        .transpose()?;
    let cfg = manifests::webhook_configuration(decision, &endpoint, ca.as_deref(), name);
    Ok(serde_norway::to_string(&cfg)?)
}
