//! Forwarding an exception memsnap does not handle to the exception handler that was
//! installed before ours: picking it (`plan_forward`), building the request its behavior
//! expects (`build_forward`) and reading its reply (`parse_forward_reply`). Pure byte work,
//! as the rest of `mach_exc`.

use super::{
    put, read_header, u32_at, write_header, Header, ParseError, Request, EXCEPTION_DEFAULT,
    EXCEPTION_STATE, EXCEPTION_STATE_IDENTITY, HEADER_SIZE, ID_EXCEPTION_RAISE,
    ID_MACH_EXCEPTION_RAISE, KERN_SUCCESS, MACH_EXCEPTION_CODES, MACH_EXCEPTION_MASK,
    MACH_MSGH_BITS_COMPLEX, MACH_MSG_PORT_DESCRIPTOR, MACH_MSG_TYPE_COPY_SEND,
    MACH_MSG_TYPE_MAKE_SEND_ONCE, MACH_PORT_DEAD, MACH_PORT_NULL, MAX_MESSAGE, NDR_RECORD,
    REPLY_ID_OFFSET, REPLY_SIZE, STATE_MAX_WORDS, STATE_REPLY_STATE_AT,
};

/// One exception handler as `task_get_exception_ports` / `task_swap_exception_ports`
/// report it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OldHandler {
    pub mask: u32,
    pub port: u32,
    pub behavior: u32,
    pub flavor: i32,
}

/// What a forwarded request carries besides the codes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Thread and task ports (`exception_raise`).
    Default,
    /// The thread state of `flavor`, no ports (`exception_raise_state`).
    State,
    /// Ports and state (`exception_raise_state_identity`).
    StateIdentity,
}

/// How to pass one exception to a previously installed handler.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Forward {
    pub port: u32,
    pub kind: Kind,
    pub codes64: bool,
    pub flavor: i32,
}

impl Forward {
    pub fn request_id(&self) -> i32 {
        let base = if self.codes64 {
            ID_MACH_EXCEPTION_RAISE
        } else {
            ID_EXCEPTION_RAISE
        };
        base + match self.kind {
            Kind::Default => 0,
            Kind::State => 1,
            Kind::StateIdentity => 2,
        }
    }

    pub fn carries_state(&self) -> bool {
        self.kind != Kind::Default
    }
}

/// Picks the handler `exception` goes to after ours: the first one whose mask covers it,
/// with a live port and a behavior we can speak. `None` means "reply `KERN_FAILURE`" (the
/// kernel then tries the host port and delivers the BSD signal, as it would have without
/// a task handler). Behaviors newer than `EXCEPTION_STATE_IDENTITY` (the identity-protected
/// ones of macOS 12+) are not forwarded.
pub fn plan_forward(old: &[OldHandler], exception: i32) -> Option<Forward> {
    let bit = 1u32.checked_shl(exception as u32)?;
    let h = old.iter().find(|h| h.mask & bit != 0)?;
    if h.port == MACH_PORT_NULL || h.port == MACH_PORT_DEAD {
        return None;
    }
    let kind = match h.behavior & !MACH_EXCEPTION_MASK {
        EXCEPTION_DEFAULT => Kind::Default,
        EXCEPTION_STATE => Kind::State,
        EXCEPTION_STATE_IDENTITY => Kind::StateIdentity,
        _ => return None,
    };
    Some(Forward {
        port: h.port,
        kind,
        codes64: h.behavior & MACH_EXCEPTION_CODES != 0,
        flavor: h.flavor,
    })
}

/// Builds into `out` the request that passes `req` to `fwd.port`, asking for the reply on
/// `reply_port` (a receive right of ours, sent as a send-once right). `state` is the
/// faulting thread's state of `fwd.flavor` when the handler wants state. Returns the
/// message size, or `None` when `state` or `out` is too large/small.
pub fn build_forward(
    fwd: &Forward,
    req: &Request,
    reply_port: u32,
    state: &[u32],
    out: &mut [u8],
) -> Option<usize> {
    if state.len() > STATE_MAX_WORDS || out.len() < MAX_MESSAGE {
        return None;
    }
    let identity = fwd.kind != Kind::State;
    let mut at = HEADER_SIZE;
    if identity {
        put(out, at, &2u32.to_le_bytes());
        at += 4;
        for name in [req.thread, req.task] {
            put(out, at, &name.to_le_bytes());
            put(out, at + 4, &[0; 6]);
            out[at + 10] = MACH_MSG_TYPE_COPY_SEND as u8;
            out[at + 11] = MACH_MSG_PORT_DESCRIPTOR;
            at += 12;
        }
    }
    put(out, at, &NDR_RECORD);
    put(out, at + 8, &req.exception.to_le_bytes());
    put(out, at + 12, &2u32.to_le_bytes());
    at += 16;
    for c in req.codes {
        if fwd.codes64 {
            put(out, at, &c.to_le_bytes());
            at += 8;
        } else {
            // What the kernel does for handlers without MACH_EXCEPTION_CODES.
            put(out, at, &(c as i32).to_le_bytes());
            at += 4;
        }
    }
    if fwd.carries_state() {
        put(out, at, &fwd.flavor.to_le_bytes());
        put(out, at + 4, &(state.len() as u32).to_le_bytes());
        at += 8;
        for w in state {
            put(out, at, &w.to_le_bytes());
            at += 4;
        }
    }
    write_header(
        out,
        &Header {
            bits: MACH_MSG_TYPE_COPY_SEND
                | MACH_MSG_TYPE_MAKE_SEND_ONCE << 8
                | if identity { MACH_MSGH_BITS_COMPLEX } else { 0 },
            size: at as u32,
            remote: fwd.port,
            local: reply_port,
            voucher: MACH_PORT_NULL,
            id: fwd.request_id(),
        },
    );
    Some(at)
}

/// The previous handler's answer: its return code, and for state-carrying behaviors that
/// succeeded, the new state's flavor and word count (copied into `state_out`), which the
/// caller applies to the faulting thread before resuming it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ForwardReply {
    pub ret: i32,
    pub new_state: Option<(i32, usize)>,
}

/// Reads the reply to a request built by [`build_forward`] for `fwd`.
pub fn parse_forward_reply(
    fwd: &Forward,
    buf: &[u8],
    state_out: &mut [u32],
) -> Result<ForwardReply, ParseError> {
    let header = read_header(buf).ok_or(ParseError::Truncated)?;
    if header.id != fwd.request_id() + REPLY_ID_OFFSET {
        return Err(ParseError::BadId(header.id));
    }
    let size = header.size as usize;
    if size > buf.len() || size < REPLY_SIZE {
        return Err(ParseError::Truncated);
    }
    if header.bits & MACH_MSGH_BITS_COMPLEX != 0 {
        return Err(ParseError::BadLayout);
    }
    let ret = u32_at(buf, HEADER_SIZE + 8).unwrap_or(0) as i32;
    if !fwd.carries_state() || ret != KERN_SUCCESS {
        // A MIG error reply, or a plain one: nothing follows the return code.
        return if size == REPLY_SIZE {
            Ok(ForwardReply {
                ret,
                new_state: None,
            })
        } else {
            Err(ParseError::BadCount)
        };
    }
    if size < STATE_REPLY_STATE_AT {
        return Err(ParseError::Truncated);
    }
    let flavor = u32_at(buf, REPLY_SIZE).unwrap_or(0) as i32;
    let count = u32_at(buf, REPLY_SIZE + 4).unwrap_or(0) as usize;
    if count > STATE_MAX_WORDS || count > state_out.len() {
        return Err(ParseError::BadCount);
    }
    if size != STATE_REPLY_STATE_AT + 4 * count {
        return Err(ParseError::BadCount);
    }
    for (i, w) in state_out.iter_mut().take(count).enumerate() {
        *w = u32_at(buf, STATE_REPLY_STATE_AT + 4 * i).unwrap_or(0);
    }
    Ok(ForwardReply {
        ret,
        new_state: Some((flavor, count)),
    })
}
