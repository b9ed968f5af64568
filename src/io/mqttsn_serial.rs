//! The MQTT-SN gateway over a serial port: SLIP frames (`proto::mqttsn::serial`) carrying one
//! MQTT-SN message each. The line is point-to-point, so there is one address; a radio modem
//! that relays for many sensor nodes uses ENCAPSULATED, and the gateway tells them apart by
//! their node ids.

use std::collections::VecDeque;
use std::path::PathBuf;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_serial::{SerialPortBuilderExt, SerialStream};

use super::mqttsn::Transport;
use crate::config::Listener;
use crate::proto::mqttsn::serial::{encode_frame, Deframer};

/// The one peer at the other end of the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Line;

/// An open serial port with its framing state.
pub struct Serial {
    port: SerialStream,
    device: PathBuf,
    crc: bool,
    minus_one: bool,
    deframer: Deframer,
    /// Frames read but not yet handed out. Bounded by what one read can hold.
    frames: VecDeque<Vec<u8>>,
    /// Frames dropped for noise (bad escape, CRC, length).
    pub dropped: u64,
    read_buf: Vec<u8>,
    write_buf: Vec<u8>,
}

impl Serial {
    /// Opens the listener's device at its baud rate (default 115200), 8N1, no flow control.
    pub fn open(l: &Listener) -> std::io::Result<Serial> {
        let device = l.device.clone().unwrap_or_default();
        let baud = l.baud.unwrap_or(115_200);
        let port = tokio_serial::new(device.to_string_lossy(), baud)
            .open_native_async()
            .map_err(std::io::Error::from)?;
        let crc = l.crc.unwrap_or(true);
        Ok(Serial {
            port,
            device,
            crc,
            minus_one: l.qos_minus_one.unwrap_or(false),
            deframer: Deframer::new(crc),
            frames: VecDeque::new(),
            dropped: 0,
            read_buf: vec![0u8; 4096],
            write_buf: Vec::new(),
        })
    }
}

impl Transport for Serial {
    type Addr = Line;

    async fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<(Line, usize)> {
        loop {
            if let Some(f) = self.frames.pop_front() {
                // Frames are at most 65,535 bytes, and so is the driver's buffer.
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                return Ok((Line, n));
            }
            // The only await: a read cancelled here loses nothing, the deframer keeps the rest.
            let n = self.port.read(&mut self.read_buf).await?;
            if n == 0 {
                return Err(std::io::ErrorKind::UnexpectedEof.into());
            }
            let (frames, dropped, device) = (&mut self.frames, &mut self.dropped, &self.device);
            self.deframer.feed(&self.read_buf[..n], |f| match f {
                Ok(body) => frames.push_back(body.to_vec()),
                Err(e) => {
                    *dropped += 1;
                    tracing::debug!(device = %device.display(), error = %e, "serial frame dropped");
                }
            });
        }
    }

    async fn send(&mut self, _to: &Line, data: &[u8]) -> std::io::Result<()> {
        self.write_buf.clear();
        encode_frame(data, self.crc, &mut self.write_buf);
        self.port.write_all(&self.write_buf).await
    }

    async fn broadcast(&mut self, data: &[u8]) -> std::io::Result<()> {
        // On a point-to-point line ADVERTISE simply goes down the line.
        self.send(&Line, data).await
    }

    fn minus_one_allowed(&self, _from: &Line) -> bool {
        self.minus_one
    }

    fn name(&self) -> String {
        format!("serial {}", self.device.display())
    }
}
