//! The userfaultfd uapi: the ioctl numbers, feature bits and structs of
//! linux/userfaultfd.h. Debian 12's headers predate most of them; each was checked against
//! linux/userfaultfd.h of 6.7+ (the `uapi_numbers` test pins the values).

use core::mem::size_of;

use crate::sys::linux::raw::{ioc, IOC_NONE, IOC_READ, IOC_WRITE};

pub(super) const UFFD_API: u64 = 0xAA;
pub(super) const UFFDIO: u64 = 0xAA;
pub(super) const UFFDIO_API: u64 = ioc(IOC_READ | IOC_WRITE, UFFDIO, 0x3F, size_of::<UffdioApi>());
pub(super) const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x00,
    size_of::<UffdioRegister>(),
);
// The kernel declares these two _IOR although it reads the argument (see the uapi header).
pub(super) const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, UFFDIO, 0x01, size_of::<UffdioRange>());
pub(super) const UFFDIO_WAKE: u64 = ioc(IOC_READ, UFFDIO, 0x02, size_of::<UffdioRange>());
pub(super) const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    UFFDIO,
    0x06,
    size_of::<UffdioWriteprotect>(),
);
/// On an fd of /dev/userfaultfd: a new userfaultfd, the argument being userfaultfd(2)'s flags.
pub(super) const USERFAULTFD_IOC_NEW: u64 = ioc(IOC_NONE, 0xAA, 0x00, 0);

pub(super) const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
pub(super) const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
#[allow(dead_code)]
pub(super) const UFFD_FEATURE_EXACT_ADDRESS: u64 = 1 << 11;
pub(super) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub(super) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub(super) const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

pub(super) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub(super) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
pub(super) const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// userfaultfd(2) flag: only faults raised in user mode are delivered.
pub(super) const UFFD_USER_MODE_ONLY: i32 = 1;

pub(super) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub(super) const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

#[repr(C)]
pub(super) struct UffdioApi {
    pub(super) api: u64,
    pub(super) features: u64,
    pub(super) ioctls: u64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct UffdioRange {
    pub(super) start: u64,
    pub(super) len: u64,
}

#[repr(C)]
pub(super) struct UffdioRegister {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
    pub(super) ioctls: u64,
}

#[repr(C)]
pub(super) struct UffdioWriteprotect {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
}

/// `struct uffd_msg` (packed in the header, but every field is naturally aligned), read
/// as a page fault: the other events are never requested.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct UffdMsg {
    pub(super) event: u8,
    pub(super) _reserved1: u8,
    pub(super) _reserved2: u16,
    pub(super) _reserved3: u32,
    pub(super) flags: u64,
    pub(super) address: u64,
    pub(super) ptid: u32,
    pub(super) _pad: u32,
}

/// Messages one `read` of the fault server takes at most; 1 KiB of stack.
pub(super) const MSG_BATCH: usize = 32;
