//! Queues: one submission ring and one completion ring in one sealed memfd, plus a header with
//! the queue's id, owner, state, in-order watermark and the claims on its two ends.
//!
//! ```text
//! offset 0     QueueHeader: meta (magic, ABI, ids, ring offsets)     written once by the engine
//!              | status (watermark, totals)                        written by the worker, every flush
//!              | ends (holders, client's close, state)             written at claims, closes, breaks
//!              | signals (gate, landed, wants_landed)              streams, the client, the worker
//!              | slots (64 notification words)                     the worker and the client's streams
//! offset 1024  submission ring: RingHeader + capacity x Descriptor  (client -> worker)
//! then         completion ring: RingHeader + capacity x Completion  (worker -> client)
//! ```
//!
//! Each block has its own cache-line pair. What the client reads on every push (the state) is
//! not on the line the worker writes with every completion (the status): a push would wait for
//! that line to come back from the worker's core.
//!
//! [`Queue`] is the client's end. It can live in the engine's process or, through
//! [`Queue::attach`] on the memfd, in another one.
//!
//! # Claimed ends
//!
//! Each ring is single-producer single-consumer, so each end of a queue has one owner, recorded
//! in the header: the client end ([`Queue`]: producer of the submission ring, consumer of the
//! completion ring) and the worker end (the engine's worker: the other two). The holder is
//! written as the process id together with the process's start time (`/proc/<pid>/stat` field
//! 22), so that a reused pid is not taken for the holder. Taking an end that a live process
//! holds (this one included) fails with [`Error::QueueEndClaimed`], naming the queue, the end
//! and the holder's pid. An end whose holder has exited (killed, crashed) is taken over by the
//! next claim: [`Queue::attach`] is the mechanism to reclaim a dead client's end, and it
//! continues from the ring indices in shared memory (completions the dead client had not read
//! are still there; descriptors it had not published are lost). Claims assume that the peers
//! share one pid namespace, as passing the memfd through `/proc/<pid>/fd` does.
//!
//! # Lifecycle
//!
//! [`Engine::open_queue`](crate::Engine::open_queue) returns the queue with its client end
//! claimed by this process. To serve a client in another process, hand the memfd over with
//! [`Queue::hand_off`] (which releases the claim and keeps the queue open) and
//! [`Queue::attach`] it there.
//!
//! Dropping a [`Queue`] (or [`Queue::close`]) closes it: it marks the header closed and releases
//! its claim. The worker notices on its next visit: copies the transport has already started
//! run to the end (their regions stay counted until then), descriptors not yet started are
//! dropped without a completion (nobody is left to read one), and then the worker frees the
//! queue's memory, file descriptor and slot, and stops visiting it
//! ([`EngineStats::queues`](crate::EngineStats::queues) counts it until then). A closed queue
//! cannot be attached again ([`QueueState::ClosedByClient`]).
//!
//! Shutting the engine down closes every queue it serves ([`QueueState::Closed`]); a client,
//! in this process or another, keeps its mapping and reads the completions that were
//! published.

use crate::config::QueueConfig;
use crate::desc::{Completion, Descriptor, QueueEnd, QueueState, NOTIFY_SLOTS};
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
/// Bumped whenever the queue header changes shape (2: the ends block with the claims and the
/// client's close; 3: the gate word; 4: the notification slots; 5: the landed word; 6: the
/// state moved from the status block to the ends block).
pub const QUEUE_ABI_VERSION: u32 = 6;

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
    /// Bytes of the descriptors completed `Ok` (written by the worker, for `ferry stat`).
    bytes: AtomicU64,
    /// Descriptors completed with another status (written by the worker, for `ferry stat`).
    failed: AtomicU64,
}

/// Who holds each end, the client's close and the queue's state. Written only when an end is
/// claimed or released, when the client closes the queue and when the queue's state changes, so
/// the worker's looks at `closed` and the client's look at `state` on every push
/// read a cache line that stays shared.
#[repr(C, align(128))]
struct Ends {
    /// The client end's holder, a [`Holder`] word; 0 when free.
    client: AtomicU64,
    /// The worker end's holder, a [`Holder`] word; 0 when free.
    worker: AtomicU64,
    /// Nonzero once the client closed the queue (written by the client end only).
    closed: AtomicU32,
    /// A [`QueueState`] code.
    state: AtomicU32,
}

/// The gate word: written by the client's CUDA streams (`cuStreamWriteValue64`, through
/// `Engine::stream_signal`) or by the client's CPU (`Queue::signal`), read by the worker before a
/// gate descriptor lets the queue go on. On its own line: a GPU writes it.
#[repr(C, align(128))]
struct Signals {
    gate: AtomicU64,
    /// Every copy of the descriptors with `seq < landed` has finished on the device (failed
    /// ones, gates and notifications count): what `Engine::stream_wait` waits on. Written by the
    /// worker's CUDA stream right after the copies (`Transport::mark`) once the client asked
    /// (`wants_landed`), else by the worker's CPU with the watermark. Only grows.
    landed: AtomicU64,
    /// Nonzero once a client stream waits on `landed` (set by `Engine::stream_wait`).
    wants_landed: AtomicU32,
}

/// The notification slots ([`crate::FLAG_NOTIFY`]): written by the worker (a notification's value,
/// once the slot reads 0), cleared by the client's CUDA streams (`Engine::stream_wait_slot`) or
/// CPU (`Queue::clear_slot`).
#[repr(C, align(128))]
struct Slots {
    words: [AtomicU64; NOTIFY_SLOTS as usize],
}

#[repr(C)]
struct QueueHeader {
    meta: Meta,
    status: Status,
    ends: Ends,
    signals: Signals,
    slots: Slots,
}

const HEADER_SIZE: usize = std::mem::size_of::<QueueHeader>();
const _: () = assert!(HEADER_SIZE == 8 * INDEX_PADDING);

/// A queue's header registered with the CUDA driver in this process: the device addresses of
/// its watermark and gate word, for stream memory operations.
#[derive(Debug)]
pub(crate) struct DeviceWords {
    pub(crate) _registration: crate::cuda_driver::HostRegistration,
    /// Device address of the landed word (64-bit; `cuStreamWaitValue64` on it).
    pub(crate) landed: u64,
    /// Device address of the gate word (`cuStreamWriteValue64` on it).
    pub(crate) gate: u64,
    /// Device address of notification slot 0 (the others follow, 8 bytes apart).
    pub(crate) slots: u64,
}

/// A queue's counters as its header holds them ([`Queue::stats_of`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Descriptors whose completion is published (the watermark).
    pub completed: u64,
    /// Descriptors pushed and not yet completed.
    pub depth: u64,
    /// Bytes of the descriptors completed ok.
    pub bytes: u64,
    /// Descriptors completed with an error status.
    pub failed: u64,
    /// Whether the queue is open (not closed by either end, not broken).
    pub open: bool,
}

/// Where the words that CUDA streams wait on or write lie in a queue's header.
#[derive(Clone, Copy, Debug)]
pub(crate) struct WordOffsets {
    pub(crate) landed: usize,
    pub(crate) gate: usize,
    pub(crate) slots: usize,
}

/// A process holding a queue end: its pid and its start time in clock ticks after boot
/// (`/proc/<pid>/stat` field 22; 0 where /proc could not be read), so that a reused pid does
/// not pass for the holder. In the header as one word, `pid << 42 | start_ticks`: Linux pids
/// are below 2^22 (`PID_MAX_LIMIT`) and 42 bits of ticks last longer than any uptime.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Holder {
    pid: u32,
    start_ticks: u64,
}

const START_BITS: u32 = 42;
const START_MASK: u64 = (1 << START_BITS) - 1;

impl Holder {
    /// This process.
    fn current() -> Holder {
        static CURRENT: std::sync::OnceLock<Holder> = std::sync::OnceLock::new();
        let pid = std::process::id();
        let read =
            || Holder { pid, start_ticks: crate::sys::process_stat(None).map_or(0, |s| s.start_ticks & START_MASK) };
        let cached = *CURRENT.get_or_init(read);
        // A forked child inherits the cache: it is another process.
        if cached.pid == pid {
            cached
        } else {
            read()
        }
    }

    fn word(self) -> u64 {
        u64::from(self.pid) << START_BITS | self.start_ticks
    }

    /// The holder in a header word (which another process may have written: any value decodes).
    fn from_word(word: u64) -> Holder {
        Holder { pid: (word >> START_BITS) as u32, start_ticks: word & START_MASK }
    }

    /// Whether the holder is a running process. A zombie, a missing pid or a pid now used by a
    /// later process (another start time) is not. Where the pid exists but /proc does not show
    /// it (`hidepid`), the holder is taken to be alive.
    fn is_alive(self) -> bool {
        if !crate::sys::process_exists(self.pid) {
            return false;
        }
        match crate::sys::process_stat(Some(self.pid)) {
            Ok(stat) => !stat.exited() && (self.start_ticks == 0 || stat.start_ticks & START_MASK == self.start_ticks),
            Err(_) => true,
        }
    }
}

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
        let status = Status { watermark: AtomicU64::new(0), bytes: AtomicU64::new(0), failed: AtomicU64::new(0) };
        let ends = Ends {
            client: AtomicU64::new(0),
            worker: AtomicU64::new(0),
            closed: AtomicU32::new(0),
            state: AtomicU32::new(QueueState::Open.code()),
        };
        let signals = Signals { gate: AtomicU64::new(0), landed: AtomicU64::new(0), wants_landed: AtomicU32::new(0) };
        let slots = Slots { words: std::array::from_fn(|_| AtomicU64::new(0)) };
        // SAFETY: the mapping is at least HEADER_SIZE bytes, page-aligned, and not shared yet.
        unsafe { header.as_ptr().write(QueueHeader { meta, status, ends, signals, slots }) };
        RingMemory::<Descriptor>::create(memory.clone(), submit_offset, config.submit_capacity)?;
        RingMemory::<Completion>::create(memory.clone(), complete_offset, config.complete_capacity)?;
        Ok(QueueMemory { memory, header, submit_offset, complete_offset })
    }

    /// Maps a queue's memfd for a look at its header, leaving the caller's file as it is.
    fn look(file: &File) -> Result<QueueMemory, Error> {
        let file = file.try_clone().map_err(|source| Error::SharedMemory { what: "a queue", source })?;
        QueueMemory::attach(file)
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
        QueueState::from_code(self.header().ends.state.load(Ordering::Acquire))
    }

    pub(crate) fn set_state(&self, state: QueueState) {
        // R5: Release; pairs with A5 in state.
        self.header().ends.state.store(state.code(), Ordering::Release);
    }

    pub(crate) fn watermark(&self) -> u64 {
        // A4: Acquire; pairs with R4 in set_watermark: the completions below are published.
        self.header().status.watermark.load(Ordering::Acquire)
    }

    pub(crate) fn set_watermark(&self, watermark: u64) {
        // R4: Release; pairs with A4 in watermark.
        self.header().status.watermark.store(watermark, Ordering::Release);
    }

    /// The worker's totals of bytes completed ok and of failed descriptors (one writer).
    pub(crate) fn set_totals(&self, bytes: u64, failed: u64) {
        // Relaxed: statistics, read by `ferry stat` only; no other memory depends on them.
        self.header().status.bytes.store(bytes, Ordering::Relaxed);
        self.header().status.failed.store(failed, Ordering::Relaxed);
    }

    /// What `ferry stat` shows of a queue.
    pub(crate) fn stats(&self) -> Result<QueueStats, Error> {
        let status = &self.header().status;
        // Relaxed throughout: a snapshot for display; each value is read once.
        let pushed = self.submit_ring()?.header().tail.0.load(Ordering::Relaxed);
        let watermark = status.watermark.load(Ordering::Relaxed);
        Ok(QueueStats {
            completed: watermark,
            depth: pushed.saturating_sub(watermark),
            bytes: status.bytes.load(Ordering::Relaxed),
            failed: status.failed.load(Ordering::Relaxed),
            open: !self.close_requested() && self.state() == QueueState::Open,
        })
    }

    /// The gate word (see [`Signals`]).
    pub(crate) fn gate(&self) -> u64 {
        // A9: Acquire; pairs with R9 in set_gate (a GPU's write carries its own barrier:
        // cuStreamWriteValue64 without NO_MEMORY_BARRIER orders the stream's earlier writes).
        self.header().signals.gate.load(Ordering::Acquire)
    }

    pub(crate) fn set_gate(&self, value: u64) {
        // R9: Release; pairs with A9 in gate: what the client wrote before is visible to the
        // worker's copies behind the gate.
        self.header().signals.gate.store(value, Ordering::Release);
    }

    /// The landed word (see [`Signals`]).
    pub(crate) fn landed(&self) -> u64 {
        // Relaxed: a progress value for tests and the CPU path's own bookkeeping; streams read
        // it through the device, and the data behind it is ordered by the stream that wrote it.
        self.header().signals.landed.load(Ordering::Relaxed)
    }

    /// The worker's CPU path: the landed word follows the watermark.
    pub(crate) fn set_landed(&self, value: u64) {
        // R11: Release; pairs with a stream's wait on the word through the device (the CPU
        // path is taken for transports whose copies finished before their completion was
        // published, so the bytes are in place).
        self.header().signals.landed.store(value, Ordering::Release);
    }

    /// Whether a client stream waits on the landed word.
    pub(crate) fn wants_landed(&self) -> bool {
        // Relaxed: a request flag; the worker then marks everything taken so far, whatever it
        // saw before.
        self.header().signals.wants_landed.load(Ordering::Relaxed) != 0
    }

    /// Asks the worker to keep the landed word current on the device (see [`Signals`]).
    pub(crate) fn request_landed(&self) {
        // Relaxed: see wants_landed.
        self.header().signals.wants_landed.store(1, Ordering::Relaxed);
    }

    /// Notification slot `slot` (below NOTIFY_SLOTS: the worker validated it; the client's
    /// calls check it).
    pub(crate) fn slot(&self, slot: usize) -> u64 {
        // A10: Acquire; pairs with R10 in set_slot (a stream's clear needs no ordering: the
        // worker only checks that it happened).
        self.header().slots.words[slot].load(Ordering::Acquire)
    }

    pub(crate) fn set_slot(&self, slot: usize, value: u64) {
        // R10: Release; pairs with A10 in slot: a CPU that sees the value sees the completions
        // published before it.
        self.header().slots.words[slot].store(value, Ordering::Release);
    }

    /// The header's first byte and length, for a CUDA registration of the words a stream waits
    /// on or writes (the watermark, the gate word, the notification slots).
    pub(crate) fn header_span(&self) -> (*mut u8, usize) {
        (self.header.as_ptr().cast::<u8>(), HEADER_SIZE)
    }

    /// Byte offsets in the header of the words streams use.
    pub(crate) fn word_offsets() -> WordOffsets {
        WordOffsets {
            landed: std::mem::offset_of!(QueueHeader, signals.landed),
            gate: std::mem::offset_of!(QueueHeader, signals.gate),
            slots: std::mem::offset_of!(QueueHeader, slots.words),
        }
    }

    pub(crate) fn file(&self) -> &File {
        self.memory.file()
    }

    fn end_word(&self, end: QueueEnd) -> &AtomicU64 {
        let ends = &self.header().ends;
        match end {
            QueueEnd::Client => &ends.client,
            QueueEnd::Worker => &ends.worker,
        }
    }

    /// Claims `end` for this process: free, or held by a process that has exited (then taken
    /// over). Fails when a live process, this one included, holds it.
    pub(crate) fn claim(&self, end: QueueEnd) -> Result<Holder, Error> {
        let me = Holder::current();
        let word = self.end_word(end);
        // A7: Acquire; pairs with R7 in release: the last holder's ring index stores are visible
        // to the ring end made after the claim.
        let mut seen = word.load(Ordering::Acquire);
        loop {
            if seen != 0 {
                let holder = Holder::from_word(seen);
                if holder.is_alive() {
                    return Err(Error::QueueEndClaimed { queue: self.id().0, end, pid: holder.pid });
                }
            }
            // C7: Acquire on success and failure; pairs with R7 in release, as A7. A compare and
            // swap, so that of two processes taking over the same exited holder one wins.
            match word.compare_exchange(seen, me.word(), Ordering::Acquire, Ordering::Acquire) {
                Ok(_) => return Ok(me),
                Err(now) => seen = now,
            }
        }
    }

    /// Releases `end` if `holder` (from [`QueueMemory::claim`]) still holds it. A forked child
    /// holds nothing: its copy of the end releases nothing.
    pub(crate) fn release(&self, end: QueueEnd, holder: Holder) {
        if holder.pid != std::process::id() {
            return;
        }
        // R7: Release; pairs with A7/C7 in claim: this end's ring index stores come first.
        let _ = self.end_word(end).compare_exchange(holder.word(), 0, Ordering::Release, Ordering::Relaxed);
    }

    /// The client closes the queue: no descriptor follows, no completion will be read.
    /// Sets the close flag: by the client end, or by the worker for a client that died.
    pub(crate) fn close(&self) {
        // R8: Release; pairs with A8 in close_requested: the client's ring stores (R1, R2) come
        // first, so whoever sees the close sees the rings as the client left them.
        self.header().ends.closed.store(1, Ordering::Release);
    }

    /// Whether a process holds the client end and is no longer alive (killed, crashed, or its
    /// pid now another process's). Reads /proc: the worker calls it at most every
    /// `CLIENT_CHECK_INTERVAL` per queue.
    pub(crate) fn client_died(&self) -> bool {
        // Relaxed: advisory; a claim or release racing with this look is seen at the next one.
        match self.header().ends.client.load(Ordering::Relaxed) {
            0 => false,
            word => !Holder::from_word(word).is_alive(),
        }
    }

    /// `Err` with the worker end's last holder when no live process holds it (a daemon killed,
    /// an engine's process gone). Reads /proc unless this process is the holder: the client end
    /// calls it at most every [`ENGINE_CHECK_INTERVAL`].
    pub(crate) fn worker_alive(&self) -> Result<(), u32> {
        // Relaxed: advisory, as in client_died.
        match self.header().ends.worker.load(Ordering::Relaxed) {
            0 => Err(0),
            word => {
                let holder = Holder::from_word(word);
                if holder.pid == std::process::id() || holder.is_alive() {
                    Ok(())
                } else {
                    Err(holder.pid)
                }
            }
        }
    }

    /// Whether the client closed the queue. Read by the worker on its visits (worker.rs: every one
    /// of a busy queue, every `IDLE_LOOK`-th of an idle one).
    pub(crate) fn close_requested(&self) -> bool {
        // A8: Acquire; pairs with R8 in close.
        self.header().ends.closed.load(Ordering::Acquire) != 0
    }
}

/// The client's end of a queue: pushes descriptors, polls completions. `Send`, not `Sync`.
///
/// It holds the queue's client end (see the [module docs](self)); dropping it closes the queue.
pub struct Queue {
    /// The header registered with CUDA for stream waits and signals (`Engine::stream_wait`);
    /// declared first: it is unregistered before the mapping goes.
    pub(crate) device_words: Option<DeviceWords>,
    memory: QueueMemory,
    submit: Producer<Descriptor>,
    complete: Consumer<Completion>,
    /// This process, as recorded in the header's client end.
    holder: Holder,
    /// Whether dropping closes the queue (false after [`Queue::hand_off`]).
    close_on_drop: bool,
    /// When the client end next looks whether the engine is still there, and what it found.
    engine: EngineWatch,
}

/// How often, at most, a client end that finds nothing to poll or no room to push looks whether
/// the process serving its queue is alive (it reads /proc).
pub const ENGINE_CHECK_INTERVAL: Duration = Duration::from_millis(20);

/// Empty polls or full pushes between two looks at the clock.
const ENGINE_CHECK_CALLS: u32 = 256;

struct EngineWatch {
    calls: u32,
    next: Instant,
    /// The worker end's last holder, once it is found gone.
    gone: Option<u32>,
}

impl Queue {
    /// Claims the client end of `memory` and makes the ring ends.
    pub(crate) fn from_memory(memory: QueueMemory) -> Result<Queue, Error> {
        if memory.close_requested() {
            return Err(Error::QueueNotOpen { queue: memory.id().0, state: QueueState::ClosedByClient });
        }
        let submit_ring = memory.submit_ring()?;
        let complete_ring = memory.complete_ring()?;
        let holder = memory.claim(QueueEnd::Client)?;
        // The last holder may have closed the queue between the look above and the claim.
        if memory.close_requested() {
            memory.release(QueueEnd::Client, holder);
            return Err(Error::QueueNotOpen { queue: memory.id().0, state: QueueState::ClosedByClient });
        }
        // Made after the claim (A7), so they continue from the last holder's indices.
        let submit = Producer::new(submit_ring);
        let complete = Consumer::new(complete_ring);
        let engine = EngineWatch { calls: 0, next: Instant::now() + ENGINE_CHECK_INTERVAL, gone: None };
        Ok(Queue { device_words: None, memory, submit, complete, holder, close_on_drop: true, engine })
    }

    /// A snapshot of the counters of the queue whose memfd is `file` (a daemon's `ferry stat`).
    /// Maps the memfd for the look; claims nothing. Values written by the other process are
    /// shown as they are.
    pub fn stats_of(file: &File) -> Result<QueueStats, Error> {
        QueueMemory::look(file)?.stats()
    }

    /// Whether the client of the queue whose memfd is `file` has closed it (a daemon counting a
    /// connection's open queues). Maps the memfd for the look; claims nothing.
    pub fn closed_by_client(file: &File) -> Result<bool, Error> {
        Ok(QueueMemory::look(file)?.close_requested())
    }

    /// Attaches to a queue whose memfd came from the engine (for example from another process).
    /// Checks magic, ABI version and ring layout; a mismatch names the field. Claims the client
    /// end: fails with [`Error::QueueEndClaimed`] while a live process holds it (for a queue
    /// opened with [`Engine::open_queue`](crate::Engine::open_queue), until that process calls
    /// [`Queue::hand_off`]), and takes it over from a holder that has exited, continuing from the
    /// ring indices in shared memory. A queue its client closed is refused with
    /// [`Error::QueueNotOpen`] ([`QueueState::ClosedByClient`]).
    pub fn attach(file: File) -> Result<Queue, Error> {
        Queue::from_memory(QueueMemory::attach(file)?)
    }

    /// Closes the queue; the same as dropping it. Returns at once: the worker lets copies the
    /// transport has started finish, drops descriptors it has not started (no completion is
    /// written: nobody reads them), then frees the queue's memory, file descriptor and slot.
    /// [`EngineStats::queues`](crate::EngineStats::queues) goes down when it has.
    pub fn close(self) {
        drop(self);
    }

    /// Releases this process's claim on the client end without closing the queue, and returns
    /// a duplicate of its memfd for another process to [`Queue::attach`]. The queue stays open
    /// and served until that client closes it (or the engine shuts down); if nobody ever
    /// attaches, it stays open until the engine shuts down. If the memfd cannot be duplicated
    /// (no file descriptor left), the queue is closed, as if dropped.
    pub fn hand_off(mut self) -> Result<File, Error> {
        let file =
            self.file().try_clone().map_err(|source| Error::SharedMemory { what: "handing off a queue", source })?;
        self.close_on_drop = false;
        Ok(file)
    }

    /// The queue's id.
    pub fn id(&self) -> QueueId {
        self.memory.id()
    }

    /// The memfd holding the queue. Another process can attach it only once this end is
    /// released: use [`Queue::hand_off`] to pass the queue on.
    pub fn file(&self) -> &File {
        self.memory.file()
    }

    /// Whether the queue is served.
    pub fn state(&self) -> QueueState {
        self.memory.state()
    }

    /// Descriptors pushed so far; the next one gets this `seq`, and a wait for all of them
    /// waits for this watermark (as with [`crate::Engine::stream_wait`]).
    pub fn pushed(&self) -> u64 {
        self.submit.pushed()
    }

    /// In-order watermark: every descriptor with `seq <` this has its completion published.
    pub fn watermark(&self) -> u64 {
        self.memory.watermark()
    }

    /// Sets the queue's gate word from the CPU: a gate descriptor ([`Descriptor::gate`]) lets
    /// the queue go on once the word reaches its value. The values a client writes should grow;
    /// a CUDA stream writes the same word with [`crate::Engine::stream_signal`]. Whatever this
    /// thread wrote before is visible to the copies behind the gate.
    pub fn signal(&self, value: u64) {
        self.memory.set_gate(value);
    }

    /// The queue's gate word as it is now.
    pub fn gate(&self) -> u64 {
        self.memory.gate()
    }

    /// Notification slot `slot` as it is now ([`crate::FLAG_NOTIFY`]; 0: clear).
    pub fn slot(&self, slot: u32) -> Result<u64, Error> {
        Ok(self.memory.slot(check_slot(slot)?))
    }

    /// Clears notification slot `slot` from the CPU, so that the queue's next notification for
    /// it can land (a CUDA stream clears it with `Engine::stream_wait_slot`).
    pub fn clear_slot(&self, slot: u32) -> Result<(), Error> {
        self.memory.set_slot(check_slot(slot)?, 0);
        Ok(())
    }

    /// The header span and the offsets of the words streams use, for a CUDA registration
    /// (`Engine::stream_wait`).
    pub(crate) fn header_span(&self) -> ((*mut u8, usize), WordOffsets) {
        (self.memory.header_span(), QueueMemory::word_offsets())
    }

    /// The landed word (see [`crate::Engine::stream_wait`]): every copy of the descriptors
    /// with `seq <` this has finished on the device. It follows the watermark, or runs ahead
    /// of it once a stream waits on the queue and the CUDA transport writes it from its stream.
    pub fn landed(&self) -> u64 {
        self.memory.landed()
    }

    /// Asks the worker to keep the landed word current behind the copies, as
    /// [`crate::Engine::stream_wait`] does first: a transport that marks it from the device
    /// ([`crate::Transport::mark`]: the CUDA transport) then writes it right after the copies,
    /// ahead of the watermark; for the others it follows the watermark anyway.
    pub fn request_landed(&self) {
        self.memory.request_landed();
    }

    /// Pushes one descriptor and publishes it at once. A full ring whose engine is found gone
    /// (see [`Queue::check_engine`]) gives the descriptor back as `NotOpen(d, Broken)`;
    /// [`Queue::submit`] says [`Error::EngineGone`].
    pub fn push(&mut self, d: Descriptor) -> Result<(), PushError<Descriptor>> {
        match self.state() {
            QueueState::Open if self.engine.gone.is_none() => {}
            QueueState::Open => return Err(PushError::NotOpen(d, QueueState::Broken)),
            state => return Err(PushError::NotOpen(d, state)),
        }
        let pushed = self.submit.push(d);
        if matches!(pushed, Err(PushError::Full(_))) && self.engine_gone().is_some() {
            return Err(PushError::NotOpen(d, QueueState::Broken));
        }
        pushed
    }

    /// `Err(Error::EngineGone)` once the process serving the queue is found gone. Looks at
    /// most every [`ENGINE_CHECK_INTERVAL`], from the calls that found nothing to do; the
    /// ring operations themselves never wait for it.
    pub fn check_engine(&mut self) -> Result<(), Error> {
        match self.engine_gone() {
            Some(pid) => Err(Error::EngineGone { queue: self.id().0, pid }),
            None => Ok(()),
        }
    }

    /// The gone engine's holder pid, looked up at most every ENGINE_CHECK_CALLS calls and
    /// ENGINE_CHECK_INTERVAL.
    fn engine_gone(&mut self) -> Option<u32> {
        let watch = &mut self.engine;
        if watch.gone.is_some() {
            return watch.gone;
        }
        watch.calls += 1;
        if watch.calls < ENGINE_CHECK_CALLS {
            return None;
        }
        watch.calls = 0;
        let now = Instant::now();
        if now < watch.next {
            return None;
        }
        watch.next = now + ENGINE_CHECK_INTERVAL;
        // A queue closed by its engine (shutdown, broken) says so with its state instead.
        if self.memory.state() == QueueState::Open {
            watch.gone = self.memory.worker_alive().err();
        }
        watch.gone
    }

    /// Pushes as many of `ds` as fit, published together; returns how many.
    pub fn submit(&mut self, ds: &[Descriptor]) -> Result<usize, Error> {
        let state = self.state();
        if state != QueueState::Open {
            return Err(Error::QueueNotOpen { queue: self.id().0, state });
        }
        if let Some(pid) = self.engine.gone {
            return Err(Error::EngineGone { queue: self.id().0, pid });
        }
        let mut batch = self.submit.write();
        for (n, d) in ds.iter().enumerate() {
            match batch.push(*d) {
                Ok(()) => {}
                Err(PushError::Full(_)) => {
                    drop(batch);
                    if n == 0 {
                        self.check_engine()?;
                    }
                    return Ok(n);
                }
                Err(PushError::Corrupted(_, e)) => return Err(e.into()),
                Err(PushError::NotOpen(..)) => unreachable!("a ring never reports NotOpen"),
            }
        }
        Ok(ds.len())
    }

    /// Moves ready completions into `out`; returns how many. Fails with
    /// [`Error::EngineGone`] once nothing is left to read and the process serving the queue is
    /// found gone (looked at now and then while polls come back empty; see
    /// [`ENGINE_CHECK_INTERVAL`]).
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
        drop(batch);
        if n == 0 && !out.is_empty() {
            self.check_engine()?;
        }
        Ok(n)
    }

    /// Waits (spinning) for the next completion, at most `timeout`. Fails at once when the
    /// queue is no longer open and nothing is left to read.
    pub fn wait_one(&mut self, timeout: Duration) -> Result<Completion, Error> {
        let mut out = [Completion::default()];
        match self.poll_wait(&mut out, 1, timeout)? {
            1 => Ok(out[0]),
            _ => Err(Error::Timeout { what: "a completion", waited: timeout }),
        }
    }

    /// Polls (spinning) into `out` until at least `min` completions are there (`min` is capped at
    /// `out.len()`) or `timeout` has passed, and returns how many it moved: fewer than `min`
    /// only after the timeout. Completions taken from the ring are always returned, never
    /// dropped. Fails when the queue is no longer open and nothing was left to read.
    pub fn poll_wait(&mut self, out: &mut [Completion], min: usize, timeout: Duration) -> Result<usize, Error> {
        let min = min.min(out.len());
        let start = Instant::now();
        let mut n = self.poll(out)?;
        let mut spins = 0u32;
        while n < min {
            spins = spins.wrapping_add(1);
            if spins % 1024 == 0 {
                let state = self.state();
                if state != QueueState::Open {
                    // A completion may have landed just before the state changed (R5/A5).
                    n += self.poll(&mut out[n..])?;
                    if n == 0 {
                        return Err(Error::QueueNotOpen { queue: self.id().0, state });
                    }
                    return Ok(n);
                }
                if start.elapsed() > timeout {
                    return Ok(n);
                }
            }
            std::hint::spin_loop();
            match self.poll(&mut out[n..]) {
                Ok(got) => n += got,
                // What this call took already is handed out; the next call reports the error.
                Err(_) if n > 0 => return Ok(n),
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }
}

impl Drop for Queue {
    fn drop(&mut self) {
        if self.close_on_drop {
            self.memory.close();
        }
        self.memory.release(QueueEnd::Client, self.holder);
    }
}

/// The worker's end of a queue. Holds the worker end's claim until dropped.
pub(crate) struct WorkerEnd {
    /// The worker's own registration of this header with the CUDA driver (none for a custom
    /// transport, given the host address) and the address of its landed word there, for the
    /// transport to write ([`crate::Transport::mark`]); dropped before `memory` unmaps it.
    pub(crate) landed_word: Option<(Option<crate::cuda_driver::HostRegistration>, u64)>,
    pub(crate) memory: QueueMemory,
    pub(crate) submit: Consumer<Descriptor>,
    pub(crate) complete: Producer<Completion>,
    pub(crate) client: u32,
    /// [`QueueConfig::gate_timeout`].
    pub(crate) gate_timeout: std::time::Duration,
    /// [`QueueConfig::close_if_client_dies`].
    pub(crate) close_if_client_dies: bool,
    holder: Holder,
}

impl WorkerEnd {
    /// Claims the worker end of `memory` (taking it over from an engine process that has
    /// exited) and makes the ring ends.
    pub(crate) fn new(memory: QueueMemory, client: u32) -> Result<WorkerEnd, Error> {
        let submit_ring = memory.submit_ring()?;
        let complete_ring = memory.complete_ring()?;
        let holder = memory.claim(QueueEnd::Worker)?;
        let submit = Consumer::new(submit_ring);
        let complete = Producer::new(complete_ring);
        let QueueConfig { gate_timeout, close_if_client_dies, .. } = QueueConfig::default();
        Ok(WorkerEnd {
            landed_word: None,
            memory,
            submit,
            complete,
            client,
            gate_timeout,
            close_if_client_dies,
            holder,
        })
    }
}

impl Drop for WorkerEnd {
    fn drop(&mut self) {
        self.memory.release(QueueEnd::Worker, self.holder);
    }
}

/// `slot` as an index, if it names one of the queue's notification slots.
pub(crate) fn check_slot(slot: u32) -> Result<usize, Error> {
    if slot < NOTIFY_SLOTS {
        Ok(slot as usize)
    } else {
        Err(Error::setting("notification slot", slot, format!("below {NOTIFY_SLOTS}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory() -> QueueMemory {
        let config = QueueConfig { submit_capacity: 4, complete_capacity: 4, ..QueueConfig::default() };
        QueueMemory::create(QueueId(7), 1, &config).unwrap()
    }

    #[test]
    fn the_worker_end_is_claimed_once_and_released_on_drop() {
        let memory = memory();
        let twin = || QueueMemory::attach(memory.file().try_clone().unwrap()).unwrap();
        let end = WorkerEnd::new(twin(), 1).unwrap();
        match WorkerEnd::new(twin(), 1) {
            Err(Error::QueueEndClaimed { queue: 7, end: QueueEnd::Worker, pid }) => assert_eq!(pid, std::process::id()),
            other => panic!("expected QueueEndClaimed, got {:?}", other.err()),
        }
        drop(end);
        WorkerEnd::new(twin(), 1).unwrap();
    }

    #[test]
    fn a_holder_word_names_one_process() {
        let me = Holder::current();
        assert_eq!(me.pid, std::process::id());
        assert_ne!(me.start_ticks, 0, "/proc/self/stat is readable here");
        assert_eq!(Holder::from_word(me.word()), me);
        assert!(me.is_alive());
        // The same pid with another start time is a process that reused the pid.
        assert!(!Holder { start_ticks: (me.start_ticks + 1) & START_MASK, ..me }.is_alive());
        // No process has pid 0; any word decodes, and garbage is not alive.
        assert!(!Holder::from_word(0).is_alive());
        assert!(!Holder::from_word(u64::MAX).is_alive());
    }

    #[test]
    fn an_end_held_by_an_exited_process_or_garbage_is_taken_over() {
        let memory = memory();
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        child.wait().unwrap();
        for word in [Holder { pid, start_ticks: 1 }.word(), Holder { pid, start_ticks: 0 }.word(), u64::MAX] {
            memory.end_word(QueueEnd::Client).store(word, Ordering::Relaxed);
            let queue = Queue::from_memory(QueueMemory::attach(memory.file().try_clone().unwrap()).unwrap()).unwrap();
            assert_eq!(memory.end_word(QueueEnd::Client).load(Ordering::Relaxed), Holder::current().word());
            queue.hand_off().unwrap();
            assert_eq!(memory.end_word(QueueEnd::Client).load(Ordering::Relaxed), 0);
        }
    }
}
