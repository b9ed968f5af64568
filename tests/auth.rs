//! Password files shared with mosquitto, both ways: a file made by `mosquitto_passwd` verifies
//! in outpost, and entries written by `outpost passwd` log in to a real mosquitto.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::proxy::Mosquitto;
use common::{run, tool};
use outpost::auth::Passwords;

fn outpost_passwd(file: &std::path::Path, user: &str, password: &str) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("passwd")
        .arg(file)
        .arg(user)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A new password file with one user, made by mosquitto's own tool.
fn mosquitto_passwd(file: &std::path::Path, user: &str, password: &str) {
    let made = Command::new(tool("mosquitto_passwd"))
        .arg("-c")
        .arg("-b")
        .arg(file)
        .args([user, password])
        .status()
        .unwrap();
    assert!(made.success());
}

fn publish_as(port: u16, user: &str, password: &str) -> bool {
    run(
        Command::new(tool("mosquitto_pub")).args([
            "-p",
            &port.to_string(),
            "-t",
            "t",
            "-m",
            "x",
            "-u",
            user,
            "-P",
            password,
        ]),
        Duration::from_secs(10),
    )
    .0
}

#[test]
fn password_files_work_in_both_directions() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    mosquitto_passwd(&file, "alice", "s3cret");
    let p = Passwords::load(&file).unwrap();
    assert!(p.verify("alice", b"s3cret"));
    assert!(!p.verify("alice", b"s3cre"));

    outpost_passwd(&file, "carol", "c4rol pass");
    outpost_passwd(&file, "alice", "n3w");
    let p = Passwords::load(&file).unwrap();
    assert!(p.verify("alice", b"n3w") && !p.verify("alice", b"s3cret"));
    assert!(p.verify("carol", b"c4rol pass"));

    let m = Mosquitto::start_with(&format!(
        "allow_anonymous false\npassword_file {}\n",
        file.display()
    ));
    assert!(
        publish_as(m.port, "carol", "c4rol pass"),
        "mosquitto reads our entry"
    );
    assert!(publish_as(m.port, "alice", "n3w"));
    assert!(
        !publish_as(m.port, "carol", "wrong"),
        "and refuses a wrong password"
    );
}

/// CONNECT at `level` (4 or 5) with optional credentials.
fn connect_with(level: u8, user: Option<&str>, password: Option<&str>) -> Vec<u8> {
    use common::raw::{frame, s};
    let mut flags = 0x02;
    if user.is_some() {
        flags |= 0x80;
    }
    if password.is_some() {
        flags |= 0x40;
    }
    let mut body = s("MQTT");
    body.extend([level, flags, 0, 60]);
    if level == 5 {
        body.push(0);
    }
    body.extend(s("auth-test"));
    if let Some(u) = user {
        body.extend(s(u));
    }
    if let Some(p) = password {
        body.extend(s(p));
    }
    frame(0x10, &body)
}

/// The CONNACK code outpost answers `connect` with, and whether it then closed.
fn connack(o: &common::Outpost, connect: &[u8]) -> (u8, bool) {
    let mut sock = o.connect_raw();
    common::write(&mut sock, connect);
    let (bytes, closed) = common::read_until_close(&mut sock, Duration::from_secs(10));
    assert!(
        bytes.len() >= 4 && bytes[0] == 0x20,
        "CONNACK expected: {bytes:?}"
    );
    (bytes[3], closed)
}

#[test]
fn logins_are_checked_with_the_right_codes_and_failures_slowed() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    mosquitto_passwd(&file, "alice", "s3cret");
    // The first line lands in the base config's [[listener]] table.
    let o = common::Outpost::start(&format!(
        "allow_anonymous = false\n\n[auth]\npassword_file = \"{}\"\n",
        file.display()
    ));
    assert!(publish_as(o.port, "alice", "s3cret"), "{}", o.log());
    assert_eq!(
        connack(&o, &connect_with(5, Some("alice"), Some("s3cret"))).0,
        0
    );
    // Wrong password: 4 in 3.1.1, 0x86 in 5.0; no user name: 5 and 0x87. Each is closed.
    assert_eq!(
        connack(&o, &connect_with(4, Some("alice"), Some("nope"))),
        (4, true)
    );
    assert_eq!(
        connack(&o, &connect_with(5, Some("alice"), Some("nope"))),
        (0x86, true)
    );
    assert_eq!(connack(&o, &connect_with(4, None, None)), (5, true));
    let t = std::time::Instant::now();
    assert_eq!(connack(&o, &connect_with(5, None, None)), (0x87, true));
    // Three failures in a row from 127.0.0.1: the fourth attempt waited 1 s first.
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(
        connack(&o, &connect_with(5, Some("mallory"), Some("x"))).0,
        0x86
    );
    assert!(o.log().contains("login refused"), "{}", o.log());
    assert!(!publish_as(o.port, "alice", "wrong"));
}

/// The package makes /etc/outpost/passwd root:outpost 0640 so the daemon can read it; root
/// rewriting it with `outpost passwd` must not hand it back to root's group.
#[test]
fn outpost_passwd_keeps_owner_group_and_mode() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("passwd");
    std::fs::write(&file, "").unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    // A group other than our own, where we may give one (root may; others keep theirs).
    let gid = if running_as_root() {
        4242
    } else {
        std::fs::metadata(&file).unwrap().gid()
    };
    let _ = std::os::unix::fs::chown(&file, None, Some(gid));
    outpost_passwd(&file, "dave", "d4ve");
    let m = std::fs::metadata(&file).unwrap();
    assert_eq!(m.mode() & 0o777, 0o600);
    assert_eq!(m.gid(), gid);
    assert!(Passwords::load(&file).unwrap().verify("dave", b"d4ve"));
    // A new file is 0640.
    let fresh = dir.path().join("fresh");
    outpost_passwd(&fresh, "erin", "3rin");
    assert_eq!(std::fs::metadata(&fresh).unwrap().mode() & 0o777, 0o640);
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self")
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            m.uid() == 0
        })
        .unwrap_or(false)
}
