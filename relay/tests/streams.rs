//! TURN over TCP (RFC 8656 §3.1) against the running binary: relaying both ways with the
//! stream framing (ChannelData padded to 4 bytes), the allocation ending with its connection,
//! and bad streams (garbage, oversized and truncated frames, empty connections, too many
//! connections from one address, a client that never reads) closing only themselves.

mod common;

use actrix_proto::stun::{attr, encode_xor_addr, method, Class, Message, MessageWriter};
use common::{Appliance, StreamClient, TurnClient};
use std::io::Write;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

const USERS: &str = "[turn]\nusers = [{ name = \"alice\", password = \"secret-pass\" }]\nidentity_credentials = false\nallow_peers = [\"127.0.0.0/8\"]\n";

fn start(dir: &std::path::Path, stun: &str) -> Appliance {
    start_on(dir, stun, "mmsg")
}

fn start_on(dir: &std::path::Path, stun: &str, backend: &str) -> Appliance {
    Appliance::start_stun(
        dir,
        &format!("listen_tcp = [\"127.0.0.1:{{port}}\"]\n{stun}"),
        &format!("{USERS}[io]\nbackend = \"{backend}\"\n"),
    )
}

fn tcp_client(app: &Appliance) -> StreamClient {
    StreamClient::connect_tcp(app.stun, b"alice", b"secret-pass", "actor-rtc.local")
}

/// Sum over shards (and labels matching `label`) of a metric.
fn metric(app: &Appliance, name: &str, label: Option<(&str, &str)>) -> f64 {
    let body = ureq::get(&format!("http://{}/metrics", app.http))
        .call()
        .expect("scrape")
        .body_mut()
        .read_to_string()
        .unwrap();
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let parsed = prometheus_parse::Scrape::parse(lines).expect("valid exposition");
    parsed
        .samples
        .iter()
        .filter(|s| s.metric == name)
        .filter(|s| label.is_none_or(|(k, v)| s.labels.get(k) == Some(v)))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => 0.0,
        })
        .sum()
}

fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + Duration::from_secs(5);
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn open_fds(app: &Appliance) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", app.child.id()))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn send_indication(c: &mut StreamClient, peer: SocketAddr, data: &[u8]) {
    let mut buf = vec![0u8; 256];
    let tid = [9u8; 12];
    let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, &tid).unwrap();
    let mut v = [0u8; 20];
    let n = encode_xor_addr(peer, &tid, &mut v);
    w.add(attr::XOR_PEER_ADDRESS, &v[..n]).unwrap();
    w.add(attr::DATA, data).unwrap();
    let n = w.finish();
    c.send(&buf[..n]);
}

#[test]
fn turn_over_tcp_relays_both_ways_and_ends_with_the_connection() {
    relays_over_tcp("mmsg");
}

#[test]
fn turn_over_tcp_on_the_io_uring_backend() {
    relays_over_tcp("io_uring");
}

fn relays_over_tcp(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let app = start_on(tmp.path(), "", backend);
    let mut c = tcp_client(&app);
    let relayed = c.allocate_relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let (_, req) = c.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x01, 0, 0])],
        Some(peer_addr),
    );
    c.expect_ok(&req);
    assert_eq!(metric(&app, "actrix_allocations_active", None), 1.0);
    assert_eq!(
        metric(
            &app,
            "actrix_stream_connections",
            Some(("transport", "tcp"))
        ),
        1.0
    );

    let mut buf = [0u8; 2048];
    for i in 0..50u8 {
        // Client → peer: ChannelData padded to 4 bytes on the stream; two frames in one write.
        let payload = vec![i; 1 + (i as usize % 7)];
        let mut frame = vec![0x40, 0x01, 0, payload.len() as u8];
        frame.extend_from_slice(&payload);
        while frame.len() % 4 != 0 {
            frame.push(0);
        }
        let mut two = frame.clone();
        two.extend_from_slice(&frame);
        c.send(&two);
        for _ in 0..2 {
            let (n, from) = peer.recv_from(&mut buf).expect("peer receives");
            assert_eq!(from, relayed);
            assert_eq!(
                &buf[..n],
                &payload[..],
                "the payload alone reaches the peer"
            );
        }
        // Peer → client: a ChannelData frame, padded on the stream.
        let back = vec![0xA0 ^ i; 3 + (i as usize % 5)];
        peer.send_to(&back, relayed).unwrap();
        let f = c
            .recv_frame(Duration::from_secs(2))
            .expect("open")
            .expect("a frame");
        assert_eq!(&f[..4], &[0x40, 0x01, 0, back.len() as u8]);
        assert_eq!(&f[4..], &back[..]);
    }
    // A Send indication to a second peer (a permission comes with it only via ChannelBind, so
    // make one), and its answer as a Data indication.
    let peer2 = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer2
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (_, req) = c.signed(
        method::CREATE_PERMISSION,
        &[],
        Some(peer2.local_addr().unwrap()),
    );
    c.expect_ok(&req);
    send_indication(&mut c, peer2.local_addr().unwrap(), b"via-send");
    let (n, from) = peer2.recv_from(&mut buf).expect("peer2 receives");
    assert_eq!((&buf[..n], from), (&b"via-send"[..], relayed));
    peer2.send_to(b"data-ind", relayed).unwrap();
    let f = c
        .recv_frame(Duration::from_secs(2))
        .unwrap()
        .expect("frame");
    let m = Message::parse(&f).expect("a Data indication");
    assert_eq!(m.method(), method::DATA);
    assert_eq!(m.get(attr::DATA).unwrap(), b"data-ind");

    // The connection closes: its allocation ends with it.
    drop(c);
    wait_for("the allocation to end", || {
        metric(&app, "actrix_allocations_active", None) == 0.0
    });
    wait_for("the connection count to drop", || {
        metric(
            &app,
            "actrix_stream_connections",
            Some(("transport", "tcp")),
        ) == 0.0
    });
    assert_eq!(
        metric(
            &app,
            "actrix_stream_closed_total",
            Some(("reason", "by_client"))
        ),
        1.0
    );
    // Nothing more leaves the relayed address.
    peer.send_to(b"late", relayed).unwrap();
    assert!(peer.recv_from(&mut buf).is_err());
}

#[test]
fn bad_streams_close_only_themselves() {
    bad_streams("mmsg");
}

#[test]
fn bad_streams_close_only_themselves_on_io_uring() {
    bad_streams("io_uring");
}

fn bad_streams(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let app = start_on(
        tmp.path(),
        "first_request_timeout_secs = 1\nmax_connections_per_ip = 6\n",
        backend,
    );
    // A good client, kept through everything below.
    let mut good = tcp_client(&app);
    let relayed = good.allocate_relayed();
    let baseline = open_fds(&app);

    // Garbage (first bits 11): closed at once.
    let mut g = tcp_client(&app);
    g.send(&[0xFF; 64]);
    assert!(g.closed_within(Duration::from_secs(2)), "garbage stream");
    // A STUN header announcing 8000 bytes: over the frame limit, closed.
    let mut big = tcp_client(&app);
    big.send(&[
        0x00, 0x01, 0x1F, 0x40, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
    ]);
    assert!(big.closed_within(Duration::from_secs(2)), "oversized frame");
    // Half a header, then silence (a slowloris): closed at the first-request deadline.
    let mut slow = tcp_client(&app);
    slow.send(&[0x00, 0x01, 0x00]);
    let t0 = Instant::now();
    assert!(
        slow.closed_within(Duration::from_secs(4)),
        "truncated frame"
    );
    assert!(
        t0.elapsed() >= Duration::from_millis(500),
        "not before its deadline"
    );
    // Empty connections, opened and closed.
    for _ in 0..50 {
        drop(TcpStream::connect(app.stun).unwrap());
    }
    // Once the shard has seen them close, only the good client is open.
    let t0 = Instant::now();
    while metric(&app, "actrix_stream_connections", None) > 1.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(5),
            "empty connections stay open"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Connections held without a word: at most 6 from one address (the good one is one).
    let held: Vec<TcpStream> = (0..5)
        .map(|_| TcpStream::connect(app.stun).unwrap())
        .collect();
    let mut refused = tcp_client(&app);
    assert!(
        refused.closed_within(Duration::from_secs(2)),
        "the seventh connection from one address"
    );
    assert!(
        metric(
            &app,
            "actrix_stream_closed_total",
            Some(("reason", "too_many_from_address"))
        ) >= 1.0
    );
    // The held ones time out (no allocation), and descriptors return to the baseline.
    drop(held);
    wait_for("descriptors back to the baseline", || {
        open_fds(&app) <= baseline
    });
    assert!(
        metric(
            &app,
            "actrix_stream_closed_total",
            Some(("reason", "garbage"))
        ) >= 2.0
    );
    assert!(
        metric(
            &app,
            "actrix_stream_closed_total",
            Some(("reason", "first_request_timeout"))
        ) >= 1.0
    );

    // The good client was never disturbed: it still relays.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (_, req) = good.signed(
        method::CREATE_PERMISSION,
        &[],
        Some(peer.local_addr().unwrap()),
    );
    good.expect_ok(&req);
    send_indication(&mut good, peer.local_addr().unwrap(), b"still-here");
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).expect("relayed");
    assert_eq!((&buf[..n], from), (&b"still-here"[..], relayed));
    // A UDP client too.
    let mut udp = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    assert!(udp.allocate(3).is_some());
}

#[test]
fn a_client_that_never_reads_loses_relayed_data_not_the_shard() {
    let tmp = tempfile::tempdir().unwrap();
    let app = start(tmp.path(), "stream_send_buffer = 8192\n");
    // The reader that never reads: a small receive buffer, and no read calls.
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    sock.connect(&app.stun.into()).unwrap();
    let stream: TcpStream = sock.into();
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut c = StreamClient::over(
        Box::new(stream),
        b"alice",
        b"secret-pass",
        "actor-rtc.local",
    );
    let relayed = c.allocate_relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let (_, req) = c.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x02, 0, 0])],
        Some(peer.local_addr().unwrap()),
    );
    c.expect_ok(&req);
    // The peer floods: far more than the socket buffers and the send buffer hold.
    let payload = [0x5Cu8; 1000];
    for _ in 0..3000 {
        let _ = peer.send_to(&payload, relayed);
    }
    wait_for("overflow to be counted", || {
        metric(&app, "actrix_stream_send_overflow_total", None) > 0.0
    });
    // Meanwhile the shard serves others.
    let mut udp = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    assert!(udp.allocate(3).is_some(), "the shard still answers");
    // The slow reader then reads: whole frames only, all intact.
    let mut frames = 0;
    while let Ok(Some(f)) = c.recv_frame(Duration::from_millis(300)) {
        assert_eq!(&f[..4], &[0x40, 0x02, 0x03, 0xE8]);
        assert!(f[4..].iter().all(|&b| b == 0x5C));
        frames += 1;
    }
    assert!(frames > 0 && frames < 3000, "{frames} frames");
    // The connection is still usable.
    let (_, req) = c.signed(
        method::REFRESH,
        &[(attr::LIFETIME, vec![0, 0, 2, 0x58])],
        None,
    );
    let mut out = Vec::new();
    out.extend_from_slice(&req);
    c.stream.write_all(&out).unwrap();
    let tid = *Message::parse(&req).unwrap().transaction_id();
    let until = Instant::now() + Duration::from_secs(3);
    let mut answered = false;
    while Instant::now() < until && !answered {
        if let Ok(Some(f)) = c.recv_frame(Duration::from_millis(100)) {
            answered = Message::parse(&f).is_ok_and(|m| m.transaction_id() == &tid);
        }
    }
    assert!(answered, "the Refresh is answered after the flood");
}
