//! The MQTT-SN gateway machine: an aggregating gateway into the hub, sans-IO.
//!
//! Each MQTT-SN client becomes a hub session on its own `ConnId`, beside MQTT sessions; there is
//! no TCP connection per client. The machine owns what MQTT has no word for: the will dialogue,
//! topic ids (registered, predefined, short), keep-alive and sleep timers, retransmission of
//! what the gateway sends, and forwarder encapsulation. Datagrams, hub packets and time come in;
//! datagrams and hub inputs go out (`Output`). The transport address type `A` is the adapter's.
//!
//! Flow towards a client is one message at a time: the hub session is opened with Receive
//! Maximum 1, and the machine sends the next PUBLISH or REGISTER only once the previous one is
//! acknowledged. What waits is held by the hub (QoS 1/2 durably, in the store, for a persistent
//! session) and in a small per-client queue here (`OUT_QUEUE`), which the adapter fills only
//! while `wants` says so. A sleeping client is simply one we stop sending to.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::codec::{self, rc, Flags, Message, SnQos, TopicRef};
use crate::hub::{ConnId, HubInput};
use crate::proto::mqtt::server::CloseReason;
use crate::proto::mqtt::{
    Ack, Connect, Packet, Props, Publish, QoS, SubOptions, Subscribe, Unsubscribe, Version, Will,
};
use crate::proto::topic;

/// Packets from the hub one client may hold here before the adapter stops pulling its link.
pub const OUT_QUEUE: usize = 32;
/// Topic ids one client may register; REGISTER beyond it is answered "congestion".
pub const MAX_TOPICS: usize = 1024;
/// The largest MQTT-SN message (3-byte length).
const MAX_MESSAGE: usize = 65_535;
/// A REGISTER's bytes besides the topic name: 3-byte length, type, topic id, msg id.
const REGISTER_OVERHEAD: usize = 8;
/// PUBLISH overhead with a 3-byte length: length, type, flags, topic id, msg id.
const PUBLISH_OVERHEAD: usize = 9;

/// A predefined topic id: for one client, or for every client when `client` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Predefined {
    pub id: u16,
    pub topic: String,
    pub client: Option<String>,
}

/// The gateway's settings.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    pub gateway_id: u8,
    pub predefined: Vec<Predefined>,
    /// T_retry: how long an unacknowledged REGISTER, PUBLISH or PUBREL waits before it is sent
    /// again.
    pub retry_interval: Duration,
    /// N_retry: how many times it is sent again before the client is taken as lost.
    pub retry_count: u32,
    /// T_ADV: ADVERTISE is sent this often (`Output::Broadcast`); `None` sends none.
    pub advertise: Option<Duration>,
    pub max_clients: usize,
    /// The first `ConnId` this gateway gives out; each transport takes its own range, apart
    /// from the MQTT listeners'.
    pub conn_base: ConnId,
    /// `[limits] max_topic_levels`: deeper names and filters are rejected at REGISTER,
    /// SUBSCRIBE and the will, before the hub would have to end the client for them.
    pub max_topic_levels: usize,
}

/// Every MQTT-SN gateway's connection ids are at or above this.
pub const SN_CONN_BASE: ConnId = 1 << 62;

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            gateway_id: 1,
            predefined: Vec::new(),
            retry_interval: Duration::from_secs(10),
            retry_count: 3,
            advertise: None,
            max_clients: 1000,
            conn_base: SN_CONN_BASE,
            max_topic_levels: 200,
        }
    }
}

/// Where a message came from, or goes to: the transport address and, behind a forwarder, the
/// wireless node id it put in ENCAPSULATED.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Peer<A> {
    pub addr: A,
    pub node: Option<Bytes>,
}

impl<A> Peer<A> {
    pub fn direct(addr: A) -> Self {
        Peer { addr, node: None }
    }
}

/// What the machine asks its adapter to do.
#[derive(Debug)]
pub enum Output<A> {
    /// Send this datagram (or serial frame).
    Send { to: A, data: Vec<u8> },
    /// Send this datagram to the ADVERTISE address.
    Broadcast(Vec<u8>),
    /// A new hub connection: register its link before the `Connect` input that follows.
    Attach(ConnId),
    /// Feed this to the hub.
    Hub(HubInput),
    /// The connection is gone: drop its link (after the `Closed` input that precedes this).
    Detach(ConnId),
    /// The client can take packets from the hub again: pull its link while `wants` says so.
    Pull(ConnId),
}

/// Counters the gateway keeps.
#[derive(Debug, Clone, Default)]
pub struct GatewayStats {
    pub received: u64,
    /// Datagrams that are not MQTT-SN (bad length, unknown type, cut short...).
    pub malformed: u64,
    /// Messages from an address with no connection, other than CONNECT, SEARCHGW, QoS -1.
    pub unknown_client: u64,
    /// QoS -1 publishes from a source not on the allow list, or on an unusable topic.
    pub refused_minus_one: u64,
    pub retransmitted: u64,
    /// Clients lost to keep-alive, sleep or retransmission timeouts.
    pub lost: u64,
    /// Messages from the hub too large for MQTT-SN.
    pub too_large: u64,
}

/// Where a client stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// CONNECT with the will flag: WILLTOPICREQ sent.
    WillTopic,
    /// WILLMSGREQ sent.
    WillMsg,
    /// The hub has the CONNECT; its CONNACK is awaited.
    Connecting,
    Active,
    /// DISCONNECT with a duration: nothing is sent until it wakes.
    Asleep,
    /// Woken by PINGREQ: what was buffered goes out, then PINGRESP, then asleep again.
    Awake,
}

/// The one message sent to a client that awaits its answer.
#[derive(Debug, Clone)]
enum Awaiting {
    /// REGISTER for `topic`; the PUBLISH that needed it stays first in the queue.
    Register { msg_id: u16, topic_id: u16 },
    /// PUBLISH at QoS 1 or 2.
    Publish { msg_id: u16, qos: QoS },
    /// PUBREC went to the hub; its PUBREL is awaited (no timer: the hub answers).
    HubRel { msg_id: u16 },
    /// PUBREL sent; PUBCOMP awaited.
    Comp { msg_id: u16 },
}

#[derive(Debug)]
struct Outstanding {
    what: Awaiting,
    /// What goes again on retransmission (DUP already set for a PUBLISH); `None` for
    /// `HubRel`, which is not retransmitted.
    resend: Option<Message>,
    sent_at: Instant,
    tries: u32,
}

/// The will being built or kept for a client.
#[derive(Debug, Clone, Default)]
struct WillDraft {
    topic: Option<(String, QoS, bool)>,
    payload: Bytes,
}

impl WillDraft {
    fn will(&self) -> Option<Will> {
        let (topic, qos, retain) = self.topic.clone()?;
        Some(Will {
            topic,
            payload: self.payload.clone(),
            qos,
            retain,
            properties: Props::default(),
        })
    }
}

#[derive(Debug)]
struct Client<A> {
    id: String,
    peer: Peer<A>,
    state: State,
    clean: bool,
    keep_alive: Duration,
    sleep: Duration,
    last_heard: Instant,
    will: WillDraft,
    /// Normal topic ids: both directions share them.
    by_id: HashMap<u16, String>,
    by_name: HashMap<String, u16>,
    next_topic: u16,
    next_msg: u16,
    out: VecDeque<Packet>,
    awaiting: Option<Outstanding>,
    /// Inbound QoS 1 publishes whose PUBACK the hub will give: msg id to topic id bytes.
    inbound: HashMap<u16, [u8; 2]>,
    /// SUBSCRIBEs sent to the hub: msg id to the topic id SUBACK returns.
    subscribing: HashMap<u16, u16>,
    /// The earliest deadline pushed on the timer heap for this client.
    timer_at: Option<Instant>,
    /// A wake-up probe (PINGREQ) is with the hub.
    probing: bool,
}

impl<A> Client<A> {
    fn deadline(&self, retry: Duration) -> Option<Instant> {
        let alive = match self.state {
            State::Asleep | State::Awake => Some(self.last_heard + scaled(self.sleep)),
            _ if self.keep_alive.is_zero() => None,
            _ => Some(self.last_heard + scaled(self.keep_alive)),
        };
        let retry = match (&self.awaiting, self.state) {
            (_, State::Asleep) => None,
            (Some(o), _) if !matches!(o.what, Awaiting::HubRel { .. }) => Some(o.sent_at + retry),
            _ => None,
        };
        match (alive, retry) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn sendable(&self) -> bool {
        matches!(self.state, State::Active | State::Awake)
    }

    fn topic_ref(&self, name: &str, predefined: &[Predefined]) -> Option<TopicRef> {
        if let Some(p) = find_predefined_by_name(predefined, &self.id, name) {
            return Some(TopicRef::Predefined(p));
        }
        if let &[a, b] = name.as_bytes() {
            return Some(TopicRef::Short([a, b]));
        }
        self.by_name.get(name).map(|&id| TopicRef::Id(id))
    }

    /// Gives `name` a topic id, or the one it has. `None` when the table is full.
    fn register(&mut self, name: &str) -> Option<u16> {
        if let Some(&id) = self.by_name.get(name) {
            return Some(id);
        }
        if self.by_id.len() >= MAX_TOPICS {
            return None;
        }
        loop {
            self.next_topic = self.next_topic.wrapping_add(1);
            // 0x0000 and 0xFFFF are reserved [5.3.11].
            if self.next_topic != 0
                && self.next_topic != 0xFFFF
                && !self.by_id.contains_key(&self.next_topic)
            {
                break;
            }
        }
        self.by_id.insert(self.next_topic, name.to_owned());
        self.by_name.insert(name.to_owned(), self.next_topic);
        Some(self.next_topic)
    }

    fn msg_id(&mut self) -> u16 {
        self.next_msg = self.next_msg.wrapping_add(1).max(1);
        self.next_msg
    }
}

/// The spec's tolerance on keep-alive and sleep durations: 1.5 times, as MQTT.
fn scaled(d: Duration) -> Duration {
    d + d / 2
}

fn find_predefined_by_name(p: &[Predefined], client: &str, name: &str) -> Option<u16> {
    p.iter()
        .filter(|p| p.topic == name)
        .filter(|p| p.client.as_deref().map_or(true, |c| c == client))
        // A client's own definition wins over one for every client.
        .max_by_key(|p| p.client.is_some())
        .map(|p| p.id)
}

fn find_predefined_by_id<'a>(
    p: &'a [Predefined],
    client: Option<&str>,
    id: u16,
) -> Option<&'a str> {
    p.iter()
        .filter(|p| p.id == id)
        .filter(|p| match (&p.client, client) {
            (None, _) => true,
            (Some(c), Some(me)) => c == me,
            (Some(_), None) => false,
        })
        .max_by_key(|p| p.client.is_some())
        .map(|p| p.topic.as_str())
}

fn sn_qos(q: QoS) -> SnQos {
    match q {
        QoS::AtMostOnce => SnQos::Zero,
        QoS::AtLeastOnce => SnQos::One,
        QoS::ExactlyOnce => SnQos::Two,
    }
}

fn mqtt_qos(q: SnQos) -> QoS {
    match q {
        SnQos::Zero | SnQos::MinusOne => QoS::AtMostOnce,
        SnQos::One => QoS::AtLeastOnce,
        SnQos::Two => QoS::ExactlyOnce,
    }
}

/// Whether `t` has at most `max` levels.
fn within(t: &str, max: usize) -> bool {
    t.split('/').nth(max).is_none()
}

/// A v5 reason code from the hub as an MQTT-SN return code.
fn sn_rc(reason: u8) -> u8 {
    match reason {
        r if r < 0x80 => rc::ACCEPTED,
        // Quota exceeded (the store is full), server busy, unavailable: try later.
        0x97 | 0x89 | 0x88 => rc::CONGESTION,
        _ => rc::NOT_SUPPORTED,
    }
}

fn topic_name(t: &TopicRef) -> Option<String> {
    match t {
        TopicRef::Short(s) => std::str::from_utf8(s).ok().map(str::to_owned),
        TopicRef::Name(n) => Some(n.clone()),
        _ => None,
    }
}

/// The gateway.
pub struct Gateway<A> {
    cfg: GatewayConfig,
    /// `cfg.predefined`, shared so that it can be read while a client is borrowed.
    predefined: Arc<[Predefined]>,
    clients: HashMap<ConnId, Client<A>>,
    by_peer: HashMap<Peer<A>, ConnId>,
    by_client_id: HashMap<String, ConnId>,
    /// Wills of persistent-session clients that went away normally: a CONNECT with neither
    /// clean session nor will flag keeps its will [6.3]. Bounded by `max_clients`.
    kept_wills: HashMap<String, WillDraft>,
    timers: BinaryHeap<Reverse<(Instant, ConnId)>>,
    next_conn: ConnId,
    next_advertise: Option<Instant>,
    out: VecDeque<Output<A>>,
    stats: GatewayStats,
}

impl<A: Clone + Eq + Hash + Debug> Gateway<A> {
    pub fn new(now: Instant, cfg: GatewayConfig) -> Self {
        let next_advertise = cfg.advertise.map(|_| now);
        Gateway {
            next_conn: cfg.conn_base,
            predefined: cfg.predefined.clone().into(),
            cfg,
            clients: HashMap::new(),
            by_peer: HashMap::new(),
            by_client_id: HashMap::new(),
            kept_wills: HashMap::new(),
            timers: BinaryHeap::new(),
            next_advertise,
            out: VecDeque::new(),
            stats: GatewayStats::default(),
        }
    }

    pub fn stats(&self) -> &GatewayStats {
        &self.stats
    }

    /// Clients by where they stand: (connected and awake, asleep, woken and draining).
    pub fn census(&self) -> (usize, usize, usize) {
        let mut c = (0, 0, 0);
        for client in self.clients.values() {
            match client.state {
                State::Asleep => c.1 += 1,
                State::Awake => c.2 += 1,
                _ => c.0 += 1,
            }
        }
        c
    }

    /// Clients with a session here (connecting, active or asleep).
    pub fn clients(&self) -> usize {
        self.clients.len()
    }

    /// The next thing for the adapter to do.
    pub fn poll_output(&mut self) -> Option<Output<A>> {
        self.out.pop_front()
    }

    /// Whether the adapter should hand this client's next hub packet to `handle_hub`.
    pub fn wants(&self, conn: ConnId) -> bool {
        self.clients
            .get(&conn)
            .is_some_and(|c| c.out.len() < OUT_QUEUE)
    }

    /// When `handle_timeout` must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.timers.peek().map(|Reverse((t, _))| *t);
        match (t, self.next_advertise) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn send(&mut self, peer: &Peer<A>, m: Message) {
        let m = match &peer.node {
            Some(node) => Message::Encapsulated {
                radius: 1,
                node: node.clone(),
                inner: Box::new(m),
            },
            None => m,
        };
        let mut data = Vec::new();
        if codec::encode(&m, &mut data).is_err() {
            // Callers check sizes first; this is the last guard against a clipped length.
            self.stats.too_large += 1;
            return;
        }
        self.out.push_back(Output::Send {
            to: peer.addr.clone(),
            data,
        });
    }

    fn hub(&mut self, input: HubInput) {
        self.out.push_back(Output::Hub(input));
    }

    fn arm(&mut self, conn: ConnId) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        let Some(d) = c.deadline(self.cfg.retry_interval) else {
            return;
        };
        if c.timer_at.map_or(true, |t| d < t) {
            c.timer_at = Some(d);
            self.timers.push(Reverse((d, conn)));
        }
    }

    /// One datagram from `from`. `minus_one_allowed` says whether `from` is on the QoS -1
    /// allow list.
    pub fn handle_datagram(&mut self, now: Instant, from: A, data: &[u8], minus_one_allowed: bool) {
        self.stats.received += 1;
        let msg = match codec::decode(data) {
            Ok(m) => m,
            Err(e) => {
                self.stats.malformed += 1;
                tracing::debug!(peer = ?from, error = %e, "dropping malformed MQTT-SN datagram");
                return;
            }
        };
        let (peer, msg) = match msg {
            Message::Encapsulated { node, inner, .. } => (
                Peer {
                    addr: from,
                    node: Some(node),
                },
                *inner,
            ),
            m => (Peer::direct(from), m),
        };
        self.handle_message(now, peer, msg, minus_one_allowed);
    }

    fn handle_message(&mut self, now: Instant, peer: Peer<A>, msg: Message, minus_one: bool) {
        match msg {
            Message::SearchGw { .. } => {
                let gw_id = self.cfg.gateway_id;
                self.send(
                    &peer,
                    Message::GwInfo {
                        gw_id,
                        address: Bytes::new(),
                    },
                );
                return;
            }
            Message::Advertise { .. } | Message::GwInfo { .. } => return,
            Message::Connect {
                flags,
                duration,
                client_id,
            } => return self.on_connect(now, peer, flags, duration, client_id),
            Message::Publish {
                flags, topic, data, ..
            } if flags.qos == SnQos::MinusOne => {
                return self.on_minus_one(peer, flags, topic, data, minus_one)
            }
            Message::PingReq {
                client_id: Some(ref id),
            } => {
                if let Some(&conn) = self.by_client_id.get(id) {
                    return self.on_wake(now, conn, peer);
                }
            }
            _ => {}
        }
        let Some(&conn) = self.by_peer.get(&peer) else {
            self.stats.unknown_client += 1;
            tracing::debug!(
                ?peer,
                msg = msg.name(),
                "message from an unconnected address"
            );
            // Tell it to connect again (after a gateway restart, say), unless it is saying
            // goodbye or is a stranger's keep-alive ping. A sleeping client waking with its
            // client id is told too: we no longer know it.
            if !matches!(
                msg,
                Message::Disconnect { .. } | Message::PingReq { client_id: None }
            ) {
                self.send(&peer, Message::Disconnect { duration: None });
            }
            return;
        };
        if let Some(c) = self.clients.get_mut(&conn) {
            c.last_heard = now;
        }
        self.on_client_message(now, conn, msg);
        self.flush(now, conn);
        self.arm(conn);
    }

    fn on_connect(&mut self, now: Instant, peer: Peer<A>, flags: Flags, duration: u16, id: String) {
        // Resume a sleeping (or live) session that keeps everything: same hub connection, and
        // what was buffered goes out after CONNACK [6.14].
        if let Some(&conn) = self.by_client_id.get(&id) {
            let resumable = !flags.clean_session
                && !flags.will
                && self.clients.get(&conn).is_some_and(|c| {
                    matches!(c.state, State::Active | State::Asleep | State::Awake)
                });
            if resumable {
                self.move_peer(conn, peer.clone());
                if let Some(c) = self.clients.get_mut(&conn) {
                    c.state = State::Active;
                    c.keep_alive = Duration::from_secs(duration as u64);
                    c.last_heard = now;
                    if let Some(o) = c.awaiting.as_mut() {
                        // Whatever was unacknowledged when it slept goes again now.
                        o.sent_at = now - self.cfg.retry_interval;
                    }
                }
                self.send(&peer, Message::ConnAck { rc: rc::ACCEPTED });
                self.flush(now, conn);
                self.arm(conn);
                return;
            }
            // Otherwise the old connection ends normally (the client is evidently alive, so no
            // will) and a new one starts; the hub keeps a persistent session for it.
            self.end(
                conn,
                CloseReason::Disconnect {
                    with_will: false,
                    session_expiry: None,
                },
            );
        }
        if let Some(&old) = self.by_peer.get(&peer) {
            // A new client id from an address that had another: that one is gone.
            self.end(old, CloseReason::ConnectionLost);
        }
        if self.clients.len() >= self.cfg.max_clients {
            tracing::warn!(client = %id, "MQTT-SN client limit reached; CONNECT refused");
            self.send(&peer, Message::ConnAck { rc: rc::CONGESTION });
            return;
        }
        let will = if flags.clean_session || flags.will {
            self.kept_wills.remove(&id);
            WillDraft::default()
        } else {
            self.kept_wills.remove(&id).unwrap_or_default()
        };
        let conn = self.next_conn;
        self.next_conn += 1;
        let client = Client {
            id: id.clone(),
            peer: peer.clone(),
            state: if flags.will {
                State::WillTopic
            } else {
                State::Connecting
            },
            clean: flags.clean_session,
            keep_alive: Duration::from_secs(duration as u64),
            sleep: Duration::ZERO,
            last_heard: now,
            will,
            by_id: HashMap::new(),
            by_name: HashMap::new(),
            next_topic: 0,
            next_msg: 0,
            out: VecDeque::new(),
            awaiting: None,
            inbound: HashMap::new(),
            subscribing: HashMap::new(),
            timer_at: None,
            probing: false,
        };
        self.clients.insert(conn, client);
        self.by_peer.insert(peer.clone(), conn);
        self.by_client_id.insert(id, conn);
        if flags.will {
            self.send(&peer, Message::WillTopicReq);
        } else {
            self.connect_hub(conn);
        }
        self.arm(conn);
    }

    fn connect_hub(&mut self, conn: ConnId) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        c.state = State::Connecting;
        let mut props = Props::default();
        // The session outlives the connection exactly when clean session is off.
        props.session_expiry_interval = Some(if c.clean { 0 } else { u32::MAX });
        // One QoS 1/2 message in flight towards the client; the rest wait in the hub.
        props.receive_maximum = Some(1);
        props.maximum_packet_size = Some(MAX_MESSAGE as u32);
        let keep_alive = c.keep_alive.as_secs().min(u16::MAX as u64) as u16;
        let connect = Connect {
            version: Version::V5,
            clean_start: c.clean,
            keep_alive,
            client_id: c.id.clone(),
            will: c.will.will(),
            // MQTT-SN has no user names, and a client id proves nothing: a sensor is
            // `sn:<client id>` to the ACL (`user sn:<id>`, `%u`), a namespace no login reaches.
            username: Some(format!("sn:{}", c.id)),
            password: None,
            properties: props,
        };
        self.out.push_back(Output::Attach(conn));
        self.hub(HubInput::Connect {
            conn,
            connect: Box::new(connect),
            keep_alive,
        });
    }

    fn move_peer(&mut self, conn: ConnId, peer: Peer<A>) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        if c.peer == peer {
            return;
        }
        let old = std::mem::replace(&mut c.peer, peer.clone());
        self.by_peer.remove(&old);
        if let Some(other) = self.by_peer.insert(peer, conn) {
            if other != conn {
                // Another client was at that address: it is gone. (`end` leaves the address
                // to us: it removes only entries that still point at `other`.)
                self.end(other, CloseReason::ConnectionLost);
            }
        }
    }

    /// Takes a client out of every index. An address or client id that has since moved to
    /// another connection keeps pointing there.
    fn unmap(&mut self, conn: ConnId) -> Option<Client<A>> {
        let c = self.clients.remove(&conn)?;
        if self.by_peer.get(&c.peer) == Some(&conn) {
            self.by_peer.remove(&c.peer);
        }
        if self.by_client_id.get(&c.id) == Some(&conn) {
            self.by_client_id.remove(&c.id);
        }
        Some(c)
    }

    /// Ends a client's connection here and in the hub.
    fn end(&mut self, conn: ConnId, reason: CloseReason) {
        let Some(c) = self.unmap(conn) else {
            return;
        };
        let normal = matches!(reason, CloseReason::Disconnect { .. });
        if normal && !c.clean && c.will.topic.is_some() {
            if self.kept_wills.len() >= self.cfg.max_clients {
                // Bounded: forget an arbitrary one rather than grow.
                if let Some(k) = self.kept_wills.keys().next().cloned() {
                    self.kept_wills.remove(&k);
                }
            }
            self.kept_wills.insert(c.id.clone(), c.will.clone());
        }
        if c.state != State::WillTopic && c.state != State::WillMsg {
            self.hub(HubInput::Closed {
                conn,
                reason,
                notify: None,
            });
        }
        self.out.push_back(Output::Detach(conn));
    }

    fn lose(&mut self, conn: ConnId, why: &str) {
        if let Some(c) = self.clients.get(&conn) {
            tracing::info!(client = %c.id, "MQTT-SN client lost: {why}");
            self.stats.lost += 1;
        }
        self.end(conn, CloseReason::KeepAliveTimeout);
    }

    fn on_wake(&mut self, now: Instant, conn: ConnId, peer: Peer<A>) {
        self.move_peer(conn, peer.clone());
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        c.last_heard = now;
        match c.state {
            State::Asleep | State::Awake => {
                c.state = State::Awake;
                if let Some(o) = c.awaiting.as_mut() {
                    o.sent_at = now - self.cfg.retry_interval;
                }
                if !c.probing {
                    c.probing = true;
                    // PINGRESP comes back through the link after everything queued before it.
                    self.hub(HubInput::Packet {
                        conn,
                        packet: Packet::PingReq,
                    });
                }
                self.flush(now, conn);
            }
            _ => {
                let p = c.peer.clone();
                self.send(&p, Message::PingResp);
            }
        }
        self.arm(conn);
    }

    fn on_minus_one(
        &mut self,
        peer: Peer<A>,
        flags: Flags,
        topic: TopicRef,
        data: Bytes,
        ok: bool,
    ) {
        let name = match &topic {
            TopicRef::Predefined(id) => {
                find_predefined_by_id(&self.predefined, None, *id).map(str::to_owned)
            }
            TopicRef::Short(_) => topic_name(&topic),
            _ => None,
        };
        let Some(name) = name.filter(|_| ok) else {
            self.stats.refused_minus_one += 1;
            tracing::debug!(?peer, allowed = ok, "QoS -1 publish refused");
            return;
        };
        self.hub(HubInput::Unconnected(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain: flags.retain,
            topic: name,
            packet_id: 0,
            payload: data,
            properties: Props::default(),
        }));
    }

    fn on_client_message(&mut self, now: Instant, conn: ConnId, msg: Message) {
        let predefined = self.predefined.clone();
        let depth = self.cfg.max_topic_levels;
        let name_ok = |t: &str| topic::validate_name(t).is_ok() && within(t, depth);
        let filter_ok = |t: &str| topic::validate_filter(t).is_ok() && within(t, depth);
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        let peer = c.peer.clone();
        match msg {
            Message::WillTopic(t) if c.state == State::WillTopic => match t {
                Some((f, topic)) if name_ok(&topic) => {
                    c.will.topic = Some((topic, mqtt_qos(f.qos), f.retain));
                    c.state = State::WillMsg;
                    self.send(&peer, Message::WillMsgReq);
                }
                Some(_) => {
                    self.send(
                        &peer,
                        Message::ConnAck {
                            rc: rc::NOT_SUPPORTED,
                        },
                    );
                    self.end(conn, CloseReason::ConnectionLost);
                }
                // The empty WILLTOPIC: no will after all.
                None => {
                    c.will = WillDraft::default();
                    self.connect_hub(conn);
                }
            },
            Message::WillMsg(payload) if c.state == State::WillMsg => {
                c.will.payload = payload;
                self.connect_hub(conn);
            }
            Message::WillTopicUpd(t) => {
                let ok = match t {
                    None => {
                        c.will = WillDraft::default();
                        true
                    }
                    Some((f, topic)) if name_ok(&topic) => {
                        c.will.topic = Some((topic, mqtt_qos(f.qos), f.retain));
                        true
                    }
                    Some(_) => false,
                };
                let will = c.will.will();
                let rc = if ok { rc::ACCEPTED } else { rc::NOT_SUPPORTED };
                self.send(&peer, Message::WillTopicResp { rc });
                if ok {
                    self.hub(HubInput::SetWill { conn, will });
                }
            }
            Message::WillMsgUpd(payload) => {
                c.will.payload = payload;
                let will = c.will.will();
                self.send(&peer, Message::WillMsgResp { rc: rc::ACCEPTED });
                if will.is_some() {
                    self.hub(HubInput::SetWill { conn, will });
                }
            }
            Message::Register { msg_id, topic, .. } => {
                let (topic_id, code) = if !name_ok(&topic) {
                    (0, rc::NOT_SUPPORTED)
                } else {
                    match c.register(&topic) {
                        Some(id) => (id, rc::ACCEPTED),
                        None => (0, rc::CONGESTION),
                    }
                };
                self.send(
                    &peer,
                    Message::RegAck {
                        topic_id,
                        msg_id,
                        rc: code,
                    },
                );
            }
            Message::RegAck {
                msg_id, rc: code, ..
            } => {
                let Some(Outstanding {
                    what:
                        Awaiting::Register {
                            msg_id: m,
                            topic_id,
                        },
                    ..
                }) = c.awaiting
                else {
                    return;
                };
                if m != msg_id {
                    return;
                }
                c.awaiting = None;
                if code != rc::ACCEPTED {
                    // The client will not take this topic: the message is dropped (and
                    // acknowledged to the hub, so it is not offered again).
                    if let Some(name) = c.by_id.remove(&topic_id) {
                        c.by_name.remove(&name);
                    }
                    if let Some(Packet::Publish(p)) = c.out.pop_front() {
                        tracing::info!(client = %c.id, topic = %p.topic, rc = code, "client refused REGISTER; message dropped");
                        self.give_up(conn, &p);
                    }
                }
            }
            Message::Publish {
                flags,
                topic,
                msg_id,
                data,
            } => {
                let qos = mqtt_qos(flags.qos);
                let id_bytes = topic.id_bytes();
                let name = match &topic {
                    TopicRef::Id(id) => c.by_id.get(id).cloned(),
                    TopicRef::Predefined(id) => {
                        find_predefined_by_id(&predefined, Some(&c.id), *id).map(str::to_owned)
                    }
                    TopicRef::Short(_) => topic_name(&topic),
                    TopicRef::Name(_) => None,
                };
                let Some(name) = name else {
                    self.send(
                        &peer,
                        Message::PubAck {
                            topic_id: id_bytes,
                            msg_id,
                            rc: rc::INVALID_TOPIC_ID,
                        },
                    );
                    return;
                };
                if qos != QoS::AtMostOnce && msg_id == 0 {
                    // MQTT has no packet id 0; the hub could not track it.
                    self.send(
                        &peer,
                        Message::PubAck {
                            topic_id: id_bytes,
                            msg_id,
                            rc: rc::NOT_SUPPORTED,
                        },
                    );
                    return;
                }
                if qos == QoS::AtLeastOnce {
                    c.inbound.insert(msg_id, id_bytes);
                }
                self.hub(HubInput::Packet {
                    conn,
                    packet: Packet::Publish(Publish {
                        dup: flags.dup,
                        qos,
                        retain: flags.retain,
                        topic: name,
                        packet_id: if qos == QoS::AtMostOnce { 0 } else { msg_id },
                        payload: data,
                        properties: Props::default(),
                    }),
                });
            }
            Message::PubAck {
                msg_id, rc: code, ..
            } => {
                let Some(Awaiting::Publish {
                    msg_id: m,
                    qos: QoS::AtLeastOnce,
                }) = c.awaiting.as_ref().map(|o| o.what.clone())
                else {
                    return;
                };
                if m != msg_id {
                    return;
                }
                if code == rc::CONGESTION {
                    // The client cannot take it now: the retry timer sends it again.
                    return;
                }
                c.awaiting = None;
                if code == rc::INVALID_TOPIC_ID {
                    // It forgot our topic id: the hub delivers the message again after a
                    // fresh REGISTER (a negative PUBACK is not a delivery).
                    c.by_id.clear();
                    c.by_name.clear();
                }
                self.hub(HubInput::Packet {
                    conn,
                    packet: Packet::PubAck(Ack {
                        packet_id: msg_id,
                        ..Ack::default()
                    }),
                });
            }
            Message::PubRec { msg_id } => {
                match c.awaiting.as_ref().map(|o| o.what.clone()) {
                    Some(Awaiting::Publish {
                        msg_id: m,
                        qos: QoS::ExactlyOnce,
                    }) if m == msg_id => {
                        c.awaiting = Some(Outstanding {
                            what: Awaiting::HubRel { msg_id },
                            resend: None,
                            sent_at: now,
                            tries: 0,
                        });
                        self.hub(HubInput::Packet {
                            conn,
                            packet: Packet::PubRec(Ack {
                                packet_id: msg_id,
                                ..Ack::default()
                            }),
                        });
                    }
                    // A repeat after our PUBREL was lost: send it again.
                    Some(Awaiting::Comp { msg_id: m }) if m == msg_id => {
                        self.send(&peer, Message::PubRel { msg_id });
                    }
                    _ => {}
                }
            }
            Message::PubComp { msg_id } => {
                if matches!(c.awaiting.as_ref().map(|o| &o.what), Some(Awaiting::Comp { msg_id: m }) if *m == msg_id)
                {
                    c.awaiting = None;
                    self.hub(HubInput::Packet {
                        conn,
                        packet: Packet::PubComp(Ack {
                            packet_id: msg_id,
                            ..Ack::default()
                        }),
                    });
                }
            }
            // The client's PUBREL for its own QoS 2 message: the hub answers PUBCOMP.
            Message::PubRel { msg_id } => self.hub(HubInput::Packet {
                conn,
                packet: Packet::PubRel(Ack {
                    packet_id: msg_id,
                    ..Ack::default()
                }),
            }),
            Message::Subscribe {
                flags,
                msg_id,
                topic,
            } => {
                let suback = |rc| Message::SubAck {
                    flags: Flags::default(),
                    topic_id: 0,
                    msg_id,
                    rc,
                };
                let (filter, topic_id) = match &topic {
                    TopicRef::Name(f) => {
                        if !filter_ok(f) || f.starts_with("$share/") {
                            return self.send(&peer, suback(rc::NOT_SUPPORTED));
                        }
                        // A plain name gets its topic id now, returned in SUBACK; a filter
                        // with wildcards gets 0 and a REGISTER before each new topic.
                        let id = if f.contains(['+', '#']) {
                            0
                        } else {
                            match c.register(f) {
                                Some(id) => id,
                                None => return self.send(&peer, suback(rc::CONGESTION)),
                            }
                        };
                        (f.clone(), id)
                    }
                    TopicRef::Predefined(id) => {
                        match find_predefined_by_id(&predefined, Some(&c.id), *id) {
                            Some(name) => (name.to_owned(), *id),
                            None => return self.send(&peer, suback(rc::INVALID_TOPIC_ID)),
                        }
                    }
                    TopicRef::Short(_) => match topic_name(&topic) {
                        Some(n) if filter_ok(&n) => (n, 0),
                        _ => return self.send(&peer, suback(rc::NOT_SUPPORTED)),
                    },
                    TopicRef::Id(_) => return self.send(&peer, suback(rc::INVALID_TOPIC_ID)),
                };
                if msg_id == 0 {
                    return self.send(&peer, suback(rc::NOT_SUPPORTED));
                }
                c.subscribing.insert(msg_id, topic_id);
                let qos = match flags.qos {
                    SnQos::MinusOne => QoS::AtMostOnce,
                    q => mqtt_qos(q),
                };
                self.hub(HubInput::Packet {
                    conn,
                    packet: Packet::Subscribe(Subscribe {
                        packet_id: msg_id,
                        filters: vec![(
                            filter,
                            SubOptions {
                                qos,
                                ..SubOptions::default()
                            },
                        )],
                        properties: Props::default(),
                    }),
                });
            }
            Message::Unsubscribe { msg_id, topic, .. } => {
                let filter = match &topic {
                    TopicRef::Predefined(id) => {
                        find_predefined_by_id(&predefined, Some(&c.id), *id).map(str::to_owned)
                    }
                    t => topic_name(t),
                };
                match filter {
                    Some(f) if msg_id != 0 => self.hub(HubInput::Packet {
                        conn,
                        packet: Packet::Unsubscribe(Unsubscribe {
                            packet_id: msg_id,
                            filters: vec![f],
                            properties: Props::default(),
                        }),
                    }),
                    // Nothing to unsubscribe from: done.
                    _ => self.send(&peer, Message::UnsubAck { msg_id }),
                }
            }
            Message::PingReq { .. } => {
                if c.state == State::Active || c.state == State::Connecting {
                    self.send(&peer, Message::PingResp);
                }
            }
            Message::Disconnect { duration: Some(d) } if d > 0 && c.state != State::Connecting => {
                c.state = State::Asleep;
                c.sleep = Duration::from_secs(d as u64);
                c.probing = false;
                self.send(&peer, Message::Disconnect { duration: None });
            }
            Message::Disconnect { .. } => {
                self.send(&peer, Message::Disconnect { duration: None });
                self.end(
                    conn,
                    CloseReason::Disconnect {
                        with_will: false,
                        session_expiry: None,
                    },
                );
            }
            other => {
                tracing::debug!(client = %c.id, msg = other.name(), "unexpected MQTT-SN message ignored");
            }
        }
    }

    /// Acknowledges to the hub a message the client will never get, so it is not retried.
    fn give_up(&mut self, conn: ConnId, p: &Publish) {
        let ack = Ack {
            packet_id: p.packet_id,
            reason: 0x80,
            properties: Props::default(),
        };
        match p.qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.hub(HubInput::Packet {
                conn,
                packet: Packet::PubAck(ack),
            }),
            // A failure PUBREC ends a QoS 2 exchange.
            QoS::ExactlyOnce => self.hub(HubInput::Packet {
                conn,
                packet: Packet::PubRec(ack),
            }),
        }
        self.out.push_back(Output::Pull(conn));
    }

    /// One packet from the hub for `conn`.
    pub fn handle_hub(&mut self, now: Instant, conn: ConnId, packet: Packet) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        let peer = c.peer.clone();
        match packet {
            Packet::ConnAck(a) => {
                if c.state != State::Connecting {
                    return;
                }
                if a.code >= 0x80 {
                    self.send(&peer, Message::ConnAck { rc: sn_rc(a.code) });
                    // The hub closes its side; nothing more to tell it.
                    self.forget(conn);
                    return;
                }
                c.state = State::Active;
                c.last_heard = now;
                self.send(&peer, Message::ConnAck { rc: rc::ACCEPTED });
            }
            Packet::PubAck(a) => {
                let topic_id = c.inbound.remove(&a.packet_id).unwrap_or_default();
                self.send(
                    &peer,
                    Message::PubAck {
                        topic_id,
                        msg_id: a.packet_id,
                        rc: sn_rc(a.reason),
                    },
                );
            }
            Packet::PubRec(a) if a.reason < 0x80 => self.send(
                &peer,
                Message::PubRec {
                    msg_id: a.packet_id,
                },
            ),
            // MQTT-SN has no negative PUBREC: answer as PUBACK does.
            Packet::PubRec(a) => self.send(
                &peer,
                Message::PubAck {
                    topic_id: [0, 0],
                    msg_id: a.packet_id,
                    rc: sn_rc(a.reason),
                },
            ),
            Packet::PubComp(a) => self.send(
                &peer,
                Message::PubComp {
                    msg_id: a.packet_id,
                },
            ),
            Packet::PubRel(a) => {
                let promote = matches!(c.awaiting.as_ref().map(|o| &o.what), Some(Awaiting::HubRel { msg_id }) if *msg_id == a.packet_id);
                if promote {
                    c.awaiting = None;
                    self.send_rel(now, conn, a.packet_id);
                } else {
                    // A PUBREL resent after a reconnect: it takes its turn.
                    c.out.push_back(Packet::PubRel(a));
                }
            }
            Packet::SubAck(a) => {
                let topic_id = c.subscribing.remove(&a.packet_id).unwrap_or(0);
                let code = a.codes.first().copied().unwrap_or(0x80);
                let granted = QoS::from_bits(code).filter(|_| code < 0x80);
                let flags = Flags {
                    qos: granted.map(sn_qos).unwrap_or_default(),
                    ..Flags::default()
                };
                self.send(
                    &peer,
                    Message::SubAck {
                        flags,
                        topic_id: if granted.is_some() { topic_id } else { 0 },
                        msg_id: a.packet_id,
                        rc: if granted.is_some() {
                            rc::ACCEPTED
                        } else {
                            rc::NOT_SUPPORTED
                        },
                    },
                );
            }
            Packet::UnsubAck(a) => self.send(
                &peer,
                Message::UnsubAck {
                    msg_id: a.packet_id,
                },
            ),
            Packet::Publish(_) | Packet::PingResp => c.out.push_back(packet),
            Packet::Disconnect(_) => {
                // The hub ends the connection (takeover by an MQTT client, shutdown).
                self.send(&peer, Message::Disconnect { duration: None });
                self.forget(conn);
                return;
            }
            other => {
                tracing::debug!(
                    packet = other.name(),
                    "hub packet with no MQTT-SN form ignored"
                )
            }
        }
        self.flush(now, conn);
        self.arm(conn);
    }

    /// The hub closed `conn` (it sent its last packet before): forget the client.
    pub fn hub_closed(&mut self, conn: ConnId) {
        if let Some(c) = self.clients.get(&conn) {
            let peer = c.peer.clone();
            self.send(&peer, Message::Disconnect { duration: None });
            self.forget(conn);
        }
    }

    /// Removes a client the hub already let go of: the `Closed` input only tells the hub's
    /// task to drop the link.
    fn forget(&mut self, conn: ConnId) {
        if self.unmap(conn).is_none() {
            return;
        }
        self.hub(HubInput::Closed {
            conn,
            reason: CloseReason::ServerClosed,
            notify: None,
        });
        self.out.push_back(Output::Detach(conn));
    }

    fn send_rel(&mut self, now: Instant, conn: ConnId, msg_id: u16) {
        let Some(c) = self.clients.get_mut(&conn) else {
            return;
        };
        let peer = c.peer.clone();
        c.awaiting = Some(Outstanding {
            what: Awaiting::Comp { msg_id },
            resend: Some(Message::PubRel { msg_id }),
            sent_at: now,
            tries: 0,
        });
        self.send(&peer, Message::PubRel { msg_id });
    }

    /// Sends what the client's queue holds, while nothing awaits an answer.
    fn flush(&mut self, now: Instant, conn: ConnId) {
        let predefined = self.predefined.clone();
        let mut popped = false;
        loop {
            let Some(c) = self.clients.get_mut(&conn) else {
                return;
            };
            if !c.sendable() || c.awaiting.is_some() {
                break;
            }
            let Some(front) = c.out.front() else {
                break;
            };
            let peer = c.peer.clone();
            match front {
                Packet::PingResp => {
                    c.out.pop_front();
                    popped = true;
                    c.probing = false;
                    if c.state == State::Awake {
                        // Back to sleep for another period, counted from now.
                        c.state = State::Asleep;
                        c.last_heard = now;
                    }
                    self.send(&peer, Message::PingResp);
                }
                Packet::PubRel(a) => {
                    let msg_id = a.packet_id;
                    c.out.pop_front();
                    popped = true;
                    self.send_rel(now, conn, msg_id);
                }
                Packet::Publish(p) => {
                    let topic = c.topic_ref(&p.topic, &predefined);
                    // Too large for MQTT-SN, or a name its REGISTER could not carry: the message
                    // cannot reach this client at all.
                    if p.payload.len() + PUBLISH_OVERHEAD > MAX_MESSAGE
                        || (topic.is_none() && p.topic.len() + REGISTER_OVERHEAD > MAX_MESSAGE)
                    {
                        let Some(Packet::Publish(p)) = c.out.pop_front() else {
                            break;
                        };
                        self.stats.too_large += 1;
                        self.give_up(conn, &p);
                        popped = true;
                        continue;
                    }
                    let topic = match topic {
                        Some(t) => t,
                        None => {
                            let name = p.topic.clone();
                            let Some(topic_id) = c.register(&name) else {
                                let Some(Packet::Publish(p)) = c.out.pop_front() else {
                                    break;
                                };
                                tracing::warn!(client = %c.id, "topic id table full; message dropped");
                                self.give_up(conn, &p);
                                popped = true;
                                continue;
                            };
                            let msg_id = c.msg_id();
                            let m = Message::Register {
                                topic_id,
                                msg_id,
                                topic: name,
                            };
                            c.awaiting = Some(Outstanding {
                                what: Awaiting::Register { msg_id, topic_id },
                                resend: Some(m.clone()),
                                sent_at: now,
                                tries: 0,
                            });
                            self.send(&peer, m);
                            break;
                        }
                    };
                    let Some(Packet::Publish(p)) = c.out.pop_front() else {
                        break;
                    };
                    popped = true;
                    let msg = |dup| Message::Publish {
                        flags: Flags {
                            dup,
                            qos: sn_qos(p.qos),
                            retain: p.retain,
                            topic_id_type: match topic {
                                TopicRef::Predefined(_) => 1,
                                TopicRef::Short(_) => 2,
                                _ => 0,
                            },
                            ..Flags::default()
                        },
                        topic: topic.clone(),
                        msg_id: p.packet_id,
                        data: p.payload.clone(),
                    };
                    if p.qos != QoS::AtMostOnce {
                        let resend = Some(msg(true));
                        c.awaiting = Some(Outstanding {
                            what: Awaiting::Publish {
                                msg_id: p.packet_id,
                                qos: p.qos,
                            },
                            resend,
                            sent_at: now,
                            tries: 0,
                        });
                    }
                    self.send(&peer, msg(p.dup));
                }
                _ => {
                    c.out.pop_front();
                }
            }
        }
        if popped {
            self.out.push_back(Output::Pull(conn));
        }
    }

    /// Ends every client: the gateway is stopping. Each is told (DISCONNECT) and its hub
    /// connection closes as one the server closed.
    pub fn shutdown(&mut self) {
        let conns: Vec<ConnId> = self.clients.keys().copied().collect();
        for conn in conns {
            if let Some(peer) = self.clients.get(&conn).map(|c| c.peer.clone()) {
                self.send(&peer, Message::Disconnect { duration: None });
            }
            self.end(conn, CloseReason::ServerClosed);
        }
    }

    /// Retransmits, loses silent clients, and sends ADVERTISE.
    pub fn handle_timeout(&mut self, now: Instant) {
        if let (Some(at), Some(every)) = (self.next_advertise, self.cfg.advertise) {
            if at <= now {
                let duration = every.as_secs().min(u16::MAX as u64) as u16;
                let mut data = Vec::new();
                // Five bytes: always encodes.
                let _ = codec::encode(
                    &Message::Advertise {
                        gw_id: self.cfg.gateway_id,
                        duration,
                    },
                    &mut data,
                );
                self.out.push_back(Output::Broadcast(data));
                self.next_advertise = Some(now + every);
            }
        }
        while let Some(&Reverse((t, conn))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            let retry = self.cfg.retry_interval;
            let Some(c) = self.clients.get_mut(&conn) else {
                continue;
            };
            if c.timer_at != Some(t) {
                continue;
            }
            c.timer_at = None;
            let alive_until = match c.state {
                State::Asleep | State::Awake => Some(c.last_heard + scaled(c.sleep)),
                _ if c.keep_alive.is_zero() => None,
                _ => Some(c.last_heard + scaled(c.keep_alive)),
            };
            if alive_until.is_some_and(|d| d <= now) {
                let why = if c.state == State::Asleep {
                    "sleep duration ran out"
                } else {
                    "keep-alive ran out"
                };
                self.lose(conn, why);
                continue;
            }
            let mut resend = None;
            if c.sendable() {
                if let Some(o) = c.awaiting.as_mut() {
                    if !matches!(o.what, Awaiting::HubRel { .. }) && o.sent_at + retry <= now {
                        if o.tries >= self.cfg.retry_count {
                            self.lose(conn, "no answer to retransmissions");
                            continue;
                        }
                        o.tries += 1;
                        o.sent_at = now;
                        resend = o.resend.clone();
                    }
                }
            }
            if let Some(m) = resend {
                self.stats.retransmitted += 1;
                let peer = c.peer.clone();
                self.send(&peer, m);
            }
            self.arm(conn);
        }
    }
}

#[cfg(test)]
#[path = "gateway_tests.rs"]
mod tests;
