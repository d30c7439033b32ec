//! What a `fork()` child inherits, and how it is made whole.
//!
//! `fork()` copies the address space while the parent's other threads keep running, and
//! only the forking thread lives on in the child. Two kinds of engine state can be caught
//! half-changed by the copy:
//!
//! - **The metadata lock** (a spin lock): held by another thread at the instant of the
//!   copy, it would stay held forever in the child. The forking thread takes it just
//!   before `fork()` and both sides release it afterwards, so the child starts with
//!   consistent tables.
//! - **Captures in flight.** Another thread (or the sync userfaultfd server, or on macOS
//!   the exception server) may be saving a pre-image when the copy is made. Such a unit
//!   keeps its BUSY bit in the child, where no thread will ever clear it: the next write
//!   to it, even glibc's own inside `fork()`, would wait forever. Waiting for captures
//!   to drain before `fork()` is no answer: a writer stopped at that gate could hold a
//!   malloc arena lock the forking thread takes next. Instead the fault path publishes a
//!   unit's pre-image *before* making it writable, so a unit that is still BUSY was never
//!   writable and holds its pre-image bytes: it is a clean unit, and the child clears the
//!   bit. The dirty log, which the interrupted thread may have appended to (or half
//!   appended to), is rebuilt from the page-state words. The slots the interrupted
//!   threads had taken are not returned to the pool (at most a block per thread per
//!   such fork, in the child only).
//!
//! The userfaultfd backends rebuild their descriptors and page-table bits in the child as
//! well (see `backend`).
//!
//! - **Writes the child's page tables forgot** (uffd-async). The child's mappings lose
//!   their write-protect bits, so which units were written since the newest checkpoint
//!   cannot be read from them; yet a unit written and not known keeps a stale base copy,
//!   which becomes a wrong pre-image at the child's next checkpoint. No list made before
//!   the copy can be complete: other threads, and glibc's own fork code after the prepare
//!   handlers, write until the kernel copies the address space, and the child's glibc
//!   writes before this handler runs. So the child compares: every populated unit whose
//!   bytes differ from its base copy (or from zero, without one) is written again after
//!   the memory is re-armed, with the same bytes, so that the next checkpoint finds it.
//!   That reads the whole populated tracked memory once per fork, in the child.
//!
//! - **A new controller.** When a thread other than the controller forks, it becomes the
//!   child's controller, and its `errno` (which memsnap's own calls set, and which the
//!   exclusions therefore leave out for the controller only) may lie on a page that was
//!   tracked whole in the parent: with a large static TLS, the thread's TLS pages hold
//!   nothing else memsnap leaves out. That page stops being tracked here, before the
//!   child runs on, and from the child's first checkpoint on it is an eager page like the
//!   TLS pages of any controller. No inherited checkpoint needs its history: the thread
//!   check refuses every rewind to them (the forking thread was another thread there).

use core::sync::atomic::Ordering;

use super::Engine;
use crate::mem::PageState;
use crate::sys;

impl Engine {
    /// Registers the fork handlers; once, at initialization, so that no fork can catch the
    /// metadata lock held.
    pub(super) fn handle_forks(&self, function: &str) {
        if let Err(e) = sys::on_fork(before_fork, after_fork_in_parent, after_fork_in_child) {
            crate::fatal!(function, "cannot register the fork handlers (error {})", e);
        }
    }

    /// Whether a unit's BUSY holder was left behind by a `fork()`: this is its child, and
    /// the child's fork handler has not run yet (it clears every such bit).
    pub(super) fn claimer_lost_to_fork(&self) -> bool {
        let parent = self.gate.fork_parent.load(Ordering::Acquire);
        parent != 0 && sys::pid() != parent
    }

    /// In the child: every unit an interrupted capture left BUSY becomes clean again (it
    /// is still protected and unwritten, see the module comment), and the dirty log is
    /// rebuilt as exactly the units that have a pre-image. Nothing to do when no handler
    /// was in flight at the copy.
    fn settle_interrupted_captures(&self, m: &super::Meta) {
        if self.gate.in_flight.swap(0, Ordering::SeqCst) == 0 {
            return;
        }
        // SAFETY: the child's only thread, inside its fork handler: no handler is
        // appending to the log.
        unsafe { self.log.clear() };
        let mut last = usize::MAX;
        for r in m.regions.iter() {
            let mut unit = self.page_base(r.range.start);
            while unit < r.range.end {
                // Two regions can share a partial unit: visit it once.
                if unit != last {
                    last = unit;
                    self.settle_unit(unit);
                }
                unit += self.settings.page;
            }
        }
    }

    /// Untracks the page(s) holding this thread's `errno` if they are tracked: the child's
    /// controller is a thread that was not the parent's (see the module comment), and a
    /// tracked `errno` would fault under memsnap's own calls. The page gets its write
    /// permission back; the next checkpoint finds it partly excluded and copies it
    /// eagerly from then on.
    fn release_errno_of_new_controller(&self, m: &mut super::Meta) {
        let errno = sys::current_errno_location();
        let r = super::ranges::Range::new(errno, errno + 4);
        let r = r.widen_to_pages(self.settings.sub).unwrap_or(r);
        let Some(t) = m.region_overlapping(r) else {
            return;
        };
        self.untrack(m, r);
        if !self.guard(t.uffd).mapping_stays_writable() {
            // SAFETY: this thread's own TLS, no longer tracked: it must be writable, as
            // it was before memsnap protected it.
            let protected =
                unsafe { sys::protect(r.start, r.len(), sys::Access::ReadWrite { exec: t.exec }) };
            if let Err(err) = protected {
                crate::fatal!(
                    "fork",
                    "cannot make the new controller's errno page writable (errno {})",
                    err
                );
            }
        }
    }

    fn settle_unit(&self, unit: usize) {
        let Some(word) = self.table.word(unit) else {
            return;
        };
        let st = PageState(word.load(Ordering::Acquire));
        if st.busy() {
            word.store(st.0 & !PageState::BUSY, Ordering::Release);
        } else if st.slot().is_some()
            && !self.unit_guard(st).finds_writes_by_scan()
            && !self.log.push(unit)
        {
            // Cannot happen: the log holds as many entries as the pool has slots.
            crate::fatal!("fork", "the dirty-page log is full");
        }
    }
}

extern "C" fn before_fork() {
    let Some(e) = super::get() else { return };
    let m = e.meta.lock();
    e.gate.fork_parent.store(sys::pid(), Ordering::Release);
    // Held across fork(); released by both handlers below.
    core::mem::forget(m);
}

extern "C" fn after_fork_in_parent() {
    let Some(e) = super::get() else { return };
    e.gate.fork_parent.store(0, Ordering::Release);
    // SAFETY: `before_fork` left the lock held, on this thread, across fork().
    unsafe { e.meta.force_unlock() };
}

extern "C" fn after_fork_in_child() {
    let Some(e) = super::get() else { return };
    // SAFETY: as in the parent: the child's only thread inherited the held lock.
    unsafe { e.meta.force_unlock() };
    {
        let mut m = e.meta.lock();
        e.settle_interrupted_captures(&m);
        if e.active_backend().uses_uffd() {
            // A userfaultfd registration does not survive fork(): until the handler below
            // re-arms the child's memory, its writes (glibc's own fork bookkeeping, the
            // host's earlier atfork handlers, the new fault server's thread setup) are
            // not seen. The child's own checkpoints include them; the inherited ones can
            // no longer be restored exactly, so rewinds to them are refused.
            let position = m.checkpoints.len();
            if m.floor.position < position {
                m.floor = super::Floor {
                    position,
                    range: super::ranges::Range::default(),
                    what: super::FloorReason::Forked,
                };
            }
        }
    }
    e.gate.fork_parent.store(0, Ordering::Release);
    e.backend_after_fork_in_child();
    // After the userfaultfd is rebuilt: the inherited descriptor acts on the parent's
    // address space, where unregistering the page would stop tracking it there.
    e.release_errno_of_new_controller(&mut e.meta.lock());
}
