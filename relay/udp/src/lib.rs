//! Thin, batched UDP I/O for one shard: epoll readiness, recvmmsg and sendmmsg.
//!
//! Everything here is preallocated when the shard starts: the receive slots (each with
//! headroom for in-place TURN framing), the `mmsghdr`/`iovec`/address arrays of both
//! directions. A batch costs one system call each way, no allocation.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

/// Bytes reserved before each received datagram (a Data indication header fits in 48).
pub const SLOT_HEADROOM: usize = 64;
/// Largest datagram accepted; bigger ones are truncated by the kernel and dropped by us.
pub const SLOT_DATA: usize = 4096 - 128;
pub const SLOT_SIZE: usize = 4096;

pub fn sockaddr_to_std(ss: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match ss.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin: &libc::sockaddr_in = unsafe { &*(ss as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6: &libc::sockaddr_in6 =
                unsafe { &*(ss as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Write `addr` into `ss`; returns the length to pass to the kernel.
pub fn std_to_sockaddr(addr: &SocketAddr, ss: &mut libc::sockaddr_storage) -> libc::socklen_t {
    match addr {
        SocketAddr::V4(a) => {
            // SAFETY: sockaddr_storage is large enough and suitably aligned for sockaddr_in.
            let sin: &mut libc::sockaddr_in =
                unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
            sin.sin_zero = [0; 8];
            size_of::<libc::sockaddr_in>() as libc::socklen_t
        }
        SocketAddr::V6(a) => {
            // SAFETY: as above, for sockaddr_in6.
            let sin6: &mut libc::sockaddr_in6 =
                unsafe { &mut *(ss as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_scope_id = a.scope_id();
            size_of::<libc::sockaddr_in6>() as libc::socklen_t
        }
    }
}

/// Receive side of a batch: `n` slots of [`SLOT_SIZE`] bytes.
pub struct RecvBatch {
    pub bufs: Box<[u8]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    /// Control-message space per slot (original destinations on shared relay sockets); empty
    /// when no socket of the shard reports them.
    ctrl: Box<[u8]>,
    pub n: usize,
}

/// Control-message bytes per slot: one `IPV6_ORIGDSTADDR` (a sockaddr_in6) with room to spare.
const CTRL: usize = 64;

// SAFETY: the raw pointers inside point into the boxes owned by the same struct; the struct is
// created and used on one shard thread after being moved there.
unsafe impl Send for RecvBatch {}

/// The original destination (`IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR` control message) of a
/// received datagram, if any.
pub fn orig_dst(m: &libc::msghdr) -> Option<SocketAddr> {
    if m.msg_control.is_null() || m.msg_controllen == 0 {
        return None;
    }
    // SAFETY: msg_control/msg_controllen describe the buffer the kernel filled; the CMSG
    // macros stay inside it, and each message's data holds the sockaddr its type says.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(m);
        while !c.is_null() {
            let (level, kind) = ((*c).cmsg_level, (*c).cmsg_type);
            if level == libc::SOL_IP && kind == libc::IP_ORIGDSTADDR {
                let sin = std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::sockaddr_in);
                return Some(SocketAddr::from((
                    std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                    u16::from_be(sin.sin_port),
                )));
            }
            if level == libc::SOL_IPV6 && kind == libc::IPV6_ORIGDSTADDR {
                let sin6 =
                    std::ptr::read_unaligned(libc::CMSG_DATA(c) as *const libc::sockaddr_in6);
                return Some(SocketAddr::from((
                    std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr),
                    u16::from_be(sin6.sin6_port),
                )));
            }
            c = libc::CMSG_NXTHDR(m, c);
        }
    }
    None
}

impl RecvBatch {
    /// `control`: also receive control messages (see [`RecvBatch::orig_dst`]).
    pub fn new(n: usize, control: bool) -> Self {
        let mut b = RecvBatch {
            ctrl: vec![0u8; if control { n * CTRL } else { 0 }].into_boxed_slice(),
            bufs: vec![0u8; n * SLOT_SIZE].into_boxed_slice(),
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            addrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            n,
        };
        for i in 0..n {
            b.iovs[i].iov_base = b.bufs[i * SLOT_SIZE + SLOT_HEADROOM..].as_mut_ptr() as *mut _;
            b.iovs[i].iov_len = SLOT_DATA;
            b.hdrs[i].msg_hdr.msg_name = &mut b.addrs[i] as *mut _ as *mut _;
            b.hdrs[i].msg_hdr.msg_iov = &mut b.iovs[i];
            b.hdrs[i].msg_hdr.msg_iovlen = 1;
        }
        b
    }

    /// One recvmmsg call into slots `start..start + max`; returns how many datagrams arrived
    /// (0 on EAGAIN).
    pub fn recv(&mut self, fd: RawFd, start: usize, max: usize) -> io::Result<usize> {
        let start = start.min(self.n);
        let max = max.min(self.n - start);
        let control = !self.ctrl.is_empty();
        for i in start..start + max {
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
            if control {
                h.msg_hdr.msg_control = self.ctrl[i * CTRL..].as_mut_ptr().cast();
                h.msg_hdr.msg_controllen = CTRL as _;
            }
        }
        // SAFETY: hdrs[..max] point into our own buffers, which outlive the call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs[start..].as_mut_ptr(),
                max as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock {
                return Ok(0);
            }
            return Err(e);
        }
        Ok(r as usize)
    }

    /// Datagram `i`: its source, length and whether it was truncated.
    pub fn meta(&self, i: usize) -> (Option<SocketAddr>, usize, bool) {
        let h = &self.hdrs[i];
        (
            sockaddr_to_std(&self.addrs[i]),
            h.msg_len as usize,
            h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
        )
    }

    /// The original destination of datagram `i` (shared relay sockets), if reported.
    pub fn orig_dst(&self, i: usize) -> Option<SocketAddr> {
        if self.ctrl.is_empty() {
            return None;
        }
        orig_dst(&self.hdrs[i].msg_hdr)
    }

    /// The whole slot `i` (headroom, data, tailroom).
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * SLOT_SIZE..(i + 1) * SLOT_SIZE]
    }
}

/// Send side: up to `n` pending datagrams, each pointing into a receive slot.
pub struct SendBatch {
    addrs: Box<[libc::sockaddr_storage]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    fds: Box<[RawFd]>,
    pub len: usize,
}

// SAFETY: see RecvBatch.
unsafe impl Send for SendBatch {}

/// Counts of a flush, for the shard's counters.
#[derive(Default, Debug, Clone, Copy)]
pub struct Flushed {
    pub sent: u64,
    pub failed: u64,
    pub syscalls: u64,
    pub last_error: Option<i32>,
}

impl SendBatch {
    pub fn new(n: usize) -> Self {
        SendBatch {
            // SAFETY: zeroed C structs are valid.
            addrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            fds: vec![-1; n].into_boxed_slice(),
            len: 0,
        }
    }

    pub fn is_full(&self) -> bool {
        self.len == self.hdrs.len()
    }

    /// Queue `data` for `dst` on `fd`. `data` must stay valid until [`SendBatch::flush`].
    pub fn push(&mut self, fd: RawFd, dst: &SocketAddr, data: &[u8]) {
        let i = self.len;
        let alen = std_to_sockaddr(dst, &mut self.addrs[i]);
        self.iovs[i].iov_base = data.as_ptr() as *mut _;
        self.iovs[i].iov_len = data.len();
        let h = &mut self.hdrs[i].msg_hdr;
        h.msg_name = &mut self.addrs[i] as *mut _ as *mut _;
        h.msg_namelen = alen;
        h.msg_iov = &mut self.iovs[i];
        h.msg_iovlen = 1;
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        h.msg_flags = 0;
        self.fds[i] = fd;
        self.len += 1;
    }

    /// Send everything queued: one sendmmsg per run of datagrams on the same socket.
    pub fn flush(&mut self) -> Flushed {
        let mut f = Flushed::default();
        let mut i = 0;
        while i < self.len {
            let fd = self.fds[i];
            let mut j = i + 1;
            while j < self.len && self.fds[j] == fd {
                j += 1;
            }
            let mut k = i;
            while k < j {
                // SAFETY: hdrs[k..j] were filled by push and point at live buffers.
                let r = unsafe {
                    libc::sendmmsg(
                        fd,
                        self.hdrs[k..].as_mut_ptr(),
                        (j - k) as u32,
                        libc::MSG_DONTWAIT,
                    )
                };
                f.syscalls += 1;
                if r <= 0 {
                    // Skip the datagram that failed (full buffer, unreachable, ...) and go on:
                    // UDP is best effort, and one bad destination must not stall the batch.
                    f.failed += 1;
                    f.last_error = io::Error::last_os_error().raw_os_error();
                    k += 1;
                } else {
                    f.sent += r as u64;
                    k += r as usize;
                }
            }
            i = j;
        }
        self.len = 0;
        f
    }
}

/// A minimal epoll wrapper. Registration takes `&self` so the relay binder and the loop can
/// share it on the shard thread; the event buffer belongs to the caller of [`Epoll::wait`].
pub struct Epoll {
    fd: RawFd,
}

impl Epoll {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll { fd })
    }

    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: token,
        };
        // SAFETY: valid fds and a valid event struct.
        if unsafe { libc::epoll_ctl(self.fd, libc::EPOLL_CTL_ADD, fd, &mut ev) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    pub fn del(&self, fd: RawFd) {
        // SAFETY: removing an fd; errors (already closed) are harmless.
        unsafe {
            libc::epoll_ctl(self.fd, libc::EPOLL_CTL_DEL, fd, std::ptr::null_mut());
        }
    }

    /// Wait up to `timeout_ms`; returns how many entries of `events` are filled.
    pub fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: the events buffer is the caller's and sized as passed.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        if n < 0 {
            0
        } else {
            n as usize
        }
    }
}

impl Drop for Epoll {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// An eventfd used to wake a shard when a message is queued for it.
pub struct Waker {
    fd: RawFd,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker { fd })
    }

    pub fn fd(&self) -> RawFd {
        self.fd
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writing 8 bytes from a local to our eventfd.
        unsafe {
            libc::write(self.fd, &one as *const u64 as *const _, 8);
        }
    }

    pub fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reading 8 bytes into a local.
        unsafe {
            libc::read(self.fd, &mut v as *mut u64 as *mut _, 8);
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: we own the fd.
        unsafe {
            libc::close(self.fd);
        }
    }
}

/// Monotonic and wall-clock time, read once per loop iteration (coarse clocks: vDSO, cheap).
pub fn now() -> crate::turn::Now {
    let mut mono: libc::timespec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut real: libc::timespec = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointers to locals.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut mono);
        libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut real);
    }
    crate::turn::Now {
        ms: mono.tv_sec as u64 * 1000 + mono.tv_nsec as u64 / 1_000_000,
        unix: real.tv_sec as u64,
    }
}

/// Open a non-blocking relay socket bound to `addr` (IPv6 sockets are IPv6-only, so an IPv4
/// peer can never reach an IPv6 relay address through a mapped address).
/// Read and drop the datagrams queued on a non-blocking socket (at most 256 of them).
pub fn discard_pending(fd: std::os::fd::RawFd) {
    let mut buf = [0u8; 16];
    for _ in 0..256 {
        // SAFETY: `buf` is valid for writes of its length; MSG_TRUNC discards the rest of a
        // longer datagram, MSG_DONTWAIT never blocks.
        let n = unsafe {
            libc::recv(
                fd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT | libc::MSG_TRUNC,
            )
        };
        if n < 0 {
            break;
        }
    }
}

pub fn relay_socket(addr: SocketAddr, recv_buffer: usize) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.cloexec(),
        Some(Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    if recv_buffer > 0 {
        let _ = s.set_recv_buffer_size(recv_buffer);
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// Monotonic clock in nanoseconds (precise; vDSO).
fn mono_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Whether a client's datagram is relay traffic (ChannelData, or a Send indication) rather
/// than a STUN transaction.
pub fn is_relay_data(d: &[u8]) -> bool {
    match d {
        [b0, b1, ..] => (0x40..=0x4F).contains(b0) || (*b0 == 0x00 && *b1 == 0x16),
        _ => false,
    }
}

/// Wake-up coalescing (`io.coalesce_us`), the software counterpart of a NIC's interrupt
/// moderation. Under dense relay traffic a shard otherwise wakes for nearly every datagram
/// and pays a context switch (and, on a VM, a halt and an IPI) each time; the pacer lets it
/// start a round at most once per period while the previous round relayed data and rounds
/// come faster than two periods apart, so each wake-up drains several datagrams at once.
/// Sparse traffic (rounds further apart), saturation (rounds longer than the period) and
/// rounds of STUN transactions only (their answers leave at the end of the round, and a
/// client's next request should not wait) never sleep. The price is at most one period of
/// added latency per relay hop.
pub struct Pacer {
    period_ns: u64,
    round_start: u64,
    busy: bool,
    dense: bool,
}

impl Pacer {
    /// `period_ns` 0 disables it. Call on the thread that will sleep: it narrows that thread's
    /// timer slack so the sleeps end close to the period.
    pub fn new(period_ns: u64) -> Pacer {
        if period_ns > 0 {
            let slack = (period_ns / 10).max(1_000);
            // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects this thread only.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, slack as libc::c_ulong, 0, 0, 0) };
        }
        Pacer {
            period_ns,
            round_start: 0,
            busy: false,
            dense: false,
        }
    }

    /// Whether to sleep out the rest of the period before waiting for readiness: the last
    /// round found datagrams and rounds are coming densely.
    pub fn pause_due(&self) -> bool {
        self.period_ns > 0 && self.busy && self.dense
    }

    /// Sleep until one period after the start of the last round (no-op if that has passed).
    pub fn pause(&self) {
        let until = self.round_start + self.period_ns;
        if mono_ns() >= until {
            return;
        }
        let ts = libc::timespec {
            tv_sec: (until / 1_000_000_000) as libc::time_t,
            tv_nsec: (until % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: valid timespec; an interrupted sleep just ends the period early.
        unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
    }

    /// A round starts (the wait returned).
    pub fn round_started(&mut self) {
        if self.period_ns == 0 {
            return;
        }
        let t = mono_ns();
        self.dense = t.saturating_sub(self.round_start) < 2 * self.period_ns;
        self.round_start = t;
        self.busy = false;
    }

    /// The round relayed data.
    pub fn relayed(&mut self) {
        self.busy = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relay_traffic_is_channel_data_or_send_indications() {
        assert!(is_relay_data(&[0x40, 0x00, 0x00, 0x04, 1, 2, 3, 4]));
        assert!(is_relay_data(&[0x4F, 0xFF, 0x00, 0x00]));
        // Send indication (0x0016); a Binding request, an Allocate request, a Data indication
        // (the server's own method) and a channel number outside 0x4000-0x4FFF are not.
        assert!(is_relay_data(&[0x00, 0x16, 0x00, 0x08]));
        assert!(!is_relay_data(&[0x00, 0x01, 0x00, 0x00]));
        assert!(!is_relay_data(&[0x00, 0x03, 0x00, 0x00]));
        assert!(!is_relay_data(&[0x00, 0x17, 0x00, 0x00]));
        assert!(!is_relay_data(&[0x50, 0x00, 0x00, 0x00]));
        assert!(!is_relay_data(&[0x40]));
        assert!(!is_relay_data(&[]));
    }

    #[test]
    fn the_pacer_sleeps_only_after_dense_rounds_that_relayed() {
        let period = 3_000_000; // 3 ms
        let mut p = Pacer::new(period);
        // The first round: nothing before it, so not dense.
        p.round_started();
        p.relayed();
        assert!(!p.pause_due());
        // A second round right after, which relayed: due, and the pause ends a period after
        // the round started.
        p.round_started();
        assert!(
            !p.pause_due(),
            "a round that relayed nothing does not pause"
        );
        p.relayed();
        assert!(p.pause_due());
        let t0 = mono_ns();
        p.pause();
        assert!(mono_ns() >= p.round_start + period);
        assert!(mono_ns() - t0 <= period + 50_000_000, "slept far too long");
        // A round long after the last one: sparse traffic, no pause.
        std::thread::sleep(std::time::Duration::from_nanos(2 * period));
        p.round_started();
        p.relayed();
        assert!(!p.pause_due());
        // Off: never due.
        let mut off = Pacer::new(0);
        off.round_started();
        off.round_started();
        off.relayed();
        assert!(!off.pause_due());
    }
}
