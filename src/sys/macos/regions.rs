//! The address space as the snapshot policy sees it on macOS: the region walk
//! (`mach_vm_region_recurse`), protection (`mach_vm_protect`) and discarding.
//!
//! The walk reads each depth-0 entry into a [`RegionRecord`] and hands the records to
//! the pure classifier (`sys::mach_regions`, unit-tested on Linux), which says what is
//! trackable and cuts out what never is: the shared region by its whole range (see
//! [`shared_cache_range`]) and this module's own memory. Protection is restored per
//! page from the engine's record of the region's execute bit: read-write, plus execute
//! only where the page had it (never write+execute forced onto a page that did not have
//! both: the hardened runtime refuses that).

use super::super::mach_regions::{self, classify_all, errno_of, Policy, RegionRecord};
use super::super::{Access, Region};
const _: () = assert!(
    libc::PROT_READ == VM_PROT_READ
        && libc::PROT_WRITE == VM_PROT_WRITE
        && libc::PROT_EXEC == VM_PROT_EXECUTE
);
// The pure classifier's copies of xnu's constants are mach2's.
const _: () = assert!(
    mach_regions::VM_PROT_READ == VM_PROT_READ
        && mach_regions::VM_PROT_WRITE == VM_PROT_WRITE
        && mach_regions::VM_PROT_EXECUTE == VM_PROT_EXECUTE
        && mach_regions::VM_INHERIT_SHARE == VM_INHERIT_SHARE
        && mach_regions::SM_TRUESHARED == SM_TRUESHARED
        && mach_regions::SM_SHARED_ALIASED == SM_SHARED_ALIASED
        && mach_regions::KERN_INVALID_ADDRESS == KERN_INVALID_ADDRESS
        && mach_regions::KERN_PROTECTION_FAILURE == KERN_PROTECTION_FAILURE
        && mach_regions::KERN_NO_SPACE == KERN_NO_SPACE
        && mach_regions::KERN_RESOURCE_SHORTAGE == KERN_RESOURCE_SHORTAGE
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

/// Why the region walk could not produce a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// Kept for parity with Linux; the Mach walk needs no scratch memory.
    ScratchTooSmall,
    /// `mach_vm_region_recurse` failed; carries the `kern_return_t`.
    Io(i32),
}

/// The first region at or above `addr`, or `None` past the last one.
fn region_at(addr: usize) -> Result<Option<RegionRecord>, i32> {
    let mut address = addr as u64;
    let mut size = 0u64;
    // Depth 0: the shared region is reported as submap entries, not descended into.
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
        KERN_SUCCESS => Ok(Some(RegionRecord {
            start: address as usize,
            end: (address + size) as usize,
            protection: info.protection,
            max_protection: info.max_protection,
            inheritance: info.inheritance,
            share_mode: info.share_mode,
            is_submap: info.is_submap != 0,
            user_tag: info.user_tag,
            external_pager: info.external_pager != 0,
            // mach2's `flags` is padding in xnu-11417's layout (`osfmk/mach/vm_region.h`),
            // which the kernel leaves zero: the classifier does not rely on it.
            jit_flag: info.flags & VM_REGION_FLAG_JIT_ENABLED != 0,
        })),
        KERN_INVALID_ADDRESS => Ok(None),
        e => Err(e),
    }
}

/// The dyld shared cache's range, `[start, end)`, excluded from tracking as a whole (see
/// `mach_regions::classify_all` for why the submap entries alone are not enough).
/// `_dyld_get_shared_cache_range` (libdyld, macOS 10.15 and later) is looked up with
/// `dlsym`, which takes dyld's lock: call this only while no page is protected (the fault
/// capture's installation caches it for the walks that follow). Older x86_64 systems get
/// the kernel's whole reservation for the shared region.
pub(super) fn shared_cache_range() -> (usize, usize) {
    type RangeFn = unsafe extern "C" fn(length: *mut usize) -> *const libc::c_void;
    // SAFETY: dlsym with a NUL-terminated name; a null answer is checked.
    let f = unsafe { libc::dlsym(libc::RTLD_DEFAULT, c"_dyld_get_shared_cache_range".as_ptr()) };
    if f.is_null() {
        let (base, len) = if cfg!(target_arch = "aarch64") {
            mach_regions::SHARED_REGION_ARM64
        } else {
            mach_regions::SHARED_REGION_X86_64
        };
        return (base, base + len);
    }
    // SAFETY: the symbol is dyld's `const void *_dyld_get_shared_cache_range(size_t *)`.
    let f: RangeFn = unsafe { core::mem::transmute::<*mut libc::c_void, RangeFn>(f) };
    let mut len = 0usize;
    // SAFETY: writes the length into a local; returns null when there is no cache.
    let start = unsafe { f(&mut len) } as usize;
    if start == 0 {
        (0, 0)
    } else {
        (start, start.saturating_add(len))
    }
}

/// Calls `f` for every mapping of the process in ascending address order, classified by
/// `sys::mach_regions`, with the shared cache and the library's own ranges reported as
/// [`super::super::RegionKind::Kernel`].
pub fn walk_regions(_scratch: &mut [u8], f: impl FnMut(Region)) -> Result<(), WalkError> {
    let own = super::shared();
    let load = |(b, l): &(
        core::sync::atomic::AtomicUsize,
        core::sync::atomic::AtomicUsize,
    )| {
        let b = b.load(core::sync::atomic::Ordering::Relaxed);
        (b, b + l.load(core::sync::atomic::Ordering::Relaxed))
    };
    let policy = Policy {
        excluded: match own {
            Some(s) => [s.shared_cache(), load(&s.own[0]), load(&s.own[1])],
            None => [shared_cache_range(), (0, 0), (0, 0)],
        },
        wx_is_jit: cfg!(target_arch = "aarch64"),
    };
    let mut addr = 0usize;
    let mut failed = None;
    let records = core::iter::from_fn(|| match region_at(addr) {
        Ok(Some(r)) => {
            addr = r.end;
            Some(r)
        }
        Ok(None) => None,
        Err(e) => {
            failed = Some(e);
            None
        }
    });
    classify_all(records, &policy, f);
    failed.map_or(Ok(()), |e| Err(WalkError::Io(e)))
}

/// Changes the current protection of page-aligned `[addr, addr + len)`: read-only or
/// read-write, with execute exactly when `access` carries the page's own execute bit.
/// Fails (`EACCES`) rather than exceeding a region's maximum protection, and with
/// `ENOMEM` where the range is no longer mapped, as `mprotect` does.
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
        if r.external_pager || r.is_submap {
            result = Err(libc::ENOTSUP);
        } else if b < e {
            let prot = r.protection & (VM_PROT_READ | VM_PROT_WRITE | VM_PROT_EXECUTE);
            // SAFETY: forwarded contract; MAP_FIXED replaces exactly `[b, e)`, which the
            // caller gives up; for MAP_ANON the descriptor carries the VM tag.
            let p = unsafe {
                libc::mmap(
                    b as *mut libc::c_void,
                    e - b,
                    prot,
                    libc::MAP_PRIVATE | libc::MAP_ANON | libc::MAP_FIXED,
                    libc::VM_MAKE_TAG(r.user_tag as u8) as i32,
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
