//! The end-to-end workloads' measuring children (bench/e2e.rs plans them and reads what
//! they report): the SQLite reset loop under a memsnap backend, under a fork server and
//! with no reset at all, and the record/replay cadence under a memsnap backend.
//!
//! Under memsnap the whole process is tracked (the default mode, as hosts/sqlite_host.cpp
//! runs it): SQLite's pages come from glibc malloc, which InitializeMemorySnapshots pins
//! to its main arena, so they are tracked memory without any registration. Whatever the
//! harness must keep across a rewind (timings, hashes) lives in untracked memory from
//! AllocateMemory(Generic) or on the stack (thread stacks are not tracked), never in a
//! heap block allocated after the checkpoint.

use std::time::Instant;

use memsnap::ffi::ext::*;
use memsnap::ffi::original::*;
use memsnap::ffi::MemoryKindArg;

use crate::child::{self, ns_since, Report};
use crate::heap_hash::{hash_memory, heap_range};
use crate::mechanisms::{backend_name, stats};
use crate::sqlite::{self, Db, Digest};

const GENERIC: MemoryKindArg = MemoryKindArg(1);
/// Batch seeds: iteration i runs the batch of seed `SEED + i` in every mechanism.
const SEED: u64 = 0xf00d_0000;
/// Untimed iterations before the timed ones (caches, first allocations).
pub const WARMUP: usize = 2;

/// A memsnap backend as the end-to-end workloads select it.
#[derive(Clone, Copy)]
pub struct Backend {
    pub label: &'static str,
    pub request: MemsnapBackendRequest,
}

pub const BACKENDS: [Backend; 3] = [
    Backend {
        label: "memsnap",
        request: MemsnapBackendRequest::Mprotect,
    },
    Backend {
        label: "memsnap-uffd",
        request: MemsnapBackendRequest::Uffd,
    },
    Backend {
        label: "memsnap-uffd-async",
        request: MemsnapBackendRequest::UffdAsync,
    },
];

fn choice(b: MemsnapBackendRequest) -> memsnap::engine::BackendChoice {
    use memsnap::engine::BackendChoice;
    match b {
        MemsnapBackendRequest::Auto => BackendChoice::Auto,
        MemsnapBackendRequest::Mprotect => BackendChoice::Mprotect,
        MemsnapBackendRequest::Uffd => BackendChoice::Uffd,
        MemsnapBackendRequest::UffdAsync => BackendChoice::UffdAsync,
    }
}

/// Why this machine cannot run `b` (asked in a child: probing opens descriptors).
pub fn unavailable(b: Backend) -> Option<String> {
    memsnap::engine::backend_unavailable(choice(b.request)).map(String::from)
}

/// Selects the backend and initializes memsnap; `false` (reported) if it is refused.
fn init(b: Backend, r: &mut Report) -> bool {
    if memsnap_set_backend(MemsnapBackendRequestArg(b.request as libc::c_int)) != MemsnapStatus::Ok
    {
        r.text(
            "unavailable",
            &unavailable(b).unwrap_or_else(|| "memsnap_set_backend refused it".into()),
        );
        return false;
    }
    InitializeMemorySnapshots();
    true
}

/// `n` f64 slots of untracked memory (zeroed), kept across rewinds.
fn untracked_f64(n: usize) -> &'static mut [f64] {
    let p = AllocateMemory(n.max(1) * 8, GENERIC) as *mut f64;
    // SAFETY: AllocateMemory returns at least that many zeroed, writable, page-aligned
    // bytes, never freed.
    unsafe { std::slice::from_raw_parts_mut(p, n.max(1)) }
}

fn untracked_bytes(n: usize) -> &'static mut [u8] {
    let p = AllocateMemory(n, GENERIC) as *mut u8;
    // SAFETY: as above.
    unsafe { std::slice::from_raw_parts_mut(p, n) }
}

fn rewind(levels: usize) {
    SetMemoryChangesAllowed(false);
    RestoreMemoryToLastSavedCheckpoint();
    for _ in 0..levels {
        RestoreMemoryToLastSavedDiffCheckpoint();
    }
    SetMemoryChangesAllowed(true);
    FixupFreeRegionsAfterRewind();
}

/// The sorted copy of `v`'s value at quantile `q` (nearest rank).
pub fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if s.is_empty() {
        return f64::NAN;
    }
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
    s[i]
}

/// Builds the database and reports its shape; returns it, its rows and its SQL hash.
fn prepare(db_target: usize, r: &mut Report) -> (Db, u64, u64) {
    let t0 = Instant::now();
    let db = Db::open_memory();
    let rows = sqlite::build(&db, db_target);
    let hash = db.content_hash();
    r.num("prepare_s", ns_since(t0) / 1e9)
        .num("db_bytes", db.bytes() as f64)
        .num("rows", rows as f64);
    (db, rows, hash)
}

fn fail(r: &mut Report, why: &str) -> ! {
    r.num("verified", 0.0).text("verify_failure", why);
    r.flush();
    eprintln!("bench e2e: verification failed: {why}");
    // SAFETY: ends the measuring child; the parent records the failure.
    unsafe { libc::_exit(2) }
}

/// Per-iteration times and digest: the common report of the reset loop's mechanisms.
fn report_loop(r: &mut Report, iter_ns: &[f64], digests: (u64, u64)) {
    let total: f64 = iter_ns.iter().sum();
    r.num("iterations", iter_ns.len() as f64)
        .num("iterations_per_s", iter_ns.len() as f64 / (total / 1e9))
        .num("iteration_ns_p50", quantile(iter_ns, 0.5))
        .num("iteration_ns_p99", quantile(iter_ns, 0.99))
        .text("first_digest", &format!("{:016x}", digests.0))
        .text("run_digest", &format!("{:016x}", digests.1));
}

/// The reset loop under memsnap: checkpoint the prepared database, then run a batch and
/// rewind, `iters` times (after WARMUP untimed ones). Every rewind is checked against the
/// checkpoint by the hash of the heap; the first batch must change that hash (so the
/// check can fail), and at the end the database's rows must hash as before.
pub fn reset_memsnap(b: Backend, db_target: usize, stmts: usize, iters: usize, r: &mut Report) {
    if !init(b, r) {
        return;
    }
    let maps = untracked_bytes(4 << 20);
    let n = WARMUP + iters;
    let batch_ns = untracked_f64(n);
    let rewind_ns = untracked_f64(n);
    let (db, rows, sql_hash) = prepare(db_target, r);
    TakeFirstMemorySnapshot();
    let Some((start, end)) = heap_range(maps) else {
        fail(r, "no [heap] mapping in /proc/self/maps")
    };
    // SAFETY: the heap's extent at the checkpoint stays mapped (memsnap pins glibc malloc,
    // which never shrinks it) and readable under every backend.
    let h0 = unsafe { hash_memory(start, end - start) };
    let s0 = stats();
    let (mut first, mut run) = (0u64, Digest::new());
    for i in 0..n {
        let t0 = Instant::now();
        let d = sqlite::batch(&db, rows, SEED + i as u64, stmts, false);
        let t1 = ns_since(t0);
        // SAFETY: as above.
        if i == 0 && unsafe { hash_memory(start, end - start) } == h0 {
            fail(r, "the first batch left the heap's hash unchanged");
        }
        let t2 = Instant::now();
        rewind(0);
        rewind_ns[i] = ns_since(t2);
        batch_ns[i] = t1;
        // SAFETY: as above.
        let h = unsafe { hash_memory(start, end - start) };
        if h != h0 {
            fail(
                r,
                &format!("rewind {i}: heap hash {h:016x}, the checkpoint's {h0:016x}"),
            );
        }
        if i == 0 {
            first = d;
        }
        run.mix(d);
    }
    let s1 = stats();
    if db.content_hash() != sql_hash {
        fail(r, "after the last rewind the rows do not hash as prepared");
    }
    let iter_ns: Vec<f64> = (WARMUP..n).map(|i| batch_ns[i] + rewind_ns[i]).collect();
    report_loop(r, &iter_ns, (first, run.0));
    r.text("backend", backend_name(s1.backend))
        .num("batch_ns_p50", quantile(&batch_ns[WARMUP..], 0.5))
        .num("rewind_ns_p50", quantile(&rewind_ns[WARMUP..], 0.5))
        .num("rewind_ns_p99", quantile(&rewind_ns[WARMUP..], 0.99))
        .num(
            "faults_per_iteration",
            (s1.faults_handled - s0.faults_handled) as f64 / n as f64,
        )
        .num("heap_bytes", (end - start) as f64)
        .num("tracked_bytes", s1.tracked_bytes as f64)
        .num("base_copy_bytes", s1.base_copy_bytes as f64)
        .num("rewinds_verified", n as f64)
        .num("statements_per_batch", stmts as f64)
        .num("verified", 1.0);
}

/// The reset loop as AFL's fork server runs it: fork, the batch in the child, its exit,
/// and the wait. The children's digests come back through `shared`; the parent's
/// database is never written, and hashes as prepared at the end.
pub fn reset_fork(db_target: usize, stmts: usize, iters: usize, shared: &mut [u8], r: &mut Report) {
    let (db, rows, sql_hash) = prepare(db_target, r);
    let n = WARMUP + iters;
    assert!(
        n * 8 <= shared.len(),
        "too many iterations for the shared page"
    );
    let slots = shared.as_mut_ptr() as *mut u64;
    let mut iter_ns = Vec::with_capacity(n);
    let (mut first, mut run) = (0u64, Digest::new());
    for i in 0..n {
        let t0 = Instant::now();
        // SAFETY: the measuring child is single-threaded; the grandchild runs the batch,
        // stores its digest in its own slot of the shared mapping and exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let d = sqlite::batch(&db, rows, SEED + i as u64, stmts, false);
            // SAFETY: slot i is inside the shared mapping (asserted above), 8-aligned.
            unsafe {
                *slots.add(i) = d;
                libc::_exit(0)
            };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let ns = ns_since(t0);
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            fail(
                r,
                &format!("fork server child {i} failed (status {status:#x})"),
            );
        }
        // SAFETY: as above; the child has exited, so the slot is final.
        let d = unsafe { *slots.add(i) };
        if i == 0 {
            first = d;
        }
        run.mix(d);
        if i >= WARMUP {
            iter_ns.push(ns);
        }
    }
    if db.content_hash() != sql_hash {
        fail(r, "the fork server's own database changed");
    }
    report_loop(r, &iter_ns, (first, run.0));
    r.text("backend", "kernel")
        .num("statements_per_batch", stmts as f64)
        .num("verified", 1.0);
}

/// The batches with no reset at all: the upper bound on iterations per second. Nothing is
/// rewound; its first batch (from the prepared state) must match the others' first.
pub fn reset_none(db_target: usize, stmts: usize, iters: usize, r: &mut Report) {
    let (db, rows, _) = prepare(db_target, r);
    let n = WARMUP + iters;
    let mut iter_ns = Vec::with_capacity(n);
    let (mut first, mut run) = (0u64, Digest::new());
    for i in 0..n {
        let t0 = Instant::now();
        let d = sqlite::batch(&db, rows, SEED + i as u64, stmts, false);
        if i >= WARMUP {
            iter_ns.push(ns_since(t0));
        }
        if i == 0 {
            first = d;
        }
        run.mix(d);
    }
    report_loop(r, &iter_ns, (first, run.0));
    r.text("backend", "none")
        .num("statements_per_batch", stmts as f64)
        .num("verified", 1.0);
}

/// Sleeps until `deadline` (an Instant), or returns at once if it has passed.
fn sleep_until(deadline: Instant) {
    let now = Instant::now();
    if deadline > now {
        std::thread::sleep(deadline - now);
    }
}

/// Record/replay cadence: `stmts` write statements at the start of every `interval_ms`
/// and a checkpoint at its end, `checkpoints` times; then back to every `every`-th
/// checkpoint, newest first, down to the first snapshot. Each checkpoint rewound to is
/// compared with the hash of the heap taken when it was saved, and the first snapshot's
/// rows with their SQL hash.
pub struct Cadence {
    pub db_target: usize,
    pub checkpoints: usize,
    pub interval_ms: f64,
    pub stmts: usize,
    pub every: usize,
}

pub fn cadence(b: Backend, c: &Cadence, r: &mut Report) {
    if !init(b, r) {
        return;
    }
    let n = c.checkpoints - c.checkpoints % c.every;
    let maps = untracked_bytes(4 << 20);
    let ckpt_ns = untracked_f64(n);
    let held_bytes = untracked_f64(n);
    let held_pages = untracked_f64(n);
    let level_ns = untracked_f64(n);
    let marks = n / c.every + 1;
    let hashes = untracked_f64(marks);
    let ends = untracked_f64(marks);
    let (db, rows, sql_hash) = prepare(c.db_target, r);
    TakeFirstMemorySnapshot();
    // After the first snapshot: uffd-async's base copy is not a checkpoint's memory.
    let rss0 = child::status_bytes(maps, "VmRSS");
    let Some((start, end0)) = heap_range(maps) else {
        fail(r, "no [heap] mapping in /proc/self/maps")
    };
    let hash_to = |end: usize| {
        // SAFETY: the heap's extent at a checkpoint stays mapped and readable (memsnap
        // pins glibc malloc, which never shrinks it).
        unsafe { hash_memory(start, end - start) }
    };
    hashes[0] = f64::from_bits(hash_to(end0));
    ends[0] = end0 as f64;
    let interval = std::time::Duration::from_secs_f64(c.interval_ms / 1e3);
    let s0 = stats();
    let mut prev = (s0.saved_diff_bytes, s0.saved_diff_pages);
    let mut seed = SEED;
    let mut deadline = Instant::now();
    let t_run = Instant::now();
    for i in 0..n {
        deadline = (deadline + interval).max(Instant::now());
        sqlite::batch(&db, rows, seed, c.stmts, true);
        seed += 1;
        sleep_until(deadline);
        let t0 = Instant::now();
        TakeDiffMemorySnapshot();
        ckpt_ns[i] = ns_since(t0);
        let s = stats();
        held_bytes[i] = (s.saved_diff_bytes - prev.0) as f64;
        held_pages[i] = (s.saved_diff_pages - prev.1) as f64;
        prev = (s.saved_diff_bytes, s.saved_diff_pages);
        if (i + 1) % c.every == 0 {
            let Some((_, end)) = heap_range(maps) else {
                fail(r, "no [heap] mapping in /proc/self/maps")
            };
            hashes[(i + 1) / c.every] = f64::from_bits(hash_to(end));
            ends[(i + 1) / c.every] = end as f64;
        }
    }
    let run_s = ns_since(t_run) / 1e9;
    let rss1 = child::status_bytes(maps, "VmRSS");
    let held = stats();
    // Writes after the newest checkpoint, so the first restore has an active set.
    sqlite::batch(&db, rows, seed, c.stmts, true);
    SetMemoryChangesAllowed(false);
    let t0 = Instant::now();
    RestoreMemoryToLastSavedCheckpoint();
    let first_ns = ns_since(t0);
    let mut at = n;
    let mut verified = 0;
    loop {
        let mark = at / c.every;
        let h = hash_to(ends[mark] as usize);
        if h != hashes[mark].to_bits() {
            SetMemoryChangesAllowed(true);
            fail(
                r,
                &format!(
                    "checkpoint {at}: heap hash {h:016x}, saved {:016x}",
                    hashes[mark].to_bits()
                ),
            );
        }
        verified += 1;
        if at == 0 {
            break;
        }
        for _ in 0..c.every {
            let t = Instant::now();
            RestoreMemoryToLastSavedDiffCheckpoint();
            at -= 1;
            level_ns[at] = ns_since(t);
        }
    }
    SetMemoryChangesAllowed(true);
    FixupFreeRegionsAfterRewind();
    if db.content_hash() != sql_hash {
        fail(
            r,
            "back at the first snapshot the rows do not hash as prepared",
        );
    }
    let jumps: Vec<f64> = level_ns[..n]
        .chunks(c.every)
        .map(|g| g.iter().sum::<f64>())
        .collect();
    let nf = n as f64;
    r.text("backend", backend_name(held.backend))
        .num("checkpoints", nf)
        .num("run_s", run_s)
        .num("checkpoint_ns_p50", quantile(ckpt_ns, 0.5))
        .num("checkpoint_ns_p99", quantile(ckpt_ns, 0.99))
        .num("checkpoint_ns_max", quantile(ckpt_ns, 1.0))
        .num(
            "held_bytes_per_checkpoint",
            held.saved_diff_bytes as f64 / nf,
        )
        .num("held_bytes_per_checkpoint_p50", quantile(held_bytes, 0.5))
        .num("held_bytes_per_checkpoint_p99", quantile(held_bytes, 0.99))
        .num("dirty_pages_per_checkpoint_p50", quantile(held_pages, 0.5))
        .num(
            "held_bytes_per_dirty_page",
            held.saved_diff_bytes as f64 / (held.saved_diff_pages.max(1)) as f64,
        )
        .num("rss_bytes_per_checkpoint", (rss1 - rss0) / nf)
        .num("base_copy_bytes", held.base_copy_bytes as f64)
        .num("first_rewind_ns", first_ns)
        .num("rewind_ns_per_level_p50", quantile(level_ns, 0.5))
        .num("rewind_ns_per_level_p99", quantile(level_ns, 0.99))
        .num("rewind_ns_per_jump_p50", quantile(&jumps, 0.5))
        .num("rewind_ns_per_jump_p99", quantile(&jumps, 0.99))
        .num("levels_per_jump", c.every as f64)
        .num("statements_per_interval", c.stmts as f64)
        .num("rewinds_verified", verified as f64)
        .num("verified", 1.0);
}
