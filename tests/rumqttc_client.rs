//! outpost against rumqttc, an independent Rust client: QoS 0/1/2 at volume, and a persistent
//! session that misses messages while offline and gets them on reconnect.

mod common;

use std::time::Duration;

use common::Outpost;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use tokio::time::timeout;

fn client(o: &Outpost, id: &str, clean: bool) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", o.port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(clean);
    opts.set_inflight(50);
    AsyncClient::new(opts, 100)
}

/// Polls until `n` publishes arrived (or the time limit), returning their payloads.
async fn receive(ev: &mut EventLoop, n: usize, limit: Duration) -> Vec<String> {
    let mut got = Vec::new();
    let _ = timeout(limit, async {
        while got.len() < n {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    got.push(String::from_utf8_lossy(&p.payload).into_owned())
                }
                Ok(_) => {}
                Err(e) => panic!("subscriber event loop: {e}"),
            }
        }
    })
    .await;
    got
}

async fn wait_suback(ev: &mut EventLoop) -> bool {
    timeout(Duration::from_secs(5), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
        }
    })
    .await
    .unwrap_or(false)
}

/// Drives a publisher's event loop in the background until it is dropped.
fn drive(mut ev: EventLoop) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move { while ev.poll().await.is_ok() {} })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qos_0_1_2_at_volume() {
    let o = Outpost::start("");
    for (qos, topic) in [
        (QoS::AtMostOnce, "rq/0"),
        (QoS::AtLeastOnce, "rq/1"),
        (QoS::ExactlyOnce, "rq/2"),
    ] {
        let (sub, mut sub_ev) = client(&o, &format!("sub-{topic}"), true);
        sub.subscribe(topic, QoS::ExactlyOnce).await.unwrap();
        assert!(wait_suback(&mut sub_ev).await);
        let (publisher, pub_ev) = client(&o, &format!("pub-{topic}"), true);
        let driver = drive(pub_ev);
        let n = 500;
        let p = publisher.clone();
        let sender = tokio::spawn(async move {
            for i in 0..n {
                p.publish(topic, qos, false, format!("{i}")).await.unwrap();
            }
        });
        let got = receive(&mut sub_ev, n, Duration::from_secs(20)).await;
        sender.await.unwrap();
        driver.abort();
        if qos == QoS::AtMostOnce {
            // Loopback loses nothing in practice, but QoS 0 promises nothing: check order only.
            assert!(got.len() > n / 2, "QoS 0 got only {}", got.len());
        } else {
            assert_eq!(got.len(), n, "{qos:?}; log:\n{}", o.log());
        }
        let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
        let mut prev = -1i64;
        for g in &got {
            let v: i64 = g.parse().unwrap();
            assert!(v > prev, "order broken at {v} after {prev}");
            prev = v;
        }
        if qos != QoS::AtMostOnce {
            assert_eq!(got, want);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn persistent_session_across_reconnect() {
    let o = Outpost::start("");
    {
        let (sub, mut ev) = client(&o, "rq-durable", false);
        sub.subscribe("dur/#", QoS::AtLeastOnce).await.unwrap();
        assert!(wait_suback(&mut ev).await);
        sub.disconnect().await.unwrap();
        let _ = timeout(Duration::from_secs(2), async {
            while ev.poll().await.is_ok() {}
        })
        .await;
    }
    let (publisher, pub_ev) = client(&o, "rq-pub", true);
    let driver = drive(pub_ev);
    for i in 0..50 {
        publisher
            .publish("dur/x", QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    driver.abort();
    let (_sub, mut ev) = client(&o, "rq-durable", false);
    let present = timeout(Duration::from_secs(5), async {
        loop {
            if let Ok(Event::Incoming(Packet::ConnAck(a))) = ev.poll().await {
                return a.session_present;
            }
        }
    })
    .await
    .unwrap();
    assert!(present, "CONNACK session present");
    let got = receive(&mut ev, 50, Duration::from_secs(10)).await;
    let want: Vec<String> = (0..50).map(|i| i.to_string()).collect();
    assert_eq!(got, want);
}
