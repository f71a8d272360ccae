//! `keyctl ipsec`: IPsec keys in Cilium's format.

use std::io::{IsTerminal as _, Read as _};
use std::path::{Path, PathBuf};

use clap::{Subcommand, ValueEnum};
use keyd_mtls::client::Connection;
use keyd_proto::{ImportRequest, IpsecStatus, KeySpec, RotateRequest, SecretString};
use zeroize::Zeroizing;

use crate::http::{call, send, to_body};
use crate::table::{print, table};
use crate::{EXIT_CONFIG, EXIT_INVALID, EXIT_SERVER, Failure, Out, fail};

#[derive(Debug, Subcommand)]
pub enum IpsecCommand {
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

/// `keyctl rollout`: the IPsec rollout in progress.
#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Stop waiting for NODE (one that polls but never acknowledges). Audited. When the old key
    /// is retired, a skipped node that never installed the new one loses its tunnels.
    Skip {
        node: String,
        #[command(flatten)]
        out: Out,
    },
}

pub async fn run_rollout(conn: &mut Connection, cmd: RolloutCommand) -> Result<(), Failure> {
    match cmd {
        RolloutCommand::Skip { node, out } => {
            let body = to_body(&keyd_proto::SkipRequest { node: node.clone() })?;
            let s: IpsecStatus = call(conn, "POST", "/v1/ipsec/rollout/skip", Some(body)).await?;
            print(out.json(), &s, || {
                format!("no longer waiting for {node}\n\n{}", ipsec_table(&s))
            });
        }
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Algorithm {
    /// rfc4106(gcm(aes)), 128-bit key, ICV 128 (the default).
    Gcm128,
    /// rfc4106(gcm(aes)), 256-bit key, ICV 128.
    Gcm256,
    /// hmac(sha256) with cbc(aes), 256-bit keys.
    HmacSha256CbcAes256,
}
pub async fn run(conn: &mut Connection, cmd: IpsecCommand) -> Result<(), Failure> {
    match cmd {
        IpsecCommand::Show(out) => {
            let s: IpsecStatus = call(conn, "GET", "/v1/ipsec", None).await?;
            print(out.json(), &s, || ipsec_table(&s));
        }
        IpsecCommand::Rotate { algorithm, out } => {
            let algorithm = algorithm.map(|a| match a {
                Algorithm::Gcm128 => KeySpec::Gcm128,
                Algorithm::Gcm256 => KeySpec::Gcm256,
                Algorithm::HmacSha256CbcAes256 => KeySpec::HmacSha256CbcAes256,
            });
            let body = to_body(&RotateRequest { algorithm })?;
            let s: IpsecStatus = call(conn, "POST", "/v1/ipsec/rotate", Some(body)).await?;
            print(out.json(), &s, || format!("rotated\n\n{}", ipsec_table(&s)));
        }
        IpsecCommand::Import { file, out } => {
            let line = read_secret_input(file.as_deref())?;
            let body = Zeroizing::new(to_body(&ImportRequest {
                keys: SecretString::new(line.to_string()),
            })?);
            let s: IpsecStatus =
                call(conn, "POST", "/v1/ipsec/import", Some(body.to_vec())).await?;
            print(out.json(), &s, || {
                format!("imported\n\n{}", ipsec_table(&s))
            });
        }
        IpsecCommand::CiliumSecret {
            namespace,
            line,
            out,
        } => {
            cilium_secret(conn, &namespace, line, out.json()).await?;
        }
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
        if !r.skipped.is_empty() {
            out += &format!(
                "  skipped (keyctl rollout skip): {}\n",
                r.skipped.join(", ")
            );
        }
    }
    out
}
