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
