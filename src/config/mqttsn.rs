//! `[mqttsn]`: the MQTT-SN gateway's settings, shared by its UDP and serial transports, and the
//! network lists (`qos_minus_one_from`) it checks sources against.

use super::spans::{KeyPath, Step};
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroUsize;

use serde::de::{self, Deserializer};
use serde::Deserialize;

use super::units::Duration;
use crate::proto::topic;

/// `[mqttsn]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSn {
    /// The id in ADVERTISE and GWINFO.
    pub gateway_id: u8,
    pub predefined: Vec<PredefinedTopic>,
    /// Sources that may publish at QoS -1; empty disables QoS -1.
    pub qos_minus_one_from: Vec<Network>,
    pub retry: Retry,
    pub advertise: Option<Advertise>,
    pub max_clients: NonZeroUsize,
}

impl Default for MqttSn {
    fn default() -> Self {
        MqttSn {
            gateway_id: 1,
            predefined: Vec::new(),
            qos_minus_one_from: Vec::new(),
            retry: Retry::default(),
            advertise: None,
            max_clients: NonZeroUsize::new(1000).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// One entry of `predefined`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PredefinedTopic {
    pub id: u16,
    pub topic: String,
    /// Only this client id may use it; absent means every client (and QoS -1).
    pub client: Option<String>,
}

/// `retry`: T_retry and N_retry [6.13].
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    pub interval: Duration,
    pub count: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Retry {
            interval: Duration(std::time::Duration::from_secs(10)),
            count: 3,
        }
    }
}

/// `advertise`: where and how often ADVERTISE goes.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Advertise {
    pub address: SocketAddr,
    pub interval: Duration,
}

/// An IP network, "192.168.7.0/24", or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Network {
    pub fn parse(s: &str) -> Result<Network, String> {
        let (a, p) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = a
            .trim()
            .parse()
            .map_err(|_| format!("`{s}` is not an IP address or network"))?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match p {
            None => max,
            Some(p) => p
                .trim()
                .parse::<u8>()
                .ok()
                .filter(|&p| p <= max)
                .ok_or_else(|| format!("`{s}`: prefix length must be 0 to {max}"))?,
        };
        Ok(Network { addr, prefix })
    }

    /// Whether `ip` is inside. An IPv4 address seen as IPv6 (`::ffff:a.b.c.d`) counts as IPv4.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - self.prefix as u32).unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX.checked_shl(128 - self.prefix as u32).unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

impl<'de> Deserialize<'de> for Network {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Network::parse(&s).map_err(de::Error::custom)
    }
}

impl MqttSn {
    /// The first thing wrong, as (key, message).
    pub(super) fn problems(&self) -> Option<(KeyPath, String)> {
        for (i, p) in self.predefined.iter().enumerate() {
            if p.id == 0 || p.id == 0xFFFF {
                return Some((
                    vec![Step::Key("predefined"), Step::At(i), Step::Key("id")],
                    format!("id {} is reserved", p.id),
                ));
            }
            if let Err(e) = topic::validate_name(&p.topic) {
                return Some((
                    vec![Step::Key("predefined"), Step::At(i), Step::Key("topic")],
                    format!("topic `{}`: {e}", p.topic),
                ));
            }
            let clash = self.predefined[..i]
                .iter()
                .any(|q| q.id == p.id && q.client == p.client);
            if clash {
                return Some((
                    vec![Step::Key("predefined"), Step::At(i), Step::Key("id")],
                    format!("id {} is defined twice", p.id),
                ));
            }
        }
        if self.retry.interval.0.is_zero() {
            return Some((
                vec![Step::Key("retry")],
                "interval must be more than 0s".into(),
            ));
        }
        if let Some(a) = &self.advertise {
            let s = a.interval.0.as_secs();
            if s == 0 || s > u16::MAX as u64 {
                return Some((
                    vec![Step::Key("advertise")],
                    "interval must be from 1s to 65535s (ADVERTISE carries it in seconds)".into(),
                ));
            }
        }
        None
    }

    /// Whether `ip` may publish at QoS -1.
    pub fn minus_one_allowed(&self, ip: IpAddr) -> bool {
        self.qos_minus_one_from.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn networks() {
        let n = Network::parse("192.168.7.0/24").unwrap();
        assert!(n.contains("192.168.7.200".parse().unwrap()));
        assert!(!n.contains("192.168.8.1".parse().unwrap()));
        assert!(n.contains("::ffff:192.168.7.9".parse().unwrap()));
        let all = Network::parse("0.0.0.0/0").unwrap();
        assert!(all.contains("8.8.8.8".parse().unwrap()));
        let one = Network::parse("10.0.0.1").unwrap();
        assert!(one.contains("10.0.0.1".parse().unwrap()));
        assert!(!one.contains("10.0.0.2".parse().unwrap()));
        let v6 = Network::parse("fd00::/8").unwrap();
        assert!(v6.contains("fd12::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(Network::parse("10.0.0.0/33").is_err());
        assert!(Network::parse("example.com").is_err());
    }
}
