//! actrix-udp: the system-call layer of the data plane: batched UDP I/O for one thread.
//!
//! What is here: socket addresses to and from the kernel's form, [`udp_socket`] (every UDP
//! socket the data plane opens, with its options), [`RecvBatch`] (`recvmmsg` into
//! preallocated slots with headroom for in-place TURN framing, original destinations from
//! control messages), [`SendBatch`] (`sendmmsg`, one call per run of datagrams on the same
//! socket), [`Epoll`] readiness, and the [`Waker`] other threads use to wake a shard.
//!
//! Everything is preallocated when a shard starts: a batch costs one system call each way and
//! no allocation. What is deliberately not here: any protocol knowledge, threads, clocks.

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

/// Level-triggered epoll readiness with its own event buffer, owned by one thread.
pub struct Epoll {
    fd: RawFd,
    events: Vec<libc::epoll_event>,
}

impl Epoll {
    /// An instance that reports up to `max_events` ready sockets per wait.
    pub fn new(max_events: usize) -> io::Result<Self> {
        // SAFETY: plain syscall.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Epoll {
            fd,
            events: vec![libc::epoll_event { events: 0, u64: 0 }; max_events.max(1)],
        })
    }

    /// Wait for `fd` to become readable; its events carry `token`.
    pub fn add(&self, fd: RawFd, token: u64) -> io::Result<()> {
        self.ctl(
            libc::EPOLL_CTL_ADD,
            fd,
            token,
            libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32,
        )
    }

    /// Wait for `fd` to become readable when `read` (hang-ups included), writable when
    /// `write`. With neither, only errors and full hang-ups are reported.
    pub fn modify(&self, fd: RawFd, token: u64, read: bool, write: bool) -> io::Result<()> {
        let mut events = 0;
        if read {
            events |= libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
        }
        if write {
            events |= libc::EPOLLOUT as u32;
        }
        self.ctl(libc::EPOLL_CTL_MOD, fd, token, events)
    }

    /// As [`Epoll::modify`], adding `fd` first if it is not registered yet.
    pub fn set(&self, fd: RawFd, token: u64, read: bool, write: bool) -> io::Result<()> {
        match self.modify(fd, token, read, write) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let mut events = 0;
                if read {
                    events |= libc::EPOLLIN as u32 | libc::EPOLLRDHUP as u32;
                }
                if write {
                    events |= libc::EPOLLOUT as u32;
                }
                self.ctl(libc::EPOLL_CTL_ADD, fd, token, events)
            }
            r => r,
        }
    }

    fn ctl(&self, op: libc::c_int, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        // SAFETY: valid fds and a valid event struct.
        if unsafe { libc::epoll_ctl(self.fd, op, fd, &mut ev) } < 0 {
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

    /// Wait up to `timeout_ms` (-1: forever); `out` gets the token and the events (EPOLLIN,
    /// EPOLLOUT, EPOLLHUP, ...) of each ready socket.
    pub fn wait_events(&mut self, timeout_ms: i32, out: &mut Vec<(u64, u32)>) {
        out.clear();
        // SAFETY: the events buffer is ours and sized as passed.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        out.extend(
            self.events
                .iter()
                .take(n.max(0) as usize)
                .map(|e| (e.u64, e.events)),
        );
    }

    /// Wait up to `timeout_ms` (-1: forever); `out` gets the tokens of the ready sockets.
    pub fn wait(&mut self, timeout_ms: i32, out: &mut Vec<u64>) {
        out.clear();
        // SAFETY: the events buffer is ours and sized as passed.
        let n = unsafe {
            libc::epoll_wait(
                self.fd,
                self.events.as_mut_ptr(),
                self.events.len() as i32,
                timeout_ms,
            )
        };
        out.extend(self.events.iter().take(n.max(0) as usize).map(|e| e.u64));
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

/// Wakes a shard thread from another thread: one end of a non-blocking Unix stream socket
/// pair is written by [`Waker::wake`], the shard waits for the other end to become readable
/// ([`Waker::fd`]: with epoll, an io_uring read, or a glommio stream made from
/// [`Waker::dup_read_end`]) and empties it with [`Waker::drain`]. A socket rather than an
/// eventfd, because every backend, glommio included, can wait on a socket.
pub struct Waker {
    read: RawFd,
    write: RawFd,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        let mut fds = [0 as RawFd; 2];
        // SAFETY: socketpair writes two descriptors into the array on success.
        let r = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Waker {
            read: fds[0],
            write: fds[1],
        })
    }

    /// The end the shard waits on.
    pub fn fd(&self) -> RawFd {
        self.read
    }

    /// A descriptor of the read end for a runtime that takes ownership of it (the caller
    /// closes it).
    pub fn dup_read_end(&self) -> io::Result<RawFd> {
        // SAFETY: duplicating a descriptor we own.
        let fd = unsafe { libc::fcntl(self.read, libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(fd)
    }

    /// Wake the shard. Never blocks: when the socket is full a wake-up is pending anyway.
    pub fn wake(&self) {
        let one = [1u8];
        // SAFETY: sending one byte from a local on our socket.
        unsafe {
            libc::send(
                self.write,
                one.as_ptr().cast(),
                1,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            );
        }
    }

    /// Empty the read end (after it was readable).
    pub fn drain(&self) {
        let mut buf = [0u8; 64];
        loop {
            // SAFETY: reading into a local buffer of the length given.
            let n = unsafe {
                libc::recv(
                    self.read,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < buf.len() as isize {
                break;
            }
        }
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: we own both descriptors.
        unsafe {
            libc::close(self.read);
            libc::close(self.write);
        }
    }
}

/// Read and drop the datagrams queued on a non-blocking socket (at most 256 of them).
pub fn discard_pending(fd: RawFd) {
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

/// Options of a UDP socket the data plane opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpOptions {
    /// Join the address's SO_REUSEPORT group (the shards' listeners).
    pub reuse_port: bool,
    /// SO_RCVBUF / SO_SNDBUF in bytes; 0 keeps the kernel's default.
    pub recv_buffer: usize,
    pub send_buffer: usize,
    /// Also try SO_RCVBUFFORCE / SO_SNDBUFFORCE, which exceed rmem_max/wmem_max but need
    /// CAP_NET_ADMIN (silently skipped without it).
    pub force_buffers: bool,
    /// Report each datagram's original destination (IP_RECVORIGDSTADDR /
    /// IPV6_RECVORIGDSTADDR; see [`RecvBatch::orig_dst`]).
    pub orig_dst: bool,
}

/// Open a non-blocking, close-on-exec UDP socket bound to `addr` with `opts`. IPv6 sockets are
/// IPv6-only, so an IPv4 peer can never reach an IPv6 address through a mapped address.
pub fn udp_socket(addr: SocketAddr, opts: &UdpOptions) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.cloexec(),
        Some(Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    if opts.reuse_port {
        s.set_reuse_port(true)?;
    }
    s.set_nonblocking(true)?;
    if opts.recv_buffer > 0
        && s.set_recv_buffer_size(opts.recv_buffer).is_ok()
        && opts.force_buffers
    {
        set_int(
            &s,
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            opts.recv_buffer as libc::c_int,
        );
    }
    if opts.send_buffer > 0
        && s.set_send_buffer_size(opts.send_buffer).is_ok()
        && opts.force_buffers
    {
        set_int(
            &s,
            libc::SOL_SOCKET,
            libc::SO_SNDBUFFORCE,
            opts.send_buffer as libc::c_int,
        );
    }
    if opts.orig_dst {
        let (level, opt) = if addr.is_ipv6() {
            (libc::SOL_IPV6, libc::IPV6_RECVORIGDSTADDR)
        } else {
            (libc::SOL_IP, libc::IP_RECVORIGDSTADDR)
        };
        if !set_int(&s, level, opt, 1) {
            return Err(io::Error::last_os_error());
        }
    }
    s.bind(&addr.into())?;
    Ok(s)
}

/// Set an int socket option; false if the kernel refused it.
fn set_int(s: &socket2::Socket, level: libc::c_int, opt: libc::c_int, v: libc::c_int) -> bool {
    use std::os::fd::AsRawFd;
    // SAFETY: setting an int socket option from a local on a live socket.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            level,
            opt,
            &v as *const _ as *const libc::c_void,
            size_of::<libc::c_int>() as libc::socklen_t,
        ) == 0
    }
}

/// Addresses configured on this host's interfaces.
pub fn interface_addresses() -> Vec<std::net::IpAddr> {
    let mut out = Vec::new();
    let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we walk and free; each address is copied out by
    // the size its family says.
    unsafe {
        if libc::getifaddrs(&mut ifa) != 0 {
            return out;
        }
        let mut p = ifa;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                let len = match (*a).sa_family as i32 {
                    libc::AF_INET => size_of::<libc::sockaddr_in>(),
                    libc::AF_INET6 => size_of::<libc::sockaddr_in6>(),
                    _ => 0,
                };
                if len > 0 {
                    let mut ss: libc::sockaddr_storage = zeroed();
                    std::ptr::copy_nonoverlapping(
                        a as *const u8,
                        &mut ss as *mut _ as *mut u8,
                        len,
                    );
                    if let Some(sa) = sockaddr_to_std(&ss) {
                        out.push(sa.ip());
                    }
                }
            }
            p = (*p).ifa_next;
        }
        libc::freeifaddrs(ifa);
    }
    out
}
