//! The io_uring backend of a shard.
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

use crate::relays::Change;
use crate::shard::ShardCore;
use crate::token::SocketId;
use actrix_udp::{sockaddr_to_std, std_to_sockaddr};
use io_uring::{cqueue, opcode, squeue, types, IoUring};
use std::mem::{size_of, zeroed};
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU16, Ordering};

/// Big enough for the largest datagram the mmsg backend accepts (4 KiB slots).
const BUF_SIZE: usize = 4096;
const NAME_LEN: u32 = 32;
const PAYLOAD_AT: usize = 16 + NAME_LEN as usize;
const TAIL: usize = 4;
const ENTRIES: u16 = 2048;

/// user_data kinds of this backend's own entries (socket ids use kinds below 0x80).
const K_SEND: u64 = 0x80 << 56;
const K_CANCEL: u64 = 0x81 << 56;
const K_WAKER: u64 = 0x82 << 56;
/// One-shot polls on stream sockets: a listener's readability (connections to accept), a
/// connection's readability and its writability. The low 56 bits are the socket token's
/// generation and index.
const K_POLL_LISTENER: u64 = 0x83 << 56;
const K_POLL_IN: u64 = 0x84 << 56;
const K_POLL_OUT: u64 = 0x85 << 56;
/// A TCP allocation's listening socket (RFC 6062): peers to accept.
const K_POLL_RELAY_LISTENER: u64 = 0x86 << 56;
const LOW_56: u64 = (1 << 56) - 1;

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

/// Per-buffer send state: the msghdr, iovec and destination of a datagram in flight.
struct SendSlots {
    hdrs: Box<[libc::msghdr]>,
    iovs: Box<[libc::iovec]>,
    addrs: Box<[libc::sockaddr_storage]>,
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

/// Set up the ring. Returns the core back when the kernel refuses it (the caller falls back
/// to the mmsg backend).
pub fn run(core: ShardCore) -> Result<(), Box<(std::io::Error, ShardCore)>> {
    let ring = match IoUring::builder()
        .setup_cqsize(ENTRIES as u32 * 4)
        .build(ENTRIES as u32)
    {
        Ok(r) => r,
        Err(e) => return Err(Box::new((e, core))),
    };
    let bufs = match BufRing::new(&ring, ENTRIES) {
        Ok(b) => b,
        Err(e) => return Err(Box::new((e, core))),
    };
    serve(core, ring, bufs);
    Ok(())
}

/// A one-shot poll on a stream socket (a listener or a connection; `out`: writability).
fn arm_poll(ring: &mut IoUring, fd: RawFd, id: SocketId, out: bool) {
    let (kind, mask) = match (id, out) {
        (SocketId::StreamListener(_), _) => (K_POLL_LISTENER, libc::POLLIN),
        (SocketId::RelayListener(..), _) => (K_POLL_RELAY_LISTENER, libc::POLLIN),
        (_, false) => (K_POLL_IN, libc::POLLIN | libc::POLLRDHUP),
        (_, true) => (K_POLL_OUT, libc::POLLOUT),
    };
    let e = opcode::PollAdd::new(types::Fd(fd), mask as u32)
        .build()
        .user_data(kind | (id.token() & LOW_56));
    push_sqe(ring, &e);
}

/// The socket a stream poll's user data names.
fn polled(user: u64) -> Option<SocketId> {
    let (gen, index) = ((user >> 32) as u16, user as u32);
    match user & !LOW_56 {
        K_POLL_LISTENER => Some(SocketId::StreamListener(index as u8)),
        K_POLL_RELAY_LISTENER => Some(SocketId::RelayListener(index, gen)),
        K_POLL_IN | K_POLL_OUT => Some(SocketId::Conn(index, gen)),
        _ => None,
    }
}

/// Which one-shot polls are armed on each connection slot (generation, readability,
/// writability), so that none is ever armed twice: a connection may stop wanting one while it
/// is armed, and want it again before it completed.
#[derive(Default)]
struct Armed(Vec<(u16, bool, bool)>);

impl Armed {
    fn entry(&mut self, slot: u32, gen: u16) -> &mut (u16, bool, bool) {
        let i = slot as usize;
        if self.0.len() <= i {
            self.0.resize(i + 1, (0, false, false));
        }
        let e = &mut self.0[i];
        if e.0 != gen {
            *e = (gen, false, false);
        }
        e
    }

    /// Arm what is wanted and not armed yet.
    fn want(&mut self, ring: &mut IoUring, fd: RawFd, id: SocketId, read: bool, write: bool) {
        let SocketId::Conn(slot, gen) = id else {
            return;
        };
        let e = self.entry(slot, gen);
        if read && !e.1 {
            e.1 = true;
            arm_poll(ring, fd, id, false);
        }
        if write && !e.2 {
            e.2 = true;
            arm_poll(ring, fd, id, true);
        }
    }

    /// A poll of `id` completed (`out`: the writability one).
    fn fired(&mut self, id: SocketId, out: bool) {
        if let SocketId::Conn(slot, gen) = id {
            if let Some(e) = self.0.get_mut(slot as usize).filter(|e| e.0 == gen) {
                if out {
                    e.2 = false;
                } else {
                    e.1 = false;
                }
            }
        }
    }
}

fn arm_recv(ring: &mut IoUring, fd: RawFd, recv_hdr: &libc::msghdr, user: u64) {
    let e = opcode::RecvMsgMulti::new(types::Fd(fd), recv_hdr, 0)
        .build()
        .user_data(user);
    push_sqe(ring, &e);
}

fn serve(mut core: ShardCore, mut ring: IoUring, mut bufs: BufRing) {
    // SAFETY: zeroed C structs are valid.
    let mut recv_hdr: libc::msghdr = unsafe { zeroed() };
    recv_hdr.msg_namelen = NAME_LEN;
    let mut slots = SendSlots {
        hdrs: (0..ENTRIES).map(|_| unsafe { zeroed() }).collect(),
        iovs: (0..ENTRIES).map(|_| unsafe { zeroed() }).collect(),
        addrs: (0..ENTRIES).map(|_| unsafe { zeroed() }).collect(),
    };
    // The waker is watched with a one-shot poll, re-armed after each wake-up; the core
    // empties it.
    let waker_fd = core.waker().fd();
    let arm_waker = |ring: &mut IoUring| {
        let e = opcode::PollAdd::new(types::Fd(waker_fd), libc::POLLIN as u32)
            .build()
            .user_data(K_WAKER);
        push_sqe(ring, &e);
    };
    for (id, fd) in core.initial_sockets() {
        match id {
            SocketId::Waker => {}
            SocketId::StreamListener(_) => arm_poll(&mut ring, fd, id, false),
            _ => arm_recv(&mut ring, fd, &recv_hdr, id.token()),
        }
    }
    let mut streams_out = crate::batch::StreamBatch::new(256);
    let mut again: Vec<SocketId> = Vec::new();
    let mut armed = Armed::default();
    arm_waker(&mut ring);

    let mut cqes: Vec<(u64, i32, u32)> = Vec::with_capacity(ENTRIES as usize * 4);
    // Counted locally, published once per round (no atomic per datagram).
    let (mut sent, mut send_errors) = (0u64, 0u64);
    tracing::info!(shard = %core.id, backend = "io_uring", ports = %core.ports(), "shard I/O ready");

    while !core.stopping() {
        if core.pause_due() {
            // Hand the kernel this round's sends before sleeping out the period.
            let _ = ring.submit();
            core.pause();
        }
        let wait_ms = core.timeout_ms().max(1);
        let ts = types::Timespec::new()
            .sec(wait_ms / 1000)
            .nsec((wait_ms % 1000) as u32 * 1_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        let entered = if core.read_again_pending() {
            // Work is waiting in user space: submit, do not wait.
            ring.submit().map(|_| ())
        } else {
            ring.submitter().submit_with_args(1, &args).map(|_| ())
        };
        if let Err(e) = entered {
            if e.raw_os_error() != Some(libc::ETIME)
                && e.raw_os_error() != Some(libc::EINTR)
                && core.warn.allow(core.now().ms)
            {
                tracing::warn!(shard = %core.id, error = %e, "io_uring_enter failed");
            }
        }
        core.begin_round();
        core.take_read_again(&mut again);
        for id in again.drain(..) {
            core.read_conn(id, false, &mut streams_out);
            if let Some(fd) = core.fd_of(id) {
                armed.want(&mut ring, fd, id, core.wants_read(id), core.wants_write(id));
            }
        }
        cqes.clear();
        cqes.extend(
            ring.completion()
                .map(|c| (c.user_data(), c.result(), c.flags())),
        );
        for &(user, res, flags) in &cqes {
            match user >> 56 {
                k if k == K_SEND >> 56 => {
                    bufs.push(user as u16);
                    if res < 0 {
                        send_errors += 1;
                    } else {
                        sent += 1;
                    }
                }
                k if k == K_WAKER >> 56 => {
                    core.handle_inbox();
                    arm_waker(&mut ring);
                }
                k if k == K_CANCEL >> 56 => {}
                k if k == K_POLL_LISTENER >> 56
                    || k == K_POLL_RELAY_LISTENER >> 56
                    || k == K_POLL_IN >> 56
                    || k == K_POLL_OUT >> 56 =>
                {
                    let Some(id) = polled(user) else { continue };
                    let out = k == K_POLL_OUT >> 56;
                    armed.fired(id, out);
                    if res < 0 {
                        // Cancelled, or the poll failed (the socket is gone): nothing to re-arm.
                        continue;
                    }
                    match id {
                        SocketId::StreamListener(i) => {
                            core.accept(i);
                            if let Some(fd) = core.fd_of(id) {
                                arm_poll(&mut ring, fd, id, false);
                            }
                        }
                        SocketId::RelayListener(..) => {
                            core.accept_relay(id);
                            if let Some(fd) = core.fd_of(id) {
                                arm_poll(&mut ring, fd, id, false);
                            }
                        }
                        _ => {
                            if out {
                                core.write_conn(id);
                            } else {
                                let hangup = res & (libc::POLLHUP | libc::POLLERR) as i32 != 0;
                                core.read_conn(id, hangup, &mut streams_out);
                            }
                            if let Some(fd) = core.fd_of(id) {
                                armed.want(
                                    &mut ring,
                                    fd,
                                    id,
                                    core.wants_read(id),
                                    core.wants_write(id),
                                );
                            }
                        }
                    }
                }
                _ => {
                    let Some(id) = SocketId::from_token(user) else {
                        continue;
                    };
                    let live_fd = core.fd_of(id);
                    if let Some(bid) = cqueue::buffer_select(flags) {
                        let out = match live_fd {
                            Some(_) if res > 0 => on_completion(
                                &mut core,
                                &mut bufs,
                                &recv_hdr,
                                id,
                                bid,
                                res as usize,
                            ),
                            _ => None,
                        };
                        match out {
                            Some(out) => {
                                let buf = bufs.buf_mut(bid);
                                let b = bid as usize;
                                slots.iovs[b].iov_base = buf[out.range.clone()].as_ptr() as *mut _;
                                slots.iovs[b].iov_len = out.range.len();
                                let alen = std_to_sockaddr(&out.dst, &mut slots.addrs[b]);
                                let h = &mut slots.hdrs[b];
                                h.msg_name = &mut slots.addrs[b] as *mut _ as *mut _;
                                h.msg_namelen = alen;
                                h.msg_iov = &mut slots.iovs[b];
                                h.msg_iovlen = 1;
                                let e = opcode::SendMsg::new(types::Fd(out.fd), &slots.hdrs[b])
                                    .build()
                                    .user_data(K_SEND | bid as u64);
                                push_sqe(&mut ring, &e);
                            }
                            None => bufs.push(bid),
                        }
                    }
                    // A multishot receive ends on errors (ENOBUFS when every buffer is in
                    // flight) or cancellation: re-arm it while its socket is current.
                    if !cqueue::more(flags) {
                        if let Some(fd) = live_fd {
                            arm_recv(&mut ring, fd, &recv_hdr, user);
                        }
                    }
                }
            }
        }
        core.end_round();
        if let Some(f) = crate::streams::DatagramSink::flush(&mut streams_out) {
            core.account(f);
        }
        let closed = apply_changes(&mut core, &mut ring, &recv_hdr, &mut armed);
        if closed {
            // Sends queued for a released socket must reach the kernel before its descriptor
            // is closed (and its number possibly reused).
            let _ = ring.submit();
        }
        core.close_released();
        bufs.publish();
        let stats = core.stats();
        stats
            .sent
            .fetch_add(std::mem::take(&mut sent), Ordering::Relaxed);
        stats
            .send_errors
            .fetch_add(std::mem::take(&mut send_errors), Ordering::Relaxed);
        stats.send_syscalls.fetch_add(1, Ordering::Relaxed);
    }
    core.finish();
    apply_changes(&mut core, &mut ring, &recv_hdr, &mut armed);
    let _ = ring.submit();
    core.close_released();
    drop(ring);
    drop(bufs);
}

/// Arm receives on opened relay sockets, cancel those on released ones; whether any closed.
fn apply_changes(
    core: &mut ShardCore,
    ring: &mut IoUring,
    recv_hdr: &libc::msghdr,
    armed: &mut Armed,
) -> bool {
    let mut closed = false;
    if !core.has_changes() {
        return false;
    }
    core.take_changes(|c| match c {
        // A connection is polled once its first Interest change says for what.
        Change::Opened(SocketId::Conn(..), _) => {}
        Change::Opened(id @ SocketId::RelayListener(..), fd) => arm_poll(ring, fd, id, false),
        Change::Opened(id, fd) => arm_recv(ring, fd, recv_hdr, id.token()),
        Change::Interest {
            id,
            fd,
            read,
            write,
        } => armed.want(ring, fd, id, read, write),
        Change::Closed(id @ (SocketId::Conn(..) | SocketId::RelayListener(..)), _) => {
            // Its polls hold references to the file: cancel them, then close.
            let kinds: &[u64] = if matches!(id, SocketId::Conn(..)) {
                &[K_POLL_IN, K_POLL_OUT]
            } else {
                &[K_POLL_RELAY_LISTENER]
            };
            for &kind in kinds {
                let e = opcode::AsyncCancel::new(kind | (id.token() & LOW_56))
                    .build()
                    .user_data(K_CANCEL);
                push_sqe(ring, &e);
            }
            closed = true;
        }
        Change::Closed(id, _) => {
            // The multishot receive holds a reference to the file: cancel it, then close.
            let e = opcode::AsyncCancel::new(id.token())
                .build()
                .user_data(K_CANCEL);
            push_sqe(ring, &e);
            closed = true;
        }
    });
    closed
}

/// Feed one received datagram to the core; what to send from its buffer, if anything (the
/// buffer is recycled otherwise).
fn on_completion(
    core: &mut ShardCore,
    bufs: &mut BufRing,
    recv_hdr: &libc::msghdr,
    id: SocketId,
    bid: u16,
    len: usize,
) -> Option<crate::shard::Outgoing> {
    let buf = bufs.buf_mut(bid);
    let (from, payload_len) = {
        let out = types::RecvMsgOut::parse(&buf[..len.min(BUF_SIZE)], recv_hdr).ok()?;
        if out.is_payload_truncated() {
            core.count_truncated();
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
    core.on_datagram(id, from, None, buf, range)
}
