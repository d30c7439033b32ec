//! # memsnap: copy-on-write snapshots of a process's own memory, with rewind
//!
//! A drop-in replacement for the MemorySnapshot module of Firefox's record/replay system,
//! exported with C linkage under the original names (see `include/MemorySnapshot.h`).
//!
//! ## The model
//!
//! The first snapshot finds the memory to track (every private writable mapping of the
//! process, less thread stacks and memory declared untracked, or only explicitly
//! registered ranges) and write-protects it. From then on the first write to each page
//! faults; the fault handler copies the page (its *pre-image*) into library memory,
//! records it in the active dirty set and makes the page writable, and the write proceeds.
//!
//! A diff snapshot turns the active dirty set into the newest checkpoint's diff (dropping
//! pages whose bytes did not change) and write-protects those pages again. Rewinding to
//! the newest checkpoint copies the active set's pre-images back; rewinding further pops
//! checkpoints one at a time, copying each diff back with worker threads. Only memory is
//! rewound: threads, registers and stacks are the host's business (Firefox saves stacks
//! separately), and the library itself never writes tracked memory.
//!
//! ```text
//! checkpoint A ──write P0,P1──▶ checkpoint B ──write P1,P2──▶ checkpoint C ──write P3──▶ now
//!                diff(A)={P0a,P1a}            diff(B)={P1b,P2b}          active={P3c}
//! rewind to A: restore P3c (active), then P1b,P2b (diff B), then P0a,P1a (diff A)
//! ```
//!
//! ## Layout
//! - [`ffi`]: the C ABI, thin: argument checks, misuse messages, calls into the engine.
//! - [`engine`]: lifecycle, region and dirty-page bookkeeping; no system calls of its own.
//! - [`mem`]: fixed-capacity containers in memory the library maps itself.
//! - [`sys`]: the platform boundary (region walk, protection, fault capture, threads).

pub mod engine;
#[macro_use]
pub mod fatal;
pub mod ffi;
pub mod mem;
pub mod sys;
