//! TURN over DTLS (RFC 7350 §4): the DTLS listeners of one shard and the DTLS associations of
//! their clients, one per 5-tuple, driven through the sans-IO `dimpl` engine (DTLS 1.2).
//!
//! Nothing is kept for a 5-tuple without an association until it proves its address with a
//! cookie (RFC 6347 §4.2.1). The cookie is the engine's own (an HMAC of the ClientHello's
//! random under the engine's cookie secret), and the engine's secret comes from its seed,
//! which this shard derives from a secret of its own (changed every 30 s), the source
//! address and the ClientHello's random. So a ClientHello without a valid cookie is answered
//! by a throw-away engine with that seed: its HelloVerifyRequest is copied over the
//! ClientHello in the receive slot and leaves with the round's batch, and the engine is
//! dropped. The ClientHello that comes back with the cookie gets a fresh engine with the same
//! seed, hence the same secret: it is first fed a copy without the cookie renumbered to
//! message_seq 0 (the engine expects to see the exchange from its start and answers that copy
//! with a HelloVerifyRequest, discarded), then the real one, which it accepts. A spoofed
//! source gets one datagram smaller than the one it sent, and no state; a cookie is good only
//! for its source address and random, for 30 to 60 s.
//!
//! The seed also drives the engine's other non-cryptographic randomness (the server random,
//! explicit AEAD nonces, retransmission jitter); key exchange and signatures use the system's
//! secure random source regardless (`dimpl::ConfigBuilder::dangerously_set_rng_seed`). The
//! seed is secret and differs per source address and client random.
//!
//! What this costs: every ClientHello without a valid cookie builds and drops an engine (a
//! few heap allocations, no state kept); DTLS datagrams are sent with one `sendto` each, not
//! batched (they come out of the engine's buffers); relayed data for a DTLS client is copied
//! into and out of the engine.

use crate::streams::{CloseReason, StreamLimits, StreamSettings, N_CLOSE_REASONS};
use actrix_proto::turn::ClientKey;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use socket2::Socket;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use dimpl::DtlsCertificate;

/// A DTLS listening socket of this shard (UDP, in the listen address's SO_REUSEPORT group).
pub struct DtlsListener {
    pub sock: Socket,
    /// Its TURN listener index.
    pub listener: u8,
}

/// How often the cookie secret changes; a cookie is good for one to two periods.
const COOKIE_PERIOD_MS: u64 = 30_000;
/// The seed MAC's length (HMAC-SHA256).
const MAC_LEN: usize = 32;
/// Room before a plaintext message for in-place framing (the same as a receive slot's).
const HEADROOM: usize = actrix_udp::SLOT_HEADROOM;
/// The largest plaintext handled (a receive slot's payload).
const MAX_PLAIN: usize = 2048;
/// An allocation outlives no silence longer than this: a client must refresh within its
/// lifetime, which is at most an hour.
const MAX_SILENCE_WITH_ALLOCATION_MS: u64 = 3_600_000;

/// Checks a certificate and key for DTLS: the leaf certificate (DER) and its private key
/// (PKCS#8 or SEC1 DER), which must be ECDSA P-256 or P-384 (the only signatures `dimpl`
/// has).
pub fn certificate(leaf: Vec<u8>, key: Vec<u8>) -> Result<DtlsCertificate, String> {
    if leaf.is_empty() {
        return Err("no certificate".into());
    }
    let provider = dimpl::crypto::rust_crypto::default_provider();
    if provider.key_provider.load_private_key(&key).is_err() {
        return Err(
            "the key is not an ECDSA P-256 or P-384 key (DTLS is served with ECDSA only)".into(),
        );
    }
    Ok(DtlsCertificate {
        certificate: leaf,
        private_key: key,
    })
}

/// DTLS counters of one shard (published per round).
#[derive(Debug, Default, Clone)]
pub struct DtlsCounters {
    /// Associations whose handshake finished.
    pub handshakes_completed: u64,
    /// Associations that ended before their handshake finished (an error, the deadline).
    pub handshakes_failed: u64,
    /// HelloVerifyRequests sent for ClientHellos without a valid cookie (no state kept).
    pub cookies_sent: u64,
    /// Datagrams from a 5-tuple without an association that were not a ClientHello.
    pub stray: u64,
    /// Associations closed or refused, by reason.
    pub closed: [u64; N_CLOSE_REASONS],
}

struct Assoc {
    tls: dimpl::Dtls,
    /// Changes whenever the association is replaced, so stale timer entries are skipped.
    gen: u32,
    connected: bool,
    opened_ms: u64,
    last_rx_ms: u64,
    /// The engine's next timer (retransmission), `u64::MAX` if none.
    engine_ms: u64,
    /// The earliest timer entry queued for it.
    armed_ms: u64,
}

/// What became of a datagram on a DTLS listener.
pub(crate) enum Ingress {
    /// Answer with `buf[range]` from the listener (a HelloVerifyRequest written in place).
    Answer(Range<usize>),
    /// Fed to the client's association: drain it with [`DtlsSide::poll`].
    Fed,
    /// Nothing to do.
    Dropped,
}

/// One thing out of an association, after its packets went out.
pub(crate) enum Event {
    /// A plaintext message in `plain()[HEADROOM..HEADROOM + n]`.
    Plain(usize),
    /// The association is gone for this reason; its allocation ends.
    Closed,
}

/// The DTLS listeners and associations of one shard.
pub struct DtlsSide {
    /// (TURN listener index, descriptor), in listener order.
    fds: Vec<(u8, RawFd)>,
    _socks: Vec<Socket>,
    cert: Option<DtlsCertificate>,
    assocs: HashMap<ClientKey, Assoc>,
    timers: BinaryHeap<Reverse<(u64, u32, u8, SocketAddr)>>,
    secret: [u8; 32],
    old_secret: [u8; 32],
    rotate_ms: u64,
    settings: StreamSettings,
    limits: Arc<StreamLimits>,
    /// The engine's output buffer.
    out: Vec<u8>,
    /// Where a ClientHello is copied without its cookie.
    scratch: Vec<u8>,
    /// Plaintext records taken out of an association, waiting for the TURN core.
    inbox: Vec<u8>,
    inbox_lens: Vec<usize>,
    inbox_next: usize,
    inbox_off: usize,
    pending_close: Option<CloseReason>,
    /// One plaintext message with headroom, handed to the TURN core.
    plain: Vec<u8>,
    base: Instant,
    base_ms: u64,
    next_gen: u32,
    pub counters: DtlsCounters,
}

impl DtlsSide {
    pub fn new(
        listeners: Vec<DtlsListener>,
        cert: Option<DtlsCertificate>,
        settings: StreamSettings,
        limits: Arc<StreamLimits>,
        now_ms: u64,
    ) -> DtlsSide {
        DtlsSide {
            fds: listeners
                .iter()
                .map(|l| (l.listener, l.sock.as_raw_fd()))
                .collect(),
            _socks: listeners.into_iter().map(|l| l.sock).collect(),
            cert,
            assocs: HashMap::new(),
            timers: BinaryHeap::new(),
            secret: rand::random(),
            old_secret: rand::random(),
            rotate_ms: now_ms + COOKIE_PERIOD_MS,
            settings,
            limits,
            out: vec![0; 4096],
            scratch: vec![0; 4096],
            inbox: Vec::with_capacity(4096),
            inbox_lens: Vec::with_capacity(8),
            inbox_next: 0,
            inbox_off: 0,
            pending_close: None,
            plain: vec![0; HEADROOM + MAX_PLAIN + 8],
            base: Instant::now(),
            base_ms: now_ms,
            next_gen: 0,
            counters: DtlsCounters::default(),
        }
    }

    /// The listening sockets: (TURN listener index, descriptor).
    pub fn listeners(&self) -> &[(u8, RawFd)] {
        &self.fds
    }

    /// The descriptor of DTLS listener `i`, if it is one.
    pub fn fd(&self, i: u8) -> Option<RawFd> {
        self.fds.iter().find(|(l, _)| *l == i).map(|(_, fd)| *fd)
    }

    pub fn is_listener(&self, i: u8) -> bool {
        self.fd(i).is_some()
    }

    /// Associations open now.
    pub fn open(&self) -> usize {
        self.assocs.len()
    }

    /// A renewed certificate, for handshakes from now on.
    pub fn set_certificate(&mut self, cert: DtlsCertificate) {
        self.cert = Some(cert);
    }

    pub fn plain(&mut self) -> &mut Vec<u8> {
        &mut self.plain
    }

    pub fn plain_range(n: usize) -> Range<usize> {
        HEADROOM..HEADROOM + n
    }

    /// The earliest timer, in shard milliseconds (`u64::MAX`: none).
    pub fn poll_timeout(&self) -> u64 {
        self.timers
            .peek()
            .map(|Reverse((ms, ..))| *ms)
            .unwrap_or(u64::MAX)
            .min(self.rotate_ms)
    }

    fn instant(&self, ms: u64) -> Instant {
        self.base + Duration::from_millis(ms.saturating_sub(self.base_ms))
    }

    fn cookie(secret: &[u8; 32], from: SocketAddr, random: &[u8]) -> [u8; MAC_LEN] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret).expect("any key length");
        match from.ip() {
            IpAddr::V4(a) => mac.update(&a.octets()),
            IpAddr::V6(a) => mac.update(&a.octets()),
        }
        mac.update(&from.port().to_be_bytes());
        mac.update(random);
        mac.finalize().into_bytes().into()
    }

    /// A datagram `buf[range]` on DTLS listener `key.listener` from `key.addr`.
    pub(crate) fn handle_datagram(
        &mut self,
        now_ms: u64,
        key: ClientKey,
        buf: &mut [u8],
        range: Range<usize>,
    ) -> Ingress {
        let Some(datagram) = buf.get(range.clone()) else {
            return Ingress::Dropped;
        };
        if let Some(a) = self.assocs.get_mut(&key) {
            a.last_rx_ms = now_ms;
            let now = self.base + Duration::from_millis(now_ms.saturating_sub(self.base_ms));
            // Time first, so a due retransmission or deadline is seen before the input.
            let tls = &mut a.tls;
            if !guard(|| {
                tls.handle_timeout(now)
                    .and_then(|_| tls.handle_packet(datagram))
            }) {
                self.pending_close = Some(CloseReason::TlsError);
            }
            return Ingress::Fed;
        }
        let Some(ch) = ClientHello::parse(datagram) else {
            self.counters.stray += 1;
            return Ingress::Dropped;
        };
        let Some(cert) = self.cert.clone() else {
            return Ingress::Dropped;
        };
        let now = self.instant(now_ms);
        let random = ch.random(datagram).to_vec();
        if !ch.cookie(datagram).is_empty() {
            // A cookie: good for the engine seeded for this source and random in this cookie
            // period or the last one (see the module documentation).
            for secret in [self.secret, self.old_secret] {
                let seed = Self::seed(&secret, key.addr, &random);
                let mut tls = self.engine(cert.clone(), seed, now);
                let synthetic = ch.without_cookie(datagram, &mut self.scratch);
                if !guard(|| tls.handle_packet(&self.scratch[..synthetic])) {
                    break;
                }
                drain_discarding(&mut tls, &mut self.out);
                if !guard(|| tls.handle_packet(datagram)) {
                    break;
                }
                // The engine's answer: another HelloVerifyRequest (not its cookie), or the
                // server's flight (it is; the source address is proven).
                let fd = self.fd(key.listener).unwrap_or(-1);
                let mut first = true;
                let mut verified = false;
                let mut engine_ms = u64::MAX;
                loop {
                    match tls.poll_output(&mut self.out) {
                        dimpl::Output::Packet(p) => {
                            if first {
                                verified = p.get(13) != Some(&3);
                                first = false;
                                if verified {
                                    if let Err(why) =
                                        self.limits.try_open(key.addr.ip(), &self.settings)
                                    {
                                        self.counters.closed[why as usize] += 1;
                                        return Ingress::Dropped;
                                    }
                                }
                            }
                            if !verified {
                                break;
                            }
                            send_to(fd, p, key.addr);
                        }
                        dimpl::Output::Timeout(t) => {
                            engine_ms = to_ms(self.base, self.base_ms, t);
                            break;
                        }
                        dimpl::Output::BufferTooSmall { needed } if needed <= 65536 => {
                            self.out.resize(needed, 0)
                        }
                        dimpl::Output::BufferTooSmall { .. } => break,
                        _ => {}
                    }
                }
                if !verified {
                    continue;
                }
                self.next_gen = self.next_gen.wrapping_add(1);
                let deadline = now_ms + self.settings.tls_handshake_timeout_secs as u64 * 1000;
                self.assocs.insert(
                    key,
                    Assoc {
                        tls,
                        gen: self.next_gen,
                        connected: false,
                        opened_ms: now_ms,
                        last_rx_ms: now_ms,
                        engine_ms,
                        armed_ms: u64::MAX,
                    },
                );
                self.arm(key, deadline.min(engine_ms));
                return Ingress::Fed;
            }
        }
        // No cookie, or not a good one: the HelloVerifyRequest of the engine for this source
        // and random (RFC 6347 §4.2.1), copied over the ClientHello; the engine is dropped.
        let seed = Self::seed(&self.secret, key.addr, &random);
        let mut tls = self.engine(cert, seed, now);
        if !guard(|| tls.handle_packet(datagram)) {
            return Ingress::Dropped;
        }
        let mut answer = None;
        loop {
            match tls.poll_output(&mut self.out) {
                dimpl::Output::Packet(p) if answer.is_none() && p.len() <= range.len() => {
                    buf[range.start..range.start + p.len()].copy_from_slice(p);
                    answer = Some(range.start..range.start + p.len());
                }
                dimpl::Output::Packet(_) => {}
                dimpl::Output::BufferTooSmall { .. } | dimpl::Output::Timeout(_) => break,
                _ => {}
            }
        }
        match answer {
            Some(r) => {
                self.counters.cookies_sent += 1;
                Ingress::Answer(r)
            }
            None => Ingress::Dropped,
        }
    }

    /// A server engine whose cookie secret (and other non-cryptographic randomness) comes
    /// from `seed`: the same seed makes the same cookies.
    fn engine(&self, cert: DtlsCertificate, seed: u64, now: Instant) -> dimpl::Dtls {
        let config = self
            .config_builder()
            .dangerously_set_rng_seed(seed)
            .build()
            .expect("the DTLS configuration is valid");
        let mut tls = dimpl::Dtls::new_12(Arc::new(config), cert, now);
        // The engine takes its random and first timers from the first timeout.
        let _ = guard(|| tls.handle_timeout(now));
        tls
    }

    fn config_builder(&self) -> dimpl::ConfigBuilder {
        dimpl::Config::builder()
            .use_server_cookie(true)
            .require_client_certificate(false)
            .handshake_timeout(Duration::from_secs(
                self.settings.tls_handshake_timeout_secs.max(1) as u64,
            ))
            .with_crypto_provider(dimpl::crypto::rust_crypto::default_provider())
    }

    /// The engine seed for a ClientHello with `random` from `from`: secret, so nobody can
    /// make a cookie the engine accepts without receiving it at `from`.
    fn seed(secret: &[u8; 32], from: SocketAddr, random: &[u8]) -> u64 {
        let c = Self::cookie(secret, from, random);
        u64::from_be_bytes(c[..8].try_into().expect("8 bytes"))
    }

    fn arm(&mut self, key: ClientKey, at_ms: u64) {
        if let Some(a) = self.assocs.get_mut(&key) {
            if at_ms < a.armed_ms {
                a.armed_ms = at_ms;
                self.timers
                    .push(Reverse((at_ms, a.gen, key.listener, key.addr)));
            }
        }
    }

    /// Drain association `key` after an input: its packets leave on its listener, plaintext
    /// records queue for [`DtlsSide::next_event`].
    pub(crate) fn poll(&mut self, now_ms: u64, key: ClientKey) {
        let Some(fd) = self.fd(key.listener) else {
            return;
        };
        self.inbox.clear();
        self.inbox_lens.clear();
        self.inbox_next = 0;
        self.inbox_off = 0;
        let (base, base_ms) = (self.base, self.base_ms);
        let Some(a) = self.assocs.get_mut(&key) else {
            return;
        };
        let mut engine_ms = u64::MAX;
        let mut close = self.pending_close.take();
        loop {
            match a.tls.poll_output(&mut self.out) {
                dimpl::Output::Packet(p) => send_to(fd, p, key.addr),
                dimpl::Output::Timeout(t) => {
                    engine_ms = to_ms(base, base_ms, t);
                    break;
                }
                dimpl::Output::Connected => {
                    a.connected = true;
                    self.counters.handshakes_completed += 1;
                }
                // Larger than a TURN message over UDP can be, or too many in one datagram:
                // dropped.
                dimpl::Output::ApplicationData(d)
                    if d.len() <= MAX_PLAIN && self.inbox_lens.len() < 64 =>
                {
                    self.inbox.extend_from_slice(d);
                    self.inbox_lens.push(d.len());
                }
                dimpl::Output::CloseNotify => close = close.or(Some(CloseReason::ByClient)),
                dimpl::Output::BufferTooSmall { needed } if needed <= 65536 => {
                    self.out.resize(needed, 0)
                }
                dimpl::Output::BufferTooSmall { .. } => {
                    close = Some(CloseReason::TlsError);
                    break;
                }
                _ => {}
            }
        }
        a.engine_ms = engine_ms;
        if a.tls.is_closed() && close.is_none() {
            close = Some(CloseReason::ByClient);
        }
        self.pending_close = close;
        if engine_ms != u64::MAX {
            // Never in the past: a timer run must not find it due again.
            self.arm(key, engine_ms.max(now_ms + 1));
        }
    }

    /// The next plaintext message out of the association last polled (copied into
    /// [`DtlsSide::plain`]), then its end if it ended.
    pub(crate) fn next_event(&mut self, now_ms: u64, key: ClientKey) -> Option<Event> {
        if self.inbox_next < self.inbox_lens.len() {
            let n = self.inbox_lens[self.inbox_next];
            let off = self.inbox_off;
            self.inbox_next += 1;
            self.inbox_off += n;
            self.plain[HEADROOM..HEADROOM + n].copy_from_slice(&self.inbox[off..off + n]);
            return Some(Event::Plain(n));
        }
        let why = self.pending_close.take()?;
        self.close(now_ms, key, why);
        Some(Event::Closed)
    }

    /// Encrypt `bytes` for the client `key` and send it. False if it has no open association.
    pub(crate) fn send(&mut self, key: ClientKey, bytes: &[u8]) -> bool {
        let Some(fd) = self.fd(key.listener) else {
            return false;
        };
        let Some(a) = self.assocs.get_mut(&key) else {
            return false;
        };
        if !a.connected || !guard(|| a.tls.send_application_data(bytes).map(|_| ())) {
            return false;
        }
        loop {
            match a.tls.poll_output(&mut self.out) {
                dimpl::Output::Packet(p) => send_to(fd, p, key.addr),
                dimpl::Output::Timeout(_) => break,
                dimpl::Output::BufferTooSmall { needed } if needed <= 65536 => {
                    self.out.resize(needed, 0)
                }
                dimpl::Output::BufferTooSmall { .. } => break,
                // Anything else (plaintext, a close) surfaces at the next input.
                _ => break,
            }
        }
        true
    }

    /// Remove association `key` (it ended for `why`): counted, its limits released.
    fn close(&mut self, _now_ms: u64, key: ClientKey, why: CloseReason) {
        let Some(mut a) = self.assocs.remove(&key) else {
            return;
        };
        if !a.connected {
            self.counters.handshakes_failed += 1;
        } else if !matches!(why, CloseReason::ByClient | CloseReason::TlsError) {
            // Tell the client (best effort).
            if let Some(fd) = self.fd(key.listener) {
                if guard(|| a.tls.close()) {
                    while let dimpl::Output::Packet(p) = a.tls.poll_output(&mut self.out) {
                        send_to(fd, p, key.addr);
                    }
                }
            }
        }
        self.counters.closed[why as usize] += 1;
        self.limits.close(key.addr.ip());
    }

    /// Run due timers: retransmissions, the handshake deadline, idleness, the cookie secret.
    /// `has_allocation` says whether a client holds one (it may then be silent for longer).
    /// Returns the clients whose associations ended.
    pub(crate) fn handle_timeout(
        &mut self,
        now_ms: u64,
        has_allocation: &dyn Fn(&ClientKey) -> bool,
        closed: &mut Vec<ClientKey>,
    ) {
        if now_ms >= self.rotate_ms {
            self.old_secret = self.secret;
            self.secret = rand::random();
            self.rotate_ms = now_ms + COOKIE_PERIOD_MS;
        }
        while let Some(Reverse((at, gen, listener, addr))) = self.timers.peek().copied() {
            if at > now_ms {
                break;
            }
            self.timers.pop();
            let key = ClientKey { listener, addr };
            let handshake_ms = self.settings.tls_handshake_timeout_secs as u64 * 1000;
            let idle_ms = self.settings.idle_timeout_secs as u64 * 1000;
            let Some(a) = self.assocs.get_mut(&key) else {
                continue;
            };
            if a.gen != gen || a.armed_ms != at {
                continue;
            }
            a.armed_ms = u64::MAX;
            let why = if !a.connected && now_ms >= a.opened_ms + handshake_ms {
                Some(CloseReason::HandshakeTimeout)
            } else {
                None
            };
            let silence = if has_allocation(&key) {
                MAX_SILENCE_WITH_ALLOCATION_MS.max(idle_ms)
            } else {
                idle_ms
            };
            let why = why.or_else(|| {
                (a.connected && now_ms >= a.last_rx_ms + silence).then_some(CloseReason::Idle)
            });
            if let Some(why) = why {
                self.close(now_ms, key, why);
                closed.push(key);
                continue;
            }
            if a.engine_ms <= now_ms {
                let now = self.base + Duration::from_millis(now_ms.saturating_sub(self.base_ms));
                if !guard(|| a.tls.handle_timeout(now)) {
                    self.close(now_ms, key, CloseReason::TlsError);
                    closed.push(key);
                    continue;
                }
                self.poll(now_ms, key);
                // No plaintext comes out of a timeout; a close does.
                if let Some(why) = self.pending_close.take() {
                    self.close(now_ms, key, why);
                    closed.push(key);
                    continue;
                }
            }
            let Some(a) = self.assocs.get(&key) else {
                continue;
            };
            let next = if a.connected {
                a.last_rx_ms + silence
            } else {
                a.opened_ms + handshake_ms
            };
            let next = next.min(a.engine_ms).max(now_ms + 1);
            self.arm(key, next);
        }
    }

    /// Shutdown: every association ends (a close_notify to each that finished its handshake).
    pub(crate) fn close_all(&mut self, now_ms: u64, closed: &mut Vec<ClientKey>) {
        let keys: Vec<ClientKey> = self.assocs.keys().copied().collect();
        for key in keys {
            self.close(now_ms, key, CloseReason::Error);
            closed.push(key);
        }
        self.timers.clear();
    }
}

/// Run an engine call; false if it failed or panicked. Every engine error is fatal to its
/// association, and so is a panic (a bug in the engine, which must not take the shard with it):
/// the association is dropped either way.
fn guard(f: impl FnOnce() -> Result<(), dimpl::Error>) -> bool {
    matches!(
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)),
        Ok(Ok(()))
    )
}

/// An engine instant in shard milliseconds, rounded up: when the shard's clock reaches it, the
/// engine's timer is due (rounded down, the engine would be woken before its time, do
/// nothing and ask for the same instant again).
fn to_ms(base: Instant, base_ms: u64, t: Instant) -> u64 {
    let d = t.saturating_duration_since(base);
    base_ms + d.as_millis() as u64 + u64::from(!d.subsec_nanos().is_multiple_of(1_000_000))
}

/// Drain an engine's output, sending nothing.
fn drain_discarding(tls: &mut dimpl::Dtls, out: &mut [u8]) {
    loop {
        match tls.poll_output(out) {
            dimpl::Output::Timeout(_) | dimpl::Output::BufferTooSmall { .. } => break,
            _ => {}
        }
    }
}

/// Where the parts of an unfragmented DTLS ClientHello in epoch 0 are (RFC 6347 §4.2.2,
/// §4.3.2), after one pass of length checks.
struct ClientHello {
    /// The record's end (13 + its length).
    end: usize,
    random: Range<usize>,
    cookie: Range<usize>,
}

impl ClientHello {
    fn parse(d: &[u8]) -> Option<ClientHello> {
        // Record header: type 22 (handshake), version, epoch 0, sequence, length.
        if d.len() < 13 + 12 + 2 + 32 + 1 || d[0] != 22 || d[3] != 0 || d[4] != 0 {
            return None;
        }
        let rec_len = u16::from_be_bytes([d[11], d[12]]) as usize;
        if 13 + rec_len > d.len() {
            return None;
        }
        let h = &d[13..13 + rec_len];
        // Handshake header: type 1 (ClientHello), length, message_seq, fragment offset 0,
        // fragment length = length.
        if h.len() < 12 || h[0] != 1 {
            return None;
        }
        let len = u32::from_be_bytes([0, h[1], h[2], h[3]]) as usize;
        let frag_off = u32::from_be_bytes([0, h[6], h[7], h[8]]);
        let frag_len = u32::from_be_bytes([0, h[9], h[10], h[11]]) as usize;
        if frag_off != 0 || frag_len != len || 12 + len > h.len() {
            return None;
        }
        // Body: client_version (2), random (32), session_id <0..32>, cookie <0..255>.
        let b = 13 + 12;
        let random = b + 2..b + 34;
        let sid_len = *d.get(b + 34)? as usize;
        if sid_len > 32 {
            return None;
        }
        let c = b + 35 + sid_len;
        let cookie_len = *d.get(c)? as usize;
        let cookie = c + 1..c + 1 + cookie_len;
        if cookie.end > 13 + 12 + len {
            return None;
        }
        Some(ClientHello {
            end: 13 + rec_len,
            random,
            cookie,
        })
    }

    fn random<'a>(&self, d: &'a [u8]) -> &'a [u8] {
        &d[self.random.clone()]
    }

    fn cookie<'a>(&self, d: &'a [u8]) -> &'a [u8] {
        &d[self.cookie.clone()]
    }

    /// Copy the record into `out` without its cookie, as the first ClientHello of an
    /// exchange: record sequence 0, message_seq 0. Returns its length.
    fn without_cookie(&self, d: &[u8], out: &mut [u8]) -> usize {
        let cut = self.cookie.len();
        let n = self.end - cut;
        out[..13].copy_from_slice(&d[..13]);
        out[5..11].fill(0);
        out[11..13].copy_from_slice(&((self.end - 13 - cut) as u16).to_be_bytes());
        let len = (self.end - 25 - cut) as u32;
        out[13] = 1;
        out[14..17].copy_from_slice(&len.to_be_bytes()[1..]);
        out[17..22].fill(0);
        out[22..25].copy_from_slice(&len.to_be_bytes()[1..]);
        let c = self.cookie.start - 1;
        out[25..c].copy_from_slice(&d[25..c]);
        out[c] = 0;
        out[c + 1..n].copy_from_slice(&d[self.cookie.end..self.end]);
        n
    }
}

/// One datagram out of a DTLS listener (not batched; a failure is the client's loss, as on
/// any UDP send).
pub(crate) fn send_to(fd: RawFd, bytes: &[u8], dst: SocketAddr) {
    let addr = socket2::SockAddr::from(dst);
    // SAFETY: `bytes` and `addr` are valid for the call; the descriptor is the listener's.
    unsafe {
        libc::sendto(
            fd,
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT,
            addr.as_ptr().cast(),
            addr.len(),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello as a DTLS client sends it, with `cookie`, trimmed to a few suites.
    fn client_hello(cookie: &[u8], message_seq: u8) -> Vec<u8> {
        let body_len = 2 + 32 + 1 + 1 + cookie.len() + 2 + 2 + 1 + 1;
        let mut ch = vec![22, 0xfe, 0xfd, 0, 0, 0, 0, 0, 0, 0, 7];
        ch.extend_from_slice(&((12 + body_len) as u16).to_be_bytes());
        ch.push(1);
        ch.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        ch.extend_from_slice(&[0, message_seq, 0, 0, 0]);
        ch.extend_from_slice(&(body_len as u32).to_be_bytes()[1..]);
        ch.extend_from_slice(&[0xfe, 0xfd]);
        ch.extend_from_slice(&[9; 32]);
        ch.push(0);
        ch.push(cookie.len() as u8);
        ch.extend_from_slice(cookie);
        ch.extend_from_slice(&[0, 2, 0xc0, 0x2b, 1, 0]);
        ch
    }

    #[test]
    fn a_client_hello_is_parsed_and_copied_without_its_cookie_as_the_first_of_an_exchange() {
        let first = client_hello(&[], 0);
        let p = ClientHello::parse(&first).expect("parses");
        assert_eq!(p.random(&first), &[9; 32]);
        assert!(p.cookie(&first).is_empty());
        let second = client_hello(&[5; 32], 1);
        let p = ClientHello::parse(&second).expect("parses");
        assert_eq!(p.cookie(&second), &[5; 32]);
        let mut out = vec![0u8; 512];
        let n = p.without_cookie(&second, &mut out);
        let mut want = first.clone();
        want[10] = 0; // record sequence 0
        assert_eq!(&out[..n], &want[..]);
        // Fragments, other epochs, other messages and short data are not ClientHellos.
        let mut frag = first.clone();
        frag[24] -= 1;
        assert!(ClientHello::parse(&frag).is_none());
        let mut epoch = first.clone();
        epoch[4] = 1;
        assert!(ClientHello::parse(&epoch).is_none());
        let mut other = first.clone();
        other[13] = 2;
        assert!(ClientHello::parse(&other).is_none());
        for cut in 0..first.len() {
            let _ = ClientHello::parse(&first[..cut]);
        }
        assert!(ClientHello::parse(&first[..first.len() - 1]).is_none());
    }

    #[test]
    fn engine_timers_round_up_so_a_due_timer_is_never_early() {
        let base = Instant::now();
        assert_eq!(to_ms(base, 100, base), 100);
        assert_eq!(to_ms(base, 100, base + Duration::from_millis(1)), 101);
        assert_eq!(to_ms(base, 100, base + Duration::from_micros(1500)), 102);
        assert_eq!(to_ms(base, 100, base - Duration::from_millis(5)), 100);
    }

    #[test]
    fn seeds_are_bound_to_the_source_and_the_random() {
        let s = [1u8; 32];
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:4001".parse().unwrap();
        assert_eq!(
            DtlsSide::seed(&s, a, &[9; 32]),
            DtlsSide::seed(&s, a, &[9; 32])
        );
        assert_ne!(
            DtlsSide::seed(&s, a, &[9; 32]),
            DtlsSide::seed(&s, b, &[9; 32])
        );
        assert_ne!(
            DtlsSide::seed(&s, a, &[9; 32]),
            DtlsSide::seed(&s, a, &[8; 32])
        );
        assert_ne!(
            DtlsSide::seed(&s, a, &[9; 32]),
            DtlsSide::seed(&[2; 32], a, &[9; 32])
        );
    }
}
