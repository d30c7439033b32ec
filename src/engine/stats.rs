//! Numbers about the engine: the extension's stats record, `GetMemoryUsage`, timers.

use core::sync::atomic::Ordering;

use super::counters::Counters;
use super::Engine;

/// A consistent-enough reading of the engine's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub page_size: usize,
    pub tracked_bytes: usize,
    pub tracked_regions: usize,
    pub active_dirty_pages: usize,
    pub saved_checkpoints: usize,
    pub saved_diffs: usize,
    pub saved_diff_pages: usize,
    /// Saved pages whose pre-image is a delta, and the bytes all saved pre-images keep
    /// (whole copies at a page each, plus the deltas).
    pub saved_delta_pages: usize,
    pub saved_kept_bytes: usize,
    pub faults_handled: u64,
    pub block_faults: u64,
    pub checkpoints_taken: u64,
    pub rewinds: u64,
    pub restore_threads: usize,
    pub copy_slots_in_use: usize,
    pub oldest_reachable_checkpoint: usize,
    pub last_snapshot_ns: u64,
    pub last_restore_ns: u64,
    pub total_snapshot_ns: u64,
    pub total_restore_ns: u64,
    pub excluded_bytes: usize,
    pub eager_pages: usize,
    pub verify_pages_checked: u64,
}

impl Engine {
    pub fn stats(&self) -> Stats {
        let c = self.counters();
        let m = self.meta.lock();
        let saved_diffs = m.checkpoints.iter().filter(|c| c.diff_len > 0).count();
        let saved_delta_pages = m.diffs.iter().filter(|e| e.is_delta()).count();
        Stats {
            page_size: self.settings.page,
            tracked_bytes: m.tracked_bytes(),
            tracked_regions: m.regions.len(),
            active_dirty_pages: self.log.len(),
            saved_checkpoints: m.checkpoints.len(),
            saved_diffs,
            saved_diff_pages: m.diffs.len(),
            saved_delta_pages,
            saved_kept_bytes: (m.diffs.len() - saved_delta_pages) * self.settings.page
                + m.deltas.len(),
            faults_handled: c.faults,
            block_faults: c.block_faults,
            checkpoints_taken: c.checkpoints_taken,
            rewinds: c.rewinds,
            restore_threads: self.workers.count(),
            copy_slots_in_use: self.pool.in_use(),
            oldest_reachable_checkpoint: m.floor.position,
            last_snapshot_ns: c.last_snapshot_ns,
            last_restore_ns: c.last_restore_ns,
            total_snapshot_ns: c.snapshot_ns,
            total_restore_ns: c.restore_ns,
            excluded_bytes: m.excluded_mapped_bytes(),
            eager_pages: m.eager.len(),
            verify_pages_checked: self.verify.pages_checked(),
        }
    }

    /// `GetMemoryUsage`: bytes the host obtained for `kind` through `AllocateMemory`, plus,
    /// for the kinds naming the library's own structures, what those structures use.
    pub fn memory_usage(&self, kind: usize) -> usize {
        let balance = self.balance[kind.min(super::MEMORY_KINDS - 1)]
            .load(Ordering::Relaxed)
            .max(0) as usize;
        let internal = match kind {
            // TrackedRegions, FreeRegions, DirtyPageSet, SortedDirtyPageSet, PageCopy
            3 => self.meta.lock().regions.len() * core::mem::size_of::<super::TrackedRegion>(),
            4 => self.meta.lock().free.len() * core::mem::size_of::<super::ranges::Range>(),
            5 => {
                let m = self.meta.lock();
                m.diffs.len() * core::mem::size_of::<super::dirty::DiffEntry>() + m.deltas.len()
            }
            6 => self.log.len() * core::mem::size_of::<usize>(),
            7 => self.pool.in_use() * self.settings.page,
            _ => 0,
        };
        balance + internal
    }

    pub fn timer_record(&self, kind: usize, start_us: f64) {
        self.counters.timer(kind, start_us);
    }

    /// One reading of the event counters, the source of every report of them.
    pub fn counters(&self) -> Counters {
        self.counters.read()
    }
}
