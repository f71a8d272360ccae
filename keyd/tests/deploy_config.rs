//! `deploy/keyd/config.yaml` holds a configuration keyd really accepts, in the pod the
//! StatefulSet makes: the ConfigMap's TOML goes through keyd's own loader and validation
//! (`keyd::config`, which checks that every file it names exists), on a file system laid out as the
//! pod's mounts lay it out. Every path the configuration names must be a file one of the pod's
//! volumes provides (a Secret's item, the ServiceAccount's token, the data volume); the test puts
//! it under a temporary root where the pod would have it. Then the ports, probes and bootstrap
//! settings must agree with the StatefulSet, the Service and node-shim's DaemonSet.
//!
//! The ha overlay's configuration is checked the same way, as the overlay renders it (its
//! ConfigMap and its StatefulSet's environment): etcd over https with the client certificate of
//! a mounted Secret, a KEK every replica shares, and every other section the base's.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use keyd::config::{Config, Flags, KekConfig, RawConfig, StoreConfig};
use keyd_proto::kek::VaultAuth;
use keyd_tests::manifests::{self, MountedFile, PodContainer, SERVICE_ACCOUNT_DIR};

/// Checks that the pod has something at `path`, creates it under `root` as the pod would see
/// it, and returns the path under `root`.
fn place(path: &str, root: &Path, pod: &PodContainer, ca_pem: &str) -> String {
    let file = pod
        .file(Path::new(path))
        .unwrap_or_else(|e| panic!("keyd's config names {path}, but {e}"));
    let under = root.join(Path::new(path).strip_prefix("/").unwrap());
    match file {
        MountedFile::Writable { .. } => std::fs::create_dir_all(&under).unwrap(),
        _ => {
            std::fs::create_dir_all(under.parent().unwrap()).unwrap();
            // keyd reads the API server's CA (and Vault's) as PEM, and a token without a
            // newline; the other files it only requires to exist before anything binds.
            let content = if path.ends_with("token") {
                "a-token"
            } else {
                ca_pem
            };
            std::fs::write(&under, content).unwrap();
        }
    }
    under.display().to_string()
}

/// Fields whose value starts with `/` but names no file.
const NOT_PATHS: [&str; 1] = [
    // A prefix of etcd's keys.
    "store.etcd.prefix",
];

/// Rewrites every absolute path in `value` (the field `field`) to the same path under `root`
/// ([`place`]).
fn reroot(field: &str, value: &mut toml::Value, root: &Path, pod: &PodContainer, ca_pem: &str) {
    match value {
        toml::Value::String(s) if s.starts_with('/') && !NOT_PATHS.contains(&field) => {
            *s = place(s, root, pod, ca_pem);
        }
        toml::Value::Table(t) => t.iter_mut().for_each(|(k, v)| {
            let field = if field.is_empty() {
                k.clone()
            } else {
                format!("{field}.{k}")
            };
            reroot(&field, v, root, pod, ca_pem);
        }),
        toml::Value::Array(a) => a
            .iter_mut()
            .for_each(|v| reroot(field, v, root, pod, ca_pem)),
        _ => {}
    }
}

/// keyd's configuration `text` loaded as the container `pod` would load it: the
/// ServiceAccount's defaults of [bootstrap] and [policy] written out, every path (in the file
/// and in the `KEYD_` variables the pod sets) placed under `root`, then keyd's loader and
/// validation. Panics naming the field keyd refuses.
fn load(text: &str, pod: &PodContainer, root: &Path) -> Config {
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

    // The sections that talk to the API server default to the ServiceAccount's files; the pod
    // must mount them, so they are checked like any other path.
    let mut value: toml::Value = toml::from_str(text).unwrap();
    for section in ["bootstrap", "policy", "cluster_pki"] {
        let table = match value.get_mut(section).and_then(toml::Value::as_table_mut) {
            Some(t) => t,
            // [cluster_pki] is absent where cert-manager issues the certificates.
            None if section == "cluster_pki" => continue,
            None => panic!("[{section}] is configured"),
        };
        table
            .entry("kube_ca")
            .or_insert_with(|| format!("{SERVICE_ACCOUNT_DIR}/ca.crt").into());
        table
            .entry("kube_token_file")
            .or_insert_with(|| format!("{SERVICE_ACCOUNT_DIR}/token").into());
        if section == "cluster_pki" {
            // The pod's namespace, which the kubelet writes beside the token.
            let ns = pod.namespace();
            table.entry("namespace").or_insert_with(|| ns.into());
        }
    }
    let ca_pem = keyd::pki::CertificateAuthority::generate("test CA")
        .unwrap()
        .cert_pem();
    reroot("", &mut value, root, pod, &ca_pem);

    let mut raw = RawConfig::from_toml(&toml::to_string(&value).unwrap()).unwrap();
    // The pod's KEYD_ variables (no flag besides --config); those naming files are placed too.
    let env: HashMap<String, String> = pod
        .resolved_env(&Default::default())
        .into_iter()
        .filter(|(k, _)| k.starts_with("KEYD_"))
        .map(|(k, v)| {
            let v = if v.starts_with('/') {
                place(&v, root, pod, &ca_pem)
            } else {
                v
            };
            (k, v)
        })
        .collect();
    raw.apply_env(&env).unwrap();
    raw.apply_flags(&Flags::default());
    raw.validate()
        .unwrap_or_else(|e| panic!("keyd refuses its configuration in the pod: {e}"))
}

#[test]
fn the_deployed_config_is_one_keyd_accepts_in_its_pod() {
    let text = manifests::config_map_data("keyd/config.yaml", "keyd", "keyd.toml");
    let pod = PodContainer::of("keyd/statefulset.yaml", "StatefulSet", "keyd", "keyd");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_keyd"))
        .args(["serve", "--help"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&help.stdout).contains("--config"),
        "keyd serve takes no --config"
    );
    let root = tempfile::tempdir().unwrap();
    let config = load(&text, &pod, root.path());
    // One keyd on redb, on the volume of its claim.
    assert_eq!(config.store, StoreConfig::Redb);

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
    pod.assert_ops_probes();
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
    // keyd issues the certificates ([cluster_pki]): the CA, its key and keyd's own
    // certificate are files it writes on a memory volume; the CA that signs node certificates
    // is the client CA keyd trusts.
    let pki = config.cluster_pki.as_ref().expect("[cluster_pki]");
    for file in [
        &config.tls.ca,
        &config.tls.cert,
        &config.tls.key,
        &bootstrap.ca_key,
    ] {
        assert!(
            file.starts_with(&pki.dir),
            "{} is not in cluster_pki.dir",
            file.display()
        );
    }
    assert_eq!(bootstrap.ca_key, pki.ca_key_path());
    assert_eq!(config.tls.ca, pki.ca_cert_path());
    let volume = "pki";
    assert_eq!(
        pod.file(&root_relative(&pki.dir, root.path())),
        Ok(MountedFile::Writable {
            volume: volume.into()
        })
    );
    assert_eq!(pod.volume(volume)["emptyDir"]["medium"], "Memory");
    assert_eq!(pki.namespace, pod.namespace());

    // What keyd keeps is what the others use: the webhook's Secrets and its configuration,
    // node-shim's CA, and nothing keyd's RBAC does not name.
    let webhook = PodContainer::of(
        "webhook/deployment.yaml",
        "Deployment",
        "keyd-webhook",
        "webhook",
    );
    let issued: Vec<&str> = pki.issue.iter().map(|i| i.secret.as_str()).collect();
    for volume in ["tls", "keyd-client"] {
        let secret = webhook.volume(volume)["secret"]["secretName"]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(
            issued.contains(&secret.as_str()),
            "the webhook mounts {secret}, which keyd does not keep"
        );
    }
    let vwc = manifests::object(
        "webhook/validatingwebhookconfiguration.yaml",
        "ValidatingWebhookConfiguration",
        "keyd-webhook",
    );
    assert_eq!(
        pki.webhook_configurations,
        [vwc["metadata"]["name"].as_str().unwrap()]
    );
    let shim_config: toml::Table = toml::from_str(&manifests::config_map_data(
        "node-shim/config.yaml",
        "node-shim",
        "node-shim.toml",
    ))
    .unwrap();
    let shim_ca = shim_config["keyd"]["ca"].as_str().unwrap();
    assert_eq!(
        shim.file(Path::new(shim_ca)),
        Ok(MountedFile::ConfigMap {
            name: pki.trust_config_map.clone(),
            key: "ca.crt".into()
        })
    );
    let rbac = manifests::objects("keyd/rbac.yaml");
    let role = rbac
        .iter()
        .find(|o| o["kind"] == "Role" && o["metadata"]["name"] == "keyd-pki")
        .expect("Role keyd-pki");
    // The names a rule grants `verbs` on `resource`.
    let names = |object: &serde_json::Value, resource: &str, verbs: &[&str]| -> Vec<String> {
        object["rules"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| {
                r["resources"] == serde_json::json!([resource])
                    && r["verbs"] == serde_json::json!(verbs)
                    && r["resourceNames"].is_array()
            })
            .flat_map(|r| r["resourceNames"].as_array().unwrap().iter())
            .map(|n| n.as_str().unwrap().to_owned())
            .collect()
    };
    // The CA's Secret is read (and created), never updated; the kept Secrets are both.
    assert_eq!(
        names(role, "secrets", &["get"]),
        std::slice::from_ref(&pki.ca_secret)
    );
    assert_eq!(names(role, "secrets", &["get", "update"]), issued);
    let ca_bundle = rbac
        .iter()
        .find(|o| o["kind"] == "ClusterRole" && o["metadata"]["name"] == "keyd-webhook-ca-bundle")
        .expect("ClusterRole keyd-webhook-ca-bundle");
    assert_eq!(
        names(
            ca_bundle,
            "validatingwebhookconfigurations",
            &["get", "update"]
        ),
        pki.webhook_configurations
    );
    assert_eq!(
        names(role, "configmaps", &["get", "update"]),
        std::slice::from_ref(&pki.trust_config_map)
    );
}

/// The cert-manager component's configuration is one keyd accepts in its pod as the
/// cert-manager overlay renders it: the CA and keyd's certificate from cert-manager's Secrets,
/// no [cluster_pki], and every other section the base's.
#[test]
fn the_cert_manager_config_is_one_keyd_accepts_in_its_pod() {
    let Some(tools) = manifests::Tools::required() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (text, pod, config) = load_overlay(&tools, "overlays/cert-manager", root.path());
    assert!(config.cluster_pki.is_none());
    let bootstrap = config.bootstrap.as_ref().expect("[bootstrap]");
    for (path, secret, key) in [
        (&bootstrap.ca_key, "keyd-ca", "tls.key"),
        (&config.tls.ca, "keyd-ca", "tls.crt"),
        (&config.tls.cert, "keyd-tls", "tls.crt"),
        (&config.tls.key, "keyd-tls", "tls.key"),
    ] {
        assert_eq!(
            pod.file(&root_relative(path, root.path())),
            Ok(MountedFile::Secret {
                secret: secret.into(),
                key: key.into()
            })
        );
    }
    let mut base: toml::Table = toml::from_str(&manifests::config_map_data(
        "keyd/config.yaml",
        "keyd",
        "keyd.toml",
    ))
    .unwrap();
    let mut with_cert_manager: toml::Table = toml::from_str(&text).unwrap();
    for t in [&mut base, &mut with_cert_manager] {
        t.remove("cluster_pki");
        t.remove("tls");
        t["bootstrap"].as_table_mut().unwrap().remove("ca_key");
    }
    assert_eq!(
        with_cert_manager, base,
        "deploy/components/cert-manager/keyd.toml differs from the base's beyond the certificates"
    );
}

/// The ha overlay's configuration, as the overlay renders its ConfigMap and its StatefulSet's
/// environment, is one keyd accepts in each replica's pod: etcd over https with etcd's CA and
/// keyd's client certificate from the Secret keyd-etcd-client; a KEK in Vault, the same for
/// every replica (a local KEK would be a file on each replica's own emptyDir); and every other
/// section the base's, so that a change to the base's configuration is not lost here.
#[test]
fn the_ha_config_is_one_keyd_accepts_in_each_replica() {
    let Some(tools) = manifests::Tools::required() else {
        return;
    };
    let root = tempfile::tempdir().unwrap();
    let (text, pod, config) = load_overlay(&tools, "overlays/ha", root.path());

    assert_eq!(config.listen.port(), pod.port("api"));
    assert_eq!(config.ops_listen.port(), pod.port("ops"));
    assert!(!config.ops_listen.ip().is_loopback());
    assert_eq!(
        config
            .bootstrap
            .as_ref()
            .expect("[bootstrap]")
            .listen
            .port(),
        pod.port("bootstrap")
    );
    // Nothing of keyd's is kept in the data directory: it is an emptyDir.
    assert_eq!(
        pod.file(&root_relative(&config.data_dir, root.path())),
        Ok(MountedFile::Writable {
            volume: "data".into()
        })
    );
    assert!(
        pod.volume("data")["emptyDir"].is_object(),
        "data is an emptyDir"
    );

    // etcd: every member over https (the loader allows http to loopback, which in a pod is
    // the pod itself), TLS files from the Secret.
    let StoreConfig::Etcd(etcd) = &config.store else {
        panic!("the ha store is {:?}", config.store)
    };
    assert!(etcd.endpoints.len() >= 3, "{:?}", etcd.endpoints);
    for e in &etcd.endpoints {
        assert!(e.starts_with("https://"), "{e}");
    }
    let tls = etcd.tls.as_ref().expect("TLS to etcd");
    let (cert, key) = tls.client.as_ref().expect("a client certificate for etcd");
    for (path, item) in [(&tls.ca, "ca.crt"), (cert, "tls.crt"), (key, "tls.key")] {
        assert_eq!(
            pod.file(&root_relative(path, root.path())),
            Ok(MountedFile::Secret {
                secret: "keyd-etcd-client".into(),
                key: item.into()
            })
        );
    }

    // The KEK: Vault transit, trusted with the CA of the ConfigMap keyd-vault-ca, logged in to
    // with the pod's own ServiceAccount token.
    let KekConfig::VaultTransit(vault) = &config.kek else {
        panic!("the ha KEK is {:?}", config.kek)
    };
    assert!(vault.address.starts_with("https://"), "{}", vault.address);
    let ca_file = vault.ca_file.as_ref().expect("kek.vault.ca_file");
    assert_eq!(
        pod.file(&root_relative(ca_file, root.path())),
        Ok(MountedFile::ConfigMap {
            name: "keyd-vault-ca".into(),
            key: "ca.crt".into()
        })
    );
    let VaultAuth::Kubernetes { jwt_file, .. } = &vault.auth else {
        panic!("Vault login is {:?}", vault.auth)
    };
    assert_eq!(
        pod.file(&root_relative(jwt_file, root.path())),
        Ok(MountedFile::ServiceAccount)
    );

    // Every other section is the base's.
    let mut base: toml::Table = toml::from_str(&manifests::config_map_data(
        "keyd/config.yaml",
        "keyd",
        "keyd.toml",
    ))
    .unwrap();
    let mut ha: toml::Table = toml::from_str(&text).unwrap();
    for section in ["store", "kek"] {
        base.remove(section);
        ha.remove(section);
    }
    assert_eq!(
        ha, base,
        "deploy/overlays/ha/keyd.toml differs from the base's beyond [store] and [kek]"
    );
}

/// The overlay `folder` rendered: keyd's `keyd.toml` as its ConfigMap holds it, keyd's
/// container as its StatefulSet runs it, and the configuration loaded in that pod ([`load`]).
fn load_overlay(
    tools: &manifests::Tools,
    folder: &str,
    root: &Path,
) -> (String, PodContainer, Config) {
    let objects = manifests::render(tools, &manifests::deploy_dir().join(folder)).unwrap();
    let text = manifests::find(&objects, "ConfigMap", "keyd")["data"]["keyd.toml"]
        .as_str()
        .expect("the ConfigMap keyd has keyd.toml")
        .to_owned();
    let pod = PodContainer::of_workload(manifests::find(&objects, "StatefulSet", "keyd"), "keyd");
    let config = load(&text, &pod, root);
    (text, pod, config)
}

/// The pod's path of a file the test placed under `root`.
fn root_relative(path: &Path, root: &Path) -> PathBuf {
    Path::new("/").join(path.strip_prefix(root).unwrap())
}
