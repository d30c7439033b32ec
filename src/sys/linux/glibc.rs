//! glibc's thread descriptors, read the way debuggers read them.
//!
//! Every thread glibc knows (live, exited but not yet joined, and the stacks it keeps
//! cached for the next `pthread_create`) has a `struct pthread` on one of three lists in
//! the dynamic linker's `_rtld_global`. glibc exports the layout of those lists and of the
//! fields libthread_db needs (`_thread_db_*`, GLIBC_PRIVATE but versioned with libc
//! itself, which is what lets gdb walk threads). From a descriptor memsnap learns, exactly
//! and without guessing from the shape of mappings:
//! - the thread's stack: `stackblock` up to where glibc placed the static TLS and the
//!   descriptor (the stack's top);
//! - the bytes the kernel writes behind the program's back: the `tid` word (cleared at
//!   exit through CLONE_CHILD_CLEARTID) and the rseq area (updated on every return to
//!   user space).
//!
//! `stackblock` has no libthread_db descriptor; its offset is learned once, at
//! initialization, from a thread memsnap creates and whose stack `pthread_getattr_np`
//! reports. glibc before 2.34 (lists in libpthread, not `_rtld_global`) has no such
//! layout: [`ThreadLayout::probe`] then returns `None` and the caller says so.

use super::raw;
use crate::sys::ThreadBlock;

/// Where glibc keeps its thread lists and what a descriptor looks like in this process.
#[derive(Clone, Copy, Debug)]
pub struct ThreadLayout {
    /// Heads of `_dl_stack_used`, `_dl_stack_user` and `_dl_stack_cache`.
    heads: [usize; 3],
    /// `_dl_stack_cache_lock`, held while any list changes.
    lock: usize,
    list_off: usize,
    tid_off: usize,
    stackblock_off: usize,
    /// `sizeof(struct pthread)`.
    size: usize,
    /// The static TLS block (descriptor included on x86_64), rounded as glibc rounds it
    /// when it carves the block off the top of a stack.
    static_tls: usize,
    /// `__rseq_offset`, `__rseq_size`.
    rseq: Option<(isize, usize)>,
}

/// Reads a `u32[3]` libthread_db field descriptor `{bits, count, offset}` and returns the
/// offset.
///
/// # Safety
/// `name` is NUL-terminated; the symbol, if present, is such a descriptor.
unsafe fn db_offset(name: &core::ffi::CStr) -> Option<usize> {
    // SAFETY: per the contract; the descriptors are read-only data of libc.
    unsafe {
        let p = libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) as *const u32;
        (!p.is_null()).then(|| *p.add(2) as usize)
    }
}

impl ThreadLayout {
    /// Looks the layout up. Takes loader locks (dlsym) and creates and joins one thread,
    /// so it runs once, at initialization, before anything is write-protected.
    pub fn probe(rseq: Option<(isize, usize)>) -> Option<ThreadLayout> {
        // SAFETY: the names are libthread_db's descriptors and ld.so's exports, of the
        // types read.
        unsafe {
            let rtld = libc::dlsym(libc::RTLD_DEFAULT, c"_rtld_global".as_ptr()) as usize;
            let used = db_offset(c"_thread_db_rtld_global__dl_stack_used")?;
            let user = db_offset(c"_thread_db_rtld_global__dl_stack_user")?;
            let list_off = db_offset(c"_thread_db_pthread_list")?;
            let tid_off = db_offset(c"_thread_db_pthread_tid")?;
            let size = libc::dlsym(libc::RTLD_DEFAULT, c"_thread_db_sizeof_pthread".as_ptr())
                as *const u32;
            let info = libc::dlsym(libc::RTLD_DEFAULT, c"_dl_get_tls_static_info".as_ptr());
            if rtld == 0 || size.is_null() || info.is_null() {
                return None;
            }
            // glibc 2.34+: `_dl_stack_used`, `_dl_stack_user`, `_dl_stack_cache` (list_t
            // each), `_dl_stack_cache_actsize`, `_dl_in_flight_stack`,
            // `_dl_stack_cache_lock`, in that order. The cache has no descriptor of its
            // own; the two that do must sit where that order puts them.
            const LIST: usize = 16;
            if user != used + LIST {
                return None;
            }
            let cache = user + LIST;
            let lock = cache + LIST + 8 + 8;
            let get: unsafe extern "C" fn(*mut usize, *mut usize) = core::mem::transmute(info);
            let (mut tls, mut align) = (0usize, 0usize);
            get(&mut tls, &mut align);
            let align = align.max(1);
            let static_tls = tls.div_ceil(align) * align;
            let mut layout = ThreadLayout {
                heads: [rtld + used, rtld + user, rtld + cache],
                lock: rtld + lock,
                list_off,
                tid_off,
                stackblock_off: 0,
                size: *size as usize,
                static_tls,
                rseq,
            };
            layout.stackblock_off = learn_stackblock_offset(layout.size)?;
            Some(layout)
        }
    }

    /// The thread pointer of the thread whose descriptor is at `pd`.
    fn thread_pointer(&self, pd: usize) -> usize {
        if cfg!(target_arch = "x86_64") {
            pd
        } else {
            // TLS_DTV_AT_TP (aarch64): the descriptor sits just below the thread pointer.
            pd + self.size
        }
    }

    /// Where glibc puts the top of a stack whose descriptor is at `pd` (allocatestack.c).
    fn stack_top(&self, pd: usize) -> usize {
        if cfg!(target_arch = "x86_64") {
            // The static TLS block, descriptor last, is carved off the stack's top.
            (pd + self.size).wrapping_sub(self.static_tls)
        } else {
            // The descriptor, then the static TLS above it, are carved off the top.
            pd
        }
    }

    /// Calls `f` for every descriptor on glibc's three lists. `readable(addr, len)` says
    /// whether memory may be read (the caller's region walk); a pointer that fails it, a
    /// list that does not close, or a descriptor whose stack fields contradict each other
    /// is an error: the layout is not what this code was written for, or a thread is being
    /// created or is exiting right now (the caller tries again). `mapped(addr)` says
    /// whether an address lies in any mapping (a stack block starts at its guard).
    ///
    /// Other threads must be idle (the snapshot protocol); a list being changed right now
    /// (the lock held) is waited for briefly.
    pub fn for_each_block(
        &self,
        readable: impl Fn(usize, usize) -> bool,
        mapped: impl Fn(usize) -> bool,
        mut f: impl FnMut(ThreadBlock),
    ) -> Result<(), &'static str> {
        let word = |addr: usize| -> Option<usize> {
            (addr % 8 == 0 && readable(addr, 8)).then(|| {
                // SAFETY: aligned and inside a readable mapping of this process.
                unsafe { core::ptr::read_volatile(addr as *const usize) }
            })
        };
        let lock = |l: &Self| {
            // SAFETY: `_dl_stack_cache_lock` is an int of ld.so's data, always mapped.
            unsafe { core::ptr::read_volatile(l.lock as *const i32) }
        };
        let mut tries = 0;
        while lock(self) != 0 {
            tries += 1;
            if tries > 10_000 {
                return Err("another thread holds glibc's thread-list lock (threads must be idle at checkpoints)");
            }
            raw::sched_yield();
        }
        for (list, &head) in self.heads.iter().enumerate() {
            let mut node = word(head).ok_or("glibc's thread list head is unreadable")?;
            let mut count = 0;
            while node != head {
                count += 1;
                if count > 1 << 16 {
                    return Err("glibc's thread list does not close");
                }
                let pd = node.wrapping_sub(self.list_off);
                if !readable(pd, self.size) {
                    return Err("a glibc thread descriptor is unreadable");
                }
                let next = word(node).ok_or("a glibc thread list link is unreadable")?;
                let base = word(pd + self.stackblock_off).unwrap_or(0);
                let len = word(pd + self.stackblock_off + 8).unwrap_or(0);
                // SAFETY: inside the descriptor, checked readable above; 4-aligned.
                let tid = unsafe { core::ptr::read_volatile((pd + self.tid_off) as *const u32) };
                let tp = self.thread_pointer(pd);
                let mut block = ThreadBlock {
                    tid: if list == 2 { 0 } else { tid },
                    pd,
                    tid_word: pd + self.tid_off,
                    rseq: self
                        .rseq
                        .map(|(off, size)| ((tp as isize + off) as usize, size)),
                    cached: list == 2,
                    ..ThreadBlock::default()
                };
                if base != 0 {
                    let top = self.stack_top(pd);
                    let end = base.checked_add(len).ok_or("a glibc stack block wraps")?;
                    if !(base < top && top <= end && pd < end && mapped(base) && mapped(end - 1)) {
                        return Err("a glibc thread descriptor's stack fields are inconsistent");
                    }
                    block.stack = (base, top);
                    block.block = (base, end);
                }
                f(block);
                node = next;
            }
        }
        if lock(self) != 0 {
            return Err("glibc's thread lists changed during the walk");
        }
        Ok(())
    }
}

/// glibc's static TLS size (`_dl_get_tls_static_info`), 0 when it cannot be asked.
pub fn static_tls_bytes() -> usize {
    // SAFETY: the symbol, when present, is ld.so's `void (size_t *, size_t *)`.
    unsafe {
        let info = libc::dlsym(libc::RTLD_DEFAULT, c"_dl_get_tls_static_info".as_ptr());
        if info.is_null() {
            return 0;
        }
        let get: unsafe extern "C" fn(*mut usize, *mut usize) = core::mem::transmute(info);
        let (mut size, mut align) = (0usize, 0usize);
        get(&mut size, &mut align);
        size + align
    }
}

/// Finds where `struct pthread` keeps `stackblock` and `stackblock_size` (adjacent, in that
/// order), by giving a thread a stack whose bounds are known and looking for the pair in
/// its own descriptor. The stack is memory mapped here and unmapped after the join: no
/// `pthread_getattr_np`, whose `malloc` in a fresh thread would make glibc create a second
/// arena (a 128 MiB reservation the host's threads could later pick up and grow).
fn learn_stackblock_offset(size: usize) -> Option<usize> {
    struct Probe {
        size: usize,
        base: usize,
        len: usize,
        found: usize,
    }
    extern "C" fn body(arg: *mut libc::c_void) -> *mut libc::c_void {
        // SAFETY: `arg` is the creator's `Probe`, which outlives the join; pthread_self is
        // this thread's descriptor, `size` bytes long (libthread_db's own figure).
        unsafe {
            let probe = &mut *(arg as *mut Probe);
            let pd = libc::pthread_self() as usize;
            let mut off = 0;
            while off + 16 <= probe.size {
                let base = *((pd + off) as *const usize);
                let blen = *((pd + off + 8) as *const usize);
                if base == probe.base && blen == probe.len {
                    probe.found = off;
                    break;
                }
                off += 8;
            }
        }
        core::ptr::null_mut()
    }
    let len = super::thread_stack_bytes(256 << 10);
    let base = super::reserve(len)? as usize;
    let mut probe = Probe {
        size,
        base,
        len,
        found: usize::MAX,
    };
    // SAFETY: a thread running `body` on `probe` and on the stack just mapped, joined
    // before either goes away.
    unsafe {
        let mut attr: libc::pthread_attr_t = core::mem::zeroed();
        libc::pthread_attr_init(&mut attr);
        let ok = libc::pthread_attr_setstack(&mut attr, base as *mut libc::c_void, len) == 0;
        let mut t: libc::pthread_t = core::mem::zeroed();
        let started = ok
            && libc::pthread_create(
                &mut t,
                &attr,
                body,
                &mut probe as *mut Probe as *mut libc::c_void,
            ) == 0;
        libc::pthread_attr_destroy(&mut attr);
        if started {
            libc::pthread_join(t, core::ptr::null_mut());
        }
        super::release(base as *mut u8, len);
    }
    (probe.found != usize::MAX).then_some(probe.found)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The walk finds this test's own threads with the stacks and tids glibc reports.
    #[test]
    fn finds_live_threads_with_their_stacks() {
        let layout = ThreadLayout::probe(super::super::threads::rseq_layout())
            .expect("glibc 2.34+ exports its thread-list layout");
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            // SAFETY: plain queries of this thread's own attributes.
            let (addr, len) = unsafe {
                let mut attr: libc::pthread_attr_t = core::mem::zeroed();
                libc::pthread_getattr_np(libc::pthread_self(), &mut attr);
                let mut addr: *mut libc::c_void = core::ptr::null_mut();
                let mut len = 0usize;
                libc::pthread_attr_getstack(&attr, &mut addr, &mut len);
                libc::pthread_attr_destroy(&mut attr);
                (addr as usize, len)
            };
            let local = 0u8;
            let sp = &local as *const u8 as usize;
            // SAFETY: pthread_self has no preconditions.
            let me = unsafe { libc::pthread_self() } as usize;
            tx.send((raw::gettid(), me, addr, len, sp)).unwrap();
            done_rx.recv().unwrap();
        });
        let (tid, pd, addr, len, sp) = rx.recv().unwrap();
        let mut seen = None;
        layout
            .for_each_block(
                |_, _| true,
                |_| true,
                |b| {
                    if b.pd == pd {
                        seen = Some(b);
                    }
                },
            )
            .unwrap();
        let b = seen.expect("the spawned thread's descriptor is on a list");
        assert_eq!(b.tid as u64, tid);
        assert!(!b.cached);
        assert!(b.stack.0 <= addr && b.stack.1 <= addr + len && b.stack.1 > sp);
        assert!(b.stack.0 < sp);
        done_tx.send(()).unwrap();
        t.join().unwrap();
    }
}
