//! The userfaultfd backends (Linux): choosing the write-tracking mechanism, routing every
//! protection change to it, the synchronous mode's fault server, and the asynchronous
//! mode's base copy.
//!
//! Three mechanisms can guard a tracked page, chosen once at the first snapshot and then
//! per region (the page-state word's `UFFD` bit says which guards a page):
//!
//! - **mprotect**: the page is read-only; a write raises SIGSEGV on the writing thread,
//!   whose handler saves the pre-image and makes the page writable. Works everywhere, but
//!   a system call writing the page fails with EFAULT, and every isolated writable page
//!   splits a mapping.
//! - **uffd (synchronous write protection)**: the page stays PROT_WRITE and carries the
//!   uffd-wp bit in its page-table entry; a write (the kernel's own, inside a system call,
//!   included) blocks the writing thread and queues a message, which a library thread
//!   (the fault server) answers by saving the pre-image and disarming the page, which
//!   wakes the writer. No mapping splits and system calls just work; the price is a
//!   cross-thread round trip per fault, which is why the server spins briefly after each
//!   message before sleeping. Private file mappings (the `.data` of loaded objects) cannot
//!   register in this mode and stay on mprotect.
//! - **uffd-async (`UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`, Linux 6.7)**: a write to an
//!   armed page just clears its uffd-wp bit, with no message and no signal (under a
//!   microsecond). The checkpoint asks the kernel which pages were written (and re-arms
//!   them in the same call), so pre-images cannot be taken at write time: the engine keeps
//!   a *base copy*, the contents of every populated tracked unit as of the newest
//!   checkpoint. At a checkpoint a written unit's pre-image is the delta from its current
//!   bytes back to its base, and the base is overwritten with the current bytes (see
//!   `preimage`; a unit that changed too much for a delta keeps its old base as a whole
//!   pre-image and gets a fresh base). The memory cost is one copy of the resident tracked
//!   memory, reported by the stats call (see `budget` for bounding it). Every mapping type
//!   registers in this mode.
//!
//! The fault server, the workers and the restore path keep to the engine's rules: no
//! allocation, no locks a writer could hold, no tracked memory.

use core::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::ranges::Range;
use super::Engine;
use crate::mem::{PageState, PageTable};
use crate::sys::{self, Access, Backend, UffdMode};

/// A write-tracking mechanism the host can ask for (`memsnap_set_backend`,
/// `MEMSNAP_BACKEND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BackendChoice {
    /// The best one the kernel and the process's privileges allow.
    Auto = 0,
    Mprotect = 1,
    Uffd = 2,
    UffdAsync = 3,
}

impl BackendChoice {
    pub(super) fn from_u32(v: u32) -> BackendChoice {
        match v {
            1 => BackendChoice::Mprotect,
            2 => BackendChoice::Uffd,
            3 => BackendChoice::UffdAsync,
            _ => BackendChoice::Auto,
        }
    }

    /// Parses `MEMSNAP_BACKEND`'s value.
    pub fn parse(text: &[u8]) -> Option<BackendChoice> {
        match text {
            b"" | b"auto" => Some(BackendChoice::Auto),
            b"mprotect" => Some(BackendChoice::Mprotect),
            b"uffd" => Some(BackendChoice::Uffd),
            b"uffd-async" => Some(BackendChoice::UffdAsync),
            _ => None,
        }
    }
}

/// Stack of the fault server thread.
const SERVER_STACK_BYTES: usize = 256 << 10;

/// How long the fault server keeps polling for the next message before sleeping, unless
/// `MEMSNAP_UFFD_SPIN_US` says otherwise. Waking a sleeping server from another CPU costs
/// tens of microseconds; spinning a little catches bursts of faults without that cost.
const DEFAULT_SPIN_NS: u64 = 50_000;

/// The userfaultfd state, in the engine's own block.
pub struct UffdState {
    requested: AtomicU32,
    /// The userfaultfd backend opened at the first snapshot (`Backend::None`: none, the
    /// platform's protection backend guards everything).
    active: AtomicU32,
    fd: AtomicI32,
    pagemap: AtomicI32,
    spin_ns: AtomicU64,
    server_started: AtomicBool,
    pub counters: sys::UffdCounters,
    /// Async mode: `slot + 1` of each unit's contents at the newest checkpoint (0: the
    /// unit was unpopulated, i.e. zero). Created at initialization when the kernel
    /// supports the async mode.
    base: Option<PageTable>,
    /// Units with a base copy.
    pub base_units: AtomicUsize,
    /// Tracked bytes guarded by userfaultfd.
    pub uffd_bytes: AtomicUsize,
}

impl UffdState {
    pub fn new(requested: BackendChoice, base: Option<PageTable>, spin_ns: Option<u64>) -> Self {
        UffdState {
            requested: AtomicU32::new(requested as u32),
            active: AtomicU32::new(Backend::None as u32),
            fd: AtomicI32::new(-1),
            pagemap: AtomicI32::new(-1),
            spin_ns: AtomicU64::new(spin_ns.unwrap_or(DEFAULT_SPIN_NS)),
            server_started: AtomicBool::new(false),
            counters: sys::UffdCounters::default(),
            base,
            base_units: AtomicUsize::new(0),
            uffd_bytes: AtomicUsize::new(0),
        }
    }

    pub fn base_reservation(&self) -> Option<crate::mem::Reservation> {
        self.base.as_ref().map(|t| t.reservation())
    }

    pub fn requested(&self) -> BackendChoice {
        BackendChoice::from_u32(self.requested.load(Ordering::Relaxed))
    }

    pub fn set_requested(&self, b: BackendChoice) {
        self.requested.store(b as u32, Ordering::Relaxed);
    }
}

/// Why the requested backend cannot be used here, if it cannot.
pub fn unavailable(b: BackendChoice) -> Option<&'static str> {
    let s = sys::uffd_support();
    match b {
        BackendChoice::Auto | BackendChoice::Mprotect => None,
        BackendChoice::Uffd => s.sync.err(),
        BackendChoice::UffdAsync => s.async_wp.err(),
    }
}

/// The pre-image of a unit whose contents were all zero (it had no base copy): a slot
/// number the pool never hands out (its capacity stops below it), so an async checkpoint
/// of freshly used memory saves no copy of zeroes. Copying it back writes zeroes;
/// releasing it does nothing.
pub(super) const ZERO_SLOT: u32 = PageState::SLOT_MASK - 1;
// The pool's capacity stops at SLOT_MASK - 1 slots, numbered below ZERO_SLOT.
const _: () = assert!(ZERO_SLOT + 1 == PageState::SLOT_MASK);

/// The base copy's state word for a unit: `slot + 1`, or 0.
fn base_slot(word: u32) -> Option<u32> {
    word.checked_sub(1)
}

impl Engine {
    /// The userfaultfd mode chosen at the first snapshot, if any.
    pub fn uffd_mode(&self) -> Option<UffdMode> {
        match self.uffd.active.load(Ordering::Acquire) {
            x if x == Backend::LinuxUffd as u32 => Some(UffdMode::Sync),
            x if x == Backend::LinuxUffdAsync as u32 => Some(UffdMode::Async),
            _ => None,
        }
    }

    pub(super) fn is_async(&self) -> bool {
        self.uffd_mode() == Some(UffdMode::Async)
    }

    /// Whether the unit with state `st` is guarded by the async mode (never faults).
    pub(super) fn async_unit(&self, st: PageState) -> bool {
        st.uffd() && self.is_async()
    }

    /// The mechanism the stats call reports.
    pub fn backend(&self) -> Backend {
        match self.uffd_mode() {
            Some(UffdMode::Sync) => Backend::LinuxUffd,
            Some(UffdMode::Async) => Backend::LinuxUffdAsync,
            None => sys::backend(),
        }
    }

    /// Picks and opens the mechanism at the first snapshot (before the scan tracks
    /// anything). A forced choice the kernel refuses ends the process with the reason.
    pub(super) fn choose_backend(&self, function: &str) {
        let req = self.uffd.requested();
        let support = sys::uffd_support();
        let mode = match req {
            BackendChoice::Mprotect => None,
            BackendChoice::Uffd => match support.sync {
                Ok(()) => Some(UffdMode::Sync),
                Err(why) => crate::fatal!(function, "the uffd backend is unavailable: {}", why),
            },
            BackendChoice::UffdAsync => match (support.async_wp, &self.uffd.base) {
                (Ok(()), Some(_)) => Some(UffdMode::Async),
                (Err(why), _) => {
                    crate::fatal!(function, "the uffd-async backend is unavailable: {}", why)
                }
                (Ok(()), None) => crate::fatal!(
                    function,
                    "the uffd-async backend is unavailable: no base-copy table was reserved"
                ),
            },
            BackendChoice::Auto => {
                // Under a memory budget, only if its base copy fits (see `budget`).
                if support.async_wp.is_ok() && self.uffd.base.is_some() && self.async_fits_budget()
                {
                    Some(UffdMode::Async)
                } else if support.sync.is_ok() {
                    Some(UffdMode::Sync)
                } else {
                    None
                }
            }
        };
        let Some(mode) = mode else { return };
        let fd = match sys::uffd_open(mode) {
            Ok(fd) => fd,
            Err(e) if req == BackendChoice::Auto => {
                let _ = e;
                return;
            }
            Err(e) => crate::fatal!(function, "cannot open a userfaultfd (errno {})", e),
        };
        if mode == UffdMode::Async {
            match sys::pagemap_open() {
                Ok(p) => self.uffd.pagemap.store(p, Ordering::Relaxed),
                Err(e) if req == BackendChoice::Auto => {
                    let _ = e;
                    sys::uffd_close(fd);
                    return;
                }
                Err(e) => crate::fatal!(function, "cannot open /proc/self/pagemap (errno {})", e),
            }
        }
        self.uffd.fd.store(fd, Ordering::Relaxed);
        let active = match mode {
            UffdMode::Sync => Backend::LinuxUffd,
            UffdMode::Async => Backend::LinuxUffdAsync,
        };
        self.uffd.active.store(active as u32, Ordering::Release);
        if mode == UffdMode::Sync {
            self.start_fault_server(function);
        }
    }

    /// Before `fork()`, with the metadata lock held (see `fork`): in async mode the pages
    /// written since the newest checkpoint are listed (`m.work`), since the child's page
    /// tables lose that information.
    pub(super) fn uffd_before_fork(&self, m: &mut crate::engine::Meta) {
        m.work.clear();
        if self.is_async() {
            let pm = self.uffd.pagemap.load(Ordering::Relaxed);
            let crate::engine::Meta { regions, work, .. } = m;
            for r in regions.iter().filter(|r| r.uffd) {
                let _ = sys::scan_written(pm, r.range.start, r.range.end, false, |a, b| {
                    let _ = work.push(Range::new(a, b));
                });
            }
        }
    }

    /// In the child of `fork()`: the inherited userfaultfd and pagemap descriptors act on
    /// the parent's address space, and the child's mappings lost their registration and
    /// their page-table write-protect bits. Both are rebuilt here, before the program
    /// writes anything, and the sync mode gets a fault server of its own.
    pub(super) fn uffd_after_fork_in_child(&self) {
        const F: &str = "fork";
        let Some(mode) = self.uffd_mode() else { return };
        sys::uffd_close(self.uffd.fd.load(Ordering::Relaxed));
        let fd = match sys::uffd_open(mode) {
            Ok(fd) => fd,
            Err(e) => crate::fatal!(
                F,
                "cannot open a userfaultfd in the child (errno {}); its writes would go untracked",
                e
            ),
        };
        self.uffd.fd.store(fd, Ordering::Relaxed);
        if mode == UffdMode::Async {
            let old = self.uffd.pagemap.load(Ordering::Relaxed);
            // SAFETY: closing the inherited descriptor this engine opened.
            unsafe { libc::close(old) };
            match sys::pagemap_open() {
                Ok(p) => self.uffd.pagemap.store(p, Ordering::Relaxed),
                Err(e) => crate::fatal!(
                    F,
                    "cannot open /proc/self/pagemap in the child (errno {})",
                    e
                ),
            }
        }
        if mode == UffdMode::Sync {
            // Before anything is armed: creating the thread writes glibc's thread list,
            // which may be tracked memory, and no server would be there to answer.
            self.uffd.server_started.store(false, Ordering::Release);
            // The parent's library threads are not the child's (and their records would
            // fill the table after a few generations of forks).
            self.workers.forget_threads();
            self.start_fault_server(F);
        }
        {
            let m = self.meta.lock();
            for r in m.regions.iter().filter(|r| r.uffd) {
                if sys::uffd_register(fd, r.range.start, r.range.len()).is_err() {
                    // Part of it is no longer mapped (the program unmapped or trimmed
                    // it). The next scan reports the region as unregistered memory and
                    // refuses rewinds that would need it, as it does in the parent.
                    continue;
                }
                // SAFETY: tracked memory; dirty units are disarmed again below.
                let armed = unsafe { sys::uffd_protect(fd, r.range.start, r.range.len(), true) };
                if let Err(e) = armed {
                    crate::fatal!(F, "cannot arm tracked memory in the child (errno {})", e);
                }
                if mode == UffdMode::Sync {
                    let mut u = r.range.start;
                    while u < r.range.end {
                        if self.table.get(u).slot().is_some() {
                            // SAFETY: a dirty unit: its pre-image is saved.
                            let _ = unsafe { sys::uffd_protect(fd, u, self.page, false) };
                        }
                        u += self.page;
                    }
                }
            }
            // Async: what the parent had written since the newest checkpoint is written
            // again (same bytes), so the next scan in the child finds it.
            for w in m.work.iter() {
                let mut p = w.start;
                while p < w.end {
                    // SAFETY: tracked, mapped, writable memory of the child's only thread;
                    // the byte is written back unchanged.
                    unsafe {
                        let b = core::ptr::read_volatile(p as *const u8);
                        core::ptr::write_volatile(p as *mut u8, b);
                    }
                    p += self.sub;
                }
            }
        }
    }

    /// Starts the sync mode's fault server on a stack the library maps for itself.
    fn start_fault_server(&self, function: &str) {
        if self.uffd.server_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let bytes = sys::thread_stack_bytes(SERVER_STACK_BYTES);
        let Some(stack) = sys::reserve(bytes) else {
            crate::fatal!(function, "cannot map the fault server's stack")
        };
        self.meta.lock().add_own(crate::mem::Reservation {
            base: stack as usize,
            len: bytes,
        });
        let before = self.workers.registered();
        // SAFETY: the stack is library memory reserved for this thread forever; the
        // entry point only reads the never-freed engine.
        if let Err(e) = unsafe {
            sys::spawn(
                stack,
                bytes,
                server_main,
                self as *const Engine as *mut libc::c_void,
            )
        } {
            crate::fatal!(
                function,
                "cannot start the userfaultfd fault server (error {})",
                e
            );
        }
        self.workers.wait_registered(before + 1);
    }

    /// Changes write access to `[start, start + len)`, tracked memory guarded by userfaultfd
    /// (`uffd`) or mprotect. In async mode unprotecting is nothing to do: a write to an
    /// armed page simply goes through.
    ///
    /// # Safety
    /// The range is tracked host memory whose protection the engine owns, and when `write`
    /// is true its pre-images are saved.
    pub(super) unsafe fn set_access(
        &self,
        start: usize,
        len: usize,
        exec: bool,
        uffd: bool,
        write: bool,
    ) -> Result<(), i32> {
        if uffd {
            if write && self.is_async() {
                return Ok(());
            }
            let fd = self.uffd.fd.load(Ordering::Relaxed);
            // SAFETY: per this function's contract.
            return unsafe { sys::uffd_protect(fd, start, len, !write) };
        }
        let access = if write {
            Access::ReadWrite { exec }
        } else {
            Access::Read { exec }
        };
        // SAFETY: per this function's contract.
        unsafe { sys::protect(start, len, access) }
    }

    /// Makes `[start, start + len)` writable for a restore to copy into. Unlike
    /// [`Engine::set_access`], a thread blocked on a userfaultfd-guarded page stays
    /// blocked: its write must wait until the page holds its restored bytes and is armed
    /// again, then be served as a first write (with mprotect the same writer waits in the
    /// signal handler for memory changes to be allowed).
    ///
    /// # Safety
    /// As for [`Engine::set_access`].
    pub(super) unsafe fn open_for_restore(
        &self,
        start: usize,
        len: usize,
        exec: bool,
        uffd: bool,
    ) -> Result<(), i32> {
        if uffd && !self.is_async() {
            let fd = self.uffd.fd.load(Ordering::Relaxed);
            // SAFETY: per this function's contract.
            return unsafe { sys::uffd_disarm_quietly(fd, start, len) };
        }
        // SAFETY: per this function's contract.
        unsafe { self.set_access(start, len, exec, uffd, true) }
    }

    /// Registers a region about to be tracked with the userfaultfd, if one is open and
    /// the region suits it: whole units only (a unit's protection is changed as one), and
    /// a mapping type the mode accepts. `false` leaves it to mprotect.
    pub(super) fn register_region(&self, r: Range) -> bool {
        if self.uffd_mode().is_none()
            || r.start % self.page != 0
            || r.end % self.page != 0
            || r.is_empty()
        {
            return false;
        }
        let fd = self.uffd.fd.load(Ordering::Relaxed);
        if sys::uffd_register(fd, r.start, r.len()).is_err() {
            return false;
        }
        self.uffd.uffd_bytes.fetch_add(r.len(), Ordering::Relaxed);
        true
    }

    /// Stops guarding `r` with the userfaultfd: it is no longer tracked. Its base copies
    /// are released.
    pub(super) fn unregister_region(&self, r: Range) {
        let fd = self.uffd.fd.load(Ordering::Relaxed);
        let _ = sys::uffd_unregister(fd, r.start, r.len());
        self.uffd.uffd_bytes.fetch_sub(
            r.len().min(self.uffd.uffd_bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.drop_base(r);
    }

    /// Releases the base copies of the units of `r`.
    pub(super) fn drop_base(&self, r: Range) {
        let Some(base) = &self.uffd.base else { return };
        let mut u = self.page_base(r.start);
        while u < r.end {
            if let Some(w) = base.word(u) {
                if let Some(s) = base_slot(w.swap(0, Ordering::AcqRel)) {
                    self.pool.free(s);
                    self.uffd.base_units.fetch_sub(1, Ordering::Relaxed);
                }
            }
            u += self.page;
        }
    }

    /// Async mode, a region just armed: copies its populated units as their base (the
    /// others are zero, which is what the absence of a base copy means).
    pub(super) fn copy_base(&self, function: &str, r: Range) {
        let Some(base) = &self.uffd.base else { return };
        let pm = self.uffd.pagemap.load(Ordering::Relaxed);
        let mut last = usize::MAX;
        let res = sys::scan_populated(pm, r.start, r.end, |a, b| {
            let mut u = self.page_base(a).max(self.page_base(r.start));
            while u < b && u < r.end {
                if u != last {
                    last = u;
                    let st = self.table.get(u);
                    if st.tracked() && base.word(u).is_some_and(|w| w.load(Ordering::Relaxed) == 0)
                    {
                        let slot = self.alloc_slot(function);
                        // SAFETY: a fresh slot of one unit; the unit's tracked spans are
                        // mapped and readable.
                        unsafe { self.copy_unit(u, st, slot, true) };
                        self.set_base(u, Some(slot));
                    }
                }
                u += self.page;
            }
        });
        if let Err(e) = res {
            crate::fatal!(
                function,
                "cannot scan tracked memory {:#x}-{:#x} for populated pages (errno {})",
                r.start,
                r.end,
                e
            );
        }
    }

    pub(super) fn alloc_slot(&self, function: &str) -> u32 {
        match self.pool.alloc() {
            Some(s) => s,
            None => crate::fatal!(
                function,
                "out of page-copy slots ({} pages saved); erase or rewind checkpoints to free some",
                self.pool.capacity()
            ),
        }
    }

    /// Replaces a unit's base copy, releasing the previous one.
    pub(super) fn set_base(&self, unit: usize, slot: Option<u32>) {
        let Some(base) = &self.uffd.base else { return };
        let Some(w) = base.word(unit) else { return };
        let old = w.swap(slot.map_or(0, |s| s + 1), Ordering::AcqRel);
        match (base_slot(old), slot) {
            (Some(o), _) => {
                self.pool.free(o);
                if slot.is_none() {
                    self.uffd.base_units.fetch_sub(1, Ordering::Relaxed);
                }
            }
            (None, Some(_)) => {
                self.uffd.base_units.fetch_add(1, Ordering::Relaxed);
            }
            (None, None) => {}
        }
    }

    /// Takes a unit's base copy out of the table (the caller now owns the slot).
    pub(super) fn take_base(&self, unit: usize) -> Option<u32> {
        let base = self.uffd.base.as_ref()?;
        let s = base_slot(base.word(unit)?.swap(0, Ordering::AcqRel))?;
        self.uffd.base_units.fetch_sub(1, Ordering::Relaxed);
        Some(s)
    }

    pub(super) fn peek_base(&self, unit: usize) -> Option<u32> {
        let base = self.uffd.base.as_ref()?;
        base_slot(base.word(unit)?.load(Ordering::Acquire))
    }

    /// Calls `f(unit)` once for every tracked async unit written since it was last armed,
    /// in address order; `rearm` arms them again in the same kernel call.
    pub(super) fn for_each_written(
        &self,
        function: &str,
        regions: &[super::TrackedRegion],
        rearm: bool,
        mut f: impl FnMut(usize),
    ) {
        let pm = self.uffd.pagemap.load(Ordering::Relaxed);
        for r in regions.iter().filter(|r| r.uffd) {
            let mut last = usize::MAX;
            let res = sys::scan_written(pm, r.range.start, r.range.end, rearm, |a, b| {
                let mut u = self.page_base(a);
                while u < b {
                    if u != last {
                        last = u;
                        f(u);
                    }
                    u += self.page;
                }
            });
            if let Err(e) = res {
                crate::fatal!(
                    function,
                    "cannot scan tracked memory {:#x}-{:#x} for written pages (errno {}{})",
                    r.range.start,
                    r.range.end,
                    e,
                    if e == libc::EPERM {
                        ": part of it was unmapped and mapped afresh by the program"
                    } else {
                        ""
                    }
                );
            }
        }
    }

    /// Registers `r` again after the host replaced its mapping (`mmap(MAP_FIXED)`): a new
    /// mapping is not registered, and its pages are unarmed.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(super) fn reregister(&self, r: Range) -> Result<(), i32> {
        let fd = self.uffd.fd.load(Ordering::Relaxed);
        sys::uffd_register(fd, r.start, r.len())
    }

    /// Async mode: whether any tracked unit was written since it was last armed.
    pub(super) fn async_written_since_armed(
        &self,
        function: &str,
        regions: &[super::TrackedRegion],
    ) -> bool {
        if !self.is_async() {
            return false;
        }
        let mut any = false;
        self.for_each_written(function, regions, false, |u| {
            let st = self.table.get(u);
            any |= st.tracked() && st.uffd();
        });
        any
    }

    /// Async mode, `RestoreMemoryToLastSavedCheckpoint`: every unit written since the
    /// newest checkpoint gets its base copy back (or zeroes), and is armed again.
    pub(super) fn restore_async_written(&self, function: &str, regions: &[super::TrackedRegion]) {
        if !self.is_async() {
            return;
        }
        let mut any = false;
        self.for_each_written(function, regions, false, |u| {
            let st = self.table.get(u);
            if !st.tracked() || !st.uffd() {
                return;
            }
            any = true;
            // SAFETY: the unit is tracked, mapped and writable (async units always are);
            // nothing else runs while memory changes are disallowed.
            unsafe {
                match self.peek_base(u) {
                    Some(s) => self.copy_unit(u, st, s, false),
                    None => self.for_each_span(u, st, |a, len, _| {
                        core::ptr::write_bytes(a as *mut u8, 0, len)
                    }),
                }
            }
        });
        if any {
            self.rearm_async(function, regions);
        }
    }

    /// Async mode, after a restore wrote tracked units: arms every written page again.
    /// One scan per region re-arms them all (tens of nanoseconds per page), where arming
    /// run by run costs a system call per scattered page.
    pub(super) fn rearm_async(&self, function: &str, regions: &[super::TrackedRegion]) {
        self.for_each_written(function, regions, true, |_| {});
    }

    /// Whether a unit's tracked bytes are all zero.
    ///
    /// # Safety
    /// The unit's tracked spans are mapped and readable.
    pub(super) unsafe fn unit_is_zero(&self, unit: usize, st: PageState) -> bool {
        let mut zero = true;
        self.for_each_span(unit, st, |a, len, _| {
            // SAFETY: per the function's contract.
            let bytes = unsafe { core::slice::from_raw_parts(a as *const u8, len) };
            zero = zero && bytes.iter().all(|&b| b == 0);
        });
        zero
    }

    /// A restored async unit's pre-image becomes its base copy (instead of returning to
    /// the pool); returns the slot to release instead, if any.
    pub(super) fn rebase(&self, unit: usize, slot: u32) -> Option<u32> {
        let base = self.uffd.base.as_ref()?;
        let w = base.word(unit)?;
        let new = if slot == ZERO_SLOT { 0 } else { slot + 1 };
        let old = base_slot(w.swap(new, Ordering::AcqRel));
        match (old.is_some(), new != 0) {
            (false, true) => {
                self.uffd.base_units.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                self.uffd.base_units.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        old
    }

    /// Returns a pre-image slot to the pool (the zero pre-image is no slot).
    pub(super) fn release_slot(&self, slot: u32) {
        if slot != ZERO_SLOT {
            self.pool.free(slot);
        }
    }

    /// Whether the mapping piece `piece` of a userfaultfd-guarded region is still
    /// registered: memory the program unmapped and mapped afresh is not, and its writes
    /// would go unseen (the mprotect backend notices the same thing as a clean page that
    /// became writable). One page is probed per piece, without disturbing its state:
    /// async mode scans it (the kernel refuses to scan unregistered memory), sync mode
    /// arms a clean unit again, which is a no-op on registered memory and fails on
    /// unregistered memory; a piece without a clean unit was just re-armed by its
    /// checkpoint, which fails the same way.
    pub(super) fn uffd_piece_registered(&self, piece: Range) -> bool {
        if piece.is_empty() {
            return true;
        }
        if self.is_async() {
            let pm = self.uffd.pagemap.load(Ordering::Relaxed);
            let probe = piece.start + self.sub;
            return sys::scan_written(pm, piece.start, probe.min(piece.end), false, |_, _| {})
                != Err(libc::EPERM);
        }
        let fd = self.uffd.fd.load(Ordering::Relaxed);
        let mut u = self.page_base(piece.start);
        while u < piece.end {
            let st = self.table.get(u);
            if st.tracked() && st.slot().is_none() && !st.busy() {
                // SAFETY: a clean tracked unit, armed already (arming it is a no-op).
                return unsafe { sys::uffd_protect(fd, u, self.page, true) } != Err(libc::ENOENT);
            }
            u += self.page;
        }
        true
    }

    /// The sync fault server's answer to one fault.
    /// The sync server's callback: `None` while the write must wait for changes to be
    /// allowed again (the server keeps it pending and serves the next faults meanwhile,
    /// so a write by the thread that disallowed them is still seen and refused).
    fn serve_fault(&self, addr: usize, tid: u64) -> Option<bool> {
        // Named as the original names its fault path, whatever caught the fault.
        self.resolve_gated("HandleDirtyMemoryFault", addr, tid, true, false)
    }

    pub fn base_bytes(&self) -> usize {
        self.uffd.base_units.load(Ordering::Relaxed) * self.page
    }
}

extern "C" fn server_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: the argument is the never-freed engine.
    let engine: &'static Engine = unsafe { &*(arg as *const Engine) };
    engine.workers.register_own_thread();
    let fd = engine.uffd.fd.load(Ordering::Relaxed);
    let spin = engine.uffd.spin_ns.load(Ordering::Relaxed);
    sys::uffd_serve(fd, spin, &engine.uffd.counters, &|addr, tid| {
        engine.serve_fault(addr, tid)
    })
}

#[cfg(test)]
mod tests {
    use super::{BackendChoice, ZERO_SLOT};
    use crate::mem::PageState;

    #[test]
    fn backend_names_parse() {
        assert_eq!(BackendChoice::parse(b""), Some(BackendChoice::Auto));
        assert_eq!(BackendChoice::parse(b"auto"), Some(BackendChoice::Auto));
        assert_eq!(
            BackendChoice::parse(b"mprotect"),
            Some(BackendChoice::Mprotect)
        );
        assert_eq!(BackendChoice::parse(b"uffd"), Some(BackendChoice::Uffd));
        assert_eq!(
            BackendChoice::parse(b"uffd-async"),
            Some(BackendChoice::UffdAsync)
        );
        assert_eq!(BackendChoice::parse(b"UFFD"), None);
        assert_eq!(BackendChoice::parse(b"uffd-async "), None);
        for b in [
            BackendChoice::Auto,
            BackendChoice::Mprotect,
            BackendChoice::Uffd,
            BackendChoice::UffdAsync,
        ] {
            assert_eq!(BackendChoice::from_u32(b as u32), b);
        }
        assert_eq!(BackendChoice::from_u32(99), BackendChoice::Auto);
    }

    #[test]
    fn zero_pre_image_is_never_a_real_slot() {
        let st = PageState(PageState::TRACKED).with_slot(ZERO_SLOT);
        assert_eq!(st.slot(), Some(ZERO_SLOT));
        assert!(st.tracked() && !st.uffd());
        let st = PageState(PageState::TRACKED | PageState::UFFD).with_slot(3);
        assert!(st.uffd() && st.clean().uffd() && st.clean().slot().is_none());
    }
}
