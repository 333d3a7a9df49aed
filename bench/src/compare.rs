//! One comparison report from several runs: medians per target over the rounds, and the
//! ratios ours/reference and ours/coturn (markdown and JSON).

use crate::report::{HostInfo, RunReport, ScenarioReport};
use crate::stats::{median, ratio, si};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Which way is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Better {
    Lower,
    Higher,
}

/// The metrics compared, in report order: (key, title, unit, better).
pub const METRICS: [(&str, &str, &str, Better); 12] = [
    (
        "cpu_us_per_relayed_pkt",
        "server CPU per relayed packet",
        "us",
        Better::Lower,
    ),
    (
        "max_relayed_pps",
        "max relayed packets/s under the loss bound",
        "pkt/s",
        Better::Higher,
    ),
    ("binding_rps", "STUN Binding rate", "req/s", Better::Higher),
    (
        "allocs_per_s",
        "allocation cycles per second",
        "alloc/s",
        Better::Higher,
    ),
    (
        "cpu_us_per_relayed_pkt_at_max",
        "server CPU per relayed packet at the max rate",
        "us",
        Better::Lower,
    ),
    (
        "cpu_us_per_request",
        "server CPU per Binding request",
        "us",
        Better::Lower,
    ),
    (
        "cpu_us_per_alloc_cycle",
        "server CPU per allocation cycle",
        "us",
        Better::Lower,
    ),
    (
        "rss_bytes_per_alloc",
        "server RSS per idle allocation (streams: per connection)",
        "bytes",
        Better::Lower,
    ),
    (
        "handshakes_per_s",
        "connections per second (connect, TLS handshake, one request, close)",
        "conn/s",
        Better::Higher,
    ),
    (
        "cpu_us_per_handshake",
        "server CPU per connection (TLS: per full handshake)",
        "us",
        Better::Lower,
    ),
    (
        "p99_us",
        "latency p99 (per round trip; churn: per cycle; idle: per allocation)",
        "us",
        Better::Lower,
    ),
    ("loss", "round-trip loss", "fraction", Better::Lower),
];

/// A metric as the comparison sees it: latency percentiles are metrics too.
pub fn metric_of(s: &ScenarioReport, key: &str) -> Option<f64> {
    if s.skipped {
        return None;
    }
    match key {
        "p99_us" => s.latency.as_ref().filter(|l| l.count > 0).map(|l| l.p99_us),
        _ => s.metric(key),
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    pub median: Option<f64>,
    pub min: Option<f64>,
    pub max: Option<f64>,
    pub runs: usize,
    /// Some run of this cell had its generator at its limit (the figure is a bound).
    pub generator_limited: bool,
    pub failed_runs: usize,
}

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    pub scenario: String,
    pub metric: String,
    pub title: String,
    pub unit: String,
    pub better: Better,
    pub values: BTreeMap<String, Cell>,
    pub ours_over_reference: Option<f64>,
    pub ours_over_coturn: Option<f64>,
    /// Ours over each label of [`Comparison::ratios_to`], in that order.
    pub ours_over: Vec<Option<f64>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    pub ours: String,
    pub reference: Option<String>,
    pub coturn: Option<String>,
    pub labels: Vec<String>,
    /// Further labels ours is divided by (another build, another backend).
    pub ratios_to: Vec<String>,
    pub host: HostInfo,
    pub rows: Vec<Row>,
}

/// Add a ratio column ours/`label` for each of `labels` (labels without runs are skipped).
pub fn add_ratios(c: &mut Comparison, labels: &[String]) {
    for l in labels {
        if !c.labels.contains(l) || *l == c.ours || c.ratios_to.contains(l) {
            continue;
        }
        c.ratios_to.push(l.clone());
        for r in &mut c.rows {
            let med = |x: &str| r.values.get(x).and_then(|v| v.median);
            let v = ratio(med(&c.ours), med(l));
            r.ours_over.push(v);
        }
    }
}

fn cell(runs: &[&RunReport], scenario: &str, key: &str) -> Cell {
    let mut vals = Vec::new();
    let mut limited = false;
    let mut failed = 0;
    let mut n = 0;
    for r in runs {
        for s in r.scenarios.iter().filter(|s| s.name == scenario) {
            n += 1;
            if !s.passed {
                failed += 1;
            }
            limited |= s.generator.limited;
            if let Some(v) = metric_of(s, key) {
                vals.push(v);
            }
        }
    }
    Cell {
        median: median(&vals),
        min: vals.iter().copied().reduce(f64::min),
        max: vals.iter().copied().reduce(f64::max),
        runs: n,
        generator_limited: limited,
        failed_runs: failed,
    }
}

/// Build the comparison from labelled runs (several runs per label are rounds).
pub fn compare(
    runs: &[(String, RunReport)],
    ours: &str,
    reference: Option<&str>,
    coturn: Option<&str>,
) -> Comparison {
    let mut labels: Vec<String> = Vec::new();
    for (l, _) in runs {
        if !labels.contains(l) {
            labels.push(l.clone());
        }
    }
    let by_label = |l: &str| -> Vec<&RunReport> {
        runs.iter()
            .filter(|(x, _)| x == l)
            .map(|(_, r)| r)
            .collect()
    };
    // Scenario names in first-seen order.
    let mut scenarios: Vec<String> = Vec::new();
    for (_, r) in runs {
        for s in &r.scenarios {
            if !scenarios.contains(&s.name) {
                scenarios.push(s.name.clone());
            }
        }
    }
    let mut rows = Vec::new();
    for (key, title, unit, better) in METRICS {
        for sc in &scenarios {
            let mut values = BTreeMap::new();
            for l in &labels {
                values.insert(l.clone(), cell(&by_label(l), sc, key));
            }
            if values.values().all(|c| c.median.is_none()) {
                continue;
            }
            let med = |l: Option<&str>| l.and_then(|l| values.get(l)).and_then(|c| c.median);
            rows.push(Row {
                scenario: sc.clone(),
                metric: key.into(),
                title: title.into(),
                unit: unit.into(),
                better,
                ours_over_reference: ratio(med(Some(ours)), med(reference)),
                ours_over_coturn: ratio(med(Some(ours)), med(coturn)),
                ours_over: Vec::new(),
                values,
            });
        }
    }
    Comparison {
        ours: ours.into(),
        reference: reference.map(String::from),
        coturn: coturn.map(String::from),
        labels,
        ratios_to: Vec::new(),
        host: runs
            .first()
            .map(|(_, r)| r.host.clone())
            .unwrap_or_default(),
        rows,
    }
}

fn fmt_val(v: Option<f64>, unit: &str) -> String {
    match v {
        None => "-".into(),
        Some(v) if unit == "fraction" => format!("{:.3}%", v * 100.0),
        Some(v) if unit == "us" => format!("{v:.3}"),
        Some(v) => si(v),
    }
}

fn fmt_ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}x")).unwrap_or_else(|| "-".into())
}

pub fn markdown(c: &Comparison) -> String {
    let mut s = String::new();
    s.push_str("# actrix-bench comparison\n\n");
    s.push_str(&format!(
        "Host: {} ({} CPUs), kernel {}, commit {}, unix time {}.\n\n",
        c.host.cpu_model, c.host.cpus, c.host.kernel, c.host.commit, c.host.date_unix
    ));
    s.push_str(
        "Medians over the rounds (min-max in brackets). Ratios are ours over the other; \
         for CPU, latency, loss and memory lower is better, for rates higher is better. \
         `*` marks a figure where the load generator was at its limit (a bound, not the \
         server's figure); `!` marks cells with failed runs.\n\n",
    );
    let mut header = "| scenario | metric |".to_string();
    let mut sep = "|---|---|".to_string();
    for l in &c.labels {
        header.push_str(&format!(" {l} |"));
        sep.push_str("---:|");
    }
    if c.reference.is_some() {
        header.push_str(&format!(
            " {}/{} |",
            c.ours,
            c.reference.as_deref().unwrap_or("")
        ));
        sep.push_str("---:|");
    }
    if c.coturn.is_some() {
        header.push_str(&format!(
            " {}/{} |",
            c.ours,
            c.coturn.as_deref().unwrap_or("")
        ));
        sep.push_str("---:|");
    }
    for l in &c.ratios_to {
        header.push_str(&format!(" {}/{l} |", c.ours));
        sep.push_str("---:|");
    }
    s.push_str(&header);
    s.push('\n');
    s.push_str(&sep);
    s.push('\n');
    for r in &c.rows {
        let mut line = format!(
            "| {} | {} ({}, {} better) |",
            r.scenario,
            r.title,
            r.unit,
            match r.better {
                Better::Lower => "lower",
                Better::Higher => "higher",
            }
        );
        for l in &c.labels {
            let cell = &r.values[l];
            let mut v = fmt_val(cell.median, &r.unit);
            if cell.runs > 1 && cell.median.is_some() {
                v.push_str(&format!(
                    " [{}-{}]",
                    fmt_val(cell.min, &r.unit),
                    fmt_val(cell.max, &r.unit)
                ));
            }
            if cell.generator_limited {
                v.push('*');
            }
            if cell.failed_runs > 0 {
                v.push('!');
            }
            line.push_str(&format!(" {v} |"));
        }
        if c.reference.is_some() {
            line.push_str(&format!(" {} |", fmt_ratio(r.ours_over_reference)));
        }
        if c.coturn.is_some() {
            line.push_str(&format!(" {} |", fmt_ratio(r.ours_over_coturn)));
        }
        for v in &r.ours_over {
            line.push_str(&format!(" {} |", fmt_ratio(*v)));
        }
        s.push_str(&line);
        s.push('\n');
    }
    s
}

/// Read `DIR/results.json` (or a results file given directly).
pub fn load_run(path: &Path) -> Result<RunReport, String> {
    let p: PathBuf = if path.is_dir() {
        path.join("results.json")
    } else {
        path.to_path_buf()
    };
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))
}

pub fn write(c: &Comparison, dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::write(dir.join("comparison.md"), markdown(c))?;
    let json = serde_json::to_string_pretty(c).map_err(std::io::Error::other)?;
    std::fs::write(dir.join("comparison.json"), json)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(label: &str, metrics: &[(&str, &str, f64)]) -> (String, RunReport) {
        let mut scenarios: Vec<ScenarioReport> = Vec::new();
        for (sc, k, v) in metrics {
            let s = match scenarios.iter_mut().position(|s| s.name == *sc) {
                Some(i) => &mut scenarios[i],
                None => {
                    scenarios.push(ScenarioReport {
                        name: sc.to_string(),
                        passed: true,
                        ..Default::default()
                    });
                    scenarios.last_mut().unwrap()
                }
            };
            s.set(k, *v);
        }
        (
            label.into(),
            RunReport {
                tool: "actrix-bench".into(),
                version: "0".into(),
                label: label.into(),
                target: serde_json::Value::Null,
                host: HostInfo::default(),
                scenarios,
            },
        )
    }

    #[test]
    fn medians_and_ratios() {
        let runs = vec![
            run("ref", &[("relay", "cpu_us_per_relayed_pkt", 1.0)]),
            run("ref", &[("relay", "cpu_us_per_relayed_pkt", 1.2)]),
            run("ref", &[("relay", "cpu_us_per_relayed_pkt", 5.0)]),
            run(
                "coturn",
                &[
                    ("relay", "cpu_us_per_relayed_pkt", 2.0),
                    ("churn", "allocs_per_s", 1000.0),
                ],
            ),
            run(
                "ours",
                &[
                    ("relay", "cpu_us_per_relayed_pkt", 1.8),
                    ("churn", "allocs_per_s", 3000.0),
                ],
            ),
        ];
        let c = compare(&runs, "ours", Some("ref"), Some("coturn"));
        let cpu = c
            .rows
            .iter()
            .find(|r| r.metric == "cpu_us_per_relayed_pkt")
            .unwrap();
        assert_eq!(cpu.values["ref"].median, Some(1.2));
        assert_eq!(cpu.values["ref"].runs, 3);
        assert!((cpu.ours_over_reference.unwrap() - 1.5).abs() < 1e-9);
        assert!((cpu.ours_over_coturn.unwrap() - 0.9).abs() < 1e-9);
        let churn = c.rows.iter().find(|r| r.metric == "allocs_per_s").unwrap();
        // The reference has no allocations: no ratio, never a division by zero.
        assert_eq!(churn.ours_over_reference, None);
        assert_eq!(churn.ours_over_coturn, Some(3.0));
        let md = markdown(&c);
        assert!(
            md.contains("| relay | server CPU per relayed packet"),
            "{md}"
        );
        assert!(md.contains("1.200 [1.000-5.000]"), "{md}");
        assert!(md.contains("1.50x") && md.contains("0.90x") && md.contains("3.00x"));
    }

    #[test]
    fn ratios_to_other_builds_and_backends() {
        let runs = vec![
            run("before", &[("relay", "cpu_us_per_relayed_pkt", 2.0)]),
            run("after", &[("relay", "cpu_us_per_relayed_pkt", 1.9)]),
            run("glommio", &[("relay", "cpu_us_per_relayed_pkt", 2.5)]),
        ];
        let mut c = compare(&runs, "after", None, None);
        add_ratios(
            &mut c,
            &[
                "before".into(),
                "glommio".into(),
                "missing".into(),
                "after".into(),
            ],
        );
        assert_eq!(c.ratios_to, ["before", "glommio"]);
        let row = &c.rows[0];
        assert!((row.ours_over[0].unwrap() - 0.95).abs() < 1e-9);
        assert!((row.ours_over[1].unwrap() - 0.76).abs() < 1e-9);
        let md = markdown(&c);
        assert!(
            md.contains("after/before") && md.contains("after/glommio"),
            "{md}"
        );
        assert!(md.contains("0.95x") && md.contains("0.76x"), "{md}");
    }
}
