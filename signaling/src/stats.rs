//! Counters the appliance exports on `/metrics`. Plain relaxed atomics: the hub increments them
//! on the control thread and the metrics handler reads them from anywhere.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Error codes the hub counts (the codes of wire reference section 1.2 `ErrorResponse`).
pub const ERROR_CODES: [u32; 8] = [400, 401, 403, 404, 409, 429, 500, 503];

/// Signaling counters and gauges.
#[derive(Debug, Default)]
pub struct SignalingStats {
    /// Open WebSocket connections (gauge).
    pub connections_open: AtomicU64,
    /// WebSocket connections accepted since start.
    pub connections_total: AtomicU64,
    /// Upgrades refused with HTTP 429 by the per-IP connection rate.
    pub connections_rejected_rate: AtomicU64,
    /// Upgrades refused with HTTP 429 by the per-IP or total concurrency cap.
    pub connections_rejected_concurrency: AtomicU64,
    /// Upgrades refused with HTTP 403: a browser origin that is not allowed.
    pub connections_rejected_origin: AtomicU64,

    /// Binary frames received.
    pub frames_in: AtomicU64,
    /// Envelopes sent to clients (responses, pushes and relays).
    pub envelopes_out: AtomicU64,
    /// Relayed envelopes delivered to the target's queue.
    pub envelopes_relayed: AtomicU64,
    /// Relays dropped because the target is not connected.
    pub relays_no_target: AtomicU64,
    /// Frames that did not decode (the connection is closed, wire section 8.1).
    pub decode_errors: AtomicU64,
    /// Connections closed with 1009 (message or frame too big).
    pub oversize_closes: AtomicU64,
    /// Connections closed with 1002 or 1007 (a WebSocket protocol violation).
    pub protocol_closes: AtomicU64,
    /// Connections dropped because their send queue was full.
    pub slow_consumer_drops: AtomicU64,
    /// Connections closed by the idle or auth timeout.
    pub timeout_closes: AtomicU64,
    /// Successful registrations.
    pub registrations: AtomicU64,
    /// URL reconnect identities refused (the connection stays unbound).
    pub url_identity_refused: AtomicU64,
    /// Envelopes refused because their credential is of the other actr protocol than their
    /// connection's (a 0.4 credential on a 0.1.7 connection or the reverse).
    pub wrong_protocol: AtomicU64,
    /// Connections speaking actr 0.4 (gauge).
    pub connections_v4: AtomicU64,
    /// Registry entries in memory (gauge).
    pub registry_entries: AtomicU64,
    /// Registry entries evicted by the heartbeat sweep.
    pub registry_evictions: AtomicU64,
    /// Registry entries restored from the database by a Ping.
    pub registry_restores: AtomicU64,
    /// Persistence operations that failed or were dropped.
    pub persist_failures: AtomicU64,
    /// 1 while the cluster bus is connected, 0 while it is not (or without `[cluster]`).
    pub cluster_connected: AtomicU64,
    /// Times the cluster bus was lost (routing fell back to local only).
    pub cluster_outages: AtomicU64,
    /// Other nodes heard on the bus within the node timeout.
    pub cluster_nodes: AtomicU64,
    /// Actors of other nodes in memory.
    pub cluster_remote_actors: AtomicU64,
    /// Relays sent to another node.
    pub cluster_relays_out: AtomicU64,
    /// Relays from another node delivered here.
    pub cluster_relays_in: AtomicU64,
    /// Relays from another node refused by this node's checks.
    pub cluster_relays_refused: AtomicU64,
    /// Cluster messages not published (bus down, or the outgoing queue full).
    pub cluster_dropped: AtomicU64,
    /// Error responses sent, by code, in the order of [`ERROR_CODES`]; the last slot counts
    /// any other code.
    pub errors_by_code: [AtomicU64; 9],
    /// From a frame's arrival to the frames it caused (a relay, an answer) written to their
    /// connections' sockets.
    pub forward_latency: LatencyHistogram,
}

/// Upper bounds of [`LatencyHistogram`]'s buckets, in seconds.
pub const LATENCY_BUCKETS: [f64; 14] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];

/// A fixed-bucket latency histogram of relaxed atomics (a Prometheus histogram): recorded on
/// the control thread, read by the metrics handler.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Per bucket (not cumulative); the last slot counts values above every bound.
    buckets: [AtomicU64; LATENCY_BUCKETS.len() + 1],
    sum_ns: AtomicU64,
}

impl LatencyHistogram {
    pub fn record(&self, d: Duration) {
        let s = d.as_secs_f64();
        let i = LATENCY_BUCKETS
            .iter()
            .position(|b| s <= *b)
            .unwrap_or(LATENCY_BUCKETS.len());
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ns
            .fetch_add(d.as_nanos().min(u64::MAX as u128) as u64, Ordering::Relaxed);
    }

    /// (count per bucket of [`LATENCY_BUCKETS`], the last above them all; sum in seconds).
    pub fn snapshot(&self) -> ([u64; LATENCY_BUCKETS.len() + 1], f64) {
        let counts = std::array::from_fn(|i| self.buckets[i].load(Ordering::Relaxed));
        let sum = self.sum_ns.load(Ordering::Relaxed) as f64 / 1e9;
        (counts, sum)
    }
}

impl SignalingStats {
    /// Count an error response with `code`.
    pub fn count_error(&self, code: u32) {
        let idx = ERROR_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(ERROR_CODES.len());
        if let Some(c) = self.errors_by_code.get(idx) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Error responses sent with `code` so far.
    pub fn errors(&self, code: u32) -> u64 {
        let idx = ERROR_CODES
            .iter()
            .position(|&c| c == code)
            .unwrap_or(ERROR_CODES.len());
        self.errors_by_code
            .get(idx)
            .map_or(0, |c| c.load(Ordering::Relaxed))
    }
}

pub(crate) fn inc(a: &AtomicU64) {
    a.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn dec(a: &AtomicU64) {
    a.fetch_sub(1, Ordering::Relaxed);
}
