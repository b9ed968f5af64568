//! What each fuzz target checks, as plain functions of the input bytes. The libFuzzer targets in
//! `fuzz_targets/` are one line each around these; `tests/fuzz_replay.rs` in the main crate
//! includes this file and replays the seeds and every crash ever found, so a regression fails
//! the ordinary test run without a nightly toolchain.
//!
//! Decoders get arbitrary bytes and must never panic, and what they accept must survive
//! re-encoding. The hub and the MQTT-SN gateway get structured sequences (4 bytes per step)
//! of decoded inputs, commits, refusals and time, and must keep their invariants: no ack before
//! the commit it waits for, and no packet id used twice among a connection's inflight messages.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use outpost::hub::durable::{Clock, Durable};
use outpost::hub::{ConnId, Hub, HubConfig, HubInput, Outlet};
use outpost::proto::mqtt::server::{CloseReason, InEvent, Inbound, ServerLimits};
use outpost::proto::mqtt::{
    self, Ack, Connect, Packet, Properties, Props, Publish, QoS, SubOptions, Subscribe,
    Unsubscribe, Version, Will,
};
use outpost::proto::mqttsn::codec::{self as sn, Flags, Message, SnQos, TopicRef};
use outpost::proto::mqttsn::gateway::{Gateway, GatewayConfig, Output, Predefined};
use outpost::store::{Dest, Op, OpResult, StoreError, StoredMessage};

/// `OUTPOST_FUZZ_TRACE=1` prints every step and hub exchange (for shrinking a crash); read once,
/// since the checks run millions of times.
fn trace() -> bool {
    static TRACE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *TRACE.get_or_init(|| std::env::var_os("OUTPOST_FUZZ_TRACE").is_some())
}

/// A target's check.
pub type Check = fn(&[u8]);

/// Every target, by the name its corpus directory has.
pub const TARGETS: &[(&str, Check)] = &[
    ("mqtt_decode", mqtt_decode),
    ("mqttsn_decode", mqttsn_decode),
    ("mqttsn_serial", mqttsn_serial),
    ("frames", frames),
    ("config", config),
    ("bridge_rules", bridge_rules),
    ("hub_machine", hub_machine),
    ("sn_machine", sn_machine),
];

// ---------------------------------------------------------------------------------------------
// Decoders

const LEVELS: [Option<Version>; 4] = [
    None,
    Some(Version::V31),
    Some(Version::V311),
    Some(Version::V5),
];

/// The MQTT codec at every level, the broker-side connection machine, and the upstream client
/// session, on the same bytes. Byte 0 picks the level and how the stream is cut into reads.
pub fn mqtt_decode(data: &[u8]) {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let version = LEVELS[(head & 3) as usize];
    let max = [64u32, 1024, 1 << 20][((head >> 2) % 3) as usize];
    // The codec: whatever it accepts re-encodes to something it decodes to the same packet.
    let mut at = 0;
    while at < rest.len() {
        match mqtt::decode(&rest[at..], version, max) {
            Ok(Some((p, n))) => {
                assert!(n > 0 && at + n <= rest.len(), "consumed {n} at {at}");
                let level = match (&p, version) {
                    (Packet::Connect(c), None) => c.version,
                    (_, Some(v)) => v,
                    (_, None) => unreachable!("only CONNECT decodes before CONNECT"),
                };
                let mut wire = Vec::new();
                mqtt::encode(&p, level, &mut wire).expect("what decodes, encodes");
                let again = mqtt::decode(&wire, version, u32::MAX);
                assert_eq!(again, Ok(Some((p, wire.len()))), "re-encoded {wire:02x?}");
                at += n;
            }
            Ok(None) | Err(_) => break,
        }
    }
    // The connection machine, fed in pieces, with its timers.
    let t0 = Instant::now();
    let cut = 1 + (head >> 4) as usize;
    let mut inbound = Inbound::new(
        t0,
        ServerLimits {
            max_packet_size: max,
            ..ServerLimits::default()
        },
    );
    for (i, chunk) in rest.chunks(cut).enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 700);
        if inbound.poll_timeout().is_some_and(|t| t <= now) {
            inbound.handle_timeout(now);
        }
        inbound.handle_bytes(now, chunk);
        let mut closed = false;
        while let Some(e) = inbound.poll_event() {
            assert!(!closed, "an event after Close: {e:?}");
            closed = matches!(e, InEvent::Close { .. });
        }
        if inbound.is_closed() {
            break;
        }
    }
    // The upstream session reading a broker's bytes after its CONNECT went out.
    let mut client = mqtt::client::ClientSession::new(
        mqtt::client::ClientConfig {
            client_id: "fuzz".into(),
            version: version.unwrap_or(Version::V5),
            keep_alive: 30,
            session_expiry: 60,
            username: None,
            password: None,
            max_inflight: 4,
            max_packet_size: max,
            topic_alias_maximum: 4,
        },
        t0,
    );
    client.connect(t0);
    let _ = client.take_transmit();
    for (i, chunk) in rest.chunks(cut).enumerate() {
        let now = t0 + Duration::from_millis(i as u64 * 700);
        client.handle_bytes(now, chunk);
        while client.poll_event().is_some() {}
        let _ = client.take_transmit();
        if client.poll_timeout().is_some_and(|t| t <= now) {
            client.handle_timeout(now);
        }
    }
}

/// MQTT-SN datagrams: never a panic; what decodes re-encodes to the same message.
pub fn mqttsn_decode(data: &[u8]) {
    if let Ok(m) = sn::decode(data) {
        let mut wire = Vec::new();
        sn::encode(&m, &mut wire).expect("what decodes, encodes");
        assert_eq!(sn::decode(&wire), Ok(m), "re-encoded {wire:02x?}");
    }
}

/// MQTT-SN over serial: SLIP frames with and without CRC, fed in pieces. Every frame re-framed
/// comes back whole, and what the deframer hands on is decoded like a datagram.
pub fn mqttsn_serial(data: &[u8]) {
    use outpost::proto::mqttsn::serial::{encode_frame, Deframer};
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let crc = head & 1 == 1;
    let cut = 1 + (head >> 1) as usize;
    let mut d = Deframer::new(crc);
    let mut frames = Vec::new();
    for chunk in rest.chunks(cut) {
        d.feed(chunk, |f| {
            if let Ok(f) = f {
                frames.push(f.to_vec());
            }
        });
    }
    for f in frames {
        let mut wire = Vec::new();
        encode_frame(&f, crc, &mut wire);
        let mut again = Deframer::new(crc);
        let mut back = Vec::new();
        again.feed(&wire, |r| back.push(r.map(<[u8]>::to_vec)));
        assert_eq!(back, vec![Ok(f.clone())]);
        mqttsn_decode(&f);
    }
}

/// Serial framings and frame decoders: never a panic, frames never longer than the maximum,
/// every frame survives re-encoding, and decoders give whole readings or none. The first byte
/// picks the framing, the maximum and how the stream is cut into reads.
pub fn frames(data: &[u8]) {
    use outpost::hw::pins::Command;
    use outpost::proto::frames::decode::{Decoder, TopicTemplate};
    use outpost::proto::frames::{encode, Deframer, Framing};
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let framing = [
        Framing::Lines,
        Framing::Cobs,
        Framing::Slip,
        Framing::LenCrc16,
    ][(head & 3) as usize];
    let max = [8usize, 64, 1024, 65535][((head >> 2) & 3) as usize];
    let cut = 1 + (head >> 4) as usize * 7;
    let decoders = [
        Decoder::Raw,
        Decoder::Json { split: true },
        Decoder::Json { split: false },
        Decoder::Kv,
        Decoder::Csv {
            columns: vec!["a".into(), "-".into(), "c".into()],
            delimiter: ',',
        },
    ];
    let Ok(template) = TopicTemplate::parse("s/{name}/{key}", "p", "g") else {
        panic!("the template is valid");
    };
    let mut d = Deframer::new(framing, max);
    let mut frames = Vec::new();
    for chunk in rest.chunks(cut) {
        d.feed(chunk, |f| {
            if let Ok(f) = f {
                assert!(!f.is_empty() && f.len() <= max);
                frames.push(f.to_vec());
            }
        });
    }
    d.idle(|f| {
        if let Ok(f) = f {
            frames.push(f.to_vec());
        }
    });
    let mut readings = Vec::new();
    for f in &frames {
        // Re-encoded, a frame comes back whole (lines cannot hold their own terminators, and
        // never do: the deframer split on them).
        let mut wire = Vec::new();
        encode(framing, f, b"\n", &mut wire).expect("a frame that deframed re-encodes");
        let mut again = Deframer::new(framing, max);
        let mut back = Vec::new();
        again.feed(&wire, |r| back.push(r.map(<[u8]>::to_vec)));
        assert_eq!(back, vec![Ok(f.clone())]);
        for dec in &decoders {
            match dec.decode(f, &mut readings) {
                Ok(()) => {
                    assert!(!readings.is_empty());
                    for r in &readings {
                        let topic = template.render(r.key.as_deref());
                        assert!(outpost::proto::topic::validate_name(&topic).is_ok());
                    }
                }
                Err(_) => assert!(readings.is_empty()),
            }
        }
        let _ = Command::parse(f);
    }
}

/// `outpost.toml`: any text parses or gives an error that formats (file:line:col).
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = outpost::config::Config::parse(Path::new("fuzz.toml"), text) {
        assert!(!e.to_string().is_empty());
    }
}

/// A bridge-rule file: parses, or gives an error that formats; accepted rules map topics
/// without panicking.
pub fn bridge_rules(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match outpost::bridge::rules::Rules::parse(Path::new("fuzz.toml"), text, "gw-1") {
        Ok(rules) => {
            for t in [
                "a",
                "a/b",
                "sensors/x/temp",
                "$SYS/x",
                "gw-1/a/b/c",
                "/",
                "a//b",
            ] {
                let _ = rules.outbound(t);
                let _ = rules.inbound(t);
            }
        }
        Err(e) => assert!(!e.to_string().is_empty()),
    }
}

// ---------------------------------------------------------------------------------------------
// Structured: the hub with a store whose commits the input completes, refuses, or leaves
// pending.

/// Ops submitted to the fake store, by token, waiting for the input to commit them.
#[derive(Default)]
struct StoreModel {
    /// Committed session messages, by row id.
    rows: BTreeMap<i64, StoredMessage>,
    /// Submitted and not yet committed: (token, ops).
    pending: Vec<(u64, Vec<Op>)>,
    /// Every token submitted while the current input was handled.
    fresh: Vec<u64>,
}

impl StoreModel {
    fn apply(&mut self, ops: Vec<Op>) {
        for op in ops {
            match op {
                Op::Insert { id: Some(id), msg } => {
                    // No poison row: a topic a prefix pushed past the string limit would go
                    // out with a clipped length (issue 18).
                    assert!(
                        msg.topic.len() <= 65_535,
                        "a {}-byte topic was stored",
                        msg.topic.len()
                    );
                    self.rows.insert(
                        id,
                        StoredMessage {
                            id,
                            msg,
                            state: 0,
                            packet_id: None,
                        },
                    );
                }
                Op::Delete(id) => {
                    self.rows.remove(&id);
                }
                Op::SetState {
                    id,
                    state,
                    packet_id,
                } => {
                    if let Some(r) = self.rows.get_mut(&id) {
                        r.state = state;
                        r.packet_id = packet_id;
                    }
                }
                Op::SessionDelete(c) => self.rows.retain(|_, r| !is_for(&r.msg.dest, &c)),
                _ => {}
            }
        }
    }
}

fn is_for(dest: &Dest, client: &str) -> bool {
    matches!(dest, Dest::Session(c) if c == client)
}

#[derive(Clone, Default)]
struct FakeStore(Arc<Mutex<StoreModel>>);

impl FakeStore {
    fn model(&self) -> std::sync::MutexGuard<'_, StoreModel> {
        match self.0.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }
}

impl Durable for FakeStore {
    fn submit(&mut self, token: u64, ops: Vec<Op>) {
        let mut m = self.model();
        if token == 0 {
            m.apply(ops);
        } else {
            m.fresh.push(token);
            m.pending.push((token, ops));
        }
    }
    fn read_queue(&mut self, client: &str, after: i64, limit: usize) -> Vec<StoredMessage> {
        self.model()
            .rows
            .range(after + 1..)
            .filter(|(_, r)| is_for(&r.msg.dest, client))
            .take(limit)
            .map(|(_, r)| r.clone())
            .collect()
    }
}

/// An inbound QoS 1/2 publish whose ack the hub owes: the tokens its effects went out with.
/// A QoS 2 duplicate (its id still awaiting PUBREL) owes nothing of its own: it waits for its
/// original's tokens, and its own request is only the hub's gate behind them.
struct Owed {
    tokens: HashSet<u64>,
    refused: bool,
    /// The publish is being handled now: tokens submitted so far in this call count too.
    live: bool,
    /// Acknowledged while live: fine only if the call submits nothing for it after all.
    acked_live: bool,
}

/// What the outlet saw, and the invariants it checks as packets arrive.
#[derive(Default)]
struct Watch {
    /// Per connection: room left (absent = unlimited).
    room: HashMap<ConnId, usize>,
    want_ready: HashSet<ConnId>,
    /// Packet ids of QoS 1/2 publishes the hub sent each connection and that are not yet
    /// acknowledged (PUBACK or PUBCOMP).
    inflight: HashMap<ConnId, Vec<u16>>,
    /// Acks the hub owes each (connection, packet id), oldest first.
    owed: HashMap<(ConnId, u16), VecDeque<Owed>>,
    /// Per (client id, QoS 2 packet id) awaiting PUBREL: the tokens of the original's effects.
    /// By client, not connection: a persistent session keeps its ids across reconnections.
    originals: HashMap<(String, u16), HashSet<u64>>,
    /// conn -> (client id, whether its session outlives the connection).
    clients: HashMap<ConnId, (String, bool)>,
    /// Tokens the input has committed successfully.
    committed: HashSet<u64>,
    closed: HashSet<ConnId>,
    /// Everything sent, for an adapter to pass on (the MQTT-SN rig's links).
    queues: HashMap<ConnId, VecDeque<Packet>>,
    keep_queues: bool,
    /// The fake store, to see what the call being handled has submitted so far.
    store: FakeStore,
}

impl Watch {
    fn check(&mut self, conn: ConnId, p: &Packet) {
        match p {
            Packet::Publish(p) if p.qos != QoS::AtMostOnce => {
                let ids = self.inflight.entry(conn).or_default();
                assert!(
                    !ids.contains(&p.packet_id),
                    "packet id {} sent twice to connection {conn} while in flight ({ids:?})",
                    p.packet_id
                );
                ids.push(p.packet_id);
            }
            Packet::PubAck(a) | Packet::PubRec(a) if a.reason < 0x80 => {
                if trace() {
                    eprintln!("  hub -> {conn} {p:?}");
                }
                let key = (conn, a.packet_id);
                let committed = &self.committed;
                let in_call = !self.store.model().fresh.is_empty();
                let q = self.owed.entry(key).or_default();
                let pos = q.iter().position(|o| {
                    let blocked = o.refused || o.acked_live || (o.live && in_call);
                    !blocked && o.tokens.iter().all(|t| committed.contains(t))
                });
                match pos {
                    // The call may still submit effects for it; `HubRig::input` looks after.
                    Some(i) if q[i].live => q[i].acked_live = true,
                    Some(i) => {
                        q.remove(i);
                    }
                    None => panic!(
                        "{} {} to connection {conn} before its commit",
                        p.name(),
                        a.packet_id
                    ),
                }
            }
            _ => {}
        }
    }

    /// The client answered one of the hub's publishes.
    fn client_acked(&mut self, conn: ConnId, pid: u16) {
        if let Some(ids) = self.inflight.get_mut(&conn) {
            ids.retain(|i| *i != pid);
        }
    }

    fn forget(&mut self, conn: ConnId) {
        self.inflight.remove(&conn);
        self.owed.retain(|(c, _), _| *c != conn);
        // A session that ends with its connection takes its QoS 2 ids with it.
        if let Some((client, false)) = self.clients.remove(&conn) {
            self.originals.retain(|(c, _), _| *c != client);
        }
        self.room.remove(&conn);
        self.want_ready.remove(&conn);
        self.queues.remove(&conn);
    }
}

impl Outlet for Watch {
    fn try_send(&mut self, conn: ConnId, p: Packet) -> Result<(), Packet> {
        if let Some(r) = self.room.get_mut(&conn) {
            if *r == 0 {
                self.want_ready.insert(conn);
                return Err(p);
            }
            *r -= 1;
        }
        self.check(conn, &p);
        if self.keep_queues {
            self.queues.entry(conn).or_default().push_back(p);
        }
        Ok(())
    }
    fn close(&mut self, conn: ConnId, last: Option<Packet>) {
        if let Some(p) = &last {
            self.check(conn, p);
        }
        self.closed.insert(conn);
    }
}

/// A hub with the fake store, its outlet, and simulated time.
struct HubRig {
    hub: Hub,
    store: FakeStore,
    out: Watch,
    now: Instant,
}

impl HubRig {
    fn new() -> HubRig {
        let store = FakeStore::default();
        let now = Instant::now();
        HubRig {
            hub: Hub::with_store(
                HubConfig {
                    max_inflight: 3,
                    max_queued: 6,
                    ..HubConfig::default()
                },
                Box::new(store.clone()),
                Clock::new(now, 1_700_000_000_000),
            ),
            out: Watch {
                store: store.clone(),
                ..Watch::default()
            },
            store,
            now,
        }
    }

    /// Hands the hub `input`; a QoS 1/2 publish from `conn` is owed an ack once every token
    /// submitted while it was handled has committed (a QoS 2 duplicate also waits for its
    /// original's).
    fn input(&mut self, input: HubInput) {
        let owed = match &input {
            HubInput::Packet {
                conn,
                packet: Packet::Publish(p),
            } if p.qos != QoS::AtMostOnce => Some((*conn, p.packet_id, p.qos)),
            _ => None,
        };
        if trace() {
            eprintln!("  hub <- {input:?}");
        }
        if let HubInput::Connect { conn, connect, .. } = &input {
            // An empty id gets one assigned: unique, as far as this model cares.
            let client = if connect.client_id.is_empty() {
                format!("assigned-{conn}")
            } else {
                connect.client_id.clone()
            };
            let persistent = match connect.version {
                Version::V5 => connect.properties.session_expiry_interval.unwrap_or(0) > 0,
                _ => !connect.clean_start,
            };
            if connect.clean_start {
                self.out.originals.retain(|(c, _), _| *c != client);
            }
            self.out.clients.insert(*conn, (client, persistent));
        }
        self.store.model().fresh.clear();
        // The entry goes in before the call, since the ack may come within it (nothing to
        // store); while live it also waits for whatever the call submits.
        let mut dup = false;
        if let Some((conn, pid, qos)) = owed {
            // A QoS 2 publish whose id has an original (not yet released by PUBREL, not
            // refused) is its duplicate. QoS 1 ids carry no such state: a client that reuses
            // one while in flight sends a new message.
            let original = (qos == QoS::ExactlyOnce)
                .then(|| {
                    let client = self.out.clients.get(&conn)?.0.clone();
                    self.out.originals.get(&(client, pid)).cloned()
                })
                .flatten();
            dup = original.is_some();
            self.out
                .owed
                .entry((conn, pid))
                .or_default()
                .push_back(Owed {
                    tokens: original.unwrap_or_default(),
                    refused: false,
                    live: !dup,
                    acked_live: false,
                });
        }
        self.hub.handle(self.now, input, &mut self.out);
        let fresh: Vec<u64> = self.store.model().fresh.drain(..).collect();
        if trace() && !fresh.is_empty() {
            eprintln!("  submitted {fresh:?}");
        }
        let Some((conn, pid, qos)) = owed else {
            return;
        };
        let Some(q) = self.out.owed.get_mut(&(conn, pid)) else {
            return;
        };
        if dup {
            return;
        }
        if let Some(i) = q.iter().position(|o| o.live) {
            if q[i].acked_live {
                assert!(
                    fresh.is_empty(),
                    "ack {pid} to connection {conn} went out before its effects committed \
                     (tokens {fresh:?} submitted in the same call)"
                );
                q.remove(i);
            } else {
                q[i].live = false;
                q[i].tokens.extend(fresh.iter().copied());
            }
        }
        if let Some((client, _)) = self
            .out
            .clients
            .get(&conn)
            .filter(|_| qos == QoS::ExactlyOnce)
        {
            self.out
                .originals
                .insert((client.clone(), pid), fresh.into_iter().collect());
        }
    }

    /// Completes the oldest pending request: the writer is FIFO (the hub relies on it, to gate
    /// a QoS 2 duplicate's ack behind its original), so the input picks when and how, not which.
    fn commit(&mut self, how: u8) {
        let (token, ops) = {
            let mut m = self.store.model();
            if m.pending.is_empty() {
                return;
            }
            m.pending.remove(0)
        };
        // The store answers Full only for an insert (`when_full = "block"`); any batch can fail.
        let inserts = ops.iter().any(|o| matches!(o, Op::Insert { .. }));
        let outcome = match how % 8 {
            0 => Err(Arc::new(StoreError::DiskFull)),
            1 if inserts => Ok(vec![OpResult::Full]),
            _ => Ok(vec![OpResult::Done]),
        };
        match &outcome {
            Ok(r) if !r.contains(&OpResult::Full) => {
                self.store.model().apply(ops);
                self.out.committed.insert(token);
            }
            _ => {
                // Refused effects refuse their publish and its duplicates, and free the id; a
                // duplicate's failed gate refuses nothing (its original is what counts).
                for q in self.out.owed.values_mut() {
                    for o in q.iter_mut() {
                        if o.tokens.contains(&token) {
                            o.refused = true;
                        }
                    }
                }
                self.out.originals.retain(|_, t| !t.contains(&token));
            }
        }
        self.input(HubInput::Committed { token, outcome });
    }

    fn advance(&mut self, secs: u8) {
        self.now += Duration::from_millis(secs as u64 * 250);
        if self.hub.poll_timeout().is_some_and(|t| t <= self.now) {
            self.hub.handle_timeout(self.now, &mut self.out);
        }
    }
}

const TOPICS: [&str; 5] = ["a", "a/b", "s/1/t", "$SYS/x", "w/x"];
const FILTERS: [&str; 6] = ["a", "a/#", "+/+/t", "#", "$share/g/a/b", "w/+"];

/// Issue 18's classes: a topic one level past `max_topic_levels`, a 7,000-level filter.
fn deep_topic() -> String {
    vec!["d"; 201].join("/")
}
fn deep_filter() -> String {
    format!("{}#", "/".repeat(7000))
}
const CLIENTS: [&str; 4] = ["a", "b", "c", ""];

fn qos(b: u8) -> QoS {
    [QoS::AtMostOnce, QoS::AtLeastOnce, QoS::ExactlyOnce][(b % 3) as usize]
}

/// Sequences of hub inputs, 4 bytes per step. Slots 0-3 each hold at most one live connection;
/// a new CONNECT on a slot takes a fresh connection id (the old one is closed first).
pub fn hub_machine(data: &[u8]) {
    let mut r = HubRig::new();
    // Everything also goes up, under a prefix that overflows a topic at the string limit.
    let rules = outpost::bridge::rules::Rules::parse(
        std::path::Path::new("fuzz.toml"),
        "[[out]]\nfilter = \"#\"\nremote_prefix = \"cloud/site/\"\nqos = 1\n",
        "gw",
    )
    .expect("the harness's rule compiles");
    r.hub.set_uplink_rules(rules.outs);
    let mut slots: [Option<ConnId>; 4] = [None; 4];
    let mut next_conn: ConnId = 1;
    for step in data.chunks_exact(4) {
        let (op, a, b, c) = (step[0], step[1], step[2], step[3]);
        let slot = (a % 4) as usize;
        if trace() {
            eprintln!("step {} {a} {b} {c} slots {slots:?}", op % 11);
        }
        match op % 11 {
            0 => {
                if let Some(old) = slots[slot].take() {
                    r.input(HubInput::Closed {
                        conn: old,
                        reason: CloseReason::ConnectionLost,
                        notify: None,
                    });
                    r.out.forget(old);
                }
                let conn = next_conn;
                next_conn += 1;
                slots[slot] = Some(conn);
                let v5 = c & 1 == 1;
                let mut props = Properties::default();
                if v5 && c & 4 != 0 {
                    props.session_expiry_interval = Some(if c & 64 != 0 { u32::MAX } else { 3 });
                }
                if v5 && c & 128 != 0 {
                    props.receive_maximum = Some(1);
                }
                let will = (c & 8 != 0).then(|| Will {
                    topic: "w/x".into(),
                    payload: Bytes::from_static(b"gone"),
                    qos: qos(c >> 4),
                    retain: c & 32 != 0,
                    properties: Props::default(),
                });
                let connect = Connect {
                    version: if v5 { Version::V5 } else { Version::V311 },
                    // 3.1.1 persistent sessions need clean 0; v5 uses the expiry.
                    clean_start: c & 2 != 0,
                    keep_alive: 10,
                    client_id: CLIENTS[(b % 4) as usize].into(),
                    will,
                    username: None,
                    password: None,
                    properties: props.into(),
                };
                r.input(HubInput::Connect {
                    conn,
                    connect: Box::new(connect),
                    keep_alive: 10,
                });
            }
            1 | 2 => {
                let Some(conn) = slots[slot] else { continue };
                let filter = match b % 7 {
                    6 => deep_filter(),
                    i => FILTERS[i as usize].to_string(),
                };
                let packet = if op % 11 == 1 {
                    Packet::Subscribe(Subscribe {
                        packet_id: 1 + (c as u16 >> 4),
                        filters: vec![(
                            filter,
                            SubOptions {
                                qos: qos(c),
                                no_local: c & 4 != 0,
                                retain_as_published: c & 8 != 0,
                                ..SubOptions::default()
                            },
                        )],
                        properties: Props::default(),
                    })
                } else {
                    Packet::Unsubscribe(Unsubscribe {
                        packet_id: 1 + (c as u16 >> 4),
                        filters: vec![filter],
                        properties: Props::default(),
                    })
                };
                r.input(HubInput::Packet { conn, packet });
            }
            3 => {
                let Some(conn) = slots[slot] else { continue };
                let q = qos(c);
                let p = Publish {
                    dup: false,
                    qos: q,
                    retain: c & 32 != 0,
                    topic: match b % 7 {
                        5 => deep_topic(),
                        // At the string limit: the bridge's prefix pushes it over.
                        6 => "t".repeat(65_530),
                        i => TOPICS[i as usize].into(),
                    },
                    packet_id: if q == QoS::AtMostOnce {
                        0
                    } else {
                        1 + ((c >> 2) % 4) as u16
                    },
                    payload: if c & 64 != 0 {
                        Bytes::new()
                    } else {
                        Bytes::from_static(b"x")
                    },
                    properties: Props::default(),
                };
                r.input(HubInput::Packet {
                    conn,
                    packet: Packet::Publish(p),
                });
            }
            4 => {
                // The client answers one of the hub's publishes (or names a stray id).
                let Some(conn) = slots[slot] else { continue };
                let ids = r.out.inflight.get(&conn).cloned().unwrap_or_default();
                let pid = if ids.is_empty() || c & 128 != 0 {
                    1 + (b % 8) as u16
                } else {
                    ids[b as usize % ids.len()]
                };
                let ack = Ack {
                    packet_id: pid,
                    reason: if c & 64 != 0 { 0x80 } else { 0 },
                    properties: Props::default(),
                };
                let packet = match c % 3 {
                    0 => Packet::PubAck(ack),
                    1 => Packet::PubRec(ack),
                    _ => Packet::PubComp(ack),
                };
                if matches!(packet, Packet::PubAck(_) | Packet::PubComp(_)) {
                    r.out.client_acked(conn, pid);
                }
                // A PUBREC with an error reason ends that exchange too.
                if matches!(&packet, Packet::PubRec(a) if a.reason >= 0x80) {
                    r.out.client_acked(conn, pid);
                }
                r.input(HubInput::Packet { conn, packet });
            }
            5 => {
                let Some(conn) = slots[slot] else { continue };
                let pid = 1 + (b % 4) as u16;
                if let Some((client, _)) = r.out.clients.get(&conn) {
                    r.out.originals.remove(&(client.clone(), pid));
                }
                let packet = Packet::PubRel(Ack {
                    packet_id: pid,
                    ..Ack::default()
                });
                r.input(HubInput::Packet { conn, packet });
            }
            6 => {
                let Some(conn) = slots[slot].take() else {
                    continue;
                };
                let reason = match c % 3 {
                    0 => CloseReason::Disconnect {
                        with_will: c & 4 != 0,
                        session_expiry: (c & 8 != 0).then_some(0),
                    },
                    1 => CloseReason::ConnectionLost,
                    _ => CloseReason::KeepAliveTimeout,
                };
                r.input(HubInput::Closed {
                    conn,
                    reason,
                    notify: None,
                });
                r.out.forget(conn);
            }
            7 => {
                let Some(conn) = slots[slot] else { continue };
                match b % 4 {
                    3 => {
                        r.out.room.remove(&conn);
                    }
                    n => {
                        r.out.room.insert(conn, n as usize);
                    }
                }
                if r.out.want_ready.remove(&conn) {
                    r.input(HubInput::Ready { conn });
                }
            }
            8 => r.commit(c),
            9 => r.advance(b),
            _ => {
                let Some(conn) = slots[slot] else { continue };
                r.input(HubInput::Packet {
                    conn,
                    packet: Packet::PingReq,
                });
            }
        }
        // A connection the hub closed is gone for the input too.
        for conn in std::mem::take(&mut r.out.closed) {
            for s in slots.iter_mut() {
                if *s == Some(conn) {
                    *s = None;
                    r.input(HubInput::Closed {
                        conn,
                        reason: CloseReason::ServerClosed,
                        notify: None,
                    });
                }
            }
            r.out.forget(conn);
        }
    }
    // Every commit arrives in the end: nothing the hub owes stays owed for ever.
    for _ in 0..10_000 {
        if r.store.model().pending.is_empty() {
            break;
        }
        r.commit(7);
    }
    r.hub.shutdown(r.now, &mut r.out);
}

// ---------------------------------------------------------------------------------------------
// Structured: the MQTT-SN gateway wired to a hub with the fake store.

/// Sensor addresses; 3 and up may use QoS -1.
const ADDRS: u32 = 6;
const SN_TOPICS: [&str; 4] = ["a", "s/1/t", "a/+", "b/#"];

/// A sensor's client id; one of them is the id of the local MQTT user's session, which no
/// MQTT-SN CONNECT may take (issue 18).
fn sn_client(b: u8) -> String {
    match b % 5 {
        4 => "local".into(),
        n => format!("s{n}"),
    }
}

fn sn_qos(b: u8) -> SnQos {
    [SnQos::Zero, SnQos::One, SnQos::Two, SnQos::MinusOne][(b % 4) as usize]
}

struct SnRig {
    gw: Gateway<u32>,
    hub: HubRig,
    /// conn -> client id, from the Connect the gateway hands the hub.
    client_of_conn: HashMap<ConnId, String>,
    /// address -> the client ids it has claimed: the last CONNECT's, and any a PINGREQ named
    /// since (a client may move address: what the hub acknowledged then goes to the new one).
    client_of_addr: HashMap<u32, Vec<String>>,
    /// Per address: msg ids of QoS 1/2 PUBLISHes the gateway sent and the sensor has not
    /// answered.
    inflight: HashMap<u32, Vec<u16>>,
    /// Per client id: msg ids the hub acknowledged (after their commits) and the gateway may
    /// now acknowledge.
    may_ack: HashMap<String, HashSet<u16>>,
    /// Topic ids the gateway gave each address.
    topic_ids: HashMap<u32, Vec<u16>>,
}

impl SnRig {
    fn settle(&mut self) {
        for _ in 0..1000 {
            let mut busy = false;
            while let Some(o) = self.gw.poll_output() {
                busy = true;
                match o {
                    Output::Send { to, data } => self.sent(to, &data),
                    Output::Broadcast(data) => assert!(sn::decode(&data).is_ok()),
                    Output::Attach(conn) => {
                        self.hub.out.queues.insert(conn, VecDeque::new());
                        self.hub.out.room.insert(conn, 4);
                    }
                    Output::Hub(i) => {
                        let closed = match &i {
                            HubInput::Closed { conn, .. } => Some(*conn),
                            HubInput::Connect { conn, connect, .. } => {
                                self.client_of_conn.insert(*conn, connect.client_id.clone());
                                None
                            }
                            _ => None,
                        };
                        self.hub.input(i);
                        if let Some(c) = closed {
                            self.hub.out.forget(c);
                        }
                    }
                    Output::Detach(conn) => self.hub.out.forget(conn),
                    Output::Pull(_) => {}
                }
            }
            let conns: Vec<ConnId> = self.hub.out.queues.keys().copied().collect();
            for conn in conns {
                while self.gw.wants(conn) {
                    let Some(p) = self
                        .hub
                        .out
                        .queues
                        .get_mut(&conn)
                        .and_then(|q| q.pop_front())
                    else {
                        break;
                    };
                    busy = true;
                    if let (Packet::PubAck(a) | Packet::PubRec(a), Some(addr)) =
                        (&p, self.client_of_conn.get(&conn))
                    {
                        if a.reason < 0x80 {
                            self.may_ack
                                .entry(addr.clone())
                                .or_default()
                                .insert(a.packet_id);
                        }
                    }
                    if let Some(r) = self.hub.out.room.get_mut(&conn) {
                        *r += 1;
                    }
                    self.gw.handle_hub(self.hub.now, conn, p);
                }
                if self.hub.out.closed.remove(&conn) {
                    busy = true;
                    self.gw.hub_closed(conn);
                }
                if self.hub.out.want_ready.contains(&conn)
                    && self.hub.out.room.get(&conn).is_some_and(|r| *r > 0)
                {
                    self.hub.out.want_ready.remove(&conn);
                    busy = true;
                    self.hub.input(HubInput::Ready { conn });
                }
            }
            if !busy {
                return;
            }
        }
    }

    /// A datagram from the gateway: it decodes, and keeps the invariants.
    fn sent(&mut self, to: u32, data: &[u8]) {
        let m = match sn::decode(data) {
            Ok(m) => m,
            Err(e) => panic!("the gateway sent an undecodable datagram {data:02x?}: {e}"),
        };
        match m {
            Message::Publish { flags, msg_id, .. }
                if matches!(flags.qos, SnQos::One | SnQos::Two) =>
            {
                let ids = self.inflight.entry(to).or_default();
                if flags.dup {
                    return;
                }
                assert!(
                    !ids.contains(&msg_id),
                    "msg id {msg_id} sent twice to {to} while in flight"
                );
                ids.push(msg_id);
            }
            Message::PubAck { msg_id, rc: 0, .. } | Message::PubRec { msg_id } => {
                let claimed = self.client_of_addr.get(&to).cloned().unwrap_or_default();
                let ok = claimed
                    .iter()
                    .any(|c| self.may_ack.get_mut(c).is_some_and(|s| s.remove(&msg_id)));
                assert!(
                    ok,
                    "the gateway acknowledged {msg_id} to {to} before the hub did"
                );
            }
            Message::RegAck {
                topic_id, rc: 0, ..
            }
            | Message::SubAck {
                topic_id, rc: 0, ..
            }
            | Message::Register { topic_id, .. }
                if topic_id != 0 =>
            {
                self.topic_ids.entry(to).or_default().push(topic_id);
            }
            _ => {}
        }
    }

    fn dgram(&mut self, from: u32, m: Message) {
        let mut data = Vec::new();
        sn::encode(&m, &mut data).expect("the harness builds small messages");
        self.gw
            .handle_datagram(self.hub.now, from, &data, from >= 3);
        self.settle();
    }
}

/// Sequences of MQTT-SN datagrams from six sensors, hub commits and time, 4 bytes per step.
pub fn sn_machine(data: &[u8]) {
    let mut hub = HubRig::new();
    hub.out.keep_queues = true;
    let now = hub.now;
    let mut r = SnRig {
        gw: Gateway::new(
            now,
            GatewayConfig {
                predefined: vec![Predefined {
                    id: 9,
                    topic: "p/9".into(),
                    client: None,
                }],
                retry_interval: Duration::from_secs(2),
                retry_count: 2,
                max_clients: 4,
                ..GatewayConfig::default()
            },
        ),
        hub,
        client_of_conn: HashMap::new(),
        client_of_addr: HashMap::new(),
        inflight: HashMap::new(),
        may_ack: HashMap::new(),
        topic_ids: HashMap::new(),
    };
    // A local MQTT subscriber with a persistent session, so publishes have durable effects.
    let local: ConnId = 1;
    let props = Properties {
        session_expiry_interval: Some(u32::MAX),
        ..Properties::default()
    };
    r.hub.input(HubInput::Connect {
        conn: local,
        connect: Box::new(Connect {
            version: Version::V5,
            clean_start: true,
            keep_alive: 0,
            client_id: "local".into(),
            will: None,
            username: Some("carol".into()),
            password: None,
            properties: props.into(),
        }),
        keep_alive: 0,
    });
    r.hub.input(HubInput::Packet {
        conn: local,
        packet: Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![(
                "#".into(),
                SubOptions {
                    qos: QoS::AtLeastOnce,
                    ..SubOptions::default()
                },
            )],
            properties: Props::default(),
        }),
    });
    for step in data.chunks_exact(4) {
        let (op, a, b, c) = (step[0], step[1], step[2], step[3]);
        let addr = a as u32 % ADDRS;
        let ids = r.topic_ids.get(&addr).cloned().unwrap_or_default();
        let topic_id = if ids.is_empty() || c & 128 != 0 {
            b as u16 % 4
        } else {
            ids[b as usize % ids.len()]
        };
        let msg_id = 1 + (c as u16 >> 4);
        if trace() {
            eprintln!("sn step {} addr {addr} {b} {c}", op % 14);
        }
        match op % 14 {
            0 => {
                r.client_of_addr.insert(addr, vec![sn_client(b)]);
                // A new connection: what the gateway had in flight to the old one is over
                // (a persistent session resends it, as DUP).
                r.inflight.remove(&addr);
                r.dgram(
                    addr,
                    Message::Connect {
                        flags: Flags {
                            will: c & 1 != 0,
                            clean_session: c & 2 != 0,
                            ..Flags::default()
                        },
                        duration: [0, 5, 60][(b % 3) as usize],
                        client_id: sn_client(b),
                    },
                );
            }
            1 => r.dgram(
                addr,
                Message::WillTopic(Some((
                    Flags {
                        qos: sn_qos(c % 3),
                        ..Flags::default()
                    },
                    "w/x".into(),
                ))),
            ),
            2 => r.dgram(addr, Message::WillMsg(Bytes::from_static(b"bye"))),
            3 => r.dgram(
                addr,
                Message::Register {
                    topic_id: 0,
                    msg_id,
                    topic: SN_TOPICS[(b % 2) as usize].into(),
                },
            ),
            4 | 5 => {
                let (topic, tt) = match c % 3 {
                    0 => (TopicRef::Id(topic_id), 0),
                    1 => (TopicRef::Predefined(9), 1),
                    _ => (TopicRef::Short(*b"ab"), 2),
                };
                let q = sn_qos(b >> 2);
                r.dgram(
                    addr,
                    Message::Publish {
                        flags: Flags {
                            qos: q,
                            topic_id_type: tt,
                            dup: c & 8 != 0,
                            retain: c & 4 != 0,
                            ..Flags::default()
                        },
                        topic,
                        msg_id: if q == SnQos::Zero || q == SnQos::MinusOne {
                            0
                        } else {
                            msg_id
                        },
                        data: Bytes::from_static(b"21.5"),
                    },
                );
            }
            6 => {
                // The sensor answers one of the gateway's publishes (or a stray id).
                let ids = r.inflight.get(&addr).cloned().unwrap_or_default();
                let mid = if ids.is_empty() || c & 64 != 0 {
                    msg_id
                } else {
                    ids[b as usize % ids.len()]
                };
                let m = match c % 3 {
                    0 => Message::PubAck {
                        topic_id: topic_id.to_be_bytes(),
                        msg_id: mid,
                        rc: if c & 32 != 0 { 2 } else { 0 },
                    },
                    1 => Message::PubRec { msg_id: mid },
                    _ => Message::PubComp { msg_id: mid },
                };
                if matches!(m, Message::PubAck { .. } | Message::PubComp { .. }) {
                    if let Some(ids) = r.inflight.get_mut(&addr) {
                        ids.retain(|i| *i != mid);
                    }
                }
                r.dgram(addr, m);
            }
            7 => {
                // After PUBREL, a QoS 2 publish with the same id is a new message.
                let pid = 1 + (b as u16 % 4);
                let claimed = r.client_of_addr.get(&addr).cloned().unwrap_or_default();
                r.hub
                    .out
                    .originals
                    .retain(|(client, id), _| !(*id == pid && claimed.contains(client)));
                r.dgram(addr, Message::PubRel { msg_id: pid });
            }
            8 => r.dgram(
                addr,
                Message::Subscribe {
                    flags: Flags {
                        qos: sn_qos(c % 3),
                        topic_id_type: if c & 4 != 0 { 1 } else { 0 },
                        ..Flags::default()
                    },
                    msg_id,
                    topic: if c & 4 != 0 {
                        TopicRef::Predefined(9)
                    } else {
                        TopicRef::Name(SN_TOPICS[(b % 4) as usize].into())
                    },
                },
            ),
            9 => {
                let duration = (c & 1 != 0).then_some(5 + b as u16 % 30);
                r.dgram(addr, Message::Disconnect { duration });
                if duration.is_none() {
                    r.inflight.remove(&addr);
                }
            }
            10 => {
                // A PINGREQ naming a client wakes it, from wherever it now is.
                let client_id = (c & 1 != 0).then(|| sn_client(b));
                if let Some(id) = &client_id {
                    r.client_of_addr.entry(addr).or_default().push(id.clone());
                    // A client that exists moves here, and whoever was here is gone.
                    r.inflight.remove(&addr);
                }
                r.dgram(addr, Message::PingReq { client_id });
            }
            11 => {
                r.hub.commit(c);
                r.settle();
            }
            12 => {
                r.hub.now += Duration::from_millis(b as u64 * 100);
                let now = r.hub.now;
                if r.gw.poll_timeout().is_some_and(|t| t <= now) {
                    r.gw.handle_timeout(now);
                }
                if r.hub.hub.poll_timeout().is_some_and(|t| t <= now) {
                    r.hub.hub.handle_timeout(now, &mut r.hub.out);
                }
                r.settle();
            }
            _ => {
                // Raw bytes as a datagram: the tail of the step, whatever it is.
                r.gw.handle_datagram(r.hub.now, addr, &step[1..], false);
                r.settle();
            }
        }
        // Messages the local subscriber gets are acknowledged at once.
        if let Some(q) = r.hub.out.queues.get_mut(&local) {
            let got: Vec<Packet> = q.drain(..).collect();
            for p in got {
                if let Packet::Publish(p) = p {
                    if p.qos == QoS::AtMostOnce {
                        continue;
                    }
                    r.hub.out.client_acked(local, p.packet_id);
                    let ack = Ack {
                        packet_id: p.packet_id,
                        ..Ack::default()
                    };
                    r.hub.input(HubInput::Packet {
                        conn: local,
                        packet: Packet::PubAck(ack),
                    });
                }
            }
        }
        r.settle();
    }
    r.gw.shutdown();
    r.settle();
}
