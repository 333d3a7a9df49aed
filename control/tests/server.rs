//! The control thread: binding, services, extra routes, CORS, TLS, shutdown.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use actrix_control::identity::IdentityError;
use actrix_control::testing::IdentityProbe;
use actrix_control::{spawn_with_routes, ControlBuilder, ControlError};
use actrix_proto::auth::IdentityRequest;
use actrix_proto::plan::ShardId;
use common::*;

#[test]
fn healthz_and_services_follow_config() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(dir.path()));
    let base = common::base(&h);
    let (st, body) = get(&base, "/healthz");
    assert_eq!(st, 200);
    assert_eq!(body["status"], "ok");
    assert_eq!(body["node_id"], "test-node");
    assert_eq!(body["services"]["ks"], true);
    assert_eq!(body["services"]["ais"], true);
    h.shutdown().unwrap();

    // Bitmask 16: KS only.
    let mut cfg = config(dir.path());
    cfg.services.enable = Some(16);
    let h = start(cfg);
    let base = common::base(&h);
    assert_eq!(get(&base, "/ks/health").0, 200);
    assert_eq!(get(&base, "/ais/health").0, 404);
    h.shutdown().unwrap();

    // Named switches off.
    let mut cfg = config(dir.path());
    cfg.services.ks = false;
    cfg.services.ais = false;
    let h = start(cfg);
    let base = common::base(&h);
    assert_eq!(get(&base, "/ks/health").0, 404);
    assert_eq!(get(&base, "/ais/health").0, 404);
    assert_eq!(get(&base, "/healthz").0, 200);
}

#[test]
fn bind_errors_are_returned_not_logged() {
    let dir = tempfile::tempdir().unwrap();
    let h = start(ks_config(dir.path()));
    let dir2 = tempfile::tempdir().unwrap();
    let mut cfg = ks_config(dir2.path());
    cfg.http.listen = h.local_addr();
    match actrix_control::spawn(cfg, None) {
        Err(ControlError::Bind { addr, .. }) => assert_eq!(addr, h.local_addr()),
        other => panic!("expected a bind error, got {other:?}"),
    }
}

#[test]
fn invalid_config_and_core_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = ks_config(dir.path());
    cfg.ks.shared_key = Some("short".into());
    cfg.ks.nonce_store_capacity = 1;
    match actrix_control::spawn(cfg, None) {
        Err(ControlError::Config(p)) => assert_eq!(p.len(), 2, "{p:?}"),
        other => panic!("{other:?}"),
    }
    let mut cfg = ks_config(dir.path());
    cfg.ks.shared_key = None;
    assert!(matches!(
        actrix_control::spawn(cfg, None),
        Err(ControlError::Config(_))
    ));
    assert!(matches!(
        actrix_control::spawn(ks_config(dir.path()), Some(100_000)),
        Err(ControlError::Config(_))
    ));
    // A real core works.
    let h = actrix_control::spawn(ks_config(dir.path()), Some(0)).unwrap();
    assert_eq!(get(&base(&h), "/healthz").0, 200);
}

#[test]
fn extra_routes_and_cors() {
    let dir = tempfile::tempdir().unwrap();
    let extra =
        axum::Router::new().route("/metrics", axum::routing::get(|| async { "actrix_up 1\n" }));
    let h = spawn_with_routes(ks_config(dir.path()), None, extra).unwrap();
    let base = common::base(&h);
    let mut resp = agent().get(format!("{base}/metrics")).call().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(resp.body_mut().read_to_string().unwrap(), "actrix_up 1\n");

    let resp = agent()
        .get(format!("{base}/ks/health"))
        .header("origin", "https://example.test")
        .call()
        .unwrap();
    assert_eq!(
        resp.headers()
            .get("access-control-allow-origin")
            .map(|v| v.to_str().unwrap()),
        Some("*")
    );
}

#[test]
fn https_with_rustls() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut cfg = ks_config(&dir.path().join("data"));
    cfg.http.tls_cert = Some(cert.clone());
    cfg.http.tls_key = Some(key.clone());
    let h = start(cfg);
    let port = h.local_addr().port();

    let roots = ureq::tls::RootCerts::Specific(Arc::new(vec![ureq::tls::Certificate::from_der(
        ck.cert.der(),
    )
    .to_owned()]));
    let tls_agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
        .build()
        .into();
    let mut resp = tls_agent
        .get(format!("https://localhost:{port}/healthz"))
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body = resp.body_mut().read_to_string().unwrap();
    assert!(body.contains("\"status\":\"ok\""), "{body}");
    // Plain HTTP on the TLS port fails.
    assert!(agent()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .call()
        .map(|r| r.status().as_u16() != 200)
        .unwrap_or(true));
    h.shutdown().unwrap();

    // A broken key file is a startup error.
    std::fs::write(&key, "not a key").unwrap();
    let mut cfg = ks_config(&dir.path().join("data"));
    cfg.http.tls_cert = Some(cert);
    cfg.http.tls_key = Some(key);
    assert!(matches!(
        ControlBuilder::new(cfg).spawn(),
        Err(ControlError::Tls(_))
    ));
}

#[test]
fn shutdown_is_graceful_and_identity_requests_are_answered() {
    let dir = tempfile::tempdir().unwrap();
    let (builder, probe) = IdentityProbe::attach(ControlBuilder::new(ks_config(dir.path())));
    let h = builder.spawn().expect("control plane starts");
    let addr = h.local_addr();
    assert_eq!(
        probe.ask(b"not base122 \xff"),
        Err(IdentityError::MalformedUsername.refusal())
    );
    h.shutdown().unwrap();
    assert!(std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_err());
    // After shutdown, sending fails rather than hanging.
    let q = IdentityRequest {
        shard: ShardId(0),
        username: Box::new([]),
    };
    assert!(probe.requests.try_send(q).is_err());
}

#[test]
fn route_factories_reach_the_services_in_process() {
    use actrix_control::ais::proto::{register_response, RegisterRequest};
    use prost::Message as _;
    let dir = tempfile::tempdir().unwrap();
    let h = ControlBuilder::new(config(dir.path()))
        .routes_with(|ctx| {
            let ais = ctx.ais.clone().expect("AIS enabled");
            axum::Router::new().route(
                "/internal/register",
                axum::routing::post(move || {
                    let ais = ais.clone();
                    async move {
                        let req = RegisterRequest::default().encode_to_vec();
                        let resp = tokio::task::spawn_blocking(move || ais.register(&req))
                            .await
                            .unwrap();
                        match resp.result {
                            Some(register_response::Result::Success(ok)) => {
                                ok.credential.token_key_id.to_string()
                            }
                            other => format!("{other:?}"),
                        }
                    }
                }),
            )
        })
        .spawn()
        .unwrap();
    let mut resp = agent()
        .post(format!("{}/internal/register", common::base(&h)))
        .send("")
        .unwrap();
    let body = resp.body_mut().read_to_string().unwrap();
    assert!(body.parse::<u32>().is_ok(), "{body}");
}

#[test]
fn tls_certificate_reloads_in_place_and_a_bad_file_keeps_the_old_one() {
    let dir = tempfile::tempdir().unwrap();
    let write = |name: &str, ck: &rcgen::CertifiedKey<rcgen::KeyPair>| {
        let cert = dir.path().join(format!("{name}-cert.pem"));
        let key = dir.path().join(format!("{name}-key.pem"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
        (cert, key)
    };
    let a = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let b = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_a, key_a) = write("a", &a);
    let (cert_b, key_b) = write("b", &b);
    let mut cfg = ks_config(&dir.path().join("data"));
    cfg.http.tls_cert = Some(cert_a.clone());
    cfg.http.tls_key = Some(key_a.clone());
    let h = start(cfg);
    let port = h.local_addr().port();
    // A fresh agent per call: no TLS session reuse across the swap.
    let trusts = |ck: &rcgen::CertifiedKey<rcgen::KeyPair>| -> bool {
        let roots =
            ureq::tls::RootCerts::Specific(Arc::new(vec![ureq::tls::Certificate::from_der(
                ck.cert.der(),
            )
            .to_owned()]));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(ureq::tls::TlsConfig::builder().root_certs(roots).build())
            .build()
            .into();
        agent
            .get(format!("https://localhost:{port}/healthz"))
            .call()
            .is_ok()
    };
    assert!(trusts(&a) && !trusts(&b));
    assert!(h.reload_tls(&cert_b, &key_b).unwrap());
    assert!(
        trusts(&b) && !trusts(&a),
        "new connections get the new certificate"
    );
    // A broken file is refused and the certificate in force stays.
    let broken = dir.path().join("broken.pem");
    std::fs::write(&broken, "not a certificate").unwrap();
    assert!(h.reload_tls(&broken, &key_b).is_err());
    assert!(trusts(&b));
    h.shutdown().unwrap();
}

#[test]
fn a_request_header_that_never_completes_is_cut_off() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let h = start(config(dir.path()));
    // Slowloris: most of a request header (a WebSocket upgrade), then silence.
    let mut s = std::net::TcpStream::connect(h.local_addr()).unwrap();
    s.write_all(
        b"GET /signaling/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n",
    )
    .unwrap();
    s.set_read_timeout(Some(
        actrix_control::server::HEADER_READ_TIMEOUT + Duration::from_secs(5),
    ))
    .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 512];
    // The server answers 408 and closes, or just closes; it never waits forever.
    let mut got = Vec::new();
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("connection still open after {:?}: {e}", t0.elapsed()),
        }
    }
    let waited = t0.elapsed();
    assert!(
        waited >= actrix_control::server::HEADER_READ_TIMEOUT - Duration::from_secs(1),
        "closed too early ({waited:?}): {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(
        got.is_empty() || got.starts_with(b"HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&got)
    );
    // Meanwhile and afterwards the server answers complete requests.
    assert_eq!(get(&base(&h), "/healthz").0, 200);
}

/// Wait up to a second for `cond` (counters bumped as a connection is dropped).
fn wait_until(cond: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !cond() && t0.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: [u8; 4], to: std::net::SocketAddr) -> std::net::TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    s.bind(&std::net::SocketAddr::from((from, 0)).into())
        .unwrap();
    s.connect(&to.into()).unwrap();
    s.into()
}

/// How long until the server closes `s` (EOF or reset), or None if it is still open after
/// `within`.
fn closed_after(s: &mut std::net::TcpStream, within: Duration) -> Option<Duration> {
    use std::io::Read;
    let t0 = Instant::now();
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match s.read(&mut b) {
            Ok(0) => return Some(t0.elapsed()),
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Some(t0.elapsed()),
            Err(_) => return None,
        }
    }
}

/// `GET /healthz` from `from` with `Connection: close`; the status line's code.
fn healthz_from(from: [u8; 4], to: std::net::SocketAddr) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = connect_from(from, to);
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out)
        .split(' ')
        .nth(1)?
        .parse()
        .ok()
}

#[test]
fn silent_and_http2_connections_are_closed_at_the_first_bytes_deadline() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.http.first_bytes_timeout_secs = 1;
    let stats = actrix_control::http_stats::HttpStats::new();
    let h = ControlBuilder::new(cfg)
        .http_stats(stats.clone())
        .spawn()
        .unwrap();
    let addr = h.local_addr();
    let opened = Instant::now();
    // Nothing at all: closed at the deadline (before the fix: never).
    let mut silent = connect_from([127, 0, 0, 1], addr);
    // Two bytes of what could be a preface, then silence: also the deadline.
    let mut partial = connect_from([127, 0, 0, 1], addr);
    partial.write_all(b"PR").unwrap();
    // The HTTP/2 preface, with and without SETTINGS: refused at once.
    let mut preface = connect_from([127, 0, 0, 1], addr);
    preface
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .unwrap();
    let mut settings = connect_from([127, 0, 0, 1], addr);
    settings
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    for s in [&mut preface, &mut settings] {
        let t = closed_after(s, Duration::from_secs(3)).expect("closed");
        assert!(
            t < Duration::from_millis(500),
            "HTTP/2 refused at once ({t:?})"
        );
    }
    for s in [&mut silent, &mut partial] {
        assert!(
            closed_after(s, Duration::from_secs(4)).is_some(),
            "closed at the deadline"
        );
        let t = opened.elapsed();
        assert!(
            t >= Duration::from_millis(900),
            "not before the deadline ({t:?})"
        );
    }
    let c = &stats.conns;
    let n = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
    // Counted as the connection is dropped: give the last one a moment.
    wait_until(|| n(&c.first_bytes_timeouts) == 2);
    assert_eq!(n(&c.refused_http2), 2);
    assert_eq!(n(&c.first_bytes_timeouts), 2);
    // A request that starts in time is served: the deadline covers the first bytes, the
    // header timeout the rest.
    let mut slow = connect_from([127, 0, 0, 1], addr);
    slow.write_all(b"GET /hea").unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    slow.write_all(b"lthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    use std::io::Read;
    slow.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let _ = slow.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    wait_until(|| n(&c.open) == 0);
    assert_eq!(n(&c.open), 0, "every connection gave its slot back");
    h.shutdown().unwrap();
}

#[test]
fn connections_are_capped_per_source_and_in_all() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path());
    cfg.http.max_connections_per_ip = 3;
    cfg.http.first_bytes_timeout_secs = 2;
    let stats = actrix_control::http_stats::HttpStats::new();
    // The descriptor budget (as the appliance computes it) lowers the total below the
    // configured one.
    let h = ControlBuilder::new(cfg)
        .http_stats(stats.clone())
        .max_connections(5)
        .spawn()
        .unwrap();
    let addr = h.local_addr();
    let mut a: Vec<_> = (0..3).map(|_| connect_from([127, 0, 0, 1], addr)).collect();
    // The fourth from the same source is closed at once, before anything is read.
    let mut over = connect_from([127, 0, 0, 1], addr);
    let t = closed_after(&mut over, Duration::from_secs(1)).expect("refused");
    assert!(t < Duration::from_millis(500));
    // Another source is served.
    assert_eq!(healthz_from([127, 0, 0, 2], addr), Some(200));
    // Fill the total (3 + 2 = 5): a third source is refused too.
    std::thread::sleep(Duration::from_millis(100));
    let mut b: Vec<_> = (0..2).map(|_| connect_from([127, 0, 0, 2], addr)).collect();
    std::thread::sleep(Duration::from_millis(100));
    let mut third = connect_from([127, 0, 0, 3], addr);
    assert!(closed_after(&mut third, Duration::from_secs(1)).is_some());
    let n = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(n(&stats.conns.refused_per_ip), 1);
    assert!(n(&stats.conns.refused_total_cap) >= 1);
    assert_eq!(n(&stats.conns.open), 5);
    // The deadline frees the slots; then everyone is served again.
    for s in a.iter_mut().chain(b.iter_mut()) {
        assert!(closed_after(s, Duration::from_secs(4)).is_some());
    }
    assert_eq!(healthz_from([127, 0, 0, 1], addr), Some(200));
    assert_eq!(healthz_from([127, 0, 0, 3], addr), Some(200));
    h.shutdown().unwrap();
}

#[test]
fn the_tls_listener_has_the_same_deadline_and_caps() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert = dir.path().join("cert.pem");
    let key = dir.path().join("key.pem");
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    let mut cfg = ks_config(&dir.path().join("data"));
    cfg.http.tls_cert = Some(cert);
    cfg.http.tls_key = Some(key);
    cfg.http.first_bytes_timeout_secs = 1;
    cfg.http.max_connections_per_ip = 2;
    let stats = actrix_control::http_stats::HttpStats::new();
    let h = ControlBuilder::new(cfg)
        .http_stats(stats.clone())
        .spawn()
        .unwrap();
    let addr = h.local_addr();
    let opened = Instant::now();
    // No ClientHello: closed at the deadline.
    let mut silent = connect_from([127, 0, 0, 1], addr);
    let mut second = connect_from([127, 0, 0, 1], addr);
    let mut third = connect_from([127, 0, 0, 1], addr);
    assert!(
        closed_after(&mut third, Duration::from_millis(500)).is_some(),
        "per-IP cap on the TLS listener"
    );
    for s in [&mut silent, &mut second] {
        assert!(
            closed_after(s, Duration::from_secs(4)).is_some(),
            "closed at the deadline"
        );
        let t = opened.elapsed();
        assert!(
            t >= Duration::from_millis(900),
            "not before the deadline ({t:?})"
        );
    }
    let n = |x: &std::sync::atomic::AtomicU64| x.load(std::sync::atomic::Ordering::Relaxed);
    wait_until(|| n(&stats.conns.first_bytes_timeouts) == 2);
    assert_eq!(n(&stats.conns.first_bytes_timeouts), 2);
    assert_eq!(n(&stats.conns.refused_per_ip), 1);
    h.shutdown().unwrap();
}
