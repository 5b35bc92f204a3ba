//! Single-producer single-consumer rings that can live in shared memory.
//!
//! A ring is a [`layout::RingHeader`] followed by `capacity` slots of one `Pod` type. The
//! producer owns the tail index, the consumer the head index; both are free-running `u64`s
//! masked by `capacity - 1`, each on its own cache-line pair. Each side keeps a private copy of
//! its own index (never read back from shared memory) and a cached copy of the other side's,
//! reloaded only when the ring looks full or empty. Writes and reads are published in batches:
//! one Release store per [`WriteBatch`] or [`ReadBatch`].
//!
//! The peer may be another process and is not trusted: an index it publishes that would put
//! more than `capacity` slots in use is reported as [`RingError::Corrupted`], never followed.
//!
//! Ordering edges (each named where it is written):
//! - R1 (producer publishes tail, Release) pairs with A2 (consumer loads tail, Acquire): slot
//!   writes below the tail are visible before the consumer reads them.
//! - R2 (consumer publishes head, Release) pairs with A1 (producer loads head, Acquire): slot
//!   reads below the head are finished before the producer overwrites those slots.

pub mod layout;
mod memory;
mod queue_ends;
#[cfg(not(loom))]
pub mod shm;

pub use layout::{RingHeader, RING_ABI_VERSION, RING_MAGIC};
pub use memory::RingMemory;
pub use queue_ends::{Consumer, Producer, PushError, ReadBatch, WriteBatch};

/// A ring could not be attached or its peer broke the protocol.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum RingError {
    /// A header field differs from what this side expects.
    #[error("ring header mismatch: {field} is {found:#x}, expected {expected:#x}")]
    Mismatch {
        /// The header field.
        field: &'static str,
        /// What this side expects.
        expected: u64,
        /// What the header holds.
        found: u64,
    },
    /// The header or capacity is not usable.
    #[error("ring layout invalid: {0}")]
    Layout(String),
    /// The peer published an index that puts more than `capacity` slots in use.
    #[error("ring peer published a corrupt {index} index: {value} against own {own} (capacity {capacity})")]
    Corrupted {
        /// Which index ("head" or "tail").
        index: &'static str,
        /// The value read.
        value: u64,
        /// This side's own index.
        own: u64,
        /// Ring capacity.
        capacity: u64,
    },
}

#[cfg(all(test, loom))]
mod loom_model;

/// Creates a connected producer and consumer over a fresh ring in process memory (loom models).
#[cfg(all(test, loom))]
fn heap_ring<T: bytemuck::Pod>(capacity: u64) -> (Producer<T>, Consumer<T>) {
    let ring = std::sync::Arc::new(RingMemory::heap(capacity));
    (Producer::new(ring.clone()), Consumer::new(ring))
}
