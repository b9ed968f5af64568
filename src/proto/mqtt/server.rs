//! The broker side of one MQTT connection, sans-IO, split along the socket's two halves.
//!
//! `Inbound` owns what arrives: framing, the CONNECT-first rule, keep-alive (1.5× the
//! negotiated interval), inbound topic aliases, and packets a client may never send. It turns
//! bytes into `InEvent`s for the hub. `Outbound` owns what leaves: encoding for the negotiated
//! level and outbound topic aliases. Session state (subscriptions, inflight, queues) lives in the
//! hub, so that a session outlives its connection.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::packet::*;
use super::{decode, encode, DecodeError};

/// Limits a listener applies to every connection.
#[derive(Debug, Clone)]
pub struct ServerLimits {
    /// Largest packet we accept, fixed header included.
    pub max_packet_size: u32,
    /// Largest keep-alive we allow; 0 means the client's own is kept. A v5 client asking for
    /// more (or for 0) is told this value in Server Keep Alive.
    pub max_keepalive: u16,
    /// Topic aliases a v5 client may use towards us.
    pub topic_alias_maximum: u16,
    /// How long a socket may stay open without sending CONNECT.
    pub connect_timeout: Duration,
}

impl Default for ServerLimits {
    fn default() -> Self {
        ServerLimits {
            max_packet_size: 1 << 20,
            max_keepalive: 0,
            topic_alias_maximum: 10,
            connect_timeout: Duration::from_secs(10),
        }
    }
}

/// Why a connection ended, as the hub needs to know it (wills, session expiry).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT. `with_will` is v5's reason 0x04.
    Disconnect {
        /// Publish the will anyway (v5 reason 0x04).
        with_will: bool,
        /// A v5 DISCONNECT may change the session expiry.
        session_expiry: Option<u32>,
    },
    /// The client broke the protocol; `reason` is the v5 reason code sent in DISCONNECT.
    Violation {
        /// v5 reason code.
        reason: u8,
        /// Human-readable rule, for the log.
        detail: String,
    },
    /// Nothing arrived for 1.5× the keep-alive.
    KeepAliveTimeout,
    /// No CONNECT within the connect timeout.
    ConnectTimeout,
    /// The socket closed or failed without DISCONNECT.
    ConnectionLost,
    /// The server closed it: takeover, shutdown, or a slow reader.
    ServerClosed,
}

impl std::fmt::Display for CloseReason {
    /// The words a log line uses, as mosquitto's `connection_messages` do.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CloseReason::Disconnect {
                with_will: false, ..
            } => f.write_str("disconnected"),
            CloseReason::Disconnect {
                with_will: true, ..
            } => f.write_str("disconnected, asking for its will"),
            CloseReason::Violation { detail, .. } => {
                write!(f, "closed for a protocol error: {detail}")
            }
            CloseReason::KeepAliveTimeout => f.write_str("closed: keep-alive timeout"),
            CloseReason::ConnectTimeout => f.write_str("closed: no CONNECT in time"),
            CloseReason::ConnectionLost => f.write_str("closed its connection without DISCONNECT"),
            CloseReason::ServerClosed => {
                f.write_str("closed by outpost (takeover, shutdown or refusal)")
            }
        }
    }
}

impl CloseReason {
    /// True when the will must be published ([MQTT-3.1.2-8]: anything but a plain DISCONNECT).
    pub fn publishes_will(&self) -> bool {
        !matches!(
            self,
            CloseReason::Disconnect {
                with_will: false,
                ..
            }
        )
    }
}

/// What the inbound machine tells its driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InEvent {
    /// A valid CONNECT; `keep_alive` is the interval in force after the server's cap.
    Connect {
        /// The packet as decoded.
        connect: Box<Connect>,
        /// Effective keep-alive in seconds.
        keep_alive: u16,
    },
    /// CONNECT named an unsupported level: answer CONNACK with this code, then close.
    Refuse {
        /// CONNACK code (0x84 for v5, 0x01 before).
        code: u8,
        /// The level to encode the CONNACK for.
        version: Version,
    },
    /// A packet for the hub. PUBLISH topics are already resolved from aliases.
    Packet(Packet),
    /// Send this straight back (PINGRESP).
    Reply(Packet),
    /// The connection must end. `disconnect` is the v5 DISCONNECT to send first, if any.
    Close {
        /// Why, for the hub.
        reason: CloseReason,
        /// A DISCONNECT to send before closing (v5 only).
        disconnect: Option<Packet>,
    },
}

/// The inbound half of a broker connection.
pub struct Inbound {
    limits: ServerLimits,
    version: Option<Version>,
    buf: Vec<u8>,
    deadline: Option<Instant>,
    keep_alive: Option<Duration>,
    aliases: HashMap<u16, String>,
    connect_expiry: u32,
    events: std::collections::VecDeque<InEvent>,
    closed: bool,
}

impl Inbound {
    /// A fresh connection accepted at `now`.
    pub fn new(now: Instant, limits: ServerLimits) -> Self {
        let deadline = Some(now + limits.connect_timeout);
        Inbound {
            limits,
            version: None,
            buf: Vec::new(),
            deadline,
            keep_alive: None,
            aliases: HashMap::new(),
            connect_expiry: 0,
            events: Default::default(),
            closed: false,
        }
    }

    /// The negotiated level, once CONNECT has arrived.
    pub fn version(&self) -> Option<Version> {
        self.version
    }

    /// True once a Close event has been emitted; no more input is processed.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Feeds bytes read from the socket.
    ///
    /// The buffer holds at most one partial packet, which the decoder bounds by the maximum
    /// packet size, so a peer cannot make it grow without limit.
    pub fn handle_bytes(&mut self, now: Instant, data: &[u8]) {
        if self.closed {
            return;
        }
        self.buf.extend_from_slice(data);
        let mut consumed = 0;
        while !self.closed {
            match decode(
                &self.buf[consumed..],
                self.version,
                self.limits.max_packet_size,
            ) {
                Ok(Some((packet, n))) => {
                    consumed += n;
                    // Packet first: CONNECT is what sets the keep-alive that touch() arms.
                    self.on_packet(packet);
                    self.touch(now);
                }
                Ok(None) => break,
                Err(e) => {
                    self.on_decode_error(e);
                    break;
                }
            }
        }
        self.buf.drain(..consumed);
    }

    /// The socket reached EOF or failed.
    pub fn handle_eof(&mut self) {
        if !self.closed {
            self.close(CloseReason::ConnectionLost, None);
        }
    }

    /// When `handle_timeout` must next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.closed {
            None
        } else {
            self.deadline
        }
    }

    /// Time has reached `now`: close if the keep-alive or connect deadline passed.
    pub fn handle_timeout(&mut self, now: Instant) {
        let Some(d) = self.deadline else { return };
        if self.closed || now < d {
            return;
        }
        if self.version.is_none() {
            self.close(CloseReason::ConnectTimeout, None);
        } else {
            let dc = self.v5_disconnect(reason::KEEP_ALIVE_TIMEOUT);
            self.close(CloseReason::KeepAliveTimeout, dc);
        }
    }

    /// The next event for the driver.
    pub fn poll_event(&mut self) -> Option<InEvent> {
        self.events.pop_front()
    }

    fn touch(&mut self, now: Instant) {
        if self.closed {
            return;
        }
        if let Some(ka) = self.keep_alive {
            // [MQTT-3.1.2-24] one and a half times the keep-alive.
            self.deadline = Some(now + ka + ka / 2);
        }
    }

    fn v5_disconnect(&self, code: u8) -> Option<Packet> {
        (self.version == Some(Version::V5)).then(|| {
            Packet::Disconnect(Disconnect {
                reason: code,
                properties: Props::default(),
            })
        })
    }

    fn close(&mut self, reason: CloseReason, disconnect: Option<Packet>) {
        self.closed = true;
        self.deadline = None;
        self.events.push_back(InEvent::Close { reason, disconnect });
    }

    fn violation(&mut self, code: u8, detail: impl Into<String>) {
        let dc = self.v5_disconnect(code);
        self.close(
            CloseReason::Violation {
                reason: code,
                detail: detail.into(),
            },
            dc,
        );
    }

    fn on_decode_error(&mut self, e: DecodeError) {
        match (&e, self.version) {
            (DecodeError::UnsupportedProtocolVersion(level), None) => {
                let (code, version) = if *level == 5 {
                    (reason::UNSUPPORTED_PROTOCOL_VERSION, Version::V5)
                } else {
                    (reason::V3_UNACCEPTABLE_PROTOCOL, Version::V311)
                };
                self.events.push_back(InEvent::Refuse { code, version });
                self.close(
                    CloseReason::Violation {
                        reason: code,
                        detail: e.to_string(),
                    },
                    None,
                );
            }
            // Before CONNECT there is no level to encode a DISCONNECT for.
            (_, None) => self.close(
                CloseReason::Violation {
                    reason: e.reason_code(),
                    detail: e.to_string(),
                },
                None,
            ),
            (_, Some(_)) => self.violation(e.reason_code(), e.to_string()),
        }
    }

    fn on_packet(&mut self, packet: Packet) {
        match packet {
            Packet::Connect(c) => {
                self.version = Some(c.version);
                let mut ka = c.keep_alive;
                let max = self.limits.max_keepalive;
                // Only v5 can be told a different keep-alive, so only v5 gets the cap.
                if c.version.is_v5() && max > 0 && (ka == 0 || ka > max) {
                    ka = max;
                }
                self.keep_alive = (ka > 0).then(|| Duration::from_secs(ka as u64));
                self.deadline = None;
                self.connect_expiry = c.properties.session_expiry_interval.unwrap_or(0);
                self.events.push_back(InEvent::Connect {
                    connect: c,
                    keep_alive: ka,
                });
            }
            Packet::Publish(p) => self.on_publish(p),
            Packet::PingReq => self.events.push_back(InEvent::Reply(Packet::PingResp)),
            Packet::Disconnect(d) => {
                let expiry = d.properties.session_expiry_interval;
                if self.connect_expiry == 0 && expiry.is_some_and(|e| e != 0) {
                    // [MQTT-3.14.2-2]
                    return self.violation(
                        reason::PROTOCOL_ERROR,
                        "DISCONNECT sets a session expiry after CONNECT set 0",
                    );
                }
                self.close(
                    CloseReason::Disconnect {
                        with_will: d.reason == reason::DISCONNECT_WITH_WILL,
                        session_expiry: expiry,
                    },
                    None,
                );
            }
            p @ (Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::Subscribe(_)
            | Packet::Unsubscribe(_)) => self.events.push_back(InEvent::Packet(p)),
            Packet::Auth(_) => {
                // We accept no authentication method at CONNECT, so re-authentication is never
                // valid ([MQTT-4.12.0-1]).
                self.violation(
                    reason::PROTOCOL_ERROR,
                    "AUTH without an authentication method",
                )
            }
            other @ (Packet::ConnAck(_)
            | Packet::SubAck(_)
            | Packet::UnsubAck(_)
            | Packet::PingResp) => self.violation(
                reason::PROTOCOL_ERROR,
                format!("{} may only be sent by a server", other.name()),
            ),
        }
    }

    fn on_publish(&mut self, mut p: Publish) {
        if !p.properties.subscription_identifiers.is_empty() {
            // [MQTT-3.3.4-6]
            return self.violation(
                reason::PROTOCOL_ERROR,
                "PUBLISH from a client carries a subscription identifier",
            );
        }
        if let Some(alias) = p.properties.topic_alias {
            p.properties.topic_alias = None;
            if alias == 0 || alias > self.limits.topic_alias_maximum {
                return self.violation(reason::TOPIC_ALIAS_INVALID, "topic alias out of range");
            }
            if p.topic.is_empty() {
                match self.aliases.get(&alias) {
                    Some(t) => p.topic = t.clone(),
                    None => return self.violation(reason::PROTOCOL_ERROR, "unknown topic alias"),
                }
            } else {
                self.aliases.insert(alias, p.topic.clone());
            }
        }
        self.events.push_back(InEvent::Packet(Packet::Publish(p)));
    }
}

/// The outbound half of a broker connection: encodes for the negotiated level and assigns
/// topic aliases to outgoing PUBLISH packets when the client allows them.
pub struct Outbound {
    version: Version,
    alias_max: u16,
    aliases: HashMap<String, u16>,
}

impl Outbound {
    /// Before CONNECT the level is unknown; 3.1.1 framing is used for a refusal.
    pub fn new(version: Version, client_topic_alias_max: u16) -> Self {
        Outbound {
            version,
            alias_max: if version.is_v5() {
                client_topic_alias_max
            } else {
                0
            },
            aliases: HashMap::new(),
        }
    }

    /// Appends the encoding of `packet` to `out`. One that cannot be encoded (a field over
    /// 65,535 bytes, which the hub refuses on the way in) is dropped and logged, never sent
    /// with a wrong length.
    pub fn encode(&mut self, mut packet: Packet, out: &mut Vec<u8>) {
        if let Packet::Publish(p) = &mut packet {
            self.alias(p);
        }
        if let Err(e) = encode(&packet, self.version, out) {
            tracing::warn!(packet = packet.name(), error = %e, "packet not sent");
        }
    }

    /// Aliases are assigned first come, first served, and never reassigned: a stable mapping
    /// costs nothing to track and saves the topic on every later message.
    fn alias(&mut self, p: &mut Publish) {
        if self.alias_max == 0 {
            return;
        }
        if let Some(&a) = self.aliases.get(&p.topic) {
            p.topic.clear();
            p.properties.topic_alias = Some(a);
        } else if (self.aliases.len() as u16) < self.alias_max {
            let a = self.aliases.len() as u16 + 1;
            self.aliases.insert(p.topic.clone(), a);
            p.properties.topic_alias = Some(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(level: u8, keep_alive: u16) -> Vec<u8> {
        let c = Packet::Connect(Box::new(Connect {
            version: if level == 5 {
                Version::V5
            } else {
                Version::V311
            },
            clean_start: true,
            keep_alive,
            client_id: "k".into(),
            will: None,
            username: None,
            password: None,
            properties: Props::default(),
        }));
        let mut out = Vec::new();
        encode(
            &c,
            if level == 5 {
                Version::V5
            } else {
                Version::V311
            },
            &mut out,
        )
        .unwrap();
        out
    }

    fn events(m: &mut Inbound) -> Vec<InEvent> {
        std::iter::from_fn(|| m.poll_event()).collect()
    }

    #[test]
    fn keepalive_armed_by_connect_and_fires_at_one_and_a_half() {
        let t0 = Instant::now();
        let mut m = Inbound::new(t0, ServerLimits::default());
        m.handle_bytes(t0, &connect_bytes(5, 10));
        assert!(matches!(
            events(&mut m)[..],
            [InEvent::Connect { keep_alive: 10, .. }]
        ));
        assert_eq!(m.poll_timeout(), Some(t0 + Duration::from_secs(15)));
        m.handle_timeout(t0 + Duration::from_secs(14));
        assert!(events(&mut m).is_empty());
        // A PINGREQ pushes the deadline out.
        m.handle_bytes(t0 + Duration::from_secs(14), &[0xC0, 0]);
        assert_eq!(events(&mut m), vec![InEvent::Reply(Packet::PingResp)]);
        m.handle_timeout(t0 + Duration::from_secs(28));
        assert!(events(&mut m).is_empty());
        m.handle_timeout(t0 + Duration::from_secs(29));
        match &events(&mut m)[..] {
            [InEvent::Close { reason, disconnect }] => {
                assert_eq!(*reason, CloseReason::KeepAliveTimeout);
                assert!(
                    matches!(disconnect, Some(Packet::Disconnect(d)) if d.reason == reason::KEEP_ALIVE_TIMEOUT)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn server_keepalive_caps_v5_only() {
        let limits = ServerLimits {
            max_keepalive: 60,
            ..ServerLimits::default()
        };
        let t0 = Instant::now();
        for (level, asked, want) in [(5, 0, 60), (5, 600, 60), (5, 30, 30), (4, 600, 600)] {
            let mut m = Inbound::new(t0, limits.clone());
            m.handle_bytes(t0, &connect_bytes(level, asked));
            match &events(&mut m)[..] {
                [InEvent::Connect { keep_alive, .. }] => {
                    assert_eq!(*keep_alive, want, "{level} {asked}")
                }
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn connect_timeout_and_byte_at_a_time_input() {
        let t0 = Instant::now();
        let mut m = Inbound::new(t0, ServerLimits::default());
        for b in connect_bytes(4, 0) {
            m.handle_bytes(t0, &[b]);
        }
        assert!(matches!(events(&mut m)[..], [InEvent::Connect { .. }]));
        assert_eq!(m.poll_timeout(), None, "keep-alive 0 means no deadline");

        let mut silent = Inbound::new(t0, ServerLimits::default());
        silent.handle_timeout(t0 + Duration::from_secs(10));
        assert!(matches!(
            events(&mut silent)[..],
            [InEvent::Close {
                reason: CloseReason::ConnectTimeout,
                disconnect: None
            }]
        ));
    }

    #[test]
    fn topic_aliases_inbound() {
        let t0 = Instant::now();
        let mut m = Inbound::new(t0, ServerLimits::default());
        m.handle_bytes(t0, &connect_bytes(5, 0));
        events(&mut m);
        let publish = |topic: &str, alias: u16| {
            let p = Packet::Publish(Publish {
                topic: topic.into(),
                payload: bytes::Bytes::from_static(b"x"),
                properties: Properties {
                    topic_alias: Some(alias),
                    ..Properties::default()
                }
                .into(),
                ..Publish::default()
            });
            let mut out = Vec::new();
            encode(&p, Version::V5, &mut out).unwrap();
            out
        };
        m.handle_bytes(t0, &publish("a/b", 3));
        m.handle_bytes(t0, &publish("", 3));
        let topics: Vec<String> = events(&mut m)
            .into_iter()
            .map(|e| match e {
                InEvent::Packet(Packet::Publish(p)) => {
                    assert_eq!(p.properties.topic_alias, None, "alias is stripped");
                    p.topic
                }
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(topics, ["a/b", "a/b"]);
    }

    #[test]
    fn outbound_assigns_aliases_up_to_the_client_maximum() {
        let mut o = Outbound::new(Version::V5, 1);
        let mut encoded = Vec::new();
        for topic in ["t/1", "t/1", "t/2"] {
            let mut out = Vec::new();
            o.encode(
                Packet::Publish(Publish {
                    topic: topic.into(),
                    ..Publish::default()
                }),
                &mut out,
            );
            match decode(&out, Some(Version::V5), u32::MAX) {
                Ok(Some((Packet::Publish(p), _))) => {
                    encoded.push((p.topic, p.properties.topic_alias))
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            encoded,
            vec![
                ("t/1".to_owned(), Some(1)),
                (String::new(), Some(1)),
                ("t/2".to_owned(), None)
            ]
        );
    }
}
