//! Descriptors: how many the control listener may hold, so that no flood of HTTP or WebSocket
//! connections can take the data plane's.
//!
//! Everything in the process shares one RLIMIT_NOFILE. The data plane needs a descriptor per
//! relay socket (one per allocation and family unless `io.relay_sockets = "shared"`), plus its
//! listeners and pollers; the control plane needs one per open connection plus its databases.
//! Without a cap, a few thousand idle connections to `/healthz` made new Allocates fail with
//! 508 (no descriptor for the relay socket). At start the appliance reads the limit (raising
//! the soft limit to the hard one first), counts what is open, reserves what the configured
//! data plane can need and a margin for the control plane's own files, and caps the control
//! listener's connections at what is left (never more than `http.max_connections`):
//!
//! ```text
//! control connections = min(http.max_connections,
//!                           limit - open at start - data plane - control margin)
//! data plane          = shards x (listeners + 32)     (UDP, TCP and TLS listeners)
//!                       + relay sockets: min(turn.max_allocations, relay ports x addresses)
//!                                        x families, + io.relay_socket_pool x shards x families
//!                         (shared relay sockets: 4 per shard instead, plus one listening
//!                         socket per RFC 6062 TCP allocation when those are possible)
//!                       + stream connections: stun.max_connections when there is a TCP or
//!                         TLS listener (client connections and RFC 6062 peer data
//!                         connections count against that one total)
//! control margin      = 64 (SQLite files with their WAL and shared memory, the blocking
//!                       pool, log files, the accept that refuses a connection over the cap)
//! ```
//!
//! When the limit cannot even hold the data plane's reserve, the control listener still gets
//! [`MIN_CONTROL_CONNECTIONS`] and the start logs a warning saying which limit to raise.

use crate::config::{Config, Resolved};
use actrix_dataplane::RelaySocketMode;

/// Descriptors each shard may hold besides relay sockets (epoll or io_uring instances,
/// wakers, timers, listeners' companions; glommio's rings).
pub const PER_SHARD_FIXED: u64 = 32;
/// Descriptors the control plane holds besides connections.
pub const CONTROL_MARGIN: u64 = 64;
/// The fewest connections the control listener is given, whatever the limit.
pub const MIN_CONTROL_CONNECTIONS: usize = 16;

/// The descriptor budget computed at start (logged, and shown by `actrix check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorPlan {
    /// RLIMIT_NOFILE (soft) in force.
    pub limit: u64,
    /// Descriptors open when the plan was made.
    pub open: u64,
    /// Reserved for the data plane.
    pub data_plane: u64,
    /// Connections the control listener may hold at once.
    pub control_connections: usize,
    /// The limit cannot hold the data plane's reserve and the control margin.
    pub short: bool,
}

/// The data plane's worst case in descriptors for this configuration.
pub fn data_plane_need(cfg: &Config, r: &Resolved) -> u64 {
    let shards = r.shard_cores.len().max(1) as u64;
    let listeners = (r.listen.len() + r.listen_streams.len()) as u64;
    let families = (!r.relay_v4.is_empty()) as u64 + (!r.relay_v6.is_empty()) as u64;
    let fixed = shards * (listeners + PER_SHARD_FIXED);
    // Every stream connection, client or RFC 6062 peer, counts against stun.max_connections.
    let streams = if r.listen_streams.is_empty() {
        0
    } else {
        r.streams.max_connections as u64
    };
    if !cfg.turn.enabled {
        return fixed + streams;
    }
    let ports = u64::from(r.port_max - r.port_min) + 1;
    let addresses = r.relay_v4.len().max(r.relay_v6.len()).max(1) as u64;
    let allocations = (cfg.turn.max_allocations as u64).min(ports * addresses);
    let relay = match r.io.relay_sockets {
        RelaySocketMode::Shared => {
            // A TCP allocation (only over a stream) has a listening socket of its own.
            let tcp = if cfg.turn.tcp_relay && streams > 0 {
                allocations.min(streams)
            } else {
                0
            };
            shards * 4 + tcp
        }
        // A TCP allocation's listening socket takes the place of its UDP relay sockets.
        RelaySocketMode::PerAllocation => {
            allocations * families.max(1) + cfg.io.relay_socket_pool as u64 * shards * families
        }
    };
    fixed + relay + streams
}

/// The plan for a process whose limit is `limit` with `open` descriptors open.
pub fn plan(cfg: &Config, r: &Resolved, limit: u64, open: u64) -> DescriptorPlan {
    let data_plane = data_plane_need(cfg, r);
    let left = limit
        .saturating_sub(open)
        .saturating_sub(data_plane)
        .saturating_sub(CONTROL_MARGIN);
    let short = (left as usize) < MIN_CONTROL_CONNECTIONS;
    let control_connections = (left as usize)
        .min(cfg.http.max_connections)
        .max(MIN_CONTROL_CONNECTIONS);
    DescriptorPlan {
        limit,
        open,
        data_plane,
        control_connections,
        short,
    }
}

/// Raise the soft RLIMIT_NOFILE to the hard limit (what systemd's LimitNOFILE sets both to);
/// returns the soft limit in force afterwards.
pub fn raise_nofile() -> u64 {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the struct passed.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                r.rlim_cur = r.rlim_max;
            }
        }
    }
    r.rlim_cur
}

/// Descriptors open in this process now.
pub fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(extra: &str) -> (Config, Resolved) {
        let text = format!(
            "[cores]\npin = false\nshards = [1]\ncontrol = 0\n[turn]\nrelay_port_range = \"50000-50999\"\n{extra}"
        );
        let (cfg, _) = crate::config::parse(&text).unwrap();
        let mut errors = Vec::new();
        let r = cfg.validate(&mut errors, vec![0, 1]).expect("valid");
        (cfg, r)
    }

    #[test]
    fn the_control_listener_gets_what_the_data_plane_leaves() {
        let (cfg, r) = load("max_allocations = 100\n[io]\nrelay_socket_pool = 8\n");
        // One shard, one listener, IPv4 relay only: 33 fixed, 100 allocations, 8 pooled.
        assert_eq!(data_plane_need(&cfg, &r), 33 + 100 + 8);
        let p = plan(&cfg, &r, 1024, 20);
        assert_eq!(p.control_connections, 1024 - 20 - 141 - 64);
        assert!(!p.short);
        // A large limit: http.max_connections caps it.
        assert_eq!(
            plan(&cfg, &r, 1 << 20, 20).control_connections,
            cfg.http.max_connections
        );
        // The relay port range bounds the allocations too.
        let (cfg, r) = load("max_allocations = 100000\n[io]\nrelay_socket_pool = 0\n");
        assert_eq!(data_plane_need(&cfg, &r), 33 + 1000);
        // Too small a limit: the minimum, flagged.
        let p = plan(&cfg, &r, 256, 20);
        assert!(p.short);
        assert_eq!(p.control_connections, MIN_CONTROL_CONNECTIONS);
        // Shared relay sockets need no descriptor per allocation.
        let (cfg, r) = load("max_allocations = 100000\n[io]\nrelay_sockets = \"shared\"\n");
        assert_eq!(data_plane_need(&cfg, &r), 33 + 4);
    }

    #[test]
    fn stream_listeners_reserve_their_connections_and_tcp_allocations() {
        let stun = "[stun]\nlisten = [\"127.0.0.1:3478\"]\nlisten_tcp = [\"127.0.0.1:3478\"]\nmax_connections = 500\n";
        // Two listeners per shard; 500 stream connections; 100 allocations, 8 pooled.
        let (cfg, r) = load(&format!(
            "max_allocations = 100\n[io]\nrelay_socket_pool = 8\n{stun}"
        ));
        assert_eq!(data_plane_need(&cfg, &r), 34 + 100 + 8 + 500);
        // Shared relay sockets: a listening socket per TCP allocation still.
        let (cfg, r) = load(&format!(
            "max_allocations = 100000\n[io]\nrelay_sockets = \"shared\"\n{stun}"
        ));
        assert_eq!(data_plane_need(&cfg, &r), 34 + 4 + 500 + 500);
        let (cfg, r) = load(&format!(
            "max_allocations = 100000\ntcp_relay = false\n[io]\nrelay_sockets = \"shared\"\n{stun}"
        ));
        assert_eq!(data_plane_need(&cfg, &r), 34 + 4 + 500);
        // The control listener gets what is left of the limit.
        let p = plan(&cfg, &r, 2048, 20);
        assert_eq!(p.control_connections, 2048 - 20 - 538 - 64);
    }
}
