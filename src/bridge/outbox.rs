//! The drain side of the outbox, sans-IO: which row goes up next. Rows are read from the store
//! in windows, one cursor per priority class; the lowest class with rows always goes first, and
//! within a class rows go in id order, which is arrival order. Live traffic joins the outbox
//! like everything else, so it never overtakes the backlog.

use std::collections::{BTreeMap, VecDeque};

use crate::store::{Dest, StoredMessage};

/// Rows read per store query.
pub const WINDOW: usize = 512;

#[derive(Debug, Default)]
struct Class {
    /// The highest id read so far.
    cursor: i64,
    rows: VecDeque<StoredMessage>,
    /// The last read came back short: nothing more until new rows are committed.
    drained: bool,
}

/// Cursors over the outbox classes. The store is reached through the `read` closure given to
/// `next`, so tests can drive it from a vector.
#[derive(Debug, Default)]
pub struct Outbox {
    classes: BTreeMap<Dest, Class>,
}

impl Outbox {
    /// Starts with the classes that hold rows (from the store) and those the rules name.
    pub fn new(dests: impl IntoIterator<Item = Dest>) -> Self {
        let mut o = Outbox::default();
        for d in dests {
            o.classes.entry(d).or_default();
        }
        o
    }

    /// New rows have committed (in `dest`, or anywhere when `None`): look again.
    pub fn wake(&mut self, dest: Option<&Dest>) {
        match dest {
            Some(d) => self.classes.entry(d.clone()).or_default().drained = false,
            None => self.classes.values_mut().for_each(|c| c.drained = false),
        }
    }

    /// The next row to send, from the lowest class that has one.
    pub fn next<E>(
        &mut self,
        mut read: impl FnMut(&Dest, i64, usize) -> Result<Vec<StoredMessage>, E>,
    ) -> Result<Option<StoredMessage>, E> {
        for (dest, c) in self.classes.iter_mut() {
            if c.rows.is_empty() && !c.drained {
                let rows = read(dest, c.cursor, WINDOW)?;
                c.drained = rows.len() < WINDOW;
                if let Some(last) = rows.last() {
                    c.cursor = last.id;
                }
                c.rows.extend(rows);
            }
            if let Some(r) = c.rows.pop_front() {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Puts back a row `next` gave out that could not be sent yet; it goes first next time.
    pub fn unread(&mut self, row: StoredMessage) {
        if let Some(c) = self.classes.get_mut(&row.msg.dest) {
            c.rows.push_front(row);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hub::durable::outbox_dest;
    use crate::store::NewMessage;

    fn row(id: i64, prio: u8) -> StoredMessage {
        StoredMessage {
            id,
            msg: NewMessage {
                dest: outbox_dest(prio),
                topic: format!("t/{id}"),
                payload: Default::default(),
                qos: 1,
                retain: false,
                props: Default::default(),
                sub_ids: Default::default(),
                received_ms: 0,
                expires_ms: None,
            },
            state: 0,
            packet_id: None,
        }
    }

    #[test]
    fn lower_priority_first_then_id_order_and_new_rows_after_wake() {
        let mut table: Vec<StoredMessage> = (1..=1200)
            .map(|i| row(i, if i % 3 == 0 { 0 } else { 5 }))
            .collect();
        let mut o = Outbox::new([outbox_dest(5), outbox_dest(0)]);
        let read = |t: &Vec<StoredMessage>,
                    d: &Dest,
                    after: i64,
                    n: usize|
         -> Result<Vec<StoredMessage>, ()> {
            Ok(t.iter()
                .filter(|r| &r.msg.dest == d && r.id > after)
                .take(n)
                .cloned()
                .collect())
        };
        let mut got = Vec::new();
        while let Some(r) = o.next(|d, a, n| read(&table, d, a, n)).unwrap() {
            got.push(r.id);
        }
        assert_eq!(got.len(), 1200);
        assert!(
            got[..400].iter().all(|i| i % 3 == 0),
            "priority 0 drains first"
        );
        assert!(got[..400].windows(2).all(|w| w[0] < w[1]));
        assert!(got[400..].windows(2).all(|w| w[0] < w[1]));
        // Nothing more until a commit wakes it.
        table.push(row(1201, 5));
        assert!(o.next(|d, a, n| read(&table, d, a, n)).unwrap().is_none());
        o.wake(None);
        let r = o.next(|d, a, n| read(&table, d, a, n)).unwrap().unwrap();
        assert_eq!(r.id, 1201);
        o.unread(r);
        assert_eq!(
            o.next(|d, a, n| read(&table, d, a, n)).unwrap().unwrap().id,
            1201
        );
    }
}
