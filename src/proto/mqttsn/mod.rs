//! MQTT-SN 1.2, sans-IO: the codec (`codec`: every message type, strict decoding, the
//! encoder), the gateway machine (`gateway`) and the serial framing (`serial`).

pub mod codec;
pub mod gateway;
pub mod serial;

#[cfg(test)]
mod tests;

pub use codec::{decode, encode, DecodeError, Flags, Message, SnQos, TopicRef};
