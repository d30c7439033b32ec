//! Reading a loaded ELF object the way ld.so does: its program headers, dynamic section,
//! symbol and string tables, both symbol hash tables and its lazy relocations.

use core::ffi::CStr;

pub(super) const DT_NULL: i64 = 0;
pub(super) const DT_PLTRELSZ: i64 = 2;
pub(super) const DT_HASH: i64 = 4;
pub(super) const DT_STRTAB: i64 = 5;
pub(super) const DT_SYMTAB: i64 = 6;
pub(super) const DT_RELA: u64 = 7;
pub(super) const DT_STRSZ: i64 = 10;
pub(super) const DT_SYMBOLIC: i64 = 16;
pub(super) const DT_PLTREL: i64 = 20;
pub(super) const DT_JMPREL: i64 = 23;
pub(super) const DT_BIND_NOW: i64 = 24;
pub(super) const DT_FLAGS: i64 = 30;
pub(super) const DT_GNU_HASH: i64 = 0x6fff_fef5;
pub(super) const DT_FLAGS_1: i64 = 0x6fff_fffb;
pub(super) const DF_SYMBOLIC: u64 = 0x2;
pub(super) const DF_BIND_NOW: u64 = 0x8;
pub(super) const DF_1_NOW: u64 = 0x1;

pub(super) const STB_LOCAL: u8 = 0;
pub(super) const STB_GLOBAL: u8 = 1;
pub(super) const STB_WEAK: u8 = 2;
pub(super) const STT_FUNC: u8 = 2;
pub(super) const SHN_UNDEF: u16 = 0;

#[cfg(target_arch = "x86_64")]
pub(super) const R_JUMP_SLOT: u64 = 7; // R_X86_64_JUMP_SLOT
#[cfg(target_arch = "aarch64")]
pub(super) const R_JUMP_SLOT: u64 = 1026; // R_AARCH64_JUMP_SLOT

#[repr(C)]
pub(super) struct Dyn {
    pub(super) tag: i64,
    pub(super) val: u64,
}

#[repr(C)]
pub(super) struct Rela {
    pub(super) offset: u64,
    pub(super) info: u64,
    pub(super) addend: i64,
}

pub(super) type Sym = libc::Elf64_Sym;

/// One loaded object, as its program headers and dynamic section describe it. Every
/// address is absolute and lies in `[lo, hi)`.
#[derive(Default)]
pub(super) struct Object {
    pub(super) bias: usize,
    /// The span of its loadable segments.
    pub(super) lo: usize,
    pub(super) hi: usize,
    pub(super) symtab: usize,
    pub(super) strtab: usize,
    pub(super) strsz: usize,
    pub(super) gnu_hash: usize,
    pub(super) sysv_hash: usize,
    pub(super) jmprel: usize,
    pub(super) pltrelsz: usize,
    pub(super) rela: bool,
    /// Asks ld.so to bind everything at load (`-z now`): no slot is lazy.
    pub(super) eager: bool,
    /// Linked `-Bsymbolic`: its own definitions come before the global scope.
    pub(super) symbolic: bool,
}

impl Object {
    /// Reads the object `dl_iterate_phdr` describes; `None` without a dynamic section.
    ///
    /// # Safety
    /// `info` is what `dl_iterate_phdr` passed to its callback, used during the callback.
    pub(super) unsafe fn parse(info: &libc::dl_phdr_info) -> Option<Object> {
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

    pub(super) fn contains(&self, a: usize) -> bool {
        (self.lo..self.hi).contains(&a)
    }

    /// Symbol `i` of the dynamic symbol table.
    ///
    /// # Safety
    /// `i` is below the table's length (from a hash table or a relocation of this object).
    pub(super) unsafe fn sym(&self, i: usize) -> &Sym {
        // SAFETY: forwarded contract; the table is mapped with the object.
        unsafe { &*(self.symtab as *const Sym).add(i) }
    }

    /// The name of `sym`, empty when its offset is out of the string table.
    ///
    /// # Safety
    /// `sym` belongs to this object's symbol table.
    pub(super) unsafe fn name(&self, sym: &Sym) -> &[u8] {
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
    pub(super) unsafe fn for_each_hashed(&self, mut f: impl FnMut(usize)) {
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
    pub(super) unsafe fn gnu_tables(&self) -> (&[u32], usize, *const u32) {
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
    pub(super) unsafe fn defines(&self, name: &[u8], gnu: u32) -> bool {
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

pub(super) fn gnu_hash(name: &[u8]) -> u32 {
    name.iter()
        .fold(5381u32, |h, &c| h.wrapping_mul(33).wrapping_add(c as u32))
}

pub(super) fn sysv_hash(name: &[u8]) -> u32 {
    name.iter().fold(0u32, |h, &c| {
        let h = (h << 4).wrapping_add(c as u32);
        let g = h & 0xf000_0000;
        (h ^ (g >> 24)) & !g
    })
}
