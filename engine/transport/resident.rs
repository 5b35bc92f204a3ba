//! The host side of the resident copy kernel (`gpu/resident_kernel.cu`, loaded from its
//! committed PTX), behind the CUDA transport's `resident` strategy.
//!
//! Launched once when the worker's transport starts, the kernel stays on `sms` SMs (one block of
//! 1024 threads each) and copies the tasks this side publishes in a ring of [`RING`] slots in
//! pinned, device-mapped host memory: a task is written into its slot, then the tail is
//! published; the kernel publishes an in-order watermark `done` (every task below it copied,
//! system-scope fenced). No copy waits for a launch, so a compute load holding every other SM
//! does not starve it (bench/results/h200.md). At most `RING - 1` tasks are unfinished, so a
//! slot is rewritten only after the watermark passed it.
//!
//! Thread contract: one worker thread, with the transport's CUDA context current, calls
//! everything here. Dropping it asks the kernel to end and waits for it (bounded); a kernel that
//! does not end in time keeps its memory (leaked, never freed under it) and is reported.

use crate::cuda_driver::{Context, CudaError, DeviceBuffer, Event, Kernel, PinnedBuffer, Stream};
use crate::transport::{Done, Op, Token, TASK_CHUNK};
use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The kernel's PTX, generated on the H200 machine; see `gpu/resident_kernel.cu`.
const PTX: &str = include_str!("../../gpu/resident_kernel.ptx");
/// Task slots: `FERRY_RING` in the kernel.
const RING: u64 = 1 << 16;
/// Threads per block of the kernel (its `__launch_bounds__`).
const BLOCK_THREADS: u32 = 1024;
/// A task's bytes: `FerryTask`.
const TASK_BYTES: usize = 32;
/// `FerryResidentDev`: claim, tail, stop, pad, then one done flag per slot.
const DEV_BYTES: usize = 8 + 8 + 4 + 4 + RING as usize;
/// How long start waits for the kernel to run, and drop for it to end.
const WAIT: Duration = Duration::from_secs(5);

/// `FerryResidentHost`, in pinned mapped memory: written by both sides.
#[repr(C)]
struct HostSide {
    /// Tasks published; written here (R1), read by the kernel's poller.
    tail: AtomicU64,
    /// The kernel's in-order watermark; read here (A2).
    done: AtomicU64,
    /// Set here to ask the kernel to end.
    stop: AtomicU32,
    /// Set by the kernel's poller once it runs.
    started: AtomicU32,
}

/// The resident kernel of one worker and its ring.
pub(crate) struct Resident {
    /// Recorded behind the launch: done once the kernel has ended.
    ended: Event,
    /// The memory the kernel uses: freed by Drop only once it has ended, else leaked.
    ring: ManuallyDrop<PinnedBuffer>,
    host: ManuallyDrop<PinnedBuffer>,
    dev: ManuallyDrop<DeviceBuffer>,
    /// Held while the kernel runs: its module and its stream (fields drop after Drop::drop).
    _kernel: Kernel,
    _stream: Stream,
    /// Tasks published so far.
    pushed: u64,
    /// Operations published, oldest first, with the index one past their last task.
    pending: VecDeque<(Token, u64)>,
}

impl Resident {
    /// Loads the kernel and launches it on `sms` SMs of `context` (current on this thread);
    /// returns once it runs.
    pub(crate) fn start(context: &Context, sms: u32) -> Result<Resident, CudaError> {
        let kernel = Kernel::load(PTX, "ferry_resident", BLOCK_THREADS)?;
        // More than half an SM's shared memory (unused): one block per SM.
        let shared = u32::try_from(context.info.shared_per_block_optin).unwrap_or(0);
        kernel.allow_dynamic_shared(shared)?;
        let ring = PinnedBuffer::new(RING as usize * TASK_BYTES)?;
        let host = PinnedBuffer::new(std::mem::size_of::<HostSide>().max(64))?;
        // SAFETY: the buffer holds a HostSide (sized above) and nothing uses it yet; zero is a
        // valid value of each atomic.
        unsafe { std::ptr::write_bytes(host.as_ptr(), 0, host.len()) };
        let dev = DeviceBuffer::new(DEV_BYTES)?;
        dev.fill(0)?;
        let stream = Stream::new()?;
        let ended = Event::new()?;
        let (mut tasks, mut host_ptr, mut dev_ptr) = (ring.as_ptr() as u64, host.as_ptr() as u64, dev.ptr());
        let mut params = [
            (&mut tasks as *mut u64).cast::<std::ffi::c_void>(),
            (&mut host_ptr as *mut u64).cast::<std::ffi::c_void>(),
            (&mut dev_ptr as *mut u64).cast::<std::ffi::c_void>(),
        ];
        let sms = sms.max(1);
        // SAFETY: `params` matches `ferry_resident(const FerryTask*, FerryResidentHost*,
        // FerryResidentDev*)`: the ring of RING tasks and the host side (pinned, device-mapped:
        // the same address on the device), the zeroed device side of DEV_BYTES; all three live in
        // `self` until the kernel has ended (Drop waits for it, or leaks them).
        unsafe { kernel.launch_with(&stream, sms, BLOCK_THREADS, shared, &mut params)? };
        ended.record(&stream)?;
        let resident = Resident {
            ended,
            ring: ManuallyDrop::new(ring),
            host: ManuallyDrop::new(host),
            dev: ManuallyDrop::new(dev),
            _kernel: kernel,
            _stream: stream,
            pushed: 0,
            pending: VecDeque::new(),
        };
        let start = Instant::now();
        // A3: Acquire; pairs with the poller's first store: it runs.
        while resident.side().started.load(Ordering::Acquire) == 0 {
            if resident.ended.is_done()? {
                return Err(CudaError::ResidentEnded);
            }
            if start.elapsed() > WAIT {
                return Err(CudaError::ResidentStalled { waited_ms: WAIT.as_millis() as u64 });
            }
            std::thread::yield_now();
        }
        Ok(resident)
    }

    fn side(&self) -> &HostSide {
        // SAFETY: the buffer holds a HostSide for as long as `self`; atomics only.
        unsafe { &*self.host.as_ptr().cast::<HostSide>() }
    }

    /// The kernel's watermark: every task below it is copied.
    fn done(&self) -> u64 {
        // A2: Acquire; pairs with the kernel's system-scope fence before it stores `done`: the
        // copies below it are visible.
        self.side().done.load(Ordering::Acquire)
    }

    /// Publishes a prefix of `ops` (each split into tasks of at most TASK_CHUNK bytes) as far as the
    /// ring has room; returns its length.
    pub(crate) fn submit(&mut self, ops: &[Op]) -> usize {
        let room = RING - 1 - (self.pushed - self.done());
        let mut used = 0;
        let mut n = 0;
        for op in ops {
            let tasks = op.copy.len.div_ceil(TASK_CHUNK).max(1);
            if used + tasks > room {
                break;
            }
            let mut off = 0;
            while off < op.copy.len {
                let len = (op.copy.len - off).min(TASK_CHUNK);
                let slot = ((self.pushed + used) % RING) as usize * TASK_BYTES;
                let task = [op.copy.src.addr + off, op.copy.dst.addr + off, len, 0u64];
                // SAFETY: `slot` is one of the ring's RING slots of TASK_BYTES; the kernel reads
                // it only after the tail below covers it, and the watermark passed its previous
                // task (room), so nothing reads it now.
                unsafe { std::ptr::copy_nonoverlapping(task.as_ptr(), self.ring.as_ptr().add(slot).cast(), 4) };
                off += len;
                used += 1;
            }
            self.pending.push_back((op.token, self.pushed + used));
            n += 1;
        }
        if used > 0 {
            self.pushed += used;
            // R1: Release; the kernel's poller reads the tail, fences, then reads the tasks
            // below it: the task writes above are visible first (x86 keeps stores in order).
            self.side().tail.store(self.pushed, Ordering::Release);
        }
        n
    }

    /// Writes the finished operations into `out`; returns how many.
    pub(crate) fn poll(&mut self, out: &mut [Done]) -> usize {
        let done = self.done();
        let mut k = 0;
        while k < out.len() {
            match self.pending.front() {
                Some(&(token, end)) if end <= done => {
                    out[k] = Done::ok(token);
                    self.pending.pop_front();
                    k += 1;
                }
                _ => break,
            }
        }
        k
    }

    /// Operations published and not yet returned by `poll`.
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len()
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        // R4: Release; the poller ends once every published task is done and it saw the flag.
        self.side().stop.store(1, Ordering::Release);
        let start = Instant::now();
        loop {
            match self.ended.is_done() {
                Ok(true) => break,
                Ok(false) if start.elapsed() < WAIT => std::thread::yield_now(),
                outcome => {
                    // Never free memory a running kernel may still use: leave it allocated.
                    eprintln!(
                        "ferry: cuda transport: the resident copy kernel did not end within {WAIT:?} ({outcome:?}); its ring and buffers are left allocated"
                    );
                    return;
                }
            }
        }
        // SAFETY: the kernel has ended (its event is done), so nothing uses the three buffers;
        // each is dropped once, here, and never touched again.
        unsafe {
            ManuallyDrop::drop(&mut self.ring);
            ManuallyDrop::drop(&mut self.host);
            ManuallyDrop::drop(&mut self.dev);
        }
    }
}
