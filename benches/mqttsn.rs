//! MQTT-SN gateway benchmark: outpost's gateway, with the same work done over MQTT against
//! mosquitto side by side as the reference (mosquitto has no MQTT-SN, and Paho's gateway is not
//! packaged; its published loopback CONNECT→CONNACK of 270–500 ms is the figure to beat).
//!
//! `cargo bench --bench mqttsn` (add `-- --runs 5 --n 20000 --connects 300`).
//! - CONNECT→CONNACK: a new client (new socket) each time, clean session; median and p99;
//! - QoS 1: one client, one PUBLISH at a time, each waiting for its PUBACK (outpost's PUBACK
//!   waits for the commit; mosquitto's does not touch the disk);
//! - QoS 0: one client sending as fast as it can, with a QoS 1 publish every 500 as a barrier
//!   (the gateway handles datagrams in order, so its PUBACK means the 500 before it were
//!   routed); a local MQTT subscriber counts what arrived, so UDP loss would show.
//!
//! Nothing in these runs is durable (no persistent subscriber, no uplink), so neither broker
//! writes to disk: the figures measure the gateway and the hub, not fsync. Medians of `--runs`
//! runs; ratios are outpost / mosquitto.

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::proxy::Mosquitto;
use common::sn::SnClient;
use common::Outpost;
use outpost::proto::mqttsn::{Flags, Message, SnQos, TopicRef};

const TOPIC: &str = "bench/sn/reading";
const BARRIER: usize = 500;

fn args() -> (usize, usize, usize) {
    let (mut runs, mut n, mut connects) = (3, 20_000, 300);
    let v: Vec<String> = std::env::args().collect();
    for w in v.windows(2) {
        let x = w[1].parse().ok();
        match (w[0].as_str(), x) {
            ("--runs", Some(x)) => runs = x,
            ("--n", Some(x)) => n = x,
            ("--connects", Some(x)) => connects = x,
            _ => {}
        }
    }
    (runs, n, connects)
}

// --- MQTT-SN over UDP -----------------------------------------------------------------------

/// QoS 0/1 PUBLISH of reading `i` on `topic`.
fn sn_publish(c: &SnClient, topic: u16, qos: SnQos, msg_id: u16, i: usize) {
    c.send(&Message::Publish {
        flags: Flags {
            qos,
            ..Flags::default()
        },
        topic: TopicRef::Id(topic),
        msg_id,
        data: Bytes::from(format!("{i:08}")),
    });
}

// --- MQTT 3.1.1 over TCP, hand-built, as lean as the UDP client -----------------------------

fn mqtt_connect(port: u16, id: &str) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_nodelay(true).unwrap();
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60];
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    s.write_all(&p).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0]);
    s
}

fn mqtt_publish(qos: u8, pid: u16, i: usize) -> Vec<u8> {
    let payload = format!("{i:08}");
    let mut body = Vec::new();
    body.extend_from_slice(&(TOPIC.len() as u16).to_be_bytes());
    body.extend_from_slice(TOPIC.as_bytes());
    if qos > 0 {
        body.extend_from_slice(&pid.to_be_bytes());
    }
    body.extend_from_slice(payload.as_bytes());
    let mut p = vec![0x30 | qos << 1, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

fn read_puback(s: &mut TcpStream) {
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    assert_eq!(ack[0], 0x40);
}

/// A raw MQTT subscriber to `bench/#` counting PUBLISH packets.
fn counter(port: u16, id: &str) -> Arc<AtomicUsize> {
    let mut s = mqtt_connect(port, id);
    let mut sub = vec![0x82, 0, 0, 1];
    sub.extend_from_slice(&7u16.to_be_bytes());
    sub.extend_from_slice(b"bench/#");
    sub.push(0);
    sub[1] = (sub.len() - 2) as u8;
    s.write_all(&sub).unwrap();
    let mut ack = [0u8; 5];
    s.read_exact(&mut ack).unwrap();
    let n = Arc::new(AtomicUsize::new(0));
    let c = n.clone();
    std::thread::spawn(move || {
        let mut r = std::io::BufReader::new(s);
        loop {
            let mut h = [0u8; 1];
            if r.read_exact(&mut h).is_err() {
                return;
            }
            let (mut len, mut mul) = (0usize, 1usize);
            loop {
                let mut b = [0u8; 1];
                if r.read_exact(&mut b).is_err() {
                    return;
                }
                len += (b[0] & 0x7f) as usize * mul;
                mul *= 128;
                if b[0] & 0x80 == 0 {
                    break;
                }
            }
            let mut body = vec![0u8; len];
            if r.read_exact(&mut body).is_err() {
                return;
            }
            if h[0] >> 4 == 3 {
                c.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));
    n
}

fn wait_count(c: &AtomicUsize, n: usize) -> usize {
    let t = Instant::now();
    while c.load(Ordering::Relaxed) < n && t.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(10));
    }
    c.load(Ordering::Relaxed)
}

// --- The runs --------------------------------------------------------------------------------

struct Figures {
    connect_median_ms: f64,
    connect_p99_ms: f64,
    qos1_per_s: f64,
    qos0_per_s: f64,
    qos0_delivered: usize,
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn run_sn(port: u16, mqtt: u16, n: usize, connects: usize, run: usize) -> Figures {
    let mut lat = Vec::with_capacity(connects);
    for i in 0..connects {
        let c = SnClient::new(port);
        let t = Instant::now();
        c.connect(&format!("c{run}-{i}"));
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        c.send(&Message::Disconnect { duration: None });
        let _ = c.recv();
    }
    let c = SnClient::new(port);
    c.connect(&format!("pub-{run}"));
    let topic_id = c.register(TOPIC);
    let t = Instant::now();
    for i in 0..n {
        sn_publish(&c, topic_id, SnQos::One, (i % 65_000 + 1) as u16, i);
        assert!(matches!(c.recv(), Message::PubAck { rc: 0, .. }));
    }
    let qos1 = n as f64 / t.elapsed().as_secs_f64();
    let count = counter(mqtt, &format!("count-sn-{run}"));
    let t = Instant::now();
    let mut resent = 0;
    for i in 0..n {
        if (i + 1) % BARRIER == 0 {
            // UDP may drop the barrier itself in a burst: resend it, as a client would.
            loop {
                sn_publish(&c, topic_id, SnQos::One, 1, i);
                match c.recv_within(Duration::from_secs(1)) {
                    Some(Message::PubAck { rc: 0, .. }) => break,
                    Some(other) => panic!("PUBACK expected, got {other:?}"),
                    None => resent += 1,
                }
            }
        } else {
            sn_publish(&c, topic_id, SnQos::Zero, 0, i);
        }
    }
    let qos0 = n as f64 / t.elapsed().as_secs_f64();
    let delivered = wait_count(&count, n + resent);
    Figures {
        connect_median_ms: percentile(&mut lat, 0.5),
        connect_p99_ms: percentile(&mut lat, 0.99),
        qos1_per_s: qos1,
        qos0_per_s: qos0,
        qos0_delivered: delivered.min(n),
    }
}

fn run_mqtt(port: u16, n: usize, connects: usize, run: usize) -> Figures {
    let mut lat = Vec::with_capacity(connects);
    for i in 0..connects {
        let t = Instant::now();
        let mut s = mqtt_connect(port, &format!("c{run}-{i}"));
        lat.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = s.write_all(&[0xE0, 0]);
    }
    let mut s = mqtt_connect(port, &format!("pub-{run}"));
    let t = Instant::now();
    for i in 0..n {
        s.write_all(&mqtt_publish(1, (i % 65_000 + 1) as u16, i))
            .unwrap();
        read_puback(&mut s);
    }
    let qos1 = n as f64 / t.elapsed().as_secs_f64();
    let count = counter(port, &format!("count-m-{run}"));
    let t = Instant::now();
    for i in 0..n {
        if (i + 1) % BARRIER == 0 {
            s.write_all(&mqtt_publish(1, 1, i)).unwrap();
            read_puback(&mut s);
        } else {
            s.write_all(&mqtt_publish(0, 0, i)).unwrap();
        }
    }
    let qos0 = n as f64 / t.elapsed().as_secs_f64();
    let delivered = wait_count(&count, n);
    Figures {
        connect_median_ms: percentile(&mut lat, 0.5),
        connect_p99_ms: percentile(&mut lat, 0.99),
        qos1_per_s: qos1,
        qos0_per_s: qos0,
        qos0_delivered: delivered,
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    percentile(&mut v, 0.5)
}

fn main() {
    let (runs, n, connects) = args();
    let o = Outpost::start("[[listener]]\nkind = \"mqtt-sn\"\nbind = \"127.0.0.1:0\"\n");
    let sn = o.sn_port();
    let m = Mosquitto::start();
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for run in 0..runs {
        ours.push(run_sn(sn, o.port, n, connects, run));
        theirs.push(run_mqtt(m.port, n, connects, run));
        let (a, b) = (&ours[run], &theirs[run]);
        println!(
            "run {run}: outpost MQTT-SN connect {:.3}/{:.3} ms, qos1 {:.0}/s, qos0 {:.0}/s ({}/{n} delivered) | \
             mosquitto MQTT connect {:.3}/{:.3} ms, qos1 {:.0}/s, qos0 {:.0}/s ({}/{n} delivered)",
            a.connect_median_ms, a.connect_p99_ms, a.qos1_per_s, a.qos0_per_s, a.qos0_delivered,
            b.connect_median_ms, b.connect_p99_ms, b.qos1_per_s, b.qos0_per_s, b.qos0_delivered,
        );
    }
    let f = |v: &[Figures], g: fn(&Figures) -> f64| median(v.iter().map(g).collect());
    println!("\nmedian of {runs} runs, {n} messages, {connects} connects (ratio = outpost MQTT-SN / mosquitto MQTT)");
    println!("| scenario | outpost (MQTT-SN, UDP) | mosquitto (MQTT, TCP) | ratio | unit |");
    println!("| --- | --- | --- | --- | --- |");
    for (name, unit, g) in [
        (
            "MQTT-SN CONNECT→CONNACK median",
            "ms",
            (|x: &Figures| x.connect_median_ms) as fn(&Figures) -> f64,
        ),
        ("MQTT-SN CONNECT→CONNACK p99", "ms", |x| x.connect_p99_ms),
        ("MQTT-SN QoS 1 publishes, one at a time", "msg/s", |x| {
            x.qos1_per_s
        }),
        ("MQTT-SN QoS 0 publishes", "msg/s", |x| x.qos0_per_s),
    ] {
        let (a, b) = (f(&ours, g), f(&theirs, g));
        let digits = if a >= 100.0 { 0 } else { 3 };
        println!(
            "| {name} | {a:.digits$} | {b:.digits$} | {:.2} | {unit} |",
            a / b
        );
    }
}
