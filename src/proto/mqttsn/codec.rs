//! The MQTT-SN 1.2 codec: one message per datagram (or per serial frame), decoded strictly.
//! A length that disagrees with the datagram, an unknown or reserved type, a field cut short,
//! or a reserved flag value is an error that names what is wrong; nothing here panics on input.

use bytes::Bytes;
use thiserror::Error;

/// Why a datagram is not an MQTT-SN message.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum DecodeError {
    #[error("empty datagram")]
    Empty,
    #[error("length field says {said} bytes, datagram has {got}")]
    Length { said: usize, got: usize },
    #[error("message type 0x{0:02x} is reserved or unknown")]
    UnknownType(u8),
    #[error("{0}: too short")]
    Short(&'static str),
    #[error("{0}: unexpected trailing bytes")]
    Trailing(&'static str),
    #[error("{0}: topic id type 3 is reserved")]
    ReservedTopicIdType(&'static str),
    #[error("CONNECT: protocol id 0x{0:02x}, only 0x01 is MQTT-SN 1.2")]
    ProtocolId(u8),
    #[error("{0}: not UTF-8")]
    Utf8(&'static str),
    #[error("CONNECT: client id must be 1 to 23 bytes, got {0}")]
    ClientIdLength(usize),
}

/// QoS as MQTT-SN carries it: -1 is "publish without a connection".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SnQos {
    #[default]
    Zero,
    One,
    Two,
    MinusOne,
}

impl SnQos {
    fn bits(self) -> u8 {
        match self {
            SnQos::Zero => 0,
            SnQos::One => 1,
            SnQos::Two => 2,
            SnQos::MinusOne => 3,
        }
    }
    fn from_bits(b: u8) -> SnQos {
        match b & 3 {
            0 => SnQos::Zero,
            1 => SnQos::One,
            2 => SnQos::Two,
            _ => SnQos::MinusOne,
        }
    }
}

/// How a PUBLISH, SUBSCRIBE or UNSUBSCRIBE names its topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TopicRef {
    /// A topic id from REGISTER (type 0).
    Id(u16),
    /// A predefined topic id (type 1).
    Predefined(u16),
    /// A two-character short topic name (type 2).
    Short([u8; 2]),
    /// A full topic name or filter (SUBSCRIBE/UNSUBSCRIBE only, type 0).
    Name(String),
}

impl TopicRef {
    fn type_bits(&self) -> u8 {
        match self {
            TopicRef::Id(_) | TopicRef::Name(_) => 0,
            TopicRef::Predefined(_) => 1,
            TopicRef::Short(_) => 2,
        }
    }
    /// The two bytes a PUBLISH, PUBACK or SUBACK carry for it (0 for a name).
    pub fn id_bytes(&self) -> [u8; 2] {
        match self {
            TopicRef::Id(i) | TopicRef::Predefined(i) => i.to_be_bytes(),
            TopicRef::Short(s) => *s,
            TopicRef::Name(_) => [0, 0],
        }
    }
}

/// The flags byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Flags {
    pub dup: bool,
    pub qos: SnQos,
    pub retain: bool,
    pub will: bool,
    pub clean_session: bool,
    /// Topic id type: 0 normal, 1 predefined, 2 short (3 is refused at decode).
    pub topic_id_type: u8,
}

impl Flags {
    fn byte(&self) -> u8 {
        (self.dup as u8) << 7
            | self.qos.bits() << 5
            | (self.retain as u8) << 4
            | (self.will as u8) << 3
            | (self.clean_session as u8) << 2
            | (self.topic_id_type & 3)
    }
    fn parse(b: u8) -> Flags {
        Flags {
            dup: b & 0x80 != 0,
            qos: SnQos::from_bits(b >> 5),
            retain: b & 0x10 != 0,
            will: b & 0x08 != 0,
            clean_session: b & 0x04 != 0,
            topic_id_type: b & 3,
        }
    }
}

/// Return codes [5.3.10].
pub mod rc {
    pub const ACCEPTED: u8 = 0;
    pub const CONGESTION: u8 = 1;
    pub const INVALID_TOPIC_ID: u8 = 2;
    pub const NOT_SUPPORTED: u8 = 3;
}

/// Every MQTT-SN 1.2 message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Advertise {
        gw_id: u8,
        duration: u16,
    },
    SearchGw {
        radius: u8,
    },
    GwInfo {
        gw_id: u8,
        address: Bytes,
    },
    Connect {
        flags: Flags,
        duration: u16,
        client_id: String,
    },
    ConnAck {
        rc: u8,
    },
    WillTopicReq,
    /// `None`: the empty WILLTOPIC, which means "no will".
    WillTopic(Option<(Flags, String)>),
    WillMsgReq,
    WillMsg(Bytes),
    Register {
        topic_id: u16,
        msg_id: u16,
        topic: String,
    },
    RegAck {
        topic_id: u16,
        msg_id: u16,
        rc: u8,
    },
    Publish {
        flags: Flags,
        topic: TopicRef,
        msg_id: u16,
        data: Bytes,
    },
    PubAck {
        topic_id: [u8; 2],
        msg_id: u16,
        rc: u8,
    },
    PubRec {
        msg_id: u16,
    },
    PubRel {
        msg_id: u16,
    },
    PubComp {
        msg_id: u16,
    },
    Subscribe {
        flags: Flags,
        msg_id: u16,
        topic: TopicRef,
    },
    SubAck {
        flags: Flags,
        topic_id: u16,
        msg_id: u16,
        rc: u8,
    },
    Unsubscribe {
        flags: Flags,
        msg_id: u16,
        topic: TopicRef,
    },
    UnsubAck {
        msg_id: u16,
    },
    PingReq {
        client_id: Option<String>,
    },
    PingResp,
    Disconnect {
        duration: Option<u16>,
    },
    /// `None`: the empty WILLTOPICUPD, which deletes the will.
    WillTopicUpd(Option<(Flags, String)>),
    WillTopicResp {
        rc: u8,
    },
    WillMsgUpd(Bytes),
    WillMsgResp {
        rc: u8,
    },
    /// A message relayed by a forwarder [5.5]: `node` identifies the wireless node.
    Encapsulated {
        radius: u8,
        node: Bytes,
        inner: Box<Message>,
    },
}

impl Message {
    /// The message's name, for logs and counters.
    pub fn name(&self) -> &'static str {
        name_of(self.type_byte()).unwrap_or("?")
    }

    /// The MsgType byte [5.2.2].
    pub fn type_byte(&self) -> u8 {
        match self {
            Message::Advertise { .. } => 0x00,
            Message::SearchGw { .. } => 0x01,
            Message::GwInfo { .. } => 0x02,
            Message::Connect { .. } => 0x04,
            Message::ConnAck { .. } => 0x05,
            Message::WillTopicReq => 0x06,
            Message::WillTopic(_) => 0x07,
            Message::WillMsgReq => 0x08,
            Message::WillMsg(_) => 0x09,
            Message::Register { .. } => 0x0A,
            Message::RegAck { .. } => 0x0B,
            Message::Publish { .. } => 0x0C,
            Message::PubAck { .. } => 0x0D,
            Message::PubComp { .. } => 0x0E,
            Message::PubRec { .. } => 0x0F,
            Message::PubRel { .. } => 0x10,
            Message::Subscribe { .. } => 0x12,
            Message::SubAck { .. } => 0x13,
            Message::Unsubscribe { .. } => 0x14,
            Message::UnsubAck { .. } => 0x15,
            Message::PingReq { .. } => 0x16,
            Message::PingResp => 0x17,
            Message::Disconnect { .. } => 0x18,
            Message::WillTopicUpd(_) => 0x1A,
            Message::WillTopicResp { .. } => 0x1B,
            Message::WillMsgUpd(_) => 0x1C,
            Message::WillMsgResp { .. } => 0x1D,
            Message::Encapsulated { .. } => 0xFE,
        }
    }
}

/// Reads the fields of one message body.
struct Body<'a> {
    name: &'static str,
    b: &'a [u8],
}

impl<'a> Body<'a> {
    fn u8(&mut self) -> Result<u8, DecodeError> {
        let (&x, rest) = self.b.split_first().ok_or(DecodeError::Short(self.name))?;
        self.b = rest;
        Ok(x)
    }
    fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.b.len() < 2 {
            return Err(DecodeError::Short(self.name));
        }
        let v = u16::from_be_bytes([self.b[0], self.b[1]]);
        self.b = &self.b[2..];
        Ok(v)
    }
    fn pair(&mut self) -> Result<[u8; 2], DecodeError> {
        Ok(self.u16()?.to_be_bytes())
    }
    fn rest(&mut self) -> &'a [u8] {
        std::mem::take(&mut self.b)
    }
    fn text(&mut self) -> Result<String, DecodeError> {
        let r = self.rest();
        std::str::from_utf8(r)
            .map(str::to_owned)
            .map_err(|_| DecodeError::Utf8(self.name))
    }
    fn end(&self) -> Result<(), DecodeError> {
        if self.b.is_empty() {
            Ok(())
        } else {
            Err(DecodeError::Trailing(self.name))
        }
    }
    fn flags(&mut self) -> Result<Flags, DecodeError> {
        let f = Flags::parse(self.u8()?);
        if f.topic_id_type == 3 {
            return Err(DecodeError::ReservedTopicIdType(self.name));
        }
        Ok(f)
    }
}

fn name_of(t: u8) -> Option<&'static str> {
    Some(match t {
        0x00 => "ADVERTISE",
        0x01 => "SEARCHGW",
        0x02 => "GWINFO",
        0x04 => "CONNECT",
        0x05 => "CONNACK",
        0x06 => "WILLTOPICREQ",
        0x07 => "WILLTOPIC",
        0x08 => "WILLMSGREQ",
        0x09 => "WILLMSG",
        0x0A => "REGISTER",
        0x0B => "REGACK",
        0x0C => "PUBLISH",
        0x0D => "PUBACK",
        0x0E => "PUBCOMP",
        0x0F => "PUBREC",
        0x10 => "PUBREL",
        0x12 => "SUBSCRIBE",
        0x13 => "SUBACK",
        0x14 => "UNSUBSCRIBE",
        0x15 => "UNSUBACK",
        0x16 => "PINGREQ",
        0x17 => "PINGRESP",
        0x18 => "DISCONNECT",
        0x1A => "WILLTOPICUPD",
        0x1B => "WILLTOPICRESP",
        0x1C => "WILLMSGUPD",
        0x1D => "WILLMSGRESP",
        0xFE => "ENCAPSULATED",
        _ => return None,
    })
}

/// Decodes one whole datagram.
pub fn decode(d: &[u8]) -> Result<Message, DecodeError> {
    decode_nested(d, 0)
}

fn decode_nested(d: &[u8], depth: u8) -> Result<Message, DecodeError> {
    let (&first, _) = d.split_first().ok_or(DecodeError::Empty)?;
    let (len, header) = if first == 0x01 {
        if d.len() < 3 {
            return Err(DecodeError::Short("length"));
        }
        (u16::from_be_bytes([d[1], d[2]]) as usize, 3)
    } else {
        (first as usize, 1)
    };
    if d.len() <= header {
        return Err(DecodeError::Short("message type"));
    }
    let t = d[header];
    let name = name_of(t).ok_or(DecodeError::UnknownType(t))?;
    // An encapsulated message's length covers only its own header; the inner message follows.
    let whole = if t == 0xFE {
        len <= d.len()
    } else {
        len == d.len()
    };
    if !whole || len < header + 1 {
        return Err(DecodeError::Length {
            said: len,
            got: d.len(),
        });
    }
    let mut b = Body {
        name,
        b: &d[header + 1..len],
    };
    let m = match t {
        0x00 => Message::Advertise {
            gw_id: b.u8()?,
            duration: b.u16()?,
        },
        0x01 => Message::SearchGw { radius: b.u8()? },
        0x02 => Message::GwInfo {
            gw_id: b.u8()?,
            address: Bytes::copy_from_slice(b.rest()),
        },
        0x04 => {
            let flags = b.flags()?;
            let pid = b.u8()?;
            if pid != 0x01 {
                return Err(DecodeError::ProtocolId(pid));
            }
            let duration = b.u16()?;
            let client_id = b.text()?;
            if client_id.is_empty() || client_id.len() > 23 {
                return Err(DecodeError::ClientIdLength(client_id.len()));
            }
            Message::Connect {
                flags,
                duration,
                client_id,
            }
        }
        0x05 => Message::ConnAck { rc: b.u8()? },
        0x06 => Message::WillTopicReq,
        0x07 | 0x1A => {
            let will = if b.b.is_empty() {
                None
            } else {
                let f = b.flags()?;
                Some((f, b.text()?))
            };
            if t == 0x07 {
                Message::WillTopic(will)
            } else {
                Message::WillTopicUpd(will)
            }
        }
        0x08 => Message::WillMsgReq,
        0x09 => Message::WillMsg(Bytes::copy_from_slice(b.rest())),
        0x1C => Message::WillMsgUpd(Bytes::copy_from_slice(b.rest())),
        0x0A => Message::Register {
            topic_id: b.u16()?,
            msg_id: b.u16()?,
            topic: b.text()?,
        },
        0x0B => Message::RegAck {
            topic_id: b.u16()?,
            msg_id: b.u16()?,
            rc: b.u8()?,
        },
        0x0C => {
            let flags = b.flags()?;
            let raw = b.pair()?;
            let topic = match flags.topic_id_type {
                0 => TopicRef::Id(u16::from_be_bytes(raw)),
                1 => TopicRef::Predefined(u16::from_be_bytes(raw)),
                _ => TopicRef::Short(raw),
            };
            Message::Publish {
                flags,
                topic,
                msg_id: b.u16()?,
                data: Bytes::copy_from_slice(b.rest()),
            }
        }
        0x0D => Message::PubAck {
            topic_id: b.pair()?,
            msg_id: b.u16()?,
            rc: b.u8()?,
        },
        0x0E => Message::PubComp { msg_id: b.u16()? },
        0x0F => Message::PubRec { msg_id: b.u16()? },
        0x10 => Message::PubRel { msg_id: b.u16()? },
        0x12 | 0x14 => {
            let flags = b.flags()?;
            let msg_id = b.u16()?;
            let topic = match flags.topic_id_type {
                0 => TopicRef::Name(b.text()?),
                1 => TopicRef::Predefined(b.u16()?),
                _ => TopicRef::Short(b.pair()?),
            };
            if t == 0x12 {
                Message::Subscribe {
                    flags,
                    msg_id,
                    topic,
                }
            } else {
                Message::Unsubscribe {
                    flags,
                    msg_id,
                    topic,
                }
            }
        }
        0x13 => Message::SubAck {
            flags: Flags::parse(b.u8()?),
            topic_id: b.u16()?,
            msg_id: b.u16()?,
            rc: b.u8()?,
        },
        0x15 => Message::UnsubAck { msg_id: b.u16()? },
        0x16 => Message::PingReq {
            client_id: if b.b.is_empty() {
                None
            } else {
                Some(b.text()?)
            },
        },
        0x17 => Message::PingResp,
        0x18 => Message::Disconnect {
            duration: if b.b.is_empty() { None } else { Some(b.u16()?) },
        },
        0x1B => Message::WillTopicResp { rc: b.u8()? },
        0x1D => Message::WillMsgResp { rc: b.u8()? },
        0xFE => {
            if depth > 0 {
                return Err(DecodeError::UnknownType(0xFE));
            }
            let ctrl = b.u8()?;
            let node = Bytes::copy_from_slice(b.rest());
            let inner = decode_nested(&d[len..], depth + 1)?;
            return Ok(Message::Encapsulated {
                radius: ctrl & 3,
                node,
                inner: Box::new(inner),
            });
        }
        other => return Err(DecodeError::UnknownType(other)),
    };
    b.end()?;
    Ok(m)
}

/// Appends the encoding of `m` to `out`. Bodies longer than the 3-byte length allows are the
/// caller's to prevent (the gateway never builds one: its payloads come from bounded packets).
pub fn encode(m: &Message, out: &mut Vec<u8>) -> Result<(), TooLong> {
    let mut body = Vec::with_capacity(16);
    match m {
        Message::Advertise { gw_id, duration } => {
            body.push(*gw_id);
            body.extend_from_slice(&duration.to_be_bytes());
        }
        Message::SearchGw { radius } => {
            body.push(*radius);
        }
        Message::GwInfo { gw_id, address } => {
            body.push(*gw_id);
            body.extend_from_slice(address);
        }
        Message::Connect {
            flags,
            duration,
            client_id,
        } => {
            body.push(flags.byte());
            body.push(0x01);
            body.extend_from_slice(&duration.to_be_bytes());
            body.extend_from_slice(client_id.as_bytes());
        }
        Message::ConnAck { rc } => {
            body.push(*rc);
        }
        Message::WillTopicReq => {}
        Message::WillTopic(w) | Message::WillTopicUpd(w) => {
            if let Some((f, topic)) = w {
                body.push(f.byte());
                body.extend_from_slice(topic.as_bytes());
            }
        }
        Message::WillMsgReq => {}
        Message::WillMsg(d) => {
            body.extend_from_slice(d);
        }
        Message::WillMsgUpd(d) => {
            body.extend_from_slice(d);
        }
        Message::Register {
            topic_id,
            msg_id,
            topic,
        } => {
            body.extend_from_slice(&topic_id.to_be_bytes());
            body.extend_from_slice(&msg_id.to_be_bytes());
            body.extend_from_slice(topic.as_bytes());
        }
        Message::RegAck {
            topic_id,
            msg_id,
            rc,
        } => {
            body.extend_from_slice(&topic_id.to_be_bytes());
            body.extend_from_slice(&msg_id.to_be_bytes());
            body.push(*rc);
        }
        Message::Publish {
            flags,
            topic,
            msg_id,
            data,
        } => {
            let mut f = *flags;
            f.topic_id_type = topic.type_bits();
            body.push(f.byte());
            body.extend_from_slice(&topic.id_bytes());
            body.extend_from_slice(&msg_id.to_be_bytes());
            body.extend_from_slice(data);
        }
        Message::PubAck {
            topic_id,
            msg_id,
            rc,
        } => {
            body.extend_from_slice(topic_id);
            body.extend_from_slice(&msg_id.to_be_bytes());
            body.push(*rc);
        }
        Message::PubComp { msg_id } => {
            body.extend_from_slice(&msg_id.to_be_bytes());
        }
        Message::PubRec { msg_id } => {
            body.extend_from_slice(&msg_id.to_be_bytes());
        }
        Message::PubRel { msg_id } => {
            body.extend_from_slice(&msg_id.to_be_bytes());
        }
        Message::Subscribe {
            flags,
            msg_id,
            topic,
        }
        | Message::Unsubscribe {
            flags,
            msg_id,
            topic,
        } => {
            let mut f = *flags;
            f.topic_id_type = topic.type_bits();
            body.push(f.byte());
            body.extend_from_slice(&msg_id.to_be_bytes());
            match topic {
                TopicRef::Name(n) => body.extend_from_slice(n.as_bytes()),
                other => body.extend_from_slice(&other.id_bytes()),
            }
        }
        Message::SubAck {
            flags,
            topic_id,
            msg_id,
            rc,
        } => {
            body.push(flags.byte());
            body.extend_from_slice(&topic_id.to_be_bytes());
            body.extend_from_slice(&msg_id.to_be_bytes());
            body.push(*rc);
        }
        Message::UnsubAck { msg_id } => {
            body.extend_from_slice(&msg_id.to_be_bytes());
        }
        Message::PingReq { client_id } => {
            if let Some(c) = client_id {
                body.extend_from_slice(c.as_bytes());
            }
        }
        Message::PingResp => {}
        Message::Disconnect { duration } => {
            if let Some(d) = duration {
                body.extend_from_slice(&d.to_be_bytes());
            }
        }
        Message::WillTopicResp { rc } => {
            body.push(*rc);
        }
        Message::WillMsgResp { rc } => {
            body.push(*rc);
        }
        Message::Encapsulated {
            radius,
            node,
            inner,
        } => {
            body.push(radius & 3);
            body.extend_from_slice(node);
            let start = out.len();
            header(out, body.len() + 1)?;
            out.push(0xFE);
            out.extend_from_slice(&body);
            return encode(inner, out).inspect_err(|_| out.truncate(start));
        }
    }
    header(out, body.len() + 1)?;
    out.push(m.type_byte());
    out.extend_from_slice(&body);
    Ok(())
}

/// A message longer than the 3-byte length field can say (65,535 bytes): not encoded, since
/// a clipped length would make the client read another message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
#[error("MQTT-SN message longer than 65535 bytes")]
pub struct TooLong;

/// The length field for a message whose type byte and body are `n` bytes.
fn header(out: &mut Vec<u8>, n: usize) -> Result<(), TooLong> {
    if n < 255 {
        out.push((n + 1) as u8);
    } else {
        let total = u16::try_from(n + 3).map_err(|_| TooLong)?;
        out.push(0x01);
        out.extend_from_slice(&total.to_be_bytes());
    }
    Ok(())
}
