//! The hub driven without a network: a fake outlet records what each connection would be sent,
//! and time is whatever `Instant` the test hands in.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::durable;
use super::*;
use crate::proto::mqtt::{Properties, SubOptions, Will};

/// Issue 18: deep topics, identities, and the bounds that protect the store.
mod bounds;

#[derive(Default)]
struct FakeOutlet {
    sent: HashMap<ConnId, Vec<Packet>>,
    closed: HashMap<ConnId, Option<Packet>>,
    /// Per-connection capacity; absent means unlimited.
    room: HashMap<ConnId, usize>,
}

impl Outlet for FakeOutlet {
    fn try_send(&mut self, conn: ConnId, p: Packet) -> Result<(), Packet> {
        if let Some(r) = self.room.get_mut(&conn) {
            if *r == 0 {
                return Err(p);
            }
            *r -= 1;
        }
        self.sent.entry(conn).or_default().push(p);
        Ok(())
    }
    fn close(&mut self, conn: ConnId, last: Option<Packet>) {
        self.closed.insert(conn, last);
    }
}

impl FakeOutlet {
    fn take(&mut self, conn: ConnId) -> Vec<Packet> {
        self.sent.remove(&conn).unwrap_or_default()
    }
    fn publishes(&mut self, conn: ConnId) -> Vec<Publish> {
        self.take(conn)
            .into_iter()
            .filter_map(|p| match p {
                Packet::Publish(p) => Some(p),
                _ => None,
            })
            .collect()
    }
}

struct T {
    hub: Hub,
    out: FakeOutlet,
    now: Instant,
}

fn t() -> T {
    T {
        hub: Hub::new(HubConfig::default()),
        out: FakeOutlet::default(),
        now: Instant::now(),
    }
}

fn connect(v: Version, id: &str, clean: bool) -> Connect {
    Connect {
        version: v,
        clean_start: clean,
        keep_alive: 60,
        client_id: id.into(),
        will: None,
        username: None,
        password: None,
        properties: Props::default(),
    }
}

/// A will on `topic` with `payload` at `qos`, no properties.
fn will(topic: &str, payload: &'static [u8], qos: QoS) -> Option<Will> {
    Some(Will {
        topic: topic.into(),
        payload: Bytes::from_static(payload),
        qos,
        retain: false,
        properties: Props::default(),
    })
}

fn opts(q: QoS) -> SubOptions {
    SubOptions {
        qos: q,
        ..SubOptions::default()
    }
}

fn msg(topic: &str, payload: &str, qos: QoS, pid: u16) -> Publish {
    Publish {
        qos,
        topic: topic.into(),
        packet_id: pid,
        payload: Bytes::copy_from_slice(payload.as_bytes()),
        ..Publish::default()
    }
}

impl T {
    fn input(&mut self, i: HubInput) {
        self.hub.handle(self.now, i, &mut self.out);
    }
    fn connect_with(&mut self, conn: ConnId, c: Connect) -> ConnAck {
        self.input(HubInput::Connect {
            conn,
            keep_alive: c.keep_alive,
            connect: Box::new(c),
        });
        match self.out.sent.get_mut(&conn).map(|v| v.remove(0)) {
            Some(Packet::ConnAck(a)) => a,
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }
    fn connect(&mut self, conn: ConnId, v: Version, id: &str, clean: bool) -> ConnAck {
        self.connect_with(conn, connect(v, id, clean))
    }
    fn packet(&mut self, conn: ConnId, p: Packet) {
        self.input(HubInput::Packet { conn, packet: p });
    }
    fn subscribe(&mut self, conn: ConnId, filter: &str, o: SubOptions, id: Option<u32>) -> Vec<u8> {
        let mut properties = Properties::default();
        properties.subscription_identifiers.extend(id);
        self.packet(
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![(filter.into(), o)],
                properties: properties.into(),
            }),
        );
        match self.out.sent.get_mut(&conn).map(|v| v.remove(0)) {
            Some(Packet::SubAck(a)) => a.codes,
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }
    fn publish(&mut self, conn: ConnId, p: Publish) {
        self.packet(conn, Packet::Publish(p));
    }
    fn close(&mut self, conn: ConnId, reason: CloseReason) {
        self.input(HubInput::Closed {
            conn,
            reason,
            notify: None,
        });
    }
    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.hub.handle_timeout(self.now, &mut self.out);
    }
}

const LOST: CloseReason = CloseReason::ConnectionLost;
const BYE: CloseReason = CloseReason::Disconnect {
    with_will: false,
    session_expiry: None,
};

#[test]
fn publish_subscribe_qos1_roundtrip() {
    let mut t = t();
    t.connect(1, Version::V311, "sub", true);
    t.connect(2, Version::V311, "pub", true);
    assert_eq!(t.subscribe(1, "a/+", opts(QoS::AtLeastOnce), None), vec![1]);
    t.publish(2, msg("a/b", "hi", QoS::AtLeastOnce, 10));
    assert_eq!(
        t.out.take(2),
        vec![Packet::PubAck(Ack {
            packet_id: 10,
            ..Ack::default()
        })]
    );
    let got = t.out.publishes(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].qos, QoS::AtLeastOnce);
    assert_eq!(&got[0].payload[..], b"hi");
    assert!(!got[0].retain);
    let pid = got[0].packet_id;
    assert_ne!(pid, 0);
    t.packet(
        1,
        Packet::PubAck(Ack {
            packet_id: pid,
            ..Ack::default()
        }),
    );
    assert_eq!(t.hub.sessions.get("sub").map(|s| s.inflight.len()), Some(0));
}

#[test]
fn qos_is_downgraded_and_overlaps_give_one_copy_at_highest_qos() {
    let mut t = t();
    t.connect(1, Version::V5, "sub", true);
    t.connect(2, Version::V5, "pub", true);
    t.subscribe(1, "a/#", opts(QoS::AtMostOnce), Some(1));
    t.subscribe(1, "a/+", opts(QoS::ExactlyOnce), Some(2));
    t.publish(2, msg("a/b", "x", QoS::AtLeastOnce, 1));
    let got = t.out.publishes(1);
    assert_eq!(got.len(), 1, "one copy for overlapping subscriptions");
    assert_eq!(
        got[0].qos,
        QoS::AtLeastOnce,
        "min(published, highest granted)"
    );
    let mut ids = got[0].properties.subscription_identifiers.clone();
    ids.sort();
    assert_eq!(ids, vec![1, 2]);
}

#[test]
fn dollar_topics_not_matched_by_leading_wildcards() {
    let mut t = t();
    t.connect(1, Version::V311, "sub", true);
    t.connect(2, Version::V311, "pub", true);
    t.subscribe(1, "#", opts(QoS::AtMostOnce), None);
    t.subscribe(1, "+/x", opts(QoS::AtMostOnce), None);
    // Only outpost itself publishes to `$` topics.
    let sys = || HubInput::System {
        topic: "$SYS/x".into(),
        payload: Bytes::from_static(b"x"),
        retain: false,
    };
    t.input(sys());
    assert!(t.out.publishes(1).is_empty());
    t.subscribe(1, "$SYS/#", opts(QoS::AtMostOnce), None);
    t.input(sys());
    assert_eq!(t.out.publishes(1).len(), 1);
}

#[test]
fn retained_set_delivered_on_subscribe_and_deleted() {
    let mut t = t();
    t.connect(2, Version::V5, "pub", true);
    let mut p = msg("r/1", "keep", QoS::AtLeastOnce, 1);
    p.retain = true;
    t.publish(2, p);
    t.connect(1, Version::V5, "sub", true);
    t.subscribe(1, "r/#", opts(QoS::AtMostOnce), None);
    let got = t.out.publishes(1);
    assert_eq!(got.len(), 1);
    assert!(got[0].retain, "retained on subscribe keeps retain=1");
    assert_eq!(got[0].qos, QoS::AtMostOnce);
    // retain handling 1: only for a new subscription.
    let mut o = opts(QoS::AtMostOnce);
    o.retain_handling = 1;
    t.subscribe(1, "r/#", o, None);
    assert!(t.out.publishes(1).is_empty());
    // retain handling 2: never.
    o.retain_handling = 2;
    t.subscribe(1, "r/+", o, None);
    assert!(t.out.publishes(1).is_empty());
    // A live retained publish reaches subscribers with retain=0 unless retain-as-published.
    let mut p = msg("r/1", "", QoS::AtMostOnce, 0);
    p.retain = true;
    t.publish(2, p);
    let live = t.out.publishes(1);
    assert!(live.iter().all(|p| !p.retain));
    assert_eq!(t.hub.retained(), 0, "empty payload deletes");
}

#[test]
fn will_on_abnormal_close_not_on_disconnect() {
    let mut t = t();
    t.connect(1, Version::V311, "watch", true);
    t.subscribe(1, "will/#", opts(QoS::AtLeastOnce), None);
    for (conn, reason, expect) in [(2, LOST, 1), (3, BYE, 0)] {
        let mut c = connect(Version::V311, "dier", true);
        c.will = will("will/dier", b"gone", QoS::AtLeastOnce);
        t.connect_with(conn, c);
        t.close(conn, reason.clone());
        assert_eq!(t.out.publishes(1).len(), expect, "{reason:?}");
    }
}

#[test]
fn will_delay_cancelled_by_reconnect_and_fired_after_delay() {
    let mut t = t();
    t.connect(1, Version::V5, "watch", true);
    t.subscribe(1, "will/#", opts(QoS::AtMostOnce), None);
    let mk = || {
        let mut c = connect(Version::V5, "dier", false);
        c.properties.session_expiry_interval = Some(100);
        c.will = Some(Will {
            topic: "will/dier".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties {
                will_delay_interval: Some(5),
                ..Properties::default()
            }
            .into(),
        });
        c
    };
    t.connect_with(2, mk());
    t.close(2, LOST);
    t.advance(Duration::from_secs(2));
    assert!(t.out.publishes(1).is_empty());
    let ack = t.connect_with(3, mk());
    assert!(ack.session_present);
    t.advance(Duration::from_secs(10));
    assert!(
        t.out.publishes(1).is_empty(),
        "reconnect cancels the delayed will"
    );
    t.close(3, LOST);
    t.advance(Duration::from_secs(4));
    assert!(t.out.publishes(1).is_empty());
    t.advance(Duration::from_secs(2));
    assert_eq!(t.out.publishes(1).len(), 1, "fires after the delay");
}

#[test]
fn disconnect_with_will_publishes_it() {
    let mut t = t();
    t.connect(1, Version::V5, "watch", true);
    t.subscribe(1, "w", opts(QoS::AtMostOnce), None);
    let mut c = connect(Version::V5, "d", true);
    c.will = will("w", b"x", QoS::AtMostOnce);
    t.connect_with(2, c);
    t.close(
        2,
        CloseReason::Disconnect {
            with_will: true,
            session_expiry: None,
        },
    );
    assert_eq!(t.out.publishes(1).len(), 1);
}

#[test]
fn takeover_closes_old_connection_with_0x8e() {
    let mut t = t();
    t.connect(1, Version::V5, "same", false);
    let ack = t.connect(2, Version::V5, "same", false);
    assert_eq!(
        t.out.closed.get(&1),
        Some(&Some(Packet::Disconnect(Disconnect {
            reason: reason::SESSION_TAKEN_OVER,
            properties: Props::default()
        })))
    );
    assert!(
        !ack.session_present,
        "v5 with session expiry 0 did not keep the session"
    );
    // The old connection's late Closed must not detach the new one.
    t.close(1, LOST);
    assert_eq!(t.hub.connected(), 1);
}

#[test]
fn persistent_session_queues_offline_and_resends_inflight_with_dup() {
    let mut t = t();
    t.connect(1, Version::V311, "p", false);
    t.connect(9, Version::V311, "pub", true);
    t.subscribe(1, "q", opts(QoS::ExactlyOnce), None);
    t.publish(9, msg("q", "inflight", QoS::AtLeastOnce, 1));
    assert_eq!(t.out.publishes(1).len(), 1);
    t.close(1, LOST);
    for i in 0..3 {
        t.publish(9, msg("q", &format!("m{i}"), QoS::ExactlyOnce, 2 + i));
    }
    t.publish(9, msg("q", "qos0 dropped offline", QoS::AtMostOnce, 0));
    let ack = t.connect(2, Version::V311, "p", false);
    assert!(ack.session_present);
    let got = t.out.publishes(2);
    let payloads: Vec<&[u8]> = got.iter().map(|p| &p.payload[..]).collect();
    assert_eq!(payloads, vec![&b"inflight"[..], b"m0", b"m1", b"m2"]);
    assert!(got[0].dup, "resent inflight has DUP");
    assert!(got[1..].iter().all(|p| !p.dup));
}

#[test]
fn clean_session_discards_and_v5_expiry_ends_session() {
    let mut t = t();
    let mut c = connect(Version::V5, "e", false);
    c.properties.session_expiry_interval = Some(30);
    t.connect_with(1, c.clone());
    t.subscribe(1, "x", opts(QoS::AtLeastOnce), None);
    t.close(1, LOST);
    t.advance(Duration::from_secs(29));
    assert_eq!(t.hub.sessions(), 1);
    t.advance(Duration::from_secs(2));
    assert_eq!(t.hub.sessions(), 0);
    let ack = t.connect_with(2, c);
    assert!(!ack.session_present);
}

#[test]
fn slow_connection_stalls_then_resumes_on_ready() {
    let mut t = t();
    t.connect(1, Version::V311, "slow", true);
    t.connect(2, Version::V311, "pub", true);
    t.subscribe(1, "s", opts(QoS::AtMostOnce), None);
    t.out.room.insert(1, 2);
    for i in 0..5 {
        t.publish(2, msg("s", &i.to_string(), QoS::AtMostOnce, 0));
    }
    assert_eq!(t.out.publishes(1).len(), 2);
    t.out.room.insert(1, 100);
    t.input(HubInput::Ready { conn: 1 });
    let rest: Vec<String> = t
        .out
        .publishes(1)
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(rest, ["2", "3", "4"], "order kept across the stall");
}

#[test]
fn inflight_window_respects_client_receive_maximum() {
    let mut t = t();
    let mut c = connect(Version::V5, "rm", true);
    c.properties.receive_maximum = Some(2);
    t.connect_with(1, c);
    t.connect(2, Version::V5, "pub", true);
    t.subscribe(1, "w", opts(QoS::AtLeastOnce), None);
    for i in 0..5 {
        t.publish(2, msg("w", &i.to_string(), QoS::AtLeastOnce, 1 + i));
    }
    let first = t.out.publishes(1);
    assert_eq!(first.len(), 2);
    t.packet(
        1,
        Packet::PubAck(Ack {
            packet_id: first[0].packet_id,
            ..Ack::default()
        }),
    );
    assert_eq!(t.out.publishes(1).len(), 1);
}

#[test]
fn no_local_and_shared_round_robin() {
    let mut t = t();
    t.connect(1, Version::V5, "a", true);
    t.connect(2, Version::V5, "b", true);
    let mut nl = opts(QoS::AtMostOnce);
    nl.no_local = true;
    t.subscribe(1, "n", nl, None);
    t.publish(1, msg("n", "own", QoS::AtMostOnce, 0));
    assert!(t.out.publishes(1).is_empty());
    t.subscribe(1, "$share/g/s", opts(QoS::AtMostOnce), None);
    t.subscribe(2, "$share/g/s", opts(QoS::AtMostOnce), None);
    for _ in 0..4 {
        t.publish(1, msg("s", "x", QoS::AtMostOnce, 0));
    }
    assert_eq!(t.out.publishes(1).len(), 2);
    assert_eq!(t.out.publishes(2).len(), 2);
}

#[test]
fn qos2_duplicate_is_not_delivered_twice() {
    let mut t = t();
    t.connect(1, Version::V311, "sub", true);
    t.connect(2, Version::V311, "pub", true);
    t.subscribe(1, "d", opts(QoS::ExactlyOnce), None);
    t.publish(2, msg("d", "once", QoS::ExactlyOnce, 5));
    let mut again = msg("d", "once", QoS::ExactlyOnce, 5);
    again.dup = true;
    t.publish(2, again);
    assert_eq!(t.out.publishes(1).len(), 1);
    let acks = t.out.take(2);
    assert!(acks
        .iter()
        .all(|p| matches!(p, Packet::PubRec(a) if a.packet_id == 5)));
    t.packet(
        2,
        Packet::PubRel(Ack {
            packet_id: 5,
            ..Ack::default()
        }),
    );
    assert_eq!(
        t.out.take(2),
        vec![Packet::PubComp(Ack {
            packet_id: 5,
            ..Ack::default()
        })]
    );
}

#[test]
fn receive_maximum_exceeded_disconnects_with_0x93() {
    let mut t = t();
    t.connect(1, Version::V5, "greedy", true);
    for pid in 1..=100u16 {
        t.publish(1, msg("x", "", QoS::ExactlyOnce, pid));
    }
    assert!(t.out.closed.is_empty());
    t.publish(1, msg("x", "", QoS::ExactlyOnce, 101));
    assert_eq!(
        t.out.closed.get(&1),
        Some(&Some(Packet::Disconnect(Disconnect {
            reason: reason::RECEIVE_MAXIMUM_EXCEEDED,
            properties: Props::default()
        })))
    );
}

#[test]
fn expired_messages_are_dropped_and_remaining_expiry_sent() {
    let mut t = t();
    t.connect(1, Version::V5, "late", false);
    t.connect(2, Version::V5, "pub", true);
    let mut c = connect(Version::V5, "late", false);
    c.properties.session_expiry_interval = Some(1000);
    t.connect_with(1, c.clone());
    t.subscribe(1, "e", opts(QoS::AtLeastOnce), None);
    t.close(1, LOST);
    for (payload, exp) in [("short", 5), ("long", 100)] {
        let mut p = msg("e", payload, QoS::AtLeastOnce, 1);
        p.properties.message_expiry_interval = Some(exp);
        t.publish(2, p);
    }
    t.advance(Duration::from_secs(10));
    t.connect_with(3, c);
    let got = t.out.publishes(3);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"long");
    assert_eq!(got[0].properties.message_expiry_interval, Some(90));
}

#[test]
fn too_large_for_client_is_discarded() {
    let mut t = t();
    let mut c = connect(Version::V5, "small", true);
    c.properties.maximum_packet_size = Some(64);
    t.connect_with(1, c);
    t.connect(2, Version::V5, "pub", true);
    t.subscribe(1, "big", opts(QoS::AtLeastOnce), None);
    t.publish(2, msg("big", &"x".repeat(100), QoS::AtLeastOnce, 1));
    t.publish(2, msg("big", "fits", QoS::AtLeastOnce, 2));
    let got = t.out.publishes(1);
    assert_eq!(got.len(), 1);
    assert_eq!(&got[0].payload[..], b"fits");
}

#[test]
fn empty_client_ids() {
    let mut t = t();
    let ack = t.connect(1, Version::V5, "", true);
    assert!(ack.properties.assigned_client_identifier.is_some());
    let ack = t.connect(2, Version::V311, "", true);
    assert_eq!(ack.code, 0);
    t.input(HubInput::Connect {
        conn: 3,
        keep_alive: 0,
        connect: Box::new(connect(Version::V311, "", false)),
    });
    assert_eq!(
        t.out.take(3),
        vec![Packet::ConnAck(ConnAck {
            code: reason::V3_IDENTIFIER_REJECTED,
            ..ConnAck::default()
        })]
    );
    assert!(t.out.closed.contains_key(&3));
}

#[test]
fn shutdown_publishes_wills_and_closes_everyone() {
    let mut t = t();
    t.connect(1, Version::V5, "watch", true);
    t.subscribe(1, "w", opts(QoS::AtMostOnce), None);
    let mut c = connect(Version::V311, "d", true);
    c.will = will("w", b"x", QoS::AtMostOnce);
    t.connect_with(2, c);
    t.hub.shutdown(t.now, &mut t.out);
    assert_eq!(t.out.publishes(1).len(), 1);
    assert_eq!(t.out.closed.len(), 2);
    assert_eq!(
        t.out.closed.get(&1),
        Some(&Some(Packet::Disconnect(Disconnect {
            reason: reason::SERVER_SHUTTING_DOWN,
            properties: Props::default()
        })))
    );
    assert_eq!(
        t.out.closed.get(&2),
        Some(&None),
        "3.1.1 has no DISCONNECT from the server"
    );
}

#[test]
fn full_session_queue_drops_newest_and_counts() {
    let mut t = T {
        hub: Hub::new(HubConfig {
            max_queued: 3,
            ..HubConfig::default()
        }),
        out: FakeOutlet::default(),
        now: Instant::now(),
    };
    t.connect(1, Version::V311, "slowpoke", false);
    t.subscribe(1, "q", opts(QoS::AtLeastOnce), None);
    t.close(1, LOST);
    t.connect(2, Version::V311, "pub", true);
    for i in 0..5 {
        t.publish(2, msg("q", &i.to_string(), QoS::AtLeastOnce, 1 + i));
    }
    assert_eq!(t.hub.stats().dropped_queue_full, 2);
    t.connect(3, Version::V311, "slowpoke", false);
    let got: Vec<String> = t
        .out
        .publishes(3)
        .iter()
        .map(|p| String::from_utf8_lossy(&p.payload).into_owned())
        .collect();
    assert_eq!(got, ["0", "1", "2"], "the oldest are kept, in order");
}

/// A store whose commits the test completes by hand; it also keeps every op submitted.
#[derive(Clone, Default)]
struct ManualStore(
    std::sync::Arc<std::sync::Mutex<Vec<(u64, usize)>>>,
    std::sync::Arc<std::sync::Mutex<Vec<crate::store::Op>>>,
);

impl durable::Durable for ManualStore {
    fn submit(&mut self, token: u64, ops: Vec<crate::store::Op>) {
        self.0.lock().unwrap().push((token, ops.len()));
        self.1.lock().unwrap().extend(ops);
    }
    fn read_queue(&mut self, _: &str, _: i64, _: usize) -> Vec<crate::store::StoredMessage> {
        Vec::new()
    }
}

impl ManualStore {
    /// Every op submitted since the last call.
    fn ops(&self) -> Vec<crate::store::Op> {
        std::mem::take(&mut *self.1.lock().unwrap())
    }

    /// Tokens submitted since the last call that wait for an answer, with their op counts.
    fn gated(&self) -> Vec<(u64, usize)> {
        self.0
            .lock()
            .unwrap()
            .drain(..)
            .filter(|(t, _)| *t != 0)
            .collect()
    }
}

fn durable_hub() -> (T, ManualStore) {
    let store = ManualStore::default();
    let hub = Hub::with_store(
        HubConfig::default(),
        Box::new(store.clone()),
        durable::Clock::new(Instant::now(), 1_000_000),
    );
    (
        T {
            hub,
            out: FakeOutlet::default(),
            now: Instant::now(),
        },
        store,
    )
}

/// SUBSCRIBE on a durable hub: the SUBACK comes once the subscription row commits.
fn subscribe_durable(t: &mut T, store: &ManualStore, conn: ConnId, filter: &str) {
    t.packet(
        conn,
        Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(filter.into(), opts(QoS::ExactlyOnce))],
            properties: Props::default(),
        }),
    );
    assert!(t.out.take(conn).is_empty(), "SUBACK waits for the commit");
    for (tok, _) in store.gated() {
        t.input(HubInput::Committed {
            token: tok,
            outcome: Ok(vec![]),
        });
    }
    assert!(matches!(&t.out.take(conn)[..], [Packet::SubAck(_)]));
}

fn pubrecs(t: &mut T, conn: ConnId) -> Vec<u8> {
    t.out
        .take(conn)
        .into_iter()
        .filter_map(|p| match p {
            Packet::PubRec(a) => Some(a.reason),
            _ => None,
        })
        .collect()
}

#[test]
fn qos2_dup_is_not_acked_before_the_original_commits() {
    let (mut t, store) = durable_hub();
    t.connect(1, Version::V5, "sub", false);
    let mut c = connect(Version::V5, "pub", false);
    c.properties.session_expiry_interval = Some(60);
    t.connect_with(2, c);
    let mut c = connect(Version::V5, "sub", false);
    c.properties.session_expiry_interval = Some(60);
    t.connect_with(1, c);
    subscribe_durable(&mut t, &store, 1, "d");
    t.out.take(2);

    t.publish(2, msg("d", "x", QoS::ExactlyOnce, 5));
    let mut dup = msg("d", "x", QoS::ExactlyOnce, 5);
    dup.dup = true;
    t.publish(2, dup);
    assert!(
        pubrecs(&mut t, 2).is_empty(),
        "no PUBREC before the commit, not even for the DUP"
    );
    let gated = store.gated();
    assert_eq!(
        gated.len(),
        2,
        "the DUP's ack is gated behind the original: {gated:?}"
    );
    assert_eq!(gated[1].1, 0, "with no effects of its own");
    for (tok, _) in gated {
        t.input(HubInput::Committed {
            token: tok,
            outcome: Ok(vec![crate::store::OpResult::Done]),
        });
    }
    assert_eq!(pubrecs(&mut t, 2), vec![0, 0]);
    assert_eq!(t.out.publishes(1).len(), 1, "delivered once");
}

/// A durable hub with a stored subscriber on `d` (conn 1) and a v5 publisher "pub" (conn 2).
fn durable_qos2_pair() -> (T, ManualStore) {
    let (mut t, store) = durable_hub();
    t.connect(1, Version::V311, "sub", false);
    subscribe_durable(&mut t, &store, 1, "d");
    let mut c = connect(Version::V5, "pub", true);
    c.properties.session_expiry_interval = Some(60);
    t.connect_with(2, c);
    t.out.take(2);
    (t, store)
}

/// Found by the `hub_machine` fuzz target: a duplicate's gate completing after its original was
/// refused and the id taken by a new message must not acknowledge the new message before that
/// one's own commit.
#[test]
fn a_stale_duplicate_ack_is_not_taken_for_a_later_message_with_the_id() {
    let (mut t, store) = durable_qos2_pair();
    let commit = |t: &mut T, tok: u64, outcome: crate::store::Outcome| {
        t.input(HubInput::Committed {
            token: tok,
            outcome,
        })
    };
    let full = || Ok(vec![crate::store::OpResult::Full]);
    let done = || Ok(vec![crate::store::OpResult::Done]);

    t.publish(2, msg("d", "first", QoS::ExactlyOnce, 5));
    let mut dup = msg("d", "first", QoS::ExactlyOnce, 5);
    dup.dup = true;
    t.publish(2, dup);
    let gated = store.gated();
    assert_eq!(gated.len(), 2);
    commit(&mut t, gated[0].0, full());
    assert_eq!(pubrecs(&mut t, 2), vec![0x97], "the original is refused");
    // The id is free: the client sends a new message with it.
    t.publish(2, msg("d", "second", QoS::ExactlyOnce, 5));
    let second = store.gated();
    assert_eq!(second.len(), 1, "routed as a new message");
    commit(&mut t, gated[1].0, done());
    assert_eq!(
        pubrecs(&mut t, 2),
        vec![0x97],
        "the duplicate of the refused message is refused, not taken for the new one"
    );
    commit(&mut t, second[0].0, done());
    assert_eq!(
        pubrecs(&mut t, 2),
        vec![0],
        "the new message once it is stored"
    );
}

/// A duplicate's gate that fails (a full disk rolls back the batch it shared) does not refuse
/// an original that is stored: the id stays taken, so a refusal would let the client reuse it
/// for a message the hub would then swallow as a duplicate.
#[test]
fn a_failed_duplicate_gate_does_not_refuse_a_stored_original() {
    let (mut t, store) = durable_qos2_pair();
    t.publish(2, msg("d", "x", QoS::ExactlyOnce, 5));
    let mut dup = msg("d", "x", QoS::ExactlyOnce, 5);
    dup.dup = true;
    t.publish(2, dup);
    let gated = store.gated();
    t.input(HubInput::Committed {
        token: gated[0].0,
        outcome: Ok(vec![crate::store::OpResult::Done]),
    });
    t.input(HubInput::Committed {
        token: gated[1].0,
        outcome: Err(std::sync::Arc::new(crate::store::StoreError::DiskFull)),
    });
    assert_eq!(pubrecs(&mut t, 2), vec![0, 0]);
    assert!(t.hub.sessions["pub"].inbound_qos2.contains_key(&5));
}

#[test]
fn refused_qos2_is_forgotten_even_after_a_reconnect() {
    let (mut t, store) = durable_hub();
    t.connect(1, Version::V311, "sub", false);
    subscribe_durable(&mut t, &store, 1, "d");
    t.connect(2, Version::V311, "pub", false);
    t.out.take(2);
    t.publish(2, msg("d", "x", QoS::ExactlyOnce, 5));
    let mut dup = msg("d", "x", QoS::ExactlyOnce, 5);
    dup.dup = true;
    t.publish(2, dup.clone());
    let gated = store.gated();
    // The client reconnects before the (refused) commit completes.
    t.close(2, LOST);
    t.connect(3, Version::V311, "pub", false);
    let refused: crate::store::Outcome =
        Err(std::sync::Arc::new(crate::store::StoreError::DiskFull));
    for (tok, _) in gated {
        t.input(HubInput::Committed {
            token: tok,
            outcome: refused.clone(),
        });
    }
    assert!(
        pubrecs(&mut t, 3).is_empty(),
        "3.1.1: a refused message is not acked"
    );
    // Its resend must be routed and stored again, not taken for a stored duplicate.
    t.publish(3, dup);
    let again = store.gated();
    assert_eq!(again.len(), 1);
    assert!(again[0].1 > 0, "routed again with its effects: {again:?}");
}

/// A v5 client may keep Receive Maximum QoS 2 messages unacknowledged while their commits are
/// pending: each counts once, not twice.
#[test]
fn qos2_awaiting_commit_counts_once_against_receive_maximum() {
    let (mut t, store) = durable_hub();
    let mut c = connect(Version::V5, "sub", false);
    c.properties.session_expiry_interval = Some(60);
    t.connect_with(1, c);
    subscribe_durable(&mut t, &store, 1, "d");
    t.connect(2, Version::V5, "pub", true);
    for pid in 1..=100u16 {
        t.publish(2, msg("d", "x", QoS::ExactlyOnce, pid));
    }
    assert!(
        t.out.closed.is_empty(),
        "100 in flight is within Receive Maximum 100"
    );
    t.publish(2, msg("d", "x", QoS::ExactlyOnce, 101));
    assert!(t.out.closed.contains_key(&2), "the 101st exceeds it");
}

/// PUBREL to a persistent subscriber goes only once its PUBREC state is on disk: otherwise a
/// crash in between would resend the PUBLISH after the client had been released, a duplicate.
#[test]
fn pubrel_waits_for_the_persisted_pubrec_state() {
    let (mut t, store) = durable_hub();
    let mut c = connect(Version::V5, "sub", false);
    c.properties.session_expiry_interval = Some(60);
    t.connect_with(1, c);
    subscribe_durable(&mut t, &store, 1, "d");
    t.connect(2, Version::V5, "pub", true);
    t.publish(2, msg("d", "x", QoS::ExactlyOnce, 5));
    for (tok, _) in store.gated() {
        t.input(HubInput::Committed {
            token: tok,
            outcome: Ok(vec![crate::store::OpResult::Done]),
        });
    }
    let delivered = t.out.publishes(1);
    assert_eq!(delivered.len(), 1);
    t.packet(
        1,
        Packet::PubRec(Ack {
            packet_id: delivered[0].packet_id,
            ..Ack::default()
        }),
    );
    assert!(
        !t.out.take(1).iter().any(|p| matches!(p, Packet::PubRel(_))),
        "no PUBREL before the state commits"
    );
    let gated = store.gated();
    assert_eq!(gated.len(), 1, "{gated:?}");
    t.input(HubInput::Committed {
        token: gated[0].0,
        outcome: Ok(vec![crate::store::OpResult::Done]),
    });
    assert!(
        matches!(&t.out.take(1)[..], [Packet::PubRel(a)] if a.packet_id == delivered[0].packet_id)
    );
}

/// Drives an in-process client against the hub until neither has anything left to say.
fn pump_local(t: &mut T, c: &mut local::LocalClient, conn: ConnId) {
    loop {
        let mut busy = false;
        while let Some(i) = c.poll_input() {
            busy = true;
            t.input(i);
        }
        for p in t.out.take(conn) {
            busy = true;
            c.handle(t.now, p);
        }
        if !busy {
            return;
        }
    }
}

#[test]
fn local_client_publishes_within_its_window_and_receives_commands() {
    use local::{Event, LocalClient, LOCAL_CONN_BASE};
    let mut t = t();
    t.connect(1, Version::V5, "watcher", true);
    assert_eq!(
        t.subscribe(1, "sensors/#", opts(QoS::AtLeastOnce), None),
        vec![1]
    );
    let conn = LOCAL_CONN_BASE;
    let mut c = LocalClient::new(
        conn,
        "serial/ws1",
        vec![("cmd/ws1".into(), QoS::AtLeastOnce)],
        2,
        8,
    );
    pump_local(&mut t, &mut c, conn);
    assert_eq!(c.poll_event(), Some(Event::Up));
    for i in 0..2 {
        let payload = Bytes::from(format!("{i}"));
        c.publish("sensors/ws1/T".into(), payload, QoS::AtLeastOnce, false)
            .unwrap();
    }
    // The window is full until the hub acknowledges.
    assert!(!c.can_publish());
    assert!(c
        .publish("x".into(), Bytes::new(), QoS::AtLeastOnce, false)
        .is_err());
    pump_local(&mut t, &mut c, conn);
    assert!(c.can_publish(), "the in-memory hub acks at once");
    let got = t.out.publishes(1);
    assert_eq!(got.len(), 2);
    assert_eq!(got[1].topic, "sensors/ws1/T");
    assert_eq!(&got[1].payload[..], b"1");

    t.publish(1, msg("cmd/ws1", "RESET", QoS::AtLeastOnce, 7));
    pump_local(&mut t, &mut c, conn);
    assert_eq!(c.poll_event(), Some(Event::Acked));
    assert_eq!(c.poll_event(), Some(Event::Acked));
    let Some(Event::Message(m)) = c.poll_event() else {
        panic!("no command")
    };
    assert_eq!(&m.payload[..], b"RESET");
    c.delivered(m.packet_id, m.qos);
    pump_local(&mut t, &mut c, conn);
    assert_eq!(t.hub.stats().sent, 3);
}

#[test]
fn the_local_id_prefix_is_refused_from_the_network() {
    let mut t = t();
    let a = t.connect(1, Version::V5, "$outpost/serial/ws1", true);
    assert_eq!(a.code, reason::CLIENT_ID_NOT_VALID);
    let a = t.connect(2, Version::V311, "$outpost/gpio", true);
    assert_eq!(a.code, reason::V3_IDENTIFIER_REJECTED);
}

fn acl_hub(text: &str) -> T {
    let acl = crate::auth::Acl::parse(text).unwrap();
    T {
        hub: Hub::new(HubConfig {
            acl: Some(Arc::new(acl)),
            ..HubConfig::default()
        }),
        out: FakeOutlet::default(),
        now: Instant::now(),
    }
}

fn connect_as(t: &mut T, conn: ConnId, v: Version, id: &str, user: Option<&str>) -> ConnAck {
    let mut c = connect(v, id, true);
    c.username = user.map(str::to_owned);
    t.connect_with(conn, c)
}

const ACL: &str = "\
topic read public/#
user alice
topic readwrite site/#
topic deny site/secret
topic write test/#
pattern readwrite devices/%u/%c/#
";

#[test]
fn acl_denies_publish_with_0x87_in_v5_and_silently_in_311() {
    let mut t = acl_hub(ACL);
    connect_as(&mut t, 1, Version::V5, "reader", Some("alice"));
    assert_eq!(
        t.subscribe(1, "site/#", opts(QoS::AtLeastOnce), None),
        vec![1]
    );
    connect_as(&mut t, 2, Version::V5, "w5", Some("bob"));
    connect_as(&mut t, 3, Version::V311, "w3", None);
    t.publish(2, msg("site/x", "no", QoS::AtLeastOnce, 7));
    assert_eq!(
        t.out.take(2),
        vec![Packet::PubAck(Ack {
            packet_id: 7,
            reason: reason::NOT_AUTHORIZED,
            properties: Props::default(),
        })]
    );
    t.publish(2, msg("site/x", "no", QoS::ExactlyOnce, 8));
    match t.out.take(2).as_slice() {
        [Packet::PubRec(a)] => assert_eq!((a.packet_id, a.reason), (8, reason::NOT_AUTHORIZED)),
        other => panic!("{other:?}"),
    }
    assert!(t.hub.sessions["w5"].inbound_qos2.is_empty());
    // 3.1.1 cannot say no: acknowledged, dropped.
    t.publish(3, msg("site/x", "no", QoS::AtLeastOnce, 9));
    assert_eq!(
        t.out.take(3),
        vec![Packet::PubAck(Ack {
            packet_id: 9,
            ..Ack::default()
        })]
    );
    assert!(t.out.publishes(1).is_empty());
    // `%u` and `%c` expand to the publisher's own names only.
    connect_as(&mut t, 4, Version::V5, "pump", Some("alice"));
    t.publish(4, msg("devices/alice/pump/level", "ok", QoS::AtMostOnce, 0));
    t.publish(
        4,
        msg("devices/alice/other/level", "no", QoS::AtMostOnce, 0),
    );
    t.publish(4, msg("site/tank", "ok", QoS::AtMostOnce, 0));
    let got: Vec<_> = t.out.publishes(1).into_iter().map(|p| p.topic).collect();
    assert_eq!(got, vec!["site/tank".to_owned()]);
    assert_eq!(t.hub.stats().denied, 4);
}

#[test]
fn acl_refuses_subscriptions_with_0x80_in_311_and_0x87_in_v5() {
    let mut t = acl_hub(ACL);
    connect_as(&mut t, 1, Version::V311, "a3", Some("alice"));
    connect_as(&mut t, 2, Version::V5, "a5", Some("alice"));
    for (conn, code) in [(1, reason::UNSPECIFIED_ERROR), (2, reason::NOT_AUTHORIZED)] {
        assert_eq!(
            t.subscribe(conn, "test/nosubscribe", opts(QoS::ExactlyOnce), None),
            vec![code]
        );
        // A filter wider than the grant is granted (deliveries are filtered); one that reaches
        // nothing readable, or lies inside a deny, is refused.
        assert_eq!(t.subscribe(conn, "#", opts(QoS::AtMostOnce), None), vec![0]);
        assert_eq!(
            t.subscribe(conn, "site/+/x", opts(QoS::AtMostOnce), None),
            vec![0]
        );
        assert_eq!(
            t.subscribe(conn, "public/#", opts(QoS::AtMostOnce), None),
            vec![code]
        );
        assert_eq!(
            t.subscribe(conn, "site/secret", opts(QoS::AtMostOnce), None),
            vec![code]
        );
    }
    // Anonymous rules apply to clients without a user name.
    connect_as(&mut t, 3, Version::V5, "anon", None);
    assert_eq!(
        t.subscribe(3, "public/#", opts(QoS::AtMostOnce), None),
        vec![0]
    );
    assert_eq!(
        t.subscribe(3, "site/#", opts(QoS::AtMostOnce), None),
        vec![0x87]
    );
}

#[test]
fn acl_filters_deliveries_and_retained_messages() {
    let mut t = acl_hub(ACL);
    connect_as(&mut t, 1, Version::V5, "w", Some("alice"));
    let mut secret = msg("site/secret", "s", QoS::AtLeastOnce, 1);
    secret.retain = true;
    // alice may not write site/secret either (deny wins); the hub holds no such retained.
    t.publish(1, secret.clone());
    assert_eq!(t.hub.retained(), 0);
    // A retained message from outpost itself (not bound by the ACL) is filtered at delivery.
    t.input(HubInput::System {
        topic: "site/secret".into(),
        payload: Bytes::from_static(b"s"),
        retain: true,
    });
    t.input(HubInput::System {
        topic: "site/open".into(),
        payload: Bytes::from_static(b"o"),
        retain: true,
    });
    connect_as(&mut t, 2, Version::V5, "r", Some("alice"));
    assert_eq!(
        t.subscribe(2, "site/#", opts(QoS::AtLeastOnce), None),
        vec![1]
    );
    let got: Vec<_> = t.out.publishes(2).into_iter().map(|p| p.topic).collect();
    assert_eq!(got, vec!["site/open".to_owned()]);
    // And a live one.
    t.input(HubInput::System {
        topic: "site/secret".into(),
        payload: Bytes::from_static(b"s2"),
        retain: false,
    });
    assert!(t.out.publishes(2).is_empty());
}

#[test]
fn acl_refuses_a_will_the_client_may_not_publish() {
    let mut t = acl_hub(ACL);
    let mut c = connect(Version::V5, "w", true);
    c.username = Some("alice".into());
    c.will = will("site/secret", b"gone", QoS::AtLeastOnce);
    assert_eq!(t.connect_with(1, c.clone()).code, reason::NOT_AUTHORIZED);
    c.version = Version::V311;
    assert_eq!(t.connect_with(2, c.clone()).code, reason::V3_NOT_AUTHORIZED);
    c.will = will("site/alive", b"gone", QoS::AtLeastOnce);
    assert_eq!(t.connect_with(3, c).code, reason::SUCCESS);
}

#[test]
fn acl_changed_by_a_reload_holds_back_a_will_granted_at_connect() {
    let mut t = acl_hub(ACL);
    connect_as(&mut t, 1, Version::V5, "watch", Some("alice"));
    assert_eq!(
        t.subscribe(1, "site/#", opts(QoS::AtLeastOnce), None),
        vec![1]
    );
    for (conn, id) in [(2, "a"), (3, "b")] {
        let mut c = connect(Version::V5, id, true);
        c.username = Some("alice".into());
        c.will = will(&format!("site/{id}/gone"), b"gone", QoS::AtLeastOnce);
        assert_eq!(t.connect_with(conn, c).code, reason::SUCCESS);
    }
    // Under the rules it connected with, the will goes out.
    t.close(2, LOST);
    let got: Vec<_> = t.out.publishes(1).into_iter().map(|p| p.topic).collect();
    assert_eq!(got, vec!["site/a/gone".to_owned()]);
    // A reload takes alice's write access to site/b away: that will stays unsent.
    let stricter = "user alice\ntopic read site/#\ntopic write site/a/#\n";
    t.hub
        .set_acl(Some(Arc::new(crate::auth::Acl::parse(stricter).unwrap())));
    let denied = t.hub.stats().denied;
    t.close(3, LOST);
    assert!(t.out.publishes(1).is_empty());
    assert_eq!(t.hub.stats().denied, denied + 1);
}
