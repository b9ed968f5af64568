//! Hardware lines: a small GPIO trait (`Backend`, `InputLine`, `OutputLine`) with two
//! implementations, and the sans-IO pin logic (`pins`) that io::gpio drives.
//!
//! - `linux`: the kernel's GPIO character device through gpiocdev. Works on every Pi and any
//!   Linux board; chips are named by label ("pinctrl-bcm2711") or path ("/dev/gpiochip0").
//! - `sim`: in-process lines that tests script, optionally mirrored in a directory so a test
//!   outside the process can drive the real binary (`[gpio] backend = "simulated"`).
//!
//! Inputs always ask the kernel for both edges: the level must be tracked whatever `edge` a
//! pin filters on, and the filtering (and the debounce) happen in `pins`, the same for both
//! backends.
//!
//! ## Trying the Linux backend without wiring anything: gpio-sim
//! On a Pi (or any kernel built with `CONFIG_GPIO_SIM`), as root:
//! ```text
//! modprobe gpio-sim
//! mount -t configfs none /sys/kernel/config 2>/dev/null
//! mkdir -p /sys/kernel/config/gpio-sim/outpost/bank0/line17
//! echo 8 > /sys/kernel/config/gpio-sim/outpost/bank0/num_lines
//! echo outpost-sim > /sys/kernel/config/gpio-sim/outpost/bank0/label
//! echo 1 > /sys/kernel/config/gpio-sim/outpost/live
//! ```
//! Configure `[[gpio.input]] chip = "outpost-sim"`, `line = 17`, start outpost, then drive
//! the line through sysfs: the bank's device (see `dev_name` in the bank directory) has
//! `/sys/devices/platform/<dev>/<chip>/sim_gpio17/pull`; writing `pull-up` or `pull-down`
//! there makes an edge. Outputs read back through `sim_gpioN/value`. `echo 0 > live` and
//! `rmdir` the directories to remove it.

pub mod linux;
pub mod pins;
pub mod sim;

use std::time::Duration;

use thiserror::Error;

use crate::config::Bias;

#[derive(Debug, Error)]
pub enum HwError {
    #[error("no GPIO chip `{0}` (not a path, and no chip has that label)")]
    NoChip(String),
    #[error("{chip} line {line}: {detail}")]
    Line {
        chip: String,
        line: u32,
        detail: String,
    },
    #[error("GPIO simulator: {0}")]
    Sim(String),
}

/// One input line to request.
#[derive(Debug, Clone)]
pub struct InputSpec {
    pub chip: String,
    pub line: u32,
    pub bias: Bias,
}

/// Where lines come from.
pub trait Backend: Send + Sync {
    fn input(&self, spec: &InputSpec) -> Result<Box<dyn InputLine>, HwError>;
    /// Requests an output, driven to `initial` at once.
    fn output(&self, chip: &str, line: u32, initial: bool) -> Result<Box<dyn OutputLine>, HwError>;
}

/// An input line. Its methods block; io::gpio gives each input a thread.
pub trait InputLine: Send {
    fn level(&mut self) -> Result<bool, HwError>;
    /// The next edge within `timeout`: the level after it.
    fn wait_edge(&mut self, timeout: Duration) -> Result<Option<bool>, HwError>;
}

/// An output line.
pub trait OutputLine: Send {
    fn set(&mut self, level: bool) -> Result<(), HwError>;
}
