//! The CUDA transport: copies between host and GPU memory with the CUDA driver, by one of four
//! strategies, completed by polling a word each stream writes behind a batch (events where the
//! device has no 64-bit stream memory operations) or, for the resident kernel, its watermark
//! (the worker never blocks on the GPU).
//!
//! - `memcpy`: one `cuMemcpyAsync` per descriptor (the plain fallback).
//! - `batch`: one `cuMemcpyBatchAsync` per batch and direction (driver 12.8+, on non-blocking
//!   streams: a batch moving both ways puts its GPU-to-host half on a second stream, so both copy
//!   engines run at once; the batch is done once each stream has marked its end).
//! - Both copy-engine strategies take a strided descriptor's chunks (consecutive operations of
//!   one descriptor at fixed pitches) as one `cuMemcpy2DAsync` (`run_at`): a paged KV block of
//!   64 chunks of 32 KiB goes at 0.92 of the ceiling that way, one copy per chunk at 0.19
//!   (`gpu/probe_2d.cu`, bench/results/h200.md).
//! - `kernel`: ferry's SM copy kernel (`gpu/copy_kernel.cu`, loaded from its committed PTX) over
//!   a task list written into pinned host memory and copied to device memory on a second stream
//!   (the launch waits for that copy by an event, so no copy sits between two kernels), on a
//!   bounded grid: at most the worker's share of the SM budget, read live before each launch.
//! - `resident`: ferry's resident copy kernel (`engine/transport/resident.rs`: launched when
//!   blocks wait for it, it copies what comes through its ring until it is idle) for blocks below
//!   the route table's crossover, `batch` for larger ones.
//!
//! `auto` sends each block its way as it comes (`CudaTransport::split`): below its direction's
//! crossover ([`crate::RouteTable::copy_engine_from`]) and narrower than 32 KiB, to the resident
//! kernel where it loaded and the live SM budget allows any SM (a lone one only while that kernel
//! is active, which costs it no launch; else it takes the latency path), without the queue's
//! per-batch work (what one worker's rate at 4 KiB rests on); every other block joins the
//! transport's queue. So a batch moving small blocks one way and large ones the other feeds the
//! SMs and the copy engine at once. The queue's batches are routed as a whole
//! (`engine/router.rs`), a strided descriptor's chunks of 32 KiB or more counting as one block
//! of all their bytes: a lone descriptor goes to `memcpy`; a batch whose mean block reaches the
//! crossover to `batch`, a smaller one to the SMs while the budget allows any SM (the resident
//! kernel's leading blocks below the crossover, else `kernel`), else to `batch`. See
//! `engine/router.rs` and `bench/results/h200.md` for the measurements.
//!
//! Batching: an idle stream gets new operations at once (the latency path). While a batch runs,
//! new operations wait in the transport until they add up to 4 MiB (8 MiB behind a copy-engine
//! batch; or `max_batch` operations), then go out behind it (at most 2 batches on the stream, 4
//! copy-engine batches: `KERNEL_LIMITS`, `COPY_ENGINE_LIMITS`); when the
//! stream drains they go out whatever their size. So a launch's fixed cost (about 10 us) is
//! spread over megabytes under load
//! (first H100 run: batches capped at the worker's burst of 256 x 4 KiB reached 0.56 of the
//! ceiling; see bench/results/h100.md).

use super::{Done, Op, Token, Transport, TASK_CHUNK};
use crate::config::{CudaConfig, RouteTable, Strategy};
use crate::cuda_driver::{
    stream_write_value, Context, CudaError, DeviceBuffer, Event, Kernel, PinnedBuffer, Stream, BATCH_COPY_VERSION,
};
use crate::desc::Status;
use crate::error::{Error, TransportError};
use crate::router::{route, Available};
use crate::transport::resident::Resident;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// The kernel's PTX, generated on the H100 machine; see `gpu/copy_kernel.cu` for the command.
pub const COPY_KERNEL_PTX: &str = include_str!("../../gpu/copy_kernel.ptx");

/// One kernel task: the layout of `FerryCopy` in `gpu/copy_kernel.cu`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct Task {
    src: u64,
    dst: u64,
    len: u64,
}

/// Task slots in the staging ring.
const STAGING_TASKS: usize = 1 << 17;
/// Threads per block of the copy kernel.
const BLOCK_THREADS: u32 = 256;
/// Batches allowed on the stream at once, and the bytes the next one waits for while one runs:
/// for the copy kernel's batches, and (deeper) for the copy engine's. The copy engine needs more
/// queued ahead: `cuMemcpyBatchAsync` costs the worker about 1 us of CPU per 64 KiB copy, close
/// to the copy's own 1.2 us on the wire (`gpu/probe_ce_load.cu`), so two batches of 4 MiB left
/// it idle whenever the worker was late. On the H200 (bench/results/h200.md, one `ferry bench
/// --load compute` call, two rounds), 4 x 8 MiB took 64 KiB copy-engine batches from 0.59-0.73
/// to 0.86-0.94 of the ceiling under the load; the kernel's 4 KiB figures fell with deeper
/// batches (0.61-0.66 at 8 x 16 MiB against 0.72-0.89 in the same call), so its limits stay.
const KERNEL_LIMITS: (usize, u64) = (2, 4 << 20);
const COPY_ENGINE_LIMITS: (usize, u64) = (4, 8 << 20);
/// `auto` routes a strided descriptor as one block of all its chunks (to the copy engine's 2D
/// copy from the crossover up) when its chunks are at least this wide. Measured on the H200
/// (bench/results/h200.md, paged KV blocks of 64 chunks): 32 KiB rows by 2D copy at 0.91 of the
/// ceiling, as the copy kernel; 4 KiB rows at 0.53-0.55, where the kernel reached 0.57-0.71.
const TWO_D_WIDTH: u64 = 32 << 10;
/// With `batch`, a strided descriptor's chunks go as one 2D copy only from this many bytes up;
/// smaller ones join the batch chunk by chunk. Each `cuMemcpy2DAsync` costs the worker 3.5-4.5
/// us, so small rectangles capped the copy engine's rate: on the H200 (examples/layer_pipeline.py,
/// blocks of 2 chunks) 9.2 GB/s with 2 x 16 KiB rectangles and 14.8 with 2 x 32 KiB.
const TWO_D_MIN_BYTES: u64 = 256 << 10;

/// How a batch's end is seen, on `stream` and, where the batch put copies there (a batch moving
/// both ways), on `side`.
enum End {
    /// The values the streams write into their done words behind the batch ([`DoneWords`]).
    Words { main: u64, side: Option<u64> },
    /// An event recorded on each stream behind the batch.
    Events { main: Event, side: Option<Event> },
}

impl End {
    fn on_side(&self) -> bool {
        matches!(self, End::Words { side: Some(_), .. } | End::Events { side: Some(_), .. })
    }
}

/// A word per stream (`stream`, `side`) in pinned, device-mapped host memory, each on its own
/// cache-line pair, that the stream sets behind each batch (`cuStreamWriteValue64`, whose memory
/// barrier makes the batch's copies visible first): the worker sees a batch's end with a plain
/// load instead of a `cuEventQuery` call. On the H200 VM (bench/results/h200.md, ninth session)
/// one such call cost the worker 0.25-0.32 us, and a 4 KiB D2H copy was seen done 0.42-0.44 us
/// sooner through the word than by `cuStreamSynchronize` or events.
struct DoneWords {
    buffer: PinnedBuffer,
    /// The last value written (enqueued) on each stream; the words only grow.
    written: [u64; 2],
    /// Cleared when a write could not be enqueued: batches end by events from then on.
    usable: bool,
}

/// Bytes between the two done words.
const DONE_WORD_STRIDE: usize = 128;
/// A batch whose words have not come after this many polls has its streams queried: a failed
/// copy stops its stream, and the word behind it never comes.
const POLLS_PER_QUERY: u32 = 256;

impl DoneWords {
    fn new() -> Result<DoneWords, CudaError> {
        // Zeroed (PinnedBuffer::new): a word left by an earlier engine of the process would make
        // this one's first batches look done.
        Ok(DoneWords { buffer: PinnedBuffer::new(2 * DONE_WORD_STRIDE)?, written: [0; 2], usable: true })
    }

    /// Stream `i`'s word.
    fn word(&self, i: usize) -> &AtomicU64 {
        // SAFETY: an aligned word inside the live buffer (which `self` borrows); the device
        // writes it and the host reads it, only as atomics.
        unsafe { AtomicU64::from_ptr(self.buffer.as_ptr().add(i * DONE_WORD_STRIDE).cast()) }
    }

    /// Enqueues on `stream` (number `i`) the next value of its word and returns it.
    fn write(&mut self, stream: &Stream, i: usize) -> Result<u64, CudaError> {
        let value = self.written[i] + 1;
        let addr = self.word(i).as_ptr() as u64;
        // SAFETY: a live stream of the current context; the word lies in this pinned, mapped
        // buffer, which outlives the stream's work (the transport's drop synchronizes the
        // streams before `Live`, and with it the buffer, goes).
        unsafe { stream_write_value(stream.handle(), addr, value)? };
        self.written[i] = value;
        Ok(value)
    }

    /// Whether stream `i`'s word reached `value`.
    fn reached(&self, i: usize, value: u64) -> bool {
        // Acquire; pairs with the memory barrier of the stream's write (DoneWords::write): the
        // copies enqueued before it are visible once the word is.
        self.word(i).load(Ordering::Acquire) >= value
    }
}

struct Batch {
    end: End,
    ops: usize,
    emitted: usize,
    /// Polls that found its words short of their values (see POLLS_PER_QUERY).
    polls: u32,
    /// Task slots (start, count) this batch holds in the staging ring.
    staging: Option<(usize, usize)>,
}

/// What exists only once the transport runs on its worker's thread.
struct Live {
    stream: Stream,
    /// Copies each batch's task list to the device while the batch before it still runs on
    /// `stream`, which then waits for `staged` before the launch: no copy sits between kernels.
    stage_stream: Stream,
    staged: Event,
    kernel: Option<Kernel>,
    /// Task slots the CPU writes, and their device twin the kernel reads (same indices).
    staging: Option<(PinnedBuffer, DeviceBuffer)>,
    staging_head: usize,
    spare_events: Vec<Event>,
    /// Where 64-bit stream memory operations work: the streams' done words (the transport's
    /// drop synchronizes the streams before they go).
    words: Option<DoneWords>,
    /// The copy engine's second stream: a batch moving both ways copies GPU to host here, not
    /// ordered with `stream`, so that each direction's batches follow each other without waiting
    /// for the other direction's (descriptors in flight are not ordered; a landed mark joins the
    /// two). On the H200 (eighth session, one noisy call, three turns each) 64 KiB blocks both
    /// ways with one worker moved 68 GB/s in the mean where forking and joining the two streams
    /// around every such batch moved 62: within the cell's spread from call to call (59-93).
    side: Stream,
    /// Recorded on `side` before a landed mark while a running batch has copies there; `stream`
    /// waits for it.
    join: Event,
    /// A copy-engine batch's copies by direction: [to the GPU, to the host].
    lanes: [Lane; 2],
    /// The resident copy kernel, with the `resident` strategy. Declared last: it drops (and
    /// waits for its kernel to end) after the streams above were synchronized.
    resident: Option<Resident>,
}

/// One direction's copies of a copy-engine batch, as the driver takes them: single copies, and
/// the strided descriptors' chunks as 2D copies (one `cuMemcpy2DAsync` each).
struct Lane {
    dsts: Vec<u64>,
    srcs: Vec<u64>,
    sizes: Vec<usize>,
    rects: Vec<Rect>,
}

/// `rows` chunks of `width` bytes at fixed pitches: one strided descriptor's run of operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rect {
    dst: u64,
    src: u64,
    dst_pitch: u64,
    src_pitch: u64,
    width: u64,
    rows: usize,
}

impl Lane {
    fn with_capacity(n: usize) -> Lane {
        Lane {
            dsts: Vec::with_capacity(n),
            srcs: Vec::with_capacity(n),
            sizes: Vec::with_capacity(n),
            rects: Vec::with_capacity(n),
        }
    }

    fn clear(&mut self) {
        self.dsts.clear();
        self.srcs.clear();
        self.sizes.clear();
        self.rects.clear();
    }

    fn push(&mut self, dst: u64, src: u64, len: usize) {
        self.dsts.push(dst);
        self.srcs.push(src);
        self.sizes.push(len);
    }

    fn is_empty(&self) -> bool {
        self.sizes.is_empty() && self.rects.is_empty()
    }

    /// Queues the lane's copies on `stream`: the single ones in one `cuMemcpyBatchAsync`
    /// (`batch`), else one `cuMemcpyAsync` each; each rectangle by one `cuMemcpy2DAsync`.
    ///
    /// # Safety
    /// As [`Stream::copy`], for every copy of the lane (every row of a rectangle).
    unsafe fn issue(&mut self, stream: &Stream, batch: bool) -> Result<(), CudaError> {
        if batch && !self.sizes.is_empty() {
            // SAFETY: forwarded from the caller.
            unsafe { stream.copy_batch(&mut self.dsts, &mut self.srcs, &mut self.sizes)? };
        } else {
            for i in 0..self.sizes.len() {
                // SAFETY: forwarded from the caller.
                unsafe { stream.copy(self.dsts[i], self.srcs[i], self.sizes[i])? };
            }
        }
        for r in &self.rects {
            // SAFETY: forwarded from the caller; pitches within [width, max_pitch] (see `run_at`).
            unsafe {
                stream.copy_2d(r.dst, r.dst_pitch as usize, r.src, r.src_pitch as usize, r.width as usize, r.rows)?
            };
        }
        Ok(())
    }
}

/// The run of operations starting at `ops[i]` (before `end`) that one 2D copy can take: the
/// chunks of one strided descriptor (the worker queues them in order), equal lengths at fixed
/// pitches between `len` and `max_pitch`. A lone operation is a run of one.
fn run_at(ops: &VecDeque<Op>, i: usize, end: usize, max_pitch: u64) -> Rect {
    let (first, token) = (&ops[i].copy, ops[i].token);
    let mut rect =
        Rect { dst: first.dst.addr, src: first.src.addr, dst_pitch: 0, src_pitch: 0, width: first.len, rows: 1 };
    // Plain descriptors (the hot path) end here: the next operation is another descriptor's.
    if i + 1 >= end || ops[i + 1].token != token {
        return rect;
    }
    let next = &ops[i + 1];
    let pitch = |a: u64, b: u64| b.checked_sub(a).filter(|p| (first.len..=max_pitch).contains(p));
    let (Some(dst_pitch), Some(src_pitch)) =
        (pitch(first.dst.addr, next.copy.dst.addr), pitch(first.src.addr, next.copy.src.addr))
    else {
        return rect;
    };
    (rect.dst_pitch, rect.src_pitch) = (dst_pitch, src_pitch);
    let mut j = i + 1;
    while j < end {
        let (op, rows) = (&ops[j], (j - i) as u64);
        let c = &op.copy;
        if op.token != token
            || c.len != first.len
            || c.dst.addr != first.dst.addr + rows * dst_pitch
            || c.src.addr != first.src.addr + rows * src_pitch
        {
            break;
        }
        j += 1;
    }
    rect.rows = j - i;
    rect
}

fn context_sms(context: &Context) -> u32 {
    u32::try_from(context.info.sm_count).unwrap_or(u32::MAX).max(1)
}

/// A landed mark ([`Transport::mark`]) not yet enqueued: enqueued on the stream once the
/// operations taken into `queued` before it have left it, and the resident kernel has copied
/// every task published by then (those sent to it before the mark among them).
struct Mark {
    /// Operations taken into `queued` before it (`CudaTransport::entered`).
    before: u64,
    word: u64,
    value: u64,
    /// The resident kernel's task count once `before` operations had left `queued`: the
    /// watermark it must reach first (taken then, so it may also cover later operations).
    resident: Option<u64>,
}

/// The CUDA transport of one worker.
pub struct CudaTransport {
    context: Arc<Context>,
    config: CudaConfig,
    /// SMs this worker's copy kernel may occupy right now: its share of the engine's live SM
    /// budget, written by [`crate::Engine::set_sm_budget`] (0: the kernel does not run).
    sms: Arc<AtomicU32>,
    live: Option<Live>,
    /// Accepted, not yet issued.
    queued: VecDeque<Op>,
    /// Bytes of `queued`.
    queued_bytes: u64,
    /// Issued, oldest first.
    running: VecDeque<Batch>,
    /// Tokens of the issued operations, in issue order.
    tokens: VecDeque<Token>,
    /// Operations whose issue failed at once.
    failed: VecDeque<Done>,
    /// The device's largest 2D copy pitch (CU_DEVICE_ATTRIBUTE_MAX_PITCH).
    max_pitch: u64,
    /// The runs (`run_at`) of the first `runs_cover` queued operations, with their direction:
    /// found once per batch, for `auto`'s choice and the copy engine's lanes.
    runs: Vec<(usize, Rect)>,
    runs_cover: usize,
    /// Operations ever taken into `queued` (those that left it, issued or failed, are this less
    /// `queued.len()`); those sent straight to the resident kernel are not counted.
    entered: u64,
    /// Marks ([`Transport::mark`]) not yet enqueued.
    marks: VecDeque<Mark>,
    /// Cleared when a mark could not be enqueued: the worker writes the words from then on.
    marks_ok: bool,
}

impl CudaTransport {
    /// A transport for `context`'s device whose copy kernel occupies at most `sms` SMs (one
    /// worker's share of the budget, read before every launch); nothing is created before
    /// [`Transport::start`].
    pub(crate) fn new(context: Arc<Context>, config: CudaConfig, sms: Arc<AtomicU32>) -> CudaTransport {
        CudaTransport {
            max_pitch: u64::try_from(context.info.max_pitch).unwrap_or(0),
            runs: Vec::with_capacity(config.max_batch),
            runs_cover: 0,
            context,
            config,
            sms,
            live: None,
            queued: VecDeque::with_capacity(config.max_batch),
            queued_bytes: 0,
            running: VecDeque::new(),
            tokens: VecDeque::new(),
            failed: VecDeque::new(),
            entered: 0,
            marks: VecDeque::new(),
            marks_ok: true,
        }
    }

    /// Enqueues on the stream the marks whose operations have all been issued: behind the
    /// batches that hold them (the kernel is launched on `stream`; the copy engine's side stream
    /// is joined to it first where it holds copies). A failure stops marking: the streams are
    /// waited for (the marks enqueued before have landed) and the worker takes over.
    fn emit_marks(&mut self) {
        let Some(live) = self.live.as_ref() else { return };
        let left = self.entered - self.queued.len() as u64;
        // Copies on the side stream that a mark must wait for: those of the running batches.
        let mut unjoined = self.running.iter().any(|b| b.end.on_side());
        while let Some(mark) = self.marks.front_mut() {
            if mark.before > left {
                break;
            }
            if let Some(resident) = &live.resident {
                let after = *mark.resident.get_or_insert(resident.pushed());
                if resident.done() < after {
                    break;
                }
            }
            let (word, value) = (mark.word, mark.value);
            let joined = if unjoined {
                live.join.record(&live.side).and_then(|()| live.stream.wait(&live.join))
            } else {
                Ok(())
            };
            unjoined &= joined.is_err();
            // SAFETY: `word` lies in a queue header the worker keeps registered until
            // `settle_marks` returned (it settles before a queue's memory goes).
            let written = joined.and_then(|()| unsafe { stream_write_value(live.stream.handle(), word, value) });
            if let Err(e) = written {
                eprintln!("ferry: cuda transport: a landed mark failed ({e}); the worker writes it from now on");
                let _ = live.stream.synchronize();
                let _ = live.side.synchronize();
                self.marks.clear();
                self.marks_ok = false;
                return;
            }
            self.marks.pop_front();
        }
    }

    /// SMs the kernel may use now (0: none).
    fn live_sms(&self) -> u32 {
        // Relaxed: a setting, read once per batch; it orders nothing.
        self.sms.load(Ordering::Relaxed).min(context_sms(&self.context))
    }

    /// The strategy for a batch of the first `n` queued operations.
    fn pick(&mut self, n: usize) -> Strategy {
        let has = Available {
            kernel: self.live.as_ref().expect("started").kernel.is_some(),
            batch: self.context.driver_version >= BATCH_COPY_VERSION,
        };
        let sms = self.live_sms();
        match self.config.strategy {
            Strategy::Auto => {
                // Bytes per direction; the batch goes by the larger share's crossover. A run of a
                // strided descriptor's chunks of at least TWO_D_WIDTH counts as one block (the
                // copy engine takes it as one 2D copy); narrower chunks count one by one.
                self.find_runs(n);
                let mut bytes = [0u64; 2];
                let mut blocks = 0;
                for &(dir, rect) in &self.runs {
                    bytes[dir] += rect.width * rect.rows as u64;
                    blocks += if rect.width >= TWO_D_WIDTH { 1 } else { rect.rows };
                }
                let dir = usize::from(bytes[0] < bytes[1]);
                route(&self.config.route, blocks, bytes[0] + bytes[1], dir, sms, has)
            }
            // The large blocks of the resident strategy: the copy engine.
            Strategy::Resident if n > 1 && has.batch => Strategy::Batch,
            Strategy::Resident => Strategy::Memcpy,
            // The live budget took every SM away: the copy engine, else memcpy.
            Strategy::Kernel if sms == 0 => {
                if has.batch {
                    Strategy::Batch
                } else {
                    Strategy::Memcpy
                }
            }
            s => s,
        }
    }

    /// Finds the runs of the first `n` queued operations into `runs`, unless they are there.
    fn find_runs(&mut self, n: usize) {
        if self.runs_cover == n {
            return;
        }
        self.runs.clear();
        let mut i = 0;
        while i < n {
            let rect = run_at(&self.queued, i, n, self.max_pitch);
            self.runs.push((direction(&self.queued[i]), rect));
            i += rect.rows;
        }
        self.runs_cover = n;
    }

    /// Issues queued operations: at once on an idle stream, else as a second batch once enough
    /// has queued (see the module documentation).
    fn flush(&mut self) {
        loop {
            // The limits of the kind of batch last issued (the next one is most likely the same).
            let (max_running, min_bytes) = match self.running.back() {
                Some(b) if b.staging.is_none() => COPY_ENGINE_LIMITS,
                _ => KERNEL_LIMITS,
            };
            let ready = match self.running.len() {
                _ if self.queued.is_empty() => false,
                0 => true,
                r if r < max_running => self.queued_bytes >= min_bytes || self.queued.len() >= self.config.max_batch,
                _ => false,
            };
            if !ready {
                break;
            }
            let n = self.queued.len().min(self.config.max_batch);
            let issued = self.issue(n);
            if issued == 0 {
                break; // the staging ring is full: wait for running batches.
            }
            self.emit_marks();
        }
    }

    /// Issues up to `n` queued operations as one batch; returns how many left the queue.
    fn issue(&mut self, n: usize) -> usize {
        self.runs_cover = 0; // the queue changed since the last batch
        let mut strategy = self.pick(n);
        if let Some(taken) = self.hand_to_resident(strategy, n) {
            return taken;
        }
        let sms = self.live_sms().max(1);
        let mut n = n;
        let first_tasks = self.queued.front().map_or(0, |op| op.copy.len.div_ceil(TASK_CHUNK) as usize);
        if strategy == Strategy::Kernel && first_tasks > STAGING_TASKS {
            // Larger than the whole staging ring (only with a raised max_len): copy it alone.
            (strategy, n) = (Strategy::Memcpy, 1);
        }
        if strategy != Strategy::Kernel {
            self.find_runs(n);
        }
        let live = self.live.as_mut().expect("started");
        let mut staging = None;
        let mut both = false;
        let result = match strategy {
            Strategy::Memcpy | Strategy::Auto | Strategy::Batch | Strategy::Resident => {
                // The copy engine: each direction on its own stream, so that a batch moving both
                // ways keeps both of the GPU's copy engines busy (one stream would run them one
                // after the other); its end is marked on each (`record`).
                for lane in &mut live.lanes {
                    lane.clear();
                }
                let batch = strategy == Strategy::Batch;
                for &(dir, rect) in &self.runs {
                    let lane = &mut live.lanes[dir];
                    if rect.rows > 1 && !(batch && rect.width * (rect.rows as u64) < TWO_D_MIN_BYTES) {
                        lane.rects.push(rect);
                        continue;
                    }
                    for row in 0..rect.rows as u64 {
                        lane.push(
                            rect.dst + row * rect.dst_pitch,
                            rect.src + row * rect.src_pitch,
                            rect.width as usize,
                        );
                    }
                }
                both = live.lanes.iter().all(|l| !l.is_empty());
                let Live { stream, side, lanes, .. } = live;
                // D2H on the side stream when the batch moves both ways, else on `stream`.
                let on = if both { &*side } else { &*stream };
                // SAFETY: validated copies: both ranges of each lie in registered regions (host
                // ones pinned and mapped, device ones of this context) that stay registered while
                // the copy is in flight (the region table counts it).
                unsafe { lanes[1].issue(on, batch) }
                    // SAFETY: as above.
                    .and_then(|()| unsafe { lanes[0].issue(stream, batch) })
            }
            Strategy::Kernel => {
                let (Some(kernel), Some((buffer, device_tasks))) = (live.kernel.as_ref(), live.staging.as_ref()) else {
                    unreachable!("the kernel strategy is only picked when the kernel is loaded")
                };
                // How many operations fit in the contiguous free staging slots.
                let tail = self.running.iter().find_map(|b| b.staging.map(|(start, _)| start));
                let (mut take, mut tasks) = (0, 0);
                for op in self.queued.iter().take(n) {
                    let t = op.copy.len.div_ceil(TASK_CHUNK) as usize;
                    if tasks + t > STAGING_TASKS {
                        break;
                    }
                    tasks += t;
                    take += 1;
                }
                let start = match tail {
                    None => Some(0),
                    Some(tail) if live.staging_head > tail => {
                        if live.staging_head + tasks <= STAGING_TASKS {
                            Some(live.staging_head)
                        } else if tasks <= tail {
                            Some(0)
                        } else {
                            None
                        }
                    }
                    Some(tail) if live.staging_head < tail && live.staging_head + tasks <= tail => {
                        Some(live.staging_head)
                    }
                    Some(_) => None,
                };
                let Some(start) = start.filter(|_| take > 0) else { return 0 };
                // SAFETY: the buffer holds STAGING_TASKS tasks and [start, start + tasks) is free
                // (no running batch holds it), checked above.
                let slots = unsafe { std::slice::from_raw_parts_mut(buffer.as_ptr().cast::<Task>().add(start), tasks) };
                let mut k = 0;
                for op in self.queued.iter().take(take) {
                    let c = &op.copy;
                    let mut off = 0;
                    while off < c.len {
                        let len = (c.len - off).min(TASK_CHUNK);
                        slots[k] = Task { src: c.src.addr + off, dst: c.dst.addr + off, len };
                        k += 1;
                        off += len;
                    }
                }
                live.staging_head = start + tasks;
                staging = Some((start, tasks));
                let warps_per_block = (kernel.block_threads / 32) as usize;
                let grid = (sms * kernel.blocks_per_sm).min(tasks.div_ceil(warps_per_block) as u32).max(1);
                let offset = (start * std::mem::size_of::<Task>()) as u64;
                let mut tasks_ptr = device_tasks.ptr() + offset;
                let mut count = tasks as u32;
                let mut params = [
                    (&mut tasks_ptr as *mut u64).cast::<std::ffi::c_void>(),
                    (&mut count as *mut u32).cast::<std::ffi::c_void>(),
                ];
                let bytes = tasks * std::mem::size_of::<Task>();
                // Only the staged prefix goes out; the rest stays queued.
                n = take;
                // SAFETY: the staging slots [start, start + tasks) are this batch's until it
                // completes (the running batch records them), in pinned memory and its device
                // twin of `bytes` bytes from `offset`.
                unsafe { live.stage_stream.copy(tasks_ptr, buffer.as_ptr() as u64 + offset, bytes) }
                    .and_then(|()| live.staged.record(&live.stage_stream))
                    .and_then(|()| live.stream.wait(&live.staged))
                    // SAFETY: `params` matches `ferry_copy(const FerryCopy*, uint32_t)`; every task
                    // names a validated copy (as above), kept registered until the batch completes.
                    .and_then(|()| unsafe { kernel.launch(&live.stream, grid, &mut params) })
            }
        };
        match result {
            Ok(()) => self.record(n, staging, both),
            Err(e) => {
                // Nothing of this batch is known to have started cleanly: fail it whole. Copies
                // queued before the failing call may still run; their bytes are not trusted.
                self.fail_front(n, e.code());
                n
            }
        }
    }

    /// Under `auto`, hands the resident kernel (where it loaded) what `pick` sent to the SMs: a
    /// batch for the kernel, or a lone small block while the resident kernel is active (it then
    /// costs no launch). Takes the leading operations below the crossover, as far as its ring has
    /// room; returns how many, or None where the batch goes as picked.
    fn hand_to_resident(&mut self, strategy: Strategy, n: usize) -> Option<usize> {
        let route = self.config.route;
        let any_sm = self.live_sms() > 0;
        let resident = self.live.as_mut()?.resident.as_mut()?;
        let wanted = match strategy {
            Strategy::Kernel => true,
            Strategy::Memcpy => n == 1 && any_sm && resident.active(),
            _ => false,
        };
        let run = self.queued.iter().take(n).take_while(|op| below_crossover(&route, op)).count();
        if !wanted || run == 0 {
            return None;
        }
        // The queue's two halves in turn: no reshuffling of a wrapped queue on the hot path.
        let (front, back) = self.queued.as_slices();
        let first = run.min(front.len());
        let mut taken = resident.submit(&front[..first]);
        if taken == first && run > first {
            taken += resident.submit(&back[..run - first]);
        }
        for op in self.queued.drain(..taken) {
            self.queued_bytes -= op.copy.len;
        }
        Some(taken)
    }

    /// Marks the end of `n` issued operations on the stream (and on the side stream where the
    /// batch put copies there): done words where they are usable, else events; moves their
    /// tokens to `tokens`.
    fn record(&mut self, n: usize, staging: Option<(usize, usize)>, on_side: bool) -> usize {
        let live = self.live.as_mut().expect("started");
        let recorded = match live.words.as_mut().filter(|w| w.usable) {
            Some(words) => {
                let end = words.write(&live.stream, 0).and_then(|main| {
                    let side = if on_side { Some(words.write(&live.side, 1)?) } else { None };
                    Ok(End::Words { main, side })
                });
                if let Err(e) = &end {
                    eprintln!("ferry: cuda transport: a done word could not be enqueued ({e}); batches end by events from now on");
                    words.usable = false;
                }
                end
            }
            None => {
                let spare = &mut live.spare_events;
                let mut event_on = |stream: &Stream| {
                    let event = match spare.pop() {
                        Some(e) => Ok(e),
                        None => Event::new(),
                    };
                    event.and_then(|e| e.record(stream).map(|()| e))
                };
                event_on(&live.stream).and_then(|main| {
                    let side = if on_side { Some(event_on(&live.side)?) } else { None };
                    Ok(End::Events { main, side })
                })
            }
        };
        match recorded {
            Ok(end) => {
                for op in self.queued.drain(..n) {
                    self.queued_bytes -= op.copy.len;
                    self.tokens.push_back(op.token);
                }
                self.running.push_back(Batch { end, ops: n, emitted: 0, staging, polls: 0 });
            }
            Err(e) => {
                // Without its words or events the batch's end cannot be observed: wait for the streams.
                let synced = live.stream.synchronize().and_then(|()| live.side.synchronize());
                let detail = e.code();
                for op in self.queued.drain(..n) {
                    self.queued_bytes -= op.copy.len;
                    let status = if synced.is_ok() { Status::Ok } else { Status::TransportFailed };
                    self.failed.push_back(Done {
                        token: op.token,
                        status,
                        detail: if synced.is_ok() { 0 } else { detail },
                    });
                }
            }
        }
        n
    }

    fn fail_front(&mut self, n: usize, detail: u32) {
        for op in self.queued.drain(..n) {
            self.queued_bytes -= op.copy.len;
            self.failed.push_back(Done { token: op.token, status: Status::TransportFailed, detail });
        }
    }
}

/// 0 for a copy to the GPU, 1 for one to the host (the route table's index).
fn direction(op: &Op) -> usize {
    usize::from(op.goes_to_host())
}

/// Whether `op` is smaller than the route table's crossover in its direction (a block for the
/// resident kernel).
fn below_crossover(route: &RouteTable, op: &Op) -> bool {
    op.copy.len < route.copy_engine_from[direction(op)]
}

impl CudaTransport {
    /// Under `auto` and `resident`: sends each of `ops` its way, as far as each way has room,
    /// and returns how many went. The resident kernel (where it loaded, while the live budget
    /// allows an SM) takes the blocks below their direction's crossover (under `auto` also
    /// narrower than a strided descriptor's 2D rows, and a lone one only while the kernel is
    /// active: else it takes the latency path); the others join the queue of the launched
    /// strategies. One pass, in order within each way: a batch moving small blocks one way and
    /// large ones the other keeps both ways busy.
    fn split(&mut self, ops: &[Op]) -> usize {
        let auto = self.config.strategy == Strategy::Auto;
        let route = self.config.route;
        let any_sm = self.live_sms() > 0;
        let room = self.queue_room();
        let Some(resident) = self.live.as_mut().and_then(|live| live.resident.as_mut()).filter(|_| any_sm) else {
            return self.queue(ops);
        };
        let small = |op: &Op| below_crossover(&route, op) && !(auto && op.copy.len >= TWO_D_WIDTH);
        // Under auto, a lone small block while no launch runs goes by cuMemcpyAsync (`pick`).
        let lone = auto && !resident.active() && ops.iter().filter(|op| small(op)).take(2).count() < 2;
        let (mut n, mut queued) = (0, 0);
        for op in ops {
            if small(op) && !lone {
                if !resident.stage(op) {
                    break;
                }
            } else {
                if queued == room {
                    break;
                }
                self.queued.push_back(*op);
                self.queued_bytes += op.copy.len;
                queued += 1;
            }
            n += 1;
        }
        resident.publish();
        self.entered += queued as u64;
        if queued > 0 {
            self.flush();
        }
        n
    }

    /// Operations the queue of the launched strategies has room for: four batches.
    fn queue_room(&self) -> usize {
        (self.config.max_batch * 4).saturating_sub(self.queued.len())
    }

    /// Takes a prefix of `ops` into the queue of the launched strategies, as far as it has
    /// room, and issues what is ready; returns its length.
    fn queue(&mut self, ops: &[Op]) -> usize {
        let n = ops.len().min(self.queue_room());
        self.entered += n as u64;
        self.queued.extend(&ops[..n]);
        self.queued_bytes += ops[..n].iter().map(|op| op.copy.len).sum::<u64>();
        self.flush();
        n
    }
}

impl Transport for CudaTransport {
    fn name(&self) -> &'static str {
        "cuda"
    }

    fn start(&mut self) -> Result<(), TransportError> {
        self.context.make_current()?;
        let stream = Stream::new()?;
        let wants_kernel = matches!(self.config.strategy, Strategy::Auto | Strategy::Kernel);
        let (kernel, staging) = if wants_kernel && self.context.info.host_pointer_for_registered {
            let kernel = Kernel::load(COPY_KERNEL_PTX, "ferry_copy", BLOCK_THREADS);
            let bytes = STAGING_TASKS * std::mem::size_of::<Task>();
            let staging = PinnedBuffer::new(bytes).and_then(|host| Ok((host, DeviceBuffer::new(bytes)?)));
            match (kernel, staging) {
                (Ok(k), Ok(s)) => (Some(k), Some(s)),
                (Err(e), _) | (_, Err(e)) if self.config.strategy == Strategy::Kernel => {
                    return Err(Error::KernelUnavailable { source: e }.into())
                }
                (Err(e), _) | (_, Err(e)) => {
                    eprintln!("ferry: cuda transport: copy kernel unavailable ({e}); auto routes to batch or memcpy");
                    (None, None)
                }
            }
        } else {
            (None, None)
        };
        if self.config.strategy == Strategy::Kernel && kernel.is_none() {
            return Err(Error::DeviceLacks {
                strategy: "the kernel strategy",
                needs: "CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM",
            }
            .into());
        }
        if self.config.strategy == Strategy::Batch && self.context.driver_version < BATCH_COPY_VERSION {
            return Err(Error::DriverTooOld {
                strategy: "the batch strategy (cuMemcpyBatchAsync)",
                needed: BATCH_COPY_VERSION,
                found: self.context.driver_version,
            }
            .into());
        }
        let resident = match self.config.strategy {
            Strategy::Resident => Some(
                Resident::start(&self.context, self.sms.clone(), &self.config)
                    .map_err(|source| Error::ResidentUnavailable { source })?,
            ),
            Strategy::Auto if kernel.is_some() => {
                match Resident::start(&self.context, self.sms.clone(), &self.config) {
                    Ok(resident) => Some(resident),
                    Err(e) => {
                        eprintln!("ferry: cuda transport: resident copy kernel unavailable ({e}); auto launches the copy kernel per batch");
                        None
                    }
                }
            }
            _ => None,
        };
        let stage_stream = Stream::new()?;
        let staged = Event::new()?;
        let words = if self.context.info.stream_mem_ops_64 {
            match DoneWords::new() {
                Ok(words) => Some(words),
                Err(e) => {
                    eprintln!("ferry: cuda transport: no memory for the done words ({e}); batches end by events");
                    None
                }
            }
        } else {
            None
        };
        let lanes = [Lane::with_capacity(self.config.max_batch), Lane::with_capacity(self.config.max_batch)];
        self.live = Some(Live {
            stream,
            stage_stream,
            staged,
            kernel,
            staging,
            staging_head: 0,
            spare_events: Vec::new(),
            words,
            side: Stream::new()?,
            join: Event::new()?,
            lanes,
            resident,
        });
        Ok(())
    }

    fn supports(&self, _src: u32, _dst: u32) -> bool {
        // Host memory is registered (pinned and mapped) by the engine when this transport
        // runs; device memory is the engine's device: every pairing copies.
        true
    }

    fn submit(&mut self, ops: &[Op]) -> usize {
        match self.config.strategy {
            Strategy::Auto | Strategy::Resident => self.split(ops),
            _ => self.queue(ops),
        }
    }

    fn poll(&mut self, done: &mut [Done]) -> usize {
        let mut k = 0;
        while k < done.len() {
            let Some(d) = self.failed.pop_front() else { break };
            done[k] = d;
            k += 1;
        }
        while k < done.len() {
            let Some(batch) = self.running.front_mut() else { break };
            let live = self.live.as_ref().expect("a running batch means started");
            let ended = match &batch.end {
                End::Words { main, side } => {
                    let words = live.words.as_ref().expect("a batch ended by words has them");
                    if words.reached(0, *main) && side.is_none_or(|v| words.reached(1, v)) {
                        Ok(true)
                    } else {
                        batch.polls += 1;
                        if batch.polls % POLLS_PER_QUERY == 0 {
                            // A failed copy stops its stream before the word: the query says
                            // why (done there, the word is on its way: taken as done).
                            live.stream.is_done().and_then(|done| match side {
                                Some(_) if done => live.side.is_done(),
                                _ => Ok(done),
                            })
                        } else {
                            Ok(false)
                        }
                    }
                }
                // The side stream's event is asked only once the first stream's is done.
                End::Events { main, side } => main.is_done().and_then(|done| match side {
                    Some(side) if done => side.is_done(),
                    _ => Ok(done),
                }),
            };
            let finished = match ended {
                Ok(true) => Ok(()),
                Ok(false) => break,
                Err(e) => Err(e.code()),
            };
            while k < done.len() && batch.emitted < batch.ops {
                let token = self.tokens.pop_front().expect("a token per issued operation");
                done[k] = match finished {
                    Ok(()) => Done::ok(token),
                    Err(detail) => Done { token, status: Status::TransportFailed, detail },
                };
                batch.emitted += 1;
                k += 1;
            }
            if batch.emitted == batch.ops {
                let batch = self.running.pop_front().expect("front exists");
                if let Some(live) = self.live.as_mut() {
                    if let End::Events { main, side } = batch.end {
                        live.spare_events.push(main);
                        live.spare_events.extend(side);
                    }
                    if self.running.iter().all(|b| b.staging.is_none()) {
                        live.staging_head = 0;
                    }
                }
            }
        }
        if let Some(resident) = self.live.as_mut().and_then(|live| live.resident.as_mut()) {
            k += resident.poll(&mut done[k..]);
        }
        if self.live.is_some() {
            self.flush();
            if !self.marks.is_empty() {
                self.emit_marks(); // behind the resident kernel's copies, once they are done
            }
        }
        k
    }

    fn in_flight(&self) -> usize {
        let resident = self.live.as_ref().and_then(|live| live.resident.as_ref()).map_or(0, Resident::in_flight);
        self.queued.len() + self.tokens.len() + self.failed.len() + resident
    }

    fn mark(&mut self, word: u64, value: u64) -> bool {
        if !self.marks_ok || self.live.is_none() {
            return false;
        }
        self.marks.push_back(Mark { before: self.entered, word, value, resident: None });
        self.emit_marks();
        self.marks_ok
    }

    fn settle_marks(&mut self, word: Option<u64>) {
        // Marks for the word not yet enqueued are dropped (nobody waits on a closed queue);
        // those enqueued land before the stream's synchronize returns.
        self.marks.retain(|m| word.is_some_and(|word| m.word != word));
        if let Some(live) = &self.live {
            if let Err(e) = live.stream.synchronize() {
                eprintln!("ferry: cuda transport: waiting for the landed marks: {e}");
            }
        }
    }
}

impl Drop for CudaTransport {
    fn drop(&mut self) {
        if let Some(live) = &self.live {
            // Work still on the stream reads or writes registered memory: wait for it before the
            // stream, kernel and staging go away.
            for stream in [&live.stream, &live.stage_stream, &live.side] {
                if let Err(e) = stream.synchronize() {
                    eprintln!("ferry: cuda transport: synchronising at shutdown: {e}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::{Endpoint, ValidCopy};

    fn op(slot: u32, src: u64, dst: u64, len: u64) -> Op {
        let end = |addr| Endpoint { region: 0, kind: 0, addr, lkey: 0, rkey: 0 };
        Op { token: Token { queue: 0, slot }, copy: ValidCopy { src: end(src), dst: end(dst), len } }
    }

    /// A strided descriptor's 4 chunks of 100 bytes (source pitch 1000, destination 100), then
    /// another descriptor's chunk.
    fn ops() -> VecDeque<Op> {
        let mut ops: VecDeque<Op> = (0..4).map(|i| op(7, 5000 + i * 1000, 90_000 + i * 100, 100)).collect();
        ops.push_back(op(8, 5000 + 4 * 1000, 90_000 + 4 * 100, 100));
        ops
    }

    #[test]
    fn a_strided_descriptors_chunks_are_one_rectangle() {
        let ops = ops();
        let rect = run_at(&ops, 0, ops.len(), 1 << 31);
        assert_eq!(rect, Rect { dst: 90_000, src: 5000, dst_pitch: 100, src_pitch: 1000, width: 100, rows: 4 });
        // Another token (descriptor) ends the run even where its addresses would continue it.
        assert_eq!(run_at(&ops, 4, ops.len(), 1 << 31).rows, 1);
        // The batch's end cuts the run; a run may start inside a descriptor.
        assert_eq!(run_at(&ops, 0, 3, 1 << 31).rows, 3);
        assert_eq!(run_at(&ops, 2, ops.len(), 1 << 31).rows, 2);
        assert_eq!(run_at(&ops, 3, ops.len(), 1 << 31).rows, 1);
    }

    #[test]
    fn pitches_outside_what_a_2d_copy_takes_leave_single_copies() {
        let ops = ops();
        // A pitch above the device's maximum.
        assert_eq!(run_at(&ops, 0, ops.len(), 999).rows, 1);
        // A source pitch below the width (overlapping source chunks), and a backwards one.
        let overlapping: VecDeque<Op> = (0..3).map(|i| op(1, 5000 + i * 50, 90_000 + i * 100, 100)).collect();
        assert_eq!(run_at(&overlapping, 0, 3, 1 << 31).rows, 1);
        let backwards: VecDeque<Op> = (0..3).map(|i| op(1, 9000 - i * 1000, 90_000 + i * 100, 100)).collect();
        assert_eq!(run_at(&backwards, 0, 3, 1 << 31).rows, 1);
        // A pitch that changes ends the run where it changes.
        let mut changing = ops.clone();
        changing[2].copy.src.addr += 1;
        assert_eq!(run_at(&changing, 0, 4, 1 << 31).rows, 2);
        // A chunk of another length too.
        let mut shorter = ops;
        shorter[3].copy.len = 99;
        assert_eq!(run_at(&shorter, 0, 4, 1 << 31).rows, 3);
    }
}
