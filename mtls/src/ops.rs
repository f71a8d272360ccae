//! What every binary of the project does the same way: print an error with its causes, set up
//! logging, and name the configuration field that is wrong (exit 64).

use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// Exit status for bad configuration (sysexits' `EX_USAGE`).
pub const EXIT_CONFIG: u8 = 64;

/// Displays an error with its sources, `a: b: c`, for log lines and messages to a person.
#[derive(Debug, Clone, Copy)]
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(e) = source {
            write!(f, ": {e}")?;
            source = e.source();
        }
        Ok(())
    }
}

/// Whether this process runs as root (effective uid 0): Chromium's sandbox cannot start then,
/// and the privileged tests need it.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .map(|l| l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// [`ErrorChain`] as a `String`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    ErrorChain(e).to_string()
}

/// A configuration error: which field (as the file, variable or flag spells it), and what is
/// wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config field `{field}`: {message}")]
    Invalid { field: String, message: String },
    /// A path set to "": refused at once, or it would surface later as an unreadable file with
    /// no field named.
    #[error("config field `{field}`: the path is empty")]
    EmptyPath { field: String },
}

impl ConfigError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        ConfigError::Invalid {
            field: field.to_owned(),
            message: message.into(),
        }
    }

    /// The field, as the file spells it (`tls.cert`), or `<file>` when the file does not parse.
    pub fn field(&self) -> &str {
        match self {
            ConfigError::Invalid { field, .. } | ConfigError::EmptyPath { field } => field,
        }
    }

    /// What is wrong, without the field.
    pub fn message(&self) -> &str {
        match self {
            ConfigError::Invalid { message, .. } => message,
            ConfigError::EmptyPath { .. } => "the path is empty",
        }
    }
}

/// An optional path; when set, it must not be empty.
pub fn optional_path(
    field: &str,
    v: Option<std::path::PathBuf>,
) -> Result<Option<std::path::PathBuf>, ConfigError> {
    match v {
        Some(p) if p.as_os_str().is_empty() => Err(ConfigError::EmptyPath {
            field: field.to_owned(),
        }),
        v => Ok(v),
    }
}

/// A path that must be set and not empty.
pub fn required_path(
    field: &str,
    v: Option<std::path::PathBuf>,
) -> Result<std::path::PathBuf, ConfigError> {
    optional_path(field, v)?.ok_or_else(|| ConfigError::new(field, "required"))
}

/// A duration like `10s`, `5m` or `90d` (humantime's syntax).
pub fn parse_duration(field: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v).map_err(|e| {
        ConfigError::new(
            field,
            format!("{v:?} is not a duration like 10s or 5m: {e}"),
        )
    })
}

/// A socket address like `127.0.0.1:8443` or `[::]:8443`.
pub fn parse_addr(field: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        ConfigError::new(
            field,
            format!("{v:?} is not an address like 127.0.0.1:8443 or [::]:8443"),
        )
    })
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Json,
    Text,
}

impl LogFormat {
    pub fn parse(field: &str, v: &str) -> Result<Self, ConfigError> {
        match v {
            "json" => Ok(LogFormat::Json),
            "text" => Ok(LogFormat::Text),
            other => Err(ConfigError::new(
                field,
                format!("{other:?} is not a log format (json or text)"),
            )),
        }
    }
}

/// Installs the global subscriber (stderr). `level` is an `EnvFilter` directive; `RUST_LOG`
/// overrides it. A second call changes nothing.
pub fn init_logging(format: LogFormat, level: &str) {
    // vaultrs logs every Vault error response at ERROR, including the refusals keyd provokes on
    // purpose (its start-up check unwraps under a wrong context); keyd reports each custodian
    // failure itself, with the backend, key and call. Silenced unless asked for by name. (Crates
    // a binary does not link log nothing, so the directive costs the agents nothing.)
    let level = if level.contains("vaultrs") || level.contains("rustify") {
        level.to_owned()
    } else {
        format!("{level},vaultrs=off,rustify=off")
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Text => builder.try_init(),
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn error_chain_names_every_cause_once() {
        let e = Outer(std::io::Error::other("inner"));
        assert_eq!(error_chain(&e), "outer: inner");
    }

    #[test]
    fn config_errors_name_the_field() {
        let e = parse_duration("tls.reload_interval", "soon").unwrap_err();
        assert_eq!(e.field(), "tls.reload_interval");
        assert!(
            e.to_string()
                .starts_with("config field `tls.reload_interval`: "),
            "{e}"
        );
        assert_eq!(
            parse_duration("x", "90d").unwrap(),
            Duration::from_secs(90 * 86400)
        );
        assert!(parse_addr("listen", "localhost").is_err());
        assert_eq!(
            LogFormat::parse("log.format", "json").unwrap(),
            LogFormat::Json
        );
        assert!(LogFormat::parse("log.format", "yaml").is_err());
        assert_eq!(
            required_path("tls.cert", Some("".into()))
                .unwrap_err()
                .to_string(),
            "config field `tls.cert`: the path is empty"
        );
        assert_eq!(
            required_path("tls.cert", None).unwrap_err().message(),
            "required"
        );
        assert_eq!(optional_path("tls.client_ca", None), Ok(None));
    }
}
