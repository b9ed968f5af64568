//! MQTT-SN 1.2, sans-IO. So far the codec (`codec`): every message type of the
//! specification, strict decoding, and the encoder. The gateway machine comes with issue 5.

pub mod codec;

#[cfg(test)]
mod tests;

pub use codec::{decode, encode, DecodeError, Flags, Message, SnQos, TopicRef};
