//! Signaling load generator: starts the control thread with the signaling routes in-process
//! (pinned to one core), registers N actors over real WebSockets from a client runtime pinned
//! to another core, holds C connections in total, relays SDP envelopes between pairs at a
//! paced rate, and prints delivered envelopes/s and end-to-end latency percentiles.
//!
//! ```text
//! cargo run --release -p actrix-signaling --example sig_load -- \
//!     --actors 2000 --conns 10000 --rate 20000 --secs 10 --server-core 1 --client-core 0
//! ```
//!
//! Everything is bounded: the connection count, the rate and the duration. Latency is measured
//! from just before the sender's WebSocket write to just after the receiver decoded the relay,
//! so it includes both clients' WebSocket work and the kernel loopback, not only the hub.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actrix_control::server::ControlContext;
use actrix_control::{ControlBuilder, ControlConfig, RealmStatus, SecretString};
use actrix_signaling::proto::*;
use actrix_signaling::{SignalingConfig, SignalingStats};
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use tokio_tungstenite::tungstenite::Message;

struct Args {
    actors: usize,
    conns: usize,
    rate: u64,
    secs: u64,
    warmup: u64,
    server_core: usize,
    client_core: usize,
    payload: usize,
}

fn args() -> Args {
    let mut a = Args {
        actors: 2000,
        conns: 10_000,
        rate: 20_000,
        secs: 10,
        warmup: 5,
        server_core: 1,
        client_core: 0,
        payload: 200,
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i + 1 < v.len() {
        let n: u64 = v[i + 1].parse().expect("numeric argument");
        match v[i].as_str() {
            "--actors" => a.actors = n as usize,
            "--conns" => a.conns = n as usize,
            "--rate" => a.rate = n,
            "--secs" => a.secs = n,
            "--warmup" => a.warmup = n,
            "--server-core" => a.server_core = n as usize,
            "--client-core" => a.client_core = n as usize,
            "--payload" => a.payload = n as usize,
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    // Bounded, and actors come in pairs.
    a.actors = (a.actors.clamp(2, 20_000) / 2) * 2;
    a.conns = a.conns.clamp(a.actors, 30_000);
    a.secs = a.secs.clamp(1, 120);
    a.rate = a.rate.clamp(1, 500_000);
    a
}

/// Raise RLIMIT_NOFILE so 2 × conns sockets fit (server and client sides are in this process).
#[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every target
fn raise_nofile(wanted: u64) -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        // Root may raise the hard limit too; otherwise go up to the hard limit.
        let want = wanted.max(r.rlim_cur as u64);
        let up = libc::rlimit {
            rlim_cur: want as libc::rlim_t,
            rlim_max: (want as libc::rlim_t).max(r.rlim_max),
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &up) == 0 {
            return want;
        }
        let hard = libc::rlimit {
            rlim_cur: r.rlim_max,
            rlim_max: r.rlim_max,
        };
        if libc::setrlimit(libc::RLIMIT_NOFILE, &hard) == 0 {
            return r.rlim_max as u64;
        }
        r.rlim_cur as u64
    }
}

/// CPU seconds used so far by the thread named `name` (from /proc).
fn thread_cpu_secs(name: &str) -> Option<f64> {
    let tick = 100.0; // USER_HZ on Linux
    for e in std::fs::read_dir("/proc/self/task").ok()? {
        let p = e.ok()?.path();
        let comm = std::fs::read_to_string(p.join("comm")).ok()?;
        if comm.trim() == name {
            let stat = std::fs::read_to_string(p.join("stat")).ok()?;
            let rest = stat.rsplit_once(')')?.1;
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ut: f64 = f.get(11)?.parse().ok()?;
            let st: f64 = f.get(12)?.parse().ok()?;
            return Some((ut + st) / tick);
        }
    }
    None
}

fn env(id: u64, flow: signaling_envelope::Flow) -> Vec<u8> {
    SignalingEnvelope {
        envelope_version: 1,
        envelope_id: format!("{id}"),
        reply_for: None,
        timestamp: Timestamp {
            seconds: 0,
            nanos: 0,
        },
        traceparent: None,
        tracestate: None,
        flow: Some(flow),
    }
    .encode_to_vec()
}

fn ty(name: &str) -> ActrType {
    ActrType {
        manufacturer: "load".into(),
        name: name.into(),
        version: Some("1".into()),
    }
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(url: &str) -> Ws {
    for attempt in 0..20 {
        match tokio_tungstenite::connect_async_with_config(url, None, true).await {
            Ok((ws, _)) => return ws,
            Err(e) if attempt < 19 => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connect: {e}"),
        }
    }
    unreachable!()
}

async fn register(ws: &mut Ws, name: &str, peer: &str) -> (ActrId, AIdCredential) {
    let req = RegisterRequest {
        actr_type: ty(name),
        realm: Realm { realm_id: 1 },
        service_spec: None,
        acl: Some(Acl {
            rules: vec![AclRule {
                principals: vec![acl_rule::Principal {
                    realm: None,
                    actr_type: Some(ty(peer)),
                }],
                permission: acl_rule::ALLOW,
            }],
        }),
        service: None,
        ws_address: None,
    };
    let bytes = env(
        0,
        signaling_envelope::Flow::PeerToServer(PeerToSignaling {
            payload: Some(peer_to_signaling::Payload::RegisterRequest(req)),
        }),
    );
    ws.send(Message::Binary(bytes.into()))
        .await
        .expect("send register");
    loop {
        match ws.next().await.expect("register reply").expect("ws") {
            Message::Binary(b) => {
                let e = SignalingEnvelope::decode(b).expect("decode");
                if let Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
                    payload: Some(signaling_to_actr::Payload::RegisterResponse(r)),
                    ..
                })) = e.flow
                {
                    match r.result {
                        Some(register_response::Result::Success(ok)) => {
                            return (ok.actr_id, ok.credential)
                        }
                        other => panic!("register failed: {other:?}"),
                    }
                }
            }
            _ => continue,
        }
    }
}

fn main() {
    let a = args();
    let fds = raise_nofile((a.conns as u64) * 2 + 256);
    let max_conns = ((fds.saturating_sub(256)) / 2) as usize;
    let conns = a.conns.min(max_conns);
    if conns < a.conns {
        eprintln!(
            "RLIMIT_NOFILE {fds}: holding {conns} connections instead of {}",
            a.conns
        );
    }
    let dir = tempfile::tempdir().expect("temp dir");
    actrix_control::provision_realm(
        dir.path(),
        &actrix_control::Realm {
            realm_id: 1,
            name: "load".into(),
            status: RealmStatus::Normal,
            expires_at: None,
        },
    )
    .expect("realm");
    let mut cfg = ControlConfig {
        node_id: "sig-load".into(),
        data_dir: dir.path().to_owned(),
        ..ControlConfig::default()
    };
    cfg.http.listen = "127.0.0.1:0".parse().unwrap();
    cfg.ks.shared_key = Some(SecretString::from("load-test-shared-key-0123456789abcdef"));
    cfg.ks.kek = Some(SecretString::from(
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f",
    ));
    // The AIS rate limit is per IP on the HTTP route only; registration over WS does not use it.
    let sig = SignalingConfig {
        conn_rate_per_sec: 1_000_000,
        conn_burst: 1_000_000,
        max_conns_per_ip: 1_000_000,
        max_conns: 1_000_000,
        msg_rate_per_sec: 100_000,
        msg_burst: 100_000,
        auth_timeout_secs: 3600,
        idle_timeout_secs: 3600,
        ping_interval_secs: 600,
        send_queue_len: 1024,
        ..SignalingConfig::default()
    };
    let stats = Arc::new(SignalingStats::default());
    let st2 = stats.clone();
    let dir2 = dir.path().to_owned();
    let ctx_slot: Arc<Mutex<Option<ControlContext>>> = Arc::default();
    let slot2 = ctx_slot.clone();
    let handle = ControlBuilder::new(cfg)
        .pin_core(Some(a.server_core))
        .routes_with(move |ctx| {
            *slot2.lock().unwrap() = Some(ctx.clone());
            actrix_signaling::router_with_stats(ctx, sig, &dir2, st2).expect("signaling")
        })
        .spawn()
        .expect("control thread");
    let url = format!("ws://{}/signaling/ws", handle.local_addr());
    if !core_affinity::set_for_current(core_affinity::CoreId { id: a.client_core }) {
        eprintln!("could not pin the client thread to core {}", a.client_core);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, run(a, conns, url, stats.clone()));
    drop(handle);
}

async fn run(a: Args, conns: usize, url: String, stats: Arc<SignalingStats>) {
    let t0 = Instant::now();
    // 1. Register actors (pairs a_i ↔ b_i), 64 at a time.
    let mut actors: Vec<(Ws, ActrId, AIdCredential)> = Vec::with_capacity(a.actors);
    let mut pending = futures_util::stream::FuturesOrdered::new();
    for i in 0..a.actors {
        let url = url.clone();
        let (me, peer) = if i % 2 == 0 { ("a", "b") } else { ("b", "a") };
        pending.push_back(async move {
            let mut ws = connect(&url).await;
            let (id, cred) = register(&mut ws, me, peer).await;
            (ws, id, cred)
        });
        if pending.len() >= 64 {
            actors.push(pending.next().await.unwrap());
        }
    }
    while let Some(x) = pending.next().await {
        actors.push(x);
    }
    let reg_secs = t0.elapsed().as_secs_f64();
    // 2. Idle connections up to C.
    let mut idle = Vec::with_capacity(conns - a.actors);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for _ in a.actors..conns {
        let url = url.clone();
        pending.push(async move { connect(&url).await });
        if pending.len() >= 64 {
            idle.push(pending.next().await.unwrap());
        }
    }
    while let Some(x) = pending.next().await {
        idle.push(x);
    }
    let open = stats.connections_open.load(Ordering::Relaxed);
    println!(
        "registered {} actors in {:.1} s; holding {} connections (server counts {open})",
        a.actors,
        reg_secs,
        a.actors + idle.len()
    );

    // 3. Relay: every actor sends to its partner at rate / actors per second.
    let hist = Rc::new(RefCell::new(
        hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).unwrap(),
    ));
    let received = Rc::new(AtomicU64::new(0));
    let sent = Rc::new(AtomicU64::new(0));
    let epoch = Instant::now();
    let measure_from = epoch + Duration::from_secs(a.warmup);
    let stop_at = measure_from + Duration::from_secs(a.secs);
    let tick_every = Duration::from_secs_f64((a.actors as f64 / a.rate as f64).max(0.01));
    let per_tick = a.rate as f64 / a.actors as f64 * tick_every.as_secs_f64();
    let filler = "x".repeat(a.payload);
    let ids: Vec<ActrId> = actors.iter().map(|x| x.1.clone()).collect();
    let mut tasks = Vec::new();
    let mut receivers = Vec::new();
    for (i, (ws, id, cred)) in actors.into_iter().enumerate() {
        let peer = ids[i ^ 1].clone();
        let (mut sink, mut stream) = ws.split();
        let hist = hist.clone();
        let received = received.clone();
        let sent = sent.clone();
        let filler = filler.clone();
        // Receiver.
        receivers.push(tokio::task::spawn_local(async move {
            loop {
                let Some(Ok(m)) = stream.next().await else {
                    break;
                };
                let Message::Binary(b) = m else { continue };
                let Ok(e) = SignalingEnvelope::decode(b) else {
                    continue;
                };
                if let Some(signaling_envelope::Flow::ActrRelay(ActrRelay {
                    payload: Some(actr_relay::Payload::SessionDescription(s)),
                    ..
                })) = e.flow
                {
                    let now = Instant::now();
                    if let Some(ns) = s
                        .sdp
                        .split_once(' ')
                        .and_then(|(t, _)| t.parse::<u64>().ok())
                    {
                        let sent_at = epoch + Duration::from_nanos(ns);
                        if sent_at >= measure_from && sent_at < stop_at {
                            let us = now.saturating_duration_since(sent_at).as_micros() as u64;
                            let _ = hist.borrow_mut().record(us.max(1));
                            received.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
        // Sender, phase-shifted so the load is spread over the tick. Each tick writes the
        // envelopes due since the last one and flushes once (fewer syscalls on the client core,
        // which is the bottleneck of this generator).
        let phase = tick_every.mul_f64(i as f64 / ids.len() as f64);
        tasks.push(tokio::task::spawn_local(async move {
            let mut tick = tokio::time::interval_at((epoch + phase).into(), tick_every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            let mut due = 0.0f64;
            loop {
                tick.tick().await;
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                due += per_tick;
                let mut wrote = false;
                while due >= 1.0 {
                    due -= 1.0;
                    n += 1;
                    let ns = Instant::now().duration_since(epoch).as_nanos() as u64;
                    let flow = signaling_envelope::Flow::ActrRelay(ActrRelay {
                        source: id.clone(),
                        credential: cred.clone(),
                        target: peer.clone(),
                        payload: Some(actr_relay::Payload::SessionDescription(
                            SessionDescription {
                                r#type: 0,
                                sdp: format!("{ns} {filler}"),
                            },
                        )),
                    });
                    if sink
                        .feed(Message::Binary(env(n, flow).into()))
                        .await
                        .is_err()
                    {
                        return;
                    }
                    wrote = true;
                    if now >= measure_from {
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if wrote && sink.flush().await.is_err() {
                    return;
                }
            }
        }));
    }
    tokio::time::sleep_until(measure_from.into()).await;
    let cpu0 = thread_cpu_secs("actrix-control");
    let relayed0 = stats.envelopes_relayed.load(Ordering::Relaxed);
    tokio::time::sleep_until(stop_at.into()).await;
    let cpu1 = thread_cpu_secs("actrix-control");
    let relayed1 = stats.envelopes_relayed.load(Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    // Let in-flight envelopes arrive, then stop the receivers.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for r in receivers {
        r.abort();
    }
    let h = hist.borrow();
    let window = a.secs as f64;
    let got = received.load(Ordering::Relaxed);
    println!(
        "offered {} env/s; sent {} and delivered {} in the {} s window: {:.0} envelopes/s delivered (hub relayed {:.0}/s)",
        a.rate,
        sent.load(Ordering::Relaxed),
        got,
        a.secs,
        got as f64 / window,
        (relayed1 - relayed0) as f64 / window,
    );
    println!(
        "latency us: p50 {} p90 {} p99 {} p99.9 {} max {} (n={})",
        h.value_at_quantile(0.50),
        h.value_at_quantile(0.90),
        h.value_at_quantile(0.99),
        h.value_at_quantile(0.999),
        h.max(),
        h.len()
    );
    if let (Some(c0), Some(c1)) = (cpu0, cpu1) {
        println!(
            "control thread CPU: {:.0}% of one core over the window",
            (c1 - c0) / window * 100.0
        );
    }
    println!(
        "server: slow-consumer drops {}, 429s {}, errors 401/403 {}/{}",
        stats.slow_consumer_drops.load(Ordering::Relaxed),
        stats.errors(429),
        stats.errors(401),
        stats.errors(403)
    );
    drop(idle);
}
