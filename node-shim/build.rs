//! Builds the eBPF tc program (`bpf/steer.c`) with clang into `$OUT_DIR/steer.o`, which
//! `kernel::ebpf` embeds and loads with aya. A machine without clang or libbpf's headers
//! fails here with the Debian packages to install, not later with a missing file.

use std::path::{Path, PathBuf};
use std::process::Command;

const SOURCE: &str = "../bpf/steer.c";

fn main() {
    println!("cargo:rerun-if-changed={SOURCE}");
    println!("cargo:rerun-if-env-changed=CLANG");
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let clang = std::env::var("CLANG").unwrap_or_else(|_| "clang".to_owned());

    if Command::new(&clang).arg("--version").output().is_err() {
        fail(&format!(
            "`{clang}` was not found: node-shim's eBPF program ({SOURCE}) is compiled with clang \
             (Debian: `apt-get install clang libbpf-dev`; or set CLANG to a clang binary)"
        ));
    }
    let helpers = Path::new("/usr/include/bpf/bpf_helpers.h");
    if !helpers.exists() {
        fail(&format!(
            "{} was not found: node-shim's eBPF program needs libbpf's headers \
             (Debian: `apt-get install libbpf-dev`)",
            helpers.display()
        ));
    }
    let object = out.join("steer.o");
    let mut cmd = Command::new(&clang);
    // The target's byte order, not the build machine's: the maps are read and written by the
    // node-shim binary being built.
    let target = match std::env::var("CARGO_CFG_TARGET_ENDIAN").as_deref() {
        Ok("big") => "bpfeb",
        _ => "bpfel",
    };
    cmd.args(["-target", target, "-O2", "-g", "-Wall", "-Werror"]);
    // <linux/*.h> includes <asm/types.h>, which Debian keeps under the multiarch folder.
    if let Some(dir) = multiarch_include() {
        cmd.arg(format!("-I{}", dir.display()));
    }
    cmd.arg("-c").arg(SOURCE).arg("-o").arg(&object);
    match cmd.status() {
        Ok(s) if s.success() => {}
        Ok(s) => fail(&format!(
            "clang failed to compile {SOURCE} ({s}); its errors are above"
        )),
        Err(e) => fail(&format!("cannot run {clang}: {e}")),
    }
}

fn multiarch_include() -> Option<PathBuf> {
    let arch = std::env::var("CARGO_CFG_TARGET_ARCH").ok()?;
    let triple = match arch.as_str() {
        "x86_64" => "x86_64-linux-gnu",
        "aarch64" => "aarch64-linux-gnu",
        _ => return None,
    };
    let dir = Path::new("/usr/include").join(triple);
    dir.join("asm/types.h").exists().then_some(dir)
}

fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
