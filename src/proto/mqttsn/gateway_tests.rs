//! The gateway machine wired to a real (in-memory) hub, in simulated time. Addresses are plain
//! numbers; a local MQTT client sits on the hub as connection 1, so every procedure is checked
//! from both ends: the datagrams a sensor would see, and the messages an MQTT subscriber gets.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::hub::{Hub, HubConfig, Outlet};
use crate::proto::mqtt::{Connect, Packet, Props, Publish, QoS, SubOptions, Subscribe, Version};

const MQTT: ConnId = 1;
/// What an adapter's link holds per client.
const LINK: usize = 4;

#[derive(Default)]
struct Links {
    queues: HashMap<ConnId, VecDeque<Packet>>,
    want_ready: HashSet<ConnId>,
    closing: HashSet<ConnId>,
    /// Everything the hub sent the local MQTT client.
    mqtt: Vec<Packet>,
}

impl Outlet for Links {
    fn try_send(&mut self, conn: ConnId, p: Packet) -> Result<(), Packet> {
        if conn == MQTT {
            self.mqtt.push(p);
            return Ok(());
        }
        let Some(q) = self.queues.get_mut(&conn) else {
            return Ok(());
        };
        if q.len() >= LINK {
            self.want_ready.insert(conn);
            return Err(p);
        }
        q.push_back(p);
        Ok(())
    }
    fn close(&mut self, conn: ConnId, last: Option<Packet>) {
        if let (Some(q), Some(p)) = (self.queues.get_mut(&conn), last) {
            q.push_back(p);
        }
        self.closing.insert(conn);
    }
}

struct Rig {
    gw: Gateway<u32>,
    hub: Hub,
    links: Links,
    now: Instant,
    /// Datagrams sent, by address, decoded.
    sent: HashMap<u32, VecDeque<Message>>,
    broadcasts: Vec<Message>,
}

fn cfg() -> GatewayConfig {
    GatewayConfig {
        predefined: vec![
            Predefined {
                id: 0x0102,
                topic: "sensors/soil/moisture".into(),
                client: None,
            },
            Predefined {
                id: 7,
                topic: "only/for/a".into(),
                client: Some("a".into()),
            },
        ],
        retry_interval: Duration::from_secs(10),
        retry_count: 3,
        ..GatewayConfig::default()
    }
}

fn rig() -> Rig {
    rig_with(cfg())
}

fn rig_with(c: GatewayConfig) -> Rig {
    let now = Instant::now();
    let mut r = Rig {
        gw: Gateway::new(now, c),
        hub: Hub::new(HubConfig::default()),
        links: Links::default(),
        now,
        sent: HashMap::new(),
        broadcasts: Vec::new(),
    };
    // The local MQTT client, subscribed to everything but its own messages.
    let connect = Connect {
        version: Version::V5,
        clean_start: true,
        keep_alive: 0,
        client_id: "local".into(),
        will: None,
        username: None,
        password: None,
        properties: Props::default(),
    };
    r.hub_input(HubInput::Connect {
        conn: MQTT,
        connect: Box::new(connect),
        keep_alive: 0,
    });
    r.hub_input(HubInput::Packet {
        conn: MQTT,
        packet: Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                "#".into(),
                SubOptions {
                    qos: QoS::ExactlyOnce,
                    no_local: true,
                    ..SubOptions::default()
                },
            )],
            properties: Props::default(),
        }),
    });
    r.links.mqtt.clear();
    r
}

fn flags(qos: SnQos) -> Flags {
    Flags {
        qos,
        ..Flags::default()
    }
}

fn connect(id: &str, will: bool, clean: bool, keep_alive: u16) -> Message {
    Message::Connect {
        flags: Flags {
            will,
            clean_session: clean,
            ..Flags::default()
        },
        duration: keep_alive,
        client_id: id.into(),
    }
}

fn publish(topic: TopicRef, qos: SnQos, msg_id: u16, data: &'static [u8]) -> Message {
    let topic_id_type = match topic {
        TopicRef::Predefined(_) => 1,
        TopicRef::Short(_) => 2,
        _ => 0,
    };
    Message::Publish {
        flags: Flags {
            qos,
            topic_id_type,
            ..Flags::default()
        },
        topic,
        msg_id,
        data: Bytes::from_static(data),
    }
}

impl Rig {
    fn hub_input(&mut self, i: HubInput) {
        self.hub.handle(self.now, i, &mut self.links);
        self.settle();
    }

    /// Runs every output to completion, as the adapter does.
    fn settle(&mut self) {
        for _ in 0..10_000 {
            let mut busy = false;
            while let Some(o) = self.gw.poll_output() {
                busy = true;
                match o {
                    Output::Send { to, data } => {
                        let m = match codec::decode(&data) {
                            Ok(m) => m,
                            Err(e) => panic!("gateway sent an undecodable datagram: {e}"),
                        };
                        self.sent.entry(to).or_default().push_back(m);
                    }
                    Output::Broadcast(data) => {
                        if let Ok(m) = codec::decode(&data) {
                            self.broadcasts.push(m);
                        }
                    }
                    Output::Attach(conn) => {
                        self.links.queues.insert(conn, VecDeque::new());
                    }
                    Output::Hub(i) => {
                        let closed = match &i {
                            HubInput::Closed { conn, .. } => Some(*conn),
                            _ => None,
                        };
                        self.hub.handle(self.now, i, &mut self.links);
                        if let Some(c) = closed {
                            self.links.queues.remove(&c);
                            self.links.closing.remove(&c);
                        }
                    }
                    Output::Detach(conn) => {
                        self.links.queues.remove(&conn);
                    }
                    Output::Pull(_) => {}
                }
            }
            let conns: Vec<ConnId> = self.links.queues.keys().copied().collect();
            for conn in conns {
                while self.gw.wants(conn) {
                    let Some(p) = self.links.queues.get_mut(&conn).and_then(|q| q.pop_front())
                    else {
                        break;
                    };
                    busy = true;
                    self.gw.handle_hub(self.now, conn, p);
                }
                if self.links.closing.remove(&conn) {
                    busy = true;
                    self.gw.hub_closed(conn);
                }
                let room = self.links.queues.get(&conn).is_some_and(|q| q.len() < LINK);
                if room && self.links.want_ready.remove(&conn) {
                    busy = true;
                    self.hub
                        .handle(self.now, HubInput::Ready { conn }, &mut self.links);
                }
            }
            if !busy {
                return;
            }
        }
        panic!("rig did not settle");
    }

    fn dgram(&mut self, from: u32, m: Message) {
        let mut data = Vec::new();
        codec::encode(&m, &mut data).unwrap();
        self.gw.handle_datagram(self.now, from, &data, from >= 100);
        self.settle();
    }

    fn raw(&mut self, from: u32, data: &[u8]) {
        self.gw.handle_datagram(self.now, from, data, false);
        self.settle();
    }

    /// Moves time on, firing every timer due on the way, one second at a time.
    fn advance(&mut self, d: Duration) {
        let end = self.now + d;
        while self.now < end {
            self.now = (self.now + Duration::from_secs(1)).min(end);
            if self.gw.poll_timeout().is_some_and(|t| t <= self.now) {
                self.gw.handle_timeout(self.now);
            }
            if self.hub.poll_timeout().is_some_and(|t| t <= self.now) {
                self.hub.handle_timeout(self.now, &mut self.links);
            }
            self.settle();
        }
    }

    fn take(&mut self, addr: u32) -> Vec<Message> {
        self.sent.remove(&addr).map(Vec::from).unwrap_or_default()
    }

    fn one(&mut self, addr: u32) -> Message {
        let got = self.take(addr);
        assert_eq!(got.len(), 1, "expected one datagram to {addr}, got {got:?}");
        got.into_iter().next().unwrap_or(Message::PingResp)
    }

    /// Publishes the local MQTT client made reach, as (topic, payload, qos).
    fn mqtt_got(&mut self) -> Vec<(String, Vec<u8>, QoS)> {
        let mut got = Vec::new();
        for p in std::mem::take(&mut self.links.mqtt) {
            match p {
                Packet::Publish(p) => {
                    if p.qos != QoS::AtMostOnce {
                        let ack = Ack {
                            packet_id: p.packet_id,
                            ..Ack::default()
                        };
                        let packet = if p.qos == QoS::AtLeastOnce {
                            Packet::PubAck(ack)
                        } else {
                            Packet::PubRec(ack)
                        };
                        self.hub.handle(
                            self.now,
                            HubInput::Packet { conn: MQTT, packet },
                            &mut self.links,
                        );
                    }
                    got.push((p.topic, p.payload.to_vec(), p.qos));
                }
                Packet::PubRel(a) => {
                    let packet = Packet::PubComp(a);
                    self.hub.handle(
                        self.now,
                        HubInput::Packet { conn: MQTT, packet },
                        &mut self.links,
                    );
                }
                _ => {}
            }
        }
        self.settle();
        got
    }

    /// The local MQTT client publishes.
    fn mqtt_publish(&mut self, topic: &str, payload: &str, qos: QoS, pid: u16) {
        let p = Publish {
            qos,
            topic: topic.into(),
            packet_id: pid,
            payload: Bytes::copy_from_slice(payload.as_bytes()),
            ..Publish::default()
        };
        self.hub_input(HubInput::Packet {
            conn: MQTT,
            packet: Packet::Publish(p),
        });
        self.links.mqtt.retain(|p| {
            !matches!(
                p,
                Packet::PubAck(_) | Packet::PubRec(_) | Packet::PubComp(_)
            )
        });
    }

    fn connected(&mut self, addr: u32, id: &str, clean: bool, keep_alive: u16) {
        self.dgram(addr, connect(id, false, clean, keep_alive));
        assert_eq!(self.one(addr), Message::ConnAck { rc: rc::ACCEPTED });
    }

    fn register(&mut self, addr: u32, topic: &str, msg_id: u16) -> u16 {
        self.dgram(
            addr,
            Message::Register {
                topic_id: 0,
                msg_id,
                topic: topic.into(),
            },
        );
        match self.one(addr) {
            Message::RegAck {
                topic_id,
                msg_id: m,
                rc: rc::ACCEPTED,
            } if m == msg_id && topic_id != 0 => topic_id,
            other => panic!("expected REGACK, got {other:?}"),
        }
    }

    fn subscribe(&mut self, addr: u32, topic: TopicRef, qos: SnQos, msg_id: u16) -> Message {
        let topic_id_type = match topic {
            TopicRef::Predefined(_) => 1,
            TopicRef::Short(_) => 2,
            _ => 0,
        };
        self.dgram(
            addr,
            Message::Subscribe {
                flags: Flags {
                    qos,
                    topic_id_type,
                    ..Flags::default()
                },
                msg_id,
                topic,
            },
        );
        self.one(addr)
    }
}

#[test]
fn connect_publish_qos1_puback_carries_topic_id() {
    let mut r = rig();
    r.connected(10, "a", true, 60);
    let id = r.register(10, "site/temp", 1);
    r.dgram(10, publish(TopicRef::Id(id), SnQos::One, 2, b"21.5"));
    assert_eq!(
        r.one(10),
        Message::PubAck {
            topic_id: id.to_be_bytes(),
            msg_id: 2,
            rc: rc::ACCEPTED
        }
    );
    assert_eq!(
        r.mqtt_got(),
        vec![("site/temp".into(), b"21.5".to_vec(), QoS::AtLeastOnce)]
    );
    // An id nobody registered.
    r.dgram(10, publish(TopicRef::Id(999), SnQos::One, 3, b"x"));
    assert_eq!(
        r.one(10),
        Message::PubAck {
            topic_id: 999u16.to_be_bytes(),
            msg_id: 3,
            rc: rc::INVALID_TOPIC_ID
        }
    );
    assert!(r.mqtt_got().is_empty());
}

#[test]
fn short_and_predefined_topics_and_puback_byte_order() {
    let mut r = rig();
    r.connected(10, "a", true, 60);
    r.dgram(10, publish(TopicRef::Short(*b"ab"), SnQos::One, 1, b"s"));
    assert_eq!(
        r.one(10),
        Message::PubAck {
            topic_id: *b"ab",
            msg_id: 1,
            rc: rc::ACCEPTED
        }
    );
    r.dgram(
        10,
        publish(TopicRef::Predefined(0x0102), SnQos::One, 2, b"p"),
    );
    assert_eq!(
        r.one(10),
        Message::PubAck {
            topic_id: [0x01, 0x02],
            msg_id: 2,
            rc: rc::ACCEPTED
        }
    );
    // Client "a"'s own predefined id.
    r.dgram(10, publish(TopicRef::Predefined(7), SnQos::Zero, 0, b"own"));
    assert_eq!(
        r.mqtt_got(),
        vec![
            ("ab".into(), b"s".to_vec(), QoS::AtLeastOnce),
            (
                "sensors/soil/moisture".into(),
                b"p".to_vec(),
                QoS::AtLeastOnce
            ),
            ("only/for/a".into(), b"own".to_vec(), QoS::AtMostOnce),
        ]
    );
    // Another client may not use "a"'s predefined id.
    r.connected(11, "b", true, 60);
    r.dgram(11, publish(TopicRef::Predefined(7), SnQos::One, 3, b"x"));
    assert!(matches!(
        r.one(11),
        Message::PubAck {
            rc: rc::INVALID_TOPIC_ID,
            ..
        }
    ));
}

#[test]
fn will_flow_at_connect_and_published_on_keepalive_loss() {
    let mut r = rig();
    r.dgram(10, connect("a", true, true, 10));
    assert_eq!(r.one(10), Message::WillTopicReq);
    r.dgram(
        10,
        Message::WillTopic(Some((flags(SnQos::One), "site/a/status".into()))),
    );
    assert_eq!(r.one(10), Message::WillMsgReq);
    r.dgram(10, Message::WillMsg(Bytes::from_static(b"gone")));
    assert_eq!(r.one(10), Message::ConnAck { rc: rc::ACCEPTED });
    // Alive within 1.5 x keep-alive: nothing.
    r.advance(Duration::from_secs(14));
    assert!(r.mqtt_got().is_empty());
    r.advance(Duration::from_secs(2));
    assert_eq!(
        r.mqtt_got(),
        vec![("site/a/status".into(), b"gone".to_vec(), QoS::AtLeastOnce)]
    );
    assert_eq!(r.gw.clients(), 0);
    assert_eq!(r.hub.connected(), 1, "only the local MQTT client is left");
}

#[test]
fn empty_willtopic_at_connect_means_no_will() {
    let mut r = rig();
    r.dgram(10, connect("a", true, true, 10));
    assert_eq!(r.one(10), Message::WillTopicReq);
    r.dgram(10, Message::WillTopic(None));
    assert_eq!(r.one(10), Message::ConnAck { rc: rc::ACCEPTED });
    r.advance(Duration::from_secs(20));
    assert!(r.mqtt_got().is_empty());
}

#[test]
fn will_updates_replace_and_delete_the_will() {
    let mut r = rig();
    r.dgram(10, connect("a", true, true, 10));
    r.dgram(
        10,
        Message::WillTopic(Some((flags(SnQos::Zero), "w/old".into()))),
    );
    r.dgram(10, Message::WillMsg(Bytes::from_static(b"old")));
    r.take(10);
    r.dgram(
        10,
        Message::WillTopicUpd(Some((flags(SnQos::One), "w/new".into()))),
    );
    assert_eq!(r.one(10), Message::WillTopicResp { rc: rc::ACCEPTED });
    r.dgram(10, Message::WillMsgUpd(Bytes::from_static(b"new")));
    assert_eq!(r.one(10), Message::WillMsgResp { rc: rc::ACCEPTED });
    r.advance(Duration::from_secs(16));
    assert_eq!(
        r.mqtt_got(),
        vec![("w/new".into(), b"new".to_vec(), QoS::AtLeastOnce)]
    );

    // A client that deletes its will with an empty WILLTOPICUPD leaves nothing behind.
    r.dgram(11, connect("b", true, true, 10));
    r.dgram(
        11,
        Message::WillTopic(Some((flags(SnQos::Zero), "w/b".into()))),
    );
    r.dgram(11, Message::WillMsg(Bytes::from_static(b"b")));
    r.take(11);
    r.dgram(11, Message::WillTopicUpd(None));
    assert_eq!(r.one(11), Message::WillTopicResp { rc: rc::ACCEPTED });
    r.advance(Duration::from_secs(16));
    assert!(r.mqtt_got().is_empty());
}

#[test]
fn disconnect_without_duration_ends_without_will() {
    let mut r = rig();
    r.dgram(10, connect("a", true, true, 10));
    r.dgram(
        10,
        Message::WillTopic(Some((flags(SnQos::Zero), "w".into()))),
    );
    r.dgram(10, Message::WillMsg(Bytes::from_static(b"x")));
    r.take(10);
    r.dgram(10, Message::Disconnect { duration: None });
    assert_eq!(r.one(10), Message::Disconnect { duration: None });
    r.advance(Duration::from_secs(30));
    assert!(r.mqtt_got().is_empty());
    assert_eq!(r.gw.clients(), 0);
}

#[test]
fn qos2_inbound_duplicate_is_delivered_once() {
    let mut r = rig();
    r.connected(10, "a", true, 60);
    let id = r.register(10, "q2", 1);
    r.dgram(10, publish(TopicRef::Id(id), SnQos::Two, 5, b"once"));
    assert_eq!(r.one(10), Message::PubRec { msg_id: 5 });
    // The PUBREC was lost: the client resends with DUP.
    let mut dup = publish(TopicRef::Id(id), SnQos::Two, 5, b"once");
    if let Message::Publish { flags, .. } = &mut dup {
        flags.dup = true;
    }
    r.dgram(10, dup);
    assert_eq!(r.one(10), Message::PubRec { msg_id: 5 });
    r.dgram(10, Message::PubRel { msg_id: 5 });
    assert_eq!(r.one(10), Message::PubComp { msg_id: 5 });
    assert_eq!(
        r.mqtt_got(),
        vec![("q2".into(), b"once".to_vec(), QoS::ExactlyOnce)]
    );
}

#[test]
fn qos_minus_one_only_from_allowed_sources() {
    let mut r = rig();
    // Addresses >= 100 are on the allow list in this rig.
    r.dgram(
        100,
        publish(TopicRef::Predefined(0x0102), SnQos::MinusOne, 0, b"m1"),
    );
    r.dgram(
        101,
        publish(TopicRef::Short(*b"xy"), SnQos::MinusOne, 0, b"m2"),
    );
    r.dgram(
        5,
        publish(TopicRef::Short(*b"xy"), SnQos::MinusOne, 0, b"refused"),
    );
    // A client's own predefined id is not usable without a connection.
    r.dgram(
        100,
        publish(TopicRef::Predefined(7), SnQos::MinusOne, 0, b"refused"),
    );
    assert_eq!(
        r.mqtt_got(),
        vec![
            (
                "sensors/soil/moisture".into(),
                b"m1".to_vec(),
                QoS::AtMostOnce
            ),
            ("xy".into(), b"m2".to_vec(), QoS::AtMostOnce),
        ]
    );
    assert_eq!(r.gw.stats().refused_minus_one, 2);
    assert!(r.take(5).is_empty() && r.take(100).is_empty());
}

#[test]
fn wildcard_subscription_registers_before_each_new_topic() {
    let mut r = rig();
    r.connected(10, "a", true, 60);
    let ack = r.subscribe(10, TopicRef::Name("site/+/temp".into()), SnQos::One, 1);
    assert_eq!(
        ack,
        Message::SubAck {
            flags: flags(SnQos::One),
            topic_id: 0,
            msg_id: 1,
            rc: rc::ACCEPTED
        }
    );
    r.mqtt_publish("site/n1/temp", "20", QoS::AtLeastOnce, 1);
    let (topic_id, reg_id) = match r.one(10) {
        Message::Register {
            topic_id,
            msg_id,
            topic,
        } if topic == "site/n1/temp" => (topic_id, msg_id),
        other => panic!("expected REGISTER first, got {other:?}"),
    };
    r.dgram(
        10,
        Message::RegAck {
            topic_id,
            msg_id: reg_id,
            rc: rc::ACCEPTED,
        },
    );
    let pid = match r.one(10) {
        Message::Publish {
            topic: TopicRef::Id(t),
            msg_id,
            data,
            flags,
        } if t == topic_id && &data[..] == b"20" && flags.qos == SnQos::One => msg_id,
        other => panic!("expected PUBLISH on the registered id, got {other:?}"),
    };
    r.dgram(
        10,
        Message::PubAck {
            topic_id: topic_id.to_be_bytes(),
            msg_id: pid,
            rc: rc::ACCEPTED,
        },
    );
    // The same topic again: no second REGISTER.
    r.mqtt_publish("site/n1/temp", "21", QoS::AtMostOnce, 0);
    assert!(matches!(
        r.one(10),
        Message::Publish { topic: TopicRef::Id(t), .. } if t == topic_id
    ));
}

#[test]
fn subscribe_plain_short_and_predefined() {
    let mut r = rig();
    r.connected(10, "a", true, 60);
    let Message::SubAck {
        topic_id,
        rc: rc::ACCEPTED,
        ..
    } = r.subscribe(10, TopicRef::Name("plain/topic".into()), SnQos::Zero, 1)
    else {
        panic!("SUBACK expected");
    };
    assert_ne!(topic_id, 0, "a plain name gets its id in SUBACK");
    assert!(matches!(
        r.subscribe(10, TopicRef::Short(*b"zz"), SnQos::Zero, 2),
        Message::SubAck {
            rc: rc::ACCEPTED,
            ..
        }
    ));
    assert!(matches!(
        r.subscribe(10, TopicRef::Predefined(0x0102), SnQos::Zero, 3),
        Message::SubAck {
            topic_id: 0x0102,
            rc: rc::ACCEPTED,
            ..
        }
    ));
    assert!(matches!(
        r.subscribe(10, TopicRef::Predefined(999), SnQos::Zero, 4),
        Message::SubAck {
            rc: rc::INVALID_TOPIC_ID,
            ..
        }
    ));
    r.mqtt_publish("plain/topic", "1", QoS::AtMostOnce, 0);
    r.mqtt_publish("zz", "2", QoS::AtMostOnce, 0);
    r.mqtt_publish("sensors/soil/moisture", "3", QoS::AtMostOnce, 0);
    let topics: Vec<TopicRef> = r
        .take(10)
        .into_iter()
        .filter_map(|m| match m {
            Message::Publish { topic, .. } => Some(topic),
            _ => None,
        })
        .collect();
    assert_eq!(
        topics,
        vec![
            TopicRef::Id(topic_id),
            TopicRef::Short(*b"zz"),
            TopicRef::Predefined(0x0102)
        ]
    );
    // UNSUBSCRIBE: nothing more arrives.
    r.dgram(
        10,
        Message::Unsubscribe {
            flags: Flags::default(),
            msg_id: 5,
            topic: TopicRef::Name("plain/topic".into()),
        },
    );
    assert_eq!(r.one(10), Message::UnsubAck { msg_id: 5 });
    r.mqtt_publish("plain/topic", "4", QoS::AtMostOnce, 0);
    assert!(r.take(10).is_empty());
}

#[test]
fn qos2_outbound_full_exchange() {
    let mut r = rig();
    r.connected(10, "a", true, 60);
    r.subscribe(10, TopicRef::Short(*b"q2"), SnQos::Two, 1);
    r.mqtt_publish("q2", "x", QoS::ExactlyOnce, 9);
    let pid = match r.one(10) {
        Message::Publish { msg_id, flags, .. } if flags.qos == SnQos::Two => msg_id,
        other => panic!("expected QoS 2 PUBLISH, got {other:?}"),
    };
    r.dgram(10, Message::PubRec { msg_id: pid });
    assert_eq!(r.one(10), Message::PubRel { msg_id: pid });
    r.dgram(10, Message::PubComp { msg_id: pid });
    assert!(r.take(10).is_empty());
    // The next one flows: the hub's window is free again.
    r.mqtt_publish("q2", "y", QoS::ExactlyOnce, 10);
    assert!(matches!(r.one(10), Message::Publish { .. }));
}

#[test]
fn unacknowledged_publish_is_retransmitted_then_client_lost_and_will_sent() {
    let mut r = rig();
    r.dgram(10, connect("a", true, true, 600));
    r.dgram(
        10,
        Message::WillTopic(Some((flags(SnQos::Zero), "w/a".into()))),
    );
    r.dgram(10, Message::WillMsg(Bytes::from_static(b"lost")));
    r.take(10);
    r.subscribe(10, TopicRef::Short(*b"cm"), SnQos::One, 1);
    r.mqtt_publish("cm", "go", QoS::AtLeastOnce, 1);
    let first = r.one(10);
    assert!(matches!(&first, Message::Publish { flags, .. } if !flags.dup));
    for i in 1..=3 {
        r.advance(Duration::from_secs(9));
        assert!(r.take(10).is_empty(), "not before T_retry ({i})");
        r.advance(Duration::from_secs(1));
        assert!(
            matches!(r.one(10), Message::Publish { flags, .. } if flags.dup),
            "retransmission {i} with DUP"
        );
    }
    assert!(r.mqtt_got().is_empty());
    r.advance(Duration::from_secs(10));
    assert_eq!(r.gw.clients(), 0, "lost after N_retry");
    assert_eq!(r.gw.stats().retransmitted, 3);
    assert_eq!(
        r.mqtt_got(),
        vec![("w/a".into(), b"lost".to_vec(), QoS::AtMostOnce)]
    );
}

#[test]
fn unanswered_register_is_retransmitted() {
    let mut r = rig();
    r.connected(10, "a", true, 600);
    r.subscribe(10, TopicRef::Name("r/#".into()), SnQos::Zero, 1);
    r.mqtt_publish("r/1", "x", QoS::AtMostOnce, 0);
    let Message::Register {
        msg_id, topic_id, ..
    } = r.one(10)
    else {
        panic!("REGISTER expected");
    };
    r.advance(Duration::from_secs(10));
    assert!(matches!(r.one(10), Message::Register { msg_id: m, .. } if m == msg_id));
    r.dgram(
        10,
        Message::RegAck {
            topic_id,
            msg_id,
            rc: rc::ACCEPTED,
        },
    );
    assert!(matches!(r.one(10), Message::Publish { .. }));
}

/// Drains a wake-up: answers REGISTERs and PUBLISHes until PINGRESP, returning the payloads.
fn answer_until_pingresp(r: &mut Rig, addr: u32) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    for _ in 0..100 {
        let batch = r.take(addr);
        assert!(!batch.is_empty(), "the gateway went quiet before PINGRESP");
        for m in batch {
            match m {
                Message::Register {
                    topic_id, msg_id, ..
                } => r.dgram(
                    addr,
                    Message::RegAck {
                        topic_id,
                        msg_id,
                        rc: rc::ACCEPTED,
                    },
                ),
                Message::Publish {
                    flags,
                    topic,
                    msg_id,
                    data,
                } => {
                    got.push(data.to_vec());
                    if flags.qos == SnQos::One {
                        r.dgram(
                            addr,
                            Message::PubAck {
                                topic_id: topic.id_bytes(),
                                msg_id,
                                rc: rc::ACCEPTED,
                            },
                        );
                    }
                }
                Message::PingResp => return got,
                other => panic!("unexpected {other:?} while awake"),
            }
        }
    }
    panic!("no PINGRESP");
}

#[test]
fn sleeping_client_gets_its_buffer_on_wake_then_pingresp() {
    let mut r = rig();
    r.connected(10, "s", false, 60);
    r.subscribe(10, TopicRef::Name("buf/#".into()), SnQos::One, 1);
    r.dgram(
        10,
        Message::Disconnect {
            duration: Some(120),
        },
    );
    assert_eq!(r.one(10), Message::Disconnect { duration: None });
    // While it sleeps: ten QoS 1 and five QoS 0 messages, more than the link and our queue hold.
    for i in 0..10 {
        r.mqtt_publish(
            &format!("buf/{}", i % 3),
            &format!("q1-{i}"),
            QoS::AtLeastOnce,
            i + 1,
        );
    }
    for i in 0..5 {
        r.mqtt_publish("buf/0", &format!("q0-{i}"), QoS::AtMostOnce, 0);
    }
    r.advance(Duration::from_secs(60));
    assert!(r.take(10).is_empty(), "nothing goes to a sleeping client");
    // It wakes, from a new address even.
    r.dgram(
        11,
        Message::PingReq {
            client_id: Some("s".into()),
        },
    );
    let got = answer_until_pingresp(&mut r, 11);
    let mut want: Vec<Vec<u8>> = (0..10).map(|i| format!("q1-{i}").into_bytes()).collect();
    want.extend((0..5).map(|i| format!("q0-{i}").into_bytes()));
    assert_eq!(got, want, "everything, in order, before PINGRESP");
    // Asleep again: a new message waits for the next wake.
    r.mqtt_publish("buf/1", "later", QoS::AtLeastOnce, 20);
    assert!(r.take(11).is_empty());
    r.dgram(
        11,
        Message::PingReq {
            client_id: Some("s".into()),
        },
    );
    assert_eq!(answer_until_pingresp(&mut r, 11), vec![b"later".to_vec()]);
    // An empty buffer: PINGRESP at once.
    r.dgram(
        11,
        Message::PingReq {
            client_id: Some("s".into()),
        },
    );
    assert_eq!(r.one(11), Message::PingResp);
}

#[test]
fn connect_while_asleep_delivers_the_buffer() {
    let mut r = rig();
    r.connected(10, "s", false, 60);
    r.subscribe(10, TopicRef::Short(*b"bz"), SnQos::One, 1);
    r.dgram(
        10,
        Message::Disconnect {
            duration: Some(300),
        },
    );
    r.take(10);
    r.mqtt_publish("bz", "held", QoS::AtLeastOnce, 1);
    assert!(r.take(10).is_empty());
    r.dgram(10, connect("s", false, false, 60));
    let got = r.take(10);
    assert_eq!(got[0], Message::ConnAck { rc: rc::ACCEPTED });
    assert!(matches!(&got[1], Message::Publish { data, .. } if &data[..] == b"held"));
}

#[test]
fn sleep_that_runs_out_loses_the_client_with_its_will() {
    let mut r = rig();
    r.dgram(10, connect("s", true, true, 30));
    r.dgram(
        10,
        Message::WillTopic(Some((flags(SnQos::Zero), "w/s".into()))),
    );
    r.dgram(10, Message::WillMsg(Bytes::from_static(b"slept too long")));
    r.take(10);
    r.dgram(
        10,
        Message::Disconnect {
            duration: Some(100),
        },
    );
    r.take(10);
    // The sleep duration, not the keep-alive, applies while asleep.
    r.advance(Duration::from_secs(149));
    assert!(r.mqtt_got().is_empty());
    r.advance(Duration::from_secs(2));
    assert_eq!(
        r.mqtt_got(),
        vec![("w/s".into(), b"slept too long".to_vec(), QoS::AtMostOnce)]
    );
}

#[test]
fn connect_from_a_new_address_moves_the_session() {
    let mut r = rig();
    r.connected(10, "m", false, 60);
    r.subscribe(10, TopicRef::Short(*b"mv"), SnQos::Zero, 1);
    r.connected(20, "m", false, 60);
    r.mqtt_publish("mv", "here", QoS::AtMostOnce, 0);
    assert!(r.take(10).is_empty());
    assert!(matches!(r.one(20), Message::Publish { .. }));
    assert_eq!(r.gw.clients(), 1);
    // The old address is no longer a client.
    r.dgram(10, Message::PingReq { client_id: None });
    assert!(r.take(10).is_empty());
}

#[test]
fn persistent_session_keeps_subscriptions_and_will_across_connects() {
    let mut r = rig();
    r.dgram(10, connect("p", true, false, 10));
    r.dgram(
        10,
        Message::WillTopic(Some((flags(SnQos::Zero), "w/p".into()))),
    );
    r.dgram(10, Message::WillMsg(Bytes::from_static(b"p gone")));
    r.take(10);
    r.subscribe(10, TopicRef::Short(*b"ps"), SnQos::One, 1);
    r.dgram(10, Message::Disconnect { duration: None });
    r.take(10);
    r.mqtt_publish("ps", "kept", QoS::AtLeastOnce, 1);
    // Neither clean session nor will: subscriptions, queued messages and the will are kept.
    r.dgram(10, connect("p", false, false, 10));
    let got = r.take(10);
    assert_eq!(got[0], Message::ConnAck { rc: rc::ACCEPTED });
    assert!(matches!(&got[1], Message::Publish { data, .. } if &data[..] == b"kept"));
    r.advance(Duration::from_secs(40));
    assert_eq!(
        r.mqtt_got(),
        vec![("w/p".into(), b"p gone".to_vec(), QoS::AtMostOnce)]
    );
}

#[test]
fn forwarder_encapsulation_replies_through_the_forwarder() {
    let mut r = rig();
    let node = Bytes::from_static(&[0xAA, 0xBB]);
    let wrap = |m: Message| Message::Encapsulated {
        radius: 1,
        node: node.clone(),
        inner: Box::new(m),
    };
    r.dgram(30, wrap(connect("n1", false, true, 60)));
    match r.one(30) {
        Message::Encapsulated { node: n, inner, .. } => {
            assert_eq!(n, node);
            assert_eq!(*inner, Message::ConnAck { rc: rc::ACCEPTED });
        }
        other => panic!("expected an encapsulated CONNACK, got {other:?}"),
    }
    // A second node behind the same forwarder is a different client.
    let node2 = Bytes::from_static(&[0xCC]);
    r.dgram(
        30,
        Message::Encapsulated {
            radius: 1,
            node: node2,
            inner: Box::new(connect("n2", false, true, 60)),
        },
    );
    r.take(30);
    assert_eq!(r.gw.clients(), 2);
    r.dgram(
        30,
        wrap(publish(TopicRef::Short(*b"fw"), SnQos::Zero, 0, b"via")),
    );
    assert_eq!(
        r.mqtt_got(),
        vec![("fw".into(), b"via".to_vec(), QoS::AtMostOnce)]
    );
}

#[test]
fn searchgw_gets_gwinfo_and_advertise_is_periodic() {
    let mut c = cfg();
    c.gateway_id = 9;
    c.advertise = Some(Duration::from_secs(900));
    let mut r = rig_with(c);
    r.dgram(10, Message::SearchGw { radius: 1 });
    assert_eq!(
        r.one(10),
        Message::GwInfo {
            gw_id: 9,
            address: Bytes::new()
        }
    );
    r.advance(Duration::from_secs(1802));
    assert_eq!(r.broadcasts.len(), 3, "at start, and every T_ADV");
    assert_eq!(
        r.broadcasts[0],
        Message::Advertise {
            gw_id: 9,
            duration: 900
        }
    );
}

#[test]
fn garbage_is_dropped_and_counted_and_strangers_told_to_connect() {
    let mut r = rig();
    r.raw(10, &[]);
    r.raw(10, &[5, 0x0C, 0]);
    r.raw(10, &[2, 0x03]);
    r.raw(10, &[0x01, 0x00]);
    assert_eq!(r.gw.stats().malformed, 4);
    assert!(r.take(10).is_empty());
    r.dgram(10, publish(TopicRef::Short(*b"no"), SnQos::One, 1, b"x"));
    assert_eq!(r.one(10), Message::Disconnect { duration: None });
    assert_eq!(r.gw.stats().unknown_client, 1);
}

#[test]
fn client_limit_refuses_with_congestion() {
    let mut c = cfg();
    c.max_clients = 2;
    let mut r = rig_with(c);
    r.connected(10, "a", true, 60);
    r.connected(11, "b", true, 60);
    r.dgram(12, connect("c", false, true, 60));
    assert_eq!(r.one(12), Message::ConnAck { rc: rc::CONGESTION });
}

#[test]
fn keepalive_pingreq_keeps_a_client() {
    let mut r = rig();
    r.connected(10, "a", true, 10);
    for _ in 0..5 {
        r.advance(Duration::from_secs(9));
        r.dgram(10, Message::PingReq { client_id: None });
        assert_eq!(r.one(10), Message::PingResp);
    }
    assert_eq!(r.gw.clients(), 1);
    r.advance(Duration::from_secs(16));
    assert_eq!(r.gw.clients(), 0);
    assert_eq!(r.gw.stats().lost, 1);
}

#[test]
fn takeover_by_an_mqtt_client_disconnects_the_sn_client() {
    let mut r = rig();
    r.connected(10, "dup", true, 60);
    let connect = Connect {
        version: Version::V311,
        clean_start: true,
        keep_alive: 0,
        client_id: "dup".into(),
        will: None,
        username: None,
        password: None,
        properties: Props::default(),
    };
    r.hub_input(HubInput::Connect {
        conn: 2,
        connect: Box::new(connect),
        keep_alive: 0,
    });
    assert_eq!(r.one(10), Message::Disconnect { duration: None });
    assert_eq!(r.gw.clients(), 0);
}

proptest::proptest! {
    /// Any sequence of well-formed messages and garbage, from a client and from strangers,
    /// with time passing: no panic, and the rig settles every time.
    #[test]
    fn any_message_sequence_never_panics(
        ms in proptest::collection::vec(
            (super::super::tests::message(), proptest::collection::vec(proptest::num::u8::ANY, 0..12), 0u32..3, 0u64..20),
            0..60,
        )
    ) {
        let mut r = rig();
        r.connected(10, "a", true, 30);
        r.subscribe(10, TopicRef::Name("#".into()), SnQos::Two, 1);
        for (m, garbage, from, secs) in ms {
            let addr = [10, 11, 100][from as usize];
            r.dgram(addr, m);
            r.raw(addr, &garbage);
            r.mqtt_publish("p/q", "x", QoS::AtLeastOnce, 1);
            r.advance(Duration::from_secs(secs));
        }
    }
}

#[test]
fn waking_onto_another_clients_address_ends_that_client() {
    let mut r = rig();
    r.connected(10, "s", false, 60);
    r.dgram(10, Message::Disconnect { duration: Some(60) });
    r.take(10);
    r.connected(11, "x", true, 60);
    // "s" wakes from the address "x" had: "x" is gone, "s" is served there.
    r.dgram(
        11,
        Message::PingReq {
            client_id: Some("s".into()),
        },
    );
    assert_eq!(r.one(11), Message::PingResp);
    assert_eq!(r.gw.clients(), 1);
    r.dgram(
        11,
        publish(TopicRef::Short(*b"ws"), SnQos::Zero, 0, b"from s"),
    );
    assert_eq!(
        r.mqtt_got(),
        vec![("ws".into(), b"from s".to_vec(), QoS::AtMostOnce)]
    );
}

/// Issue 18: a topic deeper than `max_topic_levels` is rejected where the sensor names it,
/// and its client id never reaches a session that a logged-in user made.
#[test]
fn deep_register_subscribe_and_will_are_rejected() {
    let mut r = rig();
    r.connected(1, "deep", true, 60);
    let deep = format!("{}x", "/".repeat(7000));
    r.dgram(
        1,
        Message::Register {
            topic_id: 0,
            msg_id: 5,
            topic: deep.clone(),
        },
    );
    assert_eq!(
        r.one(1),
        Message::RegAck {
            topic_id: 0,
            msg_id: 5,
            rc: rc::NOT_SUPPORTED
        }
    );
    let got = r.subscribe(1, TopicRef::Name(format!("{deep}/#")), SnQos::One, 6);
    assert!(
        matches!(
            got,
            Message::SubAck {
                rc: rc::NOT_SUPPORTED,
                ..
            }
        ),
        "{got:?}"
    );
    // 200 levels are fine.
    r.register(1, &vec!["l"; 200].join("/"), 7);
}

#[test]
fn a_client_id_is_not_a_user_name() {
    let mut r = rig();
    // carol logs in over MQTT with a persistent session, then goes away.
    let carol = Connect {
        version: Version::V311,
        clean_start: false,
        keep_alive: 0,
        client_id: "carol".into(),
        will: None,
        username: Some("carol".into()),
        password: None,
        properties: Props::default(),
    };
    r.hub_input(HubInput::Connect {
        conn: 77,
        connect: Box::new(carol),
        keep_alive: 0,
    });
    r.hub_input(HubInput::Closed {
        conn: 77,
        reason: CloseReason::ConnectionLost,
        notify: None,
    });
    r.dgram(2, connect("carol", false, false, 60));
    assert_eq!(
        r.one(2),
        Message::ConnAck {
            rc: rc::NOT_SUPPORTED
        }
    );
}
