//! Dirty-page bookkeeping that needs no system calls: the shape of a saved diff, runs of
//! adjacent pages (so protection changes take one call per run, not per page), folding one
//! diff into its predecessor, and splitting restore work between threads.

/// One page of a saved diff: the page's address and its contents at the checkpoint the
/// diff belongs to (its pre-image), either a whole copy in a slot or a delta against the
/// page's contents at the next checkpoint (see `delta`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DiffEntry {
    pub page: usize,
    /// The copy slot (when `len` is 0).
    pub slot: u32,
    /// The delta's length in bytes; 0 for a whole copy (an empty delta is never saved).
    pub len: u32,
    /// Where the delta starts in the delta stack (`Meta::deltas`).
    pub at: usize,
}

impl DiffEntry {
    /// A pre-image saved whole, in `slot`.
    pub fn full(page: usize, slot: u32) -> DiffEntry {
        DiffEntry {
            page,
            slot,
            len: 0,
            at: 0,
        }
    }

    /// A pre-image saved as the `len`-byte delta at `at` (`len` > 0).
    pub fn delta(page: usize, at: usize, len: usize) -> DiffEntry {
        debug_assert!(len > 0 && len <= u32::MAX as usize);
        DiffEntry {
            page,
            slot: u32::MAX,
            len: len as u32,
            at,
        }
    }

    pub fn is_delta(&self) -> bool {
        self.len > 0
    }

    /// The delta's bytes within the delta stack.
    pub fn delta_range(&self) -> core::ops::Range<usize> {
        self.at..self.at + self.len as usize
    }
}

/// Calls `f(first, count)` for each maximal run of consecutive pages in `pages` (sorted,
/// distinct, `page`-aligned addresses), where `key(i)` must also agree within a run (for
/// example the pages' execute bit).
pub fn for_each_run<K: PartialEq>(
    len: usize,
    page_size: usize,
    addr: impl Fn(usize) -> usize,
    key: impl Fn(usize) -> K,
    mut f: impl FnMut(usize, usize),
) {
    let mut i = 0;
    while i < len {
        let start = i;
        let k = key(i);
        i += 1;
        while i < len && addr(i) == addr(i - 1) + page_size && key(i) == k {
            i += 1;
        }
        f(start, i - start);
    }
}

/// Merges the newest diff into its predecessor, in page order: `out(older, newer)` gets
/// each page of the union with its entry from either diff or both, and makes the one
/// entry to keep (for a whole copy in the older diff, that copy: it is the pre-image of
/// the older checkpoint; a delta composes with the newer pre-image). Both inputs are
/// sorted by page. Returns `false` as soon as `out` does (it is full).
pub fn fold_into_predecessor(
    older: &[DiffEntry],
    newer: &[DiffEntry],
    mut out: impl FnMut(Option<DiffEntry>, Option<DiffEntry>) -> bool,
) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < older.len() || j < newer.len() {
        let ok = if j == newer.len() || (i < older.len() && older[i].page < newer[j].page) {
            i += 1;
            out(Some(older[i - 1]), None)
        } else if i == older.len() || newer[j].page < older[i].page {
            j += 1;
            out(None, Some(newer[j - 1]))
        } else {
            i += 1;
            j += 1;
            out(Some(older[i - 1]), Some(newer[j - 1]))
        };
        if !ok {
            return false;
        }
    }
    true
}

/// Splits `len` items into `parts` contiguous chunks of near-equal size; chunk `k` is
/// `bounds(k)..bounds(k + 1)`.
pub fn chunk_bounds(len: usize, parts: usize, k: usize) -> usize {
    let parts = parts.max(1);
    (len / parts) * k + (len % parts).min(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(page: usize, slot: u32) -> DiffEntry {
        DiffEntry::full(page, slot)
    }

    /// The fold of whole copies: the older copy is kept, the newer one released.
    fn fold_slots(
        older: &[DiffEntry],
        newer: &[DiffEntry],
        out: &mut Vec<DiffEntry>,
        released: &mut Vec<u32>,
        room: usize,
    ) -> bool {
        fold_into_predecessor(older, newer, |o, n| {
            if out.len() == room {
                return false;
            }
            if let (Some(_), Some(n)) = (o, n) {
                released.push(n.slot);
            }
            out.push(o.or(n).unwrap());
            true
        })
    }

    #[test]
    fn runs_split_on_gaps_and_keys() {
        let pages = [0x1000, 0x2000, 0x3000, 0x5000, 0x6000, 0x7000];
        let exec = [false, false, false, false, true, true];
        let mut runs = vec![];
        for_each_run(
            pages.len(),
            0x1000,
            |i| pages[i],
            |i| exec[i],
            |s, n| runs.push((s, n)),
        );
        assert_eq!(runs, vec![(0, 3), (3, 1), (4, 2)]);
        runs.clear();
        for_each_run(0, 0x1000, |i| pages[i], |_| (), |s, n| runs.push((s, n)));
        assert!(runs.is_empty());
    }

    #[test]
    fn fold_keeps_older_pre_images_and_releases_newer() {
        let older = [e(0x1000, 1), e(0x3000, 3)];
        let newer = [e(0x2000, 12), e(0x3000, 13), e(0x4000, 14)];
        let mut out = vec![];
        let mut released = vec![];
        assert!(fold_slots(&older, &newer, &mut out, &mut released, 99));
        assert_eq!(
            out,
            vec![e(0x1000, 1), e(0x2000, 12), e(0x3000, 3), e(0x4000, 14)]
        );
        assert_eq!(released, vec![13]);
    }

    #[test]
    fn fold_reports_a_full_output() {
        let older = [e(0x1000, 1)];
        let newer = [e(0x2000, 2)];
        let mut out = vec![];
        assert!(!fold_slots(&older, &newer, &mut out, &mut vec![], 1));
        assert_eq!(out, vec![e(0x1000, 1)]);
    }

    #[test]
    fn chunks_cover_everything_once() {
        for len in [0, 1, 7, 64, 1001] {
            for parts in [1, 2, 3, 8] {
                let mut total = 0;
                for k in 0..parts {
                    let (a, b) = (chunk_bounds(len, parts, k), chunk_bounds(len, parts, k + 1));
                    assert!(a <= b);
                    total += b - a;
                }
                assert_eq!(total, len);
                assert_eq!(chunk_bounds(len, parts, parts), len);
            }
        }
    }

    /// Folding random diffs: the output is the sorted union by page, a page in both keeps
    /// the older slot, and exactly the newer duplicates' slots are released.
    #[test]
    fn random_folds_keep_the_older_pre_image() {
        use crate::engine::ranges::tests::{rng, ROUNDS};
        let mut rnd = rng(0x5151_5eed_0f0f_1234);
        for _ in 0..ROUNDS / 4 {
            let mut pick = |slot_base: u32| {
                let mut v: Vec<DiffEntry> = (0..32usize)
                    .filter(|_| rnd(3) == 0)
                    .map(|p| e(p * 0x1000, slot_base + p as u32))
                    .collect();
                v.sort_by_key(|x| x.page);
                v
            };
            let older = pick(0);
            let newer = pick(1000);
            let mut out = vec![];
            let mut released = vec![];
            assert!(fold_slots(
                &older,
                &newer,
                &mut out,
                &mut released,
                usize::MAX
            ));
            let mut want: Vec<DiffEntry> = older.clone();
            let mut want_released = vec![];
            for n in &newer {
                if older.iter().any(|o| o.page == n.page) {
                    want_released.push(n.slot);
                } else {
                    want.push(*n);
                }
            }
            want.sort_by_key(|x| x.page);
            assert_eq!(out, want);
            assert_eq!(released, want_released);
        }
    }

    /// Runs from random page lists and keys match a direct grouping.
    #[test]
    fn random_runs_match_direct_grouping() {
        use crate::engine::ranges::tests::{rng, ROUNDS};
        let mut rnd = rng(0x7777_0000_1111_2222);
        for _ in 0..ROUNDS / 4 {
            let pages: Vec<usize> = (0..40usize)
                .filter(|_| rnd(2) == 0)
                .map(|p| p * 0x4000)
                .collect();
            let keys: Vec<bool> = pages.iter().map(|_| rnd(4) == 0).collect();
            let mut runs = vec![];
            for_each_run(
                pages.len(),
                0x4000,
                |i| pages[i],
                |i| keys[i],
                |s, n| runs.push((s, n)),
            );
            let mut want = vec![];
            let mut i = 0;
            while i < pages.len() {
                let mut j = i + 1;
                while j < pages.len() && pages[j] == pages[j - 1] + 0x4000 && keys[j] == keys[i] {
                    j += 1;
                }
                want.push((i, j - i));
                i = j;
            }
            assert_eq!(runs, want);
        }
    }
}
