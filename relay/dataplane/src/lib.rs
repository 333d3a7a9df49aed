//! actrix-dataplane: the data plane of the actrix appliance: one pinned shard per configured
//! core, each driving its own TURN core ([`actrix_proto::turn::Server`]).
//!
//! Each shard owns a socket on every listen address (all shards' sockets form one
//! SO_REUSEPORT group per address, steered by [`steer`]), a contiguous slice of the relay port
//! range (port → shard is [`actrix_proto::plan::shard_of_port`]), its relay sockets
//! ([`relays`]) and its TURN core. Shards share nothing mutable on the per-packet path; the
//! only cross-shard state is the [`actrix_proto::turn::CrossShard`] handle (quotas and the
//! bitmap of allocated relay ports), touched on allocate and free.
//!
//! Layout: [`shard`] is the shard core every backend drives (messages, timers, identity
//! answers, relay-socket commands, counters, pacing, drain); a backend only waits for
//! readiness, receives a batch and sends a batch: [`mmsg`] (epoll + recvmmsg/sendmmsg, the
//! default), [`uring`] (io_uring multishot receives, batched sends) and [`glommio`] (a glommio
//! executor per shard). The system calls themselves live in `actrix-udp`.
//!
//! What is deliberately not here: configuration files, metrics exposition, HTTP, the control
//! plane (reached only through the identity channels of [`IdentityLinks`]).

pub mod batch;
pub mod config;
pub mod dtls;
pub mod glommio;
pub mod lookup;
pub mod mmsg;
pub mod pacer;
pub mod relays;
pub mod shard;
pub mod stats;
pub mod steer;
pub mod streams;
pub mod token;
pub mod uring;

pub use config::{Backend, IoConfig, IoSettings, Mode, RelaySocketMode, Steering};

use actrix_proto::auth::{IdentityAnswer, IdentityRequest};
use actrix_proto::plan::ShardId;
use actrix_proto::turn::{CrossShard, TurnConfig};
use actrix_udp::Waker;
use relays::RelaySockets;
use shard::{ShardCore, ShardMsg, ShardSetup};
use socket2::Socket;
use stats::ShardStats;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::thread::JoinHandle;

/// The data plane's side of the identity exchange with the control thread: requests go out
/// on one bounded channel (the control thread's event loop awaits it), answers come back on
/// one channel per shard (the shard reads it at the start of each round; the client's
/// retransmission brings the round in which the answer is used).
pub struct IdentityLinks {
    pub requests: tokio::sync::mpsc::Sender<IdentityRequest>,
    /// One per shard, in shard order.
    pub answers: Vec<crossbeam_channel::Receiver<IdentityAnswer>>,
}

/// One shard's link (see [`IdentityLinks`]).
pub struct IdentityLink {
    pub requests: tokio::sync::mpsc::Sender<IdentityRequest>,
    pub answers: crossbeam_channel::Receiver<IdentityAnswer>,
}

/// One shard of the plan.
pub struct ShardSpec {
    /// The core to pin it to (`None`: not pinned).
    pub core: Option<usize>,
    /// Its TURN core's configuration; `port_min..=port_max` is its slice of the relay range.
    pub turn: TurnConfig,
}

/// Everything the data plane is started with.
pub struct DataPlaneSpec {
    pub io: IoSettings,
    /// UDP listen addresses (TURN listener indices 0..).
    pub listen: Vec<SocketAddr>,
    /// Stream listen addresses and their transports (TURN listener indices after the UDP
    /// ones, in this order).
    pub listen_streams: Vec<(SocketAddr, actrix_proto::turn::Transport)>,
    pub streams: streams::StreamSettings,
    /// The TLS configuration for TLS listeners (required when there are any).
    pub tls: Option<Arc<rustls::ServerConfig>>,
    /// DTLS listen addresses (UDP; TURN listener indices after the stream ones).
    pub listen_dtls: Vec<SocketAddr>,
    /// The certificate for DTLS listeners (required when there are any).
    pub dtls: Option<dtls::DtlsCertificate>,
    /// Addresses relay sockets bind to, per family, in the order of the TURN core's relay
    /// addresses (which are the advertised ones).
    pub bind_v4: Vec<IpAddr>,
    pub bind_v6: Vec<IpAddr>,
    pub shards: Vec<ShardSpec>,
    pub shared: Arc<CrossShard>,
    /// One per shard (see [`DataPlane::new_stats`]), created first so the control thread can
    /// export them from the start.
    pub stats: Vec<Arc<ShardStats>>,
    pub warn_per_sec: u32,
    pub identity: Option<IdentityLinks>,
}

/// Why the data plane did not start.
#[derive(Debug)]
pub struct StartError(pub String);

impl std::fmt::Display for StartError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for StartError {}

fn fail(m: impl Into<String>) -> StartError {
    StartError(m.into())
}

struct ShardHandle {
    tx: crossbeam_channel::Sender<ShardMsg>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

/// The running data plane.
pub struct DataPlane {
    shards: Vec<ShardHandle>,
    /// The sk_lookup program of shared relay sockets, attached while the data plane lives.
    _steer: Option<lookup::PortSteer>,
    pub stats: Vec<Arc<ShardStats>>,
    pub listen: Vec<SocketAddr>,
}

/// What the glommio backend needs of RLIMIT_MEMLOCK, as an error for `actrix check` and the
/// start, or `None` when the limit is enough (or another backend runs).
pub fn memlock_problem(io: &IoSettings) -> Option<String> {
    if io.backend != Backend::Glommio {
        return None;
    }
    let have = glommio::memlock_limit();
    (have < glommio::MIN_MEMLOCK).then(|| {
        format!(
            "io.backend = glommio needs RLIMIT_MEMLOCK of at least {} KiB for its io_uring rings, \
             and this process has {} KiB: raise it (systemd: LimitMEMLOCK=, which the unit sets; \
             a shell: ulimit -l) or choose another io.backend",
            glommio::MIN_MEMLOCK / 1024,
            have / 1024
        )
    })
}

impl DataPlane {
    /// Open every socket and start the shards. Sockets are bound here, on the calling thread,
    /// so that errors (address in use, permission) are reported before anything runs.
    pub fn start(spec: DataPlaneSpec) -> Result<DataPlane, StartError> {
        let n = spec.shards.len();
        if n == 0 || spec.stats.len() != n {
            return Err(fail("one stats block per shard, at least one shard"));
        }
        if let Some(e) = memlock_problem(&spec.io) {
            return Err(fail(e));
        }
        if spec.io.backend == Backend::Glommio {
            let want = 3 * spec.io.glommio_io_memory as u64 * n as u64;
            let have = glommio::memlock_limit();
            if have < want {
                tracing::warn!(
                    memlock_kib = have / 1024,
                    wanted_kib = want / 1024,
                    "RLIMIT_MEMLOCK is below 3 x io.glommio_io_memory per shard: glommio runs \
                     without registered buffers"
                );
            }
        }
        if let Some(links) = &spec.identity {
            if links.answers.len() != n {
                return Err(fail("one identity answer channel per shard"));
            }
        }
        let slices: Vec<(u16, u16)> = spec
            .shards
            .iter()
            .map(|s| (s.turn.port_min, s.turn.port_max))
            .collect();
        let mut per_shard: Vec<Vec<Socket>> = (0..n).map(|_| Vec::new()).collect();
        for addr in &spec.listen {
            for (i, sockets) in per_shard.iter_mut().enumerate() {
                let s = udp_listener(&spec, *addr, i == 0)
                    .map_err(|e| fail(format!("cannot listen on {addr}: {e}")))?;
                sockets.push(s);
            }
        }
        let mut stream_listeners: Vec<Vec<streams::StreamListener>> =
            (0..n).map(|_| Vec::new()).collect();
        for (j, (addr, transport)) in spec.listen_streams.iter().enumerate() {
            for l in stream_listeners.iter_mut() {
                let sock = tcp_listener(*addr).map_err(|e| {
                    fail(format!("cannot listen on {} {addr}: {e}", transport.name()))
                })?;
                l.push(streams::StreamListener {
                    sock,
                    listener: (spec.listen.len() + j) as u8,
                    transport: *transport,
                });
            }
        }
        if spec.tls.is_none()
            && spec
                .listen_streams
                .iter()
                .any(|(_, t)| *t == actrix_proto::turn::Transport::Tls)
        {
            return Err(fail("a TLS listener needs a TLS configuration"));
        }
        if spec.dtls.is_none() && !spec.listen_dtls.is_empty() {
            return Err(fail("a DTLS listener needs a certificate"));
        }
        let first_dtls = spec.listen.len() + spec.listen_streams.len();
        if first_dtls + spec.listen_dtls.len() > 255 {
            return Err(fail("more than 255 listeners in all"));
        }
        let mut dtls_listeners: Vec<Vec<dtls::DtlsListener>> = (0..n).map(|_| Vec::new()).collect();
        for (k, addr) in spec.listen_dtls.iter().enumerate() {
            for (i, l) in dtls_listeners.iter_mut().enumerate() {
                // Steered like the UDP listeners: an association lives on one shard, so its
                // 5-tuple must keep landing there.
                let sock = udp_listener(&spec, *addr, i == 0)
                    .map_err(|e| fail(format!("cannot listen on dtls {addr}: {e}")))?;
                l.push(dtls::DtlsListener {
                    sock,
                    listener: (first_dtls + k) as u8,
                });
            }
        }
        let stream_limits = Arc::new(streams::StreamLimits::default());
        let (mut relays, steer) = match spec.io.relay_sockets {
            RelaySocketMode::Shared => {
                let (r, s) = shared_relay_sockets(&spec, &slices)?;
                (r, Some(s))
            }
            RelaySocketMode::PerAllocation => (
                slices
                    .iter()
                    .map(|&slice| {
                        Some(RelaySockets::per_allocation(
                            spec.bind_v4.clone(),
                            spec.bind_v6.clone(),
                            slice,
                            spec.io.socket_buffer,
                        ))
                    })
                    .collect(),
                None,
            ),
        };
        let mut answers: Vec<Option<crossbeam_channel::Receiver<IdentityAnswer>>> =
            match &spec.identity {
                Some(l) => l.answers.iter().cloned().map(Some).collect(),
                None => (0..n).map(|_| None).collect(),
            };
        if n > 256 {
            // RFC 6062 connection ids carry the shard in one byte.
            return Err(fail("at most 256 shards"));
        }
        let mut inboxes = Vec::new();
        let mut siblings = Vec::new();
        for _ in 0..n {
            let (tx, rx) = crossbeam_channel::unbounded();
            let waker = Arc::new(Waker::new().map_err(|e| fail(format!("shard waker: {e}")))?);
            siblings.push((tx, waker));
            inboxes.push(rx);
        }
        let siblings: Arc<[(crossbeam_channel::Sender<ShardMsg>, Arc<Waker>)]> = siblings.into();
        let mut inboxes = inboxes.into_iter();
        let mut shards = Vec::new();
        let mut stream_listeners = stream_listeners.into_iter();
        let mut dtls_listeners = dtls_listeners.into_iter();
        for (i, (listeners, shard)) in per_shard.into_iter().zip(spec.shards).enumerate() {
            let rx = inboxes.next().expect("one per shard");
            let (tx, waker) = siblings[i].clone();
            let id = ShardId(i as u16);
            let identity = match (&spec.identity, answers[i].take()) {
                (Some(l), Some(answers)) => Some(IdentityLink {
                    requests: l.requests.clone(),
                    answers,
                }),
                _ => None,
            };
            let setup = ShardSetup {
                id,
                core: shard.core,
                listeners,
                stream_listeners: stream_listeners.next().unwrap_or_default(),
                stream_settings: spec.streams.clone(),
                stream_limits: stream_limits.clone(),
                tls: spec.tls.clone(),
                dtls_listeners: dtls_listeners.next().unwrap_or_default(),
                dtls: spec.dtls.clone(),
                turn: shard.turn,
                shared: spec.shared.clone(),
                relays: relays[i].take().expect("one per shard"),
                batch: spec.io.batch,
                coalesce_us: spec.io.coalesce_us,
                glommio_io_memory: spec.io.glommio_io_memory,
                inbox: rx,
                waker: waker.clone(),
                siblings: siblings.clone(),
                stats: spec.stats[i].clone(),
                identity,
                warn_per_sec: spec.warn_per_sec,
                seed: rand::random(),
            };
            let backend = spec.io.backend;
            let thread = std::thread::Builder::new()
                .name(format!("actrix-shard-{i}"))
                .spawn(move || run_shard(setup, backend))
                .map_err(|e| fail(format!("cannot start shard {i}: {e}")))?;
            shards.push(ShardHandle {
                tx,
                waker,
                thread: Some(thread),
            });
        }
        Ok(DataPlane {
            shards,
            _steer: steer,
            stats: spec.stats,
            listen: spec.listen,
        })
    }

    /// Counters for `n` shards, to pass to [`DataPlane::start`] and to the metrics exporter.
    pub fn new_stats(n: usize) -> Vec<Arc<ShardStats>> {
        (0..n.max(1))
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

    /// Every shard's allocations (the session admin), each shard asked by message: the shards
    /// own them. A shard that does not answer within `wait` is left out.
    pub fn sessions(&self, wait: std::time::Duration) -> Vec<actrix_proto::turn::Session> {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.send(|| ShardMsg::Sessions(tx.clone()));
        drop(tx);
        let deadline = std::time::Instant::now() + wait;
        let mut all = Vec::new();
        for _ in &self.shards {
            match rx.recv_deadline(deadline) {
                Ok(v) => all.extend(v),
                Err(_) => break,
            }
        }
        all
    }

    /// End the allocations `which` names on every shard; how many ended (answers within
    /// `wait`).
    pub fn disconnect(
        &self,
        which: &actrix_proto::turn::Disconnect,
        wait: std::time::Duration,
    ) -> usize {
        let (tx, rx) = crossbeam_channel::unbounded();
        self.send(|| ShardMsg::Disconnect(which.clone(), tx.clone()));
        drop(tx);
        let deadline = std::time::Instant::now() + wait;
        let mut n = 0;
        for _ in &self.shards {
            match rx.recv_deadline(deadline) {
                Ok(k) => n += k,
                Err(_) => break,
            }
        }
        n
    }

    /// Give every shard its new configuration (one per shard, in order) without dropping
    /// allocations.
    pub fn reconfigure(&self, turns: Vec<TurnConfig>) {
        for (s, turn) in self.shards.iter().zip(turns) {
            if s.tx.send(ShardMsg::Reconfigure(Box::new(turn))).is_ok() {
                s.waker.wake();
            }
        }
    }

    /// Use `tls` for TLS connections accepted from now on (a renewed certificate).
    pub fn set_tls(&self, tls: Arc<rustls::ServerConfig>) {
        for s in &self.shards {
            if s.tx.send(ShardMsg::Tls(tls.clone())).is_ok() {
                s.waker.wake();
            }
        }
    }

    /// Use `cert` for DTLS handshakes from now on (a renewed certificate).
    pub fn set_dtls(&self, cert: dtls::DtlsCertificate) {
        self.send(|| ShardMsg::Dtls(cert.clone()));
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

/// One UDP listening socket of a shard's SO_REUSEPORT group; the group's first (`first`)
/// carries the CBPF steering program that keeps a client's 5-tuple on one shard.
fn udp_listener(spec: &DataPlaneSpec, addr: SocketAddr, first: bool) -> std::io::Result<Socket> {
    let opts = actrix_udp::UdpOptions {
        reuse_port: true,
        recv_buffer: spec.io.socket_buffer,
        send_buffer: spec.io.socket_buffer,
        force_buffers: true,
        orig_dst: false,
    };
    let s = actrix_udp::udp_socket(addr, &opts)?;
    let n = spec.shards.len();
    if first && n > 1 && spec.io.steering != Steering::Kernel {
        let ip_only = spec.io.steering == Steering::CbpfIp;
        if let Err(e) = steer::attach(s.as_raw_fd(), n as u32, addr.is_ipv6(), ip_only) {
            tracing::warn!(%addr, error = %e, "reuseport steering program not attached; using the kernel hash");
        }
    }
    Ok(s)
}

/// One listening TCP socket of a shard's SO_REUSEPORT group (non-blocking, close-on-exec,
/// IPv6-only for an IPv6 address).
fn tcp_listener(addr: SocketAddr) -> std::io::Result<Socket> {
    use socket2::{Domain, Protocol, Type};
    let s = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.cloexec(),
        Some(Protocol::TCP),
    )?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(s)
}

/// A shard's thread: the configured backend, falling back to mmsg when the kernel refuses
/// io_uring or glommio cannot start.
fn run_shard(setup: ShardSetup, backend: Backend) {
    let (id, pin) = (setup.id, setup.core);
    match backend {
        Backend::Glommio => {
            // glommio pins the thread itself (its placement).
            let core = ShardCore::new(setup);
            if let Err(b) = glommio::run(core, pin) {
                let (e, core) = *b;
                tracing::warn!(shard = %id, error = %e, "glommio unavailable; using recvmmsg/sendmmsg");
                shard::pin(id, pin);
                mmsg::run(core);
            }
        }
        Backend::IoUring => {
            shard::pin(id, pin);
            let core = ShardCore::new(setup);
            if let Err(b) = uring::run(core) {
                let (e, core) = *b;
                tracing::warn!(shard = %id, error = %e, "io_uring unavailable; using recvmmsg/sendmmsg");
                mmsg::run(core);
            }
        }
        Backend::Mmsg => {
            shard::pin(id, pin);
            mmsg::run(ShardCore::new(setup));
        }
    }
}

/// Shared relay sockets (`io.relay_sockets = "shared"`): per shard and family a receiving and
/// a raw sending socket, and the program that steers the relay addresses' port slices to them.
fn shared_relay_sockets(
    spec: &DataPlaneSpec,
    slices: &[(u16, u16)],
) -> Result<(Vec<Option<RelaySockets>>, lookup::PortSteer), StartError> {
    let v4: Vec<Ipv4Addr> = spec
        .bind_v4
        .iter()
        .filter_map(|b| match b {
            IpAddr::V4(a) => Some(*a),
            _ => None,
        })
        .collect();
    let v6: Vec<Ipv6Addr> = spec
        .bind_v6
        .iter()
        .filter_map(|b| match b {
            IpAddr::V6(a) => Some(*a),
            _ => None,
        })
        .collect();
    let buffer = spec.io.socket_buffer;
    let mut shards = Vec::new();
    let (mut fds4, mut fds6) = (Vec::new(), Vec::new());
    for &slice in slices {
        let f4 = v4
            .first()
            .map(|a| relays::shared_family((*a).into(), buffer))
            .transpose()
            .map_err(|e| fail(e.to_string()))?;
        let f6 = v6
            .first()
            .map(|a| relays::shared_family((*a).into(), buffer))
            .transpose()
            .map_err(|e| fail(e.to_string()))?;
        fds4.extend(f4.as_ref().map(|f| f.recv.as_raw_fd()));
        fds6.extend(f6.as_ref().map(|f| f.recv.as_raw_fd()));
        shards.push(Some(RelaySockets::shared(
            spec.bind_v4.clone(),
            spec.bind_v6.clone(),
            slice,
            f4,
            f6,
        )));
    }
    let steer = lookup::attach(&v4, &fds4, &v6, &fds6, slices).map_err(|e| {
        fail(format!(
            "io.relay_sockets = shared: cannot attach the sk_lookup program (needs CAP_BPF and CAP_NET_ADMIN, Linux 5.9+): {e}"
        ))
    })?;
    let (lo, hi) = (slices[0].0, slices[slices.len() - 1].1);
    if let Some((elo, ehi)) = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|t| {
            let mut it = t.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
    {
        if elo <= hi && lo <= ehi {
            tracing::warn!(
                relay_ports = %format!("{lo}-{hi}"),
                ephemeral = %format!("{elo}-{ehi}"),
                "shared relay sockets take every UDP datagram to the relay addresses on the relay ports, \
                 including replies to other programs' ephemeral ports there: move the relay range \
                 out of net.ipv4.ip_local_port_range or list it in ip_local_reserved_ports"
            );
        }
    }
    tracing::info!(
        shards = slices.len(),
        v4 = v4.len(),
        v6 = v6.len(),
        "shared relay sockets steered"
    );
    Ok((shards, steer))
}
