//! The io_uring I/O backend of a shard.
//!
//! With one socket per relay allocation, recvmmsg/sendmmsg batch poorly: datagrams from many
//! clients leave through many relay sockets (one sendmmsg each) and arrive on many relay sockets
//! (one recvmmsg each). io_uring batches across sockets: every socket has a multishot
//! `recvmsg` that fills buffers from one provided-buffer ring, every outgoing datagram is a
//! `sendmsg` entry, and one `io_uring_enter` submits all sends of a round and waits for the
//! next completions.
//!
//! Buffer layout: the kernel writes `io_uring_recvmsg_out` (16 bytes) and the source address
//! (32 bytes reserved) before the payload, so the payload starts at offset 48, exactly the
//! headroom a Data indication header needs; the last 4 bytes are never given to the kernel
//! (tailroom for padding). A buffer travels: provided → received → (sent | recycled).

use super::io::{self, sockaddr_to_std, std_to_sockaddr};
use super::shard::{forward_events, IdentityResolver, ShardMsg, WarnLimiter};
use super::stats::ShardStats;
use crate::turn::{Data, Family, RelayBinder, RelayPort, Server, Src, Transmit, TurnConfig};
use crossbeam_channel::{Receiver, Sender};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use socket2::Socket;
use std::mem::{size_of, zeroed};
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;

/// Big enough for the largest datagram the mmsg backend accepts (4 KiB slots).
const BUF_SIZE: usize = 4096;
const NAME_LEN: u32 = 32;
const PAYLOAD_AT: usize = 16 + NAME_LEN as usize;
const TAIL: usize = 4;

const K_LISTENER: u64 = 1;
const K_RELAY_V4: u64 = 2;
const K_RELAY_V6: u64 = 3;
const K_SEND: u64 = 4;
const K_WAKER: u64 = 5;
const K_CANCEL: u64 = 6;

/// user_data layout: kind (8 bits) | generation (16 bits) | index (32 bits).
fn ud(kind: u64, gen: u16, index: u32) -> u64 {
    (kind << 56) | ((gen as u64) << 32) | index as u64
}

fn ud_parts(u: u64) -> (u64, u16, u32) {
    (u >> 56, (u >> 32) as u16, u as u32)
}

/// The provided-buffer ring: `entries` buffers of [`BUF_SIZE`] bytes, registered as group 0.
struct BufRing {
    ring: *mut libc::c_void,
    ring_bytes: usize,
    mask: u16,
    tail: u16,
    bufs: Box<[u8]>,
}

impl BufRing {
    fn new(uring: &IoUring, entries: u16) -> std::io::Result<BufRing> {
        let ring_bytes = entries as usize * 16;
        // SAFETY: anonymous private mapping, checked below.
        let ring = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                ring_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if ring == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let mut br = BufRing {
            ring,
            ring_bytes,
            mask: entries - 1,
            tail: 0,
            bufs: vec![0u8; entries as usize * BUF_SIZE].into_boxed_slice(),
        };
        // SAFETY: the mapping stays valid until Drop, after the ring (owned by the same shard
        // loop and dropped first) is gone.
        unsafe {
            uring
                .submitter()
                .register_buf_ring_with_flags(ring as u64, entries, 0, 0)?;
        }
        for bid in 0..entries {
            br.push(bid);
        }
        br.publish();
        Ok(br)
    }

    /// Give buffer `bid` back to the kernel (visible after [`BufRing::publish`]).
    fn push(&mut self, bid: u16) {
        let idx = (self.tail & self.mask) as usize;
        // SAFETY: idx < entries; each entry is a 16-byte io_uring_buf {addr u64, len u32,
        // bid u16, resv u16}. Writing addr/len/bid never touches entry 0's resv (the tail).
        unsafe {
            let e = (self.ring as *mut u8).add(idx * 16);
            (e as *mut u64).write_unaligned(self.bufs.as_ptr().add(bid as usize * BUF_SIZE) as u64);
            (e.add(8) as *mut u32).write_unaligned((BUF_SIZE - TAIL) as u32);
            (e.add(12) as *mut u16).write_unaligned(bid);
        }
        self.tail = self.tail.wrapping_add(1);
    }

    fn publish(&mut self) {
        // SAFETY: the tail lives in entry 0's `resv` field (offset 14), a u16 the kernel reads
        // with acquire semantics.
        let t = unsafe { &*((self.ring as *mut u8).add(14) as *const AtomicU16) };
        t.store(self.tail, Ordering::Release);
    }

    fn buf_mut(&mut self, bid: u16) -> &mut [u8] {
        let s = bid as usize * BUF_SIZE;
        &mut self.bufs[s..s + BUF_SIZE]
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: our mapping.
        unsafe {
            libc::munmap(self.ring, self.ring_bytes);
        }
    }
}

/// Relay sockets of the shard; sockets to arm or cancel are queued for the loop.
struct Relays {
    bind_v4: Vec<IpAddr>,
    bind_v6: Vec<IpAddr>,
    port_min: u16,
    span: usize,
    v4: Vec<Option<(Socket, u16)>>,
    v6: Vec<Option<(Socket, u16)>>,
    generation: u16,
    arm: Vec<(RawFd, u64)>,
    cancel: Vec<u64>,
    closing: Vec<Socket>,
    socket_buffer: usize,
    bind_errors: u64,
}

impl RelayBinder for Relays {
    fn bind(&mut self, family: Family, port: RelayPort) -> bool {
        let (ip, kind) = match family {
            Family::V4 => (self.bind_v4.get(port.addr as usize), K_RELAY_V4),
            Family::V6 => (self.bind_v6.get(port.addr as usize), K_RELAY_V6),
        };
        let Some(&ip) = ip else { return false };
        let Some(idx) = self.index(port) else {
            return false;
        };
        let s = io::relay_socket(SocketAddr::new(ip, port.port), self.socket_buffer / 4);
        match s {
            Ok(s) => {
                self.generation = self.generation.wrapping_add(1);
                let g = self.generation;
                self.arm.push((s.as_raw_fd(), ud(kind, g, idx as u32)));
                let slot = match family {
                    Family::V4 => &mut self.v4[idx],
                    Family::V6 => &mut self.v6[idx],
                };
                *slot = Some((s, g));
                true
            }
            Err(_) => {
                self.bind_errors += 1;
                false
            }
        }
    }

    fn unbind(&mut self, family: Family, port: RelayPort) {
        let Some(idx) = self.index(port) else { return };
        let (slot, kind) = match family {
            Family::V4 => (&mut self.v4[idx], K_RELAY_V4),
            Family::V6 => (&mut self.v6[idx], K_RELAY_V6),
        };
        if let Some((s, g)) = slot.take() {
            // The multishot receive holds a reference to the file: cancel it, then close.
            self.cancel.push(ud(kind, g, idx as u32));
            self.closing.push(s);
        }
    }
}

impl Relays {
    fn index(&self, port: RelayPort) -> Option<usize> {
        let off = port.port.checked_sub(self.port_min)? as usize;
        (off < self.span).then_some(port.addr as usize * self.span + off)
    }

    fn port_at(&self, idx: u32) -> RelayPort {
        let idx = idx as usize;
        RelayPort::new(
            (idx / self.span) as u8,
            self.port_min + (idx % self.span) as u16,
        )
    }

    fn current(&self, kind: u64, gen: u16, idx: u32) -> Option<RawFd> {
        let v = if kind == K_RELAY_V4 {
            &self.v4
        } else {
            &self.v6
        };
        match v.get(idx as usize)? {
            Some((s, g)) if *g == gen => Some(s.as_raw_fd()),
            _ => None,
        }
    }

    fn fd(&self, family: Family, port: RelayPort) -> Option<RawFd> {
        let idx = self.index(port)?;
        let v = match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        };
        v.get(idx)?.as_ref().map(|(s, _)| s.as_raw_fd())
    }
}

/// Per-buffer send state: the msghdr, iovec and destination of a datagram in flight.
struct SendSlots {
    hdrs: Box<[libc::msghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
}

pub(super) struct Setup {
    pub id: usize,
    pub listeners: Vec<Socket>,
    pub turn: TurnConfig,
    pub bind_v4: Vec<IpAddr>,
    pub bind_v6: Vec<IpAddr>,
    pub socket_buffer: usize,
    pub coalesce_us: u32,
    pub rx: Receiver<ShardMsg>,
    pub self_tx: Sender<ShardMsg>,
    pub waker: Arc<io::Waker>,
    pub stats: Arc<ShardStats>,
    pub resolver: Option<Arc<dyn IdentityResolver>>,
    pub warn: WarnLimiter,
}

fn push_sqe(ring: &mut IoUring, e: &squeue::Entry) {
    // SAFETY: every entry's pointers (msghdr, buffers) stay valid until its completion: they
    // live in SendSlots / BufRing / the loop's locals that outlive the ring usage.
    unsafe {
        while ring.submission().push(e).is_err() {
            let _ = ring.submit();
        }
    }
}

/// Run the shard loop on io_uring. Returns Err when the ring cannot be set up (the caller
/// falls back to recvmmsg/sendmmsg).
pub(super) fn run(s: Setup) -> Result<(), Box<(std::io::Error, Setup)>> {
    const ENTRIES: u16 = 2048;
    let mut ring = match IoUring::builder()
        .setup_cqsize(ENTRIES as u32 * 4)
        .build(ENTRIES as u32)
    {
        Ok(r) => r,
        Err(e) => return Err(Box::new((e, s))),
    };
    let mut bufs = match BufRing::new(&ring, ENTRIES) {
        Ok(b) => b,
        Err(e) => return Err(Box::new((e, s))),
    };
    let Setup {
        id,
        listeners,
        turn,
        bind_v4,
        bind_v6,
        socket_buffer,
        coalesce_us,
        rx,
        self_tx,
        waker,
        stats,
        resolver,
        mut warn,
    } = s;
    let span = (turn.port_max - turn.port_min) as usize + 1;
    let n_addr = bind_v4.len().max(bind_v6.len()).max(1);
    let mut relays = Relays {
        bind_v4,
        bind_v6,
        port_min: turn.port_min,
        span,
        v4: (0..span * n_addr).map(|_| None).collect(),
        v6: (0..span * n_addr).map(|_| None).collect(),
        generation: 0,
        arm: Vec::with_capacity(64),
        cancel: Vec::with_capacity(64),
        closing: Vec::with_capacity(64),
        socket_buffer,
        bind_errors: 0,
    };
    // SAFETY: zeroed C structs are valid.
    let mut recv_hdr: libc::msghdr = unsafe { zeroed() };
    recv_hdr.msg_namelen = NAME_LEN;
    let mut slots = SendSlots {
        hdrs: (0..ENTRIES).map(|_| unsafe { zeroed() }).collect(),
        iovs: (0..ENTRIES).map(|_| unsafe { zeroed() }).collect(),
        addrs: (0..ENTRIES).map(|_| unsafe { zeroed() }).collect(),
    };
    let listener_fds: Vec<RawFd> = listeners.iter().map(|l| l.as_raw_fd()).collect();
    for (i, fd) in listener_fds.iter().enumerate() {
        let e = opcode::RecvMsgMulti::new(types::Fd(*fd), &recv_hdr, 0)
            .build()
            .user_data(ud(K_LISTENER, 0, i as u32));
        push_sqe(&mut ring, &e);
    }
    let mut waker_buf = [0u8; 8];
    let arm_waker = |ring: &mut IoUring, buf: &mut [u8; 8]| {
        let e = opcode::Read::new(types::Fd(waker.fd()), buf.as_mut_ptr(), 8)
            .build()
            .user_data(ud(K_WAKER, 0, 0));
        push_sqe(ring, &e);
    };
    arm_waker(&mut ring, &mut waker_buf);

    let mut now = io::now();
    let mut server = Server::new(turn, now, rand::random());
    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(ENTRIES as usize * 4);
    let mut stopping = false;
    // Counted locally, published once per round (no atomic per datagram).
    let (mut sent, mut send_errors) = (0u64, 0u64);
    tracing::info!(shard = id, backend = "io_uring", "shard I/O ready");

    let mut pacer = io::Pacer::new(coalesce_us as u64 * 1000);
    while !stopping {
        if pacer.pause_due() {
            // Hand the kernel this round's sends before sleeping out the period.
            let _ = ring.submit();
            pacer.pause();
            stats.coalesce_pauses.fetch_add(1, Ordering::Relaxed);
        }
        let wait_ms = server.poll_timeout().saturating_sub(now.ms).clamp(1, 1000);
        let ts = types::Timespec::new()
            .sec(wait_ms / 1000)
            .nsec((wait_ms % 1000) as u32 * 1_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        if let Err(e) = ring.submitter().submit_with_args(1, &args) {
            if e.raw_os_error() != Some(libc::ETIME)
                && e.raw_os_error() != Some(libc::EINTR)
                && warn.allow(now.ms)
            {
                tracing::warn!(shard = id, error = %e, "io_uring_enter failed");
            }
        }
        now = io::now();
        pacer.round_started();
        stats.wakeups.fetch_add(1, Ordering::Relaxed);
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(user, res, flags) in &cqes {
            let (kind, gen, idx) = ud_parts(user);
            match kind {
                K_SEND => {
                    bufs.push(idx as u16);
                    if res < 0 {
                        send_errors += 1;
                    } else {
                        sent += 1;
                    }
                }
                K_WAKER => {
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
                    arm_waker(&mut ring, &mut waker_buf);
                }
                K_LISTENER | K_RELAY_V4 | K_RELAY_V6 => {
                    let bid = cqueue::buffer_select(flags);
                    let live_fd = if kind == K_LISTENER {
                        listener_fds.get(idx as usize).copied()
                    } else {
                        relays.current(kind, gen, idx)
                    };
                    if let Some(bid) = bid {
                        let out = match live_fd {
                            Some(_) if res > 0 => on_datagram(
                                &mut pacer,
                                &mut server,
                                &mut bufs,
                                &mut relays,
                                &listener_fds,
                                now,
                                kind,
                                idx,
                                bid,
                                res as usize,
                                &recv_hdr,
                                &stats,
                            ),
                            _ => None,
                        };
                        match out {
                            Some((fd, t, range)) => {
                                let buf = bufs.buf_mut(bid);
                                let b = bid as usize;
                                slots.iovs[b].iov_base = buf[range.clone()].as_ptr() as *mut _;
                                slots.iovs[b].iov_len = range.len();
                                let alen = std_to_sockaddr(&t, &mut slots.addrs[b]);
                                let h = &mut slots.hdrs[b];
                                h.msg_name = &mut slots.addrs[b] as *mut _ as *mut _;
                                h.msg_namelen = alen;
                                h.msg_iov = &mut slots.iovs[b];
                                h.msg_iovlen = 1;
                                let e = opcode::SendMsg::new(types::Fd(fd), &slots.hdrs[b])
                                    .build()
                                    .user_data(ud(K_SEND, 0, bid as u32));
                                push_sqe(&mut ring, &e);
                            }
                            None => bufs.push(bid),
                        }
                    }
                    // A multishot receive ends on errors (ENOBUFS when every buffer is in
                    // flight) or cancellation: re-arm it while its socket is current.
                    if !cqueue::more(flags) {
                        if let Some(fd) = live_fd {
                            let e = opcode::RecvMsgMulti::new(types::Fd(fd), &recv_hdr, 0)
                                .build()
                                .user_data(user);
                            push_sqe(&mut ring, &e);
                        }
                    }
                }
                _ => {}
            }
        }
        if now.ms >= server.poll_timeout() {
            server.handle_timeout(now, &mut relays);
        }
        for (fd, user) in relays.arm.drain(..) {
            let e = opcode::RecvMsgMulti::new(types::Fd(fd), &recv_hdr, 0)
                .build()
                .user_data(user);
            push_sqe(&mut ring, &e);
        }
        for user in relays.cancel.drain(..) {
            let e = opcode::AsyncCancel::new(user)
                .build()
                .user_data(ud(K_CANCEL, 0, 0));
            push_sqe(&mut ring, &e);
        }
        relays.closing.clear();
        bufs.publish();
        forward_events(
            &mut server,
            resolver.as_ref(),
            &self_tx,
            &waker,
            &mut warn,
            now.ms,
            id,
        );
        stats.publish(&server, relays.bind_errors);
        stats
            .sent
            .fetch_add(std::mem::take(&mut sent), Ordering::Relaxed);
        stats
            .send_errors
            .fetch_add(std::mem::take(&mut send_errors), Ordering::Relaxed);
        stats.send_syscalls.fetch_add(1, Ordering::Relaxed);
    }
    server.close_all(&mut relays);
    for user in relays.cancel.drain(..) {
        let e = opcode::AsyncCancel::new(user)
            .build()
            .user_data(ud(K_CANCEL, 0, 0));
        push_sqe(&mut ring, &e);
    }
    let _ = ring.submit();
    stats.publish(&server, relays.bind_errors);
    drop(listeners);
    drop(ring);
    drop(bufs);
    tracing::info!(shard = id, "shard stopped");
    Ok(())
}

/// Feed one received datagram to the core; returns the socket, destination and byte range of
/// the buffer to send, or `None` when nothing is sent (the buffer is then recycled).
#[allow(clippy::too_many_arguments)]
fn on_datagram(
    pacer: &mut io::Pacer,
    server: &mut Server,
    bufs: &mut BufRing,
    relays: &mut Relays,
    listener_fds: &[RawFd],
    now: crate::turn::Now,
    kind: u64,
    idx: u32,
    bid: u16,
    len: usize,
    recv_hdr: &libc::msghdr,
    stats: &ShardStats,
) -> Option<(RawFd, SocketAddr, std::ops::Range<usize>)> {
    let buf = bufs.buf_mut(bid);
    let (from, payload_len) = {
        let out = types::RecvMsgOut::parse(&buf[..len.min(BUF_SIZE)], recv_hdr).ok()?;
        if out.is_payload_truncated() {
            stats.truncated.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let name = out.name_data();
        // SAFETY: zeroed sockaddr_storage is valid; we copy at most its size.
        let mut ss: libc::sockaddr_storage = unsafe { zeroed() };
        let n = name.len().min(size_of::<libc::sockaddr_storage>());
        // SAFETY: copying n bytes into a local of at least n bytes.
        unsafe {
            std::ptr::copy_nonoverlapping(name.as_ptr(), &mut ss as *mut _ as *mut u8, n);
        }
        (sockaddr_to_std(&ss)?, out.payload_data().len())
    };
    let range = PAYLOAD_AT..PAYLOAD_AT + payload_len;
    if kind != K_LISTENER || io::is_relay_data(&buf[range.clone()]) {
        pacer.relayed();
    }
    let t: Transmit = if kind == K_LISTENER {
        server.handle_client(now, idx as u8, from, buf, range, relays)?
    } else {
        let family = if kind == K_RELAY_V4 {
            Family::V4
        } else {
            Family::V6
        };
        let port = relays.port_at(idx);
        server.handle_peer(now, family, port, from, buf, range)?
    };
    let fd = match t.src {
        Src::Listener(i) => *listener_fds.get(i as usize)?,
        Src::Relay(f, p) => relays.fd(f, p)?,
    };
    let range = match t.data {
        Data::Buf(r) => r,
        Data::Scratch(n) => {
            if n == 0 || n > BUF_SIZE {
                return None;
            }
            buf[..n].copy_from_slice(&server.scratch()[..n]);
            0..n
        }
    };
    Some((fd, t.dst, range))
}
