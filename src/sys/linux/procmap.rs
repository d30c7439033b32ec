//! The region walk through the `PROCMAP_QUERY` ioctl on `/proc/self/maps` (Linux 6.11 and
//! later): one binary record per mapping instead of a formatted line. Formatting the text
//! listing (file paths above all) was half of a checkpoint's fixed cost; file mappings
//! need no name here (an inode says "file"), and anonymous ones get theirs cheaply.

use super::maps::{classify, Vma};
use super::raw;

/// `struct procmap_query` from `<linux/fs.h>`.
#[repr(C)]
#[derive(Default)]
struct ProcmapQuery {
    size: u64,
    query_flags: u64,
    query_addr: u64,
    vma_start: u64,
    vma_end: u64,
    vma_flags: u64,
    vma_page_size: u64,
    vma_offset: u64,
    inode: u64,
    dev_major: u32,
    dev_minor: u32,
    vma_name_size: u32,
    build_id_size: u32,
    vma_name_addr: u64,
    build_id_addr: u64,
}

/// `_IOWR(PROCFS_IOCTL_MAGIC, 17, struct procmap_query)`.
const PROCMAP_QUERY: u64 = raw::ioc(
    raw::IOC_READ | raw::IOC_WRITE,
    0x66,
    17,
    core::mem::size_of::<ProcmapQuery>(),
);
const VMA_READABLE: u64 = 0x01;
const VMA_WRITABLE: u64 = 0x02;
const VMA_EXECUTABLE: u64 = 0x04;
const VMA_SHARED: u64 = 0x08;
const COVERING_OR_NEXT_VMA: u64 = 0x10;

const _: () = assert!(core::mem::size_of::<ProcmapQuery>() == 0x68);
const _: () = assert!(PROCMAP_QUERY == 0xC068_6611);

fn query(fd: i32, q: &mut ProcmapQuery) -> Result<(), i32> {
    q.size = core::mem::size_of::<ProcmapQuery>() as u64;
    // SAFETY: the kernel reads and writes one live `procmap_query` of the declared size,
    // and writes at most `vma_name_size` bytes at `vma_name_addr` when that is set.
    unsafe { raw::ioctl(fd, PROCMAP_QUERY, q as *mut ProcmapQuery as usize) }.map(|_| ())
}

/// Calls `f(fd, query)` for each mapping in `[start, end)` (mappings overlapping it,
/// ascending) that has every permission in `only` (`VMA_*` bits), on an open
/// `/proc/self/maps` it closes afterwards. `Err(errno)` when a query fails (ENOTTY or
/// EINVAL: the kernel lacks the ioctl).
fn each(start: u64, end: u64, only: u64, mut f: impl FnMut(i32, &ProcmapQuery)) -> Result<(), i32> {
    let fd = raw::check(raw::open(b"/proc/self/maps\0", 0))? as i32;
    let mut addr = start;
    let result = loop {
        if addr >= end {
            break Ok(());
        }
        let mut q = ProcmapQuery {
            query_flags: COVERING_OR_NEXT_VMA | only,
            query_addr: addr,
            ..Default::default()
        };
        match query(fd, &mut q) {
            Ok(()) => {}
            // No mapping at or above `addr`: done.
            Err(libc::ENOENT) => break Ok(()),
            Err(e) => break Err(e),
        }
        if q.vma_start >= end || q.vma_end <= addr {
            break Ok(());
        }
        f(fd, &q);
        addr = q.vma_end;
    };
    raw::close(fd);
    result
}

/// Calls `f` for every mapping in ascending order. `Err(errno)` before any call to `f`
/// when the kernel lacks the ioctl (ENOTTY, EINVAL), so the caller can fall back to the
/// text listing.
pub fn walk(mut f: impl FnMut(Vma)) -> Result<(), i32> {
    let mut name = [0u8; 256];
    each(0, u64::MAX, 0, |fd, q| {
        let has_inode = q.inode != 0;
        let mut label: Option<&[u8]> = None;
        if !has_inode {
            // Anonymous: its name ([heap], [stack], [vdso], ...) decides its kind.
            let mut n = ProcmapQuery {
                query_addr: q.vma_start,
                vma_name_size: name.len() as u32,
                vma_name_addr: name.as_mut_ptr() as u64,
                ..Default::default()
            };
            if query(fd, &mut n).is_ok() && n.vma_name_size > 0 {
                // The size counts the terminating NUL.
                label = Some(&name[..n.vma_name_size as usize - 1]);
            }
        }
        f(Vma {
            start: q.vma_start as usize,
            end: q.vma_end as usize,
            read: q.vma_flags & VMA_READABLE != 0,
            write: q.vma_flags & VMA_WRITABLE != 0,
            exec: q.vma_flags & VMA_EXECUTABLE != 0,
            private: q.vma_flags & VMA_SHARED == 0,
            backing: classify(label, has_inode),
        });
    })
}

/// Calls `f(start, end)` for every writable mapping overlapping `[start, end)`, clipped
/// to it, in ascending order: the kernel filters, so read-only mappings cost nothing.
/// `Err(errno)` when the ioctl is missing.
pub fn writable(start: usize, end: usize, mut f: impl FnMut(usize, usize)) -> Result<(), i32> {
    each(start as u64, end as u64, VMA_WRITABLE, |_, q| {
        f(
            (q.vma_start as usize).max(start),
            (q.vma_end as usize).min(end),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::super::maps::{Backing, MapsIter};

    /// The writable-mappings query sees a writable page between two read-only ones, and
    /// only it.
    #[test]
    fn finds_writable_mappings() {
        // SAFETY: sysconf has no preconditions.
        let k = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        // SAFETY: a fresh anonymous mapping of 3 pages, then one page of it made writable.
        let base = unsafe {
            let p = libc::mmap(
                core::ptr::null_mut(),
                3 * k,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            assert_ne!(p, libc::MAP_FAILED);
            assert_eq!(
                libc::mprotect(
                    (p as usize + k) as *mut _,
                    k,
                    libc::PROT_READ | libc::PROT_WRITE
                ),
                0
            );
            p as usize
        };
        let mut found = Vec::new();
        if super::writable(base, base + 3 * k, |a, b| found.push((a, b))).is_err() {
            return; // an older kernel
        }
        assert_eq!(found, vec![(base + k, base + 2 * k)]);
        // SAFETY: our mapping.
        unsafe { libc::munmap(base as *mut _, 3 * k) };
    }

    /// Both walks describe the same mappings (on kernels with the ioctl).
    #[test]
    fn agrees_with_the_text_listing() {
        let mut from_ioctl = Vec::new();
        if super::walk(|v| from_ioctl.push(v)).is_err() {
            return; // an older kernel: nothing to compare
        }
        let text = std::fs::read("/proc/self/maps").unwrap();
        let from_text: Vec<_> = MapsIter::new(&text).collect();
        // The listing was read after the walk, and other tests' threads and allocations
        // change anonymous mappings and the heap meanwhile: compare the stable ones.
        let stable =
            |v: &super::Vma| matches!(v.backing, Backing::File | Backing::Stack | Backing::Kernel);
        let a: Vec<_> = from_ioctl.iter().filter(|v| stable(v)).collect();
        let b: Vec<_> = from_text
            .iter()
            .filter(|v| stable(v) && v.start < 0xffff_ffff_ff60_0000)
            .collect();
        assert_eq!(a, b);
        assert!(a.iter().any(|v| v.backing == Backing::File));
        assert!(a.iter().any(|v| v.backing == Backing::Stack));
    }
}
