//! Fault capture on a Mach exception port: one task-level port for `EXC_BAD_ACCESS`
//! (behavior `EXCEPTION_DEFAULT | MACH_EXCEPTION_CODES`, so the fault address is the
//! 64-bit `code[1]`), served by one library thread.
//!
//! The server thread runs on a stack this module maps and keeps its message buffers
//! there too; it never touches tracked memory or the Rust allocator (a fault of its own
//! would be delivered to the port it serves: a deadlock). It receives on a port set: the
//! exception port and the reply ports of [`SLOTS`] forwarding slots. What each request
//! gets is decided by `sys::mach_serve` (pure, unit-tested on Linux), through the
//! byte-level seam in `sys::mach_exc`; this module implements its [`Env`] with the Mach
//! calls:
//! - another task's request (a fork or spawn child inherits the port): `KERN_FAILURE` at
//!   once, never forwarded;
//! - a write to tracked memory (`KERN_PROTECTION_FAILURE` in this task, a write per the
//!   thread's exception state, and the engine agrees): `KERN_SUCCESS`, the thread retries
//!   the instruction; while memory changes are disallowed by another thread, the request
//!   waits (the server polls every millisecond) and the server goes on receiving;
//! - anything else: forwarded to the handler installed before ours (found with
//!   `task_swap_exception_ports`), in that handler's own behavior (`EXCEPTION_DEFAULT`,
//!   `_STATE` or `_STATE_IDENTITY`, 32- or 64-bit codes, its state flavor; state it
//!   returns is applied with `thread_set_state`) without waiting for it: its answer
//!   arrives on the slot's reply port and is passed on then. With no such handler, or one
//!   with a behavior we do not speak (the identity-protected ones), `KERN_FAILURE`, and
//!   the kernel delivers the BSD signal (SIGBUS/SIGSEGV) so that crash reporters,
//!   debuggers and the default action still see real crashes.

use super::super::mach_exc::{
    self, build_forward, build_reply, parse_forward_reply, parse_request, read_header, Forward,
    OldHandler, Request, EXCEPTION_DEFAULT, EXC_MASK_BAD_ACCESS, KERN_FAILURE, KERN_SUCCESS,
    MACH_EXCEPTION_CODES, MAX_MESSAGE, MIG_BAD_ARGUMENTS, MIG_BAD_ID, STATE_MAX_WORDS,
};
use super::super::mach_serve::{Env, Forwarding, Server, SLOTS};
use super::{Shared, MAX_OLD};
use core::sync::atomic::Ordering;
use mach2::mach_port::{
    mach_port_allocate, mach_port_deallocate, mach_port_destroy, mach_port_insert_right,
};
use mach2::message::{
    mach_msg, mach_msg_destroy, mach_msg_header_t, MACH_MSG_TIMEOUT_NONE, MACH_MSG_TYPE_MAKE_SEND,
    MACH_RCV_INTERRUPTED, MACH_RCV_MSG, MACH_RCV_TIMED_OUT, MACH_RCV_TIMEOUT, MACH_RCV_TOO_LARGE,
    MACH_SEND_MSG, MACH_SEND_TIMED_OUT, MACH_SEND_TIMEOUT,
};
use mach2::port::{mach_port_t, MACH_PORT_NULL, MACH_PORT_RIGHT_PORT_SET, MACH_PORT_RIGHT_RECEIVE};
use mach2::task::{task_get_exception_ports, task_set_exception_ports, task_swap_exception_ports};
use mach2::thread_act::{thread_get_state, thread_set_state};
use mach2::thread_status::THREAD_STATE_NONE;
use mach2::traps::mach_task_self;

/// Room for the largest message plus the largest receive trailer.
const BUF: usize = MAX_MESSAGE + 256;
const STACK_BYTES: usize = 256 << 10;
/// How often waiting requests are asked about again, in milliseconds.
const POLL_MS: u32 = 1;

/// The server thread's memory: buffers and bookkeeping first, its stack above them.
#[repr(C, align(16))]
struct ServerMem {
    request: [u8; BUF],
    reply: [u8; 64],
    forward: [u8; BUF],
    state: [u32; STATE_MAX_WORDS],
    /// The port set received on, and the forwarding slots' reply ports.
    port_set: mach_port_t,
    reply_ports: [mach_port_t; SLOTS],
    server: Server,
}

/// The flavor and size of the exception state (`far`/`esr`, or `trapno`/`err`/`faultvaddr`)
/// that says whether a fault was a write.
#[cfg(target_arch = "aarch64")]
const EXCEPTION_STATE: (i32, u32) = (7, 4); // ARM_EXCEPTION_STATE64
#[cfg(target_arch = "x86_64")]
const EXCEPTION_STATE: (i32, u32) = (6, 4); // x86_EXCEPTION_STATE64

/// Allocates a receive right and adds it to `set`.
///
/// # Safety
/// `set` is a port set of this task.
unsafe fn member_port(task: mach_port_t, set: mach_port_t) -> Option<mach_port_t> {
    extern "C" {
        // In libSystem; mach2 does not declare it. (Inside the function so that cbindgen
        // keeps it out of the public header.)
        fn mach_port_insert_member(task: mach_port_t, name: mach_port_t, pset: mach_port_t) -> i32;
    }
    let mut port: mach_port_t = MACH_PORT_NULL;
    // SAFETY: Mach calls on our own task with an out-pointer to a local.
    unsafe {
        if mach_port_allocate(task, MACH_PORT_RIGHT_RECEIVE, &mut port) != KERN_SUCCESS {
            return None;
        }
        if mach_port_insert_member(task, port, set) != KERN_SUCCESS {
            mach_port_destroy(task, port);
            return None;
        }
    }
    Some(port)
}

/// Creates the ports, starts the server and swaps the port in for `EXC_BAD_ACCESS`.
pub(super) fn install(s: &'static Shared) -> Result<(), i32> {
    // SAFETY: Mach calls on our own task with out-pointers to locals; the server memory
    // is a fresh library mapping handed to the new thread for good.
    unsafe {
        let task = mach_task_self();
        let mem_bytes = core::mem::size_of::<ServerMem>().next_multiple_of(super::os_page_size());
        // pthread_attr_setstack wants a page-aligned stack whose size is whole pages.
        let block = super::reserve(mem_bytes + STACK_BYTES).ok_or(libc::ENOMEM)?;
        let mem = block as *mut ServerMem;
        // The mapping is zero-filled; the bookkeeping gets its real initial value.
        core::ptr::addr_of_mut!((*mem).server).write(Server::new(cfg!(target_arch = "aarch64")));
        let mut set: mach_port_t = MACH_PORT_NULL;
        let release = |set: mach_port_t, ports: &[mach_port_t]| {
            for &p in ports {
                if p != MACH_PORT_NULL {
                    mach_port_destroy(task, p);
                }
            }
            if set != MACH_PORT_NULL {
                mach_port_destroy(task, set);
            }
            super::release(block, mem_bytes + STACK_BYTES);
        };
        if mach_port_allocate(task, MACH_PORT_RIGHT_PORT_SET, &mut set) != KERN_SUCCESS {
            release(MACH_PORT_NULL, &[]);
            return Err(libc::EAGAIN);
        }
        let Some(port) = member_port(task, set) else {
            release(set, &[]);
            return Err(libc::EAGAIN);
        };
        if mach_port_insert_right(task, port, port, MACH_MSG_TYPE_MAKE_SEND) != KERN_SUCCESS {
            release(set, &[port]);
            return Err(libc::EAGAIN);
        }
        (*mem).port_set = set;
        for i in 0..SLOTS {
            match member_port(task, set) {
                Some(p) => (*mem).reply_ports[i] = p,
                None => {
                    release(set, &(*mem).reply_ports);
                    mach_port_destroy(task, port);
                    return Err(libc::EAGAIN);
                }
            }
        }
        s.own[1].0.store(block as usize, Ordering::Relaxed);
        s.own[1].1.store(mem_bytes + STACK_BYTES, Ordering::Relaxed);
        s.task.store(task, Ordering::Relaxed);
        s.port.store(port, Ordering::Release);
        let destroy_all = || {
            // The server sees its port set die and returns.
            mach_port_destroy(task, port);
            for &p in &(*mem).reply_ports {
                mach_port_destroy(task, p);
            }
            mach_port_destroy(task, set);
        };
        if let Err(e) = super::super::spawn(
            block.add(mem_bytes),
            STACK_BYTES,
            server_main,
            block as *mut libc::c_void,
        ) {
            destroy_all();
            return Err(e);
        }
        let old = &mut *s.old.get();
        let mut masks = [0u32; MAX_OLD];
        let mut ports = [0u32; MAX_OLD];
        let mut behaviors = [0i32; MAX_OLD];
        let mut flavors = [0i32; MAX_OLD];
        let mut count = MAX_OLD as u32;
        let kr = task_swap_exception_ports(
            task,
            EXC_MASK_BAD_ACCESS,
            port,
            (EXCEPTION_DEFAULT | MACH_EXCEPTION_CODES) as i32,
            THREAD_STATE_NONE,
            masks.as_mut_ptr(),
            &mut count,
            ports.as_mut_ptr(),
            behaviors.as_mut_ptr(),
            flavors.as_mut_ptr(),
        );
        if kr != KERN_SUCCESS {
            destroy_all();
            return Err(libc::EPERM);
        }
        let n = (count as usize).min(MAX_OLD);
        for i in 0..n {
            old[i] = OldHandler {
                mask: masks[i],
                port: ports[i],
                behavior: behaviors[i] as u32,
                flavor: flavors[i],
            };
        }
        s.old_count.store(n, Ordering::Release);
    }
    Ok(())
}

/// In a forked child: the task's exception port still names the parent's server. Point
/// `EXC_BAD_ACCESS` nowhere, so the kernel raises the BSD signal in the child.
pub(super) fn uninstall_in_child() {
    // SAFETY: a Mach call on our own task.
    unsafe {
        task_set_exception_ports(
            mach_task_self(),
            EXC_MASK_BAD_ACCESS,
            MACH_PORT_NULL,
            EXCEPTION_DEFAULT as i32,
            THREAD_STATE_NONE,
        );
    }
}

/// Whether `EXC_BAD_ACCESS` still goes to our port.
pub(super) fn still_installed(s: &Shared) -> bool {
    let mut masks = [0u32; MAX_OLD];
    let mut ports = [0u32; MAX_OLD];
    let mut behaviors = [0i32; MAX_OLD];
    let mut flavors = [0i32; MAX_OLD];
    let mut count = MAX_OLD as u32;
    // SAFETY: Mach calls on our own task with arrays of the advertised capacity; each
    // returned port is a send right we then release.
    unsafe {
        let task = mach_task_self();
        if task_get_exception_ports(
            task,
            EXC_MASK_BAD_ACCESS,
            masks.as_mut_ptr(),
            &mut count,
            ports.as_mut_ptr(),
            behaviors.as_mut_ptr(),
            flavors.as_mut_ptr(),
        ) != KERN_SUCCESS
        {
            return false;
        }
        let n = (count as usize).min(MAX_OLD);
        let mine = s.port.load(Ordering::Relaxed);
        let ours = (0..n).any(|i| masks[i] & EXC_MASK_BAD_ACCESS != 0 && ports[i] == mine);
        for &p in &ports[..n] {
            if p != MACH_PORT_NULL && p != mach_exc::MACH_PORT_DEAD {
                mach_port_deallocate(task, p);
            }
        }
        ours
    }
}

extern "C" fn server_main(arg: *mut libc::c_void) -> *mut libc::c_void {
    let Some(s) = super::shared() else {
        return core::ptr::null_mut();
    };
    // SAFETY: `arg` is the ServerMem block `install` mapped and initialized for this
    // thread alone.
    let mem = unsafe { &mut *(arg as *mut ServerMem) };
    s.server_tid.store(super::raw_tid(), Ordering::Release);
    let exception_port = s.port.load(Ordering::Acquire);
    loop {
        let waiting = mem.server.waiting() > 0;
        // SAFETY: receiving into a buffer of BUF bytes this thread owns.
        let kr = unsafe {
            mach_msg(
                mem.request.as_mut_ptr() as *mut mach_msg_header_t,
                MACH_RCV_MSG | if waiting { MACH_RCV_TIMEOUT } else { 0 },
                0,
                BUF as u32,
                mem.port_set,
                if waiting {
                    POLL_MS
                } else {
                    MACH_MSG_TIMEOUT_NONE
                },
                MACH_PORT_NULL,
            )
        };
        let mut env = MachEnv {
            s,
            forward: &mut mem.forward,
            state: &mut mem.state,
            reply: &mut mem.reply,
            reply_ports: &mem.reply_ports,
        };
        match kr {
            KERN_SUCCESS => {
                let local = read_header(&mem.request).map_or(MACH_PORT_NULL, |h| h.local);
                if local == exception_port {
                    serve_request(s, &mut mem.request, &mut mem.server, &mut env);
                } else if let Some(slot) = mem.reply_ports.iter().position(|&p| p == local) {
                    serve_forward_reply(s, slot, &mut mem.request, &mut mem.server, &mut env);
                } else {
                    // SAFETY: a received message, whose rights are ours.
                    unsafe { mach_msg_destroy(mem.request.as_mut_ptr() as *mut mach_msg_header_t) };
                }
            }
            // Interrupted, timed out (waiting requests are asked about below), or a
            // message larger than any exception request (the kernel destroyed it).
            MACH_RCV_INTERRUPTED | MACH_RCV_TIMED_OUT | MACH_RCV_TOO_LARGE => {}
            // The port set is gone (install failed, or it was destroyed): stop.
            _ => return core::ptr::null_mut(),
        }
        if mem.server.waiting() > 0 {
            mem.server.retry(s.old_handlers(), &mut env);
        }
    }
}

/// Sends the `size`-byte message at the start of `buf`, waiting for queue space for at
/// most `timeout_ms` when given.
///
/// # Safety
/// `buf` holds a well-formed message whose rights are ours to send.
unsafe fn send(buf: &mut [u8], size: usize, timeout_ms: Option<u32>) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        mach_msg(
            buf.as_mut_ptr() as *mut mach_msg_header_t,
            MACH_SEND_MSG
                | if timeout_ms.is_some() {
                    MACH_SEND_TIMEOUT
                } else {
                    0
                },
            size as u32,
            0,
            MACH_PORT_NULL,
            timeout_ms.unwrap_or(MACH_MSG_TIMEOUT_NONE),
            MACH_PORT_NULL,
        )
    }
}

/// Answers one message received on the exception port.
fn serve_request(s: &Shared, buf: &mut [u8; BUF], server: &mut Server, env: &mut MachEnv) {
    match parse_request(buf) {
        Ok(req) => server.on_request(req, s.old_handlers(), env),
        Err(e) => {
            // Not an exception request: answer as a MIG server would and release the
            // rights it carried (but the reply right, which the answer consumed).
            let Some(mut h) = read_header(buf) else {
                return;
            };
            let code = match e {
                mach_exc::ParseError::BadId(_) => MIG_BAD_ID,
                _ => MIG_BAD_ARGUMENTS,
            };
            if h.remote != MACH_PORT_NULL {
                let n = build_reply(&h, code, env.reply);
                // SAFETY: a reply to the request's own reply right.
                unsafe { send(env.reply, n, None) };
                h.remote = MACH_PORT_NULL;
                buf[8..12].copy_from_slice(&h.remote.to_le_bytes());
            }
            // SAFETY: the received message, whose remaining rights are ours.
            unsafe { mach_msg_destroy(buf.as_mut_ptr() as *mut mach_msg_header_t) };
        }
    }
}

/// Passes on the earlier handler's answer received on `slot`'s reply port.
fn serve_forward_reply(
    s: &Shared,
    slot: usize,
    buf: &mut [u8; BUF],
    server: &mut Server,
    env: &mut MachEnv,
) {
    let Some((req, fwd)) = server.forwarded(slot) else {
        // Nothing is forwarded on this slot: a stray message.
        // SAFETY: the received message, whose rights are ours.
        unsafe { mach_msg_destroy(buf.as_mut_ptr() as *mut mach_msg_header_t) };
        return;
    };
    // A send-once notification (the handler dropped our reply right unanswered) or a
    // malformed reply fails the request, as no handler would have.
    let ret = match parse_forward_reply(&fwd, buf, env.state) {
        Ok(r) => {
            if let Some((flavor, count)) = r.new_state {
                // SAFETY: the state the old handler returned for this thread, `count`
                // words in `state`.
                unsafe {
                    thread_set_state(req.thread, flavor, env.state.as_mut_ptr(), count as u32)
                };
            }
            r.ret
        }
        Err(_) => {
            // SAFETY: the received message, whose rights are ours.
            unsafe { mach_msg_destroy(buf.as_mut_ptr() as *mut mach_msg_header_t) };
            KERN_FAILURE
        }
    };
    server.on_forward_reply(slot, ret, s.old_handlers(), env);
}

/// The Mach side of the server's decisions (`sys::mach_serve::Env`).
struct MachEnv<'a> {
    s: &'a Shared,
    forward: &'a mut [u8; BUF],
    state: &'a mut [u32; STATE_MAX_WORDS],
    reply: &'a mut [u8; 64],
    reply_ports: &'a [mach_port_t; SLOTS],
}

impl Env for MachEnv<'_> {
    /// The request's task port is this task's: the name saved at install, or one that
    /// names a task with our pid (should the kernel send a different port of this task
    /// than `mach_task_self()`, e.g. a movable control port next to the pinned one).
    fn own_task(&mut self, req: &Request) -> bool {
        extern "C" {
            // A Mach trap in libSystem; mach2 does not declare it. (Declared here so that
            // cbindgen keeps it out of the public header.)
            fn pid_for_task(task: mach_port_t, pid: *mut libc::c_int) -> i32;
        }
        if req.task == self.s.task.load(Ordering::Relaxed) {
            return req.task != MACH_PORT_NULL;
        }
        let mut pid = 0;
        // SAFETY: an out-pointer to a local; the task port is a right the request gave us.
        let kr = unsafe { pid_for_task(req.task, &mut pid) };
        // SAFETY: getpid has no preconditions.
        kr == KERN_SUCCESS && pid == unsafe { libc::getpid() }
    }

    fn is_write(&mut self, req: &Request) -> bool {
        is_write(req.thread)
    }

    fn resolve(&mut self, req: &Request, addr: usize) -> Option<bool> {
        let Some(callback) = self.s.served() else {
            return Some(false);
        };
        let tid = super::threads::thread_id(req.thread).unwrap_or(0);
        self.s.faulting_tid.store(tid, Ordering::Relaxed);
        let answer = callback(addr, tid);
        self.s.faulting_tid.store(0, Ordering::Relaxed);
        answer
    }

    fn send_forward(&mut self, req: &Request, fwd: &Forward, slot: usize) -> Forwarding {
        let reply_port = self.reply_ports[slot];
        let mut words = 0usize;
        if fwd.carries_state() {
            let mut count = STATE_MAX_WORDS as u32;
            // SAFETY: `state` holds STATE_MAX_WORDS words.
            let kr = unsafe {
                thread_get_state(req.thread, fwd.flavor, self.state.as_mut_ptr(), &mut count)
            };
            if kr != KERN_SUCCESS {
                return Forwarding::Failed;
            }
            words = (count as usize).min(STATE_MAX_WORDS);
        }
        let Some(n) = build_forward(fwd, req, reply_port, &self.state[..words], self.forward)
        else {
            return Forwarding::Failed;
        };
        // Never blocks: a handler whose queue is full is tried again later.
        // SAFETY: sends the request, copying our send rights to the thread, task and old
        // handler ports and making a send-once right to the slot's reply port.
        let kr = unsafe { send(self.forward, n, Some(0)) };
        if kr == KERN_SUCCESS {
            return Forwarding::Sent;
        }
        if kr == MACH_SEND_TIMED_OUT {
            // The kernel handed the message back with its rights (a pseudo-receive,
            // `osfmk/ipc/mach_msg.c`): release them.
            // SAFETY: the returned message, whose rights are ours.
            unsafe { mach_msg_destroy(self.forward.as_mut_ptr() as *mut mach_msg_header_t) };
        }
        // Destroying the send-once right made for the reply port (above, or the kernel
        // on a failed send) queues a send-once notification on it: drop it now, so that
        // the slot's next forward does not take it for its answer.
        drain(self.forward, reply_port);
        if kr == MACH_SEND_TIMED_OUT {
            Forwarding::Busy
        } else {
            Forwarding::Failed
        }
    }

    fn reply(&mut self, req: &Request, ret: i32) {
        let n = build_reply(&req.header, ret, self.reply);
        // SAFETY: the reply to the kernel's send-once reply right; the thread and task
        // ports the request moved into our space are released afterwards.
        unsafe {
            send(self.reply, n, None);
            let task = mach_task_self();
            mach_port_deallocate(task, req.thread);
            mach_port_deallocate(task, req.task);
        }
    }

    fn pause(&mut self) {
        super::yield_now();
    }
}

/// Whether the stopped thread's fault was a write; `true` when its state cannot be read
/// (as on Linux, an unknown fault is treated as a write).
fn is_write(thread: mach_port_t) -> bool {
    let mut es = [0u32; 4];
    let mut count = EXCEPTION_STATE.1;
    // SAFETY: `es` holds EXCEPTION_STATE.1 words.
    let kr = unsafe { thread_get_state(thread, EXCEPTION_STATE.0, es.as_mut_ptr(), &mut count) };
    if kr != KERN_SUCCESS {
        return true;
    }
    if cfg!(target_arch = "aarch64") {
        mach_exc::is_write_arm64(es)
    } else {
        mach_exc::is_write_x86_64(es)
    }
}

/// Discards whatever is queued on `port`, receiving into `buf`.
fn drain(buf: &mut [u8; BUF], port: mach_port_t) {
    loop {
        // SAFETY: a non-blocking receive into a buffer of BUF bytes this thread owns.
        let kr = unsafe {
            mach_msg(
                buf.as_mut_ptr() as *mut mach_msg_header_t,
                MACH_RCV_MSG | MACH_RCV_TIMEOUT,
                0,
                BUF as u32,
                port,
                0,
                MACH_PORT_NULL,
            )
        };
        if kr != KERN_SUCCESS {
            return;
        }
        // SAFETY: the received message, whose rights are ours.
        unsafe { mach_msg_destroy(buf.as_mut_ptr() as *mut mach_msg_header_t) };
    }
}
