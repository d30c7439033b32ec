//! UFFDIO_WRITEPROTECT across several mappings on kernels that refuse it.
//!
//! Before Linux 6.5 the ioctl requires its range to lie inside one VMA and answers ENOENT
//! otherwise, without changing anything; newer kernels walk every VMA in the range and
//! skip unmapped holes. The engine protects and unprotects ranges that span several VMAs
//! (neighbouring tracked mappings that the kernel did not merge), so on 6.1 every such
//! call failed (docs/kernels.md). [`split_on_enoent`] retries a refused range in halves
//! down to single kernel pages, each of which lies in one VMA, and skips pages that are
//! not mapped at all: the newer kernels' answer, from any kernel. Pure logic: the ioctl
//! and the mapped-page test are passed in.

/// Runs `op(start, len)` on `[start, start + len)` (page-aligned, a multiple of `page`);
/// where it fails with ENOENT, on each half in turn, down to single pages. A single page
/// that still gets ENOENT is skipped when `mapped` says no VMA covers it (a hole), and is
/// an error otherwise (a mapping not registered with the userfaultfd). The first other
/// error stops the walk. Err(ENOENT) also when nothing in the range is mapped, as the
/// kernel answers for a range with no VMA.
///
/// Recursion depth is at most log2(len / page) + 1; nothing is allocated, so this may run
/// wherever the ioctl may.
pub fn split_on_enoent(
    start: usize,
    len: usize,
    page: usize,
    op: &mut impl FnMut(usize, usize) -> Result<(), i32>,
    mapped: &impl Fn(usize) -> bool,
) -> Result<(), i32> {
    match walk(start, len, page, op, mapped)? {
        true => Ok(()),
        false => Err(libc::ENOENT),
    }
}

/// `split_on_enoent`'s walk: Ok(whether any page of the range is mapped).
fn walk(
    start: usize,
    len: usize,
    page: usize,
    op: &mut impl FnMut(usize, usize) -> Result<(), i32>,
    mapped: &impl Fn(usize) -> bool,
) -> Result<bool, i32> {
    if len == 0 {
        return Ok(false);
    }
    match op(start, len) {
        Ok(()) => Ok(true),
        Err(libc::ENOENT) if len > page => {
            let half = (len / page / 2).max(1) * page;
            let a = walk(start, half, page, op, mapped)?;
            let b = walk(start + half, len - half, page, op, mapped)?;
            Ok(a || b)
        }
        Err(libc::ENOENT) if !mapped(start) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: usize = 0x1000;

    /// A 6.1 kernel: VMAs as `(start, end, registered)`; the ioctl succeeds only for a
    /// range inside one registered VMA. Records the calls that succeeded.
    struct OldKernel {
        vmas: Vec<(usize, usize, bool)>,
        done: Vec<(usize, usize)>,
        calls: usize,
    }

    impl OldKernel {
        fn op(&mut self, start: usize, len: usize) -> Result<(), i32> {
            self.calls += 1;
            let end = start + len;
            match self.vmas.iter().find(|v| v.0 <= start && end <= v.1) {
                Some(v) if v.2 => {
                    self.done.push((start, end));
                    Ok(())
                }
                _ => Err(libc::ENOENT),
            }
        }
        fn mapped(&self, a: usize) -> bool {
            self.vmas.iter().any(|v| v.0 <= a && a < v.1)
        }
        fn run(&mut self, start: usize, len: usize) -> Result<(), i32> {
            let vmas = self.vmas.clone();
            let mapped = |a: usize| vmas.iter().any(|v| v.0 <= a && a < v.1);
            split_on_enoent(start, len, P, &mut |s, l| self.op(s, l), &mapped)
        }
        /// Every page of `[start, end)` covered by exactly one successful call.
        fn covered_once(&self, start: usize, end: usize) -> bool {
            (start..end).step_by(P).all(|a| {
                !self.mapped(a) || self.done.iter().filter(|d| d.0 <= a && a < d.1).count() == 1
            })
        }
    }

    fn kernel(vmas: &[(usize, usize, bool)]) -> OldKernel {
        OldKernel {
            vmas: vmas.to_vec(),
            done: Vec::new(),
            calls: 0,
        }
    }

    #[test]
    fn one_vma_is_one_call() {
        let mut k = kernel(&[(0x10000, 0x20000, true)]);
        assert_eq!(k.run(0x10000, 0x10000), Ok(()));
        assert_eq!(k.calls, 1);
        assert_eq!(k.done, vec![(0x10000, 0x20000)]);
    }

    #[test]
    fn neighbouring_vmas_are_each_covered() {
        // Three VMAs, boundaries off the halving points.
        let mut k = kernel(&[
            (0x10000, 0x13000, true),
            (0x13000, 0x1d000, true),
            (0x1d000, 0x30000, true),
        ]);
        assert_eq!(k.run(0x10000, 0x20000), Ok(()));
        assert!(k.covered_once(0x10000, 0x30000));
        assert!(k.calls < 40, "{} calls", k.calls);
    }

    #[test]
    fn holes_are_skipped() {
        let mut k = kernel(&[(0x10000, 0x12000, true), (0x15000, 0x18000, true)]);
        assert_eq!(k.run(0x10000, 0x8000), Ok(()));
        assert!(k.covered_once(0x10000, 0x18000));
    }

    #[test]
    fn an_unregistered_vma_is_enoent() {
        let mut k = kernel(&[(0x10000, 0x12000, true), (0x12000, 0x14000, false)]);
        assert_eq!(k.run(0x10000, 0x4000), Err(libc::ENOENT));
    }

    #[test]
    fn nothing_mapped_is_enoent() {
        let mut k = kernel(&[]);
        assert_eq!(k.run(0x10000, 0x4000), Err(libc::ENOENT));
    }

    #[test]
    fn other_errors_stop_the_walk() {
        let mut calls = 0;
        let r = split_on_enoent(
            0x10000,
            0x4000,
            P,
            &mut |_, _| {
                calls += 1;
                Err(libc::EINVAL)
            },
            &|_| true,
        );
        assert_eq!((r, calls), (Err(libc::EINVAL), 1));
    }
}
