//! Host calls that change tracked memory without writing it, seen before they take effect
//! and made rewindable: `madvise` that zaps pages, `munmap`, `mprotect`, `mmap(MAP_FIXED)`
//! and `mremap` (libmemsnap interposes them: `ffi::host_calls`).
//!
//! Owns two pieces of `Meta`:
//! - `views`: the host's own protection of tracked memory wherever it lacks write
//!   (sorted, disjoint). Everywhere else tracked memory is read-write for the host, as
//!   it was when it was found. A range the host *unmapped* is a view too (`unmapped`): it
//!   stays mapped `PROT_NONE` with its bytes and its userfaultfd registration (it is
//!   *retained*), so that a rewind to before the unmap can give it back.
//! - `journal`: every change of a view, with the checkpoint it followed, in order. A
//!   rewind to checkpoint `t` undoes the changes made after `t` (newest first); erasing a
//!   checkpoint renumbers them like the rest.
//!
//! The units of a view carry `PageState::HOST`: a write fault there is the host's (it
//! dies as it would without memsnap), never a capture. Zapping advice and `MAP_FIXED`
//! capture the units first, exactly as a first write would (pre-image saved, unit dirty),
//! then let the call proceed; the rewind restores the pre-images.
//!
//! Checkpoints and rewinds *open* every view (read-write, so the engine may read and
//! restore its units) for their duration and *close* them again at the end, applying
//! each view as the kernel's protection.
//!
//! Locking: a host call takes the metadata lock only when its range holds tracked memory,
//! after entering the in-flight section (so `set_allowed(false)` waits for it). The
//! controller never holds the lock while waiting for the in-flight count, so a host call
//! waiting for the lock always gets it. The thread that disallowed changes may not make
//! these calls on tracked memory (aborts with a message, as a write would).

// The calls are interposed on Linux only; elsewhere the views stay empty and the helpers
// that build them go unused.
#![cfg_attr(not(target_os = "linux"), allow(dead_code))]

#[cfg(target_os = "linux")]
mod calls;

use super::ranges::Range;
use super::{Engine, Meta};
use crate::mem::PageState;
use crate::sys::{self, Access};

/// The host's protection of a piece of tracked memory that lacks write.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Host {
    /// `PROT_*` bits, never `PROT_WRITE`.
    pub prot: i32,
    /// The host unmapped it: the range is retained (`PROT_NONE`, bytes kept).
    pub unmapped: bool,
}

/// A view: a range and the host's protection there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct View {
    pub range: Range,
    pub host: Host,
}

/// One journaled change: the view of `range` before it (`None`: read-write), and the
/// position of the newest checkpoint when it was made.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Change {
    pub range: Range,
    pub prev: Option<Host>,
    pub position: usize,
}

/// Ranges above this size are checked against the region table under the lock rather
/// than unit by unit in the page table (whose untouched parts would be committed as they
/// are read: a 1 TiB reservation spans 1 GiB of table).
const LOCK_FREE_CHECK_BYTES: usize = 64 << 20;

/// `madvise` advice that changes a page's contents without writing it (or writes it):
/// the page is captured first.
#[cfg(target_os = "linux")]
pub fn zapping_advice(advice: i32) -> bool {
    const MADV_DONTNEED_LOCKED: i32 = 24;
    const MADV_POPULATE_WRITE: i32 = 23;
    const MADV_GUARD_INSTALL: i32 = 102;
    matches!(
        advice,
        libc::MADV_DONTNEED
            | libc::MADV_FREE
            | libc::MADV_REMOVE
            | MADV_DONTNEED_LOCKED
            | MADV_POPULATE_WRITE
            | MADV_GUARD_INSTALL
    )
}

impl Meta {
    /// Calls `f(piece, view)` for the pieces of `r` in address order, each with one view
    /// (`None`: read-write).
    pub(super) fn for_each_view_piece(&self, r: Range, f: impl FnMut(Range, Option<Host>)) {
        view_pieces(&self.views, r, f)
    }

    /// Sets the view of `r` (`None`: read-write), splitting the views it cuts.
    pub(super) fn set_view(&mut self, function: &str, r: Range, host: Option<Host>) {
        let mut i = self.views.partition_point(|v| v.range.end <= r.start);
        while i < self.views.len() && self.views[i].range.start < r.end {
            let v = self.views.remove(i);
            let head = Range::new(v.range.start, r.start.max(v.range.start));
            let tail = Range::new(r.end.min(v.range.end), v.range.end);
            if !tail.is_empty() && self.views.insert(i, View { range: tail, ..v }).is_err() {
                crate::fatal!(function, "out of room for host protection ranges");
            }
            if !head.is_empty() {
                if self.views.insert(i, View { range: head, ..v }).is_err() {
                    crate::fatal!(function, "out of room for host protection ranges");
                }
                i += 1;
            }
        }
        if let Some(host) = host {
            let i = self.views.partition_point(|v| v.range.end <= r.start);
            if self.views.insert(i, View { range: r, host }).is_err() {
                crate::fatal!(function, "out of room for host protection ranges");
            }
        }
    }

    /// The view at `addr`.
    pub(super) fn view_at(&self, addr: usize) -> Option<Host> {
        let i = self.views.partition_point(|v| v.range.end <= addr);
        (i < self.views.len() && self.views[i].range.contains(addr)).then(|| self.views[i].host)
    }

    /// Whether part of `r` is retained (unmapped by the host).
    fn retained_in(&self, r: Range) -> bool {
        let mut any = false;
        self.for_each_view_piece(r, |_, h| any |= h.is_some_and(|h| h.unmapped));
        any
    }

    /// Calls `f(piece, Some(uffd))` for the tracked pieces of `r` and `f(piece, None)`
    /// for the untracked ones, in address order.
    fn for_each_tracked(&self, r: Range, mut f: impl FnMut(Range, Option<bool>)) {
        let mut cursor = r.start;
        let mut i = self.regions.partition_point(|x| x.range.end <= r.start);
        while i < self.regions.len() && self.regions[i].range.start < r.end {
            let x = self.regions[i];
            if x.range.start > cursor {
                f(Range::new(cursor, x.range.start), None);
            }
            let piece = Range::new(x.range.start.max(cursor), x.range.end.min(r.end));
            f(piece, Some(x.uffd));
            cursor = piece.end;
            i += 1;
        }
        if cursor < r.end {
            f(Range::new(cursor, r.end), None);
        }
    }
}

impl Engine {
    /// Whether `[start, end)` may hold tracked memory: `false` is certain. Lock-free for
    /// ranges of up to 64 MiB (the page table); larger ones consult the region table.
    pub fn may_hold_tracked(&self, start: usize, end: usize) -> bool {
        if !self.armed() || start >= end {
            return false;
        }
        if end - start > LOCK_FREE_CHECK_BYTES {
            let m = self.meta.lock();
            let i = m.regions.partition_point(|x| x.range.end <= start);
            return i < m.regions.len() && m.regions[i].range.start < end;
        }
        let mut u = self.page_base(start);
        while u < end {
            if self.table.get(u).tracked() {
                return true;
            }
            u += self.settings.page;
        }
        false
    }

    /// The range a host call names, in whole kernel pages; `None` when the kernel would
    /// refuse it (unaligned start, wrap), which the call then reports itself.
    fn host_range(&self, addr: usize, len: usize) -> Option<Range> {
        if !self.is_aligned(addr) || len == 0 {
            return None;
        }
        let len = crate::mem::round_up(len, self.settings.sub)?;
        Range::from_len(addr, len)
    }

    /// Enters the in-flight section for a host call on tracked memory `r`.
    fn host_enter(&self, function: &str, r: Range) {
        let me = sys::tid();
        if !self.changes_allowed()
            && self
                .gate
                .disallower
                .load(core::sync::atomic::Ordering::SeqCst)
                == me
        {
            crate::fatal!(
                function,
                "called on tracked memory {:#x}-{:#x} by the thread that disallowed memory changes (forbidden inside AutoDisallowMemoryChanges, like writes)",
                r.start,
                r.end
            );
        }
        self.enter(function, r.start, me);
    }

    /// Each tracked unit of a host change must change as a whole: a snapshot page larger
    /// than the kernel's is protected and restored as one.
    fn require_whole_units(&self, function: &str, r: Range) {
        if self.settings.page == self.settings.sub {
            return;
        }
        let any_tracked = |from: usize, to: usize| {
            let mut p = from;
            while p < to {
                if self.tracked_at(p) {
                    return Some(p);
                }
                p += self.settings.sub;
            }
            None
        };
        // A unit the range cuts matters only if tracked kernel pages lie on both sides of
        // the cut: a call on untracked pages that share a unit with tracked ones (a fresh
        // mapping the kernel placed right after a partly tracked unit) changes nothing
        // memsnap tracks.
        let check = |unit: usize| {
            let inside = Range::new(r.start.max(unit), r.end.min(unit + self.settings.page));
            if any_tracked(inside.start, inside.end).is_none() {
                return;
            }
            let outside = any_tracked(unit, inside.start)
                .or_else(|| any_tracked(inside.end, unit + self.settings.page));
            if let Some(p) = outside {
                crate::fatal!(
                    function,
                    "{:#x}-{:#x} covers part of a tracked {}-byte snapshot page (at {:#x}); with MEMSNAP_PAGE_SIZE above the kernel page, unmapping and protection changes of tracked memory must cover whole snapshot pages",
                    r.start,
                    r.end,
                    self.settings.page,
                    self.page_base(p)
                );
            }
        };
        let head = self.page_base(r.start);
        let tail = self.page_base(r.end - 1);
        if head < r.start || (head == tail && r.end < tail + self.settings.page) {
            check(head);
        }
        if tail != head && r.end < tail + self.settings.page {
            check(tail);
        }
    }

    /// Sets (`on`) or clears the HOST bit of the tracked units of `r`.
    pub(super) fn mark_host(&self, r: Range, on: bool) {
        let mut u = self.page_base(r.start);
        while u < r.end {
            if let Some(word) = self.table.word(u) {
                loop {
                    let cur = PageState(word.load(core::sync::atomic::Ordering::Acquire));
                    if !cur.tracked() {
                        break;
                    }
                    if cur.busy() {
                        sys::yield_now();
                        continue;
                    }
                    let next = if on {
                        cur.0 | PageState::HOST
                    } else {
                        cur.0 & !PageState::HOST
                    };
                    if word
                        .compare_exchange(
                            cur.0,
                            next,
                            core::sync::atomic::Ordering::AcqRel,
                            core::sync::atomic::Ordering::Acquire,
                        )
                        .is_ok()
                    {
                        break;
                    }
                }
            }
            u += self.settings.page;
        }
    }

    /// Gives the unit at `u` (a view's) the kernel protection `prot` on its tracked spans.
    fn protect_spans(&self, u: usize, st: PageState, prot: i32) {
        self.for_each_span(u, st, |a, len, _| {
            // SAFETY: tracked host memory whose protection the engine owns.
            unsafe { set_prot(a, len, prot) };
        });
    }

    /// Captures the unit at `u` as a first write would: its pre-image saved and logged,
    /// the unit dirty and (unless the host's view forbids writes) writable.
    fn capture_now(&self, function: &str, m: &Meta, u: usize) {
        use core::sync::atomic::Ordering;
        let Some(word) = self.table.word(u) else {
            return;
        };
        loop {
            let cur = PageState(word.load(Ordering::Acquire));
            if !cur.tracked() || cur.slot().is_some() {
                return;
            }
            if cur.busy() {
                sys::yield_now();
                continue;
            }
            if self.unit_guard(cur).finds_writes_by_scan() {
                // Nothing to capture: the kernel reports a zapped or replaced page of an
                // async-registered mapping as written, so the next checkpoint takes its
                // base copy as its pre-image like any written page's.
                return;
            }
            if !super::fault::claim(word, cur) {
                continue;
            }
            let view = cur.host().then(|| m.view_at(u)).flatten();
            if view.is_some() {
                // Inaccessible to the host, and maybe to us: open it to read.
                self.protect_spans(u, cur, libc::PROT_READ);
            }
            let slot = self.capture(function, u, cur);
            self.table.set(u, cur.with_slot(slot));
            match view {
                Some(h) => self.protect_spans(u, cur, h.prot),
                None => {
                    if let Err(e) = self.protect_unit(u, cur, true) {
                        crate::fatal!(
                            function,
                            "unprotecting tracked memory {:#x}+{:#x} failed (errno {})",
                            e.0,
                            e.1,
                            e.2
                        );
                    }
                }
            }
            return;
        }
    }

    /// Journals and applies the host view `host` over the tracked pieces of `r` (the
    /// page-state bits; the kernel's protection is the caller's).
    fn change_view(&self, function: &str, m: &mut Meta, r: Range, host: Option<Host>) {
        let position = m.checkpoints.len() - 1;
        m.scratch.work.clear();
        {
            let Meta {
                regions,
                scratch: super::Scratch { work, .. },
                ..
            } = &mut *m;
            let mut cursor = r.start;
            let mut i = regions.partition_point(|x| x.range.end <= r.start);
            while i < regions.len() && regions[i].range.start < r.end {
                let piece = Range::new(
                    regions[i].range.start.max(cursor),
                    regions[i].range.end.min(r.end),
                );
                if work.push(piece).is_err() {
                    crate::fatal!(function, "too many tracked pieces in one host call");
                }
                cursor = piece.end;
                i += 1;
            }
        }
        for k in 0..m.scratch.work.len() {
            let piece = m.scratch.work[k];
            let Meta { views, journal, .. } = &mut *m;
            let mut failed = false;
            view_pieces(views, piece, |p, prev| {
                if prev != host
                    && journal
                        .push(Change {
                            range: p,
                            prev,
                            position,
                        })
                        .is_err()
                {
                    failed = true;
                }
            });
            if failed {
                crate::fatal!(function, "out of room for the host protection journal");
            }
            m.set_view(function, piece, host);
            self.mark_host(piece, host.is_some());
        }
    }
}

/// Sets the kernel's protection of tracked memory to a view's `PROT_*` bits, without
/// going through libmemsnap's own `mprotect` (nor touching errno).
///
/// # Safety
/// Tracked memory whose protection the engine owns.
unsafe fn set_prot(addr: usize, len: usize, prot: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: forwarded contract.
    let _ = unsafe { sys::raw::mprotect(addr, len, prot) };
    // (Views exist only where the host calls are interposed, on Linux.)
    #[cfg(not(target_os = "linux"))]
    let _ = (addr, len, prot);
}

impl Engine {
    /// Opens every view for a checkpoint or rewind: read-write, so its units can be read
    /// and restored. Remembers what it opened for [`Engine::close_views`].
    pub(super) fn open_views(&self, function: &str, m: &mut Meta) {
        m.opened.clear();
        for i in 0..m.views.len() {
            let v = m.views[i];
            if m.opened.push(v.range).is_err() {
                crate::fatal!(function, "out of room for host protection ranges");
            }
            let exec = self.table.get(v.range.start).exec();
            // SAFETY: tracked memory; only the controller runs (changes are disallowed or
            // the metadata lock is held) and it closes the view again before returning.
            let _ =
                unsafe { sys::protect(v.range.start, v.range.len(), Access::ReadWrite { exec }) };
        }
    }

    /// Undoes the journaled changes made after checkpoint `target` (newest first).
    pub(super) fn undo_views(&self, function: &str, m: &mut Meta, target: usize) {
        while let Some(c) = m.journal.last().copied() {
            if c.position < target {
                break;
            }
            m.journal.pop();
            m.set_view(function, c.range, c.prev);
        }
    }

    /// Applies the views again after a checkpoint or rewind: each view's protection on
    /// its units (marked HOST), the tracked default elsewhere in what was opened. Views
    /// over memory no longer tracked are dropped.
    pub(super) fn close_views(&self, m: &mut Meta) {
        let mut i = 0;
        while i < m.views.len() {
            if self.tracked_at(m.views[i].range.start) {
                i += 1;
            } else {
                m.views.remove(i);
            }
        }
        for k in 0..m.opened.len() {
            let o = m.opened[k];
            self.mark_host(o, false);
            let mut p = o.start;
            while p < o.end {
                let st = self.table.get(p);
                let next = self.next_unit(p).min(o.end);
                if st.tracked() && m.view_at(p).is_none() {
                    let write = st.slot().is_some() || self.unit_guard(st).mapping_stays_writable();
                    // SAFETY: tracked memory back to its tracked default: writable when
                    // dirty or guarded by userfaultfd, read-only when clean.
                    let _ = unsafe {
                        sys::protect(
                            p,
                            next - p,
                            if write {
                                Access::ReadWrite { exec: st.exec() }
                            } else {
                                Access::Read { exec: st.exec() }
                            },
                        )
                    };
                }
                p = next;
            }
        }
        m.opened.clear();
        for i in 0..m.views.len() {
            let v = m.views[i];
            self.mark_host(v.range, true);
            // SAFETY: tracked memory given the host's own protection, which lacks write.
            unsafe { set_prot(v.range.start, v.range.len(), v.host.prot) };
        }
    }

    /// `EraseLastSavedDiffMemorySnapshot` dropped checkpoint `dropped`: changes made
    /// after it now follow its predecessor; with no predecessor they precede every
    /// checkpoint and are forgotten.
    pub(super) fn erase_views(&self, m: &mut Meta, dropped: usize) {
        let mut i = 0;
        while i < m.journal.len() {
            let c = m.journal[i];
            if c.position >= dropped {
                if c.position == 0 {
                    m.journal.remove(i);
                    continue;
                }
                m.journal[i].position -= 1;
            }
            i += 1;
        }
    }
}

/// Calls `f(piece, view)` for the pieces of `r` in address order, each with one view
/// (`None`: read-write).
fn view_pieces(views: &[View], r: Range, mut f: impl FnMut(Range, Option<Host>)) {
    let mut cursor = r.start;
    let mut i = views.partition_point(|v| v.range.end <= r.start);
    while cursor < r.end {
        if i < views.len() && views[i].range.start < r.end {
            let v = views[i];
            if v.range.start > cursor {
                f(Range::new(cursor, v.range.start), None);
            }
            let piece = Range::new(v.range.start.max(cursor), v.range.end.min(r.end));
            f(piece, Some(v.host));
            cursor = piece.end;
            i += 1;
        } else {
            f(Range::new(cursor, r.end), None);
            cursor = r.end;
        }
    }
}
