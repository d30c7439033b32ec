//! libmemsnap's own writable segments in a Mach-O image, read from its load commands.
//!
//! The macOS counterpart of `linux/own_object.rs`: loaded as a dylib, libmemsnap's
//! `__DATA` segments (its statics, and dyld's lazy pointers for its imports, which dyld
//! writes at a first call) are the library's state, so they are left out of tracking by
//! construction. Pure: the load commands come in as bytes, so the reader is tested on
//! Linux and under Miri with crafted images.

/// `MH_MAGIC_64`: a 64-bit Mach-O header in the host's byte order.
const MH_MAGIC_64: u32 = 0xfeed_facf;
/// `LC_SEGMENT_64`.
const LC_SEGMENT_64: u32 = 0x19;
/// `VM_PROT_WRITE`.
const VM_PROT_WRITE: u32 = 0x2;
/// `sizeof(struct mach_header_64)`.
const HEADER: usize = 32;
/// `sizeof(struct segment_command_64)` up to and including `initprot`.
const SEGMENT: usize = 64;

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u64_at(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_ne_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The size of the header and load commands of the image whose first bytes are `head`
/// (at least [`HEADER`] of them), or `None` if it is not a 64-bit Mach-O image.
pub fn commands_end(head: &[u8]) -> Option<usize> {
    if u32_at(head, 0)? != MH_MAGIC_64 {
        return None;
    }
    Some(HEADER + u32_at(head, 20)? as usize)
}

/// Calls `f(start, end)` for each segment of the image that is writable when mapped
/// (`initprot` has write), as addresses in memory. `image` holds the header and load
/// commands ([`commands_end`] bytes); `loaded_at` is the header's address. The slide is
/// the header's address less the `__TEXT` segment's `vmaddr` (the segment that maps file
/// offset 0, which holds the header). `None`: malformed commands, and nothing is called.
pub fn for_each_writable_segment(
    image: &[u8],
    loaded_at: usize,
    mut f: impl FnMut(usize, usize),
) -> Option<()> {
    let end = commands_end(image)?;
    let count = u32_at(image, 16)? as usize;
    // Two passes: the slide first (from the segment at file offset 0), then the segments.
    let mut slide = None;
    let mut segments = [(0u64, 0u64); 16];
    let mut n = 0;
    let mut at = HEADER;
    for _ in 0..count {
        let cmd = u32_at(image, at)?;
        let size = u32_at(image, at + 4)? as usize;
        if size < 8 || at + size > end {
            return None;
        }
        if cmd == LC_SEGMENT_64 {
            if size < SEGMENT {
                return None;
            }
            let vmaddr = u64_at(image, at + 24)?;
            let vmsize = u64_at(image, at + 32)?;
            let fileoff = u64_at(image, at + 40)?;
            let filesize = u64_at(image, at + 48)?;
            let initprot = u32_at(image, at + 60)?;
            if fileoff == 0 && filesize > 0 {
                slide = Some((loaded_at as u64).wrapping_sub(vmaddr));
            }
            if initprot & VM_PROT_WRITE != 0 && vmsize > 0 {
                *segments.get_mut(n)? = (vmaddr, vmsize);
                n += 1;
            }
        }
        at += size;
    }
    let slide = slide?;
    for &(vmaddr, vmsize) in &segments[..n] {
        let start = vmaddr.wrapping_add(slide) as usize;
        f(start, start.checked_add(vmsize as usize)?);
    }
    Some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header and segment commands: (name, vmaddr, vmsize, fileoff, filesize, initprot).
    fn image(segments: &[(&str, u64, u64, u64, u64, u32)]) -> Vec<u8> {
        let mut cmds = Vec::new();
        for &(name, vmaddr, vmsize, fileoff, filesize, initprot) in segments {
            let mut c = Vec::new();
            c.extend_from_slice(&LC_SEGMENT_64.to_ne_bytes());
            c.extend_from_slice(&72u32.to_ne_bytes());
            let mut segname = [0u8; 16];
            segname[..name.len()].copy_from_slice(name.as_bytes());
            c.extend_from_slice(&segname);
            for v in [vmaddr, vmsize, fileoff, filesize] {
                c.extend_from_slice(&v.to_ne_bytes());
            }
            c.extend_from_slice(&initprot.to_ne_bytes()); // maxprot
            c.extend_from_slice(&initprot.to_ne_bytes()); // initprot
            c.extend_from_slice(&0u32.to_ne_bytes()); // nsects
            c.extend_from_slice(&0u32.to_ne_bytes()); // flags
            assert_eq!(c.len(), 72);
            cmds.extend_from_slice(&c);
        }
        let mut b = Vec::new();
        for v in [MH_MAGIC_64, 0x0100_000c, 0, 6] {
            b.extend_from_slice(&v.to_ne_bytes()); // magic, cputype, cpusubtype, MH_DYLIB
        }
        b.extend_from_slice(&(segments.len() as u32).to_ne_bytes());
        b.extend_from_slice(&(cmds.len() as u32).to_ne_bytes());
        b.extend_from_slice(&0u32.to_ne_bytes()); // flags
        b.extend_from_slice(&0u32.to_ne_bytes()); // reserved
        b.extend_from_slice(&cmds);
        b
    }

    const R: u32 = 1;
    const RW: u32 = 3;
    const RX: u32 = 5;

    #[test]
    fn writable_segments_slid_to_where_the_image_is() {
        let b = image(&[
            ("__TEXT", 0, 0x8000, 0, 0x8000, RX),
            ("__DATA_CONST", 0x8000, 0x4000, 0x8000, 0x4000, RW),
            ("__DATA", 0xc000, 0x4000, 0xc000, 0x1000, RW),
            ("__LINKEDIT", 0x10000, 0x4000, 0x10000, 0x3000, R),
        ]);
        assert_eq!(commands_end(&b), Some(b.len()));
        let mut got = Vec::new();
        for_each_writable_segment(&b, 0x1_0000_0000, |s, e| got.push((s, e))).unwrap();
        assert_eq!(
            got,
            vec![
                (0x1_0000_8000, 0x1_0000_c000),
                (0x1_0000_c000, 0x1_0001_0000)
            ]
        );
    }

    #[test]
    fn a_text_segment_at_a_nonzero_vmaddr_sets_the_slide() {
        // Executables put __PAGEZERO first and __TEXT at 4 GiB.
        let b = image(&[
            ("__PAGEZERO", 0, 0x1_0000_0000, 0, 0, 0),
            ("__TEXT", 0x1_0000_0000, 0x4000, 0, 0x4000, RX),
            ("__DATA", 0x1_0000_4000, 0x4000, 0x4000, 0x4000, RW),
        ]);
        let mut got = Vec::new();
        for_each_writable_segment(&b, 0x1_2340_0000, |s, e| got.push((s, e))).unwrap();
        assert_eq!(got, vec![(0x1_2340_4000, 0x1_2340_8000)]);
    }

    #[test]
    fn malformed_commands_report_nothing() {
        let mut b = image(&[
            ("__TEXT", 0, 0x4000, 0, 0x4000, RX),
            ("__DATA", 0x4000, 0x4000, 0x4000, 0x4000, RW),
        ]);
        // A command size that runs past the commands.
        b[HEADER + 4..HEADER + 8].copy_from_slice(&4096u32.to_ne_bytes());
        let mut n = 0;
        assert_eq!(
            for_each_writable_segment(&b, 0x1000_0000, |_, _| n += 1),
            None
        );
        assert_eq!(n, 0);
        // Not a 64-bit Mach-O header.
        assert_eq!(commands_end(&[0u8; 32]), None);
        // No segment maps the header: the slide is unknown.
        let b = image(&[("__DATA", 0x4000, 0x4000, 0x4000, 0x4000, RW)]);
        assert_eq!(
            for_each_writable_segment(&b, 0x1000_0000, |_, _| n += 1),
            None
        );
        assert_eq!(n, 0);
    }
}
