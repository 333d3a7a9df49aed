//! What every scenario shares: the run context, pacing of offered load, the measurement
//! window (server and generator CPU), and the progress line.

use crate::report::{GeneratorUsage, ServerUsage};
use crate::sys;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

/// How a scenario is run (from the command line).
#[derive(Debug, Clone, Default)]
pub struct Ctx {
    /// Core the generator is pinned to, and whether pinning worked.
    pub core: Option<usize>,
    pub pinned: bool,
    /// Overrides the scenario's loss/failure threshold.
    pub max_loss: Option<f64>,
    pub progress: bool,
}

/// The server process, read through /proc (never machine-wide counters).
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    pub pid: Option<u32>,
}

impl Probe {
    pub fn cpu(&self) -> Option<f64> {
        self.pid.and_then(|p| sys::proc_cpu_seconds(p).ok())
    }

    pub fn rss(&self) -> Option<u64> {
        self.pid.and_then(|p| sys::proc_rss_bytes(p).ok())
    }
}

/// A measurement window: wall time, server CPU and our own CPU between open and close.
pub struct Window {
    t0: Instant,
    srv0: Option<f64>,
    gen0: f64,
    probe: Probe,
}

pub struct Measured {
    pub wall: f64,
    pub server_cpu: Option<f64>,
    pub gen_cpu: f64,
}

impl Window {
    pub fn open(probe: Probe) -> Window {
        Window {
            srv0: probe.cpu(),
            gen0: sys::self_cpu_seconds(),
            t0: Instant::now(),
            probe,
        }
    }

    pub fn close(&self) -> Measured {
        let wall = self.t0.elapsed().as_secs_f64();
        let server_cpu = match (self.srv0, self.probe.cpu()) {
            (Some(a), Some(b)) if b >= a => Some(b - a),
            _ => None,
        };
        Measured {
            wall,
            server_cpu,
            gen_cpu: (sys::self_cpu_seconds() - self.gen0).max(0.0),
        }
    }
}

impl Measured {
    pub fn server_usage(&self, probe: Probe) -> ServerUsage {
        ServerUsage {
            pid: probe.pid,
            cpu_secs: self.server_cpu,
            cpu_util: self.server_cpu.map(|c| c / self.wall.max(1e-9)),
            rss_before: None,
            rss_after: probe.rss(),
        }
    }

    pub fn generator_usage(&self, ctx: &Ctx) -> GeneratorUsage {
        GeneratorUsage {
            core: ctx.core,
            pinned: ctx.pinned,
            cpu_secs: self.gen_cpu,
            cpu_util: self.gen_cpu / self.wall.max(1e-9),
            ..Default::default()
        }
    }
}

/// Offered-load pacing: a fixed rate (open loop: the schedule ignores replies), or a window
/// of requests in flight (closed loop, as fast as the server answers).
#[derive(Debug)]
pub struct Pacer {
    rate: u64,
    window: u64,
    start: Instant,
    pub sent: u64,
    pub acked: u64,
    /// In-flight datagrams presumed lost after a stall (window mode), so the loop goes on.
    written_off: u64,
    last_ack: Instant,
    stall: Duration,
}

impl Pacer {
    pub fn new(rate: u64, window: u64, start: Instant) -> Pacer {
        Pacer {
            rate,
            window: window.max(1),
            start,
            sent: 0,
            acked: 0,
            written_off: 0,
            last_ack: start,
            stall: Duration::from_millis(200),
        }
    }

    /// How many may be sent now (at most `max`).
    pub fn allowance(&mut self, now: Instant, max: u64) -> u64 {
        if self.rate > 0 {
            let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
            let target = (elapsed * self.rate as f64) as u64;
            target.saturating_sub(self.sent).min(max)
        } else {
            let outstanding = self.sent.saturating_sub(self.acked + self.written_off);
            if outstanding >= self.window {
                if now.saturating_duration_since(self.last_ack) >= self.stall {
                    // Nothing came back for a while: presume the window lost and go on.
                    self.written_off += outstanding;
                    self.last_ack = now;
                    return self.window.min(max);
                }
                return 0;
            }
            (self.window - outstanding).min(max)
        }
    }

    pub fn on_sent(&mut self, n: u64) {
        self.sent += n;
    }

    pub fn on_acked(&mut self, n: u64, now: Instant) {
        if n > 0 {
            self.acked += n;
            self.last_ack = now;
        }
    }

    /// How far behind the fixed-rate schedule we are (datagrams).
    pub fn backlog(&self, now: Instant) -> u64 {
        if self.rate == 0 {
            return 0;
        }
        let elapsed = now.saturating_duration_since(self.start).as_secs_f64();
        ((elapsed * self.rate as f64) as u64).saturating_sub(self.sent)
    }
}

/// True when the generator did not manage to offer what was asked (fixed-rate runs).
pub fn generator_limited(rate: u64, sent: u64, secs: f64, eagain: u64) -> Option<String> {
    if rate > 0 && secs > 0.0 {
        let achieved = sent as f64 / secs;
        if achieved < 0.95 * rate as f64 {
            return Some(format!(
                "offered only {:.0}/s of the {rate}/s asked",
                achieved
            ));
        }
    }
    if sent > 0 && eagain * 1000 > sent {
        return Some(format!(
            "{eagain} sends refused with EAGAIN (our socket buffer was full)"
        ));
    }
    None
}

/// The progress line (stderr): rewritten in place on a terminal, one line a second otherwise.
pub struct Progress {
    enabled: bool,
    tty: bool,
    last: Instant,
    dirty: bool,
}

impl Progress {
    pub fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            tty: std::io::stderr().is_terminal(),
            last: Instant::now(),
            dirty: false,
        }
    }

    /// Print `line` if a second passed since the last one (or `force`).
    pub fn tick(&mut self, force: bool, line: impl FnOnce() -> String) {
        if !self.enabled || (!force && self.last.elapsed() < Duration::from_secs(1)) {
            return;
        }
        self.last = Instant::now();
        let l = line();
        if self.tty {
            eprint!("\r\x1b[2K{l}");
            self.dirty = true;
        } else {
            eprintln!("{l}");
        }
    }

    pub fn done(&mut self) {
        if self.dirty {
            eprintln!();
            self.dirty = false;
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.done();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_rate_pacing() {
        let t0 = Instant::now();
        let mut p = Pacer::new(1000, 0, t0);
        assert_eq!(p.allowance(t0, 1000), 0);
        let a = p.allowance(t0 + Duration::from_millis(100), 1000);
        assert_eq!(a, 100);
        assert_eq!(p.allowance(t0 + Duration::from_millis(100), 30), 30);
        p.on_sent(100);
        assert_eq!(p.allowance(t0 + Duration::from_millis(100), 1000), 0);
        assert_eq!(p.backlog(t0 + Duration::from_millis(150)), 50);
    }

    #[test]
    fn window_pacing_and_stall_release() {
        let t0 = Instant::now();
        let mut p = Pacer::new(0, 10, t0);
        assert_eq!(p.allowance(t0, 100), 10);
        p.on_sent(10);
        assert_eq!(p.allowance(t0, 100), 0);
        p.on_acked(4, t0);
        assert_eq!(p.allowance(t0, 100), 4);
        p.on_sent(4);
        // Nothing back for longer than the stall: the window opens again.
        assert_eq!(p.allowance(t0 + Duration::from_millis(300), 100), 10);
    }

    #[test]
    fn limited_detection() {
        assert!(generator_limited(1000, 1000, 1.0, 0).is_none());
        assert!(generator_limited(1000, 900, 1.0, 0).is_some());
        assert!(generator_limited(0, 1000, 1.0, 2).is_some());
        assert!(generator_limited(0, 0, 1.0, 0).is_none());
    }
}
