//! Mach exception messages as bytes: parsing the kernel's `mach_exception_raise` request,
//! building our reply, deciding whether a fault is ours, and building and reading the
//! request we forward to the exception handler that was installed before ours.
//!
//! Pure byte work with no Mach call, so that it compiles on every platform and the Linux
//! unit tests exercise it with crafted messages; the macOS backend (`macos/exc_server.rs`)
//! does the `mach_msg` calls around it. Layouts are those MIG generates for
//! `mach_exc.defs` and `exc.defs` (`#pragma pack(4)`, little-endian on both Apple targets).
//!
//! This file owns the constants, the header and the kernel's request and our reply;
//! `forward` owns passing an exception on to the handler installed before ours.

#![cfg_attr(not(target_os = "macos"), allow(dead_code))]

mod forward;
#[cfg(test)]
mod tests;

pub use forward::{build_forward, parse_forward_reply, plan_forward, Forward, OldHandler};

pub const KERN_SUCCESS: i32 = 0;
pub const KERN_PROTECTION_FAILURE: i32 = 2;
pub const KERN_FAILURE: i32 = 5;
/// MIG's answer to a message id the server does not implement.
pub const MIG_BAD_ID: i32 = -303;
/// MIG's answer to a request whose layout is wrong.
pub const MIG_BAD_ARGUMENTS: i32 = -304;

pub const EXC_BAD_ACCESS: i32 = 1;
pub const EXC_MASK_BAD_ACCESS: u32 = 1 << EXC_BAD_ACCESS;

pub const EXCEPTION_DEFAULT: u32 = 1;
pub const EXCEPTION_STATE: u32 = 2;
pub const EXCEPTION_STATE_IDENTITY: u32 = 3;
pub const MACH_EXCEPTION_CODES: u32 = 0x8000_0000;
/// The flag bits of a behavior (`MACH_EXCEPTION_CODES | MACH_EXCEPTION_ERRORS |
/// MACH_EXCEPTION_BACKTRACE_PREFERRED`); the rest is the behavior proper.
pub const MACH_EXCEPTION_MASK: u32 = 0x8000_0000 | 0x4000_0000 | 0x2000_0000;

pub const MACH_MSGH_BITS_COMPLEX: u32 = 0x8000_0000;
pub const MACH_MSG_TYPE_COPY_SEND: u32 = 19;
pub const MACH_MSG_TYPE_MAKE_SEND_ONCE: u32 = 21;
pub const MACH_MSG_PORT_DESCRIPTOR: u8 = 0;
pub const MACH_PORT_NULL: u32 = 0;
pub const MACH_PORT_DEAD: u32 = !0;

/// `exception_raise` (32-bit codes); `+1` is `_state`, `+2` `_state_identity`.
pub const ID_EXCEPTION_RAISE: i32 = 2401;
/// `mach_exception_raise` (64-bit codes); `+1` is `_state`, `+2` `_state_identity`.
pub const ID_MACH_EXCEPTION_RAISE: i32 = 2405;
/// A MIG reply's id is its request's plus this.
pub const REPLY_ID_OFFSET: i32 = 100;

/// `NDR_record`: the data representation every MIG message carries (little-endian ints).
pub const NDR_RECORD: [u8; 8] = [0, 0, 0, 0, 1, 0, 0, 0];
/// `THREAD_STATE_MAX` in words, the largest state a state-carrying message holds.
pub const STATE_MAX_WORDS: usize = 1296;

pub const HEADER_SIZE: usize = 24;
/// `mig_reply_error_t` / `__Reply__mach_exception_raise_t`: header, NDR, return code.
pub const REPLY_SIZE: usize = HEADER_SIZE + 8 + 4;
/// Header, body, two port descriptors, NDR, exception, code count: where the codes start
/// in a request that carries the thread and task ports.
const IDENTITY_CODES_AT: usize = HEADER_SIZE + 4 + 12 + 12 + 8 + 4 + 4;
/// Header, NDR, return code, flavor, state count: where a state reply's state starts.
const STATE_REPLY_STATE_AT: usize = REPLY_SIZE + 8;
/// Upper bound of any message built here (the largest is a state-identity request).
pub const MAX_MESSAGE: usize = IDENTITY_CODES_AT + 16 + 8 + STATE_MAX_WORDS * 4;

/// `mach_msg_header_t`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub bits: u32,
    pub size: u32,
    pub remote: u32,
    pub local: u32,
    pub voucher: u32,
    pub id: i32,
}

fn u32_at(buf: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(buf.get(at..at + 4)?.try_into().ok()?))
}

fn i64_at(buf: &[u8], at: usize) -> Option<i64> {
    Some(i64::from_le_bytes(buf.get(at..at + 8)?.try_into().ok()?))
}

fn put(buf: &mut [u8], at: usize, bytes: &[u8]) {
    buf[at..at + bytes.len()].copy_from_slice(bytes);
}

pub fn read_header(buf: &[u8]) -> Option<Header> {
    Some(Header {
        bits: u32_at(buf, 0)?,
        size: u32_at(buf, 4)?,
        remote: u32_at(buf, 8)?,
        local: u32_at(buf, 12)?,
        voucher: u32_at(buf, 16)?,
        id: u32_at(buf, 20)? as i32,
    })
}

fn write_header(buf: &mut [u8], h: &Header) {
    put(buf, 0, &h.bits.to_le_bytes());
    put(buf, 4, &h.size.to_le_bytes());
    put(buf, 8, &h.remote.to_le_bytes());
    put(buf, 12, &h.local.to_le_bytes());
    put(buf, 16, &h.voucher.to_le_bytes());
    put(buf, 20, &h.id.to_le_bytes());
}

/// The kernel's `mach_exception_raise` request (behavior `EXCEPTION_DEFAULT |
/// MACH_EXCEPTION_CODES`, the one memsnap installs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub header: Header,
    /// The faulting thread's port (a send right now in our space).
    pub thread: u32,
    /// The faulting task's port (ours unless the message came from a forked child).
    pub task: u32,
    pub exception: i32,
    pub code_count: u32,
    /// `code[0]` is the `kern_return_t` reason, `code[1]` the fault address.
    pub codes: [i64; 2],
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than its fixed part or than its header claims.
    Truncated,
    /// Not the message this parser reads.
    BadId(i32),
    /// The header, body or descriptors do not have the expected shape.
    BadLayout,
    /// More codes than the interface allows, or a size that does not match the count.
    BadCount,
}

/// Parses a received `mach_exception_raise` request. `buf` is what `mach_msg` received
/// (the header's size excludes the trailer that follows).
pub fn parse_request(buf: &[u8]) -> Result<Request, ParseError> {
    let header = read_header(buf).ok_or(ParseError::Truncated)?;
    if header.id != ID_MACH_EXCEPTION_RAISE {
        return Err(ParseError::BadId(header.id));
    }
    let size = header.size as usize;
    if size > buf.len() || size < IDENTITY_CODES_AT {
        return Err(ParseError::Truncated);
    }
    let buf = &buf[..size];
    if header.bits & MACH_MSGH_BITS_COMPLEX == 0 || u32_at(buf, HEADER_SIZE) != Some(2) {
        return Err(ParseError::BadLayout);
    }
    let port = |at: usize| -> Result<u32, ParseError> {
        // name, pad1, pad2 (u16), disposition (u8), type (u8)
        if buf[at + 11] != MACH_MSG_PORT_DESCRIPTOR {
            return Err(ParseError::BadLayout);
        }
        Ok(u32_at(buf, at).unwrap_or(0))
    };
    let thread = port(HEADER_SIZE + 4)?;
    let task = port(HEADER_SIZE + 16)?;
    let exception = u32_at(buf, IDENTITY_CODES_AT - 8).unwrap_or(0) as i32;
    let code_count = u32_at(buf, IDENTITY_CODES_AT - 4).unwrap_or(0);
    if code_count > 2 {
        return Err(ParseError::BadCount);
    }
    if size != IDENTITY_CODES_AT + 8 * code_count as usize {
        return Err(ParseError::BadCount);
    }
    let mut codes = [0i64; 2];
    for (i, c) in codes.iter_mut().take(code_count as usize).enumerate() {
        *c = i64_at(buf, IDENTITY_CODES_AT + 8 * i).unwrap_or(0);
    }
    Ok(Request {
        header,
        thread,
        task,
        exception,
        code_count,
        codes,
    })
}

/// Builds into `out` the reply to a request whose header is `request` (a MIG reply, or a
/// MIG error reply when `ret` is a `MIG_*` code); returns its size. `KERN_SUCCESS` resumes
/// the faulting thread; any other code makes the kernel try the next handler (host port)
/// and finally deliver the BSD signal.
pub fn build_reply(request: &Header, ret: i32, out: &mut [u8]) -> usize {
    write_header(
        out,
        &Header {
            // The reply goes to the request's reply right with the disposition it came
            // with (a received header's remote bits name the reply port's right).
            bits: request.bits & 0x1f,
            size: REPLY_SIZE as u32,
            remote: request.remote,
            local: MACH_PORT_NULL,
            voucher: MACH_PORT_NULL,
            id: request.id + REPLY_ID_OFFSET,
        },
    );
    put(out, HEADER_SIZE, &NDR_RECORD);
    put(out, HEADER_SIZE + 8, &ret.to_le_bytes());
    REPLY_SIZE
}

/// The fault address when `req` may be a write to memory memsnap protects: an access
/// fault on a mapped page (`KERN_PROTECTION_FAILURE`) in this task. Everything else (an
/// unmapped address, a fault of a forked child whose exception ports still name ours) is
/// somebody else's.
pub fn candidate_address(req: &Request, own_task: u32) -> Option<usize> {
    (req.exception == EXC_BAD_ACCESS
        && req.code_count == 2
        && req.codes[0] == KERN_PROTECTION_FAILURE as i64
        && req.task == own_task
        && own_task != MACH_PORT_NULL)
        .then_some(req.codes[1] as usize)
}

/// Whether a saved `x86_exception_state64` (`trapno | cpu << 16, err, faultvaddr`) is
/// a write fault; non-page-fault traps answer `true` (unknown: treated as a write, as on
/// Linux).
pub fn is_write_x86_64(state: [u32; 4]) -> bool {
    const T_PAGE_FAULT: u32 = 14;
    state[0] & 0xffff != T_PAGE_FAULT || state[1] & 2 != 0
}

/// Whether a saved `arm_exception_state64` (`far` (2 words), `esr`, `exception`) is a
/// write fault: a data abort (from EL0 or EL1) with WnR set.
pub fn is_write_arm64(state: [u32; 4]) -> bool {
    let esr = state[2];
    let class = esr >> 26;
    (class == 0x24 || class == 0x25) && esr & (1 << 6) != 0
}
