//! The key-encryption-key custodian: which one holds keyd's KEK, its health, and KEK rotations
//! and migrations (`/v1/kek`).
//!
//! A [`KekSpec`] names a custodian and how to reach it. It never holds a secret: credentials are
//! referenced (a file path, the AWS default credential chain), so a spec can be stored, audited
//! and sent over the API.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::Timestamp;

/// A KEK custodian and how to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "kebab-case", deny_unknown_fields)]
pub enum KekSpec {
    /// A 256-bit key in a 0600 file.
    Local { path: PathBuf },
    /// An AWS KMS symmetric key (or a KMS-compatible server at `endpoint`).
    AwsKms(AwsKmsSpec),
    /// A HashiCorp Vault (or OpenBao) transit key.
    VaultTransit(VaultTransitSpec),
}

impl KekSpec {
    /// The backend name, as in `kek.backend`.
    pub fn backend(&self) -> &'static str {
        match self {
            KekSpec::Local { .. } => "local",
            KekSpec::AwsKms(_) => "aws-kms",
            KekSpec::VaultTransit(_) => "vault-transit",
        }
    }

    /// A short non-secret description: the key file, the key id, or Vault address and key.
    pub fn describe(&self) -> String {
        match self {
            KekSpec::Local { path } => format!("local {}", path.display()),
            KekSpec::AwsKms(a) => format!("aws-kms {}", a.key_id),
            KekSpec::VaultTransit(v) => format!(
                "vault-transit {}{}/{}/{}",
                v.address,
                v.namespace
                    .as_deref()
                    .map(|n| format!(" namespace {n}"))
                    .unwrap_or_default(),
                v.mount,
                v.key
            ),
        }
    }

    /// Every file the spec names, with its field: what keyd would read (or, for a local key,
    /// create) to use this custodian.
    pub fn files(&self) -> Vec<(&'static str, &std::path::Path)> {
        let mut out: Vec<(&'static str, &std::path::Path)> = Vec::new();
        match self {
            KekSpec::Local { path } => out.push(("local_path", path)),
            KekSpec::AwsKms(a) => {
                out.extend(
                    a.credentials_file
                        .as_deref()
                        .map(|p| ("aws_kms.credentials_file", p)),
                );
                out.extend(a.config_file.as_deref().map(|p| ("aws_kms.config_file", p)));
            }
            KekSpec::VaultTransit(v) => {
                out.extend(v.ca_file.as_deref().map(|p| ("vault.ca_file", p)));
                out.push(match &v.auth {
                    VaultAuth::Token { token_file } => ("vault.token_file", token_file),
                    VaultAuth::Approle { secret_id_file, .. } => {
                        ("vault.secret_id_file", secret_id_file)
                    }
                    VaultAuth::Kubernetes { jwt_file, .. } => ("vault.jwt_file", jwt_file),
                });
            }
        }
        out
    }

    /// Whether both specs name the same key (connection details may differ).
    pub fn same_key(&self, other: &KekSpec) -> bool {
        match (self, other) {
            (KekSpec::Local { path: a }, KekSpec::Local { path: b }) => a == b,
            (KekSpec::AwsKms(a), KekSpec::AwsKms(b)) => a.key_id == b.key_id,
            (KekSpec::VaultTransit(a), KekSpec::VaultTransit(b)) => {
                a.address.trim_end_matches('/') == b.address.trim_end_matches('/')
                    && a.namespace == b.namespace
                    && a.mount == b.mount
                    && a.key == b.key
            }
            _ => false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AwsKmsSpec {
    /// Key ARN (recommended), key id, or alias (`alias/NAME`, or its ARN).
    pub key_id: String,
    /// Region; default: from the key ARN, else the AWS default chain (`AWS_REGION`, profile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Endpoint URL of a KMS-compatible server; default: the regional AWS endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Profile name in the shared config/credentials files; default: the AWS default chain
    /// (environment, web identity for IRSA, container and instance credentials).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<String>,
    /// A shared credentials file to read instead of `~/.aws/credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// A shared config file to read instead of `~/.aws/config`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_file: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VaultTransitSpec {
    /// `https://vault.example:8200` (plain `http://` only on loopback).
    pub address: String,
    /// Vault Enterprise / HCP namespace, sent as `X-Vault-Namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    /// Mount path of the transit engine.
    pub mount: String,
    /// The transit key, created with `derived=true`.
    pub key: String,
    /// PEM CA bundle to trust for Vault's certificate, in addition to the system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    pub auth: VaultAuth,
}

/// How keyd logs in to Vault. Secrets are read from files, never held in the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "kebab-case", deny_unknown_fields)]
pub enum VaultAuth {
    /// A token in a file (re-read when Vault refuses the old one, e.g. a Vault Agent sink).
    Token { token_file: PathBuf },
    /// AppRole: `role_id` is not secret; the secret id is read from a file.
    Approle {
        mount: String,
        role_id: String,
        secret_id_file: PathBuf,
    },
    /// Kubernetes ServiceAccount JWT login.
    Kubernetes {
        mount: String,
        role: String,
        jwt_file: PathBuf,
    },
}

impl VaultAuth {
    pub fn method(&self) -> &'static str {
        match self {
            VaultAuth::Token { .. } => "token",
            VaultAuth::Approle { .. } => "approle",
            VaultAuth::Kubernetes { .. } => "kubernetes",
        }
    }
}

/// `GET /v1/kek`, and `custody` in `GET /v1/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KekStatus {
    /// The custodian new records are sealed under.
    pub backend: String,
    pub key_id: String,
    pub spec: String,
    /// `ok`, or why the custodian cannot be used now.
    pub health: CustodianHealth,
    /// Other custodians keyd can still unwrap with (records not yet rewrapped).
    #[serde(default)]
    pub retired: Vec<String>,
    /// The running, or last, KEK rotation or migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<MigrationStatus>,
    /// Set when `kek` in the configuration names another key than the store's active custodian.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_note: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustodianHealth {
    /// `ok`, `unavailable`, `permission_denied`, `key_not_found`, `key_disabled`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When the custodian stopped answering usefully.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<Timestamp>,
    /// Until when keyd keeps serving the keys it holds in memory (`kek.max_unavailable`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serving_until: Option<Timestamp>,
    /// False once `serving_until` has passed: keyd refuses to hand out keys.
    pub serving: bool,
    /// When keyd last checked the custodian (a wrap and unwrap round trip).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_check: Option<Timestamp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStatus {
    pub id: u64,
    /// `rotate` or `migrate`.
    pub kind: String,
    pub from: Vec<String>,
    pub to: String,
    /// `running`, `paused` (the custodian is unavailable; retried), `completed`.
    pub state: String,
    pub started_at: Timestamp,
    pub started_by: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<Timestamp>,
    /// Sealed records when the migration started (more may be added while it runs).
    pub total: u64,
    pub rewrapped: u64,
    /// Records that could not be opened under their own KEK: left as they were.
    pub failed: u64,
    #[serde(default)]
    pub failures: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// `POST /v1/kek/rotate`: a new KEK on the same backend.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekRotateRequest {
    /// aws-kms: the new key (required: KMS keys are rotated by moving to a new key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// vault-transit: do not create a new key version, only rewrap to the latest one (e.g.
    /// after Vault's `auto_rotate_period` rotated the key).
    #[serde(default)]
    pub rewrap_only: bool,
}

/// `POST /v1/kek/migrate`: move every record to another custodian.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KekMigrateRequest {
    pub to: KekSpec,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_round_trip_and_refuse_unknown_fields() {
        let spec = KekSpec::VaultTransit(VaultTransitSpec {
            address: "https://vault:8200".into(),
            namespace: Some("platform".into()),
            mount: "transit".into(),
            key: "keyd".into(),
            ca_file: None,
            auth: VaultAuth::Approle {
                mount: "approle".into(),
                role_id: "r".into(),
                secret_id_file: "/run/secret".into(),
            },
        });
        let json = serde_json::to_string(&spec).expect("serializes");
        assert!(json.contains(r#""backend":"vault-transit""#), "{json}");
        assert!(json.contains(r#""method":"approle""#), "{json}");
        assert_eq!(
            serde_json::from_str::<KekSpec>(&json).expect("parses"),
            spec
        );
        let err = serde_json::from_str::<KekSpec>(r#"{"backend":"local","path":"/k","pth":1}"#)
            .expect_err("unknown field");
        assert!(err.to_string().contains("pth"), "{err}");
        assert!(spec.same_key(&spec.clone()));
    }
}
