//! Bridge rules: which local topics go up to the cloud and which cloud topics come down, and
//! how their names change on the way. Read from `*.toml` files, validated as a whole (bad
//! filters, overlapping rules, loops), with errors that name the file and line.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use thiserror::Error;

use crate::config::{self, ConfigError};
use crate::proto::mqtt::QoS;
use crate::proto::topic;

/// Why a rule set cannot be used.
#[derive(Debug, Error)]
pub enum RuleError {
    /// A file could not be read, is not valid TOML, or a rule is wrong on its own.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Two rules conflict, or a rule would loop messages back.
    #[error("{0}")]
    Conflict(String),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct OutToml {
    filter: toml::Spanned<String>,
    #[serde(default)]
    local_prefix: String,
    #[serde(default)]
    remote_prefix: String,
    #[serde(default = "one")]
    qos: toml::Spanned<u8>,
    #[serde(default)]
    priority: u8,
    #[serde(default = "yes")]
    retain: bool,
    #[serde(default)]
    buffer: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct InToml {
    filter: toml::Spanned<String>,
    #[serde(default)]
    remote_prefix: String,
    #[serde(default)]
    local_prefix: String,
    #[serde(default = "one")]
    qos: toml::Spanned<u8>,
}

/// QoS 1 when `qos` is not written (no span: it cannot be wrong).
fn one() -> toml::Spanned<u8> {
    toml::Spanned::new(0..0, 1)
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RulesToml {
    #[serde(default, rename = "out")]
    outs: Vec<OutToml>,
    #[serde(default, rename = "in")]
    ins: Vec<InToml>,
}

/// Where a rule was written, for error messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub file: PathBuf,
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file.display(), self.line)
    }
}

/// Local to cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutRule {
    /// Matched against local topics.
    pub filter: String,
    pub local_prefix: String,
    pub remote_prefix: String,
    pub qos: QoS,
    /// Lower drains first.
    pub priority: u8,
    pub retain: bool,
    /// QoS 0 only: keep messages in the outbox while offline instead of dropping them.
    pub buffer: bool,
    pub origin: Origin,
}

/// Cloud to local.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InRule {
    /// Subscribed upstream, matched against cloud topics.
    pub filter: String,
    pub remote_prefix: String,
    pub local_prefix: String,
    pub qos: QoS,
    pub origin: Origin,
}

/// A validated rule set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub outs: Vec<OutRule>,
    pub ins: Vec<InRule>,
}

impl OutRule {
    /// The upstream topic for local `topic`, if this rule takes it.
    pub fn map(&self, topic: &str) -> Option<String> {
        if !topic::matches(&self.filter, topic) {
            return None;
        }
        let rest = topic.strip_prefix(&self.local_prefix)?;
        Some(format!("{}{rest}", self.remote_prefix))
    }
}

impl InRule {
    /// The local topic for cloud `topic`, if this rule takes it.
    pub fn map(&self, topic: &str) -> Option<String> {
        if !topic::matches(&self.filter, topic) {
            return None;
        }
        let rest = topic.strip_prefix(&self.remote_prefix)?;
        Some(format!("{}{rest}", self.local_prefix))
    }
}

impl Rules {
    /// The first outbound rule that takes local `topic`, and the upstream topic.
    pub fn outbound(&self, topic: &str) -> Option<(&OutRule, String)> {
        self.outs.iter().find_map(|r| r.map(topic).map(|t| (r, t)))
    }

    /// The first inbound rule that takes cloud `topic`, and the local topic.
    pub fn inbound(&self, topic: &str) -> Option<(&InRule, String)> {
        self.ins.iter().find_map(|r| r.map(topic).map(|t| (r, t)))
    }

    /// Reads every `*.toml` in `dir`, in name order, substituting `{gateway_id}`.
    pub fn load_dir(dir: &Path, gateway_id: &str) -> Result<Rules, RuleError> {
        let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|source| ConfigError::Read {
                path: dir.to_owned(),
                error: source,
            })?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        files.sort();
        let mut all = Rules::default();
        for f in files {
            let text = std::fs::read_to_string(&f).map_err(|source| ConfigError::Read {
                path: f.clone(),
                error: source,
            })?;
            let r = Rules::parse(&f, &text, gateway_id)?;
            all.outs.extend(r.outs);
            all.ins.extend(r.ins);
        }
        all.validate()?;
        Ok(all)
    }

    /// Parses one file's rules (not yet checked against other files' rules).
    pub fn parse(path: &Path, text: &str, gateway_id: &str) -> Result<Rules, RuleError> {
        let raw: RulesToml = toml::from_str(text).map_err(|e| {
            config::invalid(
                path,
                text,
                e.span().map_or(0, |s| s.start),
                e.message().to_owned(),
            )
        })?;
        let sub = |s: &str| s.replace("{gateway_id}", gateway_id);
        let at = |span: Range<usize>, msg: String| -> RuleError {
            config::invalid(path, text, span.start, msg).into()
        };
        let known = |span: Range<usize>, s: &str| {
            config::placeholders(s, &["gateway_id"]).map_err(|e| at(span, e))
        };
        let origin = |span: &Range<usize>| Origin {
            file: path.to_owned(),
            line: text[..span.start.min(text.len())].matches('\n').count() + 1,
        };
        // At the `qos` value itself, not at the rule's filter.
        let qos = |q: &toml::Spanned<u8>| {
            let v = *q.get_ref();
            QoS::from_bits(v).ok_or_else(|| at(q.span(), format!("qos must be 0, 1 or 2, not {v}")))
        };
        let mut rules = Rules::default();
        for o in raw.outs {
            let span = o.filter.span();
            for s in [o.filter.get_ref(), &o.local_prefix, &o.remote_prefix] {
                known(span.clone(), s)?;
            }
            let filter = sub(o.filter.get_ref());
            topic::validate_filter(&filter)
                .map_err(|e| at(span.clone(), format!("bad filter {filter:?}: {e}")))?;
            let local_prefix = sub(&o.local_prefix);
            if !local_prefix.is_empty() && !prefix_fits(&filter, &local_prefix) {
                return Err(at(
                    span,
                    format!(
                        "filter {filter:?} can match topics outside local_prefix {local_prefix:?}"
                    ),
                ));
            }
            rules.outs.push(OutRule {
                qos: qos(&o.qos)?,
                origin: origin(&span),
                filter,
                local_prefix,
                remote_prefix: sub(&o.remote_prefix),
                priority: o.priority,
                retain: o.retain,
                buffer: o.buffer,
            });
        }
        for i in raw.ins {
            let span = i.filter.span();
            for s in [i.filter.get_ref(), &i.remote_prefix, &i.local_prefix] {
                known(span.clone(), s)?;
            }
            let filter = sub(i.filter.get_ref());
            topic::validate_filter(&filter)
                .map_err(|e| at(span.clone(), format!("bad filter {filter:?}: {e}")))?;
            let remote_prefix = sub(&i.remote_prefix);
            if !remote_prefix.is_empty() && !prefix_fits(&filter, &remote_prefix) {
                return Err(at(span, format!("filter {filter:?} can match topics outside remote_prefix {remote_prefix:?}")));
            }
            rules.ins.push(InRule {
                qos: qos(&i.qos)?,
                origin: origin(&span),
                filter,
                remote_prefix,
                local_prefix: sub(&i.local_prefix),
            });
        }
        rules.validate()?;
        Ok(rules)
    }

    /// Rules that overlap (one message, two rules) or loop (a message that comes down would be
    /// sent up again, or the reverse) are refused.
    fn validate(&self) -> Result<(), RuleError> {
        for (i, a) in self.outs.iter().enumerate() {
            for b in &self.outs[i + 1..] {
                if intersect(&a.filter, &b.filter) {
                    return Err(RuleError::Conflict(format!(
                        "{}: out rule {:?} overlaps out rule {:?} at {}: a message may match both",
                        b.origin, b.filter, a.filter, a.origin
                    )));
                }
            }
        }
        for (i, a) in self.ins.iter().enumerate() {
            for b in &self.ins[i + 1..] {
                if intersect(&a.filter, &b.filter) {
                    return Err(RuleError::Conflict(format!(
                        "{}: in rule {:?} overlaps in rule {:?} at {}",
                        b.origin, b.filter, a.filter, a.origin
                    )));
                }
            }
        }
        for i in &self.ins {
            // What this rule can deliver locally, as a filter.
            let landed = rewrite(&i.filter, &i.remote_prefix, &i.local_prefix);
            for o in &self.outs {
                if !intersect(&landed, &o.filter) {
                    continue;
                }
                let sent_up = rewrite(&o.filter, &o.local_prefix, &o.remote_prefix);
                if intersect(&sent_up, &i.filter) {
                    return Err(RuleError::Conflict(format!(
                        "{}: in rule {:?} and out rule {:?} at {} form a loop: messages coming \
                         down as {landed:?} would go up again",
                        i.origin, i.filter, o.filter, o.origin
                    )));
                }
            }
        }
        Ok(())
    }
}

/// True when every topic `filter` matches starts with `prefix`, so stripping it is defined.
fn prefix_fits(filter: &str, prefix: &str) -> bool {
    // The prefix must be literal text at the filter's start, not under a wildcard.
    filter.starts_with(prefix) && !prefix.contains(['+', '#'])
}

/// `filter` with `from` replaced by `to` at its start.
fn rewrite(filter: &str, from: &str, to: &str) -> String {
    match filter.strip_prefix(from) {
        Some(rest) => format!("{to}{rest}"),
        None => filter.to_owned(),
    }
}

/// True when some topic name matches both filters.
pub fn intersect(a: &str, b: &str) -> bool {
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (Some(l), Some(r)) if l == "+" || r == "+" || l == r => {}
            _ => return false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Rules, RuleError> {
        Rules::parse(Path::new("r.toml"), t, "site-042")
    }

    #[test]
    fn maps_both_ways_with_the_gateway_id() {
        let r = parse(
            r#"
[[out]]
filter = "sensors/#"
remote_prefix = "sites/{gateway_id}/"
qos = 1

[[in]]
filter = "sites/{gateway_id}/cmd/#"
remote_prefix = "sites/{gateway_id}/"
local_prefix = "cloud/"
"#,
        )
        .unwrap();
        assert_eq!(
            r.outbound("sensors/ws1/t").unwrap().1,
            "sites/site-042/sensors/ws1/t"
        );
        assert!(r.outbound("other/x").is_none());
        assert_eq!(
            r.inbound("sites/site-042/cmd/pump").unwrap().1,
            "cloud/cmd/pump"
        );
        assert_eq!(r.outs[0].origin.line, 3);
    }

    #[test]
    fn bad_rules_name_file_and_line() {
        let e = parse("[[out]]\nfilter = \"a/#/b\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("r.toml:2:10: key `filter`: bad filter"),
            "{e}"
        );
        let e = parse("[[out]]\nfilter = \"a/#\"\nremote_prefix = \"sites/{site_id}/\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown placeholder `{site_id}`"), "{e}");
        let e = parse("[[out]]\nfilter = \"a\"\nqos = 3\n")
            .unwrap_err()
            .to_string();
        // Issue 19: it was reported at the filter's line.
        assert!(
            e.starts_with("r.toml:3:7: key `qos`: qos must be 0, 1 or 2"),
            "{e}"
        );
        let e = parse("[[out]]\nfilter = \"a\"\ncolour = 3\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("r.toml:3:1: key `colour`: unknown field"),
            "{e}"
        );
        let e = parse("[[out]]\nfilter = \"#\"\nlocal_prefix = \"x/\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("outside local_prefix"), "{e}");
    }

    #[test]
    fn overlaps_and_loops_are_refused() {
        let e = parse("[[out]]\nfilter = \"a/+\"\n[[out]]\nfilter = \"a/b\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("r.toml:4: out rule \"a/b\" overlaps"), "{e}");
        // Down from cmd/# into local cmd/#, and local cmd/# up again to cmd/#: a loop.
        let e = parse("[[in]]\nfilter = \"cmd/#\"\n[[out]]\nfilter = \"#\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("form a loop"), "{e}");
        // Prefixes keep the two directions apart: no loop.
        parse(
            "[[in]]\nfilter = \"down/#\"\nremote_prefix = \"down/\"\nlocal_prefix = \"cloud/\"\n\
             [[out]]\nfilter = \"sensors/#\"\nremote_prefix = \"up/\"\n",
        )
        .unwrap();
    }

    #[test]
    fn intersection() {
        for (a, b, want) in [
            ("a/b", "a/b", true),
            ("a/+", "a/b", true),
            ("a/#", "b/#", false),
            ("#", "x/y", true),
            ("a/+/c", "a/b/d", false),
            ("a", "a/b", false),
            ("a/#", "a", true),
            ("+/+", "a", false),
        ] {
            assert_eq!(intersect(a, b), want, "{a} vs {b}");
            assert_eq!(intersect(b, a), want, "{b} vs {a}");
        }
    }

    /// Every rule set we ship compiles.
    #[test]
    fn shipped_rule_sets_compile() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("bridge-rules");
        let mut n = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let sub = entry.unwrap().path();
            if sub.is_dir() {
                let r = Rules::load_dir(&sub, "site-042")
                    .unwrap_or_else(|e| panic!("{}: {e}", sub.display()));
                assert!(!r.outs.is_empty(), "{} has no out rule", sub.display());
                n += 1;
            }
        }
        assert!(
            n >= 3,
            "expected the generic, AWS IoT Core and mosquitto/EMQX sets, found {n}"
        );
    }
}
