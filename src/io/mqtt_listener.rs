//! The MQTT TCP listener: an accept loop with a connection limit, and one task per connection
//! that drives `proto::mqtt::server::{Inbound, Outbound}` over the socket's two halves.
//!
//! Reading and writing run concurrently so that a client which stops reading cannot stop us
//! from reading its packets, and the reverse. Each half waits on a bounded channel: the reader
//! on the hub (a busy hub slows the client), the writer on its link.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use super::hub_task::{HubMsg, Link, LinkItem, LinkState, LINK_QUEUE};
use super::sleep_until_opt;
use crate::auth::{self, Passwords, Throttle};
use crate::hub::{ConnId, HubInput};
use crate::proto::mqtt::server::{CloseReason, InEvent, Inbound, Outbound, ServerLimits};
use crate::proto::mqtt::{ConnAck, Packet, Version};

/// How long a closed connection keeps draining input before the socket is dropped.
const LINGER: Duration = Duration::from_secs(1);
/// How much input a closed connection drains at most.
const LINGER_BYTES: usize = 1 << 20;

/// What every connection of every MQTT listener shares.
pub struct ListenerShared {
    pub hub: mpsc::Sender<HubMsg>,
    pub limits: ServerLimits,
    pub connections: Arc<Semaphore>,
    pub next_conn: AtomicU64,
    /// `[auth] password_file`, loaded; a reload swaps it.
    pub passwords: std::sync::RwLock<Option<Arc<Passwords>>>,
    /// Byte counters for `$SYS`.
    pub board: Arc<crate::status::Board>,
    /// Failed logins by source address.
    pub throttle: std::sync::Mutex<Throttle>,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<ListenerShared>,
    allow_anonymous: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut backoff = Duration::from_millis(5);
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.changed() => break,
        };
        let (stream, peer) = match accepted {
            Ok(a) => {
                backoff = Duration::from_millis(5);
                a
            }
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                continue;
            }
        };
        let Ok(permit) = shared.connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing new connection");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let conn = shared.next_conn.fetch_add(1, Ordering::Relaxed);
        let shared = shared.clone();
        tokio::spawn(async move {
            connection(stream, peer, conn, shared, allow_anonymous).await;
            drop(permit);
        });
    }
}

async fn connection(
    stream: TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    shared: Arc<ListenerShared>,
    allow_anonymous: bool,
) {
    let (mut rd, wr) = stream.into_split();
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    let state = Arc::new(LinkState::default());
    let link = Link {
        tx,
        state: state.clone(),
        wake: None,
    };
    let attached = std::sync::atomic::AtomicBool::new(false);
    let mut reader = Box::pin(read_loop(
        &mut rd,
        peer,
        conn,
        &shared,
        allow_anonymous,
        link,
        &attached,
    ));
    let writer = write_loop(wr, rx, state, conn, &shared.hub, &shared.board);
    tokio::pin!(writer);
    let closed = tokio::select! {
        r = &mut reader => Some(r),
        _ = &mut writer => None,
    };
    match closed {
        Some((reason, notify)) if attached.load(Ordering::Relaxed) => {
            // The hub closes the link after what it already queued, then our DISCONNECT.
            let input = HubInput::Closed {
                conn,
                reason,
                notify,
            };
            if shared.hub.send(HubMsg::Input(input)).await.is_ok() {
                let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
            }
        }
        Some(_) => {
            // Never attached: the reader queued its own last words; let them flush.
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
        }
        None if attached.load(Ordering::Relaxed) => {
            let input = HubInput::Closed {
                conn,
                reason: CloseReason::ServerClosed,
                notify: None,
            };
            let _ = shared.hub.send(HubMsg::Input(input)).await;
        }
        None => {}
    }
    drop(reader);
    linger(&mut rd).await;
}

/// Encodes one link item. Returns false once nothing more may be written: after a DISCONNECT
/// ([MQTT-3.14.4-1]: it is the last packet on the connection) or at `Close`.
fn feed(item: LinkItem, machine: &mut Outbound, out: &mut Vec<u8>) -> bool {
    match item {
        LinkItem::Packet(p) => {
            let last = matches!(p, Packet::Disconnect(_));
            machine.encode(p, out);
            !last
        }
        LinkItem::Configure { version, alias_max } => {
            *machine = Outbound::new(version, alias_max);
            true
        }
        LinkItem::Close => false,
    }
}

/// Our write side is shut down (FIN sent). Closing a socket that still has unread input makes
/// the kernel answer with RST, and an RST can destroy the DISCONNECT we just wrote before the
/// client reads it. So read and discard until the client closes too, bounded in time and bytes.
async fn linger(rd: &mut OwnedReadHalf) {
    let mut buf = [0u8; 4096];
    let mut left = LINGER_BYTES;
    let _ = tokio::time::timeout(LINGER, async {
        while left > 0 {
            match rd.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
}

async fn read_loop(
    rd: &mut OwnedReadHalf,
    peer: SocketAddr,
    conn: ConnId,
    shared: &ListenerShared,
    allow_anonymous: bool,
    link: Link,
    attached: &std::sync::atomic::AtomicBool,
) -> (CloseReason, Option<Packet>) {
    let mut machine = Inbound::new(Instant::now().into_std(), shared.limits.clone());
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let deadline = machine.poll_timeout().map(Instant::from_std);
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => machine.handle_eof(),
                Ok(n) => {
                    shared.board.add_received(n);
                    machine.handle_bytes(Instant::now().into_std(), &buf[..n])
                }
            },
            _ = sleep_until_opt(deadline) => machine.handle_timeout(Instant::now().into_std()),
        }
        while let Some(ev) = machine.poll_event() {
            match ev {
                InEvent::Connect {
                    connect,
                    keep_alive,
                } => {
                    if let Err(code) = login(shared, allow_anonymous, peer, &connect).await {
                        let _ = link.tx.try_send(LinkItem::Configure {
                            version: connect.version,
                            alias_max: 0,
                        });
                        let ack = ConnAck {
                            code,
                            ..ConnAck::default()
                        };
                        let _ = link.tx.try_send(LinkItem::Packet(Packet::ConnAck(ack)));
                        let _ = link.tx.try_send(LinkItem::Close);
                        return (CloseReason::ServerClosed, None);
                    }
                    let alias_max = connect.properties.topic_alias_maximum.unwrap_or(0);
                    let configure = LinkItem::Configure {
                        version: connect.version,
                        alias_max,
                    };
                    if link.tx.send(configure).await.is_err() {
                        return (CloseReason::ServerClosed, None);
                    }
                    let attach = HubMsg::Attach {
                        conn,
                        link: link.clone(),
                    };
                    if shared.hub.send(attach).await.is_err() {
                        return (CloseReason::ServerClosed, None);
                    }
                    attached.store(true, Ordering::Relaxed);
                    tracing::debug!(%peer, conn, client = %connect.client_id, "CONNECT");
                    let input = HubInput::Connect {
                        conn,
                        connect,
                        keep_alive,
                    };
                    if shared.hub.send(HubMsg::Input(input)).await.is_err() {
                        return (CloseReason::ServerClosed, None);
                    }
                }
                InEvent::Refuse { code, version } => {
                    let _ = link.tx.try_send(LinkItem::Configure {
                        version,
                        alias_max: 0,
                    });
                    let ack = ConnAck {
                        code,
                        ..ConnAck::default()
                    };
                    let _ = link.tx.try_send(LinkItem::Packet(Packet::ConnAck(ack)));
                }
                InEvent::Packet(packet) => {
                    let input = HubInput::Packet { conn, packet };
                    if shared.hub.send(HubMsg::Input(input)).await.is_err() {
                        return (CloseReason::ServerClosed, None);
                    }
                }
                InEvent::Reply(p) => {
                    if link.tx.send(LinkItem::Packet(p)).await.is_err() {
                        return (CloseReason::ServerClosed, None);
                    }
                }
                InEvent::Close { reason, disconnect } => {
                    match &reason {
                        CloseReason::Violation { detail, .. } => {
                            tracing::info!(%peer, conn, %detail, "protocol violation; closing")
                        }
                        CloseReason::KeepAliveTimeout | CloseReason::ConnectTimeout => {
                            tracing::info!(%peer, conn, ?reason, "closing idle connection")
                        }
                        _ => {}
                    }
                    if attached.load(Ordering::Relaxed) {
                        return (reason, disconnect);
                    }
                    if let Some(d) = disconnect {
                        let _ = link.tx.try_send(LinkItem::Packet(d));
                    }
                    let _ = link.tx.try_send(LinkItem::Close);
                    return (reason, None);
                }
            }
        }
    }
}

/// Checks a CONNECT's credentials, after any wait its source owes for earlier failures;
/// returns the CONNACK code of a refusal.
async fn login(
    shared: &ListenerShared,
    allow_anonymous: bool,
    peer: SocketAddr,
    connect: &crate::proto::mqtt::Connect,
) -> Result<(), u8> {
    let ip = peer.ip();
    let wait = shared.throttle.lock().ok().and_then(|t| t.wait_until(ip));
    if let Some(t) = wait {
        tokio::time::sleep_until(Instant::from_std(t)).await;
    }
    let passwords = shared.passwords.read().ok().and_then(|p| p.clone());
    let verdict = auth::decide(
        passwords.as_deref(),
        allow_anonymous,
        connect.username.as_deref(),
        connect.password.as_deref(),
    );
    let Ok(mut throttle) = shared.throttle.lock() else {
        return verdict.map_err(|r| r.code(connect.version.is_v5()));
    };
    match verdict {
        Ok(()) => {
            throttle.succeeded(ip);
            Ok(())
        }
        Err(r) => {
            let failures = throttle.failed(ip, Instant::now().into_std());
            drop(throttle);
            // The first few in full; then every tenth, so a brute force does not fill the
            // journal either.
            if failures <= 3 || failures % 10 == 0 {
                tracing::warn!(%peer, user = connect.username.as_deref().unwrap_or(""), client = %connect.client_id, failures, reason = ?r, "login refused");
            }
            Err(r.code(connect.version.is_v5()))
        }
    }
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    mut rx: mpsc::Receiver<LinkItem>,
    state: Arc<LinkState>,
    conn: ConnId,
    hub: &mpsc::Sender<HubMsg>,
    board: &crate::status::Board,
) {
    // Until CONNECT arrives only a refusal can be written, and that uses 3.1.1 framing.
    let mut machine = Outbound::new(Version::V311, 0);
    let mut out = Vec::with_capacity(16 * 1024);
    let mut open = true;
    while open {
        let mut closing = false;
        let first = tokio::select! {
            item = rx.recv() => item,
            _ = state.close.notified() => {
                closing = true;
                rx.try_recv().ok()
            }
        };
        let Some(mut item) = first else { break };
        // Batch whatever is already queued into one write.
        loop {
            if !feed(item, &mut machine, &mut out) {
                open = false;
                break;
            }
            if out.len() >= 64 * 1024 {
                break;
            }
            match rx.try_recv() {
                Ok(next) => item = next,
                Err(_) => break,
            }
        }
        if closing && open {
            // The hub asked us to close: write what it queued before that, then stop.
            while let Ok(it) = rx.try_recv() {
                if !feed(it, &mut machine, &mut out) {
                    break;
                }
            }
            open = false;
        }
        if !out.is_empty() {
            if wr.write_all(&out).await.is_err() {
                break;
            }
            board.add_sent(out.len());
            out.clear();
        }
        if state.want_ready.swap(false, Ordering::SeqCst) {
            let _ = hub.send(HubMsg::Input(HubInput::Ready { conn })).await;
        }
    }
    let _ = wr.shutdown().await;
}
