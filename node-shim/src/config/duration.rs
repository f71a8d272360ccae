//! Duration fields: `5s`, `2m`, `100ms`, with the field named in every error.

use std::ops::RangeInclusive;
use std::time::Duration;

use keyd_mtls::ConfigError;

/// `value` parsed (`default` when absent).
pub(super) fn duration(
    field: &str,
    value: Option<&str>,
    default: Duration,
) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(default),
        Some(s) => humantime::parse_duration(s)
            .map_err(|_| ConfigError::new(field, format!("{s:?} is not a duration like 5s or 2m"))),
    }
}

/// As [`duration`], and within `range` ("must be between 100ms and 1h").
pub(super) fn bounded_duration(
    field: &str,
    value: Option<&str>,
    default: Duration,
    range: RangeInclusive<Duration>,
) -> Result<Duration, ConfigError> {
    let d = duration(field, value, default)?;
    if !range.contains(&d) {
        return Err(ConfigError::new(
            field,
            format!(
                "must be between {} and {}",
                humantime::format_duration(*range.start()),
                humantime::format_duration(*range.end())
            ),
        ));
    }
    Ok(d)
}
