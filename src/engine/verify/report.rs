//! What the verifying mode says when a page differs: the range, its mapping, and why
//! memsnap did or did not restore it.

use super::super::ranges::Range;
use super::super::{Engine, Meta};
use crate::sys::{Region, RegionKind};

fn perms(v: &Region) -> [u8; 4] {
    [
        if v.read { b'r' } else { b'-' },
        if v.write { b'w' } else { b'-' },
        if v.exec { b'x' } else { b'-' },
        if v.private { b'p' } else { b's' },
    ]
}

fn kind_name(k: RegionKind) -> &'static str {
    match k {
        RegionKind::Anonymous => "anonymous",
        RegionKind::Heap => "brk heap",
        RegionKind::MainStack => "main stack",
        RegionKind::Kernel => "kernel",
        RegionKind::File => "file",
    }
}

/// A run of adjacent mismatching pages of one mapping.
#[derive(Clone, Copy)]
pub(super) struct Mismatch {
    pub(super) range: Range,
    pub(super) vma: usize,
    /// Whether the pages were observable at the checkpoint (and read differently), or
    /// not (and are not zero now).
    pub(super) seen: bool,
    /// Partly excluded pages (compared without their excluded bytes).
    pub(super) masked: bool,
}

impl Engine {
    #[cold]
    pub(super) fn verify_failed(
        &self,
        function: &str,
        m: &Meta,
        v: &Region,
        f: Mismatch,
        bad_pages: usize,
        target: usize,
    ) -> ! {
        let r = f.range;
        let mut why = Why::Neither;
        if let Some(i) = m.region_index(r.start).filter(|_| !f.masked) {
            let t = m.regions[i];
            why = Why::Tracked(t.range, if t.uffd { "userfaultfd" } else { "mprotect" });
        } else {
            // A page read despite an exclusion is one the exclusions cover only partly
            // (memsnap copies such pages eagerly): name the first exclusion on it.
            self.verify_exclusions(m, |x, reason| {
                if matches!(why, Why::Neither) && x.intersects(&r) {
                    why = Why::PartlyExcluded(x, reason);
                }
            });
        }
        let perms = perms(v);
        crate::fatal!(
            function,
            "verify: {:#x}-{:#x} ({} of {} mismatching pages) {} checkpoint {}; mapping {:#x}-{:#x} {} {}; {}",
            r.start,
            r.end,
            r.len() / self.settings.sub,
            bad_pages,
            if f.seen {
                "differs from"
            } else {
                "is not zero but was not observable at"
            },
            target + 1,
            v.start,
            v.end,
            core::str::from_utf8(&perms).unwrap_or("????"),
            kind_name(v.kind),
            why
        )
    }
}

/// Why a mismatching range was or was not tracked, for the message.
enum Why {
    Tracked(Range, &'static str),
    PartlyExcluded(Range, &'static str),
    Neither,
}

impl core::fmt::Display for Why {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Why::Tracked(r, how) => {
                write!(f, "tracked (region {:#x}-{:#x}, {})", r.start, r.end, how)
            }
            Why::PartlyExcluded(r, reason) => write!(
                f,
                "partly excluded, copied eagerly ({:#x}-{:#x} is {})",
                r.start, r.end, reason
            ),
            Why::Neither => f.write_str("neither tracked nor excluded"),
        }
    }
}
