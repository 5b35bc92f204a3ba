//! Queues: one submission ring and one completion ring in one sealed memfd, plus a header with
//! the queue's id, owner, state and in-order watermark.
//!
//! ```text
//! offset 0    QueueHeader: meta (magic, ABI, ids, ring offsets) | status (watermark, state)
//! offset 256  submission ring: RingHeader + capacity x Descriptor   (client -> worker)
//! then        completion ring: RingHeader + capacity x Completion   (worker -> client)
//! ```
//!
//! [`Queue`] is the client's end. It can live in the engine's process or, through
//! [`Queue::attach`] on the memfd, in another one.

use crate::config::QueueConfig;
use crate::desc::{Completion, Descriptor, QueueState};
use crate::error::Error;
use crate::ring::layout::{check_capacity, ring_bytes, INDEX_PADDING, MAX_CAPACITY};
use crate::ring::shm::SharedMemory;
use crate::ring::{Consumer, Producer, PushError, RingError, RingMemory};
use std::fs::File;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// "FERRYQUE", little endian.
pub const QUEUE_MAGIC: u64 = u64::from_le_bytes(*b"FERRYQUE");
/// Bumped whenever the queue header changes shape.
pub const QUEUE_ABI_VERSION: u32 = 1;

/// A queue's id, unique within its engine.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct QueueId(pub u32);

#[repr(C, align(128))]
struct Meta {
    magic: AtomicU64,
    abi_version: AtomicU32,
    queue: AtomicU32,
    client: AtomicU32,
    _pad: AtomicU32,
    submit_offset: AtomicU64,
    submit_capacity: AtomicU64,
    complete_offset: AtomicU64,
    complete_capacity: AtomicU64,
}

#[repr(C, align(128))]
struct Status {
    /// Descriptors completed in order: every descriptor with `seq < watermark` has its completion
    /// in the completion ring.
    watermark: AtomicU64,
    /// A [`QueueState`] code.
    state: AtomicU32,
}

#[repr(C)]
struct QueueHeader {
    meta: Meta,
    status: Status,
}

const HEADER_SIZE: usize = std::mem::size_of::<QueueHeader>();
const _: () = assert!(HEADER_SIZE == 2 * INDEX_PADDING);

/// A queue's shared memory, as seen by either end.
pub(crate) struct QueueMemory {
    memory: Arc<SharedMemory>,
    header: NonNull<QueueHeader>,
    submit_offset: usize,
    complete_offset: usize,
}

// SAFETY: the header holds only atomics; `memory` keeps it mapped.
unsafe impl Send for QueueMemory {}
// SAFETY: as for Send.
unsafe impl Sync for QueueMemory {}

impl QueueMemory {
    /// Creates the memfd and writes the header and both rings.
    pub(crate) fn create(id: QueueId, client: u32, config: &QueueConfig) -> Result<QueueMemory, Error> {
        for (what, capacity) in [
            ("QueueConfig::submit_capacity", config.submit_capacity),
            ("QueueConfig::complete_capacity", config.complete_capacity),
        ] {
            check_capacity(capacity)
                .map_err(|_| Error::setting(what, capacity, format!("a power of two between 1 and {MAX_CAPACITY}")))?;
        }
        let submit_offset = HEADER_SIZE;
        let complete_offset = submit_offset + ring_bytes(config.submit_capacity, std::mem::size_of::<Descriptor>());
        let len = complete_offset + ring_bytes(config.complete_capacity, std::mem::size_of::<Completion>());
        let memory = SharedMemory::create(&format!("ferry-queue-{}", id.0), len)
            .map_err(|source| Error::SharedMemory { what: "a queue", source })?;
        let memory = Arc::new(memory);
        let header = NonNull::new(memory.as_ptr().cast::<QueueHeader>()).expect("mapping is not null");
        let meta = Meta {
            magic: AtomicU64::new(QUEUE_MAGIC),
            abi_version: AtomicU32::new(QUEUE_ABI_VERSION),
            queue: AtomicU32::new(id.0),
            client: AtomicU32::new(client),
            _pad: AtomicU32::new(0),
            submit_offset: AtomicU64::new(submit_offset as u64),
            submit_capacity: AtomicU64::new(config.submit_capacity),
            complete_offset: AtomicU64::new(complete_offset as u64),
            complete_capacity: AtomicU64::new(config.complete_capacity),
        };
        let status = Status { watermark: AtomicU64::new(0), state: AtomicU32::new(QueueState::Open.code()) };
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page-aligned, and not shared yet.
        unsafe { header.as_ptr().write(QueueHeader { meta, status }) };
        RingMemory::<Descriptor>::create(memory.clone(), submit_offset, config.submit_capacity)?;
        RingMemory::<Completion>::create(memory.clone(), complete_offset, config.complete_capacity)?;
        Ok(QueueMemory { memory, header, submit_offset, complete_offset })
    }

    /// Maps a queue's memfd and checks its header (the memfd may come from another process).
    pub(crate) fn attach(file: File) -> Result<QueueMemory, Error> {
        let memory =
            SharedMemory::open(file).map_err(|source| Error::SharedMemory { what: "attaching a queue", source })?;
        if memory.len() < HEADER_SIZE {
            return Err(Error::QueueTooSmall { len: memory.len(), need: HEADER_SIZE });
        }
        let memory = Arc::new(memory);
        let header = NonNull::new(memory.as_ptr().cast::<QueueHeader>()).expect("mapping is not null");
        // SAFETY: the mapping holds a whole header (checked); it holds only atomics, so any
        // bytes are a valid value.
        let meta = unsafe { &header.as_ref().meta };
        // Relaxed: written before the memfd was handed over; every value is checked.
        let magic = meta.magic.load(Ordering::Relaxed);
        if magic != QUEUE_MAGIC {
            return Err(Error::QueueHeader { field: "magic", found: magic, expected: QUEUE_MAGIC });
        }
        let abi = meta.abi_version.load(Ordering::Relaxed);
        if abi != QUEUE_ABI_VERSION {
            return Err(Error::QueueHeader {
                field: "abi_version",
                found: abi.into(),
                expected: QUEUE_ABI_VERSION.into(),
            });
        }
        let submit_offset = usize::try_from(meta.submit_offset.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let complete_offset = usize::try_from(meta.complete_offset.load(Ordering::Relaxed)).unwrap_or(usize::MAX);
        let queue = QueueMemory { memory, header, submit_offset, complete_offset };
        // The rings check their own headers and bounds; their capacities must match the meta.
        let submit = queue.submit_ring()?;
        let complete = queue.complete_ring()?;
        for (field, ring, meta) in [
            ("submit_capacity", submit.capacity(), meta.submit_capacity.load(Ordering::Relaxed)),
            ("complete_capacity", complete.capacity(), meta.complete_capacity.load(Ordering::Relaxed)),
        ] {
            if ring != meta {
                return Err(Error::QueueHeader { field, found: meta, expected: ring });
            }
        }
        Ok(queue)
    }

    fn header(&self) -> &QueueHeader {
        // SAFETY: the header lies in the mapping that `memory` keeps alive; atomics only.
        unsafe { self.header.as_ref() }
    }

    pub(crate) fn submit_ring(&self) -> Result<Arc<RingMemory<Descriptor>>, RingError> {
        RingMemory::attach(self.memory.clone(), self.submit_offset).map(Arc::new)
    }

    pub(crate) fn complete_ring(&self) -> Result<Arc<RingMemory<Completion>>, RingError> {
        RingMemory::attach(self.memory.clone(), self.complete_offset).map(Arc::new)
    }

    pub(crate) fn id(&self) -> QueueId {
        // Relaxed: written once before sharing.
        QueueId(self.header().meta.queue.load(Ordering::Relaxed))
    }

    pub(crate) fn state(&self) -> QueueState {
        // A5: Acquire; pairs with R5 in set_state: completions written before a state change
        // are visible.
        QueueState::from_code(self.header().status.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, state: QueueState) {
        // R5: Release; pairs with A5 in state.
        self.header().status.state.store(state.code(), Ordering::Release);
    }

    pub(crate) fn watermark(&self) -> u64 {
        // A4: Acquire; pairs with R4 in set_watermark: the completions below are published.
        self.header().status.watermark.load(Ordering::Acquire)
    }

    pub(crate) fn set_watermark(&self, watermark: u64) {
        // R4: Release; pairs with A4 in watermark.
        self.header().status.watermark.store(watermark, Ordering::Release);
    }

    pub(crate) fn file(&self) -> &File {
        self.memory.file()
    }
}

/// The client's end of a queue: pushes descriptors, polls completions. `Send`, not `Sync`.
pub struct Queue {
    memory: QueueMemory,
    submit: Producer<Descriptor>,
    complete: Consumer<Completion>,
}

impl Queue {
    pub(crate) fn from_memory(memory: QueueMemory) -> Result<Queue, Error> {
        let submit = Producer::new(memory.submit_ring()?);
        let complete = Consumer::new(memory.complete_ring()?);
        Ok(Queue { memory, submit, complete })
    }

    /// Attaches to a queue whose memfd came from the engine (for example from another process).
    /// Checks magic, ABI version and ring layout; a mismatch names the field.
    pub fn attach(file: File) -> Result<Queue, Error> {
        Queue::from_memory(QueueMemory::attach(file)?)
    }

    /// The queue's id.
    pub fn id(&self) -> QueueId {
        self.memory.id()
    }

    /// The memfd holding the queue, to hand to another process.
    pub fn file(&self) -> &File {
        self.memory.file()
    }

    /// Whether the queue is served.
    pub fn state(&self) -> QueueState {
        self.memory.state()
    }

    /// Descriptors pushed so far; the next one gets this `seq`.
    pub fn pushed(&self) -> u64 {
        self.submit.pushed()
    }

    /// In-order watermark: every descriptor with `seq <` this has its completion published.
    pub fn watermark(&self) -> u64 {
        self.memory.watermark()
    }

    /// Pushes one descriptor and publishes it at once.
    pub fn push(&mut self, d: Descriptor) -> Result<(), PushError<Descriptor>> {
        match self.state() {
            QueueState::Open => {}
            state => return Err(PushError::NotOpen(d, state)),
        }
        self.submit.push(d)
    }

    /// Pushes as many of `ds` as fit, published together; returns how many.
    pub fn submit(&mut self, ds: &[Descriptor]) -> Result<usize, Error> {
        let state = self.state();
        if state != QueueState::Open {
            return Err(Error::QueueNotOpen { queue: self.id().0, state });
        }
        let mut batch = self.submit.write();
        for (n, d) in ds.iter().enumerate() {
            match batch.push(*d) {
                Ok(()) => {}
                Err(PushError::Full(_)) => return Ok(n),
                Err(PushError::Corrupted(_, e)) => return Err(e.into()),
                Err(PushError::NotOpen(..)) => unreachable!("a ring never reports NotOpen"),
            }
        }
        Ok(ds.len())
    }

    /// Moves ready completions into `out`; returns how many.
    pub fn poll(&mut self, out: &mut [Completion]) -> Result<usize, Error> {
        let mut batch = self.complete.read(out.len() as u64)?;
        let mut n = 0;
        for slot in out.iter_mut() {
            match batch.pop() {
                Some(c) => *slot = c,
                None => break,
            }
            n += 1;
        }
        Ok(n)
    }

    /// Waits (spinning) for the next completion, at most `timeout`. Fails at once when the
    /// queue is no longer open and nothing is left to read.
    pub fn wait_one(&mut self, timeout: Duration) -> Result<Completion, Error> {
        let start = Instant::now();
        let mut out = [Completion::default()];
        let mut spins = 0u32;
        loop {
            if self.poll(&mut out)? == 1 {
                return Ok(out[0]);
            }
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 {
                let state = self.state();
                if state != QueueState::Open {
                    // A completion may have landed just before the state changed (R5/A5).
                    if self.poll(&mut out)? == 1 {
                        return Ok(out[0]);
                    }
                    return Err(Error::QueueNotOpen { queue: self.id().0, state });
                }
                if start.elapsed() > timeout {
                    return Err(Error::Timeout { what: "a completion", waited: timeout });
                }
            }
            std::hint::spin_loop();
        }
    }
}

/// The worker's end of a queue.
pub(crate) struct WorkerEnd {
    pub(crate) memory: QueueMemory,
    pub(crate) submit: Consumer<Descriptor>,
    pub(crate) complete: Producer<Completion>,
    pub(crate) client: u32,
}

impl WorkerEnd {
    pub(crate) fn new(memory: QueueMemory, client: u32) -> Result<WorkerEnd, Error> {
        let submit = Consumer::new(memory.submit_ring()?);
        let complete = Producer::new(memory.complete_ring()?);
        Ok(WorkerEnd { memory, submit, complete, client })
    }
}
