//! The free-region set behind `AllocateMemory(Tracked)` after the first snapshot: tracked
//! memory that is not in use at the current point of execution. Pure logic over a sorted,
//! coalesced range vector; zeroing what is handed out is the caller's job.

use super::ranges::{Range, RangeSet, VecLike};

pub struct FreeSet;

impl FreeSet {
    /// Adds a free range (merging with neighbours); `false` when out of capacity.
    pub fn insert<V: VecLike<Range>>(set: &mut V, r: Range) -> bool {
        RangeSet::insert(set, r)
    }

    /// Takes `size` bytes: at `hint` when `[hint, hint + size)` is entirely free, otherwise
    /// from the start of the smallest free range that is large enough (best fit).
    /// `None` when nothing fits (or the set ran out of capacity splitting a range).
    pub fn extract<V: VecLike<Range>>(set: &mut V, hint: usize, size: usize) -> Option<usize> {
        if size == 0 {
            return None;
        }
        if hint != 0 {
            if let Some(want) = Range::from_len(hint, size) {
                if RangeSet::covers(set.as_slice(), want) {
                    return RangeSet::remove(set, want).then_some(hint);
                }
            }
        }
        let best = set
            .as_slice()
            .iter()
            .filter(|r| r.len() >= size)
            .min_by_key(|r| r.len())
            .copied()?;
        let taken = Range::new(best.start, best.start + size);
        RangeSet::remove(set, taken).then_some(best.start)
    }

    pub fn intersects(set: &[Range], r: Range) -> bool {
        RangeSet::intersects(set, r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(a: usize, b: usize) -> Range {
        Range::new(a, b)
    }

    #[test]
    fn best_fit_takes_the_smallest_range_that_fits() {
        let mut s = vec![];
        FreeSet::insert(&mut s, r(0x10000, 0x20000));
        FreeSet::insert(&mut s, r(0x40000, 0x42000));
        FreeSet::insert(&mut s, r(0x50000, 0x58000));
        assert_eq!(FreeSet::extract(&mut s, 0, 0x2000), Some(0x40000));
        assert_eq!(FreeSet::extract(&mut s, 0, 0x3000), Some(0x50000));
        assert_eq!(s, vec![r(0x10000, 0x20000), r(0x53000, 0x58000)]);
        assert_eq!(FreeSet::extract(&mut s, 0, 0x100000), None);
    }

    #[test]
    fn hint_is_honoured_when_free_and_ignored_otherwise() {
        let mut s = vec![r(0x10000, 0x20000)];
        assert_eq!(FreeSet::extract(&mut s, 0x14000, 0x1000), Some(0x14000));
        assert_eq!(s, vec![r(0x10000, 0x14000), r(0x15000, 0x20000)]);
        // The hinted range is not free: fall back to best fit.
        assert_eq!(FreeSet::extract(&mut s, 0x14000, 0x1000), Some(0x10000));
        // A hint whose end wraps never matches.
        assert_eq!(
            FreeSet::extract(&mut s, usize::MAX - 0xfff, 0x2000),
            Some(0x11000)
        );
    }

    #[test]
    fn freed_neighbours_coalesce() {
        let mut s = vec![];
        FreeSet::insert(&mut s, r(0x1000, 0x2000));
        FreeSet::insert(&mut s, r(0x3000, 0x4000));
        FreeSet::insert(&mut s, r(0x2000, 0x3000));
        assert_eq!(s, vec![r(0x1000, 0x4000)]);
        assert!(FreeSet::intersects(&s, r(0x3fff, 0x5000)));
        assert!(!FreeSet::intersects(&s, r(0x4000, 0x5000)));
        assert_eq!(FreeSet::extract(&mut s, 0, 0), None);
    }

    /// Random frees and extractions (with and without hints) against a page bitmap:
    /// what is handed out was free, a free hint is honoured, best fit picks a smallest
    /// maximal free run that fits, and nothing that fits is refused.
    #[test]
    fn random_extracts_match_bitmap_model() {
        use crate::engine::ranges::tests::{rng, ROUNDS};
        const PAGE: usize = 0x1000;
        const PAGES: usize = 64;
        let mut rnd = rng(0x0123_4567_89ab_cdef);
        let mut s: Vec<Range> = vec![];
        let mut free = [false; PAGES];
        let at = |p: usize| 0x10_0000 + p * PAGE;
        // Maximal free runs of the model, as (first page, pages).
        let runs = |free: &[bool; PAGES]| {
            let mut out = vec![];
            let mut i = 0;
            while i < PAGES {
                if free[i] {
                    let j = (i..PAGES).find(|&j| !free[j]).unwrap_or(PAGES);
                    out.push((i, j - i));
                    i = j;
                } else {
                    i += 1;
                }
            }
            out
        };
        for _ in 0..ROUNDS {
            if rnd(2) == 0 {
                let a = rnd(PAGES);
                let b = (a + 1 + rnd(8)).min(PAGES);
                if free[a..b].iter().all(|&f| !f) {
                    assert!(FreeSet::insert(&mut s, r(at(a), at(b))));
                    free[a..b].iter_mut().for_each(|f| *f = true);
                }
            } else {
                let n = 1 + rnd(6);
                let hint = if rnd(3) == 0 { at(rnd(PAGES)) } else { 0 };
                let fit = runs(&free)
                    .into_iter()
                    .filter(|&(_, len)| len >= n)
                    .min_by_key(|&(_, len)| len);
                let hint_page = (hint != 0).then(|| (hint - at(0)) / PAGE);
                let hint_free =
                    hint_page.is_some_and(|h| h + n <= PAGES && free[h..h + n].iter().all(|&f| f));
                let got = FreeSet::extract(&mut s, hint, n * PAGE);
                match got {
                    None => assert!(fit.is_none(), "refused {n} pages with {fit:?} free"),
                    Some(p) => {
                        let first = (p - at(0)) / PAGE;
                        assert!(free[first..first + n].iter().all(|&f| f), "handed out used");
                        if hint_free {
                            assert_eq!(p, hint, "a free hint is honoured");
                        } else {
                            let smallest = fit.expect("something fitted").1;
                            let run = runs(&free)
                                .into_iter()
                                .find(|&(f, len)| f == first && len >= n)
                                .expect("best fit starts a free run");
                            assert_eq!(run.1, smallest, "best fit");
                        }
                        free[first..first + n].iter_mut().for_each(|f| *f = false);
                    }
                }
            }
            let want: Vec<Range> = runs(&free)
                .into_iter()
                .map(|(f, len)| r(at(f), at(f + len)))
                .collect();
            assert_eq!(s, want, "the set is the model's coalesced free runs");
        }
    }
}
