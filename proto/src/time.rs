use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer, de};

/// A point in time, whole seconds since the Unix epoch; RFC 3339 (UTC) in JSON.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Timestamp(pub u64);

impl Timestamp {
    pub fn now() -> Self {
        Self::from_system(SystemTime::now())
    }

    pub fn from_system(t: SystemTime) -> Self {
        Self(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }

    pub fn to_system(self) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(self.0)
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_seconds(self.to_system()))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339(&s)
            .map(Self::from_system)
            .map_err(|e| de::Error::custom(format!("invalid RFC 3339 timestamp {s:?}: {e}")))
    }
}

/// A duration as a person writes it: `90d`, `7d`, `36h`, `5m`, `90s`, `1500ms`.
///
/// One number in the largest unit that divides the duration exactly, or, when that number would
/// be longer than four digits, the exact combination from days down (`3d 4h 12m 5s`, not
/// `274325s`). The text always parses back to the same duration with `humantime::parse_duration`,
/// the parser of keyd's config, its API and keyctl. (`humantime::format_duration` prints 90 days
/// as `2months 29days 2h 52m 48s`, counting a month as 30.44 days.)
pub fn format_duration(d: Duration) -> HumanDuration {
    HumanDuration(d)
}

/// [`format_duration`]'s result: formats when displayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

/// Units of `humantime::parse_duration`, largest first, in nanoseconds. Weeks, months and years
/// are left out: schedules are set and documented in days (`7d`, `90d`), and humantime's month
/// and year are not whole days.
const UNITS: [(&str, u128); 7] = [
    ("d", 86_400 * NANOS_PER_SEC),
    ("h", 3_600 * NANOS_PER_SEC),
    ("m", 60 * NANOS_PER_SEC),
    ("s", NANOS_PER_SEC),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];
const NANOS_PER_SEC: u128 = 1_000_000_000;
/// The longest single number printed; beyond it a combination of units reads better.
const MAX_SINGLE: u128 = 9_999;

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        if nanos == 0 {
            return f.write_str("0s");
        }
        // The first unit that divides exactly gives the smallest whole number.
        if let Some((unit, size)) = UNITS.iter().find(|(_, size)| nanos.is_multiple_of(*size))
            && nanos / size <= MAX_SINGLE
        {
            return write!(f, "{}{unit}", nanos / size);
        }
        let mut rest = nanos;
        let mut sep = "";
        for (unit, size) in UNITS {
            if rest >= size {
                write!(f, "{sep}{}{unit}", rest / size)?;
                rest %= size;
                sep = " ";
            }
        }
        Ok(())
    }
}

/// Serde for `Duration` as a humantime string (`"30d"`, `"90m"`), written by
/// [`format_duration`].
pub mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer, de};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&super::format_duration(*d))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            de::Error::custom(format!(
                "invalid duration {s:?}: {e} (use e.g. \"30d\", \"12h\")"
            ))
        })
    }
}

/// Serde for `Option<Duration>` as a humantime string or null.
pub mod opt_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => super::duration::serialize(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        #[derive(serde::Deserialize)]
        struct W(#[serde(with = "super::duration")] Duration);
        Option::<W>::deserialize(d).map(|o| o.map(|W(d)| d))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parser keyd's config, API and keyctl read durations with.
    fn parse(s: &str) -> Duration {
        humantime::parse_duration(s).unwrap_or_else(|e| panic!("{s:?} does not parse: {e}"))
    }

    #[test]
    fn prints_the_unit_a_person_sets() {
        let day = 86_400;
        for (d, text) in [
            (Duration::from_secs(90 * day), "90d"),
            (Duration::from_secs(7 * day), "7d"),
            (Duration::from_secs(36 * 3_600), "36h"),
            (Duration::from_secs(5 * 60), "5m"),
            (Duration::from_secs(90), "90s"),
            (Duration::from_millis(1_500), "1500ms"),
            (Duration::from_secs(30 * day), "30d"),
            (Duration::from_secs(day), "1d"),
            (Duration::from_nanos(250), "250ns"),
            (Duration::ZERO, "0s"),
            // Past four digits in the unit that divides exactly: the exact combination.
            (
                Duration::from_secs(3 * day + 4 * 3_600 + 12 * 60 + 5),
                "3d 4h 12m 5s",
            ),
            (
                Duration::from_secs(day + 2 * 3_600) + Duration::from_millis(1),
                "1d 2h 1ms",
            ),
            (Duration::from_secs(20_000 * day), "20000d"),
        ] {
            assert_eq!(format_duration(d).to_string(), text, "{d:?}");
            assert_eq!(parse(text), d, "{text}");
        }
    }

    #[test]
    fn round_trips_through_the_parser() {
        // A fixed xorshift sequence: many magnitudes, reproducible without a random crate.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let units = [
            86_400_000_000_000,
            3_600_000_000_000,
            60_000_000_000,
            1_000_000_000,
        ];
        for i in 0..20_000u64 {
            let r = next();
            let d = match i % 4 {
                // Any value with whole seconds, up to about 30 years.
                0 => Duration::from_secs(r % 1_000_000_000),
                // Any value at all, down to the nanosecond.
                1 => Duration::new(r >> 1, (next() % 1_000_000_000) as u32),
                // Whole multiples of a unit, as schedules are set.
                2 => Duration::from_nanos((r % 20_000) * units[(next() % 4) as usize]),
                // Milliseconds, as timeouts are set.
                _ => Duration::from_millis(r % 100_000_000),
            };
            let text = format_duration(d).to_string();
            assert_eq!(parse(&text), d, "{d:?} printed as {text:?}");
        }
        for d in [
            Duration::MAX,
            Duration::from_secs(u64::MAX),
            Duration::from_nanos(1),
        ] {
            let text = format_duration(d).to_string();
            assert_eq!(parse(&text), d, "{d:?} printed as {text:?}");
        }
    }

    #[test]
    fn serde_writes_what_a_person_sets() {
        #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
        struct S(#[serde(with = "duration")] Duration);
        let json = serde_json::to_string(&S(Duration::from_secs(90 * 86_400))).unwrap();
        assert_eq!(json, r#""90d""#);
        assert_eq!(
            serde_json::from_str::<S>(&json).unwrap(),
            S(Duration::from_secs(90 * 86_400))
        );
    }
}
