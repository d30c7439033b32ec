//! Model-based randomized test ("prove nothing is lost"): seeded random sequences of
//! writes (.data, .bss, heap, tracked, untracked and malloc'd blocks, the host's own
//! mappings), allocations and frees, memory the host maps and registers as tracked, kernel
//! writes after `memsnap_prepare_write`, the host's own mmap, munmap and mprotect,
//! checkpoints, rewinds of random depth, erases and new futures after rewinds, in
//! whole-process or (one sequence in four) registered-only mode, each run in a forked
//! child against a model kept in untracked memory (see model/child.rs).
//! This file owns the driver: seeds, children, the summary, and shrinking a failure to its
//! shortest failing prefix and a minimized operation list.
//!
//! Environment: MODEL_SEQUENCES (default 2000), MODEL_SEED (base seed, decimal or 0x..;
//! sequence i uses base + i * 0x9e3779b97f4a7c15, so sequence 0 uses the base itself),
//! MODEL_LEN (operations per sequence, default 80), MODEL_SECONDS (stop launching after
//! this long; alone it means "as many as fit"), MODEL_JOBS (children at once, default 2),
//! MODEL_SHRINK=0 (report a failure without shrinking it), MODEL_HEAP_GROWTH=0 (grow the
//! heap before the first snapshot, so that malloc never moves the program break during
//! the run; by default it does, and rewinds must put the break back).
//!
//! harness = false: libtest's threads would make fork() unsafe (a child could inherit a
//! lock held by another thread).

#[path = "model/child.rs"]
mod child;
#[path = "model/ops.rs"]
mod ops;

use std::time::{Duration, Instant};

use child::{Check, Report};
use ops::{Config, Op};

const DEFAULT_SEED: u64 = 0x6d65_6d73_6e61_7031;
const SEED_STEP: u64 = 0x9e37_79b9_7f4a_7c15;
/// Shrinking runs at most this many children per failure.
const SHRINK_RUNS: usize = 400;

fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    let parsed = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => v.parse(),
    };
    match parsed {
        Ok(x) => Some(x),
        Err(_) => panic!("{name}={v} is not a number"),
    }
}

/// How a child ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Failure {
    /// A model check failed at this operation.
    Check { op: i64, check: Check, msg: String },
    /// Killed by a signal (memsnap's misuse aborts, a crash, the alarm) during `op`.
    Signal { op: i64, sig: i32 },
    /// Any other exit status.
    Exit { op: i64, code: i32 },
}

impl Failure {
    fn op(&self) -> i64 {
        match *self {
            Failure::Check { op, .. } | Failure::Signal { op, .. } | Failure::Exit { op, .. } => op,
        }
    }

    /// Outcomes that count as "the same failure" while shrinking.
    fn same_kind(&self, other: &Failure) -> bool {
        match (self, other) {
            (Failure::Check { check: a, .. }, Failure::Check { check: b, .. }) => a == b,
            (Failure::Signal { sig: a, .. }, Failure::Signal { sig: b, .. }) => a == b,
            (Failure::Exit { code: a, .. }, Failure::Exit { code: b, .. }) => a == b,
            _ => false,
        }
    }

    fn describe(&self) -> String {
        match self {
            Failure::Check { check, msg, .. } => format!("{check:?} check failed: {msg}"),
            Failure::Signal { sig, .. } => format!(
                "killed by signal {sig}{}",
                match *sig {
                    libc::SIGABRT => " (SIGABRT: a memsnap message on stderr says why)",
                    libc::SIGSEGV => " (SIGSEGV)",
                    libc::SIGALRM => " (SIGALRM: hung for 120 s)",
                    _ => "",
                }
            ),
            Failure::Exit { code, .. } => format!("exited with status {code}"),
        }
    }
}

/// Totals over passing sequences.
#[derive(Default)]
struct Totals {
    sequences: u64,
    ops: u64,
    skipped: u64,
    checkpoints: u64,
    rewinds: u64,
    deep_rewinds: u64,
    erases: u64,
    registered_only: u64,
    registrations: u64,
    kernel_writes: u64,
    host_calls: u64,
    floor_raises: u64,
    unmaps_undone: u64,
}

/// Report pages shared with the children, one per concurrent child.
struct Reports {
    base: *mut Report,
    /// Bytes from one report to the next: each starts its own page.
    stride: usize,
}

impl Reports {
    fn new(count: usize) -> Reports {
        let page = (std::mem::size_of::<Report>() + 4095) & !4095;
        // SAFETY: a fresh shared anonymous mapping; MAP_SHARED so children's writes reach
        // the parent (and memsnap never tracks shared mappings).
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page * count,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(p != libc::MAP_FAILED, "mmap of the report pages failed");
        Reports {
            base: p as *mut Report,
            stride: page,
        }
    }

    fn get(&self, i: usize) -> *mut Report {
        (self.base as usize + i * self.stride) as *mut Report
    }
}

/// Forks a child that runs `ops`; `quiet` sends its stderr to /dev/null.
fn spawn(config: Config, ops: &[Op], report: *mut Report, quiet: bool) -> libc::pid_t {
    // SAFETY: the parent owns the report page; no child is using it now.
    unsafe { (*report).reset() };
    // SAFETY: this process is single-threaded (harness = false), so the child inherits no
    // lock held by another thread.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        if quiet {
            // SAFETY: plain open/dup2 on this child's own descriptors.
            unsafe {
                let fd = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
                if fd >= 0 {
                    libc::dup2(fd, 2);
                }
            }
        }
        child::run(config, ops, report);
    }
    pid
}

fn outcome(status: libc::c_int, report: *const Report) -> Result<(), Failure> {
    // SAFETY: the child has exited; the parent alone reads the page now.
    let r = unsafe { &*report };
    if libc::WIFEXITED(status) {
        match libc::WEXITSTATUS(status) {
            0 => Ok(()),
            1 if r.check != 0 => Err(Failure::Check {
                op: r.current,
                check: Check::from_u32(r.check),
                msg: r.message(),
            }),
            code => Err(Failure::Exit {
                op: r.current,
                code,
            }),
        }
    } else if libc::WIFSIGNALED(status) {
        Err(Failure::Signal {
            op: r.current,
            sig: libc::WTERMSIG(status),
        })
    } else {
        Err(Failure::Exit {
            op: r.current,
            code: -1,
        })
    }
}

fn wait(pid: libc::pid_t) -> libc::c_int {
    let mut status = 0;
    // SAFETY: waiting for our own child.
    let got = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(got, pid, "waitpid failed");
    status
}

/// Runs one list to completion in a fresh child.
fn run_once(config: Config, ops: &[Op], report: *mut Report, quiet: bool) -> Result<(), Failure> {
    let pid = spawn(config, ops, report, quiet);
    outcome(wait(pid), report)
}

struct Shrunk {
    prefix: Option<usize>,
    minimized: Vec<Op>,
    last: Option<Failure>,
    runs: usize,
}

/// Finds the shortest prefix that fails (the same way) when followed by a rewind to the
/// first checkpoint, then removes operations while the failure persists.
fn shrink(config: Config, ops: &[Op], first: &Failure, report: *mut Report) -> Shrunk {
    let runs = std::cell::Cell::new(0usize);
    let fails = |list: &[Op]| -> Option<Failure> {
        runs.set(runs.get() + 1);
        match run_once(config, list, report, true) {
            Err(f) if f.same_kind(first) => Some(f),
            _ => None,
        }
    };
    let with_tail = |n: usize| -> Vec<Op> {
        let mut v = ops[..n].to_vec();
        v.push(Op::RewindAll);
        v
    };
    // A prefix through the failing operation fails as it did (the run is deterministic);
    // confirm it, then search for the earliest prefix whose damage a full rewind exposes.
    let upto = ((first.op() + 1).max(0) as usize).min(ops.len());
    let mut hi = upto;
    if fails(&with_tail(hi)).is_none() {
        hi = ops.len();
        if fails(ops).is_none() {
            return Shrunk {
                prefix: None,
                minimized: vec![],
                last: None,
                runs: runs.get(),
            };
        }
    }
    let mut lo = 0usize; // assumed to pass: nothing happened yet
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fails(&with_tail(mid)).is_some() {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    let prefix = hi;
    let mut list = if hi == ops.len() && fails(&with_tail(hi)).is_none() {
        ops.to_vec()
    } else {
        with_tail(hi)
    };
    // Remove chunks, halving their size, while the failure persists (ddmin-like).
    let mut chunk = list.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        let mut removed_any = false;
        while i < list.len() && runs.get() < SHRINK_RUNS {
            let end = (i + chunk).min(list.len());
            let mut candidate = list.clone();
            candidate.drain(i..end);
            if !candidate.is_empty() && fails(&candidate).is_some() {
                list = candidate;
                removed_any = true;
            } else {
                i += chunk;
            }
        }
        if runs.get() >= SHRINK_RUNS || (chunk == 1 && !removed_any) {
            break;
        }
        if !removed_any {
            chunk = (chunk / 2).max(1);
        }
    }
    let last = run_once(config, &list, report, true).err();
    Shrunk {
        prefix: Some(prefix),
        minimized: list,
        last,
        runs: runs.get() + 1,
    }
}

fn print_ops(ops: &[Op]) {
    for (i, op) in ops.iter().enumerate() {
        println!("      {i:3}: {op}");
    }
}

fn main() {
    let explicit_count = env_u64("MODEL_SEQUENCES");
    let seconds = env_u64("MODEL_SECONDS");
    let count = explicit_count.unwrap_or(if seconds.is_some() { u64::MAX } else { 2000 });
    let base = env_u64("MODEL_SEED").unwrap_or(DEFAULT_SEED);
    let len = env_u64("MODEL_LEN").unwrap_or(80) as usize;
    let jobs = env_u64("MODEL_JOBS").unwrap_or(2).clamp(1, 64) as usize;
    let shrink_enabled = env_u64("MODEL_SHRINK") != Some(0);
    let heap_growth = env_u64("MODEL_HEAP_GROWTH") != Some(0);
    let deadline = seconds.map(|s| Instant::now() + Duration::from_secs(s));
    let page_env = std::env::var("MEMSNAP_PAGE_SIZE").ok();
    println!(
        "model: base seed {base:#x}, {} sequences of {len} operations, {jobs} at a time{}{}{}",
        if count == u64::MAX {
            "unbounded".to_string()
        } else {
            count.to_string()
        },
        seconds
            .map(|s| format!(", for at most {s} s"))
            .unwrap_or_default(),
        page_env
            .as_ref()
            .map(|p| format!(", MEMSNAP_PAGE_SIZE={p}"))
            .unwrap_or_default(),
        if heap_growth {
            ""
        } else {
            ", heap grown beforehand"
        }
    );
    let started = Instant::now();
    let reports = Reports::new(jobs + 1);
    let shrink_report = reports.get(jobs);
    // (pid, sequence index, seed) per job slot.
    let mut running: Vec<Option<(libc::pid_t, u64, u64)>> = vec![None; jobs];
    let mut next = 0u64;
    let mut totals = Totals::default();
    let mut failures: Vec<(u64, u64, Failure)> = vec![];
    loop {
        let may_launch =
            failures.is_empty() && next < count && deadline.is_none_or(|d| Instant::now() < d);
        if may_launch {
            if let Some(slot) = running.iter().position(|r| r.is_none()) {
                let seed = base.wrapping_add(next.wrapping_mul(SEED_STEP));
                let (mut config, ops) = ops::generate(seed, len);
                config.heap_growth = heap_growth;
                let pid = spawn(config, &ops, reports.get(slot), false);
                running[slot] = Some((pid, next, seed));
                next += 1;
                continue;
            }
        }
        if running.iter().all(|r| r.is_none()) {
            break;
        }
        let mut status = 0;
        // SAFETY: waiting for any of our children.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        assert!(pid > 0, "waitpid failed");
        let Some(slot) = running
            .iter()
            .position(|r| r.is_some_and(|(p, _, _)| p == pid))
        else {
            continue;
        };
        let (_, index, seed) = running[slot].take().expect("slot is running");
        let report = reports.get(slot);
        match outcome(status, report) {
            Ok(()) => {
                // SAFETY: the child has exited; the parent alone reads the page now.
                let r = unsafe { &*report };
                totals.sequences += 1;
                totals.ops += r.ops_done;
                totals.skipped += r.skipped;
                totals.checkpoints += r.checkpoints;
                totals.rewinds += r.rewinds;
                totals.deep_rewinds += r.deep_rewinds;
                totals.erases += r.erases;
                totals.registered_only += r.registered_only;
                totals.registrations += r.registrations;
                totals.kernel_writes += r.kernel_writes;
                totals.host_calls += r.host_calls;
                totals.floor_raises += r.floor_raises;
                totals.unmaps_undone += r.unmaps_undone;
            }
            Err(f) => failures.push((index, seed, f)),
        }
    }
    let secs = started.elapsed().as_secs_f64();
    if failures.is_empty() {
        println!(
            "model: {} sequences ({} registered-only), {} ops ({} skipped), {} checkpoints ({} after which older ones were out of reach), {} rewinds ({} deeper than the newest checkpoint), {} erases, {} registrations, {} kernel writes after memsnap_prepare_write, {} host mmap/munmap/mprotect calls ({} unmaps undone by rewinds): all matched ({secs:.1} s)",
            totals.sequences,
            totals.registered_only,
            totals.ops,
            totals.skipped,
            totals.checkpoints,
            totals.floor_raises,
            totals.rewinds,
            totals.deep_rewinds,
            totals.erases,
            totals.registrations,
            totals.kernel_writes,
            totals.host_calls,
            totals.unmaps_undone
        );
        return;
    }
    failures.sort_by_key(|f| f.0);
    for (index, seed, failure) in &failures {
        let (mut config, ops) = ops::generate(*seed, len);
        config.heap_growth = heap_growth;
        let at = failure.op();
        println!(
            "model: sequence {index} FAILED (seed {seed:#x}, restore threads {}): {} at operation {at}{}",
            config.restore_threads,
            failure.describe(),
            usize::try_from(at)
                .ok()
                .and_then(|i| ops.get(i))
                .map(|op| format!(" ({op})"))
                .unwrap_or_default()
        );
        println!(
            "  reproduce: {}{}MODEL_SEED={seed:#x} MODEL_SEQUENCES=1 MODEL_LEN={len} cargo test --release --test model",
            page_env
                .as_ref()
                .map(|p| format!("MEMSNAP_PAGE_SIZE={p} "))
                .unwrap_or_default(),
            if heap_growth { "" } else { "MODEL_HEAP_GROWTH=0 " }
        );
        if !shrink_enabled {
            continue;
        }
        let s = shrink(config, &ops, failure, shrink_report);
        match s.prefix {
            None => println!(
                "  did not fail again in a fresh child ({} runs): timing-dependent?",
                s.runs
            ),
            Some(p) => {
                println!(
                    "  shortest failing prefix: the first {p} operations, then a rewind to the first checkpoint:"
                );
                print_ops(&ops[..p]);
                println!(
                    "  minimized ({} runs) to {} operations:",
                    s.runs,
                    s.minimized.len()
                );
                print_ops(&s.minimized);
                if let Some(f) = &s.last {
                    println!("  which fails with: {}", f.describe());
                }
                println!(
                    "  (offsets and lengths are reduced modulo the region's size at run time)"
                );
            }
        }
    }
    println!(
        "model: {} sequence(s) FAILED; {} passed before launching stopped ({secs:.1} s)",
        failures.len(),
        totals.sequences
    );
    std::process::exit(1);
}
