//! The uplink against a real mosquitto as the cloud broker, through the fault proxy: store and
//! forward, a black-holed link, SIGKILLs on a flaky link, inbound commands across a crash, and
//! mutual TLS. Clients on both sides are rumqttc, which we did not write.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::proxy::{free_port, Mode, Mosquitto, Proxy};
use common::rq::{client, drain, publish_until_killed, register, tally, wait_suback, Cloud};
use common::Outpost;
use rumqttc::{Event, Packet, QoS};
use tokio::time::timeout;

const RULES: &str = r#"
[[out]]
filter = "sensors/q1/#"
remote_prefix = "sites/{gateway_id}/"
qos = 1

[[out]]
filter = "sensors/q2/#"
remote_prefix = "sites/{gateway_id}/"
qos = 2

[[out]]
filter = "live/#"
remote_prefix = "sites/{gateway_id}/"
qos = 0

[[out]]
filter = "buffered/#"
remote_prefix = "sites/{gateway_id}/"
qos = 0
buffer = true

[[in]]
filter = "sites/{gateway_id}/cmd/#"
remote_prefix = "sites/{gateway_id}/"
local_prefix = ""
qos = 2
"#;

/// Writes the rule set and returns the `[uplink]` section for `port`.
fn uplink(rules: &Path, port: u16, keepalive: &str, more: &str) -> String {
    common::proxy::uplink_section(rules, RULES, port, keepalive, more)
}

/// Publishes `n` QoS 1 messages with payloads `first..first+n` and waits for every PUBACK.
async fn publish_acked(port: u16, topic: &str, first: usize, n: usize) {
    let (c, mut ev) = client(port, &format!("local-pub-{first}"), true);
    let topic = topic.to_owned();
    let sender = tokio::spawn(async move {
        for i in first..first + n {
            c.publish(&topic, QoS::AtLeastOnce, false, i.to_string())
                .await
                .unwrap();
        }
        c
    });
    let mut acks = 0;
    timeout(Duration::from_secs(120), async {
        while acks < n {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => acks += 1,
                Ok(_) => {}
                Err(e) => panic!("local publisher: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("only {acks} of {n} PUBACKs"));
    let _ = sender.await;
}

/// The retained uplink state, read by a local subscriber.
async fn state(port: u16) -> String {
    let (c, mut ev) = client(port, "state-reader", true);
    c.subscribe("$SYS/outpost/uplink/state", QoS::AtMostOnce)
        .await
        .unwrap();
    timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = ev.poll().await {
                return String::from_utf8_lossy(&p.payload).into_owned();
            }
        }
    })
    .await
    .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_and_forward_10k_in_order() {
    let m = Mosquitto::start();
    let proxy = Proxy::start(m.port);
    proxy.set(Mode::Refuse);
    let rules = tempfile::tempdir().unwrap();
    let o = Outpost::start(&uplink(rules.path(), proxy.port, "5s", ""));
    let cloud = Cloud::subscribe(m.port, "sites/test/#").await;

    const N: usize = 10_000;
    publish_acked(o.port, "sensors/q1/flow", 0, N).await;
    let s = state(o.port).await;
    assert!(s.contains("\"state\":\"backoff\""), "uplink is down: {s}");
    assert_eq!(cloud.count(), 0, "nothing passes while the link is down");

    let up = Instant::now();
    proxy.set(Mode::Pass);
    let all = cloud.wait(Duration::from_secs(120), |g| g.len() >= N).await;
    let took = up.elapsed();
    let got = cloud.payloads();
    assert!(all, "only {} of {N} arrived; log:\n{}", got.len(), o.log());
    let want: Vec<String> = (0..N).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "every message, in order");
    let (bytes_up, _) = proxy.bytes();
    println!(
        "store-and-forward: {N} messages drained in {:.2}s ({:.0} msg/s, including reconnect), \
         {:.1} bytes up per message",
        took.as_secs_f64(),
        N as f64 / took.as_secs_f64(),
        bytes_up as f64 / N as f64
    );
    assert!(state(o.port).await.contains("\"state\":\"connected\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn black_hole_is_noticed_within_one_and_a_half_keepalives() {
    let m = Mosquitto::start();
    let proxy = Proxy::start(m.port);
    let rules = tempfile::tempdir().unwrap();
    let o = Outpost::start(&uplink(rules.path(), proxy.port, "2s", ""));
    let cloud = Cloud::subscribe(m.port, "sites/test/#").await;
    publish_acked(o.port, "sensors/q1/a", 0, 10).await;
    assert!(cloud.wait(Duration::from_secs(10), |g| g.len() >= 10).await);

    // Watch the state from a local subscriber while the path goes silent.
    let (c, mut ev) = client(o.port, "state-watch", true);
    c.subscribe("$SYS/outpost/uplink/state", QoS::AtMostOnce)
        .await
        .unwrap();
    wait_suback(&mut ev).await;
    proxy.set(Mode::BlackHole);
    let holed = Instant::now();
    // Traffic keeps flowing locally meanwhile; it is acknowledged (it is on disk).
    let publisher = tokio::spawn({
        let port = o.port;
        async move { publish_acked(port, "sensors/q1/a", 10, 200).await }
    });
    let noticed = timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::Publish(p))) = ev.poll().await {
                let s = String::from_utf8_lossy(&p.payload).into_owned();
                if !s.contains("\"state\":\"connected\"") {
                    return (holed.elapsed(), s);
                }
            }
        }
    })
    .await;
    let (after, s) = noticed.unwrap_or_else(|_| panic!("never noticed; log:\n{}", o.log()));
    println!("black hole noticed after {after:?} (keepalive 2s): {s}");
    assert!(after <= Duration::from_millis(3_500), "{after:?}");
    publisher.await.unwrap();

    proxy.set(Mode::Pass);
    let all = cloud
        .wait(Duration::from_secs(30), |g| g.len() >= 210)
        .await;
    let got = cloud.payloads();
    assert!(all, "only {} of 210 arrived; log:\n{}", got.len(), o.log());
    let mut seen: Vec<usize> = got.iter().map(|p| p.parse().unwrap()).collect();
    seen.sort();
    seen.dedup();
    assert_eq!(seen, (0..210).collect::<Vec<_>>(), "nothing lost");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_reach_the_cloud_across_kills_and_a_flaky_link() {
    const KILLS: usize = 20;
    let m = Mosquitto::start();
    let proxy = Arc::new(Proxy::start(m.port));
    let rules = tempfile::tempdir().unwrap();
    let cfg = uplink(rules.path(), proxy.port, "2s", "max_inflight = 32\n");
    let cloud = Cloud::subscribe(m.port, "sites/test/#").await;
    let mut o = Outpost::start(&cfg);

    // The link misbehaves on its own schedule: cuts, black holes, refusals, good spells.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flapper = {
        let (proxy, stop) = (proxy.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut rng: u64 = 0x0f1a_4b17;
            let mut faults = [0usize; 4];
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                rng = rng
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let pick = (rng >> 33) % 4;
                faults[pick as usize] += 1;
                match pick {
                    0 => proxy.cut(),
                    1 => proxy.set(Mode::BlackHole),
                    2 => proxy.set(Mode::Refuse),
                    _ => proxy.set(Mode::Pass),
                }
                std::thread::sleep(Duration::from_millis(150 + (rng >> 40) % 600));
                if pick != 0 {
                    proxy.set(Mode::Pass);
                }
            }
            faults
        })
    };

    let mut rng: u64 = 0x5eed_0f0a_7b06;
    let mut acked: BTreeMap<u64, QoS> = BTreeMap::new();
    let mut seq = 0u64;
    let started = Instant::now();
    for run in 0..KILLS {
        rng = rng
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let delay = Duration::from_millis(100 + (rng >> 33) % 500);
        let port = o.port;
        let publisher = tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            let topics = ("sensors/q1/x", "sensors/q2/x");
            let next = publish_until_killed(port, run, seq, topics, &mut acked).await;
            (acked, next)
        });
        tokio::time::sleep(delay).await;
        let dir = o.crash();
        let (got, next) = publisher.await.unwrap();
        acked.extend(got);
        seq = next;
        o = Outpost::restart(dir, &cfg);
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let faults = flapper.join().unwrap();
    proxy.set(Mode::Pass);
    let complete = cloud
        .wait(Duration::from_secs(90), |g| {
            let seen: std::collections::HashSet<u64> =
                g.iter().filter_map(|p| p.parse().ok()).collect();
            acked.keys().all(|s| seen.contains(s))
        })
        .await;
    // Let late duplicates show up before counting them.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = cloud.payloads();
    let t = tally(&acked, &got);
    let (lost, dup1, dup2) = (&t.lost, t.dup_q1, t.dup_q2);
    println!(
        "{KILLS} kills and {} link faults ({} cuts, {} black holes, {} refusals) in {:.1}s: \
         {} acknowledged locally ({} QoS 1, {} QoS 2), {} received by the cloud, {} lost, \
         {dup1} QoS 1 duplicates, {dup2} QoS 2 duplicates",
        faults[0] + faults[1] + faults[2],
        faults[0],
        faults[1],
        faults[2],
        started.elapsed().as_secs_f64(),
        acked.len(),
        t.acked_q1,
        t.acked_q2,
        got.len(),
        lost.len()
    );
    assert!(acked.len() > 200, "too few acknowledged to prove anything");
    assert!(
        complete && lost.is_empty(),
        "lost {} acknowledged messages: {:?}; log:\n{}",
        lost.len(),
        &lost[..lost.len().min(20)],
        o.log()
    );
    assert_eq!(dup2, 0, "QoS 2 arrives exactly once");
    // QoS 1 may repeat what was in flight at a crash or a cut: at most the window each time.
    let faults_total = KILLS + faults[0] + faults[1];
    assert!(dup1 <= faults_total * 32, "{dup1} QoS 1 duplicates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inbound_commands_arrive_once_across_crashes() {
    let m = Mosquitto::start();
    let rules = tempfile::tempdir().unwrap();
    let cfg = uplink(rules.path(), m.port, "5s", "");
    let mut o = Outpost::start(&cfg);
    // A local panel that is offline: commands wait for it in the store.
    register(o.port, "panel", "cmd/#").await;
    assert!(
        timeout(Duration::from_secs(10), async {
            while !state(o.port).await.contains("connected") {}
        })
        .await
        .is_ok(),
        "uplink never connected"
    );

    const N: usize = 300;
    let (cloud, mut ev) = client(m.port, "cloud-cmd", true);
    let sender = tokio::spawn(async move {
        for i in 0..N {
            cloud
                .publish(
                    "sites/test/cmd/pump",
                    QoS::ExactlyOnce,
                    false,
                    i.to_string(),
                )
                .await
                .unwrap();
        }
        cloud
    });
    let driver = tokio::spawn(async move {
        let mut comps = 0;
        while comps < N {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::PubComp(_))) => comps += 1,
                Ok(_) => {}
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    });
    // Kill outpost three times while commands stream down.
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let dir = o.crash();
        o = Outpost::restart(dir, &cfg);
    }
    let _cloud = sender.await.unwrap();
    timeout(Duration::from_secs(60), driver)
        .await
        .expect("mosquitto completed every QoS 2 command with outpost")
        .unwrap();
    let (present, got) = drain(o.port, "panel", Duration::from_secs(3)).await;
    assert!(present);
    let mut counts: BTreeMap<usize, usize> = BTreeMap::new();
    for p in &got {
        *counts.entry(p.parse().unwrap()).or_default() += 1;
    }
    let missing: Vec<usize> = (0..N).filter(|i| !counts.contains_key(i)).collect();
    let twice: Vec<usize> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(i, _)| *i)
        .collect();
    println!(
        "inbound: {N} QoS 2 commands across 3 kills: {} delivered locally, {} missing, {} twice",
        got.len(),
        missing.len(),
        twice.len()
    );
    assert!(missing.is_empty(), "missing {missing:?}; log:\n{}", o.log());
    assert!(twice.is_empty(), "delivered twice: {twice:?}");
    let in_order = got
        .windows(2)
        .all(|w| w[0].parse::<usize>().unwrap() < w[1].parse::<usize>().unwrap());
    assert!(in_order, "in order");
}

/// A test PKI made with the openssl command: a CA, a server certificate for "localhost", and
/// client certificates with an RSA PKCS#8 key, an RSA PKCS#1 key and an EC SEC1 key.
fn make_pki(dir: &Path) {
    let sh = |script: &str| {
        let (ok, out) = common::run(
            std::process::Command::new("sh")
                .arg("-ec")
                .arg(script)
                .current_dir(dir),
            Duration::from_secs(60),
        );
        assert!(ok, "openssl: {out}");
    };
    sh(
        "openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.crt -days 2 \
          -subj /CN=outpost-test-ca 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
          -subj /CN=localhost 2>/dev/null
        printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > san.ext
        printf 'extendedKeyUsage=clientAuth\n' > client.ext
        openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
          -out server.crt -days 2 -extfile san.ext 2>/dev/null
        openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out pkcs8.key 2>/dev/null
        openssl rsa -in pkcs8.key -traditional -out pkcs1.key 2>/dev/null
        openssl ecparam -name prime256v1 -genkey -noout -out sec1.key
        for k in pkcs8 pkcs1 sec1; do
          openssl req -new -key $k.key -out $k.csr -subj /CN=site-$k 2>/dev/null
          openssl x509 -req -in $k.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
            -out $k.crt -days 2 -extfile client.ext 2>/dev/null
        done
        grep -q 'BEGIN PRIVATE KEY' pkcs8.key
        grep -q 'BEGIN RSA PRIVATE KEY' pkcs1.key
        grep -q 'BEGIN EC PRIVATE KEY' sec1.key",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_with_pkcs8_pkcs1_and_sec1_keys() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    make_pki(d);
    let tls_port = free_port();
    let m = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncafile {0}/ca.crt\ncertfile {0}/server.crt\n\
         keyfile {0}/server.key\nrequire_certificate true\n",
        d.display()
    ));
    let cloud = Cloud::subscribe(m.port, "sites/#").await;
    for (i, key) in ["pkcs8", "pkcs1", "sec1"].iter().enumerate() {
        let rules = tempfile::tempdir().unwrap();
        let section = uplink(rules.path(), tls_port, "5s", "")
            .replace("mqtt://127.0.0.1", "mqtts://localhost")
            + &format!(
                "ca_file = \"{0}/ca.crt\"\ncert_file = \"{0}/{key}.crt\"\nkey_file = \"{0}/{key}.key\"\n",
                d.display()
            );
        let o = Outpost::start(&section);
        publish_acked(o.port, "sensors/q1/tls", i * 10, 10).await;
        let ok = cloud
            .wait(Duration::from_secs(20), |g| g.len() >= (i + 1) * 10)
            .await;
        assert!(
            ok,
            "{key}: only {} arrived; log:\n{}",
            cloud.count(),
            o.log()
        );
    }
    // Without a client certificate the broker refuses the handshake: outpost says why and
    // keeps trying, and nothing it acknowledged is lost.
    let rules = tempfile::tempdir().unwrap();
    let section = uplink(rules.path(), tls_port, "5s", "")
        .replace("mqtt://127.0.0.1", "mqtts://localhost")
        + &format!("ca_file = \"{}/ca.crt\"\n", d.display());
    let o = Outpost::start(&section);
    publish_acked(o.port, "sensors/q1/tls", 100, 5).await;
    let s = state(o.port).await;
    assert!(
        s.contains("\"state\":\"backoff\"") || s.contains("connecting"),
        "{s}"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(o.log().contains("uplink down"), "log:\n{}", o.log());
    assert_eq!(cloud.count(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_and_secure_websocket_transports() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    make_pki(d);
    let (ws_port, wss_port) = (free_port(), free_port());
    let m = Mosquitto::start_with(&format!(
        "listener {ws_port} 127.0.0.1\nprotocol websockets\n\
         listener {wss_port} 127.0.0.1\nprotocol websockets\ncafile {0}/ca.crt\n\
         certfile {0}/server.crt\nkeyfile {0}/server.key\n",
        d.display()
    ));
    let cloud = Cloud::subscribe(m.port, "sites/#").await;
    for (i, (scheme, port, tls)) in [("ws", ws_port, ""), ("wss", wss_port, "ca")]
        .into_iter()
        .enumerate()
    {
        let rules = tempfile::tempdir().unwrap();
        let mut section = uplink(rules.path(), port, "5s", "")
            .replace("mqtt://127.0.0.1", &format!("{scheme}://localhost"));
        if !tls.is_empty() {
            section += &format!("ca_file = \"{}/ca.crt\"\n", d.display());
        }
        let o = Outpost::start(&section);
        publish_acked(o.port, "sensors/q1/ws", i * 50, 50).await;
        let ok = cloud
            .wait(Duration::from_secs(20), |g| g.len() >= (i + 1) * 50)
            .await;
        assert!(
            ok,
            "{scheme}: only {} arrived; log:\n{}",
            cloud.count(),
            o.log()
        );
        // And down: a command through the same WebSocket.
        let (panel, mut pev) = client(o.port, &format!("panel-{scheme}"), true);
        panel.subscribe("cmd/#", QoS::AtLeastOnce).await.unwrap();
        wait_suback(&mut pev).await;
        let (c, ev) = client(m.port, &format!("cloud-cmd-{scheme}"), true);
        let drive = tokio::spawn(async move {
            let mut ev = ev;
            while ev.poll().await.is_ok() {}
        });
        c.publish("sites/test/cmd/valve", QoS::AtLeastOnce, false, scheme)
            .await
            .unwrap();
        let got = timeout(Duration::from_secs(10), async {
            loop {
                if let Ok(Event::Incoming(Packet::Publish(p))) = pev.poll().await {
                    return (
                        p.topic.clone(),
                        String::from_utf8_lossy(&p.payload).into_owned(),
                    );
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{scheme}: no command came down; log:\n{}", o.log()));
        assert_eq!(got, ("cmd/valve".to_owned(), scheme.to_owned()));
        drive.abort();
    }
    // The cloud subscriber also saw the two commands; the readings came in order.
    let got: Vec<String> = cloud
        .payloads()
        .into_iter()
        .filter(|p| p.parse::<u32>().is_ok())
        .collect();
    let want: Vec<String> = (0..100).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
}

/// Publishes `n` QoS 0 messages with payloads `first..first+n`.
async fn publish_qos0(port: u16, topic: &str, first: usize, n: usize) {
    let (c, ev) = client(port, &format!("qos0-pub-{first}"), true);
    let drive = tokio::spawn(async move {
        let mut ev = ev;
        while ev.poll().await.is_ok() {}
    });
    for i in first..first + n {
        c.publish(topic, QoS::AtMostOnce, false, i.to_string())
            .await
            .unwrap();
    }
    c.disconnect().await.unwrap();
    let _ = timeout(Duration::from_secs(5), drive).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos0_goes_live_when_online_and_is_dropped_offline_unless_buffered() {
    let m = Mosquitto::start();
    let proxy = Proxy::start(m.port);
    proxy.set(Mode::Refuse);
    let rules = tempfile::tempdir().unwrap();
    let o = Outpost::start(&uplink(rules.path(), proxy.port, "5s", ""));
    let cloud = Cloud::subscribe(m.port, "sites/test/#").await;
    publish_qos0(o.port, "live/x", 0, 20).await;
    publish_qos0(o.port, "buffered/x", 100, 20).await;
    // Let them reach the hub (QoS 0 has no ack to wait for).
    tokio::time::sleep(Duration::from_millis(500)).await;
    proxy.set(Mode::Pass);
    assert!(
        cloud.wait(Duration::from_secs(10), |g| g.len() >= 20).await,
        "buffered QoS 0 came through; log:\n{}",
        o.log()
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    let want: Vec<String> = (100..120).map(|i| i.to_string()).collect();
    assert_eq!(
        cloud.payloads(),
        want,
        "offline live QoS 0 dropped, buffered kept in order"
    );
    publish_qos0(o.port, "live/x", 200, 20).await;
    assert!(
        cloud.wait(Duration::from_secs(10), |g| g.len() >= 40).await,
        "live QoS 0 goes when online"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limit_paces_the_drain() {
    let m = Mosquitto::start();
    let proxy = Proxy::start(m.port);
    proxy.set(Mode::Refuse);
    let rules = tempfile::tempdir().unwrap();
    let limit = "rate_limit = { messages_per_s = 100 }\n";
    let o = Outpost::start(&uplink(rules.path(), proxy.port, "5s", limit));
    let cloud = Cloud::subscribe(m.port, "sites/test/#").await;
    publish_acked(o.port, "sensors/q1/r", 0, 300).await;
    let start = Instant::now();
    proxy.set(Mode::Pass);
    assert!(
        cloud
            .wait(Duration::from_secs(30), |g| g.len() >= 300)
            .await
    );
    let took = start.elapsed();
    println!("300 messages at 100 msg/s took {took:?}");
    // One second's worth may go at once, the other 200 at the rate: at least ~2 s. (A slow
    // machine only makes it longer, so this bound holds on a noisy one.)
    assert!(took >= Duration::from_millis(1_800), "{took:?}");
}
