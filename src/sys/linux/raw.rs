//! Raw Linux system calls issued with inline assembly.
//!
//! The fault handler, the snapshot and the restore paths must never write tracked memory.
//! glibc's wrappers write `errno` on failure, and `errno` lives in thread-local storage that
//! may be tracked; these calls return `-errno` in a register instead and touch nothing else.

use core::arch::asm;

/// The raw return value of a system call: `>= 0` on success, `-errno` on failure.
pub type Ret = isize;

/// Converts a raw return value into `Ok(value)` or `Err(errno)`.
#[inline]
pub fn check(ret: Ret) -> Result<usize, i32> {
    if (-4095..0).contains(&ret) {
        Err((-ret) as i32)
    } else {
        Ok(ret as usize)
    }
}

/// `_IOC(dir, type, nr, size)` with the generic encoding, which x86_64 and aarch64 share.
pub const fn ioc(dir: u64, ty: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (ty << 8) | nr
}
pub const IOC_NONE: u64 = 0;
pub const IOC_WRITE: u64 = 1;
pub const IOC_READ: u64 = 2;

/// # Safety
/// `arg` is what request `req` expects (a pointer to a live object of its type, or a value).
pub unsafe fn ioctl(fd: i32, req: u64, arg: usize) -> Result<usize, i32> {
    // SAFETY: forwarded contract.
    check(unsafe {
        syscall6(
            libc::SYS_ioctl as usize,
            [fd as usize, req as usize, arg, 0, 0, 0],
        )
    })
}

/// # Safety
/// The caller upholds the contract of system call `n` for the given arguments.
#[cfg(target_arch = "x86_64")]
#[inline]
pub unsafe fn syscall6(n: usize, a: [usize; 6]) -> Ret {
    let ret: isize;
    // SAFETY: the x86_64 Linux system call convention; rcx and r11 are clobbered by the
    // `syscall` instruction; memory effects are the caller's contract.
    unsafe {
        asm!(
            "syscall",
            inlateout("rax") n as isize => ret,
            in("rdi") a[0], in("rsi") a[1], in("rdx") a[2],
            in("r10") a[3], in("r8") a[4], in("r9") a[5],
            lateout("rcx") _, lateout("r11") _,
            options(nostack),
        );
    }
    ret
}

/// # Safety
/// The caller upholds the contract of system call `n` for the given arguments.
#[cfg(target_arch = "aarch64")]
#[inline]
pub unsafe fn syscall6(n: usize, a: [usize; 6]) -> Ret {
    let ret: isize;
    // SAFETY: the aarch64 Linux system call convention (number in x8, result in x0).
    unsafe {
        asm!(
            "svc 0",
            in("x8") n,
            inlateout("x0") a[0] as isize => ret,
            in("x1") a[1], in("x2") a[2], in("x3") a[3], in("x4") a[4], in("x5") a[5],
            options(nostack),
        );
    }
    ret
}

// The wrappers below share one contract.
// # Safety (for every `unsafe fn` here)
// The caller upholds the kernel's contract for the call: addresses name memory the caller
// owns (or may change the mapping of) and lengths are exact.

macro_rules! sys {
    ($name:ident) => {
        libc::$name as usize
    };
}

/// # Safety
/// See the contract above.
pub unsafe fn mmap(addr: usize, len: usize, prot: i32, flags: i32, fd: i32, off: usize) -> Ret {
    // SAFETY: forwarded contract.
    unsafe {
        syscall6(
            sys!(SYS_mmap),
            [addr, len, prot as usize, flags as usize, fd as usize, off],
        )
    }
}

/// # Safety
/// See the contract above.
pub unsafe fn munmap(addr: usize, len: usize) -> Ret {
    // SAFETY: forwarded contract.
    unsafe { syscall6(sys!(SYS_munmap), [addr, len, 0, 0, 0, 0]) }
}

/// # Safety
/// See the contract above.
pub unsafe fn mprotect(addr: usize, len: usize, prot: i32) -> Ret {
    // SAFETY: forwarded contract.
    unsafe { syscall6(sys!(SYS_mprotect), [addr, len, prot as usize, 0, 0, 0]) }
}

/// # Safety
/// See the contract above.
pub unsafe fn mremap(old: usize, old_len: usize, new_len: usize, flags: i32, new: usize) -> Ret {
    // SAFETY: forwarded contract.
    unsafe {
        syscall6(
            sys!(SYS_mremap),
            [old, old_len, new_len, flags as usize, new, 0],
        )
    }
}

/// # Safety
/// See the contract above.
pub unsafe fn madvise(addr: usize, len: usize, advice: i32) -> Ret {
    // SAFETY: forwarded contract.
    unsafe { syscall6(sys!(SYS_madvise), [addr, len, advice as usize, 0, 0, 0]) }
}

pub fn write(fd: i32, buf: &[u8]) -> Ret {
    // SAFETY: the kernel only reads `buf.len()` bytes from a live slice.
    unsafe {
        syscall6(
            sys!(SYS_write),
            [fd as usize, buf.as_ptr() as usize, buf.len(), 0, 0, 0],
        )
    }
}

pub fn read(fd: i32, buf: &mut [u8]) -> Ret {
    // SAFETY: the kernel writes at most `buf.len()` bytes into a live, exclusive slice.
    unsafe {
        syscall6(
            sys!(SYS_read),
            [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0],
        )
    }
}

/// Opens a NUL-terminated path read-only and close-on-exec, with extra `flags`
/// (`O_DIRECTORY` for directories).
pub fn open(path: &[u8], flags: i32) -> Ret {
    debug_assert_eq!(path.last(), Some(&0));
    // SAFETY: `path` is NUL-terminated and outlives the call.
    unsafe {
        syscall6(
            sys!(SYS_openat),
            [
                libc::AT_FDCWD as usize,
                path.as_ptr() as usize,
                (libc::O_RDONLY | libc::O_CLOEXEC | flags) as usize,
                0,
                0,
                0,
            ],
        )
    }
}

pub fn close(fd: i32) {
    // SAFETY: closing a descriptor this module opened.
    unsafe {
        syscall6(sys!(SYS_close), [fd as usize, 0, 0, 0, 0, 0]);
    }
}

pub fn getdents64(fd: i32, buf: &mut [u8]) -> Ret {
    // SAFETY: the kernel writes at most `buf.len()` bytes into a live, exclusive slice.
    unsafe {
        syscall6(
            sys!(SYS_getdents64),
            [fd as usize, buf.as_mut_ptr() as usize, buf.len(), 0, 0, 0],
        )
    }
}

/// Whether a VMA covers the page at `addr` (page-aligned, `page` its size): mincore(2)
/// answers ENOMEM for an unmapped page. Async-signal-safe.
pub fn page_mapped(addr: usize, page: usize) -> bool {
    let mut v = 0u8;
    // SAFETY: mincore only writes one byte (one page) into `v` on this frame.
    let r = unsafe {
        syscall6(
            sys!(SYS_mincore),
            [addr, page, &mut v as *mut u8 as usize, 0, 0, 0],
        )
    };
    check(r) != Err(libc::ENOMEM)
}

/// `brk(addr)`: the kernel's program break after the call (0 asks for the current one).
///
/// # Safety
/// See the contract above: lowering the break unmaps the memory above it.
pub unsafe fn brk(addr: usize) -> usize {
    // SAFETY: forwarded contract.
    unsafe { syscall6(sys!(SYS_brk), [addr, 0, 0, 0, 0, 0]) as usize }
}

pub fn gettid() -> u64 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { syscall6(sys!(SYS_gettid), [0; 6]) as u64 }
}

pub fn getpid() -> u64 {
    // SAFETY: getpid has no arguments and cannot fail.
    unsafe { syscall6(sys!(SYS_getpid), [0; 6]) as u64 }
}

/// Whether thread `tid` of this process still exists (`tgkill` with signal 0).
pub fn thread_alive(tid: u32) -> bool {
    // SAFETY: signal 0 only checks that the target exists.
    let r = unsafe {
        syscall6(
            sys!(SYS_tgkill),
            [getpid() as usize, tid as usize, 0, 0, 0, 0],
        )
    };
    r != -(libc::ESRCH as isize)
}

pub fn sched_yield() {
    // SAFETY: sched_yield has no arguments.
    unsafe {
        syscall6(sys!(SYS_sched_yield), [0; 6]);
    }
}

/// FUTEX_WAIT_PRIVATE on `word` while it holds `expected`.
pub fn futex_wait(word: &core::sync::atomic::AtomicU32, expected: u32) {
    // SAFETY: `word` is a live, aligned 32-bit atomic; no timeout.
    unsafe {
        syscall6(
            sys!(SYS_futex),
            [
                word.as_ptr() as usize,
                (libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG) as usize,
                expected as usize,
                0,
                0,
                0,
            ],
        );
    }
}

/// FUTEX_WAKE_PRIVATE: wakes up to `n` waiters on `word`.
pub fn futex_wake(word: &core::sync::atomic::AtomicU32, n: u32) {
    // SAFETY: `word` is a live, aligned 32-bit atomic.
    unsafe {
        syscall6(
            sys!(SYS_futex),
            [
                word.as_ptr() as usize,
                (libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG) as usize,
                n as usize,
                0,
                0,
                0,
            ],
        );
    }
}

/// Sleeps for `ns` nanoseconds on CLOCK_MONOTONIC.
pub fn sleep_ns(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as _,
        tv_nsec: (ns % 1_000_000_000) as _,
    };
    // SAFETY: `ts` is a valid timespec on this stack frame; no remaining-time output.
    unsafe {
        syscall6(
            sys!(SYS_clock_nanosleep),
            [
                libc::CLOCK_MONOTONIC as usize,
                0,
                &ts as *const libc::timespec as usize,
                0,
                0,
                0,
            ],
        );
    }
}

/// Reads this task's signal stack (`sigaltstack(NULL, &out)`).
pub fn current_sigaltstack() -> Option<(usize, usize)> {
    // SAFETY: an all-zero stack_t is a valid output buffer.
    let mut ss: libc::stack_t = unsafe { core::mem::zeroed() };
    // SAFETY: null new stack; the kernel writes `ss` on this stack frame.
    let r = unsafe {
        syscall6(
            sys!(SYS_sigaltstack),
            [0, &mut ss as *mut libc::stack_t as usize, 0, 0, 0, 0],
        )
    };
    if r != 0 || ss.ss_flags & libc::SS_DISABLE != 0 || ss.ss_sp.is_null() {
        None
    } else {
        Some((ss.ss_sp as usize, ss.ss_size))
    }
}

/// Restores SIGABRT's default action, unblocks it, sends it to this thread and, should
/// the process survive, exits with status 127. Touches no memory but this frame.
pub fn abort() -> ! {
    // struct kernel_sigaction { handler, flags, restorer, mask } with SIG_DFL everywhere.
    let action = [0usize; 4];
    let mut set = [0u64; 1];
    set[0] = 1 << (libc::SIGABRT - 1);
    // SAFETY: plain system calls with pointers to this frame's buffers.
    unsafe {
        syscall6(
            sys!(SYS_rt_sigaction),
            [libc::SIGABRT as usize, action.as_ptr() as usize, 0, 8, 0, 0],
        );
        syscall6(
            sys!(SYS_rt_sigprocmask),
            [
                libc::SIG_UNBLOCK as usize,
                set.as_ptr() as usize,
                0,
                8,
                0,
                0,
            ],
        );
        syscall6(
            sys!(SYS_tgkill),
            [
                getpid() as usize,
                gettid() as usize,
                libc::SIGABRT as usize,
                0,
                0,
                0,
            ],
        );
        loop {
            syscall6(sys!(SYS_exit_group), [127, 0, 0, 0, 0, 0]);
        }
    }
}
