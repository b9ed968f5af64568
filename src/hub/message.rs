//! The one message type every source produces and every destination consumes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::proto::mqtt::{Props, Publish, QoS};

/// Where a message came from. Used for No Local and for logs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A local MQTT client, by client id.
    Client(Arc<str>),
    /// A will published on behalf of a client that is gone.
    Will(Arc<str>),
    /// Read back from the store after a restart; who published it is not kept.
    Restored,
    /// Came down from the cloud broker: never sent back up.
    Uplink,
    /// Published by outpost itself ($SYS): never sent up.
    System,
    /// An MQTT-SN QoS -1 publish: no connection, no client id.
    Unconnected,
}

impl Origin {
    /// The client id behind the message, if any.
    pub fn client(&self) -> Option<&str> {
        match self {
            Origin::Client(c) => Some(c),
            Origin::Will(_)
            | Origin::Restored
            | Origin::Uplink
            | Origin::System
            | Origin::Unconnected => None,
        }
    }
}

/// One application message inside the hub. Shared by `Arc` across every subscriber it reaches.
#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// The v5 properties that travel with the message end to end: payload format, content type,
    /// response topic, correlation data and user properties. Per-hop properties (topic alias,
    /// subscription identifiers, expiry) are never stored here.
    pub properties: Props,
    pub origin: Origin,
    pub received_at: Instant,
    /// From Message Expiry Interval; a message still queued after this is discarded.
    pub expires_at: Option<Instant>,
}

impl Message {
    /// The message a PUBLISH carries, received `now`: its end-to-end properties kept and its
    /// expiry started.
    pub fn from_publish(p: Publish, origin: Origin, now: Instant) -> Arc<Message> {
        let (properties, expires_at) = end_to_end(p.properties, now);
        Arc::new(Message {
            topic: p.topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            origin,
            received_at: now,
            expires_at,
        })
    }

    /// True once `now` is past the message's expiry.
    pub fn expired(&self, now: Instant) -> bool {
        self.expires_at.is_some_and(|e| now >= e)
    }

    /// Seconds left before expiry, rounded up, for the Message Expiry Interval sent onwards.
    pub fn remaining_expiry(&self, now: Instant) -> Option<u32> {
        self.expires_at.map(|e| {
            let left = e.saturating_duration_since(now);
            let secs = left.as_secs() + u64::from(left.subsec_nanos() > 0);
            secs.min(u32::MAX as u64) as u32
        })
    }
}

/// Splits a PUBLISH's or will's properties into what travels end to end and the instant the
/// message expires. Per-hop properties (topic alias, will delay, subscription identifiers) are
/// dropped; the set is only written to when one is present, so an empty set stays unallocated.
pub fn end_to_end(mut props: Props, now: Instant) -> (Props, Option<Instant>) {
    let expires_at = props
        .message_expiry_interval
        .map(|s| now + Duration::from_secs(s as u64));
    if props.is_empty() {
        return (props, None);
    }
    let p = &mut *props;
    p.message_expiry_interval = None;
    p.topic_alias = None;
    p.will_delay_interval = None;
    p.subscription_identifiers.clear();
    (props, expires_at)
}
