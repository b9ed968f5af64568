//! The MQTT listeners (`mqtt`, `mqtts`, `ws`, `wss`): an accept loop with a connection limit,
//! and one task per connection that does the TLS and WebSocket handshakes its listener asks
//! for, then drives `proto::mqtt::server::{Inbound, Outbound}` over the stream's two halves.
//! Logins (passwords, client certificates) and `mount_point` are handled here, so the hub sees
//! only authenticated clients and whole topics.
//!
//! Reading and writing run concurrently so that a client which stops reading cannot stop us
//! from reading its packets, and the reverse. Each half waits on a bounded channel: the reader
//! on the hub (a busy hub slows the client), the writer on its link.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch, Semaphore};
use tokio::time::Instant;

use super::hub_task::{HubMsg, Link, LinkItem, LinkState, LINK_QUEUE};
use super::sleep_until_opt;
use crate::auth::{self, Passwords, Throttle};
use crate::hub::{ConnId, HubInput};
use crate::proto::mqtt::mount::MountPoint;
use crate::proto::mqtt::server::{CloseReason, InEvent, Inbound, Outbound, ServerLimits};
use crate::proto::mqtt::{ConnAck, Packet, Version};

/// How long a closed connection keeps draining input before the socket is dropped.
const LINGER: Duration = Duration::from_secs(1);
/// How much input a closed connection drains at most.
const LINGER_BYTES: usize = 1 << 20;
/// A connection's read buffer starts at READ_MIN and doubles on each read that fills it, up to
/// READ_MAX; the write buffer keeps at most WRITE_KEEP of capacity between batches.
const READ_MIN: usize = 1024;
const READ_MAX: usize = 16 * 1024;
const WRITE_KEEP: usize = 16 * 1024;

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

/// What one listener adds to a plain MQTT socket.
pub struct Front {
    pub allow_anonymous: bool,
    /// `mqtts`/`wss`: the TLS settings, which a reload may swap.
    pub tls: Option<Arc<super::tls::ServerSlot>>,
    /// `ws`/`wss`.
    pub websocket: bool,
    /// The client certificate's Common Name is the login.
    pub identity_as_username: bool,
    pub mount: Option<MountPoint>,
}

/// Accepts connections until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<ListenerShared>,
    front: Arc<Front>,
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
        let front = front.clone();
        tokio::spawn(async move {
            open(stream, peer, conn, &shared, &front).await;
            drop(permit);
        });
    }
}

/// Does the handshakes the listener asks for, each within the CONNECT timeout, then runs the
/// connection. A failed handshake closes the socket; nothing reached the hub.
async fn open(
    tcp: TcpStream,
    peer: SocketAddr,
    conn: ConnId,
    shared: &ListenerShared,
    front: &Front,
) {
    let limit = shared.limits.connect_timeout;
    // MQTT packets may share a WebSocket message, so allow a few beside the largest one.
    let max_message = shared.limits.max_packet_size as usize + 64 * 1024;
    let Some(slot) = &front.tls else {
        if !front.websocket {
            return connection(tcp, peer, conn, shared, front, None).await;
        }
        let ws = handshake(
            peer,
            "WebSocket",
            limit,
            super::ws::accept(tcp, max_message),
        );
        if let Some(ws) = ws.await {
            connection(ws, peer, conn, shared, front, None).await;
        }
        return;
    };
    let accept = async { slot.accept(tcp).await.map_err(|e| e.to_string()) };
    let Some(tls) = handshake(peer, "TLS", limit, accept).await else {
        return;
    };
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|cert| auth::cert::common_name(cert));
    if !front.websocket {
        return connection(tls, peer, conn, shared, front, identity).await;
    }
    if let Some(ws) = handshake(
        peer,
        "WebSocket",
        limit,
        super::ws::accept(tls, max_message),
    )
    .await
    {
        connection(ws, peer, conn, shared, front, identity).await;
    }
}

/// One handshake, bounded in time; a failure is logged with the peer.
async fn handshake<T>(
    peer: SocketAddr,
    what: &str,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, String>>,
) -> Option<T> {
    match tokio::time::timeout(limit, f).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(error)) => {
            // A client certificate that is X.509 v1 gets plain words, not rustls's enum.
            let error = super::tls::explain(&error);
            tracing::info!(%peer, %error, "{what} handshake failed");
            None
        }
        Err(_) => {
            tracing::info!(%peer, "{what} handshake timed out");
            None
        }
    }
}

async fn connection<S>(
    stream: S,
    peer: SocketAddr,
    conn: ConnId,
    shared: &ListenerShared,
    front: &Front,
    identity: Option<String>,
) where
    S: AsyncRead + AsyncWrite + Send,
{
    let (rd, wr) = tokio::io::split(stream);
    tokio::pin!(rd);
    let (tx, rx) = mpsc::channel(LINK_QUEUE);
    let state = Arc::new(LinkState::default());
    let link = Link {
        tx,
        state: state.clone(),
        wake: None,
    };
    let attached = std::sync::atomic::AtomicBool::new(false);
    let client = std::sync::Mutex::new(None::<String>);
    let mut reader = Box::pin(read_loop(
        rd.as_mut(),
        peer,
        conn,
        shared,
        front,
        identity,
        link,
        &attached,
        &client,
    ));
    let writer = write_loop(wr, rx, state, conn, shared, front.mount.as_ref());
    tokio::pin!(writer);
    let closed = tokio::select! {
        r = &mut reader => Some(r),
        _ = &mut writer => None,
    };
    let id = client.lock().ok().and_then(|mut c| c.take());
    if let Some(id) = id {
        match &closed {
            Some((reason, _)) => tracing::info!(%peer, client = %id, "client {id:?} {reason}"),
            None => tracing::info!(%peer, client = %id, "client {id:?} closed by outpost"),
        }
    }
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
    linger(rd.as_mut()).await;
}

/// Encodes one link item. Returns false once nothing more may be written: after a DISCONNECT
/// ([MQTT-3.14.4-1]: it is the last packet on the connection) or at `Close`.
fn feed(
    item: LinkItem,
    machine: &mut Outbound,
    out: &mut Vec<u8>,
    mount: Option<&MountPoint>,
) -> bool {
    match item {
        LinkItem::Packet(mut p) => {
            if let Some(m) = mount {
                m.outbound(&mut p);
            }
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
async fn linger(mut rd: std::pin::Pin<&mut impl AsyncRead>) {
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

#[allow(clippy::too_many_arguments)]
async fn read_loop(
    mut rd: std::pin::Pin<&mut impl AsyncRead>,
    peer: SocketAddr,
    conn: ConnId,
    shared: &ListenerShared,
    front: &Front,
    identity: Option<String>,
    link: Link,
    attached: &std::sync::atomic::AtomicBool,
    client: &std::sync::Mutex<Option<String>>,
) -> (CloseReason, Option<Packet>) {
    let mut machine = Inbound::new(Instant::now().into_std(), shared.limits.clone());
    // Small while the client is quiet, which most are (an idle connection should cost little:
    // the idle-connection benchmark row); a read that fills it doubles it, up to READ_MAX.
    let mut buf = vec![0u8; READ_MIN];
    loop {
        let deadline = machine.poll_timeout().map(Instant::from_std);
        tokio::select! {
            r = rd.read(&mut buf) => match r {
                Ok(0) | Err(_) => machine.handle_eof(),
                Ok(n) => {
                    shared.board.add_received(n);
                    machine.handle_bytes(Instant::now().into_std(), &buf[..n]);
                    if n == buf.len() && buf.len() < READ_MAX {
                        buf.resize(buf.len() * 2, 0);
                    }
                }
            },
            _ = sleep_until_opt(deadline) => machine.handle_timeout(Instant::now().into_std()),
        }
        while let Some(ev) = machine.poll_event() {
            match ev {
                InEvent::Connect {
                    mut connect,
                    keep_alive,
                } => {
                    let verdict = if front.identity_as_username {
                        identity_login(identity.as_deref(), peer, &mut connect)
                    } else {
                        login(shared, front.allow_anonymous, peer, &connect).await
                    };
                    if let Some(m) = &front.mount {
                        m.connect(&mut connect);
                    }
                    if let Err(code) = verdict {
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
                    // One human line, as mosquitto's connection_messages: who, from where, how.
                    let user = connect.username.as_deref().unwrap_or("");
                    tracing::info!(
                        %peer,
                        client = %connect.client_id,
                        level = connect.version.level(),
                        user,
                        clean = connect.clean_start,
                        keep_alive,
                        "new client connected from {peer} as {:?} (MQTT {}, {}, keep-alive {keep_alive}s{})",
                        connect.client_id,
                        match connect.version.level() { 3 => "3.1", 4 => "3.1.1", _ => "5.0" },
                        if connect.clean_start { "clean" } else { "persistent" },
                        if user.is_empty() { String::new() } else { format!(", user {user:?}") },
                    );
                    if let Ok(mut c) = client.lock() {
                        *c = Some(connect.client_id.clone());
                    }
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
                InEvent::Packet(mut packet) => {
                    if let Some(m) = &front.mount {
                        m.inbound(&mut packet);
                    }
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

/// `use_identity_as_username`: the verified client certificate's Common Name replaces
/// whatever user name the CONNECT carried, and no password is checked, as in mosquitto.
fn identity_login(
    identity: Option<&str>,
    peer: SocketAddr,
    connect: &mut crate::proto::mqtt::Connect,
) -> Result<(), u8> {
    let Some(cn) = identity else {
        tracing::warn!(%peer, client = %connect.client_id, "login refused: the client certificate has no Common Name");
        return Err(auth::Refusal::NotAuthorized.code(connect.version.is_v5()));
    };
    connect.username = Some(cn.to_owned());
    connect.password = None;
    Ok(())
}

/// Checks a CONNECT's credentials, after any wait its source owes for earlier failures;
/// returns the CONNACK code of a refusal. The hash is computed on a blocking thread: PBKDF2
/// at a high iteration count would otherwise hold a runtime worker.
async fn login(
    shared: &ListenerShared,
    allow_anonymous: bool,
    peer: SocketAddr,
    connect: &crate::proto::mqtt::Connect,
) -> Result<(), u8> {
    let ip = peer.ip();
    let now = Instant::now().into_std();
    let booked = match shared.throttle.lock() {
        Ok(mut t) => t.reserve(ip, now),
        Err(_) => Ok(None),
    };
    let wait = match booked {
        Ok(wait) => wait,
        Err(r) => {
            tracing::debug!(%peer, client = %connect.client_id, "login refused unchecked: too many attempts from this address are waiting");
            return Err(r.code(connect.version.is_v5()));
        }
    };
    if let Some(t) = wait {
        tokio::time::sleep_until(Instant::from_std(t)).await;
    }
    let passwords = shared.passwords.read().ok().and_then(|p| p.clone());
    let username = connect.username.clone();
    let password = connect.password.clone();
    let check = move || {
        auth::decide(
            passwords.as_deref(),
            allow_anonymous,
            username.as_deref(),
            password.as_deref(),
        )
    };
    let verdict = match tokio::task::spawn_blocking(check).await {
        Ok(v) => v,
        Err(_) => Err(auth::Refusal::NotAuthorized),
    };
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
    wr: impl AsyncWrite,
    mut rx: mpsc::Receiver<LinkItem>,
    state: Arc<LinkState>,
    conn: ConnId,
    shared: &ListenerShared,
    mount: Option<&MountPoint>,
) {
    let (hub, board) = (&shared.hub, &shared.board);
    let mut wr = std::pin::pin!(wr);
    // Until CONNECT arrives only a refusal can be written, and that uses 3.1.1 framing.
    let mut machine = Outbound::new(Version::V311, 0);
    // Grows with what is batched; a burst's large buffer is given back once written.
    let mut out = Vec::new();
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
            if !feed(item, &mut machine, &mut out, mount) {
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
                if !feed(it, &mut machine, &mut out, mount) {
                    break;
                }
            }
            open = false;
        }
        if !out.is_empty() {
            // TLS and WebSocket streams hold writes until flushed; TCP's flush is free.
            if wr.write_all(&out).await.is_err() || wr.flush().await.is_err() {
                break;
            }
            board.add_sent(out.len());
            out.clear();
            if out.capacity() > WRITE_KEEP {
                out.shrink_to(WRITE_KEEP);
            }
        }
        if state.want_ready.swap(false, Ordering::SeqCst) {
            let _ = hub.send(HubMsg::Input(HubInput::Ready { conn })).await;
        }
    }
    let _ = wr.shutdown().await;
}
