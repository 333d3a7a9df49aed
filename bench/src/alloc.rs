//! Allocation scenarios: churn (allocate, permission, channel bind, refresh 0, again), idle
//! (many allocations held open: server memory per allocation) and handshakes (connections per
//! second over TCP or TLS, one request each). Over TCP and TLS every churn cycle and every
//! handshake is a new connection, and each idle allocation holds its own.

use crate::load::{Ctx, Probe, Progress, Window};
use crate::report::ScenarioReport;
use crate::scenario::{ChurnEnd, ChurnSpec, HandshakeRequest, HandshakeSpec, IdleSpec, Transport};
use crate::stats::{cpu_us_per_packet, rate};
use crate::target::{unix_now, Target, TargetKind};
use crate::turn_client::{drive, DriveConfig, DriveResult, LinkKind, Op, Session};
use actrix_proto::stun::channel;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

fn credentials(target: &Target, rep: &mut ScenarioReport) -> Option<(String, String)> {
    if target.kind == TargetKind::Reference {
        rep.skipped = true;
        rep.notes
            .push("not applicable to the reference forwarder (it has no allocations)".into());
        return None;
    }
    match &target.creds {
        Some(c) => Some(c.resolve(unix_now())),
        None => {
            rep.fail("TURN scenarios need --user/--password or --rest-secret");
            None
        }
    }
}

/// Where clients over `transport` connect and how they open their links; a failure is
/// recorded in `rep`.
fn links(
    target: &Target,
    transport: Transport,
    tls_version: crate::scenario::TlsVersion,
    rep: &mut ScenarioReport,
) -> Option<(SocketAddr, LinkKind)> {
    let addr = match target.addr_for(transport) {
        Ok(a) => a,
        Err(e) => {
            rep.fail(e);
            return None;
        }
    };
    match LinkKind::for_transport(transport, tls_version) {
        Ok(k) => Some((addr, k)),
        Err(e) => {
            rep.fail(e);
            None
        }
    }
}

fn top_reasons(reasons: &std::collections::BTreeMap<String, u64>) -> String {
    let mut v: Vec<_> = reasons.iter().collect();
    v.sort_by(|a, b| b.1.cmp(a.1));
    v.iter()
        .take(4)
        .map(|(k, n)| format!("{k} x{n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The stream figures of a driver run: connect/handshake time and what TLS negotiated.
fn stream_notes(transport: Transport, res: &DriveResult, rep: &mut ScenarioReport) {
    if !transport.is_stream() {
        return;
    }
    let what = if transport == Transport::Tls {
        "tls_handshake"
    } else {
        "tcp_connect"
    };
    if res.established.count() > 0 {
        rep.set(&format!("{what}_p50_us"), res.established.quantile_us(0.5));
        rep.set(&format!("{what}_p99_us"), res.established.quantile_us(0.99));
    }
    rep.notes.push(match &res.tls_summary {
        Some(t) => format!("over TLS: {t}; full handshakes (no session resumption)"),
        None => format!("over {}", transport.as_str().to_uppercase()),
    });
}

/// Closed-loop stream scenarios: the generator's own CPU per completed cycle (TLS client work
/// included), and whether its core was the limit. A closed loop offers as fast as answers
/// come, so a generator busy nearly all the time bounds the rate, not the server.
fn generator_per_cycle(
    rep: &mut ScenarioReport,
    transport: Transport,
    gen_cpu: f64,
    completed: u64,
    key: &str,
) {
    if !transport.is_stream() {
        return;
    }
    rep.set_opt(key, cpu_us_per_packet(Some(gen_cpu), completed));
    if rep.generator.cpu_util > 0.9 {
        rep.generator.limited = true;
        rep.generator.limit_reason = Some(format!(
            "the generator's core was {:.0}% busy (its TLS/TCP client side): the rate is a \
             bound of the generator",
            rep.generator.cpu_util * 100.0
        ));
    }
}

pub fn churn(target: &Target, spec: &ChurnSpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    let Some((user, pass)) = credentials(target, rep) else {
        return;
    };
    let Some((server, kind)) = links(target, spec.transport, spec.tls_version, rep) else {
        return;
    };
    let max_failure = ctx.max_loss.unwrap_or(spec.max_failure);
    // Validated when the scenario was parsed.
    let peer: SocketAddr = spec
        .peer
        .parse()
        .unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9)));
    let mut plan = vec![
        Op::Allocate,
        Op::Permission(vec![peer]),
        Op::ChannelBind(channel::MIN, peer),
    ];
    if spec.end == ChurnEnd::Refresh {
        plan.push(Op::Refresh(0));
    }
    let mut sessions = Vec::with_capacity(spec.concurrency);
    for i in 0..spec.concurrency {
        let bind = crate::sys::client_bind(server, i, spec.source_ips);
        match Session::with_link(
            i as u32,
            kind.clone(),
            server,
            bind,
            &user,
            &pass,
            plan.clone(),
        ) {
            Ok(mut s) => {
                s.rotate_sources(i, spec.concurrency, spec.source_ips);
                if let Err(e) = s.add_spare_sockets(spec.client_sockets) {
                    rep.fail(format!("client socket: {e}"));
                    return;
                }
                sessions.push(s)
            }
            Err(e) => {
                rep.fail(format!("client socket: {e}"));
                return;
            }
        }
    }
    let probe = Probe { pid: target.pid };
    let cfg = DriveConfig {
        concurrency: spec.concurrency,
        rto: Duration::from_millis(spec.rto_ms),
        attempts: spec.attempts,
        deadline: Instant::now() + Duration::from_secs_f64(spec.duration_secs),
        repeat: true,
        new_socket_per_cycle: spec.new_socket_per_cycle,
    };
    let mut progress = Progress::new(ctx.progress);
    let t0 = Instant::now();
    let name = rep.name.clone();
    let win = Window::open(probe);
    let res = drive(&mut sessions, &cfg, &mut |ok, bad| {
        progress.tick(true, || {
            let e = t0.elapsed().as_secs_f64();
            format!(
                "[{name}] {e:.1}s cycles {ok} ({:.0}/s) failed {bad}",
                rate(ok, e)
            )
        })
    });
    progress.done();
    let m = win.close();
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            rep.fail(format!("driver: {e}"));
            return;
        }
    };
    let secs = res.elapsed.as_secs_f64();
    let total = res.completed + res.failed;
    let failure = if total == 0 {
        0.0
    } else {
        res.failed as f64 / total as f64
    };
    rep.server = m.server_usage(probe);
    rep.generator = m.generator_usage(ctx);
    rep.set("cycles_ok", res.completed as f64);
    rep.set("cycles_failed", res.failed as f64);
    let requests: u64 = sessions.iter().map(|s| s.requests).sum();
    rep.set("allocs_per_s", rate(res.completed, secs));
    rep.set("transactions_per_s", rate(requests, secs));
    if res.completed > 0 {
        rep.set(
            "transactions_per_cycle",
            requests as f64 / (res.completed + res.failed) as f64,
        );
    }
    rep.set("failure_fraction", failure);
    rep.set_opt(
        "cpu_us_per_alloc_cycle",
        cpu_us_per_packet(m.server_cpu, res.completed),
    );
    generator_per_cycle(
        rep,
        spec.transport,
        m.gen_cpu,
        res.completed,
        "gen_cpu_us_per_alloc_cycle",
    );
    rep.latency = Some(res.latency.summary());
    let n = plan.len();
    rep.notes.push(format!(
        "latency is per cycle: {n} transactions ({} on a nonce challenge){}",
        n + 1,
        if spec.transport.is_stream() {
            ", from connecting to the last answer"
        } else {
            ""
        }
    ));
    stream_notes(spec.transport, &res, rep);
    if spec.transport.is_stream() {
        rep.notes.push(match spec.end {
            ChurnEnd::Refresh => "a new connection every cycle, closed after the Refresh 0".into(),
            ChurnEnd::Close => {
                "a new connection every cycle, closed without a Refresh (the allocation ends with it)"
                    .into()
            }
        });
    } else if spec.new_socket_per_cycle {
        rep.notes.push(if spec.client_sockets > 0 {
            format!(
                "each client takes {} sockets in turn: a 5-tuple returns every {} of its cycles",
                spec.client_sockets + 1,
                spec.client_sockets + 1
            )
        } else {
            "a new client socket (5-tuple) every cycle".into()
        });
    }
    if !res.reasons.is_empty() {
        rep.notes
            .push(format!("failures: {}", top_reasons(&res.reasons)));
    }
    if res.completed == 0 {
        rep.fail(format!(
            "zero successful allocation cycles ({})",
            top_reasons(&res.reasons)
        ));
    } else if failure > max_failure {
        rep.fail(format!(
            "{:.2}% of cycles failed, above the {:.2}% allowed",
            failure * 100.0,
            max_failure * 100.0
        ));
    }
    // Sessions still mid-cycle hold allocations; delete them.
    release(sessions);
}

/// Delete the sessions' allocations: Refresh 0 over UDP (best effort, bounded in time);
/// over a stream closing the connection ends it.
fn release(mut sessions: Vec<Session>) {
    if sessions.first().is_some_and(|s| s.link.udp().is_none()) {
        for s in sessions {
            s.close();
        }
        return;
    }
    for s in sessions.iter_mut() {
        s.set_plan(vec![Op::Refresh(0)]);
    }
    let cfg = DriveConfig {
        concurrency: 128,
        rto: Duration::from_millis(300),
        attempts: 2,
        deadline: Instant::now() + Duration::from_secs(10),
        repeat: false,
        new_socket_per_cycle: false,
    };
    let _ = drive(&mut sessions, &cfg, &mut |_, _| {});
}

pub fn idle(target: &Target, spec: &IdleSpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    let Some((user, pass)) = credentials(target, rep) else {
        return;
    };
    let Some((server, kind)) = links(target, spec.transport, spec.tls_version, rep) else {
        return;
    };
    let probe = Probe { pid: target.pid };
    if probe.pid.is_none() {
        rep.notes
            .push("no server pid: memory per allocation cannot be measured".into());
    }
    let limit = crate::sys::raise_fd_limit();
    if limit > 0 && (spec.allocations as u64 + 256) > limit {
        rep.fail(format!(
            "{} allocations need as many sockets; the open-file limit is {limit}",
            spec.allocations
        ));
        return;
    }
    let rss_before = probe.rss();
    let fds_before = probe.pid.and_then(crate::sys::proc_fd_count);
    let mut sessions = Vec::with_capacity(spec.allocations);
    for i in 0..spec.allocations {
        let bind = crate::sys::client_bind(server, i, spec.source_ips);
        let s = if kind.is_stream() {
            // Connections open when their session starts, so the open-file limit and the
            // server's connection deadlines see `concurrency` connecting at once.
            Session::deferred(
                i as u32,
                kind.clone(),
                server,
                bind,
                &user,
                &pass,
                vec![Op::Allocate],
            )
        } else {
            Session::new(i as u32, server, bind, &user, &pass, vec![Op::Allocate])
        };
        match s {
            Ok(s) => sessions.push(s),
            Err(e) => {
                rep.fail(format!("client socket {i}: {e}"));
                return;
            }
        }
    }
    let cfg = DriveConfig {
        concurrency: spec.concurrency,
        rto: Duration::from_millis(spec.rto_ms),
        attempts: spec.attempts,
        // Generous but bounded: at least 100 allocations/s.
        deadline: Instant::now() + Duration::from_secs(10 + spec.allocations as u64 / 100),
        repeat: false,
        new_socket_per_cycle: false,
    };
    let mut progress = Progress::new(ctx.progress);
    let name = rep.name.clone();
    let win = Window::open(probe);
    let res = drive(&mut sessions, &cfg, &mut |ok, bad| {
        progress.tick(true, || {
            format!("[{name}] allocations {ok} ok, {bad} failed")
        })
    });
    progress.done();
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            rep.fail(format!("driver: {e}"));
            return;
        }
    };
    let setup_secs = res.elapsed.as_secs_f64();
    std::thread::sleep(Duration::from_secs_f64(spec.hold_secs));
    let m = win.close();
    let rss_after = probe.rss();
    let fds_after = probe.pid.and_then(crate::sys::proc_fd_count);
    let ok = res.completed;
    rep.server = m.server_usage(probe);
    rep.server.rss_before = rss_before;
    rep.server.rss_after = rss_after;
    rep.generator = m.generator_usage(ctx);
    rep.set("allocations_ok", ok as f64);
    rep.set("allocations_failed", res.failed as f64);
    rep.set("setup_allocs_per_s", rate(ok, setup_secs));
    if let (Some(a), Some(b)) = (fds_before, fds_after) {
        rep.set("server_fds_before", a as f64);
        rep.set("server_fds_after", b as f64);
    }
    if let (Some(a), Some(b)) = (rss_before, rss_after) {
        rep.set("rss_before_bytes", a as f64);
        rep.set("rss_after_bytes", b as f64);
        if ok > 0 {
            rep.set(
                "rss_bytes_per_alloc",
                (b as f64 - a as f64).max(0.0) / ok as f64,
            );
        }
    }
    rep.latency = Some(res.latency.summary());
    stream_notes(spec.transport, &res, rep);
    if spec.transport.is_stream() {
        rep.notes.push(
            "each allocation holds its own connection: RSS per allocation is per connection \
             too (kernel socket buffers are not in RSS)"
                .into(),
        );
    }
    let success = ok as f64 / spec.allocations as f64;
    if success < spec.min_success {
        rep.fail(format!(
            "{ok} of {} allocations succeeded ({})",
            spec.allocations,
            top_reasons(&res.reasons)
        ));
    }
    let held: Vec<Session> = sessions
        .into_iter()
        .zip(res.done.iter())
        .filter(|(_, d)| **d)
        .map(|(s, _)| s)
        .collect();
    release(held);
}

/// Connections per second: connect (and the TLS handshake), one request, close; closed loop
/// with `concurrency` in progress.
pub fn handshake(target: &Target, spec: &HandshakeSpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    if target.kind == TargetKind::Reference {
        rep.skipped = true;
        rep.notes
            .push("not applicable to the reference forwarder (UDP only)".into());
        return;
    }
    let (user, pass) = match spec.request {
        HandshakeRequest::Binding => (String::new(), String::new()),
        HandshakeRequest::Allocate => match credentials(target, rep) {
            Some(c) => c,
            None => return,
        },
    };
    let Some((server, kind)) = links(target, spec.transport, spec.tls_version, rep) else {
        return;
    };
    let max_failure = ctx.max_loss.unwrap_or(spec.max_failure);
    let plan = vec![match spec.request {
        HandshakeRequest::Binding => Op::Binding,
        HandshakeRequest::Allocate => Op::Allocate,
    }];
    let mut sessions = Vec::with_capacity(spec.concurrency);
    for i in 0..spec.concurrency {
        let bind = crate::sys::client_bind(server, i, spec.source_ips);
        match Session::with_link(
            i as u32,
            kind.clone(),
            server,
            bind,
            &user,
            &pass,
            plan.clone(),
        ) {
            Ok(mut s) => {
                s.rotate_sources(i, spec.concurrency, spec.source_ips);
                sessions.push(s);
            }
            Err(e) => {
                rep.fail(format!("client socket: {e}"));
                return;
            }
        }
    }
    let probe = Probe { pid: target.pid };
    let cfg = DriveConfig {
        concurrency: spec.concurrency,
        rto: Duration::from_millis(spec.timeout_ms),
        attempts: 1,
        deadline: Instant::now() + Duration::from_secs_f64(spec.duration_secs),
        repeat: true,
        new_socket_per_cycle: true,
    };
    let mut progress = Progress::new(ctx.progress);
    let t0 = Instant::now();
    let name = rep.name.clone();
    let win = Window::open(probe);
    let res = drive(&mut sessions, &cfg, &mut |ok, bad| {
        progress.tick(true, || {
            let e = t0.elapsed().as_secs_f64();
            format!(
                "[{name}] {e:.1}s connections {ok} ({:.0}/s) failed {bad}",
                rate(ok, e)
            )
        })
    });
    progress.done();
    let m = win.close();
    let res = match res {
        Ok(r) => r,
        Err(e) => {
            rep.fail(format!("driver: {e}"));
            return;
        }
    };
    let secs = res.elapsed.as_secs_f64();
    let total = res.completed + res.failed;
    let failure = if total == 0 {
        0.0
    } else {
        res.failed as f64 / total as f64
    };
    rep.server = m.server_usage(probe);
    rep.generator = m.generator_usage(ctx);
    rep.set("handshakes_ok", res.completed as f64);
    rep.set("handshakes_failed", res.failed as f64);
    rep.set("handshakes_per_s", rate(res.completed, secs));
    rep.set("failure_fraction", failure);
    rep.set_opt(
        "cpu_us_per_handshake",
        cpu_us_per_packet(m.server_cpu, res.completed),
    );
    generator_per_cycle(
        rep,
        spec.transport,
        m.gen_cpu,
        res.completed,
        "gen_cpu_us_per_handshake",
    );
    rep.latency = Some(res.latency.summary());
    rep.notes.push(format!(
        "latency is per connection: connect{}, one {} answered, then close",
        if spec.transport == Transport::Tls {
            ", TLS handshake"
        } else {
            ""
        },
        match spec.request {
            HandshakeRequest::Binding => "Binding",
            HandshakeRequest::Allocate => "Allocate (after its 401)",
        }
    ));
    stream_notes(spec.transport, &res, rep);
    if !res.reasons.is_empty() {
        rep.notes
            .push(format!("failures: {}", top_reasons(&res.reasons)));
    }
    if res.completed == 0 {
        rep.fail(format!(
            "zero completed connections ({})",
            top_reasons(&res.reasons)
        ));
    } else if failure > max_failure {
        rep.fail(format!(
            "{:.2}% of connections failed, above the {:.2}% allowed",
            failure * 100.0,
            max_failure * 100.0
        ));
    }
    for s in sessions {
        s.close();
    }
}
