//! The write-tracking backends: which mechanism guards tracked memory, and the one place
//! the rest of the engine asks it to act.
//!
//! This module owns the choice (what the host asked for, what the kernel offers, the
//! memory budget's say in `auto`), the backend state in the engine's block, and the
//! operations every other engine file calls instead of asking which backend is active:
//! arming and disarming memory, opening it for a restore, registering regions, finding
//! writes no fault reported, and the repairs around `fork()`. Each mechanism's own work
//! lives in its file:
//!
//! - [`mprotect`]: the page is read-only; a write raises SIGSEGV (on macOS a Mach
//!   exception) on the writing thread, whose handler saves the pre-image and makes the
//!   page writable. Works everywhere, but a system call writing the page fails with
//!   EFAULT, and every isolated writable page splits a mapping.
//! - [`uffd_sync`] (synchronous userfaultfd write protection): the page stays PROT_WRITE
//!   and carries the uffd-wp bit in its page-table entry; a write (the kernel's own
//!   included) blocks the writer and queues a message that a library thread, the fault
//!   server, answers. No mapping splits and system calls just work. Private file mappings
//!   (the `.data` of loaded objects) cannot register and stay on mprotect.
//! - [`uffd_async`] (`UFFD_FEATURE_WP_ASYNC` + `PAGEMAP_SCAN`, Linux 6.7): a write to an
//!   armed page just clears its uffd-wp bit; the checkpoint asks the kernel which pages
//!   were written, and pre-images come from a base copy of the tracked memory.
//!
//! The mechanism is chosen once, at the first snapshot; then each region is guarded by
//! the userfaultfd or by mprotect (the page-state word's `UFFD` bit says which), so the
//! operations below take that bit and route to the mechanism guarding the memory.
//!
//! The backend's identity ([`Backend`], the enum the stats call reports) is tested only
//! here; other files ask [`Backend`]'s capability methods or call an operation.

mod mprotect;
mod uffd_async;
mod uffd_sync;

use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

use super::ranges::Range;
use super::{Engine, TrackedRegion};
use crate::mem::PageState;
use crate::sys::{self, UffdMode};

pub use crate::sys::Backend;
pub(super) use uffd_async::ZERO_SLOT;

/// A write-tracking mechanism the host can ask for (`memsnap_set_backend`,
/// `MEMSNAP_BACKEND`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum BackendChoice {
    /// The best one the kernel and the process's privileges allow.
    Auto = 0,
    Mprotect = 1,
    Uffd = 2,
    UffdAsync = 3,
}

impl BackendChoice {
    fn from_u32(v: u32) -> BackendChoice {
        match v {
            1 => BackendChoice::Mprotect,
            2 => BackendChoice::Uffd,
            3 => BackendChoice::UffdAsync,
            _ => BackendChoice::Auto,
        }
    }

    /// Parses `MEMSNAP_BACKEND`'s value.
    pub fn parse(text: &[u8]) -> Option<BackendChoice> {
        match text {
            b"" | b"auto" => Some(BackendChoice::Auto),
            b"mprotect" => Some(BackendChoice::Mprotect),
            b"uffd" => Some(BackendChoice::Uffd),
            b"uffd-async" => Some(BackendChoice::UffdAsync),
            _ => None,
        }
    }
}

/// A requested backend kept in an atomic word (`u32::MAX`: none asked for).
pub(super) struct RequestedBackend(AtomicU32);

impl RequestedBackend {
    pub(super) const fn none() -> Self {
        RequestedBackend(AtomicU32::new(u32::MAX))
    }

    pub(super) fn set(&self, b: BackendChoice) {
        self.0.store(b as u32, Ordering::Relaxed);
    }

    pub(super) fn get(&self) -> Option<BackendChoice> {
        let v = self.0.load(Ordering::Relaxed);
        (v != u32::MAX).then(|| BackendChoice::from_u32(v))
    }
}

/// Why the requested backend cannot be used here, if it cannot.
pub fn unavailable(b: BackendChoice) -> Option<&'static str> {
    let s = sys::uffd_support();
    match b {
        BackendChoice::Auto | BackendChoice::Mprotect => None,
        BackendChoice::Uffd => s.sync.err(),
        BackendChoice::UffdAsync => s.async_wp.err(),
    }
}

/// The userfaultfd features a backend opens its descriptor with, if it uses one.
fn uffd_mode(b: Backend) -> Option<UffdMode> {
    match b {
        Backend::LinuxUffd => Some(UffdMode::Sync),
        Backend::LinuxUffdAsync => Some(UffdMode::Async),
        _ => None,
    }
}

/// What each mechanism can and cannot do: the engine's other files ask these rather
/// than which mechanism is active.
impl Backend {
    /// Memory is guarded by a userfaultfd: it must be registered (whole snapshot pages
    /// of mapping types the kernel accepts), its protection lives in page-table entries,
    /// and neither survives `fork()` in the child.
    pub fn uses_uffd(self) -> bool {
        matches!(self, Backend::LinuxUffd | Backend::LinuxUffdAsync)
    }

    /// Writes to armed memory go through without a fault (nothing captures them, no
    /// dirty-log entry): the next checkpoint finds them by a scan, which also arms the
    /// pages again, and a unit's pre-image comes from its base copy.
    pub fn finds_writes_by_scan(self) -> bool {
        self == Backend::LinuxUffdAsync
    }

    /// Each guarded unit has a base copy: its bytes at the newest checkpoint.
    pub fn keeps_base_copy(self) -> bool {
        self == Backend::LinuxUffdAsync
    }

    /// Armed memory keeps write access in its mapping: the protection lives in
    /// page-table entries, so the mapping of guarded memory is writable by default.
    pub fn mapping_stays_writable(self) -> bool {
        self.uses_uffd()
    }

    /// Protection lives in the mappings: every isolated writable page splits one, which
    /// `vm.max_map_count` bounds (see `fault`).
    pub fn splits_mappings(self) -> bool {
        !self.mapping_stays_writable()
    }
}

/// The backend state, in the engine's own block.
pub struct BackendState {
    requested: RequestedBackend,
    /// The userfaultfd backend opened at the first snapshot (`Backend::None`: none, the
    /// platform's protection backend guards everything).
    active: AtomicU32,
    /// The userfaultfd, when one is open.
    fd: sys::AtomicFd<sys::UffdFd>,
    /// Tracked bytes guarded by userfaultfd.
    uffd_bytes: AtomicUsize,
    server: uffd_sync::Server,
    base: uffd_async::BaseCopy,
}

impl BackendState {
    /// `page_shift`: the snapshot page's, for the async mode's base-copy table (reserved
    /// here when the kernel offers that mode); `spin_ns`: see `uffd_sync`.
    pub fn new(requested: BackendChoice, page_shift: u32, spin_ns: Option<u64>) -> Self {
        let state = BackendState {
            requested: RequestedBackend::none(),
            active: AtomicU32::new(Backend::None as u32),
            fd: sys::AtomicFd::empty(),
            uffd_bytes: AtomicUsize::new(0),
            server: uffd_sync::Server::new(spin_ns),
            base: uffd_async::BaseCopy::new(page_shift),
        };
        state.requested.set(requested);
        state
    }

    pub fn base_reservation(&self) -> Option<crate::mem::Reservation> {
        self.base.reservation()
    }

    pub fn requested(&self) -> BackendChoice {
        self.requested.get().unwrap_or(BackendChoice::Auto)
    }

    pub fn set_requested(&self, b: BackendChoice) {
        self.requested.set(b);
    }

    /// The sync fault server's counters.
    pub fn uffd_counters(&self) -> &sys::UffdCounters {
        &self.server.counters
    }

    /// Tracked bytes guarded by userfaultfd.
    pub fn uffd_bytes(&self) -> usize {
        self.uffd_bytes.load(Ordering::Relaxed)
    }

    fn fd(&self) -> sys::UffdFd {
        self.fd.load(Ordering::Relaxed)
    }
}

impl Engine {
    /// The mechanism guarding tracked memory: the userfaultfd mode chosen at the first
    /// snapshot, else the platform's protection backend.
    pub fn active_backend(&self) -> Backend {
        match self.backend.active.load(Ordering::Acquire) {
            x if x == Backend::LinuxUffd as u32 => Backend::LinuxUffd,
            x if x == Backend::LinuxUffdAsync as u32 => Backend::LinuxUffdAsync,
            _ => sys::backend(),
        }
    }

    /// The mechanism guarding memory whose page-state `UFFD` bit (or region's `uffd`
    /// flag) is `uffd`.
    pub(super) fn guard(&self, uffd: bool) -> Backend {
        if uffd {
            self.active_backend()
        } else {
            sys::backend()
        }
    }

    /// The mechanism guarding the unit with state `st`.
    pub(super) fn unit_guard(&self, st: PageState) -> Backend {
        self.guard(st.uffd())
    }

    /// Picks and opens the mechanism at the first snapshot (before the scan tracks
    /// anything). A forced choice the kernel refuses ends the process with the reason.
    pub(super) fn choose_backend(&self, function: &str) {
        let req = self.backend.requested();
        let support = sys::uffd_support();
        let base = self.backend.base.has_table();
        let chosen = match req {
            BackendChoice::Mprotect => None,
            BackendChoice::Uffd => match support.sync {
                Ok(()) => Some(Backend::LinuxUffd),
                Err(why) => crate::fatal!(function, "the uffd backend is unavailable: {}", why),
            },
            BackendChoice::UffdAsync => match (support.async_wp, base) {
                (Ok(()), true) => Some(Backend::LinuxUffdAsync),
                (Err(why), _) => {
                    crate::fatal!(function, "the uffd-async backend is unavailable: {}", why)
                }
                (Ok(()), false) => crate::fatal!(
                    function,
                    "the uffd-async backend is unavailable: no base-copy table was reserved"
                ),
            },
            BackendChoice::Auto => {
                // Under a memory budget, only if its base copy fits (see `budget`).
                if support.async_wp.is_ok() && base && self.async_fits_budget() {
                    Some(Backend::LinuxUffdAsync)
                } else if support.sync.is_ok() {
                    Some(Backend::LinuxUffd)
                } else {
                    None
                }
            }
        };
        let Some((active, mode)) = chosen.and_then(|b| Some((b, uffd_mode(b)?))) else {
            return;
        };
        let fd = match sys::uffd_open(mode) {
            Ok(fd) => fd,
            Err(e) if req == BackendChoice::Auto => {
                let _ = e;
                return;
            }
            Err(e) => crate::fatal!(function, "cannot open a userfaultfd (errno {})", e),
        };
        if active.finds_writes_by_scan() {
            if let Err(e) = self.backend.base.open_pagemap() {
                if req == BackendChoice::Auto {
                    sys::uffd_close(fd);
                    return;
                }
                crate::fatal!(function, "cannot open /proc/self/pagemap (errno {})", e)
            }
        }
        self.backend.fd.store(fd, Ordering::Relaxed);
        self.backend.active.store(active as u32, Ordering::Release);
        if active == Backend::LinuxUffd {
            self.start_fault_server(function);
        }
    }

    /// Changes write access to `[start, start + len)`, tracked memory guarded by
    /// userfaultfd (`uffd`) or mprotect: arms it (`write` false) or disarms it.
    ///
    /// # Safety
    /// The range is tracked host memory whose protection the engine owns, and when `write`
    /// is true its pre-images are saved.
    pub(super) unsafe fn set_access(
        &self,
        start: usize,
        len: usize,
        exec: bool,
        uffd: bool,
        write: bool,
    ) -> Result<(), i32> {
        let fd = self.backend.fd();
        match self.guard(uffd) {
            // SAFETY: per this function's contract.
            Backend::LinuxUffd => unsafe { uffd_sync::set_access(fd, start, len, write) },
            // SAFETY: per this function's contract.
            Backend::LinuxUffdAsync => unsafe { uffd_async::set_access(fd, start, len, write) },
            // SAFETY: per this function's contract.
            _ => unsafe { mprotect::set_access(start, len, exec, write) },
        }
    }

    /// Makes `[start, start + len)` writable for a restore to copy into. Unlike
    /// [`Engine::set_access`], a thread blocked on a sync-userfaultfd-guarded page stays
    /// blocked: its write must wait until the page holds its restored bytes and is armed
    /// again, then be served as a first write (with mprotect the same writer waits in the
    /// signal handler for memory changes to be allowed).
    ///
    /// # Safety
    /// As for [`Engine::set_access`].
    pub(super) unsafe fn open_for_restore(
        &self,
        start: usize,
        len: usize,
        exec: bool,
        uffd: bool,
    ) -> Result<(), i32> {
        if self.guard(uffd) == Backend::LinuxUffd {
            // SAFETY: per this function's contract.
            return unsafe { uffd_sync::open_for_restore(self.backend.fd(), start, len) };
        }
        // SAFETY: per this function's contract.
        unsafe { self.set_access(start, len, exec, uffd, true) }
    }

    /// Splits a region about to be tracked into the pieces each mechanism guards, in
    /// address order, with whether the userfaultfd guards each. With a userfaultfd open,
    /// the whole snapshot pages inside the region are offered to it (and registered); a
    /// head or tail that shares a snapshot page with other memory stays on mprotect (a
    /// unit's protection changes as one, through one mechanism), as does memory the
    /// userfaultfd refuses.
    pub(super) fn split_by_guard(&self, r: Range) -> [Option<(Range, bool)>; 3] {
        if self.active_backend().uses_uffd() {
            let lo = crate::mem::round_up(r.start, self.settings.page).unwrap_or(r.end);
            let hi = r.end & !(self.settings.page - 1);
            if lo < hi {
                let mid = Range::new(lo, hi);
                let head = Range::new(r.start, lo);
                let tail = Range::new(hi, r.end);
                return [
                    (!head.is_empty()).then_some((head, false)),
                    Some((mid, self.register_region(mid))),
                    (!tail.is_empty()).then_some((tail, false)),
                ];
            }
        }
        [Some((r, false)), None, None]
    }

    /// Registers a region about to be tracked with the userfaultfd, if one is open and
    /// the region suits it: whole units only (a unit's protection is changed as one), and
    /// a mapping type the mode accepts. `false` leaves it to mprotect.
    fn register_region(&self, r: Range) -> bool {
        if !self.active_backend().uses_uffd()
            || r.start % self.settings.page != 0
            || r.end % self.settings.page != 0
            || r.is_empty()
        {
            return false;
        }
        if sys::uffd_register(self.backend.fd(), r.start, r.len()).is_err() {
            return false;
        }
        self.backend
            .uffd_bytes
            .fetch_add(r.len(), Ordering::Relaxed);
        true
    }

    /// Stops guarding `r` with the userfaultfd: it is no longer tracked. Its base copies
    /// are released.
    pub(super) fn unregister_region(&self, r: Range) {
        let _ = sys::uffd_unregister(self.backend.fd(), r.start, r.len());
        let bytes = &self.backend.uffd_bytes;
        bytes.fetch_sub(
            r.len().min(bytes.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        self.drop_base(r);
    }

    /// Registers `r` again after the host replaced its mapping (`mmap(MAP_FIXED)`): a new
    /// mapping is not registered, and its pages are unarmed.
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(super) fn reregister(&self, r: Range) -> Result<(), i32> {
        sys::uffd_register(self.backend.fd(), r.start, r.len())
    }

    /// Arms a region just tracked (its pages marked, its region inserted), and takes what
    /// its mechanism needs from the start: the async mode's base copy.
    pub(super) fn arm_new_region(&self, function: &str, region: TrackedRegion) {
        let r = region.range;
        // SAFETY: host memory the engine now owns the protection of.
        let armed = unsafe { self.set_access(r.start, r.len(), region.exec, region.uffd, false) };
        if let Err(e) = armed {
            crate::fatal!(
                function,
                "cannot write-protect tracked memory {:#x}-{:#x} (errno {})",
                r.start,
                r.end,
                e
            );
        }
        if self.guard(region.uffd).keeps_base_copy() {
            self.copy_base(function, r);
        }
    }

    /// Whether the mapping piece `piece` of a region is still guarded: memory the program
    /// unmapped and mapped afresh is no longer registered with the userfaultfd, and its
    /// writes would go unseen (the mprotect backend notices the same thing as a clean
    /// page that became writable, which the caller checks).
    pub(super) fn piece_still_guarded(&self, piece: Range, uffd: bool) -> bool {
        if piece.is_empty() {
            return true;
        }
        match self.guard(uffd) {
            Backend::LinuxUffd => self.sync_piece_registered(self.backend.fd(), piece),
            Backend::LinuxUffdAsync => self.async_piece_registered(piece),
            _ => true,
        }
    }

    /// Whether any unit was written since the newest checkpoint without a fault
    /// reporting it (the async mode's writes), which the dirty log cannot tell.
    pub(super) fn written_unseen(&self, function: &str, regions: &[TrackedRegion]) -> bool {
        self.active_backend().finds_writes_by_scan()
            && self.async_written_since_armed(function, regions)
    }

    /// `RestoreMemoryToLastSavedCheckpoint`: puts back the units written since the
    /// newest checkpoint that no fault reported (the dirty log's are restored by the
    /// caller).
    pub(super) fn restore_unseen_writes(&self, function: &str, regions: &[TrackedRegion]) {
        if self.active_backend().finds_writes_by_scan() {
            self.restore_async_written(function, regions);
        }
    }

    /// At a checkpoint: the units written since the previous one that no fault reported,
    /// with their pre-images, into `out` (cleared first; see `preimage`).
    pub(super) fn collect_unseen_writes(
        &self,
        function: &str,
        regions: &[TrackedRegion],
        deltas: &mut crate::mem::RawVec<u8>,
        out: &mut crate::mem::RawVec<super::dirty::DiffEntry>,
    ) {
        out.clear();
        if self.active_backend().finds_writes_by_scan() {
            self.collect_async(function, regions, deltas, out);
        }
    }

    /// After a restore wrote the units of `entries` back and armed them again where the
    /// mechanism arms per run: arms the others (the async mode's, by one scan per
    /// region).
    pub(super) fn arm_restored(
        &self,
        function: &str,
        regions: &[TrackedRegion],
        entries: &[super::dirty::DiffEntry],
    ) {
        if entries.iter().any(|e| {
            self.unit_guard(self.table.get(e.page))
                .finds_writes_by_scan()
        }) {
            self.rearm_async(function, regions);
        }
    }

    /// In the child of `fork()`: the inherited userfaultfd (and pagemap) descriptors act
    /// on the parent's address space, and the child's mappings lost their registration
    /// and their page-table write-protect bits. Both are rebuilt here, before the
    /// program writes anything.
    pub(super) fn backend_after_fork_in_child(&self) {
        const F: &str = "fork";
        let active = self.active_backend();
        let Some(mode) = uffd_mode(active) else {
            return;
        };
        sys::uffd_close(self.backend.fd());
        let fd = match sys::uffd_open(mode) {
            Ok(fd) => fd,
            Err(e) => crate::fatal!(
                F,
                "cannot open a userfaultfd in the child (errno {}); its writes would go untracked",
                e
            ),
        };
        self.backend.fd.store(fd, Ordering::Relaxed);
        match active {
            Backend::LinuxUffd => self.sync_after_fork_in_child(F),
            _ => self.async_reopen_in_child(F),
        }
        let m = self.meta.lock();
        for r in m.regions.iter().filter(|r| r.uffd) {
            if sys::uffd_register(fd, r.range.start, r.range.len()).is_err() {
                // Part of it is no longer mapped (the program unmapped or trimmed
                // it). The next scan reports the region as unregistered memory and
                // refuses rewinds that would need it, as it does in the parent.
                continue;
            }
            // SAFETY: tracked memory; dirty units are disarmed again below.
            let armed = unsafe { sys::uffd_protect(fd, r.range.start, r.range.len(), true) };
            if let Err(e) = armed {
                crate::fatal!(F, "cannot arm tracked memory in the child (errno {})", e);
            }
            if active == Backend::LinuxUffd {
                self.sync_disarm_dirty(fd, r.range);
            }
        }
        // Async: units written since the newest checkpoint, as far as the bytes tell,
        // are written again so that the next scan finds them (see `fork`).
        if active == Backend::LinuxUffdAsync {
            self.mark_units_changed_since_base(F, &m);
        }
    }

    /// Bytes held by the async mode's base copy.
    pub fn base_bytes(&self) -> usize {
        self.backend.base.units() * self.settings.page
    }
}

#[cfg(test)]
mod tests {
    use super::{Backend, BackendChoice, RequestedBackend};

    #[test]
    fn backend_names_parse() {
        assert_eq!(BackendChoice::parse(b""), Some(BackendChoice::Auto));
        assert_eq!(BackendChoice::parse(b"auto"), Some(BackendChoice::Auto));
        assert_eq!(
            BackendChoice::parse(b"mprotect"),
            Some(BackendChoice::Mprotect)
        );
        assert_eq!(BackendChoice::parse(b"uffd"), Some(BackendChoice::Uffd));
        assert_eq!(
            BackendChoice::parse(b"uffd-async"),
            Some(BackendChoice::UffdAsync)
        );
        assert_eq!(BackendChoice::parse(b"UFFD"), None);
        assert_eq!(BackendChoice::parse(b"uffd-async "), None);
        let r = RequestedBackend::none();
        assert_eq!(r.get(), None);
        for b in [
            BackendChoice::Auto,
            BackendChoice::Mprotect,
            BackendChoice::Uffd,
            BackendChoice::UffdAsync,
        ] {
            r.set(b);
            assert_eq!(r.get(), Some(b));
        }
        assert_eq!(BackendChoice::from_u32(99), BackendChoice::Auto);
    }

    #[test]
    fn capabilities_follow_the_mechanism() {
        for b in [
            Backend::LinuxMprotect,
            Backend::MacExceptionPort,
            Backend::MacSignal,
        ] {
            assert!(!b.uses_uffd() && b.splits_mappings() && !b.mapping_stays_writable());
            assert!(!b.finds_writes_by_scan() && !b.keeps_base_copy());
        }
        assert!(Backend::LinuxUffd.uses_uffd() && !Backend::LinuxUffd.splits_mappings());
        assert!(Backend::LinuxUffd.mapping_stays_writable());
        assert!(!Backend::LinuxUffd.finds_writes_by_scan());
        let a = Backend::LinuxUffdAsync;
        assert!(a.uses_uffd() && a.finds_writes_by_scan() && a.keeps_base_copy());
    }
}
