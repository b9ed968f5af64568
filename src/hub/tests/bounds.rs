//! Defects found by tests we did not write (issue 18), each pinned here: deep and over-long
//! topics, `$` topics, MQTT-SN identities, CONNACK against the client's Maximum Packet Size,
//! session and subscription bounds, per-session queue bounds, expiry on its own schedule, and
//! wills at shutdown.

use super::*;
use crate::proto::mqttsn::gateway::SN_CONN_BASE;

fn deep(levels: usize) -> String {
    vec!["l"; levels].join("/")
}

fn closed_with(t: &T, conn: ConnId) -> Option<u8> {
    match t.out.closed.get(&conn) {
        Some(Some(Packet::Disconnect(d))) => Some(d.reason),
        Some(None) => Some(0),
        _ => None,
    }
}

#[test]
fn filters_and_topics_deeper_than_max_topic_levels_are_refused() {
    let mut t = t();
    t.connect(1, Version::V5, "v5", true);
    t.connect(2, Version::V311, "v3", true);
    assert_eq!(
        t.subscribe(1, &deep(200), opts(QoS::AtMostOnce), None),
        vec![0]
    );
    assert_eq!(
        t.subscribe(
            1,
            &format!("{}#", "/".repeat(7000)),
            opts(QoS::AtMostOnce),
            None
        ),
        vec![reason::TOPIC_FILTER_INVALID]
    );
    assert_eq!(
        t.subscribe(2, &deep(201), opts(QoS::AtMostOnce), None),
        vec![reason::UNSPECIFIED_ERROR]
    );
    t.publish(1, msg(&deep(201), "x", QoS::AtMostOnce, 0));
    assert_eq!(closed_with(&t, 1), Some(reason::TOPIC_NAME_INVALID));
    t.publish(2, msg(&deep(201), "x", QoS::AtLeastOnce, 1));
    assert_eq!(
        closed_with(&t, 2),
        Some(0),
        "3.1.1 has no reason: the connection closes"
    );
    assert_eq!(t.hub.stats().bad_topics, 4);
    assert_eq!(t.hub.retained(), 0);
}

#[test]
fn a_will_topic_too_deep_refuses_the_connect() {
    let mut t = t();
    let mut c = connect(Version::V5, "w", true);
    c.will = will(&deep(300), b"x", QoS::AtMostOnce);
    assert_eq!(t.connect_with(1, c).code, reason::TOPIC_NAME_INVALID);
}

#[test]
fn an_uplink_message_too_deep_is_dropped_and_acknowledged() {
    #[derive(Default)]
    struct Up(FakeOutlet, Vec<(u16, bool)>);
    impl Outlet for Up {
        fn try_send(&mut self, conn: ConnId, p: Packet) -> Result<(), Packet> {
            self.0.try_send(conn, p)
        }
        fn close(&mut self, conn: ConnId, last: Option<Packet>) {
            self.0.close(conn, last)
        }
        fn uplink_ack(&mut self, pid: u16, _: QoS, stored: bool) {
            self.1.push((pid, stored));
        }
    }
    let mut hub = Hub::new(HubConfig::default());
    let mut out = Up::default();
    let now = Instant::now();
    hub.handle(
        now,
        HubInput::Uplink(msg(&deep(250), "x", QoS::AtLeastOnce, 7)),
        &mut out,
    );
    assert_eq!(out.1, vec![(7, true)]);
    assert_eq!(hub.stats().bad_topics, 1);
}

#[test]
fn network_clients_may_not_publish_to_dollar_topics() {
    let mut t = t();
    t.connect(1, Version::V5, "v5", true);
    t.connect(2, Version::V311, "v3", true);
    let mut fake = msg("$SYS/outpost/uplink/state", "online", QoS::AtLeastOnce, 3);
    fake.retain = true;
    t.publish(1, fake.clone());
    assert_eq!(
        t.out.take(1),
        vec![Packet::PubAck(Ack {
            packet_id: 3,
            reason: reason::NOT_AUTHORIZED,
            properties: Props::default(),
        })]
    );
    t.publish(2, fake);
    // 3.1.1: acknowledged as mosquitto does, and dropped.
    assert!(matches!(&t.out.take(2)[..], [Packet::PubAck(a)] if a.reason == 0));
    assert_eq!(
        t.hub.retained(),
        0,
        "nothing fake is served to later viewers"
    );
    // outpost's own $SYS still works.
    t.input(HubInput::System {
        topic: "$SYS/outpost/uplink/state".into(),
        payload: Bytes::from_static(b"offline"),
        retain: true,
    });
    assert_eq!(t.hub.retained(), 1);
}

#[test]
fn a_v5_client_with_a_tiny_maximum_packet_size_gets_no_connack() {
    let mut t = t();
    let mut c = connect(Version::V5, "tiny", true);
    c.properties.maximum_packet_size = Some(2);
    t.input(HubInput::Connect {
        conn: 1,
        keep_alive: 60,
        connect: Box::new(c),
    });
    assert!(
        t.out.take(1).is_empty(),
        "a CONNACK larger than 2 bytes must not go"
    );
    assert!(t.out.closed.contains_key(&1));
    // One that allows what we send gets it.
    let mut c = connect(Version::V5, "ok", true);
    c.properties.maximum_packet_size = Some(64);
    assert_eq!(t.connect_with(2, c).code, reason::SUCCESS);
}

fn sn_connect(id: &str) -> Connect {
    let mut c = connect(Version::V5, id, false);
    c.username = Some(format!("sn:{id}"));
    c.properties.session_expiry_interval = Some(u32::MAX);
    c
}

#[test]
fn an_mqtt_sn_client_id_cannot_take_a_users_session() {
    let mut t = t();
    let mut carol = connect(Version::V311, "carol", false);
    carol.username = Some("carol".into());
    t.connect_with(1, carol.clone());
    t.subscribe(1, "site/secret/#", opts(QoS::AtLeastOnce), None);
    // Online: the sensor must not kick her off.
    let sn = SN_CONN_BASE + 1;
    assert_eq!(
        t.connect_with(sn, sn_connect("carol")).code,
        reason::NOT_AUTHORIZED
    );
    assert!(!t.out.closed.contains_key(&1), "carol stays connected");
    // Offline, with messages queued: the sensor does not get them.
    t.close(1, LOST);
    t.connect(3, Version::V311, "pub", true);
    t.publish(3, msg("site/secret/x", "s", QoS::AtLeastOnce, 1));
    assert_eq!(
        t.connect_with(sn + 1, sn_connect("carol")).code,
        reason::NOT_AUTHORIZED
    );
    assert!(t.out.publishes(sn + 1).is_empty());
    // carol herself gets them.
    t.connect_with(4, carol);
    assert_eq!(t.out.publishes(4).len(), 1);
    // A sensor's own session is the sensor's.
    assert_eq!(
        t.connect_with(sn + 2, sn_connect("soil-1")).code,
        reason::SUCCESS
    );
}

#[test]
fn the_sn_user_namespace_is_reserved_for_mqtt_sn() {
    let mut t = t();
    let mut c = connect(Version::V5, "x", true);
    c.username = Some("sn:carol".into());
    assert_eq!(t.connect_with(1, c).code, reason::NOT_AUTHORIZED);
    let mut c = connect(Version::V5, "y", true);
    c.username = None;
    assert_eq!(
        t.connect_with(SN_CONN_BASE + 9, c).code,
        reason::NOT_AUTHORIZED,
        "an MQTT-SN connection always names its sensor"
    );
}

#[test]
fn acl_sees_a_sensor_as_sn_client_id() {
    let mut t =
        acl_hub("user carol\ntopic readwrite site/secret/#\nuser sn:soil\ntopic write soil/#\n");
    let sn = SN_CONN_BASE + 1;
    t.connect_with(sn, sn_connect("carol"));
    assert_eq!(
        t.subscribe(sn, "site/secret/#", opts(QoS::AtLeastOnce), None),
        vec![reason::NOT_AUTHORIZED],
        "client id carol is not user carol"
    );
    t.connect_with(sn + 1, sn_connect("soil"));
    t.publish(sn + 1, msg("soil/m", "1", QoS::AtLeastOnce, 1));
    assert!(matches!(&t.out.take(sn + 1)[..], [Packet::PubAck(a)] if a.reason < 0x80));
}

#[test]
fn max_sessions_refuses_new_sessions_not_returning_ones() {
    let mut t = T {
        hub: Hub::new(HubConfig {
            max_sessions: 2,
            ..HubConfig::default()
        }),
        out: FakeOutlet::default(),
        now: Instant::now(),
    };
    t.connect(1, Version::V311, "a", false);
    t.connect(2, Version::V5, "b", true);
    assert_eq!(
        t.connect(3, Version::V5, "c", true).code,
        reason::QUOTA_EXCEEDED
    );
    assert_eq!(
        t.connect(4, Version::V311, "d", true).code,
        reason::V3_SERVER_UNAVAILABLE
    );
    t.close(1, LOST);
    assert_eq!(
        t.connect(5, Version::V311, "a", false).code,
        0,
        "a known session comes back"
    );
    assert_eq!(t.hub.stats().refused_sessions, 2);
}

#[test]
fn never_expiring_sessions_expire_after_persistent_session_expiry() {
    let mut t = T {
        hub: Hub::new(HubConfig {
            persistent_session_expiry: 3600,
            ..HubConfig::default()
        }),
        out: FakeOutlet::default(),
        now: Instant::now(),
    };
    t.connect(1, Version::V311, "old", false);
    let mut c = connect(Version::V5, "v5", false);
    c.properties.session_expiry_interval = Some(u32::MAX);
    let ack = t.connect_with(2, c);
    assert_eq!(
        ack.properties.session_expiry_interval,
        Some(3600),
        "the v5 client is told"
    );
    t.close(1, LOST);
    t.close(2, LOST);
    t.advance(Duration::from_secs(3599));
    assert_eq!(t.hub.sessions(), 2);
    t.advance(Duration::from_secs(2));
    assert_eq!(t.hub.sessions(), 0);
}

#[test]
fn reconnecting_leaves_no_timers_behind() {
    let mut t = t();
    for i in 0..1000u64 {
        let mut c = connect(Version::V5, "flap", false);
        c.properties.session_expiry_interval = Some(86_400);
        c.will = will("w", b"x", QoS::AtMostOnce);
        c.will.as_mut().unwrap().properties.will_delay_interval = Some(600);
        t.connect_with(i, c);
        t.close(i, LOST);
    }
    assert_eq!(
        t.hub.timers.len(),
        2,
        "one expiry and one will delay, not one per reconnect"
    );
}

#[test]
fn max_subscriptions_per_session_is_enforced() {
    let mut t = T {
        hub: Hub::new(HubConfig {
            max_subscriptions_per_session: 2,
            ..HubConfig::default()
        }),
        out: FakeOutlet::default(),
        now: Instant::now(),
    };
    t.connect(1, Version::V5, "s", true);
    assert_eq!(t.subscribe(1, "a", opts(QoS::AtMostOnce), None), vec![0]);
    assert_eq!(t.subscribe(1, "b", opts(QoS::AtMostOnce), None), vec![0]);
    assert_eq!(
        t.subscribe(1, "b", opts(QoS::AtLeastOnce), None),
        vec![1],
        "a replacement is no new one"
    );
    assert_eq!(
        t.subscribe(1, "c", opts(QoS::AtMostOnce), None),
        vec![reason::QUOTA_EXCEEDED]
    );
    assert_eq!(t.hub.stats().refused_subscriptions, 1);
}

fn count_inserts(ops: &[crate::store::Op], client: &str) -> usize {
    ops.iter()
        .filter(|o| {
            matches!(o, crate::store::Op::Insert { msg, .. }
            if msg.dest == crate::store::Dest::Session(client.into()))
        })
        .count()
}

#[test]
fn max_queued_bounds_a_persistent_sessions_store_queue() {
    let (mut t, store) = durable_hub();
    t.hub.cfg.max_queued = 10;
    t.connect(1, Version::V311, "abandoned", false);
    subscribe_durable(&mut t, &store, 1, "local/#");
    t.close(1, LOST);
    t.connect(2, Version::V311, "pub", true);
    store.ops();
    for i in 0..30u16 {
        t.publish(2, msg("local/x", &i.to_string(), QoS::AtLeastOnce, i + 1));
    }
    assert_eq!(
        count_inserts(&store.ops(), "abandoned"),
        10,
        "the newest 20 are dropped"
    );
    assert_eq!(t.hub.stats().dropped_queue_full, 20);
}

#[test]
fn max_queued_bounds_a_connected_session_that_never_reads() {
    let (mut t, store) = durable_hub();
    t.hub.cfg.max_queued = 10;
    t.hub.cfg.max_inflight = 5;
    t.connect(1, Version::V311, "deaf", false);
    subscribe_durable(&mut t, &store, 1, "local/#");
    t.connect(2, Version::V311, "pub", true);
    store.ops();
    for i in 0..100u16 {
        t.publish(
            2,
            msg("local/x", &i.to_string(), QoS::AtLeastOnce, i % 60 + 1),
        );
        for (tok, _) in store.gated() {
            t.input(HubInput::Committed {
                token: tok,
                outcome: Ok(vec![]),
            });
        }
    }
    // Five in flight, ten queued: what mosquitto keeps too.
    assert_eq!(count_inserts(&store.ops(), "deaf"), 15);
}

#[test]
fn restored_queue_lengths_count_against_max_queued() {
    let store = ManualStore::default();
    let mut hub = Hub::with_store(
        HubConfig {
            max_queued: 10,
            ..HubConfig::default()
        },
        Box::new(store.clone()),
        durable::Clock::new(Instant::now(), 1_000_000),
    );
    let now = Instant::now();
    let mut r = Restored::default();
    r.sessions.push(crate::store::StoredSession {
        client_id: "s".into(),
        username: None,
        version: 4,
        expiry: NEVER_EXPIRES,
        expires_ms: None,
        will: None,
        will_due_ms: None,
    });
    r.subscriptions.push(crate::store::StoredSubscription {
        client_id: "s".into(),
        filter: "q".into(),
        options: 1,
        sub_id: None,
    });
    r.queued.insert("s".into(), 8);
    hub.restore(now, r);
    let mut out = FakeOutlet::default();
    hub.handle(
        now,
        HubInput::Connect {
            conn: 1,
            keep_alive: 0,
            connect: Box::new(connect(Version::V311, "p", true)),
        },
        &mut out,
    );
    store.ops();
    for i in 0..5u16 {
        let p = msg("q", "x", QoS::AtLeastOnce, i + 1);
        hub.handle(
            now,
            HubInput::Packet {
                conn: 1,
                packet: Packet::Publish(p),
            },
            &mut out,
        );
    }
    assert_eq!(
        count_inserts(&store.ops(), "s"),
        2,
        "8 stored + 2 = max_queued"
    );
}

#[test]
fn retained_qos0_on_subscribe_is_not_capped_by_max_queued() {
    let mut t = T {
        hub: Hub::new(HubConfig {
            max_queued: 10,
            ..HubConfig::default()
        }),
        out: FakeOutlet::default(),
        now: Instant::now(),
    };
    t.connect(1, Version::V311, "pub", true);
    for i in 0..300 {
        let mut p = msg(&format!("r/{i}"), "v", QoS::AtMostOnce, 0);
        p.retain = true;
        t.publish(1, p);
    }
    t.connect(2, Version::V311, "late", true);
    t.subscribe(2, "r/#", opts(QoS::AtMostOnce), None);
    assert_eq!(t.out.publishes(2).len(), 300);
    assert_eq!(t.hub.stats().dropped_queue_full, 0);
}

#[test]
fn store_expiry_runs_with_no_session_timer_at_all() {
    let (mut t, store) = durable_hub();
    t.hub.restore(t.now, Restored::default());
    store.ops();
    // No client ever connected: only expiry can wake the hub.
    let at = t
        .hub
        .poll_timeout()
        .expect("expiry is scheduled from the start");
    assert!(at <= t.now);
    t.advance(Duration::ZERO);
    assert!(store
        .ops()
        .iter()
        .any(|o| matches!(o, crate::store::Op::Expire { .. })));
    let next = t.hub.poll_timeout().expect("and again");
    t.now = next;
    t.advance(Duration::ZERO);
    assert!(store
        .ops()
        .iter()
        .any(|o| matches!(o, crate::store::Op::Expire { .. })));
}

#[test]
fn shutdown_clears_the_stored_will_it_publishes() {
    let (mut t, store) = durable_hub();
    let mut c = connect(Version::V311, "dier", false);
    c.will = will("wills/dier", b"gone", QoS::AtLeastOnce);
    t.connect_with(1, c);
    store.ops();
    t.hub.shutdown(t.now, &mut t.out);
    let puts: Vec<_> = store
        .ops()
        .into_iter()
        .filter_map(|o| match o {
            crate::store::Op::SessionPut(s) => Some(s),
            _ => None,
        })
        .collect();
    assert_eq!(puts.len(), 1, "the session row is rewritten");
    assert_eq!(
        puts[0].will, None,
        "without the will a restart would publish again"
    );
}

/// A mount point is added before the hub sees a topic: one that pushes a topic past 65,535
/// bytes is refused here, never stored or sent on with a clipped length.
#[test]
fn a_topic_over_the_string_limit_after_a_mount_point_is_refused() {
    let mut t = t();
    t.connect(1, Version::V5, "mounted", true);
    let mut p = msg(
        &format!("site/{}", "a".repeat(65_531)),
        "x",
        QoS::AtLeastOnce,
        1,
    );
    p.retain = true;
    t.publish(1, p);
    assert_eq!(closed_with(&t, 1), Some(reason::TOPIC_NAME_INVALID));
    assert_eq!(t.hub.retained(), 0);
}

#[test]
fn a_bridge_prefix_that_overflows_the_topic_keeps_it_out_of_the_outbox() {
    let (mut t, store) = durable_hub();
    let rules = crate::bridge::rules::Rules::parse(
        std::path::Path::new("t.toml"),
        "[[out]]\nfilter = \"#\"\nremote_prefix = \"sites/very-long-prefix/\"\nqos = 1\n",
        "gw",
    )
    .unwrap();
    t.hub.set_uplink_rules(rules.outs);
    t.connect(1, Version::V5, "p", true);
    store.ops();
    t.publish(1, msg(&"a".repeat(65_530), "x", QoS::AtLeastOnce, 1));
    let outboxed = store
        .ops()
        .iter()
        .filter(|o| {
            matches!(o, crate::store::Op::Insert { msg, .. }
            if matches!(msg.dest, crate::store::Dest::Outbox(_)))
        })
        .count();
    assert_eq!(outboxed, 0);
    assert_eq!(t.hub.stats().bad_topics, 1);
}

fn expire_ops(store: &ManualStore) -> usize {
    store
        .ops()
        .iter()
        .filter(|o| matches!(o, crate::store::Op::Expire { .. }))
        .count()
}

/// Issue 18: a Pi without a real-time clock reads the wrong date until NTP sets it. Nothing
/// expires by age until the clock is believed.
#[test]
fn nothing_expires_by_age_before_the_clock_is_believed() {
    let (mut t, store) = durable_hub();
    t.hub.believe_clock(false);
    t.hub.restore(t.now, Restored::default());
    t.advance(Duration::from_secs(1));
    t.advance(Duration::from_secs(600));
    assert_eq!(expire_ops(&store), 0);
    let unix_ms = t.hub.persist.clock.unix_ms(t.now);
    t.input(HubInput::WallClock {
        unix_ms,
        believed: true,
    });
    t.advance(Duration::from_millis(1));
    assert_eq!(
        expire_ops(&store),
        1,
        "expiry starts at once when the clock is believed"
    );
}

#[test]
fn an_offline_session_past_its_end_by_an_unbelieved_clock_is_kept() {
    let (mut t, store) = durable_hub();
    t.hub.believe_clock(false);
    let mut r = Restored::default();
    r.sessions.push(crate::store::StoredSession {
        client_id: "old".into(),
        username: None,
        version: 4,
        expiry: 3600,
        expires_ms: Some(1),
        will: None,
        will_due_ms: None,
    });
    t.hub.restore(t.now, r);
    assert_eq!(t.hub.sessions(), 1);
    assert!(!store
        .ops()
        .iter()
        .any(|o| matches!(o, crate::store::Op::SessionDelete(_))));
}

#[test]
fn a_clock_step_is_logged_counted_and_moves_this_runs_rows() {
    let (mut t, store) = durable_hub();
    let r = Restored {
        max_row: 41,
        ..Restored::default()
    };
    t.hub.restore(t.now, r);
    t.connect(1, Version::V311, "sub", false);
    subscribe_durable(&mut t, &store, 1, "q");
    t.close(1, LOST);
    store.ops();
    let before = t.hub.persist.clock.unix_ms(t.now);
    // Small drift is not a step.
    t.input(HubInput::WallClock {
        unix_ms: before + 500,
        believed: true,
    });
    assert_eq!(t.hub.stats().clock_steps, 0);
    // NTP sets the clock a year ahead.
    let year = 365 * 86_400_000;
    t.input(HubInput::WallClock {
        unix_ms: before + year,
        believed: true,
    });
    assert_eq!(t.hub.stats().clock_steps, 1);
    let ops = store.ops();
    assert!(ops.iter().any(
        |o| matches!(o, crate::store::Op::ClockStep { delta_ms, from_id: 42 } if *delta_ms == year)
    ));
    assert!(
        ops.iter()
            .any(|o| matches!(o, crate::store::Op::SessionPut(s) if s.client_id == "sub")),
        "the offline session's end is written again under the new clock"
    );
    assert_eq!(t.hub.persist.clock.unix_ms(t.now), before + year);
}
