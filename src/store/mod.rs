//! The one SQLite store behind the hub: the durable messages (bridge outbox and persistent
//! session queues in one table), sessions, subscriptions, inbound QoS 2 state and retained
//! messages.
//!
//! One writer thread owns the write connection and commits everything submitted to it in
//! batches (group commit): a batch takes every request already waiting and commits when none
//! is left, when it holds `max_batch` requests, or when `commit_interval` has passed since its
//! first request, whichever comes first; only then is each request's completion called.
//! Requests that arrive during a commit's fsync make up the next batch. Callers never wait on fsync; they wait for their completion.
//! Reads use their own connection (WAL: readers never block the writer). The store has no clock:
//! times are Unix milliseconds handed in with each operation.

mod schema;
mod writer;

#[cfg(test)]
mod model_tests;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use rusqlite::{params, Connection, OpenFlags, OptionalExtension};
use thiserror::Error;

pub use schema::VERSION as SCHEMA_VERSION;

/// Why the store could not do what was asked.
#[derive(Debug, Error)]
pub enum StoreError {
    /// SQLite reported an error.
    #[error("sqlite: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The database was written by a newer outpost.
    #[error("database schema version {found} is newer than this outpost knows ({known}); refusing to touch it")]
    SchemaTooNew {
        /// Version found in the file.
        found: i64,
        /// Newest version this binary knows.
        known: i64,
    },
    /// The disk is full: the batch was rolled back and nothing in it happened.
    #[error("disk full: batch rolled back")]
    DiskFull,
    /// The data directory could not be created or opened.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The error (shown in the message, so not also a `source`).
        error: std::io::Error,
    },
    /// The database file cannot be written (a read-only file or mount): refused at start,
    /// rather than refusing every QoS 1/2 message afterwards.
    #[error("{path} is read-only: outpost must be able to write its store (check its owner and mode, and the mount)")]
    ReadOnly {
        /// The database file.
        path: PathBuf,
    },
    /// The writer thread is gone (shutdown, or it failed).
    #[error("store writer has stopped")]
    Stopped,
}

/// `synchronous` setting: `full` survives power loss; `normal` may lose the last commits on power
/// loss (never on a process crash) and is several times faster on SD cards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    /// fsync on every commit.
    Full,
    /// fsync at checkpoints only.
    Normal,
}

/// What happens when the message limits are reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenFull {
    /// Delete the oldest messages (counted and logged) to make room.
    DropOldest,
    /// Refuse the new message: its publisher gets no ack (3.1.1) or PUBACK 0x97 (v5).
    Block,
}

/// Store settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    pub synchronous: Synchronous,
    pub commit_interval: Duration,
    /// Requests per batch at most.
    pub max_batch: usize,
    /// Bytes of durable messages (payload, topic and properties) at most.
    pub max_bytes: u64,
    /// Durable messages at most.
    pub max_messages: u64,
    /// Messages older than this are expired.
    pub max_age: Duration,
    pub when_full: WhenFull,
    /// The outbox's share of `max_messages` and `max_bytes`; session queues have the rest.
    /// Each class is full on its own and `drop_oldest` evicts within it.
    pub outbox_share: f64,
}

impl StoreConfig {
    /// (messages, bytes) that the outbox (kind 0) or the session queues (kind 1) may hold.
    pub(crate) fn class_limits(&self, kind: i64) -> (u64, u64) {
        let share = self.outbox_share.clamp(0.0, 1.0);
        let part = |max: u64| ((max as f64) * share).round() as u64;
        let (m, b) = (part(self.max_messages), part(self.max_bytes));
        if kind == 0 {
            (m, b)
        } else {
            (
                self.max_messages - m.min(self.max_messages),
                self.max_bytes - b.min(self.max_bytes),
            )
        }
    }
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            synchronous: Synchronous::Full,
            commit_interval: Duration::from_millis(5),
            max_batch: 1024,
            max_bytes: 512 << 20,
            max_messages: 1_000_000,
            max_age: Duration::from_secs(30 * 86_400),
            when_full: WhenFull::DropOldest,
            outbox_share: 0.8,
        }
    }
}

/// Which queue a durable message belongs to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Dest {
    /// The bridge's outbox, by rule name.
    Outbox(String),
    /// A persistent session's queue, by client id.
    Session(String),
}

impl Dest {
    pub(crate) fn kind(&self) -> i64 {
        match self {
            Dest::Outbox(_) => 0,
            Dest::Session(_) => 1,
        }
    }
    fn name(&self) -> &str {
        match self {
            Dest::Outbox(n) | Dest::Session(n) => n,
        }
    }
}

/// A message to make durable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    pub dest: Dest,
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    /// v5 properties as their wire encoding (without the length prefix).
    pub props: Bytes,
    /// Subscription identifiers, as little-endian u32s.
    pub sub_ids: Bytes,
    pub received_ms: i64,
    pub expires_ms: Option<i64>,
}

impl NewMessage {
    /// What the message counts against `max_bytes`.
    pub fn bytes(&self) -> u64 {
        (self.topic.len() + self.payload.len() + self.props.len() + self.sub_ids.len()) as u64
    }
}

/// A durable message as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub id: i64,
    pub msg: NewMessage,
    /// 0 queued, 1 sent (awaiting PUBACK or PUBREC), 2 PUBREC received (PUBREL due).
    pub state: u8,
    pub packet_id: Option<u16>,
}

/// A session row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSession {
    pub client_id: String,
    /// The user name of the connection that last held the session.
    pub username: Option<String>,
    pub version: u8,
    pub expiry: u32,
    pub expires_ms: Option<i64>,
    /// The will, encoded by the hub.
    pub will: Option<Bytes>,
    /// When a will waiting out its delay is due; `None` while the client is connected.
    pub will_due_ms: Option<i64>,
}

/// A subscription row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredSubscription {
    pub client_id: String,
    pub filter: String,
    /// The SUBSCRIBE options byte.
    pub options: u8,
    pub sub_id: Option<u32>,
}

/// A retained message row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRetained {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub props: Bytes,
    pub received_ms: i64,
    pub expires_ms: Option<i64>,
}

/// One durable effect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Add a message; answers `Inserted(id)`, or `Full` under `WhenFull::Block`. The hub passes
    /// the id it allocated (so it can queue a delete before the insert has committed); `None`
    /// lets SQLite choose.
    Insert { id: Option<i64>, msg: NewMessage },
    /// Remove a message (acknowledged, or dropped).
    Delete(i64),
    /// Record how far a message's exchange has got (the persisted QoS 2 state).
    SetState {
        id: i64,
        state: u8,
        packet_id: Option<u16>,
    },
    /// Store or replace the retained message of a topic.
    RetainSet(StoredRetained),
    /// Delete the retained message of a topic.
    RetainDelete(String),
    /// Store or replace a session.
    SessionPut(StoredSession),
    /// Delete a session with its subscriptions, inbound QoS 2 state and queued messages.
    SessionDelete(String),
    /// Store or replace a subscription.
    SubPut(StoredSubscription),
    /// Delete a subscription.
    SubDelete { client_id: String, filter: String },
    /// Remember an inbound QoS 2 packet id awaiting PUBREL.
    Qos2Put { client_id: String, packet_id: u16 },
    /// Forget it (PUBREL arrived).
    Qos2Delete { client_id: String, packet_id: u16 },
    /// Delete messages past their expiry or older than `max_age`; answers `Expired(n)`.
    Expire { now_ms: i64 },
    /// The wall clock stepped by `delta_ms`: messages from `from_id` on were stamped under the
    /// old reading, so their received and expiry stamps move by the step.
    ClockStep { delta_ms: i64, from_id: i64 },
}

/// The answer to one `Op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpResult {
    Done,
    Inserted(i64),
    /// `WhenFull::Block` refused the message.
    Full,
    Expired(u64),
}

/// A batch's outcome, handed to the completion once it has committed (or failed).
pub type Outcome = Result<Vec<OpResult>, Arc<StoreError>>;

/// Called on the writer thread once the request's batch has committed or failed. It must not
/// block: send the outcome somewhere and return.
pub type Completion = Box<dyn FnOnce(Outcome) + Send>;

/// Running totals the writer keeps, readable from any thread.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Totals {
    pub messages: u64,
    pub bytes: u64,
    /// The outbox's part of `messages` and `bytes` (the rest are session queues).
    pub outbox_messages: u64,
    pub outbox_bytes: u64,
    /// Messages deleted by `drop_oldest` since start.
    pub evicted: u64,
    /// Messages deleted by expiry since start.
    pub expired: u64,
    /// Batches committed since start.
    pub commits: u64,
    /// True while the last batch failed with a full disk.
    pub disk_full: bool,
    /// How long the last commit took (the fsync included), and a moving average (1/16).
    pub commit_us_last: u64,
    pub commit_us_avg: u64,
}

impl Totals {
    /// (messages, bytes) held by class `kind` (0 outbox, 1 session queues).
    pub(crate) fn class(&self, kind: i64) -> (u64, u64) {
        if kind == 0 {
            (self.outbox_messages, self.outbox_bytes)
        } else {
            (
                self.messages - self.outbox_messages,
                self.bytes - self.outbox_bytes,
            )
        }
    }

    /// Counts `n` messages of `b` bytes into (positive) or out of (negative) class `kind`.
    pub(crate) fn add(&mut self, kind: i64, n: i64, b: i64) {
        let f = |v: &mut u64, d: i64| *v = v.saturating_add_signed(d);
        f(&mut self.messages, n);
        f(&mut self.bytes, b);
        if kind == 0 {
            f(&mut self.outbox_messages, n);
            f(&mut self.outbox_bytes, b);
        }
    }
}

/// What waits in the outbox for the cloud.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct OutboxSummary {
    pub messages: u64,
    pub bytes: u64,
    /// When the oldest one was received (Unix ms).
    pub oldest_ms: Option<i64>,
}

pub(crate) struct Request {
    ops: Vec<Op>,
    done: Completion,
}

/// Handle on the store. Cloneable senders go to whoever submits writes.
pub struct Store {
    tx: Option<SyncSender<Request>>,
    reader: Mutex<Connection>,
    totals: Arc<Mutex<Totals>>,
    writer: Option<JoinHandle<()>>,
    path: PathBuf,
}

/// Requests waiting for the writer. Submitters block when it is full (backpressure), which
/// only happens when the disk cannot keep up with a whole queue of batches.
const WRITER_QUEUE: usize = 16_384;

fn open_conn(path: &Path, flags: OpenFlags) -> Result<Connection, StoreError> {
    let c = Connection::open_with_flags(path, flags)?;
    c.busy_timeout(Duration::from_secs(5))?;
    Ok(c)
}

impl Store {
    /// Opens (creating if needed) `dir/outpost.db`, migrates it and starts the writer.
    pub fn open(dir: &Path, cfg: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Io {
            path: dir.to_owned(),
            error: source,
        })?;
        let path = dir.join("outpost.db");
        warn_about_leftovers(&path);
        let mut w = open_conn(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE,
        )?;
        if w.is_readonly(rusqlite::MAIN_DB)? {
            return Err(StoreError::ReadOnly { path });
        }
        w.pragma_update(None, "journal_mode", "WAL")?;
        let sync = match cfg.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        w.pragma_update(None, "synchronous", sync)?;
        schema::migrate(&mut w)?;
        let mut start = Totals::default();
        {
            let mut st = w.prepare(
                "SELECT kind, count(*), coalesce(sum(bytes), 0) FROM messages GROUP BY kind",
            )?;
            let mut rows = st.query([])?;
            while let Some(r) = rows.next()? {
                start.add(r.get(0)?, r.get(1)?, r.get(2)?);
            }
        }
        let totals = Arc::new(Mutex::new(start));
        let reader = open_conn(
            &path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        let (tx, rx) = sync_channel(WRITER_QUEUE);
        let t = totals.clone();
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer::run(w, rx, cfg, t))
            .map_err(|source| StoreError::Io {
                path: path.clone(),
                error: source,
            })?;
        Ok(Store {
            tx: Some(tx),
            reader: Mutex::new(reader),
            totals,
            writer: Some(writer),
            path,
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Submits ops to commit together (in one batch, possibly with others'); `done` runs on the
    /// writer thread after the commit. Blocks only if the writer's queue is full.
    pub fn submit(&self, ops: Vec<Op>, done: Completion) -> Result<(), StoreError> {
        let tx = self.tx.as_ref().ok_or(StoreError::Stopped)?;
        match tx.try_send(Request { ops, done }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(r)) => tx.send(r).map_err(|_| StoreError::Stopped),
            Err(TrySendError::Disconnected(_)) => Err(StoreError::Stopped),
        }
    }

    /// Submits and waits for the commit: for startup, tests and tools, never the hot path.
    pub fn submit_wait(&self, ops: Vec<Op>) -> Outcome {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(
            ops,
            Box::new(move |o| {
                let _ = tx.send(o);
            }),
        )
        .map_err(Arc::new)?;
        rx.recv().map_err(|_| Arc::new(StoreError::Stopped))?
    }

    /// Totals as of the last commit.
    pub fn totals(&self) -> Totals {
        self.totals.lock().map(|t| *t).unwrap_or_default()
    }

    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T, StoreError> {
        let c = self.reader.lock().map_err(|_| StoreError::Stopped)?;
        Ok(f(&c)?)
    }

    /// Up to `limit` messages of `dest` with ids above `after`, in order.
    pub fn read_window(
        &self,
        dest: &Dest,
        after: i64,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare_cached(
                "SELECT id, topic, payload, qos, retain, props, sub_ids, received_ms, expires_ms,
                        state, packet_id
                 FROM messages WHERE kind = ?1 AND dest = ?2 AND id > ?3 ORDER BY id LIMIT ?4",
            )?;
            let rows = st.query_map(
                params![dest.kind(), dest.name(), after, limit as i64],
                |r| message_from_row(r, dest.clone()),
            )?;
            rows.collect()
        })
    }

    /// The outbox's size and age. Counts the index once: meant for a status every few seconds,
    /// not for every message.
    pub fn outbox_summary(&self) -> Result<OutboxSummary, StoreError> {
        self.read(|c| {
            let (messages, bytes): (i64, i64) = c
                .prepare_cached(
                    "SELECT COUNT(*), COALESCE(SUM(bytes), 0) FROM messages WHERE kind = 0",
                )?
                .query_row([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            // By age index, stopping at the first outbox row.
            let oldest_ms: Option<i64> = c
                .prepare_cached(
                    "SELECT received_ms FROM messages INDEXED BY messages_by_age
                     WHERE kind = 0 ORDER BY received_ms LIMIT 1",
                )?
                .query_row([], |r| r.get(0))
                .optional()?;
            Ok(OutboxSummary {
                messages: messages.max(0) as u64,
                bytes: bytes.max(0) as u64,
                oldest_ms,
            })
        })
    }

    /// The outbox classes that hold messages.
    pub fn outbox_classes(&self) -> Result<Vec<Dest>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare("SELECT DISTINCT dest FROM messages WHERE kind = 0")?;
            let rows = st.query_map([], |r| Ok(Dest::Outbox(r.get(0)?)))?;
            rows.collect()
        })
    }

    /// Outbox messages whose PUBREC was recorded (state 2): after a restart their PUBREL goes
    /// again, never their PUBLISH.
    pub fn outbox_released(&self) -> Result<Vec<StoredMessage>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT id, topic, payload, qos, retain, props, sub_ids, received_ms, expires_ms,
                        state, packet_id, dest
                 FROM messages WHERE kind = 0 AND state = 2 ORDER BY id",
            )?;
            let rows = st.query_map([], |r| message_from_row(r, Dest::Outbox(r.get(11)?)))?;
            rows.collect()
        })
    }

    /// All sessions.
    pub fn sessions(&self) -> Result<Vec<StoredSession>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT client_id, version, expiry, expires_ms, will, will_due_ms, username
                 FROM sessions",
            )?;
            let rows = st.query_map([], |r| {
                Ok(StoredSession {
                    client_id: r.get(0)?,
                    version: r.get(1)?,
                    expiry: r.get(2)?,
                    expires_ms: r.get(3)?,
                    will: r.get::<_, Option<Vec<u8>>>(4)?.map(Bytes::from),
                    will_due_ms: r.get(5)?,
                    username: r.get(6)?,
                })
            })?;
            rows.collect()
        })
    }

    /// All subscriptions.
    pub fn subscriptions(&self) -> Result<Vec<StoredSubscription>, StoreError> {
        self.read(|c| {
            let mut st =
                c.prepare("SELECT client_id, filter, options, sub_id FROM subscriptions")?;
            let rows = st.query_map([], |r| {
                Ok(StoredSubscription {
                    client_id: r.get(0)?,
                    filter: r.get(1)?,
                    options: r.get(2)?,
                    sub_id: r.get(3)?,
                })
            })?;
            rows.collect()
        })
    }

    /// Inbound QoS 2 packet ids awaiting PUBREL, by client.
    pub fn inbound_qos2(&self) -> Result<Vec<(String, u16)>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare("SELECT client_id, packet_id FROM inbound_qos2")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect()
        })
    }

    /// All retained messages.
    pub fn retained(&self) -> Result<Vec<StoredRetained>, StoreError> {
        self.read(|c| {
            let mut st = c.prepare(
                "SELECT topic, payload, qos, props, received_ms, expires_ms FROM retained",
            )?;
            let rows = st.query_map([], |r| {
                Ok(StoredRetained {
                    topic: r.get(0)?,
                    payload: Bytes::from(r.get::<_, Vec<u8>>(1)?),
                    qos: r.get(2)?,
                    props: Bytes::from(r.get::<_, Vec<u8>>(3)?),
                    received_ms: r.get(4)?,
                    expires_ms: r.get(5)?,
                })
            })?;
            rows.collect()
        })
    }

    /// How many messages each persistent session has queued (one pass over the index).
    pub fn session_queue_lengths(&self) -> Result<HashMap<String, usize>, StoreError> {
        self.read(|c| {
            let mut st =
                c.prepare("SELECT dest, count(*) FROM messages WHERE kind = 1 GROUP BY dest")?;
            let rows = st.query_map([], |r| Ok((r.get(0)?, r.get::<_, i64>(1)? as usize)))?;
            rows.collect()
        })
    }

    /// The highest message id ever allocated (ids are never reused).
    pub fn max_id(&self) -> Result<i64, StoreError> {
        self.read(|c| {
            let seq: Option<i64> = c
                .query_row(
                    "SELECT seq FROM sqlite_sequence WHERE name = 'messages'",
                    [],
                    |r| r.get(0),
                )
                .optional()?;
            Ok(seq.unwrap_or(0))
        })
    }

    /// Stops the writer after it has committed everything already submitted.
    pub fn close(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        drop(self.tx.take());
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
    }
}

/// A `-wal` without its database (deleted, or truncated to nothing) cannot be replayed: the
/// store starts empty. Say so, naming what was found, rather than starting without a word.
fn warn_about_leftovers(db: &Path) {
    let mut wal = db.as_os_str().to_owned();
    wal.push("-wal");
    let wal = PathBuf::from(wal);
    let Ok(w) = std::fs::metadata(&wal) else {
        return;
    };
    if w.len() == 0 {
        return;
    }
    let db_len = std::fs::metadata(db).map(|m| m.len()).ok();
    if db_len.unwrap_or(0) == 0 {
        tracing::warn!(
            wal = %wal.display(),
            wal_bytes = w.len(),
            database = %db.display(),
            found = if db_len.is_none() { "missing" } else { "empty" },
            "a write-ahead log is here but its database is missing or empty: what it held cannot be recovered, and the store starts empty"
        );
    }
}

fn message_from_row(r: &rusqlite::Row<'_>, dest: Dest) -> rusqlite::Result<StoredMessage> {
    Ok(StoredMessage {
        id: r.get(0)?,
        msg: NewMessage {
            dest,
            topic: r.get(1)?,
            payload: Bytes::from(r.get::<_, Vec<u8>>(2)?),
            qos: r.get(3)?,
            retain: r.get(4)?,
            props: Bytes::from(r.get::<_, Vec<u8>>(5)?),
            sub_ids: Bytes::from(r.get::<_, Vec<u8>>(6)?),
            received_ms: r.get(7)?,
            expires_ms: r.get(8)?,
        },
        state: r.get(9)?,
        packet_id: r.get(10)?,
    })
}

impl Drop for Store {
    fn drop(&mut self) {
        self.shutdown();
    }
}
