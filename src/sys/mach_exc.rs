//! Mach exception messages as bytes: parsing the kernel's `mach_exception_raise` request,
//! building our reply, deciding whether a fault is ours, and building and reading the
//! request we forward to the exception handler that was installed before ours.
//!
//! Pure byte work with no Mach call, so that it compiles on every platform and the Linux
//! unit tests exercise it with crafted messages; the macOS backend (`macos/exc_server.rs`)
//! does the `mach_msg` calls around it. Layouts are those MIG generates for
//! `mach_exc.defs` and `exc.defs` (`#pragma pack(4)`, little-endian on both Apple targets).
#![cfg_attr(not(target_os = "macos"), allow(dead_code))]

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

#[cfg(test)]
mod tests {
    use super::*;

    const THREAD: u32 = 0x1103;
    const TASK: u32 = 0x203;
    const KERNEL_REPLY: u32 = 0x1707;
    const OUR_PORT: u32 = 0x2a03;

    /// A request as the kernel sends it: reply right as a send-once, ports as send rights
    /// (`MACH_MSG_TYPE_PORT_SEND` = 17), 64-bit codes, plus an 8-byte trailer.
    fn kernel_request(exception: i32, codes: &[i64], task: u32) -> Vec<u8> {
        let size = IDENTITY_CODES_AT + 8 * codes.len();
        let mut m = vec![0u8; size + 8];
        let h = Header {
            bits: MACH_MSGH_BITS_COMPLEX | 18,
            size: size as u32,
            remote: KERNEL_REPLY,
            local: OUR_PORT,
            voucher: 0,
            id: ID_MACH_EXCEPTION_RAISE,
        };
        write_header(&mut m, &h);
        put(&mut m, 24, &2u32.to_le_bytes());
        for (i, name) in [THREAD, task].into_iter().enumerate() {
            put(&mut m, 28 + 12 * i, &name.to_le_bytes());
            m[28 + 12 * i + 10] = 17;
            m[28 + 12 * i + 11] = MACH_MSG_PORT_DESCRIPTOR;
        }
        put(&mut m, 52, &NDR_RECORD);
        put(&mut m, 60, &exception.to_le_bytes());
        put(&mut m, 64, &(codes.len() as u32).to_le_bytes());
        for (i, c) in codes.iter().enumerate() {
            put(&mut m, 68 + 8 * i, &c.to_le_bytes());
        }
        m
    }

    fn fault(addr: i64) -> Vec<u8> {
        kernel_request(
            EXC_BAD_ACCESS,
            &[KERN_PROTECTION_FAILURE as i64, addr],
            TASK,
        )
    }

    fn words(buf: &[u8], at: usize, n: usize) -> Vec<u32> {
        (0..n).map(|i| u32_at(buf, at + 4 * i).unwrap()).collect()
    }

    #[test]
    fn parses_the_kernels_request() {
        let r = parse_request(&fault(0x7f00_1234_5000)).unwrap();
        assert_eq!(r.thread, THREAD);
        assert_eq!(r.task, TASK);
        assert_eq!(r.exception, EXC_BAD_ACCESS);
        assert_eq!(r.code_count, 2);
        assert_eq!(r.codes, [KERN_PROTECTION_FAILURE as i64, 0x7f00_1234_5000]);
        assert_eq!(r.header.remote, KERNEL_REPLY);
        assert_eq!(r.header.size, 84);
        // A full 64-bit address survives (code[1] is not truncated).
        let r = parse_request(&fault(-0x1000)).unwrap();
        assert_eq!(r.codes[1] as usize, usize::MAX - 0xfff);
    }

    #[test]
    fn rejects_truncated_requests() {
        let m = fault(0x1000);
        for len in 0..84 {
            assert!(parse_request(&m[..len]).is_err(), "accepted {len} bytes");
        }
        // The header claims more than was received.
        let mut m = fault(0x1000);
        put(&mut m, 4, &200u32.to_le_bytes());
        assert_eq!(parse_request(&m), Err(ParseError::Truncated));
    }

    #[test]
    fn rejects_malformed_requests() {
        let mut m = fault(0x1000);
        put(&mut m, 20, &2401i32.to_le_bytes());
        assert_eq!(parse_request(&m), Err(ParseError::BadId(2401)));

        let mut m = fault(0x1000);
        put(&mut m, 0, &18u32.to_le_bytes());
        assert_eq!(parse_request(&m), Err(ParseError::BadLayout));

        let mut m = fault(0x1000);
        put(&mut m, 24, &1u32.to_le_bytes());
        assert_eq!(parse_request(&m), Err(ParseError::BadLayout));

        let mut m = fault(0x1000);
        m[28 + 11] = 1; // an out-of-line descriptor where the thread port should be
        assert_eq!(parse_request(&m), Err(ParseError::BadLayout));

        let mut m = fault(0x1000);
        put(&mut m, 64, &3u32.to_le_bytes());
        assert_eq!(parse_request(&m), Err(ParseError::BadCount));

        // A count that disagrees with the size.
        let mut m = fault(0x1000);
        put(&mut m, 64, &1u32.to_le_bytes());
        assert_eq!(parse_request(&m), Err(ParseError::BadCount));
    }

    #[test]
    fn fewer_codes_are_trimmed_like_mig() {
        let m = kernel_request(EXC_BAD_ACCESS, &[KERN_PROTECTION_FAILURE as i64], TASK);
        let r = parse_request(&m).unwrap();
        assert_eq!(r.code_count, 1);
        assert_eq!(r.header.size, 76);
        // Without the address it cannot be ours.
        assert_eq!(candidate_address(&r, TASK), None);
    }

    #[test]
    fn reply_contents() {
        let r = parse_request(&fault(0x1000)).unwrap();
        let mut out = [0xffu8; 64];
        let n = build_reply(&r.header, KERN_SUCCESS, &mut out);
        assert_eq!(n, 36);
        let h = read_header(&out).unwrap();
        assert_eq!(
            h.bits, 18,
            "MACH_MSGH_BITS(MACH_MSG_TYPE_MOVE_SEND_ONCE, 0)"
        );
        assert_eq!(h.size, 36);
        assert_eq!(h.remote, KERNEL_REPLY);
        assert_eq!(h.local, 0);
        assert_eq!(h.voucher, 0);
        assert_eq!(h.id, 2505);
        assert_eq!(&out[24..32], &NDR_RECORD);
        assert_eq!(u32_at(&out, 32), Some(0));
        build_reply(&r.header, KERN_FAILURE, &mut out);
        assert_eq!(u32_at(&out, 32), Some(5));
        build_reply(&r.header, MIG_BAD_ID, &mut out);
        assert_eq!(u32_at(&out, 32).unwrap() as i32, -303);
        assert_eq!(out[36], 0xff, "nothing written past the reply");
    }

    #[test]
    fn which_faults_are_ours() {
        let r = parse_request(&fault(0x5000)).unwrap();
        assert_eq!(candidate_address(&r, TASK), Some(0x5000));
        // A forked child's fault arriving on the parent's port.
        assert_eq!(candidate_address(&r, TASK + 0x100), None);
        assert_eq!(candidate_address(&r, MACH_PORT_NULL), None);
        // An unmapped address (KERN_INVALID_ADDRESS = 1) is a real crash.
        let m = kernel_request(EXC_BAD_ACCESS, &[1, 0x5000], TASK);
        assert_eq!(candidate_address(&parse_request(&m).unwrap(), TASK), None);
        // Another exception type on the same port.
        let m = kernel_request(2, &[KERN_PROTECTION_FAILURE as i64, 0x5000], TASK);
        assert_eq!(candidate_address(&parse_request(&m).unwrap(), TASK), None);
    }

    #[test]
    fn write_bits() {
        // x86_64: trapno 14 (page fault), err bit 1 = write.
        assert!(is_write_x86_64([14, 0x7, 0x1000, 0]));
        assert!(!is_write_x86_64([14, 0x5, 0x1000, 0]));
        assert!(
            !is_write_x86_64([14 | 3 << 16, 0x15, 0, 0]),
            "cpu number ignored"
        );
        assert!(
            is_write_x86_64([13, 0, 0, 0]),
            "unknown traps count as writes"
        );
        // arm64: EC 0x24 (data abort, lower EL), WnR = bit 6.
        let esr = |ec: u32, wnr: bool| ec << 26 | if wnr { 1 << 6 } else { 0 } | 0xf;
        assert!(is_write_arm64([0x1000, 0, esr(0x24, true), 0]));
        assert!(is_write_arm64([0x1000, 0, esr(0x25, true), 0]));
        assert!(!is_write_arm64([0x1000, 0, esr(0x24, false), 0]));
        // An instruction abort is never a write.
        assert!(!is_write_arm64([0x1000, 0, esr(0x20, true), 0]));
    }

    fn handler(mask: u32, port: u32, behavior: u32) -> OldHandler {
        OldHandler {
            mask,
            port,
            behavior,
            flavor: 7,
        }
    }

    #[test]
    fn forward_decision() {
        assert_eq!(plan_forward(&[], EXC_BAD_ACCESS), None);
        // Mask not covering BAD_ACCESS (EXC_MASK_CRASH).
        let old = [handler(1 << 10, 0x303, EXCEPTION_DEFAULT)];
        assert_eq!(plan_forward(&old, EXC_BAD_ACCESS), None);
        for port in [MACH_PORT_NULL, MACH_PORT_DEAD] {
            let old = [handler(EXC_MASK_BAD_ACCESS, port, EXCEPTION_DEFAULT)];
            assert_eq!(plan_forward(&old, EXC_BAD_ACCESS), None);
        }
        // EXCEPTION_IDENTITY_PROTECTED (4) is not spoken.
        let old = [handler(
            EXC_MASK_BAD_ACCESS,
            0x303,
            4 | MACH_EXCEPTION_CODES,
        )];
        assert_eq!(plan_forward(&old, EXC_BAD_ACCESS), None);
        // The first covering entry wins; flag bits are not part of the behavior.
        let old = [
            handler(1 << 10, 0x403, EXCEPTION_DEFAULT),
            handler(
                EXC_MASK_BAD_ACCESS | 4,
                0x303,
                EXCEPTION_STATE_IDENTITY | MACH_EXCEPTION_CODES | 0x2000_0000,
            ),
            handler(EXC_MASK_BAD_ACCESS, 0x503, EXCEPTION_DEFAULT),
        ];
        let f = plan_forward(&old, EXC_BAD_ACCESS).unwrap();
        assert_eq!(
            f,
            Forward {
                port: 0x303,
                kind: Kind::StateIdentity,
                codes64: true,
                flavor: 7
            }
        );
        assert_eq!(f.request_id(), 2407);
        let f = plan_forward(&[handler(2, 0x303, EXCEPTION_STATE)], 1).unwrap();
        assert_eq!(
            (f.kind, f.codes64, f.request_id()),
            (Kind::State, false, 2402)
        );
        assert_eq!(plan_forward(&old, -1), None);
        assert_eq!(plan_forward(&old, 40), None);
    }

    fn forward(kind: Kind, codes64: bool) -> Forward {
        Forward {
            port: 0x303,
            kind,
            codes64,
            flavor: 6,
        }
    }

    #[test]
    fn forwarded_default_requests() {
        let req = parse_request(&fault(0x1_2345_6000)).unwrap();
        let mut out = vec![0u8; MAX_MESSAGE];
        let n = build_forward(&forward(Kind::Default, true), &req, 0x909, &[], &mut out).unwrap();
        assert_eq!(n, 84);
        // Byte for byte what the kernel would have sent that handler, bar the header.
        let k = fault(0x1_2345_6000);
        assert_eq!(&out[24..28], &k[24..28]);
        assert_eq!(&out[52..84], &k[52..84]);
        let h = read_header(&out).unwrap();
        assert_eq!(h.bits, MACH_MSGH_BITS_COMPLEX | 21 << 8 | 19);
        assert_eq!((h.size, h.remote, h.local, h.id), (84, 0x303, 0x909, 2405));
        assert_eq!(u32_at(&out, 28), Some(THREAD));
        assert_eq!((out[38], out[39]), (19, 0), "copy-send port descriptor");
        assert_eq!(u32_at(&out, 40), Some(TASK));
        // The parser reads back what was built.
        assert_eq!(parse_request(&out[..n]).unwrap().codes, req.codes);

        // 32-bit codes: truncated, as the kernel does for such handlers.
        let n = build_forward(&forward(Kind::Default, false), &req, 0x909, &[], &mut out).unwrap();
        assert_eq!(n, 76);
        assert_eq!(read_header(&out).unwrap().id, 2401);
        assert_eq!(words(&out, 68, 2), vec![2, 0x2345_6000]);
    }

    #[test]
    fn forwarded_state_requests() {
        let req = parse_request(&fault(0x4000)).unwrap();
        let state = [1u32, 2, 3, 4, 5];
        let mut out = vec![0u8; MAX_MESSAGE];
        let n = build_forward(&forward(Kind::State, true), &req, 0x909, &state, &mut out).unwrap();
        // Header, NDR, exception, count, 2 codes, flavor, count, 5 words.
        assert_eq!(n, 24 + 8 + 8 + 16 + 8 + 20);
        let h = read_header(&out).unwrap();
        assert_eq!(
            h.bits & MACH_MSGH_BITS_COMPLEX,
            0,
            "no ports in EXCEPTION_STATE"
        );
        assert_eq!(h.id, 2406);
        assert_eq!(&out[24..32], &NDR_RECORD);
        assert_eq!(words(&out, 32, 2), vec![1, 2]);
        assert_eq!(i64_at(&out, 48), Some(0x4000));
        assert_eq!(words(&out, 56, 7), vec![6, 5, 1, 2, 3, 4, 5]);

        let n = build_forward(
            &forward(Kind::StateIdentity, false),
            &req,
            0x909,
            &state,
            &mut out,
        )
        .unwrap();
        assert_eq!(n, 68 + 8 + 8 + 20);
        let h = read_header(&out).unwrap();
        assert_eq!((h.id, h.bits & MACH_MSGH_BITS_COMPLEX != 0), (2403, true));
        assert_eq!(words(&out, 68, 9), vec![2, 0x4000, 6, 5, 1, 2, 3, 4, 5]);

        let too_big = vec![0u32; STATE_MAX_WORDS + 1];
        let f = forward(Kind::State, true);
        assert_eq!(build_forward(&f, &req, 0x909, &too_big, &mut out), None);
        assert_eq!(
            build_forward(&f, &req, 0x909, &state, &mut out[..100]),
            None
        );
    }

    fn reply(id: i32, ret: i32, state: Option<(i32, &[u32])>) -> Vec<u8> {
        let size = REPLY_SIZE + state.map_or(0, |(_, s)| 8 + 4 * s.len());
        let mut m = vec![0u8; size + 8];
        write_header(
            &mut m,
            &Header {
                bits: 18,
                size: size as u32,
                remote: 0,
                local: 0x909,
                voucher: 0,
                id,
            },
        );
        put(&mut m, 24, &NDR_RECORD);
        put(&mut m, 32, &ret.to_le_bytes());
        if let Some((flavor, s)) = state {
            put(&mut m, 36, &flavor.to_le_bytes());
            put(&mut m, 40, &(s.len() as u32).to_le_bytes());
            for (i, w) in s.iter().enumerate() {
                put(&mut m, 44 + 4 * i, &w.to_le_bytes());
            }
        }
        m
    }

    #[test]
    fn forwarded_replies() {
        let mut st = [0u32; 16];
        let d = forward(Kind::Default, true);
        let ok = ForwardReply {
            ret: KERN_SUCCESS,
            new_state: None,
        };
        assert_eq!(
            parse_forward_reply(&d, &reply(2505, 0, None), &mut st),
            Ok(ok)
        );
        assert_eq!(
            parse_forward_reply(&d, &reply(2505, KERN_FAILURE, None), &mut st)
                .unwrap()
                .ret,
            KERN_FAILURE
        );
        assert_eq!(
            parse_forward_reply(&d, &reply(2501, 0, None), &mut st),
            Err(ParseError::BadId(2501))
        );
        for len in 0..36 {
            assert!(parse_forward_reply(&d, &reply(2505, 0, None)[..len], &mut st).is_err());
        }

        let s = forward(Kind::StateIdentity, true);
        let m = reply(2507, 0, Some((6, &[9, 8, 7])));
        assert_eq!(
            parse_forward_reply(&s, &m, &mut st),
            Ok(ForwardReply {
                ret: 0,
                new_state: Some((6, 3))
            })
        );
        assert_eq!(&st[..3], &[9, 8, 7]);
        // A MIG error reply to a state request has no state.
        let m = reply(2507, MIG_BAD_ARGUMENTS, None);
        assert_eq!(
            parse_forward_reply(&s, &m, &mut st).unwrap().new_state,
            None
        );
        // A state count larger than the room for it, or than the message.
        let m = reply(2507, 0, Some((6, &[1; 20])));
        assert_eq!(
            parse_forward_reply(&s, &m, &mut st),
            Err(ParseError::BadCount)
        );
        let mut m = reply(2507, 0, Some((6, &[1, 2])));
        put(&mut m, 40, &3u32.to_le_bytes());
        assert_eq!(
            parse_forward_reply(&s, &m, &mut st),
            Err(ParseError::BadCount)
        );
        // A success reply without state where state is expected.
        assert_eq!(
            parse_forward_reply(&s, &reply(2507, 0, None), &mut st),
            Err(ParseError::Truncated)
        );
        // Complex replies are not MIG replies to these routines.
        let mut m = reply(2505, 0, None);
        put(&mut m, 0, &(18 | MACH_MSGH_BITS_COMPLEX).to_le_bytes());
        assert_eq!(
            parse_forward_reply(&d, &m, &mut st),
            Err(ParseError::BadLayout)
        );
    }
}
