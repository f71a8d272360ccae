//! What a KEK custodian spec must satisfy before keyd talks to it: key identifiers, URLs,
//! and whether this build has the backend at all. Used when the configuration is read and when
//! an admin asks for a KEK rotation or migration over the API.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use keyd_proto::kek::{KekSpec, VaultAuth};

/// How keyd treats its custodian; `[kek]` in the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustodySettings {
    /// How long keyd keeps handing out the keys it holds in memory while the custodian cannot
    /// be used. After that it refuses, until the custodian answers again.
    pub max_unavailable: Duration,
    /// How often the custodian is checked (a wrap and unwrap round trip) while it is healthy;
    /// while it is not, every `min(probe_interval, 5s)`.
    pub probe_interval: Duration,
    /// Timeout of one custodian call (connect, request and response).
    pub call_timeout: Duration,
    /// Open every sealed record at start-up (not only those keyd needs), so that a record that
    /// no longer opens stops keyd at start rather than surprising it later.
    pub verify_on_start: bool,
    /// How many custodian calls a rewrap or a verification pass keeps in flight.
    pub concurrency: usize,
    /// The directories under which a custodian spec given over the API (`keyctl kek migrate`)
    /// may name files; see [`check_spec_files`].
    pub credential_dirs: Vec<PathBuf>,
}

impl Default for CustodySettings {
    fn default() -> Self {
        Self {
            max_unavailable: Duration::from_secs(3600),
            probe_interval: Duration::from_secs(30),
            call_timeout: Duration::from_secs(5),
            verify_on_start: true,
            concurrency: 16,
            credential_dirs: Vec::new(),
        }
    }
}

/// A custodian spec that cannot be used: the field (as the configuration or the request spells
/// it) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config field `{field}`: {message}")]
pub struct SpecError {
    pub field: String,
    pub message: String,
}

fn err(field: &str, message: impl Into<String>) -> SpecError {
    SpecError {
        field: field.to_owned(),
        message: message.into(),
    }
}

/// Where a Kubernetes pod finds its ServiceAccount token.
pub const DEFAULT_JWT_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/token";

/// The cargo feature a backend needs.
pub fn feature_of(backend: &str) -> &'static str {
    match backend {
        "aws-kms" => "aws-kms",
        "vault-transit" => "vault",
        _ => "",
    }
}

pub(crate) fn compiled(backend: &str) -> bool {
    // Bound first: with literal arms, a build without both features reads as a `matches!`.
    let (aws_kms, vault) = (cfg!(feature = "aws-kms"), cfg!(feature = "vault"));
    match backend {
        "aws-kms" => aws_kms,
        "vault-transit" => vault,
        _ => true,
    }
}

/// Checks a spec completely (files exist, URLs are well formed, no plain HTTP off loopback).
/// `prefix` names the spec in errors: `kek` for the configuration, `to` for an API request.
/// Checks that every file `spec` names lies under one of `dirs` (after resolving symbolic
/// links; a local key file that does not exist yet is judged by its directory). A spec from the
/// API names files keyd reads and sends to the custodian it names (a Vault secret id goes out in
/// a login body), so an admin request must not be able to point it at, say, the CA's key.
pub fn check_spec_files(spec: &KekSpec, dirs: &[PathBuf], prefix: &str) -> Result<(), SpecError> {
    let roots: Vec<PathBuf> = dirs.iter().filter_map(|d| d.canonicalize().ok()).collect();
    for (field, path) in spec.files() {
        let resolved = path
            .canonicalize()
            .or_else(|e| match (path.parent(), path.file_name()) {
                (Some(dir), Some(name)) if e.kind() == std::io::ErrorKind::NotFound => {
                    let dir = if dir.as_os_str().is_empty() {
                        Path::new(".")
                    } else {
                        dir
                    };
                    dir.canonicalize().map(|d| d.join(name))
                }
                _ => Err(e),
            });
        let ok = resolved
            .as_ref()
            .is_ok_and(|r| roots.iter().any(|root| r.starts_with(root)));
        if !ok {
            let listed: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
            return Err(err(
                &format!("{prefix}.{field}"),
                format!(
                    "{} is not under kek.credential_dirs ({}); put the file there or add its \
                     directory to kek.credential_dirs",
                    path.display(),
                    if listed.is_empty() {
                        "none".to_owned()
                    } else {
                        listed.join(", ")
                    }
                ),
            ));
        }
    }
    Ok(())
}

pub fn validate_spec(spec: &KekSpec, prefix: &str) -> Result<(), SpecError> {
    let f = |name: &str| format!("{prefix}.{name}");
    if !compiled(spec.backend()) {
        return Err(err(
            &f("backend"),
            format!(
                "{:?} is not compiled into this keyd (build it with the `{}` feature, which the \
                 default build includes)",
                spec.backend(),
                feature_of(spec.backend())
            ),
        ));
    }
    let file = |name: &str, p: &Path| -> Result<(), SpecError> {
        std::fs::metadata(p)
            .map(|_| ())
            .map_err(|e| err(&f(name), format!("{}: {e}", p.display())))
    };
    match spec {
        KekSpec::Local { path } => {
            // The file is created on first use (its directory may be the data directory, which
            // start-up creates), so only its name is checked here.
            if path.as_os_str().is_empty() || path.file_name().is_none() {
                return Err(err(&f("local_path"), "must name a file"));
            }
        }
        KekSpec::AwsKms(a) => {
            let arn_region =
                validate_key_id(&a.key_id).map_err(|m| err(&f("aws_kms.key_id"), m))?;
            if let Some(region) = &a.region {
                if region.is_empty()
                    || !region
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                {
                    return Err(err(
                        &f("aws_kms.region"),
                        format!("{region:?} is not a region name like eu-west-1"),
                    ));
                }
                if let Some(r) = &arn_region
                    && r != region
                {
                    return Err(err(
                        &f("aws_kms.region"),
                        format!("{region:?} differs from the key ARN's region {r:?}"),
                    ));
                }
            }
            if let Some(ep) = &a.endpoint {
                check_url(ep, "a KMS endpoint would return plaintext data keys")
                    .map_err(|m| err(&f("aws_kms.endpoint"), m))?;
            }
            if let Some(p) = &a.credentials_file {
                file("aws_kms.credentials_file", p)?;
            }
            if let Some(p) = &a.config_file {
                file("aws_kms.config_file", p)?;
            }
            if a.profile.as_deref() == Some("") {
                return Err(err(&f("aws_kms.profile"), "must not be empty"));
            }
        }
        KekSpec::VaultTransit(v) => {
            check_url(
                &v.address,
                "Vault would receive the token and return plaintext data keys",
            )
            .map_err(|m| err(&f("vault.address"), m))?;
            let path_segment = |name: &str, value: &str| -> Result<(), SpecError> {
                let ok = !value.is_empty()
                    && value
                        .split('/')
                        .all(|s| !s.is_empty() && s.chars().all(is_name_char));
                if ok {
                    Ok(())
                } else {
                    Err(err(
                        &f(name),
                        format!("{value:?} is not a Vault path (letters, digits, - _ . and /)"),
                    ))
                }
            };
            path_segment("vault.mount", &v.mount)?;
            if v.key.is_empty() || !v.key.chars().all(is_name_char) {
                return Err(err(
                    &f("vault.key"),
                    format!("{:?} is not a transit key name", v.key),
                ));
            }
            if let Some(ns) = &v.namespace {
                path_segment("vault.namespace", ns.trim_end_matches('/'))?;
            }
            if let Some(ca) = &v.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| err(&f("vault.ca_file"), format!("{}: {e}", ca.display())))?;
                use rustls_pki_types::pem::PemObject as _;
                let certs = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| err(&f("vault.ca_file"), format!("{}: {e}", ca.display())))?;
                if certs.is_empty() {
                    return Err(err(
                        &f("vault.ca_file"),
                        format!("{} holds no PEM certificate", ca.display()),
                    ));
                }
            }
            match &v.auth {
                VaultAuth::Token { token_file } => file("vault.token_file", token_file)?,
                VaultAuth::Approle {
                    mount,
                    role_id,
                    secret_id_file,
                } => {
                    path_segment("vault.auth_mount", mount)?;
                    if role_id.is_empty() {
                        return Err(err(&f("vault.role_id"), "must not be empty"));
                    }
                    file("vault.secret_id_file", secret_id_file)?;
                }
                VaultAuth::Kubernetes {
                    mount,
                    role,
                    jwt_file,
                } => {
                    path_segment("vault.auth_mount", mount)?;
                    if role.is_empty() {
                        return Err(err(&f("vault.role"), "must not be empty"));
                    }
                    file("vault.jwt_file", jwt_file)?;
                }
            }
        }
    }
    Ok(())
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// Accepts a key ARN, key id, alias name or alias ARN; returns the ARN's region.
fn validate_key_id(id: &str) -> Result<Option<String>, String> {
    if id.is_empty() || id.chars().any(char::is_whitespace) {
        return Err(format!("{id:?} is not a KMS key id, key ARN or alias"));
    }
    if let Some(rest) = id.strip_prefix("arn:") {
        let parts: Vec<&str> = rest.splitn(5, ':').collect();
        match parts.as_slice() {
            [_partition, "kms", region, account, resource]
                if !region.is_empty()
                    && !account.is_empty()
                    && (resource.starts_with("key/") || resource.starts_with("alias/")) =>
            {
                Ok(Some((*region).to_owned()))
            }
            _ => Err(format!(
                "{id:?} is not a KMS key ARN (arn:aws:kms:REGION:ACCOUNT:key/ID or :alias/NAME)"
            )),
        }
    } else {
        Ok(None)
    }
}

/// `https://` anywhere; `http://` only to a loopback address, where nothing crosses a network.
fn check_url(url: &str, why_tls: &str) -> Result<(), String> {
    let uri: http::Uri = url
        .parse()
        .map_err(|_| format!("{url:?} is not a URL like https://host:port"))?;
    let host = uri
        .host()
        .ok_or_else(|| format!("{url:?} has no host"))?
        .trim_start_matches('[')
        .trim_end_matches(']');
    match uri.scheme_str() {
        Some("https") => Ok(()),
        Some("http") => {
            let loopback =
                host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if loopback {
                Ok(())
            } else {
                Err(format!(
                    "{url:?} is plain http to a non-loopback host: {why_tls} in clear; use https"
                ))
            }
        }
        _ => Err(format!(
            "{url:?} must start with https:// (or http:// on loopback)"
        )),
    }
}
