//! Every range a snapshot leaves out, each with the reason memsnap can name, and the pages
//! that are copied whole at every checkpoint because only part of them may be left out.
//!
//! The promise is that after a rewind every byte the program can observe equals what it
//! was at the checkpoint. The only bytes exempt are the ones listed here, each computed
//! from what it really is, never from the mapping it happens to sit in (the kernel merges
//! and splits mappings as it likes):
//! - memsnap's own memory, and memory the host declared untracked;
//! - the initial thread's stack (the kernel's `[stack]` mapping);
//! - every other thread's stack, from its glibc descriptor (`stackblock` up to its static
//!   TLS), and the stacks glibc keeps cached for its next thread;
//! - signal stacks (the kernel pushes frames there at every fault);
//! - the bytes the kernel writes on its own: each thread's rseq area and `tid` word, and
//!   the controller's `errno` (memsnap's own calls may set it while changes are
//!   disallowed).
//!
//! Write protection works on whole kernel pages, so a page only partly covered by these
//! ranges cannot be tracked by protection without losing its other bytes. Such a page is
//! an *eager* page instead: never protected, copied at every checkpoint and written back
//! at every rewind, except the excluded bytes. Thread-local storage lives on such pages
//! (the descriptor holds the rseq area and the `tid` word), which is how it is rewound.
//!
//! An exclusion that would cover memory memsnap tracks as data (a stack in the heap or in
//! a tracked allocation) is refused with a message, never applied quietly.

use super::ranges::{Range, RangeSet};
use super::{Engine, Meta, Mode};
use crate::sys::{self, RegionKind};

/// Why a range is left out of snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum Reason {
    #[default]
    Own,
    Untracked,
    MainStack,
    ThreadStack,
    CachedStack,
    /// A thread glibc does not know (a raw `clone`): its stack is bounded by the mapping
    /// around its stack pointer, clipped to exclude tracked data.
    MappedStack,
    SignalStack,
    Rseq,
    TidWord,
    Errno,
}

impl Reason {
    pub const ALL: [Reason; 10] = [
        Reason::Own,
        Reason::Untracked,
        Reason::MainStack,
        Reason::ThreadStack,
        Reason::CachedStack,
        Reason::MappedStack,
        Reason::SignalStack,
        Reason::Rseq,
        Reason::TidWord,
        Reason::Errno,
    ];

    pub fn describe(self) -> &'static str {
        match self {
            Reason::Own => "memsnap's own memory",
            Reason::Untracked => "declared untracked by the host",
            Reason::MainStack => "the initial thread's stack",
            Reason::ThreadStack => "a thread's stack (from its glibc descriptor)",
            Reason::CachedStack => "a stack glibc keeps cached for its next thread",
            Reason::MappedStack => {
                "the stack of a thread glibc does not know (bounded by its mapping)"
            }
            Reason::SignalStack => "a thread's signal stack (the kernel writes frames there)",
            Reason::Rseq => "a thread's rseq area (written by the kernel)",
            Reason::TidWord => "a thread's tid word (cleared by the kernel at exit)",
            Reason::Errno => "the controlling thread's errno",
        }
    }
}

/// One range left out of snapshots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Exclusion {
    pub range: Range,
    pub reason: Reason,
    /// The thread it belongs to, where it belongs to one.
    pub tid: u32,
}

impl Engine {
    fn exclude(function: &str, m: &mut Meta, range: Range, reason: Reason, tid: u32) {
        if range.is_empty() {
            return;
        }
        if m.exclusions.push(Exclusion { range, reason, tid }).is_err() {
            crate::fatal!(function, "too many excluded ranges");
        }
    }

    /// Refuses a thread stack that overlaps memory holding tracked data: the brk heap, a
    /// file mapping, or tracked memory (registered, allocated, or found by a scan). Such a
    /// stack cannot be left out without leaving out the data around it, nor tracked (its
    /// thread writes it all the time, and the kernel pushes signal frames onto it).
    fn check_stack_range(&self, function: &str, m: &Meta, tid: u32, stack: Range) {
        let mut i = m.vmas.partition_point(|v| v.end <= stack.start);
        let mut what = None;
        while i < m.vmas.len() && m.vmas[i].start < stack.end && what.is_none() {
            what = match m.vmas[i].kind {
                RegionKind::Heap => Some("the brk heap"),
                RegionKind::File => Some("a file mapping"),
                _ => None,
            };
            i += 1;
        }
        if what.is_none()
            && (m.region_overlapping(stack).is_some()
                || m.registered.iter().any(|r| r.range.intersects(&stack)))
        {
            what = Some("tracked memory");
        }
        if let Some(what) = what {
            if RangeSet::covers(&m.own, stack) || RangeSet::covers(&m.untracked, stack) {
                return;
            }
            crate::fatal!(
                function,
                "thread {}'s stack ({:#x}-{:#x}) is in {}; thread stacks must have memory of their own, which memsnap never tracks",
                tid,
                stack.start,
                stack.end,
                what
            );
        }
    }

    /// The stack of a thread glibc has no descriptor for: the mapping around `sp`, clipped
    /// so that it never covers registered or allocated tracked memory.
    fn mapped_stack(m: &Meta, sp: usize) -> Range {
        let i = m.vmas.partition_point(|v| v.end <= sp);
        let Some(v) = m.vmas.get(i).filter(|v| v.start <= sp) else {
            return Range::default();
        };
        let (mut lo, mut hi) = (v.start, v.end);
        let clip = |r: Range, lo: &mut usize, hi: &mut usize| {
            if r.end <= sp && r.end > *lo {
                *lo = r.end;
            }
            if r.start > sp && r.start < *hi {
                *hi = r.start;
            }
        };
        for r in m.registered.iter() {
            clip(r.range, &mut lo, &mut hi);
        }
        for r in m.allocated.iter() {
            clip(*r, &mut lo, &mut hi);
        }
        Range::new(lo, hi)
    }

    /// Whether `[addr, addr + len)` lies in readable mappings (per the last walk).
    fn readable(vmas: &[sys::Region], addr: usize, len: usize) -> bool {
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let mut at = addr;
        let mut i = vmas.partition_point(|v| v.end <= addr);
        while at < end {
            match vmas.get(i) {
                Some(v) if v.start <= at && v.read => {
                    at = v.end;
                    i += 1;
                }
                _ => return false,
            }
        }
        true
    }

    /// Builds every exclusion: `m.exclusions` (exact, with reasons), `m.exact` (their
    /// union), `m.scratch.work2` (the union widened to kernel pages: what tracking never covers)
    /// and, in whole-process mode, `m.eager` (the writable pages it covers only partly).
    /// Runs the thread probe (`m.scratch.sps`) and the region walk (`m.vmas`) first.
    pub(super) fn build_exclusions(&self, function: &str, m: &mut Meta) {
        m.scratch.sps.clear();
        {
            let Meta {
                scratch:
                    super::Scratch {
                        bytes: scratch,
                        sps,
                        ..
                    },
                ..
            } = &mut *m;
            // SAFETY: u8 accepts any bit pattern.
            let buf = unsafe { scratch.spare() };
            // The controller and the library's own threads need no probe (and probing a
            // worker that is just going to sleep makes the kernel wait for it).
            let me = sys::tid();
            let own = |tid: u64| tid == me || self.workers.is_own_thread(tid);
            sys::settle_threads(&mut buf[..1 << 16]);
            sys::for_each_thread_sp(&mut buf[..1 << 16], own, |tid, sp| {
                let _ = sps.push((tid, Range::new(sp, sp)));
            });
        }
        self.walk(function, m);
        m.exclusions.clear();
        for i in 0..m.own.len() {
            Self::exclude(function, m, m.own[i], Reason::Own, 0);
        }
        for i in 0..m.untracked.len() {
            Self::exclude(function, m, m.untracked[i], Reason::Untracked, 0);
        }
        for i in 0..m.vmas.len() {
            let v = m.vmas[i];
            if v.kind == RegionKind::MainStack {
                Self::exclude(
                    function,
                    m,
                    Range::new(v.start, v.end),
                    Reason::MainStack,
                    0,
                );
            }
        }
        let me = sys::tid();
        let mut controller_seen = false;
        m.scratch.blocks.clear();
        if let Some(layout) = &self.settings.threads {
            // A descriptor read while its thread is being created or torn down (the
            // protocol wants other threads idle, but a thread may still be finishing its
            // exit) can hold half-written fields: read the lists again, a bounded number
            // of times, before giving up with a message.
            let mut last = Ok(());
            for _ in 0..1000 {
                let Meta {
                    scratch: super::Scratch { blocks, .. },
                    vmas,
                    ..
                } = &mut *m;
                blocks.clear();
                let mut overflow = false;
                last = layout.for_each_block(
                    |a, len| Self::readable(vmas, a, len),
                    |a| {
                        let i = vmas.partition_point(|v| v.end <= a);
                        vmas.get(i).is_some_and(|v| v.start <= a)
                    },
                    |b| overflow |= blocks.push(b).is_err(),
                );
                if overflow {
                    crate::fatal!(function, "too many threads");
                }
                if last.is_ok() {
                    break;
                }
                sys::yield_now();
                self.walk(function, m);
            }
            if let Err(why) = last {
                crate::fatal!(function, "cannot read glibc's thread list: {}", why);
            }
        }
        for i in 0..m.scratch.blocks.len() {
            let b = m.scratch.blocks[i];
            if RangeSet::contains(&m.own, b.pd) {
                continue; // memsnap's own threads: all theirs is own memory
            }
            if b.cached {
                let block = Range::new(b.block.0, b.block.1);
                Self::exclude(function, m, block, Reason::CachedStack, 0);
                continue;
            }
            let stack = Range::new(b.stack.0, b.stack.1);
            if !stack.is_empty() {
                self.check_stack_range(function, m, b.tid, stack);
                Self::exclude(function, m, stack, Reason::ThreadStack, b.tid);
            }
            let tid_word = Range::new(b.tid_word, b.tid_word + 4);
            Self::exclude(function, m, tid_word, Reason::TidWord, b.tid);
            if let Some((at, len)) = b.rseq {
                Self::exclude(function, m, Range::new(at, at + len), Reason::Rseq, b.tid);
            }
            if b.tid as u64 == me {
                controller_seen = true;
            } else if let Some((at, len)) = sys::signal_stack_of(b.tid as u64) {
                Self::exclude(
                    function,
                    m,
                    Range::new(at, at + len),
                    Reason::SignalStack,
                    b.tid,
                );
            }
        }
        // Threads glibc does not know (raw clones), or every thread when glibc's layout
        // is unknown: their stacks are bounded by the mapping around the stack pointer.
        for i in 0..m.scratch.sps.len() {
            let (tid, r) = m.scratch.sps[i];
            if m.scratch
                .blocks
                .iter()
                .any(|b| b.tid as u64 == tid && !b.cached)
            {
                continue;
            }
            let stack = if r.start != 0 {
                let s = Self::mapped_stack(m, r.start);
                self.check_stack_range(function, m, tid as u32, Range::new(r.start, r.start + 1));
                s
            } else {
                // Running through every probe, and unknown to glibc: a raw clone that is
                // busy, or a glibc thread finishing its exit after the kernel cleared its
                // tid. Its stack is the one found last time, or unknown: left as it is
                // (a stack memsnap then protects faults loudly, never silently).
                m.stacks
                    .iter()
                    .find(|s| s.0 == tid)
                    .map_or(Range::default(), |s| s.1)
            };
            Self::exclude(function, m, stack, Reason::MappedStack, tid as u32);
            if let Some((at, len)) = sys::signal_stack_of(tid) {
                Self::exclude(
                    function,
                    m,
                    Range::new(at, at + len),
                    Reason::SignalStack,
                    tid as u32,
                );
            }
        }
        m.stacks.clear();
        for i in 0..m.exclusions.len() {
            let e = m.exclusions[i];
            if e.reason == Reason::MappedStack {
                let _ = m.stacks.push((e.tid as u64, e.range));
            }
        }
        if !controller_seen {
            let sp = sys::current_sp();
            let stack = Self::mapped_stack(m, sp);
            self.check_stack_range(function, m, me as u32, Range::new(sp, sp + 1));
            if !m
                .vmas
                .iter()
                .any(|v| v.kind == RegionKind::MainStack && v.start <= sp && sp < v.end)
            {
                Self::exclude(function, m, stack, Reason::MappedStack, me as u32);
            }
            if let Some((at, len)) = sys::current_rseq_area(self.settings.rseq) {
                Self::exclude(
                    function,
                    m,
                    Range::new(at, at + len),
                    Reason::Rseq,
                    me as u32,
                );
            }
        }
        if let Some((at, len)) = sys::current_signal_stack() {
            Self::exclude(
                function,
                m,
                Range::new(at, at + len),
                Reason::SignalStack,
                me as u32,
            );
        }
        let errno = sys::current_errno_location();
        Self::exclude(
            function,
            m,
            Range::new(errno, errno + 4),
            Reason::Errno,
            me as u32,
        );

        m.exact.clear();
        m.scratch.work2.clear();
        for i in 0..m.exclusions.len() {
            let r = m.exclusions[i].range;
            if !RangeSet::insert(&mut m.exact, r)
                || !RangeSet::insert(
                    &mut m.scratch.work2,
                    r.widen_to_pages(self.settings.sub).unwrap_or(r),
                )
            {
                crate::fatal!(function, "too many excluded ranges");
            }
        }
        m.eager.clear();
        if self.mode() == Mode::WholeProcess {
            let Meta {
                exact,
                eager,
                vmas,
                own,
                ..
            } = &mut *m;
            let mut overflow = false;
            super::eager::partly_covered_pages(exact, self.settings.sub, |p| {
                let i = vmas.partition_point(|v| v.end <= p);
                let ok = vmas.get(i).is_some_and(|v| {
                    v.start <= p
                        && v.read
                        && v.write
                        && v.private
                        && v.kind != RegionKind::Kernel
                        && p + self.settings.sub <= self.table.limit()
                }) && !RangeSet::contains(own, p);
                if ok && eager.last() != Some(&p) {
                    overflow |= eager.push(p).is_err();
                }
            });
            if overflow {
                crate::fatal!(function, "too many partly excluded pages");
            }
        }
    }

    /// Applies exclusions that appeared over memory already tracked. A stack glibc has
    /// put back on its cache belonged to a thread that exited: its TLS and descriptor were
    /// tracked, and are now dead memory the next thread will run on, so they stop being
    /// tracked and get their write permission back (no rewind can reach a checkpoint
    /// from before that thread's exit: the thread check refuses it). Any other exclusion
    /// over tracked memory (a signal stack or a thread stack placed there after the first
    /// snapshot) is refused: its earlier contents would silently stop being restored.
    pub(super) fn apply_new_exclusions(&self, function: &str, m: &mut Meta) {
        m.scratch.found.clear();
        for i in 0..m.exclusions.len() {
            let e = m.exclusions[i];
            if matches!(e.reason, Reason::Own | Reason::Untracked) {
                continue;
            }
            let r = e.range.widen_to_pages(self.settings.sub).unwrap_or(e.range);
            let Some(t) = m.region_overlapping(r) else {
                continue;
            };
            if e.reason != Reason::CachedStack {
                crate::fatal!(
                    function,
                    "{} of thread {} ({:#x}-{:#x}) lies in tracked memory ({:#x}-{:#x}); memsnap cannot leave it out without losing the data around it",
                    e.reason.describe(),
                    e.tid,
                    e.range.start,
                    e.range.end,
                    t.range.start,
                    t.range.end
                );
            }
            let mut j = m.regions.partition_point(|x| x.range.end <= r.start);
            while j < m.regions.len() && m.regions[j].range.start < r.end {
                let x = m.regions[j];
                let piece = super::TrackedRegion {
                    range: x.range.intersection(&r),
                    ..x
                };
                if m.scratch.found.push(piece).is_err() {
                    crate::fatal!(function, "too many tracked pieces under cached stacks");
                }
                j += 1;
            }
        }
        for i in 0..m.scratch.found.len() {
            let piece = m.scratch.found[i];
            self.untrack(m, piece.range);
            if !piece.uffd {
                // SAFETY: dead memory of an exited thread, no longer tracked; glibc will
                // hand it to the next thread it creates, which must be able to write it.
                let _ = unsafe {
                    sys::protect(
                        piece.range.start,
                        piece.range.len(),
                        sys::Access::ReadWrite { exec: piece.exec },
                    )
                };
            }
        }
        m.scratch.found.clear();
    }

    /// Calls `f` for every exclusion of the last scan, for reports.
    pub fn for_each_exclusion(&self, mut f: impl FnMut(Exclusion)) {
        let m = self.meta.lock();
        for e in m.exclusions.iter() {
            f(*e);
        }
    }
}

impl Meta {
    /// The first tracked region overlapping `r`.
    pub(super) fn region_overlapping(&self, r: Range) -> Option<super::TrackedRegion> {
        let i = self.regions.partition_point(|x| x.range.end <= r.start);
        self.regions
            .get(i)
            .filter(|x| x.range.start < r.end)
            .copied()
    }

    /// Bytes of the program's writable private mappings (per the last walk) that
    /// exclusions leave out: what it could observe and a rewind does not restore.
    /// memsnap's own memory is not counted (its reservations are mostly address space).
    pub fn excluded_mapped_bytes(&self) -> usize {
        let mut total = 0isize;
        for v in self.vmas.iter().filter(|v| v.write && v.private) {
            let v = Range::new(v.start, v.end);
            RangeSet::for_each_overlap(&self.exact, v, |r| total += r.len() as isize);
            RangeSet::for_each_overlap(&self.own, v, |r| total -= r.len() as isize);
        }
        total.max(0) as usize
    }
}
