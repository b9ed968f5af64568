//! The strict decoder: bytes in, one `Packet` out, or "need more bytes", or a `DecodeError` that
//! names the violated rule and the reaction the spec asks for.

use bytes::Bytes;

use super::packet::*;
use super::DecodeError;
use crate::proto::topic;

/// Largest value a four-byte variable byte integer can carry.
pub const MAX_REMAINING_LENGTH: u32 = 268_435_455;

/// Decodes one packet from the front of `buf`.
///
/// `version` is `None` before CONNECT has been seen: then only CONNECT is accepted and it
/// carries its own level. `max_packet_size` bounds the whole packet (fixed header included) and
/// is checked as soon as the length is known, so an oversized packet is refused before it is
/// buffered. Returns `Ok(None)` when `buf` does not yet hold a whole packet.
pub fn decode(
    buf: &[u8],
    version: Option<Version>,
    max_packet_size: u32,
) -> Result<Option<(Packet, usize)>, DecodeError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    let ptype = first >> 4;
    let flags = first & 0x0F;
    // Check the type and flags before waiting for the rest: a garbage first byte is refused
    // at once instead of waiting for a remaining length that may never come.
    check_fixed_flags(ptype, flags, version)?;
    let (remaining, len_bytes) = match read_varint(&buf[1..])? {
        Some(v) => v,
        None => return Ok(None),
    };
    let total = 1 + len_bytes as u64 + remaining as u64;
    if total > max_packet_size as u64 {
        return Err(DecodeError::TooLarge {
            size: total,
            max: max_packet_size,
        });
    }
    let total = total as usize;
    if buf.len() < total {
        return Ok(None);
    }
    let body = &buf[1 + len_bytes..total];
    let packet = match version {
        None => {
            if ptype != 1 {
                return Err(DecodeError::Protocol("first packet must be CONNECT"));
            }
            Packet::Connect(Box::new(decode_connect(body)?))
        }
        Some(v) => decode_body(ptype, flags, body, v)?,
    };
    Ok(Some((packet, total)))
}

fn check_fixed_flags(ptype: u8, flags: u8, version: Option<Version>) -> Result<(), DecodeError> {
    match ptype {
        0 => Err(DecodeError::Malformed("reserved packet type 0")),
        15 if version.is_some_and(|v| !v.is_v5()) => {
            Err(DecodeError::Malformed("AUTH is not defined before MQTT 5"))
        }
        3 => {
            if flags & 0x06 == 0x06 {
                return Err(DecodeError::Malformed("PUBLISH QoS 3"));
            }
            if flags & 0x06 == 0 && flags & 0x08 != 0 {
                return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
            }
            Ok(())
        }
        // MQTT 3.1 sets DUP on a PUBREL, SUBSCRIBE or UNSUBSCRIBE it resends; 3.1.1 reserved it.
        6 | 8 | 10 if flags == 0x0A && version == Some(Version::V31) => Ok(()),
        6 | 8 | 10 if flags != 0x02 => Err(DecodeError::Malformed("reserved flags must be 0010")),
        6 | 8 | 10 => Ok(()),
        _ if flags != 0 => Err(DecodeError::Malformed("reserved flags must be 0000")),
        _ => Ok(()),
    }
}

/// Reads a variable byte integer. `Ok(None)` means more bytes are needed.
pub fn read_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        value |= ((b & 0x7F) as u32) << (7 * i);
        if b & 0x80 == 0 {
            // [MQTT-1.5.5-1] the minimum number of bytes: a trailing zero byte is not minimal.
            if i > 0 && b == 0 {
                return Err(DecodeError::Malformed(
                    "variable byte integer not minimally encoded",
                ));
            }
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

/// A cursor over one packet's body; every read past the end is a malformed packet, since the
/// remaining length said the body was complete.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        if self.remaining() < n {
            return Err(DecodeError::Malformed("packet shorter than its fields"));
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        let b = self.take(4)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn varint(&mut self) -> Result<u32, DecodeError> {
        match read_varint(&self.buf[self.pos..])? {
            Some((v, n)) => {
                self.pos += n;
                Ok(v)
            }
            None => Err(DecodeError::Malformed("truncated variable byte integer")),
        }
    }
    fn binary(&mut self) -> Result<&'a [u8], DecodeError> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        let s = std::str::from_utf8(raw)
            .map_err(|_| DecodeError::Malformed("string is not well-formed UTF-8"))?;
        if s.contains('\0') {
            return Err(DecodeError::Malformed("string contains U+0000"));
        }
        Ok(s.to_owned())
    }
    fn packet_id(&mut self) -> Result<u16, DecodeError> {
        let id = self.u16()?;
        if id == 0 {
            return Err(DecodeError::Malformed("packet identifier 0"));
        }
        Ok(id)
    }
    fn rest(&mut self) -> &'a [u8] {
        let s = &self.buf[self.pos..];
        self.pos = self.buf.len();
        s
    }
    fn finish(&self) -> Result<(), DecodeError> {
        if self.remaining() != 0 {
            return Err(DecodeError::Malformed(
                "trailing bytes after the packet's fields",
            ));
        }
        Ok(())
    }
}

/// Which packets may carry a property: bit n is packet type n; bit 0 stands for the will.
const WILL: u16 = 1 << 0;
const CONNECT: u16 = 1 << 1;
const CONNACK: u16 = 1 << 2;
const PUBLISH: u16 = 1 << 3;
const PUBACK: u16 = 1 << 4;
const PUBREC: u16 = 1 << 5;
const PUBREL: u16 = 1 << 6;
const PUBCOMP: u16 = 1 << 7;
const SUBSCRIBE: u16 = 1 << 8;
const SUBACK: u16 = 1 << 9;
const UNSUBSCRIBE: u16 = 1 << 10;
const UNSUBACK: u16 = 1 << 11;
const DISCONNECT: u16 = 1 << 14;
const AUTH: u16 = 1 << 15;
const ACKS: u16 = PUBACK | PUBREC | PUBREL | PUBCOMP;
const ALL: u16 = 0xFFFF;

fn allowed_in(id: u8) -> Option<u16> {
    Some(match id {
        0x01..=0x03 | 0x08 | 0x09 => PUBLISH | WILL,
        0x0B => PUBLISH | SUBSCRIBE,
        0x11 => CONNECT | CONNACK | DISCONNECT,
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28..=0x2A => CONNACK,
        0x15 | 0x16 => CONNECT | CONNACK | AUTH,
        0x17 | 0x19 => CONNECT,
        0x18 => WILL,
        0x1C => CONNACK | DISCONNECT,
        0x1F => CONNACK | ACKS | SUBACK | UNSUBACK | DISCONNECT | AUTH,
        0x21 | 0x22 | 0x27 => CONNECT | CONNACK,
        0x23 => PUBLISH,
        0x26 => ALL,
        _ => return None,
    })
}

fn decode_properties(r: &mut Reader<'_>, context: u16) -> Result<Props, DecodeError> {
    let len = r.varint()? as usize;
    let mut p = Reader::new(r.take(len)?);
    let mut props = Properties::default();
    let mut seen: u64 = 0;
    while p.remaining() > 0 {
        let id = p.varint()?;
        let id = u8::try_from(id).map_err(|_| DecodeError::Malformed("unknown property"))?;
        let allowed = allowed_in(id).ok_or(DecodeError::Malformed("unknown property"))?;
        if allowed & context == 0 {
            return Err(DecodeError::Malformed(
                "property not allowed in this packet",
            ));
        }
        // User properties may repeat, and so may subscription identifiers in PUBLISH.
        let repeatable = id == 0x26 || (id == 0x0B && context == PUBLISH);
        if !repeatable && id < 64 && seen & (1 << id) != 0 {
            return Err(DecodeError::Protocol("property appears twice"));
        }
        seen |= 1 << id;
        match id {
            0x01 => props.payload_format_indicator = Some(bool_byte(&mut p)?),
            0x02 => props.message_expiry_interval = Some(p.u32()?),
            0x03 => props.content_type = Some(p.string()?),
            0x08 => {
                let t = p.string()?;
                topic::validate_name(&t).map_err(|_| {
                    DecodeError::Protocol("response topic is not a valid topic name")
                })?;
                props.response_topic = Some(t)
            }
            0x09 => props.correlation_data = Some(Bytes::copy_from_slice(p.binary()?)),
            0x0B => {
                let v = p.varint()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("subscription identifier 0"));
                }
                props.subscription_identifiers.push(v)
            }
            0x11 => props.session_expiry_interval = Some(p.u32()?),
            0x12 => props.assigned_client_identifier = Some(p.string()?),
            0x13 => props.server_keep_alive = Some(p.u16()?),
            0x15 => props.authentication_method = Some(p.string()?),
            0x16 => props.authentication_data = Some(Bytes::copy_from_slice(p.binary()?)),
            0x17 => props.request_problem_information = Some(bool_byte(&mut p)?),
            0x18 => props.will_delay_interval = Some(p.u32()?),
            0x19 => props.request_response_information = Some(bool_byte(&mut p)?),
            0x1A => props.response_information = Some(p.string()?),
            0x1C => props.server_reference = Some(p.string()?),
            0x1F => props.reason_string = Some(p.string()?),
            0x21 => {
                let v = p.u16()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("receive maximum 0"));
                }
                props.receive_maximum = Some(v)
            }
            0x22 => props.topic_alias_maximum = Some(p.u16()?),
            0x23 => props.topic_alias = Some(p.u16()?),
            0x24 => props.maximum_qos = Some(bool_byte(&mut p)?),
            0x25 => props.retain_available = Some(bool_byte(&mut p)?),
            0x26 => {
                let k = p.string()?;
                let v = p.string()?;
                props.user_properties.push((k, v))
            }
            0x27 => {
                let v = p.u32()?;
                if v == 0 {
                    return Err(DecodeError::Protocol("maximum packet size 0"));
                }
                props.maximum_packet_size = Some(v)
            }
            0x28 => props.wildcard_subscription_available = Some(bool_byte(&mut p)?),
            0x29 => props.subscription_identifier_available = Some(bool_byte(&mut p)?),
            0x2A => props.shared_subscription_available = Some(bool_byte(&mut p)?),
            _ => return Err(DecodeError::Malformed("unknown property")),
        }
    }
    Ok(props.into())
}

/// Reads back what `encode::properties_bytes` wrote for a PUBLISH or a will.
pub fn stored_properties(buf: &[u8]) -> Result<Props, DecodeError> {
    if buf.is_empty() {
        return Ok(Props::default());
    }
    let mut r = Reader::new(buf);
    let p = decode_properties(&mut r, PUBLISH | WILL)?;
    r.finish()?;
    Ok(p)
}

/// Every byte-valued property the spec defines is 0 or 1.
fn bool_byte(r: &mut Reader<'_>) -> Result<u8, DecodeError> {
    match r.u8()? {
        v @ (0 | 1) => Ok(v),
        _ => Err(DecodeError::Protocol("property value must be 0 or 1")),
    }
}

fn decode_connect(body: &[u8]) -> Result<Connect, DecodeError> {
    let mut r = Reader::new(body);
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (name, level) {
        (b"MQTT", 4) => Version::V311,
        (b"MQTT", 5) => Version::V5,
        (b"MQIsdp", 3) => Version::V31,
        (b"MQTT" | b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocolVersion(level)),
        _ => return Err(DecodeError::BadProtocolName),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let password_flag = flags & 0x40 != 0;
    let username_flag = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without the will flag",
        ));
    }
    let will_qos = QoS::from_bits(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    if version != Version::V5 && password_flag && !username_flag {
        return Err(DecodeError::Malformed("password without username"));
    }
    let keep_alive = r.u16()?;
    let properties = if version.is_v5() {
        decode_properties(&mut r, CONNECT)?
    } else {
        Props::default()
    };
    let client_id = r.string()?;
    let will = if will_flag {
        let wprops = if version.is_v5() {
            decode_properties(&mut r, WILL)?
        } else {
            Props::default()
        };
        let topic = r.string()?;
        topic::validate_name(&topic).map_err(|_| DecodeError::TopicNameInvalid)?;
        let payload = Bytes::copy_from_slice(r.binary()?);
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties: wprops,
        })
    } else {
        None
    };
    let username = if username_flag {
        Some(r.string()?)
    } else {
        None
    };
    let password = if password_flag {
        Some(Bytes::copy_from_slice(r.binary()?))
    } else {
        None
    };
    r.finish()?;
    Ok(Connect {
        version,
        clean_start,
        keep_alive,
        client_id,
        will,
        username,
        password,
        properties,
    })
}

fn decode_body(ptype: u8, flags: u8, body: &[u8], v: Version) -> Result<Packet, DecodeError> {
    let mut r = Reader::new(body);
    let packet = match ptype {
        1 => return Err(DecodeError::Protocol("second CONNECT")),
        2 => {
            let ack_flags = r.u8()?;
            if ack_flags & 0xFE != 0 {
                return Err(DecodeError::Malformed("CONNACK reserved flags set"));
            }
            let code = r.u8()?;
            let properties = if v.is_v5() {
                check_reason(code, CONNACK_CODES)?;
                decode_properties(&mut r, CONNACK)?
            } else {
                Props::default()
            };
            Packet::ConnAck(ConnAck {
                session_present: ack_flags & 1 != 0,
                code,
                properties,
            })
        }
        3 => Packet::Publish(decode_publish(flags, &mut r, v)?),
        4 => Packet::PubAck(decode_ack(&mut r, v, PUBACK, PUB_CODES)?),
        5 => Packet::PubRec(decode_ack(&mut r, v, PUBREC, PUB_CODES)?),
        6 => Packet::PubRel(decode_ack(&mut r, v, PUBREL, REL_CODES)?),
        7 => Packet::PubComp(decode_ack(&mut r, v, PUBCOMP, REL_CODES)?),
        8 => Packet::Subscribe(decode_subscribe(&mut r, v)?),
        9 => {
            let packet_id = r.packet_id()?;
            let properties = props_if_v5(&mut r, v, SUBACK)?;
            let codes = r.rest().to_vec();
            for &c in &codes {
                if v.is_v5() {
                    check_reason(c, SUBACK_CODES)?;
                } else if !matches!(c, 0 | 1 | 2 | 0x80) {
                    return Err(DecodeError::Malformed("invalid SUBACK return code"));
                }
            }
            Packet::SubAck(SubAck {
                packet_id,
                codes,
                properties,
            })
        }
        10 => {
            let packet_id = r.packet_id()?;
            let properties = props_if_v5(&mut r, v, UNSUBSCRIBE)?;
            let mut filters = Vec::new();
            while r.remaining() > 0 {
                let f = r.string()?;
                topic::parse_subscription(&f).map_err(|_| DecodeError::TopicFilterInvalid)?;
                filters.push(f);
            }
            if filters.is_empty() {
                return Err(DecodeError::Protocol("UNSUBSCRIBE with no topic filter"));
            }
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        }
        11 => {
            let packet_id = r.packet_id()?;
            let (properties, codes) = if v.is_v5() {
                let p = decode_properties(&mut r, UNSUBACK)?;
                let codes = r.rest().to_vec();
                for &c in &codes {
                    check_reason(c, UNSUBACK_CODES)?;
                }
                (p, codes)
            } else {
                (Props::default(), Vec::new())
            };
            Packet::UnsubAck(UnsubAck {
                packet_id,
                codes,
                properties,
            })
        }
        12 => Packet::PingReq,
        13 => Packet::PingResp,
        14 => {
            let mut d = Disconnect::default();
            if v.is_v5() && r.remaining() > 0 {
                d.reason = r.u8()?;
                check_reason(d.reason, DISCONNECT_CODES)?;
                if r.remaining() > 0 {
                    d.properties = decode_properties(&mut r, DISCONNECT)?;
                }
            }
            Packet::Disconnect(d)
        }
        15 => {
            let mut a = Auth::default();
            if r.remaining() > 0 {
                a.reason = r.u8()?;
                check_reason(a.reason, AUTH_CODES)?;
                if r.remaining() > 0 {
                    a.properties = decode_properties(&mut r, AUTH)?;
                }
            }
            Packet::Auth(a)
        }
        _ => return Err(DecodeError::Malformed("reserved packet type")),
    };
    r.finish()?;
    Ok(packet)
}

fn props_if_v5(r: &mut Reader<'_>, v: Version, ctx: u16) -> Result<Props, DecodeError> {
    if v.is_v5() {
        decode_properties(r, ctx)
    } else {
        Ok(Props::default())
    }
}

fn decode_publish(flags: u8, r: &mut Reader<'_>, v: Version) -> Result<Publish, DecodeError> {
    let qos = QoS::from_bits((flags >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        0
    } else {
        r.packet_id()?
    };
    let properties = props_if_v5(r, v, PUBLISH)?;
    if topic.is_empty() {
        // v5 lets a topic alias stand in for an empty topic; the session resolves it.
        if properties.topic_alias.is_none() {
            return Err(DecodeError::TopicNameInvalid);
        }
    } else {
        topic::validate_name(&topic).map_err(|_| DecodeError::TopicNameInvalid)?;
    }
    let payload = Bytes::copy_from_slice(r.rest());
    Ok(Publish {
        dup: flags & 0x08 != 0,
        qos,
        retain: flags & 0x01 != 0,
        topic,
        packet_id,
        payload,
        properties,
    })
}

fn decode_ack(r: &mut Reader<'_>, v: Version, ctx: u16, codes: &[u8]) -> Result<Ack, DecodeError> {
    let packet_id = r.packet_id()?;
    let mut ack = Ack {
        packet_id,
        ..Ack::default()
    };
    if v.is_v5() && r.remaining() > 0 {
        ack.reason = r.u8()?;
        check_reason(ack.reason, codes)?;
        if r.remaining() > 0 {
            ack.properties = decode_properties(r, ctx)?;
        }
    }
    Ok(ack)
}

fn decode_subscribe(r: &mut Reader<'_>, v: Version) -> Result<Subscribe, DecodeError> {
    let packet_id = r.packet_id()?;
    let properties = props_if_v5(r, v, SUBSCRIBE)?;
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let f = r.string()?;
        let opts = r.u8()?;
        let reserved = if v.is_v5() { 0xC0 } else { 0xFC };
        if opts & reserved != 0 {
            return Err(DecodeError::Malformed(
                "subscription options reserved bits set",
            ));
        }
        let qos =
            QoS::from_bits(opts & 0x03).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
        let o = SubOptions {
            qos,
            no_local: opts & 0x04 != 0,
            retain_as_published: opts & 0x08 != 0,
            retain_handling: (opts >> 4) & 0x03,
        };
        if o.retain_handling == 3 {
            return Err(DecodeError::Protocol("retain handling 3"));
        }
        let parsed = topic::parse_subscription(&f).map_err(|_| DecodeError::TopicFilterInvalid)?;
        if parsed.share_group.is_some() && o.no_local {
            return Err(DecodeError::Protocol("no local on a shared subscription"));
        }
        filters.push((f, o));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE with no topic filter"));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

const CONNACK_CODES: &[u8] = &[
    0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97,
    0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9F,
];
const PUB_CODES: &[u8] = &[0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99];
const REL_CODES: &[u8] = &[0x00, 0x92];
const SUBACK_CODES: &[u8] = &[
    0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2,
];
const UNSUBACK_CODES: &[u8] = &[0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91];
const DISCONNECT_CODES: &[u8] = &[
    0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95,
    0x96, 0x97, 0x98, 0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2,
];
const AUTH_CODES: &[u8] = &[0x00, 0x18, 0x19];

fn check_reason(code: u8, valid: &[u8]) -> Result<(), DecodeError> {
    if valid.contains(&code) {
        Ok(())
    } else {
        Err(DecodeError::Malformed(
            "reason code not valid for this packet",
        ))
    }
}
