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
    /// Why this mechanism cannot run on this machine, if it cannot. Called in a child, so
    /// probing leaves the parent as it was.
    fn unavailable(&self) -> Option<String> {
        None
    }
}

/// The memsnap backends' own workloads, and the sync backend's wake-up study.
fn memsnap_workloads(w: &Workload) -> bool {
    !matches!(w, Workload::PageCopy | Workload::Wakeup { .. })
}
fn uffd_workloads(w: &Workload) -> bool {
    !matches!(w, Workload::PageCopy)
}
fn wakeup_only(w: &Workload) -> bool {
    matches!(w, Workload::Wakeup { .. })
}

pub fn all() -> Vec<Box<dyn Mechanism>> {
    vec![
        Box::new(Memsnap {
            label: "memsnap",
            backend: MemsnapBackendRequest::Mprotect,
            env: &[],
            configure: || {},
            workloads: memsnap_workloads,
        }),
        Box::new(Memsnap {
            label: "memsnap-uffd",
            backend: MemsnapBackendRequest::Uffd,
            env: &[],
            configure: || {},
            workloads: uffd_workloads,
        }),
        // The sync backend with a fault server that sleeps after every message: each
        // fault pays a full wake-up.
        Box::new(Memsnap {
            label: "memsnap-uffd-spin0",
            backend: MemsnapBackendRequest::Uffd,
            env: &[("MEMSNAP_UFFD_SPIN_US", "0")],
            configure: || {},
            workloads: wakeup_only,
        }),
        Box::new(Memsnap {
            label: "memsnap-uffd-async",
            backend: MemsnapBackendRequest::UffdAsync,
            env: &[],
            configure: || {},
            workloads: memsnap_workloads,
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
/// AllocateMemory(Tracked). `backend` is asked for with memsnap_set_backend and `env` is
/// set before InitializeMemorySnapshots (settings with no API, such as the fault
/// server's spin).
pub struct Memsnap {
    pub label: &'static str,
    pub backend: MemsnapBackendRequest,
    pub env: &'static [(&'static str, &'static str)],
    /// Settings applied right after InitializeMemorySnapshots (memsnap_set_* calls).
    pub configure: fn(),
    pub workloads: fn(&Workload) -> bool,
}

/// A tracked heap, committed, before the first snapshot; plus untracked scratch memory the
/// kernel may write into (reading /proc into tracked memory would fail with EFAULT).
struct Host {
    base: *mut u8,
    page: usize,
    scratch: &'static mut [u8],
}

pub fn stats() -> MemsnapStats {
    // SAFETY: MemsnapStats is plain data; zero is a valid value to fill in.
    let mut s: MemsnapStats = unsafe { std::mem::zeroed() };
    s.struct_size = std::mem::size_of::<MemsnapStats>();
    // SAFETY: a valid, writable record with struct_size set.
    let st = unsafe { memsnap_get_stats(&mut s) };
    assert_eq!(st, MemsnapStatus::Ok);
    s
}

pub fn backend_name(b: MemsnapBackend) -> &'static str {
    match b {
        MemsnapBackend::Inactive => "inactive",
        MemsnapBackend::LinuxMprotect => "mprotect+SIGSEGV",
        MemsnapBackend::MacExceptionPort => "mach-exception-port",
        MemsnapBackend::MacSignal => "mac-signal",
        MemsnapBackend::LinuxUffd => "uffd-wp",
        MemsnapBackend::LinuxUffdAsync => "uffd-wp-async",
    }
}

fn backend_choice(b: MemsnapBackendRequest) -> memsnap::engine::BackendChoice {
    use memsnap::engine::BackendChoice;
    match b {
        MemsnapBackendRequest::Auto => BackendChoice::Auto,
        MemsnapBackendRequest::Mprotect => BackendChoice::Mprotect,
        MemsnapBackendRequest::Uffd => BackendChoice::Uffd,
        MemsnapBackendRequest::UffdAsync => BackendChoice::UffdAsync,
    }
}

/// Binds the calling thread (the whole process, as long as it has only this one) to the
/// CPU it is running on, so that threads it creates later inherit that single CPU.
#[cfg(target_os = "linux")]
fn pin_to_current_cpu() -> i32 {
    // SAFETY: sched_getcpu has no preconditions; the cpu_set_t is zeroed, then filled by
    // CPU_SET with an index the kernel just returned, and passed with its own size.
    unsafe {
        let cpu = libc::sched_getcpu().max(0);
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity failed");
        cpu
    }
}

/// macOS has no CPU affinity to set (only hints); the pinned variants run unpinned there.
#[cfg(not(target_os = "linux"))]
fn pin_to_current_cpu() -> i32 {
    -1
}

impl Memsnap {
    /// Selects the backend and initializes memsnap. `false` (with `#unavailable` reported)
    /// when this machine cannot provide the backend.
    fn init(&self, r: &mut Report) -> bool {
        for (k, v) in self.env {
            std::env::set_var(k, v);
        }
        let st = memsnap_set_backend(MemsnapBackendRequestArg(self.backend as libc::c_int));
        if st != MemsnapStatus::Ok {
            let why = memsnap::engine::backend_unavailable(backend_choice(self.backend))
                .unwrap_or("memsnap_set_backend refused it");
            r.text("unavailable", why);
            return false;
        }
        InitializeMemorySnapshots();
        (self.configure)();
        true
    }

    /// The tracked heap, after [`Memsnap::init`].
    fn host(&self, heap: usize) -> Host {
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
    r.num("uffd_tracked_bytes", s.uffd_tracked_bytes as f64);
    r.num("base_copy_bytes", s.base_copy_bytes as f64);
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
        (self.workloads)(w)
    }

    fn unavailable(&self) -> Option<String> {
        memsnap::engine::backend_unavailable(backend_choice(self.backend)).map(String::from)
    }

    fn run(&self, w: &Workload, shared: &mut [u8], r: &mut Report) {
        if let Workload::Wakeup { pinned: true, .. } = w {
            // Before initialization: the fault server, created at the first snapshot,
            // inherits the single CPU.
            r.num("pinned_cpu", pin_to_current_cpu() as f64);
        }
        // The overhead workload measures initialization too, so it initializes itself.
        if !matches!(w, Workload::Overhead { .. }) && !self.init(r) {
            return;
        }
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
                if !self.init(r) {
                    return;
                }
                memsnap_untrack_region(scratch.as_mut_ptr() as *mut _, scratch.len());
                let first = self.first_snapshot();
                describe(&first, r);
                let rss1 = child::status_bytes(scratch, "VmRSS");
                let s = stats();
                let gib = s.tracked_bytes as f64 / (1u64 << 30) as f64;
                // uffd-async's base copy is a copy of the tracked heap, counted in own_bytes.
                r.num("own_bytes", rss1 - rss0)
                    .num(
                        "own_bytes_less_base_copy",
                        rss1 - rss0 - s.base_copy_bytes as f64,
                    )
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
            Workload::Cycle { heap, fraction } => {
                let h = self.host(heap);
                let sets = cycle_sets(heap, h.page, fraction);
                let k: usize = sets.iter().map(|s| s.len()).sum();
                let page = h.page;
                // The kernel writes one page of the heap in read(2), outside the timed
                // cycles: a page no cycle writes, so its restore is checked on its own.
                let probe = (0..heap / page)
                    .map(|p| p * page)
                    .find(|o| sets.iter().all(|s| !s.contains(o)))
                    .expect("a page outside the cycles");
                let fds = pipe_with(b"memsnap!");
                let first = self.first_snapshot();
                // C1: the harness's own writes since the first snapshot land in this one.
                TakeDiffMemorySnapshot();
                let (mut write, mut ckpt, mut total) = (0.0, 0.0, 0.0);
                let mut ok = true;
                for set in &sets {
                    let t0 = Instant::now();
                    for &o in set {
                        dirty(h.base, o);
                    }
                    let w = ns_since(t0);
                    TakeDiffMemorySnapshot();
                    let c = ns_since(t0);
                    rewind_all(1);
                    let t = ns_since(t0);
                    write += w;
                    ckpt += c - w;
                    total += t;
                    // SAFETY: offsets inside the tracked heap; touch wrote 1 at each.
                    ok &= set.iter().all(|&o| unsafe { *h.base.add(o) } == 1);
                }
                let before = stats();
                // SAFETY: reading 8 bytes into the tracked heap at an in-bounds offset
                // (the page is at least 8 bytes); the pipe holds exactly those bytes.
                let n = unsafe { libc::read(fds.0, h.base.add(probe) as *mut _, 8) };
                let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
                // SAFETY: the 8 bytes just read (or left alone) inside the heap.
                let got = unsafe { std::slice::from_raw_parts(h.base.add(probe), 8) };
                let read_ok = n == 8 && got == b"memsnap!";
                TakeDiffMemorySnapshot();
                rewind_all(1);
                // SAFETY: as above; touch wrote 1 then zeros.
                let back = unsafe { std::slice::from_raw_parts(h.base.add(probe), 8) };
                let read_restored = back == [1, 0, 0, 0, 0, 0, 0, 0];
                let s = stats();
                describe(&first, r);
                let kf = k as f64;
                r.num("cycle_ns_per_dirty_page", total / kf)
                    .num("write_ns_per_page", write / kf)
                    .num("checkpoint_ns_per_page", ckpt / kf)
                    .num("restore_ns_per_page", (total - write - ckpt) / kf)
                    .num("dirty_pages", (k / sets.len()) as f64)
                    .num("cycles", sets.len() as f64)
                    .num("verified", if ok && read_restored { 1.0 } else { 0.0 })
                    .num("read_into_tracked", if read_ok { 1.0 } else { 0.0 })
                    .num("read_errno", if n == 8 { 0.0 } else { errno as f64 })
                    .num(
                        "read_faults",
                        (s.faults_handled - before.faults_handled) as f64,
                    );
            }
            Workload::Wakeup { heap, pages, .. } => {
                let h = self.host(heap);
                let offsets = first_write_offsets(heap, h.page, Order::Random, Some(pages));
                let first = self.first_snapshot();
                let before = stats();
                let base = h.base as usize;
                let (ns, cpu) = child::timed_threads(1, |t| write_split(base, &offsets, 1, t));
                let s = stats();
                let faults = (s.faults_handled - before.faults_handled).max(1) as f64;
                describe(&first, r);
                r.num("ns_per_page", ns / offsets.len() as f64)
                    .num("cpu_ns_per_page", cpu / offsets.len() as f64)
                    .num("faults", faults)
                    .num(
                        "wakeups_per_fault",
                        (s.uffd_server_wakeups - before.uffd_server_wakeups) as f64 / faults,
                    )
                    .num(
                        "spin_hits_per_fault",
                        (s.uffd_spin_hits - before.uffd_spin_hits) as f64 / faults,
                    );
            }
            Workload::Sparse {
                heap,
                fraction,
                words,
            } => {
                let h = self.host(heap);
                let first = self.first_snapshot();
                sparse_write(&h, heap, fraction, words, &first, r);
            }
            Workload::PageCopy => unreachable!(),
        }
    }
}

/// The cycle workload's page sets: `CYCLES` independent random subsets of `fraction` of
/// the heap's pages, each in random write order, as byte offsets.
const CYCLES: u64 = 3;
fn cycle_sets(heap: usize, page: usize, fraction: f64) -> Vec<Vec<usize>> {
    let pages = heap / page;
    let k = ((pages as f64 * fraction).round() as usize).max(1);
    (0..CYCLES)
        .map(|c| {
            let mut v = child::permutation(pages, SEED + 100 + c);
            v.truncate(k);
            v.iter().map(|p| p * page).collect()
        })
        .collect()
}

/// A pipe holding `bytes`, for a read(2) into tracked memory: (read end, write end).
fn pipe_with(bytes: &[u8]) -> (i32, i32) {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-element array; writing a live buffer to our own pipe
    // (far below the pipe's capacity, so it does not block).
    unsafe {
        assert_eq!(libc::pipe(fds.as_mut_ptr()), 0, "pipe failed");
        let n = libc::write(fds[1], bytes.as_ptr() as *const _, bytes.len());
        assert_eq!(n, bytes.len() as isize);
    }
    (fds[0], fds[1])
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
            Workload::FirstWrite { .. }
                | Workload::Checkpoint { .. }
                | Workload::Maps { .. }
                | Workload::Cycle { .. }
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
            Workload::Cycle { fraction, .. } => {
                // The same page sets as memsnap's cycles: fork() is the checkpoint, the
                // child's first writes the interval, its exit (and our wait) the rewind.
                let sets = cycle_sets(heap, page, fraction);
                let k: usize = sets.iter().map(|s| s.len()).sum();
                let (mut write, mut total) = (0.0, 0.0);
                for set in &sets {
                    let t0 = Instant::now();
                    fork_and_wait(|| {
                        *shared_f64(shared, 0) = write_all(base as *mut u8, set);
                    });
                    total += ns_since(t0);
                    write += *shared_f64(shared, 0);
                }
                let kf = k as f64;
                r.num("cycle_ns_per_dirty_page", total / kf)
                    .num("write_ns_per_page", write / kf)
                    .num("dirty_pages", (k / sets.len()) as f64)
                    .num("cycles", sets.len() as f64);
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
        // SAFETY: protection changes and copies on this child's own mapping,
        // page-aligned and in bounds (the same holds for the two blocks below).
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

// ---------------------------------------------------------------------------------------

/// The sparse-write workload under memsnap: from a diff checkpoint C1, `words` random
/// words written in each page of a random subset, checkpoint C2 (timed; the bytes its
/// pre-images keep come from memsnap_get_stats), then the rewind to C1 (timed), checked
/// against a hash of the heap taken at C1.
fn sparse_write(
    h: &Host,
    heap: usize,
    fraction: f64,
    words: usize,
    first: &MemsnapStats,
    r: &mut Report,
) {
    let offsets = subset_offsets(heap, h.page, fraction, SEED + 7);
    // Word offsets inside each page, chosen up front: the harness must not allocate
    // between a checkpoint and the rewind to it.
    let mut x = SEED | 1;
    let picks: Vec<usize> = (0..offsets.len() * words)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x as usize % (h.page / 8)) * 8
        })
        .collect();
    TakeDiffMemorySnapshot();
    let hash = |base: *const u8| {
        // SAFETY: the heap is `heap` readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(base, heap) };
        bytes
            .chunks_exact(8)
            .fold(0xcbf2_9ce4_8422_2325u64, |a, w| {
                (a ^ u64::from_ne_bytes(w.try_into().unwrap())).wrapping_mul(0x0100_0000_01b3)
            })
    };
    let before = hash(h.base);
    let s0 = stats();
    let t0 = Instant::now();
    for (i, &o) in offsets.iter().enumerate() {
        for &w in &picks[i * words..(i + 1) * words] {
            // SAFETY: an aligned word inside a page of the tracked heap.
            unsafe {
                let p = h.base.add(o + w) as *mut u64;
                std::ptr::write_volatile(p, std::ptr::read_volatile(p) ^ x.wrapping_add(w as u64));
            }
        }
    }
    let write = ns_since(t0);
    let t1 = Instant::now();
    TakeDiffMemorySnapshot();
    let ckpt = ns_since(t1);
    let s1 = stats();
    let (_, rewind) = rewind_all(1);
    let ok = hash(h.base) == before;
    let k = offsets.len() as f64;
    describe(first, r);
    r.num("dirty_pages", k)
        .num("write_ns_per_page", write / k)
        .num("checkpoint_ns", ckpt)
        .num("checkpoint_ns_per_page", ckpt / k)
        .num(
            "kept_bytes_per_dirty_page",
            (s1.saved_kept_bytes - s0.saved_kept_bytes) as f64 / k,
        )
        .num(
            "delta_pages",
            (s1.saved_delta_pages - s0.saved_delta_pages) as f64,
        )
        .num("restore_ns_per_page", rewind / k)
        .num("verified", if ok { 1.0 } else { 0.0 });
}
