//! The macOS side of the platform boundary: `mach_vm_region_recurse` for the region walk,
//! `mach_vm_protect` for protection, a Mach exception port served by a library thread for
//! fault capture (SIGBUS/SIGSEGV when exception ports are not usable), `task_threads` and
//! `thread_get_state` for thread stacks, `__ulock_wait`/`__ulock_wake` for the futex.
//!
//! State the fault path writes lives in [`Shared`], a block this module maps itself and
//! the region walk reports as never trackable: the library's statics are in its data
//! segment, which whole-process mode tracks, so they are written only before the first
//! snapshot (the pointer to the block and the `pthread_atfork` registration).

mod exc_server;
mod imports;
mod regions;
mod signals;
mod threads;
mod uffd_stub;

pub use regions::{discard, protect, walk_regions, WalkError};

/// macOS keeps a thread's TLS apart from the stack it is given.
pub fn thread_stack_bytes(usable: usize) -> usize {
    usable
}

/// Calls `f(start, end)` for each writable segment of the dylib that holds memsnap's code,
/// widened to kernel pages (`page`), so that its statics and dyld's lazy pointers for its
/// imports are never tracked (see `sys/mach_image.rs`); nothing when memsnap is part of the
/// program itself (the rlib in a test executable), whose data is the program's.
pub fn for_each_own_writable_segment(page: usize, mut f: impl FnMut(usize, usize)) {
    fn marker() {}
    let marker = marker as fn() as *const libc::c_void;
    // SAFETY: dladdr fills `info` for an address inside a loaded image; zeroed is a valid
    // Dl_info to start from.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: `marker` is this function's address; `info` is writable.
    if unsafe { libc::dladdr(marker, &mut info) } == 0 || info.dli_fbase.is_null() {
        return;
    }
    // SAFETY: image 0 is the main executable, whose header dyld keeps mapped.
    let program = unsafe { mach2::dyld::_dyld_get_image_header(0) };
    if core::ptr::eq(program as *const libc::c_void, info.dli_fbase) {
        return;
    }
    let base = info.dli_fbase as *const u8;
    // SAFETY: dli_fbase is the image's mapped Mach-O header; its first 32 bytes are the
    // header, and the load commands follow it within the mapped __TEXT segment.
    let head = unsafe { core::slice::from_raw_parts(base, 32) };
    let Some(len) = super::mach_image::commands_end(head) else {
        return;
    };
    // SAFETY: as above: header and load commands, `len` bytes, all mapped.
    let image = unsafe { core::slice::from_raw_parts(base, len) };
    let _ = super::mach_image::for_each_writable_segment(image, base as usize, |start, end| {
        let lo = start & !(page - 1);
        let hi = end.next_multiple_of(page);
        if lo < hi {
            f(lo, hi);
        }
    });
}
pub use threads::{
    current_errno_location, current_rseq_area, current_signal_stack, current_sp,
    exited_threads_cpu_ns, for_each_thread_sp, rseq_layout, settle_threads, signal_stack_of,
    ThreadLayout,
};

use super::mach_exc::OldHandler;
use super::Backend;
use core::cell::UnsafeCell;
use core::mem::MaybeUninit;
use core::sync::atomic::{AtomicBool, AtomicPtr, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// The engine's decision function: `true` when the fault at this address was a write to
/// tracked memory and has been resolved, so the instruction can be retried.
pub type FaultCallback = fn(usize) -> bool;

/// The exception server's: the same for a write by the given thread, or `None` when it
/// must be asked again later (memory changes are disallowed by another thread).
pub type ServedFaultCallback = fn(usize, u64) -> Option<bool>;

/// The VM tag of memory this library maps for itself (one of the application-specific
/// tags, 240-255). Mappings with different tags are never coalesced, so the library's
/// memory never shares a region with the host's; the walk reports only the ranges
/// recorded in [`Shared::own`] as the library's.
const OWN_TAG: u8 = 245;

/// Everything the fault path and the fork handler write, in library-mapped memory.
pub(crate) struct Shared {
    callback: AtomicUsize,
    /// A [`ServedFaultCallback`] (0 until set).
    served: AtomicUsize,
    /// The dyld shared cache's range, read once at installation (see
    /// `regions::shared_cache_range`).
    cache: (AtomicUsize, AtomicUsize),
    backend: AtomicU32,
    /// The exception server's thread id, and while it runs the callback for a faulting
    /// thread, that thread's id (what [`tid`] then answers, as on Linux, where the
    /// handler runs on the faulting thread itself).
    server_tid: AtomicU64,
    faulting_tid: AtomicU64,
    /// `mach_task_self()` when the port was installed.
    task: AtomicU32,
    port: AtomicU32,
    /// The handlers installed before ours, for forwarding; `old` is written before
    /// `old_count` is published and never after.
    old_count: AtomicUsize,
    old: UnsafeCell<[OldHandler; MAX_OLD]>,
    /// The SIGBUS and SIGSEGV dispositions found when the fallback handler was installed.
    signals_installed: AtomicBool,
    previous: UnsafeCell<[MaybeUninit<libc::sigaction>; 2]>,
    /// The library-mapped ranges of this module (this block, the server's block).
    own: [(AtomicUsize, AtomicUsize); 2],
    /// `abort`, looked up at installation (see `imports`); 0 if not found.
    abort: AtomicUsize,
}

const MAX_OLD: usize = 32;

// SAFETY: the UnsafeCell fields are written only before the value they guard is published
// (`old_count`, `signals_installed`) by the single thread that installs the handler, and
// only read afterwards.
unsafe impl Sync for Shared {}

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(core::ptr::null_mut());

fn shared() -> Option<&'static Shared> {
    let p = SHARED.load(Ordering::Acquire);
    // SAFETY: set once to a block that is never unmapped.
    (!p.is_null()).then(|| unsafe { &*p })
}

impl Shared {
    fn callback(&self) -> Option<FaultCallback> {
        let f = self.callback.load(Ordering::Acquire);
        // SAFETY: only ever stores a FaultCallback cast to usize (or 0).
        (f != 0).then(|| unsafe { core::mem::transmute::<usize, FaultCallback>(f) })
    }

    fn served(&self) -> Option<ServedFaultCallback> {
        let f = self.served.load(Ordering::Acquire);
        // SAFETY: only ever stores a ServedFaultCallback cast to usize (or 0).
        (f != 0).then(|| unsafe { core::mem::transmute::<usize, ServedFaultCallback>(f) })
    }

    fn shared_cache(&self) -> (usize, usize) {
        (
            self.cache.0.load(Ordering::Relaxed),
            self.cache.1.load(Ordering::Relaxed),
        )
    }

    fn old_handlers(&self) -> &[OldHandler] {
        let n = self.old_count.load(Ordering::Acquire);
        // SAFETY: `old[..n]` was written before `n` was published and is never written
        // again.
        let old: &[OldHandler; MAX_OLD] = unsafe { &*self.old.get() };
        &old[..n.min(MAX_OLD)]
    }
}

/// Which capture is active; `Backend::None` before the first snapshot installs one.
pub fn active_backend() -> Backend {
    match shared().map_or(0, |s| s.backend.load(Ordering::Acquire)) {
        2 => Backend::MacExceptionPort,
        3 => Backend::MacSignal,
        _ => Backend::None,
    }
}

/// macOS malloc does not use a brk heap: nothing to put back after a rewind.
pub fn program_break() -> usize {
    0
}

/// See [`program_break`].
///
/// # Safety
/// None needed: nothing happens.
pub unsafe fn lower_program_break(_addr: usize) -> bool {
    false
}

/// No cheap query for writable regions only; see the Linux backend.
pub fn for_each_writable_mapping(_start: usize, _end: usize, _f: impl FnMut(usize, usize)) -> bool {
    false
}

/// Nothing to probe ahead of time on macOS; see the Linux backend.
pub fn prepare() {}

/// Binds nothing in the host: dyld's lazy pointers (`__la_symbol_ptr`) are not bound
/// ahead of time, so hosts link with `-bind_at_load` (see docs/hazards.md); libmemsnap's
/// own are bound when the fault capture is installed (see `imports`). Returns the slots
/// written.
pub fn bind_exports() -> Result<usize, &'static str> {
    Ok(0)
}

/// macOS has no per-process mapping limit like Linux's vm.max_map_count.
/// Resident private memory, for the memory budget; only the Linux async backend has a
/// base copy to weigh against it, so macOS needs no estimate.
pub fn resident_private_bytes() -> Option<usize> {
    None
}

pub fn max_map_count() -> Option<usize> {
    None
}

pub fn os_page_size() -> usize {
    // SAFETY: libSystem initializes vm_page_size before any user code runs: 16 KiB on
    // Apple Silicon, 4 KiB on Intel and for x86_64 processes under Rosetta.
    let v = unsafe { mach2::vm_page_size::vm_page_size };
    if v != 0 {
        return v;
    }
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 {
        16384
    } else {
        v as usize
    }
}

pub fn cpu_count() -> usize {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    if v <= 0 {
        1
    } else {
        v as usize
    }
}

/// Maps `len` bytes of zeroed read-write memory for the library's own state, tagged
/// [`OWN_TAG`] so that it never coalesces with the host's mappings.
pub fn reserve(len: usize) -> Option<*mut u8> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing; for
    // MAP_ANON the descriptor argument carries the VM tag.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANON,
            libc::VM_MAKE_TAG(OWN_TAG) as i32,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

/// Maps `len` bytes of ordinary anonymous read-write memory, preferably at `hint`.
pub fn map_with_hint(hint: usize, len: usize) -> Option<*mut u8> {
    // SAFETY: without MAP_FIXED the hint never replaces an existing mapping.
    let p = unsafe {
        libc::mmap(
            hint as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANON,
            -1,
            0,
        )
    };
    (p != libc::MAP_FAILED).then_some(p as *mut u8)
}

/// # Safety
/// Nothing may use `[addr, addr + len)` afterwards.
pub unsafe fn release(addr: *mut u8, len: usize) {
    // SAFETY: forwarded contract.
    unsafe {
        libc::munmap(addr as *mut libc::c_void, len);
    }
}

pub fn write_stderr(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: writing from a live slice.
        let n = unsafe { libc::write(2, rest.as_ptr() as *const libc::c_void, rest.len()) };
        if n <= 0 {
            break;
        }
        rest = &rest[n as usize..];
    }
}

pub fn abort() -> ! {
    let f = shared().map_or(0, |s| s.abort.load(Ordering::Relaxed));
    if f != 0 {
        // SAFETY: the address dlsym gave for libSystem's `abort` (see `imports`), called
        // through it so that its lazy stub is not bound inside a fault.
        let f = unsafe { core::mem::transmute::<usize, extern "C" fn() -> !>(f) };
        f();
    }
    // SAFETY: abort never returns. Unlike glibc's, libSystem's abort keeps its state in
    // the shared cache, which is never tracked.
    unsafe { libc::abort() }
}

fn raw_tid() -> u64 {
    let mut id = 0u64;
    // SAFETY: querying the calling thread's id into a local.
    unsafe { libc::pthread_threadid_np(0 as libc::pthread_t, &mut id) };
    id
}

/// The calling thread's id (`pthread_threadid_np`, what `task_threads` reports too). On
/// the exception server thread, while it resolves a fault, the faulting thread's.
pub fn tid() -> u64 {
    let me = raw_tid();
    if let Some(s) = shared() {
        if s.server_tid.load(Ordering::Relaxed) == me {
            let f = s.faulting_tid.load(Ordering::Relaxed);
            if f != 0 {
                return f;
            }
        }
    }
    me
}

pub fn pid() -> u64 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() as u64 }
}

pub fn yield_now() {
    // SAFETY: sched_yield has no preconditions.
    unsafe {
        libc::sched_yield();
    }
}

// The futex. `__ulock_wait`/`__ulock_wake` are what Rust's std (before macOS 14.4's
// `os_sync_wait_on_address`) and libc++'s `atomic::wait` use: present since macOS 10.12,
// so on every version both targets support, with no `dlsym` (which takes loader locks)
// or weak linking needed. `os_sync_wait_on_address` would need a 14.4 check and this as
// the fallback anyway. (Foreign declarations sit inside the functions that use them so
// that cbindgen, which reads module-level items, keeps them out of the public header.)
const UL_COMPARE_AND_WAIT: u32 = 1;
const ULF_WAKE_ALL: u32 = 0x100;
const ULF_NO_ERRNO: u32 = 0x0100_0000;

/// Sleeps while `word` holds `expected` (returns at once otherwise, and may return
/// spuriously: callers re-check).
pub fn futex_wait(word: &AtomicU32, expected: u32) {
    extern "C" {
        // libSystem's private but stable futex (see above).
        fn __ulock_wait(op: u32, addr: *mut libc::c_void, value: u64, timeout_us: u32) -> i32;
    }
    // SAFETY: `word` is a live, aligned 32-bit atomic; the kernel only reads it.
    unsafe {
        __ulock_wait(
            UL_COMPARE_AND_WAIT | ULF_NO_ERRNO,
            word.as_ptr() as *mut libc::c_void,
            expected as u64,
            0,
        );
    }
}

/// Wakes one waiter on `word`, or all of them when `n > 1`.
pub fn futex_wake(word: &AtomicU32, n: u32) {
    extern "C" {
        fn __ulock_wake(op: u32, addr: *mut libc::c_void, wake_value: u64) -> i32;
    }
    let all = if n > 1 { ULF_WAKE_ALL } else { 0 };
    // SAFETY: as above; waking has no memory effects.
    unsafe {
        __ulock_wake(
            UL_COMPARE_AND_WAIT | ULF_NO_ERRNO | all,
            word.as_ptr() as *mut libc::c_void,
            0,
        );
    }
}

pub fn sleep_ns(ns: u64) {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: nanosleep reads the timespec on this frame.
    unsafe {
        libc::nanosleep(&ts, core::ptr::null_mut());
    }
}

/// Whether the process runs under the hardened runtime (or is a platform binary), where
/// `task_set_exception_ports` with a behavior that passes the task control port can kill
/// the process with `EXC_GUARD` (`kGUARD_EXC_EXCEPTION_BEHAVIOR_ENFORCE`) instead of
/// returning an error, so there is nothing to fall back from: we must not try.
fn exception_ports_guarded() -> bool {
    extern "C" {
        // In libSystem; not declared by the libc crate.
        fn csops(pid: libc::pid_t, ops: u32, useraddr: *mut libc::c_void, size: usize) -> i32;
    }
    const CS_OPS_STATUS: u32 = 0;
    const CS_RUNTIME: u32 = 0x0001_0000;
    const CS_PLATFORM_BINARY: u32 = 0x0400_0000;
    let mut flags = 0u32;
    // SAFETY: CS_OPS_STATUS writes one u32 into `flags`.
    let r = unsafe {
        csops(
            libc::getpid(),
            CS_OPS_STATUS,
            &mut flags as *mut u32 as *mut libc::c_void,
            4,
        )
    };
    r == 0 && flags & (CS_RUNTIME | CS_PLATFORM_BINARY) != 0
}

/// `MEMSNAP_FAULT_CAPTURE=signal` or `=mach` overrides the choice.
fn wants_exception_port() -> bool {
    // SAFETY: getenv with a NUL-terminated name; the result is read before returning.
    let v = unsafe { libc::getenv(c"MEMSNAP_FAULT_CAPTURE".as_ptr()) };
    if !v.is_null() {
        // SAFETY: getenv returned a NUL-terminated string.
        let v = unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes();
        match v {
            b"signal" => return false,
            b"mach" => return true,
            _ => {}
        }
    }
    !exception_ports_guarded()
}

/// Installs fault capture once per process: the exception port when usable, otherwise
/// the SIGBUS/SIGSEGV handler. Later calls only swap the callback.
pub fn install_fault_handler(callback: FaultCallback) -> Result<(), i32> {
    if let Some(s) = shared() {
        s.callback.store(callback as usize, Ordering::Release);
        return Ok(());
    }
    let bytes = core::mem::size_of::<Shared>();
    let block = reserve(bytes).ok_or(libc::ENOMEM)? as *mut Shared;
    // SAFETY: a fresh, page-aligned mapping of the right size; every field is an atomic,
    // a plain array or MaybeUninit, for which zero is a valid value.
    let s: &'static Shared = unsafe {
        core::ptr::write_bytes(block as *mut u8, 0, bytes);
        &*block
    };
    s.own[0].0.store(block as usize, Ordering::Relaxed);
    s.own[0].1.store(bytes, Ordering::Relaxed);
    // Before anything is protected: these run dyld's binder and take its lock.
    s.abort
        .store(imports::bind_fault_path_imports(), Ordering::Relaxed);
    let (cache_start, cache_end) = regions::shared_cache_range();
    s.cache.0.store(cache_start, Ordering::Relaxed);
    s.cache.1.store(cache_end, Ordering::Relaxed);
    s.callback.store(callback as usize, Ordering::Release);
    SHARED.store(block, Ordering::Release);

    // The signal handlers are installed in either mode: with the exception port they
    // catch what the server refuses, above all the faults of a fork child before its
    // atfork handler runs (it inherited the port, and the server answers other tasks'
    // faults with KERN_FAILURE, which the kernel turns into SIGBUS in the child).
    signals::install(s)?;
    let backend = if wants_exception_port() && exc_server::install(s).is_ok() {
        Backend::MacExceptionPort
    } else {
        Backend::MacSignal
    };
    s.backend.store(backend as u32, Ordering::Release);
    // SAFETY: registering a plain function; pthread_atfork has no other preconditions.
    unsafe { libc::pthread_atfork(None, None, Some(after_fork_in_child)) };
    Ok(())
}

/// A forked child has no exception server (threads do not survive fork) and its task
/// exception port still names the parent's, which refuses faults from other tasks; the
/// child switches to the signal handlers it inherited, installed in Mach mode too, so
/// that it keeps its tracking (its tracked pages are still write-protected), and a write
/// before this handler runs is caught by them as well. The parent's earlier handlers
/// cannot be reached from the child (port names do not survive fork): foreign faults in
/// the child go to its signal handlers.
extern "C" fn after_fork_in_child() {
    let Some(s) = shared() else { return };
    if s.backend.load(Ordering::Acquire) != Backend::MacExceptionPort as u32 {
        return;
    }
    exc_server::uninstall_in_child();
    if signals::install(s).is_err() {
        write_stderr(b"memsnap: fork: cannot install the SIGBUS handler in the child\n");
        abort();
    }
    s.backend
        .store(Backend::MacSignal as u32, Ordering::Release);
}

/// Sets the exception server's callback (see [`ServedFaultCallback`]); call after
/// [`install_fault_handler`]. Until it is set, the server treats no fault as memsnap's,
/// which is right while nothing is protected.
pub fn set_served_fault_callback(callback: ServedFaultCallback) {
    if let Some(s) = shared() {
        s.served.store(callback as usize, Ordering::Release);
    }
}

/// Whether our capture still receives the faults (someone may have replaced it since).
pub fn fault_handler_installed() -> bool {
    match shared() {
        Some(s) => match s.backend.load(Ordering::Acquire) {
            2 => exc_server::still_installed(s),
            3 => signals::still_installed(),
            _ => false,
        },
        None => false,
    }
}

/// glibc's malloc can be pinned with `mallopt`; libmalloc has no run-time equivalent
/// (its tunables are environment variables read at process start), so tracked memory
/// that malloc returns to the kernel is reported as unmapped by the next scan.
pub fn pin_allocator(_pin: bool) {}

pub use uffd_stub::{
    pagemap_close, pagemap_open, scan_populated, scan_written, uffd_close, uffd_disarm_quietly,
    uffd_open, uffd_protect, uffd_register, uffd_serve, uffd_support, uffd_unregister,
};
