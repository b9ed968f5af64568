//! A TCP proxy the test controls, for uplink faults: pass traffic, black-hole it (stop
//! forwarding without closing, the satellite case), cut every connection, or refuse new ones.
//! It counts the bytes each way, since uplink bytes per reading is a figure we report.
//! Also a mosquitto launcher, the cloud broker of uplink tests.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the proxy does with traffic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Forward both ways.
    Pass = 0,
    /// Read and drop both ways; connections stay open.
    BlackHole = 1,
    /// Accept new connections and close them at once.
    Refuse = 2,
}

pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    /// Bytes per second each way; 0 is unlimited.
    bandwidth: Arc<AtomicU64>,
    up: Arc<AtomicU64>,
    down: Arc<AtomicU64>,
    conns: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to 127.0.0.1:`target`.
    pub fn start(target: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("proxy bind");
        let port = listener.local_addr().expect("addr").port();
        let p = Proxy {
            port,
            mode: Arc::new(AtomicU8::new(Mode::Pass as u8)),
            bandwidth: Arc::default(),
            up: Arc::default(),
            down: Arc::default(),
            conns: Arc::default(),
        };
        let (mode, up, down, conns, bandwidth) = (
            p.mode.clone(),
            p.up.clone(),
            p.down.clone(),
            p.conns.clone(),
            p.bandwidth.clone(),
        );
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { continue };
                if mode.load(Ordering::SeqCst) == Mode::Refuse as u8 {
                    drop(client);
                    continue;
                }
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                    drop(client);
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                if let (Ok(c2), Ok(s2)) = (client.try_clone(), server.try_clone()) {
                    if let Ok(mut all) = conns.lock() {
                        all.push(c2);
                        all.push(s2);
                    }
                }
                for (from, to, count) in [
                    (client.try_clone(), server.try_clone(), up.clone()),
                    (server.try_clone(), client.try_clone(), down.clone()),
                ] {
                    let (Ok(from), Ok(to)) = (from, to) else {
                        continue;
                    };
                    let mode = mode.clone();
                    let bw = bandwidth.clone();
                    std::thread::spawn(move || pump(from, to, &mode, &count, &bw));
                }
            }
        });
        p
    }

    /// Caps each direction at `bytes_per_s` (0: unlimited), like a slow radio link.
    pub fn set_bandwidth(&self, bytes_per_s: u64) {
        self.bandwidth.store(bytes_per_s, Ordering::SeqCst);
    }

    pub fn set(&self, mode: Mode) {
        self.mode.store(mode as u8, Ordering::SeqCst);
    }

    /// Closes every connection made so far (both sides see the close).
    pub fn cut(&self) {
        if let Ok(mut all) = self.conns.lock() {
            for s in all.drain(..) {
                let _ = s.shutdown(Shutdown::Both);
            }
        }
    }

    /// Bytes forwarded (client to server, server to client).
    pub fn bytes(&self) -> (u64, u64) {
        (
            self.up.load(Ordering::SeqCst),
            self.down.load(Ordering::SeqCst),
        )
    }
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mode: &AtomicU8,
    count: &AtomicU64,
    bandwidth: &AtomicU64,
) {
    let mut buf = [0u8; 16 * 1024];
    // When capped, a chunk may leave only once the link has had time to carry the bytes
    // before it.
    let mut free_at = Instant::now();
    loop {
        let bw = bandwidth.load(Ordering::SeqCst);
        let limit = if bw == 0 {
            buf.len()
        } else {
            (bw as usize / 20).clamp(64, buf.len())
        };
        let n = match from.read(&mut buf[..limit]) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if bw > 0 {
            let now = Instant::now();
            free_at = free_at.max(now) + Duration::from_secs_f64(n as f64 / bw as f64);
            std::thread::sleep(free_at.saturating_duration_since(now));
        }
        if mode.load(Ordering::SeqCst) != Mode::Pass as u8 {
            continue; // black-holed: swallowed, and nobody is told
        }
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        count.fetch_add(n as u64, Ordering::SeqCst);
    }
    let _ = to.shutdown(Shutdown::Write);
}

/// A loopback port nobody holds right now, for a broker that must be told its port (a child
/// process binds it a moment later, so another program could take it first: a small race
/// that only costs a failed start).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

/// A mosquitto broker on a free port, stopped on drop.
pub struct Mosquitto {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// With `extra` lines appended to the config (more listeners, TLS files).
    ///
    /// The port comes from `free_port`, so another test may take it between our probe and
    /// mosquitto's bind (a proxy's port-0 listener can get the very number just released). Then
    /// mosquitto exits, and the probe may have reached the other listener: so the probe must
    /// also see our child still running, and a lost race starts over on a new port.
    pub fn start_with(extra: &str) -> Mosquitto {
        for _ in 0..5 {
            if let Some(m) = Self::try_start(extra) {
                return m;
            }
        }
        panic!("mosquitto did not start on any of 5 free ports");
    }

    fn try_start(extra: &str) -> Option<Mosquitto> {
        let dir = tempfile::tempdir().expect("tempdir");
        let port = free_port();
        let conf = dir.path().join("m.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_queued_messages 0\nuser root\nlog_dest none\n{extra}"
            ),
        )
        .expect("mosquitto config");
        let mut child = Command::new(super::tool("mosquitto"))
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn mosquitto");
        let t = Instant::now();
        loop {
            if child.try_wait().ok().flatten().is_some() {
                return None;
            }
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                // A bind failure makes mosquitto exit at once; give it that moment.
                std::thread::sleep(Duration::from_millis(50));
                if child.try_wait().ok().flatten().is_some() {
                    return None;
                }
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(10),
                "mosquitto did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Mosquitto {
            port,
            child,
            _dir: dir,
        })
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes `rules` as the bridge rule set in `dir` and returns an `[uplink]` section for a cloud
/// on `port`, with a short backoff so tests see reconnections quickly. `more` is appended to it.
pub fn uplink_section(
    dir: &std::path::Path,
    rules: &str,
    port: u16,
    keepalive: &str,
    more: &str,
) -> String {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("rules.toml"), rules).unwrap();
    format!(
        "[uplink]\nurl = \"mqtt://127.0.0.1:{port}\"\nkeepalive = \"{keepalive}\"\n\
         backoff = {{ min = \"100ms\", max = \"1s\" }}\nrules_dir = \"{}\"\n{more}",
        dir.display()
    )
}
