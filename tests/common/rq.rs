//! rumqttc helpers shared by the crash tests: persistent sessions, draining them, and a
//! publisher that records which messages were acknowledged until its broker dies, and a
//! cloud-side subscriber.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Outgoing, Packet, QoS};
use tokio::time::timeout;

pub fn client(port: u16, id: &str, clean: bool) -> (AsyncClient, EventLoop) {
    let mut opts = MqttOptions::new(id, "127.0.0.1", port);
    opts.set_keep_alive(Duration::from_secs(30));
    opts.set_clean_session(clean);
    opts.set_inflight(20);
    AsyncClient::new(opts, 64)
}

/// Connects, subscribes `filter` at QoS 2 with a persistent session, waits for SUBACK (which
/// outpost sends only once the subscription is on disk) and disconnects.
pub async fn register(port: u16, id: &str, filter: &str) {
    let (c, mut ev) = client(port, id, false);
    c.subscribe(filter, QoS::ExactlyOnce).await.unwrap();
    timeout(Duration::from_secs(10), async {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) => break,
                Ok(_) => {}
                Err(e) => panic!("register {id}: {e}"),
            }
        }
    })
    .await
    .expect("SUBACK");
    c.disconnect().await.unwrap();
    let _ = timeout(Duration::from_secs(2), async {
        while ev.poll().await.is_ok() {}
    })
    .await;
}

/// Reconnects the persistent session and collects payloads until `quiet` passes with none.
pub async fn drain(port: u16, id: &str, quiet: Duration) -> (bool, Vec<String>) {
    let (_c, mut ev) = client(port, id, false);
    let mut present = false;
    let mut got = Vec::new();
    loop {
        match timeout(quiet, ev.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(a)))) => present = a.session_present,
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => {
                got.push(String::from_utf8_lossy(&p.payload).into_owned())
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => panic!("drain {id}: {e}"),
            Err(_) => break,
        }
    }
    (present, got)
}

/// One publisher run against one outpost instance: publishes alternating QoS 1 and QoS 2
/// messages until the connection dies, recording which sequence numbers were acknowledged
/// (PUBACK for QoS 1, PUBREC for QoS 2: the moment outpost took responsibility).
pub async fn publish_until_killed(
    port: u16,
    run: usize,
    first_seq: u64,
    topics: (&'static str, &'static str),
    acked: &mut BTreeMap<u64, QoS>,
) -> u64 {
    let (c, mut ev) = client(port, &format!("crash-pub-{run}"), true);
    let sender = {
        let c = c.clone();
        tokio::spawn(async move {
            let mut seq = first_seq;
            loop {
                let qos = if seq % 2 == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                let topic = if qos == QoS::AtLeastOnce {
                    topics.0
                } else {
                    topics.1
                };
                if c.publish(topic, qos, false, seq.to_string()).await.is_err() {
                    break;
                }
                seq += 1;
            }
        })
    };
    // rumqttc assigns packet ids in publish order: map each outgoing id to its sequence number.
    let mut outgoing: VecDeque<u64> = VecDeque::new();
    let mut by_pid: HashMap<u16, (u64, QoS)> = HashMap::new();
    let mut next = first_seq;
    loop {
        match timeout(Duration::from_secs(5), ev.poll()).await {
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pid)))) => {
                let qos = if next % 2 == 0 {
                    QoS::AtLeastOnce
                } else {
                    QoS::ExactlyOnce
                };
                by_pid.insert(pid, (next, qos));
                outgoing.push_back(next);
                next += 1;
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                if let Some((seq, q)) = by_pid.remove(&a.pkid) {
                    acked.insert(seq, q);
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubRec(r)))) => {
                if let Some((seq, q)) = by_pid.remove(&r.pkid) {
                    acked.insert(seq, q);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) | Err(_) => break,
        }
    }
    sender.abort();
    next
}

/// What a crash test's receiver got, against what the publisher saw acknowledged. Sequence
/// numbers follow `publish_until_killed`: even ones went at QoS 1, odd ones at QoS 2.
#[derive(Debug)]
pub struct Tally {
    /// Acknowledged and never received.
    pub lost: Vec<u64>,
    pub acked_q1: usize,
    pub acked_q2: usize,
    pub dup_q1: usize,
    pub dup_q2: usize,
    /// Received although their ack never reached the publisher (in flight at a crash).
    pub unacked_delivered: usize,
}

pub fn tally(acked: &BTreeMap<u64, QoS>, payloads: &[String]) -> Tally {
    let mut seen: BTreeMap<u64, usize> = BTreeMap::new();
    for p in payloads {
        *seen.entry(p.parse().expect("numeric payload")).or_default() += 1;
    }
    let dup = |parity: u64| -> usize {
        seen.iter()
            .filter(|(s, n)| *s % 2 == parity && **n > 1)
            .map(|(_, n)| n - 1)
            .sum()
    };
    let acked_q1 = acked.values().filter(|q| **q == QoS::AtLeastOnce).count();
    Tally {
        lost: acked
            .keys()
            .filter(|s| !seen.contains_key(s))
            .copied()
            .collect(),
        acked_q1,
        acked_q2: acked.len() - acked_q1,
        dup_q1: dup(0),
        dup_q2: dup(1),
        unacked_delivered: seen.keys().filter(|s| !acked.contains_key(s)).count(),
    }
}

/// A cloud-side subscriber that records every payload it receives, in order.
pub struct Cloud {
    got: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
    _client: AsyncClient,
}

impl Cloud {
    pub async fn subscribe(port: u16, filter: &str) -> Cloud {
        let (c, mut ev) = client(port, "cloud-app", true);
        c.subscribe(filter, QoS::ExactlyOnce).await.unwrap();
        wait_suback(&mut ev).await;
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let task = tokio::spawn(async move {
            loop {
                match ev.poll().await {
                    Ok(Event::Incoming(Packet::Publish(p))) => sink
                        .lock()
                        .unwrap()
                        .push(String::from_utf8_lossy(&p.payload).into_owned()),
                    Ok(_) => {}
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                }
            }
        });
        Cloud {
            got,
            task,
            _client: c,
        }
    }

    pub fn count(&self) -> usize {
        self.got.lock().unwrap().len()
    }

    pub fn payloads(&self) -> Vec<String> {
        self.got.lock().unwrap().clone()
    }

    /// Waits until `done` holds for what arrived, or `limit` passes.
    pub async fn wait(&self, limit: Duration, done: impl Fn(&[String]) -> bool) -> bool {
        let t = Instant::now();
        while t.elapsed() < limit {
            if done(&self.got.lock().unwrap()) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub async fn wait_suback(ev: &mut EventLoop) {
    timeout(Duration::from_secs(10), async {
        loop {
            if let Ok(Event::Incoming(Packet::SubAck(_))) = ev.poll().await {
                return;
            }
        }
    })
    .await
    .expect("SUBACK");
}
