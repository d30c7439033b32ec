//! Read-only anonymous memory that the host makes writable later.
//!
//! memsnap tracks what is writable. Anonymous memory that is read-only at a checkpoint and
//! made writable afterwards (a JIT flipping code to data, an allocator recommitting
//! through a read-only state) would count as memory obtained after that checkpoint, and a
//! rewind to it would zero it although it held bytes there. Its bytes cannot change while
//! it stays read-only, so every checkpoint scan records each such mapping with the
//! checkpoint since which it has been there (`Meta::read_only`). When the host makes one
//! writable through libmemsnap's `mprotect`, it is *adopted*: tracked as born at that
//! checkpoint, with its read-only protection as the host's view until now (so a rewind
//! gives that back) and the new protection journaled like any host change (`host`). Its
//! first writes are then captured like any other.
//!
//! Any other host call that changes recorded memory (`mprotect` to another read-only
//! protection, `munmap`, `mremap`, `mmap(MAP_FIXED)`, zapping `madvise`) adopts it the
//! same way first, so that the call is rewound like one on tracked memory (an unmapped
//! range is retained, a replaced one captured). Raw system calls are not seen, as for
//! every host call. Mappings that share a kernel mapping with tracked or excluded memory,
//! and calls that cut snapshot pages, keep the old behaviour: the memory counts as
//! obtained afresh at the next checkpoint.

use core::sync::atomic::Ordering;

use super::host::Host;
use super::ranges::{Range, RangeSet};
use super::{Engine, Meta, TrackedRegion};
use crate::sys::{self, RegionKind};

/// One recorded mapping: read-only (or read-execute) anonymous memory nobody tracks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadOnly {
    pub range: Range,
    /// The checkpoint since which it has been mapped with these bytes and `prot`.
    pub born: usize,
    /// Its `PROT_*` bits (never `PROT_WRITE`).
    pub prot: i32,
}

impl Meta {
    /// Records the read-only anonymous memory of the scan just made (`vmas`), keeping the
    /// birth of what earlier scans recorded unchanged. Runs after the scan tracked new
    /// memory and built the exclusions (`exact`).
    pub(super) fn record_read_only(&mut self, position: usize, page: usize) {
        let Meta {
            vmas,
            regions,
            own,
            untracked,
            exact,
            read_only,
            read_only_next,
            ..
        } = self;
        read_only_next.clear();
        for v in vmas.iter() {
            if !(v.private && v.read && !v.write && v.kind == RegionKind::Anonymous) {
                continue;
            }
            let r = Range::new(v.start, v.end);
            if r.start % page != 0 || r.end % page != 0 {
                continue;
            }
            let i = regions.partition_point(|x| x.range.end <= r.start);
            if i < regions.len() && regions[i].range.start < r.end {
                continue;
            }
            if [&**own, &**untracked, &**exact]
                .iter()
                .any(|set| RangeSet::intersects(set, r))
            {
                continue;
            }
            let prot = libc::PROT_READ | if v.exec { libc::PROT_EXEC } else { 0 };
            // Pieces already recorded with the same protection keep their birth.
            let mut cursor = r.start;
            let mut j = read_only.partition_point(|e| e.range.end <= r.start);
            let mut full = false;
            while cursor < r.end && !full {
                while j < read_only.len() && read_only[j].range.end <= cursor {
                    j += 1;
                }
                let (end, born) = match read_only.get(j) {
                    Some(e) if e.range.start <= cursor => (
                        e.range.end.min(r.end),
                        if e.prot == prot { e.born } else { position },
                    ),
                    Some(e) if e.range.start < r.end => (e.range.start, position),
                    _ => (r.end, position),
                };
                full = read_only_next
                    .push(ReadOnly {
                        range: Range::new(cursor, end),
                        born,
                        prot,
                    })
                    .is_err();
                cursor = end;
            }
            if full {
                // Out of room: what is not recorded keeps the old behaviour.
                break;
            }
        }
        read_only.clear();
        for e in read_only_next.iter() {
            let _ = read_only.push(*e);
        }
    }

    /// A rewind to checkpoint `target`: memory recorded since a later checkpoint was there
    /// at none the program now knows of, so its next possible birth is `target + 1`.
    pub(super) fn read_only_rewound(&mut self, target: usize) {
        for e in self.read_only.iter_mut() {
            if e.born > target {
                e.born = target + 1;
            }
        }
    }

    /// `EraseLastSavedDiffMemorySnapshot` dropped checkpoint `dropped`.
    pub(super) fn read_only_erased(&mut self, dropped: usize) {
        for e in self.read_only.iter_mut() {
            if e.born > dropped {
                e.born -= 1;
            }
        }
    }

    /// Drops the records of `r` (the host changes that memory).
    pub(super) fn forget_read_only(&mut self, r: Range) {
        let mut i = self.read_only.partition_point(|e| e.range.end <= r.start);
        while i < self.read_only.len() && self.read_only[i].range.start < r.end {
            let e = self.read_only.remove(i);
            let head = Range::new(e.range.start, r.start.max(e.range.start));
            let tail = Range::new(r.end.min(e.range.end), e.range.end);
            // Removing made room for both pieces.
            if !tail.is_empty() {
                let _ = self.read_only.insert(i, ReadOnly { range: tail, ..e });
            }
            if !head.is_empty() {
                let _ = self.read_only.insert(i, ReadOnly { range: head, ..e });
                i += 1;
            }
            if !tail.is_empty() {
                i += 1;
            }
        }
    }
}

impl Engine {
    /// Publishes the span of the records, which host calls check without the lock.
    pub(super) fn publish_read_only(&self, m: &Meta) {
        let (lo, hi) = match (m.read_only.first(), m.read_only.last()) {
            (Some(a), Some(b)) => (a.range.start, b.range.end),
            _ => (0, 0),
        };
        self.read_only_span[0].store(lo, Ordering::Release);
        self.read_only_span[1].store(hi, Ordering::Release);
    }

    /// Whether `r` may hold recorded read-only memory: `false` is certain.
    pub fn may_hold_read_only(&self, r: Range) -> bool {
        r.start < self.read_only_span[1].load(Ordering::Acquire)
            && self.read_only_span[0].load(Ordering::Acquire) < r.end
    }

    /// A host call about to change `r` (re-protect, unmap, remap, zap or map over it):
    /// adopts the recorded read-only memory there first, so that the call is then made
    /// rewindable exactly as one on tracked memory. The thread that disallowed memory
    /// changes, and ranges that cut snapshot pages, drop the records instead (the memory
    /// then counts as obtained afresh). Free when nothing is recorded there.
    pub fn adopt_for_host_call(&self, function: &str, r: Range) {
        if !self.may_hold_read_only(r) {
            return;
        }
        let disallower =
            !self.changes_allowed() && self.gate.disallower.load(Ordering::SeqCst) == sys::tid();
        if disallower || r.start % self.settings.page != 0 || r.end % self.settings.page != 0 {
            let mut m = self.meta.lock();
            m.forget_read_only(r);
            self.publish_read_only(&m);
            return;
        }
        self.enter(function, r.start, sys::tid());
        let mut m = self.meta.lock();
        self.adopt_read_only(function, &mut m, r);
        drop(m);
        self.leave();
    }

    /// Adopts the recorded read-only memory in `r`, which the host is making writable:
    /// tracked as born when it was recorded, with its read-only protection as the host's
    /// view (not journaled: it has held since then). The caller then applies the host's
    /// new protection to `r` as to any tracked memory, which journals the change.
    pub(super) fn adopt_read_only(&self, function: &str, m: &mut Meta, r: Range) {
        let newest = m.checkpoints.len() - 1;
        m.scratch.sps.clear();
        {
            let Meta {
                read_only,
                scratch: super::Scratch { sps, .. },
                ..
            } = &mut *m;
            let i = read_only.partition_point(|e| e.range.end <= r.start);
            for e in read_only[i..].iter().take_while(|e| e.range.start < r.end) {
                let piece = e.range.intersection(&r);
                if e.born > newest
                    || piece.start % self.settings.page != 0
                    || piece.end % self.settings.page != 0
                {
                    continue;
                }
                // (born, prot) ride in the scratch list's first field.
                let tag = (e.born as u64) << 32 | e.prot as u32 as u64;
                if sps.push((tag, piece)).is_err() {
                    crate::fatal!(function, "too many read-only pieces in one host call");
                }
            }
        }
        m.forget_read_only(r);
        for k in 0..m.scratch.sps.len() {
            let (tag, piece) = m.scratch.sps[k];
            let (born, prot) = ((tag >> 32) as usize, tag as u32 as i32);
            let region = TrackedRegion {
                range: piece,
                exec: prot & libc::PROT_EXEC != 0,
                born,
                allocated: false,
                uffd: false,
            };
            self.track(function, m, region);
            m.set_view(
                function,
                piece,
                Some(Host {
                    prot,
                    unmapped: false,
                }),
            );
            self.mark_host(piece, true);
        }
        self.publish_read_only(m);
    }
}
