//! Spoofed-source Allocate flood (reliability checklist A4): structurally valid Allocate
//! requests from random source addresses, written with their IP and UDP headers through a raw
//! socket (IP_HDRINCL, needs CAP_NET_RAW), at a paced rate, while legitimate clients keep
//! allocating. Half the requests carry no credentials (the 401 path), half carry a USERNAME,
//! REALM, a forged NONCE and MESSAGE-INTEGRITY (the nonce-check path).
//!
//! What it reports: the flood rate reached, the server's resident memory before, at its peak
//! and after (it must stay flat: nothing is stored per source before authentication), the
//! legitimate clients' success ratio and Allocate latency under the flood.
//!
//! The spoofed sources are in `source_cidr` (by default 127.64.0.0/10: loopback, so the
//! answers go to no one). IPv4 targets only.

use crate::load::{Ctx, Probe, Window};
use crate::report::ScenarioReport;
use crate::scenario::FloodSpec;
use crate::stats::Latency;
use crate::target::Target;
use actrix_proto::stun::{self, attr, method, Class, Message, MessageWriter};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const PKT: usize = 256;

/// xorshift64: the flood's sources, ports and transaction ids.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
}

/// Parse "a.b.c.d/len".
pub fn parse_cidr(s: &str) -> Result<(u32, u32), String> {
    let (a, l) = s
        .split_once('/')
        .ok_or_else(|| format!("'{s}' is not a.b.c.d/len"))?;
    let ip: Ipv4Addr = a
        .parse()
        .map_err(|_| format!("'{a}' is not an IPv4 address"))?;
    let len: u32 = l
        .parse()
        .map_err(|_| format!("'{l}' is not a prefix length"))?;
    if !(1..=32).contains(&len) {
        return Err(format!("/{len}: need 1 to 32"));
    }
    let mask = if len == 32 {
        u32::MAX
    } else {
        !(u32::MAX >> len)
    };
    Ok((u32::from(ip) & mask, !mask))
}

/// One flood datagram: IPv4 + UDP headers (the kernel fills the IP checksum and length; the
/// UDP checksum is left 0, "none", which IPv4 allows) and an Allocate.
fn write_packet(out: &mut [u8; PKT], src: SocketAddrV4, dst: SocketAddrV4, rng: &mut Rng) -> usize {
    let mut tid = [0u8; 12];
    tid[..8].copy_from_slice(&rng.next().to_be_bytes());
    tid[8..].copy_from_slice(&(rng.next() as u32).to_be_bytes());
    let authenticated = tid[0] & 1 == 1;
    let mut body = [0u8; PKT - 28];
    let n = {
        let mut w = MessageWriter::new(&mut body, method::ALLOCATE, Class::Request, &tid)
            .expect("room for a header");
        let _ = w.add(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]);
        if authenticated {
            let _ = w.add(attr::USERNAME, b"flood");
            let _ = w.add(attr::REALM, b"actor-rtc.local");
            let _ = w.add(
                attr::NONCE,
                b"obMatJos2AAAB0000000065000000aaaaaaaaaaaaaaaaaaaaaaaa",
            );
            let _ = w.add_integrity(&tid);
        }
        let _ = w.add_fingerprint();
        w.finish()
    };
    let total = 28 + n;
    out[0] = 0x45;
    out[1] = 0;
    out[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    out[4..8].copy_from_slice(&[0, 0, 0x40, 0]); // id 0 (kernel fills), DF
    out[8] = 64;
    out[9] = 17;
    out[10..12].copy_from_slice(&[0, 0]);
    out[12..16].copy_from_slice(&src.ip().octets());
    out[16..20].copy_from_slice(&dst.ip().octets());
    out[20..22].copy_from_slice(&src.port().to_be_bytes());
    out[22..24].copy_from_slice(&dst.port().to_be_bytes());
    out[24..26].copy_from_slice(&((8 + n) as u16).to_be_bytes());
    out[26..28].copy_from_slice(&[0, 0]);
    out[28..28 + n].copy_from_slice(&body[..n]);
    total
}

fn raw_socket() -> std::io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Send `n` packets of `bufs` (lengths in `lens`) to `dst` with one sendmmsg; how many left.
fn send_batch(
    fd: &OwnedFd,
    bufs: &mut [[u8; PKT]],
    lens: &[usize],
    n: usize,
    dst: SocketAddrV4,
) -> usize {
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(*dst.ip()).to_be(),
        },
        sin_zero: [0; 8],
    };
    let mut iovs: Vec<libc::iovec> = (0..n)
        .map(|i| libc::iovec {
            iov_base: bufs[i].as_mut_ptr().cast(),
            iov_len: lens[i],
        })
        .collect();
    // SAFETY: all-zero is a valid mmsghdr; the pointers set below outlive the call.
    let mut hdrs: Vec<libc::mmsghdr> = (0..n).map(|_| unsafe { std::mem::zeroed() }).collect();
    for (i, h) in hdrs.iter_mut().enumerate() {
        h.msg_hdr.msg_name = &sa as *const _ as *mut _;
        h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as u32;
        h.msg_hdr.msg_iov = &mut iovs[i];
        h.msg_hdr.msg_iovlen = 1;
    }
    // SAFETY: hdrs and what they point to are valid for the call.
    let r = unsafe { libc::sendmmsg(fd.as_raw_fd(), hdrs.as_mut_ptr(), n as u32, 0) };
    r.max(0) as usize
}

/// A legitimate client's Allocate (401 round trip, then authenticated) and its release;
/// the time to the success, or None after `attempts` tries of `rto` each.
fn legit_allocate(target: &Target, rto: Duration, attempts: u32) -> Option<Duration> {
    let (user, pass) = target.creds.as_ref()?.resolve(crate::target::unix_now());
    let realm = "actor-rtc.local";
    let sock = UdpSocket::bind("0.0.0.0:0").ok()?;
    sock.connect(target.addr).ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(20)))
        .ok()?;
    let t0 = Instant::now();
    let mut nonce: Option<Vec<u8>> = None;
    let mut realm_got = realm.as_bytes().to_vec();
    let mut buf = [0u8; 1500];
    let mut tid = [0u8; 12];
    for step in 0..2 {
        tid[..8].copy_from_slice(&(t0.elapsed().as_nanos() as u64 ^ 0x5A5A).to_be_bytes());
        tid[8..].copy_from_slice(&(step as u32).to_be_bytes());
        let mut out = [0u8; 512];
        let key = stun::long_term_key_md5(user.as_bytes(), &realm_got, pass.as_bytes());
        let n = {
            let mut w =
                MessageWriter::new(&mut out, method::ALLOCATE, Class::Request, &tid).ok()?;
            w.add(attr::REQUESTED_TRANSPORT, &[17, 0, 0, 0]).ok()?;
            if let Some(nonce) = &nonce {
                w.add(attr::USERNAME, user.as_bytes()).ok()?;
                w.add(attr::REALM, &realm_got).ok()?;
                w.add(attr::NONCE, nonce).ok()?;
                w.add_integrity(&key).ok()?;
            }
            w.finish()
        };
        let mut answered = false;
        'tries: for _ in 0..attempts {
            sock.send(&out[..n]).ok()?;
            let until = Instant::now() + rto;
            while Instant::now() < until {
                let Ok(k) = sock.recv(&mut buf) else { continue };
                let Ok(m) = Message::parse(&buf[..k]) else {
                    continue;
                };
                if m.transaction_id() != &tid {
                    continue;
                }
                if step == 0 {
                    nonce = m.get(attr::NONCE).map(<[u8]>::to_vec);
                    if let Some(r) = m.get(attr::REALM) {
                        realm_got = r.to_vec();
                    }
                    answered = nonce.is_some();
                } else if m.class() == Class::Success {
                    let took = t0.elapsed();
                    // Release it.
                    let mut rel = [0u8; 512];
                    tid[11] ^= 0xFF;
                    if let Ok(mut w) =
                        MessageWriter::new(&mut rel, method::REFRESH, Class::Request, &tid)
                    {
                        let _ = w.add_u32(attr::LIFETIME, 0);
                        let _ = w.add(attr::USERNAME, user.as_bytes());
                        let _ = w.add(attr::REALM, &realm_got);
                        let _ = w.add(attr::NONCE, nonce.as_deref().unwrap_or_default());
                        let _ = w.add_integrity(&key);
                        let n = w.finish();
                        let _ = sock.send(&rel[..n]);
                    }
                    return Some(took);
                } else {
                    return None;
                }
                break 'tries;
            }
        }
        if !answered {
            return None;
        }
    }
    None
}

pub fn run(target: &Target, spec: &FloodSpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    let _ = ctx;
    let SocketAddr::V4(dst) = target.addr else {
        rep.fail("the flood scenario needs an IPv4 target");
        return;
    };
    let (net, host_mask) = match parse_cidr(&spec.source_cidr) {
        Ok(v) => v,
        Err(e) => {
            rep.fail(format!("flood.source_cidr: {e}"));
            return;
        }
    };
    let fd = match raw_socket() {
        Ok(f) => f,
        Err(e) => {
            rep.fail(format!("raw socket (needs CAP_NET_RAW): {e}"));
            return;
        }
    };
    let probe = Probe { pid: target.pid };
    if target.creds.is_none() {
        rep.notes
            .push("no credentials: legitimate clients are not measured".into());
    }

    // Baseline: the server settled, legitimate traffic only.
    std::thread::sleep(Duration::from_millis(300));
    let rss_before = probe.rss();

    let stop = Arc::new(AtomicBool::new(false));
    let legit = {
        let stop = stop.clone();
        let target = target.clone();
        let every = Duration::from_millis(spec.legit_interval_ms);
        let rto = Duration::from_millis(spec.legit_rto_ms);
        let attempts = spec.legit_attempts;
        let clients = spec.legit_clients;
        std::thread::spawn(move || {
            let mut lat = Latency::new();
            let (mut ok, mut failed) = (0u64, 0u64);
            let mut handles = Vec::new();
            for c in 0..clients {
                let stop = stop.clone();
                let target = target.clone();
                handles.push(std::thread::spawn(move || {
                    let mut lat = Latency::new();
                    let (mut ok, mut failed) = (0u64, 0u64);
                    std::thread::sleep(every / clients.max(1) as u32 * c as u32);
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        match legit_allocate(&target, rto, attempts) {
                            Some(d) => {
                                ok += 1;
                                lat.record_ns(d.as_nanos() as u64);
                            }
                            None => failed += 1,
                        }
                        if let Some(left) = every.checked_sub(t.elapsed()) {
                            std::thread::sleep(left);
                        }
                    }
                    (lat, ok, failed)
                }));
            }
            for h in handles {
                if let Ok((l, o, f)) = h.join() {
                    lat.merge(&l);
                    ok += o;
                    failed += f;
                }
            }
            (lat, ok, failed)
        })
    };

    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ crate::target::unix_now());
    let mut bufs = vec![[0u8; PKT]; BATCH];
    let mut lens = vec![0usize; BATCH];
    let win = Window::open(probe);
    let epoch = Instant::now();
    let duration = Duration::from_secs_f64(spec.duration_secs);
    let (mut sent, mut send_errors) = (0u64, 0u64);
    let mut rss_peak = rss_before.unwrap_or(0);
    let mut last_rss = Instant::now();
    while epoch.elapsed() < duration {
        let due = (epoch.elapsed().as_secs_f64() * spec.pps as f64) as u64;
        if sent >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        let n = ((due - sent) as usize).min(BATCH);
        for i in 0..n {
            let host = (rng.next() as u32) & host_mask;
            let src = SocketAddrV4::new(
                Ipv4Addr::from(net | host.max(1)),
                1024 + (rng.next() % 60000) as u16,
            );
            lens[i] = write_packet(&mut bufs[i], src, dst, &mut rng);
        }
        let k = send_batch(&fd, &mut bufs, &lens, n, dst);
        sent += k as u64;
        if k < n {
            send_errors += (n - k) as u64;
            // ENOBUFS and friends: count what was not sent and move on.
            sent += (n - k) as u64;
        }
        if last_rss.elapsed() >= Duration::from_millis(250) {
            last_rss = Instant::now();
            if let Some(r) = probe.rss() {
                rss_peak = rss_peak.max(r);
            }
        }
    }
    let measured = win.close();
    stop.store(true, Ordering::Relaxed);
    let (lat, ok, failed) = legit.join().unwrap_or_default();
    std::thread::sleep(Duration::from_secs(1));
    let rss_after = probe.rss();
    if let Some(r) = rss_after {
        rss_peak = rss_peak.max(r);
    }

    let delivered = sent - send_errors;
    let pps = delivered as f64 / measured.wall;
    rep.set("flood_offered_pps", spec.pps as f64);
    rep.set("flood_sent_pps", pps);
    rep.set("flood_send_errors", send_errors as f64);
    rep.set("legit_allocations", ok as f64);
    rep.set("legit_failures", failed as f64);
    let success = if ok + failed > 0 {
        ok as f64 / (ok + failed) as f64
    } else {
        0.0
    };
    rep.set("legit_success", success);
    if lat.count() > 0 {
        let s = lat.summary();
        rep.set("legit_allocate_p50_ms", s.p50_us / 1000.0);
        rep.set("legit_allocate_p99_ms", s.p99_us / 1000.0);
        rep.latency = Some(s);
    }
    let mb = |b: u64| b as f64 / (1 << 20) as f64;
    if let (Some(b), Some(a)) = (rss_before, rss_after) {
        rep.set("server_rss_before_mb", mb(b));
        rep.set("server_rss_peak_mb", mb(rss_peak));
        rep.set("server_rss_after_mb", mb(a));
        let growth = mb(rss_peak.saturating_sub(b));
        rep.set("server_rss_growth_mb", growth);
        if growth > spec.max_rss_growth_mb {
            rep.fail(format!(
                "server RSS grew {growth:.1} MB under the flood (limit {} MB)",
                spec.max_rss_growth_mb
            ));
        }
    }
    if let Some(cpu) = measured.server_cpu {
        rep.set("server_cpu_cores", cpu / measured.wall);
    }
    if target.creds.is_some() && success < spec.min_legit_success {
        rep.fail(format!(
            "legitimate clients: {:.1}% of {} Allocates succeeded (floor {:.0}%)",
            success * 100.0,
            ok + failed,
            spec.min_legit_success * 100.0
        ));
    }
    if pps < spec.pps as f64 * 0.8 {
        rep.notes.push(format!(
            "the generator reached {pps:.0} pps of the {} offered",
            spec.pps
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flood_packets_are_valid_allocates_from_the_cidr() {
        let (net, mask) = parse_cidr("127.64.0.0/10").unwrap();
        assert_eq!(Ipv4Addr::from(net), Ipv4Addr::new(127, 64, 0, 0));
        assert_eq!(mask, (1 << 22) - 1);
        assert!(parse_cidr("127.0.0.1").is_err());
        let mut rng = Rng(7);
        let mut out = [0u8; PKT];
        let src = SocketAddrV4::new(Ipv4Addr::new(127, 64, 1, 2), 5000);
        let dst = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 3478);
        for _ in 0..8 {
            let n = write_packet(&mut out, src, dst, &mut rng);
            assert_eq!(u16::from_be_bytes([out[2], out[3]]) as usize, n);
            assert_eq!(&out[12..16], &[127, 64, 1, 2]);
            let m = Message::parse(&out[28..n]).expect("a valid STUN message");
            assert_eq!((m.method(), m.class()), (method::ALLOCATE, Class::Request));
            assert!(m.has_fingerprint());
        }
    }
}
