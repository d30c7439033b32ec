//! The verifying mode (`MEMSNAP_VERIFY=1`, `memsnap_set_verify`), which trusts nothing
//! the tracking tables say. At every checkpoint it hashes every kernel page the program
//! can observe; after every restore call it reads those pages again and aborts, naming the
//! range, its mapping and whether memsnap tracked it, if one differs from the checkpoint
//! the rewind went back to. It owns the per-checkpoint hash lists (a stack parallel to
//! `Meta::checkpoints`) and its own copies of the region list and of the ranges it
//! derives from it, all in memory the library maps itself. Slow by design: every
//! checkpoint and every restore call reads every observable page.
//!
//! The observable pages come from the kernel's region walk, not from the regions memsnap
//! tracks: every readable private mapping that is writable now, is anonymous, or holds
//! tracked memory (mprotect leaves clean tracked pages read-only), less the named
//! exclusions (`verify_exclusions`), which are exact to the byte: a page they cover only
//! partly (memsnap copies such pages eagerly; thread-local storage lives on them) is
//! compared with its excluded bytes read as zero. Tracked memory only adds pages, so
//! memory memsnap forgot to track is read all the same. Read-only file mappings (program
//! text, constants, RELRO) are left out: they change only with their file. In
//! registered-only mode the set is cut down to what the host declared tracked (registered
//! ranges and tracked allocations): nothing else is promised there.
//!
//! A page observable after a rewind but not at the target checkpoint (memory obtained
//! since, or made writable since) must read as zero, which is what memsnap makes of it,
//! with two exceptions: private file mappings, which memsnap returns to their file's
//! contents (not checked here), and read-only memory memsnap does not track, which it
//! leaves alone.

mod report;
#[cfg(test)]
mod tests;

use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::ranges::{Range, RangeSet};
use super::{Engine, ExclusionReason, Meta, Mode, Phase};
use crate::mem::{RawVec, Reservation};
use crate::sys::{self, Region, RegionKind};

use report::Mismatch;

/// One checkpoint's record of a kernel page, or of a run of zero pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Entry {
    /// The page's address; with the low bit set, the first page of a run of zero pages
    /// (page addresses leave the low bits free).
    at: usize,
    /// The page's hash, or the length of the zero run in pages.
    value: u64,
}

const ZERO_RUN: usize = 1;

impl Entry {
    fn start(&self) -> usize {
        self.at & !ZERO_RUN
    }

    fn end(&self, sub: usize) -> usize {
        if self.at & ZERO_RUN != 0 {
            self.start() + self.value as usize * sub
        } else {
            self.start() + sub
        }
    }
}

/// What a page read as at the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expected {
    Hash(u64),
    Zero,
    /// Not observable then.
    Absent,
}

/// The verifying mode's state. The switch and the counter are read without the lock;
/// the lists are touched only by the controller, at checkpoints, rewinds and erases
/// (after the metadata lock, when both are held).
pub struct Verify {
    on: AtomicBool,
    pages_checked: AtomicU64,
    lists: spin::Mutex<Lists>,
}

struct Lists {
    /// Every saved checkpoint's entries, one list after the other, each sorted by address.
    hashes: RawVec<Entry>,
    /// Where each saved checkpoint's list starts in `hashes`.
    starts: RawVec<usize>,
    /// The region walk, taken afresh: the engine's copy predates the rewind's protection
    /// changes.
    vmas: RawVec<Region>,
    /// The exclusions as a range set, exact to the byte, and widened to kernel pages.
    exact: RawVec<Range>,
    widened: RawVec<Range>,
    /// A copy of a partly excluded page with its excluded bytes zeroed.
    masked: RawVec<u64>,
    /// Registered-only mode: what the host declared tracked.
    declared: RawVec<Range>,
    /// The observable pieces.
    pieces: RawVec<Piece>,
}

/// A kernel-page aligned piece of one mapping that verify reads.
#[derive(Clone, Copy, Debug, Default)]
struct Piece {
    range: Range,
    /// Index of its mapping in `Lists::vmas`.
    vma: usize,
    /// Memory memsnap manages (writable, or tracked): what was not observable at the
    /// target checkpoint must read as zero. Read-only memory memsnap never tracked is
    /// compared when it was observable then, and left alone otherwise, as memsnap does.
    managed: bool,
    /// One kernel page that exclusions cover partly (an eager page, thread-local storage
    /// among them): hashed with its excluded bytes read as zero.
    masked: bool,
}

fn vec<T: Copy>(function: &str, cap: usize) -> RawVec<T> {
    match RawVec::with_capacity(cap) {
        Some(v) => v,
        None => crate::fatal!(
            function,
            "cannot reserve address space for the verifying mode's tables"
        ),
    }
}

impl Verify {
    /// Off unless `MEMSNAP_VERIFY` says `1` (`memsnap_set_verify` may change it until the
    /// first snapshot). The tables are reserved either way: address space only.
    pub fn new(function: &str) -> Verify {
        let on = match super::config::env(c"MEMSNAP_VERIFY") {
            None | Some(b"0") => false,
            Some(b"1") => true,
            Some(_) => crate::fatal!(function, "MEMSNAP_VERIFY: expected 1 or 0"),
        };
        Verify {
            on: AtomicBool::new(on),
            pages_checked: AtomicU64::new(0),
            lists: spin::Mutex::new(Lists {
                // 4 GiB of address space: 2^28 pages of 4 KiB is a terabyte of
                // non-zero memory across the saved checkpoints.
                hashes: vec(function, 1 << 28),
                starts: vec(function, 1 << 22),
                vmas: vec(function, 1 << 21),
                exact: vec(function, 1 << 21),
                widened: vec(function, 1 << 21),
                // The largest kernel page memsnap supports (64 KiB).
                masked: vec(function, 1 << 13),
                declared: vec(function, 1 << 21),
                pieces: vec(function, 1 << 21),
            }),
        }
    }

    /// The tables' reservations, which the engine records as its own memory.
    pub fn reservations(&self) -> [Reservation; 8] {
        let l = self.lists.lock();
        [
            l.hashes.reservation(),
            l.starts.reservation(),
            l.vmas.reservation(),
            l.exact.reservation(),
            l.widened.reservation(),
            l.masked.reservation(),
            l.declared.reservation(),
            l.pieces.reservation(),
        ]
    }

    pub fn on(&self) -> bool {
        self.on.load(Ordering::Relaxed)
    }

    /// Kernel pages compared after rewinds so far.
    pub fn pages_checked(&self) -> u64 {
        self.pages_checked.load(Ordering::Relaxed)
    }
}

impl Lists {
    /// Drops the lists of checkpoints at positions `count` and above.
    fn keep(&mut self, count: usize) {
        if self.starts.len() > count {
            self.hashes.truncate(self.starts[count]);
            self.starts.truncate(count);
        }
    }

    fn push(&mut self, function: &str, e: Entry) {
        if self.hashes.push(e).is_err() {
            crate::fatal!(function, "verify: out of room for page hashes");
        }
    }
}

/// A 64-bit hash of one page (xxHash64's round and merge over four lanes; the length is
/// always the kernel page, so it is left out), and whether every byte was zero.
fn hash_words(words: &[u64]) -> (u64, bool) {
    const P1: u64 = 0x9e37_79b1_85eb_ca87;
    const P2: u64 = 0xc2b2_ae3d_27d4_eb4f;
    const P3: u64 = 0x1656_67b1_9e37_79f9;
    const P4: u64 = 0x85eb_ca77_c2b2_ae63;
    let round = |acc: u64, w: u64| {
        acc.wrapping_add(w.wrapping_mul(P2))
            .rotate_left(31)
            .wrapping_mul(P1)
    };
    let mut v = [P1.wrapping_add(P2), P2, 0, 0u64.wrapping_sub(P1)];
    let mut any = 0u64;
    for c in words.chunks_exact(4) {
        any |= c[0] | c[1] | c[2] | c[3];
        v[0] = round(v[0], c[0]);
        v[1] = round(v[1], c[1]);
        v[2] = round(v[2], c[2]);
        v[3] = round(v[3], c[3]);
    }
    let mut h = v[0]
        .rotate_left(1)
        .wrapping_add(v[1].rotate_left(7))
        .wrapping_add(v[2].rotate_left(12))
        .wrapping_add(v[3].rotate_left(18));
    for lane in v {
        h = (h ^ round(0, lane)).wrapping_mul(P1).wrapping_add(P4);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(P2);
    h ^= h >> 29;
    h = h.wrapping_mul(P3);
    h ^= h >> 32;
    (h, any == 0)
}

impl Engine {
    /// `memsnap_set_verify`; only before the first snapshot.
    pub fn set_verify(&self, on: bool) -> bool {
        if self.phase() != Phase::Initialized {
            return false;
        }
        self.verify.on.store(on, Ordering::Relaxed);
        true
    }

    /// Calls `f` with every range memsnap leaves out of snapshots and why: the one place
    /// the verifying mode depends on how exclusions are computed. They are the newest
    /// scan's (`build_exclusions`: every checkpoint and rewind in whole-process mode, the
    /// first snapshot only in registered-only mode), with memsnap's own memory and the
    /// host's untracked ranges as they are now (both only grow between scans).
    pub(super) fn verify_exclusions(&self, m: &Meta, mut f: impl FnMut(Range, &'static str)) {
        for e in m.exclusions.iter() {
            f(e.range, e.reason.describe());
        }
        for r in m.own.iter() {
            f(*r, ExclusionReason::Own.describe());
        }
        for r in m.untracked.iter() {
            f(*r, ExclusionReason::Untracked.describe());
        }
    }

    /// Fills `l.pieces` with the observable ranges of a fresh region walk (see the module
    /// comment), kernel-page aligned and ascending.
    fn observable(&self, function: &str, m: &mut Meta, l: &mut Lists) {
        l.vmas.clear();
        let mut overflow = false;
        {
            let vmas = &mut l.vmas;
            // SAFETY: u8 accepts any bit pattern.
            let buf = unsafe { m.scratch.bytes.spare() };
            let walked = sys::walk_regions(buf, |r| {
                if vmas.push(r).is_err() {
                    overflow = true;
                }
            });
            if walked.is_err() || overflow {
                crate::fatal!(function, "verify: cannot walk the process's mappings");
            }
        }
        l.exact.clear();
        l.widened.clear();
        let mut full = false;
        self.verify_exclusions(m, |r, _| {
            full |= !RangeSet::insert(&mut l.exact, r);
            let widened = r.widen_to_pages(self.settings.sub).unwrap_or(r);
            full |= !RangeSet::insert(&mut l.widened, widened);
        });
        l.declared.clear();
        if self.mode() == Mode::Registered {
            for r in m.registered.iter() {
                full |= !RangeSet::insert(&mut l.declared, r.range);
            }
            for r in m.allocated.iter() {
                full |= !RangeSet::insert(&mut l.declared, *r);
            }
        }
        if full {
            crate::fatal!(function, "verify: out of room for excluded ranges");
        }
        l.pieces.clear();
        let Lists {
            vmas,
            exact,
            widened,
            declared,
            pieces,
            ..
        } = l;
        let registered = self.mode() == Mode::Registered;
        let sub = self.settings.sub;
        let mut add = |r: Range, vma: usize, managed: bool| {
            let mut push = |range: Range, masked: bool| {
                let piece = Piece {
                    range,
                    vma,
                    managed,
                    masked,
                };
                full |= pieces.push(piece).is_err();
            };
            // Whole pages no exclusion touches, and, in address order between them, the
            // pages exclusions cover only partly. Declared ranges need not be kernel-page
            // aligned; only whole pages are read.
            let mut keep = |q: Range| {
                let q = Range::new(
                    crate::mem::round_up(q.start, sub).unwrap_or(q.end),
                    q.end & !(sub - 1),
                );
                let mut cursor = q.start;
                let mut i = widened.partition_point(|w| w.end <= q.start);
                while cursor < q.end {
                    let Some(w) = widened.get(i).filter(|w| w.start < q.end) else {
                        push(Range::new(cursor, q.end), false);
                        break;
                    };
                    let w = w.intersection(&q);
                    if cursor < w.start {
                        push(Range::new(cursor, w.start), false);
                    }
                    // `exact` is coalesced: a page it covers only partly holds one of its
                    // unaligned ends (pages between are wholly in or out). Only those are
                    // visited: `w` can be memsnap's terabyte of reserved address space.
                    let mut last = usize::MAX;
                    let mut j = exact.partition_point(|x| x.end <= w.start);
                    while j < exact.len() && exact[j].start < w.end {
                        for end in [exact[j].start, exact[j].end] {
                            let p = end & !(sub - 1);
                            if end != p && p != last && w.start <= p && p < w.end {
                                last = p;
                                push(Range::new(p, p + sub), true);
                            }
                        }
                        j += 1;
                    }
                    cursor = cursor.max(w.end);
                    i += 1;
                }
            };
            if registered {
                RangeSet::for_each_overlap(declared, r, &mut keep);
            } else {
                keep(r);
            }
        };
        for (i, v) in vmas.iter().enumerate() {
            if !v.read || !v.private || v.kind == RegionKind::Kernel {
                continue;
            }
            let span = Range::new(v.start, v.end);
            if v.write {
                add(span, i, true);
                continue;
            }
            // Read-only: tracked memory (clean pages under mprotect), and anonymous
            // memory, whose bytes memsnap destroys if the program makes it writable
            // later and rewinds (it takes it for memory obtained since). Read-only file
            // mappings (program text, constants, RELRO) change only with their file and
            // are not read, which keeps the mode's cost in proportion to data.
            let anonymous = v.kind != RegionKind::File;
            let mut cursor = span.start;
            let mut j = m.regions.partition_point(|x| x.range.end <= span.start);
            while j < m.regions.len() && m.regions[j].range.start < span.end {
                let t = m.regions[j].range.intersection(&span);
                if anonymous && cursor < t.start {
                    add(Range::new(cursor, t.start), i, false);
                }
                add(t, i, true);
                cursor = t.end;
                j += 1;
            }
            if anonymous && cursor < span.end {
                add(Range::new(cursor, span.end), i, false);
            }
        }
        if full {
            crate::fatal!(function, "verify: out of room for observable ranges");
        }
    }

    /// Hashes one kernel page; a `masked` one, copied to `buf`, with the bytes `exact`
    /// covers read as zero (the kernel may rewrite them at any time: the rseq area, say).
    ///
    /// # Safety
    /// `page` is a kernel page of a readable mapping that stays mapped, and no other
    /// thread writes it meanwhile (but for the excluded bytes of a masked page).
    unsafe fn hash_page(
        &self,
        exact: &[Range],
        buf: &mut RawVec<u64>,
        page: usize,
        masked: bool,
    ) -> (u64, bool) {
        let sub = self.settings.sub;
        let words = sub / 8;
        if !masked {
            // SAFETY: per the contract; a kernel page is u64-aligned.
            return hash_words(unsafe { core::slice::from_raw_parts(page as *const u64, words) });
        }
        // SAFETY: u64 accepts any bit pattern; the buffer holds the largest kernel page.
        let buf = unsafe { &mut buf.spare()[..words] };
        // SAFETY: per the contract; a plain byte copy, so a concurrent kernel write to
        // the excluded bytes only changes bytes zeroed right after.
        unsafe {
            core::ptr::copy_nonoverlapping(page as *const u8, buf.as_mut_ptr() as *mut u8, sub)
        };
        let bytes = buf.as_mut_ptr() as *mut u8;
        RangeSet::for_each_overlap(exact, Range::new(page, page + sub), |x| {
            // SAFETY: `x` lies inside the page, which `buf` holds.
            unsafe { core::ptr::write_bytes(bytes.add(x.start - page), 0, x.len()) };
        });
        hash_words(buf)
    }

    /// Hook at the end of every snapshot (changes still disallowed): records the newest
    /// checkpoint's hashes.
    pub(super) fn verify_checkpoint(&self, function: &str) {
        if !self.verify.on() {
            return;
        }
        let mut m = self.meta.lock();
        let mut lists = self.verify.lists.lock();
        let l = &mut *lists;
        let newest = m.checkpoints.len() - 1;
        l.keep(newest);
        self.observable(function, &mut m, l);
        let start = l.hashes.len();
        // The mode is switched only before the first snapshot, so every older checkpoint
        // has its list; were one missing, it would get an empty one rather than shift
        // the others.
        while l.starts.len() < newest {
            let _ = l.starts.push(start);
        }
        if l.starts.push(start).is_err() {
            crate::fatal!(function, "verify: out of room for checkpoints");
        }
        let sub = self.settings.sub;
        for k in 0..l.pieces.len() {
            let Piece {
                range: piece,
                masked,
                ..
            } = l.pieces[k];
            let mut p = piece.start;
            while p < piece.end {
                // SAFETY: an observable page: readable and mapped (the walk just said so,
                // and the controller runs only library code until the snapshot returns);
                // other threads are idle at checkpoints, as the protocol requires.
                let (hash, zero) = unsafe { self.hash_page(&l.exact, &mut l.masked, p, masked) };
                let last = l.hashes.len().checked_sub(1).map(|i| (i, l.hashes[i]));
                match last {
                    Some((i, e)) if zero && e.at & ZERO_RUN != 0 && e.end(sub) == p => {
                        l.hashes[i].value += 1;
                    }
                    _ if zero => l.push(
                        function,
                        Entry {
                            at: p | ZERO_RUN,
                            value: 1,
                        },
                    ),
                    _ => l.push(function, Entry { at: p, value: hash }),
                }
                p += sub;
            }
        }
    }

    /// Hook at the end of every restore call: memory must now equal the newest remaining
    /// checkpoint, whose hashes it is compared with; the lists of checkpoints popped by the
    /// restore are dropped.
    pub(super) fn verify_rewind(&self, function: &str) {
        if !self.verify.on() {
            return;
        }
        let mut m = self.meta.lock();
        let mut lists = self.verify.lists.lock();
        let l = &mut *lists;
        let target = m.checkpoints.len() - 1;
        l.keep(target + 1);
        let Some(&lo) = l.starts.get(target) else {
            return;
        };
        self.observable(function, &mut m, l);
        let saved = &l.hashes[lo..];
        let mut cursor = 0usize;
        let mut expected = |p: usize| {
            while cursor < saved.len() && saved[cursor].end(self.settings.sub) <= p {
                cursor += 1;
            }
            match saved.get(cursor) {
                Some(e) if e.start() <= p && e.at & ZERO_RUN != 0 => Expected::Zero,
                Some(e) if e.start() <= p => Expected::Hash(e.value),
                _ => Expected::Absent,
            }
        };
        let mut checked = 0u64;
        let mut bad_pages = 0usize;
        let mut first: Option<Mismatch> = None;
        for &Piece {
            range: piece,
            vma,
            managed,
            masked,
        } in l.pieces.iter()
        {
            let file = l.vmas[vma].kind == RegionKind::File;
            let mut p = piece.start;
            while p < piece.end {
                let page = p;
                p += self.settings.sub;
                let want = expected(page);
                if want == Expected::Absent
                    && (file || !managed || RangeSet::contains(&m.free, page))
                {
                    // Obtained since: a file mapping is back to its file's contents,
                    // which is not checked; read-only memory is not memsnap's to clear;
                    // tracked memory registered since is back in memsnap's free set,
                    // which the program cannot see and which is zeroed when handed out.
                    continue;
                }
                // SAFETY: as in `verify_checkpoint`; other threads are idle at rewinds.
                let (hash, zero) = unsafe { self.hash_page(&l.exact, &mut l.masked, page, masked) };
                checked += 1;
                let ok = match want {
                    Expected::Hash(h) => !zero && h == hash,
                    Expected::Zero | Expected::Absent => zero,
                };
                if ok {
                    continue;
                }
                bad_pages += 1;
                let seen = want != Expected::Absent;
                match &mut first {
                    None => {
                        first = Some(Mismatch {
                            range: Range::new(page, page + self.settings.sub),
                            vma,
                            seen,
                            masked,
                        })
                    }
                    Some(f)
                        if f.range.end == page
                            && f.vma == vma
                            && f.seen == seen
                            && f.masked == masked =>
                    {
                        f.range.end = page + self.settings.sub;
                    }
                    Some(_) => {}
                }
            }
        }
        self.verify
            .pages_checked
            .fetch_add(checked, Ordering::Relaxed);
        if let Some(f) = first {
            self.verify_failed(function, &m, &l.vmas[f.vma], f, bad_pages, target);
        }
    }

    /// Hook in `EraseLastSavedDiffMemorySnapshot`: the checkpoint at `dropped` is gone.
    pub(super) fn verify_erase(&self, dropped: usize) {
        if !self.verify.on() {
            return;
        }
        let mut l = self.verify.lists.lock();
        if dropped + 1 >= l.starts.len() {
            // No list of its own (recorded while off): nothing to shift either.
            l.keep(dropped);
            return;
        }
        let (from, to) = (l.starts[dropped], l.starts[dropped + 1]);
        let len = l.hashes.len();
        // SAFETY: Entry is plain data; only the first `len` entries are moved.
        unsafe { l.hashes.spare() }.copy_within(to..len, from);
        l.hashes.truncate(len - (to - from));
        l.starts.remove(dropped + 1);
        for i in dropped + 1..l.starts.len() {
            l.starts[i] -= to - from;
        }
    }
}
