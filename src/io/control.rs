//! The control socket: a Unix stream socket in the runtime directory (never a network port)
//! that answers `status` with the report as one JSON line, for `outpost status`.
//!
//! One request per connection, a line of at most `MAX_REQUEST` bytes, answered within
//! `ANSWER_TIMEOUT`; at most `MAX_CLIENTS` at a time (more wait in the kernel's backlog).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use super::hub_task::{read_outbox, HubMsg, ReportTo};
use crate::store::Store;

const MAX_REQUEST: usize = 256;
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_CLIENTS: usize = 4;

/// Binds `path`, replacing a stale socket left by a crash (a live daemon still answering on
/// it is not displaced: binding fails instead).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    if std::os::unix::net::UnixStream::connect(path).is_ok() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::AddrInUse,
            "another outpost answers on this control socket",
        ));
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let l = UnixListener::bind(path)?;
    // The owner and its group (an admin group, under systemd) may ask; nobody else.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(l)
}

/// Serves until `stop`; removes the socket file on the way out.
pub async fn serve(
    listener: UnixListener,
    path: PathBuf,
    hub: mpsc::Sender<HubMsg>,
    store: Option<Arc<Store>>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CLIENTS));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.changed() => break,
        };
        let Ok((stream, _)) = accepted else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break;
        };
        let (hub, store) = (hub.clone(), store.clone());
        tokio::spawn(async move {
            let answered = tokio::time::timeout(ANSWER_TIMEOUT, answer(stream, hub, store));
            if let Err(e) = answered.await {
                tracing::debug!(error = %e, "control request timed out");
            }
            drop(permit);
        });
    }
    let _ = std::fs::remove_file(&path);
}

async fn answer(stream: UnixStream, hub: mpsc::Sender<HubMsg>, store: Option<Arc<Store>>) {
    let (rd, mut wr) = stream.into_split();
    let mut line = String::new();
    let mut rd = BufReader::new(rd.take(MAX_REQUEST as u64));
    if rd.read_line(&mut line).await.is_err() {
        return;
    }
    let reply = match line.trim() {
        "status" => {
            let (tx, rx) = oneshot::channel();
            let outbox = read_outbox(store).await;
            let to = ReportTo::Status(tx);
            if hub.send(HubMsg::Report { outbox, to }).await.is_err() {
                return;
            }
            match rx.await {
                Ok(r) => r.to_string(),
                Err(_) => return,
            }
        }
        other => format!(
            "{{\"error\":\"unknown request {:?}; try status\"}}",
            other.chars().take(40).collect::<String>()
        ),
    };
    let _ = wr.write_all(reply.as_bytes()).await;
    let _ = wr.write_all(b"\n").await;
    let _ = wr.shutdown().await;
}

/// The client side, for `outpost status`: the report, or why it could not be had.
pub fn request_status(path: &Path) -> std::io::Result<serde_json::Value> {
    use std::io::{BufRead, Write};
    let mut s = std::os::unix::net::UnixStream::connect(path)?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT + Duration::from_secs(1)))?;
    s.write_all(b"status\n")?;
    let mut line = String::new();
    std::io::BufReader::new(s).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}
