//! userfaultfd write protection: the kernel-assisted write tracking of the Linux backend.
//! This module owns the userfaultfd side of it, one job per file:
//! - `uapi`: the numbers and structs of linux/userfaultfd.h;
//! - `probe`: what the kernel and our privileges allow, probed once and cached;
//! - `ioctl`: opening a userfaultfd, registering, arming and disarming ranges;
//! - `server`: the sync-mode fault server loop.
//!
//! Async mode reads the written pages back with PAGEMAP_SCAN, which is a /proc/self/pagemap
//! ioctl and not userfaultfd: it lives in `../pagemap.rs`.
//!
//! Why it exists next to `mprotect` + SIGSEGV:
//! - Kernel writes. A `read(2)` into a page armed with `mprotect` fails with EFAULT (the
//!   kernel does not raise SIGSEGV for its own accesses). A page armed with userfaultfd
//!   write protection makes the kernel block in the copy until the fault server disarms
//!   the page (sync mode), or resolve the fault by itself (async mode), so such writes
//!   succeed. The exception: when only `UFFD_USER_MODE_ONLY` was allowed, kernel faults
//!   are not delivered and the write fails with EFAULT, as with `mprotect`.
//! - Async mode (`UFFD_FEATURE_WP_ASYNC`, Linux 6.7) has no fault messages at all: a write
//!   clears the page's protection in the fault path (about 0.9 us per page here), and
//!   PAGEMAP_SCAN reports the written pages and re-arms them in one call.
//! - No VMA splitting: protection lives in the page tables, not in `vm_area_struct`s, so
//!   arming scattered pages does not approach `vm.max_map_count`.
//!
//! What registers: anonymous private memory, shmem and hugetlbfs (the latter two only with
//! `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`) in both modes; private file mappings only in async
//! mode (sync registration fails with EINVAL there).
//!
//! Cost that shapes the server loop: a fault served by a server thread that sleeps in
//! `poll()` on another CPU costs about 55 us (the cross-CPU wake-up dominates), 18 us when
//! the server spins on non-blocking `read()`, 9 us on the same CPU. Hence
//! [`uffd_serve`] keeps reading without sleeping for a while after each batch.
//!
//! Everything here is stateless after the probe: the library's own .data/.bss is tracked
//! memory in whole-process mode, so the fds and counters live in the engine's memory and
//! are passed in. Only [`uffd_support`] writes statics, on its first call, which the
//! engine makes before the first snapshot. No allocation, no locks; system calls are raw
//! (errno is returned, never written).
//!
//! After `fork`, the child's mappings are no longer registered and its pages no longer
//! armed (we do not ask for `UFFD_FEATURE_EVENT_FORK`), and the inherited userfaultfd
//! belongs to the parent's address space: the child closes it and starts over.

mod ioctl;
mod probe;
mod server;
mod uapi;

#[cfg(test)]
mod tests;

pub use ioctl::{
    uffd_close, uffd_disarm_quietly, uffd_open, uffd_protect, uffd_register, uffd_unregister,
};
pub use probe::uffd_support;
pub use server::uffd_serve;
