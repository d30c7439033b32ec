//! The address space as the snapshot policy sees it on macOS: the region walk
//! (`mach_vm_region_recurse`), protection (`mach_vm_protect`) and discarding.
//!
//! How a Mach region maps onto [`Region`]:
//! - `read`/`write`/`exec` are the *current* protection; a region is only ever tracked
//!   when its current protection allows writing, and the walk reports `private` only when
//!   its *maximum* protection allows writing too, so memsnap never tracks memory it could
//!   not make writable again. Protection is restored per page from the engine's record of
//!   the region's execute bit: read-write, plus execute only where the page had it (never
//!   write+execute forced onto a page that did not have both: the hardened runtime
//!   refuses that).
//! - `private` also requires a copy-on-write or private share mode and an inheritance
//!   other than `VM_INHERIT_SHARE` (what `MAP_SHARED` sets).
//! - Kinds: thread stacks (`VM_MEMORY_STACK`, which libpthread also gives each thread's
//!   `pthread_t` and TSD) are reported as [`RegionKind::MainStack`], the kind the engine
//!   never tracks; the dyld shared region (a submap: the system libraries' data, their
//!   locks and the main thread's TSD), `MAP_JIT` regions (whose write permission is per
//!   thread) and this module's own memory as [`RegionKind::Kernel`]; file-backed regions
//!   as [`RegionKind::File`]; the rest as [`RegionKind::Anonymous`].

use super::super::{Access, Region, RegionKind};
const _: () = assert!(
    libc::PROT_READ == VM_PROT_READ
        && libc::PROT_WRITE == VM_PROT_WRITE
        && libc::PROT_EXEC == VM_PROT_EXECUTE
);
use mach2::kern_return::{
    KERN_INVALID_ADDRESS, KERN_NO_SPACE, KERN_PROTECTION_FAILURE, KERN_RESOURCE_SHORTAGE,
    KERN_SUCCESS,
};
use mach2::traps::mach_task_self;
use mach2::vm::{mach_vm_protect, mach_vm_region_recurse};
use mach2::vm_inherit::VM_INHERIT_SHARE;
use mach2::vm_prot::{VM_PROT_EXECUTE, VM_PROT_READ, VM_PROT_WRITE};
use mach2::vm_region::{
    vm_region_submap_info_64, SM_SHARED_ALIASED, SM_TRUESHARED, VM_REGION_FLAG_JIT_ENABLED,
};

/// `VM_MEMORY_STACK` from `<mach/vm_statistics.h>`.
const VM_MEMORY_STACK: u32 = 30;

/// Why the region walk could not produce a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// Kept for parity with Linux; the Mach walk needs no scratch memory.
    ScratchTooSmall,
    /// `mach_vm_region_recurse` failed; carries the `kern_return_t`.
    Io(i32),
}

/// One top-level VM map entry.
struct MachRegion {
    start: usize,
    end: usize,
    info: vm_region_submap_info_64,
}

/// The first region at or above `addr`, or `None` past the last one.
fn region_at(addr: usize) -> Result<Option<MachRegion>, i32> {
    let mut address = addr as u64;
    let mut size = 0u64;
    // Depth 0: the shared region is reported as one submap entry, not descended into.
    let mut depth = 0u32;
    let mut info = vm_region_submap_info_64::default();
    let mut count = vm_region_submap_info_64::count();
    // SAFETY: every out-pointer names a local of the type the call writes; `count` says
    // how many words `info` holds.
    let kr = unsafe {
        mach_vm_region_recurse(
            mach_task_self(),
            &mut address,
            &mut size,
            &mut depth,
            &mut info as *mut vm_region_submap_info_64 as *mut i32,
            &mut count,
        )
    };
    match kr {
        KERN_SUCCESS => Ok(Some(MachRegion {
            start: address as usize,
            end: (address + size) as usize,
            info,
        })),
        KERN_INVALID_ADDRESS => Ok(None),
        e => Err(e),
    }
}

fn to_region(r: &MachRegion) -> Region {
    let info = r.info;
    let prot = info.protection;
    let max = info.max_protection;
    let share = info.share_mode;
    let kind = if info.is_submap != 0 || info.flags & VM_REGION_FLAG_JIT_ENABLED != 0 {
        RegionKind::Kernel
    } else if info.user_tag == VM_MEMORY_STACK {
        RegionKind::MainStack
    } else if info.external_pager != 0 {
        RegionKind::File
    } else {
        RegionKind::Anonymous
    };
    Region {
        start: r.start,
        end: r.end,
        read: prot & VM_PROT_READ != 0,
        write: prot & VM_PROT_WRITE != 0,
        exec: prot & VM_PROT_EXECUTE != 0,
        private: info.is_submap == 0
            && max & VM_PROT_WRITE != 0
            && info.inheritance != VM_INHERIT_SHARE
            && share != SM_TRUESHARED
            && share != SM_SHARED_ALIASED,
        kind,
    }
}

/// Calls `f` for every mapping of the process in ascending address order, with the
/// library's own ranges split out and reported as [`RegionKind::Kernel`].
pub fn walk_regions(_scratch: &mut [u8], mut f: impl FnMut(Region)) -> Result<(), WalkError> {
    let own = super::shared();
    let mut addr = 0usize;
    while let Some(r) = region_at(addr).map_err(WalkError::Io)? {
        let region = to_region(&r);
        addr = r.end;
        let Some(s) = own else {
            f(region);
            continue;
        };
        // Split out the library's own ranges (at most two, disjoint).
        let mut cursor = region.start;
        let mut pieces: [(usize, usize); 2] = [(0, 0); 2];
        for (i, (b, l)) in s.own.iter().enumerate() {
            let b = b.load(core::sync::atomic::Ordering::Relaxed);
            let l = l.load(core::sync::atomic::Ordering::Relaxed);
            pieces[i] = (b.max(region.start), (b + l).min(region.end));
        }
        pieces.sort_unstable();
        for (b, e) in pieces {
            if b >= e {
                continue;
            }
            if b > cursor {
                f(Region {
                    start: cursor,
                    end: b,
                    ..region
                });
            }
            f(Region {
                start: b,
                end: e,
                private: false,
                kind: RegionKind::Kernel,
                ..region
            });
            cursor = e;
        }
        if cursor < region.end {
            f(Region {
                start: cursor,
                ..region
            });
        }
    }
    Ok(())
}

fn errno_of(kr: i32) -> i32 {
    match kr {
        KERN_PROTECTION_FAILURE => libc::EACCES,
        KERN_INVALID_ADDRESS => libc::EFAULT,
        KERN_NO_SPACE | KERN_RESOURCE_SHORTAGE => libc::EAGAIN,
        _ => libc::EINVAL,
    }
}

/// Changes the current protection of page-aligned `[addr, addr + len)`: read-only or
/// read-write, with execute exactly when `access` carries the page's own execute bit.
/// Fails (`EACCES`) rather than exceeding a region's maximum protection.
///
/// # Safety
/// The range holds no memory whose protection the Rust program relies on.
pub unsafe fn protect(addr: usize, len: usize, access: Access) -> Result<(), i32> {
    // Darwin's PROT_READ/WRITE/EXEC have the values of VM_PROT_READ/WRITE/EXECUTE.
    let prot = super::super::unix::prot_bits(access);
    // SAFETY: forwarded contract; set_maximum = false changes only the current protection.
    let kr = unsafe { mach_vm_protect(mach_task_self(), addr as u64, len as u64, 0, prot) };
    if kr == KERN_SUCCESS {
        Ok(())
    } else {
        Err(errno_of(kr))
    }
}

/// Returns anonymous pages to zero, keeping each region's current protection and VM tag:
/// macOS's `MADV_FREE` may keep the old contents, so the pages are replaced with fresh
/// ones. File-backed pieces are left alone (`ENOTSUP`): the file is not known here.
///
/// # Safety
/// Nothing relies on the current contents of `[addr, addr + len)`.
pub unsafe fn discard(addr: usize, len: usize) -> Result<(), i32> {
    let end = addr.saturating_add(len);
    let mut cursor = addr;
    let mut result = Ok(());
    while cursor < end {
        let Some(r) = region_at(cursor).map_err(errno_of)? else {
            break;
        };
        let (b, e) = (r.start.max(cursor), r.end.min(end));
        if b >= end {
            break;
        }
        if r.info.external_pager != 0 || r.info.is_submap != 0 {
            result = Err(libc::ENOTSUP);
        } else if b < e {
            let prot = r.info.protection & (VM_PROT_READ | VM_PROT_WRITE | VM_PROT_EXECUTE);
            // SAFETY: forwarded contract; MAP_FIXED replaces exactly `[b, e)`, which the
            // caller gives up; for MAP_ANON the descriptor carries the VM tag.
            let p = unsafe {
                libc::mmap(
                    b as *mut libc::c_void,
                    e - b,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANON | libc::MAP_FIXED,
                    libc::VM_MAKE_TAG(r.info.user_tag as u8) as i32,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                result = Err(libc::ENOMEM);
            }
        }
        cursor = r.end;
    }
    result
}
