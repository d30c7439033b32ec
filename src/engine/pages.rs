//! Snapshot pages of host memory: marking them tracked or untracked, and copying,
//! comparing and protecting one snapshot page clipped to the kernel pages of it that are
//! tracked (see `granule` for why a snapshot page can be partly tracked).
//!
//! When the snapshot page equals the kernel page every unit is whole and each operation
//! here is the one call it always was; the mask table does not even exist.

use core::sync::atomic::Ordering;

use super::granule::{bits_in, Mask};
use super::ranges::Range;
use super::{Engine, TrackedRegion};
use crate::mem::PageState;
use crate::sys;

impl Engine {
    /// The kernel pages of the unit at `unit` that are tracked, given its state word.
    pub(super) fn mask(&self, unit: usize, st: PageState) -> Mask {
        if !st.tracked() {
            Mask::default()
        } else if st.partial() {
            match &self.masks {
                Some(t) => Mask(t.word(unit).map_or(0, |w| w.load(Ordering::Acquire))),
                None => Mask::default(),
            }
        } else {
            Mask::uniform(self.subpages(), st.exec())
        }
    }

    /// How many kernel pages one snapshot page spans.
    pub(super) fn subpages(&self) -> usize {
        self.settings.page / self.settings.sub
    }

    /// Calls `f(addr, len, exec)` for each tracked span of the unit at `unit`: the whole
    /// unit unless it is partial (callers only pass units they have a copy slot or a
    /// tracked state for).
    pub(super) fn for_each_span(
        &self,
        unit: usize,
        st: PageState,
        mut f: impl FnMut(usize, usize, bool),
    ) {
        if st.partial() {
            self.mask(unit, st)
                .for_each_span(self.settings.sub, |off, len, exec| f(unit + off, len, exec));
        } else {
            f(unit, self.settings.page, st.exec());
        }
    }

    /// Whether the byte at `addr` is tracked.
    pub fn tracked_at(&self, addr: usize) -> bool {
        let st = self.table.get(addr);
        if !st.partial() {
            return st.tracked();
        }
        let unit = self.page_base(addr);
        let bit = (addr - unit) / self.settings.sub;
        self.mask(unit, st).tracked() & (1 << bit) != 0
    }

    /// The first address at or after `p` that starts the next unit.
    pub(super) fn next_unit(&self, p: usize) -> usize {
        self.page_base(p) + self.settings.page
    }

    /// Marks every kernel page of `r` (kernel-page aligned) tracked, with execute bit
    /// `exec`. A unit that already has a pre-image copy gets the current bytes of its newly
    /// tracked pages copied in, so the copy stays a faithful pre-image of the whole unit.
    /// `uffd`: the range is guarded by userfaultfd (whole units only, see
    /// `split_by_guard`).
    pub(super) fn mark(&self, r: Range, exec: bool, uffd: bool) {
        self.update(r, Some(uffd), |mask, bits| mask.with(bits, exec));
    }

    /// Marks every kernel page of `r` untracked; copy slots stay, for the dirty-log pass
    /// to release.
    pub(super) fn unmark(&self, r: Range) {
        self.update(r, None, |mask, bits| mask.without(bits));
    }

    fn update(&self, r: Range, uffd: Option<bool>, change: impl Fn(Mask, u32) -> Mask) {
        let n = self.subpages();
        let mut unit = self.page_base(r.start);
        while unit < r.end {
            let bits = bits_in(unit, self.settings.page, self.settings.sub, r.start, r.end);
            if let Some(word) = self.table.word(unit) {
                // A fault handler may be copying a neighbouring part of a partial unit:
                // wait for it, then swap the state in one step.
                loop {
                    let cur = PageState(word.load(Ordering::Acquire));
                    if cur.busy() {
                        sys::yield_now();
                        continue;
                    }
                    let old = self.mask(unit, cur);
                    let new = change(old, bits);
                    let keep = cur.0 & (PageState::SLOT_MASK | PageState::HOST)
                        | match uffd {
                            Some(true) => PageState::UFFD,
                            Some(false) => 0,
                            None => cur.0 & PageState::UFFD,
                        };
                    let next = if new.is_empty() {
                        keep & PageState::SLOT_MASK
                    } else if let Some(exec) = new.is_uniform(n) {
                        keep | PageState::TRACKED | if exec { PageState::EXEC } else { 0 }
                    } else {
                        if let Some(t) = &self.masks {
                            if let Some(w) = t.word(unit) {
                                w.store(new.0, Ordering::Release);
                            }
                        }
                        keep | PageState::TRACKED | PageState::PARTIAL
                    };
                    if word
                        .compare_exchange(cur.0, next, Ordering::AcqRel, Ordering::Acquire)
                        .is_err()
                    {
                        continue;
                    }
                    let added = new.tracked() & !old.tracked();
                    if let (Some(slot), true) = (cur.slot(), added != 0) {
                        Mask(added).for_each_span(self.settings.sub, |off, len, _| {
                            // SAFETY: the slot is this unit's pre-image, a whole unit
                            // long; the newly tracked pages are mapped and readable.
                            unsafe {
                                let copy = self.pool.bytes(slot);
                                core::ptr::copy_nonoverlapping(
                                    (unit + off) as *const u8,
                                    copy.as_mut_ptr().add(off),
                                    len,
                                );
                            }
                        });
                    }
                    break;
                }
            }
            unit += self.settings.page;
        }
    }

    /// Gives the tracked spans of a unit read-only (`write == false`) or read-write access,
    /// each with its own execute bit. Returns the failing span and errno.
    pub(super) fn protect_unit(
        &self,
        unit: usize,
        st: PageState,
        write: bool,
    ) -> Result<(), (usize, usize, i32)> {
        let mut result = Ok(());
        self.for_each_span(unit, st, |addr, len, exec| {
            // SAFETY: tracked host memory, whose protection the engine owns.
            if let Err(e) = unsafe { self.set_access(addr, len, exec, st.uffd(), write) } {
                if result.is_ok() {
                    result = Err((addr, len, e));
                }
            }
        });
        result
    }

    /// A free copy slot; running out ends the process.
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

    /// Returns a pre-image slot to the pool (the zero pre-image is no slot).
    pub(super) fn release_slot(&self, slot: u32) {
        if slot != super::backend::ZERO_SLOT {
            self.pool.free(slot);
        }
    }

    /// Copies the tracked spans of a unit into `slot` (`to_slot`) or back.
    ///
    /// # Safety
    /// `slot` is held by the caller; the unit's tracked spans are mapped, readable, and
    /// writable too when copying back.
    pub(super) unsafe fn copy_unit(&self, unit: usize, st: PageState, slot: u32, to_slot: bool) {
        if slot == super::backend::ZERO_SLOT {
            // The zero pre-image (async mode): nothing to read, zeroes to write back.
            debug_assert!(!to_slot);
            self.for_each_span(unit, st, |addr, len, _| {
                // SAFETY: per the function's contract, the spans are writable.
                unsafe { core::ptr::write_bytes(addr as *mut u8, 0, len) }
            });
            return;
        }
        // SAFETY: per the function's contract; spans lie within the unit and the slot is
        // one unit long.
        unsafe {
            let copy = self.pool.bytes(slot).as_mut_ptr();
            self.for_each_span(unit, st, |addr, len, _| {
                let saved = copy.add(addr - unit);
                if to_slot {
                    core::ptr::copy_nonoverlapping(addr as *const u8, saved, len);
                } else {
                    core::ptr::copy_nonoverlapping(saved, addr as *mut u8, len);
                }
            });
        }
    }

    /// Whether a unit's tracked bytes equal its copy in `slot`.
    ///
    /// # Safety
    /// As for [`Engine::copy_unit`].
    pub(super) unsafe fn unit_matches(&self, unit: usize, st: PageState, slot: u32) -> bool {
        let mut same = true;
        // SAFETY: per the function's contract.
        unsafe {
            let copy = self.pool.bytes(slot);
            self.for_each_span(unit, st, |addr, len, _| {
                let off = addr - unit;
                same = same
                    && core::slice::from_raw_parts(addr as *const u8, len) == &copy[off..off + len];
            });
        }
        same
    }

    /// Write-protects the listed units (`unit(0..n)`, sorted) now that they are clean.
    /// A partial unit is protected span by span. Whole units are covered by merged spans:
    /// from a listed unit to the last listed unit inside the same stretch of adjacent
    /// tracked regions with one execute bit. The clean units in between are read-only
    /// already and the kernel skips their mappings without touching their pages, so
    /// scattered dirty pages cost one call (one lock hold, one TLB flush) per stretch
    /// instead of one per page. Returns the first failing range and errno (ENOMEM when
    /// part of it is no longer mapped).
    ///
    /// `walked`: the region walk has vouched for the clean units since they were last
    /// protected. Before it has, a span may cover clean units only if the kernel confirms
    /// that none of them is writable: a clean unit the host unmapped and mapped afresh is
    /// writable, which is how the walk notices it, and protecting it first would hide
    /// that. Otherwise the listed units are protected run by run.
    ///
    /// Userfaultfd-guarded units are armed run by run: arming walks every page-table entry
    /// of its range, so a span over clean units costs in proportion to its length. Async
    /// units are skipped unless `arm_async` (a checkpoint's scan armed them already).
    pub(super) fn write_protect(
        &self,
        regions: &[TrackedRegion],
        n: usize,
        unit: impl Fn(usize) -> usize,
        walked: bool,
        arm_async: bool,
    ) -> Result<(), (usize, usize, i32)> {
        let protect = |start: usize, stop: usize, exec: bool, uffd: bool| {
            // SAFETY: tracked host memory (a stretch of tracked regions), whose
            // protection the engine owns; the listed units in it are done being written
            // and the others are clean.
            unsafe { self.set_access(start, stop - start, exec, uffd, false) }
                .map_err(|e| (start, stop - start, e))
        };
        let mut i = 0;
        while i < n {
            let u = unit(i);
            let st = self.table.get(u);
            if !st.tracked() || (!arm_async && self.unit_guard(st).finds_writes_by_scan()) {
                // Gone since (the scan untracked it), or armed already: nothing to do.
                i += 1;
                continue;
            }
            let r = regions.partition_point(|x| x.range.end <= u);
            if st.partial() || r == regions.len() || !regions[r].range.contains(u) {
                self.protect_unit(u, st, false)?;
                i += 1;
                continue;
            }
            let exec = regions[r].exec;
            let uffd = regions[r].uffd;
            let mut end = regions[r].range.end;
            let mut k = r + 1;
            while k < regions.len()
                && regions[k].range.start == end
                && regions[k].exec == exec
                && regions[k].uffd == uffd
            {
                end = regions[k].range.end;
                k += 1;
            }
            let first = i;
            let mut last = u;
            i += 1;
            while i < n && unit(i) < end && !self.table.get(unit(i)).partial() {
                last = unit(i);
                i += 1;
            }
            let stop = (last + self.settings.page).min(end);
            if !uffd && (walked || self.no_clean_writable(u, stop)) {
                protect(u, stop, exec, false)?;
                continue;
            }
            // Run by run over the listed units, leaving the clean ones to the walk.
            let mut a = first;
            while a < i {
                let mut b = a + 1;
                while b < i && unit(b) == unit(b - 1) + self.settings.page {
                    b += 1;
                }
                protect(
                    unit(a),
                    (unit(b - 1) + self.settings.page).min(end),
                    exec,
                    uffd,
                )?;
                a = b;
            }
        }
        Ok(())
    }

    /// Whether the kernel confirms that no clean tracked unit of `[start, stop)` is
    /// writable (it lists only the writable mappings, which should all be dirty units).
    fn no_clean_writable(&self, start: usize, stop: usize) -> bool {
        let mut clean = false;
        let known = sys::for_each_writable_mapping(start, stop, |a, b| {
            let mut p = self.page_base(a);
            while p < b && !clean {
                let st = self.table.get(p);
                clean = st.tracked() && st.slot().is_none();
                p += self.settings.page;
            }
        });
        known && !clean
    }

    /// [`Engine::write_protect`] across clean units (the walk has run), aborting with a
    /// message naming `function` on failure.
    pub(super) fn write_protect_or_die(
        &self,
        function: &str,
        regions: &[TrackedRegion],
        n: usize,
        unit: impl Fn(usize) -> usize,
    ) {
        if let Err((at, len, e)) = self.write_protect(regions, n, unit, true, true) {
            crate::fatal!(
                function,
                "cannot write-protect {:#x}+{:#x} (errno {})",
                at,
                len,
                e
            );
        }
    }
}
