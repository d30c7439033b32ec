//! Pre-images smaller than a page: a page's older bytes stored as the XOR against its
//! newer bytes, with runs of unchanged words left out (the idea of QEMU's XBZRLE, at word
//! granularity). Pure logic on word slices and byte buffers; the engine decides where the
//! bytes live (see `engine::deltas`).
//!
//! Why XOR against the newer bytes: when a checkpoint saves a pre-image, both the older
//! bytes (the pre-image) and the newer ones (memory, which is what a rewind will find)
//! are at hand, and most dirty pages change in a few words. Applying the delta to the
//! newer bytes gives the older ones back, in place, touching only the changed words.
//! XOR deltas also compose: the delta from A to B followed by the one from B to C is the
//! XOR of the two, which keeps folding diffs (`EraseLastSavedDiffMemorySnapshot`) a merge.
//!
//! Format: a sequence of records `skip, count, count words`, where `skip` is the number of
//! unchanged words before the record (LEB128), `count` the number of changed words that
//! follow (LEB128, at least 1), then those words' XOR values (8 bytes each, little
//! endian). Words after the last record are unchanged. The empty delta means "no change".

/// A word index and the XOR value to apply there.
pub type Change = (usize, u64);

/// Appends LEB128 `v` at `out[*at..]`; `false` when it does not fit.
#[inline]
fn put_varint(out: &mut [u8], at: &mut usize, mut v: usize) -> bool {
    loop {
        if *at >= out.len() {
            return false;
        }
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out[*at] = b;
            *at += 1;
            return true;
        }
        out[*at] = b | 0x80;
        *at += 1;
    }
}

/// Reads a LEB128 value at `d[*at..]`; `None` on a truncated or oversized number.
#[inline]
fn get_varint(d: &[u8], at: &mut usize) -> Option<usize> {
    let mut v = 0usize;
    let mut shift = 0;
    loop {
        let b = *d.get(*at)?;
        *at += 1;
        if shift >= usize::BITS {
            return None;
        }
        v |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
        shift += 7;
    }
}

/// Builds a delta from changes pushed in ascending word order, into a bounded buffer.
pub struct Encoder<'a> {
    out: &'a mut [u8],
    at: usize,
    /// Where the current record's `count` goes, its value so far, and the word after it.
    count_at: usize,
    count: usize,
    next: usize,
    ok: bool,
}

/// Room kept for a record's `count`, written once the record ends: words per page stay
/// far below 2^21, so three LEB128 bytes always hold it (padded with continuation bytes).
const COUNT_BYTES: usize = 3;

impl<'a> Encoder<'a> {
    pub fn new(out: &'a mut [u8]) -> Self {
        Encoder {
            out,
            at: 0,
            count_at: 0,
            count: 0,
            next: 0,
            ok: true,
        }
    }

    /// Adds the change `x` at word `i` (after every earlier one; `x` not zero). Returns
    /// `false` once the buffer is full (the delta would not fit).
    #[inline]
    pub fn push(&mut self, i: usize, x: u64) -> bool {
        if !self.ok {
            return false;
        }
        if self.count == 0 || i != self.next {
            self.close();
            let skip = i - self.next;
            if !put_varint(self.out, &mut self.at, skip) || self.at + COUNT_BYTES > self.out.len() {
                self.ok = false;
                return false;
            }
            self.count_at = self.at;
            self.at += COUNT_BYTES;
        }
        if self.at + 8 > self.out.len() {
            self.ok = false;
            return false;
        }
        self.out[self.at..self.at + 8].copy_from_slice(&x.to_le_bytes());
        self.at += 8;
        self.count += 1;
        self.next = i + 1;
        true
    }

    /// Writes the open record's count.
    fn close(&mut self) {
        if self.count > 0 {
            let c = self.count;
            debug_assert!(c < 1 << (7 * COUNT_BYTES));
            self.out[self.count_at] = (c & 0x7f) as u8 | 0x80;
            self.out[self.count_at + 1] = ((c >> 7) & 0x7f) as u8 | 0x80;
            self.out[self.count_at + 2] = ((c >> 14) & 0x7f) as u8;
            self.count = 0;
        }
    }

    /// The delta's length, or `None` if it did not fit.
    pub fn finish(mut self) -> Option<usize> {
        if !self.ok {
            return None;
        }
        self.close();
        Some(self.at)
    }
}

/// Encodes `xor(i)` for `i in 0..words` (zero words left out) into `out`: the delta's
/// length, or `None` when it needs more than `out.len()` bytes.
#[inline]
fn encode_with(words: usize, xor: impl Fn(usize) -> u64, out: &mut [u8]) -> Option<usize> {
    let mut e = Encoder::new(out);
    let mut i = 0;
    // Eight words (a cache line) at a time: most of a lightly written page is unchanged.
    while i + 8 <= words {
        let mut any = 0;
        for j in 0..8 {
            any |= xor(i + j);
        }
        if any != 0 {
            for j in 0..8 {
                let x = xor(i + j);
                if x != 0 && !e.push(i + j, x) {
                    return None;
                }
            }
        }
        i += 8;
    }
    while i < words {
        let x = xor(i);
        if x != 0 && !e.push(i, x) {
            return None;
        }
        i += 1;
    }
    e.finish()
}

/// The delta taking `new` back to `old` (the same length), in at most `out.len()` bytes.
pub fn encode(old: &[u64], new: &[u64], out: &mut [u8]) -> Option<usize> {
    assert_eq!(old.len(), new.len());
    encode_with(new.len(), |i| old[i] ^ new[i], out)
}

/// The delta taking `new` back to all zeroes.
pub fn encode_from_zero(new: &[u64], out: &mut [u8]) -> Option<usize> {
    encode_with(new.len(), |i| new[i], out)
}

/// Calls `f(word, xor)` for every change of `delta`, in ascending word order. `false` for
/// a malformed delta (it stops there).
pub fn for_each_change(delta: &[u8], mut f: impl FnMut(usize, u64)) -> bool {
    let mut at = 0;
    let mut word = 0usize;
    while at < delta.len() {
        let (Some(skip), Some(count)) = (get_varint(delta, &mut at), get_varint(delta, &mut at))
        else {
            return false;
        };
        if count == 0 || delta.len() - at < count.saturating_mul(8) {
            return false;
        }
        word = match word.checked_add(skip) {
            Some(w) => w,
            None => return false,
        };
        for k in 0..count {
            let b = &delta[at + 8 * k..at + 8 * k + 8];
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            f(word + k, u64::from_le_bytes(w));
        }
        at += 8 * count;
        word += count;
    }
    true
}

/// Applies `delta` to `words` in place (XOR). `false` for a delta that is malformed or
/// reaches past `words` (nothing past them is touched).
pub fn apply(delta: &[u8], words: &mut [u64]) -> bool {
    let mut inside = true;
    let ok = for_each_change(delta, |i, x| match words.get_mut(i) {
        Some(w) => *w ^= x,
        None => inside = false,
    });
    ok && inside
}

/// The changes of a delta as an iterator (for composing two).
struct Changes<'a> {
    d: &'a [u8],
    at: usize,
    word: usize,
    left: usize,
}

impl Iterator for Changes<'_> {
    type Item = Change;
    fn next(&mut self) -> Option<Change> {
        if self.left == 0 {
            if self.at >= self.d.len() {
                return None;
            }
            let skip = get_varint(self.d, &mut self.at)?;
            let count = get_varint(self.d, &mut self.at)?;
            if count == 0 || self.d.len() - self.at < count.checked_mul(8)? {
                self.at = self.d.len();
                return None;
            }
            self.word = self.word.checked_add(skip)?;
            self.left = count;
        }
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.d[self.at..self.at + 8]);
        self.at += 8;
        self.left -= 1;
        let c = (self.word, u64::from_le_bytes(w));
        self.word += 1;
        Some(c)
    }
}

fn changes(d: &[u8]) -> Changes<'_> {
    Changes {
        d,
        at: 0,
        word: 0,
        left: 0,
    }
}

/// The delta equal to applying `a` then `b` (their XOR), into `out`: its length, or
/// `None` when it does not fit. Words both change alike cancel out.
pub fn compose(a: &[u8], b: &[u8], out: &mut [u8]) -> Option<usize> {
    let mut e = Encoder::new(out);
    let (mut x, mut y) = (changes(a), changes(b));
    let (mut p, mut q) = (x.next(), y.next());
    loop {
        let (i, v) = match (p, q) {
            (None, None) => break,
            (Some(c), None) => {
                p = x.next();
                c
            }
            (None, Some(c)) => {
                q = y.next();
                c
            }
            (Some(c), Some(d)) => {
                if c.0 < d.0 {
                    p = x.next();
                    c
                } else if d.0 < c.0 {
                    q = y.next();
                    d
                } else {
                    p = x.next();
                    q = y.next();
                    (c.0, c.1 ^ d.1)
                }
            }
        };
        if v != 0 && !e.push(i, v) {
            return None;
        }
    }
    e.finish()
}

/// The most bytes a delta of a `words`-word page can take (every word changed, in
/// records split as badly as possible): a bound for composing two deltas.
pub fn max_len(words: usize) -> usize {
    // Every word's XOR, plus a record header (skip and count) per run of changed words:
    // at most one run every other word.
    words * 8 + words.div_ceil(2) * (3 + COUNT_BYTES) + 16
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::ranges::tests::{rng, ROUNDS};

    /// A random 64-bit word from the shared test source.
    fn word(rnd: &mut impl FnMut(usize) -> usize) -> u64 {
        ((rnd(1 << 32) as u64) << 32) | rnd(1 << 32) as u64
    }

    fn page(words: usize, rnd: &mut impl FnMut(usize) -> usize) -> Vec<u64> {
        (0..words).map(|_| word(rnd)).collect()
    }

    /// Changes `n` random words (sometimes runs of them) of `p`.
    fn scribble(p: &mut [u64], n: usize, rnd: &mut impl FnMut(usize) -> usize) {
        for _ in 0..n {
            let i = rnd(p.len());
            let run = 1 + rnd(4);
            for w in p.iter_mut().skip(i).take(run) {
                *w ^= word(rnd) | 1;
            }
        }
    }

    #[test]
    fn unchanged_page_is_the_empty_delta() {
        let p = vec![7u64; 512];
        let mut out = [0u8; 64];
        assert_eq!(encode(&p, &p, &mut out), Some(0));
        assert_eq!(encode_from_zero(&[0u64; 512], &mut out), Some(0));
        let mut q = p.clone();
        assert!(apply(&[], &mut q));
        assert_eq!(q, p);
    }

    #[test]
    fn one_changed_word_takes_a_few_bytes() {
        let old = vec![0u64; 512];
        let mut new = old.clone();
        new[300] = 0xdead_beef;
        let mut out = [0u8; 64];
        let n = encode(&old, &new, &mut out).unwrap();
        // skip (2 bytes), count (3 bytes), one word.
        assert_eq!(n, 2 + 3 + 8);
        let mut back = new.clone();
        assert!(apply(&out[..n], &mut back));
        assert_eq!(back, old);
    }

    #[test]
    fn a_delta_that_does_not_pay_is_refused() {
        let mut rnd = rng(0xd17a_0001);
        let old = page(512, &mut rnd);
        let new = page(512, &mut rnd);
        let mut out = vec![0u8; 2048];
        assert_eq!(encode(&old, &new, &mut out), None);
        let mut big = vec![0u8; max_len(512)];
        let n = encode(&old, &new, &mut big).unwrap();
        let mut back = new.clone();
        assert!(apply(&big[..n], &mut back));
        assert_eq!(back, old);
    }

    #[test]
    fn round_trips_on_random_pages() {
        let mut rnd = rng(0xd17a_0002);
        let mut out = vec![0u8; max_len(512)];
        for round in 0..ROUNDS {
            let words = [512usize, 2048, 13, 8, 1][round % 5];
            let old = if round % 7 == 0 {
                vec![0u64; words]
            } else {
                page(words, &mut rnd)
            };
            let mut new = old.clone();
            let n = rnd(40);
            scribble(&mut new, n, &mut rnd);
            let len = if round % 7 == 0 {
                encode_from_zero(&new, &mut out)
            } else {
                encode(&old, &new, &mut out)
            };
            let len = match len {
                Some(l) => l,
                None => {
                    assert!(words > 512, "a {words}-word delta fits max_len");
                    continue;
                }
            };
            assert!(len <= max_len(words));
            let mut back = new.clone();
            assert!(apply(&out[..len], &mut back));
            assert_eq!(back, old);
            let mut count = 0;
            assert!(for_each_change(&out[..len], |i, x| {
                assert_eq!(x, old[i] ^ new[i]);
                count += 1;
            }));
            assert_eq!(count, old.iter().zip(&new).filter(|(a, b)| a != b).count());
        }
    }

    /// Composing the deltas A<-B and B<-C gives A<-C, as encoding A against C does.
    #[test]
    fn deltas_compose() {
        let mut rnd = rng(0xd17a_0003);
        let words = 512;
        let mut d1 = vec![0u8; max_len(words)];
        let mut d2 = vec![0u8; max_len(words)];
        let mut d3 = vec![0u8; 2 * max_len(words)];
        let mut direct = vec![0u8; max_len(words)];
        for _ in 0..ROUNDS {
            let a = page(words, &mut rnd);
            let mut b = a.clone();
            scribble(&mut b, rnd(30), &mut rnd);
            let mut c = b.clone();
            scribble(&mut c, rnd(30), &mut rnd);
            if rnd(5) == 0 {
                // Writes undone later: those words cancel out.
                c[..words / 2].copy_from_slice(&a[..words / 2]);
            }
            let n1 = encode(&a, &b, &mut d1).unwrap();
            let n2 = encode(&b, &c, &mut d2).unwrap();
            let n3 = compose(&d1[..n1], &d2[..n2], &mut d3).unwrap();
            let nd = encode(&a, &c, &mut direct).unwrap();
            assert_eq!(&d3[..n3], &direct[..nd]);
            let mut back = c.clone();
            assert!(apply(&d3[..n3], &mut back));
            assert_eq!(back, a);
        }
    }

    #[test]
    fn malformed_deltas_are_reported() {
        let mut w = vec![0u64; 4];
        // A count of zero, a truncated word, a change past the page.
        assert!(!apply(&[0, 0], &mut w));
        assert!(!apply(&[0, 1, 1, 2, 3], &mut w));
        assert!(!apply(&[4, 1, 1, 0, 0, 0, 0, 0, 0, 0], &mut w));
        assert_eq!(w, vec![0; 4]);
        assert!(apply(&[3, 1, 1, 0, 0, 0, 0, 0, 0, 0], &mut w));
        assert_eq!(w, vec![0, 0, 0, 1]);
    }

    #[test]
    fn encoder_stops_at_the_buffer_end() {
        for cap in 0..40 {
            let mut out = vec![0u8; cap];
            let mut e = Encoder::new(&mut out);
            let fits = e.push(0, 1) && e.push(5, 2) && e.push(6, 3);
            let len = e.finish();
            // One record (1 + 3 + 8), then one of two words (1 + 3 + 16).
            let need = 12 + 20;
            assert_eq!(fits && len.is_some(), cap >= need, "cap {cap}");
            if let Some(n) = len {
                let mut w = vec![0u64; 8];
                assert!(apply(&out[..n], &mut w));
                assert_eq!(w, vec![1, 0, 0, 0, 0, 2, 3, 0]);
            }
        }
    }
}
