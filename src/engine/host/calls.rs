//! The interposed calls themselves: `madvise`, `munmap`, `mprotect`, `mmap(MAP_FIXED)`
//! and `mremap` on memory that may be tracked, each made rewindable as the parent module
//! describes (captured first, retained, or journaled).

use super::super::ranges::Range;
use super::super::{Engine, Meta};
use super::*;

/// A raw system call's result for an errno.
#[cfg(target_os = "linux")]
fn err(e: i32) -> isize {
    -(e as isize)
}

#[cfg(target_os = "linux")]
impl Engine {
    /// `madvise` on memory that may be tracked: zapping advice captures the tracked units
    /// of the range first, as a write would; retained memory answers ENOMEM, as unmapped
    /// memory does.
    pub fn host_madvise(&self, addr: usize, len: usize, advice: i32) -> isize {
        const F: &str = "madvise";
        // SAFETY: the host's own call, forwarded unchanged.
        let call = || unsafe { sys::raw::madvise(addr, len, advice) };
        let Some(r) = self.host_range(addr, len) else {
            return call();
        };
        if zapping_advice(advice) {
            self.adopt_for_host_call(F, r);
        }
        if !zapping_advice(advice) || !self.may_hold_tracked(r.start, r.end) {
            return call();
        }
        self.host_enter(F, r);
        let m = self.meta.lock();
        if m.retained_in(r) {
            drop(m);
            self.leave();
            return err(libc::ENOMEM);
        }
        let mut u = self.page_base(r.start);
        while u < r.end {
            self.capture_now(F, &m, u);
            u += self.settings.page;
        }
        let ret = call();
        drop(m);
        self.leave();
        ret
    }

    /// `munmap` on memory that may be tracked: the untracked parts are unmapped, the
    /// tracked ones retained (`PROT_NONE`, bytes and registration kept) and journaled.
    pub fn host_munmap(&self, addr: usize, len: usize) -> isize {
        const F: &str = "munmap";
        let Some(r) = self.host_range(addr, len) else {
            // SAFETY: the host's own call, forwarded unchanged.
            return unsafe { sys::raw::munmap(addr, len) };
        };
        self.adopt_for_host_call(F, r);
        if !self.may_hold_tracked(r.start, r.end) {
            // SAFETY: as above.
            return unsafe { sys::raw::munmap(addr, len) };
        }
        self.host_enter(F, r);
        let mut m = self.meta.lock();
        let ret = self.retain(F, &mut m, r);
        drop(m);
        self.leave();
        ret
    }

    fn retain(&self, function: &str, m: &mut Meta, r: Range) -> isize {
        self.require_whole_units(function, r);
        let mut ret = 0;
        m.for_each_tracked(r, |gap, tracked| {
            if tracked.is_none() {
                // SAFETY: untracked memory the host unmaps itself.
                let g = unsafe { sys::raw::munmap(gap.start, gap.len()) };
                if g < 0 {
                    ret = g;
                }
            }
        });
        self.change_view(
            function,
            m,
            r,
            Some(Host {
                prot: libc::PROT_NONE,
                unmapped: true,
            }),
        );
        m.for_each_tracked(r, |piece, tracked| {
            if tracked.is_some() {
                // SAFETY: tracked memory the host gave up; its units are marked HOST, so
                // no capture reads it while it is inaccessible.
                let _ = unsafe { sys::raw::mprotect(piece.start, piece.len(), libc::PROT_NONE) };
            }
        });
        ret
    }

    /// `mprotect` on memory that may be tracked: journals the host's new protection of
    /// tracked memory and applies it, less write on clean units (their first write is
    /// still captured).
    pub fn host_mprotect(&self, addr: usize, len: usize, prot: i32) -> isize {
        const F: &str = "mprotect";
        // SAFETY: the host's own call, forwarded unchanged.
        let call = || unsafe { sys::raw::mprotect(addr, len, prot) };
        let Some(r) = self.host_range(addr, len) else {
            return call();
        };
        self.adopt_for_host_call(F, r);
        if !self.may_hold_tracked(r.start, r.end) {
            return call();
        }
        self.host_enter(F, r);
        let mut m = self.meta.lock();
        if m.retained_in(r) {
            drop(m);
            self.leave();
            return err(libc::ENOMEM);
        }
        self.require_whole_units(F, r);
        let ret = self.apply_host_prot(F, &mut m, r, prot);
        drop(m);
        self.leave();
        ret
    }

    /// Records `prot` as the host's protection of `r` and gives the kernel's: `prot` on
    /// untracked memory, on views and under userfaultfd; on mprotect-guarded tracked
    /// units, `prot` when dirty and `prot` less write when clean.
    fn apply_host_prot(&self, function: &str, m: &mut Meta, r: Range, prot: i32) -> isize {
        let host = (prot & libc::PROT_WRITE == 0).then_some(Host {
            prot,
            unmapped: false,
        });
        if host.is_none() {
            // Clear the HOST bits first: the units may fault as soon as they are writable.
            self.change_view(function, m, r, None);
        }
        let mut ret = 0;
        let mut set = |a: usize, b: usize, p: i32| {
            if a < b {
                // SAFETY: the host's own range and protection; tracked clean units keep
                // their write protection (p has no write for them).
                let e = unsafe { sys::raw::mprotect(a, b - a, p) };
                if e < 0 && ret == 0 {
                    ret = e;
                }
            }
        };
        m.for_each_tracked(r, |piece, tracked| {
            let Some(uffd) = tracked else {
                set(piece.start, piece.end, prot);
                return;
            };
            {
                if host.is_some() || uffd {
                    set(piece.start, piece.end, prot);
                    return;
                }
                let kernel = |p: usize| {
                    if self.table.get(p).slot().is_some() {
                        prot
                    } else {
                        prot & !libc::PROT_WRITE
                    }
                };
                let mut a = piece.start;
                while a < piece.end {
                    let k = kernel(a);
                    let mut b = a + self.settings.sub;
                    while b < piece.end && kernel(b) == k {
                        b += self.settings.sub;
                    }
                    set(a, b, k);
                    a = b;
                }
            }
        });
        if host.is_some() {
            // After the kernel's protection: the units fault no more as the host's
            // writes, which they are now.
            self.change_view(function, m, r, host);
        }
        ret
    }

    /// `mmap` with `MAP_FIXED` over memory that may be tracked. A private anonymous
    /// mapping replaces tracked memory as a write of zeroes would: the units are captured
    /// first, the new mapping is registered again with the userfaultfd and journaled
    /// with its protection. Shared and file mappings over tracked memory are refused.
    #[allow(clippy::too_many_arguments)]
    pub fn host_mmap_fixed(
        &self,
        addr: usize,
        len: usize,
        prot: i32,
        flags: i32,
        fd: i32,
        off: usize,
    ) -> isize {
        const F: &str = "mmap";
        // SAFETY: the host's own call, forwarded unchanged.
        let call = || unsafe { sys::raw::mmap(addr, len, prot, flags, fd, off) };
        let Some(r) = self.host_range(addr, len) else {
            return call();
        };
        if flags & libc::MAP_FIXED != 0 {
            self.adopt_for_host_call(F, r);
        }
        if flags & libc::MAP_FIXED == 0 || !self.may_hold_tracked(r.start, r.end) {
            return call();
        }
        // (MAP_TYPE is a field, not bits: MAP_SHARED_VALIDATE includes MAP_PRIVATE's.)
        const MAP_TYPE: i32 = 0x0f;
        if flags & MAP_TYPE != libc::MAP_PRIVATE || flags & libc::MAP_ANONYMOUS == 0 {
            crate::fatal!(
                F,
                "MAP_FIXED of a shared or file mapping over tracked memory {:#x}-{:#x}: memsnap cannot rewind what it replaces (map it elsewhere, or map private anonymous memory)",
                r.start,
                r.end
            );
        }
        self.host_enter(F, r);
        let mut m = self.meta.lock();
        self.require_whole_units(F, r);
        let mut u = self.page_base(r.start);
        while u < r.end {
            self.capture_now(F, &m, u);
            u += self.settings.page;
        }
        let ret = call();
        if ret >= 0 {
            let mut failed = None;
            m.for_each_tracked(r, |piece, tracked| {
                if tracked == Some(true) {
                    if let Err(e) = self.reregister(piece) {
                        failed = Some((piece, e));
                    }
                }
            });
            if let Some((p, e)) = failed {
                crate::fatal!(
                    F,
                    "cannot register the new mapping {:#x}-{:#x} over tracked memory with the userfaultfd (errno {})",
                    p.start,
                    p.end,
                    e
                );
            }
            // The new mapping has `prot` everywhere and every tracked unit is dirty.
            let host = (prot & libc::PROT_WRITE == 0).then_some(Host {
                prot,
                unmapped: false,
            });
            self.change_view(F, &mut m, r, host);
        }
        drop(m);
        self.leave();
        ret
    }

    /// `mremap` of memory that may be tracked. Shrinking retains the tail (as `munmap`);
    /// growing maps fresh memory right after the old range when it is free; moving
    /// (`MREMAP_MAYMOVE`) copies into a fresh mapping and retains the old range. Moving to
    /// a fixed address is refused.
    pub fn host_mremap(
        &self,
        old: usize,
        old_len: usize,
        new_len: usize,
        flags: i32,
        new_addr: usize,
    ) -> isize {
        const F: &str = "mremap";
        // SAFETY: the host's own call, forwarded unchanged.
        let call = || unsafe { sys::raw::mremap(old, old_len, new_len, flags, new_addr) };
        let Some(r) = self.host_range(old, old_len) else {
            return call();
        };
        let Some(new_len) = crate::mem::round_up(new_len, self.settings.sub).filter(|&n| n > 0)
        else {
            return call();
        };
        self.adopt_for_host_call(F, r);
        if flags & libc::MREMAP_FIXED != 0 {
            if let Some(dest) = Range::from_len(new_addr, new_len) {
                self.adopt_for_host_call(F, dest);
            }
        }
        if !self.may_hold_tracked(r.start, r.end) {
            if flags & libc::MREMAP_FIXED != 0
                && self.may_hold_tracked(new_addr, new_addr.saturating_add(new_len))
            {
                crate::fatal!(
                    F,
                    "MREMAP_FIXED onto tracked memory {:#x}-{:#x}: memsnap cannot rewind what it replaces",
                    new_addr,
                    new_addr.saturating_add(new_len)
                );
            }
            return call();
        }
        const MREMAP_DONTUNMAP: i32 = 4;
        if flags & (libc::MREMAP_FIXED | MREMAP_DONTUNMAP) != 0 {
            crate::fatal!(
                F,
                "moving tracked memory {:#x}-{:#x} with MREMAP_FIXED or MREMAP_DONTUNMAP is not supported",
                r.start,
                r.end
            );
        }
        if new_len <= r.len() {
            if new_len < r.len() {
                let tail = Range::new(r.start + new_len, r.end);
                self.host_enter(F, tail);
                let mut m = self.meta.lock();
                let ret = self.retain(F, &mut m, tail);
                drop(m);
                self.leave();
                if ret < 0 {
                    return ret;
                }
            }
            return r.start as isize;
        }
        self.host_enter(F, r);
        let mut m = self.meta.lock();
        if m.retained_in(r) {
            drop(m);
            self.leave();
            return err(libc::EFAULT);
        }
        let exec = self.table.get(r.start).exec();
        let prot = libc::PROT_READ | libc::PROT_WRITE | if exec { libc::PROT_EXEC } else { 0 };
        let anon = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        // Grow in place where the address space after the range is free.
        // SAFETY: MAP_FIXED_NOREPLACE never replaces an existing mapping.
        let grown = unsafe {
            sys::raw::mmap(
                r.end,
                new_len - r.len(),
                prot,
                anon | libc::MAP_FIXED_NOREPLACE,
                -1,
                0,
            )
        };
        if grown == r.end as isize {
            drop(m);
            self.leave();
            return r.start as isize;
        }
        if grown >= 0 {
            // An old kernel that took the flag for a hint: not in place after all.
            // SAFETY: the mapping just made, unused.
            unsafe { sys::raw::munmap(grown as usize, new_len - r.len()) };
        }
        if flags & libc::MREMAP_MAYMOVE == 0 {
            drop(m);
            self.leave();
            return err(libc::ENOMEM);
        }
        let mut bad = None;
        m.for_each_view_piece(r, |p, h| {
            if h.is_some() {
                bad = Some(p);
            }
        });
        m.for_each_tracked(r, |g, tracked| {
            if tracked.is_none() {
                bad = Some(g);
            }
        });
        if let Some(p) = bad {
            crate::fatal!(
                F,
                "moving {:#x}-{:#x}, which is only partly tracked or not read-write ({:#x}-{:#x}), is not supported",
                r.start,
                r.end,
                p.start,
                p.end
            );
        }
        // SAFETY: a fresh mapping at an address of the kernel's choosing.
        let new = unsafe { sys::raw::mmap(0, new_len, prot, anon, -1, 0) };
        if new < 0 {
            drop(m);
            self.leave();
            return new;
        }
        // SAFETY: the old range is tracked, mapped and readable (tracked memory is never
        // inaccessible outside views, and it has none); the new one is fresh.
        unsafe { core::ptr::copy_nonoverlapping(r.start as *const u8, new as *mut u8, r.len()) };
        let _ = self.retain(F, &mut m, r);
        drop(m);
        self.leave();
        new
    }
}
