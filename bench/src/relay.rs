//! Relay throughput and latency: N clients times M peers, ChannelData or Send/Data.
//!
//! Each client holds an allocation (TURN) and sends datagrams to every peer in turn; each
//! peer echoes what it receives to where it came from (the client's relayed address), so a
//! round trip crosses the server twice, out and back. Against the reference forwarder the
//! same datagrams carry the forward header instead of TURN framing.
//!
//! Clients reach the server over UDP, TCP or TLS (`transport`); peers are UDP either way. Over
//! a stream each client is one connection carrying its ChannelData (padded to 4 bytes) or
//! Send indications, `frames_per_write` of them per send, and the server's frames back.
//!
//! Payload: `[magic:4][tag:4][seq:8][send ns:8][padding]`. The tag changes every step so a
//! straggler from an earlier step is never counted.

use crate::load::{generator_limited, Ctx, Pacer, Probe, Progress, Window};
use crate::reference;
use crate::report::{Sample, ScenarioReport, StepReport};
use crate::scenario::{RelayMode, RelaySpec, Transport};
use crate::stats::{cpu_us_per_packet, loss, rate, Latency};
use crate::stream::{padded_channel_len, Fill};
use crate::sys::{self, Batch, Epoll};
use crate::target::{Target, TargetKind};
use crate::turn_client::{drive, DriveConfig, Link, LinkKind, Op, Session};
use actrix_proto::stun::{attr, channel, method, Class, Message, MessageWriter};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

pub const MIN_PAYLOAD: usize = 24;
const MAGIC: u32 = 0x4143_5458;
const BATCH: usize = 64;

/// A prebuilt datagram for one (client, peer) pair; the payload sits at `payload_off`.
struct Template {
    bytes: Vec<u8>,
    payload_off: usize,
}

struct Client {
    session: Session,
    templates: Vec<Template>,
    next_peer: usize,
    /// Stream: epoll waits for writability too.
    write_interest: bool,
    /// Stream: the connection failed or the server closed it; no more sends.
    dead: bool,
}

/// Everything one step measured.
#[derive(Debug, Default)]
pub struct StepStats {
    pub offered_pps: u64,
    pub secs: f64,
    pub sent: u64,
    pub peer_rx: u64,
    pub client_rx: u64,
    pub stale: u64,
    pub other_rx: u64,
    pub eagain: u64,
    pub send_errors: u64,
    /// Stream connections that failed or that the server closed during the step.
    pub stream_errors: u64,
    pub latency: Latency,
    pub series: Vec<Sample>,
    pub server_cpu: Option<f64>,
    pub gen_cpu: f64,
    pub wall: f64,
    pub limited: Option<String>,
}

impl StepStats {
    pub fn relayed(&self) -> u64 {
        self.peer_rx + self.client_rx
    }
    pub fn loss(&self) -> f64 {
        loss(self.sent, self.client_rx)
    }
    pub fn relayed_pps(&self) -> f64 {
        rate(self.relayed(), self.secs)
    }
    pub fn cpu_us_per_pkt(&self) -> Option<f64> {
        cpu_us_per_packet(self.server_cpu, self.relayed())
    }
    fn report(&self, max_loss: f64) -> StepReport {
        StepReport {
            offered_pps: self.offered_pps as f64,
            achieved_offered_pps: rate(self.sent, self.secs),
            relayed_pps: self.relayed_pps(),
            loss: self.loss(),
            p99_us: self.latency.quantile_us(0.99),
            server_cpu_us_per_pkt: self.cpu_us_per_pkt(),
            generator_limited: self.limited.is_some(),
            passed: self.loss() <= max_loss && self.client_rx > 0 && self.stream_errors == 0,
        }
    }
}

/// The payload of a datagram that came back to a client, whatever the framing.
pub fn client_payload(buf: &[u8], kind: TargetKind) -> Option<&[u8]> {
    match kind {
        TargetKind::Reference => {
            reference::read_header(buf)?;
            Some(&buf[reference::FWD_HEADER..])
        }
        TargetKind::Turn => {
            let b0 = *buf.first()?;
            if (0x40..=0x4F).contains(&b0) {
                let (_, len) = channel::parse(buf).ok()?;
                Some(&buf[4..4 + len])
            } else {
                let m = Message::parse(buf).ok()?;
                if m.method() == method::DATA && m.class() == Class::Indication {
                    m.get(attr::DATA)
                } else {
                    None
                }
            }
        }
    }
}

/// (tag, send ns) of one of our payloads.
pub fn parse_payload(p: &[u8]) -> Option<(u32, u64)> {
    if p.len() < MIN_PAYLOAD || p[0..4] != MAGIC.to_be_bytes() {
        return None;
    }
    let tag = u32::from_be_bytes([p[4], p[5], p[6], p[7]]);
    let mut t = [0u8; 8];
    t.copy_from_slice(&p[16..24]);
    Some((tag, u64::from_be_bytes(t)))
}

fn write_payload(p: &mut [u8], tag: u32, seq: u64, t_ns: u64) {
    p[0..4].copy_from_slice(&MAGIC.to_be_bytes());
    p[4..8].copy_from_slice(&tag.to_be_bytes());
    p[8..16].copy_from_slice(&seq.to_be_bytes());
    p[16..24].copy_from_slice(&t_ns.to_be_bytes());
}

fn template(
    kind: TargetKind,
    mode: RelayMode,
    ch: u16,
    peer: SocketAddr,
    payload: usize,
    stream: bool,
) -> Result<Template, String> {
    match (kind, mode) {
        (TargetKind::Reference, _) => {
            let mut b = vec![0u8; reference::FWD_HEADER + payload];
            if !reference::write_header(&mut b, peer) {
                return Err("the reference forwarder is IPv4 only".into());
            }
            Ok(Template {
                bytes: b,
                payload_off: reference::FWD_HEADER,
            })
        }
        (TargetKind::Turn, RelayMode::Channel) => {
            // Over a stream ChannelData is padded to a multiple of 4 (RFC 8656 §12.5); the
            // length field stays the payload's.
            let len = if stream {
                padded_channel_len(payload)
            } else {
                4 + payload
            };
            let mut b = vec![0u8; len];
            let mut h = [0u8; 4];
            channel::write_header(&mut h, ch, payload as u16);
            b[..4].copy_from_slice(&h);
            Ok(Template {
                bytes: b,
                payload_off: 4,
            })
        }
        (TargetKind::Turn, RelayMode::Send) => {
            let mut b = vec![0u8; 128 + payload];
            let tid = [0x5Au8; 12];
            let zeros = vec![0u8; payload];
            let mut w = MessageWriter::new(&mut b, method::SEND, Class::Indication, &tid)
                .map_err(|_| "send template".to_string())?;
            w.add_xor_addr(attr::XOR_PEER_ADDRESS, peer)
                .map_err(|_| "send template".to_string())?;
            let off = w.len() + 4;
            w.add(attr::DATA, &zeros)
                .map_err(|_| "send template".to_string())?;
            let n = w.finish();
            b.truncate(n);
            Ok(Template {
                bytes: b,
                payload_off: off,
            })
        }
    }
}

/// The sockets and allocations of a relay run.
pub struct Engine {
    kind: TargetKind,
    transport: Transport,
    frames_per_write: usize,
    clients: Vec<Client>,
    peers: Vec<UdpSocket>,
    payload: usize,
    ep: Epoll,
    sb: Batch,
    rb: Batch,
    tag: u32,
    seq: u64,
}

/// One offered-load step.
pub struct StepParams<'a> {
    /// Client datagrams/s; 0: keep `window` in flight.
    pub rate_pps: u64,
    pub window: usize,
    pub duration: Duration,
    /// How long to wait for stragglers after the last send.
    pub drain: Duration,
    pub probe: Probe,
    pub label: &'a str,
    /// Added to the time of the samples (steps of a search follow each other).
    pub t_offset: f64,
}

impl Engine {
    /// Open the peers, allocate for every client, permit every peer and (channel mode) bind
    /// one channel per peer. Every allocation must succeed.
    pub fn setup(target: &Target, spec: &RelaySpec, ctx: &Ctx) -> Result<Engine, String> {
        let server = target.addr_for(spec.transport)?;
        let link = LinkKind::for_transport(spec.transport, spec.tls_version)?;
        let bind = sys::local_bind_for(target.addr);
        let mut peers = Vec::with_capacity(spec.peers);
        for _ in 0..spec.peers {
            peers.push(sys::udp_socket(bind, 4 << 20).map_err(|e| format!("peer socket: {e}"))?);
        }
        let peer_addrs: Vec<SocketAddr> = peers
            .iter()
            .map(|p| p.local_addr().map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let creds = target
            .creds
            .as_ref()
            .map(|c| c.resolve(crate::target::unix_now()))
            .unwrap_or_default();
        if target.kind == TargetKind::Turn && target.creds.is_none() {
            return Err("TURN relay needs credentials (--user/--password or --rest-secret)".into());
        }
        let mut plan = Vec::new();
        if target.kind == TargetKind::Turn {
            plan.push(Op::Allocate);
            plan.push(Op::Permission(peer_addrs.clone()));
            if spec.mode == RelayMode::Channel {
                for (j, p) in peer_addrs.iter().enumerate() {
                    plan.push(Op::ChannelBind(channel::MIN + j as u16, *p));
                }
            }
        }
        let mut sessions = Vec::with_capacity(spec.clients);
        for i in 0..spec.clients {
            sessions.push(
                Session::with_link(
                    i as u32,
                    link.clone(),
                    server,
                    bind,
                    &creds.0,
                    &creds.1,
                    plan.clone(),
                )
                .map_err(|e| format!("client socket: {e}"))?,
            );
        }
        if !plan.is_empty() {
            let cfg = DriveConfig {
                concurrency: 32,
                rto: Duration::from_millis(500),
                attempts: 4,
                deadline: Instant::now() + Duration::from_secs(20),
                repeat: false,
                new_socket_per_cycle: false,
            };
            let mut p = Progress::new(ctx.progress);
            let res = drive(&mut sessions, &cfg, &mut |ok, bad| {
                p.tick(true, || {
                    format!("setting up allocations: {ok} ok, {bad} failed")
                })
            })
            .map_err(|e| format!("setup: {e}"))?;
            p.done();
            if res.failed > 0 {
                return Err(format!(
                    "setup: {} of {} clients failed: {:?}",
                    res.failed, spec.clients, res.reasons
                ));
            }
        }
        let mut clients = Vec::with_capacity(sessions.len());
        for s in sessions {
            let mut templates = Vec::with_capacity(peer_addrs.len());
            for (j, p) in peer_addrs.iter().enumerate() {
                templates.push(template(
                    target.kind,
                    spec.mode,
                    channel::MIN + j as u16,
                    *p,
                    spec.payload,
                    spec.transport.is_stream(),
                )?);
            }
            clients.push(Client {
                session: s,
                templates,
                next_peer: 0,
                write_interest: false,
                dead: false,
            });
        }
        let ep = Epoll::new(clients.len() + peers.len() + 1).map_err(|e| e.to_string())?;
        for (i, c) in clients.iter_mut().enumerate() {
            ep.add(c.session.link.fd(), i as u64)
                .map_err(|e| e.to_string())?;
            sync_write(&ep, c, i);
        }
        for (j, p) in peers.iter().enumerate() {
            ep.add(sys::raw(p), (clients.len() + j) as u64)
                .map_err(|e| e.to_string())?;
        }
        Ok(Engine {
            kind: target.kind,
            transport: spec.transport,
            frames_per_write: spec.frames_per_write.max(1),
            clients,
            peers,
            payload: spec.payload,
            ep,
            sb: Batch::new(BATCH),
            rb: Batch::new(BATCH),
            tag: std::process::id().rotate_left(16) ^ crate::target::unix_now() as u32,
            seq: 0,
        })
    }

    /// Offer the load of `p` for its duration, then wait up to its drain for stragglers.
    pub fn step(&mut self, p: &StepParams<'_>, progress: &mut Progress) -> StepStats {
        let StepParams {
            rate_pps,
            window,
            duration,
            drain,
            probe,
            label,
            t_offset,
        } = *p;
        self.tag = self.tag.wrapping_add(1);
        let tag = self.tag;
        let mut st = StepStats {
            offered_pps: rate_pps,
            ..Default::default()
        };
        let n_clients = self.clients.len();
        let mut ready = Vec::with_capacity(n_clients + self.peers.len());
        let win = Window::open(probe);
        let epoch = Instant::now();
        let mut pacer = Pacer::new(rate_pps, window as u64, epoch);
        let send_end = epoch + duration;
        let hard_end = send_end + drain;
        let mut next_client = 0usize;
        let sample_every = Duration::from_millis(250);
        let mut last = (epoch, 0u64, 0u64, 0u64);
        loop {
            let now = Instant::now();
            if now >= hard_end || (now >= send_end && st.client_rx >= pacer.sent) {
                break;
            }
            let mut capped = false;
            if now < send_end {
                let max = (BATCH * n_clients) as u64;
                let allow = pacer.allowance(now, max);
                capped = allow == max;
                let mut left = allow as usize;
                let mut visited = 0;
                while left > 0 && visited < n_clients {
                    let c = next_client;
                    next_client = (next_client + 1) % n_clients;
                    visited += 1;
                    let k = left.min(BATCH).min(left.div_ceil(n_clients - visited + 1));
                    let t_ns = epoch.elapsed().as_nanos() as u64;
                    let cl = &mut self.clients[c];
                    if let Link::Udp(sock) = &cl.session.link {
                        for i in 0..k {
                            let t = &cl.templates[cl.next_peer];
                            cl.next_peer = (cl.next_peer + 1) % cl.templates.len();
                            let len = t.bytes.len();
                            let slot = self.sb.slot_mut(i);
                            slot[..len].copy_from_slice(&t.bytes);
                            self.seq += 1;
                            write_payload(&mut slot[t.payload_off..], tag, self.seq, t_ns);
                            self.sb.set_out(i, len, None);
                        }
                        let o = self.sb.send(sock.as_raw_fd(), k);
                        pacer.on_sent(o.sent as u64);
                        st.eagain += o.eagain as u64;
                        st.send_errors += o.errors as u64;
                    } else {
                        let scratch = self.sb.slot_mut(0);
                        let (sent, refused) = stream_send(
                            cl,
                            k,
                            self.frames_per_write,
                            scratch,
                            &mut self.seq,
                            tag,
                            t_ns,
                        );
                        pacer.on_sent(sent as u64);
                        st.eagain += refused as u64;
                        if stream_flush(cl, &self.ep, c).is_err() {
                            st.stream_errors += 1;
                        }
                    }
                    left -= k;
                }
            }
            self.ep.wait_events(if capped { 0 } else { 1 }, &mut ready);
            for &(tok, events) in &ready {
                let tok = tok as usize;
                if tok < n_clients && self.clients[tok].session.link.udp().is_none() {
                    let cl = &mut self.clients[tok];
                    if events & libc::EPOLLOUT as u32 != 0
                        && stream_flush(cl, &self.ep, tok).is_err()
                    {
                        st.stream_errors += 1;
                        continue;
                    }
                    if events & !(libc::EPOLLOUT as u32) == 0 {
                        continue;
                    }
                    let now_ns = epoch.elapsed().as_nanos() as u64;
                    match stream_recv(cl, self.kind, tag, now_ns, &mut st) {
                        Ok(got) => pacer.on_acked(got, Instant::now()),
                        Err(()) => {
                            st.stream_errors += 1;
                            cl.dead = true;
                            self.ep.del(cl.session.link.fd());
                        }
                    }
                    continue;
                }
                if tok < n_clients {
                    let Some(fd) = self.clients[tok].session.link.udp().map(|s| s.as_raw_fd())
                    else {
                        continue;
                    };
                    for _ in 0..8 {
                        let n = self.rb.recv(fd, BATCH).unwrap_or(0);
                        let now_ns = epoch.elapsed().as_nanos() as u64;
                        let mut got = 0u64;
                        for i in 0..n {
                            match client_payload(self.rb.datagram(i), self.kind)
                                .and_then(parse_payload)
                            {
                                Some((t, sent_ns)) if t == tag => {
                                    got += 1;
                                    st.latency.record_ns(now_ns.saturating_sub(sent_ns));
                                }
                                Some(_) => st.stale += 1,
                                None => st.other_rx += 1,
                            }
                        }
                        st.client_rx += got;
                        pacer.on_acked(got, Instant::now());
                        if n < BATCH {
                            break;
                        }
                    }
                } else if let Some(p) = self.peers.get(tok - n_clients) {
                    let fd = sys::raw(p);
                    for _ in 0..8 {
                        let n = self.rb.recv(fd, BATCH).unwrap_or(0);
                        if n == 0 {
                            break;
                        }
                        st.peer_rx += n as u64;
                        for i in 0..n {
                            self.rb.set_echo(i);
                        }
                        let o = self.rb.send(fd, n);
                        st.eagain += o.eagain as u64;
                        st.send_errors += o.errors as u64;
                        if n < BATCH {
                            break;
                        }
                    }
                }
            }
            let now = Instant::now();
            if now.duration_since(last.0) >= sample_every {
                let dt = now.duration_since(last.0).as_secs_f64();
                st.series.push(Sample {
                    t: t_offset + now.duration_since(epoch).as_secs_f64(),
                    offered_pps: rate(pacer.sent - last.1, dt),
                    relayed_pps: rate(st.peer_rx + st.client_rx - last.2, dt),
                    completed_pps: rate(st.client_rx - last.3, dt),
                });
                last = (now, pacer.sent, st.peer_rx + st.client_rx, st.client_rx);
            }
            progress.tick(false, || {
                let e = epoch.elapsed().as_secs_f64().min(duration.as_secs_f64());
                format!(
                    "[{label}] offered {}/s: {:.1}s sent {} relayed {:.0}/s loss {:.3}% p50 {:.0}us p99 {:.0}us",
                    if rate_pps == 0 { "max".to_string() } else { rate_pps.to_string() },
                    e,
                    pacer.sent,
                    rate(st.peer_rx + st.client_rx, e),
                    loss(pacer.sent, st.client_rx) * 100.0,
                    st.latency.quantile_us(0.5),
                    st.latency.quantile_us(0.99)
                )
            });
        }
        let m = win.close();
        st.sent = pacer.sent;
        st.secs = duration.as_secs_f64();
        st.server_cpu = m.server_cpu;
        st.gen_cpu = m.gen_cpu;
        st.wall = m.wall;
        st.limited = generator_limited(rate_pps, st.sent, st.secs, st.eagain);
        st
    }

    /// Delete the allocations (Refresh 0), best effort and bounded in time.
    pub fn teardown(mut self) {
        if self.kind != TargetKind::Turn {
            return;
        }
        let _ = self.payload;
        let mut sessions: Vec<Session> = self.clients.drain(..).map(|c| c.session).collect();
        if self.transport.is_stream() {
            // Closing a connection ends its allocation.
            for s in sessions {
                s.close();
            }
            return;
        }
        for s in &mut sessions {
            self.ep.del(s.link.fd());
            s.set_plan(vec![Op::Refresh(0)]);
        }
        let cfg = DriveConfig {
            concurrency: 64,
            rto: Duration::from_millis(300),
            attempts: 2,
            deadline: Instant::now() + Duration::from_secs(3),
            repeat: false,
            new_socket_per_cycle: false,
        };
        let _ = drive(&mut sessions, &cfg, &mut |_, _| {});
    }
}

/// Queue `k` datagrams of stream client `cl` (built in `scratch`), writing every
/// `per_write` of them with one send. Returns (queued, refused because too much waits).
fn stream_send(
    cl: &mut Client,
    k: usize,
    per_write: usize,
    scratch: &mut [u8],
    seq: &mut u64,
    tag: u32,
    t_ns: u64,
) -> (usize, usize) {
    let Link::Stream(conn) = &mut cl.session.link else {
        return (0, k);
    };
    if cl.dead {
        return (0, k);
    }
    let mut queued = 0;
    for i in 0..k {
        let t = &cl.templates[cl.next_peer];
        let len = t.bytes.len();
        scratch[..len].copy_from_slice(&t.bytes);
        write_payload(&mut scratch[t.payload_off..], tag, *seq + 1, t_ns);
        if !conn.queue(&scratch[..len]) {
            return (queued, k - i);
        }
        *seq += 1;
        cl.next_peer = (cl.next_peer + 1) % cl.templates.len();
        queued += 1;
        if queued % per_write == 0 && conn.flush().is_err() {
            cl.dead = true;
            return (queued, k - i - 1);
        }
    }
    (queued, 0)
}

/// Write what waits on stream client `cl` and follow its need for writability.
fn stream_flush(cl: &mut Client, ep: &Epoll, token: usize) -> Result<(), ()> {
    let Link::Stream(conn) = &mut cl.session.link else {
        return Ok(());
    };
    if cl.dead {
        return Ok(());
    }
    if conn.pending() > 0 || conn.wants_write() {
        if let Err(_e) = conn.on_writable() {
            cl.dead = true;
            ep.del(conn.fd());
            return Err(());
        }
    }
    sync_write(ep, cl, token);
    Ok(())
}

fn sync_write(ep: &Epoll, cl: &mut Client, token: usize) {
    let w = !cl.dead && cl.session.link.wants_write();
    if w != cl.write_interest
        && ep
            .modify(cl.session.link.fd(), token as u64, true, w)
            .is_ok()
    {
        cl.write_interest = w;
    }
}

/// Read what stream client `cl` received (bounded), counting our datagrams that came back.
fn stream_recv(
    cl: &mut Client,
    kind: TargetKind,
    tag: u32,
    now_ns: u64,
    st: &mut StepStats,
) -> Result<u64, ()> {
    let Link::Stream(conn) = &mut cl.session.link else {
        return Ok(0);
    };
    let mut got = 0u64;
    for _ in 0..8 {
        let more = match conn.fill() {
            Ok(Fill::Data(_, more)) => more,
            Ok(Fill::Nothing) => false,
            Err(_) => return Err(()),
        };
        loop {
            match conn.next_frame() {
                Ok(Some(at)) => {
                    match client_payload(conn.frame(at), kind).and_then(parse_payload) {
                        Some((t, sent_ns)) if t == tag => {
                            got += 1;
                            st.latency.record_ns(now_ns.saturating_sub(sent_ns));
                        }
                        Some(_) => st.stale += 1,
                        None => st.other_rx += 1,
                    }
                }
                Ok(None) => break,
                Err(_) => return Err(()),
            }
        }
        if !more {
            break;
        }
    }
    st.client_rx += got;
    Ok(got)
}

pub fn run(target: &Target, spec: &RelaySpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    if target.kind == TargetKind::Reference && spec.transport.is_stream() {
        rep.skipped = true;
        rep.notes.push(format!(
            "not applicable to the reference forwarder (UDP only; this scenario is over {})",
            spec.transport.as_str()
        ));
        return;
    }
    let probe = Probe { pid: target.pid };
    let mut engine = match Engine::setup(target, spec, ctx) {
        Ok(e) => e,
        Err(e) => {
            rep.fail(e);
            return;
        }
    };
    let mut progress = Progress::new(ctx.progress);
    let drain = Duration::from_millis(spec.drain_ms);
    let mut gen_cpu = 0.0;
    let mut wall = 0.0;
    let mut eagain = 0;
    let mut send_errors = 0;
    let mut srv_cpu = Some(0.0);
    let mut account = |st: &StepStats| {
        gen_cpu += st.gen_cpu;
        wall += st.wall;
        eagain += st.eagain;
        send_errors += st.send_errors;
        srv_cpu = match (srv_cpu, st.server_cpu) {
            (Some(a), Some(b)) => Some(a + b),
            _ => None,
        };
    };
    if spec.transport.is_stream() {
        let tls = engine.clients.first().and_then(|c| c.session.tls_summary());
        rep.notes.push(format!(
            "clients over {}{}, {} datagram(s) per send; peers over UDP",
            spec.transport.as_str().to_uppercase(),
            tls.map(|t| format!(" ({t})")).unwrap_or_default(),
            spec.frames_per_write
        ));
    }
    rep.set("clients", spec.clients as f64);
    rep.set("peers", spec.peers as f64);
    rep.set("payload_bytes", spec.payload as f64);

    if let Some(search) = &spec.search {
        let max_loss = search.max_loss;
        let step_dur = Duration::from_secs_f64(search.step_secs);
        let mut best: Option<StepStats> = None;
        let mut fail_rate: Option<u64> = None;
        let mut rate_pps = search.start_pps;
        let mut steps = 0u32;
        let mut latency = Latency::new();
        let mut stop_reason = "max_pps reached".to_string();
        let mut t_offset = 0.0;
        let mut run_step = |engine: &mut Engine, r: u64, rep: &mut ScenarioReport| {
            let st = engine.step(
                &StepParams {
                    rate_pps: r,
                    window: spec.window,
                    duration: step_dur,
                    drain,
                    probe,
                    label: &rep.name,
                    t_offset,
                },
                &mut progress,
            );
            t_offset += st.wall;
            rep.steps.push(st.report(max_loss));
            rep.timeseries.extend(st.series.iter().cloned());
            st
        };
        // Grow until the first failing step.
        while steps < search.max_steps {
            steps += 1;
            let st = run_step(&mut engine, rate_pps, rep);
            account(&st);
            let ok = st.loss() <= max_loss && st.client_rx > 0;
            if ok && st.limited.is_some() {
                stop_reason = format!(
                    "generator-limited at {rate_pps}/s offered: {}",
                    st.limited.clone().unwrap_or_default()
                );
                latency.merge(&st.latency);
                best = Some(st);
                break;
            }
            if !ok {
                fail_rate = Some(rate_pps);
                stop_reason = format!("loss {:.3}% at {rate_pps}/s offered", st.loss() * 100.0);
                break;
            }
            latency = Latency::new();
            latency.merge(&st.latency);
            best = Some(st);
            if rate_pps >= search.max_pps {
                break;
            }
            rate_pps = ((rate_pps as f64 * search.growth) as u64).min(search.max_pps);
        }
        // Bisect between the last pass and the first failure.
        if let Some(mut hi) = fail_rate {
            let mut lo = best.as_ref().map(|b| b.offered_pps).unwrap_or(0);
            for _ in 0..search.refine {
                if steps >= search.max_steps || hi <= lo + lo / 50 + 1 {
                    break;
                }
                steps += 1;
                let mid = (lo + hi) / 2;
                let st = run_step(&mut engine, mid, rep);
                account(&st);
                if st.loss() <= max_loss && st.client_rx > 0 {
                    lo = mid;
                    latency = Latency::new();
                    latency.merge(&st.latency);
                    best = Some(st);
                } else {
                    hi = mid;
                }
            }
        }
        progress.done();
        rep.set("search_steps", steps as f64);
        rep.notes.push(format!("search stopped: {stop_reason}"));
        match best {
            Some(b) => {
                rep.set("max_offered_pps_under_loss", b.offered_pps as f64);
                rep.set("max_relayed_pps", b.relayed_pps());
                rep.set(
                    "payload_bps_at_max",
                    b.relayed_pps() * spec.payload as f64 * 8.0,
                );
                rep.set("loss_at_max", b.loss());
                rep.set("search_max_loss", max_loss);
                rep.set_opt("cpu_us_per_relayed_pkt_at_max", b.cpu_us_per_pkt());
                rep.latency = Some(latency.summary());
                if b.limited.is_some() {
                    rep.generator.limited = true;
                    rep.generator.limit_reason = b.limited.clone();
                    rep.notes.push(
                        "the maximum is a lower bound: the generator ran out before the server"
                            .into(),
                    );
                }
            }
            None => rep.fail(format!(
                "no step passed (loss above {:.3}% even at {}/s offered)",
                max_loss * 100.0,
                search.start_pps
            )),
        }
    } else {
        let max_loss = ctx.max_loss.unwrap_or(spec.max_loss);
        let st = engine.step(
            &StepParams {
                rate_pps: spec.offered_pps,
                window: spec.window,
                duration: Duration::from_secs_f64(spec.duration_secs),
                drain,
                probe,
                label: &rep.name,
                t_offset: 0.0,
            },
            &mut progress,
        );
        progress.done();
        account(&st);
        rep.steps.push(st.report(max_loss));
        rep.timeseries = st.series.clone();
        rep.set("offered_pps", spec.offered_pps as f64);
        rep.set("achieved_offered_pps", rate(st.sent, st.secs));
        rep.set("sent", st.sent as f64);
        rep.set("client_rx", st.client_rx as f64);
        rep.set("peer_rx", st.peer_rx as f64);
        rep.set("relayed_pps", st.relayed_pps());
        rep.set("round_trips_per_s", rate(st.client_rx, st.secs));
        rep.set("payload_bps", st.relayed_pps() * spec.payload as f64 * 8.0);
        rep.set("loss", st.loss());
        rep.set("stale_rx", st.stale as f64);
        rep.set("other_rx", st.other_rx as f64);
        rep.set("refused_sends", st.eagain as f64);
        if engine.transport.is_stream() {
            rep.set("stream_errors", st.stream_errors as f64);
            // The generator's own CPU per relayed packet (its TLS records included): its
            // headroom at this rate, shown next to the server's.
            rep.set_opt(
                "gen_cpu_us_per_relayed_pkt",
                cpu_us_per_packet(Some(st.gen_cpu), st.client_rx + st.peer_rx),
            );
        }
        rep.set_opt("cpu_us_per_relayed_pkt", st.cpu_us_per_pkt());
        rep.latency = Some(st.latency.summary());
        if let Some(l) = &st.limited {
            rep.generator.limited = true;
            rep.generator.limit_reason = Some(l.clone());
            rep.notes.push(format!("generator-limited: {l}"));
        }
        if st.client_rx == 0 {
            rep.fail("nothing came back through the relay");
        } else if st.stream_errors > 0 {
            rep.fail(format!(
                "{} client connection(s) failed or were closed by the server",
                st.stream_errors
            ));
        } else if st.loss() > max_loss {
            rep.fail(format!(
                "loss {:.3}% above the {:.3}% allowed",
                st.loss() * 100.0,
                max_loss * 100.0
            ));
        }
    }
    let limited = rep.generator.limited;
    let reason = rep.generator.limit_reason.clone();
    rep.generator = crate::report::GeneratorUsage {
        core: ctx.core,
        pinned: ctx.pinned,
        cpu_secs: gen_cpu,
        cpu_util: gen_cpu / f64::max(wall, 1e-9),
        send_eagain: eagain,
        send_errors,
        limited,
        limit_reason: reason,
    };
    rep.server.pid = probe.pid;
    rep.server.cpu_secs = srv_cpu;
    rep.server.cpu_util = srv_cpu.map(|c| c / f64::max(wall, 1e-9));
    rep.server.rss_after = probe.rss();
    engine.teardown();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_carry_the_payload_where_the_client_parser_finds_it() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for (kind, mode) in [
            (TargetKind::Turn, RelayMode::Channel),
            (TargetKind::Turn, RelayMode::Send),
            (TargetKind::Reference, RelayMode::Channel),
        ] {
            let t = template(kind, mode, 0x4001, peer, 100, false).unwrap();
            let mut b = t.bytes.clone();
            write_payload(&mut b[t.payload_off..], 9, 1, 777);
            assert_eq!(b.len(), t.payload_off + 100);
            match (kind, mode) {
                (TargetKind::Turn, RelayMode::Send) => {
                    let m = Message::parse(&b).unwrap();
                    assert_eq!(m.method(), method::SEND);
                    assert_eq!(m.get_xor_addr(attr::XOR_PEER_ADDRESS), Some(Ok(peer)));
                    assert_eq!(parse_payload(m.get(attr::DATA).unwrap()), Some((9, 777)));
                }
                (TargetKind::Turn, RelayMode::Channel) => {
                    assert_eq!(channel::parse(&b), Ok((0x4001, 100)));
                    assert_eq!(
                        client_payload(&b, kind).and_then(parse_payload),
                        Some((9, 777))
                    );
                }
                _ => {
                    assert_eq!(reference::read_header(&b), Some(peer));
                    assert_eq!(
                        client_payload(&b, kind).and_then(parse_payload),
                        Some((9, 777))
                    );
                }
            }
        }
    }

    #[test]
    fn stream_templates_are_framed_with_padding() {
        use actrix_proto::stun::stream::{next, Frame};
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for payload in [100, 101, 102, 103] {
            let t = template(
                TargetKind::Turn,
                RelayMode::Channel,
                0x4002,
                peer,
                payload,
                true,
            )
            .unwrap();
            assert_eq!(t.bytes.len() % 4, 0);
            assert_eq!(t.bytes.len(), padded_channel_len(payload));
            assert_eq!(
                next(&t.bytes, 4096),
                Frame::ChannelData {
                    len: 4 + payload,
                    total: t.bytes.len()
                }
            );
            let mut b = t.bytes.clone();
            write_payload(&mut b[t.payload_off..], 5, 6, 7);
            assert_eq!(
                client_payload(&b[..4 + payload], TargetKind::Turn).and_then(parse_payload),
                Some((5, 7))
            );
        }
        // A Send indication is a STUN message: a multiple of 4 already, framed as such.
        let t = template(TargetKind::Turn, RelayMode::Send, 0, peer, 101, true).unwrap();
        assert_eq!(next(&t.bytes, 4096), Frame::Stun(t.bytes.len()));
    }

    #[test]
    fn data_indications_are_unwrapped() {
        let mut out = [0u8; 256];
        let mut p = [0u8; 32];
        write_payload(&mut p, 3, 4, 5);
        let mut w =
            MessageWriter::new(&mut out, method::DATA, Class::Indication, &[1; 12]).unwrap();
        w.add_xor_addr(attr::XOR_PEER_ADDRESS, "127.0.0.1:1".parse().unwrap())
            .unwrap();
        w.add(attr::DATA, &p).unwrap();
        let n = w.finish();
        assert_eq!(
            client_payload(&out[..n], TargetKind::Turn).and_then(parse_payload),
            Some((3, 5))
        );
        assert_eq!(client_payload(&[0x40, 0, 0, 9, 1], TargetKind::Turn), None);
        assert_eq!(parse_payload(&[0u8; 30]), None);
    }
}
