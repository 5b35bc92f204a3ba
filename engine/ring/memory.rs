//! Where a ring's header and slots live: a shared mapping, or (under loom) the heap, with each
//! slot in a loom cell so that the model checker sees every slot access.

use super::layout::{check_capacity, RingHeader};
use super::RingError;
use bytemuck::Pod;
use std::ptr::NonNull;

/// A ring's header and slots. Shared by the ring's two ends.
pub struct RingMemory<T> {
    header: NonNull<RingHeader>,
    capacity: u64,
    slots: Slots<T>,
    /// Keeps the header's and slots' memory alive as long as either end exists.
    _backing: Backing,
}

// SAFETY: the header holds only atomics, and each slot is written by the producer and read by the
// consumer only under the R1/A2 and R2/A1 index protocol; T is Pod, so any bytes are a valid T.
unsafe impl<T: Pod + Send> Send for RingMemory<T> {}
// SAFETY: as for Send; shared access goes through atomics or the index protocol.
unsafe impl<T: Pod + Send> Sync for RingMemory<T> {}

#[cfg(not(loom))]
type Backing = std::sync::Arc<super::shm::SharedMemory>;
#[cfg(loom)]
type Backing = Box<RingHeader>;

impl<T: Pod> RingMemory<T> {
    /// Header of the ring.
    pub fn header(&self) -> &RingHeader {
        // SAFETY: `header` points at an initialised RingHeader that `_backing` keeps alive.
        unsafe { self.header.as_ref() }
    }

    /// Capacity, as checked when the ring was created or attached (never re-read).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Starts fetching slot `index & (capacity - 1)` into this core's cache (a hint).
    #[inline]
    pub(crate) fn prefetch_slot(&self, index: u64) {
        self.slots.prefetch((index & (self.capacity - 1)) as usize)
    }

    /// Writes slot `index & (capacity - 1)`.
    ///
    /// # Safety
    /// The caller is the ring's only producer and owns that slot (it is at or past the
    /// consumer's published head and below head + capacity).
    #[inline]
    pub(crate) unsafe fn write_slot(&self, index: u64, value: T) {
        // SAFETY: forwarded from the caller.
        unsafe { self.slots.write((index & (self.capacity - 1)) as usize, value) }
    }

    /// Reads slot `index & (capacity - 1)`.
    ///
    /// # Safety
    /// The caller is the ring's only consumer and the slot is below the producer's published
    /// tail it acquired (A2).
    #[inline]
    pub(crate) unsafe fn read_slot(&self, index: u64) -> T {
        // SAFETY: forwarded from the caller.
        unsafe { self.slots.read((index & (self.capacity - 1)) as usize) }
    }
}

#[cfg(not(loom))]
impl<T: Pod> RingMemory<T> {
    /// Writes a fresh header at `offset` of `memory` for `capacity` slots.
    pub fn create(memory: Backing, offset: usize, capacity: u64) -> Result<RingMemory<T>, RingError> {
        check_capacity(capacity)?;
        let header = Self::locate(&memory, offset, capacity)?;
        let slot_size = std::mem::size_of::<T>() as u32;
        // SAFETY: `locate` checked that the header and slots lie inside the mapping, aligned;
        // nobody else uses this range yet (the memory was just created by this process).
        unsafe { header.as_ptr().write(RingHeader::new(capacity, slot_size)) };
        Ok(Self::from_parts(memory, header, capacity))
    }

    /// Checks the header at `offset` of `memory` (written by another party) and attaches.
    pub fn attach(memory: Backing, offset: usize) -> Result<RingMemory<T>, RingError> {
        let header = Self::locate(&memory, offset, 1)?;
        // SAFETY: `locate` checked that a header fits at this aligned offset; RingHeader holds
        // only atomics, so any bytes are a valid value.
        let capacity = unsafe { header.as_ref() }.check(std::mem::size_of::<T>() as u32)?;
        Self::locate(&memory, offset, capacity)?;
        Ok(Self::from_parts(memory, header, capacity))
    }

    fn locate(memory: &Backing, offset: usize, capacity: u64) -> Result<NonNull<RingHeader>, RingError> {
        let bytes = super::layout::ring_bytes(capacity, std::mem::size_of::<T>());
        let end = offset.checked_add(bytes);
        if offset % std::mem::align_of::<RingHeader>() != 0 || end.is_none_or(|end| end > memory.len()) {
            return Err(RingError::Layout(format!(
                "a ring of {capacity} slots at offset {offset} needs {bytes} bytes; the mapping has {}",
                memory.len()
            )));
        }
        // SAFETY: offset + bytes is inside the mapping (checked above).
        let ptr = unsafe { memory.as_ptr().add(offset) };
        Ok(NonNull::new(ptr.cast()).expect("mapping address is not null"))
    }

    fn from_parts(memory: Backing, header: NonNull<RingHeader>, capacity: u64) -> RingMemory<T> {
        // SAFETY: the slots start right after the header, inside the checked range.
        let slots = unsafe { header.as_ptr().cast::<u8>().add(RingHeader::SIZE) };
        RingMemory {
            header,
            capacity,
            slots: Slots(NonNull::new(slots.cast()).expect("not null"), std::marker::PhantomData),
            _backing: memory,
        }
    }
}

#[cfg(loom)]
impl<T: Pod> RingMemory<T> {
    /// A ring on the heap for loom models.
    pub(crate) fn heap(capacity: u64) -> RingMemory<T> {
        check_capacity(capacity).expect("valid capacity");
        let header = Box::new(RingHeader::new(capacity, std::mem::size_of::<T>() as u32));
        let slots = (0..capacity).map(|_| loom::cell::UnsafeCell::new(T::zeroed())).collect();
        RingMemory { header: NonNull::from(&*header), capacity, slots: Slots(slots), _backing: header }
    }
}

/// Slots in shared memory: a raw pointer into the mapping.
#[cfg(not(loom))]
struct Slots<T>(NonNull<T>, std::marker::PhantomData<T>);

#[cfg(not(loom))]
impl<T: Pod> Slots<T> {
    #[inline]
    unsafe fn write(&self, i: usize, value: T) {
        // SAFETY: i < capacity (masked by the caller) and the caller owns the slot.
        unsafe { self.0.as_ptr().add(i).write(value) }
    }

    #[inline]
    unsafe fn read(&self, i: usize) -> T {
        // SAFETY: i < capacity (masked by the caller) and the producer published the slot.
        unsafe { self.0.as_ptr().add(i).read() }
    }

    /// Asks the CPU to start fetching slot `i`'s cache line (a hint: it never faults).
    #[inline]
    fn prefetch(&self, i: usize) {
        #[cfg(target_arch = "x86_64")]
        {
            let p = self.0.as_ptr().wrapping_add(i).cast::<i8>();
            // SAFETY: a prefetch reads nothing the program sees and never faults, whatever the
            // address; SSE is part of the x86_64 baseline.
            unsafe { std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p) };
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = i;
    }
}

/// Slots under loom: each in a loom cell, which reports any access the protocol fails to order.
#[cfg(loom)]
struct Slots<T>(Box<[loom::cell::UnsafeCell<T>]>);

#[cfg(loom)]
impl<T: Pod> Slots<T> {
    unsafe fn write(&self, i: usize, value: T) {
        // SAFETY: the caller owns the slot; loom checks that claim.
        self.0[i].with_mut(|p| unsafe { p.write(value) })
    }

    unsafe fn read(&self, i: usize) -> T {
        // SAFETY: the slot was published to the caller; loom checks that claim.
        self.0[i].with(|p| unsafe { p.read() })
    }

    fn prefetch(&self, _i: usize) {}
}
