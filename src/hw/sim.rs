//! The simulated GPIO backend. Tests script it in process (`set_input`, `output_level`,
//! `output_history`); with a directory (`[gpio] backend = "simulated"`, `sim_dir`), a test
//! outside the process drives the real binary through two plain files:
//! - `<sim_dir>/input`: append lines `<chip> <line> <0|1>` to set input levels;
//! - `<sim_dir>/<chip>.<line>`: each output's level, `0` or `1`, rewritten on every change
//!   (atomically, by rename). A `/` in a chip name becomes `_`.
//!
//! Any chip name and line exist. An input starts at its bias (pull-up reads 1), or at what a
//! test set before it was requested. No edge is ever lost: a burst waits for the reader.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{Backend, HwError, InputLine, InputSpec, OutputLine};
use crate::config::Bias;

type Key = (String, u32);

#[derive(Default)]
struct Line {
    level: bool,
    /// A test set the level before the line was requested.
    preset: bool,
    requested: bool,
    history: Vec<bool>,
    edges: Option<SyncSender<bool>>,
}

#[derive(Default)]
struct Shared {
    lines: Mutex<HashMap<Key, Line>>,
    dir: Option<PathBuf>,
}

/// The simulator; clones share the same lines.
#[derive(Clone, Default)]
pub struct Sim(Arc<Shared>);

impl Sim {
    pub fn new() -> Self {
        Sim::default()
    }

    /// A simulator mirrored in `dir` (see the module doc), whose `input` file is read every
    /// few milliseconds by a thread that ends with the simulator.
    pub fn with_dir(dir: &Path) -> Result<Self, HwError> {
        let err = |e: std::io::Error| HwError::Sim(format!("{}: {e}", dir.display()));
        std::fs::create_dir_all(dir).map_err(err)?;
        let input = dir.join("input");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .read(true)
            .open(&input)
            .map_err(err)?;
        // Lines written before we started are history, not input.
        let start = f.seek(SeekFrom::End(0)).map_err(err)?;
        let sim = Sim(Arc::new(Shared {
            lines: Mutex::default(),
            dir: Some(dir.to_owned()),
        }));
        let weak = Arc::downgrade(&sim.0);
        std::thread::Builder::new()
            .name("gpio-sim".into())
            .spawn(move || tail(f, start, weak))
            .map_err(err)?;
        Ok(sim)
    }

    /// Sets an input's level; an edge if it changed.
    pub fn set_input(&self, chip: &str, line: u32, level: bool) {
        let tx = {
            let Ok(mut lines) = self.0.lines.lock() else {
                return;
            };
            let l = lines.entry((chip.to_owned(), line)).or_default();
            if l.level == level && l.requested {
                return;
            }
            l.level = level;
            l.preset = true;
            l.edges.clone()
        };
        if let Some(tx) = tx {
            // Blocks while the reader is behind: the simulator loses no edge.
            let _ = tx.send(level);
        }
    }

    /// An output's level, if it has been requested.
    pub fn output_level(&self, chip: &str, line: u32) -> Option<bool> {
        let lines = self.0.lines.lock().ok()?;
        lines
            .get(&(chip.to_owned(), line))
            .filter(|l| l.requested && l.edges.is_none())
            .map(|l| l.level)
    }

    /// Every level an output has been set to, the initial one first.
    pub fn output_history(&self, chip: &str, line: u32) -> Vec<bool> {
        self.0
            .lines
            .lock()
            .ok()
            .and_then(|l| l.get(&(chip.to_owned(), line)).map(|l| l.history.clone()))
            .unwrap_or_default()
    }

    fn record(&self, key: &Key, level: bool) -> Result<(), HwError> {
        if let Ok(mut lines) = self.0.lines.lock() {
            let l = lines.entry(key.clone()).or_default();
            l.level = level;
            l.history.push(level);
        }
        if let Some(dir) = &self.0.dir {
            let name = format!("{}.{}", key.0.replace('/', "_"), key.1);
            let tmp = dir.join(format!(".{name}.tmp"));
            std::fs::write(&tmp, if level { "1\n" } else { "0\n" })
                .and_then(|_| std::fs::rename(&tmp, dir.join(&name)))
                .map_err(|e| HwError::Sim(format!("{name}: {e}")))?;
        }
        Ok(())
    }
}

/// Follows the `input` file, applying each complete line.
fn tail(mut f: std::fs::File, mut at: u64, sim: Weak<Shared>) {
    let mut partial = String::new();
    loop {
        std::thread::sleep(Duration::from_millis(5));
        let Some(shared) = sim.upgrade() else { return };
        let sim = Sim(shared);
        let mut buf = String::new();
        if f.seek(SeekFrom::Start(at)).is_err() || f.read_to_string(&mut buf).is_err() {
            continue;
        }
        at += buf.len() as u64;
        partial.push_str(&buf);
        while let Some(nl) = partial.find('\n') {
            let line: String = partial.drain(..=nl).collect();
            let parts: Vec<&str> = line.split_whitespace().collect();
            match parts.as_slice() {
                [chip, n, v] => match (n.parse::<u32>(), *v) {
                    (Ok(n), "0") => sim.set_input(chip, n, false),
                    (Ok(n), "1") => sim.set_input(chip, n, true),
                    _ => {
                        tracing::warn!(line = %line.trim(), "gpio-sim: expected `<chip> <line> <0|1>`")
                    }
                },
                [] => {}
                _ => {
                    tracing::warn!(line = %line.trim(), "gpio-sim: expected `<chip> <line> <0|1>`")
                }
            }
        }
    }
}

struct SimIn {
    sim: Sim,
    key: Key,
    rx: Receiver<bool>,
}

struct SimOut {
    sim: Sim,
    key: Key,
}

impl Backend for Sim {
    fn input(&self, spec: &InputSpec) -> Result<Box<dyn InputLine>, HwError> {
        let key = (spec.chip.clone(), spec.line);
        let (tx, rx) = sync_channel(1024);
        self.claim(&key, |l| {
            if !l.preset {
                // Nothing set it yet: the bias decides.
                l.level = spec.bias == Bias::PullUp;
            }
            l.edges = Some(tx);
        })?;
        Ok(Box::new(SimIn {
            sim: self.clone(),
            key,
            rx,
        }))
    }

    fn output(&self, chip: &str, line: u32, initial: bool) -> Result<Box<dyn OutputLine>, HwError> {
        let key = (chip.to_owned(), line);
        self.claim(&key, |_| ())?;
        self.record(&key, initial)?;
        Ok(Box::new(SimOut {
            sim: self.clone(),
            key,
        }))
    }
}

impl Sim {
    /// Marks a line requested (a second request is "busy", as the kernel says) and sets it up.
    fn claim(&self, key: &Key, setup: impl FnOnce(&mut Line)) -> Result<(), HwError> {
        let mut lines = self
            .0
            .lines
            .lock()
            .map_err(|_| HwError::Sim("poisoned".into()))?;
        let l = lines.entry(key.clone()).or_default();
        if l.requested {
            return Err(HwError::Line {
                chip: key.0.clone(),
                line: key.1,
                detail: "busy".into(),
            });
        }
        l.requested = true;
        setup(l);
        Ok(())
    }
}

impl InputLine for SimIn {
    fn level(&mut self) -> Result<bool, HwError> {
        let lines = self
            .sim
            .0
            .lines
            .lock()
            .map_err(|_| HwError::Sim("poisoned".into()))?;
        Ok(lines.get(&self.key).is_some_and(|l| l.level))
    }

    fn wait_edge(&mut self, timeout: Duration) -> Result<Option<bool>, HwError> {
        match self.rx.recv_timeout(timeout) {
            Ok(level) => Ok(Some(level)),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(HwError::Sim("line released".into())),
        }
    }
}

impl OutputLine for SimOut {
    fn set(&mut self, level: bool) -> Result<(), HwError> {
        self.sim.record(&self.key, level)
    }
}
