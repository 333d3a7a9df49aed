//! Hand-written SVG line charts (no plotting dependency): throughput over time and latency
//! distributions on a percentile axis.

use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XScale {
    Linear,
    /// x is a quantile in [0, 1], drawn as -log10(1 - q) so the tail gets room
    /// (90%, 99%, 99.9%, ... equally spaced).
    Percentile,
}

const W: f64 = 800.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 20.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b",
];
/// Largest -log10(1 - q) drawn (q = 99.9999%).
const MAX_NINES: f64 = 6.0;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn x_of(scale: XScale, x: f64) -> f64 {
    match scale {
        XScale::Linear => x,
        XScale::Percentile => {
            if x >= 1.0 {
                MAX_NINES
            } else {
                (-(1.0 - x).log10()).clamp(0.0, MAX_NINES)
            }
        }
    }
}

/// A "nice" tick step for a span.
fn nice_step(span: f64, ticks: f64) -> f64 {
    if !span.is_finite() || span <= 0.0 {
        return 1.0;
    }
    let raw = span / ticks;
    let mag = 10f64.powf(raw.log10().floor());
    let n = raw / mag;
    let m = if n < 1.5 {
        1.0
    } else if n < 3.0 {
        2.0
    } else if n < 7.0 {
        5.0
    } else {
        10.0
    };
    m * mag
}

fn fmt_tick(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{}M", trim(v / 1e6))
    } else if a >= 1e3 {
        format!("{}k", trim(v / 1e3))
    } else {
        trim(v)
    }
}

fn trim(v: f64) -> String {
    let s = format!("{v:.2}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    if s.is_empty() || s == "-0" {
        "0".into()
    } else {
        s.into()
    }
}

/// A line chart of one or more named series.
pub fn line_chart(
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[(&str, Vec<(f64, f64)>)],
    scale: XScale,
) -> String {
    let pts: Vec<(f64, f64)> = series
        .iter()
        .flat_map(|(_, s)| s.iter().map(|&(x, y)| (x_of(scale, x), y)))
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let (mut x0, mut x1) = match scale {
        XScale::Linear => (
            pts.iter().map(|p| p.0).fold(f64::INFINITY, f64::min),
            pts.iter().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max),
        ),
        XScale::Percentile => (0.0, pts.iter().map(|p| p.0).fold(1.0, f64::max).ceil()),
    };
    if !x0.is_finite() || !x1.is_finite() {
        x0 = 0.0;
        x1 = 1.0;
    }
    if x1 <= x0 {
        x1 = x0 + 1.0;
    }
    let ymax_raw = pts.iter().map(|p| p.1).fold(0.0, f64::max);
    let ystep = nice_step(if ymax_raw > 0.0 { ymax_raw } else { 1.0 }, 5.0);
    let y1 = ((ymax_raw / ystep).ceil() * ystep).max(ystep);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + (x - x0) / (x1 - x0) * pw;
    let py = |y: f64| TOP + ph - (y / y1) * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" text-anchor="middle" font-size="14">{}</text>"#,
        W / 2.0,
        esc(title)
    );
    // Y grid and ticks.
    let mut y = 0.0;
    while y <= y1 + ystep / 2.0 {
        let yy = py(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            yy + 4.0,
            fmt_tick(y)
        );
        y += ystep;
    }
    // X ticks.
    match scale {
        XScale::Linear => {
            let step = nice_step(x1 - x0, 8.0);
            let mut x = (x0 / step).ceil() * step;
            while x <= x1 + step / 1e6 {
                let xx = px(x);
                let _ = writeln!(
                    s,
                    r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
                    TOP + ph,
                    TOP + ph + 16.0,
                    fmt_tick(x)
                );
                x += step;
            }
        }
        XScale::Percentile => {
            let labels = ["0%", "90%", "99%", "99.9%", "99.99%", "99.999%", "99.9999%"];
            for (i, l) in labels.iter().enumerate() {
                let x = i as f64;
                if x > x1 {
                    break;
                }
                let xx = px(x);
                let _ = writeln!(
                    s,
                    r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#eee"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{l}</text>"##,
                    TOP + ph,
                    TOP + ph + 16.0
                );
            }
        }
    }
    let _ = writeln!(
        s,
        r#"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="black"/>"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
        LEFT + pw / 2.0,
        H - 18.0,
        esc(x_label)
    );
    let _ = writeln!(
        s,
        r#"<text x="16" y="{:.1}" text-anchor="middle" transform="rotate(-90 16 {:.1})">{}</text>"#,
        TOP + ph / 2.0,
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (i, (name, data)) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let path: Vec<String> = data
            .iter()
            .map(|&(x, y)| (x_of(scale, x), y))
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .map(|(x, y)| format!("{:.1},{:.1}", px(x), py(y)))
            .collect();
        if !path.is_empty() {
            let _ = writeln!(
                s,
                r#"<polyline fill="none" stroke="{color}" stroke-width="2" points="{}"/>"#,
                path.join(" ")
            );
        }
        let ly = TOP + 16.0 + 16.0 * i as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{:.1}" y="{:.1}" width="12" height="3" fill="{color}"/><text x="{:.1}" y="{:.1}">{}</text>"#,
            LEFT + 12.0,
            ly - 4.0,
            LEFT + 30.0,
            ly,
            esc(name)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_are_well_formed() {
        let c = line_chart(
            "a <b>",
            "t",
            "y",
            &[("s", vec![(0.0, 1.0), (1.0, 3.0)]), ("empty", vec![])],
            XScale::Linear,
        );
        assert!(c.starts_with("<svg") && c.trim_end().ends_with("</svg>"));
        assert!(c.contains("a &lt;b&gt;"));
        assert!(c.contains("<polyline"));
        let p = line_chart(
            "lat",
            "p",
            "us",
            &[("l", vec![(0.5, 10.0), (0.999, 50.0), (1.0, 80.0)])],
            XScale::Percentile,
        );
        assert!(p.contains("99.9%"));
        assert_eq!(nice_step(1000.0, 5.0), 200.0);
        assert_eq!(fmt_tick(250_000.0), "250k");
    }
}
