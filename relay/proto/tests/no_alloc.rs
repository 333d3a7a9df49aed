//! The hot path allocates nothing: relaying ChannelData and Send/Data both ways, answering
//! Binding, and every attacker-reachable error path (garbage, challenges, bad credentials, bad
//! REST usernames, stale nonces, unbound channels) run under a counting global allocator.

use actrix_proto::auth::{features, make_nonce, AuthConfig};
use actrix_proto::policy::PeerPolicy;
use actrix_proto::stun::{attr, encode_xor_addr, long_term_key_md5, method, Class, MessageWriter};
use actrix_proto::turn::{
    BindRequest, CrossShard, Data, Effects, Family, Now, RelayPort, Reply, Server, TurnConfig,
    HEADROOM,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;

struct Counting;

thread_local! {
    static COUNTING: Cell<bool> = const { Cell::new(false) };
    static COUNT: Cell<u64> = const { Cell::new(0) };
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        if COUNTING.with(|c| c.get()) {
            COUNT.with(|c| c.set(c.get() + 1));
        }
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static A: Counting = Counting;

struct Binder;
impl Effects for Binder {
    fn bind(&mut self, _: &BindRequest) -> bool {
        true
    }
    fn release(&mut self, _: Family, _: RelayPort, _: bool) {}
    fn resolve_identity(&mut self, _: Box<[u8]>) {}
    fn tcp(&mut self, _: actrix_proto::turn::TcpCommand) {}
}

const REALM: &str = "example.org";
const NONCE_KEY: [u8; 32] = [5; 32];

fn request(
    m: u16,
    tid: [u8; 12],
    attrs: &[(u16, &[u8])],
    user: &str,
    pass: &str,
    nonce: &[u8],
) -> Vec<u8> {
    let mut buf = vec![0u8; 1024];
    let mut w = MessageWriter::new(&mut buf, m, Class::Request, &tid).unwrap();
    for (t, v) in attrs {
        w.add(*t, v).unwrap();
    }
    w.add(attr::USERNAME, user.as_bytes()).unwrap();
    w.add(attr::REALM, REALM.as_bytes()).unwrap();
    w.add(attr::NONCE, nonce).unwrap();
    w.add_integrity(&long_term_key_md5(
        user.as_bytes(),
        REALM.as_bytes(),
        pass.as_bytes(),
    ))
    .unwrap();
    let n = w.finish();
    buf.truncate(n);
    buf
}

fn xor(addr: SocketAddr, tid: &[u8; 12]) -> Vec<u8> {
    let mut v = [0u8; 20];
    let n = encode_xor_addr(addr, tid, &mut v);
    v[..n].to_vec()
}

#[test]
fn relay_and_error_paths_do_not_allocate() {
    let mut auth = AuthConfig::new(REALM, NONCE_KEY);
    auth.add_user("alice", "secret-pass");
    auth.rest_secrets = vec![b"rest-secret-0123456789".to_vec().into()];
    let policy = PeerPolicy::new(vec!["203.0.113.0/24".parse().unwrap()], vec![]);
    let mut cfg = TurnConfig::new(Arc::new(auth), Arc::new(policy));
    cfg.port_min = 50000;
    cfg.port_max = 50009;
    let mut now = Now {
        ms: 5_000_000,
        unix: 1_700_000_000,
    };
    let mut s = Server::new(cfg, Arc::new(CrossShard::new(10, 10, 1, 9)), now, 9);
    let mut b = Binder;
    let client: SocketAddr = "198.51.100.1:4000".parse().unwrap();
    let peer_ch: SocketAddr = "203.0.113.5:7000".parse().unwrap();
    let peer_data: SocketAddr = "203.0.113.6:7000".parse().unwrap();
    let nonce = make_nonce(now.unix, &NONCE_KEY, features::PASSWORD_ALGORITHMS, client);
    let mut buf = vec![0u8; 2048];
    let feed = |s: &mut Server,
                now: Now,
                bytes: &[u8],
                buf: &mut Vec<u8>,
                b: &mut Binder|
     -> Option<actrix_proto::turn::Transmit> {
        buf[HEADROOM..HEADROOM + bytes.len()].copy_from_slice(bytes);
        let r = s.handle_client(now, 0, client, buf, HEADROOM..HEADROOM + bytes.len());
        s.settle(now, r, b).transmit()
    };

    // Setup (allowed to allocate): allocation, permission for the data peer, channel.
    let alloc = request(
        method::ALLOCATE,
        [1; 12],
        &[(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0])],
        "alice",
        "secret-pass",
        &nonce,
    );
    let t = feed(&mut s, now, &alloc, &mut buf, &mut b).unwrap();
    let Data::Scratch(n) = t.data else { panic!() };
    let relay = actrix_proto::stun::Message::parse(&s.scratch()[..n])
        .unwrap()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    let perm = request(
        method::CREATE_PERMISSION,
        [2; 12],
        &[(attr::XOR_PEER_ADDRESS, &xor(peer_data, &[2; 12]))],
        "alice",
        "secret-pass",
        &nonce,
    );
    assert!(feed(&mut s, now, &perm, &mut buf, &mut b).is_some());
    let bind = request(
        method::CHANNEL_BIND,
        [3; 12],
        &[
            (attr::CHANNEL_NUMBER, &[0x40, 0, 0, 0]),
            (attr::XOR_PEER_ADDRESS, &xor(peer_ch, &[3; 12])),
        ],
        "alice",
        "secret-pass",
        &nonce,
    );
    assert!(feed(&mut s, now, &bind, &mut buf, &mut b).is_some());

    // Inputs for the measured loop, built before counting starts.
    let channel_data = [0x40, 0x00, 0x00, 0x04, b'p', b'i', b'n', b'g'];
    let unbound_channel = [0x40, 0x07, 0x00, 0x01, b'x', 0, 0, 0];
    let send = {
        let mut v = vec![0u8; 128];
        let mut w = MessageWriter::new(&mut v, method::SEND, Class::Indication, &[4; 12]).unwrap();
        w.add(attr::XOR_PEER_ADDRESS, &xor(peer_data, &[4; 12]))
            .unwrap();
        w.add(attr::DATA, b"payload").unwrap();
        let n = w.finish();
        v.truncate(n);
        v
    };
    let binding = {
        let mut v = vec![0u8; 20];
        MessageWriter::new(&mut v, method::BINDING, Class::Request, &[6; 12])
            .unwrap()
            .finish();
        v
    };
    let unauthenticated = {
        let mut v = vec![0u8; 64];
        let mut w = MessageWriter::new(&mut v, method::ALLOCATE, Class::Request, &[7; 12]).unwrap();
        w.add(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).unwrap();
        let n = w.finish();
        v.truncate(n);
        v
    };
    let wrong_password = request(method::REFRESH, [8; 12], &[], "alice", "not-it", &nonce);
    let unknown_user = request(method::REFRESH, [9; 12], &[], "mallory", "x", &nonce);
    let rest_user = format!("{}:eve", now.unix + 600);
    let bad_rest = request(method::REFRESH, [10; 12], &[], &rest_user, "wrong", &nonce);
    let garbage = [0xFFu8; 64];
    let stale = request(
        method::REFRESH,
        [11; 12],
        &[],
        "alice",
        "secret-pass",
        &make_nonce(
            now.unix - 10_000,
            &NONCE_KEY,
            features::PASSWORD_ALGORITHMS,
            client,
        ),
    );
    let payload = [0xAB; 160];

    COUNTING.with(|c| c.set(true));
    let mut relayed = 0;
    for i in 0..2000u64 {
        now.ms += 1;
        if i % 1000 == 0 {
            now.unix += 1; // keep the per-source challenge budget from masking the path
        }
        relayed += feed(&mut s, now, &channel_data, &mut buf, &mut b).is_some() as u32;
        relayed += feed(&mut s, now, &send, &mut buf, &mut b).is_some() as u32;
        for (p, from) in [(relay, peer_ch), (relay, peer_data)] {
            buf[HEADROOM..HEADROOM + payload.len()].copy_from_slice(&payload);
            relayed += s
                .handle_peer(
                    now,
                    Family::V4,
                    RelayPort::new(0, p.port()),
                    from,
                    &mut buf,
                    HEADROOM..HEADROOM + payload.len(),
                )
                .transmit()
                .is_some() as u32;
        }
        for bytes in [
            &binding[..],
            &unauthenticated,
            &wrong_password,
            &unknown_user,
            &bad_rest,
            &garbage,
            &stale,
            &unbound_channel,
        ] {
            let _ = feed(&mut s, now, bytes, &mut buf, &mut b);
        }
        if i % 100 == 0 {
            s.handle_timeout(now);
            let r = s.settle(
                now,
                Reply::Drop(actrix_proto::turn::DropReason::NotStun),
                &mut b,
            );
            assert!(matches!(r, Reply::Drop(_)));
        }
    }
    COUNTING.with(|c| c.set(false));
    let allocations = COUNT.with(|c| c.get());
    assert_eq!(relayed, 4 * 2000, "every relay path actually relayed");
    assert_eq!(
        allocations, 0,
        "heap allocations on the hot and error paths"
    );

    // The counter itself works.
    COUNTING.with(|c| c.set(true));
    let v = std::hint::black_box(vec![1u8; 16]);
    COUNTING.with(|c| c.set(false));
    drop(v);
    assert_eq!(COUNT.with(|c| c.get()), 1);
}
