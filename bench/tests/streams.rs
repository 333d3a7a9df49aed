//! The TCP and TLS scenarios (relay, churn, idle, handshakes) against the real appliance
//! binary on loopback, with its self-signed certificate from `actrix cert --self-signed`:
//! each must relay or allocate with zero loss and zero failures. Behaviour, not timing.
//!
//! The binary is `ACTRIX_BIN` when set, else the workspace's own build of the `actrix`
//! package (built here when missing or stale, in this test's profile).

use actrix_bench::load::Ctx;
use actrix_bench::report::ScenarioReport;
use actrix_bench::run_scenario;
use actrix_bench::scenario::Scenario;
use actrix_bench::target::{Credentials, Target, TargetKind};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// The appliance binary, built once per test process.
fn appliance_binary() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("ACTRIX_BIN") {
            return PathBuf::from(p);
        }
        // target/<profile>/deps/streams-<hash> -> target/<profile>/actrix
        let exe = std::env::current_exe().expect("test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>")
            .to_path_buf();
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "-q", "-p", "actrix"])
            .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."));
        if release {
            cmd.arg("--release");
        }
        let st = cmd.status().expect("run cargo build -p actrix");
        assert!(st.success(), "cargo build -p actrix failed");
        profile_dir.join("actrix")
    })
    .clone()
}

fn free_port() -> u16 {
    loop {
        let u = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let p = u.local_addr().unwrap().port();
        // The TCP listener shares the UDP port number.
        if std::net::TcpListener::bind(("127.0.0.1", p)).is_ok() {
            return p;
        }
    }
}

struct Appliance {
    child: Child,
    udp: SocketAddr,
    tls: SocketAddr,
}

impl Drop for Appliance {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The appliance on loopback with UDP, TCP (same port) and TLS listeners.
fn start(dir: &Path) -> Appliance {
    let bin = appliance_binary();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = Command::new(&bin)
        .args(["cert", "--self-signed", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .expect("actrix cert");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let tls = free_port();
    let http = free_port();
    // Relay ports above the ephemeral range, apart for concurrent tests.
    let base = 61000 + (port as u32 % 4) * 1100;
    let cfg = format!(
        "[node]\ndata_dir = \"{data}\"\n[cores]\npin = false\n\
         [stun]\nlisten = [\"127.0.0.1:{port}\"]\nlisten_tcp = [\"127.0.0.1:{port}\"]\n\
         listen_tls = [\"127.0.0.1:{tls}\"]\ntls_cert = \"{cert}\"\ntls_key = \"{key}\"\n\
         max_connections_per_ip = 10000\n\
         [turn]\nrelay_port_range = \"{base}-{top}\"\nallow_peers = [\"127.0.0.0/8\"]\n\
         users = [{{ name = \"bench\", password = \"bench-password\" }}]\n\
         max_allocations_per_user = 100000\nidentity_credentials = false\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n",
        data = dir.join("data").display(),
        cert = cert.display(),
        key = key.display(),
        top = base + 999,
    );
    let path = dir.join("actrix.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = Command::new(&bin)
        .args(["run", "-c"])
        .arg(&path)
        .env("ACTRIX_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start actrix");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let until = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(l) if l.contains("actrix ready") => break,
            Ok(l) => seen.push(l),
            Err(_) => {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("actrix exited: {st}\n{}", seen.join("\n"));
                }
            }
        }
        assert!(
            Instant::now() < until,
            "actrix not ready:\n{}",
            seen.join("\n")
        );
    }
    // Keep draining its log so it never blocks on a full pipe.
    std::thread::spawn(move || while rx.recv().is_ok() {});
    Appliance {
        udp: ([127, 0, 0, 1], port).into(),
        tls: ([127, 0, 0, 1], tls).into(),
        child,
    }
}

fn target(app: &Appliance) -> Target {
    Target {
        label: "actrix".into(),
        addr: app.udp,
        tcp: Some(app.udp),
        tls: Some(app.tls),
        kind: TargetKind::Turn,
        creds: Some(Credentials::Static {
            user: "bench".into(),
            password: "bench-password".into(),
        }),
        pid: Some(app.child.id()),
        http: None,
        shared_key: None,
    }
}

fn run(t: &Target, text: &str) -> ScenarioReport {
    let sc = Scenario::parse(text).unwrap();
    let r = run_scenario(&sc, t, &Ctx::default());
    eprintln!("{}: {:.2} s, {:?}", sc.name, r.wall_secs, r.headline());
    assert!(
        r.passed && !r.skipped,
        "{}: {:?} {:?} {:?}",
        sc.name,
        r.failures,
        r.notes,
        r.metrics
    );
    r
}

fn metric(r: &ScenarioReport, k: &str) -> f64 {
    r.metric(k)
        .unwrap_or_else(|| panic!("{}: no {k} in {:?}", r.name, r.metrics))
}

#[test]
fn relay_over_tcp_and_tls_loses_nothing_both_ways() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path());
    let t = target(&app);
    for (transport, mode, per_write) in [
        ("tcp", "channel", 1),
        ("tls", "channel", 1),
        ("tls", "channel", 8),
        ("tcp", "send", 1),
        ("tls", "send", 1),
    ] {
        for version in ["1.3", "1.2"] {
            if transport == "tcp" && version == "1.2" {
                continue;
            }
            let r = run(
                &t,
                &format!(
                    "name = \"r-{transport}-{mode}\"\nkind = \"relay\"\n[relay]\n\
                     transport = \"{transport}\"\ntls_version = \"{version}\"\nmode = \"{mode}\"\n\
                     clients = 3\npeers = 2\npayload = 101\nduration_secs = 0.7\n\
                     offered_pps = 1500\nframes_per_write = {per_write}\ndrain_ms = 500\nmax_loss = 0\n"
                ),
            );
            let sent = metric(&r, "sent");
            assert!(sent > 500.0, "{:?}", r.metrics);
            // Every datagram reached its UDP peer and came back over the client's stream.
            assert_eq!(metric(&r, "peer_rx"), sent, "{transport} {mode}");
            assert_eq!(metric(&r, "client_rx"), sent, "{transport} {mode}");
            assert_eq!(metric(&r, "other_rx"), 0.0);
            assert_eq!(metric(&r, "stream_errors"), 0.0);
            assert!(r.metric("cpu_us_per_relayed_pkt").is_some());
            let over = format!("clients over {}", transport.to_uppercase());
            assert!(r.notes.iter().any(|n| n.contains(&over)), "{:?}", r.notes);
            if transport == "tls" {
                let v = if version == "1.3" {
                    "TLSv1_3"
                } else {
                    "TLSv1_2"
                };
                assert!(
                    r.notes
                        .iter()
                        .any(|n| n.contains(v) && n.contains("ALPN stun.turn")),
                    "{:?}",
                    r.notes
                );
            }
        }
    }
}

#[test]
fn churn_handshakes_and_idle_over_streams_complete_without_failures() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path());
    let t = target(&app);
    for (transport, end) in [
        ("tcp", "refresh"),
        ("tls", "refresh"),
        ("tcp", "close"),
        ("tls", "close"),
    ] {
        let r = run(
            &t,
            &format!(
                "name = \"c-{transport}-{end}\"\nkind = \"churn\"\n[churn]\ntransport = \"{transport}\"\n\
                 end = \"{end}\"\nconcurrency = 4\nduration_secs = 0.6\nsource_ips = 64\nmax_failure = 0\n"
            ),
        );
        assert!(metric(&r, "cycles_ok") >= 10.0, "{:?}", r.metrics);
        assert_eq!(metric(&r, "cycles_failed"), 0.0);
        // Allocate with its 401, CreatePermission, ChannelBind (and the Refresh 0).
        let per_cycle = metric(&r, "transactions_per_cycle");
        let want = if end == "refresh" { 5.0 } else { 4.0 };
        assert!(
            per_cycle >= want - 1.0 && per_cycle <= want + 0.5,
            "{per_cycle}"
        );
        assert!(r.metric("cpu_us_per_alloc_cycle").is_some());
    }
    for (transport, version, request) in [
        ("tls", "1.3", "binding"),
        ("tls", "1.2", "binding"),
        ("tls", "1.3", "allocate"),
        ("tcp", "1.3", "binding"),
    ] {
        let r = run(
            &t,
            &format!(
                "name = \"h-{transport}\"\nkind = \"handshake\"\n[handshake]\ntransport = \"{transport}\"\n\
                 tls_version = \"{version}\"\nrequest = \"{request}\"\nconcurrency = 4\n\
                 duration_secs = 0.6\nsource_ips = 64\nmax_failure = 0\n"
            ),
        );
        assert!(metric(&r, "handshakes_ok") >= 10.0, "{:?}", r.metrics);
        assert_eq!(metric(&r, "handshakes_failed"), 0.0);
        assert!(metric(&r, "handshakes_per_s") > 0.0);
        assert!(r.metric("cpu_us_per_handshake").is_some());
        let key = if transport == "tls" {
            "tls_handshake_p50_us"
        } else {
            "tcp_connect_p50_us"
        };
        assert!(metric(&r, key) > 0.0);
    }
    let n = 300;
    let r = run(
        &t,
        &format!(
            "name = \"i-tls\"\nkind = \"idle\"\n[idle]\ntransport = \"tls\"\nallocations = {n}\n\
             concurrency = 32\nhold_secs = 0.2\nsource_ips = 16\nmin_success = 1.0\n"
        ),
    );
    assert_eq!(metric(&r, "allocations_ok"), n as f64);
    assert!(metric(&r, "rss_bytes_per_alloc") > 0.0);
    // While held, every allocation is a connection of the server's (and a relay socket).
    let fds = metric(&r, "server_fds_after") - metric(&r, "server_fds_before");
    assert!(
        fds >= n as f64,
        "{fds} more descriptors for {n} connections"
    );
}

#[test]
fn stream_scenarios_need_their_listener_and_skip_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let app = start(dir.path());
    let mut t = target(&app);
    t.tls = None;
    let sc = Scenario::parse(
        "name = \"r\"\nkind = \"relay\"\n[relay]\ntransport = \"tls\"\nduration_secs = 0.3\n",
    )
    .unwrap();
    let r = run_scenario(&sc, &t, &Ctx::default());
    assert!(!r.passed);
    assert!(
        r.failures.iter().any(|f| f.contains("--tls")),
        "{:?}",
        r.failures
    );
    // A TLS client on the TCP listener: the server cannot frame a ClientHello and closes it.
    t.tls = t.tcp;
    let r = run_scenario(&sc, &t, &Ctx::default());
    assert!(!r.passed, "{:?}", r.metrics);
    // The reference forwarder is UDP only.
    let reference = Target {
        kind: TargetKind::Reference,
        creds: None,
        ..target(&app)
    };
    let r = run_scenario(&sc, &reference, &Ctx::default());
    assert!(r.passed && r.skipped, "{:?}", r.notes);
}
