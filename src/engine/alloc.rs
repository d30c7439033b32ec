//! Memory the host obtains or returns through the library (`AllocateMemory` and friends),
//! the host's declarations of tracked and untracked ranges, and the range queries.
//!
//! Arguments arrive validated by the C ABI layer (aligned where required, no wrap-around).

use core::sync::atomic::Ordering;

use super::free::FreeSet;
use super::ranges::{Range, RangeSet};
use super::{Engine, Meta, Phase, TrackedRegion, KIND_TRACKED};
use crate::sys;

impl Engine {
    fn kind_index(kind: usize) -> usize {
        kind.min(super::MEMORY_KINDS - 1)
    }

    /// `AllocateMemoryTryAddress`: zeroed memory of `size` bytes (page multiple), at
    /// `hint` if possible. Tracked memory comes from the free set first once armed.
    pub fn allocate(&self, function: &str, hint: usize, size: usize, kind: usize) -> *mut u8 {
        self.balance[Self::kind_index(kind)].fetch_add(size as isize, Ordering::Relaxed);
        if kind == KIND_TRACKED && self.armed() {
            let got = FreeSet::extract(&mut self.meta.lock().free, hint, size);
            if let Some(p) = got {
                // Tracked writes: they fault and are captured like any other.
                // SAFETY: the range was free tracked memory, now owned by the caller.
                unsafe { core::ptr::write_bytes(p as *mut u8, 0, size) };
                return p as *mut u8;
            }
        }
        let mapped = if kind == KIND_TRACKED {
            self.map_units(hint, size)
        } else {
            sys::map_with_hint(hint, size)
        };
        let Some(p) = mapped else {
            crate::fatal!(function, "out of memory mapping {} bytes", size)
        };
        self.register_allocated(function, p as usize, size, kind);
        p
    }

    /// Maps `size` bytes (a multiple of the snapshot page) aligned to the snapshot page,
    /// so that tracked allocations never share a unit with other memory (untracked ones
    /// need no such alignment and honour any kernel-page-aligned hint).
    fn map_units(&self, hint: usize, size: usize) -> Option<*mut u8> {
        if self.settings.page == self.settings.sub {
            return sys::map_with_hint(hint, size);
        }
        if hint != 0 && hint % self.settings.page == 0 {
            if let Some(p) = sys::map_with_hint(hint, size) {
                if p as usize % self.settings.page == 0 {
                    return Some(p);
                }
                // SAFETY: just mapped, nobody else knows it.
                unsafe { sys::release(p, size) };
            }
        }
        let slack = self.settings.page - self.settings.sub;
        let p = sys::map_with_hint(0, size.checked_add(slack)?)? as usize;
        let start = crate::mem::round_up(p, self.settings.page)?;
        // SAFETY: the head and tail trimmed off were just mapped here and are not used.
        unsafe {
            if start > p {
                sys::release(p as *mut u8, start - p);
            }
            let tail = p + size + slack - (start + size);
            if tail > 0 {
                sys::release((start + size) as *mut u8, tail);
            }
        }
        Some(start as *mut u8)
    }

    /// `RegisterAllocatedMemory`: records memory the host just obtained from the system.
    pub fn register_allocated(&self, function: &str, base: usize, size: usize, kind: usize) {
        let r = Range::new(base, base + size);
        if r.is_empty() {
            return;
        }
        if kind != KIND_TRACKED {
            let mut m = self.meta.lock();
            if !RangeSet::insert(&mut m.untracked, r) {
                crate::fatal!(function, "out of room for untracked ranges");
            }
            return;
        }
        match self.phase() {
            Phase::Failed => {}
            Phase::Initialized => {
                let mut m = self.meta.lock();
                let region = TrackedRegion {
                    range: r,
                    exec: false,
                    born: 0,
                    allocated: true,
                    uffd: false,
                };
                if m.registered.push(region).is_err() || m.allocated.push(r).is_err() {
                    crate::fatal!(function, "out of room for tracked ranges");
                }
            }
            Phase::Armed => {
                self.wait_allowed(function, base);
                let mut m = self.meta.lock();
                let born = m.checkpoints.len();
                m.scratch.work.clear();
                {
                    let Meta {
                        regions,
                        scratch: super::Scratch { work, .. },
                        ..
                    } = &mut *m;
                    let mut cursor = r.start;
                    let mut i = regions.partition_point(|x| x.range.end <= r.start);
                    while cursor < r.end {
                        let next = if i < regions.len() && regions[i].range.start < r.end {
                            regions[i].range
                        } else {
                            Range::new(r.end, r.end)
                        };
                        if next.start > cursor {
                            let _ = work.push(Range::new(cursor, next.start));
                        }
                        cursor = cursor.max(next.end);
                        i += 1;
                    }
                }
                for j in 0..m.scratch.work.len() {
                    let piece = m.scratch.work[j];
                    self.track(
                        function,
                        &mut m,
                        TrackedRegion {
                            range: piece,
                            exec: false,
                            born,
                            allocated: true,
                            uffd: false,
                        },
                    );
                }
                if m.allocated.push(r).is_err() {
                    crate::fatal!(function, "out of room for tracked ranges");
                }
            }
        }
    }

    /// `DeallocateMemory`: before the first snapshot memory returns to the system; after
    /// it, tracked memory joins the free set (it may still be needed by a rewind) and
    /// untracked memory is unmapped. Tracked memory must be memory memsnap handed out
    /// (AllocateMemory or RegisterAllocatedMemory, Tracked) and not free already: anything
    /// else would let a later allocation hand out, and zero, live data. Untracked memory
    /// must not be memsnap's own, nor tracked (deallocated under the wrong kind).
    /// `[start, end)` arrives widened to kernel pages.
    pub fn deallocate(&self, function: &str, start: usize, end: usize, kind: usize) {
        let mut r = Range::new(start, end);
        if start == 0 || r.is_empty() {
            return;
        }
        let mut m = self.meta.lock();
        if kind == KIND_TRACKED {
            let handed_out = |m: &Meta, r: Range| {
                if self.phase() == Phase::Initialized {
                    m.allocated
                        .iter()
                        .any(|a| a.start <= r.start && r.end <= a.end)
                } else {
                    Self::allocated_covers(m, r)
                }
            };
            // AllocateMemory rounded the size up to whole snapshot pages: so does this,
            // unless the memory was registered in smaller pieces.
            if let Some(w) = r
                .widen_to_pages(self.settings.page)
                .filter(|&w| handed_out(&m, w))
            {
                r = w;
            }
            if !handed_out(&m, r) {
                crate::fatal!(
                    function,
                    "range {:#x}-{:#x} was not allocated by AllocateMemory or RegisterAllocatedMemory with MemoryKind::Tracked",
                    r.start,
                    r.end
                );
            }
            if self.phase() != Phase::Initialized {
                if FreeSet::intersects(&m.free, r) {
                    crate::fatal!(
                        function,
                        "range {:#x}-{:#x} is already free (deallocated twice?)",
                        r.start,
                        r.end
                    );
                }
                FreeSet::insert(&mut m.free, r);
                drop(m);
                self.balance[KIND_TRACKED].fetch_sub(r.len() as isize, Ordering::Relaxed);
                return;
            }
            m.registered.retain(|x| !x.range.intersects(&r));
            m.allocated
                .retain(|a| !(r.start <= a.start && a.end <= r.end));
        } else {
            if RangeSet::intersects(&m.own, r) {
                crate::fatal!(
                    function,
                    "range {:#x}-{:#x} overlaps memsnap's own memory",
                    r.start,
                    r.end
                );
            }
            if m.regions.iter().any(|x| x.range.intersects(&r)) {
                crate::fatal!(
                    function,
                    "range {:#x}-{:#x} is tracked memory (deallocate it with MemoryKind::Tracked)",
                    r.start,
                    r.end
                );
            }
            RangeSet::remove(&mut m.untracked, r);
        }
        drop(m);
        self.balance[Self::kind_index(kind)].fetch_sub(r.len() as isize, Ordering::Relaxed);
        // SAFETY: the host hands this memory back; it obtained it from the system, and it
        // is neither memsnap's own nor tracked.
        unsafe { sys::release(start as *mut u8, r.len()) };
    }

    /// Whether allocated tracked regions cover all of `r`, without gaps.
    fn allocated_covers(m: &Meta, r: Range) -> bool {
        let mut cursor = r.start;
        let mut i = m.regions.partition_point(|x| x.range.end <= cursor);
        while cursor < r.end {
            match m.regions.get(i) {
                Some(x) if x.allocated && x.range.contains(cursor) => cursor = x.range.end,
                _ => return false,
            }
            i += 1;
        }
        true
    }

    /// `AddInitialUntrackedMemoryRegion` (before the first snapshot).
    pub fn add_untracked(&self, function: &str, r: Range) {
        let mut m = self.meta.lock();
        if !RangeSet::insert(&mut m.untracked, r) {
            crate::fatal!(function, "out of room for untracked ranges");
        }
    }

    /// `AddInitialTrackedMemoryRegions` (before the first snapshot).
    pub fn add_tracked(&self, function: &str, r: Range, exec: bool) {
        let mut m = self.meta.lock();
        let region = TrackedRegion {
            range: r,
            exec,
            born: 0,
            allocated: false,
            uffd: false,
        };
        if m.registered.push(region).is_err() {
            crate::fatal!(function, "out of room for tracked ranges");
        }
    }

    /// The first untracked kernel page of `[addr, end)`, if any.
    fn first_untracked(&self, addr: usize, end: usize) -> Option<usize> {
        let mut p = addr & !(self.settings.sub - 1);
        while p < end {
            let st = self.table.get(p);
            if !st.tracked() || (st.partial() && !self.tracked_at(p)) {
                return Some(p);
            }
            p = if st.partial() {
                p + self.settings.sub
            } else {
                self.next_unit(p)
            };
        }
        None
    }

    /// Whether every byte of `[addr, end)` is tracked.
    pub fn range_is_tracked(&self, addr: usize, end: usize) -> bool {
        self.first_untracked(addr, end).is_none()
    }

    /// `CheckFixedMemory`.
    pub fn check_fixed(&self, function: &str, start: usize, end: usize) {
        if !self.armed() {
            return;
        }
        if let Some(p) = self.first_untracked(start, end) {
            crate::fatal!(
                function,
                "fixed memory {:#x}-{:#x} is not tracked (page {:#x})",
                start,
                end,
                p
            );
        }
        if FreeSet::intersects(&self.meta.lock().free, Range::new(start, end)) {
            crate::fatal!(
                function,
                "fixed memory {:#x}-{:#x} is currently free",
                start,
                end
            );
        }
    }

    /// `RestoreWritableFixedMemory`: dirty pages of the range become writable again.
    pub fn restore_writable_fixed(&self, start: usize, end: usize) {
        if !self.armed() {
            return;
        }
        let mut p = self.page_base(start);
        while p < end {
            let st = self.table.get(p);
            if st.host() {
                // The host's own protection lacks write there (see `host`): kept.
            } else if st.tracked() && self.unit_guard(st).mapping_stays_writable() {
                // Userfaultfd-guarded: the mapping itself must be writable again (the
                // uffd-wp bit, which mprotect keeps, still guards the clean pages), and a
                // dirty page must be disarmed (sync; async pages are never armed for long).
                // SAFETY: tracked host memory whose protection the engine owns.
                let _ = unsafe {
                    sys::protect(
                        p,
                        self.settings.page,
                        sys::Access::ReadWrite { exec: st.exec() },
                    )
                };
                if st.slot().is_some() {
                    let _ = self.protect_unit(p, st, true);
                }
            } else if st.tracked() && st.slot().is_some() {
                // A dirty tracked unit is writable by design.
                let _ = self.protect_unit(p, st, true);
            }
            p += self.settings.page;
        }
    }
}
