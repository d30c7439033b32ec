//! The sync-mode fault server: the loop a library thread runs forever, reading fault
//! messages from the userfaultfd and handing each to the engine, keeping the ones that
//! must wait, and disarming pages the engine declines.

use core::mem::size_of;
use core::sync::atomic::Ordering;

use super::ioctl::{uffd_protect, uffd_wake};
use super::uapi::*;
use crate::sys::linux::raw;
use crate::sys::{UffdCounters, UffdFd};

pub(super) fn now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime (vDSO) writes the timespec on this frame; CLOCK_MONOTONIC is
    // always valid, so errno is never written.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Sleeps until `fd` is readable, or at most `timeout_ns` when given; Err(errno) or Err(0)
/// when it reports an error condition.
fn wait_readable(fd: UffdFd, timeout_ns: Option<u64>) -> Result<(), i32> {
    let mut pfd = libc::pollfd {
        fd: fd.raw(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ts = timeout_ns.map(|ns| libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    });
    let ts_ptr = ts
        .as_ref()
        .map_or(0, |t| t as *const libc::timespec as usize);
    loop {
        // SAFETY: ppoll (poll is missing on aarch64) on one pollfd and an optional
        // timespec, both on this frame, no signal mask change.
        let r = unsafe {
            raw::syscall6(
                libc::SYS_ppoll as usize,
                [&mut pfd as *mut libc::pollfd as usize, 1, ts_ptr, 0, 0, 0],
            )
        };
        match raw::check(r) {
            Err(libc::EINTR) => continue,
            Err(e) => return Err(e),
            Ok(_) if pfd.revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 => {
                return Err(0)
            }
            Ok(_) => return Ok(()),
        }
    }
}

/// Faults the server keeps waiting (writes while memory changes are disallowed) before
/// it waits in place for the oldest, as it did before it kept any.
const MAX_PENDING: usize = 256;

/// How often pending faults are asked again while no new fault arrives.
const PENDING_POLL_NS: u64 = 1_000_000;

/// The sync-mode fault server: runs forever on the calling (library-owned) thread.
/// Reads uffd_msg batches (non-blocking read of up to 32 msgs); for each WP pagefault calls
/// `on_fault(addr, ptid)` (`addr` aligned to the kernel page). `Some(true)` means it has
/// disarmed the page with `uffd_protect(.., false)`, which wakes the writer; `Some(false)`
/// (not memsnap's page any more) makes the server disarm that one kernel page itself so
/// the faulting thread never stays blocked; `None` (the write must wait: changes are
/// disallowed) keeps the fault pending, asked again at every batch and at least every
/// millisecond, while the server goes on reading faults: one waiting writer must not hide
/// the next fault (a write by the thread that disallowed changes is refused, not left
/// waiting behind it). After each batch it keeps reading without blocking for `spin_ns`
/// (the cross-CPU wake-up of a sleeping server is the dominant cost) before sleeping in
/// poll(). Never returns; if the fd reports an error it calls
/// crate::fatal!("memsnap fault server", ...).
pub fn uffd_serve(
    fd: UffdFd,
    spin_ns: u64,
    counters: &UffdCounters,
    on_fault: &dyn Fn(usize, u64) -> Option<bool>,
) -> ! {
    let mut pending = [(0usize, 0u64); MAX_PENDING];
    let mut n_pending = 0usize;
    let k = crate::sys::linux::os_page_size();
    let mut msgs = [UffdMsg {
        event: 0,
        _reserved1: 0,
        _reserved2: 0,
        _reserved3: 0,
        flags: 0,
        address: 0,
        ptid: 0,
        _pad: 0,
    }; MSG_BATCH];
    let mut last = now_ns();
    let mut spinning = false;
    loop {
        // SAFETY: read(2) writes at most the size of `msgs` (plain integers, any bit
        // pattern valid) on this frame.
        let r = unsafe {
            raw::syscall6(
                libc::SYS_read as usize,
                [
                    fd.raw() as usize,
                    msgs.as_mut_ptr() as usize,
                    size_of::<[UffdMsg; MSG_BATCH]>(),
                    0,
                    0,
                    0,
                ],
            )
        };
        match raw::check(r) {
            Ok(n) => {
                let count = (n / size_of::<UffdMsg>()).min(MSG_BATCH);
                if spinning {
                    counters
                        .spin_hits
                        .fetch_add(count as u64, Ordering::Relaxed);
                }
                for m in &msgs[..count] {
                    serve_one(fd, k, m, counters, on_fault, &mut pending, &mut n_pending);
                }
                retry_pending(fd, k, counters, on_fault, &mut pending, &mut n_pending);
                spinning = false;
                last = now_ns();
            }
            Err(libc::EAGAIN) => {
                if now_ns().saturating_sub(last) < spin_ns {
                    spinning = true;
                    core::hint::spin_loop();
                    continue;
                }
                spinning = false;
                if n_pending > 0 {
                    retry_pending(fd, k, counters, on_fault, &mut pending, &mut n_pending);
                }
                let timeout = (n_pending > 0).then_some(PENDING_POLL_NS);
                if let Err(e) = wait_readable(fd, timeout) {
                    crate::fatal!(
                        "memsnap fault server",
                        "poll on the userfaultfd failed (errno {e}, 0 = error condition)"
                    );
                }
                counters.wakeups.fetch_add(1, Ordering::Relaxed);
                last = now_ns();
            }
            Err(libc::EINTR) => {}
            Err(e) => crate::fatal!(
                "memsnap fault server",
                "read from the userfaultfd failed (errno {e})"
            ),
        }
    }
}

fn serve_one(
    fd: UffdFd,
    k: usize,
    m: &UffdMsg,
    counters: &UffdCounters,
    on_fault: &dyn Fn(usize, u64) -> Option<bool>,
    pending: &mut [(usize, u64); MAX_PENDING],
    n_pending: &mut usize,
) {
    if m.event != UFFD_EVENT_PAGEFAULT {
        // Never requested (no UFFD_FEATURE_EVENT_*); nobody waits on it.
        counters.foreign.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let addr = m.address as usize & !(k - 1);
    if m.flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
        counters.faults.fetch_add(1, Ordering::Relaxed);
        let tid = m.ptid as u64;
        let mut answer = on_fault(addr, tid);
        if answer.is_none() && *n_pending < MAX_PENDING {
            pending[*n_pending] = (addr, tid);
            *n_pending += 1;
            return;
        }
        // No room to keep it: wait in place for this one, as before.
        while answer.is_none() {
            wait_readable(fd, Some(PENDING_POLL_NS)).ok();
            answer = on_fault(addr, tid);
        }
        if answer == Some(true) {
            return;
        }
    }
    decline(fd, k, addr, counters);
}

/// Asks the pending faults again; keeps those that must still wait, in order.
fn retry_pending(
    fd: UffdFd,
    k: usize,
    counters: &UffdCounters,
    on_fault: &dyn Fn(usize, u64) -> Option<bool>,
    pending: &mut [(usize, u64); MAX_PENDING],
    n_pending: &mut usize,
) {
    let mut kept = 0;
    for i in 0..*n_pending {
        let (addr, tid) = pending[i];
        match on_fault(addr, tid) {
            None => {
                pending[kept] = (addr, tid);
                kept += 1;
            }
            Some(true) => {}
            Some(false) => decline(fd, k, addr, counters),
        }
    }
    *n_pending = kept;
}

/// The engine declined the fault at `addr`: drops its protection and wakes the writer.
fn decline(fd: UffdFd, k: usize, addr: usize, counters: &UffdCounters) {
    counters.foreign.fetch_add(1, Ordering::Relaxed);
    // SAFETY: the engine declined this page: it no longer tracks it, so its protection is
    // ours to drop, and the faulting thread must not stay blocked.
    if unsafe { uffd_protect(fd, addr, k, false) }.is_err() {
        // Unregistered meanwhile (which wakes waiters), or not write-protected: wake
        // anyway, harmless when nobody waits.
        let _ = uffd_wake(fd, addr, k);
    }
}
