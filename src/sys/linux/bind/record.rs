//! The record of what the last walk bound, and the debugger's list of loaded objects
//! it is checked against: a snapshot walks only when the two differ.

use core::ffi::{c_int, CStr};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Objects with memsnap slots whose binding the record can vouch for; with more, every
/// snapshot walks.
pub(super) const MAX_SENTINELS: usize = 64;

/// What the last walk left bound.
pub(super) struct BoundObjects {
    /// The debugger's list of loaded objects then ([`loaded_objects`]), once a walk has
    /// completed.
    pub(super) valid: AtomicBool,
    pub(super) hash: AtomicU64,
    pub(super) count: AtomicUsize,
    /// One bound slot per object that has any: (address, value).
    pub(super) sentinels: [(AtomicUsize, AtomicUsize); MAX_SENTINELS],
    /// `usize::MAX`: more such objects than [`MAX_SENTINELS`].
    pub(super) sentinel_count: AtomicUsize,
}

/// In libmemsnap's own data, which is never tracked when libmemsnap is a shared object
/// (`own_object.rs`); linked into a program it is tracked and rewound, which the sentinel
/// check makes equally safe. Written only while memory changes are allowed.
pub(super) static BOUND: BoundObjects = BoundObjects::new();

impl BoundObjects {
    /// Nothing bound yet: the first call walks.
    pub(super) const fn new() -> Self {
        BoundObjects {
            valid: AtomicBool::new(false),
            hash: AtomicU64::new(0),
            count: AtomicUsize::new(0),
            sentinels: [const { (AtomicUsize::new(0), AtomicUsize::new(0)) }; MAX_SENTINELS],
            sentinel_count: AtomicUsize::new(0),
        }
    }

    /// Whether the loaded objects are those last walked, with the slots it bound still
    /// bound. Reads only.
    pub(super) fn unchanged(&self) -> bool {
        if !self.valid.load(Ordering::Relaxed) {
            return false;
        }
        let recorded = (
            self.hash.load(Ordering::Relaxed),
            self.count.load(Ordering::Relaxed),
        );
        if loaded_objects() != Some(recorded) {
            return false;
        }
        let n = self.sentinel_count.load(Ordering::Relaxed);
        if n > MAX_SENTINELS {
            return false;
        }
        self.sentinels[..n].iter().all(|(slot, value)| {
            let slot = slot.load(Ordering::Relaxed);
            // SAFETY: a GOT word of an object the unchanged list says is still loaded
            // where it was when the slot was recorded.
            unsafe { AtomicUsize::from_ptr(slot as *mut usize) }.load(Ordering::Relaxed)
                == value.load(Ordering::Relaxed)
        })
    }

    pub(super) fn record(&self, objects: (u64, usize), sentinels: Option<&[(usize, usize)]>) {
        self.hash.store(objects.0, Ordering::Relaxed);
        self.count.store(objects.1, Ordering::Relaxed);
        match sentinels {
            Some(list) => {
                for (cell, &(slot, value)) in self.sentinels.iter().zip(list) {
                    cell.0.store(slot, Ordering::Relaxed);
                    cell.1.store(value, Ordering::Relaxed);
                }
                self.sentinel_count.store(list.len(), Ordering::Relaxed);
            }
            None => self.sentinel_count.store(usize::MAX, Ordering::Relaxed),
        }
        self.valid.store(true, Ordering::Relaxed);
    }
}

/// `struct link_map`'s public head (`<link.h>`).
#[repr(C)]
pub(super) struct LinkMap {
    pub(super) addr: usize,
    pub(super) name: *const libc::c_char,
    pub(super) dynamic: usize,
    pub(super) next: *const LinkMap,
    pub(super) prev: *const LinkMap,
}

/// `struct r_debug_extended` (`<link.h>`); `next` exists when `version` is 2 or more.
#[repr(C)]
pub(super) struct RDebug {
    pub(super) version: c_int,
    pub(super) map: *const LinkMap,
    pub(super) brk: usize,
    pub(super) state: c_int,
    pub(super) ldbase: usize,
    pub(super) next: *const RDebug,
}

pub(super) const RT_CONSISTENT: c_int = 0;

extern "C" {
    /// The dynamic linker's list of loaded objects, for debuggers.
    static mut _r_debug: RDebug;
}

/// A hash of the loaded objects (each one's link map, load bias, dynamic section and path)
/// and their number, from the debugger's list; `None` while ld.so is changing it.
pub(super) fn loaded_objects() -> Option<(u64, usize)> {
    pub(super) const PRIME: u64 = 0x0000_0100_0000_01b3;
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut mix = |v: usize| hash = (hash ^ v as u64).wrapping_mul(PRIME);
    let mut count = 0usize;
    let mut debug = core::ptr::addr_of!(_r_debug);
    while !debug.is_null() {
        // SAFETY: ld.so's r_debug, or the next namespace's, changed only inside dlopen and
        // dlclose (other threads are idle at snapshots). Read field by field: before
        // version 2 the object ends before `next`.
        let (version, state, mut map) = unsafe { ((*debug).version, (*debug).state, (*debug).map) };
        if state != RT_CONSISTENT {
            return None;
        }
        while !map.is_null() {
            // SAFETY: a link map on ld.so's list, with a NUL-terminated path (or null).
            let m = unsafe { &*map };
            mix(map as usize);
            mix(m.addr);
            mix(m.dynamic);
            if !m.name.is_null() {
                // SAFETY: as above.
                for &b in unsafe { CStr::from_ptr(m.name) }.to_bytes() {
                    mix(b as usize);
                }
            }
            count += 1;
            map = m.next;
        }
        debug = if version >= 2 {
            // SAFETY: version 2 has `next`.
            unsafe { (*debug).next }
        } else {
            core::ptr::null()
        };
    }
    Some((hash, count))
}
