//! The userfaultfd types the engine names on every platform: the mode, the probe's answer,
//! the fault server's counters and the descriptors. The Linux backend (`linux/uffd/`, `linux/pagemap.rs`)
//! implements them; the macOS stubs (`macos/mod.rs`) report userfaultfd unsupported with
//! the same signatures, so the engine compiles one way everywhere. Once the engine's
//! userfaultfd code is Linux-only, these belong under `linux/uffd/` and the stubs go.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicI32, AtomicU64, Ordering};

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

/// An open userfaultfd (`uffd_open`). Its own type so that it cannot be passed where the
/// pagemap descriptor is expected, or the other way round; only `sys` makes one from a
/// number or reads the number back.
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UffdFd(i32);

/// An open /proc/self/pagemap (`pagemap_open`), for PAGEMAP_SCAN; see [`UffdFd`].
#[repr(transparent)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PagemapFd(i32);

impl UffdFd {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(in crate::sys) fn from_raw(fd: i32) -> Self {
        UffdFd(fd)
    }

    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(in crate::sys) fn raw(self) -> i32 {
        self.0
    }
}

impl PagemapFd {
    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(in crate::sys) fn from_raw(fd: i32) -> Self {
        PagemapFd(fd)
    }

    #[cfg_attr(not(target_os = "linux"), allow(dead_code))]
    pub(in crate::sys) fn raw(self) -> i32 {
        self.0
    }
}

/// A descriptor of type `F` kept where threads share it (the engine's state): an `i32` in
/// an atomic, typed so that a load gives back the kind of descriptor stored.
pub struct AtomicFd<F> {
    raw: AtomicI32,
    kind: PhantomData<F>,
}

impl<F> AtomicFd<F> {
    /// Holds no descriptor yet (-1: a call on it fails with EBADF).
    pub const fn empty() -> Self {
        AtomicFd {
            raw: AtomicI32::new(-1),
            kind: PhantomData,
        }
    }
}

impl AtomicFd<UffdFd> {
    pub fn load(&self, order: Ordering) -> UffdFd {
        UffdFd(self.raw.load(order))
    }

    pub fn store(&self, fd: UffdFd, order: Ordering) {
        self.raw.store(fd.0, order)
    }
}

impl AtomicFd<PagemapFd> {
    pub fn load(&self, order: Ordering) -> PagemapFd {
        PagemapFd(self.raw.load(order))
    }

    pub fn store(&self, fd: PagemapFd, order: Ordering) {
        self.raw.store(fd.0, order)
    }
}
