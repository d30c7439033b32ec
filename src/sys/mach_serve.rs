//! The Mach exception server's decisions, apart from its Mach calls: what each request
//! gets, and which requests wait and for what. The server thread must never block on one
//! request while others queue behind it, so nothing here waits:
//!
//! - A request from another task (a `fork` or `posix_spawn` child: a new task inherits
//!   its parent's exception ports, `osfmk/kern/ipc_tt.c` `ipc_task_init`, and only a
//!   set-uid exec resets them, `ipc_task_reset`) is answered `KERN_FAILURE` at once and
//!   never forwarded: the kernel then raises the BSD signal in that task, whose handlers
//!   (memsnap's, inherited in a fork child) see it. Forwarding would copy its thread and
//!   task ports, which are immovable when Developer Mode is off, and copying an immovable
//!   send right raises a fatal guard exception in the sender (`osfmk/ipc/ipc_policy.c`,
//!   `mach_port_guard_exception_immovable`; `osfmk/ipc/ipc_right.c`).
//! - A write to tracked memory is resolved by the engine; when memory changes are
//!   disallowed by another thread the engine answers "later" instead of waiting, and the
//!   request waits here while the server goes on receiving, so a write by the thread that
//!   disallowed changes is still examined (and aborts with the Linux message).
//! - Anything else goes to the handler installed before memsnap's, asynchronously: the
//!   request is sent with a reply port of one of [`SLOTS`] forwarding slots and the
//!   kernel's request stays pending until that reply arrives, so a slow earlier handler
//!   (or one that writes tracked memory while handling) does not stall the server.
//!
//! Pure logic over crafted requests: the Linux unit tests (and Miri) run it with a fake
//! [`Env`]; `macos/exc_server.rs` implements [`Env`] with the Mach calls.
#![cfg_attr(not(target_os = "macos"), allow(dead_code))]

use super::mach_exc::{
    candidate_address, plan_forward, Forward, Header, OldHandler, Request, KERN_FAILURE,
    KERN_SUCCESS,
};

/// Requests that can wait at once (for changes to be allowed, or for a forwarding slot).
pub const WAIT_MAX: usize = 256;
/// Forwarded requests that can be pending at once (one reply port each).
pub const SLOTS: usize = 8;

/// The bits of a fault address that are the address on arm64. xnu runs user space with
/// top-byte-ignore for data (`osfmk/arm64/proc_reg.h`, `TCR_TBI0_TOPBYTE_IGNORED`), and
/// `handle_user_abort` (`osfmk/arm64/sleh.c`) resolves the fault at the stripped address
/// (`VM_USER_STRIP_TBI`) but reports the raw one in `code[1]` (and `si_addr`).
const TBI_MASK: u64 = (1 << 56) - 1;

/// The fault address without a top-byte tag (arm64), as memsnap's page table knows it.
pub fn untag(addr: usize, arm64: bool) -> usize {
    if arm64 {
        (addr as u64 & TBI_MASK) as usize
    } else {
        addr
    }
}

/// How sending a forwarded request went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Forwarding {
    /// Sent; the answer comes on the slot's reply port.
    Sent,
    /// The handler's queue is full: try again later (nothing was sent).
    Busy,
    /// It cannot be sent (its port is dead, the thread state cannot be read).
    Failed,
}

/// The Mach calls around the decisions.
pub trait Env {
    /// Whether the request's task is this one.
    fn own_task(&mut self, req: &Request) -> bool;
    /// Whether the stopped thread's fault was a write (`true` when unknown).
    fn is_write(&mut self, req: &Request) -> bool;
    /// The engine's answer for a write to `addr` by the request's thread: resolved,
    /// not memsnap's, or `None`: memory changes are disallowed by another thread, ask
    /// again later. (A write by the thread that disallowed them aborts in there.)
    fn resolve(&mut self, req: &Request, addr: usize) -> Option<bool>;
    /// Sends `req` to the earlier handler `fwd` with the reply port of slot `slot`.
    fn send_forward(&mut self, req: &Request, fwd: &Forward, slot: usize) -> Forwarding;
    /// Answers the kernel's request and releases the ports it brought.
    fn reply(&mut self, req: &Request, ret: i32);
    /// Lets other threads run (used only when [`WAIT_MAX`] requests already wait).
    fn pause(&mut self);
}

#[derive(Clone, Copy, Debug)]
struct Waiting {
    req: Request,
    /// The (untagged) fault address while waiting for changes to be allowed.
    addr: usize,
    /// Set once the request is to be forwarded: it waits for a slot.
    fwd: Option<Forward>,
}

const NO_HEADER: Header = Header {
    bits: 0,
    size: 0,
    remote: 0,
    local: 0,
    voucher: 0,
    id: 0,
};
const NO_REQUEST: Request = Request {
    header: NO_HEADER,
    thread: 0,
    task: 0,
    exception: 0,
    code_count: 0,
    codes: [0; 2],
};

/// The server's pending requests. Lives in memory the server maps (no allocation).
pub struct Server {
    waiting: [Waiting; WAIT_MAX],
    n_waiting: usize,
    slots: [Option<(Request, Forward)>; SLOTS],
    /// Strip top-byte tags from fault addresses (arm64).
    arm64: bool,
}

impl Server {
    pub const fn new(arm64: bool) -> Server {
        Server {
            waiting: [Waiting {
                req: NO_REQUEST,
                addr: 0,
                fwd: None,
            }; WAIT_MAX],
            n_waiting: 0,
            slots: [None; SLOTS],
            arm64,
        }
    }

    /// How many requests wait (the server polls while any does).
    pub fn waiting(&self) -> usize {
        self.n_waiting
    }

    /// The request forwarded on `slot`, whose reply has not arrived yet.
    pub fn forwarded(&self, slot: usize) -> Option<(Request, Forward)> {
        *self.slots.get(slot)?
    }

    /// Handles a request the kernel sent.
    pub fn on_request(&mut self, req: Request, old: &[OldHandler], env: &mut impl Env) {
        if !env.own_task(&req) {
            env.reply(&req, KERN_FAILURE);
            return;
        }
        if let Some(addr) = candidate_address(&req, req.task) {
            let addr = untag(addr, self.arm64);
            if env.is_write(&req) {
                match env.resolve(&req, addr) {
                    Some(true) => return env.reply(&req, KERN_SUCCESS),
                    Some(false) => {}
                    None => {
                        if self.push(req, addr, None) {
                            return;
                        }
                        // Full: wait for this one here (see WAIT_MAX).
                        loop {
                            env.pause();
                            match env.resolve(&req, addr) {
                                Some(true) => return env.reply(&req, KERN_SUCCESS),
                                Some(false) => break,
                                None => {}
                            }
                        }
                    }
                }
            }
        }
        self.pass(req, old, env);
    }

    /// Passes the answer to the request forwarded on `slot` (the earlier handler's
    /// return code, `KERN_FAILURE` when its reply was unreadable) to the kernel, frees the
    /// slot and sends what waited for one.
    pub fn on_forward_reply(
        &mut self,
        slot: usize,
        ret: i32,
        old: &[OldHandler],
        env: &mut impl Env,
    ) {
        if let Some((req, _)) = self.slots.get_mut(slot).and_then(Option::take) {
            env.reply(&req, ret);
        }
        self.retry(old, env);
    }

    /// Asks again for every waiting request: the engine for those waiting for changes
    /// to be allowed, a free slot for those waiting to be forwarded. Oldest first.
    pub fn retry(&mut self, old: &[OldHandler], env: &mut impl Env) {
        let mut i = 0;
        while i < self.n_waiting {
            let w = self.waiting[i];
            let fwd = match w.fwd {
                Some(f) => f,
                None => match env.resolve(&w.req, w.addr) {
                    None => {
                        i += 1;
                        continue;
                    }
                    Some(true) => {
                        env.reply(&w.req, KERN_SUCCESS);
                        self.remove(i);
                        continue;
                    }
                    Some(false) => match plan_forward(old, w.req.exception) {
                        None => {
                            env.reply(&w.req, KERN_FAILURE);
                            self.remove(i);
                            continue;
                        }
                        Some(f) => {
                            self.waiting[i].fwd = Some(f);
                            f
                        }
                    },
                },
            };
            match self.send(&w.req, &fwd, env) {
                Forwarding::Busy => i += 1,
                Forwarding::Sent | Forwarding::Failed => self.remove(i),
            }
        }
    }

    /// Forwards `req`, or answers `KERN_FAILURE` when there is no earlier handler to
    /// forward to (the kernel then raises the BSD signal).
    fn pass(&mut self, req: Request, old: &[OldHandler], env: &mut impl Env) {
        let Some(fwd) = plan_forward(old, req.exception) else {
            return env.reply(&req, KERN_FAILURE);
        };
        // Requests already waiting for a slot go first.
        let queued = self.waiting[..self.n_waiting]
            .iter()
            .any(|w| w.fwd.is_some());
        if !queued && self.send(&req, &fwd, env) != Forwarding::Busy {
            return;
        }
        if !self.push(req, 0, Some(fwd)) {
            env.reply(&req, KERN_FAILURE);
        }
    }

    /// Sends `req` on a free slot; `Busy` when there is none or the handler's queue is
    /// full. Answers `KERN_FAILURE` itself when it fails.
    fn send(&mut self, req: &Request, fwd: &Forward, env: &mut impl Env) -> Forwarding {
        let Some(slot) = self.slots.iter().position(Option::is_none) else {
            return Forwarding::Busy;
        };
        let sent = env.send_forward(req, fwd, slot);
        match sent {
            Forwarding::Sent => self.slots[slot] = Some((*req, *fwd)),
            Forwarding::Failed => env.reply(req, KERN_FAILURE),
            Forwarding::Busy => {}
        }
        sent
    }

    fn push(&mut self, req: Request, addr: usize, fwd: Option<Forward>) -> bool {
        if self.n_waiting == WAIT_MAX {
            return false;
        }
        self.waiting[self.n_waiting] = Waiting { req, addr, fwd };
        self.n_waiting += 1;
        true
    }

    fn remove(&mut self, i: usize) {
        self.waiting.copy_within(i + 1..self.n_waiting, i);
        self.n_waiting -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::super::mach_exc::{
        EXCEPTION_DEFAULT, EXC_BAD_ACCESS, EXC_MASK_BAD_ACCESS, KERN_PROTECTION_FAILURE,
        MACH_EXCEPTION_CODES,
    };
    use super::*;

    const TASK: u32 = 0x203;
    const CHILD_TASK: u32 = 0x307;
    /// The tracked addresses the fake engine knows; `LOCKED` answers "later" while
    /// `allowed` is false.
    const TRACKED: usize = 0x1_0000_4000;
    const UNTRACKED: usize = 0x2_0000_0000;

    fn request(thread: u32, task: u32, code0: i64, addr: usize) -> Request {
        Request {
            header: Header {
                remote: 0x1700 + thread,
                id: 2405,
                ..NO_HEADER
            },
            thread,
            task,
            exception: EXC_BAD_ACCESS,
            code_count: 2,
            codes: [code0, addr as i64],
        }
    }

    fn fault(thread: u32, addr: usize) -> Request {
        request(thread, TASK, KERN_PROTECTION_FAILURE as i64, addr)
    }

    /// What the server did, in order.
    #[derive(Debug, PartialEq, Eq, Clone, Copy)]
    enum Event {
        Resolve(u32, usize),
        Forward(u32, usize),
        Reply(u32, i32),
    }

    struct Fake {
        events: Vec<Event>,
        allowed: bool,
        /// The thread that disallowed changes: its write "aborts" (recorded).
        disallower: u32,
        aborted: Option<u32>,
        busy: bool,
        dead: bool,
    }

    impl Fake {
        fn new() -> Fake {
            Fake {
                events: Vec::new(),
                allowed: true,
                disallower: 0,
                aborted: None,
                busy: false,
                dead: false,
            }
        }
        fn take(&mut self) -> Vec<Event> {
            core::mem::take(&mut self.events)
        }
    }

    impl Env for Fake {
        fn own_task(&mut self, req: &Request) -> bool {
            req.task == TASK
        }
        fn is_write(&mut self, _req: &Request) -> bool {
            true
        }
        fn resolve(&mut self, req: &Request, addr: usize) -> Option<bool> {
            self.events.push(Event::Resolve(req.thread, addr));
            if addr != TRACKED {
                return Some(false);
            }
            if !self.allowed {
                if req.thread == self.disallower {
                    self.aborted = Some(req.thread);
                }
                return None;
            }
            Some(true)
        }
        fn send_forward(&mut self, req: &Request, _fwd: &Forward, slot: usize) -> Forwarding {
            if self.dead {
                return Forwarding::Failed;
            }
            if self.busy {
                return Forwarding::Busy;
            }
            self.events.push(Event::Forward(req.thread, slot));
            Forwarding::Sent
        }
        fn reply(&mut self, req: &Request, ret: i32) {
            self.events.push(Event::Reply(req.thread, ret));
        }
        fn pause(&mut self) {
            self.allowed = true;
        }
    }

    fn earlier_handler() -> [OldHandler; 1] {
        [OldHandler {
            mask: EXC_MASK_BAD_ACCESS,
            port: 0x503,
            behavior: EXCEPTION_DEFAULT | MACH_EXCEPTION_CODES,
            flavor: 0,
        }]
    }

    use Event::{Forward as Fwd, Reply, Resolve};

    #[test]
    fn other_tasks_requests_are_refused_and_never_forwarded() {
        let old = earlier_handler();
        let mut s = Server::new(false);
        let mut env = Fake::new();
        // A fork child's write to a page that is protected in it too, and its real crash:
        // neither reaches the engine nor the earlier handler.
        let child = request(5, CHILD_TASK, KERN_PROTECTION_FAILURE as i64, TRACKED);
        s.on_request(child, &old, &mut env);
        s.on_request(request(6, CHILD_TASK, 1, 0), &old, &mut env);
        assert_eq!(
            env.take(),
            vec![Reply(5, KERN_FAILURE), Reply(6, KERN_FAILURE)]
        );
        assert_eq!(s.waiting(), 0);
        assert!((0..SLOTS).all(|i| s.forwarded(i).is_none()));
    }

    #[test]
    fn a_waiting_write_does_not_hide_the_next_request() {
        let old = earlier_handler();
        let mut s = Server::new(false);
        let mut env = Fake {
            allowed: false,
            disallower: 9,
            ..Fake::new()
        };
        // Thread 3 writes while thread 9 has disallowed changes: it waits.
        s.on_request(fault(3, TRACKED), &old, &mut env);
        assert_eq!(env.take(), vec![Resolve(3, TRACKED)]);
        assert_eq!(s.waiting(), 1);
        // The disallower's own write is examined (and aborts), not queued unseen.
        s.on_request(fault(9, TRACKED), &old, &mut env);
        assert_eq!(env.aborted, Some(9));
        // Another thread's unrelated crash is passed on meanwhile.
        env.take();
        s.on_request(fault(4, UNTRACKED), &old, &mut env);
        assert_eq!(env.take(), vec![Resolve(4, UNTRACKED), Fwd(4, 0)]);
        // Changes allowed again: the waiting writes are resolved and answered in order.
        env.allowed = true;
        s.retry(&old, &mut env);
        assert_eq!(
            env.take(),
            vec![
                Resolve(3, TRACKED),
                Reply(3, KERN_SUCCESS),
                Resolve(9, TRACKED),
                Reply(9, KERN_SUCCESS)
            ]
        );
        assert_eq!(s.waiting(), 0);
    }

    #[test]
    fn a_pending_forward_does_not_block_tracked_writes() {
        let old = earlier_handler();
        let mut s = Server::new(false);
        let mut env = Fake::new();
        s.on_request(fault(3, UNTRACKED), &old, &mut env);
        assert_eq!(env.take(), vec![Resolve(3, UNTRACKED), Fwd(3, 0)]);
        // The earlier handler has not answered; a write to tracked memory (its own,
        // say) is resolved at once.
        s.on_request(fault(7, TRACKED), &old, &mut env);
        assert_eq!(
            env.take(),
            vec![Resolve(7, TRACKED), Reply(7, KERN_SUCCESS)]
        );
        assert_eq!(s.forwarded(0).map(|(r, _)| r.thread), Some(3));
        // Its answer is passed to the kernel for the request it belongs to.
        s.on_forward_reply(0, KERN_SUCCESS, &old, &mut env);
        assert_eq!(env.take(), vec![Reply(3, KERN_SUCCESS)]);
        assert!(s.forwarded(0).is_none());
        // A reply on an idle slot answers nothing.
        s.on_forward_reply(0, KERN_SUCCESS, &old, &mut env);
        assert!(env.take().is_empty());
    }

    #[test]
    fn forwards_wait_for_a_slot_in_order() {
        let old = earlier_handler();
        let mut s = Server::new(false);
        let mut env = Fake::new();
        for t in 0..SLOTS as u32 + 2 {
            s.on_request(fault(100 + t, UNTRACKED), &old, &mut env);
        }
        assert_eq!(s.waiting(), 2);
        env.take();
        s.on_forward_reply(3, 5, &old, &mut env);
        assert_eq!(env.take(), vec![Reply(103, 5), Fwd(100 + SLOTS as u32, 3)]);
        // The handler's queue is full: the request stays, nothing is answered.
        env.busy = true;
        s.on_forward_reply(0, KERN_SUCCESS, &old, &mut env);
        assert_eq!(env.take(), vec![Reply(100, KERN_SUCCESS)]);
        assert_eq!(s.waiting(), 1);
        env.busy = false;
        s.retry(&old, &mut env);
        assert_eq!(env.take(), vec![Fwd(101 + SLOTS as u32, 0)]);
        // A handler whose port died: KERN_FAILURE (the BSD signal) at once.
        env.dead = true;
        s.on_forward_reply(1, KERN_SUCCESS, &old, &mut env);
        s.on_request(fault(1, UNTRACKED), &old, &mut env);
        assert_eq!(
            env.take(),
            vec![
                Reply(101, KERN_SUCCESS),
                Resolve(1, UNTRACKED),
                Reply(1, KERN_FAILURE)
            ]
        );
        // No earlier handler: KERN_FAILURE.
        s.on_request(fault(2, UNTRACKED), &[], &mut env);
        assert_eq!(
            env.take(),
            vec![Resolve(2, UNTRACKED), Reply(2, KERN_FAILURE)]
        );
    }

    #[test]
    fn a_full_wait_list_waits_in_place() {
        let old = earlier_handler();
        let mut s = Server::new(false);
        let mut env = Fake {
            allowed: false,
            disallower: 1,
            ..Fake::new()
        };
        for t in 0..WAIT_MAX as u32 {
            s.on_request(fault(1000 + t, TRACKED), &old, &mut env);
        }
        assert_eq!(s.waiting(), WAIT_MAX);
        env.take();
        // `pause` allows changes in the fake: the extra request is resolved in place.
        s.on_request(fault(7, TRACKED), &old, &mut env);
        assert_eq!(
            env.take(),
            vec![
                Resolve(7, TRACKED),
                Resolve(7, TRACKED),
                Reply(7, KERN_SUCCESS)
            ]
        );
    }

    #[test]
    fn arm64_tags_are_stripped() {
        let old = earlier_handler();
        let tagged = TRACKED | 0x5a << 56;
        for (arm64, seen) in [(true, TRACKED), (false, tagged)] {
            let mut s = Server::new(arm64);
            let mut env = Fake::new();
            s.on_request(fault(3, tagged), &old, &mut env);
            assert_eq!(env.take()[0], Resolve(3, seen));
        }
        assert_eq!(untag(usize::MAX, true), (1 << 56) - 1);
        assert_eq!(untag(0x1234, true), 0x1234);
    }
}
