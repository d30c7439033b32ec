//! Memory the library maps for itself. Nothing here calls the global allocator: every
//! container is a fixed-capacity view over an anonymous reservation that the kernel
//! commits lazily, so capacity costs address space, not memory. Every reservation is
//! reported to the engine, which keeps it out of tracking.

mod pool;
mod raw_vec;

pub use pool::{FreeChain, PageState, PageTable, SlotPool};
pub use raw_vec::{DirtyLog, RawVec};

/// A reservation made by this module: `[base, base + len)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reservation {
    pub base: usize,
    pub len: usize,
}

/// Rounds `n` up to a multiple of the power of two `align`; `None` on overflow.
#[inline]
pub fn round_up(n: usize, align: usize) -> Option<usize> {
    Some(n.checked_add(align - 1)? & !(align - 1))
}
