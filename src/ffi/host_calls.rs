//! The host's memory-mapping calls, interposed (Linux): `madvise`, `munmap`, `mprotect`,
//! `mremap`, `mmap` and `mmap64`.
//!
//! libmemsnap defines these libc names, so calls through the PLT from the host and from
//! libraries loaded after libc in the lookup scope but before it in its own search
//! (an `LD_PRELOAD`ed allocator, which calls but does not define them) bind here first.
//! glibc's internal calls (its malloc, the dynamic loader) use hidden aliases and never
//! arrive: glibc malloc is pinned in whole-process mode, so it does not need to. Raw
//! system calls are not seen either (docs/host-calls.md).
//!
//! Each wrapper is the bare system call unless the engine is armed and the range may
//! hold tracked memory (a lock-free look at the page-state table), in which case
//! `engine::host` sees the call before it takes effect. Failures set `errno` as libc's
//! wrappers do; the system calls themselves are raw and touch nothing else.

use core::ffi::{c_int, c_void};

use crate::engine;
use crate::sys::raw;

/// libc's convention: -1 (or `MAP_FAILED`) with `errno` set on failure.
fn finish(ret: raw::Ret) -> isize {
    match raw::check(ret) {
        Ok(v) => v as isize,
        Err(e) => {
            // SAFETY: __errno_location has no preconditions; this is libc's contract.
            unsafe { *libc::__errno_location() = e };
            -1
        }
    }
}

/// `madvise(2)`.
///
/// # Safety
/// As for `madvise(2)`: the caller may change the contents of the range.
#[no_mangle]
pub unsafe extern "C" fn madvise(addr: *mut c_void, len: usize, advice: c_int) -> c_int {
    let ret = match engine::get() {
        Some(e) => e.host_madvise(addr as usize, len, advice),
        // SAFETY: the caller's own call, forwarded unchanged.
        None => unsafe { raw::madvise(addr as usize, len, advice) },
    };
    finish(ret) as c_int
}

/// `munmap(2)`.
///
/// # Safety
/// As for `munmap(2)`: nothing uses the range afterwards.
#[no_mangle]
pub unsafe extern "C" fn munmap(addr: *mut c_void, len: usize) -> c_int {
    let ret = match engine::get() {
        Some(e) => e.host_munmap(addr as usize, len),
        // SAFETY: the caller's own call, forwarded unchanged.
        None => unsafe { raw::munmap(addr as usize, len) },
    };
    finish(ret) as c_int
}

/// `mprotect(2)`.
///
/// # Safety
/// As for `mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn mprotect(addr: *mut c_void, len: usize, prot: c_int) -> c_int {
    let ret = match engine::get() {
        Some(e) => e.host_mprotect(addr as usize, len, prot),
        // SAFETY: the caller's own call, forwarded unchanged.
        None => unsafe { raw::mprotect(addr as usize, len, prot) },
    };
    finish(ret) as c_int
}

/// `mmap(2)`.
///
/// # Safety
/// As for `mmap(2)`: with `MAP_FIXED` the caller may replace what is mapped there.
#[no_mangle]
pub unsafe extern "C" fn mmap(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off_t,
) -> *mut c_void {
    let ret = match engine::get() {
        Some(e) => e.host_mmap_fixed(addr as usize, len, prot, flags, fd, off as usize),
        // SAFETY: the caller's own call, forwarded unchanged.
        None => unsafe { raw::mmap(addr as usize, len, prot, flags, fd, off as usize) },
    };
    finish(ret) as *mut c_void
}

/// `mmap64(2)`: the same call on 64-bit Linux.
///
/// # Safety
/// As for [`mmap`].
#[no_mangle]
pub unsafe extern "C" fn mmap64(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    flags: c_int,
    fd: c_int,
    off: libc::off64_t,
) -> *mut c_void {
    // SAFETY: forwarded contract.
    unsafe { mmap(addr, len, prot, flags, fd, off) }
}

/// `mremap(2)`. C declares it variadic (`new_address` only with `MREMAP_FIXED`); the
/// x86_64 and aarch64 Linux calling conventions pass variadic integer arguments exactly
/// as fixed ones, so the fifth is read where the caller put it (garbage when absent,
/// and then unused).
///
/// # Safety
/// As for `mremap(2)`.
#[no_mangle]
pub unsafe extern "C" fn mremap(
    old: *mut c_void,
    old_len: usize,
    new_len: usize,
    flags: c_int,
    new_addr: *mut c_void,
) -> *mut c_void {
    let ret = match engine::get() {
        Some(e) => e.host_mremap(old as usize, old_len, new_len, flags, new_addr as usize),
        // SAFETY: the caller's own call, forwarded unchanged.
        None => unsafe { raw::mremap(old as usize, old_len, new_len, flags, new_addr as usize) },
    };
    finish(ret) as *mut c_void
}
