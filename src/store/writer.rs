//! The writer thread: group commit, limits and their policy, expiry.
//!
//! It owns the only write connection. A failed batch (a full disk above all) is rolled back
//! whole, so the database never holds half a batch, and every request in it is told.

use std::sync::mpsc::Receiver;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use rusqlite::{params, Connection, ErrorCode, OptionalExtension, Transaction};

use super::{Op, OpResult, Request, StoreConfig, StoreError, Totals, WhenFull};

pub(super) fn run(
    mut conn: Connection,
    rx: Receiver<Request>,
    cfg: StoreConfig,
    totals: Arc<Mutex<Totals>>,
) {
    let mut batch: Vec<Request> = Vec::with_capacity(cfg.max_batch);
    // recv() fails only when every sender is gone: shutdown, after the queue drained.
    while let Ok(first) = rx.recv() {
        batch.push(first);
        // Group commit: take what is already waiting, and commit as soon as nothing more is.
        // Requests that arrive during this commit's fsync form the next batch. Waiting for
        // stragglers would only add latency: a publisher's inflight window is bounded, so its
        // next messages come after our acks. `commit_interval` caps how long a batch stays open
        // while requests keep streaming in, so a steady stream cannot postpone every commit.
        let deadline = Instant::now() + cfg.commit_interval;
        while batch.len() < cfg.max_batch && Instant::now() < deadline {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let start = *totals.lock().unwrap_or_else(|e| e.into_inner());
        let mut working = start;
        let began = Instant::now();
        let outcome = commit(&mut conn, &batch, &cfg, &mut working);
        let took = began.elapsed().as_micros().min(u64::MAX as u128) as u64;
        let outcome = match outcome {
            Ok(results) => {
                working.commits += 1;
                working.commit_us_last = took;
                working.commit_us_avg = if start.commits == 0 {
                    took
                } else {
                    (start.commit_us_avg * 15 + took) / 16
                };
                working.disk_full = false;
                if working.evicted > start.evicted {
                    let n = working.evicted - start.evicted;
                    tracing::warn!(
                        evicted = n,
                        total = working.evicted,
                        "store full: dropped oldest messages"
                    );
                }
                *totals.lock().unwrap_or_else(|e| e.into_inner()) = working;
                Ok(results)
            }
            Err(e) => {
                let mut t = totals.lock().unwrap_or_else(|e| e.into_inner());
                t.disk_full = matches!(e, StoreError::DiskFull);
                tracing::error!(error = %e, requests = batch.len(), "store batch failed and was rolled back");
                Err(Arc::new(e))
            }
        };
        match outcome {
            Ok(results) => {
                // Each request gets its own results, and completions run in submission order,
                // so acks are released in the order the publishes arrived.
                let mut results = results.into_iter();
                for r in batch.drain(..) {
                    let mine: Vec<OpResult> = results.by_ref().take(r.ops.len()).collect();
                    (r.done)(Ok(mine));
                }
            }
            Err(e) => {
                for r in batch.drain(..) {
                    (r.done)(Err(e.clone()));
                }
            }
        }
    }
}

fn is_disk_full(e: &rusqlite::Error) -> bool {
    matches!(e, rusqlite::Error::SqliteFailure(f, _) if f.code == ErrorCode::DiskFull)
}

fn commit(
    conn: &mut Connection,
    batch: &[Request],
    cfg: &StoreConfig,
    t: &mut Totals,
) -> Result<Vec<OpResult>, StoreError> {
    let run = |conn: &mut Connection, t: &mut Totals| -> rusqlite::Result<Vec<OpResult>> {
        let tx = conn.transaction()?;
        let mut out = Vec::with_capacity(batch.iter().map(|r| r.ops.len()).sum());
        for r in batch {
            for op in &r.ops {
                out.push(apply(&tx, op, cfg, t)?);
            }
        }
        tx.commit()?;
        Ok(out)
    };
    run(conn, t).map_err(|e| {
        if is_disk_full(&e) {
            StoreError::DiskFull
        } else {
            StoreError::Sqlite(e)
        }
    })
}

fn apply(
    tx: &Transaction<'_>,
    op: &Op,
    cfg: &StoreConfig,
    t: &mut Totals,
) -> rusqlite::Result<OpResult> {
    Ok(match op {
        Op::Insert { id, msg: m } => {
            let b = m.bytes();
            let kind = m.dest.kind();
            let (max_m, max_b) = cfg.class_limits(kind);
            if !fits(t, kind, (max_m, max_b), b) {
                if cfg.when_full == WhenFull::Block || b > max_b {
                    return Ok(OpResult::Full);
                }
                // Pinned rows are never evicted; a class of only those goes over by them.
                evict_until_fits(tx, kind, (max_m, max_b), t, b)?;
            }
            tx.prepare_cached(
                "INSERT INTO messages (id, kind, dest, topic, payload, qos, retain, props, sub_ids,
                                       received_ms, expires_ms, bytes)
                 VALUES (?12, ?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
            )?
            .execute(params![
                m.dest.kind(),
                m.dest.name(),
                m.topic,
                &m.payload[..],
                m.qos,
                m.retain,
                &m.props[..],
                &m.sub_ids[..],
                m.received_ms,
                m.expires_ms,
                b as i64,
                id
            ])?;
            t.add(kind, 1, b as i64);
            OpResult::Inserted(tx.last_insert_rowid())
        }
        Op::Delete(id) => {
            let gone: Option<(i64, i64)> = tx
                .prepare_cached("DELETE FROM messages WHERE id = ?1 RETURNING kind, bytes")?
                .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()?;
            if let Some((kind, b)) = gone {
                t.add(kind, -1, -b);
            }
            OpResult::Done
        }
        Op::SetState {
            id,
            state,
            packet_id,
        } => {
            tx.prepare_cached("UPDATE messages SET state = ?2, packet_id = ?3 WHERE id = ?1")?
                .execute(params![id, state, packet_id])?;
            OpResult::Done
        }
        Op::RetainSet(r) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO retained (topic, payload, qos, props, received_ms, expires_ms)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )?
            .execute(params![r.topic, &r.payload[..], r.qos, &r.props[..], r.received_ms, r.expires_ms])?;
            OpResult::Done
        }
        Op::RetainDelete(topic) => {
            tx.prepare_cached("DELETE FROM retained WHERE topic = ?1")?
                .execute([topic])?;
            OpResult::Done
        }
        Op::SessionPut(s) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO sessions
                     (client_id, version, expiry, expires_ms, will, will_due_ms, username)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
            )?
            .execute(params![
                s.client_id,
                s.version,
                s.expiry,
                s.expires_ms,
                s.will.as_deref(),
                s.will_due_ms,
                s.username
            ])?;
            OpResult::Done
        }
        Op::SessionDelete(client) => {
            let (n, b): (i64, i64) = tx
                .prepare_cached("SELECT count(*), coalesce(sum(bytes), 0) FROM messages WHERE kind = 1 AND dest = ?1")?
                .query_row([client], |r| Ok((r.get(0)?, r.get(1)?)))?;
            tx.prepare_cached("DELETE FROM messages WHERE kind = 1 AND dest = ?1")?
                .execute([client])?;
            t.add(1, -n, -b);
            for sql in [
                "DELETE FROM sessions WHERE client_id = ?1",
                "DELETE FROM subscriptions WHERE client_id = ?1",
                "DELETE FROM inbound_qos2 WHERE client_id = ?1",
            ] {
                tx.prepare_cached(sql)?.execute([client])?;
            }
            OpResult::Done
        }
        Op::SubPut(s) => {
            tx.prepare_cached(
                "INSERT OR REPLACE INTO subscriptions (client_id, filter, options, sub_id)
                 VALUES (?1, ?2, ?3, ?4)",
            )?
            .execute(params![s.client_id, s.filter, s.options, s.sub_id])?;
            OpResult::Done
        }
        Op::SubDelete { client_id, filter } => {
            tx.prepare_cached("DELETE FROM subscriptions WHERE client_id = ?1 AND filter = ?2")?
                .execute([client_id, filter])?;
            OpResult::Done
        }
        Op::Qos2Put {
            client_id,
            packet_id,
        } => {
            tx.prepare_cached(
                "INSERT OR IGNORE INTO inbound_qos2 (client_id, packet_id) VALUES (?1, ?2)",
            )?
            .execute(params![client_id, packet_id])?;
            OpResult::Done
        }
        Op::Qos2Delete {
            client_id,
            packet_id,
        } => {
            tx.prepare_cached("DELETE FROM inbound_qos2 WHERE client_id = ?1 AND packet_id = ?2")?
                .execute(params![client_id, packet_id])?;
            OpResult::Done
        }
        Op::ClockStep { delta_ms, from_id } => {
            tx.prepare_cached(
                "UPDATE messages SET received_ms = received_ms + ?1,
                                     expires_ms = expires_ms + ?1
                 WHERE id >= ?2",
            )?
            .execute(params![delta_ms, from_id])?;
            OpResult::Done
        }
        Op::Expire { now_ms } => {
            let oldest_kept = now_ms - cfg.max_age.as_millis().min(i64::MAX as u128) as i64;
            // Two deletes, each on its own index: an OR across both would scan every row.
            let mut n = 0u64;
            for (sql, bound) in [
                (
                    "DELETE FROM messages WHERE expires_ms <= ?1 AND NOT {PINNED} RETURNING kind, bytes",
                    *now_ms,
                ),
                (
                    "DELETE FROM messages WHERE received_ms < ?1 AND NOT {PINNED} RETURNING kind, bytes",
                    oldest_kept,
                ),
            ] {
                let mut st = tx.prepare_cached(&sql.replace("{PINNED}", PINNED))?;
                let mut rows = st.query([bound])?;
                while let Some(r) = rows.next()? {
                    n += 1;
                    t.add(r.get(0)?, -1, -r.get::<_, i64>(1)?);
                }
            }
            tx.prepare_cached("DELETE FROM retained WHERE expires_ms <= ?1")?
                .execute([now_ms])?;
            t.expired += n;
            OpResult::Expired(n)
        }
    })
}

/// Rows neither eviction nor expiry may delete: QoS 2 messages already sent. The peer may hold
/// their packet id awaiting PUBREL; deleting the row would let a later message reuse the id and
/// be taken for a duplicate (the uplink derives ids from rows). They leave when acknowledged.
const PINNED: &str = "(qos = 2 AND state >= 1)";

/// Whether one more message of `need` bytes fits in class `kind` under `limits`.
fn fits(t: &Totals, kind: i64, (max_m, max_b): (u64, u64), need: u64) -> bool {
    let (m, b) = t.class(kind);
    m < max_m && b + need <= max_b
}

/// `drop_oldest`: deletes the class's lowest ids until one more message of `need` bytes fits.
/// Only the class's own rows go: a neglected local session never costs the cloud its backlog.
fn evict_until_fits(
    tx: &Transaction<'_>,
    kind: i64,
    limits: (u64, u64),
    t: &mut Totals,
    need: u64,
) -> rusqlite::Result<()> {
    while t.class(kind).0 > 0 && !fits(t, kind, limits, need) {
        let victims: Vec<(i64, i64)> = {
            let mut st = tx.prepare_cached(&format!(
                "SELECT id, bytes FROM messages INDEXED BY messages_by_kind
                 WHERE kind = ?1 AND NOT {PINNED} ORDER BY id LIMIT 64"
            ))?;
            let rows = st.query_map([kind], |r| Ok((r.get(0)?, r.get(1)?)))?;
            rows.collect::<rusqlite::Result<_>>()?
        };
        if victims.is_empty() {
            break;
        }
        let mut del = tx.prepare_cached("DELETE FROM messages WHERE id = ?1")?;
        for (id, b) in victims {
            if fits(t, kind, limits, need) {
                break;
            }
            del.execute([id])?;
            t.add(kind, -1, -b);
            t.evicted += 1;
        }
    }
    Ok(())
}
