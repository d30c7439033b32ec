//! The platform boundary: region walk, protect/unprotect, fault capture, thread stacks,
//! page size, and the few primitives (futex, clock, raw stderr) the engine needs. One file
//! per platform below this module; nothing here knows about checkpoints.

mod unix;
pub use unix::{chain, fault_action, now_us, on_fork, spawn};

// The Mach exception-message seam: used by the macOS backend, unit-tested everywhere.
#[cfg(any(target_os = "macos", test))]
mod mach_exc;
// The macOS region classifier and exception-server decisions: pure, unit-tested everywhere.
#[cfg(any(target_os = "macos", test))]
mod mach_regions;
#[cfg(any(target_os = "macos", test))]
mod mach_serve;
// libmemsnap's own writable segments in a Mach-O image: pure, unit-tested everywhere.
#[cfg(any(target_os = "macos", test))]
mod mach_image;

// The userfaultfd types the engine names on every platform.
mod uffd_types;
pub use uffd_types::{AtomicFd, PagemapFd, UffdCounters, UffdFd, UffdMode, UffdSupport};

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as platform;

#[cfg(target_os = "macos")]
mod macos;
#[cfg(target_os = "macos")]
use macos as platform;

// What every platform offers the engine, by topic. One list for both, so that an item one
// platform lacks fails that platform's build here.
pub use platform::{
    cpu_count, max_map_count, os_page_size, pid, prepare, resident_private_bytes, tid,
};
// The library's own memory, and the host's.
pub use platform::{
    discard, for_each_own_writable_segment, for_each_writable_mapping, lower_program_break,
    map_with_hint, pin_allocator, program_break, protect, release, reserve, walk_regions,
    WalkError,
};
// Fault capture.
pub use platform::{fault_handler_installed, install_fault_handler, FaultCallback};
// Threads: their stacks, the C library's layout, and the library's own threads.
pub use platform::{
    current_errno_location, current_rseq_area, current_signal_stack, current_sp,
    exited_threads_cpu_ns, for_each_thread_sp, rseq_layout, settle_threads, signal_stack_of,
    thread_stack_bytes, ThreadLayout,
};
// Primitives the fault path may call: no allocation, no locks.
pub use platform::{abort, futex_wait, futex_wake, sleep_ns, write_stderr, yield_now};
// Binding memsnap's lazy symbol slots before anything is write-protected.
pub use platform::bind_exports;
// userfaultfd write protection and PAGEMAP_SCAN (stand-ins that fail on macOS).
pub use platform::{
    pagemap_close, pagemap_open, scan_populated, scan_written, uffd_close, uffd_disarm_quietly,
    uffd_open, uffd_protect, uffd_register, uffd_serve, uffd_support, uffd_unregister,
};

// Linux only: the raw system calls the host-call wrappers (`engine/host`) make.
#[cfg(target_os = "linux")]
pub use linux::raw;

// macOS only: the exception server's callback for faults it resolves on its own thread.
#[cfg(target_os = "macos")]
pub use macos::{set_served_fault_callback, ServedFaultCallback};

/// Which write-tracking mechanism is active; reported by the stats call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// Tracking is not armed yet (no snapshot taken).
    None = 0,
    /// Linux: pages write-protected with `mprotect`, faults caught as SIGSEGV.
    LinuxMprotect = 1,
    /// macOS: pages protected with `mach_vm_protect`, faults caught on a Mach exception port.
    MacExceptionPort = 2,
    /// macOS: pages protected with `mach_vm_protect`, faults caught as SIGBUS/SIGSEGV.
    MacSignal = 3,
    /// Linux: userfaultfd write protection, faults served by a library thread (private
    /// file mappings stay on mprotect).
    LinuxUffd = 4,
    /// Linux: asynchronous userfaultfd write protection, written pages found with
    /// PAGEMAP_SCAN at each checkpoint.
    LinuxUffdAsync = 5,
}

/// The write-tracking mechanism in use (`Backend::None` on macOS until the first snapshot
/// installs its fault capture, which picks the exception port or the signal fallback).
#[cfg(target_os = "linux")]
pub fn backend() -> Backend {
    linux::BACKEND
}

/// See the Linux variant.
#[cfg(target_os = "macos")]
pub fn backend() -> Backend {
    macos::active_backend()
}

/// A page protection the engine asks for; `exec` carries the region's original execute bit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    Read { exec: bool },
    ReadWrite { exec: bool },
}

/// What backs a mapping, as far as the snapshot policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionKind {
    Anonymous,
    /// The brk heap.
    Heap,
    /// The initial thread's stack.
    MainStack,
    /// Pages the kernel provides (vdso and friends): never tracked.
    Kernel,
    File,
}

/// One mapping reported by the region walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    pub start: usize,
    pub end: usize,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub private: bool,
    pub kind: RegionKind,
}

/// One thread's memory as glibc describes it (Linux; see `linux/glibc.rs`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ThreadBlock {
    /// The kernel's id for the thread (0 once it has exited, or for a cached stack).
    pub tid: u32,
    /// The descriptor's address (`pthread_t`).
    pub pd: usize,
    /// The stack, `[start, end)`: from `stackblock` (guard included) to the static TLS.
    /// Empty for the initial thread, whose stack is the kernel's `[stack]` mapping.
    pub stack: (usize, usize),
    /// The whole block glibc mapped (stack, TLS and descriptor), for cached stacks.
    pub block: (usize, usize),
    /// The 4-byte `tid` word.
    pub tid_word: usize,
    /// The rseq area, when glibc registers one.
    pub rseq: Option<(usize, usize)>,
    /// On glibc's stack cache: no thread runs on it, the next `pthread_create` may.
    pub cached: bool,
}
