//! Container images assembled on the host, for a cluster that reaches no registry and may pull
//! no base image: host binaries, each with the shared libraries `ldd` says it loads (at the same
//! paths), in one layer of a docker-archive tarball (`manifest.json`, the image config, the
//! layer), which `ctr images import` takes.
//!
//! The pause image (the pod sandbox) is built the same way from `pause.c`, compiled with the
//! system C compiler and `-static`: Kubernetes' pause is a C program of that kind, and a static
//! one needs no libraries in its image and nothing downloaded.

use std::io;
use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

/// The pause program's source (see the module docs).
const PAUSE_C: &str = include_str!("pause.c");

/// The reference the kubelet cluster's containerd uses as its sandbox image.
pub const PAUSE_IMAGE: &str = "keyd.test/pause:1";

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot run {program}")]
    Spawn {
        program: &'static str,
        #[source]
        io: io::Error,
    },
    #[error("{program} failed on {path}: {stderr}")]
    Failed {
        program: &'static str,
        path: PathBuf,
        stderr: String,
    },
    #[error("{path} needs {library}, which ldd cannot find")]
    MissingLibrary { path: PathBuf, library: String },
    #[error("{path}")]
    Io {
        path: PathBuf,
        #[source]
        io: io::Error,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |io| ImageError::Io {
        path: path.to_owned(),
        io,
    }
}

/// An image to build: files copied from the host, and the command it runs by default.
#[derive(Debug, Clone)]
pub struct Image {
    reference: String,
    /// (on the host, in the image); the image path is absolute.
    files: Vec<(PathBuf, PathBuf)>,
    entrypoint: Vec<String>,
}

impl Image {
    /// An empty image named `reference` (e.g. `keyd.test/keyctl:dev`; a pod names it with
    /// `imagePullPolicy: Never`, as nothing can be pulled).
    pub fn new(reference: &str) -> Self {
        Self {
            reference: reference.to_owned(),
            files: Vec::new(),
            entrypoint: Vec::new(),
        }
    }

    pub fn reference(&self) -> &str {
        &self.reference
    }

    /// Adds the executable `host` at `at` in the image, and every shared library it loads at
    /// the path it is loaded from on the host.
    pub fn binary(mut self, host: &Path, at: &str) -> Result<Self, ImageError> {
        self.files.push((host.to_owned(), PathBuf::from(at)));
        for library in shared_libraries(host)? {
            if !self.files.iter().any(|(_, at)| *at == library) {
                self.files.push((library.clone(), library));
            }
        }
        Ok(self)
    }

    /// The command the image runs when a pod names none.
    pub fn entrypoint(mut self, command: &[&str]) -> Self {
        self.entrypoint = command.iter().map(|s| (*s).to_owned()).collect();
        self
    }

    /// Writes the image as a docker-archive tarball under `work` (a directory of its own) and
    /// returns its path.
    pub fn write_archive(&self, work: &Path) -> Result<PathBuf, ImageError> {
        let rootfs = work.join("rootfs");
        for (host, at) in &self.files {
            let to = rootfs.join(at.strip_prefix("/").unwrap_or(at));
            let parent = to.parent().unwrap_or(&rootfs);
            std::fs::create_dir_all(parent).map_err(io_at(parent))?;
            // Follows symbolic links (the loader's /lib64 path is one): the image gets the file.
            std::fs::copy(host, &to).map_err(io_at(host))?;
        }
        let archive = work.join("archive");
        std::fs::create_dir_all(&archive).map_err(io_at(&archive))?;
        let layer = archive.join("layer.tar");
        tar(&rootfs, &layer, &["."])?;
        let layer_bytes = std::fs::read(&layer).map_err(io_at(&layer))?;
        let diff_id = format!("sha256:{}", hex::encode(Sha256::digest(&layer_bytes)));
        let config = serde_json::json!({
            "architecture": "amd64",
            "os": "linux",
            "config": {
                "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                "Entrypoint": if self.entrypoint.is_empty() {
                    serde_json::Value::Null
                } else {
                    serde_json::json!(self.entrypoint)
                },
            },
            "rootfs": { "type": "layers", "diff_ids": [diff_id] },
        });
        let config_bytes = serde_json::to_vec(&config).expect("a JSON value serializes");
        let config_name = format!("{}.json", hex::encode(Sha256::digest(&config_bytes)));
        let config_path = archive.join(&config_name);
        std::fs::write(&config_path, &config_bytes).map_err(io_at(&config_path))?;
        let manifest = serde_json::json!([{
            "Config": config_name,
            "RepoTags": [self.reference],
            "Layers": ["layer.tar"],
        }]);
        let manifest_path = archive.join("manifest.json");
        std::fs::write(&manifest_path, manifest.to_string()).map_err(io_at(&manifest_path))?;
        let out = work.join("image.tar");
        tar(
            &archive,
            &out,
            &["manifest.json", &config_name, "layer.tar"],
        )?;
        Ok(out)
    }
}

/// The pause image: `pause.c` compiled statically with `cc` under `work`.
pub fn pause_image(work: &Path) -> Result<Image, ImageError> {
    std::fs::create_dir_all(work).map_err(io_at(work))?;
    let source = work.join("pause.c");
    std::fs::write(&source, PAUSE_C).map_err(io_at(&source))?;
    let binary = work.join("pause");
    let out = Command::new("cc")
        .args(["-static", "-Os", "-s", "-o"])
        .arg(&binary)
        .arg(&source)
        .output()
        .map_err(|io| ImageError::Spawn { program: "cc", io })?;
    if !out.status.success() {
        return Err(ImageError::Failed {
            program: "cc",
            path: source,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    Image::new(PAUSE_IMAGE)
        .binary(&binary, "/pause")
        .map(|image| image.entrypoint(&["/pause"]))
}

/// The shared libraries `ldd` lists for `binary`, the dynamic loader included; none for a
/// static binary.
fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>, ImageError> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|io| ImageError::Spawn { program: "ldd", io })?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        // (glibc's ldd says so on stdout or stderr, by version, and exits 1.)
        if stdout.contains("not a dynamic executable")
            || stderr.contains("not a dynamic executable")
        {
            return Ok(Vec::new());
        }
        return Err(ImageError::Failed {
            program: "ldd",
            path: binary.to_owned(),
            stderr: stderr.into_owned(),
        });
    }
    let mut libraries = Vec::new();
    for line in stdout.lines().map(str::trim) {
        // "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)", "/lib64/ld-linux-x86-64.so.2
        // (0x...)", "linux-vdso.so.1 (0x...)" (in the kernel: no file), "statically linked".
        let path = match line.split_once(" => ") {
            Some((library, rest)) => {
                if rest.starts_with("not found") {
                    return Err(ImageError::MissingLibrary {
                        path: binary.to_owned(),
                        library: library.to_owned(),
                    });
                }
                rest.split_whitespace().next().unwrap_or_default()
            }
            None => line.split_whitespace().next().unwrap_or_default(),
        };
        if path.starts_with('/') {
            libraries.push(PathBuf::from(path));
        }
    }
    Ok(libraries)
}

/// `tar` of `entries` under `dir` into `out`, owned by root and with fixed times (the same
/// files make the same layer).
fn tar(dir: &Path, out: &Path, entries: &[&str]) -> Result<(), ImageError> {
    let result = Command::new("tar")
        .arg("-C")
        .arg(dir)
        .args([
            "--numeric-owner",
            "--owner=0",
            "--group=0",
            "--mtime=@0",
            "--sort=name",
            "-cf",
        ])
        .arg(out)
        .args(entries)
        .output()
        .map_err(|io| ImageError::Spawn { program: "tar", io })?;
    if !result.status.success() {
        return Err(ImageError::Failed {
            program: "tar",
            path: out.to_owned(),
            stderr: String::from_utf8_lossy(&result.stderr).into_owned(),
        });
    }
    Ok(())
}
