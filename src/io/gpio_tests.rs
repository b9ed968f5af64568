//! io::gpio on the simulated backend, against the real hub task: a watcher session sees what
//! a local MQTT subscriber would.

use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio::time::timeout;

use super::*;
use crate::config::Config;
use crate::hub::local::{LocalClient, LOCAL_CONN_BASE};
use crate::hub::{Hub, HubConfig};
use crate::io::hub_task::{self, HUB_QUEUE};
use crate::proto::mqtt::Publish;

struct Rig {
    hub: mpsc::Sender<HubMsg>,
    sim: Sim,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
    _commits: mpsc::Sender<(u64, crate::store::Outcome)>,
}

fn gpio(toml: &str) -> Gpio {
    Config::parse(std::path::Path::new("t.toml"), toml)
        .unwrap()
        .gpio
}

async fn rig(toml: &str) -> Rig {
    let (hub_tx, hub_rx) = mpsc::channel(HUB_QUEUE);
    let (commits_tx, commits_rx) = mpsc::channel(16);
    let hub = Hub::new(HubConfig::default());
    tokio::spawn(hub_task::run(
        hub,
        hub_rx,
        commits_rx,
        Duration::from_secs(1),
        None,
        hub_task::Reporting::none(),
    ));
    let sim = Sim::new();
    let pins = open_with(&sim, &gpio(toml)).unwrap();
    let (stop, stop_rx) = watch::channel(false);
    let task = tokio::spawn(run(
        pins,
        LOCAL_CONN_BASE,
        hub_tx.clone(),
        Arc::default(),
        stop_rx,
    ));
    Rig {
        hub: hub_tx,
        sim,
        stop,
        task,
        _commits: commits_tx,
    }
}

async fn watcher(r: &Rig, n: u64, filter: &str) -> HubLink {
    let c = LocalClient::new(
        LOCAL_CONN_BASE + 100 + n,
        &format!("test/{n}"),
        vec![(filter.into(), QoS::AtLeastOnce)],
        16,
        64,
    )
    .replay_retained();
    HubLink::attach_client(r.hub.clone(), c).await.unwrap()
}

/// The next message, or None after `wait`.
async fn next_msg(w: &mut HubLink, wait: Duration) -> Option<Publish> {
    loop {
        w.flush().await.unwrap();
        match timeout(wait, w.next()).await {
            Err(_) => return None,
            Ok(Ok(Event::Message(m))) => {
                w.client.delivered(m.packet_id, m.qos);
                w.flush().await.unwrap();
                return Some(m);
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("{e}"),
        }
    }
}

fn field(payload: &[u8], name: &str) -> f64 {
    let v: serde_json::Value = serde_json::from_slice(payload).unwrap();
    v[name].as_f64().unwrap_or_else(|| panic!("{name} in {v}"))
}

/// Publishes `payload` on the pump's set topic.
async fn command(cmd: &mut HubLink, payload: &'static str) {
    let p = Bytes::from_static(payload.as_bytes());
    cmd.client
        .publish("io/pump/set".into(), p, QoS::AtLeastOnce, false)
        .unwrap();
    cmd.flush().await.unwrap();
}

const SEC: Duration = Duration::from_secs(1);

#[tokio::test]
async fn debounced_level_changes_are_published_with_a_timestamp() {
    let r = rig(r#"
[gpio]
[[gpio.input]]
chip = "sim0"
line = 17
bias = "pull-up"
debounce = "40ms"
topic = "io/door"
"#)
    .await;
    // Subscribing after the start: the retained level is there.
    let mut w = watcher(&r, 1, "io/door").await;
    let m = next_msg(&mut w, 2 * SEC).await.expect("start level");
    assert!(m.retain);
    assert_eq!(field(&m.payload, "level"), 1.0);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as f64;
    assert!((now_ms - field(&m.payload, "ts")).abs() < 10_000.0);
    // A bouncing contact that ends open: one change.
    for level in [false, true, false, true, false] {
        r.sim.set_input("sim0", 17, level);
    }
    let m = next_msg(&mut w, 2 * SEC).await.expect("the change");
    assert_eq!(field(&m.payload, "level"), 0.0);
    assert!(
        next_msg(&mut w, Duration::from_millis(300)).await.is_none(),
        "one change only"
    );
    // A 5 ms glitch: nothing.
    r.sim.set_input("sim0", 17, true);
    tokio::time::sleep(Duration::from_millis(5)).await;
    r.sim.set_input("sim0", 17, false);
    assert!(
        next_msg(&mut w, Duration::from_millis(300)).await.is_none(),
        "glitch filtered"
    );
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test]
async fn counter_counts_a_burst_exactly() {
    let r = rig(r#"
[gpio]
[[gpio.input]]
chip = "sim0"
line = 5
edge = "rising"
debounce = "0ms"
mode = "counter"
interval = "1s"
topic = "io/rain"
"#)
    .await;
    let mut w = watcher(&r, 1, "io/rain").await;
    let sim = r.sim.clone();
    // 20,000 edges as fast as the simulator takes them (it blocks rather than lose one).
    let burst = std::thread::spawn(move || {
        for _ in 0..10_000 {
            sim.set_input("sim0", 5, true);
            sim.set_input("sim0", 5, false);
        }
    });
    let mut sum = 0.0;
    let mut total = 0.0;
    while total < 10_000.0 {
        let m = next_msg(&mut w, 5 * SEC).await.expect("a count report");
        assert!(!m.retain);
        sum += field(&m.payload, "count");
        total = field(&m.payload, "total");
        assert_eq!(field(&m.payload, "interval_s"), 1.0);
        assert!(total <= 10_000.0);
    }
    burst.join().unwrap();
    assert_eq!(sum, 10_000.0);
    assert_eq!(total, 10_000.0);
    r.stop.send(true).unwrap();
    r.task.await.unwrap();
}

#[tokio::test]
async fn outputs_obey_commands_report_retained_state_and_go_safe_at_shutdown() {
    let r = rig(r#"
[gpio]
[[gpio.output]]
chip = "sim0"
line = 27
topic = "io/pump/set"
state_topic = "io/pump"
initial = "low"
"#)
    .await;
    let mut w = watcher(&r, 1, "io/pump").await;
    let m = next_msg(&mut w, 2 * SEC).await.expect("initial state");
    assert_eq!((&m.payload[..], m.retain), (&b"0"[..], true));
    assert_eq!(r.sim.output_level("sim0", 27), Some(false));

    let mut cmd = watcher(&r, 2, "unused/#").await;
    command(&mut cmd, "on").await;
    let m = next_msg(&mut w, 2 * SEC).await.expect("state after on");
    assert_eq!(&m.payload[..], b"1");
    assert_eq!(r.sim.output_level("sim0", 27), Some(true));

    // Garbage changes nothing and reports nothing.
    command(&mut cmd, "maybe").await;
    command(&mut cmd, "pulse:forever").await;
    assert!(next_msg(&mut w, Duration::from_millis(300)).await.is_none());
    assert_eq!(r.sim.output_level("sim0", 27), Some(true));

    // A later subscriber sees the retained state.
    let mut late = watcher(&r, 3, "io/pump").await;
    let m = next_msg(&mut late, 2 * SEC).await.expect("retained state");
    assert_eq!((&m.payload[..], m.retain), (&b"1"[..], true));

    // A pulse goes low for a while and comes back.
    command(&mut cmd, "pulse:100ms").await;
    let m = next_msg(&mut w, 2 * SEC).await.unwrap();
    assert_eq!(&m.payload[..], b"0");
    let m = next_msg(&mut w, 2 * SEC).await.unwrap();
    assert_eq!(&m.payload[..], b"1");

    r.stop.send(true).unwrap();
    r.task.await.unwrap();
    assert_eq!(
        r.sim.output_level("sim0", 27),
        Some(false),
        "safe level at shutdown"
    );
    assert_eq!(
        r.sim.output_history("sim0", 27),
        vec![false, true, false, true, false]
    );
}
