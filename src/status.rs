//! The gateway's picture of itself: one JSON report built from the hub, the store and the
//! `Board` the adapters write their health to. `$SYS` topics and `outpost status` are two views
//! of the same report, so they can never disagree. Pure functions; the hub task gathers the
//! inputs and the control socket (`io::control`) serves the report.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use serde_json::{json, Map, Value};

/// Where adapters leave their health for the report: each writes its own entry (by name, such
/// as `serial/tank` or `uplink`) when something changes. Counters that change on every message
/// are atomics, so the hot paths never take the lock.
#[derive(Debug, Default)]
pub struct Board {
    entries: Mutex<BTreeMap<String, Value>>,
    /// Bytes read from and written to MQTT and MQTT-SN clients.
    pub bytes_received: AtomicU64,
    pub bytes_sent: AtomicU64,
    /// Outbox messages the cloud broker acknowledged.
    pub uplink_delivered: AtomicU64,
}

impl Board {
    /// Replaces the entry `name`.
    pub fn set(&self, name: &str, value: Value) {
        if let Ok(mut e) = self.entries.lock() {
            e.insert(name.to_owned(), value);
        }
    }

    /// Every entry whose name starts with `prefix`, by the rest of its name.
    pub fn under(&self, prefix: &str) -> Map<String, Value> {
        let Ok(e) = self.entries.lock() else {
            return Map::new();
        };
        e.range(prefix.to_owned()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k[prefix.len()..].to_owned(), v.clone()))
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<Value> {
        self.entries.lock().ok()?.get(name).cloned()
    }

    pub fn add_received(&self, n: usize) {
        self.bytes_received.fetch_add(n as u64, Ordering::Relaxed);
    }

    pub fn add_sent(&self, n: usize) {
        self.bytes_sent.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What the hub task knows at the moment of a report.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub version: &'static str,
    pub gateway_id: String,
    pub uptime_s: u64,
    pub now_ms: i64,
    pub clients_mqtt: usize,
    pub clients_mqttsn: usize,
    pub clients_local: usize,
    pub sessions: usize,
    pub retained: usize,
    pub hub: crate::hub::Stats,
    pub store: crate::store::Totals,
    pub outbox: crate::store::OutboxSummary,
    /// QoS 0 messages for the cloud dropped while it was offline or slow.
    pub uplink_live_dropped: u64,
    /// Outbox messages acknowledged per second, over the last report interval.
    pub drain_per_s: f64,
}

/// The whole report.
pub fn report(i: &Inputs, board: &Board) -> Value {
    let uplink = board
        .get("uplink")
        .unwrap_or_else(|| json!({"state": "none"}));
    let oldest_age_s = i
        .outbox
        .oldest_ms
        .map(|t| ((i.now_ms - t).max(0) / 1000) as u64);
    let eta_s = (i.outbox.messages > 0 && i.drain_per_s > 0.0)
        .then(|| (i.outbox.messages as f64 / i.drain_per_s).ceil() as u64);
    let sn = board.under("mqttsn/");
    let (mut awake, mut asleep) = (0u64, 0u64);
    for v in sn.values() {
        awake += v["awake"].as_u64().unwrap_or(0);
        asleep += v["asleep"].as_u64().unwrap_or(0);
    }
    json!({
        "version": i.version,
        "gateway_id": i.gateway_id,
        "uptime_s": i.uptime_s,
        "now_ms": i.now_ms,
        "uplink": uplink,
        "backlog": {
            "messages": i.outbox.messages,
            "bytes": i.outbox.bytes,
            "oldest_age_s": oldest_age_s,
            "drain_per_s": (i.drain_per_s * 10.0).round() / 10.0,
            "eta_s": eta_s,
            "delivered": board.uplink_delivered.load(Ordering::Relaxed),
        },
        "clients": {
            "mqtt": i.clients_mqtt,
            "mqttsn": i.clients_mqttsn,
            "mqttsn_awake": awake,
            "mqttsn_asleep": asleep,
            "local": i.clients_local,
            "sessions": i.sessions,
        },
        "messages": {
            "received": i.hub.received,
            "sent": i.hub.sent,
            "retained": i.retained,
            "bytes_received": board.bytes_received.load(Ordering::Relaxed),
            "bytes_sent": board.bytes_sent.load(Ordering::Relaxed),
        },
        "dropped": {
            "queue_full": i.hub.dropped_queue_full,
            "too_large": i.hub.dropped_too_large,
            "expired": i.hub.expired + i.store.expired,
            "store_full_evicted": i.store.evicted,
            "store_full_refused": i.hub.refused_full,
            "acl_denied": i.hub.denied,
            "uplink_qos0": i.uplink_live_dropped,
            "bad_topic": i.hub.bad_topics,
            "sessions_refused": i.hub.refused_sessions,
            "subscriptions_refused": i.hub.refused_subscriptions,
        },
        "store": {
            "messages": i.store.messages,
            "bytes": i.store.bytes,
            "commits": i.store.commits,
            "commit_ms_last": ms(i.store.commit_us_last),
            "commit_ms_avg": ms(i.store.commit_us_avg),
            "disk_full": i.store.disk_full,
            "outbox_messages": i.store.outbox_messages,
            "clock_steps": i.hub.clock_steps,
        },
        "serial": board.under("serial/"),
        "gpio": board.get("gpio").unwrap_or(Value::Null),
        "mqttsn": sn,
    })
}

fn ms(us: u64) -> f64 {
    (us as f64 / 100.0).round() / 10.0
}

/// The report as `$SYS` topics and payloads: mosquitto's common `$SYS/broker/...` ones as plain
/// numbers and strings, and outpost's own under `$SYS/outpost/...` as JSON, one per area.
pub fn sys_topics(r: &Value) -> Vec<(String, String)> {
    let n = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let mut out: Vec<(String, String)> = [
        ("version", format!("outpost version {}", n(&r["version"]))),
        ("uptime", format!("{} seconds", n(&r["uptime_s"]))),
        ("clients/connected", n(&r["clients"]["mqtt"])),
        ("clients/total", n(&r["clients"]["sessions"])),
        ("messages/received", n(&r["messages"]["received"])),
        ("messages/sent", n(&r["messages"]["sent"])),
        ("bytes/received", n(&r["messages"]["bytes_received"])),
        ("bytes/sent", n(&r["messages"]["bytes_sent"])),
        ("retained messages/count", n(&r["messages"]["retained"])),
        ("store/messages/count", n(&r["store"]["messages"])),
        ("store/messages/bytes", n(&r["store"]["bytes"])),
    ]
    .into_iter()
    .map(|(k, v)| (format!("$SYS/broker/{k}"), v))
    .collect();
    // The uplink publishes its own state topic the moment it changes.
    for area in ["backlog", "clients", "dropped", "store", "gpio", "mqttsn"] {
        let empty = r[area].as_object().is_some_and(|o| o.is_empty());
        if !r[area].is_null() && !empty {
            out.push((format!("$SYS/outpost/{area}"), r[area].to_string()));
        }
    }
    if let Some(ports) = r["serial"].as_object() {
        for (name, v) in ports {
            out.push((format!("$SYS/outpost/serial/{name}"), v.to_string()));
        }
    }
    out
}

/// The report for a person: what a technician needs at a glance.
pub fn human(r: &Value) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let s = |v: &Value| match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    let _ = writeln!(
        o,
        "outpost {} ({}), up {}",
        s(&r["version"]),
        s(&r["gateway_id"]),
        duration(r["uptime_s"].as_u64().unwrap_or(0))
    );
    let u = &r["uplink"];
    let since = u["since_ms"]
        .as_i64()
        .map(|t| {
            let now = r["now_ms"].as_i64().unwrap_or(t);
            format!(" for {}", duration(((now - t).max(0) / 1000) as u64))
        })
        .unwrap_or_default();
    let _ = write!(o, "uplink:   {}{since}", s(&u["state"]));
    if let Some(url) = u["url"].as_str() {
        let _ = write!(o, " ({url})");
    }
    let _ = writeln!(o);
    for key in ["reason", "last_error"] {
        if let Some(e) = u[key].as_str().filter(|e| !e.is_empty()) {
            let _ = writeln!(o, "          last error: {e}");
            break;
        }
    }
    let b = &r["backlog"];
    let _ = write!(
        o,
        "backlog:  {} messages, {}",
        s(&b["messages"]),
        bytes(b["bytes"].as_u64().unwrap_or(0))
    );
    if let Some(age) = b["oldest_age_s"].as_u64() {
        let _ = write!(o, ", oldest {}", duration(age));
    }
    match b["eta_s"].as_u64() {
        Some(eta) => {
            let _ = write!(
                o,
                "; draining {}/s, empty in ~{}",
                s(&b["drain_per_s"]),
                duration(eta)
            );
        }
        None if b["messages"].as_u64().unwrap_or(0) > 0 => {
            let _ = write!(o, "; not draining");
        }
        None => {}
    }
    let _ = writeln!(o);
    let c = &r["clients"];
    let _ = writeln!(
        o,
        "clients:  {} MQTT, {} MQTT-SN ({} awake, {} asleep), {} local ports; {} sessions",
        s(&c["mqtt"]),
        s(&c["mqttsn"]),
        s(&c["mqttsn_awake"]),
        s(&c["mqttsn_asleep"]),
        s(&c["local"]),
        s(&c["sessions"])
    );
    let st = &r["store"];
    let _ = writeln!(
        o,
        "store:    {} messages, {}; commit {} ms (avg {} ms){}",
        s(&st["messages"]),
        bytes(st["bytes"].as_u64().unwrap_or(0)),
        s(&st["commit_ms_last"]),
        s(&st["commit_ms_avg"]),
        if st["disk_full"].as_bool() == Some(true) {
            "; DISK FULL"
        } else {
            ""
        }
    );
    if let Some(d) = r["dropped"].as_object() {
        let nonzero: Vec<String> = d
            .iter()
            .filter(|(_, v)| v.as_u64().unwrap_or(0) > 0)
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        if !nonzero.is_empty() {
            let _ = writeln!(o, "dropped:  {}", nonzero.join(", "));
        }
    }
    if let Some(ports) = r["serial"].as_object() {
        for (name, p) in ports {
            let _ = writeln!(
                o,
                "serial:   {name} {} {}: {} readings, {} frames dropped, {} undecodable",
                s(&p["device"]),
                if p["open"].as_bool() == Some(true) {
                    "open"
                } else {
                    "CLOSED"
                },
                s(&p["readings"]),
                s(&p["frames_dropped"]),
                s(&p["undecodable"])
            );
        }
    }
    if let Some(g) = r["gpio"].as_object() {
        let _ = writeln!(
            o,
            "gpio:     {} inputs, {} outputs; {} reports dropped",
            s(&g["inputs"]),
            s(&g["outputs"]),
            s(&g["dropped"])
        );
    }
    o
}

fn duration(s: u64) -> String {
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m{:02}s", s / 60, s % 60),
        7200..=172_799 => format!("{}h{:02}m", s / 3600, s / 60 % 60),
        _ => format!("{}d{:02}h", s / 86_400, s / 3600 % 24),
    }
}

fn bytes(b: u64) -> String {
    match b {
        0..=9_999 => format!("{b} B"),
        10_000..=9_999_999 => format!("{:.1} kB", b as f64 / 1e3),
        _ => format!("{:.1} MB", b as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> (Inputs, Board) {
        let board = Board::default();
        board.set(
            "uplink",
            json!({"state": "backoff", "url": "mqtts://cloud:8883", "reason": "connection refused", "since_ms": 1_000}),
        );
        board.set(
            "serial/tank",
            json!({"device": "/dev/ttyUSB0", "open": true, "readings": 12, "frames_dropped": 1, "undecodable": 0}),
        );
        board.set("mqttsn/0", json!({"awake": 2, "asleep": 3}));
        board.uplink_delivered.store(40, Ordering::Relaxed);
        let mut i = Inputs {
            version: "0.1.0",
            gateway_id: "gw1".into(),
            uptime_s: 3_725,
            now_ms: 61_000,
            clients_mqtt: 4,
            clients_mqttsn: 5,
            clients_local: 2,
            ..Inputs::default()
        };
        i.outbox.messages = 1_200;
        i.outbox.bytes = 96_000;
        i.outbox.oldest_ms = Some(1_000);
        i.drain_per_s = 40.0;
        i.hub.denied = 3;
        i.hub.bad_topics = 2;
        (i, board)
    }

    #[test]
    fn report_sys_topics_and_human_text_agree() {
        let (i, board) = sample();
        let r = report(&i, &board);
        assert_eq!(r["backlog"]["oldest_age_s"], 60);
        assert_eq!(r["backlog"]["eta_s"], 30);
        assert_eq!(r["clients"]["mqttsn_asleep"], 3);
        assert_eq!(r["dropped"]["acl_denied"], 3);
        assert_eq!(r["dropped"]["bad_topic"], 2);
        let topics: BTreeMap<_, _> = sys_topics(&r).into_iter().collect();
        assert_eq!(topics["$SYS/broker/clients/connected"], "4");
        assert_eq!(topics["$SYS/broker/uptime"], "3725 seconds");
        let backlog: Value = serde_json::from_str(&topics["$SYS/outpost/backlog"]).unwrap();
        assert_eq!(backlog["messages"], 1_200);
        assert!(topics.contains_key("$SYS/outpost/serial/tank"));
        let text = human(&r);
        assert!(
            text.contains("uplink:   backoff for 60s (mqtts://cloud:8883)"),
            "{text}"
        );
        assert!(text.contains("last error: connection refused"), "{text}");
        assert!(
            text.contains("1200 messages, 96.0 kB, oldest 60s; draining 40.0/s, empty in ~30s"),
            "{text}"
        );
        assert!(text.contains("5 MQTT-SN (2 awake, 3 asleep)"), "{text}");
        assert!(text.contains("acl_denied 3"), "{text}");
        assert!(
            text.contains("tank /dev/ttyUSB0 open: 12 readings"),
            "{text}"
        );
    }

    #[test]
    fn a_backlog_that_does_not_drain_says_so() {
        let (mut i, board) = sample();
        i.drain_per_s = 0.0;
        let r = report(&i, &board);
        assert!(r["backlog"]["eta_s"].is_null());
        assert!(human(&r).contains("not draining"));
    }
}
