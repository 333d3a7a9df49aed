//! The reference: a bare UDP forwarder/echo with recvmmsg/sendmmsg on one pinned core, the
//! floor a socket-based relay cannot beat.
//!
//! Every datagram is handled statelessly:
//! - one that starts with the forward header `FF 04 <port:2> <ipv4:4>` is sent to that
//!   address, with the header rewritten to name the sender. A client sends
//!   `[peer][payload]` to the forwarder, the peer receives `[client][payload]` from the
//!   forwarder and echoes it back to the forwarder, which sends `[peer][payload]` to the
//!   client: two hops per round trip, as through a TURN relay;
//! - anything else is echoed to its source (the STUN Binding reference).

use crate::sys::{self, Batch};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const FWD_MAGIC: u8 = 0xFF;
pub const FWD_V4: u8 = 0x04;
pub const FWD_HEADER: usize = 8;

/// Write the forward header naming `addr`. Only IPv4 is supported by the reference.
pub fn write_header(out: &mut [u8], addr: SocketAddr) -> bool {
    let SocketAddr::V4(a) = addr else {
        return false;
    };
    if out.len() < FWD_HEADER {
        return false;
    }
    out[0] = FWD_MAGIC;
    out[1] = FWD_V4;
    out[2..4].copy_from_slice(&a.port().to_be_bytes());
    out[4..8].copy_from_slice(&a.ip().octets());
    true
}

pub fn read_header(buf: &[u8]) -> Option<SocketAddr> {
    if buf.len() < FWD_HEADER || buf[0] != FWD_MAGIC || buf[1] != FWD_V4 {
        return None;
    }
    let port = u16::from_be_bytes([buf[2], buf[3]]);
    let ip = Ipv4Addr::new(buf[4], buf[5], buf[6], buf[7]);
    Some(SocketAddr::V4(SocketAddrV4::new(ip, port)))
}

/// Counters of a running forwarder.
#[derive(Debug, Default)]
pub struct Counters {
    pub received: AtomicU64,
    pub forwarded: AtomicU64,
    pub echoed: AtomicU64,
    pub dropped: AtomicU64,
}

/// Run the forwarder on `sock` until `stop` is set or `max_duration` passes.
pub fn serve(
    sock: &UdpSocket,
    batch_size: usize,
    stop: &AtomicBool,
    max_duration: Option<Duration>,
    counters: &Counters,
) -> io::Result<()> {
    // Blocking receive with a short timeout, so stop and the deadline are checked.
    sock.set_nonblocking(false)?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let fd = sys::raw(sock);
    let mut b = Batch::new(batch_size);
    let t0 = Instant::now();
    while !stop.load(Ordering::Relaxed) {
        if let Some(d) = max_duration {
            if t0.elapsed() >= d {
                break;
            }
        }
        let n = recv_wait(&mut b, fd)?;
        if n == 0 {
            continue;
        }
        counters.received.fetch_add(n as u64, Ordering::Relaxed);
        let mut fwd = 0u64;
        let mut echo = 0u64;
        for i in 0..n {
            let len = b.datagram(i).len();
            let src = b.source(i);
            let dst = read_header(b.datagram(i));
            match (dst, src) {
                (Some(dst), Some(src)) => {
                    if write_header(b.slot_mut(i), src) {
                        b.set_out(i, len, Some(&dst));
                        fwd += 1;
                    } else {
                        // An IPv6 sender cannot be named in the v4 header: bounce it back.
                        b.set_echo(i);
                        echo += 1;
                    }
                }
                _ => {
                    b.set_echo(i);
                    echo += 1;
                }
            }
        }
        let o = b.send(fd, n);
        counters.forwarded.fetch_add(fwd, Ordering::Relaxed);
        counters.echoed.fetch_add(echo, Ordering::Relaxed);
        counters
            .dropped
            .fetch_add((o.eagain + o.errors) as u64, Ordering::Relaxed);
    }
    Ok(())
}

/// recvmmsg that blocks for the first datagram (up to the socket's read timeout) and then
/// takes whatever else is queued (MSG_WAITFORONE).
fn recv_wait(b: &mut Batch, fd: std::os::fd::RawFd) -> io::Result<usize> {
    // First a non-blocking attempt: under load there is always something queued.
    let n = b.recv(fd, b.capacity())?;
    if n > 0 {
        return Ok(n);
    }
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut pfd, 1, 100) };
    if r <= 0 {
        return Ok(0);
    }
    b.recv(fd, b.capacity())
}

/// A forwarder on its own thread (tests, in-process use).
pub struct Handle {
    pub addr: SocketAddr,
    pub counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Handle {
    pub fn stop(mut self) -> io::Result<()> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take().map(|t| t.join()) {
            Some(Ok(r)) => r,
            Some(Err(_)) => Err(io::Error::other("reference thread panicked")),
            None => Ok(()),
        }
    }
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Start a forwarder bound on `listen` (port 0: any) on a thread, pinned to `core` if given.
pub fn spawn(listen: SocketAddr, core: Option<usize>, batch: usize) -> io::Result<Handle> {
    let sock = sys::udp_socket(listen, 8 << 20)?;
    let addr = sock.local_addr()?;
    let stop = Arc::new(AtomicBool::new(false));
    let counters = Arc::new(Counters::default());
    let (s2, c2) = (stop.clone(), counters.clone());
    let thread = std::thread::Builder::new()
        .name("bench-reference".into())
        .spawn(move || {
            if let Some(c) = core {
                sys::pin_to_core(c);
            }
            serve(&sock, batch, &s2, None, &c2)
        })?;
    Ok(Handle {
        addr,
        counters,
        stop,
        thread: Some(thread),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let a: SocketAddr = "10.1.2.3:4567".parse().unwrap();
        let mut b = [0u8; 12];
        assert!(write_header(&mut b, a));
        assert_eq!(read_header(&b), Some(a));
        assert_eq!(read_header(&b[..7]), None);
        assert!(!write_header(&mut b, "[::1]:5".parse().unwrap()));
        // STUN and ChannelData never look like a forward header.
        assert_eq!(
            read_header(&[0x00, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42]),
            None
        );
        assert_eq!(read_header(&[0x40, 0x00, 0, 4, 1, 2, 3, 4]), None);
    }

    #[test]
    fn forwards_and_echoes_every_datagram() {
        let h = spawn("127.0.0.1:0".parse().unwrap(), None, 32).unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let n = 200u32;
        let mut buf = [0u8; 64];
        // Echo: plain datagrams come straight back.
        for i in 0..n {
            client.send_to(&i.to_be_bytes(), h.addr).unwrap();
            let (len, from) = client.recv_from(&mut buf).unwrap();
            assert_eq!(from, h.addr);
            assert_eq!(&buf[..len], &i.to_be_bytes());
        }
        // Forward: client -> forwarder -> peer -> forwarder -> client.
        let peer_addr = peer.local_addr().unwrap();
        let client_addr = client.local_addr().unwrap();
        for i in 0..n {
            let mut out = [0u8; 12];
            write_header(&mut out, peer_addr);
            out[8..].copy_from_slice(&i.to_be_bytes());
            client.send_to(&out, h.addr).unwrap();
            let (len, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(from, h.addr);
            assert_eq!(read_header(&buf[..len]), Some(client_addr));
            peer.send_to(&buf[..len], from).unwrap();
            let (len, _) = client.recv_from(&mut buf).unwrap();
            assert_eq!(read_header(&buf[..len]), Some(peer_addr));
            assert_eq!(&buf[8..len], &i.to_be_bytes());
        }
        // The counters are bumped after each batch is sent: give the last one a moment.
        let until = Instant::now() + Duration::from_secs(2);
        while h.counters.forwarded.load(Ordering::Relaxed) < 2 * n as u64 && Instant::now() < until
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(h.counters.forwarded.load(Ordering::Relaxed), 2 * n as u64);
        assert_eq!(h.counters.echoed.load(Ordering::Relaxed), n as u64);
        h.stop().unwrap();
    }
}
