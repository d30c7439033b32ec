//! Snapshot pages larger than the kernel's: which parts of one snapshot page are tracked.
//!
//! The engine tracks memory in units of its snapshot page (`Engine::page`): one state
//! word, one copy slot and one dirty-log entry per unit. On macOS arm64 that unit is the
//! kernel's 16 KiB page. It may also be set larger than the kernel page (16 KiB on a
//! 4 KiB Linux kernel, which is how the Linux suite exercises the 16 KiB code paths).
//! Then mappings, stacks and exclusions, which the kernel aligns only to its own page,
//! can cover part of a unit. Such a unit is *partial*: a mask records which kernel pages
//! of it are tracked, and which of those are executable, and every copy, comparison and
//! protection of the unit is clipped to the tracked spans. Bytes of a partial unit that
//! memsnap does not track are never read, written or re-protected by it.
//!
//! Pure logic: no system calls; unit-tested below.

/// The tracked kernel pages of one snapshot page (bits 0..16) and which of them are
/// executable (bits 16..32). A snapshot page holds at most [`MAX_SUBPAGES`] kernel pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Mask(pub u32);

/// The most kernel pages one snapshot page may span.
pub const MAX_SUBPAGES: usize = 16;

impl Mask {
    pub fn tracked(self) -> u32 {
        self.0 & 0xffff
    }

    pub fn exec(self) -> u32 {
        self.0 >> 16
    }

    pub fn is_empty(self) -> bool {
        self.tracked() == 0
    }

    /// All `n` kernel pages tracked with one execute bit: the unit needs no mask.
    pub fn is_uniform(self, n: usize) -> Option<bool> {
        let all = full(n);
        if self.tracked() != all {
            return None;
        }
        match self.exec() {
            0 => Some(false),
            e if e == all => Some(true),
            _ => None,
        }
    }

    /// Marks kernel pages `bits` tracked with the given execute bit.
    pub fn with(self, bits: u32, exec: bool) -> Mask {
        let e = if exec {
            self.exec() | bits
        } else {
            self.exec() & !bits
        };
        Mask((self.tracked() | bits) | (e << 16))
    }

    /// Marks kernel pages `bits` untracked.
    pub fn without(self, bits: u32) -> Mask {
        let t = self.tracked() & !bits;
        Mask(t | ((self.exec() & t) << 16))
    }

    /// The mask of a unit that is wholly tracked with one execute bit.
    pub fn uniform(n: usize, exec: bool) -> Mask {
        let all = full(n);
        Mask(all | if exec { all << 16 } else { 0 })
    }

    /// Calls `f(offset, len, exec)` for every maximal run of tracked kernel pages with
    /// the same execute bit, `sub` being the kernel page size.
    pub fn for_each_span(self, sub: usize, mut f: impl FnMut(usize, usize, bool)) {
        let t = self.tracked();
        let mut i = 0u32;
        while i < MAX_SUBPAGES as u32 {
            if t & (1 << i) == 0 {
                i += 1;
                continue;
            }
            let exec = self.exec() & (1 << i) != 0;
            let mut j = i + 1;
            while j < MAX_SUBPAGES as u32
                && t & (1 << j) != 0
                && (self.exec() & (1 << j) != 0) == exec
            {
                j += 1;
            }
            f(i as usize * sub, (j - i) as usize * sub, exec);
            i = j;
        }
    }
}

fn full(n: usize) -> u32 {
    if n >= 32 {
        u32::MAX
    } else {
        (1u32 << n) - 1
    }
}

/// The kernel pages of the unit at `unit` (a multiple of `page`) that `[start, end)`
/// covers, as mask bits; `sub` is the kernel page size and both ends are multiples of it.
pub fn bits_in(unit: usize, page: usize, sub: usize, start: usize, end: usize) -> u32 {
    let a = start.max(unit);
    let b = end.min(unit + page);
    if a >= b {
        return 0;
    }
    let first = (a - unit) / sub;
    let count = (b - a).div_ceil(sub);
    full(count) << first
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUB: usize = 0x1000;
    const PAGE: usize = 0x4000;

    fn spans(m: Mask) -> Vec<(usize, usize, bool)> {
        let mut v = Vec::new();
        m.for_each_span(SUB, |o, l, e| v.push((o, l, e)));
        v
    }

    #[test]
    fn bits_of_a_range_within_a_unit() {
        assert_eq!(bits_in(0x4000, PAGE, SUB, 0x4000, 0x8000), 0b1111);
        assert_eq!(bits_in(0x4000, PAGE, SUB, 0x5000, 0x7000), 0b0110);
        assert_eq!(bits_in(0x4000, PAGE, SUB, 0x0000, 0x5000), 0b0001);
        assert_eq!(bits_in(0x4000, PAGE, SUB, 0x7000, 0x9000), 0b1000);
        assert_eq!(bits_in(0x4000, PAGE, SUB, 0x8000, 0x9000), 0);
        assert_eq!(bits_in(0x4000, PAGE, SUB, 0x1000, 0x4000), 0);
    }

    #[test]
    fn marking_and_unmarking() {
        let m = Mask::default().with(0b0011, false).with(0b1100, true);
        assert_eq!(m.tracked(), 0b1111);
        assert_eq!(m.exec(), 0b1100);
        assert_eq!(m.is_uniform(4), None);
        let m = m.with(0b1100, false);
        assert_eq!(m.is_uniform(4), Some(false));
        assert_eq!(Mask::uniform(4, true).is_uniform(4), Some(true));
        let m = Mask::uniform(4, true).without(0b0101);
        assert_eq!((m.tracked(), m.exec()), (0b1010, 0b1010));
        assert!(m.without(0b1010).is_empty());
        assert_eq!(Mask::uniform(16, false).tracked(), 0xffff);
    }

    #[test]
    fn spans_split_on_gaps_and_exec() {
        assert_eq!(spans(Mask::uniform(4, false)), vec![(0, 0x4000, false)]);
        let m = Mask::default().with(0b1011, false);
        assert_eq!(spans(m), vec![(0, 0x2000, false), (0x3000, 0x1000, false)]);
        let m = Mask::default().with(0b0011, false).with(0b0100, true);
        assert_eq!(spans(m), vec![(0, 0x2000, false), (0x2000, 0x1000, true)]);
        assert_eq!(spans(Mask::default()), vec![]);
        assert_eq!(spans(Mask::uniform(16, true)), vec![(0, 16 * SUB, true)]);
    }
}
