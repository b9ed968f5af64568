//! The store checked against a model: random sequences of insert, read-window, delete, state
//! changes, eviction (by limits, under both policies), expiry and reopen, compared with a plain
//! in-memory map after every step.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;

use super::*;

#[derive(Debug, Clone)]
enum Step {
    Insert {
        dest: u8,
        len: usize,
        expires_in: Option<i64>,
        qos: u8,
    },
    Delete(usize),
    SetState(usize, u8),
    Read {
        dest: u8,
        after: usize,
        limit: usize,
    },
    Tick(i64),
    Expire,
    Reopen,
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        6 => (0u8..4, 0usize..40, proptest::option::of(1i64..50), 1u8..3).prop_map(|(dest, len, expires_in, qos)| Step::Insert { dest, len, expires_in, qos }),
        3 => (0usize..64).prop_map(Step::Delete),
        1 => (0usize..64, 0u8..3).prop_map(|(i, s)| Step::SetState(i, s)),
        2 => (0u8..4, 0usize..64, 1usize..6).prop_map(|(dest, after, limit)| Step::Read { dest, after, limit }),
        2 => (1i64..30).prop_map(Step::Tick),
        1 => Just(Step::Expire),
        1 => Just(Step::Reopen),
    ]
}

fn dest(d: u8) -> Dest {
    if d < 2 {
        Dest::Outbox(format!("rule{d}"))
    } else {
        Dest::Session(format!("client{d}"))
    }
}

#[derive(Debug, Clone)]
struct Row {
    msg: NewMessage,
    state: u8,
}

impl Row {
    /// A QoS 2 message the peer may hold by packet id: never evicted or expired.
    fn pinned(&self) -> bool {
        self.msg.qos == 2 && self.state >= 1
    }
}

struct Model {
    rows: BTreeMap<i64, Row>,
    next_id: i64,
    cfg: StoreConfig,
    evicted: u64,
}

impl Model {
    fn bytes(&self) -> u64 {
        self.rows.values().map(|r| r.msg.bytes()).sum()
    }
    fn class(&self, kind: i64) -> impl Iterator<Item = (&i64, &Row)> {
        self.rows
            .iter()
            .filter(move |(_, r)| r.msg.dest.kind() == kind)
    }
    fn fits(&self, kind: i64, need: u64) -> bool {
        let (max_m, max_b) = self.cfg.class_limits(kind);
        let bytes: u64 = self.class(kind).map(|(_, r)| r.msg.bytes()).sum();
        (self.class(kind).count() as u64) < max_m && bytes + need <= max_b
    }
    fn insert(&mut self, m: NewMessage) -> OpResult {
        let need = m.bytes();
        let kind = m.dest.kind();
        if !self.fits(kind, need) {
            if self.cfg.when_full == WhenFull::Block || need > self.cfg.class_limits(kind).1 {
                return OpResult::Full;
            }
            while !self.fits(kind, need) {
                let Some((&oldest, _)) = self.class(kind).find(|(_, r)| !r.pinned()) else {
                    break;
                };
                self.rows.remove(&oldest);
                self.evicted += 1;
            }
        }
        let id = self.next_id;
        self.next_id += 1;
        self.rows.insert(id, Row { msg: m, state: 0 });
        OpResult::Inserted(id)
    }
    fn expire(&mut self, now: i64) -> u64 {
        let oldest_kept = now - self.cfg.max_age.as_millis() as i64;
        let before = self.rows.len();
        self.rows.retain(|_, r| {
            r.pinned()
                || !(r.msg.expires_ms.is_some_and(|e| e <= now) || r.msg.received_ms < oldest_kept)
        });
        (before - self.rows.len()) as u64
    }
}

fn run(steps: Vec<Step>, when_full: WhenFull) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().map_err(|e| TestCaseError::fail(e.to_string()))?;
    let cfg = StoreConfig {
        synchronous: Synchronous::Normal,
        commit_interval: Duration::ZERO,
        max_batch: 16,
        max_bytes: 300,
        max_messages: 12,
        max_age: Duration::from_millis(100),
        when_full,
        outbox_share: 0.5,
    };
    let open =
        || Store::open(dir.path(), cfg.clone()).map_err(|e| TestCaseError::fail(e.to_string()));
    let mut store = open()?;
    let mut model = Model {
        rows: BTreeMap::new(),
        next_id: 1,
        cfg: cfg.clone(),
        evicted: 0,
    };
    let mut now = 1_000i64;
    let mut evicted_before_reopen = 0;
    for s in steps {
        match s {
            Step::Insert {
                dest: d,
                len,
                expires_in,
                qos,
            } => {
                let m = NewMessage {
                    dest: dest(d),
                    topic: format!("t/{d}"),
                    payload: Bytes::from(vec![b'x'; len]),
                    qos,
                    retain: false,
                    props: Bytes::new(),
                    sub_ids: Bytes::new(),
                    received_ms: now,
                    expires_ms: expires_in.map(|e| now + e),
                };
                let want = model.insert(m.clone());
                let got = store
                    .submit_wait(vec![Op::Insert { id: None, msg: m }])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, vec![want]);
            }
            Step::Delete(i) => {
                // Mostly existing ids, sometimes one that is gone or never was.
                let id = model.rows.keys().nth(i).copied().unwrap_or(i as i64 + 1);
                model.rows.remove(&id);
                store
                    .submit_wait(vec![Op::Delete(id)])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
            }
            Step::SetState(i, st) => {
                if let Some((&id, row)) = model.rows.iter_mut().nth(i) {
                    row.state = st;
                    store
                        .submit_wait(vec![Op::SetState {
                            id,
                            state: st,
                            packet_id: Some(id as u16),
                        }])
                        .map_err(|e| TestCaseError::fail(e.to_string()))?;
                }
            }
            Step::Read {
                dest: d,
                after,
                limit,
            } => {
                let dst = dest(d);
                let after = after as i64;
                let want: Vec<(i64, usize, u8)> = model
                    .rows
                    .iter()
                    .filter(|(id, r)| **id > after && r.msg.dest == dst)
                    .take(limit)
                    .map(|(id, r)| (*id, r.msg.payload.len(), r.state))
                    .collect();
                let got: Vec<(i64, usize, u8)> = store
                    .read_window(&dst, after, limit)
                    .map_err(|e| TestCaseError::fail(e.to_string()))?
                    .into_iter()
                    .map(|m| (m.id, m.msg.payload.len(), m.state))
                    .collect();
                prop_assert_eq!(got, want);
            }
            Step::Tick(ms) => now += ms,
            Step::Expire => {
                let want = model.expire(now);
                let got = store
                    .submit_wait(vec![Op::Expire { now_ms: now }])
                    .map_err(|e| TestCaseError::fail(e.to_string()))?;
                prop_assert_eq!(got, vec![OpResult::Expired(want)]);
            }
            Step::Reopen => {
                evicted_before_reopen += store.totals().evicted;
                store.close();
                store = open()?;
            }
        }
        let t = store.totals();
        prop_assert_eq!(t.messages, model.rows.len() as u64);
        prop_assert_eq!(t.bytes, model.bytes());
        prop_assert_eq!(evicted_before_reopen + t.evicted, model.evicted);
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn matches_model_drop_oldest(steps in proptest::collection::vec(step(), 1..60)) {
        run(steps, WhenFull::DropOldest)?;
    }

    #[test]
    fn matches_model_block(steps in proptest::collection::vec(step(), 1..60)) {
        run(steps, WhenFull::Block)?;
    }
}

#[test]
fn group_commit_batches_concurrent_requests() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreConfig {
            commit_interval: Duration::from_millis(20),
            ..StoreConfig::default()
        },
    )
    .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    for i in 0..200 {
        let tx = tx.clone();
        let m = NewMessage {
            dest: Dest::Session("c".into()),
            topic: "t".into(),
            payload: Bytes::from(format!("{i}")),
            qos: 1,
            retain: false,
            props: Bytes::new(),
            sub_ids: Bytes::new(),
            received_ms: 0,
            expires_ms: None,
        };
        store
            .submit(
                vec![Op::Insert { id: None, msg: m }],
                Box::new(move |o| tx.send(o).unwrap()),
            )
            .unwrap();
    }
    let mut ids = Vec::new();
    for _ in 0..200 {
        match rx.recv().unwrap().unwrap()[..] {
            [OpResult::Inserted(id)] => ids.push(id),
            ref other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        ids,
        (1..=200).collect::<Vec<_>>(),
        "completions in submission order"
    );
    let commits = store.totals().commits;
    assert!(
        commits < 20,
        "200 requests took {commits} commits: not grouped"
    );
}

#[test]
fn refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    drop(Store::open(dir.path(), StoreConfig::default()).unwrap());
    let c = rusqlite::Connection::open(dir.path().join("outpost.db")).unwrap();
    c.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
        .unwrap();
    drop(c);
    match Store::open(dir.path(), StoreConfig::default()) {
        Err(StoreError::SchemaTooNew { found, known }) => {
            assert_eq!((found, known), (SCHEMA_VERSION + 1, SCHEMA_VERSION))
        }
        Err(other) => panic!("{other}"),
        Ok(_) => panic!("opened a newer schema"),
    }
}

#[test]
fn sessions_subscriptions_retained_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    store
        .submit_wait(vec![
            Op::SessionPut(StoredSession {
                username: None,
                client_id: "c".into(),
                version: 5,
                expiry: 60,
                expires_ms: Some(99),
                will: Some(Bytes::from_static(b"w")),
                will_due_ms: Some(123),
            }),
            Op::SubPut(StoredSubscription {
                client_id: "c".into(),
                filter: "a/#".into(),
                options: 1,
                sub_id: Some(7),
            }),
            Op::Qos2Put {
                client_id: "c".into(),
                packet_id: 9,
            },
            Op::RetainSet(StoredRetained {
                topic: "r".into(),
                payload: Bytes::from_static(b"p"),
                qos: 1,
                props: Bytes::new(),
                received_ms: 1,
                expires_ms: None,
            }),
            Op::Insert {
                id: Some(41),
                msg: NewMessage {
                    dest: Dest::Session("c".into()),
                    topic: "a/b".into(),
                    payload: Bytes::from_static(b"q"),
                    qos: 1,
                    retain: false,
                    props: Bytes::new(),
                    sub_ids: Bytes::new(),
                    received_ms: 1,
                    expires_ms: None,
                },
            },
        ])
        .unwrap();
    assert_eq!(
        store.max_id().unwrap(),
        41,
        "an explicit id moves the sequence"
    );
    store.close();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.sessions().unwrap().len(), 1);
    assert_eq!(store.subscriptions().unwrap()[0].sub_id, Some(7));
    assert_eq!(store.inbound_qos2().unwrap(), vec![("c".to_owned(), 9)]);
    assert_eq!(store.retained().unwrap()[0].topic, "r");
    assert_eq!(store.totals().messages, 1);
    store
        .submit_wait(vec![Op::SessionDelete("c".into())])
        .unwrap();
    assert!(store.sessions().unwrap().is_empty());
    assert!(store.subscriptions().unwrap().is_empty());
    assert!(store.inbound_qos2().unwrap().is_empty());
    assert_eq!(
        store.totals().messages,
        0,
        "a deleted session takes its queue with it"
    );
}

/// A version 1 database (as the first release wrote it) is migrated in place, keeping its rows.
#[test]
fn migrates_a_version_1_database() {
    let dir = tempfile::tempdir().unwrap();
    {
        let c = rusqlite::Connection::open(dir.path().join("outpost.db")).unwrap();
        c.execute_batch(super::schema::MIGRATIONS[0]).unwrap();
        c.execute_batch(
            "PRAGMA user_version = 1;
             INSERT INTO sessions (client_id, version, expiry) VALUES ('old', 4, 60);",
        )
        .unwrap();
    }
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let s = store.sessions().unwrap();
    assert_eq!((s[0].client_id.as_str(), s[0].will_due_ms), ("old", None));
}

fn row(dest: Dest, received_ms: i64) -> NewMessage {
    NewMessage {
        dest,
        topic: "t".into(),
        payload: Bytes::from_static(b"0123456789"),
        qos: 1,
        retain: false,
        props: Bytes::new(),
        sub_ids: Bytes::new(),
        received_ms,
        expires_ms: Some(received_ms + 1000),
    }
}

/// Issue 18: one abandoned local session under `drop_oldest` evicted every acknowledged
/// cloud-bound row. Each class is full on its own now, and eviction stays in the class.
#[test]
fn a_full_session_class_never_evicts_the_outbox() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(
        dir.path(),
        StoreConfig {
            max_messages: 100,
            outbox_share: 0.8,
            ..StoreConfig::default()
        },
    )
    .unwrap();
    let outbox: Vec<Op> = (0..50)
        .map(|i| Op::Insert {
            id: None,
            msg: row(Dest::Outbox("p4".into()), i),
        })
        .collect();
    store.submit_wait(outbox).unwrap();
    let flood: Vec<Op> = (0..3000)
        .map(|i| Op::Insert {
            id: None,
            msg: row(Dest::Session("abandoned".into()), 100 + i),
        })
        .collect();
    store.submit_wait(flood).unwrap();
    let t = store.totals();
    assert_eq!(t.outbox_messages, 50, "the cloud backlog is whole");
    assert_eq!(
        t.messages - t.outbox_messages,
        20,
        "sessions hold their 20% share"
    );
    assert_eq!(t.evicted, 2980);
    assert_eq!(store.outbox_summary().unwrap().messages, 50);
    // The outbox's own share fills and evicts its own oldest.
    let more: Vec<Op> = (0..40)
        .map(|i| Op::Insert {
            id: None,
            msg: row(Dest::Outbox("p4".into()), 5000 + i),
        })
        .collect();
    store.submit_wait(more).unwrap();
    let t = store.totals();
    assert_eq!(t.outbox_messages, 80);
    assert_eq!(t.messages - t.outbox_messages, 20);
    let oldest = store.read_window(&Dest::Outbox("p4".into()), 0, 1).unwrap();
    assert_eq!(
        oldest[0].msg.received_ms, 10,
        "the outbox's ten oldest went"
    );
    store.close();
    // Per-class totals are rebuilt on open.
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    assert_eq!(store.totals().outbox_messages, 80);
    assert_eq!(store.totals().messages, 100);
}

/// Issue 18: after NTP steps the clock, the rows this run stamped under the old reading move
/// with it, and earlier rows do not.
#[test]
fn a_clock_step_moves_this_runs_stamps_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let ins = |id, ms| Op::Insert {
        id: Some(id),
        msg: row(Dest::Outbox("p4".into()), ms),
    };
    store
        .submit_wait(vec![ins(1, 1_000), ins(2, 2_000), ins(3, 3_000)])
        .unwrap();
    store
        .submit_wait(vec![Op::ClockStep {
            delta_ms: 86_400_000,
            from_id: 2,
        }])
        .unwrap();
    let rows = store
        .read_window(&Dest::Outbox("p4".into()), 0, 10)
        .unwrap();
    let stamps: Vec<_> = rows
        .iter()
        .map(|r| (r.msg.received_ms, r.msg.expires_ms))
        .collect();
    assert_eq!(
        stamps,
        vec![
            (1_000, Some(2_000)),
            (86_402_000, Some(86_403_000)),
            (86_403_000, Some(86_404_000))
        ]
    );
}
