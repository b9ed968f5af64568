//! The fault proxy that uplink tests put between outpost and the cloud broker, checked against
//! a real mosquitto: it passes, black-holes (silently, connection kept), cuts, refuses and
//! counts bytes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::proxy::{Mode, Mosquitto, Proxy};
use common::raw::connect;

fn read_some(s: &mut TcpStream, wait: Duration) -> Result<Vec<u8>, std::io::ErrorKind> {
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 64];
    match s.read(&mut buf) {
        Ok(n) => Ok(buf[..n].to_vec()),
        Err(e) => Err(e.kind()),
    }
}

#[test]
fn passes_black_holes_cuts_refuses_and_counts() {
    let m = Mosquitto::start();
    let p = Proxy::start(m.port);
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    s.write_all(&connect(4, "through-proxy")).unwrap();
    assert_eq!(
        read_some(&mut s, Duration::from_secs(5)),
        Ok(vec![0x20, 2, 0, 0])
    );
    s.write_all(&[0xC0, 0]).unwrap();
    assert_eq!(read_some(&mut s, Duration::from_secs(5)), Ok(vec![0xD0, 0]));

    p.set(Mode::BlackHole);
    s.write_all(&[0xC0, 0]).unwrap();
    let r = read_some(&mut s, Duration::from_millis(800));
    assert!(
        matches!(
            r,
            Err(std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut)
        ),
        "a black hole says nothing and closes nothing: {r:?}"
    );

    p.set(Mode::Pass);
    s.write_all(&[0xC0, 0]).unwrap();
    assert_eq!(read_some(&mut s, Duration::from_secs(5)), Ok(vec![0xD0, 0]));
    let (up, down) = p.bytes();
    assert!(up >= 23 && down >= 6, "counted {up} up, {down} down");

    p.cut();
    assert_eq!(
        read_some(&mut s, Duration::from_secs(5)),
        Ok(vec![]),
        "cut closes"
    );

    p.set(Mode::Refuse);
    let mut r = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    let _ = r.write_all(&connect(4, "refused"));
    let r = read_some(&mut r, Duration::from_secs(5));
    // Closed with our CONNECT unread, so the kernel may answer with RST: either is a refusal.
    assert!(
        matches!(r, Ok(ref b) if b.is_empty()) || r == Err(std::io::ErrorKind::ConnectionReset),
        "refused at once: {r:?}"
    );
}

#[test]
fn bandwidth_cap_slows_the_link() {
    let m = Mosquitto::start();
    let p = Proxy::start(m.port);
    p.set_bandwidth(20_000);
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).unwrap();
    s.write_all(&connect(4, "slow-link")).unwrap();
    assert_eq!(
        read_some(&mut s, Duration::from_secs(5)),
        Ok(vec![0x20, 2, 0, 0])
    );
    // A 30,000-byte QoS 0 PUBLISH followed by PINGREQ: the PINGRESP comes back only after
    // the publish has crossed the capped link, so at about 1.5 s.
    let payload = vec![b'x'; 30_000];
    let mut body = vec![0, 1, b't'];
    body.extend_from_slice(&payload);
    let t = std::time::Instant::now();
    s.write_all(&common::raw::frame(0x30, &body)).unwrap();
    s.write_all(&[0xC0, 0]).unwrap();
    assert_eq!(
        read_some(&mut s, Duration::from_secs(10)),
        Ok(vec![0xD0, 0])
    );
    let took = t.elapsed();
    assert!(took >= Duration::from_millis(1_300), "{took:?}");
}
