//! outpost: a field gateway for remote sites.
//!
//! An embedded MQTT broker (3.1, 3.1.1 and 5.0) for the site's local devices, a durable SQLite
//! store, a store-and-forward uplink to a cloud broker, an MQTT-SN gateway, sensor serial ports
//! and GPIO pins. See `ARCHITECTURE.md` for the data flows and the durability contract.
//!
//! # Layout
//! - [`auth`] — password and ACL files in mosquitto's formats.
//! - [`bridge`] — the uplink's sans-IO parts: bridge rules, outbox cursors, backoff and rate.
//! - [`config`] — `outpost.toml` as serde structs, defaults, file:line:col errors.
//! - [`proto`] — sans-IO protocol machines. [`proto::topic`] holds topic rules;
//!   [`proto::mqtt`] the strict codec, the broker-side connection machine and the upstream
//!   client session; [`proto::mqttsn`] MQTT-SN; [`proto::frames`] serial framings and decoders.
//! - [`hub`] — the one router: sessions, subscription tree, retained index, wills, expiry;
//!   [`hub::local`] the in-process sessions of serial ports and GPIO pins.
//! - [`hw`] — GPIO lines behind a trait (Linux via gpiocdev, and a simulator), and the sans-IO
//!   pin logic (debounce, counters, output commands).
//! - [`store`] — the one SQLite store, with group commit.
//! - [`io`] — adapters, the only code that touches sockets and devices: the hub task, the MQTT
//!   listener, the MQTT-SN transports, serial ports, GPIO, the uplink driver and its TLS.
//! - [`server`] — wires config, hub and listeners together and runs until shutdown.
//! - [`telemetry`] — tracing to the journal or stderr.
//! - [`systemd`] — sd-notify.

pub mod auth;
pub mod bridge;
pub mod config;
pub mod hub;
pub mod hw;
pub mod io;
pub mod proto;
pub mod server;
pub mod status;
pub mod store;
pub mod systemd;
pub mod telemetry;
