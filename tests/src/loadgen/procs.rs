//! Child processes (keyd and the ceiling), each killed and reaped when its guard drops, and the
//! small plain-HTTP probe used to wait for keyd.

use std::fs::File;
use std::io::{BufRead as _, BufReader, Write as _};
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;

use super::Error;

/// Lines of a child's output quoted in an error.
const TAIL_LINES: usize = 30;

/// A running child process. Dropping the guard kills it (SIGKILL) and reaps it; the ceiling
/// additionally exits by itself when its stdin (held here) closes, so it does not outlive a
/// load generator that was itself killed.
#[derive(Debug)]
pub struct ChildGuard {
    what: &'static str,
    child: Child,
    stdin: Option<ChildStdin>,
    log: PathBuf,
}

impl ChildGuard {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// An error with the end of the child's output if it has exited.
    pub fn check_alive(&mut self) -> Result<(), Error> {
        match self.child.try_wait() {
            Ok(None) => Ok(()),
            Ok(Some(status)) => Err(Error::Exited {
                what: self.what,
                status,
                output: tail(&self.log),
            }),
            Err(source) => Err(Error::Io {
                what: format!("checking on {}", self.what),
                source,
            }),
        }
    }

    fn output(&self) -> String {
        tail(&self.log)
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        drop(self.stdin.take());
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// The last lines of a log file, for error messages.
fn tail(path: &Path) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_else(|e| format!("(cannot read {}: {e})", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(TAIL_LINES)..].join("\n")
}

fn create_log(path: &Path) -> Result<(File, File), Error> {
    let io_err = |source| Error::Io {
        what: format!("creating {}", path.display()),
        source,
    };
    let file = File::create(path).map_err(io_err)?;
    let second = file.try_clone().map_err(io_err)?;
    Ok((file, second))
}

/// Two distinct free loopback ports. Both listeners are held until both ports are known, so
/// the two differ; another process could still take one before keyd binds it (keyd then fails
/// to start with a clear error, and a rerun picks new ports).
fn free_ports() -> Result<(u16, u16), Error> {
    let bind = || {
        std::net::TcpListener::bind("127.0.0.1:0").map_err(|source| Error::Io {
            what: "finding a free loopback port".into(),
            source,
        })
    };
    let (a, b) = (bind()?, bind()?);
    let port = |l: &std::net::TcpListener| {
        l.local_addr()
            .map(|a| a.port())
            .map_err(|source| Error::Io {
                what: "finding a free loopback port".into(),
                source,
            })
    };
    Ok((port(&a)?, port(&b)?))
}

/// Starts `keyd dev` with its data directory, log and PKI under `work_dir`. Every `KEYD_*`
/// variable is removed from its environment, so it runs with the defaults whatever the caller's
/// shell holds.
pub fn spawn_keyd(
    exe: &Path,
    work_dir: &Path,
) -> Result<(ChildGuard, SocketAddr, SocketAddr), Error> {
    let (api_port, ops_port) = free_ports()?;
    let api = SocketAddr::from(([127, 0, 0, 1], api_port));
    let ops = SocketAddr::from(([127, 0, 0, 1], ops_port));
    let log = work_dir.join("keyd.log");
    let (out, err) = create_log(&log)?;
    let mut cmd = Command::new(exe);
    cmd.arg("dev")
        .arg("--data-dir")
        .arg(work_dir.join("keyd"))
        .arg("--listen")
        .arg(api.to_string())
        .arg("--ops-listen")
        .arg(ops.to_string())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("KEYD_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd.spawn().map_err(|source| Error::Spawn {
        what: "keyd",
        path: exe.to_owned(),
        source,
    })?;
    Ok((
        ChildGuard {
            what: "keyd",
            child,
            stdin: None,
            log,
        },
        api,
        ops,
    ))
}

/// Polls keyd's `/readyz` until it answers 200; fails early if keyd exits.
pub async fn wait_keyd_ready(
    keyd: &mut ChildGuard,
    ops: SocketAddr,
    within: Duration,
) -> Result<(), Error> {
    let deadline = Instant::now() + within;
    loop {
        keyd.check_alive()?;
        if let Ok(Ok((200, _))) =
            tokio::time::timeout(Duration::from_secs(2), http_get_plain(ops, "/readyz")).await
        {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::NotReady {
                what: "keyd",
                waited: within,
                output: keyd.output(),
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `GET http://addr/path` over plain HTTP/1.1: the status and the body.
pub async fn http_get_plain(addr: SocketAddr, path: &str) -> Result<(u16, Bytes), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    conn.abort();
    Ok((status, body))
}

/// Starts the ceiling server (`ceiling_exe ceiling ...`) with keyd's server certificate and CA
/// from `pki_dir`, serving `body` with `etag`. Its body file and log go to `work_dir`, named
/// after `name`. Returns once it has printed the address it listens on.
pub fn spawn_ceiling(
    ceiling_exe: &Path,
    pki_dir: &Path,
    work_dir: &Path,
    name: &str,
    body: &[u8],
    etag: &str,
) -> Result<(ChildGuard, SocketAddr), Error> {
    // The body is a real bundle, key material included: private file, private directory.
    let body_path = work_dir.join(format!("ceiling-{name}.json"));
    let write_err = |source| Error::Io {
        what: format!("writing {}", body_path.display()),
        source,
    };
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&body_path)
        .and_then(|mut f| f.write_all(body))
        .map_err(write_err)?;
    let log = work_dir.join(format!("ceiling-{name}.log"));
    let (err, _) = create_log(&log)?;
    let mut child = Command::new(ceiling_exe)
        .arg("ceiling")
        .arg("--ca")
        .arg(pki_dir.join("ca.pem"))
        .arg("--cert")
        .arg(pki_dir.join("server.pem"))
        .arg("--key")
        .arg(pki_dir.join("server-key.pem"))
        .arg("--body")
        .arg(&body_path)
        .arg("--etag")
        .arg(etag)
        .arg("--listen")
        .arg("127.0.0.1:0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .map_err(|source| Error::Spawn {
            what: "the ceiling server",
            path: ceiling_exe.to_owned(),
            source,
        })?;
    let stdin = child.stdin.take();
    let stdout = child.stdout.take();
    let mut guard = ChildGuard {
        what: "the ceiling server",
        child,
        stdin,
        log,
    };
    // Its first stdout line is `listening on ADDR`. Read on a thread so that a child that
    // hangs before printing cannot hang us.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        if let Some(out) = stdout {
            let _ = BufReader::new(out).read_line(&mut line);
        }
        let _ = tx.send(line);
    });
    let waited = Duration::from_secs(15);
    let line = rx.recv_timeout(waited).unwrap_or_default();
    let addr = line
        .trim()
        .strip_prefix(super::ceiling::LISTENING_PREFIX)
        .and_then(|a| a.parse::<SocketAddr>().ok());
    match addr {
        Some(addr) => Ok((guard, addr)),
        None => {
            guard.check_alive()?;
            Err(Error::NotReady {
                what: "the ceiling server",
                waited,
                output: format!("stdout: {line:?}\n{}", guard.output()),
            })
        }
    }
}

/// CPU time (user + system) a process has used so far, from `/proc/<pid>/stat`.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; fields after its closing
    // parenthesis are plain numbers. utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // In clock ticks of USER_HZ, which is 100 on x86 and Arm Linux (the ABI fixes it there).
    Some((utime + stime) as f64 / 100.0)
}

/// CPU time all cores have spent busy so far (user, nice, system, irq, softirq, steal), from the
/// first line of `/proc/stat`: with the per-process numbers it shows whether anything else was
/// competing for the cores during a run.
pub fn system_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .map(|f| f.parse().ok())
        .collect::<Option<_>>()?;
    // user nice system idle iowait irq softirq steal ...
    let busy = v.first()? + v.get(1)? + v.get(2)? + v.get(5)? + v.get(6)? + v.get(7)?;
    Some(busy as f64 / 100.0)
}
