//! bench/chart.svg: cost of one checkpoint interval per dirty page (the first writes that
//! dirtied the pages plus the checkpoint itself) against the dirty fraction, log-log, one
//! line per mechanism and heap size, whiskers from min to max over repetitions.

use std::fmt::Write as _;

use crate::report::Record;
use crate::workloads::{size_name, Workload, GIB};

const W: f64 = 960.0;
const H: f64 = 540.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 350.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b",
];
const METRIC: &str = "cycle_ns_per_dirty_page";

struct Series {
    label: String,
    color: &'static str,
    dashed: bool,
    /// (fraction, median, min, max)
    points: Vec<(f64, f64, f64, f64)>,
}

pub fn chart(records: &[Record]) -> String {
    let mut mechs: Vec<String> = vec![];
    let mut heaps: Vec<usize> = vec![];
    for r in records {
        if let Workload::Checkpoint { heap, .. } = r.workload {
            if !mechs.contains(&r.mechanism) {
                mechs.push(r.mechanism.clone());
            }
            if !heaps.contains(&heap) {
                heaps.push(heap);
            }
        }
    }
    let mut series = vec![];
    for (i, m) in mechs.iter().enumerate() {
        for &heap in &heaps {
            let mut points = vec![];
            let mut backend = String::new();
            for r in records.iter().filter(|r| &r.mechanism == m) {
                if let Workload::Checkpoint { heap: h, fraction } = r.workload {
                    if let (true, Some(s)) = (h == heap, r.metric(METRIC)) {
                        points.push((fraction, s.median, s.min, s.max));
                        backend = r.backend();
                    }
                }
            }
            points.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
            if !points.is_empty() {
                series.push(Series {
                    label: format!("{m} ({backend}), {}", size_name(heap)),
                    color: COLORS[i % COLORS.len()],
                    dashed: heap < GIB,
                    points,
                });
            }
        }
    }
    let ys = series
        .iter()
        .flat_map(|s| s.points.iter().flat_map(|p| [p.2, p.3]));
    let (mut ylo, mut yhi) = (f64::INFINITY, 0.0f64);
    for y in ys.filter(|y| *y > 0.0) {
        ylo = ylo.min(y);
        yhi = yhi.max(y);
    }
    if !ylo.is_finite() {
        (ylo, yhi) = (1.0, 10.0);
    }
    let (ylo, yhi) = (
        ylo.log10().floor(),
        yhi.log10().ceil().max(ylo.log10().floor() + 1.0),
    );
    let (xlo, xhi) = (-3.5f64, 0.3f64);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let x = |f: f64| LEFT + (f.log10() - xlo) / (xhi - xlo) * pw;
    let y = |v: f64| TOP + (1.0 - (v.max(1e-9).log10() - ylo) / (yhi - ylo)) * ph;

    let mut o = String::new();
    let _ = writeln!(
        o,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(o, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        o,
        r#"<text x="{}" y="24" font-size="15" text-anchor="middle">Checkpoint interval cost per dirty page (first writes + checkpoint)</text>"#,
        LEFT + pw / 2.0
    );
    // Decade grid.
    for d in ylo as i32..=yhi as i32 {
        let v = 10f64.powi(d);
        let yy = y(v);
        let _ = writeln!(
            o,
            r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            LEFT - 6.0,
            yy + 4.0,
            time_label(v)
        );
    }
    for f in [0.001, 0.01, 0.1, 1.0] {
        let xx = x(f);
        let _ = writeln!(
            o,
            r##"<line x1="{xx:.1}" y1="{TOP}" x2="{xx:.1}" y2="{:.1}" stroke="#ddd"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            TOP + ph,
            TOP + ph + 18.0,
            crate::workloads::pct(f)
        );
    }
    let _ = writeln!(
        o,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>"##
    );
    let _ = writeln!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">pages dirty in the interval (fraction of the heap, log scale)</text>"#,
        LEFT + pw / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        o,
        r#"<text transform="translate(18,{:.1}) rotate(-90)" text-anchor="middle">time per dirty page (median; whiskers min-max; log scale)</text>"#,
        TOP + ph / 2.0
    );
    for (i, s) in series.iter().enumerate() {
        let pts: Vec<String> = s
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", x(p.0), y(p.1)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6,4""#
        } else {
            ""
        };
        let _ = writeln!(
            o,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            pts.join(" "),
            s.color
        );
        for p in &s.points {
            let (xx, ym) = (x(p.0), y(p.1));
            let _ = writeln!(
                o,
                r#"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="{}"/><circle cx="{xx:.1}" cy="{ym:.1}" r="3" fill="{}"/>"#,
                y(p.2),
                y(p.3),
                s.color,
                s.color
            );
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 12.0;
        let _ = writeln!(
            o,
            r#"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 24.0,
            s.color,
            lx + 30.0,
            ly + 4.0,
            s.label
        );
    }
    o.push_str("</svg>\n");
    o
}

fn time_label(ns: f64) -> String {
    if ns >= 1e9 {
        format!("{} s", ns / 1e9)
    } else if ns >= 1e6 {
        format!("{} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{} us", ns / 1e3)
    } else {
        format!("{ns} ns")
    }
}
