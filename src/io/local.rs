//! The runtime side of `hub::local`: one in-process client's bounded link to the hub, for the
//! serial port and GPIO tasks.
//!
//! Buffers: the link from the hub holds `LOCAL_LINK_QUEUE` packets; when it is full the hub
//! keeps the rest in the session (bounded, as for any client) and waits for `Ready`. Inputs
//! to the hub wait for room in its channel, which is what slows a producer when the hub is
//! busy.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;

use super::hub_task::{HubMsg, Link, LinkItem, LinkState};
use super::sleep_until_opt;
use crate::hub::local::{Event, LocalClient};
use crate::hub::{ConnId, HubInput};
use crate::proto::mqtt::server::CloseReason;
use crate::proto::mqtt::QoS;

/// Packets waiting in an in-process client's link.
pub const LOCAL_LINK_QUEUE: usize = 64;

#[derive(Debug, Error)]
pub enum LocalError {
    #[error("the hub has stopped")]
    HubGone,
    #[error("the hub closed the session")]
    Closed,
    #[error("the hub refused the session (reason 0x{0:02x})")]
    Refused(u8),
}

/// An in-process client attached to the hub.
pub struct HubLink {
    pub client: LocalClient,
    conn: ConnId,
    rx: mpsc::Receiver<LinkItem>,
    state: Arc<LinkState>,
    hub: mpsc::Sender<HubMsg>,
}

impl HubLink {
    /// Attaches `$outpost/<name>` on `conn`, subscribed to `subs`, and waits until it is up.
    pub async fn attach(
        hub: mpsc::Sender<HubMsg>,
        conn: ConnId,
        name: &str,
        subs: Vec<(String, QoS)>,
        window: usize,
    ) -> Result<HubLink, LocalError> {
        let client = LocalClient::new(conn, name, subs, window, LOCAL_LINK_QUEUE as u16);
        Self::attach_client(hub, client).await
    }

    /// Attaches `client` and waits until it is up.
    pub async fn attach_client(
        hub: mpsc::Sender<HubMsg>,
        client: LocalClient,
    ) -> Result<HubLink, LocalError> {
        let conn = client.conn();
        let (tx, rx) = mpsc::channel(LOCAL_LINK_QUEUE);
        let state = Arc::new(LinkState::default());
        let link = Link {
            tx,
            state: state.clone(),
            wake: None,
        };
        hub.send(HubMsg::Attach { conn, link })
            .await
            .map_err(|_| LocalError::HubGone)?;
        let mut l = HubLink {
            client,
            conn,
            rx,
            state,
            hub,
        };
        loop {
            l.flush().await?;
            match l.next().await? {
                Event::Up => return Ok(l),
                Event::Failed(code) => return Err(LocalError::Refused(code)),
                _ => {}
            }
        }
    }

    /// Sends the hub whatever the client has for it.
    pub async fn flush(&mut self) -> Result<(), LocalError> {
        while let Some(i) = self.client.poll_input() {
            self.hub
                .send(HubMsg::Input(i))
                .await
                .map_err(|_| LocalError::HubGone)?;
        }
        Ok(())
    }

    /// The next event, sending the hub what the client owes it meanwhile. Cancel-safe.
    pub async fn next(&mut self) -> Result<Event, LocalError> {
        loop {
            if let Some(e) = self.client.poll_event() {
                return Ok(e);
            }
            let deadline = self
                .client
                .poll_timeout()
                .map(tokio::time::Instant::from_std);
            tokio::select! {
                item = self.rx.recv() => match item {
                    Some(LinkItem::Packet(p)) => {
                        self.client.handle(std::time::Instant::now(), p);
                        if self.state.want_ready.swap(false, Ordering::SeqCst) {
                            self.client.ready();
                        }
                    }
                    Some(LinkItem::Configure { .. }) => {}
                    Some(LinkItem::Close) | None => return Err(LocalError::Closed),
                },
                // Answers the hub owes (SUBSCRIBE after CONNACK, PUBREL after PUBREC) go
                // out from here too. Cancel-safe: an input is taken only with its permit.
                permit = self.hub.reserve(), if self.client.has_input() => {
                    let permit = permit.map_err(|_| LocalError::HubGone)?;
                    if let Some(i) = self.client.poll_input() {
                        permit.send(HubMsg::Input(i));
                    }
                }
                _ = self.state.close.notified() => return Err(LocalError::Closed),
                _ = sleep_until_opt(deadline) => {
                    self.client.handle_timeout(std::time::Instant::now());
                }
            }
        }
    }

    /// Ends the session (clean: no will, nothing kept).
    pub async fn close(mut self) {
        let _ = self.flush().await;
        let _ = self
            .hub
            .send(HubMsg::Input(HubInput::Closed {
                conn: self.conn,
                reason: CloseReason::Disconnect {
                    with_will: false,
                    session_expiry: None,
                },
                notify: None,
            }))
            .await;
    }
}
