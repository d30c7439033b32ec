//! The engine's event counters and timers: faults, snapshots, rewinds, their times, and
//! the host's named timers. The hot paths bump the atomic cells; every report (the
//! extension's stats record, `DumpTimers`) reads one plain [`Counters`] copy of them.

use core::sync::atomic::{AtomicU64, Ordering};

use super::TIMER_KINDS;

/// The counters as atomic cells, in the engine's block.
pub struct CounterCells {
    faults: AtomicU64,
    /// Faults resolved by capturing a whole block.
    block_faults: AtomicU64,
    checkpoints_taken: AtomicU64,
    rewinds: AtomicU64,
    snapshot_ns: AtomicU64,
    last_snapshot_ns: AtomicU64,
    restore_ns: AtomicU64,
    last_restore_ns: AtomicU64,
    timer_hits: [AtomicU64; TIMER_KINDS],
    timer_ns: [AtomicU64; TIMER_KINDS],
    /// When the engine was initialized (`now_us`).
    start_us: f64,
}

/// One reading of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Counters {
    pub faults: u64,
    pub block_faults: u64,
    pub checkpoints_taken: u64,
    pub rewinds: u64,
    pub snapshot_ns: u64,
    pub last_snapshot_ns: u64,
    pub restore_ns: u64,
    pub last_restore_ns: u64,
    pub timer_hits: [u64; TIMER_KINDS],
    pub timer_ns: [u64; TIMER_KINDS],
    pub start_us: f64,
}

/// Nanoseconds since `t0` (microseconds, `now_us`), never negative.
fn elapsed_ns(t0: f64) -> u64 {
    ((crate::sys::now_us() - t0) * 1000.0).max(0.0) as u64
}

impl CounterCells {
    pub fn new(start_us: f64) -> Self {
        CounterCells {
            faults: AtomicU64::new(0),
            block_faults: AtomicU64::new(0),
            checkpoints_taken: AtomicU64::new(0),
            rewinds: AtomicU64::new(0),
            snapshot_ns: AtomicU64::new(0),
            last_snapshot_ns: AtomicU64::new(0),
            restore_ns: AtomicU64::new(0),
            last_restore_ns: AtomicU64::new(0),
            timer_hits: Default::default(),
            timer_ns: Default::default(),
            start_us,
        }
    }

    /// A copy of every counter (each read on its own: consistent enough for reports).
    pub fn read(&self) -> Counters {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Counters {
            faults: load(&self.faults),
            block_faults: load(&self.block_faults),
            checkpoints_taken: load(&self.checkpoints_taken),
            rewinds: load(&self.rewinds),
            snapshot_ns: load(&self.snapshot_ns),
            last_snapshot_ns: load(&self.last_snapshot_ns),
            restore_ns: load(&self.restore_ns),
            last_restore_ns: load(&self.last_restore_ns),
            timer_hits: core::array::from_fn(|i| load(&self.timer_hits[i])),
            timer_ns: core::array::from_fn(|i| load(&self.timer_ns[i])),
            start_us: self.start_us,
        }
    }

    /// A fault resolved.
    pub fn fault(&self) {
        self.faults.fetch_add(1, Ordering::Relaxed);
    }

    /// A fault resolved by capturing a whole block (counted by [`Self::fault`] too).
    pub fn block_fault(&self) {
        self.block_faults.fetch_add(1, Ordering::Relaxed);
    }

    /// A snapshot that started at `t0`.
    pub fn snapshot(&self, t0: f64) {
        self.checkpoints_taken.fetch_add(1, Ordering::Relaxed);
        record(t0, &self.last_snapshot_ns, &self.snapshot_ns);
    }

    /// A rewind that started at `t0`.
    pub fn rewind(&self, t0: f64) {
        self.rewinds.fetch_add(1, Ordering::Relaxed);
        record(t0, &self.last_restore_ns, &self.restore_ns);
    }

    /// A hit of the host's timer `kind` (unknown kinds count as the default) since `t0`.
    pub fn timer(&self, kind: usize, t0: f64) {
        let k = if kind < TIMER_KINDS { kind } else { 0 };
        let ns = elapsed_ns(t0);
        self.timer_hits[k].fetch_add(1, Ordering::Relaxed);
        self.timer_ns[k].fetch_add(ns, Ordering::Relaxed);
    }
}

fn record(t0: f64, last: &AtomicU64, total: &AtomicU64) {
    let ns = elapsed_ns(t0);
    last.store(ns, Ordering::Relaxed);
    total.fetch_add(ns, Ordering::Relaxed);
}
