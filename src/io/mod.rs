//! Adapters: the only code that touches sockets and devices. Each one reads bytes, hands them to a sans-IO
//! machine with the current time, and writes what the machine asks for.
//!
//! - `clock`: the wall clock (Unix time, and whether the kernel says it is synchronised).
//! - `control`: the Unix control socket `outpost status` reads the report from.
//! - `hub_task`: the tokio task that owns the `Hub`, and the bounded links to connections.
//! - `mqtt_listener`: TCP accept loop and one task per MQTT connection.
//! - `mqttsn`: the MQTT-SN gateway's driver over any datagram transport; `mqttsn_udp` and
//!   `mqttsn_serial` are the transports.
//! - `serial`: sensor ports (tokio-serial): frames in, messages out, write topics back.
//! - `gpio`: GPIO inputs and outputs over the `hw` backends.
//! - `local`: the bounded hub link of an in-process client (a serial port, the GPIO pins).
//! - `store_link`: the hub's `Durable` over the SQLite store, and commit completions.
//! - `uplink`: the connection to the cloud broker, driving `proto::mqtt::client`.
//! - `tls`: rustls client setup for the uplink.
//! - `ws`: MQTT over WebSocket for the uplink.

pub mod clock;
pub mod control;
pub mod gpio;
pub mod hub_task;
pub mod local;
pub mod mqtt_listener;
pub mod mqttsn;
pub mod mqttsn_serial;
pub mod mqttsn_udp;
pub mod serial;
pub mod store_link;
pub mod tls;
pub mod uplink;
pub mod ws;

use tokio::time::Instant;

/// Sleeps until `at`, or for ever when there is no deadline: the shape every adapter needs
/// for a sans-IO machine's `poll_timeout`.
pub(crate) async fn sleep_until_opt(at: Option<Instant>) {
    match at {
        Some(t) => tokio::time::sleep_until(t).await,
        None => std::future::pending().await,
    }
}
