//! The two ends of a ring: [`Producer`] and [`Consumer`], and their batch views.

use super::{RingError, RingMemory};
use crate::desc::QueueState;
use crate::sync::Ordering;
use bytemuck::Pod;
use std::sync::Arc;

/// Why a push did not happen (into a ring, or into a [`crate::Queue`]); the item is handed back
/// either way.
#[derive(Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum PushError<T> {
    /// The ring is full: the consumer has not freed a slot yet. For a queue: poll completions
    /// (the worker stops taking work while the completion ring is full) and retry.
    Full(T),
    /// The queue is not open any more (never returned by a bare ring).
    NotOpen(T, QueueState),
    /// The consumer published a corrupt head index; this ring cannot be used any more.
    Corrupted(T, RingError),
}

impl<T> PushError<T> {
    /// The item that was not pushed.
    pub fn into_inner(self) -> T {
        match self {
            PushError::Full(item) | PushError::NotOpen(item, _) | PushError::Corrupted(item, _) => item,
        }
    }
}

/// The writing end of a ring. One per ring; `Send`, not `Sync`.
pub struct Producer<T: Pod> {
    ring: Arc<RingMemory<T>>,
    /// Next slot to write; published to `header.tail` by R1.
    tail: u64,
    /// Last consumer head seen (A1); the consumer's true head is at or past it.
    head_cache: u64,
}

impl<T: Pod> Producer<T> {
    /// The producer of `ring`, continuing from the indices in its header.
    pub fn new(ring: Arc<RingMemory<T>>) -> Producer<T> {
        // Relaxed: the ring was handed to this end with synchronisation (thread spawn or memfd
        // handoff).
        let tail = ring.header().tail.0.load(Ordering::Relaxed);
        // The head is not cached from memory here: whoever held the ring before may have left
        // any value there, and `free` trusts its cache. Cached as full, it is loaded (A1) and
        // checked against the tail on the first push.
        let head_cache = tail.wrapping_sub(ring.capacity());
        Producer { ring, tail, head_cache }
    }

    /// Slot capacity.
    pub fn capacity(&self) -> u64 {
        self.ring.capacity()
    }

    /// Free slots, reloading the consumer's head only when the cached one shows fewer than
    /// `want`.
    #[inline]
    pub fn free(&mut self, want: u64) -> Result<u64, RingError> {
        let capacity = self.ring.capacity();
        let free = capacity - self.tail.wrapping_sub(self.head_cache);
        if free >= want {
            return Ok(free);
        }
        // A1: Acquire; pairs with R2 in Consumer::publish: the consumer finished reading every
        // slot below `head`, so they may be overwritten.
        let head = self.ring.header().head.0.load(Ordering::Acquire);
        let used = self.tail.wrapping_sub(head);
        if used > capacity {
            return Err(RingError::Corrupted { index: "head", value: head, own: self.tail, capacity });
        }
        self.head_cache = head;
        Ok(capacity - used)
    }

    /// Pushes one item and publishes it at once.
    pub fn push(&mut self, item: T) -> Result<(), PushError<T>> {
        let mut batch = self.write();
        batch.push(item)
    }

    /// A batch view: pushes become visible to the consumer together, when the view drops.
    pub fn write(&mut self) -> WriteBatch<'_, T> {
        let start = self.tail;
        WriteBatch { producer: self, start }
    }

    /// Items pushed so far (the local tail).
    pub fn pushed(&self) -> u64 {
        self.tail
    }

    fn publish(&mut self) {
        // R1: Release; pairs with A2 in Consumer::available: slots below `tail` are written.
        self.ring.header().tail.0.store(self.tail, Ordering::Release);
    }
}

/// Pushes that are published together when this view drops (one Release store).
#[must_use = "pushes are published when the batch drops"]
pub struct WriteBatch<'a, T: Pod> {
    producer: &'a mut Producer<T>,
    /// The tail when the view was made: nothing to publish if it did not move.
    start: u64,
}

impl<T: Pod> WriteBatch<'_, T> {
    /// Writes one item; it becomes visible when the batch drops.
    #[inline]
    pub fn push(&mut self, item: T) -> Result<(), PushError<T>> {
        let p = &mut *self.producer;
        match p.free(1) {
            Ok(0) => Err(PushError::Full(item)),
            Err(e) => Err(PushError::Corrupted(item, e)),
            Ok(_) => {
                // SAFETY: this is the ring's only producer and free() >= 1 shows slot `tail` is
                // below head + capacity, i.e. the consumer is done with it (A1).
                unsafe { p.ring.write_slot(p.tail, item) };
                p.tail = p.tail.wrapping_add(1);
                Ok(())
            }
        }
    }

    /// Free slots left (may reload the consumer's head).
    pub fn free(&mut self) -> Result<u64, RingError> {
        self.producer.free(1)
    }
}

impl<T: Pod> Drop for WriteBatch<'_, T> {
    fn drop(&mut self) {
        if self.producer.tail != self.start {
            self.producer.publish();
        }
    }
}

/// The reading end of a ring. One per ring; `Send`, not `Sync`.
pub struct Consumer<T: Pod> {
    ring: Arc<RingMemory<T>>,
    /// Next slot to read; published to `header.head` by R2.
    head: u64,
    /// Last producer tail seen (A2).
    tail_cache: u64,
}

impl<T: Pod> Consumer<T> {
    /// The consumer of `ring`, continuing from the indices in its header.
    pub fn new(ring: Arc<RingMemory<T>>) -> Consumer<T> {
        // Relaxed: as in Producer::new.
        let head = ring.header().head.0.load(Ordering::Relaxed);
        let tail_cache = head;
        Consumer { ring, head, tail_cache }
    }

    /// Slot capacity.
    pub fn capacity(&self) -> u64 {
        self.ring.capacity()
    }

    /// Items ready to read, reloading the producer's tail only when the cached one shows fewer
    /// than `want`.
    #[inline]
    pub fn available(&mut self, want: u64) -> Result<u64, RingError> {
        let ready = self.tail_cache.wrapping_sub(self.head);
        if ready >= want {
            return Ok(ready);
        }
        // The next slot is fetched beside the tail: the two cache-line transfers from the
        // producer's core overlap instead of following one another (a hint; the slot is read
        // after A2 all the same). Polled as a spin, this made the raw two-ring round trip on the
        // H200 VM 0.42-0.54 us instead of 0.51-0.63 (bench/results/h200.md, ninth session).
        self.ring.prefetch_slot(self.head);
        // A2: Acquire; pairs with R1 in Producer::publish: slots below `tail` are written.
        let tail = self.ring.header().tail.0.load(Ordering::Acquire);
        let ready = tail.wrapping_sub(self.head);
        let capacity = self.ring.capacity();
        if ready > capacity {
            return Err(RingError::Corrupted { index: "tail", value: tail, own: self.head, capacity });
        }
        self.tail_cache = tail;
        Ok(ready)
    }

    /// A batch view over at most `max` items that were ready when it was made; the slots read
    /// are handed back to the producer together when the view drops.
    #[inline]
    pub fn read(&mut self, max: u64) -> Result<ReadBatch<'_, T>, RingError> {
        let ready = self.available(max)?.min(max);
        Ok(ReadBatch { end: self.head.wrapping_add(ready), start: self.head, consumer: self })
    }

    /// Pops one item.
    pub fn pop(&mut self) -> Result<Option<T>, RingError> {
        Ok(self.read(1)?.pop())
    }

    /// Items popped so far (the local head).
    pub fn popped(&self) -> u64 {
        self.head
    }

    fn publish(&mut self) {
        // R2: Release; pairs with A1 in Producer::free: reads of slots below `head` are done.
        self.ring.header().head.0.store(self.head, Ordering::Release);
    }
}

/// Reads whose slots are handed back together when this view drops (one Release store).
#[must_use = "reads are released when the batch drops"]
pub struct ReadBatch<'a, T: Pod> {
    consumer: &'a mut Consumer<T>,
    /// One past the last readable slot.
    end: u64,
    /// The head when the view was made: nothing to publish if it did not move.
    start: u64,
}

impl<T: Pod> ReadBatch<'_, T> {
    /// Items left in this view.
    pub fn len(&self) -> usize {
        self.end.wrapping_sub(self.consumer.head) as usize
    }

    /// Whether the view is exhausted.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Starts fetching every slot of the view into this core's cache, so that the cache-line
    /// transfers from the producer's core overlap instead of stalling one read at a time.
    #[inline]
    pub fn prefetch(&self) {
        let c = &*self.consumer;
        let mut i = c.head;
        while i != self.end {
            c.ring.prefetch_slot(i);
            i = i.wrapping_add(1);
        }
    }

    /// The next item, without consuming it.
    #[inline]
    pub fn peek(&self) -> Option<T> {
        let c = &*self.consumer;
        if c.head == self.end {
            return None;
        }
        // SAFETY: this is the ring's only consumer and head < end <= the tail acquired by A2,
        // so the producer wrote this slot and will not touch it before R2 releases it.
        Some(unsafe { c.ring.read_slot(c.head) })
    }

    /// Consumes the item [`peek`](Self::peek) returned.
    #[inline]
    pub fn advance(&mut self) {
        debug_assert!(self.consumer.head != self.end);
        self.consumer.head = self.consumer.head.wrapping_add(1);
    }

    /// The next item, consumed.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        let item = self.peek()?;
        self.advance();
        Some(item)
    }
}

impl<T: Pod> Iterator for ReadBatch<'_, T> {
    type Item = T;

    fn next(&mut self) -> Option<T> {
        self.pop()
    }
}

impl<T: Pod> Drop for ReadBatch<'_, T> {
    fn drop(&mut self) {
        if self.consumer.head != self.start {
            self.consumer.publish();
        }
    }
}
