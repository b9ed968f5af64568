//! The hub's `Durable` over the SQLite store: submissions go to the store's writer thread, and
//! each commit's outcome comes back to the hub task on a bounded channel.
//!
//! That channel cannot fill: the hub task takes completions before any other input (a biased
//! select), and the completions not yet taken are at most the writer's queue plus one batch,
//! which `COMMITS_QUEUE` exceeds.

use std::sync::Arc;

use tokio::sync::{mpsc, Notify};

use crate::hub::durable::Durable;
use crate::store::{Dest, Op, Outcome, Store, StoredMessage};

/// Commit outcomes waiting for the hub task.
pub const COMMITS_QUEUE: usize = 32_768;

/// The store as the hub sees it.
pub struct StoreLink {
    store: Arc<Store>,
    commits: mpsc::Sender<(u64, Outcome)>,
    /// Woken when outbox rows commit, so the uplink drains them without polling.
    outbox: Option<Arc<Notify>>,
}

impl StoreLink {
    pub fn new(
        store: Arc<Store>,
        commits: mpsc::Sender<(u64, Outcome)>,
        outbox: Option<Arc<Notify>>,
    ) -> Self {
        StoreLink {
            store,
            commits,
            outbox,
        }
    }
}

impl Durable for StoreLink {
    fn submit(&mut self, token: u64, ops: Vec<Op>) {
        let wake = self
            .outbox
            .as_ref()
            .filter(|_| {
                ops.iter().any(
                    |o| matches!(o, Op::Insert { msg, .. } if matches!(msg.dest, Dest::Outbox(_))),
                )
            })
            .cloned();
        let done: crate::store::Completion = if token == 0 {
            Box::new(move |o| {
                if let Err(e) = o {
                    tracing::error!(error = %e, "store write failed");
                }
                if let Some(w) = wake {
                    w.notify_one();
                }
            })
        } else {
            let tx = self.commits.clone();
            // Runs on the writer thread, which is not a runtime thread, so blocking is allowed.
            Box::new(move |o| {
                let _ = tx.blocking_send((token, o));
                if let Some(w) = wake {
                    w.notify_one();
                }
            })
        };
        if let Err(e) = self.store.submit(ops, done) {
            // Only at shutdown: the writer has stopped, and whoever waited gets no ack.
            tracing::error!(error = %e, "store is gone; write not submitted");
        }
    }

    fn read_queue(&mut self, client: &str, after: i64, limit: usize) -> Vec<StoredMessage> {
        match self
            .store
            .read_window(&Dest::Session(client.to_owned()), after, limit)
        {
            Ok(rows) => rows,
            Err(e) => {
                // The rows stay in the store; the next pump tries again.
                tracing::error!(error = %e, client, "reading a session queue failed");
                Vec::new()
            }
        }
    }
}
