//! One data-plane shard: a pinned thread that owns its listener sockets (one per listen
//! address, in the SO_REUSEPORT group), its relay sockets, and a [`Server`] core.
//!
//! The loop: wait on epoll (timeout = the core's next timer), read the clock once, drain each
//! ready socket with recvmmsg, feed every datagram to the core, queue what it returns into a
//! sendmmsg batch that points into the receive slots, flush, repeat.

use super::io::{self, Epoll, RecvBatch, SendBatch, Waker, SLOT_HEADROOM};
use super::lookup;
use super::stats::ShardStats;
use crate::auth::IdentityAnswer;
use crate::turn::{Data, Family, RelayBinder, RelayPort, Server, Src, TurnConfig};
use crossbeam_channel::{Receiver, Sender};
use socket2::Socket;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

/// Messages to a shard. They arrive on a channel and the shard is woken by its eventfd.
pub enum ShardMsg {
    /// Stop granting allocations; keep relaying.
    Drain,
    /// Close everything and exit the loop.
    Stop,
    IdentityAnswer(IdentityAnswer),
    Reconfigure(Box<TurnConfig>),
}

/// Resolves Actrix identity usernames off the shard (on the control thread). The callback is
/// invoked later, on another thread, with the answer.
pub trait IdentityResolver: Send + Sync {
    /// Returns false when the request could not be queued (the client will retransmit).
    fn resolve(&self, username: Box<[u8]>, reply: Box<dyn FnOnce(IdentityAnswer) + Send>) -> bool;
}

const TOKEN_WAKER: u64 = 1 << 40;
const TOKEN_LISTENER: u64 = 2 << 40;
const TOKEN_RELAY_V4: u64 = 3 << 40;
const TOKEN_RELAY_V6: u64 = 4 << 40;
const TOKEN_SHARED: u64 = 5 << 40;
const TOKEN_KIND: u64 = 0xFF << 40;

/// Relay sockets of this shard, indexed by port offset.
struct Relays {
    bind_v4: Vec<IpAddr>,
    bind_v6: Vec<IpAddr>,
    port_min: u16,
    span: usize,
    v4: Vec<Option<Socket>>,
    v6: Vec<Option<Socket>>,
    epoll: std::rc::Rc<Epoll>,
    socket_buffer: usize,
    bind_errors: u64,
    /// Slots (indices into `v4`/`v6`) whose socket stays open after its allocation ended,
    /// ready to be reused by the next allocation (see `io.relay_socket_pool`).
    parked_v4: Vec<usize>,
    parked_v6: Vec<usize>,
    pool: usize,
    /// xorshift state: which parked socket is offered next.
    pick: u64,
    reused: u64,
    /// Shared relay sockets (`io.relay_sockets = "shared"`) of each family: its allocations
    /// own no socket.
    shared_v4: Option<SharedRelay>,
    shared_v6: Option<SharedRelay>,
}

/// A shard's shared relay sockets of one family: `recv` gets every datagram to its relayed
/// addresses (steered by [`super::lookup`]), `raw` sends to peers with the relayed port as
/// source.
struct SharedRelay {
    recv: Socket,
    raw: Socket,
}

/// The (receiving, raw sending) shared relay sockets of a shard, per family.
pub struct SharedSockets {
    pub v4: Option<(Socket, Socket)>,
    pub v6: Option<(Socket, Socket)>,
}

impl RelayBinder for Relays {
    fn bind(&mut self, family: Family, port: RelayPort) -> bool {
        if self.shared(family).is_some() {
            // The port is the core's to hand out; the steering program already covers it.
            return self.bind_list(family).get(port.addr as usize).is_some()
                && self.index(port).is_some();
        }
        let (ip, token) = match family {
            Family::V4 => (self.bind_v4.get(port.addr as usize), TOKEN_RELAY_V4),
            Family::V6 => (self.bind_v6.get(port.addr as usize), TOKEN_RELAY_V6),
        };
        let Some(&ip) = ip else { return false };
        let Some(idx) = self.index(port) else {
            return false;
        };
        let (slot, parked) = match family {
            Family::V4 => (&self.v4[idx], &mut self.parked_v4),
            Family::V6 => (&self.v6[idx], &mut self.parked_v6),
        };
        if let Some(s) = slot {
            // A parked socket: take it out of the pool and drop whatever peers of the previous
            // allocation sent meanwhile, so none of it reaches the new one.
            if let Some(pos) = parked.iter().position(|&i| i == idx) {
                parked.swap_remove(pos);
            }
            io::discard_pending(s.as_raw_fd());
            self.reused += 1;
            return true;
        }
        let s = (|| -> std::io::Result<Socket> {
            let s = io::relay_socket(SocketAddr::new(ip, port.port), self.socket_buffer / 4)?;
            self.epoll.add(s.as_raw_fd(), token | idx as u64)?;
            Ok(s)
        })();
        match s {
            Ok(s) => {
                let slot = match family {
                    Family::V4 => &mut self.v4[idx],
                    Family::V6 => &mut self.v6[idx],
                };
                *slot = Some(s);
                true
            }
            Err(_) => {
                self.bind_errors += 1;
                false
            }
        }
    }

    fn unbind(&mut self, family: Family, port: RelayPort) {
        if self.shared(family).is_some() {
            return;
        }
        let Some(idx) = self.index(port) else { return };
        let (slot, parked) = match family {
            Family::V4 => (&mut self.v4[idx], &mut self.parked_v4),
            Family::V6 => (&mut self.v6[idx], &mut self.parked_v6),
        };
        if slot.is_some() && parked.len() < self.pool && !parked.contains(&idx) {
            // Keep it bound and polled: stray datagrams meanwhile find no allocation and are
            // dropped as such.
            parked.push(idx);
            return;
        }
        if let Some(s) = slot.take() {
            self.epoll.del(s.as_raw_fd());
        }
    }

    fn parked(&mut self, family: Family) -> Option<RelayPort> {
        if self.shared(family).is_some() {
            return None;
        }
        let parked = match family {
            Family::V4 => &self.parked_v4,
            Family::V6 => &self.parked_v6,
        };
        if parked.is_empty() {
            return None;
        }
        self.pick ^= self.pick << 13;
        self.pick ^= self.pick >> 7;
        self.pick ^= self.pick << 17;
        let idx = parked[(self.pick % parked.len() as u64) as usize];
        Some(self.port_at(idx))
    }
}

impl Relays {
    fn shared(&self, family: Family) -> Option<&SharedRelay> {
        match family {
            Family::V4 => self.shared_v4.as_ref(),
            Family::V6 => self.shared_v6.as_ref(),
        }
    }

    fn bind_list(&self, family: Family) -> &[IpAddr] {
        match family {
            Family::V4 => &self.bind_v4,
            Family::V6 => &self.bind_v6,
        }
    }

    /// Position of a relay (address, port) in `v4`/`v6`.
    fn index(&self, port: RelayPort) -> Option<usize> {
        let off = port.port.checked_sub(self.port_min)? as usize;
        (off < self.span).then_some(port.addr as usize * self.span + off)
    }

    fn port_at(&self, idx: usize) -> RelayPort {
        RelayPort::new(
            (idx / self.span) as u8,
            self.port_min + (idx % self.span) as u16,
        )
    }

    fn fd(&self, family: Family, port: RelayPort) -> Option<RawFd> {
        let idx = self.index(port)?;
        let v = match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        };
        v.get(idx)?.as_ref().map(|s| s.as_raw_fd())
    }
}

/// Everything a shard needs, built on the main thread.
pub struct ShardSetup {
    pub id: usize,
    pub core: Option<usize>,
    pub listeners: Vec<Socket>,
    pub turn: TurnConfig,
    pub bind_v4: Vec<IpAddr>,
    pub bind_v6: Vec<IpAddr>,
    pub batch: usize,
    pub socket_buffer: usize,
    /// Relay sockets kept open for reuse after their allocation ends (`io.relay_socket_pool`).
    pub relay_socket_pool: usize,
    /// Wake-up coalescing period (`io.coalesce_us`; 0: off).
    pub coalesce_us: u32,
    pub rx: Receiver<ShardMsg>,
    pub self_tx: Sender<ShardMsg>,
    pub waker: Arc<Waker>,
    pub stats: Arc<ShardStats>,
    pub resolver: Option<Arc<dyn IdentityResolver>>,
    pub warn_per_sec: u32,
    /// Use io_uring (falls back to recvmmsg/sendmmsg when the kernel refuses it).
    pub uring: bool,
    /// `io.relay_sockets = "shared"`: this shard's sockets.
    pub shared_relay: Option<SharedSockets>,
}

/// Counts warnings per second and lets only a few through to the log.
pub(super) struct WarnLimiter {
    second: u64,
    count: u32,
    limit: u32,
    suppressed: u64,
}

impl WarnLimiter {
    pub(super) fn new(limit: u32) -> Self {
        WarnLimiter {
            second: 0,
            count: 0,
            limit,
            suppressed: 0,
        }
    }

    pub(super) fn allow(&mut self, now_ms: u64) -> bool {
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

/// Run the shard loop on the current thread until [`ShardMsg::Stop`].
pub fn run(setup: ShardSetup) {
    if let Some(c) = setup.core {
        if !core_affinity::set_for_current(core_affinity::CoreId { id: c }) {
            tracing::warn!(shard = setup.id, core = c, "could not pin shard thread");
        }
    }
    let setup = if setup.uring {
        let u = super::uring::Setup {
            id: setup.id,
            listeners: setup.listeners,
            turn: setup.turn,
            bind_v4: setup.bind_v4,
            bind_v6: setup.bind_v6,
            socket_buffer: setup.socket_buffer,
            coalesce_us: setup.coalesce_us,
            rx: setup.rx,
            self_tx: setup.self_tx,
            waker: setup.waker,
            stats: setup.stats,
            resolver: setup.resolver,
            warn: WarnLimiter::new(setup.warn_per_sec),
        };
        match super::uring::run(u) {
            Ok(()) => return,
            Err(b) => {
                let (e, u) = *b;
                tracing::warn!(shard = u.id, error = %e, "io_uring unavailable; using recvmmsg/sendmmsg");
                ShardSetup {
                    id: u.id,
                    core: None,
                    listeners: u.listeners,
                    turn: u.turn,
                    bind_v4: u.bind_v4,
                    bind_v6: u.bind_v6,
                    batch: setup.batch,
                    socket_buffer: u.socket_buffer,
                    relay_socket_pool: setup.relay_socket_pool,
                    coalesce_us: u.coalesce_us,
                    rx: u.rx,
                    self_tx: u.self_tx,
                    waker: u.waker,
                    stats: u.stats,
                    resolver: u.resolver,
                    warn_per_sec: u.warn.limit,
                    uring: false,
                    shared_relay: None,
                }
            }
        }
    } else {
        setup
    };
    run_mmsg(setup)
}

fn run_mmsg(setup: ShardSetup) {
    let ShardSetup {
        id,
        core,
        listeners,
        turn,
        bind_v4,
        bind_v6,
        batch,
        socket_buffer,
        relay_socket_pool,
        coalesce_us,
        rx,
        self_tx,
        waker,
        stats,
        resolver,
        warn_per_sec,
        uring: _,
        shared_relay,
    } = setup;
    let span = (turn.port_max - turn.port_min) as usize + 1;
    let n_addr = bind_v4.len().max(bind_v6.len()).max(1);
    let epoll = match Epoll::new() {
        Ok(e) => std::rc::Rc::new(e),
        Err(e) => {
            tracing::error!(shard = id, error = %e, "epoll_create failed");
            return;
        }
    };
    let mut relays = Relays {
        bind_v4,
        bind_v6,
        port_min: turn.port_min,
        span,
        v4: (0..span * n_addr).map(|_| None).collect(),
        v6: (0..span * n_addr).map(|_| None).collect(),
        epoll: epoll.clone(),
        socket_buffer,
        bind_errors: 0,
        parked_v4: Vec::with_capacity(relay_socket_pool.min(4096)),
        parked_v6: Vec::with_capacity(relay_socket_pool.min(4096)),
        pool: relay_socket_pool,
        pick: rand::random::<u64>() | 1,
        reused: 0,
        shared_v4: None,
        shared_v6: None,
    };
    if let Some(sh) = shared_relay {
        let take = |p: Option<(Socket, Socket)>| p.map(|(recv, raw)| SharedRelay { recv, raw });
        relays.shared_v4 = take(sh.v4);
        relays.shared_v6 = take(sh.v6);
    }
    for (family, sh) in [(0, &relays.shared_v4), (1, &relays.shared_v6)] {
        if let Some(sh) = sh {
            if let Err(e) = epoll.add(sh.recv.as_raw_fd(), TOKEN_SHARED | family) {
                tracing::error!(shard = id, error = %e, "epoll add failed");
                return;
            }
        }
    }

    for (i, l) in listeners.iter().enumerate() {
        if let Err(e) = epoll.add(l.as_raw_fd(), TOKEN_LISTENER | i as u64) {
            tracing::error!(shard = id, error = %e, "epoll add failed");
            return;
        }
    }
    if let Err(e) = epoll.add(waker.fd(), TOKEN_WAKER) {
        tracing::error!(shard = id, error = %e, "epoll add failed");
        return;
    }
    let listener_fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    let mut now = io::now();
    let seed = rand::random::<u64>();
    let mut server = Server::new(turn, now, seed);
    // A round (one epoll wake-up) receives into successive slots and sends once at its end;
    // when fewer than `batch` slots remain, what is queued is sent early and the slots reused.
    let slots = batch * ROUND_BATCHES;
    let mut rb = RecvBatch::new(
        slots,
        relays.shared_v4.is_some() || relays.shared_v6.is_some(),
    );
    let mut sb = SendBatch::new(slots);
    let mut base = 0usize;
    let mut warn = WarnLimiter::new(warn_per_sec);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut ready: Vec<u64> = Vec::with_capacity(256);
    let mut stopping = false;
    let mut pacer = io::Pacer::new(coalesce_us as u64 * 1000);
    tracing::info!(shard = id, core = ?core, ports = %format!("{}-{}", server.config().port_min, server.config().port_max), "shard running");

    // The receive/send state lent to one ready socket's drain.
    macro_rules! round {
        () => {
            Round {
                rb: &mut rb,
                sb: &mut sb,
                base: &mut base,
                batch,
                stats: &stats,
                warn: &mut warn,
                id,
                now,
                pacer: &mut pacer,
            }
        };
    }
    while !stopping {
        if pacer.pause_due() {
            pacer.pause();
            stats
                .coalesce_pauses
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        let timeout = server.poll_timeout().saturating_sub(now.ms).min(1000) as i32;
        ready.clear();
        let n = epoll.wait(&mut events, timeout.max(0));
        ready.extend(events[..n].iter().map(|e| e.u64));
        now = io::now();
        pacer.round_started();
        stats
            .wakeups
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        for &token in &ready {
            match token & TOKEN_KIND {
                TOKEN_WAKER => {
                    waker.drain();
                    while let Ok(m) = rx.try_recv() {
                        match m {
                            ShardMsg::Drain => {
                                tracing::info!(
                                    shard = id,
                                    allocations = server.allocation_count(),
                                    "draining"
                                );
                                server.set_draining(true);
                            }
                            ShardMsg::Stop => stopping = true,
                            ShardMsg::IdentityAnswer(a) => server.handle_identity_answer(a, now),
                            ShardMsg::Reconfigure(c) => server.reconfigure(*c),
                        }
                    }
                }
                TOKEN_LISTENER => {
                    let li = (token & 0xFFFF) as usize;
                    let fd = listener_fds[li];
                    let mut round = round!();
                    round.drain(
                        fd,
                        true,
                        |slot, from, _, range, relays, server| {
                            server.handle_client(now, li as u8, from, slot, range, relays)
                        },
                        &mut server,
                        &mut relays,
                        &listener_fds,
                    );
                }
                TOKEN_RELAY_V4 | TOKEN_RELAY_V6 => {
                    let family = if token & TOKEN_KIND == TOKEN_RELAY_V4 {
                        Family::V4
                    } else {
                        Family::V6
                    };
                    let port = relays.port_at((token & !TOKEN_KIND) as usize);
                    let Some(fd) = relays.fd(family, port) else {
                        continue;
                    };
                    let mut round = round!();
                    round.drain(
                        fd,
                        false,
                        |slot, from, _, range, _, server| {
                            server.handle_peer(now, family, port, from, slot, range)
                        },
                        &mut server,
                        &mut relays,
                        &listener_fds,
                    );
                }
                TOKEN_SHARED => {
                    let family = if token & 1 == 0 {
                        Family::V4
                    } else {
                        Family::V6
                    };
                    let Some(fd) = relays.shared(family).map(|s| s.recv.as_raw_fd()) else {
                        continue;
                    };
                    let mut round = round!();
                    round.drain(
                        fd,
                        false,
                        |slot, from, to, range, relays, server| {
                            // The relayed address the peer sent to names the allocation.
                            let to = to?;
                            let addr = relays
                                .bind_list(family)
                                .iter()
                                .position(|a| *a == to.ip())?;
                            let port = RelayPort::new(addr as u8, to.port());
                            server.handle_peer(now, family, port, from, slot, range)
                        },
                        &mut server,
                        &mut relays,
                        &listener_fds,
                    );
                }
                _ => {}
            }
        }
        if now.ms >= server.poll_timeout() {
            server.handle_timeout(now, &mut relays);
        }
        forward_events(
            &mut server,
            resolver.as_ref(),
            &self_tx,
            &waker,
            &mut warn,
            now.ms,
            id,
        );
        // Counters first, so that whoever sees an answer of this round (an allocation's
        // success, say) also sees its effect on /metrics and on the shutdown drain's count.
        stats.publish(&server, relays.bind_errors);
        // Everything this round queued leaves now: one sendmmsg per run of datagrams on the
        // same socket, across all the sockets that were ready (replies from many relay
        // sockets to the clients share the listener's run).
        if sb.len > 0 {
            let f = sb.flush();
            account(&stats, f, &mut warn, now.ms, id);
        }
        base = 0;
    }
    server.close_all(&mut relays);
    stats.publish(&server, relays.bind_errors);
    tracing::info!(shard = id, "shard stopped");
}

/// Receive slots per shard, in units of `io.batch`.
const ROUND_BATCHES: usize = 4;

/// The receive/send state of one round, lent to [`Round::drain`] for one ready socket.
struct Round<'a> {
    rb: &'a mut RecvBatch,
    sb: &'a mut SendBatch,
    base: &'a mut usize,
    batch: usize,
    stats: &'a ShardStats,
    warn: &'a mut WarnLimiter,
    id: usize,
    now: crate::turn::Now,
    pacer: &'a mut io::Pacer,
}

impl Round<'_> {
    /// Drain one ready socket (a budget of 8 recvmmsg calls keeps one busy socket from
    /// starving the others), handing every datagram to `handle` and queueing what it returns.
    /// Relay traffic among them (every datagram from a peer; ChannelData and Send indications
    /// from a client) tells the pacer the round relayed.
    #[allow(clippy::too_many_arguments)]
    fn drain(
        &mut self,
        fd: RawFd,
        listener: bool,
        mut handle: impl FnMut(
            &mut [u8],
            SocketAddr,
            Option<SocketAddr>,
            std::ops::Range<usize>,
            &mut Relays,
            &mut Server,
        ) -> Option<crate::turn::Transmit>,
        server: &mut Server,
        relays: &mut Relays,
        listener_fds: &[RawFd],
    ) {
        let mut relayed = !listener;
        for _ in 0..8 {
            if self.rb.n - *self.base < self.batch {
                self.stats.publish(server, relays.bind_errors);
                let f = self.sb.flush();
                account(self.stats, f, self.warn, self.now.ms, self.id);
                *self.base = 0;
            }
            let start = *self.base;
            let n = match self.rb.recv(fd, start, self.batch) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => {
                    // On relay sockets, ICMP errors surface here; nothing to do.
                    if listener && self.warn.allow(self.now.ms) {
                        tracing::warn!(shard = self.id, error = %e, "recvmmsg on listener failed");
                    }
                    break;
                }
            };
            *self.base += n;
            for i in start..start + n {
                let (from, len, trunc) = self.rb.meta(i);
                let Some(from) = from else { continue };
                if trunc {
                    self.stats
                        .truncated
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                let to = self.rb.orig_dst(i);
                let slot = self.rb.slot_mut(i);
                let range = SLOT_HEADROOM..SLOT_HEADROOM + len;
                relayed = relayed || io::is_relay_data(&slot[range.clone()]);
                if let Some(t) = handle(slot, from, to, range, relays, server) {
                    queue(self.sb, server, relays, listener_fds, slot, t);
                }
            }
            if n < self.batch {
                break;
            }
        }
        if relayed {
            self.pacer.relayed();
        }
    }
}

/// Queue a transmit. Responses are copied from the core's scratch buffer into the slot the
/// request came in (the request is fully handled by then); relayed data already sits in the
/// slot, framed in place.
fn queue(
    sb: &mut SendBatch,
    server: &Server,
    relays: &Relays,
    listeners: &[RawFd],
    slot: &mut [u8],
    t: crate::turn::Transmit,
) {
    if let Src::Relay(f, p) = t.src {
        if let Some(sh) = relays.shared(f) {
            // Out of the raw socket, IP and UDP headers written in place before the payload
            // (the destination's port stays 0: the UDP header carries it).
            let Data::Buf(r) = t.data else { return };
            if sb.is_full() {
                return;
            }
            let to = SocketAddr::new(t.dst.ip(), 0);
            match (relays.bind_list(f).get(p.addr as usize), t.dst) {
                (Some(IpAddr::V4(src)), SocketAddr::V4(dst)) if r.start >= lookup::HEADERS => {
                    let start = r.start - lookup::HEADERS;
                    lookup::write_headers(&mut slot[start..r.start], *src, p.port, dst, r.len());
                    sb.push(sh.raw.as_raw_fd(), &to, &slot[start..r.end]);
                }
                (Some(IpAddr::V6(src)), SocketAddr::V6(dst)) if r.start >= lookup::HEADERS_V6 => {
                    let start = r.start - lookup::HEADERS_V6;
                    lookup::write_headers_v6(&mut slot[start..r.end], *src, p.port, dst);
                    sb.push(sh.raw.as_raw_fd(), &to, &slot[start..r.end]);
                }
                _ => {}
            }
            return;
        }
    }
    let fd = match t.src {
        Src::Listener(i) => listeners[i as usize],
        Src::Relay(f, p) => match relays.fd(f, p) {
            Some(fd) => fd,
            None => return,
        },
    };
    // `slot` lives in the RecvBatch buffer, which is neither moved nor reused until the
    // SendBatch is flushed at the end of this batch, so the pointer the batch keeps stays valid.
    let data: &[u8] = match t.data {
        Data::Buf(r) => &slot[r],
        Data::Scratch(n) => {
            if n == 0 || n > slot.len() {
                return;
            }
            slot[..n].copy_from_slice(&server.scratch()[..n]);
            &slot[..n]
        }
    };
    if sb.is_full() {
        return;
    }
    sb.push(fd, &t.dst, data);
}

fn account(stats: &ShardStats, f: io::Flushed, warn: &mut WarnLimiter, now_ms: u64, id: usize) {
    use std::sync::atomic::Ordering::Relaxed;
    stats.sent.fetch_add(f.sent, Relaxed);
    stats.send_errors.fetch_add(f.failed, Relaxed);
    stats.send_syscalls.fetch_add(f.syscalls, Relaxed);
    if let Some(e) = f.last_error {
        if warn.allow(now_ms) {
            tracing::warn!(shard = id, errno = e, "sendmmsg failed for some datagrams");
        }
    }
}

/// Hand the core's events to the world outside the shard (both I/O backends): identity
/// usernames go to the control thread, whose answer comes back as a message and wakes us.
pub(super) fn forward_events(
    server: &mut Server,
    resolver: Option<&Arc<dyn IdentityResolver>>,
    self_tx: &Sender<ShardMsg>,
    waker: &Arc<Waker>,
    warn: &mut WarnLimiter,
    now_ms: u64,
    id: usize,
) {
    while let Some(ev) = server.poll_event() {
        match ev {
            crate::turn::Event::ResolveIdentity(username) => {
                let Some(r) = resolver else { continue };
                let tx = self_tx.clone();
                let w = waker.clone();
                let queued = r.resolve(
                    username,
                    Box::new(move |answer| {
                        if tx.send(ShardMsg::IdentityAnswer(answer)).is_ok() {
                            w.wake();
                        }
                    }),
                );
                if !queued && warn.allow(now_ms) {
                    tracing::warn!(shard = id, "identity resolution queue full");
                }
            }
        }
    }
}
