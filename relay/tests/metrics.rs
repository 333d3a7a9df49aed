//! `/metrics` reports what the data plane did: send known traffic, scrape, parse the
//! exposition with a Prometheus text parser, and compare.

mod common;

use actrix_proto::stun::{method, Class, MessageWriter};
use common::{Appliance, TurnClient};
use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::Duration;

fn scrape(app: &Appliance) -> (String, HashMap<String, f64>) {
    let url = format!("http://{}/metrics", app.http);
    let mut resp = ureq::get(&url).call().expect("scrape");
    let ctype = resp
        .headers()
        .get("content-type")
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert!(ctype.starts_with("text/plain"), "{ctype}");
    let body = resp.body_mut().read_to_string().unwrap();
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    let mut out = HashMap::new();
    for s in parsed.samples {
        let mut labels: Vec<String> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        labels.sort();
        let v = match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => continue,
        };
        out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), v);
    }
    (body, out)
}

#[test]
fn scraped_values_match_the_traffic_sent() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        "[turn]\nusers = [{ name = \"alice\", password = \"secret-pass\" }]\nidentity_credentials = false\n",
    );
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut buf = [0u8; 1500];
    for i in 0..10u8 {
        let mut req = [0u8; 20];
        let n = MessageWriter::new(&mut req, method::BINDING, Class::Request, &[i; 12])
            .unwrap()
            .finish();
        sock.send_to(&req[..n], app.stun).unwrap();
        sock.recv_from(&mut buf).expect("binding answered");
    }
    for g in [&b"GET / HTTP/1.1\r\n"[..], b"\xff\xfe", b"\x80\x00\x00\x00"] {
        sock.send_to(g, app.stun).unwrap();
    }
    let mut c = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    assert_eq!(c.allocate(3).unwrap().code(), None);
    let mut bad = TurnClient::new(app.stun, b"alice", b"wrong-pass", "actor-rtc.local");
    assert_eq!(bad.allocate(3).unwrap().code(), Some(401));
    std::thread::sleep(Duration::from_millis(300));
    for path in [
        "/ks/health",
        "/ks/health",
        "/ais/health",
        "/no/such/path/12345",
    ] {
        let _ = ureq::get(&format!("http://{}{path}", app.http))
            .config()
            .http_status_as_error(false)
            .build()
            .call();
    }

    let (body, m) = scrape(&app);
    let get = |k: &str| *m.get(k).unwrap_or_else(|| panic!("missing {k} in\n{body}"));
    assert_eq!(get("actrix_binding_requests_total{shard=0}"), 10.0);
    // 0xFF and 0x80 start neither STUN nor ChannelData; "GET" starts like ChannelData (0b01)
    // with an invalid channel number.
    assert_eq!(get("actrix_drops_total{reason=not_stun,shard=0}"), 2.0);
    assert_eq!(get("actrix_drops_total{reason=malformed,shard=0}"), 1.0);
    assert_eq!(get("actrix_allocations_active{shard=0}"), 1.0);
    // The allocation's deadline is armed in the timer wheel (soaks watch these gauges).
    assert!(get("actrix_timers_pending{shard=0}") >= 1.0);
    assert_eq!(get("actrix_reservations_active{shard=0}"), 0.0);
    assert_eq!(get("actrix_allocations_created_total{shard=0}"), 1.0);
    // One challenge per client (the good and the bad one), one bad password.
    assert_eq!(get("actrix_auth_challenges_total{shard=0}"), 2.0);
    assert_eq!(
        get("actrix_auth_failures_total{reason=integrity,shard=0}"),
        1.0
    );
    assert_eq!(get("actrix_auth_failures_total{reason=nonce,shard=0}"), 0.0);
    // 10 bindings + 3 garbage + 2 x (challenge + authenticated request).
    assert_eq!(
        get("actrix_packets_received_total{shard=0,side=client}"),
        17.0
    );
    assert!(get("process_resident_memory_bytes{}") > 1e6);
    // Upstream Actrix's names for the same figures, as an upstream node exports them
    // (aliases, control/WIRE-0.4.md section 7).
    assert_eq!(get("actrix_turn_active_sessions{}"), 1.0);
    assert_eq!(
        get("actrix_actrix_turn_allocations_total{status=success}"),
        1.0
    );
    assert_eq!(
        get("actrix_actrix_turn_allocations_total{status=failed}"),
        0.0
    );
    assert_eq!(
        get("actrix_actrix_auth_failures_total{reason=integrity,service=turn}"),
        1.0
    );
    assert_eq!(
        get("actrix_actrix_auth_failures_total{reason=nonce,service=turn}"),
        0.0
    );
    assert_eq!(get("actrix_websocket_connections{}"), 0.0);
    assert_eq!(get("actrix_actrix_actors_total{}"), 0.0);
    assert_eq!(
        get("actrix_actrix_requests_total{method=GET,path=/ks/health,service=ks,status=200}"),
        2.0
    );
    assert_eq!(
        get("actrix_http_requests_total{method=GET,route=/ks/health,service=ks,status=200}"),
        2.0
    );
    // No label carries an address or a username.
    assert!(
        !body.contains("127.0.0.1") && !body.contains("alice"),
        "{body}"
    );
}
