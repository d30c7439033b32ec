//! Helpers for the Linux unit tests that arm memory (userfaultfd, PAGEMAP_SCAN): fresh
//! mappings, volatile pokes, running a test body in a forked child, and skipping a test
//! where the kernel lacks what it needs.

use super::pagemap::scan_written;
use super::raw;
use super::uffd::uffd_support;
use crate::sys::{PagemapFd, UffdMode};

pub(super) fn page() -> usize {
    super::os_page_size()
}

/// `n` fresh read-write anonymous pages, without transparent huge pages (so that one
/// write populates one page).
pub(super) fn map(n: usize) -> usize {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            n * page(),
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: advice on our own mapping.
    unsafe { libc::madvise(p, n * page(), libc::MADV_NOHUGEPAGE) };
    p as usize
}

pub(super) fn poke(addr: usize, v: u8) {
    // SAFETY: callers pass addresses in mappings of their own.
    unsafe { core::ptr::write_volatile(addr as *mut u8, v) }
}

pub(super) fn peek(addr: usize) -> u8 {
    // SAFETY: as for `poke`.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

/// Runs `f` in a forked child (write protection must not reach the test runner) and
/// asserts that it succeeded. The child reports panics on the real stderr, since
/// libtest's capture does not survive the fork.
pub(super) fn in_child(f: impl FnOnce()) {
    // SAFETY: the child runs only `f` and then _exits.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        std::panic::set_hook(Box::new(|info| {
            let s = format!("{info}\n");
            raw::write(2, s.as_bytes());
        }));
        let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_ok();
        // SAFETY: ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(if ok { 0 } else { 1 }) };
    }
    let mut status = 0;
    // SAFETY: waits for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "child failed (status {status:#x})"
    );
}

/// Whether `mode` is available; where it is not, the test is skipped (see `skip`).
pub(super) fn available(mode: UffdMode) -> bool {
    let s = uffd_support();
    let r = match mode {
        UffdMode::Sync => s.sync,
        UffdMode::Async => s.async_wp,
    };
    match r {
        Ok(()) => true,
        Err(why) => {
            skip(why);
            false
        }
    }
}

/// Reports that the running test cannot run here, and why, before it returns early.
/// libtest has no skipped state and swallows a passing test's captured output, so the
/// line goes straight to file descriptor 2, naming the test (libtest names each test's
/// thread after it). Under CI=true the test fails instead: CI's kernel offers every
/// mechanism these tests need, so a skip there would hide a regression.
pub(super) fn skip(why: &str) {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or("a userfaultfd test");
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{name}: cannot run although CI=true: {why}");
    }
    raw::write(2, format!("test {name} ... skipped: {why}\n").as_bytes());
}

pub(super) fn runs_written(
    pm: PagemapFd,
    start: usize,
    end: usize,
    rearm: bool,
) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    scan_written(pm, start, end, rearm, |s, e| v.push((s, e))).expect("scan_written");
    v
}
