//! Binding ahead of time: resolves every loaded object's lazy PLT slots that name
//! libmemsnap's exported functions.
//!
//! A host linked without `-z now` binds a PLT slot at its first call: ld.so's resolver
//! counts the lookup in its own data and writes the caller's GOT, both tracked memory. The
//! first call of a memsnap function inside a disallow scope (a restore, a query, or
//! `SetMemoryChangesAllowed(true)` ending the scope) would thus write tracked memory while
//! that is forbidden. [`bind_exports`] writes those slots first, with the address the
//! resolver would write, while memory changes are still allowed: at initialization and at
//! each snapshot, for objects loaded since. The resolver then never runs for them.
//!
//! The exports are read from libmemsnap's own dynamic symbol table, so the list cannot
//! drift from the C ABI. Only slots still in their lazy state (pointing back into their
//! own object, at its PLT) are written: a slot already bound, and so any GOT that full
//! RELRO made read-only, is left as it is. A slot is bound where ld.so's search of the
//! global scope, which follows the order `dl_iterate_phdr` lists the objects in, would bind
//! it: a name an object listed before libmemsnap also defines (the program itself, an
//! `LD_PRELOAD`ed library) is left lazy, for ld.so to bind there; one defined only by
//! objects after it (libc's `mmap`, which libmemsnap interposes) is bound to libmemsnap,
//! except in an object linked `-Bsymbolic` that defines it itself. Lookup scopes that
//! differ from the global one (`RTLD_DEEPBIND`, `dlmopen` namespaces) are not modelled:
//! there an interposed libc name could be bound to libmemsnap where ld.so would pick libc.
//! Only jump slots are bound lazily: `GLOB_DAT` and the other relocations are applied when
//! the object is loaded.
//!
//! A snapshot walks only when the loaded objects changed, and finds out without writing
//! anything: `dl_iterate_phdr` takes ld.so's lock, a word of its tracked data, which after
//! the first snapshot would cost a write fault at every checkpoint. It reads the
//! debugger's list instead (`_r_debug`: every namespace's link maps, with their load bias,
//! dynamic section and path), and one slot it bound per object, which a library unloaded
//! and loaded again at the same place has lazy again. The record of both ([`BOUND`]) is
//! libmemsnap's own data, never rewound: after a rewind to before a `dlopen`, ld.so's list
//! no longer matches the record, or (the object loaded afresh at the same place) its
//! sentinel slot is lazy again, and either makes the next snapshot walk and bind it.
//!
//! Everything runs on the caller's stack: no allocation, and `dl_iterate_phdr`'s lock
//! (during a walk) is the only lock taken.

mod elf;
mod record;
#[cfg(test)]
mod tests;

use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicUsize, Ordering};

use elf::*;
use record::*;

/// Room for libmemsnap's exported functions (about 40), with margin; more is a fatal
/// error at initialization.
const MAX_EXPORTS: usize = 256;

#[derive(Clone, Copy)]
struct Export {
    name: &'static [u8],
    hash: u32,
    addr: usize,
    /// An object ld.so searches before libmemsnap defines the name too: left to ld.so.
    shadowed: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Reads the counters and libmemsnap's exports.
    Exports,
    /// Marks the exports that objects listed before libmemsnap define too.
    Shadowed,
    /// Writes the lazy slots.
    Bind,
}

struct Walk {
    pass: Pass,
    /// The load counters the first pass read (if the loader has them); a later pass that
    /// reads others stops, `raced`.
    counters: Option<(u64, u64)>,
    started: bool,
    raced: bool,
    /// An address inside libmemsnap, and libmemsnap's span once found.
    me: usize,
    ours: (usize, usize),
    exports: [Export; MAX_EXPORTS],
    n: usize,
    overflow: bool,
    written: usize,
    /// One bound slot per object that has any; `None` once there are too many.
    sentinels: [(usize, usize); MAX_SENTINELS],
    n_sentinels: Option<usize>,
}

/// Binds every lazy PLT slot of the loaded objects (other than libmemsnap) that names one
/// of libmemsnap's exported functions, unless the loaded objects are the ones last bound.
/// Returns how many slots it wrote. Call only while memory changes are allowed: a walk's
/// writes to tracked memory (GOTs, [`BOUND`], ld.so's lock) are captured like any other.
pub fn bind_exports() -> Result<usize, &'static str> {
    bind_with(&BOUND).map(|written| written.unwrap_or(0))
}

/// As [`bind_exports`], against `bound`; `None` when the loaded objects had not changed.
fn bind_with(bound: &BoundObjects) -> Result<Option<usize>, &'static str> {
    if bound.unchanged() {
        return Ok(None);
    }
    let before = loaded_objects();
    let mut w = Walk {
        pass: Pass::Exports,
        counters: None,
        started: false,
        raced: false,
        me: bind_with as *const () as usize,
        ours: (0, 0),
        exports: [Export {
            name: &[],
            hash: 0,
            addr: 0,
            shadowed: false,
        }; MAX_EXPORTS],
        n: 0,
        overflow: false,
        written: 0,
        sentinels: [(0, 0); MAX_SENTINELS],
        n_sentinels: Some(0),
    };
    iterate(&mut w);
    if w.overflow {
        return Err("libmemsnap exports more functions than the binding table holds");
    }
    if w.n > 0 {
        w.pass = Pass::Shadowed;
        iterate(&mut w);
        w.pass = Pass::Bind;
        if !w.raced {
            iterate(&mut w);
        }
    }
    // Objects loaded meanwhile (threads should be idle) are bound at the next call.
    match before {
        Some(objects) if !w.raced && loaded_objects() == before => {
            bound.record(objects, w.n_sentinels.map(|n| &w.sentinels[..n]))
        }
        _ => bound.valid.store(false, Ordering::Relaxed),
    }
    Ok(Some(w.written))
}

fn iterate(w: &mut Walk) {
    // SAFETY: the callback matches dl_iterate_phdr's contract and `w` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (w as *mut Walk).cast::<c_void>()) };
}

/// dl_iterate_phdr's callback: nonzero stops the walk.
unsafe extern "C" fn visit(info: *mut libc::dl_phdr_info, size: usize, data: *mut c_void) -> c_int {
    // SAFETY: `data` is the Walk `iterate` passed; `info` is valid during the callback.
    let (w, info) = unsafe { (&mut *data.cast::<Walk>(), &*info) };
    let has_counters =
        size >= core::mem::offset_of!(libc::dl_phdr_info, dlpi_subs) + core::mem::size_of::<u64>();
    let now = has_counters.then_some((info.dlpi_adds, info.dlpi_subs));
    if !w.started {
        w.started = true;
        w.counters = now;
    } else if now != w.counters {
        w.raced = true;
        return 1;
    }
    // SAFETY: as above.
    let Some(o) = (unsafe { Object::parse(info) }) else {
        return 0;
    };
    match w.pass {
        Pass::Exports => {
            if !o.contains(w.me) {
                return 0;
            }
            w.ours = (o.lo, o.hi);
            // SAFETY: libmemsnap is loaded and was searched by ld.so.
            unsafe { collect_exports(w, &o) };
            1
        }
        Pass::Shadowed => {
            if (o.lo, o.hi) == w.ours {
                // Objects from here on are searched after libmemsnap.
                return 1;
            }
            for e in w.exports[..w.n].iter_mut().filter(|e| !e.shadowed) {
                // SAFETY: a loaded object.
                e.shadowed = unsafe { o.defines(e.name, e.hash) };
            }
            0
        }
        Pass::Bind => {
            if (o.lo, o.hi) != w.ours && !o.eager && o.rela && o.jmprel != 0 {
                // SAFETY: a loaded object whose relocations ld.so has processed.
                let (written, sentinel) = unsafe { bind_object(&w.exports[..w.n], &o) };
                w.written += written;
                if let Some(s) = sentinel {
                    w.n_sentinels = match w.n_sentinels {
                        Some(k) if k < MAX_SENTINELS => {
                            w.sentinels[k] = s;
                            Some(k + 1)
                        }
                        _ => None,
                    };
                }
            }
            0
        }
    }
}

/// Fills `w.exports` with libmemsnap's exported functions.
///
/// # Safety
/// `o` is libmemsnap, loaded, which stays mapped for the life of the process.
unsafe fn collect_exports(w: &mut Walk, o: &Object) {
    let bias = o.bias;
    // SAFETY: forwarded contract.
    unsafe {
        o.for_each_hashed(|i| {
            let s = o.sym(i);
            let bind = s.st_info >> 4;
            if s.st_shndx == SHN_UNDEF
                || s.st_info & 0xf != STT_FUNC
                || !(bind == STB_GLOBAL || bind == STB_WEAK)
            {
                return;
            }
            // SAFETY: libmemsnap's string table stays mapped while its code runs.
            let name: &'static [u8] = &*(o.name(s) as *const [u8]);
            if name.is_empty() {
                return;
            }
            if w.n == MAX_EXPORTS {
                w.overflow = true;
                return;
            }
            w.exports[w.n] = Export {
                name,
                hash: gnu_hash(name),
                addr: bias.wrapping_add(s.st_value as usize),
                shadowed: false,
            };
            w.n += 1;
        });
    }
}

/// Writes the object's lazy jump slots that name one of `exports`: how many it wrote, and
/// one slot bound to memsnap (address, value) if it has any.
///
/// # Safety
/// `o` is a loaded object other than libmemsnap; memory changes are allowed.
unsafe fn bind_object(exports: &[Export], o: &Object) -> (usize, Option<(usize, usize)>) {
    let mut written = 0;
    let mut sentinel = None;
    let count = o.pltrelsz / core::mem::size_of::<Rela>();
    for k in 0..count {
        // SAFETY: DT_JMPREL holds DT_PLTRELSZ bytes of Elf64_Rela entries.
        let r = unsafe { &*(o.jmprel as *const Rela).add(k) };
        let index = (r.info >> 32) as usize;
        if r.info & 0xffff_ffff != R_JUMP_SLOT || index == 0 {
            continue;
        }
        // SAFETY: the relocation names a symbol of this object's table.
        let name = unsafe { o.name(o.sym(index)) };
        let hash = gnu_hash(name);
        let Some(e) = exports
            .iter()
            .find(|e| e.hash == hash && e.name == name && !e.shadowed)
        else {
            continue;
        };
        // -Bsymbolic: the object's own definition comes first.
        // SAFETY: `o` is loaded.
        if o.symbolic && unsafe { o.defines(name, hash) } {
            continue;
        }
        let slot = o.bias.wrapping_add(r.offset as usize);
        if !o.contains(slot) || slot % core::mem::align_of::<usize>() != 0 {
            continue;
        }
        // SAFETY: an aligned GOT word of a loaded object; ld.so reads and writes it the
        // same way.
        let cell = unsafe { AtomicUsize::from_ptr(slot as *mut usize) };
        let now = cell.load(Ordering::Relaxed);
        // Lazy: still pointing back into its own object, at the PLT code that calls the
        // resolver. Such a GOT is writable (ld.so must write it), and a thread racing
        // through the resolver would store the same address.
        if now != e.addr && o.contains(now) {
            cell.store(e.addr, Ordering::Relaxed);
            written += 1;
        }
        if sentinel.is_none() && cell.load(Ordering::Relaxed) == e.addr {
            sentinel = Some((slot, e.addr));
        }
    }
    (written, sentinel)
}
