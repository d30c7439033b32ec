//! End-to-end scenarios through the C ABI, from Rust. Each runs in a forked child (the
//! library write-protects most of the process, and may be initialized once per process),
//! so this file has its own `main` instead of libtest's threaded harness: forking a
//! process with other threads running can leave the child holding their locks.

use memsnap::ffi::ext::*;
use memsnap::ffi::original::*;
use memsnap::ffi::MemoryKindArg;
use std::ptr::{addr_of, addr_of_mut};

const TRACKED: MemoryKindArg = MemoryKindArg(0);
const GENERIC: MemoryKindArg = MemoryKindArg(1);

fn check(cond: bool, what: &str) {
    if !cond {
        let msg = format!("check failed: {what}\n");
        // SAFETY: writing a live buffer to stderr.
        unsafe { libc::write(2, msg.as_ptr() as *const _, msg.len()) };
        // SAFETY: ends the child immediately.
        unsafe { libc::_exit(1) };
    }
}

fn rewind(levels: usize) {
    SetMemoryChangesAllowed(false);
    RestoreMemoryToLastSavedCheckpoint();
    for _ in 0..levels {
        RestoreMemoryToLastSavedDiffCheckpoint();
    }
    SetMemoryChangesAllowed(true);
    FixupFreeRegionsAfterRewind();
}

fn stats() -> MemsnapStats {
    // SAFETY: MemsnapStats is plain data; zero is a valid starting value.
    let mut s: MemsnapStats = unsafe { std::mem::zeroed() };
    s.struct_size = std::mem::size_of::<MemsnapStats>();
    // SAFETY: a valid, writable record.
    check(
        unsafe { memsnap_get_stats(&mut s) } == MemsnapStatus::Ok,
        "stats",
    );
    s
}

static mut GLOBAL: [u64; 4096] = [0; 4096];

fn global(i: usize) -> u64 {
    // SAFETY: single-threaded child.
    unsafe { (*addr_of!(GLOBAL))[i] }
}

fn set_global(i: usize, v: u64) {
    // SAFETY: single-threaded child.
    unsafe { (*addr_of_mut!(GLOBAL))[i] = v }
}

/// Globals, a heap block and a tracked allocation through five checkpoints, then back to
/// each of them, newest first.
fn whole_process_five_checkpoints() {
    InitializeMemorySnapshots();
    let heap = vec![0u8; 200_000].leak();
    let tracked = AllocateMemory(64 * 1024, TRACKED) as *mut u8;
    // SAFETY: 64 KiB just allocated.
    let tracked = unsafe { std::slice::from_raw_parts_mut(tracked, 64 * 1024) };
    let fingerprint = |heap: &[u8], tracked: &[u8]| -> u64 {
        let mut h = 0xcbf29ce484222325u64;
        for i in 0..4096 {
            h = (h ^ global(i)).wrapping_mul(0x100000001b3);
        }
        for &b in heap.iter().chain(tracked.iter()) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        h
    };
    let mut prints = [0u64; 5];
    TakeFirstMemorySnapshot();
    for (c, print) in prints.iter_mut().enumerate() {
        *print = fingerprint(heap, tracked);
        for i in 0..(c + 1) * 300 {
            set_global((i * 13) % 4096, (c * 1000 + i) as u64);
            heap[(i * 4099) % heap.len()] = c as u8 + 1;
            tracked[(i * 577) % tracked.len()] = c as u8 + 7;
        }
        if c < 4 {
            TakeDiffMemorySnapshot();
        }
    }
    check(stats().saved_checkpoints == 5, "five checkpoints saved");
    for target in (0..5).rev() {
        let levels = if target == 4 { 0 } else { 1 };
        rewind(levels);
        check(
            fingerprint(heap, tracked) == prints[target],
            "bytes equal the checkpoint's",
        );
    }
    check(
        stats().saved_checkpoints == 1,
        "back at the first checkpoint",
    );
}

/// Only a registered buffer is tracked; globals keep their later values.
fn registered_only() {
    InitializeMemorySnapshots();
    check(
        memsnap_set_tracking_mode(MemsnapTrackingModeArg(1)) == MemsnapStatus::Ok,
        "mode",
    );
    let len = 16 * 4096;
    // SAFETY: a fresh anonymous mapping.
    let buf = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as *mut u8;
    check(
        memsnap_track_region(buf as *mut _, len) == MemsnapStatus::Ok,
        "track",
    );
    // SAFETY: the mapping is `len` bytes.
    let b = unsafe { std::slice::from_raw_parts_mut(buf, len) };
    b.fill(1);
    set_global(0, 1);
    TakeFirstMemorySnapshot();
    check(MemoryRangeIsTracked(buf as *mut _, len), "buffer tracked");
    check(
        !MemoryRangeIsTracked(addr_of!(GLOBAL) as *mut _, 8),
        "global untracked",
    );
    b.fill(2);
    set_global(0, 2);
    rewind(0);
    check(b.iter().all(|&x| x == 1), "buffer rewound");
    check(global(0) == 2, "global not rewound");
}

/// Erasing the second-newest checkpoint keeps every other one reachable.
fn erase_folds_into_predecessor() {
    InitializeMemorySnapshots();
    TakeFirstMemorySnapshot();
    set_global(5, 1);
    set_global(9000 % 4096, 10);
    TakeDiffMemorySnapshot();
    set_global(5, 2);
    TakeDiffMemorySnapshot();
    set_global(5, 3);
    set_global(100, 7);
    EraseLastSavedDiffMemorySnapshot();
    check(stats().saved_checkpoints == 2, "one checkpoint dropped");
    rewind(0);
    check(global(5) == 2 && global(100) == 0, "newest checkpoint");
    rewind(1);
    check(
        global(5) == 0 && global(9000 % 4096) == 0,
        "first checkpoint",
    );
}

/// Untracked allocations are never rewound; tracked ones come back zeroed.
fn allocations_after_rewind() {
    InitializeMemorySnapshots();
    let untracked = AllocateMemory(4096, GENERIC) as *mut u64;
    TakeFirstMemorySnapshot();
    let t = AllocateMemory(3 * 4096, TRACKED) as *mut u64;
    // SAFETY: both blocks are at least one page.
    unsafe {
        *t = 99;
        *untracked = 5;
    }
    rewind(0);
    let again = AllocateMemory(3 * 4096, TRACKED) as *mut u64;
    check(again == t, "same tracked block handed out again");
    // SAFETY: 3 pages just allocated.
    let zero = unsafe { std::slice::from_raw_parts(again, 3 * 512) }
        .iter()
        .all(|&x| x == 0);
    check(zero, "handed out zeroed");
    // SAFETY: still mapped, untracked.
    check(unsafe { *untracked } == 5, "untracked kept");
}

/// A seeded random walk of writes, checkpoints and rewinds against a model kept in
/// untracked memory.
fn random_walk() {
    InitializeMemorySnapshots();
    const N: usize = 4096;
    let models = AllocateMemory(N * 8 * 16, GENERIC) as *mut u64;
    // SAFETY: room for 16 snapshots of the model.
    let models = unsafe { std::slice::from_raw_parts_mut(models, N * 16) };
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    TakeFirstMemorySnapshot();
    let mut depth = 1usize;
    for (i, m) in models[..N].iter_mut().enumerate() {
        *m = global(i);
    }
    for step in 0..400 {
        match rnd() % 10 {
            0..=5 => {
                for _ in 0..(rnd() % 50) {
                    let i = (rnd() as usize) % N;
                    set_global(i, rnd());
                }
            }
            6 | 7 if depth < 16 => {
                TakeDiffMemorySnapshot();
                for (i, m) in models[depth * N..(depth + 1) * N].iter_mut().enumerate() {
                    *m = global(i);
                }
                depth += 1;
            }
            _ => {
                let levels = (rnd() as usize) % depth;
                rewind(levels);
                depth -= levels;
                let base = (depth - 1) * N;
                for i in 0..N {
                    if global(i) != models[base + i] {
                        check(
                            false,
                            &format!("step {step}: word {i} differs after a rewind"),
                        );
                    }
                }
            }
        }
    }
}

/// Scattered first writes over a large heap: every other page is written, which without
/// block capture leaves each written page its own mapping and runs into
/// vm.max_map_count (mprotect fails with ENOMEM). The mapping count stays bounded, and
/// rewinds are still exact.
fn scattered_writes_stay_under_map_limit() {
    // SAFETY: sysconf has no preconditions.
    let k = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    let limit = std::fs::read_to_string("/proc/sys/vm/max_map_count")
        .ok()
        .and_then(|t| t.trim().parse::<usize>().ok())
        .unwrap_or(65530);
    // Kernel-sized snapshot pages whatever MEMSNAP_PAGE_SIZE says: the point is the
    // number of pages, and larger ones would only make this slower.
    check(memsnap_set_page_size(k) == MemsnapStatus::Ok, "page size");
    InitializeMemorySnapshots();
    let pages = limit * 5 / 4;
    let heap = AllocateMemory(pages * k, TRACKED) as *mut u8;
    // The listing is read into untracked memory: the kernel cannot write into tracked,
    // write-protected pages (read(2) would fail with EFAULT).
    let buf_len = 16 << 20;
    let buf = AllocateMemory(buf_len, GENERIC) as *mut u8;
    let maps = || {
        // SAFETY: a NUL-terminated path.
        let fd = unsafe { libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY) };
        let mut lines = 0;
        loop {
            // SAFETY: `buf` is `buf_len` writable bytes of untracked memory.
            let n = unsafe { libc::read(fd, buf as *mut _, buf_len) };
            if n <= 0 {
                check(n == 0, "reading /proc/self/maps");
                break;
            }
            // SAFETY: `n` bytes were just read into `buf`.
            let got = unsafe { std::slice::from_raw_parts(buf, n as usize) };
            lines += got.iter().filter(|&&c| c == b'\n').count();
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        lines
    };
    TakeFirstMemorySnapshot();
    for round in 1..=2u8 {
        // Every other page, in a scattered order (a stride coprime with the count).
        let half = pages / 2;
        let stride = 7919;
        for i in 0..half {
            let p = (i * stride) % half * 2 + (round as usize - 1);
            // SAFETY: inside the tracked allocation.
            unsafe { *heap.add(p * k + 8) = round };
        }
        let n = maps();
        check(n < limit, "mapping count below vm.max_map_count");
        let s = stats();
        if s.backend == MemsnapBackend::LinuxMprotect {
            check(s.block_faults > 0, "block capture engaged");
        } else {
            // Userfaultfd protection lives in page-table entries: writes split nothing.
            check(n < 1000, "no mapping splits under userfaultfd");
            check(s.block_faults == 0, "no block capture under userfaultfd");
        }
        TakeDiffMemorySnapshot();
    }
    // SAFETY: the allocation is `pages * k` bytes.
    let all = unsafe { std::slice::from_raw_parts(heap, pages * k) };
    rewind(1);
    let round_one = |i: usize| {
        if i % k == 8 && (i / k) % 2 == 0 && i / k < pages / 2 * 2 {
            1
        } else {
            0
        }
    };
    check(
        all.iter().enumerate().all(|(i, &b)| b == round_one(i)),
        "back at the checkpoint after the first round",
    );
    rewind(1);
    check(
        all.iter().all(|&b| b == 0),
        "back to zeros at the first checkpoint",
    );
    check(maps() < limit, "mapping count after the rewind");
}

/// Tracked memory the program unmaps and maps afresh at the same address between two
/// checkpoints, with dirty pages at both ends: the fresh pages in between are writable
/// but clean, which the next checkpoint must notice (its saved contents are gone), even
/// though it write-protects dirty pages in merged spans before walking the mappings.
fn remapped_tracked_memory_is_noticed() {
    // SAFETY: sysconf has no preconditions.
    let k = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    check(memsnap_set_page_size(k) == MemsnapStatus::Ok, "page size");
    InitializeMemorySnapshots();
    let len = 8 * k;
    // A raw system call, behind memsnap's back: libmemsnap's own mmap would capture the
    // range first and keep tracking it (docs/host-calls.md).
    let map = |at: usize, flags: i32| {
        // SAFETY: an anonymous mapping; with MAP_FIXED only over our own mapping.
        #[cfg(target_os = "linux")]
        let p = unsafe {
            libc::syscall(
                libc::SYS_mmap,
                at,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            ) as usize
        };
        // (Nothing is interposed outside Linux: libc's mmap is behind memsnap's back.)
        // SAFETY: as above.
        #[cfg(not(target_os = "linux"))]
        let p = unsafe {
            libc::mmap(
                at as *mut _,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                -1,
                0,
            ) as usize
        };
        p
    };
    let base = map(0, 0);
    check(base != libc::MAP_FAILED as usize, "mmap");
    // SAFETY: the mapping is `len` bytes.
    unsafe { std::ptr::write_bytes(base as *mut u8, 1, len) };
    TakeFirstMemorySnapshot();
    check(MemoryRangeIsTracked(base as *mut _, len), "tracked");
    // SAFETY: the first and last pages of the mapping.
    unsafe {
        *(base as *mut u8) = 2;
        *((base + 7 * k) as *mut u8) = 2;
    }
    check(map(base, libc::MAP_FIXED) == base, "mapped afresh in place");
    check(stats().oldest_restorable == 0, "nothing noticed yet");
    TakeDiffMemorySnapshot();
    check(
        stats().oldest_restorable == 1,
        "the checkpoint before the remap is no longer restorable",
    );
}

/// The perms column of the mapping containing `addr`, from /proc/self/maps.
fn perms_at(addr: usize) -> String {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    for line in maps.lines() {
        let mut cols = line.split_whitespace();
        let (Some(range), Some(perms)) = (cols.next(), cols.next()) else {
            continue;
        };
        let Some((a, b)) = range.split_once('-') else {
            continue;
        };
        let a = usize::from_str_radix(a, 16).unwrap_or(0);
        let b = usize::from_str_radix(b, 16).unwrap_or(0);
        if a <= addr && addr < b {
            return perms.to_string();
        }
    }
    String::new()
}

/// Snapshot pages four times the kernel's, so one unit holds a tracked kernel page, an
/// untracked one, an inaccessible one and an executable tracked one: only the tracked
/// parts are copied, rewound and re-protected, each with its own protection.
fn partial_snapshot_pages() {
    // SAFETY: sysconf has no preconditions.
    let k = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    check(
        memsnap_set_page_size(3 * k) == MemsnapStatus::InvalidArgument,
        "not a power of two",
    );
    check(
        memsnap_set_page_size(k / 2) == MemsnapStatus::InvalidArgument,
        "below the kernel page",
    );
    check(
        memsnap_set_page_size(32 * k) == MemsnapStatus::InvalidArgument,
        "more than 16 kernel pages",
    );
    check(memsnap_set_page_size(4 * k) == MemsnapStatus::Ok, "4 pages");
    InitializeMemorySnapshots();
    check(memsnap_page_size() == 4 * k, "page size reported");
    check(
        memsnap_set_page_size(4 * k) == MemsnapStatus::AlreadyStarted,
        "set after init",
    );
    let unit = 4 * k;
    // SAFETY: a fresh anonymous mapping, trimmed below to two aligned units.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            3 * unit,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    } as usize;
    check(raw != libc::MAP_FAILED as usize, "mmap");
    let u = (raw + unit - 1) & !(unit - 1);
    let page = |i: usize| u + i * k;
    // SAFETY: kernel pages 2 and 3 of the first unit, inside the mapping.
    unsafe {
        check(
            libc::mprotect(page(1) as *mut _, k, libc::PROT_NONE) == 0,
            "guard page",
        );
        check(
            libc::mprotect(
                page(3) as *mut _,
                k,
                libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC,
            ) == 0,
            "exec page",
        );
    }
    check(
        memsnap_untrack_region(page(2) as *mut _, k) == MemsnapStatus::Ok,
        "untrack page 2",
    );
    let fill = |i: usize, v: u8| {
        // SAFETY: a readable and writable kernel page of the mapping.
        unsafe { std::ptr::write_bytes(page(i) as *mut u8, v, k) }
    };
    let is = |i: usize, v: u8| {
        // SAFETY: a readable kernel page of the mapping.
        let b = unsafe { std::slice::from_raw_parts(page(i) as *const u8, k) };
        b.iter().all(|&x| x == v)
    };
    // Unit 0: pages 0 (tracked), 1 (inaccessible), 2 (untracked), 3 (tracked, exec).
    // (Page 3 must not sit right above the inaccessible page: memsnap would take that
    // shape for a thread stack above its guard and leave it untracked.)
    // Unit 1: pages 4..8, wholly tracked.
    for i in [0, 2, 3, 4, 5, 6, 7] {
        fill(i, 1);
    }
    TakeFirstMemorySnapshot();
    check(MemoryRangeIsTracked(page(0) as *mut _, k), "page 0 tracked");
    check(
        !MemoryRangeIsTracked(page(1) as *mut _, k),
        "page 1 untracked",
    );
    check(
        !MemoryRangeIsTracked(page(2) as *mut _, k),
        "page 2 untracked",
    );
    check(MemoryRangeIsTracked(page(3) as *mut _, k), "page 3 tracked");
    check(
        MemoryRangeIsTracked(page(4) as *mut _, 4 * k),
        "unit 1 tracked",
    );
    for i in [0, 2, 3, 5] {
        fill(i, 2);
    }
    TakeDiffMemorySnapshot();
    check(
        perms_at(page(3)) == "r-xp",
        "exec page re-protected with exec",
    );
    check(perms_at(page(1)) == "---p", "guard page left alone");
    for i in [0, 2, 3, 4, 5, 6, 7] {
        fill(i, 3);
    }
    rewind(0);
    check(
        is(0, 2) && is(3, 2) && is(5, 2),
        "tracked pages back at checkpoint 2",
    );
    check(
        is(4, 1) && is(6, 1) && is(7, 1),
        "clean pages back at checkpoint 2",
    );
    check(is(2, 3), "untracked page keeps its latest bytes");
    rewind(1);
    check(
        is(0, 1) && is(3, 1) && (4..8).all(|i| is(i, 1)),
        "tracked pages back at checkpoint 1",
    );
    check(is(2, 3), "untracked page still not rewound");
    check(perms_at(page(1)) == "---p", "guard page still inaccessible");
    check(perms_at(page(3)) == "r-xp", "exec page keeps exec");
    check(perms_at(page(0)) == "r--p", "tracked page write-protected");
}

/// The backend `MEMSNAP_BACKEND` asks for is the one running: the test matrix runs the
/// whole suite once per backend, and a silent fallback would test the wrong one. Unset
/// (the default pass), auto must have picked the best backend memsnap can provide.
fn requested_backend_is_active() {
    InitializeMemorySnapshots();
    TakeFirstMemorySnapshot();
    let s = stats();
    let want = match std::env::var("MEMSNAP_BACKEND").as_deref() {
        Ok("mprotect") => Some(MemsnapBackend::LinuxMprotect),
        Ok("uffd") => Some(MemsnapBackend::LinuxUffd),
        Ok("uffd-async") => Some(MemsnapBackend::LinuxUffdAsync),
        _ => None,
    };
    if let Some(w) = want {
        check(s.backend == w, "the requested backend is active");
    }
    check(s.backend != MemsnapBackend::Inactive, "a backend is active");
    if want.is_none() && cfg!(target_os = "linux") {
        // After the first snapshot memsnap_set_backend answers Unsupported for a backend
        // memsnap cannot provide and AlreadyStarted for one it could have chosen: auto
        // passed over none of the latter.
        let better: &[(i32, MemsnapBackend)] = match s.backend {
            MemsnapBackend::LinuxMprotect => &[
                (3, MemsnapBackend::LinuxUffdAsync),
                (2, MemsnapBackend::LinuxUffd),
            ],
            MemsnapBackend::LinuxUffd => &[(3, MemsnapBackend::LinuxUffdAsync)],
            _ => &[],
        };
        for &(request, name) in better {
            check(
                memsnap_set_backend(MemsnapBackendRequestArg(request))
                    == MemsnapStatus::Unsupported,
                &format!("auto chose {:?} although {name:?} is available", s.backend),
            );
        }
    }
    if s.backend == MemsnapBackend::LinuxMprotect {
        check(s.uffd_tracked_bytes == 0, "nothing on userfaultfd");
    } else {
        check(s.uffd_tracked_bytes > 0, "memory on userfaultfd");
    }
    if s.backend != MemsnapBackend::LinuxUffdAsync {
        check(s.base_copy_bytes == 0, "no base copy outside uffd-async");
    } else {
        check(
            s.base_copy_bytes > 0,
            "the base copy of resident tracked memory",
        );
    }
}

/// read(2) into a tracked buffer: under userfaultfd the kernel's write is tracked like
/// any other and rewound; under mprotect it fails with EFAULT (the documented hazard,
/// worked around with memsnap_prepare_write).
fn read_into_tracked_buffer() {
    InitializeMemorySnapshots();
    check(
        memsnap_set_tracking_mode(MemsnapTrackingModeArg(1)) == MemsnapStatus::Ok,
        "mode",
    );
    let k = memsnap_page_size();
    let buf = AllocateMemory(4 * k, TRACKED) as *mut u8;
    // SAFETY: 4 pages of tracked memory.
    unsafe { std::ptr::write_bytes(buf, b'a', 4 * k) };
    let mut fds = [0; 2];
    // SAFETY: a two-int array.
    check(unsafe { libc::pipe(fds.as_mut_ptr()) } == 0, "pipe");
    TakeFirstMemorySnapshot();
    let msg = b"written by the kernel";
    for round in 0..3 {
        // SAFETY: our pipe, a static message.
        check(
            unsafe { libc::write(fds[1], msg.as_ptr() as *const _, msg.len()) }
                == msg.len() as isize,
            "write to the pipe",
        );
        // SAFETY: the destination straddles two tracked pages.
        let n = unsafe { libc::read(fds[0], buf.add(k - 4) as *mut _, msg.len()) };
        let s = stats();
        // Under mprotect, and under sync uffd when only user-mode faults can be caught
        // (no userfaultfd permission beyond UFFD_USER_MODE_ONLY), the kernel cannot wait
        // for the fault to be served.
        if s.backend == MemsnapBackend::LinuxMprotect || s.uffd_user_mode_only {
            check(n == -1, "read into a write-protected page fails");
            // The bytes are still in the pipe: drain them into untracked memory.
            let mut sink = [0u8; 64];
            // SAFETY: a stack buffer.
            unsafe { libc::read(fds[0], sink.as_mut_ptr() as *mut _, msg.len()) };
            return;
        }
        check(n == msg.len() as isize, "read into tracked memory succeeds");
        // SAFETY: inside the buffer.
        let got = unsafe { std::slice::from_raw_parts(buf.add(k - 4), msg.len()) };
        check(got == msg, "the kernel's bytes are there");
        if round < 2 {
            TakeDiffMemorySnapshot();
            // SAFETY: inside the buffer.
            unsafe { std::ptr::write_bytes(buf.add(k - 4), b'b', msg.len()) };
        }
    }
    rewind(0);
    // SAFETY: inside the buffer.
    let got = unsafe { std::slice::from_raw_parts(buf.add(k - 4), msg.len()) };
    check(
        got == msg,
        "rewound to the checkpoint after the second read",
    );
    rewind(2);
    // SAFETY: the whole buffer.
    let all = unsafe { std::slice::from_raw_parts(buf, 4 * k) };
    check(
        all.iter().all(|&b| b == b'a'),
        "rewound past every kernel write",
    );
}

thread_local! {
    /// 64 KiB of the executable's static TLS. The executable's block sits next to the
    /// thread pointer, so this pushes libc's `errno` a whole page or more away from the
    /// thread descriptor, onto TLS pages that hold nothing memsnap leaves out: in a
    /// thread other than the controller they are tracked whole.
    static LARGE_TLS: std::cell::Cell<[u8; 1 << 16]> = const { std::cell::Cell::new([0; 1 << 16]) };
}

/// A thread other than the controller forks; in the child it is the only thread and
/// takes over as controller. Its `errno`, tracked memory in the parent, must then be left
/// out (memsnap's own calls set it), and the child's own checkpoints must still rewind
/// the rest of its TLS.
fn fork_from_a_thread_with_large_tls() {
    InitializeMemorySnapshots();
    set_global(0, 1);
    TakeFirstMemorySnapshot();
    set_global(0, 2);
    let (go, wait) = std::sync::mpsc::channel::<()>();
    let (ready, started) = std::sync::mpsc::channel::<()>();
    let worker = std::thread::spawn(move || {
        // Started: Rust's thread start-up has installed this thread's signal stack (a
        // mapping of its own, which a checkpoint taken before the sigaltstack call would
        // track, and which memsnap then refuses to leave out). The parent's checkpoint
        // below tracks this thread's TLS pages.
        let _ = ready.send(());
        let _ = wait.recv();
        LARGE_TLS.with(|t| {
            let mut v = t.get();
            v[0] = 1;
            v[v.len() - 1] = 2;
            t.set(v);
        });
        // SAFETY: the child runs only async-signal-safe work and memsnap's calls, then
        // exits without returning.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            set_global(1, 5);
            LARGE_TLS.with(|t| {
                let mut v = t.get();
                v[100] = 5;
                t.set(v);
            });
            TakeDiffMemorySnapshot();
            set_global(1, 6);
            LARGE_TLS.with(|t| {
                let mut v = t.get();
                v[100] = 6;
                v[v.len() - 1] = 6;
                t.set(v);
            });
            rewind(0);
            check(global(1) == 5, "the child's global is rewound");
            let tls = LARGE_TLS.with(|t| t.get());
            check(
                tls[100] == 5 && tls[tls.len() - 1] == 2,
                "the child's thread-local storage is rewound",
            );
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: our own child.
        let got = unsafe { libc::waitpid(pid, &mut status, 0) };
        (got == pid).then_some(status)
    });
    check(started.recv().is_ok(), "the worker started");
    TakeDiffMemorySnapshot();
    check(go.send(()).is_ok(), "the worker waits");
    let status = worker.join().ok().flatten();
    check(
        status.is_some_and(|s| libc::WIFEXITED(s) && libc::WEXITSTATUS(s) == 0),
        "the child forked by the worker passed",
    );
}

/// A scenario still running after this long has hung: its own alarm ends it. The
/// environment's SCENARIO_WATCHDOG (seconds) replaces it where everything runs slower,
/// as in the emulated VMs of `make test-kernels` and `make test-aarch64-vm`.
const WATCHDOG_SECONDS: u32 = 60;

fn watchdog_seconds() -> u32 {
    std::env::var("SCENARIO_WATCHDOG")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&s| s > 0)
        .unwrap_or(WATCHDOG_SECONDS)
}

/// The parent's backstop for a child whose alarm cannot fire (a hang with SIGALRM
/// blocked, as inside a signal handler): it is killed this long after it started.
fn backstop_seconds(watchdog: u32) -> u64 {
    u64::from(watchdog) + 10
}

enum Ended {
    Exited(i32),
    Signaled(i32),
    /// Killed by the parent's backstop.
    Killed,
    /// waitpid failed.
    Lost,
}

/// Waits for the scenario child `pid`, killing it once the backstop expires.
fn wait_or_kill(pid: libc::pid_t, backstop: u64) -> Ended {
    let start = std::time::Instant::now();
    let mut killed = false;
    loop {
        let mut status = 0;
        // SAFETY: polling for our own child.
        let got = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
        if got == pid {
            return if killed {
                Ended::Killed
            } else if libc::WIFEXITED(status) {
                Ended::Exited(libc::WEXITSTATUS(status))
            } else {
                Ended::Signaled(libc::WTERMSIG(status))
            };
        }
        if got < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Ended::Lost;
        }
        if !killed && start.elapsed().as_secs() >= backstop {
            // SAFETY: our own child, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            killed = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn main() {
    let scenarios: [(&str, fn()); 11] = [
        (
            "whole_process_five_checkpoints",
            whole_process_five_checkpoints,
        ),
        ("registered_only", registered_only),
        ("erase_folds_into_predecessor", erase_folds_into_predecessor),
        ("allocations_after_rewind", allocations_after_rewind),
        ("random_walk", random_walk),
        ("partial_snapshot_pages", partial_snapshot_pages),
        (
            "scattered_writes_stay_under_map_limit",
            scattered_writes_stay_under_map_limit,
        ),
        (
            "remapped_tracked_memory_is_noticed",
            remapped_tracked_memory_is_noticed,
        ),
        ("requested_backend_is_active", requested_backend_is_active),
        ("read_into_tracked_buffer", read_into_tracked_buffer),
        (
            "fork_from_a_thread_with_large_tls",
            fork_from_a_thread_with_large_tls,
        ),
    ];
    let (mut passed, mut failed) = (0, 0);
    let watchdog = watchdog_seconds();
    let backstop = backstop_seconds(watchdog);
    // Arguments, if any, select the scenarios whose names contain one of them (as
    // libtest's filters do): `cargo test --test scenarios -- fork`.
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    for (name, f) in scenarios {
        if !filters.is_empty() && !filters.iter().any(|x| name.contains(x.as_str())) {
            continue;
        }
        // SAFETY: this process is single-threaded here; the child runs one scenario and
        // exits without returning.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // The watchdog: SIGALRM's default action ends a hung child, and the parent
            // names the scenario. (Nothing is installed: a handler would run on top of
            // whatever the hang holds.)
            // SAFETY: plain alarm(2).
            unsafe { libc::alarm(watchdog) };
            f();
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        let verdict = match wait_or_kill(pid, backstop) {
            Ended::Exited(0) => None,
            Ended::Exited(code) => Some(format!("exited with status {code}")),
            Ended::Signaled(libc::SIGALRM) => Some(format!(
                "watchdog: still running after {watchdog} s, a hang"
            )),
            Ended::Signaled(sig) => Some(format!("killed by signal {sig}")),
            Ended::Lost => Some("waitpid failed".to_string()),
            Ended::Killed => Some(format!(
                "watchdog: still running {backstop} s in with its alarm ignored \
                 (SIGALRM blocked?): killed, a hang"
            )),
        };
        match &verdict {
            None => println!("scenario {name} ... ok"),
            Some(why) => println!("scenario {name} ... FAILED ({why})"),
        }
        if verdict.is_none() {
            passed += 1;
        } else {
            failed += 1;
        }
    }
    println!("scenarios: {passed} passed, {failed} failed");
    if failed > 0 {
        std::process::exit(1);
    }
}
