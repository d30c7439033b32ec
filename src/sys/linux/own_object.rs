//! libmemsnap's own writable segments.
//!
//! Loaded as a shared library, libmemsnap's statics (its `.data` and `.bss`, and those of
//! the Rust runtime linked into it) are the library's state, not the host's: the fault
//! path, the `sigaltstack` table and the probe results live there. Left in tracked memory
//! they would be write-protected after the first snapshot (a static written by the fault
//! path faults again inside the handler) and rewound with the host's memory (a signal stack
//! registered after a checkpoint is forgotten by a rewind to it). So the writable segments
//! of the object holding this code are memsnap's own memory by construction, whatever
//! statics are added later. Linked into the program itself (the rlib, as the Rust tests
//! use it) its statics cannot be told from the program's, and stay tracked like them.

use core::ffi::{c_int, c_void};

/// At most this many writable segments are reported; an ELF object has one or two.
const MAX: usize = 4;

struct Found {
    /// An address inside libmemsnap's code.
    marker: usize,
    /// Objects visited so far (the first is the program itself).
    seen: usize,
    segments: [(usize, usize); MAX],
    n: usize,
}

/// Calls `f(start, end)` for each writable `PT_LOAD` segment of the shared object that
/// holds memsnap's code, widened to kernel pages (`page`); nothing when memsnap is part of
/// the program. Takes ld.so's lock (through `dl_iterate_phdr`): call it before the first
/// snapshot, when ld.so's data is not yet protected.
pub fn for_each_writable_segment(page: usize, mut f: impl FnMut(usize, usize)) {
    let mut found = Found {
        marker: visit as *const () as usize,
        seen: 0,
        segments: [(0, 0); MAX],
        n: 0,
    };
    // SAFETY: the callback matches dl_iterate_phdr's contract and `found` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(visit), (&mut found as *mut Found).cast::<c_void>()) };
    for &(start, end) in &found.segments[..found.n] {
        let lo = start & !(page - 1);
        let hi = end.next_multiple_of(page);
        if lo < hi {
            f(lo, hi);
        }
    }
}

/// dl_iterate_phdr's callback: nonzero stops the walk.
unsafe extern "C" fn visit(
    info: *mut libc::dl_phdr_info,
    _size: usize,
    data: *mut c_void,
) -> c_int {
    // SAFETY: `data` is the Found `for_each_writable_segment` passed; `info` is valid for
    // the duration of the callback.
    let (found, info) = unsafe { (&mut *data.cast::<Found>(), &*info) };
    let program = found.seen == 0;
    found.seen += 1;
    let bias = info.dlpi_addr as usize;
    // SAFETY: dl_iterate_phdr passes dlpi_phnum program headers at dlpi_phdr.
    let headers = unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
    let holds_marker = headers.iter().any(|ph| {
        let start = bias.wrapping_add(ph.p_vaddr as usize);
        ph.p_type == libc::PT_LOAD
            && start <= found.marker
            && found.marker < start.wrapping_add(ph.p_memsz as usize)
    });
    if !holds_marker {
        return 0;
    }
    if !program {
        for ph in headers {
            if ph.p_type == libc::PT_LOAD && ph.p_flags & libc::PF_W != 0 && found.n < MAX {
                let start = bias.wrapping_add(ph.p_vaddr as usize);
                found.segments[found.n] = (start, start.wrapping_add(ph.p_memsz as usize));
                found.n += 1;
            }
        }
    }
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unit tests link memsnap into the test program: its statics are the program's, and
    /// none may be reported (they would hide the program's own globals from tracking).
    #[test]
    fn nothing_when_linked_into_the_program() {
        let mut n = 0;
        for_each_writable_segment(4096, |_, _| n += 1);
        assert_eq!(n, 0);
    }
}
