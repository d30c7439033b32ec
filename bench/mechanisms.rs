//! The mechanisms compared: memsnap (one entry per backend configuration) and what a user
//! would do instead (fork copy-on-write, full memcpy checkpoints, memcpy + mprotect
//! restores, a raw page memcpy). Each implements the workloads it can run; `run` executes
//! inside a fresh child and fills its report.
//!
//! Adding a mechanism: implement [`Mechanism`] and list it in [`all`]. Adding a memsnap
//! backend: add a [`Memsnap`] entry whose `env` selects it; the backend column comes from
//! memsnap_get_stats in the child, so a backend that is not actually active shows up.

use std::time::Instant;

use memsnap::ffi::ext::*;
use memsnap::ffi::original::*;
use memsnap::ffi::MemoryKindArg;

use crate::child::{self, dirty, ns_since, Report};
use crate::workloads::{Order, Workload};

const TRACKED: MemoryKindArg = MemoryKindArg(0);
const GENERIC: MemoryKindArg = MemoryKindArg(1);
const SEED: u64 = 0x6d65_6d73_6e61_7021;

pub trait Mechanism {
    /// The mechanism column ("memsnap", "fork-cow", ...).
    fn name(&self) -> String;
    fn supports(&self, w: &Workload) -> bool;
    /// Runs `w` once, in a child. `shared` is MAP_SHARED memory the parent reads even if
    /// the child dies. Reports the `#backend` text field and the workload's metrics.
    fn run(&self, w: &Workload, shared: &mut [u8], r: &mut Report);
}

pub fn all() -> Vec<Box<dyn Mechanism>> {
    vec![
        Box::new(Memsnap {
            label: "memsnap",
            env: &[("MEMSNAP_BACKEND", "mprotect")],
            configure: || {},
        }),
        Box::new(Memsnap {
            label: "memsnap-uffd",
            env: &[("MEMSNAP_BACKEND", "uffd")],
            configure: || {},
        }),
        Box::new(Memsnap {
            label: "memsnap-uffd-async",
            env: &[("MEMSNAP_BACKEND", "uffd-async")],
            configure: || {},
        }),
        Box::new(ForkCow),
        Box::new(FullCopy),
        Box::new(CopyProtect),
        Box::new(RawCopy),
    ]
}

/// Byte offsets of the pages a first-write workload touches, in write order.
fn first_write_offsets(heap: usize, page: usize, order: Order, cap: Option<usize>) -> Vec<usize> {
    let pages = heap / page;
    let mut v = match order {
        Order::Sequential => (0..pages).collect(),
        Order::Random => child::permutation(pages, SEED),
    };
    v.truncate(cap.unwrap_or(pages));
    v.iter().map(|p| p * page).collect()
}

/// Offsets of a random `fraction` of the heap's pages, in address order.
fn subset_offsets(heap: usize, page: usize, fraction: f64, seed: u64) -> Vec<usize> {
    let pages = heap / page;
    let k = ((pages as f64 * fraction).round() as usize).max(1);
    child::random_subset(pages, k, seed)
        .iter()
        .map(|p| p * page)
        .collect()
}

/// Writes one byte in each page of `chunk t of threads` of `offsets`.
fn write_split(base: usize, offsets: &[usize], threads: usize, t: usize) {
    let n = offsets.len();
    for &o in &offsets[t * n / threads..(t + 1) * n / threads] {
        dirty(base as *mut u8, o);
    }
}

fn write_all(base: *mut u8, offsets: &[usize]) -> f64 {
    let t0 = Instant::now();
    for &o in offsets {
        dirty(base, o);
    }
    ns_since(t0)
}

fn shared_f64(shared: &mut [u8], i: usize) -> &mut f64 {
    assert!((i + 1) * 8 <= shared.len());
    // SAFETY: in bounds; the mapping is page-aligned so every 8-byte slot is aligned.
    unsafe { &mut *(shared.as_mut_ptr() as *mut f64).add(i) }
}

/// Forks a grandchild that runs `f` (writing results into `shared`) while this process
/// keeps the parent's side of every copy-on-write page alive. Returns fork()'s duration.
fn fork_and_wait(f: impl FnOnce()) -> f64 {
    let t0 = Instant::now();
    // SAFETY: the calling child is single-threaded; the grandchild runs `f` then exits.
    let pid = unsafe { libc::fork() };
    let fork_ns = ns_since(t0);
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        f();
        // SAFETY: ends the grandchild without unwinding into the parent's code.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "fork grandchild failed"
    );
    fork_ns
}

// ---------------------------------------------------------------------------------------

/// memsnap through its C ABI, as a host uses it: whole-process tracking, the heap from
/// AllocateMemory(Tracked). `env` is set before InitializeMemorySnapshots (backend or
/// granularity selection).
pub struct Memsnap {
    pub label: &'static str,
    pub env: &'static [(&'static str, &'static str)],
    /// Settings applied right after InitializeMemorySnapshots (memsnap_set_* calls).
    pub configure: fn(),
}

/// A tracked heap, committed, before the first snapshot; plus untracked scratch memory the
/// kernel may write into (reading /proc into tracked memory would fail with EFAULT).
struct Host {
    base: *mut u8,
    page: usize,
    scratch: &'static mut [u8],
}

fn stats() -> MemsnapStats {
    // SAFETY: MemsnapStats is plain data; zero is a valid value to fill in.
    let mut s: MemsnapStats = unsafe { std::mem::zeroed() };
    s.struct_size = std::mem::size_of::<MemsnapStats>();
    // SAFETY: a valid, writable record with struct_size set.
    let st = unsafe { memsnap_get_stats(&mut s) };
    assert_eq!(st, MemsnapStatus::Ok);
    s
}

fn backend_name(b: MemsnapBackend) -> &'static str {
    match b {
        MemsnapBackend::Inactive => "inactive",
        MemsnapBackend::LinuxMprotect => "mprotect+SIGSEGV",
        MemsnapBackend::MacExceptionPort => "mach-exception-port",
        MemsnapBackend::MacSignal => "mac-signal",
        MemsnapBackend::LinuxUffd => "uffd-wp",
        MemsnapBackend::LinuxUffdAsync => "uffd-wp-async",
    }
}

impl Memsnap {
    fn host(&self, heap: usize) -> Host {
        for (k, v) in self.env {
            std::env::set_var(k, v);
        }
        InitializeMemorySnapshots();
        (self.configure)();
        let page = memsnap_page_size();
        let base = AllocateMemory(heap, TRACKED) as *mut u8;
        // SAFETY: AllocateMemory returned `heap` bytes of readable, writable memory.
        child::touch(unsafe { std::slice::from_raw_parts_mut(base, heap) }, page);
        let len = 8 << 20;
        // SAFETY: as above, untracked.
        let scratch =
            unsafe { std::slice::from_raw_parts_mut(AllocateMemory(len, GENERIC) as *mut u8, len) };
        Host {
            base,
            page,
            scratch,
        }
    }

    /// Takes the first snapshot. Nothing is reported yet: the harness must not allocate
    /// between a checkpoint and a rewind to it (a rewound heap would not know the block),
    /// so workloads report [`describe`] at the end.
    fn first_snapshot(&self) -> MemsnapStats {
        TakeFirstMemorySnapshot();
        stats()
    }
}

fn describe(s: &MemsnapStats, r: &mut Report) {
    r.text("backend", backend_name(s.backend));
    r.num("page_size", s.page_size as f64);
    r.num("restore_threads", s.restore_threads as f64);
}

fn rewind_all(levels: usize) -> (f64, f64) {
    SetMemoryChangesAllowed(false);
    let t0 = Instant::now();
    RestoreMemoryToLastSavedCheckpoint();
    let last = ns_since(t0);
    for _ in 0..levels {
        RestoreMemoryToLastSavedDiffCheckpoint();
    }
    let all = ns_since(t0);
    SetMemoryChangesAllowed(true);
    FixupFreeRegionsAfterRewind();
    (last, all)
}

impl Mechanism for Memsnap {
    fn name(&self) -> String {
        self.label.to_string()
    }

    fn supports(&self, w: &Workload) -> bool {
        !matches!(w, Workload::PageCopy)
    }

    fn run(&self, w: &Workload, shared: &mut [u8], r: &mut Report) {
        match *w {
            Workload::FirstWrite {
                heap,
                order,
                threads,
                cap,
            } => {
                let h = self.host(heap);
                let offsets = first_write_offsets(heap, h.page, order, cap);
                let base = h.base as usize;
                let first = self.first_snapshot();
                let before = stats().faults_handled;
                let (ns, cpu) =
                    child::timed_threads(threads, |t| write_split(base, &offsets, threads, t));
                let faults = stats().faults_handled - before;
                describe(&first, r);
                r.num("ns_per_page", ns / offsets.len() as f64);
                r.num("cpu_ns_per_page", cpu / offsets.len() as f64);
                r.num("pages", offsets.len() as f64);
                // More faults than pages: the harness's own writes (thread creation) count.
                r.num("faults", faults as f64);
                r.num("maps_after", child::map_count(h.scratch) as f64);
            }
            Workload::Checkpoint { heap, fraction } => {
                let h = self.host(heap);
                let offsets = subset_offsets(heap, h.page, fraction, SEED);
                let first = self.first_snapshot();
                // The fixed cost: checkpoints with (almost) nothing dirty; the first one
                // after TakeFirstMemorySnapshot may still see the harness's own writes.
                let mut fixed = f64::INFINITY;
                for _ in 0..3 {
                    let t0 = Instant::now();
                    TakeDiffMemorySnapshot();
                    fixed = fixed.min(ns_since(t0));
                }
                let rss0 = child::status_bytes(h.scratch, "VmRSS");
                let copies0 = stats().copy_bytes;
                let write_ns = write_all(h.base, &offsets);
                let maps = child::map_count(h.scratch);
                let t0 = Instant::now();
                TakeDiffMemorySnapshot();
                let ckpt = ns_since(t0);
                let rss1 = child::status_bytes(h.scratch, "VmRSS");
                let s = stats();
                let k = offsets.len() as f64;
                describe(&first, r);
                r.num("fixed_ns", fixed)
                    .num("checkpoint_ns", ckpt)
                    .num("engine_snapshot_ns", s.last_snapshot_ns as f64)
                    .num("dirty_pages", k)
                    .num("write_ns_per_page", write_ns / k)
                    .num("cycle_ns_per_dirty_page", (write_ns + ckpt) / k)
                    .num("kept_bytes_per_dirty_page", (rss1 - rss0) / k)
                    .num(
                        "copy_bytes_per_dirty_page",
                        (s.copy_bytes - copies0) as f64 / k,
                    )
                    .num("saved_diff_bytes", s.saved_diff_bytes as f64)
                    .num("maps_before_checkpoint", maps as f64);
            }
            Workload::Restore {
                heap,
                fraction,
                levels,
            } => {
                let h = self.host(heap);
                let sets: Vec<Vec<usize>> = (0..=levels)
                    .map(|l| subset_offsets(heap, h.page, fraction, SEED + l as u64))
                    .collect();
                let first = self.first_snapshot();
                for set in &sets[..levels] {
                    write_all(h.base, set);
                    TakeDiffMemorySnapshot();
                }
                write_all(h.base, &sets[levels]);
                let (last, all) = rewind_all(levels);
                let pages: usize = sets.iter().map(|s| s.len()).sum();
                // Every restored page must hold its pre-checkpoint byte (touch wrote 1).
                let ok = sets
                    .iter()
                    .flatten()
                    // SAFETY: offsets inside the tracked heap.
                    .all(|&o| unsafe { *h.base.add(o) } == 1);
                describe(&first, r);
                r.num("restore_ns_per_page", all / pages as f64)
                    .num("restore_last_ns_per_page", last / sets[levels].len() as f64)
                    .num("restored_pages", pages as f64)
                    .num("restore_ns", all)
                    .num("verified", if ok { 1.0 } else { 0.0 });
            }
            Workload::Overhead { heap } => {
                let scratch = child::map_private(1 << 20);
                // The heap is committed before memsnap exists, so the RSS delta is the
                // library's own memory (tables, worker stacks, engine state).
                let base = child::map_private(heap);
                child::touch(base, child::os_page());
                let rss0 = child::status_bytes(scratch, "VmRSS");
                InitializeMemorySnapshots();
                (self.configure)();
                memsnap_untrack_region(scratch.as_mut_ptr() as *mut _, scratch.len());
                let first = self.first_snapshot();
                describe(&first, r);
                let rss1 = child::status_bytes(scratch, "VmRSS");
                let s = stats();
                let gib = s.tracked_bytes as f64 / (1u64 << 30) as f64;
                r.num("own_bytes", rss1 - rss0)
                    .num("tracked_bytes", s.tracked_bytes as f64)
                    .num("own_bytes_per_tracked_gib", (rss1 - rss0) / gib);
            }
            Workload::Maps { heap } => {
                let h = self.host(heap);
                let offsets = first_write_offsets(heap, h.page, Order::Random, None);
                let first = self.first_snapshot();
                describe(&first, r);
                r.flush();
                map_curve(h.base, h.scratch, &offsets, shared, r);
            }
            Workload::PageCopy => unreachable!(),
        }
    }
}

/// Writes `offsets` in order, recording in `shared` after every step: slot 0 = samples,
/// then (pages written, map count, ns per page over the step) triples. The parent reads
/// them even when the kernel's mapping limit kills the child halfway.
fn map_curve(base: *mut u8, buf: &mut [u8], offsets: &[usize], shared: &mut [u8], r: &mut Report) {
    let steps = 64usize;
    let step = offsets.len().div_ceil(steps);
    *shared_f64(shared, 0) = 0.0;
    let mut i = 0;
    let mut n = 0;
    while i < offsets.len() {
        let end = (i + step).min(offsets.len());
        let t0 = Instant::now();
        for &o in &offsets[i..end] {
            dirty(base, o);
        }
        let ns = ns_since(t0) / (end - i) as f64;
        i = end;
        let maps = child::map_count(buf);
        *shared_f64(shared, 1 + 3 * n) = i as f64;
        *shared_f64(shared, 2 + 3 * n) = maps as f64;
        *shared_f64(shared, 3 + 3 * n) = ns;
        n += 1;
        *shared_f64(shared, 0) = n as f64;
    }
    r.num("completed", 1.0);
}

// ---------------------------------------------------------------------------------------

/// fork() as the checkpoint: the kernel's copy-on-write. The child's first write per page
/// is the fault path; fork() itself is the checkpoint.
pub struct ForkCow;

impl Mechanism for ForkCow {
    fn name(&self) -> String {
        "fork-cow".into()
    }

    fn supports(&self, w: &Workload) -> bool {
        matches!(
            w,
            Workload::FirstWrite { .. } | Workload::Checkpoint { .. } | Workload::Maps { .. }
        )
    }

    fn run(&self, w: &Workload, shared: &mut [u8], r: &mut Report) {
        r.text("backend", "kernel");
        let page = child::os_page();
        let heap = w.heap();
        let mem = child::map_private(heap);
        child::touch(mem, page);
        let base = mem.as_mut_ptr() as usize;
        match *w {
            Workload::FirstWrite {
                order,
                threads,
                cap,
                ..
            } => {
                let offsets = first_write_offsets(heap, page, order, cap);
                fork_and_wait(|| {
                    let (ns, cpu) =
                        child::timed_threads(threads, |t| write_split(base, &offsets, threads, t));
                    *shared_f64(shared, 0) = ns;
                    *shared_f64(shared, 1) = cpu;
                });
                r.num("ns_per_page", *shared_f64(shared, 0) / offsets.len() as f64)
                    .num(
                        "cpu_ns_per_page",
                        *shared_f64(shared, 1) / offsets.len() as f64,
                    )
                    .num("pages", offsets.len() as f64);
            }
            Workload::Checkpoint { fraction, .. } => {
                let offsets = subset_offsets(heap, page, fraction, SEED);
                let fork_ns = fork_and_wait(|| {
                    let mut buf = [0u8; 8192];
                    *shared_f64(shared, 1) = child::status_bytes(&mut buf, "VmPTE");
                    *shared_f64(shared, 0) = write_all(base as *mut u8, &offsets);
                });
                let k = offsets.len() as f64;
                let write_ns = *shared_f64(shared, 0);
                r.num("checkpoint_ns", fork_ns)
                    .num("fixed_ns", fork_ns)
                    .num("dirty_pages", k)
                    .num("write_ns_per_page", write_ns / k)
                    .num("cycle_ns_per_dirty_page", (fork_ns + write_ns) / k)
                    .num("child_page_table_bytes", *shared_f64(shared, 1))
                    // The kernel copies exactly one page per first write.
                    .num("kept_bytes_per_dirty_page", page as f64);
            }
            Workload::Maps { .. } => {
                let offsets = first_write_offsets(heap, page, Order::Random, None);
                fork_and_wait(|| {
                    let buf = child::map_private(1 << 20);
                    let before = child::map_count(buf);
                    write_all(base as *mut u8, &offsets);
                    *shared_f64(shared, 0) = before as f64;
                    *shared_f64(shared, 1) = child::map_count(buf) as f64;
                });
                r.num("maps_before", *shared_f64(shared, 0))
                    .num("max_maps", *shared_f64(shared, 1))
                    .num("pages_written", offsets.len() as f64)
                    .num("completed", 1.0);
            }
            _ => unreachable!(),
        }
    }
}

// ---------------------------------------------------------------------------------------

/// A full copy of the heap as the checkpoint (memcpy into a second committed buffer), and
/// a full copy back as the restore.
pub struct FullCopy;

impl Mechanism for FullCopy {
    fn name(&self) -> String {
        "full-memcpy".into()
    }

    fn supports(&self, w: &Workload) -> bool {
        matches!(w, Workload::Checkpoint { .. } | Workload::Restore { .. })
    }

    fn run(&self, w: &Workload, _shared: &mut [u8], r: &mut Report) {
        r.text("backend", "user");
        let page = child::os_page();
        let heap = w.heap();
        let mem = child::map_private(heap);
        let copy = child::map_private(heap);
        child::touch(mem, page);
        child::touch(copy, page);
        match *w {
            Workload::Checkpoint { fraction, .. } => {
                let offsets = subset_offsets(heap, page, fraction, SEED);
                let t0 = Instant::now();
                copy.copy_from_slice(mem);
                let ckpt = ns_since(t0);
                let write_ns = write_all(mem.as_mut_ptr(), &offsets);
                let k = offsets.len() as f64;
                r.num("checkpoint_ns", ckpt)
                    .num("fixed_ns", ckpt)
                    .num("dirty_pages", k)
                    .num("write_ns_per_page", write_ns / k)
                    .num("cycle_ns_per_dirty_page", (ckpt + write_ns) / k)
                    .num("kept_bytes_per_dirty_page", heap as f64 / k);
            }
            Workload::Restore {
                fraction, levels, ..
            } => {
                let pages: usize = (0..=levels)
                    .map(|l| subset_offsets(heap, page, fraction, SEED + l as u64).len())
                    .sum();
                // Any checkpoint is one copy away, however many levels back.
                let t0 = Instant::now();
                mem.copy_from_slice(copy);
                let ns = ns_since(t0);
                r.num("restore_ns_per_page", ns / pages as f64)
                    .num("restore_ns", ns)
                    .num("restored_pages", pages as f64);
            }
            _ => unreachable!(),
        }
    }
}

// ---------------------------------------------------------------------------------------

/// The floor for an mprotect-based restore: per dirty page, a memcpy from a saved copy and
/// one mprotect back to read-only, on the same layout memsnap restores (a read-only heap
/// with the dirty pages writable). Single-threaded.
pub struct CopyProtect;

impl Mechanism for CopyProtect {
    fn name(&self) -> String {
        "memcpy+mprotect".into()
    }

    fn supports(&self, w: &Workload) -> bool {
        matches!(w, Workload::Restore { levels: 0, .. })
    }

    fn run(&self, w: &Workload, _shared: &mut [u8], r: &mut Report) {
        r.text("backend", "user");
        let Workload::Restore { heap, fraction, .. } = *w else {
            unreachable!()
        };
        let page = child::os_page();
        let mem = child::map_private(heap);
        child::touch(mem, page);
        let offsets = subset_offsets(heap, page, fraction, SEED);
        let saved = child::map_private(offsets.len() * page);
        child::touch(saved, page);
        let base = mem.as_mut_ptr() as usize;
        // SAFETY (all three blocks): protection changes and copies on this child's own
        // mapping, page-aligned and in bounds.
        unsafe {
            libc::mprotect(base as *mut _, heap, libc::PROT_READ);
            for &o in &offsets {
                libc::mprotect(
                    (base + o) as *mut _,
                    page,
                    libc::PROT_READ | libc::PROT_WRITE,
                );
            }
        }
        let t0 = Instant::now();
        for (i, &o) in offsets.iter().enumerate() {
            // SAFETY: `saved` holds one page per offset; each target page is inside the
            // mapping and was made writable above.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    saved.as_ptr().add(i * page),
                    (base + o) as *mut u8,
                    page,
                );
                libc::mprotect((base + o) as *mut _, page, libc::PROT_READ);
            }
        }
        let ns = ns_since(t0);
        r.num("restore_ns_per_page", ns / offsets.len() as f64)
            .num("restored_pages", offsets.len() as f64);
    }
}

/// A raw 4 KiB (one OS page) memcpy: pages of a 64 MiB buffer in random order (caches
/// mostly cold), and one page copied over and over (hot).
pub struct RawCopy;

impl Mechanism for RawCopy {
    fn name(&self) -> String {
        "memcpy-page".into()
    }

    fn supports(&self, w: &Workload) -> bool {
        matches!(w, Workload::PageCopy)
    }

    fn run(&self, w: &Workload, _shared: &mut [u8], r: &mut Report) {
        r.text("backend", "user");
        let page = child::os_page();
        let heap = w.heap();
        let src = child::map_private(heap);
        let dst = child::map_private(heap);
        child::touch(src, page);
        child::touch(dst, page);
        let order = child::permutation(heap / page, SEED);
        let t0 = Instant::now();
        for (i, &p) in order.iter().enumerate() {
            dst[i * page..(i + 1) * page].copy_from_slice(&src[p * page..(p + 1) * page]);
        }
        let random = ns_since(t0) / order.len() as f64;
        let n = 100_000;
        let t0 = Instant::now();
        for _ in 0..n {
            // black_box keeps the repeated copies from being folded into one.
            std::hint::black_box(&mut dst[..page])
                .copy_from_slice(std::hint::black_box(&src[..page]));
        }
        let hot = ns_since(t0) / n as f64;
        r.num("ns_per_page_random", random)
            .num("ns_per_page_hot", hot)
            .num("page_size", page as f64);
    }
}
