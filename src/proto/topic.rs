//! Topic names and topic filters: validation, matching, and the `$`-topic rule.
//!
//! Owns the MQTT rules for what a topic name or filter may contain and whether a filter matches a
//! name. It never allocates on the matching path and knows nothing about subscribers; the hub's
//! subscription tree uses the same level rules.

use thiserror::Error;

/// Why a topic name or filter is not valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum TopicError {
    /// Topic names and filters must be at least one character long.
    #[error("topic is empty")]
    Empty,
    /// Longer than a UTF-8 string field can carry (65,535 bytes).
    #[error("topic is longer than 65535 bytes")]
    TooLong,
    /// U+0000 is forbidden in every MQTT string.
    #[error("topic contains U+0000")]
    NullCharacter,
    /// `+` or `#` in a topic name (only filters may contain wildcards).
    #[error("topic name contains a wildcard")]
    WildcardInName,
    /// `#` not alone in the last level, or `+` not alone in its level.
    #[error("wildcard does not occupy a whole level")]
    MisplacedWildcard,
    /// `$share/` without a group name, a group with wildcards, or no filter after the group.
    #[error("malformed shared subscription")]
    BadShare,
}

/// Checks a topic name as it appears in PUBLISH or a will: non-empty, no wildcards, no U+0000.
pub fn validate_name(name: &str) -> Result<(), TopicError> {
    check_common(name)?;
    if name.contains(['+', '#']) {
        return Err(TopicError::WildcardInName);
    }
    Ok(())
}

/// Checks a plain topic filter (no `$share/` prefix handling).
pub fn validate_filter(filter: &str) -> Result<(), TopicError> {
    check_common(filter)?;
    let mut levels = filter.split('/').peekable();
    while let Some(level) = levels.next() {
        if level.contains('#') && (level != "#" || levels.peek().is_some()) {
            return Err(TopicError::MisplacedWildcard);
        }
        if level.contains('+') && level != "+" {
            return Err(TopicError::MisplacedWildcard);
        }
    }
    Ok(())
}

fn check_common(s: &str) -> Result<(), TopicError> {
    if s.is_empty() {
        return Err(TopicError::Empty);
    }
    if s.len() > u16::MAX as usize {
        return Err(TopicError::TooLong);
    }
    if s.contains('\0') {
        return Err(TopicError::NullCharacter);
    }
    Ok(())
}

/// A subscription filter, split into its optional shared-subscription group and the filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionFilter<'a> {
    /// The group of a `$share/{group}/{filter}` subscription.
    pub share_group: Option<&'a str>,
    /// The filter that topic names are matched against.
    pub filter: &'a str,
}

/// Parses and validates a filter as it appears in SUBSCRIBE, including `$share/group/filter`.
pub fn parse_subscription(raw: &str) -> Result<SubscriptionFilter<'_>, TopicError> {
    if let Some(rest) = raw.strip_prefix("$share/") {
        let (group, filter) = rest.split_once('/').ok_or(TopicError::BadShare)?;
        if group.is_empty() || group.contains(['+', '#']) || filter.is_empty() {
            return Err(TopicError::BadShare);
        }
        validate_filter(filter)?;
        return Ok(SubscriptionFilter {
            share_group: Some(group),
            filter,
        });
    }
    validate_filter(raw)?;
    Ok(SubscriptionFilter {
        share_group: None,
        filter: raw,
    })
}

/// True when `filter` matches `name`. Both must already be valid.
///
/// A name starting with `$` is not matched by a filter whose first level is `+` or `#`
/// ([MQTT-4.7.2-1]), so `#` never leaks `$SYS` to an ordinary subscriber.
pub fn matches(filter: &str, name: &str) -> bool {
    if name.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut f = filter.split('/');
    let mut n = name.split('/');
    loop {
        match (f.next(), n.next()) {
            (Some("#"), _) => return true,
            (Some("+"), Some(_)) => {}
            (Some(fl), Some(nl)) if fl == nl => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(validate_name("a/b"), Ok(()));
        assert_eq!(validate_name("/"), Ok(()));
        assert_eq!(validate_name(""), Err(TopicError::Empty));
        assert_eq!(validate_name("a/+"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a/#"), Err(TopicError::WildcardInName));
        assert_eq!(validate_name("a\0b"), Err(TopicError::NullCharacter));
        assert_eq!(validate_name(&"x".repeat(65536)), Err(TopicError::TooLong));
    }

    #[test]
    fn filters() {
        for ok in [
            "#",
            "+",
            "a/#",
            "+/+",
            "/+",
            "a/+/c",
            "sport/tennis/#",
            "$SYS/#",
        ] {
            assert_eq!(validate_filter(ok), Ok(()), "{ok}");
        }
        for bad in ["a#", "a/#/b", "a+", "a/b+/c", "#/a", "++"] {
            assert_eq!(
                validate_filter(bad),
                Err(TopicError::MisplacedWildcard),
                "{bad}"
            );
        }
        assert_eq!(validate_filter(""), Err(TopicError::Empty));
    }

    #[test]
    fn shared() {
        let s = parse_subscription("$share/g1/a/+").unwrap();
        assert_eq!(s.share_group, Some("g1"));
        assert_eq!(s.filter, "a/+");
        for bad in [
            "$share/",
            "$share/g",
            "$share//a",
            "$share/g+/a",
            "$share/g/",
        ] {
            assert!(parse_subscription(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_subscription("$shared/x").unwrap().share_group, None);
    }

    #[test]
    fn matching() {
        let cases = [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/+", "a/b/c", false),
            ("a/#", "a", true),
            ("a/#", "a/b/c", true),
            ("#", "a/b", true),
            ("+/+", "/x", true),
            ("+", "/x", false),
            ("/+", "/x", true),
            ("a/b", "a/b/c", false),
            ("a/b/c", "a/b", false),
            ("#", "$SYS/x", false),
            ("+/x", "$SYS/x", false),
            ("$SYS/#", "$SYS/x", true),
            ("$SYS/+", "$SYS/x", true),
            ("sport/+/player1", "sport/tennis/player1", true),
        ];
        for (f, n, want) in cases {
            assert_eq!(matches(f, n), want, "{f} vs {n}");
        }
    }
}
