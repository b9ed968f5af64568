//! The task that owns the `Hub`: it feeds inputs from a bounded channel, fires the hub's timers,
//! implements `Outlet` over each connection's bounded link, publishes `$SYS` on its interval and
//! answers status reports.
//!
//! Buffers and their policy when full:
//! - the hub's input channel (`HUB_QUEUE`): senders wait, so a busy hub slows the readers that
//!   feed it and nothing is dropped;
//! - each connection's link (`LINK_QUEUE`): the hub never waits; a refused packet stays in the
//!   session's own bounded queue and the link flags `want_ready`, and the writer sends `Ready`
//!   once it has written a batch.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch, Notify};
use tokio::time::Instant;

use super::sleep_until_opt;
use crate::hub::{ConnId, Hub, HubInput, Outlet};
use crate::proto::mqtt::{Packet, Publish, QoS, Version};
use crate::status::{self, Board};
use crate::store::{OutboxSummary, Outcome, Store};
use crate::systemd;

/// How often the STATUS= line that `systemctl status` shows is refreshed.
const STATUS_EVERY: Duration = Duration::from_secs(10);

/// What `systemctl status outpost` shows while running.
fn status_line(hub: &Hub, uplink: &str) -> String {
    let s = hub.stats();
    format!(
        "{} clients, {} sessions, {} retained; {} msgs in, {} out, {} dropped (queue full), {} to the outbox; uplink {uplink}",
        hub.connected(),
        hub.sessions(),
        hub.retained(),
        s.received,
        s.sent,
        s.dropped_queue_full,
        s.outboxed
    )
}

/// The state word of an uplink state payload (`{"state":"backoff",...}`).
fn uplink_state(payload: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(payload).ok()?;
    let rest = text.split("\"state\":\"").nth(1)?;
    Some(rest.split('"').next()?.to_owned())
}

/// Inputs waiting for the hub.
pub const HUB_QUEUE: usize = 4096;
/// Packets waiting for one connection's writer.
pub const LINK_QUEUE: usize = 512;

/// What a connection's writer receives.
#[derive(Debug)]
pub enum LinkItem {
    /// Encode and write this packet.
    Packet(Packet),
    /// CONNECT told us the level and the client's topic alias maximum.
    Configure { version: Version, alias_max: u16 },
    /// Write what is queued, then close.
    Close,
}

/// Signals shared between the hub's side of a link and the connection's writer.
#[derive(Debug, Default)]
pub struct LinkState {
    /// The hub was refused a send and waits for `Ready`.
    pub want_ready: AtomicBool,
    /// The hub asked for the connection to end.
    pub close: Notify,
    /// The same, as a flag, for readers that poll rather than wait (the MQTT-SN gateway).
    pub closing: AtomicBool,
}

/// Many links read by one task (the MQTT-SN gateway's): which of them have news, and a
/// notification that some do. The set holds each connection once, so it is bounded by the
/// number of links.
#[derive(Debug, Default)]
pub struct Wake {
    dirty: std::sync::Mutex<std::collections::HashSet<ConnId>>,
    pub notify: Notify,
}

impl Wake {
    pub fn mark(&self, conn: ConnId) {
        if let Ok(mut d) = self.dirty.lock() {
            d.insert(conn);
        }
        self.notify.notify_one();
    }

    /// The connections marked since the last call.
    pub fn take(&self) -> Vec<ConnId> {
        match self.dirty.lock() {
            Ok(mut d) => d.drain().collect(),
            Err(_) => Vec::new(),
        }
    }
}

/// The hub's handle on one connection.
#[derive(Debug, Clone)]
pub struct Link {
    pub tx: mpsc::Sender<LinkItem>,
    pub state: Arc<LinkState>,
    /// Set when one task reads many links and must be told which one to look at.
    pub wake: Option<Arc<Wake>>,
}

impl Link {
    fn woken(&self, conn: ConnId) {
        if let Some(w) = &self.wake {
            w.mark(conn);
        }
    }
}

/// What the hub task receives.
#[derive(Debug)]
pub enum HubMsg {
    /// A connection that is about to send CONNECT; registers its link.
    Attach { conn: ConnId, link: Link },
    /// An input for the hub.
    Input(HubInput),
    /// Publish wills, close every connection, then answer.
    Shutdown(oneshot::Sender<()>),
    /// Build the status report around `outbox` (read by the sender, off the hub's thread) and
    /// publish it as `$SYS` or hand it back.
    Report { outbox: OutboxSummary, to: ReportTo },
    /// A reload: the new ACL (None: none) and uplink `[[out]]` rules (None: unchanged).
    Reconfigure {
        acl: Option<Arc<crate::auth::Acl>>,
        outs: Option<Vec<crate::bridge::rules::OutRule>>,
    },
}

/// Where a report goes.
#[derive(Debug)]
pub enum ReportTo {
    /// Published as `$SYS` topics.
    Sys,
    /// To `outpost status`.
    Status(oneshot::Sender<serde_json::Value>),
}

/// What the hub task reports from besides the hub: `$SYS` and `outpost status`.
pub struct Reporting {
    pub board: Arc<Board>,
    /// Only its in-memory totals are read here; the outbox query runs elsewhere.
    pub store: Option<Arc<Store>>,
    pub gateway_id: String,
    pub started: Instant,
    /// `[store] trust_clock_after`: the wall clock is believed this long after start even if
    /// the kernel never says it is synchronised.
    pub trust_clock_after: Duration,
}

impl Reporting {
    /// A minimal one, for tests that run the hub task alone.
    pub fn none() -> Self {
        Reporting {
            board: Arc::default(),
            store: None,
            gateway_id: String::new(),
            started: Instant::now(),
            trust_clock_after: Duration::ZERO,
        }
    }
}

/// Outbox drain rate between two reports.
#[derive(Default)]
struct Rate {
    last: Option<(Instant, u64)>,
    per_s: f64,
}

impl Rate {
    fn update(&mut self, now: Instant, delivered: u64) -> f64 {
        if let Some((t, d)) = self.last {
            let dt = now.duration_since(t).as_secs_f64();
            // Too close to the last sample to say anything new.
            if dt < 1.0 {
                return self.per_s;
            }
            self.per_s = delivered.saturating_sub(d) as f64 / dt;
        }
        self.last = Some((now, delivered));
        self.per_s
    }
}

/// The outbox's size, read on a blocking thread: a count over a large outbox takes a while, and
/// must never hold up the hub.
pub async fn read_outbox(store: Option<Arc<Store>>) -> OutboxSummary {
    let Some(store) = store else {
        return OutboxSummary::default();
    };
    match tokio::task::spawn_blocking(move || store.outbox_summary()).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "cannot read the outbox size");
            OutboxSummary::default()
        }
        Err(_) => OutboxSummary::default(),
    }
}

/// Asks for a `$SYS` publication every `every`, until `stop`.
pub async fn sys_ticker(
    every: Duration,
    store: Option<Arc<Store>>,
    hub: mpsc::Sender<HubMsg>,
    mut stop: watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.changed() => break,
        }
        let outbox = read_outbox(store.clone()).await;
        let to = ReportTo::Sys;
        if hub.send(HubMsg::Report { outbox, to }).await.is_err() {
            break;
        }
    }
}

fn build_report(
    hub: &Hub,
    rep: &Reporting,
    links: &Links,
    rate: &mut Rate,
    outbox: OutboxSummary,
) -> serde_json::Value {
    let (mqtt, sn, local) = hub.connected_by_kind();
    let now = Instant::now();
    let delivered = rep.board.uplink_delivered.load(Ordering::Relaxed);
    let store = rep.store.as_deref();
    let inputs = status::Inputs {
        version: env!("CARGO_PKG_VERSION"),
        gateway_id: rep.gateway_id.clone(),
        uptime_s: now.duration_since(rep.started).as_secs(),
        now_ms: super::clock::unix_ms(),
        clients_mqtt: mqtt,
        clients_mqttsn: sn,
        clients_local: local,
        sessions: hub.sessions(),
        retained: hub.retained(),
        hub: hub.stats().clone(),
        store: store.map(Store::totals).unwrap_or_default(),
        outbox,
        uplink_live_dropped: links
            .1
            .as_ref()
            .map_or(0, |u| u.live_dropped.load(Ordering::Relaxed)),
        drain_per_s: rate.update(now, delivered),
    };
    status::report(&inputs, &rep.board)
}

/// The hub's handles on the uplink driver.
///
/// - `live` carries QoS 0 messages to send now; when full they are dropped and counted, as
///   QoS 0 allows (the uplink is slower than the site, or offline).
/// - `acks` carries the commit outcome of each inbound message. It never fills: the driver
///   stops reading from the broker while `INBOUND_WINDOW` messages await their outcome, and
///   the channel holds that many.
#[derive(Debug, Clone)]
pub struct UplinkPorts {
    pub live: mpsc::Sender<Publish>,
    pub acks: mpsc::Sender<(u16, QoS, bool)>,
    pub live_dropped: Arc<std::sync::atomic::AtomicU64>,
}

struct Links(HashMap<ConnId, Link>, Option<UplinkPorts>);

impl Outlet for Links {
    fn try_send(&mut self, conn: ConnId, packet: Packet) -> Result<(), Packet> {
        let Some(link) = self.0.get(&conn) else {
            // Already gone: its Closed input is on the way and the session keeps its state.
            return Ok(());
        };
        let item = match link.tx.try_send(LinkItem::Packet(packet)) {
            Ok(()) => {
                link.woken(conn);
                return Ok(());
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
            Err(mpsc::error::TrySendError::Full(item)) => item,
        };
        link.state.want_ready.store(true, Ordering::SeqCst);
        // The writer may have drained the link between the refusal and the flag; if so there
        // is room now and no batch left to make it look at the flag, so try once more.
        if link.tx.capacity() > 0 {
            match link.tx.try_send(item) {
                Ok(()) => {
                    link.woken(conn);
                    return Ok(());
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Ok(()),
                Err(mpsc::error::TrySendError::Full(i)) => return Err(unwrap_packet(i)),
            }
        }
        Err(unwrap_packet(item))
    }

    fn close(&mut self, conn: ConnId, last: Option<Packet>) {
        if let Some(link) = self.0.get(&conn) {
            if let Some(p) = last {
                let _ = link.tx.try_send(LinkItem::Packet(p));
            }
            link.state.closing.store(true, Ordering::SeqCst);
            link.state.close.notify_one();
            link.woken(conn);
        }
    }

    fn uplink_live(&mut self, publish: Publish) {
        if let Some(u) = &self.1 {
            if u.live.try_send(publish).is_err() {
                u.live_dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn uplink_ack(&mut self, packet_id: u16, qos: QoS, stored: bool) {
        if let Some(u) = &self.1 {
            if u.acks.try_send((packet_id, qos, stored)).is_err() {
                // Cannot happen while the driver keeps its inbound window (see UplinkPorts);
                // if it did, the broker resends after the next reconnect.
                tracing::error!(packet_id, "uplink ack channel full; ack dropped");
            }
        }
    }
}

fn unwrap_packet(item: LinkItem) -> Packet {
    match item {
        LinkItem::Packet(p) => p,
        // Only packets are ever offered by try_send above.
        _ => Packet::PingResp,
    }
}

/// Runs the hub until a `Shutdown` message has been handled and every connection has gone (or
/// `grace` has passed).
pub async fn run(
    mut hub: Hub,
    mut rx: mpsc::Receiver<HubMsg>,
    mut commits: mpsc::Receiver<(u64, Outcome)>,
    grace: Duration,
    uplink: Option<UplinkPorts>,
    rep: Reporting,
) {
    let mut links = Links(HashMap::new(), uplink);
    let mut rate = Rate::default();
    let mut done: Option<(oneshot::Sender<()>, Instant)> = None;
    let mut status = tokio::time::interval(STATUS_EVERY);
    let mut uplink_now = if links.1.is_some() {
        "starting".to_owned()
    } else {
        "none (local-only)".to_owned()
    };
    loop {
        let wake = hub.poll_timeout().map(Instant::from_std);
        let msg = tokio::select! {
            // Completions first: they release acks, and taking them before new input is what
            // keeps the completion channel from ever filling.
            biased;
            Some((token, outcome)) = commits.recv() => {
                let input = HubInput::Committed { token, outcome };
                hub.handle(Instant::now().into_std(), input, &mut links);
                continue;
            }
            m = rx.recv() => m,
            _ = sleep_until_opt(wake) => {
                hub.handle_timeout(Instant::now().into_std(), &mut links);
                continue;
            }
            _ = sleep_until_opt(done.as_ref().map(|d| d.1)) => None,
            _ = status.tick(), if done.is_none() => {
                systemd::status(&status_line(&hub, &uplink_now));
                // The wall clock is read again on every tick: NTP may step it long after boot.
                let believed = rep.started.elapsed() >= rep.trust_clock_after
                    || super::clock::kernel_synced();
                let input = HubInput::WallClock { unix_ms: super::clock::unix_ms(), believed };
                hub.handle(Instant::now().into_std(), input, &mut links);
                continue;
            }
        };
        let Some(msg) = msg else { break };
        let now = Instant::now().into_std();
        match msg {
            HubMsg::Attach { conn, link } => {
                links.0.insert(conn, link);
            }
            HubMsg::Input(input) => {
                if let HubInput::System { topic, payload, .. } = &input {
                    if topic == super::uplink::STATE_TOPIC {
                        uplink_now = uplink_state(payload).unwrap_or_default();
                    }
                }
                let closed = match &input {
                    HubInput::Closed { conn, .. } => Some(*conn),
                    _ => None,
                };
                hub.handle(now, input, &mut links);
                if let Some(c) = closed {
                    links.0.remove(&c);
                }
            }
            HubMsg::Report { outbox, to } => {
                let report = build_report(&hub, &rep, &links, &mut rate, outbox);
                match to {
                    ReportTo::Status(reply) => {
                        let _ = reply.send(report);
                    }
                    ReportTo::Sys if done.is_none() => {
                        for (topic, payload) in status::sys_topics(&report) {
                            let payload = payload.into();
                            let input = HubInput::System {
                                topic,
                                payload,
                                retain: true,
                            };
                            hub.handle(now, input, &mut links);
                        }
                    }
                    ReportTo::Sys => {}
                }
            }
            HubMsg::Reconfigure { acl, outs } => {
                hub.set_acl(acl);
                if let Some(outs) = outs {
                    hub.set_uplink_rules(outs);
                }
            }
            HubMsg::Shutdown(reply) => {
                hub.shutdown(now, &mut links);
                done = Some((reply, Instant::now() + grace));
            }
        }
        if done.is_some() && links.0.is_empty() {
            break;
        }
    }
    if let Some((reply, _)) = done {
        let _ = reply.send(());
    }
}
