//! `mount_point`: a listener's topic prefix, as in mosquitto. Every topic a client of that
//! listener names (PUBLISH, SUBSCRIBE, UNSUBSCRIBE, its will) gets the prefix in front, and
//! every PUBLISH sent to it has the prefix taken off, so the client lives in its own subtree
//! and the hub never knows. A shared subscription keeps its `$share/<group>/` in front: the
//! prefix goes on the filter inside it.

use super::packet::{Connect, Packet};

/// One listener's prefix, written literally: "site1/" puts `a/b` at `site1/a/b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountPoint(String);

impl MountPoint {
    pub fn new(prefix: impl Into<String>) -> Self {
        MountPoint(prefix.into())
    }

    /// A CONNECT from the client: its will topic.
    pub fn connect(&self, c: &mut Connect) {
        if let Some(w) = &mut c.will {
            w.topic = self.topic(&w.topic);
        }
    }

    /// A packet from the client, before the hub sees it.
    pub fn inbound(&self, p: &mut Packet) {
        match p {
            Packet::Publish(p) => p.topic = self.topic(&p.topic),
            Packet::Subscribe(s) => {
                for (f, _) in &mut s.filters {
                    *f = self.filter(f);
                }
            }
            Packet::Unsubscribe(u) => {
                for f in &mut u.filters {
                    *f = self.filter(f);
                }
            }
            Packet::Connect(c) => self.connect(c),
            _ => {}
        }
    }

    /// A packet to the client, before it is encoded. A topic outside the mount point cannot
    /// reach here (every subscription was prefixed), and would be passed on unchanged.
    pub fn outbound(&self, p: &mut Packet) {
        if let Packet::Publish(p) = p {
            if let Some(rest) = p.topic.strip_prefix(self.0.as_str()) {
                p.topic = rest.to_owned();
            }
        }
    }

    fn topic(&self, t: &str) -> String {
        format!("{}{t}", self.0)
    }

    fn filter(&self, f: &str) -> String {
        if let Some(rest) = f.strip_prefix("$share/") {
            if let Some((group, inner)) = rest.split_once('/') {
                return format!("$share/{group}/{}{inner}", self.0);
            }
        }
        self.topic(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mqtt::{Publish, QoS, SubOptions, Subscribe, Unsubscribe, Version, Will};

    fn publish(topic: &str) -> Packet {
        Packet::Publish(Publish {
            topic: topic.into(),
            qos: QoS::AtLeastOnce,
            packet_id: 1,
            ..Publish::default()
        })
    }

    #[test]
    fn prefixes_what_comes_in_and_strips_what_goes_out() {
        let m = MountPoint::new("site1/");
        let mut p = publish("a/b");
        m.inbound(&mut p);
        assert_eq!(p, publish("site1/a/b"));
        m.outbound(&mut p);
        assert_eq!(p, publish("a/b"));

        let mut s = Packet::Subscribe(Subscribe {
            packet_id: 2,
            filters: vec![
                ("a/#".into(), SubOptions::default()),
                ("$share/g/t/+".into(), SubOptions::default()),
                ("#".into(), SubOptions::default()),
            ],
            ..Subscribe::default()
        });
        m.inbound(&mut s);
        let Packet::Subscribe(s) = s else { panic!() };
        let filters: Vec<&str> = s.filters.iter().map(|(f, _)| f.as_str()).collect();
        assert_eq!(filters, ["site1/a/#", "$share/g/site1/t/+", "site1/#"]);

        let mut u = Packet::Unsubscribe(Unsubscribe {
            packet_id: 3,
            filters: vec!["$share/g/t/+".into(), "x".into()],
            ..Unsubscribe::default()
        });
        m.inbound(&mut u);
        let Packet::Unsubscribe(u) = u else { panic!() };
        assert_eq!(u.filters, ["$share/g/site1/t/+", "site1/x"]);
    }

    #[test]
    fn will_topic_is_mounted() {
        let m = MountPoint::new("p/");
        let mut c = Connect {
            version: Version::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: "c".into(),
            will: Some(Will {
                topic: "gone".into(),
                payload: Default::default(),
                qos: QoS::AtMostOnce,
                retain: false,
                properties: Default::default(),
            }),
            username: None,
            password: None,
            properties: Default::default(),
        };
        m.connect(&mut c);
        assert_eq!(c.will.map(|w| w.topic), Some("p/gone".to_owned()));
    }

    #[test]
    fn foreign_topics_pass_unchanged() {
        let m = MountPoint::new("site1/");
        let mut p = publish("other/x");
        m.outbound(&mut p);
        assert_eq!(p, publish("other/x"));
        let mut ack = Packet::PingResp;
        m.outbound(&mut ack);
        assert_eq!(ack, Packet::PingResp);
    }
}
