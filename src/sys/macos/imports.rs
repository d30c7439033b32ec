//! Binds libmemsnap's own lazy imports before anything is protected.
//!
//! The dylib's calls into libSystem go through lazy stubs: the first call of each runs
//! dyld's binder, which takes dyld's lock and writes the stub's pointer in libmemsnap's
//! `__DATA` (`__la_symbol_ptr`). Whole-process mode tracks that segment, so a first call
//! made after the first snapshot writes a protected page: on the exception server's
//! thread that fault is delivered to the server itself (a deadlock), and on any thread
//! dyld's lock may be held by the thread that faulted. `-bind_at_load` would make dyld
//! bind them all when it loads the dylib, but zig's linker (`make apple`) rejects the
//! flag ("unsupported linker arg"), so the functions the fault paths (the exception
//! server, the signal handler, the engine's fault and misuse paths) call are resolved here
//! instead, at installation: each is called once with harmless arguments, which binds its
//! stub, and `abort`, which cannot be called ahead, is looked up with `dlsym` and called
//! through that pointer (see [`super::abort`]). A new call on those paths belongs here.

use mach2::message::{
    mach_msg, mach_msg_destroy, mach_msg_header_t, MACH_RCV_MSG, MACH_RCV_TIMEOUT,
};
use mach2::port::MACH_PORT_NULL;
use mach2::thread_act::{thread_get_state, thread_set_state};
use mach2::traps::mach_task_self;
use mach2::vm::mach_vm_protect;

/// Binds every lazy import the fault paths use, and returns `abort`'s address (0 if
/// `dlsym` does not find it). Call before the first page is protected.
pub(super) fn bind_fault_path_imports() -> usize {
    extern "C" {
        fn pid_for_task(task: u32, pid: *mut libc::c_int) -> i32;
    }
    let mut state = [0u32; 4];
    let mut count = 4u32;
    let mut header = [0u8; 24];
    let mut bytes = [0u8; 8];
    let mut pid = 0;
    // SAFETY: every call names no object (MACH_PORT_NULL, a zero-length range or
    // write, an empty header whose bits carry no rights) or works on locals: each fails
    // or does nothing, and binds its stub on the way.
    unsafe {
        let task = mach_task_self();
        let h = header.as_mut_ptr() as *mut mach_msg_header_t;
        mach_msg(
            h,
            MACH_RCV_MSG | MACH_RCV_TIMEOUT,
            0,
            24,
            MACH_PORT_NULL,
            0,
            0,
        );
        header = [0u8; 24];
        mach_msg_destroy(header.as_mut_ptr() as *mut mach_msg_header_t);
        mach2::mach_port::mach_port_deallocate(task, MACH_PORT_NULL);
        thread_get_state(MACH_PORT_NULL, 1, state.as_mut_ptr(), &mut count);
        thread_set_state(MACH_PORT_NULL, 1, state.as_mut_ptr(), 0);
        pid_for_task(MACH_PORT_NULL, &mut pid);
        mach_vm_protect(task, 0, 0, 0, 0);
        libc::getpid();
        libc::sched_yield();
        libc::write(2, bytes.as_ptr() as *const libc::c_void, 0);
        libc::memcpy(
            bytes.as_mut_ptr() as *mut libc::c_void,
            state.as_ptr() as *const libc::c_void,
            4,
        );
        libc::memmove(
            bytes.as_mut_ptr() as *mut libc::c_void,
            bytes.as_ptr().add(4) as *const libc::c_void,
            4,
        );
        libc::memset(bytes.as_mut_ptr() as *mut libc::c_void, 0, 8);
        libc::__error();
        core::hint::black_box((&header, &bytes, &pid));
    }
    super::threads::thread_id(MACH_PORT_NULL);
    super::raw_tid();
    // SAFETY: dlsym with a NUL-terminated name; the answer is checked by the caller.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"abort".as_ptr()) as usize }
}
