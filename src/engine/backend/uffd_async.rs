//! The asynchronous userfaultfd backend (`UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`, Linux
//! 6.7): a write to an armed page just clears its uffd-wp bit, with no message and no
//! signal (under a microsecond). Every mapping type registers in this mode.
//!
//! The checkpoint asks the kernel which pages were written (and re-arms them in the same
//! call), so pre-images cannot be taken at write time: the engine keeps a *base copy*,
//! the contents of every populated tracked unit as of the newest checkpoint. At a
//! checkpoint a written unit's pre-image is the delta from its current bytes back to its
//! base, and the base is overwritten with the current bytes (see `preimage`; a unit that
//! changed too much for a delta keeps its old base as a whole pre-image and gets a fresh
//! base). The memory cost is one copy of the resident tracked memory, reported by the
//! stats call (see `budget` for bounding it).
//!
//! This file owns the base copy, the scans for written and populated pages, the undoing
//! of writes no fault reported, and the repairs a fork child needs. The scans run on the
//! controller thread while memory changes are disallowed; they allocate nothing and
//! touch no tracked memory beyond the units they restore.

use core::sync::atomic::{AtomicUsize, Ordering};

use super::super::ranges::Range;
use super::super::{Engine, Meta, TrackedRegion};
use crate::mem::{PageState, PageTable};
use crate::sys;

/// The pre-image of a unit whose contents were all zero (it had no base copy): a slot
/// number the pool never hands out (its capacity stops below it), so an async checkpoint
/// of freshly used memory saves no copy of zeroes. Copying it back writes zeroes;
/// releasing it does nothing.
pub(in crate::engine) const ZERO_SLOT: u32 = PageState::SLOT_MASK - 1;
// The pool's capacity stops at SLOT_MASK - 1 slots, numbered below ZERO_SLOT.
const _: () = assert!(ZERO_SLOT + 1 == PageState::SLOT_MASK);

/// The base copy's state word for a unit: `slot + 1`, or 0.
fn base_slot(word: u32) -> Option<u32> {
    word.checked_sub(1)
}

/// The base copy and the descriptor the scans use, in the engine's own block.
pub(super) struct BaseCopy {
    /// `/proc/self/pagemap`, once the mode is chosen.
    pagemap: sys::AtomicFd<sys::PagemapFd>,
    /// `slot + 1` of each unit's contents at the newest checkpoint (0: the unit was
    /// unpopulated, i.e. zero). Created at initialization when the kernel supports the
    /// async mode.
    table: Option<PageTable>,
    /// Units with a base copy.
    units: AtomicUsize,
}

impl BaseCopy {
    /// Reserves the table when the kernel offers the async mode.
    pub(super) fn new(page_shift: u32) -> Self {
        let table = match sys::uffd_support().async_wp {
            Ok(()) => PageTable::new(super::super::ADDRESS_LIMIT, page_shift),
            Err(_) => None,
        };
        BaseCopy {
            pagemap: sys::AtomicFd::empty(),
            table,
            units: AtomicUsize::new(0),
        }
    }

    pub(super) fn reservation(&self) -> Option<crate::mem::Reservation> {
        self.table.as_ref().map(|t| t.reservation())
    }

    pub(super) fn has_table(&self) -> bool {
        self.table.is_some()
    }

    pub(super) fn units(&self) -> usize {
        self.units.load(Ordering::Relaxed)
    }

    pub(super) fn open_pagemap(&self) -> Result<(), i32> {
        let p = sys::pagemap_open()?;
        self.pagemap.store(p, Ordering::Relaxed);
        Ok(())
    }

    fn pagemap(&self) -> sys::PagemapFd {
        self.pagemap.load(Ordering::Relaxed)
    }
}

/// Arms (`write` false) `[start, start + len)`. Disarming is nothing to do: a write to
/// an armed page simply goes through.
///
/// # Safety
/// As for `Engine::set_access`.
pub(super) unsafe fn set_access(
    fd: sys::UffdFd,
    start: usize,
    len: usize,
    write: bool,
) -> Result<(), i32> {
    if write {
        return Ok(());
    }
    // SAFETY: per this function's contract.
    unsafe { sys::uffd_protect(fd, start, len, true) }
}

impl Engine {
    /// Releases the base copies of the units of `r`.
    pub(in crate::engine) fn drop_base(&self, r: Range) {
        let base = &self.backend.base;
        let Some(table) = &base.table else { return };
        let mut u = self.page_base(r.start);
        while u < r.end {
            if let Some(w) = table.word(u) {
                if let Some(s) = base_slot(w.swap(0, Ordering::AcqRel)) {
                    self.pool.free(s);
                    base.units.fetch_sub(1, Ordering::Relaxed);
                }
            }
            u += self.settings.page;
        }
    }

    /// A region just armed: copies its populated units as their base (the others are
    /// zero, which is what the absence of a base copy means).
    pub(super) fn copy_base(&self, function: &str, r: Range) {
        let Some(table) = &self.backend.base.table else {
            return;
        };
        let mut last = usize::MAX;
        let res = sys::scan_populated(self.backend.base.pagemap(), r.start, r.end, |a, b| {
            let mut u = self.page_base(a).max(self.page_base(r.start));
            while u < b && u < r.end {
                if u != last {
                    last = u;
                    let st = self.table.get(u);
                    if st.tracked()
                        && table
                            .word(u)
                            .is_some_and(|w| w.load(Ordering::Relaxed) == 0)
                    {
                        let slot = self.alloc_slot(function);
                        // SAFETY: a fresh slot of one unit; the unit's tracked spans are
                        // mapped and readable.
                        unsafe { self.copy_unit(u, st, slot, true) };
                        self.set_base(u, Some(slot));
                    }
                }
                u += self.settings.page;
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

    /// Replaces a unit's base copy, releasing the previous one.
    pub(in crate::engine) fn set_base(&self, unit: usize, slot: Option<u32>) {
        let base = &self.backend.base;
        let Some(table) = &base.table else { return };
        let Some(w) = table.word(unit) else { return };
        let old = w.swap(slot.map_or(0, |s| s + 1), Ordering::AcqRel);
        match (base_slot(old), slot) {
            (Some(o), _) => {
                self.pool.free(o);
                if slot.is_none() {
                    base.units.fetch_sub(1, Ordering::Relaxed);
                }
            }
            (None, Some(_)) => {
                base.units.fetch_add(1, Ordering::Relaxed);
            }
            (None, None) => {}
        }
    }

    /// Takes a unit's base copy out of the table (the caller now owns the slot).
    pub(in crate::engine) fn take_base(&self, unit: usize) -> Option<u32> {
        let base = &self.backend.base;
        let s = base_slot(base.table.as_ref()?.word(unit)?.swap(0, Ordering::AcqRel))?;
        base.units.fetch_sub(1, Ordering::Relaxed);
        Some(s)
    }

    pub(in crate::engine) fn peek_base(&self, unit: usize) -> Option<u32> {
        let table = self.backend.base.table.as_ref()?;
        base_slot(table.word(unit)?.load(Ordering::Acquire))
    }

    /// A restored unit's pre-image becomes its base copy (instead of returning to the
    /// pool); returns the slot to release instead, if any.
    pub(in crate::engine) fn rebase(&self, unit: usize, slot: u32) -> Option<u32> {
        let base = &self.backend.base;
        let w = base.table.as_ref()?.word(unit)?;
        let new = if slot == ZERO_SLOT { 0 } else { slot + 1 };
        let old = base_slot(w.swap(new, Ordering::AcqRel));
        match (old.is_some(), new != 0) {
            (false, true) => {
                base.units.fetch_add(1, Ordering::Relaxed);
            }
            (true, false) => {
                base.units.fetch_sub(1, Ordering::Relaxed);
            }
            _ => {}
        }
        old
    }

    /// Whether a unit's tracked bytes are all zero.
    ///
    /// # Safety
    /// The unit's tracked spans are mapped and readable.
    pub(in crate::engine) unsafe fn unit_is_zero(&self, unit: usize, st: PageState) -> bool {
        let mut zero = true;
        self.for_each_span(unit, st, |a, len, _| {
            // SAFETY: per the function's contract.
            let bytes = unsafe { core::slice::from_raw_parts(a as *const u8, len) };
            zero = zero && bytes.iter().all(|&b| b == 0);
        });
        zero
    }

    /// Calls `f(unit)` once for every tracked async unit written since it was last armed,
    /// in address order; `rearm` arms them again in the same kernel call.
    pub(in crate::engine) fn for_each_written(
        &self,
        function: &str,
        regions: &[TrackedRegion],
        rearm: bool,
        mut f: impl FnMut(usize),
    ) {
        let pm = self.backend.base.pagemap();
        for r in regions.iter().filter(|r| r.uffd) {
            let mut last = usize::MAX;
            let res = sys::scan_written(pm, r.range.start, r.range.end, rearm, |a, b| {
                let mut u = self.page_base(a);
                while u < b {
                    if u != last {
                        last = u;
                        f(u);
                    }
                    u += self.settings.page;
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

    /// Whether any tracked unit was written since it was last armed.
    pub(super) fn async_written_since_armed(
        &self,
        function: &str,
        regions: &[TrackedRegion],
    ) -> bool {
        let mut any = false;
        self.for_each_written(function, regions, false, |u| {
            let st = self.table.get(u);
            any |= st.tracked() && st.uffd();
        });
        any
    }

    /// `RestoreMemoryToLastSavedCheckpoint`: every unit written since the newest
    /// checkpoint gets its base copy back (or zeroes), and is armed again.
    pub(super) fn restore_async_written(&self, function: &str, regions: &[TrackedRegion]) {
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

    /// After a restore wrote tracked units: arms every written page again. One scan per
    /// region re-arms them all (tens of nanoseconds per page), where arming run by run
    /// costs a system call per scattered page.
    pub(super) fn rearm_async(&self, function: &str, regions: &[TrackedRegion]) {
        self.for_each_written(function, regions, true, |_| {});
    }

    /// Whether `piece` of a userfaultfd-guarded region is still registered: the kernel
    /// refuses to scan unregistered memory, so one page of it is scanned.
    pub(super) fn async_piece_registered(&self, piece: Range) -> bool {
        let pm = self.backend.base.pagemap();
        let probe = piece.start + self.settings.sub;
        sys::scan_written(pm, piece.start, probe.min(piece.end), false, |_, _| {})
            != Err(libc::EPERM)
    }

    /// In a fork child: the inherited pagemap descriptor reads the parent's page tables;
    /// the child opens its own.
    pub(super) fn async_reopen_in_child(&self, function: &str) {
        sys::pagemap_close(self.backend.base.pagemap());
        if let Err(e) = self.backend.base.open_pagemap() {
            crate::fatal!(
                function,
                "cannot open /proc/self/pagemap in the child (errno {})",
                e
            );
        }
    }

    /// In a fork child once its memory is armed again: writes back, unchanged, one byte
    /// of every populated tracked kernel page that differs from its unit's base copy (or
    /// from zero, without one), so that the next checkpoint's scan lists it (see `fork`'s
    /// module comment: the child's page tables forgot which units were written since the
    /// newest checkpoint).
    ///
    /// Page by page, never unit by unit: with snapshot pages larger than the kernel's,
    /// the rest of a unit may no longer be mapped (a heap trimmed mid-unit, which the next
    /// scan reports), and reading it would fault.
    pub(super) fn mark_units_changed_since_base(&self, function: &str, m: &Meta) {
        let pagemap = self.backend.base.pagemap();
        let sub = self.settings.sub;
        for r in m.regions.iter().filter(|r| r.uffd) {
            let res = sys::scan_populated(pagemap, r.range.start, r.range.end, |a, b| {
                let mut p = a.max(r.range.start) & !(sub - 1);
                while p < b.min(r.range.end) {
                    self.mark_page_if_changed(p);
                    p += sub;
                }
            });
            if let Err(e) = res {
                crate::fatal!(
                    function,
                    "cannot scan tracked memory {:#x}-{:#x} for populated pages in the child (errno {})",
                    r.range.start,
                    r.range.end,
                    e
                );
            }
        }
    }

    fn mark_page_if_changed(&self, p: usize) {
        if !self.tracked_at(p) {
            return;
        }
        let sub = self.settings.sub;
        let unit = self.page_base(p);
        // SAFETY: a tracked kernel page the pagemap reports populated: mapped and readable
        // (this child's only thread is here, nothing unmaps it meanwhile).
        let now = unsafe { core::slice::from_raw_parts(p as *const u8, sub) };
        let changed = match self.peek_base(unit) {
            Some(slot) => {
                // SAFETY: the slot holds the unit's base copy, one unit long; only read.
                let base = unsafe { self.pool.bytes(slot) };
                now != &base[p - unit..p - unit + sub]
            }
            None => now.iter().any(|&b| b != 0),
        };
        if changed {
            // SAFETY: as above, and writable: the byte is written back unchanged.
            unsafe {
                let b = core::ptr::read_volatile(p as *const u8);
                core::ptr::write_volatile(p as *mut u8, b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::ZERO_SLOT;
    use crate::mem::PageState;

    #[test]
    fn zero_pre_image_is_never_a_real_slot() {
        let st = PageState(PageState::TRACKED).with_slot(ZERO_SLOT);
        assert_eq!(st.slot(), Some(ZERO_SLOT));
        assert!(st.tracked() && !st.uffd());
        let st = PageState(PageState::TRACKED | PageState::UFFD).with_slot(3);
        assert!(st.uffd() && st.clean().uffd() && st.clean().slot().is_none());
    }
}
