//! Wiring: builds the hub and the listeners from a `Config`, tells systemd we are ready, and
//! runs until SIGTERM or SIGINT, then shuts down in order: stop accepting, publish wills and
//! close connections, stop.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch, Notify, Semaphore};

use crate::auth::{Acl, Passwords};
use crate::bridge::rules::Rules;
use crate::config::{self, Config, ListenerKind};
use crate::hub::durable::Clock;
use crate::hub::local::LOCAL_CONN_BASE;
use crate::hub::{Hub, HubConfig, Restored};
use crate::io::control;
use crate::io::hub_task::{self, HubMsg, Reporting, HUB_QUEUE};
use crate::io::mqtt_listener::{self, ListenerShared};
use crate::io::mqttsn;
use crate::io::mqttsn_serial::Serial;
use crate::io::mqttsn_udp::Udp;
use crate::io::store_link::{StoreLink, COMMITS_QUEUE};
use crate::io::uplink::{self, UplinkSetup};
use crate::io::{gpio, serial};
use crate::proto::mqtt::mount::MountPoint;
use crate::proto::mqtt::server::ServerLimits;
use crate::proto::mqttsn::gateway::{Gateway, GatewayConfig, Predefined, SN_CONN_BASE};
use crate::status::Board;
use crate::store::{self, Store, StoreConfig, StoreError};
use crate::systemd;

/// The GPIO session's connection id, past every serial port's.
const GPIO_CONN_OFFSET: u64 = 1 << 32;

/// How long shutdown waits for connections to flush before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(3);

/// Why the server could not run.
#[derive(Debug, Error)]
pub enum ServerError {
    /// A listener's address could not be bound.
    #[error("cannot bind {kind} listener on {addr}")]
    Bind {
        kind: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    /// The data directory could not be created.
    #[error("cannot create data directory {path}")]
    DataDir {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    /// A signal handler could not be installed. (Sources are not repeated in the messages:
    /// main prints the whole chain.)
    #[error("cannot install signal handler: {0}")]
    Signal(std::io::Error),
    /// The durable store could not be opened or read.
    #[error("store in {path}")]
    Store {
        path: std::path::PathBuf,
        source: StoreError,
    },
    /// The bridge rules could not be loaded.
    #[error("bridge rules")]
    Rules(#[from] crate::bridge::rules::RuleError),
    /// The uplink could not be set up.
    #[error("uplink")]
    Uplink(#[from] crate::io::uplink::UplinkError),
    /// The password or ACL file could not be read or parsed (the message names the key).
    #[error("{0}")]
    Auth(String),
    /// A GPIO chip or line could not be set up.
    #[error("GPIO")]
    Gpio(#[source] crate::hw::HwError),
    /// The control socket could not be bound.
    #[error("cannot bind the control socket {path}")]
    Control {
        path: PathBuf,
        source: std::io::Error,
    },
    /// A TLS listener's certificate, key or client CA could not be loaded.
    #[error("TLS: {0}")]
    Tls(String),
    /// A serial port for MQTT-SN could not be opened.
    #[error("cannot open serial port {device}")]
    Serial {
        device: std::path::PathBuf,
        source: std::io::Error,
    },
}

/// The MQTT-SN gateway's settings for listener number `index`: each listener has its own
/// range of connection ids, apart from the MQTT listeners' (which count up from 1).
pub fn gateway_config(c: &Config, index: usize) -> GatewayConfig {
    let sn = &c.mqttsn;
    GatewayConfig {
        gateway_id: sn.gateway_id,
        predefined: sn
            .predefined
            .iter()
            .map(|p| Predefined {
                id: p.id,
                topic: p.topic.clone(),
                client: p.client.clone(),
            })
            .collect(),
        retry_interval: sn.retry.interval.0,
        retry_count: sn.retry.count,
        advertise: sn.advertise.as_ref().map(|a| a.interval.0),
        max_clients: sn.max_clients.get(),
        conn_base: SN_CONN_BASE + ((index as u64) << 40),
        max_topic_levels: c.limits.max_topic_levels.get(),
    }
}

/// The store's settings from the config.
pub fn store_config(c: &Config) -> StoreConfig {
    let st = &c.store;
    StoreConfig {
        synchronous: match st.synchronous {
            config::Synchronous::Full => store::Synchronous::Full,
            config::Synchronous::Normal => store::Synchronous::Normal,
        },
        commit_interval: st.commit_interval.0,
        max_batch: StoreConfig::default().max_batch,
        max_bytes: st.max_bytes.0,
        max_messages: st.max_messages,
        max_age: st.max_age.0,
        when_full: match st.when_full {
            config::WhenFull::DropOldest => store::WhenFull::DropOldest,
            config::WhenFull::Block => store::WhenFull::Block,
        },
        // Without an uplink nothing is ever outboxed: the session queues get the whole store.
        outbox_share: if c.uplink.is_some() {
            st.outbox_share
        } else {
            0.0
        },
    }
}

/// Opens the store and reads what the hub restores from it. Cost: sessions, subscriptions and
/// retained messages; queued messages stay on disk until their session reconnects.
fn open_store(dir: &std::path::Path, cfg: StoreConfig) -> Result<(Store, Restored), StoreError> {
    let store = Store::open(dir, cfg)?;
    let restored = Restored {
        sessions: store.sessions()?,
        subscriptions: store.subscriptions()?,
        inbound_qos2: store.inbound_qos2()?,
        retained: store.retained()?,
        max_row: store.max_id()?,
        queued: store.session_queue_lengths()?,
    };
    Ok((store, restored))
}

/// The hub's limits from the config.
pub fn hub_config(c: &Config) -> HubConfig {
    HubConfig {
        max_inflight: c.limits.max_inflight.get(),
        max_queued: c.limits.max_queued.get(),
        max_packet_size: c.limits.max_packet_size.0.min(u32::MAX as u64) as u32,
        topic_alias_maximum: c.limits.topic_alias_maximum,
        acl: None,
        max_topic_levels: c.limits.max_topic_levels.get(),
        max_sessions: c.limits.max_sessions.get(),
        persistent_session_expiry: c
            .limits
            .persistent_session_expiry
            .0
            .as_secs()
            .min(u32::MAX as u64 - 1) as u32,
        max_subscriptions_per_session: c.limits.max_subscriptions_per_session.get(),
    }
}

/// The password and ACL files named in `[auth]`, loaded whole: at start, by `outpost check`,
/// and again at every reload (where an error keeps the old ones in force).
/// An error names the config key that names the file (`outpost.toml:7:1: key
/// `password_file`: /etc/outpost/passwd: No such file or directory`).
pub fn load_auth(c: &Config) -> Result<AuthFiles, String> {
    use crate::config::spans::Step::Key;
    let place = |key| c.place(&[Key("auth"), Key(key)]);
    let passwords = match &c.auth.password_file {
        Some(p) => Some(Arc::new(
            Passwords::load(p).map_err(|e| format!("{}{e}", place("password_file")))?,
        )),
        None => None,
    };
    let acl = match &c.auth.acl_file {
        Some(p) => Some(Arc::new(
            Acl::load(p).map_err(|e| format!("{}{e}", place("acl_file")))?,
        )),
        None => None,
    };
    Ok(AuthFiles { passwords, acl })
}

/// A TLS listener's file error with the key that names the file: `outpost.toml:9:1: key
/// `cert_file`: listener mqtts on 0.0.0.0:8883: cert_file /x: No such file`.
pub fn tls_place(
    c: &Config,
    index: usize,
    e: &crate::io::tls::TlsError,
    l: &config::Listener,
) -> String {
    use crate::config::spans::Step::{At, Key};
    let at = c.place(&[Key("listener"), At(index), Key(e.key)]);
    format!("{at}listener {} on {}: {e}", l.kind.name(), l.place())
}

/// What `[auth]` loads.
#[derive(Debug, Clone, Default)]
pub struct AuthFiles {
    pub passwords: Option<Arc<Passwords>>,
    pub acl: Option<Arc<Acl>>,
}

/// Each connection's limits from the config.
pub fn server_limits(c: &Config) -> ServerLimits {
    ServerLimits {
        max_packet_size: c.limits.max_packet_size.0.min(u32::MAX as u64) as u32,
        max_keepalive: c.limits.max_keepalive.0.as_secs().min(u16::MAX as u64) as u16,
        topic_alias_maximum: c.limits.topic_alias_maximum,
        connect_timeout: c.limits.connect_timeout.0,
    }
}

/// Runs outpost until a termination signal. `source` is the config file, read again on SIGHUP.
pub async fn run(config: Config, source: Option<PathBuf>) -> Result<(), ServerError> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).map_err(ServerError::Signal)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServerError::Signal)?;
    let mut hup = signal(SignalKind::hangup()).map_err(ServerError::Signal)?;
    let started = tokio::time::Instant::now();
    let board = Arc::new(Board::default());

    let data_dir = config.data_dir();
    std::fs::create_dir_all(&data_dir).map_err(|source| ServerError::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let gateway = config.gateway_id();
    tracing::info!(gateway = %gateway, data_dir = %data_dir.display(), "starting outpost {}", env!("CARGO_PKG_VERSION"));

    let (store, restored) =
        open_store(&data_dir, store_config(&config)).map_err(|source| ServerError::Store {
            path: data_dir.clone(),
            source,
        })?;
    let store = Arc::new(store);
    let totals = store.totals();
    tracing::info!(
        path = %store.path().display(),
        queued = totals.messages,
        queued_bytes = totals.bytes,
        "store open"
    );
    let rules = match &config.uplink {
        Some(u) => Some(Rules::load_dir(&u.rules_dir, &gateway)?),
        None => None,
    };
    if let (Some(u), Some(r)) = (&config.uplink, &rules) {
        if r.outs.is_empty() {
            tracing::warn!(rules_dir = %u.rules_dir.display(), "no [[out]] rules: nothing local goes to the cloud");
        }
    }
    let started_rules = rules.as_ref().map(|r| StartedRules {
        priorities: r.outs.iter().map(|o| o.priority).collect(),
        ins: r.ins.clone(),
    });
    let outbox_wake = Arc::new(Notify::new());
    let (commit_tx, commit_rx) = mpsc::channel(COMMITS_QUEUE);
    let link = StoreLink::new(
        store.clone(),
        commit_tx,
        rules.as_ref().map(|_| outbox_wake.clone()),
    );
    let auth = load_auth(&config).map_err(ServerError::Auth)?;
    if let (Some(p), Some(pw)) = (&config.auth.password_file, &auth.passwords) {
        tracing::info!(file = %p.display(), users = pw.len(), "password file loaded");
    }
    if let (Some(p), Some(acl)) = (&config.auth.acl_file, &auth.acl) {
        tracing::info!(file = %p.display(), rules = acl.len(), "ACL file loaded");
    }
    let clock = Clock::new(std::time::Instant::now(), crate::io::clock::unix_ms());
    let hub_cfg = HubConfig {
        acl: auth.acl.clone(),
        ..hub_config(&config)
    };
    let mut hub = Hub::with_store(hub_cfg, Box::new(link), clock);
    let trust = config.store.trust_clock_after.0;
    let believed = trust.is_zero() || crate::io::clock::kernel_synced();
    if !believed {
        tracing::info!(
            trust_clock_after = ?trust,
            "the wall clock is not synchronised yet: nothing expires by age until it is, or until trust_clock_after has passed"
        );
    }
    hub.believe_clock(believed);
    hub.restore(std::time::Instant::now(), restored);
    if let Some(r) = &rules {
        hub.set_uplink_rules(r.outs.clone());
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let (hub_tx, hub_rx) = mpsc::channel(HUB_QUEUE);
    let (uplink_ports, uplink_task) = match (&config.uplink, rules) {
        (Some(u), Some(rules)) => {
            let (ports, chans) = uplink::channels();
            tracing::info!(
                url = %u.url,
                out_rules = rules.outs.len(),
                in_rules = rules.ins.len(),
                "uplink configured"
            );
            let setup = UplinkSetup {
                cfg: u.clone(),
                gateway_id: gateway.clone(),
                rules,
                max_packet_size: hub_config(&config).max_packet_size,
                store: store.clone(),
                hub: hub_tx.clone(),
                outbox_wake: outbox_wake.clone(),
                stop: stop_rx.clone(),
                board: board.clone(),
            };
            (Some(ports), Some(uplink::start(setup, chans)?))
        }
        _ => (None, None),
    };
    let reporting = Reporting {
        board: board.clone(),
        store: Some(store.clone()),
        gateway_id: gateway.clone(),
        started,
        trust_clock_after: config.store.trust_clock_after.0,
    };
    let hub_handle = tokio::spawn(hub_task::run(
        hub,
        hub_rx,
        commit_rx,
        SHUTDOWN_GRACE,
        uplink_ports,
        reporting,
    ));
    let uplink_handle = uplink_task.map(tokio::spawn);
    let shared = Arc::new(ListenerShared {
        hub: hub_tx.clone(),
        limits: server_limits(&config),
        connections: Arc::new(Semaphore::new(config.limits.max_connections.get())),
        next_conn: AtomicU64::new(1),
        passwords: std::sync::RwLock::new(auth.passwords.clone()),
        board: board.clone(),
        throttle: std::sync::Mutex::default(),
    });
    let mut accept_tasks = Vec::new();
    // The TLS listeners' settings by listener index, for reload to swap.
    let mut tls_slots = Vec::new();
    let sn_cfg = Arc::new(config.mqttsn.clone());
    for (index, l) in config.listeners.iter().enumerate() {
        match l.kind {
            ListenerKind::MqttSn => {
                let udp = Udp::bind(l.addr(), sn_cfg.clone())
                    .await
                    .map_err(|source| ServerError::Bind {
                        kind: "mqtt-sn",
                        addr: l.addr(),
                        source,
                    })?;
                let addr = udp.local_addr().unwrap_or(l.addr());
                tracing::info!(kind = "mqtt-sn", %addr, "MQTT-SN 1.2 gateway on UDP {addr}");
                let gw = Gateway::new(std::time::Instant::now(), gateway_config(&config, index));
                accept_tasks.push(tokio::spawn(mqttsn::run(
                    udp,
                    gw,
                    hub_tx.clone(),
                    board.clone(),
                    stop_rx.clone(),
                )));
            }
            ListenerKind::MqttSnSerial => {
                let port = Serial::open(l).map_err(|source| ServerError::Serial {
                    device: l.device.clone().unwrap_or_default(),
                    source,
                })?;
                tracing::info!(kind = "mqtt-sn-serial", place = %l.place(), "MQTT-SN 1.2 gateway on serial {}", l.place());
                let gw = Gateway::new(std::time::Instant::now(), gateway_config(&config, index));
                accept_tasks.push(tokio::spawn(mqttsn::run(
                    port,
                    gw,
                    hub_tx.clone(),
                    board.clone(),
                    stop_rx.clone(),
                )));
            }
            kind => {
                let tls = match kind.is_tls() {
                    true => {
                        let cfg = crate::io::tls::server_config(l)
                            .map_err(|e| ServerError::Tls(tls_place(&config, index, &e, l)))?;
                        let slot = Arc::new(crate::io::tls::ServerSlot::new(cfg));
                        tls_slots.push((index, slot.clone()));
                        Some(slot)
                    }
                    false => None,
                };
                let listener =
                    TcpListener::bind(l.addr())
                        .await
                        .map_err(|source| ServerError::Bind {
                            kind: kind.name(),
                            addr: l.addr(),
                            source,
                        })?;
                let addr = listener.local_addr().unwrap_or(l.addr());
                let over = match kind {
                    ListenerKind::Mqtts => " over TLS",
                    ListenerKind::Ws => " over WebSocket",
                    ListenerKind::Wss => " over WebSocket and TLS",
                    _ => "",
                };
                tracing::info!(kind = kind.name(), %addr, "listening for MQTT 3.1, 3.1.1 and 5.0{over} on {addr}");
                let front = mqtt_listener::Front {
                    allow_anonymous: l.allows_anonymous(),
                    tls,
                    websocket: matches!(kind, ListenerKind::Ws | ListenerKind::Wss),
                    identity_as_username: l.identity_is_username(),
                    mount: l.mount_point.clone().map(MountPoint::new),
                };
                if front.identity_as_username {
                    tracing::info!(%addr, "the client certificate's Common Name is the user name on {addr}");
                } else if !front.allow_anonymous {
                    tracing::info!(%addr, "clients without a user name are refused on {addr}");
                }
                accept_tasks.push(tokio::spawn(mqtt_listener::serve(
                    listener,
                    shared.clone(),
                    Arc::new(front),
                    stop_rx.clone(),
                )));
            }
        }
    }
    for (i, port) in config.serial.iter().enumerate() {
        if port.wire().is_none() {
            // Started above: the config made it an `mqtt-sn-serial` listener.
            continue;
        }
        accept_tasks.push(tokio::spawn(serial::run(
            port.clone(),
            gateway.clone(),
            LOCAL_CONN_BASE + i as u64,
            hub_tx.clone(),
            board.clone(),
            stop_rx.clone(),
        )));
    }
    if !config.gpio.input.is_empty() || !config.gpio.output.is_empty() {
        let pins = gpio::open(&config.gpio).map_err(ServerError::Gpio)?;
        accept_tasks.push(tokio::spawn(gpio::run(
            pins,
            LOCAL_CONN_BASE + GPIO_CONN_OFFSET,
            hub_tx.clone(),
            board.clone(),
            stop_rx.clone(),
        )));
    }
    let mode = match &config.uplink {
        Some(u) => format!("uplink {}", u.url),
        None => {
            tracing::info!("no uplink configured: running local-only");
            "local-only".to_owned()
        }
    };
    let control_path = config.control_socket();
    let control = control::bind(&control_path).map_err(|source| ServerError::Control {
        path: control_path.clone(),
        source,
    })?;
    tracing::info!(path = %control_path.display(), "control socket for `outpost status`");
    accept_tasks.push(tokio::spawn(control::serve(
        control,
        control_path,
        hub_tx.clone(),
        Some(store.clone()),
        stop_rx.clone(),
    )));
    if !config.gateway.sys_interval.0.is_zero() {
        accept_tasks.push(tokio::spawn(hub_task::sys_ticker(
            config.gateway.sys_interval.0,
            Some(store.clone()),
            hub_tx.clone(),
            stop_rx.clone(),
        )));
    }
    let up = format!("{} listener(s) up; {mode}", config.listeners.len());
    tracing::info!("ready: {up}");
    systemd::ready(&up);

    let watchdog = systemd::watchdog_interval().map(|every| {
        let hub = hub_tx.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                // Pet the watchdog only while the hub still takes input: a wedged hub gets
                // us restarted.
                if hub.capacity() > 0 || hub.is_closed() {
                    systemd::watchdog();
                }
            }
        })
    });

    let mut running = config.clone();
    loop {
        tokio::select! {
            _ = term.recv() => {
                tracing::info!("SIGTERM: shutting down");
                break;
            }
            _ = int.recv() => {
                tracing::info!("SIGINT: shutting down");
                break;
            }
            _ = hup.recv() => {
                systemd::reloading();
                let outcome = reload(
                    source.as_deref(),
                    &mut running,
                    started_rules.as_ref(),
                    &shared,
                    &tls_slots,
                    &hub_tx,
                )
                .await;
                match &outcome {
                    Ok(note) => tracing::info!("SIGHUP: reloaded; {note}"),
                    Err(e) => tracing::error!("SIGHUP: reload refused, the running configuration stays: {e}"),
                }
                systemd::ready(&match outcome {
                    Ok(_) => "reloaded".to_owned(),
                    Err(e) => format!("reload refused: {e}"),
                });
            }
        }
    }
    systemd::stopping();
    let _ = stop_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    if let Some(u) = uplink_handle {
        // It sends DISCONNECT (keeping the upstream session) and its last state.
        let _ = tokio::time::timeout(Duration::from_secs(3), u).await;
    }
    let (done_tx, done_rx) = oneshot::channel();
    if hub_tx.send(HubMsg::Shutdown(done_tx)).await.is_ok() {
        let _ = tokio::time::timeout(SHUTDOWN_GRACE + Duration::from_secs(1), done_rx).await;
    }
    if let Some(w) = watchdog {
        w.abort();
    }
    drop(hub_tx);
    drop(shared);
    hub_handle.abort();
    let _ = hub_handle.await;
    // The hub (and its link to the store) is gone: closing the store commits what is queued.
    match Arc::try_unwrap(store) {
        Ok(s) => s.close(),
        Err(_) => tracing::warn!("store still in use at shutdown; its writer stops on exit"),
    }
    tracing::info!("stopped");
    Ok(())
}

/// The bridge rules the uplink was started with, which a reload can only partly change.
struct StartedRules {
    /// The outbox classes the uplink drains.
    priorities: std::collections::BTreeSet<u8>,
    ins: Vec<crate::bridge::rules::InRule>,
}

/// Reads the config file again and applies what can change while running: the password and
/// ACL files, the TLS listeners' certificates, and the uplink's `[[out]]` rules. Everything is
/// loaded and checked before anything is applied, so a broken file changes nothing. Settings
/// that need sockets or devices reopened are named in the result as waiting for a restart.
async fn reload(
    source: Option<&std::path::Path>,
    running: &mut Config,
    started: Option<&StartedRules>,
    shared: &ListenerShared,
    tls_slots: &[(usize, Arc<crate::io::tls::ServerSlot>)],
    hub: &mpsc::Sender<HubMsg>,
) -> Result<String, String> {
    let Some(path) = source else {
        return Err("running on embedded defaults: there is no file to reload".into());
    };
    let new = Config::load(path).map_err(|e| e.to_string())?;
    let auth = load_auth(&new)?;
    // Certificates are read again from the files the listeners were started with (renewed in
    // place); a listener that names other files waits for a restart like any listener change.
    let mut certs = Vec::new();
    for (index, slot) in tls_slots {
        let Some(l) = running.listeners.get(*index) else {
            continue;
        };
        let cfg = crate::io::tls::server_config(l).map_err(|e| tls_place(&new, *index, &e, l))?;
        certs.push((slot, cfg));
    }
    let gateway = new.gateway_id();
    let rules = match &new.uplink {
        Some(u) => Some(
            Rules::load_dir(&u.rules_dir, &gateway)
                .map_err(|e| format!("bridge rules in {}: {e}", u.rules_dir.display()))?,
        ),
        None => None,
    };
    let mut restart = Vec::new();
    let dbg = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let sections: [(&str, String, String); 8] = [
        ("[gateway]", dbg(&running.gateway), dbg(&new.gateway)),
        ("[[listener]]", dbg(&running.listeners), dbg(&new.listeners)),
        ("[limits]", dbg(&running.limits), dbg(&new.limits)),
        ("[store]", dbg(&running.store), dbg(&new.store)),
        ("[uplink]", dbg(&running.uplink), dbg(&new.uplink)),
        ("[mqttsn]", dbg(&running.mqttsn), dbg(&new.mqttsn)),
        ("[[serial]]", dbg(&running.serial), dbg(&new.serial)),
        ("[gpio]", dbg(&running.gpio), dbg(&new.gpio)),
    ];
    for (name, old, now) in sections {
        if old != now {
            restart.push(name.to_owned());
        }
    }
    // `[[out]]` rules take effect at once when they keep to the priorities the uplink drains
    // (its classes are fixed at start); `[[in]]` rules are subscriptions on the cloud session,
    // made at connect. Both are compared with what the uplink started with, kept in memory:
    // the files on disk are already the new ones.
    let mut outs = None;
    if let (Some(new_rules), Some(started)) = (&rules, started) {
        if new_rules
            .outs
            .iter()
            .all(|o| started.priorities.contains(&o.priority))
        {
            outs = Some(new_rules.outs.clone());
        } else {
            restart.push("bridge rules (a new priority)".into());
        }
        if new_rules.ins != started.ins {
            restart.push("bridge [[in]] rules".into());
        }
    }
    if let Ok(mut p) = shared.passwords.write() {
        *p = auth.passwords.clone();
    }
    let tls_listeners = certs.len();
    for (slot, cfg) in certs {
        slot.swap(cfg);
    }
    let acl_rules = auth.acl.as_ref().map_or(0, |a| a.len());
    let users = auth.passwords.as_ref().map_or(0, |p| p.len());
    let out_rules = outs.as_ref().map(Vec::len);
    hub.send(HubMsg::Reconfigure {
        acl: auth.acl,
        outs,
    })
    .await
    .map_err(|_| "the hub has stopped".to_owned())?;
    running.auth = new.auth.clone();
    let mut note = format!("{users} users, {acl_rules} ACL rules");
    if let Some(n) = out_rules {
        note += &format!(", {n} out rules");
    }
    if tls_listeners > 0 {
        note += &format!(", certificates of {tls_listeners} TLS listeners");
    }
    if !restart.is_empty() {
        tracing::warn!(changed = %restart.join(", "), "these changes take effect at the next restart");
        note += &format!("; waiting for a restart: {}", restart.join(", "));
    }
    Ok(note)
}
