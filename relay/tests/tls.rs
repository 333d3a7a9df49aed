//! TURN over TLS (RFC 7350) against the running binary, on a self-signed certificate from
//! `actrix cert --self-signed`: TLS 1.3 and 1.2, ALPN `stun.turn`, relaying both ways over the
//! stream, and the handshake deadline and bad handshakes closing only their connection.

mod common;

use actrix_proto::stun::{attr, method};
use common::{tls_client_config, tls_client_config_for, Appliance, StreamClient};
use std::io::Write;
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

fn start(dir: &std::path::Path, stun: &str, backend: &str) -> (Appliance, u16) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_actrix"))
        .args(["cert", "--self-signed", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SELF-SIGNED"),
        "labelled as self-signed"
    );
    let tls_port = common::free_tcp_port();
    let app = Appliance::start_stun(
        dir,
        &format!(
            "listen_tls = [\"127.0.0.1:{tls_port}\"]\ntls_cert = \"{}\"\ntls_key = \"{}\"\n{stun}",
            cert.display(),
            key.display()
        ),
        &format!("[turn]\nusers = [{{ name = \"alice\", password = \"secret-pass\" }}]\nidentity_credentials = false\nallow_peers = [\"127.0.0.0/8\"]\n[io]\nbackend = \"{backend}\"\n"),
    );
    (app, tls_port)
}

fn tls_addr(port: u16) -> std::net::SocketAddr {
    ([127, 0, 0, 1], port).into()
}

#[test]
fn turn_over_tls_relays_both_ways_with_alpn_on_tls13_and_tls12() {
    relays_over_tls("mmsg");
}

#[test]
fn turn_over_tls_on_the_io_uring_backend() {
    relays_over_tls("io_uring");
}

fn relays_over_tls(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (_app, port) = start(tmp.path(), "", backend);
    for (versions, alpn) in [
        (&[&rustls::version::TLS13][..], Some(&b"stun.turn"[..])),
        (&[&rustls::version::TLS12][..], None),
    ] {
        let cfg = tls_client_config_for(&alpn.into_iter().collect::<Vec<_>>(), versions);
        let (mut c, negotiated) = StreamClient::connect_tls(
            tls_addr(port),
            cfg,
            b"alice",
            b"secret-pass",
            "actor-rtc.local",
        );
        assert_eq!(negotiated.as_deref(), alpn, "ALPN stun.turn when offered");
        let relayed = c.allocate_relayed();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let (_, req) = c.signed(
            method::CHANNEL_BIND,
            &[(attr::CHANNEL_NUMBER, vec![0x40, 0x05, 0, 0])],
            Some(peer.local_addr().unwrap()),
        );
        c.expect_ok(&req);
        let mut buf = [0u8; 2048];
        for i in 0..40u8 {
            c.send(&[0x40, 0x05, 0, 3, i, i, i, 0]);
            let (n, from) = peer.recv_from(&mut buf).expect("peer receives");
            assert_eq!((&buf[..n], from), (&[i, i, i][..], relayed));
            peer.send_to(&[i; 6], relayed).unwrap();
            let f = c
                .recv_frame(Duration::from_secs(2))
                .unwrap()
                .expect("frame");
            assert_eq!(f, [&[0x40, 0x05, 0, 6][..], &[i; 6][..]].concat());
        }
    }
}

#[test]
fn handshakes_that_never_finish_or_are_not_tls_close_only_themselves() {
    bad_handshakes("mmsg");
}

#[test]
fn bad_handshakes_close_only_themselves_on_io_uring() {
    bad_handshakes("io_uring");
}

fn bad_handshakes(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let (app, port) = start(tmp.path(), "tls_handshake_timeout_secs = 1\n", backend);
    let (mut good, _) = StreamClient::connect_tls(
        tls_addr(port),
        tls_client_config(&[]),
        b"alice",
        b"secret-pass",
        "actor-rtc.local",
    );
    let relayed = good.allocate_relayed();
    // A flood of connections that start a ClientHello and stop.
    let hello_start = [
        0x16u8, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xFC, 0x03, 0x03,
    ];
    let mut stuck: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut s = TcpStream::connect(tls_addr(port)).unwrap();
            s.write_all(&hello_start).unwrap();
            s
        })
        .collect();
    // Not TLS at all: refused at once.
    let mut plain = TcpStream::connect(tls_addr(port)).unwrap();
    plain.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut b = [0u8; 64];
    let t0 = Instant::now();
    loop {
        match std::io::Read::read(&mut plain, &mut b) {
            Ok(0) | Err(_) => break,
            Ok(_) => {} // the alert
        }
        assert!(t0.elapsed() < Duration::from_secs(2), "not closed");
    }
    // The stuck ones are closed at the handshake deadline.
    for s in &mut stuck {
        s.set_read_timeout(Some(Duration::from_secs(4))).unwrap();
        let mut b = [0u8; 16];
        assert!(
            matches!(std::io::Read::read(s, &mut b), Ok(0) | Err(_)),
            "a stuck handshake is closed"
        );
    }
    // The established client relays as before.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (_, req) = good.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x06, 0, 0])],
        Some(peer.local_addr().unwrap()),
    );
    good.expect_ok(&req);
    good.send(&[0x40, 0x06, 0, 4, 1, 2, 3, 4]);
    let mut buf = [0u8; 64];
    let (n, from) = peer.recv_from(&mut buf).expect("still relays");
    assert_eq!((&buf[..n], from), (&[1, 2, 3, 4][..], relayed));
    drop(app);
}

/// The end-entity certificate the listener presents to a new connection.
fn served_cert(port: u16) -> Result<Vec<u8>, String> {
    let mut s = TcpStream::connect(tls_addr(port)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut conn = rustls::ClientConnection::new(tls_client_config(&[]), name).unwrap();
    let until = Instant::now() + Duration::from_secs(5);
    while conn.is_handshaking() {
        if Instant::now() > until {
            return Err("handshake timed out".into());
        }
        match conn.complete_io(&mut s) {
            Ok(_) => {}
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    Ok(conn.peer_certificates().unwrap()[0].to_vec())
}

fn self_signed(cert: &std::path::Path, key: &std::path::Path, name: &str) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_actrix"))
        .args(["cert", "--self-signed", "--name", name, "--cert"])
        .arg(cert)
        .arg("--key")
        .arg(key)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_and_keeps_established_ones() {
    let tmp = tempfile::tempdir().unwrap();
    let (app, port) = start(tmp.path(), "", "mmsg");
    let (cert, key) = (tmp.path().join("cert.pem"), tmp.path().join("key.pem"));
    let first = served_cert(port).unwrap();
    let (mut c, _) = StreamClient::connect_tls(
        tls_addr(port),
        tls_client_config(&[]),
        b"alice",
        b"secret-pass",
        "actor-rtc.local",
    );
    let relayed = c.allocate_relayed();
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (_, req) = c.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x07, 0, 0])],
        Some(peer.local_addr().unwrap()),
    );
    c.expect_ok(&req);
    let relays = |c: &mut StreamClient, b: u8| {
        c.send(&[0x40, 0x07, 0, 2, b, b, 0, 0]); // padded to 4 on a stream
        let mut buf = [0u8; 64];
        let (n, from) = peer.recv_from(&mut buf).expect("relays");
        assert_eq!((&buf[..n], from), (&[b, b][..], relayed));
    };
    relays(&mut c, 1);

    // A renewal: new files at the same paths, then SIGHUP.
    self_signed(&cert, &key, "renewed.example");
    // SAFETY: sending a signal to our own child.
    unsafe { libc::kill(app.child.id() as i32, libc::SIGHUP) };
    app.wait_log("configuration reloaded");
    let second = served_cert(port).unwrap();
    assert_ne!(first, second, "new connections get the renewed certificate");
    relays(&mut c, 2);

    // A broken file refuses the reload; the renewed certificate keeps being served.
    std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    unsafe { libc::kill(app.child.id() as i32, libc::SIGHUP) };
    app.wait_log("new configuration refused");
    let seen = app.wait_log("stun.tls");
    assert!(
        seen.last().unwrap().contains("ERROR"),
        "the certificate is named in the refusal: {seen:#?}"
    );
    assert_eq!(served_cert(port).unwrap(), second);
    relays(&mut c, 3);
}
