//! Unit tests of the ELF reading and of the walk, against the objects loaded in this test
//! process.

use super::elf::*;
use super::record::*;
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
        eprintln!("note: no vDSO here (qemu-user?); the relative-pointer case is not exercised");
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
