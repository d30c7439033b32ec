//! Eager pages: writable pages the exclusions cover only partly (a thread's TLS next to
//! its descriptor's `tid` word and rseq area, a controller's `errno`). Write protection
//! works on whole kernel pages, so such a page cannot be tracked without losing its other
//! bytes; it is never protected, copied whole at every checkpoint and written back at
//! every rewind, except the excluded bytes. `exclusions` decides which pages are eager;
//! this module keeps their copies (`Meta::eager_pages`, `Meta::eager_bytes`, one stack
//! shared by all checkpoints).

use super::ranges::{Range, RangeSet};
use super::{Engine, Meta};

/// Calls `f(page)` for every page of `page` bytes that `set` (sorted, coalesced) covers
/// only partly.
pub fn partly_covered_pages(set: &[Range], page: usize, mut f: impl FnMut(usize)) {
    let mut last = usize::MAX;
    let mut emit = |p: usize| {
        if p != last {
            last = p;
            f(p);
        }
    };
    for r in set.iter().filter(|r| !r.is_empty()) {
        if r.start & (page - 1) != 0 {
            emit(r.start & !(page - 1));
        }
        if r.end & (page - 1) != 0 {
            emit(r.end & !(page - 1));
        }
    }
}

impl Engine {
    /// Copies the eager pages into the checkpoint being pushed.
    pub(super) fn save_eager(&self, function: &str, m: &mut Meta) -> (usize, usize) {
        let start = m.eager_pages.len();
        for i in 0..m.eager.len() {
            let p = m.eager[i];
            if m.eager_pages.push(p).is_err() {
                crate::fatal!(function, "out of room for eagerly copied pages");
            }
            let at = m.eager_bytes.len();
            if at + self.settings.sub > m.eager_bytes.capacity() {
                crate::fatal!(function, "out of room for eagerly copied pages");
            }
            // SAFETY: the page is mapped, readable and writable (checked by the scan that
            // built `m.eager` in this same call), and the spare capacity holds a page.
            unsafe {
                let dst = m.eager_bytes.spare().as_mut_ptr().add(at);
                core::ptr::copy_nonoverlapping(p as *const u8, dst, self.settings.sub);
                m.eager_bytes.set_len(at + self.settings.sub);
            }
        }
        (start, m.eager_pages.len() - start)
    }

    /// Writes checkpoint `target`'s eager copies back, except the excluded bytes. Only
    /// pages that are eager now are written: a page that is not is unmapped or no longer
    /// holds what it did (and then the thread check has refused the rewind already).
    pub(super) fn restore_eager(&self, m: &Meta, target: usize) {
        let c = m.checkpoints[target];
        for i in c.eager_start..c.eager_start + c.eager_len {
            let p = m.eager_pages[i];
            if m.eager.binary_search(&p).is_err() {
                continue;
            }
            let saved = &m.eager_bytes[i * self.settings.sub..(i + 1) * self.settings.sub];
            RangeSet::for_each_gap(&m.exact, Range::new(p, p + self.settings.sub), |gap| {
                // SAFETY: an eager page, mapped and writable (this scope's scan), never
                // write-protected; `gap` lies inside it and `saved` is its copy.
                unsafe {
                    core::ptr::copy_nonoverlapping(
                        saved.as_ptr().add(gap.start - p),
                        gap.start as *mut u8,
                        gap.len(),
                    );
                }
            });
        }
    }

    /// Drops the eager copies of every checkpoint from `from_index` of the copy stack up.
    pub(super) fn truncate_eager(&self, m: &mut Meta, from_index: usize) {
        m.eager_pages.truncate(from_index);
        m.eager_bytes.truncate(from_index * self.settings.sub);
    }

    /// Removes the eager copies `[start, start + len)`, moving later ones down.
    pub(super) fn remove_eager(&self, m: &mut Meta, start: usize, len: usize) {
        let total = m.eager_pages.len();
        let sub = self.settings.sub;
        // SAFETY: plain data; both ranges lie within the initialized length.
        unsafe {
            m.eager_pages.spare().copy_within(start + len..total, start);
            m.eager_bytes
                .spare()
                .copy_within((start + len) * sub..total * sub, start * sub);
        }
        self.truncate_eager(m, total - len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ranges::Range;

    fn r(a: usize, b: usize) -> Range {
        Range::new(a, b)
    }

    fn pages(set: &[Range]) -> Vec<usize> {
        let mut v = Vec::new();
        partly_covered_pages(set, 0x1000, |p| v.push(p));
        v
    }

    #[test]
    fn partly_covered() {
        // Whole pages: nothing partial.
        assert!(pages(&[r(0x1000, 0x3000)]).is_empty());
        // A range inside one page.
        assert_eq!(pages(&[r(0x1010, 0x1020)]), vec![0x1000]);
        // Unaligned at both ends, over several pages.
        assert_eq!(pages(&[r(0x1010, 0x3020)]), vec![0x1000, 0x3000]);
        // Two ranges sharing a page report it once.
        assert_eq!(pages(&[r(0x1010, 0x1020), r(0x1030, 0x2000)]), vec![0x1000]);
        // Aligned start, unaligned end.
        assert_eq!(pages(&[r(0x2000, 0x2800)]), vec![0x2000]);
        // Unaligned start, aligned end.
        assert_eq!(pages(&[r(0x2800, 0x4000)]), vec![0x2000]);
        assert!(pages(&[r(0x5000, 0x5000)]).is_empty());
    }
}
