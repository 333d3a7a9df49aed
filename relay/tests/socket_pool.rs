//! The shards' relay socket pool (`io.relay_socket_pool`): a socket whose allocation ended is
//! kept open and reused by the next allocation, and nothing a peer sent to it in between, or
//! to the earlier allocation, reaches the new one.

mod common;

use actrix_proto::stun::{attr, method, Class, Message};
use common::{Appliance, TurnClient};
use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

fn relayed(c: &mut TurnClient) -> SocketAddr {
    c.allocate(3)
        .expect("allocate answered")
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .expect("relayed address")
        .unwrap()
}

fn permit(c: &mut TurnClient, peer: SocketAddr) {
    let (tid, req) = c.signed(method::CREATE_PERMISSION, &[], Some(peer));
    let r = c.transact(&tid, &req, 3).expect("answer");
    assert_eq!(r.code(), None, "CreatePermission refused");
}

fn delete(c: &mut TurnClient) {
    let r = c
        .call(method::REFRESH, &[(attr::LIFETIME, vec![0; 4])], 3)
        .expect("answer");
    assert_eq!(r.code(), None);
}

/// Data indications received by `c` within `wait`, as their DATA payloads.
fn received(c: &TurnClient, wait: Duration) -> Vec<Vec<u8>> {
    c.sock.set_read_timeout(Some(wait)).unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 2048];
    while let Ok(n) = c.sock.recv(&mut buf) {
        if let Ok(m) = Message::parse(&buf[..n]) {
            if m.method() == method::DATA && m.class() == Class::Indication {
                out.push(m.get(attr::DATA).unwrap_or_default().to_vec());
            }
        }
    }
    out
}

fn start(pool: usize) -> (tempfile::TempDir, Appliance) {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        &format!(
            "[io]\nrelay_socket_pool = {pool}\n[turn]\nusers = [{{ name = \"alice\", password = \"secret-pass\" }}]\n\
             allow_peers = [\"127.0.0.0/8\"]\nidentity_credentials = false\n"
        ),
    );
    (tmp, app)
}

#[test]
fn a_released_relay_socket_is_reused_and_carries_nothing_of_its_past() {
    let (_tmp, app) = start(16);
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    let peer_addr = peer.local_addr().unwrap();

    let mut a = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let ra = relayed(&mut a);
    permit(&mut a, peer_addr);
    peer.send_to(b"for-a", ra).unwrap();
    assert_eq!(
        received(&a, Duration::from_millis(500)),
        vec![b"for-a".to_vec()]
    );
    delete(&mut a);

    // The relay port is parked, not closed: the peer's datagrams are still accepted by the
    // kernel (no ICMP unreachable) and dropped by the shard.
    for i in 0..20u8 {
        peer.send_to(&[b's', b't', b'a', b'l', b'e', i], ra)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));

    let mut b = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let rb = relayed(&mut b);
    assert_eq!(rb, ra, "the next allocation reuses the parked socket");
    // Traffic that arrives before b's permission exists is dropped, not kept for later. (Give
    // the shard time to see it first: a datagram in the same wake-up as the CreatePermission
    // may legitimately be handled after it.)
    for i in 0..5u8 {
        peer.send_to(&[b'l', b'a', b't', b'e', i], rb).unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    permit(&mut b, peer_addr);

    peer.send_to(b"fresh", rb).unwrap();
    assert_eq!(
        received(&b, Duration::from_millis(500)),
        vec![b"fresh".to_vec()],
        "only what the peer sent after b's permission reaches b"
    );
    assert!(received(&a, Duration::from_millis(100)).is_empty());
}

#[test]
fn without_a_pool_every_allocation_gets_a_fresh_socket() {
    let (_tmp, app) = start(0);
    let mut a = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let ra = relayed(&mut a);
    delete(&mut a);
    let mut b = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let rb = relayed(&mut b);
    assert_ne!(ra, rb, "the allocator moves on through the port range");
    // The released port is really closed: binding it from outside succeeds.
    UdpSocket::bind(ra).expect("the released relay port is free again");
}
