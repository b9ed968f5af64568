//! Sensor serial ports: one task per `[[serial]]` port. It opens the device, turns what it
//! reads into messages through `proto::frames`, and publishes them as the port's own hub
//! session (`$outpost/serial/<name>`); payloads on the port's `write_topic` are framed and
//! written to it.
//!
//! - Device loss: a read error or end of file (a USB adapter unplugged) closes the port, and
//!   it is reopened with backoff (1 s doubling to 30 s). The hub session stays up meanwhile,
//!   so nothing else notices.
//! - Backpressure: QoS 1/2 readings are published at most `WINDOW` unacknowledged, and the
//!   port is not read while the window is full or decoded readings wait. The hub
//!   acknowledges only after the commit, so a slow or full store slows the reader, and the
//!   kernel's buffer and the line's flow control hold the rest. A reading the hub refuses
//!   (store full under `block`) is offered again; none is dropped silently.
//! - Writes: a command that arrives while the device is absent is dropped with a warning and
//!   counted: replaying a pump command an hour late is worse than not at all.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

use super::hub_task::HubMsg;
use super::local::{HubLink, LocalError};
use super::sleep_until_opt;
use crate::config::{self, SerialPort};
use crate::hub::local::Event;
use crate::hub::ConnId;
use crate::proto::frames::decode::{Decoder, Reading, TopicTemplate};
use crate::proto::frames::{encode, Deframer, FrameError, Framing};
use crate::proto::mqtt::QoS;
use crate::status::Board;

/// QoS 1/2 readings published and not yet acknowledged (committed) by the hub.
pub const WINDOW: usize = 32;
/// How long a quiet line lets a half-received `len-crc16` frame wait before it is garbage.
const IDLE: Duration = Duration::from_millis(200);
/// The longest a write to the device may take (hardware flow control can hold it).
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Counters for one port, logged when the device goes away and at shutdown.
#[derive(Debug, Default, Clone, Copy)]
pub struct PortStats {
    pub opens: u64,
    pub readings: u64,
    pub undecodable: u64,
    pub writes: u64,
    pub writes_dropped: u64,
    /// Times the hub refused a reading (each is offered again).
    pub refused: u64,
}

/// Whether the board should hear again: at most once a second, and at once when the device
/// came or went since the last report.
fn report_due(
    last: Option<(tokio::time::Instant, bool)>,
    now: tokio::time::Instant,
    open: bool,
) -> bool {
    match last {
        None => true,
        Some((at, was_open)) => was_open != open || now >= at + Duration::from_secs(1),
    }
}

struct Port {
    cfg: SerialPort,
    framing: Framing,
    decoder: Decoder,
    template: TopicTemplate,
    qos: QoS,
    deframer: Deframer,
    /// Decoded readings waiting for the publish window. Bounded by one read: the port is not
    /// read again until it is empty.
    pending: VecDeque<(String, Bytes)>,
    stats: PortStats,
    scratch: Vec<Reading>,
}

/// Runs port `cfg` until `stop`.
pub async fn run(
    cfg: SerialPort,
    gateway_id: String,
    conn: ConnId,
    hub: mpsc::Sender<HubMsg>,
    board: Arc<Board>,
    mut stop: watch::Receiver<bool>,
) {
    let (Some(framing), Ok(template)) = (cfg.wire(), cfg.template(&gateway_id)) else {
        // Validated with the config; an mqtt-sn port never comes here.
        return;
    };
    let subs = cfg
        .write_topic
        .iter()
        .map(|t| (t.clone(), QoS::AtLeastOnce))
        .collect();
    let mut link =
        match HubLink::attach(hub, conn, &format!("serial/{}", cfg.name), subs, WINDOW).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(port = %cfg.name, error = %e, "serial port cannot join the hub");
                return;
            }
        };
    let mut p = Port {
        framing,
        decoder: cfg.decoder(),
        qos: QoS::from_bits(cfg.qos.min(2)).unwrap_or(QoS::AtLeastOnce),
        deframer: Deframer::new(framing, cfg.max_frame.0 as usize),
        template,
        pending: VecDeque::new(),
        stats: PortStats::default(),
        scratch: Vec::new(),
        cfg,
    };
    let mut backoff = BACKOFF_MIN;
    let mut device: Option<SerialStream> = None;
    let mut retry_at = Some(tokio::time::Instant::now());
    let mut idle_at: Option<tokio::time::Instant> = None;
    let mut buf = vec![0u8; 4096];
    // The board is told at most once a second, and at once when the device comes or goes.
    let mut reported: Option<(tokio::time::Instant, bool)> = None;
    let result: Result<(), LocalError> = async {
        loop {
            let now = tokio::time::Instant::now();
            if report_due(reported, now, device.is_some()) {
                p.report(&board, device.is_some());
                reported = Some((now, device.is_some()));
            }
            p.publish_pending(&mut link);
            link.flush().await?;
            let can_read = device.is_some() && p.pending.is_empty() && link.client.can_publish();
            tokio::select! {
                ev = link.next() => match ev? {
                    Event::Message(m) => {
                        p.write(device.as_mut(), &m.payload).await;
                        link.client.delivered(m.packet_id, m.qos);
                    }
                    Event::Refused(code) => {
                        p.stats.refused += 1;
                        // Once per stretch: it repeats every second while the store is full.
                        if p.stats.refused == 1 || p.stats.refused % 100 == 0 {
                            tracing::warn!(port = %p.cfg.name, reason = code, refused = p.stats.refused, "hub refused a reading (store full?); the port waits and offers it again");
                        }
                    }
                    _ => {}
                },
                r = read(device.as_mut(), &mut buf), if can_read => match r {
                    Ok(n) if n > 0 => {
                        p.feed(&buf[..n]);
                        idle_at = Some(tokio::time::Instant::now() + IDLE);
                        backoff = BACKOFF_MIN;
                    }
                    other => {
                        let why = match other {
                            Err(e) => e.to_string(),
                            Ok(_) => "end of file".to_owned(),
                        };
                        tracing::warn!(port = %p.cfg.name, device = %p.cfg.device.display(), reason = %why, stats = ?p.stats, "serial device lost; reopening");
                        device = None;
                        // A frame cut by the unplug must not glue onto the next device's bytes.
                        let counted = p.deframer.stats;
                        p.deframer = Deframer::new(p.framing, p.cfg.max_frame.0 as usize);
                        p.deframer.stats = counted;
                        retry_at = Some(tokio::time::Instant::now() + backoff);
                        // A device that opens and fails at once must not be hammered (nor the
                        // journal): data read resets this.
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                    }
                },
                _ = sleep_until_opt(idle_at) => {
                    idle_at = None;
                    p.idle();
                }
                _ = sleep_until_opt(retry_at), if device.is_none() => {
                    match open(&p.cfg) {
                        Ok(d) => {
                            p.stats.opens += 1;
                            tracing::info!(port = %p.cfg.name, device = %p.cfg.device.display(), baud = p.cfg.baud, "serial port open");
                            device = Some(d);
                            retry_at = None;
                        }
                        Err(e) => {
                            // Loud once, then quiet while it stays away.
                            if backoff == BACKOFF_MIN {
                                tracing::warn!(port = %p.cfg.name, device = %p.cfg.device.display(), error = %e, "cannot open serial port; retrying with backoff");
                            } else {
                                tracing::debug!(port = %p.cfg.name, error = %e, "serial port still absent");
                            }
                            retry_at = Some(tokio::time::Instant::now() + backoff);
                            backoff = (backoff * 2).min(BACKOFF_MAX);
                        }
                    }
                }
                _ = stop.changed() => return Ok(()),
            }
        }
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(port = %p.cfg.name, error = %e, "serial port stops");
        return;
    }
    // Readings already taken off the line still go in, if the hub takes them in time.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while !p.pending.is_empty() && tokio::time::Instant::now() < deadline {
        p.publish_pending(&mut link);
        if link.flush().await.is_err() {
            break;
        }
        if p.pending.is_empty() {
            break;
        }
        let _ = tokio::time::timeout_at(deadline, link.next()).await;
    }
    if !p.pending.is_empty() {
        tracing::warn!(port = %p.cfg.name, lost = p.pending.len(), "shutdown: readings not taken by the hub in time");
    }
    p.report(&board, false);
    tracing::info!(port = %p.cfg.name, stats = ?p.stats, "serial port closed");
    link.close().await;
}

async fn read(device: Option<&mut SerialStream>, buf: &mut [u8]) -> std::io::Result<usize> {
    match device {
        Some(d) => d.read(buf).await,
        None => std::future::pending().await,
    }
}

/// A noisy line must not flood the journal (an SD card): the first ten, then every 1000th.
fn worth_logging(count: u64) -> bool {
    count <= 10 || count % 1000 == 0
}

/// Opens the device with the port's line settings.
pub fn open(cfg: &SerialPort) -> std::io::Result<SerialStream> {
    use tokio_serial::{DataBits, FlowControl, Parity, StopBits};
    let data_bits = match cfg.data_bits {
        5 => DataBits::Five,
        6 => DataBits::Six,
        7 => DataBits::Seven,
        _ => DataBits::Eight,
    };
    let parity = match cfg.parity {
        config::Parity::None => Parity::None,
        config::Parity::Odd => Parity::Odd,
        config::Parity::Even => Parity::Even,
    };
    let stop_bits = if cfg.stop_bits == 2 {
        StopBits::Two
    } else {
        StopBits::One
    };
    let flow = match cfg.flow_control {
        config::FlowControl::None => FlowControl::None,
        config::FlowControl::Software => FlowControl::Software,
        config::FlowControl::Hardware => FlowControl::Hardware,
    };
    tokio_serial::new(cfg.device.to_string_lossy(), cfg.baud)
        .data_bits(data_bits)
        .parity(parity)
        .stop_bits(stop_bits)
        .flow_control(flow)
        .open_native_async()
        .map_err(std::io::Error::from)
}

impl Port {
    fn report(&self, board: &Board, open: bool) {
        board.set(
            &format!("serial/{}", self.cfg.name),
            serde_json::json!({
                "device": self.cfg.device.display().to_string(),
                "open": open,
                "opens": self.stats.opens,
                "readings": self.stats.readings,
                "frames": self.deframer.stats.frames,
                "frames_dropped": self.deframer.stats.dropped,
                "undecodable": self.stats.undecodable,
                "writes": self.stats.writes,
                "writes_dropped": self.stats.writes_dropped,
                "refused": self.stats.refused,
            }),
        );
    }

    fn feed(&mut self, bytes: &[u8]) {
        let mut got = Vec::new();
        self.deframer
            .feed(bytes, |f| got.push(f.map(<[u8]>::to_vec)));
        self.frames(got);
    }

    fn idle(&mut self) {
        let mut got = Vec::new();
        self.deframer.idle(|f| got.push(f.map(<[u8]>::to_vec)));
        self.frames(got);
    }

    fn frames(&mut self, got: Vec<Result<Vec<u8>, FrameError>>) {
        for f in got {
            match f {
                Ok(frame) => self.frame(&frame),
                Err(e) => {
                    if worth_logging(self.deframer.stats.dropped) {
                        tracing::info!(port = %self.cfg.name, error = %e, dropped = self.deframer.stats.dropped, "serial frame dropped");
                    }
                }
            }
        }
    }

    fn frame(&mut self, frame: &[u8]) {
        match self.decoder.decode(frame, &mut self.scratch) {
            Ok(()) => {
                for r in self.scratch.drain(..) {
                    let topic = self.template.render(r.key.as_deref());
                    self.pending.push_back((topic, r.payload));
                }
            }
            Err(e) => {
                self.stats.undecodable += 1;
                if !worth_logging(self.stats.undecodable) {
                    return;
                }
                let shown = String::from_utf8_lossy(&frame[..frame.len().min(80)]).into_owned();
                tracing::info!(undecodable = self.stats.undecodable, port = %self.cfg.name, error = %e, frame = %shown, "serial frame does not decode");
            }
        }
    }

    fn publish_pending(&mut self, link: &mut HubLink) {
        while let Some((topic, payload)) = self.pending.pop_front() {
            match link
                .client
                .publish(topic.clone(), payload, self.qos, self.cfg.retain)
            {
                Ok(()) => self.stats.readings += 1,
                Err(payload) => {
                    self.pending.push_front((topic, payload));
                    return;
                }
            }
        }
    }

    async fn write(&mut self, device: Option<&mut SerialStream>, payload: &[u8]) {
        let Some(d) = device else {
            self.stats.writes_dropped += 1;
            tracing::warn!(port = %self.cfg.name, "command dropped: serial device not present");
            return;
        };
        let mut out = Vec::with_capacity(payload.len() + 8);
        if let Err(e) = encode(
            self.framing,
            payload,
            self.cfg.line_ending.as_bytes(),
            &mut out,
        ) {
            self.stats.writes_dropped += 1;
            tracing::warn!(port = %self.cfg.name, error = %e, "command dropped: the framing cannot carry it");
            return;
        }
        match tokio::time::timeout(WRITE_TIMEOUT, d.write_all(&out)).await {
            Ok(Ok(())) => self.stats.writes += 1,
            Ok(Err(e)) => {
                self.stats.writes_dropped += 1;
                tracing::warn!(port = %self.cfg.name, error = %e, "serial write failed");
            }
            Err(_) => {
                self.stats.writes_dropped += 1;
                tracing::warn!(port = %self.cfg.name, "serial write timed out (flow control?)");
            }
        }
    }
}
