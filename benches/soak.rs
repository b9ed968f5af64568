//! Soak: outpost (release build) under a steady mixed load for a while, with the uplink cut
//! every minute, watched from outside.
//!
//! `cargo bench --bench soak` runs 10 minutes; `-- --minutes M` (or `--seconds S`),
//! `--mqtt N` (1000), `--sn N` (500), `--interval S` (10: seconds between one client's
//! publishes), `--cut-every S` (60) and `--down S` (15) change it.
//!
//! The load:
//! - N MQTT clients (rumqttc): 2% subscribe to `soak/mqtt/#` at QoS 0, the rest each publish
//!   one QoS 1 message every interval and wait for its PUBACK;
//! - N MQTT-SN clients over UDP: four in five stay connected and publish QoS 1 every interval;
//!   one in five sleeps between publishes (DISCONNECT with a duration, PINGREQ to wake,
//!   CONNECT again to publish);
//! - a sensor on a pty writing a `kv` line five times a second to a `[[serial]]` port at QoS 1;
//! - an `[[out]]` rule sending all of it to a cloud mosquitto through the fault proxy, which
//!   cuts the link every `--cut-every` seconds and refuses it for `--down` seconds.
//!
//! Every 5 s it records outpost's resident memory, open file descriptors, outbox depth
//! (`outpost status --json`), and the errors seen (client timeouts and failures, warnings in
//! outpost's log) to `target/soak/soak-<unix time>.csv`. At the end it stops the load, lets the
//! link stay up, and checks: every message outpost acknowledged (and every serial line written)
//! reached the cloud, the outbox drained to 0, and memory and descriptors stayed flat (the last
//! quarter of the run against the second). It prints a summary and exits 1 if a check failed.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{uplink_section, Mode, Mosquitto, Proxy};
use common::Outpost;
use outpost::proto::mqttsn::{decode, encode, Flags, Message, SnQos, TopicRef};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::net::UdpSocket;
use tokio::time::{sleep, timeout};

const RULES: &str = r#"
[[out]]
filter = "soak/#"
remote_prefix = "sites/{gateway_id}/"
qos = 1

[[out]]
filter = "sensors/#"
remote_prefix = "sites/{gateway_id}/"
qos = 1
"#;

struct Args {
    secs: u64,
    mqtt: usize,
    sn: usize,
    interval: u64,
    cut_every: u64,
    down: u64,
}

fn args() -> Args {
    let mut a = Args {
        secs: 600,
        mqtt: 1000,
        sn: 500,
        interval: 10,
        cut_every: 60,
        down: 15,
    };
    let v: Vec<String> = std::env::args().collect();
    for w in v.windows(2) {
        let n: Option<u64> = w[1].parse().ok();
        match (w[0].as_str(), n) {
            ("--minutes", Some(n)) => a.secs = n * 60,
            ("--seconds", Some(n)) => a.secs = n,
            ("--mqtt", Some(n)) => a.mqtt = n as usize,
            ("--sn", Some(n)) => a.sn = n as usize,
            ("--interval", Some(n)) => a.interval = n.max(1),
            ("--cut-every", Some(n)) => a.cut_every = n.max(5),
            ("--down", Some(n)) => a.down = n,
            _ => {}
        }
    }
    a
}

/// What the load generators saw; shared by every task.
#[derive(Default)]
struct Tally {
    /// Payloads outpost acknowledged (PUBACK), MQTT and MQTT-SN.
    acked: Mutex<HashSet<String>>,
    acked_mqtt: AtomicU64,
    acked_sn: AtomicU64,
    serial_written: Mutex<Vec<String>>,
    /// Payloads the cloud subscriber received.
    cloud: Mutex<HashSet<String>>,
    cloud_n: AtomicU64,
    local_received: AtomicU64,
    /// Client-side trouble: timeouts waiting for an ack, connection errors.
    errors: AtomicU64,
    stop: AtomicBool,
}

/// Sleeps `d`, or less if the run is stopping.
async fn nap(t: &Tally, d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end && !t.stop.load(Ordering::Relaxed) {
        sleep((end - Instant::now()).min(Duration::from_millis(500))).await;
    }
}

fn mqtt_opts(port: u16, id: &str) -> MqttOptions {
    let mut o = MqttOptions::new(id, "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_inflight(10);
    o
}

/// One publisher: a QoS 1 message every `interval`, waiting for each PUBACK.
async fn mqtt_publisher(port: u16, i: usize, interval: Duration, t: Arc<Tally>) {
    let (c, mut ev) = AsyncClient::new(mqtt_opts(port, &format!("soak-m{i}")), 16);
    let topic = format!("soak/mqtt/{i}");
    // Spread the first publishes over the interval.
    nap(&t, interval.mul_f64((i % 100) as f64 / 100.0)).await;
    let mut seq = 0u64;
    while !t.stop.load(Ordering::Relaxed) {
        seq += 1;
        let payload = format!("m{i}-{seq}");
        if c.publish(&topic, QoS::AtLeastOnce, false, payload.clone())
            .await
            .is_err()
        {
            t.errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let acked = timeout(Duration::from_secs(30), async {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => return true,
                    Ok(_) => {}
                    Err(_) => {
                        // rumqttc reconnects on the next poll and resends what is unacked.
                        t.errors.fetch_add(1, Ordering::Relaxed);
                        sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        })
        .await
        .unwrap_or(false);
        if acked {
            t.acked.lock().unwrap().insert(payload);
            t.acked_mqtt.fetch_add(1, Ordering::Relaxed);
        } else {
            t.errors.fetch_add(1, Ordering::Relaxed);
        }
        // Keep polling while waiting, so keep-alive and a late ack are handled.
        let _ = timeout(interval, async {
            while !t.stop.load(Ordering::Relaxed) {
                if ev.poll().await.is_err() {
                    sleep(Duration::from_millis(500)).await;
                }
            }
        })
        .await;
    }
    let _ = c.disconnect().await;
    let _ = timeout(Duration::from_secs(2), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
}

/// A local subscriber at QoS 0: outpost fans the publishers' messages out to it.
async fn mqtt_subscriber(port: u16, i: usize, t: Arc<Tally>) {
    let (c, mut ev) = AsyncClient::new(mqtt_opts(port, &format!("soak-s{i}")), 16);
    if c.subscribe("soak/mqtt/#", QoS::AtMostOnce).await.is_err() {
        t.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    while !t.stop.load(Ordering::Relaxed) {
        match timeout(Duration::from_secs(1), ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(_)))) => {
                t.local_received.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(_)) => {
                t.errors.fetch_add(1, Ordering::Relaxed);
                sleep(Duration::from_millis(500)).await;
            }
        }
    }
    let _ = c.disconnect().await;
}

/// A UDP MQTT-SN client.
struct Sn {
    sock: UdpSocket,
    buf: Vec<u8>,
}

impl Sn {
    async fn send(&self, m: &Message) -> bool {
        let mut d = Vec::new();
        encode(m, &mut d).expect("test messages are small");
        self.sock.send(&d).await.is_ok()
    }

    /// The next message `want` accepts within `limit` (others are answered or dropped).
    async fn wait(&mut self, limit: Duration, want: impl Fn(&Message) -> bool) -> Option<Message> {
        let end = Instant::now() + limit;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            let n = timeout(left, self.sock.recv(&mut self.buf))
                .await
                .ok()?
                .ok()?;
            let Ok(m) = decode(&self.buf[..n]) else {
                continue;
            };
            // Messages from the gateway (none expected: nobody subscribes) are acknowledged.
            if let Message::Publish {
                flags,
                topic,
                msg_id,
                ..
            } = &m
            {
                if flags.qos == SnQos::One {
                    let _ = self
                        .send(&Message::PubAck {
                            topic_id: topic.id_bytes(),
                            msg_id: *msg_id,
                            rc: 0,
                        })
                        .await;
                }
            }
            if want(&m) {
                return Some(m);
            }
        }
    }

    /// Sends `m` and waits for the answer `want` accepts, resending (as DUP where that
    /// applies) every 5 s, three times.
    async fn exchange(
        &mut self,
        mut m: Message,
        want: impl Fn(&Message) -> bool,
    ) -> Option<Message> {
        for _ in 0..4 {
            if !self.send(&m).await {
                return None;
            }
            if let Some(r) = self.wait(Duration::from_secs(5), &want).await {
                return Some(r);
            }
            if let Message::Publish { flags, .. } = &mut m {
                flags.dup = true;
            }
        }
        None
    }

    /// CONNECT then REGISTER of `topic`; the topic id.
    async fn connect(
        &mut self,
        id: &str,
        clean: bool,
        keep_alive: u16,
        topic: &str,
    ) -> Option<u16> {
        let connect = Message::Connect {
            flags: Flags {
                clean_session: clean,
                ..Flags::default()
            },
            duration: keep_alive,
            client_id: id.into(),
        };
        match self
            .exchange(connect, |m| matches!(m, Message::ConnAck { .. }))
            .await?
        {
            Message::ConnAck { rc: 0 } => {}
            _ => return None,
        }
        let reg = Message::Register {
            topic_id: 0,
            msg_id: 1,
            topic: topic.into(),
        };
        match self
            .exchange(reg, |m| matches!(m, Message::RegAck { msg_id: 1, .. }))
            .await?
        {
            Message::RegAck {
                topic_id, rc: 0, ..
            } => Some(topic_id),
            _ => None,
        }
    }
}

/// One MQTT-SN sensor: QoS 1 every `interval`; a sleeper DISCONNECTs with a duration between
/// publishes, wakes with PINGREQ, and CONNECTs again to publish.
async fn sn_client(port: u16, i: usize, sleeper: bool, interval: Duration, t: Arc<Tally>) {
    let Ok(sock) = UdpSocket::bind("127.0.0.1:0").await else {
        t.errors.fetch_add(1, Ordering::Relaxed);
        return;
    };
    if sock.connect(("127.0.0.1", port)).await.is_err() {
        t.errors.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut c = Sn {
        sock,
        buf: vec![0; 2048],
    };
    let id = format!("soak-n{i}");
    let topic = format!("soak/sn/{i}");
    nap(&t, interval.mul_f64((i % 100) as f64 / 100.0)).await;
    // Long enough that one publish per interval keeps the client alive, whatever the interval.
    let keep_alive = (interval.as_secs() * 3).clamp(60, u16::MAX as u64) as u16;
    let mut topic_id = None;
    let mut seq = 0u16;
    while !t.stop.load(Ordering::Relaxed) {
        if topic_id.is_none() {
            topic_id = c.connect(&id, !sleeper, keep_alive, &topic).await;
            if topic_id.is_none() {
                t.errors.fetch_add(1, Ordering::Relaxed);
                nap(&t, Duration::from_secs(5)).await;
                continue;
            }
        }
        let Some(tid) = topic_id else { continue };
        seq = seq.wrapping_add(1).max(1);
        let payload = format!("n{i}-{seq}");
        let publish = Message::Publish {
            flags: Flags {
                qos: SnQos::One,
                ..Flags::default()
            },
            topic: TopicRef::Id(tid),
            msg_id: seq,
            data: payload.clone().into(),
        };
        let ack = c
            .exchange(
                publish,
                |m| matches!(m, Message::PubAck { msg_id, .. } if *msg_id == seq),
            )
            .await;
        match ack {
            Some(Message::PubAck { rc: 0, .. }) => {
                t.acked.lock().unwrap().insert(payload);
                t.acked_sn.fetch_add(1, Ordering::Relaxed);
            }
            _ => {
                t.errors.fetch_add(1, Ordering::Relaxed);
                topic_id = None;
            }
        }
        if sleeper {
            let d = Message::Disconnect {
                duration: Some(keep_alive),
            };
            let _ = c
                .exchange(d, |m| matches!(m, Message::Disconnect { .. }))
                .await;
            nap(&t, interval).await;
            // Awake for a moment: whatever was buffered, then PINGRESP; then active again.
            let ping = Message::PingReq {
                client_id: Some(id.clone()),
            };
            if c.exchange(ping, |m| matches!(m, Message::PingResp))
                .await
                .is_none()
            {
                t.errors.fetch_add(1, Ordering::Relaxed);
            }
            topic_id = None;
        } else {
            // The next publish, within the keep-alive, is what keeps the client alive.
            nap(&t, interval).await;
        }
    }
    let _ = c.send(&Message::Disconnect { duration: None }).await;
}

/// The cloud application: a persistent QoS 1 subscriber on the upstream broker.
async fn cloud(port: u16, t: Arc<Tally>) {
    let mut o = MqttOptions::new("soak-cloud", "127.0.0.1", port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_clean_session(false);
    o.set_inflight(100);
    let (c, mut ev) = AsyncClient::new(o, 64);
    let _ = c.subscribe("sites/#", QoS::AtLeastOnce).await;
    loop {
        match ev.poll().await {
            Ok(Event::Incoming(Packet::Publish(p))) => {
                t.cloud
                    .lock()
                    .unwrap()
                    .insert(String::from_utf8_lossy(&p.payload).into_owned());
                t.cloud_n.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                // Resubscribe after a reconnect, in case the session was lost.
                let _ = c.subscribe("sites/#", QoS::AtLeastOnce).await;
            }
            Ok(_) => {}
            Err(_) => sleep(Duration::from_millis(200)).await,
        }
    }
}

/// The sensor: `s=<n>` five times a second, on its own thread (pty writes block when the
/// port stops reading, which is outpost's back-pressure).
fn serial_feed(mut master: std::fs::File, t: Arc<Tally>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !t.stop.load(Ordering::Relaxed) {
            n += 1;
            if master.write_all(format!("s={n}\n").as_bytes()).is_err() {
                t.errors.fetch_add(1, Ordering::Relaxed);
                return;
            }
            t.serial_written.lock().unwrap().push(n.to_string());
            std::thread::sleep(Duration::from_millis(200));
        }
    })
}

fn fds(pid: u32) -> u64 {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

/// (outbox depth, uplink state) from `outpost status --json`.
fn status(cfg: &std::path::Path) -> (Option<u64>, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(["status", "--json", "--config"])
        .arg(cfg)
        .output();
    let Ok(out) = out else {
        return (None, "?".into());
    };
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
        return (None, "?".into());
    };
    (
        v["backlog"]["messages"].as_u64(),
        v["uplink"]["state"].as_str().unwrap_or("?").to_string(),
    )
}

/// Resident memory and outbox depth over time as an SVG (two lines, each on its own scale, named
/// with its maximum): enough to see a leak or a backlog that does not drain, with no plotting
/// crate.
fn plot(samples: &[(u64, u64, u64)], depths: &[u64]) -> String {
    let (w, h, pad) = (900.0, 360.0, 50.0);
    let t_max = samples.last().map_or(1, |s| s.0).max(1) as f64;
    let rss_max = samples.iter().map(|s| s.1).max().unwrap_or(1).max(1) as f64;
    let depth_max = depths.iter().copied().max().unwrap_or(1).max(1) as f64;
    let line = |ys: &mut dyn Iterator<Item = (u64, f64)>, max: f64| {
        ys.map(|(t, y)| {
            format!(
                "{:.1},{:.1}",
                pad + (t as f64 / t_max) * (w - 2.0 * pad),
                h - pad - (y / max) * (h - 2.0 * pad)
            )
        })
        .collect::<Vec<_>>()
        .join(" ")
    };
    let rss = line(&mut samples.iter().map(|s| (s.0, s.1 as f64)), rss_max);
    let depth = line(
        &mut samples.iter().zip(depths).map(|(s, d)| (s.0, *d as f64)),
        depth_max,
    );
    format!(
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="13">
<rect width="100%" height="100%" fill="white"/>
<line x1="{pad}" y1="{b}" x2="{r}" y2="{b}" stroke="black"/>
<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{b}" stroke="black"/>
<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{rss}"/>
<polyline fill="none" stroke="#d62728" stroke-width="1.5" points="{depth}"/>
<text x="{pad}" y="20" fill="#1f77b4">resident memory (top = {rss_mib:.1} MiB)</text>
<text x="{mid}" y="20" fill="#d62728">outbox depth (top = {depth_max} messages)</text>
<text x="{r}" y="{tl}" text-anchor="end">{t_max} s</text>
<text x="{pad}" y="{tl}">0 s</text>
</svg>
"##,
        b = h - pad,
        r = w - pad,
        mid = w / 2.0,
        tl = h - pad + 20.0,
        rss_mib = rss_max / 1024.0,
    )
}

fn median(mut v: Vec<u64>) -> u64 {
    if v.is_empty() {
        return 0;
    }
    v.sort_unstable();
    v[v.len() / 2]
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        println!("soak skipped: run it with `cargo bench --bench soak`");
        return;
    }
    let a = args();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let code = rt.block_on(soak(a));
    std::process::exit(code);
}

async fn soak(a: Args) -> i32 {
    let upstream = Mosquitto::start();
    let proxy = Proxy::start(upstream.port);
    let rules = tempfile::tempdir().expect("tempdir");
    let (master, slave_path, _slave) = common::pty();
    let extra = format!(
        "[[listener]]\nkind = \"mqtt-sn\"\nbind = \"127.0.0.1:0\"\n\n{}\n\
         [[serial]]\nname = \"p1\"\ndevice = \"{slave_path}\"\nbaud = 115200\n\
         framing = \"lines\"\ndecode = \"kv\"\nqos = 1\n",
        uplink_section(rules.path(), RULES, proxy.port, "10s", ""),
    );
    let o = Outpost::start(&extra);
    let pid = o.child.id();
    let cfg = o.dir.path().join("outpost.toml");
    let sn_port = o.sn_port();
    let t = Arc::new(Tally::default());
    tokio::spawn(cloud(upstream.port, t.clone()));

    println!(
        "soak: {} s, {} MQTT clients, {} MQTT-SN clients, serial at 5 lines/s, uplink cut every {} s for {} s",
        a.secs, a.mqtt, a.sn, a.cut_every, a.down
    );
    let interval = Duration::from_secs(a.interval);
    let mut tasks = Vec::new();
    let subscribers = (a.mqtt / 50).max(1);
    for i in 0..a.mqtt {
        let t = t.clone();
        tasks.push(if i < subscribers {
            tokio::spawn(mqtt_subscriber(o.port, i, t))
        } else {
            tokio::spawn(mqtt_publisher(o.port, i, interval, t))
        });
        if i % 50 == 49 {
            sleep(Duration::from_millis(20)).await;
        }
    }
    for i in 0..a.sn {
        tasks.push(tokio::spawn(sn_client(
            sn_port,
            i,
            i % 5 == 4,
            interval,
            t.clone(),
        )));
    }
    let feed = serial_feed(master, t.clone());

    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak");
    let _ = std::fs::create_dir_all(&dir);
    let unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let csv_path = dir.join(format!("soak-{unix}.csv"));
    let mut csv = std::fs::File::create(&csv_path).expect("csv");
    let _ = writeln!(
        csv,
        "t_s,rss_kib,fds,outbox,uplink,acked_mqtt,acked_sn,serial_written,cloud_received,local_received,client_errors,log_warnings"
    );
    let warnings = |o: &Outpost| {
        o.log()
            .lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .count()
    };
    let start = Instant::now();
    let mut samples: Vec<(u64, u64, u64)> = Vec::new();
    let mut depths: Vec<u64> = Vec::new();
    let mut next_cut = a.cut_every;
    let mut restore_at = None;
    let mut cuts = 0;
    let mut max_outbox = 0;
    while start.elapsed() < Duration::from_secs(a.secs) {
        sleep(Duration::from_secs(5)).await;
        let el = start.elapsed().as_secs();
        if el >= next_cut {
            proxy.set(Mode::Refuse);
            proxy.cut();
            cuts += 1;
            restore_at = Some(el + a.down);
            next_cut += a.cut_every;
        }
        if restore_at.is_some_and(|r| el >= r) {
            proxy.set(Mode::Pass);
            restore_at = None;
        }
        let (rss, nfd) = (common::rss_kib(pid), fds(pid));
        let (outbox, uplink) = status(&cfg);
        max_outbox = max_outbox.max(outbox.unwrap_or(0));
        samples.push((el, rss, nfd));
        depths.push(outbox.unwrap_or(0));
        let _ = writeln!(
            csv,
            "{el},{rss},{nfd},{},{uplink},{},{},{},{},{},{},{}",
            outbox.map(|o| o.to_string()).unwrap_or_default(),
            t.acked_mqtt.load(Ordering::Relaxed),
            t.acked_sn.load(Ordering::Relaxed),
            t.serial_written.lock().unwrap().len(),
            t.cloud_n.load(Ordering::Relaxed),
            t.local_received.load(Ordering::Relaxed),
            t.errors.load(Ordering::Relaxed),
            warnings(&o),
        );
        eprintln!(
            "  {el:>5}s rss {rss} KiB, fds {nfd}, outbox {}, uplink {uplink}, acked {}, cloud {}",
            outbox.map(|o| o.to_string()).unwrap_or("?".into()),
            t.acked_mqtt.load(Ordering::Relaxed) + t.acked_sn.load(Ordering::Relaxed),
            t.cloud_n.load(Ordering::Relaxed)
        );
    }

    // Stop the load, restore the link, and let everything drain.
    t.stop.store(true, Ordering::Relaxed);
    proxy.set(Mode::Pass);
    for task in tasks {
        let _ = timeout(Duration::from_secs(60), task).await;
    }
    let _ = feed.join();
    let expected: HashSet<String> = {
        let acked = t.acked.lock().unwrap().clone();
        let serial = t.serial_written.lock().unwrap().clone();
        acked.into_iter().chain(serial).collect()
    };
    let drain_start = Instant::now();
    let mut outbox_end = None;
    let mut missing = expected.len();
    while drain_start.elapsed() < Duration::from_secs(300) {
        let cloud = t.cloud.lock().unwrap().clone();
        missing = expected.iter().filter(|p| !cloud.contains(*p)).count();
        outbox_end = status(&cfg).0;
        if missing == 0 && outbox_end == Some(0) {
            break;
        }
        sleep(Duration::from_secs(1)).await;
    }
    let drained_in = drain_start.elapsed();

    // Flat: the last quarter of the run against the second (the first is warm-up: connections
    // opening, SQLite's cache filling).
    let q = samples.len() / 4;
    let (second, last) = if q > 0 {
        (&samples[q..2 * q], &samples[samples.len() - q..])
    } else {
        (&samples[..], &samples[..])
    };
    let rss_second = median(second.iter().map(|s| s.1).collect());
    let rss_last = median(last.iter().map(|s| s.1).collect());
    let fd_second = second.iter().map(|s| s.2).max().unwrap_or(0);
    let fd_last = last.iter().map(|s| s.2).max().unwrap_or(0);
    let rss_flat = rss_last <= rss_second + rss_second / 10 + 8 * 1024;
    let fd_flat = fd_last <= fd_second + 16;
    let serial_n = t.serial_written.lock().unwrap().len();
    let svg_path = csv_path.with_extension("svg");
    let _ = std::fs::write(&svg_path, plot(&samples, &depths));
    let ok = missing == 0 && outbox_end == Some(0) && rss_flat && fd_flat;
    println!(
        "soak summary ({} s, {cuts} uplink cuts; CSV {}, plot {}):",
        a.secs,
        csv_path.display(),
        svg_path.display()
    );
    println!(
        "  acknowledged: {} MQTT, {} MQTT-SN, {serial_n} serial lines written; local QoS 0 deliveries {}",
        t.acked_mqtt.load(Ordering::Relaxed),
        t.acked_sn.load(Ordering::Relaxed),
        t.local_received.load(Ordering::Relaxed)
    );
    println!(
        "  lost: {missing} of {} acknowledged messages and serial lines missing at the cloud {}",
        expected.len(),
        if missing == 0 { "(ok)" } else { "(FAIL)" }
    );
    println!(
        "  backlog: peak {max_outbox}, {} once the load stopped and {:.1} s more passed {}",
        outbox_end.map(|o| o.to_string()).unwrap_or("?".into()),
        drained_in.as_secs_f64(),
        if outbox_end == Some(0) {
            "(ok)"
        } else {
            "(FAIL)"
        }
    );
    println!(
        "  memory: median RSS {} MiB in the second quarter, {} MiB in the last {}",
        rss_second / 1024,
        rss_last / 1024,
        if rss_flat {
            "(flat)"
        } else {
            "(GROWING: FAIL)"
        }
    );
    println!(
        "  descriptors: at most {fd_second} in the second quarter, {fd_last} in the last {}",
        if fd_flat { "(flat)" } else { "(GROWING: FAIL)" }
    );
    println!(
        "  errors: {} seen by clients, {} warnings in outpost's log",
        t.errors.load(Ordering::Relaxed),
        warnings(&o)
    );
    // What the warnings were, by kind: the message text after the level and target.
    let mut kinds: std::collections::BTreeMap<String, usize> = Default::default();
    for l in o.log().lines() {
        if let Some(rest) = l
            .split(" WARN ")
            .nth(1)
            .or_else(|| l.split(" ERROR ").nth(1))
        {
            let msg = rest.split_once(": ").map_or(rest, |(_, m)| m);
            let key: String = msg
                .split(['=', '('])
                .next()
                .unwrap_or(msg)
                .chars()
                .take(70)
                .collect();
            *kinds.entry(key).or_default() += 1;
        }
    }
    for (k, n) in &kinds {
        println!("    {n:>5} × {k}");
    }
    if !ok {
        let log = o.log();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!("outpost log (last 30 lines):");
        for l in tail.iter().rev() {
            eprintln!("{l}");
        }
    }
    drop(upstream);
    if ok {
        0
    } else {
        1
    }
}
