//! The KS, AIS and signaling scenarios against a real control thread (HTTP server, SQLite
//! stores, WebSocket hub) started in this process, and their failure modes.

use actrix_bench::load::Ctx;
use actrix_bench::run_scenario;
use actrix_bench::scenario::Scenario;
use actrix_bench::target::{Target, TargetKind};
use actrix_control::{ControlBuilder, ControlConfig, ControlHandle, SecretString};
use actrix_signaling::{SignalingConfig, SignalingStats};
use std::sync::Arc;

const SHARED_KEY: &str = "bench-test-shared-key-0123456789abcdef";

fn start(dir: &std::path::Path) -> ControlHandle {
    let mut cfg = ControlConfig {
        node_id: "bench-test".into(),
        data_dir: dir.to_owned(),
        ..ControlConfig::default()
    };
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.ks.shared_key = Some(SecretString::from(SHARED_KEY));
    cfg.ks.kek = Some(SecretString::from(
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    ));
    cfg.ais.rate_limit_burst = 1_000_000;
    let sig = SignalingConfig {
        msg_rate_per_sec: 10_000,
        msg_burst: 10_000,
        ..SignalingConfig::default()
    };
    let dir2 = dir.to_owned();
    ControlBuilder::new(cfg)
        .routes_with(move |ctx| {
            actrix_signaling::router_with_stats(
                ctx,
                sig,
                &dir2,
                Arc::new(SignalingStats::default()),
            )
            .expect("signaling routes")
        })
        .spawn()
        .expect("control thread")
}

fn target(h: &ControlHandle, key: Option<&str>) -> Target {
    Target {
        label: "control".into(),
        addr: "127.0.0.1:9".parse().unwrap(),
        tcp: None,
        tls: None,
        kind: TargetKind::Turn,
        creds: None,
        // The control thread runs in this process.
        pid: Some(std::process::id()),
        http: Some(format!("http://{}", h.local_addr())),
        shared_key: key.map(str::to_owned),
    }
}

#[test]
fn ks_ais_and_signaling_scenarios_measure_a_real_control_thread() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path());
    let t = target(&h, Some(SHARED_KEY));
    let ctx = Ctx::default();

    for op in ["secret", "generate"] {
        let sc = Scenario::parse(&format!(
            "name = \"ks-{op}\"\nkind = \"ks\"\n[ks]\noperation = \"{op}\"\nconnections = 3\n\
             duration_secs = 0.5\n"
        ))
        .unwrap();
        let r = run_scenario(&sc, &t, &ctx);
        assert!(r.passed, "{op}: {:?} {:?}", r.failures, r.notes);
        let metric = format!("ks_{op}_rps");
        assert!(r.metric(&metric).unwrap() > 10.0, "{:?}", r.metrics);
        assert_eq!(r.metric("requests_failed"), Some(0.0));
        assert!(r.latency.as_ref().unwrap().count > 5);
        assert!(r.metric("cpu_us_per_request").is_some());
    }

    let ais = Scenario::parse(
        "name = \"ais\"\nkind = \"ais\"\n[ais]\nconnections = 3\nduration_secs = 0.5\n",
    )
    .unwrap();
    let r = run_scenario(&ais, &t, &ctx);
    assert!(r.passed, "{:?} {:?}", r.failures, r.notes);
    assert!(r.metric("ais_register_rps").unwrap() > 10.0);

    let sig = Scenario::parse(
        "name = \"sig\"\nkind = \"signaling\"\n[signaling]\nactors = 4\nconnections = 10\n\
         offered_eps = 400\nwarmup_secs = 0.3\nduration_secs = 1.0\n",
    )
    .unwrap();
    let r = run_scenario(&sig, &t, &ctx);
    assert!(r.passed, "{:?} {:?}", r.failures, r.notes);
    assert_eq!(r.metric("connections"), Some(10.0));
    let eps = r.metric("envelopes_per_s").unwrap();
    assert!(
        (300.0..=500.0).contains(&eps),
        "delivered {eps}/s of 400 offered"
    );
    assert_eq!(r.metric("loss"), Some(0.0));
    assert!(r.latency.as_ref().unwrap().count >= 300);
}

#[test]
fn wrong_key_or_missing_endpoint_fails_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(dir.path());
    let ctx = Ctx::default();
    let ks = Scenario::parse(
        "name = \"ks\"\nkind = \"ks\"\n[ks]\noperation = \"generate\"\nconnections = 2\n\
         duration_secs = 0.3\n",
    )
    .unwrap();
    // A wrong shared key: every request is refused with 401, and the scenario says so.
    let r = run_scenario(
        &ks,
        &target(&h, Some("not-the-shared-key-0123456789abcdef")),
        &ctx,
    );
    assert!(!r.passed);
    assert!(r.notes.iter().any(|n| n.contains("401")), "{:?}", r.notes);
    // No key at all, or no HTTP address: refused before any load.
    let r = run_scenario(&ks, &target(&h, None), &ctx);
    assert!(
        !r.passed && r.failures[0].contains("--shared-key-file"),
        "{:?}",
        r.failures
    );
    let mut t = target(&h, Some(SHARED_KEY));
    t.http = None;
    let r = run_scenario(&ks, &t, &ctx);
    assert!(
        !r.passed && r.failures[0].contains("--http"),
        "{:?}",
        r.failures
    );
    let ais = Scenario::parse(
        "name = \"ais\"\nkind = \"ais\"\n[ais]\nconnections = 2\nduration_secs = 0.3\n",
    )
    .unwrap();
    let r = run_scenario(
        &ais,
        &target(&h, Some("not-the-shared-key-0123456789abcdef")),
        &ctx,
    );
    assert!(!r.passed);
    assert!(r.notes.iter().any(|n| n.contains("401")), "{:?}", r.notes);
}
