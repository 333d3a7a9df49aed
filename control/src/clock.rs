//! Injectable wall clock.
//!
//! Everything on the control plane that depends on time (signature windows, nonce TTLs, key
//! expiry, token expiry, Snowflake serials) reads it through [`Clock`], so tests can step time
//! instead of sleeping and can check exact boundaries.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// Source of Unix time.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_unix_ms(&self) -> u64;

    /// Seconds since the Unix epoch.
    fn now_unix(&self) -> u64 {
        self.now_unix_ms() / 1000
    }
}

/// The system clock. A clock set before 1970 reads as 0 rather than panicking.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_unix_ms(&self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Debug, Clone, Default)]
pub struct ManualClock {
    ms: Arc<AtomicU64>,
}

impl ManualClock {
    /// A clock reading `unix_secs`.
    pub fn new(unix_secs: u64) -> Self {
        ManualClock {
            ms: Arc::new(AtomicU64::new(unix_secs.saturating_mul(1000))),
        }
    }

    /// Set the time to `unix_secs`.
    pub fn set(&self, unix_secs: u64) {
        self.ms
            .store(unix_secs.saturating_mul(1000), Ordering::SeqCst);
    }

    /// Set the time in milliseconds.
    pub fn set_ms(&self, unix_ms: u64) {
        self.ms.store(unix_ms, Ordering::SeqCst);
    }

    /// Move the time forward by `secs`.
    pub fn advance(&self, secs: u64) {
        self.ms
            .fetch_add(secs.saturating_mul(1000), Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now_unix_ms(&self) -> u64 {
        self.ms.load(Ordering::SeqCst)
    }
}

/// Shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The default clock.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}
