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
    let made = Command::new(tool("mosquitto_passwd"))
        .arg("-c")
        .arg("-b")
        .arg(&file)
        .args(["alice", "s3cret"])
        .status()
        .unwrap();
    assert!(made.success());
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
