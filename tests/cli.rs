//! The command line: `check` errors that name file:line:column and key, `--version`, and the
//! systemd notify protocol spoken to a real datagram socket.

mod common;

use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::time::Duration;

use common::Outpost;

fn outpost(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_outpost"))
        .args(args)
        .output()
        .expect("run outpost")
}

#[test]
fn version_and_help() {
    let v = outpost(&["--version"]);
    assert!(v.status.success());
    assert!(String::from_utf8_lossy(&v.stdout).starts_with("outpost "));
    let h = outpost(&["--help"]);
    assert!(String::from_utf8_lossy(&h.stdout).contains("check"));
}

#[test]
fn check_accepts_embedded_defaults_and_a_good_file() {
    let o = outpost(&["check"]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("127.0.0.1:1883"), "{out}");
    assert!(out.contains("local-only"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.toml");
    std::fs::write(
        &p,
        "[gateway]\nid = \"site-042\"\n[[listener]]\nkind = \"mqtt\"\nbind = \"0.0.0.0:1884\"\n",
    )
    .unwrap();
    // Open to the network without saying so, and with no password file: refused.
    let o = outpost(&["check", "--config", p.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("nobody could log in"));
    std::fs::write(
        &p,
        "[gateway]\nid = \"site-042\"\n[[listener]]\nkind = \"mqtt\"\nbind = \"0.0.0.0:1884\"\nallow_anonymous = true\n",
    )
    .unwrap();
    let o = outpost(&["check", "--config", p.to_str().unwrap()]);
    assert!(o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("site-042") && out.contains("(anonymous allowed)"),
        "{out}"
    );
}

#[test]
fn check_names_file_line_column_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.toml");
    std::fs::write(
        &p,
        "[gateway]\nid = \"x\"\n\n[limits]\nmax_keepalive = \"sixty\"\n",
    )
    .unwrap();
    let o = outpost(&["check", "--config", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    let want = format!("{}:5:17: key `max_keepalive`:", p.display());
    assert!(err.contains(&want), "{err}");
    // `run` refuses the same file the same way, before binding anything.
    let o = outpost(&["run", "--config", p.to_str().unwrap()]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains(&want));
    let o = outpost(&["check", "--config", "/nonexistent/outpost.toml"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("/nonexistent/outpost.toml"));
}

#[test]
fn speaks_sd_notify() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let data = tempfile::tempdir().unwrap();
    let mut o = Outpost::start_env(
        data,
        "",
        &[
            ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let mut seen = String::new();
    let mut buf = [0u8; 4096];
    while !(seen.contains("READY=1") && seen.contains("WATCHDOG=1")) {
        let n = sock.recv(&mut buf).expect("notify message");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        seen.push('\n');
    }
    assert!(seen.contains("STATUS="), "{seen}");
    while !seen.contains("clients,") {
        let n = sock.recv(&mut buf).expect("periodic STATUS line");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    let (status, _) = o.terminate();
    assert!(status.success());
    loop {
        let n = sock.recv(&mut buf).expect("STOPPING");
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = held.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.toml");
    std::fs::write(
        &p,
        format!("[gateway]\ndata_dir = \"{}\"\n[[listener]]\nkind = \"mqtt\"\nbind = \"127.0.0.1:{port}\"\n", dir.path().display()),
    )
    .unwrap();
    let o = outpost(&["run", "--config", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&format!("cannot bind mqtt listener on 127.0.0.1:{port}")),
        "{err}"
    );
}

#[test]
fn check_prints_the_uplink_and_compiled_rules_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    std::fs::write(
        rules.join("a.toml"),
        "[[out]]\nfilter = \"sensors/#\"\nremote_prefix = \"sites/{gateway_id}/\"\nqos = 2\n",
    )
    .unwrap();
    let p = dir.path().join("o.toml");
    let cfg = format!(
        "[gateway]\nid = \"site-042\"\n[uplink]\nurl = \"mqtt://cloud.example:1883\"\nrules_dir = \"{}\"\n",
        rules.display()
    );
    std::fs::write(&p, &cfg).unwrap();
    let o = outpost(&["check", "-c", p.to_str().unwrap()]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        out.contains("mqtt://cloud.example:1883 as \"site-042\""),
        "{out}"
    );
    assert!(out.contains("sites/site-042/{rest}  qos=2"), "{out}");
    assert!(out.contains("a.toml:2)"), "{out}");

    // An overlapping rule in a second file: refused with both places named.
    std::fs::write(
        rules.join("b.toml"),
        "\n[[out]]\nfilter = \"sensors/t\"\nqos = 1\n",
    )
    .unwrap();
    let o = outpost(&["check", "-c", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("b.toml:3") && err.contains("a.toml:2"),
        "{err}"
    );

    // A bad URL is a config error at its line.
    std::fs::write(&p, cfg.replace("mqtt://cloud.example:1883", "http://x")).unwrap();
    let o = outpost(&["check", "-c", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("o.toml:4:1: key `url`"), "{err}");

    // A missing CA file is found by check, not at the first connection.
    std::fs::remove_file(rules.join("b.toml")).unwrap();
    let tls = cfg.replace("mqtt://", "mqtts://") + "ca_file = \"/nonexistent/ca.crt\"\n";
    std::fs::write(&p, tls).unwrap();
    let o = outpost(&["check", "-c", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("ca_file /nonexistent/ca.crt"), "{err}");
}

/// Issue 19: `check` said "configuration OK" and then failed on a missing password file, with
/// the OS error twice and no position. Everything loads first; the error names the key.
#[test]
fn check_loads_every_file_before_saying_ok_and_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("o.toml");
    std::fs::write(
        &p,
        "# password_file in a comment\n[auth]\nacl_file = \"/nonexistent/acl\"\npassword_file = \"/nonexistent/passwd\"\n",
    )
    .unwrap();
    let o = outpost(&["check", "--config", p.to_str().unwrap()]);
    assert!(!o.status.success());
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!out.contains("configuration OK"), "{out}");
    assert!(
        err.contains("o.toml:4:1: key `password_file`: /nonexistent/passwd: No such file or directory (os error 2)"),
        "{err}"
    );
    assert_eq!(err.matches("os error 2").count(), 1, "{err}");
    // A TLS listener's missing certificate, at its key.
    std::fs::write(
        &p,
        "[[listener]]\nkind = \"mqtts\"\nbind = \"127.0.0.1:0\"\ncert_file = \"/nonexistent/c.pem\"\nkey_file = \"/nonexistent/k.pem\"\n",
    )
    .unwrap();
    let o = outpost(&["check", "--config", p.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success());
    assert!(
        err.contains("o.toml:4:1: key `cert_file`: listener mqtts"),
        "{err}"
    );
    // OK comes last, after everything was loaded.
    let o = outpost(&["check"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.trim_end()
            .ends_with("configuration OK (embedded defaults)"),
        "{out}"
    );
}

/// Issue 19: `outpost check | head -1` panicked on the broken pipe.
#[test]
fn a_closed_pipe_is_no_panic() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_outpost"))
        .arg("check")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Close our end of stdout before it writes: every write fails with EPIPE.
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(o.status.success(), "{err}");
}

/// Issue 19: a data directory over ~95 bytes put the control socket past the Unix path limit,
/// and outpost refused to start. It starts, and `outpost status` finds the same socket.
#[test]
fn a_long_data_dir_still_gets_a_control_socket() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join(format!("{}/data", "d".repeat(120)));
    let o = Outpost::start_in_data(dir, &data, "");
    let cfg = o.dir.path().join("outpost.toml");
    let st = outpost(&["status", "--config", cfg.to_str().unwrap(), "--json"]);
    let out = String::from_utf8_lossy(&st.stdout);
    assert!(
        st.status.success(),
        "{}\nlog:\n{}",
        String::from_utf8_lossy(&st.stderr),
        o.log()
    );
    assert!(out.contains("\"uptime_s\""), "{out}");
}

/// Issue 19: connects and disconnects were only at DEBUG, as Debug text. Now one human line
/// each at INFO, as mosquitto's connection_messages.
#[test]
fn connects_and_disconnects_are_one_human_line_each() {
    use std::io::{Read, Write};
    let o = Outpost::start("");
    let mut s = o.connect_raw();
    s.write_all(&common::raw::connect(4, "pump-7")).unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).unwrap();
    s.write_all(&[0xE0, 0]).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !o.log().contains("\"pump-7\" disconnected") && std::time::Instant::now() < deadline {
        std::thread::yield_now();
    }
    let log = o.log();
    assert!(
        log.contains("new client connected from 127.0.0.1:")
            && log.contains("as \"pump-7\" (MQTT 3.1.1, clean, keep-alive 60s)"),
        "{log}"
    );
    assert!(log.contains("client \"pump-7\" disconnected"), "{log}");
}
