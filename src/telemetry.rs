//! Logging setup: structured fields to the journal when systemd started us (JOURNAL_STREAM is
//! set), compact lines on stderr otherwise. `RUST_LOG` filters either way (default `info`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. Returns where logs go, for the first log line.
pub fn init() -> &'static str {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var_os("JOURNAL_STREAM").is_some() {
        if let Ok(journald) = tracing_journald::layer() {
            let ok = tracing_subscriber::registry()
                .with(filter)
                .with(journald.with_syslog_identifier("outpost".into()))
                .try_init()
                .is_ok();
            if ok {
                return "journal";
            }
            // A subscriber was already installed (tests): nothing more to do.
            return "existing subscriber";
        }
    }
    let _ = tracing_subscriber::fmt()
        .compact()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
    "stderr"
}
