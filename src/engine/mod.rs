//! The snapshot engine: everything between the C ABI and the platform boundary.
//!
//! The engine owns one [`Engine`] value, placed in memory the library maps for itself, and
//! drives the lifecycle `initialized -> first snapshot -> (diff | rewind)*`. It makes no
//! system calls of its own: protection, the region walk, threads and fault capture go
//! through [`crate::sys`]. Its pure parts (range sets, the free set, diff folding) live in
//! submodules with no platform dependency and are unit-tested on plain vectors.
//!
//! Concurrency model, in one paragraph: the fault handler touches only the page-state
//! table, the slot pool and the dirty log, all lock-free. Everything else (regions, diffs,
//! checkpoints, free sets) sits behind one `spin::Mutex` the handler never takes. While
//! memory changes are disallowed no handler is in flight (`set_allowed(false)` waits for the
//! in-flight count to drain and new faults wait at the door), which is what lets the
//! controller thread rewrite the page table and consume the dirty log without races.

pub mod delta;
pub mod dirty;
pub mod free;
pub mod granule;
pub mod ranges;

mod alloc;
mod backend;
mod budget;
mod config;
mod countdown;
mod counters;
mod eager;
mod exclusions;
mod fault;
mod fork;
mod gate;
pub mod host;
mod init;
mod lifecycle;
mod pages;
mod preimage;
mod readonly;
mod scan;
mod stats;
mod verify;
mod workers;

use core::sync::atomic::{AtomicBool, AtomicIsize, AtomicPtr, AtomicU32, AtomicUsize, Ordering};

use crate::mem::{DirtyLog, PageTable, RawVec, Reservation, SlotPool};
use dirty::DiffEntry;
use ranges::{Range, RangeSet};

pub use backend::{unavailable as backend_unavailable, Backend, BackendChoice};
pub use config::{
    check_page_size, parse_bytes, request_backend, request_memory_budget, request_page_size,
};
pub use counters::Counters;
pub use exclusions::{Exclusion, Reason as ExclusionReason};
pub use stats::Stats;
pub use workers::Workers;

/// Number of `MemoryKind` values the balance counters cover.
pub const MEMORY_KINDS: usize = 9;
/// `MemoryKind::Tracked`.
pub const KIND_TRACKED: usize = 0;
/// Number of timer kinds (`TimerKind::Count`).
pub const TIMER_KINDS: usize = 1;

/// The largest user address the page table covers.
#[cfg(target_arch = "x86_64")]
pub(super) const ADDRESS_LIMIT: usize = 1 << 47;
#[cfg(not(target_arch = "x86_64"))]
pub(super) const ADDRESS_LIMIT: usize = 1 << 48;

/// How much of the process the first snapshot tracks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Every private writable mapping, minus stacks, library memory and registered
    /// exclusions (the original's behaviour).
    WholeProcess,
    /// Only ranges registered with `AddInitialTrackedMemoryRegions`,
    /// `RegisterAllocatedMemory(Tracked)` or `AllocateMemory(Tracked)`.
    Registered,
}

/// The lifecycle phase.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Phase {
    Initialized = 0,
    Armed = 1,
    Failed = 2,
}

/// A tracked region: memory whose pages are write-protected at every checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct TrackedRegion {
    pub range: Range,
    pub exec: bool,
    /// Position in the checkpoint stack at which the region became tracked; a region
    /// registered while running after checkpoint `k` is born at `k + 1`.
    pub born: usize,
    /// Obtained through `AllocateMemory`/`RegisterAllocatedMemory(Tracked)`: such regions
    /// stay tracked forever and return to the free set after a rewind (the original's
    /// rule); regions found by the region walk are untracked and zeroed instead.
    pub allocated: bool,
    /// Guarded by userfaultfd rather than mprotect (see `backend`).
    pub uffd: bool,
}

/// One saved checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Checkpoint {
    /// Where this checkpoint's diff sits in the diff stack (empty for the newest).
    pub diff_start: usize,
    pub diff_len: usize,
    /// Where this checkpoint's deltas start in the delta stack (see `preimage`).
    pub delta_start: usize,
    /// The tracked free set as it was at this checkpoint.
    pub free_start: usize,
    pub free_len: usize,
    /// How many allocated tracked regions existed at this checkpoint.
    pub allocated: usize,
    /// The other threads alive at this checkpoint (count and a hash of their ids) and the
    /// CPU time of threads that had exited, in whole-process mode; `None` where no thread
    /// probe ran.
    pub threads: Option<(usize, u64, (i64, i64))>,
    /// The program break at this checkpoint, in whole-process mode (0 otherwise): glibc's
    /// record of it is in rewound memory, the kernel's is not, so a rewind lowers the
    /// kernel's back to it.
    pub brk: usize,
    /// Where this checkpoint's copies of the eager pages sit in the copy stack
    /// (`Meta::eager_pages`, see `exclusions`).
    pub eager_start: usize,
    pub eager_len: usize,
}

/// Why rewinding before some checkpoint has become impossible.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Floor {
    /// Rewinds to positions below this one are refused.
    pub position: usize,
    pub range: Range,
    pub what: FloorReason,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum FloorReason {
    #[default]
    None,
    Unmapped,
    Unprotected,
    /// A fork child under userfaultfd: the checkpoints it inherited predate writes it made
    /// before memsnap's fork handler re-armed its memory (see `fork`).
    Forked,
}

/// The state behind the metadata lock.
pub struct Meta {
    /// Memory this library mapped for itself.
    own: RawVec<Range>,
    /// Memory the host declared untracked.
    untracked: RawVec<Range>,
    /// Ranges registered for tracking before the first snapshot.
    registered: RawVec<TrackedRegion>,
    /// Tracked regions, sorted and disjoint.
    regions: RawVec<TrackedRegion>,
    /// Allocated tracked regions, in allocation order.
    allocated: RawVec<Range>,
    /// The tracked free set (sorted, coalesced).
    free: RawVec<Range>,
    checkpoints: RawVec<Checkpoint>,
    diffs: RawVec<DiffEntry>,
    /// The saved diffs' deltas, a stack like theirs (see `preimage`).
    deltas: RawVec<u8>,
    free_snapshots: RawVec<Range>,
    /// Thread stacks found by the last walk: `(tid, range)`.
    stacks: RawVec<(u64, Range)>,
    vmas: RawVec<crate::sys::Region>,
    /// Every range the last scan left out, with its reason (see `exclusions`).
    exclusions: RawVec<exclusions::Exclusion>,
    /// Their union, exact to the byte.
    exact: RawVec<Range>,
    /// Writable pages that exclusions cover only partly (sorted): copied at every
    /// checkpoint instead of write-protected.
    eager: RawVec<usize>,
    /// The eager pages saved by every checkpoint, a stack like the diffs, and their bytes
    /// (one kernel page each, in the same order).
    eager_pages: RawVec<usize>,
    eager_bytes: RawVec<u8>,
    /// The host's protection of tracked memory where it lacks write, and every change
    /// of it since the oldest checkpoint (see `host`); `opened`: views a checkpoint or
    /// rewind made accessible for its duration.
    views: RawVec<host::View>,
    /// Read-only anonymous memory nobody tracks, with the checkpoint since which it has
    /// been there (see `readonly`); `read_only_next` is the scan's scratch for it.
    read_only: RawVec<readonly::ReadOnly>,
    read_only_next: RawVec<readonly::ReadOnly>,
    journal: RawVec<host::Change>,
    opened: RawVec<Range>,
    floor: Floor,
    /// The disallow scope whose rewind already reconciled the mappings.
    rewind_scanned_scope: u64,
    /// Working space of the scan, snapshot and restore paths (see [`Scratch`]).
    scratch: Scratch,
}

/// Working space the snapshot, scan and restore paths reuse instead of allocating.
pub struct Scratch {
    bytes: RawVec<u8>,
    work: RawVec<Range>,
    work2: RawVec<Range>,
    /// A restore's pages, sorted.
    entries: RawVec<DiffEntry>,
    /// Stack pointers of other threads, then their stack ranges (scan scratch).
    sps: RawVec<(u64, Range)>,
    /// Regions found by a scan, before they are applied (scan scratch).
    found: RawVec<TrackedRegion>,
    /// glibc's thread descriptors (scan scratch).
    blocks: RawVec<crate::sys::ThreadBlock>,
}

/// The one engine of the process.
pub struct Engine {
    /// Page sizes, mode and the other settings (see `config`).
    pub settings: config::Settings,
    table: PageTable,
    /// Which kernel pages of each partly tracked unit are tracked; only when
    /// `page > sub`.
    masks: Option<PageTable>,
    pool: SlotPool,
    log: DirtyLog,
    workers: Workers,
    meta: spin::Mutex<Meta>,

    phase: AtomicU32,
    /// Whether memory changes are allowed, and who controls the snapshots.
    gate: gate::Gate,

    /// Single-page captures left before the fault handler switches to capturing whole
    /// blocks, which keeps the mapping count bounded (see `fault`).
    map_budget: AtomicIsize,
    /// Where the last capture's writable run ended, and how many units it took: a fault
    /// right there is a sequential writer's (see `fault`).
    ahead_next: AtomicUsize,
    ahead_units: AtomicUsize,
    balance: [AtomicIsize; MEMORY_KINDS],
    /// Event counters and timers (see `counters`).
    counters: counters::CounterCells,
    pub countdown: AtomicUsize,
    /// The span of `Meta::read_only`, `[lo, hi)`, for host calls to check without the lock.
    read_only_span: [AtomicUsize; 2],
    countdown_started: AtomicBool,
    /// The write-tracking backend's state (see `backend`).
    pub backend: backend::BackendState,
    /// The verifying mode's switch and page hashes.
    pub verify: verify::Verify,
}

static ENGINE: AtomicPtr<Engine> = AtomicPtr::new(core::ptr::null_mut());

/// The engine, if `InitializeMemorySnapshots` has run.
pub fn get() -> Option<&'static Engine> {
    let p = ENGINE.load(Ordering::Acquire);
    // SAFETY: ENGINE is set once to a leaked, never-freed Engine.
    (!p.is_null()).then(|| unsafe { &*p })
}

/// The engine, or a fatal misuse report naming `function`.
pub fn expect(function: &str) -> &'static Engine {
    match get() {
        Some(e) => e,
        None => crate::fatal!(function, "called before InitializeMemorySnapshots"),
    }
}

impl Engine {
    /// Binds the host's lazy PLT slots that name memsnap's functions, in objects loaded
    /// since the last call: ld.so's resolver, run by a first call inside a disallow scope,
    /// would write tracked memory (its own data and the caller's GOT). Only while memory
    /// changes are allowed.
    fn bind_exports(&self, function: &str) {
        if let Err(why) = crate::sys::bind_exports() {
            crate::fatal!(function, "{}", why);
        }
    }

    pub fn phase(&self) -> Phase {
        match self.phase.load(Ordering::Acquire) {
            0 => Phase::Initialized,
            1 => Phase::Armed,
            _ => Phase::Failed,
        }
    }

    fn set_phase(&self, p: Phase) {
        self.phase.store(p as u32, Ordering::Release);
    }

    pub fn armed(&self) -> bool {
        self.phase() == Phase::Armed
    }

    pub fn mode(&self) -> Mode {
        if self.settings.mode.load(Ordering::Relaxed) == 0 {
            Mode::WholeProcess
        } else {
            Mode::Registered
        }
    }

    /// Settings may change only before the first snapshot.
    pub fn set_mode(&self, mode: Mode) -> bool {
        if self.phase() != Phase::Initialized {
            return false;
        }
        self.settings.mode.store(
            match mode {
                Mode::WholeProcess => 0,
                Mode::Registered => 1,
            },
            Ordering::Relaxed,
        );
        self.apply_pin();
        true
    }

    pub fn set_restore_threads(&self, n: usize) -> bool {
        if self.phase() != Phase::Initialized || n > 64 {
            return false;
        }
        self.settings.restore_threads.store(n, Ordering::Relaxed);
        true
    }

    pub fn restore_threads(&self) -> usize {
        self.settings.restore_threads.load(Ordering::Relaxed)
    }

    pub fn set_pin_allocator(&self, on: bool) -> bool {
        if self.phase() != Phase::Initialized {
            return false;
        }
        self.settings.pin_allocator.store(on, Ordering::Relaxed);
        self.apply_pin();
        true
    }

    /// Pins glibc malloc in whole-process mode unless the host opted out.
    fn apply_pin(&self) {
        crate::sys::pin_allocator(
            self.mode() == Mode::WholeProcess
                && self.settings.pin_allocator.load(Ordering::Relaxed),
        );
    }

    /// The snapshot page containing `addr`.
    pub fn page_base(&self, addr: usize) -> usize {
        addr & !(self.settings.page - 1)
    }

    /// Whether `addr` is aligned to the kernel page, the alignment the host's own
    /// mappings have (and all the original asks of addresses it is given).
    pub fn is_aligned(&self, addr: usize) -> bool {
        addr & (self.settings.sub - 1) == 0
    }

    /// Rounds `size` up to whole pages; `None` on overflow.
    pub fn round_pages(&self, size: usize) -> Option<usize> {
        crate::mem::round_up(size, self.settings.page)
    }

    /// The checking done by every snapshot or restore call: the caller must be the thread
    /// that took the first snapshot (in a forked child, its only thread takes over).
    fn check_controller(&self, function: &str) {
        let me = crate::sys::tid();
        let pid = crate::sys::pid();
        if self.gate.owner_pid.load(Ordering::Relaxed) != pid {
            self.gate.owner_pid.store(pid, Ordering::Relaxed);
            self.gate.controller.store(me, Ordering::Relaxed);
            return;
        }
        let c = self.gate.controller.load(Ordering::Relaxed);
        if c != 0 && c != me {
            crate::fatal!(
                function,
                "must be called on the thread that took the first snapshot (thread {}), not thread {}",
                c,
                me
            );
        }
    }

    /// Whether restore work may be handed to the worker threads (they do not survive fork).
    fn workers_usable(&self) -> bool {
        self.gate.owner_pid.load(Ordering::Relaxed) == self.workers.pid()
    }
}

impl Meta {
    pub fn add_own(&mut self, r: Reservation) {
        if !RangeSet::insert(&mut self.own, Range::new(r.base, r.base + r.len)) {
            crate::fatal!("memsnap", "out of room for library memory ranges");
        }
    }

    /// Memory the region walk must never track: the library's own and the host's untracked.
    pub fn excluded(&self, addr: usize) -> bool {
        RangeSet::contains(&self.own, addr) || RangeSet::contains(&self.untracked, addr)
    }

    /// The index of the region containing `addr`.
    pub fn region_index(&self, addr: usize) -> Option<usize> {
        let i = self.regions.partition_point(|r| r.range.end <= addr);
        (i < self.regions.len() && self.regions[i].range.contains(addr)).then_some(i)
    }

    /// Inserts a region (which must not overlap an existing one).
    pub fn insert_region(&mut self, region: TrackedRegion) {
        let i = self
            .regions
            .partition_point(|r| r.range.start < region.range.start);
        if self.regions.insert(i, region).is_err() {
            crate::fatal!("memsnap", "out of room for tracked regions");
        }
    }

    /// The other threads the last probe found (how many, a hash of their sorted ids),
    /// and the CPU time used so far by threads that have exited.
    /// `own` lists the library's threads, which the probe skipped.
    pub fn thread_fingerprint(&mut self, own: &Workers) -> (usize, u64, (i64, i64)) {
        self.scratch.sps.sort_unstable_by_key(|s| s.0);
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        for s in self.scratch.sps.iter() {
            h = (h ^ s.0).wrapping_mul(0x0100_0000_01b3);
        }
        let others = self.scratch.sps.iter().map(|s| s.0).chain(own.own_tids());
        let exited = crate::sys::exited_threads_cpu_ns(others);
        (self.scratch.sps.len(), h, exited)
    }

    pub fn tracked_bytes(&self) -> usize {
        self.regions.iter().map(|r| r.range.len()).sum()
    }
}
