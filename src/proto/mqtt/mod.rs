//! MQTT 3.1, 3.1.1 and 5.0, sans-IO.
//!
//! Owns the strict codec (`decode`, `encode`), the packet model (`packet`), the broker-side
//! connection machine (`server`) and the client session the uplink drives (`client`). Nothing here touches a socket, a runtime or a clock: bytes and
//! `Instant`s are handed in, packets and events come out.

pub mod client;
pub mod decode;
pub mod encode;
pub mod mount;
pub mod packet;
pub mod server;

#[cfg(test)]
mod tests;

pub use decode::decode;
pub use encode::{encode, encoded_len};
pub use packet::*;

use thiserror::Error;

/// A packet that breaks the spec. Each variant knows the reaction the spec asks for.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The bytes do not form a valid packet (v5 reason 0x81; 3.x: close).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// A well-formed packet that the protocol forbids here (v5 reason 0x82; 3.x: close).
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// Larger than the negotiated Maximum Packet Size (v5 reason 0x95).
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    TooLarge {
        /// Size the packet announced, fixed header included.
        size: u64,
        /// The limit in force.
        max: u32,
    },
    /// CONNECT named a protocol level we do not speak (CONNACK 0x84, or 0x01 before v5).
    #[error("unsupported protocol level {0}")]
    UnsupportedProtocolVersion(u8),
    /// CONNECT's protocol name is neither "MQTT" nor "MQIsdp": not MQTT at all, close silently.
    #[error("unknown protocol name")]
    BadProtocolName,
    /// A topic name with wildcards, or empty without a topic alias (v5 reason 0x90).
    #[error("invalid topic name")]
    TopicNameInvalid,
    /// A topic filter that breaks the wildcard rules (v5 reason 0x8F).
    #[error("invalid topic filter")]
    TopicFilterInvalid,
    /// A topic alias of 0, above our maximum, or unknown (v5 reason 0x94).
    #[error("invalid topic alias")]
    TopicAliasInvalid,
}

impl DecodeError {
    /// The v5 reason code for a DISCONNECT (or CONNACK) that reports this error.
    pub fn reason_code(&self) -> u8 {
        match self {
            DecodeError::Malformed(_) => reason::MALFORMED_PACKET,
            DecodeError::Protocol(_) => reason::PROTOCOL_ERROR,
            DecodeError::TooLarge { .. } => reason::PACKET_TOO_LARGE,
            DecodeError::UnsupportedProtocolVersion(_) | DecodeError::BadProtocolName => {
                reason::UNSUPPORTED_PROTOCOL_VERSION
            }
            DecodeError::TopicNameInvalid => reason::TOPIC_NAME_INVALID,
            DecodeError::TopicFilterInvalid => reason::TOPIC_FILTER_INVALID,
            DecodeError::TopicAliasInvalid => reason::TOPIC_ALIAS_INVALID,
        }
    }
}
