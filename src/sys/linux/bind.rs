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

use core::ffi::{c_int, c_void, CStr};
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// Objects with memsnap slots whose binding the record can vouch for; with more, every
/// snapshot walks.
const MAX_SENTINELS: usize = 64;

/// What the last walk left bound.
struct BoundObjects {
    /// The debugger's list of loaded objects then ([`loaded_objects`]), once a walk has
    /// completed.
    valid: AtomicBool,
    hash: AtomicU64,
    count: AtomicUsize,
    /// One bound slot per object that has any: (address, value).
    sentinels: [(AtomicUsize, AtomicUsize); MAX_SENTINELS],
    /// `usize::MAX`: more such objects than [`MAX_SENTINELS`].
    sentinel_count: AtomicUsize,
}

/// In libmemsnap's own data, which is never tracked when libmemsnap is a shared object
/// (`own_object.rs`); linked into a program it is tracked and rewound, which the sentinel
/// check makes equally safe. Written only while memory changes are allowed.
static BOUND: BoundObjects = BoundObjects::new();

impl BoundObjects {
    /// Nothing bound yet: the first call walks.
    const fn new() -> Self {
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
    fn unchanged(&self) -> bool {
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

    fn record(&self, objects: (u64, usize), sentinels: Option<&[(usize, usize)]>) {
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
struct LinkMap {
    addr: usize,
    name: *const libc::c_char,
    dynamic: usize,
    next: *const LinkMap,
    prev: *const LinkMap,
}

/// `struct r_debug_extended` (`<link.h>`); `next` exists when `version` is 2 or more.
#[repr(C)]
struct RDebug {
    version: c_int,
    map: *const LinkMap,
    brk: usize,
    state: c_int,
    ldbase: usize,
    next: *const RDebug,
}

const RT_CONSISTENT: c_int = 0;

extern "C" {
    /// The dynamic linker's list of loaded objects, for debuggers.
    static mut _r_debug: RDebug;
}

/// A hash of the loaded objects (each one's link map, load bias, dynamic section and path)
/// and their number, from the debugger's list; `None` while ld.so is changing it.
fn loaded_objects() -> Option<(u64, usize)> {
    const PRIME: u64 = 0x0000_0100_0000_01b3;
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

/// Room for libmemsnap's exported functions (about 40), with margin; more is a fatal
/// error at initialization.
const MAX_EXPORTS: usize = 256;

const DT_NULL: i64 = 0;
const DT_PLTRELSZ: i64 = 2;
const DT_HASH: i64 = 4;
const DT_STRTAB: i64 = 5;
const DT_SYMTAB: i64 = 6;
const DT_RELA: u64 = 7;
const DT_STRSZ: i64 = 10;
const DT_SYMBOLIC: i64 = 16;
const DT_PLTREL: i64 = 20;
const DT_JMPREL: i64 = 23;
const DT_BIND_NOW: i64 = 24;
const DT_FLAGS: i64 = 30;
const DT_GNU_HASH: i64 = 0x6fff_fef5;
const DT_FLAGS_1: i64 = 0x6fff_fffb;
const DF_SYMBOLIC: u64 = 0x2;
const DF_BIND_NOW: u64 = 0x8;
const DF_1_NOW: u64 = 0x1;

const STB_LOCAL: u8 = 0;
const STB_GLOBAL: u8 = 1;
const STB_WEAK: u8 = 2;
const STT_FUNC: u8 = 2;
const SHN_UNDEF: u16 = 0;

#[cfg(target_arch = "x86_64")]
const R_JUMP_SLOT: u64 = 7; // R_X86_64_JUMP_SLOT
#[cfg(target_arch = "aarch64")]
const R_JUMP_SLOT: u64 = 1026; // R_AARCH64_JUMP_SLOT

#[repr(C)]
struct Dyn {
    tag: i64,
    val: u64,
}

#[repr(C)]
struct Rela {
    offset: u64,
    info: u64,
    addend: i64,
}

type Sym = libc::Elf64_Sym;

/// One loaded object, as its program headers and dynamic section describe it. Every
/// address is absolute and lies in `[lo, hi)`.
#[derive(Default)]
struct Object {
    bias: usize,
    /// The span of its loadable segments.
    lo: usize,
    hi: usize,
    symtab: usize,
    strtab: usize,
    strsz: usize,
    gnu_hash: usize,
    sysv_hash: usize,
    jmprel: usize,
    pltrelsz: usize,
    rela: bool,
    /// Asks ld.so to bind everything at load (`-z now`): no slot is lazy.
    eager: bool,
    /// Linked `-Bsymbolic`: its own definitions come before the global scope.
    symbolic: bool,
}

impl Object {
    /// Reads the object `dl_iterate_phdr` describes; `None` without a dynamic section.
    ///
    /// # Safety
    /// `info` is what `dl_iterate_phdr` passed to its callback, used during the callback.
    unsafe fn parse(info: &libc::dl_phdr_info) -> Option<Object> {
        let bias = info.dlpi_addr as usize;
        let mut o = Object {
            bias,
            lo: usize::MAX,
            ..Object::default()
        };
        let mut dynamic = 0usize;
        for i in 0..info.dlpi_phnum as usize {
            // SAFETY: dl_iterate_phdr passes dlpi_phnum program headers at dlpi_phdr.
            let ph = unsafe { &*info.dlpi_phdr.add(i) };
            let start = bias.wrapping_add(ph.p_vaddr as usize);
            match ph.p_type {
                libc::PT_LOAD => {
                    o.lo = o.lo.min(start);
                    o.hi = o.hi.max(start.wrapping_add(ph.p_memsz as usize));
                }
                libc::PT_DYNAMIC => dynamic = start,
                _ => {}
            }
        }
        if dynamic == 0 || o.lo >= o.hi || !o.contains(dynamic) {
            return None;
        }
        // glibc rewrites the pointer entries of an object's writable dynamic section to
        // absolute addresses when it loads it; a read-only one (the vDSO's) and other
        // loaders keep them relative to the load bias. An unrelocated value could only
        // fall inside the object if it were loaded below its own size. 0: no such entry.
        let span = o.lo..o.hi;
        let addr = |v: u64| -> usize {
            let v = v as usize;
            let a = if v == 0 || span.contains(&v) {
                v
            } else {
                v.wrapping_add(bias)
            };
            if span.contains(&a) {
                a
            } else {
                0
            }
        };
        let (mut symtab, mut strtab, mut gnu, mut sysv, mut jmprel) = (0, 0, 0, 0, 0);
        let mut d = dynamic as *const Dyn;
        loop {
            // SAFETY: the dynamic section is an array of entries ending with DT_NULL,
            // mapped with the object.
            let e = unsafe { &*d };
            match e.tag {
                DT_NULL => break,
                DT_PLTRELSZ => o.pltrelsz = e.val as usize,
                DT_HASH => sysv = e.val,
                DT_STRTAB => strtab = e.val,
                DT_SYMTAB => symtab = e.val,
                DT_STRSZ => o.strsz = e.val as usize,
                DT_PLTREL => o.rela = e.val == DT_RELA,
                DT_JMPREL => jmprel = e.val,
                DT_SYMBOLIC => o.symbolic = true,
                DT_BIND_NOW => o.eager = true,
                DT_FLAGS => {
                    o.eager |= e.val & DF_BIND_NOW != 0;
                    o.symbolic |= e.val & DF_SYMBOLIC != 0;
                }
                DT_FLAGS_1 => o.eager |= e.val & DF_1_NOW != 0,
                DT_GNU_HASH => gnu = e.val,
                _ => {}
            }
            // SAFETY: not past DT_NULL, which ends the array.
            d = unsafe { d.add(1) };
        }
        (o.symtab, o.strtab) = (addr(symtab), addr(strtab));
        (o.gnu_hash, o.sysv_hash) = (addr(gnu), addr(sysv));
        o.jmprel = addr(jmprel);
        if o.symtab == 0 || o.strtab == 0 {
            return None;
        }
        Some(o)
    }

    fn contains(&self, a: usize) -> bool {
        (self.lo..self.hi).contains(&a)
    }

    /// Symbol `i` of the dynamic symbol table.
    ///
    /// # Safety
    /// `i` is below the table's length (from a hash table or a relocation of this object).
    unsafe fn sym(&self, i: usize) -> &Sym {
        // SAFETY: forwarded contract; the table is mapped with the object.
        unsafe { &*(self.symtab as *const Sym).add(i) }
    }

    /// The name of `sym`, empty when its offset is out of the string table.
    ///
    /// # Safety
    /// `sym` belongs to this object's symbol table.
    unsafe fn name(&self, sym: &Sym) -> &[u8] {
        let off = sym.st_name as usize;
        if self.strsz != 0 && off >= self.strsz {
            return &[];
        }
        // SAFETY: a NUL-terminated string of the object's string table, mapped with it.
        unsafe { CStr::from_ptr((self.strtab + off) as *const libc::c_char) }.to_bytes()
    }

    /// Calls `f(index)` for every symbol the hash table lists: the ones the object
    /// exports or may be bound to.
    ///
    /// # Safety
    /// The object is loaded and its hash table well formed (ld.so searched it).
    unsafe fn for_each_hashed(&self, mut f: impl FnMut(usize)) {
        if self.gnu_hash != 0 {
            // SAFETY: the GNU hash table's header, buckets and chains, mapped with it.
            unsafe {
                let (buckets, symoffset, chains) = self.gnu_tables();
                for &start in buckets {
                    let mut i = start as usize;
                    if i < symoffset {
                        continue;
                    }
                    loop {
                        f(i);
                        if *chains.add(i - symoffset) & 1 != 0 {
                            break;
                        }
                        i += 1;
                    }
                }
            }
        } else if self.sysv_hash != 0 {
            // SAFETY: the SysV hash table's header: nbucket, nchain (the symbol count).
            let nchain = unsafe { *(self.sysv_hash as *const u32).add(1) } as usize;
            (1..nchain).for_each(f);
        }
    }

    /// The GNU hash table's buckets, first hashed symbol and chain array.
    ///
    /// # Safety
    /// `gnu_hash` is the object's (well-formed) GNU hash table.
    unsafe fn gnu_tables(&self) -> (&[u32], usize, *const u32) {
        let h = self.gnu_hash as *const u32;
        // SAFETY: the header's four words, then `bloom` words of the object's size, the
        // buckets and the chains, in this order.
        unsafe {
            let nbuckets = *h as usize;
            let symoffset = *h.add(1) as usize;
            let bloom = *h.add(2) as usize;
            let buckets = h.add(4).cast::<u64>().add(bloom).cast::<u32>();
            (
                core::slice::from_raw_parts(buckets, nbuckets),
                symoffset,
                buckets.add(nbuckets),
            )
        }
    }

    /// Whether the object defines (not merely references) a symbol called `name`.
    ///
    /// # Safety
    /// As for [`Object::for_each_hashed`].
    unsafe fn defines(&self, name: &[u8], gnu: u32) -> bool {
        let hit = |i: usize| {
            // SAFETY: `i` comes from this object's hash table.
            let s = unsafe { self.sym(i) };
            // SAFETY: `s` is this object's.
            s.st_shndx != SHN_UNDEF
                && s.st_info >> 4 != STB_LOCAL
                && unsafe { self.name(s) } == name
        };
        if self.gnu_hash != 0 {
            // SAFETY: the object's GNU hash table.
            let (buckets, symoffset, chains) = unsafe { self.gnu_tables() };
            if buckets.is_empty() {
                return false;
            }
            let mut i = buckets[gnu as usize % buckets.len()] as usize;
            if i < symoffset {
                return false;
            }
            loop {
                // SAFETY: `i` walks one chain, which ends with a word whose low bit is set.
                let h = unsafe { *chains.add(i - symoffset) };
                if h | 1 == gnu | 1 && hit(i) {
                    return true;
                }
                if h & 1 != 0 {
                    return false;
                }
                i += 1;
            }
        }
        if self.sysv_hash != 0 {
            let h = self.sysv_hash as *const u32;
            // SAFETY: the SysV hash table: nbucket, nchain, the buckets, the chains.
            unsafe {
                let (nbucket, nchain) = (*h as usize, *h.add(1) as usize);
                if nbucket == 0 {
                    return false;
                }
                let mut i = *h.add(2 + sysv_hash(name) as usize % nbucket) as usize;
                let mut steps = 0;
                while i != 0 && i < nchain && steps < nchain {
                    if hit(i) {
                        return true;
                    }
                    i = *h.add(2 + nbucket + i) as usize;
                    steps += 1;
                }
            }
        }
        false
    }
}

fn gnu_hash(name: &[u8]) -> u32 {
    name.iter()
        .fold(5381u32, |h, &c| h.wrapping_mul(33).wrapping_add(c as u32))
}

fn sysv_hash(name: &[u8]) -> u32 {
    name.iter().fold(0u32, |h, &c| {
        let h = (h << 4).wrapping_add(c as u32);
        let g = h & 0xf000_0000;
        (h ^ (g >> 24)) & !g
    })
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_match_the_elf_definitions() {
        // Published example values; the lookups below check both against real tables.
        assert_eq!(gnu_hash(b""), 5381);
        assert_eq!(gnu_hash(b"printf"), 0x156b_2bb8);
        assert_eq!(gnu_hash(b"exit"), 0x7c96_7e3f);
        assert_eq!(sysv_hash(b""), 0);
        assert_eq!(sysv_hash(b"printf"), 0x077905a6);
        assert_eq!(sysv_hash(b"exit"), 0x0006cf04);
    }

    /// The loaded object spanning `addr`, as `Object::parse` reads it.
    fn object_at(addr: usize) -> Option<Object> {
        struct Find(usize, Option<Object>);
        unsafe extern "C" fn f(info: *mut libc::dl_phdr_info, _: usize, d: *mut c_void) -> c_int {
            // SAFETY: `d` is the Find below; `info` is valid during the callback.
            let (find, info) = unsafe { (&mut *d.cast::<Find>(), &*info) };
            // SAFETY: as above.
            match unsafe { Object::parse(info) } {
                Some(o) if o.contains(find.0) => {
                    find.1 = Some(o);
                    1
                }
                _ => 0,
            }
        }
        let mut find = Find(addr, None);
        // SAFETY: the callback's contract; `find` outlives the call.
        unsafe { libc::dl_iterate_phdr(Some(f), (&mut find as *mut Find).cast()) };
        find.1
    }

    fn defines(o: &Object, name: &[u8]) -> bool {
        // SAFETY: `o` is a loaded object.
        unsafe { o.defines(name, gnu_hash(name)) }
    }

    #[test]
    fn lookups_find_what_libc_defines() {
        let o = object_at(libc::getpid as *const () as usize).expect("libc is loaded");
        assert!(o.gnu_hash != 0);
        assert!(defines(&o, b"getpid"));
        assert!(defines(&o, b"dl_iterate_phdr"));
        assert!(!defines(&o, b"RestoreMemoryToLastSavedCheckpoint"));
        let mut seen = false;
        // SAFETY: libc is loaded; the indices come from its hash table.
        unsafe { o.for_each_hashed(|i| seen |= o.name(o.sym(i)) == b"getpid") };
        assert!(seen);
        // Debian's libc carries a SysV table too: the same answers through it.
        if o.sysv_hash != 0 {
            let sysv = Object { gnu_hash: 0, ..o };
            assert!(defines(&sysv, b"getpid"));
            assert!(!defines(&sysv, b"RestoreMemoryToLastSavedCheckpoint"));
        } else {
            eprintln!("note: libc has no SysV hash table; that lookup is not exercised");
        }
    }

    /// An entry the dynamic section lacks reads as none, not as the load address: this
    /// test program, like libmemsnap, has a GNU hash table only.
    #[test]
    fn a_missing_entry_reads_as_none() {
        let o = object_at(object_at as *const () as usize).expect("this program is loaded");
        assert!(o.gnu_hash != 0);
        assert_eq!(o.sysv_hash, 0);
    }

    /// The vDSO's dynamic section is read-only, so its pointers stay relative to its load
    /// address (glibc relocates those of the objects it loads).
    #[test]
    fn the_vdso_is_read_with_relative_pointers() {
        // SAFETY: getauxval has no preconditions.
        let base = unsafe { libc::getauxval(libc::AT_SYSINFO_EHDR) } as usize;
        if base == 0 {
            eprintln!(
                "note: no vDSO here (qemu-user?); the relative-pointer case is not exercised"
            );
            return;
        }
        let o = object_at(base).expect("the vDSO is listed by dl_iterate_phdr");
        assert!(o.contains(o.symtab) && o.contains(o.strtab));
        #[cfg(target_arch = "x86_64")]
        assert!(defines(&o, b"__vdso_clock_gettime"));
        #[cfg(target_arch = "aarch64")]
        assert!(defines(&o, b"__kernel_clock_gettime"));
        assert!(!defines(&o, b"getpid"));
    }

    /// The tests that load libraries or count on none being loaded, one at a time.
    static LOADING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn a_second_call_without_new_objects_walks_nothing() {
        let _serial = LOADING.lock();
        let b = BoundObjects::new();
        assert!(matches!(bind_with(&b), Ok(Some(_))));
        assert!(b.valid.load(Ordering::Relaxed));
        assert_eq!(bind_with(&b), Ok(None));
    }

    /// A library loaded since the last walk changes the debugger's list, so the next call
    /// walks; unloaded again, the list is back to what it was.
    #[test]
    fn loading_a_library_makes_the_next_call_walk() {
        let _serial = LOADING.lock();
        let b = BoundObjects::new();
        assert!(matches!(bind_with(&b), Ok(Some(_))));
        let before = loaded_objects().expect("no dlopen in flight");
        // libdl is an empty compatibility library since glibc 2.34: loading it runs nothing.
        // SAFETY: a NUL-terminated name.
        let h = unsafe { libc::dlopen(c"libdl.so.2".as_ptr(), libc::RTLD_LAZY) };
        assert!(!h.is_null(), "cannot load libdl.so.2");
        let during = loaded_objects().expect("no dlopen in flight");
        let walked = bind_with(&b);
        // SAFETY: the handle dlopen returned, used no more.
        unsafe { libc::dlclose(h) };
        assert_ne!(during, before, "libdl.so.2 was loaded already");
        assert_eq!(during.1, before.1 + 1);
        assert!(matches!(walked, Ok(Some(_))));
        assert_eq!(loaded_objects(), Some(before));
    }
}
