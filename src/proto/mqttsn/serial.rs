//! The serial framing for MQTT-SN, sans-IO: SLIP (RFC 1055) frames, each carrying one MQTT-SN
//! message and, by default, a CRC-16 after it.
//!
//! On the wire: `END`, then the message and its CRC with every `END` byte written as
//! `ESC ESC_END` and every `ESC` byte as `ESC ESC_ESC`, then `END`. `END` = 0xC0, `ESC` = 0xDB,
//! `ESC_END` = 0xDC, `ESC_ESC` = 0xDD. The CRC is CRC-16/CCITT-FALSE (polynomial 0x1021,
//! initial value 0xFFFF, no reflection, no final XOR) of the message bytes, sent high byte
//! first, before escaping. A microcontroller needs about thirty lines of C to speak it.
//!
//! A line with noise on it loses frames, never the stream: a bad escape, a wrong CRC or a frame
//! longer than any MQTT-SN message is dropped whole and counted, and the next `END` starts over.

use thiserror::Error;

pub const END: u8 = 0xC0;
pub const ESC: u8 = 0xDB;
pub const ESC_END: u8 = 0xDC;
pub const ESC_ESC: u8 = 0xDD;

/// The largest frame body: an MQTT-SN message with a 3-byte length, and the CRC.
const MAX_FRAME: usize = 65_535 + 2;

/// Why a frame was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("ESC followed by 0x{0:02x}, not ESC_END or ESC_ESC")]
    BadEscape(u8),
    #[error("frame longer than {MAX_FRAME} bytes")]
    TooLong,
    #[error("CRC mismatch: frame says 0x{said:04x}, content gives 0x{got:04x}")]
    Crc { said: u16, got: u16 },
    #[error("frame too short to hold a CRC")]
    Short,
}

/// CRC-16/CCITT-FALSE.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0xFFFF;
    for &b in data {
        crc ^= (b as u16) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Writes one frame carrying `msg` to `out`.
pub fn encode_frame(msg: &[u8], crc: bool, out: &mut Vec<u8>) {
    fn put(b: u8, out: &mut Vec<u8>) {
        match b {
            END => out.extend_from_slice(&[ESC, ESC_END]),
            ESC => out.extend_from_slice(&[ESC, ESC_ESC]),
            b => out.push(b),
        }
    }
    // A leading END flushes whatever noise the receiver has collected since the last frame.
    out.push(END);
    for &b in msg {
        put(b, out);
    }
    if crc {
        for b in crc16(msg).to_be_bytes() {
            put(b, out);
        }
    }
    out.push(END);
}

/// Collects frames from a byte stream.
#[derive(Debug)]
pub struct Deframer {
    crc: bool,
    buf: Vec<u8>,
    escaped: bool,
    /// The current frame is already bad: skip to the next END.
    skipping: Option<FrameError>,
}

impl Deframer {
    pub fn new(crc: bool) -> Self {
        Deframer {
            crc,
            buf: Vec::new(),
            escaped: false,
            skipping: None,
        }
    }

    /// Feeds `bytes`; calls `frame` with each complete frame body (CRC checked and removed),
    /// or the reason it was dropped. Empty frames (two ENDs in a row) are not reported.
    pub fn feed(&mut self, bytes: &[u8], mut frame: impl FnMut(Result<&[u8], FrameError>)) {
        for &b in bytes {
            if b == END {
                let bad = self.skipping.take();
                let escaped = std::mem::replace(&mut self.escaped, false);
                if let Some(e) = bad {
                    frame(Err(e));
                } else if escaped {
                    frame(Err(FrameError::BadEscape(END)));
                } else if !self.buf.is_empty() {
                    frame(self.check());
                }
                self.buf.clear();
                continue;
            }
            if self.skipping.is_some() {
                continue;
            }
            let byte = if self.escaped {
                self.escaped = false;
                match b {
                    ESC_END => END,
                    ESC_ESC => ESC,
                    other => {
                        self.skipping = Some(FrameError::BadEscape(other));
                        self.buf.clear();
                        continue;
                    }
                }
            } else if b == ESC {
                self.escaped = true;
                continue;
            } else {
                b
            };
            if self.buf.len() >= MAX_FRAME {
                self.skipping = Some(FrameError::TooLong);
                self.buf.clear();
                continue;
            }
            self.buf.push(byte);
        }
    }

    fn check(&self) -> Result<&[u8], FrameError> {
        if !self.crc {
            return Ok(&self.buf);
        }
        let Some(split) = self.buf.len().checked_sub(2) else {
            return Err(FrameError::Short);
        };
        let (body, tail) = self.buf.split_at(split);
        let said = u16::from_be_bytes([tail[0], tail[1]]);
        let got = crc16(body);
        if said != got {
            return Err(FrameError::Crc { said, got });
        }
        Ok(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(d: &mut Deframer, bytes: &[u8]) -> Vec<Result<Vec<u8>, FrameError>> {
        let mut got = Vec::new();
        d.feed(bytes, |f| got.push(f.map(<[u8]>::to_vec)));
        got
    }

    #[test]
    fn crc_check_value() {
        // The catalogued check value of CRC-16/CCITT-FALSE.
        assert_eq!(crc16(b"123456789"), 0x29B1);
    }

    #[test]
    fn escapes_on_the_wire() {
        let mut out = Vec::new();
        encode_frame(&[0x01, END, 0x02, ESC, 0x03], false, &mut out);
        assert_eq!(
            out,
            vec![END, 0x01, ESC, ESC_END, 0x02, ESC, ESC_ESC, 0x03, END]
        );
    }

    #[test]
    fn noise_costs_one_frame_only() {
        let mut d = Deframer::new(true);
        let mut wire = vec![0x55, 0xAA, 0x13]; // garbage before the first END
        encode_frame(b"\x02\x16", true, &mut wire);
        let mut bad = Vec::new();
        encode_frame(b"\x03\x18\x00", true, &mut bad);
        bad[2] ^= 0x40; // a flipped bit
        wire.extend_from_slice(&bad);
        wire.extend_from_slice(&[END, ESC, 0x01, 0x02, END]); // a bad escape
        encode_frame(b"\x02\x17", true, &mut wire);
        let got = frames(&mut d, &wire);
        assert!(matches!(got[0], Err(FrameError::Crc { .. })), "{got:?}");
        assert_eq!(got[1], Ok(b"\x02\x16".to_vec()));
        assert!(matches!(got[2], Err(FrameError::Crc { .. })));
        assert_eq!(got[3], Err(FrameError::BadEscape(0x01)));
        assert_eq!(got[4], Ok(b"\x02\x17".to_vec()));
        assert_eq!(got.len(), 5);
    }

    #[test]
    fn overlong_frame_is_dropped() {
        let mut d = Deframer::new(false);
        let mut wire = vec![END];
        wire.extend(std::iter::repeat(0x11).take(MAX_FRAME + 10));
        wire.push(END);
        encode_frame(b"\x02\x17", false, &mut wire);
        let got = frames(&mut d, &wire);
        assert_eq!(
            got,
            vec![Err(FrameError::TooLong), Ok(b"\x02\x17".to_vec())]
        );
    }

    proptest! {
        #[test]
        fn round_trip_in_any_chunks(
            msgs in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 1..10),
            crc in any::<bool>(),
            chunk in 1usize..50,
        ) {
            let mut wire = Vec::new();
            for m in &msgs {
                encode_frame(m, crc, &mut wire);
            }
            let mut d = Deframer::new(crc);
            let mut got = Vec::new();
            for c in wire.chunks(chunk) {
                got.extend(frames(&mut d, c));
            }
            let want: Vec<_> = msgs.into_iter().map(Ok).collect();
            prop_assert_eq!(got, want);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let mut d = Deframer::new(true);
            d.feed(&bytes, |_| {});
        }
    }
}
