//! Time for the shard loop: the clock read once per round, and wake-up coalescing.

use actrix_proto::turn::Now;
use std::time::Duration;

/// Monotonic and wall-clock time, read once per round (coarse clocks: vDSO, cheap).
pub fn now() -> Now {
    let mut mono = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let mut real = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointers to locals.
    unsafe {
        libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut mono);
        libc::clock_gettime(libc::CLOCK_REALTIME_COARSE, &mut real);
    }
    Now {
        ms: mono.tv_sec as u64 * 1000 + mono.tv_nsec as u64 / 1_000_000,
        unix: real.tv_sec as u64,
    }
}

/// Monotonic clock in nanoseconds (precise; vDSO).
fn mono_ns() -> u64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a local.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Wake-up coalescing (`io.coalesce_us`), the software counterpart of a NIC's interrupt
/// moderation. Under dense relay traffic a shard otherwise wakes for nearly every datagram
/// and pays a context switch (and, on a VM, a halt and an IPI) each time; the pacer lets it
/// start a round at most once per period while the previous round relayed data and rounds
/// come faster than two periods apart, so each wake-up drains several datagrams at once.
/// Sparse traffic (rounds further apart), saturation (rounds longer than the period) and
/// rounds of STUN transactions only (their answers leave at the end of the round, and a
/// client's next request should not wait) never sleep. The price is at most one period of
/// added latency per relay hop.
pub struct Pacer {
    period_ns: u64,
    round_start: u64,
    busy: bool,
    dense: bool,
}

impl Pacer {
    /// `period_ns` 0 disables it. Call on the thread that will sleep: it narrows that thread's
    /// timer slack so the sleeps end close to the period.
    pub fn new(period_ns: u64) -> Pacer {
        if period_ns > 0 {
            let slack = (period_ns / 10).max(1_000);
            // SAFETY: PR_SET_TIMERSLACK takes an integer argument and affects this thread only.
            unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, slack as libc::c_ulong, 0, 0, 0) };
        }
        Pacer {
            period_ns,
            round_start: 0,
            busy: false,
            dense: false,
        }
    }

    /// Whether to sleep out the rest of the period before waiting for readiness: the last
    /// round relayed data and rounds are coming densely.
    pub fn pause_due(&self) -> bool {
        self.period_ns > 0 && self.busy && self.dense
    }

    /// How long until one period after the start of the last round (`None` if that passed).
    pub fn remaining(&self) -> Option<Duration> {
        let until = self.round_start + self.period_ns;
        let now = mono_ns();
        (now < until).then(|| Duration::from_nanos(until - now))
    }

    /// Sleep the thread until one period after the start of the last round (no-op if that
    /// has passed).
    pub fn pause(&self) {
        let until = self.round_start + self.period_ns;
        if mono_ns() >= until {
            return;
        }
        let ts = libc::timespec {
            tv_sec: (until / 1_000_000_000) as libc::time_t,
            tv_nsec: (until % 1_000_000_000) as libc::c_long,
        };
        // SAFETY: valid timespec; an interrupted sleep just ends the period early.
        unsafe {
            libc::clock_nanosleep(
                libc::CLOCK_MONOTONIC,
                libc::TIMER_ABSTIME,
                &ts,
                std::ptr::null_mut(),
            )
        };
    }

    /// A round starts (the wait returned).
    pub fn round_started(&mut self) {
        if self.period_ns == 0 {
            return;
        }
        let t = mono_ns();
        self.dense = t.saturating_sub(self.round_start) < 2 * self.period_ns;
        self.round_start = t;
        self.busy = false;
    }

    /// The round relayed data.
    pub fn relayed(&mut self) {
        self.busy = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pacer_sleeps_only_after_dense_rounds_that_relayed() {
        let period = 3_000_000; // 3 ms
        let mut p = Pacer::new(period);
        // The first round: nothing before it, so not dense.
        p.round_started();
        p.relayed();
        assert!(!p.pause_due());
        // A second round right after, which relayed: due, and the pause ends a period after
        // the round started.
        p.round_started();
        assert!(
            !p.pause_due(),
            "a round that relayed nothing does not pause"
        );
        p.relayed();
        assert!(p.pause_due());
        assert!(p
            .remaining()
            .is_some_and(|d| d.as_nanos() <= period as u128));
        let t0 = mono_ns();
        p.pause();
        assert!(mono_ns() >= p.round_start + period);
        assert!(mono_ns() - t0 <= period + 50_000_000, "slept far too long");
        assert_eq!(p.remaining(), None);
        // A round long after the last one: sparse traffic, no pause.
        std::thread::sleep(Duration::from_nanos(2 * period));
        p.round_started();
        p.relayed();
        assert!(!p.pause_due());
        // Off: never due.
        let mut off = Pacer::new(0);
        off.round_started();
        off.round_started();
        off.relayed();
        assert!(!off.pause_due());
    }
}
