//! Snowflake serial numbers (wire reference section 5.3): 41 bits of milliseconds since
//! 2023-01-01T00:00:00Z, 5 bits of worker id, 8 bits of per-millisecond sequence.
//!
//! Lock-free: the last issued serial lives in one `AtomicU64` and each allocation is a CAS from
//! it to a strictly greater value, so serials are unique across threads by construction. A
//! clock that goes backwards reuses the last millisecond and bumps the sequence; an exhausted
//! sequence moves to the next millisecond.

use std::sync::atomic::{AtomicU64, Ordering};

/// Unix ms of 2023-01-01T00:00:00Z.
pub const EPOCH_MS: u64 = 1_672_531_200_000;
const TIME_BITS: u32 = 41;
const WORKER_BITS: u32 = 5;
const SEQ_BITS: u32 = 8;
const TIME_MASK: u64 = (1 << TIME_BITS) - 1;
const SEQ_MASK: u64 = (1 << SEQ_BITS) - 1;
const WORKER_MASK: u64 = (1 << WORKER_BITS) - 1;

/// Compose a serial from Unix ms, worker id and sequence.
pub fn compose(unix_ms: u64, worker: u8, seq: u8) -> u64 {
    let offset = unix_ms.saturating_sub(EPOCH_MS) & TIME_MASK;
    (offset << (WORKER_BITS + SEQ_BITS))
        | ((u64::from(worker) & WORKER_MASK) << SEQ_BITS)
        | u64::from(seq)
}

/// Worker id of a string: h = h * 31 + byte (wrapping), then h & 31.
pub fn worker_id_of(s: &str) -> u8 {
    let h = s
        .bytes()
        .fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    (h & WORKER_MASK) as u8
}

/// Worker id of this process: `node_id` followed by the decimal PID (Actrix hashes the host
/// name instead of `node_id`; both only need to differ between co-running instances).
pub fn process_worker_id(node_id: &str) -> u8 {
    worker_id_of(&format!("{node_id}{}", std::process::id()))
}

/// Serial allocator.
#[derive(Debug)]
pub struct Snowflake {
    worker: u64,
    last: AtomicU64,
}

impl Snowflake {
    /// An allocator for `worker` (only the low 5 bits are used).
    pub fn new(worker: u8) -> Self {
        Snowflake {
            worker: u64::from(worker) & WORKER_MASK,
            last: AtomicU64::new(0),
        }
    }

    /// The next serial at `now_unix_ms`.
    #[must_use = "a serial is used up whether or not it is kept"]
    pub fn next(&self, now_unix_ms: u64) -> u64 {
        let now = now_unix_ms.saturating_sub(EPOCH_MS) & TIME_MASK;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let last_ms = last >> (WORKER_BITS + SEQ_BITS);
            let last_seq = last & SEQ_MASK;
            let (ms, seq) = if last == 0 || now > last_ms {
                (now, 0)
            } else if last_seq < SEQ_MASK {
                (last_ms, last_seq + 1)
            } else {
                ((last_ms + 1) & TIME_MASK, 0)
            };
            let next = (ms << (WORKER_BITS + SEQ_BITS)) | (self.worker << SEQ_BITS) | seq;
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => return next,
                Err(actual) => last = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vector_a2() {
        let s = compose(1_767_225_600_000, 5, 3);
        assert_eq!(s, 775_736_524_801_283);
        assert_eq!(format!("{s:x}"), "2c1873c000503");
        assert_eq!(worker_id_of("node-a4242"), 18);
    }

    #[test]
    fn monotonic_with_backwards_clock_and_exhausted_sequence() {
        let sf = Snowflake::new(5);
        let t = 1_767_225_600_000;
        let a = sf.next(t);
        assert_eq!(a, compose(t, 5, 0));
        let b = sf.next(t - 10_000); // clock stepped back
        assert_eq!(b, compose(t, 5, 1));
        let mut prev = b;
        for _ in 0..600 {
            let n = sf.next(t);
            assert!(n > prev);
            assert!(n < 1 << 54);
            prev = n;
        }
    }
}
