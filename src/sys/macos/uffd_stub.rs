//! Stand-ins for the userfaultfd/PAGEMAP_SCAN interface of the Linux backend
//! (`linux/uffd/`, `linux/pagemap.rs`), with the same types and signatures, so the engine
//! compiles one way on every platform: nothing is supported, every call fails with ENOSYS.
//! They go once the engine's userfaultfd code is Linux-only.

use crate::sys::{PagemapFd, UffdCounters, UffdFd, UffdMode, UffdSupport};

const UNSUPPORTED: &str = "userfaultfd is Linux-only";

pub fn uffd_support() -> UffdSupport {
    UffdSupport {
        sync: Err(UNSUPPORTED),
        async_wp: Err(UNSUPPORTED),
        user_mode_only: false,
        features: 0,
    }
}

pub fn uffd_open(_mode: UffdMode) -> Result<UffdFd, i32> {
    Err(libc::ENOSYS)
}

pub fn uffd_close(_fd: UffdFd) {}

pub fn uffd_register(_fd: UffdFd, _start: usize, _len: usize) -> Result<(), i32> {
    Err(libc::ENOSYS)
}

pub fn uffd_unregister(_fd: UffdFd, _start: usize, _len: usize) -> Result<(), i32> {
    Err(libc::ENOSYS)
}

/// # Safety
/// None needed: nothing happens.
pub unsafe fn uffd_protect(_fd: UffdFd, _start: usize, _len: usize, _wp: bool) -> Result<(), i32> {
    Err(libc::ENOSYS)
}

/// # Safety
/// None needed: nothing happens.
pub unsafe fn uffd_disarm_quietly(_fd: UffdFd, _start: usize, _len: usize) -> Result<(), i32> {
    Err(libc::ENOSYS)
}

pub fn pagemap_open() -> Result<PagemapFd, i32> {
    Err(libc::ENOSYS)
}

pub fn pagemap_close(_pagemap: PagemapFd) {}

pub fn scan_written(
    _pagemap: PagemapFd,
    _start: usize,
    _end: usize,
    _rearm: bool,
    _f: impl FnMut(usize, usize),
) -> Result<(), i32> {
    Err(libc::ENOSYS)
}

pub fn scan_populated(
    _pagemap: PagemapFd,
    _start: usize,
    _end: usize,
    _f: impl FnMut(usize, usize),
) -> Result<(), i32> {
    Err(libc::ENOSYS)
}

pub fn uffd_serve(
    _fd: UffdFd,
    _spin_ns: u64,
    _counters: &UffdCounters,
    _on_fault: &dyn Fn(usize, u64) -> Option<bool>,
) -> ! {
    crate::fatal!("memsnap fault server", "userfaultfd is Linux-only")
}
