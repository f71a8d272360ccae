//! A real one-node Kubernetes cluster: etcd, kube-apiserver and kube-controller-manager (as
//! [`crate::cluster`] runs them, set up for nodes), kube-scheduler, a private containerd and a
//! kubelet, all on this machine, running pods from images assembled here from host binaries
//! ([`image`]): no registry is reachable and no base image may be pulled.
//!
//! The node (named [`NODE`]) keeps to itself so that it never touches a system containerd or
//! another test's node:
//! - containerd has its own root, state, socket, runc root and config under the node's
//!   directory, with the CRI plugin, overlayfs and a locally imported pause image as the sandbox;
//! - the pod network is CNI's `bridge` + `host-local` (+ `loopback`, which containerd adds) from
//!   Debian's containernetworking-plugins, on a bridge of its own (`kdkN`, 10.244.N.0/24) that
//!   the fixture creates with the gateway address, which is also the node's InternalIP (kubelet
//!   1.20 refuses a loopback one); nothing forwards or masquerades, so pods reach the node and
//!   each other but not beyond (no kube-proxy: nothing here needs a Service address);
//! - the kubelet (cgroupfs driver, cgroup v1 as on these machines) has its own root directory and
//!   puts pods under a cgroup root of its own; it makes no iptables chains.
//!
//! A few paths are fixed in kubelet 1.20 and containerd 1.6 whatever they are configured with:
//! pod logs under /var/log/pods (linked from /var/log/containers), the kubelet's device-plugin
//! socket /var/lib/kubelet/device-plugins/kubelet.sock, libcni's result cache /var/lib/cni and
//! the shims' sockets under /run/containerd/s. So the node must not run beside a real kubelet on
//! the same host (the socket would be taken over), and two of these clusters at once share those
//! directories (each removes only its own files).
//!
//! Dropping the cluster stops everything and puts the host back: it kills the pods' processes,
//! deletes containerd's tasks (so the shims exit), stops containerd, unmounts what the kubelet and
//! containerd mounted under the node's directory, deletes the bridge and the cgroups, restores
//! the kernel settings the kubelet changed, removes its pods' logs and its files in the fixed
//! directories above (and those directories, if it made them), and last stops the API server.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod host;
pub mod image;

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::Api;

use crate::cluster::{self, Cluster, Guarded, free_port};
use image::{Image, ImageError};

/// The node's name (and its identity, `system:node:keyd-node`).
pub const NODE: &str = "keyd-node";

/// The controllers the node's workloads need: pods for DaemonSets, StatefulSets and
/// Deployments, every namespace's `default` service account and its token, owner-based
/// deletion, and the node lifecycle (the kubelet registers its node with the
/// `node.kubernetes.io/not-ready` taint, and only that controller takes it off).
const CONTROLLERS: &[&str] = &[
    "nodelifecycle",
    "serviceaccount",
    "serviceaccount-token",
    "daemonset",
    "statefulset",
    "deployment",
    "replicaset",
    "garbagecollector",
];

/// The default cache of kubelet and kube-scheduler (`scripts/kube-node.sh` builds it).
const NODE_CACHE: &str = "/var/cache/keyd-test/kube-node-1.20";

/// Undoes what the node did if the test process dies without dropping it (see the script).
const JANITOR_SH: &str = include_str!("janitor.sh");

/// Where Debian's containernetworking-plugins puts the CNI plugins.
const CNI_BIN: &str = "/usr/lib/cni";

/// The programs a node runs besides the Kubernetes ones.
#[derive(Debug, Clone)]
pub struct NodeBinaries {
    pub kubelet: PathBuf,
    pub scheduler: PathBuf,
    pub containerd: PathBuf,
    pub ctr: PathBuf,
}

/// Finds everything the cluster runs, or says what is missing: kubelet and kube-scheduler
/// (`KUBE_TEST_KUBELET`, `KUBE_TEST_SCHEDULER`, else the cache of `scripts/kube-node.sh`),
/// the API server's binaries ([`cluster::binaries`]), containerd, runc, the CNI plugins, and the
/// host programs the fixture and the kubelet call. Needs root.
pub fn binaries() -> Result<NodeBinaries, String> {
    if !crate::prereq::is_root() {
        return Err("not root (the kubelet mounts, and containerd makes namespaces)".to_owned());
    }
    let (apiserver, _etcd) = cluster::binaries()?;
    let cached = |var: &str, name: &str| {
        let path = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| Path::new(NODE_CACHE).join(name));
        if path.is_file() {
            Ok(path)
        } else {
            Err(format!(
                "{name} not found at {} (set {var} or run scripts/kube-node.sh)",
                path.display()
            ))
        }
    };
    let kubelet = cached("KUBE_TEST_KUBELET", "kubelet")?;
    let scheduler = cached("KUBE_TEST_SCHEDULER", "kube-scheduler")?;
    let controller_manager = apiserver.with_file_name("kube-controller-manager");
    if !controller_manager.is_file() {
        return Err(format!(
            "{} missing (scripts/kube-apiserver.sh builds it)",
            controller_manager.display()
        ));
    }
    // (Debian package in parentheses.)
    let on_path = [
        ("containerd", "containerd"),
        ("containerd-shim-runc-v2", "containerd"),
        ("ctr", "containerd"),
        ("runc", "runc"),
        // The kubelet's: volumes (tmpfs for secrets and tokens), disk usage of pod logs.
        ("mount", "mount"),
        ("umount", "mount"),
        ("du", "coreutils"),
        ("nice", "coreutils"),
        ("find", "findutils"),
        // The fixture's own: the bridge, stopping stray shims, images, the pause program.
        ("ip", "iproute2"),
        ("kill", "procps"),
        ("tar", "tar"),
        ("ldd", "libc-bin"),
        ("cc", "build-essential"),
    ];
    let mut found = std::collections::HashMap::new();
    for (program, package) in on_path {
        let path = which(program)
            .ok_or_else(|| format!("{program} not found on PATH (apt-get install {package})"))?;
        found.insert(program, path);
    }
    for plugin in ["bridge", "host-local", "loopback"] {
        let path = Path::new(CNI_BIN).join(plugin);
        if !path.is_file() {
            return Err(format!(
                "CNI plugin {} missing (apt-get install containernetworking-plugins)",
                path.display()
            ));
        }
    }
    // `cc -static` needs the static C library.
    if !Path::new("/usr/lib/x86_64-linux-gnu/libc.a").is_file() {
        return Err("libc.a missing (apt-get install libc6-dev)".to_owned());
    }
    Ok(NodeBinaries {
        kubelet,
        scheduler,
        containerd: found.remove("containerd").unwrap(),
        ctr: found.remove("ctr").unwrap(),
    })
}

/// `program` on PATH.
pub fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// A binary of this workspace (e.g. `keyctl`), from the target directory this test runs from:
/// `cargo test --workspace` builds every package's binaries before it runs a test.
pub fn workspace_binary(name: &str) -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // target/debug/deps/TEST-HASH -> target/debug/NAME
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name))
        .ok_or_else(|| format!("no target directory above {}", exe.display()))?;
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "{} not built (cargo build --bin {name}, or cargo test --workspace)",
            path.display()
        ))
    }
}

/// The one-node cluster. See the module docs.
pub struct KubeletCluster {
    /// etcd, the API server and the controller manager (always `Some` until dropped).
    cluster: Option<Cluster>,
    /// The node's directory: containerd's and the kubelet's state, configs and logs.
    dir: PathBuf,
    /// The directory holding `dir` and the API server's.
    top: PathBuf,
    binaries: NodeBinaries,
    socket: PathBuf,
    bridge: String,
    /// The pod network, N in 10.244.N.0/24.
    subnet: u8,
    cgroup_root: String,
    sysctls: host::Sysctls,
    fixed_dirs: host::FixedDirs,
    scheduler: Option<Guarded>,
    containerd: Option<Guarded>,
    kubelet: Option<Guarded>,
    /// Its stdin; closing it (Drop, or this process dying) sets it to work.
    janitor: Option<(Child, ChildStdin)>,
}

impl std::fmt::Debug for KubeletCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletCluster")
            .field("cluster", &self.cluster)
            .field("dir", &self.dir)
            .field("bridge", &self.bridge)
            .finish_non_exhaustive()
    }
}

impl KubeletCluster {
    /// Starts the whole cluster and returns once the node is Ready (and untainted, so that pods
    /// are scheduled onto it) and the `default` namespace's service account has its token
    /// (before then, the API server refuses pods). Panics, with the log tail of what failed, if
    /// that takes longer than about three minutes. Check [`binaries`] first.
    pub async fn start() -> Self {
        let binaries = binaries().unwrap();
        let tmp = tempfile::Builder::new()
            .prefix("keyd-kubelet.")
            .tempdir()
            .unwrap();
        let dir = tmp.path().join("node");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::create_dir_all(tmp.path().join("api")).unwrap();
        let options = cluster::Options {
            nodes: vec![NODE.to_owned()],
            ..cluster::Options::default()
        };
        let started = Instant::now();
        let mut cluster = Cluster::start_with(&tmp.path().join("api"), &options).await;
        cluster.start_controllers(CONTROLLERS);
        eprintln!(
            "kubelet cluster: API server ready in {:.1?}",
            started.elapsed()
        );
        let subnet = free_subnet();
        // From here on Drop (or the janitor) removes it, and only once nothing is mounted
        // under it.
        let top = tmp.keep();
        let mut node = Self {
            cluster: Some(cluster),
            socket: dir.join("containerd.sock"),
            dir,
            top,
            binaries,
            bridge: format!("kdk{subnet}"),
            subnet,
            cgroup_root: format!("/keyd-kubelet-{}", std::process::id()),
            sysctls: host::Sysctls::save(),
            fixed_dirs: host::FixedDirs::missing(),
            scheduler: None,
            containerd: None,
            kubelet: None,
            janitor: None,
        };
        // From here on, a panic drops `node`, which undoes whatever was done so far, and if
        // this process is killed, the janitor does.
        node.start_janitor();
        node.start_scheduler();
        node.create_bridge();
        host::create_cgroup(&node.cgroup_root).unwrap();
        node.start_containerd().await;
        let pause = image::pause_image(&node.dir.join("pause")).unwrap();
        node.import(&pause).unwrap();
        eprintln!(
            "kubelet cluster: containerd up, pause image imported in {:.1?}",
            started.elapsed()
        );
        node.start_kubelet();
        node.wait_ready(Duration::from_secs(120)).await;
        eprintln!("kubelet cluster: node Ready in {:.1?}", started.elapsed());
        node.wait_service_account(Duration::from_secs(60)).await;
        node
    }

    /// etcd, the API server and the controller manager.
    pub fn cluster(&self) -> &Cluster {
        self.cluster
            .as_ref()
            .expect("the cluster is there until dropped")
    }

    /// A client with the admin's token.
    pub async fn client(&self) -> kube::Client {
        self.cluster().client().await
    }

    /// Builds `image` and imports it into the node's containerd, where pods find it by its
    /// reference (with `imagePullPolicy: Never`).
    pub fn import(&self, image: &Image) -> Result<(), ImageError> {
        let work = self.dir.join("images").join(
            image
                .reference()
                .replace(|c: char| !c.is_ascii_alphanumeric(), "_"),
        );
        let _ = std::fs::remove_dir_all(&work);
        let archive = image.write_archive(&work)?;
        let out = Command::new(&self.binaries.ctr)
            .args(["-n", "k8s.io", "--timeout", "60s", "--address"])
            .arg(&self.socket)
            .args(["images", "import"])
            .arg(&archive)
            .output()
            .map_err(|io| ImageError::Spawn { program: "ctr", io })?;
        let _ = std::fs::remove_dir_all(&work);
        if !out.status.success() {
            return Err(ImageError::Failed {
                program: "ctr",
                path: archive,
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// The last `lines` lines of the kubelet's log.
    pub fn kubelet_log(&self, lines: usize) -> String {
        self.kubelet
            .as_ref()
            .map(|g| g.log_tail_lines(lines))
            .unwrap_or_default()
    }

    /// The last `lines` lines of containerd's log.
    pub fn containerd_log(&self, lines: usize) -> String {
        self.containerd
            .as_ref()
            .map(|g| g.log_tail_lines(lines))
            .unwrap_or_default()
    }

    /// The pod bridge's name.
    pub fn bridge(&self) -> &str {
        &self.bridge
    }

    /// The node's directory (containerd's and the kubelet's state; removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The address pods reach the node at (the bridge's), which is also its InternalIP.
    pub fn node_ip(&self) -> String {
        format!("10.244.{}.1", self.subnet)
    }

    fn start_janitor(&mut self) {
        self.sysctls.write(&self.dir.join("sysctls")).unwrap();
        self.fixed_dirs.write(&self.dir.join("made-dirs")).unwrap();
        let mut child = Command::new("bash")
            .arg("-c")
            .arg(JANITOR_SH)
            .arg("janitor")
            .arg(&self.top)
            .arg(&self.dir)
            .arg(&self.socket)
            .arg(&self.bridge)
            .arg(&self.cgroup_root)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("cannot start the kubelet cluster's janitor");
        let stdin = child.stdin.take().expect("piped");
        self.janitor = Some((child, stdin));
    }

    fn start_scheduler(&mut self) {
        self.scheduler = Some(Guarded::spawn(
            "kube-scheduler",
            &self.binaries.scheduler,
            &[
                format!("--kubeconfig={}", self.cluster().kubeconfig.display()),
                "--leader-elect=false".into(),
                // No listeners: nothing to collide with other tests on this machine.
                "--port=0".into(),
                "--secure-port=0".into(),
            ],
            self.dir.join("scheduler.log"),
        ));
    }

    /// The pod bridge, made here rather than by the CNI plugin so that the node's address exists
    /// before the kubelet starts (and so that nothing but the fixture gives it an address).
    fn create_bridge(&self) {
        let ip = self.node_ip();
        for args in [
            vec!["link", "add", &self.bridge, "type", "bridge"],
            vec!["addr", "add", &format!("{ip}/24"), "dev", &self.bridge],
            vec!["link", "set", &self.bridge, "up"],
        ] {
            let out = Command::new("ip").args(&args).output().unwrap();
            assert!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    async fn start_containerd(&mut self) {
        let d = self.dir.join("containerd");
        let cni_conf = self.dir.join("cni/net.d");
        std::fs::create_dir_all(&cni_conf).unwrap();
        let subnet = format!("10.244.{}.0/24", self.subnet);
        let gateway = self.node_ip();
        let network = serde_json::json!({
            "cniVersion": "0.4.0",
            // Named after the bridge: libcni keeps results under /var/lib/cni/results by this
            // name, and Drop removes this node's.
            "name": self.bridge,
            "plugins": [{
                "type": "bridge",
                "bridge": self.bridge,
                // No gateway address from the plugin (the fixture gave the bridge one) and so no
                // IP forwarding switched on for the whole host; no masquerading.
                "isGateway": false,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "dataDir": self.dir.join("cni/ipam"),
                    "ranges": [[{ "subnet": subnet, "gateway": gateway }]],
                    "routes": [{ "dst": "0.0.0.0/0", "gw": gateway }],
                },
            }],
        });
        std::fs::write(cni_conf.join("10-keyd.conflist"), network.to_string()).unwrap();
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
# Snapshotters this machine cannot use: without this they only log why at start.
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]

[grpc]
  address = "{socket}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"

[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{pause}"
  # Pods' network namespaces under the state directory, not /var/run/netns.
  netns_mounts_under_state_dir = true
  # These machines run as root without CAP_SYS_RESOURCE, so no process may lower its
  # oom_score_adj: runc fails to start a pod sandbox at the kubelet's -998 ("failed to update
  # /proc/self/oom_score_adj: Permission denied"). This keeps every container's at or above
  # containerd's own, as for rootless containerd.
  restrict_oom_score_adj = true
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        # runc's state, by default under /run/containerd/runc.
        Root = "{runc}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{cni_bin}"
    conf_dir = "{cni_conf}"
"#,
            root = d.join("root").display(),
            state = d.join("state").display(),
            socket = self.socket.display(),
            opt = d.join("opt").display(),
            pause = image::PAUSE_IMAGE,
            runc = d.join("runc").display(),
            cni_bin = CNI_BIN,
            cni_conf = cni_conf.display(),
        );
        std::fs::create_dir_all(&d).unwrap();
        let config_path = d.join("config.toml");
        std::fs::write(&config_path, config).unwrap();
        let mut containerd = Guarded::spawn(
            "containerd",
            &self.binaries.containerd,
            &[format!("--config={}", config_path.display())],
            self.dir.join("containerd.log"),
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        while UnixStream::connect(&self.socket).is_err() {
            if containerd.exited() || Instant::now() > deadline {
                let tail = containerd.log_tail_lines(40);
                self.containerd = Some(containerd);
                panic!("containerd did not start:\n{tail}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.containerd = Some(containerd);
    }

    fn start_kubelet(&mut self) {
        let root = self.dir.join("kubelet");
        std::fs::create_dir_all(&root).unwrap();
        let kubeconfig = self.dir.join("kubelet.kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: {url}\n    \
                 certificate-authority: {ca}\nusers:\n- name: node\n  user:\n    token: {token}\n\
                 contexts:\n- name: node\n  context:\n    cluster: test\n    user: node\n\
                 current-context: node\n",
                url = self.cluster().url,
                ca = self.cluster().ca_pem().display(),
                token = cluster::node_token(NODE),
            ),
        )
        .unwrap();
        let config = serde_json::json!({
            "kind": "KubeletConfiguration",
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "address": self.node_ip(),
            "port": free_port(),
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": free_port(),
            // The API server reaches the kubelet (logs, exec) without a client certificate.
            "authentication": { "anonymous": { "enabled": true }, "webhook": { "enabled": false } },
            "authorization": { "mode": "AlwaysAllow" },
            "cgroupDriver": "cgroupfs",
            "cgroupRoot": self.cgroup_root,
            "failSwapOn": false,
            "podCIDR": format!("10.244.{}.0/24", self.subnet),
            // No iptables chains in the host's tables.
            "makeIPTablesUtilChains": false,
            "volumePluginDir": self.dir.join("volume-plugins"),
            // The images cannot be pulled again: never collect them, and evict nothing for a
            // full disk short of a really full one.
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "100Mi",
                "nodefs.available": "1%",
                "imagefs.available": "1%",
                "nodefs.inodesFree": "1%",
            },
            "serializeImagePulls": false,
            // The node's status every 2 s rather than 10: it is Ready, and untainted, sooner.
            "nodeStatusUpdateFrequency": "2s",
        });
        let config_path = self.dir.join("kubelet.json");
        std::fs::write(&config_path, config.to_string()).unwrap();
        self.kubelet = Some(Guarded::spawn(
            "kubelet",
            &self.binaries.kubelet,
            &[
                format!("--config={}", config_path.display()),
                format!("--kubeconfig={}", kubeconfig.display()),
                format!("--root-dir={}", root.display()),
                // (Its default is /var/lib/kubelet/pki, whatever the root directory.)
                format!("--cert-dir={}", root.join("pki").display()),
                "--container-runtime=remote".into(),
                format!(
                    "--container-runtime-endpoint=unix://{}",
                    self.socket.display()
                ),
                format!("--hostname-override={NODE}"),
                format!("--node-ip={}", self.node_ip()),
                "--v=2".into(),
            ],
            self.dir.join("kubelet.log"),
        ));
    }

    /// Panics with the log tails if the kubelet or containerd has exited.
    fn check_running(&mut self) {
        for (name, process) in [
            ("kubelet", &mut self.kubelet),
            ("containerd", &mut self.containerd),
        ] {
            if let Some(p) = process
                && p.exited()
            {
                panic!("{name} exited:\n{}", p.log_tail_lines(60));
            }
        }
    }

    async fn wait_ready(&mut self, within: Duration) {
        let nodes = Api::<Node>::all(self.client().await);
        let deadline = Instant::now() + within;
        let mut last = "not registered".to_owned();
        while Instant::now() < deadline {
            self.check_running();
            if let Ok(Some(node)) = nodes.get_opt(NODE).await {
                let not_ready_taint = node
                    .spec
                    .and_then(|s| s.taints)
                    .unwrap_or_default()
                    .into_iter()
                    .any(|t| t.key == "node.kubernetes.io/not-ready");
                let ready = node
                    .status
                    .and_then(|s| s.conditions)
                    .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"));
                match ready {
                    Some(c) if c.status == "True" && !not_ready_taint => return,
                    Some(c) if c.status == "True" => {
                        last = "Ready, still tainted not-ready".to_owned()
                    }
                    Some(c) => {
                        last = format!("Ready={}: {}", c.status, c.message.unwrap_or_default())
                    }
                    None => last = "no Ready condition".to_owned(),
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        panic!(
            "node {NODE} not Ready after {within:?} ({last})\n--- kubelet:\n{}\n--- containerd:\n{}",
            self.kubelet_log(60),
            self.containerd_log(20)
        );
    }

    /// Waits until the `default` namespace's `default` service account has its token secret:
    /// until then the ServiceAccount admission plugin refuses every pod there.
    async fn wait_service_account(&self, within: Duration) {
        let accounts = Api::<ServiceAccount>::namespaced(self.client().await, "default");
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Ok(Some(sa)) = accounts.get_opt("default").await
                && sa.secrets.is_some_and(|s| !s.is_empty())
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "no token for service account default/default after {within:?}:\n{}",
            self.cluster().controller_manager_log()
        );
    }

    /// Deletes every containerd task (each container's process record), so that the shims
    /// exit and remove their sockets.
    fn delete_tasks(&self) {
        let ctr = |args: &[&str]| {
            Command::new(&self.binaries.ctr)
                .args(["-n", "k8s.io", "--timeout", "10s", "--address"])
                .arg(&self.socket)
                .args(args)
                .output()
        };
        let Ok(out) = ctr(&["tasks", "ls", "-q"]) else {
            return;
        };
        let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if ids.is_empty() {
            return;
        }
        let mut args = vec!["tasks", "delete", "-f"];
        args.extend(ids.iter().map(String::as_str));
        if let Ok(out) = ctr(&args)
            && !out.status.success()
        {
            // A task that ended by itself since the listing is already gone: not worth a word.
            let errors = String::from_utf8_lossy(&out.stderr)
                .lines()
                .filter(|l| !l.contains("not found"))
                .collect::<Vec<_>>()
                .join("\n");
            if !errors.is_empty() {
                eprintln!("kubelet cluster: ctr tasks delete: {errors}");
            }
        }
    }
}

impl Drop for KubeletCluster {
    fn drop(&mut self) {
        let names = |dir: &Path| -> Vec<String> {
            std::fs::read_dir(dir)
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        };
        let pods = names(&self.dir.join("kubelet/pods"));
        let sandboxes = names(
            &self
                .dir
                .join("containerd/root/io.containerd.grpc.v1.cri/sandboxes"),
        );
        // The kubelet first, so that nothing restarts what follows; then the pods' processes.
        drop(self.kubelet.take());
        drop(self.scheduler.take());
        host::kill_cgroup(&self.cgroup_root, Duration::from_secs(10));
        if self.containerd.is_some() {
            self.delete_tasks();
        }
        drop(self.containerd.take());
        // A shim whose task containerd could not delete is still serving it.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let shims = host::shims_of(&self.socket);
            if shims.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                eprintln!("kubelet cluster: shims left running: {shims:?}");
                break;
            }
            host::kill(&shims, "KILL");
            std::thread::sleep(Duration::from_millis(100));
        }
        let mounted = host::unmount_all_under(&self.top);
        host::delete_link(&self.bridge);
        host::remove_cgroup(&self.cgroup_root, Duration::from_secs(5));
        self.sysctls.restore();
        host::remove_pod_logs(&pods);
        self.fixed_dirs.clean(&self.bridge, &sandboxes);
        // The API server, the controller manager and etcd last: then nothing writes under
        // `top` any more.
        drop(self.cluster.take());
        if mounted.is_empty() {
            let _ = std::fs::remove_dir_all(&self.top);
            // With the directory gone, the janitor has nothing to do.
            if let Some((mut child, stdin)) = self.janitor.take() {
                drop(stdin);
                let _ = child.wait();
            }
        } else {
            // Removing files through a mount would remove them from what is mounted.
            eprintln!(
                "kubelet cluster: still mounted, {} left in place: {mounted:?}",
                self.top.display()
            );
        }
    }
}

/// N for a pod network 10.244.N.0/24 (and bridge `kdkN`) that no address or route on this
/// machine uses yet, starting from one that depends on the process so that two test processes
/// are unlikely to pick the same.
fn free_subnet() -> u8 {
    let ip = |args: &[&str]| {
        Command::new("ip")
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    };
    let used = format!(
        "{}{}",
        ip(&["-4", "-o", "addr", "show"]),
        ip(&["-4", "route", "show", "table", "all"])
    );
    let start = std::process::id() % 200;
    (0..200)
        .map(|i| ((start + i) % 200 + 20) as u8)
        .find(|n| {
            !used.contains(&format!("10.244.{n}."))
                && !Path::new(&format!("/sys/class/net/kdk{n}")).exists()
        })
        .expect("no free 10.244.N.0/24 among 200")
}
