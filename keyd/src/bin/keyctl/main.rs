//! `keyctl`: the command-line client for keyd's admin API.
//!
//! Exit codes, for scripts: 0 success; 1 keyd failed (5xx) or another error; 2 usage error;
//! 3 keyd unreachable or the TLS handshake failed; 4 refused (403: wrong certificate);
//! 5 not found; 6 the request was invalid (keyd said what was wrong); 7 `report` found something
//! overdue, or `audit verify` found the file tampered with; 64 bad client config.
#![forbid(unsafe_code)]

#[path = "keyctl/kek.rs"]
mod kek;

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use http::StatusCode;
use keyd::client::{ClientSettings, Connection, Connector, Response};
use keyd_proto::{
    Bounds, ClassSchedule, ImportRequest, IpsecStatus, KeySpec, MaintenanceWindow, NodeInfo,
    Report, RotateRequest, ScheduleUpdate, SecretString, Status,
};
use zeroize::Zeroizing;

const EXIT_SERVER: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_FORBIDDEN: u8 = 4;
const EXIT_NOT_FOUND: u8 = 5;
const EXIT_INVALID: u8 = 6;
const EXIT_FINDING: u8 = 7;
const EXIT_CONFIG: u8 = 64;

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
    /// Registered nodes and what each acknowledged.
    Nodes(Out),
    /// IPsec PSKs in Cilium's format.
    #[command(subcommand)]
    Ipsec(IpsecCommand),
    /// Rotation schedules per key class: ipsec, wireguard-node-keys, wireguard-psk, kek.
    #[command(subcommand)]
    Schedule(ScheduleCommand),
    /// Rotate a key class now (ipsec, wireguard-node-keys, wireguard-psk, kek).
    Rotate {
        class: String,
        #[command(flatten)]
        out: Out,
    },
    /// Per key class: last rotation, next due, oldest key in use, within schedule and bounds.
    /// Exits 7 when anything is overdue, so it can gate a cron job or a pipeline.
    Report(Out),
    /// The tamper-evident audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The key-encryption key: custodian health, rotation, migration between custodians.
    Kek(KekArgs),
}

#[derive(Debug, clap::Args)]
struct KekArgs {
    #[command(subcommand)]
    cmd: kek::KekCommand,
    /// Output format.
    #[arg(short = 'o', long = "output", value_enum, default_value_t = Output::Table, global = true)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum ScheduleCommand {
    /// Show the schedule and bounds of one class, or of all.
    Get {
        class: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// Change a schedule; options left out keep their value.
    Set {
        class: String,
        /// Time between rotations, e.g. 7d, 12h.
        #[arg(long)]
        period: Option<String>,
        /// How long the old key stays accepted after the switch, e.g. 5m.
        #[arg(long)]
        overlap: Option<String>,
        /// Maintenance window (UTC) inside which rotations start: "HH-HH" or "mon,wed HH-HH".
        #[arg(long, conflicts_with = "no_window")]
        window: Option<String>,
        /// Remove the maintenance window.
        #[arg(long)]
        no_window: bool,
        #[command(flatten)]
        out: Out,
    },
    /// Stop scheduled rotations of a class (manual `keyctl rotate` still works).
    Pause {
        class: String,
        #[command(flatten)]
        out: Out,
    },
    /// Resume scheduled rotations of a class.
    Resume {
        class: String,
        #[command(flatten)]
        out: Out,
    },
    /// Set compliance bounds on a class's period; schedules outside them are refused.
    Bounds {
        class: String,
        #[arg(long)]
        min: Option<String>,
        #[arg(long)]
        max: Option<String>,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Stream the log (or part of it) from keyd to a file or standard output.
    Export {
        /// Records at or after this time (RFC 3339, e.g. 2026-11-01T00:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Records at or before this time.
        #[arg(long)]
        until: Option<String>,
        /// First record number (e.g. a segment's first).
        #[arg(long)]
        from_seq: Option<u64>,
        /// Last record number.
        #[arg(long)]
        to_seq: Option<u64>,
        /// jsonl (verifiable with `keyctl audit verify`), ocsf or cef.
        #[arg(long, default_value = "jsonl")]
        format: String,
        /// Write here instead of standard output.
        #[arg(short = 'o', long = "output")]
        output: Option<PathBuf>,
    },
    /// Check an exported jsonl file offline: every record's hash, the chain, the order and the
    /// signed checkpoints. Exits 7 naming the first bad record.
    Verify {
        file: PathBuf,
        /// The checkpoint signing key to trust (base64, from `keyctl audit public-key`), or a file
        /// holding it. Without it the key in the file is used, which proves consistency only.
        #[arg(long)]
        public_key: Option<String>,
        #[command(flatten)]
        out: Out,
    },
    /// The checkpoint signing public key: keep a copy outside keyd.
    PublicKey(Out),
    /// The log's segments; closed ones can be exported and pruned.
    Segments(Out),
    /// Delete a closed, exported segment and everything before it.
    Prune {
        /// The segment's last record number.
        #[arg(long)]
        through: u64,
        /// That record's hash, from your export (proves you hold the exported copy).
        #[arg(long)]
        hash: String,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Debug, Subcommand)]
enum IpsecCommand {
    /// The current and previous keys (IDs, algorithm, age; never key bytes), and any rollout.
    Show(Out),
    /// Generate the next key now (the first one if none exists); later keys roll out staged ->
    /// active -> retired as nodes acknowledge them.
    Rotate {
        /// Only for the first key; later rotations keep the algorithm, as Cilium requires.
        #[arg(long, value_enum)]
        algorithm: Option<Algorithm>,
        #[command(flatten)]
        out: Out,
    },
    /// Import a Cilium `keys` line (from --file, or standard input), e.g. from an existing
    /// cilium-ipsec-keys Secret. Never pass key material as an argument: it shows in `ps`.
    Import {
        /// File holding the line; `-` or absent reads standard input.
        #[arg(long)]
        file: Option<PathBuf>,
        #[command(flatten)]
        out: Out,
    },
    /// Render the current key as the cilium-ipsec-keys Secret (YAML; JSON with -o json), or
    /// as the bare `keys` line with --line. Prints key material: pipe it to `kubectl apply -f -`.
    CiliumSecret {
        #[arg(long, default_value = "kube-system")]
        namespace: String,
        /// Print only the `keys` line.
        #[arg(long)]
        line: bool,
        #[command(flatten)]
        out: Out,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Algorithm {
    /// rfc4106(gcm(aes)), 128-bit key, ICV 128 (the default).
    Gcm128,
    /// rfc4106(gcm(aes)), 256-bit key, ICV 128.
    Gcm256,
    /// hmac(sha256) with cbc(aes), 256-bit keys.
    HmacSha256CbcAes256,
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
    if let Command::Audit(AuditCommand::Verify {
        file,
        public_key,
        out,
    }) = &cli.command
    {
        return verify(file, public_key.as_deref(), *out);
    }
    keyd::tls::install_default_provider();
    let settings = settings(&cli)?;
    let connector =
        Connector::from_settings(&settings).map_err(|e| fail(EXIT_CONFIG, error_chain(&e)))?;
    let mut conn = connector.connect().await.map_err(|e| {
        fail(
            EXIT_UNREACHABLE,
            format!(
                "{}\n  is keyd running? (`keyd dev` or `keyd serve`)",
                error_chain(&e)
            ),
        )
    })?;
    match cli.command {
        Command::Status(out) => {
            let s: Status = call(&mut conn, "GET", "/v1/status", None).await?;
            print(out.json(), &s, || status_table(&s));
        }
        Command::Nodes(out) => {
            let nodes: Vec<NodeInfo> = call(&mut conn, "GET", "/v1/nodes", None).await?;
            print(out.json(), &nodes, || nodes_table(&nodes));
        }
        Command::Ipsec(IpsecCommand::Show(out)) => {
            let s: IpsecStatus = call(&mut conn, "GET", "/v1/ipsec", None).await?;
            print(out.json(), &s, || ipsec_table(&s));
        }
        Command::Ipsec(IpsecCommand::Rotate { algorithm, out }) => {
            let algorithm = algorithm.map(|a| match a {
                Algorithm::Gcm128 => KeySpec::Gcm128,
                Algorithm::Gcm256 => KeySpec::Gcm256,
                Algorithm::HmacSha256CbcAes256 => KeySpec::HmacSha256CbcAes256,
            });
            let body = to_body(&RotateRequest { algorithm })?;
            let s: IpsecStatus = call(&mut conn, "POST", "/v1/ipsec/rotate", Some(body)).await?;
            print(out.json(), &s, || format!("rotated\n\n{}", ipsec_table(&s)));
        }
        Command::Ipsec(IpsecCommand::Import { file, out }) => {
            let line = read_secret_input(file.as_deref())?;
            let body = Zeroizing::new(to_body(&ImportRequest {
                keys: SecretString::new(line.to_string()),
            })?);
            let s: IpsecStatus =
                call(&mut conn, "POST", "/v1/ipsec/import", Some(body.to_vec())).await?;
            print(out.json(), &s, || {
                format!("imported\n\n{}", ipsec_table(&s))
            });
        }
        Command::Ipsec(IpsecCommand::CiliumSecret {
            namespace,
            line,
            out,
        }) => {
            cilium_secret(&mut conn, &namespace, line, out.json()).await?;
        }
        Command::Schedule(cmd) => schedule(&mut conn, cmd).await?,
        Command::Rotate { class, out } => {
            let v: serde_json::Value =
                call(&mut conn, "POST", &format!("/v1/rotate/{class}"), None).await?;
            print(out.json(), &v, || {
                format!("{}\n", v["result"].as_str().unwrap_or_default())
            });
        }
        Command::Report(out) => {
            let r: Report = call(&mut conn, "GET", "/v1/report", None).await?;
            print(out.json(), &r, || report_table(&r));
            if r.overdue {
                return Err(fail(EXIT_FINDING, "a key class is overdue for rotation"));
            }
        }
        Command::Audit(cmd) => audit(&mut conn, cmd).await?,
        Command::Kek(k) => kek::run(&mut conn, k.output == Output::Json, k.cmd).await?,
    }
    Ok(())
}

async fn cilium_secret(
    conn: &mut Connection,
    namespace: &str,
    line: bool,
    json: bool,
) -> Result<(), Failure> {
    let path = if line {
        "/v1/ipsec/cilium?format=line".to_owned()
    } else {
        format!("/v1/ipsec/cilium?format=secret&namespace={namespace}")
    };
    let resp = send(conn, "GET", &path, None).await?;
    let text = Zeroizing::new(String::from_utf8_lossy(&resp.body).into_owned());
    if json {
        let value: serde_json::Value = if line {
            serde_json::json!({ "keys": text.trim_end() })
        } else {
            serde_norway::from_str(&text)
                .map_err(|e| fail(EXIT_SERVER, format!("keyd sent invalid YAML: {e}")))?
        };
        println!(
            "{}",
            Zeroizing::new(serde_json::to_string_pretty(&value).unwrap_or_default()).as_str()
        );
    } else {
        print!("{}", text.as_str());
        if !text.ends_with('\n') {
            println!();
        }
    }
    Ok(())
}

fn duration(what: &str, v: &str) -> Result<std::time::Duration, Failure> {
    humantime::parse_duration(v).map_err(|e| {
        fail(
            EXIT_INVALID,
            format!("--{what} {v:?}: {e} (e.g. 7d, 12h, 5m)"),
        )
    })
}

/// "HH-HH" or "mon,wed HH-HH".
fn parse_window(spec: &str) -> Result<MaintenanceWindow, Failure> {
    let bad = || {
        fail(
            EXIT_INVALID,
            format!("--window {spec:?}: expected \"HH-HH\" or \"mon,wed HH-HH\" (UTC)"),
        )
    };
    let (days, hours) = match spec.trim().rsplit_once(' ') {
        Some((d, h)) => (
            d.split(',')
                .map(|x| x.trim().to_lowercase())
                .filter(|x| !x.is_empty())
                .collect(),
            h,
        ),
        None => (vec![], spec.trim()),
    };
    let (a, b) = hours.split_once('-').ok_or_else(bad)?;
    let start_hour = a.trim().parse().map_err(|_| bad())?;
    let end_hour = b.trim().parse().map_err(|_| bad())?;
    Ok(MaintenanceWindow {
        days,
        start_hour,
        end_hour,
    })
}

async fn schedule(conn: &mut Connection, cmd: ScheduleCommand) -> Result<(), Failure> {
    let (class, update, out) = match cmd {
        ScheduleCommand::Get { class, out } => {
            let all: Vec<ClassSchedule> = call(conn, "GET", "/v1/schedules", None).await?;
            let shown: Vec<ClassSchedule> = match &class {
                Some(c) => {
                    let v: Vec<_> = all.into_iter().filter(|s| s.class.as_str() == c).collect();
                    if v.is_empty() {
                        return Err(fail(
                            EXIT_NOT_FOUND,
                            format!(
                                "no key class {c:?} (ipsec, wireguard-node-keys, wireguard-psk, kek)"
                            ),
                        ));
                    }
                    v
                }
                None => all,
            };
            print(out.json(), &shown, || schedules_table(&shown));
            return Ok(());
        }
        ScheduleCommand::Bounds {
            class,
            min,
            max,
            out,
        } => {
            let bounds = Bounds {
                min_period: min.as_deref().map(|v| duration("min", v)).transpose()?,
                max_period: max.as_deref().map(|v| duration("max", v)).transpose()?,
            };
            let s: ClassSchedule = call(
                conn,
                "PUT",
                &format!("/v1/schedules/{class}/bounds"),
                Some(to_body(&bounds)?),
            )
            .await?;
            print(out.json(), &s, || schedules_table(std::slice::from_ref(&s)));
            return Ok(());
        }
        ScheduleCommand::Set {
            class,
            period,
            overlap,
            window,
            no_window,
            out,
        } => {
            let update = ScheduleUpdate {
                period: period
                    .as_deref()
                    .map(|v| duration("period", v))
                    .transpose()?,
                overlap: overlap
                    .as_deref()
                    .map(|v| duration("overlap", v))
                    .transpose()?,
                window: match (window, no_window) {
                    (Some(w), _) => Some(Some(parse_window(&w)?)),
                    (None, true) => Some(None),
                    (None, false) => None,
                },
                paused: None,
            };
            (class, update, out)
        }
        ScheduleCommand::Pause { class, out } => (
            class,
            ScheduleUpdate {
                paused: Some(true),
                ..Default::default()
            },
            out,
        ),
        ScheduleCommand::Resume { class, out } => (
            class,
            ScheduleUpdate {
                paused: Some(false),
                ..Default::default()
            },
            out,
        ),
    };
    let s: ClassSchedule = call(
        conn,
        "PUT",
        &format!("/v1/schedules/{class}"),
        Some(to_body(&update)?),
    )
    .await?;
    print(out.json(), &s, || schedules_table(std::slice::from_ref(&s)));
    Ok(())
}

async fn audit(conn: &mut Connection, cmd: AuditCommand) -> Result<(), Failure> {
    match cmd {
        AuditCommand::Verify { .. } => unreachable!("handled offline in run()"),
        AuditCommand::PublicKey(out) => {
            let v: serde_json::Value = call(conn, "GET", "/v1/audit/public-key", None).await?;
            print(out.json(), &v, || {
                format!("{}\n", v["public_key"].as_str().unwrap_or_default())
            });
        }
        AuditCommand::Segments(out) => {
            let segs: Vec<keyd::service::Segment> =
                call(conn, "GET", "/v1/audit/segments", None).await?;
            print(out.json(), &segs, || segments_table(&segs));
        }
        AuditCommand::Prune { through, hash, out } => {
            let body = to_body(&serde_json::json!({ "through_seq": through, "last_hash": hash }))?;
            let v: serde_json::Value = call(conn, "POST", "/v1/audit/prune", Some(body)).await?;
            print(out.json(), &v, || {
                format!("pruned {} records through {through}\n", v["pruned"])
            });
        }
        AuditCommand::Export {
            since,
            until,
            from_seq,
            to_seq,
            format,
            output,
        } => {
            let mut q = vec![format!("format={format}")];
            for (k, v) in [("since", since), ("until", until)] {
                if let Some(v) = v {
                    q.push(format!("{k}={v}"));
                }
            }
            for (k, v) in [("from_seq", from_seq), ("to_seq", to_seq)] {
                if let Some(v) = v {
                    q.push(format!("{k}={v}"));
                }
            }
            export(
                conn,
                &format!("/v1/audit/export?{}", q.join("&")),
                output.as_deref(),
            )
            .await?;
        }
    }
    Ok(())
}

/// Streams an export to a file or stdout, with a progress bar when stderr is a terminal.
async fn export(conn: &mut Connection, path: &str, output: Option<&Path>) -> Result<(), Failure> {
    use http_body_util::BodyExt as _;
    use std::io::Write as _;
    let resp = conn.get_streaming(path).await.map_err(|e| {
        fail(
            EXIT_UNREACHABLE,
            format!("request to keyd failed: {}", error_chain(&e)),
        )
    })?;
    let (parts, mut body) = resp.into_parts();
    if !parts.status.is_success() {
        let bytes = body
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let msg = serde_json::from_slice::<keyd_proto::ErrorBody>(&bytes)
            .map(|e| e.message)
            .unwrap_or_default();
        return Err(fail(
            if parts.status.is_client_error() {
                EXIT_INVALID
            } else {
                EXIT_SERVER
            },
            format!("export refused: {msg}"),
        ));
    }
    let total: u64 = parts
        .headers
        .get(keyd::api::RECORDS_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(total);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} records {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut sink: Box<dyn std::io::Write> = match output {
        Some(p) => Box::new(std::io::BufWriter::new(std::fs::File::create(p).map_err(
            |e| fail(EXIT_CONFIG, format!("cannot create {}: {e}", p.display())),
        )?)),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| fail(EXIT_UNREACHABLE, format!("export interrupted: {e}")))?;
        if let Ok(data) = frame.into_data() {
            // Records are one per line; checkpoint and header lines make the count approximate
            // but never beyond the total.
            bar.set_position(
                (bar.position() + data.iter().filter(|b| **b == b'\n').count() as u64).min(total),
            );
            sink.write_all(&data)
                .map_err(|e| fail(EXIT_SERVER, format!("cannot write the export: {e}")))?;
        }
    }
    sink.flush()
        .map_err(|e| fail(EXIT_SERVER, format!("cannot write the export: {e}")))?;
    bar.finish_and_clear();
    if let Some(p) = output {
        eprintln!("exported {total} records to {}", p.display());
    }
    Ok(())
}

fn verify(file: &Path, public_key: Option<&str>, out: Out) -> Result<(), Failure> {
    use base64::Engine as _;
    let key = match public_key {
        None => None,
        Some(k) => {
            let text = if Path::new(k).is_file() {
                std::fs::read_to_string(k)
                    .map_err(|e| fail(EXIT_CONFIG, format!("cannot read {k}: {e}")))?
            } else {
                k.to_owned()
            };
            Some(
                base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|_| {
                        fail(
                            EXIT_INVALID,
                            "--public-key is not base64 (use `keyctl audit public-key`)",
                        )
                    })?,
            )
        }
    };
    let f = std::fs::File::open(file)
        .map_err(|e| fail(EXIT_CONFIG, format!("cannot open {}: {e}", file.display())))?;
    match keyd::audit::verify(std::io::BufReader::new(f), key.as_deref()) {
        Ok(r) => {
            print(out.json(), &r, || {
                let mut s = format!(
                    "OK: {} records ({}..{}), {} signed checkpoints\n",
                    r.records,
                    r.first_seq.map_or("-".into(), |v| v.to_string()),
                    r.last_seq.map_or("-".into(), |v| v.to_string()),
                    r.checkpoints
                );
                if r.unsigned_tail > 0 {
                    s += &format!(
                        "warning: the last {} records follow the last checkpoint: chained but not signed\n",
                        r.unsigned_tail
                    );
                }
                if !r.anchored {
                    s += "warning: the file starts mid-log without an anchor checkpoint\n";
                }
                if r.key_from_file {
                    s += "warning: no --public-key given: checked against the key in the file itself\n";
                }
                s
            });
            Ok(())
        }
        Err(e) => Err(fail(
            EXIT_FINDING,
            format!("{}: TAMPERED: {e}", file.display()),
        )),
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

fn read_secret_input(file: Option<&Path>) -> Result<Zeroizing<String>, Failure> {
    let mut text = Zeroizing::new(String::new());
    match file {
        Some(p) if p != Path::new("-") => {
            let bytes = Zeroizing::new(
                std::fs::read(p)
                    .map_err(|e| fail(EXIT_CONFIG, format!("cannot read {}: {e}", p.display())))?,
            );
            text.push_str(
                std::str::from_utf8(&bytes)
                    .map_err(|_| fail(EXIT_INVALID, format!("{} is not text", p.display())))?,
            );
        }
        _ => {
            if std::io::stdin().is_terminal() {
                eprintln!("keyctl: paste the Cilium keys line, then press Ctrl-D");
            }
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| fail(EXIT_INVALID, format!("cannot read standard input: {e}")))?;
        }
    }
    Ok(text)
}

fn to_body<T: serde::Serialize>(v: &T) -> Result<Vec<u8>, Failure> {
    serde_json::to_vec(v).map_err(|e| fail(EXIT_SERVER, format!("cannot encode the request: {e}")))
}

async fn send(
    conn: &mut Connection,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<Response, Failure> {
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|e| fail(EXIT_SERVER, e.to_string()))?;
    let resp = conn.send(method, path, body, &[]).await.map_err(|e| {
        fail(
            EXIT_UNREACHABLE,
            format!("request to keyd failed: {}", error_chain(&e)),
        )
    })?;
    if resp.status.is_success() {
        return Ok(resp);
    }
    let msg = resp.error_message();
    Err(match resp.status {
        StatusCode::FORBIDDEN => fail(
            EXIT_FORBIDDEN,
            format!(
                "refused: {msg}\n  (admin commands need the admin certificate from keyctl.toml)"
            ),
        ),
        StatusCode::NOT_FOUND => fail(EXIT_NOT_FOUND, msg),
        s if s.is_client_error() => fail(EXIT_INVALID, format!("keyd refused the request: {msg}")),
        s => fail(EXIT_SERVER, format!("keyd failed ({s}): {msg}")),
    })
}

async fn call<T: serde::de::DeserializeOwned>(
    conn: &mut Connection,
    method: &str,
    path: &str,
    body: Option<Vec<u8>>,
) -> Result<T, Failure> {
    let resp = send(conn, method, path, body).await?;
    serde_json::from_slice(&resp.body)
        .map_err(|e| fail(EXIT_SERVER, format!("unexpected answer from keyd: {e}")))
}

fn print<T: serde::Serialize>(json: bool, value: &T, table: impl FnOnce() -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        );
    } else {
        print!("{}", table());
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn spi(s: Option<u8>) -> String {
    s.map_or_else(|| "-".to_owned(), |s| s.to_string())
}

/// Left-aligned columns separated by two spaces.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.chars().count());
        }
    }
    let line = |cells: Vec<String>| {
        let mut l = cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ");
        l.truncate(l.trim_end().len());
        l + "\n"
    };
    let mut out = line(header.iter().map(|s| s.to_string()).collect());
    for r in rows {
        out += &line(r.clone());
    }
    out
}

fn status_table(s: &Status) -> String {
    let current = s.ipsec.keys.first();
    let rows = vec![
        vec!["version".into(), s.version.clone()],
        vec!["store".into(), s.store.clone()],
        vec!["kek".into(), format!("{} ({})", s.kek_backend, s.kek_id)],
        vec![
            "kek health".into(),
            s.custody
                .as_ref()
                .map_or("-".into(), |c| c.health.state.clone()),
        ],
        vec!["nodes".into(), s.nodes.to_string()],
        vec!["ipsec outbound spi".into(), spi(s.ipsec.outbound_spi)],
        vec![
            "ipsec algorithm".into(),
            current.map_or("-".into(), |k| {
                format!(
                    "{} {}-bit{}",
                    k.algorithm,
                    k.key_bits,
                    if k.per_tunnel { " per-tunnel" } else { "" }
                )
            }),
        ],
        vec![
            "ipsec key created".into(),
            current.map_or("-".into(), |k| k.created_at.to_string()),
        ],
        vec![
            "wireguard psk epoch".into(),
            s.wireguard.psk_epoch.to_string(),
        ],
        vec![
            "wireguard node keys".into(),
            s.wireguard.nodes_with_public_key.to_string(),
        ],
    ];
    table(&["FIELD", "VALUE"], &rows)
}

fn ipsec_table(s: &IpsecStatus) -> String {
    if s.keys.is_empty() {
        return "no IPsec key yet: run `keyctl ipsec rotate` (or `keyctl ipsec import`)\n".into();
    }
    let rows = s
        .keys
        .iter()
        .map(|k| {
            vec![
                format!("{}{}", k.spi, if k.per_tunnel { "+" } else { "" }),
                format!("{:?}", k.role).to_lowercase(),
                k.algorithm.clone(),
                k.key_bits.to_string(),
                k.icv_bits.map_or("-".into(), |i| i.to_string()),
                k.origin.clone(),
                k.created_at.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    let mut out = table(
        &[
            "SPI",
            "ROLE",
            "ALGORITHM",
            "BITS",
            "ICV",
            "ORIGIN",
            "CREATED",
        ],
        &rows,
    );
    if let Some(r) = &s.rollout {
        out += &format!(
            "\nrollout {} -> {}: {} since {}{}\n",
            r.from_spi,
            r.to_spi,
            r.phase,
            r.phase_since,
            if r.stuck { " (STUCK)" } else { "" }
        );
        if !r.waiting_for.is_empty() {
            out += &format!("  waiting for: {}\n", r.waiting_for.join(", "));
        }
        if !r.not_live.is_empty() {
            out += &format!("  not live (not waited for): {}\n", r.not_live.join(", "));
        }
    }
    out
}

fn nodes_table(nodes: &[NodeInfo]) -> String {
    if nodes.is_empty() {
        return "no nodes registered\n".into();
    }
    let rows = nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                n.endpoint.to_string(),
                n.pod_cidrs
                    .iter()
                    .map(|c| c.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                if n.wireguard_public_key.is_some() {
                    "yes".into()
                } else {
                    "no".into()
                },
                n.acked
                    .ack
                    .ipsec_outbound_spi
                    .map_or("-".into(), |s| s.to_string()),
                n.acked
                    .ack
                    .wireguard_epoch
                    .map_or("-".into(), |e| e.to_string()),
                n.last_seen.to_string(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "NODE",
            "ENDPOINT",
            "POD CIDRS",
            "WG KEY",
            "ACKED SPI",
            "ACKED EPOCH",
            "LAST SEEN",
        ],
        &rows,
    )
}

fn ts(t: Option<keyd_proto::Timestamp>) -> String {
    t.map_or_else(|| "-".to_owned(), |t| t.to_string())
}

fn secs(s: Option<u64>) -> String {
    s.map_or_else(
        || "-".to_owned(),
        |s| humantime::format_duration(std::time::Duration::from_secs(s)).to_string(),
    )
}

fn schedules_table(all: &[ClassSchedule]) -> String {
    let rows = all
        .iter()
        .map(|c| {
            let d = |d: Option<std::time::Duration>| {
                d.map_or("-".into(), |d| humantime::format_duration(d).to_string())
            };
            vec![
                c.class.as_str().to_owned(),
                humantime::format_duration(c.schedule.period).to_string(),
                humantime::format_duration(c.schedule.overlap).to_string(),
                c.schedule.window.as_ref().map_or("-".into(), |w| {
                    let days = if w.days.is_empty() {
                        "daily".to_owned()
                    } else {
                        w.days.join(",")
                    };
                    format!("{days} {:02}-{:02}", w.start_hour, w.end_hour)
                }),
                if c.schedule.paused {
                    "yes".into()
                } else {
                    "no".into()
                },
                d(c.bounds.min_period),
                d(c.bounds.max_period),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "CLASS",
            "PERIOD",
            "OVERLAP",
            "WINDOW (UTC)",
            "PAUSED",
            "MIN",
            "MAX",
        ],
        &rows,
    )
}

fn report_table(r: &Report) -> String {
    let rows = r
        .classes
        .iter()
        .map(|c| {
            vec![
                c.class.as_str().to_owned(),
                ts(c.last_rotation),
                ts(c.next_due),
                secs(c.oldest_key_age_secs),
                if c.overdue {
                    "OVERDUE".into()
                } else if c.within_schedule {
                    "ok".into()
                } else {
                    "late".into()
                },
                if c.within_bounds {
                    "ok".into()
                } else {
                    "VIOLATED".into()
                },
                c.detail.clone().unwrap_or_default(),
            ]
        })
        .collect::<Vec<_>>();
    table(
        &[
            "CLASS",
            "LAST ROTATION",
            "NEXT DUE",
            "OLDEST KEY",
            "SCHEDULE",
            "BOUNDS",
            "DETAIL",
        ],
        &rows,
    )
}

fn segments_table(segs: &[keyd::service::Segment]) -> String {
    let rows = segs
        .iter()
        .map(|s| {
            vec![
                s.first_seq.to_string(),
                s.last_seq.to_string(),
                ts(s.closed_at),
                s.last_hash.clone().unwrap_or_else(|| "(open)".into()),
            ]
        })
        .collect::<Vec<_>>();
    table(&["FIRST", "LAST", "CLOSED", "LAST HASH"], &rows)
}
