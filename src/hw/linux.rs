//! The Linux GPIO backend: the character device (uAPI v2) through gpiocdev.

use std::path::PathBuf;
use std::time::Duration;

use gpiocdev::line::{Bias as KBias, EdgeDetection, EdgeKind, Value};
use gpiocdev::Request;

use super::{Backend, HwError, InputLine, InputSpec, OutputLine};
use crate::config::Bias;

/// The consumer name shown by `gpioinfo` for our lines.
const CONSUMER: &str = "outpost";

pub struct Linux;

/// The device path of `chip`: a path as given, `gpiochipN` under /dev, else the chip whose
/// label it is.
fn chip_path(chip: &str) -> Result<PathBuf, HwError> {
    if chip.starts_with('/') {
        return Ok(PathBuf::from(chip));
    }
    if chip.starts_with("gpiochip") {
        return Ok(PathBuf::from("/dev").join(chip));
    }
    let chips = gpiocdev::chip::chips().map_err(|_| HwError::NoChip(chip.to_owned()))?;
    for path in chips {
        let Ok(c) = gpiocdev::Chip::from_path(&path) else {
            continue;
        };
        if c.info().is_ok_and(|i| i.label == chip) {
            return Ok(path);
        }
    }
    Err(HwError::NoChip(chip.to_owned()))
}

fn line_err(chip: &str, line: u32, e: impl std::fmt::Display) -> HwError {
    HwError::Line {
        chip: chip.to_owned(),
        line,
        detail: e.to_string(),
    }
}

struct In {
    req: Request,
    chip: String,
    line: u32,
}

struct Out {
    req: Request,
    chip: String,
    line: u32,
}

impl Backend for Linux {
    fn input(&self, spec: &InputSpec) -> Result<Box<dyn InputLine>, HwError> {
        let path = chip_path(&spec.chip)?;
        let bias = match spec.bias {
            Bias::PullUp => KBias::PullUp,
            Bias::PullDown => KBias::PullDown,
            Bias::Disabled => KBias::Disabled,
        };
        let req = Request::builder()
            .on_chip(path)
            .with_consumer(CONSUMER)
            .with_line(spec.line)
            .as_input()
            .with_bias(bias)
            .with_edge_detection(EdgeDetection::BothEdges)
            .request()
            .map_err(|e| line_err(&spec.chip, spec.line, e))?;
        Ok(Box::new(In {
            req,
            chip: spec.chip.clone(),
            line: spec.line,
        }))
    }

    fn output(&self, chip: &str, line: u32, initial: bool) -> Result<Box<dyn OutputLine>, HwError> {
        let req = Request::builder()
            .on_chip(chip_path(chip)?)
            .with_consumer(CONSUMER)
            .with_line(line)
            .as_output(value(initial))
            .request()
            .map_err(|e| line_err(chip, line, e))?;
        Ok(Box::new(Out {
            req,
            chip: chip.to_owned(),
            line,
        }))
    }
}

fn value(level: bool) -> Value {
    if level {
        Value::Active
    } else {
        Value::Inactive
    }
}

impl InputLine for In {
    fn level(&mut self) -> Result<bool, HwError> {
        self.req
            .value(self.line)
            .map(|v| v == Value::Active)
            .map_err(|e| line_err(&self.chip, self.line, e))
    }

    fn wait_edge(&mut self, timeout: Duration) -> Result<Option<bool>, HwError> {
        let ready = self
            .req
            .wait_edge_event(timeout)
            .map_err(|e| line_err(&self.chip, self.line, e))?;
        if !ready {
            return Ok(None);
        }
        let ev = self
            .req
            .read_edge_event()
            .map_err(|e| line_err(&self.chip, self.line, e))?;
        Ok(Some(ev.kind == EdgeKind::Rising))
    }
}

impl OutputLine for Out {
    fn set(&mut self, level: bool) -> Result<(), HwError> {
        self.req
            .set_value(self.line, value(level))
            .map(|_| ())
            .map_err(|e| line_err(&self.chip, self.line, e))
    }
}
