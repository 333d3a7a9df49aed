//! STUN Binding request rate (RFC 8489 §3: a request without attributes, the success carries
//! XOR-MAPPED-ADDRESS). Against the reference the request is echoed back as is.
//!
//! The transaction ID carries the send time and a run tag, so the generator keeps no
//! per-request state: `tid = [send ns: 8][tag: 4]`.

use crate::load::{generator_limited, Ctx, Pacer, Probe, Progress, Window};
use crate::report::{Sample, ScenarioReport};
use crate::scenario::BindingSpec;
use crate::stats::{cpu_us_per_packet, loss, rate, Latency};
use crate::sys::{self, Batch, Epoll};
use crate::target::{Target, TargetKind};
use crate::turn_client::connected_socket;
use actrix_proto::stun::{message_type, method, Class, Message, MAGIC_COOKIE};
use std::time::{Duration, Instant};

const BATCH: usize = 64;

/// What a reply to one of our requests says.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    Success {
        sent_ns: u64,
    },
    Error {
        sent_ns: u64,
    },
    /// From an earlier run, or not ours.
    Foreign,
}

pub fn classify(buf: &[u8], kind: TargetKind, tag: u32) -> Reply {
    let tid_of = |b: &[u8]| -> Option<u64> {
        if b.len() < 20 || b[16..20] != tag.to_be_bytes() {
            return None;
        }
        let mut t = [0u8; 8];
        t.copy_from_slice(&b[8..16]);
        Some(u64::from_be_bytes(t))
    };
    match kind {
        TargetKind::Reference => match tid_of(buf) {
            Some(sent_ns) => Reply::Success { sent_ns },
            None => Reply::Foreign,
        },
        TargetKind::Turn => {
            let Ok(m) = Message::parse(buf) else {
                return Reply::Foreign;
            };
            let Some(sent_ns) = tid_of(buf) else {
                return Reply::Foreign;
            };
            match (m.method(), m.class()) {
                (method::BINDING, Class::Success) => Reply::Success { sent_ns },
                (method::BINDING, Class::Error) => Reply::Error { sent_ns },
                _ => Reply::Foreign,
            }
        }
    }
}

/// A Binding request without attributes.
pub fn write_request(out: &mut [u8], sent_ns: u64, tag: u32) {
    out[0..2].copy_from_slice(&message_type(method::BINDING, Class::Request).to_be_bytes());
    out[2..4].copy_from_slice(&0u16.to_be_bytes());
    out[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
    out[8..16].copy_from_slice(&sent_ns.to_be_bytes());
    out[16..20].copy_from_slice(&tag.to_be_bytes());
}

pub fn run(target: &Target, spec: &BindingSpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    let max_loss = ctx.max_loss.unwrap_or(spec.max_loss);
    let mut socks = Vec::with_capacity(spec.clients);
    for _ in 0..spec.clients {
        match connected_socket(target.addr) {
            Ok(s) => socks.push(s),
            Err(e) => {
                rep.fail(format!("cannot open a client socket: {e}"));
                return;
            }
        }
    }
    let mut ep = match Epoll::new(socks.len().max(16)) {
        Ok(e) => e,
        Err(e) => {
            rep.fail(format!("epoll: {e}"));
            return;
        }
    };
    for (i, s) in socks.iter().enumerate() {
        if let Err(e) = ep.add(sys::raw(s), i as u64) {
            rep.fail(format!("epoll: {e}"));
            return;
        }
    }
    let probe = Probe { pid: target.pid };
    let tag = (std::process::id() << 8) ^ crate::target::unix_now() as u32;
    let mut sb = Batch::new(BATCH);
    let mut rb = Batch::new(BATCH);
    let mut lat = Latency::new();
    let mut progress = Progress::new(ctx.progress);
    let (mut ok, mut errors, mut foreign, mut eagain, mut send_errors) = (0u64, 0, 0, 0, 0);
    let mut ready = Vec::new();
    let duration = Duration::from_secs_f64(spec.duration_secs);
    let drain = Duration::from_millis(spec.drain_ms);

    let win = Window::open(probe);
    let epoch = Instant::now();
    let mut pacer = Pacer::new(spec.offered_rps, spec.window as u64, epoch);
    let mut next_client = 0usize;
    let mut series = Vec::new();
    let mut last_sample = (epoch, 0u64, 0u64);
    let sample_every = Duration::from_millis(250);
    let send_end = epoch + duration;
    let hard_end = send_end + drain;
    loop {
        let now = Instant::now();
        if now >= hard_end || (now >= send_end && ok + errors >= pacer.sent) {
            break;
        }
        let mut capped = false;
        if now < send_end {
            let allow = pacer.allowance(now, (BATCH * socks.len()) as u64);
            capped = allow == (BATCH * socks.len()) as u64;
            let mut left = allow as usize;
            let mut visited = 0;
            while left > 0 && visited < socks.len() {
                let c = next_client;
                next_client = (next_client + 1) % socks.len();
                visited += 1;
                let k = left
                    .min(BATCH)
                    .min(left.div_ceil(socks.len() - visited + 1));
                let t_ns = epoch.elapsed().as_nanos() as u64;
                for i in 0..k {
                    write_request(sb.slot_mut(i), t_ns, tag);
                    sb.set_out(i, 20, None);
                }
                let o = sb.send(sys::raw(&socks[c]), k);
                pacer.on_sent(o.sent as u64);
                eagain += o.eagain as u64;
                send_errors += o.errors as u64;
                left -= k;
            }
        }
        ep.wait(if capped { 0 } else { 1 }, &mut ready);
        for &tok in &ready {
            let Some(s) = socks.get(tok as usize) else {
                continue;
            };
            for _ in 0..8 {
                let n = rb.recv(sys::raw(s), BATCH).unwrap_or(0);
                let now_ns = epoch.elapsed().as_nanos() as u64;
                let mut got = 0;
                for i in 0..n {
                    match classify(rb.datagram(i), target.kind, tag) {
                        Reply::Success { sent_ns } => {
                            ok += 1;
                            got += 1;
                            lat.record_ns(now_ns.saturating_sub(sent_ns));
                        }
                        Reply::Error { .. } => {
                            errors += 1;
                            got += 1;
                        }
                        Reply::Foreign => foreign += 1,
                    }
                }
                pacer.on_acked(got, Instant::now());
                if n < BATCH {
                    break;
                }
            }
        }
        let now = Instant::now();
        if now.duration_since(last_sample.0) >= sample_every {
            let dt = now.duration_since(last_sample.0).as_secs_f64();
            series.push(Sample {
                t: now.duration_since(epoch).as_secs_f64(),
                offered_pps: rate(pacer.sent - last_sample.1, dt),
                relayed_pps: rate(ok - last_sample.2, dt),
                completed_pps: rate(ok - last_sample.2, dt),
            });
            last_sample = (now, pacer.sent, ok);
        }
        progress.tick(false, || {
            format!(
                "[{}] {:.1}s sent {} ok {} ({:.0}/s) loss {:.3}% p99 {:.0}us",
                rep.name,
                epoch.elapsed().as_secs_f64(),
                pacer.sent,
                ok,
                rate(ok, epoch.elapsed().as_secs_f64().min(spec.duration_secs)),
                loss(pacer.sent, ok + errors) * 100.0,
                lat.quantile_us(0.99)
            )
        });
    }
    progress.done();
    let m = win.close();
    let secs = spec.duration_secs;
    rep.server = m.server_usage(probe);
    rep.generator = m.generator_usage(ctx);
    rep.generator.send_eagain = eagain;
    rep.generator.send_errors = send_errors;
    let sent = pacer.sent;
    if let Some(why) = generator_limited(spec.offered_rps, sent, secs, eagain) {
        rep.generator.limited = true;
        rep.generator.limit_reason = Some(why.clone());
        rep.notes.push(format!("generator-limited: {why}"));
    }
    let l = loss(sent, ok + errors);
    rep.set("sent", sent as f64);
    rep.set("ok", ok as f64);
    rep.set("errors", errors as f64);
    rep.set("foreign", foreign as f64);
    rep.set("binding_rps", rate(ok, secs));
    rep.set("offered_rps", rate(sent, secs));
    rep.set("loss", l);
    rep.set_opt(
        "cpu_us_per_request",
        cpu_us_per_packet(m.server_cpu, ok + errors),
    );
    rep.latency = Some(lat.summary());
    rep.timeseries = series;
    if ok == 0 {
        rep.fail("no Binding success response at all");
    }
    if errors > 0 {
        rep.fail(format!("{errors} Binding error responses"));
    }
    if l > max_loss {
        rep.fail(format!(
            "loss {:.3}% above the {:.3}% allowed",
            l * 100.0,
            max_loss * 100.0
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actrix_proto::stun::{attr, MessageWriter};

    #[test]
    fn request_and_reply_classification() {
        let mut req = [0u8; 20];
        write_request(&mut req, 12345, 7);
        let m = Message::parse(&req).unwrap();
        assert_eq!((m.method(), m.class()), (method::BINDING, Class::Request));
        // The reference echoes the request.
        assert_eq!(
            classify(&req, TargetKind::Reference, 7),
            Reply::Success { sent_ns: 12345 }
        );
        assert_eq!(classify(&req, TargetKind::Reference, 8), Reply::Foreign);
        // A STUN server answers with a success carrying the same transaction ID.
        let mut out = [0u8; 64];
        let tid = *m.transaction_id();
        let mut w = MessageWriter::new(&mut out, method::BINDING, Class::Success, &tid).unwrap();
        w.add_xor_addr(attr::XOR_MAPPED_ADDRESS, "127.0.0.1:5".parse().unwrap())
            .unwrap();
        let n = w.finish();
        assert_eq!(
            classify(&out[..n], TargetKind::Turn, 7),
            Reply::Success { sent_ns: 12345 }
        );
        // The request itself is not an answer from a STUN server.
        assert_eq!(classify(&req, TargetKind::Turn, 7), Reply::Foreign);
        assert_eq!(classify(&[1, 2, 3], TargetKind::Turn, 7), Reply::Foreign);
    }
}
