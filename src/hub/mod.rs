//! The hub: the one router every message passes through.
//!
//! Owns the session registry, the subscription tree, the retained index, wills and their delays,
//! and session expiry. It is sans-IO: inputs arrive as `HubInput` with the current `Instant`,
//! packets leave through an `Outlet`, and `poll_timeout` says when to call `handle_timeout`.
//! Acks for QoS 1/2 publishes are released by the hub after routing (never inline in a
//! connection), which is where the durable store's commit confirmation slots in.

pub mod message;
pub mod retained;
pub mod session;
pub mod tree;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::proto::mqtt::server::CloseReason;
use crate::proto::mqtt::{
    reason, Ack, ConnAck, Connect, Disconnect, Packet, Props, Publish, QoS, SubAck, Subscribe,
    UnsubAck, Unsubscribe, Version, Will,
};
use crate::proto::topic;
use message::{Message, Origin};
use session::{InflightState, PendingWill, Queued, Session, NEVER_EXPIRES};
use tree::{Match, Sub, SubscriptionTree};

pub use retained::RetainedIndex;

/// Identifies one network connection for the life of the process.
pub type ConnId = u64;

/// Limits and capabilities the hub applies and announces.
#[derive(Debug, Clone)]
pub struct HubConfig {
    /// Our Receive Maximum, and the cap on QoS 1/2 messages in flight towards each client.
    pub max_inflight: u16,
    /// Messages a session may hold beyond its inflight window.
    pub max_queued: usize,
    /// The Maximum Packet Size we announce (the listener enforces it).
    pub max_packet_size: u32,
    /// Topic aliases a client may use towards us (the listener enforces it).
    pub topic_alias_maximum: u16,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_inflight: 100,
            max_queued: 1000,
            max_packet_size: 1 << 20,
            topic_alias_maximum: 10,
        }
    }
}

/// Counters the hub keeps; `$SYS` and the status command read them.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub received: u64,
    pub sent: u64,
    pub dropped_queue_full: u64,
    pub dropped_too_large: u64,
    pub expired: u64,
}

/// Where the hub's packets go. The runtime implements it with bounded channels.
pub trait Outlet {
    /// Queues `packet` for `conn`. When the connection's queue is full the packet comes back,
    /// and the outlet must later deliver `HubInput::Ready(conn)` once there is room.
    fn try_send(&mut self, conn: ConnId, packet: Packet) -> Result<(), Packet>;
    /// Ends `conn` once what is queued, then `last` (a DISCONNECT) if given, is written.
    fn close(&mut self, conn: ConnId, last: Option<Packet>);
}

/// Something that happened on a connection.
#[derive(Debug)]
pub enum HubInput {
    /// A valid CONNECT arrived; `keep_alive` is the interval in force.
    Connect {
        conn: ConnId,
        connect: Box<Connect>,
        keep_alive: u16,
    },
    /// Any other packet from a connected client.
    Packet { conn: ConnId, packet: Packet },
    /// The connection is gone, or must go: `notify` is a DISCONNECT to write after whatever
    /// the hub already queued for it (so a CONNACK is never overtaken).
    Closed {
        conn: ConnId,
        reason: CloseReason,
        notify: Option<Packet>,
    },
    /// The connection's queue has room again after a refused `try_send`.
    Ready { conn: ConnId },
}

/// The router.
pub struct Hub {
    cfg: HubConfig,
    sessions: HashMap<Arc<str>, Session>,
    conns: HashMap<ConnId, Arc<str>>,
    subs: SubscriptionTree,
    retained: RetainedIndex,
    /// Will delays and session expiries. Entries are checked against the session when they
    /// fire, so a stale one costs nothing.
    timers: BinaryHeap<Reverse<(Instant, Arc<str>)>>,
    assigned_ids: u64,
    stats: Stats,
    matches: Vec<Match>,
}

impl Hub {
    pub fn new(cfg: HubConfig) -> Self {
        Hub {
            cfg,
            sessions: HashMap::new(),
            conns: HashMap::new(),
            subs: SubscriptionTree::default(),
            retained: RetainedIndex::default(),
            timers: BinaryHeap::new(),
            assigned_ids: 0,
            stats: Stats::default(),
            matches: Vec::new(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Clients with a live connection.
    pub fn connected(&self) -> usize {
        self.conns.len()
    }

    /// Sessions held, online or not.
    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    /// Retained messages held.
    pub fn retained(&self) -> usize {
        self.retained.len()
    }

    /// Feeds one input.
    pub fn handle(&mut self, now: Instant, input: HubInput, out: &mut dyn Outlet) {
        match input {
            HubInput::Connect {
                conn,
                connect,
                keep_alive,
            } => self.on_connect(now, conn, *connect, keep_alive, out),
            HubInput::Packet { conn, packet } => self.on_packet(now, conn, packet, out),
            HubInput::Closed {
                conn,
                reason,
                notify,
            } => {
                out.close(conn, notify);
                self.on_closed(now, conn, reason, out)
            }
            HubInput::Ready { conn } => {
                if let Some(s) = self
                    .conns
                    .get(&conn)
                    .and_then(|id| self.sessions.get_mut(id))
                {
                    s.pump(now, &self.cfg, &mut self.stats, out);
                }
            }
        }
    }

    /// When `handle_timeout` must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Publishes wills whose delay has passed and ends expired sessions.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut dyn Outlet) {
        while let Some(Reverse((t, _))) = self.timers.peek() {
            if *t > now {
                break;
            }
            let Some(Reverse((_, id))) = self.timers.pop() else {
                break;
            };
            let Some(s) = self.sessions.get_mut(&id) else {
                continue;
            };
            if s.conn.is_some() {
                continue;
            }
            if s.pending_will.as_ref().is_some_and(|w| w.due <= now) {
                if let Some(w) = s.pending_will.take() {
                    self.publish_will(now, &id, w.will, out);
                }
            }
            let expired = self
                .sessions
                .get(&id)
                .and_then(|s| s.expires_at)
                .is_some_and(|e| e <= now);
            if expired {
                self.end_session(now, &id, out);
            }
        }
    }

    /// Graceful shutdown: wills are published (the server, not the client, ends each
    /// connection), then every connection is closed with v5 reason 0x8B.
    pub fn shutdown(&mut self, now: Instant, out: &mut dyn Outlet) {
        let mut wills = Vec::new();
        for s in self.sessions.values_mut() {
            if let Some(w) = s.will.take() {
                wills.push((s.id.clone(), w));
            }
            if let Some(p) = s.pending_will.take() {
                wills.push((s.id.clone(), p.will));
            }
        }
        for (id, w) in wills {
            self.publish_will(now, &id, w, out);
        }
        for (conn, id) in self.conns.drain() {
            let v5 = self.sessions.get(&id).is_some_and(|s| s.version.is_v5());
            out.close(conn, v5.then(|| disconnect(reason::SERVER_SHUTTING_DOWN)));
        }
    }

    fn on_connect(
        &mut self,
        now: Instant,
        conn: ConnId,
        c: Connect,
        keep_alive: u16,
        out: &mut dyn Outlet,
    ) {
        let v = c.version;
        let refuse = |out: &mut dyn Outlet, code: u8| {
            let ack = ConnAck {
                code,
                ..ConnAck::default()
            };
            let _ = out.try_send(conn, Packet::ConnAck(ack));
            out.close(conn, None);
        };
        if c.properties.authentication_method.is_some() {
            // No enhanced authentication method is offered ([MQTT-4.12.0-1]).
            return refuse(out, reason::BAD_AUTHENTICATION_METHOD);
        }
        let mut assigned = None;
        let id: Arc<str> = if c.client_id.is_empty() {
            // [MQTT-3.1.3-8] 3.1.1 assigns an id only to a clean session; 3.1 never does.
            if v == Version::V31 || (v == Version::V311 && !c.clean_start) {
                let code = if v.is_v5() {
                    reason::CLIENT_ID_NOT_VALID
                } else {
                    reason::V3_IDENTIFIER_REJECTED
                };
                return refuse(out, code);
            }
            self.assigned_ids += 1;
            let id = format!(
                "outpost-auto-{:x}-{}",
                std::process::id(),
                self.assigned_ids
            );
            if v.is_v5() {
                assigned = Some(id.clone());
            }
            Arc::from(id)
        } else {
            Arc::from(c.client_id.as_str())
        };

        let mut present = false;
        let old_conn = self.sessions.get(&id).and_then(|s| s.conn);
        if let Some(old_conn) = old_conn {
            // Session takeover ([MQTT-3.1.4-3]): the old connection is closed by the server,
            // which counts as an abnormal close for its will and its session expiry.
            self.conns.remove(&old_conn);
            let v5 = self.sessions.get(&id).is_some_and(|s| s.version.is_v5());
            out.close(old_conn, v5.then(|| disconnect(reason::SESSION_TAKEN_OVER)));
            self.detach(now, &id, CloseReason::ServerClosed, out);
        }
        if c.clean_start {
            self.end_session(now, &id, out);
        } else if let Some(old) = self.sessions.get_mut(&id) {
            present = true;
            // A new connection before the will delay ran out: that will is never sent.
            old.pending_will = None;
        }

        let expiry = if v.is_v5() {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            NEVER_EXPIRES
        };
        let s = self
            .sessions
            .entry(id.clone())
            .or_insert_with(|| Session::new(id.clone(), v));
        s.conn = Some(conn);
        s.version = v;
        s.expiry = expiry;
        s.expires_at = None;
        s.will = c.will.clone();
        s.receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        s.max_packet = c.properties.maximum_packet_size.unwrap_or(u32::MAX);
        s.stalled = false;
        self.conns.insert(conn, id.clone());

        let mut props = Props::default();
        if v.is_v5() {
            props.receive_maximum = Some(self.cfg.max_inflight);
            props.maximum_packet_size = Some(self.cfg.max_packet_size);
            props.topic_alias_maximum = Some(self.cfg.topic_alias_maximum);
            props.assigned_client_identifier = assigned;
            if keep_alive != c.keep_alive {
                props.server_keep_alive = Some(keep_alive);
            }
        }
        let ack = ConnAck {
            // 3.1 has no session-present flag.
            session_present: present && v != Version::V31,
            code: reason::SUCCESS,
            properties: props,
        };
        s.control.push_back(Packet::ConnAck(ack));
        if present {
            s.queue_resends(now);
        }
        tracing::debug!(client = %id, conn, version = ?v, present, "client connected");
        s.pump(now, &self.cfg, &mut self.stats, out);
    }

    fn on_packet(&mut self, now: Instant, conn: ConnId, packet: Packet, out: &mut dyn Outlet) {
        let Some(id) = self.conns.get(&conn).cloned() else {
            return;
        };
        match packet {
            Packet::Publish(p) => self.on_publish(now, conn, &id, p, out),
            Packet::PubAck(a) => self.on_outbound_ack(now, &id, a, InflightState::AwaitAck, out),
            Packet::PubComp(a) => self.on_outbound_ack(now, &id, a, InflightState::AwaitComp, out),
            Packet::PubRec(a) => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return;
                };
                let code = match s.take_inflight(a.packet_id, InflightState::AwaitRec) {
                    // v5: a failure code on PUBREC ends the exchange ([MQTT-4.3.3-4] note).
                    Some(_) if a.reason >= 0x80 => None,
                    Some(mut f) => {
                        f.state = InflightState::AwaitComp;
                        s.inflight.push_back(f);
                        Some(reason::SUCCESS)
                    }
                    None => Some(reason::PACKET_ID_NOT_FOUND),
                };
                if let Some(code) = code {
                    let rel = Packet::PubRel(ack(a.packet_id, code, s.version));
                    self.control(now, conn, &id, rel, out);
                } else {
                    s.pump(now, &self.cfg, &mut self.stats, out);
                }
            }
            Packet::PubRel(a) => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return;
                };
                let code = if s.inbound_qos2.remove(&a.packet_id) {
                    reason::SUCCESS
                } else {
                    reason::PACKET_ID_NOT_FOUND
                };
                let comp = Packet::PubComp(ack(a.packet_id, code, s.version));
                self.control(now, conn, &id, comp, out);
            }
            Packet::Subscribe(sub) => self.on_subscribe(now, conn, &id, sub, out),
            Packet::Unsubscribe(u) => self.on_unsubscribe(now, conn, &id, u, out),
            other => tracing::debug!(client = %id, packet = other.name(), "ignored"),
        }
    }

    fn on_outbound_ack(
        &mut self,
        now: Instant,
        id: &Arc<str>,
        a: Ack,
        state: InflightState,
        out: &mut dyn Outlet,
    ) {
        if let Some(s) = self.sessions.get_mut(id) {
            // An unknown id is ignored: it may ack a message resent before a reconnect.
            s.take_inflight(a.packet_id, state);
            s.pump(now, &self.cfg, &mut self.stats, out);
        }
    }

    /// Sends a control packet to the session's connection, or drops the client if it has
    /// stopped reading.
    fn control(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: &Arc<str>,
        p: Packet,
        out: &mut dyn Outlet,
    ) {
        let Some(s) = self.sessions.get_mut(id) else {
            return;
        };
        if s.push_control(p) {
            if !s.stalled {
                s.pump(now, &self.cfg, &mut self.stats, out);
            }
        } else {
            tracing::warn!(client = %id, "client is not reading its acks; disconnecting");
            let dc = s
                .version
                .is_v5()
                .then(|| disconnect(reason::UNSPECIFIED_ERROR));
            out.close(conn, dc);
        }
    }

    fn violation(&mut self, conn: ConnId, id: &str, code: u8, why: &str, out: &mut dyn Outlet) {
        tracing::info!(client = %id, reason = code, "{why}; disconnecting");
        let v5 = self.sessions.get(id).is_some_and(|s| s.version.is_v5());
        out.close(conn, v5.then(|| disconnect(code)));
    }

    fn on_publish(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: &Arc<str>,
        p: Publish,
        out: &mut dyn Outlet,
    ) {
        let Some(s) = self.sessions.get(id) else {
            return;
        };
        let v = s.version;
        self.stats.received += 1;
        if p.qos == QoS::ExactlyOnce && s.inbound_qos2.contains(&p.packet_id) {
            // A resent QoS 2 PUBLISH we already routed: acknowledge, never deliver twice.
            let rec = Packet::PubRec(ack(p.packet_id, reason::SUCCESS, v));
            return self.control(now, conn, id, rec, out);
        }
        if p.qos == QoS::ExactlyOnce && s.inbound_qos2.len() >= self.cfg.max_inflight as usize {
            // QoS 1 acks go out immediately today, so only QoS 2 can pile up unacknowledged.
            return self.violation(
                conn,
                id,
                reason::RECEIVE_MAXIMUM_EXCEEDED,
                "client exceeded Receive Maximum",
                out,
            );
        }
        let mut code = reason::SUCCESS;
        if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            // [MQTT-3.3.2-4] the server MAY check: we do, and refuse it.
            code = reason::PAYLOAD_FORMAT_INVALID;
        } else {
            let (props, expires_at) = message::end_to_end(p.properties, now);
            let msg = Arc::new(Message {
                topic: p.topic,
                payload: p.payload,
                qos: p.qos,
                retain: p.retain,
                properties: props,
                origin: Origin::Client(id.clone()),
                received_at: now,
                expires_at,
            });
            if self.route(now, msg, out) == 0 && v.is_v5() {
                code = reason::NO_MATCHING_SUBSCRIBERS;
            }
        }
        let reply = match p.qos {
            QoS::AtMostOnce => return,
            QoS::AtLeastOnce => Packet::PubAck(ack(p.packet_id, code, v)),
            QoS::ExactlyOnce => {
                if code < 0x80 {
                    if let Some(s) = self.sessions.get_mut(id) {
                        s.inbound_qos2.insert(p.packet_id);
                    }
                }
                Packet::PubRec(ack(p.packet_id, code, v))
            }
        };
        self.control(now, conn, id, reply, out);
    }

    /// Routes one message: the retained update, then a copy to every matching session.
    /// Returns how many sessions it reached.
    pub fn route(&mut self, now: Instant, msg: Arc<Message>, out: &mut dyn Outlet) -> usize {
        if msg.retain {
            if msg.payload.is_empty() {
                self.retained.remove(&msg.topic);
            } else {
                self.retained.set(msg.clone());
            }
        }
        let mut matches = std::mem::take(&mut self.matches);
        matches.clear();
        let sessions = &self.sessions;
        self.subs.matches(
            &msg.topic,
            |c| sessions.get(c).is_some_and(|s| s.conn.is_some()),
            &mut matches,
        );
        let publisher = msg.origin.client();
        // One copy per session for its plain subscriptions, at the highest matching QoS and
        // with every matching subscription id ([MQTT-3.3.4-2], [MQTT-3.3.4-3]); each shared
        // subscription gets its own copy.
        let mut merged: Vec<(Arc<str>, Queued)> = Vec::with_capacity(matches.len());
        for m in matches.drain(..) {
            if m.sub.options.no_local && publisher == Some(&*m.client) {
                continue;
            }
            let qos = msg.qos.min(m.sub.options.qos);
            let retain = msg.retain && m.sub.options.retain_as_published;
            if !m.shared {
                if let Some((_, q)) = merged.iter_mut().find(|(c, _)| *c == m.client) {
                    q.qos = q.qos.max(qos);
                    q.retain |= retain;
                    q.sub_ids.extend(m.sub.id);
                    continue;
                }
            }
            let item = Queued {
                msg: msg.clone(),
                qos,
                retain,
                sub_ids: m.sub.id.into_iter().collect(),
            };
            merged.push((m.client, item));
        }
        self.matches = matches;
        let reached = merged.len();
        for (client, item) in merged {
            if let Some(s) = self.sessions.get_mut(&client) {
                s.enqueue(item, &self.cfg, &mut self.stats);
                if !s.stalled {
                    s.pump(now, &self.cfg, &mut self.stats, out);
                }
            }
        }
        reached
    }

    fn on_subscribe(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: &Arc<str>,
        sub: Subscribe,
        out: &mut dyn Outlet,
    ) {
        let Some(s) = self.sessions.get_mut(id) else {
            return;
        };
        let sub_id = sub.properties.subscription_identifiers.first().copied();
        let mut codes = Vec::with_capacity(sub.filters.len());
        let mut retained = Vec::new();
        for (raw, options) in &sub.filters {
            let Ok(parsed) = topic::parse_subscription(raw) else {
                // The decoder already refused invalid filters; this is only a guard.
                codes.push(reason::TOPIC_FILTER_INVALID);
                continue;
            };
            let entry = Sub {
                options: *options,
                id: sub_id,
            };
            let new = self
                .subs
                .insert(parsed.share_group, parsed.filter, id, entry);
            s.subs.insert(raw.clone(), entry);
            codes.push(options.qos as u8);
            let send_retained = match options.retain_handling {
                0 => true,
                1 => new,
                _ => false,
            };
            // Retained messages are not sent for shared subscriptions ([MQTT-4.8.2-…]).
            if send_retained && parsed.share_group.is_none() {
                retained.clear();
                self.retained.matching(parsed.filter, &mut retained);
                for m in retained.drain(..) {
                    if m.expired(now) {
                        continue;
                    }
                    let item = Queued {
                        qos: m.qos.min(options.qos),
                        msg: m,
                        // [MQTT-3.3.1-8] retained messages sent on subscribe keep retain = 1.
                        retain: true,
                        sub_ids: sub_id.into_iter().collect(),
                    };
                    s.enqueue(item, &self.cfg, &mut self.stats);
                }
            }
        }
        let ack = Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            codes,
            properties: Props::default(),
        });
        self.control(now, conn, id, ack, out);
    }

    fn on_unsubscribe(
        &mut self,
        now: Instant,
        conn: ConnId,
        id: &Arc<str>,
        u: Unsubscribe,
        out: &mut dyn Outlet,
    ) {
        let Some(s) = self.sessions.get_mut(id) else {
            return;
        };
        let mut codes = Vec::with_capacity(u.filters.len());
        for raw in &u.filters {
            let existed = match topic::parse_subscription(raw) {
                Ok(p) => {
                    s.subs.remove(raw);
                    self.subs.remove(p.share_group, p.filter, id)
                }
                Err(_) => false,
            };
            codes.push(if existed {
                reason::SUCCESS
            } else {
                reason::NO_SUBSCRIPTION_EXISTED
            });
        }
        let ack = Packet::UnsubAck(UnsubAck {
            packet_id: u.packet_id,
            codes,
            properties: Props::default(),
        });
        self.control(now, conn, id, ack, out);
    }

    fn on_closed(&mut self, now: Instant, conn: ConnId, why: CloseReason, out: &mut dyn Outlet) {
        // A connection closed by takeover was already detached; its late Closed is ignored.
        let Some(id) = self.conns.remove(&conn) else {
            return;
        };
        tracing::debug!(client = %id, conn, reason = ?why, "client disconnected");
        self.detach(now, &id, why, out);
    }

    /// The session's connection is gone: handle its will and start its expiry.
    fn detach(&mut self, now: Instant, id: &Arc<str>, why: CloseReason, out: &mut dyn Outlet) {
        let id = id.clone();
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.conn = None;
        s.control.clear();
        s.stalled = false;
        // QoS 0 messages are not kept for an offline session.
        s.queue.retain(|q| q.qos != QoS::AtMostOnce);
        if let CloseReason::Disconnect {
            session_expiry: Some(e),
            ..
        } = why
        {
            s.expiry = e;
        }
        let will = s.will.take();
        let expiry = s.expiry;
        if let Some(w) = will.filter(|_| why.publishes_will()) {
            let delay = will_delay(&w).min(expiry);
            if delay == 0 {
                self.publish_will(now, &id, w, out);
            } else if let Some(s) = self.sessions.get_mut(&id) {
                let due = now + Duration::from_secs(delay as u64);
                s.pending_will = Some(PendingWill { will: w, due });
                self.timers.push(Reverse((due, id.clone())));
            }
        }
        if expiry == 0 {
            self.end_session(now, &id, out);
        } else if expiry != NEVER_EXPIRES {
            let at = now + Duration::from_secs(expiry as u64);
            if let Some(s) = self.sessions.get_mut(&id) {
                s.expires_at = Some(at);
            }
            self.timers.push(Reverse((at, id)));
        }
    }

    /// Ends a session: its subscriptions go, and a will still waiting out its delay is
    /// published now ([MQTT-3.1.3-9]: at the delay or at session end, whichever is first).
    fn end_session(&mut self, now: Instant, id: &Arc<str>, out: &mut dyn Outlet) {
        let Some(s) = self.sessions.remove(id) else {
            return;
        };
        for raw in s.subs.keys() {
            if let Ok(p) = topic::parse_subscription(raw) {
                self.subs.remove(p.share_group, p.filter, id);
            }
        }
        if let Some(w) = s.pending_will {
            self.publish_will(now, id, w.will, out);
        }
    }

    fn publish_will(&mut self, now: Instant, id: &Arc<str>, w: Will, out: &mut dyn Outlet) {
        let (props, expires_at) = message::end_to_end(w.properties, now);
        tracing::debug!(client = %id, topic = %w.topic, "publishing will");
        let msg = Arc::new(Message {
            topic: w.topic,
            payload: w.payload,
            qos: w.qos,
            retain: w.retain,
            properties: props,
            origin: Origin::Will(id.clone()),
            received_at: now,
            expires_at,
        });
        self.route(now, msg, out);
    }
}

fn will_delay(w: &Will) -> u32 {
    w.properties.will_delay_interval.unwrap_or(0)
}

fn ack(packet_id: u16, code: u8, v: Version) -> Ack {
    Ack {
        packet_id,
        // 3.x acks carry no reason code.
        reason: if v.is_v5() { code } else { 0 },
        properties: Props::default(),
    }
}

fn disconnect(code: u8) -> Packet {
    Packet::Disconnect(Disconnect {
        reason: code,
        properties: Props::default(),
    })
}
