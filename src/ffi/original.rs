//! The original MemorySnapshot interface, same names and parameter types, C linkage.
#![allow(non_snake_case)]

use core::ffi::c_void;

use super::{aligned_range, kind, range, MemoryKindArg, TimerKindArg};
use crate::engine::{self, Engine, Phase};

/// Creates the library's state. Call once, before any other function, on the thread that
/// will control snapshots. A second call aborts.
#[no_mangle]
pub extern "C" fn InitializeMemorySnapshots() {
    Engine::initialize();
}

/// Takes the first snapshot: finds tracked memory (every private writable mapping less
/// thread stacks and untracked ranges, or only registered ranges, see
/// memsnap_set_tracking_mode), write-protects it, starts the restore threads and installs
/// the fault handler. Other threads must be idle. Memory changes must be allowed; the
/// call disallows them itself while it runs.
#[no_mangle]
pub extern "C" fn TakeFirstMemorySnapshot() {
    engine::expect("TakeFirstMemorySnapshot").take_first();
}

/// Saves a new checkpoint: pages written since the previous one become its diff (pages
/// whose bytes did not change are dropped) and are write-protected again. Other threads
/// must be idle. Call on the thread that took the first snapshot, with changes allowed.
#[no_mangle]
pub extern "C" fn TakeDiffMemorySnapshot() {
    engine::expect("TakeDiffMemorySnapshot").take_diff();
}

/// Restores tracked memory to the newest saved checkpoint. Memory changes must be
/// disallowed (inside AutoDisallowMemoryChanges). Memory the program obtained since then
/// is returned to the kernel (it reads as zero if obtained again).
#[no_mangle]
pub extern "C" fn RestoreMemoryToLastSavedCheckpoint() {
    engine::expect("RestoreMemoryToLastSavedCheckpoint").restore_last();
}

/// Drops the newest saved checkpoint and restores tracked memory to the one before it.
/// Requires RestoreMemoryToLastSavedCheckpoint first (no pages written since the newest
/// checkpoint), at least two saved checkpoints, and memory changes disallowed.
#[no_mangle]
pub extern "C" fn RestoreMemoryToLastSavedDiffCheckpoint() {
    engine::expect("RestoreMemoryToLastSavedDiffCheckpoint").restore_diff();
}

/// Forgets the second-newest saved checkpoint, folding its diff into its predecessor's
/// (or discarding it when it is the oldest), so a caller can bound memory. Every other
/// checkpoint stays reachable. Requires at least two saved checkpoints.
#[no_mangle]
pub extern "C" fn EraseLastSavedDiffMemorySnapshot() {
    engine::expect("EraseLastSavedDiffMemorySnapshot").erase_last_diff();
}

/// Allows (true) or disallows (false) memory changes. Calls must alternate. While
/// changes are disallowed, other threads that write tracked memory wait; the thread that
/// disallowed them aborts with a message if it writes tracked memory.
#[no_mangle]
pub extern "C" fn SetMemoryChangesAllowed(aAllowed: bool) {
    engine::expect("SetMemoryChangesAllowed").set_allowed("SetMemoryChangesAllowed", aAllowed);
}

/// Handles a write fault at aAddress: returns true if the address is tracked (its page
/// is now writable and its contents saved), false if the fault is not memsnap's. The
/// library's own fault handler calls this; hosts with their own handler may too.
#[no_mangle]
pub extern "C" fn HandleDirtyMemoryFault(aAddress: *mut u8) -> bool {
    engine::expect("HandleDirtyMemoryFault")
        .handle_fault("HandleDirtyMemoryFault", aAddress as usize)
}

/// Gives up on snapshots before the process dies: makes all tracked memory writable so
/// crash reporting can run. No rewind is possible afterwards. No-op before initialization.
#[no_mangle]
pub extern "C" fn UnrecoverableSnapshotFailure() {
    if let Some(e) = engine::get() {
        e.fail();
    }
}

/// Kept for callers of the original: memsnap returns tracked memory allocated after the
/// restored checkpoint to the free set during the restore itself, so this does nothing
/// beyond checking it is called after a snapshot.
#[no_mangle]
pub extern "C" fn FixupFreeRegionsAfterRewind() {
    let e = engine::expect("FixupFreeRegionsAfterRewind");
    if e.phase() == Phase::Initialized {
        crate::fatal!(
            "FixupFreeRegionsAfterRewind",
            "no checkpoint has been saved"
        );
    }
}

/// Whether every page from the page containing aAddress up to aAddress + aSize is tracked.
/// False for ranges that wrap around the address space.
#[no_mangle]
pub extern "C" fn MemoryRangeIsTracked(aAddress: *mut c_void, aSize: usize) -> bool {
    let e = engine::expect("MemoryRangeIsTracked");
    match (aAddress as usize).checked_add(aSize) {
        Some(end) => e.range_is_tracked(aAddress as usize, end),
        None => false,
    }
}

/// Checks, before a MAP_FIXED mapping over [aAddress, aAddress + aSize), that the range
/// is tracked and not free; aborts otherwise. The range must be page-aligned. Does
/// nothing before the first snapshot.
#[no_mangle]
pub extern "C" fn CheckFixedMemory(aAddress: *mut c_void, aSize: usize) {
    const F: &str = "CheckFixedMemory";
    let e = engine::expect(F);
    let r = aligned_range(e, F, aAddress as usize, aSize);
    e.check_fixed(F, r.start, r.end);
}

/// After a MAP_FIXED mapping reset protections, makes the range's dirty pages writable
/// again so they do not fault twice. The range must be page-aligned.
#[no_mangle]
pub extern "C" fn RestoreWritableFixedMemory(aAddress: *mut c_void, aSize: usize) {
    const F: &str = "RestoreWritableFixedMemory";
    let e = engine::expect(F);
    let r = aligned_range(e, F, aAddress as usize, aSize);
    e.restore_writable_fixed(r.start, r.end);
}

/// Returns aSize bytes (rounded up to whole pages) of zeroed memory of kind aKind, at
/// aAddress if possible (a hint; null for none; must be page-aligned). After the first
/// snapshot, tracked memory is taken from the free set first. Never returns null.
#[no_mangle]
pub extern "C" fn AllocateMemoryTryAddress(
    aAddress: *mut c_void,
    aSize: usize,
    aKind: MemoryKindArg,
) -> *mut c_void {
    const F: &str = "AllocateMemoryTryAddress";
    let e = engine::expect(F);
    let k = kind(F, aKind);
    if !e.is_aligned(aAddress as usize) {
        crate::fatal!(
            F,
            "address hint {:#x} is not page-aligned",
            aAddress as usize
        );
    }
    allocate(e, F, aAddress as usize, aSize, k)
}

fn allocate(e: &Engine, function: &str, hint: usize, size: usize, k: usize) -> *mut c_void {
    let Some(size) = e.round_pages(size).filter(|&s| s > 0) else {
        crate::fatal!(function, "invalid size {:#x}", size)
    };
    e.allocate(function, hint, size, k) as *mut c_void
}

/// Returns aSize bytes (rounded up to whole pages) of zeroed memory of kind aKind.
/// Never returns null.
#[no_mangle]
pub extern "C" fn AllocateMemory(aSize: usize, aKind: MemoryKindArg) -> *mut c_void {
    const F: &str = "AllocateMemory";
    let e = engine::expect(F);
    let k = kind(F, aKind);
    allocate(e, F, 0, aSize, k)
}

/// Returns memory obtained with AllocateMemory, or registered with
/// RegisterAllocatedMemory (the address must be page-aligned; the size is rounded up as
/// AllocateMemory rounded it). Before the first snapshot it goes back to the system;
/// after it, tracked memory joins the free set (a rewind may need it) and untracked memory
/// is unmapped. Null or zero size does nothing. Tracked memory memsnap did not hand out,
/// or already free, aborts with a message.
#[no_mangle]
pub extern "C" fn DeallocateMemory(aAddress: *mut c_void, aSize: usize, aKind: MemoryKindArg) {
    const F: &str = "DeallocateMemory";
    let e = engine::expect(F);
    let k = kind(F, aKind);
    if aAddress.is_null() || aSize == 0 {
        return;
    }
    if !e.is_aligned(aAddress as usize) {
        crate::fatal!(
            F,
            "range {:#x} + {:#x} is not page-aligned (page size {:#x})",
            aAddress as usize,
            aSize,
            e.settings.sub
        );
    }
    let r = range(F, aAddress as usize, aSize);
    let Some(w) = r.widen_to_pages(e.settings.sub) else {
        crate::fatal!(
            F,
            "range {:#x} + {:#x} wraps around the address space",
            r.start,
            aSize
        )
    };
    e.deallocate(F, w.start, w.end, k);
}

/// Records memory the host obtained from the system itself (page-aligned base and size).
/// Tracked memory registered after the first snapshot is write-protected and tracked
/// from now on; untracked memory is never tracked or zeroed by a rewind.
#[no_mangle]
pub extern "C" fn RegisterAllocatedMemory(
    aBaseAddress: *mut c_void,
    aSize: usize,
    aKind: MemoryKindArg,
) {
    const F: &str = "RegisterAllocatedMemory";
    let e = engine::expect(F);
    let k = kind(F, aKind);
    let r = aligned_range(e, F, aBaseAddress as usize, aSize);
    e.register_allocated(F, r.start, r.len(), k);
}

/// Excludes [aBase, aBase + aSize) (aBase page-aligned; the size is rounded up) from the
/// first snapshot. Only before the first snapshot.
#[no_mangle]
pub extern "C" fn AddInitialUntrackedMemoryRegion(aBase: *mut u8, aSize: usize) {
    const F: &str = "AddInitialUntrackedMemoryRegion";
    let e = engine::expect(F);
    if e.phase() != Phase::Initialized {
        crate::fatal!(F, "called after the first snapshot");
    }
    if !e.is_aligned(aBase as usize) {
        crate::fatal!(F, "base {:#x} is not page-aligned", aBase as usize);
    }
    let r = range(F, aBase as usize, aSize);
    let Some(r) = r.widen_to_pages(e.settings.sub) else {
        crate::fatal!(
            F,
            "range {:#x} + {:#x} wraps around the address space",
            r.start,
            aSize
        )
    };
    e.add_untracked(F, r);
}

/// Tracks [aAddress, aAddress + aSize) from the first snapshot on, less any initial
/// untracked regions (widened to whole pages). aExecutable keeps execute permission while
/// the pages are protected. Only before the first snapshot; in the registered-regions
/// mode these (with tracked allocations) are all that is tracked.
#[no_mangle]
pub extern "C" fn AddInitialTrackedMemoryRegions(
    aAddress: *mut u8,
    aSize: usize,
    aExecutable: bool,
) {
    const F: &str = "AddInitialTrackedMemoryRegions";
    let e = engine::expect(F);
    if e.phase() != Phase::Initialized {
        crate::fatal!(F, "called after the first snapshot");
    }
    let r = range(F, aAddress as usize, aSize);
    let Some(r) = r.widen_to_pages(e.settings.sub) else {
        crate::fatal!(
            F,
            "range {:#x} + {:#x} wraps around the address space",
            r.start,
            aSize
        )
    };
    e.add_tracked(F, r, aExecutable);
}

/// Arms the countdown watchdog: once InitializeCountdownThread has run, the process
/// aborts with a message after aCount milliseconds unless the count is reset first
/// (StartCountdown(0) disarms it).
#[no_mangle]
pub extern "C" fn StartCountdown(aCount: usize) {
    engine::expect("StartCountdown")
        .countdown
        .store(aCount, core::sync::atomic::Ordering::Release);
}

/// Starts the countdown watchdog thread (once per process).
#[no_mangle]
pub extern "C" fn InitializeCountdownThread() {
    engine::expect("InitializeCountdownThread").spawn_countdown("InitializeCountdownThread");
}

/// Prints elapsed time and each timer's hits and total to stderr. No-op before
/// initialization.
#[no_mangle]
pub extern "C" fn DumpTimers() {
    let Some(e) = engine::get() else { return };
    let now = crate::sys::now_us();
    let c = e.counters();
    crate::fatal::print_line(
        "DumpTimers",
        format_args!("Times {:.2}s", (now - c.start_us) / 1e6),
    );
    {
        let (name, i) = ("Default", 0usize);
        let (hits, ns) = (c.timer_hits[i], c.timer_ns[i]);
        crate::fatal::print_line(
            "DumpTimers",
            format_args!("{}: {} hits, {:.2}s", name, hits, ns as f64 / 1e9),
        );
    }
    let s = e.stats();
    crate::fatal::print_line(
        "DumpTimers",
        format_args!(
            "backend {:?}, {} snapshots ({:.3}s), {} rewinds ({:.3}s), {} faults, {} KiB tracked by userfaultfd, {} KiB base copy",
            if e.armed() {
                e.active_backend()
            } else {
                crate::engine::Backend::None
            },
            c.checkpoints_taken,
            c.snapshot_ns as f64 / 1e9,
            c.rewinds,
            c.restore_ns as f64 / 1e9,
            c.faults,
            e.backend.uffd_bytes() >> 10,
            e.base_bytes() >> 10
        ),
    );
    crate::fatal::print_line(
        "DumpTimers",
        format_args!(
            "excluded from snapshots: {} KiB; {} pages copied eagerly",
            s.excluded_bytes >> 10,
            s.eager_pages
        ),
    );
    if e.verify.on() {
        crate::fatal::print_line(
            "DumpTimers",
            format_args!(
                "verifying mode: {} pages compared with their checkpoint's hashes",
                s.verify_pages_checked
            ),
        );
    }
    e.for_each_exclusion(|x| {
        crate::fatal::print_line(
            "DumpTimers",
            format_args!(
                "  excluded {:#x}-{:#x} ({} bytes): {}{}",
                x.range.start,
                x.range.end,
                x.range.len(),
                x.reason.describe(),
                ThreadSuffix(x.tid)
            ),
        );
    });
}

/// ", thread N" after an exclusion that belongs to a thread.
struct ThreadSuffix(u32);

impl core::fmt::Display for ThreadSuffix {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        if self.0 != 0 {
            write!(f, ", thread {}", self.0)
        } else {
            Ok(())
        }
    }
}

fn check_word_aligned(function: &str, dst: usize, src: usize, size: usize) {
    if dst % 4 != 0 || src % 4 != 0 || size % 4 != 0 {
        crate::fatal!(
            function,
            "pointers and size must be 4-byte aligned ({:#x}, {:#x}, {:#x})",
            dst,
            src,
            size
        );
    }
    if size != 0 && (dst == 0 || src == 0) {
        crate::fatal!(function, "null pointer");
    }
}

/// Copies aSize bytes in 32-bit words without calling any library function (usable where
/// lazy-binding stubs must not run). Pointers and size must be 4-byte aligned and the
/// destination must not start inside the source.
#[no_mangle]
pub extern "C" fn MemoryMove(aDst: *mut c_void, aSrc: *const c_void, aSize: usize) {
    const F: &str = "MemoryMove";
    let (d, s) = (aDst as usize, aSrc as usize);
    check_word_aligned(F, d, s, aSize);
    if !(d <= s || d >= s.saturating_add(aSize)) {
        crate::fatal!(
            F,
            "destination {:#x} starts inside the source {:#x}+{:#x}",
            d,
            s,
            aSize
        );
    }
    range(F, d, aSize);
    range(F, s, aSize);
    for i in 0..aSize / 4 {
        // SAFETY: the caller passes valid, 4-byte aligned buffers of aSize bytes; copying
        // forward is correct for dst <= src or disjoint ranges (checked above).
        unsafe {
            let v = core::ptr::read_volatile((aSrc as *const u32).add(i));
            core::ptr::write_volatile((aDst as *mut u32).add(i), v);
        }
    }
}

/// Zeroes aSize bytes in 32-bit words without calling any library function. Pointer and
/// size must be 4-byte aligned.
#[no_mangle]
pub extern "C" fn MemoryZero(aDst: *mut c_void, aSize: usize) {
    const F: &str = "MemoryZero";
    check_word_aligned(F, aDst as usize, aDst as usize, aSize);
    range(F, aDst as usize, aSize);
    for i in 0..aSize / 4 {
        // SAFETY: the caller passes a valid, 4-byte aligned buffer of aSize bytes.
        unsafe { core::ptr::write_volatile((aDst as *mut u32).add(i), 0) };
    }
}

/// Bytes currently obtained through AllocateMemory for aKind; for the kinds naming
/// memsnap's own structures (TrackedRegions .. PageCopy), what those structures use.
#[no_mangle]
pub extern "C" fn GetMemoryUsage(aKind: MemoryKindArg) -> usize {
    const F: &str = "GetMemoryUsage";
    let e = engine::expect(F);
    e.memory_usage(kind(F, aKind))
}

/// Used by the AutoTimer helper: microseconds on a monotonic clock.
#[no_mangle]
pub extern "C" fn memsnap_current_time_us() -> f64 {
    crate::sys::now_us()
}

/// Used by the AutoTimer helper: adds one hit and the time since aStartUs to aKind.
/// No-op before initialization.
#[no_mangle]
pub extern "C" fn memsnap_timer_record(aKind: TimerKindArg, aStartUs: f64) {
    if let Some(e) = engine::get() {
        if aKind.0 >= 0 && (aKind.0 as usize) < engine::TIMER_KINDS {
            e.timer_record(aKind.0 as usize, aStartUs);
        }
    }
}
