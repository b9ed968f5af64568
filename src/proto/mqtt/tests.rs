//! Table tests for the codec: one row per rule a decoder can check, named by the spec's
//! requirement id where it has one, then encode/decode round trips with proptest.

use bytes::Bytes;
use proptest::prelude::*;

use super::*;
use crate::proto::mqtt::encode::put_varint;

const MAX: u32 = 1 << 20;

/// Frames `body` with a fixed header.
fn pkt(first: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![first];
    put_varint(&mut v, body.len() as u32);
    v.extend_from_slice(body);
    v
}

fn s(x: &str) -> Vec<u8> {
    let mut v = (x.len() as u16).to_be_bytes().to_vec();
    v.extend_from_slice(x.as_bytes());
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A CONNECT body: protocol name, level, flags, keepalive 60, then the rest.
fn connect_body(name: &str, level: u8, flags: u8, rest: &[u8]) -> Vec<u8> {
    cat(&[&s(name), &[level, flags, 0, 60], rest])
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Want {
    Ok,
    Malformed,
    Protocol,
    TooLarge,
    Unsupported,
    BadName,
    TopicName,
    TopicFilter,
}

fn classify(r: &Result<Option<(Packet, usize)>, DecodeError>) -> Want {
    match r {
        Ok(Some(_)) => Want::Ok,
        Ok(None) => panic!("incomplete"),
        Err(DecodeError::Malformed(_)) => Want::Malformed,
        Err(DecodeError::Protocol(_)) => Want::Protocol,
        Err(DecodeError::TooLarge { .. }) => Want::TooLarge,
        Err(DecodeError::UnsupportedProtocolVersion(_)) => Want::Unsupported,
        Err(DecodeError::BadProtocolName) => Want::BadName,
        Err(DecodeError::TopicNameInvalid) => Want::TopicName,
        Err(DecodeError::TopicFilterInvalid) => Want::TopicFilter,
        Err(DecodeError::TopicAliasInvalid) => panic!("alias is the session's job"),
    }
}

const V3: Option<Version> = Some(Version::V311);
const V5: Option<Version> = Some(Version::V5);
const PRE: Option<Version> = None;

fn cases() -> Vec<(&'static str, Option<Version>, Vec<u8>, Want)> {
    use Want::*;
    let pid = [0u8, 1];
    let props0 = [0u8];
    vec![
        // Fixed header, 2.x and 1.5
        (
            "reserved type 0 [MQTT-2.1.3-1]",
            V3,
            pkt(0x00, &[]),
            Malformed,
        ),
        (
            "type 15 before v5 is reserved",
            V3,
            pkt(0xF0, &[]),
            Malformed,
        ),
        (
            "PUBACK flags must be 0 [MQTT-2.2.2-1]",
            V3,
            pkt(0x41, &pid),
            Malformed,
        ),
        (
            "PINGREQ flags must be 0 [MQTT-2.2.2-2]",
            V3,
            pkt(0xC8, &[]),
            Malformed,
        ),
        (
            "PUBREL flags must be 0010 [MQTT-3.6.1-1]",
            V3,
            pkt(0x60, &pid),
            Malformed,
        ),
        (
            "3.1 resends PUBREL with DUP set (issue 18)",
            Some(Version::V31),
            pkt(0x6A, &pid),
            Ok,
        ),
        (
            "3.1 may set DUP on a resent SUBSCRIBE",
            Some(Version::V31),
            pkt(0x8A, &cat(&[&pid, &s("a"), &[0]])),
            Ok,
        ),
        (
            "3.1.1 PUBREL with DUP is malformed [MQTT-3.6.1-1]",
            V3,
            pkt(0x6A, &pid),
            Malformed,
        ),
        (
            "SUBSCRIBE flags must be 0010 [MQTT-3.8.1-1]",
            V3,
            pkt(0x80, &cat(&[&pid, &s("a"), &[0]])),
            Malformed,
        ),
        (
            "UNSUBSCRIBE flags must be 0010 [MQTT-3.10.1-1]",
            V3,
            pkt(0xA0, &cat(&[&pid, &s("a")])),
            Malformed,
        ),
        (
            "remaining length over 4 bytes [MQTT-1.5.5]",
            V3,
            vec![0xC0, 0x80, 0x80, 0x80, 0x80, 0x01],
            Malformed,
        ),
        (
            "remaining length not minimal [MQTT-1.5.5-1]",
            V3,
            vec![0xC0, 0x80, 0x00],
            Malformed,
        ),
        (
            "packet larger than maximum",
            V3,
            pkt(0x30, &cat(&[&s("t"), &vec![0u8; MAX as usize]])),
            TooLarge,
        ),
        (
            "PINGREQ with a body has trailing bytes",
            V3,
            pkt(0xC0, &[0]),
            Malformed,
        ),
        (
            "PUBACK 3.1.1 with a reason byte has trailing bytes",
            V3,
            pkt(0x40, &[0, 1, 0]),
            Malformed,
        ),
        ("PINGRESP decodes", V3, pkt(0xD0, &[]), Ok),
        // CONNECT, 3.1
        (
            "first packet must be CONNECT [MQTT-3.1.0-1]",
            PRE,
            pkt(0xC0, &[]),
            Protocol,
        ),
        (
            "second CONNECT [MQTT-3.1.0-2]",
            V3,
            pkt(0x10, &connect_body("MQTT", 4, 2, &s("c"))),
            Protocol,
        ),
        (
            "CONNECT 3.1.1",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 2, &s("c"))),
            Ok,
        ),
        (
            "CONNECT 3.1 (MQIsdp)",
            PRE,
            pkt(0x10, &connect_body("MQIsdp", 3, 2, &s("c"))),
            Ok,
        ),
        (
            "CONNECT 5 with empty properties",
            PRE,
            pkt(0x10, &connect_body("MQTT", 5, 2, &cat(&[&props0, &s("c")]))),
            Ok,
        ),
        (
            "protocol name wrong [MQTT-3.1.2-1]",
            PRE,
            pkt(0x10, &connect_body("MQTX", 4, 2, &s("c"))),
            BadName,
        ),
        (
            "protocol level unsupported [MQTT-3.1.2-2]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 6, 2, &s("c"))),
            Unsupported,
        ),
        (
            "MQTT name with level 3",
            PRE,
            pkt(0x10, &connect_body("MQTT", 3, 2, &s("c"))),
            Unsupported,
        ),
        (
            "CONNECT reserved flag [MQTT-3.1.2-3]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 3, &s("c"))),
            Malformed,
        ),
        (
            "will QoS without will flag [MQTT-3.1.2-11]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 0x0A, &s("c"))),
            Malformed,
        ),
        (
            "will retain without will flag [MQTT-3.1.2-15]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 0x22, &s("c"))),
            Malformed,
        ),
        (
            "will QoS 3 [MQTT-3.1.2-14]",
            PRE,
            pkt(
                0x10,
                &connect_body("MQTT", 4, 0x1E, &cat(&[&s("c"), &s("w"), &s("m")])),
            ),
            Malformed,
        ),
        (
            "will with a wildcard topic [MQTT-3.1.3-11]",
            PRE,
            pkt(
                0x10,
                &connect_body("MQTT", 4, 0x06, &cat(&[&s("c"), &s("w/#"), &s("m")])),
            ),
            TopicName,
        ),
        (
            "will flag without will fields [MQTT-3.1.2-9]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 0x06, &s("c"))),
            Malformed,
        ),
        (
            "password without username in 3.1.1 [MQTT-3.1.2-22]",
            PRE,
            pkt(
                0x10,
                &connect_body("MQTT", 4, 0x42, &cat(&[&s("c"), &s("p")])),
            ),
            Malformed,
        ),
        (
            "password without username is fine in v5",
            PRE,
            pkt(
                0x10,
                &connect_body("MQTT", 5, 0x42, &cat(&[&props0, &s("c"), &s("p")])),
            ),
            Ok,
        ),
        (
            "username flag without username [MQTT-3.1.2-19]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 0x82, &s("c"))),
            Malformed,
        ),
        (
            "binary password is accepted [MQTT-3.1.3.5]",
            PRE,
            pkt(
                0x10,
                &connect_body(
                    "MQTT",
                    4,
                    0xC2,
                    &cat(&[&s("c"), &s("u"), &[0, 2, 0xFF, 0x00]]),
                ),
            ),
            Ok,
        ),
        (
            "CONNECT with trailing bytes",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 2, &cat(&[&s("c"), &[0]]))),
            Malformed,
        ),
        (
            "client id ill-formed UTF-8 [MQTT-1.5.3-1]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 2, &[0, 2, 0xC0, 0x80])),
            Malformed,
        ),
        (
            "client id with a surrogate [MQTT-1.5.3-1]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 2, &[0, 3, 0xED, 0xA0, 0x80])),
            Malformed,
        ),
        (
            "client id with U+0000 [MQTT-1.5.3-2]",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 2, &[0, 1, 0])),
            Malformed,
        ),
        (
            "string longer than the packet",
            PRE,
            pkt(0x10, &connect_body("MQTT", 4, 2, &[0, 9, b'a'])),
            Malformed,
        ),
        // PUBLISH, 3.3
        (
            "PUBLISH QoS 3 [MQTT-3.3.1-4]",
            V3,
            pkt(0x36, &cat(&[&s("t"), &pid])),
            Malformed,
        ),
        (
            "DUP on QoS 0 [MQTT-3.3.1-2]",
            V3,
            pkt(0x38, &s("t")),
            Malformed,
        ),
        (
            "PUBLISH topic with + [MQTT-3.3.2-2]",
            V3,
            pkt(0x30, &s("a/+")),
            TopicName,
        ),
        (
            "PUBLISH topic with # [MQTT-3.3.2-2]",
            V3,
            pkt(0x30, &s("#")),
            TopicName,
        ),
        (
            "PUBLISH empty topic in 3.1.1 [MQTT-4.7.3-1]",
            V3,
            pkt(0x30, &s("")),
            TopicName,
        ),
        (
            "PUBLISH empty topic without alias in v5",
            V5,
            pkt(0x30, &cat(&[&s(""), &props0])),
            TopicName,
        ),
        (
            "PUBLISH empty topic with alias in v5",
            V5,
            pkt(0x30, &cat(&[&s(""), &[3, 0x23, 0, 1]])),
            Ok,
        ),
        (
            "PUBLISH topic with U+0000 [MQTT-1.5.3-2]",
            V3,
            pkt(0x30, &[0, 3, b'a', 0, b'b']),
            Malformed,
        ),
        (
            "PUBLISH QoS 1 packet id 0 [MQTT-2.3.1-1]",
            V3,
            pkt(0x32, &cat(&[&s("t"), &[0, 0]])),
            Malformed,
        ),
        (
            "PUBLISH QoS 0 has no packet id",
            V3,
            pkt(0x30, &cat(&[&s("t"), b"payload"])),
            Ok,
        ),
        (
            "PUBLISH subscription id 0 [MQTT-3.3.2-…]",
            V5,
            pkt(0x30, &cat(&[&s("t"), &[2, 0x0B, 0]])),
            Protocol,
        ),
        (
            "PUBLISH with a CONNECT-only property",
            V5,
            pkt(0x30, &cat(&[&s("t"), &[2, 0x17, 1]])),
            Malformed,
        ),
        (
            "PUBLISH with an unknown property",
            V5,
            pkt(0x30, &cat(&[&s("t"), &[2, 0x7F, 1]])),
            Malformed,
        ),
        (
            "PUBLISH with a property twice [MQTT-2.2.2-…]",
            V5,
            pkt(0x30, &cat(&[&s("t"), &[4, 0x01, 0, 0x01, 1]])),
            Protocol,
        ),
        (
            "PUBLISH with user property twice is fine",
            V5,
            pkt(
                0x30,
                &cat(&[
                    &s("t"),
                    &[12, 0x26, 0, 1, b'k', 0, 1, b'v', 0x26, 0, 0, 0, 0],
                ]),
            ),
            Ok,
        ),
        (
            "payload format indicator 2",
            V5,
            pkt(0x30, &cat(&[&s("t"), &[2, 0x01, 2]])),
            Protocol,
        ),
        (
            "properties longer than the packet",
            V5,
            pkt(0x30, &cat(&[&s("t"), &[9, 0x01]])),
            Malformed,
        ),
        (
            "response topic with a wildcard [MQTT-3.3.2-14]",
            V5,
            pkt(0x30, &cat(&[&s("t"), &[6, 0x08], &s("r/#")])),
            Protocol,
        ),
        // Acks, 3.4-3.7
        (
            "PUBACK packet id 0 [MQTT-2.3.1-1]",
            V3,
            pkt(0x40, &[0, 0]),
            Malformed,
        ),
        (
            "PUBACK v5 invalid reason",
            V5,
            pkt(0x40, &[0, 1, 0x05]),
            Malformed,
        ),
        ("PUBACK v5 short form", V5, pkt(0x40, &[0, 1]), Ok),
        (
            "PUBREC v5 with reason and properties",
            V5,
            pkt(0x50, &cat(&[&[0, 1, 0x10, 4, 0x1F], &s("x")])),
            Ok,
        ),
        (
            "PUBREL v5 invalid reason",
            V5,
            pkt(0x62, &[0, 1, 0x10]),
            Malformed,
        ),
        (
            "PUBCOMP v5 packet id not found",
            V5,
            pkt(0x70, &[0, 1, 0x92]),
            Ok,
        ),
        // SUBSCRIBE, 3.8
        (
            "SUBSCRIBE without filters [MQTT-3.8.3-3]",
            V3,
            pkt(0x82, &pid),
            Protocol,
        ),
        (
            "SUBSCRIBE packet id 0 [MQTT-2.3.1-1]",
            V3,
            pkt(0x82, &cat(&[&[0, 0], &s("a"), &[0]])),
            Malformed,
        ),
        (
            "SUBSCRIBE reserved option bits in 3.1.1 [MQTT-3.8.3-4]",
            V3,
            pkt(0x82, &cat(&[&pid, &s("a"), &[0x04]])),
            Malformed,
        ),
        (
            "SUBSCRIBE reserved option bits in v5 [MQTT-3.8.3-5]",
            V5,
            pkt(0x82, &cat(&[&pid, &props0, &s("a"), &[0x40]])),
            Malformed,
        ),
        (
            "SUBSCRIBE QoS 3 [MQTT-3-8.3-4]",
            V3,
            pkt(0x82, &cat(&[&pid, &s("a"), &[3]])),
            Malformed,
        ),
        (
            "SUBSCRIBE retain handling 3",
            V5,
            pkt(0x82, &cat(&[&pid, &props0, &s("a"), &[0x30]])),
            Protocol,
        ),
        (
            "SUBSCRIBE # not last [MQTT-4.7.1-1]",
            V3,
            pkt(0x82, &cat(&[&pid, &s("a/#/b"), &[0]])),
            TopicFilter,
        ),
        (
            "SUBSCRIBE + not whole level [MQTT-4.7.1-2]",
            V3,
            pkt(0x82, &cat(&[&pid, &s("a+"), &[0]])),
            TopicFilter,
        ),
        (
            "SUBSCRIBE empty filter [MQTT-4.7.3-1]",
            V3,
            pkt(0x82, &cat(&[&pid, &s(""), &[0]])),
            TopicFilter,
        ),
        (
            "SUBSCRIBE filter without options byte",
            V3,
            pkt(0x82, &cat(&[&pid, &s("a")])),
            Malformed,
        ),
        (
            "SUBSCRIBE shared with no local [MQTT-3.8.3-4]",
            V5,
            pkt(0x82, &cat(&[&pid, &props0, &s("$share/g/a"), &[0x04]])),
            Protocol,
        ),
        (
            "SUBSCRIBE shared without group",
            V5,
            pkt(0x82, &cat(&[&pid, &props0, &s("$share//a"), &[0]])),
            TopicFilter,
        ),
        (
            "SUBSCRIBE subscription id 0",
            V5,
            pkt(0x82, &cat(&[&pid, &[2, 0x0B, 0], &s("a"), &[0]])),
            Protocol,
        ),
        (
            "SUBSCRIBE two subscription ids",
            V5,
            pkt(0x82, &cat(&[&pid, &[4, 0x0B, 1, 0x0B, 2], &s("a"), &[0]])),
            Protocol,
        ),
        (
            "SUBSCRIBE v5 with options",
            V5,
            pkt(0x82, &cat(&[&pid, &[2, 0x0B, 7], &s("a/+"), &[0x2E]])),
            Ok,
        ),
        // UNSUBSCRIBE, 3.10
        (
            "UNSUBSCRIBE without filters [MQTT-3.10.3-2]",
            V3,
            pkt(0xA2, &pid),
            Protocol,
        ),
        (
            "UNSUBSCRIBE invalid filter",
            V3,
            pkt(0xA2, &cat(&[&pid, &s("#/a")])),
            TopicFilter,
        ),
        (
            "UNSUBSCRIBE v5",
            V5,
            pkt(0xA2, &cat(&[&pid, &props0, &s("a")])),
            Ok,
        ),
        // DISCONNECT and AUTH, 3.14-3.15
        (
            "DISCONNECT 3.1.1 with a body",
            V3,
            pkt(0xE0, &[0]),
            Malformed,
        ),
        (
            "DISCONNECT v5 invalid reason",
            V5,
            pkt(0xE0, &[0x05]),
            Malformed,
        ),
        ("DISCONNECT v5 bare", V5, pkt(0xE0, &[]), Ok),
        (
            "DISCONNECT v5 with session expiry",
            V5,
            pkt(0xE0, &[0, 5, 0x11, 0, 0, 0, 9]),
            Ok,
        ),
        (
            "DISCONNECT v5 with a CONNECT-only property",
            V5,
            pkt(0xE0, &[0, 2, 0x17, 1]),
            Malformed,
        ),
        ("AUTH v5 invalid reason", V5, pkt(0xF0, &[0x01]), Malformed),
        (
            "AUTH v5 continue",
            V5,
            pkt(0xF0, &cat(&[&[0x18, 5, 0x15], &s("xy")])),
            Ok,
        ),
        // CONNECT properties
        (
            "receive maximum 0 [MQTT-3.1.2-…]",
            PRE,
            pkt(
                0x10,
                &connect_body("MQTT", 5, 2, &cat(&[&[3, 0x21, 0, 0], &s("c")])),
            ),
            Protocol,
        ),
        (
            "maximum packet size 0",
            PRE,
            pkt(
                0x10,
                &connect_body("MQTT", 5, 2, &cat(&[&[5, 0x27, 0, 0, 0, 0], &s("c")])),
            ),
            Protocol,
        ),
        (
            "request problem information 2",
            PRE,
            pkt(
                0x10,
                &connect_body("MQTT", 5, 2, &cat(&[&[2, 0x17, 2], &s("c")])),
            ),
            Protocol,
        ),
        (
            "will delay in CONNECT properties",
            PRE,
            pkt(
                0x10,
                &connect_body("MQTT", 5, 2, &cat(&[&[5, 0x18, 0, 0, 0, 1], &s("c")])),
            ),
            Malformed,
        ),
        (
            "session expiry twice",
            PRE,
            pkt(
                0x10,
                &connect_body(
                    "MQTT",
                    5,
                    2,
                    &cat(&[&[10, 0x11, 0, 0, 0, 1, 0x11, 0, 0, 0, 2], &s("c")]),
                ),
            ),
            Protocol,
        ),
        (
            "will properties with will delay",
            PRE,
            pkt(
                0x10,
                &connect_body(
                    "MQTT",
                    5,
                    0x06,
                    &cat(&[&props0, &s("c"), &[5, 0x18, 0, 0, 0, 9], &s("w"), &s("m")]),
                ),
            ),
            Ok,
        ),
        // Server-to-client packets decode too (the bridge's client needs them).
        (
            "CONNACK reserved flags [MQTT-3.2.2-…]",
            V3,
            pkt(0x20, &[2, 0]),
            Malformed,
        ),
        (
            "CONNACK v5 invalid code",
            V5,
            pkt(0x20, &[0, 0x01, 0]),
            Malformed,
        ),
        (
            "SUBACK 3.1.1 invalid code",
            V3,
            pkt(0x90, &[0, 1, 3]),
            Malformed,
        ),
        (
            "SUBACK 3.1.1 failure code",
            V3,
            pkt(0x90, &[0, 1, 0x80]),
            Ok,
        ),
        (
            "UNSUBACK v5 with codes",
            V5,
            pkt(0xB0, &[0, 1, 0, 0x11]),
            Ok,
        ),
        (
            "UNSUBACK 3.1.1 with trailing bytes",
            V3,
            pkt(0xB0, &[0, 1, 0]),
            Malformed,
        ),
    ]
}

#[test]
fn table() {
    let mut failures = Vec::new();
    for (name, v, bytes, want) in cases() {
        let got = decode(&bytes, v, MAX);
        if let Ok(Some((_, n))) = &got {
            assert_eq!(*n, bytes.len(), "{name}: consumed");
        }
        let got = classify(&got);
        if got != want {
            failures.push(format!("{name}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Incomplete input is never an error: every strict prefix of a valid packet asks for more.
#[test]
fn prefixes_are_incomplete() {
    for (name, v, bytes, want) in cases() {
        if want != Want::Ok {
            continue;
        }
        for cut in 0..bytes.len() {
            assert_eq!(
                decode(&bytes[..cut], v, MAX),
                Ok(None),
                "{name} cut at {cut}"
            );
        }
    }
}

/// The size limit is applied from the header alone, before the body has arrived.
#[test]
fn oversize_refused_before_body_arrives() {
    let header = [0x30, 0xFF, 0xFF, 0xFF, 0x7F];
    assert!(matches!(
        decode(&header, V3, MAX),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn error_reactions() {
    assert_eq!(
        DecodeError::Malformed("x").reason_code(),
        reason::MALFORMED_PACKET
    );
    assert_eq!(
        DecodeError::Protocol("x").reason_code(),
        reason::PROTOCOL_ERROR
    );
    assert_eq!(
        DecodeError::TooLarge { size: 9, max: 1 }.reason_code(),
        reason::PACKET_TOO_LARGE
    );
    assert_eq!(
        DecodeError::TopicNameInvalid.reason_code(),
        reason::TOPIC_NAME_INVALID
    );
    assert_eq!(
        DecodeError::TopicAliasInvalid.reason_code(),
        reason::TOPIC_ALIAS_INVALID
    );
}

#[test]
fn two_packets_in_one_buffer() {
    let mut b = pkt(0xC0, &[]);
    b.extend(pkt(0x40, &[0, 7]));
    let (p1, n1) = decode(&b, V3, MAX).unwrap().unwrap();
    assert_eq!(p1, Packet::PingReq);
    let (p2, _) = decode(&b[n1..], V3, MAX).unwrap().unwrap();
    assert_eq!(
        p2,
        Packet::PubAck(Ack {
            packet_id: 7,
            ..Ack::default()
        })
    );
}

// ---- round trips ----

fn text() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9 é€😀/_-]{0,12}"
}

fn topic_name() -> impl Strategy<Value = String> {
    "[a-z0-9]{1,6}(/[a-z0-9]{0,6}){0,3}"
}

fn filter() -> impl Strategy<Value = String> {
    prop_oneof![
        topic_name(),
        Just("#".to_owned()),
        Just("a/+/c".to_owned()),
        Just("+/#".to_owned()),
        Just("$share/grp/x/+".to_owned()),
    ]
}

fn bin() -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..20).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn user_props() -> impl Strategy<Value = Vec<(String, String)>> {
    proptest::collection::vec((text(), text()), 0..3)
}

fn publish_props() -> impl Strategy<Value = Properties> {
    (
        proptest::option::of(0u8..=1),
        proptest::option::of(any::<u32>()),
        proptest::option::of(text()),
        proptest::option::of(topic_name()),
        proptest::option::of(bin()),
        proptest::collection::vec(1u32..268_435_455, 0..3),
        proptest::option::of(1u16..),
        user_props(),
    )
        .prop_map(|(pfi, exp, ct, rt, cd, ids, alias, up)| Properties {
            payload_format_indicator: pfi,
            message_expiry_interval: exp,
            content_type: ct,
            response_topic: rt,
            correlation_data: cd,
            subscription_identifiers: ids,
            topic_alias: alias,
            user_properties: up,
            ..Properties::default()
        })
}

fn publish(v5: bool) -> impl Strategy<Value = Packet> {
    (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic_name(),
        1u16..,
        bin(),
        publish_props(),
    )
        .prop_map(move |(qos, dup, retain, topic, pid, payload, props)| {
            let zero = qos == QoS::AtMostOnce;
            Packet::Publish(Publish {
                dup: dup && !zero,
                qos,
                retain,
                topic,
                packet_id: if zero { 0 } else { pid },
                payload,
                properties: if v5 { props.into() } else { Props::default() },
            })
        })
}

fn connect(version: Version) -> impl Strategy<Value = Packet> {
    let v5 = version.is_v5();
    (
        any::<bool>(),
        any::<u16>(),
        "[a-zA-Z0-9]{0,23}",
        proptest::option::of((
            topic_name(),
            bin(),
            qos(),
            any::<bool>(),
            proptest::option::of(any::<u32>()),
        )),
        proptest::option::of(text()),
        proptest::option::of(bin()),
        proptest::option::of(any::<u32>()),
        proptest::option::of(1u16..),
        user_props(),
    )
        .prop_map(move |(clean, ka, id, will, user, pass, sei, rm, up)| {
            // 3.1.1 forbids a password without a username.
            let pass = if v5 || user.is_some() { pass } else { None };
            let props = if v5 {
                Properties {
                    session_expiry_interval: sei,
                    receive_maximum: rm,
                    user_properties: up,
                    ..Properties::default()
                }
            } else {
                Properties::default()
            };
            Packet::Connect(Box::new(Connect {
                version,
                clean_start: clean,
                keep_alive: ka,
                client_id: id,
                will: will.map(|(topic, payload, qos, retain, delay)| Will {
                    topic,
                    payload,
                    qos,
                    retain,
                    properties: Properties {
                        will_delay_interval: if v5 { delay } else { None },
                        ..Properties::default()
                    }
                    .into(),
                }),
                username: user,
                password: pass,
                properties: props.into(),
            }))
        })
}

fn ack_reason(v5: bool, codes: &'static [u8]) -> impl Strategy<Value = u8> {
    proptest::sample::select(codes).prop_map(move |c| if v5 { c } else { 0 })
}

fn other(v5: bool) -> impl Strategy<Value = Packet> {
    let props = move |p: Vec<(String, String)>| Properties {
        user_properties: if v5 { p } else { Vec::new() },
        ..Properties::default()
    };
    let sub_opts =
        (qos(), any::<bool>(), any::<bool>(), 0u8..3).prop_map(move |(q, nl, rap, rh)| {
            SubOptions {
                qos: q,
                no_local: nl && v5,
                retain_as_published: rap && v5,
                retain_handling: if v5 { rh } else { 0 },
            }
        });
    prop_oneof![
        (1u16.., ack_reason(v5, &[0, 0x10, 0x80, 0x97]), user_props()).prop_map(
            move |(id, r, up)| Packet::PubAck(Ack {
                packet_id: id,
                reason: r,
                properties: props(up).into()
            })
        ),
        (1u16.., ack_reason(v5, &[0, 0x92]), user_props()).prop_map(move |(id, r, up)| {
            Packet::PubRel(Ack {
                packet_id: id,
                reason: r,
                properties: props(up).into(),
            })
        }),
        (
            1u16..,
            proptest::collection::vec((filter(), sub_opts), 1..4)
        )
            .prop_map(move |(id, f)| {
                // No Local is a protocol error on a shared subscription.
                let f = f
                    .into_iter()
                    .map(|(t, mut o)| {
                        if t.starts_with("$share/") {
                            o.no_local = false;
                        }
                        (t, o)
                    })
                    .collect();
                Packet::Subscribe(Subscribe {
                    packet_id: id,
                    filters: f,
                    properties: Props::default(),
                })
            }),
        (
            1u16..,
            proptest::collection::vec(proptest::sample::select(&[0u8, 1, 2, 0x80][..]), 1..4)
        )
            .prop_map(|(id, c)| Packet::SubAck(SubAck {
                packet_id: id,
                codes: c,
                properties: Props::default()
            })),
        (1u16.., proptest::collection::vec(filter(), 1..4)).prop_map(
            |(id, f)| Packet::Unsubscribe(Unsubscribe {
                packet_id: id,
                filters: f,
                properties: Props::default()
            })
        ),
        (
            1u16..,
            proptest::collection::vec(proptest::sample::select(&[0u8, 0x11][..]), 1..4)
        )
            .prop_map(move |(id, c)| {
                Packet::UnsubAck(UnsubAck {
                    packet_id: id,
                    codes: if v5 { c } else { Vec::new() },
                    properties: Props::default(),
                })
            }),
        (
            any::<bool>(),
            0u8..6,
            proptest::option::of(1u16..),
            proptest::option::of(text())
        )
            .prop_map(move |(sp, code, ka, assigned)| {
                Packet::ConnAck(ConnAck {
                    session_present: sp,
                    code: if v5 {
                        [0, 0x80, 0x84, 0x85, 0x86, 0x87][code as usize]
                    } else {
                        code
                    },
                    properties: if v5 {
                        Properties {
                            server_keep_alive: ka,
                            assigned_client_identifier: assigned,
                            ..Properties::default()
                        }
                        .into()
                    } else {
                        Props::default()
                    },
                })
            }),
        Just(Packet::PingReq),
        Just(Packet::PingResp),
        (
            ack_reason(v5, &[0, 0x04, 0x81, 0x8E]),
            proptest::option::of(any::<u32>())
        )
            .prop_map(move |(r, e)| {
                Packet::Disconnect(Disconnect {
                    reason: r,
                    properties: Properties {
                        session_expiry_interval: if v5 { e } else { None },
                        ..Properties::default()
                    }
                    .into(),
                })
            }),
    ]
}

fn roundtrip(p: &Packet, v: Version) -> Result<(), TestCaseError> {
    let mut buf = Vec::new();
    encode(p, v, &mut buf).unwrap();
    prop_assert_eq!(buf.len(), encoded_len(p, v));
    let before = if matches!(p, Packet::Connect(_)) {
        None
    } else {
        Some(v)
    };
    let (back, n) = decode(&buf, before, u32::MAX)
        .map_err(|e| TestCaseError::fail(format!("{e} for {p:?}")))?
        .ok_or_else(|| TestCaseError::fail("incomplete"))?;
    prop_assert_eq!(n, buf.len());
    prop_assert_eq!(&back, p);
    Ok(())
}

proptest! {
    #[test]
    fn roundtrip_v5(p in prop_oneof![publish(true), connect(Version::V5), other(true)]) {
        roundtrip(&p, Version::V5)?;
    }

    #[test]
    fn roundtrip_v311(p in prop_oneof![publish(false), connect(Version::V311), other(false)]) {
        roundtrip(&p, Version::V311)?;
    }

    #[test]
    fn roundtrip_v31(p in prop_oneof![publish(false), connect(Version::V31), other(false)]) {
        roundtrip(&p, Version::V31)?;
    }

    /// Arbitrary bytes never panic the decoder, at any level.
    #[test]
    fn garbage_never_panics(b in proptest::collection::vec(any::<u8>(), 0..64), lvl in 0usize..4) {
        let v = [None, Some(Version::V31), Some(Version::V311), Some(Version::V5)][lvl];
        let _ = decode(&b, v, 1024);
    }
}

/// Packets move through channels and queues by value: properties live out of line so that a
/// packet stays a few words, not the 400 bytes the full v5 property set takes inline.
#[test]
fn packets_stay_small() {
    assert!(std::mem::size_of::<Props>() == std::mem::size_of::<usize>());
    assert!(
        std::mem::size_of::<Packet>() <= 96,
        "{}",
        std::mem::size_of::<Packet>()
    );
}

/// Writes the table's vectors as the `mqtt_decode` fuzz target's seeds (byte 0 names the level
/// as the target reads it): `cargo test export_fuzz_seeds -- --ignored`.
#[test]
#[ignore]
fn export_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/mqtt_decode");
    std::fs::create_dir_all(&dir).expect("seed dir");
    for (i, (_, v, bytes, _)) in cases().into_iter().enumerate() {
        let level = match v {
            None => 0u8,
            Some(Version::V31) => 1,
            Some(Version::V311) => 2,
            Some(Version::V5) => 3,
        };
        let mut seed = vec![level | 0x08 | 0x30];
        seed.extend_from_slice(&bytes);
        std::fs::write(dir.join(format!("table-{i:03}")), seed).expect("seed");
    }
}

/// Issue 18: the encoder wrote `len as u16` for a topic of 65,536 bytes and more, so the peer
/// read a different packet. It writes nothing and says why.
#[test]
fn fields_over_their_length_prefix_are_not_encoded() {
    let mut out = Vec::new();
    let p = Packet::Publish(Publish {
        topic: "t".repeat(65_536),
        ..Publish::default()
    });
    assert_eq!(
        encode(&p, Version::V311, &mut out),
        Err(crate::proto::mqtt::encode::EncodeError::FieldTooLong)
    );
    assert!(out.is_empty());
    let p = Packet::Publish(Publish {
        topic: "t".repeat(65_535),
        ..Publish::default()
    });
    encode(&p, Version::V311, &mut out).unwrap();
    assert_eq!(
        decode(&out, Some(Version::V311), u32::MAX)
            .unwrap()
            .unwrap()
            .0,
        p
    );
    let mut props = Properties::default();
    props.user_properties.push(("k".into(), "v".repeat(70_000)));
    let p = Packet::Publish(Publish {
        topic: "t".into(),
        properties: props.into(),
        ..Publish::default()
    });
    out.clear();
    assert!(encode(&p, Version::V5, &mut out).is_err());
    // 3.1.1 carries no properties: nothing too long is written.
    assert!(encode(&p, Version::V311, &mut out).is_ok());
}
