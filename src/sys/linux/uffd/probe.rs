//! The probe: what userfaultfd can do on this kernel with this process's privileges (sync
//! mode, async mode, user-mode-only), found once by trying it on a scratch mapping and
//! cached in statics before the first snapshot.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};

use super::ioctl::{offered_features, uffd_close, uffd_open, uffd_protect, uffd_register};
use super::uapi::*;
use crate::sys::linux::pagemap::{pagemap_close, pagemap_open, scan_written};
use crate::sys::linux::raw;
use crate::sys::{UffdFd, UffdMode, UffdSupport};

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
pub(super) static PROBED: AtomicBool = AtomicBool::new(false);
pub(super) static FEATURES: AtomicU64 = AtomicU64::new(0);
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
    let k = crate::sys::linux::os_page_size();
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

fn probe_armed(fd: UffdFd, mode: UffdMode, base: usize, k: usize) -> u8 {
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
    pagemap_close(pm);
    match r {
        Err(_) => R_SCAN,
        Ok(()) if n == 1 && runs[0] == (base + k, base + 2 * k) => 0,
        Ok(()) => R_SCAN_WRONG,
    }
}
