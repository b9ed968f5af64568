//! Side-by-side broker benchmark: outpost against mosquitto on the same machine, driven by the
//! same rumqttc load generator. Prints the median of several runs for each and the ratio.
//!
//! `cargo bench --bench broker` (add `-- --runs 7 --messages 200000` to change the sizes).
//! Needs mosquitto installed (tests/run installs it). Scenarios so far: 1 publisher to 1
//! subscriber, 64-byte payloads, QoS 0 and QoS 1. Issue 9 grows this into the full table.

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

/// One run: a subscriber and a publisher; returns messages per second as the subscriber saw them.
async fn one_to_one(port: u16, qos: QoS, n: usize, run: usize) -> f64 {
    let topic = format!("bench/{run}");
    let mut so = MqttOptions::new(format!("bench-sub-{run}"), "127.0.0.1", port);
    so.set_keep_alive(Duration::from_secs(60));
    so.set_inflight(100);
    let (sub, mut sub_ev) = AsyncClient::new(so, 1000);
    sub.subscribe(&topic, qos).await.expect("subscribe");
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = sub_ev.poll().await {
            break;
        }
    }
    let mut po = MqttOptions::new(format!("bench-pub-{run}"), "127.0.0.1", port);
    po.set_keep_alive(Duration::from_secs(60));
    po.set_inflight(100);
    let (publisher, mut pub_ev) = AsyncClient::new(po, 1000);
    let driver = tokio::spawn(async move { while pub_ev.poll().await.is_ok() {} });
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
                ..StoreConfig::default()
            },
        )
        .expect("store");
        store
            .submit_wait(vec![Op::SessionPut(StoredSession {
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

/// Runs `scenario` `runs` times on each broker and prints one row: both medians and the ratio.
fn side_by_side(label: &str, note: &str, runs: usize, mut scenario: impl FnMut(u16, usize) -> f64) {
    let mut medians = Vec::new();
    for make in [outpost as fn() -> Broker, mosquitto] {
        let b = make();
        let rates: Vec<f64> = (0..runs).map(|run| scenario(b.port, run)).collect();
        eprintln!(
            "  {} {label}: {:?}",
            b.name,
            rates.iter().map(|r| *r as u64).collect::<Vec<_>>()
        );
        medians.push(median(rates));
    }
    println!(
        "{:<22} {:>14.0} {:>14.0} {:>8.2}{note}",
        label,
        medians[0],
        medians[1],
        medians[0] / medians[1]
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
    let only_durable = std::env::args().any(|a| a == "--durable-only");
    println!(
        "1 publisher -> 1 subscriber, 64-byte payloads, {} messages, median of {} runs",
        a.messages, a.runs
    );
    println!(
        "{:<22} {:>14} {:>14} {:>8}",
        "scenario", "outpost msg/s", "mosquitto msg/s", "ratio"
    );
    let live: &[(&str, QoS)] = if only_durable {
        &[]
    } else {
        &[("QoS 0", QoS::AtMostOnce), ("QoS 1", QoS::AtLeastOnce)]
    };
    for &(label, qos) in live {
        side_by_side(&format!("1->1 {label}"), "", a.runs, |port, run| {
            rt.block_on(one_to_one(port, qos, a.messages, run))
        });
    }
    side_by_side(
        "QoS 1 to offline sess.",
        "   (outpost: on disk, synchronous=full; mosquitto: in memory)",
        a.runs,
        |port, run| rt.block_on(durable_ingest(port, a.messages / 5, run)),
    );
    if only_durable {
        return;
    }
    let times = start_to_ready(1_000_000, 5);
    eprintln!(
        "  start to READY with 1M queued: {:?} ms",
        times.iter().map(|t| *t as u64).collect::<Vec<_>>()
    );
    println!(
        "start to READY, 1,000,000 queued messages: median {:.0} ms (outpost only)",
        median(times)
    );
}
