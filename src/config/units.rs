//! Human units in the config file: durations ("250ms", "30s", "5m", "2h", "7d") and sizes
//! ("512", "64KiB", "512MiB", "1GB").

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A duration written with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Duration(pub std::time::Duration);

/// A byte count, written bare or with a unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl std::fmt::Display for Duration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let ms = self.0.as_millis();
        if ms % 1000 == 0 {
            write!(f, "{}s", ms / 1000)
        } else {
            write!(f, "{ms}ms")
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        for (unit, n) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
            if b >= n && b % n == 0 {
                return write!(f, "{}{unit}", b / n);
            }
        }
        write!(f, "{b}B")
    }
}

fn split_number(s: &str) -> Option<(u64, &str)> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let n = s[..digits].parse().ok()?;
    Some((n, s[digits..].trim()))
}

/// Parses "30s"-style durations.
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    let (n, unit) = split_number(s)?;
    let ms: u64 = match unit {
        "ms" => 1,
        "s" => 1000,
        "m" | "min" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        _ => return None,
    };
    Some(std::time::Duration::from_millis(n.checked_mul(ms)?))
}

/// Parses "512MiB"-style sizes.
pub fn parse_size(s: &str) -> Option<u64> {
    let (n, unit) = split_number(s)?;
    let mult: u64 = match unit {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        _ => return None,
    };
    n.checked_mul(mult)
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a duration such as \"250ms\", \"30s\", \"5m\", \"2h\" or \"7d\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
                parse_duration(s)
                    .map(Duration)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &self))
            }
        }
        d.deserialize_str(V)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Size;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a size such as 65536, \"64KiB\", \"512MiB\" or \"1GB\"")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Size, E> {
                parse_size(s)
                    .map(Size)
                    .ok_or_else(|| E::invalid_value(de::Unexpected::Str(s), &self))
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Size, E> {
                u64::try_from(n)
                    .map(Size)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(n), &self))
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("5ms"),
            Some(std::time::Duration::from_millis(5))
        );
        assert_eq!(
            parse_duration("30s"),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(
            parse_duration("7d"),
            Some(std::time::Duration::from_secs(604_800))
        );
        for bad in [
            "",
            "s",
            "10",
            "10 parsecs",
            "-1s",
            "99999999999999999999d",
            "1.5s",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1GB"), Some(1_000_000_000));
        for bad in ["", "MiB", "12 furlongs", "99999999999999999999GiB"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
        assert_eq!(Size(512 << 20).to_string(), "512MiB");
        assert_eq!(
            Duration(std::time::Duration::from_millis(5)).to_string(),
            "5ms"
        );
    }
}
