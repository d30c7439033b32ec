//! Running one measurement in a forked child and getting its numbers back; the small
//! system helpers the measurements share (clock, RSS, map count, shared memory, a
//! deterministic page order).
//!
//! Why a child per measurement: the first memsnap snapshot happens once per process and
//! write-protects nearly all of it, so each memsnap measurement needs a fresh process;
//! baselines get one too, so every mechanism starts from the same state. A child reports
//! `key value` lines on a pipe; its stderr goes to a second pipe so that a child killed by
//! memsnap (for example at vm.max_map_count) still leaves its one-line message behind.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::fd::FromRawFd;
use std::time::Instant;

/// What one child reported: numbers, text fields (`#key text`), and how it ended.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub nums: BTreeMap<String, f64>,
    pub text: BTreeMap<String, String>,
    /// `None` for a clean exit 0, otherwise why the child failed, with its stderr.
    pub failure: Option<String>,
}

/// A child's report, built in the child and written to the pipe at the end.
#[derive(Default)]
pub struct Report {
    out: String,
    fd: i32,
}

impl Report {
    /// Sends what is reported so far, for a child that may die before it ends (the
    /// parent keeps both parts).
    pub fn flush(&mut self) {
        write_all(self.fd, self.out.as_bytes());
        self.out.clear();
    }

    pub fn num(&mut self, key: &str, v: f64) -> &mut Self {
        self.out.push_str(&format!("{key} {v}\n"));
        self
    }
    pub fn text(&mut self, key: &str, v: &str) -> &mut Self {
        self.out
            .push_str(&format!("#{key} {}\n", v.replace('\n', " ")));
        self
    }
}

fn pipe() -> (i32, i32) {
    let mut fds = [0i32; 2];
    // SAFETY: fds is a valid two-element array for pipe(2).
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        panic!("pipe failed");
    }
    (fds[0], fds[1])
}

fn read_all(fd: i32) -> String {
    // SAFETY: fd is a pipe read end this process owns; File takes ownership and closes it.
    let mut f = unsafe { std::fs::File::from_raw_fd(fd) };
    let mut s = String::new();
    let _ = f.read_to_string(&mut s);
    s
}

fn write_all(fd: i32, bytes: &[u8]) {
    let mut rest = bytes;
    while !rest.is_empty() {
        // SAFETY: writing from a live buffer to a descriptor this process owns.
        let n = unsafe { libc::write(fd, rest.as_ptr() as *const _, rest.len()) };
        if n <= 0 {
            return;
        }
        rest = &rest[n as usize..];
    }
}

/// Runs `f` in a forked child and returns what it reported. The caller must be
/// single-threaded (the bench's main thread is), so the child inherits no held locks.
pub fn in_child(f: impl FnOnce(&mut Report)) -> Sample {
    let (out_r, out_w) = pipe();
    let (err_r, err_w) = pipe();
    // SAFETY: fork in a single-threaded process; the child only runs `f` and exits.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        panic!("fork failed");
    }
    if pid == 0 {
        // SAFETY: replacing the child's stderr with the pipe's write end; closing the read
        // ends this process does not use.
        unsafe {
            libc::dup2(err_w, 2);
            libc::close(out_r);
            libc::close(err_r);
        }
        let mut report = Report {
            out: String::new(),
            fd: out_w,
        };
        f(&mut report);
        report.flush();
        // SAFETY: ends the child without running the parent's atexit handlers twice.
        unsafe { libc::_exit(0) };
    }
    // SAFETY: closing the write ends the parent does not use, so reads see EOF.
    unsafe {
        libc::close(out_w);
        libc::close(err_w);
    }
    // Both pipes are drained before waiting; reports are small, stderr is one line or two,
    // so reading one fully before the other cannot deadlock in practice.
    let out = read_all(out_r);
    let err = read_all(err_r);
    let mut status = 0;
    // SAFETY: waiting for our own child.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let mut s = Sample::default();
    for line in out.lines() {
        if let Some(rest) = line.strip_prefix('#') {
            let (k, v) = rest.split_once(' ').unwrap_or((rest, ""));
            s.text.insert(k.to_string(), v.to_string());
        } else if let Some((k, v)) = line.split_once(' ') {
            if let Ok(v) = v.parse() {
                s.nums.insert(k.to_string(), v);
            }
        }
    }
    let exited_ok = libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0;
    if !exited_ok {
        let how = if libc::WIFSIGNALED(status) {
            format!("killed by signal {}", libc::WTERMSIG(status))
        } else {
            format!("exit status {}", libc::WEXITSTATUS(status))
        };
        s.failure = Some(format!("{how}: {}", err.trim()));
    }
    s
}

/// Nanoseconds since `t0`.
pub fn ns_since(t0: Instant) -> f64 {
    t0.elapsed().as_nanos() as f64
}

pub fn os_page() -> usize {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}

/// Anonymous private read-write memory, not touched.
pub fn map_private(bytes: usize) -> &'static mut [u8] {
    map(bytes, libc::MAP_PRIVATE)
}

/// Anonymous shared memory, for a grandchild to report through (survives its death).
pub fn map_shared(bytes: usize) -> &'static mut [u8] {
    map(bytes, libc::MAP_SHARED)
}

fn map(bytes: usize, flags: i32) -> &'static mut [u8] {
    // SAFETY: a fresh anonymous mapping at an address of the kernel's choosing.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            bytes,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert!(p != libc::MAP_FAILED, "mmap of {bytes} bytes failed");
    // SAFETY: the mapping is `bytes` long, readable and writable, never unmapped.
    unsafe { std::slice::from_raw_parts_mut(p as *mut u8, bytes) }
}

/// Writes one byte in every page, so the memory is committed like a heap in use.
pub fn touch(mem: &mut [u8], page: usize) {
    for i in (0..mem.len()).step_by(page) {
        // SAFETY: in bounds; volatile so the store is not elided.
        unsafe { std::ptr::write_volatile(mem.as_mut_ptr().add(i), 1) };
    }
}

/// The first write to a page: bumps one byte, so the page's contents change.
#[inline(always)]
pub fn dirty(base: *mut u8, offset: usize) {
    // SAFETY: the caller passes an offset inside its mapping.
    unsafe {
        let p = base.add(offset);
        std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(1));
    }
}

/// A field of /proc/self/status in bytes (VmRSS, VmPTE, ...), read into `buf`: under
/// memsnap the buffer must be untracked (the kernel cannot write write-protected pages).
pub fn status_bytes(buf: &mut [u8], field: &str) -> f64 {
    // SAFETY: opening a NUL-terminated path; reading into a live buffer; closing our fd.
    let n = unsafe {
        let fd = libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return 0.0;
        }
        let n = libc::read(fd, buf.as_mut_ptr() as *mut _, buf.len());
        libc::close(fd);
        n.max(0) as usize
    };
    let s = std::str::from_utf8(&buf[..n]).unwrap_or("");
    for line in s.lines() {
        if let Some(rest) = line.strip_prefix(field).and_then(|r| r.strip_prefix(':')) {
            let kb: f64 = rest
                .trim()
                .trim_end_matches("kB")
                .trim()
                .parse()
                .unwrap_or(0.0);
            return kb * 1024.0;
        }
    }
    0.0
}

/// The process's mapping count (lines of /proc/self/maps), read into a caller buffer so
/// that counting allocates nothing (the buffer is untracked or already committed).
pub fn map_count(buf: &mut [u8]) -> usize {
    // SAFETY: opening a NUL-terminated path; reading into a live buffer; closing our fd.
    unsafe {
        let fd = libc::open(c"/proc/self/maps".as_ptr(), libc::O_RDONLY);
        if fd < 0 {
            return 0;
        }
        let mut lines = 0;
        loop {
            let n = libc::read(fd, buf.as_mut_ptr() as *mut _, buf.len());
            if n <= 0 {
                break;
            }
            lines += buf[..n as usize].iter().filter(|&&b| b == b'\n').count();
        }
        libc::close(fd);
        lines
    }
}

/// A seeded permutation of `0..n` (xorshift64*; the same order in every run).
pub fn permutation(n: usize, seed: u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..n).rev() {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let r = x.wrapping_mul(0x2545_f491_4f6c_dd1d);
        v.swap(i, (r % (i as u64 + 1)) as usize);
    }
    v
}

/// `k` distinct pages out of `n` chosen at random, in ascending address order.
pub fn random_subset(n: usize, k: usize, seed: u64) -> Vec<usize> {
    let mut v = permutation(n, seed);
    v.truncate(k);
    v.sort_unstable();
    v
}

/// CPU time of the whole process (all threads, user and kernel), in nanoseconds. Less
/// sensitive than wall time to other load on a shared machine: time spent preempted does
/// not count.
pub fn cpu_ns() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a live timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 * 1e9 + ts.tv_nsec as f64
}

/// Runs `work(t)` on `threads` threads released together; returns the wall time from the
/// earliest start to the latest finish, and the process CPU time from release to the
/// last finish (thread creation excluded, spinning while waiting for release excluded).
pub fn timed_threads(threads: usize, work: impl Fn(usize) + Sync) -> (f64, f64) {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    if threads == 1 {
        let (t0, c0) = (Instant::now(), cpu_ns());
        work(0);
        return (ns_since(t0), cpu_ns() - c0);
    }
    let go = AtomicBool::new(false);
    let ready = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let t0 = Instant::now();
    let mut cpu = (0.0, 0.0);
    let spans: Vec<(f64, f64)> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (go, ready, done, work) = (&go, &ready, &done, &work);
                s.spawn(move || {
                    ready.fetch_add(1, Ordering::SeqCst);
                    while !go.load(Ordering::Acquire) {
                        std::hint::spin_loop();
                    }
                    let a = ns_since(t0);
                    work(t);
                    let b = ns_since(t0);
                    done.fetch_add(1, Ordering::SeqCst);
                    (a, b)
                })
            })
            .collect();
        while ready.load(Ordering::SeqCst) < threads {
            std::thread::yield_now();
        }
        // The writers spin until released: CPU time counts from the release on.
        cpu.0 = cpu_ns();
        go.store(true, Ordering::Release);
        while done.load(Ordering::SeqCst) < threads {
            std::thread::yield_now();
        }
        cpu.1 = cpu_ns();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let start = spans.iter().map(|s| s.0).fold(f64::INFINITY, f64::min);
    let end = spans.iter().map(|s| s.1).fold(0.0, f64::max);
    (end - start, cpu.1 - cpu.0)
}
