//! Initialization: `InitializeMemorySnapshots` builds the one engine in memory the
//! library maps for itself, reserves the address space of every table it will use (so
//! nothing allocates after the first snapshot), and records all of it as the library's
//! own memory, which the region walk never tracks.

use core::sync::atomic::{AtomicBool, AtomicIsize, AtomicU32, AtomicUsize, Ordering};

use super::config::{requested_backend, snapshot_page_size, spin_ns};
use super::{
    backend, config, get, verify, Engine, Floor, Meta, Phase, Scratch, Workers, ADDRESS_LIMIT,
    ENGINE,
};
use crate::mem::{DirtyLog, PageTable, RawVec, Reservation, SlotPool};

/// An empty slot in a list of reservations (skipped when they are recorded).
const NO_RESERVATION: Reservation = Reservation { base: 0, len: 0 };

/// Copy space the slot pool reserves (address space only; committed as used).
const POOL_BYTES: usize = 1 << 40;

fn vec<T: Copy>(cap: usize, what: &str) -> RawVec<T> {
    match RawVec::with_capacity(cap) {
        Some(v) => v,
        None => crate::fatal!(
            "InitializeMemorySnapshots",
            "cannot reserve address space for the {} table",
            what
        ),
    }
}

impl Engine {
    /// Creates the process's engine. Aborts when called twice.
    pub fn initialize() -> &'static Engine {
        const F: &str = "InitializeMemorySnapshots";
        if get().is_some() {
            crate::fatal!(F, "called twice (the library is already initialized)");
        }
        crate::sys::prepare();
        let sub = crate::sys::os_page_size();
        let page = match snapshot_page_size(sub) {
            Ok(p) => p,
            Err(msg) => crate::fatal!(F, "MEMSNAP_PAGE_SIZE: {}", msg),
        };
        let page_shift = page.trailing_zeros();
        let masks = if page > sub {
            match PageTable::new(ADDRESS_LIMIT, page_shift) {
                Some(t) => Some(t),
                None => crate::fatal!(F, "cannot reserve address space for the partial-page table"),
            }
        } else {
            None
        };
        let Some(table) = PageTable::new(ADDRESS_LIMIT, page_shift) else {
            crate::fatal!(
                F,
                "cannot reserve {} GiB of address space for the page-state table (vm.overcommit_memory=2 or a low RLIMIT_AS?)",
                ((ADDRESS_LIMIT >> page_shift) * 4) >> 30
            )
        };
        let Some(pool) = SlotPool::new(page, POOL_BYTES) else {
            crate::fatal!(F, "cannot reserve address space for page copies")
        };
        let Some(log) = DirtyLog::with_capacity(pool.capacity() as usize) else {
            crate::fatal!(F, "cannot reserve address space for the dirty-page log")
        };
        let slots = pool.capacity() as usize;
        let meta = Meta {
            own: vec(4096, "library memory"),
            untracked: vec(1 << 20, "untracked region"),
            registered: vec(1 << 20, "registered region"),
            regions: vec(1 << 20, "tracked region"),
            allocated: vec(1 << 22, "allocated region"),
            free: vec(1 << 22, "free region"),
            checkpoints: vec(1 << 22, "checkpoint"),
            diffs: vec(slots + 1, "diff"),
            deltas: vec(POOL_BYTES, "page delta"),
            free_snapshots: vec(1 << 26, "free-set snapshot"),
            stacks: vec(1 << 16, "thread stack"),
            vmas: vec(1 << 21, "mapping"),
            exclusions: vec(1 << 16, "exclusion"),
            exact: vec(1 << 16, "exclusion"),
            eager: vec(1 << 16, "eager page"),
            eager_pages: vec(1 << 20, "eager copy"),
            eager_bytes: vec((1 << 20) * sub, "eager copy"),
            views: vec(1 << 20, "host protection range"),
            read_only: vec(1 << 16, "read-only range"),
            read_only_next: vec(1 << 16, "read-only range"),
            journal: vec(1 << 22, "host protection change"),
            opened: vec(1 << 20, "host protection range"),
            floor: Floor::default(),
            rewind_scanned_scope: u64::MAX,
            scratch: Scratch {
                bytes: vec(1 << 26, "scratch"),
                work: vec(1 << 21, "work"),
                work2: vec(1 << 21, "work"),
                entries: vec(slots + 1, "restore"),
                sps: vec(1 << 16, "thread"),
                found: vec(1 << 20, "found region"),
                blocks: vec(1 << 16, "thread descriptor"),
            },
        };
        let engine = Engine {
            settings: config::Settings {
                page,
                page_shift,
                sub,
                mode: AtomicU32::new(0),
                restore_threads: AtomicUsize::new(crate::sys::cpu_count().clamp(1, 8)),
                pin_allocator: AtomicBool::new(true),
                budget: AtomicUsize::new(config::initial_memory_budget(F)),
                map_limit: crate::sys::max_map_count().unwrap_or(0),
                rseq: crate::sys::rseq_layout(),
                threads: crate::sys::ThreadLayout::probe(crate::sys::rseq_layout()),
            },
            table,
            masks,
            pool,
            log,
            workers: Workers::new(),
            meta: spin::Mutex::new(meta),
            phase: AtomicU32::new(Phase::Initialized as u32),
            gate: super::gate::Gate::new(crate::sys::pid()),
            map_budget: AtomicIsize::new(isize::MAX),
            ahead_next: AtomicUsize::new(0),
            ahead_units: AtomicUsize::new(1),
            balance: Default::default(),
            counters: super::counters::CounterCells::new(crate::sys::now_us()),
            countdown: AtomicUsize::new(0),
            read_only_span: [AtomicUsize::new(0), AtomicUsize::new(0)],
            countdown_started: AtomicBool::new(false),
            backend: backend::BackendState::new(requested_backend(F), page_shift, spin_ns()),
            verify: verify::Verify::new(F),
        };
        let bytes = core::mem::size_of::<Engine>();
        let Some(block) = crate::sys::reserve(bytes) else {
            crate::fatal!(F, "cannot map the engine's state block")
        };
        let block = block as *mut Engine;
        // SAFETY: a fresh, suitably aligned (page-aligned) mapping of the right size.
        unsafe { block.write(engine) };
        // SAFETY: just written; never freed.
        let e: &'static Engine = unsafe { &*block };
        {
            let mut m = e.meta.lock();
            let pool = e.pool.reservations();
            let fixed = [
                Reservation {
                    base: block as usize,
                    len: bytes,
                },
                e.table.reservation(),
                pool[0],
                pool[1],
                e.log.reservation(),
                e.masks.as_ref().map_or(NO_RESERVATION, |t| t.reservation()),
                e.backend.base_reservation().unwrap_or(NO_RESERVATION),
            ];
            let vecs = m.reservations();
            for r in fixed
                .iter()
                .chain(&vecs)
                .chain(&e.verify.reservations())
                .filter(|r| r.len > 0)
            {
                m.add_own(*r);
            }
            // The library's own statics, where it is a shared object of its own: memory
            // memsnap owns by construction, never protected and never rewound.
            crate::sys::for_each_own_writable_segment(crate::sys::os_page_size(), |lo, hi| {
                m.add_own(Reservation {
                    base: lo,
                    len: hi - lo,
                })
            });
        }
        e.balance[1].fetch_add(bytes as isize, Ordering::Relaxed);
        // As early as possible: memory malloc obtains from now on stays mapped.
        e.apply_pin();
        e.bind_exports(F);
        ENGINE.store(block, Ordering::Release);
        e.handle_forks(F);
        e
    }
}

impl Meta {
    /// The address space of every table behind the lock, for the library's own memory.
    fn reservations(&self) -> [Reservation; 29] {
        [
            self.own.reservation(),
            self.untracked.reservation(),
            self.registered.reservation(),
            self.regions.reservation(),
            self.allocated.reservation(),
            self.free.reservation(),
            self.checkpoints.reservation(),
            self.diffs.reservation(),
            self.deltas.reservation(),
            self.free_snapshots.reservation(),
            self.stacks.reservation(),
            self.scratch.bytes.reservation(),
            self.vmas.reservation(),
            self.scratch.work.reservation(),
            self.scratch.work2.reservation(),
            self.scratch.entries.reservation(),
            self.scratch.sps.reservation(),
            self.scratch.found.reservation(),
            self.exclusions.reservation(),
            self.exact.reservation(),
            self.eager.reservation(),
            self.eager_pages.reservation(),
            self.eager_bytes.reservation(),
            self.scratch.blocks.reservation(),
            self.views.reservation(),
            self.read_only.reservation(),
            self.read_only_next.reservation(),
            self.journal.reservation(),
            self.opened.reservation(),
        ]
    }
}
