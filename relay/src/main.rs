//! The `actrix` binary: `run`, `check` and `tune`.

use actrix::config::{self, Config, Resolved};
use actrix::dataplane::shard::IdentityResolver;
use actrix::dataplane::DataPlane;
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
    /// Observe the host and plan core pinning, IRQ affinity and sysctls.
    Tune(actrix_tuning::TuneArgs),
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Check { config } => check(&config),
        Cmd::Run { config } => run(config),
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

fn init_logging(cfg: &Config) {
    let filter = std::env::var("ACTRIX_LOG").unwrap_or_else(|_| cfg.log.level.clone());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter).unwrap_or_else(|_| "info".into());
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    if cfg.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Bridges shard identity requests to the control thread's bounded channel.
struct ControlResolver {
    tx: crossbeam_channel::Sender<actrix_control::IdentityQuery>,
}

impl IdentityResolver for ControlResolver {
    fn resolve(
        &self,
        username: Box<[u8]>,
        reply: Box<dyn FnOnce(actrix::auth::IdentityAnswer) + Send>,
    ) -> bool {
        let name = username.clone();
        let q = actrix_control::IdentityQuery {
            username,
            reply: Box::new(move |r| {
                let (key_md5, expires_at) = match r {
                    Ok(id) => (Some(id.key), id.expires_at),
                    Err(_) => (None, 0),
                };
                reply(actrix::auth::IdentityAnswer {
                    username: name,
                    key_md5,
                    expires_at,
                });
            }),
        };
        self.tx.try_send(q).is_ok()
    }
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
    init_logging(&cfg);
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
    let stats = DataPlane::new_stats(&resolved);
    let registry = Arc::new(actrix::metrics::registry(stats.clone()));
    let control = match actrix_control::ControlBuilder::new(control_cfg)
        .pin_core(resolved.control_core.filter(|_| cfg.cores.pin))
        .routes(actrix::metrics::router(registry))
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("actrix: control plane failed to start: {e}");
            return 1;
        }
    };
    let resolver: Option<Arc<dyn IdentityResolver>> = if cfg.turn.identity_credentials {
        Some(Arc::new(ControlResolver {
            tx: control.identity_sender(),
        }))
    } else {
        None
    };

    let dp = if cfg.turn.enabled {
        match DataPlane::start(&cfg, &resolved, resolver, stats) {
            Ok(dp) => Some(dp),
            Err(e) => {
                eprintln!("actrix: {e:#}");
                let _ = control.shutdown();
                return 1;
            }
        }
    } else {
        None
    };

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
        println!("  HTTP       http://{http}  (/healthz, /metrics, /ks, /ais)");
        println!("  demo user  demo / {pw}");
        println!(
            "  try: turnutils_uclient -u demo -w {pw} -r {} -e 127.0.0.1 -X 127.0.0.1",
            cfg.turn.realm
        );
        println!("Ctrl-C stops it.");
    }

    wait_for_shutdown(
        dp.as_ref(),
        Duration::from_secs(cfg.turn.shutdown_grace_secs),
    );
    if let Some(dp) = dp {
        dp.stop();
    }
    if let Err(e) = control.shutdown() {
        tracing::warn!(error = %e, "control thread did not stop cleanly");
    }
    tracing::info!("actrix stopped");
    0
}

/// Block until SIGTERM or SIGINT; then drain (no new allocations) until no allocation is left
/// or the grace period ends. A second signal ends the drain at once.
fn wait_for_shutdown(dp: Option<&DataPlane>, grace: Duration) {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = match signal_hook::iterator::Signals::new([SIGTERM, SIGINT]) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot install signal handlers");
            return;
        }
    };
    let sig = signals.forever().next();
    tracing::info!(signal = ?sig, "shutting down: no new allocations");
    let Some(dp) = dp else { return };
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
        if signals.pending().next().is_some() {
            tracing::info!(
                allocations = left,
                "second signal; closing remaining allocations"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
