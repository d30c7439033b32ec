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

use core::sync::atomic::Ordering;

use super::{Engine, Mode};

/// No budget.
pub(super) const NONE: usize = usize::MAX;

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
        self.settings
            .budget
            .store(if bytes == 0 { NONE } else { bytes }, Ordering::Relaxed);
        true
    }

    /// The budget in bytes, if one is set.
    pub fn memory_budget(&self) -> Option<usize> {
        let b = self.settings.budget.load(Ordering::Relaxed);
        (b != NONE).then_some(b)
    }

    /// Whether the async mode's base copy would fit the budget (see the module comment).
    pub(super) fn async_fits_budget(&self) -> bool {
        let budget = self.settings.budget.load(Ordering::Relaxed);
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
    use super::{base_copy_fits, NONE};

    #[test]
    fn base_copy_must_fit_a_budget() {
        assert!(base_copy_fits(NONE, None));
        assert!(base_copy_fits(NONE, Some(usize::MAX - 1)));
        assert!(base_copy_fits(1 << 30, Some(1 << 30)));
        assert!(!base_copy_fits(1 << 30, Some((1 << 30) + 1)));
        assert!(!base_copy_fits(1 << 30, None));
    }
}
