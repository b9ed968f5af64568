//! Many malformed packets from many connections at once. Each bad connection must get the
//! spec's reaction (silent close, CONNACK refusal, or v5 DISCONNECT with the right reason code),
//! and a well-behaved rumqttc client on the same broker must see every one of its messages.

mod common;

use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::raw::{connect, frame, s};
use common::{read_until_close, write, Outpost};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

#[derive(Debug, Clone, Copy, PartialEq)]
enum Reaction {
    /// Closed without a word (before CONNECT, or any 3.x violation).
    Close,
    /// CONNACK with this code, then closed.
    ConnAck(u8),
    /// v5 DISCONNECT with this reason, then closed.
    Disconnect(u8),
}

struct Case {
    name: &'static str,
    /// Protocol level to CONNECT with first, or 0 to send the bad bytes straight away.
    level: u8,
    bad: Vec<u8>,
    want: Reaction,
}

fn cases() -> Vec<Case> {
    use Reaction::*;
    let pub5 = |topic: &str, props: &[u8]| {
        let mut b = s(topic);
        b.push(props.len() as u8);
        b.extend_from_slice(props);
        frame(0x30, &b)
    };
    let mut wrong_name = s("MQTX");
    wrong_name.extend([4, 2, 0, 60]);
    wrong_name.extend(s("c"));
    let mut level6 = s("MQTT");
    level6.extend([6, 2, 0, 60]);
    level6.extend(s("c"));
    let mut expiry_connect = s("MQTT");
    expiry_connect.extend([5, 2, 0, 60, 0]);
    expiry_connect.extend(s("c"));
    vec![
        Case {
            name: "PINGREQ before CONNECT",
            level: 0,
            bad: frame(0xC0, &[]),
            want: Close,
        },
        Case {
            name: "wrong protocol name",
            level: 0,
            bad: frame(0x10, &wrong_name),
            want: Close,
        },
        Case {
            name: "protocol level 6",
            level: 0,
            bad: frame(0x10, &level6),
            want: ConnAck(0x01),
        },
        Case {
            name: "garbage first byte",
            level: 0,
            bad: vec![0x00, 0xFF, 0xFF],
            want: Close,
        },
        Case {
            name: "3.1.1 PUBLISH to a wildcard",
            level: 4,
            bad: frame(0x30, &s("a/#")),
            want: Close,
        },
        Case {
            name: "3.1.1 five-byte remaining length",
            level: 4,
            bad: vec![0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01],
            want: Close,
        },
        Case {
            name: "3.1.1 PUBACK reserved flags",
            level: 4,
            bad: frame(0x41, &[0, 1]),
            want: Close,
        },
        Case {
            name: "3.1.1 second CONNECT",
            level: 4,
            bad: connect(4, "again"),
            want: Close,
        },
        Case {
            name: "v5 PUBLISH to a wildcard",
            level: 5,
            bad: pub5("a/+", &[]),
            want: Disconnect(0x90),
        },
        Case {
            name: "v5 PUBACK reserved flags",
            level: 5,
            bad: frame(0x41, &[0, 1]),
            want: Disconnect(0x81),
        },
        Case {
            name: "v5 SUBSCRIBE with no filter",
            level: 5,
            bad: frame(0x82, &[0, 1, 0]),
            want: Disconnect(0x82),
        },
        Case {
            name: "v5 topic alias 0",
            level: 5,
            bad: pub5("t", &[0x23, 0, 0]),
            want: Disconnect(0x94),
        },
        Case {
            name: "v5 topic alias above maximum",
            level: 5,
            bad: pub5("t", &[0x23, 0, 99]),
            want: Disconnect(0x94),
        },
        Case {
            name: "v5 unknown topic alias",
            level: 5,
            bad: pub5("", &[0x23, 0, 3]),
            want: Disconnect(0x82),
        },
        Case {
            name: "v5 packet too large",
            level: 5,
            bad: vec![0x30, 0xFF, 0xFF, 0xFF, 0x7F],
            want: Disconnect(0x95),
        },
        Case {
            name: "v5 second CONNECT",
            level: 5,
            bad: connect(5, "again"),
            want: Disconnect(0x82),
        },
        Case {
            name: "v5 CONNACK from a client",
            level: 5,
            bad: frame(0x20, &[0, 0, 0]),
            want: Disconnect(0x82),
        },
        Case {
            name: "v5 duplicate property",
            level: 5,
            bad: pub5("t", &[0x01, 0, 0x01, 1]),
            want: Disconnect(0x82),
        },
        Case {
            name: "v5 subscription id from a client",
            level: 5,
            bad: pub5("t", &[0x0B, 5]),
            want: Disconnect(0x82),
        },
        Case {
            name: "v5 U+0000 in a topic",
            level: 5,
            bad: frame(0x30, &[0, 3, b'a', 0, b'b', 0]),
            want: Disconnect(0x81),
        },
        Case {
            name: "v5 AUTH without a method",
            level: 5,
            bad: frame(0xF0, &[]),
            want: Disconnect(0x82),
        },
        Case {
            name: "v5 DISCONNECT raising session expiry from 0",
            level: 5,
            bad: frame(0xE0, &[0, 5, 0x11, 0, 0, 0, 9]),
            want: Disconnect(0x82),
        },
    ]
}

/// Splits a byte stream into (first byte, body) packets.
fn packets(mut b: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut out = Vec::new();
    while b.len() >= 2 {
        let first = b[0];
        let (mut len, mut mult, mut i) = (0usize, 1usize, 1);
        loop {
            let Some(&byte) = b.get(i) else { return out };
            len += (byte & 0x7F) as usize * mult;
            mult *= 128;
            i += 1;
            if byte & 0x80 == 0 {
                break;
            }
        }
        if b.len() < i + len {
            break;
        }
        out.push((first, b[i..i + len].to_vec()));
        b = &b[i + len..];
    }
    out
}

fn run_case(port: u16, case: &Case, round: usize) -> Result<(), String> {
    let mut sock = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    sock.set_nodelay(true).ok();
    if case.level != 0 {
        write(
            &mut sock,
            &connect(
                case.level,
                &format!("bad-{round}-{}", case.name.replace(' ', "-")),
            ),
        );
    }
    write(&mut sock, &case.bad);
    let (bytes, closed) = read_until_close(&mut sock, Duration::from_secs(10));
    if !closed {
        return Err("connection was not closed".into());
    }
    let mut got = packets(&bytes);
    if case.level != 0 {
        match got.first() {
            Some((0x20, body)) if body.get(1) == Some(&0) => {
                got.remove(0);
            }
            other => return Err(format!("expected CONNACK 0 first, got {other:?}")),
        }
    }
    let reaction = match got.as_slice() {
        [] => Reaction::Close,
        [(0x20, body)] => Reaction::ConnAck(body.get(1).copied().unwrap_or(0xFF)),
        [(0xE0, body)] => Reaction::Disconnect(body.first().copied().unwrap_or(0)),
        other => return Err(format!("unexpected packets {other:?}")),
    };
    if reaction != case.want {
        return Err(format!("want {:?}, got {reaction:?}", case.want));
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_connections_are_closed_and_good_clients_undisturbed() {
    let o = Outpost::start("");
    let port = o.port;

    // The well-behaved client: publishes to itself at QoS 1 throughout the storm.
    let mut opts = MqttOptions::new("good", "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut ev) = AsyncClient::new(opts, 100);
    client.subscribe("good/t", QoS::AtLeastOnce).await.unwrap();
    let n = 400usize;
    let sender = {
        let c = client.clone();
        tokio::spawn(async move {
            for i in 0..n {
                c.publish("good/t", QoS::AtLeastOnce, false, i.to_string())
                    .await
                    .unwrap();
                if i % 20 == 0 {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        })
    };
    let receiver = tokio::spawn(async move {
        let mut got = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while got.len() < n && Instant::now() < deadline {
            match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(p)))) => got.push(
                    String::from_utf8_lossy(&p.payload)
                        .parse::<usize>()
                        .unwrap(),
                ),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("good client lost its connection: {e}"),
                Err(_) => break,
            }
        }
        got
    });

    // The storm: every case from several connections at once, on blocking threads.
    let rounds = 4;
    let mut handles = Vec::new();
    for round in 0..rounds {
        for (i, _) in cases().iter().enumerate() {
            handles.push(tokio::task::spawn_blocking(move || {
                let case = &cases()[i];
                run_case(port, case, round)
                    .map_err(|e| format!("round {round}, {}: {e}", case.name))
            }));
        }
    }
    let mut failures = Vec::new();
    let total = handles.len();
    for h in handles {
        if let Err(e) = h.await.unwrap() {
            failures.push(e);
        }
    }
    sender.await.unwrap();
    let got = receiver.await.unwrap();
    assert!(
        failures.is_empty(),
        "{} of {total} bad connections misbehaved:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!(
        got,
        (0..n).collect::<Vec<_>>(),
        "the good client saw a disruption"
    );
    println!(
        "{total} malformed connections closed correctly; good client received {n}/{n} in order"
    );
}

#[test]
fn connect_timeout_closes_silent_sockets() {
    let o = Outpost::start("[limits]\nconnect_timeout = \"300ms\"\n");
    let mut sock = o.connect_raw();
    let t = Instant::now();
    let (bytes, closed) = read_until_close(&mut sock, Duration::from_secs(5));
    assert!(closed && bytes.is_empty());
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn keepalive_expires_at_one_and_a_half_times() {
    let o = Outpost::start("");
    let mut sock = o.connect_raw();
    // CONNECT v5 with keep-alive 1 s: silence must be cut after 1.5 s, not before.
    let mut body = s("MQTT");
    body.extend([5, 2, 0, 1, 0]);
    body.extend(s("sleepy"));
    write(&mut sock, &frame(0x10, &body));
    let t = Instant::now();
    let (bytes, closed) = read_until_close(&mut sock, Duration::from_secs(5));
    let took = t.elapsed();
    assert!(closed);
    assert!(
        took >= Duration::from_millis(1400) && took < Duration::from_millis(2500),
        "{took:?}"
    );
    let p = packets(&bytes);
    assert_eq!(
        p.last().map(|(f, b)| (*f, b.first().copied())),
        Some((0xE0, Some(0x8D)))
    );
}

/// A client that floods past Receive Maximum, with more of its packets still unread by us when
/// we close: it must still read our DISCONNECT 0x93. Closing a socket with unread input makes
/// the kernel send RST, which can destroy the DISCONNECT in flight; outpost shuts down its write
/// side and drains input first. Found by the Paho v5 suite's flow_control2 test.
#[test]
fn disconnect_survives_unread_input() {
    let o = Outpost::start("");
    let mut sock = o.connect_raw();
    let mut burst = connect(5, "flooder");
    for pid in 1..=101u16 {
        let mut body = s("flood");
        body.extend(pid.to_be_bytes());
        body.push(0);
        burst.extend(frame(0x34, &body));
    }
    write(&mut sock, &burst);
    // The client goes on writing after outpost has decided to close, as a client does that
    // answers each PUBREC with a PUBREL before it reads the DISCONNECT.
    std::thread::sleep(Duration::from_millis(300));
    // Without the drain, the first of these is answered with RST and the second fails with
    // EPIPE: a client library then tears down before it reads the DISCONNECT.
    for pid in 1..=3u16 {
        let rel = frame(0x62, &pid.to_be_bytes());
        if let Err(e) = std::io::Write::write_all(&mut sock, &rel) {
            panic!("PUBREL {pid} after the close failed: {e}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let (bytes, closed) = read_until_close(&mut sock, Duration::from_secs(5));
    assert!(closed);
    let p = packets(&bytes);
    assert_eq!(
        p.last().map(|(f, b)| (*f, b.first().copied())),
        Some((0xE0, Some(0x93))),
        "last packets: {:?}",
        &p[p.len().saturating_sub(3)..]
    );
}

/// Past `max_connections`, new sockets are accepted and closed at once; the ones already open
/// keep working, and a slot freed is usable again.
#[test]
fn connection_limit() {
    let o = Outpost::start("[limits]\nmax_connections = 2\n");
    let mut a = o.connect_raw();
    let mut b = o.connect_raw();
    write(&mut a, &connect(4, "a"));
    write(&mut b, &connect(4, "b"));
    let mut c = o.connect_raw();
    let (bytes, closed) = read_until_close(&mut c, Duration::from_secs(3));
    assert!(
        closed && bytes.is_empty(),
        "third connection must be closed at once"
    );
    let (bytes, closed) = read_until_close(&mut a, Duration::from_millis(300));
    assert!(!closed && bytes.starts_with(&[0x20, 2, 0, 0]), "{bytes:?}");
    drop(a);
    std::thread::sleep(Duration::from_millis(1500));
    let mut d = o.connect_raw();
    write(&mut d, &connect(4, "d"));
    let (bytes, _) = read_until_close(&mut d, Duration::from_millis(500));
    assert!(
        bytes.starts_with(&[0x20, 2, 0, 0]),
        "a freed slot is usable: {bytes:?}"
    );
}

/// Issue 18: SUBSCRIBE then UNSUBSCRIBE of a 7,000-level filter aborted outpost with a stack
/// overflow. Now the filter is refused (SUBACK 0x80) and outpost keeps serving; a deep
/// retained publish is refused too, and a 200-level filter still works.
#[test]
fn a_seven_thousand_level_filter_cannot_take_outpost_down() {
    let o = Outpost::start("");
    let mut c = o.connect_raw();
    write(&mut c, &connect(4, "deep"));
    let mut ack = [0u8; 4];
    std::io::Read::read_exact(&mut c, &mut ack).expect("CONNACK");
    let deep = format!("{}#", "/".repeat(7000));
    let mut sub = vec![0, 1];
    sub.extend(s(&deep));
    sub.push(0);
    write(&mut c, &frame(0x82, &sub));
    let mut suback = [0u8; 5];
    std::io::Read::read_exact(&mut c, &mut suback).expect("SUBACK");
    assert_eq!(suback, [0x90, 3, 0, 1, 0x80], "refused, not taken");
    let mut unsub = vec![0, 2];
    unsub.extend(s(&deep));
    write(&mut c, &frame(0xA2, &unsub));
    let mut unsuback = [0u8; 4];
    std::io::Read::read_exact(&mut c, &mut unsuback).expect("UNSUBACK");
    assert_eq!(unsuback, [0xB0, 2, 0, 2]);
    // 200 levels are within the default max_topic_levels.
    let mut ok = vec![0, 3];
    ok.extend(s(&vec!["l"; 200].join("/")));
    ok.push(0);
    write(&mut c, &frame(0x82, &ok));
    std::io::Read::read_exact(&mut c, &mut suback).expect("SUBACK");
    assert_eq!(suback, [0x90, 3, 0, 3, 0]);
    // A deep retained publish closes its connection (3.1.1 has no other reaction)...
    let mut p = s(&"/".repeat(7000));
    p.extend(b"x");
    write(&mut c, &frame(0x31, &p));
    let (_, closed) = read_until_close(&mut c, Duration::from_secs(5));
    assert!(closed);
    // ...and outpost is still there for everyone else.
    let mut d = o.connect_raw();
    write(&mut d, &connect(4, "after"));
    std::io::Read::read_exact(&mut d, &mut ack).expect("CONNACK after the attack");
    assert_eq!(ack, [0x20, 2, 0, 0], "log:\n{}", o.log());
}
