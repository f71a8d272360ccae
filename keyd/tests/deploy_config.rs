//! `deploy/keyd/config.yaml` holds a configuration keyd really accepts, in the pod the
//! StatefulSet makes: the ConfigMap's TOML goes through keyd's own loader and validation
//! (`keyd::config`, which checks that every file it names exists), on a file system laid out as the
//! pod's mounts lay it out. Every path the configuration names must be a file one of the pod's
//! volumes provides (a Secret's item, the ServiceAccount's token, the data volume); the test puts
//! it under a temporary root where the pod would have it. Then the ports, probes and bootstrap
//! settings must agree with the StatefulSet, the Service and node-shim's DaemonSet.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use keyd::config::{Flags, RawConfig};
use keyd_tests::manifests::{self, MountedFile, PodContainer, SERVICE_ACCOUNT_DIR};

/// Rewrites every absolute path in `value` to the same path under `root`, after checking that
/// the pod has something there, and creates it as the pod would see it.
fn reroot(value: &mut toml::Value, root: &Path, pod: &PodContainer, ca_pem: &str) {
    match value {
        toml::Value::String(s) if s.starts_with('/') => {
            let path = PathBuf::from(s.as_str());
            let file = pod
                .file(&path)
                .unwrap_or_else(|e| panic!("keyd's config names {s}, but {e}"));
            let under = root.join(path.strip_prefix("/").unwrap());
            match file {
                MountedFile::Writable { .. } => std::fs::create_dir_all(&under).unwrap(),
                _ => {
                    std::fs::create_dir_all(under.parent().unwrap()).unwrap();
                    // keyd reads the API server's CA as PEM, and a token without a newline;
                    // the other files it only requires to exist before anything binds.
                    let content = if path.ends_with("token") {
                        "a-token"
                    } else {
                        ca_pem
                    };
                    std::fs::write(&under, content).unwrap();
                }
            }
            *s = under.display().to_string();
        }
        toml::Value::Table(t) => t.iter_mut().for_each(|(_, v)| reroot(v, root, pod, ca_pem)),
        toml::Value::Array(a) => a.iter_mut().for_each(|v| reroot(v, root, pod, ca_pem)),
        _ => {}
    }
}

#[test]
fn the_deployed_config_is_one_keyd_accepts_in_its_pod() {
    let text = manifests::config_map_data("keyd/config.yaml", "keyd", "keyd.toml");
    let pod = PodContainer::of("keyd/statefulset.yaml", "StatefulSet", "keyd", "keyd");

    // `keyd serve --config FILE`, FILE being the ConfigMap's key as mounted.
    let args = pod.args();
    assert_eq!(args[..2], ["serve", "--config"], "{args:?}");
    assert_eq!(
        pod.file(Path::new(&args[2])),
        Ok(MountedFile::ConfigMap {
            name: "keyd".into(),
            key: "keyd.toml".into()
        })
    );
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_keyd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--config"),
        "keyd serve takes no --config"
    );

    // The sections that talk to the API server default to the ServiceAccount's files; the pod
    // must mount them, so they are checked like any other path.
    let mut value: toml::Value = toml::from_str(&text).unwrap();
    for section in ["bootstrap", "policy"] {
        let table = value
            .get_mut(section)
            .and_then(toml::Value::as_table_mut)
            .unwrap_or_else(|| panic!("[{section}] is configured"));
        table
            .entry("kube_ca")
            .or_insert_with(|| format!("{SERVICE_ACCOUNT_DIR}/ca.crt").into());
        table
            .entry("kube_token_file")
            .or_insert_with(|| format!("{SERVICE_ACCOUNT_DIR}/token").into());
    }
    let root = tempfile::tempdir().unwrap();
    let ca_pem = keyd::pki::CertificateAuthority::generate("test CA")
        .unwrap()
        .cert_pem();
    reroot(&mut value, root.path(), &pod, &ca_pem);

    let mut raw = RawConfig::from_toml(&toml::to_string(&value).unwrap()).unwrap();
    // The pod sets no KEYD_ variable and no flag besides --config.
    let env: HashMap<String, String> = pod
        .resolved_env(&Default::default())
        .into_iter()
        .filter(|(k, _)| k.starts_with("KEYD_"))
        .collect();
    raw.apply_env(&env).unwrap();
    raw.apply_flags(&Flags::default());
    let config = raw
        .validate()
        .unwrap_or_else(|e| panic!("keyd refuses deploy/keyd/config.yaml: {e}"));

    // Listeners on the ports the StatefulSet and the Service name; the ops listener reachable
    // from the kubelet's probes (not loopback).
    assert_eq!(config.listen.port(), pod.port("api"));
    assert_eq!(config.ops_listen.port(), pod.port("ops"));
    assert!(!config.ops_listen.ip().is_loopback());
    let bootstrap = config.bootstrap.as_ref().expect("[bootstrap]");
    assert_eq!(bootstrap.listen.port(), pod.port("bootstrap"));
    assert!(config.policy.is_some(), "[policy]");
    assert_eq!(
        pod.file(&root_relative(&config.data_dir, root.path())),
        Ok(MountedFile::Writable {
            volume: "data".into()
        })
    );
    for (probe, path) in [
        ("startupProbe", "/healthz"),
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
    ] {
        assert_eq!(pod.container[probe]["httpGet"]["path"], path, "{probe}");
        assert_eq!(pod.container[probe]["httpGet"]["port"], "ops", "{probe}");
    }
    let service = manifests::object("keyd/service.yaml", "Service", "keyd");
    for name in ["api", "bootstrap", "ops"] {
        let port = service["spec"]["ports"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("Service keyd has no port {name}"));
        assert_eq!(port["targetPort"], name);
    }

    // Bootstrap accepts exactly node-shim's DaemonSet, with the audience its token is projected
    // for.
    let node_shim = manifests::object("node-shim/daemonset.yaml", "DaemonSet", "node-shim");
    let ds_account = (
        node_shim["metadata"]["namespace"]
            .as_str()
            .unwrap()
            .to_owned(),
        node_shim["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap()
            .to_owned(),
    );
    assert_eq!(bootstrap.service_accounts, [ds_account]);
    let shim = PodContainer::of(
        "node-shim/daemonset.yaml",
        "DaemonSet",
        "node-shim",
        "node-shim",
    );
    let Ok(MountedFile::Token { audience, .. }) =
        shim.file(Path::new("/var/run/secrets/keyd/token"))
    else {
        panic!("node-shim has no projected token at /var/run/secrets/keyd/token");
    };
    assert_eq!(bootstrap.audience, audience);
    // The CA that signs node certificates is the client CA keyd trusts (one Secret).
    assert_eq!(
        pod.file(&root_relative(&bootstrap.ca_key, root.path())),
        Ok(MountedFile::Secret {
            secret: "keyd-ca".into(),
            key: "tls.key".into()
        })
    );
    assert_eq!(
        pod.file(&root_relative(&config.tls.ca, root.path())),
        Ok(MountedFile::Secret {
            secret: "keyd-ca".into(),
            key: "tls.crt".into()
        })
    );
}

/// The pod's path of a file the test placed under `root`.
fn root_relative(path: &Path, root: &Path) -> PathBuf {
    Path::new("/").join(path.strip_prefix(root).unwrap())
}
