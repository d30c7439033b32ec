//! The end-to-end workloads of `make bench` (issue 13, goal 5): what a user would run
//! with memsnap, against what they would use instead. Their plan, the runs (one forked
//! child per measurement, as for the other workloads), the cross-checks that make a run
//! verified and the ratios. The children's side is bench/e2e_run.rs; the printed table
//! and the "end_to_end" section of results.json, bench/e2e_report.rs.
//!
//! - `reset_loop` (snapshot fuzzing): a prepared SQLite in-memory database, checkpointed;
//!   each iteration runs a generated batch of SQL and rewinds. Against a fork server and
//!   against no reset at all.
//! - `cadence` (record/replay): the same database under a steady write load, checkpointed
//!   every 10 ms, then rewound to every fifth checkpoint.
//!
//! A run is verified when every child exited cleanly after checking each of its rewinds
//! (e2e_run.rs), and every mechanism's batches produced the same digests: each iteration
//! starts from the checkpoint, so a memsnap rewind that got a byte wrong would show as a
//! digest that differs from the fork server's. Ratios come only from verified records;
//! an unverified run makes the bench exit non-zero.

use std::time::Instant;

use crate::child::{self, Sample};
use crate::e2e_run::{self, Backend, Cadence};
use crate::workloads::{size_name, GIB, MIB};

/// One end-to-end measurement.
#[derive(Clone, Debug)]
pub enum E2e {
    Reset {
        db: usize,
        stmts: usize,
        iters: usize,
    },
    Cadence {
        db: usize,
        checkpoints: usize,
        interval_ms: f64,
        stmts: usize,
        every: usize,
    },
}

impl E2e {
    pub fn name(&self) -> &'static str {
        match self {
            E2e::Reset { .. } => "reset_loop",
            E2e::Cadence { .. } => "cadence",
        }
    }
    pub fn db(&self) -> usize {
        match *self {
            E2e::Reset { db, .. } | E2e::Cadence { db, .. } => db,
        }
    }
    pub fn params(&self) -> Vec<(&'static str, String)> {
        match *self {
            E2e::Reset { stmts, iters, .. } => vec![
                ("statements_per_batch", stmts.to_string()),
                ("iterations", iters.to_string()),
            ],
            E2e::Cadence {
                checkpoints,
                interval_ms,
                stmts,
                every,
                ..
            } => vec![
                ("checkpoints", checkpoints.to_string()),
                ("interval_ms", interval_ms.to_string()),
                ("write_statements_per_interval", stmts.to_string()),
                ("rewind_every", every.to_string()),
            ],
        }
    }
    /// The metrics printed in the table (all go to results.json).
    pub fn shown(&self) -> &'static [&'static str] {
        match self {
            E2e::Reset { .. } => &[
                "iterations_per_s",
                "batch_ns_p50",
                "rewind_ns_p50",
                "faults_per_iteration",
                "prepare_s",
            ],
            E2e::Cadence { .. } => &[
                "checkpoint_ns_p50",
                "checkpoint_ns_p99",
                "held_bytes_per_checkpoint",
                "held_bytes_per_dirty_page",
                "rss_bytes_per_checkpoint",
                "first_rewind_ns",
                "rewind_ns_per_level_p50",
                "rewind_ns_per_level_p99",
            ],
        }
    }
    fn reps(&self, quick: bool) -> usize {
        match self {
            E2e::Reset { db, .. } if !quick && *db < GIB / 2 => 3,
            _ => 1,
        }
    }
}

/// The plan from the command line: `--sqlite-mib 50,1024` (reset-loop database sizes;
/// the cadence uses the smallest), `--cadence-seconds 10`, `--reset-iters N` (timed
/// iterations per child; default by size). Linux only: the heap check reads
/// /proc/self/maps and the allocator pinning is glibc's.
pub fn plan(arg: impl Fn(&str) -> Option<String>, quick: bool) -> Vec<E2e> {
    if !cfg!(target_os = "linux") {
        eprintln!("bench: the end-to-end workloads run on Linux only");
        return vec![];
    }
    let sizes: Vec<usize> = match arg("--sqlite-mib") {
        Some(list) => list
            .split(',')
            .map(|m| m.parse::<usize>().expect("--sqlite-mib 50,1024") * MIB)
            .collect(),
        None if quick => vec![16 * MIB],
        None => vec![50 * MIB, GIB],
    };
    let iters = arg("--reset-iters").map(|n| n.parse::<usize>().expect("--reset-iters N"));
    let seconds: f64 = arg("--cadence-seconds")
        .map(|s| s.parse().expect("--cadence-seconds S"))
        .unwrap_or(if quick { 2.0 } else { 10.0 });
    let mut v: Vec<E2e> = sizes
        .iter()
        .map(|&db| E2e::Reset {
            db,
            stmts: 16,
            iters: iters.unwrap_or(match (quick, db >= GIB / 2) {
                (true, _) => 20,
                (false, false) => 200,
                (false, true) => 40,
            }),
        })
        .collect();
    if let Some(&db) = sizes.iter().min() {
        let interval_ms = 10.0;
        v.push(E2e::Cadence {
            db,
            checkpoints: (seconds * 1e3 / interval_ms).round() as usize,
            interval_ms,
            stmts: 16,
            every: 5,
        });
    }
    v
}

#[derive(Clone, Copy)]
enum Mech {
    Memsnap(Backend),
    ForkServer,
    NoReset,
}

impl Mech {
    fn name(&self) -> String {
        match self {
            Mech::Memsnap(b) => b.label.into(),
            Mech::ForkServer => "fork-server".into(),
            Mech::NoReset => "no-reset".into(),
        }
    }
}

fn mechanisms(w: &E2e) -> Vec<Mech> {
    let mut v: Vec<Mech> = e2e_run::BACKENDS
        .iter()
        .map(|&b| Mech::Memsnap(b))
        .collect();
    if let E2e::Reset { .. } = w {
        v.push(Mech::ForkServer);
        v.push(Mech::NoReset);
    }
    v
}

/// All repetitions of one end-to-end workload under one mechanism.
pub struct Record {
    pub workload: E2e,
    pub mechanism: String,
    pub unavailable: Option<String>,
    pub samples: Vec<Sample>,
}

impl Record {
    fn nums(&self, key: &str) -> Vec<f64> {
        self.samples
            .iter()
            .filter_map(|s| s.nums.get(key).copied())
            .filter(|x| x.is_finite())
            .collect()
    }
    /// (median, min, max, n) of a metric over the repetitions.
    pub fn metric(&self, key: &str) -> Option<(f64, f64, f64, usize)> {
        let mut v = self.nums(key);
        if v.is_empty() {
            return None;
        }
        v.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let n = v.len();
        let med = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Some((med, v[0], v[n - 1], n))
    }
    pub fn text(&self, key: &str) -> Vec<String> {
        self.samples
            .iter()
            .filter_map(|s| s.text.get(key).cloned())
            .collect()
    }
    pub fn backend(&self) -> String {
        self.text("backend").first().cloned().unwrap_or("-".into())
    }
    pub fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self
            .samples
            .iter()
            .flat_map(|s| s.nums.keys().cloned())
            .collect();
        k.sort();
        k.dedup();
        k
    }
}

/// Runs the plan; `only_mech` keeps one mechanism (the bench's `--mechanism`).
pub fn run(plan: &[E2e], only_mech: Option<&str>, shared: &mut [u8], quick: bool) -> Vec<Record> {
    let unavailable: Vec<Option<String>> = e2e_run::BACKENDS
        .iter()
        .map(|&b| {
            child::in_child(|r| {
                if let Some(why) = e2e_run::unavailable(b) {
                    r.text("unavailable", &why);
                }
            })
            .text
            .get("unavailable")
            .cloned()
        })
        .collect();
    let why = |m: &Mech| match m {
        Mech::Memsnap(b) => e2e_run::BACKENDS
            .iter()
            .position(|x| x.label == b.label)
            .and_then(|i| unavailable[i].clone()),
        _ => None,
    };
    let mut records = vec![];
    for w in plan {
        let t0 = Instant::now();
        let mechs: Vec<Mech> = mechanisms(w)
            .into_iter()
            .filter(|m| only_mech.is_none_or(|o| m.name() == o))
            .collect();
        let first = records.len();
        for m in &mechs {
            records.push(Record {
                workload: w.clone(),
                mechanism: m.name(),
                unavailable: why(m),
                samples: vec![],
            });
        }
        for _ in 0..w.reps(quick) {
            for (i, m) in (first..).zip(&mechs) {
                if records[i].unavailable.is_some() {
                    continue;
                }
                shared.fill(0);
                let s = child::in_child(|r| match (w, m) {
                    (&E2e::Reset { db, stmts, iters }, Mech::Memsnap(b)) => {
                        e2e_run::reset_memsnap(*b, db, stmts, iters, r)
                    }
                    (&E2e::Reset { db, stmts, iters }, Mech::ForkServer) => {
                        e2e_run::reset_fork(db, stmts, iters, shared, r)
                    }
                    (&E2e::Reset { db, stmts, iters }, Mech::NoReset) => {
                        e2e_run::reset_none(db, stmts, iters, r)
                    }
                    (
                        &E2e::Cadence {
                            db,
                            checkpoints,
                            interval_ms,
                            stmts,
                            every,
                        },
                        Mech::Memsnap(b),
                    ) => e2e_run::cadence(
                        *b,
                        &Cadence {
                            db_target: db,
                            checkpoints,
                            interval_ms,
                            stmts,
                            every,
                        },
                        r,
                    ),
                    _ => unreachable!("cadence runs under memsnap only"),
                });
                records[i].samples.push(s);
            }
        }
        eprintln!(
            "bench: {:<12} {:>7} {:<40} {:6.1}s",
            w.name(),
            size_name(w.db()),
            w.params()
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" "),
            t0.elapsed().as_secs_f64()
        );
    }
    records
}

/// Why each record that ran is not verified (empty: all verified). A record is verified
/// when every sample exited cleanly with `verified 1`; the reset loop's records of one
/// size must also agree on the first batch's digest (all of them) and on the digest of
/// every batch (all but no-reset, whose batches after the first see a changed database).
pub fn problems(records: &[Record]) -> Vec<(usize, String)> {
    let mut out = vec![];
    for (i, r) in records.iter().enumerate() {
        if r.unavailable.is_some() {
            continue;
        }
        for s in &r.samples {
            if let Some(f) = &s.failure {
                out.push((i, format!("child failed: {f}")));
            } else if s.nums.get("verified") != Some(&1.0) {
                out.push((i, "no verification reported".into()));
            }
        }
        if r.samples.is_empty() {
            out.push((i, "no samples".into()));
        }
    }
    for (i, r) in records.iter().enumerate() {
        if !matches!(r.workload, E2e::Reset { .. }) {
            continue;
        }
        let peers: Vec<&Record> = records
            .iter()
            .filter(|q| {
                q.workload.name() == r.workload.name() && q.workload.db() == r.workload.db()
            })
            .collect();
        let all = |key: &str, rs: &[&Record]| -> Vec<String> {
            let mut v: Vec<String> = rs.iter().flat_map(|q| q.text(key)).collect();
            v.sort();
            v.dedup();
            v
        };
        let firsts = all("first_digest", &peers);
        if firsts.len() > 1 {
            out.push((
                i,
                format!("first-batch digests disagree: {}", firsts.join(" ")),
            ));
        }
        if r.mechanism != "no-reset" {
            let resetting: Vec<&Record> = peers
                .iter()
                .copied()
                .filter(|q| q.mechanism != "no-reset")
                .collect();
            let runs = all("run_digest", &resetting);
            if runs.len() > 1 {
                out.push((i, format!("batch digests disagree: {}", runs.join(" "))));
            }
        }
    }
    out
}

/// A ratio of medians with a minimum target; `None` value when either side is missing
/// or unverified.
pub struct Ratio {
    pub name: String,
    pub value: Option<f64>,
    pub target_min: Option<f64>,
    pub note: String,
}

pub fn ratios(records: &[Record], problems: &[(usize, String)]) -> Vec<Ratio> {
    let bad = |i: usize| problems.iter().any(|(j, _)| *j == i);
    let mut out = vec![];
    for (i, r) in records.iter().enumerate() {
        let E2e::Reset { db, .. } = r.workload else {
            continue;
        };
        if !r.mechanism.starts_with("memsnap") || r.unavailable.is_some() {
            continue;
        }
        for (base, target) in [
            ("fork-server", Some(if db >= GIB / 2 { 20.0 } else { 3.0 })),
            ("no-reset", None),
        ] {
            let j = records.iter().position(|q| {
                q.mechanism == base && matches!(q.workload, E2e::Reset { db: d, .. } if d == db)
            });
            let note = match j {
                None => "baseline not run".to_string(),
                Some(j) if bad(i) || bad(j) => "unverified: no ratio".to_string(),
                Some(_) => String::new(),
            };
            let value = match j {
                Some(j) if note.is_empty() => Some(
                    r.metric("iterations_per_s")
                        .map(|m| m.0)
                        .unwrap_or(f64::NAN)
                        / records[j]
                            .metric("iterations_per_s")
                            .map(|m| m.0)
                            .unwrap_or(f64::NAN),
                )
                .filter(|v| v.is_finite()),
                _ => None,
            };
            out.push(Ratio {
                name: format!(
                    "[{}] reset loop iterations/s / {base} ({} database)",
                    r.mechanism,
                    size_name(db)
                ),
                value,
                target_min: target,
                note,
            });
        }
    }
    out
}
