//! TURN over DTLS (RFC 7350 §4) against the running binary, with a real DTLS 1.2 client (the
//! `dimpl` engine in the client role) over real UDP, on a self-signed ECDSA certificate from
//! `actrix cert --self-signed`: the cookie exchange, an allocation relaying to a UDP peer
//! both ways, garbage and a handshake flood hurting no one else, and an association's end
//! (close_notify, idleness, the handshake deadline) ending what it held.

mod common;

use actrix_proto::stun::{attr, method, Message};
use common::{Appliance, Creds};
use rustls::pki_types::pem::PemObject;
use std::collections::VecDeque;
use std::net::{SocketAddr, UdpSocket};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const REALM: &str = "actor-rtc.local";

fn self_signed(dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
    let (cert, key) = (
        dir.join(format!("{name}-cert.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_actrix"))
        .args(["cert", "--self-signed", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    (cert, key)
}

fn start(dir: &Path, stun: &str, backend: &str) -> (Appliance, SocketAddr) {
    let (cert, key) = self_signed(dir, "server");
    let port = common::free_udp_port();
    let app = Appliance::start_stun(
        dir,
        &format!(
            "listen_dtls = [\"127.0.0.1:{port}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{stun}",
            cert.display(),
            key.display()
        ),
        &format!("[turn]\nusers = [{{ name = \"alice\", password = \"secret-pass\" }}]\nidentity_credentials = false\nallow_peers = [\"127.0.0.0/8\"]\n[io]\nbackend = \"{backend}\"\n"),
    );
    (app, SocketAddr::from(([127, 0, 0, 1], port)))
}

fn client_certificate(dir: &Path) -> dimpl::DtlsCertificate {
    let (cert, key) = self_signed(dir, "client");
    dimpl::DtlsCertificate {
        certificate: rustls::pki_types::CertificateDer::from_pem_file(&cert)
            .unwrap()
            .to_vec(),
        private_key: rustls::pki_types::PrivateKeyDer::from_pem_file(&key)
            .unwrap()
            .secret_der()
            .to_vec(),
    }
}

/// A blocking DTLS 1.2 client speaking TURN, one message per record.
struct DtlsClient {
    sock: UdpSocket,
    tls: dimpl::Dtls,
    out: Vec<u8>,
    rx: VecDeque<Vec<u8>>,
    creds: Creds,
    connected: bool,
    close_notify: bool,
    next: Option<Instant>,
    /// Datagrams received from the server before the handshake finished.
    handshake_datagrams: usize,
    /// The server's certificate (DER).
    peer_cert: Vec<u8>,
}

impl DtlsClient {
    fn connect(server: SocketAddr, cert: &dimpl::DtlsCertificate) -> DtlsClient {
        let mut c = Self::start(server, cert);
        let until = Instant::now() + Duration::from_secs(5);
        while !c.connected {
            assert!(Instant::now() < until, "DTLS handshake did not finish");
            c.step(until);
        }
        c
    }

    /// Send the first ClientHello only.
    fn start(server: SocketAddr, cert: &dimpl::DtlsCertificate) -> DtlsClient {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.connect(server).unwrap();
        let config = dimpl::Config::builder()
            .with_crypto_provider(dimpl::crypto::rust_crypto::default_provider())
            .build()
            .unwrap();
        let mut tls = dimpl::Dtls::new_12(Arc::new(config), cert.clone(), Instant::now());
        tls.set_active(true);
        let mut c = DtlsClient {
            sock,
            tls,
            out: vec![0; 4096],
            rx: VecDeque::new(),
            creds: Creds::new(b"alice", b"secret-pass", REALM),
            connected: false,
            close_notify: false,
            next: None,
            handshake_datagrams: 0,
            peer_cert: Vec::new(),
        };
        c.tls.handle_timeout(Instant::now()).unwrap();
        c.pump();
        c
    }

    fn pump(&mut self) {
        loop {
            match self.tls.poll_output(&mut self.out) {
                dimpl::Output::Packet(p) => {
                    let _ = self.sock.send(p);
                }
                dimpl::Output::Timeout(t) => {
                    self.next = Some(t);
                    break;
                }
                dimpl::Output::Connected => self.connected = true,
                dimpl::Output::ApplicationData(d) => self.rx.push_back(d.to_vec()),
                dimpl::Output::CloseNotify => self.close_notify = true,
                dimpl::Output::PeerCert(der) => self.peer_cert = der.to_vec(),
                dimpl::Output::BufferTooSmall { needed } => self.out.resize(needed, 0),
                _ => {}
            }
        }
    }

    /// Wait for one datagram or the engine's timer (at most until `until`), feed it, drain.
    fn step(&mut self, until: Instant) {
        let now = Instant::now();
        let wake = self.next.map_or(until, |t| t.min(until));
        let wait = wake
            .saturating_duration_since(now)
            .max(Duration::from_millis(1));
        self.sock.set_read_timeout(Some(wait)).unwrap();
        let mut buf = [0u8; 4096];
        match self.sock.recv(&mut buf) {
            Ok(n) => {
                if !self.connected {
                    self.handshake_datagrams += 1;
                }
                let _ = self.tls.handle_packet(&buf[..n]);
            }
            Err(_) => {
                let _ = self.tls.handle_timeout(Instant::now());
            }
        }
        self.pump();
    }

    fn send(&mut self, bytes: &[u8]) {
        self.tls.send_application_data(bytes).unwrap();
        self.pump();
    }

    fn recv(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let until = Instant::now() + wait;
        loop {
            if let Some(m) = self.rx.pop_front() {
                return Some(m);
            }
            if Instant::now() >= until || self.close_notify {
                return None;
            }
            self.step(until);
        }
    }

    /// Send a request and wait for the response with its transaction id (retransmitting).
    fn transact(&mut self, tid: &[u8; 12], bytes: &[u8]) -> Option<Vec<u8>> {
        for _ in 0..4 {
            self.send(bytes);
            let until = Instant::now() + Duration::from_millis(500);
            while let Some(m) = self.recv(until.saturating_duration_since(Instant::now())) {
                if Message::parse(&m).is_ok_and(|p| p.transaction_id() == tid) {
                    return Some(m);
                }
            }
        }
        None
    }

    fn code(bytes: &[u8]) -> Option<u16> {
        Message::parse(bytes)
            .unwrap()
            .get(attr::ERROR_CODE)
            .and_then(actrix_proto::stun::decode_error_code)
            .map(|(c, _)| c)
    }

    fn allocate_relayed(&mut self) -> SocketAddr {
        let attrs = [(attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])];
        let (tid, req) = self.creds.build(method::ALLOCATE, &attrs, false);
        let r = self.transact(&tid, &req).expect("401 answered");
        assert_eq!(Self::code(&r), Some(401));
        self.creds.nonce = Message::parse(&r)
            .unwrap()
            .get(attr::NONCE)
            .unwrap()
            .to_vec();
        let (tid, req) = self.creds.build(method::ALLOCATE, &attrs, true);
        let r = self.transact(&tid, &req).expect("allocate answered");
        assert_eq!(Self::code(&r), None, "allocation granted");
        Message::parse(&r)
            .unwrap()
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .expect("XOR-RELAYED-ADDRESS")
            .expect("valid address")
    }

    fn channel_bind(&mut self, channel: u16, peer: SocketAddr) {
        let mut num = channel.to_be_bytes().to_vec();
        num.extend_from_slice(&[0, 0]);
        let (tid, req) = self.creds.signed(
            method::CHANNEL_BIND,
            &[(attr::CHANNEL_NUMBER, num)],
            Some(peer),
        );
        let r = self.transact(&tid, &req).expect("channel bind answered");
        assert_eq!(Self::code(&r), None, "channel bound");
    }
}

fn metrics_text(app: &Appliance) -> String {
    ureq::get(&format!("http://{}/metrics", app.http))
        .call()
        .unwrap()
        .body_mut()
        .read_to_string()
        .unwrap()
}

/// The sum over shards of a metric's samples whose labels contain every one of `labels`.
fn metric(app: &Appliance, name: &str, labels: &[&str]) -> u64 {
    metrics_text(app)
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|x| l.contains(x)))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap() as u64)
        .sum()
}

fn wait_for(app: &Appliance, name: &str, labels: &[&str], want: u64) -> u64 {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        let v = metric(app, name, labels);
        if v == want || Instant::now() > until {
            return v;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn turn_over_dtls_relays_both_ways_after_the_cookie_exchange() {
    relays_over_dtls("mmsg");
}

#[test]
fn turn_over_dtls_on_the_io_uring_backend() {
    relays_over_dtls("io_uring");
}

#[test]
fn turn_over_dtls_on_the_glommio_backend() {
    relays_over_dtls("glommio");
}

fn relays_over_dtls(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (app, server) = start(tmp.path(), "", backend);
    let cert = client_certificate(tmp.path());
    let mut c = DtlsClient::connect(server, &cert);
    // A HelloVerifyRequest, the server's flight, its Finished.
    assert!(c.handshake_datagrams >= 3, "{}", c.handshake_datagrams);
    assert_eq!(metric(&app, "actrix_dtls_hello_verify_total", &[]), 1);
    let relayed = c.allocate_relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.channel_bind(0x4005, peer.local_addr().unwrap());
    let mut buf = [0u8; 2048];
    for i in 0..40u8 {
        c.send(&[0x40, 0x05, 0, 3, i, i, i]);
        let (n, from) = peer.recv_from(&mut buf).expect("peer receives");
        assert_eq!((&buf[..n], from), (&[i, i, i][..], relayed));
        peer.send_to(&[i; 6], relayed).unwrap();
        let m = c
            .recv(Duration::from_secs(2))
            .expect("relayed to the client");
        assert_eq!(m, [&[0x40, 0x05, 0, 6][..], &[i; 6][..]].concat());
    }
    // A full-size datagram both ways.
    let big = vec![7u8; 1200];
    c.send(&[&[0x40, 0x05, 0x04, 0xB0][..], &big].concat());
    let (n, _) = peer.recv_from(&mut buf).expect("peer receives");
    assert_eq!(&buf[..n], &big[..]);
    peer.send_to(&big, relayed).unwrap();
    let m = c
        .recv(Duration::from_secs(2))
        .expect("relayed to the client");
    assert_eq!(&m[4..], &big[..]);
    assert_eq!(
        metric(&app, "actrix_stream_connections", &["transport=\"dtls\""]),
        1
    );
    assert_eq!(
        metric(
            &app,
            "actrix_dtls_handshakes_total",
            &["result=\"completed\""]
        ),
        1
    );
    assert_eq!(metric(&app, "actrix_allocations_active", &[]), 1);
}

#[test]
fn garbage_and_a_handshake_flood_hurt_no_one_else() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, server) = start(tmp.path(), "tls_handshake_timeout_secs = 1\n", "mmsg");
    let cert = client_certificate(tmp.path());
    let mut good = DtlsClient::connect(server, &cert);
    let relayed = good.allocate_relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    good.channel_bind(0x4001, peer.local_addr().unwrap());

    // Garbage and cookieless ClientHellos from many sources: answered statelessly or
    // dropped, nothing kept.
    let mut flood = Vec::new();
    for i in 0..50u8 {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.send_to(&[i; 200], server).unwrap();
        s.send_to(&[22, 0xfe, 0xfd, 0, 0, i], server).unwrap();
        flood.push(s);
    }
    let mut hello_only = Vec::new();
    for _ in 0..50 {
        hello_only.push(DtlsClient::start(server, &cert));
    }
    // Clients that get past the cookie exchange and then stop: they hold an association
    // until the handshake deadline, and then nothing.
    let mut stalled = Vec::new();
    for _ in 0..10 {
        let mut c = DtlsClient::start(server, &cert);
        // Answer our HelloVerifyRequest (the engine's second one is left unanswered).
        c.step(Instant::now() + Duration::from_secs(1));
        stalled.push(c);
    }
    assert!(
        metric(&app, "actrix_dtls_stray_total", &[]) >= 50,
        "garbage counted"
    );
    assert!(metric(&app, "actrix_dtls_hello_verify_total", &[]) >= 61);
    assert!(
        metric(&app, "actrix_stream_connections", &["transport=\"dtls\""]) <= 11,
        "cookieless ClientHellos keep no state"
    );
    for i in 0..20u8 {
        good.send(&[0x40, 0x01, 0, 2, i, i]);
        let (n, _) = peer.recv_from(&mut [0u8; 64]).expect("still relayed");
        assert_eq!(n, 2);
        peer.send_to(&[i; 3], relayed).unwrap();
        let m = good
            .recv(Duration::from_secs(2))
            .expect("still relayed back");
        assert_eq!(m, [0x40, 0x01, 0, 3, i, i, i]);
    }
    // The stalled ones end at their deadline; the good one stays.
    let open = wait_for(
        &app,
        "actrix_stream_connections",
        &["transport=\"dtls\""],
        1,
    );
    let dtls_lines: Vec<String> = metrics_text(&app)
        .lines()
        .filter(|l| l.contains("dtls") && !l.starts_with('#'))
        .map(String::from)
        .collect();
    assert_eq!(open, 1, "{dtls_lines:#?}");
    assert_eq!(
        metric(
            &app,
            "actrix_stream_closed_total",
            &["transport=\"dtls\"", "reason=\"handshake_timeout\""]
        ),
        10
    );
    assert_eq!(
        metric(&app, "actrix_dtls_handshakes_total", &["result=\"failed\""]),
        10
    );
    good.send(&[0x40, 0x01, 0, 1, 9]);
    assert!(peer.recv_from(&mut [0u8; 64]).is_ok(), "the good one lives");
    drop((flood, hello_only, stalled));
}

#[test]
fn an_association_that_ends_ends_its_allocation() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, server) = start(tmp.path(), "idle_timeout_secs = 1\n", "mmsg");
    let cert = client_certificate(tmp.path());

    // close_notify from the client.
    let mut c = DtlsClient::connect(server, &cert);
    let relayed = c.allocate_relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    c.channel_bind(0x4002, peer.local_addr().unwrap());
    assert_eq!(metric(&app, "actrix_allocations_active", &[]), 1);
    c.tls.close().unwrap();
    c.pump();
    assert_eq!(wait_for(&app, "actrix_allocations_active", &[], 0), 0);
    assert_eq!(
        wait_for(
            &app,
            "actrix_stream_closed_total",
            &["transport=\"dtls\"", "reason=\"by_client\""],
            1
        ),
        1
    );
    // Nothing relays through the old allocation any more (what the client may still get is
    // the server's own close_notify, an alert record).
    c.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut buf = [0u8; 256];
    while let Ok(n) = c.sock.recv(&mut buf) {
        assert_eq!(
            (buf[0], n > 0),
            (21, true),
            "only an alert after close_notify"
        );
    }
    peer.send_to(b"late", relayed).unwrap();
    assert!(c.sock.recv(&mut buf).is_err(), "nothing relayed");

    // An association without an allocation that says nothing is closed when idle, with a
    // close_notify to the client.
    let mut idle = DtlsClient::connect(server, &cert);
    let until = Instant::now() + Duration::from_secs(4);
    while !idle.close_notify && Instant::now() < until {
        idle.step(until);
    }
    assert!(idle.close_notify, "told by close_notify");
    assert_eq!(
        wait_for(
            &app,
            "actrix_stream_closed_total",
            &["transport=\"dtls\"", "reason=\"idle\""],
            1
        ),
        1
    );
    assert_eq!(
        metric(&app, "actrix_stream_connections", &["transport=\"dtls\""]),
        0
    );

    // A client with an allocation is not idle after idle_timeout_secs: it relays on.
    let mut busy = DtlsClient::connect(server, &cert);
    let relayed = busy.allocate_relayed();
    busy.channel_bind(0x4003, peer.local_addr().unwrap());
    std::thread::sleep(Duration::from_millis(2500));
    peer.send_to(b"still", relayed).unwrap();
    let m = busy
        .recv(Duration::from_secs(2))
        .expect("relayed after the idle period");
    assert_eq!(&m[4..], b"still");
}

fn der_of(pem: &Path) -> Vec<u8> {
    rustls::pki_types::CertificateDer::from_pem_file(pem)
        .unwrap()
        .to_vec()
}

#[test]
fn sighup_reloads_the_certificate_for_new_associations_and_keeps_established_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, server) = start(tmp.path(), "", "mmsg");
    let (cert, _key) = (
        tmp.path().join("server-cert.pem"),
        tmp.path().join("server-key.pem"),
    );
    let client_cert = client_certificate(tmp.path());
    let mut c = DtlsClient::connect(server, &client_cert);
    let first = der_of(&cert);
    assert_eq!(c.peer_cert, first, "the configured certificate is served");
    let relayed = c.allocate_relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    c.channel_bind(0x4007, peer.local_addr().unwrap());
    let relays = |c: &mut DtlsClient, b: u8| {
        c.send(&[0x40, 0x07, 0, 2, b, b]);
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).expect("relays");
        assert_eq!((&buf[..n], from), (&[b, b][..], relayed));
    };
    relays(&mut c, 1);

    // A renewal: new files at the same paths, then SIGHUP.
    self_signed(tmp.path(), "server");
    let second = der_of(&cert);
    assert_ne!(first, second);
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(app.child.id() as i32, libc::SIGHUP) };
    app.wait_log("stun.dtls: certificate reloaded");
    let renewed = DtlsClient::connect(server, &client_cert);
    assert_eq!(
        renewed.peer_cert, second,
        "new associations get the renewed certificate"
    );
    relays(&mut c, 2);

    // A broken file refuses the reload; the renewed certificate keeps being served.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    unsafe { libc::kill(app.child.id() as i32, libc::SIGHUP) };
    app.wait_log("new configuration refused");
    let again = DtlsClient::connect(server, &client_cert);
    assert_eq!(again.peer_cert, second);
    relays(&mut c, 3);
}
