//! The operations of a model-test sequence and their seeded generator. Owns what a
//! sequence *is*; executing it against memsnap is `child.rs`'s job.
//!
//! Operations carry raw random numbers (offsets, lengths) that the executor reduces modulo
//! the size of the region it finds at run time, so one sequence means the same thing under
//! any snapshot page size, and a shrunk list (ops removed) still makes sense: an operation
//! that is impossible in its new context (freeing an empty slot, rewinding deeper than
//! the saved checkpoints) is skipped by the executor, never "repaired".

use std::fmt;

/// Tracked allocations (`AllocateMemory(.., Tracked)`) live at once.
pub const TRACKED_SLOTS: usize = 6;
/// Untracked allocations (`AllocateMemory(.., Generic)`) live at once.
pub const UNTRACKED_SLOTS: usize = 3;
/// Blocks from `malloc` during the run live at once.
pub const MALLOC_SLOTS: usize = 8;
/// Mappings the host makes itself (`mmap`) and does not register, live at once.
pub const HOST_SLOTS: usize = 4;
/// The longest kernel write (`read(2)` into memory after `memsnap_prepare_write`): well
/// inside a pipe's capacity, so the write into the pipe never blocks.
pub const MAX_KERNEL_WRITE: usize = 16 << 10;
/// The largest tracked or untracked allocation, in snapshot pages.
pub const MAX_ALLOC_PAGES: usize = 4;
/// The largest `malloc` during the run, in bytes.
pub const MAX_MALLOC: usize = 48 << 10;
/// Saved checkpoints the model keeps at most; the generator stops checkpointing there.
pub const MAX_CHECKPOINTS: usize = 20;

/// Host memory set up before the first snapshot that no allocation call names (see
/// `child.rs`, `Fixed`): the controller's thread-local array, an idle worker's, a 1 MiB
/// mapping whose neighbours in the same mapping are the stacks of worker threads
/// (declared untracked), and the read-write half of a `PROT_NONE` reservation.
pub const FIXED: usize = 4;

/// A region a write goes to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// One of the `FIXED` host regions.
    Fixed(u8),
    /// A static with a non-zero initializer (`.data`).
    Data,
    /// A zero-initialized static (`.bss`).
    Bss,
    /// A block `malloc`ed before the first snapshot.
    Heap,
    /// A live tracked allocation.
    Tracked(u8),
    /// A live untracked allocation: never rewound.
    Untracked(u8),
    /// A live block `malloc`ed during the run.
    Malloc(u8),
    /// A live mapping the host made with `mmap` and did not register: tracked from the
    /// next checkpoint in whole-process mode, never in registered-only mode.
    Host(u8),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// Bytes `val + 7 i` at `off` (mod the region's size), `len` of them (clamped).
    Write {
        t: Target,
        off: u32,
        len: u32,
        val: u8,
    },
    /// Rewrites bytes with their own values: the page faults but does not change, so the
    /// diff snapshot drops it.
    Touch {
        t: Target,
        off: u32,
        len: u32,
    },
    /// `AllocateMemory(pages, Tracked)`; with `hint`, `AllocateMemoryTryAddress` at the most
    /// recently freed (or rolled back) tracked block, with that block's size.
    AllocTracked {
        slot: u8,
        pages: u8,
        hint: bool,
    },
    /// `DeallocateMemory(.., Tracked)`: the block joins the free set, whether it came from
    /// `AllocateMemory` or `RegisterAllocatedMemory`.
    FreeTracked {
        slot: u8,
    },
    /// The host maps `pages` itself, writes its own bytes and registers them with
    /// `RegisterAllocatedMemory(.., Tracked)`: tracked at once, a tracked slot like any.
    RegisterTracked {
        slot: u8,
        pages: u8,
    },
    AllocUntracked {
        slot: u8,
        pages: u8,
    },
    FreeUntracked {
        slot: u8,
    },
    Malloc {
        slot: u8,
        size: u32,
    },
    Free {
        slot: u8,
    },
    /// `TakeDiffMemorySnapshot`.
    Checkpoint,
    /// `RestoreMemoryToLastSavedCheckpoint`, then `depth` times
    /// `RestoreMemoryToLastSavedDiffCheckpoint`.
    Rewind {
        depth: u8,
    },
    /// `EraseLastSavedDiffMemorySnapshot`.
    Erase,
    /// `memsnap_prepare_write` over bytes `val + 7 i` at `off` (mod the region's size),
    /// `len` of them (clamped to `MAX_KERNEL_WRITE`), then the kernel writes them there
    /// (`read(2)` from a pipe): it must land under every backend, and the status must say
    /// whether the region is tracked.
    PrepareWrite {
        t: Target,
        off: u32,
        len: u32,
        val: u8,
    },
    /// The host maps `pages` snapshot pages itself (`mmap`, anonymous, read-write) into a
    /// host slot and writes its own bytes there.
    HostMap {
        slot: u8,
        pages: u8,
    },
    /// The host unmaps a host slot. Through libc's `munmap`, which memsnap interposes,
    /// tracked memory is retained: a rewind to before the unmap brings it back with its
    /// bytes. With `raw`, a system call memsnap does not see: where the slot was tracked,
    /// older checkpoints become unreachable and a rewind before the next checkpoint is
    /// refused (docs/hazards.md), so the executor takes that checkpoint at once.
    HostUnmap {
        slot: u8,
        raw: bool,
    },
    /// The host changes the protection of a slot: `prot` 0 read-write, 1 read-only, 2
    /// none (a decommit, as allocators do), through libc's `mprotect`, which memsnap
    /// interposes: the protection is journaled and a rewind restores the target's. Only
    /// tracked host mappings take 1 and 2. With `raw` (read-write only, a system call
    /// memsnap does not see), unprotecting clean tracked pages (those memsnap keeps
    /// read-only: the mprotect backend's) makes older checkpoints unreachable as for an
    /// unmap, and the executor takes a checkpoint at once.
    HostProtect {
        t: Target,
        prot: u8,
        raw: bool,
    },
    /// A rewind to the first saved checkpoint, however deep that is. Every sequence ends
    /// with one, and so does every prefix tried while shrinking.
    RewindAll,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Op::Write { t, off, len, val } => {
                write!(f, "write {t:?} off={off} len={len} val={val}")
            }
            Op::Touch { t, off, len } => write!(f, "touch {t:?} off={off} len={len}"),
            Op::AllocTracked {
                slot, hint: true, ..
            } => write!(
                f,
                "alloc tracked slot={slot} at the last freed or rolled-back block, its size"
            ),
            Op::AllocTracked { slot, pages, .. } => {
                write!(f, "alloc tracked slot={slot} pages={pages}")
            }
            Op::FreeTracked { slot } => write!(f, "free tracked slot={slot}"),
            Op::AllocUntracked { slot, pages } => {
                write!(f, "alloc untracked slot={slot} pages={pages}")
            }
            Op::FreeUntracked { slot } => write!(f, "free untracked slot={slot}"),
            Op::Malloc { slot, size } => write!(f, "malloc slot={slot} size={size}"),
            Op::Free { slot } => write!(f, "free malloc slot={slot}"),
            Op::Checkpoint => write!(f, "checkpoint"),
            Op::Rewind { depth } => write!(f, "rewind depth={depth}"),
            Op::Erase => write!(f, "erase"),
            Op::RegisterTracked { slot, pages } => {
                write!(f, "register tracked slot={slot} pages={pages}")
            }
            Op::PrepareWrite { t, off, len, val } => {
                write!(
                    f,
                    "prepare and read(2) into {t:?} off={off} len={len} val={val}"
                )
            }
            Op::HostMap { slot, pages } => write!(f, "host mmap slot={slot} pages={pages}"),
            Op::HostUnmap { slot, raw } => {
                write!(
                    f,
                    "host munmap slot={slot}{}",
                    if raw { " (raw syscall)" } else { "" }
                )
            }
            Op::HostProtect { t, prot, raw } => write!(
                f,
                "host mprotect {t:?} {}{}",
                ["read-write", "read-only", "none"][prot as usize % 3],
                if raw { " (raw syscall)" } else { "" }
            ),
            Op::RewindAll => write!(f, "rewind to the first checkpoint"),
        }
    }
}

/// Per-sequence settings that are not operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// `memsnap_set_restore_threads` (0 restores on the calling thread).
    pub restore_threads: u8,
    /// Let `malloc` grow the heap (brk) after the first snapshot, so rewinds must move
    /// the program break back (the default).
    pub heap_growth: bool,
    /// `memsnap_set_tracking_mode(RegisteredOnly)`: only tracked allocations and registered
    /// memory are tracked; the statics, the heap and host mappings keep their latest bytes.
    pub registered_only: bool,
}

/// xorshift64* seeded through splitmix64, so nearby seeds give unrelated sequences.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next() >> 32) * n) >> 32
    }
}

/// Which slots are live, as bitmasks.
#[derive(Clone, Copy, Default)]
struct Live {
    tracked: u8,
    malloc: u8,
    host: u8,
}

/// The generator's abstract view of the executor's state: enough to emit only operations
/// that are valid where they stand (the executor re-checks anyway).
struct Abstract {
    saved: Vec<Live>,
    now: Live,
    untracked: u8,
    freed_tracked: bool,
    /// The oldest checkpoint a rewind may reach, as far as the generator can tell.
    floor: usize,
}

fn pick_slot(rng: &mut Rng, mask: u8, slots: usize, want_live: bool) -> Option<u8> {
    let choices: Vec<u8> = (0..slots as u8)
        .filter(|&s| (mask >> s) & 1 == want_live as u8)
        .collect();
    (!choices.is_empty()).then(|| choices[rng.below(choices.len() as u64) as usize])
}

fn write_len(rng: &mut Rng) -> u32 {
    match rng.below(10) {
        0..=6 => 1 + rng.below(64) as u32,
        7 | 8 => 1 + rng.below(8192) as u32,
        _ => 1 + rng.below(48 << 10) as u32,
    }
}

/// The sequence for `seed`: its settings and `len` operations, then a rewind to the first
/// checkpoint so every sequence ends with a deep check.
pub fn generate(seed: u64, len: usize) -> (Config, Vec<Op>) {
    let mut rng = Rng::new(seed);
    let config = Config {
        restore_threads: [0u8, 1, 2, 4][rng.below(4) as usize],
        heap_growth: true,
        registered_only: rng.below(4) == 0,
    };
    let mut a = Abstract {
        saved: vec![Live::default()],
        now: Live::default(),
        untracked: 0,
        freed_tracked: false,
        floor: 0,
    };
    let mut ops = Vec::with_capacity(len + 1);
    while ops.len() < len {
        let op = match rng.below(112) {
            0..=41 => {
                let t = match rng.below(8) {
                    7 => Target::Fixed(rng.below(FIXED as u64) as u8),
                    0 => Target::Data,
                    1 => Target::Bss,
                    2 => Target::Heap,
                    3 => match pick_slot(&mut rng, a.now.tracked, TRACKED_SLOTS, true) {
                        Some(s) => Target::Tracked(s),
                        None => continue,
                    },
                    4 => match pick_slot(&mut rng, a.untracked, UNTRACKED_SLOTS, true) {
                        Some(s) => Target::Untracked(s),
                        None => continue,
                    },
                    5 => match pick_slot(&mut rng, a.now.host, HOST_SLOTS, true) {
                        Some(s) => Target::Host(s),
                        None => continue,
                    },
                    _ => match pick_slot(&mut rng, a.now.malloc, MALLOC_SLOTS, true) {
                        Some(s) => Target::Malloc(s),
                        None => continue,
                    },
                };
                Op::Write {
                    t,
                    off: rng.next() as u32,
                    len: write_len(&mut rng),
                    val: rng.next() as u8,
                }
            }
            42..=45 => {
                let t = [Target::Data, Target::Bss, Target::Heap][rng.below(3) as usize];
                Op::Touch {
                    t,
                    off: rng.next() as u32,
                    len: 1 + rng.below(3 * 4096) as u32,
                }
            }
            46..=52 => {
                let Some(slot) = pick_slot(&mut rng, a.now.tracked, TRACKED_SLOTS, false) else {
                    continue;
                };
                a.now.tracked |= 1 << slot;
                Op::AllocTracked {
                    slot,
                    pages: 1 + rng.below(MAX_ALLOC_PAGES as u64) as u8,
                    hint: a.freed_tracked && rng.below(5) < 2,
                }
            }
            53..=56 => {
                let Some(slot) = pick_slot(&mut rng, a.now.tracked, TRACKED_SLOTS, true) else {
                    continue;
                };
                a.now.tracked &= !(1 << slot);
                a.freed_tracked = true;
                Op::FreeTracked { slot }
            }
            57..=59 => {
                let Some(slot) = pick_slot(&mut rng, a.untracked, UNTRACKED_SLOTS, false) else {
                    continue;
                };
                a.untracked |= 1 << slot;
                Op::AllocUntracked {
                    slot,
                    pages: 1 + rng.below(MAX_ALLOC_PAGES as u64) as u8,
                }
            }
            60..=61 => {
                let Some(slot) = pick_slot(&mut rng, a.untracked, UNTRACKED_SLOTS, true) else {
                    continue;
                };
                a.untracked &= !(1 << slot);
                Op::FreeUntracked { slot }
            }
            62..=66 => {
                let Some(slot) = pick_slot(&mut rng, a.now.malloc, MALLOC_SLOTS, false) else {
                    continue;
                };
                a.now.malloc |= 1 << slot;
                Op::Malloc {
                    slot,
                    size: 1 + rng.below(MAX_MALLOC as u64) as u32,
                }
            }
            67..=69 => {
                let Some(slot) = pick_slot(&mut rng, a.now.malloc, MALLOC_SLOTS, true) else {
                    continue;
                };
                a.now.malloc &= !(1 << slot);
                Op::Free { slot }
            }
            70..=83 => {
                if a.saved.len() >= MAX_CHECKPOINTS {
                    continue;
                }
                a.saved.push(a.now);
                Op::Checkpoint
            }
            84..=95 => {
                let n = a.saved.len() as u64;
                let reachable = n - a.floor as u64;
                let depth = if rng.below(2) == 0 {
                    0
                } else {
                    rng.below(reachable)
                };
                a.saved.truncate((n - depth) as usize);
                let target = *a
                    .saved
                    .last()
                    .expect("the first checkpoint is never popped");
                if a.now.tracked & !target.tracked != 0 {
                    a.freed_tracked = true;
                }
                // Registered-only mode rewinds neither the heap nor host mappings.
                let kept = a.now;
                a.now = target;
                if config.registered_only {
                    a.now.malloc = kept.malloc;
                    a.now.host = kept.host;
                }
                Op::Rewind { depth: depth as u8 }
            }
            96..=99 => {
                let n = a.saved.len();
                if n < 2 {
                    continue;
                }
                a.saved.remove(n - 2);
                if a.floor > n - 2 {
                    a.floor -= 1;
                }
                Op::Erase
            }
            100..=103 => {
                let Some(slot) = pick_slot(&mut rng, a.now.tracked, TRACKED_SLOTS, false) else {
                    continue;
                };
                a.now.tracked |= 1 << slot;
                Op::RegisterTracked {
                    slot,
                    pages: 1 + rng.below(MAX_ALLOC_PAGES as u64) as u8,
                }
            }
            104..=105 => {
                let Some(slot) = pick_slot(&mut rng, a.now.host, HOST_SLOTS, false) else {
                    continue;
                };
                a.now.host |= 1 << slot;
                Op::HostMap {
                    slot,
                    pages: 1 + rng.below(MAX_ALLOC_PAGES as u64) as u8,
                }
            }
            106 => {
                let Some(slot) = pick_slot(&mut rng, a.now.host, HOST_SLOTS, true) else {
                    continue;
                };
                a.now.host &= !(1 << slot);
                let raw = rng.below(3) == 0;
                // A raw unmap of a slot assumed tracked: the executor then checkpoints at
                // once and nothing older is reachable.
                if raw && !config.registered_only && a.saved.len() < MAX_CHECKPOINTS {
                    a.saved.push(a.now);
                    a.floor = a.saved.len() - 1;
                }
                Op::HostUnmap { slot, raw }
            }
            107..=108 => {
                let raw = rng.below(4) == 0;
                let t = if raw && rng.below(2) == 0 {
                    pick_slot(&mut rng, a.now.tracked, TRACKED_SLOTS, true).map(Target::Tracked)
                } else {
                    pick_slot(&mut rng, a.now.host, HOST_SLOTS, true).map(Target::Host)
                };
                let Some(t) = t else { continue };
                let prot = if raw { 0 } else { rng.below(3) as u8 };
                Op::HostProtect { t, prot, raw }
            }
            _ => {
                let t = match rng.below(6) {
                    0 => Target::Data,
                    1 => Target::Bss,
                    2 => Target::Heap,
                    3 => match pick_slot(&mut rng, a.now.tracked, TRACKED_SLOTS, true) {
                        Some(s) => Target::Tracked(s),
                        None => continue,
                    },
                    4 => match pick_slot(&mut rng, a.untracked, UNTRACKED_SLOTS, true) {
                        Some(s) => Target::Untracked(s),
                        None => continue,
                    },
                    _ => match pick_slot(&mut rng, a.now.host, HOST_SLOTS, true) {
                        Some(s) => Target::Host(s),
                        None => continue,
                    },
                };
                Op::PrepareWrite {
                    t,
                    off: rng.next() as u32,
                    len: 1 + rng.below(MAX_KERNEL_WRITE as u64) as u32,
                    val: rng.next() as u8,
                }
            }
        };
        ops.push(op);
    }
    ops.push(Op::RewindAll);
    (config, ops)
}
