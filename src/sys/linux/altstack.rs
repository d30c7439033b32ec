//! Every thread's signal stack, as it told the kernel.
//!
//! memsnap's fault handler runs with `SA_ONSTACK` (a host's crash reporter chained behind
//! it must still run on a thread whose stack overflowed), so the kernel writes a signal
//! frame onto a thread's alternate signal stack at every tracked write fault. That stack
//! must never be write-protected, yet the kernel tells only the thread itself where it is
//! (`sigaltstack(NULL, &old)`), and only glibc-less code knows which memory it is. So
//! libmemsnap exports `sigaltstack` itself: calls through the PLT (glibc has no internal
//! caller) reach this wrapper first, which makes the system call and records the stack by
//! thread id. A thread that installed its stack with a raw system call, or before
//! libmemsnap was loaded, is not seen: the README says so.
//!
//! The table is plain static memory: it is written only by threads installing a stack,
//! which is ordinary program activity (tracked, rewound with the rest, and rewinds across
//! thread creation are refused anyway), and read at checkpoints while other threads are
//! idle.

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::raw;

const SLOTS: usize = 1024;

static TIDS: [AtomicU32; SLOTS] = [const { AtomicU32::new(0) }; SLOTS];
static BASES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static SIZES: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];

/// Records `tid`'s signal stack (`len == 0`: disabled). A slot is the thread's own, a free
/// one, or one whose thread has exited.
fn record(tid: u32, base: usize, len: usize) {
    let slot = TIDS
        .iter()
        .position(|t| t.load(Ordering::Acquire) == tid)
        .or_else(|| {
            TIDS.iter().position(|t| {
                let cur = t.load(Ordering::Acquire);
                (cur == 0 || !raw::thread_alive(cur))
                    && t.compare_exchange(cur, tid, Ordering::AcqRel, Ordering::Acquire)
                        .is_ok()
            })
        });
    if let Some(i) = slot {
        BASES[i].store(base, Ordering::Relaxed);
        SIZES[i].store(len, Ordering::Release);
    }
}

/// The signal stack thread `tid` installed through `sigaltstack`, if any is enabled.
pub fn signal_stack_of(tid: u64) -> Option<(usize, usize)> {
    let i = TIDS
        .iter()
        .position(|t| t.load(Ordering::Acquire) as u64 == tid)?;
    let len = SIZES[i].load(Ordering::Acquire);
    (len != 0).then(|| (BASES[i].load(Ordering::Relaxed), len))
}

/// `sigaltstack(2)`, interposed: the system call, then the record.
///
/// # Safety
/// The caller's pointers are what `sigaltstack(2)` requires: `ss` null or a readable
/// `stack_t`, `old` null or a writable one.
#[no_mangle]
pub unsafe extern "C" fn sigaltstack(ss: *const libc::stack_t, old: *mut libc::stack_t) -> i32 {
    // SAFETY: the kernel checks both pointers; an invalid one fails with EFAULT.
    let r = unsafe {
        raw::syscall6(
            libc::SYS_sigaltstack as usize,
            [ss as usize, old as usize, 0, 0, 0, 0],
        )
    };
    if r < 0 {
        // SAFETY: __errno_location has no preconditions; this is libc's contract.
        unsafe { *libc::__errno_location() = (-r) as i32 };
        return -1;
    }
    if !ss.is_null() {
        // SAFETY: the kernel just read it successfully.
        let s = unsafe { *ss };
        let on = s.ss_flags & libc::SS_DISABLE == 0;
        record(
            raw::gettid() as u32,
            s.ss_sp as usize,
            if on { s.ss_size } else { 0 },
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn threads_signal_stacks_are_recorded() {
        let t = std::thread::spawn(|| {
            let mut mem = vec![0u8; 64 * 1024];
            let ss = libc::stack_t {
                ss_sp: mem.as_mut_ptr() as *mut libc::c_void,
                ss_flags: 0,
                ss_size: mem.len(),
            };
            // SAFETY: stack_t is plain data; all-zero is a valid value to be overwritten.
            let mut old: libc::stack_t = unsafe { core::mem::zeroed() };
            // SAFETY: a valid stack_t for a buffer that outlives its use below.
            assert_eq!(unsafe { sigaltstack(&ss, &mut old) }, 0);
            let me = raw::gettid();
            assert_eq!(
                signal_stack_of(me),
                Some((mem.as_ptr() as usize, mem.len()))
            );
            // Restore the previous one (Rust's own guard stack, or none).
            // SAFETY: what the kernel handed back.
            assert_eq!(unsafe { sigaltstack(&old, core::ptr::null_mut()) }, 0);
            let disable = libc::stack_t {
                ss_sp: core::ptr::null_mut(),
                ss_flags: libc::SS_DISABLE,
                ss_size: 0,
            };
            // SAFETY: disabling takes no memory.
            assert_eq!(unsafe { sigaltstack(&disable, core::ptr::null_mut()) }, 0);
            assert_eq!(signal_stack_of(me), None);
        });
        t.join().unwrap();
    }
}
