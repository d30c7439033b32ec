//! Tests of the userfaultfd calls, the probe and the sync fault server. Those that arm
//! memory run in a forked child, and skip (fail under CI=true) where the kernel lacks the
//! mode they need.

use core::mem::size_of;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use super::server::now_ns;
use super::uapi::*;
use super::*;
use crate::sys::linux::pagemap::{pagemap_open, scan_populated, scan_written};
use crate::sys::linux::raw;
use crate::sys::linux::testkit::{available, in_child, map, page, peek, poke, runs_written};
use crate::sys::{UffdCounters, UffdFd, UffdMode};

#[test]
fn uapi_numbers() {
    // The values the C headers give (linux/userfaultfd.h of Debian 12 for the older
    // ioctls).
    assert_eq!(UFFDIO_API, 0xc018_aa3f);
    assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
    assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
    assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
    assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
    assert_eq!(size_of::<UffdMsg>(), 32);
    assert_eq!(core::mem::offset_of!(UffdMsg, address), 16);
    assert_eq!(core::mem::offset_of!(UffdMsg, ptid), 24);
}

/// The probe's verdicts agree with the features and with what uffd_open does.
#[test]
fn probe_is_consistent() {
    let s = uffd_support();
    eprintln!("uffd support: {s:?}");
    if s.sync.is_ok() {
        assert_ne!(s.features & UFFD_FEATURE_PAGEFAULT_FLAG_WP, 0);
        uffd_close(uffd_open(UffdMode::Sync).expect("sync open"));
    }
    if s.async_wp.is_ok() {
        assert_ne!(s.features & UFFD_FEATURE_WP_ASYNC, 0);
        uffd_close(uffd_open(UffdMode::Async).expect("async open"));
    }
    if s.features & UFFD_FEATURE_WP_ASYNC != 0 {
        // Whatever offers WP_ASYNC (6.7) has PAGEMAP_SCAN: the probe must succeed.
        assert_eq!(s.async_wp, Ok(()));
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 && s.features != 0 {
        // Sync mode needs WP_UNPOPULATED (6.4); before it, the probe names that reason.
        if s.features & UFFD_FEATURE_WP_UNPOPULATED != 0 {
            assert_eq!(s.sync, Ok(()), "root on a kernel with userfaultfd");
        } else {
            let why = s.sync.expect_err("sync mode without WP_UNPOPULATED");
            assert!(why.contains("WP_UNPOPULATED"), "reason: {why}");
        }
        assert!(!s.user_mode_only, "root needs no UFFD_USER_MODE_ONLY");
    }
}

/// Sync mode only where a never-touched page, armed, is write-protected too: its
/// pagemap entry carries the uffd-wp bit (a PTE marker). On 5.10 and 6.1 (no
/// WP_UNPOPULATED) it did not, and the engine lost first writes to such pages.
#[test]
fn sync_mode_protects_untouched_pages() {
    if !available(UffdMode::Sync) {
        return;
    }
    in_child(|| {
        const PM_UFFD_WP: u64 = 1 << 57;
        let k = page();
        let base = map(2);
        let fd = uffd_open(UffdMode::Sync).unwrap();
        uffd_register(fd, base, 2 * k).unwrap();
        // SAFETY: the test's own mapping, in a forked child; never touched.
        unsafe { uffd_protect(fd, base, 2 * k, true) }.unwrap();
        let entry = {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = std::fs::File::open("/proc/self/pagemap").unwrap();
            f.seek(SeekFrom::Start((base / k * 8) as u64)).unwrap();
            let mut b = [0u8; 8];
            f.read_exact(&mut b).unwrap();
            u64::from_ne_bytes(b)
        };
        assert_ne!(
            entry & PM_UFFD_WP,
            0,
            "an armed, never-touched page is not write-protected (pagemap {entry:#x})"
        );
    });
}

#[test]
fn private_file_mappings_register_only_async() {
    if !available(UffdMode::Sync) || !available(UffdMode::Async) {
        return;
    }
    let k = page();
    let path = format!("/tmp/memsnap-uffd-test-{}\0", std::process::id());
    // SAFETY: a NUL-terminated path; the file is unlinked right away.
    let fd = unsafe {
        let fd = libc::open(
            path.as_ptr() as *const libc::c_char,
            libc::O_RDWR | libc::O_CREAT | libc::O_TRUNC,
            0o600,
        );
        assert!(fd >= 0);
        libc::unlink(path.as_ptr() as *const libc::c_char);
        assert_eq!(libc::ftruncate(fd, 4 * k as libc::off_t), 0);
        fd
    };
    // SAFETY: a fresh private mapping of the file.
    let p = unsafe {
        libc::mmap(
            core::ptr::null_mut(),
            4 * k,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE,
            fd,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    let sync = uffd_open(UffdMode::Sync).unwrap();
    // Sync mode refuses private mappings of disk files, but not of tmpfs files (shmem
    // takes write protection since 5.19): /tmp is tmpfs in the test VMs and on many
    // systems.
    // SAFETY: fstatfs writes the struct on this frame.
    let tmpfs = unsafe {
        let mut st: libc::statfs = core::mem::zeroed();
        libc::fstatfs(fd, &mut st) == 0 && st.f_type == libc::TMPFS_MAGIC
    };
    if !tmpfs {
        assert_eq!(uffd_register(sync, p as usize, 4 * k), Err(libc::EINVAL));
    }
    let asy = uffd_open(UffdMode::Async).unwrap();
    assert_eq!(uffd_register(asy, p as usize, 4 * k), Ok(()));
    assert_eq!(uffd_unregister(asy, p as usize, 4 * k), Ok(()));
    uffd_close(sync);
    uffd_close(asy);
    // SAFETY: our mapping and file.
    unsafe {
        libc::munmap(p, 4 * k);
        libc::close(fd);
    }
}

#[test]
fn protect_reports_enoent_on_unregistered_memory() {
    if !available(UffdMode::Sync) {
        return;
    }
    let k = page();
    let base = map(2);
    let fd = uffd_open(UffdMode::Sync).unwrap();
    assert_eq!(
        // SAFETY: nothing is armed (the call fails); our mapping.
        unsafe { uffd_protect(fd, base, 2 * k, true) },
        Err(libc::ENOENT)
    );
    uffd_close(fd);
    // SAFETY: our mapping.
    unsafe { libc::munmap(base as *mut _, 2 * k) };
}

static SEEN_ADDR: AtomicUsize = AtomicUsize::new(0);
static SEEN_TID: AtomicU64 = AtomicU64::new(0);
static DECLINE: AtomicUsize = AtomicUsize::new(0);
static COUNTERS: UffdCounters = UffdCounters {
    faults: AtomicU64::new(0),
    wakeups: AtomicU64::new(0),
    spin_hits: AtomicU64::new(0),
    foreign: AtomicU64::new(0),
};

/// A sync-mode fd over `n` populated, registered and armed pages, served by a thread
/// whose `on_fault` records the fault and disarms the page (or declines the page at
/// DECLINE).
fn sync_setup(n: usize, spin_ns: u64) -> (UffdFd, usize) {
    let k = page();
    let base = map(n);
    for i in 0..n {
        poke(base + i * k, 1);
    }
    let fd = uffd_open(UffdMode::Sync).unwrap();
    uffd_register(fd, base, n * k).unwrap();
    // SAFETY: the test's own mapping, in a forked child.
    unsafe { uffd_protect(fd, base, n * k, true) }.unwrap();
    std::thread::spawn(move || {
        uffd_serve(fd, spin_ns, &COUNTERS, &|addr, tid| {
            if addr == DECLINE.load(Ordering::Relaxed) {
                return Some(false);
            }
            SEEN_ADDR.store(addr, Ordering::Relaxed);
            SEEN_TID.store(tid, Ordering::Relaxed);
            // SAFETY: the test's page; disarming it resolves the fault.
            unsafe { uffd_protect(fd, addr, page(), false) }.unwrap();
            Some(true)
        })
    });
    (fd, base)
}

#[test]
fn sync_fault_is_served() {
    if !available(UffdMode::Sync) {
        return;
    }
    in_child(|| {
        let k = page();
        let (_fd, base) = sync_setup(4, 0);
        DECLINE.store(base + 3 * k, Ordering::Relaxed);
        poke(base + 2 * k + 5, 7);
        assert_eq!(peek(base + 2 * k + 5), 7);
        assert_eq!(SEEN_ADDR.load(Ordering::Relaxed), base + 2 * k);
        assert_eq!(SEEN_TID.load(Ordering::Relaxed), raw::gettid());
        assert_eq!(COUNTERS.faults.load(Ordering::Relaxed), 1);
        // Disarmed: no second fault.
        poke(base + 2 * k + 6, 8);
        assert_eq!(COUNTERS.faults.load(Ordering::Relaxed), 1);
        // Declined: the server disarms the page itself and the write completes.
        poke(base + 3 * k, 9);
        assert_eq!(peek(base + 3 * k), 9);
        assert_eq!(COUNTERS.faults.load(Ordering::Relaxed), 2);
        assert_eq!(COUNTERS.foreign.load(Ordering::Relaxed), 1);
        assert_eq!(SEEN_ADDR.load(Ordering::Relaxed), base + 2 * k);
        // With spin 0 the server never spins: it reads, or sleeps in poll().
        assert_eq!(COUNTERS.spin_hits.load(Ordering::Relaxed), 0);
    });
}

/// The point of the backend: the kernel writing into an armed page (read(2) from a
/// pipe) waits for the server instead of failing with EFAULT.
#[test]
fn kernel_write_into_armed_page_in_sync_mode() {
    if !available(UffdMode::Sync) {
        return;
    }
    let user_only = uffd_support().user_mode_only;
    in_child(move || {
        let k = page();
        let (_fd, base) = sync_setup(2, 1_000_000);
        let mut p = [0i32; 2];
        // SAFETY: a pipe into this frame's array; then 5 bytes from a literal.
        unsafe {
            assert_eq!(libc::pipe(p.as_mut_ptr()), 0);
            assert_eq!(libc::write(p[1], b"hello".as_ptr() as *const _, 5), 5);
        }
        // SAFETY: reads into our armed page.
        let r = unsafe { libc::read(p[0], (base + k) as *mut _, 5) };
        if user_only {
            assert_eq!(r, -1);
            assert_eq!(
                std::io::Error::last_os_error().raw_os_error(),
                Some(libc::EFAULT)
            );
            return;
        }
        assert_eq!(r, 5);
        // SAFETY: 5 bytes just read into our page.
        let got = unsafe { std::slice::from_raw_parts((base + k) as *const u8, 5) };
        assert_eq!(got, b"hello");
        assert_eq!(SEEN_ADDR.load(Ordering::Relaxed), base + k);
        assert_eq!(COUNTERS.faults.load(Ordering::Relaxed), 1);
    });
}

/// A range over several VMAs: 6.1's UFFDIO_WRITEPROTECT refused it with ENOENT
/// (before wp_split), and the engine's protections of neighbouring tracked mappings
/// failed; holes in the range are skipped, as 6.5+ kernels do.
#[test]
fn protect_spans_several_mappings() {
    if !available(UffdMode::Sync) {
        return;
    }
    in_child(|| {
        let k = page();
        let base = map(6);
        // Different flags split the mapping: VMAs [0,1) [1,2) [2,6).
        // SAFETY: advice on our own mapping.
        let r = unsafe { libc::madvise((base + k) as *mut _, k, libc::MADV_NOHUGEPAGE) };
        assert_eq!(r, 0);
        let fd = uffd_open(UffdMode::Sync).unwrap();
        uffd_register(fd, base, 6 * k).unwrap();
        // SAFETY: the test's own mapping, in a forked child.
        unsafe {
            assert_eq!(uffd_protect(fd, base, 6 * k, true), Ok(()));
            assert_eq!(uffd_protect(fd, base, 6 * k, false), Ok(()));
            assert_eq!(uffd_disarm_quietly(fd, base, 6 * k), Ok(()));
            // A hole in the middle is skipped; a range with nothing mapped is not.
            libc::munmap((base + 3 * k) as *mut _, k);
            assert_eq!(uffd_protect(fd, base, 6 * k, true), Ok(()));
            assert_eq!(uffd_protect(fd, base, 6 * k, false), Ok(()));
            assert_eq!(uffd_protect(fd, base + 3 * k, k, true), Err(libc::ENOENT));
        }
        // Writable again: a write goes through without a fault server.
        poke(base + 5 * k, 7);
        assert_eq!(peek(base + 5 * k), 7);
    });
}
/// After fork the child's memory is no longer registered and the inherited fds speak
/// for the parent: fresh ones track the child.
#[test]
fn forked_child_starts_over() {
    if !available(UffdMode::Async) {
        return;
    }
    in_child(|| {
        let k = page();
        let base = map(4);
        let fd = uffd_open(UffdMode::Async).unwrap();
        uffd_register(fd, base, 4 * k).unwrap();
        // SAFETY: the test's own mapping, in a forked child.
        unsafe { uffd_protect(fd, base, 4 * k, true) }.unwrap();
        let pm = pagemap_open().unwrap();
        in_child(move || {
            let mine = pagemap_open().unwrap();
            assert_eq!(
                scan_written(mine, base, base + 4 * k, false, |_, _| {}),
                Err(libc::EPERM),
                "registration is not inherited"
            );
            poke(base + k, 5);
            // The inherited pagemap fd reads the parent, where nothing was written.
            assert_eq!(runs_written(pm, base, base + 4 * k, false), vec![]);
            uffd_close(fd);
            let fd = uffd_open(UffdMode::Async).unwrap();
            uffd_register(fd, base, 4 * k).unwrap();
            // SAFETY: as above, in a grandchild.
            unsafe { uffd_protect(fd, base, 4 * k, true) }.unwrap();
            poke(base + 2 * k, 6);
            assert_eq!(
                runs_written(mine, base, base + 4 * k, false),
                vec![(base + 2 * k, base + 3 * k)]
            );
        });
        assert_eq!(peek(base + k), 0, "the child's write stayed in the child");
    });
}

/// Not a check: prints what the backend costs here
/// (`cargo test --release --lib uffd::tests::measure -- --ignored --nocapture`).
#[test]
#[ignore]
fn measure() {
    if !available(UffdMode::Sync) || !available(UffdMode::Async) {
        return;
    }
    let say = |s: String| {
        raw::write(2, s.as_bytes());
    };
    for spin in [0u64, 200_000] {
        in_child(move || {
            let k = page();
            let n = 4096;
            let (_fd, base) = sync_setup(n, spin);
            let t = now_ns();
            for i in 0..n {
                poke(base + i * k, 2);
            }
            let dt = (now_ns() - t) as f64 / n as f64 / 1e3;
            say(format!(
                "sync, spin {} us: {dt:.2} us/fault; wakeups {}, spin hits {}\n",
                spin / 1000,
                COUNTERS.wakeups.load(Ordering::Relaxed),
                COUNTERS.spin_hits.load(Ordering::Relaxed)
            ));
        });
    }
    in_child(move || {
        let k = page();
        let n = (64 << 20) / k;
        let base = map(n);
        for i in 0..n {
            poke(base + i * k, 1);
        }
        let fd = uffd_open(UffdMode::Async).unwrap();
        uffd_register(fd, base, n * k).unwrap();
        let t = now_ns();
        // SAFETY: the test's own mapping, in a forked child.
        unsafe { uffd_protect(fd, base, n * k, true) }.unwrap();
        let arm = (now_ns() - t) as f64 / 1e3;
        let pm = pagemap_open().unwrap();
        let t = now_ns();
        for i in 0..n {
            poke(base + i * k, 2);
        }
        let w = (now_ns() - t) as f64 / n as f64 / 1e3;
        let mut pages = 0;
        let t = now_ns();
        scan_written(pm, base, base + n * k, true, |s, e| pages += (e - s) / k).unwrap();
        let scan = (now_ns() - t) as f64 / 1e3;
        assert_eq!(pages, n);
        let t = now_ns();
        scan_written(pm, base, base + n * k, true, |_, _| pages += 1).unwrap();
        let clean = (now_ns() - t) as f64 / 1e3;
        for i in (0..n).step_by(2) {
            poke(base + i * k, 3);
        }
        let t = now_ns();
        let mut runs = 0;
        scan_written(pm, base, base + n * k, true, |_, _| runs += 1).unwrap();
        let alt = (now_ns() - t) as f64 / 1e3;
        let t = now_ns();
        let mut populated = 0;
        scan_populated(pm, base, base + n * k, |_, _| populated += 1).unwrap();
        let pop = (now_ns() - t) as f64 / 1e3;
        say(format!(
            "async, 64 MiB: arm {arm:.0} us; first writes {w:.2} us/page; scan all written + rearm {scan:.0} us; clean rescan {clean:.0} us; every other page written ({runs} runs) + rearm {alt:.0} us; scan_populated {pop:.0} us\n"
        ));
    });
}
