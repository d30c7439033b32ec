//! userfaultfd write protection and PAGEMAP_SCAN: the kernel-assisted write tracking of the
//! Linux backend. This file owns the uapi numbers (Debian 12's headers predate most of
//! them; each was checked against linux/userfaultfd.h and linux/fs.h of 6.7+), the probe
//! of what the kernel and our privileges allow, the ioctls, the two scans and the
//! sync-mode fault server loop.
//!
//! Why it exists next to `mprotect` + SIGSEGV:
//! - Kernel writes. A `read(2)` into a page armed with `mprotect` fails with EFAULT (the
//!   kernel does not raise SIGSEGV for its own accesses). A page armed with userfaultfd
//!   write protection makes the kernel block in the copy until the fault server disarms
//!   the page (sync mode), or resolve the fault by itself (async mode), so such writes
//!   succeed. The exception: when only `UFFD_USER_MODE_ONLY` was allowed, kernel faults
//!   are not delivered and the write fails with EFAULT, as with `mprotect`.
//! - Async mode (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7) has no fault messages at all: a write
//!   clears the page's protection in the fault path (about 0.9 us per page here), and
//!   PAGEMAP_SCAN reports the written pages and re-arms them in one call.
//! - No VMA splitting: protection lives in the page tables, not in `vm_area_struct`s, so
//!   arming scattered pages does not approach `vm.max_map_count`.
//!
//! What registers: anonymous private memory, shmem and hugetlbfs (the latter two only with
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`) in both modes; private file mappings only in async
//! mode (sync registration fails with EINVAL there).
//!
//! Cost that shapes the server loop: a fault served by a server thread that sleeps in
//! `poll()` on another CPU costs about 55 us (the cross-CPU wake-up dominates), 18 us when
//! the server spins on non-blocking `read()`, 9 us on the same CPU. Hence
//! [`uffd_serve`] keeps reading without sleeping for a while after each batch.
//!
//! Everything here is stateless after the probe: the library's own .data/.bss is tracked
//! memory in whole-process mode, so the fds and counters live in the engine's memory and
//! are passed in. Only [`uffd_support`] writes statics, on its first call, which the
//! engine makes before the first snapshot. No allocation, no locks; system calls are raw
//! (errno is returned, never written).
//!
//! After `fork`, the child's mappings are no longer registered and its pages no longer
//! armed (we do not ask for `UFFD_FEATURE_EVENT_FORK`), and the inherited userfaultfd
//! belongs to the parent's address space: the child closes it and starts over.

use core::mem::size_of;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use super::raw::{self, ioc, ioctl, IOC_NONE, IOC_READ, IOC_WRITE};
use crate::sys::{UffdCounters, UffdMode, UffdSupport};

// ---- uapi: linux/userfaultfd.h ----

const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;
const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    size_of::<UffdioRegister>(),
);
// The kernel declares these two _IOR although it reads the argument (see the uapi header).
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>());
const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    size_of::<UffdioWriteprotect>(),
);
/// On an fd of /dev/userfaultfd: a new userfaultfd, the argument being userfaultfd(2)'s flags.
const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, 0xAA, 0x00, 0);

pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
pub const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// userfaultfd(2) flag: only faults raised in user mode are delivered.
const UFFD_USER_MODE_ONLY: i32 = 1;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

#[repr(C)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffd_msg` (packed in the header, but every field is naturally aligned), read
/// as a page fault: the other events are never requested.
#[repr(C)]
#[derive(Clone, Copy)]
struct UffdMsg {
    event: u8,
    _reserved1: u8,
    _reserved2: u16,
    _reserved3: u32,
    flags: u64,
    address: u64,
    ptid: u32,
    _pad: u32,
}

// ---- uapi: linux/fs.h ----

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
const SCAN_BATCH: usize = 256;
/// Messages one `read` of the fault server takes at most; 1 KiB of stack.
const MSG_BATCH: usize = 32;

// ---- API ----

/// Reasons, indexed by the codes the probe caches (0 = supported).
const REASONS: [&str; 13] = [
    "",
    "userfaultfd: EPERM (vm.unprivileged_userfaultfd=0 and no CAP_SYS_PTRACE; /dev/userfaultfd not accessible)",
    "userfaultfd: ENOSYS (kernel built without CONFIG_USERFAULTFD, or a seccomp filter)",
    "userfaultfd: cannot be created",
    "UFFDIO_API refused",
    "kernel lacks userfaultfd write protection (UFFD_FEATURE_PAGEFAULT_FLAG_WP)",
    "kernel lacks UFFD_FEATURE_WP_ASYNC (needs 6.7)",
    "UFFDIO_REGISTER_MODE_WP refused on anonymous memory",
    "UFFDIO_WRITEPROTECT refused on anonymous memory",
    "/proc/self/pagemap cannot be opened",
    "PAGEMAP_SCAN unsupported",
    "PAGEMAP_SCAN did not report a written page",
    "kernel lacks UFFD_FEATURE_WP_UNPOPULATED (needs 6.4): writes to never-touched pages would not fault",
];
const R_EPERM: u8 = 1;
const R_ENOSYS: u8 = 2;
const R_OPEN: u8 = 3;
const R_API: u8 = 4;
const R_NO_WP: u8 = 5;
const R_NO_ASYNC: u8 = 6;
const R_REGISTER: u8 = 7;
const R_PROTECT: u8 = 8;
const R_PAGEMAP: u8 = 9;
const R_SCAN: u8 = 10;
const R_SCAN_WRONG: u8 = 11;
const R_NO_UNPOPULATED: u8 = 12;

// The probe's cache. Written once, by the first `uffd_support` call, which the engine makes
// before the first snapshot (these statics are in tracked memory afterwards).
static PROBED: AtomicBool = AtomicBool::new(false);
static FEATURES: AtomicU64 = AtomicU64::new(0);
static SYNC_REASON: AtomicU8 = AtomicU8::new(0);
static ASYNC_REASON: AtomicU8 = AtomicU8::new(0);
static USER_MODE_ONLY: AtomicBool = AtomicBool::new(false);

fn reason(code: u8) -> Result<(), &'static str> {
    match code {
        0 => Ok(()),
        c => Err(REASONS[(c as usize).min(REASONS.len() - 1)]),
    }
}

/// What userfaultfd can do here. The first call probes (opens userfaultfds, registers and
/// arms a scratch page, runs PAGEMAP_SCAN) and caches the answer; make it before the first
/// snapshot.
pub fn uffd_support() -> UffdSupport {
    if !PROBED.load(Ordering::Acquire) {
        let (features, user_only, sync, async_wp) = probe();
        FEATURES.store(features, Ordering::Relaxed);
        USER_MODE_ONLY.store(user_only, Ordering::Relaxed);
        SYNC_REASON.store(sync, Ordering::Relaxed);
        ASYNC_REASON.store(async_wp, Ordering::Relaxed);
        PROBED.store(true, Ordering::Release);
    }
    UffdSupport {
        sync: reason(SYNC_REASON.load(Ordering::Relaxed)),
        async_wp: reason(ASYNC_REASON.load(Ordering::Relaxed)),
        user_mode_only: USER_MODE_ONLY.load(Ordering::Relaxed),
        features: FEATURES.load(Ordering::Relaxed),
    }
}

/// `(features, user_mode_only, sync reason, async reason)`.
fn probe() -> (u64, bool, u8, u8) {
    let (features, user_only) = match offered_features() {
        Ok(v) => v,
        Err((e, api_failed)) => {
            let r = if api_failed {
                R_API
            } else {
                match e {
                    libc::EPERM | libc::EACCES => R_EPERM,
                    libc::ENOSYS => R_ENOSYS,
                    _ => R_OPEN,
                }
            };
            return (0, false, r, r);
        }
    };
    if features & UFFD_FEATURE_PAGEFAULT_FLAG_WP == 0 {
        return (features, user_only, R_NO_WP, R_NO_WP);
    }
    // Without WP_UNPOPULATED only present pages carry write protection: a first write to
    // a never-touched anonymous page maps a fresh page without a fault, and a rewind would
    // leave what it wrote (5.10 and 6.1 lost writes so under make test-kernels).
    let sync = if features & UFFD_FEATURE_WP_UNPOPULATED == 0 {
        R_NO_UNPOPULATED
    } else {
        probe_mode(UffdMode::Sync)
    };
    let async_wp = if features & UFFD_FEATURE_WP_ASYNC == 0 {
        R_NO_ASYNC
    } else {
        probe_mode(UffdMode::Async)
    };
    (features, user_only, sync, async_wp)
}

/// Registers and arms a scratch page in `mode`; in async mode also checks that a write to
/// it is reported by PAGEMAP_SCAN, and only it.
fn probe_mode(mode: UffdMode) -> u8 {
    let k = super::os_page_size();
    // SAFETY: a fresh anonymous mapping of two pages at an address of the kernel's choosing.
    let map = unsafe {
        raw::mmap(
            0,
            2 * k,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    let Ok(base) = raw::check(map) else {
        return R_OPEN;
    };
    let code = match uffd_open(mode) {
        Err(_) => R_API,
        Ok(fd) => {
            let code = probe_armed(fd, mode, base, k);
            uffd_close(fd);
            code
        }
    };
    // SAFETY: the scratch mapping made above; nothing else refers to it.
    unsafe { raw::munmap(base, 2 * k) };
    code
}

fn probe_armed(fd: i32, mode: UffdMode, base: usize, k: usize) -> u8 {
    // SAFETY: the scratch mapping is ours and both pages are writable.
    unsafe {
        core::ptr::write_volatile(base as *mut u8, 1);
        core::ptr::write_volatile((base + k) as *mut u8, 1);
    }
    if uffd_register(fd, base, 2 * k).is_err() {
        return R_REGISTER;
    }
    // SAFETY: the scratch mapping belongs to this probe only.
    if unsafe { uffd_protect(fd, base, 2 * k, true) }.is_err() {
        return R_PROTECT;
    }
    if mode == UffdMode::Sync {
        // Nothing may write it now (no server); unprotect so munmap is the only next step.
        // SAFETY: as above.
        let _ = unsafe { uffd_protect(fd, base, 2 * k, false) };
        return 0;
    }
    let Ok(pm) = pagemap_open() else {
        return R_PAGEMAP;
    };
    // SAFETY: async mode: the write disarms the page in the fault path, no server needed.
    unsafe { core::ptr::write_volatile((base + k) as *mut u8, 2) };
    let mut runs = [(0usize, 0usize); 2];
    let mut n = 0;
    let r = scan_written(pm, base, base + 2 * k, true, |s, e| {
        if n < runs.len() {
            runs[n] = (s, e);
        }
        n += 1;
    });
    raw::close(pm);
    match r {
        Err(_) => R_SCAN,
        Ok(()) if n == 1 && runs[0] == (base + k, base + 2 * k) => 0,
        Ok(()) => R_SCAN_WRONG,
    }
}

/// The features UFFDIO_API offers (a throwaway userfaultfd), and whether only a
/// user-mode-only one could be created. `Err((errno, api_failed))`.
fn offered_features() -> Result<(u64, bool), (i32, bool)> {
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

/// `ioctl(fd, req, arg)` as a raw system call.
///
/// Opens a userfaultfd for `mode` (O_CLOEXEC|O_NONBLOCK): userfaultfd(2) first, then
/// /dev/userfaultfd, then UFFD_USER_MODE_ONLY; UFFDIO_API with: Sync -> THREAD_ID
/// (+WP_UNPOPULATED, +WP_HUGETLBFS_SHMEM when available); Async -> WP_ASYNC|WP_UNPOPULATED
/// (+WP_HUGETLBFS_SHMEM). Returns the fd. Also usable in a forked child (the inherited fd
/// belongs to the parent's mm: close it with [`uffd_close`] and open a new one).
pub fn uffd_open(mode: UffdMode) -> Result<i32, i32> {
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
        Ok(_) => Ok(fd),
        Err(e) => {
            raw::close(fd);
            Err(e)
        }
    }
}

pub fn uffd_close(fd: i32) {
    raw::close(fd);
}

/// UFFDIO_REGISTER_MODE_WP over [start, start+len). Err(EINVAL) for mapping types the mode
/// cannot register (private file mappings in Sync mode).
pub fn uffd_register(fd: i32, start: usize, len: usize) -> Result<(), i32> {
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
            fd,
            UFFDIO_REGISTER,
            &mut reg as *mut UffdioRegister as usize,
        )
    }
    .map(|_| ())
}

/// An ioctl whose argument is one `uffdio_range` (UNREGISTER, WAKE).
fn range_ioctl(fd: i32, request: u64, start: usize, len: usize) -> Result<(), i32> {
    let mut range = UffdioRange {
        start: start as u64,
        len: len as u64,
    };
    // SAFETY: these ioctls read the uffdio_range on this frame; they change no page
    // contents.
    unsafe { ioctl(fd, request, &mut range as *mut UffdioRange as usize) }.map(|_| ())
}

/// UFFDIO_UNREGISTER; threads blocked on the range are woken (and retry unprotected).
pub fn uffd_unregister(fd: i32, start: usize, len: usize) -> Result<(), i32> {
    range_ioctl(fd, UFFDIO_UNREGISTER, start, len)
}

/// UFFDIO_WAKE: wakes threads blocked on faults in the range without changing protection.
pub fn uffd_wake(fd: i32, start: usize, len: usize) -> Result<(), i32> {
    range_ioctl(fd, UFFDIO_WAKE, start, len)
}

/// UFFDIO_WRITEPROTECT with `mode`.
///
/// # Safety
/// As for [`uffd_protect`].
unsafe fn write_protect(fd: i32, start: usize, len: usize, mode: u64) -> Result<(), i32> {
    // Kernels before 6.5 refuse a range spanning several VMAs (ENOENT): split it.
    let page = super::os_page_size();
    super::wp_split::split_on_enoent(
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
unsafe fn write_protect_once(fd: i32, start: usize, len: usize, mode: u64) -> Result<(), i32> {
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
            fd,
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
pub unsafe fn uffd_protect(fd: i32, start: usize, len: usize, wp: bool) -> Result<(), i32> {
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
pub unsafe fn uffd_disarm_quietly(fd: i32, start: usize, len: usize) -> Result<(), i32> {
    // SAFETY: per this function's contract.
    unsafe { write_protect(fd, start, len, UFFDIO_WRITEPROTECT_MODE_DONTWAKE) }
}

/// Opens /proc/self/pagemap (O_RDONLY|O_CLOEXEC) for the scans; the engine keeps the fd.
pub fn pagemap_open() -> Result<i32, i32> {
    raw::check(raw::open(b"/proc/self/pagemap\0", 0)).map(|fd| fd as i32)
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
    pagemap: i32,
    start: usize,
    end: usize,
    rearm: bool,
    f: impl FnMut(usize, usize),
) -> Result<(), i32> {
    let flags = PM_SCAN_CHECK_WPASYNC | if rearm { PM_SCAN_WP_MATCHING } else { 0 };
    scan(
        pagemap,
        start,
        end,
        flags,
        0,
        PAGE_IS_WRITTEN,
        0,
        PAGE_IS_WRITTEN,
        f,
    )
}

/// Runs of pages of [start, end) that have memory behind them (PAGE_IS_PRESENT |
/// PAGE_IS_SWAPPED, excluding PAGE_IS_PFNZERO): the ones whose contents are not simply
/// zero (for anonymous memory; a file mapping's unpopulated pages read the file).
pub fn scan_populated(
    pagemap: i32,
    start: usize,
    end: usize,
    f: impl FnMut(usize, usize),
) -> Result<(), i32> {
    scan(
        pagemap,
        start,
        end,
        0,
        PAGE_IS_PFNZERO,
        PAGE_IS_PFNZERO,
        PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
        f,
    )
}

#[allow(clippy::too_many_arguments)]
fn scan(
    pagemap: i32,
    start: usize,
    end: usize,
    flags: u64,
    inverted: u64,
    mask: u64,
    anyof: u64,
    ret_mask: u64,
    mut f: impl FnMut(usize, usize),
) -> Result<(), i32> {
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
            flags,
            start: pos as u64,
            end: end as u64,
            walk_end: 0,
            vec: vec.as_mut_ptr() as u64,
            vec_len: SCAN_BATCH as u64,
            max_pages: 0,
            category_inverted: inverted,
            category_mask: mask,
            category_anyof_mask: anyof,
            return_mask: ret_mask,
        };
        // SAFETY: PAGEMAP_SCAN reads and writes `arg` and writes at most `vec_len` regions
        // into `vec`, both on this frame; it changes page protection only with
        // PM_SCAN_WP_MATCHING, which async write tracking is for.
        let n = match unsafe { ioctl(pagemap, PAGEMAP_SCAN, &mut arg as *mut PmScanArg as usize) } {
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

fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime (vDSO) writes the timespec on this frame; CLOCK_MONOTONIC is
    // always valid, so errno is never written.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until `fd` is readable, or at most `timeout_ns` when given; Err(errno) or Err(0)
/// when it reports an error condition.
fn wait_readable(fd: i32, timeout_ns: Option<u64>) -> Result<(), i32> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = timeout_ns.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(0, |t| t as *const libc::timespec as usize);
    loop {
        // SAFETY: ppoll (poll is missing on aarch64) on one pollfd and an optional
        // timespec, both on this frame, no signal mask change.
        let r = unsafe {
            raw::syscall6(
                libc::SYS_ppoll as usize,
                [&mut pfd as *mut libc::pollfd as usize, 1, ts_ptr, 0, 0, 0],
            )
        };
        match raw::check(r) {
            Err(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 => {
                return Err(0)
            }
            Ok(_) => return Ok(()),
        }
    }
}

/// Faults the server keeps waiting (writes while memory changes are disallowed) before
/// it waits in place for the oldest, as it did before it kept any.
const MAX_PENDING: usize = 256;

/// How often pending faults are asked again while no new fault arrives.
const PENDING_POLL_NS: u64 = 1_000_000;

/// The sync-mode fault server: runs forever on the calling (library-owned) thread.
/// Reads uffd_msg batches (non-blocking read of up to 32 msgs); for each WP pagefault calls
/// `on_fault(addr, ptid)` (`addr` aligned to the kernel page). `Some(true)` means it has
/// disarmed the page with `uffd_protect(.., false)`, which wakes the writer; `Some(false)`
/// (not memsnap's page any more) makes the server disarm that one kernel page itself so
/// the faulting thread never stays blocked; `None` (the write must wait: changes are
/// disallowed) keeps the fault pending, asked again at every batch and at least every
/// millisecond, while the server goes on reading faults: one waiting writer must not hide
/// the next fault (a write by the thread that disallowed changes is refused, not left
/// waiting behind it). After each batch it keeps reading without blocking for `spin_ns`
/// (the cross-CPU wake-up of a sleeping server is the dominant cost) before sleeping in
/// poll(). Never returns; if the fd reports an error it calls
/// crate::fatal!("memsnap fault server", ...).
pub fn uffd_serve(
    fd: i32,
    spin_ns: u64,
    counters: &UffdCounters,
    on_fault: &dyn Fn(usize, u64) -> Option<bool>,
) -> ! {
    let mut pending = [(0usize, 0u64); MAX_PENDING];
    let mut n_pending = 0usize;
    let k = super::os_page_size();
    let mut msgs = [UffdMsg {
        event: 0,
        _reserved1: 0,
        _reserved2: 0,
        _reserved3: 0,
        flags: 0,
        address: 0,
        ptid: 0,
        _pad: 0,
    }; MSG_BATCH];
    let mut last = now_ns();
    let mut spinning = false;
    loop {
        // SAFETY: read(2) writes at most the size of `msgs` (plain integers, any bit
        // pattern valid) on this frame.
        let r = unsafe {
            raw::syscall6(
                libc::SYS_read as usize,
                [
                    fd as usize,
                    msgs.as_mut_ptr() as usize,
                    size_of::<[UffdMsg; MSG_BATCH]>(),
                    0,
                    0,
                    0,
                ],
            )
        };
        match raw::check(r) {
            Ok(n) => {
                let count = (n / size_of::<UffdMsg>()).min(MSG_BATCH);
                if spinning {
                    counters
                        .spin_hits
                        .fetch_add(count as u64, Ordering::Relaxed);
                }
                for m in &msgs[..count] {
                    serve_one(fd, k, m, counters, on_fault, &mut pending, &mut n_pending);
                }
                retry_pending(fd, k, counters, on_fault, &mut pending, &mut n_pending);
                spinning = false;
                last = now_ns();
            }
            Err(libc::EAGAIN) => {
                if now_ns().saturating_sub(last) < spin_ns {
                    spinning = true;
                    core::hint::spin_loop();
                    continue;
                }
                spinning = false;
                if n_pending > 0 {
                    retry_pending(fd, k, counters, on_fault, &mut pending, &mut n_pending);
                }
                let timeout = (n_pending > 0).then_some(PENDING_POLL_NS);
                if let Err(e) = wait_readable(fd, timeout) {
                    crate::fatal!(
                        "memsnap fault server",
                        "poll on the userfaultfd failed (errno {e}, 0 = error condition)"
                    );
                }
                counters.wakeups.fetch_add(1, Ordering::Relaxed);
                last = now_ns();
            }
            Err(libc::EINTR) => {}
            Err(e) => crate::fatal!(
                "memsnap fault server",
                "read from the userfaultfd failed (errno {e})"
            ),
        }
    }
}

fn serve_one(
    fd: i32,
    k: usize,
    m: &UffdMsg,
    counters: &UffdCounters,
    on_fault: &dyn Fn(usize, u64) -> Option<bool>,
    pending: &mut [(usize, u64); MAX_PENDING],
    n_pending: &mut usize,
) {
    if m.event != UFFD_EVENT_PAGEFAULT {
        // Never requested (no UFFD_FEATURE_EVENT_*); nobody waits on it.
        counters.foreign.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let addr = m.address as usize & !(k - 1);
    if m.flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
        counters.faults.fetch_add(1, Ordering::Relaxed);
        let tid = m.ptid as u64;
        let mut answer = on_fault(addr, tid);
        if answer.is_none() && *n_pending < MAX_PENDING {
            pending[*n_pending] = (addr, tid);
            *n_pending += 1;
            return;
        }
        // No room to keep it: wait in place for this one, as before.
        while answer.is_none() {
            wait_readable(fd, Some(PENDING_POLL_NS)).ok();
            answer = on_fault(addr, tid);
        }
        if answer == Some(true) {
            return;
        }
    }
    decline(fd, k, addr, counters);
}

/// Asks the pending faults again; keeps those that must still wait, in order.
fn retry_pending(
    fd: i32,
    k: usize,
    counters: &UffdCounters,
    on_fault: &dyn Fn(usize, u64) -> Option<bool>,
    pending: &mut [(usize, u64); MAX_PENDING],
    n_pending: &mut usize,
) {
    let mut kept = 0;
    for i in 0..*n_pending {
        let (addr, tid) = pending[i];
        match on_fault(addr, tid) {
            None => {
                pending[kept] = (addr, tid);
                kept += 1;
            }
            Some(true) => {}
            Some(false) => decline(fd, k, addr, counters),
        }
    }
    *n_pending = kept;
}

/// The engine declined the fault at `addr`: drops its protection and wakes the writer.
fn decline(fd: i32, k: usize, addr: usize, counters: &UffdCounters) {
    counters.foreign.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the engine declined this page: it no longer tracks it, so its protection is
    // ours to drop, and the faulting thread must not stay blocked.
    if unsafe { uffd_protect(fd, addr, k, false) }.is_err() {
        // Unregistered meanwhile (which wakes waiters), or not write-protected: wake
        // anyway, harmless when nobody waits.
        let _ = uffd_wake(fd, addr, k);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    fn page() -> usize {
        super::super::os_page_size()
    }

    /// `n` fresh read-write anonymous pages, without transparent huge pages (so that one
    /// write populates one page).
    fn map(n: usize) -> usize {
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                n * page(),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        // SAFETY: advice on our own mapping.
        unsafe { libc::madvise(p, n * page(), libc::MADV_NOHUGEPAGE) };
        p as usize
    }

    fn poke(addr: usize, v: u8) {
        // SAFETY: callers pass addresses in mappings of their own.
        unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
    }

    fn peek(addr: usize) -> u8 {
        // SAFETY: as for `poke`.
        unsafe { core::ptr::read_volatile(addr as *const u8) }
    }

    /// Runs `f` in a forked child (write protection must not reach the test runner) and
    /// asserts that it succeeded. The child reports panics on the real stderr, since
    /// libtest's capture does not survive the fork.
    fn in_child(f: impl FnOnce()) {
        // SAFETY: the child runs only `f` and then _exits.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            std::panic::set_hook(Box::new(|info| {
                let s = format!("{info}\n");
                raw::write(2, s.as_bytes());
            }));
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
            // SAFETY: ends the child without running the parent's atexit handlers.
            unsafe { libc::_exit(if ok { 0 } else { 1 }) };
        }
        let mut status = 0;
        // SAFETY: waits for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "child failed (status {status:#x})"
        );
    }

    /// Whether `mode` is available; where it is not, the test is skipped (see `skip`).
    fn available(mode: UffdMode) -> bool {
        let s = uffd_support();
        let r = match mode {
            UffdMode::Sync => s.sync,
            UffdMode::Async => s.async_wp,
        };
        match r {
            Ok(()) => true,
            Err(why) => {
                skip(why);
                false
            }
        }
    }

    /// Reports that the running test cannot run here, and why, before it returns early.
    /// libtest has no skipped state and swallows a passing test's captured output, so the
    /// line goes straight to file descriptor 2, naming the test (libtest names each test's
    /// thread after it). Under CI=true the test fails instead: CI's kernel offers every
    /// mechanism these tests need, so a skip there would hide a regression.
    fn skip(why: &str) {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("a userfaultfd test");
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!("{name}: cannot run although CI=true: {why}");
        }
        raw::write(2, format!("test {name} ... skipped: {why}\n").as_bytes());
    }

    fn runs_written(pm: i32, start: usize, end: usize, rearm: bool) -> Vec<(usize, usize)> {
        let mut v = Vec::new();
        scan_written(pm, start, end, rearm, |s, e| v.push((s, e))).expect("scan_written");
        v
    }

    #[test]
    fn uapi_numbers() {
        // The values the C headers give (linux/userfaultfd.h of Debian 12 for the older
        // ioctls, _IOWR('f', 16, 96-byte struct) for PAGEMAP_SCAN).
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
        assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
        assert_eq!(size_of::<UffdMsg>(), 32);
        assert_eq!(core::mem::offset_of!(UffdMsg, address), 16);
        assert_eq!(core::mem::offset_of!(UffdMsg, ptid), 24);
        assert_eq!(size_of::<PageRegion>(), 24);
    }

    /// The probe's verdicts agree with the features and with what uffd_open does.
    #[test]
    fn probe_is_consistent() {
        let s = uffd_support();
        eprintln!("uffd support: {s:?}");
        if s.sync.is_ok() {
            assert_ne!(s.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP, 0);
            uffd_close(uffd_open(UffdMode::Sync).expect("sync open"));
        }
        if s.async_wp.is_ok() {
            assert_ne!(s.features & UFFD_FEATURE_WP_ASYNC, 0);
            uffd_close(uffd_open(UffdMode::Async).expect("async open"));
        }
        if s.features & UFFD_FEATURE_WP_ASYNC != 0 {
            // Whatever offers WP_ASYNC (6.7) has PAGEMAP_SCAN: the probe must succeed.
            assert_eq!(s.async_wp, Ok(()));
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 && s.features != 0 {
            assert_eq!(s.sync, Ok(()), "root on a kernel with userfaultfd");
            assert!(!s.user_mode_only, "root needs no UFFD_USER_MODE_ONLY");
        }
    }

    /// Sync mode only where a never-touched page, armed, is write-protected too: its
    /// pagemap entry carries the uffd-wp bit (a PTE marker). On 5.10 and 6.1 (no
    /// WP_UNPOPULATED) it did not, and the engine lost first writes to such pages.
    #[test]
    fn sync_mode_protects_untouched_pages() {
        if !available(UffdMode::Sync) {
            return;
        }
        in_child(|| {
            const PM_UFFD_WP: u64 = 1 << 57;
            let k = page();
            let base = map(2);
            let fd = uffd_open(UffdMode::Sync).unwrap();
            uffd_register(fd, base, 2 * k).unwrap();
            // SAFETY: the test's own mapping, in a forked child; never touched.
            unsafe { uffd_protect(fd, base, 2 * k, true) }.unwrap();
            let entry = {
                use std::io::{Read, Seek, SeekFrom};
                let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
                f.seek(SeekFrom::Start((base / k * 8) as u64)).unwrap();
                let mut b = [0u8; 8];
                f.read_exact(&mut b).unwrap();
                u64::from_ne_bytes(b)
            };
            assert_ne!(
                entry & PM_UFFD_WP,
                0,
                "an armed, never-touched page is not write-protected (pagemap {entry:#x})"
            );
        });
    }

    #[test]
    fn private_file_mappings_register_only_async() {
        if !available(UffdMode::Sync) || !available(UffdMode::Async) {
            return;
        }
        let k = page();
        let path = format!("/tmp/memsnap-uffd-test-{}\0", std::process::id());
        // SAFETY: a NUL-terminated path; the file is unlinked right away.
        let fd = unsafe {
            let fd = libc::open(
                path.as_ptr() as *const libc::c_char,
                libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
                0o600,
            );
            assert!(fd >= 0);
            libc::unlink(path.as_ptr() as *const libc::c_char);
            assert_eq!(libc::ftruncate(fd, 4 * k as libc::off_t), 0);
            fd
        };
        // SAFETY: a fresh private mapping of the file.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                4 * k,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                fd,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let sync = uffd_open(UffdMode::Sync).unwrap();
        // Sync mode refuses private mappings of disk files, but not of tmpfs files (shmem
        // takes write protection since 5.19): /tmp is tmpfs in the test VMs and on many
        // systems.
        // SAFETY: fstatfs writes the struct on this frame.
        let tmpfs = unsafe {
            let mut st: libc::statfs = core::mem::zeroed();
            libc::fstatfs(fd, &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
        };
        if !tmpfs {
            assert_eq!(uffd_register(sync, p as usize, 4 * k), Err(libc::EINVAL));
        }
        let asy = uffd_open(UffdMode::Async).unwrap();
        assert_eq!(uffd_register(asy, p as usize, 4 * k), Ok(()));
        assert_eq!(uffd_unregister(asy, p as usize, 4 * k), Ok(()));
        uffd_close(sync);
        uffd_close(asy);
        // SAFETY: our mapping and file.
        unsafe {
            libc::munmap(p, 4 * k);
            libc::close(fd);
        }
    }

    #[test]
    fn protect_reports_enoent_on_unregistered_memory() {
        if !available(UffdMode::Sync) {
            return;
        }
        let k = page();
        let base = map(2);
        let fd = uffd_open(UffdMode::Sync).unwrap();
        assert_eq!(
            // SAFETY: nothing is armed (the call fails); our mapping.
            unsafe { uffd_protect(fd, base, 2 * k, true) },
            Err(libc::ENOENT)
        );
        uffd_close(fd);
        // SAFETY: our mapping.
        unsafe { libc::munmap(base as *mut _, 2 * k) };
    }

    static SEEN_ADDR: AtomicUsize = AtomicUsize::new(0);
    static SEEN_TID: AtomicU64 = AtomicU64::new(0);
    static DECLINE: AtomicUsize = AtomicUsize::new(0);
    static COUNTERS: UffdCounters = UffdCounters {
        faults: AtomicU64::new(0),
        wakeups: AtomicU64::new(0),
        spin_hits: AtomicU64::new(0),
        foreign: AtomicU64::new(0),
    };

    /// A sync-mode fd over `n` populated, registered and armed pages, served by a thread
    /// whose `on_fault` records the fault and disarms the page (or declines the page at
    /// DECLINE).
    fn sync_setup(n: usize, spin_ns: u64) -> (i32, usize) {
        let k = page();
        let base = map(n);
        for i in 0..n {
            poke(base + i * k, 1);
        }
        let fd = uffd_open(UffdMode::Sync).unwrap();
        uffd_register(fd, base, n * k).unwrap();
        // SAFETY: the test's own mapping, in a forked child.
        unsafe { uffd_protect(fd, base, n * k, true) }.unwrap();
        std::thread::spawn(move || {
            uffd_serve(fd, spin_ns, &COUNTERS, &|addr, tid| {
                if addr == DECLINE.load(Ordering::Relaxed) {
                    return Some(false);
                }
                SEEN_ADDR.store(addr, Ordering::Relaxed);
                SEEN_TID.store(tid, Ordering::Relaxed);
                // SAFETY: the test's page; disarming it resolves the fault.
                unsafe { uffd_protect(fd, addr, page(), false) }.unwrap();
                Some(true)
            })
        });
        (fd, base)
    }

    #[test]
    fn sync_fault_is_served() {
        if !available(UffdMode::Sync) {
            return;
        }
        in_child(|| {
            let k = page();
            let (_fd, base) = sync_setup(4, 0);
            DECLINE.store(base + 3 * k, Ordering::Relaxed);
            poke(base + 2 * k + 5, 7);
            assert_eq!(peek(base + 2 * k + 5), 7);
            assert_eq!(SEEN_ADDR.load(Ordering::Relaxed), base + 2 * k);
            assert_eq!(SEEN_TID.load(Ordering::Relaxed), raw::gettid());
            assert_eq!(COUNTERS.faults.load(Ordering::Relaxed), 1);
            // Disarmed: no second fault.
            poke(base + 2 * k + 6, 8);
            assert_eq!(COUNTERS.faults.load(Ordering::Relaxed), 1);
            // Declined: the server disarms the page itself and the write completes.
            poke(base + 3 * k, 9);
            assert_eq!(peek(base + 3 * k), 9);
            assert_eq!(COUNTERS.faults.load(Ordering::Relaxed), 2);
            assert_eq!(COUNTERS.foreign.load(Ordering::Relaxed), 1);
            assert_eq!(SEEN_ADDR.load(Ordering::Relaxed), base + 2 * k);
            // With spin 0 the server never spins: it reads, or sleeps in poll().
            assert_eq!(COUNTERS.spin_hits.load(Ordering::Relaxed), 0);
        });
    }

    /// The point of the backend: the kernel writing into an armed page (read(2) from a
    /// pipe) waits for the server instead of failing with EFAULT.
    #[test]
    fn kernel_write_into_armed_page_in_sync_mode() {
        if !available(UffdMode::Sync) {
            return;
        }
        let user_only = uffd_support().user_mode_only;
        in_child(move || {
            let k = page();
            let (_fd, base) = sync_setup(2, 1_000_000);
            let mut p = [0i32; 2];
            // SAFETY: a pipe into this frame's array; then 5 bytes from a literal.
            unsafe {
                assert_eq!(libc::pipe(p.as_mut_ptr()), 0);
                assert_eq!(libc::write(p[1], b"hello".as_ptr() as *const _, 5), 5);
            }
            // SAFETY: reads into our armed page.
            let r = unsafe { libc::read(p[0], (base + k) as *mut _, 5) };
            if user_only {
                assert_eq!(r, -1);
                assert_eq!(
                    std::io::Error::last_os_error().raw_os_error(),
                    Some(libc::EFAULT)
                );
                return;
            }
            assert_eq!(r, 5);
            // SAFETY: 5 bytes just read into our page.
            let got = unsafe { std::slice::from_raw_parts((base + k) as *const u8, 5) };
            assert_eq!(got, b"hello");
            assert_eq!(SEEN_ADDR.load(Ordering::Relaxed), base + k);
            assert_eq!(COUNTERS.faults.load(Ordering::Relaxed), 1);
        });
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
            assert_eq!(raw::check(raw::read(fd, &mut buf)), Err(libc::EAGAIN));
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
    /// A range over several VMAs: 6.1's UFFDIO_WRITEPROTECT refused it with ENOENT
    /// (before wp_split), and the engine's protections of neighbouring tracked mappings
    /// failed; holes in the range are skipped, as 6.5+ kernels do.
    #[test]
    fn protect_spans_several_mappings() {
        if !available(UffdMode::Sync) {
            return;
        }
        in_child(|| {
            let k = page();
            let base = map(6);
            // Different flags split the mapping: VMAs [0,1) [1,2) [2,6).
            // SAFETY: advice on our own mapping.
            let r = unsafe { libc::madvise((base + k) as *mut _, k, libc::MADV_NOHUGEPAGE) };
            assert_eq!(r, 0);
            let fd = uffd_open(UffdMode::Sync).unwrap();
            uffd_register(fd, base, 6 * k).unwrap();
            // SAFETY: the test's own mapping, in a forked child.
            unsafe {
                assert_eq!(uffd_protect(fd, base, 6 * k, true), Ok(()));
                assert_eq!(uffd_protect(fd, base, 6 * k, false), Ok(()));
                assert_eq!(uffd_disarm_quietly(fd, base, 6 * k), Ok(()));
                // A hole in the middle is skipped; a range with nothing mapped is not.
                libc::munmap((base + 3 * k) as *mut _, k);
                assert_eq!(uffd_protect(fd, base, 6 * k, true), Ok(()));
                assert_eq!(uffd_protect(fd, base, 6 * k, false), Ok(()));
                assert_eq!(uffd_protect(fd, base + 3 * k, k, true), Err(libc::ENOENT));
            }
            // Writable again: a write goes through without a fault server.
            poke(base + 5 * k, 7);
            assert_eq!(peek(base + 5 * k), 7);
        });
    }

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
        raw::close(pm);
        // SAFETY: our mapping.
        unsafe { libc::munmap(base as *mut _, 8 * k) };
    }

    /// After fork the child's memory is no longer registered and the inherited fds speak
    /// for the parent: fresh ones track the child.
    #[test]
    fn forked_child_starts_over() {
        if !available(UffdMode::Async) {
            return;
        }
        in_child(|| {
            let k = page();
            let base = map(4);
            let fd = uffd_open(UffdMode::Async).unwrap();
            uffd_register(fd, base, 4 * k).unwrap();
            // SAFETY: the test's own mapping, in a forked child.
            unsafe { uffd_protect(fd, base, 4 * k, true) }.unwrap();
            let pm = pagemap_open().unwrap();
            in_child(move || {
                let mine = pagemap_open().unwrap();
                assert_eq!(
                    scan_written(mine, base, base + 4 * k, false, |_, _| {}),
                    Err(libc::EPERM),
                    "registration is not inherited"
                );
                poke(base + k, 5);
                // The inherited pagemap fd reads the parent, where nothing was written.
                assert_eq!(runs_written(pm, base, base + 4 * k, false), vec![]);
                uffd_close(fd);
                let fd = uffd_open(UffdMode::Async).unwrap();
                uffd_register(fd, base, 4 * k).unwrap();
                // SAFETY: as above, in a grandchild.
                unsafe { uffd_protect(fd, base, 4 * k, true) }.unwrap();
                poke(base + 2 * k, 6);
                assert_eq!(
                    runs_written(mine, base, base + 4 * k, false),
                    vec![(base + 2 * k, base + 3 * k)]
                );
            });
            assert_eq!(peek(base + k), 0, "the child's write stayed in the child");
        });
    }

    /// Not a check: prints what the backend costs here
    /// (`cargo test --release --lib uffd::tests::measure -- --ignored --nocapture`).
    #[test]
    #[ignore]
    fn measure() {
        if !available(UffdMode::Sync) || !available(UffdMode::Async) {
            return;
        }
        let say = |s: String| {
            raw::write(2, s.as_bytes());
        };
        for spin in [0u64, 200_000] {
            in_child(move || {
                let k = page();
                let n = 4096;
                let (_fd, base) = sync_setup(n, spin);
                let t = now_ns();
                for i in 0..n {
                    poke(base + i * k, 2);
                }
                let dt = (now_ns() - t) as f64 / n as f64 / 1e3;
                say(format!(
                    "sync, spin {} us: {dt:.2} us/fault; wakeups {}, spin hits {}\n",
                    spin / 1000,
                    COUNTERS.wakeups.load(Ordering::Relaxed),
                    COUNTERS.spin_hits.load(Ordering::Relaxed)
                ));
            });
        }
        in_child(move || {
            let k = page();
            let n = (64 << 20) / k;
            let base = map(n);
            for i in 0..n {
                poke(base + i * k, 1);
            }
            let fd = uffd_open(UffdMode::Async).unwrap();
            uffd_register(fd, base, n * k).unwrap();
            let t = now_ns();
            // SAFETY: the test's own mapping, in a forked child.
            unsafe { uffd_protect(fd, base, n * k, true) }.unwrap();
            let arm = (now_ns() - t) as f64 / 1e3;
            let pm = pagemap_open().unwrap();
            let t = now_ns();
            for i in 0..n {
                poke(base + i * k, 2);
            }
            let w = (now_ns() - t) as f64 / n as f64 / 1e3;
            let mut pages = 0;
            let t = now_ns();
            scan_written(pm, base, base + n * k, true, |s, e| pages += (e - s) / k).unwrap();
            let scan = (now_ns() - t) as f64 / 1e3;
            assert_eq!(pages, n);
            let t = now_ns();
            scan_written(pm, base, base + n * k, true, |_, _| pages += 1).unwrap();
            let clean = (now_ns() - t) as f64 / 1e3;
            for i in (0..n).step_by(2) {
                poke(base + i * k, 3);
            }
            let t = now_ns();
            let mut runs = 0;
            scan_written(pm, base, base + n * k, true, |_, _| runs += 1).unwrap();
            let alt = (now_ns() - t) as f64 / 1e3;
            let t = now_ns();
            let mut populated = 0;
            scan_populated(pm, base, base + n * k, |_, _| populated += 1).unwrap();
            let pop = (now_ns() - t) as f64 / 1e3;
            say(format!(
                "async, 64 MiB: arm {arm:.0} us; first writes {w:.2} us/page; scan all written + rearm {scan:.0} us; clean rescan {clean:.0} us; every other page written ({runs} runs) + rearm {alt:.0} us; scan_populated {pop:.0} us\n"
            ));
        });
    }
}
