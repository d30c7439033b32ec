//! The memory-level check of a rewind: a hash of the process's `[heap]` (glibc malloc's
//! main arena, where SQLite's pages live once memsnap has pinned the allocator) over the
//! extent it had at the checkpoint. After a rewind every tracked byte equals its
//! checkpoint, so the hash must too. It only reads memory, so it neither faults nor
//! dirties pages, and it allocates nothing (/proc/self/maps is read into a caller's
//! untracked buffer: the kernel cannot write write-protected pages).

/// The `[heap]` mapping's bounds, from /proc/self/maps read into `buf`.
pub fn heap_range(buf: &mut [u8]) -> Option<(usize, usize)> {
    // SAFETY: opening a NUL-terminated path, reading into a live buffer, closing our fd.
    let n = unsafe {
        let fd = libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return None;
        }
        let mut n = 0usize;
        while n < buf.len() {
            let r = libc::read(fd, buf.as_mut_ptr().add(n) as *mut _, buf.len() - n);
            if r <= 0 {
                break;
            }
            n += r as usize;
        }
        libc::close(fd);
        n
    };
    parse_heap_line(&buf[..n])
}

/// The `[heap]` line's `start-end` of a /proc/<pid>/maps text.
pub fn parse_heap_line(maps: &[u8]) -> Option<(usize, usize)> {
    let line = maps
        .split(|&b| b == b'\n')
        .find(|l| l.ends_with(b"[heap]"))?;
    let range = line.split(|&b| b == b' ').next()?;
    let dash = range.iter().position(|&b| b == b'-')?;
    let hex = |s: &[u8]| usize::from_str_radix(std::str::from_utf8(s).ok()?, 16).ok();
    Some((hex(&range[..dash])?, hex(&range[dash + 1..])?))
}

/// Hashes `len` bytes at `start` (both multiples of 8), four independent lanes so the
/// loop runs at memory speed.
///
/// # Safety
/// The range must be mapped and readable for the whole call.
pub unsafe fn hash_memory(start: usize, len: usize) -> u64 {
    // SAFETY: the caller guarantees the range is readable; it is 8-byte aligned.
    let words = unsafe { std::slice::from_raw_parts(start as *const u64, len / 8) };
    let mut lanes = [
        0x243f_6a88_85a3_08d3u64,
        0x1319_8a2e_0370_7344,
        0xa409_3822_299f_31d0,
        0x082e_fa98_ec4e_6c89,
    ];
    let mut chunks = words.chunks_exact(4);
    for c in &mut chunks {
        for (l, &w) in lanes.iter_mut().zip(c) {
            *l = (*l ^ w).wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29);
        }
    }
    let mut h = len as u64;
    for &w in chunks.remainder().iter().chain(&lanes) {
        h = (h ^ w).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        h ^= h >> 31;
    }
    h
}
