//! The MQTT-SN gateway's driver: one task per transport (a UDP socket, a serial port) owns a
//! `proto::mqttsn::Gateway`, feeds it datagrams and time, and carries its outputs to the hub and
//! to the transport.
//!
//! Each MQTT-SN client has its own bounded link from the hub (`SN_LINK_QUEUE`), like a TCP
//! connection, and all of them are read by this one task: the hub marks a link in a shared
//! `Wake` set when it puts something there, and the task pulls a client's link only while the
//! machine `wants` more for it. A sleeping client is not pulled, so its link fills and the hub
//! keeps the rest in the session's queue (QoS 1/2 in the store for a persistent session).

use std::collections::{HashMap, HashSet};
use std::fmt::Debug;
use std::hash::Hash;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::sync::{mpsc, watch};

use super::hub_task::{HubMsg, Link, LinkItem, LinkState, Wake};
use super::sleep_until_opt;
use crate::hub::{ConnId, HubInput};
use crate::proto::mqttsn::gateway::{Gateway, Output};

/// Packets waiting in one MQTT-SN client's link. Small: past it the hub's session queue holds
/// them, and that one is bounded and durable.
pub const SN_LINK_QUEUE: usize = 16;

/// A datagram transport under the gateway. Receiving must be cancel-safe: the driver selects
/// on it beside the hub's wake-ups and its timers.
pub trait Transport {
    type Addr: Clone + Eq + Hash + Debug + Send;
    /// The next datagram, into `buf`: its source and length.
    fn recv(
        &mut self,
        buf: &mut [u8],
    ) -> impl std::future::Future<Output = std::io::Result<(Self::Addr, usize)>> + Send;
    fn send(
        &mut self,
        to: &Self::Addr,
        data: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    /// Sends to the ADVERTISE address, if there is one.
    fn broadcast(
        &mut self,
        data: &[u8],
    ) -> impl std::future::Future<Output = std::io::Result<()>> + Send;
    /// Whether `from` may publish at QoS -1.
    fn minus_one_allowed(&self, from: &Self::Addr) -> bool;
    /// For logs.
    fn name(&self) -> String;
}

struct SnLink {
    rx: mpsc::Receiver<LinkItem>,
    state: Arc<LinkState>,
}

struct Driver<A> {
    gw: Gateway<A>,
    hub: mpsc::Sender<HubMsg>,
    links: HashMap<ConnId, SnLink>,
    wake: Arc<Wake>,
    pulls: HashSet<ConnId>,
}

/// Runs the gateway over `t` until `stop` turns true; then ends every client (the hub
/// publishes their wills, as it does for MQTT clients at shutdown) and returns.
pub async fn run<T: Transport>(
    mut t: T,
    gw: Gateway<T::Addr>,
    hub: mpsc::Sender<HubMsg>,
    board: Arc<crate::status::Board>,
    mut stop: watch::Receiver<bool>,
) {
    let entry = format!("mqttsn/{}", t.name());
    let mut reported: Option<std::time::Instant> = None;
    let mut d = Driver {
        gw,
        hub,
        links: HashMap::new(),
        wake: Arc::new(Wake::default()),
        pulls: HashSet::new(),
    };
    let mut buf = vec![0u8; 65_536];
    let mut failures = 0u32;
    loop {
        let now = std::time::Instant::now();
        if reported.map_or(true, |r| now >= r + std::time::Duration::from_secs(1)) {
            reported = Some(now);
            let (active, asleep, awake) = d.gw.census();
            let st = d.gw.stats();
            board.set(
                &entry,
                serde_json::json!({
                    "active": active,
                    "asleep": asleep,
                    "awake": active + awake,
                    "received": st.received,
                    "malformed": st.malformed,
                    "retransmitted": st.retransmitted,
                    "lost": st.lost,
                }),
            );
        }
        let deadline = d.gw.poll_timeout().map(tokio::time::Instant::from_std);
        tokio::select! {
            r = t.recv(&mut buf) => match r {
                Ok((from, n)) => {
                    failures = 0;
                    let ok = t.minus_one_allowed(&from);
                    d.gw.handle_datagram(std::time::Instant::now(), from, &buf[..n], ok);
                }
                Err(e) => {
                    // UDP reports an ICMP error from an earlier send here; a serial port may
                    // fail for real. Either way: log, pause a little if it repeats, go on.
                    failures += 1;
                    tracing::debug!(transport = %t.name(), error = %e, "MQTT-SN receive failed");
                    if failures > 3 {
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    }
                }
            },
            _ = d.wake.notify.notified() => d.pulls.extend(d.wake.take()),
            _ = sleep_until_opt(deadline) => d.gw.handle_timeout(std::time::Instant::now()),
            _ = stop.changed() => break,
        }
        if d.settle(&mut t).await.is_err() {
            tracing::warn!("hub gone; MQTT-SN gateway stops");
            return;
        }
    }
    d.gw.shutdown();
    let _ = d.settle(&mut t).await;
}

/// The hub's channel closed.
struct HubGone;

impl<A: Clone + Eq + Hash + Debug + Send> Driver<A> {
    /// Carries out every output, pulling links as the machine asks, until nothing is left.
    async fn settle<T: Transport<Addr = A>>(&mut self, t: &mut T) -> Result<(), HubGone> {
        loop {
            let mut busy = false;
            while let Some(o) = self.gw.poll_output() {
                busy = true;
                match o {
                    Output::Send { to, data } => {
                        if let Err(e) = t.send(&to, &data).await {
                            tracing::debug!(peer = ?to, error = %e, "MQTT-SN send failed");
                        }
                    }
                    Output::Broadcast(data) => {
                        if let Err(e) = t.broadcast(&data).await {
                            tracing::warn!(error = %e, "ADVERTISE failed");
                        }
                    }
                    Output::Attach(conn) => {
                        let (tx, rx) = mpsc::channel(SN_LINK_QUEUE);
                        let state = Arc::new(LinkState::default());
                        let link = Link {
                            tx,
                            state: state.clone(),
                            wake: Some(self.wake.clone()),
                        };
                        self.links.insert(conn, SnLink { rx, state });
                        self.hub
                            .send(HubMsg::Attach { conn, link })
                            .await
                            .map_err(|_| HubGone)?;
                    }
                    Output::Hub(input) => {
                        self.hub
                            .send(HubMsg::Input(input))
                            .await
                            .map_err(|_| HubGone)?;
                    }
                    Output::Detach(conn) => {
                        self.links.remove(&conn);
                        self.pulls.remove(&conn);
                    }
                    Output::Pull(conn) => {
                        self.pulls.insert(conn);
                    }
                }
            }
            for conn in std::mem::take(&mut self.pulls) {
                busy |= self.pull(conn).await?;
            }
            if !busy {
                return Ok(());
            }
        }
    }

    /// Hands the machine what `conn`'s link holds, while it wants more. Returns whether it
    /// did anything.
    async fn pull(&mut self, conn: ConnId) -> Result<bool, HubGone> {
        let Some(l) = self.links.get_mut(&conn) else {
            return Ok(false);
        };
        let mut did = false;
        let mut closed = false;
        while self.gw.wants(conn) {
            match l.rx.try_recv() {
                Ok(LinkItem::Packet(p)) => {
                    did = true;
                    self.gw.handle_hub(std::time::Instant::now(), conn, p);
                }
                Ok(LinkItem::Configure { .. }) => {}
                Ok(LinkItem::Close) => closed = true,
                Err(_) => break,
            }
        }
        if closed || l.state.closing.load(Ordering::SeqCst) {
            self.gw.hub_closed(conn);
            return Ok(true);
        }
        // The hub waits for room: there is some now.
        if l.rx.len() < SN_LINK_QUEUE && l.state.want_ready.swap(false, Ordering::SeqCst) {
            self.hub
                .send(HubMsg::Input(HubInput::Ready { conn }))
                .await
                .map_err(|_| HubGone)?;
            did = true;
        }
        Ok(did)
    }
}
