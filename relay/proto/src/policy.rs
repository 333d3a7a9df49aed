//! Peer address policy: which addresses a client may relay to.
//!
//! TURN relays are a classic SSRF vector: a client that can create a permission toward
//! 127.0.0.1, 10.0.0.1 or 169.254.169.254 can reach services that trust the relay host's
//! network position. By default every address that is not globally routable unicast is
//! refused (403), including the IPv4-embedding IPv6 forms (mapped, compatible, NAT64, 6to4,
//! Teredo) that have been used to bypass filters in other servers. Operators can widen or
//! narrow this with allow and deny ranges of any alignment.
//!
//! Two rules sit above the ranges: the appliance's own service ports are never a valid peer
//! (a relay loop into its own STUN/TURN or HTTP listener), and a relay address currently
//! allocated on this appliance is always a valid peer, so two clients behind one node can relay
//! to each other.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

/// An inclusive range of addresses of one family, not necessarily prefix-aligned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IpRange {
    V4(u32, u32),
    V6(u128, u128),
}

impl IpRange {
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip) {
            (IpRange::V4(a, b), IpAddr::V4(x)) => (*a..=*b).contains(&u32::from(x)),
            (IpRange::V6(a, b), IpAddr::V6(x)) => (*a..=*b).contains(&u128::from(x)),
            _ => false,
        }
    }
}

impl FromStr for IpRange {
    type Err = String;

    /// Accepts `ADDR`, `ADDR/PREFIX` or `START-END` (both ends inclusive, same family).
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if let Some((a, b)) = s.split_once('-') {
            let a: IpAddr = a.trim().parse().map_err(|_| format!("bad address '{a}'"))?;
            let b: IpAddr = b.trim().parse().map_err(|_| format!("bad address '{b}'"))?;
            return match (a, b) {
                (IpAddr::V4(a), IpAddr::V4(b)) if u32::from(a) <= u32::from(b) => {
                    Ok(IpRange::V4(a.into(), b.into()))
                }
                (IpAddr::V6(a), IpAddr::V6(b)) if u128::from(a) <= u128::from(b) => {
                    Ok(IpRange::V6(a.into(), b.into()))
                }
                (IpAddr::V4(_), IpAddr::V4(_)) | (IpAddr::V6(_), IpAddr::V6(_)) => {
                    Err(format!("range '{s}' ends before it starts"))
                }
                _ => Err(format!("range '{s}' mixes address families")),
            };
        }
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let ip: IpAddr = addr.parse().map_err(|_| format!("bad address '{addr}'"))?;
        match ip {
            IpAddr::V4(v4) => {
                let p: u32 = match prefix {
                    Some(p) => p
                        .parse()
                        .ok()
                        .filter(|p| *p <= 32)
                        .ok_or(format!("bad prefix in '{s}'"))?,
                    None => 32,
                };
                let mask = if p == 0 { 0 } else { u32::MAX << (32 - p) };
                let base = u32::from(v4) & mask;
                Ok(IpRange::V4(base, base | !mask))
            }
            IpAddr::V6(v6) => {
                let p: u32 = match prefix {
                    Some(p) => p
                        .parse()
                        .ok()
                        .filter(|p| *p <= 128)
                        .ok_or(format!("bad prefix in '{s}'"))?,
                    None => 128,
                };
                let mask = if p == 0 { 0 } else { u128::MAX << (128 - p) };
                let base = u128::from(v6) & mask;
                Ok(IpRange::V6(base, base | !mask))
            }
        }
    }
}

/// Why a peer address was refused. Counted, never logged per packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// Matches a configured deny range.
    DenyRange,
    /// One of the appliance's own service ports.
    ServicePort,
    /// Not globally routable (loopback, private, link-local, multicast, reserved, ...).
    Special,
    /// An IPv6 form that embeds or tunnels IPv4 in a way we refuse outright.
    Tunnel,
    /// Port 0 is never a valid destination.
    PortZero,
}

/// Relay (address index, port) pairs currently allocated on this appliance, shared by all
/// shards.
///
/// Written only by the shard that owns a port (on allocate and free), read when a permission or
/// channel is created or a Send is checked: never where ChannelData flows. 65536 bits per relay
/// address, lock-free.
#[derive(Debug)]
pub struct RelayPortSet {
    words: Box<[AtomicU64]>,
}

impl Default for RelayPortSet {
    fn default() -> Self {
        Self::new(1)
    }
}

impl RelayPortSet {
    pub fn new(addresses: usize) -> Self {
        RelayPortSet {
            words: (0..1024 * addresses.max(1))
                .map(|_| AtomicU64::new(0))
                .collect(),
        }
    }

    fn at(&self, addr: u8, port: u16) -> Option<(usize, u16)> {
        let w = addr as usize * 1024 + (port / 64) as usize;
        (w < self.words.len()).then_some((w, port % 64))
    }

    pub fn set(&self, addr: u8, port: u16, on: bool) {
        let Some((w, b)) = self.at(addr, port) else {
            return;
        };
        if on {
            self.words[w].fetch_or(1 << b, Ordering::Release);
        } else {
            self.words[w].fetch_and(!(1 << b), Ordering::Release);
        }
    }

    pub fn contains(&self, addr: u8, port: u16) -> bool {
        self.at(addr, port)
            .is_some_and(|(w, b)| self.words[w].load(Ordering::Acquire) & (1 << b) != 0)
    }
}

/// The policy as configured; immutable once built, shared by every shard.
#[derive(Debug, Clone)]
pub struct PeerPolicy {
    pub allow: Vec<IpRange>,
    pub deny: Vec<IpRange>,
    /// Addresses of this host: listen, relay and advertised addresses, interface addresses.
    pub own_ips: Vec<IpAddr>,
    /// Ports of the appliance's own services (STUN/TURN listeners, HTTP control server).
    pub service_ports: Vec<u16>,
    /// Relay addresses of this appliance (advertised and bound) with their address index, for
    /// the relay-to-relay rule (with the live [`RelayPortSet`] passed to [`PeerPolicy::check`]).
    pub relay_ips: Vec<(IpAddr, u8)>,
}

impl PeerPolicy {
    pub fn new(allow: Vec<IpRange>, deny: Vec<IpRange>) -> Self {
        PeerPolicy {
            allow,
            deny,
            own_ips: Vec::new(),
            service_ports: Vec::new(),
            relay_ips: Vec::new(),
        }
    }

    /// Decide whether `peer` may be the target of a permission, channel or Send.
    /// `relay_ports` are the relay ports allocated on this appliance right now (shared by all
    /// shards; see [`crate::turn::CrossShard`]).
    pub fn check(&self, peer: SocketAddr, relay_ports: &RelayPortSet) -> Result<(), Denied> {
        let ip = peer.ip();
        let effective = embedded_v4(ip).map(IpAddr::V4).unwrap_or(ip);
        if peer.port() == 0 {
            return Err(Denied::PortZero);
        }
        let is_own = |x: IpAddr| x.is_loopback() || x.is_unspecified() || self.own_ips.contains(&x);
        if self.service_ports.contains(&peer.port()) && (is_own(ip) || is_own(effective)) {
            return Err(Denied::ServicePort);
        }
        if self
            .relay_ips
            .iter()
            .any(|&(r, i)| (r == ip || r == effective) && relay_ports.contains(i, peer.port()))
        {
            return Ok(());
        }
        if self
            .deny
            .iter()
            .any(|r| r.contains(ip) || r.contains(effective))
        {
            return Err(Denied::DenyRange);
        }
        if self
            .allow
            .iter()
            .any(|r| r.contains(ip) || r.contains(effective))
        {
            return Ok(());
        }
        classify(ip)
    }
}

/// The IPv4 address embedded in an IPv4-mapped (::ffff:0:0/96) or NAT64 well-known-prefix
/// (64:ff9b::/96) address. Those are judged as the IPv4 address they reach.
pub fn embedded_v4(ip: IpAddr) -> Option<Ipv4Addr> {
    match ip {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let tail = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
            let mapped = s[..5] == [0; 5] && s[5] == 0xffff;
            let nat64 = s[..6] == [0x64, 0xff9b, 0, 0, 0, 0];
            (mapped || nat64).then_some(tail)
        }
        IpAddr::V4(_) => None,
    }
}

/// Default classification: `Ok` only for globally routable unicast.
pub fn classify(ip: IpAddr) -> Result<(), Denied> {
    match ip {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(ip) {
                return classify_v4(v4);
            }
            classify_v6(v6)
        }
    }
}

const V4_SPECIAL: &[(u32, u32)] = &[
    (0x0000_0000, 8),  // 0.0.0.0/8 "this network" (Linux treats 0.0.0.0 as local host)
    (0x0A00_0000, 8),  // 10/8 private
    (0x6440_0000, 10), // 100.64/10 CGNAT (also Alibaba metadata 100.100.100.200)
    (0x7F00_0000, 8),  // loopback
    (0xA9FE_0000, 16), // link-local, incl. 169.254.169.254 cloud metadata
    (0xAC10_0000, 12), // 172.16/12 private
    (0xC000_0000, 24), // 192.0.0/24 IETF protocol assignments
    (0xC000_0200, 24), // TEST-NET-1
    (0xC058_6300, 24), // 192.88.99/24 6to4 relay anycast
    (0xC0A8_0000, 16), // 192.168/16 private
    (0xC612_0000, 15), // 198.18/15 benchmarking
    (0xC633_6400, 24), // TEST-NET-2
    (0xCB00_7100, 24), // TEST-NET-3
    (0xE000_0000, 4),  // multicast
    (0xF000_0000, 4),  // 240/4 reserved, incl. 255.255.255.255 broadcast
];

fn classify_v4(ip: Ipv4Addr) -> Result<(), Denied> {
    let x = u32::from(ip);
    for &(base, len) in V4_SPECIAL {
        let mask = u32::MAX << (32 - len);
        if x & mask == base {
            return Err(Denied::Special);
        }
    }
    Ok(())
}

fn classify_v6(ip: Ipv6Addr) -> Result<(), Denied> {
    let x = u128::from(ip);
    let s = ip.segments();
    let in_prefix = |base: u128, len: u32| x & (u128::MAX << (128 - len)) == base;
    // ::/96 holds ::, ::1 and the deprecated IPv4-compatible addresses.
    if in_prefix(0, 96) {
        return Err(Denied::Special);
    }
    // 2002::/16 6to4 and 2001::/32 Teredo tunnel to arbitrary IPv4 hosts (RFC 8656 §21.1.1
    // tunnel-amplification text); 64:ff9b:1::/48 is local-use NAT64 (RFC 8215).
    if s[0] == 0x2002
        || (s[0] == 0x2001 && s[1] == 0)
        || (s[0] == 0x64 && s[1] == 0xff9b && s[2] == 1)
    {
        return Err(Denied::Tunnel);
    }
    const SPECIAL: &[(u128, u32)] = &[
        (0x0100_0000_0000_0000_0000_0000_0000_0000, 64), // 100::/64 discard
        (0x2001_0000_0000_0000_0000_0000_0000_0000, 23), // IETF protocol assignments
        (0x2001_0db8_0000_0000_0000_0000_0000_0000, 32), // documentation
        (0x3fff_0000_0000_0000_0000_0000_0000_0000, 20), // documentation (RFC 9637)
        (0x5f00_0000_0000_0000_0000_0000_0000_0000, 16), // SRv6 SIDs
        (0xfc00_0000_0000_0000_0000_0000_0000_0000, 7),  // ULA, incl. fd00:ec2::254 metadata
        (0xfe80_0000_0000_0000_0000_0000_0000_0000, 10), // link-local
        (0xfec0_0000_0000_0000_0000_0000_0000_0000, 10), // site-local (deprecated)
        (0xff00_0000_0000_0000_0000_0000_0000_0000, 8),  // multicast
    ];
    for &(base, len) in SPECIAL {
        if in_prefix(base, len) {
            return Err(Denied::Special);
        }
    }
    // Only 2000::/3 is allocated global unicast.
    if !in_prefix(0x2000_0000_0000_0000_0000_0000_0000_0000, 3) {
        return Err(Denied::Special);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// No relay port allocated.
    static NO_PORTS: std::sync::LazyLock<RelayPortSet> =
        std::sync::LazyLock::new(RelayPortSet::default);

    fn sa(s: &str) -> SocketAddr {
        if let Ok(a) = s.parse() {
            return a;
        }
        SocketAddr::new(s.parse().unwrap(), 80)
    }

    #[test]
    fn every_deny_vector_address_is_refused_by_default() {
        let p = PeerPolicy::new(vec![], vec![]);
        for ip in [
            "127.0.0.1",
            "127.255.255.254",
            "0.0.0.0",
            "0.1.2.3",
            "::1",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:0.0.0.0",
            "::127.0.0.1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::1",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "169.254.169.254",
            "::ffff:169.254.169.254",
            "fd00:ec2::254",
            "fe80::1",
            "fc00::1",
            "10.0.0.1",
            "172.16.0.1",
            "192.168.1.1",
            "100.64.0.1",
            "100.100.100.200",
            "224.0.0.1",
            "ff02::1",
            "255.255.255.255",
            "240.0.0.1",
            "198.18.0.1",
            "192.0.0.1",
            "64:ff9b:1::a00:1",
        ] {
            assert!(p.check(sa(ip), &NO_PORTS).is_err(), "{ip} must be denied");
        }
    }

    #[test]
    fn public_addresses_are_allowed() {
        let p = PeerPolicy::new(vec![], vec![]);
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "64:ff9b::808:808",
            "::ffff:8.8.8.8",
        ] {
            assert_eq!(p.check(sa(ip), &NO_PORTS), Ok(()), "{ip}");
        }
        assert_eq!(
            p.check("8.8.8.8:0".parse().unwrap(), &NO_PORTS),
            Err(Denied::PortZero)
        );
    }

    #[test]
    fn ranges_parse_and_match_without_alignment() {
        let r: IpRange = "2001:db8::5-2001:db8::1:3".parse().unwrap();
        assert!(!r.contains("2001:db8::4".parse().unwrap()));
        assert!(r.contains("2001:db8::5".parse().unwrap()));
        assert!(r.contains("2001:db8::ffff".parse().unwrap()));
        assert!(r.contains("2001:db8::1:3".parse().unwrap()));
        assert!(!r.contains("2001:db8::1:4".parse().unwrap()));
        let c: IpRange = "10.1.2.3/16".parse().unwrap();
        assert_eq!(c, IpRange::V4(0x0A01_0000, 0x0A01_FFFF));
        assert!("10.0.0.1-::1".parse::<IpRange>().is_err());
        assert!("10.0.0.9-10.0.0.1".parse::<IpRange>().is_err());
        assert!("10.0.0.0/33".parse::<IpRange>().is_err());
        assert!("nonsense".parse::<IpRange>().is_err());
    }

    #[test]
    fn allow_and_deny_ranges() {
        let p = PeerPolicy::new(
            vec![
                "127.0.0.0/8".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            vec![
                "127.0.0.9".parse().unwrap(),
                "8.8.8.0/24".parse().unwrap(),
                "2001:db8::5-2001:db8::1:3".parse().unwrap(),
            ],
        );
        assert_eq!(p.check(sa("127.0.0.1"), &NO_PORTS), Ok(()));
        assert_eq!(
            p.check(sa("::ffff:127.0.0.1"), &NO_PORTS),
            Ok(()),
            "mapped follows its v4 rule"
        );
        assert_eq!(p.check(sa("127.0.0.9"), &NO_PORTS), Err(Denied::DenyRange));
        assert_eq!(p.check(sa("8.8.8.8"), &NO_PORTS), Err(Denied::DenyRange));
        assert_eq!(p.check(sa("2001:db8::4"), &NO_PORTS), Ok(()));
        assert_eq!(
            p.check(sa("2001:db8::6"), &NO_PORTS),
            Err(Denied::DenyRange)
        );
        assert_eq!(p.check(sa("2001:db8::1:4"), &NO_PORTS), Ok(()));
    }

    #[test]
    fn own_service_ports_denied_even_when_allowed_but_relay_addresses_pass() {
        let mut p = PeerPolicy::new(vec!["127.0.0.0/8".parse().unwrap()], vec![]);
        p.service_ports = vec![3478, 8080];
        p.own_ips = vec!["203.0.113.7".parse().unwrap()];
        p.relay_ips = vec![("127.0.0.1".parse().unwrap(), 0)];
        assert_eq!(
            p.check(sa("127.0.0.1:3478"), &NO_PORTS),
            Err(Denied::ServicePort)
        );
        assert_eq!(
            p.check(sa("127.0.0.2:8080"), &NO_PORTS),
            Err(Denied::ServicePort)
        );
        assert_eq!(
            p.check(sa("[::ffff:127.0.0.1]:8080"), &NO_PORTS),
            Err(Denied::ServicePort)
        );
        assert_eq!(
            p.check(sa("0.0.0.0:3478"), &NO_PORTS),
            Err(Denied::ServicePort)
        );
        assert_eq!(
            p.check(sa("203.0.113.7:3478"), &NO_PORTS),
            Err(Denied::ServicePort)
        );
        assert_eq!(p.check(sa("127.0.0.1:5000"), &NO_PORTS), Ok(()));

        let strict = {
            let mut q = PeerPolicy::new(vec![], vec![]);
            q.relay_ips = vec![
                ("127.0.0.1".parse().unwrap(), 0),
                ("127.0.0.2".parse().unwrap(), 1),
            ];
            q.service_ports = vec![3478];
            q
        };
        let ports = RelayPortSet::new(2);
        assert_eq!(
            strict.check(sa("127.0.0.1:50000"), &ports),
            Err(Denied::Special)
        );
        ports.set(0, 50000, true);
        assert_eq!(
            strict.check(sa("127.0.0.1:50000"), &ports),
            Ok(()),
            "allocated relay address"
        );
        assert_eq!(
            strict.check(sa("127.0.0.2:50000"), &ports),
            Err(Denied::Special),
            "same port on the other relay address is not allocated"
        );
        assert_eq!(
            strict.check(sa("127.0.0.3:50000"), &ports),
            Err(Denied::Special)
        );
        ports.set(1, 50000, true);
        assert_eq!(strict.check(sa("127.0.0.2:50000"), &ports), Ok(()));
        ports.set(0, 50000, false);
        assert_eq!(
            strict.check(sa("127.0.0.1:50000"), &ports),
            Err(Denied::Special)
        );
    }
}
