//! `keyctl audit`: export, verify, prune the tamper-evident audit log.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use clap::Subcommand;
use keyd::api::RECORDS_HEADER;
use keyd::audit::verify as verify_export;
use keyd::service::Segment;
use keyd_mtls::client::Connection;

use crate::http::{call, get_streaming, query_value, read_public_key, to_body};
use crate::table::{print, table, ts};
use crate::{EXIT_CONFIG, EXIT_FINDING, EXIT_SERVER, EXIT_UNREACHABLE, Failure, Out, fail};

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
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
    /// Check an evidence report (`keyctl report --format ...`) against its detached signature
    /// offline. Exits 7 when the file or the signature was changed.
    VerifyReport {
        file: PathBuf,
        /// The signature file (default: FILE.sig).
        #[arg(long)]
        signature: Option<PathBuf>,
        /// The audit public key to trust (base64, from `keyctl audit public-key`), or a file
        /// holding it. Without it the key in the signature is used, which proves only that the
        /// file is unchanged.
        #[arg(long)]
        public_key: Option<String>,
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

pub async fn run(conn: &mut Connection, cmd: AuditCommand) -> Result<(), Failure> {
    match cmd {
        AuditCommand::Verify { .. } | AuditCommand::VerifyReport { .. } => {
            unreachable!("handled offline in run()")
        }
        AuditCommand::PublicKey(out) => {
            let v: serde_json::Value = call(conn, "GET", "/v1/audit/public-key", None).await?;
            print(out.json(), &v, || {
                format!("{}\n", v["public_key"].as_str().unwrap_or_default())
            });
        }
        AuditCommand::Segments(out) => {
            let segs: Vec<Segment> = call(conn, "GET", "/v1/audit/segments", None).await?;
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
            let mut q = vec![format!("format={}", query_value(&format))];
            for (k, v) in [("since", since), ("until", until)] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", query_value(&v)));
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
    let (parts, mut body) = get_streaming(conn, path, "export").await?;
    let total: u64 = parts
        .headers
        .get(RECORDS_HEADER)
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

pub fn verify(file: &Path, public_key: Option<&str>, out: Out) -> Result<(), Failure> {
    let key = read_public_key(public_key)?;
    let f = std::fs::File::open(file)
        .map_err(|e| fail(EXIT_CONFIG, format!("cannot open {}: {e}", file.display())))?;
    match verify_export(std::io::BufReader::new(f), key.as_deref()) {
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
                if !r.range_signed {
                    s += "warning: the header's range is not signed (an export from an older keyd): a cut at the end would not show\n";
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
fn segments_table(segs: &[Segment]) -> String {
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
