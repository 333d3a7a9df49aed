//! Per-IP token bucket with a bounded table.
//!
//! Keyed by the peer socket address, never by `X-Forwarded-For` and friends, which any client
//! can forge to get a fresh bucket per request. Memory is bounded: when the table is full,
//! buckets that have refilled completely (idle clients) are dropped; if it is still full the
//! new client is refused, which fails closed under a flood from very many addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Tokens scaled by 1000 so refills are exact integer arithmetic.
    milli_tokens: u64,
    last_ms: u64,
}

/// Token-bucket limiter.
#[derive(Debug)]
pub struct RateLimiter {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    /// Limits, changeable at run time ([`RateLimiter::set_limits`]).
    burst_milli: AtomicU64,
    refill_ms: AtomicU64,
    max_entries: usize,
}

impl RateLimiter {
    /// `burst` tokens, one more every `refill_secs`, at most `max_entries` tracked addresses.
    pub fn new(burst: u32, refill_secs: u64, max_entries: usize) -> Self {
        RateLimiter {
            buckets: Mutex::new(HashMap::new()),
            burst_milli: AtomicU64::new(u64::from(burst.max(1)) * 1000),
            refill_ms: AtomicU64::new(refill_secs.max(1).saturating_mul(1000)),
            max_entries: max_entries.max(1),
        }
    }

    /// Change the burst and refill period (live reload); buckets keep their tokens, capped
    /// at the new burst on their next use.
    pub fn set_limits(&self, burst: u32, refill_secs: u64) {
        self.burst_milli
            .store(u64::from(burst.max(1)) * 1000, Ordering::Relaxed);
        self.refill_ms
            .store(refill_secs.max(1).saturating_mul(1000), Ordering::Relaxed);
    }

    fn burst_milli(&self) -> u64 {
        self.burst_milli.load(Ordering::Relaxed)
    }

    fn refill_ms(&self) -> u64 {
        self.refill_ms.load(Ordering::Relaxed)
    }

    fn refill(&self, now_unix_ms: u64, b: &mut Bucket) {
        let elapsed = now_unix_ms.saturating_sub(b.last_ms);
        // 1000 milli-tokens per refill period.
        let add = elapsed.saturating_mul(1000) / self.refill_ms();
        if add > 0 {
            b.milli_tokens = (b.milli_tokens + add).min(self.burst_milli());
            // Advance time only by what was converted, so fractions are not lost.
            b.last_ms += add * self.refill_ms() / 1000;
        }
        if b.milli_tokens == self.burst_milli() {
            b.last_ms = now_unix_ms;
        }
    }

    /// Take one token for `ip` at `now_unix_ms`. `Err(retry_after_secs)` when none is left.
    pub fn check(&self, now_unix_ms: u64, ip: IpAddr) -> Result<(), u64> {
        let Ok(mut map) = self.buckets.lock() else {
            return Err(1);
        };
        if !map.contains_key(&ip) && map.len() >= self.max_entries {
            let full = self.burst_milli();
            let refill_ms = self.refill_ms();
            map.retain(|_, b| {
                let elapsed = now_unix_ms.saturating_sub(b.last_ms);
                b.milli_tokens + elapsed.saturating_mul(1000) / refill_ms < full
            });
            if map.len() >= self.max_entries {
                return Err(self.refill_ms() / 1000);
            }
        }
        let b = map.entry(ip).or_insert(Bucket {
            milli_tokens: self.burst_milli(),
            last_ms: now_unix_ms,
        });
        self.refill(now_unix_ms, b);
        if b.milli_tokens >= 1000 {
            b.milli_tokens -= 1000;
            Ok(())
        } else {
            let missing = 1000 - b.milli_tokens;
            Err((missing * self.refill_ms() / 1000).div_ceil(1000).max(1))
        }
    }

    /// Number of tracked addresses.
    pub fn tracked(&self) -> usize {
        self.buckets.lock().map(|m| m.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refill() {
        let rl = RateLimiter::new(100, 2, 10);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t = 1_000_000;
        for _ in 0..100 {
            assert!(rl.check(t, ip).is_ok());
        }
        assert!(rl.check(t, ip).is_err());
        assert!(rl.check(t + 1999, ip).is_err());
        assert!(rl.check(t + 2000, ip).is_ok());
        assert!(rl.check(t + 2000, ip).is_err());
        assert!(rl.check(t + 6000, ip).is_ok());
        assert!(rl.check(t + 6000, ip).is_ok());
        assert!(rl.check(t + 6000, ip).is_err());
    }

    #[test]
    fn table_is_bounded() {
        let rl = RateLimiter::new(1, 2, 4);
        let t = 1_000_000;
        for i in 0..4u8 {
            assert!(rl.check(t, IpAddr::from([192, 0, 2, i])).is_ok());
        }
        // Full of non-idle buckets: a fifth address is refused.
        assert!(rl.check(t, IpAddr::from([192, 0, 2, 9])).is_err());
        assert_eq!(rl.tracked(), 4);
        // Later the old buckets are full again and get dropped.
        assert!(rl.check(t + 10_000, IpAddr::from([192, 0, 2, 9])).is_ok());
        assert!(rl.tracked() <= 4);
    }
}
