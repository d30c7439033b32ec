//! Tests of PAGEMAP_SCAN: the uapi numbers, and the scans over memory armed with
//! async-mode userfaultfd (in a forked child; skipped, or failed under CI=true, where the
//! kernel lacks the async mode).

use core::mem::size_of;

use super::*;
use crate::sys::linux::testkit::{available, in_child, map, page, peek, poke, runs_written, skip};
use crate::sys::linux::uffd::{uffd_open, uffd_protect, uffd_register, uffd_unregister};
use crate::sys::UffdMode;

#[test]
fn uapi_numbers() {
    // _IOWR('f', 16, 96-byte struct), as linux/fs.h of 6.7+ gives it.
    assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    assert_eq!(size_of::<PmScanArg>(), 96);
    assert_eq!(size_of::<PageRegion>(), 24);
}

#[test]
fn async_writes_are_reported_by_scan() {
    if !available(UffdMode::Async) {
        return;
    }
    in_child(|| {
        let k = page();
        let n = 64;
        let base = map(n);
        // Half populated; the other half exercises WP_UNPOPULATED.
        for i in 0..n / 2 {
            poke(base + i * k, 1);
        }
        let fd = uffd_open(UffdMode::Async).unwrap();
        uffd_register(fd, base, n * k).unwrap();
        // SAFETY: the test's own mapping, in a forked child.
        unsafe { uffd_protect(fd, base, n * k, true) }.unwrap();
        let pm = pagemap_open().unwrap();
        let end = base + n * k;
        assert_eq!(runs_written(pm, base, end, false), vec![]);
        for i in [3, 4, 5, 10, 40] {
            poke(base + i * k + 1, 2);
        }
        // No event: the writes resolved themselves.
        let mut buf = [0u8; 32];
        assert_eq!(raw::check(raw::read(fd.raw(), &mut buf)), Err(libc::EAGAIN));
        let want = vec![
            (base + 3 * k, base + 6 * k),
            (base + 10 * k, base + 11 * k),
            (base + 40 * k, base + 41 * k),
        ];
        assert_eq!(runs_written(pm, base, end, false), want);
        assert_eq!(runs_written(pm, base, end, false), want, "no rearm: same");
        assert_eq!(runs_written(pm, base, end, true), want);
        assert_eq!(runs_written(pm, base, end, false), vec![], "rearmed");
        poke(base + 4 * k, 3);
        assert_eq!(
            runs_written(pm, base, end, true),
            vec![(base + 4 * k, base + 5 * k)]
        );
        assert_eq!(peek(base + 4 * k), 3);
        assert_eq!(peek(base + 40 * k + 1), 2);
    });
}

/// More runs than one PAGEMAP_SCAN batch holds: the walk_end loop finds them all.
#[test]
fn scan_loops_over_batches() {
    if !available(UffdMode::Async) {
        return;
    }
    in_child(|| {
        let k = page();
        let n = 4 * SCAN_BATCH + 10;
        let base = map(n);
        let fd = uffd_open(UffdMode::Async).unwrap();
        uffd_register(fd, base, n * k).unwrap();
        // SAFETY: the test's own mapping, in a forked child.
        unsafe { uffd_protect(fd, base, n * k, true) }.unwrap();
        let pm = pagemap_open().unwrap();
        for i in (0..n).step_by(2) {
            poke(base + i * k, 1);
        }
        let runs = runs_written(pm, base, base + n * k, true);
        let want: Vec<_> = (0..n)
            .step_by(2)
            .map(|i| (base + i * k, base + (i + 1) * k))
            .collect();
        assert_eq!(runs, want);
        assert_eq!(runs_written(pm, base, base + n * k, false), vec![]);
    });
}
/// A registered range with an unregistered middle (as after the program remapped it)
/// fails with EPERM; an unmapped middle is skipped.
#[test]
fn scan_refuses_unregistered_parts() {
    if !available(UffdMode::Async) {
        return;
    }
    in_child(|| {
        let k = page();
        let base = map(3);
        let fd = uffd_open(UffdMode::Async).unwrap();
        uffd_register(fd, base, 3 * k).unwrap();
        // SAFETY: the test's own mapping, in a forked child.
        unsafe { uffd_protect(fd, base, 3 * k, true) }.unwrap();
        uffd_unregister(fd, base + k, k).unwrap();
        let pm = pagemap_open().unwrap();
        assert_eq!(
            scan_written(pm, base, base + 3 * k, false, |_, _| {}),
            Err(libc::EPERM)
        );
        // Either side alone is fine.
        assert_eq!(runs_written(pm, base, base + k, false), vec![]);
        // SAFETY: the unregistered middle page of our mapping.
        unsafe { libc::munmap((base + k) as *mut _, k) };
        poke(base + 2 * k, 1);
        assert_eq!(
            runs_written(pm, base, base + 3 * k, false),
            vec![(base + 2 * k, base + 3 * k)]
        );
        assert_eq!(
            // SAFETY: as above: the middle page is unregistered and unmapped.
            unsafe { uffd_protect(fd, base + k, k, true) },
            Err(libc::ENOENT)
        );
    });
}

#[test]
fn scan_populated_skips_untouched_and_zero_pages() {
    let k = page();
    let base = map(8);
    let Ok(pm) = pagemap_open() else {
        skip("no /proc/self/pagemap");
        return;
    };
    poke(base + k, 1);
    poke(base + 2 * k, 1);
    poke(base + 5 * k, 1);
    assert_eq!(peek(base + 6 * k), 0); // maps the shared zero page
    let mut v = Vec::new();
    match scan_populated(pm, base, base + 8 * k, |s, e| v.push((s, e))) {
        Err(libc::ENOTTY) | Err(libc::EINVAL) => {
            skip("no PAGEMAP_SCAN");
            return;
        }
        r => r.unwrap(),
    }
    assert_eq!(
        v,
        vec![(base + k, base + 3 * k), (base + 5 * k, base + 6 * k)]
    );
    pagemap_close(pm);
    // SAFETY: our mapping.
    unsafe { libc::munmap(base as *mut _, 8 * k) };
}
