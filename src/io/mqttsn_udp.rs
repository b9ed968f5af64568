//! The MQTT-SN gateway over UDP: one socket per `mqtt-sn` listener, driven by `io::mqttsn`.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::UdpSocket;

use super::mqttsn::Transport;
use crate::config::MqttSn;

/// The receive buffer asked of the kernel.
const RECV_BUFFER: usize = 4 << 20;

/// A bound UDP socket, with the ADVERTISE address and the QoS -1 allow list.
pub struct Udp {
    socket: UdpSocket,
    advertise: Option<SocketAddr>,
    cfg: Arc<MqttSn>,
}

impl Udp {
    /// Binds `addr`. Broadcast is enabled when ADVERTISE is configured.
    pub async fn bind(addr: SocketAddr, cfg: Arc<MqttSn>) -> std::io::Result<Udp> {
        let s = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        // Many sensors waking at once arrive as one burst; the default buffer (about 200 KiB)
        // drops datagrams that this one absorbs. The kernel caps it at net.core.rmem_max.
        let _ = s.set_recv_buffer_size(RECV_BUFFER);
        s.set_nonblocking(true)?;
        s.bind(&addr.into())?;
        let socket = UdpSocket::from_std(s.into())?;
        let advertise = cfg.advertise.as_ref().map(|a| a.address);
        if advertise.is_some() {
            socket.set_broadcast(true)?;
        }
        Ok(Udp {
            socket,
            advertise,
            cfg,
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.socket.local_addr()
    }
}

impl Transport for Udp {
    type Addr = SocketAddr;

    async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<(SocketAddr, usize)> {
        let (n, from) = self.socket.recv_from(buf).await?;
        Ok((from, n))
    }

    async fn send(&mut self, to: &SocketAddr, data: &[u8]) -> std::io::Result<()> {
        self.socket.send_to(data, to).await.map(|_| ())
    }

    async fn broadcast(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self.advertise {
            Some(a) => self.socket.send_to(data, a).await.map(|_| ()),
            None => Ok(()),
        }
    }

    fn minus_one_allowed(&self, from: &SocketAddr) -> bool {
        self.cfg.minus_one_allowed(from.ip())
    }

    fn name(&self) -> String {
        match self.socket.local_addr() {
            Ok(a) => format!("udp {a}"),
            Err(_) => "udp".into(),
        }
    }
}
