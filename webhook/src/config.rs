//! The webhook's configuration: a TOML file, then command-line flags. Validated completely before
//! anything binds or connects; an error names the field and the process exits 64.
//!
//! ```toml
//! listen = "0.0.0.0:8443"            # HTTPS: /validate, /healthz, /readyz, /metrics
//! ops_listen = "0.0.0.0:9090"        # optional plain HTTP: /healthz, /readyz, /metrics
//!
//! [tls]                              # the certificate the API server verifies (caBundle)
//! cert = "/etc/keyd-webhook/tls/tls.crt"
//! key = "/etc/keyd-webhook/tls/tls.key"
//! # client_ca = "..."                # require the API server to present a client certificate
//! reload_interval = "10s"
//!
//! [keyd]
//! url = "https://keyd.keyd.svc:8443"
//! ca = "/etc/keyd-webhook/keyd/ca.pem"
//! cert = "/etc/keyd-webhook/keyd/webhook.pem"   # identity spiffe://keyd/webhook/NAME
//! key = "/etc/keyd-webhook/keyd/webhook-key.pem"
//! refresh_interval = "5s"            # how often keyd's status is fetched
//! max_staleness = "30s"              # older than this, keyd's status counts as unknown
//! when_unavailable = "deny"          # or "allow": see docs/webhook.md
//!
//! [policy]
//! sensitive_pod_label = "keyd.io/sensitive=true"        # "" turns it off
//! sensitive_namespace_label = "keyd.io/sensitive=true"  # "" turns it off
//! enforcement = "enforce"            # enforce | warn | audit
//! namespace_enforcement_label = "keyd.io/enforcement"
//! exempt_namespaces = ["kube-system"]
//! break_glass_annotation = "keyd.io/break-glass"
//!
//! [limits]
//! max_body_bytes = 6291456           # larger AdmissionReviews get 413
//! body_timeout = "10s"               # a body slower than this gets 408
//! handshake_timeout = "5s"           # TLS handshake, and HTTP/1.1 request headers
//!
//! [status]
//! interval = "60s"                   # policy status (covered pods); "0s" turns it off
//!
//! [log]
//! format = "json"                    # or "text"
//! level = "info"                     # RUST_LOG overrides
//! ```
//!
//! Flags `--listen`, `--ops-listen`, `--log-level` and `--log-format` override the file.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use crate::decision::{DecisionConfig, Enforcement, LabelRule, WhenKeydUnavailable};
use crate::selector::{is_label_key, is_label_value};
use crate::tls::{ClientTlsPaths, ServerTlsPaths};

pub use keyd_mtls::ops::{ConfigError, EXIT_CONFIG, LogFormat};
use keyd_mtls::ops::{optional_path as path, required_path};

/// Validated configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub ops_listen: Option<SocketAddr>,
    pub tls: ServerTlsPaths,
    pub tls_reload_interval: Duration,
    pub limits: Limits,
    pub keyd: KeydConfig,
    pub decision: DecisionConfig,
    /// How often policy status (covered pods) is recomputed; `None` turns it off.
    pub status_interval: Option<Duration>,
    pub log_format: LogFormat,
    pub log_level: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest AdmissionReview body accepted; larger gets 413.
    pub max_body_bytes: usize,
    /// Time allowed to receive a request body; slower gets 408.
    pub body_timeout: Duration,
    pub handshake_timeout: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeydConfig {
    /// `https://HOST:PORT`.
    pub url: String,
    pub tls: ClientTlsPaths,
    pub refresh_interval: Duration,
    pub max_staleness: Duration,
    /// Per request to keyd.
    pub timeout: Duration,
    /// Decisions held for keyd's audit log while it is unreachable.
    pub audit_queue: usize,
}

/// The file form; every field optional so flags can fill in.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    listen: Option<String>,
    ops_listen: Option<String>,
    #[serde(default)]
    tls: RawTls,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    keyd: RawKeyd,
    #[serde(default)]
    policy: RawPolicy,
    #[serde(default)]
    status: RawStatus,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTls {
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
    reload_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    max_body_bytes: Option<usize>,
    body_timeout: Option<String>,
    handshake_timeout: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKeyd {
    url: Option<String>,
    ca: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
    refresh_interval: Option<String>,
    max_staleness: Option<String>,
    timeout: Option<String>,
    when_unavailable: Option<String>,
    audit_queue: Option<usize>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    sensitive_pod_label: Option<String>,
    sensitive_namespace_label: Option<String>,
    enforcement: Option<String>,
    namespace_enforcement_label: Option<String>,
    exempt_namespaces: Option<Vec<String>>,
    break_glass_annotation: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStatus {
    interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
    level: Option<String>,
}

/// Command-line overrides.
#[derive(Debug, Default, Clone)]
pub struct Flags {
    pub listen: Option<String>,
    pub ops_listen: Option<String>,
    pub log_level: Option<String>,
    pub log_format: Option<String>,
}

fn err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(field, message)
}

/// Upper bounds that keep a typo from disabling a safeguard.
const MAX_BODY_LIMIT: usize = 64 << 20;
const MAX_STALENESS_LIMIT: Duration = Duration::from_secs(3600);

impl Config {
    /// Parses and validates `toml` (the file's text; empty for none) with `flags` on top.
    pub fn parse(toml_text: &str, flags: &Flags) -> Result<Self, ConfigError> {
        let raw: RawConfig = toml::from_str(toml_text).map_err(|e| {
            // toml's message names the key and line; the field is the file as a whole.
            err("<file>", e.message().to_owned())
        })?;
        let listen = addr(
            "listen",
            flags
                .listen
                .as_deref()
                .or(raw.listen.as_deref())
                .unwrap_or("0.0.0.0:8443"),
        )?;
        let ops_listen = flags
            .ops_listen
            .as_deref()
            .or(raw.ops_listen.as_deref())
            .filter(|s| !s.is_empty())
            .map(|s| addr("ops_listen", s))
            .transpose()?;

        let tls = ServerTlsPaths {
            cert: required_path("tls.cert", raw.tls.cert)?,
            key: required_path("tls.key", raw.tls.key)?,
            client_ca: path("tls.client_ca", raw.tls.client_ca)?,
        };
        let tls_reload_interval = duration(
            "tls.reload_interval",
            raw.tls.reload_interval.as_deref(),
            Duration::from_secs(10),
        )?;
        nonzero("tls.reload_interval", tls_reload_interval)?;

        let max_body_bytes = raw.limits.max_body_bytes.unwrap_or(6 << 20);
        if !(4096..=MAX_BODY_LIMIT).contains(&max_body_bytes) {
            return Err(err(
                "limits.max_body_bytes",
                format!("must be between 4096 and {MAX_BODY_LIMIT}"),
            ));
        }
        let limits = Limits {
            max_body_bytes,
            body_timeout: duration(
                "limits.body_timeout",
                raw.limits.body_timeout.as_deref(),
                Duration::from_secs(10),
            )?,
            handshake_timeout: duration(
                "limits.handshake_timeout",
                raw.limits.handshake_timeout.as_deref(),
                Duration::from_secs(5),
            )?,
        };
        nonzero("limits.body_timeout", limits.body_timeout)?;
        nonzero("limits.handshake_timeout", limits.handshake_timeout)?;

        let url = raw.keyd.url.ok_or_else(|| err("keyd.url", "required"))?;
        if !url.starts_with("https://") || url.len() <= "https://".len() {
            return Err(err(
                "keyd.url",
                format!("{url:?} is not a URL like https://keyd.keyd.svc:8443"),
            ));
        }
        let keyd = KeydConfig {
            url,
            tls: ClientTlsPaths {
                ca: required_path("keyd.ca", raw.keyd.ca)?,
                cert: required_path("keyd.cert", raw.keyd.cert)?,
                key: required_path("keyd.key", raw.keyd.key)?,
            },
            refresh_interval: duration(
                "keyd.refresh_interval",
                raw.keyd.refresh_interval.as_deref(),
                Duration::from_secs(5),
            )?,
            max_staleness: duration(
                "keyd.max_staleness",
                raw.keyd.max_staleness.as_deref(),
                Duration::from_secs(30),
            )?,
            timeout: duration(
                "keyd.timeout",
                raw.keyd.timeout.as_deref(),
                Duration::from_secs(2),
            )?,
            audit_queue: raw.keyd.audit_queue.unwrap_or(10_000),
        };
        nonzero("keyd.refresh_interval", keyd.refresh_interval)?;
        nonzero("keyd.timeout", keyd.timeout)?;
        if keyd.max_staleness < keyd.refresh_interval || keyd.max_staleness > MAX_STALENESS_LIMIT {
            return Err(err(
                "keyd.max_staleness",
                "must be at least keyd.refresh_interval and at most 1h",
            ));
        }
        if !(1..=1_000_000).contains(&keyd.audit_queue) {
            return Err(err("keyd.audit_queue", "must be between 1 and 1000000"));
        }
        let when_keyd_unavailable = match raw.keyd.when_unavailable.as_deref() {
            None | Some("deny") => WhenKeydUnavailable::Deny,
            Some("allow") => WhenKeydUnavailable::Allow,
            Some(other) => {
                return Err(err(
                    "keyd.when_unavailable",
                    format!("{other:?} is not deny or allow"),
                ));
            }
        };

        let defaults = DecisionConfig::default();
        let sensitive_pod_label = label_rule(
            "policy.sensitive_pod_label",
            raw.policy.sensitive_pod_label,
            defaults.sensitive_pod_label,
        )?;
        let sensitive_namespace_label = label_rule(
            "policy.sensitive_namespace_label",
            raw.policy.sensitive_namespace_label,
            defaults.sensitive_namespace_label,
        )?;
        if sensitive_pod_label.is_none() && sensitive_namespace_label.is_none() {
            return Err(err(
                "policy.sensitive_pod_label",
                "with policy.sensitive_namespace_label also off, no pod is ever sensitive",
            ));
        }
        let enforcement = match raw.policy.enforcement.as_deref() {
            None => defaults.enforcement,
            Some(s) => Enforcement::parse(s).ok_or_else(|| {
                err(
                    "policy.enforcement",
                    format!("{s:?} is not enforce, warn or audit"),
                )
            })?,
        };
        let namespace_enforcement_label = match raw.policy.namespace_enforcement_label {
            None => defaults.namespace_enforcement_label,
            Some(s) if s.is_empty() => None,
            Some(s) if is_label_key(&s) => Some(s),
            Some(s) => {
                return Err(err(
                    "policy.namespace_enforcement_label",
                    format!("{s:?} is not a label key"),
                ));
            }
        };
        let exempt_namespaces: HashSet<String> = match raw.policy.exempt_namespaces {
            None => defaults.exempt_namespaces,
            Some(v) => v.into_iter().collect(),
        };
        let break_glass_annotation = raw
            .policy
            .break_glass_annotation
            .unwrap_or(defaults.break_glass_annotation);
        if !is_label_key(&break_glass_annotation) {
            return Err(err(
                "policy.break_glass_annotation",
                format!("{break_glass_annotation:?} is not an annotation key"),
            ));
        }

        let status_interval = match raw.status.interval.as_deref() {
            None => Some(Duration::from_secs(60)),
            Some(s) => {
                let d = duration("status.interval", Some(s), Duration::ZERO)?;
                (!d.is_zero()).then_some(d)
            }
        };
        let log_format = LogFormat::parse(
            "log.format",
            flags
                .log_format
                .as_deref()
                .or(raw.log.format.as_deref())
                .unwrap_or("json"),
        )?;
        let log_level = flags
            .log_level
            .clone()
            .or(raw.log.level)
            .unwrap_or_else(|| "info".to_owned());

        Ok(Config {
            listen,
            ops_listen,
            tls,
            tls_reload_interval,
            limits,
            keyd,
            decision: DecisionConfig {
                sensitive_pod_label,
                sensitive_namespace_label,
                enforcement,
                namespace_enforcement_label,
                exempt_namespaces,
                break_glass_annotation,
                when_keyd_unavailable,
            },
            status_interval,
            log_format,
            log_level,
        })
    }
}

fn addr(field: &str, s: &str) -> Result<SocketAddr, ConfigError> {
    s.parse()
        .map_err(|_| err(field, format!("{s:?} is not an address like 0.0.0.0:8443")))
}

fn duration(field: &str, v: Option<&str>, default: Duration) -> Result<Duration, ConfigError> {
    v.map_or(Ok(default), |s| keyd_mtls::ops::parse_duration(field, s))
}

fn nonzero(field: &str, d: Duration) -> Result<(), ConfigError> {
    if d.is_zero() {
        Err(err(field, "must be greater than zero"))
    } else {
        Ok(())
    }
}

/// `key=value`; the empty string turns the rule off.
fn label_rule(
    field: &str,
    v: Option<String>,
    default: Option<LabelRule>,
) -> Result<Option<LabelRule>, ConfigError> {
    let Some(s) = v else {
        return Ok(default);
    };
    if s.is_empty() {
        return Ok(None);
    }
    let (key, value) = s
        .split_once('=')
        .ok_or_else(|| err(field, format!("{s:?} is not key=value")))?;
    if !is_label_key(key) || !is_label_value(value) {
        return Err(err(field, format!("{s:?} is not a valid label key=value")));
    }
    Ok(Some(LabelRule {
        key: key.to_owned(),
        value: value.to_owned(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[tls]
cert = "/t/tls.crt"
key = "/t/tls.key"
[keyd]
url = "https://keyd:8443"
ca = "/k/ca.pem"
cert = "/k/webhook.pem"
key = "/k/webhook-key.pem"
"#;

    fn parse(extra: &str) -> Result<Config, ConfigError> {
        // TOML keys of a table must follow it: put the extra top-level keys first.
        Config::parse(&format!("{extra}\n{MINIMAL}"), &Flags::default())
    }

    #[test]
    fn defaults_are_fail_closed_and_documented() {
        let c = parse("").unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:8443");
        assert_eq!(c.ops_listen, None);
        assert_eq!(c.decision, DecisionConfig::default());
        assert_eq!(c.decision.when_keyd_unavailable, WhenKeydUnavailable::Deny);
        assert!(c.decision.exempt_namespaces.contains("kube-system"));
        assert_eq!(c.keyd.max_staleness, Duration::from_secs(30));
        assert_eq!(c.status_interval, Some(Duration::from_secs(60)));
        assert_eq!(c.limits.max_body_bytes, 6 << 20);
    }

    #[test]
    fn every_policy_setting_is_read() {
        let c = Config::parse(
            &format!(
                "{MINIMAL}\n[policy]\nsensitive_pod_label = \"data=pii\"\nsensitive_namespace_label = \"\"\n\
                 enforcement = \"warn\"\nnamespace_enforcement_label = \"\"\nexempt_namespaces = [\"keyd\", \"kube-system\"]\n\
                 break_glass_annotation = \"example.com/emergency\"\n[status]\ninterval = \"0s\"\n"
            ),
            &Flags {
                listen: Some("127.0.0.1:1".into()),
                ..Flags::default()
            },
        )
        .unwrap();
        assert_eq!(c.listen.to_string(), "127.0.0.1:1");
        let d = &c.decision;
        assert_eq!(
            d.sensitive_pod_label.as_ref().unwrap().to_string(),
            "data=pii"
        );
        assert_eq!(d.sensitive_namespace_label, None);
        assert_eq!(d.enforcement, Enforcement::Warn);
        assert_eq!(d.namespace_enforcement_label, None);
        assert_eq!(d.exempt_namespaces.len(), 2);
        assert_eq!(d.break_glass_annotation, "example.com/emergency");
        assert_eq!(c.status_interval, None);
    }

    #[test]
    fn errors_name_the_field() {
        let field = |toml: &str| {
            Config::parse(toml, &Flags::default())
                .unwrap_err()
                .field()
                .to_owned()
        };
        assert_eq!(field(""), "tls.cert");
        assert_eq!(
            field(&MINIMAL.replace("url = \"https://keyd:8443\"", "")),
            "keyd.url"
        );
        assert_eq!(
            field(&MINIMAL.replace("https://keyd:8443", "http://keyd")),
            "keyd.url"
        );
        let with = |section: &str, line: &str| format!("{MINIMAL}\n[{section}]\n{line}\n");
        assert_eq!(
            field(&MINIMAL.replace("[keyd]", "[keyd]\nwhen_unavailable = \"maybe\"")),
            "keyd.when_unavailable"
        );
        assert_eq!(
            field(&MINIMAL.replace("[keyd]", "[keyd]\nmax_staleness = \"1s\"")),
            "keyd.max_staleness"
        );
        assert_eq!(
            field(&MINIMAL.replace("[keyd]", "[keyd]\nrefresh_interval = \"soon\"")),
            "keyd.refresh_interval"
        );
        assert_eq!(
            field(&with("policy", "enforcement = \"deny\"")),
            "policy.enforcement"
        );
        assert_eq!(
            field(&with("policy", "sensitive_pod_label = \"no-equals\"")),
            "policy.sensitive_pod_label"
        );
        assert_eq!(
            field(&with(
                "policy",
                "sensitive_pod_label = \"\"\nsensitive_namespace_label = \"\""
            )),
            "policy.sensitive_pod_label"
        );
        assert_eq!(
            field(&with("policy", "break_glass_annotation = \"bad key\"")),
            "policy.break_glass_annotation"
        );
        assert_eq!(
            field(&with("limits", "max_body_bytes = 10")),
            "limits.max_body_bytes"
        );
        assert_eq!(field(&format!("listen = \"nowhere\"\n{MINIMAL}")), "listen");
        let unknown = Config::parse(
            &format!("{MINIMAL}\n[policy]\nenforcment = \"warn\"\n"),
            &Flags::default(),
        )
        .unwrap_err();
        assert!(
            matches!(&unknown, ConfigError::Invalid { message, .. } if message.contains("enforcment")),
            "{unknown}"
        );
    }

    /// Every path field: set to "", it is refused naming the field, before any file is read.
    #[test]
    fn empty_paths_name_the_field() {
        // (field, a line of MINIMAL, that line with the field empty)
        let cases = [
            ("tls.cert", "cert = \"/t/tls.crt\"", "cert = \"\""),
            ("tls.key", "key = \"/t/tls.key\"", "key = \"\""),
            ("tls.client_ca", "[tls]", "[tls]\nclient_ca = \"\""),
            ("keyd.ca", "ca = \"/k/ca.pem\"", "ca = \"\""),
            ("keyd.cert", "cert = \"/k/webhook.pem\"", "cert = \"\""),
            ("keyd.key", "key = \"/k/webhook-key.pem\"", "key = \"\""),
        ];
        for (field, line, empty) in cases {
            let toml = MINIMAL.replacen(line, empty, 1);
            assert_ne!(toml, MINIMAL, "case {field}: {line:?} is not in MINIMAL");
            let e = Config::parse(&toml, &Flags::default()).unwrap_err();
            assert_eq!(
                e,
                ConfigError::EmptyPath {
                    field: field.to_owned()
                },
                "case {field}"
            );
            assert!(
                e.to_string().contains(&format!("`{field}`")),
                "case {field}: {e}"
            );
        }
    }
}
