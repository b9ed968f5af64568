//! The uplink driver: the one task that owns the connection to the cloud broker. It connects
//! (with backoff, for ever), drives the sans-IO `ClientSession` with socket bytes and the clock,
//! drains the outbox into it, records acknowledgements in the store, carries inbound messages
//! into the hub, and publishes its state on `$SYS/outpost/uplink/state`.
//!
//! Durability, step by step:
//! - a row leaves the outbox only on PUBACK or PUBCOMP (`Op::Delete` after the ack);
//! - on PUBREC the row's state 2 is committed before PUBREL goes;
//! - an inbound QoS 1/2 message is acknowledged upstream only after the hub's commit of its
//!   local effects; an inbound PUBREL is answered once the stored id is gone.
//!
//! Buffers and their policy when full:
//! - rows read from the store (`outbox::WINDOW` per class): reading stops until they are sent;
//! - `live` (QoS 0 from the hub): dropped and counted, as QoS 0 allows; not taken while
//!   `WRITE_HIGH_WATER` bytes wait for the socket;
//! - `done` (store completions): holds every row in flight plus every inbound message awaiting
//!   its PUBREL, which is what can be outstanding, so the writer thread never waits on it;
//! - inbound messages awaiting their commit: at most `INBOUND_WINDOW`; past that the socket is
//!   not read, so the broker waits (TCP flow control) and nothing is dropped.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::hub_task::{HubMsg, UplinkPorts};
use super::ws;
use crate::bridge::outbox::Outbox;
use crate::bridge::pace::{Backoff, RateLimit};
use crate::bridge::rules::Rules;
use crate::config::{self, Scheme, Url};
use crate::hub::durable::outbox_dest;
use crate::hub::{HubInput, UPLINK_QOS2_ID};
use crate::proto::mqtt::client::{packet_id_for, ClientConfig, ClientEvent, ClientSession, Stage};
use crate::proto::mqtt::decode::stored_properties;
use crate::proto::mqtt::{Publish, QoS, Version};
use crate::store::{Op, Store, StoredMessage};

/// Inbound messages handed to the hub and not yet committed, at most.
pub const INBOUND_WINDOW: usize = 256;
/// QoS 0 messages waiting for the uplink.
pub const LIVE_QUEUE: usize = 1024;
/// Bytes waiting for the socket above which no more live QoS 0 is taken. Everything else that
/// writes is bounded already: publishes by the inflight window, acks by `INBOUND_WINDOW`.
pub const WRITE_HIGH_WATER: usize = 64 * 1024;
/// The retained topic that shows the uplink's state.
pub const STATE_TOPIC: &str = "$SYS/outpost/uplink/state";

/// Why the uplink cannot start.
#[derive(Debug, Error)]
pub enum UplinkError {
    /// The password file could not be read.
    #[error("password_file {path}: {error}")]
    Password {
        path: PathBuf,
        /// The error (shown in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// TLS settings are unusable.
    #[error("{0}")]
    Tls(String),
}

/// Everything the driver is built from.
pub struct UplinkSetup {
    pub cfg: config::Uplink,
    pub gateway_id: String,
    pub rules: Rules,
    pub max_packet_size: u32,
    pub store: Arc<Store>,
    pub hub: mpsc::Sender<HubMsg>,
    pub outbox_wake: Arc<Notify>,
    pub stop: watch::Receiver<bool>,
    /// Where the uplink's state and delivery count go for `$SYS` and `outpost status`.
    pub board: Arc<crate::status::Board>,
}

/// The driver's ends of the channels the hub task holds the other ends of.
pub struct UplinkChannels {
    live: mpsc::Receiver<Publish>,
    acks: mpsc::Receiver<(u16, QoS, bool)>,
    live_dropped: Arc<AtomicU64>,
}

/// Makes the channels between the hub task and the driver.
pub fn channels() -> (UplinkPorts, UplinkChannels) {
    let (live_tx, live) = mpsc::channel(LIVE_QUEUE);
    let (acks_tx, acks) = mpsc::channel(INBOUND_WINDOW);
    let live_dropped = Arc::new(AtomicU64::new(0));
    (
        UplinkPorts {
            live: live_tx,
            acks: acks_tx,
            live_dropped: live_dropped.clone(),
        },
        UplinkChannels {
            live,
            acks,
            live_dropped,
        },
    )
}

/// A store completion the driver waits for.
#[derive(Debug)]
enum Done {
    /// The PUBREC state of this row is on disk: PUBREL may go.
    Released(i64),
    /// This inbound QoS 2 id is forgotten on disk: PUBCOMP may go.
    Forgotten(u16),
}

trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The connection state, as published.
enum Phase<'a> {
    Connecting,
    Connected { session_present: bool },
    Backoff { reason: &'a str, retry_in: Duration },
    Stopped,
}

struct Driver {
    url: Url,
    /// WebSocket transports queue writes until flushed.
    flush_writes: bool,
    max_packet: u32,
    keepalive: Duration,
    rules: Rules,
    session: ClientSession,
    store: Arc<Store>,
    hub: mpsc::Sender<HubMsg>,
    outbox: Outbox,
    outbox_wake: Arc<Notify>,
    rate: RateLimit,
    rate_wake: Option<Instant>,
    backoff: Backoff,
    ch: UplinkChannels,
    done_tx: mpsc::Sender<Done>,
    done_rx: mpsc::Receiver<Done>,
    /// Inbound QoS 1/2 messages with the hub, awaiting their commit.
    inbound_pending: usize,
    /// Rows restored in flight at startup. The outbox cursor will read them again; once
    /// delivered, their delete may not have committed when it does, so they are skipped by id.
    /// Only these: any other row is read once per run, after its insert, and never again.
    restored: HashSet<i64>,
    /// Writes nobody waits for (deletes of acknowledged rows, "sent" marks), not yet submitted.
    ops: Vec<Op>,
    stop: watch::Receiver<bool>,
    tls: Option<super::tls::Connector>,
    stats: Stats,
    board: Arc<crate::status::Board>,
    /// The last reason the link went down, kept while it is up again.
    last_error: String,
}

#[derive(Debug, Default)]
struct Stats {
    sent: u64,
    delivered: u64,
    rejected: u64,
    inbound: u64,
    connects: u64,
}

/// Builds the driver: reads the password file, restores in-flight state from the store.
pub fn start(
    setup: UplinkSetup,
    ch: UplinkChannels,
) -> Result<impl std::future::Future<Output = ()>, UplinkError> {
    let c = &setup.cfg;
    let password = match &c.password_file {
        Some(p) => {
            let text = std::fs::read(p).map_err(|source| UplinkError::Password {
                path: p.clone(),
                error: source,
            })?;
            let end = text
                .iter()
                .rposition(|b| !matches!(b, b'\n' | b'\r'))
                .map_or(0, |i| i + 1);
            Some(Bytes::copy_from_slice(&text[..end]))
        }
        None => None,
    };
    let url = c.url();
    let tls = if url.scheme.tls() {
        Some(super::tls::Connector::new(c, &url).map_err(|e| UplinkError::Tls(e.to_string()))?)
    } else {
        None
    };
    let now = Instant::now();
    let cc = ClientConfig {
        client_id: c.client_id.replace("{gateway_id}", &setup.gateway_id),
        version: match c.protocol {
            config::Protocol::V5 => Version::V5,
            config::Protocol::V311 => Version::V311,
        },
        keep_alive: c.keepalive.0.as_secs().min(u16::MAX as u64) as u16,
        session_expiry: c.session_expiry.0.as_secs().min(u32::MAX as u64) as u32,
        username: c.username.clone(),
        password,
        max_inflight: c.max_inflight,
        max_packet_size: setup.max_packet_size,
        topic_alias_maximum: 16,
    };
    let mut session = ClientSession::new(cc, now.into_std());
    // What was in flight when we stopped: rows past PUBREC resume with PUBREL; the others are
    // read from the outbox again and resent with the same (derived) packet ids.
    let mut restored = HashSet::new();
    match setup.store.outbox_released() {
        Ok(rows) => {
            for r in rows {
                if let Some(p) = row_publish(&r) {
                    session.restore(r.id, packet_id_for(r.id), p, Stage::Released);
                    restored.insert(r.id);
                }
            }
        }
        Err(e) => tracing::error!(error = %e, "reading released outbox rows failed"),
    }
    match setup.store.inbound_qos2() {
        Ok(ids) => ids
            .into_iter()
            .filter(|(c, _)| c == UPLINK_QOS2_ID)
            .for_each(|(_, pid)| session.restore_inbound(pid)),
        Err(e) => tracing::error!(error = %e, "reading inbound QoS 2 state failed"),
    }
    let mut classes: Vec<_> = setup.store.outbox_classes().unwrap_or_else(|e| {
        // The rules' classes are still drained; rows of retired priorities wait for a restart.
        tracing::error!(error = %e, "listing outbox classes failed");
        Vec::new()
    });
    classes.extend(setup.rules.outs.iter().map(|r| outbox_dest(r.priority)));
    let seed = std::process::id() as u64 ^ now.elapsed().as_nanos() as u64 ^ unix_nanos();
    let (done_tx, done_rx) = mpsc::channel(2 * c.max_inflight as usize + INBOUND_WINDOW + 16);
    let d = Driver {
        keepalive: c.keepalive.0,
        rules: setup.rules,
        session,
        store: setup.store,
        hub: setup.hub,
        outbox: Outbox::new(classes),
        outbox_wake: setup.outbox_wake,
        rate: RateLimit::new(
            c.rate_limit.messages_per_s,
            c.rate_limit.bytes_per_s,
            now.into_std(),
        ),
        rate_wake: None,
        backoff: Backoff::new(c.backoff.min.0, c.backoff.max.0, seed),
        ch,
        done_tx,
        done_rx,
        inbound_pending: 0,
        restored,
        ops: Vec::new(),
        stop: setup.stop,
        tls,
        stats: Stats::default(),
        board: setup.board.clone(),
        last_error: String::new(),
        flush_writes: matches!(url.scheme, Scheme::Ws | Scheme::Wss),
        max_packet: setup.max_packet_size,
        url,
    };
    Ok(d.run())
}

fn unix_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// An outbox row as the PUBLISH that goes up; `None` for a row that no longer decodes (only a
/// damaged database holds one).
fn row_publish(r: &StoredMessage) -> Option<Publish> {
    let qos = QoS::from_bits(r.msg.qos)?;
    let mut properties = stored_properties(&r.msg.props).ok()?;
    if let Some(exp) = r.msg.expires_ms {
        let left_ms = exp - unix_ms_now();
        let left = (left_ms.max(1) as u64).div_ceil(1000);
        properties.message_expiry_interval = Some(left.min(u32::MAX as u64) as u32);
    }
    Some(Publish {
        dup: false,
        qos,
        retain: r.msg.retain,
        topic: r.msg.topic.clone(),
        packet_id: 0,
        payload: r.msg.payload.clone(),
        properties,
    })
}

fn unix_ms_now() -> i64 {
    (unix_nanos() / 1_000_000) as i64
}

impl Driver {
    async fn run(mut self) {
        let target = format!("{}:{}", self.url.host, self.url.port);
        loop {
            if *self.stop.borrow() {
                break;
            }
            self.publish_state(Phase::Connecting).await;
            let reason = match self.connect(&target).await {
                Ok(stream) => {
                    self.stats.connects += 1;
                    let since = Instant::now();
                    let r = self.serve(stream).await;
                    if since.elapsed() >= self.keepalive {
                        // It held for a while: this is a new outage, not the same one.
                        self.backoff.reset();
                    }
                    r
                }
                Err(e) => e,
            };
            self.session.connection_lost();
            if *self.stop.borrow() {
                break;
            }
            let retry_in = self.backoff.next_delay();
            tracing::warn!(uplink = %target, reason = %reason, retry_in = ?retry_in, "uplink down");
            self.publish_state(Phase::Backoff {
                reason: &reason,
                retry_in,
            })
            .await;
            let until = Instant::now() + retry_in;
            // While waiting: QoS 0 for the cloud is dropped (counted), acks of inbound
            // messages delivered before the drop are recorded, so their resends are known.
            loop {
                tokio::select! {
                    _ = tokio::time::sleep_until(until) => break,
                    _ = self.stop.changed() => break,
                    Some(_) = self.ch.live.recv() => {
                        self.ch.live_dropped.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(a) = self.ch.acks.recv() => self.on_ack(a),
                    Some(d) = self.done_rx.recv() => self.on_done(d),
                }
            }
        }
        self.publish_state(Phase::Stopped).await;
        tracing::info!(
            sent = self.stats.sent,
            delivered = self.stats.delivered,
            rejected = self.stats.rejected,
            inbound = self.stats.inbound,
            connects = self.stats.connects,
            live_dropped = self.ch.live_dropped.load(Ordering::Relaxed),
            "uplink stopped"
        );
    }

    async fn connect(&mut self, target: &str) -> Result<Box<dyn Stream>, String> {
        let limit = self
            .keepalive
            .clamp(Duration::from_secs(5), Duration::from_secs(30));
        let addr = (self.url.host.as_str(), self.url.port);
        let tcp = match tokio::time::timeout(limit, TcpStream::connect(addr)).await {
            Err(_) => return Err(format!("connect to {target}: timed out after {limit:?}")),
            Ok(Err(e)) => return Err(format!("connect to {target}: {e}")),
            Ok(Ok(s)) => s,
        };
        let _ = tcp.set_nodelay(true);
        tune_socket(&tcp, self.keepalive);
        let ws = matches!(self.url.scheme, Scheme::Ws | Scheme::Wss);
        let (host, port, path) = (self.url.host.clone(), self.url.port, self.url.path.clone());
        let max = self.max_packet as usize + 16;
        let handshake = async {
            match &self.tls {
                None if ws => Ok(
                    Box::new(ws::connect(tcp, false, &host, port, &path, max).await?)
                        as Box<dyn Stream>,
                ),
                None => Ok(Box::new(tcp) as Box<dyn Stream>),
                Some(c) => {
                    let tls = c.connect(tcp).await.map_err(|e| {
                        format!("TLS handshake with {target}: {}", super::tls::explain(&e))
                    })?;
                    if ws {
                        Ok(
                            Box::new(ws::connect(tls, true, &host, port, &path, max).await?)
                                as Box<dyn Stream>,
                        )
                    } else {
                        Ok(Box::new(tls) as Box<dyn Stream>)
                    }
                }
            }
        };
        match tokio::time::timeout(limit, handshake).await {
            Err(_) => Err(format!(
                "handshake with {target}: timed out after {limit:?}"
            )),
            Ok(r) => r,
        }
    }

    /// One connection, from CONNECT until it is lost; returns why.
    async fn serve(&mut self, stream: Box<dyn Stream>) -> String {
        let (mut rd, mut wr) = tokio::io::split(stream);
        self.session.connect(Instant::now().into_std());
        let mut wbuf: Vec<u8> = Vec::new();
        let mut unflushed = false;
        let mut rbuf = vec![0u8; 16 * 1024];
        // Timers live across iterations: a drain goes round this loop once per ack, and a new
        // timer each time was a measurable share of its cost. The keep-alive timer is only
        // moved earlier; firing early is harmless (handle_timeout checks what is due).
        let far = Instant::now() + Duration::from_secs(86_400 * 365);
        let ka_timer = tokio::time::sleep_until(far);
        let rate_timer = tokio::time::sleep_until(far);
        tokio::pin!(ka_timer, rate_timer);
        let mut ka_at = far;
        let wake_src = self.outbox_wake.clone();
        let notified = wake_src.notified();
        tokio::pin!(notified);
        loop {
            let lost = self.handle_events().await;
            self.flush_ops();
            if let Some(reason) = lost {
                // Whatever the session queued (a DISCONNECT with a reason) goes if it can.
                wbuf.extend(self.session.take_transmit());
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    wr.write_all(&wbuf).await?;
                    wr.flush().await
                })
                .await;
                return reason;
            }
            self.pump();
            self.flush_ops();
            wbuf.extend(self.session.take_transmit());
            let wake = self
                .session
                .poll_timeout()
                .map(Instant::from_std)
                .unwrap_or(far);
            if wake < ka_at {
                ka_at = wake;
                ka_timer.as_mut().reset(wake);
            }
            let rate_at = self.rate_wake.unwrap_or(far);
            if rate_at != rate_timer.deadline() {
                rate_timer.as_mut().reset(rate_at);
            }
            let reading = self.inbound_pending < INBOUND_WINDOW;
            tokio::select! {
                biased;
                Some(d) = self.done_rx.recv() => self.on_done(d),
                Some(a) = self.ch.acks.recv() => self.on_ack(a),
                r = write_or_flush(&mut wr, &wbuf, unflushed), if unflushed || !wbuf.is_empty() => match r {
                    Ok(None) => unflushed = false,
                    Ok(Some(0)) => return "connection closed while writing".into(),
                    Ok(Some(n)) => {
                        wbuf.drain(..n);
                        unflushed = self.flush_writes;
                    }
                    Err(e) => return format!("write: {e}"),
                },
                r = rd.read(&mut rbuf), if reading => match r {
                    Ok(0) => return "connection closed by the broker".into(),
                    Ok(n) => self.session.handle_bytes(Instant::now().into_std(), &rbuf[..n]),
                    Err(e) => return format!("read: {e}"),
                },
                _ = &mut ka_timer => {
                    self.session.handle_timeout(Instant::now().into_std());
                    ka_at = far;
                    ka_timer.as_mut().reset(far);
                }
                _ = &mut rate_timer => self.rate_wake = None,
                _ = &mut notified => {
                    self.outbox.wake(None);
                    notified.set(wake_src.notified());
                }
                // Live QoS 0 is taken only while the socket keeps up: when it does not (a slow
                // or black-holed link), it waits in `live`, which drops and counts when full.
                Some(p) = self.ch.live.recv(), if wbuf.len() < WRITE_HIGH_WATER => {
                    if self.session.publish(Instant::now().into_std(), 0, p).is_ok() {
                        self.stats.sent += 1;
                    }
                }
                _ = self.stop.changed() => {
                    // A normal DISCONNECT keeps the session (its expiry is not 0).
                    let dc = crate::proto::mqtt::Packet::Disconnect(Default::default());
                    let mut b = wbuf;
                    // An empty DISCONNECT always encodes.
                    let _ = crate::proto::mqtt::encode(&dc, self.session_version(), &mut b);
                    let _ = tokio::time::timeout(Duration::from_secs(1), async {
                        wr.write_all(&b).await?;
                        wr.shutdown().await
                    })
                    .await;
                    return "outpost is stopping".into();
                }
            }
        }
    }

    fn session_version(&self) -> Version {
        self.session.version()
    }

    /// Sends outbox rows while the window, the rate limit and the outbox allow.
    fn pump(&mut self) {
        let now = Instant::now();
        while self.session.can_send() && self.rate_wake.is_none() {
            let store = &self.store;
            let row = match self
                .outbox
                .next(|d, after, n| store.read_window(d, after, n))
            {
                Ok(Some(r)) => r,
                Ok(None) => break,
                Err(e) => {
                    tracing::error!(error = %e, "reading the outbox failed; retrying on the next commit");
                    break;
                }
            };
            if self.session.contains(row.id) || self.restored.contains(&row.id) {
                continue;
            }
            if row.msg.expires_ms.is_some_and(|e| e <= unix_ms_now()) {
                self.delete(row.id);
                continue;
            }
            let Some(p) = row_publish(&row) else {
                tracing::error!(row = row.id, "outbox row does not decode; dropping it");
                self.delete(row.id);
                continue;
            };
            let len = p.topic.len() + p.payload.len();
            if let Err(at) = self.rate.take(now.into_std(), len) {
                self.rate_wake = Some(Instant::from_std(at));
                self.outbox.unread(row);
                break;
            }
            let qos = p.qos;
            match self.session.publish(now.into_std(), row.id, p) {
                Ok(()) => {
                    self.stats.sent += 1;
                    match qos {
                        // A buffered QoS 0 row: written is as far as QoS 0 goes.
                        QoS::AtMostOnce => self.delete(row.id),
                        // The broker may now hold its packet id: the store must not evict
                        // or expire it until it is acknowledged (see store::writer PINNED).
                        QoS::ExactlyOnce => self.ops.push(Op::SetState {
                            id: row.id,
                            state: 1,
                            packet_id: Some(packet_id_for(row.id)),
                        }),
                        QoS::AtLeastOnce => {}
                    }
                }
                Err(_) => {
                    self.outbox.unread(row);
                    break;
                }
            }
        }
    }

    /// Queues the delete of an acknowledged row; `flush_ops` submits them together.
    fn delete(&mut self, id: i64) {
        self.ops.push(Op::Delete(id));
    }

    /// One store request for every write gathered since the last: a drain acknowledges up
    /// to a window of rows per read, and one request each was measurable overhead.
    fn flush_ops(&mut self) {
        if !self.ops.is_empty() {
            let ops = std::mem::take(&mut self.ops);
            self.submit(ops, None);
        }
    }

    fn submit(&self, ops: Vec<Op>, then: Option<Done>) {
        let done: crate::store::Completion = match then {
            None => Box::new(|o| {
                if let Err(e) = o {
                    tracing::error!(error = %e, "uplink store write failed");
                }
            }),
            Some(d) => {
                let tx = self.done_tx.clone();
                // On the writer thread: it may block, and the channel has room (see above).
                Box::new(move |o| match o {
                    Ok(_) => {
                        let _ = tx.blocking_send(d);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "uplink store write failed; ack withheld")
                    }
                })
            }
        };
        if let Err(e) = self.store.submit(ops, done) {
            tracing::error!(error = %e, "store is gone");
        }
    }

    fn on_done(&mut self, d: Done) {
        let now = Instant::now().into_std();
        match d {
            Done::Released(tag) => self.session.release(now, tag),
            Done::Forgotten(pid) => self.session.complete_inbound(now, pid),
        }
    }

    fn on_ack(&mut self, (pid, qos, stored): (u16, QoS, bool)) {
        self.inbound_pending = self.inbound_pending.saturating_sub(1);
        if stored {
            self.session
                .ack_inbound(Instant::now().into_std(), pid, qos);
        } else {
            // Not stored (store full or failing): no ack; the broker resends it after the
            // next reconnect.
            self.session.drop_inbound(pid);
            tracing::warn!(
                packet_id = pid,
                "inbound message not stored; not acknowledged"
            );
        }
    }

    /// Handles what the session reported; returns why the connection must end, if it must.
    async fn handle_events(&mut self) -> Option<String> {
        while let Some(e) = self.session.poll_event() {
            match e {
                ClientEvent::Connected { session_present } => {
                    tracing::info!(url = %self.url_text(), session_present, inflight = self.session.inflight(), "uplink connected");
                    self.publish_state(Phase::Connected { session_present })
                        .await;
                    let filters: Vec<(String, QoS)> = self
                        .rules
                        .ins
                        .iter()
                        .map(|r| (r.filter.clone(), r.qos))
                        .collect();
                    self.session.subscribe(Instant::now().into_std(), &filters);
                    self.outbox.wake(None);
                }
                ClientEvent::Refused { code } => {
                    return Some(format!("broker refused the connection: code 0x{code:02x}"))
                }
                ClientEvent::Delivered { tag, .. } => {
                    // A connection that delivers is a good one; one that is accepted and then
                    // dropped at once keeps backing off.
                    self.backoff.reset();
                    self.stats.delivered += 1;
                    self.board.uplink_delivered.fetch_add(1, Ordering::Relaxed);
                    self.delete(tag);
                }
                ClientEvent::Released { tag, packet_id } => {
                    let op = Op::SetState {
                        id: tag,
                        state: 2,
                        packet_id: Some(packet_id),
                    };
                    self.submit(vec![op], Some(Done::Released(tag)));
                }
                ClientEvent::Rejected { tag, reason } => {
                    self.stats.rejected += 1;
                    tracing::warn!(
                        row = tag,
                        reason = format!("0x{reason:02x}"),
                        "broker refused a message; dropping it"
                    );
                    self.delete(tag);
                }
                ClientEvent::Inbound(mut p) => {
                    self.stats.inbound += 1;
                    let Some((_, local)) = self.rules.inbound(&p.topic) else {
                        // Matches no rule (another subscription of this client id, say):
                        // acknowledged and not delivered.
                        tracing::debug!(topic = %p.topic, "inbound message matches no rule");
                        if p.qos != QoS::AtMostOnce {
                            self.session
                                .ack_inbound(Instant::now().into_std(), p.packet_id, p.qos);
                        }
                        continue;
                    };
                    p.topic = local;
                    if p.qos != QoS::AtMostOnce {
                        self.inbound_pending += 1;
                    }
                    if self
                        .hub
                        .send(HubMsg::Input(HubInput::Uplink(p)))
                        .await
                        .is_err()
                    {
                        return Some("outpost is stopping".into());
                    }
                }
                ClientEvent::InboundReleased { packet_id } => {
                    let op = Op::Qos2Delete {
                        client_id: UPLINK_QOS2_ID.into(),
                        packet_id,
                    };
                    self.submit(vec![op], Some(Done::Forgotten(packet_id)));
                }
                ClientEvent::Subscribed { codes } => {
                    for (rule, code) in self.rules.ins.iter().zip(codes) {
                        if code >= 0x80 {
                            tracing::error!(filter = %rule.filter, code = format!("0x{code:02x}"), "broker refused an inbound rule's subscription");
                        }
                    }
                }
                ClientEvent::Lost { reason } => return Some(reason),
            }
        }
        None
    }

    fn url_text(&self) -> String {
        format!(
            "{:?}://{}:{}",
            self.url.scheme, self.url.host, self.url.port
        )
        .to_lowercase()
    }

    async fn publish_state(&mut self, phase: Phase<'_>) {
        let (state, reason, extra) = match phase {
            Phase::Connecting => ("connecting", String::new(), String::new()),
            Phase::Connected { session_present } => (
                "connected",
                String::new(),
                format!(",\"session_present\":{session_present}"),
            ),
            Phase::Backoff { reason, retry_in } => (
                "backoff",
                reason.to_owned(),
                format!(",\"retry_in_ms\":{}", retry_in.as_millis()),
            ),
            Phase::Stopped => ("stopped", String::new(), String::new()),
        };
        if !reason.is_empty() {
            self.last_error = reason.clone();
        }
        let since = unix_ms_now();
        let payload = format!(
            "{{\"state\":\"{state}\",\"url\":\"{}\",\"reason\":\"{}\",\"since_ms\":{since}{extra}}}",
            json_escape(&self.url_text()),
            json_escape(&reason),
        );
        self.board.set(
            "uplink",
            serde_json::json!({
                "state": state,
                "url": self.url_text(),
                "reason": reason,
                "last_error": self.last_error,
                "since_ms": since,
                "connects": self.stats.connects,
                "sent": self.stats.sent,
            }),
        );
        let input = HubInput::System {
            topic: STATE_TOPIC.into(),
            payload: Bytes::from(payload),
            retain: true,
        };
        // The hub may be busy; the state is not worth holding the uplink up for.
        let _ = self.hub.try_send(HubMsg::Input(input));
    }
}

/// Flushes what an earlier write queued (a WebSocket sends a message only on flush), else
/// writes some of `buf`: `None` for a flush, `Some(n)` for a write. Both halves are cancel-safe,
/// which `select!` needs.
async fn write_or_flush<W: AsyncWrite + Unpin>(
    w: &mut W,
    buf: &[u8],
    unflushed: bool,
) -> std::io::Result<Option<usize>> {
    if unflushed {
        w.flush().await.map(|()| None)
    } else {
        w.write(buf).await.map(Some)
    }
}

fn json_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => o.push_str(&format!("\\u{:04x}", c as u32)),
            c => o.push(c),
        }
    }
    o
}

/// Dead-link detection below MQTT: TCP keepalive probes, and a user timeout so that data the
/// peer never acknowledges fails the socket (a black hole) within 1.5x the keep-alive.
fn tune_socket(tcp: &TcpStream, keepalive: Duration) {
    let sock = socket2::SockRef::from(tcp);
    let probe = (keepalive / 2).max(Duration::from_secs(1));
    let ka = socket2::TcpKeepalive::new()
        .with_time(probe)
        .with_interval(probe / 2)
        .with_retries(3);
    if let Err(e) = sock.set_tcp_keepalive(&ka) {
        tracing::debug!(error = %e, "TCP keepalive not set");
    }
    #[cfg(any(target_os = "linux", target_os = "android"))]
    if let Err(e) = sock.set_tcp_user_timeout(Some(keepalive + keepalive / 2)) {
        tracing::debug!(error = %e, "TCP user timeout not set");
    }
}
