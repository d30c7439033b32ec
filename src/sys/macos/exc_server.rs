//! Fault capture on a Mach exception port: one task-level port for `EXC_BAD_ACCESS`
//! (behavior `EXCEPTION_DEFAULT | MACH_EXCEPTION_CODES`, so the fault address is the
//! 64-bit `code[1]`), served by one library thread.
//!
//! The server thread runs on a stack this module maps and keeps its message buffers
//! there too; it never touches tracked memory or the Rust allocator (a fault of its own
//! would be delivered to the port it serves: a deadlock). For each request it decides,
//! through the byte-level seam in `sys::mach_exc`:
//! - a write to tracked memory (`KERN_PROTECTION_FAILURE` in this task, a write per the
//!   thread's exception state, and the engine's callback agrees): reply `KERN_SUCCESS`,
//!   the thread retries the instruction;
//! - anything else: forward it to the handler installed before ours (found with
//!   `task_swap_exception_ports`), in that handler's own behavior (`EXCEPTION_DEFAULT`,
//!   `_STATE` or `_STATE_IDENTITY`, 32- or 64-bit codes, its state flavor; state it
//!   returns is applied with `thread_set_state`), and pass its answer on; with no such
//!   handler, or one with a behavior we do not speak (the identity-protected ones), reply
//!   `KERN_FAILURE`, and the kernel delivers the BSD signal (SIGBUS/SIGSEGV) so that
//!   crash reporters, debuggers and the default action still see real crashes.

use super::super::mach_exc::{
    self, build_forward, build_reply, candidate_address, parse_forward_reply, parse_request,
    plan_forward, read_header, OldHandler, Request, EXCEPTION_DEFAULT, EXC_MASK_BAD_ACCESS,
    KERN_FAILURE, KERN_SUCCESS, MACH_EXCEPTION_CODES, MAX_MESSAGE, MIG_BAD_ARGUMENTS, MIG_BAD_ID,
    STATE_MAX_WORDS,
};
use super::{Shared, MAX_OLD};
use core::sync::atomic::Ordering;
use mach2::mach_port::{
    mach_port_allocate, mach_port_deallocate, mach_port_destroy, mach_port_insert_right,
};
use mach2::message::{
    mach_msg, mach_msg_destroy, mach_msg_header_t, MACH_MSG_TIMEOUT_NONE, MACH_MSG_TYPE_MAKE_SEND,
    MACH_RCV_INTERRUPTED, MACH_RCV_MSG, MACH_RCV_TIMEOUT, MACH_RCV_TOO_LARGE, MACH_SEND_MSG,
};
use mach2::port::{mach_port_t, MACH_PORT_NULL, MACH_PORT_RIGHT_RECEIVE};
use mach2::task::{task_get_exception_ports, task_set_exception_ports, task_swap_exception_ports};
use mach2::thread_act::{thread_get_state, thread_set_state};
use mach2::thread_status::THREAD_STATE_NONE;
use mach2::traps::mach_task_self;

/// Room for the largest message plus the largest receive trailer.
const BUF: usize = MAX_MESSAGE + 256;
const STACK_BYTES: usize = 256 << 10;

/// The server thread's memory: buffers first, its stack above them.
#[repr(C, align(16))]
struct ServerMem {
    request: [u8; BUF],
    reply: [u8; 64],
    forward: [u8; BUF],
    state: [u32; STATE_MAX_WORDS],
}

/// The flavor and size of the exception state (`far`/`esr`, or `trapno`/`err`/`faultvaddr`)
/// that says whether a fault was a write.
#[cfg(target_arch = "aarch64")]
const EXCEPTION_STATE: (i32, u32) = (7, 4); // ARM_EXCEPTION_STATE64
#[cfg(target_arch = "x86_64")]
const EXCEPTION_STATE: (i32, u32) = (6, 4); // x86_EXCEPTION_STATE64

/// Creates the port, starts the server and swaps the port in for `EXC_BAD_ACCESS`.
pub(super) fn install(s: &'static Shared) -> Result<(), i32> {
    // SAFETY: Mach calls on our own task with out-pointers to locals; the server memory
    // is a fresh library mapping handed to the new thread for good.
    unsafe {
        let task = mach_task_self();
        let mut port: mach_port_t = MACH_PORT_NULL;
        let mut reply_port: mach_port_t = MACH_PORT_NULL;
        if mach_port_allocate(task, MACH_PORT_RIGHT_RECEIVE, &mut port) != KERN_SUCCESS {
            return Err(libc::EAGAIN);
        }
        if mach_port_insert_right(task, port, port, MACH_MSG_TYPE_MAKE_SEND) != KERN_SUCCESS
            || mach_port_allocate(task, MACH_PORT_RIGHT_RECEIVE, &mut reply_port) != KERN_SUCCESS
        {
            mach_port_destroy(task, port);
            return Err(libc::EAGAIN);
        }
        let mem_bytes = core::mem::size_of::<ServerMem>().next_multiple_of(super::os_page_size());
        // pthread_attr_setstack wants a page-aligned stack whose size is whole pages.
        let Some(block) = super::reserve(mem_bytes + STACK_BYTES) else {
            mach_port_destroy(task, port);
            mach_port_destroy(task, reply_port);
            return Err(libc::ENOMEM);
        };
        s.own[1].0.store(block as usize, Ordering::Relaxed);
        s.own[1].1.store(mem_bytes + STACK_BYTES, Ordering::Relaxed);
        s.task.store(task, Ordering::Relaxed);
        s.port.store(port, Ordering::Relaxed);
        s.reply_port.store(reply_port, Ordering::Release);
        if let Err(e) = super::super::spawn(
            block.add(mem_bytes),
            STACK_BYTES,
            server_main,
            block as *mut libc::c_void,
        ) {
            mach_port_destroy(task, port);
            mach_port_destroy(task, reply_port);
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
            // The server sees its port die and returns.
            mach_port_destroy(task, port);
            mach_port_destroy(task, reply_port);
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
    // SAFETY: `arg` is the ServerMem block `install` mapped for this thread alone.
    let mem = unsafe { &mut *(arg as *mut ServerMem) };
    s.server_tid.store(super::raw_tid(), Ordering::Release);
    let port = s.port.load(Ordering::Relaxed);
    loop {
        // SAFETY: receiving into a buffer of BUF bytes this thread owns.
        let kr = unsafe {
            mach_msg(
                mem.request.as_mut_ptr() as *mut mach_msg_header_t,
                MACH_RCV_MSG,
                0,
                BUF as u32,
                port,
                MACH_MSG_TIMEOUT_NONE,
                MACH_PORT_NULL,
            )
        };
        match kr {
            KERN_SUCCESS => serve(s, mem),
            // Interrupted, or a message larger than any exception request (the kernel
            // destroyed it): keep serving.
            MACH_RCV_INTERRUPTED | MACH_RCV_TOO_LARGE => {}
            // The port is gone (install failed, or it was destroyed): stop.
            _ => return core::ptr::null_mut(),
        }
    }
}

/// Sends the `size`-byte message at the start of `buf`.
///
/// # Safety
/// `buf` holds a well-formed message whose rights are ours to send.
unsafe fn send(buf: &mut [u8], size: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe {
        mach_msg(
            buf.as_mut_ptr() as *mut mach_msg_header_t,
            MACH_SEND_MSG,
            size as u32,
            0,
            MACH_PORT_NULL,
            MACH_MSG_TIMEOUT_NONE,
            MACH_PORT_NULL,
        )
    }
}

/// Answers one received message.
fn serve(s: &Shared, mem: &mut ServerMem) {
    let req = match parse_request(&mem.request) {
        Ok(r) => r,
        Err(e) => {
            // Not an exception request: answer as a MIG server would and release the
            // rights it carried (but the reply right, which the answer consumed).
            let Some(mut h) = read_header(&mem.request) else {
                return;
            };
            let code = match e {
                mach_exc::ParseError::BadId(_) => MIG_BAD_ID,
                _ => MIG_BAD_ARGUMENTS,
            };
            if h.remote != MACH_PORT_NULL {
                let n = build_reply(&h, code, &mut mem.reply);
                // SAFETY: a reply to the request's own reply right.
                unsafe { send(&mut mem.reply, n) };
                h.remote = MACH_PORT_NULL;
                mem.request[8..12].copy_from_slice(&h.remote.to_le_bytes());
            }
            // SAFETY: the received message, whose remaining rights are ours.
            unsafe { mach_msg_destroy(mem.request.as_mut_ptr() as *mut mach_msg_header_t) };
            return;
        }
    };
    let ret = decide(s, mem, &req);
    let n = build_reply(&req.header, ret, &mut mem.reply);
    // SAFETY: the reply to the kernel's send-once reply right; the thread and task ports
    // the request moved into our space are released afterwards.
    unsafe {
        send(&mut mem.reply, n);
        let task = mach_task_self();
        mach_port_deallocate(task, req.thread);
        mach_port_deallocate(task, req.task);
    }
}

/// The name under which the request's task port counts as this task: the one saved at
/// install, or the request's own when it names a task with our pid (should the kernel
/// send a different port of this task than `mach_task_self()`, e.g. a movable control
/// port next to the pinned one).
fn own_task(s: &Shared, req: &Request) -> mach_port_t {
    extern "C" {
        // A Mach trap in libSystem; mach2 does not declare it. (Declared here so that
        // cbindgen keeps it out of the public header.)
        fn pid_for_task(task: mach_port_t, pid: *mut libc::c_int) -> i32;
    }
    let saved = s.task.load(Ordering::Relaxed);
    if req.task == saved {
        return saved;
    }
    let mut pid = 0;
    // SAFETY: an out-pointer to a local; the task port is a right the request gave us.
    let kr = unsafe { pid_for_task(req.task, &mut pid) };
    // SAFETY: getpid has no preconditions.
    if kr == KERN_SUCCESS && pid == unsafe { libc::getpid() } {
        req.task
    } else {
        saved
    }
}

fn decide(s: &Shared, mem: &mut ServerMem, req: &Request) -> i32 {
    if let Some(addr) = candidate_address(req, own_task(s, req)) {
        if is_write(req.thread) {
            if let Some(callback) = s.callback() {
                let tid = super::threads::thread_id(req.thread).unwrap_or(0);
                s.faulting_tid.store(tid, Ordering::Relaxed);
                let ours = callback(addr);
                s.faulting_tid.store(0, Ordering::Relaxed);
                if ours {
                    return KERN_SUCCESS;
                }
            }
        }
    }
    forward(s, mem, req)
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

/// Passes `req` to the handler that was installed before ours and returns its answer,
/// or `KERN_FAILURE` (BSD signal) when there is none we can reach.
fn forward(s: &Shared, mem: &mut ServerMem, req: &Request) -> i32 {
    let Some(fwd) = plan_forward(s.old_handlers(), req.exception) else {
        return KERN_FAILURE;
    };
    let reply_port = s.reply_port.load(Ordering::Acquire);
    let mut words = 0usize;
    if fwd.carries_state() {
        let mut count = STATE_MAX_WORDS as u32;
        // SAFETY: `state` holds STATE_MAX_WORDS words.
        let kr =
            unsafe { thread_get_state(req.thread, fwd.flavor, mem.state.as_mut_ptr(), &mut count) };
        if kr != KERN_SUCCESS {
            return KERN_FAILURE;
        }
        words = (count as usize).min(STATE_MAX_WORDS);
    }
    // A reply that arrived after an earlier forward gave up on it must not be taken for
    // this one's.
    drain(mem, reply_port);
    let Some(n) = build_forward(&fwd, req, reply_port, &mem.state[..words], &mut mem.forward)
    else {
        return KERN_FAILURE;
    };
    // SAFETY: sends the request (copying our send rights to the thread, task and old
    // handler ports, making a send-once right to our reply port) and receives the answer
    // into the same buffer of BUF bytes.
    let kr = unsafe {
        mach_msg(
            mem.forward.as_mut_ptr() as *mut mach_msg_header_t,
            MACH_SEND_MSG | MACH_RCV_MSG,
            n as u32,
            BUF as u32,
            reply_port,
            MACH_MSG_TIMEOUT_NONE,
            MACH_PORT_NULL,
        )
    };
    if kr != KERN_SUCCESS {
        return KERN_FAILURE;
    }
    match parse_forward_reply(&fwd, &mem.forward, &mut mem.state) {
        Ok(r) => {
            if let Some((flavor, count)) = r.new_state {
                // SAFETY: the state the old handler returned for this thread, `count`
                // words in `state`.
                unsafe {
                    thread_set_state(req.thread, flavor, mem.state.as_mut_ptr(), count as u32)
                };
            }
            r.ret
        }
        Err(_) => {
            // SAFETY: the received message, whose rights are ours.
            unsafe { mach_msg_destroy(mem.forward.as_mut_ptr() as *mut mach_msg_header_t) };
            KERN_FAILURE
        }
    }
}

/// Discards whatever is queued on the reply port.
fn drain(mem: &mut ServerMem, reply_port: mach_port_t) {
    loop {
        // SAFETY: a non-blocking receive into a buffer of BUF bytes this thread owns.
        let kr = unsafe {
            mach_msg(
                mem.forward.as_mut_ptr() as *mut mach_msg_header_t,
                MACH_RCV_MSG | MACH_RCV_TIMEOUT,
                0,
                BUF as u32,
                reply_port,
                0,
                MACH_PORT_NULL,
            )
        };
        if kr != KERN_SUCCESS {
            return;
        }
        // SAFETY: the received message, whose rights are ours.
        unsafe { mach_msg_destroy(mem.forward.as_mut_ptr() as *mut mach_msg_header_t) };
    }
}
