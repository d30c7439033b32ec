//! Saving and restoring pre-images: at a checkpoint, each dirty unit's pre-image is kept
//! as a delta against the unit's current bytes when that pays (see `delta`), as a whole
//! copy otherwise; a restore applies either; folding two diffs composes their deltas.
//!
//! The delta bytes live in `Meta::deltas`, a stack that follows the diff stack: each
//! diff's deltas sit above the previous diff's (`Checkpoint::delta_start`), so pushing a
//! checkpoint appends, rewinding one truncates, and erasing one (which always folds the
//! two diffs at the top) rewrites the top of the stack.
//!
//! A delta is encoded against the bytes the unit has when the checkpoint is taken, which
//! are the bytes a rewind to this diff finds: the newer checkpoint's, restored first.
//! Units only partly tracked keep whole copies (their untracked kernel pages may be
//! unmapped, and a copy is clipped to the tracked spans).
//!
//! In the async userfaultfd mode this is also what makes a checkpoint cost a memcpy per
//! dirty unit: the base copy (the unit's bytes at the newest checkpoint) is overwritten in
//! place with the current bytes once the delta is encoded, so no fresh slot is needed.

use super::backend::ZERO_SLOT;
use super::delta;
use super::dirty::{fold_into_predecessor, DiffEntry};
use super::{Engine, TrackedRegion};
use crate::mem::{FreeChain, PageState, RawVec};

/// How much of a unit (and of its base copy) is prefetched ahead of handling it: enough
/// to start the next unit's address translations and first lines while this one is
/// encoded; the hardware's prefetcher follows the rest. (A kilobyte of prefetches
/// measured no better: they wait for free line-fill buffers.)
const PREFETCH_BYTES: usize = 128;

/// A hint to load the cache line at `addr`; never faults.
#[inline(always)]
fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch(addr as *const i8, core::arch::x86_64::_MM_HINT_T0)
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

impl Engine {
    /// The words of a whole unit.
    ///
    /// # Safety
    /// The unit is mapped and readable, and nothing writes it while the slice lives.
    unsafe fn unit_words<'a>(&self, unit: usize) -> &'a [u64] {
        // SAFETY: per the function's contract; units are page-aligned and whole.
        unsafe { core::slice::from_raw_parts(unit as *const u64, self.settings.page / 8) }
    }

    /// The words of a copy slot.
    ///
    /// # Safety
    /// The caller holds `slot` (not `ZERO_SLOT`) and no one else accesses it.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slot_words(&self, slot: u32) -> &mut [u64] {
        // SAFETY: per the function's contract; slots are page-aligned and a unit long.
        unsafe {
            let b = self.pool.bytes(slot);
            core::slice::from_raw_parts_mut(b.as_mut_ptr() as *mut u64, b.len() / 8)
        }
    }

    /// Encodes the delta taking the unit's current bytes back to `pre` (a slot, or zeroes
    /// for `None`) at the top of the delta stack, without committing it. Its length (0:
    /// the bytes did not change), or `None` when it would take more than half a unit.
    ///
    /// # Safety
    /// The unit is whole, mapped and readable; the caller holds `pre`.
    unsafe fn encode_at_top(
        &self,
        deltas: &mut RawVec<u8>,
        unit: usize,
        pre: Option<u32>,
    ) -> Option<usize> {
        let top = deltas.len();
        // SAFETY: bytes are plain data; only the room above the top is written.
        let spare = unsafe { deltas.spare() };
        let end = (top + self.settings.page / 2).min(spare.len());
        let room = &mut spare[top..end];
        // SAFETY: per the function's contract.
        let now = unsafe { self.unit_words(unit) };
        match pre {
            // SAFETY: the caller holds the slot.
            Some(s) => delta::encode(unsafe { self.slot_words(s) }, now, room),
            None => delta::encode_from_zero(now, room),
        }
    }

    /// A checkpoint's handling of a unit captured by a fault (its pre-image whole in
    /// `slot`): the entry to save, or `None` when its bytes did not change (the slot is
    /// released). A delta that pays replaces the copy.
    ///
    /// # Safety
    /// The unit is tracked, mapped and readable; `slot` is its pre-image.
    pub(super) unsafe fn save_captured(
        &self,
        deltas: &mut RawVec<u8>,
        page: usize,
        st: PageState,
        slot: u32,
    ) -> Option<DiffEntry> {
        if st.partial() {
            // SAFETY: per the function's contract.
            if unsafe { self.unit_matches(page, st, slot) } {
                self.release_slot(slot);
                return None;
            }
            return Some(DiffEntry::full(page, slot));
        }
        // SAFETY: per the function's contract.
        match unsafe { self.encode_at_top(deltas, page, Some(slot)) } {
            Some(0) => {
                self.release_slot(slot);
                None
            }
            Some(len) => {
                self.release_slot(slot);
                Some(self.commit_delta(deltas, page, len))
            }
            None => Some(DiffEntry::full(page, slot)),
        }
    }

    /// Makes the delta just encoded at the top of the stack part of it.
    fn commit_delta(&self, deltas: &mut RawVec<u8>, page: usize, len: usize) -> DiffEntry {
        let at = deltas.len();
        // SAFETY: the bytes up to at + len were just written by the encoder.
        unsafe { deltas.set_len(at + len) };
        DiffEntry::delta(page, at, len)
    }

    /// Async mode, at a checkpoint: every unit written since the newest checkpoint whose
    /// bytes changed gets an entry in `out` (in address order), with its base copy as its
    /// pre-image; its current bytes become its base. The scan arms the written pages
    /// again.
    pub(super) fn collect_async(
        &self,
        function: &str,
        regions: &[TrackedRegion],
        deltas: &mut RawVec<u8>,
        out: &mut RawVec<DiffEntry>,
    ) {
        // Each unit is handled while the next one's bytes and base copy are fetched:
        // the units are scattered, and reading them is most of the work.
        let mut pending = None;
        let mut handle = |u: usize| {
            let st = self.table.get(u);
            if !st.tracked() || !self.unit_guard(st).finds_writes_by_scan() || st.slot().is_some() {
                return;
            }
            let e = if st.partial() {
                // SAFETY: the unit is tracked and readable.
                match unsafe { self.collect_partial(function, u, st) } {
                    Some(e) => e,
                    None => return,
                }
            } else {
                // SAFETY: as above; async units are whole and never write-protected
                // against reads.
                match unsafe { self.collect_whole(function, deltas, u, st) } {
                    Some(e) => e,
                    None => return,
                }
            };
            if out.push(e).is_err() {
                crate::fatal!(function, "out of room for saved pages");
            }
        };
        self.for_each_written(function, regions, true, |u| {
            self.prefetch_unit(u);
            if let Some(p) = pending.replace(u) {
                handle(p);
            }
        });
        if let Some(p) = pending {
            handle(p);
        }
    }

    /// Asks the CPU to start loading the first lines of a unit and of its base copy.
    fn prefetch_unit(&self, u: usize) {
        let base = self.peek_base(u).map(|s| self.pool.slot_addr(s));
        for line in (0..PREFETCH_BYTES.min(self.settings.page)).step_by(64) {
            prefetch(u + line);
            if let Some(b) = base {
                prefetch(b + line);
            }
        }
    }

    /// [`Engine::collect_async`] for a whole unit: the delta from its current bytes back
    /// to its base, when that pays, with the base overwritten in place; otherwise the base
    /// copy becomes the pre-image and a fresh slot the base.
    ///
    /// # Safety
    /// The unit is tracked, whole, mapped and readable.
    unsafe fn collect_whole(
        &self,
        function: &str,
        deltas: &mut RawVec<u8>,
        u: usize,
        st: PageState,
    ) -> Option<DiffEntry> {
        let base = self.peek_base(u);
        // SAFETY: per the function's contract; the base slot is the engine's.
        let encoded = unsafe { self.encode_at_top(deltas, u, base) };
        match (encoded, base) {
            (Some(0), _) => None,
            (Some(len), Some(b)) => {
                // SAFETY: the base slot is the engine's; the unit is readable.
                unsafe { self.copy_unit(u, st, b, true) };
                Some(self.commit_delta(deltas, u, len))
            }
            (Some(len), None) => {
                let now = self.alloc_slot(function);
                // SAFETY: a fresh slot; the unit is readable.
                unsafe { self.copy_unit(u, st, now, true) };
                self.set_base(u, Some(now));
                Some(self.commit_delta(deltas, u, len))
            }
            (None, _) => {
                let pre = self.take_base(u).unwrap_or(ZERO_SLOT);
                let now = self.alloc_slot(function);
                // SAFETY: a fresh slot; the unit is readable.
                unsafe { self.copy_unit(u, st, now, true) };
                self.set_base(u, Some(now));
                Some(DiffEntry::full(u, pre))
            }
        }
    }

    /// [`Engine::collect_async`] for a partly tracked unit: whole copies, clipped to its
    /// tracked spans.
    ///
    /// # Safety
    /// The unit's tracked spans are mapped and readable.
    unsafe fn collect_partial(&self, function: &str, u: usize, st: PageState) -> Option<DiffEntry> {
        let same = match self.peek_base(u) {
            // SAFETY: per the function's contract; `s` is the unit's base slot.
            Some(s) => unsafe { self.unit_matches(u, st, s) },
            // SAFETY: per the function's contract.
            None => unsafe { self.unit_is_zero(u, st) },
        };
        if same {
            return None;
        }
        let pre = self.take_base(u).unwrap_or(ZERO_SLOT);
        let now = self.alloc_slot(function);
        // SAFETY: a fresh slot; the unit is readable.
        unsafe { self.copy_unit(u, st, now, true) };
        self.set_base(u, Some(now));
        Some(DiffEntry::full(u, pre))
    }

    /// Restores one saved unit (writable, holding the bytes of the checkpoint after the
    /// entry's): its pre-image is written back and the unit marked clean. An async unit's
    /// base copy becomes the pre-image too; slots no longer needed go to `freed`.
    ///
    /// # Safety
    /// The unit's tracked spans are writable and nothing else runs on them; the entry's
    /// slot (if any) is consumed here, and its delta lies in `deltas`.
    pub(super) unsafe fn restore_entry(&self, e: &DiffEntry, deltas: &[u8], freed: &mut FreeChain) {
        let st = self.table.get(e.page);
        if !e.is_delta() {
            // SAFETY: per the function's contract.
            unsafe { self.copy_unit(e.page, st, e.slot, false) };
            self.table.set(e.page, st.clean());
            if self.unit_guard(st).keeps_base_copy() {
                // The restored bytes are the unit's contents at the checkpoint that is
                // now the newest: its pre-image becomes its base copy.
                if let Some(old) = self.rebase(e.page, e.slot) {
                    freed.add(old);
                }
            } else if e.slot != ZERO_SLOT {
                freed.add(e.slot);
            }
            return;
        }
        let d = &deltas[e.delta_range()];
        // SAFETY: per the function's contract.
        unsafe { self.apply_to_unit(e.page, st, d) };
        self.table.set(e.page, st.clean());
        if self.unit_guard(st).keeps_base_copy() {
            match self.peek_base(e.page) {
                // The base held the newer bytes, as memory did: it moves back alike.
                Some(b) => {
                    // SAFETY: the base slot is the engine's, touched by this thread only.
                    let words = unsafe { self.slot_words(b) };
                    let ok = delta::apply(d, words);
                    debug_assert!(ok);
                }
                None => {
                    // The newer bytes were zero (no base copy): the restored bytes need
                    // one now.
                    let s = self.alloc_slot("RestoreMemoryToLastSavedDiffCheckpoint");
                    // SAFETY: a fresh slot; the unit is readable.
                    unsafe { self.copy_unit(e.page, st, s, true) };
                    self.set_base(e.page, Some(s));
                }
            }
        }
    }

    /// Applies a delta to a unit's tracked words (all of them unless it became partial).
    ///
    /// # Safety
    /// The unit's tracked spans are writable and nothing else runs on them.
    unsafe fn apply_to_unit(&self, unit: usize, st: PageState, d: &[u8]) {
        if !st.partial() {
            // SAFETY: per the function's contract, the whole unit is writable.
            let words = unsafe {
                core::slice::from_raw_parts_mut(unit as *mut u64, self.settings.page / 8)
            };
            let ok = delta::apply(d, words);
            debug_assert!(ok);
            return;
        }
        let mask = self.mask(unit, st).tracked();
        let per_sub = self.settings.sub / 8;
        delta::for_each_change(d, |i, x| {
            if mask & (1 << (i / per_sub)) != 0 {
                // SAFETY: a word of a tracked, writable kernel page of the unit.
                unsafe { *(unit as *mut u64).add(i) ^= x };
            }
        });
    }

    /// `EraseLastSavedDiffMemorySnapshot`'s fold of the top two diffs (`older` then
    /// `newer`, adjacent at the top of the diff stack, their deltas at the top of the
    /// delta stack from `older_deltas` on) into one: the pre-images of the older
    /// checkpoint, against the bytes of the one after the newer. Returns the folded
    /// diff's length; it replaces both, from `older_start` on.
    pub(super) fn fold_diffs(
        &self,
        function: &str,
        diffs: &mut RawVec<DiffEntry>,
        deltas: &mut RawVec<u8>,
        (older_start, older_len): (usize, usize),
        older_deltas: usize,
    ) -> usize {
        // Merge both into the free space above each stack, then move the result down.
        let scratch = diffs.len();
        let byte_top = deltas.len();
        // SAFETY: DiffEntry and bytes are plain data; the spare capacity above the tops
        // is written before it is read.
        let (all, bytes) = unsafe { (diffs.spare(), deltas.spare()) };
        let (live, spare) = all.split_at_mut(scratch);
        let (old_bytes, spare_bytes) = bytes.split_at_mut(byte_top);
        let (older, newer) = live[older_start..].split_at(older_len);
        let (mut k, mut b) = (0usize, 0usize);
        let words = self.settings.page / 8;
        let ok = fold_into_predecessor(older, newer, |o, n| {
            if k == spare.len() {
                return false;
            }
            let e = match (o, n) {
                (Some(o), Some(n)) if !o.is_delta() => {
                    // The older checkpoint's bytes, whole: the newer pre-image goes.
                    if !n.is_delta() {
                        self.release_slot(n.slot);
                    }
                    Some(o)
                }
                (Some(o), Some(n)) if n.is_delta() => {
                    let end = (b + delta::max_len(words)).min(spare_bytes.len());
                    let room = spare_bytes.get_mut(b..end).unwrap_or(&mut []);
                    match delta::compose(
                        &old_bytes[n.delta_range()],
                        &old_bytes[o.delta_range()],
                        room,
                    ) {
                        Some(0) => {
                            // The two writes cancelled out: nothing to restore. (The
                            // older entry's page is still the older checkpoint's.)
                            None
                        }
                        Some(len) => {
                            let e = DiffEntry::delta(o.page, older_deltas + b, len);
                            b += len;
                            Some(e)
                        }
                        None => return false,
                    }
                }
                (Some(o), Some(n)) => {
                    // The newer pre-image is whole: the older delta takes it back one
                    // more checkpoint, in place.
                    if n.slot == ZERO_SLOT {
                        let s = self.alloc_slot(function);
                        // SAFETY: a fresh slot, held here.
                        let w = unsafe { self.slot_words(s) };
                        w.fill(0);
                        delta::apply(&old_bytes[o.delta_range()], w);
                        Some(DiffEntry::full(o.page, s))
                    } else {
                        // SAFETY: the newer diff's slot, owned by the fold now.
                        delta::apply(&old_bytes[o.delta_range()], unsafe {
                            self.slot_words(n.slot)
                        });
                        Some(DiffEntry::full(o.page, n.slot))
                    }
                }
                (Some(e), None) | (None, Some(e)) if e.is_delta() => {
                    // Moved above the top, then down with the rest.
                    let src = &old_bytes[e.delta_range()];
                    let Some(dst) = spare_bytes.get_mut(b..b + src.len()) else {
                        return false;
                    };
                    dst.copy_from_slice(src);
                    let moved = DiffEntry::delta(e.page, older_deltas + b, src.len());
                    b += src.len();
                    Some(moved)
                }
                (Some(e), None) | (None, Some(e)) => Some(e),
                (None, None) => None,
            };
            if let Some(e) = e {
                spare[k] = e;
                k += 1;
            }
            true
        });
        if !ok {
            crate::fatal!(function, "out of room folding diffs");
        }
        all.copy_within(scratch..scratch + k, older_start);
        diffs.truncate(older_start + k);
        bytes.copy_within(byte_top..byte_top + b, older_deltas);
        deltas.truncate(older_deltas + b);
        k
    }
}
