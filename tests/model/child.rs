//! Runs one operation list against memsnap inside a forked child and checks it against a
//! model after every checkpoint, rewind and erase. Owns the model and the child side of
//! the report page shared with the parent.
//!
//! The model lives in untracked memory (`AllocateMemory(.., Generic)` before the first
//! snapshot) or on this thread's stack (never tracked), and nothing here touches the Rust
//! global allocator after the first snapshot: a heap object would be rewound underneath
//! the model. It keeps a shadow copy of every region's current bytes and, per saved
//! checkpoint, one hash per region plus which allocations were live. At a checkpoint the
//! memory must equal the shadows; after a rewind it must hash to what the target
//! checkpoint saved (then the shadows are refreshed from it); untracked memory must keep
//! its latest bytes through everything.

use core::fmt::{self, Write as _};
use core::ptr::addr_of;

use memsnap::ffi::ext::*;
use memsnap::ffi::original::*;
use memsnap::ffi::MemoryKindArg;

use super::ops::*;

const TRACKED: MemoryKindArg = MemoryKindArg(0);
const GENERIC: MemoryKindArg = MemoryKindArg(1);

/// Odd sizes so the statics straddle snapshot pages at either end.
const DATA_LEN: usize = 40 * 1024 + 200;
const BSS_LEN: usize = 40 * 1024 + 100;
const HEAP_LEN: usize = 96 * 1024;
/// Tracked-arena pieces the model follows (fresh tracked mappings, merged when adjacent).
const ARENA_CAP: usize = 512;
/// Heap grown before the first snapshot: room for every malloc slot several times over.
const PREGROW: usize = 4 << 20;
/// Recently freed or rolled-back tracked blocks, the targets of hinted allocations.
const FREED_RING: usize = 8;

// A non-zero initializer puts DATA in .data; BSS is zero-initialized, so in .bss.
static mut DATA: [u8; DATA_LEN] = [0x5a; DATA_LEN];
static mut BSS: [u8; BSS_LEN] = [0; BSS_LEN];

/// What went wrong, for the parent to compare outcomes while shrinking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Check {
    None = 0,
    /// Memory differs from the model at a checkpoint or after an erase.
    Current = 1,
    /// After a rewind, memory does not hash to what the target checkpoint saved.
    Rewound = 2,
    /// Untracked memory changed through a rewind.
    Untracked = 3,
    /// An allocation broke its contract (zeroed, aligned, free, hint, tracked or not).
    Allocation = 4,
    /// memsnap_get_stats disagrees with the model.
    Stats = 5,
    /// Setup failed (memsnap calls before the first operation).
    Setup = 6,
    /// A kernel write after `memsnap_prepare_write` failed, or its status was wrong.
    KernelWrite = 7,
    /// The host's own mmap, munmap or mprotect failed.
    Host = 8,
}

impl Check {
    pub fn from_u32(v: u32) -> Check {
        match v {
            1 => Check::Current,
            2 => Check::Rewound,
            3 => Check::Untracked,
            4 => Check::Allocation,
            5 => Check::Stats,
            6 => Check::Setup,
            7 => Check::KernelWrite,
            8 => Check::Host,
            _ => Check::None,
        }
    }
}

/// The page shared with the parent (MAP_SHARED, so never tracked).
#[repr(C)]
pub struct Report {
    /// The operation being executed (-1 during setup); a crash happened there.
    pub current: i64,
    pub ops_done: u64,
    pub skipped: u64,
    pub checkpoints: u64,
    pub rewinds: u64,
    /// Rewinds that popped at least one checkpoint.
    pub deep_rewinds: u64,
    pub erases: u64,
    /// 1 when the sequence ran in registered-only mode.
    pub registered_only: u64,
    /// Successful `RegisterAllocatedMemory(Tracked)` calls, kernel writes after
    /// `memsnap_prepare_write`, and the host's own mmap, munmap and mprotect calls.
    pub registrations: u64,
    pub kernel_writes: u64,
    pub host_calls: u64,
    /// Checkpoints that put older ones out of reach (after a raw unmap or mprotect).
    pub floor_raises: u64,
    /// Rewinds that brought back a host mapping unmapped since the target.
    pub unmaps_undone: u64,
    pub check: u32,
    pub msg_len: u32,
    pub msg: [u8; 1024],
}

impl Report {
    pub fn reset(&mut self) {
        self.current = -1;
        self.ops_done = 0;
        self.skipped = 0;
        self.checkpoints = 0;
        self.rewinds = 0;
        self.deep_rewinds = 0;
        self.erases = 0;
        self.registered_only = 0;
        self.registrations = 0;
        self.kernel_writes = 0;
        self.host_calls = 0;
        self.floor_raises = 0;
        self.unmaps_undone = 0;
        self.check = 0;
        self.msg_len = 0;
    }

    pub fn message(&self) -> String {
        String::from_utf8_lossy(&self.msg[..self.msg_len as usize]).into_owned()
    }
}

/// Formats into a fixed buffer: the child must not allocate.
struct Buf<'a> {
    b: &'a mut [u8],
    n: usize,
}

impl fmt::Write for Buf<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let k = s.len().min(self.b.len() - self.n);
        self.b[self.n..self.n + k].copy_from_slice(&s.as_bytes()[..k]);
        self.n += k;
        Ok(())
    }
}

#[derive(Clone, Copy, Default, PartialEq, Eq)]
struct Block {
    ptr: usize,
    len: usize,
}

impl Block {
    fn live(&self) -> bool {
        self.len != 0
    }
    fn end(&self) -> usize {
        self.ptr + self.len
    }
    fn overlaps(&self, o: &Block) -> bool {
        self.live() && o.live() && self.ptr < o.end() && o.ptr < self.end()
    }
}

/// What the model remembers of one saved checkpoint.
#[derive(Clone, Copy)]
struct Saved {
    fixed: [u64; FIXED],
    data: u64,
    bss: u64,
    heap: u64,
    tracked: [Block; TRACKED_SLOTS],
    tracked_hash: [u64; TRACKED_SLOTS],
    malloc: [Block; MALLOC_SLOTS],
    malloc_hash: [u64; MALLOC_SLOTS],
    /// Host mappings this checkpoint tracks (whole-process mode: every one mapped before
    /// it), and their hashes.
    host: [Block; HOST_SLOTS],
    host_hash: [u64; HOST_SLOTS],
    /// Their protection then (`Op::HostProtect`'s `prot`), which a rewind gives back.
    host_prot: [u8; HOST_SLOTS],
    /// And `Model::host_born` for them.
    host_born: [usize; HOST_SLOTS],
}

struct Model {
    ps: usize,
    report: *mut Report,
    op: usize,
    /// Saved checkpoints: the model's stack mirrors memsnap's.
    n: usize,
    saved: [Saved; MAX_CHECKPOINTS],
    heap: usize,
    tracked: [Block; TRACKED_SLOTS],
    untracked: [Block; UNTRACKED_SLOTS],
    malloc: [Block; MALLOC_SLOTS],
    host: [Block; HOST_SLOTS],
    /// The index the first checkpoint taken after a host mapping was made has (or will
    /// have): the checkpoint from which whole-process mode tracks it.
    host_born: [usize; HOST_SLOTS],
    /// The protection the host gave each host mapping (0 read-write, 1 read-only, 2 none).
    host_prot: [u8; HOST_SLOTS],
    /// A tracked host mapping rewound while inaccessible: the hash its bytes must have once
    /// the host makes it accessible again (its shadow could not be refreshed).
    host_pending: [Option<u64>; HOST_SLOTS],
    /// The oldest checkpoint a rewind may reach: memsnap's `oldest_restorable`.
    floor: usize,
    registered_only: bool,
    /// A pipe for the kernel writes of `Op::PrepareWrite`: [read end, write end].
    pipe: [i32; 2],
    /// Untracked room for reading /proc/self/maps.
    maps_buf: usize,
    /// Rewinds to a checkpoint that tracked something (in registered-only mode a target
    /// may track nothing at all).
    tracked_rewinds: u64,
    /// MEMSNAP_VERIFY=1 is set.
    verifying: bool,
    /// Every range ever handed out as a fresh tracked allocation or registered as tracked,
    /// sorted and merged: the tracked free set is exactly this less the live tracked
    /// blocks.
    arena: [Block; ARENA_CAP],
    arena_len: usize,
    freed: [Block; FREED_RING],
    freed_count: usize,
    /// (memory, shadow, length) of each `Target::Fixed` region.
    fixed: [(usize, usize, usize); FIXED],
    sh_data: usize,
    sh_bss: usize,
    sh_heap: usize,
    sh_tracked: [usize; TRACKED_SLOTS],
    sh_untracked: [usize; UNTRACKED_SLOTS],
    sh_malloc: [usize; MALLOC_SLOTS],
    sh_host: [usize; HOST_SLOTS],
}

/// Bytes of /proc/self/maps read at a time.
const MAPS_BUF: usize = 64 << 10;

fn hash(p: usize, len: usize) -> u64 {
    // SAFETY: callers pass live regions of `len` readable bytes.
    let s = unsafe { core::slice::from_raw_parts(p as *const u8, len) };
    let mut h = 0x243f_6a88_85a3_08d3u64 ^ len as u64;
    let mut chunks = s.chunks_exact(8);
    for c in &mut chunks {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h = (h ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(27);
    }
    for &b in chunks.remainder() {
        h = (h ^ b as u64)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(27);
    }
    h ^ (h >> 29)
}

fn bytes<'a>(p: usize, len: usize) -> &'a [u8] {
    // SAFETY: callers pass live regions of `len` readable bytes.
    unsafe { core::slice::from_raw_parts(p as *const u8, len) }
}

fn bytes_mut<'a>(p: usize, len: usize) -> &'a mut [u8] {
    // SAFETY: callers pass live, writable regions of `len` bytes that nothing else
    // references while the slice is in use.
    unsafe { core::slice::from_raw_parts_mut(p as *mut u8, len) }
}

fn pattern(dst: &mut [u8], val: u8) {
    for (i, b) in dst.iter_mut().enumerate() {
        *b = val.wrapping_add((i as u8).wrapping_mul(7));
    }
}

/// `munmap` and `mprotect` behind memsnap's back: raw system calls on Linux, where
/// libmemsnap interposes the libc functions (docs/host-calls.md); elsewhere nothing is
/// interposed, and libc's are the same thing.
///
/// # Safety
/// As for the system calls.
#[cfg(target_os = "linux")]
unsafe fn raw_munmap(p: usize, len: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { libc::syscall(libc::SYS_munmap, p, len) as i32 }
}

/// See the Linux variant.
///
/// # Safety
/// As for the system call.
#[cfg(not(target_os = "linux"))]
unsafe fn raw_munmap(p: usize, len: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { libc::munmap(p as *mut _, len) }
}

/// See `raw_munmap`.
///
/// # Safety
/// As for the system call.
#[cfg(target_os = "linux")]
unsafe fn raw_mprotect(p: usize, len: usize, prot: i32) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { libc::syscall(libc::SYS_mprotect, p, len, prot) as i32 }
}

/// See `raw_munmap`.
///
/// # Safety
/// As for the system call.
#[cfg(not(target_os = "linux"))]
unsafe fn raw_mprotect(p: usize, len: usize, prot: i32) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { libc::mprotect(p as *mut _, len, prot) }
}

#[cfg(target_os = "macos")]
extern "C" {
    // In libSystem but not declared by the libc crate for Apple targets.
    fn pthread_attr_setstack(
        attr: *mut libc::pthread_attr_t,
        stack: *mut libc::c_void,
        size: libc::size_t,
    ) -> libc::c_int;
}
#[cfg(not(target_os = "macos"))]
use libc::pthread_attr_setstack;

/// `Target::Fixed(0)` and `(1)`: thread-local arrays (static TLS, beside the thread's
/// descriptor), of the controller and of an idle worker. Not a multiple of the page.
const TLS_LEN: usize = 8 * 1024 + 100;
/// `Target::Fixed(2)`: 1 MiB of a mapping whose two other parts are worker stacks.
const BIG_LEN: usize = 1 << 20;
/// The worker stacks on either side of it (declared untracked), each this long.
const WORKER_STACK: usize = 1 << 20;
/// `Target::Fixed(3)`: the committed half of a `PROT_NONE` reservation, in kernel pages.
const RESERVE_PAGES: usize = 64;

thread_local! {
    static TLS: core::cell::UnsafeCell<[u8; TLS_LEN]> =
        const { core::cell::UnsafeCell::new([0; TLS_LEN]) };
}

fn tls_array() -> usize {
    TLS.with(|t| t.get() as usize)
}

/// What a worker shares with the controller: in untracked memory.
#[repr(C)]
struct WorkerBox {
    /// Where the worker's thread-local array is (0 until it has said).
    tls: core::sync::atomic::AtomicUsize,
}

/// A worker idle at every checkpoint and rewind: publishes its thread-local array, then
/// parks for good (the sequence ends with `_exit`).
extern "C" fn worker(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `arg` is a WorkerBox in untracked memory that outlives the process's run.
    let b = unsafe { &*(arg as *const WorkerBox) };
    pattern(bytes_mut(tls_array(), TLS_LEN), 0x77);
    b.tls
        .store(tls_array(), core::sync::atomic::Ordering::Release);
    loop {
        // SAFETY: pause(2) has no preconditions; nothing wakes this thread for good.
        unsafe { libc::pause() };
    }
}

/// Sets up the `Target::Fixed` regions before the first snapshot: `(memory, length)`.
fn fixed_regions(kernel_page: usize) -> [(usize, usize); FIXED] {
    let fail = |code: i32| -> ! {
        // SAFETY: ends the child.
        unsafe { libc::_exit(code) }
    };
    pattern(bytes_mut(tls_array(), TLS_LEN), 0x44);
    // Two worker stacks and the 1 MiB between them: one anonymous mapping, whose outer
    // parts are declared untracked (as the README asks of stacks) and hold the stacks.
    let all = 2 * WORKER_STACK + BIG_LEN;
    // SAFETY: a fresh anonymous mapping.
    let base = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            all,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if base == libc::MAP_FAILED {
        fail(6);
    }
    let base = base as usize;
    let big = base + WORKER_STACK;
    pattern(bytes_mut(big, BIG_LEN), 0x55);
    // Three idle workers: one on a stack glibc maps (its thread-local array, beside its
    // descriptor, is tracked: `Fixed(1)`), two on the untracked stacks around `big` (their
    // TLS sits at the top of those stacks, untracked memory the host declared, so it is
    // not rewound and not modelled).
    let boxes = AllocateMemory(3 * core::mem::size_of::<WorkerBox>(), GENERIC) as *mut WorkerBox;
    let mut worker_tls = 0;
    for (k, stack) in [0, base, big + BIG_LEN].into_iter().enumerate() {
        if stack != 0 {
            RegisterAllocatedMemory(stack as *mut _, WORKER_STACK, GENERIC);
        }
        // SAFETY: the box is fresh untracked memory (zeroed); a given stack is the host's
        // own memory for the worker's whole life; pthread objects live on this frame.
        unsafe {
            let b = boxes.add(k);
            let mut attr: libc::pthread_attr_t = core::mem::zeroed();
            libc::pthread_attr_init(&mut attr);
            if stack != 0 {
                pthread_attr_setstack(&mut attr, stack as *mut _, WORKER_STACK);
            }
            let mut t: libc::pthread_t = core::mem::zeroed();
            if libc::pthread_create(&mut t, &attr, worker, b as *mut _) != 0 {
                fail(7);
            }
            libc::pthread_attr_destroy(&mut attr);
            loop {
                let p = (*b).tls.load(core::sync::atomic::Ordering::Acquire);
                if p != 0 {
                    if stack == 0 {
                        worker_tls = p;
                    }
                    break;
                }
                libc::sched_yield();
            }
        }
    }
    // A reservation whose upper half is committed read-write.
    let resv = RESERVE_PAGES * kernel_page;
    // SAFETY: a fresh reservation; the upper half made read-write in it.
    let r = unsafe {
        let r = libc::mmap(
            core::ptr::null_mut(),
            2 * resv,
            libc::PROT_NONE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        );
        if r == libc::MAP_FAILED
            || libc::mprotect(
                (r as usize + resv) as *mut _,
                resv,
                libc::PROT_READ | libc::PROT_WRITE,
            ) != 0
        {
            fail(8);
        }
        r as usize + resv
    };
    pattern(bytes_mut(r, resv), 0x66);
    [
        (tls_array(), TLS_LEN),
        (worker_tls, TLS_LEN),
        (big, BIG_LEN),
        (r, resv),
    ]
}

fn stats() -> Option<MemsnapStats> {
    // SAFETY: MemsnapStats is plain data; zero is a valid starting value.
    let mut s: MemsnapStats = unsafe { core::mem::zeroed() };
    s.struct_size = core::mem::size_of::<MemsnapStats>();
    // SAFETY: a valid, writable record on this (untracked) stack.
    (unsafe { memsnap_get_stats(&mut s) } == MemsnapStatus::Ok).then_some(s)
}

fn data() -> usize {
    addr_of!(DATA) as usize
}

fn bss() -> usize {
    addr_of!(BSS) as usize
}

impl Model {
    fn report(&self, f: impl FnOnce(&mut Report)) {
        // SAFETY: the shared report page outlives the child; only this thread writes it,
        // and no other reference to it is live during `f`.
        f(unsafe { &mut *self.report })
    }

    fn fail(&self, check: Check, args: fmt::Arguments) -> ! {
        self.report(|r| {
            r.check = check as u32;
            let mut b = Buf {
                b: &mut r.msg,
                n: 0,
            };
            let _ = b.write_fmt(args);
            r.msg_len = b.n as u32;
        });
        // SAFETY: ends the child at once, running nothing that could touch tracked memory.
        unsafe { libc::_exit(1) }
    }

    /// (memory, shadow, length) of a write target, if it is live.
    fn region(&self, t: Target) -> Option<(usize, usize, usize)> {
        let slot = |b: &[Block], s: &[usize], i: u8| {
            let i = i as usize;
            (i < b.len() && b[i].live()).then(|| (b[i].ptr, s[i], b[i].len))
        };
        match t {
            Target::Fixed(i) => self.fixed.get(i as usize).copied(),
            Target::Data => Some((data(), self.sh_data, DATA_LEN)),
            Target::Bss => Some((bss(), self.sh_bss, BSS_LEN)),
            Target::Heap => Some((self.heap, self.sh_heap, HEAP_LEN)),
            Target::Tracked(i) => slot(&self.tracked, &self.sh_tracked, i),
            Target::Untracked(i) => slot(&self.untracked, &self.sh_untracked, i),
            Target::Malloc(i) => slot(&self.malloc, &self.sh_malloc, i),
            Target::Host(i) => slot(&self.host, &self.sh_host, i),
        }
    }

    /// `region(t)` if the host may write it (its protection allows).
    fn writable(&self, t: Target) -> Option<(usize, usize, usize)> {
        match t {
            Target::Host(i) if self.host_prot[i as usize] != 0 => None,
            _ => self.region(t),
        }
    }

    /// Whether memsnap tracks the live region `t` (in whole: no region is partly tracked).
    fn tracked(&self, t: Target) -> bool {
        match t {
            Target::Data | Target::Bss | Target::Heap | Target::Malloc(_) | Target::Fixed(_) => {
                !self.registered_only
            }
            Target::Tracked(_) => true,
            Target::Untracked(_) => false,
            Target::Host(i) => !self.registered_only && self.host_born[i as usize] < self.n,
        }
    }

    /// Every live region with its name, for the whole-memory comparisons.
    fn for_each_region(&self, mut f: impl FnMut(Target, usize, usize, usize)) {
        let mut all =
            [Target::Data; 3 + FIXED + TRACKED_SLOTS + UNTRACKED_SLOTS + MALLOC_SLOTS + HOST_SLOTS];
        let mut k = 3;
        all[1] = Target::Bss;
        all[2] = Target::Heap;
        for i in 0..FIXED {
            all[k] = Target::Fixed(i as u8);
            k += 1;
        }
        for i in 0..TRACKED_SLOTS {
            all[k] = Target::Tracked(i as u8);
            k += 1;
        }
        for i in 0..UNTRACKED_SLOTS {
            all[k] = Target::Untracked(i as u8);
            k += 1;
        }
        for i in 0..MALLOC_SLOTS {
            all[k] = Target::Malloc(i as u8);
            k += 1;
        }
        for i in 0..HOST_SLOTS {
            all[k] = Target::Host(i as u8);
            k += 1;
        }
        for t in all {
            if let Some((p, s, len)) = self.region(t) {
                f(t, p, s, len);
            }
        }
    }

    /// Memory equals the shadows everywhere.
    fn verify_current(&self, when: &str) {
        self.for_each_region(|t, p, s, len| {
            if !matches!(t, Target::Host(i) if self.host_prot[i as usize] == 2) {
                self.compare(Check::Current, when, t, p, s, len)
            }
        });
    }

    fn compare(&self, check: Check, when: &str, t: Target, p: usize, s: usize, len: usize) {
        let (real, model) = (bytes(p, len), bytes(s, len));
        if real != model {
            let i = real
                .iter()
                .zip(model)
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            let wrong = real.iter().zip(model).filter(|(a, b)| a != b).count();
            self.fail(
                check,
                format_args!(
                    "{when}: {t:?} differs from the model at offset {i} (address {:#x}, snapshot page {:#x}): {:#04x} instead of {:#04x}; {wrong} of {len} bytes differ",
                    p + i,
                    (p + i) & !(self.ps - 1),
                    real[i],
                    model[i]
                ),
            );
        }
    }

    fn check_stats(&self, when: &str) {
        let Some(s) = stats() else {
            self.fail(
                Check::Stats,
                format_args!("{when}: memsnap_get_stats failed"),
            )
        };
        if s.saved_checkpoints != self.n {
            self.fail(
                Check::Stats,
                format_args!(
                    "{when}: memsnap reports {} saved checkpoints, the model {}",
                    s.saved_checkpoints, self.n
                ),
            );
        }
        if s.oldest_restorable != self.floor {
            self.fail(
                Check::Stats,
                format_args!(
                    "{when}: oldest restorable checkpoint is {}, the model's {}",
                    s.oldest_restorable, self.floor
                ),
            );
        }
    }

    fn save(&mut self) {
        let mut s = Saved {
            fixed: core::array::from_fn(|i| hash(self.fixed[i].1, self.fixed[i].2)),
            data: hash(self.sh_data, DATA_LEN),
            bss: hash(self.sh_bss, BSS_LEN),
            heap: hash(self.sh_heap, HEAP_LEN),
            tracked: self.tracked,
            tracked_hash: [0; TRACKED_SLOTS],
            malloc: self.malloc,
            malloc_hash: [0; MALLOC_SLOTS],
            host: [Block::default(); HOST_SLOTS],
            host_hash: [0; HOST_SLOTS],
            host_prot: self.host_prot,
            host_born: self.host_born,
        };
        if !self.registered_only {
            // Every live host mapping is found by this checkpoint, if not by an older one.
            for i in 0..HOST_SLOTS {
                if self.host[i].live() {
                    s.host[i] = self.host[i];
                    s.host_hash[i] = self.host_pending[i]
                        .unwrap_or_else(|| hash(self.sh_host[i], self.host[i].len));
                }
            }
        }
        for i in 0..TRACKED_SLOTS {
            if self.tracked[i].live() {
                s.tracked_hash[i] = hash(self.sh_tracked[i], self.tracked[i].len);
            }
        }
        for i in 0..MALLOC_SLOTS {
            if self.malloc[i].live() {
                s.malloc_hash[i] = hash(self.sh_malloc[i], self.malloc[i].len);
            }
        }
        self.saved[self.n] = s;
        self.n += 1;
    }

    fn overlaps_anything(&self, b: Block) -> Option<&'static str> {
        let fixed = [
            (
                Block {
                    ptr: data(),
                    len: DATA_LEN,
                },
                "the .data static",
            ),
            (
                Block {
                    ptr: bss(),
                    len: BSS_LEN,
                },
                "the .bss static",
            ),
            (
                Block {
                    ptr: self.heap,
                    len: HEAP_LEN,
                },
                "the first heap block",
            ),
        ];
        for (f, name) in fixed {
            if f.overlaps(&b) {
                return Some(name);
            }
        }
        if self.tracked.iter().any(|t| t.overlaps(&b)) {
            return Some("a live tracked allocation");
        }
        if self.untracked.iter().any(|t| t.overlaps(&b)) {
            return Some("a live untracked allocation");
        }
        if self.malloc.iter().any(|t| t.overlaps(&b)) {
            return Some("a live malloc block");
        }
        if self.host.iter().any(|t| t.overlaps(&b)) {
            return Some("a live host mapping");
        }
        None
    }

    /// Whether `b` lies in the tracked free set: inside the arena, clear of live blocks.
    fn is_free(&self, b: Block) -> bool {
        self.arena[..self.arena_len]
            .iter()
            .any(|a| a.ptr <= b.ptr && b.end() <= a.end())
            && !self.tracked.iter().any(|t| t.overlaps(&b))
    }

    /// The largest piece of the tracked free set.
    fn largest_free(&self) -> usize {
        let mut live = self.tracked;
        live.sort_unstable_by_key(|b| b.ptr);
        let mut best = 0;
        for a in &self.arena[..self.arena_len] {
            let mut cursor = a.ptr;
            for t in live.iter().filter(|t| t.live()) {
                if t.end() <= cursor || t.ptr >= a.end() {
                    continue;
                }
                best = best.max(t.ptr.saturating_sub(cursor));
                cursor = cursor.max(t.end());
            }
            best = best.max(a.end().saturating_sub(cursor));
        }
        best
    }

    fn arena_add(&mut self, b: Block) {
        if self.arena_len == ARENA_CAP {
            self.fail(
                Check::Setup,
                format_args!("model arena table full ({ARENA_CAP} pieces)"),
            );
        }
        let i = self.arena[..self.arena_len].partition_point(|a| a.ptr < b.ptr);
        self.arena.copy_within(i..self.arena_len, i + 1);
        self.arena[i] = b;
        self.arena_len += 1;
        // Merge adjacent pieces, as memsnap's coalesced free set does.
        let mut w = 0;
        for r in 1..self.arena_len {
            if self.arena[w].end() == self.arena[r].ptr {
                self.arena[w].len += self.arena[r].len;
            } else {
                w += 1;
                self.arena[w] = self.arena[r];
            }
        }
        self.arena_len = w + 1;
    }

    fn remember_freed(&mut self, b: Block) {
        self.freed[self.freed_count % FREED_RING] = b;
        self.freed_count += 1;
    }

    /// `align`: the snapshot page for tracked memory (so it never shares a snapshot page
    /// with other memory), the kernel's page for untracked memory.
    fn check_fresh_allocation(&self, what: &str, p: usize, len: usize, align: usize) {
        if p == 0 || p % align != 0 {
            self.fail(
                Check::Allocation,
                format_args!("{what} returned {p:#x}, not aligned to {align:#x}"),
            );
        }
        let b = Block { ptr: p, len };
        if let Some(name) = self.overlaps_anything(b) {
            self.fail(
                Check::Allocation,
                format_args!("{what} returned {p:#x}+{len:#x}, overlapping {name}"),
            );
        }
        if let Some(i) = bytes(p, len).iter().position(|&x| x != 0) {
            self.fail(
                Check::Allocation,
                format_args!("{what} returned {p:#x}+{len:#x}, not zeroed at offset {i}"),
            );
        }
    }

    /// `len` bytes of fresh anonymous read-write memory the host maps itself, aligned to
    /// the snapshot page (mmap aligns only to the kernel's), so that it fills whole units.
    fn host_mmap(&self, len: usize) -> usize {
        // SAFETY: sysconf has no preconditions.
        let k = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let slack = self.ps - k;
        // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len + slack,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            self.fail(Check::Host, format_args!("mmap of {len:#x} bytes failed"));
        }
        let p = p as usize;
        let start = (p + self.ps - 1) & !(self.ps - 1);
        // SAFETY: the head and tail trimmed off were just mapped above and are unused.
        unsafe {
            if start > p {
                libc::munmap(p as *mut _, start - p);
            }
            let tail = p + len + slack - (start + len);
            if tail > 0 {
                libc::munmap((start + len) as *mut _, tail);
            }
        }
        start
    }

    /// What /proc/self/maps (read into untracked memory) says of `[start, start + len)`.
    fn perms_over(&self, start: usize, len: usize) -> Perms {
        let end = start + len;
        // SAFETY: a NUL-terminated path.
        let fd = unsafe {
            libc::open(
                c"/proc/self/maps".as_ptr(),
                libc::O_RDONLY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            self.fail(Check::Host, format_args!("cannot open /proc/self/maps"));
        }
        let buf = bytes_mut(self.maps_buf, MAPS_BUF);
        let (mut have, mut found) = (0usize, Perms::default());
        loop {
            // SAFETY: reading into the untracked buffer's free tail.
            let n = unsafe { libc::read(fd, buf[have..].as_mut_ptr() as *mut _, MAPS_BUF - have) };
            if n < 0 {
                self.fail(Check::Host, format_args!("reading /proc/self/maps failed"));
            }
            have += n as usize;
            let mut used = 0;
            while let Some(nl) = buf[used..have].iter().position(|&c| c == b'\n') {
                if let Some((a, b, readable, writable)) = parse_maps_line(&buf[used..used + nl]) {
                    if a < end && start < b {
                        found.unwritable |= !writable;
                        found.readable |= readable;
                        found.unreadable |= !readable;
                    }
                }
                used += nl + 1;
            }
            buf.copy_within(used..have, 0);
            have -= used;
            if n == 0 || have == MAPS_BUF {
                break;
            }
        }
        // SAFETY: our descriptor.
        unsafe { libc::close(fd) };
        found
    }

    /// `TakeDiffMemorySnapshot` with the model's checks; `floor_raised`: memsnap must find
    /// that tracked memory vanished or was unprotected since the previous checkpoint, so
    /// nothing older than this one stays reachable.
    fn checkpoint(&mut self, when: &str, floor_raised: bool) {
        TakeDiffMemorySnapshot();
        self.verify_current(when);
        self.save();
        self.report(|r| r.checkpoints += 1);
        if floor_raised {
            self.floor = self.n - 1;
            self.report(|r| r.floor_raises += 1);
        }
        self.check_stats(when);
    }

    /// `Op::RegisterTracked`.
    fn register_tracked(&mut self, slot: usize, pages: usize) -> bool {
        if slot >= TRACKED_SLOTS || self.tracked[slot].live() || pages == 0 {
            return false;
        }
        let len = pages * self.ps;
        let p = self.host_mmap(len);
        let b = Block { ptr: p, len };
        if let Some(name) = self.overlaps_anything(b) {
            self.fail(
                Check::Host,
                format_args!("mmap returned {p:#x}+{len:#x}, overlapping {name}"),
            );
        }
        pattern(bytes_mut(p, len), 0x5c ^ slot as u8);
        pattern(bytes_mut(self.sh_tracked[slot], len), 0x5c ^ slot as u8);
        RegisterAllocatedMemory(p as *mut _, len, TRACKED);
        if !MemoryRangeIsTracked(p as *mut _, len) {
            self.fail(
                Check::Allocation,
                format_args!(
                    "RegisterAllocatedMemory({p:#x}, {len:#x}, Tracked) left the range untracked"
                ),
            );
        }
        // memsnap now holds it like memory it handed out: freed or rolled back, it joins
        // the free set.
        self.arena_add(b);
        self.tracked[slot] = b;
        self.report(|r| r.registrations += 1);
        true
    }

    /// `Op::PrepareWrite`.
    fn prepare_and_read(&mut self, t: Target, off: u32, len: u32, val: u8) -> bool {
        // Whether a malloc block's pages are tracked yet depends on where the allocator put
        // it (memory the heap grew into since the newest checkpoint is not).
        if matches!(t, Target::Malloc(_)) {
            return false;
        }
        let Some((p, s, size)) = self.writable(t) else {
            return false;
        };
        let off = off as usize % size;
        let len = (len as usize).clamp(1, (size - off).min(MAX_KERNEL_WRITE));
        let want = if self.tracked(t) {
            MemsnapStatus::Ok
        } else {
            MemsnapStatus::NotTracked
        };
        let st = memsnap_prepare_write((p + off) as *mut _, len);
        if st != want {
            self.fail(
                Check::KernelWrite,
                format_args!(
                    "memsnap_prepare_write({:#x}, {len}) over {t:?} returned {st:?} instead of {want:?}",
                    p + off
                ),
            );
        }
        let src = &mut bytes_mut(s, size)[off..off + len];
        pattern(src, val);
        // SAFETY: our pipe; the source is the untracked shadow.
        let w = unsafe { libc::write(self.pipe[1], src.as_ptr() as *const _, len) };
        if w != len as isize {
            self.fail(
                Check::KernelWrite,
                format_args!("write(2) into the pipe returned {w}"),
            );
        }
        let mut got = 0;
        while got < len {
            // SAFETY: inside the live region, whose pages were just prepared.
            let n = unsafe { libc::read(self.pipe[0], (p + off + got) as *mut _, len - got) };
            if n <= 0 {
                self.fail(
                    Check::KernelWrite,
                    format_args!(
                        "read(2) of {len} bytes into {t:?} at {:#x} after memsnap_prepare_write returned {n} after {got} bytes (errno {})",
                        p + off,
                        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
                    ),
                );
            }
            got += n as usize;
        }
        self.report(|r| r.kernel_writes += 1);
        true
    }

    fn alloc_tracked(&mut self, slot: usize, pages: usize, hint: bool) -> bool {
        if slot >= TRACKED_SLOTS || self.tracked[slot].live() || pages == 0 {
            return false;
        }
        let (len, at) = if hint {
            if self.freed_count == 0 {
                return false;
            }
            let b = self.freed[(self.freed_count - 1) % FREED_RING];
            (b.len, b.ptr)
        } else {
            (pages * self.ps, 0)
        };
        let hint_free = at != 0 && self.is_free(Block { ptr: at, len });
        let fits = self.largest_free() >= len;
        let p = if at != 0 {
            AllocateMemoryTryAddress(at as *mut _, len, TRACKED)
        } else {
            AllocateMemory(len, TRACKED)
        } as usize;
        const W: &str = "AllocateMemory(Tracked)";
        self.check_fresh_allocation(W, p, len, self.ps);
        let b = Block { ptr: p, len };
        if hint_free && p != at {
            self.fail(
                Check::Allocation,
                format_args!("{W} at free hint {at:#x}+{len:#x} returned {p:#x} instead"),
            );
        }
        let from_free = self.is_free(b);
        if fits && !from_free {
            self.fail(
                Check::Allocation,
                format_args!(
                    "{W} of {len:#x} bytes returned {p:#x}, outside the free set although a free range of {:#x} bytes exists",
                    self.largest_free()
                ),
            );
        }
        if !from_free {
            if self.arena[..self.arena_len].iter().any(|a| a.overlaps(&b)) {
                self.fail(
                    Check::Allocation,
                    format_args!(
                        "{W} returned {p:#x}+{len:#x}, partly inside earlier tracked allocations and partly not free"
                    ),
                );
            }
            self.arena_add(b);
        }
        if !MemoryRangeIsTracked(p as *mut _, len) {
            self.fail(
                Check::Allocation,
                format_args!("{W} returned {p:#x}+{len:#x}, which is not tracked"),
            );
        }
        self.tracked[slot] = b;
        bytes_mut(self.sh_tracked[slot], len).fill(0);
        true
    }

    fn step(&mut self, op: Op) -> bool {
        match op {
            Op::Write { t, off, len, val } => {
                let Some((p, s, size)) = self.writable(t) else {
                    return false;
                };
                let off = off as usize % size;
                let len = (len as usize).clamp(1, size - off);
                pattern(&mut bytes_mut(p, size)[off..off + len], val);
                pattern(&mut bytes_mut(s, size)[off..off + len], val);
            }
            Op::Touch { t, off, len } => {
                let Some((p, _, size)) = self.writable(t) else {
                    return false;
                };
                let off = off as usize % size;
                let end = off + (len as usize).clamp(1, size - off);
                // One byte per 512 reaches every page of the range, however small.
                for i in (off..end).step_by(512).chain(core::iter::once(end - 1)) {
                    let q = (p + i) as *mut u8;
                    // SAFETY: inside the live region.
                    unsafe { q.write_volatile(q.read_volatile()) };
                }
            }
            Op::AllocTracked { slot, pages, hint } => {
                return self.alloc_tracked(slot as usize, pages as usize, hint);
            }
            Op::FreeTracked { slot } => {
                let slot = slot as usize;
                if slot >= TRACKED_SLOTS || !self.tracked[slot].live() {
                    return false;
                }
                let b = self.tracked[slot];
                DeallocateMemory(b.ptr as *mut _, b.len, TRACKED);
                self.tracked[slot] = Block::default();
                self.remember_freed(b);
            }
            Op::AllocUntracked { slot, pages } => {
                let slot = slot as usize;
                if slot >= UNTRACKED_SLOTS || self.untracked[slot].live() || pages == 0 {
                    return false;
                }
                let len = pages as usize * self.ps;
                let p = AllocateMemory(len, GENERIC) as usize;
                // SAFETY: sysconf has no preconditions.
                let kernel_page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
                self.check_fresh_allocation("AllocateMemory(Generic)", p, len, kernel_page);
                if MemoryRangeIsTracked(p as *mut _, len) {
                    self.fail(
                        Check::Allocation,
                        format_args!(
                            "AllocateMemory(Generic) returned {p:#x}+{len:#x}, which is tracked"
                        ),
                    );
                }
                self.untracked[slot] = Block { ptr: p, len };
                bytes_mut(self.sh_untracked[slot], len).fill(0);
            }
            Op::FreeUntracked { slot } => {
                let slot = slot as usize;
                if slot >= UNTRACKED_SLOTS || !self.untracked[slot].live() {
                    return false;
                }
                let b = self.untracked[slot];
                DeallocateMemory(b.ptr as *mut _, b.len, GENERIC);
                self.untracked[slot] = Block::default();
            }
            Op::Malloc { slot, size } => {
                let slot = slot as usize;
                let size = (size as usize).clamp(1, MAX_MALLOC);
                if slot >= MALLOC_SLOTS || self.malloc[slot].live() {
                    return false;
                }
                // SAFETY: plain malloc; the block is freed by Op::Free or abandoned.
                let p = unsafe { libc::malloc(size) } as usize;
                let b = Block { ptr: p, len: size };
                if p == 0 {
                    self.fail(Check::Allocation, format_args!("malloc({size}) failed"));
                }
                if let Some(name) = self.overlaps_anything(b) {
                    self.fail(
                        Check::Allocation,
                        format_args!("malloc({size}) returned {p:#x}, overlapping {name}"),
                    );
                }
                self.malloc[slot] = b;
                pattern(bytes_mut(p, size), slot as u8 ^ 0xa5);
                pattern(bytes_mut(self.sh_malloc[slot], size), slot as u8 ^ 0xa5);
            }
            Op::RegisterTracked { slot, pages } => {
                return self.register_tracked(slot as usize, pages as usize);
            }
            Op::PrepareWrite { t, off, len, val } => {
                return self.prepare_and_read(t, off, len, val);
            }
            Op::HostMap { slot, pages } => {
                let slot = slot as usize;
                if slot >= HOST_SLOTS || self.host[slot].live() || pages == 0 {
                    return false;
                }
                let len = pages as usize * self.ps;
                let p = self.host_mmap(len);
                let b = Block { ptr: p, len };
                if let Some(name) = self.overlaps_anything(b) {
                    self.fail(
                        Check::Host,
                        format_args!("mmap returned {p:#x}+{len:#x}, overlapping {name}"),
                    );
                }
                if MemoryRangeIsTracked(p as *mut _, len) {
                    self.fail(
                        Check::Allocation,
                        format_args!(
                            "a host mapping {p:#x}+{len:#x} is tracked before any checkpoint saw it"
                        ),
                    );
                }
                pattern(bytes_mut(p, len), 0xc3 ^ slot as u8);
                pattern(bytes_mut(self.sh_host[slot], len), 0xc3 ^ slot as u8);
                self.host[slot] = b;
                self.host_born[slot] = self.n;
                self.host_prot[slot] = 0;
                self.host_pending[slot] = None;
                self.report(|r| r.host_calls += 1);
            }
            Op::HostUnmap { slot, raw } => {
                let slot = slot as usize;
                if slot >= HOST_SLOTS || !self.host[slot].live() {
                    return false;
                }
                let tracked = self.tracked(Target::Host(slot as u8));
                // A raw system call is checked only on memory as the host mapped it.
                if raw && (self.host_prot[slot] != 0 || (tracked && self.n == MAX_CHECKPOINTS)) {
                    return false;
                }
                let b = self.host[slot];
                let r = if raw {
                    // SAFETY: the host's own mapping, which nothing references any more.
                    unsafe { raw_munmap(b.ptr, b.len) }
                } else {
                    // SAFETY: as above; memsnap retains it if it is tracked.
                    unsafe { libc::munmap(b.ptr as *mut _, b.len) }
                };
                if r != 0 {
                    self.fail(Check::Host, format_args!("munmap({:#x}) failed", b.ptr));
                }
                self.host[slot] = Block::default();
                self.host_pending[slot] = None;
                self.report(|r| r.host_calls += 1);
                if raw && tracked {
                    // memsnap did not see it: a rewind before the next checkpoint would be
                    // refused (docs/hazards.md), so take it now.
                    self.checkpoint(
                        "at the checkpoint after a raw unmap of tracked memory",
                        true,
                    );
                } else if tracked {
                    // Retained: inaccessible to the program, as if unmapped.
                    let perms = self.perms_over(b.ptr, b.len);
                    if perms.readable {
                        self.fail(
                            Check::Host,
                            format_args!(
                                "tracked memory {:#x}+{:#x} is still accessible after munmap",
                                b.ptr, b.len
                            ),
                        );
                    }
                }
            }
            Op::HostProtect { t, prot, raw } => {
                let prot = prot % 3;
                let region = match t {
                    Target::Host(_) | Target::Tracked(_) => self.region(t),
                    _ => None,
                };
                let Some((p, _, len)) = region else {
                    return false;
                };
                let host = match t {
                    Target::Host(i) => Some(i as usize),
                    _ => None,
                };
                let before = host.map_or(0, |i| self.host_prot[i]);
                // Only tracked host mappings are made read-only or inaccessible: memory
                // a checkpoint has not found yet would be left out as unwritable.
                if prot != 0 && !(host.is_some() && self.tracked(t)) {
                    return false;
                }
                if raw && (prot != 0 || before != 0) {
                    return false;
                }
                let unprotects = raw && self.perms_over(p, len).unwritable;
                if unprotects && self.n == MAX_CHECKPOINTS {
                    return false;
                }
                let flags = [
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::PROT_READ,
                    libc::PROT_NONE,
                ][prot as usize];
                let r = if raw {
                    // SAFETY: a live region of the host's, read-write as it was mapped.
                    unsafe { raw_mprotect(p, len, flags) }
                } else {
                    // SAFETY: a live region of the host's; memsnap journals the change.
                    unsafe { libc::mprotect(p as *mut _, len, flags) }
                };
                if r != 0 {
                    self.fail(
                        Check::Host,
                        format_args!("mprotect({p:#x}, {flags}) failed"),
                    );
                }
                self.report(|r| r.host_calls += 1);
                if let Some(i) = host {
                    self.host_prot[i] = prot;
                    if prot != 2 && before == 2 {
                        // Accessible again: the bytes must be those it was made
                        // inaccessible with, or, if a rewind came between, the target's.
                        let (p, s, len) = (self.host[i].ptr, self.sh_host[i], self.host[i].len);
                        match self.host_pending[i].take() {
                            Some(h) if hash(p, len) != h => self.fail(
                                Check::Rewound,
                                format_args!(
                                    "host mapping {i} ({p:#x}+{len:#x}), rewound while inaccessible, does not hold the target's bytes once accessible"
                                ),
                            ),
                            Some(_) => bytes_mut(s, len).copy_from_slice(bytes(p, len)),
                            None => self.compare(Check::Current, "after a recommit", t, p, s, len),
                        }
                    }
                }
                if unprotects {
                    // As for a raw unmap: clean tracked pages became writable unseen.
                    self.checkpoint(
                        "at the checkpoint after a raw mprotect of write-protected tracked memory",
                        true,
                    );
                }
            }
            Op::Free { slot } => {
                let slot = slot as usize;
                if slot >= MALLOC_SLOTS || !self.malloc[slot].live() {
                    return false;
                }
                // SAFETY: a live block from malloc (live in the heap's rewound state too:
                // the model's live set is rewound with it).
                unsafe { libc::free(self.malloc[slot].ptr as *mut _) };
                self.malloc[slot] = Block::default();
            }
            Op::Checkpoint => {
                if self.n == MAX_CHECKPOINTS {
                    return false;
                }
                self.checkpoint("after TakeDiffMemorySnapshot", false);
            }
            Op::Rewind { depth } => {
                // Below the floor memsnap refuses (with an abort): not a rewind to make.
                if depth as usize >= self.n - self.floor {
                    return false;
                }
                self.rewind(depth as usize);
            }
            Op::RewindAll => self.rewind(self.n - 1 - self.floor),
            Op::Erase => {
                if self.n < 2 {
                    return false;
                }
                EraseLastSavedDiffMemorySnapshot();
                let dropped = self.n - 2;
                self.saved[dropped] = self.saved[self.n - 1];
                self.n -= 1;
                // Indices above the dropped checkpoint move down by one.
                if self.floor > dropped {
                    self.floor -= 1;
                }
                let saved = &mut self.saved[..self.n];
                for born in self
                    .host_born
                    .iter_mut()
                    .chain(saved.iter_mut().flat_map(|c| c.host_born.iter_mut()))
                {
                    if *born > dropped {
                        *born -= 1;
                    }
                }
                self.verify_current("after EraseLastSavedDiffMemorySnapshot");
                self.report(|r| r.erases += 1);
                self.check_stats("after EraseLastSavedDiffMemorySnapshot");
            }
        }
        true
    }

    fn rewind(&mut self, depth: usize) {
        let index = self.n - 1 - depth;
        let target = self.saved[index];
        if !self.registered_only || target.tracked.iter().any(|b| b.live()) {
            self.tracked_rewinds += 1;
        }
        for b in self.tracked {
            if b.live() && !target.tracked.contains(&b) {
                // Allocated after the target: the rewind returns it to the free set.
                self.remember_freed(b);
            }
        }
        SetMemoryChangesAllowed(false);
        RestoreMemoryToLastSavedCheckpoint();
        for _ in 0..depth {
            RestoreMemoryToLastSavedDiffCheckpoint();
        }
        SetMemoryChangesAllowed(true);
        FixupFreeRegionsAfterRewind();
        self.n -= depth;
        self.report(|r| {
            r.rewinds += 1;
            r.deep_rewinds += (depth > 0) as u64;
        });
        let when = "after a rewind";
        let k = self.n;
        let expect = |t: Target, p: usize, len: usize, h: u64| {
            if hash(p, len) != h {
                self.fail(
                    Check::Rewound,
                    format_args!(
                        "{when} of depth {depth}: {t:?} ({p:#x}+{len:#x}) does not hash to what checkpoint {k} (1-based, of those saved) held"
                    ),
                );
            }
        };
        // Untracked memory keeps its latest bytes: the model's current shadow.
        let kept = |t: Target| {
            if let Some((p, s, len)) = self.region(t) {
                self.compare(Check::Untracked, when, t, p, s, len);
            }
        };
        if self.registered_only {
            for i in 0..FIXED {
                kept(Target::Fixed(i as u8));
            }
            kept(Target::Data);
            kept(Target::Bss);
            kept(Target::Heap);
            for i in 0..MALLOC_SLOTS {
                kept(Target::Malloc(i as u8));
            }
        } else {
            for i in 0..FIXED {
                let (p, _, len) = self.fixed[i];
                expect(Target::Fixed(i as u8), p, len, target.fixed[i]);
            }
            expect(Target::Data, data(), DATA_LEN, target.data);
            expect(Target::Bss, bss(), BSS_LEN, target.bss);
            expect(Target::Heap, self.heap, HEAP_LEN, target.heap);
            for i in 0..MALLOC_SLOTS {
                let b = target.malloc[i];
                if b.live() {
                    expect(Target::Malloc(i as u8), b.ptr, b.len, target.malloc_hash[i]);
                }
            }
        }
        for i in 0..TRACKED_SLOTS {
            let b = target.tracked[i];
            if b.live() {
                expect(
                    Target::Tracked(i as u8),
                    b.ptr,
                    b.len,
                    target.tracked_hash[i],
                );
            }
        }
        for i in 0..UNTRACKED_SLOTS {
            kept(Target::Untracked(i as u8));
        }
        // Host mappings. Whole-process mode: one the target tracked is back as it was then,
        // its protection included, even if the host unmapped it since (memsnap retained
        // it); one mapped after the target reads as zero and is untracked (docs/hazards.md),
        // so the rewound program, which never made it, finds no stale bytes: the host
        // forgets it. Registered-only mode tracks none of them.
        let mut forgotten = [false; HOST_SLOTS];
        let mut back = [false; HOST_SLOTS];
        for (i, (gone, returns)) in forgotten.iter_mut().zip(back.iter_mut()).enumerate() {
            let (b, tb, t) = (self.host[i], target.host[i], Target::Host(i as u8));
            if self.registered_only {
                if b.live() {
                    kept(t);
                }
                continue;
            }
            if b.live() && b != tb {
                if !self.perms_over(b.ptr, b.len).readable {
                    self.fail(
                        Check::Rewound,
                        format_args!(
                            "{when} of depth {depth}: host mapping {i} ({:#x}+{:#x}), mapped after the target, is inaccessible",
                            b.ptr, b.len
                        ),
                    );
                }
                if let Some(at) = bytes(b.ptr, b.len).iter().position(|&x| x != 0) {
                    self.fail(
                        Check::Rewound,
                        format_args!(
                            "{when} of depth {depth}: host mapping {i} ({:#x}+{:#x}), mapped after the target, is not zero at offset {at}",
                            b.ptr, b.len
                        ),
                    );
                }
                if MemoryRangeIsTracked(b.ptr as *mut _, b.len) {
                    self.fail(
                        Check::Rewound,
                        format_args!(
                            "{when} of depth {depth}: host mapping {i}, mapped after the target, is still tracked"
                        ),
                    );
                }
                // SAFETY: the host's own mapping, untracked now and referenced by nothing.
                unsafe { libc::munmap(b.ptr as *mut _, b.len) };
                *gone = true;
            }
            if !tb.live() {
                continue;
            }
            let perms = self.perms_over(tb.ptr, tb.len);
            let inaccessible = target.host_prot[i] == 2;
            if perms.readable == inaccessible || perms.unreadable != inaccessible {
                self.fail(
                    Check::Rewound,
                    format_args!(
                        "{when} of depth {depth}: host mapping {i} ({:#x}+{:#x}){} is {} instead of {} as at the target",
                        tb.ptr,
                        tb.len,
                        if b != tb { ", unmapped since," } else { "" },
                        if perms.readable { "accessible" } else { "inaccessible" },
                        if inaccessible { "inaccessible" } else { "accessible" }
                    ),
                );
            }
            if !inaccessible {
                expect(t, tb.ptr, tb.len, target.host_hash[i]);
            }
            *returns = true;
        }
        for i in 0..HOST_SLOTS {
            if forgotten[i] {
                self.host[i] = Block::default();
            }
            if back[i] {
                if self.host[i] != target.host[i] {
                    self.report(|r| r.unmaps_undone += 1);
                }
                self.host[i] = target.host[i];
                self.host_prot[i] = target.host_prot[i];
                self.host_born[i] = target.host_born[i];
                self.host_pending[i] = (target.host_prot[i] == 2).then_some(target.host_hash[i]);
            } else if !self.host[i].live() {
                self.host_pending[i] = None;
            }
        }
        // Memory is now verified to be the target's: it becomes the model's current state.
        self.tracked = target.tracked;
        if !self.registered_only {
            self.malloc = target.malloc;
            bytes_mut(self.sh_data, DATA_LEN).copy_from_slice(bytes(data(), DATA_LEN));
            bytes_mut(self.sh_bss, BSS_LEN).copy_from_slice(bytes(bss(), BSS_LEN));
            bytes_mut(self.sh_heap, HEAP_LEN).copy_from_slice(bytes(self.heap, HEAP_LEN));
            for &(p, sh, len) in self.fixed.iter() {
                bytes_mut(sh, len).copy_from_slice(bytes(p, len));
            }
            for i in 0..MALLOC_SLOTS {
                let b = self.malloc[i];
                if b.live() {
                    bytes_mut(self.sh_malloc[i], b.len).copy_from_slice(bytes(b.ptr, b.len));
                }
            }
            for i in 0..HOST_SLOTS {
                let b = self.host[i];
                if b.live() && self.host_prot[i] != 2 {
                    bytes_mut(self.sh_host[i], b.len).copy_from_slice(bytes(b.ptr, b.len));
                }
            }
        }
        for i in 0..TRACKED_SLOTS {
            let b = self.tracked[i];
            if b.live() {
                bytes_mut(self.sh_tracked[i], b.len).copy_from_slice(bytes(b.ptr, b.len));
            }
        }
        self.check_stats(when);
        match stats() {
            Some(s) if s.active_dirty_pages != 0 => self.fail(
                Check::Stats,
                format_args!(
                    "{when}: {} active dirty pages right after the rewind",
                    s.active_dirty_pages
                ),
            ),
            _ => {}
        }
    }
}

/// Whether some page of a range is mapped without write permission (the clean tracked
/// pages of the mprotect backend, pages on mprotect under the others, read-only or
/// inaccessible memory), with read permission, or without it.
#[derive(Clone, Copy, Default)]
struct Perms {
    unwritable: bool,
    readable: bool,
    unreadable: bool,
}

/// `(start, end, readable, writable)` of a /proc/self/maps line.
fn parse_maps_line(line: &[u8]) -> Option<(usize, usize, bool, bool)> {
    let dash = line.iter().position(|&c| c == b'-')?;
    let space = dash + line[dash..].iter().position(|&c| c == b' ')?;
    let hex = |t: &[u8]| {
        t.iter().try_fold(0usize, |v, &c| {
            let d = (c as char).to_digit(16)? as usize;
            Some(v.checked_mul(16)? + d)
        })
    };
    let perms = line.get(space + 1..space + 5)?;
    Some((
        hex(&line[..dash])?,
        hex(&line[dash + 1..space])?,
        perms[0] == b'r',
        perms[1] == b'w',
    ))
}

/// Runs `ops` in this (forked, single-threaded) child and ends it: exit 0 when every check
/// held, 1 with the report filled in when one failed. memsnap's own aborts end it with
/// SIGABRT and their message on stderr.
pub fn run(config: Config, ops: &[Op], report: *mut Report) -> ! {
    // A hang fails the sequence instead of stalling the run (SIGALRM's default kills).
    // SAFETY: plain alarm(2).
    unsafe { libc::alarm(120) };
    InitializeMemorySnapshots();
    let report_page = (core::mem::size_of::<Report>() + 4095) & !4095;
    // The report page is a shared mapping, which the scan skips anyway; saying so keeps
    // it out of tracking even if that rule changes.
    let _ = memsnap_untrack_region(report as *mut _, report_page);
    let _ = memsnap_set_restore_threads(config.restore_threads as usize);
    if config.registered_only
        && memsnap_set_tracking_mode(MemsnapTrackingModeArg(1)) != MemsnapStatus::Ok
    {
        // SAFETY: ends the child.
        unsafe { libc::_exit(4) };
    }
    let mut pipe = [0i32; 2];
    // SAFETY: a two-int array on this (untracked) stack.
    if unsafe { libc::pipe(pipe.as_mut_ptr()) } != 0 {
        // SAFETY: ends the child.
        unsafe { libc::_exit(5) };
    }
    // SAFETY: the shared report page; the parent reads it only after this child exits.
    unsafe { (*report).registered_only = config.registered_only as u64 };
    let ps = memsnap_page_size();
    let alloc_bytes = MAX_ALLOC_PAGES * ps;
    let model_bytes = core::mem::size_of::<Model>();
    let kernel_page = memsnap::sys::os_page_size();
    let fixed_mem = fixed_regions(kernel_page);
    let shadow_bytes = fixed_mem.iter().map(|f| f.1).sum::<usize>()
        + DATA_LEN
        + BSS_LEN
        + HEAP_LEN
        + (TRACKED_SLOTS + UNTRACKED_SLOTS + HOST_SLOTS) * alloc_bytes
        + MALLOC_SLOTS * MAX_MALLOC
        + MAPS_BUF;
    let ops_bytes = core::mem::size_of_val(ops);
    let total = model_bytes + 64 + shadow_bytes + ops_bytes + 64;
    let base = AllocateMemory(total, GENERIC) as usize;
    let mut cursor = base + ((model_bytes + 63) & !63);
    let mut carve = |len: usize| {
        let p = cursor;
        cursor += len;
        p
    };
    let fixed: [(usize, usize, usize); FIXED] = core::array::from_fn(|i| {
        let (p, len) = fixed_mem[i];
        let sh = carve(len);
        bytes_mut(sh, len).copy_from_slice(bytes(p, len));
        (p, sh, len)
    });
    let sh_data = carve(DATA_LEN);
    let sh_bss = carve(BSS_LEN);
    let sh_heap = carve(HEAP_LEN);
    let sh_tracked = core::array::from_fn(|_| carve(alloc_bytes));
    let sh_untracked = core::array::from_fn(|_| carve(alloc_bytes));
    let sh_malloc = core::array::from_fn(|_| carve(MAX_MALLOC));
    let sh_host = core::array::from_fn(|_| carve(alloc_bytes));
    let maps_buf = carve(MAPS_BUF);
    cursor = (cursor + 63) & !63;
    let ops_copy = cursor as *mut Op;
    // SAFETY: room for ops.len() Ops was reserved, 64-byte aligned; untracked memory, so
    // the list stays put through every rewind.
    let ops: &[Op] = unsafe {
        core::ptr::copy_nonoverlapping(ops.as_ptr(), ops_copy, ops.len());
        core::slice::from_raw_parts(ops_copy, ops.len())
    };
    if !config.heap_growth {
        // MODEL_HEAP_GROWTH=0: grow the heap once now, before the first snapshot, so that
        // run-time mallocs stay inside it (memsnap pins glibc, which then never trims) and
        // the program break never moves during the run.
        // SAFETY: a block nobody else sees; the volatile write keeps the compiler from
        // eliding the malloc/free pair.
        unsafe {
            let p = libc::malloc(PREGROW) as *mut u8;
            if !p.is_null() {
                p.add(PREGROW - 1).write_volatile(1);
            }
            libc::free(p as *mut _);
        }
    }
    // SAFETY: malloc before the first snapshot; never freed.
    let heap = unsafe { libc::malloc(HEAP_LEN) } as usize;
    if heap == 0 {
        // SAFETY: ends the child.
        unsafe { libc::_exit(3) };
    }
    pattern(bytes_mut(heap, HEAP_LEN), 0x33);
    pattern(bytes_mut(data(), 17), 0x11);
    bytes_mut(sh_data, DATA_LEN).copy_from_slice(bytes(data(), DATA_LEN));
    bytes_mut(sh_bss, BSS_LEN).copy_from_slice(bytes(bss(), BSS_LEN));
    bytes_mut(sh_heap, HEAP_LEN).copy_from_slice(bytes(heap, HEAP_LEN));
    let model = base as *mut Model;
    // SAFETY: a NUL-terminated name; the value is only compared, before any snapshot.
    let verifying = unsafe {
        let v = libc::getenv(c"MEMSNAP_VERIFY".as_ptr());
        !v.is_null() && core::ffi::CStr::from_ptr(v).to_bytes() == b"1"
    };
    let empty = Saved {
        fixed: [0; FIXED],
        data: 0,
        bss: 0,
        heap: 0,
        tracked: [Block::default(); TRACKED_SLOTS],
        tracked_hash: [0; TRACKED_SLOTS],
        malloc: [Block::default(); MALLOC_SLOTS],
        malloc_hash: [0; MALLOC_SLOTS],
        host: [Block::default(); HOST_SLOTS],
        host_hash: [0; HOST_SLOTS],
        host_prot: [0; HOST_SLOTS],
        host_born: [0; HOST_SLOTS],
    };
    // SAFETY: `base` is a fresh, page-aligned, untracked block with room for a Model.
    unsafe {
        model.write(Model {
            ps,
            report,
            op: 0,
            n: 0,
            saved: [empty; MAX_CHECKPOINTS],
            heap,
            tracked: [Block::default(); TRACKED_SLOTS],
            untracked: [Block::default(); UNTRACKED_SLOTS],
            malloc: [Block::default(); MALLOC_SLOTS],
            host: [Block::default(); HOST_SLOTS],
            host_born: [0; HOST_SLOTS],
            host_prot: [0; HOST_SLOTS],
            host_pending: [None; HOST_SLOTS],
            floor: 0,
            registered_only: config.registered_only,
            pipe,
            maps_buf,
            tracked_rewinds: 0,
            verifying,
            arena: [Block::default(); ARENA_CAP],
            arena_len: 0,
            freed: [Block::default(); FREED_RING],
            freed_count: 0,
            fixed,
            sh_data,
            sh_bss,
            sh_heap,
            sh_tracked,
            sh_untracked,
            sh_malloc,
            sh_host,
        })
    };
    // SAFETY: just written; only this thread uses it.
    let m = unsafe { &mut *model };
    TakeFirstMemorySnapshot();
    m.verify_current("after TakeFirstMemorySnapshot");
    m.save();
    m.check_stats("after TakeFirstMemorySnapshot");
    for (i, &op) in ops.iter().enumerate() {
        m.op = i;
        m.report(|r| r.current = i as i64);
        let done = m.step(op);
        m.report(|r| {
            if done {
                r.ops_done += 1;
            } else {
                r.skipped += 1;
            }
        });
    }
    // Under MEMSNAP_VERIFY=1 every restore call compared the observable pages with the
    // checkpoint's hashes (a mismatch aborts with memsnap's message): some must have been,
    // unless no rewind went to a checkpoint that tracked anything (registered-only mode).
    if let Some(s) = stats().filter(|s| m.verifying && s.rewinds > 0 && m.tracked_rewinds > 0) {
        if s.verify_pages_checked == 0 {
            m.fail(
                Check::Stats,
                format_args!(
                    "{} rewinds under MEMSNAP_VERIFY=1 checked no page",
                    s.rewinds
                ),
            );
        }
    }
    // SAFETY: ends the child without running exit handlers (stdio buffers are tracked).
    unsafe { libc::_exit(0) }
}
