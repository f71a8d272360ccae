//! `keyctl`: the command-line client for keyd's admin API.
//!
//! Exit codes, for scripts: 0 success; 1 keyd failed (5xx) or another error; 2 usage error;
//! 3 keyd unreachable or the TLS handshake failed; 4 refused (403: wrong certificate);
//! 5 not found; 6 the request was invalid (keyd said what was wrong); 7 `report` found something
//! overdue, or `audit verify` found the file tampered with; 64 bad client config.
#![forbid(unsafe_code)]

mod audit;
mod evidence;
mod http;
mod ipsec;
mod kek;
mod schedule;
mod status;
mod table;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use keyd_mtls::client::ClientSettings;
use keyd_mtls::tls::install_default_provider;

const EXIT_SERVER: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_FORBIDDEN: u8 = 4;
const EXIT_NOT_FOUND: u8 = 5;
const EXIT_INVALID: u8 = 6;
const EXIT_FINDING: u8 = 7;
const EXIT_USAGE: u8 = 2;
use keyd_mtls::EXIT_CONFIG;

#[derive(Debug, Parser)]
#[command(name = "keyctl", version, about = "Command-line client for keyd")]
struct Cli {
    /// keyctl.toml with server, ca, cert and key (`keyd dev` writes DIR/keyctl.toml).
    /// Default: $KEYCTL_CONFIG, else ./keyd-dev/keyctl.toml.
    #[arg(long, global = true, env = "KEYCTL_CONFIG")]
    config: Option<PathBuf>,
    /// Override the server URL, e.g. https://127.0.0.1:8443.
    #[arg(long, global = true)]
    server: Option<String>,
    /// Override the CA certificate that keyd's certificate must chain to.
    #[arg(long, global = true)]
    ca: Option<PathBuf>,
    /// Override the client (admin) certificate.
    #[arg(long, global = true)]
    cert: Option<PathBuf>,
    /// Override the client certificate's private key.
    #[arg(long, global = true)]
    key: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// `-o table|json`, on every command that prints a result.
#[derive(Debug, Clone, Copy, clap::Args)]
struct Out {
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table)]
    output: Output,
}

impl Out {
    fn json(self) -> bool {
        self.output == Output::Json
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// keyd's version, store, KEK custodian and key summary.
    Status(Out),
    /// Registered nodes and what each acknowledged; `remove NAME`, `readmit NAME`.
    Nodes {
        #[command(subcommand)]
        cmd: Option<status::NodesCommand>,
        #[command(flatten)]
        out: Out,
    },
    /// A node's compiled data-plane rules (keyd with `[policy]`): its policies and endpoints.
    Rules {
        node: String,
        #[command(flatten)]
        out: Out,
    },
    /// IPsec PSKs in Cilium's format.
    #[command(subcommand)]
    Ipsec(ipsec::IpsecCommand),
    /// The IPsec rollout in progress: `skip NODE` stops waiting for a node.
    #[command(subcommand)]
    Rollout(ipsec::RolloutCommand),
    /// Rotation schedules per key class: ipsec, wireguard-node-keys, wireguard-psk, kek.
    #[command(subcommand)]
    Schedule(schedule::ScheduleCommand),
    /// Rotate a key class now (ipsec, wireguard-node-keys, wireguard-psk, kek).
    Rotate {
        class: String,
        #[command(flatten)]
        out: Out,
    },
    /// Per key class: last rotation, next due, oldest key in use, within schedule and bounds.
    /// Exits 7 when anything is overdue, so it can gate a cron job or a pipeline. With
    /// `--format html|pdf|json -o FILE`: the signed evidence report over a period, for an
    /// auditor (FILE and FILE.sig; exits 7 when the period was not compliant).
    Report(ReportArgs),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
    /// The key-encryption key: custodian health, rotation, migration between custodians.
    Kek(KekArgs),
}

#[derive(Debug, clap::Args)]
struct ReportArgs {
    /// Without --format: `table` or `json`. With --format: the file to write the report to
    /// (its signature goes to FILE.sig).
    #[arg(short = 'o', long = "output", default_value = "table")]
    output: String,
    /// The evidence report: `html` (one self-contained page), `pdf` (printed by keyd with
    /// headless Chromium) or `json` (the same numbers, for machines).
    #[arg(long)]
    format: Option<String>,
    /// Start of the period (RFC 3339); default: the audit log's first record.
    #[arg(long, requires = "format")]
    since: Option<String>,
    /// End of the period (RFC 3339); default: now.
    #[arg(long, requires = "format")]
    until: Option<String>,
    /// Where to write the detached signature (default: FILE.sig).
    #[arg(long, requires = "format")]
    signature: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct KekArgs {
    #[command(subcommand)]
    cmd: kek::KekCommand,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

/// A failure with the exit code it maps to.
struct Failure {
    code: u8,
    message: String,
}

fn fail(code: u8, message: impl Into<String>) -> Failure {
    Failure {
        code,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyctl: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("keyctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // Offline: needs no server.
    if let Command::Audit(audit::AuditCommand::Verify {
        file,
        public_key,
        out,
    }) = &cli.command
    {
        return audit::verify(file, public_key.as_deref(), *out);
    }
    if let Command::Audit(audit::AuditCommand::VerifyReport {
        file,
        signature,
        public_key,
    }) = &cli.command
    {
        return evidence::verify(file, signature.as_deref(), public_key.as_deref());
    }
    if let Command::Report(r) = &cli.command
        && r.format.is_some()
        && r.output == "table"
    {
        return Err(fail(
            EXIT_USAGE,
            "--format writes the evidence report to a file: give -o FILE",
        ));
    }
    if let Command::Report(r) = &cli.command
        && r.format.is_none()
        && !matches!(r.output.as_str(), "table" | "json")
    {
        return Err(fail(
            EXIT_USAGE,
            format!(
                "-o {:?}: without --format, -o is `table` or `json`; for the evidence report \
                 give --format html|pdf|json -o FILE",
                r.output
            ),
        ));
    }
    install_default_provider();
    let settings = settings(&cli)?;
    let mut conn = http::connect(&settings).await?;
    match cli.command {
        Command::Status(out) => status::status(&mut conn, out).await,
        Command::Nodes { cmd: None, out } => status::nodes(&mut conn, out).await,
        Command::Nodes { cmd: Some(cmd), .. } => status::nodes_command(&mut conn, cmd).await,
        Command::Rules { node, out } => status::rules(&mut conn, &node, out).await,
        Command::Ipsec(cmd) => ipsec::run(&mut conn, cmd).await,
        Command::Rollout(cmd) => ipsec::run_rollout(&mut conn, cmd).await,
        Command::Schedule(cmd) => schedule::run(&mut conn, cmd).await,
        Command::Rotate { class, out } => schedule::rotate(&mut conn, &class, out).await,
        Command::Report(r) => match &r.format {
            None => {
                let output = if r.output == "json" {
                    Output::Json
                } else {
                    Output::Table
                };
                status::report(&mut conn, Out { output }).await
            }
            Some(format) => {
                evidence::fetch(
                    &mut conn,
                    format,
                    r.since.as_deref(),
                    r.until.as_deref(),
                    std::path::Path::new(&r.output),
                    r.signature.as_deref(),
                )
                .await
            }
        },
        Command::Audit(cmd) => audit::run(&mut conn, cmd).await,
        Command::Kek(k) => kek::run(&mut conn, k.output == Output::Json, k.cmd).await,
    }
}

fn settings(cli: &Cli) -> Result<ClientSettings, Failure> {
    let path = cli.config.clone().or_else(|| {
        let dev = PathBuf::from("keyd-dev/keyctl.toml");
        dev.exists().then_some(dev)
    });
    let mut s = match &path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| {
                fail(
                    EXIT_CONFIG,
                    format!("cannot read config {}: {e}", p.display()),
                )
            })?;
            toml::from_str::<ClientSettings>(&text).map_err(|e| {
                fail(
                    EXIT_CONFIG,
                    format!("config {}: {}", p.display(), e.message()),
                )
            })?
        }
        None => match (&cli.server, &cli.ca, &cli.cert, &cli.key) {
            (Some(server), Some(ca), Some(cert), Some(key)) => ClientSettings {
                server: server.clone(),
                ca: ca.clone(),
                cert: cert.clone(),
                key: key.clone(),
            },
            _ => {
                return Err(fail(
                    EXIT_CONFIG,
                    "no keyctl config: pass --config FILE or set KEYCTL_CONFIG (`keyd dev` writes \
                     DIR/keyctl.toml), or give all of --server, --ca, --cert and --key",
                ));
            }
        },
    };
    if let Some(v) = &cli.server {
        s.server = v.clone();
    }
    if let Some(v) = &cli.ca {
        s.ca = v.clone();
    }
    if let Some(v) = &cli.cert {
        s.cert = v.clone();
    }
    if let Some(v) = &cli.key {
        s.key = v.clone();
    }
    Ok(s)
}
