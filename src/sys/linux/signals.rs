//! SIGSEGV capture for write faults on protected pages, and chaining to the handler that
//! was installed before ours.
//!
//! The handler runs on the faulting thread with every signal blocked (so no asynchronous
//! handler can run inside it and fault on a page it is halfway through claiming). It asks
//! the engine's callback whether the write was to tracked memory; if not, the fault is
//! passed on exactly as wasmtime does: to the previous `SA_SIGINFO` or plain handler, or,
//! when the previous disposition was the default (or ignore), by restoring that disposition
//! and returning, so that the instruction faults again and the process dies with its own
//! SIGSEGV, core dump and all.

use core::mem::MaybeUninit;

/// `si_code` of a fault on a mapped page without the needed permission (not in `libc`).
const SEGV_ACCERR: i32 = 2;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// The engine's decision function: `true` when the fault at this address was a write to
/// tracked memory and has been resolved, so the instruction can be retried.
pub type FaultCallback = fn(usize) -> bool;

static CALLBACK: AtomicUsize = AtomicUsize::new(0);
static INSTALLED: AtomicBool = AtomicBool::new(false);
// Written once by `install` before any tracked page is protected, read-only afterwards
// (the handler only reads it), so it may live in memory that later becomes tracked.
static mut PREVIOUS: MaybeUninit<libc::sigaction> = MaybeUninit::uninit();

/// Installs the SIGSEGV handler once per process. Later calls only swap the callback.
pub fn install(callback: FaultCallback) -> Result<(), i32> {
    CALLBACK.store(callback as usize, Ordering::Release);
    if INSTALLED.load(Ordering::Acquire) {
        return Ok(());
    }
    let action = super::super::fault_action(on_sigsegv);
    // SAFETY: sigaction structs are plain data; zeroed is a valid starting value. PREVIOUS
    // is written here only, before INSTALLED is published, on the single thread that
    // initializes the library.
    unsafe {
        let mut previous: libc::sigaction = core::mem::zeroed();
        if libc::sigaction(libc::SIGSEGV, &action, &mut previous) != 0 {
            return Err(*libc::__errno_location());
        }
        (*core::ptr::addr_of_mut!(PREVIOUS)).write(previous);
    }
    INSTALLED.store(true, Ordering::Release);
    Ok(())
}

/// Whether SIGSEGV still reaches our handler (someone may have replaced it since).
pub fn still_installed() -> bool {
    if !INSTALLED.load(Ordering::Acquire) {
        return false;
    }
    // SAFETY: querying the current disposition into a zeroed struct on this frame.
    unsafe {
        let mut current: libc::sigaction = core::mem::zeroed();
        libc::sigaction(libc::SIGSEGV, core::ptr::null(), &mut current) == 0
            && current.sa_sigaction == on_sigsegv as *const () as usize
    }
}

/// Decides from the saved register state whether the faulting access was a write.
/// Unknown layouts answer `true`: the engine then treats the fault as a write, which at
/// worst makes a page writable early.
///
/// # Safety
/// `context` is the `ucontext_t` the kernel passed to a SIGSEGV handler.
#[cfg(target_arch = "x86_64")]
unsafe fn is_write_fault(context: *mut libc::c_void) -> bool {
    // SAFETY: the kernel passes a valid ucontext_t; REG_ERR holds the page-fault error
    // code, whose bit 1 is set for writes.
    unsafe {
        let uc = &*(context as *const libc::ucontext_t);
        uc.uc_mcontext.gregs[libc::REG_ERR as usize] & 2 != 0
    }
}

/// # Safety
/// `context` is the `ucontext_t` the kernel passed to a SIGSEGV handler.
#[cfg(target_arch = "aarch64")]
unsafe fn is_write_fault(context: *mut libc::c_void) -> bool {
    const ESR_MAGIC: u32 = 0x4553_5201;
    // Offset of `__reserved` in the aarch64 `mcontext_t`: fault_address, regs[31], sp, pc,
    // pstate, then 16-byte alignment.
    const RESERVED_OFFSET: usize = 288;
    // SAFETY: the kernel passes a valid ucontext_t; the reserved area is a list of
    // {magic, size} records ending with magic 0, 4096 bytes at most.
    unsafe {
        let uc = &*(context as *const libc::ucontext_t);
        let base = (&uc.uc_mcontext as *const _ as *const u8).add(RESERVED_OFFSET);
        let mut off = 0usize;
        while off + 8 <= 4096 {
            let magic = (base.add(off) as *const u32).read_unaligned();
            let size = (base.add(off + 4) as *const u32).read_unaligned() as usize;
            if magic == 0 || size < 8 {
                break;
            }
            if magic == ESR_MAGIC {
                let esr = (base.add(off + 8) as *const u64).read_unaligned();
                let class = esr >> 26;
                // Data aborts from a lower or the same exception level; WnR is bit 6.
                return if class == 0x24 || class == 0x25 {
                    esr & (1 << 6) != 0
                } else {
                    false
                };
            }
            off += size;
        }
        true
    }
}

extern "C" fn on_sigsegv(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes valid siginfo/ucontext pointers to an SA_SIGINFO handler.
    unsafe {
        let code = (*info).si_code;
        let address = (*info).si_addr() as usize;
        if code == SEGV_ACCERR && is_write_fault(context) {
            let callback = CALLBACK.load(Ordering::Acquire);
            if callback != 0 {
                let callback: FaultCallback =
                    core::mem::transmute::<usize, FaultCallback>(callback);
                if callback(address) {
                    return;
                }
            }
        }
        delegate(signal, info, context);
    }
}

/// Passes a fault we do not own to whoever handled SIGSEGV before us.
///
/// # Safety
/// Called from the SIGSEGV handler with the kernel's arguments.
unsafe fn delegate(signal: i32, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: PREVIOUS was initialized before the handler was installed and is never
    // written again; the arguments are the kernel's.
    unsafe {
        let previous = &*(*core::ptr::addr_of!(PREVIOUS)).as_ptr();
        super::super::chain(previous, signal, info, context);
    }
}
