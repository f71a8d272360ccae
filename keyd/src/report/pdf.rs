//! The PDF: the report's own HTML printed by headless Chromium.
//!
//! keyd prints only HTML it rendered itself (every text escaped, no script, no external
//! resource, and a Content-Security-Policy that forbids scripts and fetches), with every host
//! name unresolvable, a throwaway profile, a time limit, and none of keyd's environment. keyd
//! signs what that Chromium prints, so the binary it runs is trusted like keyd itself: the one
//! `KEYD_REPORT_CHROMIUM` names, or the first on keyd's `PATH`, both set by whoever runs keyd.
//! Where no Chromium is installed (keyd's container image has none), a PDF is refused with a
//! clear error; HTML and JSON need nothing.

use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a print may take.
const PRINT_TIMEOUT: Duration = Duration::from_secs(120);

/// The first of Debian's and other usual names for Chromium on `PATH`.
pub fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in [
            "chromium",
            "chromium-browser",
            "google-chrome",
            "headless_shell",
        ] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// The flags for a headless print of a local file: no sandbox only as root (Chromium refuses
/// to start as root with it), no name resolution. (The page's own Content-Security-Policy
/// forbids every script and every fetch; Chromium's print needs script enabled itself.)
pub fn print_args(profile: &Path, html: &Path, pdf: &Path, as_root: bool) -> Vec<String> {
    let mut args = vec![
        "--headless".to_owned(),
        "--disable-gpu".into(),
        "--disable-extensions".into(),
        "--disable-background-networking".into(),
        "--disable-sync".into(),
        "--no-first-run".into(),
        "--mute-audio".into(),
        "--host-resolver-rules=MAP * ~NOTFOUND".into(),
        "--no-pdf-header-footer".into(),
        format!("--user-data-dir={}", profile.display()),
        format!("--print-to-pdf={}", pdf.display()),
    ];
    if as_root {
        args.push("--no-sandbox".into());
    }
    args.push(format!("file://{}", html.display()));
    args
}

/// Prints `html` to PDF bytes with `chromium` (configured), else the one on `PATH`.
pub async fn print(html: &str, chromium: Option<&Path>) -> Result<Vec<u8>, String> {
    let chromium = match chromium {
        Some(p) if p.is_file() => p.to_path_buf(),
        Some(p) => {
            return Err(format!(
                "[report] chromium = {} is not a file: install Chromium there or fix the path",
                p.display()
            ));
        }
        None => find_chromium().ok_or_else(|| {
            "keyd prints PDF reports with headless Chromium, and none is on its PATH (Debian: \
             apt-get install chromium; or set [report] chromium): ask for --format html and \
             print it, or install Chromium beside keyd"
                .to_owned()
        })?,
    };
    let dir =
        tempfile::tempdir().map_err(|e| format!("cannot make a directory to print in: {e}"))?;
    let (page, out, profile) = (
        dir.path().join("report.html"),
        dir.path().join("report.pdf"),
        dir.path().join("profile"),
    );
    std::fs::write(&page, html).map_err(|e| format!("cannot write the page to print: {e}"))?;
    let mut cmd = tokio::process::Command::new(&chromium);
    cmd.args(print_args(&profile, &page, &out, keyd_mtls::ops::is_root()))
        // Nothing of keyd's environment (custodian credentials, tokens) reaches the browser.
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("HOME", dir.path())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", chromium.display()))?;
    let output = tokio::time::timeout(PRINT_TIMEOUT, child.wait_with_output())
        .await
        .map_err(|_| {
            format!(
                "{} did not print within {PRINT_TIMEOUT:?}",
                chromium.display()
            )
        })?
        .map_err(|e| format!("{} failed: {e}", chromium.display()))?;
    let pdf = std::fs::read(&out).unwrap_or_default();
    if !output.status.success() || !pdf.starts_with(b"%PDF") {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(5).collect();
        return Err(format!(
            "{} did not print the report ({}): {}",
            chromium.display(),
            output.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ));
    }
    Ok(pdf)
}
