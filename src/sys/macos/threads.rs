//! Threads as the snapshot policy sees them on macOS: every other thread's stack pointer
//! (`task_threads` + `thread_get_state`), their ids (`THREAD_IDENTIFIER_INFO`, the same
//! ids `pthread_threadid_np` gives), the CPU time of exited threads (`task_info`), and the
//! controller's kernel-written areas.

use mach2::kern_return::KERN_SUCCESS;
use mach2::mach_port::mach_port_deallocate;
use mach2::mach_types::thread_act_t;
use mach2::message::mach_msg_type_number_t;
use mach2::task::{task_info, task_threads};
use mach2::task_info::{mach_task_basic_info, MACH_TASK_BASIC_INFO, MACH_TASK_BASIC_INFO_COUNT};
use mach2::thread_act::thread_get_state;
use mach2::traps::mach_task_self;
use mach2::vm::mach_vm_deallocate;

const THREAD_IDENTIFIER_INFO: u32 = 4;
/// `thread_identifier_info`: thread_id, thread_handle, dispatch_qaddr (u64 each).
const THREAD_IDENTIFIER_INFO_COUNT: u32 = 6;

/// The system-wide id of the thread behind `port` (what `pthread_threadid_np` reports).
pub(super) fn thread_id(port: thread_act_t) -> Option<u64> {
    extern "C" {
        // In libSystem; mach2 does not declare it. (Declared here, not at module level,
        // so that cbindgen keeps it out of the public header.)
        fn thread_info(
            target_act: thread_act_t,
            flavor: u32,
            thread_info_out: *mut i32,
            thread_info_out_cnt: *mut mach_msg_type_number_t,
        ) -> i32;
    }
    let mut info = [0u64; 3];
    let mut count = THREAD_IDENTIFIER_INFO_COUNT;
    // SAFETY: `info` holds THREAD_IDENTIFIER_INFO_COUNT words.
    let kr = unsafe {
        thread_info(
            port,
            THREAD_IDENTIFIER_INFO,
            info.as_mut_ptr() as *mut i32,
            &mut count,
        )
    };
    (kr == KERN_SUCCESS).then_some(info[0])
}

/// The stack pointer of a thread of this task (the kernel stops a running thread to read
/// it).
fn thread_sp(port: thread_act_t) -> Option<usize> {
    #[cfg(target_arch = "aarch64")]
    // ARM_THREAD_STATE64: x0-x28, fp, lr, sp, pc, cpsr, flags; sp is the 32nd u64.
    let (flavor, words, sp_index) = (6, 68u32, 31usize);
    #[cfg(target_arch = "x86_64")]
    // x86_THREAD_STATE64: rax, rbx, rcx, rdx, rdi, rsi, rbp, rsp, ...
    let (flavor, words, sp_index) = (4, 42u32, 7usize);
    let mut state = [0u64; 40];
    let mut count = words;
    // SAFETY: `state` holds at least `words` 32-bit words.
    let kr = unsafe { thread_get_state(port, flavor, state.as_mut_ptr() as *mut u32, &mut count) };
    (kr == KERN_SUCCESS && count == words).then_some(state[sp_index] as usize)
}

/// Calls `f` with the port of every thread of this task, then releases the ports and
/// the list. Nothing is allocated on the Rust heap: the kernel hands the list over as
/// fresh VM pages.
fn for_each_thread_port(mut f: impl FnMut(thread_act_t)) {
    let mut list: *mut thread_act_t = core::ptr::null_mut();
    let mut count: mach_msg_type_number_t = 0;
    // SAFETY: out-pointers to locals.
    if unsafe { task_threads(mach_task_self(), &mut list, &mut count) } != KERN_SUCCESS {
        return;
    }
    // SAFETY: task_threads returned `count` ports at `list`, which we now own: one send
    // right per port and the pages of the list.
    unsafe {
        let ports = core::slice::from_raw_parts(list, count as usize);
        for &p in ports {
            f(p);
        }
        for &p in ports {
            mach_port_deallocate(mach_task_self(), p);
        }
        mach_vm_deallocate(
            mach_task_self(),
            list as u64,
            (count as usize * core::mem::size_of::<thread_act_t>()) as u64,
        );
    }
}

/// Calls `f(tid, sp)` for every other thread of this process, except those `skip` names;
/// `sp == 0` when the thread's state cannot be read (it is exiting).
pub fn for_each_thread_sp(
    _scratch: &mut [u8],
    skip: impl Fn(u64) -> bool,
    mut f: impl FnMut(u64, usize),
) {
    let me = super::raw_tid();
    for_each_thread_port(|port| {
        let Some(id) = thread_id(port) else { return };
        if id == me || skip(id) {
            return;
        }
        f(id, thread_sp(port).unwrap_or(0));
    });
}

/// Waits (yielding, a bounded number of times) until two consecutive thread listings
/// agree, so that a thread that was just joined and is still finishing its exit in the
/// kernel is not counted by the next probe.
pub fn settle_threads(_scratch: &mut [u8]) {
    let list = || {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut n = 0u64;
        for_each_thread_port(|port| {
            if let Some(id) = thread_id(port) {
                h = (h ^ id).wrapping_mul(0x0100_0000_01b3);
                n += 1;
            }
        });
        (n, h)
    };
    let mut last = list();
    for _ in 0..1000 {
        super::yield_now();
        let now = list();
        if now == last {
            return;
        }
        last = now;
    }
}

/// CPU time, in nanoseconds, used by the process's threads that have exited, as
/// `(lower, upper)` bounds. Mach keeps this total itself (`mach_task_basic_info`'s user
/// and system time are those of terminated threads), so both bounds are the same value,
/// at microsecond resolution.
pub fn exited_threads_cpu_ns(_others: impl Iterator<Item = u64>) -> (i64, i64) {
    let mut info = mach_task_basic_info::default();
    let mut count = MACH_TASK_BASIC_INFO_COUNT;
    // SAFETY: `info` holds MACH_TASK_BASIC_INFO_COUNT words.
    let kr = unsafe {
        task_info(
            mach_task_self(),
            MACH_TASK_BASIC_INFO,
            &mut info as *mut mach_task_basic_info as *mut i32,
            &mut count,
        )
    };
    if kr != KERN_SUCCESS {
        return (0, 0);
    }
    let (u, s) = (info.user_time, info.system_time);
    let us = (u.seconds as i64 + s.seconds as i64) * 1_000_000
        + u.microseconds as i64
        + s.microseconds as i64;
    (us * 1000, us * 1000)
}

/// macOS threads keep their stacks, `pthread_t` and TSD in `VM_MEMORY_STACK` regions,
/// which the region walk leaves out by tag: there is no descriptor list to read.
#[derive(Clone, Copy, Debug)]
pub struct ThreadLayout;

impl ThreadLayout {
    pub fn probe(_rseq: Option<(isize, usize)>) -> Option<ThreadLayout> {
        None
    }

    pub fn for_each_block(
        &self,
        _readable: impl Fn(usize, usize) -> bool,
        _mapped: impl Fn(usize) -> bool,
        _f: impl FnMut(crate::sys::ThreadBlock),
    ) -> Result<(), &'static str> {
        Ok(())
    }
}

/// Other threads' signal stacks are not recorded on macOS (their stacks are untracked
/// stack regions already).
pub fn signal_stack_of(_tid: u64) -> Option<(usize, usize)> {
    None
}

/// No restartable-sequences area on macOS.
pub fn rseq_layout() -> Option<(isize, usize)> {
    None
}

pub fn current_rseq_area(_layout: Option<(isize, usize)>) -> Option<(usize, usize)> {
    None
}

/// The address of the calling thread's `errno`.
pub fn current_errno_location() -> usize {
    // SAFETY: __error has no preconditions.
    unsafe { libc::__error() as usize }
}

/// The calling thread's alternate signal stack, if one is installed: the kernel writes
/// signal frames there, which it cannot do on a write-protected page.
pub fn current_signal_stack() -> Option<(usize, usize)> {
    // SAFETY: querying into a zeroed stack_t on this frame.
    unsafe {
        let mut ss: libc::stack_t = core::mem::zeroed();
        if libc::sigaltstack(core::ptr::null(), &mut ss) != 0
            || ss.ss_flags & libc::SS_DISABLE != 0
            || ss.ss_sp.is_null()
        {
            return None;
        }
        Some((ss.ss_sp as usize, ss.ss_size))
    }
}

/// The current stack pointer (approximately: the address of a local).
#[inline(never)]
pub fn current_sp() -> usize {
    let marker = 0u8;
    core::hint::black_box(&marker) as *const u8 as usize
}
