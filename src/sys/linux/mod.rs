//! The Linux side of the platform boundary: `/proc/self/maps` for the region walk, `mprotect`
//! for protection, SIGSEGV for fault capture, `/proc/self/task/*/syscall` for thread stacks,
//! and binding memsnap's lazy PLT slots ahead of time (`bind`).

mod altstack;
mod bind;
mod glibc;
mod maps;
mod own_object;
mod pagemap;
mod procmap;
pub mod raw;
mod signals;
#[cfg(test)]
mod testkit;
mod threads;
mod uffd;
mod wp_split;

pub use altstack::signal_stack_of;
pub use bind::bind_exports;
pub use glibc::ThreadLayout;
pub use own_object::for_each_writable_segment as for_each_own_writable_segment;
pub use pagemap::{pagemap_close, pagemap_open, scan_populated, scan_written};
pub use signals::FaultCallback;
pub use threads::{
    current_errno_location, current_rseq_area, current_signal_stack, current_sp,
    exited_threads_cpu_ns, for_each_thread_sp, rseq_layout, settle_threads,
};
pub use uffd::{
    uffd_close, uffd_disarm_quietly, uffd_open, uffd_protect, uffd_register, uffd_serve,
    uffd_support, uffd_unregister,
};

use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::{Access, Region, RegionKind};

/// The name of the write-tracking mechanism this backend provides.
pub const BACKEND: super::Backend = super::Backend::LinuxMprotect;

pub fn os_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if v <= 0 {
        4096
    } else {
        v as usize
    }
}

pub fn cpu_count() -> usize {
    // SAFETY: a zeroed cpu_set_t is a valid output buffer for sched_getaffinity.
    unsafe {
        let mut set: libc::cpu_set_t = core::mem::zeroed();
        if libc::sched_getaffinity(0, core::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
            let n = libc::CPU_COUNT(&set);
            if n > 0 {
                return n as usize;
            }
        }
    }
    1
}

/// Reserves `len` bytes of zeroed, readable and writable memory that the kernel commits
/// lazily (MAP_NORESERVE), for the library's own state.
pub fn reserve(len: usize) -> Option<*mut u8> {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let r = unsafe {
        raw::mmap(
            0,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    raw::check(r).ok().map(|a| a as *mut u8)
}

/// Maps `len` bytes of ordinary anonymous read-write memory, preferably at `hint`.
pub fn map_with_hint(hint: usize, len: usize) -> Option<*mut u8> {
    // SAFETY: without MAP_FIXED the hint never replaces an existing mapping.
    let r = unsafe {
        raw::mmap(
            hint,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    raw::check(r).ok().map(|a| a as *mut u8)
}

/// Unmaps a range this library mapped.
///
/// # Safety
/// Nothing may use `[addr, addr + len)` afterwards.
pub unsafe fn release(addr: *mut u8, len: usize) {
    // SAFETY: forwarded contract.
    unsafe {
        raw::munmap(addr as usize, len);
    }
}

/// Changes the protection of page-aligned `[addr, addr + len)`.
///
/// # Safety
/// The range holds no memory whose protection the Rust program relies on.
pub unsafe fn protect(addr: usize, len: usize, access: Access) -> Result<(), i32> {
    // SAFETY: forwarded contract.
    raw::check(unsafe { raw::mprotect(addr, len, super::unix::prot_bits(access)) }).map(|_| ())
}

/// Returns private pages to their pristine state: zero for anonymous memory, the file's
/// contents for private file mappings.
///
/// # Safety
/// Nothing relies on the current contents of `[addr, addr + len)`.
pub unsafe fn discard(addr: usize, len: usize) -> Result<(), i32> {
    // SAFETY: forwarded contract.
    raw::check(unsafe { raw::madvise(addr, len, libc::MADV_DONTNEED) }).map(|_| ())
}

pub fn write_stderr(bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        let n = raw::write(2, rest);
        if n <= 0 {
            break;
        }
        rest = &rest[n as usize..];
    }
}

/// Kills the process with SIGABRT without running any libc code: glibc's `abort` takes
/// a lock in its own (possibly write-protected) data, which from a fault handler would
/// fault again.
pub fn abort() -> ! {
    raw::abort()
}

pub fn tid() -> u64 {
    raw::gettid()
}

pub fn pid() -> u64 {
    raw::getpid()
}

pub fn yield_now() {
    raw::sched_yield()
}

pub fn futex_wait(word: &core::sync::atomic::AtomicU32, expected: u32) {
    raw::futex_wait(word, expected)
}

pub fn futex_wake(word: &core::sync::atomic::AtomicU32, n: u32) {
    raw::futex_wake(word, n)
}

pub fn sleep_ns(ns: u64) {
    raw::sleep_ns(ns)
}

/// Why the region walk could not produce a listing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WalkError {
    /// The scratch buffer could not hold the listing; the walk needs a larger one.
    ScratchTooSmall,
    /// The listing could not be read; carries errno.
    Io(i32),
}

/// Whether the kernel has the PROCMAP_QUERY ioctl. Set once, by [`prepare`]: this static
/// lives in the library's own data segment, which whole-process mode tracks, so nothing
/// may write it once snapshots are taken.
static PROCMAP_QUERY: AtomicBool = AtomicBool::new(false);

/// Calls `f(start, end)` for each writable mapping overlapping `[start, end)`, clipped to
/// it; `false` when the platform cannot tell cheaply (the caller must not rely on it).
pub fn for_each_writable_mapping(start: usize, end: usize, f: impl FnMut(usize, usize)) -> bool {
    PROCMAP_QUERY.load(Ordering::Relaxed) && procmap::writable(start, end, f).is_ok()
}

/// glibc's static TLS block (descriptor included), which it carves off the top of every
/// thread stack, a caller-supplied one too. Set once by [`prepare`] (see `PROCMAP_QUERY`
/// for why a library static may be written only then).
static STATIC_TLS: AtomicUsize = AtomicUsize::new(0);

/// Probes what the platform offers; called by `InitializeMemorySnapshots`, before
/// anything is write-protected.
pub fn prepare() {
    let works = procmap::walk(|_| {}).is_ok();
    PROCMAP_QUERY.store(works, Ordering::Relaxed);
    STATIC_TLS.store(glibc::static_tls_bytes(), Ordering::Relaxed);
}

/// The bytes to map for a library thread that needs `usable` bytes of stack: glibc takes
/// the thread's static TLS and descriptor from the top of the stack it is given, and a
/// host with large `__thread` arrays would leave too little (or fail `pthread_create`).
pub fn thread_stack_bytes(usable: usize) -> usize {
    let page = os_page_size();
    let extra = STATIC_TLS.load(Ordering::Relaxed).div_ceil(page) * page;
    usable + extra
}

/// Calls `f` for every mapping of the process in ascending address order. `scratch` is
/// library-owned memory that receives the raw listing.
pub fn walk_regions(scratch: &mut [u8], mut f: impl FnMut(Region)) -> Result<(), WalkError> {
    if PROCMAP_QUERY.load(Ordering::Relaxed) {
        let mut any = false;
        match procmap::walk(|vma| {
            any = true;
            f(region(vma))
        }) {
            Ok(()) => return Ok(()),
            Err(e) if any => return Err(WalkError::Io(e)),
            // Anything else (the open failed): the text path reports it.
            Err(_) => {}
        }
    }
    let fd = raw::check(raw::open(b"/proc/self/maps\0", 0)).map_err(WalkError::Io)? as i32;
    let mut len = 0usize;
    loop {
        if len == scratch.len() {
            raw::close(fd);
            return Err(WalkError::ScratchTooSmall);
        }
        match raw::check(raw::read(fd, &mut scratch[len..])) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(libc::EINTR) => continue,
            Err(e) => {
                raw::close(fd);
                return Err(WalkError::Io(e));
            }
        }
    }
    raw::close(fd);
    for vma in maps::MapsIter::new(&scratch[..len]) {
        f(region(vma));
    }
    Ok(())
}

fn region(vma: maps::Vma) -> Region {
    Region {
        start: vma.start,
        end: vma.end,
        read: vma.read,
        write: vma.write,
        exec: vma.exec,
        private: vma.private,
        kind: match vma.backing {
            maps::Backing::Heap => RegionKind::Heap,
            maps::Backing::Stack => RegionKind::MainStack,
            maps::Backing::Kernel => RegionKind::Kernel,
            maps::Backing::File => RegionKind::File,
            maps::Backing::Anonymous | maps::Backing::OtherNamed => RegionKind::Anonymous,
        },
    }
}

/// The program break: the end of the brk heap. The kernel keeps it outside the process's
/// memory, so rewinding memory does not move it back.
pub fn program_break() -> usize {
    // SAFETY: brk(0) only reports the current break.
    unsafe { raw::brk(0) }
}

/// Moves the program break down to `addr` (below the current one), unmapping the heap
/// above it; whether the break is at `addr` afterwards.
///
/// # Safety
/// Nothing may use the memory between `addr` and the current break.
pub unsafe fn lower_program_break(addr: usize) -> bool {
    // SAFETY: forwarded contract.
    unsafe { raw::brk(addr) == addr }
}

/// The most mappings the kernel lets this process have (`vm.max_map_count`), if known.
/// Splitting mappings past it makes `mprotect` fail with ENOMEM.
/// The process's resident memory less what is shared with files (`/proc/self/statm`'s
/// resident minus shared pages), in bytes: about its resident anonymous memory. `None`
/// when it cannot be read.
pub fn resident_private_bytes() -> Option<usize> {
    let mut buf = [0u8; 256];
    // SAFETY: opening a NUL-terminated path, reading into a buffer on this frame, closing
    // the descriptor opened here.
    let n = unsafe {
        let fd = libc::open(
            c"/proc/self/statm".as_ptr(),
            libc::O_RDONLY | libc::O_CLOEXEC,
        );
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr() as *mut libc::c_void, buf.len());
        libc::close(fd);
        n
    };
    let (resident, shared) = parse_statm(buf.get(..usize::try_from(n).ok()?)?)?;
    Some(resident.saturating_sub(shared) * os_page_size())
}

/// The resident and shared page counts of a `/proc/<pid>/statm` line (its second and
/// third fields).
pub fn parse_statm(text: &[u8]) -> Option<(usize, usize)> {
    let mut fields = text
        .split(|&b| b == b' ' || b == b'\n')
        .filter(|f| !f.is_empty())
        .map(|f| {
            f.iter().try_fold(0usize, |n, &d| {
                d.is_ascii_digit()
                    .then(|| n.checked_mul(10)?.checked_add((d - b'0') as usize))
                    .flatten()
            })
        });
    let _size = fields.next()??;
    Some((fields.next()??, fields.next()??))
}

pub fn max_map_count() -> Option<usize> {
    let fd = raw::check(raw::open(b"/proc/sys/vm/max_map_count\0", 0)).ok()? as i32;
    let mut buf = [0u8; 32];
    let n = raw::check(raw::read(fd, &mut buf));
    raw::close(fd);
    let n = n.ok()?;
    let mut v = 0usize;
    for &d in buf[..n].iter().take_while(|d| d.is_ascii_digit()) {
        v = v.checked_mul(10)?.checked_add((d - b'0') as usize)?;
    }
    (v > 0).then_some(v)
}

pub fn install_fault_handler(callback: FaultCallback) -> Result<(), i32> {
    signals::install(callback)
}

pub fn fault_handler_installed() -> bool {
    signals::still_installed()
}

/// With `pin`, keeps glibc malloc from returning memory to the kernel (no mmap'd chunks,
/// no trimming, one arena), so that memory tracked at a checkpoint is still mapped at
/// every rewind; without, puts glibc's documented defaults back.
pub fn pin_allocator(pin: bool) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only adjusts glibc malloc tunables.
    unsafe {
        if pin {
            libc::mallopt(libc::M_MMAP_MAX, 0);
            libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
            libc::mallopt(libc::M_ARENA_MAX, 1);
        } else {
            libc::mallopt(libc::M_MMAP_MAX, 65536);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 * 1024);
            libc::mallopt(libc::M_ARENA_MAX, 0);
        }
    }
    #[cfg(not(target_env = "gnu"))]
    let _ = pin;
}

#[cfg(test)]
mod tests {
    use super::parse_statm;

    #[test]
    fn statm_fields_parse() {
        assert_eq!(
            parse_statm(b"61234 2345 1200 12 0 4567 0\n"),
            Some((2345, 1200))
        );
        assert_eq!(parse_statm(b"1 2"), None);
        assert_eq!(parse_statm(b"1 x 3"), None);
        assert_eq!(parse_statm(b""), None);
    }
}
