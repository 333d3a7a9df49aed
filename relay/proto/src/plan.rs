//! The sharding plan: which shard owns what, as pure functions of the configuration.
//!
//! A shard owns a contiguous slice of the relay port range on every relay address
//! ([`port_slices`], inverted by [`shard_of_port`]), and the clients the reuseport steering
//! program sends it ([`shard_of_client`], the same function the program computes in the
//! kernel). Both are stable for the life of the process, so a client's packets and its
//! allocation's relay ports are handled by one shard and nothing on the per-packet path is
//! shared.

use std::net::{IpAddr, SocketAddr};

/// Index of a data-plane shard (0-based, in the order of `cores.shards`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ShardId(pub u16);

impl ShardId {
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for ShardId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Split the relay port range `min..=max` among `shards` contiguous slices, inclusive.
pub fn port_slices(min: u16, max: u16, shards: usize) -> Vec<(u16, u16)> {
    let span = max as usize - min as usize + 1;
    (0..shards)
        .map(|i| {
            let lo = min as usize + i * span / shards;
            let hi = min as usize + (i + 1) * span / shards - 1;
            (lo as u16, hi as u16)
        })
        .collect()
}

/// The shard whose slice (see [`port_slices`]) holds `port`; `None` outside the range.
pub fn shard_of_port(min: u16, max: u16, shards: usize, port: u16) -> Option<usize> {
    if port < min || port > max || shards == 0 {
        return None;
    }
    let span = max as usize - min as usize + 1;
    // Inverse of `port_slices`: the largest i with min + i*span/shards <= port.
    let off = (port - min) as usize;
    let mut i = off * shards / span;
    while i + 1 < shards && (i + 1) * span / shards <= off {
        i += 1;
    }
    while i > 0 && i * span / shards > off {
        i -= 1;
    }
    Some(i)
}

/// The shard a client lands on: `(low 32 bits of the source IP + source port) mod shards`,
/// exactly what the data plane's classic BPF reuseport program computes in the kernel.
pub fn shard_of_client(addr: &SocketAddr, shards: usize) -> usize {
    (ip_word(addr).wrapping_add(addr.port() as u32) % shards.max(1) as u32) as usize
}

/// The shard a client lands on under IP-only steering (`io.steering = "cbpf_ip"`): the low 32
/// bits of the source IP mod shards, whatever its port.
pub fn shard_of_client_ip(addr: &SocketAddr, shards: usize) -> usize {
    (ip_word(addr) % shards.max(1) as u32) as usize
}

fn ip_word(addr: &SocketAddr) -> u32 {
    match addr.ip() {
        IpAddr::V4(v4) => u32::from(v4),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            u32::from_be_bytes([o[12], o[13], o[14], o[15]])
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_slices_and_inverse_agree() {
        for shards in 1..7 {
            let s = port_slices(49152, 65535, shards);
            assert_eq!(s[0].0, 49152);
            assert_eq!(s[shards - 1].1, 65535);
            for (i, (lo, hi)) in s.iter().enumerate() {
                assert_eq!(shard_of_port(49152, 65535, shards, *lo), Some(i));
                assert_eq!(shard_of_port(49152, 65535, shards, *hi), Some(i));
                if i > 0 {
                    assert_eq!(*lo, s[i - 1].1 + 1);
                }
            }
        }
        assert_eq!(shard_of_port(100, 200, 2, 99), None);
        assert_eq!(shard_of_port(100, 200, 2, 201), None);
    }

    #[test]
    fn clients_spread_by_address_and_port() {
        let a: SocketAddr = "192.0.2.1:1000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:1001".parse().unwrap();
        assert_eq!(shard_of_client(&a, 1), 0);
        assert_ne!(shard_of_client(&a, 2), shard_of_client(&b, 2));
        // IPv6: the last 32 bits of the address count.
        let c: SocketAddr = "[2001:db8::c000:201]:1000".parse().unwrap();
        assert_eq!(shard_of_client(&c, 3), shard_of_client(&a, 3));
        // IP-only steering: both ports of one address on one shard, addresses spread.
        assert_eq!(shard_of_client_ip(&a, 2), shard_of_client_ip(&b, 2));
        let d: SocketAddr = "192.0.2.2:1000".parse().unwrap();
        assert_ne!(shard_of_client_ip(&a, 2), shard_of_client_ip(&d, 2));
    }
}
