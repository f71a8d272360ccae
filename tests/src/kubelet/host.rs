//! What a kubelet node changes on the host outside its own directory, and how the fixture puts
//! it back: mounts, cgroups, the pod bridge, kernel settings the kubelet sets, stray shims and
//! pod logs. Every function here acts only on what one node made (its directory, its cgroup
//! root, its bridge, its containerd socket, its pods' UIDs), never by a broad name, so that
//! another cluster on the same machine is left alone.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The kernel settings kubelet 1.20 sets at start (`setupKernelTunables`, as it runs without
/// `protectKernelDefaults`): the fixture saves them first and writes them back when done.
const KUBELET_SYSCTLS: &[&str] = &[
    "vm/overcommit_memory",
    "vm/panic_on_oom",
    "kernel/panic",
    "kernel/panic_on_oops",
    "kernel/keys/root_maxkeys",
    "kernel/keys/root_maxbytes",
];

/// Directories outside its own that the node writes to whatever it is configured with: kubelet
/// 1.20's device-plugin socket and pod logs, libcni's result cache, the containerd shims' socket
/// directory. Parents come before their children.
const FIXED_DIRS: &[&str] = &[
    "/var/lib/kubelet",
    "/var/lib/kubelet/device-plugins",
    "/var/log/pods",
    "/var/log/containers",
    "/var/lib/cni",
    "/var/lib/cni/results",
    "/run/containerd",
    "/run/containerd/s",
];

/// Which of [`FIXED_DIRS`] the node makes (they did not exist before it started).
pub(super) struct FixedDirs(Vec<PathBuf>);

impl FixedDirs {
    pub(super) fn missing() -> Self {
        Self(
            FIXED_DIRS
                .iter()
                .map(PathBuf::from)
                .filter(|dir| !dir.exists())
                .collect(),
        )
    }

    /// Writes them to `path`, one a line, for the janitor.
    pub(super) fn write(&self, path: &Path) -> std::io::Result<()> {
        let lines: String = self
            .0
            .iter()
            .map(|d| format!("{}\n", d.display()))
            .collect();
        std::fs::write(path, lines)
    }

    /// Removes what the node left in them: its CNI results (files named NETWORK-SANDBOX-IF,
    /// for its `network` and for the loopback network of its `sandboxes`), the kubelet's
    /// device-plugin socket in a directory the node made, and then every one of the
    /// directories it made that is empty (children first). A directory that another program's
    /// files still fill stays.
    pub(super) fn clean(&self, network: &str, sandboxes: &[String]) {
        let prefix = format!("{network}-");
        for entry in std::fs::read_dir("/var/lib/cni/results")
            .into_iter()
            .flatten()
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(&prefix)
                || sandboxes.iter().any(|id| name.contains(&format!("-{id}-")))
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let plugins = Path::new("/var/lib/kubelet/device-plugins");
        if self.0.iter().any(|dir| dir == plugins) {
            for file in ["kubelet.sock", "DEPRECATION", "kubelet_internal_checkpoint"] {
                let _ = std::fs::remove_file(plugins.join(file));
            }
        }
        for dir in self.0.iter().rev() {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Saved kernel settings, as (path under /proc/sys, value).
pub(super) struct Sysctls(Vec<(PathBuf, String)>);

impl Sysctls {
    pub(super) fn save() -> Self {
        Self(
            KUBELET_SYSCTLS
                .iter()
                .map(|name| Path::new("/proc/sys").join(name))
                .filter_map(|path| {
                    let value = std::fs::read_to_string(&path).ok()?;
                    Some((path, value))
                })
                .collect(),
        )
    }

    /// Writes them to `path` as "PATH VALUE" lines, for the janitor.
    pub(super) fn write(&self, path: &Path) -> std::io::Result<()> {
        let lines: String = self
            .0
            .iter()
            .map(|(p, v)| format!("{} {}\n", p.display(), v.trim()))
            .collect();
        std::fs::write(path, lines)
    }

    pub(super) fn restore(&self) {
        for (path, value) in &self.0 {
            if std::fs::read_to_string(path).ok().as_deref() != Some(value.as_str())
                && let Err(e) = std::fs::write(path, value)
            {
                eprintln!("kubelet cluster: cannot restore {}: {e}", path.display());
            }
        }
    }
}

/// The mount points of this process' mount namespace, in mount order.
fn mount_points() -> Vec<(PathBuf, String)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| {
            // "ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER"
            let fields: Vec<&str> = line.split(' ').collect();
            let point = fields.get(4)?;
            let dash = fields.iter().position(|f| *f == "-")?;
            let fstype = fields.get(dash + 1)?;
            Some((PathBuf::from(unescape(point)), (*fstype).to_owned()))
        })
        .collect()
}

/// mountinfo writes space, tab, newline and backslash in paths as octal escapes.
fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        match rest
            .get(i + 1..i + 4)
            .and_then(|o| u8::from_str_radix(o, 8).ok())
        {
            Some(b) => {
                out.push(char::from(b));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The mounts at or under `dir`.
pub(super) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .map(|(point, _)| point)
        .filter(|point| point.starts_with(dir))
        .collect()
}

/// Unmounts everything at or under `dir`, newest first (a mount on top of another goes first),
/// detaching what is busy. Returns what is still mounted.
pub(super) fn unmount_all_under(dir: &Path) -> Vec<PathBuf> {
    for _ in 0..3 {
        let points = mounts_under(dir);
        if points.is_empty() {
            break;
        }
        for point in points.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(point).status();
        }
    }
    mounts_under(dir)
}

/// Every cgroup hierarchy mounted (v1 controllers, the v1 `name=systemd` one, and a v2 one).
pub(super) fn cgroup_mounts() -> Vec<PathBuf> {
    mount_points()
        .into_iter()
        .filter(|(_, fstype)| fstype == "cgroup" || fstype == "cgroup2")
        .map(|(point, _)| point)
        .collect()
}

/// Makes cgroup `name` (e.g. `/keyd-kubelet-123`) in every v1 hierarchy: kubelet 1.20 refuses a
/// `cgroupRoot` that is missing in one. A new cpuset cgroup starts with no CPUs and no memory
/// nodes; it gets its parent's.
pub(super) fn create_cgroup(name: &str) -> Result<(), String> {
    for mount in cgroup_mounts() {
        let dir = mount.join(name.trim_start_matches('/'));
        std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        for file in ["cpuset.cpus", "cpuset.mems"] {
            let parent = mount.join(file);
            if let Ok(value) = std::fs::read_to_string(&parent) {
                let child = dir.join(file);
                std::fs::write(&child, value.trim())
                    .map_err(|e| format!("{}: {e}", child.display()))?;
            }
        }
    }
    Ok(())
}

/// The processes in cgroup `name` or below it, in any hierarchy.
pub(super) fn cgroup_processes(name: &str) -> Vec<u32> {
    let mut pids = Vec::new();
    for mount in cgroup_mounts() {
        let mut stack = vec![mount.join(name.trim_start_matches('/'))];
        while let Some(dir) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            for entry in entries.flatten() {
                if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    stack.push(entry.path());
                }
            }
            let procs = std::fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
            pids.extend(procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()));
        }
    }
    pids.sort_unstable();
    pids.dedup();
    pids
}

/// Kills every process in cgroup `name` (the node's pods: the kubelet puts each under its
/// `cgroupRoot`) until none is left or `within` has passed.
pub(super) fn kill_cgroup(name: &str, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let pids = cgroup_processes(name);
        if pids.is_empty() || Instant::now() > deadline {
            if !pids.is_empty() {
                eprintln!("kubelet cluster: processes left in cgroup {name}: {pids:?}");
            }
            return;
        }
        kill(&pids, "KILL");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Removes cgroup `name` and everything below it from every hierarchy (deepest first: a cgroup
/// with children cannot be removed). A cgroup whose last process has just died can still be busy
/// for a moment, so each is retried for up to `within`.
pub(super) fn remove_cgroup(name: &str, within: Duration) {
    let deadline = Instant::now() + within;
    for mount in cgroup_mounts() {
        let top = mount.join(name.trim_start_matches('/'));
        let mut dirs = Vec::new();
        let mut stack = vec![top];
        while let Some(dir) = stack.pop() {
            if !dir.is_dir() {
                continue;
            }
            if let Ok(entries) = std::fs::read_dir(&dir) {
                for entry in entries.flatten() {
                    if entry.file_type().is_ok_and(|t| t.is_dir()) {
                        stack.push(entry.path());
                    }
                }
            }
            dirs.push(dir);
        }
        // Parents come before their children in `dirs`.
        for dir in dirs.iter().rev() {
            while let Err(e) = std::fs::remove_dir(dir) {
                if e.kind() == std::io::ErrorKind::NotFound {
                    break;
                }
                if Instant::now() > deadline {
                    eprintln!(
                        "kubelet cluster: cannot remove cgroup {}: {e}",
                        dir.display()
                    );
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

/// The containerd shims serving the containerd at `socket` (a shim outlives its containerd: it
/// is started with `-address SOCKET`).
pub(super) fn shims_of(socket: &Path) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let socket = socket.as_os_str().as_encoded_bytes();
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            let is_shim = args
                .first()
                .is_some_and(|a| a.ends_with(b"containerd-shim-runc-v2"));
            let ours = args
                .windows(2)
                .any(|w| w[0] == b"-address" && w[1] == socket);
            (is_shim && ours).then_some(pid)
        })
        .collect()
}

pub(super) fn kill(pids: &[u32], signal: &str) {
    if pids.is_empty() {
        return;
    }
    let _ = Command::new("kill")
        .arg(format!("-{signal}"))
        .args(pids.iter().map(u32::to_string))
        .stderr(std::process::Stdio::null())
        .status();
}

/// Deletes network interface `name` if it exists.
pub(super) fn delete_link(name: &str) {
    let _ = Command::new("ip")
        .args(["link", "del", name])
        .stderr(std::process::Stdio::null())
        .status();
}

/// Removes the logs the kubelet and containerd wrote for the pods with these UIDs: kubelet 1.20
/// writes them under /var/log/pods (a fixed path) and links them from /var/log/containers.
pub(super) fn remove_pod_logs(uids: &[String]) {
    if uids.is_empty() {
        return;
    }
    let pods = Path::new("/var/log/pods");
    let mut removed = Vec::new();
    for entry in std::fs::read_dir(pods).into_iter().flatten().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        // NAMESPACE_NAME_UID
        if uids.iter().any(|uid| name.ends_with(&format!("_{uid}"))) {
            let _ = std::fs::remove_dir_all(entry.path());
            removed.push(entry.path());
        }
    }
    for entry in std::fs::read_dir("/var/log/containers")
        .into_iter()
        .flatten()
        .flatten()
    {
        let target = std::fs::read_link(entry.path()).unwrap_or_default();
        if removed.iter().any(|dir| target.starts_with(dir)) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}
