//! Latency histograms, percentiles and the arithmetic of the reports (rates, loss, CPU per
//! packet, medians, ratios). Pure functions, tested without a network.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Round-trip latency in nanoseconds, 3 significant digits, 1 us .. 60 s.
pub struct Latency {
    h: Histogram<u64>,
    /// Samples outside the trackable range (clamped, but counted).
    pub clamped: u64,
}

impl std::fmt::Debug for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Latency")
            .field("count", &self.count())
            .field("clamped", &self.clamped)
            .finish()
    }
}

const LOW_NS: u64 = 1_000;
const HIGH_NS: u64 = 60_000_000_000;

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    pub fn new() -> Self {
        Latency {
            h: Histogram::new_with_bounds(LOW_NS, HIGH_NS, 3)
                .expect("static histogram bounds are valid"),
            clamped: 0,
        }
    }

    pub fn record_ns(&mut self, ns: u64) {
        let v = ns.clamp(LOW_NS, HIGH_NS);
        if v != ns && ns > HIGH_NS {
            self.clamped += 1;
        }
        // Cannot fail: v is within the bounds the histogram was built with.
        let _ = self.h.record(v);
    }

    pub fn merge(&mut self, other: &Latency) {
        let _ = self.h.add(&other.h);
        self.clamped += other.clamped;
    }

    pub fn count(&self) -> u64 {
        self.h.len()
    }

    pub fn quantile_us(&self, q: f64) -> f64 {
        if self.h.is_empty() {
            return 0.0;
        }
        self.h.value_at_quantile(q) as f64 / 1000.0
    }

    pub fn summary(&self) -> LatencySummary {
        let curve = CURVE_QUANTILES
            .iter()
            .map(|&q| (q, self.quantile_us(q)))
            .collect();
        LatencySummary {
            count: self.count(),
            mean_us: if self.h.is_empty() {
                0.0
            } else {
                self.h.mean() / 1000.0
            },
            p50_us: self.quantile_us(0.5),
            p90_us: self.quantile_us(0.9),
            p99_us: self.quantile_us(0.99),
            p999_us: self.quantile_us(0.999),
            max_us: if self.h.is_empty() {
                0.0
            } else {
                self.h.max() as f64 / 1000.0
            },
            curve,
        }
    }
}

/// Quantiles sampled for the latency-distribution plot.
pub const CURVE_QUANTILES: [f64; 16] = [
    0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 0.9995, 0.9999, 0.99995, 0.99999,
    0.999995, 1.0,
];

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
    /// (quantile, microseconds) points of the distribution.
    pub curve: Vec<(f64, f64)>,
}

/// The cumulative buckets `(le, count)` of the Prometheus histogram `name` (without labels) in
/// a text exposition, in the order given; `None` when the histogram is not there.
pub fn prom_histogram(text: &str, name: &str) -> Option<Vec<(f64, u64)>> {
    let prefix = format!("{name}_bucket{{le=\"");
    let mut out = Vec::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let (le, rest) = rest.split_once("\"}")?;
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            le.parse().ok()?
        };
        let n: f64 = rest.trim().split(' ').next()?.parse().ok()?;
        out.push((le, n as u64));
    }
    (!out.is_empty()).then_some(out)
}

/// Bucket-wise `after - before` of two snapshots of one cumulative histogram (a counter reset
/// or mismatched buckets give `None`).
pub fn histogram_delta(before: &[(f64, u64)], after: &[(f64, u64)]) -> Option<Vec<(f64, u64)>> {
    if before.len() != after.len() {
        return None;
    }
    before
        .iter()
        .zip(after)
        .map(|(b, a)| (b.0 == a.0 && a.1 >= b.1).then(|| (a.0, a.1 - b.1)))
        .collect()
}

/// The upper bound of the bucket holding quantile `q` of a cumulative histogram (the value
/// is at most this); `None` when it is empty.
pub fn bucket_quantile(cum: &[(f64, u64)], q: f64) -> Option<f64> {
    let total = cum.last()?.1;
    if total == 0 {
        return None;
    }
    let want = (q * total as f64).ceil().max(1.0) as u64;
    cum.iter().find(|(_, c)| *c >= want).map(|(le, _)| *le)
}

/// Fraction of a cumulative histogram's observations at or under `bound` (a bucket bound).
pub fn fraction_within(cum: &[(f64, u64)], bound: f64) -> Option<f64> {
    let total = cum.last()?.1;
    let under = cum.iter().find(|(le, _)| *le >= bound)?.1;
    (total > 0).then(|| under as f64 / total as f64)
}

/// Events per second; 0 for an empty interval.
pub fn rate(count: u64, secs: f64) -> f64 {
    if secs > 0.0 && secs.is_finite() {
        count as f64 / secs
    } else {
        0.0
    }
}

/// Fraction of `sent` that did not come back, in [0, 1]. Extra replies (duplicates) never
/// make it negative.
pub fn loss(sent: u64, received: u64) -> f64 {
    if sent == 0 {
        return 0.0;
    }
    sent.saturating_sub(received) as f64 / sent as f64
}

/// Microseconds of CPU per packet; `None` when nothing was relayed or CPU was not measured.
pub fn cpu_us_per_packet(cpu_secs: Option<f64>, packets: u64) -> Option<f64> {
    match cpu_secs {
        Some(c) if packets > 0 && c.is_finite() && c >= 0.0 => Some(c * 1e6 / packets as f64),
        _ => None,
    }
}

/// `a / b`, or `None` when either is missing, not finite, or `b` is not positive.
pub fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if a.is_finite() && b.is_finite() && b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// Median of the finite values (mean of the middle two for an even count).
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

/// Human number: 1234567 -> "1.23M".
pub fn si(v: f64) -> String {
    let a = v.abs();
    if !v.is_finite() {
        "-".into()
    } else if a >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if a >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.1}k", v / 1e3)
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_histogram_parsing_and_bucket_quantiles() {
        let text = "# HELP x_seconds lat\n# TYPE x_seconds histogram\n\
            x_seconds_sum 1.5\nx_seconds_count 100\n\
            x_seconds_bucket{le=\"0.001\"} 50\nx_seconds_bucket{le=\"0.005\"} 98\n\
            x_seconds_bucket{le=\"0.01\"} 100\nx_seconds_bucket{le=\"+Inf\"} 100\n\
            y_seconds_bucket{le=\"0.001\"} 7\n";
        let h = prom_histogram(text, "x_seconds").unwrap();
        assert_eq!(h.len(), 4);
        assert_eq!(h[1], (0.005, 98));
        assert!(h[3].0.is_infinite());
        assert!(prom_histogram(text, "z_seconds").is_none());
        assert_eq!(bucket_quantile(&h, 0.5), Some(0.001));
        assert_eq!(bucket_quantile(&h, 0.98), Some(0.005));
        assert_eq!(bucket_quantile(&h, 0.99), Some(0.01));
        assert_eq!(fraction_within(&h, 0.005), Some(0.98));

        let before = vec![(0.001, 10), (0.005, 20), (f64::INFINITY, 20)];
        let after = vec![(0.001, 60), (0.005, 119), (f64::INFINITY, 120)];
        let d = histogram_delta(&before, &after).unwrap();
        assert_eq!(d, vec![(0.001, 50), (0.005, 99), (f64::INFINITY, 100)]);
        assert_eq!(bucket_quantile(&d, 0.99), Some(0.005));
        assert_eq!(bucket_quantile(&d, 0.999), Some(f64::INFINITY));
        // A restarted server (counts went down) or other buckets: no delta.
        assert!(histogram_delta(&after, &before).is_none());
        assert!(histogram_delta(&before, &d[..2]).is_none());
        assert_eq!(
            bucket_quantile(&[(0.001, 0), (f64::INFINITY, 0)], 0.5),
            None
        );
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let mut l = Latency::new();
        for us in 1..=1000u64 {
            l.record_ns(us * 1000);
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        let close = |a: f64, b: f64| (a - b).abs() / b < 0.01;
        assert!(close(s.p50_us, 500.0), "{}", s.p50_us);
        assert!(close(s.p90_us, 900.0), "{}", s.p90_us);
        assert!(close(s.p99_us, 990.0), "{}", s.p99_us);
        assert!(close(s.p999_us, 999.0), "{}", s.p999_us);
        assert!(close(s.max_us, 1000.0));
        assert!(close(s.mean_us, 500.5));
        assert_eq!(s.curve.len(), CURVE_QUANTILES.len());
        assert!(s.curve.windows(2).all(|w| w[0].1 <= w[1].1));
    }

    #[test]
    fn histogram_clamps_and_merges() {
        let mut a = Latency::new();
        a.record_ns(5); // below range: recorded as 1 us
        a.record_ns(u64::MAX); // above range: clamped and counted
        assert_eq!(a.count(), 2);
        assert_eq!(a.clamped, 1);
        let mut b = Latency::new();
        b.record_ns(2_000);
        b.merge(&a);
        assert_eq!(b.count(), 3);
        assert_eq!(Latency::new().summary().p99_us, 0.0);
    }

    #[test]
    fn report_math() {
        assert_eq!(rate(1000, 2.0), 500.0);
        assert_eq!(rate(1000, 0.0), 0.0);
        assert_eq!(loss(1000, 999), 0.001);
        assert_eq!(loss(10, 12), 0.0);
        assert_eq!(loss(0, 0), 0.0);
        assert_eq!(cpu_us_per_packet(Some(1.5), 1_000_000), Some(1.5));
        assert_eq!(cpu_us_per_packet(Some(1.0), 0), None);
        assert_eq!(cpu_us_per_packet(None, 10), None);
    }

    #[test]
    fn ratios_and_medians() {
        assert_eq!(ratio(Some(3.0), Some(2.0)), Some(1.5));
        assert_eq!(ratio(Some(3.0), Some(0.0)), None);
        assert_eq!(ratio(None, Some(2.0)), None);
        assert_eq!(ratio(Some(f64::NAN), Some(2.0)), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN]), None);
        assert_eq!(median(&[]), None);
        assert_eq!(si(1_234_567.0), "1.23M");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(si(1.5), "1.50");
    }
}
