//! The userfaultfd types the engine names on every platform: the mode, the probe's answer
//! and the fault server's counters. The Linux backend (`linux/uffd/`, `linux/pagemap.rs`)
//! implements them; the macOS stubs (`macos/mod.rs`) report userfaultfd unsupported with
//! the same signatures, so the engine compiles one way everywhere. Once the engine's
//! userfaultfd code is Linux-only, these belong under `linux/uffd/` and the stubs go.

use core::sync::atomic::AtomicU64;

/// The userfaultfd write-protection mode a userfaultfd is opened in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UffdMode {
    /// Every write to an armed page stops the writer until the fault server disarms it.
    Sync,
    /// Writes disarm the page themselves; PAGEMAP_SCAN reports them afterwards.
    Async,
}

/// What the kernel and our privileges allow; probed once (before the first snapshot), cached.
#[derive(Clone, Copy, Debug)]
pub struct UffdSupport {
    /// Ok, or a short reason.
    pub sync: Result<(), &'static str>,
    pub async_wp: Result<(), &'static str>,
    /// Only user-mode faults can be caught (UFFD_USER_MODE_ONLY was needed): kernel writes
    /// into protected pages fail with EFAULT in sync mode.
    pub user_mode_only: bool,
    /// What UFFDIO_API offered (0 when no userfaultfd could be opened).
    pub features: u64,
}

/// Counters the server loop updates (the engine owns the memory).
#[derive(Default)]
pub struct UffdCounters {
    /// Write-protect faults delivered to `on_fault`.
    pub faults: AtomicU64,
    /// `poll()` returns: the server had gone to sleep and was woken.
    pub wakeups: AtomicU64,
    /// Messages found by a non-blocking read while spinning, without sleeping first.
    pub spin_hits: AtomicU64,
    /// Messages `on_fault` declined (or that were not write-protect faults); their pages
    /// were disarmed by the server.
    pub foreign: AtomicU64,
}
