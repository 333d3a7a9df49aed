//! `actrix-bench`: run scenarios against a STUN/TURN server, serve the reference forwarder,
//! or compare runs. Exit status: 0 all scenarios passed, 1 a scenario failed, 2 bad usage.

use actrix_bench::compare;
use actrix_bench::load::Ctx;
use actrix_bench::reference;
use actrix_bench::report::{self, HostInfo, RunReport};
use actrix_bench::scenario::Scenario;
use actrix_bench::sys;
use actrix_bench::target::{Credentials, Target, TargetKind};
use clap::{Parser, Subcommand, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "actrix-bench",
    version,
    about = "Load harness for STUN/TURN servers, with a bare UDP forwarder as the reference"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Clone, Copy, ValueEnum)]
enum KindArg {
    /// An RFC 8489/8656 STUN/TURN server.
    Turn,
    /// `actrix-bench reference`.
    Reference,
}

// Parsed once per process: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Run scenario files against a server; write JSON, a summary table and SVG plots.
    Run {
        /// Scenario TOML files, run in order.
        #[arg(short, long = "scenario", required = true)]
        scenarios: Vec<PathBuf>,
        /// Server STUN/TURN address over UDP (or the reference forwarder's).
        #[arg(long)]
        server: SocketAddr,
        /// The server's TURN-over-TCP listener, for scenarios with transport = "tcp"
        /// (default: the --server address).
        #[arg(long)]
        tcp: Option<SocketAddr>,
        /// The server's TURN-over-TLS listener, for scenarios with transport = "tls".
        #[arg(long)]
        tls: Option<SocketAddr>,
        /// What the server is.
        #[arg(long, value_enum, default_value = "turn")]
        target: KindArg,
        /// Name of this target in reports (e.g. actrix, coturn, reference).
        #[arg(long, default_value = "server")]
        label: String,
        #[arg(long)]
        user: Option<String>,
        #[arg(long)]
        password: Option<String>,
        /// TURN REST shared secret (username "<expiry>:<rest-name>").
        #[arg(long)]
        rest_secret: Option<String>,
        #[arg(long, default_value = "bench")]
        rest_name: String,
        #[arg(long, default_value_t = 3600)]
        rest_ttl: u64,
        /// Server process for CPU and memory accounting; found by the server's UDP port
        /// when omitted (0: do not measure).
        #[arg(long)]
        server_pid: Option<u32>,
        /// Core to pin the load generator to.
        #[arg(long, default_value_t = 0)]
        core: usize,
        /// Do not pin the load generator.
        #[arg(long)]
        no_pin: bool,
        /// Output folder.
        #[arg(short, long, default_value = "bench-out")]
        out: PathBuf,
        /// Override every scenario's loss (or failure) threshold, as a fraction.
        #[arg(long)]
        max_loss: Option<f64>,
        /// Multiply every duration by this (0.2 for a quick run).
        #[arg(long, default_value_t = 1.0)]
        time_scale: f64,
        /// No progress line.
        #[arg(short, long)]
        quiet: bool,
        /// The appliance's HTTP base URL, for the ks, ais and signaling scenarios.
        #[arg(long)]
        http: Option<String>,
        /// File holding the KS/AIS shared key (signed requests; realm creation).
        #[arg(long)]
        shared_key_file: Option<PathBuf>,
    },
    /// Serve the reference: a bare recvmmsg/sendmmsg UDP forwarder/echo on one pinned core.
    Reference {
        #[arg(long, default_value = "127.0.0.1:3480")]
        listen: SocketAddr,
        /// Core to pin to (none: not pinned).
        #[arg(long)]
        core: Option<usize>,
        #[arg(long, default_value_t = 64)]
        batch: usize,
        /// Stop after this many seconds (default: until SIGINT/SIGTERM).
        #[arg(long)]
        duration_secs: Option<f64>,
    },
    /// Combine runs into one comparison report (markdown and JSON) with ratios.
    Compare {
        /// LABEL=DIR of a `run` output; repeat a label for several rounds.
        #[arg(long = "run", required = true)]
        runs: Vec<String>,
        /// Label of our server (the numerator of the ratios).
        #[arg(long)]
        ours: String,
        #[arg(long)]
        reference: Option<String>,
        #[arg(long)]
        coturn: Option<String>,
        /// More labels to put ours over (another build, another backend); repeatable.
        #[arg(long = "ratio-to")]
        ratio_to: Vec<String>,
        #[arg(short, long)]
        out: PathBuf,
    },
    /// Print the pid of the process bound to a UDP port (for scripts).
    FindPid {
        #[arg(long)]
        port: u16,
    },
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Run {
            scenarios,
            server,
            tcp,
            tls,
            target,
            label,
            user,
            password,
            rest_secret,
            rest_name,
            rest_ttl,
            server_pid,
            core,
            no_pin,
            out,
            max_loss,
            time_scale,
            quiet,
            http,
            shared_key_file,
        } => {
            let shared_key = match shared_key_file {
                None => None,
                Some(p) => match std::fs::read_to_string(&p) {
                    Ok(s) => Some(s.trim().to_string()),
                    Err(e) => {
                        eprintln!("actrix-bench: --shared-key-file {}: {e}", p.display());
                        std::process::exit(2);
                    }
                },
            };
            let http = http.map(|h| h.trim_end_matches('/').to_string());
            let creds = match (user, password, rest_secret) {
                (_, _, Some(secret)) => Some(Credentials::Rest {
                    secret,
                    name: rest_name,
                    ttl_secs: rest_ttl,
                }),
                (Some(user), Some(password), None) => Some(Credentials::Static { user, password }),
                (None, None, None) => None,
                _ => {
                    eprintln!("actrix-bench: --user and --password go together");
                    std::process::exit(2);
                }
            };
            if let Some(l) = max_loss {
                if !(0.0..=1.0).contains(&l) {
                    eprintln!("actrix-bench: --max-loss is a fraction in [0, 1]");
                    std::process::exit(2);
                }
            }
            if !(time_scale > 0.0 && time_scale <= 10.0) {
                eprintln!("actrix-bench: --time-scale must be in (0, 10]");
                std::process::exit(2);
            }
            let mut loaded = Vec::new();
            for p in &scenarios {
                match Scenario::load(p) {
                    Ok(mut s) => {
                        s.scale_time(time_scale);
                        loaded.push(s);
                    }
                    Err(e) => {
                        eprintln!("actrix-bench: {e}");
                        std::process::exit(2);
                    }
                }
            }
            let pid = match server_pid {
                Some(0) => None,
                Some(p) => Some(p),
                None => {
                    let p = sys::find_pid_by_udp_port(server.port());
                    if p.is_none() {
                        eprintln!(
                            "actrix-bench: no process found on UDP port {}: server CPU and \
                             memory will not be measured (give --server-pid)",
                            server.port()
                        );
                    }
                    p
                }
            };
            let target = Target {
                label,
                addr: server,
                tcp: Some(tcp.unwrap_or(server)),
                tls,
                kind: match target {
                    KindArg::Turn => TargetKind::Turn,
                    KindArg::Reference => TargetKind::Reference,
                },
                creds,
                pid,
                http,
                shared_key,
            };

            let pinned = !no_pin && sys::pin_to_core(core);
            if !no_pin && !pinned {
                eprintln!("actrix-bench: could not pin the load generator to core {core}");
            }
            let ctx = Ctx {
                core: (!no_pin).then_some(core),
                pinned,
                max_loss,
                progress: !quiet,
            };
            run(&loaded, &target, &ctx, &out)
        }
        Cmd::Reference {
            listen,
            core,
            batch,
            duration_secs,
        } => serve_reference(listen, core, batch, duration_secs),
        Cmd::Compare {
            runs,
            ours,
            reference,
            coturn,
            ratio_to,
            out,
        } => {
            let mut loaded = Vec::new();
            for r in &runs {
                let Some((label, dir)) = r.split_once('=') else {
                    eprintln!("actrix-bench: --run takes LABEL=DIR, got {r:?}");
                    std::process::exit(2);
                };
                match compare::load_run(std::path::Path::new(dir)) {
                    Ok(rep) => loaded.push((label.to_string(), rep)),
                    Err(e) => {
                        eprintln!("actrix-bench: {e}");
                        std::process::exit(2);
                    }
                }
            }
            let mut c = compare::compare(&loaded, &ours, reference.as_deref(), coturn.as_deref());
            compare::add_ratios(&mut c, &ratio_to);
            match compare::write(&c, &out) {
                Ok(()) => {
                    print!("{}", compare::markdown(&c));
                    eprintln!("wrote {}/comparison.md and comparison.json", out.display());
                    0
                }
                Err(e) => {
                    eprintln!("actrix-bench: writing {}: {e}", out.display());
                    2
                }
            }
        }
        Cmd::FindPid { port } => match sys::find_pid_by_udp_port(port) {
            Some(p) => {
                println!("{p}");
                0
            }
            None => {
                eprintln!("actrix-bench: no process bound to UDP port {port}");
                1
            }
        },
    };
    std::process::exit(code);
}

fn run(scenarios: &[Scenario], target: &Target, ctx: &Ctx, out: &std::path::Path) -> i32 {
    let mut rep = RunReport {
        tool: "actrix-bench".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        label: target.label.clone(),
        target: serde_json::to_value(target.info()).unwrap_or(serde_json::Value::Null),
        host: HostInfo::collect(),
        scenarios: Vec::new(),
    };
    for sc in scenarios {
        if ctx.progress {
            eprintln!(
                "== {} ({}) against {} at {}",
                sc.name,
                sc.kind.as_str(),
                target.label,
                target.addr
            );
        }
        let r = actrix_bench::run_scenario(sc, target, ctx);
        for f in &r.failures {
            eprintln!("actrix-bench: FAILED {}: {f}", r.name);
        }
        rep.scenarios.push(r);
        // Written after every scenario, so an interrupted run keeps what it measured.
        if let Err(e) = report::write_all(&rep, out) {
            eprintln!("actrix-bench: writing {}: {e}", out.display());
            return 2;
        }
    }
    print!("{}", report::summary_table(&rep));
    eprintln!(
        "results in {}/ (results.json, summary.txt, *.svg)",
        out.display()
    );
    if rep.passed() {
        0
    } else {
        let failed: Vec<&str> = rep
            .scenarios
            .iter()
            .filter(|s| !s.passed)
            .map(|s| s.name.as_str())
            .collect();
        eprintln!("actrix-bench: FAILED scenario(s): {}", failed.join(", "));
        1
    }
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::Relaxed);
}

fn serve_reference(
    listen: SocketAddr,
    core: Option<usize>,
    batch: usize,
    duration_secs: Option<f64>,
) -> i32 {
    // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    if let Some(c) = core {
        if !sys::pin_to_core(c) {
            eprintln!("actrix-bench reference: could not pin to core {c}");
        }
    }
    let sock = match sys::udp_socket(listen, 8 << 20) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("actrix-bench reference: bind {listen}: {e}");
            return 2;
        }
    };
    eprintln!(
        "actrix-bench reference: forwarding/echoing on {} (pid {}, core {:?}, batch {batch})",
        sock.local_addr().map(|a| a.to_string()).unwrap_or_default(),
        std::process::id(),
        core
    );
    let counters = Arc::new(reference::Counters::default());
    let max = duration_secs
        .filter(|d| *d > 0.0 && d.is_finite())
        .map(Duration::from_secs_f64);
    match reference::serve(&sock, batch.clamp(1, 1024), &STOP, max, &counters) {
        Ok(()) => {
            eprintln!(
                "actrix-bench reference: received {} forwarded {} echoed {} dropped {}",
                counters.received.load(Ordering::Relaxed),
                counters.forwarded.load(Ordering::Relaxed),
                counters.echoed.load(Ordering::Relaxed),
                counters.dropped.load(Ordering::Relaxed)
            );
            0
        }
        Err(e) => {
            eprintln!("actrix-bench reference: {e}");
            1
        }
    }
}
