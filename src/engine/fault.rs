//! The write-fault path and the "memory changes allowed" gate.
//!
//! A fault on a clean tracked page is claimed with one compare-and-swap on the page's
//! state word; the winner copies the page into a slot, logs it, makes it writable and
//! publishes the slot. Losers wait for the winner (a bounded copy on another thread) and
//! retry the instruction. Nothing here allocates, locks, formats (except on the fatal
//! path) or writes tracked memory.
//!
//! Making one page writable inside a read-only mapping splits it in up to three, and the
//! kernel caps a process's mappings (`vm.max_map_count`, 65530 by default): scattered
//! writes over a large heap would make `mprotect` fail. So the handler keeps a budget of
//! single-page captures, set at each checkpoint and rewind from the mapping count the
//! region walk saw. Once it is spent, a fault joins its page to the nearest writable page
//! of its aligned block of [`BLOCK_PAGES`] (capturing the clean pages between), which adds
//! no mapping, or when there is none captures the whole block (clipped to the tracked
//! pages around it) in one call, which adds at most two: the count stays below
//! (tracked bytes / block bytes) * 2 whatever the write order.
//!
//! The same run capture serves sequential writers: a fault exactly where the previous
//! capture ended takes twice as many pages as that one did (up to a block), so a writer
//! streaming through memory pays one signal and one mprotect per run instead of per page.
//! Pages captured but never written cost a copy and are dropped at the next checkpoint as
//! unchanged.

use core::sync::atomic::{AtomicU32, Ordering};

/// Snapshot pages captured together once the single-page budget is spent.
pub const BLOCK_PAGES: usize = 64;

use super::Engine;
use crate::mem::PageState;
use crate::sys;

impl Engine {
    /// The current disallow scope's number.
    pub(super) fn scope(&self) -> u64 {
        self.gate.scope.load(Ordering::SeqCst)
    }

    pub fn changes_allowed(&self) -> bool {
        self.gate.allowed.load(Ordering::SeqCst)
    }

    /// `SetMemoryChangesAllowed`: calls must alternate. Disallowing waits until no fault
    /// handler is in flight, so the caller then owns the page table and the dirty log.
    pub fn set_allowed(&self, function: &str, allowed: bool) {
        if allowed {
            if self
                .gate
                .allowed
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
            {
                crate::fatal!(
                    function,
                    "memory changes are already allowed (SetMemoryChangesAllowed calls must alternate)"
                );
            }
            self.gate.disallower.store(0, Ordering::SeqCst);
            return;
        }
        let me = sys::tid();
        if self
            .gate
            .allowed
            .compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
            .is_err()
        {
            crate::fatal!(
                function,
                "memory changes are already disallowed (SetMemoryChangesAllowed calls must alternate; AutoDisallowMemoryChanges cannot nest)"
            );
        }
        self.gate.disallower.store(me, Ordering::SeqCst);
        self.gate.scope.fetch_add(1, Ordering::SeqCst);
        while self.gate.in_flight.load(Ordering::SeqCst) != 0 {
            sys::yield_now();
        }
    }

    /// Waits until memory changes are allowed; aborts if the caller is the thread that
    /// disallowed them (it would wait forever: the original hangs here).
    pub(crate) fn wait_allowed(&self, function: &str, addr: usize) {
        self.wait_allowed_for(function, addr, sys::tid())
    }

    /// [`Engine::wait_allowed`] for a write by thread `writer` (the sync userfaultfd
    /// server waits on behalf of the thread whose fault it serves).
    fn wait_allowed_for(&self, function: &str, addr: usize, writer: u64) {
        while !self.gate.allowed.load(Ordering::SeqCst) {
            if self.gate.disallower.load(Ordering::SeqCst) == writer {
                crate::fatal!(
                    function,
                    "the thread that disallowed memory changes wrote tracked memory at {:#x} (writes to tracked memory are forbidden inside AutoDisallowMemoryChanges)",
                    addr
                );
            }
            sys::yield_now();
        }
    }

    /// Enters the section that `set_allowed(false)` waits to drain.
    pub(super) fn enter(&self, function: &str, addr: usize, writer: u64) {
        while !self.try_enter(function, addr, writer, true) {}
    }

    /// [`Engine::enter`], or, when `may_wait` is false and memory changes are disallowed
    /// by a thread other than `writer`, `false` at once without entering (a server that
    /// answers faults for several threads must not wait on one: see `sys::mach_serve`).
    /// A write by the thread that disallowed changes aborts either way.
    fn try_enter(&self, function: &str, addr: usize, writer: u64, may_wait: bool) -> bool {
        loop {
            self.gate.in_flight.fetch_add(1, Ordering::SeqCst);
            if self.gate.allowed.load(Ordering::SeqCst) {
                return true;
            }
            self.gate.in_flight.fetch_sub(1, Ordering::SeqCst);
            if !may_wait && self.gate.disallower.load(Ordering::SeqCst) != writer {
                return false;
            }
            // Aborts when `writer` disallowed changes (and they still are).
            self.wait_allowed_for(function, addr, writer);
        }
    }

    pub(super) fn leave(&self) {
        self.gate.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Resolves a write to `addr`: `true` when the address is tracked and the page is now
    /// writable with its pre-image saved, `false` when the fault is not ours.
    ///
    /// Called directly (`HandleDirtyMemoryFault`, `memsnap_prepare_write`): a page guarded
    /// by userfaultfd is resolved the same way (sync mode), or needs nothing (async mode,
    /// where tracked pages are always writable).
    pub fn handle_fault(&self, function: &str, addr: usize) -> bool {
        let st = self.table.get(addr);
        if self.unit_guard(st).finds_writes_by_scan() {
            return self.armed() && self.tracked_at(addr);
        }
        self.resolve(function, addr, sys::tid(), st.uffd())
    }

    /// [`Engine::handle_fault`] for a write by thread `writer`, reported by a signal
    /// (`via_uffd` false: only mprotect-guarded pages are ours) or by the sync userfaultfd
    /// (only userfaultfd-guarded pages are).
    pub(super) fn resolve(&self, function: &str, addr: usize, writer: u64, via_uffd: bool) -> bool {
        self.resolve_gated(function, addr, writer, via_uffd, true)
            .unwrap_or(false)
    }

    /// [`Engine::resolve`]; with `may_wait` false, `None` instead of waiting while memory
    /// changes are disallowed by another thread (see [`Engine::try_enter`]).
    pub(super) fn resolve_gated(
        &self,
        function: &str,
        addr: usize,
        writer: u64,
        via_uffd: bool,
        may_wait: bool,
    ) -> Option<bool> {
        let Some(word) = self.table.word(addr) else {
            return Some(false);
        };
        let st = PageState(word.load(Ordering::Acquire));
        if !st.tracked()
            || !self.armed()
            || (st.partial() && !self.tracked_at(addr))
            || st.uffd() != via_uffd
            || self.unit_guard(st).finds_writes_by_scan()
            || st.host()
        {
            return Some(false);
        }
        if via_uffd
            && st.slot().is_some()
            && !self.gate.allowed.load(Ordering::SeqCst)
            && self.gate.disallower.load(Ordering::SeqCst) == writer
        {
            // A stale message: the server read the controller's fault together with
            // another thread's on the same unit, and resolving that one woke both. The
            // controller has run on since and disallowed changes; it is not blocked here,
            // the unit is captured and writable. (A real write inside the scope meets an
            // armed unit, which has no slot yet, and is refused below.)
            return Some(true);
        }
        if !self.try_enter(function, addr, writer, may_wait) {
            return None;
        }
        let page = self.page_base(addr);
        let mut waits = 0u32;
        let handled = loop {
            let cur = PageState(word.load(Ordering::Acquire));
            if !cur.tracked() || cur.host() {
                break false;
            }
            if cur.busy() {
                waits = waits.wrapping_add(1);
                if waits % 1024 == 0 && self.claimer_lost_to_fork() {
                    // This is a fork child before its fork handler ran, and the claimer
                    // stayed in the parent: the unit is clean (see `fork`), take it over.
                    let _ = word.compare_exchange(
                        cur.0,
                        cur.0 & !PageState::BUSY,
                        Ordering::AcqRel,
                        Ordering::Acquire,
                    );
                    continue;
                }
                sys::yield_now();
                continue;
            }
            if cur.slot().is_some() {
                // Already captured by another thread (or made read-only behind our back):
                // make sure it is writable and let the instruction retry.
                let _ = self.protect_unit(page, cur, true);
                break true;
            }
            if !claim(word, cur) {
                continue;
            }
            let slot = self.capture(function, page, cur);
            let block = BLOCK_PAGES * self.settings.page;
            let ahead = self.ahead_window(page);
            let end = if cur.partial() {
                // Published before it is made writable: a unit still BUSY is then still
                // protected and unwritten, which is what a fork child relies on.
                word.store(cur.with_slot(slot).0, Ordering::Release);
                if let Err(e) = self.protect_unit(page, cur, true) {
                    Self::unprotect_failed(function, e);
                }
                page + self.settings.page
            } else if self.unit_guard(st).splits_mappings()
                && self.map_budget.fetch_sub(2, Ordering::Relaxed) <= 2
            {
                // (userfaultfd protection lives in page-table entries: no mapping splits.)
                self.counters.block_fault();
                let (lo, hi) = self.bridge(page, block);
                self.capture_run(function, page, cur, slot, lo, hi)
            } else {
                // Sequential writers get the pages ahead of them captured with this one
                // (1, 2, 4, ... up to a block): one signal and one mprotect for many.
                let hi = page.saturating_add(ahead * self.settings.page);
                self.capture_run(function, page, cur, slot, page, hi)
            };
            self.ahead_next.store(end, Ordering::Relaxed);
            self.counters.fault();
            break true;
        };
        self.leave();
        Some(handled)
    }

    /// Copies the unit at `page` (whose BUSY bit this thread holds) into a new slot and
    /// logs it; the caller unprotects it and publishes the slot.
    pub(super) fn capture(&self, function: &str, page: usize, st: PageState) -> u32 {
        let Some(slot) = self.pool.alloc() else {
            crate::fatal!(
                function,
                "out of page-copy slots ({} pages saved); erase or rewind checkpoints to free some",
                self.pool.capacity()
            )
        };
        // SAFETY: this thread holds `slot` and the unit's BUSY bit; tracked pages are
        // readable (protected pages are read-only, never inaccessible).
        unsafe { self.copy_unit(page, st, slot, true) };
        if !self.log.push(page) {
            crate::fatal!(function, "the dirty-page log is full");
        }
        slot
    }

    fn unprotect_failed(function: &str, (at, len, errno): (usize, usize, i32)) -> ! {
        if errno == libc::ENOMEM {
            crate::fatal!(
                function,
                "mprotect of {:#x}+{:#x} failed with ENOMEM: the process hit vm.max_map_count",
                at,
                len
            );
        }
        crate::fatal!(
            function,
            "unprotecting tracked memory {:#x}+{:#x} failed (errno {})",
            at,
            len,
            errno
        )
    }

    /// The run to capture at a fault on `page` once the mapping budget is spent: up to
    /// the nearest unit of its aligned block that is writable already (joining a writable
    /// mapping adds none, bridging two removes two), else the whole block (at most two
    /// more, and no further fault in the block until the next checkpoint).
    fn bridge(&self, page: usize, block: usize) -> (usize, usize) {
        let base = page & !(block - 1);
        let top = base + block;
        let captured = |u: usize| {
            let s = self.table.get(u);
            s.slot().is_some() && !s.busy()
        };
        let mut left = None;
        let mut u = page;
        while u > base {
            u -= self.settings.page;
            if captured(u) {
                left = Some(u);
                break;
            }
        }
        let mut right = None;
        let mut u = page + self.settings.page;
        while u < top {
            if captured(u) {
                right = Some(u);
                break;
            }
            u += self.settings.page;
        }
        match (left, right) {
            (Some(l), Some(r)) if page - l <= r - page => (l, page + self.settings.page),
            (_, Some(r)) => (page, r + self.settings.page),
            (Some(l), None) => (l, page + self.settings.page),
            (None, None) => (base, top),
        }
    }

    /// How many units to capture at a fault on `page`: twice as many as last time when
    /// the fault is exactly where the previous capture ended (a sequential writer), up to
    /// a block; otherwise one. Shared by all threads: a heuristic, and interleaved
    /// writers only make it capture less.
    fn ahead_window(&self, page: usize) -> usize {
        let w = if self.ahead_next.load(Ordering::Relaxed) == page {
            (self.ahead_units.load(Ordering::Relaxed) * 2).clamp(2, BLOCK_PAGES)
        } else {
            1
        };
        self.ahead_units.store(w, Ordering::Relaxed);
        w
    }

    /// Makes `page` (captured into `slot`, BUSY held) writable together with the whole
    /// tracked units of the same execute bit next to it within `[lo, hi)`, capturing each
    /// clean one first, with one protection change. Returns the end of the writable run.
    /// The run stops at a unit another thread is capturing: waiting for it could
    /// deadlock against that thread waiting for ours.
    fn capture_run(
        &self,
        function: &str,
        page: usize,
        st: PageState,
        slot: u32,
        lo: usize,
        hi: usize,
    ) -> usize {
        // Units this call captured, published once all their pre-images are complete.
        let mut mine = [(0usize, 0u32); BLOCK_PAGES];
        let mut n = 0;
        let mut take = |u: usize| -> bool {
            let Some(word) = self.table.word(u) else {
                return false;
            };
            loop {
                let cur = PageState(word.load(Ordering::Acquire));
                if !cur.tracked()
                    || cur.host()
                    || cur.partial()
                    || cur.exec() != st.exec()
                    || cur.uffd() != st.uffd()
                    || cur.busy()
                {
                    return false;
                }
                if cur.slot().is_some() {
                    return true;
                }
                if n == mine.len() {
                    return false;
                }
                if claim(word, cur) {
                    mine[n] = (u, self.capture(function, u, cur));
                    n += 1;
                    return true;
                }
            }
        };
        let mut end = page + self.settings.page;
        while end < hi && take(end) {
            end += self.settings.page;
        }
        let mut start = page;
        while start > lo && take(start - self.settings.page) {
            start -= self.settings.page;
        }
        // Published before the run is made writable, so no unit is writable while still
        // BUSY: a fork child inherits an interrupted capture as clean, unwritten units
        // (see `fork`). Another thread faulting on a published unit meanwhile makes it
        // writable itself.
        for &(u, s) in &mine[..n] {
            self.table.set(u, self.table.get(u).with_slot(s));
        }
        self.table.set(page, st.with_slot(slot));
        // SAFETY: whole tracked units of the host whose pre-images are all saved (by
        // this thread or by the ones that published them).
        if let Err(e) = unsafe { self.set_access(start, end - start, st.exec(), st.uffd(), true) } {
            Self::unprotect_failed(function, (start, end - start, e));
        }
        end
    }

    /// Sets the single-page capture budget after the mappings were counted (`vmas`) and
    /// `reprotected` dirty units were write-protected again, which merges the mappings
    /// their faults split.
    pub(super) fn reset_map_budget(&self, vmas: usize, reprotected: usize) {
        if self.settings.map_limit == 0 {
            return;
        }
        let now = vmas.saturating_sub(2 * reprotected);
        let budget = (self.settings.map_limit / 2) as isize - now as isize;
        self.map_budget.store(budget, Ordering::Relaxed);
    }

    /// `memsnap_prepare_write`: captures every clean tracked page of `[start, end)` now, so
    /// that a system call may write the range (the kernel cannot fault into our handler).
    pub fn prepare_write(&self, start: usize, end: usize) {
        let mut p = start & !(self.settings.sub - 1);
        while p < end {
            let st = self.table.get(p);
            if st.slot().is_some() || self.unit_guard(st).finds_writes_by_scan() {
                // Captured already (writable), or guarded by async userfaultfd, which
                // never blocks a write. (Sync userfaultfd pages are captured: a few kernel
                // paths, FUTEX_WAKE_OP among them, cannot wait for a userfault, and with
                // UFFD_USER_MODE_ONLY none can.)
                p = self.next_unit(p);
            } else if self.tracked_at(p) {
                self.handle_fault("memsnap_prepare_write", p);
                // The whole unit is captured now; skip the rest of it.
                p = self.next_unit(p);
            } else {
                p += self.settings.sub;
            }
        }
    }
}

/// Takes the BUSY bit of a unit whose state word still reads `cur`: the one thread that
/// succeeds copies the unit; the others wait for it or go around.
pub(super) fn claim(word: &AtomicU32, cur: PageState) -> bool {
    word.compare_exchange(
        cur.0,
        cur.0 | PageState::BUSY,
        Ordering::AcqRel,
        Ordering::Acquire,
    )
    .is_ok()
}

/// The callback handed to the platform's fault capture.
pub fn on_write_fault(addr: usize) -> bool {
    match super::get() {
        // A signal is never a userfaultfd-guarded page's write fault.
        Some(e) => e.resolve("HandleDirtyMemoryFault", addr, sys::tid(), false),
        None => false,
    }
}

/// The callback of a fault server that answers for other threads (the macOS exception
/// server): [`on_write_fault`] for a write by thread `writer`, except that while memory
/// changes are disallowed by another thread it answers `None` ("ask again once they are
/// allowed") instead of waiting, so that the server keeps examining the faults queued
/// behind this one (the disallowing thread's own write among them, which aborts).
#[cfg_attr(not(target_os = "macos"), allow(dead_code))]
pub fn on_served_write_fault(addr: usize, writer: u64) -> Option<bool> {
    match super::get() {
        Some(e) => e.resolve_gated("HandleDirtyMemoryFault", addr, writer, false, false),
        None => Some(false),
    }
}
