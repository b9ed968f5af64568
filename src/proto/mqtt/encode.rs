//! The encoder: one `Packet` to bytes for a given protocol level, plus exact sizes so callers
//! can honour a peer's Maximum Packet Size before encoding.

use super::packet::*;

/// Why a packet cannot be put on the wire. Nothing is written: a length that does not fit
/// its field would make the peer read a different packet (a shorter topic, the rest taken
/// as packet id and payload).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A string or binary field (a topic, a client id, a property) is over 65,535 bytes.
    #[error("a string or binary field is longer than 65535 bytes")]
    FieldTooLong,
    /// The remaining length is over what four length bytes can say.
    #[error("the packet is longer than MQTT's 268435455-byte limit")]
    PacketTooLong,
}

/// The largest remaining length a fixed header can carry.
const MAX_BODY: usize = 268_435_455;

/// Whether `packet` can be encoded for `v`: every field within its length prefix, the whole
/// within the remaining-length limit.
pub fn encodable(packet: &Packet, v: Version) -> Result<(), EncodeError> {
    let (_, body) = header(packet, v);
    if body > MAX_BODY {
        return Err(EncodeError::PacketTooLong);
    }
    let short = |n: usize| n <= u16::MAX as usize;
    let s = |o: &Option<String>| o.as_ref().map_or(true, |x| short(x.len()));
    let b = |o: &Option<bytes::Bytes>| o.as_ref().map_or(true, |x| short(x.len()));
    let props = |p: &Properties| {
        !v.is_v5()
            || (s(&p.content_type)
                && s(&p.response_topic)
                && b(&p.correlation_data)
                && s(&p.assigned_client_identifier)
                && s(&p.authentication_method)
                && b(&p.authentication_data)
                && s(&p.response_information)
                && s(&p.server_reference)
                && s(&p.reason_string)
                && p.user_properties
                    .iter()
                    .all(|(k, x)| short(k.len()) && short(x.len())))
    };
    let fine = match packet {
        Packet::Connect(c) => {
            short(c.client_id.len())
                && props(&c.properties)
                && c.will.as_ref().map_or(true, |w| {
                    short(w.topic.len()) && short(w.payload.len()) && props(&w.properties)
                })
                && c.username.as_ref().map_or(true, |u| short(u.len()))
                && c.password.as_ref().map_or(true, |p| short(p.len()))
        }
        Packet::Publish(p) => short(p.topic.len()) && props(&p.properties),
        Packet::Subscribe(x) => {
            x.filters.iter().all(|(f, _)| short(f.len())) && props(&x.properties)
        }
        Packet::Unsubscribe(u) => u.filters.iter().all(|f| short(f.len())) && props(&u.properties),
        Packet::ConnAck(a) => props(&a.properties),
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            props(&a.properties)
        }
        Packet::SubAck(x) => props(&x.properties),
        Packet::UnsubAck(u) => props(&u.properties),
        Packet::Disconnect(d) => props(&d.properties),
        Packet::Auth(a) => props(&a.properties),
        Packet::PingReq | Packet::PingResp => true,
    };
    if fine {
        Ok(())
    } else {
        Err(EncodeError::FieldTooLong)
    }
}

/// Appends the encoding of `packet` for protocol level `v` to `out`, or, when it cannot be
/// encoded (`encodable`), appends nothing and says why.
///
/// Fields that `v` cannot carry (properties before v5, reason codes on 3.x acks) are left out;
/// the caller has already decided what the peer should see.
pub fn encode(packet: &Packet, v: Version, out: &mut Vec<u8>) -> Result<(), EncodeError> {
    encodable(packet, v)?;
    let (first, body_len) = header(packet, v);
    out.reserve(5 + body_len);
    out.push(first);
    put_varint(out, body_len as u32);
    let start = out.len();
    body(packet, v, out);
    debug_assert_eq!(out.len() - start, body_len, "{}", packet.name());
    Ok(())
}

/// The total encoded size of `packet`, fixed header included.
pub fn encoded_len(packet: &Packet, v: Version) -> usize {
    let (_, body) = header(packet, v);
    1 + varint_len(body as u32) + body
}

fn header(packet: &Packet, v: Version) -> (u8, usize) {
    let v5 = v.is_v5();
    let props = |p: &Properties| if v5 { with_len(properties_len(p)) } else { 0 };
    match packet {
        Packet::Connect(c) => {
            let name = if c.version == Version::V31 { 6 } else { 4 };
            let mut n = 2 + name + 1 + 1 + 2 + props(&c.properties) + 2 + c.client_id.len();
            if let Some(w) = &c.will {
                n += props(&w.properties) + 2 + w.topic.len() + 2 + w.payload.len();
            }
            n += c.username.as_ref().map_or(0, |u| 2 + u.len());
            n += c.password.as_ref().map_or(0, |p| 2 + p.len());
            (0x10, n)
        }
        Packet::ConnAck(a) => (0x20, 2 + props(&a.properties)),
        Packet::Publish(p) => {
            let flags = (p.dup as u8) << 3 | (p.qos as u8) << 1 | p.retain as u8;
            let id = if p.qos == QoS::AtMostOnce { 0 } else { 2 };
            (
                0x30 | flags,
                2 + p.topic.len() + id + props(&p.properties) + p.payload.len(),
            )
        }
        Packet::PubAck(a) => (0x40, ack_len(a, v5)),
        Packet::PubRec(a) => (0x50, ack_len(a, v5)),
        Packet::PubRel(a) => (0x62, ack_len(a, v5)),
        Packet::PubComp(a) => (0x70, ack_len(a, v5)),
        Packet::Subscribe(s) => {
            let f: usize = s.filters.iter().map(|(f, _)| 2 + f.len() + 1).sum();
            (0x82, 2 + props(&s.properties) + f)
        }
        Packet::SubAck(s) => (0x90, 2 + props(&s.properties) + s.codes.len()),
        Packet::Unsubscribe(u) => {
            let f: usize = u.filters.iter().map(|f| 2 + f.len()).sum();
            (0xA2, 2 + props(&u.properties) + f)
        }
        Packet::UnsubAck(u) => {
            let extra = if v5 {
                props(&u.properties) + u.codes.len()
            } else {
                0
            };
            (0xB0, 2 + extra)
        }
        Packet::PingReq => (0xC0, 0),
        Packet::PingResp => (0xD0, 0),
        Packet::Disconnect(d) => (0xE0, reason_len(d.reason, &d.properties, v5)),
        Packet::Auth(a) => (0xF0, reason_len(a.reason, &a.properties, v5)),
    }
}

/// v5 lets a reason code of 0 with no properties be left out entirely.
fn reason_len(reason: u8, p: &Properties, v5: bool) -> usize {
    if !v5 || (reason == 0 && p.is_empty()) {
        0
    } else if p.is_empty() {
        1
    } else {
        1 + with_len(properties_len(p))
    }
}

fn ack_len(a: &Ack, v5: bool) -> usize {
    2 + reason_len(a.reason, &a.properties, v5)
}

fn body(packet: &Packet, v: Version, out: &mut Vec<u8>) {
    let v5 = v.is_v5();
    match packet {
        Packet::Connect(c) => {
            if c.version == Version::V31 {
                put_bytes(out, b"MQIsdp");
            } else {
                put_bytes(out, b"MQTT");
            }
            out.push(c.version.level());
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | (w.qos as u8) << 3;
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            out.push(flags);
            out.extend_from_slice(&c.keep_alive.to_be_bytes());
            if v5 {
                put_properties(out, &c.properties);
            }
            put_bytes(out, c.client_id.as_bytes());
            if let Some(w) = &c.will {
                if v5 {
                    put_properties(out, &w.properties);
                }
                put_bytes(out, w.topic.as_bytes());
                put_bytes(out, &w.payload);
            }
            if let Some(u) = &c.username {
                put_bytes(out, u.as_bytes());
            }
            if let Some(p) = &c.password {
                put_bytes(out, p);
            }
        }
        Packet::ConnAck(a) => {
            out.push(a.session_present as u8);
            out.push(a.code);
            if v5 {
                put_properties(out, &a.properties);
            }
        }
        Packet::Publish(p) => {
            put_bytes(out, p.topic.as_bytes());
            if p.qos != QoS::AtMostOnce {
                out.extend_from_slice(&p.packet_id.to_be_bytes());
            }
            if v5 {
                put_properties(out, &p.properties);
            }
            out.extend_from_slice(&p.payload);
        }
        Packet::PubAck(a) | Packet::PubRec(a) | Packet::PubRel(a) | Packet::PubComp(a) => {
            out.extend_from_slice(&a.packet_id.to_be_bytes());
            put_reason(out, a.reason, &a.properties, v5);
        }
        Packet::Subscribe(s) => {
            out.extend_from_slice(&s.packet_id.to_be_bytes());
            if v5 {
                put_properties(out, &s.properties);
            }
            for (f, o) in &s.filters {
                put_bytes(out, f.as_bytes());
                let mut b = o.qos as u8;
                if v5 {
                    b |= (o.no_local as u8) << 2
                        | (o.retain_as_published as u8) << 3
                        | (o.retain_handling & 3) << 4;
                }
                out.push(b);
            }
        }
        Packet::SubAck(s) => {
            out.extend_from_slice(&s.packet_id.to_be_bytes());
            if v5 {
                put_properties(out, &s.properties);
            }
            out.extend_from_slice(&s.codes);
        }
        Packet::Unsubscribe(u) => {
            out.extend_from_slice(&u.packet_id.to_be_bytes());
            if v5 {
                put_properties(out, &u.properties);
            }
            for f in &u.filters {
                put_bytes(out, f.as_bytes());
            }
        }
        Packet::UnsubAck(u) => {
            out.extend_from_slice(&u.packet_id.to_be_bytes());
            if v5 {
                put_properties(out, &u.properties);
                out.extend_from_slice(&u.codes);
            }
        }
        Packet::PingReq | Packet::PingResp => {}
        Packet::Disconnect(d) => put_reason(out, d.reason, &d.properties, v5),
        Packet::Auth(a) => put_reason(out, a.reason, &a.properties, v5),
    }
}

fn put_reason(out: &mut Vec<u8>, reason: u8, p: &Properties, v5: bool) {
    if !v5 || (reason == 0 && p.is_empty()) {
        return;
    }
    out.push(reason);
    if !p.is_empty() {
        put_properties(out, p);
    }
}

/// Appends a variable byte integer.
pub fn put_varint(out: &mut Vec<u8>, mut v: u32) {
    loop {
        let mut b = (v & 0x7F) as u8;
        v >>= 7;
        if v > 0 {
            b |= 0x80;
        }
        out.push(b);
        if v == 0 {
            break;
        }
    }
}

/// Bytes a variable byte integer takes.
pub fn varint_len(v: u32) -> usize {
    match v {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

fn with_len(n: usize) -> usize {
    varint_len(n as u32) + n
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u16).to_be_bytes());
    out.extend_from_slice(b);
}

/// The size of a property block's contents (without its own length prefix).
pub fn properties_len(p: &Properties) -> usize {
    let s = |o: &Option<String>| o.as_ref().map_or(0, |v| 1 + 2 + v.len());
    let b = |o: &Option<bytes::Bytes>| o.as_ref().map_or(0, |v| 1 + 2 + v.len());
    let n1 = |o: &Option<u8>| o.map_or(0, |_| 2);
    let n2 = |o: &Option<u16>| o.map_or(0, |_| 3);
    let n4 = |o: &Option<u32>| o.map_or(0, |_| 5);
    n1(&p.payload_format_indicator)
        + n4(&p.message_expiry_interval)
        + s(&p.content_type)
        + s(&p.response_topic)
        + b(&p.correlation_data)
        + p.subscription_identifiers
            .iter()
            .map(|&v| 1 + varint_len(v))
            .sum::<usize>()
        + n4(&p.session_expiry_interval)
        + s(&p.assigned_client_identifier)
        + n2(&p.server_keep_alive)
        + s(&p.authentication_method)
        + b(&p.authentication_data)
        + n1(&p.request_problem_information)
        + n4(&p.will_delay_interval)
        + n1(&p.request_response_information)
        + s(&p.response_information)
        + s(&p.server_reference)
        + s(&p.reason_string)
        + n2(&p.receive_maximum)
        + n2(&p.topic_alias_maximum)
        + n2(&p.topic_alias)
        + n1(&p.maximum_qos)
        + n1(&p.retain_available)
        + p.user_properties
            .iter()
            .map(|(k, v)| 1 + 2 + k.len() + 2 + v.len())
            .sum::<usize>()
        + n4(&p.maximum_packet_size)
        + n1(&p.wildcard_subscription_available)
        + n1(&p.subscription_identifier_available)
        + n1(&p.shared_subscription_available)
}

/// A property set as stored by the durable store: the wire encoding with its length prefix.
pub fn properties_bytes(p: &Properties) -> Vec<u8> {
    if p.is_empty() {
        return Vec::new();
    }
    let mut out = Vec::with_capacity(properties_len(p) + 4);
    put_properties(&mut out, p);
    out
}

fn put_properties(out: &mut Vec<u8>, p: &Properties) {
    put_varint(out, properties_len(p) as u32);
    let u8p = |out: &mut Vec<u8>, id: u8, v: Option<u8>| {
        if let Some(v) = v {
            out.push(id);
            out.push(v);
        }
    };
    u8p(out, 0x01, p.payload_format_indicator);
    put_u32(out, 0x02, p.message_expiry_interval);
    put_str(out, 0x03, &p.content_type);
    put_str(out, 0x08, &p.response_topic);
    put_bin(out, 0x09, &p.correlation_data);
    for &id in &p.subscription_identifiers {
        out.push(0x0B);
        put_varint(out, id);
    }
    put_u32(out, 0x11, p.session_expiry_interval);
    put_str(out, 0x12, &p.assigned_client_identifier);
    put_u16(out, 0x13, p.server_keep_alive);
    put_str(out, 0x15, &p.authentication_method);
    put_bin(out, 0x16, &p.authentication_data);
    u8p(out, 0x17, p.request_problem_information);
    put_u32(out, 0x18, p.will_delay_interval);
    u8p(out, 0x19, p.request_response_information);
    put_str(out, 0x1A, &p.response_information);
    put_str(out, 0x1C, &p.server_reference);
    put_str(out, 0x1F, &p.reason_string);
    put_u16(out, 0x21, p.receive_maximum);
    put_u16(out, 0x22, p.topic_alias_maximum);
    put_u16(out, 0x23, p.topic_alias);
    u8p(out, 0x24, p.maximum_qos);
    u8p(out, 0x25, p.retain_available);
    for (k, v) in &p.user_properties {
        out.push(0x26);
        put_bytes(out, k.as_bytes());
        put_bytes(out, v.as_bytes());
    }
    put_u32(out, 0x27, p.maximum_packet_size);
    u8p(out, 0x28, p.wildcard_subscription_available);
    u8p(out, 0x29, p.subscription_identifier_available);
    u8p(out, 0x2A, p.shared_subscription_available);
}

fn put_u16(out: &mut Vec<u8>, id: u8, v: Option<u16>) {
    if let Some(v) = v {
        out.push(id);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn put_u32(out: &mut Vec<u8>, id: u8, v: Option<u32>) {
    if let Some(v) = v {
        out.push(id);
        out.extend_from_slice(&v.to_be_bytes());
    }
}

fn put_str(out: &mut Vec<u8>, id: u8, v: &Option<String>) {
    if let Some(v) = v {
        out.push(id);
        put_bytes(out, v.as_bytes());
    }
}

fn put_bin(out: &mut Vec<u8>, id: u8, v: &Option<bytes::Bytes>) {
    if let Some(v) = v {
        out.push(id);
        put_bytes(out, v);
    }
}
