//! Configuration: the settings the host may give before `InitializeMemorySnapshots`,
//! through the `memsnap_set_*` calls or the environment (`MEMSNAP_PAGE_SIZE`,
//! `MEMSNAP_BACKEND`, `MEMSNAP_MEMORY_BUDGET`, `MEMSNAP_UFFD_SPIN_US`, `MEMSNAP_VERIFY`),
//! and the pure parsing of their values. Every environment read goes through [`env`].

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};

use super::backend::{BackendChoice, RequestedBackend};
use super::budget::NONE as NO_BUDGET;
use super::{get, granule};

/// A snapshot page size asked for with `memsnap_set_page_size` (0: none).
static REQUESTED_PAGE: AtomicUsize = AtomicUsize::new(0);

/// Why a snapshot page size cannot be used with kernel pages of `sub` bytes.
pub fn check_page_size(size: usize, sub: usize) -> Result<(), &'static str> {
    if !size.is_power_of_two() || size < sub {
        Err("must be a power of two and a multiple of the kernel page size")
    } else if size / sub > granule::MAX_SUBPAGES {
        Err("may span at most 16 kernel pages")
    } else {
        Ok(())
    }
}

/// Records the snapshot page size for `InitializeMemorySnapshots` to use.
pub fn request_page_size(size: usize) -> Result<(), &'static str> {
    if get().is_some() {
        return Err("InitializeMemorySnapshots has already run");
    }
    check_page_size(size, crate::sys::os_page_size())?;
    REQUESTED_PAGE.store(size, Ordering::Relaxed);
    Ok(())
}

/// The snapshot page: the one requested, else `MEMSNAP_PAGE_SIZE` from the environment,
/// else the kernel's page.
pub(super) fn snapshot_page_size(sub: usize) -> Result<usize, &'static str> {
    let requested = REQUESTED_PAGE.load(Ordering::Relaxed);
    if requested != 0 {
        return Ok(requested);
    }
    // Set but empty, as shells leave a variable they clear, counts as unset.
    let Some(text) = env(c"MEMSNAP_PAGE_SIZE") else {
        return Ok(sub);
    };
    let size = parse_size(text).ok_or("not a number of bytes (e.g. 16384 or 16k)")?;
    check_page_size(size, sub)?;
    Ok(size)
}

/// The text of environment variable `name`, if set and not empty.
pub(super) fn env(name: &core::ffi::CStr) -> Option<&'static [u8]> {
    // SAFETY: a NUL-terminated name; getenv neither allocates nor keeps the pointer.
    let v = unsafe { libc::getenv(name.as_ptr()) };
    if v.is_null() {
        return None;
    }
    // SAFETY: getenv returned a NUL-terminated string that lives as long as the
    // environment, which nothing changes during initialization.
    let text = unsafe { core::ffi::CStr::from_ptr(v) }.to_bytes();
    (!text.is_empty()).then_some(text)
}

/// A backend asked for with `memsnap_set_backend` before initialization.
static REQUESTED_BACKEND: RequestedBackend = RequestedBackend::none();

/// Records the backend for `InitializeMemorySnapshots` to use.
pub fn request_backend(b: BackendChoice) {
    REQUESTED_BACKEND.set(b);
}

/// The backend asked for: by `memsnap_set_backend`, else `MEMSNAP_BACKEND`, else auto.
pub(super) fn requested_backend(function: &str) -> BackendChoice {
    if let Some(asked) = REQUESTED_BACKEND.get() {
        return asked;
    }
    let Some(text) = env(c"MEMSNAP_BACKEND") else {
        return BackendChoice::Auto;
    };
    match BackendChoice::parse(text) {
        Some(b) => b,
        None => crate::fatal!(
            function,
            "MEMSNAP_BACKEND: expected auto, mprotect, uffd or uffd-async"
        ),
    }
}

/// `MEMSNAP_UFFD_SPIN_US`: how long the sync fault server polls before sleeping.
pub(super) fn spin_ns() -> Option<u64> {
    let text = env(c"MEMSNAP_UFFD_SPIN_US")?;
    parse_size(text).map(|us| us as u64 * 1000)
}

/// Parses `16384`, `16k` or `16K`.
fn parse_size(text: &[u8]) -> Option<usize> {
    let (digits, scale) = match text.last()? {
        b'k' | b'K' => (&text[..text.len() - 1], 1024),
        _ => (text, 1),
    };
    if digits.is_empty() {
        return None;
    }
    let mut n = 0usize;
    for &d in digits {
        if !d.is_ascii_digit() {
            return None;
        }
        n = n.checked_mul(10)?.checked_add((d - b'0') as usize)?;
    }
    n.checked_mul(scale)
}

/// A budget set before `InitializeMemorySnapshots` (`NO_BUDGET`: none).
static REQUESTED_BUDGET: AtomicUsize = AtomicUsize::new(NO_BUDGET);

/// Records a budget in bytes (0: none).
pub fn request_memory_budget(bytes: usize) {
    REQUESTED_BUDGET.store(
        if bytes == 0 { NO_BUDGET } else { bytes },
        Ordering::Relaxed,
    );
}

/// The budget set by `memsnap_set_memory_budget`, else `MEMSNAP_MEMORY_BUDGET` (bytes,
/// or with a k, m or g suffix), else none.
pub(super) fn initial_memory_budget(function: &str) -> usize {
    let asked = REQUESTED_BUDGET.load(Ordering::Relaxed);
    if asked != NO_BUDGET {
        return asked;
    }
    let Some(text) = env(c"MEMSNAP_MEMORY_BUDGET") else {
        return NO_BUDGET;
    };
    match parse_bytes(text) {
        Some(0) => NO_BUDGET,
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

/// The engine's settings: sizes and layouts fixed at initialization, and the choices the
/// host may change until the first snapshot (the atomics).
pub struct Settings {
    /// The snapshot page: the unit of tracking, copying and restoring.
    pub page: usize,
    pub page_shift: u32,
    /// The kernel's page, which may be smaller than the snapshot page (see `granule`).
    pub sub: usize,
    /// How much of the process is tracked (0: whole process, 1: registered only).
    pub(super) mode: AtomicU32,
    pub(super) restore_threads: AtomicUsize,
    pub(super) pin_allocator: AtomicBool,
    /// The memory budget in bytes (`usize::MAX`: none; see `budget`).
    pub(super) budget: AtomicUsize,
    /// Mappings the process may have before `mprotect` fails (0: no limit).
    pub(super) map_limit: usize,
    /// glibc's rseq layout, looked up at initialization.
    pub(super) rseq: Option<(isize, usize)>,
    /// Where glibc keeps its thread descriptors (`None`: not glibc 2.34+, or not Linux).
    pub threads: Option<crate::sys::ThreadLayout>,
}

#[cfg(test)]
mod tests {
    use super::{check_page_size, parse_bytes, parse_size};

    #[test]
    fn page_size_settings() {
        assert_eq!(parse_size(b"16384"), Some(16384));
        assert_eq!(parse_size(b"16k"), Some(16384));
        assert_eq!(parse_size(b"64K"), Some(65536));
        assert_eq!(parse_size(b"k"), None);
        assert_eq!(parse_size(b"16 k"), None);
        assert_eq!(parse_size(b"99999999999999999999999"), None);
        assert!(check_page_size(16384, 4096).is_ok());
        assert!(check_page_size(4096, 4096).is_ok());
        assert!(check_page_size(65536, 4096).is_ok());
        assert!(check_page_size(1 << 17, 4096).is_err());
        assert!(check_page_size(2048, 4096).is_err());
        assert!(check_page_size(12288, 4096).is_err());
        assert!(check_page_size(16384, 16384).is_ok());
    }

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
}
