//! `keyctl report --format html|pdf|json -o FILE`: the signed evidence report; and `keyctl
//! audit verify-report`, which checks one offline.

use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use keyd::report::{ReportLine, ReportSignature};
use keyd_mtls::client::Connection;

use crate::http::{exit_for_status, get_streaming, query_value, read_public_key};
use crate::{EXIT_CONFIG, EXIT_FINDING, EXIT_SERVER, EXIT_UNREACHABLE, Failure, fail};

/// Where the detached signature of `file` goes by default.
pub fn signature_path(file: &Path) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(".sig");
    PathBuf::from(s)
}

/// Fetches the report, writes FILE and FILE.sig (atomically: a temporary file renamed), and
/// exits 7 when the report finds the period not compliant.
pub async fn fetch(
    conn: &mut Connection,
    format: &str,
    since: Option<&str>,
    until: Option<&str>,
    file: &Path,
    signature: Option<&Path>,
) -> Result<(), Failure> {
    use http_body_util::BodyExt as _;
    let mut q = vec![format!("format={}", query_value(format))];
    for (k, v) in [("since", since), ("until", until)] {
        if let Some(v) = v {
            q.push(format!("{k}={}", query_value(v)));
        }
    }
    let path = format!("/v1/report/evidence?{}", q.join("&"));
    let (_, mut body) = get_streaming(conn, &path, "report").await?;
    let bar = if std::io::stderr().is_terminal() {
        let b = indicatif::ProgressBar::new(0);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {pos}/{len} audit records {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        b
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut pending: Vec<u8> = Vec::new();
    let mut result: Option<ReportLine> = None;
    while let Some(frame) = body.frame().await {
        let frame =
            frame.map_err(|e| fail(EXIT_UNREACHABLE, format!("report interrupted: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let l: Vec<u8> = pending.drain(..=nl).collect();
            let line: ReportLine = serde_json::from_slice(&l).map_err(|e| {
                fail(
                    EXIT_SERVER,
                    format!("keyd sent an unreadable report line: {e}"),
                )
            })?;
            match line {
                ReportLine::Progress { done, total } => {
                    bar.set_length(total);
                    bar.set_position(done.min(total));
                }
                other => result = Some(other),
            }
        }
    }
    bar.finish_and_clear();
    let (signature_data, content, compliant) = match result {
        Some(ReportLine::Report {
            signature,
            content,
            compliant,
        }) => (signature, content, compliant),
        Some(ReportLine::Error {
            status,
            message,
            error,
        }) => {
            return Err(fail(
                exit_for_status(status),
                format!("keyd could not make the report ({error}): {message}"),
            ));
        }
        _ => {
            return Err(fail(
                EXIT_UNREACHABLE,
                "the connection ended before the report arrived",
            ));
        }
    };
    let bytes = STANDARD
        .decode(content)
        .map_err(|_| fail(EXIT_SERVER, "keyd sent a report that is not base64"))?;
    // Check before writing: what keyd sent must be what it signed.
    signature_data
        .verify(&bytes, None)
        .map_err(|e| fail(EXIT_SERVER, format!("keyd's report does not verify: {e}")))?;
    let sig_path = signature.map_or_else(|| signature_path(file), Path::to_path_buf);
    let sig_json = serde_json::to_vec_pretty(&signature_data)
        .map_err(|e| fail(EXIT_SERVER, format!("cannot encode the signature: {e}")))?;
    write_atomically(file, &bytes)?;
    write_atomically(&sig_path, &sig_json)?;
    eprintln!(
        "wrote {} ({} bytes) and its signature {}: {}",
        file.display(),
        bytes.len(),
        sig_path.display(),
        if compliant {
            "compliant over the period"
        } else {
            "NOT compliant over the period (see its findings)"
        }
    );
    if compliant {
        Ok(())
    } else {
        Err(fail(EXIT_FINDING, "the report has findings"))
    }
}

/// FILE and FILE.sig as the report's other files: owner-only, written atomically.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), Failure> {
    keyd::fsutil::write_private(path, bytes)
        .map_err(|e| fail(EXIT_CONFIG, format!("cannot write {}: {e}", path.display())))
}

/// `keyctl audit verify-report FILE`: the file against its detached signature; with
/// `--public-key`, also that the audit key is the one you trust. Exits 7 on any mismatch.
pub fn verify(
    file: &Path,
    signature: Option<&Path>,
    public_key: Option<&str>,
) -> Result<(), Failure> {
    let key = read_public_key(public_key)?;
    let bytes = std::fs::read(file)
        .map_err(|e| fail(EXIT_CONFIG, format!("cannot read {}: {e}", file.display())))?;
    let sig_path = signature.map_or_else(|| signature_path(file), Path::to_path_buf);
    let sig_text = std::fs::read(&sig_path).map_err(|e| {
        fail(
            EXIT_CONFIG,
            format!(
                "cannot read the signature {}: {e} (keyctl report writes FILE.sig beside the report)",
                sig_path.display()
            ),
        )
    })?;
    let sig: ReportSignature = serde_json::from_slice(&sig_text).map_err(|e| {
        fail(
            EXIT_FINDING,
            format!(
                "{}: TAMPERED: not a report signature: {e}",
                sig_path.display()
            ),
        )
    })?;
    match sig.verify(&bytes, key.as_deref()) {
        Ok(()) => {
            println!(
                "OK: {} is the {} report keyd signed at {} for {} to {}, audit key {}",
                file.display(),
                sig.report_format.as_str(),
                sig.generated_at,
                sig.since,
                sig.until,
                sig.key_id
            );
            if key.is_none() {
                eprintln!(
                    "warning: no --public-key given: checked against the key in the signature \
                     itself, which proves the file is unchanged but not who signed it"
                );
            }
            Ok(())
        }
        Err(e) => Err(fail(
            EXIT_FINDING,
            format!("{}: TAMPERED: {e}", file.display()),
        )),
    }
}
