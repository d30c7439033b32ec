//! The countdown watchdog behind `StartCountdown`/`InitializeCountdownThread`: a library
//! thread that, once started, decrements a non-zero count every millisecond and aborts the
//! process with a message when it reaches zero. Hosts arm it around work that must not
//! hang (the original counted scheduler yields, off by default; milliseconds are a more
//! useful unit and the thread costs nothing while the count is zero).

use core::sync::atomic::Ordering;

use super::Engine;
use crate::sys;

const STACK_BYTES: usize = 64 << 10;

extern "C" fn countdown_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    // SAFETY: `arg` is the never-freed engine.
    let e = unsafe { &*(arg as *const Engine) };
    e.workers.register_own_thread();
    loop {
        sys::sleep_ns(1_000_000);
        let c = e.countdown.load(Ordering::Acquire);
        if c == 0 {
            continue;
        }
        // A concurrent StartCountdown wins over this decrement (no wrap to SIZE_MAX).
        if e.countdown
            .compare_exchange(c, c - 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            && c == 1
        {
            crate::fatal!(
                "StartCountdown",
                "countdown expired: the watched operation did not finish in time"
            );
        }
    }
}

impl Engine {
    /// `InitializeCountdownThread`: starts the watchdog once per process.
    pub fn spawn_countdown(&self, function: &str) {
        if self.countdown_started.swap(true, Ordering::AcqRel) {
            return;
        }
        let bytes = sys::thread_stack_bytes(STACK_BYTES);
        let Some(stack) = sys::reserve(bytes) else {
            crate::fatal!(function, "cannot map the countdown thread's stack")
        };
        self.meta.lock().add_own(crate::mem::Reservation {
            base: stack as usize,
            len: bytes,
        });
        // SAFETY: the stack reservation belongs to this thread forever; the engine it
        // receives is never freed.
        let r = unsafe {
            sys::spawn(
                stack,
                bytes,
                countdown_main,
                self as *const Engine as *mut _,
            )
        };
        if let Err(e) = r {
            crate::fatal!(function, "cannot start the countdown thread (error {})", e);
        }
        self.workers.wait_registered(1 + self.workers.count());
    }
}
