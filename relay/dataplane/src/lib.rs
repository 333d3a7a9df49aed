//! The data plane: one pinned shard thread per configured core.
//!
//! Each shard owns a socket on every listen address (all shards' sockets form one
//! SO_REUSEPORT group per address, steered by [`steer`]), a contiguous slice of the relay port
//! range (port → shard is [`crate::config::shard_of_port`]), its relay sockets, and its TURN
//! core. Shards share nothing mutable on the per-packet path; the only cross-shard state is
//! the allocation quota counters and the relay-port bitmap, both touched on allocate/free.

pub mod io;
pub mod lookup;
pub mod shard;
pub mod stats;
pub mod steer;
mod uring;

use crate::auth::AuthConfig;
use crate::config::{port_slices, Config, Resolved};
use crate::policy::PeerPolicy;
use crate::turn::{Quotas, TurnConfig};
use shard::{IdentityResolver, ShardMsg, ShardSetup};
use socket2::{Domain, Protocol, Socket, Type};
use stats::ShardStats;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::policy::RelayPortSet;

struct ShardHandle {
    tx: crossbeam_channel::Sender<ShardMsg>,
    waker: Arc<io::Waker>,
    thread: Option<JoinHandle<()>>,
}

/// The running data plane.
pub struct DataPlane {
    shards: Vec<ShardHandle>,
    /// The sk_lookup program of shared relay sockets, attached while the data plane lives.
    _steer: Option<lookup::PortSteer>,
    shared: Shared,
    pub stats: Vec<Arc<ShardStats>>,
    pub listen: Vec<SocketAddr>,
}

/// Shared relay sockets (`io.relay_sockets = "shared"`): per shard and family a receiving and a
/// raw sending socket, and the program that steers the relay addresses' port slices to them.
fn shared_relay_sockets(
    cfg: &Config,
    r: &Resolved,
    slices: &[(u16, u16)],
) -> anyhow::Result<(Vec<Option<shard::SharedSockets>>, Option<lookup::PortSteer>)> {
    use std::net::IpAddr;
    let v4: Vec<std::net::Ipv4Addr> = r
        .relay_v4
        .iter()
        .filter_map(|(b, _)| match b {
            IpAddr::V4(a) => Some(*a),
            _ => None,
        })
        .collect();
    let v6: Vec<std::net::Ipv6Addr> = r
        .relay_v6
        .iter()
        .filter_map(|(b, _)| match b {
            IpAddr::V6(a) => Some(*a),
            _ => None,
        })
        .collect();
    let pair = |addr: IpAddr| -> anyhow::Result<(Socket, Socket)> {
        let recv = lookup::shared_socket(addr, cfg.io.socket_buffer).map_err(|e| {
            anyhow::anyhow!("io.relay_sockets = shared: receiving socket on {addr}: {e}")
        })?;
        let raw = lookup::raw_socket(addr.is_ipv6(), cfg.io.socket_buffer).map_err(|e| {
            anyhow::anyhow!("io.relay_sockets = shared: raw socket (needs CAP_NET_RAW): {e}")
        })?;
        Ok((recv, raw))
    };
    let mut socks = Vec::new();
    for _ in slices {
        socks.push(shard::SharedSockets {
            v4: v4.first().map(|a| pair((*a).into())).transpose()?,
            v6: v6.first().map(|a| pair((*a).into())).transpose()?,
        });
    }
    let fds4: Vec<_> = socks
        .iter()
        .filter_map(|s| s.v4.as_ref())
        .map(|(s, _)| s.as_raw_fd())
        .collect();
    let fds6: Vec<_> = socks
        .iter()
        .filter_map(|s| s.v6.as_ref())
        .map(|(s, _)| s.as_raw_fd())
        .collect();
    let steer = lookup::attach(&v4, &fds4, &v6, &fds6, slices).map_err(|e| {
        anyhow::anyhow!(
            "io.relay_sockets = shared: cannot attach the sk_lookup program (needs CAP_BPF and CAP_NET_ADMIN, Linux 5.9+): {e}"
        )
    })?;
    if let Some((lo, hi)) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
    {
        if lo <= r.port_max && r.port_min <= hi {
            tracing::warn!(
                relay_ports = %format!("{}-{}", r.port_min, r.port_max),
                ephemeral = %format!("{lo}-{hi}"),
                "shared relay sockets take every UDP datagram to the relay addresses on the relay ports, \
                 including replies to other programs' ephemeral ports there: move the relay range \
                 out of net.ipv4.ip_local_port_range or list it in ip_local_reserved_ports"
            );
        }
    }
    tracing::info!(
        shards = socks.len(),
        v4 = v4.len(),
        v6 = v6.len(),
        "shared relay sockets steered"
    );
    Ok((socks.into_iter().map(Some).collect(), Some(steer)))
}

/// Open one listener socket of a reuseport group.
fn listener(addr: SocketAddr, buffer: usize) -> std::io::Result<Socket> {
    let s = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM.cloexec(),
        Some(Protocol::UDP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    if buffer > 0 {
        // The forced variants ignore rmem_max/wmem_max but need CAP_NET_ADMIN; fall back.
        if s.set_recv_buffer_size(buffer).is_ok() {
            force_buffer(&s, libc::SO_RCVBUFFORCE, buffer);
        }
        if s.set_send_buffer_size(buffer).is_ok() {
            force_buffer(&s, libc::SO_SNDBUFFORCE, buffer);
        }
    }
    s.bind(&addr.into())?;
    Ok(s)
}

fn force_buffer(s: &Socket, opt: libc::c_int, size: usize) {
    let v = size as libc::c_int;
    // SAFETY: setting an int socket option from a local.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            opt,
            &v as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// Addresses configured on this host's interfaces (for the own-address policy rule).
pub fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut ifa: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list we walk and free.
    unsafe {
        if libc::getifaddrs(&mut ifa) != 0 {
            return out;
        }
        let mut p = ifa;
        while !p.is_null() {
            let a = (*p).ifa_addr;
            if !a.is_null() {
                let fam = (*a).sa_family as i32;
                if fam == libc::AF_INET || fam == libc::AF_INET6 {
                    let ss = &*(a as *const libc::sockaddr_storage);
                    if let Some(sa) = io::sockaddr_to_std(ss) {
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

/// Authentication settings for every shard. The nonce key is kept across reloads so that
/// outstanding nonces stay valid.
pub fn build_auth(cfg: &Config, nonce_key: [u8; 32], identities: bool) -> Arc<AuthConfig> {
    let mut auth = AuthConfig::new(&cfg.turn.realm, nonce_key);
    for u in &cfg.turn.users {
        auth.add_user(&u.name, &u.password);
    }
    auth.rest_secrets = cfg
        .turn
        .rest_secrets
        .iter()
        .map(|s| s.as_bytes().into())
        .collect();
    auth.identities = identities && cfg.turn.identity_credentials;
    auth.nonce_lifetime = cfg.turn.nonce_lifetime as u64;
    Arc::new(auth)
}

/// The peer policy. `relay_ports` is the live bitmap of allocated relay ports, shared with the
/// previous policy across reloads.
pub fn build_policy(cfg: &Config, r: &Resolved, relay_ports: Arc<RelayPortSet>) -> Arc<PeerPolicy> {
    let mut policy = PeerPolicy::new(r.allow.clone(), r.deny.clone());
    policy.relay_ports = relay_ports;
    let mut own: Vec<IpAddr> = interface_addresses();
    own.extend(r.listen.iter().map(|a| a.ip()));
    for list in [&r.relay_v4, &r.relay_v6] {
        for (i, (bind, adv)) in list.iter().enumerate() {
            own.push(*bind);
            own.push(*adv);
            policy.relay_ips.push((*adv, i as u8));
            if bind != adv {
                policy.relay_ips.push((*bind, i as u8));
            }
        }
    }
    own.sort();
    own.dedup();
    policy.own_ips = own;
    let mut ports: Vec<u16> = r.listen.iter().map(|a| a.port()).collect();
    ports.push(cfg.http.listen.port());
    ports.sort();
    ports.dedup();
    policy.service_ports = ports;
    Arc::new(policy)
}

/// Everything that survives a live reload.
struct Shared {
    nonce_key: [u8; 32],
    identities: bool,
    relay_ports: Arc<RelayPortSet>,
    quotas: Arc<Quotas>,
    slices: Vec<(u16, u16)>,
}

impl Shared {
    fn turn_config(
        &self,
        cfg: &Config,
        r: &Resolved,
        shard: usize,
        auth: &Arc<AuthConfig>,
        policy: &Arc<PeerPolicy>,
    ) -> TurnConfig {
        let mut turn = TurnConfig::new(auth.clone(), policy.clone(), self.quotas.clone());
        turn.relay_v4 = r.relay_v4.iter().map(|(_, adv)| *adv).collect();
        turn.relay_v6 = r.relay_v6.iter().map(|(_, adv)| *adv).collect();
        turn.port_min = self.slices[shard].0;
        turn.port_max = self.slices[shard].1;
        turn.default_lifetime = cfg.turn.default_lifetime;
        turn.max_lifetime = cfg.turn.max_lifetime;
        turn.permission_lifetime = cfg.turn.permission_lifetime;
        turn.channel_lifetime = cfg.turn.channel_lifetime;
        turn.max_permissions = cfg.turn.max_permissions_per_allocation;
        turn.max_bytes_per_sec = cfg.turn.max_bytes_per_sec;
        turn.challenges_per_source = cfg.turn.challenges_per_source_per_sec;
        turn.identity_lookups_per_source = cfg.turn.identity_lookups_per_source_per_sec;
        turn.channel_max = if cfg.turn.rfc5766_channel_range {
            0x7FFF
        } else {
            crate::stun::channel::MAX
        };
        turn
    }
}

impl DataPlane {
    /// Open every socket and start the shards. Sockets are bound here, on the calling thread,
    /// so that errors (address in use, permission) are reported before anything runs.
    /// `shard_stats` holds one entry per shard (see [`DataPlane::new_stats`]); they are
    /// created before the data plane so the control thread can export them from the start.
    pub fn start(
        cfg: &Config,
        r: &Resolved,
        resolver: Option<Arc<dyn IdentityResolver>>,
        shard_stats: Vec<Arc<ShardStats>>,
    ) -> anyhow::Result<DataPlane> {
        let n = r.shard_cores.len().max(1);
        anyhow::ensure!(shard_stats.len() == n, "one stats block per shard");
        let shared = Shared {
            nonce_key: rand::random(),
            identities: resolver.is_some(),
            relay_ports: Arc::new(RelayPortSet::new(r.relay_v4.len().max(r.relay_v6.len()))),
            quotas: Arc::new(Quotas::new(
                cfg.turn.max_allocations,
                cfg.turn.max_allocations_per_user,
            )),
            slices: port_slices(r.port_min, r.port_max, n),
        };
        let auth = build_auth(cfg, shared.nonce_key, shared.identities);
        let policy = build_policy(cfg, r, shared.relay_ports.clone());
        let mut per_shard: Vec<Vec<Socket>> = (0..n).map(|_| Vec::new()).collect();
        for addr in &r.listen {
            for (i, sockets) in per_shard.iter_mut().enumerate() {
                let s = listener(*addr, cfg.io.socket_buffer)
                    .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
                if i == 0 && n > 1 && cfg.io.steering == "cbpf" {
                    if let Err(e) = steer::attach(s.as_raw_fd(), n as u32, addr.is_ipv6()) {
                        tracing::warn!(%addr, error = %e, "reuseport steering program not attached; using the kernel hash");
                    }
                }
                sockets.push(s);
            }
        }
        let (mut shared_relay, steer) = if cfg.io.relay_sockets == "shared" {
            shared_relay_sockets(cfg, r, &shared.slices)?
        } else {
            (Vec::new(), None)
        };
        let mut shards = Vec::new();
        let mut all_stats = Vec::new();
        for (i, listeners) in per_shard.into_iter().enumerate() {
            let turn = shared.turn_config(cfg, r, i, &auth, &policy);
            let (tx, rx) = crossbeam_channel::unbounded();
            let waker = Arc::new(io::Waker::new()?);
            let stats = shard_stats[i].clone();
            let setup = ShardSetup {
                id: i,
                core: if cfg.cores.pin {
                    r.shard_cores.get(i).copied()
                } else {
                    None
                },
                listeners,
                turn,
                bind_v4: r.relay_v4.iter().map(|(b, _)| *b).collect(),
                bind_v6: r.relay_v6.iter().map(|(b, _)| *b).collect(),
                batch: cfg.io.batch,
                socket_buffer: cfg.io.socket_buffer,
                relay_socket_pool: cfg.io.relay_socket_pool,
                coalesce_us: cfg.io.coalesce_us,
                rx,

                self_tx: tx.clone(),
                waker: waker.clone(),
                stats: stats.clone(),
                resolver: resolver.clone(),
                warn_per_sec: cfg.log.warn_per_sec,
                uring: cfg.io.backend == "io_uring",
                shared_relay: shared_relay.get_mut(i).and_then(Option::take),
            };
            let thread = std::thread::Builder::new()
                .name(format!("actrix-shard-{i}"))
                .spawn(move || shard::run(setup))?;
            shards.push(ShardHandle {
                tx,
                waker,
                thread: Some(thread),
            });
            all_stats.push(stats);
        }
        Ok(DataPlane {
            shards,
            _steer: steer,
            shared,
            stats: all_stats,
            listen: r.listen.clone(),
        })
    }

    /// Counters for `r`'s shards, to pass to [`DataPlane::start`] and to the metrics exporter.
    pub fn new_stats(r: &Resolved) -> Vec<Arc<ShardStats>> {
        (0..r.shard_cores.len().max(1))
            .map(|_| Arc::new(ShardStats::default()))
            .collect()
    }

    fn send(&self, f: impl Fn() -> ShardMsg) {
        for s in &self.shards {
            if s.tx.send(f()).is_ok() {
                s.waker.wake();
            }
        }
    }

    /// Stop granting allocations on every shard.
    pub fn drain(&self) {
        self.send(|| ShardMsg::Drain);
    }

    /// Apply a new, validated configuration to every shard without dropping allocations:
    /// users, REST secrets, quotas, peer ranges, lifetimes. Settings that need new sockets or
    /// threads (listeners, relay addresses, port range, cores) are returned as notes and keep
    /// their old values.
    pub fn reload(&self, old: (&Config, &Resolved), cfg: &Config, r: &Resolved) -> Vec<String> {
        let mut needs_restart = Vec::new();
        if old.1.listen != r.listen {
            needs_restart.push("stun.listen");
        }
        if old.1.relay_v4 != r.relay_v4 || old.1.relay_v6 != r.relay_v6 {
            needs_restart.push("turn.relay_addresses/advertised_addresses");
        }
        if (old.1.port_min, old.1.port_max) != (r.port_min, r.port_max) {
            needs_restart.push("turn.relay_port_range");
        }
        if old.1.shard_cores != r.shard_cores || old.1.control_core != r.control_core {
            needs_restart.push("cores");
        }
        if old.0.http.listen != cfg.http.listen {
            needs_restart.push("http.listen");
        }
        if old.0.turn.realm != cfg.turn.realm {
            needs_restart.push("turn.realm");
        }
        // Values that need new sockets keep the running ones.
        let effective = Resolved {
            listen: old.1.listen.clone(),
            relay_v4: old.1.relay_v4.clone(),
            relay_v6: old.1.relay_v6.clone(),
            port_min: old.1.port_min,
            port_max: old.1.port_max,
            shard_cores: old.1.shard_cores.clone(),
            control_core: old.1.control_core,
            allow: r.allow.clone(),
            deny: r.deny.clone(),
        };
        let mut cfg = cfg.clone();
        cfg.turn.realm = old.0.turn.realm.clone();
        cfg.http.listen = old.0.http.listen;
        self.shared
            .quotas
            .set_limits(cfg.turn.max_allocations, cfg.turn.max_allocations_per_user);
        let auth = build_auth(&cfg, self.shared.nonce_key, self.shared.identities);
        let policy = build_policy(&cfg, &effective, self.shared.relay_ports.clone());
        for (i, s) in self.shards.iter().enumerate() {
            let turn = self.shared.turn_config(&cfg, &effective, i, &auth, &policy);
            if s.tx.send(ShardMsg::Reconfigure(Box::new(turn))).is_ok() {
                s.waker.wake();
            }
        }
        needs_restart
            .into_iter()
            .map(|k| format!("{k}: changed, takes effect after a restart"))
            .collect()
    }

    /// Allocations currently active across shards (as last published).
    pub fn allocations(&self) -> u64 {
        self.stats
            .iter()
            .map(|s| {
                s.allocations_active
                    .load(std::sync::atomic::Ordering::Relaxed)
            })
            .sum()
    }

    /// Stop every shard and wait for the threads.
    pub fn stop(mut self) {
        self.send(|| ShardMsg::Stop);
        for s in &mut self.shards {
            if let Some(t) = s.thread.take() {
                let _ = t.join();
            }
        }
    }
}
