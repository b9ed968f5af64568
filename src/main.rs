//! The `outpost` command: `run` and `check`. The only place that uses `anyhow`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};

use outpost::config::Config;

/// A field gateway: embedded MQTT broker, durable store-and-forward to the cloud.
#[derive(Parser)]
#[command(name = "outpost", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway. Without --config, runs on embedded defaults (MQTT on 127.0.0.1:1883,
    /// data in ./outpost-data or $STATE_DIRECTORY, no uplink).
    Run {
        /// Path to outpost.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration and print what would run.
    Check {
        /// Path to outpost.toml.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

fn load(path: Option<PathBuf>) -> anyhow::Result<Config> {
    match path {
        Some(p) => Ok(Config::load(&p)?),
        None => Ok(Config::embedded()),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { config } => run(config),
        Command::Check { config } => check(config),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(config: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(config)?;
    let sink = outpost::telemetry::init();
    tracing::debug!(sink, "logging initialised");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(outpost::server::run(config))?;
    // Connection tasks still parked on sockets must not hold up exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

fn check(config: Option<PathBuf>) -> anyhow::Result<()> {
    let source = config
        .as_ref()
        .map_or("embedded defaults".to_owned(), |p| p.display().to_string());
    let c = load(config)?;
    println!("configuration OK ({source})");
    println!("gateway id:   {}", c.gateway_id());
    println!("data dir:     {}", c.data_dir().display());
    for l in &c.listeners {
        println!("listener:     {:?} on {}", l.kind, l.bind);
    }
    let l = &c.limits;
    println!(
        "limits:       max_connections={} max_packet_size={} max_inflight={} max_queued={} connect_timeout={} max_keepalive={} topic_alias_maximum={}",
        l.max_connections, l.max_packet_size, l.max_inflight, l.max_queued, l.connect_timeout, l.max_keepalive, l.topic_alias_maximum
    );
    println!("uplink:       none (local-only)");
    Ok(())
}
