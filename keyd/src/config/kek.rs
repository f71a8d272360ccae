//! `[kek]` in keyd's configuration: which custodian holds the KEK and how keyd treats it; and
//! the validation of a [`KekSpec`], shared with `POST /v1/kek/migrate` so that a migration
//! target is checked exactly like a configured custodian. Errors name the field.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyd_proto::kek::{AwsKmsSpec, KekSpec, VaultAuth, VaultTransitSpec};
use serde::Deserialize;

use crate::custody::CustodySettings;
use crate::custody::spec::{DEFAULT_JWT_FILE, SpecError, validate_spec};
use keyd_mtls::ConfigError;

/// The file form of `[kek]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKek {
    pub backend: Option<String>,
    pub local_path: Option<PathBuf>,
    pub max_unavailable: Option<String>,
    pub probe_interval: Option<String>,
    pub call_timeout: Option<String>,
    pub verify_on_start: Option<bool>,
    pub concurrency: Option<usize>,
    /// Directories under which `keyctl kek migrate` may name credential and key files.
    pub credential_dirs: Option<Vec<PathBuf>>,
    #[serde(default)]
    pub aws_kms: RawAwsKms,
    #[serde(default)]
    pub vault: RawVault,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAwsKms {
    pub key_id: Option<String>,
    pub region: Option<String>,
    pub endpoint: Option<String>,
    pub profile: Option<String>,
    pub credentials_file: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawVault {
    pub address: Option<String>,
    pub namespace: Option<String>,
    pub mount: Option<String>,
    pub key: Option<String>,
    pub ca_file: Option<PathBuf>,
    /// `token`, `approle` or `kubernetes`.
    pub auth: Option<String>,
    pub auth_mount: Option<String>,
    pub token_file: Option<PathBuf>,
    pub role_id: Option<String>,
    pub secret_id_file: Option<PathBuf>,
    pub role: Option<String>,
    pub jwt_file: Option<PathBuf>,
}

/// The `KEYD_KEK_*` variables beyond `KEYD_KEK_BACKEND` and `KEYD_KEK_LOCAL_PATH`.
pub const ENV_VARS: &[(&str, &str)] = &[
    ("KEYD_KEK_MAX_UNAVAILABLE", "kek.max_unavailable"),
    ("KEYD_KEK_PROBE_INTERVAL", "kek.probe_interval"),
    ("KEYD_KEK_CALL_TIMEOUT", "kek.call_timeout"),
    ("KEYD_KEK_VERIFY_ON_START", "kek.verify_on_start"),
    ("KEYD_KEK_CONCURRENCY", "kek.concurrency"),
    ("KEYD_KEK_AWS_KEY_ID", "kek.aws_kms.key_id"),
    ("KEYD_KEK_AWS_REGION", "kek.aws_kms.region"),
    ("KEYD_KEK_AWS_ENDPOINT", "kek.aws_kms.endpoint"),
    ("KEYD_KEK_AWS_PROFILE", "kek.aws_kms.profile"),
    (
        "KEYD_KEK_AWS_CREDENTIALS_FILE",
        "kek.aws_kms.credentials_file",
    ),
    ("KEYD_KEK_AWS_CONFIG_FILE", "kek.aws_kms.config_file"),
    ("KEYD_KEK_VAULT_ADDR", "kek.vault.address"),
    ("KEYD_KEK_VAULT_NAMESPACE", "kek.vault.namespace"),
    ("KEYD_KEK_VAULT_MOUNT", "kek.vault.mount"),
    ("KEYD_KEK_VAULT_KEY", "kek.vault.key"),
    ("KEYD_KEK_VAULT_CA_FILE", "kek.vault.ca_file"),
    ("KEYD_KEK_VAULT_AUTH", "kek.vault.auth"),
    ("KEYD_KEK_VAULT_AUTH_MOUNT", "kek.vault.auth_mount"),
    ("KEYD_KEK_VAULT_TOKEN_FILE", "kek.vault.token_file"),
    ("KEYD_KEK_VAULT_ROLE_ID", "kek.vault.role_id"),
    ("KEYD_KEK_VAULT_SECRET_ID_FILE", "kek.vault.secret_id_file"),
    ("KEYD_KEK_VAULT_ROLE", "kek.vault.role"),
    ("KEYD_KEK_VAULT_JWT_FILE", "kek.vault.jwt_file"),
];

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

impl RawKek {
    /// Overlays `KEYD_KEK_*` variables from `env`.
    pub fn apply_env(&mut self, env: &HashMap<String, String>) -> Result<(), ConfigError> {
        let s = |k: &str, cur: &mut Option<String>| {
            if let Some(v) = env.get(k) {
                *cur = Some(v.clone());
            }
        };
        let p = |k: &str, cur: &mut Option<PathBuf>| {
            if let Some(v) = env.get(k) {
                *cur = Some(PathBuf::from(v));
            }
        };
        s("KEYD_KEK_BACKEND", &mut self.backend);
        p("KEYD_KEK_LOCAL_PATH", &mut self.local_path);
        s("KEYD_KEK_MAX_UNAVAILABLE", &mut self.max_unavailable);
        s("KEYD_KEK_PROBE_INTERVAL", &mut self.probe_interval);
        s("KEYD_KEK_CALL_TIMEOUT", &mut self.call_timeout);
        if let Some(v) = env.get("KEYD_KEK_VERIFY_ON_START") {
            self.verify_on_start = Some(match v.as_str() {
                "true" | "1" => true,
                "false" | "0" => false,
                _ => {
                    return Err(err(
                        "KEYD_KEK_VERIFY_ON_START",
                        format!("{v:?} is neither true nor false"),
                    ));
                }
            });
        }
        if let Some(v) = env.get("KEYD_KEK_CONCURRENCY") {
            self.concurrency = Some(v.parse().map_err(|_| {
                err(
                    "KEYD_KEK_CONCURRENCY",
                    format!("{v:?} is not a whole number"),
                )
            })?);
        }
        let a = &mut self.aws_kms;
        s("KEYD_KEK_AWS_KEY_ID", &mut a.key_id);
        s("KEYD_KEK_AWS_REGION", &mut a.region);
        s("KEYD_KEK_AWS_ENDPOINT", &mut a.endpoint);
        s("KEYD_KEK_AWS_PROFILE", &mut a.profile);
        p("KEYD_KEK_AWS_CREDENTIALS_FILE", &mut a.credentials_file);
        p("KEYD_KEK_AWS_CONFIG_FILE", &mut a.config_file);
        let v = &mut self.vault;
        s("KEYD_KEK_VAULT_ADDR", &mut v.address);
        s("KEYD_KEK_VAULT_NAMESPACE", &mut v.namespace);
        s("KEYD_KEK_VAULT_MOUNT", &mut v.mount);
        s("KEYD_KEK_VAULT_KEY", &mut v.key);
        p("KEYD_KEK_VAULT_CA_FILE", &mut v.ca_file);
        s("KEYD_KEK_VAULT_AUTH", &mut v.auth);
        s("KEYD_KEK_VAULT_AUTH_MOUNT", &mut v.auth_mount);
        p("KEYD_KEK_VAULT_TOKEN_FILE", &mut v.token_file);
        s("KEYD_KEK_VAULT_ROLE_ID", &mut v.role_id);
        p("KEYD_KEK_VAULT_SECRET_ID_FILE", &mut v.secret_id_file);
        s("KEYD_KEK_VAULT_ROLE", &mut v.role);
        p("KEYD_KEK_VAULT_JWT_FILE", &mut v.jwt_file);
        Ok(())
    }

    /// Checks everything and builds the custodian spec and settings.
    pub fn validate(self, data_dir: &Path) -> Result<(KekSpec, CustodySettings), ConfigError> {
        let defaults = CustodySettings::default();
        let duration = |field: &str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(v) => {
                let d = humantime::parse_duration(&v)
                    .map_err(|e| err(field, format!("{v:?}: {e} (use e.g. \"30s\", \"1h\")")))?;
                if d.is_zero() {
                    return Err(err(field, "must be greater than zero"));
                }
                Ok(d)
            }
        };
        let settings = CustodySettings {
            max_unavailable: duration(
                "kek.max_unavailable",
                self.max_unavailable,
                defaults.max_unavailable,
            )?,
            probe_interval: duration(
                "kek.probe_interval",
                self.probe_interval,
                defaults.probe_interval,
            )?,
            call_timeout: duration("kek.call_timeout", self.call_timeout, defaults.call_timeout)?,
            verify_on_start: self.verify_on_start.unwrap_or(defaults.verify_on_start),
            concurrency: self.concurrency.unwrap_or(defaults.concurrency),
            credential_dirs: Vec::new(),
        };
        let credential_dirs = self.credential_dirs.clone();
        if let Some(dirs) = &credential_dirs
            && let Some(d) = dirs.iter().find(|d| !d.is_absolute())
        {
            return Err(err(
                "kek.credential_dirs",
                format!("{} is not an absolute path", d.display()),
            ));
        }
        if !(1..=256).contains(&settings.concurrency) {
            return Err(err("kek.concurrency", "must be between 1 and 256"));
        }
        if settings.call_timeout > Duration::from_secs(120) {
            return Err(err("kek.call_timeout", "must be at most 2m"));
        }
        let backend = self.backend.as_deref().unwrap_or("local");
        let aws_set = first_set(&[
            ("kek.aws_kms.key_id", self.aws_kms.key_id.is_some()),
            ("kek.aws_kms.region", self.aws_kms.region.is_some()),
            ("kek.aws_kms.endpoint", self.aws_kms.endpoint.is_some()),
            ("kek.aws_kms.profile", self.aws_kms.profile.is_some()),
            (
                "kek.aws_kms.credentials_file",
                self.aws_kms.credentials_file.is_some(),
            ),
            (
                "kek.aws_kms.config_file",
                self.aws_kms.config_file.is_some(),
            ),
        ]);
        let v = &self.vault;
        let vault_set = first_set(&[
            ("kek.vault.address", v.address.is_some()),
            ("kek.vault.namespace", v.namespace.is_some()),
            ("kek.vault.mount", v.mount.is_some()),
            ("kek.vault.key", v.key.is_some()),
            ("kek.vault.ca_file", v.ca_file.is_some()),
            ("kek.vault.auth", v.auth.is_some()),
            ("kek.vault.auth_mount", v.auth_mount.is_some()),
            ("kek.vault.token_file", v.token_file.is_some()),
            ("kek.vault.role_id", v.role_id.is_some()),
            ("kek.vault.secret_id_file", v.secret_id_file.is_some()),
            ("kek.vault.role", v.role.is_some()),
            ("kek.vault.jwt_file", v.jwt_file.is_some()),
        ]);
        let stray = |field: Option<&str>, section: &str| match field {
            Some(f) => Err(err(
                f,
                format!(
                    "is set, but kek.backend is {backend:?}: remove [{section}] or set \
                     kek.backend to match"
                ),
            )),
            None => Ok(()),
        };
        let spec = match backend {
            "local" => {
                stray(aws_set, "kek.aws_kms")?;
                stray(vault_set, "kek.vault")?;
                KekSpec::Local {
                    path: self.local_path.unwrap_or_else(|| data_dir.join("kek.key")),
                }
            }
            "aws-kms" => {
                stray(vault_set, "kek.vault")?;
                if self.local_path.is_some() {
                    return Err(err(
                        "kek.local_path",
                        "is set, but kek.backend is \"aws-kms\"",
                    ));
                }
                let a = self.aws_kms;
                KekSpec::AwsKms(AwsKmsSpec {
                    key_id: a
                        .key_id
                        .ok_or_else(|| err("kek.aws_kms.key_id", "required for aws-kms"))?,
                    region: a.region,
                    endpoint: a.endpoint,
                    profile: a.profile,
                    credentials_file: a.credentials_file,
                    config_file: a.config_file,
                })
            }
            "vault-transit" => {
                stray(aws_set, "kek.aws_kms")?;
                if self.local_path.is_some() {
                    return Err(err(
                        "kek.local_path",
                        "is set, but kek.backend is \"vault-transit\"",
                    ));
                }
                KekSpec::VaultTransit(raw_vault(self.vault)?)
            }
            other => {
                return Err(err(
                    "kek.backend",
                    format!(
                        "{other:?} is not a backend (supported: \"local\", \"aws-kms\", \
                         \"vault-transit\")"
                    ),
                ));
            }
        };
        validate_spec(&spec, "kek")?;
        // By default: the data directory and the directories of the configured custodian's
        // files, which the operator already trusts keyd to read.
        let credential_dirs = credential_dirs.unwrap_or_else(|| {
            let mut dirs = vec![data_dir.to_owned()];
            for (_, f) in spec.files() {
                if let Some(d) = f.parent().filter(|d| !d.as_os_str().is_empty())
                    && !dirs.iter().any(|x| x == d)
                {
                    dirs.push(d.to_owned());
                }
            }
            dirs
        });
        Ok((
            spec,
            CustodySettings {
                credential_dirs,
                ..settings
            },
        ))
    }
}

fn first_set<'a>(fields: &[(&'a str, bool)]) -> Option<&'a str> {
    fields.iter().find(|(_, set)| *set).map(|(f, _)| *f)
}

fn raw_vault(v: RawVault) -> Result<VaultTransitSpec, ConfigError> {
    let method = v.auth.as_deref().unwrap_or("token");
    let not_for = |field: &str, set: bool| {
        if set {
            Err(err(
                field,
                format!("is set, but kek.vault.auth is {method:?}"),
            ))
        } else {
            Ok(())
        }
    };
    let auth = match method {
        "token" => {
            not_for("kek.vault.auth_mount", v.auth_mount.is_some())?;
            not_for("kek.vault.role_id", v.role_id.is_some())?;
            not_for("kek.vault.secret_id_file", v.secret_id_file.is_some())?;
            not_for("kek.vault.role", v.role.is_some())?;
            not_for("kek.vault.jwt_file", v.jwt_file.is_some())?;
            VaultAuth::Token {
                token_file: v.token_file.ok_or_else(|| {
                    err(
                        "kek.vault.token_file",
                        "required for auth \"token\" (a file holding the token, e.g. a Vault \
                         Agent sink)",
                    )
                })?,
            }
        }
        "approle" => {
            not_for("kek.vault.token_file", v.token_file.is_some())?;
            not_for("kek.vault.role", v.role.is_some())?;
            not_for("kek.vault.jwt_file", v.jwt_file.is_some())?;
            VaultAuth::Approle {
                mount: v.auth_mount.unwrap_or_else(|| "approle".into()),
                role_id: v
                    .role_id
                    .ok_or_else(|| err("kek.vault.role_id", "required for auth \"approle\""))?,
                secret_id_file: v.secret_id_file.ok_or_else(|| {
                    err("kek.vault.secret_id_file", "required for auth \"approle\"")
                })?,
            }
        }
        "kubernetes" => {
            not_for("kek.vault.token_file", v.token_file.is_some())?;
            not_for("kek.vault.role_id", v.role_id.is_some())?;
            not_for("kek.vault.secret_id_file", v.secret_id_file.is_some())?;
            VaultAuth::Kubernetes {
                mount: v.auth_mount.unwrap_or_else(|| "kubernetes".into()),
                role: v
                    .role
                    .ok_or_else(|| err("kek.vault.role", "required for auth \"kubernetes\""))?,
                jwt_file: v
                    .jwt_file
                    .unwrap_or_else(|| PathBuf::from(DEFAULT_JWT_FILE)),
            }
        }
        other => {
            return Err(err(
                "kek.vault.auth",
                format!("{other:?} is not one of \"token\", \"approle\", \"kubernetes\""),
            ));
        }
    };
    Ok(VaultTransitSpec {
        address: v
            .address
            .ok_or_else(|| err("kek.vault.address", "required for vault-transit"))?,
        namespace: v.namespace,
        mount: v.mount.unwrap_or_else(|| "transit".into()),
        key: v
            .key
            .ok_or_else(|| err("kek.vault.key", "required for vault-transit"))?,
        ca_file: v.ca_file,
        auth,
    })
}

impl From<SpecError> for ConfigError {
    fn from(e: SpecError) -> Self {
        ConfigError::new(&e.field, e.message)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(toml_text: &str) -> Result<(KekSpec, CustodySettings), ConfigError> {
        #[derive(Deserialize)]
        struct W {
            kek: RawKek,
        }
        let w: W = toml::from_str(toml_text).map_err(|e| err("<file>", e.to_string()))?;
        w.kek.validate(Path::new("/data"))
    }

    fn field(toml_text: &str) -> String {
        parse(toml_text).unwrap_err().field().to_owned()
    }

    #[test]
    fn local_is_the_default() {
        let (spec, settings) = parse("[kek]\n").unwrap();
        assert_eq!(
            spec,
            KekSpec::Local {
                path: "/data/kek.key".into()
            }
        );
        assert_eq!(
            settings,
            CustodySettings {
                credential_dirs: vec!["/data".into()],
                ..CustodySettings::default()
            }
        );
        let (_, settings) = parse("[kek]\ncredential_dirs = [\"/etc/keyd/vault\"]\n").unwrap();
        assert_eq!(
            settings.credential_dirs,
            vec![std::path::PathBuf::from("/etc/keyd/vault")]
        );
        assert_eq!(
            parse("[kek]\ncredential_dirs = [\"vault\"]\n")
                .unwrap_err()
                .field(),
            "kek.credential_dirs"
        );
    }

    #[cfg(feature = "aws-kms")]
    #[test]
    fn aws_kms_fields_are_checked() {
        let (spec, s) = parse(
            "[kek]\nbackend = \"aws-kms\"\nmax_unavailable = \"10m\"\n[kek.aws_kms]\n\
             key_id = \"arn:aws:kms:eu-west-1:111122223333:key/1234abcd-12ab-34cd-56ef-1234567890ab\"\n",
        )
        .unwrap();
        assert!(matches!(spec, KekSpec::AwsKms(_)));
        assert_eq!(s.max_unavailable, Duration::from_secs(600));
        assert_eq!(
            field("[kek]\nbackend = \"aws-kms\"\n"),
            "kek.aws_kms.key_id"
        );
        assert_eq!(
            field(
                "[kek]\nbackend = \"aws-kms\"\n[kek.aws_kms]\nkey_id = \"arn:aws:kms:eu-west-1:1:key/x\"\nregion = \"us-east-1\"\n"
            ),
            "kek.aws_kms.region"
        );
        assert_eq!(
            field(
                "[kek]\nbackend = \"aws-kms\"\n[kek.aws_kms]\nkey_id = \"k\"\nendpoint = \"http://kms.example.com\"\n"
            ),
            "kek.aws_kms.endpoint"
        );
        parse("[kek]\nbackend = \"aws-kms\"\n[kek.aws_kms]\nkey_id = \"k\"\nendpoint = \"http://127.0.0.1:5000\"\n")
            .unwrap();
        assert_eq!(
            field(
                "[kek]\nbackend = \"aws-kms\"\nmax_unavailable = \"0s\"\n[kek.aws_kms]\nkey_id = \"k\"\n"
            ),
            "kek.max_unavailable"
        );
    }

    #[cfg(feature = "vault")]
    #[test]
    fn vault_fields_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let token = dir.path().join("token");
        std::fs::write(&token, "t").unwrap();
        let base = format!(
            "[kek]\nbackend = \"vault-transit\"\n[kek.vault]\naddress = \"https://vault:8200\"\nkey = \"keyd\"\ntoken_file = {token:?}\n"
        );
        let (spec, _) = parse(&base).unwrap();
        let KekSpec::VaultTransit(v) = spec else {
            panic!("not vault")
        };
        assert_eq!(v.mount, "transit");
        assert!(matches!(v.auth, VaultAuth::Token { .. }));
        assert_eq!(
            field(&base.replace("https://vault:8200", "http://vault:8200")),
            "kek.vault.address"
        );
        assert_eq!(field(&format!("{base}role = \"keyd\"\n")), "kek.vault.role");
        assert_eq!(field(&format!("{base}auth = \"ldap\"\n")), "kek.vault.auth");
        assert_eq!(
            field(&format!("{base}ca_file = \"/nonexistent/ca.pem\"\n")),
            "kek.vault.ca_file"
        );
        assert_eq!(
            field(
                "[kek]\nbackend = \"vault-transit\"\n[kek.vault]\naddress = \"https://v\"\nkey = \"k\"\nauth = \"kubernetes\"\n"
            ),
            "kek.vault.role"
        );
        assert_eq!(
            field(
                "[kek]\nbackend = \"vault-transit\"\n[kek.vault]\naddress = \"https://v\"\nkey = \"k\"\nauth = \"approle\"\nrole_id = \"r\"\nsecret_id_file = \"/nonexistent\"\n"
            ),
            "kek.vault.secret_id_file"
        );
        assert_eq!(
            field(
                "[kek]\nbackend = \"vault-transit\"\n[kek.vault]\nkey = \"k\"\ntoken_file = \"/t\"\n"
            ),
            "kek.vault.address"
        );
    }

    #[test]
    fn settings_for_another_backend_are_refused() {
        assert_eq!(
            field("[kek]\nbackend = \"local\"\n[kek.aws_kms]\nkey_id = \"k\"\n"),
            "kek.aws_kms.key_id"
        );
        assert_eq!(field("[kek]\nbackend = \"hsm\"\n"), "kek.backend");
        assert_eq!(field("[kek]\nconcurrency = 0\n"), "kek.concurrency");
    }

    #[test]
    fn env_overrides_the_file() {
        let mut raw = RawKek::default();
        raw.apply_env(&HashMap::from([
            ("KEYD_KEK_PROBE_INTERVAL".to_owned(), "2s".to_owned()),
            ("KEYD_KEK_VERIFY_ON_START".to_owned(), "false".to_owned()),
        ]))
        .unwrap();
        let (_, s) = raw.validate(Path::new("/d")).unwrap();
        assert_eq!(s.probe_interval, Duration::from_secs(2));
        assert!(!s.verify_on_start);
        let e = RawKek::default()
            .apply_env(&HashMap::from([(
                "KEYD_KEK_VERIFY_ON_START".to_owned(),
                "yes".to_owned(),
            )]))
            .unwrap_err();
        assert_eq!(e.field(), "KEYD_KEK_VERIFY_ON_START");
    }
}
