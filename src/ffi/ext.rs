//! Extensions beyond the original interface, all prefixed `memsnap_`. Unlike the original
//! functions, these report failure with a status instead of aborting.

use core::ffi::{c_char, c_void};

use crate::engine::{self, Mode, Phase};
use core::sync::atomic::Ordering;

use crate::engine::Backend;

/// The result of an extension call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemsnapStatus {
    /// Done.
    Ok = 0,
    /// InitializeMemorySnapshots has not run.
    NotInitialized = 1,
    /// The setting can only change before the first snapshot.
    AlreadyStarted = 2,
    /// An argument is null, unaligned, out of range or wraps around the address space.
    InvalidArgument = 3,
    /// Part of the range is not tracked.
    NotTracked = 4,
    /// This kernel or process cannot provide what was asked for (memsnap_set_backend).
    Unsupported = 5,
}

/// A `MemsnapStatus` as received from C.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemsnapStatusArg(pub libc::c_int);

/// A `MemsnapTrackingMode` as received from C.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemsnapTrackingModeArg(pub libc::c_int);

/// Which write-tracking mechanism is active.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemsnapBackend {
    /// No snapshot taken yet: nothing is tracked.
    Inactive = 0,
    /// Linux: mprotect write protection, SIGSEGV fault capture.
    LinuxMprotect = 1,
    /// macOS: Mach exception port fault capture.
    MacExceptionPort = 2,
    /// macOS: SIGBUS/SIGSEGV fault capture.
    MacSignal = 3,
    /// Linux: synchronous userfaultfd write protection, faults served by a library thread;
    /// system calls may write tracked memory. Private file mappings (.data of loaded
    /// objects) stay on mprotect: see uffd_tracked_bytes.
    LinuxUffd = 4,
    /// Linux: asynchronous userfaultfd write protection (Linux 6.7+): writes never stop,
    /// written pages are found at each checkpoint, and a base copy of the resident
    /// tracked memory is kept (base_copy_bytes).
    LinuxUffdAsync = 5,
}

/// A write-tracking mechanism the caller asks for with memsnap_set_backend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemsnapBackendRequest {
    /// The best the kernel and the process's privileges allow: uffd-async, else uffd,
    /// else mprotect (the default).
    Auto = 0,
    /// mprotect + SIGSEGV (macOS: its only mechanisms; this is the default there).
    Mprotect = 1,
    /// Synchronous userfaultfd write protection.
    Uffd = 2,
    /// Asynchronous userfaultfd write protection with PAGEMAP_SCAN.
    UffdAsync = 3,
}

/// A `MemsnapBackendRequest` as received from C.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemsnapBackendRequestArg(pub libc::c_int);

/// What the first snapshot tracks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemsnapTrackingMode {
    /// Every private writable mapping of the process, less thread stacks, library
    /// memory and untracked ranges (the original's behaviour; the default).
    WholeProcess = 0,
    /// Only ranges registered with AddInitialTrackedMemoryRegions, memsnap_track_region,
    /// RegisterAllocatedMemory(Tracked) and AllocateMemory(Tracked).
    RegisteredOnly = 1,
}

/// A statistics record filled by memsnap_get_stats.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct MemsnapStats {
    /// Set to sizeof(MemsnapStats) before the call.
    pub struct_size: usize,
    /// The active write-tracking mechanism.
    pub backend: MemsnapBackend,
    /// What the first snapshot tracked (or will track).
    pub tracking_mode: MemsnapTrackingMode,
    /// The snapshot page in bytes: the unit tracked, copied and restored (the kernel's
    /// page unless memsnap_set_page_size or MEMSNAP_PAGE_SIZE chose a larger one).
    pub page_size: usize,
    /// Bytes and regions currently tracked.
    pub tracked_bytes: usize,
    pub tracked_regions: usize,
    /// Pages written since the newest checkpoint.
    pub active_dirty_pages: usize,
    /// Checkpoints that can still be restored, and how many of them hold a diff.
    pub saved_checkpoints: usize,
    pub saved_diffs: usize,
    /// Pages (and bytes) held by saved diffs.
    pub saved_diff_pages: usize,
    pub saved_diff_bytes: usize,
    /// Page copies held in total (saved diffs plus the active dirty set).
    pub copy_bytes: usize,
    /// Write faults resolved since initialization.
    pub faults_handled: u64,
    /// Snapshots taken and rewinds (restore calls) performed since initialization.
    pub checkpoints_taken: u64,
    pub rewinds: u64,
    /// Restore worker threads running.
    pub restore_threads: usize,
    /// The oldest saved checkpoint (0-based position) that can still be restored; above 0
    /// when tracked memory vanished or was unprotected by the program.
    pub oldest_restorable: usize,
    /// Duration of the last snapshot and last restore call, and totals, in nanoseconds.
    pub last_snapshot_ns: u64,
    pub last_restore_ns: u64,
    pub total_snapshot_ns: u64,
    pub total_restore_ns: u64,
    // Fields below were added after the first release; callers built against the first
    // header pass a smaller struct_size and get only the fields above.
    /// The kernel's page size; page_size is a multiple of it.
    pub kernel_page_size: usize,
    /// Faults resolved by capturing a whole block of pages at once because isolated
    /// writable pages would have split the mappings past vm.max_map_count.
    pub block_faults: u64,
    /// Tracked bytes guarded by userfaultfd (the rest by mprotect).
    pub uffd_tracked_bytes: usize,
    /// uffd-async: bytes of the base copy, the contents of every resident tracked page
    /// at the newest checkpoint (included in copy_bytes).
    pub base_copy_bytes: usize,
    /// uffd: how often the fault server went to sleep and was woken, and how many faults
    /// it found while spinning instead.
    pub uffd_server_wakeups: u64,
    pub uffd_spin_hits: u64,
    /// uffd: only user-mode faults are caught (no userfaultfd permission beyond
    /// UFFD_USER_MODE_ONLY), so system calls writing clean tracked pages fail with EFAULT
    /// as under mprotect, unless memsnap_prepare_write ran first.
    pub uffd_user_mode_only: bool,
    /// Bytes the last scan left out of snapshots, every exclusion counted once (see
    /// DumpTimers for the list with reasons).
    pub excluded_bytes: usize,
    /// Kernel pages exclusions cover only partly (thread-local storage among them),
    /// copied whole at every checkpoint and restored except their excluded bytes.
    pub eager_pages: usize,
    /// Thread stacks are bounded by glibc's own descriptors (false: not glibc 2.34+, and
    /// every stack is bounded by the mapping around its stack pointer).
    pub thread_descriptors: bool,
    /// Verifying mode (memsnap_set_verify, MEMSNAP_VERIFY=1): kernel pages compared with
    /// their checkpoint's hashes after rewinds so far (0 when the mode is off).
    pub verify_pages_checked: u64,
    /// Saved pages whose pre-image is kept as a delta against the newer bytes (XOR, with
    /// unchanged words left out) rather than a whole copy; part of saved_diff_pages.
    pub saved_delta_pages: usize,
    /// Bytes the saved diffs keep for their pre-images: a page per whole copy plus the
    /// deltas (saved_diff_bytes counts every saved page whole).
    pub saved_kept_bytes: usize,
    /// The memory budget (memsnap_set_memory_budget, MEMSNAP_MEMORY_BUDGET), 0 for none.
    pub memory_budget: usize,
}

/// The smallest struct_size memsnap_get_stats accepts: the first release's record.
const STATS_V1_SIZE: usize = core::mem::offset_of!(MemsnapStats, kernel_page_size);

fn engine_before_start() -> Result<&'static engine::Engine, MemsnapStatus> {
    let e = engine::get().ok_or(MemsnapStatus::NotInitialized)?;
    if e.phase() != Phase::Initialized {
        return Err(MemsnapStatus::AlreadyStarted);
    }
    Ok(e)
}

fn status(r: Result<(), MemsnapStatus>) -> MemsnapStatus {
    r.err().unwrap_or(MemsnapStatus::Ok)
}

/// Chooses what the first snapshot tracks. Only before the first snapshot.
#[no_mangle]
pub extern "C" fn memsnap_set_tracking_mode(mode: MemsnapTrackingModeArg) -> MemsnapStatus {
    status((|| {
        let e = engine_before_start()?;
        let mode = match mode.0 {
            0 => Mode::WholeProcess,
            1 => Mode::Registered,
            _ => return Err(MemsnapStatus::InvalidArgument),
        };
        e.set_mode(mode);
        Ok(())
    })())
}

/// Registers [addr, addr + size) for tracking (widened to whole pages). Only before the
/// first snapshot; the way to build a registered-only tracking set.
#[no_mangle]
pub extern "C" fn memsnap_track_region(addr: *mut c_void, size: usize) -> MemsnapStatus {
    status((|| {
        let e = engine_before_start()?;
        let r = crate::engine::ranges::Range::from_len(addr as usize, size)
            .and_then(|r| r.widen_to_pages(e.settings.sub))
            .filter(|r| !r.is_empty() && r.start != 0)
            .ok_or(MemsnapStatus::InvalidArgument)?;
        e.add_tracked("memsnap_track_region", r, false);
        Ok(())
    })())
}

/// Declares [addr, addr + size) untracked (widened to whole pages): the first snapshot
/// and later scans leave it alone and no rewind writes or zeroes it. Only before the
/// first snapshot (afterwards, use RegisterAllocatedMemory with an untracked kind for
/// memory obtained later).
#[no_mangle]
pub extern "C" fn memsnap_untrack_region(addr: *mut c_void, size: usize) -> MemsnapStatus {
    status((|| {
        let e = engine_before_start()?;
        let r = crate::engine::ranges::Range::from_len(addr as usize, size)
            .and_then(|r| r.widen_to_pages(e.settings.sub))
            .filter(|r| !r.is_empty())
            .ok_or(MemsnapStatus::InvalidArgument)?;
        e.add_untracked("memsnap_untrack_region", r);
        Ok(())
    })())
}

/// Sets how many worker threads restore diffs (0 to 64; 0 restores on the calling
/// thread; default min(8, CPUs)). Only before the first snapshot.
#[no_mangle]
pub extern "C" fn memsnap_set_restore_threads(count: usize) -> MemsnapStatus {
    status((|| {
        let e = engine_before_start()?;
        if !e.set_restore_threads(count) {
            return Err(MemsnapStatus::InvalidArgument);
        }
        Ok(())
    })())
}

/// Whether the first snapshot in whole-process mode tells glibc malloc never to return
/// memory to the kernel (no mmap'd chunks, no trimming, one arena; default on), so that
/// tracked memory is still mapped at every rewind. Only before the first snapshot.
#[no_mangle]
pub extern "C" fn memsnap_set_pin_allocator(enabled: bool) -> MemsnapStatus {
    status((|| {
        let e = engine_before_start()?;
        e.set_pin_allocator(enabled);
        Ok(())
    })())
}

/// Makes the tracked pages of [addr, addr + size) writable now, saving their contents as
/// a first write would, so that a system call (read, recv, ...) may write into them: the
/// kernel's own writes to write-protected memory fail with EFAULT instead of faulting.
/// Returns NotTracked if some page of the range is not tracked (the others are still
/// prepared).
#[no_mangle]
pub extern "C" fn memsnap_prepare_write(addr: *mut c_void, size: usize) -> MemsnapStatus {
    status((|| {
        let e = engine::get().ok_or(MemsnapStatus::NotInitialized)?;
        let end = (addr as usize)
            .checked_add(size)
            .ok_or(MemsnapStatus::InvalidArgument)?;
        if addr.is_null() && size != 0 {
            return Err(MemsnapStatus::InvalidArgument);
        }
        e.prepare_write(addr as usize, end);
        if e.armed() && !e.range_is_tracked(addr as usize, end) {
            return Err(MemsnapStatus::NotTracked);
        }
        Ok(())
    })())
}

/// Fills *out (aligned as the record requires), whose struct_size must be set to
/// sizeof(MemsnapStats) as the caller's
/// header declares it: a caller built against an older, shorter record gets its fields
/// only, and struct_size is left as it was.
///
/// # Safety
/// `out` is null or points to struct_size writable bytes.
#[no_mangle]
pub unsafe extern "C" fn memsnap_get_stats(out: *mut MemsnapStats) -> MemsnapStatus {
    status((|| {
        if out.is_null() || !out.is_aligned() {
            return Err(MemsnapStatus::InvalidArgument);
        }
        // SAFETY: non-null and aligned; struct_size, the first field, is in every version.
        let size = unsafe { (*out).struct_size };
        if size < STATS_V1_SIZE {
            return Err(MemsnapStatus::InvalidArgument);
        }
        let e = engine::get().ok_or(MemsnapStatus::NotInitialized)?;
        let s = e.stats();
        let backend = match if e.armed() {
            e.active_backend()
        } else {
            Backend::None
        } {
            Backend::None => MemsnapBackend::Inactive,
            Backend::LinuxMprotect => MemsnapBackend::LinuxMprotect,
            Backend::MacExceptionPort => MemsnapBackend::MacExceptionPort,
            Backend::MacSignal => MemsnapBackend::MacSignal,
            Backend::LinuxUffd => MemsnapBackend::LinuxUffd,
            Backend::LinuxUffdAsync => MemsnapBackend::LinuxUffdAsync,
        };
        let counters = e.backend.uffd_counters();
        let record = MemsnapStats {
            struct_size: size,
            backend,
            tracking_mode: match e.mode() {
                Mode::WholeProcess => MemsnapTrackingMode::WholeProcess,
                Mode::Registered => MemsnapTrackingMode::RegisteredOnly,
            },
            page_size: s.page_size,
            tracked_bytes: s.tracked_bytes,
            tracked_regions: s.tracked_regions,
            active_dirty_pages: s.active_dirty_pages,
            saved_checkpoints: s.saved_checkpoints,
            saved_diffs: s.saved_diffs,
            saved_diff_pages: s.saved_diff_pages,
            saved_diff_bytes: s.saved_diff_pages * s.page_size,
            copy_bytes: s.copy_slots_in_use * s.page_size,
            faults_handled: s.faults_handled,
            checkpoints_taken: s.checkpoints_taken,
            rewinds: s.rewinds,
            restore_threads: s.restore_threads,
            oldest_restorable: s.oldest_reachable_checkpoint,
            last_snapshot_ns: s.last_snapshot_ns,
            last_restore_ns: s.last_restore_ns,
            total_snapshot_ns: s.total_snapshot_ns,
            total_restore_ns: s.total_restore_ns,
            kernel_page_size: e.settings.sub,
            block_faults: s.block_faults,
            uffd_tracked_bytes: e.backend.uffd_bytes(),
            base_copy_bytes: e.base_bytes(),
            uffd_server_wakeups: counters.wakeups.load(Ordering::Relaxed),
            uffd_spin_hits: counters.spin_hits.load(Ordering::Relaxed),
            uffd_user_mode_only: e.active_backend() == Backend::LinuxUffd
                && crate::sys::uffd_support().user_mode_only,
            excluded_bytes: s.excluded_bytes,
            eager_pages: s.eager_pages,
            thread_descriptors: e.settings.threads.is_some(),
            verify_pages_checked: s.verify_pages_checked,
            saved_delta_pages: s.saved_delta_pages,
            saved_kept_bytes: s.saved_kept_bytes,
            memory_budget: e.memory_budget().unwrap_or(0),
        };
        let n = size.min(core::mem::size_of::<MemsnapStats>());
        // SAFETY: the caller provides `size` writable bytes at `out`; `n` is no more than
        // that nor than the record's size.
        unsafe {
            core::ptr::copy_nonoverlapping(
                &record as *const MemsnapStats as *const u8,
                out as *mut u8,
                n,
            )
        };
        Ok(())
    })())
}

/// A static, NUL-terminated description of a status.
#[no_mangle]
pub extern "C" fn memsnap_status_string(status: MemsnapStatusArg) -> *const c_char {
    let s: &'static core::ffi::CStr = match status.0 {
        0 => c"ok",
        1 => c"InitializeMemorySnapshots has not run",
        2 => c"only allowed before the first snapshot",
        3 => c"invalid argument",
        4 => c"part of the range is not tracked",
        5 => c"not supported by this kernel or process",
        _ => c"unknown status",
    };
    s.as_ptr()
}

/// Turns the verifying mode on or off (default: on when the environment variable
/// MEMSNAP_VERIFY is 1, off when it is unset or 0). At every checkpoint it hashes every
/// page the program can observe (the private mappings the kernel lists as writable, or
/// anonymous and readable, less memsnap's named exclusions), independently of what
/// memsnap tracks; after every restore call it compares them and aborts with a message
/// naming the first range that differs, its mapping and whether memsnap tracked it. Slow
/// by design: every checkpoint and restore call reads all of that memory. Only between
/// InitializeMemorySnapshots and the first snapshot.
#[no_mangle]
pub extern "C" fn memsnap_set_verify(enabled: bool) -> MemsnapStatus {
    status((|| {
        let e = engine_before_start()?;
        e.set_verify(enabled);
        Ok(())
    })())
}

/// Bounds memsnap's own memory beyond the saved pre-images, in bytes (0: no bound, the
/// default; the environment variable MEMSNAP_MEMORY_BUDGET sets it too, e.g. `256m`). The
/// automatic backend choice honours it: the uffd-async backend keeps a base copy of every
/// resident tracked page, so under a budget it is chosen only if the process's resident
/// private memory (the registered ranges' total in registered-only mode) fits; otherwise
/// auto falls back to sync uffd, whose own memory is a few percent of the tracked bytes.
/// A backend chosen by name is used as asked. Before InitializeMemorySnapshots or between
/// it and the first snapshot (AlreadyStarted after).
#[no_mangle]
pub extern "C" fn memsnap_set_memory_budget(bytes: usize) -> MemsnapStatus {
    status((|| {
        match engine::get() {
            None => engine::request_memory_budget(bytes),
            Some(e) => {
                if !e.set_memory_budget(bytes) {
                    return Err(MemsnapStatus::AlreadyStarted);
                }
            }
        }
        Ok(())
    })())
}

/// Chooses the write-tracking mechanism (Linux): Auto (the default), Mprotect, Uffd or
/// UffdAsync. Before InitializeMemorySnapshots or between it and the first snapshot
/// (AlreadyStarted after); overrides the environment variable MEMSNAP_BACKEND (`auto`,
/// `mprotect`, `uffd`, `uffd-async`). Unsupported when this kernel or process cannot
/// provide it (no userfaultfd permission, a kernel before 6.7 for UffdAsync, macOS),
/// InvalidArgument for an unknown value. memsnap_get_stats reports what was chosen.
#[no_mangle]
pub extern "C" fn memsnap_set_backend(backend: MemsnapBackendRequestArg) -> MemsnapStatus {
    status((|| {
        let choice = match backend.0 {
            0 => engine::BackendChoice::Auto,
            1 => engine::BackendChoice::Mprotect,
            2 => engine::BackendChoice::Uffd,
            3 => engine::BackendChoice::UffdAsync,
            _ => return Err(MemsnapStatus::InvalidArgument),
        };
        if engine::backend_unavailable(choice).is_some() {
            return Err(MemsnapStatus::Unsupported);
        }
        match engine::get() {
            None => engine::request_backend(choice),
            Some(e) if e.phase() == Phase::Initialized => e.backend.set_requested(choice),
            Some(_) => return Err(MemsnapStatus::AlreadyStarted),
        }
        Ok(())
    })())
}

/// The snapshot page size in bytes: the unit memsnap tracks, copies and restores, and
/// the alignment of tracked allocations. The kernel's page unless set larger; 0 before
/// initialization.
#[no_mangle]
pub extern "C" fn memsnap_page_size() -> usize {
    engine::get().map(|e| e.settings.page).unwrap_or(0)
}

/// Sets the snapshot page size: a power of two, a multiple of the kernel's page and at
/// most 16 of them (so 16 KiB or 64 KiB on a 4 KiB kernel). Only before
/// InitializeMemorySnapshots (AlreadyStarted after it); without this call the environment
/// variable MEMSNAP_PAGE_SIZE (e.g. `16384` or `16k`) is used, else the kernel's page.
/// Larger pages mean fewer faults and mappings for scattered writes, and more bytes
/// copied per fault.
#[no_mangle]
pub extern "C" fn memsnap_set_page_size(size: usize) -> MemsnapStatus {
    if engine::get().is_some() {
        return MemsnapStatus::AlreadyStarted;
    }
    match engine::request_page_size(size) {
        Ok(()) => MemsnapStatus::Ok,
        Err(_) => MemsnapStatus::InvalidArgument,
    }
}
