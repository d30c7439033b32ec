//! Restore workers: library threads that copy saved pages back in parallel.
//!
//! They run on stacks the library mapped, with every signal blocked, and touch only
//! untracked memory: the job description, the slot pool and the page-state table. The
//! controller publishes a job, bumps `generation` and works on chunk 0 itself; worker `i`
//! takes chunk `i + 1`; the controller waits for `done` to reach the worker count.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::dirty::{chunk_bounds, for_each_run, DiffEntry};
use super::{Engine, TrackedRegion};
use crate::sys;

const STACK_BYTES: usize = 256 << 10;
const PARALLEL_MIN_PAGES: usize = 256;
/// Runs of pages a restore makes writable before protecting them again.
const RUNS_PER_BATCH: usize = 4096;
const MAX_OWN_THREADS: usize = 66;

#[derive(Clone, Copy)]
struct Job {
    entries: *const DiffEntry,
    len: usize,
    deltas: *const u8,
    deltas_len: usize,
    parts: usize,
}

pub struct Workers {
    count: AtomicUsize,
    /// Thread ids of the workers and the countdown thread (0 = unused slot).
    tids: [AtomicU64; MAX_OWN_THREADS],
    pid: AtomicU64,
    generation: AtomicU32,
    done: AtomicU32,
    job: UnsafeCell<Job>,
}

// SAFETY: `job` is written only by the controller while every worker waits on `generation`
// and read by workers only after the Release/Acquire pair on `generation`.
unsafe impl Sync for Workers {}

struct Start {
    engine: *const Engine,
    index: usize,
    generation: u32,
}

impl Workers {
    pub const fn new() -> Self {
        Workers {
            count: AtomicUsize::new(0),
            tids: [const { AtomicU64::new(0) }; MAX_OWN_THREADS],
            pid: AtomicU64::new(0),
            generation: AtomicU32::new(0),
            done: AtomicU32::new(0),
            job: UnsafeCell::new(Job {
                entries: core::ptr::null(),
                len: 0,
                deltas: core::ptr::null(),
                deltas_len: 0,
                parts: 0,
            }),
        }
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    pub fn pid(&self) -> u64 {
        self.pid.load(Ordering::Relaxed)
    }

    /// Records the calling library thread's id.
    pub(super) fn register_own_thread(&self) {
        let me = sys::tid();
        for slot in &self.tids {
            if slot
                .compare_exchange(0, me, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                return;
            }
        }
    }

    /// In a forked child: the parent's library threads do not exist here.
    pub(super) fn forget_threads(&self) {
        for t in &self.tids {
            t.store(0, Ordering::Release);
        }
    }

    /// How many library threads have recorded their ids.
    pub(super) fn registered(&self) -> usize {
        self.own_tids().count()
    }

    /// Waits until `n` library threads have recorded their ids, so that a thread probe
    /// right after spawning never mistakes one of them for a host thread.
    pub(super) fn wait_registered(&self, n: usize) {
        while self
            .tids
            .iter()
            .filter(|t| t.load(Ordering::Acquire) != 0)
            .count()
            < n
        {
            sys::yield_now();
        }
    }

    /// The library's own threads (restore workers, the countdown thread).
    pub fn own_tids(&self) -> impl Iterator<Item = u64> + '_ {
        self.tids
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .filter(|&t| t != 0)
    }

    /// Whether `tid` is one of the library's own threads.
    pub fn is_own_thread(&self, tid: u64) -> bool {
        self.tids.iter().any(|t| t.load(Ordering::Acquire) == tid)
    }
}

impl Default for Workers {
    fn default() -> Self {
        Self::new()
    }
}

extern "C" fn worker_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `arg` points at a Start in the worker's own stack reservation, written before
    // the thread was created and never freed.
    let start = unsafe { &*(arg as *const Start) };
    // SAFETY: the engine is never freed.
    let engine = unsafe { &*start.engine };
    let w = &engine.workers;
    w.register_own_thread();
    let mut seen = start.generation;
    loop {
        let g = w.generation.load(Ordering::Acquire);
        if g == seen {
            sys::futex_wait(&w.generation, seen);
            continue;
        }
        seen = g;
        // SAFETY: published before the generation bump (see `Workers`).
        let job = unsafe { *w.job.get() };
        if start.index + 1 < job.parts {
            // SAFETY: the controller keeps the entries and their deltas alive until every
            // part is done.
            let (entries, deltas) = unsafe {
                (
                    core::slice::from_raw_parts(job.entries, job.len),
                    core::slice::from_raw_parts(job.deltas, job.deltas_len),
                )
            };
            engine.restore_chunk(entries, deltas, job.parts, start.index + 1);
        }
        w.done.fetch_add(1, Ordering::AcqRel);
        sys::futex_wake(&w.done, 1);
    }
}

impl Engine {
    /// Starts the configured number of restore workers (once per process).
    pub(super) fn spawn_workers(&self, function: &str) {
        let w = &self.workers;
        if w.count() > 0 || self.restore_threads() == 0 {
            return;
        }
        let n = self.restore_threads();
        let each = sys::thread_stack_bytes(STACK_BYTES);
        let Some(stacks) = sys::reserve(n * each) else {
            crate::fatal!(function, "cannot map stacks for {} restore threads", n)
        };
        self.meta.lock().add_own(crate::mem::Reservation {
            base: stacks as usize,
            len: n * each,
        });
        for i in 0..n {
            // SAFETY: each worker owns one `each`-byte slice of the reservation; its Start
            // record sits at the slice's low end, below anything the stack will reach.
            unsafe {
                let base = stacks.add(i * each);
                let start = base as *mut Start;
                start.write(Start {
                    engine: self,
                    index: i,
                    generation: w.generation.load(Ordering::Acquire),
                });
                // The stack starts one page up (past the Start record) and stays whole
                // pages: Apple's libpthread refuses a stack that is not page-aligned,
                // and its pages are 16 KiB on arm64.
                let skip = sys::os_page_size();
                let stack = base.add(skip);
                if let Err(e) = sys::spawn(stack, each - skip, worker_main, start as *mut _) {
                    crate::fatal!(function, "cannot start restore thread {} (error {})", i, e);
                }
            }
        }
        w.wait_registered(n + usize::from(self.countdown_started.load(Ordering::Acquire)));
        w.pid.store(sys::pid(), Ordering::Relaxed);
        w.count.store(n, Ordering::Release);
    }

    /// Restores `entries` (sorted by page): every page gets its saved bytes back, becomes
    /// clean and write-protected, and its slot returns to the pool. `writable` says the
    /// pages are writable already (the active dirty set); otherwise they are clean and
    /// read-only, and are unprotected first.
    ///
    /// Only the copying is shared with the workers. The protection changes stay on the
    /// controller: every mprotect takes the process's mmap lock for writing, and with
    /// other threads running each one also interrupts them to flush their TLBs, so
    /// spreading mprotect calls over threads made scattered restores slower, not faster.
    pub(super) fn restore_entries(
        &self,
        function: &str,
        entries: &[DiffEntry],
        deltas: &[u8],
        regions: &[TrackedRegion],
        writable: bool,
    ) {
        let mut start = 0;
        while start < entries.len() {
            // Unprotected runs split mappings until they are protected again: a bounded
            // batch of runs at a time keeps the process far from vm.max_map_count.
            let end = if writable {
                entries.len()
            } else {
                self.batch_end(entries, start)
            };
            let batch = &entries[start..end];
            if !writable {
                self.unprotect_runs(function, batch);
            }
            self.copy_entries(batch, deltas);
            // Async units are armed together below, by one scan per region.
            if let Err((at, len, e)) =
                self.write_protect(regions, batch.len(), |i| batch[i].page, true, false)
            {
                crate::fatal!(
                    function,
                    "cannot write-protect {:#x}+{:#x} (errno {})",
                    at,
                    len,
                    e
                );
            }
            start = end;
        }
        self.arm_restored(function, regions, entries);
    }

    /// The end of the batch starting at `start`: at most [`RUNS_PER_BATCH`] runs.
    fn batch_end(&self, entries: &[DiffEntry], start: usize) -> usize {
        let mut runs = 1;
        let mut i = start + 1;
        while i < entries.len() {
            if entries[i].page != entries[i - 1].page + self.settings.page {
                runs += 1;
                if runs > RUNS_PER_BATCH {
                    break;
                }
            }
            i += 1;
        }
        i
    }

    /// Copies the saved bytes of `entries` back, with the workers' help for many pages.
    fn copy_entries(&self, entries: &[DiffEntry], deltas: &[u8]) {
        let w = &self.workers;
        let workers = if self.workers_usable() { w.count() } else { 0 };
        // Waking the workers costs tens of microseconds; below this many pages the
        // controller copies faster alone.
        if workers == 0 || entries.len() < PARALLEL_MIN_PAGES {
            self.restore_chunk(entries, deltas, 1, 0);
            return;
        }
        let parts = workers + 1;
        // SAFETY: every worker is parked waiting for the next generation.
        unsafe {
            *w.job.get() = Job {
                entries: entries.as_ptr(),
                len: entries.len(),
                deltas: deltas.as_ptr(),
                deltas_len: deltas.len(),
                parts,
            };
        }
        w.done.store(0, Ordering::Release);
        w.generation.fetch_add(1, Ordering::AcqRel);
        sys::futex_wake(&w.generation, i32::MAX as u32);
        self.restore_chunk(entries, deltas, parts, 0);
        loop {
            let d = w.done.load(Ordering::Acquire);
            if d as usize >= workers {
                break;
            }
            sys::futex_wait(&w.done, d);
        }
    }

    /// Makes the (clean, read-only) units of `entries` writable, one call per run.
    fn unprotect_runs(&self, function: &str, entries: &[DiffEntry]) {
        for_each_run(
            entries.len(),
            self.settings.page,
            |i| entries[i].page,
            |i| {
                let st = self.table.get(entries[i].page);
                (
                    st.exec(),
                    st.uffd(),
                    st.partial().then_some(entries[i].page),
                )
            },
            |first, count| {
                let start = entries[first].page;
                let st = self.table.get(start);
                let len = count * self.settings.page;
                let result = if st.partial() {
                    self.protect_unit(start, st, true)
                } else {
                    // SAFETY: tracked host pages about to get their saved bytes back;
                    // nothing runs on them while the controller holds memory changes
                    // disallowed.
                    unsafe { self.open_for_restore(start, len, st.exec(), st.uffd()) }
                        .map_err(|e| (start, len, e))
                };
                if let Err((at, len, e)) = result {
                    crate::fatal!(
                        function,
                        "cannot unprotect {:#x}+{:#x} for restoring (errno {})",
                        at,
                        len,
                        e
                    );
                }
            },
        );
    }

    /// One thread's share of a restore: writes each unit's pre-image back (the units are
    /// writable), marks it clean and releases its slot.
    fn restore_chunk(&self, entries: &[DiffEntry], deltas: &[u8], parts: usize, k: usize) {
        let (a, b) = (
            chunk_bounds(entries.len(), parts, k),
            chunk_bounds(entries.len(), parts, k + 1),
        );
        let mut freed = self.pool.chain();
        for e in &entries[a..b] {
            // SAFETY: the entry's pre-image is consumed here; the unit's tracked spans
            // are writable and nothing else runs on them while the controller holds
            // memory changes disallowed.
            unsafe { self.restore_entry(e, deltas, &mut freed) };
        }
    }
}
