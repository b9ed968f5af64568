//! `[[serial]]` sensor ports and `[gpio]` pins: what each device is, how its frames or edges
//! become messages, and which topics drive it.

use super::spans::{KeyPath, Step};
use std::path::PathBuf;

use serde::Deserialize;

use super::units::{Duration, Size};
use crate::proto::frames::decode::{Decoder, TopicTemplate};
use crate::proto::frames::Framing as Wire;
use crate::proto::topic;

/// `framing` of a `[[serial]]` port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Framing {
    Lines,
    Cobs,
    Slip,
    LenCrc16,
    /// The port carries MQTT-SN in SLIP frames with CRC: it is an MQTT-SN gateway transport,
    /// exactly like an `mqtt-sn-serial` listener.
    MqttSn,
}

/// `decode` of a `[[serial]]` port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Decode {
    Raw,
    Json,
    Kv,
    Csv,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Parity {
    None,
    Odd,
    Even,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FlowControl {
    None,
    Software,
    Hardware,
}

/// `[[serial]]`: one sensor port.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialPort {
    /// Names the port in topics (`{name}`), logs and the session id.
    pub name: String,
    pub device: PathBuf,
    #[serde(default = "default_baud")]
    pub baud: u32,
    #[serde(default = "default_data_bits")]
    pub data_bits: u8,
    #[serde(default = "default_parity")]
    pub parity: Parity,
    #[serde(default = "default_stop_bits")]
    pub stop_bits: u8,
    #[serde(default = "default_flow")]
    pub flow_control: FlowControl,
    #[serde(default = "default_framing")]
    pub framing: Framing,
    /// Longest frame body; longer ones are dropped and counted.
    #[serde(default = "default_max_frame")]
    pub max_frame: Size,
    #[serde(default = "default_decode")]
    pub decode: Decode,
    /// `json`: each field a message (true), or the whole object one message.
    #[serde(default = "yes")]
    pub split: bool,
    /// `csv`: the column names, in order; "" or "-" skips a column.
    #[serde(default)]
    pub columns: Vec<String>,
    /// `csv`: the field delimiter.
    #[serde(default = "default_delimiter")]
    pub delimiter: char,
    /// Defaults to `sensors/{name}/{key}` for keyed decoders, `sensors/{name}` otherwise.
    #[serde(default)]
    pub topic: Option<String>,
    #[serde(default = "default_qos")]
    pub qos: u8,
    #[serde(default)]
    pub retain: bool,
    /// Payloads published here are written to the port, framed.
    #[serde(default)]
    pub write_topic: Option<String>,
    /// `lines`: what ends each written payload.
    #[serde(default = "default_line_ending")]
    pub line_ending: String,
}

fn default_baud() -> u32 {
    9600
}
fn default_data_bits() -> u8 {
    8
}
fn default_parity() -> Parity {
    Parity::None
}
fn default_stop_bits() -> u8 {
    1
}
fn default_flow() -> FlowControl {
    FlowControl::None
}
fn default_framing() -> Framing {
    Framing::Lines
}
fn default_max_frame() -> Size {
    Size(1024)
}
fn default_decode() -> Decode {
    Decode::Raw
}
fn default_delimiter() -> char {
    ','
}
fn default_qos() -> u8 {
    1
}
fn default_line_ending() -> String {
    "\n".into()
}
fn yes() -> bool {
    true
}

impl SerialPort {
    /// The framing on the wire; `None` for an MQTT-SN port.
    pub fn wire(&self) -> Option<Wire> {
        Some(match self.framing {
            Framing::Lines => Wire::Lines,
            Framing::Cobs => Wire::Cobs,
            Framing::Slip => Wire::Slip,
            Framing::LenCrc16 => Wire::LenCrc16,
            Framing::MqttSn => return None,
        })
    }

    pub fn decoder(&self) -> Decoder {
        match self.decode {
            Decode::Raw => Decoder::Raw,
            Decode::Json => Decoder::Json { split: self.split },
            Decode::Kv => Decoder::Kv,
            Decode::Csv => Decoder::Csv {
                columns: self.columns.clone(),
                delimiter: self.delimiter,
            },
        }
    }

    /// The topic template as written, or the default.
    pub fn topic_template(&self) -> String {
        match &self.topic {
            Some(t) => t.clone(),
            None if self.decoder().keyed() => "sensors/{name}/{key}".into(),
            None => "sensors/{name}".into(),
        }
    }

    pub fn template(&self, gateway_id: &str) -> Result<TopicTemplate, String> {
        TopicTemplate::parse(&self.topic_template(), &self.name, gateway_id)
            .map_err(|e| format!("`{}`: {e}", self.topic_template()))
    }

    /// The first thing wrong, as (key, message).
    pub(super) fn problems(&self) -> Option<(KeyPath, String)> {
        if self.name.is_empty() || self.name.contains(['/', '+', '#', '\0']) {
            return Some((
                vec![Step::Key("name")],
                "must be non-empty and free of '/', '+' and '#'".into(),
            ));
        }
        if self.baud == 0 {
            return Some((vec![Step::Key("baud")], "must be above 0".into()));
        }
        if !(5..=8).contains(&self.data_bits) {
            return Some((vec![Step::Key("data_bits")], "must be 5, 6, 7 or 8".into()));
        }
        if !(1..=2).contains(&self.stop_bits) {
            return Some((vec![Step::Key("stop_bits")], "must be 1 or 2".into()));
        }
        if self.framing == Framing::MqttSn {
            let extra = self.topic.is_some()
                || self.write_topic.is_some()
                || self.decode != Decode::Raw
                || !self.columns.is_empty();
            if extra {
                return Some((
                    vec![Step::Key("framing")],
                    "an mqtt-sn port is an MQTT-SN gateway: no topic, write_topic or decode".into(),
                ));
            }
            return None;
        }
        if self.max_frame.0 == 0 || self.max_frame.0 > u16::MAX as u64 {
            return Some((
                vec![Step::Key("max_frame")],
                "must be from 1B to 65535B".into(),
            ));
        }
        if self.qos > 2 {
            return Some((vec![Step::Key("qos")], "must be 0, 1 or 2".into()));
        }
        if self.decode == Decode::Csv && self.columns.is_empty() {
            return Some((
                vec![Step::Key("columns")],
                "csv needs the column names".into(),
            ));
        }
        if self.decode != Decode::Csv && !self.columns.is_empty() {
            return Some((vec![Step::Key("columns")], "only csv has columns".into()));
        }
        let t = match self.template("g") {
            Ok(t) => t,
            Err(e) => return Some((vec![Step::Key("topic")], e)),
        };
        if self.decoder().keyed() != t.has_key() {
            let msg = if t.has_key() {
                "{key} needs a decoder that names its values (kv, csv, json with split)"
            } else {
                "this decoder gives several values per frame: put {key} in the topic"
            };
            return Some((vec![Step::Key("topic")], msg.into()));
        }
        if let Some(w) = &self.write_topic {
            if let Err(e) = topic::validate_filter(w) {
                return Some((vec![Step::Key("write_topic")], format!("`{w}`: {e}")));
            }
        }
        None
    }
}

/// `backend` of `[gpio]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum GpioBackend {
    /// The kernel's GPIO character device (/dev/gpiochipN), through gpiocdev.
    #[default]
    Linux,
    /// In-process lines for tests and demos, driven through `sim_dir` (see `hw::sim`).
    Simulated,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Bias {
    PullUp,
    PullDown,
    #[default]
    Disabled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Edge {
    Rising,
    Falling,
    #[default]
    Both,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum InputMode {
    #[default]
    Level,
    Counter,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Level {
    #[default]
    Low,
    High,
}

/// `[gpio]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpio {
    #[serde(default)]
    pub backend: GpioBackend,
    /// `simulated`: where the simulator takes input levels and shows output levels.
    #[serde(default)]
    pub sim_dir: Option<PathBuf>,
    #[serde(default)]
    pub input: Vec<GpioInput>,
    #[serde(default)]
    pub output: Vec<GpioOutput>,
}

/// `[[gpio.input]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioInput {
    /// A chip label ("pinctrl-bcm2711") or path ("/dev/gpiochip0").
    pub chip: String,
    pub line: u32,
    #[serde(default)]
    pub bias: Bias,
    #[serde(default)]
    pub edge: Edge,
    #[serde(default = "default_debounce")]
    pub debounce: Duration,
    #[serde(default)]
    pub mode: InputMode,
    /// `counter`: how often the count is published.
    #[serde(default = "default_interval")]
    pub interval: Duration,
    pub topic: String,
    #[serde(default = "default_qos")]
    pub qos: u8,
    /// Defaults to true for `level` (the state stays known) and false for `counter`.
    #[serde(default)]
    pub retain: Option<bool>,
}

fn default_debounce() -> Duration {
    Duration(std::time::Duration::from_millis(20))
}
fn default_interval() -> Duration {
    Duration(std::time::Duration::from_secs(60))
}

/// `[[gpio.output]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GpioOutput {
    pub chip: String,
    pub line: u32,
    /// Commands: 1/0, on/off, true/false, high/low, toggle, pulse:<duration>.
    pub topic: String,
    /// The level, retained, after every change.
    #[serde(default)]
    pub state_topic: Option<String>,
    /// The level at start and the safe level at shutdown.
    #[serde(default)]
    pub initial: Level,
}

impl Gpio {
    /// The first thing wrong, as (key, message).
    pub(super) fn problems(&self) -> Option<(KeyPath, String)> {
        if self.backend == GpioBackend::Simulated && self.sim_dir.is_none() {
            return Some((
                vec![Step::Key("backend")],
                "the simulated backend needs `sim_dir`".into(),
            ));
        }
        let mut lines: Vec<(&str, u32)> = Vec::new();
        for (n, i) in self.input.iter().enumerate() {
            if let Err(e) = topic::validate_name(&i.topic) {
                return Some((
                    vec![Step::Key("input"), Step::At(n), Step::Key("topic")],
                    format!("`{}`: {e}", i.topic),
                ));
            }
            if i.qos > 2 {
                return Some((
                    vec![Step::Key("input"), Step::At(n), Step::Key("qos")],
                    "must be 0, 1 or 2".into(),
                ));
            }
            if i.mode == InputMode::Counter && i.interval.0 < std::time::Duration::from_secs(1) {
                return Some((
                    vec![Step::Key("input"), Step::At(n), Step::Key("interval")],
                    "must be at least 1s".into(),
                ));
            }
            if i.debounce.0 > std::time::Duration::from_secs(10) {
                return Some((
                    vec![Step::Key("input"), Step::At(n), Step::Key("debounce")],
                    "must be at most 10s".into(),
                ));
            }
            lines.push((&i.chip, i.line));
        }
        for (n, o) in self.output.iter().enumerate() {
            if let Err(e) = topic::validate_filter(&o.topic) {
                return Some((
                    vec![Step::Key("output"), Step::At(n), Step::Key("topic")],
                    format!("`{}`: {e}", o.topic),
                ));
            }
            if let Some(s) = &o.state_topic {
                if let Err(e) = topic::validate_name(s) {
                    return Some((
                        vec![Step::Key("output"), Step::At(n), Step::Key("state_topic")],
                        format!("`{s}`: {e}"),
                    ));
                }
            }
            lines.push((&o.chip, o.line));
        }
        for (n, l) in lines.iter().enumerate() {
            if lines[..n].contains(l) {
                return Some((
                    vec![Step::Key("line")],
                    format!("{} line {} is configured twice", l.0, l.1),
                ));
            }
        }
        None
    }
}
