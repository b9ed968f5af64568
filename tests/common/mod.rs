//! Shared harness for integration tests (`proxy` holds the fault proxy and a mosquitto
//! launcher): starts the real `outpost` binary on a free port with a
//! scratch data directory, and runs peers we did not write (mosquitto clients, rumqttc).

#![allow(dead_code)]

pub mod proxy;
pub mod rq;
pub mod sn;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running outpost.
pub struct Outpost {
    pub child: Child,
    pub port: u16,
    /// The UDP port of the first `mqtt-sn` listener, once it has logged it.
    sn_port: Arc<Mutex<Option<u16>>>,
    pub dir: tempfile::TempDir,
    pub log: Arc<Mutex<String>>,
}

impl Outpost {
    /// Starts outpost with `extra` appended to a config whose one listener binds port 0.
    pub fn start(extra: &str) -> Outpost {
        let dir = tempfile::tempdir().expect("tempdir");
        Self::start_in(dir, extra)
    }

    pub fn start_in(dir: tempfile::TempDir, extra: &str) -> Outpost {
        Self::start_env(dir, extra, &[])
    }

    /// Starts with extra environment variables (for example NOTIFY_SOCKET).
    pub fn start_env(dir: tempfile::TempDir, extra: &str, env: &[(&str, &str)]) -> Outpost {
        let data = dir.path().join("data");
        Self::launch(dir, &data, extra, env)
    }

    /// Starts with the data directory somewhere else (a small tmpfs, say).
    pub fn start_in_data(dir: tempfile::TempDir, data: &Path, extra: &str) -> Outpost {
        Self::launch(dir, data, extra, &[])
    }

    fn launch(dir: tempfile::TempDir, data: &Path, extra: &str, env: &[(&str, &str)]) -> Outpost {
        let cfg = dir.path().join("outpost.toml");
        let text = format!(
            "[gateway]\nid = \"test\"\ndata_dir = \"{}\"\n\n[[listener]]\nkind = \"mqtt\"\nbind = \"127.0.0.1:0\"\n\n{extra}",
            data.display()
        );
        std::fs::write(&cfg, text).expect("write config");
        // systemd sets WATCHDOG_PID to the service's own pid; a shell that execs outpost
        // can do the same, since exec keeps the pid.
        let watchdog = env.iter().any(|(k, _)| *k == "WATCHDOG_USEC");
        let mut cmd = if watchdog {
            let mut c = Command::new("sh");
            c.args([
                "-c",
                "WATCHDOG_PID=$$ exec \"$0\" \"$@\"",
                env!("CARGO_BIN_EXE_outpost"),
            ]);
            c
        } else {
            Command::new(env!("CARGO_BIN_EXE_outpost"))
        };
        let mut child = cmd
            .args(["run", "--config"])
            .arg(&cfg)
            .env("RUST_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn outpost");
        let stderr = child.stderr.take().expect("stderr");
        let log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let sink = log.clone();
        let sn_port = Arc::new(Mutex::new(None));
        let sn = sn_port.clone();
        std::thread::spawn(move || {
            // Keep draining stderr so the child never blocks on a full pipe.
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line
                    .split("listening for MQTT 3.1, 3.1.1 and 5.0 on 127.0.0.1:")
                    .nth(1)
                {
                    let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                    let _ = tx.send(port.parse::<u16>().unwrap_or(0));
                }
                if let Some(rest) = line.split("gateway on UDP 127.0.0.1:").nth(1) {
                    let port: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
                    if let Ok(mut p) = sn.lock() {
                        p.get_or_insert(port.parse::<u16>().unwrap_or(0));
                    }
                }
                if let Ok(mut l) = sink.lock() {
                    l.push_str(&line);
                    l.push('\n');
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("outpost did not start; log:\n{}", log.lock().unwrap()));
        Outpost {
            child,
            port,
            sn_port,
            dir,
            log,
        }
    }

    /// The MQTT-SN UDP port (the config must have an `mqtt-sn` listener).
    pub fn sn_port(&self) -> u16 {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(p) = *self.sn_port.lock().unwrap() {
                return p;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("no MQTT-SN listener came up; log:\n{}", self.log());
    }

    /// SIGKILL, as a power cut or a crash would; returns the data directory for a restart.
    pub fn crash(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let spare = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, spare)
    }

    /// SIGTERM, as systemd stops it; returns the data directory for a restart.
    pub fn stop(mut self) -> tempfile::TempDir {
        let (status, _) = self.terminate();
        assert!(
            status.success(),
            "outpost exited with {status}; log:\n{}",
            self.log()
        );
        let spare = tempfile::tempdir().expect("tempdir");
        std::mem::replace(&mut self.dir, spare)
    }

    /// Starts again on a data directory from `crash`, with the same config file.
    pub fn restart(dir: tempfile::TempDir, extra: &str) -> Outpost {
        Self::start_in(dir, extra)
    }

    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    /// SIGTERM, then wait; returns the exit status and how long it took.
    pub fn terminate(&mut self) -> (std::process::ExitStatus, Duration) {
        let t = Instant::now();
        unsafe_kill(self.child.id(), "TERM");
        let status = wait_timeout(&mut self.child, Duration::from_secs(10))
            .unwrap_or_else(|| panic!("outpost did not exit after SIGTERM; log:\n{}", self.log()));
        (status, t.elapsed())
    }

    pub fn connect_raw(&self) -> TcpStream {
        let s = TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(5))).ok();
        s.set_nodelay(true).ok();
        s
    }
}

impl Drop for Outpost {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn unsafe_kill(pid: u32, sig: &str) {
    let _ = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status();
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    while t.elapsed() < limit {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Finds a mosquitto client tool, or says how to get it.
pub fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/usr/sbin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!("{name} not found: run tests/run (it installs mosquitto-clients)");
}

/// Runs a command to completion with a time limit; returns (status ok, stdout).
pub fn run(cmd: &mut Command, limit: Duration) -> (bool, String) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    let status = wait_timeout(&mut child, limit);
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    if !err.is_empty() {
        eprintln!("{err}");
    }
    (status.is_some_and(|s| s.success()), out)
}

/// Spawns a long-running client (mosquitto_sub) and returns it.
pub fn spawn(cmd: &mut Command) -> Child {
    cmd.stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn")
}

/// Collects a finished child's stdout.
pub fn output(mut child: Child, limit: Duration) -> String {
    if wait_timeout(&mut child, limit).is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mut out = String::new();
    if let Some(mut o) = child.stdout.take() {
        let _ = o.read_to_string(&mut out);
    }
    out
}

/// Raw MQTT bytes for tests that speak the protocol by hand.
pub mod raw {
    pub fn frame(first: u8, body: &[u8]) -> Vec<u8> {
        let mut v = vec![first];
        let mut n = body.len();
        loop {
            let mut b = (n % 128) as u8;
            n /= 128;
            if n > 0 {
                b |= 0x80;
            }
            v.push(b);
            if n == 0 {
                break;
            }
        }
        v.extend_from_slice(body);
        v
    }
    pub fn s(x: &str) -> Vec<u8> {
        let mut v = (x.len() as u16).to_be_bytes().to_vec();
        v.extend_from_slice(x.as_bytes());
        v
    }
    /// CONNECT with clean session and keepalive 60.
    pub fn connect(level: u8, id: &str) -> Vec<u8> {
        let mut body = s("MQTT");
        body.extend([level, 0x02, 0, 60]);
        if level == 5 {
            body.push(0);
        }
        body.extend(s(id));
        frame(0x10, &body)
    }
}

/// Reads until the peer closes or `limit` passes; returns the bytes and whether it closed.
pub fn read_until_close(s: &mut TcpStream, limit: Duration) -> (Vec<u8>, bool) {
    let t = Instant::now();
    let mut all = Vec::new();
    let mut buf = [0u8; 4096];
    s.set_read_timeout(Some(Duration::from_millis(100))).ok();
    while t.elapsed() < limit {
        match s.read(&mut buf) {
            Ok(0) => return (all, true),
            Ok(n) => all.extend_from_slice(&buf[..n]),
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => {
                eprintln!("read error: {e}");
                return (all, true);
            }
        }
    }
    (all, false)
}

pub fn write(s: &mut TcpStream, b: &[u8]) {
    let _ = s.write_all(b);
}

/// A pty pair: the master, the slave's path, and the slave (kept open so the port never sees a
/// hang-up). Stands in for a UART.
pub fn pty() -> (std::fs::File, String, std::fs::File) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two descriptors we then own; the name and termios are not used.
    let rc = unsafe {
        openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty");
    let path = std::fs::read_link(format!("/proc/self/fd/{slave}"))
        .expect("pty name")
        .display()
        .to_string();
    // SAFETY: both descriptors are open and owned by nothing else.
    unsafe {
        (
            std::fs::File::from_raw_fd(master),
            path,
            std::fs::File::from_raw_fd(slave),
        )
    }
}

extern "C" {
    fn openpty(
        amaster: *mut i32,
        aslave: *mut i32,
        name: *mut u8,
        termp: *const u8,
        winp: *const u8,
    ) -> i32;
}

/// A process's resident memory in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}
