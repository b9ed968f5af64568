//! Protocol logic, sans-IO: no sockets, no runtime, no clock. Time is an argument.
//!
//! - `topic`: topic names and filters.
//! - `mqtt`: the strict MQTT codec, the broker-side connection machine, and the client session
//!   machine for the uplink.
//! - `mqttsn`: MQTT-SN 1.2: codec, gateway machine, serial framing.
//! - `frames`: sensor frames on serial lines: framings and decoders.

pub mod frames;
pub mod mqtt;
pub mod mqttsn;
pub mod topic;
