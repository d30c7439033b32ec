//! Tests of the Mach exception messages, with requests and replies crafted as the kernel
//! and MIG lay them out; they run on every platform.

use super::forward::{ForwardReply, Kind};
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
