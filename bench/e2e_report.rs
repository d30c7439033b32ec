//! The end-to-end workloads' printed table and their "end_to_end" section of
//! results.json (bench/e2e.rs measures and checks them).

use std::fmt::Write as _;

use crate::e2e::{Ratio, Record};
use crate::json::{number, quote};
use crate::workloads::size_name;

/// Human units by the metric's name: `_ns` as time, `bytes` as sizes, rates plain.
pub fn fmt(key: &str, v: f64) -> String {
    if key.ends_with("_ns") || key.contains("_ns_") {
        crate::report::fmt_value("ns", v)
    } else if key.contains("bytes") {
        crate::report::fmt_value("bytes", v)
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.2}")
    }
}

pub fn table(records: &[Record], ratios: &[Ratio], problems: &[(usize, String)]) -> String {
    let mut out = String::from("\nEnd-to-end workloads (SQLite):\n");
    let _ = writeln!(
        out,
        "{:<11} {:>7} {:<19} {:<17} {:<32} {:>11} {:>11} {:>11}",
        "workload", "db", "mechanism", "backend", "metric", "median", "min", "max"
    );
    for r in records {
        if let Some(why) = &r.unavailable {
            let _ = writeln!(
                out,
                "{:<11} {:>7} {:<19} unavailable: {why}",
                r.workload.name(),
                size_name(r.workload.db()),
                r.mechanism
            );
            continue;
        }
        for key in r.workload.shown() {
            let Some((med, min, max, _)) = r.metric(key) else {
                continue;
            };
            let f = |v| fmt(key, v);
            let _ = writeln!(
                out,
                "{:<11} {:>7} {:<19} {:<17} {:<32} {:>11} {:>11} {:>11}",
                r.workload.name(),
                size_name(r.workload.db()),
                r.mechanism,
                r.backend(),
                key,
                f(med),
                f(min),
                f(max)
            );
        }
    }
    for (i, p) in problems {
        let r = &records[*i];
        let _ = writeln!(
            out,
            "UNVERIFIED: {} {} under {}: {p}",
            r.workload.name(),
            size_name(r.workload.db()),
            r.mechanism
        );
    }
    out.push_str("\nEnd-to-end ratios of medians (same run):\n");
    for q in ratios {
        let v = q.value.map_or("n/a".into(), |v| format!("{v:.2}"));
        let t = match (q.target_min, q.value) {
            (Some(t), Some(v)) => {
                format!("target >= {t}: {}", if v >= t { "met" } else { "missed" })
            }
            (Some(t), None) => format!("target >= {t}: {}", q.note),
            (None, _) => q.note.clone(),
        };
        let _ = writeln!(out, "  {:<80} {:>8}  {t}", q.name, v);
    }
    out
}

/// The "end_to_end" member of results.json.
pub fn json(
    records: &[Record],
    ratios: &[Ratio],
    problems: &[(usize, String)],
    seconds: f64,
) -> String {
    let mut o = format!(
        "{{\n    \"run_seconds\": {},\n    \"verified\": {},\n    \"records\": [",
        number(seconds),
        problems.is_empty()
    );
    let recs: Vec<String> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let params: Vec<String> = r
                .workload
                .params()
                .iter()
                .map(|(k, v)| format!("{}: {}", quote(k), quote(v)))
                .collect();
            let metrics: Vec<String> = r
                .keys()
                .iter()
                .filter_map(|k| {
                    let (med, min, max, n) = r.metric(k)?;
                    Some(format!(
                        "\n         {}: {{\"median\": {}, \"min\": {}, \"max\": {}, \"n\": {n}}}",
                        quote(k),
                        number(med),
                        number(min),
                        number(max)
                    ))
                })
                .collect();
            let probs: Vec<String> = problems
                .iter()
                .filter(|(j, _)| *j == i)
                .map(|(_, p)| quote(p))
                .collect();
            let mut digests = r.text("run_digest");
            digests.dedup();
            format!(
                "\n      {{\"workload\": {}, \"db_target_bytes\": {}, \"mechanism\": {}, \"backend\": {}, \"repetitions\": {},\n       \"params\": {{{}}},\n       \"metrics\": {{{}}},\n       \"unavailable\": {}, \"verified\": {}, \"problems\": [{}], \"run_digests\": [{}]}}",
                quote(r.workload.name()),
                r.workload.db(),
                quote(&r.mechanism),
                quote(&r.backend()),
                r.samples.len(),
                params.join(", "),
                metrics.join(","),
                r.unavailable.as_deref().map_or("null".into(), quote),
                r.unavailable.is_none() && probs.is_empty(),
                probs.join(", "),
                digests.iter().map(|d| quote(d)).collect::<Vec<_>>().join(", ")
            )
        })
        .collect();
    o.push_str(&recs.join(","));
    o.push_str("\n    ],\n    \"ratios\": [");
    let rs: Vec<String> = ratios
        .iter()
        .map(|q| {
            format!(
                "\n      {{\"name\": {}, \"value\": {}, \"target_min\": {}, \"met\": {}, \"note\": {}}}",
                quote(&q.name),
                q.value.map_or("null".into(), number),
                q.target_min.map_or("null".into(), number),
                match (q.value, q.target_min) {
                    (Some(v), Some(t)) => (v >= t).to_string(),
                    _ => "null".into(),
                },
                quote(&q.note)
            )
        })
        .collect();
    o.push_str(&rs.join(","));
    o.push_str("\n    ]\n  }");
    o
}

/// Adds `"end_to_end": section` as the last member of the results.json object `doc`.
pub fn splice(doc: &str, section: &str) -> String {
    let body = doc.trim_end();
    let body = body.strip_suffix('}').expect("results.json is an object");
    format!("{},\n  \"end_to_end\": {section}\n}}\n", body.trim_end())
}
