//! The schema and its migrations. `PRAGMA user_version` holds the schema version; each
//! migration moves it up by one inside a transaction. A database newer than this binary knows is
//! refused, never guessed at.

use rusqlite::Connection;

use super::StoreError;

/// The schema this binary writes.
pub const VERSION: i64 = 3;

/// Each entry moves the schema from version `index` to `index + 1`.
pub(super) const MIGRATIONS: &[&str] = &[
    // 0 -> 1
    "
    -- Every durable message: the bridge's outbox (kind 0, dest = rule name) and the queues of
    -- persistent sessions (kind 1, dest = client id). One table, so that limits, eviction of the
    -- oldest and expiry treat them together, as the durability contract says.
    CREATE TABLE messages (
        -- AUTOINCREMENT: an id is never reused, so a late ack can never delete a newer row.
        id          INTEGER PRIMARY KEY AUTOINCREMENT,
        kind        INTEGER NOT NULL,
        dest        TEXT NOT NULL,
        topic       TEXT NOT NULL,
        payload     BLOB NOT NULL,
        qos         INTEGER NOT NULL,
        retain      INTEGER NOT NULL,
        props       BLOB NOT NULL,
        sub_ids     BLOB NOT NULL,
        received_ms INTEGER NOT NULL,
        expires_ms  INTEGER,
        bytes       INTEGER NOT NULL,
        -- 0 queued, 1 sent and awaiting PUBACK or PUBREC, 2 PUBREC received (PUBREL due)
        state       INTEGER NOT NULL DEFAULT 0,
        packet_id   INTEGER
    );
    CREATE INDEX messages_by_dest ON messages (kind, dest, id);
    CREATE INDEX messages_by_expiry ON messages (expires_ms) WHERE expires_ms IS NOT NULL;
    CREATE INDEX messages_by_age ON messages (received_ms);

    CREATE TABLE sessions (
        client_id   TEXT PRIMARY KEY,
        version     INTEGER NOT NULL,
        expiry      INTEGER NOT NULL,
        -- when the session ends if it stays offline; NULL while connected or never
        expires_ms  INTEGER,
        will        BLOB
    );

    CREATE TABLE subscriptions (
        client_id   TEXT NOT NULL,
        filter      TEXT NOT NULL,
        options     INTEGER NOT NULL,
        sub_id      INTEGER,
        PRIMARY KEY (client_id, filter)
    ) WITHOUT ROWID;

    -- QoS 2 packet ids received from a client and PUBREC'd, awaiting its PUBREL.
    CREATE TABLE inbound_qos2 (
        client_id   TEXT NOT NULL,
        packet_id   INTEGER NOT NULL,
        PRIMARY KEY (client_id, packet_id)
    ) WITHOUT ROWID;

    CREATE TABLE retained (
        topic       TEXT PRIMARY KEY,
        payload     BLOB NOT NULL,
        qos         INTEGER NOT NULL,
        props       BLOB NOT NULL,
        received_ms INTEGER NOT NULL,
        expires_ms  INTEGER
    ) WITHOUT ROWID;
    ",
    // 1 -> 2: when a will that is waiting out its delay (or whose connection a crash ended)
    // is due, so a restart neither loses nor repeats it.
    "ALTER TABLE sessions ADD COLUMN will_due_ms INTEGER;",
    // 2 -> 3: `drop_oldest` evicts the oldest of one class (outbox or session queues), in id
    // order, without walking the other class's rows.
    // The user name that owns a session, so that after a restart an MQTT-SN client id still
    // cannot take over a session a logged-in user made.
    "CREATE INDEX messages_by_kind ON messages (kind, id);
     ALTER TABLE sessions ADD COLUMN username TEXT;",
];

/// Brings the schema up to `VERSION`.
pub fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if found > VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            known: VERSION,
        });
    }
    for (from, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", from + 1))?;
        tx.commit()?;
        tracing::info!(version = from + 1, "store schema migrated");
    }
    Ok(())
}
