//! sd-notify: READY=1 once listeners are bound (and after each reload, which RELOADING=1 opens),
//! STATUS= lines, WATCHDOG=1 while the hub answers,
//! STOPPING=1 on shutdown. Every call is a no-op when NOTIFY_SOCKET is unset.

use std::time::Duration;

use sd_notify::NotifyState;

/// Tells systemd we are ready, with a status line.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// Updates the status line `systemctl status` shows.
pub fn status(status: &str) {
    notify(&[NotifyState::Status(status)]);
}

/// Tells systemd a reload has begun (`Type=notify-reload` and `ExecReload=` both expect READY=1
/// again when it is done), stamped with CLOCK_MONOTONIC as systemd asks.
pub fn reloading() {
    let mut states = vec![NotifyState::Reloading, NotifyState::Status("reloading")];
    if let Ok(stamp) = NotifyState::monotonic_usec_now() {
        states.push(stamp);
    }
    notify(&states);
}

/// Tells systemd we are stopping.
pub fn stopping() {
    notify(&[NotifyState::Stopping, NotifyState::Status("stopping")]);
}

/// Pets the watchdog.
pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// How often to pet the watchdog, when WatchdogSec= is set: half the timeout, as systemd advises.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    if sd_notify::watchdog_enabled(false, &mut usec) && usec > 0 {
        Some(Duration::from_micros(usec / 2))
    } else {
        None
    }
}

fn notify(states: &[NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(false, states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}
