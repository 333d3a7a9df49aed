//! Scenario tests of the TURN core on a virtual clock: every method, error code, expiry and
//! quota, driven through the same `handle_*` entry points the shards use.

use super::*;
use crate::auth::{rest_password, AuthConfig};
use crate::policy::{IpRange, PeerPolicy};
use crate::stun::{decode_error_code, long_term_key_md5, long_term_key_sha256};
use std::collections::BTreeSet;

const REALM: &str = "example.org";
const T0: u64 = 1_700_000_000;

/// The shard's side effects, recorded: relay sockets open (`open`, with the kept ones also in
/// `kept`), ports whose bind is refused, identity lookups asked for.
#[derive(Default)]
struct FakeBinder {
    open: BTreeSet<(bool, u8, u16)>,
    kept: BTreeSet<(bool, u8, u16)>,
    refuse: BTreeSet<u16>,
    identities: Vec<Box<[u8]>>,
    /// TCP listening sockets of TCP allocations (a subset of `open`), and the RFC 6062
    /// commands other than closing them, in order.
    listeners: BTreeSet<(bool, u8, u16)>,
    tcp: Vec<TcpCommand>,
}

impl Effects for FakeBinder {
    fn bind(&mut self, req: &BindRequest) -> bool {
        if self.refuse.contains(&req.port.port) {
            return false;
        }
        for (on, v6) in [(req.v4, false), (req.v6, true)] {
            if on {
                let key = (v6, req.port.addr, req.port.port);
                if req.tcp {
                    assert!(!self.open.contains(&key), "a UDP socket left on {req:?}");
                    assert!(self.listeners.insert(key), "double listen {req:?}");
                    self.open.insert(key);
                } else if !self.kept.remove(&key) {
                    assert!(self.open.insert(key), "double bind {req:?}");
                }
            }
        }
        true
    }
    fn release(&mut self, family: Family, port: RelayPort, keep: bool) {
        let key = (family == Family::V6, port.addr, port.port);
        assert!(self.open.contains(&key), "release of unbound {port:?}");
        assert!(
            !self.listeners.contains(&key),
            "UDP release of a TCP listener {port:?}"
        );
        if keep {
            assert!(self.kept.insert(key), "kept twice {port:?}");
        } else {
            self.open.remove(&key);
            self.kept.remove(&key);
        }
    }
    fn resolve_identity(&mut self, username: Box<[u8]>) {
        self.identities.push(username);
    }
    fn tcp(&mut self, cmd: TcpCommand) {
        if let TcpCommand::CloseListener { family, port } = cmd {
            let key = (family == Family::V6, port.addr, port.port);
            assert!(self.listeners.remove(&key), "close of no listener {port:?}");
            self.open.remove(&key);
        } else {
            self.tcp.push(cmd);
        }
    }
}

impl FakeBinder {
    /// Sockets that serve a live allocation (open and not kept for reuse).
    fn bound(&self) -> BTreeSet<(bool, u8, u16)> {
        self.open.difference(&self.kept).copied().collect()
    }
}

struct H {
    s: Server,
    b: FakeBinder,
    now: Now,
}

#[derive(Clone)]
struct Client {
    addr: SocketAddr,
    user: String,
    pass: String,
    nonce: Vec<u8>,
    tid: u32,
    sha256: bool,
    /// Send USERHASH instead of USERNAME (RFC 8489 §14.4).
    userhash: bool,
}

impl Client {
    fn new(addr: &str, user: &str, pass: &str) -> Self {
        Client {
            addr: addr.parse().unwrap(),
            user: user.into(),
            pass: pass.into(),
            nonce: Vec::new(),
            tid: 0,
            sha256: false,
            userhash: false,
        }
    }
    fn next_tid(&mut self) -> [u8; 12] {
        self.tid += 1;
        let mut t = [0xAB; 12];
        t[8..].copy_from_slice(&self.tid.to_be_bytes());
        t[0..4].copy_from_slice(&(self.addr.port() as u32).to_be_bytes());
        t
    }
    fn key(&self) -> Vec<u8> {
        if self.sha256 {
            long_term_key_sha256(self.user.as_bytes(), REALM.as_bytes(), self.pass.as_bytes())
                .to_vec()
        } else {
            long_term_key_md5(self.user.as_bytes(), REALM.as_bytes(), self.pass.as_bytes()).to_vec()
        }
    }
    /// Build a request; `attrs` go before the credentials, `after_mi` after MESSAGE-INTEGRITY.
    fn request(&self, m: u16, tid: [u8; 12], attrs: &[(u16, Vec<u8>)], auth: bool) -> Vec<u8> {
        let mut buf = [0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, m, Class::Request, &tid).unwrap();
        for (t, v) in attrs {
            w.add(*t, v).unwrap();
        }
        if auth {
            if self.userhash {
                let h = auth::userhash(self.user.as_bytes(), REALM.as_bytes());
                w.add(attr::USERHASH, &h).unwrap();
            } else {
                w.add(attr::USERNAME, self.user.as_bytes()).unwrap();
            }
            w.add(attr::REALM, REALM.as_bytes()).unwrap();
            w.add(attr::NONCE, &self.nonce).unwrap();
            if self.sha256 {
                // RFC 8489 §9.2.4: with a nonce that announces password algorithms, the list
                // the server offered comes back with the choice.
                w.add(attr::PASSWORD_ALGORITHMS, &auth::PASSWORD_ALGORITHMS_VALUE)
                    .unwrap();
                w.add(attr::PASSWORD_ALGORITHM, &[0, 2, 0, 0]).unwrap();
                w.add_integrity_sha256(&self.key()).unwrap();
            } else {
                w.add_integrity(&self.key()).unwrap();
            }
        }
        w.add_fingerprint().unwrap();
        let n = w.finish();
        buf[..n].to_vec()
    }
}

fn xor_attr(addr: SocketAddr, tid: &[u8; 12]) -> Vec<u8> {
    let mut v = [0u8; 20];
    let n = stun::encode_xor_addr(addr, tid, &mut v);
    v[..n].to_vec()
}

fn udp() -> (u16, Vec<u8>) {
    (attr::REQUESTED_TRANSPORT, vec![17, 0, 0, 0])
}

#[derive(Debug)]
struct Resp {
    bytes: Vec<u8>,
}

impl Resp {
    fn msg(&self) -> Message<'_> {
        Message::parse(&self.bytes).expect("server output parses")
    }
    fn code(&self) -> Option<u16> {
        let m = self.msg();
        if m.class() != Class::Error {
            return None;
        }
        decode_error_code(m.get(attr::ERROR_CODE).unwrap()).map(|(c, _)| c)
    }
    fn ok(&self) -> bool {
        self.msg().class() == Class::Success
    }
}

impl H {
    fn new() -> Self {
        Self::with(|_, _| {})
    }

    fn with(f: impl FnOnce(&mut TurnConfig, &mut AuthConfig)) -> Self {
        Self::with_limits(100, 10, f)
    }

    /// With allocation quotas of `max_total` and `max_per_user`.
    fn with_limits(
        max_total: usize,
        max_per_user: usize,
        f: impl FnOnce(&mut TurnConfig, &mut AuthConfig),
    ) -> Self {
        let mut auth = AuthConfig::new(REALM, [42; 32]);
        auth.add_user("alice", "secret");
        auth.add_user("bob", "hunter2");
        auth.rest_secrets = vec![
            b"rest-secret".to_vec().into(),
            b"old-rest-secret".to_vec().into(),
        ];
        let mut policy = PeerPolicy::new(vec![], vec![]);
        policy.service_ports = vec![3478, 8080];
        policy.relay_ips = vec![("127.0.0.1".parse().unwrap(), 0)];
        let policy = Arc::new(policy);
        let mut cfg = TurnConfig::new(Arc::new(auth.clone()), policy.clone());
        cfg.port_min = 50000;
        cfg.port_max = 50099;
        f(&mut cfg, &mut auth);
        cfg.auth = Arc::new(auth);
        let now = Now {
            ms: 1_000_000,
            unix: T0,
        };
        let shared = Arc::new(CrossShard::new(
            max_total,
            max_per_user,
            cfg.relay_v4.len().max(cfg.relay_v6.len()),
            3,
        ));
        H {
            s: Server::new(cfg, shared, now, 7),
            b: FakeBinder::default(),
            now,
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now.ms += secs * 1000;
        self.now.unix += secs;
        self.s.handle_timeout(self.now);
        self.s.drain_commands(&mut self.b);
    }

    /// Feed a client datagram; returns the transmit and the bytes it names.
    fn client_raw(&mut self, from: SocketAddr, bytes: &[u8]) -> Option<(Transmit, Vec<u8>)> {
        let mut buf = vec![0u8; HEADROOM + bytes.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + bytes.len()].copy_from_slice(bytes);
        let r = self.s.handle_client(
            self.now,
            0,
            from,
            &mut buf,
            HEADROOM..HEADROOM + bytes.len(),
        );
        let t = self.s.settle(self.now, r, &mut self.b).transmit()?;
        let out = match &t.data {
            Data::Buf(r) => buf[r.clone()].to_vec(),
            Data::Scratch(n) => self.s.scratch()[..*n].to_vec(),
        };
        Some((t, out))
    }

    fn send(&mut self, c: &Client, bytes: &[u8]) -> Option<Resp> {
        let (t, out) = self.client_raw(c.addr, bytes)?;
        assert_eq!(t.src, Src::Listener(0));
        assert!(matches!(t.data, Data::Scratch(_)));
        assert_eq!(t.dst, c.addr, "responses go back to the sender");
        Some(Resp { bytes: out })
    }

    /// Send with authentication, doing the 401 round trip first when the client has no nonce.
    fn call(&mut self, c: &mut Client, m: u16, attrs: &[(u16, Vec<u8>)]) -> Resp {
        if c.nonce.is_empty() {
            let tid = c.next_tid();
            let r = self.send(c, &c.request(m, tid, attrs, false)).expect("401");
            assert_eq!(r.code(), Some(401));
            c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
            assert_eq!(r.msg().get(attr::REALM).unwrap(), REALM.as_bytes());
        }
        let tid = c.next_tid();
        let r = self
            .send(c, &c.request(m, tid, attrs, true))
            .expect("response");
        if r.code() != Some(401) && r.code() != Some(438) {
            assert!(
                r.msg().verify_integrity(&c.key()),
                "responses to authenticated requests carry MI"
            );
        }
        r
    }

    fn allocate(&mut self, c: &mut Client) -> SocketAddr {
        let r = self.call(c, method::ALLOCATE, &[udp()]);
        assert!(r.ok(), "allocate failed: {:?}", r.code());
        r.msg()
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap()
    }

    fn permit(&mut self, c: &mut Client, peer: SocketAddr) -> Resp {
        let tid_peek = {
            let mut t = c.clone();
            t.next_tid()
        };
        // XOR encoding depends on the transaction id; `call` uses next_tid, so precompute.
        let _ = tid_peek;
        let mut cc = c.clone();
        let tid = cc.next_tid();
        let bytes = c.request(
            method::CREATE_PERMISSION,
            tid,
            &[(attr::XOR_PEER_ADDRESS, xor_attr(peer, &tid))],
            true,
        );
        c.tid = cc.tid;
        self.send(c, &bytes).unwrap()
    }

    fn bind_channel(&mut self, c: &mut Client, ch: u16, peer: SocketAddr) -> Resp {
        let tid = c.next_tid();
        let bytes = c.request(
            method::CHANNEL_BIND,
            tid,
            &[
                (attr::CHANNEL_NUMBER, vec![(ch >> 8) as u8, ch as u8, 0, 0]),
                (attr::XOR_PEER_ADDRESS, xor_attr(peer, &tid)),
            ],
            true,
        );
        self.send(c, &bytes).unwrap()
    }

    fn peer_send(
        &mut self,
        relay: SocketAddr,
        from: SocketAddr,
        payload: &[u8],
    ) -> Option<(Transmit, Vec<u8>)> {
        let mut buf = vec![0u8; HEADROOM + payload.len() + TAILROOM];
        buf[HEADROOM..HEADROOM + payload.len()].copy_from_slice(payload);
        // Garbage in the tailroom must not leak into padding.
        for b in &mut buf[HEADROOM + payload.len()..] {
            *b = 0xEE;
        }
        let fam = Family::of(&relay);
        let t = self
            .s
            .handle_peer(
                self.now,
                fam,
                RelayPort::new(0, relay.port()),
                from,
                &mut buf,
                HEADROOM..HEADROOM + payload.len(),
            )
            .transmit()?;
        let Data::Buf(r) = &t.data else {
            panic!("peer data is framed in place")
        };
        let out = buf[r.clone()].to_vec();
        Some((t, out))
    }
}

fn send_indication(c: &mut Client, peer: SocketAddr, payload: &[u8]) -> Vec<u8> {
    let tid = c.next_tid();
    let mut buf = [0u8; 1500];
    let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, &tid).unwrap();
    w.add(attr::XOR_PEER_ADDRESS, &xor_attr(peer, &tid))
        .unwrap();
    w.add(attr::DATA, payload).unwrap();
    let n = w.finish();
    buf[..n].to_vec()
}

fn alice() -> Client {
    Client::new("198.51.100.1:40000", "alice", "secret")
}

const PEER: &str = "203.0.113.50:6000";
fn peer() -> SocketAddr {
    // 203.0.113/24 is TEST-NET-3 and denied by default; tests allow it explicitly.
    PEER.parse().unwrap()
}

fn h_allow_testnet() -> H {
    H::with(|cfg, _| {
        let mut p = (*cfg.policy).clone();
        p.allow = vec![
            "203.0.113.0/24".parse::<IpRange>().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        cfg.policy = Arc::new(p);
    })
}

#[test]
fn binding_answers_with_only_xor_mapped_address() {
    let mut h = H::new();
    let c = alice();
    let mut buf = [0u8; 64];
    let w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &[1; 12]).unwrap();
    let n = w.finish();
    let r = h.send(&c, &buf[..n]).unwrap();
    let m = r.msg();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        c.addr
    );
    assert_eq!(
        m.attr_types().collect::<Vec<_>>(),
        vec![attr::XOR_MAPPED_ADDRESS]
    );
    assert!(!m.has_fingerprint());
    assert_eq!(r.bytes.len(), 32, "small: header + one attribute");
    assert_eq!(h.s.allocation_count(), 0);

    // The RFC 5769 sample request carries a short-term credential this server cannot know:
    // 401, never success (RFC 8489 §9.1.3), with FINGERPRINT because the request had one.
    let v = hex::decode("000100582112a442b7e7a701bc34d686fa87dfae802200105354554e207465737420636c69656e74002400046e0001ff80290008932ff9b151263b36000600096576746a3a68367659202020000800149aeaa70cbfd8cb56781ef2b5b2d3f249c1b571a280280004e57a3bcf").unwrap();
    let r = h.send(&c, &v).unwrap();
    assert_eq!(r.code(), Some(401));
    assert!(r.msg().has_fingerprint());
    // With long-term credentials a Binding is authenticated: success with MESSAGE-INTEGRITY
    // for the right password, 401 for a wrong one.
    let mut good = alice();
    let nonce_for = |h: &mut H, c: &mut Client| {
        // An unauthenticated Binding is simply answered; take the nonce from a Refresh challenge.
        let tid = c.next_tid();
        let r = h
            .send(c, &c.request(method::REFRESH, tid, &[], false))
            .unwrap();
        c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    };
    nonce_for(&mut h, &mut good);
    let r = h.call(&mut good, method::BINDING, &[]);
    assert!(r.ok());
    assert!(r.msg().verify_integrity(&good.key()));
    assert_eq!(
        r.msg()
            .get_xor_addr(attr::XOR_MAPPED_ADDRESS)
            .unwrap()
            .unwrap(),
        good.addr
    );
    let mut bad = Client::new("198.51.100.1:40000", "alice", "wrong");
    nonce_for(&mut h, &mut bad);
    assert_eq!(h.call(&mut bad, method::BINDING, &[]).code(), Some(401));
}

#[test]
fn unknown_comprehension_required_attribute_gets_420_in_requests_and_drop_in_indications() {
    let mut h = H::new();
    let c = alice();
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &[2; 12]).unwrap();
    w.add(0x7777, b"x").unwrap();
    w.add(0x8777, b"optional is ignored").unwrap();
    let n = w.finish();
    let r = h.send(&c, &buf[..n]).unwrap();
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES).unwrap(),
        &[0x77, 0x77]
    );

    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &[3; 12]).unwrap();
    w.add(0x8777, b"optional is ignored").unwrap();
    let n = w.finish();
    assert!(h.send(&c, &buf[..n]).unwrap().ok());

    let mut h = h_allow_testnet();
    let mut c = alice();
    h.allocate(&mut c);
    assert!(h.permit(&mut c, peer()).ok());
    let tid = c.next_tid();
    let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, &tid).unwrap();
    w.add(attr::XOR_PEER_ADDRESS, &xor_attr(peer(), &tid))
        .unwrap();
    w.add(attr::DATA, b"hi").unwrap();
    w.add(0x7777, b"x").unwrap();
    let n = w.finish();
    assert!(h.client_raw(c.addr, &buf[..n]).is_none());
    assert_eq!(h.s.counters.drops[DropReason::BadIndication as usize], 1);
}

#[test]
fn a_large_unknown_comprehension_required_attribute_gets_420_not_a_drop() {
    // RFC 8489 §7.3.1: a request that otherwise parses and holds an unknown
    // comprehension-required attribute gets 420 with UNKNOWN-ATTRIBUTES, whatever its size;
    // the whole datagram fits a receive slot, so it is not "truncated" either.
    let mut h = H::new();
    let c = alice();
    let mut buf = [0u8; 3000];
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &[4; 12]).unwrap();
    w.add(0x7001, &[0xAB; 2600]).unwrap();
    w.add_fingerprint().unwrap();
    let n = w.finish();
    assert!(n > 2600 && n < 4096 - 128);
    let r = h.send(&c, &buf[..n]).unwrap();
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES).unwrap(),
        &[0x70, 0x01]
    );
    assert!(r.bytes.len() < 64, "the answer does not echo the attribute");
}

#[test]
fn unauthenticated_bindings_are_rate_limited_per_source() {
    let mut h = H::with(|cfg, _| cfg.bindings_per_source = 3);
    let binding = |tid: u8| {
        let mut buf = [0u8; 20];
        let w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &[tid; 12]).unwrap();
        let n = w.finish();
        buf[..n].to_vec()
    };
    let a = alice();
    let b = Client::new("198.51.100.99:1", "bob", "hunter2");
    for i in 0..3 {
        assert!(h.send(&a, &binding(i)).unwrap().ok());
    }
    assert!(
        h.send(&a, &binding(9)).is_none(),
        "over the budget: dropped"
    );
    assert_eq!(
        h.s.counters.drops[DropReason::BindingRateLimited as usize],
        1
    );
    assert!(
        h.send(&b, &binding(10)).unwrap().ok(),
        "other sources are served"
    );
    // A short-term-credential Binding (answered 401) counts against the same budget.
    h.advance(1);
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(&mut buf, method::BINDING, Class::Request, &[11; 12]).unwrap();
    w.add(attr::USERNAME, b"x:y").unwrap();
    w.add_integrity(b"short-term").unwrap();
    let n = w.finish();
    for _ in 0..3 {
        assert_eq!(h.send(&a, &buf[..n]).unwrap().code(), Some(401));
    }
    assert!(h.send(&a, &buf[..n]).is_none());
    assert!(h.send(&a, &binding(12)).is_none());
    h.advance(1);
    assert!(h.send(&a, &binding(13)).unwrap().ok(), "a new second");
    assert_eq!(
        h.s.counters.drops[DropReason::BindingRateLimited as usize],
        3
    );
}

/// An authenticated Refresh with hand-made integrity attributes: `mi` adds MESSAGE-INTEGRITY
/// (right or wrong), `mi256` MESSAGE-INTEGRITY-SHA256 of that length (right or wrong).
fn refresh_with_integrity(
    c: &mut Client,
    mi: Option<bool>,
    mi256: Option<(usize, bool)>,
) -> Vec<u8> {
    let tid = c.next_tid();
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, method::REFRESH, Class::Request, &tid).unwrap();
    w.add(attr::USERNAME, c.user.as_bytes()).unwrap();
    w.add(attr::REALM, REALM.as_bytes()).unwrap();
    w.add(attr::NONCE, &c.nonce).unwrap();
    let good = c.key();
    let bad = vec![0x55u8; good.len()];
    if let Some(right) = mi {
        w.add_integrity(if right { &good } else { &bad }).unwrap();
    }
    if let Some((len, right)) = mi256 {
        w.add_integrity_sha256_len(if right { &good } else { &bad }, len)
            .unwrap();
    }
    w.add_fingerprint().unwrap();
    let n = w.finish();
    buf[..n].to_vec()
}

#[test]
fn message_integrity_then_sha256_and_truncated_sha256_are_accepted() {
    // Reliability checklist P7: MESSAGE-INTEGRITY followed by MESSAGE-INTEGRITY-SHA256, and
    // MESSAGE-INTEGRITY-SHA256 truncated to 16-28 bytes (RFC 8489 §14.6), are accepted, never
    // answered 420.
    let mut h = H::new();
    let mut c = alice();
    h.allocate(&mut c);
    /// MESSAGE-INTEGRITY right?, MESSAGE-INTEGRITY-SHA256 (length, right?), the error
    /// expected, what it is.
    type Case = (
        Option<bool>,
        Option<(usize, bool)>,
        Option<u16>,
        &'static str,
    );
    let cases: [Case; 9] = [
        (Some(true), Some((32, true)), None, "MI then MI-SHA256"),
        (None, Some((16, true)), None, "truncated to 16"),
        (None, Some((20, true)), None, "truncated to 20"),
        (None, Some((24, true)), None, "truncated to 24"),
        (None, Some((28, true)), None, "truncated to 28"),
        (
            Some(true),
            Some((16, true)),
            None,
            "MI then a truncated MI-SHA256",
        ),
        // The stronger MAC decides: a right MI does not rescue a wrong MI-SHA256.
        (
            Some(true),
            Some((32, false)),
            Some(401),
            "MI right, MI-SHA256 wrong",
        ),
        (None, Some((12, true)), Some(401), "shorter than 16"),
        (None, Some((18, true)), Some(401), "not a multiple of 4"),
    ];
    for (mi, mi256, want, what) in cases {
        let bytes = refresh_with_integrity(&mut c, mi, mi256);
        let r = h.send(&c, &bytes).unwrap();
        assert_eq!(r.code(), want, "{what}");
        if want.is_none() {
            let m = r.msg();
            assert_eq!(m.integrity_kind(), Some(IntegrityKind::Sha256), "{what}");
            assert!(m.verify_integrity(&c.key()), "{what}");
        }
    }
    assert_eq!(h.s.allocation_count(), 1);
}

#[test]
fn duplicate_username_and_lifetime_first_one_wins() {
    // Reliability checklist P11 (coturn #2016): with two USERNAMEs or two LIFETIMEs the first
    // one is acted on, deterministically, never the last.
    let mut h = H::new();
    let mut c = alice();
    h.allocate(&mut c);
    let two_users = |c: &mut Client, key_of: &str, second: &str| {
        let tid = c.next_tid();
        let mut buf = [0u8; 512];
        let mut w = MessageWriter::new(&mut buf, method::REFRESH, Class::Request, &tid).unwrap();
        w.add(attr::USERNAME, b"alice").unwrap();
        w.add(attr::USERNAME, second.as_bytes()).unwrap();
        w.add(attr::REALM, REALM.as_bytes()).unwrap();
        w.add(attr::NONCE, &c.nonce).unwrap();
        let key = match key_of {
            "alice" => long_term_key_md5(b"alice", REALM.as_bytes(), b"secret"),
            _ => long_term_key_md5(b"bob", REALM.as_bytes(), b"hunter2"),
        };
        w.add_integrity(&key).unwrap();
        let n = w.finish();
        buf[..n].to_vec()
    };
    // Keyed as alice (the first USERNAME): accepted as alice's Refresh.
    let bytes = two_users(&mut c, "alice", "bob");
    let r = h.send(&c, &bytes).unwrap();
    assert!(r.ok(), "{:?}", r.code());
    // Keyed as bob (the second USERNAME): the first one decides, so the MAC is wrong.
    let bytes = two_users(&mut c, "bob", "bob");
    let r = h.send(&c, &bytes).unwrap();
    assert_eq!(r.code(), Some(401));
    assert_eq!(h.s.allocation_count(), 1);

    // Two LIFETIMEs: 0 first deletes, whatever follows; 1200 first refreshes and keeps it.
    let keep = c.request(
        method::REFRESH,
        c.clone().next_tid(),
        &[
            (attr::LIFETIME, 1200u32.to_be_bytes().to_vec()),
            (attr::LIFETIME, 0u32.to_be_bytes().to_vec()),
        ],
        true,
    );
    c.next_tid();
    let r = h.send(&c, &keep).unwrap();
    assert!(r.ok());
    assert_eq!(r.msg().get_u32(attr::LIFETIME), Some(1200));
    assert_eq!(h.s.allocation_count(), 1);
    let delete = c.request(
        method::REFRESH,
        c.clone().next_tid(),
        &[
            (attr::LIFETIME, 0u32.to_be_bytes().to_vec()),
            (attr::LIFETIME, 1200u32.to_be_bytes().to_vec()),
        ],
        true,
    );
    c.next_tid();
    let r = h.send(&c, &delete).unwrap();
    assert!(r.ok());
    assert_eq!(r.msg().get_u32(attr::LIFETIME), Some(0));
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn unauthenticated_allocate_gets_401_with_realm_and_nonce_and_no_state() {
    let mut h = H::new();
    let mut c = alice();
    let tid = c.next_tid();
    let r = h
        .send(&c, &c.request(method::ALLOCATE, tid, &[udp()], false))
        .unwrap();
    assert_eq!(r.code(), Some(401));
    let m = r.msg();
    assert!(m.get(attr::REALM).is_some() && m.get(attr::NONCE).is_some());
    assert!(m.get(attr::MESSAGE_INTEGRITY).is_none());
    assert_eq!(h.s.allocation_count(), 0);
    assert!(h.b.bound().is_empty());
    // No SOFTWARE and no reason phrase: the error is small. PASSWORD-ALGORITHMS (12 bytes)
    // is the one addition RFC 8489 §9.2.4 requires.
    assert!(r.bytes.len() <= 20 + 8 + 16 + 4 + 60 + 12 + 8);
}

#[test]
fn allocate_success_and_idempotent_retransmission_and_437() {
    let mut h = H::new();
    let mut c = alice();
    // First round trip to get a nonce.
    let tid = c.next_tid();
    let r = h
        .send(&c, &c.request(method::ALLOCATE, tid, &[udp()], false))
        .unwrap();
    c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    let tid = c.next_tid();
    let req = c.request(method::ALLOCATE, tid, &[udp()], true);
    let r1 = h.send(&c, &req).unwrap();
    assert!(r1.ok());
    let m = r1.msg();
    let relay = m.get_xor_addr(attr::XOR_RELAYED_ADDRESS).unwrap().unwrap();
    assert_eq!(relay.ip(), "127.0.0.1".parse::<IpAddr>().unwrap());
    assert!((50000..=50099).contains(&relay.port()));
    assert_eq!(m.get_u32(attr::LIFETIME), Some(600));
    assert_eq!(
        m.get_xor_addr(attr::XOR_MAPPED_ADDRESS).unwrap().unwrap(),
        c.addr
    );
    assert!(m.verify_integrity(&c.key()));
    assert!(h.b.bound().contains(&(false, 0, relay.port())));
    assert!(h.s.cross_shard().relay_ports.contains(0, relay.port()));

    // The same request again (a retransmission): the same allocation, no second bind.
    let r2 = h.send(&c, &req).unwrap();
    assert!(r2.ok());
    assert_eq!(
        r2.msg()
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap(),
        relay
    );
    assert_eq!(h.s.allocation_count(), 1);
    // A new transaction on the same 5-tuple: 437.
    let r3 = h.call(&mut c, method::ALLOCATE, &[udp()]);
    assert_eq!(r3.code(), Some(437));
}

#[test]
fn wrong_password_and_unknown_user_look_the_same() {
    let mut h = H::new();
    let mut wrong = Client::new("198.51.100.2:1", "alice", "not-it");
    let mut unknown = Client::new("198.51.100.3:1", "mallory", "whatever");
    for c in [&mut wrong, &mut unknown] {
        let tid = c.next_tid();
        let r = h
            .send(c, &c.request(method::ALLOCATE, tid, &[udp()], false))
            .unwrap();
        c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    }
    let ta = wrong.next_tid();
    let a = h
        .send(&wrong, &wrong.request(method::ALLOCATE, ta, &[udp()], true))
        .unwrap();
    let tb = unknown.next_tid();
    let b = h
        .send(
            &unknown,
            &unknown.request(method::ALLOCATE, tb, &[udp()], true),
        )
        .unwrap();
    assert_eq!(a.code(), Some(401));
    assert_eq!(b.code(), Some(401));
    assert_eq!(a.bytes.len(), b.bytes.len());
    assert_eq!(
        a.msg().attr_types().collect::<Vec<_>>(),
        b.msg().attr_types().collect::<Vec<_>>()
    );
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn tampered_request_is_401_never_success() {
    let mut h = H::new();
    let mut c = alice();
    let tid = c.next_tid();
    let r = h
        .send(&c, &c.request(method::ALLOCATE, tid, &[udp()], false))
        .unwrap();
    c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    let tid = c.next_tid();
    // Without FINGERPRINT so the flip is only caught by MESSAGE-INTEGRITY.
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, &tid).unwrap();
    w.add(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).unwrap();
    w.add(attr::LIFETIME, &[0, 0, 0, 100]).unwrap();
    w.add(attr::USERNAME, b"alice").unwrap();
    w.add(attr::REALM, REALM.as_bytes()).unwrap();
    w.add(attr::NONCE, &c.nonce).unwrap();
    w.add_integrity(&c.key()).unwrap();
    let n = w.finish();
    buf[20 + 8 + 7] ^= 1; // LIFETIME value
    let r = h.send(&c, &buf[..n]).unwrap();
    assert_eq!(r.code(), Some(401));
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn stale_nonce_gets_438_with_a_fresh_nonce_and_forged_nonce_401() {
    let mut h = H::new();
    let mut c = alice();
    let r = h.call(
        &mut c,
        method::ALLOCATE,
        &[udp(), (attr::LIFETIME, 1200u32.to_be_bytes().to_vec())],
    );
    assert!(r.ok());
    h.advance(601);
    let r = h.call(&mut c, method::REFRESH, &[]);
    assert_eq!(r.code(), Some(438));
    let fresh = r.msg().get(attr::NONCE).unwrap().to_vec();
    assert_ne!(fresh, c.nonce);
    c.nonce = fresh;
    assert!(h.call(&mut c, method::REFRESH, &[]).ok());
    // A nonce issued to another client address is not accepted here.
    let mut other = Client::new("198.51.100.9:1", "alice", "secret");
    other.nonce = c.nonce.clone();
    let tid = other.next_tid();
    let r = h
        .send(
            &other,
            &other.request(method::ALLOCATE, tid, &[udp()], true),
        )
        .unwrap();
    assert_eq!(r.code(), Some(401));
}

#[test]
fn allocate_parameter_errors() {
    let mut h = H::new();
    let mut c = alice();
    assert_eq!(h.call(&mut c, method::ALLOCATE, &[]).code(), Some(400));
    assert_eq!(
        h.call(
            &mut c,
            method::ALLOCATE,
            &[(attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])]
        )
        .code(),
        Some(400),
        "TCP over UDP (RFC 6062 §5.1)"
    );
    let r = h.call(
        &mut c,
        method::ALLOCATE,
        &[udp(), (attr::DONT_FRAGMENT, vec![])],
    );
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(attr::UNKNOWN_ATTRIBUTES).unwrap(),
        &[0x00, 0x1A]
    );
    // No IPv6 relay address configured.
    assert_eq!(
        h.call(
            &mut c,
            method::ALLOCATE,
            &[udp(), (attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])]
        )
        .code(),
        Some(440)
    );
    assert_eq!(
        h.call(
            &mut c,
            method::ALLOCATE,
            &[udp(), (attr::REQUESTED_ADDRESS_FAMILY, vec![9, 0, 0, 0])]
        )
        .code(),
        Some(440)
    );
    assert_eq!(
        h.call(
            &mut c,
            method::ALLOCATE,
            &[
                udp(),
                (attr::RESERVATION_TOKEN, vec![0; 8]),
                (attr::EVEN_PORT, vec![0])
            ]
        )
        .code(),
        Some(400)
    );
    assert_eq!(
        h.call(
            &mut c,
            method::ALLOCATE,
            &[
                udp(),
                (attr::RESERVATION_TOKEN, vec![0; 8]),
                (attr::REQUESTED_ADDRESS_FAMILY, vec![1, 0, 0, 0])
            ]
        )
        .code(),
        Some(400)
    );
    assert_eq!(
        h.call(
            &mut c,
            method::ALLOCATE,
            &[udp(), (attr::ADDITIONAL_ADDRESS_FAMILY, vec![1, 0, 0, 0])]
        )
        .code(),
        Some(400)
    );
    assert_eq!(h.s.allocation_count(), 0);
    assert!(h.b.bound().is_empty());
    // ADDITIONAL-ADDRESS-FAMILY IPv6 on a node without IPv6: IPv4 only, with ADDRESS-ERROR-CODE.
    let r = h.call(
        &mut c,
        method::ALLOCATE,
        &[udp(), (attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0])],
    );
    assert!(r.ok());
    assert_eq!(
        r.msg().get(attr::ADDRESS_ERROR_CODE).unwrap(),
        &[2, 0, 4, 40]
    );
    assert_eq!(r.msg().count(attr::XOR_RELAYED_ADDRESS), 1);
}

#[test]
fn dual_stack_allocation_and_peer_family_checks() {
    let mut h = H::with(|cfg, _| {
        cfg.relay_v6 = vec!["::1".parse().unwrap()];
        let mut p = (*cfg.policy).clone();
        p.allow = vec![
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8::/32".parse().unwrap(),
        ];
        cfg.policy = Arc::new(p);
    });
    let mut c = alice();
    let r = h.call(
        &mut c,
        method::ALLOCATE,
        &[udp(), (attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0])],
    );
    assert!(r.ok());
    let relays: Vec<SocketAddr> = r
        .msg()
        .get_all(attr::XOR_RELAYED_ADDRESS)
        .map(|v| stun::decode_xor_addr(v, r.msg().transaction_id()).unwrap())
        .collect();
    assert_eq!(relays.len(), 2);
    assert!(relays[0].is_ipv4() && relays[1].is_ipv6());
    assert_eq!(relays[0].port(), relays[1].port());
    assert_eq!(h.b.bound().len(), 2);
    assert!(h.permit(&mut c, peer()).ok());
    assert!(h.permit(&mut c, "[2001:db8::7]:9".parse().unwrap()).ok());

    // IPv6-only allocation: an IPv4 peer is 443.
    let mut d = Client::new("198.51.100.77:2", "bob", "hunter2");
    let r = h.call(
        &mut d,
        method::ALLOCATE,
        &[udp(), (attr::REQUESTED_ADDRESS_FAMILY, vec![2, 0, 0, 0])],
    );
    assert!(r.ok());
    assert_eq!(h.permit(&mut d, peer()).code(), Some(443));
    assert_eq!(h.bind_channel(&mut d, 0x4000, peer()).code(), Some(443));
    // Refresh asking for a family the allocation lacks: 443.
    assert_eq!(
        h.call(
            &mut d,
            method::REFRESH,
            &[(attr::REQUESTED_ADDRESS_FAMILY, vec![1, 0, 0, 0])]
        )
        .code(),
        Some(443)
    );
}

#[test]
fn lifetimes_are_clamped_and_refresh_zero_deletes() {
    let mut h = H::new();
    let mut c = alice();
    let r = h.call(
        &mut c,
        method::ALLOCATE,
        &[udp(), (attr::LIFETIME, 1u32.to_be_bytes().to_vec())],
    );
    assert_eq!(
        r.msg().get_u32(attr::LIFETIME),
        Some(600),
        "below the default gets the default"
    );
    let r = h.call(
        &mut c,
        method::REFRESH,
        &[(attr::LIFETIME, u32::MAX.to_be_bytes().to_vec())],
    );
    assert_eq!(
        r.msg().get_u32(attr::LIFETIME),
        Some(3600),
        "clamped to the maximum"
    );
    assert_eq!(h.b.bound().len(), 1);
    let r = h.call(
        &mut c,
        method::REFRESH,
        &[(attr::LIFETIME, vec![0, 0, 0, 0])],
    );
    assert!(r.ok());
    assert_eq!(r.msg().get_u32(attr::LIFETIME), Some(0));
    assert_eq!(h.s.allocation_count(), 0);
    assert!(h.b.bound().is_empty());
    assert_eq!(h.s.cross_shard().quotas.total(), 0);
    // Refresh without an allocation: 437.
    assert_eq!(h.call(&mut c, method::REFRESH, &[]).code(), Some(437));
}

#[test]
fn another_users_credentials_get_441_and_change_nothing() {
    let mut h = h_allow_testnet();
    let mut c = alice();
    h.allocate(&mut c);
    let mut mallory = Client::new(&c.addr.to_string(), "bob", "hunter2");
    mallory.tid = 1000;
    assert_eq!(
        h.call(
            &mut mallory,
            method::REFRESH,
            &[(attr::LIFETIME, vec![0, 0, 0, 0])]
        )
        .code(),
        Some(441)
    );
    assert_eq!(h.permit(&mut mallory, peer()).code(), Some(441));
    assert_eq!(
        h.bind_channel(&mut mallory, 0x4001, peer()).code(),
        Some(441)
    );
    assert_eq!(h.s.allocation_count(), 1);
    // Alice's allocation has no permission for the peer.
    let relay = SocketAddr::new(
        "127.0.0.1".parse().unwrap(),
        *h.b.bound().iter().next().map(|(_, _, p)| p).unwrap(),
    );
    assert!(h.peer_send(relay, peer(), b"x").is_none());
}

#[test]
fn quotas_per_user_and_total_are_exact_and_released() {
    let mut h = H::with_limits(3, 2, |_, _| {});
    let mut a1 = Client::new("198.51.100.1:1", "alice", "secret");
    let mut a2 = Client::new("198.51.100.1:2", "alice", "secret");
    let mut a3 = Client::new("198.51.100.99:3", "alice", "secret");
    let mut b1 = Client::new("198.51.100.2:1", "bob", "hunter2");
    let mut b2 = Client::new("198.51.100.2:2", "bob", "hunter2");
    h.allocate(&mut a1);
    h.allocate(&mut a2);
    assert_eq!(
        h.call(&mut a3, method::ALLOCATE, &[udp()]).code(),
        Some(486),
        "per user, not per IP"
    );
    h.allocate(&mut b1);
    assert_eq!(
        h.call(&mut b2, method::ALLOCATE, &[udp()]).code(),
        Some(486),
        "total"
    );
    assert_eq!(h.s.counters.allocations_refused_quota, 2);
    h.call(&mut a1, method::REFRESH, &[(attr::LIFETIME, vec![0; 4])]);
    h.allocate(&mut b2);
}

#[test]
fn quotas_are_exact_under_concurrency() {
    let q = Arc::new(Quotas::new(1000, 5, 11));
    let granted = Arc::new(AtomicUsize::new(0));
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let q = q.clone();
            let g = granted.clone();
            std::thread::spawn(move || {
                for _ in 0..100 {
                    if q.try_acquire(b"same-user") {
                        g.fetch_add(1, Ordering::SeqCst);
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(granted.load(Ordering::SeqCst), 5);
    assert_eq!(q.total(), 5);
}

#[test]
fn every_deny_vector_peer_gets_403_on_permission_and_channel_and_nothing_is_installed() {
    let mut h = H::new();
    let mut c = alice();
    h.allocate(&mut c);
    let mut v6 = H::with(|cfg, _| {
        cfg.relay_v6 = vec!["2001:db8::1".parse().unwrap()];
        cfg.relay_v4 = Vec::new();
    });
    let mut c6 = alice();
    v6.allocate(&mut c6);
    for ip in [
        "127.0.0.1",
        "127.255.255.254",
        "0.0.0.0",
        "0.1.2.3",
        "169.254.169.254",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "100.64.0.1",
        "224.0.0.1",
        "255.255.255.255",
        "240.0.0.1",
        "198.18.0.1",
        "192.0.0.1",
    ] {
        let p = SocketAddr::new(ip.parse().unwrap(), 80);
        assert_eq!(h.permit(&mut c, p).code(), Some(403), "{ip}");
        assert_eq!(h.bind_channel(&mut c, 0x4000, p).code(), Some(403), "{ip}");
    }
    for ip in [
        "::1",
        "::",
        "::ffff:127.0.0.1",
        "::ffff:0.0.0.0",
        "::127.0.0.1",
        "64:ff9b::7f00:1",
        "2002:7f00:1::1",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
        "::ffff:169.254.169.254",
        "fd00:ec2::254",
        "fe80::1",
        "fc00::1",
        "ff02::1",
    ] {
        let p = SocketAddr::new(ip.parse().unwrap(), 80);
        assert_eq!(v6.permit(&mut c6, p).code(), Some(403), "{ip}");
        assert_eq!(
            v6.bind_channel(&mut c6, 0x4000, p).code(),
            Some(403),
            "{ip}"
        );
    }
    // A mixed request with one good and one bad peer installs nothing.
    let mut h = h_allow_testnet();
    let mut c = alice();
    let relay = h.allocate(&mut c);
    let tid = c.next_tid();
    let bytes = c.request(
        method::CREATE_PERMISSION,
        tid,
        &[
            (attr::XOR_PEER_ADDRESS, xor_attr(peer(), &tid)),
            (
                attr::XOR_PEER_ADDRESS,
                xor_attr("10.0.0.1:1".parse().unwrap(), &tid),
            ),
        ],
        true,
    );
    assert_eq!(h.send(&c, &bytes).unwrap().code(), Some(403));
    assert!(h.peer_send(relay, peer(), b"x").is_none());
}

#[test]
fn send_indication_relays_only_with_permission_and_first_peer_wins() {
    let mut h = h_allow_testnet();
    let mut c = alice();
    let relay = h.allocate(&mut c);
    let ind = send_indication(&mut c, peer(), b"hello peer");
    assert!(
        h.client_raw(c.addr, &ind).is_none(),
        "no permission: silent drop"
    );
    assert_eq!(h.s.counters.drops[DropReason::NoPermission as usize], 1);
    assert!(h.permit(&mut c, peer()).ok());
    let (t, out) = h.client_raw(c.addr, &ind).unwrap();
    assert_eq!(
        t.src,
        Src::Relay(Family::V4, RelayPort::new(0, relay.port()))
    );
    assert_eq!(t.dst, peer());
    assert_eq!(out, b"hello peer");

    // Duplicate XOR-PEER-ADDRESS: the first (permitted) wins; the second (loopback:22) never.
    let tid = c.next_tid();
    let mut buf = [0u8; 200];
    let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, &tid).unwrap();
    w.add(attr::XOR_PEER_ADDRESS, &xor_attr(peer(), &tid))
        .unwrap();
    w.add(
        attr::XOR_PEER_ADDRESS,
        &xor_attr("127.0.0.1:22".parse().unwrap(), &tid),
    )
    .unwrap();
    w.add(attr::DATA, b"hello").unwrap();
    let n = w.finish();
    let (t, _) = h.client_raw(c.addr, &buf[..n]).unwrap();
    assert_eq!(t.dst, peer());

    // Send without an allocation, or to a permitted IP but one of our service ports: dropped.
    let mut stranger = Client::new("198.51.100.200:5", "bob", "hunter2");
    let ind = send_indication(&mut stranger, peer(), b"x");
    assert!(h.client_raw(stranger.addr, &ind).is_none());
}

#[test]
fn peer_data_becomes_a_data_indication_framed_in_place() {
    let mut h = h_allow_testnet();
    let mut c = alice();
    let relay = h.allocate(&mut c);
    assert!(h.peer_send(relay, peer(), b"no permission yet").is_none());
    assert!(h.permit(&mut c, peer()).ok());
    for payload in [&b"x"[..], b"ab", b"abc", b"abcd", &[7u8; 1200][..]] {
        let (t, out) = h.peer_send(relay, peer(), payload).unwrap();
        assert_eq!(t.src, Src::Listener(0));
        assert_eq!(t.dst, c.addr);
        let m = Message::parse(&out).expect("valid Data indication");
        assert_eq!((m.method(), m.class()), (method::DATA, Class::Indication));
        assert_eq!(
            m.get_xor_addr(attr::XOR_PEER_ADDRESS).unwrap().unwrap(),
            peer()
        );
        assert_eq!(m.get(attr::DATA).unwrap(), payload);
        assert_eq!(out.len() % 4, 0);
        assert!(
            out[20 + 12 + 4 + payload.len()..].iter().all(|&b| b == 0),
            "zero padding"
        );
    }
    // From a different IP: no permission.
    assert!(h
        .peer_send(relay, "203.0.113.51:6000".parse().unwrap(), b"x")
        .is_none());
    // Same IP, other port: permissions are per IP (RFC 8656 §9).
    assert!(h
        .peer_send(relay, "203.0.113.50:7".parse().unwrap(), b"x")
        .is_some());
}

#[test]
fn channel_bind_rules_and_channel_data_both_ways() {
    let mut h = h_allow_testnet();
    let mut c = alice();
    let relay = h.allocate(&mut c);
    for bad in [0x3FFFu16, 0x5000, 0xFFFF, 0x0000] {
        assert_eq!(
            h.bind_channel(&mut c, bad, peer()).code(),
            Some(400),
            "{bad:#x}"
        );
    }
    assert!(h.bind_channel(&mut c, 0x4000, peer()).ok());
    assert!(
        h.bind_channel(&mut c, 0x4000, peer()).ok(),
        "refreshing the same binding"
    );
    let other: SocketAddr = "203.0.113.60:1".parse().unwrap();
    assert_eq!(
        h.bind_channel(&mut c, 0x4000, other).code(),
        Some(400),
        "channel bound to another peer"
    );
    assert_eq!(
        h.bind_channel(&mut c, 0x4001, peer()).code(),
        Some(400),
        "peer bound to another channel"
    );
    assert!(h.bind_channel(&mut c, 0x4FFF, other).ok());

    // Client → peer.
    let mut cd = vec![0x40, 0x00, 0x00, 0x05];
    cd.extend_from_slice(b"hello\0\0\0");
    let (t, out) = h.client_raw(c.addr, &cd).unwrap();
    assert_eq!(t.dst, peer());
    assert_eq!(
        t.src,
        Src::Relay(Family::V4, RelayPort::new(0, relay.port()))
    );
    assert_eq!(out, b"hello");
    // Unbound channel, or a channel number outside the range: silent drop.
    assert!(h.client_raw(c.addr, &[0x40, 0x02, 0, 1, 9]).is_none());
    assert!(h.client_raw(c.addr, &[0x7F, 0xFF, 0, 1, 9]).is_none());
    // Declared length beyond the datagram: drop.
    assert!(h.client_raw(c.addr, &[0x40, 0x00, 0, 9, 1]).is_none());
    // Peer → client as ChannelData.
    let (t, out) = h.peer_send(relay, peer(), b"pong").unwrap();
    assert_eq!(t.dst, c.addr);
    assert_eq!(out, [0x40, 0x00, 0x00, 0x04, b'p', b'o', b'n', b'g']);
}

#[test]
fn permissions_channels_and_allocations_expire_on_time() {
    let mut h = h_allow_testnet();
    let mut c = alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_channel(&mut c, 0x4000, peer()).ok());
    let other: SocketAddr = "203.0.113.70:1".parse().unwrap();
    assert!(h.permit(&mut c, other).ok());
    h.advance(299);
    assert!(h.peer_send(relay, other, b"x").is_some());
    h.advance(1);
    assert!(
        h.peer_send(relay, other, b"x").is_none(),
        "permission expired at 300 s"
    );
    // The channel's own permission also lapsed: channel traffic stops until refreshed.
    assert!(h.peer_send(relay, peer(), b"x").is_none());
    assert!(h.client_raw(c.addr, &[0x40, 0, 0, 1, 1, 0, 0, 0]).is_none());
    // Refresh the channel binding (this refreshes its permission too).
    c.nonce.clear();
    assert!(h.bind_channel_fresh(&mut c, 0x4000, peer()));
    assert!(h.peer_send(relay, peer(), b"x").is_some());
    // Keep the allocation alive past its 600 s default with a Refresh.
    h.advance(250);
    assert!(h.call(&mut c, method::REFRESH, &[]).ok());
    h.advance(350);
    assert_eq!(
        h.s.allocation_count(),
        1,
        "refreshed at 550 s for another 600 s"
    );
    h.advance(251);
    assert_eq!(h.s.allocation_count(), 0);
    assert!(h.b.bound().is_empty(), "relay socket closed");
    assert_eq!(h.s.counters.allocations_expired, 1);
    assert_eq!(h.s.cross_shard().quotas.total(), 0);
    assert!(!h.s.cross_shard().relay_ports.contains(0, relay.port()));
    assert!(h.peer_send(relay, peer(), b"x").is_none());
}

impl H {
    fn bind_channel_fresh(&mut self, c: &mut Client, ch: u16, p: SocketAddr) -> bool {
        if c.nonce.is_empty() {
            let tid = c.next_tid();
            let r = self
                .send(c, &c.request(method::BINDING, tid, &[], false))
                .unwrap();
            assert!(r.ok());
            // Binding has no auth; get a nonce with a Refresh challenge instead.
            let tid = c.next_tid();
            let r = self
                .send(c, &c.request(method::REFRESH, tid, &[], false))
                .unwrap();
            c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
        }
        self.bind_channel(c, ch, p).ok()
    }
}

#[test]
fn even_port_reservation_token_and_its_expiry() {
    let mut h = H::new();
    let mut c = alice();
    let r = h.call(
        &mut c,
        method::ALLOCATE,
        &[udp(), (attr::EVEN_PORT, vec![0x80])],
    );
    assert!(r.ok());
    let relay = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relay.port() % 2, 0);
    let token = r.msg().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    assert_eq!(token.len(), 8);
    // The odd port is held back from other allocations.
    let mut many = Vec::new();
    for i in 0..10 {
        let mut x = Client::new(&format!("198.51.100.{}:9", 10 + i), "bob", "hunter2");
        x.tid = 500;
        let r = h.call(
            &mut x,
            method::ALLOCATE,
            &[udp(), (attr::EVEN_PORT, vec![0])],
        );
        if r.ok() {
            let p = r
                .msg()
                .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
                .unwrap()
                .unwrap()
                .port();
            assert_eq!(p % 2, 0);
            assert_ne!(p, relay.port() + 1);
            many.push(p);
        }
    }
    let mut d = Client::new("198.51.100.1:40001", "alice", "secret");
    let r = h.call(
        &mut d,
        method::ALLOCATE,
        &[udp(), (attr::RESERVATION_TOKEN, token.clone())],
    );
    assert!(r.ok());
    assert_eq!(
        r.msg()
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap()
            .port(),
        relay.port() + 1
    );
    // Reuse of the token: 508.
    let mut e = Client::new("198.51.100.1:40002", "alice", "secret");
    assert_eq!(
        h.call(
            &mut e,
            method::ALLOCATE,
            &[udp(), (attr::RESERVATION_TOKEN, token)]
        )
        .code(),
        Some(508)
    );

    // An unused reservation expires after 30 s and its port returns to the pool.
    let mut f = Client::new("198.51.100.5:1", "alice", "secret");
    let r = h.call(
        &mut f,
        method::ALLOCATE,
        &[udp(), (attr::EVEN_PORT, vec![0x80])],
    );
    let token = r.msg().get(attr::RESERVATION_TOKEN).unwrap().to_vec();
    h.advance(31);
    let mut g = Client::new("198.51.100.5:2", "alice", "secret");
    assert_eq!(
        h.call(
            &mut g,
            method::ALLOCATE,
            &[udp(), (attr::RESERVATION_TOKEN, token)]
        )
        .code(),
        Some(508)
    );
    // Both refusals are counted as reservation refusals, not as a lack of capacity.
    assert_eq!(h.s.counters.allocations_refused_reservation, 2);
    assert_eq!(h.s.counters.allocations_refused_capacity, 0);
}

#[test]
fn ports_exhausted_gives_508_and_unbindable_ports_are_skipped() {
    let mut h = H::with_limits(100, 100, |cfg, _| {
        cfg.port_min = 50000;
        cfg.port_max = 50003;
    });
    h.b.refuse.insert(50001);
    let mut got = BTreeSet::new();
    for i in 0..3 {
        let mut x = Client::new(&format!("198.51.100.1:{}", 100 + i), "alice", "secret");
        got.insert(h.allocate(&mut x).port());
    }
    assert_eq!(got, BTreeSet::from([50000, 50002, 50003]));
    let mut x = Client::new("198.51.100.1:999", "alice", "secret");
    assert_eq!(h.call(&mut x, method::ALLOCATE, &[udp()]).code(), Some(508));
    assert_eq!(
        h.s.cross_shard().quotas.total(),
        3,
        "a refused allocation gives its quota back"
    );
}

#[test]
fn two_clients_relay_to_each_other_through_one_node_but_not_to_service_ports() {
    let mut h = H::new();
    let mut a = alice();
    let mut b = Client::new("198.51.100.2:40000", "bob", "hunter2");
    let ra = h.allocate(&mut a);
    let rb = h.allocate(&mut b);
    // Loopback is denied by default, but an allocated relay address of this node is a peer.
    assert!(h.permit(&mut a, rb).ok());
    assert!(h.permit(&mut b, ra).ok());
    assert!(h.bind_channel(&mut a, 0x4000, rb).ok());
    // Other loopback ports, and our own service ports, are not.
    assert_eq!(
        h.permit(&mut a, "127.0.0.1:3478".parse().unwrap()).code(),
        Some(403)
    );
    assert_eq!(
        h.permit(&mut a, "127.0.0.1:22".parse().unwrap()).code(),
        Some(403)
    );
    // The IP is permitted now (permission is per IP) but a Send to a service port on it is
    // still refused.
    let ind = send_indication(
        &mut a,
        "127.0.0.1:8080".parse().unwrap(),
        b"GET / HTTP/1.0\r\n\r\n",
    );
    assert!(h.client_raw(a.addr, &ind).is_none());
    let ind = send_indication(&mut a, rb, b"to bob");
    assert_eq!(h.client_raw(a.addr, &ind).unwrap().0.dst, rb);
}

#[test]
fn service_ports_denied_even_when_loopback_is_allowed() {
    let mut h = H::with(|cfg, _| {
        let mut p = (*cfg.policy).clone();
        p.allow = vec!["127.0.0.0/8".parse().unwrap()];
        cfg.policy = Arc::new(p);
    });
    let mut c = alice();
    h.allocate(&mut c);
    assert!(h.permit(&mut c, "127.0.0.1:9999".parse().unwrap()).ok());
    assert_eq!(
        h.permit(&mut c, "127.0.0.1:3478".parse().unwrap()).code(),
        Some(403)
    );
    assert_eq!(
        h.bind_channel(&mut c, 0x4000, "127.0.0.1:8080".parse().unwrap())
            .code(),
        Some(403)
    );
}

#[test]
fn rest_credentials_with_rotation_and_expiry() {
    let mut h = H::new();
    let user = format!("{}:carol", T0 + 3600);
    let mut c = Client::new(
        "198.51.100.8:1",
        &user,
        &rest_password(b"rest-secret", user.as_bytes()),
    );
    h.allocate(&mut c);
    let mut old = Client::new(
        "198.51.100.8:2",
        &user,
        &rest_password(b"old-rest-secret", user.as_bytes()),
    );
    h.allocate(&mut old);
    let mut wrong = Client::new(
        "198.51.100.8:3",
        &user,
        &rest_password(b"nope", user.as_bytes()),
    );
    assert_eq!(
        h.call(&mut wrong, method::ALLOCATE, &[udp()]).code(),
        Some(401)
    );
    let expired_user = format!("{}:carol", T0 - 1);
    let mut e = Client::new(
        "198.51.100.8:4",
        &expired_user,
        &rest_password(b"rest-secret", expired_user.as_bytes()),
    );
    assert_eq!(h.call(&mut e, method::ALLOCATE, &[udp()]).code(), Some(401));
    // After expiry even a cached credential is refused.
    h.advance(3601);
    c.nonce.clear();
    assert_eq!(h.call(&mut c, method::REFRESH, &[]).code(), Some(401));
}

#[test]
fn sha256_password_algorithm_and_integrity() {
    let mut h = H::new();
    let mut c = alice();
    c.sha256 = true;
    let r = h.call(&mut c, method::ALLOCATE, &[udp()]);
    assert!(r.ok());
    assert_eq!(r.msg().integrity_kind(), Some(IntegrityKind::Sha256));
    assert!(r.msg().verify_integrity(&c.key()));
    // An unknown algorithm is 400.
    let tid = c.next_tid();
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, method::REFRESH, Class::Request, &tid).unwrap();
    w.add(attr::USERNAME, b"alice").unwrap();
    w.add(attr::REALM, REALM.as_bytes()).unwrap();
    w.add(attr::NONCE, &c.nonce).unwrap();
    w.add(attr::PASSWORD_ALGORITHM, &[0, 9, 0, 0]).unwrap();
    w.add_integrity_sha256(&c.key()).unwrap();
    let n = w.finish();
    assert_eq!(h.send(&c, &buf[..n]).unwrap().code(), Some(400));
}

#[test]
fn attributes_after_integrity_are_not_acted_on() {
    let mut h = H::new();
    let mut c = alice();
    h.allocate(&mut c);
    // A Refresh whose LIFETIME 0 sits after MESSAGE-INTEGRITY must not delete.
    let tid = c.next_tid();
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, method::REFRESH, Class::Request, &tid).unwrap();
    w.add(attr::USERNAME, b"alice").unwrap();
    w.add(attr::REALM, REALM.as_bytes()).unwrap();
    w.add(attr::NONCE, &c.nonce).unwrap();
    w.add_integrity(&c.key()).unwrap();
    w.add(attr::LIFETIME, &[0, 0, 0, 0]).unwrap();
    let n = w.finish();
    let r = h.send(&c, &buf[..n]).unwrap();
    assert!(r.ok());
    assert_eq!(r.msg().get_u32(attr::LIFETIME), Some(600));
    assert_eq!(h.s.allocation_count(), 1);
}

#[test]
fn oversized_text_attributes_get_400() {
    let mut h = H::new();
    let mut c = alice();
    h.allocate(&mut c);
    let mut big = c.clone();
    big.user = "u".repeat(1100);
    let tid = big.next_tid();
    let r = h
        .send(&big, &big.request(method::REFRESH, tid, &[], true))
        .unwrap();
    assert_eq!(r.code(), Some(400));
}

#[test]
fn draining_refuses_new_allocations_but_keeps_relaying() {
    let mut h = h_allow_testnet();
    let mut c = alice();
    let relay = h.allocate(&mut c);
    assert!(h.permit(&mut c, peer()).ok());
    h.s.set_draining(true);
    let mut d = Client::new("198.51.100.3:3", "bob", "hunter2");
    assert_eq!(h.call(&mut d, method::ALLOCATE, &[udp()]).code(), Some(508));
    assert!(h.peer_send(relay, peer(), b"still relaying").is_some());
    assert!(h.call(&mut c, method::REFRESH, &[]).ok());
}

/// An identity-shaped username (base122 of a realm id, a key id and a token long enough to be
/// an ECIES envelope), different for each `seed`.
fn identity_name(seed: u8) -> String {
    let raw: Vec<u8> = (0..auth::IDENTITY_USERNAME_MIN_DECODED + 40)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    String::from_utf8(crate::base122::encode(&raw)).expect("base122 is UTF-8")
}

/// Resolve `username` as the control thread would: keys for `password`, the actor `actor`.
fn identity_answer(username: &str, password: &str, actor: u8, expires_at: u64) -> IdentityAnswer {
    let u = username.as_bytes();
    IdentityAnswer {
        username: u.to_vec().into(),
        outcome: Ok(auth::IdentityKey {
            key_md5: long_term_key_md5(u, REALM.as_bytes(), password.as_bytes()),
            key_sha256: long_term_key_sha256(u, REALM.as_bytes(), password.as_bytes()),
            expires_at,
            quota_key: [actor; 16],
        }),
    }
}

/// Take a nonce from a 401 and send the authenticated request once; `None` when dropped.
fn first_authenticated(
    h: &mut H,
    c: &mut Client,
    m: u16,
    attrs: &[(u16, Vec<u8>)],
) -> (Vec<u8>, Option<Resp>) {
    let tid = c.next_tid();
    let r = h.send(c, &c.request(m, tid, attrs, false)).unwrap();
    c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    let tid = c.next_tid();
    let req = c.request(m, tid, attrs, true);
    let r = h.send(c, &req);
    (req, r)
}

#[test]
fn identity_usernames_are_resolved_once_off_the_core() {
    let mut h = H::with(|_, auth| auth.identities = true);
    let name = identity_name(1);
    let mut c = Client::new("198.51.100.4:4", &name, "00ff");
    let (req, r) = first_authenticated(&mut h, &mut c, method::ALLOCATE, &[udp()]);
    assert!(r.is_none(), "dropped while the control thread resolves it");
    assert!(h.send(&c, &req).is_none());
    assert_eq!(
        h.b.identities,
        [Box::from(name.as_bytes())],
        "asked once, not per retransmission"
    );
    h.s.handle_identity_answer(h.now, identity_answer(&name, "00ff", 1, T0 + 100));
    assert!(
        h.send(&c, &req).unwrap().ok(),
        "the retransmission succeeds from the cache"
    );
    // SHA-256 keys work for identities too.
    let mut s = c.clone();
    s.sha256 = true;
    s.addr = "198.51.100.4:6".parse().unwrap();
    s.nonce.clear();
    assert!(h.call(&mut s, method::ALLOCATE, &[udp()]).ok());
    // A refused identity gets 401.
    let forged = identity_name(2);
    let mut bad = Client::new("198.51.100.4:5", &forged, "00");
    let (req, r) = first_authenticated(&mut h, &mut bad, method::ALLOCATE, &[udp()]);
    assert!(r.is_none());
    h.s.handle_identity_answer(
        h.now,
        IdentityAnswer {
            username: forged.as_bytes().to_vec().into(),
            outcome: Err(auth::IdentityRefusal {
                reason: "invalid token",
                retryable: false,
            }),
        },
    );
    assert_eq!(h.send(&bad, &req).unwrap().code(), Some(401));
}

#[test]
fn with_identities_on_an_unknown_username_is_refused_as_fast_as_a_wrong_password() {
    // Identity credentials on: before the fix an unknown name went to the control thread and
    // was answered only on the retransmission, while a static user with a wrong password was
    // answered at once, which told which static users exist.
    let mut h = H::with(|_, auth| auth.identities = true);
    for (addr, user, pass) in [
        ("198.51.100.7:1", "alice", "wrong"),
        ("198.51.100.7:2", "mallory", "whatever"),
        ("198.51.100.7:3", "1600000000:eve", "expired-rest"),
    ] {
        let mut c = Client::new(addr, user, pass);
        let (_, r) = first_authenticated(&mut h, &mut c, method::ALLOCATE, &[udp()]);
        let r = r.unwrap_or_else(|| panic!("{user}: answered on the first transmission"));
        assert_eq!(r.code(), Some(401), "{user}");
        // The same shape: ERROR-CODE, REALM, NONCE, PASSWORD-ALGORITHMS, no integrity.
        assert_eq!(
            r.msg().attr_types().collect::<Vec<_>>(),
            [
                attr::ERROR_CODE,
                attr::REALM,
                attr::NONCE,
                attr::PASSWORD_ALGORITHMS
            ],
            "{user}"
        );
    }
    assert!(
        h.b.identities.is_empty(),
        "nothing was sent to the control thread"
    );
    assert_eq!(
        h.s.counters.auth_failures_by_reason[AuthFailure::Credential as usize],
        2
    );
    assert_eq!(
        h.s.counters.auth_failures_by_reason[AuthFailure::Integrity as usize],
        1
    );
}

#[test]
fn quotas_count_the_identity_behind_rotating_credentials() {
    let mut h = H::with_limits(100, 2, |_, auth| auth.identities = true);
    // TURN REST: a fresh expiry is a fresh USERNAME but the same name behind it.
    let mut n = 0;
    let mut rest = |h: &mut H, expiry: u64, name: &str| {
        n += 1;
        let user = format!("{expiry}:{name}");
        let mut c = Client::new(
            &format!("198.51.100.20:{n}"),
            &user,
            &rest_password(b"rest-secret", user.as_bytes()),
        );
        h.call(&mut c, method::ALLOCATE, &[udp()]).code()
    };
    assert_eq!(rest(&mut h, T0 + 600, "carol"), None);
    assert_eq!(rest(&mut h, T0 + 601, "carol"), None);
    assert_eq!(
        rest(&mut h, T0 + 602, "carol"),
        Some(486),
        "a rotated REST username does not get a fresh quota"
    );
    assert_eq!(
        rest(&mut h, T0 + 603, "dave"),
        None,
        "another name has its own"
    );
    // Identity credentials: re-issued credentials of one actor share the actor's quota.
    let mut k = 0;
    let mut identity = |h: &mut H, seed: u8, actor: u8| {
        k += 1;
        let name = identity_name(seed);
        let mut c = Client::new(&format!("198.51.100.21:{k}"), &name, "00ff");
        let (req, r) = first_authenticated(h, &mut c, method::ALLOCATE, &[udp()]);
        assert!(r.is_none(), "resolved off the core first");
        h.s.handle_identity_answer(h.now, identity_answer(&name, "00ff", actor, T0 + 3600));
        h.send(&c, &req).unwrap().code()
    };
    assert_eq!(identity(&mut h, 10, 7), None);
    assert_eq!(identity(&mut h, 11, 7), None);
    assert_eq!(
        identity(&mut h, 12, 7),
        Some(486),
        "a re-issued credential of the same actor does not get a fresh quota"
    );
    assert_eq!(identity(&mut h, 13, 8), None, "another actor has its own");
    assert_eq!(h.s.cross_shard().quotas.total(), 6);
}

#[test]
fn userhash_finds_static_users_and_nobody_else() {
    let mut h = H::with(|_, auth| {
        auth.rest_secrets.clear();
    });
    let mut c = alice();
    c.userhash = true;
    let r = h.call(&mut c, method::ALLOCATE, &[udp()]);
    assert!(r.ok(), "USERHASH of a static user: {:?}", r.code());
    // The allocation belongs to alice: her USERNAME works on it, bob's credential does not.
    let mut by_name = c.clone();
    by_name.userhash = false;
    assert!(h.call(&mut by_name, method::REFRESH, &[]).ok());
    let mut bob = Client::new("198.51.100.1:40000", "bob", "hunter2");
    bob.nonce = c.nonce.clone();
    assert_eq!(h.call(&mut bob, method::REFRESH, &[]).code(), Some(441));
    // A USERHASH that names nobody is an unknown user: 401.
    let mut nobody = Client::new("198.51.100.2:1", "nobody", "x");
    nobody.userhash = true;
    assert_eq!(
        h.call(&mut nobody, method::ALLOCATE, &[udp()]).code(),
        Some(401)
    );
    // With static users only, the nonce announces username anonymity.
    assert_eq!(
        auth::nonce_features(&c.nonce),
        Some(features::PASSWORD_ALGORITHMS | features::USERNAME_ANONYMITY)
    );
    // USERNAME and USERHASH together, or a USERHASH of the wrong length: 400.
    let tid = c.next_tid();
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, method::REFRESH, Class::Request, &tid).unwrap();
    w.add(attr::USERNAME, b"alice").unwrap();
    w.add(attr::USERHASH, &auth::userhash(b"alice", REALM.as_bytes()))
        .unwrap();
    w.add(attr::REALM, REALM.as_bytes()).unwrap();
    w.add(attr::NONCE, &c.nonce).unwrap();
    w.add_integrity(&c.key()).unwrap();
    let n = w.finish();
    assert_eq!(h.send(&c, &buf[..n]).unwrap().code(), Some(400));
    let tid = c.next_tid();
    let mut w = MessageWriter::new(&mut buf, method::REFRESH, Class::Request, &tid).unwrap();
    w.add(attr::USERHASH, &[1; 31]).unwrap();
    w.add(attr::REALM, REALM.as_bytes()).unwrap();
    w.add(attr::NONCE, &c.nonce).unwrap();
    w.add_integrity(&c.key()).unwrap();
    let n = w.finish();
    assert_eq!(h.send(&c, &buf[..n]).unwrap().code(), Some(400));
}

#[test]
fn challenges_announce_password_algorithms_and_bid_downs_get_400() {
    let mut h = H::new();
    // REST secrets are configured here: no username anonymity, password algorithms only.
    let tid = [9; 12];
    let c = alice();
    let r = h
        .send(&c, &c.request(method::ALLOCATE, tid, &[udp()], false))
        .unwrap();
    assert_eq!(r.code(), Some(401));
    let nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    assert_eq!(&nonce[..13], b"obMatJos2AAAB");
    assert_eq!(
        r.msg().get(attr::PASSWORD_ALGORITHMS).unwrap(),
        &[0, 2, 0, 0, 0, 1, 0, 0],
        "SHA-256 first, then MD5"
    );
    // Build an Allocate with the given PASSWORD-ALGORITHM(S) and SHA-256 or MD5 keys.
    let req = |c: &mut Client, one: Option<[u8; 4]>, list: Option<&[u8]>, sha: bool| {
        let tid = c.next_tid();
        let mut buf = [0u8; 512];
        let mut w = MessageWriter::new(&mut buf, method::ALLOCATE, Class::Request, &tid).unwrap();
        w.add(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).unwrap();
        w.add(attr::USERNAME, b"alice").unwrap();
        w.add(attr::REALM, REALM.as_bytes()).unwrap();
        w.add(attr::NONCE, &c.nonce).unwrap();
        if let Some(l) = list {
            w.add(attr::PASSWORD_ALGORITHMS, l).unwrap();
        }
        if let Some(a) = one {
            w.add(attr::PASSWORD_ALGORITHM, &a).unwrap();
        }
        let key = if sha {
            long_term_key_sha256(b"alice", REALM.as_bytes(), b"secret").to_vec()
        } else {
            long_term_key_md5(b"alice", REALM.as_bytes(), b"secret").to_vec()
        };
        w.add_integrity(&key).unwrap();
        let n = w.finish();
        buf[..n].to_vec()
    };
    let ours = &auth::PASSWORD_ALGORITHMS_VALUE[..];
    let mut n = 0;
    let mut fresh = |nonce: &[u8]| {
        n += 1;
        let mut c = Client::new(&format!("198.51.100.30:{n}"), "alice", "secret");
        c.nonce = nonce.to_vec();
        c
    };
    // The nonce is bound to the client address: take one per client.
    let mut with_nonce = |h: &mut H| {
        let mut c = fresh(&[]);
        let tid = c.next_tid();
        let r = h
            .send(&c, &c.request(method::ALLOCATE, tid, &[udp()], false))
            .unwrap();
        c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
        c
    };
    /// PASSWORD-ALGORITHM, PASSWORD-ALGORITHMS, SHA-256 keys, the error expected, what it is.
    type Case<'a> = (
        Option<[u8; 4]>,
        Option<&'a [u8]>,
        bool,
        Option<u16>,
        &'a str,
    );
    let cases: [Case; 8] = [
        (None, None, false, None, "neither: MD5"),
        (
            Some([0, 2, 0, 0]),
            Some(ours),
            true,
            None,
            "SHA-256 from the list",
        ),
        (
            Some([0, 1, 0, 0]),
            Some(ours),
            false,
            None,
            "MD5 from the list",
        ),
        (
            Some([0, 2, 0, 0]),
            None,
            true,
            Some(400),
            "the list is missing",
        ),
        (None, Some(ours), false, Some(400), "the choice is missing"),
        (
            Some([0, 1, 0, 0]),
            Some(&[0, 1, 0, 0]),
            false,
            Some(400),
            "bid-down: SHA-256 stripped from the list",
        ),
        (
            Some([0, 1, 0, 0]),
            Some(&[0, 1, 0, 0, 0, 2, 0, 0]),
            false,
            Some(400),
            "the list reordered",
        ),
        (
            Some([0, 3, 0, 0]),
            Some(ours),
            false,
            Some(400),
            "a choice not in the list",
        ),
    ];
    for (one, list, sha, want, what) in cases {
        let mut c = with_nonce(&mut h);
        let bytes = req(&mut c, one, list, sha);
        let r = h.send(&c, &bytes).unwrap();
        assert_eq!(r.code(), want, "{what}");
        if want.is_none() {
            assert!(r.msg().verify_integrity(&if sha {
                long_term_key_sha256(b"alice", REALM.as_bytes(), b"secret").to_vec()
            } else {
                long_term_key_md5(b"alice", REALM.as_bytes(), b"secret").to_vec()
            }));
        }
    }
    // A nonce whose cookie was rewritten to claim "no password algorithms" (so that a lone
    // PASSWORD-ALGORITHM MD5 would pass the checks) fails its MAC: 401, never success.
    let mut c = with_nonce(&mut h);
    c.nonce[9..13].copy_from_slice(b"AAAA");
    let bytes = req(&mut c, Some([0, 1, 0, 0]), None, false);
    assert_eq!(h.send(&c, &bytes).unwrap().code(), Some(401));
    // 438 carries PASSWORD-ALGORITHMS too.
    let mut c = with_nonce(&mut h);
    h.advance(601);
    let bytes = req(&mut c, None, None, false);
    let r = h.send(&c, &bytes).unwrap();
    assert_eq!(r.code(), Some(438));
    assert_eq!(r.msg().get(attr::PASSWORD_ALGORITHMS).unwrap(), ours);
}

#[test]
fn garbage_is_dropped_and_counted() {
    let mut h = H::new();
    let from: SocketAddr = "198.51.100.1:1".parse().unwrap();
    for g in [
        &b""[..],
        b"\xff\xff",
        &[0u8; 20],
        b"GET / HTTP/1.1\r\n",
        &[0x40, 0x00],
    ] {
        assert!(h.client_raw(from, g).is_none());
    }
    let dropped: u64 = h.s.counters.drops.iter().sum();
    assert_eq!(dropped, 5);
    // A response or an indication other than Send from a client: dropped.
    let mut buf = [0u8; 64];
    let n = MessageWriter::new(&mut buf, method::BINDING, Class::Success, &[1; 12])
        .unwrap()
        .finish();
    assert!(h.client_raw(from, &buf[..n]).is_none());
}

#[test]
fn challenges_are_rate_limited_per_source_with_fixed_memory() {
    let mut h = H::new();
    let c = alice();
    let mut answered = 0;
    for i in 0..200u32 {
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&i.to_be_bytes());
        if h.send(&c, &c.request(method::ALLOCATE, t, &[udp()], false))
            .is_some()
        {
            answered += 1;
        }
    }
    assert_eq!(answered, 50, "50 challenges per source per second");
    assert_eq!(h.s.counters.drops[DropReason::RateLimited as usize], 150);
    // Another source is still answered, and a new second resets the budget.
    let other = Client::new("198.51.100.250:1", "bob", "hunter2");
    assert!(h
        .send(
            &other,
            &other.request(method::ALLOCATE, [9; 12], &[udp()], false)
        )
        .is_some());
    h.advance(1);
    assert!(h
        .send(&c, &c.request(method::ALLOCATE, [8; 12], &[udp()], false))
        .is_some());
}

#[test]
fn bandwidth_cap_per_allocation_and_direction() {
    let mut h = H::with(|cfg, _| {
        cfg.max_bytes_per_sec = 1000;
        let mut p = (*cfg.policy).clone();
        p.allow = vec!["203.0.113.0/24".parse().unwrap()];
        cfg.policy = Arc::new(p);
    });
    let mut c = alice();
    let relay = h.allocate(&mut c);
    assert!(h.bind_channel(&mut c, 0x4000, peer()).ok());
    let mut cd = vec![0x40, 0x00, 0x00, 100];
    cd.extend_from_slice(&[7u8; 100]);
    // One second's worth (1000 bytes = 10 datagrams of 100) passes, the 11th is dropped.
    let sent = (0..15)
        .filter(|_| h.client_raw(c.addr, &cd).is_some())
        .count();
    assert_eq!(sent, 10);
    assert_eq!(h.s.counters.drops[DropReason::Bandwidth as usize], 5);
    // The other direction has its own budget.
    let back = (0..15)
        .filter(|_| h.peer_send(relay, peer(), &[1u8; 100]).is_some())
        .count();
    assert_eq!(back, 10);
    // Half a second later, half the budget is back.
    h.now.ms += 500;
    let sent = (0..15)
        .filter(|_| h.client_raw(c.addr, &cd).is_some())
        .count();
    assert_eq!(sent, 5);
}

#[test]
fn several_relay_addresses_multiply_capacity_and_route_by_address_and_port() {
    let mut h = H::with(|cfg, _| {
        cfg.relay_v4 = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
        cfg.port_min = 50000;
        cfg.port_max = 50001;
        let mut p = (*cfg.policy).clone();
        p.allow = vec!["203.0.113.0/24".parse().unwrap()];
        cfg.policy = Arc::new(p);
    });
    let mut relays = BTreeSet::new();
    let mut clients = Vec::new();
    for i in 0..4 {
        let mut c = Client::new(&format!("198.51.100.1:{}", 100 + i), "alice", "secret");
        let r = h.allocate(&mut c);
        relays.insert(r);
        clients.push((c, r));
    }
    assert_eq!(relays.len(), 4, "two ports on each of two addresses");
    let ips: BTreeSet<IpAddr> = relays.iter().map(|r| r.ip()).collect();
    assert_eq!(ips.len(), 2);
    let mut extra = Client::new("198.51.100.1:999", "alice", "secret");
    assert_eq!(
        h.call(&mut extra, method::ALLOCATE, &[udp()]).code(),
        Some(508)
    );
    // Peer data reaches the allocation owning that exact (address, port).
    for (c, r) in clients.iter_mut() {
        assert!(h.permit(c, peer()).ok());
        let idx = if r.ip() == "127.0.0.1".parse::<IpAddr>().unwrap() {
            0
        } else {
            1
        };
        let mut buf = vec![0u8; HEADROOM + 8 + TAILROOM];
        let t =
            h.s.handle_peer(
                h.now,
                Family::V4,
                RelayPort::new(idx, r.port()),
                peer(),
                &mut buf,
                HEADROOM..HEADROOM + 8,
            )
            .transmit()
            .expect("relayed");
        assert_eq!(t.dst, c.addr);
    }
    // Relay-to-relay across the two addresses is allowed by the default policy.
    let (a, _) = &clients[0];
    let mut a = a.clone();
    let other = clients
        .iter()
        .map(|(_, r)| *r)
        .find(|r| r.ip() != clients[0].1.ip())
        .unwrap();
    assert!(h.permit(&mut a, other).ok());
}

#[test]
fn a_kept_relay_socket_is_reused_only_when_its_port_is_free() {
    let mut h = H::with(|cfg, _| cfg.relay_socket_pool = 4);
    let mut a = alice();
    let first = h.allocate(&mut a);
    // Without a kept socket the cursor moves on: the next allocation gets another port.
    let mut b = Client::new("192.0.2.7:5000", &a.user, &a.pass);
    let second = h.allocate(&mut b);
    assert_ne!(first.port(), second.port());
    // Alice's allocation ends: its socket is kept open and the next allocation reuses it.
    assert!(h
        .call(&mut a, method::REFRESH, &[(attr::LIFETIME, vec![0; 4])])
        .ok());
    assert_eq!(h.b.kept.len(), 1);
    let mut c = Client::new("192.0.2.8:5000", &a.user, &a.pass);
    let third = h.allocate(&mut c);
    assert_eq!(third.port(), first.port(), "the kept port is reused");
    assert!(h.b.kept.is_empty(), "reused, so no longer kept");
    // A port in use again is never handed out twice: the next allocation scans as usual.
    let mut d = Client::new("192.0.2.9:5000", &a.user, &a.pass);
    let fourth = h.allocate(&mut d);
    assert!(![first.port(), second.port()].contains(&fourth.port()));
    assert_eq!(h.b.bound().len(), 3);
    // EVEN-PORT still gets an even port with a pool of parked sockets around.
    assert!(h
        .call(&mut c, method::REFRESH, &[(attr::LIFETIME, vec![0; 4])])
        .ok());
    let mut e = Client::new("192.0.2.10:5000", &a.user, &a.pass);
    let r = h.call(
        &mut e,
        method::ALLOCATE,
        &[udp(), (attr::EVEN_PORT, vec![0])],
    );
    assert!(r.ok());
    let relayed = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relayed.port() % 2, 0);
    assert_eq!(h.s.allocation_count(), 3);
}

#[test]
fn a_stream_client_gets_padded_channel_data_and_its_allocation_ends_with_the_connection() {
    let allow = |cfg: &mut TurnConfig| {
        let mut p = (*cfg.policy).clone();
        p.allow = vec!["203.0.113.0/24".parse::<IpRange>().unwrap()];
        cfg.policy = Arc::new(p);
    };
    let mut h = H::with(|cfg, _| {
        allow(cfg);
        cfg.listener_transports = vec![Transport::Tcp];
    });
    let mut a = alice();
    let relay = h.allocate(&mut a);
    assert!(h.bind_channel(&mut a, 0x4000, peer()).ok());
    let (t, bytes) = h.peer_send(relay, peer(), b"hello").expect("relayed");
    assert_eq!(t.dst, a.addr);
    assert_eq!(
        bytes,
        [0x40, 0x00, 0x00, 0x05, b'h', b'e', b'l', b'l', b'o', 0, 0, 0],
        "over a stream ChannelData is padded to 4 bytes (RFC 8656 §12.5)"
    );
    assert!(
        h.peer_send(relay, "203.0.113.51:6000".parse().unwrap(), b"x")
            .is_none(),
        "no permission for that peer: nothing relayed"
    );
    // The connection closes: the allocation ends with it, its socket and quota go back.
    h.s.handle_client_closed(
        h.now,
        ClientKey {
            listener: 0,
            addr: a.addr,
        },
    );
    h.s.drain_commands(&mut h.b);
    assert_eq!(h.s.allocation_count(), 0);
    assert!(h.b.bound().is_empty());
    assert_eq!(h.s.cross_shard().quotas.total(), 0);
    assert_eq!(h.s.counters.allocations_deleted, 1);
    // A UDP listener's ChannelData stays unpadded.
    let mut u = H::with(|cfg, _| allow(cfg));
    let mut b = alice();
    let relay = u.allocate(&mut b);
    assert!(u.bind_channel(&mut b, 0x4000, peer()).ok());
    let (_, bytes) = u.peer_send(relay, peer(), b"hello").unwrap();
    assert_eq!(bytes.len(), 9);
}

// ------------------------------------------------------------------------------------------
// RFC 6062: TCP allocations
// ------------------------------------------------------------------------------------------

fn tcp() -> (u16, Vec<u8>) {
    (attr::REQUESTED_TRANSPORT, vec![6, 0, 0, 0])
}

/// A core whose listener 0 is a TCP listener, with TEST-NET-3 allowed as peers.
fn tcp_core(f: impl FnOnce(&mut TurnConfig)) -> H {
    H::with(|cfg, _| {
        let mut p = (*cfg.policy).clone();
        p.allow = vec!["203.0.113.0/24".parse::<IpRange>().unwrap()];
        cfg.policy = Arc::new(p);
        cfg.listener_transports = vec![Transport::Tcp];
        cfg.shard = 3;
        f(cfg);
    })
}

impl H {
    fn allocate_tcp(&mut self, c: &mut Client) -> SocketAddr {
        let r = self.call(c, method::ALLOCATE, &[tcp()]);
        assert!(r.ok(), "TCP allocate failed: {:?}", r.code());
        r.msg()
            .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap()
    }

    /// A Connect to `peer`: `Ok(())` when it is pending (no answer yet), else the answer.
    fn connect(&mut self, c: &mut Client, peer: SocketAddr) -> Result<(), Resp> {
        let tid = c.next_tid();
        let bytes = c.request(
            method::CONNECT,
            tid,
            &[(attr::XOR_PEER_ADDRESS, xor_attr(peer, &tid))],
            true,
        );
        let mut buf = bytes.clone();
        let n = buf.len();
        let r = self.s.handle_client(self.now, 0, c.addr, &mut buf, 0..n);
        match self.s.settle(self.now, r, &mut self.b) {
            Reply::Pending => Ok(()),
            Reply::Transmit(t) => {
                let Data::Scratch(n) = t.data else {
                    panic!("answers come from scratch")
                };
                Err(Resp {
                    bytes: self.s.scratch()[..n].to_vec(),
                })
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// The last Connect command recorded.
    fn last_connect(&self) -> (ConnectionId, SocketAddr, RelayPort) {
        match self.b.tcp.iter().rev().find_map(|c| match c {
            TcpCommand::Connect { id, peer, port, .. } => Some((*id, *peer, *port)),
            _ => None,
        }) {
            Some(v) => v,
            None => panic!("no Connect command in {:?}", self.b.tcp),
        }
    }

    /// The core's answer to the I/O layer's connect outcome, as sent to `c`.
    fn connected(&mut self, c: &Client, id: ConnectionId, ok: bool) -> Resp {
        let t = self
            .s
            .handle_peer_connected(self.now, id, ok)
            .transmit()
            .expect("an answer for the control connection");
        assert_eq!((t.src, t.dst), (Src::Listener(0), c.addr));
        let Data::Scratch(n) = t.data else {
            panic!("from scratch")
        };
        Resp {
            bytes: self.s.scratch()[..n].to_vec(),
        }
    }

    fn connection_bind(&mut self, c: &mut Client, id: u32) -> Resp {
        self.call(
            c,
            method::CONNECTION_BIND,
            &[(attr::CONNECTION_ID, id.to_be_bytes().to_vec())],
        )
    }
}

#[test]
fn tcp_allocations_need_a_stream_and_refuse_even_port_reservations_and_dual_stack() {
    // Over UDP: 400 (RFC 6062 §5.1).
    let mut u = H::new();
    let mut a = alice();
    assert_eq!(u.call(&mut a, method::ALLOCATE, &[tcp()]).code(), Some(400));
    // Over TCP, with EVEN-PORT, RESERVATION-TOKEN or an additional family: 400.
    let mut h = tcp_core(|_| {});
    let mut a = alice();
    for extra in [
        (attr::EVEN_PORT, vec![0]),
        (attr::RESERVATION_TOKEN, vec![1; 8]),
        (attr::ADDITIONAL_ADDRESS_FAMILY, vec![2, 0, 0, 0]),
    ] {
        assert_eq!(
            h.call(&mut a, method::ALLOCATE, &[tcp(), extra]).code(),
            Some(400)
        );
    }
    // Other protocols: 442; and TCP too when TCP relaying is turned off.
    let r = h.call(
        &mut a,
        method::ALLOCATE,
        &[(attr::REQUESTED_TRANSPORT, vec![132, 0, 0, 0])],
    );
    assert_eq!(r.code(), Some(442));
    let mut off = tcp_core(|c| c.tcp_relay = false);
    let mut b = alice();
    assert_eq!(
        off.call(&mut b, method::ALLOCATE, &[tcp()]).code(),
        Some(442)
    );
    assert!(off.b.open.is_empty());
    // A plain one: a TCP listener on the relayed address, no UDP socket.
    let relay = h.allocate_tcp(&mut a);
    assert_eq!(
        h.b.listeners,
        BTreeSet::from([(false, 0, relay.port())]),
        "one listening socket"
    );
    assert_eq!(h.s.counters.tcp_allocations_created, 1);
    // No channels and no Send indications on it (RFC 6062 §6).
    assert_eq!(h.bind_channel(&mut a, 0x4000, peer()).code(), Some(400));
    assert!(h.permit(&mut a, peer()).ok());
    let tid = a.next_tid();
    let mut buf = [0u8; 256];
    let mut w = MessageWriter::new(&mut buf, method::SEND, Class::Indication, &tid).unwrap();
    w.add_xor_addr(attr::XOR_PEER_ADDRESS, peer()).unwrap();
    w.add(attr::DATA, b"nope").unwrap();
    let n = w.finish();
    assert!(h.client_raw(a.addr, &buf[..n]).is_none());
    // UDP datagrams at its port (a leftover socket) reach no one.
    assert!(h.peer_send(relay, peer(), b"udp").is_none());
}

#[test]
fn connect_opens_a_peer_connection_answers_with_its_id_and_connection_bind_joins_it() {
    let mut h = tcp_core(|_| {});
    let mut a = alice();
    let relay = h.allocate_tcp(&mut a);
    // Connect waits for the I/O layer, which is asked to connect from the relayed address.
    h.connect(&mut a, peer()).expect("pending");
    let (id, to, port) = h.last_connect();
    assert_eq!((to, port.port), (peer(), relay.port()));
    assert_eq!(id.shard(), 3, "the owning shard is in the id");
    // A second Connect to the same peer while the first is pending: 446.
    assert_eq!(h.connect(&mut a, peer()).unwrap_err().code(), Some(446));
    let r = h.connected(&a, id, true);
    assert!(r.ok());
    assert!(r.msg().verify_integrity(&a.key()));
    assert_eq!(r.msg().get_u32(attr::CONNECTION_ID), Some(id.0));
    assert_eq!(h.s.counters.tcp_connects, 1);
    // Once connected, still 446.
    assert_eq!(h.connect(&mut a, peer()).unwrap_err().code(), Some(446));
    // ConnectionBind from a new connection of another user: 441; of an unknown id: 400.
    let mut b = Client::new("198.51.100.1:40001", "bob", "hunter2");
    assert_eq!(h.connection_bind(&mut b, id.0).code(), Some(441));
    let mut data = Client::new("198.51.100.1:40002", "alice", "secret");
    assert_eq!(h.connection_bind(&mut data, id.0 ^ 1).code(), Some(400));
    // From the control connection itself: 400.
    assert_eq!(h.connection_bind(&mut a, id.0).code(), Some(400));
    // The right one: success, and the I/O layer joins the two.
    let r = h.connection_bind(&mut data, id.0);
    assert!(r.ok(), "{:?}", r.code());
    assert_eq!(
        h.b.tcp.last(),
        Some(&TcpCommand::Splice {
            id,
            client: ClientKey {
                listener: 0,
                addr: data.addr
            }
        })
    );
    assert_eq!(h.s.counters.tcp_connection_binds, 1);
    // Bound once only.
    let mut again = Client::new("198.51.100.1:40003", "alice", "secret");
    assert_eq!(h.connection_bind(&mut again, id.0).code(), Some(400));
    // The bind deadline does not touch a joined connection.
    h.advance(40);
    assert!(!h.b.tcp.contains(&TcpCommand::Close(id)));
    assert_eq!(h.s.tcp_connection_count(), 1);
    // Deleting the allocation closes its connections and its listener.
    assert!(h
        .call(&mut a, method::REFRESH, &[(attr::LIFETIME, vec![0; 4])])
        .ok());
    assert!(h.b.tcp.contains(&TcpCommand::Close(id)));
    assert!(h.b.listeners.is_empty());
    assert!(h.b.open.is_empty());
    assert_eq!(h.s.tcp_connection_count(), 0);
    assert_eq!(h.s.cross_shard().quotas.total(), 0);
}

#[test]
fn a_failed_connect_is_447_and_the_peer_can_be_tried_again() {
    let mut h = tcp_core(|_| {});
    let mut a = alice();
    h.allocate_tcp(&mut a);
    h.connect(&mut a, peer()).expect("pending");
    let (id, _, _) = h.last_connect();
    let r = h.connected(&a, id, false);
    assert_eq!(r.code(), Some(447));
    assert!(r.msg().verify_integrity(&a.key()));
    assert_eq!(h.s.counters.tcp_connect_failures, 1);
    assert_eq!(h.s.tcp_connection_count(), 0);
    // A late second report for the same id is nothing.
    assert!(h
        .s
        .handle_peer_connected(h.now, id, true)
        .transmit()
        .is_none());
    h.connect(&mut a, peer()).expect("pending again");
    assert_ne!(h.last_connect().0, id);
}

#[test]
fn connect_is_judged_by_the_peer_policy_and_the_allocation_kind() {
    let mut h = tcp_core(|c| c.max_tcp_connections = 2);
    let mut a = alice();
    h.allocate_tcp(&mut a);
    // Deny forms: loopback, private, metadata, port 0 (the full list is the policy's own
    // test, and the relay test over real sockets); then the wrong family.
    for bad in [
        "127.0.0.1:80",
        "10.0.0.1:80",
        "169.254.169.254:80",
        "203.0.113.50:0",
    ] {
        let r = h.connect(&mut a, bad.parse().unwrap()).unwrap_err();
        assert_eq!(r.code(), Some(403), "{bad}");
    }
    let r = h
        .connect(&mut a, "[::ffff:127.0.0.1]:80".parse().unwrap())
        .unwrap_err();
    assert_eq!(r.code(), Some(443));
    assert!(h.b.tcp.is_empty(), "nothing was connected");
    assert_eq!(h.s.counters.peers_denied, 4);
    // No XOR-PEER-ADDRESS: 400.
    assert_eq!(h.call(&mut a, method::CONNECT, &[]).code(), Some(400));
    // The allocation's connection limit: 508.
    h.connect(&mut a, "203.0.113.1:80".parse().unwrap())
        .unwrap();
    h.connect(&mut a, "203.0.113.2:80".parse().unwrap())
        .unwrap();
    let r = h
        .connect(&mut a, "203.0.113.3:80".parse().unwrap())
        .unwrap_err();
    assert_eq!(r.code(), Some(508));
    // Connect on a UDP allocation: 400; without an allocation: 437.
    let mut b = Client::new("198.51.100.2:40000", "bob", "hunter2");
    h.allocate(&mut b);
    assert_eq!(h.connect(&mut b, peer()).unwrap_err().code(), Some(400));
    let mut c = Client::new("198.51.100.3:40000", "bob", "hunter2");
    assert_eq!(h.call(&mut c, method::REFRESH, &[]).code(), Some(437)); // gets a nonce
    assert_eq!(h.connect(&mut c, peer()).unwrap_err().code(), Some(437));
}

#[test]
fn an_incoming_peer_connection_needs_a_permission_and_waits_30_seconds_for_its_bind() {
    let mut h = tcp_core(|_| {});
    let mut a = alice();
    let relay = h.allocate_tcp(&mut a);
    let port = RelayPort::new(0, relay.port());
    // No permission: refused (the I/O layer closes it at once).
    assert!(h
        .s
        .handle_peer_accepted(h.now, Family::V4, port, peer())
        .is_none());
    assert_eq!(h.s.counters.tcp_peer_connections_refused, 1);
    assert!(h.permit(&mut a, peer()).ok());
    // Not a TCP allocation's port: refused.
    assert!(h
        .s
        .handle_peer_accepted(h.now, Family::V4, RelayPort::new(0, 50099), peer())
        .is_none());
    let (id, reply) =
        h.s.handle_peer_accepted(h.now, Family::V4, port, peer())
            .expect("admitted");
    let t = reply
        .transmit()
        .expect("a ConnectionAttempt for the client");
    assert_eq!(t.dst, a.addr);
    let Data::Scratch(n) = t.data else { panic!() };
    let m = Message::parse(&h.s.scratch()[..n]).unwrap();
    assert_eq!(
        (m.method(), m.class()),
        (method::CONNECTION_ATTEMPT, Class::Indication)
    );
    assert_eq!(m.get_u32(attr::CONNECTION_ID), Some(id.0));
    assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(peer())));
    // No ConnectionBind within 30 s: the core has the connection closed and forgets it.
    h.advance(29);
    assert!(!h.b.tcp.contains(&TcpCommand::Close(id)));
    h.advance(2);
    assert!(h.b.tcp.contains(&TcpCommand::Close(id)));
    let mut data = Client::new("198.51.100.1:40002", "alice", "secret");
    assert_eq!(h.connection_bind(&mut data, id.0).code(), Some(400));
    // A second peer connection, bound in time, then closed by the I/O layer: forgotten.
    let (id2, _) =
        h.s.handle_peer_accepted(
            h.now,
            Family::V4,
            port,
            "203.0.113.50:6001".parse().unwrap(),
        )
        .unwrap();
    assert!(h.connection_bind(&mut data, id2.0).ok());
    h.s.handle_connection_closed(id2);
    assert_eq!(h.s.tcp_connection_count(), 0);
    // The control connection closes: the listener goes.
    h.s.handle_client_closed(
        h.now,
        ClientKey {
            listener: 0,
            addr: a.addr,
        },
    );
    h.s.drain_commands(&mut h.b);
    assert!(h.b.listeners.is_empty());
}

#[test]
fn a_scan_that_lands_on_a_warm_port_claims_it_and_a_later_warm_pick_never_closes_it() {
    // Two ports, a pool of one: the freed port stays warm while an EVEN-PORT allocation
    // scans onto it; the next plain allocation must not close the socket under it.
    let mut h = H::with(|cfg, _| {
        cfg.port_min = 50000;
        cfg.port_max = 50001;
        cfg.relay_socket_pool = 1;
    });
    let (mut a, mut b) = (alice(), Client::new("198.51.100.9:1", "bob", "hunter2"));
    let ra = h.allocate(&mut a);
    let rb = h.allocate(&mut b);
    // Free the even one first (it goes warm), then the odd one (closed: the pool is full).
    let (even, odd) = if ra.port() == 50000 {
        (&mut a, &mut b)
    } else {
        (&mut b, &mut a)
    };
    let zero = vec![0; 4];
    assert!(h
        .call(even, method::REFRESH, &[(attr::LIFETIME, zero.clone())])
        .ok());
    assert!(h.call(odd, method::REFRESH, &[(attr::LIFETIME, zero)]).ok());
    let _ = rb;
    assert_eq!(h.b.kept, BTreeSet::from([(false, 0, 50000)]));
    let mut e = Client::new("198.51.100.10:1", "alice", "secret");
    let r = h.call(
        &mut e,
        method::ALLOCATE,
        &[udp(), (attr::EVEN_PORT, vec![0])],
    );
    assert!(r.ok());
    let re = r
        .msg()
        .get_xor_addr(attr::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(re.port(), 50000);
    let mut p = Client::new("198.51.100.11:1", "alice", "secret");
    let rp = h.allocate(&mut p);
    assert_eq!(rp.port(), 50001);
    assert_eq!(
        h.b.bound(),
        BTreeSet::from([(false, 0, 50000), (false, 0, 50001)]),
        "both live allocations keep their sockets"
    );
    // A TCP allocation scanning onto a warm UDP port closes the UDP socket first.
    let mut t = tcp_core(|cfg| {
        cfg.port_min = 50000;
        cfg.port_max = 50000;
        cfg.relay_socket_pool = 1;
    });
    let mut c = alice();
    t.allocate(&mut c);
    assert!(t
        .call(&mut c, method::REFRESH, &[(attr::LIFETIME, vec![0; 4])])
        .ok());
    assert_eq!(t.b.kept.len(), 1);
    let mut d = Client::new("198.51.100.12:1", "alice", "secret");
    t.allocate_tcp(&mut d);
    assert!(t.b.kept.is_empty());
    assert_eq!(t.b.listeners.len(), 1);
}

#[test]
fn connection_bind_accepts_the_control_connections_nonce_and_nothing_else_does() {
    let mut h = tcp_core(|_| {});
    let mut a = alice();
    let relay = h.allocate_tcp(&mut a);
    assert!(h.permit(&mut a, peer()).ok());
    let (id, _) =
        h.s.handle_peer_accepted(h.now, Family::V4, RelayPort::new(0, relay.port()), peer())
            .unwrap();
    // A new connection reuses the control connection's nonce, as RFC 6062 clients do.
    let mut data = Client::new("198.51.100.1:40009", "alice", "secret");
    data.nonce = a.nonce.clone();
    let tid = data.next_tid();
    let req = data.request(
        method::CONNECTION_BIND,
        tid,
        &[(attr::CONNECTION_ID, id.0.to_be_bytes().to_vec())],
        true,
    );
    let r = h.send(&data, &req).unwrap();
    assert!(r.ok(), "{:?}", r.code());
    // The same nonce on any other request from that address is not valid (bound to the
    // control connection's address and port).
    let mut other = Client::new("198.51.100.1:40010", "alice", "secret");
    other.nonce = a.nonce.clone();
    let tid = other.next_tid();
    let req = other.request(method::ALLOCATE, tid, &[tcp()], true);
    assert_eq!(h.send(&other, &req).unwrap().code(), Some(401));
    // Nor for a ConnectionBind naming an unknown connection.
    let tid = other.next_tid();
    let req = other.request(
        method::CONNECTION_BIND,
        tid,
        &[(attr::CONNECTION_ID, (id.0 ^ 1).to_be_bytes().to_vec())],
        true,
    );
    assert_eq!(h.send(&other, &req).unwrap().code(), Some(401));
}

#[test]
fn connection_bind_by_userhash_is_the_owners_and_nobody_elses() {
    // RFC 8489 §14.4: a USERHASH names the user as well as a USERNAME does, on a data
    // connection's ConnectionBind too (RFC 6062 §5.4: the allocation owner's credentials).
    let mut h = tcp_core(|_| {});
    let mut a = alice();
    let relay = h.allocate_tcp(&mut a);
    assert!(h.permit(&mut a, peer()).ok());
    let (id, _) =
        h.s.handle_peer_accepted(h.now, Family::V4, RelayPort::new(0, relay.port()), peer())
            .unwrap();
    let mut bob = Client::new("198.51.100.1:40011", "bob", "hunter2");
    bob.userhash = true;
    assert_eq!(h.connection_bind(&mut bob, id.0).code(), Some(441));
    let mut data = Client::new("198.51.100.1:40012", "alice", "secret");
    data.userhash = true;
    let r = h.connection_bind(&mut data, id.0);
    assert!(r.ok(), "{:?}", r.code());
    assert_eq!(h.s.counters.tcp_connection_binds, 1);
}

#[test]
fn a_wall_clock_step_of_an_hour_fails_safe_and_recovers() {
    // Reliability checklist C5. Nonces carry wall-clock time; lifetimes, permissions and
    // channels run on the monotonic clock. A step of the wall clock must never let a nonce
    // through that should not pass, and one round trip must recover.
    let mut h = H::new();
    let mut c = alice();
    h.allocate(&mut c);
    let refresh = |h: &mut H, c: &mut Client| {
        let tid = c.next_tid();
        h.send(c, &c.request(method::REFRESH, tid, &[], true))
            .unwrap()
    };
    // +1 h: the nonce is an hour old, past its 600 s lifetime: 438 with a fresh nonce.
    h.now.unix += 3600;
    let r = refresh(&mut h, &mut c);
    assert_eq!(r.code(), Some(438));
    c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    assert!(
        refresh(&mut h, &mut c).ok(),
        "recovered after one round trip"
    );
    // -2 h (one hour behind true time): the nonce now comes from two hours in the future,
    // beyond the 5 s of skew allowed: refused (401 with a fresh nonce), never accepted.
    h.now.unix -= 7200;
    let r = refresh(&mut h, &mut c);
    assert_eq!(r.code(), Some(401));
    c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    assert!(refresh(&mut h, &mut c).ok());
    // NTP corrects the clock (+1 h): the nonce minted while it was behind is stale.
    h.now.unix += 3600;
    let r = refresh(&mut h, &mut c);
    assert_eq!(r.code(), Some(438));
    c.nonce = r.msg().get(attr::NONCE).unwrap().to_vec();
    assert!(refresh(&mut h, &mut c).ok());
    // The allocation lived through it all on the monotonic clock.
    assert_eq!(h.s.allocation_count(), 1);
    assert!(h.s.counters.stale_nonces >= 2);
}

#[test]
fn churned_allocations_leave_no_pile_of_stale_timers() {
    // Reliability checklist C6: an allocation deleted long before its deadline leaves its
    // wheel entry behind until a compaction; churn must not hold memory in proportion to
    // rate x lifetime. A long-lived allocation keeps its timer through the compactions.
    let mut h = H::new();
    let mut keeper = Client::new("198.51.100.200:5000", "alice", "secret");
    h.allocate(&mut keeper);
    let mut peak = 0;
    for i in 0..12_000u32 {
        // A source address of its own each: per-source challenge budgets stay out of it.
        let addr = format!("198.51.{}.{}:4000", 101 + i / 250, i % 250 + 1);
        let mut c = Client::new(&addr, "bob", "hunter2");
        h.allocate(&mut c);
        let r = h.call(
            &mut c,
            method::REFRESH,
            &[(attr::LIFETIME, vec![0, 0, 0, 0])],
        );
        assert!(r.ok());
        if i % 1000 == 999 {
            h.advance(1);
        }
        peak = peak.max(h.s.timer_count());
    }
    assert_eq!(h.s.allocation_count(), 1);
    // Without compaction every one of the 12,000 entries would wait out its 600 s.
    assert!(peak <= 2 + TIMER_SLACK + 1000, "peak {peak} wheel entries");
    h.advance(1);
    assert!(
        h.s.timer_count() <= 2 + TIMER_SLACK,
        "{}",
        h.s.timer_count()
    );
    // The keeper's own timer survived: it expires on time, not before.
    h.advance(580); // 593 s after it was made (churn took 13 s)
    assert_eq!(h.s.allocation_count(), 1);
    h.advance(10);
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn draining_or_over_the_limit_sends_new_allocates_to_the_alternate_of_the_clients_family() {
    let mut h = H::with(|cfg, _| {
        cfg.alternates = Alternates {
            v4: Some("192.0.2.7:3478".parse().unwrap()),
            v6: Some("[2001:db8::7]:3479".parse().unwrap()),
            domain: Some("turn2.example.com".into()),
        };
        // Listener 0 is a TLS one: the client needs the alternate's name to verify it.
        cfg.listener_transports = vec![Transport::Tls];
        cfg.redirect_above_allocations = 2;
    });
    let mut c = alice();
    h.allocate(&mut c);
    h.s.cross_shard().load.set_draining(true);
    let mut v6 = Client::new("[2001:db8::5]:4", "bob", "hunter2");
    let r = h.call(&mut v6, method::ALLOCATE, &[udp()]);
    assert_eq!(r.code(), Some(300));
    let m = r.msg();
    let mut want = vec![0, 2, 0x0d, 0x97];
    want.extend_from_slice(
        &"2001:db8::7"
            .parse::<std::net::Ipv6Addr>()
            .unwrap()
            .octets(),
    );
    assert_eq!(m.get(attr::ALTERNATE_SERVER).unwrap(), &want[..]);
    assert_eq!(m.get(attr::ALTERNATE_DOMAIN).unwrap(), b"turn2.example.com");
    let mut v4 = Client::new("198.51.100.3:3", "bob", "hunter2");
    let r = h.call(&mut v4, method::ALLOCATE, &[udp()]);
    assert_eq!(
        r.msg().get(attr::ALTERNATE_SERVER).unwrap(),
        &[0, 1, 0x0d, 0x96, 192, 0, 2, 7]
    );
    // The existing allocation is untouched.
    assert!(h.call(&mut c, method::REFRESH, &[]).ok());
    // Drain over: one more fits under the limit of two, the next is redirected.
    h.s.cross_shard().load.set_draining(false);
    assert!(h.call(&mut v4, method::ALLOCATE, &[udp()]).ok());
    assert_eq!(
        h.call(&mut v6, method::ALLOCATE, &[udp()]).code(),
        Some(300)
    );
    assert_eq!(h.s.counters.allocations_redirected, 3);
    // Overloaded without an alternate of the client's family: 508.
    h.s.cross_shard().load.set_overloaded(true);
    let mut cfg = h.s.config().clone();
    cfg.alternates.v6 = None;
    h.s.reconfigure(cfg);
    assert_eq!(
        h.call(&mut v6, method::ALLOCATE, &[udp()]).code(),
        Some(508)
    );
}

#[test]
fn sessions_and_disconnect() {
    let mut h = h_allow_testnet();
    let mut a = alice();
    h.allocate(&mut a);
    let mut b = Client::new("198.51.100.3:3", "bob", "hunter2");
    h.allocate(&mut b);
    let mut out = Vec::new();
    h.s.sessions(h.now, &mut out);
    assert_eq!(out.len(), 2);
    assert_eq!(&*out[0].user, b"alice");
    assert_eq!(out[0].client, a.addr);
    assert_eq!(out[0].relayed.len(), 1);
    let bob_id = out[1].id;
    assert_eq!(h.s.disconnect(&Disconnect::Allocation(bob_id)), 1);
    assert_eq!(h.call(&mut b, method::REFRESH, &[]).code(), Some(437));
    assert_eq!(h.s.disconnect(&Disconnect::Allocation(bob_id)), 0);
    assert_eq!(h.s.disconnect(&Disconnect::User(b"alice"[..].into())), 1);
    assert_eq!(h.call(&mut a, method::REFRESH, &[]).code(), Some(437));
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.s.cross_shard().quotas.total(), 0);
}
