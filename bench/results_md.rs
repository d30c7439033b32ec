//! bench/RESULTS.md, generated from bench/results.json (never edited by hand): the
//! machine and run, issue 13's goals (computed by bench/goals.rs) each marked met or
//! missed with the numbers behind the mark, every ratio the run computed, the end-to-end
//! workloads, the cycle's breakdown next to its floors, and a table per workload.
//!
//! Tolerant by design: whatever records and metrics results.json holds are shown; a goal
//! whose measurement is absent says "not measured" instead of failing. Pure (text in,
//! text out) except [`write`]; tested by tests/bench_report.rs.

use std::fmt::Write as _;

use crate::goals::{
    e2e_records, e2e_verified, find, goals, median, param, ran, ratio_text, records, status, GIB,
};
use crate::json::{self, Value};

/// Reads `dir/results.json` and writes `dir/RESULTS.md`.
pub fn write(dir: &str) -> Result<(), String> {
    let path = format!("{dir}/results.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let doc = json::parse(&text).map_err(|e| format!("{path}: {e}"))?;
    let out = format!("{dir}/RESULTS.md");
    std::fs::write(&out, render(&doc)).map_err(|e| format!("{out}: {e}"))
}

/// Human units by the metric's name: `_ns` as time, `bytes` as sizes, the rest plain.
pub fn fmt(key: &str, v: f64) -> String {
    if !v.is_finite() {
        "n/a".into()
    } else if key.ends_with("_ns") || key.contains("_ns_") || key == "ns" {
        if v >= 1e9 {
            format!("{:.2} s", v / 1e9)
        } else if v >= 1e6 {
            format!("{:.2} ms", v / 1e6)
        } else if v >= 1e3 {
            format!("{:.2} µs", v / 1e3)
        } else {
            format!("{v:.0} ns")
        }
    } else if key.contains("bytes") {
        if v.abs() >= GIB {
            format!("{:.2} GiB", v / GIB)
        } else if v.abs() >= 1048576.0 {
            format!("{:.2} MiB", v / 1048576.0)
        } else if v.abs() >= 10240.0 {
            format!("{:.1} KiB", v / 1024.0)
        } else {
            format!("{v:.0} B")
        }
    } else if key.ends_with("per_s") && v.abs() < 100.0 {
        format!("{v:.1}")
    } else if v.fract() == 0.0 || v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

pub fn size_name(bytes: f64) -> String {
    if bytes >= GIB {
        format!("{} GiB", (bytes / GIB * 100.0).round() / 100.0)
    } else {
        format!("{} MiB", (bytes / 1048576.0).round())
    }
}

/// `YYYY-MM-DD HH:MM UTC` from seconds since the epoch (the civil-from-days algorithm).
pub fn utc(secs: i64) -> String {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let z = days + 719468;
    let era = z.div_euclid(146097);
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

/// A markdown table from a header and rows.
fn table(out: &mut String, head: &[String], rows: &[Vec<String>]) {
    let _ = writeln!(out, "| {} |", head.join(" | "));
    let _ = writeln!(out, "|{}", "---|".repeat(head.len()));
    for r in rows {
        let _ = writeln!(out, "| {} |", r.join(" | "));
    }
    out.push('\n');
}

fn params_text(r: &Value) -> String {
    r.get("params")
        .members()
        .iter()
        .map(|(k, v)| format!("{k}={}", v.str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The metrics shown per workload in the tables; workloads not listed show all of
/// theirs except the per-child bookkeeping below.
fn shown(workload: &str) -> Option<&'static [&'static str]> {
    Some(match workload {
        "first_write" => &["ns_per_page", "cpu_ns_per_page"],
        "checkpoint" => &[
            "checkpoint_ns",
            "fixed_ns",
            "write_ns_per_page",
            "kept_bytes_per_dirty_page",
        ],
        "restore" => &["restore_ns_per_page"],
        "overhead" => &["own_bytes", "own_bytes_less_base_copy", "tracked_bytes"],
        "map_count" => &["max_maps", "pages_written"],
        "page_copy" => &["ns_per_page_random", "ns_per_page_hot"],
        "uffd_wakeup" => &["ns_per_page", "wakeups_per_fault", "spin_hits_per_fault"],
        "reset_loop" => &[
            "iterations_per_s",
            "iteration_ns_p50",
            "batch_ns_p50",
            "rewind_ns_p50",
            "rewind_ns_p99",
            "faults_per_iteration",
            "db_bytes",
            "prepare_s",
        ],
        "cadence" => &[
            "checkpoint_ns_p50",
            "checkpoint_ns_p99",
            "dirty_pages_per_checkpoint_p50",
            "held_bytes_per_checkpoint",
            "held_bytes_per_dirty_page",
            "rss_bytes_per_checkpoint",
            "first_rewind_ns",
            "rewind_ns_per_level_p50",
            "rewind_ns_per_level_p99",
            "rewinds_verified",
        ],
        _ => return None,
    })
}

const BOOKKEEPING: [&str; 8] = [
    "page_size",
    "restore_threads",
    "uffd_tracked_bytes",
    "base_copy_bytes",
    "pinned_cpu",
    "cycles",
    "read_errno",
    "read_faults",
];

fn metric_columns(recs: &[&Value], workload: &str) -> Vec<String> {
    let mut keys: Vec<String> = vec![];
    for r in recs {
        for (k, _) in r.get("metrics").members() {
            if !keys.contains(k) {
                keys.push(k.clone());
            }
        }
    }
    match shown(workload) {
        Some(list) => list
            .iter()
            .filter(|k| keys.iter().any(|x| x == *k))
            .map(|k| k.to_string())
            .collect(),
        None => keys
            .into_iter()
            .filter(|k| !BOOKKEEPING.contains(&k.as_str()))
            .collect(),
    }
}

fn workload_tables(out: &mut String, recs: &[Value], e2e: bool) {
    let mut names: Vec<&str> = vec![];
    for r in recs {
        let n = r.get("workload").str().unwrap_or("?");
        if !names.contains(&n) {
            names.push(n);
        }
    }
    for name in names {
        let group: Vec<&Value> = recs
            .iter()
            .filter(|r| r.get("workload").str() == Some(name))
            .collect();
        let cols = metric_columns(&group, name);
        let _ = writeln!(out, "### {name}\n");
        let mut head: Vec<String> = [
            if e2e { "database" } else { "heap" },
            "params",
            "mechanism",
            "backend",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        head.extend(cols.iter().map(|c| format!("`{c}`")));
        if e2e {
            head.push("verified".into());
        }
        let mut rows = vec![];
        for r in &group {
            let size = r
                .get(if e2e { "db_target_bytes" } else { "heap_bytes" })
                .num()
                .unwrap_or(0.0);
            let mut row = vec![
                size_name(size),
                params_text(r),
                r.get("mechanism").str().unwrap_or("").to_string(),
                r.get("backend").str().unwrap_or("").to_string(),
            ];
            if let Some(why) = r.get("unavailable").str() {
                row.push(format!("unavailable: {why}"));
                row.extend((1..cols.len()).map(|_| String::new()));
            } else {
                row.extend(
                    cols.iter()
                        .map(|c| median(r, c).map_or(String::new(), |v| fmt(c, v))),
                );
            }
            if e2e {
                row.push(if e2e_verified(r) {
                    "yes".into()
                } else {
                    "**no**".into()
                });
            }
            let failures = r.get("failures").arr().len() + r.get("problems").arr().len();
            if failures > 0 && !e2e {
                row[3].push_str(&format!(" ({failures} failed)"));
            }
            rows.push(row);
        }
        table(out, &head, &rows);
        for r in &group {
            for p in r
                .get("problems")
                .arr()
                .iter()
                .chain(r.get("failures").arr())
            {
                let _ = writeln!(
                    out,
                    "- {} {}: {}",
                    r.get("mechanism").str().unwrap_or(""),
                    size_name(
                        r.get("heap_bytes")
                            .num()
                            .or(r.get("db_target_bytes").num())
                            .unwrap_or(0.0)
                    ),
                    p.str().unwrap_or("")
                );
            }
        }
    }
}

/// The cycle's breakdown per dirty page next to its floors: the async first write (the
/// uffd-async random first write at that heap), and one page memcpy (page_copy, random
/// pages) for the checkpoint and for the restore. Floor metrics the cycle records carry
/// themselves (`floor_*`) are shown as well.
fn cycle_breakdown(out: &mut String, doc: &Value) {
    let recs: Vec<&Value> = records(doc, "cycle").filter(|r| ran(r)).collect();
    if recs.is_empty() {
        return;
    }
    let memcpy = records(doc, "page_copy").find_map(|r| median(r, "ns_per_page_random"));
    let mut floors: Vec<String> = vec![];
    for r in &recs {
        for (k, _) in r.get("metrics").members() {
            if k.starts_with("floor_") && !floors.contains(k) {
                floors.push(k.clone());
            }
        }
    }
    let _ = writeln!(
        out,
        "### cycle breakdown (per dirty page)\n\nFloors: the write's is an asynchronous \
         first write (uffd-async, random order, 1 thread, same heap); the checkpoint's and \
         the restore's are one page memcpy (page_copy, random pages).\n"
    );
    let mut head: Vec<String> = [
        "heap",
        "dirty",
        "mechanism",
        "cycle",
        "write",
        "floor",
        "checkpoint",
        "floor",
        "restore",
        "floor",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    head.extend(floors.iter().map(|f| format!("`{f}`")));
    let mut rows = vec![];
    for r in recs {
        let heap = r.get("heap_bytes").num();
        let fault = find(doc, "first_write", "memsnap-uffd-async", |q| {
            q.get("heap_bytes").num() == heap
                && param(q, "order") == Some("random")
                && param(q, "threads") == Some("1")
        })
        .and_then(|q| median(q, "ns_per_page"));
        let t = |v: Option<f64>| v.map_or(String::new(), |v| fmt("ns", v));
        let mut row = vec![
            size_name(heap.unwrap_or(0.0)),
            param(r, "dirty").unwrap_or("").to_string(),
            r.get("mechanism").str().unwrap_or("").to_string(),
            t(median(r, "cycle_ns_per_dirty_page")),
            t(median(r, "write_ns_per_page")),
            t(fault),
            t(median(r, "checkpoint_ns_per_page")),
            t(memcpy),
            t(median(r, "restore_ns_per_page")),
            t(memcpy),
        ];
        row.extend(floors.iter().map(|f| t(median(r, f))));
        rows.push(row);
    }
    table(out, &head, &rows);
}

pub fn render(doc: &Value) -> String {
    let mut out = String::from(
        "# Benchmark results\n\nGenerated from `bench/results.json` by `make bench` \
         (`make bench-report` regenerates it alone); do not edit by hand. How the numbers \
         are measured: [docs/performance.md](../docs/performance.md).\n\n",
    );
    // The run.
    let m = doc.get("machine");
    let s = |k: &str| m.get(k).str().unwrap_or("?").to_string();
    let date = m
        .get("unix_time")
        .str()
        .and_then(|t| t.parse::<i64>().ok())
        .map_or("?".into(), utc);
    let e2e_s = doc
        .get("end_to_end")
        .get("run_seconds")
        .num()
        .map_or(String::new(), |v| {
            format!(" (end-to-end workloads {v:.0} s)")
        });
    let _ = writeln!(out, "## Run\n");
    table(
        &mut out,
        &["".into(), "".into()],
        &[
            vec!["date".into(), date],
            vec!["commit".into(), format!("`{}`", s("git_commit"))],
            vec![
                "CPU".into(),
                format!("{} ({} online)", s("cpu"), s("cpus_online")),
            ],
            vec!["kernel".into(), s("kernel")],
            vec!["page size".into(), s("os_page_size")],
            vec![
                "memory".into(),
                s("mem_total").replace("MemTotal:", "").trim().to_string(),
            ],
            vec!["transparent huge pages".into(), s("transparent_hugepage")],
            vec!["vm.max_map_count".into(), s("vm_max_map_count")],
            vec!["run time".into(), format!("{} s{e2e_s}", s("run_seconds"))],
            vec![
                "load average (start / end)".into(),
                format!("{} / {}", s("loadavg_start"), s("loadavg_end")),
            ],
        ],
    );
    // The goals.
    let _ = writeln!(
        out,
        "## Issue 13's goals\n\nRatios of medians within this run; the default backend is \
         the first of uffd-async, uffd and mprotect that ran (auto's choice).\n"
    );
    let rows: Vec<Vec<String>> = goals(doc)
        .into_iter()
        .map(|(n, g)| {
            vec![
                n.to_string(),
                g.what,
                g.measured,
                g.target,
                status(g.met).to_string(),
            ]
        })
        .collect();
    table(
        &mut out,
        &["goal", "measure", "measured", "target", "status"].map(String::from),
        &rows,
    );
    // End-to-end.
    let e2e: Vec<Value> = e2e_records(doc).cloned().collect();
    if !e2e.is_empty() {
        let verified = doc.get("end_to_end").get("verified").bool() == Some(true);
        let _ = writeln!(
            out,
            "## End-to-end workloads (SQLite)\n\nEvery rewind {}.\n",
            if verified {
                "was verified against its checkpoint (see docs/performance.md)"
            } else {
                "**was not verified**: ratios from unverified records are withheld"
            }
        );
        workload_tables(&mut out, &e2e, true);
        let rows: Vec<Vec<String>> = doc
            .get("end_to_end")
            .get("ratios")
            .arr()
            .iter()
            .map(|q| {
                let v = q.get("value").num();
                vec![
                    q.get("name").str().unwrap_or("").to_string(),
                    v.map_or(q.get("note").str().unwrap_or("n/a").to_string(), ratio_text),
                    q.get("target_min")
                        .num()
                        .map_or(String::new(), |t| format!("≥ {}", ratio_text(t))),
                    match (v, q.get("met").bool()) {
                        (Some(_), Some(m)) => status(Some(m)).to_string(),
                        _ => String::new(),
                    },
                ]
            })
            .collect();
        table(
            &mut out,
            &["ratio", "value", "target", "status"].map(String::from),
            &rows,
        );
    }
    // Micro-benchmarks.
    let _ = writeln!(out, "## Mechanism workloads\n");
    cycle_breakdown(&mut out, doc);
    workload_tables(&mut out, doc.get("records").arr(), false);
    let rows: Vec<Vec<String>> = doc
        .get("ratios")
        .arr()
        .iter()
        .map(|q| {
            let v = q.get("value").num();
            let t = q.get("target_max").num();
            vec![
                q.get("name").str().unwrap_or("").trim().to_string(),
                v.map_or("n/a".into(), ratio_text),
                t.map_or(String::new(), |t| format!("≤ {}", ratio_text(t))),
                match (v, t) {
                    (Some(v), Some(t)) => status(Some(v <= t)).to_string(),
                    _ => String::new(),
                },
            ]
        })
        .collect();
    if !rows.is_empty() {
        let _ = writeln!(out, "### All ratios\n");
        table(
            &mut out,
            &["ratio", "value", "target", "status"].map(String::from),
            &rows,
        );
    }
    out
}
