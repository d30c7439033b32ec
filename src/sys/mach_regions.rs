//! The macOS region classifier as a pure function: Mach region records (what
//! `mach_vm_region_recurse` reports at depth 0) in, [`Region`]s out, with the ranges that
//! must never be tracked (the shared region, memsnap's own memory) cut out and reported as
//! [`RegionKind::Kernel`]. Also the `kern_return_t` to errno mapping of protection calls.
//!
//! No Mach call here, so that it compiles everywhere and the Linux unit tests (and Miri)
//! run it on crafted records; `macos/regions.rs` does the walk and feeds it. The constants
//! are xnu's (`osfmk/mach/vm_prot.h`, `vm_inherit.h`, `vm_region.h`, `vm_statistics.h`,
//! `kern_return.h`); on macOS `regions.rs` checks them against mach2's at compile time.
#![cfg_attr(not(target_os = "macos"), allow(dead_code))]

use super::{Region, RegionKind};

pub const VM_PROT_READ: i32 = 1;
pub const VM_PROT_WRITE: i32 = 2;
pub const VM_PROT_EXECUTE: i32 = 4;
pub const VM_INHERIT_SHARE: u32 = 0;
pub const SM_TRUESHARED: u8 = 5;
pub const SM_SHARED_ALIASED: u8 = 7;
/// `VM_MEMORY_STACK`: thread stacks, and libpthread's `pthread_t` and TSD with them.
pub const VM_MEMORY_STACK: u32 = 30;

pub const KERN_INVALID_ADDRESS: i32 = 1;
pub const KERN_PROTECTION_FAILURE: i32 = 2;
pub const KERN_NO_SPACE: i32 = 3;
pub const KERN_RESOURCE_SHORTAGE: i32 = 6;

/// The kernel's reservation for the shared region, per architecture
/// (`osfmk/mach/shared_region.h`, `SHARED_REGION_BASE_*`/`SHARED_REGION_SIZE_*`):
/// `vm_shared_region_enter` (`osfmk/vm/vm_shared_region.c`) maps the submap over all of
/// it. Used only when dyld cannot tell the cache's own range (see `macos/regions.rs`).
pub const SHARED_REGION_X86_64: (usize, usize) = (0x7FF8_0000_0000, 0x7_FE00_0000);
pub const SHARED_REGION_ARM64: (usize, usize) = (0x1_8000_0000, 0x1_8000_0000);

/// One depth-0 VM map entry, the fields of `vm_region_submap_info_64` the policy reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionRecord {
    pub start: usize,
    pub end: usize,
    pub protection: i32,
    pub max_protection: i32,
    pub inheritance: u32,
    pub share_mode: u8,
    pub is_submap: bool,
    pub user_tag: u32,
    pub external_pager: bool,
    /// `VM_REGION_FLAG_JIT_ENABLED` in the `flags` field newer kernels fill in
    /// (xnu-11417's `vm_region_submap_info_64` has no such field: there it reads 0).
    pub jit_flag: bool,
}

/// What the classifier needs besides the records.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `[start, end)` ranges never tracked, reported as [`RegionKind::Kernel`]: the
    /// shared region (the dyld shared cache) and memsnap's own mappings. Empty ranges
    /// are ignored; the others must not overlap.
    pub excluded: [(usize, usize); 3],
    /// Whether a write+execute region is a `MAP_JIT` one (arm64: see [`classify`]).
    pub wx_is_jit: bool,
}

/// The region one record describes, before exclusions.
///
/// - Kind: the shared region's submap entries, JIT regions → `Kernel`; thread stacks →
///   `MainStack` (the kind never tracked); file-backed → `File`; else `Anonymous`.
/// - JIT: on arm64 a region whose current protection is write+execute is a `MAP_JIT`
///   one, the only kind that may be W+X for a native process (`osfmk/vm/vm_map.c`,
///   `vm_map_enter` and `vm_map_protect` fail W+X unless `used_for_jit` when
///   `VM_MAP_POLICY_WX_FAIL`, which holds for every non-"alien" macOS map, and the
///   check applies to every non-exotic (16 KiB page) arm64 map whether or not code
///   signing is enforced). Its write permission is per thread (`pthread_jit_write_protect_np`),
///   so memsnap must never protect it. xnu-11417 reports no JIT flag (see
///   [`RegionRecord::jit_flag`]), so the protection is what tells.
/// - `private` requires writable maximum protection (memsnap must be able to give
///   write back), a copy-on-write or private share mode and an inheritance other than
///   `VM_INHERIT_SHARE` (what `MAP_SHARED` sets).
pub fn classify(r: &RegionRecord, wx_is_jit: bool) -> Region {
    let prot = r.protection;
    let wx = prot & VM_PROT_WRITE != 0 && prot & VM_PROT_EXECUTE != 0;
    let kind = if r.is_submap || r.jit_flag || (wx_is_jit && wx) {
        RegionKind::Kernel
    } else if r.user_tag == VM_MEMORY_STACK {
        RegionKind::MainStack
    } else if r.external_pager {
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
        private: kind != RegionKind::Kernel
            && r.max_protection & VM_PROT_WRITE != 0
            && r.inheritance != VM_INHERIT_SHARE
            && r.share_mode != SM_TRUESHARED
            && r.share_mode != SM_SHARED_ALIASED,
        kind,
    }
}

/// Calls `f` with `region` cut at the excluded ranges: the pieces inside one are
/// reported as `Kernel` and not private, the rest as they are, in address order.
pub fn split_excluded(region: Region, excluded: &[(usize, usize); 3], mut f: impl FnMut(Region)) {
    let mut pieces = [(0usize, 0usize); 3];
    for (p, &(b, e)) in pieces.iter_mut().zip(excluded) {
        *p = (b.max(region.start), e.min(region.end));
    }
    pieces.sort_unstable();
    let mut cursor = region.start;
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
        cursor = cursor.max(e);
    }
    if cursor < region.end {
        f(Region {
            start: cursor,
            ..region
        });
    }
}

/// The classifier: every record, classified and cut at the excluded ranges, in order.
///
/// The shared region is excluded by range, not only by its submap entries: a write to a
/// page of it (a system library's data, the main thread's TSD) makes xnu clip that piece
/// out of the submap and map a private copy-on-write object in the task's own map
/// (`osfmk/vm/vm_map.c`, `vm_map_lookup_and_lock_object`, "substitute copy object for
/// shared map entry"), which then reads as an ordinary private writable entry at depth 0.
pub fn classify_all(
    records: impl IntoIterator<Item = RegionRecord>,
    policy: &Policy,
    mut f: impl FnMut(Region),
) {
    for r in records {
        split_excluded(classify(&r, policy.wx_is_jit), &policy.excluded, &mut f);
    }
}

/// The errno of a failed `mach_vm_protect`, as xnu's own `mprotect` maps it
/// (`bsd/kern/kern_mman.c`): an unmapped range (`KERN_INVALID_ADDRESS`) is `ENOMEM`, which
/// the engine reads as "the memory vanished" (libmalloc unmapped a freed block).
pub fn errno_of(kr: i32) -> i32 {
    match kr {
        KERN_PROTECTION_FAILURE => libc::EACCES,
        KERN_INVALID_ADDRESS => libc::ENOMEM,
        KERN_NO_SPACE | KERN_RESOURCE_SHORTAGE => libc::EAGAIN,
        _ => libc::EINVAL,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: i32 = VM_PROT_READ | VM_PROT_WRITE;
    const RX: i32 = VM_PROT_READ | VM_PROT_EXECUTE;
    const RWX: i32 = RW | VM_PROT_EXECUTE;
    /// `VM_INHERIT_COPY`, `SM_COW`, `SM_PRIVATE`.
    const COPY: u32 = 1;
    const SM_COW: u8 = 1;
    const SM_PRIVATE: u8 = 2;

    fn anon(start: usize, end: usize, prot: i32) -> RegionRecord {
        RegionRecord {
            start,
            end,
            protection: prot,
            max_protection: RWX,
            inheritance: COPY,
            share_mode: SM_PRIVATE,
            ..RegionRecord::default()
        }
    }

    fn submap(start: usize, end: usize) -> RegionRecord {
        RegionRecord {
            is_submap: true,
            share_mode: SM_COW,
            protection: RX,
            max_protection: RX,
            inheritance: VM_INHERIT_SHARE,
            ..anon(start, end, RX)
        }
    }

    fn run(records: &[RegionRecord], policy: &Policy) -> Vec<Region> {
        let mut out = Vec::new();
        classify_all(records.iter().copied(), policy, |r| out.push(r));
        out
    }

    fn trackable(r: &Region) -> bool {
        r.write && r.private && matches!(r.kind, RegionKind::Anonymous | RegionKind::File)
    }

    #[test]
    fn unnested_shared_cache_data_is_never_tracked() {
        // The shared region as a written process sees it: submap entries with private
        // copy-on-write entries between them where system libraries' data was written
        // (un-nested by xnu), one at the very start of the range.
        let (base, len) = (0x1_8000_0000usize, 0x1_8000_0000usize);
        let cache = (base, base + len);
        let records = [
            anon(0x1_0000_0000, 0x1_0010_0000, RW), // the host's heap, below
            RegionRecord {
                share_mode: SM_COW,
                ..anon(base, base + 0x4000, RW)
            },
            submap(base + 0x4000, base + 0x10_0000),
            RegionRecord {
                share_mode: SM_COW,
                ..anon(base + 0x10_0000, base + 0x10_c000, RW)
            },
            submap(base + 0x10_c000, base + len),
            anon(base + len, base + len + 0x8000, RW), // the host's, above
        ];
        let policy = Policy {
            excluded: [cache, (0, 0), (0, 0)],
            wx_is_jit: false,
        };
        let out = run(&records, &policy);
        assert_eq!(out.len(), 6);
        for r in &out {
            let inside = r.start >= cache.0 && r.end <= cache.1;
            assert_eq!(!trackable(r), inside, "{r:?}");
            if inside {
                assert_eq!(r.kind, RegionKind::Kernel);
                assert!(!r.private);
            }
        }
        // Without the range, only the submap entries themselves were left out: the
        // un-nested pieces were tracked (the defect).
        let before = run(&records, &Policy::default());
        assert_eq!(before.iter().filter(|r| trackable(r)).count(), 4);
    }

    #[test]
    fn regions_straddling_an_excluded_range_are_cut() {
        let policy = Policy {
            excluded: [(0x3000, 0x5000), (0x8000, 0x9000), (0, 0)],
            wx_is_jit: false,
        };
        let out = run(&[anon(0x1000, 0xa000, RW)], &policy);
        let spans: Vec<_> = out.iter().map(|r| (r.start, r.end, r.kind)).collect();
        use RegionKind::{Anonymous as A, Kernel as K};
        assert_eq!(
            spans,
            vec![
                (0x1000, 0x3000, A),
                (0x3000, 0x5000, K),
                (0x5000, 0x8000, A),
                (0x8000, 0x9000, K),
                (0x9000, 0xa000, A)
            ]
        );
        // Unordered exclusions, one covering the whole region.
        let policy = Policy {
            excluded: [(0x9000, 0x9100), (0, 0x2000), (0x1000, 0x1000)],
            wx_is_jit: false,
        };
        let out = run(&[anon(0x1000, 0x2000, RW)], &policy);
        assert_eq!(out.len(), 1);
        assert_eq!((out[0].start, out[0].end, out[0].kind), (0x1000, 0x2000, K));
    }

    #[test]
    fn write_execute_is_jit_on_arm64_only() {
        let jit = anon(0x1000, 0x2000, RWX);
        let arm = Policy {
            wx_is_jit: true,
            ..Policy::default()
        };
        let r = run(&[jit], &arm)[0];
        assert_eq!((r.kind, r.private), (RegionKind::Kernel, false));
        // x86_64 allows W+X without MAP_JIT: an ordinary region there.
        let r = run(&[jit], &Policy::default())[0];
        assert_eq!((r.kind, r.private), (RegionKind::Anonymous, true));
        // Read+execute code and read-write data are not JIT on arm64.
        for p in [RX, RW] {
            assert_ne!(run(&[anon(0, 0x1000, p)], &arm)[0].kind, RegionKind::Kernel);
        }
        // A JIT region currently switched to read+execute still carries the flag on
        // kernels that report it.
        let flagged = RegionRecord {
            jit_flag: true,
            ..anon(0, 0x1000, RX)
        };
        assert_eq!(run(&[flagged], &arm)[0].kind, RegionKind::Kernel);
    }

    #[test]
    fn submap_entries_are_never_tracked() {
        let r = run(&[submap(0x1000, 0x9000)], &Policy::default())[0];
        assert_eq!((r.kind, r.private), (RegionKind::Kernel, false));
        assert!(!trackable(&r));
    }

    #[test]
    fn kinds_and_privacy() {
        let p = Policy::default();
        let stack = RegionRecord {
            user_tag: VM_MEMORY_STACK,
            ..anon(0, 0x1000, RW)
        };
        assert_eq!(run(&[stack], &p)[0].kind, RegionKind::MainStack);
        let file = RegionRecord {
            external_pager: true,
            share_mode: SM_COW,
            ..anon(0, 0x1000, RW)
        };
        assert_eq!(run(&[file], &p)[0].kind, RegionKind::File);
        assert!(run(&[file], &p)[0].private);
        // MAP_SHARED, true sharing, aliasing, and a maximum protection without write.
        for r in [
            RegionRecord {
                inheritance: VM_INHERIT_SHARE,
                ..anon(0, 0x1000, RW)
            },
            RegionRecord {
                share_mode: SM_TRUESHARED,
                ..anon(0, 0x1000, RW)
            },
            RegionRecord {
                share_mode: SM_SHARED_ALIASED,
                ..anon(0, 0x1000, RW)
            },
            RegionRecord {
                max_protection: RX,
                ..anon(0, 0x1000, VM_PROT_READ)
            },
        ] {
            assert!(!run(&[r], &p)[0].private, "{r:?}");
        }
        let r = run(&[anon(0, 0x1000, VM_PROT_READ)], &p)[0];
        assert!(r.read && !r.write && !r.exec && r.private);
    }

    #[test]
    fn protection_errors_as_xnus_mprotect_reports_them() {
        // A range that is no longer mapped: ENOMEM, which the engine reads as vanished.
        assert_eq!(errno_of(KERN_INVALID_ADDRESS), libc::ENOMEM);
        assert_eq!(errno_of(KERN_PROTECTION_FAILURE), libc::EACCES);
        assert_eq!(errno_of(KERN_NO_SPACE), libc::EAGAIN);
        assert_eq!(errno_of(4), libc::EINVAL);
    }
}
