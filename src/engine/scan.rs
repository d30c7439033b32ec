//! Reconciling the tracked set with the process's real mappings.
//!
//! At every checkpoint and every rewind the region walk is compared with what the engine
//! believes: a tracked page that is no longer mapped (the host unmapped it) or that is
//! writable while clean (the host changed its protection behind our back) means its
//! contents at earlier checkpoints can no longer be vouched for; writable memory nobody
//! tracks yet is memory the program obtained since the last checkpoint.

use super::ranges::{Range, RangeSet};
use super::{Engine, FloorReason, Meta, Mode, TrackedRegion};
use crate::sys::{self, Access, RegionKind};

/// A discrepancy between the tracked set and the mappings.
#[derive(Clone, Copy, Debug)]
pub(super) struct Problem {
    pub range: Range,
    pub what: FloorReason,
}

impl Engine {
    /// Fills `m.vmas` from the region walk.
    pub(super) fn walk(&self, function: &str, m: &mut Meta) {
        let Meta {
            scratch: super::Scratch { bytes: scratch, .. },
            vmas,
            ..
        } = m;
        vmas.clear();
        // SAFETY: u8 accepts any bit pattern.
        let buf = unsafe { scratch.spare() };
        let mut overflow = false;
        let r = sys::walk_regions(buf, |r| {
            if vmas.push(r).is_err() {
                overflow = true;
            }
        });
        match r {
            Ok(()) if !overflow => {}
            Ok(()) => crate::fatal!(
                function,
                "the process has more mappings than memsnap can list"
            ),
            Err(e) => crate::fatal!(
                function,
                "cannot walk the process's memory regions ({:?})",
                e
            ),
        }
    }

    /// Compares the tracked regions with `m.vmas` and reports each discrepancy, adjacent
    /// ones of one kind as one (a mapping's pieces may be separate regions, see `track`).
    fn check_regions(
        &self,
        regions: &[TrackedRegion],
        vmas: &[sys::Region],
        views: &[super::host::View],
        mut report: impl FnMut(Problem),
    ) {
        let mut pending: Option<Problem> = None;
        self.check_each_region(regions, vmas, views, |p| match &mut pending {
            Some(q) if q.range.end == p.range.start && q.what == p.what => {
                q.range = Range::new(q.range.start, p.range.end);
            }
            _ => {
                if let Some(q) = pending.replace(p) {
                    report(q);
                }
            }
        });
        if let Some(q) = pending {
            report(q);
        }
    }

    fn check_each_region(
        &self,
        regions: &[TrackedRegion],
        vmas: &[sys::Region],
        views: &[super::host::View],
        mut report: impl FnMut(Problem),
    ) {
        // Memory the host itself protected or unmapped (through memsnap, see `host`) has
        // the protection it asked for, or is open for this checkpoint: not a problem.
        let mut report = |p: Problem| {
            let mut cursor = p.range.start;
            let mut i = views.partition_point(|v| v.range.end <= p.range.start);
            while i < views.len() && views[i].range.start < p.range.end {
                let v = views[i].range;
                if v.start > cursor {
                    report(Problem {
                        range: Range::new(cursor, v.start),
                        what: p.what,
                    });
                }
                cursor = cursor.max(v.end);
                i += 1;
            }
            if cursor < p.range.end {
                report(Problem {
                    range: Range::new(cursor, p.range.end),
                    what: p.what,
                });
            }
        };
        for region in regions.iter() {
            let rr = region.range;
            let mut cursor = rr.start;
            let mut i = vmas.partition_point(|v| v.end <= rr.start);
            while i < vmas.len() && vmas[i].start < rr.end {
                let v = vmas[i];
                i += 1;
                if v.start > cursor {
                    report(Problem {
                        range: Range::new(cursor, v.start),
                        what: FloorReason::Unmapped,
                    });
                }
                let piece = Range::new(v.start.max(rr.start), v.end.min(rr.end));
                cursor = piece.end;
                // A userfaultfd-guarded piece that is no longer registered was unmapped
                // and mapped afresh.
                if !v.private || !v.read || !self.piece_still_guarded(piece, region.uffd) {
                    report(Problem {
                        range: piece,
                        what: FloorReason::Unmapped,
                    });
                } else if v.write && !region.uffd {
                    // (Userfaultfd-guarded memory stays writable in the mappings.)
                    let clean = |p: usize| self.table.get(p).slot().is_none();
                    let mut p = piece.start;
                    while p < piece.end {
                        if clean(p) {
                            let start = p;
                            while p < piece.end && clean(p) {
                                p = self.next_unit(p);
                            }
                            report(Problem {
                                range: Range::new(start, p.min(piece.end)),
                                what: FloorReason::Unprotected,
                            });
                        } else {
                            p = self.next_unit(p);
                        }
                    }
                }
            }
            if cursor < rr.end {
                report(Problem {
                    range: Range::new(cursor, rr.end),
                    what: FloorReason::Unmapped,
                });
            }
        }
    }

    /// Collects into `m.scratch.found` every piece of writable private memory that is neither
    /// tracked nor excluded (expects `build_exclusions` to have run).
    fn find_new(&self, m: &mut Meta) {
        m.scratch.found.clear();
        m.scratch.work.clear();
        for i in 0..m.regions.len() {
            let r = m.regions[i].range;
            RangeSet::insert(&mut m.scratch.work, r);
        }
        let Meta {
            vmas,
            scratch: super::Scratch {
                work, work2, found, ..
            },
            ..
        } = &mut *m;
        for v in vmas.iter() {
            if !(v.write && v.read && v.private) || v.kind == RegionKind::Kernel {
                continue;
            }
            let start = crate::mem::round_up(v.start, self.settings.sub).unwrap_or(v.end);
            let end = v.end & !(self.settings.sub - 1);
            if start >= end || end > self.table.limit() {
                continue;
            }
            RangeSet::for_each_gap(work, Range::new(start, end), |gap| {
                RangeSet::for_each_gap(work2, gap, |piece| {
                    let _ = found.push(TrackedRegion {
                        range: piece,
                        exec: v.exec,
                        born: 0,
                        allocated: false,
                        uffd: false,
                    });
                });
            });
        }
    }

    /// Starts tracking `region`: marks its pages and write-protects it, each piece
    /// through the mechanism that guards it (see `Engine::split_by_guard`).
    pub(super) fn track(&self, function: &str, m: &mut Meta, region: TrackedRegion) {
        for (range, uffd) in self.split_by_guard(region.range).into_iter().flatten() {
            self.track_piece(function, m, TrackedRegion { range, ..region }, uffd);
        }
    }

    /// Tracks one piece of a region, guarded by userfaultfd (`uffd`, registered already)
    /// or mprotect.
    fn track_piece(&self, function: &str, m: &mut Meta, region: TrackedRegion, uffd: bool) {
        let region = TrackedRegion { uffd, ..region };
        self.mark(region.range, region.exec, uffd);
        m.insert_region(region);
        self.arm_new_region(function, region);
    }

    /// Stops tracking the pages of `r` (they are gone): clears their state, keeping any
    /// slot so the dirty-log pass can release it, and removes them from the region table.
    pub(super) fn untrack(&self, m: &mut Meta, r: Range) {
        self.unmark(r);
        let mut i = m.regions.partition_point(|x| x.range.end <= r.start);
        while i < m.regions.len() && m.regions[i].range.start < r.end {
            let x = m.regions[i];
            if x.uffd {
                let piece = Range::new(x.range.start.max(r.start), x.range.end.min(r.end));
                self.unregister_region(piece);
            }
            let head = Range::new(x.range.start, r.start.max(x.range.start));
            let tail = Range::new(r.end.min(x.range.end), x.range.end);
            m.regions.remove(i);
            if !tail.is_empty() {
                m.insert_region(TrackedRegion { range: tail, ..x });
            }
            if !head.is_empty() {
                m.insert_region(TrackedRegion { range: head, ..x });
                i += 1;
            }
            if !tail.is_empty() {
                i += 1;
            }
        }
    }

    /// The first snapshot's scan: tracks registered ranges and (whole-process mode) every
    /// other writable private mapping.
    pub(super) fn scan_first(&self, function: &str, m: &mut Meta) {
        self.build_exclusions(function, m);
        // Registered ranges are carved by the exclusions too (the original's rule).
        for i in 0..m.registered.len() {
            let r = m.registered[i];
            m.scratch.work.clear();
            {
                let Meta {
                    regions,
                    scratch: super::Scratch { work, work2, .. },
                    ..
                } = &mut *m;
                RangeSet::for_each_gap(work2, r.range, |piece| {
                    if !regions.iter().any(|x| x.range.intersects(&piece)) {
                        let _ = work.push(piece);
                    }
                });
            }
            for j in 0..m.scratch.work.len() {
                let piece = m.scratch.work[j];
                self.track(function, m, TrackedRegion { range: piece, ..r });
            }
        }
        if self.mode() == Mode::WholeProcess {
            self.find_new(m);
            for i in 0..m.scratch.found.len() {
                let r = m.scratch.found[i];
                self.track(function, m, r);
            }
            m.record_read_only(0, self.settings.page);
            self.publish_read_only(m);
        }
    }

    /// A checkpoint's scan: drops vanished memory (raising the rewind floor), re-protects
    /// memory whose protection was changed behind our back, and tracks new memory.
    pub(super) fn scan_checkpoint(&self, function: &str, m: &mut Meta, position: usize) {
        if self.mode() == Mode::WholeProcess {
            self.build_exclusions(function, m);
            self.apply_new_exclusions(function, m);
        } else {
            self.walk(function, m);
        }
        let mut first: Option<Problem> = None;
        {
            let Meta {
                regions,
                vmas,
                scratch: super::Scratch { work, .. },
                views,
                ..
            } = &mut *m;
            work.clear();
            self.check_regions(regions, vmas, views, |p| {
                first.get_or_insert(p);
                // The reason rides in the low bit of the page-aligned start.
                let tag = usize::from(p.what == FloorReason::Unmapped);
                if work
                    .push(Range::new(p.range.start | tag, p.range.end))
                    .is_err()
                {
                    crate::fatal!(function, "too many vanished tracked ranges");
                }
            });
        }
        for i in 0..m.scratch.work.len() {
            let r = m.scratch.work[i];
            let range = Range::new(r.start & !1, r.end);
            if r.start & 1 == 1 {
                self.untrack(m, range);
            } else {
                let exec = self.table.get(range.start).exec();
                // SAFETY: tracked, clean pages of the host, protected again.
                let _ = unsafe { sys::protect(range.start, range.len(), Access::Read { exec }) };
            }
        }
        if let Some(p) = first {
            m.floor = super::Floor {
                position,
                range: p.range,
                what: p.what,
            };
        }
        if self.mode() == Mode::WholeProcess {
            self.find_new(m);
            for i in 0..m.scratch.found.len() {
                let r = TrackedRegion {
                    born: position,
                    ..m.scratch.found[i]
                };
                self.track(function, m, r);
            }
            m.record_read_only(position, self.settings.page);
            self.publish_read_only(m);
        }
    }

    /// A rewind's scan: aborts if tracked memory vanished or was unprotected since the
    /// newest checkpoint, and returns memory obtained since then to the kernel (zeroed).
    ///
    /// Once per disallow scope: within one scope other threads are idle and the controller
    /// runs only library code, so the mappings cannot change between two restore calls.
    pub(super) fn scan_rewind(&self, function: &str, m: &mut Meta, newest: usize) {
        let scope = self.scope();
        if m.rewind_scanned_scope == scope {
            return;
        }
        m.rewind_scanned_scope = scope;
        if self.mode() == Mode::WholeProcess {
            self.build_exclusions(function, m);
        } else {
            self.walk(function, m);
        }
        self.check_regions(&m.regions, &m.vmas, &m.views, |p| {
            crate::fatal!(
                function,
                "tracked memory {:#x}-{:#x} was {} after checkpoint {}; its saved contents can no longer be restored",
                p.range.start,
                p.range.end,
                match p.what {
                    FloorReason::Unmapped => "unmapped (or remapped shared/unreadable)",
                    _ => "made writable by the program without memsnap's knowledge",
                },
                newest + 1
            );
        });
        if self.mode() == Mode::WholeProcess {
            self.find_new(m);
            for i in 0..m.scratch.found.len() {
                let r = m.scratch.found[i].range;
                // SAFETY: memory the program obtained after the checkpoint being restored;
                // the rewound program holds no reference to it.
                let _ = unsafe { sys::discard(r.start, r.len()) };
            }
        }
    }
}
