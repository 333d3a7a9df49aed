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

use crate::relays::SendVia;
use crate::shard::{Outgoing, ShardCore, ShardEffects};
use crate::token::{Change, SocketId};
use actrix_proto::stun::stream::{self as framing, Frame};
use actrix_proto::turn::{ClientKey, Data, Reply, Src, Transmit, Transport};
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
    /// Nothing in either direction for `stun.idle_timeout_secs`, without an allocation.
    Idle,
    /// A socket error (reset, unreachable) or the shard shutting down.
    Error,
}

pub const N_CLOSE_REASONS: usize = 9;

pub const CLOSE_REASONS: [&str; N_CLOSE_REASONS] = [
    "too_many",
    "too_many_from_address",
    "by_client",
    "garbage",
    "first_request_timeout",
    "handshake_timeout",
    "tls_error",
    "idle",
    "error",
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
    fn try_open(&self, ip: IpAddr, s: &StreamSettings) -> Result<(), CloseReason> {
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

    fn close(&self, ip: IpAddr) {
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

/// One client connection.
struct Conn {
    sock: Socket,
    key: ClientKey,
    transport: Transport,
    gen: u16,
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

    /// Connections open on this shard, by transport.
    pub fn open_by_transport(&self) -> [u64; 2] {
        let mut n = [0u64; 2];
        for c in self.conns.iter().flatten() {
            n[transport_index(c.transport)] += 1;
        }
        n
    }

    pub fn fd_of(&self, id: SocketId) -> Option<RawFd> {
        match id {
            SocketId::StreamListener(i) => {
                self.listeners.get(i as usize).map(|l| l.sock.as_raw_fd())
            }
            SocketId::Conn(slot, gen) => self.get(slot, gen).map(Conn::fd),
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

    /// Close connection `slot` for `why`; the TURN core learns of it through `closed`.
    fn close(&mut self, slot: u32, why: CloseReason, closed: &mut Vec<ClientKey>) {
        let Some(c) = self.conns[slot as usize].take() else {
            return;
        };
        self.by_client.remove(&c.key);
        self.limits.close(c.key.addr.ip());
        self.closed[transport_index(c.transport)][why as usize] += 1;
        self.changes.push(Change::Closed(c.id(slot), c.fd()));
        closed.push(c.key);
        self.closing.push(c);
        self.free.push(slot);
    }

    /// Close every connection (shutdown).
    pub fn close_all(&mut self, closed: &mut Vec<ClientKey>) {
        for slot in 0..self.conns.len() as u32 {
            if self.conns[slot as usize].is_some() {
                self.close(slot, CloseReason::Error, closed);
            }
        }
    }
}

/// What one read from a connection brought into its receive buffer.
enum Fill {
    /// Bytes of plaintext; `more`: the read filled what it was offered, try again.
    Data(usize, bool),
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
                Fill::Data(n, n == room)
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
    if let Err(_e) = tls.process_new_packets() {
        // rustls queued an alert; it leaves with the close.
        let _ = tls.write_tls(&mut FdIo(fd));
        return Fill::Closed(CloseReason::TlsError);
    }
    use std::io::Read;
    match tls.reader().read(&mut c.rx[end..]) {
        Ok(0) if room > 0 => Fill::Closed(CloseReason::ByClient),
        Ok(n) => {
            c.rx_end += n;
            Fill::Data(n, true)
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
            if got > 0 {
                Fill::Data(0, true)
            } else {
                Fill::Nothing
            }
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
                if e.kind() != std::io::ErrorKind::WouldBlock && self.warn.allow(now_ms) {
                    tracing::warn!(shard = %self.id, error = %e, "accept failed");
                }
                return;
            }
            // SAFETY: a fresh descriptor we own.
            let sock = unsafe { Socket::from_raw_fd(fd) };
            let Some(peer) = peer else { continue };
            let s = &mut self.streams;
            if let Err(why) = s.limits.try_open(peer.ip(), &s.settings) {
                s.closed[t][why as usize] += 1;
                continue; // dropping the socket closes it
            }
            let _ = sock.set_nodelay(true);
            let tls = match transport {
                Transport::Tls => {
                    let Some(cfg) = s.tls.clone() else { continue };
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
            let slot = s.free.pop().unwrap_or_else(|| {
                s.conns.push(None);
                (s.conns.len() - 1) as u32
            });
            let gen = s.next_gen;
            s.next_gen = s.next_gen.wrapping_add(1).max(1);
            let key = ClientKey {
                listener,
                addr: peer,
            };
            let c = Conn {
                sock,
                key,
                transport,
                gen,
                rx: vec![0u8; RX_CAP].into_boxed_slice(),
                rx_start: 0,
                rx_end: 0,
                rx_referenced: false,
                tx: vec![0u8; s.settings.send_buffer.max(MAX_FRAME)].into_boxed_slice(),
                tx_start: 0,
                tx_end: 0,
                want_write: false,
                had_allocation: false,
                tls,
                opened_ms: now_ms,
                last_active_ms: now_ms,
            };
            s.changes.push(Change::Opened(c.id(slot), c.fd()));
            s.conns[slot as usize] = Some(c);
            s.by_client.insert(key, slot);
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

    /// Connection `id` is readable (or hung up): read, cut frames, hand them to the core.
    pub fn read_conn(&mut self, id: SocketId, sink: &mut impl DatagramSink) {
        let SocketId::Conn(slot, gen) = id else {
            return;
        };
        let mut why = None;
        'reads: for _ in 0..READ_BUDGET {
            let Some(c) = self.streams.get_mut(slot, gen) else {
                return;
            };
            // Make room: move the partial frame to the front, once the batch no longer points
            // into the buffer.
            if c.rx_start > 0 && (c.rx_end == c.rx.len() || c.rx_start == c.rx_end) {
                if c.rx_referenced {
                    if let Some(f) = sink.flush() {
                        self.account(f);
                    }
                }
                let c = self.streams.get_mut(slot, gen).expect("open");
                c.rx_referenced = false;
                c.rx.copy_within(c.rx_start..c.rx_end, 0);
                c.rx_end -= c.rx_start;
                c.rx_start = 0;
            }
            let c = self.streams.get_mut(slot, gen).expect("open");
            let (n, more) = match fill(c) {
                Fill::Data(n, more) => (n, more),
                Fill::Nothing => break,
                Fill::Closed(r) => {
                    why = Some(r);
                    break;
                }
            };
            if c.tls.as_ref().is_some_and(|t| t.wants_write())
                && !self.streams.dirty.contains(&slot)
            {
                // Handshake records to send (or a TLS alert).
                self.streams.dirty.push(slot);
            }
            let c = self.streams.get_mut(slot, gen).expect("open");
            c.last_active_ms = self.now.ms;
            // Every complete frame to the core.
            loop {
                let c = self.streams.get_mut(slot, gen).expect("open");
                let start = c.rx_start;
                let (len, total) = match framing::next(&c.rx[start..c.rx_end], MAX_FRAME) {
                    Frame::Stun(n) => (n, n),
                    Frame::ChannelData { len, total } => (len, total),
                    Frame::Incomplete(_) => break,
                    Frame::Invalid => {
                        why = Some(CloseReason::Garbage);
                        break 'reads;
                    }
                };
                c.rx_start += total;
                if let Some(f) = self.stream_frame(slot, start..start + len, sink) {
                    self.account(f);
                }
            }
            if !more {
                break; // the socket is drained
            }
            let _ = n;
        }
        if let Some(why) = why {
            let mut closed = Vec::new();
            self.streams.close(slot, why, &mut closed);
            self.stream_clients_closed(&closed);
            return;
        }
        // Plaintext rustls decrypted but this round had no room or budget for: next round.
        if let Some(c) = self.streams.get_mut(slot, gen) {
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
            identity: self.identity.as_ref(),
            outstanding: &mut self.identity_outstanding,
            stats: &self.stats,
        };
        let reply = self.server.settle(now, r, &mut fx);
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

    /// Whether connection `id` still has bytes to write (the backend waits for writability).
    pub fn wants_write(&self, id: SocketId) -> bool {
        match id {
            SocketId::Conn(slot, gen) => self.streams.get(slot, gen).is_some_and(|c| c.want_write),
            _ => false,
        }
    }

    /// Connection `id` is writable: write what waits.
    pub fn write_conn(&mut self, id: SocketId) {
        let SocketId::Conn(slot, gen) = id else {
            return;
        };
        if self.streams.get(slot, gen).is_some() {
            self.flush_conn(slot);
        }
    }

    /// Write connection `slot`'s send buffer; wait for writability while bytes remain.
    fn flush_conn(&mut self, slot: u32) {
        let s = &mut self.streams;
        let Some(c) = s.conns[slot as usize].as_mut() else {
            return;
        };
        let mut failed = false;
        if let Some(tls) = c.tls.as_mut() {
            // Plaintext goes into rustls only once what it encrypted before has left, so its
            // own buffer stays bounded: one record per round and connection at most.
            if !tls.wants_write() && c.tx_start < c.tx_end && !tls.is_handshaking() {
                use std::io::Write;
                match tls.writer().write(&c.tx[c.tx_start..c.tx_end]) {
                    Ok(n) => c.tx_start += n,
                    Err(_) => failed = true,
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
            let mut closed = Vec::new();
            s.close(slot, CloseReason::Error, &mut closed);
            self.stream_clients_closed(&closed);
            return;
        }
        if c.tx_start == c.tx_end {
            c.tx_start = 0;
            c.tx_end = 0;
        }
        let pending = c.tx_start < c.tx_end || c.tls.as_ref().is_some_and(|t| t.wants_write());
        if pending != c.want_write {
            c.want_write = pending;
            let (id, fd) = (c.id(slot), c.fd());
            s.changes.push(Change::Writable(id, fd, pending));
        }
    }

    /// End of a round: write every connection with bytes waiting; run due deadlines.
    pub(crate) fn end_streams(&mut self) {
        if !self.streams.dirty.is_empty() {
            let mut dirty = std::mem::take(&mut self.streams.dirty);
            for &slot in &dirty {
                self.flush_conn(slot);
            }
            dirty.clear();
            self.streams.dirty = dirty;
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
            let handshaking = c.tls.as_ref().is_some_and(|t| t.is_handshaking());
            let next = if handshaking {
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
            };
            match next {
                Ok(at) => self.streams.arm(t.slot, t.gen, at),
                Err(why) => self.streams.close(t.slot, why, &mut closed),
            }
        }
        self.streams.fired = fired;
        self.stream_clients_closed(&closed);
    }

    /// The TURN core learns that these stream clients are gone (their allocations end).
    pub(crate) fn stream_clients_closed(&mut self, closed: &[ClientKey]) {
        let now = self.now;
        for key in closed {
            self.server.handle_client_closed(now, *key);
        }
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
