//! The userfaultfd calls: opening a userfaultfd (with the fallbacks for unprivileged
//! processes), UFFDIO_API, and registering, arming, disarming and waking ranges. Stateless:
//! the engine keeps the fd.

use core::sync::atomic::Ordering;

use super::probe::{FEATURES, PROBED};
use super::uapi::*;
use crate::sys::linux::raw::{self, ioctl};
use crate::sys::{UffdFd, UffdMode};

/// The features UFFDIO_API offers (a throwaway userfaultfd), and whether only a
/// user-mode-only one could be created. `Err((errno, api_failed))`.
pub(super) fn offered_features() -> Result<(u64, bool), (i32, bool)> {
    let (fd, user_only) = new_fd().map_err(|e| (e, false))?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: 0,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the uffdio_api on this frame.
    let r = unsafe { ioctl(fd, UFFDIO_API, &mut api as *mut UffdioApi as usize) };
    raw::close(fd);
    r.map(|_| (api.features, user_only)).map_err(|e| (e, true))
}

/// A userfaultfd not yet through UFFDIO_API (O_CLOEXEC|O_NONBLOCK), and whether it is
/// user-mode-only. Order: userfaultfd(2); /dev/userfaultfd (access to the device node
/// grants kernel-mode faults without CAP_SYS_PTRACE); userfaultfd(2) with
/// UFFD_USER_MODE_ONLY last, since kernel writes then fail in sync mode.
fn new_fd() -> Result<(i32, bool), i32> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    let sys = |flags: i32| {
        // SAFETY: userfaultfd(2) takes only flags.
        let r = unsafe {
            raw::syscall6(
                libc::SYS_userfaultfd as usize,
                [flags as usize, 0, 0, 0, 0, 0],
            )
        };
        raw::check(r).map(|fd| fd as i32)
    };
    let first = match sys(flags) {
        Ok(fd) => return Ok((fd, false)),
        Err(e) => e,
    };
    if let Ok(dev) = raw::check(raw::open(b"/dev/userfaultfd\0", libc::O_RDWR)) {
        let dev = dev as i32;
        // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value.
        let r = unsafe { ioctl(dev, USERFAULTFD_IOC_NEW, flags as usize) };
        raw::close(dev);
        if let Ok(fd) = r {
            return Ok((fd as i32, false));
        }
    }
    match sys(flags | UFFD_USER_MODE_ONLY) {
        Ok(fd) => Ok((fd, true)),
        Err(_) => Err(first),
    }
}

/// Opens a userfaultfd for `mode` (O_CLOEXEC|O_NONBLOCK): userfaultfd(2) first, then
/// /dev/userfaultfd, then UFFD_USER_MODE_ONLY; UFFDIO_API with: Sync -> THREAD_ID
/// (+WP_UNPOPULATED, +WP_HUGETLBFS_SHMEM when available); Async -> WP_ASYNC|WP_UNPOPULATED
/// (+WP_HUGETLBFS_SHMEM). Returns the fd. Also usable in a forked child (the inherited fd
/// belongs to the parent's mm: close it with [`uffd_close`] and open a new one).
pub fn uffd_open(mode: UffdMode) -> Result<UffdFd, i32> {
    // The offered features come from the probe's cache when there is one; otherwise from a
    // throwaway fd (UFFDIO_API succeeds once per fd, and fails for unoffered features).
    let offered = if PROBED.load(Ordering::Acquire) && FEATURES.load(Ordering::Relaxed) != 0 {
        FEATURES.load(Ordering::Relaxed)
    } else {
        offered_features().map_err(|(e, _)| e)?.0
    };
    let optional = offered
        & (UFFD_FEATURE_WP_HUGETLBFS_SHMEM
            | UFFD_FEATURE_WP_UNPOPULATED
            | UFFD_FEATURE_PAGEFAULT_FLAG_WP);
    let features = match mode {
        UffdMode::Sync => UFFD_FEATURE_THREAD_ID | optional,
        UffdMode::Async => UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | optional,
    };
    if features & !offered != 0 {
        return Err(libc::EOPNOTSUPP);
    }
    let (fd, _) = new_fd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes the uffdio_api on this frame.
    match unsafe { ioctl(fd, UFFDIO_API, &mut api as *mut UffdioApi as usize) } {
        Ok(_) => Ok(UffdFd::from_raw(fd)),
        Err(e) => {
            raw::close(fd);
            Err(e)
        }
    }
}

pub fn uffd_close(fd: UffdFd) {
    raw::close(fd.raw());
}

/// UFFDIO_REGISTER_MODE_WP over [start, start+len). Err(EINVAL) for mapping types the mode
/// cannot register (private file mappings in Sync mode).
pub fn uffd_register(fd: UffdFd, start: usize, len: usize) -> Result<(), i32> {
    let mut reg = UffdioRegister {
        range: UffdioRange {
            start: start as u64,
            len: len as u64,
        },
        mode: UFFDIO_REGISTER_MODE_WP,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_REGISTER reads and writes the uffdio_register on this frame; it
    // changes no page contents or protections.
    unsafe {
        ioctl(
            fd.raw(),
            UFFDIO_REGISTER,
            &mut reg as *mut UffdioRegister as usize,
        )
    }
    .map(|_| ())
}

/// An ioctl whose argument is one `uffdio_range` (UNREGISTER, WAKE).
fn range_ioctl(fd: UffdFd, request: u64, start: usize, len: usize) -> Result<(), i32> {
    let mut range = UffdioRange {
        start: start as u64,
        len: len as u64,
    };
    // SAFETY: these ioctls read the uffdio_range on this frame; they change no page
    // contents.
    unsafe { ioctl(fd.raw(), request, &mut range as *mut UffdioRange as usize) }.map(|_| ())
}

/// UFFDIO_UNREGISTER; threads blocked on the range are woken (and retry unprotected).
pub fn uffd_unregister(fd: UffdFd, start: usize, len: usize) -> Result<(), i32> {
    range_ioctl(fd, UFFDIO_UNREGISTER, start, len)
}

/// UFFDIO_WAKE: wakes threads blocked on faults in the range without changing protection.
pub fn uffd_wake(fd: UffdFd, start: usize, len: usize) -> Result<(), i32> {
    range_ioctl(fd, UFFDIO_WAKE, start, len)
}

/// UFFDIO_WRITEPROTECT with `mode`.
///
/// # Safety
/// As for [`uffd_protect`].
unsafe fn write_protect(fd: UffdFd, start: usize, len: usize, mode: u64) -> Result<(), i32> {
    // Kernels before 6.5 refuse a range spanning several VMAs (ENOENT): split it.
    let page = crate::sys::linux::os_page_size();
    crate::sys::linux::wp_split::split_on_enoent(
        start,
        len,
        page,
        // SAFETY: per this function's contract, for each part of the range.
        &mut |s, l| unsafe { write_protect_once(fd, s, l, mode) },
        &|a| raw::page_mapped(a, page),
    )
}

/// One UFFDIO_WRITEPROTECT call.
///
/// # Safety
/// As for [`uffd_protect`].
unsafe fn write_protect_once(fd: UffdFd, start: usize, len: usize, mode: u64) -> Result<(), i32> {
    let mut w = UffdioWriteprotect {
        range: UffdioRange {
            start: start as u64,
            len: len as u64,
        },
        mode,
    };
    // SAFETY: UFFDIO_WRITEPROTECT reads the struct on this frame; the caller owns the
    // protection of the range.
    unsafe {
        ioctl(
            fd.raw(),
            UFFDIO_WRITEPROTECT,
            &mut w as *mut UffdioWriteprotect as usize,
        )
    }
    .map(|_| ())
}

/// UFFDIO_WRITEPROTECT: `wp` true arms, false disarms and wakes threads blocked on the
/// range. Err(ENOENT) when part of the range is not registered (the engine uses that to
/// notice memory the program unmapped and mapped afresh); unmapped holes are skipped.
///
/// # Safety
/// The range is tracked host memory whose protection the engine owns.
pub unsafe fn uffd_protect(fd: UffdFd, start: usize, len: usize, wp: bool) -> Result<(), i32> {
    let mode = if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 };
    // SAFETY: per this function's contract.
    unsafe { write_protect(fd, start, len, mode) }
}

/// Disarms `[start, start + len)` without waking threads blocked on it
/// (`UFFDIO_WRITEPROTECT_MODE_DONTWAKE`): a restore opens pages to copy into them while a
/// writer's fault on one may be queued, and that writer must stay blocked until the page
/// is armed again and its fault is served properly.
///
/// # Safety
/// As for [`uffd_protect`].
pub unsafe fn uffd_disarm_quietly(fd: UffdFd, start: usize, len: usize) -> Result<(), i32> {
    // SAFETY: per this function's contract.
    unsafe { write_protect(fd, start, len, UFFDIO_WRITEPROTECT_MODE_DONTWAKE) }
}
