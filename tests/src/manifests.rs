//! The Kubernetes manifests under `deploy/`, for the tests that check them:
//! - reading the committed YAML: the configuration a ConfigMap holds, and what a workload's pod
//!   gives a container (arguments, environment, mounted files), so that keyd's and node-shim's
//!   tests can load their ConfigMap with their own loader as the pod would see it;
//! - rendering a Kustomize folder, validating every rendered object offline against the
//!   Kubernetes schemas (`kubernetes-validate --strict`), and the tools' locations, for
//!   `tests/manifests.rs`, which also applies them to a real API server.
//!
//! The tools (`./scripts/test.sh` installs them): `kubernetes-validate` and a kubectl with a
//! current kustomize in a virtualenv (`TEST_KUBERNETES_VALIDATE`, `TEST_KUSTOMIZE_KUBECTL`), and
//! Debian's kubectl 1.20 for the API server of the same version (`KUBE_TEST_KUBECTL`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Deserialize as _;
use serde_json::Value;

/// The repository's `deploy/`.
pub fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a multi-document YAML text (empty documents left out).
pub fn documents(text: &str) -> Result<Vec<Value>, serde_norway::Error> {
    let mut out = Vec::new();
    for doc in serde_norway::Deserializer::from_str(text) {
        let v = Value::deserialize(doc)?;
        if !v.is_null() {
            out.push(v);
        }
    }
    Ok(out)
}

/// The object of `kind` named `name` in `file` (relative to `deploy/`). Panics with the reason:
/// for tests.
pub fn object(file: &str, kind: &str, name: &str) -> Value {
    objects(file)
        .into_iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in deploy/{file}"))
}

/// Every object in `file` (relative to `deploy/`). Panics with the reason: for tests.
pub fn objects(file: &str) -> Vec<Value> {
    let path = deploy_dir().join(file);
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    documents(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The object of `kind` named `name` among `objects` (a rendered folder). Panics if there is
/// not exactly one: for tests.
pub fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    let mut found = objects
        .iter()
        .filter(|o| o["kind"] == kind && o["metadata"]["name"] == name);
    let first = found
        .next()
        .unwrap_or_else(|| panic!("no {kind} {name} among the rendered objects"));
    assert!(found.next().is_none(), "{kind} {name} is rendered twice");
    first
}

/// `data[key]` of the ConfigMap `name` in `file`.
pub fn config_map_data(file: &str, name: &str, key: &str) -> String {
    object(file, "ConfigMap", name)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {name} in {file} has no data {key:?}"))
        .to_owned()
}

/// Where the ServiceAccount's token and CA appear in a pod that mounts them.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// One container of a workload's pod template, with what the pod gives it.
#[derive(Debug, Clone)]
pub struct PodContainer {
    pub pod: Value,
    pub container: Value,
    /// The workload's namespace (empty when the manifest names none).
    pub namespace: String,
}

/// A value of the container's environment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EnvValue {
    Literal(String),
    /// `valueFrom.fieldRef.fieldPath` (the downward API).
    Field(String),
}

impl PodContainer {
    /// The container `container` of the `kind` workload `name` in `file`.
    pub fn of(file: &str, kind: &str, name: &str, container: &str) -> Self {
        Self::of_workload(&object(file, kind, name), container)
    }

    /// The container `container` of a workload object (say, one an overlay rendered).
    pub fn of_workload(workload: &Value, container: &str) -> Self {
        let kind = workload["kind"].as_str().unwrap_or("?");
        let name = workload["metadata"]["name"].as_str().unwrap_or("?");
        let mut pod = workload["spec"]["template"]["spec"].clone();
        // A StatefulSet's claim templates become volumes of its pods, as its controller adds
        // them: in place of a template volume of the same name.
        for claim in workload["spec"]["volumeClaimTemplates"]
            .as_array()
            .into_iter()
            .flatten()
        {
            let claim_name = claim["metadata"]["name"].clone();
            if let Some(volumes) = pod["volumes"].as_array_mut() {
                volumes.retain(|v| v["name"] != claim_name);
                volumes.push(serde_json::json!({
                    "name": claim_name,
                    "persistentVolumeClaim": {"claimName": claim_name},
                }));
            }
        }
        let container = pod["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"] == container)
            .unwrap_or_else(|| panic!("{kind} {name} has no container {container}"))
            .clone();
        let namespace = workload["metadata"]["namespace"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        Self {
            pod,
            container,
            namespace,
        }
    }

    /// The namespace the pod runs in, which the kubelet writes to its ServiceAccount directory.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    pub fn args(&self) -> Vec<String> {
        strings(&self.container["args"])
    }

    pub fn env(&self) -> Vec<(String, EnvValue)> {
        self.container["env"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| {
                let name = e["name"].as_str().unwrap_or_default().to_owned();
                let value = match e["valueFrom"]["fieldRef"]["fieldPath"].as_str() {
                    Some(f) => EnvValue::Field(f.to_owned()),
                    None => EnvValue::Literal(e["value"].as_str().unwrap_or_default().to_owned()),
                };
                (name, value)
            })
            .collect()
    }

    /// The environment as the kubelet sets it, with `fields` giving the downward API's values:
    /// `$(NAME)` in a literal is replaced by an earlier variable's value, as Kubernetes does.
    pub fn resolved_env(&self, fields: &BTreeMap<&str, &str>) -> BTreeMap<String, String> {
        let mut env: BTreeMap<String, String> = BTreeMap::new();
        for (name, value) in self.env() {
            let v = match value {
                EnvValue::Field(f) => fields
                    .get(f.as_str())
                    .unwrap_or_else(|| panic!("no value given for field {f} ({name})"))
                    .to_string(),
                EnvValue::Literal(mut s) => {
                    for (k, v) in &env {
                        s = s.replace(&format!("$({k})"), v);
                    }
                    s
                }
            };
            env.insert(name, v);
        }
        env
    }

    /// Asserts the probes keyd and node-shim share: startup and liveness on `/healthz`,
    /// readiness on `/readyz`, each on the container port `ops`.
    pub fn assert_ops_probes(&self) {
        for (probe, path) in [
            ("startupProbe", "/healthz"),
            ("livenessProbe", "/healthz"),
            ("readinessProbe", "/readyz"),
        ] {
            assert_eq!(self.container[probe]["httpGet"]["path"], path, "{probe}");
            assert_eq!(self.container[probe]["httpGet"]["port"], "ops", "{probe}");
        }
    }

    /// The container port named `name`.
    pub fn port(&self, name: &str) -> u16 {
        self.container["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == name)
            .and_then(|p| p["containerPort"].as_u64())
            .and_then(|p| u16::try_from(p).ok())
            .unwrap_or_else(|| panic!("no container port {name}"))
    }

    /// The container's mount of the volume `name`.
    pub fn mount(&self, name: &str) -> Value {
        self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no mount of volume {name}"))
            .clone()
    }

    /// The pod volume `name` (a StatefulSet's claim templates included).
    pub fn volume(&self, name: &str) -> Value {
        self.pod["volumes"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
            .clone()
    }

    /// Whether the ServiceAccount's token and CA are mounted at [`SERVICE_ACCOUNT_DIR`].
    pub fn service_account_mounted(&self) -> bool {
        self.pod["automountServiceAccountToken"] != false
    }

    /// What the pod puts at `path` in this container: `Ok` with the file's source (a
    /// ConfigMap's or Secret's key, a projected token's audience, or a directory on a writable
    /// volume), or `Err` saying why nothing is there. A file under a ConfigMap or Secret mount
    /// exists only if the volume lists it (or lists no items, for a ConfigMap of this repo).
    pub fn file(&self, path: &Path) -> Result<MountedFile, String> {
        if let Ok(rest) = path.strip_prefix(SERVICE_ACCOUNT_DIR) {
            return if !self.service_account_mounted() {
                Err(format!(
                    "{} is under the ServiceAccount's mount, which the pod turns off",
                    path.display()
                ))
            } else if ["token", "ca.crt", "namespace"].contains(&rest.to_str().unwrap_or("")) {
                Ok(MountedFile::ServiceAccount)
            } else {
                Err(format!(
                    "the ServiceAccount mount has no {}",
                    path.display()
                ))
            };
        }
        // The deepest mount holding the path.
        let mount = self.container["volumeMounts"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| path.starts_with(m["mountPath"].as_str().unwrap_or("/nonexistent")))
            .max_by_key(|m| m["mountPath"].as_str().unwrap_or("").len())
            .ok_or_else(|| format!("no volume is mounted at {}", path.display()))?;
        let mount_path = Path::new(mount["mountPath"].as_str().unwrap_or_default());
        let rest = path
            .strip_prefix(mount_path)
            .map_err(|e| e.to_string())?
            .to_string_lossy()
            .into_owned();
        let volume = self.volume(mount["name"].as_str().unwrap_or_default());
        let listed = |source: &Value, key_field: &str| -> Result<String, String> {
            match source["items"].as_array() {
                Some(items) => items
                    .iter()
                    .find(|i| i["path"] == rest.as_str())
                    .and_then(|i| i[key_field].as_str())
                    .map(str::to_owned)
                    .ok_or_else(|| {
                        format!(
                            "volume {} lists no item at {rest} (for {})",
                            volume["name"],
                            path.display()
                        )
                    }),
                None => Ok(rest.clone()),
            }
        };
        if let Some(s) = volume.get("secret") {
            let key = listed(s, "key")?;
            return Ok(MountedFile::Secret {
                secret: s["secretName"].as_str().unwrap_or_default().to_owned(),
                key,
            });
        }
        if let Some(c) = volume.get("configMap") {
            let key = listed(c, "key")?;
            return Ok(MountedFile::ConfigMap {
                name: c["name"].as_str().unwrap_or_default().to_owned(),
                key,
            });
        }
        if let Some(p) = volume.get("projected") {
            for source in p["sources"].as_array().into_iter().flatten() {
                let token = &source["serviceAccountToken"];
                if token["path"] == rest.as_str() {
                    return Ok(MountedFile::Token {
                        audience: token["audience"].as_str().unwrap_or_default().to_owned(),
                        expiration_seconds: token["expirationSeconds"].as_u64().unwrap_or(3600),
                    });
                }
            }
            return Err(format!("the projected volume has nothing at {rest}"));
        }
        if mount["readOnly"] == true {
            return Err(format!("{} is on a read-only mount", path.display()));
        }
        Ok(MountedFile::Writable {
            volume: volume["name"].as_str().unwrap_or_default().to_owned(),
        })
    }
}

/// What a pod holds at a path (see [`PodContainer::file`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountedFile {
    ServiceAccount,
    Secret {
        secret: String,
        key: String,
    },
    ConfigMap {
        name: String,
        key: String,
    },
    Token {
        audience: String,
        expiration_seconds: u64,
    },
    Writable {
        volume: String,
    },
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

// --- rendering and offline validation ----------------------------------------------------------

/// Where the tools are: `TEST_KUSTOMIZE_KUBECTL` and `TEST_KUBERNETES_VALIDATE`, else the
/// virtualenv `./scripts/test.sh` makes; `KUBE_TEST_KUBECTL`, else its cache of Debian's kubectl.
#[derive(Debug, Clone)]
pub struct Tools {
    /// A kubectl whose kustomize reads today's kustomizations (Debian's 1.20 has kustomize
    /// 2.0.3, which cannot take a folder under `resources`).
    pub kustomize: PathBuf,
    pub validate: PathBuf,
}

fn cache_home() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/nonexistent"))
}

fn tool(var: &str, default: PathBuf) -> Result<PathBuf, String> {
    let p = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    if p.is_file() {
        Ok(p)
    } else {
        Err(format!("{} not found (set {var})", p.display()))
    }
}

impl Tools {
    /// The tools, or `None` after saying why not (a failure under `CI=true`: see
    /// [`crate::prereq`]).
    pub fn required() -> Option<Self> {
        let found = Self::find();
        let check = found.as_ref().map(|_| ()).map_err(Clone::clone);
        crate::prereq::require("kubernetes-validate and a current kubectl", check)
            .then_some(found.ok())
            .flatten()
    }

    pub fn find() -> Result<Self, String> {
        let venv = cache_home().join("keyd-test/manifests-venv/bin");
        Ok(Self {
            kustomize: tool("TEST_KUSTOMIZE_KUBECTL", venv.join("kubectl"))?,
            validate: tool("TEST_KUBERNETES_VALIDATE", venv.join("kubernetes-validate"))?,
        })
    }
}

/// Debian's kubectl (kubernetes-client 1.20), unpacked by `./scripts/test.sh`.
pub fn apply_kubectl() -> Result<PathBuf, String> {
    tool(
        "KUBE_TEST_KUBECTL",
        PathBuf::from("/var/cache/keyd-test/kubernetes-client-1.20/usr/bin/kubectl"),
    )
}

/// The Kubernetes versions whose schemas every rendered object must satisfy: the oldest and the
/// newest that kubernetes-validate 1.37.0 (the version `./scripts/test.sh` installs) bundles. An
/// API removed since the oldest, or a field newer than it, fails one of them.
pub const SCHEMA_VERSIONS: [&str; 2] = ["1.25.0", "1.37.0"];

/// Kinds with no schema in kubernetes-validate that the manifests use on purpose: cert-manager's.
/// Any other kind it does not know fails the check (the tool only warns).
pub const NO_SCHEMA: [(&str, &str); 2] = [
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
];

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("running {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} failed ({status}): {stderr}")]
    Failed {
        program: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("the rendered YAML does not parse")]
    Yaml(#[source] serde_norway::Error),
    #[error("kubernetes {version}: {}", problems.join("; "))]
    Invalid {
        version: String,
        problems: Vec<String>,
    },
}

fn run(cmd: &mut Command) -> Result<String, ManifestError> {
    let program = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| ManifestError::Spawn {
        program: program.clone(),
        source,
    })?;
    if !out.status.success() {
        return Err(ManifestError::Failed {
            program,
            status: out.status,
            stderr: String::from_utf8_lossy(&out.stderr).into_owned()
                + &String::from_utf8_lossy(&out.stdout),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl kustomize DIR`: the objects a Kustomize folder renders.
pub fn render(tools: &Tools, dir: &Path) -> Result<Vec<Value>, ManifestError> {
    let text = run(Command::new(&tools.kustomize).arg("kustomize").arg(dir))?;
    documents(&text).map_err(ManifestError::Yaml)
}

/// Validates `objects` with `kubernetes-validate --strict` against `version`'s schemas. Every
/// object must pass: an error fails it, and so does a kind the tool has no schema for (it only
/// warns) unless it is in [`NO_SCHEMA`]. Offline by construction: as root it runs in a network
/// namespace of its own, which has no network at all. Returns how many objects passed.
pub fn validate(
    tools: &Tools,
    objects: &[Value],
    version: &str,
    scratch: &Path,
) -> Result<usize, ManifestError> {
    let file = scratch.join(format!("objects-{version}.yaml"));
    let mut text = String::new();
    for o in objects {
        text.push_str("---\n");
        text.push_str(&serde_norway::to_string(o).map_err(ManifestError::Yaml)?);
    }
    std::fs::write(&file, text).map_err(|source| ManifestError::Spawn {
        program: format!("writing {}", file.display()),
        source,
    })?;
    let mut cmd = if crate::prereq::is_root() {
        let mut c = Command::new("unshare");
        c.arg("--net").arg(&tools.validate);
        c
    } else {
        Command::new(&tools.validate)
    };
    cmd.args(["--strict", "-k", version]).arg(&file);
    let program = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| ManifestError::Spawn {
        program: program.clone(),
        source,
    })?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let mut problems = Vec::new();
    let mut passed = 0;
    let mut unknown = 0;
    for line in stdout.lines().chain(stderr.lines()) {
        if line.starts_with("INFO") && line.contains(" passed for resource ") {
            passed += 1;
        } else if let Some(rest) = line.strip_prefix("WARN") {
            let known = NO_SCHEMA.iter().any(|(api, kind)| {
                rest.contains(&format!("for kind {kind} with api version {api} "))
            });
            if known {
                unknown += 1;
            } else {
                problems.push(line.to_owned());
            }
        } else if line.starts_with("ERROR") || line.contains("Traceback") {
            problems.push(line.to_owned());
        }
    }
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("{program} exited {}: {stderr}", out.status));
    }
    // Every object is accounted for: a validator that skipped some would pass them unseen.
    if problems.is_empty() && passed + unknown != objects.len() {
        problems.push(format!(
            "{} objects, but {passed} passed and {unknown} have no schema:\n{stdout}{stderr}",
            objects.len()
        ));
    }
    if problems.is_empty() {
        Ok(passed)
    } else {
        Err(ManifestError::Invalid {
            version: version.to_owned(),
            problems,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn tools() -> Option<Tools> {
        Tools::required()
    }

    fn deployment(security_context: Value) -> Value {
        json!({
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "x", "namespace": "keyd"},
            "spec": {
                "selector": {"matchLabels": {"a": "b"}},
                "template": {
                    "metadata": {"labels": {"a": "b"}},
                    "spec": {"containers": [{
                        "name": "c", "image": "i", "securityContext": security_context
                    }]}
                }
            }
        })
    }

    /// The checker accepts what the schemas accept, and refuses a misspelt field (which a
    /// cluster would silently drop without strict validation), a wrong type, and a kind it has
    /// no schema for: each of them would otherwise reach a user.
    #[test]
    fn the_validator_rejects_broken_manifests() {
        let Some(tools) = tools() else { return };
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let good = deployment(json!({"runAsNonRoot": true}));
        for version in SCHEMA_VERSIONS {
            assert_eq!(
                validate(&tools, std::slice::from_ref(&good), version, dir.path())
                    .unwrap_or_else(|e| panic!("{e}")),
                1
            );
        }

        let misspelt = deployment(json!({"runAsNonRot": true}));
        let e = validate(&tools, &[good.clone(), misspelt], "1.37.0", dir.path())
            .expect_err("a misspelt field")
            .to_string();
        assert!(e.contains("runAsNonRot"), "{e}");

        let mut wrong_type = good.clone();
        wrong_type["spec"]["replicas"] = json!("two");
        let e = validate(&tools, &[wrong_type], "1.37.0", dir.path())
            .expect_err("a string for replicas")
            .to_string();
        assert!(e.contains("replicas") || e.contains("'two'"), "{e}");

        let unknown = json!({"apiVersion": "example.com/v1", "kind": "Widget",
                             "metadata": {"name": "w"}});
        let e = validate(&tools, &[unknown], "1.37.0", dir.path())
            .expect_err("a kind without a schema")
            .to_string();
        assert!(e.contains("Widget"), "{e}");

        // cert-manager's kinds are known to have none, and pass as such.
        let issuer = json!({"apiVersion": "cert-manager.io/v1", "kind": "Issuer",
                            "metadata": {"name": "i"}, "spec": {"selfSigned": {}}});
        assert_eq!(
            validate(&tools, &[issuer], "1.37.0", dir.path()).unwrap_or_else(|e| panic!("{e}")),
            0
        );

        // An API that 1.25 serves and 1.37 no longer does.
        let old = json!({"apiVersion": "autoscaling/v2beta2", "kind": "HorizontalPodAutoscaler",
                         "metadata": {"name": "h"},
                         "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "x"},
                                  "maxReplicas": 2}});
        validate(&tools, std::slice::from_ref(&old), "1.25.0", dir.path())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(validate(&tools, &[old], "1.37.0", dir.path()).is_err());
    }

    #[test]
    fn the_environment_is_resolved_as_the_kubelet_does() {
        let c = PodContainer {
            pod: json!({}),
            container: json!({"name": "c", "env": [
                {"name": "HOST_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                {"name": "LISTEN", "value": "$(HOST_IP):9101"},
            ]}),
            namespace: String::new(),
        };
        let env = c.resolved_env(&BTreeMap::from([("status.hostIP", "192.0.2.7")]));
        assert_eq!(env["LISTEN"], "192.0.2.7:9101");
    }

    /// As the StatefulSet controller does: a claim template replaces the template's volume of
    /// the same name, so an overlay that adds an emptyDir but keeps the claim still gets a PVC.
    #[test]
    fn a_claim_template_takes_the_place_of_a_volume_of_its_name() {
        let sts = json!({
            "kind": "StatefulSet",
            "metadata": {"name": "s"},
            "spec": {
                "template": {"spec": {
                    "containers": [{"name": "c", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}],
                    "volumes": [{"name": "data", "emptyDir": {}}, {"name": "tmp", "emptyDir": {}}],
                }},
                "volumeClaimTemplates": [{"metadata": {"name": "data"}}],
            }
        });
        let c = PodContainer::of_workload(&sts, "c");
        assert_eq!(
            c.volume("data"),
            json!({"name": "data", "persistentVolumeClaim": {"claimName": "data"}})
        );
        assert_eq!(c.pod["volumes"].as_array().map(Vec::len), Some(2));
        assert!(c.volume("tmp")["emptyDir"].is_object());
    }

    #[test]
    fn mounted_files_follow_the_volumes() {
        let c = PodContainer {
            pod: json!({
                "automountServiceAccountToken": false,
                "volumes": [
                    {"name": "s", "secret": {"secretName": "sec", "items": [{"key": "tls.crt", "path": "tls.crt"}]}},
                    {"name": "t", "projected": {"sources": [{"serviceAccountToken": {"audience": "keyd", "expirationSeconds": 600, "path": "token"}}]}},
                    {"name": "d", "emptyDir": {}},
                ]
            }),
            container: json!({"name": "c", "volumeMounts": [
                {"name": "s", "mountPath": "/etc/s", "readOnly": true},
                {"name": "t", "mountPath": "/var/run/t", "readOnly": true},
                {"name": "d", "mountPath": "/data"},
            ]}),
            namespace: String::new(),
        };
        assert_eq!(
            c.file(Path::new("/etc/s/tls.crt")),
            Ok(MountedFile::Secret {
                secret: "sec".into(),
                key: "tls.crt".into()
            })
        );
        assert!(c.file(Path::new("/etc/s/tls.key")).is_err());
        assert_eq!(
            c.file(Path::new("/var/run/t/token")),
            Ok(MountedFile::Token {
                audience: "keyd".into(),
                expiration_seconds: 600
            })
        );
        assert!(matches!(
            c.file(Path::new("/data/x")),
            Ok(MountedFile::Writable { .. })
        ));
        assert!(c.file(Path::new("/elsewhere")).is_err());
        assert!(
            c.file(Path::new(
                "/var/run/secrets/kubernetes.io/serviceaccount/token"
            ))
            .is_err()
        );
    }
}
