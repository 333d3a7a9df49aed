//! The `actrix` binary: `run`, `check` and `tune`.

use actrix::config::{self, Config, LogFormat, Resolved, Rotation};
use actrix::plane::Plane;
use actrix_dataplane::{DataPlane, IdentityLinks};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "actrix",
    version,
    about = "STUN/TURN relay appliance for WebRTC"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the appliance (without -c: the embedded loopback configuration with a demo user).
    Run {
        #[arg(short, long)]
        config: Option<PathBuf>,
    },
    /// Validate a configuration file; list every error and exit non-zero if there is one.
    Check {
        #[arg(short, long)]
        config: PathBuf,
    },
    /// List the node's allocations (user, client, transport, relayed address, age, bytes).
    Sessions {
        #[command(flatten)]
        node: NodeArgs,
        /// Only this user's allocations.
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Per-user counters: allocations and relayed bytes of the users with the most allocations.
    Users {
        #[command(flatten)]
        node: NodeArgs,
        /// At most this many users.
        #[arg(long, default_value_t = 20)]
        top: usize,
        #[arg(long)]
        json: bool,
    },
    /// End allocations: every one of a user, or one by its id (from `actrix sessions`).
    Disconnect {
        #[command(flatten)]
        node: NodeArgs,
        #[arg(
            long,
            conflicts_with = "allocation",
            required_unless_present = "allocation"
        )]
        user: Option<String>,
        #[arg(long)]
        allocation: Option<String>,
    },
    /// New allocations go to turn.alternate_servers (or get 508); existing ones keep working.
    Drain {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// End an operator's drain.
    Undrain {
        #[command(flatten)]
        node: NodeArgs,
    },
    /// Observe the host and plan core pinning, IRQ affinity and sysctls.
    Tune(actrix_tuning::TuneArgs),
    /// Make a self-signed certificate and key for trying TURN over TLS and DTLS (clients must
    /// be told to trust it: for testing only, never for production).
    Cert {
        /// Required: say that a self-signed certificate is what you want.
        #[arg(long)]
        self_signed: bool,
        /// Names (DNS names or IP addresses) the certificate is for.
        #[arg(long = "name", default_values_t = ["localhost".to_string(), "127.0.0.1".to_string()])]
        names: Vec<String>,
        #[arg(long, default_value = "actrix-selfsigned.pem")]
        cert: PathBuf,
        #[arg(long, default_value = "actrix-selfsigned.key")]
        key: PathBuf,
    },
}

/// Which node an admin command talks to: the configuration file it runs with gives the HTTP
/// address and the shared key the admin API is signed with.
#[derive(clap::Args)]
struct NodeArgs {
    #[arg(short, long, default_value = "/etc/actrix/actrix.toml")]
    config: PathBuf,
    /// The node's HTTP base URL, when not the one the configuration listens on.
    #[arg(long)]
    url: Option<String>,
}

fn admin_call(node: &NodeArgs, path: &str, payload: &str, body: &str) -> Result<String, i32> {
    let client =
        actrix::admin::Client::from_config(&node.config, node.url.as_deref()).map_err(|e| {
            eprintln!("actrix: {e}");
            2
        })?;
    match client.post(path, payload, body) {
        Ok((200, text)) => Ok(text),
        Ok((status, text)) => {
            eprintln!("actrix: {path}: HTTP {status}: {text}");
            Err(1)
        }
        Err(e) => {
            eprintln!("actrix: {e}");
            Err(1)
        }
    }
}

fn admin_command(cmd: Cmd) -> i32 {
    let out = match &cmd {
        Cmd::Sessions { node, user, json } => {
            admin_call(node, "/admin/sessions", "admin_sessions", "").map(|text| {
                let mut v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
                if let Some(u) = user {
                    v.retain(|s| s["user"].as_str() == Some(u));
                }
                if *json {
                    serde_json::Value::Array(v).to_string()
                } else {
                    actrix::admin::sessions_table(&v)
                }
            })
        }
        Cmd::Users { node, top, json } => admin_call(node, "/admin/sessions", "admin_sessions", "")
            .map(|text| {
                let v: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap_or_default();
                let users = actrix::admin::per_user(&v, *top);
                if *json {
                    serde_json::Value::Array(users).to_string()
                } else {
                    actrix::admin::users_table(&users)
                }
            }),
        Cmd::Disconnect {
            node,
            user,
            allocation,
        } => {
            let body = match (user, allocation) {
                (Some(u), _) => format!("user={u}"),
                (_, Some(a)) => format!("allocation={a}"),
                _ => unreachable!("clap requires one"),
            };
            admin_call(
                node,
                "/admin/disconnect",
                &format!("admin_disconnect:{body}"),
                &body,
            )
        }
        Cmd::Drain { node } => admin_call(node, "/admin/drain", "admin_drain", ""),
        Cmd::Undrain { node } => admin_call(node, "/admin/undrain", "admin_undrain", ""),
        _ => unreachable!("admin commands only"),
    };
    match out {
        Ok(text) => {
            println!("{}", text.trim_end());
            0
        }
        Err(code) => code,
    }
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        c @ (Cmd::Sessions { .. }
        | Cmd::Users { .. }
        | Cmd::Disconnect { .. }
        | Cmd::Drain { .. }
        | Cmd::Undrain { .. }) => admin_command(c),
        Cmd::Check { config } => check(&config),
        Cmd::Run { config } => run(config),
        Cmd::Cert {
            self_signed,
            names,
            cert,
            key,
        } => {
            if !self_signed {
                eprintln!("actrix cert: only --self-signed certificates are made here; use your CA for production");
                2
            } else {
                match actrix::tls::write_self_signed(&names, &cert, &key) {
                    Ok(()) => {
                        println!(
                            "wrote a SELF-SIGNED certificate for {} to {} and its key to {} (for testing only)",
                            names.join(", "),
                            cert.display(),
                            key.display()
                        );
                        println!("use them with: [stun] listen_tls = [\"127.0.0.1:5349\"], tls_cert = \"{}\", tls_key = \"{}\"", cert.display(), key.display());
                        0
                    }
                    Err(e) => {
                        eprintln!("actrix cert: {e}");
                        1
                    }
                }
            }
        }
        Cmd::Tune(args) => match actrix_tuning::run_cli(args) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("actrix tune: {e:#}");
                2
            }
        },
    };
    std::process::exit(code);
}

fn print_errors(errors: &[String]) {
    eprintln!("configuration has {} error(s):", errors.len());
    for e in errors {
        eprintln!("  - {e}");
    }
}

fn check(path: &std::path::Path) -> i32 {
    match config::load(Some(path)) {
        Ok((_, r)) => {
            // The service runs under its own limits (the systemd unit raises RLIMIT_MEMLOCK);
            // this checks the ones of the shell `check` runs in.
            if let Some(e) = actrix_dataplane::memlock_problem(&r.io) {
                print_errors(&[format!("{e} (checked in this shell)")]);
                return 1;
            }
            println!(
                "{}: ok ({} shard(s) on cores {:?}, control on {:?}, listeners {:?})",
                path.display(),
                r.shard_cores.len(),
                r.shard_cores,
                r.control_core,
                r.listen
            );
            0
        }
        Err(errors) => {
            print_errors(&errors);
            1
        }
    }
}

type LogHandle =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

fn log_filter(level: &str) -> tracing_subscriber::EnvFilter {
    let mut filter = std::env::var("ACTRIX_LOG").unwrap_or_else(|_| level.to_string());
    // The DTLS engine logs through `log` per discarded datagram (at debug) and per full
    // transmit queue (at warn): never per packet here, only its errors.
    if !filter.contains("dimpl") {
        filter.push_str(",dimpl=error");
    }
    tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into())
}

/// Logging to stderr, or to a rotated file through a background writer (log lines are never
/// written from a shard's hot path; warnings there are rate limited).
fn init_logging(
    cfg: &Config,
) -> Result<
    (
        LogHandle,
        Option<tracing_appender::non_blocking::WorkerGuard>,
    ),
    String,
> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let (filter, handle) = tracing_subscriber::reload::Layer::new(log_filter(&cfg.log.level));
    let registry = tracing_subscriber::registry().with(filter);
    if cfg.log.file.is_empty() {
        let fmt = tracing_subscriber::fmt::layer()
            .with_ansi(std::io::stderr().is_terminal())
            .with_writer(std::io::stderr);
        if cfg.log.format.or(LogFormat::Text) == LogFormat::Json {
            registry.with(fmt.json()).init();
        } else {
            registry.with(fmt).init();
        }
        return Ok((handle, None));
    }
    let path = std::path::Path::new(&cfg.log.file);
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."));
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("actrix.log");
    let rotation = match cfg.log.rotation.or(Rotation::Daily) {
        Rotation::Hourly => tracing_appender::rolling::Rotation::HOURLY,
        Rotation::Never => tracing_appender::rolling::Rotation::NEVER,
        Rotation::Daily => tracing_appender::rolling::Rotation::DAILY,
    };
    let appender = tracing_appender::rolling::Builder::new()
        .rotation(rotation)
        .filename_prefix(name)
        .max_log_files(cfg.log.keep.max(1))
        .build(dir)
        .map_err(|e| format!("log.file: {e}"))?;
    let (writer, guard) = tracing_appender::non_blocking(appender);
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(false)
        .with_writer(writer);
    if cfg.log.format.or(LogFormat::Text) == LogFormat::Json {
        registry.with(fmt.json()).init();
    } else {
        registry.with(fmt).init();
    }
    Ok((handle, Some(guard)))
}

fn run(path: Option<PathBuf>) -> i32 {
    let embedded = path.is_none();
    let (mut cfg, resolved): (Config, Resolved) = match config::load(path.as_deref()) {
        Ok(v) => v,
        Err(errors) => {
            print_errors(&errors);
            return 1;
        }
    };
    let (log_handle, _log_guard) = match init_logging(&cfg) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("actrix: {e}");
            return 1;
        }
    };
    let _pid_file = match actrix::privileges::PidFile::create(&cfg.node.pid_file) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("actrix: node.pid_file {}: {e}", cfg.node.pid_file);
            return 1;
        }
    };
    let mut demo = None;
    if embedded {
        // The embedded configuration has a demo user with a password made fresh at each start.
        let password: String = {
            use rand::Rng;
            let mut r = rand::thread_rng();
            (0..20)
                .map(|_| r.sample(rand::distributions::Alphanumeric) as char)
                .collect()
        };
        cfg.turn.users.push(config::StaticUser {
            name: "demo".into(),
            password: password.clone(),
        });
        demo = Some(password);
    }

    // Descriptors: the control listener gets what the data plane's reserve leaves (see
    // actrix::limits), so no connection flood can starve relay sockets.
    let nofile = actrix::limits::raise_nofile();
    let fds = actrix::limits::plan(&cfg, &resolved, nofile, actrix::limits::open_descriptors());
    if fds.short {
        tracing::warn!(
            limit = fds.limit,
            data_plane = fds.data_plane,
            "RLIMIT_NOFILE cannot hold the data plane's reserve (turn.max_allocations relay \
             sockets, stun.max_connections stream connections and the shards' own) plus the \
             control plane: raise LimitNOFILE or lower turn.max_allocations or \
             stun.max_connections; the control listener gets {} connections",
            fds.control_connections
        );
    }
    tracing::info!(
        limit = fds.limit,
        open = fds.open,
        data_plane = fds.data_plane,
        control_connections = fds.control_connections,
        "descriptor budget"
    );

    // Control thread first: the data plane may need it to resolve identity credentials.
    let mut control_cfg = cfg.control();
    if let Err(e) = std::fs::create_dir_all(&control_cfg.data_dir) {
        eprintln!(
            "cannot create data directory {}: {e}",
            control_cfg.data_dir.display()
        );
        return 1;
    }
    match control_cfg.resolve_secrets() {
        Ok(notes) => {
            for n in notes {
                tracing::info!("{n}");
            }
        }
        Err(e) => {
            eprintln!("actrix: {e}");
            return 1;
        }
    }
    // Without configured REST secrets the control plane generated one for actr 0.4 TURN
    // credentials; TURN must verify with it too (here and on every reload).
    let generated_turn_secret = cfg
        .turn
        .rest_secrets
        .is_empty()
        .then(|| {
            control_cfg
                .turn_rest_secret
                .as_ref()
                .map(|s| s.expose().to_owned())
        })
        .flatten();
    cfg.turn.rest_secrets.extend(generated_turn_secret.clone());
    let shards = resolved.shard_cores.len().max(1);
    let stats = DataPlane::new_stats(shards);
    let (diag, diag_handle) = actrix::diag::router_with_handle(diag_options(&cfg, &resolved));
    let http_stats = actrix_control::http_stats::HttpStats::new();
    let signaling_on = cfg.services.signaling_enabled();
    let signaling_stats =
        signaling_on.then(|| Arc::new(actrix_signaling::SignalingStats::default()));
    let identity_stats = Arc::new(actrix_control::IdentityStats::default());
    let registry = Arc::new(actrix::metrics::registry(
        stats.clone(),
        http_stats.clone(),
        signaling_stats.clone(),
        Some(identity_stats.clone()),
    ));

    let (events_tx, events_rx) = crossbeam_channel::unbounded::<Event>();
    let reload_tx = events_tx.clone();
    let health = actrix::admin::Health::new(cfg.turn.redirect_above_allocations);
    let health_routes = health.clone();
    let (admin_tx, admin_rx) = crossbeam_channel::unbounded();
    {
        // Admin requests wake the main thread like the other events.
        let events = events_tx.clone();
        std::thread::Builder::new()
            .name("actrix-admin".into())
            .spawn(move || {
                for r in admin_rx {
                    if events.send(Event::Admin(r)).is_err() {
                        break;
                    }
                }
            })
            .ok();
    }
    // The signaling hub is built inside the control thread's route factory; a failure there
    // (its database cannot be opened, say) is reported back here and stops the start.
    let signaling_error = Arc::new(std::sync::Mutex::new(None::<String>));
    let signaling_err = signaling_error.clone();
    let signaling_handle = Arc::new(std::sync::Mutex::new(
        None::<actrix_signaling::SignalingHandle>,
    ));
    let signaling_handle_out = signaling_handle.clone();
    let ais_service = Arc::new(std::sync::Mutex::new(
        None::<Arc<actrix_control::ais::AisService>>,
    ));
    let ais_service_out = ais_service.clone();
    let signaling_cfg = cfg.signaling.clone();
    let cluster_cfg = cfg.cluster.clone();
    let node_id = cfg.node.id.clone();
    let data_dir = cfg.node.data_dir.clone();
    // Identity credentials: shards ask the control thread by message and read its answers from
    // a channel of their own.
    let mut builder = actrix_control::ControlBuilder::new(control_cfg);
    let identity = if cfg.turn.enabled && cfg.turn.identity_credentials {
        let (requests, requests_rx) = tokio::sync::mpsc::channel(actrix_control::IDENTITY_QUEUE);
        let (answers_tx, answers): (Vec<_>, Vec<_>) =
            (0..shards).map(|_| crossbeam_channel::unbounded()).unzip();
        builder = builder.identity(requests_rx, answers_tx);
        Some(IdentityLinks { requests, answers })
    } else {
        None
    };
    let control = match builder
        .pin_core(resolved.control_core.filter(|_| cfg.cores.pin))
        .max_connections(fds.control_connections)
        .routes(actrix::metrics::router(registry))
        .routes(diag)
        .http_stats(http_stats)
        .identity_stats(identity_stats)
        .routes_with(move |ctx| {
            *ais_service_out.lock().unwrap_or_else(|p| p.into_inner()) = ctx.ais.clone();
            reload_router(ctx.auth.clone(), reload_tx)
        })
        .routes_with(move |ctx| {
            actrix::admin::watch_key_server(&ctx.keys, &health_routes);
            actrix::admin::router(ctx.auth.clone(), admin_tx, health_routes)
        })
        .routes_with(move |ctx| match signaling_stats {
            Some(st) => match actrix_signaling::Signaling::new(ctx, signaling_cfg, &data_dir, st) {
                Ok(s) => {
                    *signaling_handle_out
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(s.handle());
                    if let Some(cl) = cluster_cfg {
                        if let Err(e) = s.start_cluster(cl, &node_id) {
                            *signaling_err.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some(e.to_string());
                        }
                    }
                    s.router()
                }
                Err(e) => {
                    *signaling_err.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.to_string());
                    axum::Router::new()
                }
            },
            None => axum::Router::new(),
        })
        .spawn()
    {
        Ok(c) if signaling_error.lock().map(|e| e.is_some()).unwrap_or(false) => {
            let e = signaling_error
                .lock()
                .ok()
                .and_then(|mut e| e.take())
                .unwrap_or_default();
            eprintln!("actrix: signaling failed to start: {e}");
            let _ = c.shutdown();
            return 1;
        }
        Ok(c) => c,
        Err(e) => {
            eprintln!("actrix: control plane failed to start: {e}");
            return 1;
        }
    };
    let dp = if cfg.turn.enabled {
        match Plane::start(&cfg, &resolved, identity, stats) {
            Ok(dp) => {
                health.attach(dp.shared.clone());
                Some(dp)
            }
            Err(e) => {
                eprintln!("actrix: {e:#}");
                let _ = control.shutdown();
                return 1;
            }
        }
    } else {
        None
    };
    // Memory cgroup limit: new allocations capped and refused under pressure, never an OOM
    // kill of the whole node (actrix::memory).
    if let (Some(plane), Some(cg)) = (&dp, actrix::memory::CgroupMemory::detect()) {
        actrix::memory::guard(cg, plane.shared().clone(), cfg.turn.max_allocations);
    }

    // Every privileged step is done (listeners and the HTTP port are bound, files opened):
    // switch to the configured user, handing it the data directory first.
    if !cfg.node.user.is_empty() {
        if let Some((uid, gid)) = actrix::privileges::lookup_user(&cfg.node.user) {
            let gid = actrix::privileges::lookup_group(&cfg.node.group).unwrap_or(gid);
            // SAFETY: plain syscall.
            if unsafe { libc::geteuid() } == 0 {
                if let Err(e) = actrix::privileges::chown_tree(&cfg.node.data_dir, uid, gid) {
                    tracing::warn!(error = %e, "could not hand the data directory to {}", cfg.node.user);
                }
            }
        }
        match actrix::privileges::drop_to(&cfg.node.user, &cfg.node.group) {
            Ok(Some((uid, gid))) => {
                tracing::info!(uid, gid, user = %cfg.node.user, "dropped root privileges")
            }
            Ok(None) => tracing::info!("not running as root; node.user ignored"),
            Err(e) => {
                eprintln!("actrix: cannot switch to user {}: {e}", cfg.node.user);
                if let Some(p) = dp {
                    p.dp.stop();
                }
                let _ = control.shutdown();
                return 1;
            }
        }
    }

    forward_signals(events_tx);
    let http = control.local_addr();
    tracing::info!(
        listen = ?resolved.listen,
        http = %http,
        shards = resolved.shard_cores.len(),
        cores = ?resolved.shard_cores,
        control_core = ?resolved.control_core,
        "actrix ready"
    );
    if let Some(pw) = &demo {
        println!("actrix is running on the embedded configuration (loopback only).");
        for l in &resolved.listen {
            println!("  STUN/TURN  udp://{l}   realm {}", cfg.turn.realm);
        }
        for (l, t) in &resolved.listen_streams {
            println!("  STUN/TURN  {}://{l}", t.name());
        }
        for l in &resolved.listen_dtls {
            println!("  STUN/TURN  dtls://{l}");
        }
        println!("  HTTP       http://{http}  (/healthz, /metrics, /ks, /ais, /signaling/ws)");
        println!("  demo user  demo / {pw}");
        println!("  try: turnutils_uclient -y -s -u demo -w {pw} -n 100 127.0.0.1");
        println!("Ctrl-C stops it.");
    }

    let reloader = Reloader {
        path: path.clone(),
        current: (cfg.clone(), resolved.clone()),
        log: log_handle,
        diag: diag_handle,
        signaling: signaling_handle.lock().ok().and_then(|mut h| h.take()),
        ais: ais_service.lock().ok().and_then(|mut h| h.take()),
        generated_turn_secret,
    };
    run_until_shutdown(
        dp.as_ref(),
        &control,
        reloader,
        &events_rx,
        Duration::from_secs(cfg.turn.shutdown_grace_secs),
        &health,
    );
    if let Some(p) = dp {
        p.dp.stop();
    }
    if let Err(e) = control.shutdown() {
        tracing::warn!(error = %e, "control thread did not stop cleanly");
    }
    tracing::info!("actrix stopped");
    0
}

/// What the diagnostics page (`GET /diag`) serves for this configuration.
fn diag_options(cfg: &Config, r: &Resolved) -> actrix::diag::DiagOptions {
    // Wildcard listeners are announced with the relay address clients are given.
    let public: Vec<std::net::IpAddr> = r
        .relay_v4
        .iter()
        .chain(&r.relay_v6)
        .map(|(_, advertised)| *advertised)
        .collect();
    let (stun_urls, turn_urls) = actrix::diag::ice_urls(&r.listen, &public);
    // The names a `turns:` URL may use come from the certificate itself.
    use actrix_proto::turn::Transport::Tls;
    let tls = match &cfg.stun.tls_cert {
        Some(cert) if r.listen_streams.iter().any(|(_, t)| *t == Tls) => {
            let ips: Vec<std::net::IpAddr> = r
                .listen_streams
                .iter()
                .filter(|(_, t)| *t == Tls)
                .flat_map(|(l, _)| {
                    if l.ip().is_unspecified() {
                        public.clone()
                    } else {
                        vec![l.ip()]
                    }
                })
                .collect();
            actrix::tls::certificate_names(cert, &ips).unwrap_or_else(|e| {
                tracing::warn!(error = %e, "diagnostics page: cannot read the TLS certificate's names");
                actrix::diag::TlsNames::default()
            })
        }
        _ => actrix::diag::TlsNames::default(),
    };
    let (turn_tcp_urls, turns_urls) = actrix::diag::stream_urls(&r.listen_streams, &public, &tls);
    let turn_on = |urls: Vec<String>| if cfg.turn.enabled { urls } else { Vec::new() };
    actrix::diag::DiagOptions {
        stun_urls,
        turn_urls: turn_on(turn_urls),
        turn_tcp_urls: turn_on(turn_tcp_urls),
        turns_urls: turn_on(turns_urls),
        tls,
        listeners: r
            .listen
            .iter()
            .map(|a| (actrix_proto::turn::Transport::Udp, *a))
            .chain(r.listen_streams.iter().map(|(a, t)| (*t, *a)))
            .collect(),
        rest_secret: if cfg.turn.diag_credentials {
            cfg.turn.rest_secrets.first().cloned()
        } else {
            None
        },
        credential_ttl_secs: cfg.turn.diag_credential_ttl_secs,
    }
}

/// What wakes the main thread.
enum Event {
    Signal(i32),
    /// A reload asked for over HTTP; the answer goes back on the channel.
    Reload(crossbeam_channel::Sender<Result<Vec<String>, Vec<String>>>),
    /// A session admin request (`/admin/sessions`, `/admin/disconnect`).
    Admin(actrix::admin::AdminRequest),
}

fn forward_signals(tx: crossbeam_channel::Sender<Event>) {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
    match signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(mut signals) => {
            std::thread::Builder::new()
                .name("actrix-signals".into())
                .spawn(move || {
                    for sig in signals.forever() {
                        if tx.send(Event::Signal(sig)).is_err() {
                            break;
                        }
                    }
                })
                .ok();
        }
        Err(e) => tracing::error!(error = %e, "cannot install signal handlers"),
    }
}

/// `POST /admin/reload`, signed with the shared key like the AIS admin routes (payload
/// `admin_reload`, headers `X-Actrix-Timestamp`, `X-Actrix-Nonce`, `X-Actrix-Signature`).
fn reload_router(
    auth: actrix_control::nonce_auth::NonceAuthenticator,
    tx: crossbeam_channel::Sender<Event>,
) -> axum::Router {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    axum::Router::new().route(
        "/admin/reload",
        axum::routing::post(move |headers: HeaderMap| {
            let auth = auth.clone();
            let tx = tx.clone();
            async move {
                if let Err(r) = actrix_control::ais::verify_signed_headers(
                    auth,
                    &headers,
                    "admin",
                    "admin_reload".into(),
                )
                .await
                {
                    return r;
                }
                let (rtx, rrx) = crossbeam_channel::bounded(1);
                if tx.send(Event::Reload(rtx)).is_err() {
                    return (StatusCode::SERVICE_UNAVAILABLE, "shutting down").into_response();
                }
                let answer =
                    tokio_blocking(move || rrx.recv_timeout(Duration::from_secs(10))).await;
                let json = |status: &str, key: &str, v: Vec<String>| {
                    let items: Vec<String> = v.iter().map(|e| format!("{e:?}")).collect();
                    format!(
                        "{{\"status\":\"{status}\",\"{key}\":[{}]}}",
                        items.join(",")
                    )
                };
                match answer {
                    Some(Ok(Ok(notes))) => (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        json("ok", "notes", notes),
                    )
                        .into_response(),
                    Some(Ok(Err(errors))) => (
                        StatusCode::UNPROCESSABLE_ENTITY,
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        json("refused", "errors", errors),
                    )
                        .into_response(),
                    _ => (StatusCode::SERVICE_UNAVAILABLE, "reload timed out").into_response(),
                }
            }
        }),
    )
}

/// Run a blocking closure off the control thread's event loop.
async fn tokio_blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.await.ok()
}

/// Live reload: re-read the file, validate, apply what can change without a restart.
struct Reloader {
    path: Option<PathBuf>,
    current: (Config, Resolved),
    log: LogHandle,
    diag: actrix::diag::DiagHandle,
    signaling: Option<actrix_signaling::SignalingHandle>,
    ais: Option<Arc<actrix_control::ais::AisService>>,
    generated_turn_secret: Option<String>,
}

impl Reloader {
    fn reload(
        &mut self,
        dp: Option<&Plane>,
        control: &actrix_control::ControlHandle,
    ) -> Result<Vec<String>, Vec<String>> {
        let Some(path) = &self.path else {
            return Err(vec![
                "running on the embedded configuration: nothing to reload".into(),
            ]);
        };
        let (mut cfg, r) = config::load(Some(path))?;
        if cfg.turn.rest_secrets.is_empty() {
            cfg.turn
                .rest_secrets
                .extend(self.generated_turn_secret.clone());
        }
        let mut notes = Vec::new();
        // The certificate first: a file that does not load refuses the whole reload, before
        // anything else changes. Re-reading is what a renewal (same paths) needs.
        if let (Some(cert), Some(key)) = (&cfg.http.tls_cert, &cfg.http.tls_key) {
            match control.reload_tls(cert, key) {
                Ok(true) => notes.push("http.tls: certificate reloaded".into()),
                Ok(false) => notes.push("http.tls: HTTPS takes effect after a restart".into()),
                Err(e) => return Err(vec![format!("http.tls: {e}")]),
            }
        } else if self.current.0.http.tls_cert.is_some() {
            notes.push("http.tls: removing HTTPS takes effect after a restart".into());
        }
        // The TURN-over-TLS certificate likewise: refused before anything changes.
        let stun_tls = match (&cfg.stun.tls_cert, &cfg.stun.tls_key) {
            (Some(c), Some(k)) if !cfg.stun.listen_tls.is_empty() => {
                Some(actrix::tls::server_config(c, k).map_err(|e| vec![format!("stun.tls: {e}")])?)
            }
            _ => None,
        };
        let stun_dtls = match (&cfg.stun.tls_cert, &cfg.stun.tls_key) {
            (Some(c), Some(k)) if !cfg.stun.listen_dtls.is_empty() => Some(
                actrix::tls::dtls_certificate(c, k).map_err(|e| vec![format!("stun.dtls: {e}")])?,
            ),
            _ => None,
        };
        if let Some(dp) = dp {
            notes.extend(dp.reload(
                (&self.current.0, &self.current.1),
                &cfg,
                &r,
                stun_tls,
                stun_dtls,
            ));
        }
        if cfg.log.level != self.current.0.log.level {
            match self.log.reload(log_filter(&cfg.log.level)) {
                Ok(()) => notes.push(format!("log.level: now {}", cfg.log.level)),
                Err(e) => notes.push(format!("log.level: not changed ({e})")),
            }
        }
        for (key, changed) in [
            (
                "ks",
                format!("{:?}", cfg.ks) != format!("{:?}", self.current.0.ks),
            ),
            ("ais (other than the rate limit)", {
                let mut a = cfg.ais.clone();
                a.rate_limit_burst = self.current.0.ais.rate_limit_burst;
                a.rate_limit_refill_secs = self.current.0.ais.rate_limit_refill_secs;
                format!("{a:?}") != format!("{:?}", self.current.0.ais)
            }),
            (
                "services",
                format!("{:?}", cfg.services) != format!("{:?}", self.current.0.services),
            ),
            ("http (connection limits and timeouts)", {
                let (a, b) = (&cfg.http, &self.current.0.http);
                (
                    a.max_connections,
                    a.max_connections_per_ip,
                    a.first_bytes_timeout_secs,
                    a.header_read_timeout_secs,
                ) != (
                    b.max_connections,
                    b.max_connections_per_ip,
                    b.first_bytes_timeout_secs,
                    b.header_read_timeout_secs,
                )
            }),
        ] {
            if changed {
                notes.push(format!("{key}: changed, takes effect after a restart"));
            }
        }
        let (old_ais, new_ais) = (&self.current.0.ais, &cfg.ais);
        if let Some(ais) = &self.ais {
            if (old_ais.rate_limit_burst, old_ais.rate_limit_refill_secs)
                != (new_ais.rate_limit_burst, new_ais.rate_limit_refill_secs)
            {
                ais.set_rate_limit(new_ais.rate_limit_burst, new_ais.rate_limit_refill_secs);
                notes.push("ais: rate limit updated".into());
            }
        }
        if let Some(h) = &self.signaling {
            if format!("{:?}", cfg.signaling) != format!("{:?}", self.current.0.signaling) {
                match h.update(cfg.signaling.clone()) {
                    Ok(()) => notes.push("signaling: limits updated for new connections".into()),
                    Err(e) => notes.push(format!("signaling: not changed ({})", e.join("; "))),
                }
            }
        }
        self.diag.update(diag_options(&cfg, &r));
        self.current = (cfg, r);
        Ok(notes)
    }
}

/// Serve until SIGTERM or SIGINT (SIGHUP and `/admin/reload` reload the configuration); then
/// drain: no new allocations until none is left or the grace period ends. A second signal ends
/// the drain at once.
fn run_until_shutdown(
    dp: Option<&Plane>,
    control: &actrix_control::ControlHandle,
    mut reloader: Reloader,
    events: &crossbeam_channel::Receiver<Event>,
    grace: Duration,
    health: &actrix::admin::Health,
) {
    use signal_hook::consts::SIGHUP;
    let mut load =
        actrix::admin::LoadWatch::new(reloader.current.0.turn.redirect_above_bytes_per_sec);
    let relayed = |p: &Plane| -> u64 {
        use std::sync::atomic::Ordering::Relaxed;
        p.dp.stats
            .iter()
            .map(|s| s.client_bytes.load(Relaxed) + s.peer_bytes.load(Relaxed))
            .sum()
    };
    loop {
        if let Some(p) = dp {
            load.tick(Instant::now(), relayed(p), health);
        }
        match events.recv_timeout(Duration::from_secs(1)) {
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {}
            Ok(Event::Admin(r)) => actrix::admin::serve(dp.map(|p| &p.dp), r),
            Ok(Event::Signal(SIGHUP)) => match reloader.reload(dp, control) {
                Ok(notes) => {
                    let t = &reloader.current.0.turn;
                    health.set_redirect_above_allocations(t.redirect_above_allocations);
                    load.set_limit(t.redirect_above_bytes_per_sec);
                    tracing::info!("configuration reloaded");
                    for n in notes {
                        tracing::info!("{n}");
                    }
                }
                Err(errors) => {
                    tracing::error!(
                        count = errors.len(),
                        "new configuration refused; the old one stays in force"
                    );
                    for e in errors {
                        tracing::error!("{e}");
                    }
                }
            },
            Ok(Event::Reload(reply)) => {
                let r = reloader.reload(dp, control);
                let t = &reloader.current.0.turn;
                health.set_redirect_above_allocations(t.redirect_above_allocations);
                load.set_limit(t.redirect_above_bytes_per_sec);
                match &r {
                    Ok(_) => tracing::info!("configuration reloaded (admin endpoint)"),
                    Err(e) => {
                        tracing::error!(errors = ?e, "new configuration refused; the old one stays in force")
                    }
                }
                let _ = reply.send(r);
            }
            Ok(Event::Signal(sig)) => {
                tracing::info!(signal = sig, "shutting down: no new allocations");
                break;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        }
    }
    // `/readyz` says 503 from now on, and new Allocates go to the alternates; signaling
    // clients are told to reconnect (to another node).
    health.shutting_down();
    if let Some(h) = &reloader.signaling {
        let n = h.close_all();
        tracing::info!(
            connections = n,
            "signaling connections closed (1001 Going Away)"
        );
    }
    let Some(dp) = dp.map(|p| &p.dp) else {
        return;
    };
    dp.drain();
    let deadline = Instant::now() + grace;
    loop {
        let left = dp.allocations();
        if left == 0 {
            tracing::info!("all allocations drained");
            return;
        }
        if Instant::now() >= deadline {
            tracing::info!(
                allocations = left,
                "grace period over; closing remaining allocations"
            );
            return;
        }
        let ev = events.recv_timeout(Duration::from_millis(100));
        if let Ok(Event::Admin(r)) = ev {
            actrix::admin::serve(Some(dp), r);
        } else if let Ok(Event::Signal(s)) = ev {
            if s != SIGHUP {
                tracing::info!(
                    allocations = left,
                    "second signal; closing remaining allocations"
                );
                return;
            }
        }
    }
}
