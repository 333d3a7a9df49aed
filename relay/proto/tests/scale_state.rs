//! 100,000 concurrent allocations on one shard's TURN core: the relay address space and the
//! core's own memory at that scale.
//!
//! The appliance gives every allocation its own relay socket, so a real 100k run needs a host
//! whose `nofile` limit exceeds 100k (these VMs are capped at 20,000 per process; the bench's
//! `idle-many.toml` measures 15,000 there, sockets and all). This test runs the real core
//! (`turn::Server`) with effects that record binds instead of opening sockets, and checks:
//! - 100k allocations from distinct clients all succeed on seven relay addresses (one port
//!   range holds 16,384), every relayed transport address distinct;
//! - an eighth of a million would not fit: the core answers 508 when (address, port) pairs run
//!   out, and frees them on deallocation;
//! - the core's heap per allocation (each with a permission and a channel) is far under the
//!   2 KiB budget, counted by this binary's allocator.

use actrix_proto::auth::{features, make_nonce, AuthConfig};
use actrix_proto::policy::PeerPolicy;
use actrix_proto::stun::{self, attr, channel, Class, Message, MessageWriter};
use actrix_proto::turn::{
    BindRequest, CrossShard, Data, Effects, Family, Now, RelayPort, Server, TurnConfig, HEADROOM,
};
use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator and only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const USER: &str = "scale";
const PASS: &str = "scale-password";
const REALM: &str = "scale.example";
const NONCE_KEY: [u8; 32] = [7; 32];

/// Records binds; refuses nothing.
struct Binder {
    bound: HashSet<(u8, u16)>,
}

impl Effects for Binder {
    fn bind(&mut self, req: &BindRequest) -> bool {
        self.bound.insert((req.port.addr, req.port.port))
    }
    fn release(&mut self, _: Family, p: RelayPort, _: bool) {
        self.bound.remove(&(p.addr, p.port));
    }
    fn resolve_identity(&mut self, _: Box<[u8]>) {}
    fn tcp(&mut self, _: actrix_proto::turn::TcpCommand) {}
}

fn server(addresses: u8, now: Now) -> Server {
    let mut auth = AuthConfig::new(REALM, NONCE_KEY);
    auth.add_user(USER, PASS);
    let policy = PeerPolicy::new(vec!["198.51.100.0/24".parse().unwrap()], vec![]);
    let mut cfg = TurnConfig::new(Arc::new(auth), Arc::new(policy));
    cfg.relay_v4 = (1..=addresses)
        .map(|i| IpAddr::V4(Ipv4Addr::new(203, 0, 113, i)))
        .collect();
    cfg.relay_v6 = vec![];
    cfg.port_min = 49152;
    cfg.port_max = 65535;
    cfg.challenges_per_source = u32::MAX;
    let shared = CrossShard::new(1_000_000, 1_000_000, addresses as usize, 1);
    Server::new(cfg, Arc::new(shared), now, 1)
}

/// Client `i`: a distinct 5-tuple (10.x.y.z, port).
fn client(i: u32) -> SocketAddr {
    let ip = Ipv4Addr::from(0x0A00_0000 | (i / 4));
    SocketAddr::new(IpAddr::V4(ip), 40000 + (i % 4) as u16)
}

struct Driver {
    s: Server,
    b: Binder,
    now: Now,
    buf: Vec<u8>,
    key: [u8; 16],
    tid: u64,
}

/// An answer: class, error code, XOR-RELAYED-ADDRESS.
type Answer = (Class, Option<u16>, Option<SocketAddr>);

impl Driver {
    /// Send one authenticated request from `from`; the response's class and attributes.
    fn request(
        &mut self,
        from: SocketAddr,
        method: u16,
        attrs: &dyn Fn(&mut MessageWriter) -> Result<(), stun::BufferFull>,
    ) -> Answer {
        self.tid += 1;
        let mut tid = [0u8; 12];
        tid[4..].copy_from_slice(&self.tid.to_be_bytes());
        let nonce = make_nonce(
            self.now.unix,
            &NONCE_KEY,
            features::PASSWORD_ALGORITHMS,
            from,
        );
        let n = {
            let out = &mut self.buf[HEADROOM..];
            let mut w = MessageWriter::new(out, method, Class::Request, &tid).unwrap();
            attrs(&mut w).unwrap();
            w.add(attr::USERNAME, USER.as_bytes()).unwrap();
            w.add(attr::REALM, REALM.as_bytes()).unwrap();
            w.add(attr::NONCE, &nonce).unwrap();
            w.add_integrity(&self.key).unwrap();
            w.finish()
        };
        let r = self
            .s
            .handle_client(self.now, 0, from, &mut self.buf, HEADROOM..HEADROOM + n);
        let t = self
            .s
            .settle(self.now, r, &mut self.b)
            .transmit()
            .expect("every request is answered");
        let Data::Scratch(len) = t.data else {
            panic!("a STUN answer comes from the scratch buffer")
        };
        let m = Message::parse(&self.s.scratch()[..len]).expect("the answer parses");
        let code = m
            .get(attr::ERROR_CODE)
            .and_then(stun::decode_error_code)
            .map(|(c, _)| c);
        let relayed = m
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .and_then(|r| r.ok());
        (m.class(), code, relayed)
    }

    fn allocate(&mut self, from: SocketAddr) -> Answer {
        self.request(from, stun::method::ALLOCATE, &|w| {
            w.add_u32(attr::REQUESTED_TRANSPORT, 17 << 24)
        })
    }

    fn deallocate(&mut self, from: SocketAddr) -> Answer {
        self.request(from, stun::method::REFRESH, &|w| {
            w.add_u32(attr::LIFETIME, 0)
        })
    }

    fn channel_bind(&mut self, from: SocketAddr, peer: SocketAddr) -> Answer {
        self.request(from, stun::method::CHANNEL_BIND, &|w| {
            w.add_u32(attr::CHANNEL_NUMBER, (channel::MIN as u32) << 16)?;
            w.add_xor_addr(attr::XOR_PEER_ADDRESS, peer)
        })
    }
}

const OK: (Class, Option<u16>) = (Class::Success, None);

#[test]
fn a_hundred_thousand_allocations_on_seven_relay_addresses() {
    const N: u32 = 100_000;
    let now = Now {
        ms: 1_000_000,
        unix: 1_700_000_000,
    };
    // The test's own bookkeeping is allocated up front, so the count below is the core's.
    let mut relayed = HashSet::with_capacity(120_000);
    let mut d = Driver {
        s: server(7, now),
        b: Binder {
            bound: HashSet::with_capacity(120_000),
        },
        now,
        buf: vec![0u8; 4096],
        key: stun::long_term_key_md5(USER.as_bytes(), REALM.as_bytes(), PASS.as_bytes()),
        tid: 0,
    };
    let peer: SocketAddr = "198.51.100.7:5000".parse().unwrap();
    let before = LIVE.load(Ordering::Relaxed);
    for i in 0..N {
        let (class, code, addr) = d.allocate(client(i));
        assert_eq!((class, code), OK, "allocation {i}");
        assert!(
            relayed.insert(addr.expect("XOR-RELAYED-ADDRESS")),
            "allocation {i}"
        );
        let (class, code, _) = d.channel_bind(client(i), peer);
        assert_eq!((class, code), OK, "channel bind {i}");
    }
    let grown = LIVE.load(Ordering::Relaxed) - before;
    assert_eq!(d.s.allocation_count(), N as usize);
    assert_eq!(d.b.bound.len(), N as usize);
    let addrs: HashSet<IpAddr> = relayed.iter().map(|a| a.ip()).collect();
    assert_eq!(addrs.len(), 7, "spread over every relay address");
    let per = grown as f64 / f64::from(N);
    println!("core heap: {grown} bytes for {N} allocations = {per:.0} B each (permission and channel included)");
    assert!(per < 2048.0, "{per:.0} B per allocation");

    // Seven addresses x 16,384 ports = 114,688 pairs: fill them, then the next gets 508.
    let capacity = 7 * 16_384;
    for i in N..capacity {
        let (class, code, _) = d.allocate(client(i));
        assert_eq!((class, code), OK, "allocation {i}");
    }
    let (class, code, _) = d.allocate(client(capacity));
    assert_eq!(
        (class, code),
        (Class::Error, Some(508)),
        "no relay port left"
    );
    // Deallocating one frees its pair for the next client.
    let (class, code, _) = d.deallocate(client(0));
    assert_eq!((class, code), OK);
    let (class, code, _) = d.allocate(client(capacity));
    assert_eq!((class, code), OK, "the freed pair is reused");
}
