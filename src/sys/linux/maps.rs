//! Parsing `/proc/self/maps` without allocating.
//!
//! The parser walks a byte buffer the caller filled (in library-owned memory) and yields one
//! [`Vma`] per line. It is pure: reading the file is the caller's job, so the parser can be
//! tested on literal text.

/// What kind of object backs a mapping, as far as the snapshot policy cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backing {
    /// Anonymous memory without a name.
    Anonymous,
    /// The brk heap (`[heap]`).
    Heap,
    /// The initial thread's stack (`[stack]`).
    Stack,
    /// Kernel-provided pages (`[vdso]`, `[vvar]`, `[vsyscall]`, ...): never tracked.
    Kernel,
    /// A file mapping.
    File,
    /// Any other bracketed name (`[anon:...]` and the like): treated as anonymous.
    OtherNamed,
}

/// One line of `/proc/self/maps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Vma {
    pub start: usize,
    pub end: usize,
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    /// `p` (private, copy-on-write) rather than `s` (shared).
    pub private: bool,
    pub backing: Backing,
}

/// Iterates over the mappings described by the text in `buf`.
pub struct MapsIter<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> MapsIter<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        MapsIter { buf, pos: 0 }
    }
}

fn hex(field: &[u8]) -> Option<usize> {
    if field.is_empty() || field.len() > 16 {
        return None;
    }
    let mut v: usize = 0;
    for &c in field {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        v = (v << 4) | d as usize;
    }
    Some(v)
}

/// What backs a mapping, from its name as `/proc/self/maps` shows it (none for plain
/// anonymous memory) and whether it has an inode.
pub fn classify(name: Option<&[u8]>, has_inode: bool) -> Backing {
    match name {
        _ if has_inode => Backing::File,
        None | Some(b"") => Backing::Anonymous,
        Some(b"[heap]") => Backing::Heap,
        Some(b"[stack]") => Backing::Stack,
        Some(b"[vdso]") | Some(b"[vvar]") | Some(b"[vsyscall]") | Some(b"[vectors]")
        | Some(b"[sigpage]") | Some(b"[uprobes]") => Backing::Kernel,
        Some(p) if p.starts_with(b"[vvar") => Backing::Kernel,
        Some(p) if p.starts_with(b"[") => Backing::OtherNamed,
        // A path without an inode is unusual; it is still a file.
        Some(_) => Backing::File,
    }
}

fn parse_line(line: &[u8]) -> Option<Vma> {
    let mut fields = line
        .split(|&c| c == b' ' || c == b'\t')
        .filter(|f| !f.is_empty());
    let range = fields.next()?;
    let dash = range.iter().position(|&c| c == b'-')?;
    let start = hex(&range[..dash])?;
    let end = hex(&range[dash + 1..])?;
    let perms = fields.next()?;
    if perms.len() < 4 || end <= start {
        return None;
    }
    let _offset = fields.next()?;
    let _dev = fields.next()?;
    let inode = fields.next()?;
    let backing = classify(fields.next(), inode != b"0");
    Some(Vma {
        start,
        end,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        private: perms[3] == b'p',
        backing,
    })
}

impl Iterator for MapsIter<'_> {
    type Item = Vma;

    fn next(&mut self) -> Option<Vma> {
        while self.pos < self.buf.len() {
            let rest = &self.buf[self.pos..];
            let len = rest.iter().position(|&c| c == b'\n').unwrap_or(rest.len());
            self.pos += len + 1;
            if let Some(vma) = parse_line(&rest[..len]) {
                return Some(vma);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &[u8] = b"\
55d0c4a00000-55d0c4a02000 r--p 00000000 08:01 1234                       /usr/bin/cat
55d0c4a02000-55d0c4a07000 r-xp 00002000 08:01 1234                       /usr/bin/cat
55d0c4a0b000-55d0c4a0c000 rw-p 0000a000 08:01 1234                       /usr/bin/cat
55d0c5e3e000-55d0c5e5f000 rw-p 00000000 00:00 0                          [heap]
7f1c2a000000-7f1c2a021000 rw-p 00000000 00:00 0 
7f1c2a021000-7f1c2e000000 ---p 00000000 00:00 0 
7f1c2e400000-7f1c2e401000 rw-s 00000000 00:05 99                         /dev/zero (deleted)
7ffd3a1d2000-7ffd3a1f3000 rw-p 00000000 00:00 0                          [stack]
7ffd3a1f8000-7ffd3a1fc000 r--p 00000000 00:00 0                          [vvar]
7ffd3a1fc000-7ffd3a1fe000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
";

    #[test]
    fn parses_every_line_with_perms_and_backing() {
        let v: Vec<Vma> = MapsIter::new(SAMPLE).collect();
        assert_eq!(v.len(), 11);
        assert_eq!(v[0].start, 0x55d0c4a00000);
        assert_eq!(v[0].end, 0x55d0c4a02000);
        assert!(v[0].read && !v[0].write && !v[0].exec && v[0].private);
        assert_eq!(v[0].backing, Backing::File);
        assert!(v[2].write);
        assert_eq!(v[3].backing, Backing::Heap);
        assert_eq!(v[4].backing, Backing::Anonymous);
        assert!(!v[5].read && !v[5].write);
        assert!(!v[6].private && v[6].write);
        assert_eq!(v[7].backing, Backing::Stack);
        assert_eq!(v[8].backing, Backing::Kernel);
        assert_eq!(v[9].backing, Backing::Kernel);
        assert_eq!(v[10].start, 0xffffffffff600000);
        assert_eq!(v[10].backing, Backing::Kernel);
    }

    #[test]
    fn skips_garbage_and_truncated_lines() {
        let text =
            b"not a line\n10-20 rw-p 0 0:0 0\nzz-30 rw-p 0 0:0 0\n30-20 rw-p 0 0:0 0\n40-50 rw";
        let v: Vec<Vma> = MapsIter::new(text).collect();
        assert_eq!(v.len(), 1);
        assert_eq!((v[0].start, v[0].end), (0x10, 0x20));
    }

    #[test]
    fn classifies_names() {
        assert_eq!(classify(None, false), Backing::Anonymous);
        assert_eq!(classify(Some(b""), false), Backing::Anonymous);
        assert_eq!(classify(Some(b"[heap]"), false), Backing::Heap);
        assert_eq!(classify(Some(b"[stack]"), false), Backing::Stack);
        assert_eq!(classify(Some(b"[vvar_vclock]"), false), Backing::Kernel);
        assert_eq!(classify(Some(b"[anon:glibc]"), false), Backing::OtherNamed);
        assert_eq!(classify(Some(b"/memfd:x (deleted)"), true), Backing::File);
        // With an inode, the name does not matter (PROCMAP_QUERY does not fetch it).
        assert_eq!(classify(None, true), Backing::File);
    }

    #[test]
    fn tolerates_missing_final_newline() {
        let v: Vec<Vma> = MapsIter::new(b"1000-2000 rw-p 0 0:0 0 [heap]").collect();
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].backing, Backing::Heap);
    }
}
