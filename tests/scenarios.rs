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
        for i in (0..4096).step_by(7) {
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

fn main() {
    let scenarios: [(&str, fn()); 5] = [
        (
            "whole_process_five_checkpoints",
            whole_process_five_checkpoints,
        ),
        ("registered_only", registered_only),
        ("erase_folds_into_predecessor", erase_folds_into_predecessor),
        ("allocations_after_rewind", allocations_after_rewind),
        ("random_walk", random_walk),
    ];
    let (mut passed, mut failed) = (0, 0);
    for (name, f) in scenarios {
        // SAFETY: this process is single-threaded here; the child runs one scenario and
        // exits without returning.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            f();
            // SAFETY: ends the child.
            unsafe { libc::_exit(0) };
        }
        let mut status = 0;
        // SAFETY: waiting for our own child.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        let ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
        println!("scenario {name} ... {}", if ok { "ok" } else { "FAILED" });
        if ok {
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
