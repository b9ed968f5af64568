//! The hub: the one router every message passes through.
//!
//! Owns the session registry, the subscription tree, the retained index, wills and their delays,
//! and session expiry. It is sans-IO: inputs arrive as `HubInput` with the current `Instant`,
//! packets leave through an `Outlet`, and `poll_timeout` says when to call `handle_timeout`.
//! Acks for QoS 1/2 publishes are released by the hub after routing (never inline in a
//! connection), which is where the durable store's commit confirmation slots in.

pub mod durable;
mod levels;
pub mod local;
pub mod message;
pub mod retained;
pub mod session;
pub mod tree;

#[cfg(test)]
mod tests;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::auth::{Access, Acl};
use crate::bridge::rules::OutRule;
use crate::proto::mqtt::encode::encoded_len;
use crate::proto::mqtt::server::CloseReason;
use crate::proto::mqtt::SubOptions;
use crate::proto::mqtt::{
    reason, Ack, ConnAck, Connect, Disconnect, Packet, Props, Publish, QoS, SubAck, Subscribe,
    UnsubAck, Unsubscribe, Version, Will,
};
use crate::proto::topic;
use crate::store::{Op, OpResult, Outcome, StoredRetained, StoredSession, StoredSubscription};
use durable::{Clock, Durable};
use message::{Message, Origin};
use session::{Enqueued, InflightState, PendingWill, Persist, Queued, Session, NEVER_EXPIRES};
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
    /// `[auth] acl_file`: what each client may publish, subscribe to and receive. None lets
    /// everyone do everything, as mosquitto does without an ACL.
    pub acl: Option<Arc<Acl>>,
    /// Levels a topic name or filter may have; deeper ones are invalid.
    pub max_topic_levels: usize,
    /// Sessions held at once; a CONNECT that would create one more is refused.
    pub max_sessions: usize,
    /// Seconds a persistent session outlives its connection at most; 0: no cap.
    pub persistent_session_expiry: u32,
    /// Subscriptions one session may hold.
    pub max_subscriptions_per_session: usize,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_inflight: 100,
            max_queued: 1000,
            max_packet_size: 1 << 20,
            topic_alias_maximum: 10,
            acl: None,
            max_topic_levels: 200,
            max_sessions: 10_000,
            persistent_session_expiry: 30 * 86_400,
            max_subscriptions_per_session: 1000,
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
    /// QoS 1/2 publishes refused because the store was full or failing.
    pub refused_full: u64,
    /// Messages put in the bridge outbox.
    pub outboxed: u64,
    /// Publishes, subscriptions and deliveries the ACL refused.
    pub denied: u64,
    /// CONNECTs refused because `max_sessions` sessions were held.
    pub refused_sessions: u64,
    /// Subscriptions refused by `max_subscriptions_per_session`.
    pub refused_subscriptions: u64,
    /// Steps of the wall clock seen (NTP setting a Pi's clock after boot, say).
    pub clock_steps: u64,
    /// Publishes, wills and filters refused for a topic too deep, or too long once a mount
    /// point or a bridge rule's prefix was added.
    pub bad_topics: u64,
}

/// Where the hub's packets go. The runtime implements it with bounded channels.
pub trait Outlet {
    /// Queues `packet` for `conn`. When the connection's queue is full the packet comes back,
    /// and the outlet must later deliver `HubInput::Ready(conn)` once there is room.
    fn try_send(&mut self, conn: ConnId, packet: Packet) -> Result<(), Packet>;
    /// Ends `conn` once what is queued, then `last` (a DISCONNECT) if given, is written.
    fn close(&mut self, conn: ConnId, last: Option<Packet>);
    /// A QoS 0 message for the uplink to send now; the uplink drops it when offline or busy.
    fn uplink_live(&mut self, _publish: Publish) {}
    /// The local effects of inbound uplink message `packet_id` have committed (`stored`), or
    /// were refused: the uplink acknowledges it upstream, or lets the broker resend it.
    fn uplink_ack(&mut self, _packet_id: u16, _qos: QoS, _stored: bool) {}
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
    /// Ops submitted with `token` have committed (or failed).
    Committed { token: u64, outcome: Outcome },
    /// A message from the cloud broker, already renamed to its local topic. QoS 1/2 are
    /// answered with `Outlet::uplink_ack` once their effects commit.
    Uplink(Publish),
    /// A new will for a connected client (MQTT-SN WILLTOPICUPD/WILLMSGUPD); `None` removes it.
    SetWill { conn: ConnId, will: Option<Will> },
    /// A publish that arrived without a connection (MQTT-SN QoS -1): routed at QoS 0.
    Unconnected(Publish),
    /// The wall clock, read at the input's `now`; `believed` once it is known to be right
    /// (synchronised, or `trust_clock_after` has passed). A step is logged, the hub's clock
    /// follows it, and rows stamped under the old reading are moved by the step.
    WallClock { unix_ms: i64, believed: bool },
    /// A message outpost publishes itself ($SYS): QoS 0, local only.
    System {
        topic: String,
        payload: bytes::Bytes,
        retain: bool,
    },
}

/// The inbound QoS 2 state of the uplink is kept under this client id, which no local client
/// can have (an empty id is replaced by an assigned one).
pub const UPLINK_QOS2_ID: &str = "";

/// What the store held at startup, for `Hub::restore`.
#[derive(Debug, Default)]
pub struct Restored {
    pub sessions: Vec<StoredSession>,
    pub subscriptions: Vec<StoredSubscription>,
    pub inbound_qos2: Vec<(String, u16)>,
    pub retained: Vec<StoredRetained>,
    /// The highest message id ever allocated.
    pub max_row: i64,
    /// Messages queued in the store per session (what `max_queued` counts).
    pub queued: HashMap<String, usize>,
}

/// What routing one message did.
#[derive(Debug, Default)]
pub struct Routed {
    /// Sessions it was queued for.
    pub reached: usize,
    /// Its durable effects.
    pub ops: Vec<Op>,
    /// Sessions whose copy went to the store only (their tail).
    pub tails: Vec<Arc<str>>,
    /// The store rows it created, by session: taken back if the commit is refused.
    pub rows: Vec<(Arc<str>, i64)>,
}

/// Something released when a commit completes.
#[derive(Default)]
struct Pending {
    /// The packet to send, on the connection it answers.
    reply: Option<(ConnId, Packet)>,
    /// Sessions that got tail rows in this commit.
    tails: Vec<Arc<str>>,
    /// Whose unacknowledged-publish count this reply decrements.
    publisher: Option<Arc<str>>,
    /// Rows created for this commit, by session; removed from the RAM queues if it is refused.
    rows: Vec<(Arc<str>, i64)>,
    /// The PUBREC answers a QoS 2 duplicate of the message with this (packet id, generation):
    /// valid only while that very message still holds the id (its commit was not refused, the
    /// id not released and taken by another).
    qos2_dup: Option<(u16, u64)>,
    /// The PUBREC answers this QoS 2 message (packet id, generation): refused, it frees the id,
    /// unless another message holds it by then.
    qos2_original: Option<(u16, u64)>,
    /// An inbound uplink message: its upstream ack (packet id, QoS) is released on commit.
    uplink: Option<(u16, QoS)>,
}

/// How often expired and over-age messages are deleted from the store.
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

/// A wall-clock reading further than this from the hub's clock is a step, not drift.
const CLOCK_STEP_MS: i64 = 2_000;

/// The router.
pub struct Hub {
    cfg: HubConfig,
    sessions: HashMap<Arc<str>, Session>,
    conns: HashMap<ConnId, Arc<str>>,
    subs: SubscriptionTree,
    retained: RetainedIndex,
    /// Will delays and session expiries, each an entry a session's `expires_at` or
    /// `pending_will` names; a session takes its entries out when it reconnects or ends, so
    /// reconnecting clients leave nothing behind. Entries are still checked when they fire.
    timers: BTreeSet<(Instant, Arc<str>)>,
    assigned_ids: u64,
    stats: Stats,
    matches: Vec<Match>,
    persist: Persist,
    next_row: i64,
    next_token: u64,
    /// Generations for inbound QoS 2 ids (`Session::inbound_qos2`).
    next_qos2_gen: u64,
    pending: HashMap<u64, Pending>,
    next_expire: Option<Instant>,
    /// Whether the wall clock is believed: until it is, nothing is expired by a wall-clock
    /// age, since an unset clock (a Pi without RTC before NTP) would expire the wrong rows.
    clock_believed: bool,
    /// The first row id of this run: rows from here on were stamped with this run's clock.
    first_row: i64,
    /// Outbound bridge rules; empty when there is no uplink.
    outs: Vec<OutRule>,
}

impl Hub {
    /// A hub that keeps everything in memory.
    pub fn new(cfg: HubConfig) -> Self {
        Self::build(cfg, None, Clock::new(Instant::now(), 0))
    }

    /// A hub whose durable effects go through `durable`. `clock` maps its `Instant`s to the
    /// Unix time the store keeps.
    pub fn with_store(cfg: HubConfig, durable: Box<dyn Durable>, clock: Clock) -> Self {
        Self::build(cfg, Some(durable), clock)
    }

    fn build(cfg: HubConfig, durable: Option<Box<dyn Durable>>, clock: Clock) -> Self {
        Hub {
            cfg,
            sessions: HashMap::new(),
            conns: HashMap::new(),
            subs: SubscriptionTree::default(),
            retained: RetainedIndex::default(),
            timers: BTreeSet::new(),
            assigned_ids: 0,
            stats: Stats::default(),
            matches: Vec::new(),
            persist: Persist {
                durable,
                clock,
                ops: Vec::new(),
            },
            next_row: 1,
            next_token: 1,
            next_qos2_gen: 0,
            pending: HashMap::new(),
            next_expire: None,
            clock_believed: true,
            first_row: 1,
            outs: Vec::new(),
        }
    }

    /// Whether the wall clock is believed from the start (`trust_clock_after = "0s"`, or the
    /// kernel says it is synchronised). Call before `restore`; `HubInput::WallClock` can
    /// believe it later.
    pub fn believe_clock(&mut self, believed: bool) {
        self.clock_believed = believed;
    }

    /// A new ACL (or none) from a reload: it applies to every check from now on, deliveries
    /// already queued included.
    pub fn set_acl(&mut self, acl: Option<Arc<Acl>>) {
        self.cfg.acl = acl;
    }

    /// Connected clients: (MQTT, MQTT-SN, outpost's own ports and pins).
    pub fn connected_by_kind(&self) -> (usize, usize, usize) {
        let mut k = (0, 0, 0);
        for &c in self.conns.keys() {
            if c >= crate::proto::mqttsn::gateway::SN_CONN_BASE {
                k.1 += 1;
            } else if local::is_local(c) {
                k.2 += 1;
            } else {
                k.0 += 1;
            }
        }
        k
    }

    /// Sends messages matching `outs` to the uplink: through the outbox (upstream QoS 1/2, or
    /// QoS 0 rules that buffer) or live (QoS 0).
    pub fn set_uplink_rules(&mut self, outs: Vec<OutRule>) {
        self.outs = outs;
    }

    /// Loads what the store held: sessions (offline, their queues left in the store until they
    /// reconnect), subscriptions, inbound QoS 2 state and retained messages. The cost grows with
    /// the number of sessions and retained messages, never with the queued backlog.
    pub fn restore(&mut self, now: Instant, r: Restored) {
        let now_ms = self.persist.clock.unix_ms(now);
        self.first_row = r.max_row + 1;
        if self.persist.durable.is_some() {
            // Expiry keeps its own schedule from the start, whether or not any client ever
            // arms a timer; the first pass runs at once.
            self.next_expire = Some(now);
        }
        self.next_row = r.max_row + 1;
        for st in r.sessions {
            let mut st = st;
            if st.expires_ms.is_some_and(|e| e <= now_ms) {
                if self.clock_believed {
                    self.persist.ops.push(Op::SessionDelete(st.client_id));
                    continue;
                }
                // Past its end by a clock nobody vouches for: it gets its whole expiry again
                // rather than being ended on a wrong date.
                st.expires_ms = None;
            }
            let id: Arc<str> = Arc::from(st.client_id.as_str());
            let version = match st.version {
                3 => Version::V31,
                4 => Version::V311,
                _ => Version::V5,
            };
            let mut s = Session::new(id.clone(), version);
            s.expiry = self.capped_expiry(st.expiry);
            s.stored = true;
            s.tail = true;
            s.tail_rows = r.queued.get(&st.client_id).copied().unwrap_or(0);
            s.username = st.username.as_deref().map(Arc::from);
            // Offline at the stop: its end (and a delayed will) are stored dates.
            s.wall_deadlines = st.expires_ms.is_some() || st.will_due_ms.is_some();
            // A session that was connected when we stopped starts its expiry now.
            // An offline session's end as stored, brought within `persistent_session_expiry`.
            let latest = (s.expiry != NEVER_EXPIRES).then(|| now_ms + s.expiry as i64 * 1000);
            let expires_ms = match (st.expires_ms, latest) {
                (Some(e), Some(l)) => Some(e.min(l)),
                (e, l) => e.or(l),
            };
            s.expires_at = expires_ms.map(|e| self.persist.clock.instant(e, now));
            if let Some(at) = s.expires_at {
                self.timers.insert((at, id.clone()));
            }
            if let Some(will) = st.will.as_deref().and_then(durable::decode_will) {
                let due = match st.will_due_ms {
                    // It was waiting out its delay when we stopped.
                    Some(d) => Some(self.persist.clock.instant(d, now)),
                    // Its client was connected: our crash ended that connection abnormally.
                    None if st.expires_ms.is_none() => {
                        let delay = will_delay(&will).min(s.expiry);
                        Some(now + Duration::from_secs(delay as u64))
                    }
                    None => None,
                };
                if let Some(due) = due {
                    s.pending_will = Some(PendingWill { will, due });
                    self.timers.insert((due, id.clone()));
                }
            }
            self.sessions.insert(id, s);
        }
        for sub in r.subscriptions {
            let Some(s) = self.sessions.get_mut(sub.client_id.as_str()) else {
                self.persist.ops.push(Op::SubDelete {
                    client_id: sub.client_id,
                    filter: sub.filter,
                });
                continue;
            };
            let Ok(parsed) = topic::parse_subscription(&sub.filter) else {
                continue;
            };
            let entry = Sub {
                options: options_from_byte(sub.options),
                id: sub.sub_id,
            };
            self.subs
                .insert(parsed.share_group, parsed.filter, &s.id, entry);
            s.subs.insert(sub.filter, entry);
        }
        for (client, pid) in r.inbound_qos2 {
            if let Some(s) = self.sessions.get_mut(client.as_str()) {
                self.next_qos2_gen += 1;
                s.inbound_qos2.insert(pid, self.next_qos2_gen);
            }
        }
        for rt in r.retained {
            if rt.expires_ms.is_some_and(|e| e <= now_ms) {
                continue;
            }
            if is_volatile(&rt.topic) {
                // Written by an older version; a status from a previous run is a lie now.
                self.persist.ops.push(Op::RetainDelete(rt.topic.clone()));
                continue;
            }
            if let Some(m) = durable::from_retained(&rt, &self.persist.clock, now) {
                self.retained.set(m);
            }
        }
        tracing::info!(
            sessions = self.sessions.len(),
            subscriptions = self.subs.len(),
            retained = self.retained.len(),
            "restored from the store"
        );
        self.flush();
    }

    /// Submits the effects nobody waits for. Called at the end of every input, so they follow
    /// the inserts they refer to in the writer's queue.
    fn flush(&mut self) {
        if self.persist.ops.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.persist.ops);
        if let Some(d) = self.persist.durable.as_mut() {
            d.submit(0, ops);
        }
    }

    /// Submits `ops`, whose commit releases `pending`; without a store, releases it now.
    fn submit_gated(&mut self, now: Instant, ops: Vec<Op>, pending: Pending, out: &mut dyn Outlet) {
        let token = self.next_token;
        self.next_token += 1;
        self.pending.insert(token, pending);
        match self.persist.durable.as_mut() {
            Some(d) => d.submit(token, ops),
            None => self.on_committed(now, token, Ok(Vec::new()), out),
        }
    }

    /// A session expiry as the hub keeps it: `persistent_session_expiry` caps it (0: no cap).
    fn capped_expiry(&self, asked: u32) -> u32 {
        match self.cfg.persistent_session_expiry {
            0 => asked,
            cap => asked.min(cap),
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
                    s.pump(now, &self.cfg, &mut self.stats, out, &mut self.persist);
                }
            }
            HubInput::Committed { token, outcome } => self.on_committed(now, token, outcome, out),
            HubInput::Uplink(p) => self.on_uplink_publish(now, p, out),
            HubInput::SetWill { conn, will } => self.on_set_will(conn, will),
            HubInput::Unconnected(mut p) => {
                self.stats.received += 1;
                if topic_problem(&self.cfg, &p.topic).is_err() {
                    self.stats.bad_topics += 1;
                    return;
                }
                // A sender without a session is anonymous, with no client id.
                if !acl_permits(&self.cfg, false, "", None, &p.topic, Access::Write) {
                    self.stats.denied += 1;
                    tracing::debug!(topic = %p.topic, "QoS -1 publish denied by the ACL");
                    return;
                }
                p.qos = QoS::AtMostOnce;
                let msg = Message::from_publish(p, Origin::Unconnected, now);
                let mut routed = self.route(now, msg, out);
                self.persist.ops.append(&mut routed.ops);
            }
            HubInput::WallClock { unix_ms, believed } => self.on_wall_clock(now, unix_ms, believed),
            HubInput::System {
                topic,
                payload,
                retain,
            } => {
                let msg = Arc::new(Message {
                    topic,
                    payload,
                    qos: QoS::AtMostOnce,
                    retain,
                    properties: Props::default(),
                    origin: Origin::System,
                    received_at: now,
                    expires_at: None,
                });
                let mut routed = self.route(now, msg, out);
                self.persist.ops.append(&mut routed.ops);
            }
        }
        self.flush();
    }

    /// A message from the cloud: routed like a local publish; its upstream ack waits for the
    /// commit of its local effects (and, for QoS 2, of its packet id, so a resend after a crash
    /// is recognised and not delivered twice).
    fn on_uplink_publish(&mut self, now: Instant, p: Publish, out: &mut dyn Outlet) {
        self.stats.received += 1;
        let (qos, packet_id) = (p.qos, p.packet_id);
        if let Err(why) = topic_problem(&self.cfg, &p.topic) {
            // No local client could ever be sent it: acknowledged and dropped, so that the
            // broker does not resend it for ever; counted and logged.
            self.stats.bad_topics += 1;
            tracing::warn!(
                len = p.topic.len(),
                "a message from the uplink maps to a local topic that {why}; dropped"
            );
            if qos != QoS::AtMostOnce {
                out.uplink_ack(packet_id, qos, true);
            }
            return;
        }
        let msg = Message::from_publish(p, Origin::Uplink, now);
        let mut routed = self.route(now, msg, out);
        if qos == QoS::AtMostOnce {
            self.persist.ops.append(&mut routed.ops);
            return;
        }
        if qos == QoS::ExactlyOnce && self.persist.durable.is_some() {
            routed.ops.push(Op::Qos2Put {
                client_id: UPLINK_QOS2_ID.into(),
                packet_id,
            });
        }
        let pending = Pending {
            tails: routed.tails,
            rows: routed.rows,
            uplink: Some((packet_id, qos)),
            ..Pending::default()
        };
        self.submit_gated(now, routed.ops, pending, out);
    }

    /// A reading of the wall clock. A step (more than `CLOCK_STEP` from what the hub's clock
    /// says) re-anchors the hub's clock, so new stamps are right; rows this run stamped under
    /// the old reading move by the step, so no age is ever computed across it; and stored
    /// offline sessions' end dates are written again from their (monotonic) deadlines.
    fn on_wall_clock(&mut self, now: Instant, unix_ms: i64, believed: bool) {
        let step = self.persist.clock.drift(now, unix_ms);
        if step.abs() > CLOCK_STEP_MS {
            self.stats.clock_steps += 1;
            tracing::warn!(
                step_ms = step,
                believed,
                "the wall clock stepped; stamps of this run's messages move with it"
            );
            self.persist.clock = Clock::new(now, unix_ms);
            // Deadlines read from stored dates were placed by the old reading: they move
            // back by the step (a clock that jumps ahead brings them nearer).
            let shift = Duration::from_millis(step.unsigned_abs());
            let moved = |t: Instant| {
                if step > 0 {
                    t.checked_sub(shift).unwrap_or(now).max(now)
                } else {
                    t + shift
                }
            };
            for s in self.sessions.values_mut().filter(|s| s.wall_deadlines) {
                unschedule(&mut self.timers, s);
                if let Some(at) = s.expires_at.as_mut() {
                    *at = moved(*at);
                    self.timers.insert((*at, s.id.clone()));
                }
                if let Some(w) = s.pending_will.as_mut() {
                    w.due = moved(w.due);
                    self.timers.insert((w.due, s.id.clone()));
                }
            }
            if self.persist.durable.is_some() {
                self.persist.ops.push(Op::ClockStep {
                    delta_ms: step,
                    from_id: self.first_row,
                });
                for s in self.sessions.values().filter(|s| s.stored) {
                    self.persist
                        .ops
                        .push(Op::SessionPut(stored_row(&self.persist.clock, s)));
                }
            }
        }
        if believed && !self.clock_believed {
            tracing::info!("the wall clock is believed now; expiry by age begins");
            self.clock_believed = true;
            self.next_expire = self.next_expire.map(|_| now);
        }
    }

    /// Replaces a connected session's will; a stored session's row follows, so the will a
    /// restart publishes is the latest one.
    fn on_set_will(&mut self, conn: ConnId, will: Option<Will>) {
        let Some(s) = self
            .conns
            .get(&conn)
            .and_then(|id| self.sessions.get_mut(id))
        else {
            return;
        };
        let will = match will {
            Some(w) if topic_problem(&self.cfg, &w.topic).is_err() => {
                self.stats.bad_topics += 1;
                tracing::info!(client = %s.id, "new will topic is too long or too deep; the client has no will now");
                None
            }
            w => w,
        };
        s.will = will.filter(|w| {
            let ok = s.may(&self.cfg, &w.topic, Access::Write);
            if !ok {
                self.stats.denied += 1;
                tracing::warn!(client = %s.id, topic = %w.topic, "will topic denied by the ACL; the client has no will now");
            }
            ok
        });
        if s.stored && self.persist.durable.is_some() {
            let row = stored_row(&self.persist.clock, s);
            self.persist.ops.push(Op::SessionPut(row));
        }
    }

    fn on_committed(&mut self, now: Instant, token: u64, outcome: Outcome, out: &mut dyn Outlet) {
        let Some(p) = self.pending.remove(&token) else {
            return;
        };
        if let (Some(s), Some((_, Packet::PubAck(_)))) = (
            p.publisher.as_ref().and_then(|c| self.sessions.get_mut(c)),
            &p.reply,
        ) {
            s.awaiting_acks = s.awaiting_acks.saturating_sub(1);
        }
        let refused_insert = match &outcome {
            Ok(results) => results.contains(&OpResult::Full),
            Err(_) => true,
        };
        for c in &p.tails {
            if let Some(s) = self.sessions.get_mut(c) {
                s.uncommitted_tail = s.uncommitted_tail.saturating_sub(1);
                if refused_insert {
                    // Its row was never written.
                    s.tail_rows = s.tail_rows.saturating_sub(1);
                }
                if s.conn.is_some() && !s.stalled {
                    s.pump(now, &self.cfg, &mut self.stats, out, &mut self.persist);
                }
            }
        }
        let refused = match p.qos2_dup {
            // A duplicate's own request only orders its ack after the original's (the writer is
            // FIFO): what counts is whether that original still holds the id, stored.
            Some((pid, gen)) => !p
                .reply
                .as_ref()
                .and_then(|(c, _)| self.conns.get(c))
                .and_then(|id| self.sessions.get(id))
                .is_some_and(|s| s.inbound_qos2.get(&pid) == Some(&gen)),
            None => match &outcome {
                Ok(results) => results.contains(&OpResult::Full),
                Err(e) => {
                    tracing::warn!(error = %e, "durable effects failed; their acks are refused");
                    true
                }
            },
        };
        if refused {
            // The message was not accepted: stored sessions must not get it either. (Copies
            // already handed to a connection, or to sessions that are not stored, are gone.)
            for (client, row) in &p.rows {
                if let Some(s) = self.sessions.get_mut(client) {
                    s.queue.retain(|q| q.row != Some(*row));
                }
            }
            // Not stored, so a retry must be routed again, whichever connection it comes on.
            if let (Some((pid, gen)), Some(s)) = (
                p.qos2_original,
                p.publisher.as_ref().and_then(|c| self.sessions.get_mut(c)),
            ) {
                if s.inbound_qos2.get(&pid) == Some(&gen) {
                    s.inbound_qos2.remove(&pid);
                }
            }
        }
        if let Some((pid, qos)) = p.uplink {
            if refused {
                self.stats.refused_full += 1;
            }
            out.uplink_ack(pid, qos, !refused);
        }
        let Some((conn, mut packet)) = p.reply else {
            return;
        };
        // The client may have reconnected since: the ack belonged to the old connection.
        let Some(id) = self.conns.get(&conn).cloned() else {
            return;
        };
        if refused {
            if matches!(packet, Packet::PubRel(_)) {
                // The PUBREC state is not on disk: no PUBREL yet. The session still awaits
                // PUBCOMP, so the PUBREL goes again when the client reconnects.
                return;
            }
            self.stats.refused_full += 1;
            let v5 = self.sessions.get(&id).is_some_and(|s| s.version.is_v5());
            if let Packet::PubAck(a) | Packet::PubRec(a) = &mut packet {
                if !v5 {
                    // 3.1.1 has no negative ack: withhold it; the client resends later.
                    return;
                }
                a.reason = reason::QUOTA_EXCEEDED;
            }
        }
        self.control(now, conn, &id, packet, out);
    }

    /// When `handle_timeout` must next run.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let timer = self.timers.first().map(|(t, _)| *t);
        match (timer, self.next_expire) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Publishes wills whose delay has passed, ends expired sessions, and expires stored
    /// messages.
    pub fn handle_timeout(&mut self, now: Instant, out: &mut dyn Outlet) {
        if self.persist.durable.is_some() {
            match self.next_expire {
                Some(t) if t <= now && !self.clock_believed => {
                    // Ages and expiry dates are wall-clock dates: not until the clock is right.
                    self.next_expire = Some(now + EXPIRE_EVERY);
                }
                Some(t) if t <= now => {
                    let now_ms = self.persist.clock.unix_ms(now);
                    self.persist.ops.push(Op::Expire { now_ms });
                    self.next_expire = Some(now + EXPIRE_EVERY);
                }
                None => self.next_expire = Some(now + EXPIRE_EVERY),
                _ => {}
            }
        }
        while let Some((t, _)) = self.timers.first() {
            if *t > now {
                break;
            }
            let Some((_, id)) = self.timers.pop_first() else {
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
                    if s.stored {
                        // Sent now: a restart must not send it again.
                        let row = stored_row(&self.persist.clock, s);
                        self.persist.ops.push(Op::SessionPut(row));
                    }
                    let allowed = s.may(&self.cfg, &w.will.topic, Access::Write);
                    self.publish_will(now, &id, w.will, allowed, out);
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
        self.flush();
    }

    /// Graceful shutdown: wills are published (the server, not the client, ends each
    /// connection), then every connection is closed with v5 reason 0x8B.
    pub fn shutdown(&mut self, now: Instant, out: &mut dyn Outlet) {
        let mut wills = Vec::new();
        for s in self.sessions.values_mut() {
            if s.will.is_none() && s.pending_will.is_none() {
                continue;
            }
            let pending = s.pending_will.take().map(|p| p.will);
            for w in s.will.take().into_iter().chain(pending) {
                let allowed = s.may(&self.cfg, &w.topic, Access::Write);
                wills.push((s.id.clone(), w, allowed));
            }
            if s.stored && self.persist.durable.is_some() {
                // Published now: the stored row must not carry it into the next run, which
                // would publish it again.
                let row = stored_row(&self.persist.clock, s);
                self.persist.ops.push(Op::SessionPut(row));
            }
        }
        for (id, w, allowed) in wills {
            self.publish_will(now, &id, w, allowed, out);
        }
        for (conn, id) in self.conns.drain() {
            let v5 = self.sessions.get(&id).is_some_and(|s| s.version.is_v5());
            out.close(conn, v5.then(|| disconnect(reason::SERVER_SHUTTING_DOWN)));
        }
        self.flush();
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
        if c.client_id.starts_with(local::LOCAL_ID_PREFIX) && !local::is_local(conn) {
            // Serial ports and GPIO pins hold these sessions; a device must not take one over.
            let code = if v.is_v5() {
                reason::CLIENT_ID_NOT_VALID
            } else {
                reason::V3_IDENTIFIER_REJECTED
            };
            return refuse(out, code);
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

        let exempt = local::is_local(conn);
        let sn = is_sn(conn);
        let code_for = |v5: u8, v3: u8| if v.is_v5() { v5 } else { v3 };
        if c.username
            .as_deref()
            .is_some_and(|u| u.starts_with(SN_USER_PREFIX))
            != sn
        {
            // `sn:` names MQTT-SN sensors in the ACL: a network login must not claim one, and
            // a sensor has no other name.
            self.stats.denied += 1;
            tracing::warn!(client = %id, "user names starting with `sn:` are reserved for MQTT-SN clients; refusing");
            return refuse(
                out,
                code_for(reason::NOT_AUTHORIZED, reason::V3_NOT_AUTHORIZED),
            );
        }
        if let Some(w) = &c.will {
            if let Err(why) = topic_problem(&self.cfg, &w.topic) {
                self.stats.bad_topics += 1;
                tracing::info!(client = %id, "will topic {why}; refusing");
                return refuse(
                    out,
                    code_for(reason::TOPIC_NAME_INVALID, reason::V3_NOT_AUTHORIZED),
                );
            }
            // As mosquitto: a will the client could not publish refuses the connection, rather
            // than failing silently when it is needed.
            let user = c.username.as_deref();
            if !acl_permits(&self.cfg, exempt, &id, user, &w.topic, Access::Write) {
                self.stats.denied += 1;
                tracing::info!(client = %id, topic = %w.topic, "will topic denied by the ACL; refusing");
                return refuse(
                    out,
                    code_for(reason::NOT_AUTHORIZED, reason::V3_NOT_AUTHORIZED),
                );
            }
        }
        match self.sessions.get(&id) {
            Some(old)
                if sn
                    && old
                        .username
                        .as_deref()
                        .is_some_and(|u| !u.starts_with(SN_USER_PREFIX)) =>
            {
                // A sensor's client id is no credential: it must not reach, let alone end, a
                // session that a logged-in user made.
                self.stats.denied += 1;
                tracing::warn!(client = %id, owner = old.username.as_deref().unwrap_or(""),
                    "MQTT-SN CONNECT for a session that belongs to a user; refusing");
                return refuse(out, reason::NOT_AUTHORIZED);
            }
            None if !exempt && self.sessions.len() >= self.cfg.max_sessions => {
                self.stats.refused_sessions += 1;
                if self.stats.refused_sessions.is_power_of_two() {
                    tracing::warn!(client = %id, max = self.cfg.max_sessions,
                        total = self.stats.refused_sessions, "max_sessions reached; refusing new sessions");
                }
                return refuse(
                    out,
                    code_for(reason::QUOTA_EXCEEDED, reason::V3_SERVER_UNAVAILABLE),
                );
            }
            _ => {}
        }

        let asked = if v.is_v5() {
            c.properties.session_expiry_interval.unwrap_or(0)
        } else if c.clean_start {
            0
        } else {
            NEVER_EXPIRES
        };
        let expiry = self.capped_expiry(asked);
        let mut props = Props::default();
        if v.is_v5() {
            props.receive_maximum = Some(self.cfg.max_inflight);
            props.maximum_packet_size = Some(self.cfg.max_packet_size);
            props.topic_alias_maximum = Some(self.cfg.topic_alias_maximum);
            props.assigned_client_identifier = assigned;
            if keep_alive != c.keep_alive {
                props.server_keep_alive = Some(keep_alive);
            }
            if expiry != asked {
                // [MQTT-3.2.2.3.2] the server tells the client the expiry it uses instead.
                props.session_expiry_interval = Some(expiry);
            }
        }
        let probe = Packet::ConnAck(ConnAck {
            session_present: true,
            code: reason::SUCCESS,
            properties: props.clone(),
        });
        let client_max = c.properties.maximum_packet_size.unwrap_or(u32::MAX);
        if encoded_len(&probe, v) > client_max as usize {
            // [MQTT-3.1.2-24] nothing larger than the client allows may be sent, and every
            // property we announce changes what the client may do: close without a CONNACK.
            tracing::info!(client = %id, max = client_max, "the client's Maximum Packet Size leaves no room for a CONNACK; closing");
            out.close(conn, None);
            return;
        }

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
            unschedule(&mut self.timers, old);
            old.pending_will = None;
        }

        let s = self
            .sessions
            .entry(id.clone())
            .or_insert_with(|| Session::new(id.clone(), v));
        unschedule(&mut self.timers, s);
        s.wall_deadlines = false;
        s.conn = Some(conn);
        s.version = v;
        s.username = c.username.as_deref().map(Arc::from);
        s.acl_exempt = exempt;
        s.expiry = expiry;
        s.expires_at = None;
        s.will = c.will.clone();
        s.receive_max = c.properties.receive_maximum.unwrap_or(u16::MAX);
        s.max_packet = client_max;
        s.stalled = false;
        if self.persist.durable.is_some() && (s.persistent() || s.stored) {
            s.stored = true;
            let row = stored_row(&self.persist.clock, s);
            self.persist.ops.push(Op::SessionPut(row));
        }
        self.conns.insert(conn, id.clone());

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
        s.pump(now, &self.cfg, &mut self.stats, out, &mut self.persist);
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
                let mut state_op = None;
                let code = match s.take_inflight(a.packet_id, InflightState::AwaitRec) {
                    // v5: a failure code on PUBREC ends the exchange ([MQTT-4.3.3-4] note).
                    Some(f) if a.reason >= 0x80 => {
                        if let Some(row) = f.item.row {
                            self.persist.ops.push(Op::Delete(row));
                        }
                        None
                    }
                    Some(mut f) => {
                        // The persisted QoS 2 state: after a restart PUBREL goes, not PUBLISH.
                        state_op = f.item.row.map(|row| Op::SetState {
                            id: row,
                            state: 2,
                            packet_id: Some(f.pid),
                        });
                        f.state = InflightState::AwaitComp;
                        s.inflight.push_back(f);
                        Some(reason::SUCCESS)
                    }
                    None => Some(reason::PACKET_ID_NOT_FOUND),
                };
                if let Some(code) = code {
                    let rel = Packet::PubRel(ack(a.packet_id, code, s.version));
                    match state_op {
                        // PUBREL only once that state is on disk: a PUBREL followed, after a
                        // crash, by the PUBLISH again would be a new message to the client.
                        Some(op) => {
                            let pending = Pending {
                                reply: Some((conn, rel)),
                                ..Pending::default()
                            };
                            self.submit_gated(now, vec![op], pending, out);
                        }
                        None => self.control(now, conn, &id, rel, out),
                    }
                } else {
                    s.pump(now, &self.cfg, &mut self.stats, out, &mut self.persist);
                }
            }
            Packet::PubRel(a) => {
                let Some(s) = self.sessions.get_mut(&id) else {
                    return;
                };
                let known = s.inbound_qos2.remove(&a.packet_id).is_some();
                let code = if known {
                    reason::SUCCESS
                } else {
                    reason::PACKET_ID_NOT_FOUND
                };
                let comp = Packet::PubComp(ack(a.packet_id, code, s.version));
                if known && s.stored && self.persist.durable.is_some() {
                    // PUBCOMP frees the packet id for reuse, so the stored id must be gone
                    // first: otherwise a new message reusing it after a crash would be taken
                    // for a duplicate and lost.
                    let op = Op::Qos2Delete {
                        client_id: id.to_string(),
                        packet_id: a.packet_id,
                    };
                    let pending = Pending {
                        reply: Some((conn, comp)),
                        ..Pending::default()
                    };
                    self.submit_gated(now, vec![op], pending, out);
                } else {
                    self.control(now, conn, &id, comp, out);
                }
            }
            Packet::Subscribe(sub) => self.on_subscribe(now, conn, &id, sub, out),
            Packet::Unsubscribe(u) => self.on_unsubscribe(now, conn, &id, u, out),
            // Only the MQTT-SN gateway sends PINGREQ to the hub (MQTT listeners answer it
            // themselves): it asks to be told, by PINGRESP, once the session has nothing left
            // to deliver, which is when a woken sleeping client may sleep again.
            Packet::PingReq => {
                if let Some(s) = self.sessions.get_mut(&id) {
                    s.idle_probe = true;
                    if !s.stalled {
                        s.pump(now, &self.cfg, &mut self.stats, out, &mut self.persist);
                    }
                }
            }
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
            if let Some(row) = s.take_inflight(a.packet_id, state).and_then(|f| f.item.row) {
                // Delivered: the row goes (delete only once acknowledged).
                self.persist.ops.push(Op::Delete(row));
            }
            s.pump(now, &self.cfg, &mut self.stats, out, &mut self.persist);
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
                s.pump(now, &self.cfg, &mut self.stats, out, &mut self.persist);
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
        let durable_publisher = s.stored && self.persist.durable.is_some();
        self.stats.received += 1;
        if let Some(&gen) = (p.qos == QoS::ExactlyOnce)
            .then(|| s.inbound_qos2.get(&p.packet_id))
            .flatten()
        {
            // A resent QoS 2 PUBLISH we already routed: acknowledge, never deliver twice.
            let rec = Packet::PubRec(ack(p.packet_id, reason::SUCCESS, v));
            if self.persist.durable.is_none() {
                return self.control(now, conn, id, rec, out);
            }
            // The original's effects may not have committed yet. The writer is FIFO, so an
            // empty request completes after them; if they were refused, so is this ack.
            let pending = Pending {
                reply: Some((conn, rec)),
                qos2_dup: Some((p.packet_id, gen)),
                ..Pending::default()
            };
            return self.submit_gated(now, Vec::new(), pending, out);
        }
        if v.is_v5()
            && p.qos != QoS::AtMostOnce
            && s.inbound_qos2.len() + s.awaiting_acks >= self.cfg.max_inflight as usize
        {
            return self.violation(
                conn,
                id,
                reason::RECEIVE_MAXIMUM_EXCEEDED,
                "client exceeded Receive Maximum",
                out,
            );
        }
        if let Err(why) = topic_problem(&self.cfg, &p.topic) {
            self.stats.bad_topics += 1;
            let why = format!("publish topic {why}");
            return self.violation(conn, id, reason::TOPIC_NAME_INVALID, &why, out);
        }
        let (qos, pid) = (p.qos, p.packet_id);
        let mut code = reason::SUCCESS;
        let mut routed = Routed::default();
        if !s.may(&self.cfg, &p.topic, Access::Write) {
            // Dropped. v5 says so on the ack; 3.1.1 has no way to, and mosquitto acknowledges
            // as if delivered, so a client does not resend it for ever.
            self.stats.denied += 1;
            tracing::debug!(client = %id, topic = %p.topic, "publish denied by the ACL");
            if v.is_v5() {
                code = reason::NOT_AUTHORIZED;
            }
        } else if p.properties.payload_format_indicator == Some(1)
            && std::str::from_utf8(&p.payload).is_err()
        {
            // [MQTT-3.3.2-4] the server MAY check: we do, and refuse it.
            code = reason::PAYLOAD_FORMAT_INVALID;
        } else {
            let msg = Message::from_publish(p, Origin::Client(id.clone()), now);
            routed = self.route(now, msg, out);
            if routed.reached == 0 && v.is_v5() {
                code = reason::NO_MATCHING_SUBSCRIBERS;
            }
        }
        let mut qos2_original = None;
        let reply = match qos {
            QoS::AtMostOnce => {
                // Nobody waits for a QoS 0 message's effects (a retained update, say).
                self.persist.ops.append(&mut routed.ops);
                return;
            }
            QoS::AtLeastOnce => Packet::PubAck(ack(pid, code, v)),
            QoS::ExactlyOnce => {
                if code < 0x80 {
                    if let Some(s) = self.sessions.get_mut(id) {
                        self.next_qos2_gen += 1;
                        s.inbound_qos2.insert(pid, self.next_qos2_gen);
                        qos2_original = Some((pid, self.next_qos2_gen));
                    }
                    if durable_publisher {
                        // Committed with the message, so a resend after a crash is recognised.
                        routed.ops.push(Op::Qos2Put {
                            client_id: id.to_string(),
                            packet_id: pid,
                        });
                    }
                }
                Packet::PubRec(ack(pid, code, v))
            }
        };
        if routed.ops.is_empty() {
            return self.control(now, conn, id, reply, out);
        }
        // The durability contract: the ack goes out only once every effect has committed.
        if qos == QoS::AtLeastOnce {
            // QoS 2 is already counted in `inbound_qos2`; counting it twice against Receive
            // Maximum would disconnect a client that keeps within it.
            if let Some(s) = self.sessions.get_mut(id) {
                s.awaiting_acks += 1;
            }
        }
        let pending = Pending {
            reply: Some((conn, reply)),
            tails: routed.tails,
            publisher: Some(id.clone()),
            rows: routed.rows,
            qos2_original,
            ..Pending::default()
        };
        self.submit_gated(now, routed.ops, pending, out);
    }

    /// Routes one message: the retained update, then a copy to every matching session. Returns
    /// how many sessions it reached and the durable effects: the retained row, and a row for
    /// each QoS 1/2 delivery to a persistent session.
    pub fn route(&mut self, now: Instant, msg: Arc<Message>, out: &mut dyn Outlet) -> Routed {
        let mut routed = Routed::default();
        let durable = self.persist.durable.is_some();
        let keep_retained = durable && !is_volatile(&msg.topic);
        if msg.retain {
            if msg.payload.is_empty() {
                self.retained.remove(&msg.topic);
                if keep_retained {
                    routed.ops.push(Op::RetainDelete(msg.topic.clone()));
                }
            } else {
                self.retained.set(msg.clone());
                if keep_retained {
                    let row = durable::retained_row(&msg, &self.persist.clock);
                    routed.ops.push(Op::RetainSet(row));
                }
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
                row: None,
            };
            merged.push((m.client, item));
        }
        self.matches = matches;
        routed.reached = merged.len();
        if !self.outs.is_empty() {
            self.route_up(&msg, &mut routed, out);
        }
        for (client, mut item) in merged {
            let Some(s) = self.sessions.get_mut(&client) else {
                continue;
            };
            if durable && s.stored && s.persistent() && item.qos != QoS::AtMostOnce {
                if !s.has_room(&self.cfg) {
                    // One neglected session must not fill the store: its newest goes.
                    s.drop_newest(&mut self.stats);
                    continue;
                }
                let id = self.next_row;
                self.next_row += 1;
                let row = durable::session_row(
                    &client,
                    &item.msg,
                    item.qos,
                    item.retain,
                    &item.sub_ids,
                    &self.persist.clock,
                );
                routed.ops.push(Op::Insert {
                    id: Some(id),
                    msg: row,
                });
                routed.rows.push((client.clone(), id));
                item.row = Some(id);
            }
            match s.enqueue(item, &self.cfg, &mut self.stats) {
                Enqueued::Ram if !s.stalled => {
                    s.pump(now, &self.cfg, &mut self.stats, out, &mut self.persist)
                }
                Enqueued::Tail => routed.tails.push(client),
                _ => {}
            }
        }
        routed
    }

    /// The bridge's share of a message: an outbox row in the same commit as the message's other
    /// effects (so the publisher's ack covers it), or a live QoS 0 send.
    fn route_up(&mut self, msg: &Arc<Message>, routed: &mut Routed, out: &mut dyn Outlet) {
        if matches!(msg.origin, Origin::Uplink | Origin::System) {
            // What came down never goes back up (the rules refuse loops; this is the guard).
            return;
        }
        let Some((rule, topic)) = self
            .outs
            .iter()
            .find_map(|r| r.map(&msg.topic).map(|t| (r, t)))
        else {
            return;
        };
        if topic.len() > u16::MAX as usize {
            // The rule's prefix pushed it past what MQTT can carry: it could only go up
            // mangled, as a poison row in the outbox.
            self.stats.bad_topics += 1;
            if self.stats.bad_topics.is_power_of_two() {
                tracing::warn!(filter = %rule.filter, len = topic.len(), total = self.stats.bad_topics,
                    "upstream topic longer than 65535 bytes; not sent up");
            }
            return;
        }
        routed.reached += 1;
        let retain = msg.retain && rule.retain;
        let durable = self.persist.durable.is_some();
        if durable && (rule.qos != QoS::AtMostOnce || rule.buffer) {
            let id = self.next_row;
            self.next_row += 1;
            let row = durable::outbox_row(
                rule.priority,
                topic,
                msg,
                rule.qos,
                retain,
                &self.persist.clock,
            );
            routed.ops.push(Op::Insert {
                id: Some(id),
                msg: row,
            });
            self.stats.outboxed += 1;
            return;
        }
        let mut props = msg.properties.clone();
        if let Some(left) = msg.remaining_expiry(msg.received_at) {
            props.message_expiry_interval = Some(left);
        }
        out.uplink_live(Publish {
            dup: false,
            qos: QoS::AtMostOnce,
            retain,
            topic,
            packet_id: 0,
            payload: msg.payload.clone(),
            properties: props,
        });
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
        let durable = s.stored && self.persist.durable.is_some();
        let mut ops = Vec::new();
        let mut tails = Vec::new();
        for (raw, options) in &sub.filters {
            let v5 = s.version.is_v5();
            let refusal = |v5_code: u8| {
                if v5 {
                    v5_code
                } else {
                    reason::UNSPECIFIED_ERROR
                }
            };
            let parsed = match topic::parse_subscription(raw) {
                Ok(p) if topic_problem(&self.cfg, p.filter).is_ok() => p,
                // The decoder already refused malformed filters; the hub refuses deep ones.
                _ => {
                    self.stats.bad_topics += 1;
                    codes.push(refusal(reason::TOPIC_FILTER_INVALID));
                    continue;
                }
            };
            if !s.subs.contains_key(raw) && s.subs.len() >= self.cfg.max_subscriptions_per_session {
                self.stats.refused_subscriptions += 1;
                tracing::info!(client = %id, filter = %raw, max = self.cfg.max_subscriptions_per_session,
                    "max_subscriptions_per_session reached; subscription refused");
                codes.push(refusal(reason::QUOTA_EXCEEDED));
                continue;
            }
            if !s.may(&self.cfg, parsed.filter, Access::Subscribe) {
                self.stats.denied += 1;
                tracing::debug!(client = %id, filter = %raw, "subscription denied by the ACL");
                codes.push(if s.version.is_v5() {
                    reason::NOT_AUTHORIZED
                } else {
                    reason::UNSPECIFIED_ERROR
                });
                continue;
            }
            let entry = Sub {
                options: *options,
                id: sub_id,
            };
            let new = self
                .subs
                .insert(parsed.share_group, parsed.filter, id, entry);
            s.subs.insert(raw.clone(), entry);
            codes.push(options.qos as u8);
            if durable {
                ops.push(Op::SubPut(StoredSubscription {
                    client_id: id.to_string(),
                    filter: raw.clone(),
                    options: options_to_byte(options),
                    sub_id,
                }));
            }
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
                    let mut item = Queued {
                        qos: m.qos.min(options.qos),
                        msg: m,
                        // [MQTT-3.3.1-8] retained messages sent on subscribe keep retain = 1.
                        retain: true,
                        sub_ids: sub_id.into_iter().collect(),
                        row: None,
                    };
                    if item.qos == QoS::AtMostOnce {
                        s.enqueue_retained(item);
                        continue;
                    }
                    if durable && s.persistent() {
                        if !s.has_room(&self.cfg) {
                            s.drop_newest(&mut self.stats);
                            continue;
                        }
                        // Stored like any delivery, in the same batch as the subscription.
                        let row = self.next_row;
                        self.next_row += 1;
                        let msg = durable::session_row(
                            id,
                            &item.msg,
                            item.qos,
                            true,
                            &item.sub_ids,
                            &self.persist.clock,
                        );
                        ops.push(Op::Insert { id: Some(row), msg });
                        item.row = Some(row);
                    }
                    if s.enqueue(item, &self.cfg, &mut self.stats) == Enqueued::Tail {
                        tails.push(id.clone());
                    }
                }
            }
        }
        let ack = Packet::SubAck(SubAck {
            packet_id: sub.packet_id,
            codes,
            properties: Props::default(),
        });
        if ops.is_empty() {
            return self.control(now, conn, id, ack, out);
        }
        // A persistent session's subscription is on disk before the client hears it exists.
        let pending = Pending {
            reply: Some((conn, ack)),
            tails,
            ..Pending::default()
        };
        self.submit_gated(now, ops, pending, out);
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
                    if s.stored {
                        self.persist.ops.push(Op::SubDelete {
                            client_id: id.to_string(),
                            filter: raw.clone(),
                        });
                    }
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
            s.expiry = match self.cfg.persistent_session_expiry {
                0 => e,
                cap => e.min(cap),
            };
        }
        let will = s.will.take();
        let expiry = s.expiry;
        if let Some(w) = will.filter(|_| why.publishes_will()) {
            let delay = will_delay(&w).min(expiry);
            if delay == 0 {
                let allowed = s.may(&self.cfg, &w.topic, Access::Write);
                self.publish_will(now, &id, w, allowed, out);
            } else if let Some(s) = self.sessions.get_mut(&id) {
                let due = now + Duration::from_secs(delay as u64);
                s.pending_will = Some(PendingWill { will: w, due });
                self.timers.insert((due, id.clone()));
            }
        }
        if expiry == 0 {
            self.end_session(now, &id, out);
            return;
        }
        let at = (expiry != NEVER_EXPIRES).then(|| now + Duration::from_secs(expiry as u64));
        if let Some(at) = at {
            self.timers.insert((at, id.clone()));
        }
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        s.expires_at = at;
        if s.stored {
            // Offline from now on: the expiry and any will still waiting out its delay are
            // recorded, so a restart keeps counting both.
            let row = stored_row(&self.persist.clock, s);
            self.persist.ops.push(Op::SessionPut(row));
        }
    }

    /// Ends a session: its subscriptions go, and a will still waiting out its delay is
    /// published now ([MQTT-3.1.3-9]: at the delay or at session end, whichever is first).
    fn end_session(&mut self, now: Instant, id: &Arc<str>, out: &mut dyn Outlet) {
        let Some(s) = self.sessions.remove(id) else {
            return;
        };
        unschedule(&mut self.timers, &s);
        if s.stored {
            self.persist.ops.push(Op::SessionDelete(id.to_string()));
        }
        for raw in s.subs.keys() {
            if let Ok(p) = topic::parse_subscription(raw) {
                self.subs.remove(p.share_group, p.filter, id);
            }
        }
        if let Some(w) = &s.pending_will {
            let allowed = s.may(&self.cfg, &w.will.topic, Access::Write);
            self.publish_will(now, id, w.will.clone(), allowed, out);
        }
    }

    /// Publishes a will, if the ACL in force now still lets its client write the topic: it
    /// was checked at CONNECT, but a reload may have changed the rules since.
    fn publish_will(
        &mut self,
        now: Instant,
        id: &Arc<str>,
        w: Will,
        allowed: bool,
        out: &mut dyn Outlet,
    ) {
        if !allowed {
            self.stats.denied += 1;
            tracing::info!(client = %id, topic = %w.topic, "will not published: the ACL no longer allows its topic");
            return;
        }
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
        let routed = self.route(now, msg, out);
        if !routed.ops.is_empty() {
            let pending = Pending {
                tails: routed.tails,
                rows: routed.rows,
                ..Pending::default()
            };
            self.submit_gated(now, routed.ops, pending, out);
        }
    }
}

/// Why `topic` (a name or a filter, as the hub will route it: mount point and all) cannot be
/// used, if it cannot. Every trie walk is as deep as a topic, so depth is bounded here.
fn topic_problem(cfg: &HubConfig, topic: &str) -> Result<(), &'static str> {
    if topic.len() > u16::MAX as usize {
        return Err("is longer than 65535 bytes");
    }
    if topic.split('/').nth(cfg.max_topic_levels).is_some() {
        return Err("has more levels than max_topic_levels");
    }
    Ok(())
}

/// User names in this namespace are MQTT-SN sensors (`sn:<client id>`): only MQTT-SN
/// connections carry them, so an ACL's `user sn:...` section is a sensor and nothing else.
pub const SN_USER_PREFIX: &str = "sn:";

/// An MQTT-SN client's connection (the gateway numbers them from `SN_CONN_BASE`).
fn is_sn(conn: ConnId) -> bool {
    conn >= crate::proto::mqttsn::gateway::SN_CONN_BASE
}

/// Takes a session's will-delay and expiry entries out of the timers.
fn unschedule(timers: &mut BTreeSet<(Instant, Arc<str>)>, s: &Session) {
    if let Some(at) = s.expires_at {
        timers.remove(&(at, s.id.clone()));
    }
    if let Some(w) = &s.pending_will {
        timers.remove(&(w.due, s.id.clone()));
    }
}

/// `$SYS/` topics describe this run: kept retained in memory, never written to the store, so a
/// status refresh every few seconds costs the SD card nothing and a restart shows no stale one.
fn is_volatile(topic: &str) -> bool {
    topic.starts_with("$SYS/")
}

/// Whether the ACL in `cfg` lets `client_id` (as `username`) do `access` on `topic`. Without
/// an ACL everything is allowed; outpost's own sessions (`exempt`) are not bound by it.
fn acl_permits(
    cfg: &HubConfig,
    exempt: bool,
    client_id: &str,
    username: Option<&str>,
    topic: &str,
    access: Access,
) -> bool {
    if exempt {
        return true;
    }
    if access == Access::Write && topic.starts_with('$') {
        // `$SYS/` and its kin are the server's: a device that could write them could fake
        // the uplink's state for everyone who reads it.
        return false;
    }
    match &cfg.acl {
        Some(acl) => acl.check(client_id, username, topic, access),
        None => true,
    }
}

/// A session's row as the store keeps it, from its state now.
fn stored_row(clock: &Clock, s: &Session) -> StoredSession {
    let (will, will_due_ms) = match (&s.pending_will, &s.will) {
        (Some(p), _) => (durable::encode_will(&p.will), Some(clock.unix_ms(p.due))),
        (None, Some(w)) => (durable::encode_will(w), None),
        (None, None) => (None, None),
    };
    StoredSession {
        client_id: s.id.to_string(),
        username: s.username.as_deref().map(str::to_owned),
        version: s.version.level(),
        expiry: s.expiry,
        expires_ms: s.expires_at.map(|a| clock.unix_ms(a)),
        will,
        will_due_ms,
    }
}

/// The SUBSCRIBE options byte, as the store keeps it.
fn options_to_byte(o: &SubOptions) -> u8 {
    o.qos as u8
        | (o.no_local as u8) << 2
        | (o.retain_as_published as u8) << 3
        | (o.retain_handling & 3) << 4
}

fn options_from_byte(b: u8) -> SubOptions {
    SubOptions {
        qos: QoS::from_bits(b & 3).unwrap_or(QoS::AtMostOnce),
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: (b >> 4) & 3,
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
