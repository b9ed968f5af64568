//! A raw MQTT-SN client over UDP, speaking through outpost's codec: for what mqtt-sn-12 cannot
//! do from Rust tests and benchmarks (blocking, one datagram at a time).

use std::net::UdpSocket;
use std::time::Duration;

use outpost::proto::mqttsn::{decode, encode, Flags, Message};

pub struct SnClient(UdpSocket);

impl SnClient {
    pub fn new(port: u16) -> SnClient {
        let s = UdpSocket::bind("127.0.0.1:0").expect("udp bind");
        s.connect(("127.0.0.1", port)).expect("udp connect");
        SnClient(s)
    }

    pub fn send(&self, m: &Message) {
        let mut d = Vec::new();
        encode(m, &mut d).expect("test messages are small");
        self.0.send(&d).expect("udp send");
    }

    /// The next reply; panics after 10 s without one.
    pub fn recv(&self) -> Message {
        self.recv_within(Duration::from_secs(10))
            .expect("a reply from the gateway")
    }

    /// The next reply, or `None` after `limit`.
    pub fn recv_within(&self, limit: Duration) -> Option<Message> {
        self.0.set_read_timeout(Some(limit)).expect("read timeout");
        let mut b = [0u8; 2048];
        let n = self.0.recv(&mut b).ok()?;
        Some(decode(&b[..n]).expect("a well-formed reply"))
    }

    /// CONNECT with clean session and a 60 s keep-alive; asserts CONNACK accepted.
    pub fn connect(&self, id: &str) {
        self.send(&Message::Connect {
            flags: Flags {
                clean_session: true,
                ..Flags::default()
            },
            duration: 60,
            client_id: id.into(),
        });
        assert_eq!(self.recv(), Message::ConnAck { rc: 0 });
    }

    /// REGISTERs `topic`; returns its topic id.
    pub fn register(&self, topic: &str) -> u16 {
        self.send(&Message::Register {
            topic_id: 0,
            msg_id: 1,
            topic: topic.into(),
        });
        match self.recv() {
            Message::RegAck {
                topic_id, rc: 0, ..
            } => topic_id,
            other => panic!("REGACK expected, got {other:?}"),
        }
    }
}
