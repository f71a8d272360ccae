//! keyd's configuration: a TOML file, then `KEYD_*` environment variables, then command-line
//! flags, each layer overriding the one before. The result is validated completely before any
//! socket binds; an error names the field (`tls.cert`, `KEYD_LISTEN`, ...) and keyd exits 64.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use keyd_mtls::ops::LogFormat;
use keyd_mtls::tls::TlsPaths;

use crate::service::ClaimCheck;
use keyd_mtls::ops::parse_addr;
pub use keyd_mtls::ops::{ConfigError, EXIT_CONFIG};

/// Validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub data_dir: PathBuf,
    /// Where keyd keeps its state (`[store]`): redb in `data_dir`, or etcd.
    pub store: store::StoreConfig,
    pub listen: SocketAddr,
    pub ops_listen: SocketAddr,
    pub tls: TlsPaths,
    pub tls_reload_interval: Duration,
    pub kek: KekConfig,
    pub custody: crate::custody::CustodySettings,
    pub max_body_bytes: usize,
    /// Every listener's connection cap and timeouts (`[limits]`).
    pub listener: keyd_mtls::server::Limits,
    pub log_format: LogFormat,
    pub log_level: String,
    pub service: crate::service::ServiceConfig,
    /// How often the scheduler checks for due rotations and rollout progress.
    pub scheduler_tick: Duration,
    /// The node bootstrap listener (`[bootstrap]`), if configured.
    pub bootstrap: Option<crate::bootstrap::BootstrapConfig>,
    /// The policy watcher that compiles nodes' data-plane rules (`[policy]`), if configured.
    pub policy: Option<crate::policy_watch::PolicyWatchConfig>,
    /// keyd as the cluster's certificate issuer (`[cluster_pki]`), if configured: then `tls`
    /// and the bootstrap CA key are the files it writes.
    pub cluster_pki: Option<crate::cluster_pki::ClusterPkiConfig>,
}

/// The KEK custodian: a local file, AWS KMS or Vault transit (see [`crate::custody::config`]).
pub use keyd_proto::kek::KekSpec as KekConfig;

/// The file form; every field optional so that env and flags can fill it in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub ops_listen: Option<String>,
    #[serde(default)]
    pub tls: RawTls,
    #[serde(default)]
    pub store: store::RawStore,
    #[serde(default)]
    pub kek: RawKek,
    #[serde(default)]
    pub limits: RawLimits,
    #[serde(default)]
    pub log: RawLog,
    #[serde(default)]
    pub rotation: RawRotation,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub ipsec: RawIpsec,
    #[serde(default)]
    pub nodes: RawNodes,
    #[serde(default)]
    pub report: RawReport,
    #[serde(default)]
    pub bootstrap: Option<bootstrap::RawBootstrap>,
    #[serde(default)]
    pub policy: Option<policy::RawPolicy>,
    #[serde(default)]
    pub cluster_pki: Option<cluster_pki::RawClusterPki>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRotation {
    pub node_liveness_timeout: Option<String>,
    pub rollout_stuck_after: Option<String>,
    pub scheduler_tick: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawIpsec {
    /// Accept a Cilium key without `+` (one key and salt for every tunnel) in an import; the
    /// next rotation makes it per-tunnel. Off by default.
    pub allow_global_import: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawNodes {
    /// What a node's endpoint and pod CIDRs are checked against when it registers:
    /// `node-object` (its Node object; needs `[bootstrap]`, and is then the default),
    /// `allocation` (only `keyctl nodes allow`; the default without `[bootstrap]`) or `open`.
    pub claims: Option<String>,
}

/// `[report]`: the evidence report.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawReport {
    /// The Chromium that prints PDF reports (an absolute path); default: found on `PATH`.
    pub chromium: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub checkpoint_interval: Option<String>,
    pub segment_records: Option<u64>,
    pub segment_age: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub reload_interval: Option<String>,
}

pub mod bootstrap;
pub mod cluster_pki;
pub mod kek;
pub mod policy;
pub mod store;

pub use kek::RawKek;
pub use store::{EtcdSettings, StoreConfig};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLimits {
    pub max_body_bytes: Option<usize>,
    pub handshake_timeout: Option<String>,
    pub header_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub max_connections: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub format: Option<String>,
    pub level: Option<String>,
}

/// Command-line overrides.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub data_dir: Option<PathBuf>,
    pub listen: Option<String>,
    pub ops_listen: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

/// The environment variables keyd reads, and the field each sets.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("KEYD_DATA_DIR", "data_dir"),
    ("KEYD_LISTEN", "listen"),
    ("KEYD_OPS_LISTEN", "ops_listen"),
    ("KEYD_TLS_CA", "tls.ca"),
    ("KEYD_TLS_CERT", "tls.cert"),
    ("KEYD_TLS_KEY", "tls.key"),
    ("KEYD_TLS_RELOAD_INTERVAL", "tls.reload_interval"),
    ("KEYD_KEK_BACKEND", "kek.backend"),
    ("KEYD_KEK_LOCAL_PATH", "kek.local_path"),
    ("KEYD_MAX_BODY_BYTES", "limits.max_body_bytes"),
    ("KEYD_HANDSHAKE_TIMEOUT", "limits.handshake_timeout"),
    ("KEYD_HEADER_READ_TIMEOUT", "limits.header_read_timeout"),
    ("KEYD_IDLE_TIMEOUT", "limits.idle_timeout"),
    ("KEYD_MAX_CONNECTIONS", "limits.max_connections"),
    ("KEYD_LOG_FORMAT", "log.format"),
    ("KEYD_LOG_LEVEL", "log.level"),
    (
        "KEYD_NODE_LIVENESS_TIMEOUT",
        "rotation.node_liveness_timeout",
    ),
    ("KEYD_ROLLOUT_STUCK_AFTER", "rotation.rollout_stuck_after"),
    ("KEYD_SCHEDULER_TICK", "rotation.scheduler_tick"),
    (
        "KEYD_AUDIT_CHECKPOINT_INTERVAL",
        "audit.checkpoint_interval",
    ),
    ("KEYD_AUDIT_SEGMENT_RECORDS", "audit.segment_records"),
    ("KEYD_AUDIT_SEGMENT_AGE", "audit.segment_age"),
    (
        "KEYD_IPSEC_ALLOW_GLOBAL_IMPORT",
        "ipsec.allow_global_import",
    ),
    ("KEYD_NODE_CLAIMS", "nodes.claims"),
    ("KEYD_REPORT_CHROMIUM", "report.chromium"),
];

impl RawConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| {
            // toml's message names the key (e.g. "unknown field `lisen`") and the position.
            err(
                "<file>",
                e.message().to_owned()
                    + &e.span()
                        .map(|s| format!(" (at byte {})", s.start))
                        .unwrap_or_default(),
            )
        })
    }

    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| err("--config", format!("{}: {e}", path.display())))?;
        Self::from_toml(&text)
            .map_err(|e| err(e.field(), format!("in {}: {}", path.display(), e.message())))
    }

    /// Overlays `KEYD_*` variables from `env` (a map, so tests need not touch the process env).
    pub fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        #[cfg(feature = "fault-injection")]
        let faults = crate::faults::ENV_VARS;
        // Without the feature the crash-point variables are unknown like any other.
        #[cfg(not(feature = "fault-injection"))]
        let faults: &[(&str, &str)] = &[];
        let known: std::collections::HashSet<&str> = ENV_VARS
            .iter()
            .chain(kek::ENV_VARS)
            .chain(store::ENV_VARS)
            .chain(faults)
            .map(|(k, _)| *k)
            .collect();
        for k in env.keys() {
            if k.starts_with("KEYD_") && !known.contains(k.as_str()) {
                return Err(err(
                    k,
                    "unknown KEYD_ variable (see `keyd serve --help` for the list)",
                ));
            }
        }
        let get = |k: &str| env.get(k).cloned();
        let path = |k: &str| env.get(k).map(PathBuf::from);
        self.data_dir = path("KEYD_DATA_DIR").or(self.data_dir.take());
        self.listen = get("KEYD_LISTEN").or(self.listen.take());
        self.ops_listen = get("KEYD_OPS_LISTEN").or(self.ops_listen.take());
        self.tls.ca = path("KEYD_TLS_CA").or(self.tls.ca.take());
        self.tls.cert = path("KEYD_TLS_CERT").or(self.tls.cert.take());
        self.tls.key = path("KEYD_TLS_KEY").or(self.tls.key.take());
        self.tls.reload_interval =
            get("KEYD_TLS_RELOAD_INTERVAL").or(self.tls.reload_interval.take());
        self.kek.apply_env(env)?;
        self.store.apply_env(env);
        if let Some(v) = get("KEYD_MAX_BODY_BYTES") {
            self.limits.max_body_bytes = Some(v.parse().map_err(|_| {
                err(
                    "KEYD_MAX_BODY_BYTES",
                    format!("{v:?} is not a whole number"),
                )
            })?);
        }
        if let Some(v) = get("KEYD_MAX_CONNECTIONS") {
            self.limits.max_connections = Some(v.parse().map_err(|_| {
                err(
                    "KEYD_MAX_CONNECTIONS",
                    format!("{v:?} is not a whole number"),
                )
            })?);
        }
        self.limits.handshake_timeout =
            get("KEYD_HANDSHAKE_TIMEOUT").or(self.limits.handshake_timeout.take());
        self.limits.header_read_timeout =
            get("KEYD_HEADER_READ_TIMEOUT").or(self.limits.header_read_timeout.take());
        self.limits.idle_timeout = get("KEYD_IDLE_TIMEOUT").or(self.limits.idle_timeout.take());
        self.log.format = get("KEYD_LOG_FORMAT").or(self.log.format.take());
        self.log.level = get("KEYD_LOG_LEVEL").or(self.log.level.take());
        self.rotation.node_liveness_timeout =
            get("KEYD_NODE_LIVENESS_TIMEOUT").or(self.rotation.node_liveness_timeout.take());
        self.rotation.rollout_stuck_after =
            get("KEYD_ROLLOUT_STUCK_AFTER").or(self.rotation.rollout_stuck_after.take());
        self.rotation.scheduler_tick =
            get("KEYD_SCHEDULER_TICK").or(self.rotation.scheduler_tick.take());
        self.audit.checkpoint_interval =
            get("KEYD_AUDIT_CHECKPOINT_INTERVAL").or(self.audit.checkpoint_interval.take());
        if let Some(v) = get("KEYD_AUDIT_SEGMENT_RECORDS") {
            self.audit.segment_records = Some(v.parse().map_err(|_| {
                err(
                    "KEYD_AUDIT_SEGMENT_RECORDS",
                    format!("{v:?} is not a whole number"),
                )
            })?);
        }
        self.audit.segment_age = get("KEYD_AUDIT_SEGMENT_AGE").or(self.audit.segment_age.take());
        self.nodes.claims = get("KEYD_NODE_CLAIMS").or(self.nodes.claims.take());
        self.report.chromium = path("KEYD_REPORT_CHROMIUM").or(self.report.chromium.take());
        if let Some(v) = get("KEYD_IPSEC_ALLOW_GLOBAL_IMPORT") {
            self.ipsec.allow_global_import = Some(v.parse().map_err(|_| {
                err(
                    "KEYD_IPSEC_ALLOW_GLOBAL_IMPORT",
                    format!("{v:?} is not true or false"),
                )
            })?);
        }
        Ok(())
    }

    pub fn apply_flags(&mut self, f: &Flags) {
        let f = f.clone();
        self.data_dir = f.data_dir.or(self.data_dir.take());
        self.listen = f.listen.or(self.listen.take());
        self.ops_listen = f.ops_listen.or(self.ops_listen.take());
        self.log.level = f.log_level.or(self.log.level.take());
        self.log.format = f.log_format.or(self.log.format.take());
    }

    /// Checks everything, including that the TLS files and the data directory are usable.
    pub fn validate(self) -> Result<Config, ConfigError> {
        let data_dir = self.data_dir.ok_or_else(|| err("data_dir", "required"))?;
        let listen = parse_addr("listen", self.listen.as_deref().unwrap_or("0.0.0.0:8443"))?;
        let ops_listen = parse_addr(
            "ops_listen",
            self.ops_listen.as_deref().unwrap_or("127.0.0.1:9443"),
        )?;
        if listen == ops_listen && listen.port() != 0 {
            return Err(err("ops_listen", "must differ from `listen`"));
        }
        let file = |field: &str, p: Option<PathBuf>| -> Result<PathBuf, ConfigError> {
            let p = p.ok_or_else(|| err(field, "required"))?;
            std::fs::metadata(&p).map_err(|e| err(field, format!("{}: {e}", p.display())))?;
            Ok(p)
        };
        let cluster_pki = self
            .cluster_pki
            .map(|c| c.validate(&data_dir))
            .transpose()?;
        let tls = match &cluster_pki {
            // The files keyd writes before its listeners start.
            Some(pki) => {
                for (field, set) in [
                    ("tls.ca", self.tls.ca.is_some()),
                    ("tls.cert", self.tls.cert.is_some()),
                    ("tls.key", self.tls.key.is_some()),
                ] {
                    if set {
                        return Err(err(
                            field,
                            "must be unset with [cluster_pki], which writes keyd's CA and \
                             certificate to cluster_pki.dir",
                        ));
                    }
                }
                TlsPaths {
                    ca: pki.ca_cert_path(),
                    cert: pki.server_cert_path(),
                    key: pki.server_key_path(),
                }
            }
            None => TlsPaths {
                ca: file("tls.ca", self.tls.ca)?,
                cert: file("tls.cert", self.tls.cert)?,
                key: file("tls.key", self.tls.key)?,
            },
        };
        let tls_reload_interval = parse_duration(
            "tls.reload_interval",
            self.tls.reload_interval.as_deref().unwrap_or("10s"),
        )?;
        let store = self.store.validate()?;
        let (kek, custody) = self.kek.validate(&data_dir)?;
        let max_body_bytes = self.limits.max_body_bytes.unwrap_or(64 * 1024);
        if !(1024..=16 * 1024 * 1024).contains(&max_body_bytes) {
            return Err(err(
                "limits.max_body_bytes",
                "must be between 1024 and 16777216",
            ));
        }
        let listener = self.limits.validate()?;
        let log_format =
            LogFormat::parse("log.format", self.log.format.as_deref().unwrap_or("json"))?;
        let log_level = self.log.level.unwrap_or_else(|| "info".to_owned());
        tracing_subscriber::EnvFilter::try_new(&log_level)
            .map_err(|e| err("log.level", e.to_string()))?;
        let defaults = crate::service::ServiceConfig::default();
        let dur = |field: &str, v: &Option<String>, d: Duration| match v {
            Some(v) => parse_duration(field, v),
            None => Ok(d),
        };
        let claims = match self.nodes.claims.as_deref() {
            None if self.bootstrap.is_some() => ClaimCheck::NodeObject,
            None => ClaimCheck::Allocation,
            Some(v) => ClaimCheck::parse(v).ok_or_else(|| {
                err(
                    "nodes.claims",
                    format!("{v:?} is not one of {}", ClaimCheck::NAMES),
                )
            })?,
        };
        if claims == ClaimCheck::NodeObject && self.bootstrap.is_none() {
            return Err(err(
                "nodes.claims",
                "\"node-object\" reads Node objects through the Kubernetes API that [bootstrap] \
                 configures; add [bootstrap] or use \"allocation\"",
            ));
        }
        let service = crate::service::ServiceConfig {
            node_liveness_timeout: dur(
                "rotation.node_liveness_timeout",
                &self.rotation.node_liveness_timeout,
                defaults.node_liveness_timeout,
            )?,
            rollout_stuck_after: dur(
                "rotation.rollout_stuck_after",
                &self.rotation.rollout_stuck_after,
                defaults.rollout_stuck_after,
            )?,
            checkpoint_interval: dur(
                "audit.checkpoint_interval",
                &self.audit.checkpoint_interval,
                defaults.checkpoint_interval,
            )?,
            segment_records: match self.audit.segment_records {
                Some(0) => return Err(err("audit.segment_records", "must be at least 1")),
                Some(n) => n,
                None => defaults.segment_records,
            },
            segment_age: dur(
                "audit.segment_age",
                &self.audit.segment_age,
                defaults.segment_age,
            )?,
            allow_global_ipsec_import: self
                .ipsec
                .allow_global_import
                .unwrap_or(defaults.allow_global_ipsec_import),
            claims,
            report_chromium: match self.report.chromium {
                Some(p) if !p.is_absolute() => {
                    return Err(err(
                        "report.chromium",
                        format!("{} is not an absolute path", p.display()),
                    ));
                }
                other => other,
            },
        };
        let scheduler_tick = dur(
            "rotation.scheduler_tick",
            &self.rotation.scheduler_tick,
            Duration::from_secs(1),
        )?;
        let managed_ca_key = cluster_pki.as_ref().map(|p| p.ca_key_path());
        let bootstrap = self
            .bootstrap
            .map(|b| b.validate(&tls.ca, managed_ca_key.as_deref()))
            .transpose()?;
        let policy = self.policy.map(policy::RawPolicy::validate).transpose()?;
        Ok(Config {
            service,
            scheduler_tick,
            data_dir,
            store,
            listen,
            ops_listen,
            tls,
            tls_reload_interval,
            kek,
            custody,
            max_body_bytes,
            listener,
            log_format,
            log_level,
            bootstrap,
            policy,
            cluster_pki,
        })
    }
}

impl RawLimits {
    /// The listeners' limits; unset fields take [`keyd_mtls::server::Limits::default`].
    fn validate(&self) -> Result<keyd_mtls::server::Limits, ConfigError> {
        let d = keyd_mtls::server::Limits::default();
        let dur = |field: &str, v: &Option<String>, default: Duration| match v {
            Some(v) => parse_duration(field, v),
            None => Ok(default),
        };
        let max_connections = self.max_connections.unwrap_or(d.max_connections);
        if max_connections == 0 {
            return Err(err("limits.max_connections", "must be greater than zero"));
        }
        Ok(keyd_mtls::server::Limits {
            handshake_timeout: dur(
                "limits.handshake_timeout",
                &self.handshake_timeout,
                d.handshake_timeout,
            )?,
            header_read_timeout: dur(
                "limits.header_read_timeout",
                &self.header_read_timeout,
                d.header_read_timeout,
            )?,
            idle_timeout: dur("limits.idle_timeout", &self.idle_timeout, d.idle_timeout)?,
            max_connections,
            drain: d.drain,
        })
    }
}

fn parse_duration(field: &str, v: &str) -> Result<Duration, ConfigError> {
    let d = humantime::parse_duration(v)
        .map_err(|e| err(field, format!("{v:?}: {e} (use e.g. \"10s\", \"5m\")")))?;
    if d.is_zero() {
        return Err(err(field, "must be greater than zero"));
    }
    Ok(d)
}

/// File, then environment, then flags.
pub fn load(
    file: Option<&Path>,
    env: &HashMap<String, String>,
    flags: &Flags,
) -> Result<Config, ConfigError> {
    let mut raw = match file {
        Some(p) => RawConfig::from_file(p)?,
        None => RawConfig::default(),
    };
    raw.apply_env(env)?;
    raw.apply_flags(flags);
    raw.validate()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_files(dir: &Path) -> String {
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.join(f), "x").unwrap();
        }
        format!(
            "[tls]\nca = {:?}\ncert = {:?}\nkey = {:?}\n",
            dir.join("ca.pem"),
            dir.join("cert.pem"),
            dir.join("key.pem")
        )
    }

    #[test]
    fn layers_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "data_dir = \"/d\"\nlisten = \"127.0.0.1:1\"\nops_listen = \"127.0.0.1:2\"\n{}",
            tls_files(dir.path())
        );
        let mut raw = RawConfig::from_toml(&text).unwrap();
        let env = HashMap::from([("KEYD_LISTEN".to_owned(), "127.0.0.1:3".to_owned())]);
        raw.apply_env(&env).unwrap();
        raw.apply_flags(&Flags {
            ops_listen: Some("127.0.0.1:4".into()),
            ..Flags::default()
        });
        let c = raw.validate().unwrap();
        assert_eq!(c.listen, "127.0.0.1:3".parse().unwrap());
        assert_eq!(c.ops_listen, "127.0.0.1:4".parse().unwrap());
        assert_eq!(
            c.kek,
            KekConfig::Local {
                path: "/d/kek.key".into()
            }
        );
        assert_eq!(c.max_body_bytes, 65536);
    }

    #[test]
    fn claims_default_to_allocations_without_the_kubernetes_api() {
        let dir = tempfile::tempdir().unwrap();
        let base = format!("data_dir = \"/d\"\n{}", tls_files(dir.path()));
        let load = |extra: &str| RawConfig::from_toml(&format!("{base}{extra}"))?.validate();
        assert_eq!(load("").unwrap().service.claims, ClaimCheck::Allocation);
        assert_eq!(
            load("[nodes]\nclaims = \"open\"\n").unwrap().service.claims,
            ClaimCheck::Open
        );
        // Node objects are read through [bootstrap]'s client: without it, refused at start.
        let e = load("[nodes]\nclaims = \"node-object\"\n").unwrap_err();
        assert_eq!(e.field(), "nodes.claims");
        assert!(e.message().contains("[bootstrap]"), "{e}");
        let e = load("[nodes]\nclaims = \"trust\"\n").unwrap_err();
        assert_eq!(e.field(), "nodes.claims");
        let mut raw = RawConfig::from_toml(&base).unwrap();
        raw.apply_env(&HashMap::from([("KEYD_NODE_CLAIMS".into(), "open".into())]))
            .unwrap();
        assert_eq!(raw.validate().unwrap().service.claims, ClaimCheck::Open);
    }

    #[test]
    fn errors_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_files(dir.path());
        let field = |text: &str| {
            RawConfig::from_toml(text)
                .and_then(RawConfig::validate)
                .unwrap_err()
                .field()
                .to_owned()
        };
        assert_eq!(field(&tls), "data_dir");
        assert_eq!(
            field(&format!("data_dir = \"/d\"\nlisten = \"nope\"\n{tls}")),
            "listen"
        );
        assert_eq!(
            field("data_dir = \"/d\"\n[tls]\nca = \"/nonexistent\"\n"),
            "tls.ca"
        );
        assert_eq!(
            field(&format!(
                "data_dir = \"/d\"\n{tls}reload_interval = \"soon\"\n"
            )),
            "tls.reload_interval"
        );
        assert_eq!(
            field(&format!(
                "data_dir = \"/d\"\n{tls}[kek]\nbackend = \"hsm\"\n"
            )),
            "kek.backend"
        );
        assert_eq!(
            field(&format!(
                "data_dir = \"/d\"\n{tls}[log]\nformat = \"xml\"\n"
            )),
            "log.format"
        );
        let e = RawConfig::from_toml("lisen = \"x\"").unwrap_err();
        assert!(e.message().contains("lisen"), "{e}");
        let mut raw = RawConfig::default();
        let e = raw
            .apply_env(&HashMap::from([("KEYD_LISTN".into(), "x".into())]))
            .unwrap_err();
        assert_eq!(e.field(), "KEYD_LISTN");
    }
}
