//! The TURN server core (RFC 8656 over UDP, plus RFC 8489 Binding), sans-IO.
//!
//! One [`Server`] is owned by one shard. It is fed datagrams with the time they arrived
//! ([`Server::handle_client`], [`Server::handle_peer`]) and answers with a [`Reply`]:
//! - [`Reply::Transmit`]: where to send which bytes: a [`Transmit`] naming the source socket,
//!   the destination, and either a byte range of the caller's own buffer (relayed data, framed
//!   in place) or the server's scratch buffer (a response);
//! - [`Reply::Bind`]: an Allocate needs a relay port bound; the caller binds it (or fails to)
//!   and reports back through [`Server::handle_bound`], which answers with the next `Reply`;
//! - [`Reply::Drop`]: nothing to send, for a reason that is already counted.
//!
//! Side effects with no answer (close or keep a relay socket, ask the control thread about an
//! identity) queue up as [`Command`]s for [`Server::poll_command`]. The core never reads a
//! clock, never touches a socket and never allocates per relayed packet; the state shared
//! with other shards (allocation quotas, the bitmap of allocated relay ports) is the explicit
//! [`CrossShard`] handle given to [`Server::new`].
//!
//! The run-loop contract: after every `handle_*` call, carry out its `Reply` and then drain
//! [`Server::poll_command`] before the next call (a released port may be handed out again by
//! the next Allocate); call [`Server::handle_timeout`] when [`Server::poll_timeout`] is due.
//!
//! Handlers follow the numbered processing steps of RFC 8656 §7-§12; the step is quoted where
//! it is enforced.

use crate::auth::{
    self, features, CredentialKind, IdentityAnswer, KeyCache, Lookup, NonceCheck,
    PasswordAlgorithm, UserKey,
};
use crate::policy::{Denied, PeerPolicy, RelayPortSet};
use crate::stun::{
    self, attr, channel, code, method, Class, IntegrityKind, Message, MessageWriter,
};
use crate::wheel::{TimerKey, Wheel};
use ahash::AHashMap;
use dashmap::DashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
pub const HEADROOM: usize = stun::DATA_INDICATION_MAX_HEADER;
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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
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

/// The transport a client reaches a listener over (RFC 8656 §3.1, RFC 7350).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Transport {
    #[default]
    Udp,
    Tcp,
    Tls,
    Dtls,
}

impl Transport {
    /// A byte stream (messages framed back to back, ChannelData padded to 4 bytes).
    pub fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }

    /// The label used in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Dtls => "dtls",
        }
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
    /// The first `n` bytes of [`Server::scratch`] (a STUN response); `n > 0`.
    Scratch(usize),
}

/// One datagram to send.
#[must_use = "a transmit is a datagram the caller has to send"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    pub src: Src,
    pub dst: SocketAddr,
    pub data: Data,
}

/// Identifies the Allocate a [`BindRequest`] belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BindTicket(u64);

/// The caller is asked to bind relay sockets on `port` for the families set (both at once for
/// a dual-stack allocation: all or nothing) and to report with [`Server::handle_bound`].
#[must_use = "the Allocate waits for Server::handle_bound"]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BindRequest {
    pub ticket: BindTicket,
    pub port: RelayPort,
    pub v4: bool,
    pub v6: bool,
    /// An RFC 6062 TCP allocation: a listening TCP socket on the relayed address (peers
    /// connect to it, and connections to peers leave from it) instead of a UDP socket.
    pub tcp: bool,
}

/// An RFC 6062 CONNECTION-ID: names one peer data connection of a TCP allocation. The top 8
/// bits are the shard that owns the allocation, so a ConnectionBind that reaches another
/// shard's listener can be handed to the right one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnectionId(pub u32);

impl ConnectionId {
    /// The shard (index) that owns the connection.
    pub fn shard(self) -> u8 {
        (self.0 >> 24) as u8
    }
}

/// RFC 6062 work for the I/O layer, which owns the TCP sockets ([`Effects::tcp`]).
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TcpCommand {
    /// Open a TCP connection from the relayed address (`family`, `port`) to `peer` (a
    /// Connect request) and report with [`Server::handle_peer_connected`].
    Connect {
        id: ConnectionId,
        family: Family,
        port: RelayPort,
        peer: SocketAddr,
    },
    /// The client data connection `client` (a stream client that just sent ConnectionBind)
    /// and the peer data connection `id` are joined: from now on bytes pass between them as
    /// they are, after the ConnectionBind success already sent on `client`.
    Splice { id: ConnectionId, client: ClientKey },
    /// Close the peer data connection `id` and the client data connection joined to it.
    Close(ConnectionId),
    /// The TCP allocation on (`family`, `port`) is gone: close its listening socket.
    CloseListener { family: Family, port: RelayPort },
}

/// What the core answers to one input.
#[must_use = "a reply is a datagram to send, a port to bind or a counted drop"]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Transmit(Transmit),
    Bind(BindRequest),
    /// Nothing to send; the reason is already counted in [`Counters::drops`].
    Drop(DropReason),
    /// Nothing to send yet: the answer comes later (an RFC 6062 Connect waits for the peer,
    /// [`Server::handle_peer_connected`]).
    Pending,
}

impl Reply {
    /// The transmit, if this reply is one.
    pub fn transmit(self) -> Option<Transmit> {
        match self {
            Reply::Transmit(t) => Some(t),
            _ => None,
        }
    }
}

/// Side effects the I/O layer carries out for the core, in order ([`Server::poll_command`]).
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// The allocation that held this relay port is gone. With `keep` the socket stays open
    /// (bound and read, its datagrams dropped as "no allocation") because the core may hand
    /// the port to a later allocation, which then comes as an ordinary [`BindRequest`] for
    /// the same port; otherwise close it.
    Release {
        family: Family,
        port: RelayPort,
        keep: bool,
    },
    /// Ask the control thread to resolve an Actrix identity username; the answer comes back
    /// through [`Server::handle_identity_answer`].
    ResolveIdentity(Box<[u8]>),
    /// RFC 6062 TCP relaying (see [`TcpCommand`]).
    Tcp(TcpCommand),
}

/// What carries out the core's side effects: the shard's relay sockets and its link to the
/// control thread (or a recording stand-in in tests and benchmarks). The core never calls it
/// from `handle_*`; [`Server::settle`] drives it between calls.
pub trait Effects {
    /// Bind relay sockets on `req.port` for the families it names, all or nothing; false if
    /// the port is unavailable.
    fn bind(&mut self, req: &BindRequest) -> bool;
    /// See [`Command::Release`].
    fn release(&mut self, family: Family, port: RelayPort, keep: bool);
    /// See [`Command::ResolveIdentity`].
    fn resolve_identity(&mut self, username: Box<[u8]>);
    /// See [`TcpCommand`].
    fn tcp(&mut self, cmd: TcpCommand);
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
    /// The answer did not fit the response buffer (never expected; counted, not sent).
    ResponseTooLarge,
    /// A [`Server::handle_bound`] for an Allocate that is no longer waiting (a caller bug).
    StaleBind,
    /// Over the per-source budget of unauthenticated Binding answers
    /// (`stun.bindings_per_source_per_sec`).
    BindingRateLimited,
}

pub const N_DROP_REASONS: usize = 16;

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
    "response_too_large",
    "stale_bind",
    "binding_rate_limited",
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

/// The list of the core's plain counters, written once: `with_turn_counters!(m)` expands to
/// `m! { client_packets, client_bytes, ... }`. The core's [`Counters`] and the data plane's
/// published atomics are both generated from it.
#[macro_export]
macro_rules! with_turn_counters {
    ($m:ident) => {
        $m! {
            client_packets,
            client_bytes,
            peer_packets,
            peer_bytes,
            relayed_to_peer,
            relayed_to_client,
            binding_requests,
            allocations_created,
            allocations_expired,
            allocations_deleted,
            allocations_refused_quota,
            allocations_refused_capacity,
            allocations_refused_reservation,
            allocations_redirected,
            allocations_disconnected,
            permissions_created,
            channels_bound,
            peers_denied,
            auth_challenges,
            auth_failures,
            stale_nonces,
            error_responses,
            tcp_allocations_created,
            tcp_connects,
            tcp_connect_failures,
            tcp_peer_connections_accepted,
            tcp_peer_connections_refused,
            tcp_connection_binds,
        }
    };
}

macro_rules! plain_counters {
    ($($field:ident),* $(,)?) => {
        /// Shard-local counters. Plain integers: one owner, published by copying.
        #[derive(Debug, Default, Clone)]
        pub struct Counters {
            $(pub $field: u64,)*
            pub drops: [u64; N_DROP_REASONS],
            pub auth_failures_by_reason: [u64; AUTH_FAILURE_REASONS.len()],
        }
    };
}

with_turn_counters!(plain_counters);

impl Counters {
    fn auth_fail(&mut self, why: AuthFailure) {
        self.auth_failures += 1;
        self.auth_failures_by_reason[why as usize] += 1;
    }
}

/// What all shards of one data plane share: allocation quotas and the bitmap of allocated
/// relay ports. Touched on allocate and free (and the bitmap read when a peer is checked),
/// never per relayed packet. The data plane makes one and hands it to every shard's
/// [`Server::new`]; it survives live reloads.
#[derive(Debug)]
pub struct CrossShard {
    pub quotas: Quotas,
    pub relay_ports: RelayPortSet,
    /// Whether new Allocates are sent elsewhere (see [`Load`]).
    pub load: Load,
}

/// Whether this node takes new allocations: set by the main thread (an operator's drain, the
/// shutdown drain) and by its load watcher (relayed bandwidth over the limit); read once per
/// Allocate, never per relayed packet. Existing allocations are never affected.
#[derive(Debug, Default)]
pub struct Load {
    draining: AtomicBool,
    overloaded: AtomicBool,
}

impl Load {
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    pub fn set_overloaded(&self, on: bool) {
        self.overloaded.store(on, Ordering::Relaxed);
    }

    pub fn overloaded(&self) -> bool {
        self.overloaded.load(Ordering::Relaxed)
    }
}

/// Where a client is sent by a 300 (Try Alternate) answer (RFC 8489 §10, RFC 8656 §7.2):
/// one address per family, and for TLS and DTLS clients the name the other server's
/// certificate is for (ALTERNATE-DOMAIN, RFC 8489 §14.16).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alternates {
    pub v4: Option<SocketAddr>,
    pub v6: Option<SocketAddr>,
    pub domain: Option<Box<str>>,
}

impl Alternates {
    /// The alternate of `client`'s family: a client is never sent to a family it may not
    /// reach.
    pub fn for_client(&self, client: &SocketAddr) -> Option<SocketAddr> {
        match Family::of(client) {
            Family::V4 => self.v4,
            Family::V6 => self.v6,
        }
    }
}

/// Why the shards send new Allocates elsewhere.
pub fn redirect_reason(draining: bool, over_allocations: bool, overloaded: bool) -> &'static str {
    if draining {
        "draining"
    } else if over_allocations {
        "over the allocation limit"
    } else if overloaded {
        "over the bandwidth limit"
    } else {
        ""
    }
}

/// One allocation as the session admin sees it ([`Server::sessions`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session {
    /// Unique on this node while the allocation lives: shard, slot and generation.
    pub id: u64,
    pub user: Box<[u8]>,
    pub client: SocketAddr,
    pub transport: Transport,
    pub relayed: Vec<SocketAddr>,
    pub tcp: bool,
    pub age_secs: u64,
    pub expires_in_secs: u64,
    /// Relayed payload bytes, client to peer and peer to client.
    pub bytes_to_peer: u64,
    pub bytes_to_client: u64,
    pub permissions: usize,
    pub channels: usize,
}

/// Which allocations an operator ends ([`Server::disconnect`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disconnect {
    /// Every allocation made with this username.
    User(Box<[u8]>),
    /// The allocation with this [`Session::id`].
    Allocation(u64),
}

impl CrossShard {
    /// `relay_addresses`: the most relay addresses of one family; `seed` keys the per-user
    /// quota map's hasher.
    pub fn new(max_total: usize, max_per_user: usize, relay_addresses: usize, seed: u64) -> Self {
        CrossShard {
            quotas: Quotas::new(max_total, max_per_user, seed),
            relay_ports: RelayPortSet::new(relay_addresses),
            load: Load::default(),
        }
    }
}

/// Allocation quotas shared by every shard. Exact under concurrency: the total is a
/// compare-and-swap counter and each user's count is updated under its map entry.
#[derive(Debug)]
pub struct Quotas {
    max_total: AtomicUsize,
    max_per_user: AtomicUsize,
    /// The most allocations memory allows (the cgroup guard's; no cap by default).
    memory_cap: AtomicUsize,
    total: AtomicUsize,
    users: DashMap<Box<[u8]>, usize, ahash::RandomState>,
}

impl Quotas {
    pub fn new(max_total: usize, max_per_user: usize, seed: u64) -> Self {
        Quotas {
            max_total: AtomicUsize::new(max_total),
            max_per_user: AtomicUsize::new(max_per_user),
            memory_cap: AtomicUsize::new(usize::MAX),
            total: AtomicUsize::new(0),
            users: DashMap::with_hasher(ahash::RandomState::with_seeds(
                seed,
                seed.rotate_left(17),
                seed.rotate_left(31),
                seed.rotate_left(47),
            )),
        }
    }

    /// Change the limits (live reload). Allocations above a lowered limit are kept; new ones
    /// are refused until the count falls below it.
    pub fn set_limits(&self, max_total: usize, max_per_user: usize) {
        self.max_total.store(max_total, Ordering::Relaxed);
        self.max_per_user.store(max_per_user, Ordering::Relaxed);
    }

    /// Cap the total below `max_total` for memory's sake (the relay's cgroup guard): kept
    /// apart from the configured limits, which a reload replaces.
    pub fn set_memory_cap(&self, cap: usize) {
        self.memory_cap.store(cap, Ordering::Relaxed);
    }

    pub fn try_acquire(&self, user: &[u8]) -> bool {
        let max_total = self
            .max_total
            .load(Ordering::Relaxed)
            .min(self.memory_cap.load(Ordering::Relaxed));
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
    /// Unauthenticated Binding requests answered per source IP per second (success, 420 or
    /// 401 alike); more are dropped. A Binding answer is larger than the request, so without
    /// a budget the port is a reflector.
    pub bindings_per_source: u32,
    /// Identity resolutions (ECIES decryptions on the control thread) per source IP per second.
    pub identity_lookups_per_source: u32,
    /// The transport of each listener index (`ClientKey::listener`); a listener not listed
    /// is UDP.
    pub listener_transports: Vec<Transport>,
    /// Released relay ports whose socket the I/O layer keeps open for reuse
    /// (`io.relay_socket_pool`): the next single-family allocation without EVEN-PORT takes one
    /// of them (binding again costs no system call). 0: every released socket is closed.
    pub relay_socket_pool: usize,
    /// This shard's index (the top byte of the RFC 6062 connection ids it hands out).
    pub shard: u8,
    /// RFC 6062 TCP allocations (REQUESTED-TRANSPORT TCP over a TCP or TLS connection);
    /// false: 442 as for any other transport.
    pub tcp_relay: bool,
    /// Peer data connections (pending and joined) one TCP allocation may have at once.
    pub max_tcp_connections: usize,
    /// Seconds a peer data connection waits for its ConnectionBind (RFC 6062 §5.2, §5.3: 30).
    pub connection_bind_timeout: u32,
    /// Where new Allocates go while this node drains or is over a load limit (none: 508).
    pub alternates: Alternates,
    /// Above this many allocations on the node, new Allocates get 300 toward the alternate
    /// of the client's family (0: no such limit). Below `turn.max_allocations`, which refuses.
    pub redirect_above_allocations: usize,
}

impl TurnConfig {
    pub fn new(auth: Arc<auth::AuthConfig>, policy: Arc<PeerPolicy>) -> Self {
        TurnConfig {
            auth,
            policy,
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
            bindings_per_source: 100,
            identity_lookups_per_source: 10,
            relay_socket_pool: 0,
            listener_transports: Vec::new(),
            shard: 0,
            tcp_relay: true,
            max_tcp_connections: 32,
            connection_bind_timeout: 30,
            alternates: Alternates::default(),
            redirect_above_allocations: 0,
        }
    }

    /// The transport of listener `i`.
    pub fn transport(&self, listener: u8) -> Transport {
        self.listener_transports
            .get(listener as usize)
            .copied()
            .unwrap_or_default()
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
    /// The username that made it (USERHASH resolved): later requests must use the same one.
    username: Box<[u8]>,
    /// Whose quota it counts against ([`quota_key`]).
    quota: Box<[u8]>,
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
    /// An RFC 6062 TCP allocation, and its peer data connections (pending and joined).
    tcp: bool,
    connections: Vec<ConnectionId>,
    /// For the session admin: when it was made, and the payload bytes relayed each way.
    created_ms: u64,
    bytes_to_peer: u64,
    bytes_to_client: u64,
}

/// A token bucket refilled from the batch time passed in (no clock read per datagram).
#[derive(Debug, Clone, Copy, Default)]
struct Bucket {
    tokens: u64,
    last_ms: u64,
}

impl Bucket {
    fn take(&mut self, now_ms: u64, rate: u64, n: usize) -> bool {
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
    fn permitted(&self, now_ms: u64, ip: IpAddr) -> bool {
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
    /// Where the credential came from, and for identities the actor behind it: what the
    /// allocation quota counts.
    source: CredentialKind,
    identity: Option<[u8; 16]>,
}

impl AuthOk {
    fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }
}

/// The request a response answers: enough to write it after the request's bytes are gone (an
/// Allocate answered once its relay port is bound).
#[derive(Clone, Copy)]
struct Txn {
    method: u16,
    tid: [u8; 12],
    fingerprint: bool,
}

impl From<&Message<'_>> for Txn {
    fn from(m: &Message<'_>) -> Txn {
        Txn {
            method: m.method(),
            tid: *m.transaction_id(),
            fingerprint: m.has_fingerprint(),
        }
    }
}

/// A request handler's outcome, before it becomes a [`Reply`].
enum Answer {
    /// A response of this many bytes in the scratch buffer.
    Respond(usize),
    /// The response comes later (a Connect waiting for the peer).
    Pending,
    /// The Allocate waits for a relay port.
    Bind(BindRequest),
    /// Nothing is sent; counted when it becomes a `Reply`.
    Drop(DropReason),
}

enum Authn {
    Ok(AuthOk),
    Reply(Answer),
}

/// An Allocate between its [`Reply::Bind`] and [`Server::handle_bound`].
struct PendingAllocate {
    ticket: BindTicket,
    client: ClientKey,
    txn: Txn,
    username: Box<[u8]>,
    quota: Box<[u8]>,
    ok: AuthOk,
    v4: bool,
    v6: bool,
    /// The IPv6 relay address was asked for as the additional family but this node has none
    /// (ADDRESS-ERROR-CODE in the success).
    v6_error: bool,
    lifetime: u32,
    port: RelayPort,
    search: PortSearch,
    /// An RFC 6062 TCP allocation.
    tcp: bool,
}

/// An RFC 6062 peer data connection of a TCP allocation.
struct TcpConnection {
    alloc: u32,
    generation: u32,
    peer: SocketAddr,
    state: TcpState,
}

enum TcpState {
    /// A Connect waits for the I/O layer's outcome; its response is written then.
    Connecting { txn: Txn, ok: AuthOk },
    /// Connected (Connect) or accepted (ConnectionAttempt sent): waits for a ConnectionBind
    /// until `deadline_ms`.
    Ready { deadline_ms: u64 },
    /// Joined to a client data connection.
    Bound,
}

/// How the port of a pending Allocate was chosen, and so what a failed bind leads to.
#[derive(Clone, Copy)]
enum PortSearch {
    /// The port reserved by an earlier EVEN-PORT (R bit) Allocate: no second try.
    Reserved,
    /// A port kept open from an earlier allocation; on failure, go on scanning.
    Warm { even: bool },
    /// Scanning the shard's ports from the cursor; `examined` indices so far, `failures` binds
    /// refused (after 64, 508).
    Scan {
        even: bool,
        reserve_next: bool,
        examined: usize,
        failures: u32,
    },
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
    attr::CONNECTION_ID,
];

/// Upper bounds on text attributes (RFC 8489 §14: REALM and NONCE < 763 bytes). USERNAME is
/// allowed up to 1024 bytes rather than 513 because Actrix identity usernames (base122 of an
/// encrypted token) can exceed the RFC figure (wire reference §6.1).
const MAX_USERNAME: usize = 1024;
const MAX_REALM_NONCE: usize = 763;

const SCRATCH_LEN: usize = 1500;

/// Binds refused in a row before an Allocate gets 508.
const MAX_BIND_FAILURES: u32 = 64;
/// Stale timer-wheel entries tolerated beyond twice the live ones before a compaction.
const TIMER_SLACK: usize = 4096;

/// One shard's TURN server state.
pub struct Server {
    cfg: TurnConfig,
    shared: Arc<CrossShard>,
    keys: KeyCache,
    allocs: Vec<Option<Allocation>>,
    free_slots: Vec<u32>,
    next_generation: u32,
    by_client: AHashMap<ClientKey, u32>,
    /// Relay port (offset from `port_min`) → allocation slot, `u32::MAX` when free.
    by_port: Vec<u32>,
    port_used: Vec<bool>,
    /// Per relay (address, port): which families' sockets are warm (bit 0 IPv4, bit 1 IPv6).
    port_warm: Vec<u8>,
    port_cursor: usize,
    /// Released ports whose sockets the I/O layer keeps open (at most
    /// `cfg.relay_socket_pool` of each family), most recent last.
    warm_v4: Vec<RelayPort>,
    warm_v6: Vec<RelayPort>,
    reservations: AHashMap<u64, (RelayPort, u64)>,
    /// RFC 6062 peer data connections, by connection id.
    tcp_conns: AHashMap<u32, TcpConnection>,
    /// The low 24 bits of the next connection id.
    next_connection: u32,
    pending: Option<PendingAllocate>,
    next_ticket: u64,
    wheel: Wheel,
    fired: Vec<(u64, TimerKey)>,
    commands: std::collections::VecDeque<Command>,
    scratch: Box<[u8; SCRATCH_LEN]>,
    rng: u64,
    draining: bool,
    /// 401/438 challenges per source IP per second (reliability checklist A4).
    challenge_limit: auth::RateTable,
    /// Unauthenticated Binding answers per source IP per second (reliability checklist A5).
    binding_limit: auth::RateTable,
    /// Identity resolutions (an ECIES decryption on the control thread) per source IP per
    /// second.
    identity_limit: auth::RateTable,
    pub counters: Counters,
}

impl Server {
    /// A shard's core. `shared` is the data plane's one [`CrossShard`]; `seed` drives every
    /// choice the core makes at random (ports, indication transaction ids, reservation tokens,
    /// hash seeds).
    pub fn new(cfg: TurnConfig, shared: Arc<CrossShard>, now: Now, seed: u64) -> Self {
        let span = ((cfg.port_max as usize).saturating_sub(cfg.port_min as usize) + 1)
            * cfg.relay_v4.len().max(cfg.relay_v6.len()).max(1);
        let horizon = (cfg.max_lifetime.max(cfg.channel_lifetime) as usize + 64).min(1 << 16);
        let mut s = Server {
            keys: KeyCache::new(cfg.auth.clone(), cfg.key_cache_capacity),
            shared,
            allocs: Vec::new(),
            free_slots: Vec::new(),
            next_generation: 1,
            by_client: AHashMap::default(),
            by_port: vec![u32::MAX; span],
            port_used: vec![false; span],
            port_warm: vec![0; span],
            port_cursor: 0,
            warm_v4: Vec::new(),
            warm_v6: Vec::new(),
            reservations: AHashMap::default(),
            tcp_conns: AHashMap::default(),
            next_connection: 0,
            pending: None,
            next_ticket: 1,
            wheel: Wheel::new(now.ms, horizon),
            fired: Vec::new(),
            commands: Default::default(),
            scratch: Box::new([0u8; SCRATCH_LEN]),
            rng: seed | 1,
            draining: false,
            challenge_limit: auth::RateTable::new(4096, cfg.challenges_per_source, seed),
            binding_limit: auth::RateTable::new(
                4096,
                cfg.bindings_per_source,
                seed.rotate_left(21),
            ),
            identity_limit: auth::RateTable::new(4096, cfg.identity_lookups_per_source, !seed),
            counters: Counters::default(),
            cfg,
        };
        s.port_cursor = (s.next_random() as usize) % span.max(1);
        s.next_connection = s.next_random() as u32 & 0x00FF_FFFF;
        s
    }

    pub fn config(&self) -> &TurnConfig {
        &self.cfg
    }

    /// The state shared with the other shards.
    pub fn cross_shard(&self) -> &Arc<CrossShard> {
        &self.shared
    }

    /// Apply a new configuration (live reload). Allocations are kept; the port slice and the
    /// relay addresses must not change. Warm ports beyond a lowered pool size are released.
    pub fn reconfigure(&mut self, mut cfg: TurnConfig) {
        cfg.port_min = self.cfg.port_min;
        cfg.port_max = self.cfg.port_max;
        cfg.shard = self.cfg.shard;
        self.keys.reconfigure(cfg.auth.clone());
        self.challenge_limit.set_limit(cfg.challenges_per_source);
        self.binding_limit.set_limit(cfg.bindings_per_source);
        self.identity_limit
            .set_limit(cfg.identity_lookups_per_source);
        let pool = cfg.relay_socket_pool;
        let mut released = Vec::new();
        for (family, warm) in [
            (Family::V4, &mut self.warm_v4),
            (Family::V6, &mut self.warm_v6),
        ] {
            while warm.len() > pool {
                let port = warm.remove(0);
                self.commands.push_back(Command::Release {
                    family,
                    port,
                    keep: false,
                });
                released.push((family, port));
            }
        }
        self.cfg = cfg;
        for (family, p) in released {
            let i = self.port_index(p);
            if let Some(w) = self.port_warm.get_mut(i) {
                *w &= !warm_bit(family);
            }
        }
    }

    /// The response bytes a [`Data::Scratch`] transmit names.
    pub fn scratch(&self) -> &[u8] {
        &self.scratch[..]
    }

    pub fn allocation_count(&self) -> usize {
        self.by_client.len()
    }

    /// Whether `client` holds an allocation.
    pub fn has_allocation(&self, client: &ClientKey) -> bool {
        self.by_client.contains_key(client)
    }

    /// Timer-wheel entries armed (stale ones included until they fire): flat under steady
    /// load, back to near zero when allocations end.
    pub fn timer_count(&self) -> usize {
        self.wheel.len()
    }

    /// Side effects queued for the I/O layer ([`Server::poll_command`]); 0 between calls when
    /// the run-loop contract is kept.
    pub fn command_queue_len(&self) -> usize {
        self.commands.len()
    }

    /// Relay ports held for a later Allocate by EVEN-PORT reservations.
    pub fn reservation_count(&self) -> usize {
        self.reservations.len()
    }

    /// Stop granting new allocations (shutdown drain); existing ones keep working.
    pub fn set_draining(&mut self, on: bool) {
        self.draining = on;
    }

    /// The next side effect to carry out (see [`Command`]); drain after every `handle_*`.
    #[must_use]
    pub fn poll_command(&mut self) -> Option<Command> {
        self.commands.pop_front()
    }

    /// Carry out the run-loop contract for one reply: drain the commands into `fx`, perform a
    /// [`Reply::Bind`] through it and feed the outcome back, until the reply is a transmit or
    /// a drop (which it returns).
    pub fn settle(&mut self, now: Now, mut reply: Reply, fx: &mut impl Effects) -> Reply {
        loop {
            self.drain_commands(fx);
            match reply {
                Reply::Bind(req) => {
                    let ok = fx.bind(&req);
                    reply = self.handle_bound(now, req.ticket, ok);
                }
                done => return done,
            }
        }
    }

    /// Hand every queued [`Command`] to `fx`, in order.
    pub fn drain_commands(&mut self, fx: &mut impl Effects) {
        while let Some(c) = self.commands.pop_front() {
            match c {
                Command::Release { family, port, keep } => fx.release(family, port, keep),
                Command::ResolveIdentity(u) => fx.resolve_identity(u),
                Command::Tcp(c) => fx.tcp(c),
            }
        }
    }

    /// When the core next needs [`Server::handle_timeout`], in monotonic ms.
    #[must_use]
    pub fn poll_timeout(&self) -> u64 {
        self.wheel.next_tick_ms()
    }

    /// The control thread's answer about an identity username.
    pub fn handle_identity_answer(&mut self, now: Now, a: IdentityAnswer) {
        self.keys.handle_identity_answer(now.unix, a);
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: cheap, per shard, seeded by the caller; used for transaction ids of
        // indications, port selection and reservation tokens (the latter also MAC-free but
        // only meaningful together with a valid credential).
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Count a drop and say so.
    fn drop(&mut self, why: DropReason) -> Reply {
        self.counters.drops[why as usize] += 1;
        Reply::Drop(why)
    }

    /// Turn a handler's answer to `client` into the reply the caller sees.
    fn reply(&mut self, client: ClientKey, a: Answer) -> Reply {
        match a {
            Answer::Respond(n) => Reply::Transmit(Transmit {
                src: Src::Listener(client.listener),
                dst: client.addr,
                data: Data::Scratch(n),
            }),
            Answer::Bind(b) => Reply::Bind(b),
            Answer::Pending => Reply::Pending,
            Answer::Drop(why) => self.drop(why),
        }
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
    ) -> Reply {
        self.counters.client_packets += 1;
        self.counters.client_bytes += range.len() as u64;
        let client = ClientKey {
            listener,
            addr: from,
        };
        let data = &buf[range.clone()];
        match data.first().map(|b| b >> 6) {
            Some(0) => self.handle_stun(now, client, data, range.start),
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
    ) -> Reply {
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
        if !a.permitted(now.ms, peer.ip()) {
            return self.drop(DropReason::NoPermission);
        }
        if !a.to_peer.take(now.ms, rate, len) {
            return self.drop(DropReason::Bandwidth);
        }
        a.bytes_to_peer += len as u64;
        let port = a.port;
        self.counters.relayed_to_peer += 1;
        Reply::Transmit(Transmit {
            src: Src::Relay(Family::of(&peer), port),
            dst: peer,
            data: Data::Buf(start + channel::HEADER_LEN..start + channel::HEADER_LEN + len),
        })
    }

    fn handle_stun(&mut self, now: Now, client: ClientKey, data: &[u8], start: usize) -> Reply {
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
        let answer = match msg.method() {
            // A Binding that carries MESSAGE-INTEGRITY must verify (RFC 8489 §9.1.3, §9.2.4):
            // long-term credentials (REALM present) go through authentication; a short-term
            // credential cannot be known here, so it gets 401 and never a success.
            method::BINDING if msg.has_integrity() && msg.get(attr::REALM).is_some() => self
                .with_auth(now, client, &msg, |s, ok| {
                    s.binding_success(&msg, client, Some(ok))
                }),
            method::BINDING if msg.has_integrity() => {
                if !self.binding_limit.allow(now.unix, client.addr.ip()) {
                    return self.drop(DropReason::BindingRateLimited);
                }
                self.counters.auth_fail(AuthFailure::ShortTerm);
                self.error_reply(&msg, code::UNAUTHORIZED, None)
            }
            method::BINDING => {
                if !self.binding_limit.allow(now.unix, client.addr.ip()) {
                    return self.drop(DropReason::BindingRateLimited);
                }
                self.handle_binding(&msg, client)
            }
            method::ALLOCATE => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_allocate(now, client, &msg, ok)
            }),
            method::REFRESH => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_refresh(now, client, &msg, ok)
            }),
            method::CREATE_PERMISSION => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_create_permission(now, client, &msg, ok)
            }),
            method::CHANNEL_BIND => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_channel_bind(now, client, &msg, ok)
            }),
            method::CONNECT => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_connect(now, client, &msg, ok)
            }),
            method::CONNECTION_BIND => self.with_auth(now, client, &msg, |s, ok| {
                s.handle_connection_bind(now, client, &msg, ok)
            }),
            _ => {
                // RFC 8489 §6.3.1: an unknown method in a request gets 400.
                self.error_reply(&msg, code::BAD_REQUEST, None)
            }
        };
        self.reply(client, answer)
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
    fn handle_binding(&mut self, msg: &Message<'_>, client: ClientKey) -> Answer {
        self.counters.binding_requests += 1;
        let mut unknown = [0u16; 16];
        let n = Self::unknown_required(msg, &mut unknown);
        if n > 0 {
            return self.error_reply_with(msg, code::UNKNOWN_ATTRIBUTE, None, |w| {
                w.add_unknown_attributes(&unknown[..n])
            });
        }
        self.binding_success(msg, client, None)
    }

    /// XOR-MAPPED-ADDRESS, MESSAGE-INTEGRITY when the request was authenticated, FINGERPRINT
    /// when the request had one.
    fn binding_success(
        &mut self,
        msg: &Message<'_>,
        client: ClientKey,
        ok: Option<&AuthOk>,
    ) -> Answer {
        let txn = Txn::from(msg);
        let written =
            MessageWriter::new(&mut self.scratch[..], txn.method, Class::Success, &txn.tid)
                .and_then(|mut w| {
                    w.add_xor_addr(attr::XOR_MAPPED_ADDRESS, client.addr)?;
                    if let Some(ok) = ok {
                        w.add_integrity_kind(ok.kind, ok.key())?;
                    }
                    if txn.fingerprint {
                        w.add_fingerprint()?;
                    }
                    Ok(w.finish())
                });
        match written {
            Ok(n) => Answer::Respond(n),
            Err(stun::BufferFull) => Answer::Drop(DropReason::ResponseTooLarge),
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
        f: impl FnOnce(&mut Self, &AuthOk) -> Answer,
    ) -> Answer {
        match self.authenticate(now, client, msg) {
            Authn::Ok(ok) => {
                let mut unknown = [0u16; 16];
                let n = Self::unknown_required(msg, &mut unknown);
                if n > 0 {
                    return self.error_reply_with(msg, code::UNKNOWN_ATTRIBUTE, Some(&ok), |w| {
                        w.add_unknown_attributes(&unknown[..n])
                    });
                }
                f(self, &ok)
            }
            Authn::Reply(a) => a,
        }
    }

    fn authenticate(&mut self, now: Now, client: ClientKey, msg: &Message<'_>) -> Authn {
        // Step 1: no integrity at all → 401 with REALM and NONCE. Nothing is stored.
        if !msg.has_integrity() {
            self.counters.auth_challenges += 1;
            return Authn::Reply(self.challenge(now, msg, client, code::UNAUTHORIZED));
        }
        // Step 2: "If the message contains a MESSAGE-INTEGRITY or a MESSAGE-INTEGRITY-SHA256
        // attribute, but is missing either the USERNAME or USERHASH, REALM, or NONCE
        // attribute, the server MUST generate an error response with an error code of 400".
        // Both USERNAME and USERHASH is ambiguous and refused the same way; a USERHASH is 32
        // bytes (§14.4).
        let user = match (msg.get(attr::USERNAME), msg.get(attr::USERHASH)) {
            (Some(name), None) => Some(name),
            (None, Some(hash)) if hash.len() == 32 => None,
            _ => return Authn::Reply(self.error_reply(msg, code::BAD_REQUEST, None)),
        };
        let (Some(realm), Some(nonce)) = (msg.get(attr::REALM), msg.get(attr::NONCE)) else {
            return Authn::Reply(self.error_reply(msg, code::BAD_REQUEST, None));
        };
        if user.is_some_and(|u| u.len() > MAX_USERNAME)
            || realm.len() > MAX_REALM_NONCE
            || nonce.len() > MAX_REALM_NONCE
        {
            return Authn::Reply(self.error_reply(msg, code::BAD_REQUEST, None));
        }
        // Step 3: the password algorithm, with bid-down detection (§9.2.4).
        let Some(algorithm) = Self::password_algorithm(msg, nonce) else {
            return Authn::Reply(self.error_reply(msg, code::BAD_REQUEST, None));
        };
        // Step 4: the nonce must be ours (its MAC also covers the features it announced), for
        // this client, and fresh. An RFC 6062 ConnectionBind comes on a new connection with the
        // nonce of its allocation's control connection (clients do not wait for a challenge
        // there): that one is valid too.
        let cfg = self.keys.config();
        let mut checked = auth::check_nonce(
            now.unix,
            &cfg.nonce_key,
            cfg.nonce_lifetime,
            nonce,
            client.addr,
        );
        if checked == NonceCheck::Invalid {
            if let Some(owner) = self.connection_bind_session(client, msg) {
                checked =
                    auth::check_nonce(now.unix, &cfg.nonce_key, cfg.nonce_lifetime, nonce, owner);
            }
        }
        match checked {
            NonceCheck::Valid => {}
            NonceCheck::Stale => {
                self.counters.stale_nonces += 1;
                return Authn::Reply(self.challenge(now, msg, client, code::STALE_NONCE));
            }
            NonceCheck::Invalid => {
                self.counters.auth_fail(AuthFailure::Nonce);
                return Authn::Reply(self.challenge(now, msg, client, code::UNAUTHORIZED));
            }
        }
        if realm != cfg.realm.as_bytes() {
            self.counters.auth_fail(AuthFailure::Realm);
            return Authn::Reply(self.challenge(now, msg, client, code::UNAUTHORIZED));
        }
        // Step 5: find the key. An unknown user gets the same 401 as a wrong password, at the
        // same moment: only usernames that could be identity credentials wait for the control
        // thread. A USERHASH names a static user or nobody.
        let lookup = match user {
            Some(username) => self.keys.lookup(now.unix, username),
            None => {
                let hash = msg.get(attr::USERHASH).expect("checked above");
                match self.keys.lookup_userhash(hash) {
                    Some(c) => Lookup::Found(c),
                    None => Lookup::Refused,
                }
            }
        };
        let cred = match lookup {
            Lookup::Found(c) => c,
            Lookup::Refused => {
                self.counters.auth_fail(AuthFailure::Credential);
                return Authn::Reply(self.challenge(now, msg, client, code::UNAUTHORIZED));
            }
            Lookup::Pending => {
                let username = user.expect("a USERHASH is never pending");
                if !self.identity_limit.allow(now.unix, client.addr.ip()) {
                    return Authn::Reply(Answer::Drop(DropReason::RateLimited));
                }
                if self.keys.mark_pending(now.unix, username) && self.commands.len() < 1024 {
                    self.commands
                        .push_back(Command::ResolveIdentity(username.into()));
                }
                return Authn::Reply(Answer::Drop(DropReason::AuthPending));
            }
        };
        let kind = msg.integrity_kind().expect("checked has_integrity");
        let mut ok = match Self::auth_ok(&cred, &cred.key, algorithm, kind) {
            Some(ok) => ok,
            None => {
                self.counters.auth_fail(AuthFailure::Algorithm);
                return Authn::Reply(self.challenge(now, msg, client, code::UNAUTHORIZED));
            }
        };
        // Step 6: verify the MAC (constant time).
        let mut cred = cred;
        if !msg.verify_integrity(ok.key()) {
            let mut matched = None;
            if let (auth::CredentialKind::Rest, Some(username)) = (cred.kind, user) {
                for alt in self.keys.rest_alternates(username) {
                    if let Some(alt_ok) = Self::auth_ok(&cred, &alt, algorithm, kind) {
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
                    return Authn::Reply(self.challenge(now, msg, client, code::UNAUTHORIZED));
                }
            }
        }
        if let Some(username) = user {
            self.keys.remember(username, &cred);
        }
        Authn::Ok(ok)
    }

    /// RFC 8489 §9.2.4: "If the NONCE attribute starts with the 'nonce cookie' with the STUN
    /// Security Feature 'Password algorithms' bit set to 1, the server performs these checks
    /// in the order specified: If the request contains neither the PASSWORD-ALGORITHMS nor
    /// the PASSWORD-ALGORITHM algorithm, then the request is processed as though
    /// PASSWORD-ALGORITHM were MD5. Otherwise, unless (1) PASSWORD-ALGORITHM and
    /// PASSWORD-ALGORITHMS are both present, (2) PASSWORD-ALGORITHMS matches the value sent in
    /// the response that sent this NONCE, and (3) PASSWORD-ALGORITHM matches one of the
    /// entries in PASSWORD-ALGORITHMS, the server MUST generate an error response with an
    /// error code of 400 (Bad Request)." `None` means 400. Whether the nonce really announced
    /// the bit is checked next, with its MAC; a nonce without the cookie is not ours and gets
    /// 401 there. Every response that carries a nonce of ours carries the same list
    /// ([`auth::PASSWORD_ALGORITHMS_VALUE`]), so "the value sent" needs no memory.
    fn password_algorithm(msg: &Message<'_>, nonce: &[u8]) -> Option<PasswordAlgorithm> {
        let one = msg.get(attr::PASSWORD_ALGORITHM);
        let list = msg.get(attr::PASSWORD_ALGORITHMS);
        let announced =
            auth::nonce_features(nonce).is_some_and(|f| f & features::PASSWORD_ALGORITHMS != 0);
        if announced {
            match (one, list) {
                (None, None) => return Some(PasswordAlgorithm::Md5),
                (Some(a), Some(l))
                    if l == auth::PASSWORD_ALGORITHMS_VALUE
                        && l.chunks_exact(4).any(|entry| entry == a) => {}
                _ => return None,
            }
        }
        // PASSWORD-ALGORITHM (§14.12): MD5 or SHA-256, with no parameters.
        match one {
            None | Some([0, 1, 0, 0]) => Some(PasswordAlgorithm::Md5),
            Some([0, 2, 0, 0]) => Some(PasswordAlgorithm::Sha256),
            Some(_) => None,
        }
    }

    fn auth_ok(
        cred: &auth::Credential,
        key: &UserKey,
        algorithm: PasswordAlgorithm,
        kind: IntegrityKind,
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
            expires_at: cred.expires_at,
            source: cred.kind,
            identity: cred.identity,
        })
    }

    /// 401 or 438 with REALM, a fresh NONCE whose cookie announces the security features
    /// (RFC 8489 §9.2.1), and PASSWORD-ALGORITHMS, which "MUST" accompany a nonce that
    /// announces password algorithms (§9.2.4; a client that finds it missing gives up,
    /// §9.2.5). No MESSAGE-INTEGRITY: we have no key yet. Over the per-source limit nothing
    /// is sent.
    fn challenge(&mut self, now: Now, msg: &Message<'_>, client: ClientKey, code: u16) -> Answer {
        if !self.challenge_limit.allow(now.unix, client.addr.ip()) {
            return Answer::Drop(DropReason::RateLimited);
        }
        let cfg = self.keys.config();
        let features = cfg.features();
        let nonce = auth::make_nonce(now.unix, &cfg.nonce_key, features, client.addr);
        let realm_len = cfg.realm.len().min(MAX_REALM_NONCE);
        let mut realm = [0u8; MAX_REALM_NONCE];
        realm[..realm_len].copy_from_slice(&cfg.realm.as_bytes()[..realm_len]);
        self.error_reply_with(msg, code, None, |w| {
            w.add(attr::REALM, &realm[..realm_len])?;
            w.add(attr::NONCE, &nonce)?;
            if features & features::PASSWORD_ALGORITHMS != 0 {
                w.add(attr::PASSWORD_ALGORITHMS, &auth::PASSWORD_ALGORITHMS_VALUE)?;
            }
            Ok(())
        })
    }

    fn error_reply(&mut self, to: impl Into<Txn>, code: u16, ok: Option<&AuthOk>) -> Answer {
        self.error_reply_with(to, code, ok, |_| Ok(()))
    }

    fn error_reply_with(
        &mut self,
        to: impl Into<Txn>,
        code: u16,
        ok: Option<&AuthOk>,
        extra: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), stun::BufferFull>,
    ) -> Answer {
        self.counters.error_responses += 1;
        let txn = to.into();
        let written = MessageWriter::new(&mut self.scratch[..], txn.method, Class::Error, &txn.tid)
            .and_then(|mut w| {
                w.add_error(code)?;
                extra(&mut w)?;
                if let Some(ok) = ok {
                    w.add_integrity_kind(ok.kind, ok.key())?;
                }
                if txn.fingerprint {
                    w.add_fingerprint()?;
                }
                Ok(w.finish())
            });
        match written {
            Ok(n) => Answer::Respond(n),
            Err(stun::BufferFull) => Answer::Drop(DropReason::ResponseTooLarge),
        }
    }

    fn success_reply(
        &mut self,
        to: impl Into<Txn>,
        ok: &AuthOk,
        body: impl FnOnce(&mut MessageWriter<'_>) -> Result<(), stun::BufferFull>,
    ) -> Answer {
        let txn = to.into();
        let written =
            MessageWriter::new(&mut self.scratch[..], txn.method, Class::Success, &txn.tid)
                .and_then(|mut w| {
                    body(&mut w)?;
                    w.add_integrity_kind(ok.kind, ok.key())?;
                    if txn.fingerprint {
                        w.add_fingerprint()?;
                    }
                    Ok(w.finish())
                });
        match written {
            Ok(n) => Answer::Respond(n),
            Err(stun::BufferFull) => Answer::Drop(DropReason::ResponseTooLarge),
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
    ) -> Answer {
        // An Allocate left waiting by a caller that never reported its bind is abandoned.
        self.abandon_pending();
        // Step 2: an existing allocation on this 5-tuple. A retransmission of the request that
        // created it gets the same success again; anything else is 437.
        if let Some(&slot) = self.by_client.get(&client) {
            let a = self.allocs[slot as usize].as_ref().expect("live");
            if &a.tid == msg.transaction_id() {
                return self.allocate_success(now, Txn::from(msg), ok, slot, false);
            }
            return self.error_reply(msg, code::ALLOCATION_MISMATCH, Some(ok));
        }
        // Load spreading (RFC 8656 §7.2, RFC 8489 §10): while this node drains or is over a
        // load limit, a new allocation is sent to the alternate of the client's family. This
        // comes after authentication, as RFC 8489 §10 advises, so that the redirect tells an
        // unauthenticated prober nothing; the response carries MESSAGE-INTEGRITY.
        let draining = self.draining || self.shared.load.draining();
        let over = self.cfg.redirect_above_allocations > 0
            && self.shared.quotas.total() >= self.cfg.redirect_above_allocations;
        if draining || over || self.shared.load.overloaded() {
            if let Some(alt) = self.cfg.alternates.for_client(&client.addr) {
                self.counters.allocations_redirected += 1;
                // The name the alternate's certificate is for, when the client must check one.
                let domain = match self.cfg.transport(client.listener) {
                    Transport::Tls | Transport::Dtls => self.cfg.alternates.domain.clone(),
                    _ => None,
                };
                return self.error_reply_with(msg, code::TRY_ALTERNATE, Some(ok), |w| {
                    let mut v = [0u8; 20];
                    let n = stun::encode_addr(alt, &mut v);
                    w.add(attr::ALTERNATE_SERVER, &v[..n])?;
                    if let Some(d) = &domain {
                        w.add(attr::ALTERNATE_DOMAIN, d.as_bytes())?;
                    }
                    Ok(())
                });
            }
            if draining || self.shared.load.overloaded() {
                self.counters.allocations_refused_capacity += 1;
                return self.error_reply(msg, code::INSUFFICIENT_CAPACITY, Some(ok));
            }
        }
        // Step 3: REQUESTED-TRANSPORT must be present (400) and UDP or, over a stream, TCP
        // (RFC 6062 §5.1), else 442.
        let tcp = match msg.get(attr::REQUESTED_TRANSPORT) {
            None => return self.error_reply(msg, code::BAD_REQUEST, Some(ok)),
            Some(v) if v.len() != 4 => return self.error_reply(msg, code::BAD_REQUEST, Some(ok)),
            Some(v) if v[0] == 17 => false,
            Some(v) if v[0] == 6 && self.cfg.tcp_relay => {
                // A TCP allocation needs a TCP or TLS control connection.
                if !self.cfg.transport(client.listener).is_stream() {
                    return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
                }
                true
            }
            Some(_) => return self.error_reply(msg, code::UNSUPPORTED_TRANSPORT, Some(ok)),
        };
        let token = msg.get(attr::RESERVATION_TOKEN);
        let even = msg.get(attr::EVEN_PORT);
        let requested = msg.get(attr::REQUESTED_ADDRESS_FAMILY);
        let additional = msg.get(attr::ADDITIONAL_ADDRESS_FAMILY);
        // RFC 6062 §5.1: no EVEN-PORT or RESERVATION-TOKEN on a TCP allocation; and one
        // family only (a listening socket per relayed address).
        if tcp && (token.is_some() || even.is_some() || additional.is_some()) {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
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
            if additional.is_some() {
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
        let username: Box<[u8]> = self.user_of(msg).expect("authenticated").into();
        // Step 8: quotas, counted by the identity behind the credential (never by IP, and
        // never by the raw USERNAME, which a REST client rotates with each expiry and an
        // identity with each re-issue).
        let quota = quota_key(ok, &username);
        if !self.shared.quotas.try_acquire(&quota) {
            self.counters.allocations_refused_quota += 1;
            return self.error_reply(msg, code::ALLOCATION_QUOTA_REACHED, Some(ok));
        }
        let lifetime = self.clamp_lifetime(msg.get_u32(attr::LIFETIME), false);
        let mut pending = PendingAllocate {
            ticket: BindTicket(0),
            client,
            txn: Txn::from(msg),
            username,
            quota,
            ok: ok.clone(),
            v4: want_v4,
            v6: want_v6,
            v6_error,
            lifetime,
            port: RelayPort::new(0, 0),
            search: PortSearch::Reserved,
            tcp,
        };
        // Pick the relay port: the reserved one, a warm one, or the next free one.
        let first = if let Some(t) = token {
            let t = u64::from_be_bytes(t.try_into().expect("length checked"));
            match self.reservations.remove(&t) {
                // The reserved port was held in `port_used` since the EVEN-PORT Allocate.
                Some((p, exp)) if exp > now.ms => Some(p),
                Some((p, _)) => {
                    self.release_port(p);
                    None
                }
                None => None,
            }
        } else {
            let even = even.map(|e| (true, e[0] & 0x80 != 0));
            let (even, reserve_next) = even.unwrap_or((false, false));
            pending.search = PortSearch::Scan {
                even,
                reserve_next,
                examined: 0,
                failures: 0,
            };
            if !even && want_v4 != want_v6 && !tcp {
                if let Some(p) = self.take_warm(if want_v4 { Family::V4 } else { Family::V6 }) {
                    pending.search = PortSearch::Warm { even };
                    Some(p)
                } else {
                    self.scan_port(&mut pending)
                }
            } else {
                self.scan_port(&mut pending)
            }
        };
        match first {
            Some(port) => Answer::Bind(self.request_bind(pending, port)),
            None => self.allocate_failed(pending),
        }
    }

    /// Record `pending` as waiting for `port` and ask for the bind.
    fn request_bind(&mut self, mut pending: PendingAllocate, port: RelayPort) -> BindRequest {
        let ticket = BindTicket(self.next_ticket);
        self.next_ticket += 1;
        pending.ticket = ticket;
        pending.port = port;
        let req = BindRequest {
            ticket,
            port,
            v4: pending.v4,
            v6: pending.v6,
            tcp: pending.tcp,
        };
        self.pending = Some(pending);
        req
    }

    /// The caller bound (or failed to bind) the relay port of a [`Reply::Bind`]. Answers with
    /// the Allocate's response, or with the next port to try.
    pub fn handle_bound(&mut self, now: Now, ticket: BindTicket, bound: bool) -> Reply {
        let Some(mut p) = self.pending.take_if(|p| p.ticket == ticket) else {
            return self.drop(DropReason::StaleBind);
        };
        let client = p.client;
        if bound {
            let answer = self.finish_allocate(now, p);
            return self.reply(client, answer);
        }
        self.release_port(p.port);
        let next = match &mut p.search {
            PortSearch::Reserved => None,
            PortSearch::Warm { even } => {
                // A warm socket is open, so this should not happen; scan as if it had not
                // been offered.
                p.search = PortSearch::Scan {
                    even: *even,
                    reserve_next: false,
                    examined: 0,
                    failures: 1,
                };
                self.scan_port(&mut p)
            }
            PortSearch::Scan { failures, .. } => {
                *failures += 1;
                if *failures >= MAX_BIND_FAILURES {
                    None
                } else {
                    self.scan_port(&mut p)
                }
            }
        };
        let answer = match next {
            Some(port) => Answer::Bind(self.request_bind(p, port)),
            None => self.allocate_failed(p),
        };
        self.reply(client, answer)
    }

    /// No port for this Allocate: give its quota back and answer 508 (RFC 8656 §7.2 step 5
    /// for a RESERVATION-TOKEN this shard does not hold: unknown, used, expired, or held by
    /// another shard when steering spreads one client address's ports over shards).
    fn allocate_failed(&mut self, p: PendingAllocate) -> Answer {
        self.shared.quotas.release(&p.quota);
        if matches!(p.search, PortSearch::Reserved) {
            self.counters.allocations_refused_reservation += 1;
        } else {
            self.counters.allocations_refused_capacity += 1;
        }
        self.error_reply(p.txn, code::INSUFFICIENT_CAPACITY, Some(&p.ok))
    }

    /// Forget an Allocate whose bind was never reported (the caller broke the run-loop
    /// contract): its quota and port go back, and if the socket was bound after all, the
    /// release closes it.
    fn abandon_pending(&mut self) {
        if let Some(p) = self.pending.take() {
            self.shared.quotas.release(&p.quota);
            self.release_port(p.port);
            for (on, family) in [(p.v4, Family::V4), (p.v6, Family::V6)] {
                if on {
                    self.commands.push_back(if p.tcp {
                        Command::Tcp(TcpCommand::CloseListener {
                            family,
                            port: p.port,
                        })
                    } else {
                        Command::Release {
                            family,
                            port: p.port,
                            keep: false,
                        }
                    });
                }
            }
        }
    }

    /// The port is bound: install the allocation and answer with its success.
    fn finish_allocate(&mut self, now: Now, p: PendingAllocate) -> Answer {
        let port = p.port;
        // EVEN-PORT with the R bit: hold the next port for a later Allocate with the token.
        let mut reservation = None;
        if let PortSearch::Scan {
            reserve_next: true, ..
        } = p.search
        {
            let t = self.next_random();
            let next = RelayPort::new(port.addr, port.port + 1);
            let i = self.port_index(next);
            self.port_used[i] = true;
            let exp = now.ms + self.cfg.reservation_lifetime as u64 * 1000;
            self.reservations.insert(t, (next, exp));
            self.wheel.insert(exp, TimerKey::Reservation { token: t });
            reservation = Some(t);
        }
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let alloc = Allocation {
            generation,
            client: p.client,
            username: p.username,
            quota: p.quota,
            credential_expires: p.ok.expires_at,
            port,
            v4: p.v4,
            v6: p.v6,
            expires_ms: now.ms + p.lifetime as u64 * 1000,
            tid: p.txn.tid,
            reservation,
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
            tcp: p.tcp,
            connections: Vec::new(),
            created_ms: now.ms,
            bytes_to_peer: 0,
            bytes_to_client: 0,
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
        self.by_client.insert(p.client, slot);
        let pi = self.port_index(port);
        self.by_port[pi] = slot;
        self.shared.relay_ports.set(port.addr, port.port, true);
        self.arm(slot);
        self.counters.allocations_created += 1;
        if p.tcp {
            self.counters.tcp_allocations_created += 1;
        }
        self.allocate_success(now, p.txn, &p.ok, slot, p.v6_error)
    }

    fn allocate_success(
        &mut self,
        now: Now,
        txn: Txn,
        ok: &AuthOk,
        slot: u32,
        v6_error: bool,
    ) -> Answer {
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
        self.success_reply(txn, ok, |w| {
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

    /// A released port whose socket is still open, chosen at random among the warm ones (so
    /// the port a client gets next is not predictable from the last one released).
    fn take_warm(&mut self, family: Family) -> Option<RelayPort> {
        let n_addr = match family {
            Family::V4 => self.cfg.relay_v4.len(),
            Family::V6 => self.cfg.relay_v6.len(),
        };
        let len = match family {
            Family::V4 => self.warm_v4.len(),
            Family::V6 => self.warm_v6.len(),
        };
        if len == 0 {
            return None;
        }
        let i = (self.next_random() % len as u64) as usize;
        let port = match family {
            Family::V4 => self.warm_v4.swap_remove(i),
            Family::V6 => self.warm_v6.swap_remove(i),
        };
        let idx = self.port_index(port);
        if let Some(w) = self.port_warm.get_mut(idx) {
            *w &= !warm_bit(family);
        }
        if (port.addr as usize) >= n_addr || idx >= self.port_used.len() || self.port_used[idx] {
            // Cannot be handed out (relay addresses changed under it): close it.
            self.commands.push_back(Command::Release {
                family,
                port,
                keep: false,
            });
            return None;
        }
        self.port_used[idx] = true;
        Some(port)
    }

    /// Continue `p`'s scan of this shard's (address, port) pairs from the cursor; the port
    /// returned is marked used.
    fn scan_port(&mut self, p: &mut PendingAllocate) -> Option<RelayPort> {
        let PortSearch::Scan {
            even,
            reserve_next,
            examined,
            ..
        } = &mut p.search
        else {
            return None;
        };
        let total = self.port_used.len();
        let span = self.port_span();
        // Addresses usable for this family mix: dual-stack allocations need index i in both.
        let n_addr = match (p.v4, p.v6) {
            (true, true) => self.cfg.relay_v4.len().min(self.cfg.relay_v6.len()),
            (true, false) => self.cfg.relay_v4.len(),
            (false, true) => self.cfg.relay_v6.len(),
            (false, false) => 0,
        };
        while *examined < total {
            let idx = (self.port_cursor + *examined) % total;
            *examined += 1;
            let (ai, off) = (idx / span, idx % span);
            let port = self.cfg.port_min as usize + off;
            if ai >= n_addr || self.port_used[idx] || (*even && !port.is_multiple_of(2)) {
                continue;
            }
            if *reserve_next && (off + 1 >= span || self.port_used[idx + 1]) {
                continue;
            }
            self.port_used[idx] = true;
            self.port_cursor = (idx + 1) % total;
            *examined = 0;
            let found = RelayPort::new(ai as u8, port as u16);
            if self.port_warm[idx] != 0 {
                self.claim_warm(idx, found, p.v4, p.v6, p.tcp);
            }
            return Some(found);
        }
        None
    }

    /// A scan picked a port whose socket is still open from an earlier allocation: it is no
    /// longer warm. A socket the new allocation binds again (same family, UDP) is reused;
    /// any other is closed.
    fn claim_warm(&mut self, idx: usize, port: RelayPort, v4: bool, v6: bool, tcp: bool) {
        for (family, wanted) in [(Family::V4, v4), (Family::V6, v6)] {
            if self.port_warm[idx] & warm_bit(family) == 0 {
                continue;
            }
            self.port_warm[idx] &= !warm_bit(family);
            let warm = match family {
                Family::V4 => &mut self.warm_v4,
                Family::V6 => &mut self.warm_v6,
            };
            if let Some(i) = warm.iter().position(|p| *p == port) {
                warm.swap_remove(i);
            }
            if !wanted || tcp {
                self.commands.push_back(Command::Release {
                    family,
                    port,
                    keep: false,
                });
            }
        }
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
    ) -> Result<u32, Answer> {
        let Some(&slot) = self.by_client.get(&client) else {
            return Err(self.error_reply(msg, code::ALLOCATION_MISMATCH, Some(ok)));
        };
        let a = self.allocs[slot as usize].as_ref().expect("live");
        if self.user_of(msg) != Some(&a.username[..]) {
            return Err(self.error_reply(msg, code::WRONG_CREDENTIALS, Some(ok)));
        }
        Ok(slot)
    }

    /// The username of an authenticated request: its USERNAME, or the static user its
    /// USERHASH names.
    fn user_of<'m>(&'m self, msg: &Message<'m>) -> Option<&'m [u8]> {
        match msg.get(attr::USERNAME) {
            Some(name) => Some(name),
            None => self.keys.user_of_hash(msg.get(attr::USERHASH)?),
        }
    }

    fn handle_refresh(
        &mut self,
        now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        ok: &AuthOk,
    ) -> Answer {
        let slot = match self.owned_allocation(client, msg, ok) {
            Ok(s) => s,
            Err(a) => return a,
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
            self.free_allocation(slot);
            self.counters.allocations_deleted += 1;
        } else {
            let a = self.allocs[slot as usize].as_mut().expect("live");
            a.expires_ms = now.ms + lifetime as u64 * 1000;
            a.credential_expires = ok.expires_at;
            self.arm(slot);
        }
        self.success_reply(msg, ok, |w| w.add_u32(attr::LIFETIME, lifetime))
    }

    /// The request's XOR-PEER-ADDRESS (400 when missing or malformed), allowed by the peer
    /// policy for allocation `slot` (its error code otherwise).
    fn request_peer(
        &mut self,
        slot: u32,
        msg: &Message,
        ok: &AuthOk,
    ) -> Result<SocketAddr, Answer> {
        let peer = match msg.get_xor_addr(attr::XOR_PEER_ADDRESS) {
            Some(Ok(p)) => p,
            _ => return Err(self.error_reply(msg, code::BAD_REQUEST, Some(ok))),
        };
        if let Err(c) = self.check_peer(slot, peer) {
            return Err(self.error_reply(msg, c, Some(ok)));
        }
        Ok(peer)
    }

    /// Validate a peer address for this allocation: family (443) and policy (403).
    fn check_peer(&mut self, slot: u32, peer: SocketAddr) -> Result<(), u16> {
        let a = self.allocs[slot as usize].as_ref().expect("live");
        if !a.has_family(Family::of(&peer)) {
            return Err(code::PEER_ADDRESS_FAMILY_MISMATCH);
        }
        match self.cfg.policy.check(peer, &self.shared.relay_ports) {
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
    ) -> Answer {
        let slot = match self.owned_allocation(client, msg, ok) {
            Ok(s) => s,
            Err(a) => return a,
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
    ) -> Answer {
        let slot = match self.owned_allocation(client, msg, ok) {
            Ok(s) => s,
            Err(a) => return a,
        };
        // RFC 6062 §6: no channels on a TCP allocation.
        if self.allocs[slot as usize].as_ref().expect("live").tcp {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        // RFC 8656 §11.2: CHANNEL-NUMBER in 0x4000-0x4FFF and an XOR-PEER-ADDRESS, else 400.
        let number = match msg.get(attr::CHANNEL_NUMBER) {
            Some(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return self.error_reply(msg, code::BAD_REQUEST, Some(ok)),
        };
        if !(channel::MIN..=self.cfg.channel_max).contains(&number) {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        let peer = match self.request_peer(slot, msg, ok) {
            Ok(p) => p,
            Err(a) => return a,
        };
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
    ) -> Reply {
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
        // RFC 6062 §6: no Send indications on a TCP allocation.
        if !a.has_family(Family::of(&peer)) || a.tcp {
            return self.drop(DropReason::BadIndication);
        }
        if !a.permitted(now.ms, peer.ip()) {
            return self.drop(DropReason::NoPermission);
        }
        // The permission was policy-checked when installed, but the port was not: a Send to
        // one of our own service ports on a permitted IP is refused here.
        if self
            .cfg
            .policy
            .check(peer, &self.shared.relay_ports)
            .is_err()
        {
            self.counters.peers_denied += 1;
            return self.drop(DropReason::PeerDenied);
        }
        let rate = self.cfg.max_bytes_per_sec;
        let a = self.allocs[slot as usize].as_mut().expect("live");
        if !a.to_peer.take(now.ms, rate, range.len()) {
            return self.drop(DropReason::Bandwidth);
        }
        a.bytes_to_peer += range.len() as u64;
        let port = a.port;
        self.counters.relayed_to_peer += 1;
        // `range` is relative to the message, which starts at `start` in the caller's buffer.
        Reply::Transmit(Transmit {
            src: Src::Relay(Family::of(&peer), port),
            dst: peer,
            data: Data::Buf(start + range.start..start + range.end),
        })
    }

    // ----------------------------------------------------------------------------------------
    // TCP allocations (RFC 6062)
    // ----------------------------------------------------------------------------------------

    /// A fresh connection id of this shard (the shard in the top byte).
    fn new_connection_id(&mut self) -> ConnectionId {
        loop {
            let low = self.next_connection;
            self.next_connection = (low + 1) & 0x00FF_FFFF;
            let id = ((self.cfg.shard as u32) << 24) | low;
            if !self.tcp_conns.contains_key(&id) {
                return ConnectionId(id);
            }
        }
    }

    /// Drop connection `id` from the tables (its allocation's list included).
    fn forget_connection(&mut self, id: ConnectionId) {
        if let Some(c) = self.tcp_conns.remove(&id.0) {
            if let Some(a) = self
                .allocs
                .get_mut(c.alloc as usize)
                .and_then(|a| a.as_mut())
            {
                if a.generation == c.generation {
                    a.connections.retain(|x| *x != id);
                }
            }
        }
    }

    /// Record a new peer data connection of allocation `slot`.
    fn add_connection(&mut self, slot: u32, peer: SocketAddr, state: TcpState) -> ConnectionId {
        let id = self.new_connection_id();
        let a = self.allocs[slot as usize].as_mut().expect("live");
        a.connections.push(id);
        let generation = a.generation;
        if let TcpState::Ready { deadline_ms } = state {
            self.wheel
                .insert(deadline_ms, TimerKey::Connection { id: id.0 });
        }
        self.tcp_conns.insert(
            id.0,
            TcpConnection {
                alloc: slot,
                generation,
                peer,
                state,
            },
        );
        id
    }

    /// RFC 6062 §5.2: open a connection to the peer from the relayed address. The answer
    /// comes with [`Server::handle_peer_connected`].
    fn handle_connect(
        &mut self,
        _now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        ok: &AuthOk,
    ) -> Answer {
        let slot = match self.owned_allocation(client, msg, ok) {
            Ok(s) => s,
            Err(a) => return a,
        };
        let a = self.allocs[slot as usize].as_ref().expect("live");
        if !a.tcp {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        let peer = match self.request_peer(slot, msg, ok) {
            Ok(p) => p,
            Err(a) => return a,
        };
        let a = self.allocs[slot as usize].as_ref().expect("live");
        // A connection to this peer being made, waiting or joined: 446.
        if a.connections
            .iter()
            .any(|id| self.tcp_conns.get(&id.0).is_some_and(|c| c.peer == peer))
        {
            return self.error_reply(msg, code::CONNECTION_ALREADY_EXISTS, Some(ok));
        }
        if a.connections.len() >= self.cfg.max_tcp_connections {
            return self.error_reply(msg, code::INSUFFICIENT_CAPACITY, Some(ok));
        }
        let port = a.port;
        let id = self.add_connection(
            slot,
            peer,
            TcpState::Connecting {
                txn: Txn::from(msg),
                ok: ok.clone(),
            },
        );
        self.commands.push_back(Command::Tcp(TcpCommand::Connect {
            id,
            family: Family::of(&peer),
            port,
            peer,
        }));
        Answer::Pending
    }

    /// The I/O layer's outcome of a [`TcpCommand::Connect`]: the Connect's success (with the
    /// CONNECTION-ID) or 447, for the allocation's control connection. The I/O layer gives up
    /// on a connection attempt after at least 30 seconds (RFC 6062 §5.2).
    pub fn handle_peer_connected(&mut self, now: Now, id: ConnectionId, connected: bool) -> Reply {
        let Some(c) = self.tcp_conns.get_mut(&id.0) else {
            return self.drop(DropReason::NoAllocation);
        };
        let TcpState::Connecting { txn, ok } = &c.state else {
            return self.drop(DropReason::NoAllocation);
        };
        let (txn, ok) = (*txn, ok.clone());
        let (slot, generation) = (c.alloc, c.generation);
        let Some(client) = self
            .allocs
            .get(slot as usize)
            .and_then(|a| a.as_ref())
            .filter(|a| a.generation == generation)
            .map(|a| a.client)
        else {
            self.tcp_conns.remove(&id.0);
            return self.drop(DropReason::NoAllocation);
        };
        let answer = if connected {
            let deadline_ms = now.ms + self.cfg.connection_bind_timeout as u64 * 1000;
            c.state = TcpState::Ready { deadline_ms };
            self.wheel
                .insert(deadline_ms, TimerKey::Connection { id: id.0 });
            self.counters.tcp_connects += 1;
            self.success_reply(txn, &ok, |w| w.add_u32(attr::CONNECTION_ID, id.0))
        } else {
            self.forget_connection(id);
            self.counters.tcp_connect_failures += 1;
            self.error_reply(txn, code::CONNECTION_TIMEOUT_OR_FAILURE, Some(&ok))
        };
        self.reply(client, answer)
    }

    /// RFC 6062 §5.3: a peer connected to the relayed address (`family`, `port`) of a TCP
    /// allocation. With a permission for the peer (and within policy and the allocation's
    /// connection limit) the connection gets an id and the client a ConnectionAttempt
    /// indication (the returned transmit); `None`: close it at once.
    pub fn handle_peer_accepted(
        &mut self,
        now: Now,
        family: Family,
        port: RelayPort,
        from: SocketAddr,
    ) -> Option<(ConnectionId, Reply)> {
        let slot = (port.port >= self.cfg.port_min && port.port <= self.cfg.port_max)
            .then(|| self.by_port.get(self.port_index(port)).copied())
            .flatten()
            .filter(|s| *s != u32::MAX);
        let admitted = slot.is_some_and(|slot| {
            let a = self.allocs[slot as usize]
                .as_ref()
                .expect("indexed slot is live");
            a.tcp
                && a.has_family(family)
                && a.permitted(now.ms, from.ip())
                && a.connections.len() < self.cfg.max_tcp_connections
                && self
                    .cfg
                    .policy
                    .check(from, &self.shared.relay_ports)
                    .is_ok()
        });
        let (true, Some(slot)) = (admitted, slot) else {
            self.counters.tcp_peer_connections_refused += 1;
            return None;
        };
        let deadline_ms = now.ms + self.cfg.connection_bind_timeout as u64 * 1000;
        let id = self.add_connection(slot, from, TcpState::Ready { deadline_ms });
        let client = self.allocs[slot as usize].as_ref().expect("live").client;
        let mut tid = [0u8; 12];
        tid[..8].copy_from_slice(&self.next_random().to_be_bytes());
        tid[8..].copy_from_slice(&id.0.to_be_bytes());
        let written = MessageWriter::new(
            &mut self.scratch[..],
            method::CONNECTION_ATTEMPT,
            Class::Indication,
            &tid,
        )
        .and_then(|mut w| {
            w.add_xor_addr(attr::XOR_PEER_ADDRESS, from)?;
            w.add_u32(attr::CONNECTION_ID, id.0)?;
            Ok(w.finish())
        });
        let Ok(n) = written else {
            self.forget_connection(id);
            return None;
        };
        self.counters.tcp_peer_connections_accepted += 1;
        Some((id, self.reply(client, Answer::Respond(n))))
    }

    /// For a ConnectionBind over a stream that names a known connection: the address of the
    /// control connection of the allocation it belongs to.
    fn connection_bind_session(&self, client: ClientKey, msg: &Message<'_>) -> Option<SocketAddr> {
        if msg.method() != method::CONNECTION_BIND
            || !self.cfg.transport(client.listener).is_stream()
        {
            return None;
        }
        let c = self.tcp_conns.get(&msg.get_u32(attr::CONNECTION_ID)?)?;
        self.allocs
            .get(c.alloc as usize)?
            .as_ref()
            .filter(|a| a.generation == c.generation)
            .map(|a| a.client.addr)
    }

    /// RFC 6062 §5.4: join this (new) client connection to a waiting peer data connection.
    fn handle_connection_bind(
        &mut self,
        _now: Now,
        client: ClientKey,
        msg: &Message<'_>,
        ok: &AuthOk,
    ) -> Answer {
        // Over a stream only, and on a connection that is not a control connection.
        if !self.cfg.transport(client.listener).is_stream() || self.by_client.contains_key(&client)
        {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        let Some(id) = msg.get_u32(attr::CONNECTION_ID) else {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        };
        let Some(c) = self.tcp_conns.get(&id) else {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        };
        if !matches!(c.state, TcpState::Ready { .. }) {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        }
        let Some(a) = self
            .allocs
            .get(c.alloc as usize)
            .and_then(|a| a.as_ref())
            .filter(|a| a.generation == c.generation)
        else {
            return self.error_reply(msg, code::BAD_REQUEST, Some(ok));
        };
        // The data connection belongs to whoever made the allocation (a USERHASH resolved).
        if self.user_of(msg) != Some(&a.username[..]) {
            return self.error_reply(msg, code::WRONG_CREDENTIALS, Some(ok));
        }
        if let Some(c) = self.tcp_conns.get_mut(&id) {
            c.state = TcpState::Bound;
        }
        self.counters.tcp_connection_binds += 1;
        self.commands.push_back(Command::Tcp(TcpCommand::Splice {
            id: ConnectionId(id),
            client,
        }));
        self.success_reply(msg, ok, |_| Ok(()))
    }

    /// The I/O layer closed peer data connection `id` (either side of it ended, or a pending
    /// one was refused): the core forgets it, so the peer may be connected to again.
    pub fn handle_connection_closed(&mut self, id: ConnectionId) {
        self.forget_connection(id);
    }

    /// Peer data connections known now (pending and joined), all allocations.
    pub fn tcp_connection_count(&self) -> usize {
        self.tcp_conns.len()
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
    ) -> Reply {
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
        if a.tcp {
            // A UDP socket still open on a TCP allocation's port (warm from before).
            return self.drop(DropReason::NoAllocation);
        }
        if !a.has_family(family) || !a.permitted(now.ms, from.ip()) {
            return self.drop(DropReason::NoPermission);
        }
        if !a.to_client.take(now.ms, rate, range.len()) {
            return self.drop(DropReason::Bandwidth);
        }
        a.bytes_to_client += range.len() as u64;
        let client = a.client;
        let framed = match a
            .channels
            .iter()
            .find(|c| c.peer == from && c.expires_ms > now.ms)
        {
            // ChannelData: a 4-byte header in the headroom; padding only toward a stream.
            Some(c) => {
                let padded = self.cfg.transport(client.listener).is_stream();
                channel::frame_in_place(buf, range, c.number, padded)
            }
            // Data indication: header, XOR-PEER-ADDRESS and DATA header before the payload,
            // zero padding after it.
            None => {
                let mut tid = [0u8; 12];
                tid[..8].copy_from_slice(&self.next_random().to_be_bytes());
                tid[8..].copy_from_slice(&(self.counters.relayed_to_client as u32).to_be_bytes());
                stun::frame_data_indication(buf, range, &tid, from)
            }
        };
        let Some(framed) = framed else {
            return self.drop(DropReason::Malformed);
        };
        self.counters.relayed_to_client += 1;
        Reply::Transmit(Transmit {
            src: Src::Listener(client.listener),
            dst: client.addr,
            data: Data::Buf(framed),
        })
    }

    /// A client's stream connection (TCP, TLS) closed: over a stream the connection is the
    /// allocation's 5-tuple, so its allocation ends now (RFC 8656 §3.1), counted as deleted.
    pub fn handle_client_closed(&mut self, now: Now, client: ClientKey) {
        let _ = now;
        if let Some(&slot) = self.by_client.get(&client) {
            self.free_allocation(slot);
            self.counters.allocations_deleted += 1;
        }
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
    pub fn handle_timeout(&mut self, now: Now) {
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
                TimerKey::Connection { id } => {
                    // A peer data connection that got no ConnectionBind in time closes.
                    let due = matches!(
                        self.tcp_conns.get(&id).map(|c| &c.state),
                        Some(TcpState::Ready { deadline_ms }) if *deadline_ms <= now.ms
                    );
                    if due {
                        self.forget_connection(ConnectionId(id));
                        self.commands
                            .push_back(Command::Tcp(TcpCommand::Close(ConnectionId(id))));
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
                        self.free_allocation(slot);
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
        self.compact_timers();
    }

    /// Drop the wheel's stale entries once they outnumber the live ones: an allocation
    /// deleted long before its deadline (churn) leaves its entry until that deadline, up to
    /// the maximum lifetime, so without this a client churning allocations would hold memory
    /// in proportion to its rate times the lifetime.
    fn compact_timers(&mut self) {
        let live = self.by_client.len() + self.reservations.len() + self.tcp_conns.len();
        if self.wheel.len() <= 2 * live + TIMER_SLACK {
            return;
        }
        let (allocs, reservations, tcp_conns) = (&self.allocs, &self.reservations, &self.tcp_conns);
        self.wheel.retain(|tick, key| match *key {
            TimerKey::Allocation { slot, generation } => allocs
                .get(slot as usize)
                .and_then(|a| a.as_ref())
                .is_some_and(|a| a.generation == generation && a.armed == tick),
            TimerKey::Reservation { token } => reservations.contains_key(&token),
            TimerKey::Connection { id } => tcp_conns.contains_key(&id),
        });
    }

    fn free_allocation(&mut self, slot: u32) {
        let Some(a) = self.allocs[slot as usize].take() else {
            return;
        };
        // The relay sockets go back to the I/O layer: kept open (warm) while the pool has
        // room, closed otherwise. A dual-stack port is never warm (warm ports serve
        // single-family allocations), nor a TCP allocation's listening socket.
        let single = a.v4 != a.v6 && !a.tcp;
        let pi = self.port_index(a.port);
        for (on, family) in [(a.v4, Family::V4), (a.v6, Family::V6)] {
            if !on {
                continue;
            }
            if a.tcp {
                self.commands
                    .push_back(Command::Tcp(TcpCommand::CloseListener {
                        family,
                        port: a.port,
                    }));
                continue;
            }
            let warm = match family {
                Family::V4 => &mut self.warm_v4,
                Family::V6 => &mut self.warm_v6,
            };
            let keep = single && warm.len() < self.cfg.relay_socket_pool;
            if keep {
                warm.push(a.port);
                self.port_warm[pi] |= warm_bit(family);
            }
            self.commands.push_back(Command::Release {
                family,
                port: a.port,
                keep,
            });
        }
        // Its peer data connections close with it (RFC 6062 §5.5).
        for id in &a.connections {
            if self.tcp_conns.remove(&id.0).is_some() {
                self.commands
                    .push_back(Command::Tcp(TcpCommand::Close(*id)));
            }
        }
        self.by_client.remove(&a.client);
        self.by_port[pi] = u32::MAX;
        self.release_port(a.port);
        self.shared.relay_ports.set(a.port.addr, a.port.port, false);
        self.shared.quotas.release(&a.quota);
        self.free_slots.push(slot);
    }

    /// The live allocations, for the session admin (appended to `out`, in slot order). Not on
    /// any packet path: an operator's query walks them all.
    pub fn sessions(&self, now: Now, out: &mut Vec<Session>) {
        for (slot, a) in self.allocs.iter().enumerate() {
            let Some(a) = a else { continue };
            let mut relayed = Vec::new();
            for (on, addrs) in [(a.v4, &self.cfg.relay_v4), (a.v6, &self.cfg.relay_v6)] {
                if let Some(ip) = addrs.get(a.port.addr as usize).filter(|_| on) {
                    relayed.push(SocketAddr::new(*ip, a.port.port));
                }
            }
            out.push(Session {
                id: self.session_id(slot as u32, a.generation),
                user: a.username.clone(),
                client: a.client.addr,
                transport: self.cfg.transport(a.client.listener),
                relayed,
                tcp: a.tcp,
                age_secs: now.ms.saturating_sub(a.created_ms) / 1000,
                expires_in_secs: a.expires_ms.saturating_sub(now.ms) / 1000,
                bytes_to_peer: a.bytes_to_peer,
                bytes_to_client: a.bytes_to_client,
                permissions: a.permissions.len(),
                channels: a.channels.len(),
            });
        }
    }

    fn session_id(&self, slot: u32, generation: u32) -> u64 {
        (self.cfg.shard as u64) << 56 | (slot as u64 & 0xFF_FFFF) << 32 | generation as u64
    }

    /// End the allocations `which` names, as if they had expired: their relay sockets are
    /// released, and the client's next request on them gets 437. Returns how many ended.
    pub fn disconnect(&mut self, which: &Disconnect) -> usize {
        let mut ended = 0;
        for slot in 0..self.allocs.len() as u32 {
            let hit = match (&self.allocs[slot as usize], which) {
                (Some(a), Disconnect::User(u)) => &a.username == u,
                (Some(a), Disconnect::Allocation(id)) => self.session_id(slot, a.generation) == *id,
                (None, _) => false,
            };
            if hit {
                self.free_allocation(slot);
                self.counters.allocations_disconnected += 1;
                ended += 1;
            }
        }
        ended
    }

    /// Delete every allocation and release every relay socket, warm ones included (final
    /// shutdown).
    pub fn close_all(&mut self) {
        self.abandon_pending();
        self.cfg.relay_socket_pool = 0;
        for slot in 0..self.allocs.len() as u32 {
            if self.allocs[slot as usize].is_some() {
                self.free_allocation(slot);
            }
        }
        for (family, warm) in [
            (Family::V4, std::mem::take(&mut self.warm_v4)),
            (Family::V6, std::mem::take(&mut self.warm_v6)),
        ] {
            for port in warm {
                self.commands.push_back(Command::Release {
                    family,
                    port,
                    keep: false,
                });
            }
        }
        self.port_warm.iter_mut().for_each(|w| *w = 0);
    }
}

fn warm_bit(f: Family) -> u8 {
    match f {
        Family::V4 => 1,
        Family::V6 => 2,
    }
}

/// The key an allocation quota is counted under: the identity behind the credential, in a
/// namespace per credential source. A static user by name; a TURN REST credential
/// `<expiry>:<name>` by its `<name>`; an Actrix identity by the actor behind it (the digest the
/// control thread derived from the verified claims).
fn quota_key(ok: &AuthOk, username: &[u8]) -> Box<[u8]> {
    let (tag, id): (u8, &[u8]) = match (ok.source, &ok.identity) {
        (CredentialKind::Identity, Some(actor)) => (b'i', actor),
        (CredentialKind::Rest, _) => (b'r', auth::rest_name(username).unwrap_or(username)),
        _ => (b's', username),
    };
    let mut key = Vec::with_capacity(1 + id.len());
    key.push(tag);
    key.extend_from_slice(id);
    key.into_boxed_slice()
}

fn install_permission(a: &mut Allocation, ip: IpAddr, expires_ms: u64) {
    match a.permissions.iter_mut().find(|p| p.ip == ip) {
        Some(p) => p.expires_ms = expires_ms,
        None => a.permissions.push(Permission { ip, expires_ms }),
    }
}

#[cfg(test)]
mod tests;
