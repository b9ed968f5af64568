//! outpost: a field gateway for remote sites.
//!
//! An embedded MQTT broker (3.1, 3.1.1 and 5.0) for the site's local devices, built so that an
//! MQTT-SN gateway, serial and GPIO sources, a durable SQLite store and a store-and-forward
//! uplink can stand on it. See `ARCHITECTURE.md` for the data flows and the durability contract.
//!
//! # Layout
//! - [`bridge`] — bridge rules for the uplink (the uplink driver comes with issue 4).
//! - [`config`] — `outpost.toml` as serde structs, defaults, file:line:col errors.
//! - [`proto`] — sans-IO protocol machines. [`proto::topic`] holds topic rules;
//!   [`proto::mqtt`] the strict codec, the broker-side connection machine and the upstream
//!   client session.
//! - [`hub`] — the one router: sessions, subscription tree, retained index, wills, expiry.
//! - [`io`] — adapters, the only code that touches sockets: the hub task and the MQTT listener.
//! - [`server`] — wires config, hub and listeners together and runs until shutdown.
//! - [`telemetry`] — tracing to the journal or stderr.
//! - [`systemd`] — sd-notify.

pub mod bridge;
pub mod config;
pub mod hub;
pub mod io;
pub mod proto;
pub mod server;
pub mod store;
pub mod systemd;
pub mod telemetry;
