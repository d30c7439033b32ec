//! What Linux and macOS share: POSIX pieces of the platform boundary that make no
//! platform-specific system call.

use super::Access;

/// Microseconds on the monotonic clock.
pub fn now_us() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec on this frame; CLOCK_MONOTONIC is always
    // valid, so errno is never written.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as f64 * 1e6 + ts.tv_nsec as f64 / 1e3
}

/// The disposition a write-fault handler is installed with, on either platform: with
/// `siginfo`, on the alternate signal stack when the thread has one (so a stack overflow
/// still reaches the previous handler), re-entrant (a fault inside a chained handler must
/// reach it again), with asynchronous signals blocked while a page is being claimed and
/// the synchronous ones left deliverable, so a fault inside a chained handler is
/// reported, not hidden.
pub fn fault_action(
    handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void),
) -> libc::sigaction {
    // SAFETY: sigaction is plain data; zeroed is a valid starting value, and the mask
    // calls only write the struct on this frame.
    unsafe {
        let mut action: libc::sigaction = core::mem::zeroed();
        action.sa_sigaction = handler as usize;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK | libc::SA_NODEFER;
        libc::sigfillset(&mut action.sa_mask);
        for sig in [
            libc::SIGSEGV,
            libc::SIGBUS,
            libc::SIGILL,
            libc::SIGFPE,
            libc::SIGTRAP,
        ] {
            libc::sigdelset(&mut action.sa_mask, sig);
        }
        action
    }
}

/// Passes a fault that is not memsnap's to the disposition installed before memsnap's
/// handler: that handler, with or without `siginfo`; for the default or ignore, the
/// default is put back and the handler returns, so the instruction faults again and the
/// process dies of its own signal, as it would have without memsnap.
///
/// # Safety
/// Called from a signal handler with the kernel's arguments; `previous` is the
/// disposition saved when memsnap's handler was installed.
pub unsafe fn chain(
    previous: &libc::sigaction,
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    let handler = previous.sa_sigaction;
    // SAFETY: a non-default, non-ignore disposition is a handler of the kind its
    // SA_SIGINFO flag says, installed by whoever was there before us; sigaction gets a
    // zeroed struct on this frame.
    unsafe {
        if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
            let mut default: libc::sigaction = core::mem::zeroed();
            default.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(signal, &default, core::ptr::null_mut());
        } else if previous.sa_flags & libc::SA_SIGINFO != 0 {
            let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                core::mem::transmute(handler);
            f(signal, info, context);
        } else {
            let f: extern "C" fn(libc::c_int) = core::mem::transmute(handler);
            f(signal);
        }
    }
}

/// The `PROT_*` bits for an access.
pub fn prot_bits(access: Access) -> i32 {
    match access {
        Access::Read { exec } => libc::PROT_READ | if exec { libc::PROT_EXEC } else { 0 },
        Access::ReadWrite { exec } => {
            libc::PROT_READ | libc::PROT_WRITE | if exec { libc::PROT_EXEC } else { 0 }
        }
    }
}

#[cfg(target_os = "macos")]
extern "C" {
    // In libSystem but not declared by the libc crate for Apple targets.
    fn pthread_attr_setstack(
        attr: *mut libc::pthread_attr_t,
        stack: *mut libc::c_void,
        size: libc::size_t,
    ) -> libc::c_int;
}
#[cfg(not(target_os = "macos"))]
use libc::pthread_attr_setstack;

/// Starts a library thread running `entry(arg)` on `[stack, stack + size)`, memory the
/// library mapped itself (glibc also places the thread's TCB, TLS and rseq area there, so
/// none of the thread's state is tracked). Every signal is blocked in the new thread so no
/// application signal handler ever runs on it.
///
/// # Safety
/// `[stack, stack + size)` is library-owned memory reserved for this thread forever, and
/// `entry(arg)` is sound to run on another thread.
pub unsafe fn spawn(
    stack: *mut u8,
    size: usize,
    entry: extern "C" fn(*mut libc::c_void) -> *mut libc::c_void,
    arg: *mut libc::c_void,
) -> Result<(), i32> {
    // SAFETY: plain pthread calls on attribute and signal-set objects on this stack frame;
    // the stack range is owned by the library for the life of the process.
    unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        let r = pthread_attr_setstack(&mut attr, stack as *mut libc::c_void, size);
        if r != 0 {
            libc::pthread_attr_destroy(&mut attr);
            return Err(r);
        }
        libc::pthread_attr_setdetachstate(&mut attr, libc::PTHREAD_CREATE_DETACHED);
        let mut all: libc::sigset_t = core::mem::zeroed();
        let mut old: libc::sigset_t = core::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        let mut thread: libc::pthread_t = core::mem::zeroed();
        let r = libc::pthread_create(&mut thread, &attr, entry, arg);
        libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut());
        libc::pthread_attr_destroy(&mut attr);
        if r != 0 {
            return Err(r);
        }
    }
    Ok(())
}

/// Has `before` run in the thread calling `fork()` just before it, then `parent` in the
/// parent and `child` in the child just after it (pthread_atfork: the child's handler
/// runs before `fork()` returns there, on the child's only thread).
pub fn on_fork(
    before: extern "C" fn(),
    parent: extern "C" fn(),
    child: extern "C" fn(),
) -> Result<(), i32> {
    // SAFETY: registering plain functions; pthread_atfork has no other preconditions.
    match unsafe { libc::pthread_atfork(Some(before), Some(parent), Some(child)) } {
        0 => Ok(()),
        e => Err(e),
    }
}
