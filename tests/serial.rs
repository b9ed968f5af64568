//! A sensor port at QoS 1 against a full store: the reader slows down and nothing read is
//! dropped. The uplink is down and the store holds 20 messages (`when_full = "block"`); 100
//! lines arrive on a pty. Once the link returns and the outbox drains, every reading reaches
//! the cloud (a real mosquitto, through the fault proxy).

mod common;

use std::io::Write;
use std::time::Duration;

use common::proxy::{uplink_section, Mode, Mosquitto, Proxy};
use common::rq::Cloud;
use common::Outpost;

const RULES: &str = r#"
[[out]]
filter = "sensors/#"
remote_prefix = "sites/{gateway_id}/"
qos = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_slows_the_port_and_loses_no_reading() {
    let m = Mosquitto::start();
    let proxy = Proxy::start(m.port);
    proxy.set(Mode::Refuse);
    let rules = tempfile::tempdir().unwrap();
    let (mut master, slave_path, _slave) = common::pty();
    let extra = format!(
        "[store]\nmax_messages = 20\nwhen_full = \"block\"\n\n{}\n\
         [[serial]]\nname = \"p1\"\ndevice = \"{slave_path}\"\nbaud = 115200\n\
         framing = \"lines\"\ndecode = \"kv\"\nqos = 1\n",
        uplink_section(rules.path(), RULES, proxy.port, "5s", ""),
    );
    let o = Outpost::start(&extra);
    let cloud = Cloud::subscribe(m.port, "sites/test/#").await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !o.log().contains("serial port open") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    const N: usize = 100;
    for i in 1..=N {
        master.write_all(format!("n={i}\n").as_bytes()).unwrap();
    }
    // The store fills at 20; the rest wait in the port's window and the pty's buffer.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !o.log().contains("hub refused a reading") && std::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(o.log().contains("hub refused a reading"), "{}", o.log());
    assert_eq!(cloud.count(), 0);

    proxy.set(Mode::Pass);
    let all = cloud.wait(Duration::from_secs(60), |g| g.len() >= N).await;
    let mut got: Vec<usize> = cloud
        .payloads()
        .iter()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(all, "only {} of {N} arrived; log:\n{}", got.len(), o.log());
    let in_order = got.windows(2).all(|w| w[0] < w[1]);
    if !in_order {
        println!("arrival order: {got:?}");
    }
    println!("{N} readings through a 20-message store; arrived in order: {in_order}");
    got.sort_unstable();
    assert_eq!(
        got,
        (1..=N).collect::<Vec<_>>(),
        "every reading exactly once"
    );
}
