//! A hashed timer wheel with one-second slots.
//!
//! TURN lifetimes are whole seconds (permissions 300 s, channels 600 s, allocations up to an
//! hour), so a wheel of second slots gives O(1) insert and O(expired) expiry without ever
//! scanning all allocations. Entries are not removed when a deadline moves: the owner keeps
//! the tick it is armed for and ignores stale firings, which keeps insert allocation-free in
//! the steady state (slot vectors keep their capacity). An owner whose stale entries pile up
//! (allocations deleted long before their deadline) drops them with [`Wheel::retain`].

/// What a timer refers to. The generation guards against a slot reused by a newer allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerKey {
    Allocation {
        slot: u32,
        generation: u32,
    },
    Reservation {
        token: u64,
    },
    /// An RFC 6062 peer data connection waiting for its ConnectionBind.
    Connection {
        id: u32,
    },
}

/// A wheel of timers keyed by `K` (the TURN core's [`TimerKey`] by default; the data plane
/// keys its connection deadlines with its own type).
pub struct Wheel<K = TimerKey> {
    slots: Vec<Vec<K>>,
    /// The last tick (second) processed.
    tick: u64,
    /// Entries armed and not fired yet (stale ones included): what a soak watches.
    len: usize,
}

impl<K: Copy> Wheel<K> {
    /// A wheel covering `horizon_secs` seconds (deadlines further out are clamped and simply
    /// fire early; the owner re-arms).
    pub fn new(now_ms: u64, horizon_secs: usize) -> Self {
        Wheel {
            slots: (0..horizon_secs.max(8)).map(|_| Vec::new()).collect(),
            tick: now_ms / 1000,
            len: 0,
        }
    }

    /// Tick at which a deadline will fire: the first whole second at or after it, and never
    /// the current (already processed) tick.
    pub fn tick_for(&self, deadline_ms: u64) -> u64 {
        let t = deadline_ms.div_ceil(1000).max(self.tick + 1);
        t.min(self.tick + self.slots.len() as u64 - 1)
    }

    /// Arm `key` for `deadline_ms`; returns the tick it will fire at.
    pub fn insert(&mut self, deadline_ms: u64, key: K) -> u64 {
        let t = self.tick_for(deadline_ms);
        let n = self.slots.len() as u64;
        self.slots[(t % n) as usize].push(key);
        self.len += 1;
        t
    }

    /// Advance to `now_ms`, appending every fired key with its tick to `out`.
    pub fn advance(&mut self, now_ms: u64, out: &mut Vec<(u64, K)>) {
        let target = now_ms / 1000;
        let n = self.slots.len() as u64;
        // After a long stall, a full turn of the wheel covers every slot once.
        if target > self.tick + n {
            self.tick = target - n;
        }
        while self.tick < target {
            self.tick += 1;
            let t = self.tick;
            let slot = &mut self.slots[(t % n) as usize];
            self.len -= slot.len();
            out.extend(slot.drain(..).map(|k| (t, k)));
        }
    }

    /// Keep only the entries `keep(tick, key)` accepts (the tick is the one the entry fires
    /// at), and give back the memory of slots left mostly empty. O(entries): the owner calls it
    /// when stale entries outnumber live ones, so its cost is amortised over the inserts that
    /// made them.
    pub fn retain(&mut self, mut keep: impl FnMut(u64, &K) -> bool) {
        let n = self.slots.len() as u64;
        let first = self.tick + 1;
        let mut len = 0;
        for (i, slot) in self.slots.iter_mut().enumerate() {
            // Pending ticks are tick+1 ..= tick+n-1; slot i holds the one congruent to i.
            let t = first + (i as u64 + n - first % n) % n;
            slot.retain(|k| keep(t, k));
            len += slot.len();
            if slot.capacity() > 4 * slot.len() + 16 {
                slot.shrink_to(2 * slot.len());
            }
        }
        self.len = len;
    }

    /// Entries armed and not fired yet.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Milliseconds timestamp of the next tick, for the event loop's wait.
    pub fn next_tick_ms(&self) -> u64 {
        (self.tick + 1) * 1000
    }

    pub fn current_tick(&self) -> u64 {
        self.tick
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn len_counts_armed_entries_until_they_fire() {
        let mut w = Wheel::new(0, 16);
        let k = TimerKey::Reservation { token: 1 };
        w.insert(1_000, k);
        w.insert(2_000, k);
        w.insert(100_000, k); // clamped to the horizon
        assert_eq!(w.len(), 3);
        let mut out = Vec::new();
        w.advance(2_000, &mut out);
        assert_eq!((out.len(), w.len()), (2, 1));
        w.advance(1_000_000, &mut out);
        assert!(w.is_empty());
    }

    #[test]
    fn fires_at_the_first_second_at_or_after_the_deadline() {
        let mut w: Wheel = Wheel::new(10_000, 64);
        let k = TimerKey::Reservation { token: 1 };
        assert_eq!(w.insert(12_500, k), 13);
        let mut out = Vec::new();
        w.advance(12_999, &mut out);
        assert!(out.is_empty());
        w.advance(13_000, &mut out);
        assert_eq!(out, vec![(13, k)]);
    }

    #[test]
    fn retain_sees_each_entry_with_its_tick_and_keeps_the_count() {
        let mut w: Wheel = Wheel::new(5_000, 16);
        let mut out = Vec::new();
        w.advance(7_000, &mut out); // tick 7: slot arithmetic off the origin
        let mut armed = Vec::new();
        for token in 0..40u64 {
            let deadline = 7_000 + (token % 15 + 1) * 1000;
            armed.push((w.insert(deadline, TimerKey::Reservation { token }), token));
        }
        let mut seen = Vec::new();
        w.retain(|t, k| {
            let TimerKey::Reservation { token } = *k else {
                unreachable!()
            };
            seen.push((t, token));
            token % 2 == 0
        });
        seen.sort();
        armed.sort();
        assert_eq!(seen, armed, "every entry once, with the tick it fires at");
        assert_eq!(w.len(), 20);
        w.advance(1_000_000, &mut out);
        assert_eq!(out.len(), 20);
        assert!(out
            .iter()
            .all(|(_, k)| matches!(k, TimerKey::Reservation { token } if token % 2 == 0)));
    }

    #[test]
    fn far_deadlines_are_clamped_and_long_stalls_cover_every_slot() {
        let mut w: Wheel = Wheel::new(0, 16);
        let k = TimerKey::Reservation { token: 2 };
        assert_eq!(w.insert(1_000_000, k), 15);
        let mut out = Vec::new();
        w.advance(1_000_000, &mut out);
        assert_eq!(out.len(), 1);
    }
}
