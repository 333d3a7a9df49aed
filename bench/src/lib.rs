//! actrix-bench: a load harness for STUN/TURN servers (actrix, coturn, anything that speaks
//! RFC 8489/8656), with a bare recvmmsg/sendmmsg forwarder as the reference floor.
//!
//! - [`scenario`]: the TOML scenario files;
//! - [`binding`], [`alloc`], [`relay`]: the load of each STUN/TURN scenario kind (`alloc`:
//!   churn, idle and handshakes);
//! - [`control`] (KS and AIS request rates over HTTP), [`signaling`] (WebSocket actors,
//!   envelopes/s, routing latency): the appliance's control-thread services;
//! - [`turn_client`]: the TURN client state machine and its multi-session driver, over UDP
//!   or a TCP/TLS connection ([`stream`]: non-blocking connections, rustls, stream framing);
//! - [`reference`]: the forwarder/echo;
//! - [`report`], [`svg`], [`compare`]: JSON, tables, plots and the comparison report;
//! - [`sys`], [`load`], [`stats`]: batched I/O, pacing, /proc accounting, percentiles.
//!
//! Adding a scenario kind: a [`scenario::Kind`] variant with its

//! section, a module with `run(target, spec, ctx, report)`, and one arm in [`run_scenario`].

pub mod alloc;
pub mod binding;
pub mod compare;
pub mod control;
pub mod flood;
pub mod load;
pub mod reference;
pub mod relay;
pub mod report;
pub mod scenario;
pub mod signaling;
pub mod stats;
pub mod stream;
pub mod svg;
pub mod sys;
pub mod target;
pub mod turn_client;

use load::Ctx;
use report::ScenarioReport;
use scenario::{Kind, Scenario};
use target::Target;

/// Run one scenario against `target`. Never panics on network input; a failure is recorded
/// in the report (`passed == false`, `failures`).
pub fn run_scenario(sc: &Scenario, target: &Target, ctx: &Ctx) -> ScenarioReport {
    let t0 = std::time::Instant::now();
    // Whole-machine CPU, to tell when other processes competed with the measurement.
    let host0 = sys::host_cpu_jiffies();
    let srv0 = target.pid.and_then(|p| sys::proc_cpu_seconds(p).ok());
    let gen0 = sys::self_cpu_seconds();
    let mut rep = ScenarioReport {
        name: sc.name.clone(),
        kind: sc.kind.as_str().into(),
        description: sc.description.clone(),
        target: target.label.clone(),
        passed: true,
        started_unix: target::unix_now(),
        spec: serde_json::to_value(sc).unwrap_or(serde_json::Value::Null),
        ..Default::default()
    };
    match sc.kind {
        Kind::Binding => {
            if let Some(s) = &sc.binding {
                binding::run(target, s, ctx, &mut rep)
            }
        }
        Kind::Churn => {
            if let Some(s) = &sc.churn {
                alloc::churn(target, s, ctx, &mut rep)
            }
        }
        Kind::Relay => {
            if let Some(s) = &sc.relay {
                relay::run(target, s, ctx, &mut rep)
            }
        }
        Kind::Idle => {
            if let Some(s) = &sc.idle {
                alloc::idle(target, s, ctx, &mut rep)
            }
        }
        Kind::Handshake => {
            if let Some(s) = &sc.handshake {
                alloc::handshake(target, s, ctx, &mut rep)
            }
        }
        Kind::Ks => {
            if let Some(s) = &sc.ks {
                control::ks(target, s, ctx, &mut rep)
            }
        }
        Kind::Ais => {
            if let Some(s) = &sc.ais {
                control::ais(target, s, ctx, &mut rep)
            }
        }
        Kind::Signaling => {
            if let Some(s) = &sc.signaling {
                signaling::run(target, s, ctx, &mut rep)
            }
        }
        Kind::Flood => {
            if let Some(s) = &sc.flood {
                flood::run(target, s, ctx, &mut rep)
            }
        }
    }
    rep.wall_secs = t0.elapsed().as_secs_f64();
    // Jiffy counters over a scenario that did not run (a reference given a TURN-only
    // scenario) or ran for a moment say nothing: one tick over a millisecond reads as cores.
    let measured = rep.wall_secs >= 0.5;
    if let (true, Some((b0, _, s0)), Some((b1, _, s1))) = (measured, host0, sys::host_cpu_jiffies())
    {
        let host_busy = b1.saturating_sub(b0) as f64 * sys::jiffy_secs();
        let steal = s1.saturating_sub(s0) as f64 * sys::jiffy_secs() / rep.wall_secs.max(1e-9);
        rep.host_steal_cpu = Some(steal);
        if steal > 0.005 {
            rep.notes.push(format!(
                "the hypervisor stole {:.1}% of a CPU during this scenario (vCPU stalls): \
                 latency tails include them",
                steal * 100.0
            ));
        }

        let srv = match (srv0, target.pid.and_then(|p| sys::proc_cpu_seconds(p).ok())) {
            (Some(a), Some(b)) => b - a,
            _ => 0.0,
        };
        let gen = sys::self_cpu_seconds() - gen0;
        let other = (host_busy - srv - gen).max(0.0) / rep.wall_secs.max(1e-9);
        rep.host_other_cpu_util = Some(other);
        if other > 0.15 {
            rep.notes.push(format!(
                "contended: other processes used {other:.2} cores during this scenario; \
                 its figures are not reliable"
            ));
        }
    }
    rep
}
