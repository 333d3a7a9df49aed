//! Operating-system plumbing for the load generator: batched UDP I/O (recvmmsg/sendmmsg),
//! epoll, core pinning, our own CPU time, and the server process's accounting read from
//! `/proc/PID/stat` and `/proc/PID/status`.
//!
//! The batch layout follows `actrix_udp` (preallocated slots, one system call per
//! batch each way, no allocation per packet) but has no headroom rules of its own; the address
//! conversions are shared with it.

use std::io;
use std::mem::{size_of, zeroed};
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::path::Path;

/// Bytes per datagram slot; larger datagrams are truncated by the kernel and counted as bad.
pub const SLOT: usize = 2048;

// The address conversions are the relay's own (one implementation of this unsafe code).
pub use actrix_udp::{sockaddr_to_std, std_to_sockaddr};

/// Outcome of one [`Batch::send`].
#[derive(Debug, Default, Clone, Copy)]
pub struct SendOutcome {
    pub sent: usize,
    /// Datagrams not sent because the socket buffer was full (EAGAIN after retries).
    pub eagain: usize,
    /// Datagrams refused with another error (ECONNREFUSED after an ICMP, ...).
    pub errors: usize,
    pub syscalls: usize,
}

/// `n` datagram slots usable for receiving (recvmmsg) and sending (sendmmsg), in place.
pub struct Batch {
    bufs: Box<[u8]>,
    lens: Box<[usize]>,
    addrs: Box<[libc::sockaddr_storage]>,
    iovs: Box<[libc::iovec]>,
    hdrs: Box<[libc::mmsghdr]>,
    n: usize,
}

// SAFETY: the raw pointers inside point into boxes owned by the same struct.
unsafe impl Send for Batch {}

impl Batch {
    pub fn new(n: usize) -> Self {
        let n = n.max(1);
        let mut b = Batch {
            bufs: vec![0u8; n * SLOT].into_boxed_slice(),
            lens: vec![0usize; n].into_boxed_slice(),
            // SAFETY: all-zero is a valid sockaddr_storage / iovec / mmsghdr.
            addrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            iovs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            hdrs: (0..n).map(|_| unsafe { zeroed() }).collect(),
            n,
        };
        b.rewire();
        b
    }

    fn rewire(&mut self) {
        for i in 0..self.n {
            self.iovs[i].iov_base = self.bufs[i * SLOT..].as_mut_ptr() as *mut _;
            self.iovs[i].iov_len = SLOT;
            self.hdrs[i].msg_hdr.msg_name = &mut self.addrs[i] as *mut _ as *mut _;
            self.hdrs[i].msg_hdr.msg_iov = &mut self.iovs[i];
            self.hdrs[i].msg_hdr.msg_iovlen = 1;
        }
    }

    pub fn capacity(&self) -> usize {
        self.n
    }

    /// One non-blocking recvmmsg of up to `max` datagrams; 0 on EAGAIN.
    pub fn recv(&mut self, fd: RawFd, max: usize) -> io::Result<usize> {
        let max = max.min(self.n);
        for i in 0..max {
            self.iovs[i].iov_len = SLOT;
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = &mut self.addrs[i] as *mut _ as *mut _;
            h.msg_hdr.msg_namelen = size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: hdrs[..max] point into our own buffers, which outlive the call.
        let r = unsafe {
            libc::recvmmsg(
                fd,
                self.hdrs.as_mut_ptr(),
                max as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if r < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                // An ICMP port unreachable from an earlier send surfaces here; not fatal.
                io::ErrorKind::ConnectionRefused => Ok(0),
                _ => Err(e),
            };
        }
        let r = r as usize;
        for i in 0..r {
            let h = &self.hdrs[i];
            // Truncated datagrams are reported with length 0: never parsed.
            self.lens[i] = if h.msg_hdr.msg_flags & libc::MSG_TRUNC != 0 {
                0
            } else {
                (h.msg_len as usize).min(SLOT)
            };
        }
        Ok(r)
    }

    /// Received datagram `i`.
    pub fn datagram(&self, i: usize) -> &[u8] {
        &self.bufs[i * SLOT..i * SLOT + self.lens[i]]
    }

    /// Source address of received datagram `i`.
    pub fn source(&self, i: usize) -> Option<SocketAddr> {
        sockaddr_to_std(&self.addrs[i])
    }

    /// The whole slot `i`, for building a datagram in place.
    pub fn slot_mut(&mut self, i: usize) -> &mut [u8] {
        &mut self.bufs[i * SLOT..(i + 1) * SLOT]
    }

    /// Set slot `i` to send `len` bytes to `dst` (`None`: a connected socket).
    pub fn set_out(&mut self, i: usize, len: usize, dst: Option<&SocketAddr>) {
        self.lens[i] = len.min(SLOT);
        self.iovs[i].iov_len = self.lens[i];
        let h = &mut self.hdrs[i].msg_hdr;
        match dst {
            Some(a) => {
                h.msg_name = &mut self.addrs[i] as *mut _ as *mut _;
                h.msg_namelen = std_to_sockaddr(a, &mut self.addrs[i]);
            }
            None => {
                h.msg_name = std::ptr::null_mut();
                h.msg_namelen = 0;
            }
        }
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        h.msg_flags = 0;
    }

    /// Echo received datagram `i` back to its source (the address field already holds it).
    pub fn set_echo(&mut self, i: usize) {
        let len = self.lens[i];
        self.iovs[i].iov_len = len;
        let h = &mut self.hdrs[i].msg_hdr;
        h.msg_name = &mut self.addrs[i] as *mut _ as *mut _;
        // msg_namelen was set by recvmmsg; keep it.
        h.msg_control = std::ptr::null_mut();
        h.msg_controllen = 0;
        h.msg_flags = 0;
    }

    /// Send slots `0..count` (prepared with [`Batch::set_out`] or [`Batch::set_echo`]).
    /// A full socket buffer is retried a few times, then the rest is dropped and counted.
    pub fn send(&mut self, fd: RawFd, count: usize) -> SendOutcome {
        let count = count.min(self.n);
        let mut o = SendOutcome::default();
        let mut k = 0;
        let mut eagain_retries = 0;
        while k < count {
            // SAFETY: hdrs[k..count] were prepared and point at live buffers.
            let r = unsafe {
                libc::sendmmsg(
                    fd,
                    self.hdrs[k..].as_mut_ptr(),
                    (count - k) as u32,
                    libc::MSG_DONTWAIT,
                )
            };
            o.syscalls += 1;
            if r > 0 {
                o.sent += r as usize;
                k += r as usize;
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock if eagain_retries < 4 => {
                    eagain_retries += 1;
                    std::thread::yield_now();
                }
                io::ErrorKind::WouldBlock => {
                    o.eagain += count - k;
                    break;
                }
                io::ErrorKind::Interrupted => {}
                _ => {
                    // Skip the datagram that failed; UDP is best effort.
                    o.errors += 1;
                    k += 1;
                }
            }
        }
        o
    }
}

/// A UDP socket bound on `bind`, non-blocking, with large buffers (the generator must not
/// be the one dropping packets).
pub fn udp_socket(bind: SocketAddr, buffer: usize) -> io::Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.bind(&bind.into())?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// The wildcard-port address on the same family/IP as `server` that reaches it: loopback
/// for a loopback server, the unspecified address otherwise.
pub fn local_bind_for(server: SocketAddr) -> SocketAddr {
    match server {
        SocketAddr::V4(a) if a.ip().is_loopback() => SocketAddr::from((*a.ip(), 0)),
        SocketAddr::V4(_) => SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)),
        SocketAddr::V6(a) if a.ip().is_loopback() => SocketAddr::from((Ipv6Addr::LOCALHOST, 0)),
        SocketAddr::V6(_) => SocketAddr::from((Ipv6Addr::UNSPECIFIED, 0)),
    }
}

/// Where client socket `index` binds: with `source_ips > 1` and an IPv4 loopback server,
/// clients are spread over 127.1.x.y so per-source-IP limits of the server (challenge rate
/// limits, quotas) see many sources, as they would in production. Otherwise as
/// [`local_bind_for`].
pub fn client_bind(server: SocketAddr, index: usize, source_ips: usize) -> SocketAddr {
    match server {
        SocketAddr::V4(a) if a.ip().is_loopback() && source_ips > 1 => {
            let i = index % source_ips.min(250 * 250);
            SocketAddr::from((
                Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8),
                0,
            ))
        }
        _ => local_bind_for(server),
    }
}

/// Busy (steal excluded), total and steal jiffies of the whole machine, from the first line
/// of /proc/stat. Steal is time the hypervisor ran something else while our vCPUs wanted to
/// run: it shows up as stalls (latency tails), not as work of any process here.
pub fn host_cpu_jiffies() -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat_cpu(&s)
}

pub fn parse_proc_stat_cpu(s: &str) -> Option<(u64, u64, u64)> {
    let line = s.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    if v.len() < 5 {
        return None;
    }
    // user nice system idle iowait irq softirq steal (guest is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v[3] + v[4];
    let steal = v.get(7).copied().unwrap_or(0);
    Some((total - idle - steal, total, steal))
}

/// Seconds per jiffy of /proc/stat (USER_HZ).
pub fn jiffy_secs() -> f64 {
    1.0 / clk_tck()
}

/// Level-triggered epoll, the data plane's own.
pub use actrix_udp::Epoll;

pub fn raw(s: &UdpSocket) -> RawFd {
    s.as_raw_fd()
}

/// Pin the calling thread to `core`. Returns false when the core does not exist or the
/// kernel refused.
pub fn pin_to_core(core: usize) -> bool {
    let ids = core_affinity::get_core_ids().unwrap_or_default();
    match ids.into_iter().find(|c| c.id == core) {
        Some(id) => core_affinity::set_for_current(id),
        None => false,
    }
}

/// CPU seconds (user+system) used by this process so far.
pub fn self_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct we own.
    let mut ru: libc::rusage = unsafe { zeroed() };
    // SAFETY: valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) } != 0 {
        return 0.0;
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Raise RLIMIT_NOFILE to its hard limit (the idle scenarios hold thousands of sockets or
/// connections). Returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit on a struct we own.
    unsafe {
        let mut rl: libc::rlimit = zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) != 0 {
            return 0;
        }
        rl.rlim_cur = rl.rlim_max;
        let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &rl);
        let mut now: libc::rlimit = zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut now) != 0 {
            return 0;
        }
        now.rlim_cur
    }
}

fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// utime+stime of a process in seconds, from `/proc/PID/stat` (all its threads).
pub fn proc_cpu_seconds(pid: u32) -> io::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat_cpu_ticks(&s)
        .map(|t| t as f64 / clk_tck())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unparsable /proc/PID/stat"))
}

/// utime+stime clock ticks from the text of `/proc/PID/stat`. The command name may hold
/// spaces and parentheses, so fields are counted from the last ')'.
pub fn parse_stat_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    // After ')': state(3) ppid(4) ... utime is field 14, stime 15 (1-based over the line).
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// Resident set size in bytes, from `VmRSS` in `/proc/PID/status`.
pub fn proc_rss_bytes(pid: u32) -> io::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    parse_status_kb(&s, "VmRSS:")
        .map(|kb| kb * 1024)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "no VmRSS in /proc/PID/status"))
}

/// Open file descriptors of a process (entries of `/proc/PID/fd`).
pub fn proc_fd_count(pid: u32) -> Option<usize> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .ok()
        .map(|d| d.count())
}

pub fn parse_status_kb(status: &str, key: &str) -> Option<u64> {
    status
        .lines()
        .find(|l| l.starts_with(key))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The process owning a UDP socket bound to `port` (any address), found through
/// `/proc/net/udp{,6}` and the `/proc/*/fd` links. `None` when there is none or it is not
/// visible to us.
pub fn find_pid_by_udp_port(port: u16) -> Option<u32> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/udp", "/proc/net/udp6"] {
        if let Ok(t) = std::fs::read_to_string(table) {
            inodes.extend(udp_inodes_for_port(&t, port));
        }
    }
    if inodes.is_empty() {
        return None;
    }
    let wanted: Vec<String> = inodes.iter().map(|i| format!("socket:[{i}]")).collect();
    let me = std::process::id();
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(Path::new("/proc").join(pid.to_string()).join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(link) = std::fs::read_link(fd.path()) {
                if wanted.iter().any(|w| link.as_os_str() == w.as_str()) {
                    return Some(pid);
                }
            }
        }
    }
    None
}

/// Socket inodes in a `/proc/net/udp` table whose local port is `port`.
pub fn udp_inodes_for_port(table: &str, port: u16) -> Vec<u64> {
    let mut out = Vec::new();
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(local), Some(inode)) = (f.get(1), f.get(9)) else {
            continue;
        };
        let Some(p) = local.rsplit(':').next() else {
            continue;
        };
        if u16::from_str_radix(p, 16).ok() == Some(port) {
            if let Ok(i) = inode.parse::<u64>() {
                if i != 0 {
                    out.push(i);
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_parsing_counts_from_last_paren() {
        let s = "1234 (we ird) proc)) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(parse_stat_cpu_ticks(s), Some(300));
        assert_eq!(parse_stat_cpu_ticks("garbage"), None);
    }

    #[test]
    fn client_binds_and_host_cpu() {
        let srv: SocketAddr = "127.0.0.1:3478".parse().unwrap();
        assert_eq!(client_bind(srv, 5, 1), "127.0.0.1:0".parse().unwrap());
        assert_eq!(client_bind(srv, 5, 256), "127.1.0.6:0".parse().unwrap());
        assert_eq!(client_bind(srv, 251, 256), "127.1.1.2:0".parse().unwrap());
        let remote: SocketAddr = "192.0.2.1:3478".parse().unwrap();
        assert_eq!(client_bind(remote, 5, 256), "0.0.0.0:0".parse().unwrap());
        let st = "cpu  100 10 50 1000 20 0 5 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_proc_stat_cpu(st), Some((165, 1185, 0)));
        let st = "cpu  100 10 50 1000 20 0 5 7 0 0\n";
        assert_eq!(parse_proc_stat_cpu(st), Some((165, 1192, 7)));

        assert!(host_cpu_jiffies().is_some());
    }

    #[test]
    fn status_and_udp_tables() {
        let st = "Name:\tx\nVmRSS:\t   12345 kB\nVmHWM:\t 20000 kB\n";
        assert_eq!(parse_status_kb(st, "VmRSS:"), Some(12345));
        let t = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops\n\
                 1: 0100007F:0D96 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 98765 2 0000000000000000 0\n";
        assert_eq!(udp_inodes_for_port(t, 3478), vec![98765]);
        assert!(udp_inodes_for_port(t, 3479).is_empty());
    }

    #[test]
    fn own_socket_is_not_reported_as_the_server() {
        let s = udp_socket("127.0.0.1:0".parse().unwrap(), 1 << 16).unwrap();
        let port = s.local_addr().unwrap().port();
        // Our own pid is skipped, so a port only we hold has no server.
        assert_eq!(find_pid_by_udp_port(port), None);
        assert!(proc_cpu_seconds(std::process::id()).is_ok());
        assert!(proc_rss_bytes(std::process::id()).unwrap() > 0);
    }
}
