//! Pin logic, sans-IO: what an input's raw edges mean (debounce, level changes, pulse counts
//! per interval) and what an output command does. Time is an argument, so a test runs an hour
//! of pulses in a millisecond.

use std::time::{Duration, Instant};

use crate::config::{Edge, InputMode};

/// What an input reports.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Report {
    /// The debounced level changed (or, at start, is this), at `at`.
    Level { level: bool, at: Instant },
    /// Pulses in the interval that ended at `at`.
    Count {
        count: u64,
        total: u64,
        per_second: f64,
        at: Instant,
    },
}

/// One input's state.
#[derive(Debug)]
pub struct Input {
    mode: InputMode,
    edge: Edge,
    debounce: Duration,
    interval: Duration,
    /// The debounced level.
    stable: bool,
    /// The raw level since its last edge, and when that settles.
    pending: Option<(bool, Instant)>,
    count: u64,
    total: u64,
    next_count: Option<Instant>,
    reports: Vec<Report>,
}

impl Input {
    pub fn new(
        now: Instant,
        level: bool,
        mode: InputMode,
        edge: Edge,
        debounce: Duration,
        interval: Duration,
    ) -> Self {
        let mut i = Input {
            mode,
            edge,
            debounce,
            interval,
            stable: level,
            pending: None,
            count: 0,
            total: 0,
            next_count: None,
            reports: Vec::new(),
        };
        match mode {
            InputMode::Level => i.reports.push(Report::Level { level, at: now }),
            InputMode::Counter => i.next_count = Some(now + interval),
        }
        i
    }

    /// A raw edge: the line is now at `level`.
    pub fn edge(&mut self, now: Instant, level: bool) {
        if self.debounce.is_zero() {
            self.settle(now, level);
            return;
        }
        // Every edge restarts the wait: the level counts once it has held for `debounce`.
        self.pending = Some((level, now + self.debounce));
    }

    fn settle(&mut self, at: Instant, level: bool) {
        if level == self.stable {
            return;
        }
        self.stable = level;
        let counts = match self.edge {
            Edge::Rising => level,
            Edge::Falling => !level,
            Edge::Both => true,
        };
        if !counts {
            return;
        }
        match self.mode {
            InputMode::Level => self.reports.push(Report::Level { level, at }),
            InputMode::Counter => {
                self.count += 1;
                self.total += 1;
            }
        }
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let p = self.pending.map(|(_, t)| t);
        match (p, self.next_count) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        if let Some((level, at)) = self.pending {
            if at <= now {
                self.pending = None;
                self.settle(at, level);
            }
        }
        while let Some(at) = self.next_count.filter(|t| *t <= now) {
            // Pulses that settle exactly at the boundary count in the interval they end.
            let count = std::mem::take(&mut self.count);
            self.reports.push(Report::Count {
                count,
                total: self.total,
                per_second: count as f64 / self.interval.as_secs_f64(),
                at,
            });
            self.next_count = Some(at + self.interval);
        }
    }

    pub fn poll_report(&mut self) -> Option<Report> {
        if self.reports.is_empty() {
            None
        } else {
            Some(self.reports.remove(0))
        }
    }

    pub fn level(&self) -> bool {
        self.stable
    }
}

/// An output command, as a set topic's payload says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Set(bool),
    Toggle,
    /// The opposite level for this long, then back.
    Pulse(Duration),
}

/// The longest pulse: longer is surely a typo, and would hold a pump on for a day.
pub const MAX_PULSE: Duration = Duration::from_secs(3600);

impl Command {
    /// Parses 1/0, on/off, true/false, high/low, toggle, pulse:<duration>; case and blanks
    /// around do not matter.
    pub fn parse(payload: &[u8]) -> Result<Command, String> {
        let text = std::str::from_utf8(payload)
            .map_err(|_| "not UTF-8".to_owned())?
            .trim()
            .to_ascii_lowercase();
        Ok(match text.as_str() {
            "1" | "on" | "true" | "high" => Command::Set(true),
            "0" | "off" | "false" | "low" => Command::Set(false),
            "toggle" => Command::Toggle,
            other => {
                let Some(d) = other.strip_prefix("pulse:") else {
                    return Err(format!(
                        "`{}`: expected 1/0, on/off, true/false, high/low, toggle or pulse:<duration>",
                        shorten(&text)
                    ));
                };
                match crate::config::parse_duration(d) {
                    Some(d) if !d.is_zero() && d <= MAX_PULSE => Command::Pulse(d),
                    _ => {
                        return Err(format!(
                            "`{}`: a pulse takes a duration from 1ms to 1h, such as pulse:500ms",
                            shorten(&text)
                        ))
                    }
                }
            }
        })
    }
}

fn shorten(s: &str) -> String {
    s.chars().take(40).collect()
}

/// One output's state.
#[derive(Debug)]
pub struct Output {
    level: bool,
    /// A pulse ends at this instant, going back to the level.
    pulse_end: Option<(Instant, bool)>,
}

impl Output {
    pub fn new(initial: bool) -> Self {
        Output {
            level: initial,
            pulse_end: None,
        }
    }

    pub fn level(&self) -> bool {
        self.level
    }

    /// Applies `cmd`; returns the level the line must be set to.
    pub fn apply(&mut self, now: Instant, cmd: Command) -> bool {
        // A new command replaces a pulse in progress: its end must not undo the command.
        let base = self.pulse_end.take().map_or(self.level, |(_, back)| back);
        self.level = match cmd {
            Command::Set(l) => l,
            Command::Toggle => !base,
            Command::Pulse(d) => {
                self.pulse_end = Some((now + d, base));
                !base
            }
        };
        self.level
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        self.pulse_end.map(|(t, _)| t)
    }

    /// The level to set if a pulse ended.
    pub fn handle_timeout(&mut self, now: Instant) -> Option<bool> {
        let (t, back) = self.pulse_end?;
        if t > now {
            return None;
        }
        self.pulse_end = None;
        self.level = back;
        Some(back)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn run_until(i: &mut Input, t: Instant) {
        while let Some(w) = i.poll_timeout().filter(|w| *w <= t) {
            i.handle_timeout(w);
        }
    }

    fn reports(i: &mut Input) -> Vec<Report> {
        std::iter::from_fn(|| i.poll_report()).collect()
    }

    #[test]
    fn debounce_swallows_bounces_and_keeps_real_changes() {
        let t0 = Instant::now();
        let mut i = Input::new(t0, true, InputMode::Level, Edge::Both, 20 * MS, MS);
        assert_eq!(
            reports(&mut i),
            vec![Report::Level {
                level: true,
                at: t0
            }]
        );
        // A contact that chatters for 8 ms then settles open.
        let mut t = t0 + 100 * MS;
        for k in 0..8 {
            i.edge(t, k % 2 == 1);
            t += MS;
            run_until(&mut i, t);
        }
        i.edge(t, false);
        run_until(&mut i, t + 19 * MS);
        assert!(reports(&mut i).is_empty(), "not settled yet");
        run_until(&mut i, t + 20 * MS);
        assert_eq!(
            reports(&mut i),
            vec![Report::Level {
                level: false,
                at: t + 20 * MS
            }]
        );
        // A glitch shorter than the debounce that comes back: nothing.
        let t = t + 200 * MS;
        i.edge(t, true);
        i.edge(t + 5 * MS, false);
        run_until(&mut i, t + 100 * MS);
        assert!(reports(&mut i).is_empty());
    }

    #[test]
    fn edge_filter_in_level_mode() {
        let t0 = Instant::now();
        let mut i = Input::new(
            t0,
            false,
            InputMode::Level,
            Edge::Rising,
            Duration::ZERO,
            MS,
        );
        reports(&mut i);
        i.edge(t0 + MS, true);
        i.edge(t0 + 2 * MS, false);
        assert_eq!(
            reports(&mut i),
            vec![Report::Level {
                level: true,
                at: t0 + MS
            }]
        );
    }

    #[test]
    fn counter_counts_every_pulse_of_a_burst_across_intervals() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(60);
        let mut i = Input::new(
            t0,
            false,
            InputMode::Counter,
            Edge::Rising,
            2 * MS,
            interval,
        );
        // 10,000 pulses of 5 ms high / 5 ms low, starting 1 s in: 100 s of pulses, spread
        // over two interval boundaries.
        let mut t = t0 + Duration::from_secs(1);
        for _ in 0..10_000 {
            run_until(&mut i, t);
            i.edge(t, true);
            // Each edge bounces once.
            i.edge(t + Duration::from_micros(300), false);
            i.edge(t + Duration::from_micros(600), true);
            t += 5 * MS;
            run_until(&mut i, t);
            i.edge(t, false);
            t += 5 * MS;
        }
        run_until(&mut i, t0 + Duration::from_secs(180));
        let counts: Vec<(u64, u64, f64)> = reports(&mut i)
            .into_iter()
            .map(|r| match r {
                Report::Count {
                    count,
                    total,
                    per_second,
                    ..
                } => (count, total, per_second),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(counts.len(), 3);
        assert_eq!(counts.iter().map(|c| c.0).sum::<u64>(), 10_000);
        assert_eq!(counts[2].1, 10_000);
        // 59 s of pulses at 100 Hz in the first interval.
        assert_eq!(counts[0].0, 5_900);
        assert!((counts[0].2 - 5_900.0 / 60.0).abs() < 1e-9);
    }

    #[test]
    fn commands() {
        for (p, want) in [
            ("1", Command::Set(true)),
            (" ON ", Command::Set(true)),
            ("true", Command::Set(true)),
            ("0", Command::Set(false)),
            ("off", Command::Set(false)),
            ("False", Command::Set(false)),
            ("toggle", Command::Toggle),
            ("pulse:500ms", Command::Pulse(500 * MS)),
            ("pulse:2s", Command::Pulse(Duration::from_secs(2))),
        ] {
            assert_eq!(Command::parse(p.as_bytes()), Ok(want), "{p}");
        }
        for bad in [
            "",
            "2",
            "onn",
            "pulse:",
            "pulse:0ms",
            "pulse:2d",
            "pulse:x",
            "\u{0}",
        ] {
            assert!(Command::parse(bad.as_bytes()).is_err(), "{bad:?}");
        }
        assert!(Command::parse(b"\xff").is_err());
    }

    #[test]
    fn outputs_toggle_and_pulse() {
        let t0 = Instant::now();
        let mut o = Output::new(false);
        assert!(o.apply(t0, Command::Toggle));
        assert!(!o.apply(t0, Command::Toggle));
        assert!(o.apply(t0, Command::Pulse(500 * MS)));
        assert_eq!(o.handle_timeout(t0 + 499 * MS), None);
        assert_eq!(o.handle_timeout(t0 + 500 * MS), Some(false));
        // A command during a pulse wins; the pulse's end does nothing after it.
        o.apply(t0, Command::Pulse(500 * MS));
        assert!(o.apply(t0 + MS, Command::Set(true)));
        assert_eq!(o.poll_timeout(), None);
        assert!(o.level());
    }
}
