//! The mprotect backend (and macOS's `mach_vm_protect`, behind the same `sys::protect`):
//! a tracked page is armed by making it read-only, so that the first write to it faults
//! on the writing thread; the fault handler (`fault`) saves the pre-image and disarms the
//! page by making it writable again.
//!
//! It is the backend that works everywhere, and under a userfaultfd backend it still
//! guards the memory the userfaultfd cannot take (private file mappings in sync mode,
//! the parts of a region that share a snapshot page with other memory). Its costs, which
//! the rest of the engine works around, follow from protection living in the mappings:
//! a system call writing an armed page fails with EFAULT instead of faulting
//! (`memsnap_prepare_write`), and every isolated writable page splits a mapping, which
//! `vm.max_map_count` bounds (`fault`'s block captures). A clean page that the program
//! unmapped and mapped afresh is writable, which is how the region walk notices it
//! (`scan`).

use crate::sys::{self, Access};

/// Arms (`write` false) or disarms `[start, start + len)`, keeping the region's execute
/// bit.
///
/// # Safety
/// As for `Engine::set_access`: tracked host memory whose protection the engine owns,
/// whose pre-images are saved when `write` is true.
pub(super) unsafe fn set_access(
    start: usize,
    len: usize,
    exec: bool,
    write: bool,
) -> Result<(), i32> {
    let access = if write {
        Access::ReadWrite { exec }
    } else {
        Access::Read { exec }
    };
    // SAFETY: per this function's contract.
    unsafe { sys::protect(start, len, access) }
}
