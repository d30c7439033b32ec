//! The memory budget (`memsnap_set_memory_budget`, `MEMSNAP_MEMORY_BUDGET`): a bound on
//! memsnap's own memory beyond the saved pre-images, which the automatic backend choice
//! respects.
//!
//! The async userfaultfd mode keeps a base copy of every resident tracked page, as much
//! memory again as the tracked heap; the other backends keep tables of a few percent. So
//! under a budget, `auto` picks the async mode only when the base copy it would take fits:
//! estimated before anything is tracked as the process's resident private memory (whole
//! process) or the registered ranges' total (registered-only), an upper bound either way.
//! A backend asked for by name is used as asked.

use core::sync::atomic::{AtomicUsize, Ordering};

use super::{Engine, Mode};

/// No budget.
const NONE: usize = usize::MAX;

/// A budget set before `InitializeMemorySnapshots` (`NONE`: none).
static REQUESTED: AtomicUsize = AtomicUsize::new(NONE);

/// Records a budget in bytes (0: none).
pub fn request(bytes: usize) {
    REQUESTED.store(if bytes == 0 { NONE } else { bytes }, Ordering::Relaxed);
}

/// The budget set by `memsnap_set_memory_budget`, else `MEMSNAP_MEMORY_BUDGET` (bytes,
/// or with a k, m or g suffix), else none.
pub(super) fn initial(function: &str) -> usize {
    let asked = REQUESTED.load(Ordering::Relaxed);
    if asked != NONE {
        return asked;
    }
    let Some(text) = super::env(c"MEMSNAP_MEMORY_BUDGET") else {
        return NONE;
    };
    match parse_bytes(text) {
        Some(0) => NONE,
        Some(n) => n,
        None => crate::fatal!(
            function,
            "MEMSNAP_MEMORY_BUDGET: not a number of bytes (e.g. 268435456, 256m or 1g)"
        ),
    }
}

/// Parses `4096`, `64k`, `256m` or `2g` (either case).
pub fn parse_bytes(text: &[u8]) -> Option<usize> {
    let (digits, scale) = match text.last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 1usize << 10),
        b'm' | b'M' => (&text[..text.len() - 1], 1 << 20),
        b'g' | b'G' => (&text[..text.len() - 1], 1 << 30),
        _ => (text, 1),
    };
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let mut n = 0usize;
    for &d in digits {
        n = n.checked_mul(10)?.checked_add((d - b'0') as usize)?;
    }
    n.checked_mul(scale)
}

/// Whether a base copy of `estimate` bytes fits `budget` (`NONE`: always).
pub fn base_copy_fits(budget: usize, estimate: Option<usize>) -> bool {
    // Without an estimate, a budget rules the async mode out: it could double the heap.
    budget == NONE || estimate.is_some_and(|e| e <= budget)
}

impl Engine {
    pub fn set_memory_budget(&self, bytes: usize) -> bool {
        if self.phase() != super::Phase::Initialized {
            return false;
        }
        self.budget
            .store(if bytes == 0 { NONE } else { bytes }, Ordering::Relaxed);
        true
    }

    /// The budget in bytes, if one is set.
    pub fn memory_budget(&self) -> Option<usize> {
        let b = self.budget.load(Ordering::Relaxed);
        (b != NONE).then_some(b)
    }

    /// Whether the async mode's base copy would fit the budget (see the module comment).
    pub(super) fn async_fits_budget(&self) -> bool {
        let budget = self.budget.load(Ordering::Relaxed);
        if budget == NONE {
            return true;
        }
        let estimate = match self.mode() {
            Mode::WholeProcess => crate::sys::resident_private_bytes(),
            Mode::Registered => {
                let m = self.meta.lock();
                Some(m.registered.iter().map(|r| r.range.len()).sum())
            }
        };
        base_copy_fits(budget, estimate)
    }
}

#[cfg(test)]
mod tests {
    use super::{base_copy_fits, parse_bytes, NONE};

    #[test]
    fn budget_sizes_parse() {
        assert_eq!(parse_bytes(b"4096"), Some(4096));
        assert_eq!(parse_bytes(b"64k"), Some(64 << 10));
        assert_eq!(parse_bytes(b"256M"), Some(256 << 20));
        assert_eq!(parse_bytes(b"2g"), Some(2 << 30));
        assert_eq!(parse_bytes(b"g"), None);
        assert_eq!(parse_bytes(b"1.5g"), None);
        assert_eq!(parse_bytes(b"99999999999999999999g"), None);
    }

    #[test]
    fn base_copy_must_fit_a_budget() {
        assert!(base_copy_fits(NONE, None));
        assert!(base_copy_fits(NONE, Some(usize::MAX - 1)));
        assert!(base_copy_fits(1 << 30, Some(1 << 30)));
        assert!(!base_copy_fits(1 << 30, Some((1 << 30) + 1)));
        assert!(!base_copy_fits(1 << 30, None));
    }
}
