//! outpost against mosquitto_pub and mosquitto_sub, clients we did not write: every protocol
//! level and QoS, retained messages, wills, persistent sessions, shutdown.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

const SETTLE: Duration = Duration::from_millis(600);

fn sub(o: &Outpost, args: &[&str]) -> std::process::Child {
    spawn(
        Command::new(tool("mosquitto_sub"))
            .args(["-h", "127.0.0.1", "-p", &o.port.to_string()])
            .args(args),
    )
}

fn publish(o: &Outpost, args: &[&str]) {
    let (ok, _) = run(
        Command::new(tool("mosquitto_pub"))
            .args(["-h", "127.0.0.1", "-p", &o.port.to_string()])
            .args(args),
        Duration::from_secs(10),
    );
    assert!(ok, "mosquitto_pub {args:?} failed; log:\n{}", o.log());
}

#[test]
fn every_level_and_qos() {
    let o = Outpost::start("");
    for v in ["mqttv31", "mqttv311", "mqttv5"] {
        for q in ["0", "1", "2"] {
            let topic = format!("lvl/{v}/{q}");
            let s = sub(
                &o,
                &["-V", v, "-q", q, "-t", &topic, "-C", "3", "-v", "-W", "10"],
            );
            std::thread::sleep(SETTLE);
            for i in 0..3 {
                publish(
                    &o,
                    &["-V", v, "-q", q, "-t", &topic, "-m", &format!("m{i}")],
                );
            }
            let out = output(s, Duration::from_secs(10));
            let want: String = (0..3).map(|i| format!("{topic} m{i}\n")).collect();
            assert_eq!(out, want, "{v} QoS {q}");
        }
    }
}

#[test]
fn retained_set_and_deleted() {
    let o = Outpost::start("");
    publish(&o, &["-t", "ret/a", "-m", "kept", "-r", "-q", "1"]);
    let s = sub(
        &o,
        &["-V", "mqttv5", "-t", "ret/#", "-C", "1", "-v", "-W", "5"],
    );
    assert_eq!(output(s, Duration::from_secs(6)), "ret/a kept\n");
    publish(&o, &["-t", "ret/a", "-n", "-r"]);
    let s = sub(&o, &["-t", "ret/#", "-C", "1", "-W", "1"]);
    assert_eq!(
        output(s, Duration::from_secs(3)),
        "",
        "empty retained payload deletes"
    );
}

#[test]
fn will_is_published_when_a_client_dies() {
    let o = Outpost::start("");
    let watcher = sub(&o, &["-t", "wills/#", "-C", "1", "-v", "-W", "10"]);
    let mut dier = sub(
        &o,
        &[
            "-t",
            "nothing",
            "--will-topic",
            "wills/dier",
            "--will-payload",
            "gone",
            "--will-qos",
            "1",
            "-i",
            "dier",
        ],
    );
    std::thread::sleep(SETTLE);
    dier.kill().expect("kill");
    let _ = dier.wait();
    assert_eq!(
        output(watcher, Duration::from_secs(10)),
        "wills/dier gone\n"
    );
}

#[test]
fn persistent_session_gets_what_it_missed() {
    let o = Outpost::start("");
    for (v, extra) in [("mqttv311", vec![]), ("mqttv5", vec!["-x", "300"])] {
        let id = format!("durable-{v}");
        let topic = format!("dur/{v}");
        let mut args = vec![
            "-V", v, "-c", "-i", &id, "-q", "1", "-t", &topic, "-C", "1", "-W", "5",
        ];
        args.extend(extra.iter().copied());
        // First connection subscribes, receives one message, and disconnects cleanly.
        let first = sub(&o, &args);
        std::thread::sleep(SETTLE);
        publish(&o, &["-V", v, "-q", "1", "-t", &topic, "-m", "online"]);
        assert_eq!(output(first, Duration::from_secs(6)), "online\n");
        for i in 0..5 {
            publish(
                &o,
                &[
                    "-V",
                    v,
                    "-q",
                    "1",
                    "-t",
                    &topic,
                    "-m",
                    &format!("missed{i}"),
                ],
            );
        }
        let mut args = vec![
            "-V", v, "-c", "-i", &id, "-q", "1", "-t", &topic, "-C", "5", "-W", "5",
        ];
        args.extend(extra.iter().copied());
        let again = sub(&o, &args);
        let want: String = (0..5).map(|i| format!("missed{i}\n")).collect();
        assert_eq!(output(again, Duration::from_secs(6)), want, "{v}");
    }
}

#[test]
fn sigterm_exits_zero_quickly_and_wills_go_out() {
    let mut o = Outpost::start("");
    let watcher = sub(&o, &["-t", "bye/#", "-C", "1", "-v", "-W", "10"]);
    let held = sub(
        &o,
        &[
            "-t",
            "x",
            "--will-topic",
            "bye/held",
            "--will-payload",
            "shutdown",
        ],
    );
    std::thread::sleep(SETTLE);
    let (status, took) = o.terminate();
    assert!(
        status.success(),
        "exit status {status:?}; log:\n{}",
        o.log()
    );
    assert!(took < Duration::from_secs(5), "took {took:?}");
    // The held client was disconnected by the shutdown too (it reconnects in vain, so stop it).
    let _ = output(held, Duration::from_millis(100));
    // The watcher was itself disconnected by the shutdown, after the will was routed to it.
    assert_eq!(
        output(watcher, Duration::from_secs(5)),
        "bye/held shutdown\n"
    );
    assert!(o.log().contains("stopped"));
}
