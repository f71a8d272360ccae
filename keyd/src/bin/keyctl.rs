//! `keyctl`: the command-line client for keyd's admin API.
//!
//! Exit codes, for scripts: 0 success; 1 keyd failed (5xx) or another error; 2 usage error;
//! 3 keyd unreachable or the TLS handshake failed; 4 refused (403: wrong certificate);
//! 5 not found; 6 the request was invalid (keyd said what was wrong); 64 bad client config.
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
    ImportRequest, IpsecStatus, KeySpec, NodeInfo, RotateRequest, SecretString, Status,
};
use zeroize::Zeroizing;

const EXIT_SERVER: u8 = 1;
const EXIT_UNREACHABLE: u8 = 3;
const EXIT_FORBIDDEN: u8 = 4;
const EXIT_NOT_FOUND: u8 = 5;
const EXIT_INVALID: u8 = 6;
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
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Table,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// keyd's version, store, KEK custodian and key summary.
    Status,
    /// Registered nodes and what each acknowledged.
    Nodes,
    /// IPsec PSKs in Cilium's format.
    #[command(subcommand)]
    Ipsec(IpsecCommand),
    /// The key-encryption key: custodian health, rotation, migration between custodians.
    #[command(subcommand)]
    Kek(kek::KekCommand),
}

#[derive(Debug, Subcommand)]
enum IpsecCommand {
    /// The current and previous keys (IDs, algorithm, age; never key bytes).
    Show,
    /// Generate the next key now (the first one if none exists).
    Rotate {
        /// Only for the first key; later rotations keep the algorithm, as Cilium requires.
        #[arg(long, value_enum)]
        algorithm: Option<Algorithm>,
    },
    /// Import a Cilium `keys` line (from --file, or standard input), e.g. from an existing
    /// cilium-ipsec-keys Secret. Never pass key material as an argument: it shows in `ps`.
    Import {
        /// File holding the line; `-` or absent reads standard input.
        #[arg(long)]
        file: Option<PathBuf>,
    },
    /// Render the current key as the cilium-ipsec-keys Secret (YAML; JSON with -o json), or
    /// as the bare `keys` line with --line. Prints key material: pipe it to `kubectl apply -f -`.
    CiliumSecret {
        #[arg(long, default_value = "kube-system")]
        namespace: String,
        /// Print only the `keys` line.
        #[arg(long)]
        line: bool,
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
    let json = cli.output == Output::Json;
    match cli.command {
        Command::Status => {
            let s: Status = call(&mut conn, "GET", "/v1/status", None).await?;
            print(json, &s, || status_table(&s));
        }
        Command::Nodes => {
            let nodes: Vec<NodeInfo> = call(&mut conn, "GET", "/v1/nodes", None).await?;
            print(json, &nodes, || nodes_table(&nodes));
        }
        Command::Ipsec(IpsecCommand::Show) => {
            let s: IpsecStatus = call(&mut conn, "GET", "/v1/ipsec", None).await?;
            print(json, &s, || ipsec_table(&s));
        }
        Command::Ipsec(IpsecCommand::Rotate { algorithm }) => {
            let algorithm = algorithm.map(|a| match a {
                Algorithm::Gcm128 => KeySpec::Gcm128,
                Algorithm::Gcm256 => KeySpec::Gcm256,
                Algorithm::HmacSha256CbcAes256 => KeySpec::HmacSha256CbcAes256,
            });
            let body = to_body(&RotateRequest { algorithm })?;
            let s: IpsecStatus = call(&mut conn, "POST", "/v1/ipsec/rotate", Some(body)).await?;
            print(json, &s, || {
                format!(
                    "rotated: outbound SPI is now {}\n\n{}",
                    spi(s.outbound_spi),
                    ipsec_table(&s)
                )
            });
        }
        Command::Ipsec(IpsecCommand::Import { file }) => {
            let line = read_secret_input(file.as_deref())?;
            let body = Zeroizing::new(to_body(&ImportRequest {
                keys: SecretString::new(line.to_string()),
            })?);
            let s: IpsecStatus =
                call(&mut conn, "POST", "/v1/ipsec/import", Some(body.to_vec())).await?;
            print(json, &s, || {
                format!(
                    "imported: outbound SPI is now {}\n\n{}",
                    spi(s.outbound_spi),
                    ipsec_table(&s)
                )
            });
        }
        Command::Kek(cmd) => kek::run(&mut conn, json, cmd).await?,
        Command::Ipsec(IpsecCommand::CiliumSecret { namespace, line }) => {
            let path = if line {
                "/v1/ipsec/cilium?format=line".to_owned()
            } else {
                format!("/v1/ipsec/cilium?format=secret&namespace={namespace}")
            };
            let resp = send(&mut conn, "GET", &path, None).await?;
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
                    Zeroizing::new(serde_json::to_string_pretty(&value).unwrap_or_default())
                        .as_str()
                );
            } else {
                print!("{}", text.as_str());
                if !text.ends_with('\n') {
                    println!();
                }
            }
        }
    }
    Ok(())
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
    table(
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
    )
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
