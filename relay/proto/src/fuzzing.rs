//! Entry points shared by the cargo-fuzz targets (`relay/fuzz`) and the corpus replay test
//! that runs on stable in the normal test suite. Not part of the appliance's API.

use crate::auth::{make_nonce, AuthConfig};
use crate::policy::PeerPolicy;
use crate::stun::{self, channel, Message, MessageWriter};
use crate::turn::{
    BindRequest, CrossShard, Data, Effects, Family, Now, RelayPort, Reply, Server, TcpCommand,
    TurnConfig, HEADROOM, TAILROOM,
};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

/// Decode as STUN and as ChannelData; re-encode what decodes and check the round trip.
pub fn stun_decode(data: &[u8]) {
    if let Ok(m) = Message::parse(data) {
        let _ = m.verify_integrity(b"fuzz-key");
        let mut buf = [0u8; 2048];
        let Ok(mut w) = MessageWriter::new(&mut buf, m.method(), m.class(), m.transaction_id())
        else {
            return;
        };
        let types: Vec<u16> = m.attr_types().collect();
        let mut written = Vec::new();
        for t in types {
            if t == stun::attr::MESSAGE_INTEGRITY
                || t == stun::attr::MESSAGE_INTEGRITY_SHA256
                || t == stun::attr::FINGERPRINT
            {
                continue;
            }
            if let Some(v) = m
                .get_all(t)
                .nth(written.iter().filter(|&&x| x == t).count())
            {
                if w.add(t, v).is_err() {
                    return;
                }
                written.push(t);
            }
        }
        let n = w.finish();
        let again = Message::parse(&buf[..n]).expect("re-encoded message parses");
        assert_eq!(again.method(), m.method());
        assert_eq!(again.class(), m.class());
        for t in &written {
            assert_eq!(again.get(*t), m.get(*t));
        }
    }
    if let Ok((_, len)) = channel::parse(data) {
        assert!(4 + len <= data.len());
    }
}

/// Relay sockets that only exist on paper: the harness checks that the core never binds a
/// port twice, releases only what it bound (or kept warm), and releases everything at the end.
#[derive(Default)]
struct PaperSockets {
    bound: BTreeSet<(bool, RelayPort)>,
    warm: BTreeSet<(bool, RelayPort)>,
}

impl Effects for PaperSockets {
    fn bind(&mut self, req: &BindRequest) -> bool {
        for (on, v6) in [(req.v4, false), (req.v6, true)] {
            if on {
                let key = (v6, req.port);
                self.warm.remove(&key);
                assert!(self.bound.insert(key), "double bind of {:?}", req.port);
            }
        }
        true
    }
    fn release(&mut self, family: Family, port: RelayPort, keep: bool) {
        let key = (family == Family::V6, port);
        assert!(
            self.bound.remove(&key) || (!keep && self.warm.remove(&key)),
            "release of an unbound port {port:?}"
        );
        if keep {
            self.warm.insert(key);
        }
    }
    fn resolve_identity(&mut self, _: Box<[u8]>) {}
    fn tcp(&mut self, cmd: TcpCommand) {
        if let TcpCommand::CloseListener { family, port } = cmd {
            let key = (family == Family::V6, port);
            assert!(
                self.bound.remove(&key),
                "close of an unbound listener {port:?}"
            );
        }
    }
}

const USER: &str = "fuzz";
const PASS: &str = "fuzz-password";
const REALM: &str = "fuzz.example";

fn server(now: Now) -> Server {
    let mut auth = AuthConfig::new(REALM, [3; 32]);
    auth.add_user(USER, PASS);
    auth.rest_secrets = vec![b"fuzz-rest-secret-0123".to_vec().into()];
    let mut policy = PeerPolicy::new(vec!["127.0.0.0/8".parse().expect("literal")], vec![]);
    policy.service_ports = vec![3478];
    let mut cfg = TurnConfig::new(Arc::new(auth), Arc::new(policy));
    cfg.port_min = 50000;
    cfg.port_max = 50031;
    cfg.relay_v6 = vec!["::1".parse().expect("literal")];
    cfg.relay_socket_pool = 4;
    Server::new(cfg, Arc::new(CrossShard::new(64, 16, 1, 1)), now, 1)
}

/// What a [`turn_core`] run produced, so tests can check the harness reaches the handlers.
#[derive(Debug, Default, Clone, Copy)]
pub struct Outcome {
    pub successes: usize,
    pub errors: usize,
    pub relayed: usize,
}

/// Feed a sequence of datagrams to one TURN core. Each record is
/// `[kind, len_hi, len_lo, body...]`: kind bit 0 picks client or peer side, bits 1-3 the
/// source, bit 4 advances virtual time. With `authenticated`, client STUN bodies are taken as
/// raw attributes and wrapped in a request carrying valid credentials and integrity, so the
/// fuzzer reaches the method handlers (bodies starting with 0b01 stay raw ChannelData).
pub fn turn_core(data: &[u8], authenticated: bool) -> Outcome {
    let mut outcome = Outcome::default();
    let mut now = Now {
        ms: 10_000,
        unix: 1_700_000_000,
    };
    let mut s = server(now);
    let mut b = PaperSockets::default();
    let mut rest = data;
    let mut buf = vec![0u8; 4096];
    while rest.len() >= 3 {
        let kind = rest[0];
        let len = (u16::from_be_bytes([rest[1], rest[2]]) as usize)
            .min(rest.len() - 3)
            .min(1400);
        let body = &rest[3..3 + len];
        rest = &rest[3 + len..];
        if kind & 0x10 != 0 {
            now.ms += 1000 * (kind as u64 >> 5);
            now.unix += kind as u64 >> 5;
            s.handle_timeout(now);
            s.drain_commands(&mut b);
        }
        let src = SocketAddr::from((
            [127, 0, 0, 1 + ((kind >> 1) & 7)],
            40000 + ((kind >> 1) & 7) as u16,
        ));
        let n = if authenticated && kind & 1 == 0 && body.len() >= 2 && body[0] & 0xC0 == 0 {
            wrap_authenticated(body, src, now, &mut buf[HEADROOM..])
        } else {
            buf[HEADROOM..HEADROOM + len].copy_from_slice(body);
            len
        };
        let range = HEADROOM..HEADROOM + n;
        let out = if kind & 1 == 0 {
            let r = s.handle_client(now, 0, src, &mut buf, range);
            s.settle(now, r, &mut b)
        } else {
            s.handle_peer(
                now,
                Family::V4,
                RelayPort::new(0, 50000 + (kind as u16 >> 1) % 32),
                src,
                &mut buf,
                range,
            )
        };
        if let Reply::Transmit(t) = out {
            match t.data {
                Data::Buf(r) => {
                    assert!(r.end <= buf.len() && r.start <= r.end);
                    outcome.relayed += 1;
                }
                Data::Scratch(n) => {
                    assert!(n > 0 && n <= s.scratch().len());
                    let m = Message::parse(&s.scratch()[..n]).expect("our responses parse");
                    match m.class() {
                        stun::Class::Success => outcome.successes += 1,
                        _ => outcome.errors += 1,
                    }
                }
            }
        }
    }
    s.close_all();
    s.drain_commands(&mut b);
    assert!(
        b.bound.is_empty() && b.warm.is_empty(),
        "sockets left open: {:?} {:?}",
        b.bound,
        b.warm
    );
    let _ = TAILROOM;
    outcome
}

fn wrap_authenticated(body: &[u8], src: SocketAddr, now: Now, out: &mut [u8]) -> usize {
    let method = [
        stun::method::ALLOCATE,
        stun::method::REFRESH,
        stun::method::CREATE_PERMISSION,
        stun::method::CHANNEL_BIND,
        stun::method::BINDING,
        stun::method::SEND,
    ][body[0] as usize % 6];
    let tid = [body[1]; 12];
    let mut tmp = [0u8; 2048];
    let Ok(mut w) = MessageWriter::new(&mut tmp, method, stun::Class::Request, &tid) else {
        return 0;
    };
    // Raw attribute records from the input: [type_hi, type_lo, len, value...].
    let mut r = &body[2..];
    while r.len() >= 3 {
        let t = u16::from_be_bytes([r[0], r[1]]);
        let l = (r[2] as usize).min(r.len() - 3);
        if w.add(t, &r[3..3 + l]).is_err() {
            break;
        }
        r = &r[3 + l..];
    }
    let key = stun::long_term_key_md5(USER.as_bytes(), REALM.as_bytes(), PASS.as_bytes());
    let nonce = make_nonce(
        now.unix,
        &[3; 32],
        crate::auth::features::PASSWORD_ALGORITHMS,
        src,
    );
    let ok = w.add(stun::attr::USERNAME, USER.as_bytes()).is_ok()
        && w.add(stun::attr::REALM, REALM.as_bytes()).is_ok()
        && w.add(stun::attr::NONCE, &nonce).is_ok()
        && w.add_integrity(&key).is_ok();
    if !ok {
        return 0;
    }
    let n = w.finish().min(out.len());
    out[..n].copy_from_slice(&tmp[..n]);
    n
}
