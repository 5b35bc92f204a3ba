//! The ring header in shared memory and the size arithmetic of a ring.

use super::RingError;
use crate::sync::{AtomicU32, AtomicU64, Ordering};

/// "FERRYRNG", little endian.
pub const RING_MAGIC: u64 = u64::from_le_bytes(*b"FERRYRNG");
/// Bumped whenever the header or a slot type changes shape.
pub const RING_ABI_VERSION: u32 = 1;
/// Index padding: two cache lines, because x86 prefetches lines in adjacent pairs.
pub const INDEX_PADDING: usize = 128;
/// Largest accepted capacity (slots).
pub const MAX_CAPACITY: u64 = 1 << 24;

/// Metadata written once by the creator, checked by every attach.
#[repr(C, align(128))]
pub struct Meta {
    /// [`RING_MAGIC`].
    pub magic: AtomicU64,
    /// [`RING_ABI_VERSION`].
    pub abi_version: AtomicU32,
    /// `size_of` one slot.
    pub slot_size: AtomicU32,
    /// Slots; a power of two.
    pub capacity: AtomicU64,
}

/// One index alone on its cache-line pair.
#[repr(C, align(128))]
pub struct PaddedIndex(pub AtomicU64);

/// The header at the start of a ring. Slots follow at [`RingHeader::SIZE`].
#[repr(C)]
pub struct RingHeader {
    /// Magic, version, sizes.
    pub meta: Meta,
    /// Next slot the producer writes; written only by the producer.
    pub tail: PaddedIndex,
    /// Next slot the consumer reads; written only by the consumer.
    pub head: PaddedIndex,
}

#[cfg(not(loom))]
const _: () = assert!(std::mem::size_of::<RingHeader>() == 3 * INDEX_PADDING);

impl RingHeader {
    /// Bytes the header occupies (slots start here).
    pub const SIZE: usize = 3 * INDEX_PADDING;

    /// A fresh header for `capacity` slots of `slot_size` bytes, both indices 0.
    pub fn new(capacity: u64, slot_size: u32) -> RingHeader {
        RingHeader {
            meta: Meta {
                magic: AtomicU64::new(RING_MAGIC),
                abi_version: AtomicU32::new(RING_ABI_VERSION),
                slot_size: AtomicU32::new(slot_size),
                capacity: AtomicU64::new(capacity),
            },
            tail: PaddedIndex(AtomicU64::new(0)),
            head: PaddedIndex(AtomicU64::new(0)),
        }
    }

    /// Checks the metadata against what this side expects and returns the capacity.
    /// Relaxed loads: the metadata was written before the memory was shared (the memfd handoff
    /// is the synchronisation), and every value is validated here anyway.
    pub fn check(&self, slot_size: u32) -> Result<u64, RingError> {
        let field = |field, expected: u64, found: u64| {
            if expected == found {
                Ok(())
            } else {
                Err(RingError::Mismatch { field, expected, found })
            }
        };
        field("magic", RING_MAGIC, self.meta.magic.load(Ordering::Relaxed))?;
        field("abi_version", RING_ABI_VERSION.into(), self.meta.abi_version.load(Ordering::Relaxed).into())?;
        field("slot_size", slot_size.into(), self.meta.slot_size.load(Ordering::Relaxed).into())?;
        let capacity = self.meta.capacity.load(Ordering::Relaxed);
        check_capacity(capacity)?;
        Ok(capacity)
    }
}

/// A capacity is a power of two in `1..=MAX_CAPACITY`.
pub fn check_capacity(capacity: u64) -> Result<(), RingError> {
    if capacity == 0 || !capacity.is_power_of_two() || capacity > MAX_CAPACITY {
        return Err(RingError::Layout(format!(
            "capacity {capacity} is not a power of two between 1 and {MAX_CAPACITY}"
        )));
    }
    Ok(())
}

/// Bytes a ring of `capacity` slots of `slot_size` bytes occupies, rounded up to the padding.
pub fn ring_bytes(capacity: u64, slot_size: usize) -> usize {
    let slots = capacity as usize * slot_size;
    RingHeader::SIZE + slots.div_ceil(INDEX_PADDING) * INDEX_PADDING
}
