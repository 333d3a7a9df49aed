//! The shard core: everything a shard does that does not depend on how it waits for and moves
//! datagrams. Every backend (mmsg, io_uring, glommio) drives the same [`ShardCore`]:
//!
//! ```text
//! loop {
//!     if core.pause_due() { sleep out the coalescing period }
//!     wait for readiness, at most core.timeout_ms()
//!     core.begin_round()                       // clock read once, identity answers
//!     for each ready socket: receive a batch;  // Waker: core.handle_inbox()
//!         for each datagram: core.on_datagram(..) -> Option<Outgoing>, queue it
//!     core.end_round()                         // timers, relay-socket commands, counters
//!     apply core.relays changes to the wait set; send the batch; core.relays.close_released()
//! }
//! core.finish()
//! ```
//!
//! The core owns the TURN [`Server`], the relay-socket strategy ([`RelaySockets`]), the
//! messages from other threads (drain, stop, reconfigure; identity answers), the counters it
//! publishes, and the pacer.

use crate::dtls::{DtlsCertificate, DtlsListener, DtlsSide, Event, Ingress};
use crate::pacer::{self, Pacer};
use crate::relays::{RelaySockets, SendVia};
use crate::stats::ShardStats;
use crate::streams::{MovedConn, StreamLimits, StreamListener, StreamSettings, Streams};
use crate::token::{Change, SocketId};
use crate::{lookup, IdentityLink};
use actrix_proto::auth::IdentityRequest;
use actrix_proto::plan::ShardId;
use actrix_proto::turn::{
    BindRequest, ClientKey, CrossShard, Data, Effects, Family, Now, RelayPort, Reply, Server, Src,
    TcpCommand, Transmit, TurnConfig,
};
use actrix_udp::{Flushed, Waker};
use crossbeam_channel::{Receiver, Sender};
use socket2::Socket;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Messages to a shard from the main thread. They arrive on a channel and the shard is woken
/// by its [`Waker`].
pub enum ShardMsg {
    /// Stop granting allocations; keep relaying.
    Drain,
    /// Close everything and leave the loop.
    Stop,
    /// A new configuration (live reload).
    Reconfigure(Box<TurnConfig>),
    /// A new TLS configuration (a renewed certificate) for connections accepted from now on.
    Tls(Arc<rustls::ServerConfig>),
    /// RFC 6062: a client connection whose ConnectionBind names an allocation of this shard,
    /// from the shard that accepted it.
    Adopt(MovedConn),
    /// A renewed certificate for DTLS handshakes from now on.
    Dtls(DtlsCertificate),
    /// The session admin's query: this shard's allocations go back on the channel.
    Sessions(Sender<Vec<actrix_proto::turn::Session>>),
    /// The session admin ends allocations; how many ended goes back on the channel.
    Disconnect(actrix_proto::turn::Disconnect, Sender<usize>),
}

/// Everything a shard needs, built on the main thread before the shard's thread starts.
pub struct ShardSetup {
    pub id: ShardId,
    /// The core to pin the shard to (`None`: not pinned).
    pub core: Option<usize>,
    pub listeners: Vec<Socket>,
    /// Stream (TCP, TLS) listeners, with their TURN listener indices after the UDP ones.
    pub stream_listeners: Vec<StreamListener>,
    pub stream_settings: StreamSettings,
    pub stream_limits: Arc<StreamLimits>,
    /// The TLS configuration of TLS listeners.
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// DTLS listeners (UDP), with their TURN listener indices after the stream ones.
    pub dtls_listeners: Vec<DtlsListener>,
    /// The certificate of DTLS listeners (the TLS one).
    pub dtls: Option<DtlsCertificate>,
    pub turn: TurnConfig,
    pub shared: Arc<CrossShard>,
    pub relays: RelaySockets,
    pub batch: usize,
    pub coalesce_us: u32,
    pub glommio_io_memory: usize,
    pub inbox: Receiver<ShardMsg>,
    pub waker: Arc<Waker>,
    /// Every shard's inbox and waker, in shard order (this one's included): where a client
    /// connection goes when its ConnectionBind belongs to another shard.
    pub siblings: Arc<[(Sender<ShardMsg>, Arc<Waker>)]>,
    pub stats: Arc<ShardStats>,
    pub identity: Option<IdentityLink>,
    pub warn_per_sec: u32,
    pub seed: u64,
}

/// A datagram to send: `buf[range]` of the buffer the request (or relayed data) came in,
/// from socket `fd` to `dst`.
#[must_use]
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outgoing {
    pub fd: RawFd,
    pub dst: SocketAddr,
    pub range: Range<usize>,
}

/// Counts warnings per second and lets only a few through to the log.
pub struct WarnLimiter {
    second: u64,
    count: u32,
    limit: u32,
    suppressed: u64,
}

impl WarnLimiter {
    pub fn new(limit: u32) -> Self {
        WarnLimiter {
            second: 0,
            count: 0,
            limit,
            suppressed: 0,
        }
    }

    pub fn allow(&mut self, now_ms: u64) -> bool {
        let s = now_ms / 1000;
        if s != self.second {
            if self.suppressed > 0 {
                tracing::warn!(suppressed = self.suppressed, "repeated warnings suppressed");
            }
            self.second = s;
            self.count = 0;
            self.suppressed = 0;
        }
        self.count += 1;
        if self.count > self.limit {
            self.suppressed += 1;
            false
        } else {
            true
        }
    }
}

/// The core's side effects, carried out by the shard.
pub(crate) struct ShardEffects<'a> {
    pub(crate) shard: ShardId,
    pub(crate) relays: &'a mut RelaySockets,
    /// TCP allocations' listening sockets, and the RFC 6062 commands carried out once the
    /// core's call returned ([`ShardCore::run_tcp_commands`]).
    pub(crate) streams: &'a mut Streams,
    pub(crate) identity: Option<&'a IdentityLink>,
    /// Lookups asked for and not answered yet.
    pub(crate) outstanding: &'a mut usize,
    pub(crate) stats: &'a ShardStats,
}

impl Effects for ShardEffects<'_> {
    fn bind(&mut self, req: &BindRequest) -> bool {
        if !req.tcp {
            return self.relays.bind(req);
        }
        // A TCP allocation: its listening socket (one family; the core never asks for two).
        let family = if req.v4 { Family::V4 } else { Family::V6 };
        match self.relays.bind_ip(family, req.port.addr) {
            Some(ip) => self.streams.listen_relay(ip, family, req.port),
            None => false,
        }
    }

    fn release(&mut self, family: Family, port: RelayPort, keep: bool) {
        self.relays.release(family, port, keep);
    }

    fn resolve_identity(&mut self, username: Box<[u8]>) {
        let Some(link) = self.identity else { return };
        let req = IdentityRequest {
            shard: self.shard,
            username,
        };
        if link.requests.try_send(req).is_err() {
            // The client retransmits; the lookup is asked again then.
            self.stats.identity_queue_full.fetch_add(1, Relaxed);
        } else {
            *self.outstanding += 1;
        }
    }

    fn tcp(&mut self, cmd: TcpCommand) {
        match cmd {
            // At once: a later bind in the same call may reuse the port.
            TcpCommand::CloseListener { family, port } => {
                self.streams.close_relay_listener(family, port)
            }
            other => self.streams.tcp_pending.push(other),
        }
    }
}

/// The backend-independent part of a shard (see the module documentation).
pub struct ShardCore {
    pub id: ShardId,
    pub(crate) server: Server,
    pub relays: RelaySockets,
    pub(crate) streams: Streams,
    pub(crate) dtls: DtlsSide,
    /// Clients whose DTLS association ended in a timer run (reused).
    dtls_closed: Vec<ClientKey>,
    listeners: Vec<Socket>,
    listener_fds: Vec<RawFd>,
    inbox: Receiver<ShardMsg>,
    waker: Arc<Waker>,
    pub(crate) siblings: Arc<[(Sender<ShardMsg>, Arc<Waker>)]>,
    pub(crate) stats: Arc<ShardStats>,
    pub(crate) identity: Option<IdentityLink>,
    /// Identity lookups asked for and not answered yet: the answer channel is read only while
    /// some are (no channel operation per round otherwise).
    pub(crate) identity_outstanding: usize,
    pacer: Pacer,
    pub warn: WarnLimiter,
    pub(crate) now: Now,
    stopping: bool,
    /// Peer datagrams and client datagrams relayed, as of the last round (the pacer's signal).
    relay_mark: u64,
    pub batch: usize,
    pub glommio_io_memory: usize,
}

impl ShardCore {
    /// Build the core on the shard's own thread (the pacer adjusts that thread's timer slack).
    pub fn new(mut s: ShardSetup) -> ShardCore {
        let now = pacer::now();
        let listener_fds = s.listeners.iter().map(|l| l.as_raw_fd()).collect();
        s.turn.shard = s.id.0 as u8;
        ShardCore {
            id: s.id,
            server: Server::new(s.turn, s.shared, now, s.seed),
            relays: s.relays,
            streams: Streams::new(
                s.stream_listeners,
                s.stream_settings.clone(),
                s.stream_limits.clone(),
                s.tls,
                now.ms,
            ),
            dtls: DtlsSide::new(
                s.dtls_listeners,
                s.dtls,
                s.stream_settings,
                s.stream_limits,
                now.ms,
            ),
            dtls_closed: Vec::new(),
            listeners: s.listeners,
            listener_fds,
            inbox: s.inbox,
            waker: s.waker,
            siblings: s.siblings,
            stats: s.stats,
            identity: s.identity,
            identity_outstanding: 0,
            pacer: Pacer::new(s.coalesce_us as u64 * 1000),
            warn: WarnLimiter::new(s.warn_per_sec),
            now,
            stopping: false,
            relay_mark: 0,
            batch: s.batch,
            glommio_io_memory: s.glommio_io_memory,
        }
    }

    pub fn server(&self) -> &Server {
        &self.server
    }

    /// This shard's slice of the relay port range, for logs.
    pub fn ports(&self) -> String {
        let c = self.server.config();
        format!("{}-{}", c.port_min, c.port_max)
    }

    pub fn now(&self) -> Now {
        self.now
    }

    pub fn stopping(&self) -> bool {
        self.stopping
    }

    pub fn waker(&self) -> &Arc<Waker> {
        &self.waker
    }

    pub fn stats(&self) -> &ShardStats {
        &self.stats
    }

    /// Every socket to wait on from the start: the waker, the listeners, the shared relay
    /// sockets (relay sockets per allocation come later through the relay changes).
    pub fn initial_sockets(&self) -> Vec<(SocketId, RawFd)> {
        let mut v = vec![(SocketId::Waker, self.waker.fd())];
        v.extend(
            self.listener_fds
                .iter()
                .enumerate()
                .map(|(i, fd)| (SocketId::Listener(i as u8), *fd)),
        );
        v.extend(
            self.dtls
                .listeners()
                .iter()
                .map(|(i, fd)| (SocketId::Listener(*i), *fd)),
        );
        v.extend(self.relays.initial());
        v.extend(self.streams.initial());
        v
    }

    /// The descriptor of a socket the backend waits on, if it is still current.
    pub fn fd_of(&self, id: SocketId) -> Option<RawFd> {
        match id {
            SocketId::Waker => Some(self.waker.fd()),
            SocketId::Listener(i) => self
                .listener_fds
                .get(i as usize)
                .copied()
                .or_else(|| self.dtls.fd(i)),
            SocketId::StreamListener(_) | SocketId::Conn(..) | SocketId::RelayListener(..) => {
                self.streams.fd_of(id)
            }
            _ => self.relays.fd_of(id),
        }
    }

    /// Whether to sleep out the coalescing period before waiting.
    pub fn pause_due(&self) -> bool {
        self.pacer.pause_due()
    }

    /// Sleep out the coalescing period (blocking backends).
    pub fn pause(&self) {
        self.pacer.pause();
        self.stats.coalesce_pauses.fetch_add(1, Relaxed);
    }

    /// The rest of the coalescing period, counted as a pause (for backends that sleep their own
    /// way).
    pub fn pause_remaining(&self) -> Option<std::time::Duration> {
        self.stats.coalesce_pauses.fetch_add(1, Relaxed);
        self.pacer.remaining()
    }

    /// How long the backend may wait: until the core's next timer, at most a second.
    pub fn timeout_ms(&self) -> u64 {
        if self.read_again_pending() {
            return 0;
        }
        self.server
            .poll_timeout()
            .min(self.streams.poll_timeout())
            .min(self.dtls.poll_timeout())
            .saturating_sub(self.now.ms)
            .min(1000)
    }

    /// Whether [`ShardCore::take_changes`] has anything to report.
    #[inline]
    pub fn has_changes(&self) -> bool {
        self.relays.has_changes() || self.streams.has_changes()
    }

    /// The sockets opened, closed or changed since the last call (relay sockets, stream
    /// connections), in order within each kind.
    pub fn take_changes(&mut self, mut apply: impl FnMut(Change)) {
        self.relays.take_changes(&mut apply);
        self.streams.take_changes(&mut apply);
    }

    /// Close for good what was released this round (after the backend stopped waiting on it
    /// and the round's batch was sent).
    #[inline]
    pub fn close_released(&mut self) {
        self.relays.close_released();
        self.streams.close_released();
    }

    /// A round starts: read the clock, apply identity answers.
    pub fn begin_round(&mut self) {
        self.now = pacer::now();
        self.pacer.round_started();
        self.stats.wakeups.fetch_add(1, Relaxed);
        if self.identity_outstanding > 0 {
            if let Some(link) = &self.identity {
                while let Ok(a) = link.answers.try_recv() {
                    self.identity_outstanding = self.identity_outstanding.saturating_sub(1);
                    self.server.handle_identity_answer(self.now, a);
                }
            }
        }
    }

    /// The waker was readable: empty it, then the inbox (in that order, so a message sent
    /// after the drain wakes the next round).
    pub fn handle_inbox(&mut self) {
        self.waker.drain();
        while let Ok(m) = self.inbox.try_recv() {
            match m {
                ShardMsg::Drain => {
                    tracing::info!(
                        shard = %self.id,
                        allocations = self.server.allocation_count(),
                        "draining"
                    );
                    self.server.set_draining(true);
                }
                ShardMsg::Stop => self.stopping = true,
                ShardMsg::Reconfigure(mut c) => {
                    c.shard = self.id.0 as u8;
                    self.server.reconfigure(*c)
                }
                ShardMsg::Tls(t) => self.streams.set_tls(t),
                ShardMsg::Adopt(m) => self.streams.adopt(m),
                ShardMsg::Dtls(c) => self.dtls.set_certificate(c),
                ShardMsg::Sessions(reply) => {
                    let mut out = Vec::with_capacity(self.server.allocation_count());
                    self.server.sessions(pacer::now(), &mut out);
                    let _ = reply.send(out);
                }
                ShardMsg::Disconnect(which, reply) => {
                    let n = self.server.disconnect(&which);
                    // The freed relay sockets go back to the I/O layer now, not at the end of
                    // some later round.
                    let (server, mut fx) = self.effects();
                    server.drain_commands(&mut fx);
                    self.run_tcp_commands();
                    self.publish();
                    if n > 0 {
                        tracing::info!(shard = %self.id, allocations = n, "disconnected by the operator");
                    }
                    let _ = reply.send(n);
                }
            }
        }
    }

    fn effects(&mut self) -> (&mut Server, ShardEffects<'_>) {
        (
            &mut self.server,
            ShardEffects {
                shard: self.id,
                relays: &mut self.relays,
                streams: &mut self.streams,
                identity: self.identity.as_ref(),
                outstanding: &mut self.identity_outstanding,
                stats: &self.stats,
            },
        )
    }

    /// One received datagram on socket `id`, from `from` (to `to`, when the socket reports
    /// original destinations), held in `buf[range]` with headroom before it and tailroom
    /// after it. Returns what to send, framed in `buf`.
    pub fn on_datagram(
        &mut self,
        id: SocketId,
        from: SocketAddr,
        to: Option<SocketAddr>,
        buf: &mut [u8],
        range: Range<usize>,
    ) -> Option<Outgoing> {
        let now = self.now;
        let reply = match id {
            SocketId::Listener(i) if (i as usize) >= self.listener_fds.len() => {
                return self.on_dtls(i, from, buf, range);
            }
            SocketId::Listener(i) => {
                let r = self.server.handle_client(now, i, from, buf, range);
                let (server, mut fx) = self.effects();
                server.settle(now, r, &mut fx)
            }
            _ => {
                let (family, port) = self.relays.port_of(id, to)?;
                self.server.handle_peer(now, family, port, from, buf, range)
            }
        };
        match reply {
            Reply::Transmit(t) => self.outgoing(buf, t),
            Reply::Bind(_) | Reply::Drop(_) | Reply::Pending => None,
        }
    }

    /// A datagram on DTLS listener `i`: a stateless HelloVerifyRequest to send from the
    /// listener, or input to the client's association, whose plaintext messages go through
    /// the TURN core (what they answer leaves at once, `crate::dtls`).
    fn on_dtls(
        &mut self,
        i: u8,
        from: SocketAddr,
        buf: &mut [u8],
        range: Range<usize>,
    ) -> Option<Outgoing> {
        let key = ClientKey {
            listener: i,
            addr: from,
        };
        match self.dtls.handle_datagram(self.now.ms, key, buf, range) {
            Ingress::Answer(r) => {
                return Some(Outgoing {
                    fd: self.dtls.fd(i)?,
                    dst: from,
                    range: r,
                })
            }
            Ingress::Dropped => return None,
            Ingress::Fed => {}
        }
        self.dtls.poll(self.now.ms, key);
        let now = self.now;
        while let Some(ev) = self.dtls.next_event(now.ms, key) {
            match ev {
                Event::Plain(n) => {
                    let mut plain = std::mem::take(self.dtls.plain());
                    let r = self.server.handle_client(
                        now,
                        i,
                        from,
                        &mut plain,
                        DtlsSide::plain_range(n),
                    );
                    let (server, mut fx) = self.effects();
                    let reply = server.settle(now, r, &mut fx);
                    if let Reply::Transmit(t) = reply {
                        if let Some(out) = self.outgoing(&mut plain, t) {
                            if let Some(bytes) = plain.get(out.range.clone()) {
                                crate::dtls::send_to(out.fd, bytes, out.dst);
                            }
                        }
                    }
                    *self.dtls.plain() = plain;
                }
                Event::Closed => self.server.handle_client_closed(now, key),
            }
        }
        None
    }

    /// Where and what a transmit sends. Responses are copied from the core's scratch buffer
    /// into the buffer the request came in (the request is fully handled by then); relayed
    /// data already sits there, framed in place.
    fn outgoing(&mut self, buf: &mut [u8], t: Transmit) -> Option<Outgoing> {
        let fd = match t.src {
            // (UDP listeners come first: their transmits pay one comparison, not a DTLS lookup.)
            Src::Listener(i)
                if (i as usize) >= self.listener_fds.len() && self.dtls.is_listener(i) =>
            {
                // To a DTLS client: encrypted and sent at once.
                let bytes = match &t.data {
                    Data::Buf(r) => buf.get(r.clone())?,
                    Data::Scratch(n) => self.server.scratch().get(..*n)?,
                };
                let key = ClientKey {
                    listener: i,
                    addr: t.dst,
                };
                self.dtls.send(key, bytes);
                return None;
            }
            Src::Listener(i) if (i as usize) >= self.listener_fds.len() => {
                // Peer data for a client on a stream: queued on its connection, written at the
                // round's end. (Answers to stream clients are queued where their frames are
                // handled, `streams.rs`.)
                if let Data::Buf(r) = &t.data {
                    let bytes = buf.get(r.clone())?;
                    self.deliver_to_stream(&t, bytes);
                }
                return None;
            }
            Src::Listener(i) => *self.listener_fds.get(i as usize)?,
            Src::Relay(f, p) => match self.relays.send_via(f, p)? {
                SendVia::Socket(fd) => fd,
                SendVia::Raw(fd, src, port) => {
                    // Out of the raw socket, IP and UDP headers written in place before the
                    // payload (the destination's port stays 0: the UDP header carries it).
                    let Data::Buf(r) = t.data else { return None };
                    let start = match (src, t.dst) {
                        (IpAddr::V4(src), SocketAddr::V4(dst)) if r.start >= lookup::HEADERS => {
                            let start = r.start - lookup::HEADERS;
                            lookup::write_headers(
                                &mut buf[start..r.start],
                                src,
                                port,
                                dst,
                                r.len(),
                            );
                            start
                        }
                        (IpAddr::V6(src), SocketAddr::V6(dst)) if r.start >= lookup::HEADERS_V6 => {
                            let start = r.start - lookup::HEADERS_V6;
                            lookup::write_headers_v6(&mut buf[start..r.end], src, port, dst);
                            start
                        }
                        _ => return None,
                    };
                    return Some(Outgoing {
                        fd,
                        dst: SocketAddr::new(t.dst.ip(), 0),
                        range: start..r.end,
                    });
                }
            },
        };
        let range = match t.data {
            Data::Buf(r) => r,
            Data::Scratch(n) => {
                let body = self.server.scratch().get(..n)?;
                buf.get_mut(..n)?.copy_from_slice(body);
                0..n
            }
        };
        Some(Outgoing {
            fd,
            dst: t.dst,
            range,
        })
    }

    /// A datagram the kernel cut to the receive buffer (dropped).
    pub fn count_truncated(&self) {
        self.stats.truncated.fetch_add(1, Relaxed);
    }

    /// A receive failed on socket `id` (on relay sockets, ICMP errors surface here; nothing
    /// to do but go on).
    pub fn receive_failed(&mut self, id: SocketId, e: &std::io::Error) {
        if matches!(id, SocketId::Listener(_)) && self.warn.allow(self.now.ms) {
            tracing::warn!(shard = %self.id, error = %e, "receive on listener failed");
        }
    }

    /// The round's datagrams are handled: run due timers, carry out the core's commands, tell
    /// the pacer whether the round relayed, publish the counters (before the round's answers
    /// leave, so whoever sees an answer also sees its effect on /metrics).
    pub fn end_round(&mut self) {
        let now = self.now;
        if now.ms >= self.server.poll_timeout() {
            self.server.handle_timeout(now);
        }
        self.end_streams();
        if now.ms >= self.dtls.poll_timeout() {
            let mut closed = std::mem::take(&mut self.dtls_closed);
            let server = &self.server;
            self.dtls
                .handle_timeout(now.ms, &|k| server.has_allocation(k), &mut closed);
            for key in closed.drain(..) {
                self.server.handle_client_closed(now, key);
            }
            self.dtls_closed = closed;
        }
        let (server, mut fx) = self.effects();
        server.drain_commands(&mut fx);
        self.run_tcp_commands();
        let c = &self.server.counters;
        let mark = c.peer_packets + c.relayed_to_peer;
        if mark != self.relay_mark {
            self.relay_mark = mark;
            self.pacer.relayed();
        }
        self.publish();
    }

    /// Copy the counters out for other threads.
    pub fn publish(&self) {
        self.stats.publish(&self.server, self.relays.bind_errors());
        self.stats.publish_streams(&self.streams);
        self.stats.publish_dtls(&self.dtls);
        // Identity lookups queued toward the control thread (shared by every shard).
        let queued = self
            .identity
            .as_ref()
            .map(|l| l.requests.max_capacity() - l.requests.capacity())
            .unwrap_or(0);
        self.stats.identity_queue.store(queued as u64, Relaxed);
    }

    /// Count a batch of sends.
    pub fn account(&mut self, f: Flushed) {
        self.stats.sent.fetch_add(f.sent, Relaxed);
        self.stats.send_errors.fetch_add(f.failed, Relaxed);
        self.stats.send_syscalls.fetch_add(f.syscalls, Relaxed);
        if let Some(e) = f.last_error {
            if self.warn.allow(self.now.ms) {
                tracing::warn!(shard = %self.id, errno = e, "some datagrams could not be sent");
            }
        }
    }

    /// Shutdown: delete every allocation, release every relay socket, publish.
    pub fn finish(&mut self) {
        let mut closed = Vec::new();
        self.streams.close_all(&mut closed);
        self.stream_clients_closed(&closed);
        closed.clear();
        self.dtls.close_all(self.now.ms, &mut closed);
        self.stream_clients_closed(&closed);
        closed.clear();
        self.server.close_all();
        let (server, mut fx) = self.effects();
        server.drain_commands(&mut fx);
        self.run_tcp_commands();
        self.streams.close_all(&mut closed);
        self.publish();
        tracing::info!(shard = %self.id, "shard stopped");
    }

    /// The listener sockets (kept open for the shard's life).
    pub fn listeners(&self) -> &[Socket] {
        &self.listeners
    }
}

/// Pin the calling thread to `core`, if given.
pub fn pin(id: ShardId, core: Option<usize>) {
    if let Some(c) = core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
            tracing::warn!(shard = %id, core = c, "could not pin shard thread");
        }
    }
}
