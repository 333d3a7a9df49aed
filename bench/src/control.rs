//! Key Server and AIS request rates over real HTTP: `connections` closed-loop workers, each on
//! its own keep-alive connection, all on the generator's core (threads inherit its pinning).
//!
//! - `ks`, operation `secret`: one key is generated first, then every worker fetches its secret
//!   (`GET /ks/secret/{id}`, signed, a fresh nonce each time: the full verification path
//!   including the nonce commit) and checks the answer is that key, 32 bytes.
//! - `ks`, operation `generate`: `POST /ks/generate` (key generation, encryption at rest, commit).
//! - `ais`: `POST /ais/register` with a protobuf `RegisterRequest`, signed with the shared key
//!   unless `signed = false`; a response counts only if it is a success with a 32-byte PSK and a
//!   credential. With `protocol = "0.4"`: the actr 0.4 request as actr-hyper's `AisClient`
//!   sends it (`application/x-protobuf`, unsigned), after the realm was provisioned with a
//!   signed `PUT /ais/realms/{id}`; a response counts only if its claims decode and name the
//!   realm, its key id is the returned signing key's, and it carries a TURN credential and a
//!   renewal token; the Ed25519 signature is verified under the returned `signing_pubkey` on
//!   the first and every `verify_every`-th response of each worker (1 = all; a verification
//!   costs the generator more than the signing costs the server).
//!
//! Reported: completed requests/s, failures by reason, latency percentiles, server CPU per
//! request (from /proc/PID/stat of the appliance).

use crate::load::{Ctx, Probe, Progress, Window};
use crate::report::{Sample, ScenarioReport};
use crate::scenario::{AisSpec, KsOperation, KsSpec};
use crate::stats::{rate, Latency};
use crate::target::Target;
use actrix_control::ais::proto::{register_response, ActrType, Realm, RegisterRequest};
use actrix_control::ais::{register_payload, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use actrix_control::nonce_auth::make_credential;
use actrix_control::KsClient;
use prost::Message as _;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// What the closed loop measured.
#[derive(Debug, Default)]
pub struct LoopOutcome {
    pub ok: u64,
    pub failed: u64,
    /// Failure reason -> count.
    pub reasons: BTreeMap<String, u64>,
    pub latency: Latency,
    pub secs: f64,
    pub timeseries: Vec<Sample>,
}

/// Run `connections` workers for `duration`; `make(i)` builds worker i's request function,
/// which performs one request and says whether it succeeded (`Err(reason)` otherwise).
pub fn closed_loop<F, M>(
    connections: usize,
    duration: Duration,
    progress: &mut Progress,
    label: &str,
    make: M,
) -> LoopOutcome
where
    M: Fn(usize) -> F,
    F: FnMut() -> Result<(), String> + Send + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let reasons: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let t0 = Instant::now();
    let mut workers = Vec::with_capacity(connections);
    for i in 0..connections {
        let mut op = make(i);
        let (stop2, ok2, failed2, reasons2) =
            (stop.clone(), ok.clone(), failed.clone(), reasons.clone());
        let w = std::thread::Builder::new()
            .name(format!("bench-http-{i}"))
            .spawn(move || {
                let mut lat = Latency::new();
                while !stop2.load(Ordering::Relaxed) {
                    let t = Instant::now();
                    match op() {
                        Ok(()) => {
                            lat.record_ns(t.elapsed().as_nanos() as u64);
                            ok2.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(why) => {
                            failed2.fetch_add(1, Ordering::Relaxed);
                            if let Ok(mut r) = reasons2.lock() {
                                *r.entry(why).or_insert(0) += 1;
                            }
                            // Do not spin on a dead server.
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                }
                lat
            });
        match w {
            Ok(h) => workers.push(h),
            Err(e) => {
                if let Ok(mut r) = reasons.lock() {
                    *r.entry(format!("cannot start a worker: {e}")).or_insert(0) += 1;
                }
                break;
            }
        }
    }
    let mut timeseries = Vec::new();
    let mut last = (0.0, 0u64);
    while t0.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100).min(duration.saturating_sub(t0.elapsed())));
        let t = t0.elapsed().as_secs_f64();
        let n = ok.load(Ordering::Relaxed);
        if t - last.0 >= 1.0 || t0.elapsed() >= duration {
            let r = rate(n - last.1, t - last.0);
            timeseries.push(Sample {
                t,
                offered_pps: 0.0,
                relayed_pps: 0.0,
                completed_pps: r,
            });
            last = (t, n);
        }
        progress.tick(false, || {
            format!(
                "{label}: {t:.0}s {n} ok, {} failed, {:.0}/s",
                failed.load(Ordering::Relaxed),
                rate(n, t)
            )
        });
    }
    stop.store(true, Ordering::Relaxed);
    let secs = t0.elapsed().as_secs_f64();
    let mut latency = Latency::new();
    for w in workers {
        if let Ok(l) = w.join() {
            latency.merge(&l);
        }
    }
    progress.done();
    let reasons = reasons.lock().map(|r| r.clone()).unwrap_or_default();
    LoopOutcome {
        ok: ok.load(Ordering::Relaxed),
        failed: failed.load(Ordering::Relaxed),
        reasons,
        latency,
        secs,
        timeseries,
    }
}

/// The HTTP base URL and shared key, or why the scenario cannot run.
fn endpoint(target: &Target, rep: &mut ScenarioReport) -> Option<(String, String)> {
    let Some(http) = target.http.clone() else {
        rep.fail("needs the appliance's HTTP address (--http http://HOST:PORT)");
        return None;
    };
    let Some(key) = target.shared_key.clone() else {
        rep.fail("needs the KS/AIS shared key (--shared-key-file PATH)");
        return None;
    };
    Some((http, key))
}

/// Fill the report from a closed-loop outcome: rate, latency, CPU per request, thresholds.
fn finish(
    rep: &mut ScenarioReport,
    out: LoopOutcome,
    win: &Window,
    probe: Probe,
    ctx: &Ctx,
    metric: &str,
    (max_errors, min_rate): (f64, f64),
) {
    let m = win.close();
    rep.server = m.server_usage(probe);
    rep.generator = m.generator_usage(ctx);
    let total = out.ok + out.failed;
    let r = rate(out.ok, out.secs);
    rep.set(metric, r);
    rep.set("requests_ok", out.ok as f64);
    rep.set("requests_failed", out.failed as f64);
    if let Some(cpu) = m.server_cpu.filter(|_| out.ok > 0) {
        rep.set("cpu_us_per_request", cpu * 1e6 / out.ok as f64);
    }
    rep.latency = Some(out.latency.summary());
    rep.timeseries = out.timeseries;
    for (why, n) in &out.reasons {
        rep.notes.push(format!("{n} failed: {why}"));
    }
    if rep.generator.cpu_util > 0.9 {
        rep.generator.limited = true;
        rep.generator.limit_reason = Some(format!(
            "the generator used {:.0}% of its core",
            rep.generator.cpu_util * 100.0
        ));
    }
    let max_errors = ctx.max_loss.unwrap_or(max_errors);
    if total == 0 || out.ok == 0 {
        rep.fail("no request succeeded");
    } else if out.failed as f64 > max_errors * total as f64 {
        rep.fail(format!(
            "{} of {total} requests failed (allowed {:.2}%)",
            out.failed,
            max_errors * 100.0
        ));
    }
    if min_rate > 0.0 && r < min_rate {
        rep.fail(format!(
            "{r:.0} requests/s, below the floor of {min_rate:.0}/s"
        ));
    }
}

pub fn ks(target: &Target, spec: &KsSpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    let Some((http, key)) = endpoint(target, rep) else {
        return;
    };
    let setup = KsClient::new(&http, &key);
    let key_id = match spec.operation {
        KsOperation::Generate => 0,
        KsOperation::Secret => match setup.generate_key() {
            Ok(k) => k.key.key_id,
            Err(e) => {
                rep.fail(format!("cannot generate the key to fetch: {e}"));
                return;
            }
        },
    };
    let probe = Probe { pid: target.pid };
    let mut progress = Progress::new(ctx.progress);
    let win = Window::open(probe);
    let op = spec.operation;
    let out = closed_loop(
        spec.connections,
        Duration::from_secs_f64(spec.duration_secs),
        &mut progress,
        rep.name.as_str(),
        |_| {
            let c = KsClient::new(&http, &key);
            move || match op {
                KsOperation::Secret => match c.get_secret_key(key_id) {
                    Ok(s) if s.key_id == key_id => Ok(()),
                    Ok(_) => Err("wrong key returned".into()),
                    Err(e) => Err(e.to_string()),
                },
                KsOperation::Generate => c.generate_key().map(|_| ()).map_err(|e| e.to_string()),
            }
        },
    );
    let metric = match op {
        KsOperation::Secret => "ks_secret_rps",
        KsOperation::Generate => "ks_generate_rps",
    };
    finish(
        rep,
        out,
        &win,
        probe,
        ctx,
        metric,
        (spec.max_errors, spec.min_rate),
    );
}

/// One signed (or unsigned) AIS registration; checks the response is a usable credential.
pub fn ais_register(
    agent: &ureq::Agent,
    http: &str,
    shared_key: &str,
    realm: u32,
    signed: bool,
) -> Result<(), String> {
    let body = RegisterRequest {
        actr_type: ActrType {
            manufacturer: "bench".into(),
            name: "load".into(),
            version: None,
        },
        realm: Realm { realm_id: realm },
        ..Default::default()
    }
    .encode_to_vec();
    let mut req = agent
        .post(format!("{http}/ais/register"))
        .header("content-type", "application/octet-stream");
    if signed {
        let now = crate::target::unix_now();
        let cred = make_credential(now, shared_key.as_bytes(), &register_payload(&body));
        req = req
            .header(HEADER_TIMESTAMP, cred.timestamp.to_string())
            .header(HEADER_NONCE, cred.nonce)
            .header(HEADER_SIGNATURE, cred.signature);
    }
    let mut resp = req.send(&body[..]).map_err(|e| format!("transport: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_vec()
        .map_err(|e| format!("reading the body: {e}"))?;
    let decoded = actrix_control::ais::proto::RegisterResponse::decode(&bytes[..])
        .map_err(|_| format!("HTTP {status}: undecodable RegisterResponse"))?;
    match decoded.result {
        Some(register_response::Result::Success(ok))
            if ok.psk.as_ref().is_some_and(|p| p.len() == 32)
                && !ok.credential.encrypted_token.is_empty() =>
        {
            Ok(())
        }
        Some(register_response::Result::Success(_)) => Err("success without PSK or token".into()),
        Some(register_response::Result::Error(e)) => {
            Err(format!("HTTP {status}: error {}: {}", e.code, e.message))
        }
        None => Err(format!("HTTP {status}: empty RegisterResponse")),
    }
}

/// Provision `realm` (Normal) with a signed `PUT /ais/realms/{realm}`.
pub fn provision_realm(
    agent: &ureq::Agent,
    http: &str,
    shared_key: &str,
    realm: u32,
) -> Result<(), String> {
    let body = serde_json::json!({"name": "bench", "status": "Normal"}).to_string();
    let now = crate::target::unix_now();
    let cred = make_credential(
        now,
        shared_key.as_bytes(),
        &actrix_control::ais::put_realm_payload(realm, body.as_bytes()),
    );
    let mut resp = agent
        .put(format!("{http}/ais/realms/{realm}"))
        .header("content-type", "application/json")
        .header(HEADER_TIMESTAMP, cred.timestamp.to_string())
        .header(HEADER_NONCE, cred.nonce)
        .header(HEADER_SIGNATURE, cred.signature)
        .send(body.as_bytes())
        .map_err(|e| format!("transport: {e}"))?;
    let status = resp.status().as_u16();
    let text = resp.body_mut().read_to_string().unwrap_or_default();
    if status == 200 && !text.contains("\"error\"") {
        Ok(())
    } else {
        Err(format!("HTTP {status}: {text}"))
    }
}

/// One actr 0.4 registration as actr-hyper 0.4's `AisClient` sends it; checks the answer is a
/// usable 0.4 credential set: claims that decode and name the realm, the key id of the
/// returned signing key, a TURN credential and a renewal token; and, when `verify` is set, the
/// Ed25519 signature over the claims under the returned `signing_pubkey`.
pub fn ais_register_v4(
    agent: &ureq::Agent,
    http: &str,
    realm: u32,
    verify: bool,
) -> Result<(), String> {
    use actrix_wire::v4::actr as a4;
    let body = a4::RegisterRequest {
        actr_type: a4::ActrType {
            manufacturer: "bench".into(),
            name: "load".into(),
            version: "1.0.0".into(),
        },
        realm: a4::Realm { realm_id: realm },
        auth_mode: Some(a4::RegisterAuthMode::Linked as i32),
        ..Default::default()
    }
    .encode_to_vec();
    let mut resp = agent
        .post(format!("{http}/ais/register"))
        .header("content-type", "application/x-protobuf")
        .header("accept", "application/x-protobuf")
        .send(&body[..])
        .map_err(|e| format!("transport: {e}"))?;
    let status = resp.status().as_u16();
    let bytes = resp
        .body_mut()
        .with_config()
        .limit(64 * 1024)
        .read_to_vec()
        .map_err(|e| format!("reading the body: {e}"))?;
    let decoded = a4::RegisterResponse::decode(&bytes[..])
        .map_err(|_| format!("HTTP {status}: undecodable 0.4 RegisterResponse"))?;
    match decoded.result {
        Some(a4::register_response::Result::Success(ok)) => {
            let claims = a4::IdentityClaims::decode(&ok.credential.claims[..])
                .map_err(|_| "credential claims are not an IdentityClaims".to_owned())?;
            if claims.realm_id != realm || claims.actor_id.is_empty() {
                return Err("claims name another realm or no actor".into());
            }
            if ok.credential.key_id != ok.signing_key_id {
                return Err("credential key id is not the returned signing key's".into());
            }
            if ok.turn_credential.password.is_empty() || ok.renewal_token.is_none() {
                return Err("success without TURN credential or renewal token".into());
            }
            if verify {
                let key: [u8; 32] = ok.signing_pubkey[..]
                    .try_into()
                    .map_err(|_| "signing_pubkey is not 32 bytes".to_owned())?;
                if !actrix_control::ais::signing::SigningKeys::verify_with(
                    &key,
                    &ok.credential.claims,
                    &ok.credential.signature,
                ) {
                    return Err("credential signature does not verify".into());
                }
            }
            Ok(())
        }
        Some(a4::register_response::Result::Error(e)) => {
            Err(format!("HTTP {status}: error {}: {}", e.code, e.message))
        }
        None => Err(format!("HTTP {status}: empty RegisterResponse")),
    }
}

/// An HTTP agent that reports statuses instead of failing on them.
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(5)))
        .max_redirects(0)
        .build()
        .into()
}

pub fn ais(target: &Target, spec: &AisSpec, ctx: &Ctx, rep: &mut ScenarioReport) {
    let Some((http, key)) = endpoint(target, rep) else {
        return;
    };
    let probe = Probe { pid: target.pid };
    let mut progress = Progress::new(ctx.progress);
    let win = Window::open(probe);
    let (realm, signed) = (spec.realm, spec.signed);
    let verify_every = u64::from(spec.verify_every.max(1));
    let v4 = match spec.protocol.as_str() {
        "0.1.7" => false,
        "0.4" => true,
        other => {
            rep.fail(format!(
                "ais.protocol: {other:?} is neither \"0.1.7\" nor \"0.4\""
            ));
            return;
        }
    };
    if v4 {
        if let Err(e) = provision_realm(&agent(), &http, &key, realm) {
            rep.fail(format!("cannot provision realm {realm}: {e}"));
            return;
        }
    }
    let out = closed_loop(
        spec.connections,
        Duration::from_secs_f64(spec.duration_secs),
        &mut progress,
        rep.name.as_str(),
        |_| {
            let (a, http, key) = (agent(), http.clone(), key.clone());
            let mut n = 0u64;
            move || {
                if v4 {
                    // Every response is checked; the signature of the first and of every
                    // `verify_every`-th one (verifying costs the generator more than signing
                    // costs the server).
                    let verify = n.is_multiple_of(verify_every);
                    n += 1;
                    ais_register_v4(&a, &http, realm, verify)
                } else {
                    ais_register(&a, &http, &key, realm, signed)
                }
            }
        },
    );
    finish(
        rep,
        out,
        &win,
        probe,
        ctx,
        if v4 {
            "ais_register_v4_rps"
        } else {
            "ais_register_rps"
        },
        (spec.max_errors, spec.min_rate),
    );
}
