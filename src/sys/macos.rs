//! The macOS side of the platform boundary.
//!
//! Not implemented yet (the mach2 backend is tracked separately): every primitive that
//! does not need Mach is here so the crate builds and links for both Apple targets, and
//! the region walk and fault capture report `ENOSYS`, which makes
//! `TakeFirstMemorySnapshot` abort with a clear message instead of tracking nothing.

use super::{Access, Region};
use core::sync::atomic::AtomicU32;

pub const BACKEND: super::Backend = super::Backend::MacExceptionPort;

/// The decision function the fault capture calls; see the Linux backend.
pub type FaultCallback = fn(usize) -> bool;

pub fn os_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 {
        16384
    } else {
        v as usize
    }
}

pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if v <= 0 {
        1
    } else {
        v as usize
    }
}

pub fn reserve(len: usize) -> Option<*mut u8> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANON | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

pub fn map_with_hint(hint: usize, len: usize) -> Option<*mut u8> {
    // SAFETY: without MAP_FIXED the hint never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            hint as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANON,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

/// # Safety
/// Nothing may use `[addr, addr + len)` afterwards.
pub unsafe fn release(addr: *mut u8, len: usize) {
    // SAFETY: forwarded contract.
    unsafe {
        libc::munmap(addr as *mut libc::c_void, len);
    }
}

/// # Safety
/// The range holds no memory whose protection the Rust program relies on.
pub unsafe fn protect(addr: usize, len: usize, access: Access) -> Result<(), i32> {
    let prot = super::unix::prot_bits(access);
    // SAFETY: forwarded contract.
    if unsafe { libc::mprotect(addr as *mut libc::c_void, len, prot) } == 0 {
        Ok(())
    } else {
        Err(libc::EACCES)
    }
}

/// # Safety
/// Nothing relies on the current contents of `[addr, addr + len)`.
pub unsafe fn discard(addr: usize, len: usize) -> Result<(), i32> {
    // SAFETY: forwarded contract.
    if unsafe { libc::madvise(addr as *mut libc::c_void, len, libc::MADV_FREE) } == 0 {
        Ok(())
    } else {
        Err(libc::EINVAL)
    }
}

pub fn write_stderr(bytes: &[u8]) {
    // SAFETY: writing a live slice.
    unsafe {
        libc::write(2, bytes.as_ptr() as *const libc::c_void, bytes.len());
    }
}

pub fn abort() -> ! {
    // SAFETY: abort never returns.
    unsafe { libc::abort() }
}

pub fn tid() -> u64 {
    let mut id = 0u64;
    // SAFETY: querying the calling thread's id into a local.
    unsafe { libc::pthread_threadid_np(0 as libc::pthread_t, &mut id) };
    id
}

pub fn pid() -> u64 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u64 }
}

pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe {
        libc::sched_yield();
    }
}

pub fn futex_wait(_word: &AtomicU32, _expected: u32) {
    yield_now();
}

pub fn futex_wake(_word: &AtomicU32, _n: u32) {}

pub fn sleep_ns(ns: u64) {
    // SAFETY: usleep has no memory preconditions.
    unsafe {
        libc::usleep((ns / 1000) as libc::useconds_t);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    ScratchTooSmall,
    Io(i32),
}

pub fn walk_regions(_scratch: &mut [u8], _f: impl FnMut(Region)) -> Result<(), WalkError> {
    Err(WalkError::Io(libc::ENOSYS))
}

pub fn install_fault_handler(_callback: FaultCallback) -> Result<(), i32> {
    Err(libc::ENOSYS)
}

pub fn fault_handler_installed() -> bool {
    false
}

pub fn pin_allocator(_pin: bool) {}

pub fn settle_threads(_scratch: &mut [u8]) {}

pub fn exited_threads_cpu_ns(_others: impl Iterator<Item = u64>) -> (i64, i64) {
    (0, 0)
}

pub fn rseq_layout() -> Option<(isize, usize)> {
    None
}

pub fn current_rseq_area(_layout: Option<(isize, usize)>) -> Option<(usize, usize)> {
    None
}

pub fn current_errno_location() -> usize {
    // SAFETY: __error has no preconditions.
    unsafe { libc::__error() as usize }
}

pub fn current_signal_stack() -> Option<(usize, usize)> {
    None
}

#[inline(never)]
pub fn current_sp() -> usize {
    let marker = 0u8;
    core::hint::black_box(&marker) as *const u8 as usize
}

pub fn for_each_thread_sp(
    _scratch: &mut [u8],
    _skip: impl Fn(u64) -> bool,
    _f: impl FnMut(u64, usize),
) {
}

/// macOS has no per-process mapping limit like Linux's vm.max_map_count.
pub fn max_map_count() -> Option<usize> {
    None
}
