//! Threads as the snapshot policy sees them: where each live thread's stack is, the
//! controller thread's kernel-written areas (rseq, errno, signal stack), and spawning the
//! library's own threads on stacks it mapped itself.

use super::raw;

/// The current stack pointer (approximately: the address of a local).
#[inline(never)]
pub fn current_sp() -> usize {
    let marker = 0u8;
    core::hint::black_box(&marker) as *const u8 as usize
}

/// The thread pointer (TCB address) of the calling thread.
#[cfg(target_arch = "x86_64")]
fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: on x86_64 Linux %fs:0 holds the TCB's self pointer (glibc and musl).
    unsafe { core::arch::asm!("mov {}, qword ptr fs:0", out(reg) tp, options(nostack, readonly)) };
    tp
}

#[cfg(target_arch = "aarch64")]
fn thread_pointer() -> usize {
    let tp: usize;
    // SAFETY: reading TPIDR_EL0 has no side effects.
    unsafe { core::arch::asm!("mrs {}, tpidr_el0", out(reg) tp, options(nostack, nomem)) };
    tp
}

/// Where glibc (2.35 and later) keeps each thread's restartable-sequences area:
/// `(offset from the thread pointer, size)`, or `None` when it registers none. Looked up
/// once at initialization: `dlsym` takes loader locks and must not run on snapshot paths.
pub fn rseq_layout() -> Option<(isize, usize)> {
    // SAFETY: dlsym with NUL-terminated names; the symbols, when present, are glibc's
    // exported `ptrdiff_t __rseq_offset` and `unsigned int __rseq_size`.
    unsafe {
        let off = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_offset".as_ptr());
        let size = libc::dlsym(libc::RTLD_DEFAULT, c"__rseq_size".as_ptr());
        if off.is_null() || size.is_null() {
            return None;
        }
        let size = *(size as *const u32) as usize;
        if size == 0 {
            return None;
        }
        Some((*(off as *const isize), size.max(32)))
    }
}

/// The calling thread's rseq area, given [`rseq_layout`]. The kernel writes it on every
/// return to user space, so it must never be write-protected.
pub fn current_rseq_area(layout: Option<(isize, usize)>) -> Option<(usize, usize)> {
    let (off, size) = layout?;
    Some(((thread_pointer() as isize + off) as usize, size))
}

/// The address of the calling thread's `errno`.
pub fn current_errno_location() -> usize {
    // SAFETY: __errno_location has no preconditions.
    unsafe { libc::__errno_location() as usize }
}

/// The calling thread's alternate signal stack, if one is installed.
pub fn current_signal_stack() -> Option<(usize, usize)> {
    raw::current_sigaltstack()
}

fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    let mut v = 0u64;
    for &c in s {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v.checked_mul(10)?.checked_add((c - b'0') as u64)?;
    }
    Some(v)
}

/// Parses `/proc/self/task/TID/syscall`: `NR a1..a6 SP PC`, `-1 SP PC` when blocked outside
/// a system call, or `running`. Returns the stack pointer of a blocked thread.
pub fn parse_syscall_sp(text: &[u8]) -> Option<usize> {
    let mut fields = text
        .split(|&c| c == b' ' || c == b'\n')
        .filter(|f| !f.is_empty());
    let first = fields.next()?;
    if first == b"running" {
        return None;
    }
    let rest: [Option<&[u8]>; 8] = core::array::from_fn(|_| fields.next());
    let count = rest.iter().filter(|f| f.is_some()).count();
    if count < 2 {
        return None;
    }
    let sp = rest[count - 2]?;
    let sp = sp.strip_prefix(b"0x")?;
    let mut v = 0usize;
    for &c in sp {
        v = (v << 4)
            | match c {
                b'0'..=b'9' => (c - b'0') as usize,
                b'a'..=b'f' => (c - b'a' + 10) as usize,
                _ => return None,
            };
    }
    Some(v)
}

/// Whether `/proc/self/task/TID/syscall` text shows the thread inside exit(2) (glibc ends
/// every thread with it): it runs no user code any more, and the kernel has cleared its
/// tid or is about to, so `pthread_join` may already have returned for it although the
/// kernel still lists it.
pub fn in_exit_syscall(text: &[u8]) -> bool {
    let nr = text
        .split(|&c| c == b' ' || c == b'\n')
        .find(|f| !f.is_empty());
    nr.and_then(parse_decimal) == Some(libc::SYS_exit as u64)
}

/// `/proc/self/task/TID/LEAF` (`leaf` NUL-terminated) into `path`; returns its length.
fn task_path(tid: u64, leaf: &[u8], path: &mut [u8; 64]) -> usize {
    let prefix = b"/proc/self/task/";
    path[..prefix.len()].copy_from_slice(prefix);
    let mut p = prefix.len();
    let mut digits = [0u8; 20];
    let mut d = digits.len();
    let mut v = tid;
    loop {
        d -= 1;
        digits[d] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    for part in [&digits[d..], b"/", leaf] {
        path[p..p + part.len()].copy_from_slice(part);
        p += part.len();
    }
    p
}

/// The kernel's flags word of a task, from its `stat` text: the 9th field, the 7th
/// after the parenthesized command name (which may itself hold spaces and parentheses).
pub fn stat_flags(text: &[u8]) -> Option<u64> {
    let close = text.iter().rposition(|&c| c == b')')?;
    text[close + 1..]
        .split(|&c| c == b' ')
        .filter(|f| !f.is_empty())
        .nth(6)
        .and_then(parse_decimal)
}

/// The kernel sets `PF_EXITING` as a task enters `do_exit`.
const PF_EXITING: u64 = 0x4;

/// Whether thread `tid` is inside `do_exit` (its `stat` flags carry `PF_EXITING`).
fn task_exiting(tid: u64) -> bool {
    let mut path = [0u8; 64];
    let p = task_path(tid, b"stat\0", &mut path);
    let mut text = [0u8; 512];
    let Ok(fd) = raw::check(raw::open(&path[..p], 0)) else {
        return false;
    };
    let got = raw::check(raw::read(fd as i32, &mut text));
    raw::close(fd as i32);
    got.ok()
        .and_then(|n| stat_flags(&text[..n]))
        .is_some_and(|f| f & PF_EXITING != 0)
}

/// How often `for_each_thread_sp` reads a thread that stays `running` again.
const RUNNING_RETRIES: u32 = 50;
/// How many 1 ms waits `for_each_thread_sp` gives a thread inside exit(2) to vanish.
const EXIT_WAITS: u32 = 10_000;

/// Calls `f(tid, text)` for every thread of this process but the caller and those `skip`
/// names (whose files are not even opened), where `text` is
/// what `read` got from `/proc/self/task/<tid>/<leaf>` (`leaf` NUL-terminated). `f`
/// returns whether to read the file again (after a yield); at most EXIT_WAITS + 1 times.
///
/// `scratch` is library-owned memory for directory entries and file text (at least
/// 4 KiB); nothing is allocated.
fn for_each_task_file(
    scratch: &mut [u8],
    leaf: &[u8],
    skip: impl Fn(u64) -> bool,
    mut f: impl FnMut(u64, Option<&[u8]>) -> bool,
) {
    let me = raw::gettid();
    let (dents, text) = scratch.split_at_mut(scratch.len() - 512);
    for_each_task_file_names(dents, |tid| {
        if tid == me || skip(tid) {
            return;
        }
        let mut path = [0u8; 64];
        let p = task_path(tid, leaf, &mut path);
        for _attempt in 0..=EXIT_WAITS {
            let got = match raw::check(raw::open(&path[..p], 0)) {
                Ok(fd) => {
                    let got = raw::check(raw::read(fd as i32, text));
                    raw::close(fd as i32);
                    got.ok()
                }
                Err(_) => None,
            };
            if !f(tid, got.map(|g| &text[..g])) {
                break;
            }
            raw::sched_yield();
        }
    });
}

/// Waits (yielding, a bounded number of times) until two consecutive listings of
/// `/proc/self/task` agree: a thread that was just joined may still be finishing its exit
/// in the kernel, listed but about to vanish, and a probe must not count it.
pub fn settle_threads(scratch: &mut [u8]) {
    let list = |scratch: &mut [u8]| {
        let mut h = 0xcbf2_9ce4_8422_2325u64;
        let mut n = 0u64;
        for_each_task_file_names(scratch, |tid| {
            h = (h ^ tid).wrapping_mul(0x0100_0000_01b3);
            n += 1;
        });
        (n, h)
    };
    let mut last = list(scratch);
    for _ in 0..1000 {
        raw::sched_yield();
        let now = list(scratch);
        if now == last {
            return;
        }
        last = now;
    }
}

/// Calls `f(tid)` for every entry of `/proc/self/task`, in directory order.
fn for_each_task_file_names(scratch: &mut [u8], mut f: impl FnMut(u64)) {
    let Ok(dir) = raw::check(raw::open(b"/proc/self/task\0", libc::O_DIRECTORY)) else {
        return;
    };
    let dir = dir as i32;
    while let Ok(n @ 1..) = raw::check(raw::getdents64(dir, scratch)) {
        let mut off = 0usize;
        while off + 19 < n {
            let reclen = u16::from_ne_bytes([scratch[off + 16], scratch[off + 17]]) as usize;
            if reclen == 0 {
                break;
            }
            let name = &scratch[off + 19..off + reclen];
            let name = &name[..name.iter().position(|&c| c == 0).unwrap_or(name.len())];
            off += reclen;
            if let Some(tid) = parse_decimal(name) {
                f(tid);
            }
        }
    }
    raw::close(dir);
}

/// Calls `f(tid, sp)` for every other live thread of this process, except those `skip`
/// names, whose stack pointer the kernel can tell (threads blocked in or outside a
/// system call). Threads that stay `running` through a few retries, or vanish, are
/// reported with `sp == 0`.
pub fn for_each_thread_sp(
    scratch: &mut [u8],
    skip: impl Fn(u64) -> bool,
    mut f: impl FnMut(u64, usize),
) {
    let mut attempts = 0;
    for_each_task_file(scratch, b"syscall\0", skip, |tid, text| {
        attempts += 1;
        let Some(text) = text else {
            // Gone (or finishing its exit) since the directory was read.
            attempts = 0;
            return false;
        };
        // Inside exit(2): gone for the program (pthread_join may have returned for it),
        // but listed, and using CPU, until the kernel has finished its exit, which a slow
        // or emulated machine makes long enough for a checkpoint to count it and the next
        // rewind to find a thread fewer, or its final run time added to the exited
        // total. Wait for it to vanish (1 ms sleeps, at most EXIT_WAITS: 10 s, for machines
        // so loaded or emulated that an exit takes that long), then count it
        // as before: only a tracer holds a thread there that long.
        if in_exit_syscall(text) && attempts < EXIT_WAITS {
            raw::sleep_ns(1_000_000);
            return true;
        }
        let sp = parse_syscall_sp(text);
        if sp.is_none() && attempts < RUNNING_RETRIES {
            return true;
        }
        // Still `running`: a thread past the point where the kernel woke `pthread_join`
        // (it cleared the tid word) runs on through do_exit, where its syscall file shows
        // nothing but `running`. The kernel's PF_EXITING flag says so exactly: wait for
        // it to vanish as above.
        if sp.is_none() && attempts < EXIT_WAITS && task_exiting(tid) {
            raw::sleep_ns(1_000_000);
            return true;
        }
        f(tid, sp.unwrap_or(0));
        attempts = 0;
        false
    });
}

/// CPU time, in nanoseconds, used by the process's threads that have exited, as
/// `(lower, upper)` bounds: the process clock less the calling thread's clock less the
/// clock of every other live thread, `others` (from a thread probe that just ran). It
/// only grows, by each exiting thread's run time, so a rise between two readings shows
/// that threads came and went even when the set of live threads looks the same. Threads
/// running during the reading make a single difference unreliable; bracketing the
/// reading (own clock, process clock, the others, process clock, own clock) yields a
/// bound on each side. A thread that exited since the probe reads as zero: its time has
/// moved to the exited total, as it should.
///
/// Each thread's clock is read with one `clock_gettime` on its CPU-clock id, not by
/// opening `/proc/self/task/TID/schedstat`: a third of a checkpoint's fixed cost went
/// into those files.
pub fn exited_threads_cpu_ns(others: impl Iterator<Item = u64>) -> (i64, i64) {
    let clock = |id: libc::clockid_t| {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes the timespec on this frame; an invalid clock id
        // (a thread that is gone) fails with EINVAL and leaves it zero.
        unsafe { libc::clock_gettime(id, &mut ts) };
        ts.tv_sec * 1_000_000_000 + ts.tv_nsec
    };
    let mine_before = clock(libc::CLOCK_THREAD_CPUTIME_ID);
    let process_before = clock(libc::CLOCK_PROCESS_CPUTIME_ID);
    let mut sum = 0i64;
    for tid in others {
        sum += clock(thread_cpu_clock(tid));
    }
    let process_after = clock(libc::CLOCK_PROCESS_CPUTIME_ID);
    let mine_after = clock(libc::CLOCK_THREAD_CPUTIME_ID);
    (
        process_before - mine_after - sum,
        process_after - mine_before - sum,
    )
}

/// The kernel's CPU-clock id for thread `tid` measuring its run time
/// (`MAKE_THREAD_CPUCLOCK(tid, CPUCLOCK_SCHED)`, as glibc's `pthread_getcpuclockid`
/// builds it).
fn thread_cpu_clock(tid: u64) -> libc::clockid_t {
    const CPUCLOCK_PERTHREAD: i32 = 4;
    const CPUCLOCK_SCHED: i32 = 2;
    ((!(tid as i32)) << 3) | CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_flags_parse() {
        // A command name with spaces and a parenthesis; flags 0x404044 (PF_EXITING set).
        let exiting = b"4242 (a b) c) R 1 4240 4240 0 -1 4212804 0 0 0 0 1 2 0 0 20 0 1 0\n";
        assert_eq!(stat_flags(exiting), Some(4212804));
        assert_ne!(stat_flags(exiting).unwrap() & PF_EXITING, 0);
        let live = b"4243 (worker) S 1 4240 4240 0 -1 4210752 0 0 0 0\n";
        assert_eq!(stat_flags(live).map(|f| f & PF_EXITING), Some(0));
        assert_eq!(stat_flags(b"4244 (x"), None);
        assert_eq!(stat_flags(b"4245 (x) R 1 2"), None);
    }

    #[test]
    fn syscall_file_formats() {
        assert_eq!(
            parse_syscall_sp(b"202 0x7f 0x80 0x0 0x0 0x0 0x0 0x7ffc1000 0x7f00aa\n"),
            Some(0x7ffc1000)
        );
        assert_eq!(
            parse_syscall_sp(b"-1 0x7ffd2000 0x401000\n"),
            Some(0x7ffd2000)
        );
        assert_eq!(parse_syscall_sp(b"running\n"), None);
        assert_eq!(parse_syscall_sp(b""), None);
        assert_eq!(parse_syscall_sp(b"-1 zz 0x1\n"), None);
    }

    fn clock_ns(id: libc::clockid_t) -> Option<i64> {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: writes the timespec on this frame.
        let r = unsafe { libc::clock_gettime(id, &mut ts) };
        (r == 0).then_some(ts.tv_sec * 1_000_000_000 + ts.tv_nsec)
    }

    #[test]
    fn other_threads_cpu_clocks() {
        // A thread's clock id reads that thread's run time: a thread spins until its own
        // clock shows 5 ms, and its clock read from here shows at least what it saw.
        let (tx, rx) = std::sync::mpsc::channel();
        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let t = std::thread::spawn(move || {
            let own = || clock_ns(libc::CLOCK_THREAD_CPUTIME_ID).unwrap();
            while own() < 5_000_000 {}
            tx.send((raw::gettid(), own())).unwrap();
            done_rx.recv().unwrap();
        });
        let (tid, seen) = rx.recv().unwrap();
        let ns = clock_ns(thread_cpu_clock(tid)).expect("a live thread's clock");
        assert!(ns >= seen, "read {ns} ns, the thread itself saw {seen} ns");
        done_tx.send(()).unwrap();
        t.join().unwrap();
        // Gone: its clock no longer reads, once the kernel has finished the exit that
        // join does not wait for (it returns when the kernel clears the thread's tid, and
        // the thread stays readable a little longer: long enough to see under emulation).
        let mut tries = 0;
        while clock_ns(thread_cpu_clock(tid)).is_some() && tries < 100_000 {
            raw::sched_yield();
            tries += 1;
        }
        assert_eq!(clock_ns(thread_cpu_clock(tid)), None);
    }

    #[test]
    fn exit_syscall() {
        let exit = format!(
            "{} 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffc1000 0x7f00aa\n",
            libc::SYS_exit
        );
        assert!(in_exit_syscall(exit.as_bytes()));
        let group = format!(
            "{} 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffc1000 0x7f00aa\n",
            libc::SYS_exit_group
        );
        assert!(!in_exit_syscall(group.as_bytes()));
        assert!(!in_exit_syscall(b"-1 0x7ffd2000 0x401000\n"));
        assert!(!in_exit_syscall(b"running\n"));
        assert!(!in_exit_syscall(b""));
    }

    #[test]
    fn decimal_names() {
        assert_eq!(parse_decimal(b"1234"), Some(1234));
        assert_eq!(parse_decimal(b"."), None);
        assert_eq!(parse_decimal(b""), None);
    }
}
