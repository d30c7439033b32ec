//! Fixed-capacity vectors over library-owned reservations.

use core::marker::PhantomData;
use core::sync::atomic::{AtomicUsize, Ordering};

use super::{round_up, Reservation};

/// A vector of `T` with a capacity fixed at creation, stored in its own anonymous
/// reservation. Elements must be plain data (no destructors run).
pub struct RawVec<T: Copy> {
    ptr: *mut T,
    len: usize,
    cap: usize,
    bytes: usize,
    _marker: PhantomData<T>,
}

// SAFETY: a RawVec owns its reservation exclusively; sharing follows the usual &/&mut rules.
unsafe impl<T: Copy + Send> Send for RawVec<T> {}
// SAFETY: as above; shared access only reads.
unsafe impl<T: Copy + Sync> Sync for RawVec<T> {}

impl<T: Copy> RawVec<T> {
    /// Reserves room for `cap` elements; `None` when the address space is not available.
    pub fn with_capacity(cap: usize) -> Option<Self> {
        let bytes = round_up(cap.checked_mul(core::mem::size_of::<T>())?.max(1), 1 << 16)?;
        let ptr = crate::sys::reserve(bytes)? as *mut T;
        Some(RawVec {
            ptr,
            len: 0,
            cap,
            bytes,
            _marker: PhantomData,
        })
    }

    pub fn reservation(&self) -> Reservation {
        Reservation {
            base: self.ptr as usize,
            len: self.bytes,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Appends `v`; `Err(v)` when full.
    pub fn push(&mut self, v: T) -> Result<(), T> {
        if self.len == self.cap {
            return Err(v);
        }
        // SAFETY: len < cap, inside the reservation.
        unsafe { self.ptr.add(self.len).write(v) };
        self.len += 1;
        Ok(())
    }

    pub fn pop(&mut self) -> Option<T> {
        if self.len == 0 {
            return None;
        }
        self.len -= 1;
        // SAFETY: the element at the old len - 1 was initialized.
        Some(unsafe { self.ptr.add(self.len).read() })
    }

    /// Inserts at `index`, shifting the tail; `Err(v)` when full.
    pub fn insert(&mut self, index: usize, v: T) -> Result<(), T> {
        assert!(index <= self.len);
        if self.len == self.cap {
            return Err(v);
        }
        // SAFETY: both ranges lie within the reservation; copy handles the overlap.
        unsafe {
            core::ptr::copy(
                self.ptr.add(index),
                self.ptr.add(index + 1),
                self.len - index,
            );
            self.ptr.add(index).write(v);
        }
        self.len += 1;
        Ok(())
    }

    pub fn remove(&mut self, index: usize) -> T {
        assert!(index < self.len);
        // SAFETY: index < len; the tail copy stays in bounds.
        unsafe {
            let v = self.ptr.add(index).read();
            core::ptr::copy(
                self.ptr.add(index + 1),
                self.ptr.add(index),
                self.len - index - 1,
            );
            self.len -= 1;
            v
        }
    }

    pub fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Keeps the elements for which `keep` is true, in order.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        let mut kept = 0;
        for i in 0..self.len {
            // SAFETY: i < len, and kept <= i: both in bounds; T is Copy.
            unsafe {
                let v = self.ptr.add(i).read();
                if keep(&v) {
                    self.ptr.add(kept).write(v);
                    kept += 1;
                }
            }
        }
        self.len = kept;
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Makes `len` elements visible; the caller writes the new ones before reading them.
    /// Elements past the old length read as zero bytes the first time (fresh reservation)
    /// or as whatever was last stored there.
    ///
    /// # Safety
    /// An all-zero or stale bit pattern must be a valid `T`.
    pub unsafe fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap);
        self.len = len;
    }

    /// The whole capacity as a slice, initialized or not.
    ///
    /// # Safety
    /// As for `set_len`.
    pub unsafe fn spare(&mut self) -> &mut [T] {
        // SAFETY: the reservation holds `cap` elements and is zero-filled by the kernel.
        unsafe { core::slice::from_raw_parts_mut(self.ptr, self.cap) }
    }
}

impl<T: Copy> core::ops::Deref for RawVec<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        // SAFETY: the first `len` elements are initialized.
        unsafe { core::slice::from_raw_parts(self.ptr, self.len) }
    }
}

impl<T: Copy> core::ops::DerefMut for RawVec<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        // SAFETY: the first `len` elements are initialized and exclusively borrowed.
        unsafe { core::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl<T: Copy> crate::engine::ranges::VecLike<T> for RawVec<T> {
    fn len(&self) -> usize {
        self.len
    }
    fn as_slice(&self) -> &[T] {
        self
    }
    fn as_mut_slice(&mut self) -> &mut [T] {
        self
    }
    fn insert_at(&mut self, index: usize, v: T) -> bool {
        self.insert(index, v).is_ok()
    }
    fn remove_at(&mut self, index: usize) -> T {
        self.remove(index)
    }
}

/// The active dirty set as written by the fault handler: an append-only log of page
/// addresses. Appends are lock-free (one `fetch_add`); the log is read and cleared only
/// while memory changes are disallowed and no handler is in flight.
pub struct DirtyLog {
    entries: RawVec<usize>,
    len: AtomicUsize,
}

impl DirtyLog {
    pub fn with_capacity(cap: usize) -> Option<Self> {
        Some(DirtyLog {
            entries: RawVec::with_capacity(cap)?,
            len: AtomicUsize::new(0),
        })
    }

    pub fn reservation(&self) -> Reservation {
        self.entries.reservation()
    }

    /// Appends a page address; `false` when the log is full.
    pub fn push(&self, page: usize) -> bool {
        let index = self.len.fetch_add(1, Ordering::AcqRel);
        if index >= self.entries.capacity() {
            self.len.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        // SAFETY: `index` was handed to this caller alone and lies within the capacity.
        unsafe { self.entries.ptr.add(index).write_volatile(page) };
        true
    }

    pub fn len(&self) -> usize {
        self.len
            .load(Ordering::Acquire)
            .min(self.entries.capacity())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The logged pages, for the quiescent phases only.
    ///
    /// # Safety
    /// No fault handler may be appending concurrently.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn quiescent_slice(&self) -> &mut [usize] {
        // SAFETY: every index below len was written by a completed push.
        unsafe { core::slice::from_raw_parts_mut(self.entries.ptr, self.len()) }
    }

    /// # Safety
    /// As for `quiescent_slice`.
    pub unsafe fn clear(&self) {
        self.len.store(0, Ordering::Release);
    }

    /// # Safety
    /// As for `quiescent_slice`; `len` is at most the current length.
    pub unsafe fn truncate(&self, len: usize) {
        self.len.store(len, Ordering::Release);
    }
}
