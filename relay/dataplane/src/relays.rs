//! The relay-socket strategy of a shard, as one type: a socket per allocation and family
//! ([`RelaySockets::PerAllocation`], indexed by relay port), or shared sockets per shard and
//! family steered by the sk_lookup program ([`RelaySockets::Shared`], no socket per
//! allocation). It carries out the TURN core's bind and release commands and tells the
//! backend which sockets to start or stop watching ([`Change`]); the backend never needs to
//! know which strategy runs.

use crate::lookup;
pub use crate::token::Change;
use crate::token::SocketId;
use actrix_proto::turn::{BindRequest, Family, RelayPort};
use socket2::Socket;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};

/// Where a datagram to a peer leaves from.
pub enum SendVia {
    /// An ordinary UDP socket bound to the relayed address.
    Socket(RawFd),
    /// The shard's raw socket: the caller writes IP and UDP headers from `src`:`port`.
    Raw(RawFd, IpAddr, u16),
}

/// One relay socket per (address, port) of the shard's slice and family.
pub struct PerAllocation {
    bind_v4: Vec<IpAddr>,
    bind_v6: Vec<IpAddr>,
    port_min: u16,
    span: usize,
    v4: Vec<Option<(Socket, u16)>>,
    v6: Vec<Option<(Socket, u16)>>,
    /// Generation of the socket last opened in each slot: a completion or event that names an
    /// older one is stale.
    generation: u16,
    socket_buffer: usize,
    bind_errors: u64,
    reused: u64,
    changes: Vec<Change>,
    /// Sockets released this round, closed once the backend stopped waiting on them.
    closing: Vec<Socket>,
}

/// A shard's shared relay sockets of one family: `recv` gets every datagram to its relayed
/// addresses (steered by [`crate::lookup`]), `raw` sends to peers with the relayed port as
/// source.
pub struct SharedFamily {
    pub recv: Socket,
    pub raw: Socket,
}

/// Shared relay sockets (`io.relay_sockets = "shared"`).
pub struct Shared {
    bind_v4: Vec<IpAddr>,
    bind_v6: Vec<IpAddr>,
    port_min: u16,
    port_max: u16,
    pub v4: Option<SharedFamily>,
    pub v6: Option<SharedFamily>,
}

/// The relay-socket strategy.
pub enum RelaySockets {
    PerAllocation(PerAllocation),
    Shared(Shared),
}

impl RelaySockets {
    /// Sockets per allocation on `bind_*` (indexes of the core's relay addresses), for the
    /// shard's port slice.
    pub fn per_allocation(
        bind_v4: Vec<IpAddr>,
        bind_v6: Vec<IpAddr>,
        slice: (u16, u16),
        socket_buffer: usize,
    ) -> Self {
        let span = (slice.1 - slice.0) as usize + 1;
        let n = span * bind_v4.len().max(bind_v6.len()).max(1);
        RelaySockets::PerAllocation(PerAllocation {
            bind_v4,
            bind_v6,
            port_min: slice.0,
            span,
            v4: (0..n).map(|_| None).collect(),
            v6: (0..n).map(|_| None).collect(),
            generation: 0,
            socket_buffer,
            bind_errors: 0,
            reused: 0,
            changes: Vec::with_capacity(64),
            closing: Vec::with_capacity(64),
        })
    }

    /// Shared sockets (already steered to this shard) for the shard's port slice.
    pub fn shared(
        bind_v4: Vec<IpAddr>,
        bind_v6: Vec<IpAddr>,
        slice: (u16, u16),
        v4: Option<SharedFamily>,
        v6: Option<SharedFamily>,
    ) -> Self {
        RelaySockets::Shared(Shared {
            bind_v4,
            bind_v6,
            port_min: slice.0,
            port_max: slice.1,
            v4,
            v6,
        })
    }

    /// Sockets the backend waits on from the start (the shared receiving sockets).
    pub fn initial(&self) -> Vec<(SocketId, RawFd)> {
        match self {
            RelaySockets::PerAllocation(_) => Vec::new(),
            RelaySockets::Shared(s) => [(Family::V4, &s.v4), (Family::V6, &s.v6)]
                .into_iter()
                .filter_map(|(f, sh)| {
                    sh.as_ref()
                        .map(|sh| (SocketId::Shared(f), sh.recv.as_raw_fd()))
                })
                .collect(),
        }
    }

    /// Whether datagrams arrive with their original destination (shared sockets).
    pub fn reports_destination(&self) -> bool {
        matches!(self, RelaySockets::Shared(_))
    }

    /// Carry out a [`BindRequest`]: every family it names, all or nothing.
    pub fn bind(&mut self, req: &BindRequest) -> bool {
        match self {
            RelaySockets::PerAllocation(p) => {
                if req.v4 && !p.bind(Family::V4, req.port) {
                    return false;
                }
                if req.v6 && !p.bind(Family::V6, req.port) {
                    if req.v4 {
                        p.release(Family::V4, req.port, false);
                    }
                    return false;
                }
                true
            }
            // The port is the core's to hand out; the steering program already covers it.
            RelaySockets::Shared(s) => {
                let fits = |list: &[IpAddr], on: bool| !on || (req.port.addr as usize) < list.len();
                fits(&s.bind_v4, req.v4)
                    && fits(&s.bind_v6, req.v6)
                    && (s.port_min..=s.port_max).contains(&req.port.port)
            }
        }
    }

    /// The local address relay sockets of (`family`, relay address index `addr`) bind to.
    pub fn bind_ip(&self, family: Family, addr: u8) -> Option<IpAddr> {
        let (v4, v6) = match self {
            RelaySockets::PerAllocation(p) => (&p.bind_v4, &p.bind_v6),
            RelaySockets::Shared(s) => (&s.bind_v4, &s.bind_v6),
        };
        match family {
            Family::V4 => v4.get(addr as usize).copied(),
            Family::V6 => v6.get(addr as usize).copied(),
        }
    }

    /// Carry out a release: keep the socket open for reuse, or close it.
    pub fn release(&mut self, family: Family, port: RelayPort, keep: bool) {
        if let RelaySockets::PerAllocation(p) = self {
            p.release(family, port, keep);
        }
    }

    /// The relay port a datagram arrived for: from the socket it came in on, or (shared
    /// sockets) from its original destination. `None` for a stale socket id.
    pub fn port_of(&self, id: SocketId, to: Option<SocketAddr>) -> Option<(Family, RelayPort)> {
        match (self, id) {
            (RelaySockets::PerAllocation(p), SocketId::Relay(family, idx, gen)) => {
                let slot = p.slots(family).get(idx as usize)?;
                match slot {
                    Some((_, g)) if *g == gen => Some((family, p.port_at(idx as usize))),
                    _ => None,
                }
            }
            (RelaySockets::Shared(s), SocketId::Shared(family)) => {
                let to = to?;
                let list = match family {
                    Family::V4 => &s.bind_v4,
                    Family::V6 => &s.bind_v6,
                };
                let addr = list.iter().position(|a| *a == to.ip())?;
                Some((family, RelayPort::new(addr as u8, to.port())))
            }
            _ => None,
        }
    }

    /// The descriptor of a socket the backend was told about, if it is still current.
    pub fn fd_of(&self, id: SocketId) -> Option<RawFd> {
        match (self, id) {
            (RelaySockets::PerAllocation(p), SocketId::Relay(family, idx, gen)) => {
                match p.slots(family).get(idx as usize)? {
                    Some((s, g)) if *g == gen => Some(s.as_raw_fd()),
                    _ => None,
                }
            }
            (RelaySockets::Shared(s), SocketId::Shared(f)) => {
                let sh = match f {
                    Family::V4 => s.v4.as_ref(),
                    Family::V6 => s.v6.as_ref(),
                };
                sh.map(|sh| sh.recv.as_raw_fd())
            }
            _ => None,
        }
    }

    /// Where a transmit from a relay port leaves (`None` for any other source).
    pub fn send_via_for(&self, t: &actrix_proto::turn::Transmit) -> Option<SendVia> {
        match t.src {
            actrix_proto::turn::Src::Relay(f, p) => self.send_via(f, p),
            _ => None,
        }
    }

    /// Where a datagram from relay port `port` to a peer leaves.
    pub fn send_via(&self, family: Family, port: RelayPort) -> Option<SendVia> {
        match self {
            RelaySockets::PerAllocation(p) => {
                let idx = p.index(port)?;
                p.slots(family)
                    .get(idx)?
                    .as_ref()
                    .map(|(s, _)| SendVia::Socket(s.as_raw_fd()))
            }
            RelaySockets::Shared(s) => {
                let (sh, list) = match family {
                    Family::V4 => (s.v4.as_ref()?, &s.bind_v4),
                    Family::V6 => (s.v6.as_ref()?, &s.bind_v6),
                };
                let src = *list.get(port.addr as usize)?;
                Some(SendVia::Raw(sh.raw.as_raw_fd(), src, port.port))
            }
        }
    }

    /// Whether [`RelaySockets::take_changes`] has anything to report.
    #[inline]
    pub fn has_changes(&self) -> bool {
        matches!(self, RelaySockets::PerAllocation(p) if !p.changes.is_empty())
    }

    /// Sockets opened or released since the last call, in order.
    #[inline]
    pub fn take_changes(&mut self, mut apply: impl FnMut(Change)) {
        if let RelaySockets::PerAllocation(p) = self {
            if !p.changes.is_empty() {
                for c in p.changes.drain(..) {
                    apply(c);
                }
            }
        }
    }

    /// Close the sockets released since the last call (after [`RelaySockets::take_changes`]
    /// told the backend).
    #[inline]
    pub fn close_released(&mut self) {
        if let RelaySockets::PerAllocation(p) = self {
            if !p.closing.is_empty() {
                p.closing.clear();
            }
        }
    }

    /// Binds the kernel refused, and kept sockets reused, so far.
    pub fn bind_errors(&self) -> u64 {
        match self {
            RelaySockets::PerAllocation(p) => p.bind_errors,
            RelaySockets::Shared(_) => 0,
        }
    }

    pub fn reused(&self) -> u64 {
        match self {
            RelaySockets::PerAllocation(p) => p.reused,
            RelaySockets::Shared(_) => 0,
        }
    }
}

impl PerAllocation {
    fn slots(&self, family: Family) -> &[Option<(Socket, u16)>] {
        match family {
            Family::V4 => &self.v4,
            Family::V6 => &self.v6,
        }
    }

    /// Position of a relay (address, port) in `v4`/`v6`.
    fn index(&self, port: RelayPort) -> Option<usize> {
        let off = port.port.checked_sub(self.port_min)? as usize;
        (off < self.span).then_some(port.addr as usize * self.span + off)
    }

    fn port_at(&self, idx: usize) -> RelayPort {
        RelayPort::new(
            (idx / self.span) as u8,
            self.port_min + (idx % self.span) as u16,
        )
    }

    fn bind(&mut self, family: Family, port: RelayPort) -> bool {
        let ip = match family {
            Family::V4 => self.bind_v4.get(port.addr as usize),
            Family::V6 => self.bind_v6.get(port.addr as usize),
        };
        let (Some(&ip), Some(idx)) = (ip, self.index(port)) else {
            return false;
        };
        let slot = match family {
            Family::V4 => &mut self.v4[idx],
            Family::V6 => &mut self.v6[idx],
        };
        if let Some((s, _)) = slot {
            // A socket kept open from an earlier allocation: drop whatever peers of that
            // allocation sent meanwhile, so none of it reaches the new one.
            actrix_udp::discard_pending(s.as_raw_fd());
            self.reused += 1;
            return true;
        }
        let opts = actrix_udp::UdpOptions {
            recv_buffer: self.socket_buffer / 4,
            ..Default::default()
        };
        match actrix_udp::udp_socket(SocketAddr::new(ip, port.port), &opts) {
            Ok(s) => {
                self.generation = self.generation.wrapping_add(1);
                let g = self.generation;
                let fd = s.as_raw_fd();
                *slot = Some((s, g));
                self.changes
                    .push(Change::Opened(SocketId::Relay(family, idx as u32, g), fd));
                true
            }
            Err(_) => {
                self.bind_errors += 1;
                false
            }
        }
    }

    fn release(&mut self, family: Family, port: RelayPort, keep: bool) {
        if keep {
            // Stays bound and read: stray datagrams meanwhile find no allocation and are
            // dropped as such.
            return;
        }
        let Some(idx) = self.index(port) else { return };
        let slot = match family {
            Family::V4 => &mut self.v4[idx],
            Family::V6 => &mut self.v6[idx],
        };
        if let Some((s, g)) = slot.take() {
            self.changes.push(Change::Closed(
                SocketId::Relay(family, idx as u32, g),
                s.as_raw_fd(),
            ));
            self.closing.push(s);
        }
    }
}

/// Per shard and family, a shared receiving socket and a raw sending socket (see
/// [`crate::lookup`]).
pub fn shared_family(addr: IpAddr, socket_buffer: usize) -> std::io::Result<SharedFamily> {
    let recv = lookup::shared_socket(addr, socket_buffer).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("io.relay_sockets = shared: receiving socket on {addr}: {e}"),
        )
    })?;
    let raw = lookup::raw_socket(addr.is_ipv6(), socket_buffer).map_err(|e| {
        std::io::Error::new(
            e.kind(),
            format!("io.relay_sockets = shared: raw socket (needs CAP_NET_RAW): {e}"),
        )
    })?;
    Ok(SharedFamily { recv, raw })
}
