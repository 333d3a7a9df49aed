//! Reliability checklist C4 and the probe's finding: under a lowered RLIMIT_NOFILE, a flood of
//! idle connections and HTTP/2 prefaces to the control listener must neither starve the data
//! plane of descriptors (new Allocates kept failing with 508) nor keep `/healthz` from other
//! sources waiting; the connections are closed at the first-bytes deadline and everything
//! recovers.

mod common;

use common::{Appliance, Launch, TurnClient};
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

const NOFILE: u64 = 256;
const FIRST_BYTES_SECS: u64 = 3;

/// A TCP connection to `to` from the loopback address `from`.
fn connect_from(from: IpAddr, to: SocketAddr) -> std::io::Result<TcpStream> {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    s.bind(&SocketAddr::new(from, 0).into())?;
    s.connect_timeout(&to.into(), Duration::from_secs(2))?;
    Ok(s.into())
}

/// `GET path` from `from` on a fresh connection; the status, or None when the server closed
/// the connection or did not answer within 2 s.
fn get_from(from: IpAddr, to: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = connect_from(from, to).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1)?.parse().ok()?;
    Some((status, text))
}

/// Whether the server closed `s` (EOF or reset) within `within`.
fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
        ),
    }
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

fn allocate(app: &Appliance) -> Option<u16> {
    let mut c = TurnClient::new(app.stun, b"alice", b"alice-password", "actor-rtc.local");
    let r = c.allocate(3).expect("the allocate is answered");
    r.code()
}

#[test]
fn a_control_plane_connection_flood_leaves_the_data_plane_its_descriptors() {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::launch(
        tmp.path(),
        "[turn]\nmax_allocations = 20\nusers = [{ name = \"alice\", password = \"alice-password\" }]\n\
         [io]\nrelay_socket_pool = 0\n",
        Launch {
            sections: &[
                ("cores", "shards = [0]"),
                (
                    "http",
                    &format!("first_bytes_timeout_secs = {FIRST_BYTES_SECS}\nmax_connections_per_ip = 64"),
                ),
            ],
            nofile: Some(NOFILE),
            ..Launch::default()
        },
    );
    let budget = app
        .early_log
        .iter()
        .find(|l| l.contains("descriptor budget"))
        .cloned()
        .unwrap_or_default();
    assert!(budget.contains("limit=256"), "{budget}");
    let lo = |n: u8| IpAddr::from([127, 0, 0, n]);

    // HTTP/2 prefaces (with a SETTINGS frame): refused at once, never held.
    let mut h2 = Vec::new();
    for _ in 0..20 {
        let mut s = connect_from(lo(1), app.http).unwrap();
        s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .unwrap();
        h2.push(s);
    }
    for s in &mut h2 {
        assert!(
            closed_by_server(s, Duration::from_secs(1)),
            "an HTTP/2 preface is refused at once"
        );
    }
    // 130 connections that send nothing, from one source.
    let t0 = Instant::now();
    let mut idle: Vec<TcpStream> = (0..130)
        .map(|_| connect_from(lo(1), app.http).unwrap())
        .collect();
    // Another source is served at once, and the data plane allocates.
    let (st, _) = get_from(lo(2), app.http, "/healthz").expect("/healthz answers");
    assert_eq!(st, 200);
    assert_eq!(allocate(&app), None, "Allocate succeeds under the flood");
    // Connections from many sources, well past what the limit could hold: the control side
    // is capped, the data plane keeps its reserve.
    for n in 3..=7 {
        for _ in 0..60 {
            if let Ok(s) = connect_from(lo(n), app.http) {
                idle.push(s);
            }
        }
    }
    assert_eq!(
        allocate(&app),
        None,
        "Allocate succeeds with the control side at its cap"
    );
    assert!(t0.elapsed() < Duration::from_secs(FIRST_BYTES_SECS));
    // The idle connections are closed at the first-bytes deadline...
    std::thread::sleep(Duration::from_secs(FIRST_BYTES_SECS + 1));
    let mut still_open = 0;
    for s in &mut idle {
        if !closed_by_server(s, Duration::from_millis(20)) {
            still_open += 1;
        }
    }
    assert_eq!(still_open, 0, "every idle connection was closed");
    drop(idle);
    // ...and everything recovers, the flooding source included.
    let (st, _) = get_from(lo(1), app.http, "/healthz").expect("/healthz answers again");
    assert_eq!(st, 200);
    assert_eq!(allocate(&app), None);
    let (_, metrics) = get_from(lo(2), app.http, "/metrics").expect("/metrics");
    assert!(
        metric(
            &metrics,
            "actrix_http_connections_refused_total{reason=\"http2\"}"
        ) >= 20,
        "{metrics}"
    );
    assert!(
        metric(
            &metrics,
            "actrix_http_connections_refused_total{reason=\"per_ip_cap\"}"
        ) >= 66
    );
    assert!(
        metric(
            &metrics,
            "actrix_http_connections_refused_total{reason=\"first_bytes_timeout\"}"
        ) >= 130
    );
    assert_eq!(
        metric(
            &metrics,
            "actrix_http_connections_refused_total{reason=\"accept_error\"}"
        ),
        0,
        "the process never ran out of descriptors"
    );
    let refused: u64 = metrics
        .lines()
        .filter(|l| l.starts_with("actrix_allocations_refused_total") && l.contains("capacity"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64;
    assert_eq!(refused, 0, "no 508");
}
