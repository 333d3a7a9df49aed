//! Every I/O backend (recvmmsg/sendmmsg, io_uring, glommio) relays the same traffic: two
//! clients of one node relaying to each other through their relay addresses, with Send/Data
//! indications and ChannelData, under the default peer policy.

mod common;

use actrix_proto::stun::{attr, encode_xor_addr, method, Class, Message, MessageWriter};
use common::{Appliance, TurnClient};
use std::time::Duration;

fn relay_between_two_clients(backend: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let app = Appliance::start(
        tmp.path(),
        &format!("[io]\nbackend = \"{backend}\"\n[turn]\nusers = [{{ name = \"alice\", password = \"secret-pass\" }}]\nidentity_credentials = false\n"),
    );
    // The shard really runs on the backend asked for (no silent fallback on this kernel). The
    // line may come before or after "actrix ready".
    let ready =
        |l: &str| l.contains("shard I/O ready") && l.contains(&format!("backend=\"{backend}\""));
    let fallback = |l: &str| l.contains(&format!("{backend} unavailable"));
    if let Some(l) = app.early_log.iter().find(|l| fallback(l)) {
        panic!("{l}");
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    if !app.early_log.iter().any(|l| ready(l)) {
        loop {
            match app.log.recv_timeout(Duration::from_millis(100)) {
                Ok(l) if fallback(&l) => panic!("{l}"),
                Ok(l) if ready(&l) => break,
                _ => assert!(
                    std::time::Instant::now() < deadline,
                    "no shard running on {backend}"
                ),
            }
        }
    }
    let mut a = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let mut b = TurnClient::new(app.stun, b"alice", b"secret-pass", "actor-rtc.local");
    let ra = a.allocate_relayed();
    let rb = b.allocate_relayed();
    let (_, req) = a.signed(method::CREATE_PERMISSION, &[], Some(rb));
    a.expect_ok(&req);
    let (_, req) = b.signed(
        method::CHANNEL_BIND,
        &[(attr::CHANNEL_NUMBER, vec![0x40, 0x01, 0, 0])],
        Some(ra),
    );
    b.expect_ok(&req);
    a.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    b.sock
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let mut buf = [0u8; 2048];
    for i in 0..200u32 {
        // a → b: Send indication out of a's relay; arrives on b's relay; b has a channel to a,
        // so b receives ChannelData 0x4001.
        let mut ind = vec![0u8; 256];
        let mut w =
            MessageWriter::new(&mut ind, method::SEND, Class::Indication, &[7; 12]).unwrap();
        let mut v = [0u8; 20];
        let n = encode_xor_addr(rb, &[7; 12], &mut v);
        w.add(attr::XOR_PEER_ADDRESS, &v[..n]).unwrap();
        w.add(attr::DATA, &i.to_be_bytes()).unwrap();
        let n = w.finish();
        a.sock.send_to(&ind[..n], app.stun).unwrap();
        let (n, _) = b.sock.recv_from(&mut buf).expect("b receives");
        assert_eq!(
            &buf[..4],
            &[0x40, 0x01, 0x00, 0x04],
            "{backend}: ChannelData header"
        );
        assert_eq!(&buf[4..n.min(8)], &i.to_be_bytes());
        // b → a: ChannelData out of b's relay; arrives on a's relay; a has only a permission
        // for b's relay, so a receives a Data indication.
        let mut cd = vec![0x40, 0x01, 0x00, 0x04];
        cd.extend_from_slice(&(i + 1000).to_be_bytes());
        b.sock.send_to(&cd, app.stun).unwrap();
        let (n, _) = a.sock.recv_from(&mut buf).expect("a receives");
        let m = Message::parse(&buf[..n]).expect("Data indication");
        assert_eq!(m.method(), method::DATA);
        assert_eq!(m.get(attr::DATA).unwrap(), &(i + 1000).to_be_bytes());
        assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(), rb);
    }
}

#[test]
fn io_uring_backend_relays_both_ways() {
    relay_between_two_clients("io_uring");
}

#[test]
fn mmsg_backend_relays_both_ways() {
    relay_between_two_clients("mmsg");
}

#[test]
fn glommio_backend_relays_both_ways() {
    relay_between_two_clients("glommio");
}
