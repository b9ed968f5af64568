//! The hub's in-process clients: serial ports and GPIO pins speak to the hub as MQTT 5 sessions
//! of their own, on the far side of a link like any TCP connection. That way their QoS 1/2
//! publishes go through the same commit gate (acknowledged only once durable) and their
//! subscriptions (write topics, output set topics) through the same tree and flow control.
//!
//! `LocalClient` is that session's client side, sans-IO: it makes the CONNECT and SUBSCRIBE,
//! numbers publishes, keeps at most `window` QoS 1/2 publishes unacknowledged, and resends one
//! the hub refused (store full under `block`) after a pause instead of dropping it. Its owner
//! stops producing while `can_publish` is false: that is how a full store slows a serial
//! reader rather than losing frames.
//!
//! Client ids start with `$outpost/`; the hub refuses that prefix from the network, so no
//! device can take over a port's session.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::{ConnId, HubInput};
use crate::proto::mqtt::{
    Ack, Connect, Packet, Props, Publish, QoS, SubOptions, Subscribe, Version,
};

/// The first connection id of in-process clients; MQTT connections count up from 1 and the
/// MQTT-SN gateways start at 1 << 62.
pub const LOCAL_CONN_BASE: ConnId = 1 << 61;

/// Whether `conn` is an in-process client.
pub fn is_local(conn: ConnId) -> bool {
    (LOCAL_CONN_BASE..crate::proto::mqttsn::gateway::SN_CONN_BASE).contains(&conn)
}

/// The client id prefix only in-process clients may use.
pub const LOCAL_ID_PREFIX: &str = "$outpost/";

/// How long a publish the hub refused waits before it is offered again.
pub const REFUSED_RETRY: Duration = Duration::from_secs(1);

/// What the owner must act on.
#[derive(Debug, PartialEq)]
pub enum Event {
    /// CONNACK and SUBACK are in: publishes may flow.
    Up,
    /// A message on one of our subscriptions. Call `delivered` once it has been acted on.
    Message(Publish),
    /// A publish is acknowledged (committed): the window has room again.
    Acked,
    /// The hub refused a publish (reason code); it will be offered again.
    Refused(u8),
    /// The hub refused the CONNECT or SUBSCRIBE (reason code): a configuration error.
    Failed(u8),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Subscribing,
    Up,
}

#[derive(Debug)]
struct Inflight {
    publish: Publish,
    /// PUBREC is in; PUBCOMP is awaited.
    released: bool,
    /// Refused: offer again at this instant.
    retry_at: Option<Instant>,
    /// Publication order, which retries keep (packet ids wrap).
    seq: u64,
}

/// One in-process session's client side.
#[derive(Debug)]
pub struct LocalClient {
    conn: ConnId,
    client_id: String,
    subs: Vec<(String, QoS)>,
    window: usize,
    /// Whether retained messages are delivered on subscribe.
    replay_retained: bool,
    state: State,
    next_id: u16,
    next_seq: u64,
    inflight: BTreeMap<u16, Inflight>,
    to_hub: VecDeque<HubInput>,
    events: VecDeque<Event>,
}

impl LocalClient {
    /// A client named `$outpost/<name>` that will subscribe to `subs` and keep up to `window`
    /// QoS 1/2 publishes unacknowledged. `receive` is how many QoS 1/2 deliveries the hub may
    /// have outstanding towards it.
    pub fn new(
        conn: ConnId,
        name: &str,
        subs: Vec<(String, QoS)>,
        window: usize,
        receive: u16,
    ) -> Self {
        let client_id = format!("{LOCAL_ID_PREFIX}{name}");
        let mut props = Props::default();
        props.receive_maximum = Some(receive.max(1));
        let connect = Connect {
            version: Version::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: client_id.clone(),
            will: None,
            username: None,
            password: None,
            properties: props,
        };
        let mut to_hub = VecDeque::new();
        to_hub.push_back(HubInput::Connect {
            conn,
            connect: Box::new(connect),
            keep_alive: 0,
        });
        LocalClient {
            conn,
            client_id,
            subs,
            window: window.clamp(1, u16::MAX as usize - 1),
            replay_retained: false,
            state: State::Connecting,
            next_id: 0,
            next_seq: 0,
            inflight: BTreeMap::new(),
            to_hub,
            events: VecDeque::new(),
        }
    }

    /// Has retained messages delivered on subscribe, as any MQTT client gets them (off by
    /// default: a retained command must not move an output at start).
    pub fn replay_retained(mut self) -> Self {
        self.replay_retained = true;
        self
    }

    pub fn conn(&self) -> ConnId {
        self.conn
    }

    pub fn client_id(&self) -> &str {
        &self.client_id
    }

    pub fn is_up(&self) -> bool {
        self.state == State::Up
    }

    /// Whether a QoS 1/2 publish would be taken now. Not while a refused one waits for its
    /// retry: a newer message must not overtake it.
    pub fn can_publish(&self) -> bool {
        self.is_up()
            && self.inflight.len() < self.window
            && self.inflight.values().all(|f| f.retry_at.is_none())
    }

    /// QoS 1/2 publishes not yet acknowledged.
    pub fn unacked(&self) -> usize {
        self.inflight.len()
    }

    /// Publishes. QoS 0 is always taken (the hub's bounded input channel paces it); QoS 1/2
    /// only while `can_publish`, else it comes back.
    pub fn publish(
        &mut self,
        topic: String,
        payload: Bytes,
        qos: QoS,
        retain: bool,
    ) -> Result<(), Bytes> {
        if !self.is_up() || (qos != QoS::AtMostOnce && !self.can_publish()) {
            return Err(payload);
        }
        let mut p = Publish {
            dup: false,
            qos,
            retain,
            topic,
            packet_id: 0,
            payload,
            properties: Props::default(),
        };
        if qos != QoS::AtMostOnce {
            p.packet_id = self.alloc_id();
            self.next_seq += 1;
            self.inflight.insert(
                p.packet_id,
                Inflight {
                    publish: p.clone(),
                    released: false,
                    retry_at: None,
                    seq: self.next_seq,
                },
            );
        }
        self.packet(Packet::Publish(p));
        Ok(())
    }

    /// The owner acted on a delivered message: acknowledge it.
    pub fn delivered(&mut self, packet_id: u16, qos: QoS) {
        let ack = Ack {
            packet_id,
            ..Ack::default()
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.packet(Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.packet(Packet::PubRec(ack)),
        }
    }

    /// A packet the hub sent us.
    pub fn handle(&mut self, now: Instant, packet: Packet) {
        match packet {
            Packet::ConnAck(a) if self.state == State::Connecting => {
                if a.code >= 0x80 {
                    self.events.push_back(Event::Failed(a.code));
                } else if self.subs.is_empty() {
                    self.up();
                } else {
                    self.state = State::Subscribing;
                    let filters = self
                        .subs
                        .iter()
                        .map(|(f, qos)| {
                            let opts = SubOptions {
                                qos: *qos,
                                // Our own state reports must not come back as commands.
                                no_local: true,
                                // A retained command is not replayed when we start: outputs
                                // begin at their configured level, ports write nothing.
                                retain_handling: if self.replay_retained { 0 } else { 2 },
                                ..SubOptions::default()
                            };
                            (f.clone(), opts)
                        })
                        .collect();
                    self.packet(Packet::Subscribe(Subscribe {
                        packet_id: 1,
                        filters,
                        properties: Props::default(),
                    }));
                }
            }
            Packet::SubAck(a) if self.state == State::Subscribing => {
                match a.codes.iter().find(|c| **c >= 0x80) {
                    Some(c) => self.events.push_back(Event::Failed(*c)),
                    None => self.up(),
                }
            }
            Packet::PubAck(a) | Packet::PubComp(a) => self.acked(now, a),
            Packet::PubRec(a) => {
                if a.reason >= 0x80 {
                    return self.acked(now, a);
                }
                if let Some(f) = self.inflight.get_mut(&a.packet_id) {
                    f.released = true;
                    self.packet(Packet::PubRel(Ack {
                        packet_id: a.packet_id,
                        ..Ack::default()
                    }));
                }
            }
            Packet::PubRel(a) => self.packet(Packet::PubComp(Ack {
                packet_id: a.packet_id,
                ..Ack::default()
            })),
            Packet::Publish(p) => self.events.push_back(Event::Message(p)),
            // PINGRESP, UNSUBACK, DISCONNECT (the link's Close says the rest): nothing to do.
            _ => {}
        }
    }

    fn up(&mut self) {
        self.state = State::Up;
        self.events.push_back(Event::Up);
    }

    fn acked(&mut self, now: Instant, a: Ack) {
        let Some(f) = self.inflight.get_mut(&a.packet_id) else {
            return;
        };
        if a.reason < 0x80 {
            self.inflight.remove(&a.packet_id);
            // The owner may be waiting for room to read its device again.
            self.events.push_back(Event::Acked);
            return;
        }
        // Refused (quota exceeded: the store is full under `block`, or failing). The hub has
        // forgotten the id; the message waits here and is offered again.
        f.released = false;
        f.retry_at = Some(now + REFUSED_RETRY);
        self.events.push_back(Event::Refused(a.reason));
    }

    /// When `handle_timeout` should next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.inflight.values().filter_map(|f| f.retry_at).min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let mut due: Vec<(u64, u16)> = self
            .inflight
            .iter()
            .filter(|(_, f)| f.retry_at.is_some_and(|t| t <= now))
            .map(|(id, f)| (f.seq, *id))
            .collect();
        due.sort_unstable();
        for (_, id) in due {
            if let Some(f) = self.inflight.get_mut(&id) {
                f.retry_at = None;
                let p = f.publish.clone();
                self.packet(Packet::Publish(p));
            }
        }
    }

    /// Whether `poll_input` has something.
    pub fn has_input(&self) -> bool {
        !self.to_hub.is_empty()
    }

    /// The next input for the hub.
    pub fn poll_input(&mut self) -> Option<HubInput> {
        self.to_hub.pop_front()
    }

    /// The next event for the owner.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Tells the hub the link has room again (after it was refused a send).
    pub fn ready(&mut self) {
        self.to_hub.push_back(HubInput::Ready { conn: self.conn });
    }

    fn packet(&mut self, packet: Packet) {
        self.to_hub.push_back(HubInput::Packet {
            conn: self.conn,
            packet,
        });
    }

    fn alloc_id(&mut self) -> u16 {
        // The window is below 65535, so a free id is always found.
        loop {
            self.next_id = self.next_id.wrapping_add(1).max(1);
            if !self.inflight.contains_key(&self.next_id) {
                return self.next_id;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mqtt::reason;

    #[test]
    fn a_refused_publish_is_offered_again() {
        let now = Instant::now();
        let mut c = LocalClient::new(LOCAL_CONN_BASE, "x", vec![], 1, 1);
        c.handle(now, Packet::ConnAck(Default::default()));
        assert_eq!(c.poll_event(), Some(Event::Up));
        c.publish(
            "t".into(),
            Bytes::from_static(b"v"),
            QoS::AtLeastOnce,
            false,
        )
        .unwrap();
        let _connect = c.poll_input();
        let Some(HubInput::Packet {
            packet: Packet::Publish(p),
            ..
        }) = c.poll_input()
        else {
            panic!()
        };
        c.handle(
            now,
            Packet::PubAck(Ack {
                packet_id: p.packet_id,
                reason: reason::QUOTA_EXCEEDED,
                ..Ack::default()
            }),
        );
        assert_eq!(c.poll_event(), Some(Event::Refused(reason::QUOTA_EXCEEDED)));
        assert!(!c.can_publish(), "a refused message still holds its place");
        assert_eq!(c.poll_timeout(), Some(now + REFUSED_RETRY));
        c.handle_timeout(now + REFUSED_RETRY);
        let Some(HubInput::Packet {
            packet: Packet::Publish(again),
            ..
        }) = c.poll_input()
        else {
            panic!()
        };
        assert_eq!(again, p);
        c.handle(
            now,
            Packet::PubAck(Ack {
                packet_id: p.packet_id,
                ..Ack::default()
            }),
        );
        assert!(c.can_publish());
    }
}
