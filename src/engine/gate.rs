//! The gate: whether memory changes are allowed, who closed it, the handlers inside it,
//! and which thread and process control the snapshots. The fault handler reads it
//! lock-free; `set_allowed` (see `fault`) opens and closes it.

use core::sync::atomic::{AtomicBool, AtomicU32, AtomicU64};

pub struct Gate {
    pub(super) allowed: AtomicBool,
    /// The thread that disallowed memory changes (0: none).
    pub(super) disallower: AtomicU64,
    /// Fault handlers running inside the gate.
    pub(super) in_flight: AtomicU32,
    /// Counts disallow scopes, so a rewind's region walk runs once per scope.
    pub(super) scope: AtomicU64,
    /// The thread that took the first snapshot, and its process.
    pub(super) controller: AtomicU64,
    pub(super) owner_pid: AtomicU64,
    /// The pid of a process inside `fork()` (between its fork handlers), else 0.
    pub(super) fork_parent: AtomicU64,
}

impl Gate {
    /// Open, with `pid` owning the engine and no controller yet.
    pub(super) fn new(pid: u64) -> Self {
        Gate {
            allowed: AtomicBool::new(true),
            disallower: AtomicU64::new(0),
            in_flight: AtomicU32::new(0),
            scope: AtomicU64::new(0),
            controller: AtomicU64::new(0),
            owner_pid: AtomicU64::new(pid),
            fork_parent: AtomicU64::new(0),
        }
    }
}
