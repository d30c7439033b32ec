//! PAGEMAP_SCAN on /proc/self/pagemap (Linux 6.7): which pages of a range were written
//! since they were last armed (re-arming them in the same call), and which have memory
//! behind them. Not userfaultfd, but the async mode's way to read its write tracking back.
//! Owns the linux/fs.h uapi numbers it needs (checked against the 6.7+ header; the
//! `uapi_numbers` test pins them) and the batched scan loop. Stateless: the engine keeps
//! the fd.

use core::mem::size_of;

use super::raw::{self, ioc, ioctl, IOC_READ, IOC_WRITE};
use crate::sys::PagemapFd;

#[cfg(test)]
mod tests;

const PAGEMAP_SCAN: u64 = ioc(
    IOC_READ | IOC_WRITE,
    b'f' as u64,
    16,
    size_of::<PmScanArg>(),
);
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
#[allow(dead_code)]
const PAGE_IS_WPALLOWED: u64 = 1 << 0;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
#[allow(dead_code)]
const PAGE_IS_FILE: u64 = 1 << 2;
const PAGE_IS_PRESENT: u64 = 1 << 3;
const PAGE_IS_SWAPPED: u64 = 1 << 4;
const PAGE_IS_PFNZERO: u64 = 1 << 5;

#[repr(C)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Runs one scan call returns at most; 6 KiB of stack.
pub(super) const SCAN_BATCH: usize = 256;

/// Opens /proc/self/pagemap (O_RDONLY|O_CLOEXEC) for the scans; the engine keeps the fd.
pub fn pagemap_open() -> Result<PagemapFd, i32> {
    raw::check(raw::open(b"/proc/self/pagemap\0", 0)).map(|fd| PagemapFd::from_raw(fd as i32))
}

pub fn pagemap_close(pagemap: PagemapFd) {
    raw::close(pagemap.raw());
}

/// PAGEMAP_SCAN over [start, end) (`start` page-aligned) for pages written since they were
/// last armed (PAGE_IS_WRITTEN), calling f(run_start, run_end) for each written run in
/// address order (runs touching across batches are merged). `rearm`: PM_SCAN_WP_MATCHING,
/// so the written pages are write-protected again atomically. Always passes
/// PM_SCAN_CHECK_WPASYNC: Err(EPERM) when part of the range is mapped but not registered
/// in async mode (remapped by the program); unmapped holes are skipped silently. On Err,
/// `f` has already seen the runs found before the failure (and with `rearm` they are
/// armed again), so the caller must count them as written.
pub fn scan_written(
    pagemap: PagemapFd,
    start: usize,
    end: usize,
    rearm: bool,
    f: impl FnMut(usize, usize),
) -> Result<(), i32> {
    let query = ScanQuery {
        start,
        end,
        flags: PM_SCAN_CHECK_WPASYNC | if rearm { PM_SCAN_WP_MATCHING } else { 0 },
        inverted: 0,
        all_of: PAGE_IS_WRITTEN,
        any_of: 0,
        returned: PAGE_IS_WRITTEN,
    };
    scan(pagemap, &query, f)
}

/// Runs of pages of [start, end) that have memory behind them (PAGE_IS_PRESENT |
/// PAGE_IS_SWAPPED, excluding PAGE_IS_PFNZERO): the ones whose contents are not simply
/// zero (for anonymous memory; a file mapping's unpopulated pages read the file).
pub fn scan_populated(
    pagemap: PagemapFd,
    start: usize,
    end: usize,
    f: impl FnMut(usize, usize),
) -> Result<(), i32> {
    let query = ScanQuery {
        start,
        end,
        flags: 0,
        // Not the zero page: inverted, it must be clear.
        inverted: PAGE_IS_PFNZERO,
        all_of: PAGE_IS_PFNZERO,
        any_of: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        returned: PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
    };
    scan(pagemap, &query, f)
}

/// What one PAGEMAP_SCAN walk asks of the kernel, in `pm_scan_arg`'s terms: a page of
/// `[start, end)` matches when, after flipping its `inverted` categories, it has every
/// category of `all_of` and (when `any_of` is not 0) at least one of `any_of`.
struct ScanQuery {
    start: usize,
    end: usize,
    /// `PM_SCAN_*` flags.
    flags: u64,
    /// `category_inverted`.
    inverted: u64,
    /// `category_mask`.
    all_of: u64,
    /// `category_anyof_mask`.
    any_of: u64,
    /// `return_mask`: the categories reported for each matching run.
    returned: u64,
}

/// Runs `query` in batches of [`SCAN_BATCH`] regions, calling `f(run_start, run_end)` for
/// each matching run in address order (runs touching across batches are merged).
fn scan(pagemap: PagemapFd, query: &ScanQuery, mut f: impl FnMut(usize, usize)) -> Result<(), i32> {
    let ScanQuery { start, end, .. } = *query;
    let mut vec = [PageRegion {
        start: 0,
        end: 0,
        categories: 0,
    }; SCAN_BATCH];
    let mut run: Option<(usize, usize)> = None;
    let mut pos = start;
    let mut result = Ok(());
    while pos < end {
        let mut arg = PmScanArg {
            size: size_of::<PmScanArg>() as u64,
            flags: query.flags,
            start: pos as u64,
            end: end as u64,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: SCAN_BATCH as u64,
            max_pages: 0,
            category_inverted: query.inverted,
            category_mask: query.all_of,
            category_anyof_mask: query.any_of,
            return_mask: query.returned,
        };
        // SAFETY: PAGEMAP_SCAN reads and writes `arg` and writes at most `vec_len` regions
        // into `vec`, both on this frame; it changes page protection only with
        // PM_SCAN_WP_MATCHING, which async write tracking is for.
        let n = match unsafe {
            ioctl(
                pagemap.raw(),
                PAGEMAP_SCAN,
                &mut arg as *mut PmScanArg as usize,
            )
        } {
            Ok(n) => n.min(SCAN_BATCH),
            Err(e) => {
                result = Err(e);
                break;
            }
        };
        for r in &vec[..n] {
            let (s, e) = (r.start as usize, r.end as usize);
            run = match run {
                Some((rs, re)) if re == s => Some((rs, e)),
                Some((rs, re)) => {
                    f(rs, re);
                    Some((s, e))
                }
                None => Some((s, e)),
            };
        }
        let next = arg.walk_end as usize;
        if next <= pos {
            // No progress: never seen, but an endless loop would hang the caller.
            result = Err(libc::EIO);
            break;
        }
        pos = next;
    }
    if let Some((rs, re)) = run {
        f(rs, re);
    }
    result
}
