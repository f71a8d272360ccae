//! `[store]` in keyd's configuration: the embedded redb file (the default) or an etcd cluster
//! shared by several keyd processes. Errors name the field.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use keyd_mtls::ConfigError;

pub use crate::store::{EtcdSettings, EtcdTls};

/// The file form of `[store]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// `redb` (default) or `etcd`.
    pub backend: Option<String>,
    #[serde(default)]
    pub etcd: RawEtcd,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    pub endpoints: Option<Vec<String>>,
    pub prefix: Option<String>,
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub timeout: Option<String>,
    pub max_txn_ops: Option<usize>,
    pub lease_ttl: Option<String>,
    pub max_unavailable: Option<String>,
}

/// The variables of `[store]`.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("KEYD_STORE_BACKEND", "store.backend"),
    ("KEYD_STORE_ETCD_ENDPOINTS", "store.etcd.endpoints"),
    ("KEYD_STORE_ETCD_PREFIX", "store.etcd.prefix"),
    ("KEYD_STORE_ETCD_CA", "store.etcd.ca"),
    ("KEYD_STORE_ETCD_CERT", "store.etcd.cert"),
    ("KEYD_STORE_ETCD_KEY", "store.etcd.key"),
    ("KEYD_STORE_ETCD_LEASE_TTL", "store.etcd.lease_ttl"),
    (
        "KEYD_STORE_ETCD_MAX_UNAVAILABLE",
        "store.etcd.max_unavailable",
    ),
];

/// Where keyd keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreConfig {
    /// `keyd.redb` in the data directory.
    Redb,
    Etcd(EtcdSettings),
}

impl StoreConfig {
    /// For messages and status: `redb:PATH` or `etcd:ENDPOINTS PREFIX`.
    pub fn describe(&self, data_dir: &Path) -> String {
        match self {
            StoreConfig::Redb => format!("redb:{}", data_dir.join("keyd.redb").display()),
            StoreConfig::Etcd(s) => format!("etcd:{}{}", s.endpoints.join(","), s.prefix),
        }
    }
}

pub const DEFAULT_PREFIX: &str = "/keyd/";
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);
/// As long as `kek.max_unavailable`'s default: an hour of etcd outage rides out a member's
/// replacement or a restore, while a replica cut off for longer stops handing out keys.
pub const DEFAULT_MAX_UNAVAILABLE: Duration = Duration::from_secs(3600);
/// etcd's own default for `--max-txn-ops`.
pub const DEFAULT_MAX_TXN_OPS: usize = 128;

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

impl RawStore {
    pub fn apply_env(&mut self, env: &HashMap<String, String>) {
        if let Some(v) = env.get("KEYD_STORE_BACKEND") {
            self.backend = Some(v.clone());
        }
        if let Some(v) = env.get("KEYD_STORE_ETCD_ENDPOINTS") {
            self.etcd.endpoints = Some(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
            );
        }
        if let Some(v) = env.get("KEYD_STORE_ETCD_PREFIX") {
            self.etcd.prefix = Some(v.clone());
        }
        // Paths, as a Secret mounted in a pod names them.
        if let Some(v) = env.get("KEYD_STORE_ETCD_CA") {
            self.etcd.ca = Some(PathBuf::from(v));
        }
        if let Some(v) = env.get("KEYD_STORE_ETCD_CERT") {
            self.etcd.cert = Some(PathBuf::from(v));
        }
        if let Some(v) = env.get("KEYD_STORE_ETCD_KEY") {
            self.etcd.key = Some(PathBuf::from(v));
        }
        if let Some(v) = env.get("KEYD_STORE_ETCD_LEASE_TTL") {
            self.etcd.lease_ttl = Some(v.clone());
        }
        if let Some(v) = env.get("KEYD_STORE_ETCD_MAX_UNAVAILABLE") {
            self.etcd.max_unavailable = Some(v.clone());
        }
    }

    pub fn validate(self) -> Result<StoreConfig, ConfigError> {
        match self.backend.as_deref().unwrap_or("redb") {
            "redb" => Ok(StoreConfig::Redb),
            "etcd" => {
                if !cfg!(feature = "etcd") {
                    return Err(err(
                        "store.backend",
                        "this keyd was built without etcd support: build it with \
                         `--features etcd` (which needs protoc, Debian's protobuf-compiler)",
                    ));
                }
                self.etcd.validate().map(StoreConfig::Etcd)
            }
            other => Err(err(
                "store.backend",
                format!("{other:?} is not one of \"redb\", \"etcd\""),
            )),
        }
    }
}

/// Whether `host` (from a URL) is a loopback address or `localhost`.
fn is_loopback(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Splits `scheme://host:port` and checks its parts.
fn endpoint(field: &str, url: &str) -> Result<(bool, String), ConfigError> {
    let (scheme, rest) = url
        .split_once("://")
        .ok_or_else(|| err(field, format!("{url:?} is not a URL (https://host:port)")))?;
    let tls = match scheme {
        "https" => true,
        "http" => false,
        _ => {
            return Err(err(
                field,
                format!("{url:?}: the scheme must be https (or http to a loopback address)"),
            ));
        }
    };
    let authority = rest.trim_end_matches('/');
    if authority.contains('/') || authority.contains('@') {
        return Err(err(
            field,
            format!("{url:?}: give only scheme://host:port, no path or user"),
        ));
    }
    let (host, port) = authority
        .rsplit_once(':')
        .ok_or_else(|| err(field, format!("{url:?}: the port is missing")))?;
    if host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
        return Err(err(field, format!("{url:?}: expected host:port")));
    }
    Ok((tls, host.to_owned()))
}

impl RawEtcd {
    fn validate(self) -> Result<EtcdSettings, ConfigError> {
        let endpoints = self.endpoints.unwrap_or_default();
        if endpoints.is_empty() {
            return Err(err(
                "store.etcd.endpoints",
                "required with backend = \"etcd\": one URL per member, e.g. \
                 [\"https://etcd-0:2379\"]",
            ));
        }
        let mut schemes = Vec::new();
        for url in &endpoints {
            let (tls, host) = endpoint("store.etcd.endpoints", url)?;
            if !tls && !is_loopback(&host) {
                // The store holds sealed keys and the audit log: on the network they travel
                // authenticated and encrypted.
                return Err(err(
                    "store.etcd.endpoints",
                    format!("{url:?}: plain http is allowed only to a loopback address; use https"),
                ));
            }
            schemes.push(tls);
        }
        if schemes.iter().any(|t| *t != schemes[0]) {
            return Err(err(
                "store.etcd.endpoints",
                "mixes http and https; every member must be reached the same way",
            ));
        }
        let tls_wanted = schemes[0];
        let file = |field: &str, p: PathBuf| -> Result<PathBuf, ConfigError> {
            std::fs::metadata(&p).map_err(|e| err(field, format!("{}: {e}", p.display())))?;
            Ok(p)
        };
        let client = match (self.cert, self.key) {
            (Some(c), Some(k)) => Some((file("store.etcd.cert", c)?, file("store.etcd.key", k)?)),
            (None, None) => None,
            (Some(_), None) => return Err(err("store.etcd.key", "required with store.etcd.cert")),
            (None, Some(_)) => return Err(err("store.etcd.cert", "required with store.etcd.key")),
        };
        let tls = match (tls_wanted, self.ca) {
            (true, Some(ca)) => Some(EtcdTls {
                ca: file("store.etcd.ca", ca)?,
                client,
            }),
            (true, None) => {
                return Err(err(
                    "store.etcd.ca",
                    "required with https endpoints: the CA that signed etcd's certificates",
                ));
            }
            (false, ca) => {
                if ca.is_some() || client.is_some() {
                    return Err(err(
                        "store.etcd.ca",
                        "TLS files are set but the endpoints are http; use https endpoints",
                    ));
                }
                None
            }
        };
        let prefix = self.prefix.unwrap_or_else(|| DEFAULT_PREFIX.to_owned());
        if prefix.is_empty() || !prefix.ends_with('/') || prefix.contains('\0') {
            return Err(err(
                "store.etcd.prefix",
                format!("{prefix:?} must be non-empty and end with '/' (e.g. \"/keyd/\")"),
            ));
        }
        let timeout = match self.timeout.as_deref() {
            None => DEFAULT_TIMEOUT,
            Some(v) => keyd_mtls::ops::parse_duration("store.etcd.timeout", v)?,
        };
        if timeout.is_zero() {
            return Err(err("store.etcd.timeout", "must be greater than zero"));
        }
        let max_txn_ops = self.max_txn_ops.unwrap_or(DEFAULT_MAX_TXN_OPS);
        if max_txn_ops < 16 {
            return Err(err(
                "store.etcd.max_txn_ops",
                "must be at least 16 (etcd's default is 128)",
            ));
        }
        let lease_ttl = match self.lease_ttl.as_deref() {
            None => DEFAULT_LEASE_TTL,
            Some(v) => keyd_mtls::ops::parse_duration("store.etcd.lease_ttl", v)?,
        };
        if lease_ttl < Duration::from_secs(2) || lease_ttl.subsec_nanos() != 0 {
            return Err(err(
                "store.etcd.lease_ttl",
                "must be whole seconds, at least 2s (etcd leases count in seconds)",
            ));
        }
        let max_unavailable = match self.max_unavailable.as_deref() {
            None => DEFAULT_MAX_UNAVAILABLE,
            Some(v) => keyd_mtls::ops::parse_duration("store.etcd.max_unavailable", v)?,
        };
        Ok(EtcdSettings {
            endpoints,
            prefix,
            tls,
            timeout,
            max_txn_ops,
            lease_ttl,
            max_unavailable,
        })
    }
}

/// Opens the configured store.
pub fn open(
    config: &StoreConfig,
    data_dir: &Path,
) -> Result<std::sync::Arc<dyn crate::store::Store>, crate::store::StoreError> {
    match config {
        StoreConfig::Redb => Ok(std::sync::Arc::new(crate::store::RedbStore::open(
            &data_dir.join("keyd.redb"),
        )?)),
        #[cfg(feature = "etcd")]
        StoreConfig::Etcd(settings) => Ok(std::sync::Arc::new(
            crate::store::etcd::EtcdStore::connect(settings)?,
        )),
        #[cfg(not(feature = "etcd"))]
        StoreConfig::Etcd(_) => unreachable!("validate() refuses etcd without the feature"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd(endpoints: &[&str]) -> RawStore {
        RawStore {
            backend: Some("etcd".into()),
            etcd: RawEtcd {
                endpoints: Some(endpoints.iter().map(|s| s.to_string()).collect()),
                ..RawEtcd::default()
            },
        }
    }

    fn field(r: Result<StoreConfig, ConfigError>) -> String {
        r.unwrap_err().field().to_owned()
    }

    #[test]
    fn redb_is_the_default() {
        assert_eq!(RawStore::default().validate().unwrap(), StoreConfig::Redb);
        let raw = RawStore {
            backend: Some("sqlite".into()),
            ..RawStore::default()
        };
        assert_eq!(field(raw.validate()), "store.backend");
    }

    #[cfg(feature = "etcd")]
    #[test]
    fn etcd_endpoints_are_checked() {
        let StoreConfig::Etcd(s) = etcd(&["http://127.0.0.1:2379"]).validate().unwrap() else {
            panic!("not etcd")
        };
        assert_eq!(s.prefix, DEFAULT_PREFIX);
        assert_eq!(s.max_txn_ops, DEFAULT_MAX_TXN_OPS);
        assert!(s.tls.is_none());
        etcd(&["http://[::1]:2379", "http://localhost:2380"])
            .validate()
            .unwrap();
        for bad in [
            &[][..],
            &["127.0.0.1:2379"],
            &["http://etcd-0:2379"],
            &["https://etcd-0"],
            &["https://etcd-0:2379/v3"],
            &["ftp://etcd-0:2379"],
            &["http://127.0.0.1:2379", "https://127.0.0.2:2379"],
        ] {
            assert_eq!(
                field(etcd(bad).validate()),
                "store.etcd.endpoints",
                "{bad:?}"
            );
        }
        // https needs the CA; a client certificate needs its key.
        assert_eq!(
            field(etcd(&["https://etcd-0:2379"]).validate()),
            "store.etcd.ca"
        );
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca.pem");
        std::fs::write(&ca, "x").unwrap();
        let mut raw = etcd(&["https://etcd-0:2379"]);
        raw.etcd.ca = Some(ca.clone());
        raw.etcd.cert = Some(ca.clone());
        assert_eq!(field(raw.validate()), "store.etcd.key");
        let mut raw = etcd(&["https://etcd-0:2379"]);
        raw.etcd.ca = Some(dir.path().join("missing.pem"));
        assert_eq!(field(raw.validate()), "store.etcd.ca");
        let mut raw = etcd(&["http://127.0.0.1:2379"]);
        raw.etcd.prefix = Some("/keyd".into());
        assert_eq!(field(raw.validate()), "store.etcd.prefix");
        let mut raw = etcd(&["http://127.0.0.1:2379"]);
        raw.etcd.max_txn_ops = Some(4);
        assert_eq!(field(raw.validate()), "store.etcd.max_txn_ops");
        let mut raw = etcd(&["http://127.0.0.1:2379"]);
        raw.etcd.lease_ttl = Some("1s".into());
        assert_eq!(field(raw.validate()), "store.etcd.lease_ttl");
        let mut raw = etcd(&["http://127.0.0.1:2379"]);
        raw.etcd.timeout = Some("0s".into());
        assert_eq!(field(raw.validate()), "store.etcd.timeout");
    }

    #[test]
    fn env_sets_the_backend_and_endpoints() {
        let mut raw = RawStore::default();
        let env: HashMap<String, String> = [
            ("KEYD_STORE_BACKEND", "etcd"),
            (
                "KEYD_STORE_ETCD_ENDPOINTS",
                "http://127.0.0.1:2379, http://127.0.0.1:2479",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        raw.apply_env(&env);
        assert_eq!(raw.backend.as_deref(), Some("etcd"));
        assert_eq!(
            raw.etcd.endpoints.unwrap(),
            vec!["http://127.0.0.1:2379", "http://127.0.0.1:2479"]
        );
    }
}
