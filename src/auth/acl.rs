//! ACL files in mosquitto's format:
//! ```text
//! # before any `user` line: rules for anonymous clients
//! topic read public/#
//! user alice
//! topic readwrite site/alice/#
//! topic deny site/alice/secret
//! # for everyone, %c the client id, %u the user name
//! pattern write devices/%c/telemetry
//! pattern read cmd/%u/#
//! ```
//! Access is `read`, `write`, `readwrite` (the default) or `deny`. As in mosquitto, a matching
//! `deny` wins over any grant, and what no rule grants is denied. A `%u` or `%c` whose value
//! holds `/`, `+` or `#` makes its pattern match nothing: no client can widen its own rule.
//!
//! Subscriptions: mosquitto 2 grants every subscription and only filters deliveries, so a client
//! never learns that it will receive nothing. outpost refuses a subscription when a `deny` rule
//! covers the whole filter, or when no readable rule could ever match a topic inside it (so
//! `test/nosubscribe` under no rule is refused, as the Paho interoperability test expects). A
//! filter that reaches some readable topics is granted (`topic read a/#` grants `#`), and each
//! delivery is then checked against the topic it carries, as mosquitto does.

use std::collections::HashMap;
use std::path::Path;

use super::AuthError;
use crate::proto::topic;

/// What a client wants to do with a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Publish to a topic name.
    Write,
    /// Receive a message on a topic name.
    Read,
    /// Subscribe with a topic filter.
    Subscribe,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Perm {
    Read,
    Write,
    ReadWrite,
    Deny,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    perm: Perm,
    filter: String,
}

/// A loaded ACL file.
#[derive(Debug, Clone, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<Rule>,
}

impl Acl {
    pub fn load(path: &Path) -> Result<Self, AuthError> {
        super::load_with(path, Self::parse)
    }

    /// How many rules it holds.
    pub fn len(&self) -> usize {
        self.anonymous.len()
            + self.patterns.len()
            + self.users.values().map(Vec::len).sum::<usize>()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Parses a file's text; an error names the 1-based line.
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let err = |m: &str| (n + 1, m.to_owned());
            let (word, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
            let rest = rest.trim_start();
            match word {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a name"));
                    }
                    user = Some(rest.to_owned());
                }
                "topic" | "pattern" => {
                    let (perm, filter) = match rest.split_once(char::is_whitespace) {
                        Some(("read", f)) => (Perm::Read, f.trim_start()),
                        Some(("write", f)) => (Perm::Write, f.trim_start()),
                        Some(("readwrite", f)) => (Perm::ReadWrite, f.trim_start()),
                        Some(("deny", f)) => (Perm::Deny, f.trim_start()),
                        // `topic read` alone names no topic (as mosquitto reads it).
                        None if matches!(rest, "read" | "write" | "readwrite" | "deny") => {
                            (Perm::ReadWrite, "")
                        }
                        _ => (Perm::ReadWrite, rest),
                    };
                    if filter.is_empty() {
                        return Err(err("a rule needs a topic filter"));
                    }
                    // Placeholders stand for whole-level values; check the shape without them.
                    let shape = filter.replace("%c", "c").replace("%u", "u");
                    if let Err(e) = topic::validate_filter(&shape) {
                        return Err((n + 1, format!("`{filter}`: {e}")));
                    }
                    let rule = Rule {
                        perm,
                        filter: filter.to_owned(),
                    };
                    match (word, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(u)) => acl.users.entry(u.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => {
                    return Err((
                        n + 1,
                        format!("unknown keyword `{other}`: expected user, topic or pattern"),
                    ))
                }
            }
        }
        Ok(acl)
    }

    /// Whether `username` (None: anonymous) on `client_id` may do `access` on `topic` (a name,
    /// or a filter for `Subscribe`).
    pub fn check(
        &self,
        client_id: &str,
        username: Option<&str>,
        topic: &str,
        access: Access,
    ) -> bool {
        use std::borrow::Cow;
        let own = match username {
            Some(u) => self.users.get(u).map_or(&[][..], Vec::as_slice),
            None => &self.anonymous[..],
        };
        // Walked twice (denials first), without collecting: this runs for every delivery.
        let rules = || {
            own.iter()
                .map(|r| (r.perm, Cow::Borrowed(r.filter.as_str())))
                .chain(
                    self.patterns
                        .iter()
                        .filter_map(|r| Some((r.perm, expand(&r.filter, client_id, username)?))),
                )
        };
        let (denied_by, granted_by): (Relation, Relation) = match access {
            Access::Subscribe => (covers, overlaps),
            _ => (topic::matches, topic::matches),
        };
        if rules().any(|(p, f)| p == Perm::Deny && denied_by(&f, topic)) {
            return false;
        }
        rules().any(|(p, f)| {
            let granted = match access {
                Access::Write => matches!(p, Perm::Write | Perm::ReadWrite),
                Access::Read | Access::Subscribe => matches!(p, Perm::Read | Perm::ReadWrite),
            };
            granted && granted_by(&f, topic)
        })
    }
}

/// `filter` with `%c` and `%u` filled in, or None if a value would not be one plain level.
fn expand<'a>(
    filter: &'a str,
    client_id: &str,
    username: Option<&str>,
) -> Option<std::borrow::Cow<'a, str>> {
    if !filter.contains('%') {
        return Some(std::borrow::Cow::Borrowed(filter));
    }
    let plain = |v: &str| !v.is_empty() && !v.contains(['/', '+', '#']);
    let mut out = filter.to_owned();
    if out.contains("%c") {
        if !plain(client_id) {
            return None;
        }
        out = out.replace("%c", client_id);
    }
    if out.contains("%u") {
        let u = username.filter(|u| plain(u))?;
        out = out.replace("%u", u);
    }
    Some(std::borrow::Cow::Owned(out))
}

/// How a rule's filter relates to what is checked.
type Relation = fn(&str, &str) -> bool;

/// Whether some topic name matches both filters.
fn overlaps(a: &str, b: &str) -> bool {
    // A leading wildcard does not reach `$` topics; two literal first levels are compared below.
    let dollar = |f: &str| f.starts_with('$');
    let wild = |f: &str| f.starts_with('+') || f.starts_with('#');
    if (dollar(a) && wild(b)) || (dollar(b) && wild(a)) {
        return false;
    }
    let mut a = a.split('/');
    let mut b = b.split('/');
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) if x == y => {}
            _ => return false,
        }
    }
}

/// Whether every topic `sub` can match is matched by `acl`.
fn covers(acl: &str, sub: &str) -> bool {
    // `$` topics are only reached by rules that name them, as in matching.
    if sub.starts_with('$') != acl.starts_with('$') {
        return false;
    }
    let mut a = acl.split('/');
    let mut s = sub.split('/');
    loop {
        match (a.next(), s.next()) {
            (Some("#"), _) => return true,
            (None, None) => return true,
            (Some("+"), Some(l)) if l != "#" => {}
            (Some(x), Some(y)) if x == y && y != "+" && y != "#" => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = "\
# anonymous
topic read public/#

user alice
topic readwrite site/alice/#
topic deny site/alice/secret
topic write up/only

user bob
topic site/bob/#

pattern write devices/%c/telemetry
pattern read cmd/%u/#
pattern deny test/nosubscribe
";

    #[test]
    fn rules_by_user_anonymous_and_pattern() {
        let acl = Acl::parse(FILE).unwrap();
        use Access::*;
        let cases: &[(&str, Option<&str>, &str, Access, bool)] = &[
            ("c", None, "public/news", Read, true),
            ("c", None, "public/news", Write, false),
            ("c", None, "site/alice/x", Read, false),
            ("c", Some("alice"), "public/news", Read, false),
            ("c", Some("alice"), "site/alice/x", Write, true),
            ("c", Some("alice"), "site/alice/secret", Read, false),
            ("c", Some("alice"), "site/alice/secret", Write, false),
            ("c", Some("alice"), "up/only", Write, true),
            ("c", Some("alice"), "up/only", Read, false),
            ("c", Some("bob"), "site/bob/a/b", Read, true),
            ("c", Some("bob"), "site/bob/a/b", Write, true),
            ("c", Some("bob"), "site/alice/x", Read, false),
            ("pump7", None, "devices/pump7/telemetry", Write, true),
            (
                "pump7",
                Some("bob"),
                "devices/pump8/telemetry",
                Write,
                false,
            ),
            ("c", Some("bob"), "cmd/bob/start", Read, true),
            ("c", None, "cmd/bob/start", Read, false),
            ("c", Some("bob"), "cmd/alice/start", Read, false),
            // A placeholder value that would widen the rule matches nothing.
            ("a/+", None, "devices/a/x/telemetry", Write, false),
            ("c", Some("#"), "cmd/x/y", Read, false),
            ("c", Some("bob"), "test/nosubscribe", Subscribe, false),
        ];
        for &(c, u, t, a, want) in cases {
            assert_eq!(acl.check(c, u, t, a), want, "{c} {u:?} {t} {a:?}");
        }
    }

    #[test]
    fn subscriptions_must_reach_something_readable() {
        let acl = Acl::parse(
            "topic read a/#\ntopic deny a/secret/#\ntopic read b/+/c\ntopic read $SYS/#\n",
        )
        .unwrap();
        let sub = |f| acl.check("c", None, f, Access::Subscribe);
        assert!(sub("a/#"));
        assert!(sub("a/+/x"));
        assert!(sub("a"));
        // Wider than the grant: granted, and deliveries are filtered.
        assert!(sub("#"));
        assert!(sub("+/x"));
        assert!(sub("b/#"));
        assert!(sub("b/x/+"));
        assert!(sub("b/x/c"));
        assert!(sub("b/+/c"));
        // Nothing readable inside: refused.
        assert!(!sub("b/x/d"));
        assert!(!sub("c/#"));
        assert!(!sub("b/x/c/d"));
        // Wholly inside a deny: refused; straddling it: granted.
        assert!(!sub("a/secret/#"));
        assert!(!sub("a/secret/x"));
        assert!(sub("a/+/x"));
        assert!(sub("$SYS/broker/uptime"));
        assert!(!Acl::parse("topic read a/#\n").unwrap().check(
            "c",
            None,
            "$SYS/#",
            Access::Subscribe
        ));
        assert!(!Acl::parse("topic read $SYS/#\n").unwrap().check(
            "c",
            None,
            "#",
            Access::Subscribe
        ));
        let open = Acl::parse("topic read #\n").unwrap();
        assert!(!open.check("c", None, "$SYS/x", Access::Subscribe));
        assert!(!open.check("c", None, "$SYS/x", Access::Read));
    }

    #[test]
    fn bad_files_name_the_line() {
        for (text, line, needle) in [
            ("user\n", 1, "needs a name"),
            ("topic read\n", 1, "needs a topic"),
            ("\n\ntopic read a/#/b\n", 3, "wildcard"),
            ("allow all\n", 1, "unknown keyword"),
        ] {
            let (l, m) = Acl::parse(text).unwrap_err();
            assert_eq!(l, line, "{text:?}: {m}");
            assert!(m.contains(needle), "{text:?}: {m}");
        }
    }
}
