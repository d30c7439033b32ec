//! The original API under its C++ names: Itanium-ABI aliases of the C functions in
//! [`super::original`], and the out-of-line members of `AutoTimer` and `AutoCountdown`.
//!
//! Firefox declares these functions with C++ linkage in `namespace mozilla::recordreplay`
//! (MemorySnapshot.h, ProcessRecordReplay.h), so objects compiled against its headers
//! reference `_ZN7mozilla12recordreplay...` symbols. Exporting those names too lets such
//! objects link against libmemsnap unchanged. The names are the same on Linux and macOS
//! (Mach-O adds its leading underscore to every symbol itself). Each alias forwards to the
//! C function, so the two names behave identically, fatal messages included.
//!
//! `cpp-tests/abi/` declares the original API from the interface spec, with C++ linkage,
//! and links a test against these names alone: a misspelt name fails that link. cbindgen
//! skips this module (see `mod.rs`): the generated header declares the C names only.
#![allow(non_snake_case)]

use core::ffi::c_void;

use super::original as c;
use super::{MemoryKindArg, TimerKindArg};

/// Defines, for each line, a function exported under the given C++ name that forwards its
/// arguments to the C function of the same Rust name.
macro_rules! aliases {
    ($($mangled:literal fn $f:ident($($a:ident: $t:ty),*) $(-> $r:ty)?;)*) => {
        $(
            #[export_name = $mangled]
            extern "C" fn $f($($a: $t),*) $(-> $r)? {
                c::$f($($a),*)
            }
        )*
    };
}

aliases! {
    "_ZN7mozilla12recordreplay16CheckFixedMemoryEPvm"
        fn CheckFixedMemory(aAddress: *mut c_void, aSize: usize);
    "_ZN7mozilla12recordreplay26RestoreWritableFixedMemoryEPvm"
        fn RestoreWritableFixedMemory(aAddress: *mut c_void, aSize: usize);
    "_ZN7mozilla12recordreplay24AllocateMemoryTryAddressEPvmNS0_10MemoryKindE"
        fn AllocateMemoryTryAddress(aAddress: *mut c_void, aSize: usize, aKind: MemoryKindArg)
            -> *mut c_void;
    "_ZN7mozilla12recordreplay23RegisterAllocatedMemoryEPvmNS0_10MemoryKindE"
        fn RegisterAllocatedMemory(aBaseAddress: *mut c_void, aSize: usize, aKind: MemoryKindArg);
    "_ZN7mozilla12recordreplay31AddInitialUntrackedMemoryRegionEPhm"
        fn AddInitialUntrackedMemoryRegion(aBase: *mut u8, aSize: usize);
    "_ZN7mozilla12recordreplay20MemoryRangeIsTrackedEPvm"
        fn MemoryRangeIsTracked(aAddress: *mut c_void, aSize: usize) -> bool;
    "_ZN7mozilla12recordreplay25InitializeMemorySnapshotsEv"
        fn InitializeMemorySnapshots();
    "_ZN7mozilla12recordreplay23TakeFirstMemorySnapshotEv"
        fn TakeFirstMemorySnapshot();
    "_ZN7mozilla12recordreplay22TakeDiffMemorySnapshotEv"
        fn TakeDiffMemorySnapshot();
    "_ZN7mozilla12recordreplay34RestoreMemoryToLastSavedCheckpointEv"
        fn RestoreMemoryToLastSavedCheckpoint();
    "_ZN7mozilla12recordreplay38RestoreMemoryToLastSavedDiffCheckpointEv"
        fn RestoreMemoryToLastSavedDiffCheckpoint();
    "_ZN7mozilla12recordreplay32EraseLastSavedDiffMemorySnapshotEv"
        fn EraseLastSavedDiffMemorySnapshot();
    "_ZN7mozilla12recordreplay23SetMemoryChangesAllowedEb"
        fn SetMemoryChangesAllowed(aAllowed: bool);
    "_ZN7mozilla12recordreplay22HandleDirtyMemoryFaultEPh"
        fn HandleDirtyMemoryFault(aAddress: *mut u8) -> bool;
    "_ZN7mozilla12recordreplay28UnrecoverableSnapshotFailureEv"
        fn UnrecoverableSnapshotFailure();
    "_ZN7mozilla12recordreplay27FixupFreeRegionsAfterRewindEv"
        fn FixupFreeRegionsAfterRewind();
    "_ZN7mozilla12recordreplay14StartCountdownEm"
        fn StartCountdown(aCount: usize);
    "_ZN7mozilla12recordreplay25InitializeCountdownThreadEv"
        fn InitializeCountdownThread();
    "_ZN7mozilla12recordreplay10MemoryMoveEPvPKvm"
        fn MemoryMove(aDst: *mut c_void, aSrc: *const c_void, aSize: usize);
    "_ZN7mozilla12recordreplay10MemoryZeroEPvm"
        fn MemoryZero(aDst: *mut c_void, aSize: usize);
    // ProcessRecordReplay.h's memory functions and timer dump.
    "_ZN7mozilla12recordreplay14AllocateMemoryEmNS0_10MemoryKindE"
        fn AllocateMemory(aSize: usize, aKind: MemoryKindArg) -> *mut c_void;
    "_ZN7mozilla12recordreplay16DeallocateMemoryEPvmNS0_10MemoryKindE"
        fn DeallocateMemory(aAddress: *mut c_void, aSize: usize, aKind: MemoryKindArg);
    "_ZN7mozilla12recordreplay10DumpTimersEv"
        fn DumpTimers();
    // Defined with external linkage by the original MemorySnapshot.cpp without a header
    // declaration, and the later GetMemoryUsage: code that declared them itself links too.
    "_ZN7mozilla12recordreplay30AddInitialTrackedMemoryRegionsEPhmb"
        fn AddInitialTrackedMemoryRegions(aAddress: *mut u8, aSize: usize, aExecutable: bool);
    "_ZN7mozilla12recordreplay14GetMemoryUsageENS0_10MemoryKindE"
        fn GetMemoryUsage(aKind: MemoryKindArg) -> usize;
}

/// `struct AutoTimer { TimerKind mKind; double mStart; }`, laid out as the original's
/// (ProcessRecordReplay.h): the caller allocates it, these functions fill and read it.
#[repr(C)]
pub struct AutoTimer {
    kind: TimerKindArg,
    start_us: f64,
}

/// `struct AutoCountdown {}`: an empty class (one byte); its members use no state.
#[repr(C)]
pub struct AutoCountdown {
    _unused: u8,
}

// Constructors and destructors take `this` as the first argument. Each returns `this`:
// Apple's arm64 C++ ABI has them return it (callers may use the returned register rather
// than keep their own copy), and elsewhere the return value is ignored. Every one has its
// complete-object (C1/D1, what callers of a plain object use) and base-object (C2/D2,
// for a class deriving from it) name; for these classes the two are the same code.

/// `AutoTimer::AutoTimer(TimerKind)`: starts a timer of `aKind`.
///
/// # Safety
/// `this` points to writable storage for an `AutoTimer`.
#[export_name = "_ZN7mozilla12recordreplay9AutoTimerC1ENS0_9TimerKindE"]
unsafe extern "C" fn AutoTimer_C1(this: *mut AutoTimer, aKind: TimerKindArg) -> *mut AutoTimer {
    let start_us = c::memsnap_current_time_us();
    // SAFETY: the caller's contract: `this` is the object being constructed.
    unsafe {
        this.write(AutoTimer {
            kind: aKind,
            start_us,
        })
    };
    this
}

/// Base-object constructor of [`AutoTimer_C1`].
///
/// # Safety
/// As for [`AutoTimer_C1`].
#[export_name = "_ZN7mozilla12recordreplay9AutoTimerC2ENS0_9TimerKindE"]
unsafe extern "C" fn AutoTimer_C2(this: *mut AutoTimer, aKind: TimerKindArg) -> *mut AutoTimer {
    // SAFETY: forwarded contract.
    unsafe { AutoTimer_C1(this, aKind) }
}

/// `AutoTimer::~AutoTimer()`: adds one hit and the elapsed time to the timer's kind
/// (reported by DumpTimers).
///
/// # Safety
/// `this` points to an `AutoTimer` its constructor initialized.
#[export_name = "_ZN7mozilla12recordreplay9AutoTimerD1Ev"]
unsafe extern "C" fn AutoTimer_D1(this: *mut AutoTimer) -> *mut AutoTimer {
    // SAFETY: the caller's contract: a constructed AutoTimer.
    let t = unsafe { &*this };
    c::memsnap_timer_record(t.kind, t.start_us);
    this
}

/// Base-object destructor of [`AutoTimer_D1`].
///
/// # Safety
/// As for [`AutoTimer_D1`].
#[export_name = "_ZN7mozilla12recordreplay9AutoTimerD2Ev"]
unsafe extern "C" fn AutoTimer_D2(this: *mut AutoTimer) -> *mut AutoTimer {
    // SAFETY: forwarded contract.
    unsafe { AutoTimer_D1(this) }
}

/// `AutoCountdown::AutoCountdown(size_t)`: `StartCountdown(aCount)`. The object itself is
/// neither read nor written.
#[export_name = "_ZN7mozilla12recordreplay13AutoCountdownC1Em"]
extern "C" fn AutoCountdown_C1(this: *mut AutoCountdown, aCount: usize) -> *mut AutoCountdown {
    c::StartCountdown(aCount);
    this
}

/// Base-object constructor of [`AutoCountdown_C1`].
#[export_name = "_ZN7mozilla12recordreplay13AutoCountdownC2Em"]
extern "C" fn AutoCountdown_C2(this: *mut AutoCountdown, aCount: usize) -> *mut AutoCountdown {
    AutoCountdown_C1(this, aCount)
}

/// `AutoCountdown::~AutoCountdown()`: `StartCountdown(0)`, disarming the watchdog (it does
/// not restore an outer count: the original does not nest either).
#[export_name = "_ZN7mozilla12recordreplay13AutoCountdownD1Ev"]
extern "C" fn AutoCountdown_D1(this: *mut AutoCountdown) -> *mut AutoCountdown {
    c::StartCountdown(0);
    this
}

/// Base-object destructor of [`AutoCountdown_D1`].
#[export_name = "_ZN7mozilla12recordreplay13AutoCountdownD2Ev"]
extern "C" fn AutoCountdown_D2(this: *mut AutoCountdown) -> *mut AutoCountdown {
    AutoCountdown_D1(this)
}
