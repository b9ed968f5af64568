//! Side-by-side broker benchmark: outpost against mosquitto on the same machine, driven by the
//! same rumqttc load generator. Prints the median of several runs for each and the ratio.
//!
//! `cargo bench --bench broker` (add `-- --runs 7 --messages 200000` to change the sizes).
//! Needs mosquitto installed (tests/run installs it). Rows, 64-byte payloads throughout:
//! - 1 publisher -> 1 subscriber at QoS 0, 1 and 2: messages per second as the subscriber sees
//!   them, the publisher sending as fast as its window allows;
//! - the same pair paced at 2,000 messages per second: p50 and p99 latency (publish to
//!   arrival; the send time rides in the payload);
//! - fan-in (50 publishers -> 1 subscriber) and fan-out (1 publisher -> 50 subscribers) at
//!   QoS 0 and 1: deliveries per second;
//! - 1,000 and then 2,000 idle connections (CONNECT, CONNACK, nothing more): the broker's
//!   resident memory;
//! - QoS 1 to an offline persistent session: outpost commits each message to SQLite
//!   (synchronous=full) before its PUBACK, mosquitto keeps it in memory;
//! - outpost alone: start to READY with 1,000,000 messages queued.
//!
//! The uplink (backlog drain, bytes per reading) and MQTT-SN rows are `--bench uplink` and
//! `--bench mqttsn`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};

struct Args {
    runs: usize,
    messages: usize,
}

fn args() -> Args {
    let mut a = Args {
        runs: 5,
        messages: 100_000,
    };
    let v: Vec<String> = std::env::args().collect();
    let mut i = 1;
    while i < v.len() {
        match v[i].as_str() {
            "--runs" => a.runs = v.get(i + 1).and_then(|s| s.parse().ok()).unwrap_or(a.runs),
            "--messages" => {
                a.messages = v
                    .get(i + 1)
                    .and_then(|s| s.parse().ok())
                    .unwrap_or(a.messages)
            }
            _ => {
                i += 1;
                continue;
            }
        }
        i += 2;
    }
    a
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

struct Broker {
    name: &'static str,
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_listening(port: u16) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("broker on {port} did not start");
}

fn outpost() -> Broker {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = dir.path().join("outpost.toml");
    std::fs::write(
        &cfg,
        format!(
            "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[[listener]]\nkind = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n[limits]\nmax_queued = 1000000\n{}",
            dir.path().join("data").display(),
            std::env::var("OUTPOST_BENCH_EXTRA").unwrap_or_default().replace("\\n", "\n")
        ),
    )
    .expect("config");
    let child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["run", "--config"])
        .arg(&cfg)
        .env("RUST_LOG", "warn")
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn outpost");
    wait_listening(port);
    Broker {
        name: "outpost",
        child,
        port,
        _dir: dir,
    }
}

fn mosquitto() -> Broker {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let cfg = dir.path().join("m.conf");
    // Comparable settings: no persistence, no queue limit (0 = unlimited, so it does not drop),
    // and the same outbound inflight window as outpost's default.
    std::fs::write(
        &cfg,
        format!(
            "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\nmax_queued_messages 0\nmax_inflight_messages 100\nuser root\nlog_dest none\n"
        ),
    )
    .expect("config");
    let bin = [
        "/usr/sbin/mosquitto",
        "/usr/bin/mosquitto",
        "/usr/local/sbin/mosquitto",
    ]
    .into_iter()
    .find(|p| std::path::Path::new(p).exists())
    .expect("mosquitto not installed: run tests/run or apt-get install mosquitto");
    let child = Command::new(bin)
        .arg("-c")
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn mosquitto");
    wait_listening(port);
    Broker {
        name: "mosquitto",
        child,
        port,
        _dir: dir,
    }
}

/// A subscriber to `topic` (SUBACK received) and a publisher whose event loop a task drives.
async fn pair(
    port: u16,
    topic: &str,
    qos: QoS,
    name: &str,
    run: usize,
) -> (AsyncClient, rumqttc::EventLoop, tokio::task::JoinHandle<()>) {
    let mut so = MqttOptions::new(format!("{name}-sub-{run}"), "127.0.0.1", port);
    so.set_keep_alive(Duration::from_secs(60));
    so.set_inflight(100);
    let (sub, mut sub_ev) = AsyncClient::new(so, 1000);
    sub.subscribe(topic, qos).await.expect("subscribe");
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = sub_ev.poll().await {
            break;
        }
    }
    let mut po = MqttOptions::new(format!("{name}-pub-{run}"), "127.0.0.1", port);
    po.set_keep_alive(Duration::from_secs(60));
    po.set_inflight(100);
    let (publisher, mut pub_ev) = AsyncClient::new(po, 1000);
    let driver = tokio::spawn(async move { while pub_ev.poll().await.is_ok() {} });
    (publisher, sub_ev, driver)
}

/// One run: a subscriber and a publisher; returns messages per second as the subscriber saw them.
async fn one_to_one(port: u16, qos: QoS, n: usize, run: usize) -> f64 {
    let topic = format!("bench/{run}");
    let (publisher, mut sub_ev, driver) = pair(port, &topic, qos, "bench", run).await;
    let payload = vec![b'x'; 64];
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            if publisher
                .publish(topic.as_str(), qos, false, payload.clone())
                .await
                .is_err()
            {
                break;
            }
        }
        publisher
    });
    let mut got = 0usize;
    let mut last = start;
    while got < n {
        match tokio::time::timeout(Duration::from_secs(3), sub_ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                got += 1;
                last = Instant::now();
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let _ = sender.await;
    driver.abort();
    if got < n {
        eprintln!("  (received {got} of {n})");
    }
    got as f64 / last.duration_since(start).as_secs_f64()
}

/// Durable ingest: an offline persistent session subscribes to the topic, so every QoS 1
/// message must be stored before its PUBACK (outpost: committed to SQLite; mosquitto: kept in
/// memory only). Returns PUBACKs per second seen by the publisher.
async fn durable_ingest(port: u16, n: usize, run: usize) -> f64 {
    let topic = format!("ingest/{run}");
    let mut so = MqttOptions::new(format!("ingest-sub-{run}"), "127.0.0.1", port);
    so.set_clean_session(false);
    let (sub, mut sub_ev) = AsyncClient::new(so, 10);
    sub.subscribe(&topic, QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = sub_ev.poll().await {
            break;
        }
    }
    let _ = sub.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while sub_ev.poll().await.is_ok() {}
    })
    .await;
    let mut po = MqttOptions::new(format!("ingest-pub-{run}"), "127.0.0.1", port);
    po.set_inflight(100);
    po.set_keep_alive(Duration::from_secs(60));
    let (publisher, mut ev) = AsyncClient::new(po, 1000);
    let payload = vec![b'x'; 64];
    let start = Instant::now();
    let sender = tokio::spawn(async move {
        for _ in 0..n {
            if publisher
                .publish(topic.as_str(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .is_err()
            {
                break;
            }
        }
        publisher
    });
    let mut acks = 0usize;
    while acks < n {
        match tokio::time::timeout(Duration::from_secs(5), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acks += 1,
            Ok(Ok(_)) => {}
            _ => break,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let _ = sender.await;
    acks as f64 / secs
}

/// Start to READY (listener accepting) with `rows` messages queued for one offline session.
fn start_to_ready(rows: usize, runs: usize) -> Vec<f64> {
    use outpost::store::{Dest, NewMessage, Op, Store, StoreConfig, StoredSession};
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    {
        let store = Store::open(
            &data,
            StoreConfig {
                synchronous: outpost::store::Synchronous::Normal,
                max_messages: rows as u64 + 1,
                // The backlog is one session's queue: give that class the whole store.
                outbox_share: 0.0,
                ..StoreConfig::default()
            },
        )
        .expect("store");
        store
            .submit_wait(vec![Op::SessionPut(StoredSession {
                username: None,
                client_id: "backlog".into(),
                version: 4,
                expiry: u32::MAX,
                expires_ms: None,
                will: None,
                will_due_ms: None,
            })])
            .expect("session");
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        for chunk in 0..rows.div_ceil(10_000) {
            let ops = (0..10_000.min(rows - chunk * 10_000))
                .map(|_| Op::Insert {
                    id: None,
                    msg: NewMessage {
                        dest: Dest::Session("backlog".into()),
                        topic: "backlog/t".into(),
                        payload: bytes::Bytes::from_static(&[b'x'; 64]),
                        qos: 1,
                        retain: false,
                        props: bytes::Bytes::new(),
                        sub_ids: bytes::Bytes::new(),
                        received_ms: now_ms,
                        expires_ms: None,
                    },
                })
                .collect();
            store.submit_wait(ops).expect("insert");
        }
        store.close();
    }
    let mut times = Vec::new();
    for _ in 0..runs {
        let port = free_port();
        let cfg = dir.path().join("outpost.toml");
        std::fs::write(
            &cfg,
            format!(
                "[gateway]\nid = \"bench\"\ndata_dir = \"{}\"\n[[listener]]\nkind = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n[store]\nmax_messages = {}\n",
                data.display(),
                rows + 1
            ),
        )
        .expect("config");
        let t = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "warn")
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn outpost");
        wait_listening(port);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        let _ = child.kill();
        let _ = child.wait();
    }
    times
}

/// Paced 1 -> 1: `rate` messages per second for `n` messages; the latency of each, publish to
/// arrival, in milliseconds. Returns (p50, p99).
async fn latency(port: u16, qos: QoS, n: usize, rate: usize, run: usize) -> (f64, f64) {
    let base = Instant::now();
    let topic = format!("lat/{run}");
    let (publisher, mut sub_ev, driver) = pair(port, &topic, qos, "lat", run).await;
    let per_tick = (rate / 1000).max(1);
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        let mut sent = 0;
        while sent < n {
            tick.tick().await;
            for _ in 0..per_tick.min(n - sent) {
                let mut payload = vec![b'x'; 64];
                let ns = base.elapsed().as_nanos() as u64;
                payload[..8].copy_from_slice(&ns.to_be_bytes());
                if publisher
                    .publish(topic.as_str(), qos, false, payload)
                    .await
                    .is_err()
                {
                    return publisher;
                }
                sent += 1;
            }
        }
        publisher
    });
    let mut lat = Vec::with_capacity(n);
    while lat.len() < n {
        match tokio::time::timeout(Duration::from_secs(3), sub_ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                let mut b = [0u8; 8];
                b.copy_from_slice(&p.payload[..8]);
                let sent = u64::from_be_bytes(b);
                let now = base.elapsed().as_nanos() as u64;
                lat.push(now.saturating_sub(sent) as f64 / 1e6);
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    let _ = sender.await;
    driver.abort();
    if lat.len() < n {
        eprintln!("  (received {} of {n})", lat.len());
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| lat.get(((lat.len() as f64 * q) as usize).min(lat.len().saturating_sub(1)));
    (
        at(0.50).copied().unwrap_or(f64::NAN),
        at(0.99).copied().unwrap_or(f64::NAN),
    )
}

/// `pubs` publishers and `subs` subscribers; every subscriber takes every message. Each
/// publisher sends `per_pub`; returns deliveries per second (all subscribers together).
async fn fan(port: u16, pubs: usize, subs: usize, qos: QoS, per_pub: usize, run: usize) -> f64 {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    let prefix = format!("fan/{run}");
    let got = Arc::new(AtomicUsize::new(0));
    let last = Arc::new(std::sync::Mutex::new(Instant::now()));
    let mut tasks = Vec::new();
    for s in 0..subs {
        let mut o = MqttOptions::new(format!("fan-sub-{run}-{s}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_inflight(100);
        let (c, mut ev) = AsyncClient::new(o, 100);
        c.subscribe(format!("{prefix}/#"), qos)
            .await
            .expect("subscribe");
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = ev.poll().await {
                break;
            }
        }
        let (got, last) = (got.clone(), last.clone());
        tasks.push(tokio::spawn(async move {
            let _c = c;
            while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_secs(3), ev.poll()).await {
                if let Event::Incoming(Packet::Publish(_)) = e {
                    got.fetch_add(1, Ordering::Relaxed);
                    if let Ok(mut l) = last.lock() {
                        *l = Instant::now();
                    }
                }
            }
        }));
    }
    let start = Instant::now();
    for p in 0..pubs {
        let mut o = MqttOptions::new(format!("fan-pub-{run}-{p}"), "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(60));
        o.set_inflight(100);
        let (c, mut ev) = AsyncClient::new(o, 1000);
        let topic = format!("{prefix}/{p}");
        tasks.push(tokio::spawn(async move {
            let sender = tokio::spawn(async move {
                for _ in 0..per_pub {
                    if c.publish(topic.as_str(), qos, false, vec![b'x'; 64])
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                c
            });
            // Drive the connection until the subscribers stop hearing anything.
            let _ = tokio::time::timeout(Duration::from_secs(60), async {
                while ev.poll().await.is_ok() {}
            })
            .await;
            let _ = sender.await;
        }));
    }
    let want = pubs * per_pub * subs;
    let t = Instant::now();
    while got.load(Ordering::Relaxed) < want && t.elapsed() < Duration::from_secs(120) {
        tokio::time::sleep(Duration::from_millis(20)).await;
        let idle = last.lock().map(|l| l.elapsed()).unwrap_or_default();
        if idle > Duration::from_secs(3) && got.load(Ordering::Relaxed) > 0 {
            break;
        }
    }
    let n = got.load(Ordering::Relaxed);
    let end = last.lock().map(|l| *l).unwrap_or_else(|_| Instant::now());
    for t in tasks {
        t.abort();
    }
    if n < want {
        eprintln!("  (delivered {n} of {want})");
    }
    n as f64 / end.duration_since(start).as_secs_f64()
}

/// Opens idle MQTT 3.1.1 connections (CONNECT with keep-alive 0, CONNACK, nothing more) up to
/// each count in `steps`, and reads the broker's resident memory (MiB) at each.
async fn idle_rss(b: &Broker, steps: &[usize]) -> Vec<f64> {
    use outpost::proto::mqtt::{encode, Connect, Packet as P, Props, Version};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conns = Vec::new();
    let mut out = Vec::new();
    for &want in steps {
        while conns.len() < want {
            let k = conns.len();
            let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", b.port)).await else {
                eprintln!("  {}: connect {k} failed", b.name);
                break;
            };
            let mut wire = Vec::new();
            encode(
                &P::Connect(Box::new(Connect {
                    version: Version::V311,
                    clean_start: true,
                    keep_alive: 0,
                    client_id: format!("idle-{k}"),
                    will: None,
                    username: None,
                    password: None,
                    properties: Props::default(),
                })),
                Version::V311,
                &mut wire,
            )
            .expect("a short CONNECT encodes");
            let mut ack = [0u8; 4];
            let ok = s.write_all(&wire).await.is_ok()
                && tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut ack))
                    .await
                    .is_ok_and(|r| r.is_ok())
                && ack[0] == 0x20
                && ack[3] == 0;
            if !ok {
                eprintln!("  {}: connection {k} not accepted", b.name);
                break;
            }
            conns.push(s);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        out.push(common::rss_kib(b.child.id()) as f64 / 1024.0);
    }
    out
}

/// Runs `scenario` `runs` times on each broker (a fresh one of each) and prints one row per
/// figure it returns: both medians and the ratio outpost / mosquitto.
fn side_by_side(
    labels: &[&str],
    unit: &str,
    runs: usize,
    mut scenario: impl FnMut(&Broker, usize) -> Vec<f64>,
) {
    let mut medians: Vec<Vec<f64>> = Vec::new();
    for make in [outpost as fn() -> Broker, mosquitto] {
        let b = make();
        let results: Vec<Vec<f64>> = (0..runs).map(|run| scenario(&b, run)).collect();
        let per_figure: Vec<f64> = (0..labels.len())
            .map(|f| {
                let v: Vec<f64> = results.iter().map(|r| r[f]).collect();
                eprintln!("  {} {}: {:?}", b.name, labels[f], v);
                median(v)
            })
            .collect();
        medians.push(per_figure);
    }
    for (f, label) in labels.iter().enumerate() {
        row(label, medians[0][f], medians[1][f], unit);
    }
}

fn row(label: &str, o: f64, m: f64, unit: &str) {
    let fmt = |v: f64| {
        if v >= 100.0 {
            format!("{v:.0}")
        } else {
            format!("{v:.3}")
        }
    };
    println!(
        "| {label} | {} | {} | {:.2} | {unit} |",
        fmt(o),
        fmt(m),
        o / m
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --all-targets` runs this binary without it, and
    // a benchmark in a debug build measures nothing.
    if !std::env::args().any(|a| a == "--bench") {
        println!("benchmark skipped: run it with `cargo bench --bench broker`");
        return;
    }
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    // `--only=1to1,latency,fan,idle,durable,ready` picks rows; none given runs them all.
    let picked: Vec<String> = std::env::args()
        .filter_map(|a| a.strip_prefix("--only=").map(str::to_string))
        .flat_map(|o| o.split(',').map(str::to_string).collect::<Vec<_>>())
        .collect();
    let only = |name: &str| picked.is_empty() || picked.iter().any(|p| p == name);
    println!(
        "64-byte payloads; {} messages per throughput run; median of {} runs; outpost (release) and mosquitto side by side",
        a.messages, a.runs
    );
    println!("| scenario | outpost | mosquitto | ratio | unit |");
    println!("| --- | --- | --- | --- | --- |");
    let qos_levels = [
        ("QoS 0", QoS::AtMostOnce),
        ("QoS 1", QoS::AtLeastOnce),
        ("QoS 2", QoS::ExactlyOnce),
    ];
    if only("1to1") {
        for &(label, qos) in &qos_levels {
            side_by_side(&[&format!("1→1 {label}")], "msg/s", a.runs, |b, run| {
                vec![rt.block_on(one_to_one(b.port, qos, a.messages, run))]
            });
        }
    }
    if only("latency") {
        for &(label, qos) in &qos_levels {
            side_by_side(
                &[
                    &format!("1→1 {label} at 2,000 msg/s, latency p50"),
                    &format!("1→1 {label} at 2,000 msg/s, latency p99"),
                ],
                "ms",
                a.runs,
                |b, run| {
                    let (p50, p99) = rt.block_on(latency(b.port, qos, 6_000, 2_000, run));
                    vec![p50, p99]
                },
            );
        }
    }
    if only("fan") {
        for &(label, qos) in &qos_levels[..2] {
            side_by_side(
                &[&format!("fan-in 50→1 {label}")],
                "deliveries/s",
                a.runs,
                |b, run| vec![rt.block_on(fan(b.port, 50, 1, qos, a.messages / 50, run))],
            );
            side_by_side(
                &[&format!("fan-out 1→50 {label}")],
                "deliveries/s",
                a.runs,
                |b, run| vec![rt.block_on(fan(b.port, 1, 50, qos, a.messages / 50, run))],
            );
        }
    }
    if only("idle") {
        side_by_side(
            &[
                "RSS with 1,000 idle connections",
                "RSS with 2,000 idle connections",
            ],
            "MiB",
            1,
            |b, _| rt.block_on(idle_rss(b, &[1000, 2000])),
        );
    }
    if only("durable") {
        side_by_side(
            &["QoS 1 to an offline persistent session (outpost: fsync'd SQLite; mosquitto: memory)"],
            "msg/s",
            a.runs,
            |b, run| vec![rt.block_on(durable_ingest(b.port, a.messages / 5, run))],
        );
    }
    if only("ready") {
        let times = start_to_ready(1_000_000, 5);
        eprintln!(
            "  start to READY with 1M queued: {:?} ms",
            times.iter().map(|t| *t as u64).collect::<Vec<_>>()
        );
        println!(
            "| start to READY, 1,000,000 queued messages | {:.0} | – | – | ms |",
            median(times)
        );
    }
}
