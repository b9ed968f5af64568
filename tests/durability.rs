//! The durability contract against the real binary: what was acknowledged survives kill -9.
//!
//! The clients are rumqttc, which we did not write. The crash test publishes QoS 1 and QoS 2
//! messages for a persistent session that is offline, kills outpost with SIGKILL at random
//! moments, restarts it on the same data directory, and at the end checks that the session
//! receives every message whose PUBACK or PUBREC the publisher saw.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::rq::{client, drain, publish_until_killed, register, tally};
use common::Outpost;
use rumqttc::{Event, Packet, QoS};
use tokio::time::timeout;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_and_retained_survive_kill_9() {
    let o = Outpost::start("");
    register(o.port, "durable-sub", "keep/#").await;
    let (p, mut ev) = client(o.port, "pub", true);
    let sender = tokio::spawn(async move {
        for i in 0..100 {
            p.publish("keep/a", QoS::AtLeastOnce, false, format!("{i}"))
                .await
                .unwrap();
        }
        p.publish("keep/retained", QoS::AtLeastOnce, true, "still here")
            .await
            .unwrap();
        p
    });
    // Wait for every PUBACK: each one promises the message is on disk.
    let mut acks = 0;
    timeout(Duration::from_secs(10), async {
        while acks < 101 {
            if let Ok(Event::Incoming(Packet::PubAck(_))) = ev.poll().await {
                acks += 1;
            }
        }
    })
    .await
    .expect("101 PUBACKs");
    let _publisher = sender.await.unwrap();
    let dir = o.crash();
    let o = Outpost::restart(dir, "");
    let (present, got) = drain(o.port, "durable-sub", Duration::from_secs(2)).await;
    assert!(present, "session present after kill -9; log:\n{}", o.log());
    let mut want: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    want.push("still here".into());
    assert_eq!(got, want, "log:\n{}", o.log());
    // The retained message too, to a brand-new subscriber.
    let (c, mut ev) = client(o.port, "late", true);
    c.subscribe("keep/retained", QoS::AtLeastOnce)
        .await
        .unwrap();
    let retained = timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = ev.poll().await {
                return (p.retain, String::from_utf8_lossy(&p.payload).into_owned());
            }
        }
    })
    .await
    .expect("retained message after kill -9");
    assert_eq!(retained, (true, "still here".to_owned()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_random_kill_9() {
    const KILLS: usize = 20;
    // A deterministic spread of kill moments (a fixed-seed LCG keeps failures reproducible).
    let mut rng: u64 = 0x5eed_0f0a_7b05;
    let mut next_delay = || {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        Duration::from_millis(40 + (rng >> 33) % 400)
    };
    // What is measured is the crash, not the session queue's bound: `max_queued` (1,000 by
    // default, newest dropped as mosquitto does) must hold the whole run's backlog.
    const CFG: &str = "[limits]\nmax_queued = 100000000\n";
    let mut o = Outpost::start(CFG);
    register(o.port, "crash-sub", "crash/#").await;
    let mut acked: BTreeMap<u64, QoS> = BTreeMap::new();
    let mut seq = 0u64;
    let started = Instant::now();
    for run in 0..KILLS {
        let port = o.port;
        let delay = next_delay();
        let publisher = tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            let next =
                publish_until_killed(port, run, seq, ("crash/q1", "crash/q2"), &mut acked).await;
            (acked, next)
        });
        tokio::time::sleep(delay).await;
        let dir = o.crash();
        let (got, next) = publisher.await.unwrap();
        acked.extend(got);
        seq = next;
        o = Outpost::restart(dir, CFG);
    }
    let (present, got) = drain(o.port, "crash-sub", Duration::from_secs(3)).await;
    assert!(
        present,
        "session present after {KILLS} kills; log:\n{}",
        o.log()
    );
    let t = tally(&acked, &got);
    let (lost, dup1, dup2) = (&t.lost, t.dup_q1, t.dup_q2);
    println!(
        "{KILLS} kills in {:.1}s: {} acknowledged ({} QoS 1, {} QoS 2), {} delivered, {} lost, \
         {dup1} QoS 1 duplicates, {dup2} QoS 2 duplicates, {} unacknowledged also delivered",
        started.elapsed().as_secs_f64(),
        acked.len(),
        t.acked_q1,
        t.acked_q2,
        got.len(),
        lost.len(),
        t.unacked_delivered
    );
    assert!(
        acked.len() > 100,
        "too few messages acknowledged to prove anything"
    );
    assert!(lost.is_empty(), "lost acknowledged messages: {lost:?}");
    assert_eq!(dup2, 0, "QoS 2 duplicates");
    // QoS 1 may repeat only what was in flight at a crash: at most the window per crash.
    assert!(dup1 <= KILLS * 20, "{dup1} QoS 1 duplicates");
}

fn mosq(tool: &str, port: u16, args: &[&str]) -> String {
    let (_, out) = common::run(
        std::process::Command::new(common::tool(tool))
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args),
        Duration::from_secs(10),
    );
    out
}

/// Session expiry and message expiry keep counting across a kill -9: the clock they use is
/// stored as wall-clock time, not as time since start.
#[test]
fn session_and_message_expiry_survive_restart() {
    let o = Outpost::start("");
    for (id, expiry) in [("exp-short", "2"), ("exp-long", "600")] {
        mosq(
            "mosquitto_sub",
            o.port,
            &[
                "-V", "5", "-c", "-i", id, "-x", expiry, "-q", "1", "-t", "exp/#", "-E",
            ],
        );
    }
    mosq(
        "mosquitto_pub",
        o.port,
        &[
            "-V",
            "5",
            "-q",
            "1",
            "-t",
            "exp/a",
            "-m",
            "short-lived",
            "-D",
            "publish",
            "message-expiry-interval",
            "2",
        ],
    );
    mosq(
        "mosquitto_pub",
        o.port,
        &["-V", "5", "-q", "1", "-t", "exp/a", "-m", "long-lived"],
    );
    let dir = o.crash();
    std::thread::sleep(Duration::from_millis(3500));
    let o = Outpost::restart(dir, "");
    let short = mosq(
        "mosquitto_sub",
        o.port,
        &[
            "-V",
            "5",
            "-c",
            "-i",
            "exp-short",
            "-x",
            "2",
            "-q",
            "1",
            "-t",
            "exp/none",
            "-W",
            "2",
        ],
    );
    assert_eq!(short, "", "the expired session's queue is gone");
    let long = mosq(
        "mosquitto_sub",
        o.port,
        &[
            "-V", "5", "-c", "-i", "exp-long", "-x", "600", "-q", "1", "-t", "exp/#", "-W", "2",
        ],
    );
    assert_eq!(
        long,
        "long-lived\n",
        "the expired message is not delivered; log:\n{}",
        o.log()
    );
}

/// A client connected with a will when outpost is killed: its connection ended abnormally, so
/// after the restart its will is published, once (a second restart does not repeat it).
#[test]
fn will_of_a_client_connected_at_the_crash_is_published_once() {
    let o = Outpost::start("");
    mosq(
        "mosquitto_sub",
        o.port,
        &["-c", "-i", "will-watch", "-q", "1", "-t", "wills/#", "-E"],
    );
    let dier = common::spawn(
        std::process::Command::new(common::tool("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &o.port.to_string()])
            .args(["-c", "-i", "dier", "-t", "x", "--will-topic", "wills/dier"])
            .args(["--will-payload", "gone", "--will-qos", "1"]),
    );
    std::thread::sleep(Duration::from_millis(600));
    let dir = o.crash();
    let mut dier = dier;
    let _ = dier.kill();
    let _ = dier.wait();
    let o = Outpost::restart(dir, "");
    std::thread::sleep(Duration::from_millis(300));
    let dir = o.crash();
    let o = Outpost::restart(dir, "");
    let got = mosq(
        "mosquitto_sub",
        o.port,
        &[
            "-c",
            "-i",
            "will-watch",
            "-q",
            "1",
            "-t",
            "wills/#",
            "-v",
            "-W",
            "2",
        ],
    );
    assert_eq!(got, "wills/dier gone\n", "log:\n{}", o.log());
}

/// Issue 18: a persistent client's will was published by the graceful shutdown and again by the
/// restart (its subscribers got it twice). Once is right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn will_of_a_persistent_client_is_published_once_across_a_graceful_restart() {
    let o = Outpost::start("");
    register(o.port, "will-watch", "wills/#").await;
    let mut opts = rumqttc::MqttOptions::new("dier", "127.0.0.1", o.port);
    opts.set_clean_session(false);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_last_will(rumqttc::LastWill::new(
        "wills/dier",
        "gone",
        QoS::AtLeastOnce,
        false,
    ));
    let (_dier, mut ev) = rumqttc::AsyncClient::new(opts, 10);
    timeout(Duration::from_secs(10), async {
        while !matches!(ev.poll().await, Ok(Event::Incoming(Packet::ConnAck(_)))) {}
    })
    .await
    .expect("dier connected");
    let dir = o.stop();
    drop(ev);
    let o = Outpost::restart(dir, "");
    let (present, got) = drain(o.port, "will-watch", Duration::from_secs(2)).await;
    assert!(present);
    assert_eq!(got, ["gone"], "log:\n{}", o.log());
}

/// A retained QoS 1 message sent on SUBSCRIBE to a persistent session and never acknowledged
/// is stored like any delivery: after kill -9 it comes again (the subscription is not new any
/// more, so nothing else would resend it).
#[test]
fn unacked_retained_delivery_survives_kill_9() {
    use common::raw::{frame, s};
    use std::io::Write;
    let o = Outpost::start("");
    mosq(
        "mosquitto_pub",
        o.port,
        &["-q", "1", "-r", "-t", "ret/x", "-m", "kept"],
    );
    let connect = |port: u16| {
        let mut sock = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        let mut body = s("MQTT");
        body.extend([4, 0x00, 0, 60]); // clean session 0
        body.extend(s("ret-keeper"));
        sock.write_all(&frame(0x10, &body)).unwrap();
        sock
    };
    let mut sock = connect(o.port);
    let mut sub = vec![0, 1];
    sub.extend(s("ret/#"));
    sub.push(1);
    sock.write_all(&frame(0x82, &sub)).unwrap();
    let (bytes, _) = common::read_until_close(&mut sock, Duration::from_millis(800));
    assert!(
        bytes.windows(4).any(|w| w == b"kept"),
        "retained delivered on subscribe"
    );
    // Never acknowledged. Crash.
    let dir = o.crash();
    drop(sock);
    let o = Outpost::restart(dir, "");
    let mut sock = connect(o.port);
    let (bytes, _) = common::read_until_close(&mut sock, Duration::from_millis(1500));
    assert!(
        bytes.windows(4).any(|w| w == b"kept"),
        "redelivered after kill -9: {bytes:?}; log:\n{}",
        o.log()
    );
}
