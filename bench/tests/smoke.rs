//! Smoke runs against the reference forwarder, in-process and through the binary.

use actrix_bench::load::Ctx;
use actrix_bench::reference;
use actrix_bench::run_scenario;
use actrix_bench::scenario::Scenario;
use actrix_bench::target::{Target, TargetKind};
use std::process::Command;

fn reference_target(addr: std::net::SocketAddr) -> Target {
    Target {
        label: "reference".into(),
        addr,
        tcp: None,
        tls: None,
        kind: TargetKind::Reference,
        creds: None,
        // Our own process: the in-process forwarder's CPU is ours.
        pid: Some(std::process::id()),
        http: None,
        shared_key: None,
    }
}

#[test]
fn binding_and_relay_against_the_reference() {
    let h = reference::spawn("127.0.0.1:0".parse().unwrap(), None, 64).unwrap();
    let t = reference_target(h.addr);
    let ctx = Ctx::default();

    let b = Scenario::parse(
        "name = \"b\"\nkind = \"binding\"\n[binding]\nclients = 2\nduration_secs = 1.0\nwindow = 16\n",
    )
    .unwrap();
    let r = run_scenario(&b, &t, &ctx);
    assert!(r.passed, "{:?}", r.failures);
    assert!(r.metric("binding_rps").unwrap() > 100.0, "{:?}", r.metrics);
    assert!(r.latency.as_ref().unwrap().count > 100);
    assert!(r.server.cpu_secs.is_some());

    let rel = Scenario::parse(
        "name = \"r\"\nkind = \"relay\"\n[relay]\nclients = 2\npeers = 3\nduration_secs = 1.0\n\
         offered_pps = 2000\nmax_loss = 0.01\n",
    )
    .unwrap();
    let r = run_scenario(&rel, &t, &ctx);
    assert!(r.passed, "{:?} {:?}", r.failures, r.metrics);
    let sent = r.metric("sent").unwrap();
    assert!(sent > 1000.0, "{:?}", r.metrics);
    // Each round trip is relayed twice.
    let relayed = r.metric("client_rx").unwrap() + r.metric("peer_rx").unwrap();
    assert!(relayed >= 2.0 * 0.99 * sent, "{:?}", r.metrics);
    assert!(r.metric("cpu_us_per_relayed_pkt").is_some());
    assert!(!r.timeseries.is_empty());

    // A short search: every step passes against the forwarder up to max_pps.
    let s = Scenario::parse(
        "name = \"s\"\nkind = \"relay\"\n[relay]\nclients = 1\npeers = 1\n\
         [relay.search]\nstart_pps = 1000\nmax_pps = 2000\nstep_secs = 0.3\nmax_loss = 0.05\n",
    )
    .unwrap();
    let r = run_scenario(&s, &t, &ctx);
    assert!(r.passed, "{:?}", r.failures);
    assert!(
        r.metric("max_relayed_pps").unwrap() > 1000.0,
        "{:?}",
        r.metrics
    );
    assert!(r.steps.len() >= 2);

    // Allocation scenarios do not apply to the forwarder: skipped, not failed.
    let c = Scenario::parse("name = \"c\"\nkind = \"churn\"\n").unwrap();
    let r = run_scenario(&c, &t, &ctx);
    assert!(r.passed && r.skipped);
    h.stop().unwrap();
}

#[test]
fn binary_writes_reports_and_fails_loudly() {
    let bin = env!("CARGO_BIN_EXE_actrix-bench");
    let h = reference::spawn("127.0.0.1:0".parse().unwrap(), None, 64).unwrap();
    let dir = std::env::temp_dir().join(format!("actrix-bench-smoke-{}", std::process::id()));
    let scen = concat!(env!("CARGO_MANIFEST_DIR"), "/scenarios/smoke.toml");
    let out = Command::new(bin)
        .args([
            "run",
            "-s",
            scen,
            "--target",
            "reference",
            "--label",
            "ref",
            "--no-pin",
            "-q",
        ])
        .args(["--server", &h.addr.to_string(), "--server-pid", "0"])
        .arg("--out")
        .arg(&dir)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("smoke-relay") && stdout.contains("PASS"),
        "{stdout}"
    );
    assert!(dir.join("results.json").exists());
    assert!(dir.join("smoke-relay-latency.svg").exists());

    // The comparison of a run with itself: every ratio is 1.
    let cmp = dir.join("cmp");
    let out = Command::new(bin)
        .args(["compare", "--ours", "a", "--reference", "b"])
        .arg(format!("--run=a={}", dir.display()))
        .arg(format!("--run=b={}", dir.display()))
        .arg("--out")
        .arg(&cmp)
        .output()
        .unwrap();
    assert!(out.status.success());
    let md = std::fs::read_to_string(cmp.join("comparison.md")).unwrap();
    assert!(md.contains("1.00x"), "{md}");
    h.stop().unwrap();

    // Nothing listening: the scenario fails and the exit status says so.
    let dead = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = dead.local_addr().unwrap();
    drop(dead);
    let out = Command::new(bin)
        .args(["run", "-s", scen, "--target", "reference", "--no-pin", "-q"])
        .args([
            "--server",
            &addr.to_string(),
            "--server-pid",
            "0",
            "--time-scale",
            "0.3",
        ])
        .arg("--out")
        .arg(dir.join("dead"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("FAILED"));

    // Bad usage is status 2.
    let out = Command::new(bin)
        .args(["run", "-s", "/nonexistent.toml", "--server", "127.0.0.1:1"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let _ = std::fs::remove_dir_all(&dir);
}
