//! Writes the generated manifests (CRDs, ValidatingWebhookConfiguration) under `deploy/`.
//! `cargo run -p keyd-webhook --bin crdgen`; `--check` only compares and exits 1 on a difference.
#![forbid(unsafe_code)]

use std::path::Path;
use std::process::ExitCode;

fn main() -> ExitCode {
    let check = std::env::args().any(|a| a == "--check");
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let files = match keyd_webhook::manifests::generated_files() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crdgen: cannot render YAML: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut stale = false;
    for (rel, text) in files {
        let path = root.join(&rel);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current == text {
            continue;
        }
        if check {
            eprintln!("{rel} is out of date");
            stale = true;
            continue;
        }
        if let Some(dir) = path.parent()
            && let Err(e) = std::fs::create_dir_all(dir)
        {
            eprintln!("crdgen: cannot create {}: {e}", dir.display());
            return ExitCode::FAILURE;
        }
        if let Err(e) = std::fs::write(&path, text) {
            eprintln!("crdgen: cannot write {}: {e}", path.display());
            return ExitCode::FAILURE;
        }
        println!("wrote {rel}");
    }
    if stale {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
