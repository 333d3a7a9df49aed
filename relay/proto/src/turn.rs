//! The TURN server core (RFC 8656 over UDP, plus RFC 8489 Binding), sans-IO.
//!
//! One [`Server`] is owned by one shard. It is fed datagrams with the time they arrived
//! ([`Server::handle_client`], [`Server::handle_peer`]) and returns where to send what: a
//! [`Transmit`] naming the source socket, the destination, and either a byte range of the
//! caller's own buffer (relayed data, framed in place) or the server's scratch buffer (a
//! response). It never reads a clock, never touches a socket (relay sockets are opened and
//! closed through the [`RelayBinder`] the caller passes in) and never allocates per relayed
//! packet.
//!
//! Handlers follow the numbered processing steps of RFC 8656 §7-§12; the step is quoted where
//! it is enforced.

use crate::auth::{self, KeyCache, Lookup, NonceCheck, PasswordAlgorithm, UserKey};
use crate::policy::{Denied, PeerPolicy};
use crate::stun::{
    self, attr, channel, code, method, Class, IntegrityKind, Message, MessageWriter,
};
use crate::wheel::{TimerKey, Wheel};
use ahash::AHashMap;
use dashmap::DashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// Time as the caller read it once per batch of packets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    /// Monotonic milliseconds (lifetimes, permissions, channels).
    pub ms: u64,
    /// Wall-clock Unix seconds (nonces, credential expiry).
    pub unix: u64,
}

/// Bytes of headroom the caller must leave before a peer datagram so a Data indication header
/// (20 + 24 + 4 bytes at most) can be written in place.
pub const HEADROOM: usize = 48;
/// Bytes of tailroom after a peer datagram for Data indication padding.
pub const TAILROOM: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(addr: &SocketAddr) -> Family {
        match addr {
            SocketAddr::V4(_) => Family::V4,
            SocketAddr::V6(_) => Family::V6,
        }
    }
}

/// The client side of an allocation's 5-tuple: which listener it reached and from where.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey {
    pub listener: u8,
    pub addr: SocketAddr,
}

/// A relay port number of this shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RelayPort {
    /// Index into the configured relay addresses of each family.
    pub addr: u8,
    pub port: u16,
}

impl RelayPort {
    pub fn new(addr: u8, port: u16) -> Self {
        RelayPort { addr, port }
    }
}

/// Which socket a datagram leaves from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Src {
    Listener(u8),
    Relay(Family, RelayPort),
}

/// Where the bytes of a transmit are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Data {
    /// A range of the buffer the caller passed in (relayed data, framed in place).
    Buf(Range<usize>),
    /// The first `n` bytes of [`Server::scratch`] (a STUN response).
    Scratch(usize),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub src: Src,
    pub dst: SocketAddr,
    pub data: Data,
}

/// Opens and closes relay sockets on behalf of the core.
pub trait RelayBinder {
    /// Bind a relay socket for `family` on `port`; false if the port is unavailable.
    fn bind(&mut self, family: Family, port: RelayPort) -> bool;
    fn unbind(&mut self, family: Family, port: RelayPort);
    /// A port whose socket is still open from an earlier allocation and may be reused (bound
    /// again without a system call), if the binder keeps such a pool.
    fn parked(&mut self, _family: Family) -> Option<RelayPort> {
        None
    }
}

/// Things the shard must do outside the core.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Ask the control thread to resolve an Actrix identity username.
    ResolveIdentity(Box<[u8]>),
}

/// Why a datagram was dropped without an answer. Counted per shard, never logged per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum DropReason {
    NotStun = 0,
    Malformed,
    BadFingerprint,
    UnexpectedClass,
    NoAllocation,
    NoPermission,
    NoChannel,
    BadIndication,
    PeerDenied,
    AuthPending,
    Draining,
    RateLimited,
    /// Over the allocation's bandwidth cap (`turn.max_bytes_per_sec`).
    Bandwidth,
}

pub const N_DROP_REASONS: usize = 13;

pub const DROP_REASONS: [&str; N_DROP_REASONS] = [
    "not_stun",
    "malformed",
    "bad_fingerprint",
    "unexpected_class",
    "no_allocation",
    "no_permission",
    "no_channel",
    "bad_indication",
    "peer_denied",
    "auth_pending",
    "draining",
    "rate_limited",
    "bandwidth",
];

/// Why an authenticated request was refused (401). Counted by reason; the answer on the wire
/// is the same for all of them (no user-enumeration oracle).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum AuthFailure {
    /// MESSAGE-INTEGRITY with a short-term credential this server cannot know (Binding).
    ShortTerm = 0,
    /// A NONCE that is not ours, tampered, for another address, or from the future.
    Nonce,
    /// A REALM other than ours.
    Realm,
    /// Unknown user, expired or refused credential.
    Credential,
    /// PASSWORD-ALGORITHM SHA-256 for a credential known only by its MD5 key.
    Algorithm,
    /// MESSAGE-INTEGRITY does not verify.
    Integrity,
}

pub const AUTH_FAILURE_REASONS: [&str; 6] = [
    "short_term",
    "nonce",
    "realm",
    "credential",
    "algorithm",
    "integrity",
];

/// Shard-local counters. Plain integers: one owner, published by copying.
#[derive(Debug, Default, Clone)]
pub struct Counters {
    pub client_packets: u64,
    pub client_bytes: u64,
    pub peer_packets: u64,
    pub peer_bytes: u64,
    pub relayed_to_peer: u64,
    pub relayed_to_client: u64,
    pub drops: [u64; N_DROP_REASONS],
    pub binding_requests: u64,
    pub allocations_created: u64,
    pub allocations_expired: u64,
    pub allocations_deleted: u64,
    pub allocations_refused_quota: u64,
    pub allocations_refused_capacity: u64,
    pub permissions_created: u64,
    pub channels_bound: u64,
    pub peers_denied: u64,
    pub auth_challenges: u64,
    pub auth_failures: u64,
    pub auth_failures_by_reason: [u64; 6],
    pub stale_nonces: u64,
    pub error_responses: u64,
}

/// Allocation quotas shared by every shard. Touched on allocate and free only (never per
/// packet); exact under concurrency: the total is a compare-and-swap counter and each user's
/// count is updated under its map entry.
#[derive(Debug)]
pub struct Quotas {
    max_total: AtomicUsize,
    max_per_user: AtomicUsize,
    total: AtomicUsize,
    users: DashMap<Box<[u8]>, usize, ahash::RandomState>,
}

impl Counters {
    fn auth_fail(&mut self, why: AuthFailure) {
        self.auth_failures += 1;
        self.auth_failures_by_reason[why as usize] += 1;
    }
}

impl Quotas {
    pub fn new(max_total: usize, max_per_user: usize) -> Self {
        Quotas {
            max_total: AtomicUsize::new(max_total),
            max_per_user: AtomicUsize::new(max_per_user),
            total: AtomicUsize::new(0),
            users: DashMap::with_hasher(ahash::RandomState::new()),
        }
    }

    /// Change the limits (live reload). Allocations above a lowered limit are kept; new ones
    /// are refused until the count falls below it.
    pub fn set_limits(&self, max_total: usize, max_per_user: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_user.store(max_per_user, Ordering::Relaxed);
    }

    pub fn try_acquire(&self, user: &[u8]) -> bool {
        let max_total = self.max_total.load(Ordering::Relaxed);
        let max_per_user = self.max_per_user.load(Ordering::Relaxed);
        let mut cur = self.total.load(Ordering::Relaxed);
        loop {
            if cur >= max_total {
                return false;
            }
            match self.total.compare_exchange_weak(
                cur,
                cur + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => break,
                Err(v) => cur = v,
            }
        }
        let mut entry = self.users.entry(user.into()).or_insert(0);
        if *entry >= max_per_user {
            drop(entry);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        *entry += 1;
        true
    }

    pub fn release(&self, user: &[u8]) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        let remove = match self.users.get_mut(user) {
            Some(mut n) => {
                *n = n.saturating_sub(1);
                *n == 0
            }
            None => false,
        };
        if remove {
            self.users.remove_if(user, |_, n| *n == 0);
        }
    }

    pub fn total(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// Configuration of one shard's TURN core.
#[derive(Debug, Clone)]
pub struct TurnConfig {
    pub auth: Arc<auth::AuthConfig>,
    pub policy: Arc<PeerPolicy>,
    pub quotas: Arc<Quotas>,
    /// Advertised relay addresses (what XOR-RELAYED-ADDRESS says), one per family available.
    /// Several addresses per family lift the limit of one allocation per port: allocations are
    /// spread over (address, port) pairs, each shard owning the same port slice on every
    /// address.
    pub relay_v4: Vec<IpAddr>,
    pub relay_v6: Vec<IpAddr>,
    /// This shard's slice of the relay port range, inclusive.
    pub port_min: u16,
    pub port_max: u16,
    pub default_lifetime: u32,
    pub max_lifetime: u32,
    pub permission_lifetime: u32,
    pub channel_lifetime: u32,
    pub reservation_lifetime: u32,
    pub max_permissions: usize,
    pub key_cache_capacity: usize,
    /// Highest channel number accepted: 0x4FFF per RFC 8656 §12, or 0x7FFF to accept the
    /// RFC 5766 range that older clients (coturn 4.6's own test client among them) still pick
    /// from.
    pub channel_max: u16,
    /// Per-allocation cap in bytes per second, per direction (client→peer and peer→client);
    /// 0 means no cap. Bursts up to one second's worth are allowed.
    pub max_bytes_per_sec: u64,
    /// 401/438 challenges answered per source IP per second; more are dropped.
    pub challenges_per_source: u32,
    /// Identity resolutions (ECIES decryptions on the control thread) per source IP per second.
    pub identity_lookups_per_source: u32,
}

impl TurnConfig {
    pub fn new(auth: Arc<auth::AuthConfig>, policy: Arc<PeerPolicy>, quotas: Arc<Quotas>) -> Self {
        TurnConfig {
            auth,
            policy,
            quotas,
            relay_v4: vec![IpAddr::from([127, 0, 0, 1])],
            relay_v6: Vec::new(),
            port_min: 49152,
            port_max: 65535,
            default_lifetime: 600,
            max_lifetime: 3600,
            permission_lifetime: 300,
            channel_lifetime: 600,
            reservation_lifetime: 30,
            max_permissions: 256,
            key_cache_capacity: 4096,
            channel_max: channel::MAX,
            max_bytes_per_sec: 0,
            challenges_per_source: 50,
            identity_lookups_per_source: 10,
        }
    }
}

#[derive(Debug, Clone)]
struct Permission {
    ip: IpAddr,
    expires_ms: u64,
}

#[derive(Debug, Clone)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires_ms: u64,
}

#[derive(Debug)]
struct Allocation {
    generation: u32,
    client: ClientKey,
    username: Box<[u8]>,
    /// Unix seconds when the credential expires (REST, identity); checked on every request.
    credential_expires: u64,
    port: RelayPort,
    v4: bool,
    v6: bool,
    expires_ms: u64,
    /// Transaction id of the Allocate that created it, for idempotent retransmissions.
    tid: [u8; 12],
    reservation: Option<u64>,
    permissions: Vec<Permission>,
    channels: Vec<Channel>,
    /// The wheel tick this allocation's timer is armed for.
    armed: u64,
    /// Bandwidth token buckets (bytes), toward the peer and toward the client.
    to_peer: Bucket,
    to_client: Bucket,
}

/// A token bucket refilled from the batch time passed in (no clock read per datagram).
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    tokens: u64,
    last_ms: u64,
}

impl Bucket {
    fn take(&mut self, rate: u64, now_ms: u64, n: usize) -> bool {
        if rate == 0 {
            return true;
        }
        let elapsed = now_ms.saturating_sub(self.last_ms);
        if elapsed > 0 {
            self.tokens = (self.tokens + elapsed.saturating_mul(rate) / 1000).min(rate);
            self.last_ms = now_ms;
        }
        if self.tokens >= n as u64 {
            self.tokens -= n as u64;
            true
        } else {
            false
        }
    }
}

impl Allocation {
    fn permitted(&self, ip: IpAddr, now_ms: u64) -> bool {
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires_ms > now_ms)
    }

    fn has_family(&self, f: Family) -> bool {
        match f {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }

    fn next_deadline(&self) -> u64 {
        let mut d = self.expires_ms;
        for p in &self.permissions {
            d = d.min(p.expires_ms);
        }
        for c in &self.channels {
            d = d.min(c.expires_ms);
        }
        d
    }
}

/// The authenticated context of a request.
#[derive(Clone)]
struct AuthOk {
    key: [u8; 32],
    key_len: usize,
    kind: IntegrityKind,
    expires_at: u64,
}

impl AuthOk {
    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

enum Authn {
    Ok(AuthOk),
    Reply(usize),
    Drop(DropReason),
}

/// Comprehension-required attributes this server understands. DONT-FRAGMENT is deliberately
/// absent: we do not set DF on relayed datagrams, and RFC 8656 §7.2 step 3 says to answer 420
/// in that case.
const KNOWN_REQUIRED: &[u16] = &[
    attr::MAPPED_ADDRESS,
    attr::USERNAME,
    attr::MESSAGE_INTEGRITY,
    attr::ERROR_CODE,
    attr::UNKNOWN_ATTRIBUTES,
    attr::CHANNEL_NUMBER,
    attr::LIFETIME,
    attr::XOR_PEER_ADDRESS,
    attr::DATA,
    attr::REALM,
    attr::NONCE,
    attr::XOR_RELAYED_ADDRESS,
    attr::REQUESTED_ADDRESS_FAMILY,
    attr::EVEN_PORT,
    attr::REQUESTED_TRANSPORT,
    attr::MESSAGE_INTEGRITY_SHA256,
    attr::PASSWORD_ALGORITHM,
    attr::USERHASH,
    attr::XOR_MAPPED_ADDRESS,
    attr::RESERVATION_TOKEN,
    attr::PRIORITY,
    attr::USE_CANDIDATE,
];

/// Upper bounds on text attributes (RFC 8489 §14: REALM and NONCE < 763 bytes). USERNAME is
/// allowed up to 1024 bytes rather than 513 because Actrix identity usernames (base122 of an
/// encrypted token) can exceed the RFC figure (wire reference §6.1).
const MAX_USERNAME: usize = 1024;
const MAX_REALM_NONCE: usize = 763;

const SCRATCH_LEN: usize = 1500;

/// One shard's TURN server state.
pub struct Server {
    cfg: TurnConfig,
    keys: KeyCache,
    allocs: Vec<Option<Allocation>>,
    free_slots: Vec<u32>,
    next_generation: u32,
    by_client: AHashMap<ClientKey, u32>,
    /// Relay port (offset from `port_min`) → allocation slot, `u32::MAX` when free.
    by_port: Vec<u32>,
    port_used: Vec<bool>,
    port_cursor: usize,
    reservations: AHashMap<u64, (RelayPort, u64)>,
    wheel: Wheel,
    fired: Vec<(u64, TimerKey)>,
    events: std::collections::VecDeque<Event>,
    scratch: Box<[u8; SCRATCH_LEN]>,
    rng: u64,
    draining: bool,
    /// 401/438 challenges per source IP per second (reliability checklist A4).
    challenge_limit: auth::RateTable,
    /// Identity resolutions (an ECIES decryption on the control thread) per source IP per
    /// second.
    identity_limit: auth::RateTable,
    /// Time of the datagram being handled (set on entry, never read from a clock).
    now: Now,
    pub counters: Counters,
}

impl Server {
    pub fn new(cfg: TurnConfig, now: Now, seed: u64) -> Self {
        let span = ((cfg.port_max as usize).saturating_sub(cfg.port_min as usize) + 1)
            * cfg.relay_v4.len().max(cfg.relay_v6.len()).max(1);
        let horizon = (cfg.max_lifetime.max(cfg.channel_lifetime) as usize + 64).min(1 << 16);
        let mut s = Server {
            keys: KeyCache::new(cfg.auth.clone(), cfg.key_cache_capacity),
            allocs: Vec::new(),
            free_slots: Vec::new(),
            next_generation: 1,
            by_client: AHashMap::default(),
            by_port: vec![u32::MAX; span],
            port_used: vec![false; span],
            port_cursor: 0,
            reservations: AHashMap::default(),
            wheel: Wheel::new(horizon, now.ms),
            fired: Vec::new(),
            events: Default::default(),
            scratch: Box::new([0u8; SCRATCH_LEN]),
            rng: seed | 1,
            draining: false,
            challenge_limit: auth::RateTable::new(4096, cfg.challenges_per_source),
            identity_limit: auth::RateTable::new(4096, cfg.identity_lookups_per_source),
            now,
            counters: Counters::default(),
            cfg,
        };
        s.port_cursor = (s.next_random() as usize) % span.max(1);
        s
    }

    pub fn config(&self) -> &TurnConfig {
        &self.cfg
    }

    /// Apply a new configuration (live reload). Allocations are kept; the port slice must not
    /// change.
    pub fn reconfigure(&mut self, mut cfg: TurnConfig) {
        cfg.port_min = self.cfg.port_min;
        cfg.port_max = self.cfg.port_max;
        self.keys.reconfigure(cfg.auth.clone());
        self.challenge_limit.set_limit(cfg.challenges_per_source);
        self.identity_limit
            .set_limit(cfg.identity_lookups_per_source);
        self.cfg = cfg;
    }

    pub fn scratch(&self) -> &[u8] {
        &self.scratch[..]
    }

    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// Stop granting new allocations (shutdown drain); existing ones keep working.
    pub fn set_draining(&mut self, on: bool) {
        self.draining = on;
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When the core next needs [`Server::handle_timeout`], in monotonic ms.
    pub fn poll_timeout(&self) -> u64 {
        self.wheel.next_tick_ms()
    }

    pub fn handle_identity_answer(&mut self, a: auth::IdentityAnswer, now: Now) {
        self.keys.handle_identity_answer(a, now.unix);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: cheap, per shard, seeded from the OS; used for transaction ids of
        // indications, port selection and reservation tokens (the latter also MAC-free but
        // only meaningful together with a valid credential).
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn drop(&mut self, why: DropReason) -> Option<Transmit> {
        self.counters.drops[why as usize] += 1;
        None
    }

    // ----------------------------------------------------------------------------------------
    // Client side
    // ----------------------------------------------------------------------------------------

    /// A datagram from a client arrived on listener `listener`. `buf[range]` holds it.
    pub fn handle_client(
        &mut self,
        now: Now,
        listener: u8,
        from: SocketAddr,
        buf: &mut [u8],
        range: Range<usize>,
        binder: &mut dyn RelayBinder,
    ) -> Option<Transmit> {
        self.now = now;
        self.counters.client_packets += 1;
        self.counters.client_bytes += range.len() as u64;
        let client = ClientKey {
            listener,
            addr: from,
        };
        let data = &buf[range.clone()];
        match data.first().map(|b| b >> 6) {
            Some(0) => self.handle_stun(now, client, &buf[range.clone()], range.start, binder),
            Some(1) => self.handle_channel_data(now, client, data, range.start),
            _ => self.drop(DropReason::NotStun),
        }
    }

    /// RFC 8656 §12.6: ChannelData from the client is relayed to the bound peer.
    fn handle_channel_data(
        &mut self,
        now: Now,
        client: ClientKey,
        data: &[u8],
        start: usize,
    ) -> Option<Transmit> {
        let (ch, len) = match channel::parse_range(data, self.cfg.channel_max) {
            Ok(v) => v,
            Err(_) => return self.drop(DropReason::Malformed),
        };
        let Some(&slot) = self.by_client.get(&client) else {
            return self.drop(DropReason::NoAllocation);
        };
        let rate = self.cfg.max_bytes_per_sec;
        let a = self.allocs[slot as usize]
            .as_mut()
            .expect("indexed slot is live");
        let Some(c) = a
            .channels
            .iter()
            .find(|c| c.number == ch && c.expires_ms > now.ms)
        else {
            return self.drop(DropReason::NoChannel);
        };
        let peer = c.peer;
        if !a.permitted(peer.ip(), now.ms) {
            return self.drop(DropReason::NoPermission);
        }
        if !a.to_peer.take(rate, now.ms, len) {
            return self.drop(DropReason::Bandwidth);
        }
        let port = a.port;
        self.counters.relayed_to_peer += 1;
        Some(Transmit {
            src: Src::Relay(Family::of(&peer), port),
            dst: peer,
            data: Data::Buf(start + 4..start + 4 + len),
        })
    }

    fn handle_stun(
        &mut self,
        now: Now,
        client: ClientKey,
        data: &[u8],
        start: usize,
        binder: &mut dyn RelayBinder,
    ) -> Option<Transmit> {
        let msg = match Message::parse(data) {
            Ok(m) => m,
            Err(stun::DecodeError::BadFingerprint) => return self.drop(DropReason::BadFingerprint),
            Err(_) => return self.drop(DropReason::Malformed),
        };
        match msg.class() {
            Class::Request => {}
            Class::Indication if msg.method() == method::SEND => {
                return self.handle_send(now, client, &msg, start)
            }
            _ => return self.drop(DropReason::UnexpectedClass),
        }
        let reply = match msg.method() {
            // A Binding that carries MESSAGE-INTEGRITY must verify (RFC 8489 §9.1.3, §9.2.4):
            // long-term credentials (REALM present) go through authentication; a short-term
            // credential cannot be known here, so it gets 401 and never a success.
            method::BINDING if msg.has_integrity() && msg.get(attr::REALM).is_some() => self
                .with_auth(now, client, &msg, |s, ok| {
                    s.binding_success(&msg, client, Some(ok))
                }),
            method::BINDING if msg.has_integrity() => {
                self.counters.auth_fail(AuthFailure::ShortTerm);
                Ok(self.error_reply(&msg, code::UNAUTHORIZED, None))
            }
            method::BINDING => self.handle_binding(&msg, client),
            method::ALLOCATE => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_allocate(now, client, &msg, ok, binder)
            }),
            method::REFRESH => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_refresh(now, client, &msg, ok, binder)
            }),
            method::CREATE_PERMISSION => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_create_permission(now, client, &msg, ok)
            }),
            method::CHANNEL_BIND => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_channel_bind(now, client, &msg, ok)
            }),
            _ => {
                // RFC 8489 §6.3.1: an unknown method in a request gets 400.
                Ok(self.error_reply(&msg, code::BAD_REQUEST, None))
            }
        };
        match reply {
            Ok(0) => None,
            Ok(n) => Some(Transmit {
                src: Src::Listener(client.listener),
                dst: client.addr,
                data: Data::Scratch(n),
            }),
            Err(why) => self.drop(why),
        }
    }

    fn unknown_required(msg: &Message<'_>, out: &mut [u16; 16]) -> usize {
        let mut n = 0;
        for t in msg.attr_types() {
            if t < 0x8000 && !KNOWN_REQUIRED.contains(&t) && n < out.len() && !out[..n].contains(&t)
            {
                out[n] = t;
                n += 1;
            }
        }
        n
    }

    /// RFC 8489 §7.3.1: Binding needs no authentication. The answer carries only
    /// XOR-MAPPED-ADDRESS (and FINGERPRINT when the request had one): no SOFTWARE, no
    /// reason phrase, nothing that makes the response larger than needed.
    fn handle_binding(
        &mut self,
        msg: &Message<'_>,
        client: ClientKey,
    ) -> Result<usize, DropReason> {
        self.counters.binding_requests += 1;
        let mut unknown = [0u16; 16];
        let n = Self::unknown_required(msg, &mut unknown);
        if n > 0 {
            return Ok(
                self.error_reply_with(msg, code::UNKNOWN_ATTRIBUTE, None, |w| {
                    w.add_unknown_attributes(&unknown[..n])
                }),
            );
        }
        Ok(self.binding_success(msg, client, None))
    }

    /// XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY when the request was authenticated, FINGERPRINT
    /// when the request had one.
    fn binding_success(
        &mut self,
        msg: &Message<'_>,
        client: ClientKey,
        ok: Option<&AuthOk>,
    ) -> usize {
        match ok {
            Some(ok) => self.success_reply(msg, ok, |w| {
                w.add_xor_addr(attr::XOR_MAPPED_ADDRESS, client.addr)
            }),
            None => {
                let fp = msg.has_fingerprint();
                let Ok(mut w) = MessageWriter::new(
                    &mut self.scratch[..],
                    method::BINDING,
                    Class::Success,
                    msg.transaction_id(),
                ) else {
                    return 0;
                };
                let r = (|| {
                    w.add_xor_addr(attr::XOR_MAPPED_ADDRESS, client.addr)?;
                    if fp {
                        w.add_fingerprint()?;
                    }
                    Ok::<_, stun::BufferFull>(w.finish())
                })();
                r.unwrap_or(0)
            }
        }
    }

    // ----------------------------------------------------------------------------------------
    // Authentication (RFC 8489 §9.2.4)
    // ----------------------------------------------------------------------------------------

    fn with_auth(
        &mut self,
        now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        f: impl FnOnce(&mut Self, &AuthOk) -> usize,
    ) -> Result<usize, DropReason> {
        match self.authenticate(now, client, msg) {
            Authn::Ok(ok) => {
                let mut unknown = [0u16; 16];
                let n = Self::unknown_required(msg, &mut unknown);
                if n > 0 {
                    return Ok(self.error_reply_with(
                        msg,
                        code::UNKNOWN_ATTRIBUTE,
                        Some(&ok),
                        |w| w.add_unknown_attributes(&unknown[..n]),
                    ));
                }
                Ok(f(self, &ok))
            }
            Authn::Reply(n) => Ok(n),
            Authn::Drop(d) => Err(d),
        }
    }

    fn authenticate(&mut self, now: Now, client: ClientKey, msg: &Message<'_>) -> Authn {
        // Step 1: no integrity at all → 401 with REALM and NONCE. Nothing is stored.
        if !msg.has_integrity() {
            self.counters.auth_challenges += 1;
            return Authn::Reply(self.challenge(msg, client, code::UNAUTHORIZED));
        }
        // Step 2: integrity without USERNAME, REALM or NONCE → 400.
        let (Some(username), Some(realm), Some(nonce)) = (
            msg.get(attr::USERNAME),
            msg.get(attr::REALM),
            msg.get(attr::NONCE),
        ) else {
            return Authn::Reply(self.error_reply(msg, code::BAD_REQUEST, None));
        };
        if username.len() > MAX_USERNAME
            || realm.len() > MAX_REALM_NONCE
            || nonce.len() > MAX_REALM_NONCE
        {
            return Authn::Reply(self.error_reply(msg, code::BAD_REQUEST, None));
        }
        // PASSWORD-ALGORITHM (RFC 8489 §9.2.4 step 2): MD5 or SHA-256 with no parameters.
        let algorithm = match msg.get(attr::PASSWORD_ALGORITHM) {
            None => PasswordAlgorithm::Md5,
            Some([0, 1, 0, 0]) => PasswordAlgorithm::Md5,
            Some([0, 2, 0, 0]) => PasswordAlgorithm::Sha256,
            Some(_) => return Authn::Reply(self.error_reply(msg, code::BAD_REQUEST, None)),
        };
        // Step 3: the nonce must be ours, for this client, and fresh.
        let cfg = self.keys.config();
        match auth::check_nonce(
            &cfg.nonce_key,
            cfg.nonce_lifetime,
            nonce,
            now.unix,
            client.addr,
        ) {
            NonceCheck::Valid => {}
            NonceCheck::Stale => {
                self.counters.stale_nonces += 1;
                return Authn::Reply(self.challenge(msg, client, code::STALE_NONCE));
            }
            NonceCheck::Invalid => {
                self.counters.auth_fail(AuthFailure::Nonce);
                return Authn::Reply(self.challenge(msg, client, code::UNAUTHORIZED));
            }
        }
        if realm != cfg.realm.as_bytes() {
            self.counters.auth_fail(AuthFailure::Realm);
            return Authn::Reply(self.challenge(msg, client, code::UNAUTHORIZED));
        }
        // Step 4: find the key. An unknown user gets the same 401 as a wrong password.
        let cred = match self.keys.lookup(username, now.unix) {
            Lookup::Found(c) => c,
            Lookup::Refused => {
                self.counters.auth_fail(AuthFailure::Credential);
                return Authn::Reply(self.challenge(msg, client, code::UNAUTHORIZED));
            }
            Lookup::Pending => {
                if !self.identity_limit.allow(client.addr.ip(), now.unix) {
                    return Authn::Drop(DropReason::RateLimited);
                }
                if self.keys.mark_pending(username, now.unix) && self.events.len() < 1024 {
                    self.events
                        .push_back(Event::ResolveIdentity(username.into()));
                }
                return Authn::Drop(DropReason::AuthPending);
            }
        };
        let kind = msg.integrity_kind().expect("checked has_integrity");
        let mut ok = match Self::auth_ok(&cred.key, algorithm, kind, cred.expires_at) {
            Some(ok) => ok,
            None => {
                self.counters.auth_fail(AuthFailure::Algorithm);
                return Authn::Reply(self.challenge(msg, client, code::UNAUTHORIZED));
            }
        };
        // Step 5: verify the MAC (constant time).
        let mut cred = cred;
        if !msg.verify_integrity(ok.key()) {
            let mut matched = None;
            if cred.kind == auth::CredentialKind::Rest {
                for alt in self.keys.rest_alternates(username) {
                    if let Some(alt_ok) = Self::auth_ok(&alt, algorithm, kind, cred.expires_at) {
                        if msg.verify_integrity(alt_ok.key()) {
                            matched = Some((alt, alt_ok));
                            break;
                        }
                    }
                }
            }
            match matched {
                Some((alt, alt_ok)) => {
                    cred.key = alt;
                    ok = alt_ok;
                }
                None => {
                    self.counters.auth_fail(AuthFailure::Integrity);
                    return Authn::Reply(self.challenge(msg, client, code::UNAUTHORIZED));
                }
            }
        }
        self.keys.remember(username, &cred);
        Authn::Ok(ok)
    }

    fn auth_ok(
        key: &UserKey,
        algorithm: PasswordAlgorithm,
        kind: IntegrityKind,
        expires_at: u64,
    ) -> Option<AuthOk> {
        let mut k = [0u8; 32];
        let key_len = match algorithm {
            PasswordAlgorithm::Md5 => {
                k[..16].copy_from_slice(&key.md5);
                16
            }
            PasswordAlgorithm::Sha256 => {
                k.copy_from_slice(key.sha256.as_ref()?);
                32
            }
        };
        Some(AuthOk {
            key: k,
            key_len,
            kind,
            expires_at,
        })
    }

    /// 401 or 438 with REALM and a fresh NONCE (no MESSAGE-INTEGRITY: we have no key yet).
    /// Over the per-source limit nothing is sent (length 0 means "drop").
    fn challenge(&mut self, msg: &Message<'_>, client: ClientKey, code: u16) -> usize {
        if !self.challenge_limit.allow(client.addr.ip(), self.now.unix) {
            self.counters.drops[DropReason::RateLimited as usize] += 1;
            return 0;
        }
        let cfg = self.keys.config();
        let nonce = auth::make_nonce(&cfg.nonce_key, self.now.unix, client.addr);
        let realm_len = cfg.realm.len().min(MAX_REALM_NONCE);
        let mut realm = [0u8; MAX_REALM_NONCE];
        realm[..realm_len].copy_from_slice(&cfg.realm.as_bytes()[..realm_len]);
        self.error_reply_with(msg, code, None, |w| {
            w.add(attr::REALM, &realm[..realm_len])?;
            w.add(attr::NONCE, &nonce)
        })
    }

    fn error_reply(&mut self, msg: &Message<'_>, code: u16, ok: Option<&AuthOk>) -> usize {
        self.error_reply_with(msg, code, ok, |_| Ok(()))
    }

    fn error_reply_with(
        &mut self,
        msg: &Message<'_>,
        code: u16,
        ok: Option<&AuthOk>,
        extra: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), stun::BufferFull>,
    ) -> usize {
        self.counters.error_responses += 1;
        let fp = msg.has_fingerprint();
        let mut w = match MessageWriter::new(
            &mut self.scratch[..],
            msg.method(),
            Class::Error,
            msg.transaction_id(),
        ) {
            Ok(w) => w,
            Err(_) => return 0,
        };
        let r = (|| {
            w.add_error(code)?;
            extra(&mut w)?;
            if let Some(ok) = ok {
                w.add_integrity_kind(ok.kind, ok.key())?;
            }
            if fp {
                w.add_fingerprint()?;
            }
            Ok::<_, stun::BufferFull>(())
        })();
        match r {
            Ok(()) => w.finish(),
            Err(_) => 0,
        }
    }

    fn success_reply(
        &mut self,
        msg: &Message<'_>,
        ok: &AuthOk,
        body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), stun::BufferFull>,
    ) -> usize {
        let fp = msg.has_fingerprint();
        let mut w = match MessageWriter::new(
            &mut self.scratch[..],
            msg.method(),
            Class::Success,
            msg.transaction_id(),
        ) {
            Ok(w) => w,
            Err(_) => return 0,
        };
        let r = (|| {
            body(&mut w)?;
            w.add_integrity_kind(ok.kind, ok.key())?;
            if fp {
                w.add_fingerprint()?;
            }
            Ok::<_, stun::BufferFull>(())
        })();
        match r {
            Ok(()) => w.finish(),
            Err(_) => 0,
        }
    }

    // ----------------------------------------------------------------------------------------
    // Allocate (RFC 8656 §7.2)
    // ----------------------------------------------------------------------------------------

    fn handle_allocate(
        &mut self,
        now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        ok: &AuthOk,
        binder: &mut dyn RelayBinder,
    ) -> usize {
        // Step 2: an existing allocation on this 5-tuple. A retransmission of the request that
        // created it gets the same success again; anything else is 437.
        if let Some(&slot) = self.by_client.get(&client) {
            let a = self.allocs[slot as usize].as_ref().expect("live");
            if &a.tid == msg.transaction_id() {
                return self.allocate_success(now, msg, ok, slot);
            }
            return self.error_reply(msg, code::ALLOCATION_MISMATCH, Some(ok));
        }
        if self.draining {
            self.counters.allocations_refused_capacity += 1;
            return self.error_reply(msg, code::INSUFFICIENT_CAPACITY, Some(ok));
        }
        // Step 3: REQUESTED-TRANSPORT must be present (400) and UDP (442).
        match msg.get(attr::REQUESTED_TRANSPORT) {
            None => return self.error_reply(msg, code::BAD_REQUEST, Some(ok)),
            Some(v) if v.len() != 4 => return self.error_reply(msg, code::BAD_REQUEST, Some(ok)),
            Some(v) if v[0] != 17 => {
                return self.error_reply(msg, code::UNSUPPORTED_TRANSPORT, Some(ok))
            }
            Some(_) => {}
        }
        let token = msg.get(attr::RESERVATION_TOKEN);
        let even = msg.get(attr::EVEN_PORT);
        let requested = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        let additional = msg.get(attr::ADDITIONAL_ADDRESS_FAMILY);
        // Step 5: RESERVATION-TOKEN excludes EVEN-PORT and REQUESTED-ADDRESS-FAMILY (400).
        if token.is_some() && (even.is_some() || requested.is_some() || additional.is_some()) {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        if matches!(token, Some(t) if t.len() != 8) || matches!(even, Some(e) if e.len() != 1) {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        // Address families (RFC 8656 §7.2 step 6/7 and §18.11).
        let (mut want_v4, mut want_v6) = (true, false);
        if let Some(r) = requested {
            if requested.is_some() && additional.is_some() {
                return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
            }
            match r {
                [1, 0, 0, 0] => {}
                [2, 0, 0, 0] => {
                    want_v4 = false;
                    want_v6 = true;
                }
                _ => return self.error_reply(msg, code::ADDRESS_FAMILY_NOT_SUPPORTED, Some(ok)),
            }
            if (want_v4 && self.cfg.relay_v4.is_empty())
                || (want_v6 && self.cfg.relay_v6.is_empty())
            {
                return self.error_reply(msg, code::ADDRESS_FAMILY_NOT_SUPPORTED, Some(ok));
            }
        }
        let mut v6_error = false;
        if let Some(a) = additional {
            // Only IPv6 may be requested as the additional family.
            if a != [2, 0, 0, 0] {
                return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
            }
            if !self.cfg.relay_v6.is_empty() {
                want_v6 = true;
            } else {
                v6_error = true;
            }
        }
        if want_v4 && self.cfg.relay_v4.is_empty() {
            // No IPv4 relay address on this node: default to IPv6 when available.
            if !self.cfg.relay_v6.is_empty() && requested.is_none() {
                want_v4 = false;
                want_v6 = true;
            } else {
                return self.error_reply(msg, code::ADDRESS_FAMILY_NOT_SUPPORTED, Some(ok));
            }
        }
        let username = msg.get(attr::USERNAME).expect("authenticated");
        // Step 8: quotas, counted by username (never by IP).
        if !self.cfg.quotas.try_acquire(username) {
            self.counters.allocations_refused_quota += 1;
            return self.error_reply(msg, code::ALLOCATION_QUOTA_REACHED, Some(ok));
        }
        // Pick the relay port.
        let mut reservation_token = None;
        let port = if let Some(t) = token {
            let t = u64::from_be_bytes(t.try_into().expect("length checked"));
            match self.reservations.remove(&t) {
                Some((p, exp)) if exp > now.ms => {
                    // The reserved port was held in `port_used`; bind it now.
                    if self.bind_port(p, want_v4, want_v6, binder) {
                        Some(p)
                    } else {
                        self.release_port(p);
                        None
                    }
                }
                Some((p, _)) => {
                    self.release_port(p);
                    None
                }
                None => None,
            }
        } else {
            let reserve = matches!(even, Some(e) if e[0] & 0x80 != 0);
            let p = self.find_port(even.is_some(), reserve, want_v4, want_v6, binder);
            if let (Some(p), true) = (p, reserve) {
                let t = self.next_random();
                let next = RelayPort::new(p.addr, p.port + 1);
                let i = self.port_index(next);
                self.port_used[i] = true;
                let exp = now.ms + self.cfg.reservation_lifetime as u64 * 1000;
                self.reservations.insert(t, (next, exp));
                self.wheel.insert(exp, TimerKey::Reservation { token: t });
                reservation_token = Some(t);
            }
            p
        };
        let Some(port) = port else {
            self.cfg.quotas.release(username);
            self.counters.allocations_refused_capacity += 1;
            return self.error_reply(msg, code::INSUFFICIENT_CAPACITY, Some(ok));
        };
        let lifetime = self.clamp_lifetime(msg.get_u32(attr::LIFETIME), false);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let alloc = Allocation {
            generation,
            client,
            username: username.into(),
            credential_expires: ok.expires_at,
            port,
            v4: want_v4,
            v6: want_v6,
            expires_ms: now.ms + lifetime as u64 * 1000,
            tid: *msg.transaction_id(),
            reservation: reservation_token,
            permissions: Vec::new(),
            channels: Vec::new(),
            armed: 0,
            to_peer: Bucket {
                tokens: self.cfg.max_bytes_per_sec,
                last_ms: now.ms,
            },
            to_client: Bucket {
                tokens: self.cfg.max_bytes_per_sec,
                last_ms: now.ms,
            },
        };
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.allocs[s as usize] = Some(alloc);
                s
            }
            None => {
                self.allocs.push(Some(alloc));
                (self.allocs.len() - 1) as u32
            }
        };
        self.by_client.insert(client, slot);
        let pi = self.port_index(port);
        self.by_port[pi] = slot;
        self.cfg.policy.relay_ports.set(port.addr, port.port, true);
        self.arm(slot);
        self.counters.allocations_created += 1;
        self.allocate_success_ext(now, msg, ok, slot, v6_error)
    }

    fn allocate_success(&mut self, now: Now, msg: &Message<'_>, ok: &AuthOk, slot: u32) -> usize {
        self.allocate_success_ext(now, msg, ok, slot, false)
    }

    fn allocate_success_ext(
        &mut self,
        now: Now,
        msg: &Message<'_>,
        ok: &AuthOk,
        slot: u32,
        v6_error: bool,
    ) -> usize {
        let a = self.allocs[slot as usize].as_ref().expect("live");
        let (ai, port) = (a.port.addr as usize, a.port.port);
        let v4 =
            a.v4.then(|| self.cfg.relay_v4.get(ai))
                .flatten()
                .map(|ip| SocketAddr::new(*ip, port));
        let v6 =
            a.v6.then(|| self.cfg.relay_v6.get(ai))
                .flatten()
                .map(|ip| SocketAddr::new(*ip, port));
        let remaining = (a.expires_ms.saturating_sub(now.ms) / 1000) as u32;
        let token = a.reservation;
        let mapped = a.client.addr;
        self.success_reply(msg, ok, |w| {
            if let Some(r) = v4 {
                w.add_xor_addr(attr::XOR_RELAYED_ADDRESS, r)?;
            }
            if let Some(r) = v6 {
                w.add_xor_addr(attr::XOR_RELAYED_ADDRESS, r)?;
            }
            if v6_error {
                // ADDRESS-ERROR-CODE: family 0x02, then the ERROR-CODE layout (RFC 8656 §18.12).
                w.add(attr::ADDRESS_ERROR_CODE, &[2, 0, 4, 40])?;
            }
            w.add_u32(attr::LIFETIME, remaining)?;
            if let Some(t) = token {
                w.add(attr::RESERVATION_TOKEN, &t.to_be_bytes())?;
            }
            w.add_xor_addr(attr::XOR_MAPPED_ADDRESS, mapped)
        })
    }

    /// RFC 8656 §7.2 step 9 and §8: lifetimes below the default get the default, above the
    /// maximum get the maximum. In a Refresh, 0 means delete and is returned as is.
    fn clamp_lifetime(&self, requested: Option<u32>, refresh: bool) -> u32 {
        match requested {
            Some(0) if refresh => 0,
            Some(l) => l.clamp(
                self.cfg.default_lifetime.min(self.cfg.max_lifetime),
                self.cfg.max_lifetime,
            ),
            None => self.cfg.default_lifetime.min(self.cfg.max_lifetime),
        }
    }

    fn find_port(
        &mut self,
        even: bool,
        reserve_next: bool,
        v4: bool,
        v6: bool,
        binder: &mut dyn RelayBinder,
    ) -> Option<RelayPort> {
        let total = self.port_used.len();
        let span = self.port_span();
        // Addresses usable for this family mix: dual-stack allocations need index i in both.
        let n_addr = match (v4, v6) {
            (true, true) => self.cfg.relay_v4.len().min(self.cfg.relay_v6.len()),
            (true, false) => self.cfg.relay_v4.len(),
            (false, true) => self.cfg.relay_v6.len(),
            (false, false) => 0,
        };
        // A single-family allocation without EVEN-PORT first tries a socket the binder kept
        // open from an earlier allocation (no socket, bind and close per allocation).
        if !even && !reserve_next && v4 != v6 {
            let family = if v4 { Family::V4 } else { Family::V6 };
            if let Some(port) = binder.parked(family) {
                let idx = self.port_index(port);
                if (port.addr as usize) < n_addr && idx < total && !self.port_used[idx] {
                    self.port_used[idx] = true;
                    if self.bind_port(port, v4, v6, binder) {
                        return Some(port);
                    }
                    self.port_used[idx] = false;
                }
            }
        }
        let mut bind_failures = 0;
        for i in 0..total {
            let idx = (self.port_cursor + i) % total;

            let (ai, off) = (idx / span, idx % span);
            let p = self.cfg.port_min as usize + off;
            if ai >= n_addr || self.port_used[idx] || (even && !p.is_multiple_of(2)) {
                continue;
            }
            if reserve_next && (off + 1 >= span || self.port_used[idx + 1]) {
                continue;
            }
            let port = RelayPort::new(ai as u8, p as u16);
            self.port_used[idx] = true;
            if self.bind_port(port, v4, v6, binder) {
                self.port_cursor = (idx + 1) % total;
                return Some(port);
            }
            self.port_used[idx] = false;
            bind_failures += 1;
            if bind_failures >= 64 {
                break;
            }
        }
        None
    }

    fn bind_port(
        &mut self,
        port: RelayPort,
        v4: bool,
        v6: bool,
        binder: &mut dyn RelayBinder,
    ) -> bool {
        if v4 && !binder.bind(Family::V4, port) {
            return false;
        }
        if v6 && !binder.bind(Family::V6, port) {
            if v4 {
                binder.unbind(Family::V4, port);
            }
            return false;
        }
        true
    }

    fn release_port(&mut self, port: RelayPort) {
        let i = self.port_index(port);
        if let Some(u) = self.port_used.get_mut(i) {
            *u = false;
        }
    }

    fn port_span(&self) -> usize {
        (self.cfg.port_max - self.cfg.port_min) as usize + 1
    }

    /// Position of a relay (address, port) in the per-shard tables.
    fn port_index(&self, p: RelayPort) -> usize {
        p.addr as usize * self.port_span() + p.port.wrapping_sub(self.cfg.port_min) as usize
    }

    // ----------------------------------------------------------------------------------------
    // Refresh (RFC 8656 §8), CreatePermission (§9), ChannelBind (§12)
    // ----------------------------------------------------------------------------------------

    /// Common checks: an allocation on this 5-tuple (437) made by this user (441).
    fn owned_allocation(
        &mut self,
        client: ClientKey,
        msg: &Message<'_>,
        ok: &AuthOk,
    ) -> Result<u32, usize> {
        let Some(&slot) = self.by_client.get(&client) else {
            return Err(self.error_reply(msg, code::ALLOCATION_MISMATCH, Some(ok)));
        };
        let a = self.allocs[slot as usize].as_ref().expect("live");
        let username = msg.get(attr::USERNAME).unwrap_or_default();
        if *a.username != *username {
            return Err(self.error_reply(msg, code::WRONG_CREDENTIALS, Some(ok)));
        }
        Ok(slot)
    }

    fn handle_refresh(
        &mut self,
        now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        ok: &AuthOk,
        binder: &mut dyn RelayBinder,
    ) -> usize {
        let slot = match self.owned_allocation(client, msg, ok) {
            Ok(s) => s,
            Err(n) => return n,
        };
        if let Some(r) = msg.get(attr::REQUESTED_ADDRESS_FAMILY) {
            let fam = match r {
                [1, 0, 0, 0] => Family::V4,
                [2, 0, 0, 0] => Family::V6,
                _ => return self.error_reply(msg, code::ADDRESS_FAMILY_NOT_SUPPORTED, Some(ok)),
            };
            if !self.allocs[slot as usize]
                .as_ref()
                .expect("live")
                .has_family(fam)
            {
                return self.error_reply(msg, code::PEER_ADDRESS_FAMILY_MISMATCH, Some(ok));
            }
        }
        let lifetime = self.clamp_lifetime(msg.get_u32(attr::LIFETIME), true);
        if lifetime == 0 {
            self.free_allocation(slot, binder);
            self.counters.allocations_deleted += 1;
        } else {
            let a = self.allocs[slot as usize].as_mut().expect("live");
            a.expires_ms = now.ms + lifetime as u64 * 1000;
            a.credential_expires = ok.expires_at;
            self.arm(slot);
        }
        self.success_reply(msg, ok, |w| w.add_u32(attr::LIFETIME, lifetime))
    }

    /// Validate a peer address for this allocation: family (443) and policy (403).
    fn check_peer(&mut self, slot: u32, peer: SocketAddr) -> Result<(), u16> {
        let a = self.allocs[slot as usize].as_ref().expect("live");
        if !a.has_family(Family::of(&peer)) {
            return Err(code::PEER_ADDRESS_FAMILY_MISMATCH);
        }
        match self.cfg.policy.check(peer) {
            Ok(()) => Ok(()),
            Err(
                Denied::DenyRange
                | Denied::ServicePort
                | Denied::Special
                | Denied::Tunnel
                | Denied::PortZero,
            ) => {
                self.counters.peers_denied += 1;
                Err(code::FORBIDDEN)
            }
        }
    }

    fn handle_create_permission(
        &mut self,
        now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        ok: &AuthOk,
    ) -> usize {
        let slot = match self.owned_allocation(client, msg, ok) {
            Ok(s) => s,
            Err(n) => return n,
        };
        // RFC 8656 §9.2: at least one XOR-PEER-ADDRESS; every one must be acceptable before
        // any permission is installed (all or nothing).
        let mut peers = [None::<SocketAddr>; 16];
        let mut n = 0;
        for v in msg.get_all(attr::XOR_PEER_ADDRESS) {
            let Ok(p) = stun::decode_xor_addr(v, msg.transaction_id()) else {
                return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
            };
            if n == peers.len() {
                return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
            }
            peers[n] = Some(p);
            n += 1;
        }
        if n == 0 {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        // Policy is judged on the full address (port included: own service ports), the
        // permission itself is per IP (RFC 8656 §9).
        for p in peers[..n].iter().flatten() {
            if let Err(c) = self.check_peer(slot, *p) {
                return self.error_reply(msg, c, Some(ok));
            }
        }
        let lifetime_ms = self.cfg.permission_lifetime as u64 * 1000;
        let max = self.cfg.max_permissions;
        let a = self.allocs[slot as usize].as_mut().expect("live");
        let new = peers[..n]
            .iter()
            .flatten()
            .filter(|p| !a.permissions.iter().any(|x| x.ip == p.ip()))
            .count();
        if a.permissions.len() + new > max {
            return self.error_reply(msg, code::INSUFFICIENT_CAPACITY, Some(ok));
        }
        for p in peers[..n].iter().flatten() {
            install_permission(a, p.ip(), now.ms + lifetime_ms);
        }
        self.counters.permissions_created += n as u64;
        self.arm(slot);
        self.success_reply(msg, ok, |_| Ok(()))
    }

    fn handle_channel_bind(
        &mut self,
        now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        ok: &AuthOk,
    ) -> usize {
        let slot = match self.owned_allocation(client, msg, ok) {
            Ok(s) => s,
            Err(n) => return n,
        };
        // RFC 8656 §11.2: CHANNEL-NUMBER in 0x4000-0x4FFF and an XOR-PEER-ADDRESS, else 400.
        let number = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return self.error_reply(msg, code::BAD_REQUEST, Some(ok)),
        };
        if !(channel::MIN..=self.cfg.channel_max).contains(&number) {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        let peer = match msg.get_xor_addr(attr::XOR_PEER_ADDRESS) {
            Some(Ok(p)) => p,
            _ => return self.error_reply(msg, code::BAD_REQUEST, Some(ok)),
        };
        if let Err(c) = self.check_peer(slot, peer) {
            return self.error_reply(msg, c, Some(ok));
        }
        let a = self.allocs[slot as usize].as_mut().expect("live");
        // The channel is not bound to a different peer, and the peer not to a different
        // channel (RFC 8656 §11.2 bullets 3 and 4).
        let chan_elsewhere = a
            .channels
            .iter()
            .any(|c| c.number == number && c.peer != peer);
        let peer_elsewhere = a
            .channels
            .iter()
            .any(|c| c.peer == peer && c.number != number);
        if chan_elsewhere || peer_elsewhere {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        let ch_exp = now.ms + self.cfg.channel_lifetime as u64 * 1000;
        let perm_exp = now.ms + self.cfg.permission_lifetime as u64 * 1000;
        let is_new_perm = !a.permissions.iter().any(|p| p.ip == peer.ip());
        if is_new_perm && a.permissions.len() >= self.cfg.max_permissions {
            return self.error_reply(msg, code::INSUFFICIENT_CAPACITY, Some(ok));
        }
        match a.channels.iter_mut().find(|c| c.number == number) {
            Some(c) => c.expires_ms = ch_exp,
            None => a.channels.push(Channel {
                number,
                peer,
                expires_ms: ch_exp,
            }),
        }
        // A channel binding also installs or refreshes the permission for the peer.
        install_permission(a, peer.ip(), perm_exp);
        self.counters.channels_bound += 1;
        self.arm(slot);
        self.success_reply(msg, ok, |_| Ok(()))
    }

    /// RFC 8656 §10.2: a Send indication is relayed only with a permission; otherwise (and on
    /// any malformation) it is dropped silently.
    fn handle_send(
        &mut self,
        now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        start: usize,
    ) -> Option<Transmit> {
        let Some(&slot) = self.by_client.get(&client) else {
            return self.drop(DropReason::NoAllocation);
        };
        let mut unknown = [0u16; 16];
        if Self::unknown_required(msg, &mut unknown) > 0 {
            return self.drop(DropReason::BadIndication);
        }
        // First XOR-PEER-ADDRESS wins; a second one is never acted on.
        let Some(Ok(peer)) = msg.get_xor_addr(attr::XOR_PEER_ADDRESS) else {
            return self.drop(DropReason::BadIndication);
        };
        let Some(range) = msg.value_range(attr::DATA) else {
            return self.drop(DropReason::BadIndication);
        };
        let a = self.allocs[slot as usize].as_ref().expect("live");
        if !a.has_family(Family::of(&peer)) {
            return self.drop(DropReason::BadIndication);
        }
        if !a.permitted(peer.ip(), now.ms) {
            return self.drop(DropReason::NoPermission);
        }
        // The permission was policy-checked when installed, but the port was not: a Send to
        // one of our own service ports on a permitted IP is refused here.
        if self.cfg.policy.check(peer).is_err() {
            self.counters.peers_denied += 1;
            return self.drop(DropReason::PeerDenied);
        }
        let rate = self.cfg.max_bytes_per_sec;
        let a = self.allocs[slot as usize].as_mut().expect("live");
        if !a.to_peer.take(rate, now.ms, range.len()) {
            return self.drop(DropReason::Bandwidth);
        }
        let port = a.port;
        self.counters.relayed_to_peer += 1;
        // `range` is relative to the message, which starts at `start` in the caller's buffer.
        Some(Transmit {
            src: Src::Relay(Family::of(&peer), port),
            dst: peer,
            data: Data::Buf(start + range.start..start + range.end),
        })
    }

    // ----------------------------------------------------------------------------------------
    // Peer side (RFC 8656 §10.3, §12.6)
    // ----------------------------------------------------------------------------------------

    /// A datagram from `from` arrived on relay socket (`family`, `port`). The payload is
    /// `buf[range]`, with at least [`HEADROOM`] bytes before it and [`TAILROOM`] after it.
    pub fn handle_peer(
        &mut self,
        now: Now,
        family: Family,
        port: RelayPort,
        from: SocketAddr,
        buf: &mut [u8],
        range: Range<usize>,
    ) -> Option<Transmit> {
        self.counters.peer_packets += 1;
        self.counters.peer_bytes += range.len() as u64;
        if port.port < self.cfg.port_min || port.port > self.cfg.port_max {
            return self.drop(DropReason::NoAllocation);
        }
        let idx = self.port_index(port);
        let slot = match self.by_port.get(idx) {
            Some(&s) if s != u32::MAX => s,
            _ => return self.drop(DropReason::NoAllocation),
        };
        let rate = self.cfg.max_bytes_per_sec;
        let a = self.allocs[slot as usize]
            .as_mut()
            .expect("indexed slot is live");
        if !a.has_family(family) || !a.permitted(from.ip(), now.ms) {
            return self.drop(DropReason::NoPermission);
        }
        let n = range.len();
        if !a.to_client.take(rate, now.ms, n) {
            return self.drop(DropReason::Bandwidth);
        }
        let client = a.client;
        if let Some(c) = a
            .channels
            .iter()
            .find(|c| c.peer == from && c.expires_ms > now.ms)
        {
            // ChannelData: a 4-byte header written in the headroom. No padding over UDP.
            if range.start < 4 || n > u16::MAX as usize {
                return self.drop(DropReason::Malformed);
            }
            let start = range.start - 4;
            let hdr: &mut [u8; 4] = (&mut buf[start..range.start]).try_into().expect("4 bytes");
            channel::write_header(hdr, c.number, n as u16);
            self.counters.relayed_to_client += 1;
            return Some(Transmit {
                src: Src::Listener(client.listener),
                dst: client.addr,
                data: Data::Buf(start..range.end),
            });
        }
        // Data indication: header + XOR-PEER-ADDRESS + DATA header before the payload, zero
        // padding after it.
        let addr_len = if from.is_ipv4() { 8 } else { 20 };
        let hdr_len = stun::HEADER_LEN + 4 + addr_len + 4;
        let pad = (4 - n % 4) % 4;
        if range.start < hdr_len
            || range.end + pad > buf.len()
            || hdr_len + n + pad > u16::MAX as usize
        {
            return self.drop(DropReason::Malformed);
        }
        let tid_rand = self.next_random();
        let start = range.start - hdr_len;
        let h = &mut buf[start..range.start];
        let t = stun::message_type(method::DATA, Class::Indication);
        h[0..2].copy_from_slice(&t.to_be_bytes());
        h[2..4].copy_from_slice(&((hdr_len - stun::HEADER_LEN + n + pad) as u16).to_be_bytes());
        h[4..8].copy_from_slice(&stun::MAGIC_COOKIE.to_be_bytes());
        h[8..16].copy_from_slice(&tid_rand.to_be_bytes());
        h[16..20].copy_from_slice(&(self.counters.relayed_to_client as u32).to_be_bytes());
        let tid: [u8; 12] = h[8..20].try_into().expect("12 bytes");
        h[20..22].copy_from_slice(&attr::XOR_PEER_ADDRESS.to_be_bytes());
        h[22..24].copy_from_slice(&(addr_len as u16).to_be_bytes());
        let mut xa = [0u8; 20];
        stun::encode_xor_addr(from, &tid, &mut xa);
        h[24..24 + addr_len].copy_from_slice(&xa[..addr_len]);
        let d = 24 + addr_len;
        h[d..d + 2].copy_from_slice(&attr::DATA.to_be_bytes());
        h[d + 2..d + 4].copy_from_slice(&(n as u16).to_be_bytes());
        for b in &mut buf[range.end..range.end + pad] {
            *b = 0;
        }
        self.counters.relayed_to_client += 1;
        Some(Transmit {
            src: Src::Listener(client.listener),
            dst: client.addr,
            data: Data::Buf(start..range.end + pad),
        })
    }

    // ----------------------------------------------------------------------------------------
    // Timers
    // ----------------------------------------------------------------------------------------

    fn arm(&mut self, slot: u32) {
        let a = self.allocs[slot as usize].as_mut().expect("live");
        let deadline = a.next_deadline();
        let tick = self.wheel.tick_for(deadline);
        if a.armed > self.wheel.current_tick() && a.armed <= tick {
            return; // already armed at or before the new deadline
        }
        a.armed = self.wheel.insert(
            deadline,
            TimerKey::Allocation {
                slot,
                generation: a.generation,
            },
        );
    }

    /// Expire allocations, permissions, channels and reservations due by `now`.
    pub fn handle_timeout(&mut self, now: Now, binder: &mut dyn RelayBinder) {
        self.now = now;
        let mut fired = std::mem::take(&mut self.fired);
        self.wheel.advance(now.ms, &mut fired);
        for (tick, key) in fired.drain(..) {
            match key {
                TimerKey::Reservation { token } => {
                    if let Some(&(port, exp)) = self.reservations.get(&token) {
                        if exp <= now.ms {
                            self.reservations.remove(&token);
                            self.release_port(port);
                        }
                    }
                }
                TimerKey::Allocation { slot, generation } => {
                    let Some(a) = self.allocs.get_mut(slot as usize).and_then(|a| a.as_mut())
                    else {
                        continue;
                    };
                    if a.generation != generation || a.armed != tick {
                        continue; // stale entry: the deadline moved
                    }
                    if a.expires_ms <= now.ms {
                        self.free_allocation(slot, binder);
                        self.counters.allocations_expired += 1;
                        continue;
                    }
                    a.permissions.retain(|p| p.expires_ms > now.ms);
                    a.channels.retain(|c| c.expires_ms > now.ms);
                    a.armed = 0;
                    self.arm(slot);
                }
            }
        }
        self.fired = fired;
    }

    fn free_allocation(&mut self, slot: u32, binder: &mut dyn RelayBinder) {
        let Some(a) = self.allocs[slot as usize].take() else {
            return;
        };
        if a.v4 {
            binder.unbind(Family::V4, a.port);
        }
        if a.v6 {
            binder.unbind(Family::V6, a.port);
        }
        self.by_client.remove(&a.client);
        let pi = self.port_index(a.port);
        self.by_port[pi] = u32::MAX;
        self.release_port(a.port);
        self.cfg
            .policy
            .relay_ports
            .set(a.port.addr, a.port.port, false);
        self.cfg.quotas.release(&a.username);
        self.free_slots.push(slot);
    }

    /// Delete every allocation (final shutdown).
    pub fn close_all(&mut self, binder: &mut dyn RelayBinder) {
        for slot in 0..self.allocs.len() as u32 {
            if self.allocs[slot as usize].is_some() {
                self.free_allocation(slot, binder);
            }
        }
    }
}

fn install_permission(a: &mut Allocation, ip: IpAddr, expires_ms: u64) {
    match a.permissions.iter_mut().find(|p| p.ip == ip) {
        Some(p) => p.expires_ms = expires_ms,
        None => a.permissions.push(Permission { ip, expires_ms }),
    }
}

#[cfg(test)]
mod tests;
