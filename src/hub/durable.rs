//! What the hub needs from durable storage, and the conversions between hub messages and store
//! rows. A trait keeps the hub sans-IO: the runtime implements it over `store::Store`, tests
//! over a real store in a temporary directory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::message::{Message, Origin};
use crate::proto::mqtt::{decode::stored_properties, encode::properties_bytes, QoS, Will};
use crate::store::{Dest, NewMessage, Op, StoredMessage, StoredRetained};

/// Durable storage as the hub uses it.
pub trait Durable: Send {
    /// Queues `ops` for commit. `token` is handed back with `HubInput::Committed` once they have
    /// committed (or failed); token 0 asks for no answer.
    fn submit(&mut self, token: u64, ops: Vec<Op>);
    /// Up to `limit` committed messages queued for `client` with ids above `after`, in order.
    fn read_queue(&mut self, client: &str, after: i64, limit: usize) -> Vec<StoredMessage>;
}

/// Converts between the hub's monotonic clock and the Unix milliseconds the store keeps.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    mono: Instant,
    unix_ms: i64,
}

impl Clock {
    /// Pins `mono` to `unix_ms`; the runtime reads both once at startup.
    pub fn new(mono: Instant, unix_ms: i64) -> Self {
        Clock { mono, unix_ms }
    }

    /// How far `unix_ms`, read from the wall clock at `now`, is from what this clock says:
    /// positive when the wall clock jumped ahead.
    pub fn drift(&self, now: Instant, unix_ms: i64) -> i64 {
        unix_ms - self.unix_ms(now)
    }

    /// Unix milliseconds at `now`.
    pub fn unix_ms(&self, now: Instant) -> i64 {
        match now.checked_duration_since(self.mono) {
            Some(d) => self.unix_ms + d.as_millis().min(i64::MAX as u128 / 2) as i64,
            None => self.unix_ms - self.mono.duration_since(now).as_millis() as i64,
        }
    }

    /// The `Instant` that corresponds to `unix_ms` (saturating at `now` for the past).
    pub fn instant(&self, unix_ms: i64, now: Instant) -> Instant {
        let now_ms = self.unix_ms(now);
        if unix_ms <= now_ms {
            now
        } else {
            now + Duration::from_millis((unix_ms - now_ms) as u64)
        }
    }
}

/// The row for one delivery of `msg` to a persistent session.
pub fn session_row(
    client: &str,
    msg: &Message,
    qos: QoS,
    retain: bool,
    sub_ids: &[u32],
    clock: &Clock,
) -> NewMessage {
    let dest = Dest::Session(client.to_owned());
    row(dest, msg.topic.clone(), msg, qos, retain, sub_ids, clock)
}

/// The outbox class of bridge priority `priority`: lower drains first.
pub fn outbox_dest(priority: u8) -> Dest {
    Dest::Outbox(format!("p{priority:03}"))
}

/// The outbox row for `msg`, renamed to its upstream `topic`.
pub fn outbox_row(
    priority: u8,
    topic: String,
    msg: &Message,
    qos: QoS,
    retain: bool,
    clock: &Clock,
) -> NewMessage {
    row(outbox_dest(priority), topic, msg, qos, retain, &[], clock)
}

fn row(
    dest: Dest,
    topic: String,
    msg: &Message,
    qos: QoS,
    retain: bool,
    sub_ids: &[u32],
    clock: &Clock,
) -> NewMessage {
    let mut ids = Vec::with_capacity(sub_ids.len() * 4);
    for id in sub_ids {
        ids.extend_from_slice(&id.to_le_bytes());
    }
    NewMessage {
        dest,
        topic,
        payload: msg.payload.clone(),
        qos: qos as u8,
        retain,
        props: Bytes::from(properties_bytes(&msg.properties)),
        sub_ids: Bytes::from(ids),
        received_ms: clock.unix_ms(msg.received_at),
        expires_ms: msg.expires_at.map(|e| clock.unix_ms(e)),
    }
}

/// A stored delivery back as a message. `None` for a row that no longer decodes, which only
/// a damaged or hand-edited database can hold; the caller drops it.
pub fn from_row(
    row: &StoredMessage,
    clock: &Clock,
    now: Instant,
) -> Option<(Arc<Message>, QoS, Vec<u32>)> {
    let m = &row.msg;
    let qos = QoS::from_bits(m.qos)?;
    let properties = stored_properties(&m.props).ok()?;
    let sub_ids = m
        .sub_ids
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let msg = Message {
        topic: m.topic.clone(),
        payload: m.payload.clone(),
        qos,
        retain: m.retain,
        properties,
        origin: Origin::Restored,
        received_at: now,
        expires_at: m.expires_ms.map(|e| clock.instant(e, now)),
    };
    Some((Arc::new(msg), qos, sub_ids))
}

/// The retained row for `msg`.
pub fn retained_row(msg: &Message, clock: &Clock) -> StoredRetained {
    StoredRetained {
        topic: msg.topic.clone(),
        payload: msg.payload.clone(),
        qos: msg.qos as u8,
        props: Bytes::from(properties_bytes(&msg.properties)),
        received_ms: clock.unix_ms(msg.received_at),
        expires_ms: msg.expires_at.map(|e| clock.unix_ms(e)),
    }
}

/// A retained row back as a message.
pub fn from_retained(r: &StoredRetained, clock: &Clock, now: Instant) -> Option<Arc<Message>> {
    Some(Arc::new(Message {
        topic: r.topic.clone(),
        payload: r.payload.clone(),
        qos: QoS::from_bits(r.qos)?,
        retain: true,
        properties: stored_properties(&r.props).ok()?,
        origin: Origin::Restored,
        received_at: now,
        expires_at: r.expires_ms.map(|e| clock.instant(e, now)),
    }))
}

/// A will as the session row keeps it: flags, topic, payload, then the will properties.
/// `None` for a topic over 65,535 bytes, which the hub refuses before any will gets here: a
/// clipped length would read back as another will.
pub fn encode_will(w: &Will) -> Option<Bytes> {
    let topic_len = u16::try_from(w.topic.len()).ok()?;
    let mut out = Vec::with_capacity(7 + w.topic.len() + w.payload.len());
    out.push(w.qos as u8 | (w.retain as u8) << 2);
    out.extend_from_slice(&topic_len.to_be_bytes());
    out.extend_from_slice(w.topic.as_bytes());
    out.extend_from_slice(&(w.payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&w.payload);
    out.extend_from_slice(&properties_bytes(&w.properties));
    Some(Bytes::from(out))
}

/// Reads back `encode_will`; `None` for bytes it did not write.
pub fn decode_will(b: &[u8]) -> Option<Will> {
    let (&flags, rest) = b.split_first()?;
    let (tl, rest) = rest.split_at_checked(2)?;
    let (topic, rest) = rest.split_at_checked(u16::from_be_bytes([tl[0], tl[1]]) as usize)?;
    let (pl, rest) = rest.split_at_checked(4)?;
    let (payload, props) =
        rest.split_at_checked(u32::from_be_bytes([pl[0], pl[1], pl[2], pl[3]]) as usize)?;
    Some(Will {
        topic: std::str::from_utf8(topic).ok()?.to_owned(),
        payload: Bytes::copy_from_slice(payload),
        qos: QoS::from_bits(flags & 3)?,
        retain: flags & 4 != 0,
        properties: stored_properties(props).ok()?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::mqtt::Properties;

    #[test]
    fn will_round_trip() {
        let w = Will {
            topic: "wills/é".into(),
            payload: Bytes::from_static(b"\x00gone"),
            qos: QoS::ExactlyOnce,
            retain: true,
            properties: Properties {
                will_delay_interval: Some(30),
                content_type: Some("text".into()),
                ..Properties::default()
            }
            .into(),
        };
        assert_eq!(decode_will(&encode_will(&w).unwrap()), Some(w));
        assert_eq!(decode_will(b"\x01\x00\x09short"), None);
        assert_eq!(decode_will(b""), None);
    }

    #[test]
    fn clock_maps_both_ways() {
        let t0 = Instant::now();
        let c = Clock::new(t0, 1_000_000);
        assert_eq!(c.unix_ms(t0 + Duration::from_millis(250)), 1_000_250);
        assert_eq!(c.instant(1_002_000, t0), t0 + Duration::from_secs(2));
        assert_eq!(c.instant(10, t0), t0, "the past maps to now");
    }
}
