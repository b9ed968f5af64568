//! One client session as the hub keeps it: subscriptions, the queue of messages waiting for the
//! client, the outbound inflight window, inbound QoS 2 state, and the will.
//!
//! The session never blocks: it hands packets to an `Outlet` and, when the connection's queue is
//! full, stops and waits for `Ready`. A persistent session's QoS 1/2 deliveries are rows in the
//! store as well: once its RAM queue is full (or after a restart) new ones live only in the
//! store, as its "tail", and are read back in windows as the client drains them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use super::durable::{from_row, Clock, Durable};
use super::message::Message;
use super::tree::Sub;
use super::{ConnId, HubConfig, Outlet, Stats};
use crate::auth::Access;
use crate::proto::mqtt::{encode::encoded_len, Ack, Packet, Publish, QoS, Version, Will};
use crate::store::Op;

/// How many control packets (acks) may wait for a connection that is not reading. Past this the
/// client is too slow to keep and is disconnected; a normal client never gets near it because
/// Receive Maximum bounds its unacknowledged publishes.
pub const CONTROL_BACKLOG: usize = 4096;

/// Session expiry that means "never" (v5 0xFFFFFFFF; 3.1.1 clean session 0).
pub const NEVER_EXPIRES: u32 = u32::MAX;

/// A message waiting for this session, with the QoS and flags of this delivery.
#[derive(Debug, Clone)]
pub struct Queued {
    pub msg: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub sub_ids: Vec<u32>,
    /// The store row that makes this delivery durable (persistent sessions, QoS 1/2).
    pub row: Option<i64>,
}

/// Where an outbound QoS 1/2 message stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InflightState {
    /// QoS 1 PUBLISH sent, PUBACK awaited.
    AwaitAck,
    /// QoS 2 PUBLISH sent, PUBREC awaited.
    AwaitRec,
    /// PUBREL sent, PUBCOMP awaited.
    AwaitComp,
}

#[derive(Debug, Clone)]
pub struct Inflight {
    pub pid: u16,
    pub item: Queued,
    pub state: InflightState,
}

/// A will waiting out its Will Delay Interval.
#[derive(Debug, Clone)]
pub struct PendingWill {
    pub will: Will,
    pub due: Instant,
}

/// The durable side of the hub, lent to sessions while they work.
pub struct Persist {
    pub durable: Option<Box<dyn Durable>>,
    pub clock: Clock,
    /// Effects nobody waits for (deletes after acks, state changes), flushed at the end of
    /// every hub input, so they always follow the inserts they refer to.
    pub ops: Vec<Op>,
}

/// What `Session::enqueue` did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// In the RAM queue.
    Ram,
    /// Only in the store (the session's tail); read back when the client has room.
    Tail,
    /// Not kept (offline QoS 0, or a full queue of a non-persistent session).
    Dropped,
}

/// The hub's record of one client id.
#[derive(Debug)]
pub struct Session {
    pub id: Arc<str>,
    /// The live connection, or `None` while the session waits offline.
    pub conn: Option<ConnId>,
    pub version: Version,
    /// Seconds the session outlives its connection; `NEVER_EXPIRES` for ever.
    pub expiry: u32,
    pub expires_at: Option<Instant>,
    pub will: Option<Will>,
    pub pending_will: Option<PendingWill>,
    /// Raw filter as subscribed (including any `$share/group/` prefix) to its options.
    pub subs: HashMap<String, Sub>,
    pub queue: VecDeque<Queued>,
    pub inflight: VecDeque<Inflight>,
    next_pid: u16,
    /// QoS 2 packet ids received and PUBREC'd, awaiting PUBREL: a DUP of one is not routed again.
    /// Each maps to the generation of the message that took it, so an answer gated on one
    /// message is never taken for a later one that reused the id.
    pub inbound_qos2: HashMap<u16, u64>,
    pub control: VecDeque<Packet>,
    /// The client's Receive Maximum.
    pub receive_max: u16,
    /// The client's Maximum Packet Size.
    pub max_packet: u32,
    /// The connection's queue was full; wait for `Ready` before pumping again.
    pub stalled: bool,
    /// The store holds this session (written once it became persistent).
    pub stored: bool,
    /// Rows above `last_row` exist in the store that are not in RAM.
    pub tail: bool,
    /// The highest row id that has been in RAM (queue or inflight).
    pub last_row: i64,
    /// Tail rows submitted and not yet committed: a short read does not prove the tail empty.
    pub uncommitted_tail: usize,
    /// Rows of the tail, committed or not: with `queue` what `max_queued` bounds.
    pub tail_rows: usize,
    /// This client's QoS 1 publishes whose PUBACK waits for a commit. With `inbound_qos2`
    /// (QoS 2 from routing to PUBCOMP) it is what counts against our Receive Maximum.
    pub awaiting_acks: usize,
    /// The connection asked (PINGREQ) to hear once nothing is queued or in flight.
    pub idle_probe: bool,
    /// Who the ACL sees: the user name of the current connection (MQTT-SN: the client id).
    /// Set at every CONNECT; a session restored from the store gets it when its client is back,
    /// which is also the first time anything is delivered to it.
    pub username: Option<Arc<str>>,
    /// outpost's own sessions (serial ports, GPIO) are configured by the same admin who writes
    /// the ACL; they are not bound by it.
    pub acl_exempt: bool,
    /// `expires_at` and the pending will's `due` came from wall-clock dates in the store (a
    /// restored offline session): a step of the wall clock moves them too.
    pub wall_deadlines: bool,
}

impl Session {
    pub fn new(id: Arc<str>, version: Version) -> Self {
        Session {
            id,
            conn: None,
            version,
            expiry: 0,
            expires_at: None,
            will: None,
            pending_will: None,
            subs: HashMap::new(),
            queue: VecDeque::new(),
            inflight: VecDeque::new(),
            next_pid: 0,
            inbound_qos2: HashMap::new(),
            control: VecDeque::new(),
            receive_max: u16::MAX,
            max_packet: u32::MAX,
            idle_probe: false,
            stalled: false,
            stored: false,
            tail: false,
            last_row: 0,
            uncommitted_tail: 0,
            tail_rows: 0,
            awaiting_acks: 0,
            username: None,
            acl_exempt: false,
            wall_deadlines: false,
        }
    }

    /// Whether the ACL in `cfg` lets this session do `access` on `topic`.
    pub fn may(&self, cfg: &HubConfig, topic: &str, access: Access) -> bool {
        super::acl_permits(
            cfg,
            self.acl_exempt,
            &self.id,
            self.username.as_deref(),
            topic,
            access,
        )
    }

    /// A session that outlives its connection, and so keeps its state in the store.
    pub fn persistent(&self) -> bool {
        self.expiry > 0
    }

    /// Whether one more message may be queued: `max_queued` bounds what waits beyond the
    /// inflight window, in RAM and in the store's tail together, for every session.
    pub fn has_room(&self, cfg: &HubConfig) -> bool {
        self.queue.len() + self.tail_rows < cfg.max_queued
    }

    /// Counts a message dropped because the session's queue is full (the newest goes, as
    /// with mosquitto's `max_queued_messages`).
    pub fn drop_newest(&self, stats: &mut Stats) {
        stats.dropped_queue_full += 1;
        if stats.dropped_queue_full.is_power_of_two() {
            tracing::warn!(client = %self.id, total = stats.dropped_queue_full,
                "session queue full, dropping newest message");
        }
    }

    /// Adds a message for this session. Offline sessions keep QoS 1/2 only, as MQTT asks.
    ///
    /// The caller checked `has_room` before giving a message a store row. A stored message
    /// joins the tail while there is one (order kept: once there is a tail, everything new goes
    /// there). Anything else past `max_queued` is dropped, newest first, and counted.
    pub fn enqueue(&mut self, item: Queued, cfg: &HubConfig, stats: &mut Stats) -> Enqueued {
        if self.conn.is_none() && item.qos == QoS::AtMostOnce {
            return Enqueued::Dropped;
        }
        if let Some(row) = item.row {
            if self.tail || self.queue.len() >= cfg.max_queued {
                self.tail = true;
                self.tail_rows += 1;
                self.uncommitted_tail += 1;
                return Enqueued::Tail;
            }
            self.last_row = self.last_row.max(row);
        } else if self.tail || !self.has_room(cfg) {
            self.drop_newest(stats);
            return Enqueued::Dropped;
        }
        self.queue.push_back(item);
        Enqueued::Ram
    }

    /// A retained QoS 0 message sent on SUBSCRIBE: it is in RAM already (the retained
    /// index), so it joins the queue whatever `max_queued` says, as mosquitto sends them all;
    /// the connection's own back-pressure paces it.
    pub fn enqueue_retained(&mut self, item: Queued) {
        if self.conn.is_some() {
            self.queue.push_back(item);
        }
    }

    /// Queues an ack or other control packet. Returns false when the client has stopped
    /// reading so long that it must be disconnected.
    pub fn push_control(&mut self, packet: Packet) -> bool {
        if self.control.len() >= CONTROL_BACKLOG {
            return false;
        }
        self.control.push_back(packet);
        true
    }

    fn peek_pid(&self) -> u16 {
        let mut pid = self.next_pid;
        loop {
            pid = pid.wrapping_add(1);
            if pid == 0 {
                pid = 1;
            }
            if !self.inflight.iter().any(|f| f.pid == pid) {
                return pid;
            }
        }
    }

    /// Builds the PUBLISH for one delivery. Per-hop properties are set here: subscription ids
    /// and the remaining message expiry.
    pub fn publish_for(&self, item: &Queued, pid: u16, dup: bool, now: Instant) -> Publish {
        let mut props = if self.version.is_v5() {
            item.msg.properties.clone()
        } else {
            Default::default()
        };
        if self.version.is_v5() {
            // Written only when set, so a message without properties stays unallocated.
            if !item.sub_ids.is_empty() {
                props.subscription_identifiers = item.sub_ids.clone();
            }
            if let Some(left) = item.msg.remaining_expiry(now) {
                props.message_expiry_interval = Some(left);
            }
        }
        Publish {
            dup,
            qos: item.qos,
            retain: item.retain,
            topic: item.msg.topic.clone(),
            packet_id: pid,
            payload: item.msg.payload.clone(),
            properties: props,
        }
    }

    /// Reads the next window of the tail from the store into RAM. Rows the client already had
    /// in flight before a restart go straight back into the inflight window, to be resent.
    fn refill(&mut self, now: Instant, cfg: &HubConfig, p: &mut Persist) {
        if !self.tail || self.queue.len() >= cfg.max_queued / 2 {
            return;
        }
        let Some(d) = p.durable.as_mut() else {
            self.tail = false;
            return;
        };
        let want = cfg.max_queued - self.queue.len();
        let rows = d.read_queue(&self.id, self.last_row, want);
        let short = rows.len() < want;
        self.tail_rows = self.tail_rows.saturating_sub(rows.len());
        for row in rows {
            self.last_row = self.last_row.max(row.id);
            let Some((msg, qos, sub_ids)) = from_row(&row, &p.clock, now) else {
                tracing::warn!(client = %self.id, row = row.id, "dropping a stored message that does not decode");
                p.ops.push(Op::Delete(row.id));
                continue;
            };
            let item = Queued {
                msg,
                qos,
                retain: row.msg.retain,
                sub_ids,
                row: Some(row.id),
            };
            match (row.state, row.packet_id, qos) {
                (1, Some(pid), QoS::ExactlyOnce) => {
                    self.control
                        .push_back(Packet::Publish(self.publish_for(&item, pid, true, now)));
                    self.inflight.push_back(Inflight {
                        pid,
                        item,
                        state: InflightState::AwaitRec,
                    });
                }
                (2, Some(pid), _) => {
                    self.control.push_back(Packet::PubRel(Ack {
                        packet_id: pid,
                        ..Ack::default()
                    }));
                    self.inflight.push_back(Inflight {
                        pid,
                        item,
                        state: InflightState::AwaitComp,
                    });
                }
                _ => self.queue.push_back(item),
            }
        }
        if short && self.uncommitted_tail == 0 {
            self.tail = false;
            self.tail_rows = 0;
        }
    }

    /// Sends what the connection has room for: control packets first, then queued messages
    /// while the inflight window allows.
    pub fn pump(
        &mut self,
        now: Instant,
        cfg: &HubConfig,
        stats: &mut Stats,
        out: &mut dyn Outlet,
        p: &mut Persist,
    ) {
        let Some(conn) = self.conn else { return };
        self.stalled = false;
        loop {
            while let Some(c) = self.control.pop_front() {
                if let Err(c) = out.try_send(conn, c) {
                    self.control.push_front(c);
                    self.stalled = true;
                    return;
                }
            }
            self.refill(now, cfg, p);
            if !self.control.is_empty() {
                continue;
            }
            break;
        }
        let window = cfg.max_inflight.min(self.receive_max) as usize;
        loop {
            if self.queue.is_empty() {
                self.refill(now, cfg, p);
            }
            let Some(front) = self.queue.front() else {
                break;
            };
            if front.msg.expired(now) {
                if let Some(row) = front.row {
                    p.ops.push(Op::Delete(row));
                }
                self.queue.pop_front();
                stats.expired += 1;
                continue;
            }
            if !self.may(cfg, &front.msg.topic, Access::Read) {
                // Checked at delivery as well as at subscribe: a `deny` inside a granted
                // filter, a retained message, or a queue from before an ACL reload.
                if let Some(row) = front.row {
                    p.ops.push(Op::Delete(row));
                }
                self.queue.pop_front();
                stats.denied += 1;
                continue;
            }
            let qos = front.qos;
            if qos != QoS::AtMostOnce && self.inflight.len() >= window {
                break;
            }
            let pid = if qos == QoS::AtMostOnce {
                0
            } else {
                self.peek_pid()
            };
            let publish = Packet::Publish(self.publish_for(front, pid, false, now));
            if encoded_len(&publish, self.version) > self.max_packet as usize {
                // [MQTT-3.1.2-25] too large for the client: discard as if delivered.
                if let Some(row) = front.row {
                    p.ops.push(Op::Delete(row));
                }
                self.queue.pop_front();
                stats.dropped_too_large += 1;
                continue;
            }
            if out.try_send(conn, publish).is_err() {
                self.stalled = true;
                return;
            }
            stats.sent += 1;
            let Some(item) = self.queue.pop_front() else {
                break;
            };
            match qos {
                QoS::AtMostOnce => {}
                QoS::AtLeastOnce => {
                    self.next_pid = pid;
                    self.inflight.push_back(Inflight {
                        pid,
                        item,
                        state: InflightState::AwaitAck,
                    });
                }
                QoS::ExactlyOnce => {
                    self.next_pid = pid;
                    // The packet id is kept with the row: after a restart the same id goes out
                    // again, so the client recognises the duplicate.
                    if let Some(row) = item.row {
                        p.ops.push(Op::SetState {
                            id: row,
                            state: 1,
                            packet_id: Some(pid),
                        });
                    }
                    self.inflight.push_back(Inflight {
                        pid,
                        item,
                        state: InflightState::AwaitRec,
                    });
                }
            }
        }
        if self.idle_probe
            && self.queue.is_empty()
            && self.inflight.is_empty()
            && !self.tail
            && self.uncommitted_tail == 0
        {
            if out.try_send(conn, Packet::PingResp).is_err() {
                self.stalled = true;
                return;
            }
            self.idle_probe = false;
        }
    }

    /// After a reconnect with the session present: every unacknowledged PUBLISH goes again with
    /// DUP set and the same packet id, and every PUBREL goes again ([MQTT-4.4.0-1]).
    pub fn queue_resends(&mut self, now: Instant) {
        let mut resends = Vec::with_capacity(self.inflight.len());
        for f in &self.inflight {
            resends.push(match f.state {
                InflightState::AwaitComp => Packet::PubRel(Ack {
                    packet_id: f.pid,
                    ..Ack::default()
                }),
                _ => Packet::Publish(self.publish_for(&f.item, f.pid, true, now)),
            });
        }
        self.control.extend(resends);
    }

    /// Removes the inflight entry `pid` if it is in `state`.
    pub fn take_inflight(&mut self, pid: u16, state: InflightState) -> Option<Inflight> {
        let i = self
            .inflight
            .iter()
            .position(|f| f.pid == pid && f.state == state)?;
        self.inflight.remove(i)
    }

    /// Going offline: QoS 0 messages are not kept for an offline session.
    pub fn drop_volatile(&mut self) {
        self.queue.retain(|q| q.qos != QoS::AtMostOnce);
    }
}
