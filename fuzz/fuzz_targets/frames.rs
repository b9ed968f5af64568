//! Serial framings and frame decoders on arbitrary bytes: never a panic, frames never longer
//! than the maximum, every frame survives re-encoding, and decoders give whole readings or
//! none. The first byte picks the framing, the maximum and how the stream is cut into reads.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost::hw::pins::Command;
use outpost::proto::frames::decode::{Decoder, TopicTemplate};
use outpost::proto::frames::{encode, Deframer, Framing};

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    let framing = [Framing::Lines, Framing::Cobs, Framing::Slip, Framing::LenCrc16]
        [(head & 3) as usize];
    let max = [8usize, 64, 1024, 65535][((head >> 2) & 3) as usize];
    let cut = 1 + (head >> 4) as usize * 7;
    let decoders = [
        Decoder::Raw,
        Decoder::Json { split: true },
        Decoder::Json { split: false },
        Decoder::Kv,
        Decoder::Csv {
            columns: vec!["a".into(), "-".into(), "c".into()],
            delimiter: ',',
        },
    ];
    let template = TopicTemplate::parse("s/{name}/{key}", "p", "g").expect("valid template");
    let mut d = Deframer::new(framing, max);
    let mut frames = Vec::new();
    for chunk in rest.chunks(cut) {
        d.feed(chunk, |f| {
            if let Ok(f) = f {
                assert!(!f.is_empty() && f.len() <= max);
                frames.push(f.to_vec());
            }
        });
    }
    d.idle(|f| {
        if let Ok(f) = f {
            frames.push(f.to_vec());
        }
    });
    let mut readings = Vec::new();
    for f in &frames {
        // Re-encoded, a frame comes back whole (lines cannot hold their own terminators,
        // and never do: the deframer split on them).
        let mut wire = Vec::new();
        encode(framing, f, b"\n", &mut wire);
        let mut again = Deframer::new(framing, max);
        let mut back = Vec::new();
        again.feed(&wire, |r| back.push(r.map(<[u8]>::to_vec)));
        assert_eq!(back, vec![Ok(f.clone())]);
        for dec in &decoders {
            match dec.decode(f, &mut readings) {
                Ok(()) => {
                    assert!(!readings.is_empty());
                    for r in &readings {
                        let topic = template.render(r.key.as_deref());
                        assert!(outpost::proto::topic::validate_name(&topic).is_ok());
                    }
                }
                Err(_) => assert!(readings.is_empty()),
            }
        }
        let _ = Command::parse(f);
    }
});
