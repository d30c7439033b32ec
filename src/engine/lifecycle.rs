//! Checkpoints and rewinds: the first snapshot, diff snapshots, the two restore steps,
//! folding a diff into its predecessor, and giving up (`UnrecoverableSnapshotFailure`).
//!
//! The saved-checkpoint stack is kept here, not by the host: position `i` of
//! `Meta::checkpoints` is the `i`-th saved checkpoint still reachable, and its diff (the
//! pre-images of the pages written between it and position `i + 1`) sits in the diff stack.

use core::sync::atomic::Ordering;

use super::dirty::DiffEntry;
use super::free::FreeSet;
use super::{Checkpoint, Engine, FloorReason, Meta, Phase};
use crate::mem::PageState;
use crate::sys::{self, Access};

impl Engine {
    fn require_armed(&self, function: &str) {
        match self.phase() {
            Phase::Armed => {}
            Phase::Initialized => crate::fatal!(
                function,
                "no checkpoint has been saved (call TakeFirstMemorySnapshot first)"
            ),
            Phase::Failed => crate::fatal!(
                function,
                "snapshots were abandoned by UnrecoverableSnapshotFailure"
            ),
        }
    }

    /// Records the free set and allocation count for the checkpoint being pushed.
    fn push_checkpoint(&self, function: &str, m: &mut Meta) {
        let free_start = m.free_snapshots.len();
        for i in 0..m.free.len() {
            let r = m.free[i];
            if m.free_snapshots.push(r).is_err() {
                crate::fatal!(function, "out of room for free-set snapshots");
            }
        }
        let c = Checkpoint {
            diff_start: m.diffs.len(),
            diff_len: 0,
            delta_start: m.deltas.len(),
            free_start,
            free_len: m.free.len(),
            allocated: m.allocated.len(),
            brk: if self.mode() == super::Mode::WholeProcess {
                sys::program_break()
            } else {
                0
            },
            threads: (self.mode() == super::Mode::WholeProcess)
                .then(|| m.thread_fingerprint(&self.workers)),
            eager_start: 0,
            eager_len: 0,
        };
        let (eager_start, eager_len) = self.save_eager(function, m);
        let c = Checkpoint {
            eager_start,
            eager_len,
            ..c
        };
        if m.checkpoints.push(c).is_err() {
            crate::fatal!(function, "out of room for checkpoints");
        }
    }

    /// `TakeFirstMemorySnapshot`.
    pub fn take_first(&self) {
        const F: &str = "TakeFirstMemorySnapshot";
        match self.phase() {
            Phase::Initialized => {}
            Phase::Armed => crate::fatal!(
                F,
                "a first snapshot was already taken (use TakeDiffMemorySnapshot)"
            ),
            Phase::Failed => crate::fatal!(
                F,
                "snapshots were abandoned by UnrecoverableSnapshotFailure"
            ),
        }
        if !self.changes_allowed() {
            crate::fatal!(
                F,
                "memory changes are disallowed (the snapshot disallows them itself)"
            );
        }
        let t0 = sys::now_us();
        self.gate.controller.store(sys::tid(), Ordering::Relaxed);
        self.gate.owner_pid.store(sys::pid(), Ordering::Relaxed);
        self.spawn_workers(F);
        self.choose_backend(F);
        if let Err(e) = sys::install_fault_handler(super::fault::on_write_fault) {
            crate::fatal!(F, "cannot install the write-fault handler (error {})", e);
        }
        // The macOS exception server answers for every thread and must not wait for one.
        #[cfg(target_os = "macos")]
        sys::set_served_fault_callback(super::fault::on_served_write_fault);
        self.bind_exports(F);
        self.set_allowed(F, false);
        {
            let mut m = self.meta.lock();
            self.scan_first(F, &mut m);
            self.reset_map_budget(m.vmas.len(), 0);
            self.push_checkpoint(F, &mut m);
        }
        self.set_phase(Phase::Armed);
        self.counters.snapshot(t0);
        self.verify_checkpoint(F);
        self.set_allowed(F, true);
    }

    /// `TakeDiffMemorySnapshot`: the pages written since the newest checkpoint become its
    /// diff (pages whose bytes did not change are dropped) and a new checkpoint is pushed.
    pub fn take_diff(&self) {
        const F: &str = "TakeDiffMemorySnapshot";
        self.require_armed(F);
        self.check_controller(F);
        if !self.changes_allowed() {
            crate::fatal!(
                F,
                "memory changes are disallowed (the snapshot disallows them itself)"
            );
        }
        let t0 = sys::now_us();
        if !sys::fault_handler_installed() {
            crate::fatal!(
                F,
                "memsnap's write-fault handler was replaced by another (a signal handler or, on macOS, the exception port); writes are no longer tracked"
            );
        }
        self.bind_exports(F);
        self.set_allowed(F, false);
        {
            let mut m = self.meta.lock();
            let newest = m.checkpoints.len() - 1;
            // Units the host made inaccessible are read below (see `host`).
            self.open_views(F, &mut m);
            // SAFETY: memory changes are disallowed and no handler is in flight.
            let pages = unsafe { self.log.quiescent_slice() };
            pages.sort_unstable();
            // Write-protect the dirty pages before the region walk: their mappings merge
            // back, so the walk reads a handful of mappings instead of two per scattered
            // dirty page (the walk was most of a checkpoint with 1% of a large heap
            // dirty). Clean pages get covered by a merged span only where the kernel
            // confirms none is writable; the walk must still see any that are. Protection
            // succeeding also proves the dirty pages are all still mapped; if some
            // vanished (ENOMEM), the scan finds out and untracks them first, and
            // protection is done again afterwards.
            let protected =
                match self.write_protect(&m.regions, pages.len(), |i| pages[i], false, false) {
                    Ok(()) => true,
                    Err((_, _, libc::ENOMEM | libc::ENOENT)) => false,
                    Err((at, len, e)) => {
                        crate::fatal!(F, "cannot write-protect {:#x}+{:#x} (errno {})", at, len, e)
                    }
                };
            self.scan_checkpoint(F, &mut m, newest + 1);
            // Async units written since the newest checkpoint get their pre-images from
            // the base copy (into `m.scratch.entries`) and are armed again. After the scan, which
            // has untracked any part the program unmapped and mapped afresh.
            let diff_start = m.diffs.len();
            let delta_start = m.deltas.len();
            {
                let Meta {
                    regions,
                    deltas,
                    scratch: super::Scratch { entries, .. },
                    ..
                } = &mut *m;
                self.collect_unseen_writes(F, regions, deltas, entries);
            }
            // SAFETY: as above.
            let pages = unsafe { self.log.quiescent_slice() };
            pages.sort_unstable();
            {
                let Meta {
                    diffs,
                    deltas,
                    scratch: super::Scratch { entries, .. },
                    ..
                } = &mut *m;
                // Both lists are in address order, and no unit is in both: merge them.
                let mut j = 0;
                let mut push = |e: DiffEntry| {
                    if diffs.push(e).is_err() {
                        crate::fatal!(F, "out of room for saved pages");
                    }
                };
                for &page in pages.iter() {
                    let st = self.table.get(page);
                    let Some(slot) = st.slot() else { continue };
                    if !st.tracked() {
                        // The page vanished (see the scan): its pre-image is of no use.
                        self.table.set(page, PageState(0));
                        self.release_slot(slot);
                        continue;
                    }
                    while j < entries.len() && entries[j].page < page {
                        push(entries[j]);
                        j += 1;
                    }
                    // SAFETY: the slot belongs to this dirty page; its tracked pages are
                    // mapped (the scan checked) and readable.
                    if let Some(e) = unsafe { self.save_captured(deltas, page, st, slot) } {
                        push(e);
                    }
                    self.table.set(page, st.clean());
                }
                for e in &entries[j..] {
                    push(*e);
                }
                entries.clear();
            }
            if protected {
                self.reset_map_budget(m.vmas.len(), 0);
            } else {
                self.write_protect_or_die(F, &m.regions, pages.len(), |i| pages[i]);
                self.reset_map_budget(m.vmas.len(), pages.len());
            }
            // SAFETY: as above.
            unsafe { self.log.clear() };
            let diff_len = m.diffs.len() - diff_start;
            let c = &mut m.checkpoints[newest];
            c.diff_start = diff_start;
            c.diff_len = diff_len;
            c.delta_start = delta_start;
            self.close_views(&mut m);
            self.push_checkpoint(F, &mut m);
        }
        self.counters.snapshot(t0);
        self.verify_checkpoint(F);
        self.set_allowed(F, true);
    }

    fn require_disallowed(&self, function: &str) {
        if self.changes_allowed() {
            crate::fatal!(
                function,
                "memory changes are allowed (restores must run inside AutoDisallowMemoryChanges)"
            );
        }
    }

    /// After memory equals checkpoint `target`: regions the walk found after it are zeroed
    /// and untracked, and the tracked free set becomes what it was then plus every region
    /// allocated since (FixupFreeRegionsAfterRewind's work, done here).
    fn settle_after_rewind(&self, function: &str, m: &mut Meta, target: usize) {
        let mut i = 0;
        while i < m.regions.len() {
            let r = m.regions[i];
            if r.born <= target {
                i += 1;
                continue;
            }
            if r.allocated {
                i += 1;
                continue;
            }
            m.regions.remove(i);
            self.unmark(r.range);
            // SAFETY: memory the program obtained after `target`; the rewound program
            // holds no reference to it. It is made writable again, as it was mapped.
            unsafe {
                let _ = sys::discard(r.range.start, r.range.len());
                if r.uffd {
                    self.unregister_region(r.range);
                } else {
                    let _ = sys::protect(
                        r.range.start,
                        r.range.len(),
                        Access::ReadWrite { exec: r.exec },
                    );
                }
            }
        }
        for r in m.regions.iter_mut() {
            if r.allocated && r.born > target {
                r.born = target + 1;
            }
        }
        m.read_only_rewound(target);
        let c = m.checkpoints[target];
        if c.brk != 0 && sys::program_break() > c.brk {
            // glibc's cached break (in rewound libc data) says c.brk again; were the
            // kernel's left higher, glibc's next sbrk would hand out memory below the
            // kernel's break and later move the break down over tracked memory. The heap
            // above c.brk was obtained after the target and was zeroed or untracked above.
            // SAFETY: nothing in the rewound program refers to memory above c.brk.
            if !unsafe { sys::lower_program_break(c.brk) } {
                crate::fatal!(
                    function,
                    "cannot move the program break back to {:#x}",
                    c.brk
                );
            }
        }
        m.free.clear();
        for j in c.free_start..c.free_start + c.free_len {
            let r = m.free_snapshots[j];
            let _ = m.free.push(r);
        }
        for j in c.allocated..m.allocated.len() {
            let r = m.allocated[j];
            FreeSet::insert(&mut m.free, r);
        }
    }

    /// `RestoreMemoryToLastSavedCheckpoint`: undoes every write since the newest checkpoint.
    pub fn restore_last(&self) {
        const F: &str = "RestoreMemoryToLastSavedCheckpoint";
        self.require_armed(F);
        self.check_controller(F);
        self.require_disallowed(F);
        let t0 = sys::now_us();
        let mut m = self.meta.lock();
        let newest = m.checkpoints.len() - 1;
        self.scan_rewind(F, &mut m, newest);
        self.check_threads(F, &mut m, newest);
        // (After the checks above, whose messages name a more specific cause.)
        if m.floor.position > newest {
            self.floor_message(F, &m, newest);
        }
        // The host's protection changes since the checkpoint are undone; meanwhile every
        // unit the host made inaccessible is open for the restore.
        self.open_views(F, &mut m);
        self.undo_views(F, &mut m, newest);
        // SAFETY: changes are disallowed; no handler is in flight.
        let pages = unsafe { self.log.quiescent_slice() };
        m.scratch.entries.clear();
        for &page in pages.iter() {
            let st = self.table.get(page);
            if let Some(slot) = st.slot() {
                let _ = m.scratch.entries.push(DiffEntry::full(page, slot));
            }
        }
        // SAFETY: as above.
        unsafe { self.log.clear() };
        m.scratch.entries.sort_unstable_by_key(|e| e.page);
        {
            let Meta {
                scratch: super::Scratch { entries, .. },
                regions,
                ..
            } = &*m;
            // The active dirty set: its pages are writable already.
            self.restore_entries(F, entries, &[], regions, true);
            self.restore_unseen_writes(F, regions);
        }
        self.restore_eager(&m, newest);
        self.reset_map_budget(m.vmas.len(), m.scratch.entries.len());
        m.scratch.entries.clear();
        self.settle_after_rewind(F, &mut m, newest);
        self.close_views(&mut m);
        drop(m);
        self.counters.rewind(t0);
        self.verify_rewind(F);
    }

    /// Refuses a rewind across thread creation or exit: glibc keeps the heads of its
    /// thread and stack-cache lists in (tracked, rewound) libc data but the list nodes in
    /// each thread's (untracked) stack, so rewinding the heads alone corrupts the lists.
    fn check_threads(&self, function: &str, m: &mut Meta, target: usize) {
        let Some((count, hash, exited)) = m.checkpoints[target].threads else {
            return;
        };
        let (now, now_hash, now_exited) = m.thread_fingerprint(&self.workers);
        // Threads that were created and exited in between leave the live set unchanged
        // but add their run time to the exited total: compare the lower bound now with
        // the upper bound then (a forked child's clock starts again at zero, so it never
        // trips this). The slack absorbs clock granularity.
        const EXITED_SLACK_NS: i64 = 2_000;
        if now_exited.0 - exited.1 > EXITED_SLACK_NS {
            crate::fatal!(
                function,
                "threads were created or exited since checkpoint {} (threads that exited since used {} us of CPU); rewinding across thread creation or exit is not supported",
                target + 1,
                (now_exited.0 - exited.1) / 1000
            );
        }
        if (now, now_hash) != (count, hash) {
            crate::fatal!(
                function,
                "threads were created or exited since checkpoint {} ({} other threads then, {} now); rewinding across thread creation or exit is not supported",
                target + 1,
                count,
                now
            );
        }
    }

    fn floor_message(&self, function: &str, m: &Meta, target: usize) -> ! {
        let f = m.floor;
        if f.what == FloorReason::Forked {
            crate::fatal!(
                function,
                "checkpoint {} cannot be restored in this fork child: it was taken before fork(), and under userfaultfd the child's writes before memsnap's fork handler ran were not tracked (take a checkpoint in the child, or use the mprotect backend)",
                target + 1
            );
        }
        crate::fatal!(
            function,
            "checkpoint {} cannot be restored: tracked memory {:#x}-{:#x} was {} before checkpoint {} was saved",
            target + 1,
            f.range.start,
            f.range.end,
            if f.what == FloorReason::Unmapped {
                "unmapped"
            } else {
                "unprotected by the program"
            },
            f.position + 1
        )
    }

    /// `RestoreMemoryToLastSavedDiffCheckpoint`: drops the newest checkpoint and restores
    /// the one before it from its diff.
    pub fn restore_diff(&self) {
        const F: &str = "RestoreMemoryToLastSavedDiffCheckpoint";
        self.require_armed(F);
        self.check_controller(F);
        self.require_disallowed(F);
        let t0 = sys::now_us();
        let mut m = self.meta.lock();
        if !self.log.is_empty() || self.written_unseen(F, &m.regions) {
            crate::fatal!(
                F,
                "pages were written since the newest checkpoint (call RestoreMemoryToLastSavedCheckpoint first)"
            );
        }
        if m.checkpoints.len() < 2 {
            crate::fatal!(F, "no saved diff: only one checkpoint is saved");
        }
        let target = m.checkpoints.len() - 2;
        if m.floor.position > target && m.floor.what != FloorReason::Forked {
            self.floor_message(F, &m, target);
        }
        self.scan_rewind(F, &mut m, target + 1);
        self.check_threads(F, &mut m, target);
        if m.floor.position > target {
            self.floor_message(F, &m, target);
        }
        self.open_views(F, &mut m);
        self.undo_views(F, &mut m, target);
        let c = m.checkpoints[target];
        {
            let diff = &m.diffs[c.diff_start..c.diff_start + c.diff_len];
            self.restore_entries(F, diff, &m.deltas, &m.regions, false);
        }
        self.restore_eager(&m, target);
        self.reset_map_budget(m.vmas.len(), c.diff_len);
        m.diffs.truncate(c.diff_start);
        m.deltas.truncate(c.delta_start);
        let newest = m.checkpoints.pop().unwrap_or_default();
        self.truncate_eager(&mut m, newest.eager_start);
        m.free_snapshots.truncate(newest.free_start);
        let (top, delta_top) = (m.diffs.len(), m.deltas.len());
        let c = &mut m.checkpoints[target];
        c.diff_start = c.diff_start.min(top);
        c.diff_len = 0;
        c.delta_start = c.delta_start.min(delta_top);
        self.settle_after_rewind(F, &mut m, target);
        self.close_views(&mut m);
        drop(m);
        self.counters.rewind(t0);
        self.verify_rewind(F);
    }

    /// `EraseLastSavedDiffMemorySnapshot`: forgets the second-newest checkpoint by folding
    /// its diff into the one before (or discarding it when it is the oldest). Rewinds can
    /// then still reach every other checkpoint, and the memory of the dropped pre-images
    /// is released.
    pub fn erase_last_diff(&self) {
        const F: &str = "EraseLastSavedDiffMemorySnapshot";
        self.require_armed(F);
        self.check_controller(F);
        let mut m = self.meta.lock();
        let n = m.checkpoints.len();
        if n < 2 {
            crate::fatal!(F, "no saved diff: only one checkpoint is saved");
        }
        let dropped = n - 2;
        let newer = m.checkpoints[dropped];
        if dropped == 0 {
            for j in newer.diff_start..newer.diff_start + newer.diff_len {
                let e = m.diffs[j];
                if !e.is_delta() {
                    self.release_slot(e.slot);
                }
            }
            // The surviving checkpoint's diff is empty (it is the newest): shrink the stacks.
            m.diffs.truncate(newer.diff_start);
            m.deltas.truncate(newer.delta_start);
        } else {
            let older = m.checkpoints[dropped - 1];
            let Meta { diffs, deltas, .. } = &mut *m;
            let k = self.fold_diffs(
                F,
                diffs,
                deltas,
                (older.diff_start, older.diff_len),
                older.delta_start,
            );
            m.checkpoints[dropped - 1].diff_len = k;
        }
        // Drop the checkpoint record; the newest moves down one position.
        let newest = m.checkpoints.pop().unwrap_or_default();
        let removed = m.checkpoints.pop().unwrap_or_default();
        let keep = m.free_snapshots.len();
        // Free-set snapshots: drop the removed one's, keep the newest's (moved down).
        let (rs, rl) = (removed.free_start, removed.free_len);
        let (ns, nl) = (newest.free_start, newest.free_len);
        {
            // SAFETY: Range is plain data.
            let all = unsafe { m.free_snapshots.spare() };
            all.copy_within(ns..ns + nl, rs);
        }
        debug_assert_eq!(rs + rl, ns);
        m.free_snapshots.truncate(keep.min(rs + nl));
        self.remove_eager(&mut m, removed.eager_start, removed.eager_len);
        let moved = Checkpoint {
            eager_start: removed.eager_start,
            eager_len: newest.eager_len,
            diff_start: m.diffs.len(),
            diff_len: 0,
            delta_start: m.deltas.len(),
            free_start: rs,
            free_len: nl,
            allocated: newest.allocated,
            threads: newest.threads,
            brk: newest.brk,
        };
        let _ = m.checkpoints.push(moved);
        for r in m.regions.iter_mut() {
            if r.born > dropped {
                r.born -= 1;
            }
        }
        m.read_only_erased(dropped);
        if m.floor.position > dropped {
            m.floor.position -= 1;
        }
        self.erase_views(&mut m, dropped);
        self.verify_erase(dropped);
    }

    /// `UnrecoverableSnapshotFailure`: makes all tracked memory writable so crash
    /// reporting can run; no rewind is possible afterwards.
    pub fn fail(&self) {
        self.set_phase(Phase::Failed);
        let mut guard = None;
        for _ in 0..1000 {
            if let Some(g) = self.meta.try_lock() {
                guard = Some(g);
                break;
            }
            sys::yield_now();
        }
        let Some(m) = guard else { return };
        for r in m.regions.iter() {
            if r.uffd {
                // Unregistering disarms the range and wakes any thread blocked on it.
                self.unregister_region(r.range);
                continue;
            }
            // SAFETY: host memory; making it writable is the point of this call.
            let _ = unsafe {
                sys::protect(
                    r.range.start,
                    r.range.len(),
                    Access::ReadWrite { exec: r.exec },
                )
            };
        }
    }
}
