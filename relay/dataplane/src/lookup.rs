//! Shared relay sockets (`io.relay_sockets = "shared"`): one socket per shard receives the
//! datagrams peers send to every relayed transport address of that shard, instead of one
//! socket (and file descriptor) per allocation.
//!
//! A BPF `sk_lookup` program, attached to the appliance's network namespace, runs when the
//! kernel looks up the socket for an arriving UDP datagram: when its destination is a relay
//! address (IPv4 or IPv6) and a port of the relay range, it hands the datagram to the socket
//! of the shard owning that port for that family (a SOCKMAP indexed by family and shard). The
//! socket reports the original destination (`IP_ORIGDSTADDR` / `IPV6_ORIGDSTADDR`), which
//! names the allocation. Datagrams to peers leave through a raw socket per shard and family
//! that writes the IP and UDP headers in front of the payload, in place, with the relayed port
//! as source port (UDP checksum 0 over IPv4, computed over IPv6). A raw socket does not
//! fragment: a datagram above the path's MTU is refused and counted as a send error.
//!
//! The program is assembled here (a few dozen instructions) and loaded with the `bpf` system
//! call: no compiler or loader library at run time. It needs CAP_BPF and CAP_NET_ADMIN (or
//! root) at start and Linux 5.9 or later; the link is released when the process exits.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_MAP_TYPE_SOCKMAP: u32 = 15;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
const BPF_SK_LOOKUP: u32 = 36;
const FN_MAP_LOOKUP_ELEM: i32 = 1;
const FN_SK_RELEASE: i32 = 86;
const FN_SK_ASSIGN: i32 = 124;
const SK_PASS: i32 = 1;

// struct bpf_sk_lookup field offsets (uapi linux/bpf.h).
const CTX_FAMILY: i16 = 8;
const CTX_PROTOCOL: i16 = 12;
const CTX_LOCAL_IP4: i16 = 40;
const CTX_LOCAL_IP6: i16 = 44;
const CTX_LOCAL_PORT: i16 = 60;

/// One eBPF instruction.
#[derive(Clone, Copy)]
struct Insn {
    code: u8,
    regs: u8,
    off: i16,
    imm: i32,
}

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: (src << 4) | (dst & 0x0f),
        off,
        imm,
    }
}

/// A tiny assembler with forward labels.
#[derive(Default)]
struct Asm {
    code: Vec<Insn>,
    /// (instruction index, label) of jumps to patch.
    fixups: Vec<(usize, usize)>,
    labels: Vec<Option<usize>>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }
    fn bind(&mut self, l: usize) {
        self.labels[l] = Some(self.code.len());
    }
    fn emit(&mut self, i: Insn) {
        self.code.push(i);
    }
    /// `r_dst = r_src` (64-bit).
    fn mov(&mut self, dst: u8, src: u8) {
        self.emit(insn(0xbf, dst, src, 0, 0));
    }
    /// `r_dst = imm` (64-bit).
    fn mov_imm(&mut self, dst: u8, imm: i32) {
        self.emit(insn(0xb7, dst, 0, 0, imm));
    }
    /// `r_dst = *(u32 *)(r_src + off)`.
    fn load32(&mut self, dst: u8, src: u8, off: i16) {
        self.emit(insn(0x61, dst, src, off, 0));
    }
    /// `*(u32 *)(r_dst + off) = w_src`.
    fn store32(&mut self, dst: u8, src: u8, off: i16) {
        self.emit(insn(0x63, dst, src, off, 0));
    }
    fn add_imm(&mut self, dst: u8, imm: i32) {
        self.emit(insn(0x07, dst, 0, 0, imm));
    }
    /// `r_dst += r_src` (64-bit).
    fn add(&mut self, dst: u8, src: u8) {
        self.emit(insn(0x0f, dst, src, 0, 0));
    }
    /// Conditional jump on the low 32 bits against an immediate (`op`: BPF_JEQ 0x10,
    /// BPF_JGT 0x20, BPF_JNE 0x50, BPF_JLT 0xa0, BPF_JLE 0xb0), class JMP32.
    fn jmp32(&mut self, op: u8, dst: u8, imm: i32, to: usize) {
        self.fixups.push((self.code.len(), to));
        self.emit(insn(0x06 | op, dst, 0, 0, imm));
    }
    /// `if r_dst == 0 goto to` (64-bit).
    fn jeq0(&mut self, dst: u8, to: usize) {
        self.fixups.push((self.code.len(), to));
        self.emit(insn(0x15, dst, 0, 0, 0));
    }
    fn ja(&mut self, to: usize) {
        self.fixups.push((self.code.len(), to));
        self.emit(insn(0x05, 0, 0, 0, 0));
    }
    fn call(&mut self, helper: i32) {
        self.emit(insn(0x85, 0, 0, 0, helper));
    }
    fn exit(&mut self) {
        self.emit(insn(0x95, 0, 0, 0, 0));
    }
    /// `r_dst = map` (ld_imm64 with BPF_PSEUDO_MAP_FD).
    fn ld_map(&mut self, dst: u8, map_fd: RawFd) {
        self.emit(insn(0x18, dst, 1, 0, map_fd));
        self.emit(insn(0, 0, 0, 0, 0));
    }
    fn finish(mut self) -> Vec<Insn> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l].expect("bound label");
            self.code[at].off = (target as isize - at as isize - 1) as i16;
        }
        self.code
    }
}

/// The program: UDP to one of `v4` or `v6` on a port of `slices[i]` → map entry `i` (IPv4)
/// or `slices.len() + i` (IPv6).
fn program(v4: &[Ipv4Addr], v6: &[Ipv6Addr], slices: &[(u16, u16)], map_fd: RawFd) -> Vec<Insn> {
    const JEQ: u8 = 0x10;
    const JGT: u8 = 0x20;
    const JNE: u8 = 0x50;
    const JLT: u8 = 0xa0;
    const JLE: u8 = 0xb0;
    let mut a = Asm::default();
    let pass = a.label();
    let ip4 = a.label();
    let port = a.label();
    let lookup = a.label();
    a.mov(6, 1);
    a.load32(2, 6, CTX_PROTOCOL);
    a.jmp32(JNE, 2, libc::IPPROTO_UDP, pass);
    // r5: the first map entry of the family.
    a.mov_imm(5, 0);
    a.load32(2, 6, CTX_FAMILY);
    a.jmp32(JEQ, 2, libc::AF_INET, ip4);
    a.jmp32(JNE, 2, libc::AF_INET6, pass);
    for ip in v6 {
        let next = a.label();
        for (w, chunk) in ip.octets().chunks(4).enumerate() {
            a.load32(2, 6, CTX_LOCAL_IP6 + 4 * w as i16);
            let word = u32::from_ne_bytes(chunk.try_into().expect("4 bytes"));
            a.jmp32(JNE, 2, word as i32, next);
        }
        a.mov_imm(5, slices.len() as i32);
        a.ja(port);
        a.bind(next);
    }
    a.ja(pass);
    a.bind(ip4);
    a.load32(2, 6, CTX_LOCAL_IP4);
    for ip in v4 {
        // Network byte order as the context holds it, read as a native u32.
        a.jmp32(JEQ, 2, u32::from_ne_bytes(ip.octets()) as i32, port);
    }
    a.ja(pass);
    a.bind(port);
    a.load32(3, 6, CTX_LOCAL_PORT);
    let min = slices.first().map_or(0, |s| s.0);
    let max = slices.last().map_or(0, |s| s.1);
    a.jmp32(JLT, 3, min as i32, pass);
    a.jmp32(JGT, 3, max as i32, pass);
    for (i, &(_, hi)) in slices.iter().enumerate() {
        a.mov_imm(4, i as i32);
        if i + 1 < slices.len() {
            a.jmp32(JLE, 3, hi as i32, lookup);
        }
    }
    a.bind(lookup);
    a.add(4, 5);
    a.store32(10, 4, -4);
    a.mov(2, 10);
    a.add_imm(2, -4);
    a.ld_map(1, map_fd);
    a.call(FN_MAP_LOOKUP_ELEM);
    a.jeq0(0, pass);
    a.mov(7, 0);
    a.mov(1, 6);
    a.mov(2, 7);
    a.mov_imm(3, 0);
    a.call(FN_SK_ASSIGN);
    a.mov(1, 7);
    a.call(FN_SK_RELEASE);
    a.bind(pass);
    a.mov_imm(0, SK_PASS);
    a.exit();
    a.finish()
}

/// `bpf(cmd, attr)`; `attr` is a zeroed 144-byte `union bpf_attr` filled at the given offsets.
fn bpf(cmd: libc::c_long, attr: &mut [u8; 144]) -> io::Result<OwnedFd> {
    // SAFETY: `attr` is a valid, initialized buffer of the size we pass.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: commands that create objects return a new file descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(r as RawFd) })
}

fn bpf_noret(cmd: libc::c_long, attr: &mut [u8; 144]) -> io::Result<()> {
    // SAFETY: as in `bpf`; this command returns 0, no descriptor.
    let r = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.as_mut_ptr(), attr.len() as u32) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn put32(a: &mut [u8; 144], off: usize, v: u32) {
    a[off..off + 4].copy_from_slice(&v.to_ne_bytes());
}

fn put64(a: &mut [u8; 144], off: usize, v: u64) {
    a[off..off + 8].copy_from_slice(&v.to_ne_bytes());
}

/// The attached program and its map; detached when dropped (or when the process exits).
pub struct PortSteer {
    _link: OwnedFd,
    _prog: OwnedFd,
    _map: OwnedFd,
}

/// Steer UDP datagrams to `v4` addresses on the ports of `slices[i]` to `v4_sockets[i]`, and
/// to `v6` addresses to `v6_sockets[i]`. A family without addresses needs no sockets.
pub fn attach(
    v4: &[Ipv4Addr],
    v4_sockets: &[RawFd],
    v6: &[Ipv6Addr],
    v6_sockets: &[RawFd],
    slices: &[(u16, u16)],
) -> io::Result<PortSteer> {
    let n = slices.len();
    let fits = |addrs: usize, socks: usize| (addrs == 0 && socks == 0) || (addrs > 0 && socks == n);
    if n == 0
        || v4.len() + v6.len() == 0
        || !fits(v4.len(), v4_sockets.len())
        || !fits(v6.len(), v6_sockets.len())
    {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "one socket per port slice for each family with addresses",
        ));
    }
    let mut attr = [0u8; 144];
    put32(&mut attr, 0, BPF_MAP_TYPE_SOCKMAP);
    put32(&mut attr, 4, 4); // key: u32 (family offset + shard)
    put32(&mut attr, 8, 8); // value: u64 socket fd
    put32(&mut attr, 12, 2 * n as u32);
    let map = bpf(BPF_MAP_CREATE, &mut attr)?;
    let entries = v4_sockets
        .iter()
        .enumerate()
        .chain(v6_sockets.iter().enumerate().map(|(i, fd)| (n + i, fd)));
    for (i, &fd) in entries {
        let key = i as u32;
        let value = fd as u64;
        let mut attr = [0u8; 144];
        put32(&mut attr, 0, map.as_raw_fd() as u32);
        put64(&mut attr, 8, &key as *const u32 as u64);
        put64(&mut attr, 16, &value as *const u64 as u64);
        put64(&mut attr, 24, 0); // BPF_ANY
        bpf_noret(BPF_MAP_UPDATE_ELEM, &mut attr)?;
    }

    let code = program(v4, v6, slices, map.as_raw_fd());
    let raw: Vec<u64> = code
        .iter()
        .map(|i| {
            u64::from_ne_bytes([
                i.code,
                i.regs,
                i.off.to_ne_bytes()[0],
                i.off.to_ne_bytes()[1],
                i.imm.to_ne_bytes()[0],
                i.imm.to_ne_bytes()[1],
                i.imm.to_ne_bytes()[2],
                i.imm.to_ne_bytes()[3],
            ])
        })
        .collect();
    let license = b"GPL\0";
    let mut log = vec![0u8; 64 * 1024];
    let mut attr = [0u8; 144];
    put32(&mut attr, 0, BPF_PROG_TYPE_SK_LOOKUP);
    put32(&mut attr, 4, raw.len() as u32);
    put64(&mut attr, 8, raw.as_ptr() as u64);
    put64(&mut attr, 16, license.as_ptr() as u64);
    put32(&mut attr, 24, 1); // log level: only on failure is it read
    put32(&mut attr, 28, log.len() as u32);
    put64(&mut attr, 32, log.as_mut_ptr() as u64);
    attr[48..48 + 12].copy_from_slice(b"actrix_relay");
    put32(&mut attr, 68, BPF_SK_LOOKUP);
    let prog = bpf(BPF_PROG_LOAD, &mut attr).map_err(|e| {
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        let text = String::from_utf8_lossy(&log[..end]);
        io::Error::new(e.kind(), format!("{e}; verifier: {}", text.trim()))
    })?;

    let netns = std::fs::File::open("/proc/self/ns/net")?;
    let mut attr = [0u8; 144];
    put32(&mut attr, 0, prog.as_raw_fd() as u32);
    put32(&mut attr, 4, netns.as_raw_fd() as u32);
    put32(&mut attr, 8, BPF_SK_LOOKUP);
    let link = bpf(BPF_LINK_CREATE, &mut attr)?;
    Ok(PortSteer {
        _link: link,
        _prog: prog,
        _map: map,
    })
}

/// The receiving socket of a shard for one family: UDP, bound to `addr` port 0 (any address
/// works: the program picks it by descriptor), reporting each datagram's original destination.
pub fn shared_socket(addr: std::net::IpAddr, recv_buffer: usize) -> io::Result<socket2::Socket> {
    actrix_udp::udp_socket(
        SocketAddr::new(addr, 0),
        &actrix_udp::UdpOptions {
            recv_buffer,
            orig_dst: true,
            ..Default::default()
        },
    )
}

/// The sending socket of a shard for one family: raw, the caller writes the IP and UDP
/// headers (IPPROTO_RAW implies IP_HDRINCL / IPV6_HDRINCL).
pub fn raw_socket(v6: bool, send_buffer: usize) -> io::Result<socket2::Socket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(
        if v6 { Domain::IPV6 } else { Domain::IPV4 },
        Type::RAW.cloexec(),
        Some(Protocol::from(libc::IPPROTO_RAW)),
    )?;
    s.set_nonblocking(true)?;
    if send_buffer > 0 {
        let _ = s.set_send_buffer_size(send_buffer);
    }
    Ok(s)
}

/// Bytes [`write_headers`] puts in front of a payload.
pub const HEADERS: usize = 28;
/// Bytes [`write_headers_v6`] puts in front of a payload.
pub const HEADERS_V6: usize = 48;

/// Write an IPv6 header and a UDP header (checksum included: IPv6 requires it) in front of the
/// payload: `pkt` is [`HEADERS_V6`] bytes of room followed by the payload.
pub fn write_headers_v6(pkt: &mut [u8], src: Ipv6Addr, src_port: u16, dst: std::net::SocketAddrV6) {
    let udp_len = (pkt.len() - 40) as u16;
    pkt[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    pkt[4..6].copy_from_slice(&udp_len.to_be_bytes());
    pkt[6] = libc::IPPROTO_UDP as u8;
    pkt[7] = 64;
    pkt[8..24].copy_from_slice(&src.octets());
    pkt[24..40].copy_from_slice(&dst.ip().octets());
    pkt[40..42].copy_from_slice(&src_port.to_be_bytes());
    pkt[42..44].copy_from_slice(&dst.port().to_be_bytes());
    pkt[44..46].copy_from_slice(&udp_len.to_be_bytes());
    pkt[46..48].copy_from_slice(&[0, 0]);
    // One's-complement sum over the pseudo-header (addresses, length, next header), the UDP
    // header and the payload.
    let mut sum: u64 = udp_len as u64 + libc::IPPROTO_UDP as u64;
    let mut words = pkt[8..].chunks_exact(2);
    for w in &mut words {
        sum += u16::from_be_bytes([w[0], w[1]]) as u64;
    }
    if let [last] = words.remainder() {
        sum += (*last as u64) << 8;
    }
    while sum > 0xFFFF {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    let c = !(sum as u16);
    pkt[46..48].copy_from_slice(&if c == 0 { 0xFFFF } else { c }.to_be_bytes());
}

/// Write an IPv4 header and a UDP header for `payload_len` bytes from `src` to `dst` into
/// `head` (exactly [`HEADERS`] bytes, just before the payload). The kernel fills in the IP
/// checksum, total length and identification; the UDP checksum is left at 0 ("none",
/// allowed for IPv4).
pub fn write_headers(
    head: &mut [u8],
    src: Ipv4Addr,
    src_port: u16,
    dst: std::net::SocketAddrV4,
    payload_len: usize,
) {
    let udp_len = (8 + payload_len) as u16;
    head[0] = 0x45;
    head[1] = 0;
    head[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    head[4..6].copy_from_slice(&[0, 0]);
    head[6..8].copy_from_slice(&[0, 0]);
    head[8] = 64;
    head[9] = libc::IPPROTO_UDP as u8;
    head[10..12].copy_from_slice(&[0, 0]);
    head[12..16].copy_from_slice(&src.octets());
    head[16..20].copy_from_slice(&dst.ip().octets());
    head[20..22].copy_from_slice(&src_port.to_be_bytes());
    head[22..24].copy_from_slice(&dst.port().to_be_bytes());
    head[24..26].copy_from_slice(&udp_len.to_be_bytes());
    head[26..28].copy_from_slice(&[0, 0]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jumps_land_on_their_labels() {
        let addrs = ["10.0.0.1".parse().unwrap(), "192.0.2.200".parse().unwrap()];
        let slices = [(49152, 57343), (57344, 65535)];
        let v6: [Ipv6Addr; 1] = ["2001:db8::1".parse().unwrap()];
        let p = program(&addrs, &v6, &slices, 7);
        // The last two instructions: r0 = SK_PASS; exit.
        let n = p.len();
        assert_eq!((p[n - 2].code, p[n - 2].imm), (0xb7, SK_PASS));
        assert_eq!(p[n - 1].code, 0x95);
        // Every jump stays inside the program and never lands inside ld_imm64's second half.
        let ld = p.iter().position(|i| i.code == 0x18).unwrap();
        for (at, i) in p.iter().enumerate() {
            if i.code & 0x07 == 0x05 || i.code & 0x07 == 0x06 {
                if i.code == 0x85 || i.code == 0x95 {
                    continue;
                }
                let to = at as isize + 1 + i.off as isize;
                assert!(
                    to > at as isize && (to as usize) < n,
                    "jump at {at} to {to}"
                );
                assert_ne!(to as usize, ld + 1);
            }
        }
        // Address comparisons use the context's byte order.
        assert!(p
            .iter()
            .any(|i| i.code == 0x16 && i.imm == u32::from_ne_bytes([192, 0, 2, 200]) as i32));
    }

    #[test]
    fn ipv6_headers_carry_the_udp_checksum() {
        // Expected checksum computed independently (pseudo-header + UDP header + "hello").
        let mut pkt = [0u8; HEADERS_V6 + 5];
        pkt[HEADERS_V6..].copy_from_slice(b"hello");
        write_headers_v6(
            &mut pkt,
            "2001:db8::1".parse().unwrap(),
            50000,
            "[2001:db8::2]:3478".parse().unwrap(),
        );
        assert_eq!(pkt[0] >> 4, 6);
        assert_eq!(u16::from_be_bytes([pkt[4], pkt[5]]), 13);
        assert_eq!((pkt[6], pkt[7]), (17, 64));
        assert_eq!(u16::from_be_bytes([pkt[40], pkt[41]]), 50000);
        assert_eq!(u16::from_be_bytes([pkt[42], pkt[43]]), 3478);
        assert_eq!(u16::from_be_bytes([pkt[44], pkt[45]]), 13);
        assert_eq!(u16::from_be_bytes([pkt[46], pkt[47]]), 0x8fa6);
    }

    #[test]
    fn headers_describe_the_datagram() {
        let mut h = [0u8; HEADERS];
        write_headers(
            &mut h,
            "10.0.0.1".parse().unwrap(),
            50000,
            "198.51.100.7:3478".parse().unwrap(),
            100,
        );
        assert_eq!(h[0], 0x45);
        assert_eq!(u16::from_be_bytes([h[2], h[3]]), 128);
        assert_eq!(h[9], 17);
        assert_eq!(&h[12..16], &[10, 0, 0, 1]);
        assert_eq!(&h[16..20], &[198, 51, 100, 7]);
        assert_eq!(u16::from_be_bytes([h[20], h[21]]), 50000);
        assert_eq!(u16::from_be_bytes([h[22], h[23]]), 3478);
        assert_eq!(u16::from_be_bytes([h[24], h[25]]), 108);
    }
}

#[cfg(test)]
mod kernel_tests {
    use super::*;
    use std::net::UdpSocket;

    /// The real program in the kernel (needs root, like the appliance's shared mode): two
    /// port slices of 127.0.0.1 go to two sockets, which learn the original destination; a
    /// port outside the range is untouched.
    #[test]
    fn steers_a_port_range_to_the_slice_sockets() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root (CAP_BPF, CAP_NET_ADMIN)");
            return;
        }
        let lo: Ipv4Addr = "127.0.0.1".parse().unwrap();
        let a = shared_socket(lo.into(), 0).unwrap();
        let b = shared_socket(lo.into(), 0).unwrap();
        let lo6 = Ipv6Addr::LOCALHOST;
        let c = shared_socket(lo6.into(), 0).unwrap();
        let d = shared_socket(lo6.into(), 0).unwrap();
        let steer = attach(
            &[lo],
            &[a.as_raw_fd(), b.as_raw_fd()],
            &[lo6],
            &[c.as_raw_fd(), d.as_raw_fd()],
            &[(61700, 61709), (61710, 61719)],
        )
        .expect("attach");
        let client6 = UdpSocket::bind("[::1]:0").unwrap();
        client6.send_to(b"six", "[::1]:61712").unwrap();
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.send_to(b"one", "127.0.0.1:61703").unwrap();
        client.send_to(b"two", "127.0.0.1:61719").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let got_a = recv_orig(&a).expect("slice 0 receives");
        assert_eq!(got_a, (b"one".to_vec(), 61703));
        let got_b = recv_orig(&b).expect("slice 1 receives");
        assert_eq!(got_b, (b"two".to_vec(), 61719));
        assert!(recv_orig(&a).is_none() && recv_orig(&b).is_none());
        assert_eq!(
            recv_orig(&d).expect("IPv6 slice 1"),
            (b"six".to_vec(), 61712)
        );
        assert!(recv_orig(&c).is_none());
        // Outside the range: an ordinary socket on that port still gets its datagrams.
        let plain = UdpSocket::bind("127.0.0.1:61720").unwrap();
        plain
            .set_read_timeout(Some(std::time::Duration::from_secs(1)))
            .unwrap();
        client.send_to(b"three", "127.0.0.1:61720").unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(plain.recv(&mut buf).unwrap(), 5);
        drop(steer);
        // Detached: the range is no longer steered.
        client.send_to(b"four", "127.0.0.1:61705").unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(recv_orig(&a).is_none());
    }

    fn recv_orig(s: &socket2::Socket) -> Option<(Vec<u8>, u16)> {
        let mut buf = [0u8; 64];
        let mut ctrl = [0u8; 64];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: zeroed msghdr is valid; pointers below point at locals.
        let mut m: libc::msghdr = unsafe { std::mem::zeroed() };
        m.msg_iov = &mut iov;
        m.msg_iovlen = 1;
        m.msg_control = ctrl.as_mut_ptr().cast();
        m.msg_controllen = ctrl.len();
        // SAFETY: valid socket and msghdr.
        let n = unsafe { libc::recvmsg(s.as_raw_fd(), &mut m, libc::MSG_DONTWAIT) };
        if n < 0 {
            return None;
        }
        let port = actrix_udp::orig_dst(&m).map(|a| a.port())?;
        Some((buf[..n as usize].to_vec(), port))
    }
}
