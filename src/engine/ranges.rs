//! Address-range arithmetic and sorted range sets. Pure: no system calls, so it runs
//! under plain unit tests (and Miri) on `Vec`s as well as on library reservations.

/// A half-open address range `[start, end)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Default)]
pub struct Range {
    pub start: usize,
    pub end: usize,
}

impl Range {
    pub const fn new(start: usize, end: usize) -> Self {
        Range { start, end }
    }

    /// `[base, base + len)`, or `None` when the end would wrap around the address space.
    pub fn from_len(base: usize, len: usize) -> Option<Self> {
        Some(Range::new(base, base.checked_add(len)?))
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }

    pub fn covers(&self, other: &Range) -> bool {
        self.start <= other.start && other.end <= self.end
    }

    pub fn intersects(&self, other: &Range) -> bool {
        self.start < other.end && other.start < self.end
    }

    pub fn intersection(&self, other: &Range) -> Range {
        Range::new(self.start.max(other.start), self.end.min(other.end))
    }

    /// The smallest page-aligned range containing this one (`page` a power of two);
    /// `None` if rounding up wraps.
    pub fn widen_to_pages(&self, page: usize) -> Option<Range> {
        let end = self.end.checked_add(page - 1)? & !(page - 1);
        Some(Range::new(self.start & !(page - 1), end))
    }
}

pub fn is_aligned(v: usize, page: usize) -> bool {
    v & (page - 1) == 0
}

/// The small part of `Vec` the range algorithms need, so they run on `std::vec::Vec` in
/// tests and on fixed-capacity library reservations in the product.
pub trait VecLike<T: Copy> {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn as_slice(&self) -> &[T];
    fn as_mut_slice(&mut self) -> &mut [T];
    /// Inserts at `index`; `false` when out of capacity.
    fn insert_at(&mut self, index: usize, v: T) -> bool;
    fn remove_at(&mut self, index: usize) -> T;
}

impl<T: Copy> VecLike<T> for Vec<T> {
    fn len(&self) -> usize {
        Vec::len(self)
    }
    fn as_slice(&self) -> &[T] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [T] {
        self
    }
    fn insert_at(&mut self, index: usize, v: T) -> bool {
        self.insert(index, v);
        true
    }
    fn remove_at(&mut self, index: usize) -> T {
        self.remove(index)
    }
}

/// Operations on a vector of disjoint, non-adjacent ranges sorted by address.
pub struct RangeSet;

impl RangeSet {
    /// Index of the first range whose end is above `addr`.
    fn first_ending_after(set: &[Range], addr: usize) -> usize {
        set.partition_point(|r| r.end <= addr)
    }

    /// Whether `addr` lies in the set.
    pub fn contains(set: &[Range], addr: usize) -> bool {
        let i = Self::first_ending_after(set, addr);
        i < set.len() && set[i].contains(addr)
    }

    /// Whether the whole of `r` lies in the set.
    pub fn covers(set: &[Range], r: Range) -> bool {
        if r.is_empty() {
            return true;
        }
        let i = Self::first_ending_after(set, r.start);
        i < set.len() && set[i].covers(&r)
    }

    pub fn intersects(set: &[Range], r: Range) -> bool {
        let i = Self::first_ending_after(set, r.start);
        i < set.len() && set[i].intersects(&r)
    }

    /// Adds `r`, merging with overlapping and adjacent ranges; `false` when out of capacity.
    pub fn insert<V: VecLike<Range>>(set: &mut V, r: Range) -> bool {
        if r.is_empty() {
            return true;
        }
        // The first range that touches or follows r.
        let i = set.as_slice().partition_point(|x| x.end < r.start);
        let mut merged = r;
        let mut j = i;
        while j < set.len() && set.as_slice()[j].start <= merged.end {
            let x = set.as_slice()[j];
            merged.start = merged.start.min(x.start);
            merged.end = merged.end.max(x.end);
            j += 1;
        }
        if j == i {
            return set.insert_at(i, merged);
        }
        set.as_mut_slice()[i] = merged;
        for _ in i + 1..j {
            set.remove_at(i + 1);
        }
        true
    }

    /// Removes `r` from the set, splitting a range if needed; `false` when out of capacity.
    pub fn remove<V: VecLike<Range>>(set: &mut V, r: Range) -> bool {
        if r.is_empty() {
            return true;
        }
        let mut i = Self::first_ending_after(set.as_slice(), r.start);
        while i < set.len() && set.as_slice()[i].start < r.end {
            let x = set.as_slice()[i];
            let head = Range::new(x.start, r.start.max(x.start).min(x.end));
            let tail = Range::new(r.end.min(x.end).max(x.start), x.end);
            match (head.is_empty(), tail.is_empty()) {
                (true, true) => {
                    set.remove_at(i);
                }
                (false, true) => {
                    set.as_mut_slice()[i] = head;
                    i += 1;
                }
                (true, false) => {
                    set.as_mut_slice()[i] = tail;
                    i += 1;
                }
                (false, false) => {
                    set.as_mut_slice()[i] = head;
                    if !set.insert_at(i + 1, tail) {
                        return false;
                    }
                    i += 2;
                }
            }
        }
        true
    }

    /// Calls `f` with each maximal piece of `r` that does not intersect the set, in order.
    pub fn for_each_gap(set: &[Range], r: Range, mut f: impl FnMut(Range)) {
        let mut cursor = r.start;
        let mut i = Self::first_ending_after(set, r.start);
        while cursor < r.end {
            if i >= set.len() || set[i].start >= r.end {
                f(Range::new(cursor, r.end));
                return;
            }
            let x = set[i];
            if x.start > cursor {
                f(Range::new(cursor, x.start));
            }
            cursor = cursor.max(x.end);
            i += 1;
        }
    }

    /// Calls `f` with each piece of `r` that does intersect the set, in order.
    pub fn for_each_overlap(set: &[Range], r: Range, mut f: impl FnMut(Range)) {
        let mut i = Self::first_ending_after(set, r.start);
        while i < set.len() && set[i].start < r.end {
            let piece = set[i].intersection(&r);
            if !piece.is_empty() {
                f(piece);
            }
            i += 1;
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn r(a: usize, b: usize) -> Range {
        Range::new(a, b)
    }

    #[test]
    fn insert_merges_overlapping_and_adjacent() {
        let mut s = vec![];
        assert!(RangeSet::insert(&mut s, r(10, 20)));
        assert!(RangeSet::insert(&mut s, r(30, 40)));
        assert!(RangeSet::insert(&mut s, r(50, 60)));
        assert_eq!(s, vec![r(10, 20), r(30, 40), r(50, 60)]);
        assert!(RangeSet::insert(&mut s, r(20, 30)));
        assert_eq!(s, vec![r(10, 40), r(50, 60)]);
        assert!(RangeSet::insert(&mut s, r(5, 55)));
        assert_eq!(s, vec![r(5, 60)]);
        assert!(RangeSet::insert(&mut s, r(0, 0)));
        assert_eq!(s, vec![r(5, 60)]);
    }

    #[test]
    fn remove_splits_and_trims() {
        let mut s = vec![r(0, 100)];
        assert!(RangeSet::remove(&mut s, r(40, 60)));
        assert_eq!(s, vec![r(0, 40), r(60, 100)]);
        assert!(RangeSet::remove(&mut s, r(30, 70)));
        assert_eq!(s, vec![r(0, 30), r(70, 100)]);
        assert!(RangeSet::remove(&mut s, r(0, 30)));
        assert_eq!(s, vec![r(70, 100)]);
        assert!(RangeSet::remove(&mut s, r(90, 200)));
        assert_eq!(s, vec![r(70, 90)]);
        assert!(RangeSet::remove(&mut s, r(0, 1000)));
        assert!(s.is_empty());
    }

    #[test]
    fn membership_queries() {
        let s = vec![r(10, 20), r(30, 40)];
        assert!(RangeSet::contains(&s, 10));
        assert!(!RangeSet::contains(&s, 20));
        assert!(RangeSet::covers(&s, r(31, 40)));
        assert!(!RangeSet::covers(&s, r(15, 31)));
        assert!(RangeSet::intersects(&s, r(19, 31)));
        assert!(!RangeSet::intersects(&s, r(20, 30)));
    }

    #[test]
    fn gaps_and_overlaps_partition_the_range() {
        let s = vec![r(10, 20), r(30, 40)];
        let mut gaps = vec![];
        RangeSet::for_each_gap(&s, r(0, 50), |g| gaps.push(g));
        assert_eq!(gaps, vec![r(0, 10), r(20, 30), r(40, 50)]);
        let mut over = vec![];
        RangeSet::for_each_overlap(&s, r(15, 35), |g| over.push(g));
        assert_eq!(over, vec![r(15, 20), r(30, 35)]);
        gaps.clear();
        RangeSet::for_each_gap(&s, r(12, 18), |g| gaps.push(g));
        assert!(gaps.is_empty());
    }

    #[test]
    fn page_widening_and_wrap() {
        assert_eq!(
            r(0x1001, 0x2001).widen_to_pages(0x1000),
            Some(r(0x1000, 0x3000))
        );
        assert_eq!(r(0, usize::MAX).widen_to_pages(0x1000), None);
        assert_eq!(Range::from_len(usize::MAX - 1, 2), None);
        assert!(is_aligned(0x2000, 0x1000) && !is_aligned(0x2001, 0x1000));
    }

    /// Rounds for the randomized tests: Miri interprets every step, so it gets fewer.
    pub(crate) const ROUNDS: usize = if cfg!(miri) { 150 } else { 2000 };

    /// A seeded xorshift source of `0..n` values for the randomized tests.
    pub(crate) fn rng(mut seed: u64) -> impl FnMut(usize) -> usize {
        move |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        }
    }

    /// A randomized cross-check against a bitmap model.
    #[test]
    fn random_ops_match_bitmap_model() {
        let mut rnd = rng(0x2545_f491_4f6c_dd1d);
        let mut s: Vec<Range> = vec![];
        let mut model = [false; 200];
        for _ in 0..ROUNDS {
            let a = rnd(200);
            let b = (a + rnd(30)).min(200);
            if rnd(2) == 0 {
                RangeSet::insert(&mut s, r(a, b));
                model[a..b].iter_mut().for_each(|m| *m = true);
            } else {
                RangeSet::remove(&mut s, r(a, b));
                model[a..b].iter_mut().for_each(|m| *m = false);
            }
            for w in s.windows(2) {
                assert!(w[0].end < w[1].start, "sorted, disjoint, non-adjacent");
            }
            for (i, &m) in model.iter().enumerate() {
                assert_eq!(RangeSet::contains(&s, i), m);
            }
        }
    }

    /// Gaps, overlaps, covers and intersects agree with a bitmap for random sets and
    /// random query ranges.
    #[test]
    fn random_queries_match_bitmap_model() {
        let mut rnd = rng(0x9e37_79b9_7f4a_7c15);
        for _ in 0..ROUNDS / 20 {
            let mut s: Vec<Range> = vec![];
            let mut model = [false; 120];
            for _ in 0..rnd(8) {
                let a = rnd(120);
                let b = (a + 1 + rnd(20)).min(120);
                RangeSet::insert(&mut s, r(a, b));
                model[a..b].iter_mut().for_each(|m| *m = true);
            }
            for _ in 0..10 {
                let a = rnd(120);
                let q = r(a, (a + rnd(40)).min(120));
                let (mut gaps, mut over) = (vec![], vec![]);
                RangeSet::for_each_gap(&s, q, |g| gaps.push(g));
                RangeSet::for_each_overlap(&s, q, |g| over.push(g));
                // Expected maximal runs of each kind inside q.
                let runs = |want: bool| {
                    let mut out = vec![];
                    let mut i = q.start;
                    while i < q.end {
                        if model[i] == want {
                            let j = (i..q.end).find(|&j| model[j] != want).unwrap_or(q.end);
                            out.push(r(i, j));
                            i = j;
                        } else {
                            i += 1;
                        }
                    }
                    out
                };
                assert_eq!(gaps, runs(false), "gaps of {q:?} in {s:?}");
                assert_eq!(over, runs(true), "overlaps of {q:?} in {s:?}");
                let set_bits = model[q.start..q.end].iter().filter(|&&m| m).count();
                assert_eq!(RangeSet::covers(&s, q), set_bits == q.len(), "{q:?} {s:?}");
                // An empty query strictly inside a range counts as intersecting it (as
                // in the original's Intersects); only non-empty queries are compared.
                if !q.is_empty() {
                    assert_eq!(
                        RangeSet::intersects(&s, q),
                        set_bits > 0,
                        "intersects {q:?} {s:?}"
                    );
                }
            }
        }
    }

    /// A vector with a hard capacity, like the library's reservations.
    struct Capped(Vec<Range>, usize);

    impl VecLike<Range> for Capped {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn as_slice(&self) -> &[Range] {
            &self.0
        }
        fn as_mut_slice(&mut self) -> &mut [Range] {
            &mut self.0
        }
        fn insert_at(&mut self, index: usize, v: Range) -> bool {
            if self.0.len() == self.1 {
                return false;
            }
            self.0.insert(index, v);
            true
        }
        fn remove_at(&mut self, index: usize) -> Range {
            self.0.remove(index)
        }
    }

    #[test]
    fn full_capacity_is_reported_and_the_set_stays_sorted() {
        let mut s = Capped(vec![], 2);
        assert!(RangeSet::insert(&mut s, r(10, 20)));
        assert!(RangeSet::insert(&mut s, r(30, 40)));
        assert!(
            !RangeSet::insert(&mut s, r(50, 60)),
            "a third range does not fit"
        );
        assert_eq!(s.0, vec![r(10, 20), r(30, 40)]);
        // Merging needs no room, and trimming an end neither.
        assert!(RangeSet::insert(&mut s, r(20, 25)));
        assert!(RangeSet::remove(&mut s, r(35, 40)));
        assert_eq!(s.0, vec![r(10, 25), r(30, 35)]);
        // Splitting a range needs one more entry.
        assert!(!RangeSet::remove(&mut s, r(12, 14)));
        for w in s.0.windows(2) {
            assert!(w[0].end < w[1].start, "sorted, disjoint, non-adjacent");
        }
        assert!(!RangeSet::contains(&s.0, 12), "the removed part is gone");
    }
}
