//! Issue 13's goals, computed from a parsed results.json: each a measure, the value the
//! run's records give, the target and whether it is met (None: not measured). Also the
//! lookups bench/results_md.rs shares. Pure; tested by tests/bench_report.rs.

use crate::json::Value;
use crate::results_md::{fmt, size_name};

pub const GIB: f64 = 1073741824.0;
/// The order in which `auto` picks a Linux backend: the first one that ran is the
/// default configuration's.
const DEFAULT_ORDER: [&str; 3] = ["memsnap-uffd-async", "memsnap-uffd", "memsnap"];

pub fn median(r: &Value, key: &str) -> Option<f64> {
    r.get("metrics").get(key).get("median").num()
}

pub fn param<'a>(r: &'a Value, key: &str) -> Option<&'a str> {
    r.get("params").get(key).str()
}

pub fn records<'a>(doc: &'a Value, workload: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    doc.get("records")
        .arr()
        .iter()
        .filter(move |r| r.get("workload").str() == Some(workload))
}

pub fn find<'a>(
    doc: &'a Value,
    workload: &'a str,
    mechanism: &str,
    pred: impl Fn(&Value) -> bool,
) -> Option<&'a Value> {
    records(doc, workload).find(|r| r.get("mechanism").str() == Some(mechanism) && pred(r))
}

pub fn ran(r: &Value) -> bool {
    r.get("unavailable").is_null() && r.get("repetitions").num().unwrap_or(0.0) > 0.0
}

/// The default configuration's backend: the first in auto's order that ran.
fn default_mechanism(doc: &Value) -> Option<String> {
    DEFAULT_ORDER
        .iter()
        .find(|m| {
            doc.get("records")
                .arr()
                .iter()
                .any(|r| r.get("mechanism").str() == Some(m) && ran(r))
        })
        .map(|m| m.to_string())
}

fn largest_heap(doc: &Value, workload: &str) -> Option<f64> {
    records(doc, workload)
        .filter_map(|r| r.get("heap_bytes").num())
        .reduce(f64::max)
}

/// One goal line: what, the measured value and how it compares with the target.
pub struct Goal {
    pub what: String,
    pub measured: String,
    pub target: String,
    pub met: Option<bool>,
}

fn goal_max(what: String, value: Option<f64>, target: f64, shown: impl Fn(f64) -> String) -> Goal {
    Goal {
        what,
        measured: value.map_or("not measured".into(), &shown),
        target: format!("≤ {}", shown(target)),
        met: value.map(|v| v <= target),
    }
}

pub fn ratio_text(v: f64) -> String {
    format!("{v:.2}x")
}

pub fn status(met: Option<bool>) -> &'static str {
    match met {
        Some(true) => "**met**",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

pub fn goals(doc: &Value) -> Vec<(u32, Goal)> {
    let mut out = vec![];
    let def = default_mechanism(doc).unwrap_or_else(|| "memsnap-uffd-async".into());
    // Goal 1: the default backend's checkpoint at the largest heap.
    let heap = largest_heap(doc, "checkpoint").unwrap_or(GIB);
    let at = |r: &Value, dirty: &str| {
        r.get("heap_bytes").num() == Some(heap) && param(r, "dirty") == Some(dirty)
    };
    let ckpt = |mech: &str, dirty: &str, key: &str| {
        find(doc, "checkpoint", mech, |r| at(r, dirty)).and_then(|r| median(r, key))
    };
    let hs = size_name(heap);
    let v = ckpt(&def, "1%", "checkpoint_ns")
        .zip(ckpt("fork-cow", "1%", "checkpoint_ns"))
        .map(|(a, b)| a / b);
    out.push((
        1,
        goal_max(
            format!("[{def}] checkpoint / fork(), {hs}, 1% dirty"),
            v,
            0.1,
            ratio_text,
        ),
    ));
    let v = ckpt(&def, "100%", "checkpoint_ns")
        .zip(ckpt("full-memcpy", "100%", "checkpoint_ns"))
        .map(|(a, b)| a / b);
    out.push((
        1,
        goal_max(
            format!("[{def}] checkpoint / memcpy of the dirty bytes, {hs}, 100% dirty"),
            v,
            1.5,
            ratio_text,
        ),
    ));
    // Zero dirty pages: a dedicated 0% record if the run has one, else the fixed cost
    // (checkpoints with nothing written since the previous one) at that heap.
    let zero = ckpt(&def, "0%", "checkpoint_ns").or_else(|| {
        records(doc, "checkpoint")
            .filter(|r| r.get("mechanism").str() == Some(def.as_str()))
            .filter(|r| r.get("heap_bytes").num() == Some(heap))
            .filter_map(|r| median(r, "fixed_ns"))
            .reduce(f64::min)
    });
    out.push((
        1,
        goal_max(
            format!("[{def}] checkpoint with 0 dirty pages, {hs}"),
            zero,
            1e5,
            |v| fmt("ns", v),
        ),
    ));
    // Goal 2: the run's own "best backend" cycle ratios.
    for q in doc.get("ratios").arr() {
        let name = q.get("name").str().unwrap_or("");
        if name.starts_with("best backend") {
            out.push((
                2,
                goal_max(name.to_string(), q.get("value").num(), 1.0, ratio_text),
            ));
        }
    }
    if !out.iter().any(|(g, _)| *g == 2) {
        out.push((
            2,
            goal_max(
                "best backend's cycle per dirty page / fork COW first write".into(),
                None,
                1.0,
                ratio_text,
            ),
        ));
    }
    // Goal 3: memsnap's own memory beyond the saved pre-images, per tracked byte.
    let oh = largest_heap(doc, "overhead").unwrap_or(GIB);
    let own = find(doc, "overhead", &def, |r| {
        r.get("heap_bytes").num() == Some(oh)
    });
    let v = own.and_then(|r| {
        let own = median(r, "own_bytes_beyond_preimages").or_else(|| median(r, "own_bytes"))?;
        Some(own / median(r, "tracked_bytes")?)
    });
    out.push((
        3,
        goal_max(
            format!("[{def}] own memory / tracked bytes, {}", size_name(oh)),
            v,
            0.05,
            |v| format!("{:.1}%", v * 100.0),
        ),
    ));
    // Goal 4: bytes kept per dirty page on the sparse-write workloads (any workload
    // named for words, deltas or sparse writes) and on the SQLite cadence.
    let page = doc
        .get("machine")
        .get("os_page_size")
        .str()
        .and_then(|p| p.parse().ok())
        .unwrap_or(4096.0);
    for r in doc.get("records").arr() {
        let w = r.get("workload").str().unwrap_or("");
        if r.get("mechanism").str() != Some(def.as_str())
            || !(w.contains("word") || w.contains("delta") || w.contains("sparse"))
        {
            continue;
        }
        if let Some(v) = median(r, "kept_bytes_per_dirty_page") {
            out.push((
                4,
                goal_max(
                    format!(
                        "[{def}] {w} {}: bytes kept per dirty page",
                        size_name(r.get("heap_bytes").num().unwrap_or(0.0))
                    ),
                    Some(v / page),
                    0.25,
                    |v| format!("{v:.3} page"),
                ),
            ));
        }
    }
    for r in e2e_records(doc).filter(|r| r.get("workload").str() == Some("cadence")) {
        if r.get("mechanism").str() != Some(def.as_str()) {
            continue;
        }
        let v = median(r, "held_bytes_per_dirty_page").filter(|_| e2e_verified(r));
        out.push((
            4,
            goal_max(
                format!("[{def}] SQLite cadence: bytes held per dirty page"),
                v.map(|v| v / page),
                0.25,
                |v| format!("{v:.3} page"),
            ),
        ));
    }
    if !out.iter().any(|(g, _)| *g == 4) {
        out.push((
            4,
            goal_max(
                "bytes kept per dirty page (sparse writes)".into(),
                None,
                0.25,
                |v| format!("{v:.3} page"),
            ),
        ));
    }
    // Goal 5: the end-to-end ratios with targets.
    let mut any5 = false;
    for q in doc.get("end_to_end").get("ratios").arr() {
        let Some(t) = q.get("target_min").num() else {
            continue;
        };
        any5 = true;
        let v = q.get("value").num();
        let note = q.get("note").str().unwrap_or("");
        out.push((
            5,
            Goal {
                what: q.get("name").str().unwrap_or("").to_string(),
                measured: v.map_or(
                    if note.is_empty() {
                        "not measured".into()
                    } else {
                        note.to_string()
                    },
                    ratio_text,
                ),
                target: format!("≥ {}", ratio_text(t)),
                met: v.map(|v| v >= t),
            },
        ));
    }
    if !any5 {
        out.push((
            5,
            Goal {
                what: "reset loop iterations/s / fork server".into(),
                measured: "not measured".into(),
                target: "≥ 3x (50 MB), ≥ 20x (1 GiB)".into(),
                met: None,
            },
        ));
    }
    out
}

pub fn e2e_records(doc: &Value) -> impl Iterator<Item = &Value> {
    doc.get("end_to_end").get("records").arr().iter()
}

pub fn e2e_verified(r: &Value) -> bool {
    r.get("verified").bool() == Some(true)
}
