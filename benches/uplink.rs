//! Uplink benchmark: outpost's bridge against a mosquitto bridge, on the same machine, through
//! the same byte-counting proxy, to the same upstream mosquitto.
//!
//! `cargo bench --bench uplink` (add `-- --runs 5 --backlog 100000 --readings 10000`, or
//! `--drain-only`).
//! - backlog drain: N QoS 1 messages are published while the link is refused, then it opens;
//!   the figure is N divided by the time from the first message reaching the cloud subscriber
//!   to the last (reconnect delays excluded), median of several runs;
//! - the same over a link capped at 64 kbit/s each way (`--slow N` messages): where the bytes
//!   per message, not the CPU, decide the drain rate;
//! - bytes per reading: a telemetry stream of QoS 1 readings with a realistic topic, bytes
//!   counted through the proxy in the upstream direction, divided by the number of readings.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{Mode, Mosquitto, Proxy};
use common::rq::client;
use common::Outpost;
use rumqttc::{Event, Packet, QoS};
use tokio::time::timeout;

const TOPIC: &str = "sensors/weather/ws1/temperature";

struct Args {
    runs: usize,
    backlog: usize,
    readings: usize,
    slow: usize,
}

fn args() -> Args {
    let mut a = Args {
        runs: 3,
        backlog: 100_000,
        readings: 10_000,
        slow: 3_000,
    };
    let v: Vec<String> = std::env::args().collect();
    for w in v.windows(2) {
        let n = w[1].parse().ok();
        match (w[0].as_str(), n) {
            ("--runs", Some(n)) => a.runs = n,
            ("--backlog", Some(n)) => a.backlog = n,
            ("--readings", Some(n)) => a.readings = n,
            ("--slow", Some(n)) => a.slow = n,
            _ => {}
        }
    }
    a
}

/// Counts what a cloud subscriber receives, with the times of the first and the last.
struct Counter {
    n: Arc<AtomicUsize>,
    first: Arc<std::sync::Mutex<Option<Instant>>>,
    last: Arc<std::sync::Mutex<Option<Instant>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Counter {
    async fn start(port: u16, filter: &str) -> Counter {
        let (c, mut ev) = client(port, "cloud-counter", true);
        c.subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("subscribe");
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = ev.poll().await {
                break;
            }
        }
        let n = Arc::new(AtomicUsize::new(0));
        let first = Arc::new(std::sync::Mutex::new(None));
        let last = Arc::new(std::sync::Mutex::new(None));
        let (n2, f2, l2) = (n.clone(), first.clone(), last.clone());
        let task = tokio::spawn(async move {
            let _keep = c;
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(_))) => {
                        let now = Instant::now();
                        f2.lock().unwrap().get_or_insert(now);
                        *l2.lock().unwrap() = Some(now);
                        n2.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
                }
            }
        });
        Counter {
            n,
            first,
            last,
            task,
        }
    }

    async fn wait(&self, want: usize, limit: Duration) -> Option<Duration> {
        let t = Instant::now();
        while self.n.load(Ordering::SeqCst) < want {
            if t.elapsed() > limit {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let f = (*self.first.lock().unwrap())?;
        let l = (*self.last.lock().unwrap())?;
        Some(l - f)
    }
}

impl Drop for Counter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Publishes `n` QoS 1 messages on `port` and waits for every PUBACK.
async fn publish(port: u16, n: usize, payload: impl Fn(usize) -> String) {
    let (c, mut ev) = client(port, "bench-pub", true);
    let msgs: Vec<String> = (0..n).map(payload).collect();
    let sender = tokio::spawn(async move {
        for m in msgs {
            c.publish(TOPIC, QoS::AtLeastOnce, false, m)
                .await
                .expect("publish");
        }
        c
    });
    let mut acks = 0;
    while acks < n {
        match timeout(Duration::from_secs(60), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            other => panic!("local publisher stopped after {acks} acks: {other:?}"),
        }
    }
    let _ = sender.await;
}

/// Which bridge a run drives.
#[derive(Clone, Copy)]
enum Bridge {
    Outpost { v5: bool },
    Mosquitto,
}

/// A local broker with a bridge to `proxy_port`; returns its local port and a guard.
fn start_bridge(b: Bridge, proxy_port: u16, rules: &std::path::Path) -> (u16, Box<dyn Send>) {
    match b {
        Bridge::Outpost { v5 } => {
            std::fs::create_dir_all(rules).unwrap();
            std::fs::write(
                rules.join("r.toml"),
                "[[out]]\nfilter = \"sensors/#\"\nremote_prefix = \"sites/{gateway_id}/\"\nqos = 1\n",
            )
            .unwrap();
            let cfg = format!(
                "[store]\nsynchronous = \"full\"\n[uplink]\nurl = \"mqtt://127.0.0.1:{proxy_port}\"\n\
                 protocol = \"{}\"\nbackoff = {{ min = \"100ms\", max = \"200ms\" }}\n\
                 rules_dir = \"{}\"\n",
                if v5 { "5" } else { "3.1.1" },
                rules.display()
            );
            let o = Outpost::start(&cfg);
            (o.port, Box::new(o))
        }
        Bridge::Mosquitto => {
            let m = Mosquitto::start_with(&format!(
                "connection cloud\naddress 127.0.0.1:{proxy_port}\n\
                 topic sensors/# out 1 \"\" sites/test/\ncleansession false\n\
                 clientid bridge-test\nrestart_timeout 1\nbridge_protocol_version mqttv311\n\
                 try_private false\n"
            ));
            (m.port, Box::new(m))
        }
    }
}

async fn drain_once(b: Bridge, n: usize) -> Option<f64> {
    let cloud = Mosquitto::start();
    let proxy = Proxy::start(cloud.port);
    proxy.set(Mode::Refuse);
    let rules = tempfile::tempdir().unwrap();
    let (port, _guard) = start_bridge(b, proxy.port, &rules.path().join("rules"));
    let counter = Counter::start(cloud.port, "sites/#").await;
    publish(port, n, |i| format!("{i:08}")).await;
    proxy.set(Mode::Pass);
    let took = counter.wait(n, Duration::from_secs(600)).await?;
    Some(n as f64 / took.as_secs_f64().max(1e-6))
}

/// A backlog over a link capped at `bw` bytes/s each way: the time to deliver all of it.
async fn slow_drain_once(b: Bridge, n: usize, bw: u64) -> Option<f64> {
    let cloud = Mosquitto::start();
    let proxy = Proxy::start(cloud.port);
    proxy.set(Mode::Refuse);
    let rules = tempfile::tempdir().unwrap();
    let (port, _guard) = start_bridge(b, proxy.port, &rules.path().join("rules"));
    let counter = Counter::start(cloud.port, "sites/#").await;
    publish(port, n, |i| {
        format!("{:.1}", 15.0 + (i % 100) as f64 / 10.0)
    })
    .await;
    proxy.set_bandwidth(bw);
    proxy.set(Mode::Pass);
    let took = counter.wait(n, Duration::from_secs(900)).await?;
    Some(n as f64 / took.as_secs_f64().max(1e-6))
}

async fn bytes_once(b: Bridge, n: usize, cloud_aliases: bool) -> Option<f64> {
    let cloud = Mosquitto::start_with(if cloud_aliases {
        ""
    } else {
        "max_topic_alias 0\n"
    });
    let proxy = Proxy::start(cloud.port);
    let rules = tempfile::tempdir().unwrap();
    let (port, _guard) = start_bridge(b, proxy.port, &rules.path().join("rules"));
    let counter = Counter::start(cloud.port, "sites/#").await;
    // Let the bridge connect, then count only the readings.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before = proxy.bytes().0;
    publish(port, n, |i| {
        format!("{:.1}", 15.0 + (i % 100) as f64 / 10.0)
    })
    .await;
    counter.wait(n, Duration::from_secs(300)).await?;
    // Let the last acks and pings settle, then count.
    tokio::time::sleep(Duration::from_millis(300)).await;
    Some((proxy.bytes().0 - before) as f64 / n as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench --bench uplink`");
        return;
    }
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    println!(
        "uplink: backlog {} QoS 1 messages, median of {} runs; {} readings for bytes",
        a.backlog, a.runs, a.readings
    );
    let drain = |b: Bridge| {
        let v: Vec<f64> = (0..a.runs)
            .filter_map(|_| rt.block_on(drain_once(b, a.backlog)))
            .collect();
        median(v)
    };
    let o = drain(Bridge::Outpost { v5: true });
    let m = drain(Bridge::Mosquitto);
    println!("| scenario | outpost | mosquitto bridge | ratio | unit |");
    println!("| --- | --- | --- | --- | --- |");
    println!(
        "| backlog drain of {} messages to an upstream mosquitto, loopback | {o:.0} | {m:.0} | {:.2} | msg/s |",
        a.backlog,
        o / m
    );
    // 64 kbit/s each way: a satellite or poor cellular link.
    let slow = |b: Bridge| {
        let v: Vec<f64> = (0..a.runs)
            .filter_map(|_| rt.block_on(slow_drain_once(b, a.slow, 8_000)))
            .collect();
        median(v)
    };
    let (os, ms) = (slow(Bridge::Outpost { v5: true }), slow(Bridge::Mosquitto));
    println!(
        "| backlog drain of {} messages over 64 kbit/s each way | {os:.0} | {ms:.0} | {:.2} | msg/s |",
        a.slow,
        os / ms
    );
    if std::env::args().any(|a| a == "--drain-only") {
        return;
    }
    let bytes = |b: Bridge, aliases: bool| {
        rt.block_on(bytes_once(b, a.readings, aliases))
            .unwrap_or(f64::NAN)
    };
    let o5 = bytes(Bridge::Outpost { v5: true }, true);
    let o5n = bytes(Bridge::Outpost { v5: true }, false);
    let o3 = bytes(Bridge::Outpost { v5: false }, true);
    let mb = bytes(Bridge::Mosquitto, true);
    for (label, v) in [
        ("MQTT 5 with topic aliases", o5),
        ("MQTT 5, upstream allows no aliases", o5n),
        ("MQTT 3.1.1", o3),
    ] {
        println!(
            "| uplink bytes per reading, {} readings, outpost on {label} | {v:.1} | {mb:.1} | {:.2} | bytes |",
            a.readings,
            v / mb
        );
    }
}
