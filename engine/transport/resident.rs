//! The host side of the resident copy kernel (`gpu/resident_kernel.cu`, loaded from its
//! committed PTX), behind the CUDA transport's `resident` strategy.
//!
//! Launched when tasks wait for it, the kernel stays on `sms` SMs (one block of 1024 threads
//! each) and copies the tasks this side publishes in a ring of [`RING`] slots in pinned,
//! device-mapped host memory: a task is written into its slot, then the tail is published; the
//! kernel publishes an in-order watermark `done` (every task below it copied, system-scope
//! fenced). No copy waits for a launch while it runs, so a compute load holding every other SM
//! does not starve it (bench/results/h200.md). At most `RING - 1` tasks are unfinished, so a
//! slot is rewritten only after the watermark passed it.
//!
//! From sm_90 on (its own PTX) the kernel stages aligned copies from host memory through shared
//! memory with the TMA, which keeps enough reads of host memory in flight for 2 SMs to reach 0.93
//! of PCIe (copies into host memory read device memory and take the plain loop); each
//! task says whether it goes into host memory, and at most `CudaConfig::resident_writers` warps
//! copy into host memory at once (the writer gate: such stores cost a compute load beside them
//! far more than other SM traffic); `resident_writers_large` where a launch's first tasks into
//! host memory average 16 KiB or more (chosen at each launch).
//!
//! The kernel ends by itself once it found no task for [`IDLE`], or after `life`
//! (`CudaConfig::resident_life`: it then takes no new task and ends once those it took are
//! copied), and says so with the number of its launch (`ended`). Whoever waits for the CUDA
//! context to go idle (a device-wide synchronize, a lazy kernel load, another worker's start)
//! waits at most that long behind it.
//! When tasks are left behind an ended launch, the next `submit` or `poll` launches it again on
//! the same stream, from the watermark.
//!
//! Thread contract: one worker thread, with the transport's CUDA context current, calls
//! everything here. Dropping it asks the kernel to end and waits for it (bounded); a kernel that
//! does not end in time keeps its memory (leaked, never freed under it) and is reported.

use crate::config::CudaConfig;
use crate::cuda_driver::{Context, CudaError, DeviceBuffer, Event, Kernel, PinnedBuffer, Stream};
use crate::desc::Status;
use crate::transport::{Done, Op, Token, TASK_CHUNK};
use std::collections::VecDeque;
use std::mem::ManuallyDrop;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The kernel's PTX, generated on the H200 machine; see `gpu/resident_kernel.cu`: for GPUs
/// before sm_90 (copies by the SMs' loads and stores alone), and from sm_90 on (copies from host
/// memory staged through shared memory by the TMA where their ends are 16-byte aligned).
const PTX: &str = include_str!("../../gpu/resident_kernel.ptx");
const PTX_SM90: &str = include_str!("../../gpu/resident_kernel_sm90.ptx");
/// Dynamic shared memory the sm_90 kernel needs: one barrier and one `FERRY_STAGE` (4 KiB) per
/// warp, 32 warps.
const SM90_SHARED: i32 = 32 * 8 + 32 * 4096;
/// Task slots: `FERRY_RING` in the kernel.
const RING: u64 = 1 << 16;
/// Threads per block of the kernel (its `__launch_bounds__`).
const BLOCK_THREADS: u32 = 1024;
/// A task's bytes: `FerryTask`.
const TASK_BYTES: usize = 32;
/// `FerryResidentDev`: claim, tail, stop, writers, the scanner's watermark, then one done flag
/// per slot.
const DEV_BYTES: usize = 8 + 8 + 4 + 4 + 8 + RING as usize;
/// The head of `FerryResidentDev` set before each launch (claim, tail, stop, writers, watermark).
const DEV_HEAD_BYTES: usize = 32;
/// Where in the host-side buffer the launch's device head is staged (after `HostSide`).
const STAGED_HEAD: usize = 64;
/// A launch ends once it found no task for this long (a client's next burst then waits for one
/// launch, behind whatever holds the SMs).
pub(crate) const IDLE: Duration = Duration::from_micros(200);
/// `keep_running` asks the driver whether a launch has ended without saying so (a fault) once per
/// this many of its calls that saw no progress.
const STALL_CHECK: u32 = 64;
/// How long drop waits for the kernel to end.
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
    /// The number of the launch whose poller decided to end; written by the kernel (A3).
    ended: AtomicU32,
}

/// Tasks into host memory of at least this many bytes on average take the large blocks' writer
/// gate (`CudaConfig::resident_writers_large`).
const LARGE_WRITES: u64 = 16 << 10;
/// Tasks a launch looks at to choose its writer gate.
const GATE_SAMPLE: u64 = 64;

/// Whether the tasks into host memory of `tasks` (length, into host memory) average at least
/// LARGE_WRITES bytes; false when none goes there.
fn averages_large(tasks: impl Iterator<Item = (u64, bool)>) -> bool {
    let (n, bytes) = tasks.filter(|&(_, to_host)| to_host).fold((0u64, 0u64), |(n, b), (len, _)| (n + 1, b + len));
    n > 0 && bytes >= LARGE_WRITES * n
}

/// The dynamic shared memory a launch asks per block: the sm_90 kernel's stages (`sm90`), and
/// more than half of an SM's `per_sm` bytes, so that no second block lands on its SM; no more
/// (at most `optin`, the most a block may have), because what a block leaves of the SM's 256
/// KiB of shared memory and L1 is its L1 cache, where the copy loop's loads land. Asking for the
/// most a block may have (227 KiB on the H200) held 4 KiB D2H on 2 SMs at 0.87-0.89 of PCIe,
/// 128 KiB moves 0.93 (gpu/probe_resident_ring.cu; `ferry bench --workers 1`: 48.4 against 51.4
/// GB/s, bench/results/h200.md, twelfth session).
fn launch_shared(sm90: bool, per_sm: i32, optin: i32) -> u32 {
    let stages = if sm90 { SM90_SHARED } else { 0 };
    let more_than_half = per_sm / 2 + 1;
    u32::try_from(stages.max(more_than_half).min(optin)).unwrap_or(0)
}

/// The resident kernel of one worker and its ring.
pub(crate) struct Resident {
    /// Recorded behind each launch: done once the last launch has ended.
    ended: Event,
    /// The memory the kernel uses: freed by Drop only once it has ended, else leaked.
    ring: ManuallyDrop<PinnedBuffer>,
    host: ManuallyDrop<PinnedBuffer>,
    dev: ManuallyDrop<DeviceBuffer>,
    kernel: Kernel,
    stream: Stream,
    /// Dynamic shared memory per block ([`launch_shared`]).
    shared: u32,
    /// The worker's share of the live SM budget (at most the GPU's SMs: `SmBudget::per_worker`),
    /// read at each launch.
    sms: Arc<AtomicU32>,
    /// The number of the last launch, and whether it may still take tasks (not seen ended).
    epoch: u32,
    running: bool,
    /// How long a launch takes new tasks (`CudaConfig::resident_life`).
    life: Duration,
    /// The writer gates, most warps copying into host memory at once: for a launch whose first
    /// tasks into host memory average below LARGE_WRITES, and from it up
    /// (`CudaConfig::resident_writers`, `resident_writers_large`).
    writers: [u32; 2],
    /// The watermark when `keep_running` last looked, and its calls since it last moved.
    seen: u64,
    stalls: u32,
    /// Tasks published so far.
    pushed: u64,
    /// Tasks written into the ring after those published (`stage`), until `publish`.
    staged: u64,
    /// Free slots as the watermark last read showed them, less those staged since: never more
    /// than are free (the watermark only moves up), refreshed when a task does not fit, so that
    /// staging reads the watermark (a line the GPU writes) once per refill, not once per block.
    free: u64,
    /// Operations published, oldest first, with the index one past their last task.
    pending: VecDeque<(Token, u64)>,
    /// Operations failed by a launch that failed, for `poll`.
    failed: VecDeque<Done>,
}

/// The ring's tasks `op` takes: one per TASK_CHUNK bytes, at least one.
fn tasks(op: &Op) -> u64 {
    op.copy.len.div_ceil(TASK_CHUNK).max(1)
}

impl Resident {
    /// Loads the kernel for `context` (current on this thread) and allocates its ring; the first
    /// `submit` launches it, each launch on `sms` SMs as they are then (at least one).
    pub(crate) fn start(context: &Context, sms: Arc<AtomicU32>, config: &CudaConfig) -> Result<Resident, CudaError> {
        let info = &context.info;
        let sm90 = info.compute_major >= 9 && info.shared_per_block_optin >= SM90_SHARED;
        let kernel = Kernel::load(if sm90 { PTX_SM90 } else { PTX }, "ferry_resident", BLOCK_THREADS)?;
        let shared = launch_shared(sm90, info.shared_per_sm, info.shared_per_block_optin);
        kernel.allow_dynamic_shared(shared)?;
        let ring = PinnedBuffer::new(RING as usize * TASK_BYTES)?;
        // Zeroed (PinnedBuffer::new): zero is a valid value of each of its atomics.
        let host = PinnedBuffer::new(STAGED_HEAD + DEV_HEAD_BYTES)?;
        let dev = DeviceBuffer::new(DEV_BYTES)?;
        dev.fill(0)?;
        Ok(Resident {
            ended: Event::new()?,
            ring: ManuallyDrop::new(ring),
            host: ManuallyDrop::new(host),
            dev: ManuallyDrop::new(dev),
            kernel,
            stream: Stream::new()?,
            shared,
            sms,
            epoch: 0,
            running: false,
            life: config.resident_life,
            writers: [config.resident_writers, config.resident_writers_large],
            seen: 0,
            stalls: 0,
            pushed: 0,
            staged: 0,
            free: RING - 1,
            pending: VecDeque::new(),
            failed: VecDeque::new(),
        })
    }

    /// Launches the kernel again if tasks wait and the last launch has ended (or none ran); a
    /// launch that fails, or ends without saying so, fails every unfinished operation.
    fn keep_running(&mut self) {
        if self.running && !self.ended_yet() {
            // A watermark that moved says the launch runs, without asking the driver.
            let done = self.done();
            if done != self.seen {
                (self.seen, self.stalls) = (done, 0);
                return;
            }
            // The driver is asked only every STALL_CHECK calls without progress: a kernel that
            // faulted is seen a few microseconds later, and the worker's loop stays cheap.
            self.stalls += 1;
            if self.stalls < STALL_CHECK {
                return;
            }
            self.stalls = 0;
            match self.ended.is_done() {
                Ok(false) => return,
                // Ended between the two reads.
                Ok(true) if self.ended_yet() => {}
                // The kernel ended without its poller saying so (it faulted), or the event tells
                // of a failure: its tasks are not trusted.
                Ok(true) => return self.fail_unfinished(0),
                Err(e) => return self.fail_unfinished(e.code()),
            }
        }
        self.running = false;
        let done = self.done();
        if done == self.pushed {
            return;
        }
        if let Err(e) = self.launch(done) {
            eprintln!(
                "ferry: cuda transport: the resident copy kernel could not be launched ({e}); its operations failed"
            );
            self.fail_unfinished(e.code());
        }
    }

    /// Whether the last launch's poller has decided to end (and published its last watermark).
    fn ended_yet(&self) -> bool {
        // A3: Acquire; pairs with the poller's system-scope fence before it stores `ended`: the
        // watermark read after this is the launch's last.
        self.side().ended.load(Ordering::Acquire) == self.epoch
    }

    /// Fails the operations the watermark has not passed (the others complete), once no kernel
    /// runs: the tail goes back to the watermark, so the next launch starts there.
    fn fail_unfinished(&mut self, detail: u32) {
        let done = self.done();
        while let Some((token, end)) = self.pending.pop_front() {
            self.failed.push_back(if end <= done {
                Done::ok(token)
            } else {
                Done { token, status: Status::TransportFailed, detail }
            });
        }
        self.pushed = done;
        self.running = false;
        // R1 (as in submit): no launch runs, so none reads the tail until the next one.
        self.side().tail.store(done, Ordering::Release);
    }

    /// Launches the kernel on the stream from task `start` (the watermark): its device head set
    /// first, behind the previous launch.
    fn launch(&mut self, start: u64) -> Result<(), CudaError> {
        let head = [start, start, 0u64, start];
        let staged = self.host.as_ptr() as u64 + STAGED_HEAD as u64;
        // SAFETY: the staged head lies in the host buffer (sized in `start`); the copy that read
        // the previous value ran before the last launch, which has ended (`keep_running`).
        unsafe { std::ptr::copy_nonoverlapping(head.as_ptr(), (staged as *mut u64).cast(), head.len()) };
        // SAFETY: both ranges are this transport's (pinned mapped host memory and device memory),
        // kept until the kernel has ended; the copy runs after the previous launch on the stream.
        unsafe { self.stream.copy(self.dev.ptr(), staged, DEV_HEAD_BYTES)? };
        let epoch = self.epoch.wrapping_add(1);
        let (mut tasks, mut host_ptr, mut dev_ptr) =
            (self.ring.as_ptr() as u64, self.host.as_ptr() as u64, self.dev.ptr());
        let (mut idle_ns, mut life_ns, mut number) = (IDLE.as_nanos() as u64, self.life.as_nanos() as u64, epoch);
        let mut writers = self.writers[usize::from(self.large_writes(start))];
        let mut params = [
            (&mut tasks as *mut u64).cast::<std::ffi::c_void>(),
            (&mut host_ptr as *mut u64).cast::<std::ffi::c_void>(),
            (&mut dev_ptr as *mut u64).cast::<std::ffi::c_void>(),
            (&mut idle_ns as *mut u64).cast::<std::ffi::c_void>(),
            (&mut life_ns as *mut u64).cast::<std::ffi::c_void>(),
            (&mut number as *mut u32).cast::<std::ffi::c_void>(),
            (&mut writers as *mut u32).cast::<std::ffi::c_void>(),
        ];
        // Relaxed: a setting, read once per launch; it orders nothing.
        let sms = self.sms.load(Ordering::Relaxed).max(1);
        // SAFETY: `params` matches `ferry_resident(const FerryTask*, FerryResidentHost*,
        // FerryResidentDev*, u64, u64, u32, u32)`: the ring of RING tasks and the host side (pinned,
        // device-mapped: the same address on the device), the device side of DEV_BYTES, its head
        // set above; all three live in `self` until the kernel has ended (Drop waits for it, or
        // leaks them).
        unsafe { self.kernel.launch_with(&self.stream, sms, BLOCK_THREADS, self.shared, &mut params)? };
        self.epoch = epoch;
        if self.ended.record(&self.stream).is_err() {
            // Without the event the launch's end shows only in `ended`: wait for it here (it
            // ends by itself within `life`), so that a failure is never a launch left running.
            self.stream.synchronize()?;
            return Ok(());
        }
        self.running = true;
        Ok(())
    }

    /// Whether the first (up to GATE_SAMPLE) tasks from `start` into host memory average at
    /// least LARGE_WRITES: the launch then takes the gate for large blocks.
    fn large_writes(&self, start: u64) -> bool {
        let end = self.pushed.min(start + GATE_SAMPLE);
        let tasks = (start..end).map(|i| {
            let slot = (i % RING) as usize * TASK_BYTES;
            let mut task = [0u64; 4];
            // SAFETY: `slot` is one of the ring's RING slots of TASK_BYTES, written by `submit`;
            // the kernel only reads it.
            unsafe { std::ptr::copy_nonoverlapping(self.ring.as_ptr().add(slot).cast(), task.as_mut_ptr(), 4) };
            (task[2], task[3] != 0)
        });
        averages_large(tasks)
    }

    fn side(&self) -> &HostSide {
        // SAFETY: the buffer holds a HostSide for as long as `self`; atomics only.
        unsafe { &*self.host.as_ptr().cast::<HostSide>() }
    }

    /// The kernel's watermark: every task below it is copied.
    pub(crate) fn done(&self) -> u64 {
        // A2: Acquire; pairs with the kernel's system-scope fence before it stores `done`: the
        // copies below it are visible.
        self.side().done.load(Ordering::Acquire)
    }

    /// Publishes a prefix of `ops` (each split into tasks of at most TASK_CHUNK bytes) as far as the
    /// ring has room; returns its length.
    pub(crate) fn submit(&mut self, ops: &[Op]) -> usize {
        let n = ops.iter().take_while(|op| self.stage(op)).count();
        self.publish();
        n
    }

    /// Writes `op`'s [`tasks`] into the ring after those staged, unpublished until
    /// [`Resident::publish`], if the ring has room for them; returns whether it had.
    pub(crate) fn stage(&mut self, op: &Op) -> bool {
        let tasks = tasks(op);
        if tasks > self.free {
            self.free = RING - 1 - (self.pushed + self.staged - self.done());
            if tasks > self.free {
                return false;
            }
        }
        self.free -= tasks;
        let to_host = u64::from(op.goes_to_host());
        let mut off = 0;
        while off < op.copy.len {
            let len = (op.copy.len - off).min(TASK_CHUNK);
            let slot = ((self.pushed + self.staged) % RING) as usize * TASK_BYTES;
            // The fourth word marks a copy into host memory: it passes the writer gate.
            let task = [op.copy.src.addr + off, op.copy.dst.addr + off, len, to_host];
            // SAFETY: `slot` is one of the ring's RING slots of TASK_BYTES; the kernel reads
            // it only after the tail (`publish`) covers it, and the watermark passed its previous
            // task (`free` counts only slots it passed), so nothing reads it now.
            unsafe { std::ptr::copy_nonoverlapping(task.as_ptr(), self.ring.as_ptr().add(slot).cast(), 4) };
            off += len;
            self.staged += 1;
        }
        self.pending.push_back((op.token, self.pushed + self.staged));
        true
    }

    /// Publishes the staged tasks to the kernel, launching it where none runs.
    pub(crate) fn publish(&mut self) {
        if self.staged == 0 {
            return;
        }
        self.pushed += std::mem::take(&mut self.staged);
        // R1: Release; the kernel's poller reads the tail, fences, then reads the tasks
        // below it: the task writes in `stage` are visible first (x86 keeps stores in order).
        self.side().tail.store(self.pushed, Ordering::Release);
        self.keep_running();
    }

    /// Writes the finished operations into `out`; returns how many.
    pub(crate) fn poll(&mut self, out: &mut [Done]) -> usize {
        self.keep_running();
        let mut k = 0;
        while k < out.len() {
            let Some(d) = self.failed.pop_front() else { break };
            out[k] = d;
            k += 1;
        }
        let done = self.done();
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

    /// Tasks published so far: once the watermark reaches this, every operation published
    /// before has been copied.
    pub(crate) fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Whether a launch may still take tasks, or tasks wait for one: a block sent now is
    /// copied without a launch of its own (unless the launch has just ended).
    pub(crate) fn active(&self) -> bool {
        self.running || !self.pending.is_empty()
    }

    /// Operations published and not yet returned by `poll`.
    pub(crate) fn in_flight(&self) -> usize {
        self.pending.len() + self.failed.len()
    }
}

impl Drop for Resident {
    fn drop(&mut self) {
        // R4: Release; a running launch ends once every task it took is done and it saw the
        // flag (none runs if none was launched: the event is then done already).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_shared_keeps_one_block_per_sm_and_leaves_the_rest_to_l1() {
        // H200 (sm_90): the stages, above half of the SM's 228 KiB, far below the 227 KiB a block
        // may have.
        let (per_sm, optin) = (233_472, 232_448);
        let h200 = launch_shared(true, per_sm, optin);
        assert_eq!(h200, SM90_SHARED as u32);
        assert!(2 * h200 > per_sm as u32, "a second block would fit");
        // A100 (sm_80, 164 KiB an SM): no stages, just over half.
        let a100 = launch_shared(false, 167_936, 166_912);
        assert_eq!(a100, 83_969);
        // Never more than a block may have.
        assert_eq!(launch_shared(true, 100_000, 50_000), 50_000);
    }

    #[test]
    fn the_writer_gate_follows_the_mean_block_into_host_memory() {
        let k = 1024;
        assert!(!averages_large([(4 * k, true); 8].into_iter()));
        assert!(averages_large([(16 * k, true); 8].into_iter()));
        assert!(!averages_large([(16 * k - 1, true); 8].into_iter()));
        // Only the blocks into host memory count: large H2D blocks beside small D2H ones, or no
        // D2H at all, keep the small blocks' gate.
        assert!(!averages_large([(64 * k, false), (4 * k, true)].into_iter()));
        assert!(!averages_large([(64 * k, false); 4].into_iter()));
        assert!(averages_large([(4 * k, false), (32 * k, true), (8 * k, true)].into_iter()));
        assert!(!averages_large(std::iter::empty()));
    }
}
