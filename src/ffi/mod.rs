//! The C ABI: the original MemorySnapshot.h functions under their own names ([`original`])
//! and the `memsnap_` extensions ([`ext`]), and the original's C++ names for the former
//! ([`mangled`]). Functions here check arguments, turn misuse into a one-line message and
//! an abort, and call into the engine; nothing else.

pub mod ext;
#[cfg(target_os = "linux")]
pub mod host_calls;
/// cbindgen:ignore
pub mod mangled;
pub mod original;

use crate::engine::ranges::Range;
use crate::engine::Engine;

/// The kinds of memory the original distinguishes. Only `Tracked` memory is saved and
/// restored; every other kind is untracked. Order and values match the original.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryKind {
    Tracked,
    Generic,
    ThreadSnapshot,
    TrackedRegions,
    FreeRegions,
    DirtyPageSet,
    SortedDirtyPageSet,
    PageCopy,
    ScriptHits,
    Count,
}

/// Timer kinds for `AutoTimer` and `DumpTimers` (the original's `ForEachTimerKind`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TimerKind {
    Default,
    Count,
}

/// A `MemoryKind` as received from C: any integer may arrive, so it is checked before use.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemoryKindArg(pub libc::c_int);

/// A `TimerKind` as received from C.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerKindArg(pub libc::c_int);

pub(crate) fn kind(function: &str, k: MemoryKindArg) -> usize {
    if k.0 < 0 || k.0 >= MemoryKind::Count as libc::c_int {
        crate::fatal!(function, "invalid MemoryKind {}", k.0);
    }
    k.0 as usize
}

/// `[addr, addr + size)` or a fatal report when it wraps around the address space.
pub(crate) fn range(function: &str, addr: usize, size: usize) -> Range {
    match Range::from_len(addr, size) {
        Some(r) => r,
        None => crate::fatal!(
            function,
            "range {:#x} + {:#x} wraps around the address space",
            addr,
            size
        ),
    }
}

/// A page-aligned base with a size that is a page multiple, as the original asserts.
pub(crate) fn aligned_range(e: &Engine, function: &str, addr: usize, size: usize) -> Range {
    if !e.is_aligned(addr) || !e.is_aligned(size) {
        crate::fatal!(
            function,
            "range {:#x} + {:#x} is not page-aligned (page size {:#x})",
            addr,
            size,
            e.settings.sub
        );
    }
    range(function, addr, size)
}
