//! The configuration: serde structs for `outpost.toml`, embedded defaults, and errors that name
//! the file, line, column and key.
//!
//! Unknown keys are errors (`deny_unknown_fields`), so a typo never silently falls back to a
//! default. Durations and sizes are written in human units ("30s", "512MiB").

mod devices;
mod mqttsn;
pub mod spans;
mod units;
mod uplink;

use std::net::SocketAddr;
use std::num::{NonZeroU16, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use thiserror::Error;

pub use devices::{
    Bias, Decode, Edge, FlowControl, Framing, Gpio, GpioBackend, GpioInput, GpioOutput, InputMode,
    Level, Parity, SerialPort,
};
pub use mqttsn::{Advertise, MqttSn, Network, PredefinedTopic, Retry};
pub use units::{parse_duration, Duration, Size};
pub use uplink::{Backoff, Protocol, RateLimit, Scheme, Uplink, Url};

/// Why a configuration could not be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The error (shown in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The file is not valid TOML, or a key or value is wrong.
    #[error("{path}:{line}:{column}: {key}{message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// "key `name`: " when the offending key is known, else empty.
        key: String,
        /// What is wrong.
        message: String,
    },
}

/// The whole of `outpost.toml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub gateway: Gateway,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Listener>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub store: StoreSection,
    /// The cloud broker; none means local-only.
    #[serde(default)]
    pub uplink: Option<Uplink>,
    /// The MQTT-SN gateway, for every `mqtt-sn` and `mqtt-sn-serial` listener.
    #[serde(default)]
    pub mqttsn: MqttSn,
    /// Sensor ports.
    #[serde(default)]
    pub serial: Vec<SerialPort>,
    /// GPIO inputs and outputs.
    #[serde(default)]
    pub gpio: Gpio,
    /// Who may log in.
    #[serde(default)]
    pub auth: Auth,
    /// The file and text it was read from, so that a problem found later (a file a key names
    /// does not open) can still say `file:line:col: key`.
    #[serde(skip)]
    source: Option<Arc<(PathBuf, String)>>,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Auth {
    /// A password file in mosquitto's format (`mosquitto_passwd` or `outpost passwd`).
    pub password_file: Option<PathBuf>,
    /// An ACL file in mosquitto's format. Without one, every client may do everything.
    pub acl_file: Option<PathBuf>,
}

/// `synchronous` in `[store]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    /// fsync on every commit: survives power cuts.
    Full,
    /// fsync at checkpoints: survives crashes, may lose the last commits on a power cut.
    Normal,
}

/// `when_full` in `[store]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Delete the oldest messages to make room (counted and logged).
    DropOldest,
    /// Refuse new QoS 1/2 messages: no ack (3.1.1) or PUBACK/PUBREC 0x97 (5.0).
    Block,
}

/// `[store]`: the durable store of messages, sessions and retained messages.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    pub synchronous: Synchronous,
    /// A batch commits when this has passed since its first write (or when it is full).
    pub commit_interval: Duration,
    /// Queued messages (session queues and the bridge outbox together), in bytes.
    pub max_bytes: Size,
    /// Queued messages, by count.
    pub max_messages: u64,
    /// Messages older than this are expired.
    pub max_age: Duration,
    pub when_full: WhenFull,
    /// How long after start the wall clock is believed even if the kernel never says it is
    /// synchronised; until then nothing expires by a wall-clock age. "0s" believes it at once
    /// (a board with a real-time clock); a Pi without one wants minutes.
    pub trust_clock_after: Duration,
    /// The bridge outbox's share of `max_bytes` and `max_messages`; persistent session queues
    /// get the rest. `drop_oldest` evicts within a share, so an abandoned local session can
    /// never evict the cloud backlog.
    pub outbox_share: f64,
}

impl Default for StoreSection {
    fn default() -> Self {
        StoreSection {
            synchronous: Synchronous::Full,
            commit_interval: Duration(std::time::Duration::from_millis(5)),
            max_bytes: Size(512 << 20),
            max_messages: 1_000_000,
            max_age: Duration(std::time::Duration::from_secs(30 * 86_400)),
            when_full: WhenFull::DropOldest,
            outbox_share: 0.8,
            trust_clock_after: Duration(std::time::Duration::ZERO),
        }
    }
}

/// `[gateway]`: who this gateway is and where it keeps its data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    /// Defaults to the hostname.
    pub id: Option<String>,
    /// Defaults to `$STATE_DIRECTORY` under systemd, else `./outpost-data`.
    pub data_dir: Option<PathBuf>,
    /// The Unix socket `outpost status` reads. Defaults to `$RUNTIME_DIRECTORY/control.sock`
    /// under systemd, else `control.sock` in the data directory.
    pub control_socket: Option<PathBuf>,
    /// How often `$SYS` topics are published (mosquitto's `sys_interval`); "0s" turns them off.
    #[serde(default = "default_sys_interval")]
    pub sys_interval: Duration,
}

impl Default for Gateway {
    fn default() -> Self {
        Gateway {
            id: None,
            data_dir: None,
            control_socket: None,
            sys_interval: default_sys_interval(),
        }
    }
}

fn default_sys_interval() -> Duration {
    Duration(std::time::Duration::from_secs(10))
}

/// The kinds of listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ListenerKind {
    /// Plain MQTT over TCP, every protocol level on one port.
    Mqtt,
    /// MQTT over TLS (`cert_file`, `key_file`; `client_ca` for mutual TLS).
    Mqtts,
    /// MQTT over WebSocket (subprotocol `mqtt`), for browser pages on the site LAN.
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
    /// The MQTT-SN gateway over UDP.
    MqttSn,
    /// The MQTT-SN gateway over a serial port, in SLIP frames (see README).
    MqttSnSerial,
}

impl ListenerKind {
    /// The kinds that speak MQTT proper, over TCP.
    pub fn is_mqtt(self) -> bool {
        matches!(self, Self::Mqtt | Self::Mqtts | Self::Ws | Self::Wss)
    }

    /// The kinds that speak TLS.
    pub fn is_tls(self) -> bool {
        matches!(self, Self::Mqtts | Self::Wss)
    }

    /// As written in the config.
    pub fn name(self) -> &'static str {
        match self {
            Self::Mqtt => "mqtt",
            Self::Mqtts => "mqtts",
            Self::Ws => "ws",
            Self::Wss => "wss",
            Self::MqttSn => "mqtt-sn",
            Self::MqttSnSerial => "mqtt-sn-serial",
        }
    }
}

/// `[[listener]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listener {
    pub kind: ListenerKind,
    /// The address, for `mqtt` (TCP) and `mqtt-sn` (UDP).
    #[serde(default)]
    pub bind: Option<SocketAddr>,
    /// The serial device, for `mqtt-sn-serial`.
    #[serde(default)]
    pub device: Option<PathBuf>,
    /// The serial line speed, for `mqtt-sn-serial`.
    #[serde(default)]
    pub baud: Option<u32>,
    /// `mqtt-sn-serial`: each frame ends with a CRC-16 (on by default).
    #[serde(default)]
    pub crc: Option<bool>,
    /// `mqtt-sn-serial`: whoever is on the line may publish at QoS -1 (off by default; UDP
    /// listeners use `[mqttsn] qos_minus_one_from`).
    #[serde(default)]
    pub qos_minus_one: Option<bool>,
    /// Clients without a user name may connect. Defaults to true on loopback addresses and
    /// false elsewhere; see `allows_anonymous`.
    #[serde(default)]
    pub allow_anonymous: Option<bool>,
    /// `mqtts`/`wss`: the server's certificate chain (PEM).
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    /// `mqtts`/`wss`: the server's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// `mqtts`/`wss`: CA certificates that sign client certificates; turns on mutual TLS.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client without a certificate is refused (default true).
    #[serde(default)]
    pub require_certificate: Option<bool>,
    /// With `client_ca`: the client certificate's Common Name is the user name, and the
    /// password file is not consulted (mosquitto's option of the same name).
    #[serde(default)]
    pub use_identity_as_username: Option<bool>,
    /// A prefix put before every topic a client of this listener uses, and taken off every
    /// topic it is sent, so it sees only its own subtree (mosquitto's `mount_point`).
    #[serde(default)]
    pub mount_point: Option<String>,
}

impl Listener {
    /// A listener of `kind` with nothing else set, for the ones outpost adds itself.
    fn of_kind(kind: ListenerKind) -> Self {
        Listener {
            kind,
            bind: None,
            device: None,
            baud: None,
            crc: None,
            qos_minus_one: None,
            allow_anonymous: None,
            cert_file: None,
            key_file: None,
            client_ca: None,
            require_certificate: None,
            use_identity_as_username: None,
            mount_point: None,
        }
    }

    /// The address of a network listener (validated to be there).
    pub fn addr(&self) -> SocketAddr {
        self.bind.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// What it listens on, for logs and `check`.
    pub fn place(&self) -> String {
        match (&self.bind, &self.device) {
            (Some(b), _) => b.to_string(),
            (None, Some(d)) => format!("{} at {} baud", d.display(), self.baud.unwrap_or(0)),
            (None, None) => "?".into(),
        }
    }

    fn tcp(&self) -> bool {
        self.kind.is_mqtt()
    }

    /// Whether a client certificate is the login (`use_identity_as_username`).
    pub fn identity_is_username(&self) -> bool {
        self.use_identity_as_username == Some(true)
    }

    /// Whether clients without a user name get in: as written, else only on loopback.
    pub fn allows_anonymous(&self) -> bool {
        self.allow_anonymous
            .unwrap_or(self.bind.map_or(true, |b| b.ip().is_loopback()))
    }

    /// What is wrong with the TLS and `mount_point` keys for this kind of listener.
    fn tls_problem(&self) -> Option<String> {
        let tls_keys = self.cert_file.is_some()
            || self.key_file.is_some()
            || self.client_ca.is_some()
            || self.require_certificate.is_some()
            || self.use_identity_as_username.is_some();
        if self.kind.is_tls() {
            if self.cert_file.is_none() || self.key_file.is_none() {
                return Some(format!(
                    "a {} listener needs `cert_file` and `key_file`",
                    self.kind.name()
                ));
            }
            if self.client_ca.is_none()
                && (self.require_certificate.is_some() || self.use_identity_as_username.is_some())
            {
                return Some(
                    "`require_certificate` and `use_identity_as_username` need `client_ca`".into(),
                );
            }
            if self.identity_is_username() && self.require_certificate == Some(false) {
                return Some(
                    "`use_identity_as_username` needs every client to show a certificate (require_certificate = true)".into(),
                );
            }
        } else if tls_keys {
            return Some(format!(
                "`cert_file`, `key_file`, `client_ca`, `require_certificate` and `use_identity_as_username` are for mqtts and wss listeners, not {}",
                self.kind.name()
            ));
        }
        if let Some(m) = &self.mount_point {
            if !self.kind.is_mqtt() {
                return Some("`mount_point` is for mqtt, mqtts, ws and wss listeners".into());
            }
            if m.is_empty() || m.contains(['+', '#', '\0']) {
                return Some(
                    "`mount_point` must be a topic prefix without wildcards, such as \"site1/\""
                        .into(),
                );
            }
        }
        None
    }
}

/// `[limits]`: what one client, or all of them, may use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Open connections across all listeners; more are accepted and closed at once.
    pub max_connections: NonZeroUsize,
    /// Largest packet accepted (and announced to v5 clients).
    pub max_packet_size: Size,
    /// QoS 1/2 messages in flight per client, each way; our Receive Maximum.
    pub max_inflight: NonZeroU16,
    /// Messages queued per session beyond the inflight window; the newest is dropped when full.
    pub max_queued: NonZeroUsize,
    /// A socket that sends no CONNECT within this is closed.
    pub connect_timeout: Duration,
    /// The longest keep-alive allowed; v5 clients asking for more (or none) are told this one.
    /// "0s" keeps each client's own.
    pub max_keepalive: Duration,
    /// Topic aliases a v5 client may use towards us.
    pub topic_alias_maximum: u16,
    /// Levels a topic name or filter may have (mosquitto closes at 202); deeper ones are
    /// refused as invalid.
    pub max_topic_levels: NonZeroUsize,
    /// Sessions held at once, online or not, MQTT-SN included; a CONNECT for a new session
    /// beyond this is refused (v5 0x97, 3.1.1 "server unavailable", MQTT-SN congestion).
    pub max_sessions: NonZeroUsize,
    /// How long a session that never expires by itself (3.1.1 clean session 0, MQTT-SN clean
    /// off, v5 expiry 0xFFFFFFFF) is kept offline; mosquitto's `persistent_client_expiration`.
    /// "0s" keeps them for ever.
    pub persistent_session_expiry: Duration,
    /// Subscriptions one session may hold; more are refused in SUBACK (v5 0x97).
    pub max_subscriptions_per_session: NonZeroUsize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            max_packet_size: Size(1 << 20),
            max_inflight: NonZeroU16::new(100).unwrap_or(NonZeroU16::MIN),
            max_queued: NonZeroUsize::new(1000).unwrap_or(NonZeroUsize::MIN),
            connect_timeout: Duration(std::time::Duration::from_secs(10)),
            max_keepalive: Duration(std::time::Duration::ZERO),
            topic_alias_maximum: 10,
            max_topic_levels: NonZeroUsize::new(200).unwrap_or(NonZeroUsize::MIN),
            max_sessions: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            persistent_session_expiry: Duration(std::time::Duration::from_secs(30 * 86_400)),
            max_subscriptions_per_session: NonZeroUsize::new(1000).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

/// The longest path a Unix socket address holds (`sun_path` is 108 bytes with its NUL).
pub const MAX_SOCKET_PATH: usize = 107;

/// Deeper than this, walking a topic's levels could exhaust a thread's stack.
pub const MAX_TOPIC_LEVELS_CEILING: usize = 1000;

/// Largest packet the protocol can express: 1 + 4 length bytes + 268,435,455.
const PROTOCOL_MAX_PACKET: u64 = 268_435_460;

impl Config {
    /// The embedded defaults: MQTT on 127.0.0.1:1883, MQTT-SN on UDP 127.0.0.1:1884, no uplink.
    pub fn embedded() -> Self {
        let mut c: Config = match toml::from_str("") {
            Ok(c) => c,
            Err(_) => unreachable!("an empty document always deserializes to the defaults"),
        };
        c.fill_defaults();
        c
    }

    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            error: source,
        })?;
        Self::parse(path, &text)
    }

    /// Parses and validates `text`, reporting errors against `path`. A leading byte-order mark
    /// (Windows editors write one) is not part of the document: left in, it became part of
    /// the first key's name.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut c: Config = toml::from_str(text).map_err(|e| {
            let offset = e.span().map_or(0, |s| s.start);
            invalid(path, text, offset, e.message().to_owned())
        })?;
        c.validate(path, text)?;
        c.source = Some(Arc::new((path.to_owned(), text.to_owned())));
        c.fill_defaults();
        Ok(c)
    }

    fn fill_defaults(&mut self) {
        if self.listeners.is_empty() {
            for (kind, port) in [(ListenerKind::Mqtt, 1883), (ListenerKind::MqttSn, 1884)] {
                self.listeners.push(Listener {
                    bind: Some(SocketAddr::from(([127, 0, 0, 1], port))),
                    ..Listener::of_kind(kind)
                });
            }
        }
        // A `framing = "mqtt-sn"` port is an `mqtt-sn-serial` listener by another name: it
        // becomes one here, so everything downstream knows one kind of MQTT-SN serial port.
        for p in &self.serial {
            if p.wire().is_none() {
                self.listeners.push(Listener {
                    device: Some(p.device.clone()),
                    baud: Some(p.baud),
                    ..Listener::of_kind(ListenerKind::MqttSnSerial)
                });
            }
        }
    }

    fn validate(&self, path: &Path, text: &str) -> Result<(), ConfigError> {
        use spans::Step::{At, Key};
        let at = |key_path: &[spans::Step], msg: String| {
            invalid(path, text, spans::locate(text, key_path), msg)
        };
        let l = &self.limits;
        if l.max_packet_size.0 < 64 || l.max_packet_size.0 > PROTOCOL_MAX_PACKET {
            return Err(at(
                &[Key("limits"), Key("max_packet_size")],
                format!("must be between 64B and {PROTOCOL_MAX_PACKET}B"),
            ));
        }
        if l.max_keepalive.0.as_secs() > u16::MAX as u64 {
            return Err(at(
                &[Key("limits"), Key("max_keepalive")],
                "must be at most 65535s".into(),
            ));
        }
        if l.connect_timeout.0.is_zero() {
            return Err(at(
                &[Key("limits"), Key("connect_timeout")],
                "must be more than 0s".into(),
            ));
        }
        if l.max_topic_levels.get() > MAX_TOPIC_LEVELS_CEILING {
            return Err(at(
                &[Key("limits"), Key("max_topic_levels")],
                format!("must be at most {MAX_TOPIC_LEVELS_CEILING}"),
            ));
        }
        if l.persistent_session_expiry.0.as_secs() >= u32::MAX as u64 {
            return Err(at(
                &[Key("limits"), Key("persistent_session_expiry")],
                "must be under 136 years (u32 seconds); 0s keeps sessions for ever".into(),
            ));
        }
        if !(0.0..=1.0).contains(&self.store.outbox_share) || self.store.outbox_share.is_nan() {
            return Err(at(
                &[Key("store"), Key("outbox_share")],
                "must be between 0.0 and 1.0".into(),
            ));
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let kind_at = spans::locate_value(text, &[Key("listener"), At(i), Key("kind")]);
            let here = |msg: &str| invalid(path, text, kind_at, msg.into());
            if let Some(msg) = l.tls_problem() {
                return Err(here(&msg));
            }
            match l.kind {
                ListenerKind::Mqtt
                | ListenerKind::Mqtts
                | ListenerKind::Ws
                | ListenerKind::Wss
                | ListenerKind::MqttSn => {
                    if l.bind.is_none() {
                        return Err(here("this listener needs `bind`"));
                    }
                    if l.device.is_some()
                        || l.baud.is_some()
                        || l.crc.is_some()
                        || l.qos_minus_one.is_some()
                    {
                        return Err(here(
                            "`device`, `baud`, `crc` and `qos_minus_one` are for mqtt-sn-serial",
                        ));
                    }
                }
                ListenerKind::MqttSnSerial if l.allow_anonymous.is_some() => {
                    return Err(here("`allow_anonymous` is for network listeners"));
                }
                ListenerKind::MqttSnSerial => {
                    if l.device.is_none() || l.bind.is_some() {
                        return Err(here("mqtt-sn-serial needs `device` (and no `bind`)"));
                    }
                    if l.baud == Some(0) {
                        return Err(here("`baud` must be above 0"));
                    }
                }
            }
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let Some(bind) = l.bind else { continue };
            let pos = spans::locate(text, &[Key("listener"), At(i), Key("allow_anonymous")]);
            match l.kind {
                k if k.is_mqtt()
                    && !l.allows_anonymous()
                    && self.auth.password_file.is_none()
                    && !l.identity_is_username() =>
                {
                    return Err(invalid(path, text, pos, format!(
                        "the listener on {bind} refuses anonymous clients{} and [auth] has no password_file, so nobody could log in: set password_file or use_identity_as_username, or write allow_anonymous = true to open it",
                        if l.allow_anonymous.is_none() { " (it is not on loopback)" } else { "" }
                    )));
                }
                ListenerKind::MqttSn if l.allow_anonymous == Some(false) => {
                    return Err(invalid(path, text, pos, "MQTT-SN clients have no user names: an mqtt-sn listener cannot refuse anonymous clients".into()));
                }
                ListenerKind::MqttSn if !l.allows_anonymous() => {
                    return Err(invalid(path, text, pos, format!(
                        "MQTT-SN has no passwords, so the listener on {bind} would be open to its network: write allow_anonymous = true if that is meant"
                    )));
                }
                _ => {}
            }
        }
        if let Some((key_path, msg)) = self.mqttsn.problems() {
            return Err(at(&[&[Key("mqttsn")][..], &key_path].concat(), msg));
        }
        for (i, a) in self.listeners.iter().enumerate() {
            let Some(bind) = a.bind else { continue };
            let same = |b: &Listener| b.bind == Some(bind) && b.tcp() == a.tcp();
            if bind.port() != 0 && self.listeners[..i].iter().any(same) {
                let pos = spans::locate_value(text, &[Key("listener"), At(i), Key("bind")]);
                return Err(invalid(
                    path,
                    text,
                    pos,
                    format!("{bind} is bound by two listeners"),
                ));
            }
        }
        let st = &self.store;
        if st.commit_interval.0 > std::time::Duration::from_secs(1) {
            return Err(at(
                &[Key("store"), Key("commit_interval")],
                "must be at most 1s: acks wait for it".into(),
            ));
        }
        if st.max_messages == 0 || st.max_bytes.0 == 0 {
            let key = if st.max_messages == 0 {
                "max_messages"
            } else {
                "max_bytes"
            };
            return Err(at(
                &[Key("store"), Key(key)],
                "store limits must be above 0".into(),
            ));
        }
        if let Some(u) = &self.uplink {
            if let Some((key_path, msg)) = u.problems() {
                return Err(at(&[&[Key("uplink")][..], &key_path].concat(), msg));
            }
        }
        for (i, p) in self.serial.iter().enumerate() {
            if let Some((key_path, msg)) = p.problems() {
                return Err(at(&[&[Key("serial"), At(i)][..], &key_path].concat(), msg));
            }
            if self.serial[..i].iter().any(|q| q.name == p.name) {
                return Err(at(
                    &[Key("serial"), At(i), Key("name")],
                    format!("port name `{}` is used twice", p.name),
                ));
            }
        }
        if let Some((key_path, msg)) = self.gpio.problems() {
            return Err(at(&[&[Key("gpio")][..], &key_path].concat(), msg));
        }
        if let Some(p) = &self.gateway.control_socket {
            if p.as_os_str().len() > MAX_SOCKET_PATH {
                return Err(at(
                    &[Key("gateway"), Key("control_socket")],
                    format!("is {} bytes long; a Unix socket path holds at most {MAX_SOCKET_PATH}: choose a shorter one, or leave it out", p.as_os_str().len()),
                ));
            }
        }
        if self.gateway.data_dir.as_deref() == Some(Path::new("")) {
            return Err(at(
                &[Key("gateway"), Key("data_dir")],
                "must not be empty: leave it out for the default ($STATE_DIRECTORY under systemd, else ./outpost-data)".into(),
            ));
        }
        if let Some(id) = &self.gateway.id {
            if id.is_empty() || id.contains(['/', '+', '#']) {
                return Err(at(
                    &[Key("gateway"), Key("id")],
                    "must be non-empty and free of '/', '+' and '#'".into(),
                ));
            }
        }
        Ok(())
    }

    /// `file:line:col: key `k`: ` for the key at `key_path`, to put before an error found
    /// after loading (a file it names); empty for the embedded defaults.
    pub fn place(&self, key_path: &[spans::Step]) -> String {
        let Some(src) = &self.source else {
            return String::new();
        };
        let (path, text) = (&src.0, &src.1);
        match invalid(path, text, spans::locate(text, key_path), String::new()) {
            ConfigError::Invalid {
                path,
                line,
                column,
                key,
                ..
            } => format!("{}:{line}:{column}: {key}", path.display()),
            _ => String::new(),
        }
    }

    /// The gateway id in force: configured, else the hostname.
    pub fn gateway_id(&self) -> String {
        if let Some(id) = &self.gateway.id {
            return id.clone();
        }
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "outpost".into())
    }

    /// The control socket in force. A Unix socket's path holds at most `MAX_SOCKET_PATH`
    /// bytes: when the default place (`$RUNTIME_DIRECTORY`, else the data directory) is
    /// longer, the socket goes to a short name of its own in `$XDG_RUNTIME_DIR` or the
    /// temporary directory, the same for the daemon and for `outpost status`.
    pub fn control_socket(&self) -> PathBuf {
        if let Some(p) = &self.gateway.control_socket {
            return p.clone();
        }
        let preferred = match std::env::var("RUNTIME_DIRECTORY") {
            Ok(s) if !s.is_empty() => {
                PathBuf::from(s.split(':').next().unwrap_or(&s)).join("control.sock")
            }
            _ => self.data_dir().join("control.sock"),
        };
        if preferred.as_os_str().len() <= MAX_SOCKET_PATH {
            return preferred;
        }
        let dir = std::env::var_os("XDG_RUNTIME_DIR")
            .map(PathBuf::from)
            .filter(|d| d.is_absolute() && d.as_os_str().len() < 64)
            .unwrap_or_else(std::env::temp_dir);
        // FNV-1a of the data directory: stable across runs and builds, one socket per site.
        let hash = preferred
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        dir.join(format!("outpost-{hash:016x}.sock"))
    }

    /// The data directory in force.
    pub fn data_dir(&self) -> PathBuf {
        if let Some(d) = &self.gateway.data_dir {
            return d.clone();
        }
        // systemd's StateDirectory= may list several, separated by ':'; ours is the first.
        match std::env::var("STATE_DIRECTORY") {
            Ok(s) if !s.is_empty() => PathBuf::from(s.split(':').next().unwrap_or(&s)),
            _ => PathBuf::from("./outpost-data"),
        }
    }
}

/// Checks that `s` uses only the `{placeholders}` in `allowed`: an unknown one would be sent
/// as it is written (a client id `{site}` is probably not meant).
pub fn placeholders(s: &str, allowed: &[&str]) -> Result<(), String> {
    let mut rest = s;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else {
            return Err(format!("unclosed `{{` in {s:?}"));
        };
        let name = &after[..close];
        if !allowed.contains(&name) {
            let known: Vec<String> = allowed.iter().map(|a| format!("{{{a}}}")).collect();
            return Err(format!(
                "unknown placeholder `{{{name}}}` in {s:?}: only {} is substituted here",
                known.join(", ")
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Builds an error at byte `offset` of `text`, naming the key on that line when there is one.
pub(crate) fn invalid(path: &Path, text: &str, offset: usize, message: String) -> ConfigError {
    let offset = offset.min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = text[line_start..offset].chars().count() + 1;
    let line_text = text[line_start..].lines().next().unwrap_or("");
    let key = match line_text.split_once('=') {
        Some((k, _)) if !k.trim().is_empty() && !k.trim_start().starts_with('#') => {
            format!("key `{}`: ", k.trim())
        }
        _ => String::new(),
    };
    ConfigError::Invalid {
        path: path.to_owned(),
        line,
        column,
        key,
        message: message.trim_end().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("t.toml"), t)
    }

    #[test]
    fn embedded_defaults() {
        let c = Config::embedded();
        assert_eq!(c.listeners.len(), 2);
        assert_eq!(c.listeners[0].bind, Some("127.0.0.1:1883".parse().unwrap()));
        assert_eq!(c.listeners[1].kind, ListenerKind::MqttSn);
        assert_eq!(c.listeners[1].bind, Some("127.0.0.1:1884".parse().unwrap()));
        assert_eq!(c.limits.max_inflight.get(), 100);
    }

    #[test]
    fn full_example() {
        let c = parse(
            r#"
[gateway]
id = "site-042"
data_dir = "/var/lib/outpost"

[[listener]]
kind = "mqtt"
bind = "127.0.0.1:1884"

[[listener]]
kind = "mqtt-sn"
bind = "127.0.0.1:1884"

[[listener]]
kind = "mqtt-sn-serial"
device = "/dev/ttyAMA0"
baud = 9600

[mqttsn]
gateway_id = 7
predefined = [{ id = 1, topic = "sensors/soil/moisture" }, { id = 1, topic = "x", client = "c1" }]
qos_minus_one_from = ["192.168.7.0/24"]
retry = { interval = "5s", count = 2 }
advertise = { address = "255.255.255.255:1884", interval = "15m" }
max_clients = 50

[limits]
max_packet_size = "256KiB"
connect_timeout = "5s"
max_keepalive = "60s"

[store]
synchronous = "normal"
commit_interval = "2ms"
max_bytes = "64MiB"
max_messages = 5000
max_age = "7d"
when_full = "block"
"#,
        )
        .unwrap();
        assert_eq!(c.gateway_id(), "site-042");
        assert_eq!(c.data_dir(), PathBuf::from("/var/lib/outpost"));
        assert_eq!(c.limits.max_packet_size.0, 256 * 1024);
        assert_eq!(c.limits.max_keepalive.0.as_secs(), 60);
        assert_eq!(c.store.synchronous, Synchronous::Normal);
        assert_eq!(c.store.when_full, WhenFull::Block);
        assert_eq!(c.store.max_bytes.0, 64 << 20);
        let sn = &c.mqttsn;
        assert_eq!((sn.gateway_id, sn.max_clients.get()), (7, 50));
        assert_eq!(sn.predefined[1].client.as_deref(), Some("c1"));
        assert!(sn.minus_one_allowed("192.168.7.3".parse().unwrap()));
        assert!(!sn.minus_one_allowed("192.168.6.3".parse().unwrap()));
        assert_eq!(sn.retry.interval.0.as_secs(), 5);
        assert_eq!(
            sn.advertise.as_ref().map(|a| a.interval.0.as_secs()),
            Some(900)
        );
        assert_eq!(c.listeners[2].baud, Some(9600));
    }

    #[test]
    fn serial_and_gpio() {
        let c = parse(
            r#"
[[serial]]
name = "ws1"
device = "/dev/serial/by-id/usb-FTDI_FT232R-if00-port0"
baud = 9600
parity = "even"
stop_bits = 2
framing = "lines"
decode = "kv"
topic = "sensors/{name}/{key}"
qos = 1
write_topic = "cmd/ws1"

[[serial]]
name = "probe"
device = "/dev/ttyUSB1"
framing = "len-crc16"
decode = "csv"
columns = ["moisture", "-", "temp"]

[[serial]]
name = "radio"
device = "/dev/ttyAMA0"
framing = "mqtt-sn"

[gpio]
[[gpio.input]]
chip = "pinctrl-bcm2711"
line = 17
bias = "pull-up"
edge = "both"
debounce = "20ms"
mode = "level"
topic = "io/door"
qos = 1
retain = true

[[gpio.input]]
chip = "/dev/gpiochip0"
line = 22
edge = "falling"
mode = "counter"
interval = "60s"
topic = "io/rain"

[[gpio.output]]
chip = "pinctrl-bcm2711"
line = 27
topic = "io/pump/set"
state_topic = "io/pump"
initial = "low"
"#,
        )
        .unwrap();
        assert_eq!(c.serial.len(), 3);
        assert_eq!(c.serial[0].parity, Parity::Even);
        assert_eq!(
            c.serial[0].template("g").unwrap().render(Some("T")),
            "sensors/ws1/T"
        );
        assert_eq!(c.serial[1].topic_template(), "sensors/{name}/{key}");
        assert!(c.serial[2].wire().is_none());
        let radio = c.listeners.last().unwrap();
        assert_eq!(radio.kind, ListenerKind::MqttSnSerial);
        assert_eq!(radio.device, Some(PathBuf::from("/dev/ttyAMA0")));
        assert_eq!(c.gpio.backend, GpioBackend::Linux);
        assert_eq!(c.gpio.input[1].mode, InputMode::Counter);
        assert_eq!(c.gpio.input[0].debounce.0.as_millis(), 20);
        assert_eq!(c.gpio.output[0].initial, Level::Low);
    }

    fn err(t: &str) -> String {
        parse(t).unwrap_err().to_string()
    }

    #[test]
    fn tls_websocket_and_mount_point_listeners() {
        let l = |body: &str| format!("[[listener]]\nbind = \"0.0.0.0:8883\"\n{body}");
        let e = err(&l("kind = \"mqtts\"\nallow_anonymous = true\n"));
        assert!(e.contains("needs `cert_file` and `key_file`"), "{e}");
        let e = err(&l(
            "kind = \"mqtt\"\nallow_anonymous = true\ncert_file = \"c\"\n",
        ));
        assert!(
            e.contains("are for mqtts and wss listeners, not mqtt"),
            "{e}"
        );
        let tls = "cert_file = \"c.pem\"\nkey_file = \"k.pem\"\n";
        let e = err(&l(&format!(
            "kind = \"wss\"\n{tls}use_identity_as_username = true\n"
        )));
        assert!(e.contains("need `client_ca`"), "{e}");
        let e = err(&l(&format!(
            "kind = \"mqtts\"\n{tls}client_ca = \"ca\"\nrequire_certificate = false\nuse_identity_as_username = true\n"
        )));
        assert!(
            e.contains("needs every client to show a certificate"),
            "{e}"
        );
        // Off loopback without a password file: only a certificate login makes sense.
        let e = err(&l(&format!("kind = \"mqtts\"\n{tls}client_ca = \"ca\"\n")));
        assert!(e.contains("nobody could log in"), "{e}");
        let c = parse(&l(&format!(
            "kind = \"mqtts\"\n{tls}client_ca = \"ca\"\nuse_identity_as_username = true\n"
        )))
        .unwrap();
        assert!(c.listeners[0].identity_is_username() && c.listeners[0].kind.is_tls());
        let c = parse(&l(
            "kind = \"ws\"\nallow_anonymous = true\nmount_point = \"site1/\"\n",
        ))
        .unwrap();
        assert_eq!(c.listeners[0].mount_point.as_deref(), Some("site1/"));
        assert!(c.listeners[0].kind.is_mqtt() && !c.listeners[0].kind.is_tls());
        let e = err(&l(
            "kind = \"mqtt\"\nallow_anonymous = true\nmount_point = \"a/#\"\n",
        ));
        assert!(e.contains("without wildcards"), "{e}");
        let e = err(&l(
            "kind = \"mqtt-sn\"\nallow_anonymous = true\nmount_point = \"a/\"\n",
        ));
        assert!(e.contains("`mount_point` is for"), "{e}");
        // Two TCP listeners of different kinds on one address still clash.
        let e = err("[[listener]]\nkind = \"mqtt\"\nbind = \"127.0.0.1:9\"\n[[listener]]\nkind = \"ws\"\nbind = \"127.0.0.1:9\"\n");
        assert!(e.contains("bound by two listeners"), "{e}");
    }

    #[test]
    fn errors_name_line_column_and_key() {
        let e = err("[gateway]\nid = \"x\"\nfoo = 1\n");
        assert!(
            e.starts_with("t.toml:3:1: key `foo`: unknown field `foo`"),
            "{e}"
        );
        let e = err("[[listener]]\nkind = \"mqtt\"\nbind = \"nonsense\"\n");
        assert!(e.starts_with("t.toml:3:8: key `bind`:"), "{e}");
        let e = err("[limits]\nconnect_timeout = \"10 parsecs\"\n");
        assert!(e.starts_with("t.toml:2:19: key `connect_timeout`:"), "{e}");
        let e = err("[limits]\nmax_inflight = 0\n");
        assert!(e.starts_with("t.toml:2:16: key `max_inflight`:"), "{e}");
        let e = err("[[listener]]\nkind = \"carrier-pigeon\"\nbind = \"127.0.0.1:1\"\n");
        assert!(e.contains("t.toml:2:8: key `kind`: unknown variant"), "{e}");
        let e = err("[limits]\nmax_packet_size = \"1B\"\n");
        assert!(e.starts_with("t.toml:2:1: key `max_packet_size`:"), "{e}");
        let e = err("[store]\nwhen_full = \"panic\"\n");
        assert!(
            e.starts_with("t.toml:2:13: key `when_full`: unknown variant `panic`"),
            "{e}"
        );
        let e = err("[[listener]]\nkind = \"mqtt-sn\"\n");
        assert!(
            e.starts_with("t.toml:2:8:") && e.contains("needs `bind`"),
            "{e}"
        );
        let e = err("[[listener]]\nkind = \"mqtt-sn-serial\"\nbaud = 9600\n");
        assert!(e.contains("needs `device`"), "{e}");
        let e = err("[mqttsn]\npredefined = [{ id = 0, topic = \"a\" }]\n");
        assert!(
            // At the `id` inside the entry, not at the start of the line.
            e.starts_with("t.toml:2:17: key `predefined`: id 0 is reserved"),
            "{e}"
        );
        let e = err("[mqttsn]\npredefined = [{ id = 3, topic = \"a/#\" }]\n");
        assert!(e.contains("key `predefined`"), "{e}");
        let e = err("[mqttsn]\nqos_minus_one_from = [\"10.0.0.0/40\"]\n");
        assert!(
            e.contains("key `qos_minus_one_from`") && e.contains("prefix"),
            "{e}"
        );
        let e = err("[mqttsn]\nretry = { interval = \"0s\", count = 3 }\n");
        assert!(e.contains("key `retry`"), "{e}");
        let e = err("[[serial]]\nname = \"a\"\ndevice = \"/dev/x\"\ndecode = \"kv\"\ntopic = \"s/{name}\"\n");
        assert!(
            e.starts_with("t.toml:5:1: key `topic`:") && e.contains("{key}"),
            "{e}"
        );
        let e = err("[[serial]]\nname = \"a\"\ndevice = \"/dev/x\"\n[[serial]]\nname = \"b\"\ndevice = \"/dev/y\"\ndecode = \"csv\"\n");
        assert!(
            e.starts_with("t.toml:4:1:") && e.contains("csv needs"),
            "{e}"
        );
        let e = err("[[serial]]\nname = \"a\"\ndevice = \"/dev/x\"\ntopic = \"s/{nope}\"\n");
        assert!(e.contains("unknown placeholder"), "{e}");
        let e = err("[[serial]]\nname = \"a\"\ndevice = \"/dev/x\"\nframing = \"morse\"\n");
        assert!(
            e.starts_with("t.toml:4:11: key `framing`: unknown variant"),
            "{e}"
        );
        let e = err("[[serial]]\nname = \"a\"\ndevice = \"/dev/x\"\n[[serial]]\nname = \"a\"\ndevice = \"/dev/y\"\n");
        assert!(e.contains("used twice"), "{e}");
        let e = err("[gpio]\nbackend = \"simulated\"\n");
        assert!(e.contains("sim_dir"), "{e}");
        let e = err("[[gpio.output]]\nchip = \"c\"\nline = 1\ntopic = \"a\"\n[[gpio.input]]\nchip = \"c\"\nline = 1\ntopic = \"b\"\n");
        assert!(e.contains("configured twice"), "{e}");
        let e = err("[[gpio.input]]\nchip = \"c\"\nline = 1\ntopic = \"a/+\"\n");
        assert!(e.contains("key `topic`"), "{e}");
        let e = err("[[listener]]\nkind = \"mqtt\"\nbind = \"0.0.0.0:1883\"\n");
        assert!(
            e.starts_with("t.toml:1:1:") && e.contains("nobody could log in"),
            "{e}"
        );
        let e = err(
            "[[listener]]\nkind = \"mqtt\"\nbind = \"127.0.0.1:1883\"\nallow_anonymous = false\n",
        );
        assert!(
            e.starts_with("t.toml:4:1:") && e.contains("password_file"),
            "{e}"
        );
        let e = err("[[listener]]\nkind = \"mqtt-sn\"\nbind = \"0.0.0.0:1884\"\n");
        assert!(e.contains("MQTT-SN has no passwords"), "{e}");
        // Written explicitly, an open listener is taken as meant.
        let open = parse("[[listener]]\nkind = \"mqtt\"\nbind = \"0.0.0.0:1883\"\nallow_anonymous = true\n[[listener]]\nkind = \"mqtt-sn\"\nbind = \"0.0.0.0:1884\"\nallow_anonymous = true\n").unwrap();
        assert!(open.listeners[0].allows_anonymous());
        let closed = parse("[auth]\npassword_file = \"/etc/outpost/passwd\"\n[[listener]]\nkind = \"mqtt\"\nbind = \"0.0.0.0:1883\"\n").unwrap();
        assert!(!closed.listeners[0].allows_anonymous());
        let e = err("this is not toml");
        assert!(e.starts_with("t.toml:1:"), "{e}");
        // Issue 19: a key's position came from the first match anywhere in the text: a
        // comment, or `id` inside `client_id`. It is the key's own span now.
        let e = err("# id = \"x\"\n[uplink]\nurl = \"mqtt://h\"\nclient_id = \"c\"\n[gateway]\nid = \"a/b\"\n");
        assert!(
            e.starts_with("t.toml:6:1: key `id`: must be non-empty"),
            "{e}"
        );
        let e = err("[store]\n# max_messages here is a comment\nmax_bytes = 0\n");
        assert!(e.starts_with("t.toml:3:1: key `max_bytes`:"), "{e}");
        let e = err("[[serial]]\nname = \"a\"\ndevice = \"/dev/x\"\n[[serial]]\nname = \"b\"\ndevice = \"/dev/y\"\nbaud = 0\n");
        assert!(e.starts_with("t.toml:7:1: key `baud`:"), "{e}");
        let e = err(
            "[[listener]]\nkind=\"mqtt\"\nbind=\"127.0.0.1:5\"\n[[listener]]\nkind=\"mqtt\"\nbind=\"127.0.0.1:5\"\n",
        );
        // At the value, as the parser's own errors point (the opening quote).
        assert!(e.starts_with("t.toml:6:6:"), "{e}");
        // Issue 19: accepted before, and wrong.
        let e = err("[uplink]\nurl = \"mqtt://h\"\nclient_id = \"{site}-1\"\n");
        assert!(
            e.starts_with("t.toml:3:1: key `client_id`: unknown placeholder `{site}`"),
            "{e}"
        );
        let e = err("[uplink]\nurl = \"mqtts://site:secret@cloud:8883\"\n");
        assert!(
            e.contains("key `url`") && e.contains("`username` and `password_file`"),
            "{e}"
        );
        assert!(!e.contains("secret"), "the password is not echoed: {e}");
        let e = err("[gateway]\ndata_dir = \"\"\n");
        assert!(
            e.starts_with("t.toml:2:1: key `data_dir`: must not be empty"),
            "{e}"
        );
        // A byte-order mark is not part of the first key.
        let e = err("\u{feff}[limits]\nmax_inflight = 0\n");
        assert!(e.starts_with("t.toml:2:16: key `max_inflight`:"), "{e}");
        let e = err("\u{feff}max_inflight = 0\n");
        assert!(e.starts_with("t.toml:1:1: key `max_inflight`:"), "{e}");
        assert!(parse("\u{feff}[gateway]\nid = \"a\"\n").is_ok());
    }
}
