//! Client connections over streams: STUN and TURN over TCP (RFC 8656 §3.1) and TLS (RFC 7350).
//!
//! Each shard accepts on its own SO_REUSEPORT listener of every stream address, and a
//! connection lives on the shard that accepted it. Over a stream the connection is the
//! allocation's 5-tuple: the TURN core sees it as a client address on a stream listener, and
//! closing the connection ends the allocation. Relaying to peers stays UDP.
//!
//! Bytes: each connection has a receive buffer (room for two of the largest frames) that is
//! read with `recv`, cut into frames in place (STUN messages and ChannelData padded to 4 bytes,
//! [`actrix_proto::stun::stream`]) and handed to the core one frame at a time; ChannelData the
//! core relays leaves the relay socket straight out of that buffer. Toward the client, answers
//! and relayed data are appended to the connection's bounded send buffer and written once per
//! round; what does not fit is dropped and counted (a slow reader never makes the shard
//! buffer without bound, and never stalls the shard's UDP traffic). Everything is allocated
//! when the connection is accepted, nothing per frame.
//!
//! Limits: connections in total and per source address (shared by the shards, touched on
//! accept and close), a deadline for the TLS handshake and for the first allocation, an idle
//! timeout for a connection without an allocation, and a frame size limit; a garbage stream,
//! a half-open one or a slowloris closes only that connection.
//!
//! RFC 6062 TCP allocations live here too: a TCP allocation's listening socket on its relayed
//! address, peer data connections (accepted there, or opened from there for a Connect), and
//! client data connections (a client connection that sent ConnectionBind). A joined pair
//! passes bytes as they are: what one side reads lands in the other's send buffer, and a side
//! stops reading while the other's buffer has no room (TCP's own flow control then holds the
//! sender back; nothing is dropped and nothing grows). A ConnectionBind that arrives on another
//! shard's listener is handed, connection and buffered bytes, to the shard that owns the
//! allocation (the shard is in the connection id).

use crate::relays::SendVia;
use crate::shard::{Outgoing, ShardCore, ShardEffects};
use crate::token::{Change, SocketId};
use actrix_proto::stun::stream::{self as framing, Frame};
use actrix_proto::stun::{attr, method, Class, Message};
use actrix_proto::turn::{
    ClientKey, ConnectionId, Data, Family, RelayPort, Reply, Src, TcpCommand, Transmit, Transport,
};
use actrix_proto::wheel::Wheel;
use actrix_udp::Flushed;
use socket2::Socket;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The largest frame accepted on a stream (the largest datagram a UDP slot holds).
pub const MAX_FRAME: usize = actrix_udp::SLOT_DATA;
/// Bytes of the receive buffer of a connection: two of the largest frames.
const RX_CAP: usize = 2 * MAX_FRAME;
/// Connections accepted per listener and round (one busy listener cannot starve the shard).
const ACCEPT_BUDGET: usize = 64;
/// Reads per connection and round.
const READ_BUDGET: usize = 8;
/// Receive buffer of an RFC 6062 peer data connection (raw bytes).
const PEER_RX_CAP: usize = 16 << 10;
/// Plaintext handed to rustls per connection and round (a full TLS record's worth).
const TLS_ROUND_BYTES: usize = 16 << 10;
/// How long a connection attempt to a peer may take (RFC 6062 §5.2: at least 30 seconds).
const CONNECT_TIMEOUT_MS: u64 = 30_000;
/// Backlog of a TCP allocation's listening socket.
const RELAY_BACKLOG: i32 = 16;
/// The listener index of peer data connections' keys (never a real listener).
const PEER_LISTENER: u8 = u8::MAX;

/// Why a connection was refused or closed (counted per transport, never logged per event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum CloseReason {
    /// Over `stun.max_connections`.
    TooMany = 0,
    /// Over `stun.max_connections_per_ip`.
    TooManyFromAddress,
    /// The client closed it (or reset it).
    ByClient,
    /// Neither STUN nor ChannelData, or a frame over the limit.
    Garbage,
    /// No allocation by the deadline (`stun.first_request_timeout_secs`).
    FirstRequestTimeout,
    /// The TLS handshake did not finish by `stun.tls_handshake_timeout_secs`.
    HandshakeTimeout,
    /// The TLS layer refused the peer's bytes (a bad handshake, a bad record).
    TlsError,
    /// The client offered nothing this server speaks: TLS 1.0 or 1.1 only (RFC 8996 forbids
    /// them), or no cipher suite, group or signature scheme in common.
    TlsIncompatible,
    /// Nothing in either direction for `stun.idle_timeout_secs`, without an allocation.
    Idle,
    /// A socket error (reset, unreachable) or the shard shutting down.
    Error,
    /// RFC 6062: the other side of a joined pair ended, or the allocation did.
    RelayEnded,
}

pub const N_CLOSE_REASONS: usize = 11;

pub const CLOSE_REASONS: [&str; N_CLOSE_REASONS] = [
    "too_many",
    "too_many_from_address",
    "by_client",
    "garbage",
    "first_request_timeout",
    "handshake_timeout",
    "tls_error",
    "tls_incompatible",
    "idle",
    "error",
    "relay_ended",
];

/// Transports with connections, for counters: TCP and TLS.
pub const STREAM_TRANSPORTS: [Transport; 2] = [Transport::Tcp, Transport::Tls];

fn transport_index(t: Transport) -> usize {
    match t {
        Transport::Tls => 1,
        _ => 0,
    }
}

/// Stream settings (the `[stun]` keys of the configuration).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamSettings {
    /// Connections open at once, all shards and transports together.
    pub max_connections: usize,
    /// Connections open at once from one source IP address.
    pub max_connections_per_ip: usize,
    /// A TLS connection must finish its handshake within this many seconds.
    pub tls_handshake_timeout_secs: u32,
    /// A connection must hold an allocation within this many seconds of being accepted.
    pub first_request_timeout_secs: u32,
    /// A connection without an allocation is closed after this many idle seconds.
    pub idle_timeout_secs: u32,
    /// Bytes waiting to be written to one client, at most; relayed data beyond it is dropped.
    pub send_buffer: usize,
}

impl Default for StreamSettings {
    fn default() -> Self {
        StreamSettings {
            max_connections: 20_000,
            max_connections_per_ip: 64,
            tls_handshake_timeout_secs: 5,
            first_request_timeout_secs: 10,
            idle_timeout_secs: 60,
            send_buffer: 64 << 10,
        }
    }
}

/// Connection counts shared by the shards (touched on accept and close only).
#[derive(Debug, Default)]
pub struct StreamLimits {
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
}

impl StreamLimits {
    /// Count a new connection from `ip`, unless a limit is reached.
    pub(crate) fn try_open(&self, ip: IpAddr, s: &StreamSettings) -> Result<(), CloseReason> {
        let cur = self.total.fetch_add(1, Ordering::AcqRel);
        if cur >= s.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(CloseReason::TooMany);
        }
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(ip).or_insert(0);
        if *n >= s.max_connections_per_ip {
            drop(map);
            self.total.fetch_sub(1, Ordering::AcqRel);
            return Err(CloseReason::TooManyFromAddress);
        }
        *n += 1;
        Ok(())
    }

    /// Count a peer data connection (RFC 6062): the total limit only.
    fn try_open_total(&self, s: &StreamSettings) -> bool {
        if self.total.fetch_add(1, Ordering::AcqRel) >= s.max_connections {
            self.total.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    fn close_total(&self) {
        self.total.fetch_sub(1, Ordering::AcqRel);
    }

    pub(crate) fn close(&self, ip: IpAddr) {
        self.total.fetch_sub(1, Ordering::AcqRel);
        let mut map = self.per_ip.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&ip) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                map.remove(&ip);
            }
        }
    }

    /// Connections open now, all shards.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Relaxed)
    }
}

/// A listening stream socket of this shard.
pub struct StreamListener {
    pub sock: Socket,
    /// Its listener index in the TURN core (`ClientKey::listener`).
    pub listener: u8,
    pub transport: Transport,
}

/// Where datagrams the core relays from a stream client go: the backend's send batch, or
/// straight out. Queued data stays valid until [`DatagramSink::flush`] (the stream code
/// flushes before it moves bytes of a receive buffer that queued datagrams point into, and a
/// closed connection's buffers live until the end of the round).
pub trait DatagramSink {
    /// Queue `data` for `out.dst` on `out.fd`; what an early flush sent, if one was needed.
    fn push(&mut self, out: &Outgoing, data: &[u8]) -> Option<Flushed>;
    /// Send everything queued now.
    fn flush(&mut self) -> Option<Flushed>;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ConnTimer {
    slot: u32,
    gen: u16,
}

/// What a connection is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// A client's STUN/TURN connection: frames to the core.
    Client,
    /// RFC 6062: a client data connection, joined to a peer data connection.
    ClientData(ConnectionId),
    /// RFC 6062: a peer data connection; `connecting` while the connect is under way.
    Peer { id: ConnectionId, connecting: bool },
}

/// One stream connection: a client's, or an RFC 6062 peer data connection.
struct Conn {
    sock: Socket,
    key: ClientKey,
    transport: Transport,
    gen: u16,
    role: Role,
    /// RFC 6062: the connection this one's bytes pass to, and from.
    partner: Option<u32>,
    /// Not reading: no room to put what it would read (the partner's send buffer is full;
    /// or a peer data connection still waiting for its ConnectionBind has a full buffer).
    read_paused: bool,
    /// The partner ended: close once the send buffer is written.
    close_when_flushed: bool,
    /// Counted against its source address's limit (client connections), or the total only.
    counted_ip: bool,
    /// The interest the backend was last told about (read, write).
    reg: (bool, bool),
    rx: Box<[u8]>,
    rx_start: usize,
    rx_end: usize,
    /// Datagrams queued in the backend's batch point into `rx`: flush before moving bytes.
    rx_referenced: bool,
    tx: Box<[u8]>,
    tx_start: usize,
    tx_end: usize,
    /// The backend waits for writability (the last write left bytes behind).
    want_write: bool,
    /// The client has held an allocation on this connection (idle timeout, not the first
    /// request's deadline, applies once it has none).
    had_allocation: bool,
    /// TLS: the rustls server side of the connection (None over plain TCP).
    tls: Option<Box<rustls::ServerConnection>>,
    opened_ms: u64,
    last_active_ms: u64,
}

impl Conn {
    fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn id(&self, slot: u32) -> SocketId {
        SocketId::Conn(slot, self.gen)
    }

    /// What the backend should wait for: readability unless paused or connecting, writability
    /// while bytes wait or a connect is under way.
    fn wants(&self) -> (bool, bool) {
        let connecting = matches!(
            self.role,
            Role::Peer {
                connecting: true,
                ..
            }
        );
        (
            !self.read_paused && !connecting && !self.close_when_flushed,
            self.want_write || connecting,
        )
    }

    fn new(
        sock: Socket,
        key: ClientKey,
        transport: Transport,
        role: Role,
        rx: usize,
        tx: usize,
        now_ms: u64,
    ) -> Conn {
        Conn {
            sock,
            key,
            transport,
            gen: 0,
            role,
            partner: None,
            read_paused: false,
            close_when_flushed: false,
            counted_ip: matches!(role, Role::Client),
            reg: (true, false),
            rx: vec![0u8; rx].into_boxed_slice(),
            rx_start: 0,
            rx_end: 0,
            rx_referenced: false,
            tx: vec![0u8; tx].into_boxed_slice(),
            tx_start: 0,
            tx_end: 0,
            want_write: false,
            had_allocation: false,
            tls: None,
            opened_ms: now_ms,
            last_active_ms: now_ms,
        }
    }

    fn tx_empty(&self) -> bool {
        self.tx_start == self.tx_end && !self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Append to the send buffer; false (nothing written) when it does not fit.
    fn queue(&mut self, bytes: &[u8]) -> bool {
        if self.tx.len() - self.tx_end < bytes.len() && self.tx_start > 0 {
            self.tx.copy_within(self.tx_start..self.tx_end, 0);
            self.tx_end -= self.tx_start;
            self.tx_start = 0;
        }
        if self.tx.len() - self.tx_end < bytes.len() {
            return false;
        }
        self.tx[self.tx_end..self.tx_end + bytes.len()].copy_from_slice(bytes);
        self.tx_end += bytes.len();
        true
    }
}

/// The listening socket of an RFC 6062 TCP allocation.
struct RelayListener {
    sock: Socket,
    family: Family,
    port: RelayPort,
    gen: u16,
}

/// A client connection on its way to the shard that owns the allocation its ConnectionBind
/// names (see [`crate::shard::ShardMsg::Adopt`]).
pub struct MovedConn(Box<Conn>);

/// RFC 6062 counters of a shard.
#[derive(Debug, Default, Clone, Copy)]
pub struct TcpRelayCounters {
    /// Peer data connections opened (Connect) and accepted (on a relayed address).
    pub connected: u64,
    pub accepted: u64,
    /// Peer data connections closed.
    pub closed: u64,
    /// Bytes passed on joined pairs, toward the peer and toward the client.
    pub bytes_to_peer: u64,
    pub bytes_to_client: u64,
    /// Client connections handed to the shard that owns their ConnectionBind, and taken over
    /// from another shard.
    pub moved_out: u64,
    pub moved_in: u64,
}

/// A shard's stream listeners and connections.
pub struct Streams {
    pub listeners: Vec<StreamListener>,
    conns: Vec<Option<Conn>>,
    free: Vec<u32>,
    next_gen: u16,
    by_client: HashMap<ClientKey, u32>,
    wheel: Wheel<ConnTimer>,
    fired: Vec<(u64, ConnTimer)>,
    settings: StreamSettings,
    limits: Arc<StreamLimits>,
    /// The TLS configuration for TLS listeners (replaced on reload; connections keep theirs).
    tls: Option<Arc<rustls::ServerConfig>>,
    changes: Vec<Change>,
    /// Connections closed this round, dropped (socket and buffers) once the round's batch is
    /// sent and the backend stopped waiting on them.
    closing: Vec<Conn>,
    /// Connections with bytes waiting to be written.
    dirty: Vec<u32>,
    /// TLS connections whose decrypted bytes did not all fit this round: read them again next
    /// round without waiting for the socket (rustls holds them, not the kernel).
    again: Vec<SocketId>,
    /// Counters, by transport (TCP, TLS).
    pub accepted: [u64; 2],
    pub closed: [[u64; N_CLOSE_REASONS]; 2],
    /// Datagrams for a client whose send buffer was full (a slow reader), dropped.
    pub send_overflow: [u64; 2],
    /// RFC 6062: TCP allocations' listening sockets (by slot, and by relayed address), peer
    /// data connections by connection id, the core's commands not carried out yet, and the
    /// connection ids whose connections closed (for the core).
    relay_listeners: Vec<Option<RelayListener>>,
    relay_free: Vec<u32>,
    listener_of: HashMap<(Family, RelayPort), u32>,
    listeners_closing: Vec<Socket>,
    by_conn_id: HashMap<u32, u32>,
    pub(crate) tcp_pending: Vec<TcpCommand>,
    closed_ids: Vec<ConnectionId>,
    failed_connects: Vec<ConnectionId>,
    pub tcp: TcpRelayCounters,
}

impl Streams {
    pub fn new(
        listeners: Vec<StreamListener>,
        settings: StreamSettings,
        limits: Arc<StreamLimits>,
        tls: Option<Arc<rustls::ServerConfig>>,
        now_ms: u64,
    ) -> Streams {
        Streams {
            tls,
            listeners,
            conns: Vec::new(),
            free: Vec::new(),
            next_gen: 1,
            by_client: HashMap::new(),
            wheel: Wheel::new(now_ms, 4096),
            fired: Vec::new(),
            settings,
            limits,
            changes: Vec::new(),
            closing: Vec::new(),
            dirty: Vec::new(),
            again: Vec::new(),
            accepted: [0; 2],
            closed: [[0; N_CLOSE_REASONS]; 2],
            send_overflow: [0; 2],
            relay_listeners: Vec::new(),
            relay_free: Vec::new(),
            listener_of: HashMap::new(),
            listeners_closing: Vec::new(),
            by_conn_id: HashMap::new(),
            tcp_pending: Vec::new(),
            closed_ids: Vec::new(),
            failed_connects: Vec::new(),
            tcp: TcpRelayCounters::default(),
        }
    }

    /// Listener sockets to wait on from the start.
    pub fn initial(&self) -> Vec<(SocketId, RawFd)> {
        self.listeners
            .iter()
            .enumerate()
            .map(|(i, l)| (SocketId::StreamListener(i as u8), l.sock.as_raw_fd()))
            .collect()
    }

    /// Client connections open on this shard, by transport (RFC 6062 peer data connections
    /// are counted by [`Streams::peer_connections`]).
    pub fn open_by_transport(&self) -> [u64; 2] {
        let mut n = [0u64; 2];
        for c in self.conns.iter().flatten() {
            if c.counted_ip {
                n[transport_index(c.transport)] += 1;
            }
        }
        n
    }

    /// RFC 6062 peer data connections open on this shard.
    pub fn peer_connections(&self) -> u64 {
        self.by_conn_id.len() as u64
    }

    /// RFC 6062 TCP allocations' listening sockets open on this shard.
    pub fn relay_listener_count(&self) -> u64 {
        self.listener_of.len() as u64
    }

    pub fn fd_of(&self, id: SocketId) -> Option<RawFd> {
        match id {
            SocketId::StreamListener(i) => {
                self.listeners.get(i as usize).map(|l| l.sock.as_raw_fd())
            }
            SocketId::Conn(slot, gen) => self.get(slot, gen).map(Conn::fd),
            SocketId::RelayListener(slot, gen) => self
                .relay_listeners
                .get(slot as usize)?
                .as_ref()
                .filter(|l| l.gen == gen)
                .map(|l| l.sock.as_raw_fd()),
            _ => None,
        }
    }

    fn get(&self, slot: u32, gen: u16) -> Option<&Conn> {
        self.conns
            .get(slot as usize)?
            .as_ref()
            .filter(|c| c.gen == gen)
    }

    fn get_mut(&mut self, slot: u32, gen: u16) -> Option<&mut Conn> {
        self.conns
            .get_mut(slot as usize)?
            .as_mut()
            .filter(|c| c.gen == gen)
    }

    pub fn has_changes(&self) -> bool {
        !self.changes.is_empty()
    }

    /// A new TLS configuration (a renewed certificate) for connections accepted from now on.
    pub fn set_tls(&mut self, tls: Arc<rustls::ServerConfig>) {
        self.tls = Some(tls);
    }

    pub fn take_changes(&mut self, apply: &mut impl FnMut(Change)) {
        for c in self.changes.drain(..) {
            apply(c);
        }
    }

    pub fn close_released(&mut self) {
        if !self.closing.is_empty() {
            self.closing.clear();
        }
        if !self.listeners_closing.is_empty() {
            self.listeners_closing.clear();
        }
    }

    /// When the next connection deadline is due (monotonic ms).
    pub fn poll_timeout(&self) -> u64 {
        if self.conns.is_empty() {
            u64::MAX
        } else {
            self.wheel.next_tick_ms()
        }
    }

    /// Whether a client on a stream listener has a connection here.
    pub fn owns(&self, key: &ClientKey) -> bool {
        self.by_client.contains_key(key)
    }

    /// Queue bytes for the client `key` (answers, relayed data): false, counted, when its
    /// send buffer is full.
    pub fn deliver(&mut self, key: &ClientKey, bytes: &[u8]) -> bool {
        let Some(&slot) = self.by_client.get(key) else {
            return false;
        };
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return false;
        };
        if !c.queue(bytes) {
            self.send_overflow[transport_index(c.transport)] += 1;
            return false;
        }
        if c.tx_end - c.tx_start == bytes.len() {
            self.dirty.push(slot);
        }
        true
    }

    fn arm(&mut self, slot: u32, gen: u16, deadline_ms: u64) {
        self.wheel.insert(deadline_ms, ConnTimer { slot, gen });
    }

    /// Tell the backend when what connection `slot` waits for changed.
    fn update_interest(&mut self, slot: u32) {
        let Some(c) = self.conns[slot as usize].as_mut() else {
            return;
        };
        let w = c.wants();
        if w != c.reg {
            c.reg = w;
            self.changes.push(Change::Interest {
                id: c.id(slot),
                fd: c.fd(),
                read: w.0,
                write: w.1,
            });
        }
    }

    /// Put `c` in a free slot and tell the backend about it.
    fn insert(&mut self, mut c: Conn) -> u32 {
        let slot = self.free.pop().unwrap_or_else(|| {
            self.conns.push(None);
            (self.conns.len() - 1) as u32
        });
        c.gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        // Registered with no interest: the first Interest change says what to wait for.
        c.reg = (false, false);
        self.changes.push(Change::Opened(c.id(slot), c.fd()));
        if c.role == Role::Client {
            self.by_client.insert(c.key, slot);
        }
        if let Role::Peer { id, .. } = c.role {
            self.by_conn_id.insert(id.0, slot);
        }
        self.conns[slot as usize] = Some(c);
        self.update_interest(slot);
        slot
    }

    /// Close connection `slot` for `why`: the TURN core learns of it through `closed` (client
    /// connections) and `closed_ids` (RFC 6062 data connections). Returns its partner, if it
    /// was joined to one.
    fn close(&mut self, slot: u32, why: CloseReason, closed: &mut Vec<ClientKey>) -> Option<u32> {
        let c = self.conns[slot as usize].take()?;
        match c.role {
            Role::Client => {
                self.by_client.remove(&c.key);
                closed.push(c.key);
            }
            Role::ClientData(id) => self.closed_ids.push(id),
            Role::Peer { id, connecting } => {
                if self.by_conn_id.get(&id.0) == Some(&slot) {
                    self.by_conn_id.remove(&id.0);
                }
                // A connect that ends before it succeeded is the Connect's failure (447).
                if connecting {
                    self.failed_connects.push(id);
                } else {
                    self.closed_ids.push(id);
                }
                self.tcp.closed += 1;
            }
        }
        if c.counted_ip {
            self.limits.close(c.key.addr.ip());
            self.closed[transport_index(c.transport)][why as usize] += 1;
        } else {
            self.limits.close_total();
        }
        self.changes.push(Change::Closed(c.id(slot), c.fd()));
        let partner = c.partner;
        self.closing.push(c);
        self.free.push(slot);
        partner
    }

    /// Open the listening socket of a TCP allocation on `ip`:`port` (SO_REUSEPORT, so that
    /// connections to peers can leave from the same address and port).
    pub(crate) fn listen_relay(&mut self, ip: IpAddr, family: Family, port: RelayPort) -> bool {
        let addr = SocketAddr::new(ip, port.port);
        let open = || -> std::io::Result<Socket> {
            let s = Socket::new(
                socket2::Domain::for_address(addr),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            s.set_reuse_address(true)?;
            s.set_reuse_port(true)?;
            s.set_nonblocking(true)?;
            s.set_cloexec(true)?;
            s.bind(&addr.into())?;
            s.listen(RELAY_BACKLOG)?;
            Ok(s)
        };
        let Ok(sock) = open() else { return false };
        let slot = self.relay_free.pop().unwrap_or_else(|| {
            self.relay_listeners.push(None);
            (self.relay_listeners.len() - 1) as u32
        });
        let gen = self.next_gen;
        self.next_gen = self.next_gen.wrapping_add(1).max(1);
        self.changes.push(Change::Opened(
            SocketId::RelayListener(slot, gen),
            sock.as_raw_fd(),
        ));
        self.relay_listeners[slot as usize] = Some(RelayListener {
            sock,
            family,
            port,
            gen,
        });
        self.listener_of.insert((family, port), slot);
        true
    }

    pub(crate) fn close_relay_listener(&mut self, family: Family, port: RelayPort) {
        let Some(slot) = self.listener_of.remove(&(family, port)) else {
            return;
        };
        if let Some(l) = self.relay_listeners[slot as usize].take() {
            self.changes.push(Change::Closed(
                SocketId::RelayListener(slot, l.gen),
                l.sock.as_raw_fd(),
            ));
            self.listeners_closing.push(l.sock);
            self.relay_free.push(slot);
        }
    }

    /// Take over a client connection another shard handed over (its ConnectionBind names an
    /// allocation of this shard): its buffered bytes are read again at once.
    pub(crate) fn adopt(&mut self, m: MovedConn) {
        let c = *m.0;
        let (opened, tls) = (c.opened_ms, c.transport == Transport::Tls);
        let pending_tx = !c.tx_empty();
        let slot = self.insert(c);
        let gen = self.conns[slot as usize].as_ref().expect("inserted").gen;
        let first = self.settings.first_request_timeout_secs as u64 * 1000;
        let hs = self.settings.tls_handshake_timeout_secs as u64 * 1000;
        self.arm(slot, gen, opened + if tls { first.min(hs) } else { first });
        if pending_tx {
            self.dirty.push(slot);
        }
        self.again.push(SocketId::Conn(slot, gen));
        self.tcp.moved_in += 1;
    }

    /// Close every connection and TCP allocation listener (shutdown).
    pub fn close_all(&mut self, closed: &mut Vec<ClientKey>) {
        for slot in 0..self.conns.len() as u32 {
            if self.conns[slot as usize].is_some() {
                let _ = self.close(slot, CloseReason::Error, closed);
            }
        }
        let keys: Vec<_> = self.listener_of.keys().copied().collect();
        for (f, p) in keys {
            self.close_relay_listener(f, p);
        }
    }
}

/// What one read from a connection brought into its receive buffer.
enum Fill {
    /// Bytes of plaintext arrived (perhaps none yet, for TLS records still being completed);
    /// `more`: the read filled what it was offered, try again.
    Data(bool),
    /// Nothing now (would block; or TLS records that held no plaintext yet).
    Nothing,
    Closed(CloseReason),
}

/// Read once from `c` into its receive buffer: plain TCP with `recv`, TLS through rustls
/// (records read from the socket, decrypted, the plaintext copied out).
fn fill(c: &mut Conn) -> Fill {
    let end = c.rx_end;
    let room = c.rx.len() - end;
    let fd = c.sock.as_raw_fd();
    let Some(tls) = c.tls.as_mut() else {
        return match recv(fd, &mut c.rx[end..]) {
            Ok(0) => Fill::Closed(CloseReason::ByClient),
            Ok(n) => {
                c.rx_end += n;
                Fill::Data(n == room)
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Fill::Nothing,
            Err(_) => Fill::Closed(CloseReason::ByClient),
        };
    };
    let got = match tls.read_tls(&mut FdIo(fd)) {
        Ok(0) => return Fill::Closed(CloseReason::ByClient),
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => 0,
        Err(_) => return Fill::Closed(CloseReason::ByClient),
    };
    if let Err(e) = tls.process_new_packets() {
        // rustls queued an alert; it leaves with the close.
        let _ = tls.write_tls(&mut FdIo(fd));
        return Fill::Closed(match e {
            rustls::Error::PeerIncompatible(_) => CloseReason::TlsIncompatible,
            _ => CloseReason::TlsError,
        });
    }
    use std::io::Read;
    match tls.reader().read(&mut c.rx[end..]) {
        Ok(0) if room > 0 => Fill::Closed(CloseReason::ByClient),
        Ok(n) => {
            c.rx_end += n;
            Fill::Data(true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            if got > 0 {
                Fill::Data(true)
            } else {
                Fill::Nothing
            }
        }
        // The peer closed without close_notify (most clients do): an ordinary close.
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            Fill::Closed(CloseReason::ByClient)
        }
        Err(_) => Fill::Closed(CloseReason::TlsError),
    }
}

/// A socket descriptor as `Read`/`Write` for rustls (non-blocking, no SIGPIPE).
struct FdIo(RawFd);

impl std::io::Read for FdIo {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        recv(self.0, buf)
    }
}

impl std::io::Write for FdIo {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        send(self.0, buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `recv` into `buf`: bytes read, 0 at the end of the stream, or the error.
fn recv(fd: RawFd, buf: &mut [u8]) -> std::io::Result<usize> {
    // SAFETY: reading into a buffer we own, of the length given.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `send` from `buf` without blocking or SIGPIPE.
fn send(fd: RawFd, buf: &[u8]) -> std::io::Result<usize> {
    // SAFETY: writing from a buffer we own, of the length given.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

impl ShardCore {
    /// Stream listener `i` is readable: accept what waits (within a budget), subject to the
    /// connection limits.
    pub fn accept(&mut self, i: u8) {
        let now_ms = self.now.ms;
        let Some(l) = self.streams.listeners.get(i as usize) else {
            return;
        };
        let (lfd, listener, transport) = (l.sock.as_raw_fd(), l.listener, l.transport);
        let t = transport_index(transport);
        for _ in 0..ACCEPT_BUDGET {
            let Some((sock, peer)) = self.accept_one(lfd) else {
                return;
            };
            let s = &mut self.streams;
            if let Err(why) = s.limits.try_open(peer.ip(), &s.settings) {
                s.closed[t][why as usize] += 1;
                continue; // dropping the socket closes it
            }
            let _ = sock.set_nodelay(true);
            let tls = match transport {
                Transport::Tls => {
                    let Some(cfg) = s.tls.clone() else {
                        s.limits.close(peer.ip());
                        continue;
                    };
                    match rustls::ServerConnection::new(cfg) {
                        Ok(c) => Some(Box::new(c)),
                        Err(_) => {
                            s.limits.close(peer.ip());
                            s.closed[t][CloseReason::TlsError as usize] += 1;
                            continue;
                        }
                    }
                }
                _ => None,
            };
            let key = ClientKey {
                listener,
                addr: peer,
            };
            let mut c = Conn::new(
                sock,
                key,
                transport,
                Role::Client,
                RX_CAP,
                s.settings.send_buffer.max(MAX_FRAME),
                now_ms,
            );
            c.tls = tls;
            let slot = s.insert(c);
            let gen = s.conns[slot as usize].as_ref().expect("inserted").gen;
            s.accepted[t] += 1;
            let first = s.settings.first_request_timeout_secs as u64 * 1000;
            let hs = s.settings.tls_handshake_timeout_secs as u64 * 1000;
            let deadline = if transport == Transport::Tls {
                first.min(hs)
            } else {
                first
            };
            s.arm(slot, gen, now_ms + deadline);
        }
    }

    /// One connection from listening socket `lfd`, non-blocking; `None` when none waits.
    fn accept_one(&mut self, lfd: RawFd) -> Option<(Socket, SocketAddr)> {
        loop {
            // SAFETY: accept4 fills a sockaddr_storage of the size given.
            let (fd, peer) = unsafe {
                let mut ss: libc::sockaddr_storage = std::mem::zeroed();
                let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
                let fd = libc::accept4(
                    lfd,
                    &mut ss as *mut _ as *mut libc::sockaddr,
                    &mut len,
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                );
                (fd, actrix_udp::sockaddr_to_std(&ss))
            };
            if fd < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() != std::io::ErrorKind::WouldBlock
                    && e.raw_os_error() != Some(libc::ECONNABORTED)
                    && self.warn.allow(self.now.ms)
                {
                    tracing::warn!(shard = %self.id, error = %e, "accept failed");
                }
                if e.raw_os_error() == Some(libc::ECONNABORTED) {
                    continue;
                }
                return None;
            }
            // SAFETY: a fresh descriptor we own.
            let sock = unsafe { Socket::from_raw_fd(fd) };
            if let Some(peer) = peer {
                return Some((sock, peer));
            }
        }
    }

    /// Whether the backend should wait for connection `id` to become readable.
    pub fn wants_read(&self, id: SocketId) -> bool {
        match id {
            SocketId::Conn(slot, gen) => self.streams.get(slot, gen).is_some_and(|c| c.wants().0),
            SocketId::RelayListener(..) => self.streams.fd_of(id).is_some(),
            _ => false,
        }
    }

    /// Connection `id` is readable (or hung up, `hangup`): read, cut frames, hand them to the
    /// core; or, for a joined RFC 6062 pair, pass the bytes on.
    pub fn read_conn(&mut self, id: SocketId, hangup: bool, sink: &mut impl DatagramSink) {
        let SocketId::Conn(slot, gen) = id else {
            return;
        };
        let Some(c) = self.streams.get(slot, gen) else {
            return;
        };
        if !c.wants().0 {
            // Not reading now; a hang-up still closes it.
            if hangup {
                self.close_conn(slot, CloseReason::ByClient);
            }
            return;
        }
        if c.role != Role::Client {
            self.read_raw(slot, gen, sink);
            return;
        }
        // Frames already buffered (a connection taken over from another shard).
        match self.frames(slot, gen, sink) {
            Flow::Go => {}
            Flow::Stop => return,
            Flow::Raw => return self.read_raw(slot, gen, sink),
            Flow::Close(why) => return self.close_conn(slot, why),
        }
        let mut why = None;
        for _ in 0..READ_BUDGET {
            let Some(c) = self.streams.get_mut(slot, gen) else {
                return;
            };
            // Make room: move the partial frame to the front.
            if c.rx_start > 0 && (c.rx_end == c.rx.len() || c.rx_start == c.rx_end) {
                self.compact_rx(slot, gen, sink);
            }
            let c = self.streams.get_mut(slot, gen).expect("open");
            let more = match fill(c) {
                Fill::Data(more) => more,
                Fill::Nothing => break,
                Fill::Closed(r) => {
                    why = Some(r);
                    break;
                }
            };
            c.last_active_ms = self.now.ms;
            if c.tls.as_ref().is_some_and(|t| t.wants_write())
                && !self.streams.dirty.contains(&slot)
            {
                // Handshake records to send (or a TLS alert).
                self.streams.dirty.push(slot);
            }
            match self.frames(slot, gen, sink) {
                Flow::Go => {}
                Flow::Stop => return,
                Flow::Raw => return self.read_raw(slot, gen, sink),
                Flow::Close(r) => {
                    why = Some(r);
                    break;
                }
            }
            if !more {
                break; // the socket is drained
            }
        }
        if let Some(why) = why {
            self.close_conn(slot, why);
            return;
        }
        self.read_tls_again(slot, gen);
    }

    /// Move what connection `slot` has not consumed yet to the front of its receive buffer,
    /// once the send batch no longer points into it (sent first if it does).
    fn compact_rx(&mut self, slot: u32, gen: u16, sink: &mut impl DatagramSink) {
        if self.streams.get(slot, gen).is_some_and(|c| c.rx_referenced) {
            if let Some(f) = sink.flush() {
                self.account(f);
            }
        }
        let Some(c) = self.streams.get_mut(slot, gen) else {
            return;
        };
        c.rx_referenced = false;
        c.rx.copy_within(c.rx_start..c.rx_end, 0);
        c.rx_end -= c.rx_start;
        c.rx_start = 0;
    }

    /// Plaintext rustls decrypted but this round had no room or budget for: next round.
    fn read_tls_again(&mut self, slot: u32, gen: u16) {
        let id = SocketId::Conn(slot, gen);
        if let Some(c) = self.streams.get_mut(slot, gen) {
            if c.read_paused {
                return;
            }
            if let Some(tls) = c.tls.as_mut() {
                if tls
                    .process_new_packets()
                    .is_ok_and(|st| st.plaintext_bytes_to_read() > 0)
                    && !self.streams.again.contains(&id)
                {
                    self.streams.again.push(id);
                }
            }
        }
    }

    /// Every complete frame in connection `slot`'s receive buffer to the core.
    fn frames(&mut self, slot: u32, gen: u16, sink: &mut impl DatagramSink) -> Flow {
        loop {
            let Some(c) = self.streams.get_mut(slot, gen) else {
                return Flow::Stop;
            };
            if c.role != Role::Client {
                return Flow::Raw;
            }
            let start = c.rx_start;
            let (len, total) = match framing::next(&c.rx[start..c.rx_end], MAX_FRAME) {
                Frame::Stun(n) => (n, n),
                Frame::ChannelData { len, total } => (len, total),
                Frame::Incomplete(_) => return Flow::Go,
                Frame::Invalid => return Flow::Close(CloseReason::Garbage),
            };
            // A ConnectionBind for an allocation of another shard: that shard takes the
            // connection, this frame included.
            if !c.had_allocation && self.siblings.len() > 1 {
                if let Some(owner) = connection_bind_owner(&c.rx[start..start + len]) {
                    if owner as usize != self.id.index() && (owner as usize) < self.siblings.len() {
                        self.move_conn(slot, owner as usize);
                        return Flow::Stop;
                    }
                }
            }
            let c = self.streams.get_mut(slot, gen).expect("open");
            c.rx_start += total;
            if let Some(f) = self.stream_frame(slot, start..start + len, sink) {
                self.account(f);
            }
            self.run_tcp_commands();
        }
    }

    /// Hand client connection `slot` to shard `owner` (see [`MovedConn`]).
    fn move_conn(&mut self, slot: u32, owner: usize) {
        let s = &mut self.streams;
        let Some(c) = s.conns[slot as usize].take() else {
            return;
        };
        s.by_client.remove(&c.key);
        s.changes.push(Change::Closed(c.id(slot), c.fd()));
        s.free.push(slot);
        s.tcp.moved_out += 1;
        let (tx, waker) = &self.siblings[owner];
        match tx.send(crate::shard::ShardMsg::Adopt(MovedConn(Box::new(c)))) {
            Ok(()) => waker.wake(),
            Err(e) => {
                // The shard is gone (shutting down): the connection closes here.
                if let crate::shard::ShardMsg::Adopt(m) = e.0 {
                    s.limits.close(m.0.key.addr.ip());
                }
            }
        }
    }

    /// Connections to read again without waiting (see [`ShardCore::read_conn`]); the
    /// backend reads them at the start of its next round.
    pub fn take_read_again(&mut self, out: &mut Vec<SocketId>) {
        out.append(&mut self.streams.again);
    }

    /// Whether some connection is to be read again at once (the backend should not wait).
    pub fn read_again_pending(&self) -> bool {
        !self.streams.again.is_empty()
    }

    /// One frame from the stream client of connection `slot`, `rx[range]`.
    fn stream_frame(
        &mut self,
        slot: u32,
        range: std::ops::Range<usize>,
        sink: &mut impl DatagramSink,
    ) -> Option<Flushed> {
        let now = self.now;
        let c = self.streams.conns[slot as usize].as_mut()?;
        let key = c.key;
        let is_stun = c.rx[range.start] & 0xC0 == 0;
        let r = self
            .server
            .handle_client(now, key.listener, key.addr, &mut c.rx, range);
        let mut fx = ShardEffects {
            shard: self.id,
            relays: &mut self.relays,
            streams: &mut self.streams,
            identity: self.identity.as_ref(),
            outstanding: &mut self.identity_outstanding,
            stats: &self.stats,
        };
        let reply = self.server.settle(now, r, &mut fx);
        let c = self.streams.conns[slot as usize].as_mut()?;
        if is_stun && !c.had_allocation {
            c.had_allocation = self.server.has_allocation(&key);
        }
        let Reply::Transmit(t) = reply else {
            return None;
        };
        match t.src {
            Src::Listener(_) => {
                // An answer to this client (requests are answered from the scratch buffer).
                let Data::Scratch(n) = t.data else {
                    return None;
                };
                let bytes = self.server.scratch().get(..n)?;
                if c.queue(bytes) {
                    if c.tx_end - c.tx_start == bytes.len() {
                        self.streams.dirty.push(slot);
                    }
                } else {
                    self.streams.send_overflow[transport_index(c.transport)] += 1;
                }
                None
            }
            Src::Relay(..) => {
                // Relayed to a peer over UDP, out of the receive buffer.
                let Data::Buf(r) = t.data.clone() else {
                    return None;
                };
                match self.relays.send_via_for(&t)? {
                    SendVia::Socket(fd) => {
                        c.rx_referenced = true;
                        let out = Outgoing {
                            fd,
                            dst: t.dst,
                            range: r.clone(),
                        };
                        sink.push(&out, &c.rx[r])
                    }
                    SendVia::Raw(fd, src, port) => {
                        // The raw socket needs headroom for IP and UDP headers, which a stream
                        // buffer does not have: copy, write the headers, send now.
                        send_raw(fd, src, port, &t, &c.rx[r]);
                        None
                    }
                }
            }
        }
    }

    /// An answer the core wrote for a stream client (in its scratch buffer): queue it.
    fn deliver_reply(&mut self, reply: Reply) {
        if let Reply::Transmit(t) = reply {
            if let (Src::Listener(listener), Data::Scratch(n)) = (t.src, &t.data) {
                if let Some(bytes) = self.server.scratch().get(..*n) {
                    let key = ClientKey {
                        listener,
                        addr: t.dst,
                    };
                    self.streams.deliver(&key, bytes);
                }
            }
        }
    }

    /// Carry out the RFC 6062 commands the core issued (after its call returned, so that an
    /// answer it wrote is queued before any relayed byte).
    pub(crate) fn run_tcp_commands(&mut self) {
        if self.streams.tcp_pending.is_empty() {
            return;
        }
        let cmds = std::mem::take(&mut self.streams.tcp_pending);
        for cmd in cmds {
            match cmd {
                TcpCommand::Connect {
                    id,
                    family,
                    port,
                    peer,
                } => self.connect_peer(id, family, port, peer),
                TcpCommand::Splice { id, client } => self.splice(id, client),
                TcpCommand::Close(id) => {
                    if let Some(&slot) = self.streams.by_conn_id.get(&id.0) {
                        self.close_pair(slot);
                    }
                }
                TcpCommand::CloseListener { family, port } => {
                    self.streams.close_relay_listener(family, port)
                }
            }
        }
        self.report_closed(&[]);
    }

    /// RFC 6062 §5.2: connect to `peer` from the relayed address (`family`, `port`).
    fn connect_peer(
        &mut self,
        id: ConnectionId,
        family: Family,
        port: RelayPort,
        peer: SocketAddr,
    ) {
        let now_ms = self.now.ms;
        let from = self
            .relays
            .bind_ip(family, port.addr)
            .map(|ip| SocketAddr::new(ip, port.port));
        let s = &mut self.streams;
        let sock = match from {
            Some(from) if s.limits.try_open_total(&s.settings) => match connect_from(from, peer) {
                Ok(sock) => Some(sock),
                Err(_) => {
                    s.limits.close_total();
                    None
                }
            },
            _ => None,
        };
        let Some(sock) = sock else {
            let r = self.server.handle_peer_connected(self.now, id, false);
            self.deliver_reply(r);
            return;
        };
        let key = ClientKey {
            listener: PEER_LISTENER,
            addr: peer,
        };
        let c = Conn::new(
            sock,
            key,
            Transport::Tcp,
            Role::Peer {
                id,
                connecting: true,
            },
            PEER_RX_CAP,
            s.settings.send_buffer.max(MAX_FRAME),
            now_ms,
        );
        let slot = s.insert(c);
        let gen = s.conns[slot as usize].as_ref().expect("inserted").gen;
        s.arm(slot, gen, now_ms + CONNECT_TIMEOUT_MS);
    }

    /// A connect to a peer finished (the socket became writable): tell the core.
    fn peer_connect_done(&mut self, slot: u32) {
        let Some(c) = self.streams.conns[slot as usize].as_mut() else {
            return;
        };
        let Role::Peer {
            id,
            connecting: true,
        } = c.role
        else {
            return;
        };
        let ok = matches!(c.sock.take_error(), Ok(None)) && c.sock.peer_addr().is_ok();
        if ok {
            c.role = Role::Peer {
                id,
                connecting: false,
            };
            self.streams.tcp.connected += 1;
            self.streams.update_interest(slot);
            let r = self.server.handle_peer_connected(self.now, id, true);
            self.deliver_reply(r);
        } else {
            // Closing it answers the Connect with 447.
            self.close_conn(slot, CloseReason::Error);
        }
    }

    /// The listening socket of a TCP allocation is readable: accept peers (RFC 6062 §5.3).
    pub fn accept_relay(&mut self, id: SocketId) {
        let SocketId::RelayListener(lslot, lgen) = id else {
            return;
        };
        let now = self.now;
        for _ in 0..ACCEPT_BUDGET {
            let Some(l) = self
                .streams
                .relay_listeners
                .get(lslot as usize)
                .and_then(|l| l.as_ref())
                .filter(|l| l.gen == lgen)
            else {
                return;
            };
            let (lfd, family, port) = (l.sock.as_raw_fd(), l.family, l.port);
            let Some((sock, peer)) = self.accept_one(lfd) else {
                return;
            };
            let s = &mut self.streams;
            if !s.limits.try_open_total(&s.settings) {
                continue;
            }
            let Some((cid, reply)) = self.server.handle_peer_accepted(now, family, port, peer)
            else {
                self.streams.limits.close_total();
                continue; // no permission (or over a limit): closed at once
            };
            let _ = sock.set_nodelay(true);
            let s = &mut self.streams;
            let c = Conn::new(
                sock,
                ClientKey {
                    listener: PEER_LISTENER,
                    addr: peer,
                },
                Transport::Tcp,
                Role::Peer {
                    id: cid,
                    connecting: false,
                },
                PEER_RX_CAP,
                s.settings.send_buffer.max(MAX_FRAME),
                now.ms,
            );
            s.insert(c);
            s.tcp.accepted += 1;
            self.deliver_reply(reply);
        }
    }

    /// RFC 6062 §5.4: join client connection `client` (which just sent a ConnectionBind,
    /// answered already) to peer data connection `id`.
    fn splice(&mut self, id: ConnectionId, client: ClientKey) {
        let s = &mut self.streams;
        let data = s.by_client.get(&client).copied();
        let peer = s.by_conn_id.get(&id.0).copied();
        let (Some(d), Some(p)) = (data, peer) else {
            // One side is gone already: the other goes too.
            if let Some(d) = data {
                self.close_conn(d, CloseReason::RelayEnded);
            }
            if let Some(p) = peer {
                self.close_conn(p, CloseReason::RelayEnded);
            }
            self.server.handle_connection_closed(id);
            return;
        };
        s.by_client.remove(&client);
        if let Some(c) = s.conns[d as usize].as_mut() {
            c.role = Role::ClientData(id);
            c.partner = Some(p);
        }
        if let Some(c) = s.conns[p as usize].as_mut() {
            c.partner = Some(d);
        }
        // What each side already holds goes across: the peer's bytes buffered while waiting,
        // and what the client sent after its ConnectionBind.
        self.pump(p);
        self.pump(d);
    }

    /// Read a joined (or waiting) RFC 6062 connection and pass its bytes on.
    fn read_raw(&mut self, slot: u32, gen: u16, sink: &mut impl DatagramSink) {
        self.pump(slot);
        for _ in 0..READ_BUDGET {
            let Some(c) = self.streams.get_mut(slot, gen) else {
                return;
            };
            if c.read_paused {
                break;
            }
            if c.rx_start > 0 {
                self.compact_rx(slot, gen, sink);
            }
            let c = self.streams.get_mut(slot, gen).expect("open");
            if c.rx_end == c.rx.len() {
                break; // pump paused it
            }
            match fill(c) {
                Fill::Data(more) => {
                    c.last_active_ms = self.now.ms;
                    if c.tls.as_ref().is_some_and(|t| t.wants_write())
                        && !self.streams.dirty.contains(&slot)
                    {
                        self.streams.dirty.push(slot);
                    }
                    self.pump(slot);
                    if !more {
                        break;
                    }
                }
                Fill::Nothing => break,
                Fill::Closed(why) => {
                    self.close_conn(slot, why);
                    return;
                }
            }
        }
        self.read_tls_again(slot, gen);
    }

    /// Move what connection `slot` has read into its partner's send buffer, as much as fits;
    /// pause reading it while its buffer stays full, resume when there is room again.
    fn pump(&mut self, slot: u32) {
        let s = &mut self.streams;
        let Some(c) = s.conns[slot as usize].as_ref() else {
            return;
        };
        if let Some(p) = c.partner {
            let (src, dst) = pair_mut(&mut s.conns, slot, p);
            let (Some(src), Some(dst)) = (src, dst) else {
                return;
            };
            let avail = src.rx_end - src.rx_start;
            if avail > 0 {
                if dst.tx_start > 0 && dst.tx.len() - dst.tx_end < avail {
                    dst.tx.copy_within(dst.tx_start..dst.tx_end, 0);
                    dst.tx_end -= dst.tx_start;
                    dst.tx_start = 0;
                }
                let n = avail.min(dst.tx.len() - dst.tx_end);
                if n > 0 {
                    let was_empty = dst.tx_start == dst.tx_end;
                    dst.tx[dst.tx_end..dst.tx_end + n]
                        .copy_from_slice(&src.rx[src.rx_start..src.rx_start + n]);
                    dst.tx_end += n;
                    src.rx_start += n;
                    if was_empty {
                        s.dirty.push(p);
                    }
                    if matches!(src.role, Role::Peer { .. }) {
                        s.tcp.bytes_to_client += n as u64;
                    } else {
                        s.tcp.bytes_to_peer += n as u64;
                    }
                }
                if src.rx_start == src.rx_end {
                    src.rx_start = 0;
                    src.rx_end = 0;
                }
            }
        }
        let c = s.conns[slot as usize].as_mut().expect("present");
        if c.rx_start > 0 && c.rx_end == c.rx.len() {
            c.rx.copy_within(c.rx_start..c.rx_end, 0);
            c.rx_end -= c.rx_start;
            c.rx_start = 0;
        }
        let full = c.rx_end == c.rx.len();
        if full != c.read_paused {
            c.read_paused = full;
            let id = c.id(slot);
            s.update_interest(slot);
            if !full {
                // Bytes may wait in the socket or in rustls: read at once.
                s.again.push(id);
            }
        }
    }

    /// Close connection `slot` and, for a joined pair, its partner once what it holds is
    /// written; the core learns of both.
    fn close_conn(&mut self, slot: u32, why: CloseReason) {
        let mut closed = Vec::new();
        let partner = self.streams.close(slot, why, &mut closed);
        if let Some(p) = partner {
            let s = &mut self.streams;
            if let Some(c) = s.conns[p as usize].as_mut() {
                c.partner = None;
                if c.tx_empty() {
                    let _ = s.close(p, CloseReason::RelayEnded, &mut closed);
                } else {
                    c.close_when_flushed = true;
                    let (gen, at) = (
                        c.gen,
                        self.now.ms + s.settings.idle_timeout_secs as u64 * 1000,
                    );
                    s.update_interest(p);
                    s.arm(p, gen, at);
                }
            }
        }
        self.report_closed(&closed);
    }

    /// Close peer data connection `slot` and its partner now (the allocation ended).
    fn close_pair(&mut self, slot: u32) {
        let mut closed = Vec::new();
        if let Some(p) = self
            .streams
            .close(slot, CloseReason::RelayEnded, &mut closed)
        {
            let _ = self.streams.close(p, CloseReason::RelayEnded, &mut closed);
        }
        self.report_closed(&closed);
    }

    /// The TURN core learns which clients' connections and which RFC 6062 connections closed.
    fn report_closed(&mut self, closed: &[ClientKey]) {
        self.stream_clients_closed(closed);
        while let Some(id) = self.streams.closed_ids.pop() {
            self.server.handle_connection_closed(id);
        }
        while let Some(id) = self.streams.failed_connects.pop() {
            let r = self.server.handle_peer_connected(self.now, id, false);
            self.deliver_reply(r);
        }
    }

    /// Bytes the core relays toward a client on a stream listener (peer data): queue them on
    /// its connection; false when it has none here or its send buffer is full (counted).
    pub(crate) fn deliver_to_stream(&mut self, t: &Transmit, bytes: &[u8]) -> bool {
        let Src::Listener(listener) = t.src else {
            return false;
        };
        self.streams.deliver(
            &ClientKey {
                listener,
                addr: t.dst,
            },
            bytes,
        )
    }

    /// Whether connection `id` still has bytes to write or a connect under way (the backend
    /// waits for writability).
    pub fn wants_write(&self, id: SocketId) -> bool {
        match id {
            SocketId::Conn(slot, gen) => self.streams.get(slot, gen).is_some_and(|c| c.wants().1),
            _ => false,
        }
    }

    /// Connection `id` is writable: finish a connect, or write what waits.
    pub fn write_conn(&mut self, id: SocketId) {
        let SocketId::Conn(slot, gen) = id else {
            return;
        };
        let Some(c) = self.streams.get(slot, gen) else {
            return;
        };
        if matches!(
            c.role,
            Role::Peer {
                connecting: true,
                ..
            }
        ) {
            self.peer_connect_done(slot);
        } else {
            self.flush_conn(slot);
        }
    }

    /// Write connection `slot`'s send buffer; wait for writability while bytes remain.
    fn flush_conn(&mut self, slot: u32) {
        let s = &mut self.streams;
        let Some(c) = s.conns[slot as usize].as_mut() else {
            return;
        };
        if matches!(
            c.role,
            Role::Peer {
                connecting: true,
                ..
            }
        ) {
            return;
        }
        let mut failed = false;
        if let Some(tls) = c.tls.as_mut() {
            // Plaintext goes into rustls only once what it encrypted before has left, so its
            // own buffer stays bounded: up to TLS_ROUND_BYTES per round and connection. To a
            // TURN client every message is a record of its own, as OpenSSL-based servers
            // write them: clients that take one message per record read (coturn's among them)
            // would lose the second of two messages sharing a record. A joined RFC 6062 data
            // connection carries an opaque byte stream and is written in full records.
            if !tls.wants_write() && c.tx_start < c.tx_end && !tls.is_handshaking() {
                use std::io::Write;
                let mut budget = TLS_ROUND_BYTES;
                while c.tx_start < c.tx_end && budget > 0 && !failed {
                    let pending = &c.tx[c.tx_start..c.tx_end];
                    let n = match (c.role, framing::next(pending, MAX_FRAME)) {
                        (Role::Client, Frame::Stun(n) | Frame::ChannelData { total: n, .. }) => n,
                        _ => pending.len().min(budget),
                    };
                    match tls.writer().write(&pending[..n]) {
                        Ok(0) => break,
                        Ok(w) => {
                            c.tx_start += w;
                            budget = budget.saturating_sub(w);
                        }
                        Err(_) => failed = true,
                    }
                }
            }
            let fd = c.sock.as_raw_fd();
            while tls.wants_write() && !failed {
                match tls.write_tls(&mut FdIo(fd)) {
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => failed = true,
                }
            }
        } else {
            while c.tx_start < c.tx_end {
                match send(c.fd(), &c.tx[c.tx_start..c.tx_end]) {
                    Ok(n) => c.tx_start += n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
            }
        }
        if failed {
            self.close_conn(slot, CloseReason::Error);
            return;
        }
        if c.tx_start == c.tx_end {
            c.tx_start = 0;
            c.tx_end = 0;
        }
        let pending = c.tx_start < c.tx_end || c.tls.as_ref().is_some_and(|t| t.wants_write());
        let (partner, done) = (c.partner, !pending && c.close_when_flushed);
        c.want_write = pending;
        s.update_interest(slot);
        if done {
            let mut closed = Vec::new();
            let _ = s.close(slot, CloseReason::RelayEnded, &mut closed);
            self.report_closed(&closed);
            return;
        }
        // Room again: what the partner read and could not pass on yet goes now (and a
        // partner paused on this buffer reads on).
        if let Some(p) = partner {
            if s.conns[p as usize]
                .as_ref()
                .is_some_and(|c| c.read_paused || c.rx_start < c.rx_end)
            {
                self.pump(p);
            }
        }
    }

    /// End of a round: write every connection with bytes waiting; run due deadlines.
    pub(crate) fn end_streams(&mut self) {
        self.run_tcp_commands();
        if !self.streams.dirty.is_empty() {
            let mut dirty = std::mem::take(&mut self.streams.dirty);
            for &slot in &dirty {
                self.flush_conn(slot);
            }
            dirty.clear();
            if self.streams.dirty.is_empty() {
                self.streams.dirty = dirty;
            }
        }
        let now = self.now;
        if self.streams.conns.is_empty() || now.ms < self.streams.wheel.next_tick_ms() {
            return;
        }
        let mut fired = std::mem::take(&mut self.streams.fired);
        self.streams.wheel.advance(now.ms, &mut fired);
        let mut closed = Vec::new();
        for (_, t) in fired.drain(..) {
            let first = self.streams.settings.first_request_timeout_secs as u64 * 1000;
            let idle = self.streams.settings.idle_timeout_secs as u64 * 1000;
            let hs = self.streams.settings.tls_handshake_timeout_secs as u64 * 1000;
            let Some(c) = self.streams.get_mut(t.slot, t.gen) else {
                continue;
            };
            let (key, opened, last) = (c.key, c.opened_ms, c.last_active_ms);
            let next = match c.role {
                Role::Peer {
                    connecting: true, ..
                } => {
                    if now.ms < opened + CONNECT_TIMEOUT_MS {
                        Ok(opened + CONNECT_TIMEOUT_MS)
                    } else {
                        Err(CloseReason::Error) // answered 447 as it closes
                    }
                }
                // A joined pair lives as long as its allocation; only a side left alone with
                // bytes it cannot write has a deadline.
                Role::Peer { .. } | Role::ClientData(_) => {
                    if c.close_when_flushed {
                        Err(CloseReason::RelayEnded)
                    } else {
                        continue;
                    }
                }
                Role::Client => {
                    let handshaking = c.tls.as_ref().is_some_and(|t| t.is_handshaking());
                    if handshaking {
                        if now.ms < opened + hs {
                            Ok((opened + hs).min(opened + first))
                        } else {
                            Err(CloseReason::HandshakeTimeout)
                        }
                    } else if self.server.has_allocation(&key) {
                        // The allocation's lifetime governs; look again after an idle period.
                        c.had_allocation = true;
                        Ok(now.ms + idle)
                    } else if !c.had_allocation {
                        if now.ms < opened + first {
                            Ok(opened + first)
                        } else {
                            Err(CloseReason::FirstRequestTimeout)
                        }
                    } else if now.ms < last + idle {
                        Ok(last + idle)
                    } else {
                        Err(CloseReason::Idle)
                    }
                }
            };
            match next {
                Ok(at) => self.streams.arm(t.slot, t.gen, at),
                Err(why) => {
                    if let Some(p) = self.streams.close(t.slot, why, &mut closed) {
                        let _ = self.streams.close(p, CloseReason::RelayEnded, &mut closed);
                    }
                }
            }
        }
        self.streams.fired = fired;
        self.report_closed(&closed);
    }

    /// The TURN core learns that these stream clients are gone (their allocations end).
    pub(crate) fn stream_clients_closed(&mut self, closed: &[ClientKey]) {
        let now = self.now;
        for key in closed {
            self.server.handle_client_closed(now, *key);
        }
    }
}

/// How reading a client connection goes on after its buffered frames.
enum Flow {
    /// Read more.
    Go,
    /// The connection is gone from this shard (closed, or handed to another).
    Stop,
    /// It became an RFC 6062 client data connection: the rest is raw bytes.
    Raw,
    Close(CloseReason),
}

/// The shard that owns the connection a ConnectionBind request names, if `frame` is one.
fn connection_bind_owner(frame: &[u8]) -> Option<u8> {
    // Cheap checks first: the method and class are in the first two bytes.
    let t = u16::from_be_bytes([*frame.first()?, *frame.get(1)?]);
    if t != actrix_proto::stun::message_type(method::CONNECTION_BIND, Class::Request) {
        return None;
    }
    let m = Message::parse(frame).ok()?;
    m.get_u32(attr::CONNECTION_ID)
        .map(|id| ConnectionId(id).shard())
}

/// Two distinct connections of the table, mutably.
fn pair_mut(conns: &mut [Option<Conn>], a: u32, b: u32) -> (Option<&mut Conn>, Option<&mut Conn>) {
    let (a, b) = (a as usize, b as usize);
    if a == b || a >= conns.len() || b >= conns.len() {
        return (None, None);
    }
    if a < b {
        let (x, y) = conns.split_at_mut(b);
        (x[a].as_mut(), y[0].as_mut())
    } else {
        let (x, y) = conns.split_at_mut(a);
        (y[0].as_mut(), x[b].as_mut())
    }
}

/// A non-blocking TCP socket bound to `from` (SO_REUSEPORT beside the allocation's listening
/// socket), connecting to `to`.
fn connect_from(from: SocketAddr, to: SocketAddr) -> std::io::Result<Socket> {
    let s = Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.set_cloexec(true)?;
    s.set_nodelay(true)?;
    s.bind(&from.into())?;
    match s.connect(&to.into()) {
        Ok(()) => Ok(s),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => Ok(s),
        Err(e) => Err(e),
    }
}

/// Send `payload` to `t.dst` through the raw socket `fd`, from `src`:`port` (shared relay
/// sockets), copying it behind freshly written IP and UDP headers.
fn send_raw(fd: RawFd, src: IpAddr, port: u16, t: &Transmit, payload: &[u8]) {
    let mut pkt = [0u8; crate::lookup::HEADERS_V6 + MAX_FRAME];
    let len = match (src, t.dst) {
        (IpAddr::V4(src), SocketAddr::V4(dst)) => {
            let h = crate::lookup::HEADERS;
            pkt[h..h + payload.len()].copy_from_slice(payload);
            crate::lookup::write_headers(&mut pkt[..h], src, port, dst, payload.len());
            h + payload.len()
        }
        (IpAddr::V6(src), SocketAddr::V6(dst)) => {
            let h = crate::lookup::HEADERS_V6;
            pkt[h..h + payload.len()].copy_from_slice(payload);
            crate::lookup::write_headers_v6(&mut pkt[..h + payload.len()], src, port, dst);
            h + payload.len()
        }
        _ => return,
    };
    let mut ss: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let alen = actrix_udp::std_to_sockaddr(&SocketAddr::new(t.dst.ip(), 0), &mut ss);
    // SAFETY: sending from a local buffer to a sockaddr we filled.
    unsafe {
        libc::sendto(
            fd,
            pkt.as_ptr().cast(),
            len,
            libc::MSG_DONTWAIT,
            &ss as *const _ as *const libc::sockaddr,
            alen,
        );
    }
}
