//! The client side of one MQTT session, sans-IO: the upstream session the bridge drives.
//!
//! Owns what the store-and-forward contract needs from a client and generic clients lack:
//! every outbound QoS 1/2 message carries the caller's tag (its outbox row) until the broker's
//! PUBACK or PUBCOMP; PUBREC is reported so the caller can persist it; after a reconnect every
//! unacknowledged message goes again with its packet id and DUP set (or, when the broker lost
//! the session, all of them again as PUBLISH); inbound QoS 1/2 messages are acknowledged only
//! when the caller says their local effects have committed. Keep-alive doubles as dead-link
//! detection: a link that swallows packets is declared lost within 1.5x the keep-alive.
//! No socket, no clock: bytes and `Instant`s come in, bytes and events go out.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::packet::*;
use super::server::Outbound;
use super::{decode, encoded_len};

/// Identifies an outbound message to the caller: the outbox row id.
pub type Tag = i64;

/// How the session connects.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub client_id: String,
    pub version: Version,
    /// Seconds; 0 disables keep-alive (and so dead-link detection).
    pub keep_alive: u16,
    /// v5 Session Expiry Interval; 3.1.1 always uses clean session 0.
    pub session_expiry: u32,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    /// QoS 1/2 messages in flight at most (also capped by the broker's Receive Maximum).
    pub max_inflight: u16,
    /// Largest packet we accept from the broker.
    pub max_packet_size: u32,
    /// Topic aliases we let the broker use towards us (v5).
    pub topic_alias_maximum: u16,
}

/// How far an outbound QoS 1/2 message has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// PUBLISH sent; PUBACK (QoS 1) or PUBREC (QoS 2) awaited.
    Sent,
    /// PUBREC received; the caller is persisting that. No PUBREL goes until it says so
    /// (`release`): a PUBREL sent before the state is on disk could be followed, after a
    /// crash, by the PUBLISH again, which the broker would take for a new message.
    Releasing,
    /// PUBREC persisted and PUBREL sent; PUBCOMP awaited. After a restart the PUBREL goes
    /// again, never the PUBLISH.
    Released,
}

/// The packet id of outbox row `tag`. Derived, not allocated, so the id a QoS 2 message was
/// sent with survives a crash without a write before every send: the resend after a restart
/// names the same id, and the broker recognises it.
pub fn packet_id_for(tag: Tag) -> u16 {
    (tag.rem_euclid(65_535) + 1) as u16
}

/// What the session tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// CONNACK accepted the connection.
    Connected { session_present: bool },
    /// CONNACK refused it; the driver closes the connection and backs off.
    Refused { code: u8 },
    /// PUBACK or PUBCOMP: the broker owns the message; its row may go.
    Delivered { tag: Tag, reason: u8 },
    /// PUBREC: persist `Stage::Released` with this packet id, then call `release`.
    Released { tag: Tag, packet_id: u16 },
    /// The broker refused or cannot take the message (v5 failure code, or larger than its
    /// Maximum Packet Size); it will never be delivered.
    Rejected { tag: Tag, reason: u8 },
    /// A message from the broker. QoS 1/2: call `ack_inbound` once its effects committed.
    Inbound(Publish),
    /// PUBREL for inbound QoS 2 `packet_id`: forget its stored id, then call
    /// `complete_inbound` (PUBCOMP frees the id for reuse, so it must be forgotten first).
    InboundReleased { packet_id: u16 },
    /// SUBACK: one code per filter of the `subscribe` call, in order.
    Subscribed { codes: Vec<u8> },
    /// The connection is dead or broke the protocol: close it; `connection_lost` follows.
    Lost { reason: String },
}

#[derive(Debug, Clone)]
struct Out {
    tag: Tag,
    pid: u16,
    publish: Publish,
    stage: Stage,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    AwaitConnAck,
    Connected,
}

/// One upstream session; it outlives its connections.
pub struct ClientSession {
    cfg: ClientConfig,
    state: State,
    out: Vec<u8>,
    events: VecDeque<ClientEvent>,
    inflight: Vec<Out>,
    receive_max: u16,
    server_max_packet: u32,
    keep_alive: Option<Duration>,
    last_sent: Instant,
    last_received: Instant,
    ping_sent: Option<Instant>,
    connect_deadline: Option<Instant>,
    encoder: Outbound,
    /// Inbound QoS 2 ids: true once committed and PUBREC'd, false while committing (a resend
    /// meanwhile is neither delivered again nor acknowledged early).
    inbound_qos2: HashMap<u16, bool>,
    /// Topic aliases the broker set on this connection.
    inbound_aliases: HashMap<u16, String>,
    subscribe_pid: Option<u16>,
    buf: Vec<u8>,
}

impl ClientSession {
    pub fn new(cfg: ClientConfig, now: Instant) -> Self {
        let encoder = Outbound::new(cfg.version, 0);
        ClientSession {
            cfg,
            state: State::Idle,
            out: Vec::new(),
            events: VecDeque::new(),
            inflight: Vec::new(),
            receive_max: u16::MAX,
            server_max_packet: u32::MAX,
            keep_alive: None,
            last_sent: now,
            last_received: now,
            ping_sent: None,
            connect_deadline: None,
            encoder,
            inbound_qos2: HashMap::new(),
            inbound_aliases: HashMap::new(),
            subscribe_pid: None,
            buf: Vec::new(),
        }
    }

    /// Puts back an inbound QoS 2 id that was committed and acknowledged before a restart.
    pub fn restore_inbound(&mut self, packet_id: u16) {
        self.inbound_qos2.insert(packet_id, true);
    }

    /// Puts back a message that was in flight before a restart, as the outbox recorded it.
    pub fn restore(&mut self, tag: Tag, packet_id: u16, publish: Publish, stage: Stage) {
        self.inflight.push(Out {
            tag,
            pid: packet_id,
            publish,
            stage,
        });
    }

    /// True while connected and the inflight window has room for a QoS 1/2 message.
    pub fn can_send(&self) -> bool {
        self.state == State::Connected && self.inflight.len() < self.window()
    }

    /// The protocol level in use.
    pub fn version(&self) -> Version {
        self.cfg.version
    }

    /// True once CONNACK accepted the current connection.
    pub fn is_connected(&self) -> bool {
        self.state == State::Connected
    }

    /// True while outbox row `tag` is in flight.
    pub fn contains(&self, tag: Tag) -> bool {
        self.inflight.iter().any(|o| o.tag == tag)
    }

    /// Messages the broker has not yet acknowledged.
    pub fn inflight(&self) -> usize {
        self.inflight.len()
    }

    fn window(&self) -> usize {
        self.cfg.max_inflight.min(self.receive_max) as usize
    }

    /// A new connection is open: sends CONNECT with a persistent session.
    pub fn connect(&mut self, now: Instant) {
        let v5 = self.cfg.version.is_v5();
        let mut props = Props::default();
        if v5 {
            let p = &mut *props;
            p.session_expiry_interval = Some(self.cfg.session_expiry);
            p.receive_maximum = Some(self.cfg.max_inflight.max(1));
            p.maximum_packet_size = Some(self.cfg.max_packet_size);
            p.topic_alias_maximum = Some(self.cfg.topic_alias_maximum);
        }
        let connect = Connect {
            version: self.cfg.version,
            // The contract: the upstream session persists; unacknowledged messages survive.
            clean_start: false,
            keep_alive: self.cfg.keep_alive,
            client_id: self.cfg.client_id.clone(),
            will: None,
            username: self.cfg.username.clone(),
            password: self.cfg.password.clone(),
            properties: props,
        };
        self.state = State::AwaitConnAck;
        self.encoder = Outbound::new(self.cfg.version, 0);
        self.buf.clear();
        self.inbound_aliases.clear();
        self.subscribe_pid = None;
        self.ping_sent = None;
        self.last_received = now;
        let wait = Duration::from_secs(self.cfg.keep_alive.max(10) as u64);
        self.connect_deadline = Some(now + wait);
        self.send(now, Packet::Connect(Box::new(connect)));
    }

    /// The connection is gone (closed, failed, or declared lost). In-flight messages stay.
    pub fn connection_lost(&mut self) {
        self.state = State::Idle;
        self.connect_deadline = None;
        self.ping_sent = None;
        self.buf.clear();
    }

    /// Sends `publish` for outbox row `tag`. QoS 0 goes at once if connected. QoS 1/2 need
    /// `can_send()`; otherwise the publish comes back.
    pub fn publish(&mut self, now: Instant, tag: Tag, mut publish: Publish) -> Result<(), Publish> {
        if self.state != State::Connected {
            return Err(publish);
        }
        publish.dup = false;
        if publish.qos == QoS::AtMostOnce {
            publish.packet_id = 0;
            if self.fits(&publish) {
                self.send(now, Packet::Publish(publish));
            }
            return Ok(());
        }
        if self.inflight.len() >= self.window() {
            return Err(publish);
        }
        if !self.fits(&publish) {
            self.events.push_back(ClientEvent::Rejected {
                tag,
                reason: reason::PACKET_TOO_LARGE,
            });
            return Ok(());
        }
        let pid = packet_id_for(tag);
        if self.inflight.iter().any(|o| o.pid == pid) || self.subscribe_pid == Some(pid) {
            // A row 65,535 ids older is still in flight: this one waits for it.
            return Err(publish);
        }
        publish.packet_id = pid;
        self.inflight.push(Out {
            tag,
            pid,
            publish: publish.clone(),
            stage: Stage::Sent,
        });
        self.send(now, Packet::Publish(publish));
        Ok(())
    }

    /// The local effects of inbound QoS 1/2 message `packet_id` have committed: acknowledge it.
    pub fn ack_inbound(&mut self, now: Instant, packet_id: u16, qos: QoS) {
        if qos == QoS::ExactlyOnce {
            // Recorded even while disconnected: the resend after the reconnect is then
            // acknowledged without being delivered again.
            self.inbound_qos2.insert(packet_id, true);
        }
        if self.state != State::Connected {
            // The broker resends it after the reconnect; its effects are stored already.
            return;
        }
        let ack = Ack {
            packet_id,
            ..Ack::default()
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send(now, Packet::PubAck(ack)),
            QoS::ExactlyOnce => self.send(now, Packet::PubRec(ack)),
        }
    }

    /// The inbound QoS 2 message's local effects could not be stored: forget it, so the
    /// broker's resend (after the next reconnect) is taken as new.
    pub fn drop_inbound(&mut self, packet_id: u16) {
        if self.inbound_qos2.get(&packet_id) == Some(&false) {
            self.inbound_qos2.remove(&packet_id);
        }
    }

    /// The id of released inbound QoS 2 message `packet_id` is forgotten on disk: PUBCOMP.
    pub fn complete_inbound(&mut self, now: Instant, packet_id: u16) {
        self.inbound_qos2.remove(&packet_id);
        if self.state == State::Connected {
            let comp = Ack {
                packet_id,
                ..Ack::default()
            };
            self.send(now, Packet::PubComp(comp));
        }
    }

    /// PUBREC for `tag` is persisted: PUBREL may go.
    pub fn release(&mut self, now: Instant, tag: Tag) {
        let Some(o) = self
            .inflight
            .iter_mut()
            .find(|o| o.tag == tag && o.stage == Stage::Releasing)
        else {
            return;
        };
        o.stage = Stage::Released;
        let pid = o.pid;
        if self.state == State::Connected {
            let rel = Ack {
                packet_id: pid,
                ..Ack::default()
            };
            self.send(now, Packet::PubRel(rel));
        }
    }

    /// Subscribes to `filters` (after each CONNACK: cheap, and right whatever the broker
    /// kept). At most one SUBSCRIBE is outstanding; the answer is `Subscribed`.
    pub fn subscribe(&mut self, now: Instant, filters: &[(String, QoS)]) {
        if self.state != State::Connected || filters.is_empty() {
            return;
        }
        let pid = (1..=u16::MAX)
            .rev()
            .find(|p| !self.inflight.iter().any(|o| o.pid == *p))
            .unwrap_or(u16::MAX);
        self.subscribe_pid = Some(pid);
        let sub = Subscribe {
            packet_id: pid,
            filters: filters
                .iter()
                .map(|(f, qos)| {
                    let options = SubOptions {
                        qos: *qos,
                        // A bridge must not hear its own messages back ([MQTT-3.8.3-3]).
                        no_local: self.cfg.version.is_v5(),
                        retain_as_published: true,
                        retain_handling: 0,
                    };
                    (f.clone(), options)
                })
                .collect(),
            properties: Props::default(),
        };
        self.send(now, Packet::Subscribe(sub));
    }

    /// Bytes to write to the socket.
    pub fn take_transmit(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.out)
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.state {
            State::Idle => None,
            State::AwaitConnAck => self.connect_deadline,
            State::Connected => {
                let ka = self.keep_alive?;
                Some(match self.ping_sent {
                    Some(sent) => sent + ka / 2,
                    None => self.last_sent.min(self.last_received) + ka,
                })
            }
        }
    }

    /// Keep-alive and dead-link detection. A PINGREQ goes when nothing was sent, or nothing
    /// received, for a keep-alive; no answer within half a keep-alive means the link is dead.
    pub fn handle_timeout(&mut self, now: Instant) {
        match self.state {
            State::Idle => {}
            State::AwaitConnAck => {
                if self.connect_deadline.is_some_and(|d| now >= d) {
                    self.lost("no CONNACK".into());
                }
            }
            State::Connected => {
                let Some(ka) = self.keep_alive else { return };
                if let Some(sent) = self.ping_sent {
                    if now >= sent + ka / 2 {
                        self.lost(format!(
                            "no answer for {:?}: link is dead",
                            now - self.last_received
                        ));
                    }
                } else if now >= self.last_sent + ka || now >= self.last_received + ka {
                    self.ping_sent = Some(now);
                    self.send(now, Packet::PingReq);
                }
            }
        }
    }

    /// Bytes read from the socket.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if self.state == State::Idle {
            return;
        }
        self.buf.extend_from_slice(data);
        let mut used = 0;
        loop {
            match decode(
                &self.buf[used..],
                Some(self.cfg.version),
                self.cfg.max_packet_size,
            ) {
                Ok(Some((p, n))) => {
                    used += n;
                    self.last_received = now;
                    self.ping_sent = None;
                    self.on_packet(now, p);
                    if self.state == State::Idle {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    if self.cfg.version.is_v5() {
                        self.send(now, disconnect(e.reason_code()));
                    }
                    self.lost(format!("broker sent a bad packet: {e}"));
                    break;
                }
            }
        }
        if self.state == State::Idle {
            self.buf.clear();
        } else {
            self.buf.drain(..used);
        }
    }

    fn on_packet(&mut self, now: Instant, p: Packet) {
        match (self.state, p) {
            (State::AwaitConnAck, Packet::ConnAck(a)) => self.on_connack(now, a),
            (State::AwaitConnAck, other) => self.lost(format!("{} before CONNACK", other.name())),
            (_, Packet::PubAck(a)) => self.finish(a, Stage::Sent, QoS::AtLeastOnce),
            (_, Packet::PubComp(a)) => self.finish(a, Stage::Released, QoS::ExactlyOnce),
            (_, Packet::PubRec(a)) => {
                if let Some(o) = self.inflight.iter().find(|o| o.pid == a.packet_id) {
                    match o.stage {
                        // Already being persisted: its PUBREL follows `release`.
                        Stage::Releasing => return,
                        Stage::Released => {
                            let rel = Ack {
                                packet_id: a.packet_id,
                                ..Ack::default()
                            };
                            return self.send(now, Packet::PubRel(rel));
                        }
                        Stage::Sent => {}
                    }
                }
                let Some(i) = self.find(a.packet_id, Stage::Sent, QoS::ExactlyOnce) else {
                    // Not ours (any more): release it so the broker can forget it.
                    let rel = Ack {
                        packet_id: a.packet_id,
                        ..Ack::default()
                    };
                    return self.send(now, Packet::PubRel(rel));
                };
                if is_transient(a.reason) {
                    return self.busy(a.reason);
                }
                if a.reason >= 0x80 {
                    let o = self.inflight.remove(i);
                    self.events.push_back(ClientEvent::Rejected {
                        tag: o.tag,
                        reason: a.reason,
                    });
                    return;
                }
                self.inflight[i].stage = Stage::Releasing;
                let tag = self.inflight[i].tag;
                self.events.push_back(ClientEvent::Released {
                    tag,
                    packet_id: a.packet_id,
                });
            }
            (_, Packet::Publish(mut p)) => {
                if let Some(alias) = p.properties.topic_alias {
                    if alias == 0 || alias > self.cfg.topic_alias_maximum {
                        self.send(now, disconnect(reason::TOPIC_ALIAS_INVALID));
                        return self.lost(format!("broker used topic alias {alias}"));
                    }
                    if p.topic.is_empty() {
                        match self.inbound_aliases.get(&alias) {
                            Some(t) => p.topic = t.clone(),
                            None => {
                                self.send(now, disconnect(reason::PROTOCOL_ERROR));
                                return self.lost(format!("broker used unset topic alias {alias}"));
                            }
                        }
                    } else {
                        self.inbound_aliases.insert(alias, p.topic.clone());
                    }
                }
                if p.qos == QoS::ExactlyOnce {
                    match self.inbound_qos2.get(&p.packet_id) {
                        Some(true) => {
                            // Already committed and PUBREC'd: only the ack was lost.
                            let rec = Ack {
                                packet_id: p.packet_id,
                                ..Ack::default()
                            };
                            return self.send(now, Packet::PubRec(rec));
                        }
                        // Still committing: its PUBREC follows the commit.
                        Some(false) => return,
                        None => {
                            self.inbound_qos2.insert(p.packet_id, false);
                        }
                    }
                }
                self.events.push_back(ClientEvent::Inbound(p));
            }
            (_, Packet::PubRel(a)) => {
                if self.inbound_qos2.contains_key(&a.packet_id) {
                    self.events.push_back(ClientEvent::InboundReleased {
                        packet_id: a.packet_id,
                    });
                } else {
                    let comp = Ack {
                        packet_id: a.packet_id,
                        ..Ack::default()
                    };
                    self.send(now, Packet::PubComp(comp));
                }
            }
            (_, Packet::SubAck(a)) => {
                if self.subscribe_pid == Some(a.packet_id) {
                    self.subscribe_pid = None;
                    self.events
                        .push_back(ClientEvent::Subscribed { codes: a.codes });
                }
            }
            (_, Packet::PingResp) | (_, Packet::UnsubAck(_)) => {}
            (_, Packet::Disconnect(d)) => {
                self.lost(format!("broker sent DISCONNECT 0x{:02x}", d.reason))
            }
            (_, other) => self.lost(format!("broker sent {}", other.name())),
        }
    }

    fn on_connack(&mut self, now: Instant, a: ConnAck) {
        self.connect_deadline = None;
        if a.code != 0 {
            self.events.push_back(ClientEvent::Refused { code: a.code });
            self.state = State::Idle;
            return;
        }
        self.state = State::Connected;
        let p = &a.properties;
        self.receive_max = p.receive_maximum.unwrap_or(u16::MAX);
        self.server_max_packet = p.maximum_packet_size.unwrap_or(u32::MAX);
        let ka = p.server_keep_alive.unwrap_or(self.cfg.keep_alive);
        self.keep_alive = (ka > 0).then(|| Duration::from_secs(ka as u64));
        self.encoder = Outbound::new(self.cfg.version, p.topic_alias_maximum.unwrap_or(0));
        if !a.session_present {
            // The broker lost our session: its QoS 2 dedup state went with it.
            self.inbound_qos2.clear();
        }
        self.events.push_back(ClientEvent::Connected {
            session_present: a.session_present,
        });
        // [MQTT-4.4.0-1] everything unacknowledged goes again, in order, with its packet id.
        // When the broker has no session, a PUBREL would name an id it never saw: the
        // PUBLISH goes again instead.
        let resend: Vec<Packet> = self
            .inflight
            .iter_mut()
            .filter_map(|o| match o.stage {
                Stage::Released if a.session_present => Some(Packet::PubRel(Ack {
                    packet_id: o.pid,
                    ..Ack::default()
                })),
                // The broker holds it; `release` sends the PUBREL once it is persisted.
                Stage::Releasing if a.session_present => None,
                _ => {
                    o.stage = Stage::Sent;
                    let mut p = o.publish.clone();
                    p.dup = true;
                    p.packet_id = o.pid;
                    Some(Packet::Publish(p))
                }
            })
            .collect();
        for p in resend {
            self.send(now, p);
        }
    }

    fn find(&self, pid: u16, stage: Stage, qos: QoS) -> Option<usize> {
        self.inflight
            .iter()
            .position(|o| o.pid == pid && o.stage == stage && o.publish.qos == qos)
    }

    fn finish(&mut self, a: Ack, stage: Stage, qos: QoS) {
        let Some(i) = self.find(a.packet_id, stage, qos) else {
            return;
        };
        if is_transient(a.reason) {
            return self.busy(a.reason);
        }
        let o = self.inflight.remove(i);
        let event = if a.reason >= 0x80 {
            ClientEvent::Rejected {
                tag: o.tag,
                reason: a.reason,
            }
        } else {
            ClientEvent::Delivered {
                tag: o.tag,
                reason: a.reason,
            }
        };
        self.events.push_back(event);
    }

    /// The broker cannot take the message now (quota, overload): not a verdict on the
    /// message. It stays in flight and goes again on the next connection, after a backoff.
    fn busy(&mut self, code: u8) {
        self.lost(format!(
            "broker is busy (reason 0x{code:02x}); retrying after a backoff"
        ));
    }

    /// Whether `p` can go to this broker: within its Maximum Packet Size, and encodable at
    /// all (a row whose topic is over 65,535 bytes is refused, never sent mangled).
    fn fits(&self, p: &Publish) -> bool {
        let packet = Packet::Publish(p.clone());
        crate::proto::mqtt::encode::encodable(&packet, self.cfg.version).is_ok()
            && encoded_len(&packet, self.cfg.version) <= self.server_max_packet as usize
    }

    fn send(&mut self, now: Instant, p: Packet) {
        self.encoder.encode(p, &mut self.out);
        self.last_sent = now;
    }

    fn lost(&mut self, reason: String) {
        self.events.push_back(ClientEvent::Lost { reason });
        self.connection_lost();
    }
}

/// Failure codes that say "not now" rather than "never": quota exceeded, server busy.
fn is_transient(code: u8) -> bool {
    matches!(code, reason::QUOTA_EXCEEDED | reason::SERVER_BUSY)
}

fn disconnect(code: u8) -> Packet {
    Packet::Disconnect(Disconnect {
        reason: code,
        properties: Props::default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mqtt::encode;

    fn cfg(v: Version) -> ClientConfig {
        ClientConfig {
            client_id: "site-042".into(),
            version: v,
            keep_alive: 10,
            session_expiry: 604_800,
            username: None,
            password: None,
            max_inflight: 32,
            max_packet_size: 1 << 20,
            topic_alias_maximum: 0,
        }
    }

    /// What the client wrote, decoded as a broker would.
    fn sent(c: &mut ClientSession, v: Version, connect_first: bool) -> Vec<Packet> {
        let bytes = c.take_transmit();
        let mut out = Vec::new();
        let mut at = 0;
        let mut first = connect_first;
        while at < bytes.len() {
            let level = if first { None } else { Some(v) };
            let (p, n) = decode(&bytes[at..], level, u32::MAX).unwrap().unwrap();
            first = false;
            out.push(p);
            at += n;
        }
        out
    }

    fn feed(c: &mut ClientSession, now: Instant, v: Version, p: Packet) {
        let mut b = Vec::new();
        encode(&p, v, &mut b).unwrap();
        c.handle_bytes(now, &b);
    }

    fn events(c: &mut ClientSession) -> Vec<ClientEvent> {
        std::iter::from_fn(|| c.poll_event()).collect()
    }

    fn connack(present: bool, props: Properties) -> Packet {
        Packet::ConnAck(ConnAck {
            session_present: present,
            code: 0,
            properties: props.into(),
        })
    }

    fn msg(topic: &str, qos: QoS) -> Publish {
        Publish {
            qos,
            topic: topic.into(),
            payload: Bytes::from_static(b"21.5"),
            ..Publish::default()
        }
    }

    fn connected(v: Version, props: Properties) -> (ClientSession, Instant) {
        let t0 = Instant::now();
        let mut c = ClientSession::new(cfg(v), t0);
        c.connect(t0);
        match &sent(&mut c, v, true)[..] {
            [Packet::Connect(k)] => {
                assert!(!k.clean_start, "a persistent session");
                if v.is_v5() {
                    assert_eq!(k.properties.session_expiry_interval, Some(604_800));
                }
            }
            other => panic!("{other:?}"),
        }
        feed(&mut c, t0, v, connack(false, props));
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Connected {
                session_present: false
            }]
        );
        (c, t0)
    }

    #[test]
    fn qos1_and_qos2_report_each_stage_by_tag() {
        let v = Version::V5;
        let (mut c, t) = connected(v, Properties::default());
        c.publish(t, 7, msg("a", QoS::AtLeastOnce)).unwrap();
        c.publish(t, 8, msg("b", QoS::ExactlyOnce)).unwrap();
        let pids: Vec<u16> = sent(&mut c, v, false)
            .into_iter()
            .map(|p| match p {
                Packet::Publish(p) => p.packet_id,
                other => panic!("{other:?}"),
            })
            .collect();
        feed(
            &mut c,
            t,
            v,
            Packet::PubAck(Ack {
                packet_id: pids[0],
                ..Ack::default()
            }),
        );
        feed(
            &mut c,
            t,
            v,
            Packet::PubRec(Ack {
                packet_id: pids[1],
                ..Ack::default()
            }),
        );
        assert_eq!(
            events(&mut c),
            vec![
                ClientEvent::Delivered { tag: 7, reason: 0 },
                ClientEvent::Released {
                    tag: 8,
                    packet_id: pids[1]
                }
            ]
        );
        assert!(
            sent(&mut c, v, false).is_empty(),
            "no PUBREL before the PUBREC state is persisted"
        );
        c.release(t, 8);
        assert!(
            matches!(&sent(&mut c, v, false)[..], [Packet::PubRel(a)] if a.packet_id == pids[1])
        );
        feed(
            &mut c,
            t,
            v,
            Packet::PubComp(Ack {
                packet_id: pids[1],
                ..Ack::default()
            }),
        );
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Delivered { tag: 8, reason: 0 }]
        );
        assert_eq!(c.inflight(), 0);
    }

    #[test]
    fn window_is_the_smaller_of_ours_and_receive_maximum() {
        let v = Version::V5;
        let (mut c, t) = connected(
            v,
            Properties {
                receive_maximum: Some(2),
                ..Properties::default()
            },
        );
        assert!(c.publish(t, 1, msg("a", QoS::AtLeastOnce)).is_ok());
        assert!(c.publish(t, 2, msg("a", QoS::AtLeastOnce)).is_ok());
        assert!(!c.can_send());
        assert!(c.publish(t, 3, msg("a", QoS::AtLeastOnce)).is_err());
        assert!(
            c.publish(t, 4, msg("a", QoS::AtMostOnce)).is_ok(),
            "QoS 0 is not windowed"
        );
    }

    #[test]
    fn reconnect_resends_with_same_ids_and_dup_or_pubrel() {
        let v = Version::V311;
        let (mut c, t) = connected(v, Properties::default());
        c.publish(t, 1, msg("a", QoS::AtLeastOnce)).unwrap();
        c.publish(t, 2, msg("b", QoS::ExactlyOnce)).unwrap();
        let first = sent(&mut c, v, false);
        let pid2 = match &first[1] {
            Packet::Publish(p) => p.packet_id,
            other => panic!("{other:?}"),
        };
        feed(
            &mut c,
            t,
            v,
            Packet::PubRec(Ack {
                packet_id: pid2,
                ..Ack::default()
            }),
        );
        events(&mut c);
        c.release(t, 2);
        c.take_transmit();
        c.connection_lost();
        // The broker kept the session: PUBLISH again with DUP, PUBREL for the released one.
        c.connect(t);
        sent(&mut c, v, true);
        feed(&mut c, t, v, connack(true, Properties::default()));
        let again = sent(&mut c, v, false);
        assert!(
            matches!(&again[0], Packet::Publish(p) if p.dup && Some(p.packet_id) == first.first().map(|f| match f { Packet::Publish(p) => p.packet_id, _ => 0 }))
        );
        assert!(matches!(&again[1], Packet::PubRel(a) if a.packet_id == pid2));
        // The broker lost the session: everything goes again as PUBLISH.
        c.connection_lost();
        c.connect(t);
        sent(&mut c, v, true);
        feed(&mut c, t, v, connack(false, Properties::default()));
        let again = sent(&mut c, v, false);
        assert_eq!(again.len(), 2);
        assert!(again
            .iter()
            .all(|p| matches!(p, Packet::Publish(p) if p.dup)));
        assert_eq!(
            c.inflight(),
            2,
            "nothing is deleted on send or on reconnect"
        );
    }

    #[test]
    fn restored_rows_go_out_after_a_restart() {
        let v = Version::V5;
        let t = Instant::now();
        let mut c = ClientSession::new(cfg(v), t);
        let mut p = msg("a", QoS::ExactlyOnce);
        p.packet_id = packet_id_for(99);
        c.restore(99, packet_id_for(99), p, Stage::Released);
        c.connect(t);
        sent(&mut c, v, true);
        feed(&mut c, t, v, connack(true, Properties::default()));
        assert!(
            matches!(&sent(&mut c, v, false)[..], [Packet::PubRel(a)] if a.packet_id == packet_id_for(99))
        );
        c.publish(t, 100, msg("b", QoS::AtLeastOnce)).unwrap();
        assert!(
            matches!(&sent(&mut c, v, false)[..], [Packet::Publish(p)] if p.packet_id == packet_id_for(100)),
            "ids are derived from the row"
        );
        // A row whose derived id is still in flight waits.
        assert!(c
            .publish(t, 100 + 65_535, msg("c", QoS::AtLeastOnce))
            .is_err());
    }

    #[test]
    fn black_hole_is_found_within_one_and_a_half_keepalives() {
        let v = Version::V311;
        let (mut c, t0) = connected(v, Properties::default());
        // Draining keeps sending; nothing comes back.
        let mut now = t0;
        let mut lost_at = None;
        for ms in (0..20_000).step_by(100) {
            now = t0 + Duration::from_millis(ms);
            let _ = c.publish(now, ms as i64, msg("a", QoS::AtLeastOnce));
            c.take_transmit();
            if c.poll_timeout().is_some_and(|d| now >= d) {
                c.handle_timeout(now);
            }
            if events(&mut c)
                .iter()
                .any(|e| matches!(e, ClientEvent::Lost { .. }))
            {
                lost_at = Some(now - t0);
                break;
            }
        }
        let lost_at = lost_at.expect("the dead link was never noticed");
        assert!(
            lost_at <= Duration::from_secs(15) && lost_at >= Duration::from_secs(10),
            "{lost_at:?}"
        );
        assert!(
            c.inflight() > 0,
            "in-flight messages are kept for the next connection"
        );
        let _ = now;
    }

    #[test]
    fn an_answered_ping_keeps_the_link() {
        let v = Version::V311;
        let (mut c, t0) = connected(v, Properties::default());
        let t = t0 + Duration::from_secs(10);
        c.handle_timeout(t);
        assert_eq!(sent(&mut c, v, false), vec![Packet::PingReq]);
        feed(&mut c, t + Duration::from_secs(1), v, Packet::PingResp);
        c.handle_timeout(t + Duration::from_secs(6));
        assert!(events(&mut c).is_empty());
        assert!(c.is_connected());
    }

    #[test]
    fn server_keep_alive_and_outbound_aliases() {
        let v = Version::V5;
        let (mut c, t0) = connected(
            v,
            Properties {
                server_keep_alive: Some(4),
                topic_alias_maximum: Some(5),
                ..Properties::default()
            },
        );
        assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(4)));
        for tag in 0..2 {
            c.publish(t0, tag, msg("sites/site-042/sensors/t", QoS::AtMostOnce))
                .unwrap();
        }
        let p = sent(&mut c, v, false);
        assert!(
            matches!(&p[0], Packet::Publish(p) if !p.topic.is_empty() && p.properties.topic_alias == Some(1))
        );
        assert!(
            matches!(&p[1], Packet::Publish(p) if p.topic.is_empty() && p.properties.topic_alias == Some(1)),
            "a satellite link pays per byte"
        );
    }

    #[test]
    fn quota_exceeded_keeps_the_message_and_backs_off() {
        let v = Version::V5;
        let (mut c, t) = connected(v, Properties::default());
        c.publish(t, 11, msg("a", QoS::ExactlyOnce)).unwrap();
        c.take_transmit();
        feed(
            &mut c,
            t,
            v,
            Packet::PubRec(Ack {
                packet_id: packet_id_for(11),
                reason: reason::QUOTA_EXCEEDED,
                ..Ack::default()
            }),
        );
        assert!(matches!(&events(&mut c)[..], [ClientEvent::Lost { .. }]));
        assert!(
            c.contains(11),
            "not dropped: it goes again after the reconnect"
        );
    }

    #[test]
    fn too_large_for_the_broker_is_rejected_not_sent() {
        let v = Version::V5;
        let (mut c, t) = connected(
            v,
            Properties {
                maximum_packet_size: Some(20),
                ..Properties::default()
            },
        );
        let mut big = msg("a/long/topic/name", QoS::AtLeastOnce);
        big.payload = Bytes::from(vec![0u8; 100]);
        c.publish(t, 5, big).unwrap();
        assert!(sent(&mut c, v, false).is_empty());
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Rejected {
                tag: 5,
                reason: reason::PACKET_TOO_LARGE
            }]
        );
    }

    /// Issue 18: a row whose topic a prefix pushed past 65,535 bytes was written with
    /// `len as u16`, and the broker read another topic and packet. It is refused instead.
    #[test]
    fn a_topic_over_the_string_limit_is_rejected_not_sent_mangled() {
        let v = Version::V311;
        let (mut c, t) = connected(v, Properties::default());
        let long = msg(&"t".repeat(65_536), QoS::AtLeastOnce);
        c.publish(t, 6, long).unwrap();
        assert!(sent(&mut c, v, false).is_empty());
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Rejected {
                tag: 6,
                reason: reason::PACKET_TOO_LARGE
            }]
        );
    }

    #[test]
    fn inbound_is_acked_only_when_the_caller_says_so() {
        let v = Version::V311;
        let (mut c, t) = connected(v, Properties::default());
        let mut p = msg("cmd/pump", QoS::ExactlyOnce);
        p.packet_id = 9;
        feed(&mut c, t, v, Packet::Publish(p.clone()));
        assert!(matches!(&events(&mut c)[..], [ClientEvent::Inbound(_)]));
        assert!(
            sent(&mut c, v, false).is_empty(),
            "no ack before the local commit"
        );
        c.ack_inbound(t, 9, QoS::ExactlyOnce);
        assert!(matches!(&sent(&mut c, v, false)[..], [Packet::PubRec(a)] if a.packet_id == 9));
        // A resend after our PUBREC is not delivered again.
        p.dup = true;
        feed(&mut c, t, v, Packet::Publish(p));
        assert!(events(&mut c).is_empty());
        assert!(matches!(&sent(&mut c, v, false)[..], [Packet::PubRec(_)]));
        feed(
            &mut c,
            t,
            v,
            Packet::PubRel(Ack {
                packet_id: 9,
                ..Ack::default()
            }),
        );
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::InboundReleased { packet_id: 9 }]
        );
        assert!(
            sent(&mut c, v, false).is_empty(),
            "PUBCOMP frees the id: it waits until the id is forgotten on disk"
        );
        c.complete_inbound(t, 9);
        assert!(matches!(&sent(&mut c, v, false)[..], [Packet::PubComp(_)]));
    }

    #[test]
    fn inbound_qos2_resent_while_committing_is_neither_delivered_nor_acked() {
        let v = Version::V5;
        let (mut c, t) = connected(v, Properties::default());
        let mut p = msg("cmd/valve", QoS::ExactlyOnce);
        p.packet_id = 3;
        feed(&mut c, t, v, Packet::Publish(p.clone()));
        assert_eq!(events(&mut c).len(), 1);
        // The link drops before the commit; the broker resends after the reconnect.
        c.connection_lost();
        c.ack_inbound(t, 3, QoS::ExactlyOnce);
        c.connect(t);
        sent(&mut c, v, true);
        feed(&mut c, t, v, connack(true, Properties::default()));
        events(&mut c);
        p.dup = true;
        feed(&mut c, t, v, Packet::Publish(p));
        assert!(events(&mut c).is_empty(), "delivered once");
        assert!(matches!(&sent(&mut c, v, false)[..], [Packet::PubRec(a)] if a.packet_id == 3));
    }

    #[test]
    fn inbound_topic_aliases_are_resolved() {
        let v = Version::V5;
        let t0 = Instant::now();
        let mut cfg = cfg(v);
        cfg.topic_alias_maximum = 4;
        let mut c = ClientSession::new(cfg, t0);
        c.connect(t0);
        c.take_transmit();
        feed(&mut c, t0, v, connack(false, Properties::default()));
        events(&mut c);
        let mut p = msg("sites/x/cmd/pump", QoS::AtMostOnce);
        p.properties.topic_alias = Some(2);
        feed(&mut c, t0, v, Packet::Publish(p.clone()));
        p.topic = String::new();
        feed(&mut c, t0, v, Packet::Publish(p.clone()));
        let topics: Vec<String> = events(&mut c)
            .into_iter()
            .map(|e| match e {
                ClientEvent::Inbound(p) => p.topic,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(topics, ["sites/x/cmd/pump", "sites/x/cmd/pump"]);
        p.properties.topic_alias = Some(3);
        feed(&mut c, t0, v, Packet::Publish(p));
        assert!(matches!(&events(&mut c)[..], [ClientEvent::Lost { .. }]));
    }

    #[test]
    fn subscribe_uses_a_free_id_and_reports_codes() {
        let v = Version::V5;
        let (mut c, t) = connected(v, Properties::default());
        c.subscribe(t, &[("sites/x/cmd/#".into(), QoS::ExactlyOnce)]);
        let pid = match &sent(&mut c, v, false)[..] {
            [Packet::Subscribe(s)] => {
                assert_eq!(s.filters[0].0, "sites/x/cmd/#");
                assert!(s.filters[0].1.no_local, "a bridge never hears itself");
                s.packet_id
            }
            other => panic!("{other:?}"),
        };
        feed(
            &mut c,
            t,
            v,
            Packet::SubAck(SubAck {
                packet_id: pid,
                codes: vec![2],
                properties: Props::default(),
            }),
        );
        assert_eq!(
            events(&mut c),
            vec![ClientEvent::Subscribed { codes: vec![2] }]
        );
    }

    #[test]
    fn refusal_and_garbage() {
        let v = Version::V5;
        let t = Instant::now();
        let mut c = ClientSession::new(cfg(v), t);
        c.connect(t);
        c.take_transmit();
        feed(
            &mut c,
            t,
            v,
            Packet::ConnAck(ConnAck {
                code: 0x86,
                ..ConnAck::default()
            }),
        );
        assert_eq!(events(&mut c), vec![ClientEvent::Refused { code: 0x86 }]);
        c.connect(t);
        c.take_transmit();
        c.handle_bytes(t, &[0x00, 0x00]);
        assert!(matches!(&events(&mut c)[..], [ClientEvent::Lost { .. }]));
        assert!(!c.is_connected());
    }
}
