//! GPIO inputs and outputs: one task for all pins, as one hub session (`$outpost/gpio`), over
//! a `hw::Backend`.
//!
//! - Each input has a thread that blocks on its line's edges and hands them, stamped, to the
//!   task through a bounded channel (`EDGE_QUEUE`; when full the thread waits and the kernel's
//!   edge buffer holds the rest). `hw::pins` debounces and counts; reports are published:
//!   level mode `{"level":1,"ts":<unix ms>}` on every debounced change (and the level at
//!   start), counter mode `{"count":N,"per_s":R,"total":T,"interval_s":S,"ts":...}` every
//!   interval.
//! - Outputs subscribe to their set topics; a command moves the line and publishes the level
//!   to `state_topic`, retained ("1" or "0"). An invalid payload is logged and changes nothing.
//! - Outputs are driven to `initial` when requested and again at shutdown.
//! - Reports wait in `pending` while the hub's window is full (a slow commit). It holds at
//!   most `MAX_PENDING`; past that the oldest is dropped and counted: a pin's edges cannot be
//!   slowed down.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::{mpsc, watch};

use super::hub_task::HubMsg;
use super::local::HubLink;
use super::sleep_until_opt;
use crate::config::{Gpio, GpioBackend, GpioInput, GpioOutput, InputMode, Level};
use crate::hub::local::Event;
use crate::hub::ConnId;
use crate::hw::pins::{Command, Input, Output, Report};
use crate::hw::{linux::Linux, sim::Sim, Backend, HwError, InputLine, InputSpec, OutputLine};
use crate::proto::mqtt::QoS;
use crate::proto::topic;

/// Edges waiting for the task.
pub const EDGE_QUEUE: usize = 1024;
/// Reports waiting for the hub's publish window.
pub const MAX_PENDING: usize = 10_000;
/// QoS 1/2 reports unacknowledged at once.
const WINDOW: usize = 64;
/// How often an input thread looks at the stop flag.
const POLL: Duration = Duration::from_millis(100);

/// The requested lines.
pub struct Pins {
    inputs: Vec<(GpioInput, Box<dyn InputLine>)>,
    outputs: Vec<(GpioOutput, Box<dyn OutputLine>)>,
}

/// Requests every configured line from the configured backend.
pub fn open(cfg: &Gpio) -> Result<Pins, HwError> {
    match cfg.backend {
        GpioBackend::Linux => open_with(&Linux, cfg),
        GpioBackend::Simulated => {
            let dir = cfg.sim_dir.clone().unwrap_or_default();
            open_with(&Sim::with_dir(&dir)?, cfg)
        }
    }
}

/// Requests every configured line from `backend`; outputs go to `initial` at once.
pub fn open_with(backend: &dyn Backend, cfg: &Gpio) -> Result<Pins, HwError> {
    let mut pins = Pins {
        inputs: Vec::new(),
        outputs: Vec::new(),
    };
    for i in &cfg.input {
        let spec = InputSpec {
            chip: i.chip.clone(),
            line: i.line,
            bias: i.bias,
        };
        pins.inputs.push((i.clone(), backend.input(&spec)?));
    }
    for o in &cfg.output {
        let line = backend.output(&o.chip, o.line, o.initial == Level::High)?;
        pins.outputs.push((o.clone(), line));
    }
    Ok(pins)
}

/// Unix milliseconds of `at`.
fn unix_ms(at: Instant) -> u128 {
    let ago = Instant::now().saturating_duration_since(at);
    std::time::SystemTime::now()
        .checked_sub(ago)
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or(0, |d| d.as_millis())
}

struct Out {
    cfg: GpioOutput,
    line: Box<dyn OutputLine>,
    logic: Output,
}

struct Task {
    inputs: Vec<(GpioInput, Input)>,
    outputs: Vec<Out>,
    pending: VecDeque<(String, Bytes, QoS, bool)>,
    dropped: u64,
}

/// Runs the pins until `stop`; then drives every output to its safe level.
pub async fn run(
    pins: Pins,
    conn: ConnId,
    hub: mpsc::Sender<HubMsg>,
    board: Arc<crate::status::Board>,
    mut stop: watch::Receiver<bool>,
) {
    let now = Instant::now();
    let (edge_tx, mut edges) = mpsc::channel::<(usize, bool, Instant)>(EDGE_QUEUE);
    let halt = Arc::new(AtomicBool::new(false));
    let mut t = Task {
        inputs: Vec::new(),
        outputs: Vec::new(),
        pending: VecDeque::new(),
        dropped: 0,
    };
    for (k, (cfg, mut line)) in pins.inputs.into_iter().enumerate() {
        let level = match line.level() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(chip = %cfg.chip, line = cfg.line, error = %e, "cannot read input level; assuming low");
                false
            }
        };
        let logic = Input::new(
            now,
            level,
            cfg.mode,
            cfg.edge,
            cfg.debounce.0,
            cfg.interval.0,
        );
        let (tx, halt, name) = (
            edge_tx.clone(),
            halt.clone(),
            format!("{}:{}", cfg.chip, cfg.line),
        );
        let spawned = std::thread::Builder::new()
            .name(format!("gpio-{}", cfg.line))
            .spawn(move || watch_line(k, line, tx, halt, name));
        if let Err(e) = spawned {
            tracing::error!(chip = %cfg.chip, line = cfg.line, error = %e, "cannot start input thread");
        }
        t.inputs.push((cfg, logic));
    }
    drop(edge_tx);
    for (cfg, line) in pins.outputs {
        let logic = Output::new(cfg.initial == Level::High);
        t.outputs.push(Out { cfg, line, logic });
    }
    let subs = t
        .outputs
        .iter()
        .map(|o| (o.cfg.topic.clone(), QoS::AtLeastOnce))
        .collect();
    let mut link = match HubLink::attach(hub, conn, "gpio", subs, WINDOW).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "GPIO cannot join the hub");
            halt.store(true, Ordering::SeqCst);
            return;
        }
    };
    for k in 0..t.outputs.len() {
        t.state(k);
    }
    let mut reported: Option<Instant> = None;
    loop {
        t.collect();
        t.publish(&mut link);
        if link.flush().await.is_err() {
            break;
        }
        let now = Instant::now();
        // At most once a second: edges can come by the thousand.
        if reported.map_or(true, |r| now >= r + Duration::from_secs(1)) {
            reported = Some(now);
            board.set(
                "gpio",
                serde_json::json!({
                    "inputs": t.inputs.len(),
                    "outputs": t.outputs.len(),
                    "dropped": t.dropped,
                    "pending": t.pending.len(),
                }),
            );
        }
        let deadline = t
            .inputs
            .iter()
            .filter_map(|(_, i)| i.poll_timeout())
            .chain(t.outputs.iter().filter_map(|o| o.logic.poll_timeout()))
            .min()
            .map(tokio::time::Instant::from_std);
        tokio::select! {
            Some((k, level, at)) = edges.recv(), if !t.inputs.is_empty() => {
                if let Some((_, i)) = t.inputs.get_mut(k) {
                    i.edge(at, level);
                }
            }
            ev = link.next() => match ev {
                Ok(Event::Message(m)) => {
                    t.command(&m.topic, &m.payload);
                    link.client.delivered(m.packet_id, m.qos);
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "GPIO lost its hub session");
                    break;
                }
            },
            _ = sleep_until_opt(deadline) => {
                let now = Instant::now();
                for (_, i) in &mut t.inputs {
                    i.handle_timeout(now);
                }
                for k in 0..t.outputs.len() {
                    let o = &mut t.outputs[k];
                    if let Some(level) = o.logic.handle_timeout(now) {
                        t.drive(k, level);
                    }
                }
            }
            _ = stop.changed() => break,
        }
    }
    halt.store(true, Ordering::SeqCst);
    // The safe state first, whatever happens to the messages after.
    for k in 0..t.outputs.len() {
        let initial = t.outputs[k].cfg.initial == Level::High;
        let o = &mut t.outputs[k];
        o.logic = Output::new(initial);
        t.drive(k, initial);
    }
    t.publish(&mut link);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while link.flush().await.is_ok() && link.client.unacked() > 0 {
        if tokio::time::timeout_at(deadline, link.next())
            .await
            .is_err()
        {
            break;
        }
    }
    if t.dropped > 0 {
        tracing::warn!(
            dropped = t.dropped,
            "GPIO reports dropped while the hub was full"
        );
    }
    tracing::info!("GPIO outputs at their safe levels");
    link.close().await;
}

/// An input's thread: blocks on edges, stamps them, hands them over.
fn watch_line(
    k: usize,
    mut line: Box<dyn InputLine>,
    tx: mpsc::Sender<(usize, bool, Instant)>,
    halt: Arc<AtomicBool>,
    name: String,
) {
    let mut failing = false;
    while !halt.load(Ordering::SeqCst) {
        match line.wait_edge(POLL) {
            Ok(Some(level)) => {
                failing = false;
                if tx.blocking_send((k, level, Instant::now())).is_err() {
                    return;
                }
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::warn!(line = %name, error = %e, "GPIO input failing");
                }
                failing = true;
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

impl Task {
    /// Turns the inputs' reports into messages.
    fn collect(&mut self) {
        let mut out = Vec::new();
        for (cfg, i) in &mut self.inputs {
            while let Some(r) = i.poll_report() {
                let payload = match r {
                    Report::Level { level, at } => {
                        format!("{{\"level\":{},\"ts\":{}}}", level as u8, unix_ms(at))
                    }
                    Report::Count {
                        count,
                        total,
                        per_second,
                        at,
                    } => format!(
                        "{{\"count\":{count},\"per_s\":{per_second:.4},\"total\":{total},\"interval_s\":{},\"ts\":{}}}",
                        cfg.interval.0.as_secs_f64(),
                        unix_ms(at)
                    ),
                };
                let retain = cfg.retain.unwrap_or(cfg.mode == InputMode::Level);
                out.push((
                    cfg.topic.clone(),
                    Bytes::from(payload),
                    QoS::from_bits(cfg.qos.min(2)).unwrap_or(QoS::AtLeastOnce),
                    retain,
                ));
            }
        }
        for (topic, payload, qos, retain) in out {
            self.push(topic, payload, qos, retain);
        }
    }

    fn push(&mut self, topic: String, payload: Bytes, qos: QoS, retain: bool) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
            self.dropped += 1;
        }
        self.pending.push_back((topic, payload, qos, retain));
    }

    fn publish(&mut self, link: &mut HubLink) {
        while let Some((topic, payload, qos, retain)) = self.pending.pop_front() {
            if let Err(payload) = link.client.publish(topic.clone(), payload, qos, retain) {
                self.pending.push_front((topic, payload, qos, retain));
                return;
            }
        }
    }

    /// A message on a set topic: every output subscribed to it obeys, or none if it is not a
    /// command.
    fn command(&mut self, on: &str, payload: &[u8]) {
        let cmd = match Command::parse(payload) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(topic = %on, error = %e, "GPIO command rejected; output unchanged");
                return;
            }
        };
        let now = Instant::now();
        for k in 0..self.outputs.len() {
            if topic::matches(&self.outputs[k].cfg.topic, on) {
                let level = self.outputs[k].logic.apply(now, cmd);
                self.drive(k, level);
            }
        }
    }

    /// Sets output `k`'s line and reports it.
    fn drive(&mut self, k: usize, level: bool) {
        let o = &mut self.outputs[k];
        if let Err(e) = o.line.set(level) {
            tracing::error!(chip = %o.cfg.chip, line = o.cfg.line, error = %e, "cannot set GPIO output");
            return;
        }
        tracing::info!(chip = %o.cfg.chip, line = o.cfg.line, level = level as u8, "GPIO output set");
        self.state(k);
    }

    fn state(&mut self, k: usize) {
        let o = &self.outputs[k];
        if let Some(st) = o.cfg.state_topic.clone() {
            let payload = Bytes::from_static(if o.logic.level() { b"1" } else { b"0" });
            self.push(st, payload, QoS::AtLeastOnce, true);
        }
    }
}

#[cfg(test)]
#[path = "gpio_tests.rs"]
mod tests;
