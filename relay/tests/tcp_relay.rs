//! RFC 6062 TCP allocations against the running binary, over real TCP: Connect and
//! ConnectionAttempt, ConnectionBind (also when it lands on another shard's listener), bytes
//! both ways through a joined pair with flow control (megabytes, checked), closes that travel
//! from one side to the other, the allocation's end closing everything, the peer policy and
//! the descriptors returning to where they were.

mod common;

use actrix_proto::stun::{self, attr, method};
use common::{Appliance, StreamClient};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

const USERS: &str = "[turn]\nusers = [{ name = \"alice\", password = \"secret-pass\" }, { name = \"bob\", password = \"bob-pass\" }]\nidentity_credentials = false\nallow_peers = [\"127.0.0.0/8\"]\n";
const REALM: &str = "actor-rtc.local";

fn start(dir: &std::path::Path, backend: &str, shards: &str) -> Appliance {
    Appliance::start_cores(
        dir,
        &format!("shards = {shards}"),
        "listen_tcp = [\"127.0.0.1:{port}\"]\nmax_connections_per_ip = 500\n",
        &format!("{USERS}[io]\nbackend = \"{backend}\"\n"),
    )
}

fn control(app: &Appliance) -> (StreamClient, SocketAddr) {
    let mut c = StreamClient::connect_tcp(app.stun, b"alice", b"secret-pass", REALM);
    let r = c
        .call(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])],
        )
        .expect("answered");
    assert_eq!(r.code(), None, "TCP allocation granted");
    let relayed = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    (c, relayed)
}

fn permit(c: &mut StreamClient, peer: SocketAddr) {
    let (_, req) = c.signed(method::CREATE_PERMISSION, &[], Some(peer));
    c.expect_ok(&req);
}

/// Connect to `peer`: the answer (success with CONNECTION-ID, or an error code).
fn connect(c: &mut StreamClient, peer: SocketAddr) -> Result<u32, u16> {
    let (tid, req) = c.signed(method::CONNECT, &[], Some(peer));
    // The answer may take as long as the connection attempt.
    c.send(&req);
    let until = Instant::now() + Duration::from_secs(40);
    while Instant::now() < until {
        if let Ok(Some(f)) = c.recv_frame(Duration::from_millis(100)) {
            let m = stun::Message::parse(&f).unwrap();
            if m.transaction_id() == &tid {
                return match m.get(attr::ERROR_CODE).and_then(stun::decode_error_code) {
                    Some((code, _)) => Err(code),
                    None => Ok(m.get_u32(attr::CONNECTION_ID).expect("CONNECTION-ID")),
                };
            }
            c.pending.push_back(f);
        }
    }
    panic!("no answer to Connect");
}

/// The next ConnectionAttempt on the control connection: (connection id, peer address).
fn connection_attempt(c: &mut StreamClient) -> (u32, SocketAddr) {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let f = match c.pending.pop_front() {
            Some(f) => f,
            None => match c.recv_frame(Duration::from_millis(100)) {
                Ok(Some(f)) => f,
                Ok(None) => {
                    assert!(Instant::now() < until, "no ConnectionAttempt");
                    continue;
                }
                Err(()) => panic!("control connection closed"),
            },
        };
        let m = stun::Message::parse(&f).unwrap();
        if m.method() == method::CONNECTION_ATTEMPT {
            return (
                m.get_u32(attr::CONNECTION_ID).expect("CONNECTION-ID"),
                m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(),
            );
        }
    }
}

/// A new client connection joined to connection `id`: the raw stream, and the bytes already
/// read past the ConnectionBind answer.
fn bind(app: &Appliance, user: &[u8], pass: &[u8], id: u32) -> Result<(TcpStream, Vec<u8>), u16> {
    let s = TcpStream::connect(app.stun).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut d = StreamClient::over(Box::new(s.try_clone().unwrap()), user, pass, REALM);
    let r = d
        .call(
            method::CONNECTION_BIND,
            &[(attr::CONNECTION_ID, id.to_be_bytes().to_vec())],
        )
        .expect("answered");
    match r.code() {
        Some(c) => Err(c),
        None => Ok((s, d.into_raw().1)),
    }
}

/// Write `data` on `w` while reading as much back from `r` on another thread; what `r` got.
fn through(w: &mut dyn Write, mut r: Box<dyn Read + Send>, data: &[u8]) -> Vec<u8> {
    let want = data.len();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::with_capacity(want);
        let mut buf = vec![0u8; 65536];
        let until = Instant::now() + Duration::from_secs(30);
        while got.len() < want && Instant::now() < until {
            match r.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(_) => break,
            }
        }
        if got.len() < want {
            eprintln!("through: got {} of {}", got.len(), want);
        }
        got
    });
    for chunk in data.chunks(50_000) {
        w.write_all(chunk).unwrap();
    }
    w.flush().unwrap();
    reader.join().unwrap()
}

fn pattern(n: usize, seed: u8) -> Vec<u8> {
    (0..n)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

fn open_fds(app: &Appliance) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", app.child.id()))
        .unwrap()
        .count()
}

fn tcp_relay(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let app = start(tmp.path(), backend, "\"auto\"");
    let (mut ctl, relayed) = control(&app);
    let fds_before = open_fds(&app);

    // Passive: a peer connects to the relayed address.
    let mut peer = TcpStream::connect(relayed).expect("the relayed address listens");
    peer.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    // Without a permission the peer is refused at once.
    let mut b = [0u8; 1];
    assert!(
        matches!(peer.read(&mut b), Ok(0) | Err(_)),
        "closed: no permission"
    );
    permit(&mut ctl, "127.0.0.1:9".parse().unwrap());
    let mut peer = TcpStream::connect(relayed).unwrap();
    let (id, from) = connection_attempt(&mut ctl);
    assert_eq!(from, peer.local_addr().unwrap());
    // Bytes the peer sends before the bind wait at the relay.
    peer.write_all(b"early bytes|").unwrap();
    // Another user cannot take the connection; an unknown id is 400.
    assert_eq!(bind(&app, b"bob", b"bob-pass", id).err(), Some(441));
    assert_eq!(
        bind(&app, b"alice", b"secret-pass", id ^ 0x55).err(),
        Some(400)
    );
    let (mut data, early) = bind(&app, b"alice", b"secret-pass", id).expect("bound");
    let mut got = early;
    let until = Instant::now() + Duration::from_secs(3);
    while got.len() < 12 && Instant::now() < until {
        let mut buf = [0u8; 64];
        if let Ok(n) = data.read(&mut buf) {
            got.extend_from_slice(&buf[..n]);
        }
    }
    assert_eq!(got, b"early bytes|");
    // Megabytes both ways, byte for byte (the relay's buffers are far smaller: flow control).
    let up = pattern(3 << 20, 1);
    let peer_r = peer.try_clone().unwrap();
    assert!(
        through(&mut data, Box::new(peer_r), &up) == up,
        "client to peer intact"
    );
    let down = pattern(3 << 20, 7);
    let data_r = data.try_clone().unwrap();
    let ok = through(&mut peer, Box::new(data_r), &down) == down;
    if !ok {
        let lines: Vec<String> = app.log.try_iter().collect();
        for l in lines.iter().rev().take(40).rev() {
            eprintln!("{l}");
        }
    }
    assert!(ok, "peer to client intact");
    // The peer closes: the client data connection ends too.
    drop(peer);
    assert!(closes(&mut data), "the data connection follows the peer");

    // Active: Connect to a listening peer, from the relayed address.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let target = listener.local_addr().unwrap();
    let id = connect(&mut ctl, target).expect("connected");
    let (mut p2, p2_from) = listener.accept().unwrap();
    assert_eq!(p2_from, relayed, "the peer sees the relayed address");
    // A second Connect to the same peer: 446.
    assert_eq!(connect(&mut ctl, target), Err(446));
    let (mut d2, early) = bind(&app, b"alice", b"secret-pass", id).expect("bound");
    assert!(early.is_empty());
    d2.write_all(b"ping").unwrap();
    p2.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut b4 = [0u8; 4];
    p2.read_exact(&mut b4).unwrap();
    assert_eq!(&b4, b"ping");
    p2.write_all(b"pong").unwrap();
    let mut r4 = [0u8; 4];
    read_exact_timeout(&mut d2, &mut r4);
    assert_eq!(&r4, b"pong");
    // Nobody listening: 447. A denied peer: 403, nothing connected.
    let closed_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    assert_eq!(connect(&mut ctl, closed_port), Err(447));
    for denied in [
        "10.1.2.3:80",
        "169.254.169.254:80",
        "192.168.1.1:80",
        "[::1]:80",
    ] {
        let code = connect(&mut ctl, denied.parse().unwrap()).unwrap_err();
        assert!(code == 403 || code == 443, "{denied}: {code}");
    }
    // The appliance's own listener is never a peer.
    assert_eq!(connect(&mut ctl, app.stun).err(), Some(403));

    // The allocation ends (Refresh 0): its connections and its listener close.
    let r = ctl
        .call(method::REFRESH, &[(attr::LIFETIME, vec![0; 4])])
        .unwrap();
    assert_eq!(r.code(), None);
    assert!(
        closes(&mut p2),
        "the peer's connection closes with the allocation"
    );
    // (The listening socket closes at the end of the shard's round, just after the answer.)
    let t0 = Instant::now();
    while TcpStream::connect(relayed).is_ok() {
        assert!(
            t0.elapsed() < Duration::from_secs(2),
            "the relayed address still listens"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(d2);
    drop(data);
    // Descriptors back where they were before the allocation: `fds_before` counted its
    // listening socket, which is gone with every data connection (the control connection's
    // socket stays open).
    let baseline = fds_before - 1;
    let t0 = Instant::now();
    while open_fds(&app) > baseline && t0.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        open_fds(&app),
        baseline,
        "the listener and data connections closed"
    );
    drop(app);
}

fn read_exact_timeout(r: &mut dyn Read, buf: &mut [u8]) {
    let until = Instant::now() + Duration::from_secs(3);
    let mut at = 0;
    while at < buf.len() {
        assert!(Instant::now() < until, "timed out");
        match r.read(&mut buf[at..]) {
            Ok(0) => panic!("closed"),
            Ok(n) => at += n,
            Err(_) => {}
        }
    }
}

/// Whether `s` is closed by the other end within 5 s (bytes meanwhile are discarded).
fn closes(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let t0 = Instant::now();
    let mut buf = [0u8; 4096];
    while t0.elapsed() < Duration::from_secs(5) {
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(_) => return true,
        }
    }
    false
}

#[test]
fn tcp_allocations_relay_both_ways_on_mmsg() {
    tcp_relay("mmsg");
}

#[test]
fn tcp_allocations_relay_both_ways_on_io_uring() {
    tcp_relay("io_uring");
}

/// The sum of `name`'s series whose labels contain `label` on `/metrics`.
fn metric_sum(app: &Appliance, name: &str, label: &str) -> u64 {
    let text = ureq::get(&format!("http://{}/metrics", app.http))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap();
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Over TLS, with two shards: data connections land on either shard's listener, and those
/// whose ConnectionBind belongs to the other shard are handed over (TLS state and buffered
/// bytes with them); every pair relays.
#[test]
fn connection_binds_reach_the_owning_shard_over_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_actrix"))
        .args(["cert", "--self-signed", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    let tls_port = common::free_tcp_port();
    let app = Appliance::start_cores(
        tmp.path(),
        "shards = [0, 1]",
        &format!(
            "listen_tls = [\"127.0.0.1:{tls_port}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\nmax_connections_per_ip = 500\n",
            cert.display(),
            key.display()
        ),
        &format!("{USERS}[io]\nbackend = \"mmsg\"\n"),
    );
    let tls_addr: SocketAddr = ([127, 0, 0, 1], tls_port).into();
    let cfg = common::tls_client_config(&[b"stun.turn"]);
    let (mut ctl, _) =
        StreamClient::connect_tls(tls_addr, cfg.clone(), b"alice", b"secret-pass", REALM);
    let r = ctl
        .call(
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])],
        )
        .unwrap();
    assert_eq!(r.code(), None);
    let relayed = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut pairs = Vec::new();
    for i in 0..16u8 {
        // Distinct peers: one connection per peer address.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let id = connect(&mut ctl, l.local_addr().unwrap()).expect("connected");
        let (mut p, from) = l.accept().unwrap();
        assert_eq!(from, relayed);
        let (mut d, _) =
            StreamClient::connect_tls(tls_addr, cfg.clone(), b"alice", b"secret-pass", REALM);
        d.creds.nonce = ctl.creds.nonce.clone();
        let (tid, req) = d.build(
            method::CONNECTION_BIND,
            &[(attr::CONNECTION_ID, id.to_be_bytes().to_vec())],
            true,
        );
        // Raw bytes right behind the request: they reach the peer once it is bound.
        let mut both = req.clone();
        both.extend_from_slice(&[b'>', i, i, i]);
        d.send(&both);
        let until = Instant::now() + Duration::from_secs(3);
        let answer = loop {
            assert!(Instant::now() < until, "no answer to ConnectionBind");
            if let Ok(Some(f)) = d.recv_frame(Duration::from_millis(100)) {
                break f;
            }
        };
        let m = stun::Message::parse(&answer).unwrap();
        assert_eq!(m.transaction_id(), &tid);
        assert_eq!(
            m.get(attr::ERROR_CODE),
            None,
            "bound with the control connection's nonce"
        );
        p.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut b = [0u8; 4];
        p.read_exact(&mut b).unwrap();
        assert_eq!(b, [b'>', i, i, i]);
        p.write_all(&[b'<', i]).unwrap();
        pairs.push((d, p, i));
    }
    for (d, _, i) in &mut pairs {
        let (mut s, mut rest) = std::mem::replace(
            d,
            StreamClient::over(Box::new(std::io::Cursor::new(Vec::new())), b"", b"", REALM),
        )
        .into_raw();
        let until = Instant::now() + Duration::from_secs(3);
        while rest.len() < 2 && Instant::now() < until {
            let mut b = [0u8; 16];
            if let Ok(n) = s.read(&mut b) {
                rest.extend_from_slice(&b[..n]);
            }
        }
        assert_eq!(rest, [b'<', *i]);
    }
    drop(listener);
    let out = metric_sum(
        &app,
        "actrix_tcp_connections_moved_total",
        "direction=\"out\"",
    );
    let inn = metric_sum(
        &app,
        "actrix_tcp_connections_moved_total",
        "direction=\"in\"",
    );
    assert!(out > 0, "some data connections landed on the other shard");
    assert_eq!(out, inn, "every one handed over was taken over");
    assert_eq!(
        metric_sum(&app, "actrix_tcp_connection_binds_total", "shard"),
        16
    );
}
