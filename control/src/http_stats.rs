//! Request counts and latencies of the control HTTP server, by route and status.
//!
//! A middleware records every response under its matched route pattern (`/ks/secret/{key_id}`,
//! never the concrete path, so labels stay bounded), the method and the status code. Latency
//! goes into fixed buckets (a Prometheus histogram). The table is small and behind a mutex: it
//! lives on the control thread, never on the data plane.

use axum::extract::{MatchedPath, Request};
use axum::middleware::Next;
use axum::response::Response;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Upper bounds of the latency buckets, in seconds.
pub const BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// One series: counts per bucket (cumulative at read time), the sum and the count.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub buckets: [u64; BUCKETS.len()],
    pub sum_seconds: f64,
    pub count: u64,
}

/// (service, method, route, status) → series.
pub type Key = (&'static str, String, String, u16);

#[derive(Debug, Default)]
pub struct HttpStats {
    table: Mutex<BTreeMap<Key, Series>>,
    /// The listener's connections.
    pub conns: ConnStats,
}

/// What happened to the TCP connections the control listener accepted.
#[derive(Debug, Default)]
pub struct ConnStats {
    /// Open now (an upgraded WebSocket included).
    pub open: AtomicU64,
    /// Admitted since start.
    pub accepted: AtomicU64,
    /// Closed at once: `http.max_connections` (or the descriptor budget) reached.
    pub refused_total_cap: AtomicU64,
    /// Closed at once: `http.max_connections_per_ip` reached for the source.
    pub refused_per_ip: AtomicU64,
    /// Closed: no first bytes (or no TLS handshake) within `http.first_bytes_timeout_secs`.
    pub first_bytes_timeouts: AtomicU64,
    /// Closed: the client opened with the HTTP/2 connection preface.
    pub refused_http2: AtomicU64,
    /// Closed: the TLS handshake failed.
    pub tls_failures: AtomicU64,
    /// accept() failed (EMFILE and friends).
    pub accept_errors: AtomicU64,
}

impl ConnStats {
    pub fn bump(c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl HttpStats {
    pub fn new() -> Arc<Self> {
        Arc::new(HttpStats::default())
    }

    pub fn record(&self, route: &str, method: &str, status: u16, seconds: f64) {
        let service = service_of(route);
        let mut t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let s = t
            .entry((service, method.to_string(), route.to_string(), status))
            .or_default();
        s.count += 1;
        s.sum_seconds += seconds;
        if let Some(i) = BUCKETS.iter().position(|b| seconds <= *b) {
            s.buckets[i] += 1;
        }
    }

    /// A copy of the table for exposition.
    pub fn snapshot(&self) -> Vec<(Key, Series)> {
        let t = self.table.lock().unwrap_or_else(|p| p.into_inner());
        t.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

fn service_of(route: &str) -> &'static str {
    if route.starts_with("/ks") {
        "ks"
    } else if route.starts_with("/ais") {
        "ais"
    } else if route.starts_with("/signaling") {
        "signaling"
    } else if route.starts_with("/metrics") {
        "metrics"
    } else {
        "other"
    }
}

/// The middleware; install with `axum::middleware::from_fn_with_state(stats, track)`.
pub async fn track(
    axum::extract::State(stats): axum::extract::State<Arc<HttpStats>>,
    req: Request,
    next: Next,
) -> Response {
    // Unmatched paths share one label so scans of random URLs cannot grow the table.
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = req.method().as_str().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    stats.record(
        &route,
        &method,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}
