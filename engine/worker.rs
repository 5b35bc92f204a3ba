//! The polling loop of one worker.
//!
//! Thread contract: a worker is one thread, pinned to its core, that owns its transport and its
//! queues' worker ends; nothing else touches them. Each loop iteration it:
//! 1. announces a new epoch (region deregistration waits on it) and adopts new queues;
//! 2. visits every queue it serves, round-robin: publishes finished completions in order, then,
//!    unless completions are held back by a full completion ring, takes at most `burst`
//!    descriptors, validates them and collects the valid ones in one batch;
//! 3. offers the batch to the transport (what it does not accept waits for the next iteration:
//!    the partial batch is never held past one iteration);
//! 4. polls the transport and publishes the completions it unblocked.
//!
//! A queue whose client closed it (the header's close flag, looked at on every visit of a queue
//! with work in its ring or in flight, every `IDLE_LOOK` visits of an idle one) takes no
//! more work and publishes nothing: the copies of its batch not yet given to the transport are
//! dropped (their regions released), the copies the transport started run to the end, and once
//! none is left the worker frees the queue (its mapping, memfd, window and slot index) and
//! stops visiting it. Descriptors left in its submission ring are never read. A slot index
//! (the `queue` of a [`Token`]) is reused only after its queue's copies are all done.
//!
//! It never sleeps on this path; with [`IdlePolicy::Yield`] it yields the CPU after a run of
//! empty iterations.

use crate::config::{IdlePolicy, CLIENT_CHECK_INTERVAL};
use crate::desc::{
    validate, validate_gate, validate_notify, validate_plain, Completion, QueueState, Status, FLAG_STRIDED,
};
use crate::queue::WorkerEnd;
use crate::region::RegionTable;
use crate::ring::PushError;
use crate::transport::gdr::NicStats;
use crate::transport::{Done, Op, Token, Transport};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Per-worker counters, written by the worker with Relaxed stores (statistics only: nothing is
/// ordered by them).
#[derive(Debug, Default)]
pub(crate) struct WorkerCounters {
    iterations: AtomicU64,
    idle_iterations: AtomicU64,
    descriptors: AtomicU64,
    completions: AtomicU64,
}

impl WorkerCounters {
    pub(crate) fn add_iteration(&self, took: usize, reaped: usize, idle: bool) {
        // Relaxed: single writer, statistics only.
        let bump = |c: &AtomicU64, n: u64| c.store(c.load(Ordering::Relaxed) + n, Ordering::Relaxed);
        bump(&self.iterations, 1);
        bump(&self.idle_iterations, u64::from(idle));
        bump(&self.descriptors, took as u64);
        bump(&self.completions, reaped as u64);
    }

    /// A snapshot, with the worker's queue count and its NIC counters when it runs GDR.
    pub(crate) fn snapshot(&self, queues: u32, nic: Option<NicStats>) -> EngineStats {
        // Relaxed: statistics only.
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EngineStats {
            iterations: get(&self.iterations),
            idle_iterations: get(&self.idle_iterations),
            descriptors: get(&self.descriptors),
            transport_completions: get(&self.completions),
            queues: queues.into(),
            nic,
        }
    }
}

/// A snapshot of one worker's counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Loop iterations.
    pub iterations: u64,
    /// Loop iterations that found nothing to do (no descriptor taken, none submitted to the
    /// transport, no completion reaped).
    pub idle_iterations: u64,
    /// Descriptors taken from submission rings.
    pub descriptors: u64,
    /// Copies the transport reported finished.
    pub transport_completions: u64,
    /// Queues the worker serves: each counts from [`crate::Engine::open_queue`] until, after
    /// its client closed it, the worker has freed its memory and file descriptor. The engine
    /// gives a new queue to the worker with the fewest.
    pub queues: u64,
    /// The NIC's counters, when the worker runs the GDR transport.
    pub nic: Option<NicStats>,
}

/// Queues handed to a worker by the control plane, and how many it serves.
#[derive(Default)]
pub(crate) struct Mailbox {
    /// Set (Release) after pushing into `posted`; cleared by the worker (Acquire) before taking.
    pending: AtomicBool,
    posted: Mutex<Vec<WorkerEnd>>,
    /// Queues posted and not yet freed: incremented by `post`, decremented by the worker when
    /// it has freed a closed queue.
    queues: AtomicU32,
}

impl Mailbox {
    pub(crate) fn post(&self, end: WorkerEnd) {
        // Relaxed: a count; counted before the worker can see (and free) the queue, so it
        // never goes below zero.
        self.queues.fetch_add(1, Ordering::Relaxed);
        self.posted.lock().unwrap_or_else(|e| e.into_inner()).push(end);
        // M1: Release; pairs with M2 in take. (The mutex orders the Vec itself; the flag only
        // lets the worker skip the lock when nothing is posted.)
        self.pending.store(true, Ordering::Release);
    }

    /// Queues posted to this worker and not yet freed by it.
    pub(crate) fn queues(&self) -> u32 {
        // L2: Acquire; pairs with L1 in queue_freed: a queue no longer counted has its memory
        // and memfd released.
        self.queues.load(Ordering::Acquire)
    }

    /// The worker has freed a queue.
    fn queue_freed(&self) {
        // L1: Release; pairs with L2 in queues: the queue's mapping and memfd are released
        // before the count says so.
        self.queues.fetch_sub(1, Ordering::Release);
    }

    /// Adopts posted queues; each gets a window as deep as its submission ring.
    fn take(&self, into: &mut Loop) {
        // Relaxed: a cheap look on every loop iteration; the swap below synchronises.
        if !self.pending.load(Ordering::Relaxed) {
            return;
        }
        // M2: Acquire; pairs with M1 in post.
        if !self.pending.swap(false, Ordering::Acquire) {
            return;
        }
        let mut posted = self.posted.lock().unwrap_or_else(|e| e.into_inner());
        for end in posted.drain(..) {
            into.adopt(end);
        }
    }
}

/// Status of a window slot whose copy has not finished.
const PENDING: u32 = u32::MAX;
/// Status of a window slot holding a notification not yet written: `len` is its value,
/// `detail` its slot. Ready as far as the copies go; the flush settles it.
const NOTIFY: u32 = u32::MAX - 1;

/// Validated copies waiting for the transport beyond which the worker takes no more
/// descriptors (a strided descriptor adds one per chunk).
const OPS_BACKLOG: usize = 1 << 16;

/// An idle queue's close flag and landed request are looked at every this many visits (a
/// power of two; a busy queue's at every visit).
const IDLE_LOOK: u32 = 64;

/// One descriptor between being taken and having its completion published.
#[derive(Clone, Copy, Default)]
struct InFlight {
    tag: u64,
    /// Bytes of all its chunks.
    len: u64,
    status: u32,
    detail: u32,
    /// Region indices counted in the region table (only for copies given to the transport).
    src: u16,
    dst: u16,
    counted: bool,
    /// The status of its first chunk that failed (0: none failed; then `detail` is that
    /// chunk's detail).
    failure: u8,
    /// Its chunks (operations) not yet over (at most `MAX_CHUNKS`); its status is settled when
    /// the last one is.
    parts: u16,
}

// A window slot stays half a cache line: the worker touches one per descriptor.
const _: () = assert!(std::mem::size_of::<InFlight>() == 32);

/// The descriptors of one queue between being taken and having their completions published,
/// indexed by `seq & mask`.
struct Window {
    slots: Box<[InFlight]>,
    mask: u64,
    /// Next sequence number to take.
    next_seq: u64,
    /// Next sequence number to complete (the watermark).
    head_seq: u64,
}

impl Window {
    fn new(size: usize) -> Window {
        let size = size.next_power_of_two();
        Window {
            slots: vec![InFlight::default(); size].into_boxed_slice(),
            mask: size as u64 - 1,
            next_seq: 0,
            head_seq: 0,
        }
    }

    fn in_flight(&self) -> u64 {
        self.next_seq - self.head_seq
    }

    fn room(&self) -> u64 {
        self.slots.len() as u64 - self.in_flight()
    }

    /// Whether the oldest unpublished completion is finished (so it waits only for ring space).
    fn head_ready(&self) -> bool {
        self.head_seq != self.next_seq && self.slots[(self.head_seq & self.mask) as usize].status != PENDING
    }

    /// Whether the oldest unpublished entry is a notification waiting for its slot.
    fn head_is_notify(&self) -> bool {
        self.head_seq != self.next_seq && self.slots[(self.head_seq & self.mask) as usize].status == NOTIFY
    }

    /// Records a new descriptor at `next_seq`; returns its slot index.
    fn take(&mut self, entry: InFlight) -> usize {
        let index = (self.next_seq & self.mask) as usize;
        self.slots[index] = entry;
        self.next_seq += 1;
        index
    }
}

/// A queue as the worker sees it.
struct QueueSlot {
    end: WorkerEnd,
    window: Window,
    state: QueueState,
    /// The client closed the queue: nothing more is taken or published, and the queue is freed
    /// once `counted` is zero.
    closing: bool,
    /// Window entries counted in the region table: copies in the batch or in the transport.
    counted: u32,
    /// Since when a gate descriptor at the ring's head has held the queue.
    gate_since: Option<Instant>,
    /// Since when a notification at the window's head has waited for its slot to be cleared
    /// (meanwhile the queue's later completions wait; its new work does not).
    notify_since: Option<Instant>,
    /// Bytes completed ok and descriptors failed, published into the header with the watermark.
    bytes: u64,
    failed: u64,
    /// The landed word's last value (see `Signals::landed` in queue.rs), whoever wrote it.
    landed: u64,
    /// Who writes the landed word.
    landing: Landing,
    /// In `Loop::reaped`: copies of it came back in this poll.
    reaped: bool,
    /// The worker's visits so far (see IDLE_LOOK).
    visits: u32,
}

/// Who writes a queue's landed word (`Signals::landed` in queue.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Landing {
    /// The CPU, with the watermark: no stream waits on the queue (yet).
    Cpu,
    /// A stream waits and the transport is asked for marks; the CPU still writes until the
    /// first mark is taken.
    Asked,
    /// The transport's marks alone (the CPU would race them).
    Marks,
    /// The transport refused a mark: the CPU, for good.
    Refused,
}

impl QueueSlot {
    fn new(end: WorkerEnd, window: usize) -> QueueSlot {
        QueueSlot {
            end,
            window: Window::new(window),
            state: QueueState::Open,
            closing: false,
            counted: 0,
            gate_since: None,
            notify_since: None,
            bytes: 0,
            failed: 0,
            landed: 0,
            landing: Landing::Cpu,
            reaped: false,
            visits: 0,
        }
    }

    /// The landed value the copies the transport holds allow: every descriptor taken, but the
    /// first one (of this queue, index `qi`) with an operation the transport has not accepted.
    fn ready(&self, qi: u32, waiting: &[Op]) -> u64 {
        let w = &self.window;
        match waiting.iter().find(|op| op.token.queue == qi) {
            // The window holds seqs [head_seq, next_seq), slot = seq & mask.
            Some(op) => w.head_seq + ((u64::from(op.token.slot).wrapping_sub(w.head_seq)) & w.mask),
            None => w.next_seq,
        }
    }

    /// One chunk (operation) of the descriptor in window slot `index` is over with `status`:
    /// when it was the last, the descriptor's status is settled (its first failure, else ok) and
    /// its regions are released in the table of worker `worker`.
    fn part_over(&mut self, index: usize, status: Status, detail: u32, table: &RegionTable, worker: usize) {
        let Some(slot) = self.window.slots.get_mut(index) else { return };
        if slot.status != PENDING || slot.parts == 0 {
            return; // a transport reported more operations than it was given: ignore the extra.
        }
        if status != Status::Ok && slot.failure == 0 {
            // Status codes are below 256 (desc.rs has 14).
            (slot.failure, slot.detail) = (status.code() as u8, detail);
        }
        slot.parts -= 1;
        if slot.parts > 0 {
            return;
        }
        slot.status = u32::from(slot.failure);
        if slot.counted {
            table.worker_done(worker, slot.src.into(), slot.dst.into());
            slot.counted = false;
            self.counted -= 1;
        }
    }

    fn break_queue(&mut self) {
        self.state = QueueState::Broken;
        self.end.memory.set_state(QueueState::Broken);
    }

    /// Publishes finished completions in order while the completion ring has room.
    fn flush(&mut self) {
        if !self.window.head_ready() || self.state == QueueState::Broken || self.closing {
            return;
        }
        let w = &mut self.window;
        let start = w.head_seq;
        let mut batch = self.end.complete.write();
        let mut corrupted = false;
        while w.head_ready() {
            let index = (w.head_seq & w.mask) as usize;
            if w.slots[index].status == NOTIFY {
                // Its slot is written only once the completions before it are published.
                if w.head_seq != start {
                    break;
                }
                let (slot, value) = (w.slots[index].detail as usize, w.slots[index].len);
                let status = if self.end.memory.slot(slot) == 0 {
                    self.end.memory.set_slot(slot, value);
                    Status::Ok
                } else if self.notify_since.get_or_insert_with(Instant::now).elapsed() < self.end.gate_timeout {
                    break;
                } else {
                    Status::GateTimeout
                };
                self.notify_since = None;
                w.slots[index] = InFlight { tag: w.slots[index].tag, status: status.code(), ..InFlight::default() };
            }
            let slot = w.slots[index];
            let ok = slot.status == Status::Ok.code();
            let completion = Completion {
                tag: slot.tag,
                seq: w.head_seq,
                bytes: if ok { slot.len } else { 0 },
                status: slot.status,
                detail: slot.detail,
            };
            match batch.push(completion) {
                Ok(()) => {
                    w.head_seq += 1;
                    if ok {
                        self.bytes += slot.len;
                    } else {
                        self.failed += 1;
                    }
                }
                // A bare ring never reports NotOpen.
                Err(PushError::Full(_) | PushError::NotOpen(..)) => break,
                Err(PushError::Corrupted(..)) => {
                    corrupted = true;
                    break;
                }
            }
        }
        drop(batch);
        if corrupted {
            self.break_queue();
        } else if self.window.head_seq != start {
            self.end.memory.set_totals(self.bytes, self.failed);
            self.end.memory.set_watermark(self.window.head_seq);
            // The CPU path of the landed word: published copies have landed.
            if self.landing != Landing::Marks && self.window.head_seq > self.landed {
                self.landed = self.window.head_seq;
                self.end.memory.set_landed(self.landed);
            }
        }
    }
}

/// Everything a worker owns.
pub(crate) struct Worker {
    pub(crate) index: usize,
    pub(crate) table: Arc<RegionTable>,
    pub(crate) transport: Box<dyn Transport>,
    pub(crate) mailbox: Arc<Mailbox>,
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) counters: Arc<WorkerCounters>,
    pub(crate) burst: usize,
    pub(crate) max_len: u64,
    pub(crate) idle: IdlePolicy,
    pub(crate) shutdown_timeout: Duration,
}

/// The worker's loop state, kept apart from its configuration for the borrow checker.
struct Loop {
    /// Queues by slot index, the `queue` of every [`Token`]; `None` where a queue was freed.
    queues: Vec<Option<QueueSlot>>,
    /// Slot indices of the queues served, visited round-robin.
    live: Vec<u32>,
    /// Freed slot indices, for reuse (a queue is freed only when none of its copies is left).
    free: Vec<u32>,
    /// Closed queues with no copy left, found by this iteration's visits; freed after them.
    retired: Vec<u32>,
    /// Validated copies not yet accepted by the transport.
    ops: Vec<Op>,
    done: Vec<Done>,
    /// Slot indices of the queues whose copies the last poll returned, each once.
    reaped: Vec<u32>,
    next_queue: usize,
    /// When `check_clients` looks next.
    next_client_check: Instant,
}

impl Loop {
    /// Closes, on their client's behalf, the `close_if_client_dies` queues whose client end's
    /// holder died: the next visit sees the close flag as after a client's close (and a later
    /// attach is refused).
    fn check_clients(&mut self) {
        for &qi in &self.live {
            if let Some(q) = self.queues[qi as usize].as_ref() {
                if q.end.close_if_client_dies && !q.closing && q.end.memory.client_died() {
                    q.end.memory.close();
                }
            }
        }
        self.next_client_check = Instant::now() + CLIENT_CHECK_INTERVAL;
    }

    /// Starts serving a queue, in a freed slot index if there is one.
    fn adopt(&mut self, end: WorkerEnd) {
        let window = end.submit.capacity() as usize;
        let slot = Some(QueueSlot::new(end, window));
        let index = match self.free.pop() {
            Some(index) => {
                self.queues[index as usize] = slot;
                index
            }
            None => {
                self.queues.push(slot);
                (self.queues.len() - 1) as u32
            }
        };
        self.live.push(index);
    }

    /// The queue at a live slot index.
    fn queue(&mut self, index: u32) -> &mut QueueSlot {
        self.queues[index as usize].as_mut().expect("a live slot index holds a queue")
    }
}

impl Worker {
    /// Runs until the engine's stop flag is set, then shuts down its queues.
    pub(crate) fn run(mut self) {
        self.table.worker_online(self.index, true);
        let mut state = Loop {
            queues: Vec::new(),
            live: Vec::new(),
            free: Vec::new(),
            retired: Vec::new(),
            ops: Vec::with_capacity(self.burst * 8),
            done: vec![Done::ok(Token { queue: 0, slot: 0 }); 256],
            reaped: Vec::with_capacity(256),
            next_queue: 0,
            next_client_check: Instant::now(),
        };
        let mut epoch = 0u64;
        let mut idle_iterations = 0u32;
        loop {
            epoch += 1;
            self.table.worker_epoch(self.index, epoch);
            self.mailbox.take(&mut state);
            // S1: Acquire; pairs with R6 in Engine::stop.
            if self.stop.load(Ordering::Acquire) {
                break;
            }
            // A look at the clock every 1024 iterations, at the holders every CLIENT_CHECK_INTERVAL.
            if epoch % 1024 == 0 && Instant::now() >= state.next_client_check {
                state.check_clients();
            }
            let took = self.take_all(&mut state);
            let submitted = self.submit(&mut state);
            self.mark_landed(&mut state);
            let reaped = self.reap(&mut state);
            let idle = took + submitted + reaped == 0;
            self.counters.add_iteration(took, reaped, idle);
            if idle {
                idle_iterations = idle_iterations.saturating_add(1);
                match self.idle {
                    IdlePolicy::Spin => std::hint::spin_loop(),
                    IdlePolicy::Yield { after } if idle_iterations >= after => std::thread::yield_now(),
                    IdlePolicy::Yield { .. } => std::hint::spin_loop(),
                }
            } else {
                idle_iterations = 0;
            }
        }
        self.shutdown(&mut state);
        self.table.worker_online(self.index, false);
    }

    fn take_all(&mut self, state: &mut Loop) -> usize {
        let n = state.live.len();
        let mut took = 0;
        // From `next_queue` round the live list (an index that wraps, not a division per visit).
        let mut at = if n == 0 { 0 } else { state.next_queue % n };
        for _ in 0..n {
            took += self.take(state, state.live[at]);
            at = if at + 1 == n { 0 } else { at + 1 };
        }
        state.next_queue = state.next_queue.wrapping_add(1);
        while let Some(qi) = state.retired.pop() {
            self.retire(state, qi);
        }
        took
    }

    /// Takes up to `burst` descriptors from queue `qi`; notices that its client closed it.
    fn take(&mut self, state: &mut Loop, qi: u32) -> usize {
        let q = state.queues[qi as usize].as_mut().expect("a live slot index holds a queue");
        // An idle queue (nothing in its ring, where a held gate stays, and nothing in flight) has
        // its header's close flag and landed request looked at only every IDLE_LOOK visits: each
        // lies on a line of its own, a cache miss per queue and visit, which a worker serving
        // many idle queues paid on every pass (bench/results/dev-2cpu-epyc.md). A ring index
        // found corrupt counts as work: the read below reports it.
        q.visits = q.visits.wrapping_add(1);
        let idle = !q.closing && q.window.in_flight() == 0 && matches!(q.end.submit.available(1), Ok(0));
        if idle && q.visits % IDLE_LOOK != 0 {
            return 0;
        }
        if !q.closing && q.end.memory.close_requested() {
            q.closing = true;
            // The copies of the batch that the transport has not accepted never started: drop
            // them. Those it accepted are released as the transport reports them (reap).
            let (table, worker) = (&*self.table, self.index);
            state.ops.retain(|op| {
                if op.token.queue != qi {
                    return true;
                }
                q.part_over(op.token.slot as usize, Status::Cancelled, 0, table, worker);
                false
            });
        }
        if q.closing {
            if q.counted == 0 {
                state.retired.push(qi);
            }
            return 0;
        }
        if q.state != QueueState::Open {
            return 0;
        }
        if q.landing == Landing::Cpu && q.end.landed_word.is_some() && q.end.memory.wants_landed() {
            q.landing = Landing::Asked;
        }
        if idle {
            return 0;
        }
        q.flush();
        if q.window.head_ready() && !q.window.head_is_notify() {
            // The completion ring is full: hold this queue's new work until the client polls.
            return 0;
        }
        let want = q.window.room().min(self.burst as u64);
        if want == 0 || state.ops.len() >= OPS_BACKLOG {
            return 0;
        }
        let Ok(mut batch) = q.end.submit.read(want) else {
            q.break_queue();
            return 0;
        };
        batch.prefetch();
        let w = &mut q.window;
        let table = &*self.table;
        let mut took = 0;
        while let Some(d) = batch.peek() {
            if (d.is_fence() && w.head_seq != w.next_seq) || state.ops.len() >= OPS_BACKLOG {
                break;
            }
            if d.is_gate() {
                // A gate: closed, it holds the queue (its later descriptors stay in the ring;
                // other queues go on) until its timeout; open or timed out, it completes here.
                let status = match validate_gate(&d) {
                    Ok(value) if q.end.memory.gate() < value => {
                        let since = *q.gate_since.get_or_insert_with(Instant::now);
                        if since.elapsed() < q.end.gate_timeout {
                            break;
                        }
                        Status::GateTimeout
                    }
                    Ok(_) => Status::Ok,
                    Err(status) => status,
                };
                q.gate_since = None;
                batch.advance();
                took += 1;
                w.take(InFlight { tag: d.tag, status: status.code(), ..InFlight::default() });
                continue;
            }
            if d.is_notify() {
                // A notification rides in the window: the flush writes its slot once every
                // earlier completion is published (later copies go on meanwhile).
                batch.advance();
                took += 1;
                let entry = match validate_notify(&d) {
                    // At most NOTIFY_SLOTS (64): validated.
                    Ok((slot, value)) => {
                        InFlight { tag: d.tag, len: value, status: NOTIFY, detail: slot as u32, ..InFlight::default() }
                    }
                    Err(status) => InFlight { tag: d.tag, status: status.code(), ..InFlight::default() },
                };
                w.take(entry);
                continue;
            }
            batch.advance();
            took += 1;
            let mut entry = InFlight { tag: d.tag, len: d.len, status: PENDING, parts: 1, ..InFlight::default() };
            let token = Token { queue: qi, slot: (w.next_seq & w.mask) as u32 };
            if d.flags & FLAG_STRIDED == 0 {
                // The hot path: one chunk, without the strided bookkeeping below (its arms alike
                // on purpose: merged, the null transport lost a few percent more; see
                // bench/results/dev-2cpu-epyc.md).
                match validate_plain(&d, q.end.client, self.max_len, |id| table.lookup(id)) {
                    Ok(copy) if self.transport.supports(copy.src.kind, copy.dst.kind) => {
                        // The region index is the id's low 16 bits.
                        (entry.src, entry.dst) = (copy.src.region as u16, copy.dst.region as u16);
                        entry.counted = true;
                        table.worker_took(self.index, entry.src.into(), entry.dst.into());
                        q.counted += 1;
                        w.take(entry);
                        state.ops.push(Op { token, copy });
                    }
                    Ok(_) => {
                        entry.status = Status::Unsupported.code();
                        w.take(entry);
                    }
                    Err(status) => {
                        entry.status = status.code();
                        w.take(entry);
                    }
                }
                continue;
            }
            match validate(&d, q.end.client, self.max_len, |id| table.lookup(id)) {
                Ok(valid) if self.transport.supports(valid.first().src.kind, valid.first().dst.kind) => {
                    let first = valid.first();
                    // The region index is the id's low 16 bits.
                    (entry.src, entry.dst) = (first.src.region as u16, first.dst.region as u16);
                    entry.counted = true;
                    // At most MAX_CHUNKS (4096) chunks: validated.
                    (entry.len, entry.parts) = (valid.bytes(), valid.chunks() as u16);
                    table.worker_took(self.index, entry.src.into(), entry.dst.into());
                    q.counted += 1;
                    w.take(entry);
                    state.ops.extend((0..valid.chunks()).map(|i| Op { token, copy: valid.chunk(i) }));
                }
                Ok(_) => {
                    entry.status = Status::Unsupported.code();
                    w.take(entry);
                }
                Err(status) => {
                    entry.status = status.code();
                    w.take(entry);
                }
            }
        }
        drop(batch);
        // Publish descriptors that failed validation without waiting for the transport.
        q.flush();
        took
    }

    fn submit(&mut self, state: &mut Loop) -> usize {
        if state.ops.is_empty() {
            return 0;
        }
        let n = self.transport.submit(&state.ops);
        state.ops.drain(..n);
        n
    }

    /// Marks the landed word of every queue a stream waits on behind the copies the transport
    /// holds (see `Signals::landed`); a transport that cannot gives the word back to the CPU.
    fn mark_landed(&mut self, state: &mut Loop) {
        for &qi in &state.live {
            let Some(q) = state.queues[qi as usize].as_mut() else { continue };
            if !matches!(q.landing, Landing::Asked | Landing::Marks) || q.closing {
                continue;
            }
            let ready = q.ready(qi, &state.ops);
            if ready <= q.landed {
                continue;
            }
            let word = q.end.landed_word.as_ref().expect("marking needs the registered word").1;
            if self.transport.mark(word, ready) {
                (q.landed, q.landing) = (ready, Landing::Marks);
            } else {
                // The transport waited for its earlier marks: the CPU path goes on from them.
                q.landing = Landing::Refused;
            }
        }
    }

    /// Polls the transport and publishes what that unblocked, visiting only the queues whose
    /// copies came back (with many idle queues, a flush of every queue per poll cost the busy
    /// ones most of their rate).
    fn reap(&mut self, state: &mut Loop) -> usize {
        let n = self.transport.poll(&mut state.done);
        for done in &state.done[..n] {
            let Some(q) = state.queues.get_mut(done.token.queue as usize).and_then(Option::as_mut) else { continue };
            q.part_over(done.token.slot as usize, done.status, done.detail, &self.table, self.index);
            if !q.reaped {
                q.reaped = true;
                state.reaped.push(done.token.queue);
            }
        }
        for qi in state.reaped.drain(..) {
            if let Some(q) = state.queues[qi as usize].as_mut() {
                q.reaped = false;
                q.flush();
            }
        }
        n
    }

    /// Frees closed queue `qi`, none of whose copies is left: its mapping, memfd, window and
    /// worker-end claim go, and its slot index is free for reuse.
    fn retire(&mut self, state: &mut Loop, qi: u32) {
        let Some(q) = state.queues[qi as usize].take() else { return };
        if q.landing == Landing::Marks {
            // Its header's registration goes with it: no mark may still be on its way.
            self.transport.settle_marks(q.end.landed_word.as_ref().map(|w| w.1));
        }
        debug_assert_eq!(q.counted, 0, "a queue is freed with copies in flight");
        q.end.memory.set_state(QueueState::ClosedByClient);
        drop(q);
        state.live.retain(|&i| i != qi);
        state.free.push(qi);
        self.mailbox.queue_freed();
    }

    /// Finishes in-flight copies, cancels the rest, closes every queue.
    fn shutdown(&mut self, state: &mut Loop) {
        // Queues posted after this worker's last look at its mailbox are served (and closed)
        // like the others.
        self.mailbox.take(state);
        // Copies validated but never given to the transport: cancelled.
        for op in std::mem::take(&mut state.ops) {
            let q = state.queue(op.token.queue);
            q.part_over(op.token.slot as usize, Status::Cancelled, 0, &self.table, self.index);
        }
        // Copies the transport started: let them finish.
        let start = Instant::now();
        while self.transport.in_flight() > 0 && start.elapsed() < self.shutdown_timeout {
            self.reap(state);
            std::hint::spin_loop();
        }
        let stuck = self.transport.in_flight();
        if stuck > 0 {
            eprintln!(
                "ferry: worker {}: the {} transport still has {stuck} copies in flight after {:?}; their completions will not be published",
                self.index,
                self.transport.name(),
                self.shutdown_timeout
            );
        }
        // Descriptors still in the submission rings: cancelled, in order, as far as there is room
        // (not for a queue its client closed: nobody reads those).
        for &qi in &state.live {
            let q = state.queues[qi as usize].as_mut().expect("a live slot index holds a queue");
            if q.closing || q.end.memory.close_requested() {
                q.end.memory.set_state(QueueState::ClosedByClient);
                continue;
            }
            q.flush();
            while q.state == QueueState::Open && !q.window.head_ready() {
                let Ok(mut batch) = q.end.submit.read(q.window.room()) else { break };
                if batch.is_empty() {
                    break;
                }
                for d in batch.by_ref() {
                    q.window.take(InFlight {
                        tag: d.tag,
                        len: d.len,
                        status: Status::Cancelled.code(),
                        ..InFlight::default()
                    });
                }
                drop(batch);
                q.flush();
            }
            if q.state == QueueState::Open {
                q.state = QueueState::Closed;
                q.end.memory.set_state(QueueState::Closed);
            }
        }
        // The queues' headers are unregistered when `state` drops: every mark lands first.
        self.transport.settle_marks(None);
    }
}
