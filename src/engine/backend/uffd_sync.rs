//! The synchronous userfaultfd backend (Linux): a tracked page stays PROT_WRITE and is
//! armed by the uffd-wp bit in its page-table entry. A write to an armed page (the
//! kernel's own, inside a system call, included) blocks the writing thread and queues a
//! message, which a library thread, the fault server, answers by saving the pre-image and
//! disarming the page, which wakes the writer.
//!
//! No mapping splits and system calls just work; the price is a cross-thread round trip
//! per fault, which is why the server spins briefly after each message before sleeping.
//! Private file mappings (the `.data` of loaded objects) cannot register in this mode and
//! stay on mprotect.
//!
//! This file owns the fault server (its thread, stack and counters), the mode's
//! protection changes, its probe for memory that lost its registration, and its repairs
//! in a fork child. The server keeps to the engine's rules: no allocation, no locks a
//! writer could hold, no tracked memory.

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::super::ranges::Range;
use super::super::Engine;
use crate::sys;

/// Stack of the fault server thread.
const SERVER_STACK_BYTES: usize = 256 << 10;

/// How long the fault server keeps polling for the next message before sleeping, unless
/// `MEMSNAP_UFFD_SPIN_US` says otherwise. Waking a sleeping server from another CPU costs
/// tens of microseconds; spinning a little catches bursts of faults without that cost.
const DEFAULT_SPIN_NS: u64 = 50_000;

/// The fault server's state, in the engine's own block.
pub(super) struct Server {
    spin_ns: AtomicU64,
    started: AtomicBool,
    pub(super) counters: sys::UffdCounters,
}

impl Server {
    pub(super) fn new(spin_ns: Option<u64>) -> Self {
        Server {
            spin_ns: AtomicU64::new(spin_ns.unwrap_or(DEFAULT_SPIN_NS)),
            started: AtomicBool::new(false),
            counters: sys::UffdCounters::default(),
        }
    }
}

/// Arms (`write` false) or disarms `[start, start + len)`; disarming wakes a writer
/// blocked on it.
///
/// # Safety
/// As for `Engine::set_access`.
pub(super) unsafe fn set_access(
    fd: sys::UffdFd,
    start: usize,
    len: usize,
    write: bool,
) -> Result<(), i32> {
    // SAFETY: per this function's contract.
    unsafe { sys::uffd_protect(fd, start, len, !write) }
}

/// Disarms `[start, start + len)` for a restore to write into, without waking a writer
/// blocked on it: its write must wait until the page holds its restored bytes and is
/// armed again, then be served as a first write.
///
/// # Safety
/// As for `Engine::set_access`.
pub(super) unsafe fn open_for_restore(
    fd: sys::UffdFd,
    start: usize,
    len: usize,
) -> Result<(), i32> {
    // SAFETY: per this function's contract.
    unsafe { sys::uffd_disarm_quietly(fd, start, len) }
}

impl Engine {
    /// Starts the fault server on a stack the library maps for itself.
    pub(super) fn start_fault_server(&self, function: &str) {
        if self.backend.server.started.swap(true, Ordering::AcqRel) {
            return;
        }
        let bytes = sys::thread_stack_bytes(SERVER_STACK_BYTES);
        let Some(stack) = sys::reserve(bytes) else {
            crate::fatal!(function, "cannot map the fault server's stack")
        };
        self.meta.lock().add_own(crate::mem::Reservation {
            base: stack as usize,
            len: bytes,
        });
        let before = self.workers.registered();
        // SAFETY: the stack is library memory reserved for this thread forever; the
        // entry point only reads the never-freed engine.
        if let Err(e) = unsafe {
            sys::spawn(
                stack,
                bytes,
                server_main,
                self as *const Engine as *mut libc::c_void,
            )
        } {
            crate::fatal!(
                function,
                "cannot start the userfaultfd fault server (error {})",
                e
            );
        }
        self.workers.wait_registered(before + 1);
    }

    /// The server's callback: `None` while the write must wait for changes to be allowed
    /// again (the server keeps it pending and serves the next faults meanwhile, so a
    /// write by the thread that disallowed them is still seen and refused).
    fn serve_fault(&self, addr: usize, tid: u64) -> Option<bool> {
        // Named as the original names its fault path, whatever caught the fault.
        self.resolve_gated("HandleDirtyMemoryFault", addr, tid, true, false)
    }

    /// Whether `piece` of a userfaultfd-guarded region is still registered. One page is
    /// probed without disturbing its state: a clean unit is armed again, which is a
    /// no-op on registered memory and fails on unregistered memory; a piece without a
    /// clean unit was just re-armed by its checkpoint, which fails the same way.
    pub(super) fn sync_piece_registered(&self, fd: sys::UffdFd, piece: Range) -> bool {
        let mut u = self.page_base(piece.start);
        while u < piece.end {
            let st = self.table.get(u);
            if st.tracked() && st.slot().is_none() && !st.busy() {
                // SAFETY: a clean tracked unit, armed already (arming it is a no-op).
                return unsafe { sys::uffd_protect(fd, u, self.settings.page, true) }
                    != Err(libc::ENOENT);
            }
            u += self.settings.page;
        }
        true
    }

    /// In a fork child, before anything is armed: the child gets a fault server of its
    /// own. (Creating the thread writes glibc's thread list, which may be tracked
    /// memory, and no server would be there to answer.)
    pub(super) fn sync_after_fork_in_child(&self, function: &str) {
        self.backend.server.started.store(false, Ordering::Release);
        // The parent's library threads are not the child's (and their records would
        // fill the table after a few generations of forks).
        self.workers.forget_threads();
        self.start_fault_server(function);
    }

    /// In a fork child, after `r` was armed whole: disarms its dirty units again (their
    /// pre-images are saved, so their writes need no fault).
    pub(super) fn sync_disarm_dirty(&self, fd: sys::UffdFd, r: Range) {
        let mut u = r.start;
        while u < r.end {
            if self.table.get(u).slot().is_some() {
                // SAFETY: a dirty unit: its pre-image is saved.
                let _ = unsafe { sys::uffd_protect(fd, u, self.settings.page, false) };
            }
            u += self.settings.page;
        }
    }
}

extern "C" fn server_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: the argument is the never-freed engine.
    let engine: &'static Engine = unsafe { &*(arg as *const Engine) };
    engine.workers.register_own_thread();
    let server = &engine.backend.server;
    let fd = engine.backend.fd();
    let spin = server.spin_ns.load(Ordering::Relaxed);
    sys::uffd_serve(fd, spin, &server.counters, &|addr, tid| {
        engine.serve_fault(addr, tid)
    })
}
