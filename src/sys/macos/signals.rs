//! The fallback fault capture on macOS: SIGBUS (what a write to a write-protected page
//! raises) and SIGSEGV handlers, used when exception ports are not usable (hardened
//! runtime, `MEMSNAP_FAULT_CAPTURE=signal`, a forked child), and installed behind the
//! exception port too, where they catch the faults the server answers `KERN_FAILURE`
//! (a fork child's, before its atfork handler switched it to signals). Chaining follows the Linux
//! handler (and wasmtime): a fault that is not ours goes to the previous `SA_SIGINFO` or
//! plain handler, or the previous default disposition is restored and the instruction
//! faults again, so the process dies of its own signal.

use super::super::mach_exc::{is_write_arm64, is_write_x86_64};
use super::super::mach_serve::untag;
use super::{shared, Shared};
use core::sync::atomic::Ordering;

const SIGNALS: [i32; 2] = [libc::SIGBUS, libc::SIGSEGV];

/// Installs both handlers, keeping the previous dispositions in `s`; again (in a fork
/// child) when someone replaced them since.
pub(super) fn install(s: &Shared) -> Result<(), i32> {
    if s.signals_installed.load(Ordering::Acquire) && still_installed() {
        return Ok(());
    }
    let action = super::super::fault_action(on_fault);
    // SAFETY: sigaction structs are plain data; zeroed is a valid starting value.
    // `previous` is written here only: before `signals_installed` is published, by the
    // thread that installs the handler, or again by the only thread of a fork child.
    unsafe {
        let previous = &mut *s.previous.get();
        for (i, sig) in SIGNALS.into_iter().enumerate() {
            let mut old: libc::sigaction = core::mem::zeroed();
            if libc::sigaction(sig, &action, &mut old) != 0 {
                return Err(*libc::__error());
            }
            previous[i].write(old);
        }
    }
    s.signals_installed.store(true, Ordering::Release);
    Ok(())
}

/// Whether both signals still reach our handler.
pub(super) fn still_installed() -> bool {
    SIGNALS.into_iter().all(|sig| {
        // SAFETY: querying the current disposition into a zeroed struct on this frame.
        unsafe {
            let mut current: libc::sigaction = core::mem::zeroed();
            libc::sigaction(sig, core::ptr::null(), &mut current) == 0
                && current.sa_sigaction == on_fault as *const () as usize
        }
    })
}

/// Whether the saved exception state says the faulting access was a write.
///
/// # Safety
/// `context` is the `ucontext_t` the kernel passed to an `SA_SIGINFO` handler.
unsafe fn is_write_fault(context: *mut libc::c_void) -> bool {
    // SAFETY: on both architectures `uc_mcontext` points at a `__darwin_mcontext64`
    // whose first 16 bytes are the exception state (`__es`).
    let es = unsafe {
        let mc = (*(context as *const libc::ucontext_t)).uc_mcontext as *const u32;
        [
            mc.read(),
            mc.add(1).read(),
            mc.add(2).read(),
            mc.add(3).read(),
        ]
    };
    if cfg!(target_arch = "aarch64") {
        is_write_arm64(es)
    } else {
        is_write_x86_64(es)
    }
}

extern "C" fn on_fault(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo/ucontext pointers to an SA_SIGINFO handler.
    unsafe {
        if let Some(s) = shared() {
            if is_write_fault(context) {
                if let Some(callback) = s.callback() {
                    let addr = untag((*info).si_addr as usize, cfg!(target_arch = "aarch64"));
                    if callback(addr) {
                        return;
                    }
                }
            }
            delegate(s, signal, info, context);
        }
    }
}

/// Passes a fault we do not own to whoever handled the signal before us.
///
/// # Safety
/// Called from the handler with the kernel's arguments, after `install` completed.
unsafe fn delegate(s: &Shared, signal: i32, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let i = usize::from(signal != libc::SIGBUS);
    // SAFETY: `previous` was initialized before the handler was installed and is never
    // written again; the arguments are the kernel's.
    unsafe {
        let previous = (*s.previous.get())[i].assume_init_ref();
        super::super::chain(previous, signal, info, ctx);
    }
}
