//! Codec tables: each message type against bytes written out by hand from the specification,
//! a round trip for each, strictness, and a property that garbage never panics.

use bytes::Bytes;
use proptest::prelude::*;

use super::codec::rc;
use super::*;

fn f(qos: SnQos, topic_id_type: u8) -> Flags {
    Flags {
        qos,
        topic_id_type,
        ..Flags::default()
    }
}

/// (message, its bytes)
fn table() -> Vec<(Message, Vec<u8>)> {
    vec![
        (
            Message::Advertise {
                gw_id: 1,
                duration: 900,
            },
            vec![5, 0x00, 1, 0x03, 0x84],
        ),
        (Message::SearchGw { radius: 0 }, vec![3, 0x01, 0]),
        (
            Message::GwInfo {
                gw_id: 7,
                address: Bytes::new(),
            },
            vec![3, 0x02, 7],
        ),
        (
            Message::GwInfo {
                gw_id: 7,
                address: Bytes::from_static(&[10, 0, 0, 1]),
            },
            vec![7, 0x02, 7, 10, 0, 0, 1],
        ),
        (
            Message::Connect {
                flags: Flags {
                    will: true,
                    clean_session: true,
                    ..Flags::default()
                },
                duration: 60,
                client_id: "soil1".into(),
            },
            vec![11, 0x04, 0x0C, 0x01, 0, 60, b's', b'o', b'i', b'l', b'1'],
        ),
        (Message::ConnAck { rc: rc::ACCEPTED }, vec![3, 0x05, 0]),
        (Message::WillTopicReq, vec![2, 0x06]),
        (
            Message::WillTopic(Some((
                Flags {
                    qos: SnQos::One,
                    retain: true,
                    ..Flags::default()
                },
                "w/x".into(),
            ))),
            vec![6, 0x07, 0x30, b'w', b'/', b'x'],
        ),
        (Message::WillTopic(None), vec![2, 0x07]),
        (Message::WillMsgReq, vec![2, 0x08]),
        (
            Message::WillMsg(Bytes::from_static(b"gone")),
            vec![6, 0x09, b'g', b'o', b'n', b'e'],
        ),
        (
            Message::Register {
                topic_id: 0,
                msg_id: 1,
                topic: "a/b".into(),
            },
            vec![9, 0x0A, 0, 0, 0, 1, b'a', b'/', b'b'],
        ),
        (
            Message::RegAck {
                topic_id: 0x0102,
                msg_id: 1,
                rc: rc::ACCEPTED,
            },
            vec![7, 0x0B, 1, 2, 0, 1, 0],
        ),
        (
            Message::Publish {
                flags: f(SnQos::One, 0),
                topic: TopicRef::Id(0x0102),
                msg_id: 9,
                data: Bytes::from_static(b"21"),
            },
            vec![9, 0x0C, 0x20, 1, 2, 0, 9, b'2', b'1'],
        ),
        (
            Message::Publish {
                flags: f(SnQos::MinusOne, 1),
                topic: TopicRef::Predefined(5),
                msg_id: 0,
                data: Bytes::from_static(b"x"),
            },
            vec![8, 0x0C, 0x61, 0, 5, 0, 0, b'x'],
        ),
        (
            Message::Publish {
                flags: Flags {
                    dup: true,
                    qos: SnQos::Two,
                    retain: true,
                    ..f(SnQos::Two, 2)
                },
                topic: TopicRef::Short(*b"ab"),
                msg_id: 3,
                data: Bytes::new(),
            },
            vec![7, 0x0C, 0xD2, b'a', b'b', 0, 3],
        ),
        (
            // The topic id bytes echo in the order they came (Paho's gateway swaps them).
            Message::PubAck {
                topic_id: *b"ab",
                msg_id: 3,
                rc: rc::ACCEPTED,
            },
            vec![7, 0x0D, b'a', b'b', 0, 3, 0],
        ),
        (Message::PubComp { msg_id: 3 }, vec![4, 0x0E, 0, 3]),
        (Message::PubRec { msg_id: 3 }, vec![4, 0x0F, 0, 3]),
        (Message::PubRel { msg_id: 3 }, vec![4, 0x10, 0, 3]),
        (
            Message::Subscribe {
                flags: f(SnQos::One, 0),
                msg_id: 2,
                topic: TopicRef::Name("s/#".into()),
            },
            vec![8, 0x12, 0x20, 0, 2, b's', b'/', b'#'],
        ),
        (
            Message::Subscribe {
                flags: f(SnQos::Zero, 1),
                msg_id: 2,
                topic: TopicRef::Predefined(7),
            },
            vec![7, 0x12, 0x01, 0, 2, 0, 7],
        ),
        (
            Message::Subscribe {
                flags: f(SnQos::Two, 2),
                msg_id: 2,
                topic: TopicRef::Short(*b"zz"),
            },
            vec![7, 0x12, 0x42, 0, 2, b'z', b'z'],
        ),
        (
            Message::SubAck {
                flags: f(SnQos::One, 0),
                topic_id: 0,
                msg_id: 2,
                rc: rc::ACCEPTED,
            },
            vec![8, 0x13, 0x20, 0, 0, 0, 2, 0],
        ),
        (
            Message::Unsubscribe {
                flags: f(SnQos::Zero, 0),
                msg_id: 4,
                topic: TopicRef::Name("s/#".into()),
            },
            vec![8, 0x14, 0x00, 0, 4, b's', b'/', b'#'],
        ),
        (Message::UnsubAck { msg_id: 4 }, vec![4, 0x15, 0, 4]),
        (Message::PingReq { client_id: None }, vec![2, 0x16]),
        (
            Message::PingReq {
                client_id: Some("soil1".into()),
            },
            vec![7, 0x16, b's', b'o', b'i', b'l', b'1'],
        ),
        (Message::PingResp, vec![2, 0x17]),
        (Message::Disconnect { duration: None }, vec![2, 0x18]),
        (
            Message::Disconnect {
                duration: Some(600),
            },
            vec![4, 0x18, 0x02, 0x58],
        ),
        (
            Message::WillTopicUpd(Some((f(SnQos::Zero, 0), "w".into()))),
            vec![4, 0x1A, 0x00, b'w'],
        ),
        (Message::WillTopicUpd(None), vec![2, 0x1A]),
        (
            Message::WillTopicResp { rc: rc::ACCEPTED },
            vec![3, 0x1B, 0],
        ),
        (
            Message::WillMsgUpd(Bytes::from_static(b"m")),
            vec![3, 0x1C, b'm'],
        ),
        (
            Message::WillMsgResp {
                rc: rc::NOT_SUPPORTED,
            },
            vec![3, 0x1D, 3],
        ),
        (
            Message::Encapsulated {
                radius: 1,
                node: Bytes::from_static(&[0xAA, 0xBB]),
                inner: Box::new(Message::PingResp),
            },
            vec![5, 0xFE, 0x01, 0xAA, 0xBB, 2, 0x17],
        ),
    ]
}

#[test]
fn every_message_type_decodes_from_its_bytes_and_encodes_back() {
    let t = table();
    let types: std::collections::BTreeSet<&str> = t.iter().map(|(m, _)| m.name()).collect();
    assert_eq!(
        types.len(),
        28,
        "every MQTT-SN 1.2 message type is in the table"
    );
    for (m, bytes) in t {
        assert_eq!(decode(&bytes).as_ref(), Ok(&m), "decode {}", m.name());
        let mut out = Vec::new();
        encode(&m, &mut out).unwrap();
        assert_eq!(out, bytes, "encode {}", m.name());
    }
}

#[test]
fn three_byte_length() {
    let data = Bytes::from(vec![7u8; 300]);
    let m = Message::Publish {
        flags: f(SnQos::One, 0),
        topic: TopicRef::Id(1),
        msg_id: 1,
        data,
    };
    let mut out = Vec::new();
    encode(&m, &mut out).unwrap();
    assert_eq!(&out[..3], &[0x01, 0x01, 0x35], "0x01 then 309 as two bytes");
    assert_eq!(out.len(), 309);
    assert_eq!(decode(&out), Ok(m));
}

#[test]
fn strictness() {
    use DecodeError::*;
    let cases: Vec<(Vec<u8>, DecodeError)> = vec![
        (vec![], Empty),
        (vec![5, 0x17], Length { said: 5, got: 2 }),
        (vec![2, 0x17, 0], Length { said: 2, got: 3 }),
        (vec![0, 0x17], Length { said: 0, got: 2 }),
        (vec![2, 0x03], UnknownType(0x03)),
        (vec![2, 0x11], UnknownType(0x11)),
        (vec![2, 0x19], UnknownType(0x19)),
        (vec![2, 0xFF], UnknownType(0xFF)),
        (vec![3, 0x17, 0], Trailing("PINGRESP")),
        (vec![3, 0x0E, 0], Short("PUBCOMP")),
        (vec![6, 0x0C, 0x20, 0, 1, 0], Short("PUBLISH")),
        (
            vec![7, 0x0C, 0x23, 0, 1, 0, 1],
            ReservedTopicIdType("PUBLISH"),
        ),
        (vec![7, 0x04, 0x04, 0x02, 0, 10, b'a'], ProtocolId(0x02)),
        (vec![6, 0x04, 0x04, 0x01, 0, 10], ClientIdLength(0)),
        (
            [vec![30, 0x04, 0x04, 0x01, 0, 10], vec![b'a'; 24]].concat(),
            ClientIdLength(24),
        ),
        (vec![5, 0x0A, 0, 0, 0], Short("REGISTER")),
        (vec![8, 0x0A, 0, 0, 0, 1, 0xFF, 0xFE], Utf8("REGISTER")),
        (vec![1, 0, 2], Short("message type")),
        (vec![1, 0], Short("length")),
        // An encapsulated message inside another.
        (vec![3, 0xFE, 0, 3, 0xFE, 0, 2, 0x17], UnknownType(0xFE)),
    ];
    for (bytes, want) in cases {
        assert_eq!(decode(&bytes), Err(want.clone()), "{bytes:?}");
        // Every error has words a log line can use.
        assert!(!want.to_string().is_empty());
    }
}

fn qos() -> impl Strategy<Value = SnQos> {
    prop_oneof![
        Just(SnQos::Zero),
        Just(SnQos::One),
        Just(SnQos::Two),
        Just(SnQos::MinusOne)
    ]
}

fn flags() -> impl Strategy<Value = Flags> {
    (
        any::<bool>(),
        qos(),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
        0u8..3,
    )
        .prop_map(
            |(dup, qos, retain, will, clean_session, topic_id_type)| Flags {
                dup,
                qos,
                retain,
                will,
                clean_session,
                topic_id_type,
            },
        )
}

fn topic_ref() -> impl Strategy<Value = TopicRef> {
    prop_oneof![
        any::<u16>().prop_map(TopicRef::Id),
        any::<u16>().prop_map(TopicRef::Predefined),
        any::<[u8; 2]>().prop_map(TopicRef::Short),
    ]
}

/// Any well-formed message (the gateway tests feed these too).
pub(super) fn message() -> impl Strategy<Value = Message> {
    let data = proptest::collection::vec(any::<u8>(), 0..400).prop_map(Bytes::from);
    prop_oneof![
        (flags(), topic_ref(), any::<u16>(), data.clone()).prop_map(
            |(mut flags, topic, msg_id, data)| {
                flags.topic_id_type = match topic {
                    TopicRef::Predefined(_) => 1,
                    TopicRef::Short(_) => 2,
                    _ => 0,
                };
                Message::Publish {
                    flags,
                    topic,
                    msg_id,
                    data,
                }
            }
        ),
        (any::<u16>(), any::<u16>(), "[a-z/]{1,40}").prop_map(|(topic_id, msg_id, topic)| {
            Message::Register {
                topic_id,
                msg_id,
                topic,
            }
        }),
        (flags(), any::<u16>(), "[a-z]{1,23}").prop_map(|(mut flags, duration, client_id)| {
            flags.topic_id_type = 0;
            Message::Connect {
                flags,
                duration,
                client_id,
            }
        }),
        (flags(), any::<u16>(), "[a-z/#+]{1,30}").prop_map(|(mut flags, msg_id, t)| {
            flags.topic_id_type = 0;
            Message::Subscribe {
                flags,
                msg_id,
                topic: TopicRef::Name(t),
            }
        }),
        data.prop_map(Message::WillMsgUpd),
        proptest::option::of(any::<u16>()).prop_map(|duration| Message::Disconnect { duration }),
    ]
}

proptest! {
    #[test]
    fn round_trips(m in message()) {
        let mut out = Vec::new();
        encode(&m, &mut out).unwrap();
        prop_assert_eq!(decode(&out), Ok(m));
    }

    #[test]
    fn garbage_never_panics(d in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode(&d);
    }
}

/// Writes the table's datagrams as seeds for the `mqttsn_decode` fuzz target, and SLIP-framed
/// (with and without CRC) for `mqttsn_serial`: `cargo test export_fuzz_seeds -- --ignored`.
#[test]
#[ignore]
fn export_fuzz_seeds() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    let (dgrams, serial) = (root.join("mqttsn_decode"), root.join("mqttsn_serial"));
    std::fs::create_dir_all(&dgrams).expect("seed dir");
    std::fs::create_dir_all(&serial).expect("seed dir");
    for (i, (_, bytes)) in table().into_iter().enumerate() {
        std::fs::write(dgrams.join(format!("table-{i:03}")), &bytes).expect("seed");
        let crc = (i % 2) as u8;
        let mut framed = vec![crc | 0x0E];
        super::serial::encode_frame(&bytes, crc == 1, &mut framed);
        std::fs::write(serial.join(format!("table-{i:03}")), framed).expect("seed");
    }
}
