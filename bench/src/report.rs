//! What a run reports: one [`ScenarioReport`] per scenario, gathered in a [`RunReport`]
//! written as JSON, a human summary table, and SVG plots.

use crate::stats::{si, LatencySummary};
use crate::svg;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

/// Server process accounting over the measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerUsage {
    pub pid: Option<u32>,
    /// utime+stime delta from /proc/PID/stat.
    pub cpu_secs: Option<f64>,
    /// cpu_secs over the wall time of the window (1.0 = one core busy).
    pub cpu_util: Option<f64>,
    pub rss_before: Option<u64>,
    pub rss_after: Option<u64>,
}

/// The load generator's own accounting: was it the bottleneck?
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GeneratorUsage {
    pub core: Option<usize>,
    pub pinned: bool,
    pub cpu_secs: f64,
    /// cpu_secs over the wall time (1.0 = its core was busy the whole time).
    pub cpu_util: f64,
    /// Datagrams not sent because our socket buffer was full (EAGAIN).
    pub send_eagain: u64,
    pub send_errors: u64,
    /// True when it could not offer the requested load.
    pub limited: bool,
    pub limit_reason: Option<String>,
}

/// One offered-rate step of a relay or binding run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StepReport {
    pub offered_pps: f64,
    pub achieved_offered_pps: f64,
    pub relayed_pps: f64,
    pub loss: f64,
    pub p99_us: f64,
    pub server_cpu_us_per_pkt: Option<f64>,
    pub generator_limited: bool,
    pub passed: bool,
}

/// Per-interval throughput sample (t in seconds from the scenario start).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Sample {
    pub t: f64,
    pub offered_pps: f64,
    pub relayed_pps: f64,
    pub completed_pps: f64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub name: String,
    pub kind: String,
    pub description: String,
    pub target: String,
    pub passed: bool,
    pub skipped: bool,
    pub failures: Vec<String>,
    pub notes: Vec<String>,
    pub started_unix: u64,
    pub wall_secs: f64,
    pub metrics: BTreeMap<String, f64>,
    pub latency: Option<LatencySummary>,
    pub server: ServerUsage,
    pub generator: GeneratorUsage,
    pub steps: Vec<StepReport>,
    /// CPU (in cores) used on the machine by neither the server nor the generator during
    /// the scenario: noise from other processes.
    pub host_other_cpu_util: Option<f64>,
    /// CPU (in cores) the hypervisor took from this VM during the scenario (/proc/stat steal).
    #[serde(default)]
    pub host_steal_cpu: Option<f64>,

    pub timeseries: Vec<Sample>,
    /// The scenario as run (after --time-scale and overrides).
    pub spec: serde_json::Value,
}

impl ScenarioReport {
    pub fn metric(&self, k: &str) -> Option<f64> {
        self.metrics.get(k).copied().filter(|v| v.is_finite())
    }

    pub fn set(&mut self, k: &str, v: f64) {
        if v.is_finite() {
            self.metrics.insert(k.into(), v);
        }
    }

    pub fn set_opt(&mut self, k: &str, v: Option<f64>) {
        if let Some(v) = v {
            self.set(k, v);
        }
    }

    pub fn fail(&mut self, why: impl Into<String>) {
        self.passed = false;
        self.failures.push(why.into());
    }

    /// The figure that sums the scenario up, with its unit.
    pub fn headline(&self) -> (String, &'static str) {
        let pick = |k: &str| self.metric(k).map(si).unwrap_or_else(|| "-".into());
        match self.kind.as_str() {
            "binding" => (pick("binding_rps"), "req/s"),
            "churn" => (pick("allocs_per_s"), "alloc/s"),
            "relay" if self.metrics.contains_key("max_relayed_pps") => {
                (pick("max_relayed_pps"), "relayed pkt/s max")
            }
            "relay" => (pick("relayed_pps"), "relayed pkt/s"),
            "idle" => (pick("rss_bytes_per_alloc"), "B RSS/alloc"),
            "handshake" => (pick("handshakes_per_s"), "conn/s"),
            "ks" if self.metrics.contains_key("ks_generate_rps") => {
                (pick("ks_generate_rps"), "keys generated/s")
            }
            "ks" => (pick("ks_secret_rps"), "secret fetches/s"),
            "ais" if self.metrics.contains_key("ais_register_v4_rps") => {
                (pick("ais_register_v4_rps"), "0.4 registrations/s")
            }
            "ais" => (pick("ais_register_rps"), "registrations/s"),
            "signaling" => (pick("envelopes_per_s"), "envelopes/s delivered"),
            "flood" => (pick("flood_sent_pps"), "spoofed Allocates/s"),

            _ => ("-".into(), ""),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HostInfo {
    pub cpu_model: String,
    pub cpus: usize,
    pub kernel: String,
    pub commit: String,
    pub date_unix: u64,
}

impl HostInfo {
    pub fn collect() -> HostInfo {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split(':').nth(1))
                    .map(|m| m.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".into());
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into());
        // Read-only: which commit was measured. Absent outside a checkout.
        let commit = std::process::Command::new("git")
            .args(["rev-parse", "--short", "HEAD"])
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
            .unwrap_or_else(|| "unknown".into());
        HostInfo {
            cpu_model,
            // Online CPUs of the machine, not of our (pinned) affinity mask.
            // SAFETY: sysconf has no preconditions.
            cpus: unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) }.max(1) as usize,
            kernel,
            commit,
            date_unix: crate::target::unix_now(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    pub tool: String,
    pub version: String,
    pub label: String,
    pub target: serde_json::Value,
    pub host: HostInfo,
    pub scenarios: Vec<ScenarioReport>,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.scenarios.iter().all(|s| s.passed)
    }
}

fn fmt_opt(v: Option<f64>, digits: usize) -> String {
    match v {
        Some(v) if v.is_finite() => format!("{v:.digits$}"),
        _ => "-".into(),
    }
}

/// The human summary table.
pub fn summary_table(r: &RunReport) -> String {
    let mut rows: Vec<[String; 10]> = vec![[
        "scenario".into(),
        "kind".into(),
        "status".into(),
        "headline".into(),
        "loss".into(),
        "p50 us".into(),
        "p99 us".into(),
        "p99.9 us".into(),
        "srv us/pkt".into(),
        "gen CPU".into(),
    ]];
    for s in &r.scenarios {
        let (h, unit) = s.headline();
        let status = if s.skipped {
            "skip"
        } else if s.passed {
            "PASS"
        } else {
            "FAIL"
        };
        let loss = s
            .metric("loss")
            .or(s.metric("loss_at_max"))
            .or(s.metric("failure_fraction"))
            .map(|l| format!("{:.3}%", l * 100.0))
            .unwrap_or_else(|| "-".into());
        let lat = s.latency.as_ref();
        let cpu = s
            .metric("cpu_us_per_relayed_pkt")
            .or(s.metric("cpu_us_per_request"))
            .or(s.metric("cpu_us_per_envelope"))
            .or(s.metric("cpu_us_per_alloc_cycle"))
            .or(s.metric("cpu_us_per_handshake"));
        rows.push([
            s.name.clone(),
            s.kind.clone(),
            status.into(),
            format!("{h} {unit}"),
            loss,
            fmt_opt(lat.map(|l| l.p50_us), 1),
            fmt_opt(lat.map(|l| l.p99_us), 1),
            fmt_opt(lat.map(|l| l.p999_us), 1),
            fmt_opt(cpu, 3),
            format!(
                "{:.0}%{}",
                s.generator.cpu_util * 100.0,
                if s.generator.limited { " LIMITED" } else { "" }
            ),
        ]);
    }
    let mut widths = [0usize; 10];
    for r in &rows {
        for (w, c) in widths.iter_mut().zip(r.iter()) {
            *w = (*w).max(c.len());
        }
    }
    let mut out = format!(
        "actrix-bench {} against {} ({})\n",
        r.version,
        r.label,
        r.target.get("addr").and_then(|a| a.as_str()).unwrap_or("?")
    );
    for (i, row) in rows.iter().enumerate() {
        let line: Vec<String> = row
            .iter()
            .zip(widths.iter())
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
        if i == 0 {
            let total: usize = widths.iter().sum::<usize>() + 2 * (widths.len() - 1);
            out.push_str(&"-".repeat(total));
            out.push('\n');
        }
    }
    for s in &r.scenarios {
        for f in &s.failures {
            out.push_str(&format!("FAIL {}: {f}\n", s.name));
        }
        for n in &s.notes {
            out.push_str(&format!("note {}: {n}\n", s.name));
        }
    }
    out
}

/// Write results.json, summary.txt and the plots into `dir`.
pub fn write_all(r: &RunReport, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let json = serde_json::to_string_pretty(r).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("results.json"), json)?;
    std::fs::write(dir.join("summary.txt"), summary_table(r))?;
    for s in &r.scenarios {
        if !s.timeseries.is_empty() {
            let pts = |f: fn(&Sample) -> f64| -> Vec<(f64, f64)> {
                s.timeseries.iter().map(|x| (x.t, f(x))).collect()
            };
            let chart = svg::line_chart(
                &format!("{} ({}): throughput over time", s.name, r.label),
                "time (s)",
                "packets/s",
                &[
                    ("offered", pts(|x| x.offered_pps)),
                    ("relayed/answered", pts(|x| x.relayed_pps)),
                    ("round trips completed", pts(|x| x.completed_pps)),
                ],
                svg::XScale::Linear,
            );
            std::fs::write(dir.join(format!("{}-throughput.svg", s.name)), chart)?;
        }
        if let Some(l) = &s.latency {
            if l.count > 0 {
                let chart = svg::line_chart(
                    &format!(
                        "{} ({}): latency distribution, {} samples",
                        s.name, r.label, l.count
                    ),
                    "percentile",
                    "round-trip latency (us)",
                    &[("latency", l.curve.clone())],
                    svg::XScale::Percentile,
                );
                std::fs::write(dir.join(format!("{}-latency.svg", s.name)), chart)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_and_files() {
        let mut s = ScenarioReport {
            name: "relay-channel".into(),
            kind: "relay".into(),
            passed: true,
            ..Default::default()
        };
        s.set("relayed_pps", 123_456.0);
        s.set("loss", 0.0005);
        s.set("cpu_us_per_relayed_pkt", 1.25);
        s.set("nan", f64::NAN);
        assert_eq!(s.metric("nan"), None);
        s.timeseries = vec![
            Sample {
                t: 0.25,
                offered_pps: 1.0,
                relayed_pps: 2.0,
                completed_pps: 1.0,
            },
            Sample {
                t: 0.5,
                offered_pps: 1.0,
                relayed_pps: 2.0,
                completed_pps: 1.0,
            },
        ];
        let mut lat = crate::stats::Latency::new();
        lat.record_ns(50_000);
        s.latency = Some(lat.summary());
        s.fail("loss 0.2% above 0.1%");
        let r = RunReport {
            tool: "actrix-bench".into(),
            version: "0".into(),
            label: "x".into(),
            target: serde_json::json!({"addr": "127.0.0.1:1"}),
            host: HostInfo::default(),
            scenarios: vec![s],
        };
        assert!(!r.passed());
        let t = summary_table(&r);
        assert!(t.contains("123.5k relayed pkt/s"), "{t}");
        assert!(t.contains("0.050%"), "{t}");
        assert!(t.contains("FAIL relay-channel: loss"), "{t}");
        let dir = std::env::temp_dir().join(format!("actrix-bench-report-{}", std::process::id()));
        write_all(&r, &dir).unwrap();
        let back: RunReport =
            serde_json::from_str(&std::fs::read_to_string(dir.join("results.json")).unwrap())
                .unwrap();
        assert_eq!(back.scenarios[0].metric("relayed_pps"), Some(123_456.0));
        assert!(dir.join("relay-channel-throughput.svg").exists());
        assert!(dir.join("relay-channel-latency.svg").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
