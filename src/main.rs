//! The `outpost` command: `run`, `check` and `passwd`. The only place that uses `anyhow`.

use std::fmt::Write as _;
use std::io::Write as _;
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
    /// Show what a running outpost is doing: the uplink, the backlog, clients, ports and pins.
    /// Reads the daemon's control socket (from the config, or --socket).
    Status {
        /// Path to outpost.toml (to find the socket).
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// The control socket, overriding the config.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Print the whole report as JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Create or update USER in a password file (mosquitto's format: mosquitto reads it, and
    /// files from mosquitto_passwd work here). Prompts for the password on a terminal; reads
    /// one line from stdin otherwise.
    Passwd {
        /// The password file; created if missing.
        file: PathBuf,
        /// The user name.
        user: String,
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
        Command::Status {
            config,
            socket,
            json,
        } => status(config, socket, json),
        Command::Passwd { file, user } => passwd(&file, &user),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Not eprintln!: a closed stderr must not turn an error into a panic.
            let _ = writeln!(std::io::stderr(), "outpost: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(path: Option<PathBuf>) -> anyhow::Result<()> {
    let config = load(path.clone())?;
    let sink = outpost::telemetry::init();
    tracing::debug!(sink, "logging initialised");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    rt.block_on(outpost::server::run(config, path))?;
    // Connection tasks still parked on sockets must not hold up exit.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    Ok(())
}

fn status(config: Option<PathBuf>, socket: Option<PathBuf>, json: bool) -> anyhow::Result<()> {
    let path = match socket {
        Some(s) => s,
        None => load(config)?.control_socket(),
    };
    let report = outpost::io::control::request_status(&path).with_context(|| {
        format!(
            "cannot read the status from {} (is outpost running, and may you open its socket?)",
            path.display()
        )
    })?;
    if json {
        emit(&format!("{}\n", serde_json::to_string_pretty(&report)?))?;
    } else {
        emit(&outpost::status::human(&report))?;
    }
    Ok(())
}

fn passwd(file: &std::path::Path, user: &str) -> anyhow::Result<()> {
    use std::io::{BufRead, IsTerminal, Write};
    if user.is_empty() || user.contains(':') {
        anyhow::bail!("a user name must be non-empty and free of ':'");
    }
    let text = match std::fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", file.display())),
    };
    // Refuse to rewrite a file we cannot read back: it would lose its other entries.
    outpost::auth::Passwords::parse(&text)
        .map_err(|(line, m)| anyhow::anyhow!("{}:{line}: {m}", file.display()))?;
    let read_line = |prompt: &str| -> anyhow::Result<String> {
        let tty = std::io::stdin().is_terminal();
        if tty {
            eprint!("{prompt}");
            std::io::stderr().flush()?;
            // No echo while typing; stty is on every Debian system.
            let _ = std::process::Command::new("stty").arg("-echo").status();
        }
        let mut line = String::new();
        let r = std::io::stdin().lock().read_line(&mut line);
        if tty {
            let _ = std::process::Command::new("stty").arg("echo").status();
            eprintln!();
        }
        r.context("cannot read the password")?;
        Ok(line.trim_end_matches(['\r', '\n']).to_owned())
    };
    let password = read_line("Password: ")?;
    if std::io::stdin().is_terminal() && read_line("Reenter password: ")? != password {
        anyhow::bail!("the passwords do not match");
    }
    if password.is_empty() {
        anyhow::bail!("an empty password is not allowed");
    }
    let rng = ring::rand::SystemRandom::new();
    let entry = outpost::auth::passwd::hash_entry(password.as_bytes(), &rng)?;
    let new = outpost::auth::passwd::set_user(&text, user, &entry);
    // Write beside and rename, so a crash leaves the old file or the new one, never half.
    let tmp = file.with_extension("outpost-tmp");
    std::fs::write(&tmp, new).with_context(|| format!("cannot write {}", tmp.display()))?;
    {
        use std::os::unix::fs::{MetadataExt, PermissionsExt};
        // Keep the old file's owner and group (root:outpost as the package makes it), or the
        // daemon could no longer read a file root rewrote. Only root may give a file away.
        if let Ok(old) = std::fs::metadata(file) {
            let mode = old.mode() & 0o777;
            let _ = std::os::unix::fs::chown(&tmp, Some(old.uid()), Some(old.gid()));
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode));
        } else {
            let _ = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o640));
        }
    }
    std::fs::rename(&tmp, file).with_context(|| format!("cannot replace {}", file.display()))?;
    eprintln!("{user}: password set in {}", file.display());
    Ok(())
}

/// Loads everything a start would (the config, the files it names, TLS, bridge rules) and only
/// then prints what would run, with "configuration OK" last: an error is never preceded by OK.
fn check(config: Option<PathBuf>) -> anyhow::Result<()> {
    let source = config
        .as_ref()
        .map_or("embedded defaults".to_owned(), |p| p.display().to_string());
    let c = load(config)?;
    let mut out = String::new();
    describe(&c, &mut out)?;
    writeln!(out, "configuration OK ({source})")?;
    emit(&out)
}

/// Writes `text` to stdout. A reader that went away (`outpost check | head`) ends the output
/// quietly: that is not an error, and never a panic.
fn emit(text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}

/// What `check` prints, loading every file on the way.
fn describe(c: &Config, out: &mut String) -> anyhow::Result<()> {
    use outpost::config::spans::Step::Key;
    writeln!(out, "gateway id:   {}", c.gateway_id())?;
    writeln!(out, "data dir:     {}", c.data_dir().display())?;
    for (index, l) in c.listeners.iter().enumerate() {
        let anonymous = match l.kind {
            outpost::config::ListenerKind::MqttSnSerial => "",
            _ if l.identity_is_username() => " (client certificate is the login)",
            _ if l.allows_anonymous() => " (anonymous allowed)",
            _ => " (log in required)",
        };
        writeln!(
            out,
            "listener:     {} on {}{anonymous}",
            l.kind.name(),
            l.place()
        )?;
        if l.kind.is_tls() {
            outpost::io::tls::server_config(l)
                .map_err(|e| anyhow::anyhow!(outpost::server::tls_place(c, index, &e, l)))?;
            let cert = l.cert_file.as_deref().unwrap_or(std::path::Path::new(""));
            let mutual = match (&l.client_ca, l.require_certificate) {
                (None, _) => String::new(),
                (Some(ca), Some(false)) => {
                    format!(", client certificates optional ({})", ca.display())
                }
                (Some(ca), _) => format!(", client certificates required ({})", ca.display()),
            };
            writeln!(out, "  tls:        {}{mutual}", cert.display())?;
        }
        if let Some(m) = &l.mount_point {
            writeln!(out, "  mount_point: {m:?}")?;
        }
    }
    let sn_used = c.listeners.iter().any(|l| {
        matches!(
            l.kind,
            outpost::config::ListenerKind::MqttSn | outpost::config::ListenerKind::MqttSnSerial
        )
    });
    if sn_used {
        let sn = &c.mqttsn;
        let nets: Vec<String> = sn
            .qos_minus_one_from
            .iter()
            .map(|n| format!("{}/{}", n.addr, n.prefix))
            .collect();
        writeln!(
            out,
            "mqtt-sn:      gateway_id={} predefined={} qos_minus_one_from=[{}] retry={}x{} advertise={} max_clients={}",
            sn.gateway_id,
            sn.predefined.len(),
            nets.join(", "),
            sn.retry.count,
            sn.retry.interval,
            sn.advertise
                .as_ref()
                .map_or("off".to_owned(), |a| format!("{} every {}", a.address, a.interval)),
            sn.max_clients
        )?;
        for p in &sn.predefined {
            writeln!(
                out,
                "  predefined {} = {}{}",
                p.id,
                p.topic,
                p.client
                    .as_ref()
                    .map_or(String::new(), |c| format!(" (client {c})"))
            )?;
        }
    }
    // `framing = "mqtt-sn"` ports are listed above, as the listeners they became.
    for p in c.serial.iter().filter(|p| p.wire().is_some()) {
        writeln!(
            out,
            "serial:       {} {} at {} baud {}{}{}: {:?} framing, {:?} decoder -> {} qos={} retain={}{}",
            p.name,
            p.device.display(),
            p.baud,
            p.data_bits,
            match p.parity {
                outpost::config::Parity::None => "N",
                outpost::config::Parity::Odd => "O",
                outpost::config::Parity::Even => "E",
            },
            p.stop_bits,
            p.framing,
            p.decode,
            p.topic_template(),
            p.qos,
            p.retain,
            p.write_topic
                .as_ref()
                .map_or(String::new(), |w| format!(", writes from {w}"))
        )?;
    }
    let g = &c.gpio;
    if !g.input.is_empty() || !g.output.is_empty() {
        writeln!(out, "gpio:         {:?} backend", g.backend)?;
        for i in &g.input {
            writeln!(
                out,
                "  input  {}:{} {:?} edge={:?} bias={:?} debounce={} -> {} qos={}{}",
                i.chip,
                i.line,
                i.mode,
                i.edge,
                i.bias,
                i.debounce,
                i.topic,
                i.qos,
                if i.mode == outpost::config::InputMode::Counter {
                    format!(" every {}", i.interval)
                } else {
                    String::new()
                }
            )?;
        }
        for o in &g.output {
            writeln!(
                out,
                "  output {}:{} <- {} initial={:?}{}",
                o.chip,
                o.line,
                o.topic,
                o.initial,
                o.state_topic
                    .as_ref()
                    .map_or(String::new(), |s| format!(" state -> {s}"))
            )?;
        }
    }
    let auth = outpost::server::load_auth(c).map_err(anyhow::Error::msg)?;
    if let (Some(p), Some(pw)) = (&c.auth.password_file, &auth.passwords) {
        writeln!(out, "auth:         {} ({} users)", p.display(), pw.len())?;
    }
    if let (Some(p), Some(acl)) = (&c.auth.acl_file, &auth.acl) {
        writeln!(out, "acl:          {} ({} rules)", p.display(), acl.len())?;
    }
    let l = &c.limits;
    writeln!(
        out,
        "limits:       max_connections={} max_packet_size={} max_inflight={} max_queued={} connect_timeout={} max_keepalive={} topic_alias_maximum={}",
        l.max_connections, l.max_packet_size, l.max_inflight, l.max_queued, l.connect_timeout, l.max_keepalive, l.topic_alias_maximum
    )?;
    let Some(u) = &c.uplink else {
        writeln!(out, "uplink:       none (local-only)")?;
        return Ok(());
    };
    let gateway = c.gateway_id();
    writeln!(
        out,
        "uplink:       {} as {:?} (MQTT {}), keepalive={} session_expiry={} max_inflight={} backoff={}..{}",
        u.url,
        u.client_id.replace("{gateway_id}", &gateway),
        match u.protocol {
            outpost::config::Protocol::V5 => "5",
            outpost::config::Protocol::V311 => "3.1.1",
        },
        u.keepalive,
        u.session_expiry,
        u.max_inflight,
        u.backoff.min,
        u.backoff.max
    )?;
    if u.url().scheme.tls() {
        // Load the files now, so a bad certificate is found here and not at 3 a.m.
        outpost::io::tls::Connector::new(u, &u.url()).map_err(|e| {
            anyhow::anyhow!("{}uplink TLS: {e}", c.place(&[Key("uplink"), Key(e.key)]))
        })?;
        writeln!(
            out,
            "tls:          files load ({})",
            u.ca_file
                .as_ref()
                .map_or("system roots".into(), |p| p.display().to_string())
        )?;
    }
    let rules =
        outpost::bridge::rules::Rules::load_dir(&u.rules_dir, &gateway).with_context(|| {
            format!(
                "{}bridge rules in {}",
                c.place(&[Key("uplink"), Key("rules_dir")]),
                u.rules_dir.display()
            )
        })?;
    writeln!(
        out,
        "rules:        {} ({} out, {} in)",
        u.rules_dir.display(),
        rules.outs.len(),
        rules.ins.len()
    )?;
    if rules.outs.is_empty() {
        writeln!(
            out,
            "warning:      no [[out]] rules in {}: nothing local goes to the cloud",
            u.rules_dir.display()
        )?;
    }
    for r in &rules.outs {
        writeln!(
            out,
            "  out  {:<24} {}{{rest}} -> {}{{rest}}  qos={} priority={} retain={}{}  ({})",
            r.filter,
            r.local_prefix,
            r.remote_prefix,
            r.qos as u8,
            r.priority,
            r.retain,
            if r.buffer { " buffer" } else { "" },
            r.origin
        )?;
    }
    for r in &rules.ins {
        writeln!(
            out,
            "  in   {:<24} {}{{rest}} -> {}{{rest}}  qos={}  ({})",
            r.filter, r.remote_prefix, r.local_prefix, r.qos as u8, r.origin
        )?;
    }
    Ok(())
}
