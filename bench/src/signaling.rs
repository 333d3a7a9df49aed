//! Signaling hub load over real WebSockets: `actors` actors register (`RegisterRequest` in a
//! `SignalingEnvelope`, through the appliance's AIS), idle connections bring the total to
//! `connections`, then every actor relays SDP envelopes to its partner at
//! `offered_eps / actors` per second for `warmup_secs + duration_secs`.
//!
//! Routing latency runs from just before the sender's WebSocket write to just after the
//! receiver decoded the relayed envelope (the send time travels in the SDP), so it includes
//! both clients' WebSocket work and the loopback, not only the hub: an upper bound on the hub's
//! own latency. Only envelopes sent inside the measured window count.
//!
//! The clients run on one current-thread tokio runtime on the generator's (pinned) thread, in
//! this process, separate from the appliance. On loopback they connect from `127.1.x.y`
//! source addresses, so the hub's per-IP limits see many clients.

use crate::control::agent;
use crate::load::{Ctx, Probe, Progress, Window};
use crate::report::{Sample, ScenarioReport};
use crate::scenario::SignalingSpec;
use crate::stats::{loss, rate, Latency};
use crate::target::Target;
use actrix_control::ais::{put_realm_payload, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use actrix_control::nonce_auth::make_credential;
use actrix_signaling::proto::*;
use futures_util::{SinkExt, StreamExt};
use prost::Message as _;
use std::cell::RefCell;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::rc::Rc;
use std::time::{Duration, Instant};
use tokio_tungstenite::tungstenite::Message;

type Ws = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// Loopback source addresses the clients spread over.
const SOURCE_IPS: usize = 200;
/// Connections being opened at once.
const CONNECT_CONCURRENCY: usize = 64;

fn envelope(id: u64, flow: signaling_envelope::Flow) -> Vec<u8> {
    SignalingEnvelope {
        envelope_version: 1,
        envelope_id: id.to_string(),
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

fn actr_type(name: &str) -> ActrType {
    ActrType {
        manufacturer: "bench".into(),
        name: name.into(),
        version: Some("1".into()),
    }
}

/// Create (or update) `realm` as Normal through the signed AIS admin route.
pub fn ensure_realm(http: &str, shared_key: &str, realm: u32) -> Result<(), String> {
    let body = serde_json::json!({"name": "bench", "status": "Normal"}).to_string();
    let cred = make_credential(
        crate::target::unix_now(),
        shared_key.as_bytes(),
        &put_realm_payload(realm, body.as_bytes()),
    );
    let mut resp = agent()
        .put(format!("{http}/ais/realms/{realm}"))
        .header("content-type", "application/json")
        .header(HEADER_TIMESTAMP, cred.timestamp.to_string())
        .header(HEADER_NONCE, cred.nonce)
        .header(HEADER_SIGNATURE, cred.signature)
        .send(body)
        .map_err(|e| format!("PUT /ais/realms/{realm}: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if status == 200 && !text.contains("\"error\"") {
        Ok(())
    } else {
        Err(format!(
            "PUT /ais/realms/{realm}: HTTP {status}: {}",
            text.chars().take(200).collect::<String>()
        ))
    }
}

/// The server's address and the WebSocket URL from the HTTP base URL.
fn ws_endpoint(http: &str) -> Result<(SocketAddr, String), String> {
    let rest = http
        .strip_prefix("http://")
        .ok_or_else(|| format!("{http}: the signaling scenario speaks plain http:// only"))?;
    let hostport = rest.split('/').next().unwrap_or(rest);
    let addr: SocketAddr = hostport
        .parse()
        .map_err(|_| format!("{http}: expected http://IP:PORT"))?;
    Ok((addr, format!("ws://{hostport}/signaling/ws")))
}

fn source_for(server: SocketAddr, i: usize) -> Option<SocketAddr> {
    match server.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => {
            let i = i % SOURCE_IPS;
            Some(SocketAddr::from((
                Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8),
                0,
            )))
        }
        _ => None,
    }
}

async fn connect(server: SocketAddr, url: &str, i: usize) -> Result<Ws, String> {
    let sock = if server.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(src) = source_for(server, i) {
        sock.bind(src).map_err(|e| format!("bind {src}: {e}"))?;
    }
    let stream = sock
        .connect(server)
        .await
        .map_err(|e| format!("connect {server}: {e}"))?;
    let _ = stream.set_nodelay(true);
    // tungstenite zero-fills its read buffer up to `read_buffer_size` before every read: the
    // 128 KiB default made memset a quarter of the generator's CPU. Envelopes are small.
    let config =
        tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default().read_buffer_size(4096);
    let (ws, _) = tokio_tungstenite::client_async_with_config(url, stream, Some(config))
        .await
        .map_err(|e| format!("WebSocket upgrade: {e}"))?;
    Ok(ws)
}

async fn register(
    ws: &mut Ws,
    realm: u32,
    me: &str,
    peer: &str,
) -> Result<(ActrId, AIdCredential), String> {
    let req = RegisterRequest {
        actr_type: actr_type(me),
        realm: Realm { realm_id: realm },
        service_spec: None,
        acl: Some(Acl {
            rules: vec![AclRule {
                principals: vec![acl_rule::Principal {
                    realm: None,
                    actr_type: Some(actr_type(peer)),
                }],
                permission: acl_rule::ALLOW,
            }],
        }),
        service: None,
        ws_address: None,
    };
    let bytes = envelope(
        0,
        signaling_envelope::Flow::PeerToServer(PeerToSignaling {
            payload: Some(peer_to_signaling::Payload::RegisterRequest(req)),
        }),
    );
    ws.send(Message::Binary(bytes.into()))
        .await
        .map_err(|e| format!("send register: {e}"))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let m = tokio::time::timeout_at(deadline, ws.next())
            .await
            .map_err(|_| "no RegisterResponse within 10 s".to_string())?;
        let b = match m {
            Some(Ok(Message::Binary(b))) => b,
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(format!("register: {e}")),
            None => return Err("closed during register".into()),
        };
        let Ok(e) = SignalingEnvelope::decode(b) else {
            return Err("undecodable envelope".into());
        };
        if let Some(signaling_envelope::Flow::ServerToActr(SignalingToActr {
            payload: Some(signaling_to_actr::Payload::RegisterResponse(r)),
            ..
        })) = e.flow
        {
            return match r.result {
                Some(register_response::Result::Success(ok)) => Ok((ok.actr_id, ok.credential)),
                Some(register_response::Result::Error(e)) => {
                    Err(format!("register refused: {} {}", e.code, e.message))
                }
                None => Err("empty RegisterResponse".into()),
            };
        }
    }
}

/// What the clients saw.
#[derive(Default)]
struct Tally {
    sent: u64,
    delivered: u64,
    latency: Latency,
    /// Delivered per second of the whole run (for the time series).
    per_sec: Vec<u64>,
    closed_early: u64,
}

pub fn run(target: &Target, spec: &SignalingSpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    let (Some(http), Some(key)) = (target.http.clone(), target.shared_key.clone()) else {
        rep.fail("needs --http and --shared-key-file (the realm is created with the shared key)");
        return;
    };
    let (server, url) = match ws_endpoint(&http) {
        Ok(x) => x,
        Err(e) => {
            rep.fail(e);
            return;
        }
    };
    let fds = crate::sys::raise_fd_limit();
    if (spec.connections as u64) + 64 > fds {
        rep.fail(format!(
            "{} connections need more file descriptors than RLIMIT_NOFILE allows ({fds})",
            spec.connections
        ));
        return;
    }
    if let Err(e) = ensure_realm(&http, &key, spec.realm) {
        rep.fail(e);
        return;
    }
    // Cross-node: the odd actors on the second node (its realms table is its own).
    let peer = if spec.peer_http.is_empty() {
        None
    } else {
        let peer_http = spec.peer_http.trim_end_matches('/').to_owned();
        if let Err(e) = ensure_realm(&peer_http, &key, spec.realm) {
            rep.fail(e);
            return;
        }
        match ws_endpoint(&peer_http) {
            Ok(x) => Some(x),
            Err(e) => {
                rep.fail(e);
                return;
            }
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            rep.fail(format!("tokio runtime: {e}"));
            return;
        }
    };
    let probe = Probe { pid: target.pid };
    let local = tokio::task::LocalSet::new();
    let metrics_url = format!("{}/metrics", http.trim_end_matches('/'));
    local.block_on(
        &rt,
        drive(
            server,
            url,
            peer,
            metrics_url,
            spec.clone(),
            ctx.clone(),
            probe,
            rep,
        ),
    );
}

/// The server's forward-latency histogram, if it exports one (the appliance does).
async fn hub_histogram(metrics_url: &str) -> Option<Vec<(f64, u64)>> {
    let url = metrics_url.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut resp = crate::control::agent().get(&url).call().ok()?;
        if resp.status() != 200 {
            return None;
        }
        let text = resp.body_mut().read_to_string().ok()?;
        crate::stats::prom_histogram(&text, HUB_LATENCY_METRIC)
    })
    .await
    .ok()
    .flatten()
}

/// The appliance's histogram of the time from an envelope's arrival to its relay written.
const HUB_LATENCY_METRIC: &str = "actrix_signaling_forward_latency_seconds";

#[allow(clippy::too_many_arguments)]
async fn drive(
    server: SocketAddr,
    url: String,
    peer: Option<(SocketAddr, String)>,
    metrics_url: String,

    spec: SignalingSpec,
    ctx: Ctx,
    probe: Probe,
    rep: &mut ScenarioReport,
) {
    let mut progress = Progress::new(ctx.progress);
    let t_setup = Instant::now();
    // 1. Register the actors (pairs 2k <-> 2k+1), a bounded number at a time.
    let mut actors: Vec<(Ws, ActrId, AIdCredential)> = Vec::with_capacity(spec.actors);
    let mut pending = futures_util::stream::FuturesOrdered::new();
    let mut setup_err = None;
    for i in 0..spec.actors {
        let (server, url) = match &peer {
            Some((s, u)) if i % 2 == 1 => (*s, u.clone()),
            _ => (server, url.clone()),
        };
        let realm = spec.realm;
        let (me, peer) = if i % 2 == 0 { ("a", "b") } else { ("b", "a") };
        pending.push_back(async move {
            let mut ws = connect(server, &url, i).await?;
            let (id, cred) = register(&mut ws, realm, me, peer).await?;
            Ok::<_, String>((ws, id, cred))
        });
        if pending.len() >= CONNECT_CONCURRENCY {
            match pending.next().await {
                Some(Ok(a)) => actors.push(a),
                Some(Err(e)) => {
                    setup_err = Some(e);
                    break;
                }
                None => {}
            }
        }
    }
    while setup_err.is_none() {
        match pending.next().await {
            Some(Ok(a)) => actors.push(a),
            Some(Err(e)) => setup_err = Some(e),
            None => break,
        }
    }
    drop(pending);
    if let Some(e) = setup_err {
        rep.fail(format!(
            "registering actor {} of {}: {e}",
            actors.len() + 1,
            spec.actors
        ));
        return;
    }
    let register_secs = t_setup.elapsed().as_secs_f64();
    if peer.is_some() {
        rep.set("nodes", 2.0);
        // The registrations reach the other node over the bus within milliseconds; relays
        // sent before would be dropped as having no target.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    rep.set("register_secs", register_secs);
    rep.set(
        "registrations_per_s",
        rate(spec.actors as u64, register_secs),
    );
    progress.tick(true, || {
        format!("{}: {} actors registered", rep.name, spec.actors)
    });
    // 2. Idle connections up to the total.
    let mut idle: Vec<Ws> = Vec::with_capacity(spec.connections - spec.actors);
    let mut pending = futures_util::stream::FuturesUnordered::new();
    for i in spec.actors..spec.connections {
        let url = url.clone();
        pending.push(async move { connect(server, &url, i).await });
        if pending.len() >= CONNECT_CONCURRENCY {
            match pending.next().await {
                Some(Ok(ws)) => idle.push(ws),
                Some(Err(e)) => {
                    setup_err = Some(e);
                    break;
                }
                None => {}
            }
        }
        progress.tick(false, || {
            format!(
                "{}: {} connections open",
                rep.name,
                spec.actors + idle.len()
            )
        });
    }
    while setup_err.is_none() {
        match pending.next().await {
            Some(Ok(ws)) => idle.push(ws),
            Some(Err(e)) => setup_err = Some(e),
            None => break,
        }
    }
    drop(pending);
    if let Some(e) = setup_err {
        rep.fail(format!(
            "opening connection {} of {}: {e}",
            spec.actors + idle.len() + 1,
            spec.connections
        ));
        return;
    }
    rep.set("connections", (spec.actors + idle.len()) as f64);
    rep.set(
        "connect_secs",
        t_setup.elapsed().as_secs_f64() - register_secs,
    );

    // 3. Relay.
    let tally = Rc::new(RefCell::new(Tally::default()));
    let epoch = Instant::now();
    let measure_from = epoch + Duration::from_secs_f64(spec.warmup_secs);
    let stop_at = measure_from + Duration::from_secs_f64(spec.duration_secs);
    let total_secs = (spec.warmup_secs + spec.duration_secs).ceil() as usize + 2;
    tally.borrow_mut().per_sec = vec![0; total_secs];
    // Each sender wakes every `tick` and writes what is due, then flushes once.
    let tick =
        Duration::from_secs_f64((spec.actors as f64 / spec.offered_eps as f64).clamp(0.001, 0.05));
    let per_tick = spec.offered_eps as f64 / spec.actors as f64 * tick.as_secs_f64();
    let filler = "x".repeat(spec.payload);
    let ids: Vec<ActrId> = actors.iter().map(|a| a.1.clone()).collect();
    let n_actors = ids.len();
    let mut senders = Vec::with_capacity(n_actors);
    let mut receivers = Vec::with_capacity(n_actors);
    for (i, (ws, id, cred)) in actors.into_iter().enumerate() {
        let peer = ids[i ^ 1].clone();
        let (mut sink, mut stream) = ws.split();
        let t_rx = tally.clone();
        receivers.push(tokio::task::spawn_local(async move {
            while let Some(m) = stream.next().await {
                let Ok(Message::Binary(b)) = m else {
                    if m.is_err() {
                        break;
                    }
                    continue;
                };
                let now = Instant::now();
                let Ok(e) = SignalingEnvelope::decode(b) else {
                    continue;
                };
                let Some(signaling_envelope::Flow::ActrRelay(ActrRelay {
                    payload: Some(actr_relay::Payload::SessionDescription(s)),
                    ..
                })) = e.flow
                else {
                    continue;
                };
                let Some(ns) = s
                    .sdp
                    .split_once(' ')
                    .and_then(|(t, _)| t.parse::<u64>().ok())
                else {
                    continue;
                };
                let sent_at = epoch + Duration::from_nanos(ns);
                let mut t = t_rx.borrow_mut();
                let sec = now.saturating_duration_since(epoch).as_secs() as usize;
                if let Some(c) = t.per_sec.get_mut(sec) {
                    *c += 1;
                }
                if sent_at >= measure_from && sent_at < stop_at {
                    t.latency
                        .record_ns(now.saturating_duration_since(sent_at).as_nanos() as u64);
                    t.delivered += 1;
                }
            }
        }));
        let t_tx = tally.clone();
        let filler = filler.clone();
        let phase = tick.mul_f64(i as f64 / n_actors as f64);
        senders.push(tokio::task::spawn_local(async move {
            let mut ticker = tokio::time::interval_at((epoch + phase).into(), tick);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let (mut n, mut due) = (0u64, 0.0f64);
            loop {
                ticker.tick().await;
                let now = Instant::now();
                if now >= stop_at {
                    break;
                }
                due += per_tick;
                let mut wrote = 0u64;
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
                                sdp_exchange_id: None,
                            },
                        )),
                    });
                    if sink
                        .feed(Message::Binary(envelope(n, flow).into()))
                        .await
                        .is_err()
                    {
                        t_tx.borrow_mut().closed_early += 1;
                        return;
                    }
                    if now >= measure_from {
                        wrote += 1;
                    }
                }
                if sink.flush().await.is_err() {
                    t_tx.borrow_mut().closed_early += 1;
                    return;
                }
                t_tx.borrow_mut().sent += wrote;
            }
        }));
    }
    // The generator's own responsiveness: a task due every millisecond records how late it
    // runs. Its tail is a floor under what this process can measure (its stalls, the VM's).
    let stalls = Rc::new(RefCell::new(Latency::new()));
    let stall_probe = {
        let stalls = stalls.clone();
        tokio::task::spawn_local(async move {
            let mut due = measure_from;
            while due < stop_at {
                due += Duration::from_millis(1);
                tokio::time::sleep_until(due.into()).await;
                let late = Instant::now().saturating_duration_since(due);
                stalls.borrow_mut().record_ns(late.as_nanos() as u64);
            }
        })
    };
    tokio::time::sleep_until(measure_from.into()).await;
    let hub_before = hub_histogram(&metrics_url).await;
    let win = Window::open(probe);
    while Instant::now() < stop_at {
        tokio::time::sleep(Duration::from_millis(200)).await;
        progress.tick(false, || {
            let t = tally.borrow();
            let el = measure_from.elapsed().as_secs_f64();
            format!(
                "{}: {:.0}s sent {} delivered {} ({:.0}/s), p99 {:.2} ms",
                rep.name,
                el,
                t.sent,
                t.delivered,
                rate(t.delivered, el),
                t.latency.quantile_us(0.99) / 1000.0
            )
        });
    }
    let m = win.close();
    for s in senders {
        let _ = s.await;
    }
    // In-flight envelopes arrive, then the receivers stop.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for r in receivers {
        r.abort();
    }
    let _ = stall_probe.await;
    let hub_after = hub_histogram(&metrics_url).await;
    progress.done();
    drop(idle);

    let t = tally.borrow();
    rep.server = m.server_usage(probe);
    rep.generator = m.generator_usage(&ctx);
    let eps = rate(t.delivered, spec.duration_secs);
    rep.set("offered_eps", spec.offered_eps as f64);
    rep.set("sent_eps", rate(t.sent, spec.duration_secs));
    rep.set("envelopes_per_s", eps);
    rep.set("loss", loss(t.sent, t.delivered));
    if let Some(cpu) = m.server_cpu.filter(|_| t.delivered > 0) {
        rep.set("cpu_us_per_envelope", cpu * 1e6 / t.delivered as f64);
    }
    let lat = t.latency.summary();
    rep.timeseries = t
        .per_sec
        .iter()
        .enumerate()
        .map(|(s, &n)| Sample {
            t: s as f64 + 1.0,
            offered_pps: spec.offered_eps as f64,
            relayed_pps: n as f64,
            completed_pps: n as f64,
        })
        .collect();
    if let Some(why) =
        crate::load::generator_limited(spec.offered_eps, t.sent, spec.duration_secs, 0)
    {
        rep.generator.limited = true;
        rep.generator.limit_reason = Some(why);
    }
    if t.closed_early > 0 {
        rep.fail(format!(
            "{} actor connections closed during the run",
            t.closed_early
        ));
    }
    let l = loss(t.sent, t.delivered);
    let max_loss = ctx.max_loss.unwrap_or(spec.max_loss);
    if t.delivered == 0 {
        rep.fail("no envelope was delivered");
    } else if l > max_loss {
        rep.fail(format!(
            "{:.3}% of envelopes not delivered (allowed {:.3}%)",
            l * 100.0,
            max_loss * 100.0
        ));
    }
    if spec.max_p99_ms > 0.0 && lat.p99_us > spec.max_p99_ms * 1000.0 {
        rep.fail(format!(
            "p99 routing latency {:.2} ms above {:.2} ms",
            lat.p99_us / 1000.0,
            spec.max_p99_ms
        ));
    }
    rep.latency = Some(lat);

    let s = stalls.borrow();
    if s.count() > 0 {
        rep.set("generator_late_p99_ms", s.quantile_us(0.99) / 1000.0);
        rep.set("generator_late_p999_ms", s.quantile_us(0.999) / 1000.0);
        rep.set("generator_late_max_ms", s.quantile_us(1.0) / 1000.0);
    }
    match hub_before
        .zip(hub_after)
        .and_then(|(b, a)| crate::stats::histogram_delta(&b, &a))
    {
        Some(h) if h.last().is_some_and(|l| l.1 > 0) => {
            let ms = |q| crate::stats::bucket_quantile(&h, q).map(|s| s * 1000.0);
            rep.set_opt("hub_forward_p50_ms_at_most", ms(0.5));
            rep.set_opt("hub_forward_p99_ms_at_most", ms(0.99));
            rep.set_opt("hub_forward_p999_ms_at_most", ms(0.999));
            rep.set_opt(
                "hub_forward_within_5ms",
                crate::stats::fraction_within(&h, 0.005),
            );
            rep.notes.push(format!(
                "server side ({HUB_LATENCY_METRIC}, bucket bounds): arrival to relay written p50 <= {} ms, p99 <= {} ms; the end-to-end figures add both processes' scheduling and the generator's own lateness (p99 {:.2} ms)",
                fmt_ms(ms(0.5)),
                fmt_ms(ms(0.99)),
                s.quantile_us(0.99) / 1000.0
            ));
        }
        _ => rep.notes.push(format!(
            "the server exports no {HUB_LATENCY_METRIC} histogram"
        )),
    }
}

fn fmt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v}"),
        Some(_) => "inf".into(),
        None => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_and_sources() {
        let (a, u) = ws_endpoint("http://127.0.0.1:8080").unwrap();
        assert_eq!(a, "127.0.0.1:8080".parse().unwrap());
        assert_eq!(u, "ws://127.0.0.1:8080/signaling/ws");
        assert!(ws_endpoint("https://127.0.0.1:8443").is_err());
        assert!(ws_endpoint("http://localhost:8080").is_err());
        let s: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert_eq!(source_for(s, 0), Some("127.1.0.1:0".parse().unwrap()));
        assert_eq!(source_for(s, 199), Some("127.1.0.200:0".parse().unwrap()));

        assert_eq!(source_for(s, SOURCE_IPS), source_for(s, 0));
        assert_eq!(source_for("192.0.2.1:1".parse().unwrap(), 3), None);
    }
}
