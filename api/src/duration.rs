//! Durations written the way Kubernetes users write them (`30s`, `10m`, `1h30m`, `250ms`).
//!
//! Kubernetes (and therefore every kubectl user) spells durations in Go's `time.ParseDuration` syntax.
//! `humantime` accepts a different, wider grammar (spaces, `days`, `sec`), so the CRD pattern and the
//! parser would disagree; this small parser accepts exactly what the schema pattern admits.

use std::fmt;
use std::time::Duration as StdDuration;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The schema pattern for a duration: one or more `<number><unit>` groups, units ns, us, ms, s, m, h.
pub const DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$";

/// A non-negative duration in Go / Kubernetes syntax, kept with its original spelling.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GoDuration {
    text: String,
    value: StdDuration,
}

/// Why a duration string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    #[error("empty duration: write e.g. 30s, 10m or 1h30m")]
    Empty,
    #[error("invalid duration {0:?}: expected <number><unit> groups with units ns, us, ms, s, m, h (e.g. 90s, 1h30m)")]
    Syntax(String),
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl GoDuration {
    /// Parses `text`, refusing anything outside [`DURATION_PATTERN`].
    pub fn parse(text: &str) -> Result<Self, DurationError> {
        if text.is_empty() {
            return Err(DurationError::Empty);
        }
        let syntax = || DurationError::Syntax(text.to_owned());
        let mut rest = text;
        let mut nanos: u128 = 0;
        while !rest.is_empty() {
            let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).ok_or_else(syntax)?;
            let (num, tail) = rest.split_at(num_len);
            let unit_len = tail.find(|c: char| c.is_ascii_digit()).unwrap_or(tail.len());
            let (unit, tail) = tail.split_at(unit_len);
            let scale: u128 = match unit {
                "ns" => 1,
                "us" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                _ => return Err(syntax()),
            };
            let (whole, frac) = match num.split_once('.') {
                Some((w, f)) if !w.is_empty() && !f.is_empty() => (w, f),
                Some(_) => return Err(syntax()),
                None if num.is_empty() => return Err(syntax()),
                None => (num, ""),
            };
            if frac.contains('.') {
                return Err(syntax());
            }
            let overflow = || DurationError::Overflow(text.to_owned());
            let whole: u128 = whole.parse().map_err(|_| overflow())?;
            let mut part = whole.checked_mul(scale).ok_or_else(overflow)?;
            // Fractions keep nine significant digits at most: finer than a nanosecond is noise.
            let mut div = 1u128;
            let mut frac_val = 0u128;
            for d in frac.chars().take(9) {
                frac_val = frac_val * 10 + u128::from(d.to_digit(10).ok_or_else(syntax)?);
                div *= 10;
            }
            part = part.checked_add(frac_val * scale / div).ok_or_else(overflow)?;
            nanos = nanos.checked_add(part).ok_or_else(overflow)?;
            rest = tail;
        }
        let secs = u64::try_from(nanos / 1_000_000_000).map_err(|_| DurationError::Overflow(text.to_owned()))?;
        let sub = u32::try_from(nanos % 1_000_000_000).map_err(|_| DurationError::Overflow(text.to_owned()))?;
        Ok(Self { text: text.to_owned(), value: StdDuration::new(secs, sub) })
    }

    /// A duration of whole seconds, spelled canonically (`90s`).
    pub fn from_secs(secs: u64) -> Self {
        Self { text: format!("{secs}s"), value: StdDuration::from_secs(secs) }
    }

    /// The parsed value.
    pub fn get(&self) -> StdDuration {
        self.value
    }

    /// The spelling the user wrote.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::str::FromStr for GoDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        Self::parse(&text).map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GoDuration".into()
    }
    fn inline_schema() -> bool {
        true
    }
    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_go_syntax() {
        let cases = [
            ("30s", 30_000),
            ("10m", 600_000),
            ("1h30m", 5_400_000),
            ("250ms", 250),
            ("1.5h", 5_400_000),
            ("0s", 0),
            ("2h0m5s", 7_205_000),
        ];
        for (text, millis) in cases {
            let d = GoDuration::parse(text).unwrap();
            assert_eq!(d.get().as_millis(), millis, "{text}");
            assert_eq!(d.as_str(), text);
        }
        assert_eq!(GoDuration::parse("1500us").unwrap().get().as_micros(), 1500);
    }

    #[test]
    fn refuses_what_the_pattern_refuses() {
        for bad in ["", "10", "s", "10x", "1 h", "-5s", "1.h", ".5s", "1d", "5S", "1h30"] {
            assert!(GoDuration::parse(bad).is_err(), "{bad:?} should be refused");
        }
        let err = GoDuration::parse("12x").unwrap_err().to_string();
        assert!(err.contains("\"12x\"") && err.contains("units ns, us, ms, s, m, h"), "{err}");
    }

    #[test]
    fn serde_round_trip_keeps_spelling() {
        let d: GoDuration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1h30m\"");
        assert!(serde_json::from_str::<GoDuration>("\"forever\"").is_err());
    }
}
