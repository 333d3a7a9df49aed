//! Shared relay sockets (`io.relay_sockets = "shared"`): every relayed address of a
//! shard is served by one receiving socket (steered by the sk_lookup program) and one raw
//! sending socket. Real peers see datagrams from the relayed address, their answers reach the
//! right allocation, allocations cost no file descriptor, and a freed port stops relaying.
//! Needs root (CAP_BPF, CAP_NET_ADMIN, CAP_NET_RAW), like the mode itself.
//!
//! The relay ranges here (65000-65199) lie outside the ones other tests' appliances use
//! (61000-64999), since the program takes every datagram to its range.

mod common;

use actrix_proto::stun::{attr, encode_xor_addr, method, Class, Message, MessageWriter};
use common::{Appliance, TurnClient};
use std::net::UdpSocket;
use std::time::Duration;

fn root() -> bool {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: shared relay sockets need root");
        return false;
    }
    true
}

fn start(dir: &std::path::Path, range: &str) -> Appliance {
    Appliance::start(
        dir,
        &format!(
            "[io]\nrelay_sockets = \"shared\"\n[turn]\nrelay_port_range = \"{range}\"\nallow_peers = [\"127.0.0.0/8\"]\nchallenges_per_source_per_sec = 100000\nusers = [{{ name = \"alice\", password = \"secret-pass\" }}]\nidentity_credentials = false\n"
        ),
    )
}

fn open_fds(app: &Appliance) -> usize {
    std::fs::read_dir(format!("/proc/{}/fd", app.child.id()))
        .unwrap()
        .count()
}

#[test]
fn peers_talk_to_relayed_addresses_through_one_socket() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let app = start(tmp.path(), "65000-65099");
    let mut a = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let relay = a.allocate_relayed();
    assert!((65000..=65099).contains(&relay.port()), "{relay}");
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let peer2 = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer2
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let (_, req) = a.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x01, 0, 0])],
        Some(peer.local_addr().unwrap()),
    );
    a.expect_ok(&req);
    let (_, req) = a.signed(
        method::CREATE_PERMISSION,
        &[],
        Some(peer2.local_addr().unwrap()),
    );
    a.expect_ok(&req);
    a.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();

    let mut buf = [0u8; 2048];
    for i in 0..100u32 {
        // Client → peer by ChannelData: the peer sees the relayed address as the source.
        let mut cd = vec![0x40, 0x01, 0x00, 0x04];
        cd.extend_from_slice(&i.to_be_bytes());
        a.sock.send_to(&cd, app.stun).unwrap();
        let (n, from) = peer.recv_from(&mut buf).expect("peer receives");
        assert_eq!((&buf[..n], from), (&i.to_be_bytes()[..], relay));
        // Peer → relayed address: arrives at the allocation's client as ChannelData.
        peer.send_to(&(i + 7).to_be_bytes(), relay).unwrap();
        let (n, _) = a.sock.recv_from(&mut buf).expect("client receives");
        assert_eq!(
            &buf[..n],
            &[&[0x40, 0x01, 0x00, 0x04][..], &(i + 7).to_be_bytes()].concat()[..]
        );
    }
    // Send indication to the second peer (permission only), its answer as a Data indication.
    let mut ind = vec![0u8; 256];
    let mut w = MessageWriter::new(&mut ind, method::SEND, Class::Indication, &[3; 12]).unwrap();
    let mut v = [0u8; 20];
    let n = encode_xor_addr(peer2.local_addr().unwrap(), &[3; 12], &mut v);
    w.add(attr::XOR_PEER_ADDRESS, &v[..n]).unwrap();
    w.add(attr::DATA, b"hello peer two").unwrap();
    let n = w.finish();
    a.sock.send_to(&ind[..n], app.stun).unwrap();
    let (n, from) = peer2.recv_from(&mut buf).expect("peer 2 receives");
    assert_eq!((&buf[..n], from), (&b"hello peer two"[..], relay));
    peer2.send_to(b"hello client", relay).unwrap();
    let (n, _) = a.sock.recv_from(&mut buf).expect("Data indication");
    let m = Message::parse(&buf[..n]).unwrap();
    assert_eq!(m.method(), method::DATA);
    assert_eq!(m.get(attr::DATA).unwrap(), b"hello client");
    assert_eq!(
        m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(),
        peer2.local_addr().unwrap()
    );

    // A stranger without a permission is dropped, not relayed.
    let stranger = UdpSocket::bind("127.0.0.2:0").unwrap();
    stranger.send_to(b"let me in", relay).unwrap();
    a.sock
        .set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    assert!(a.sock.recv_from(&mut buf).is_err(), "stranger relayed");

    // Deallocate: the peer's datagrams to the freed address reach nobody.
    let (_, req) = a.signed(method::REFRESH, &[(attr::LIFETIME, vec![0, 0, 0, 0])], None);
    a.expect_ok(&req);
    peer.send_to(b"anyone?", relay).unwrap();
    assert!(
        a.sock.recv_from(&mut buf).is_err(),
        "relayed after deallocation"
    );
}

#[test]
fn allocations_cost_no_file_descriptor() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let app = start(tmp.path(), "65100-65199");
    let mut first = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    first.allocate_relayed();
    let before = open_fds(&app);
    let mut clients = Vec::new();
    let mut ports = std::collections::HashSet::new();
    for _ in 0..99 {
        let mut c = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
        let r = c.allocate_relayed();
        assert!(ports.insert(r.port()), "{r} handed out twice");
        clients.push(c);
    }
    // The range holds 100 ports: the 101st allocation is refused with 508.
    let mut extra = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let r = extra.allocate(3).expect("answered");
    assert_eq!(r.code(), Some(508));
    let after = open_fds(&app);
    assert!(
        after <= before + 2,
        "100 allocations opened {} descriptors",
        after - before
    );
}

#[test]
fn ipv6_relayed_addresses_share_a_socket_too() {
    if !root() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        "[io]\nrelay_sockets = \"shared\"\n[turn]\nrelay_addresses = [\"127.0.0.1\", \"::1\"]\nrelay_port_range = \"65200-65299\"\nallow_peers = [\"127.0.0.0/8\", \"::1/128\"]\nusers = [{ name = \"alice\", password = \"secret-pass\" }]\nidentity_credentials = false\n",
    );
    let mut a = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let r = a
        .call(
            method::ALLOCATE,
            &[
                (attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0]),
                (attr::REQUESTED_ADDRESS_FAMILY, vec![0x02, 0, 0, 0]),
            ],
            3,
        )
        .expect("allocate answered");
    assert_eq!(r.code(), None);
    let relay = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert!(
        relay.is_ipv6() && (65200..=65299).contains(&relay.port()),
        "{relay}"
    );
    let before = open_fds(&app);
    let peer = UdpSocket::bind("[::1]:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let (_, req) = a.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x06, 0, 0])],
        Some(peer.local_addr().unwrap()),
    );
    a.expect_ok(&req);
    a.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..50u32 {
        // Odd lengths too: the UDP checksum (mandatory over IPv6) covers a trailing byte.
        let payload: Vec<u8> = (0..(i % 7 + 1)).map(|k| (i + k) as u8).collect();
        let mut cd = vec![0x40, 0x06, 0x00, payload.len() as u8];
        cd.extend_from_slice(&payload);
        while cd.len() % 4 != 0 {
            cd.push(0);
        }
        a.sock.send_to(&cd, app.stun).unwrap();
        let (n, from) = peer.recv_from(&mut buf).expect("peer receives over IPv6");
        assert_eq!((&buf[..n], from), (&payload[..], relay));
        peer.send_to(&payload, relay).unwrap();
        let (n, _) = a.sock.recv_from(&mut buf).expect("client receives");
        assert_eq!(&buf[..2], &[0x40, 0x06]);
        assert_eq!(&buf[4..4 + payload.len()], &payload[..], "{n}");
    }
    assert_eq!(
        open_fds(&app),
        before,
        "the IPv6 allocation opened a descriptor"
    );
}
