//! `[uplink]`: where the cloud broker is and how to reach it. Parsed and checked here; the
//! bridge turns it into a connection.

use super::spans::{KeyPath, Step};
use std::path::PathBuf;

use serde::Deserialize;

use super::Duration;

/// The transports of `url`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// MQTT over TCP.
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl Scheme {
    /// True for the schemes that use TLS.
    pub fn tls(self) -> bool {
        matches!(self, Scheme::Mqtts | Scheme::Wss)
    }
}

/// A parsed `url`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// The WebSocket path; "/mqtt" unless given.
    pub path: String,
}

impl Url {
    /// Parses `mqtt://host[:port]`, `mqtts://`, `ws://host[:port][/path]` and `wss://`.
    pub fn parse(s: &str) -> Result<Url, String> {
        let (scheme, rest) = s
            .split_once("://")
            .ok_or_else(|| format!("{s:?} is not a URL like mqtts://host:8883"))?;
        let (scheme, default_port) = match scheme {
            "mqtt" | "tcp" => (Scheme::Mqtt, 1883),
            "mqtts" | "ssl" => (Scheme::Mqtts, 8883),
            "ws" => (Scheme::Ws, 80),
            "wss" => (Scheme::Wss, 443),
            other => {
                return Err(format!(
                    "scheme {other:?} is not one of mqtt, mqtts, ws, wss"
                ))
            }
        };
        let (authority, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if authority.contains('@') {
            return Err(
                "credentials in the URL are not used (and would show in logs): write `username` and `password_file` in [uplink] instead"
                    .into(),
            );
        }
        if !path.is_empty() && !matches!(scheme, Scheme::Ws | Scheme::Wss) {
            return Err(format!("an {} URL has no path", scheme_name(scheme)));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("unclosed '[' in {authority:?}"))?;
            (h, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (authority, None),
            }
        };
        if host.is_empty() {
            return Err(format!("no host in {s:?}"));
        }
        let port = match port {
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| format!("port {p:?} is not a number from 1 to 65535"))?,
            None => default_port,
        };
        Ok(Url {
            scheme,
            host: host.to_owned(),
            port,
            path: if path.is_empty() {
                "/mqtt".into()
            } else {
                path.to_owned()
            },
        })
    }
}

fn scheme_name(s: Scheme) -> &'static str {
    match s {
        Scheme::Mqtt => "mqtt",
        Scheme::Mqtts => "mqtts",
        Scheme::Ws => "ws",
        Scheme::Wss => "wss",
    }
}

/// `protocol` in `[uplink]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum Protocol {
    #[serde(rename = "5")]
    V5,
    #[serde(rename = "3.1.1")]
    V311,
}

/// `backoff` in `[uplink]`.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backoff {
    pub min: Duration,
    pub max: Duration,
}

/// `rate_limit` in `[uplink]`; 0 is unlimited.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimit {
    pub messages_per_s: u32,
    pub bytes_per_s: u64,
}

/// `[uplink]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Uplink {
    pub url: String,
    #[serde(default = "default_client_id")]
    pub client_id: String,
    #[serde(default = "default_protocol")]
    pub protocol: Protocol,
    #[serde(default = "default_keepalive")]
    pub keepalive: Duration,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    #[serde(default)]
    pub alpn: Vec<String>,
    /// TLS server name when it differs from the URL's host.
    #[serde(default)]
    pub server_name: Option<String>,
    #[serde(default = "default_session_expiry")]
    pub session_expiry: Duration,
    #[serde(default = "default_backoff")]
    pub backoff: Backoff,
    #[serde(default = "default_max_inflight")]
    pub max_inflight: u16,
    #[serde(default)]
    pub rate_limit: RateLimit,
    #[serde(default = "default_rules_dir")]
    pub rules_dir: PathBuf,
}

fn default_client_id() -> String {
    "{gateway_id}".into()
}
fn default_protocol() -> Protocol {
    Protocol::V5
}
fn default_keepalive() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}
fn default_session_expiry() -> Duration {
    Duration(std::time::Duration::from_secs(7 * 86_400))
}
fn default_backoff() -> Backoff {
    Backoff {
        min: Duration(std::time::Duration::from_secs(1)),
        max: Duration(std::time::Duration::from_secs(300)),
    }
}
fn default_max_inflight() -> u16 {
    32
}
fn default_rules_dir() -> PathBuf {
    PathBuf::from("/etc/outpost/bridge-rules")
}

impl Uplink {
    /// What is wrong with the section, as (key, message).
    pub(super) fn problems(&self) -> Option<(KeyPath, String)> {
        if let Err(e) = Url::parse(&self.url) {
            return Some((vec![Step::Key("url")], e));
        }
        let ka = self.keepalive.0.as_secs();
        if ka == 0 || ka > u16::MAX as u64 {
            return Some((
                vec![Step::Key("keepalive")],
                "must be from 1s to 65535s: it is how a dead link is found".into(),
            ));
        }
        if self.session_expiry.0.as_secs() > u32::MAX as u64 {
            return Some((vec![Step::Key("session_expiry")], "is too long".into()));
        }
        if self.backoff.min.0.is_zero() || self.backoff.min.0 > self.backoff.max.0 {
            return Some((vec![Step::Key("backoff")], "needs 0 < min <= max".into()));
        }
        if self.max_inflight == 0 {
            return Some((vec![Step::Key("max_inflight")], "must be at least 1".into()));
        }
        if self.client_id.is_empty() {
            return Some((vec![Step::Key("client_id")], "must not be empty".into()));
        }
        if let Err(e) = super::placeholders(&self.client_id, &["gateway_id"]) {
            return Some((vec![Step::Key("client_id")], e));
        }
        if self.cert_file.is_some() != self.key_file.is_some() {
            return Some((
                vec![Step::Key("cert_file")],
                "cert_file and key_file go together".into(),
            ));
        }
        let tls = Url::parse(&self.url).is_ok_and(|u| u.scheme.tls());
        if !tls && (self.ca_file.is_some() || self.cert_file.is_some() || !self.alpn.is_empty()) {
            return Some((
                vec![Step::Key("url")],
                "TLS files or alpn are set but the URL is not mqtts:// or wss://".into(),
            ));
        }
        None
    }

    /// The parsed URL (checked at load).
    pub fn url(&self) -> Url {
        Url::parse(&self.url).unwrap_or(Url {
            scheme: Scheme::Mqtt,
            host: "localhost".into(),
            port: 1883,
            path: "/mqtt".into(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        let u = Url::parse("mqtts://broker.example.com").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Mqtts, "broker.example.com", 8883)
        );
        let u = Url::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((u.scheme, u.port), (Scheme::Mqtt, 1884));
        let u = Url::parse("wss://a.iot.eu-west-1.amazonaws.com/mqtt").unwrap();
        assert_eq!(
            (u.scheme, u.port, u.path.as_str()),
            (Scheme::Wss, 443, "/mqtt")
        );
        let u = Url::parse("mqtt://[::1]:2000").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", 2000));
        for bad in [
            "broker:1883",
            "http://x",
            "mqtt://:1883",
            "mqtt://x:0",
            "mqtt://x:99999",
            "mqtt://x/path",
        ] {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }
}
