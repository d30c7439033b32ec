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
    data: u64,
    bss: u64,
    heap: u64,
    tracked: [Block; TRACKED_SLOTS],
    tracked_hash: [u64; TRACKED_SLOTS],
    malloc: [Block; MALLOC_SLOTS],
    malloc_hash: [u64; MALLOC_SLOTS],
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
    /// Every range ever handed out as a fresh tracked allocation, sorted and merged: the
    /// tracked free set is exactly this less the live tracked blocks.
    arena: [Block; ARENA_CAP],
    arena_len: usize,
    freed: [Block; FREED_RING],
    freed_count: usize,
    sh_data: usize,
    sh_bss: usize,
    sh_heap: usize,
    sh_tracked: [usize; TRACKED_SLOTS],
    sh_untracked: [usize; UNTRACKED_SLOTS],
    sh_malloc: [usize; MALLOC_SLOTS],
}

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
            Target::Data => Some((data(), self.sh_data, DATA_LEN)),
            Target::Bss => Some((bss(), self.sh_bss, BSS_LEN)),
            Target::Heap => Some((self.heap, self.sh_heap, HEAP_LEN)),
            Target::Tracked(i) => slot(&self.tracked, &self.sh_tracked, i),
            Target::Untracked(i) => slot(&self.untracked, &self.sh_untracked, i),
            Target::Malloc(i) => slot(&self.malloc, &self.sh_malloc, i),
        }
    }

    /// Every live region with its name, for the whole-memory comparisons.
    fn for_each_region(&self, mut f: impl FnMut(Target, usize, usize, usize)) {
        let mut all = [Target::Data; 3 + TRACKED_SLOTS + UNTRACKED_SLOTS + MALLOC_SLOTS];
        let mut k = 3;
        all[1] = Target::Bss;
        all[2] = Target::Heap;
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
        for t in all {
            if let Some((p, s, len)) = self.region(t) {
                f(t, p, s, len);
            }
        }
    }

    /// Memory equals the shadows everywhere.
    fn verify_current(&self, when: &str) {
        self.for_each_region(|t, p, s, len| self.compare(Check::Current, when, t, p, s, len));
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
        if s.oldest_restorable != 0 {
            self.fail(
                Check::Stats,
                format_args!(
                    "{when}: oldest restorable checkpoint is {} (nothing was unmapped or unprotected)",
                    s.oldest_restorable
                ),
            );
        }
    }

    fn save(&mut self) {
        let mut s = Saved {
            data: hash(self.sh_data, DATA_LEN),
            bss: hash(self.sh_bss, BSS_LEN),
            heap: hash(self.sh_heap, HEAP_LEN),
            tracked: self.tracked,
            tracked_hash: [0; TRACKED_SLOTS],
            malloc: self.malloc,
            malloc_hash: [0; MALLOC_SLOTS],
        };
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
                let Some((p, s, size)) = self.region(t) else {
                    return false;
                };
                let off = off as usize % size;
                let len = (len as usize).clamp(1, size - off);
                pattern(&mut bytes_mut(p, size)[off..off + len], val);
                pattern(&mut bytes_mut(s, size)[off..off + len], val);
            }
            Op::Touch { t, off, len } => {
                let Some((p, _, size)) = self.region(t) else {
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
                TakeDiffMemorySnapshot();
                self.verify_current("after TakeDiffMemorySnapshot");
                self.save();
                self.report(|r| r.checkpoints += 1);
                self.check_stats("after TakeDiffMemorySnapshot");
            }
            Op::Rewind { depth } => {
                if depth as usize >= self.n {
                    return false;
                }
                self.rewind(depth as usize);
            }
            Op::RewindAll => self.rewind(self.n - 1),
            Op::Erase => {
                if self.n < 2 {
                    return false;
                }
                EraseLastSavedDiffMemorySnapshot();
                self.saved[self.n - 2] = self.saved[self.n - 1];
                self.n -= 1;
                self.verify_current("after EraseLastSavedDiffMemorySnapshot");
                self.report(|r| r.erases += 1);
                self.check_stats("after EraseLastSavedDiffMemorySnapshot");
            }
        }
        true
    }

    fn rewind(&mut self, depth: usize) {
        let target = self.saved[self.n - 1 - depth];
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
        expect(Target::Data, data(), DATA_LEN, target.data);
        expect(Target::Bss, bss(), BSS_LEN, target.bss);
        expect(Target::Heap, self.heap, HEAP_LEN, target.heap);
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
        for i in 0..MALLOC_SLOTS {
            let b = target.malloc[i];
            if b.live() {
                expect(Target::Malloc(i as u8), b.ptr, b.len, target.malloc_hash[i]);
            }
        }
        for i in 0..UNTRACKED_SLOTS {
            if let Some((p, s, len)) = self.region(Target::Untracked(i as u8)) {
                self.compare(
                    Check::Untracked,
                    when,
                    Target::Untracked(i as u8),
                    p,
                    s,
                    len,
                );
            }
        }
        // Memory is now verified to be the target's: it becomes the model's current state.
        self.tracked = target.tracked;
        self.malloc = target.malloc;
        bytes_mut(self.sh_data, DATA_LEN).copy_from_slice(bytes(data(), DATA_LEN));
        bytes_mut(self.sh_bss, BSS_LEN).copy_from_slice(bytes(bss(), BSS_LEN));
        bytes_mut(self.sh_heap, HEAP_LEN).copy_from_slice(bytes(self.heap, HEAP_LEN));
        for i in 0..TRACKED_SLOTS {
            let b = self.tracked[i];
            if b.live() {
                bytes_mut(self.sh_tracked[i], b.len).copy_from_slice(bytes(b.ptr, b.len));
            }
        }
        for i in 0..MALLOC_SLOTS {
            let b = self.malloc[i];
            if b.live() {
                bytes_mut(self.sh_malloc[i], b.len).copy_from_slice(bytes(b.ptr, b.len));
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
    let ps = memsnap_page_size();
    let alloc_bytes = MAX_ALLOC_PAGES * ps;
    let model_bytes = core::mem::size_of::<Model>();
    let shadow_bytes = DATA_LEN
        + BSS_LEN
        + HEAP_LEN
        + (TRACKED_SLOTS + UNTRACKED_SLOTS) * alloc_bytes
        + MALLOC_SLOTS * MAX_MALLOC;
    let ops_bytes = core::mem::size_of_val(ops);
    let total = model_bytes + 64 + shadow_bytes + ops_bytes + 64;
    let base = AllocateMemory(total, GENERIC) as usize;
    let mut cursor = base + ((model_bytes + 63) & !63);
    let mut carve = |len: usize| {
        let p = cursor;
        cursor += len;
        p
    };
    let sh_data = carve(DATA_LEN);
    let sh_bss = carve(BSS_LEN);
    let sh_heap = carve(HEAP_LEN);
    let sh_tracked = core::array::from_fn(|_| carve(alloc_bytes));
    let sh_untracked = core::array::from_fn(|_| carve(alloc_bytes));
    let sh_malloc = core::array::from_fn(|_| carve(MAX_MALLOC));
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
    let empty = Saved {
        data: 0,
        bss: 0,
        heap: 0,
        tracked: [Block::default(); TRACKED_SLOTS],
        tracked_hash: [0; TRACKED_SLOTS],
        malloc: [Block::default(); MALLOC_SLOTS],
        malloc_hash: [0; MALLOC_SLOTS],
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
            arena: [Block::default(); ARENA_CAP],
            arena_len: 0,
            freed: [Block::default(); FREED_RING],
            freed_count: 0,
            sh_data,
            sh_bss,
            sh_heap,
            sh_tracked,
            sh_untracked,
            sh_malloc,
        })
    };
    // SAFETY: just written; only this thread uses it.
    let m = unsafe { &mut *model };
    // SAFETY: a NUL-terminated name; the value is only compared, before any snapshot.
    let verifying = unsafe {
        let v = libc::getenv(c"MEMSNAP_VERIFY".as_ptr());
        !v.is_null() && core::ffi::CStr::from_ptr(v).to_bytes() == b"1"
    };
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
    // checkpoint's hashes (a mismatch aborts with memsnap's message): some must have been.
    if let Some(s) = stats().filter(|s| verifying && s.rewinds > 0) {
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
