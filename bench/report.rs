//! Turning samples into results: per-metric median/min/max, the ratios the issue asks for
//! (with their targets), the printed table and results.json.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::child::Sample;
use crate::workloads::{size_name, Order, Workload};

/// All repetitions of one workload under one mechanism.
pub struct Record {
    pub workload: Workload,
    pub mechanism: String,
    /// Why the mechanism could not run here (then there are no samples).
    pub unavailable: Option<String>,
    pub samples: Vec<Sample>,
}

#[derive(Clone, Copy, Debug)]
pub struct Summary {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Record {
    pub fn backend(&self) -> String {
        self.samples
            .iter()
            .find_map(|s| s.text.get("backend").cloned())
            .unwrap_or_else(|| "-".into())
    }

    /// Why the mechanism could not run: known before running, or reported by a child.
    pub fn unavailable(&self) -> Option<String> {
        self.unavailable.clone().or_else(|| {
            self.samples
                .iter()
                .find_map(|s| s.text.get("unavailable").cloned())
        })
    }

    pub fn metric(&self, key: &str) -> Option<Summary> {
        let mut v: Vec<f64> = self
            .samples
            .iter()
            .filter_map(|s| s.nums.get(key).copied())
            .filter(|x| x.is_finite())
            .collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some(Summary {
            median,
            min: v[0],
            max: v[n - 1],
            n,
        })
    }

    pub fn metric_keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .samples
            .iter()
            .flat_map(|s| s.nums.keys().cloned())
            .collect();
        keys.sort();
        keys.dedup();
        keys
    }

    pub fn failures(&self) -> Vec<String> {
        self.samples
            .iter()
            .filter_map(|s| s.failure.clone())
            .collect()
    }
}

/// One ratio of medians, in the same run, with the target.
pub struct Ratio {
    pub name: String,
    pub value: Option<f64>,
    /// The ratio must be at most this to meet the target (`None`: reported only).
    pub target: Option<f64>,
}

fn find<'a>(
    records: &'a [Record],
    mechanism: &str,
    pred: impl Fn(&Workload) -> bool,
) -> Option<&'a Record> {
    records
        .iter()
        .find(|r| r.mechanism == mechanism && pred(&r.workload))
}

fn ratio_of(a: Option<&Record>, ak: &str, b: Option<&Record>, bk: &str) -> Option<f64> {
    Some(a?.metric(ak)?.median / b?.metric(bk)?.median)
}

/// The ratios for every memsnap backend, then the comparisons across backends.
pub fn all_ratios(records: &[Record]) -> Vec<Ratio> {
    let mut labels: Vec<&str> = vec![];
    for r in records {
        if r.mechanism.starts_with("memsnap") && !labels.contains(&r.mechanism.as_str()) {
            labels.push(&r.mechanism);
        }
    }
    let mut out = vec![];
    let ran = |label: &str| {
        records
            .iter()
            .any(|r| r.mechanism == label && r.unavailable().is_none())
    };
    for label in labels.iter().filter(|l| ran(l)) {
        for mut q in ratios(records, label) {
            q.name = format!("[{label}] {}", q.name);
            out.push(q);
        }
    }
    out.extend(best_cycle(records, &labels));
    out.extend(wakeups(records));
    out
}

fn fork_cycle(records: &[Record], heap: usize, fraction: f64) -> Option<&Record> {
    find(
        records,
        "fork-cow",
        |w| matches!(*w, Workload::Cycle { heap: h, fraction: f } if h == heap && f == fraction),
    )
}

/// The target: the best backend's whole cycle per dirty page below fork COW's
/// first write per page, with read(2) into tracked memory working under that backend.
fn best_cycle(records: &[Record], labels: &[&str]) -> Vec<Ratio> {
    let mut out = vec![];
    let mut seen: Vec<(usize, u64)> = vec![];
    for r in records {
        let Workload::Cycle { heap, fraction } = r.workload else {
            continue;
        };
        if seen.contains(&(heap, fraction.to_bits())) {
            continue;
        }
        seen.push((heap, fraction.to_bits()));
        let fork = fork_cycle(records, heap, fraction);
        let best = records
            .iter()
            .filter(|q| labels.contains(&q.mechanism.as_str()))
            .filter(|q| matches!(q.workload, Workload::Cycle { heap: h, fraction: f } if h == heap && f == fraction))
            .filter(|q| q.metric("read_into_tracked").is_some_and(|m| m.min == 1.0))
            .filter_map(|q| Some((q, q.metric("cycle_ns_per_dirty_page")?.median)))
            .min_by(|a, b| a.1.partial_cmp(&b.1).unwrap());
        out.push(Ratio {
            name: format!(
                "best backend with read(2) working ({}): cycle / fork COW first write {}",
                best.map_or("none".to_string(), |b| b.0.mechanism.clone()),
                dirty_at(heap, fraction)
            ),
            value: ratio_of(
                best.map(|b| b.0),
                "cycle_ns_per_dirty_page",
                fork,
                "write_ns_per_page",
            ),
            target: Some(1.0),
        });
    }
    out
}

/// `(1GiB, 10% dirty)`: where a ratio was taken.
fn dirty_at(heap: usize, fraction: f64) -> String {
    format!(
        "({}, {} dirty)",
        size_name(heap),
        crate::workloads::pct(fraction)
    )
}

/// The sync backend's cross-CPU wake-up: unpinned over pinned, per spin setting.
fn wakeups(records: &[Record]) -> Vec<Ratio> {
    let mut out = vec![];
    for r in records {
        let Workload::Wakeup { pinned: false, .. } = r.workload else {
            continue;
        };
        let pinned = find(records, &r.mechanism, |w| {
            matches!(w, Workload::Wakeup { pinned: true, .. })
        });
        out.push(Ratio {
            name: format!(
                "[{}] sync uffd first write, unpinned / pinned to one CPU",
                r.mechanism
            ),
            value: ratio_of(Some(r), "ns_per_page", pinned, "ns_per_page"),
            target: None,
        });
    }
    out
}

pub fn ratios(records: &[Record], memsnap: &str) -> Vec<Ratio> {
    let mut out = vec![];
    for r in records.iter().filter(|r| r.mechanism == memsnap) {
        match r.workload {
            Workload::FirstWrite {
                heap,
                order,
                threads,
                ..
            } => {
                let fork = find(records, "fork-cow", |w| {
                    matches!(*w, Workload::FirstWrite { heap: h, order: o, threads: t, .. }
                        if h == heap && o == order && t == threads)
                });
                let at = format!(
                    "({}, {order}, {threads} thread{})",
                    size_name(heap),
                    if threads > 1 { "s" } else { "" }
                );
                out.push(Ratio {
                    name: format!("first write / fork COW first write {at}"),
                    value: ratio_of(Some(r), "ns_per_page", fork, "ns_per_page"),
                    target: Some(match order {
                        Order::Sequential => 2.2,
                        Order::Random => 1.0,
                    }),
                });
                out.push(Ratio {
                    name: format!("  the same in process CPU time {at}"),
                    value: ratio_of(Some(r), "cpu_ns_per_page", fork, "cpu_ns_per_page"),
                    target: None,
                });
            }
            Workload::Checkpoint { heap, fraction } => {
                let fork = find(records, "fork-cow", |w| {
                    matches!(*w, Workload::Checkpoint { heap: h, fraction: f }
                        if h == heap && f == fraction)
                });
                out.push(Ratio {
                    name: format!("checkpoint / fork() {}", dirty_at(heap, fraction)),
                    value: ratio_of(Some(r), "checkpoint_ns", fork, "checkpoint_ns"),
                    target: (heap >= crate::workloads::GIB && fraction == 0.01).then_some(0.1),
                });
            }
            Workload::Restore {
                heap,
                fraction,
                levels,
            } => {
                let base = find(records, "memcpy+mprotect", |w| {
                    matches!(*w, Workload::Restore { heap: h, fraction: f, .. }
                        if h == heap && f == fraction)
                });
                out.push(Ratio {
                    name: format!(
                        "restore per page / (memcpy + re-protect) per page ({}, {} dirty, {} level{} back)",
                        size_name(heap),
                        crate::workloads::pct(fraction),
                        levels,
                        if levels == 1 { "" } else { "s" }
                    ),
                    value: ratio_of(Some(r), "restore_ns_per_page", base, "restore_ns_per_page"),
                    target: Some(2.0),
                });
            }
            Workload::Cycle { heap, fraction } => {
                let fork = fork_cycle(records, heap, fraction);
                let at = dirty_at(heap, fraction);
                out.push(Ratio {
                    name: format!("cycle per dirty page / fork COW first write {at}"),
                    value: ratio_of(
                        Some(r),
                        "cycle_ns_per_dirty_page",
                        fork,
                        "write_ns_per_page",
                    ),
                    target: None,
                });
                out.push(Ratio {
                    name: format!("  cycle / fork COW cycle, fork + first writes + exit {at}"),
                    value: ratio_of(
                        Some(r),
                        "cycle_ns_per_dirty_page",
                        fork,
                        "cycle_ns_per_dirty_page",
                    ),
                    target: None,
                });
            }
            _ => {}
        }
    }
    out
}

/// Human units: `_ns` metrics as time, `bytes` metrics as sizes, the rest plain.
pub fn fmt_value(key: &str, v: f64) -> String {
    if key.contains("ns") {
        if v >= 1e9 {
            format!("{:.2} s", v / 1e9)
        } else if v >= 1e6 {
            format!("{:.2} ms", v / 1e6)
        } else if v >= 1e3 {
            format!("{:.2} us", v / 1e3)
        } else {
            format!("{v:.0} ns")
        }
    } else if key.contains("bytes") {
        if v.abs() >= (1 << 20) as f64 {
            format!("{:.2} MiB", v / (1 << 20) as f64)
        } else if v.abs() >= 10240.0 {
            format!("{:.1} KiB", v / 1024.0)
        } else {
            format!("{v:.0} B")
        }
    } else if v.fract() == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

fn params_text(w: &Workload) -> String {
    w.params()
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn table(records: &[Record], ratios: &[Ratio]) -> String {
    let mut rows: Vec<[String; 9]> = vec![[
        "workload",
        "heap",
        "params",
        "mechanism",
        "backend",
        "metric",
        "median",
        "min",
        "max",
    ]
    .map(String::from)];
    for r in records {
        for &key in r.workload.shown() {
            let Some(s) = r.metric(key) else { continue };
            rows.push([
                r.workload.name().into(),
                size_name(r.workload.heap()),
                params_text(&r.workload),
                r.mechanism.clone(),
                r.backend(),
                key.into(),
                fmt_value(key, s.median),
                fmt_value(key, s.min),
                fmt_value(key, s.max),
            ]);
        }
        if r.unavailable().is_some() {
            rows.push([
                r.workload.name().into(),
                size_name(r.workload.heap()),
                params_text(&r.workload),
                r.mechanism.clone(),
                "-".into(),
                "unavailable (below)".into(),
                String::new(),
                String::new(),
                String::new(),
            ]);
        }
        let failed = r.failures().len();
        if failed > 0 {
            rows.push([
                r.workload.name().into(),
                size_name(r.workload.heap()),
                params_text(&r.workload),
                r.mechanism.clone(),
                r.backend(),
                "children died".into(),
                format!("{failed} of {}", r.samples.len()),
                String::new(),
                String::new(),
            ]);
        }
    }
    let mut widths = [0usize; 9];
    for row in &rows {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut out = String::new();
    for (i, row) in rows.iter().enumerate() {
        for (j, (c, w)) in row.iter().zip(widths).enumerate() {
            if j >= 6 {
                let _ = write!(out, "{c:>w$}  ");
            } else {
                let _ = write!(out, "{c:<w$}  ");
            }
        }
        out.push('\n');
        if i == 0 {
            out.push_str(&"-".repeat(widths.iter().sum::<usize>() + 18));
            out.push('\n');
        }
    }
    let mut told: Vec<&str> = vec![];
    for r in records {
        if let (Some(why), false) = (r.unavailable(), told.contains(&r.mechanism.as_str())) {
            told.push(&r.mechanism);
            let _ = writeln!(out, "\n{} is unavailable here: {why}", r.mechanism);
        }
    }
    for r in records {
        if let Some(f) = r.failures().first() {
            let _ = writeln!(
                out,
                "\n{} {} {} under {}: {f}",
                r.workload.name(),
                size_name(r.workload.heap()),
                params_text(&r.workload),
                r.mechanism
            );
        }
    }
    out.push_str("\nRatios of medians (same run; targets are for the record, never asserted):\n");
    for q in ratios {
        let v = q.value.map_or("n/a".into(), |v| format!("{v:.2}"));
        let t = match (q.target, q.value) {
            (Some(t), Some(v)) => format!(
                "target <= {t}: {}",
                if v <= t {
                    "met".to_string()
                } else {
                    format!("missed by {:.2}x", v / t)
                }
            ),
            (Some(t), None) => format!("target <= {t}: not measured"),
            (None, _) => String::new(),
        };
        let _ = writeln!(out, "  {:<95} {:>7}  {t}", q.name, v);
    }
    out
}

// --- results.json, written by hand (the crate takes no serialization dependency) --------

fn js(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn jn(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

pub fn json(records: &[Record], ratios: &[Ratio], machine: &BTreeMap<String, String>) -> String {
    let mut o = String::from("{\n  \"machine\": {");
    let m: Vec<String> = machine
        .iter()
        .map(|(k, v)| format!("\n    {}: {}", js(k), js(v)))
        .collect();
    o.push_str(&m.join(","));
    o.push_str("\n  },\n  \"records\": [");
    let recs: Vec<String> = records
        .iter()
        .map(|r| {
            let mut s = format!(
                "\n    {{\"workload\": {}, \"heap_bytes\": {}, \"mechanism\": {}, \"backend\": {}, \"repetitions\": {},\n     \"params\": {{",
                js(r.workload.name()),
                r.workload.heap(),
                js(&r.mechanism),
                js(&r.backend()),
                r.samples.len()
            );
            let p: Vec<String> = r
                .workload
                .params()
                .iter()
                .map(|(k, v)| format!("{}: {}", js(k), js(v)))
                .collect();
            s.push_str(&p.join(", "));
            s.push_str("},\n     \"metrics\": {");
            let ms: Vec<String> = r
                .metric_keys()
                .iter()
                .filter_map(|k| {
                    let m = r.metric(k)?;
                    Some(format!(
                        "\n       {}: {{\"median\": {}, \"min\": {}, \"max\": {}, \"n\": {}}}",
                        js(k),
                        jn(m.median),
                        jn(m.min),
                        jn(m.max),
                        m.n
                    ))
                })
                .collect();
            s.push_str(&ms.join(","));
            s.push_str("},\n     \"unavailable\": ");
            s.push_str(&r.unavailable().map_or("null".into(), |w| js(&w)));
            s.push_str(",\n     \"failures\": [");
            let fs: Vec<String> = r.failures().iter().map(|f| js(f)).collect();
            s.push_str(&fs.join(", "));
            s.push(']');
            if let Some(curve) = r.samples.iter().find_map(|s| s.text.get("curve")) {
                let _ = write!(s, ",\n     \"map_curve\": {curve}");
            }
            s.push('}');
            s
        })
        .collect();
    o.push_str(&recs.join(","));
    o.push_str("\n  ],\n  \"ratios\": [");
    let rs: Vec<String> = ratios
        .iter()
        .map(|q| {
            format!(
                "\n    {{\"name\": {}, \"value\": {}, \"target_max\": {}, \"met\": {}}}",
                js(&q.name),
                q.value.map_or("null".into(), jn),
                q.target.map_or("null".into(), jn),
                match (q.value, q.target) {
                    (Some(v), Some(t)) => (v <= t).to_string(),
                    _ => "null".into(),
                }
            )
        })
        .collect();
    o.push_str(&rs.join(","));
    o.push_str("\n  ]\n}\n");
    o
}
