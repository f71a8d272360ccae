//! `deploy/node-shim/` runs a node-shim that accepts its configuration: the ConfigMap's TOML
//! with the environment the DaemonSet sets (the downward API's node name and address filled in
//! as the kubelet would) goes through node-shim's own loader and validation, and the real binary
//! takes the DaemonSet's arguments (`--check` validates and exits). The files it names are ones
//! the pod mounts, and what it expects of keyd (ports, token audience) is what keyd's manifests
//! give.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use keyd_node_shim::config::{ENV_VARS, Encrypt, IdentitySource, Mode, RawConfig};
use keyd_tests::manifests::{self, MountedFile, PodContainer};

const NODE: &str = "node-a";
const HOST_IP: &str = "192.0.2.10";

fn pod() -> PodContainer {
    PodContainer::of(
        "node-shim/daemonset.yaml",
        "DaemonSet",
        "node-shim",
        "node-shim",
    )
}

fn env(pod: &PodContainer) -> BTreeMap<String, String> {
    pod.resolved_env(&BTreeMap::from([
        ("spec.nodeName", NODE),
        ("status.hostIP", HOST_IP),
    ]))
}

/// The port of keyd's Service named `name`.
fn keyd_service_port(name: &str) -> u64 {
    manifests::object("keyd/service.yaml", "Service", "keyd")["spec"]["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == name)
        .and_then(|p| p["port"].as_u64())
        .unwrap_or_else(|| panic!("Service keyd has no port {name}"))
}

#[test]
fn the_deployed_config_is_one_node_shim_accepts_in_its_pod() {
    let text = manifests::config_map_data("node-shim/config.yaml", "node-shim", "node-shim.toml");
    let pod = pod();
    let env = env(&pod);
    // node-shim ignores a variable it does not know: every NODE_SHIM_ one set must be read.
    for k in env.keys().filter(|k| k.starts_with("NODE_SHIM_")) {
        assert!(
            ENV_VARS.iter().any(|(v, _)| v == k),
            "node-shim does not read {k}"
        );
    }
    let mut raw = RawConfig::from_toml(&text).unwrap();
    raw.apply_env(&env.clone().into_iter().collect::<HashMap<_, _>>());
    let config = raw
        .validate()
        .unwrap_or_else(|e| panic!("node-shim refuses deploy/node-shim: {e}"));

    // Per node, from the downward API.
    assert_eq!(config.node_name, NODE);
    assert_eq!(config.endpoint, HOST_IP.parse::<IpAddr>().unwrap());
    // The ops listener on the node's address, where the probes (on the host network, the pod's
    // address is the node's) and Prometheus reach it.
    let ops = config.ops_listen.expect("ops_listen");
    assert_eq!(
        ops,
        SocketAddr::new(HOST_IP.parse().unwrap(), pod.port("ops"))
    );
    pod.assert_ops_probes();
    assert_eq!(
        u64::from(config.wireguard.listen_port),
        u64::from(pod.port("wireguard"))
    );
    assert_eq!(config.mode, Mode::Wireguard);
    assert_eq!(config.steering.encrypt, Encrypt::Policy);

    // keyd: the Service's API and bootstrap ports, keyd's CA from the ConfigMap keyd publishes, and
    // a projected token for the audience keyd's bootstrap checks.
    let port = |url: &str| -> u64 { url.rsplit(':').next().unwrap().parse().unwrap() };
    assert!(config.keyd.server.starts_with("https://keyd.keyd.svc:"));
    assert_eq!(port(&config.keyd.server), keyd_service_port("api"));
    assert_eq!(
        pod.file(&config.keyd.ca),
        Ok(MountedFile::ConfigMap {
            name: "keyd-ca".into(),
            key: "ca.crt".into()
        })
    );
    let IdentitySource::Bootstrap {
        server,
        token_path,
        cert_dir,
    } = &config.keyd.identity
    else {
        panic!(
            "node-shim bootstraps with its token: {:?}",
            config.keyd.identity
        );
    };
    assert_eq!(port(server), keyd_service_port("bootstrap"));
    let keyd_toml: toml::Value = toml::from_str(&manifests::config_map_data(
        "keyd/config.yaml",
        "keyd",
        "keyd.toml",
    ))
    .unwrap();
    let audience = keyd_toml["bootstrap"]["audience"].as_str().unwrap();
    let Ok(MountedFile::Token {
        audience: projected,
        expiration_seconds,
    }) = pod.file(token_path)
    else {
        panic!("no projected token at {}", token_path.display());
    };
    assert_eq!(projected, audience);
    // Short-lived: the shortest the API server issues.
    assert_eq!(expiration_seconds, 600);
    assert!(matches!(
        pod.file(&cert_dir.join("node.pem")),
        Ok(MountedFile::Writable { .. })
    ));
    let pin_dir = config.steering.pin_dir.as_ref().expect("pin_dir");
    assert_eq!(
        pod.file(pin_dir),
        Ok(MountedFile::Writable {
            volume: "bpffs".into()
        })
    );

    // The pod: host network, every node, one at a time, two capabilities and nothing else.
    let spec = &pod.pod;
    assert_eq!(spec["hostNetwork"], true);
    assert_eq!(spec["dnsPolicy"], "ClusterFirstWithHostNet");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(
        spec["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );
    let sc = &pod.container["securityContext"];
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    assert_eq!(
        sc["capabilities"]["add"],
        serde_json::json!(["NET_ADMIN", "BPF", "PERFMON"])
    );
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    let ds = manifests::object("node-shim/daemonset.yaml", "DaemonSet", "node-shim");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );
}

/// The real binary takes the DaemonSet's arguments, with the ConfigMap at the path they name and
/// the DaemonSet's environment (and nothing of this process's).
#[test]
fn node_shim_takes_the_daemonsets_arguments() {
    let pod = pod();
    let args = pod.args();
    let config_at = args
        .iter()
        .position(|a| a == "--config")
        .map(|i| &args[i + 1])
        .expect("--config");
    assert_eq!(
        pod.file(Path::new(config_at)),
        Ok(MountedFile::ConfigMap {
            name: "node-shim".into(),
            key: "node-shim.toml".into()
        })
    );
    let root = tempfile::tempdir().unwrap();
    let file = root.path().join(config_at.trim_start_matches('/'));
    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
    std::fs::write(
        &file,
        manifests::config_map_data("node-shim/config.yaml", "node-shim", "node-shim.toml"),
    )
    .unwrap();
    let rooted: Vec<String> = args
        .iter()
        .map(|a| {
            if a == config_at {
                file.display().to_string()
            } else {
                a.clone()
            }
        })
        .collect();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_node-shim"))
        .args(&rooted)
        .arg("--check")
        .env_clear()
        .envs(env(&pod))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "node-shim {rooted:?} --check: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("configuration is valid"));

    // And it would say so about a field it does not know: the check can fail.
    std::fs::write(&file, "bogus = 1\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_node-shim"))
        .args(&rooted)
        .arg("--check")
        .env_clear()
        .envs(env(&pod))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
}

/// Deletes a network namespace when dropped.
struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

fn sh(cmd: &str) {
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{cmd}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs node-shim with exactly `caps` (every other capability gone from every set, as the
/// DaemonSet's `drop: ALL` plus `add` leaves it) until it has attached its steering programs or
/// has stopped; returns its log and whether both hooks were attached.
fn run_with_caps(netns: &str, config: &Path, caps: &[String], log: &Path) -> (bool, String) {
    let set = format!(
        "-all{}",
        caps.iter()
            .map(|c| format!(",+{}", c.to_lowercase()))
            .collect::<String>()
    );
    let file = std::fs::File::create(log).unwrap();
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", netns, "setpriv"])
        .arg(format!("--inh-caps={set}"))
        .arg("--ambient-caps=-all")
        .arg(format!("--bounding-set={set}"))
        .arg("--")
        .arg(env!("CARGO_BIN_EXE_node-shim"))
        .arg("--config")
        .arg(config)
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let attached = |text: &str| {
        text.matches("steering attached").count() >= 2
            && text.contains("veth-pod")
            && text.contains("veth-node")
    };
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        let exited = child.try_wait().unwrap().is_some();
        if attached(&text) || exited || std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let text = std::fs::read_to_string(log).unwrap_or_default();
            return (attached(&text), text);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The capabilities the DaemonSet adds are what node-shim's eBPF loader needs on this kernel, and
/// none of them is spare: with all of them node-shim loads and attaches both steering programs
/// (TCX and cls_bpf), without any one of them it cannot. (On the host kernel, 6.18: CAP_BPF for
/// the maps and the long verifier run, CAP_PERFMON for the program's variable-offset packet
/// pointer arithmetic, which the verifier otherwise refuses as "prohibited for !root",
/// CAP_NET_ADMIN for the networking program type and the attachments.) Kernel state: a fresh
/// network namespace with one veth pair, the program on `veth-pod`'s ingress and the guard on
/// the underlay `veth-node`'s egress; keyd is not reachable, which does not matter: steering
/// starts before the agent contacts keyd.
#[test]
fn privileged_the_daemonsets_capabilities_are_exactly_what_steering_needs() {
    if !keyd_tests::prereq::is_root() {
        eprintln!("SKIPPED: privileged_* tests need root (CI runs them as root)");
        return;
    }
    let have = |p: &str, version: &str| {
        std::process::Command::new(p)
            .arg(version)
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !keyd_tests::prereq::require(
        "ip and setpriv",
        if have("ip", "-V") && have("setpriv", "--version") {
            Ok(())
        } else {
            Err("install iproute2 and util-linux".into())
        },
    ) {
        return;
    }
    let caps: Vec<String> = pod().container["securityContext"]["capabilities"]["add"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect();
    let name = format!("ks-caps-{}", std::process::id());
    sh(&format!("ip netns add {name}"));
    let _netns = Netns(name.clone());
    sh(&format!(
        "ip -n {name} link set lo up && \
         ip -n {name} link add veth-pod type veth peer name veth-node && \
         ip -n {name} link set veth-pod up && ip -n {name} link set veth-node up && \
         ip -n {name} addr add 192.0.2.1/24 dev veth-node"
    ));
    let dir = tempfile::tempdir().unwrap();
    for f in ["ca.pem", "node.pem", "node-key.pem"] {
        std::fs::write(dir.path().join(f), "").unwrap();
    }
    for attach in ["tcx", "netlink"] {
        let config = dir.path().join(format!("{attach}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"node_name = "caps"
endpoint = "192.0.2.1"
pod_cidrs = ["10.9.0.0/24"]
[keyd]
server = "https://127.0.0.1:1"
ca = "{d}/ca.pem"
cert = "{d}/node.pem"
key = "{d}/node-key.pem"
[wireguard]
backend = "userspace"
[steering]
encrypt = "all"
devices = ["veth-pod"]
attach = "{attach}"
pin_dir = ""
[log]
format = "json"
"#,
                d = dir.path().display()
            ),
        )
        .unwrap();
        let log = dir.path().join("log");
        let (attached, text) = run_with_caps(&name, &config, &caps, &log);
        assert!(attached, "{attach} with {caps:?}:\n{text}");
        for missing in &caps {
            let fewer: Vec<String> = caps.iter().filter(|c| *c != missing).cloned().collect();
            let (attached, text) = run_with_caps(&name, &config, &fewer, &log);
            assert!(
                !attached,
                "{attach}: {missing} is not needed: attached with {fewer:?}:\n{text}"
            );
            assert!(
                text.contains("node-shim failed"),
                "{attach} without {missing}:\n{text}"
            );
        }
    }
}
