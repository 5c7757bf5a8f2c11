//! Values whose text form is not their Rust type's: durations given in whole
//! seconds or milliseconds, and `LOW-HIGH` port ranges. Each has a clap value
//! parser and a serde module, so a flag and its settings-file key read the
//! same text the same way (and a flag's value survives the round trip through
//! the settings map that [`super::load`] merges).

use std::ops::RangeInclusive;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serializer};

use super::SettingsError;

/// Parses `LOW-HIGH` with `1 <= LOW <= HIGH`.
pub fn parse_port_range(s: &str) -> Result<RangeInclusive<u16>, SettingsError> {
    let err = || SettingsError::NodePortRange(s.to_string());
    let (lo, hi) = s.split_once('-').ok_or_else(err)?;
    let lo: u16 = lo.trim().parse().map_err(|_| err())?;
    let hi: u16 = hi.trim().parse().map_err(|_| err())?;
    if lo == 0 || lo > hi {
        return Err(err());
    }
    Ok(lo..=hi)
}

/// clap value parser: whole seconds.
pub fn parse_secs(s: &str) -> Result<Duration, std::num::ParseIntError> {
    s.parse().map(Duration::from_secs)
}

/// clap value parser: whole milliseconds.
pub fn parse_millis(s: &str) -> Result<Duration, std::num::ParseIntError> {
    s.parse().map(Duration::from_millis)
}

/// serde: a [`Duration`] written as whole seconds.
pub mod secs {
    use super::*;

    /// Writes whole seconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }

    /// Reads whole seconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_secs)
    }
}

/// serde: a [`Duration`] written as whole milliseconds.
pub mod millis {
    use super::*;

    /// Writes whole milliseconds.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// Reads whole milliseconds.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

/// serde: a port range written `LOW-HIGH`.
pub mod port_range {
    use super::*;

    /// Writes `LOW-HIGH`.
    pub fn serialize<S: Serializer>(r: &RangeInclusive<u16>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&format_args!("{}-{}", r.start(), r.end()))
    }

    /// Reads `LOW-HIGH`.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<RangeInclusive<u16>, D::Error> {
        let s = String::deserialize(d)?;
        parse_port_range(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_range_parses_and_rejects() {
        assert_eq!(parse_port_range("30000-32767"), Ok(30000..=32767));
        assert!(parse_port_range("5-1").is_err());
        assert!(parse_port_range("0-10").is_err());
        assert!(parse_port_range("abc").is_err());
    }
}
