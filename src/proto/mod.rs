//! Protocol logic, sans-IO: no sockets, no runtime, no clock. Time is an argument.
//!
//! - `topic`: topic names and filters.
//! - `mqtt`: the strict MQTT codec and the broker-side connection machine.

pub mod mqtt;
pub mod topic;
