//! Sensor frames on a serial line, sans-IO: framing (bytes in, frames out, and back) and the
//! decoders that turn a frame into readings (`decode`).
//!
//! Framings, as a `[[serial]]` port's `framing` names them:
//! - `lines`: text ended by CR, LF or CRLF. Empty lines are skipped.
//! - `cobs`: Consistent Overhead Byte Stuffing, each frame ended by 0x00.
//! - `slip`: RFC 1055, each frame between END (0xC0) bytes (the MQTT-SN serial framing without
//!   its CRC).
//! - `len-crc16`: a 2-byte big-endian length N, N bytes, then the CRC-16/CCITT-FALSE of the
//!   length and body together, high byte first.
//!
//! A line with noise on it loses frames, never the stream. Garbage, an overlong frame or a bad
//! CRC is reported (the caller counts and logs it) and the deframer starts again at the next
//! delimiter. `len-crc16` has no delimiter, so after a bad frame it slides forward one byte at
//! a time until a length and a CRC agree again; one bad stretch is reported once. Memory is
//! bounded by the maximum frame length, whatever arrives.

pub mod decode;

use thiserror::Error;

use crate::proto::mqttsn::serial::{self as slip, crc16};

/// How frames are delimited on the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    Lines,
    Cobs,
    Slip,
    LenCrc16,
}

/// Why bytes were dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum FrameError {
    #[error("frame longer than {0} bytes")]
    Overlong(usize),
    #[error("CRC mismatch")]
    Crc,
    #[error("malformed frame: {0}")]
    Malformed(&'static str),
    #[error("{0} bytes of garbage before the next good frame")]
    Garbage(usize),
}

/// Counters a port keeps for `$SYS` and the logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FrameStats {
    pub frames: u64,
    pub dropped: u64,
}

/// Collects frames from a byte stream, whatever the reads' boundaries.
#[derive(Debug)]
pub struct Deframer {
    kind: Kind,
    max: usize,
    pub stats: FrameStats,
}

#[derive(Debug)]
enum Kind {
    Lines {
        buf: Vec<u8>,
        skipping: bool,
    },
    Cobs {
        buf: Vec<u8>,
        skipping: bool,
    },
    Slip(slip::Deframer, Vec<u8>),
    LenCrc {
        buf: Vec<u8>,
        start: usize,
        skipped: usize,
    },
}

impl Deframer {
    /// A deframer for frames of at most `max` bytes (the body, without delimiters or CRC).
    pub fn new(framing: Framing, max: usize) -> Self {
        let max = max.max(1);
        let kind = match framing {
            Framing::Lines => Kind::Lines {
                buf: Vec::new(),
                skipping: false,
            },
            Framing::Cobs => Kind::Cobs {
                buf: Vec::new(),
                skipping: false,
            },
            Framing::Slip => Kind::Slip(slip::Deframer::new(false), Vec::new()),
            Framing::LenCrc16 => Kind::LenCrc {
                buf: Vec::new(),
                start: 0,
                skipped: 0,
            },
        };
        Deframer {
            kind,
            max: max.min(u16::MAX as usize),
            stats: FrameStats::default(),
        }
    }

    /// Feeds `bytes`; calls `frame` with each complete non-empty frame, or with why something
    /// was dropped.
    pub fn feed(&mut self, bytes: &[u8], mut frame: impl FnMut(Result<&[u8], FrameError>)) {
        let max = self.max;
        let stats = &mut self.stats;
        let mut emit = |r: Result<&[u8], FrameError>| counted(stats, r, &mut frame);
        match &mut self.kind {
            Kind::Lines { buf, skipping } => {
                for &b in bytes {
                    if b == b'\n' || b == b'\r' {
                        if !std::mem::replace(skipping, false) {
                            emit(Ok(buf));
                        }
                        buf.clear();
                    } else if *skipping {
                    } else if buf.len() >= max {
                        emit(Err(FrameError::Overlong(max)));
                        *skipping = true;
                        buf.clear();
                    } else {
                        buf.push(b);
                    }
                }
            }
            Kind::Cobs { buf, skipping } => {
                // The stuffed form of `max` bytes is at most max + max/254 + 1 bytes.
                let limit = max + max / 254 + 1;
                for &b in bytes {
                    if b == 0 {
                        if !std::mem::replace(skipping, false) && !buf.is_empty() {
                            let mut out = Vec::with_capacity(buf.len());
                            match cobs_decode(buf, &mut out) {
                                Ok(()) if out.len() > max => emit(Err(FrameError::Overlong(max))),
                                Ok(()) => emit(Ok(&out)),
                                Err(e) => emit(Err(e)),
                            }
                        }
                        buf.clear();
                    } else if *skipping {
                    } else if buf.len() >= limit {
                        emit(Err(FrameError::Overlong(max)));
                        *skipping = true;
                        buf.clear();
                    } else {
                        buf.push(b);
                    }
                }
            }
            Kind::Slip(d, frames) => {
                // The SLIP deframer's own limit is an MQTT-SN message's; ours is tighter.
                let mut results: Vec<Result<Vec<u8>, FrameError>> = Vec::new();
                d.feed(bytes, |f| {
                    results.push(match f {
                        Ok(body) if body.len() > max => Err(FrameError::Overlong(max)),
                        Ok(body) => Ok(body.to_vec()),
                        Err(slip::FrameError::TooLong) => Err(FrameError::Overlong(max)),
                        Err(_) => Err(FrameError::Malformed("bad SLIP escape")),
                    })
                });
                for r in results {
                    match r {
                        Ok(body) => {
                            *frames = body;
                            emit(Ok(frames));
                        }
                        Err(e) => emit(Err(e)),
                    }
                }
            }
            Kind::LenCrc {
                buf,
                start,
                skipped,
            } => {
                buf.extend_from_slice(bytes);
                lencrc_scan(buf, start, skipped, max, false, &mut emit);
            }
        }
    }

    /// The line has gone quiet. A `len-crc16` frame still waiting for bytes is then taken to
    /// be garbage (its length was noise), and what follows it is scanned at once rather than
    /// after `max` more bytes. The other framings wait for their delimiter.
    pub fn idle(&mut self, mut frame: impl FnMut(Result<&[u8], FrameError>)) {
        let max = self.max;
        let stats = &mut self.stats;
        if let Kind::LenCrc {
            buf,
            start,
            skipped,
        } = &mut self.kind
        {
            let mut emit = |r: Result<&[u8], FrameError>| counted(stats, r, &mut frame);
            lencrc_scan(buf, start, skipped, max, true, &mut emit);
            if *skipped > 0 && buf.len() <= *start {
                emit(Err(FrameError::Garbage(std::mem::take(skipped))));
            }
        }
    }
}

/// Counts `r` and hands it on; empty frames are neither.
fn counted(
    stats: &mut FrameStats,
    r: Result<&[u8], FrameError>,
    frame: &mut impl FnMut(Result<&[u8], FrameError>),
) {
    match r {
        Ok([]) => return,
        Ok(_) => stats.frames += 1,
        Err(_) => stats.dropped += 1,
    }
    frame(r)
}

/// Finds `len-crc16` frames in `buf[start..]`. With `flush`, a frame that would need more
/// bytes than are there is treated as bad.
fn lencrc_scan(
    buf: &mut Vec<u8>,
    start: &mut usize,
    skipped: &mut usize,
    max: usize,
    flush: bool,
    emit: &mut impl FnMut(Result<&[u8], FrameError>),
) {
    loop {
        let avail = &buf[*start..];
        if avail.len() < 2 {
            break;
        }
        let len = u16::from_be_bytes([avail[0], avail[1]]) as usize;
        let good = if len > max {
            false
        } else if avail.len() < len + 4 {
            if !flush {
                break;
            }
            false
        } else {
            let said = u16::from_be_bytes([avail[len + 2], avail[len + 3]]);
            crc16(&avail[..len + 2]) == said
        };
        if good {
            if *skipped > 0 {
                emit(Err(FrameError::Garbage(std::mem::take(skipped))));
            }
            emit(Ok(&avail[2..len + 2]));
            *start += len + 4;
        } else {
            // Slide one byte: a frame may start inside what looked like one.
            *skipped += 1;
            *start += 1;
        }
    }
    // Compact once the consumed prefix is worth moving.
    if *start > 0 && (*start >= buf.len() || *start > 4096) {
        buf.drain(..*start);
        *start = 0;
    }
}

/// Writes `payload` as one frame. `lines` appends `line_ending`; a payload that itself holds
/// a line ending would become two lines, which the caller decides about. A payload its framing
/// cannot carry (`len-crc16` over 65,535 bytes) is refused, never cut short under a valid CRC.
pub fn encode(
    framing: Framing,
    payload: &[u8],
    line_ending: &[u8],
    out: &mut Vec<u8>,
) -> Result<(), FrameError> {
    match framing {
        Framing::Lines => {
            out.extend_from_slice(payload);
            out.extend_from_slice(line_ending);
        }
        Framing::Cobs => {
            cobs_encode(payload, out);
            out.push(0);
        }
        Framing::Slip => slip::encode_frame(payload, false, out),
        Framing::LenCrc16 => {
            let len = u16::try_from(payload.len())
                .map_err(|_| FrameError::Overlong(u16::MAX as usize))?;
            let start = out.len();
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(payload);
            let crc = crc16(&out[start..]);
            out.extend_from_slice(&crc.to_be_bytes());
        }
    }
    Ok(())
}

fn cobs_encode(data: &[u8], out: &mut Vec<u8>) {
    let mut code_at = out.len();
    out.push(0);
    let mut code = 1u8;
    for &b in data {
        if b == 0 {
            out[code_at] = code;
            code_at = out.len();
            out.push(0);
            code = 1;
        } else {
            out.push(b);
            code += 1;
            if code == 0xFF {
                out[code_at] = code;
                code_at = out.len();
                out.push(0);
                code = 1;
            }
        }
    }
    out[code_at] = code;
}

fn cobs_decode(stuffed: &[u8], out: &mut Vec<u8>) -> Result<(), FrameError> {
    let mut i = 0;
    while i < stuffed.len() {
        let code = stuffed[i] as usize;
        // Zero cannot occur: the deframer splits on it.
        let end = i + code;
        if end > stuffed.len() {
            return Err(FrameError::Malformed("COBS code runs past the frame"));
        }
        out.extend_from_slice(&stuffed[i + 1..end]);
        i = end;
        if code < 0xFF && i < stuffed.len() {
            out.push(0);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    type Got = Vec<Result<Vec<u8>, FrameError>>;

    fn feed(d: &mut Deframer, bytes: &[u8]) -> Got {
        let mut got = Vec::new();
        d.feed(bytes, |f| got.push(f.map(<[u8]>::to_vec)));
        got
    }

    fn ok(s: &[u8]) -> Result<Vec<u8>, FrameError> {
        Ok(s.to_vec())
    }

    fn wire(f: Framing, frames: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for p in frames {
            encode(f, p, b"\r\n", &mut out).unwrap();
        }
        out
    }

    /// Each case: framing, max length, the bytes on the line, what comes out.
    #[test]
    fn table() {
        let enc = |f, p: &[u8]| wire(f, &[p]);
        let mut lencrc_bad = enc(Framing::LenCrc16, b"T=1");
        lencrc_bad[3] ^= 0x01;
        let mut cobs_bad = enc(Framing::Cobs, b"\x11\x00\x22");
        cobs_bad[0] = 9;
        let cases: Vec<(&str, Framing, usize, Vec<u8>, Got)> = vec![
            (
                "lines: LF, CR, CRLF, empty lines skipped",
                Framing::Lines,
                64,
                b"a=1\nb=2\rc=3\r\n\n\r\nd".to_vec(),
                vec![ok(b"a=1"), ok(b"b=2"), ok(b"c=3")],
            ),
            (
                "lines: overlong dropped once, the next line survives",
                Framing::Lines,
                4,
                b"12345678\nok\n".to_vec(),
                vec![Err(FrameError::Overlong(4)), ok(b"ok")],
            ),
            (
                "lines: exactly max is fine",
                Framing::Lines,
                4,
                b"1234\n".to_vec(),
                vec![ok(b"1234")],
            ),
            (
                "cobs: zeros inside frames round-trip",
                Framing::Cobs,
                64,
                wire(Framing::Cobs, &[b"\x00", b"a\x00b\x00", b"xyz"]),
                vec![ok(b"\x00"), ok(b"a\x00b\x00"), ok(b"xyz")],
            ),
            (
                "cobs: a code past the end is malformed; the next frame survives",
                Framing::Cobs,
                64,
                [cobs_bad, enc(Framing::Cobs, b"good")].concat(),
                vec![
                    Err(FrameError::Malformed("COBS code runs past the frame")),
                    ok(b"good"),
                ],
            ),
            (
                "cobs: overlong",
                Framing::Cobs,
                3,
                [enc(Framing::Cobs, b"toolong"), enc(Framing::Cobs, b"ok")].concat(),
                vec![Err(FrameError::Overlong(3)), ok(b"ok")],
            ),
            (
                "slip: escapes round-trip; bytes before the first END are a frame (SLIP cannot tell)",
                Framing::Slip,
                64,
                [
                    b"\x13\x37".to_vec(),
                    enc(Framing::Slip, b"\xC0\xDB"),
                    enc(Framing::Slip, b"x"),
                ]
                .concat(),
                vec![ok(b"\x13\x37"), ok(b"\xC0\xDB"), ok(b"x")],
            ),
            (
                "slip: bad escape, overlong",
                Framing::Slip,
                3,
                [
                    b"\xC0\xDB\x01\xC0".to_vec(),
                    enc(Framing::Slip, b"toolong"),
                    enc(Framing::Slip, b"ok"),
                ]
                .concat(),
                vec![
                    Err(FrameError::Malformed("bad SLIP escape")),
                    Err(FrameError::Overlong(3)),
                    ok(b"ok"),
                ],
            ),
            (
                "len-crc16: frames back to back",
                Framing::LenCrc16,
                64,
                wire(Framing::LenCrc16, &[b"a", b"\x00\x01\x02", b"hello"]),
                vec![ok(b"a"), ok(b"\x00\x01\x02"), ok(b"hello")],
            ),
            (
                "len-crc16: a bad CRC is one drop, then resynchronised",
                Framing::LenCrc16,
                64,
                [lencrc_bad, enc(Framing::LenCrc16, b"next")].concat(),
                vec![Err(FrameError::Garbage(7)), ok(b"next")],
            ),
            (
                "len-crc16: leading garbage and a huge length",
                Framing::LenCrc16,
                16,
                [b"\xFF\xFF\x01".to_vec(), enc(Framing::LenCrc16, b"x")].concat(),
                vec![Err(FrameError::Garbage(3)), ok(b"x")],
            ),
        ];
        for (name, framing, max, bytes, want) in cases {
            let mut d = Deframer::new(framing, max);
            assert_eq!(feed(&mut d, &bytes), want, "{name}: whole");
            // The same bytes one at a time: split reads change nothing.
            let mut d = Deframer::new(framing, max);
            let mut got = Vec::new();
            for b in &bytes {
                got.extend(feed(&mut d, std::slice::from_ref(b)));
            }
            assert_eq!(got, want, "{name}: byte by byte");
            let n = want.iter().filter(|r| r.is_ok()).count() as u64;
            assert_eq!(d.stats.frames, n, "{name}: counted");
            assert_eq!(d.stats.dropped, want.len() as u64 - n, "{name}: dropped");
        }
    }

    #[test]
    fn cobs_encoding_of_long_runs() {
        // 254 non-zero bytes fill a block; the 255th starts a new one.
        let data: Vec<u8> = (1..=255u8).collect();
        let mut out = Vec::new();
        cobs_encode(&data, &mut out);
        assert_eq!(out[0], 0xFF);
        assert_eq!(out[255], 2);
        let mut back = Vec::new();
        cobs_decode(&out, &mut back).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn len_crc16_waits_for_the_rest() {
        let mut d = Deframer::new(Framing::LenCrc16, 64);
        let w = wire(Framing::LenCrc16, &[b"abc"]);
        assert!(feed(&mut d, &w[..4]).is_empty());
        assert_eq!(feed(&mut d, &w[4..]), vec![ok(b"abc")]);
    }

    fn framing() -> impl Strategy<Value = Framing> {
        prop_oneof![
            Just(Framing::Lines),
            Just(Framing::Cobs),
            Just(Framing::Slip),
            Just(Framing::LenCrc16)
        ]
    }

    proptest! {
        /// Frames survive any split of the stream, and garbage between them costs at most the
        /// frames it touches, never the ones after.
        #[test]
        fn frames_survive_splits_and_garbage(
            f in framing(),
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 1..8),
            garbage in proptest::collection::vec(any::<u8>(), 0..40),
            cut in 1usize..17,
        ) {
            // Lines cannot carry CR or LF inside a frame.
            let frames: Vec<Vec<u8>> = frames.into_iter().map(|mut p| {
                if f == Framing::Lines { p.retain(|b| *b != b'\n' && *b != b'\r'); p.push(b'x'); }
                p
            }).collect();
            let refs: Vec<&[u8]> = frames.iter().map(|v| v.as_slice()).collect();
            let mut bytes = garbage.clone();
            // A delimiter after the garbage, as a sender that starts a frame does.
            match f {
                Framing::Lines => bytes.push(b'\n'),
                Framing::Cobs => bytes.push(0),
                Framing::Slip => bytes.push(0xC0),
                Framing::LenCrc16 => {}
            }
            bytes.extend(wire(f, &refs));
            let mut d = Deframer::new(f, 64);
            let mut got = Vec::new();
            for chunk in bytes.chunks(cut) {
                got.extend(feed(&mut d, chunk));
            }
            d.idle(|r| got.push(r.map(<[u8]>::to_vec)));
            let good: Vec<Vec<u8>> = got.into_iter().filter_map(|r| r.ok()).collect();
            // Garbage may decode as stray frames before the real ones; the real ones all
            // arrive, in order, at the end.
            prop_assert!(good.ends_with(&frames), "{good:?} vs {frames:?}");
        }

        #[test]
        fn never_panics_and_stays_bounded(
            f in framing(),
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let mut d = Deframer::new(f, 32);
            d.feed(&bytes, |r| if let Ok(fr) = r { assert!(fr.len() <= 32) });
        }
    }

    /// Issue 18: a write over 65,535 bytes went out cut short under a valid CRC.
    #[test]
    fn len_crc16_refuses_what_its_length_cannot_say() {
        let mut out = Vec::new();
        let big = vec![7u8; 65_536];
        assert_eq!(
            encode(Framing::LenCrc16, &big, b"", &mut out),
            Err(FrameError::Overlong(65_535))
        );
        assert!(out.is_empty());
        encode(Framing::LenCrc16, &big[..65_535], b"", &mut out).unwrap();
        let mut d = Deframer::new(Framing::LenCrc16, 70_000);
        let mut got = Vec::new();
        d.feed(&out, |f| got.push(f.map(<[u8]>::len)));
        assert_eq!(got, vec![Ok(65_535)]);
    }
}
