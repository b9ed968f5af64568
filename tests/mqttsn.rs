//! The MQTT-SN gateway end to end with the uplink: QoS 1 publishes from an MQTT-SN sensor while
//! the link to the cloud (a real mosquitto, through the fault proxy) is down are acknowledged
//! only once on disk, survive a SIGKILL, and reach the cloud when the link returns. The sensor
//! is a raw UDP socket speaking through our codec; the cloud side is rumqttc.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::proxy::{uplink_section, Mode, Mosquitto, Proxy};
use common::rq::Cloud;
use common::sn::SnClient;
use common::Outpost;
use outpost::proto::mqttsn::{Flags, Message, SnQos, TopicRef};

const RULES: &str = r#"
[[out]]
filter = "sensors/#"
remote_prefix = "sites/{gateway_id}/"
qos = 1
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos1_published_while_uplink_down_reaches_cloud_after_crash_and_return() {
    let m = Mosquitto::start();
    let proxy = Proxy::start(m.port);
    proxy.set(Mode::Refuse);
    let rules = tempfile::tempdir().unwrap();
    let extra = format!(
        "[[listener]]\nkind = \"mqtt-sn\"\nbind = \"127.0.0.1:0\"\n\n{}",
        uplink_section(rules.path(), RULES, proxy.port, "5s", ""),
    );
    let o = Outpost::start(&extra);
    let cloud = Cloud::subscribe(m.port, "sites/test/#").await;

    const N: u16 = 300;
    let sn = o.sn_port();
    let sensor = tokio::task::spawn_blocking(move || {
        let s = SnClient::new(sn);
        s.connect("soil-1");
        let topic = s.register("sensors/soil/moisture");
        for i in 1..=N {
            s.send(&Message::Publish {
                flags: Flags {
                    qos: SnQos::One,
                    ..Flags::default()
                },
                topic: TopicRef::Id(topic),
                msg_id: i,
                data: Bytes::from(i.to_string()),
            });
            match s.recv() {
                Message::PubAck {
                    msg_id,
                    rc: 0,
                    topic_id,
                } => {
                    assert_eq!(msg_id, i);
                    assert_eq!(topic_id, topic.to_be_bytes());
                }
                other => panic!("PUBACK expected for {i}, got {other:?}"),
            }
        }
    });
    sensor.await.unwrap();
    assert_eq!(
        cloud.count(),
        0,
        "the link is down: nothing reached the cloud yet"
    );

    // Every PUBACK meant "on disk": a power cut now loses none of them.
    let dir = o.crash();
    let o = Outpost::restart(dir, &extra);
    proxy.set(Mode::Pass);
    let all = cloud
        .wait(Duration::from_secs(60), |g| g.len() >= N as usize)
        .await;
    let got = cloud.payloads();
    assert!(all, "only {} of {N} arrived; log:\n{}", got.len(), o.log());
    let want: Vec<String> = (1..=N).map(|i| i.to_string()).collect();
    assert_eq!(got, want, "every acknowledged message, once, in order");
}
