//! What is measured: the workload descriptions, their parameters as recorded in
//! results.json, and the plan of one `make bench` run.

use std::fmt;

pub const MIB: usize = 1 << 20;
pub const GIB: usize = 1 << 30;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Sequential,
    Random,
}

impl fmt::Display for Order {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Order::Sequential => "seq",
            Order::Random => "random",
        })
    }
}

/// One measurement, run once per repetition in a fresh child by every mechanism that
/// supports it.
#[derive(Clone, Debug)]
pub enum Workload {
    /// The first write to each of `pages` pages after a checkpoint (the fault path), in
    /// `order`, split between `threads` writers. `cap` bounds the pages written (the
    /// random order on big heaps would exceed vm.max_map_count under memsnap).
    FirstWrite {
        heap: usize,
        order: Order,
        threads: usize,
        cap: Option<usize>,
    },
    /// A checkpoint with `fraction` of the heap's pages dirty (a random subset, written in
    /// address order), plus the first writes that dirtied them.
    Checkpoint { heap: usize, fraction: f64 },
    /// Restoring `levels` diffs plus the active set, each `fraction` of the heap's pages
    /// (independent random subsets).
    Restore {
        heap: usize,
        fraction: f64,
        levels: usize,
    },
    /// The library's own memory once the heap is tracked (RSS before/after the first
    /// snapshot).
    Overhead { heap: usize },
    /// The process's map count while pages are first written in random order, until all
    /// are written or the process dies.
    Maps { heap: usize },
    /// One page copied with memcpy (pages of a 64 MiB buffer in random order, and one hot
    /// page).
    PageCopy,
    /// The whole price of a dirty page over one checkpoint interval and a rewind, from a
    /// diff checkpoint C1: first writes to `fraction` of the heap's pages (random order),
    /// TakeDiffMemorySnapshot (C2), then the rewind back to C1 as the host protocol does
    /// it (changes disallowed; RestoreMemoryToLastSavedCheckpoint, which finds the active
    /// set empty; RestoreMemoryToLastSavedDiffCheckpoint, which restores the pages;
    /// changes allowed; FixupFreeRegionsAfterRewind), timed as a whole and divided by the
    /// pages written. Fork's counterpart: fork(), the child's first writes, its exit.
    Cycle { heap: usize, fraction: f64 },
    /// The synchronous uffd fault path's cross-CPU cost: first writes to `pages` random
    /// pages from one thread, with the process (and so the fault server it starts) pinned
    /// to the CPU it runs on, or free to run the server on another CPU.
    Wakeup {
        heap: usize,
        pages: usize,
        pinned: bool,
    },
    /// Pre-images smaller than a page: `words` random 8-byte words written in each of a
    /// random `fraction` of the heap's pages, a checkpoint (its cost and the bytes its
    /// pre-images keep per dirty page), then the rewind to the checkpoint before, verified.
    Sparse {
        heap: usize,
        fraction: f64,
        words: usize,
    },
}

impl Workload {
    pub fn name(&self) -> &'static str {
        match self {
            Workload::FirstWrite { .. } => "first_write",
            Workload::Checkpoint { .. } => "checkpoint",
            Workload::Restore { .. } => "restore",
            Workload::Overhead { .. } => "overhead",
            Workload::Maps { .. } => "map_count",
            Workload::PageCopy => "page_copy",
            Workload::Cycle { .. } => "cycle",
            Workload::Wakeup { .. } => "uffd_wakeup",
            Workload::Sparse { .. } => "sparse_write",
        }
    }

    pub fn heap(&self) -> usize {
        match *self {
            Workload::FirstWrite { heap, .. }
            | Workload::Checkpoint { heap, .. }
            | Workload::Restore { heap, .. }
            | Workload::Overhead { heap }
            | Workload::Maps { heap }
            | Workload::Cycle { heap, .. }
            | Workload::Wakeup { heap, .. }
            | Workload::Sparse { heap, .. } => heap,
            Workload::PageCopy => 64 * MIB,
        }
    }

    /// Parameters for the table and results.json, heap excluded.
    pub fn params(&self) -> Vec<(&'static str, String)> {
        match *self {
            Workload::FirstWrite {
                order,
                threads,
                cap,
                ..
            } => {
                let mut v = vec![
                    ("order", order.to_string()),
                    ("threads", threads.to_string()),
                ];
                if let Some(c) = cap {
                    v.push(("page_cap", c.to_string()));
                }
                v
            }
            Workload::Checkpoint { fraction, .. } | Workload::Cycle { fraction, .. } => {
                vec![("dirty", pct(fraction))]
            }
            Workload::Wakeup { pages, pinned, .. } => vec![
                ("pages", pages.to_string()),
                ("pinned", if pinned { "yes" } else { "no" }.to_string()),
            ],
            Workload::Sparse {
                fraction, words, ..
            } => vec![
                ("dirty", pct(fraction)),
                ("words_per_page", words.to_string()),
            ],
            Workload::Restore {
                fraction, levels, ..
            } => vec![
                ("dirty_per_level", pct(fraction)),
                ("levels", levels.to_string()),
            ],
            _ => vec![],
        }
    }

    /// The metrics printed in the table (all metrics go to results.json).
    pub fn shown(&self) -> &'static [&'static str] {
        match self {
            Workload::FirstWrite { .. } => &["ns_per_page", "cpu_ns_per_page"],
            Workload::Checkpoint { .. } => &[
                "checkpoint_ns",
                "write_ns_per_page",
                "cycle_ns_per_dirty_page",
                "kept_bytes_per_dirty_page",
            ],
            Workload::Restore { .. } => &["restore_ns_per_page"],
            Workload::Overhead { .. } => &["own_bytes", "own_bytes_per_tracked_gib"],
            Workload::Maps { .. } => &["max_maps", "pages_written"],
            Workload::PageCopy => &["ns_per_page_random", "ns_per_page_hot"],
            Workload::Cycle { .. } => &[
                "cycle_ns_per_dirty_page",
                "write_ns_per_page",
                "checkpoint_ns_per_page",
                "restore_ns_per_page",
                "read_into_tracked",
                "verified",
            ],
            Workload::Sparse { .. } => &[
                "checkpoint_ns_per_page",
                "kept_bytes_per_dirty_page",
                "restore_ns_per_page",
                "verified",
            ],
            Workload::Wakeup { .. } => &[
                "ns_per_page",
                "cpu_ns_per_page",
                "wakeups_per_fault",
                "spin_hits_per_fault",
            ],
        }
    }
}

pub fn pct(f: f64) -> String {
    let p = f * 100.0;
    if p >= 1.0 {
        format!("{p:.0}%")
    } else {
        format!("{p}%")
    }
}

pub fn size_name(bytes: usize) -> String {
    if bytes >= GIB {
        format!("{}GiB", bytes / GIB)
    } else {
        format!("{}MiB", bytes / MIB)
    }
}

/// Repetitions per workload: big heaps cost seconds per child, so fewer of them; the
/// cycle workload repeats its cycles inside each child, so it needs fewer children.
pub fn reps(w: &Workload, quick: bool) -> usize {
    match (quick, w.heap() >= GIB, w) {
        (true, _, _) => 1,
        (false, true, _) => 3,
        (false, false, Workload::Cycle { .. }) => 3,
        (false, false, _) => 5,
    }
}

/// Pages the random-order first write may dirty on `heap` before a checkpoint: under
/// mprotect tracking each isolated writable page splits its mapping in three, and with a
/// fraction f of pages dirty at random the process holds about 2·n·f·(1-f) mappings, so
/// 10% of 1 GiB (~47k mappings) stays under the default vm.max_map_count of 65530.
fn random_cap(heap: usize, page: usize) -> Option<usize> {
    let pages = heap / page;
    (pages > 65536).then_some(pages / 10)
}

pub fn plan(heaps: &[usize], page: usize) -> Vec<Workload> {
    let mut v = vec![Workload::PageCopy];
    for &heap in heaps {
        for order in [Order::Sequential, Order::Random] {
            for threads in [1, 2] {
                let cap = match order {
                    Order::Random => random_cap(heap, page),
                    Order::Sequential => None,
                };
                v.push(Workload::FirstWrite {
                    heap,
                    order,
                    threads,
                    cap,
                });
            }
        }
        for fraction in [0.001, 0.01, 0.1, 1.0] {
            v.push(Workload::Checkpoint { heap, fraction });
        }
        for (fraction, levels) in [(0.01, 0), (0.1, 0), (0.01, 4)] {
            v.push(Workload::Restore {
                heap,
                fraction,
                levels,
            });
        }
        for fraction in [0.01, 0.1] {
            v.push(Workload::Cycle { heap, fraction });
        }
        v.push(Workload::Overhead { heap });
        v.push(Workload::Maps { heap });
        v.push(Workload::Sparse {
            heap,
            fraction: 0.1,
            words: 8,
        });
    }
    // The wake-up cost does not depend on the heap: the smallest heap is enough.
    if let Some(&heap) = heaps.iter().min() {
        let pages = (heap / page).min(4096);
        for pinned in [false, true] {
            v.push(Workload::Wakeup {
                heap,
                pages,
                pinned,
            });
        }
    }
    v
}
