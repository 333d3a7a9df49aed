//! A TURN client (RFC 8656, long-term credentials) as a state machine per 5-tuple, and a
//! driver that runs many of them at once on one thread (epoll; fixed-RTO retransmission over
//! UDP, a transaction deadline over streams). The 5-tuple is a UDP socket or a TCP/TLS
//! connection ([`Link`]). Used for the churn, idle and handshake scenarios and for setting up
//! the relay scenario.

use crate::scenario::{TlsVersion, Transport};
use crate::stats::Latency;
use crate::stream::{self, Fill, StreamConn, StreamError};
use crate::sys::{self, Batch, Epoll};
use actrix_proto::stun::{
    self, attr, code, long_term_key_md5, method, Class, Message, MessageWriter, HEADER_LEN,
};
use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One TURN transaction to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Allocate a UDP relay (REQUESTED-TRANSPORT 17).
    Allocate,
    /// CreatePermission for every address (one XOR-PEER-ADDRESS each).
    Permission(Vec<SocketAddr>),
    ChannelBind(u16, SocketAddr),
    /// Refresh with this LIFETIME (0 deletes the allocation).
    Refresh(u32),
    /// A STUN Binding request (never signed).
    Binding,
}

impl Op {
    fn method(&self) -> u16 {
        match self {
            Op::Allocate => method::ALLOCATE,
            Op::Permission(_) => method::CREATE_PERMISSION,
            Op::ChannelBind(..) => method::CHANNEL_BIND,
            Op::Refresh(_) => method::REFRESH,
            Op::Binding => method::BINDING,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Op::Allocate => "allocate",
            Op::Permission(_) => "create-permission",
            Op::ChannelBind(..) => "channel-bind",
            Op::Refresh(_) => "refresh",
            Op::Binding => "binding",
        }
    }
}

/// Realm, nonce and key learned from the server.
#[derive(Debug, Clone, Default)]
struct AuthState {
    realm: Vec<u8>,
    nonce: Vec<u8>,
    key: [u8; 16],
    known: bool,
}

struct Txn {
    tid: [u8; 12],
    bytes: Vec<u8>,
    sent_at: Instant,
    attempts: u32,
    /// 401/438 answers followed so far (bounded: a server that keeps asking is failing).
    challenges: u32,
}

/// What a datagram or a timer did to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Not for us (stray, late retransmission answer, garbage).
    Ignored,
    /// A request was (re)sent; the caller's socket write already happened.
    Sent,
    /// The current op succeeded and the next one was sent.
    Step,
    /// The whole plan succeeded.
    Done,
    Failed(String),
}

/// What a session's 5-tuple is.
pub enum Link {
    /// A UDP socket connected to the server.
    Udp(UdpSocket),
    /// A TCP or TLS connection.
    Stream(StreamConn),
    /// Not opened yet: the driver opens it when the session starts.
    Deferred,
}

impl Link {
    pub fn fd(&self) -> RawFd {
        match self {
            Link::Udp(s) => s.as_raw_fd(),
            Link::Stream(c) => c.fd(),
            Link::Deferred => -1,
        }
    }

    /// Whether the driver should wait for writability (a connect, bytes left unsent).
    pub fn wants_write(&self) -> bool {
        match self {
            Link::Udp(_) | Link::Deferred => false,
            Link::Stream(c) => c.wants_write(),
        }
    }

    /// Send one message. A full UDP socket buffer is the same as a lost datagram (the RTO
    /// resends it); a stream queues it and writes what the socket takes now.
    fn send(&mut self, bytes: &[u8]) {
        match self {
            Link::Udp(s) => {
                let _ = s.send(bytes);
            }
            Link::Stream(c) => {
                if c.queue(bytes) {
                    // An error surfaces on the next read.
                    let _ = c.flush();
                }
            }
            Link::Deferred => {}
        }
    }

    pub fn udp(&self) -> Option<&UdpSocket> {
        match self {
            Link::Udp(s) => Some(s),
            _ => None,
        }
    }

    /// Close it as a client does (TLS: close_notify first).
    pub fn close(self) {
        if let Link::Stream(c) = self {
            c.close();
        }
    }
}

/// How a session opens its 5-tuples.
#[derive(Clone)]
pub enum LinkKind {
    Udp,
    Tcp,
    Tls(Arc<rustls::ClientConfig>),
}

impl LinkKind {
    /// The links of a scenario's `transport` (a TLS client configuration built once).
    pub fn for_transport(t: Transport, v: TlsVersion) -> Result<LinkKind, String> {
        Ok(match t {
            Transport::Udp => LinkKind::Udp,
            Transport::Tcp => LinkKind::Tcp,
            Transport::Tls => LinkKind::Tls(stream::tls_client_config(v)?),
        })
    }

    fn open(&self, server: SocketAddr, bind: SocketAddr) -> std::io::Result<Link> {
        match self {
            LinkKind::Udp => connected_socket_from(server, bind).map(Link::Udp),
            LinkKind::Tcp => StreamConn::connect(server, bind, None).map(Link::Stream),
            LinkKind::Tls(cfg) => StreamConn::connect(server, bind, Some(cfg)).map(Link::Stream),
        }
    }

    pub fn is_stream(&self) -> bool {
        !matches!(self, LinkKind::Udp)
    }
}

pub struct Session {
    pub link: Link,
    kind: LinkKind,
    /// The driver waits for this link's writability.
    write_interest: bool,
    server: SocketAddr,
    bind: SocketAddr,
    /// Source-address rotation for new sockets: (index, stride, number of sources).
    rotation: Option<(usize, usize, usize)>,
    user: String,
    password: String,
    auth: AuthState,
    plan: Vec<Op>,
    cursor: usize,
    txn: Option<Txn>,
    tid_seq: u64,
    id: u32,
    /// Requests sent (first transmissions; retransmissions are not counted).
    pub requests: u64,
    /// Sockets taken in turn by [`Session::renew_socket`] instead of opening new ones (UDP).
    spare: Vec<UdpSocket>,
    spare_next: usize,
    pub relay: Option<SocketAddr>,
    pub started: Instant,
}

impl Session {
    /// A session whose socket is bound on `bind` (see [`sys::client_bind`]) and connected
    /// to `server`.
    pub fn new(
        id: u32,
        server: SocketAddr,
        bind: SocketAddr,
        user: &str,
        password: &str,
        plan: Vec<Op>,
    ) -> std::io::Result<Self> {
        Self::with_link(id, LinkKind::Udp, server, bind, user, password, plan)
    }

    /// A session over `kind` (UDP, or a connection to `server` opened now), bound on `bind`.
    pub fn with_link(
        id: u32,
        kind: LinkKind,
        server: SocketAddr,
        bind: SocketAddr,
        user: &str,
        password: &str,
        plan: Vec<Op>,
    ) -> std::io::Result<Self> {
        let link = kind.open(server, bind)?;
        Ok(Self::assemble(
            id, kind, link, server, bind, user, password, plan,
        ))
    }

    /// As [`Session::with_link`], the link opened only when the driver starts the session.
    pub fn deferred(
        id: u32,
        kind: LinkKind,
        server: SocketAddr,
        bind: SocketAddr,
        user: &str,
        password: &str,
        plan: Vec<Op>,
    ) -> std::io::Result<Self> {
        Ok(Self::assemble(
            id,
            kind,
            Link::Deferred,
            server,
            bind,
            user,
            password,
            plan,
        ))
    }

    #[allow(clippy::too_many_arguments)]
    fn assemble(
        id: u32,
        kind: LinkKind,
        link: Link,
        server: SocketAddr,
        bind: SocketAddr,
        user: &str,
        password: &str,
        plan: Vec<Op>,
    ) -> Self {
        Session {
            link,
            kind,
            write_interest: false,
            server,
            bind,
            rotation: None,
            user: user.into(),
            password: password.into(),
            auth: AuthState::default(),
            plan,
            cursor: 0,
            txn: None,
            tid_seq: 0,
            id,
            requests: 0,
            spare: Vec::new(),
            spare_next: 0,
            relay: None,
            started: Instant::now(),
        }
    }

    /// Open a deferred link (a no-op otherwise).
    pub fn open_deferred(&mut self) -> std::io::Result<()> {
        if matches!(self.link, Link::Deferred) {
            self.link = self.kind.open(self.server, self.bind)?;
        }
        Ok(())
    }

    /// Each new socket moves to the next source address: index += stride, over
    /// `source_ips` addresses (see [`sys::client_bind`]).
    pub fn rotate_sources(&mut self, index: usize, stride: usize, source_ips: usize) {
        self.rotation = Some((index, stride.max(1), source_ips));
    }

    /// Open `n` more sockets, on the next source addresses of the rotation, that
    /// [`Session::renew_socket`] takes in turn: each 5-tuple comes back every `n + 1` cycles
    /// instead of a socket being opened, bound, connected and closed per cycle.
    pub fn add_spare_sockets(&mut self, n: usize) -> std::io::Result<()> {
        if n > 0 && self.kind.is_stream() {
            return Err(std::io::Error::other(
                "spare sockets are for UDP: a stream is a new connection per cycle",
            ));
        }
        for _ in 0..n {
            if let Some((index, stride, sources)) = &mut self.rotation {
                *index = index.wrapping_add(*stride);
                self.bind = sys::client_bind(self.server, *index, *sources);
            }
            self.spare
                .push(connected_socket_from(self.server, self.bind)?);
        }
        Ok(())
    }

    /// Move to another 5-tuple: the next spare socket if the session has them (the current
    /// one takes its place), else a new socket. The learned realm and nonce are kept.
    /// A stream closes its connection (the allocation on it ends) and opens a new one.
    pub fn renew_socket(&mut self) -> std::io::Result<()> {
        if !self.spare.is_empty() {
            if let Link::Udp(sock) = &mut self.link {
                std::mem::swap(sock, &mut self.spare[self.spare_next]);
                self.spare_next = (self.spare_next + 1) % self.spare.len();
                self.relay = None;
                return Ok(());
            }
        }
        if let Some((index, stride, n)) = &mut self.rotation {
            *index = index.wrapping_add(*stride);
            self.bind = sys::client_bind(self.server, *index, *n);
        }
        let link = self.kind.open(self.server, self.bind)?;
        std::mem::replace(&mut self.link, link).close();
        self.write_interest = false;
        self.relay = None;
        Ok(())
    }

    /// Close the session's 5-tuple as a client does (streams: the allocation ends with it).
    pub fn close(self) {
        self.link.close();
    }

    /// Stream: how long the connection took to be usable (TCP connect, or through the TLS
    /// handshake).
    pub fn established_in(&self) -> Option<Duration> {
        match &self.link {
            Link::Stream(c) => c.established_at.map(|t| t.duration_since(c.opened_at)),
            _ => None,
        }
    }

    /// Stream over TLS: what was negotiated.
    pub fn tls_summary(&self) -> Option<String> {
        match &self.link {
            Link::Stream(c) => c.tls_summary(),
            _ => None,
        }
    }

    pub fn set_plan(&mut self, plan: Vec<Op>) {
        self.plan = plan;
        self.cursor = 0;
        self.txn = None;
    }

    pub fn in_flight(&self) -> bool {
        self.txn.is_some()
    }

    fn next_tid(&mut self) -> [u8; 12] {
        self.tid_seq += 1;
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(&self.id.to_be_bytes());
        t[4..].copy_from_slice(&self.tid_seq.to_be_bytes());
        t
    }

    fn build(&self, op: &Op, tid: &[u8; 12]) -> Result<Vec<u8>, stun::BufferFull> {
        let mut buf = vec![0u8; 1024];
        let mut w = MessageWriter::new(&mut buf, op.method(), Class::Request, tid)?;
        match op {
            Op::Allocate => w.add_u32(attr::REQUESTED_TRANSPORT, 17 << 24)?,
            Op::Permission(peers) => {
                for p in peers {
                    w.add_xor_addr(attr::XOR_PEER_ADDRESS, *p)?;
                }
            }
            Op::ChannelBind(ch, p) => {
                w.add_u32(attr::CHANNEL_NUMBER, (*ch as u32) << 16)?;
                w.add_xor_addr(attr::XOR_PEER_ADDRESS, *p)?;
            }
            Op::Refresh(lifetime) => w.add_u32(attr::LIFETIME, *lifetime)?,
            Op::Binding => {}
        }
        if self.auth.known && *op != Op::Binding {
            w.add(attr::USERNAME, self.user.as_bytes())?;
            w.add(attr::REALM, &self.auth.realm)?;
            w.add(attr::NONCE, &self.auth.nonce)?;
            w.add_integrity(&self.auth.key)?;
        }
        let n = w.finish();
        buf.truncate(n);
        Ok(buf)
    }

    fn send_current(&mut self, challenges: u32) -> Event {
        let Some(op) = self.plan.get(self.cursor).cloned() else {
            return Event::Done;
        };
        let tid = self.next_tid();
        let bytes = match self.build(&op, &tid) {
            Ok(b) => b,
            Err(_) => return Event::Failed(format!("{}: request too large", op.name())),
        };
        self.requests += 1;
        self.link.send(&bytes);
        self.txn = Some(Txn {
            tid,
            bytes,
            sent_at: Instant::now(),
            attempts: 1,
            challenges,
        });
        Event::Sent
    }

    /// Start the plan from its first op.
    pub fn start(&mut self) -> Event {
        self.cursor = 0;
        self.started = Instant::now();
        self.send_current(0)
    }

    /// Retransmit or give up when the in-flight request is older than `rto`.
    pub fn on_timer(&mut self, now: Instant, rto: Duration, attempts: u32) -> Event {
        let Some(t) = &mut self.txn else {
            return Event::Ignored;
        };
        if self.kind.is_stream() {
            // Reliable transport: no retransmission, one deadline for the whole transaction
            // (the connect and the TLS handshake included).
            if now.duration_since(t.sent_at) < rto * attempts {
                return Event::Ignored;
            }
            let name = self.plan.get(self.cursor).map(|o| o.name()).unwrap_or("?");
            self.txn = None;
            return Event::Failed(format!("{name}: timeout"));
        }
        if now.duration_since(t.sent_at) < rto {
            return Event::Ignored;
        }
        if t.attempts >= attempts {
            let name = self.plan.get(self.cursor).map(|o| o.name()).unwrap_or("?");
            self.txn = None;
            return Event::Failed(format!("{name}: timeout"));
        }
        t.attempts += 1;
        t.sent_at = now;
        if let Link::Udp(s) = &self.link {
            let _ = s.send(&t.bytes);
        }
        Event::Sent
    }

    fn stream_failed(&mut self, e: StreamError) -> Event {
        let name = self.plan.get(self.cursor).map(|o| o.name()).unwrap_or("?");
        self.txn = None;
        Event::Failed(format!("{name}: {e}"))
    }

    /// Stream: the connection is writable (its connect finished, or room for what waits).
    pub fn on_writable(&mut self) -> Event {
        let Link::Stream(c) = &mut self.link else {
            return Event::Ignored;
        };
        match c.on_writable() {
            Ok(()) => Event::Ignored,
            Err(e) => self.stream_failed(e),
        }
    }

    /// Stream: the connection is readable. Reads (a bounded number of times), frames, and
    /// feeds each message to [`Session::on_datagram`] until one moves the session on.
    pub fn on_readable(&mut self) -> Event {
        let mut frame = [0u8; stream::MAX_FRAME];
        for _ in 0..8 {
            let Link::Stream(c) = &mut self.link else {
                return Event::Ignored;
            };
            let more = match c.fill() {
                Ok(Fill::Data(_, more)) => more,
                Ok(Fill::Nothing) => false,
                Err(e) => return self.stream_failed(e),
            };
            loop {
                let Link::Stream(c) = &mut self.link else {
                    return Event::Ignored;
                };
                let n = match c.next_frame() {
                    Ok(Some(at)) => {
                        let f = c.frame(at);
                        frame[..f.len()].copy_from_slice(f);
                        f.len()
                    }
                    Ok(None) => break,
                    Err(e) => return self.stream_failed(e),
                };
                let ev = self.on_datagram(&frame[..n]);
                if ev != Event::Ignored {
                    // Request and answer go in lock step: nothing else of ours can wait.
                    return ev;
                }
            }
            if !more {
                break;
            }
        }
        Event::Ignored
    }

    /// Feed one datagram received on the session's socket.
    pub fn on_datagram(&mut self, buf: &[u8]) -> Event {
        let Some(t) = &self.txn else {
            return Event::Ignored;
        };
        let Ok(msg) = Message::parse(buf) else {
            return Event::Ignored;
        };
        if msg.transaction_id() != &t.tid {
            return Event::Ignored;
        }
        let Some(op) = self.plan.get(self.cursor).cloned() else {
            return Event::Ignored;
        };
        if msg.method() != op.method() {
            return Event::Ignored;
        }
        let challenges = t.challenges;
        match msg.class() {
            Class::Success => {
                if self.auth.known && msg.has_integrity() && !msg.verify_integrity(&self.auth.key) {
                    self.txn = None;
                    return Event::Failed(format!("{}: bad MESSAGE-INTEGRITY", op.name()));
                }
                if op == Op::Allocate {
                    match msg.get_xor_addr(attr::XOR_RELAYED_ADDRESS) {
                        Some(Ok(a)) => self.relay = Some(a),
                        _ => {
                            self.txn = None;
                            return Event::Failed("allocate: no XOR-RELAYED-ADDRESS".into());
                        }
                    }
                }
                self.txn = None;
                self.cursor += 1;
                if self.cursor >= self.plan.len() {
                    Event::Done
                } else {
                    match self.send_current(0) {
                        Event::Sent => Event::Step,
                        other => other,
                    }
                }
            }
            Class::Error => {
                let ec = msg
                    .get(attr::ERROR_CODE)
                    .and_then(stun::decode_error_code)
                    .map(|(c, _)| c)
                    .unwrap_or(0);
                let nonce = msg.get(attr::NONCE);
                let realm = msg.get(attr::REALM);
                let challenge = ec == code::UNAUTHORIZED || ec == code::STALE_NONCE;
                // 401 to a request that carried credentials means they are wrong; 438 only
                // asks for the new nonce. Both are followed a bounded number of times.
                let wrong_creds = ec == code::UNAUTHORIZED
                    && self.auth.known
                    && realm.is_some()
                    && realm == Some(self.auth.realm.as_slice())
                    && nonce == Some(self.auth.nonce.as_slice());
                if challenge && !wrong_creds && challenges < 3 {
                    if let Some(n) = nonce {
                        self.auth.nonce = n.to_vec();
                    }
                    if let Some(r) = realm {
                        if r != self.auth.realm.as_slice() || !self.auth.known {
                            self.auth.realm = r.to_vec();
                            self.auth.key = long_term_key_md5(
                                self.user.as_bytes(),
                                &self.auth.realm,
                                self.password.as_bytes(),
                            );
                        }
                    }
                    if self.auth.realm.is_empty() || self.auth.nonce.is_empty() {
                        self.txn = None;
                        return Event::Failed(format!("{}: {ec} without REALM/NONCE", op.name()));
                    }
                    self.auth.known = true;
                    return self.send_current(challenges + 1);
                }
                self.txn = None;
                Event::Failed(format!("{}: error {ec}", op.name()))
            }
            _ => Event::Ignored,
        }
    }
}

/// A non-blocking UDP socket connected to `server`.
pub fn connected_socket(server: SocketAddr) -> std::io::Result<UdpSocket> {
    connected_socket_from(server, sys::local_bind_for(server))
}

/// A non-blocking UDP socket bound on `bind` and connected to `server`.
pub fn connected_socket_from(server: SocketAddr, bind: SocketAddr) -> std::io::Result<UdpSocket> {
    let s = sys::udp_socket(bind, 1 << 20)?;
    s.connect(server)?;
    Ok(s)
}

/// How the driver runs the sessions.
#[derive(Debug, Clone)]
pub struct DriveConfig {
    /// Sessions running at once.
    pub concurrency: usize,
    pub rto: Duration,
    pub attempts: u32,
    pub deadline: Instant,
    /// Start the plan again after it completes (churn) instead of finishing (setup, idle).
    /// A repeating stream session always takes a new connection per cycle.
    pub repeat: bool,
    /// With `repeat`: a fresh socket for each cycle.
    pub new_socket_per_cycle: bool,
}

#[derive(Debug, Default)]
pub struct DriveResult {
    pub completed: u64,
    pub failed: u64,
    pub reasons: BTreeMap<String, u64>,
    pub latency: Latency,
    /// Which sessions completed their plan (non-repeating runs).
    pub done: Vec<bool>,
    pub elapsed: Duration,
    /// Streams: connect (TCP) or connect and TLS handshake (TLS) time of completed cycles.
    pub established: Latency,
    /// TLS: version, cipher suite and ALPN of the first completed cycle.
    pub tls_summary: Option<String>,
}

/// Register `s` with `ep` under `token`, waiting for writability when its link needs it.
fn register(ep: &Epoll, s: &mut Session, token: u64) -> std::io::Result<()> {
    ep.add(s.link.fd(), token)?;
    s.write_interest = false;
    sync_interest(ep, s, token);
    Ok(())
}

/// Follow the link's need for writability (a connect in progress, bytes left unsent).
fn sync_interest(ep: &Epoll, s: &mut Session, token: u64) {
    let w = s.link.wants_write();
    if w != s.write_interest && ep.modify(s.link.fd(), token, true, w).is_ok() {
        s.write_interest = w;
    }
}

/// Run `sessions` until every one finished (non-repeating) or the deadline passed.
/// `progress` is called about once per second with (completed, failed).
pub fn drive(
    sessions: &mut [Session],
    cfg: &DriveConfig,
    progress: &mut dyn FnMut(u64, u64),
) -> std::io::Result<DriveResult> {
    let t0 = Instant::now();
    let n = sessions.len();
    let mut res = DriveResult {
        done: vec![false; n],
        ..Default::default()
    };
    let mut ep = Epoll::new(256)?;
    let mut running: Vec<usize> = Vec::with_capacity(cfg.concurrency);
    let mut next = 0usize;
    let mut ready = Vec::with_capacity(256);
    let mut batch = Batch::new(32);
    let mut last_timer = Instant::now();
    let mut last_progress = Instant::now();

    // Outcome handling shared by datagrams, stream events and timers. Returns true when the
    // session left the running set.
    fn settle(
        i: usize,
        ev: Event,
        s: &mut Session,
        cfg: &DriveConfig,
        res: &mut DriveResult,
        ep: &Epoll,
    ) -> bool {
        match ev {
            Event::Done => {
                res.completed += 1;
                res.latency
                    .record_ns(s.started.elapsed().as_nanos().min(u64::MAX as u128) as u64);
                if let Some(d) = s.established_in() {
                    res.established
                        .record_ns(d.as_nanos().min(u64::MAX as u128) as u64);
                }
                if res.tls_summary.is_none() {
                    res.tls_summary = s.tls_summary();
                }
                if cfg.repeat {
                    if cfg.new_socket_per_cycle || s.kind.is_stream() {
                        ep.del(s.link.fd());
                        if s.renew_socket().is_err() || register(ep, s, i as u64).is_err() {
                            *res.reasons.entry("socket: cannot open".into()).or_default() += 1;
                            res.failed += 1;
                            return true;
                        }
                    }
                    let gone = matches!(s.start(), Event::Failed(_) | Event::Done);
                    sync_interest(ep, s, i as u64);
                    gone
                } else {
                    res.done[i] = true;
                    true
                }
            }
            Event::Failed(why) => {
                res.failed += 1;
                *res.reasons.entry(why).or_default() += 1;
                if cfg.repeat {
                    // A failed cycle may leave an allocation behind on the old 5-tuple: start
                    // over on a new one (the server expires the old one by itself).
                    ep.del(s.link.fd());
                    if s.renew_socket().is_err() || register(ep, s, i as u64).is_err() {
                        return true;
                    }
                    let gone = matches!(s.start(), Event::Failed(_) | Event::Done);
                    sync_interest(ep, s, i as u64);
                    gone
                } else {
                    true
                }
            }
            _ => {
                sync_interest(ep, s, i as u64);
                false
            }
        }
    }

    loop {
        let now = Instant::now();
        if now >= cfg.deadline {
            break;
        }
        while running.len() < cfg.concurrency && next < n {
            let i = next;
            next += 1;
            let s = &mut sessions[i];
            if let Err(e) = s.open_deferred() {
                res.failed += 1;
                *res.reasons.entry(format!("connect: {e}")).or_default() += 1;
                continue;
            }
            register(&ep, s, i as u64)?;
            let ev = s.start();
            if !settle(i, ev, s, cfg, &mut res, &ep) {
                running.push(i);
            } else {
                ep.del(s.link.fd());
            }
        }
        if running.is_empty() && next >= n {
            break;
        }
        ep.wait_events(2, &mut ready);
        let mut left = Vec::new();
        for &(tok, events) in &ready {
            let i = tok as usize;
            let Some(s) = sessions.get_mut(i) else {
                continue;
            };
            if let Link::Udp(sock) = &s.link {
                let fd = sock.as_raw_fd();
                // Bounded drain: a flood on one socket cannot starve the others.
                for _ in 0..4 {
                    let got = batch.recv(fd, batch.capacity()).unwrap_or_default();
                    let mut gone = false;
                    for k in 0..got {
                        let ev = s.on_datagram(batch.datagram(k));
                        if settle(i, ev, s, cfg, &mut res, &ep) {
                            gone = true;
                            break;
                        }
                    }
                    if gone {
                        left.push(i);
                        break;
                    }
                    if got < batch.capacity() {
                        break;
                    }
                }
                continue;
            }
            let fd = s.link.fd();
            if events & libc::EPOLLOUT as u32 != 0 {
                let ev = s.on_writable();
                if settle(i, ev, s, cfg, &mut res, &ep) {
                    left.push(i);
                    continue;
                }
                if s.link.fd() != fd {
                    continue; // renewed: the old connection's readiness is moot
                }
            }
            if events & !(libc::EPOLLOUT as u32) != 0 {
                let ev = s.on_readable();
                if settle(i, ev, s, cfg, &mut res, &ep) {
                    left.push(i);
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(last_timer) >= Duration::from_millis(5) {
            last_timer = now;
            for &i in &running {
                let s = &mut sessions[i];
                let ev = s.on_timer(now, cfg.rto, cfg.attempts);
                if settle(i, ev, s, cfg, &mut res, &ep) {
                    left.push(i);
                }
            }
        }
        if !left.is_empty() {
            left.sort_unstable();
            left.dedup();
            running.retain(|i| left.binary_search(i).is_err());
            for &i in &left {
                ep.del(sessions[i].link.fd());
            }
        }
        if last_progress.elapsed() >= Duration::from_secs(1) {
            last_progress = Instant::now();
            progress(res.completed, res.failed);
        }
    }
    // Sessions still running at the deadline: for non-repeating runs they count as failed.
    if !cfg.repeat {
        let unstarted = n - next;
        let unfinished = running.len() + unstarted;
        if unfinished > 0 {
            res.failed += unfinished as u64;
            *res.reasons
                .entry("not finished by the deadline".into())
                .or_default() += unfinished as u64;
        }
    }
    res.elapsed = t0.elapsed();
    Ok(res)
}

/// Parse helper for tests and the reference path: true when `buf` is a STUN success
/// response to `tid`.
pub fn is_success_for(buf: &[u8], tid: &[u8; 12]) -> bool {
    buf.len() >= HEADER_LEN
        && Message::parse(buf)
            .map(|m| m.class() == Class::Success && m.transaction_id() == tid)
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actrix_proto::stun::long_term_key_md5;

    const LB: SocketAddr = SocketAddr::V4(std::net::SocketAddrV4::new(
        std::net::Ipv4Addr::LOCALHOST,
        0,
    ));

    /// A scripted server answering one session's requests in-process.
    fn answer(req: &[u8], realm: &[u8], nonce: &[u8], key: &[u8]) -> Vec<u8> {
        let m = Message::parse(req).unwrap();
        let mut out = vec![0u8; 512];
        let tid = *m.transaction_id();
        if m.get(attr::USERNAME).is_none() {
            let mut w = MessageWriter::new(&mut out, m.method(), Class::Error, &tid).unwrap();
            w.add_error(401).unwrap();
            w.add(attr::REALM, realm).unwrap();
            w.add(attr::NONCE, nonce).unwrap();
            let n = w.finish();
            out.truncate(n);
            return out;
        }
        assert!(m.verify_integrity(key), "client MI must verify");
        let mut w = MessageWriter::new(&mut out, m.method(), Class::Success, &tid).unwrap();
        if m.method() == method::ALLOCATE {
            w.add_xor_addr(
                attr::XOR_RELAYED_ADDRESS,
                "127.0.0.1:50000".parse().unwrap(),
            )
            .unwrap();
        }
        w.add_integrity(key).unwrap();
        let n = w.finish();
        out.truncate(n);
        out
    }

    #[test]
    fn session_follows_the_challenge_and_the_plan() {
        let server: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let peer: SocketAddr = "127.0.0.1:7".parse().unwrap();
        let plan = vec![
            Op::Allocate,
            Op::Permission(vec![peer]),
            Op::ChannelBind(0x4000, peer),
            Op::Refresh(0),
        ];
        let mut s = Session::new(1, server, LB, "u", "p", plan).unwrap();
        let key = long_term_key_md5(b"u", b"r", b"p");
        assert_eq!(s.start(), Event::Sent);
        let mut steps = 0;
        loop {
            let req = s.txn.as_ref().unwrap().bytes.clone();
            let resp = answer(&req, b"r", b"n", &key);
            // A reply to another transaction is ignored.
            let mut other = resp.clone();
            other[19] ^= 0xFF;
            assert_eq!(s.on_datagram(&other), Event::Ignored);
            match s.on_datagram(&resp) {
                Event::Sent | Event::Step => steps += 1,
                Event::Done => break,
                e => panic!("{e:?}"),
            }
            assert!(steps < 10);
        }
        assert_eq!(s.relay, Some("127.0.0.1:50000".parse().unwrap()));
        // Wrong credentials: a second 401 with the same realm and nonce fails the op.
        let mut s = Session::new(2, server, LB, "u", "bad", vec![Op::Allocate]).unwrap();
        s.start();
        let req = s.txn.as_ref().unwrap().bytes.clone();
        assert_eq!(s.on_datagram(&answer(&req, b"r", b"n", &key)), Event::Sent);
        let req = s.txn.as_ref().unwrap().bytes.clone();
        let m = Message::parse(&req).unwrap();
        let mut out = vec![0u8; 256];
        let mut w =
            MessageWriter::new(&mut out, method::ALLOCATE, Class::Error, m.transaction_id())
                .unwrap();
        w.add_error(401).unwrap();
        w.add(attr::REALM, b"r").unwrap();
        w.add(attr::NONCE, b"n").unwrap();
        let n = w.finish();
        assert!(matches!(s.on_datagram(&out[..n]), Event::Failed(_)));
    }

    #[test]
    fn timer_retransmits_then_fails() {
        let mut s = Session::new(
            3,
            "127.0.0.1:9".parse().unwrap(),
            LB,
            "u",
            "p",
            vec![Op::Allocate],
        )
        .unwrap();
        s.start();
        let rto = Duration::from_millis(10);
        let t = Instant::now() + Duration::from_millis(20);
        assert_eq!(s.on_timer(t, rto, 2), Event::Sent);
        assert!(matches!(
            s.on_timer(t + Duration::from_millis(20), rto, 2),
            Event::Failed(_)
        ));
        assert!(!s.in_flight());
    }
}
