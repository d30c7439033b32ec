//! The two structures the fault handler touches, both lock-free and both in library-owned
//! memory: the page-state table (one 32-bit word per snapshot page of the address space)
//! and the pool of page-copy slots.

use core::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};

use super::Reservation;

/// The state word of one snapshot page.
///
/// `TRACKED`, `EXEC` and `UFFD` (which protection mechanism guards it) describe the
/// page; `PARTIAL` says only some of its kernel pages
/// are tracked (the engine's mask table says which, see `engine::granule`). The low bits
/// hold `slot + 1` of the page's pre-image copy while the page is in the active dirty
/// set, 0 while it is clean and write-protected. `BUSY` is held by the one fault handler
/// copying the page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageState(pub u32);

impl PageState {
    pub const TRACKED: u32 = 1 << 31;
    pub const EXEC: u32 = 1 << 30;
    pub const BUSY: u32 = 1 << 29;
    pub const PARTIAL: u32 = 1 << 28;
    /// Protected with userfaultfd write protection instead of `mprotect` (Linux).
    pub const UFFD: u32 = 1 << 27;
    /// The host's own protection of the unit lacks write (it `mprotect`ed it read-only or
    /// inaccessible, or unmapped it: see `engine::host`): a write fault on it is the
    /// host's, never memsnap's.
    pub const HOST: u32 = 1 << 26;
    pub const SLOT_MASK: u32 = (1 << 26) - 1;

    pub fn tracked(self) -> bool {
        self.0 & Self::TRACKED != 0
    }
    pub fn exec(self) -> bool {
        self.0 & Self::EXEC != 0
    }
    pub fn busy(self) -> bool {
        self.0 & Self::BUSY != 0
    }
    pub fn partial(self) -> bool {
        self.0 & Self::PARTIAL != 0
    }
    pub fn uffd(self) -> bool {
        self.0 & Self::UFFD != 0
    }
    pub fn host(self) -> bool {
        self.0 & Self::HOST != 0
    }
    /// The pre-image slot while the page is dirty.
    pub fn slot(self) -> Option<u32> {
        match self.0 & Self::SLOT_MASK {
            0 => None,
            s => Some(s - 1),
        }
    }
    /// The page's description with no dirty or busy bits.
    pub fn clean(self) -> PageState {
        PageState(self.0 & (Self::TRACKED | Self::EXEC | Self::PARTIAL | Self::UFFD | Self::HOST))
    }
    pub fn with_slot(self, slot: u32) -> PageState {
        PageState(self.clean().0 | (slot + 1))
    }
}

/// One state word per snapshot page of the user address space, in a lazily committed
/// reservation: untouched parts read as zero, which means "not tracked".
pub struct PageTable {
    words: *const AtomicU32,
    pages: usize,
    shift: u32,
    bytes: usize,
}

// SAFETY: all access goes through atomics.
unsafe impl Send for PageTable {}
// SAFETY: all access goes through atomics.
unsafe impl Sync for PageTable {}

impl PageTable {
    /// Covers `[0, limit)` with pages of `1 << shift` bytes.
    pub fn new(limit: usize, shift: u32) -> Option<Self> {
        let pages = limit >> shift;
        let bytes = super::round_up(pages.checked_mul(4)?, 1 << 16)?;
        let words = crate::sys::reserve(bytes)? as *const AtomicU32;
        Some(PageTable {
            words,
            pages,
            shift,
            bytes,
        })
    }

    pub fn reservation(&self) -> Reservation {
        Reservation {
            base: self.words as usize,
            len: self.bytes,
        }
    }

    /// The highest address (exclusive) the table covers.
    pub fn limit(&self) -> usize {
        self.pages << self.shift
    }

    /// The word for the page containing `addr`, or `None` beyond the table.
    #[inline]
    pub fn word(&self, addr: usize) -> Option<&AtomicU32> {
        let index = addr >> self.shift;
        if index >= self.pages {
            return None;
        }
        // SAFETY: index < pages, inside the reservation; the kernel zero-fills it.
        Some(unsafe { &*self.words.add(index) })
    }

    #[inline]
    pub fn get(&self, addr: usize) -> PageState {
        self.word(addr)
            .map(|w| PageState(w.load(Ordering::Acquire)))
            .unwrap_or(PageState(0))
    }

    /// Overwrites the state of one page. Used outside the handler's CAS protocol, i.e.
    /// while no handler can be claiming this page.
    #[inline]
    pub fn set(&self, addr: usize, state: PageState) {
        if let Some(w) = self.word(addr) {
            w.store(state.0, Ordering::Release);
        }
    }
}

/// Page-sized copy slots, handed out by the fault handler on any thread.
///
/// Free slots form a Treiber stack whose head carries a generation tag in its upper half,
/// so a pop that raced with a pop-push of the same slot fails its compare-and-swap instead
/// of corrupting the list (ABA). Never-used slots are handed out from `fresh`.
pub struct SlotPool {
    base: *mut u8,
    slot_size: usize,
    cap: u32,
    next: *const AtomicU32,
    head: AtomicU64,
    fresh: AtomicU32,
    in_use: AtomicUsize,
    bytes: usize,
    next_bytes: usize,
}

// SAFETY: all shared state is atomic; slot contents are owned by whoever holds the slot.
unsafe impl Send for SlotPool {}
// SAFETY: as above.
unsafe impl Sync for SlotPool {}

const EMPTY: u32 = u32::MAX;

impl SlotPool {
    /// Reserves up to `max_bytes` of copy space (less if the address space is short).
    pub fn new(slot_size: usize, max_bytes: usize) -> Option<Self> {
        // Slots are numbered below SLOT_MASK - 1: that number is the async backend's zero
        // pre-image, never a real slot (engine::backend::ZERO_SLOT).
        let mut cap = (max_bytes / slot_size).min(PageState::SLOT_MASK as usize - 1);
        while cap >= 1024 {
            let bytes = cap * slot_size;
            let next_bytes = super::round_up(cap * 4, 1 << 16)?;
            if let Some(base) = crate::sys::reserve(bytes) {
                if let Some(next) = crate::sys::reserve(next_bytes) {
                    return Some(SlotPool {
                        base,
                        slot_size,
                        cap: cap as u32,
                        next: next as *const AtomicU32,
                        head: AtomicU64::new(EMPTY as u64),
                        fresh: AtomicU32::new(0),
                        in_use: AtomicUsize::new(0),
                        bytes,
                        next_bytes,
                    });
                }
                // SAFETY: just reserved, unused.
                unsafe { crate::sys::release(base, bytes) };
            }
            cap /= 2;
        }
        None
    }

    pub fn reservations(&self) -> [Reservation; 2] {
        [
            Reservation {
                base: self.base as usize,
                len: self.bytes,
            },
            Reservation {
                base: self.next as usize,
                len: self.next_bytes,
            },
        ]
    }

    pub fn capacity(&self) -> u32 {
        self.cap
    }

    pub fn in_use(&self) -> usize {
        self.in_use.load(Ordering::Relaxed)
    }

    fn next_of(&self, slot: u32) -> &AtomicU32 {
        // SAFETY: slot < cap, inside the `next` reservation.
        unsafe { &*self.next.add(slot as usize) }
    }

    /// Takes a slot; `None` when every slot is in use.
    pub fn alloc(&self) -> Option<u32> {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            let top = head as u32;
            if top == EMPTY {
                break;
            }
            let next = self.next_of(top).load(Ordering::Acquire);
            let tag = (head >> 32).wrapping_add(1);
            match self.head.compare_exchange_weak(
                head,
                (tag << 32) | next as u64,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    self.in_use.fetch_add(1, Ordering::Relaxed);
                    return Some(top);
                }
                Err(h) => head = h,
            }
        }
        let slot = self.fresh.fetch_add(1, Ordering::AcqRel);
        if slot >= self.cap {
            self.fresh.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        self.in_use.fetch_add(1, Ordering::Relaxed);
        Some(slot)
    }

    /// Returns a chain of `count` slots linked `first -> ... -> last` with `link`.
    fn push_chain(&self, first: u32, last: u32, count: usize) {
        let mut head = self.head.load(Ordering::Acquire);
        loop {
            self.next_of(last).store(head as u32, Ordering::Release);
            let tag = (head >> 32).wrapping_add(1);
            match self.head.compare_exchange_weak(
                head,
                (tag << 32) | first as u64,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => break,
                Err(h) => head = h,
            }
        }
        self.in_use.fetch_sub(count, Ordering::Relaxed);
    }

    pub fn free(&self, slot: u32) {
        self.push_chain(slot, slot, 1);
    }

    /// The bytes of a slot.
    ///
    /// # Safety
    /// The caller holds `slot` (allocated and not yet freed) and no one else accesses it.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes(&self, slot: u32) -> &mut [u8] {
        debug_assert!(slot < self.cap);
        // SAFETY: slot < cap; exclusive by the caller's contract.
        unsafe {
            core::slice::from_raw_parts_mut(
                self.base.add(slot as usize * self.slot_size),
                self.slot_size,
            )
        }
    }

    /// The address of a slot's bytes (for prefetching; reading them needs [`Self::bytes`]).
    pub fn slot_addr(&self, slot: u32) -> usize {
        self.base as usize + slot as usize * self.slot_size
    }

    /// Collects slots to free in one push, for the restore workers.
    pub fn chain(&self) -> FreeChain<'_> {
        FreeChain {
            pool: self,
            first: EMPTY,
            last: EMPTY,
            count: 0,
        }
    }
}

/// Slots gathered by one thread and returned to the pool with a single atomic push.
pub struct FreeChain<'a> {
    pool: &'a SlotPool,
    first: u32,
    last: u32,
    count: usize,
}

impl FreeChain<'_> {
    pub fn add(&mut self, slot: u32) {
        self.pool.next_of(slot).store(self.first, Ordering::Relaxed);
        if self.first == EMPTY {
            self.last = slot;
        }
        self.first = slot;
        self.count += 1;
    }
}

impl Drop for FreeChain<'_> {
    fn drop(&mut self) {
        if self.count > 0 {
            self.pool.push_chain(self.first, self.last, self.count);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_state_bits() {
        let s = PageState(PageState::TRACKED | PageState::EXEC);
        assert!(s.tracked() && s.exec() && !s.busy());
        assert_eq!(s.slot(), None);
        let d = s.with_slot(0);
        assert_eq!(d.slot(), Some(0));
        assert_eq!(d.clean(), s);
        assert_eq!(s.with_slot(41).slot(), Some(41));
        let h = PageState(PageState::TRACKED | PageState::HOST).with_slot(PageState::SLOT_MASK - 2);
        assert!(h.host() && h.tracked() && h.clean().host());
        assert_eq!(h.slot(), Some(PageState::SLOT_MASK - 2));
    }

    #[test]
    fn pool_reuses_freed_slots_and_counts() {
        let pool = SlotPool::new(4096, 4096 * 2048).unwrap();
        let a = pool.alloc().unwrap();
        let b = pool.alloc().unwrap();
        assert_ne!(a, b);
        assert_eq!(pool.in_use(), 2);
        pool.free(a);
        assert_eq!(pool.in_use(), 1);
        assert_eq!(pool.alloc(), Some(a));
        {
            let mut chain = pool.chain();
            chain.add(a);
            chain.add(b);
        }
        assert_eq!(pool.in_use(), 0);
        let mut got = [pool.alloc().unwrap(), pool.alloc().unwrap()];
        got.sort();
        let mut want = [a, b];
        want.sort();
        assert_eq!(got, want);
    }

    #[test]
    fn pool_runs_dry_and_reports_it() {
        let pool = SlotPool::new(4096, 4096 * 1024).unwrap();
        for _ in 0..pool.capacity() {
            assert!(pool.alloc().is_some());
        }
        assert_eq!(pool.alloc(), None);
    }

    #[test]
    fn pool_concurrent_alloc_free_never_duplicates() {
        let pool = std::sync::Arc::new(SlotPool::new(4096, 4096 * 4096).unwrap());
        let owners = std::sync::Arc::new(
            (0..pool.capacity())
                .map(|_| AtomicU32::new(0))
                .collect::<Vec<_>>(),
        );
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let pool = pool.clone();
                let owners = owners.clone();
                std::thread::spawn(move || {
                    for _ in 0..20_000 {
                        let s = pool.alloc().unwrap();
                        assert_eq!(owners[s as usize].swap(t + 1, Ordering::AcqRel), 0);
                        owners[s as usize].store(0, Ordering::Release);
                        pool.free(s);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(pool.in_use(), 0);
    }

    #[test]
    fn table_reads_zero_untracked_and_bounds() {
        let t = PageTable::new(1 << 40, 12).unwrap();
        assert!(!t.get(0x1234_5000).tracked());
        t.set(0x1234_5000, PageState(PageState::TRACKED));
        assert!(t.get(0x1234_5fff).tracked());
        assert!(!t.get(0x1234_6000).tracked());
        assert!(t.word(1 << 40).is_none());
    }
}
