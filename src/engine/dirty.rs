//! Dirty-page bookkeeping that needs no system calls: the shape of a saved diff, runs of
//! adjacent pages (so protection changes take one call per run, not per page), folding one
//! diff into its predecessor, and splitting restore work between threads.

/// One page of a saved diff: the page's address and the slot holding its contents at the
/// checkpoint the diff belongs to (its pre-image).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DiffEntry {
    pub page: usize,
    pub slot: u32,
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

/// Merges the newest diff into its predecessor: for a page in both, the older pre-image
/// is the one to keep and the newer slot is released with `release`. Both inputs are
/// sorted by page; `out` receives the sorted union. Returns `false` if `out` is full.
pub fn fold_into_predecessor(
    older: &[DiffEntry],
    newer: &[DiffEntry],
    mut out: impl FnMut(DiffEntry) -> bool,
    mut release: impl FnMut(u32),
) -> bool {
    let (mut i, mut j) = (0, 0);
    while i < older.len() || j < newer.len() {
        let next = if j == newer.len() || (i < older.len() && older[i].page < newer[j].page) {
            i += 1;
            older[i - 1]
        } else if i == older.len() || newer[j].page < older[i].page {
            j += 1;
            newer[j - 1]
        } else {
            release(newer[j].slot);
            i += 1;
            j += 1;
            older[i - 1]
        };
        if !out(next) {
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
        DiffEntry { page, slot }
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
        assert!(fold_into_predecessor(
            &older,
            &newer,
            |x| {
                out.push(x);
                true
            },
            |s| released.push(s)
        ));
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
        let mut n = 0;
        assert!(!fold_into_predecessor(
            &older,
            &newer,
            |_| {
                n += 1;
                n < 2
            },
            |_| {}
        ));
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
            assert!(fold_into_predecessor(
                &older,
                &newer,
                |x| {
                    out.push(x);
                    true
                },
                |s| released.push(s)
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
