//! The scattered-block workload behind `ferry bench` and the criterion benches.
//!
//! A run copies `count` blocks of `block` bytes between two regions of `span` bytes; block `i`
//! goes from a shuffled source slot to a shuffled destination slot, so consecutive descriptors
//! never touch adjacent memory. The same plan drives the engine and the plain `memcpy`
//! baseline, so the two figures of one run compare like with like.

use ferry::internals::cuda::CudaError;
use ferry::internals::ring::layout::ring_bytes;
use ferry::internals::ring::shm::SharedMemory;
use ferry::internals::ring::{Consumer, Producer, RingMemory};
use ferry::{Completion, Descriptor, HostBuffer, Queue, RegionId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// The submitting thread's passes over its queues in [`drive_lanes`] so far, and those of them
/// that neither pushed nor received a descriptor (it waited on the engine). Beside the workers'
/// idle iterations, they say which side a run waited on.
static CLIENT_PASSES: AtomicU64 = AtomicU64::new(0);
static CLIENT_IDLE_PASSES: AtomicU64 = AtomicU64::new(0);

/// [`drive_lanes`]' passes so far, all and idle (see `CLIENT_PASSES`).
pub fn client_passes() -> (u64, u64) {
    // Relaxed: counters read after the runs that wrote them, on the thread that ran them.
    (CLIENT_PASSES.load(Ordering::Relaxed), CLIENT_IDLE_PASSES.load(Ordering::Relaxed))
}

/// What a benchmark run fails with: the engine's errors, the CUDA driver's, or a check of the
/// run that did not hold (copies completed with errors, a wrong checksum).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The engine refused something.
    #[error(transparent)]
    Engine(#[from] ferry::Error),
    /// A CUDA driver call of the benchmark itself failed.
    #[error("CUDA: {0}")]
    Cuda(#[from] CudaError),
    /// A ring of the raw-ring benchmark.
    #[error(transparent)]
    Ring(#[from] ferry::internals::ring::RingError),
    /// The raw-verbs baseline's own NIC calls.
    #[error("GDR: {0}")]
    Gdr(#[from] ferry::transport::gdr::GdrError),
    /// Reading the machine's topology.
    #[error(transparent)]
    Topology(#[from] ferry_topology::TopologyError),
    /// A check of the run did not hold.
    #[error("{0}")]
    Failed(String),
}

/// What one run moved and how long it took.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Measurement {
    /// Descriptors (or blocks) completed.
    pub descriptors: u64,
    /// Bytes moved.
    pub bytes: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
}

impl Measurement {
    /// Gigabytes (10^9) per second.
    pub fn gb_per_s(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    /// Descriptors per second.
    pub fn per_s(&self) -> f64 {
        self.descriptors as f64 / self.seconds
    }
}

/// The median of `runs` by the value `key` gives (the upper one of an even count).
pub fn median_by(mut runs: Vec<Measurement>, key: impl Fn(&Measurement) -> f64) -> Measurement {
    assert!(!runs.is_empty(), "median of no runs");
    runs.sort_by(|a, b| key(a).total_cmp(&key(b)));
    runs[runs.len() / 2]
}

/// Source and destination offsets of each block slot in a `span`-byte region, both shuffled.
pub fn scatter(span: usize, block: usize, seed: u64) -> Vec<(u64, u64)> {
    let n = (span / block).max(1);
    let mut state = seed | 1;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut shuffled = |n: usize| {
        let mut v: Vec<u64> = (0..n as u64).collect();
        for i in (1..n).rev() {
            v.swap(i, (next() % (i as u64 + 1)) as usize);
        }
        v
    };
    let (src, dst) = (shuffled(n), shuffled(n));
    src.into_iter().zip(dst).map(|(s, d)| (s * block as u64, d * block as u64)).collect()
}

/// Pushes `count` descriptors of the plan through `queue` and waits for every completion.
/// Fails if any completion is not `Ok`.
pub fn drive(
    queue: &mut Queue,
    src: RegionId,
    dst: RegionId,
    plan: &[(u64, u64)],
    block: u64,
    count: u64,
) -> Result<Measurement, BenchError> {
    drive_queues(std::slice::from_mut(queue), src, dst, plan, block, count)
}

/// One way descriptors go: from `src` at `src_base` + the plan's source offset to `dst` at
/// `dst_base` + its destination offset.
#[derive(Clone, Copy, Debug)]
pub struct Lane {
    /// Source region.
    pub src: RegionId,
    /// Destination region.
    pub dst: RegionId,
    /// Added to the plan's source offsets.
    pub src_base: u64,
    /// Added to the plan's destination offsets.
    pub dst_base: u64,
}

/// [`drive`] over several queues from this one thread: descriptor `k` of the plan goes to queue
/// `k % queues.len()`, pushed 64 at a time, each queue polled in turn.
pub fn drive_queues(
    queues: &mut [Queue],
    src: RegionId,
    dst: RegionId,
    plan: &[(u64, u64)],
    block: u64,
    count: u64,
) -> Result<Measurement, BenchError> {
    drive_lanes(queues, &[Lane { src, dst, src_base: 0, dst_base: 0 }], plan, block, count)
}

/// [`drive_queues`] with descriptor `k` going the way of lane `k % lanes.len()` (two lanes, one
/// each way: half the blocks host to GPU and half GPU to host, interleaved).
pub fn drive_lanes(
    queues: &mut [Queue],
    lanes: &[Lane],
    plan: &[(u64, u64)],
    block: u64,
    count: u64,
) -> Result<Measurement, BenchError> {
    assert!(!lanes.is_empty(), "drive_lanes needs a lane");
    let n = queues.len() as u64;
    assert!(n > 0, "drive_queues needs a queue");
    let mut staged = [Descriptor::default(); 64];
    let mut done = [Completion::default(); 256];
    // Per queue: the next descriptor index it pushes (k = q, q + n, q + 2n, ...).
    let mut next: Vec<u64> = (0..n).collect();
    let (mut received, mut failed) = (0u64, 0u64);
    let mut first_failure = None;
    let (mut passes, mut idle_passes) = (0u64, 0u64);
    let start = Instant::now();
    while received < count {
        let mut moved = false;
        for (q, queue) in queues.iter_mut().enumerate() {
            let mut k = next[q];
            let mut staged_n = 0;
            while k < count && staged_n < staged.len() {
                let (s, t) = plan[(k % plan.len() as u64) as usize];
                let lane = lanes[(k % lanes.len() as u64) as usize];
                staged[staged_n] =
                    Descriptor::copy(lane.src, lane.src_base + s, lane.dst, lane.dst_base + t, block).with_tag(k);
                staged_n += 1;
                k += n;
            }
            if staged_n > 0 {
                let pushed = queue.submit(&staged[..staged_n])? as u64;
                next[q] += pushed * n;
                moved |= pushed > 0;
            }
            let got = queue.poll(&mut done)?;
            for c in &done[..got] {
                if !c.is_ok() {
                    failed += 1;
                    first_failure.get_or_insert(*c);
                }
            }
            received += got as u64;
            moved |= got > 0;
        }
        passes += 1;
        idle_passes += u64::from(!moved);
    }
    let seconds = start.elapsed().as_secs_f64();
    // Relaxed: counters (see client_passes).
    CLIENT_PASSES.fetch_add(passes, Ordering::Relaxed);
    CLIENT_IDLE_PASSES.fetch_add(idle_passes, Ordering::Relaxed);
    if let Some(c) = first_failure {
        return Err(BenchError::Failed(format!("{failed} of {count} copies failed; first: {c:?}")));
    }
    Ok(Measurement { descriptors: count, bytes: count * block, seconds })
}

/// The same plan copied by this thread with `memcpy`, for comparison.
pub fn memcpy_baseline(src: &HostBuffer, dst: &HostBuffer, plan: &[(u64, u64)], block: u64, count: u64) -> Measurement {
    let (s, d) = (src.as_ptr(), dst.as_ptr());
    let start = Instant::now();
    for i in 0..count {
        let (so, dof) = plan[(i % plan.len() as u64) as usize];
        assert!(so + block <= src.len() as u64 && dof + block <= dst.len() as u64, "plan outside the buffers");
        // SAFETY: both ranges are inside their buffers (asserted) and the buffers are distinct
        // mappings; no copy of the engine uses them during the baseline.
        unsafe { std::ptr::copy_nonoverlapping(s.add(so as usize), d.add(dof as usize), block as usize) };
    }
    std::hint::black_box(d);
    Measurement { descriptors: count, bytes: count * block, seconds: start.elapsed().as_secs_f64() }
}

/// Pins the calling thread (a ring benchmark's) to `core`, where one is given.
fn pin(core: Option<usize>) -> Result<(), BenchError> {
    match core {
        Some(core) => ferry::internals::sys::pin_current_thread(core)
            .map_err(|e| BenchError::Failed(format!("pinning a ring benchmark thread to core {core}: {e}"))),
        None => Ok(()),
    }
}

/// Raw ring throughput: one thread pushes `count` descriptors in batches, another pops them,
/// each on its own core where given. What the engine's per-descriptor cost is compared with.
pub fn ring_throughput(
    count: u64,
    producer_core: Option<usize>,
    consumer_core: Option<usize>,
) -> Result<Measurement, BenchError> {
    let capacity = 4096;
    let memory = SharedMemory::create("ferry-bench-ring", ring_bytes(capacity, std::mem::size_of::<Descriptor>()))
        .map_err(|e| BenchError::Failed(format!("shared memory for the ring benchmark: {e}")))?;
    let memory = Arc::new(memory);
    let ring = Arc::new(RingMemory::<Descriptor>::create(memory, 0, capacity)?);
    let mut producer = Producer::new(ring.clone());
    let mut consumer = Consumer::new(ring);
    let popper = std::thread::spawn(move || -> Result<u64, BenchError> {
        pin(consumer_core)?;
        let mut seen = 0u64;
        let mut checksum = 0u64;
        while seen < count {
            for d in consumer.read(64)? {
                checksum = checksum.wrapping_add(d.tag);
                seen += 1;
            }
        }
        Ok(checksum)
    });
    pin(producer_core)?;
    let start = Instant::now();
    let mut i = 0;
    while i < count {
        let mut batch = producer.write();
        for _ in 0..64 {
            if i == count || batch.push(Descriptor { tag: i, len: 4096, ..Descriptor::default() }).is_err() {
                break;
            }
            i += 1;
        }
    }
    let checksum = popper.join().map_err(|_| BenchError::Failed("ring benchmark consumer panicked".into()))??;
    let seconds = start.elapsed().as_secs_f64();
    if checksum != count * (count.wrapping_sub(1)) / 2 {
        return Err(BenchError::Failed("ring benchmark: checksum of popped tags is wrong".into()));
    }
    Ok(Measurement { descriptors: count, bytes: 0, seconds })
}

/// Spins until `ring` holds a descriptor and pops it.
fn spin_pop(ring: &mut Consumer<Descriptor>) -> Result<Descriptor, BenchError> {
    loop {
        match ring.pop()? {
            Some(d) => return Ok(d),
            None => std::hint::spin_loop(),
        }
    }
}

/// Raw rings' round trip: this thread pushes one descriptor into a ring, another pops it and
/// pushes it into a second ring, this one pops it there; `samples` rounds after `warmup`, sorted,
/// in microseconds, each thread on its core where given. What the engine's own push-to-completion
/// latency (the null transport) is compared with: the two cores' handoffs without the engine.
pub fn ring_round_trip(
    warmup: usize,
    samples: usize,
    client_core: Option<usize>,
    echo_core: Option<usize>,
) -> Result<Vec<f64>, BenchError> {
    let capacity = 64;
    let ring = || -> Result<Arc<RingMemory<Descriptor>>, BenchError> {
        let bytes = ring_bytes(capacity, std::mem::size_of::<Descriptor>());
        let memory = SharedMemory::create("ferry-bench-round-trip", bytes)
            .map_err(|e| BenchError::Failed(format!("shared memory for the ring benchmark: {e}")))?;
        Ok(Arc::new(RingMemory::<Descriptor>::create(Arc::new(memory), 0, capacity)?))
    };
    let (there, back) = (ring()?, ring()?);
    let (mut to_echo, mut from_client) = (Producer::new(there.clone()), Consumer::new(there));
    let (mut to_client, mut from_echo) = (Producer::new(back.clone()), Consumer::new(back));
    let rounds = warmup + samples;
    let echo = std::thread::spawn(move || -> Result<(), BenchError> {
        pin(echo_core)?;
        for _ in 0..rounds {
            let d = spin_pop(&mut from_client)?;
            // At most one descriptor is in either ring: there is room.
            to_client.push(d).map_err(|_| BenchError::Failed("ring round trip: the return ring is full".into()))?;
        }
        Ok(())
    });
    pin(client_core)?;
    let mut times = Vec::with_capacity(samples);
    for i in 0..rounds {
        let start = Instant::now();
        to_echo
            .push(Descriptor { tag: i as u64, ..Descriptor::default() })
            .map_err(|_| BenchError::Failed("ring round trip: the ring is full".into()))?;
        let d = spin_pop(&mut from_echo)?;
        if d.tag != i as u64 {
            return Err(BenchError::Failed(format!("ring round trip: got tag {} back for {i}", d.tag)));
        }
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    echo.join().map_err(|_| BenchError::Failed("ring round trip: the echo thread panicked".into()))??;
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// GB/s of one `len`-byte copy on a fresh non-blocking stream, median of `reps` (the PCIe
/// ceiling when one side is pinned host memory and the other device memory). The CUDA context
/// must be current on this thread.
///
/// # Safety
/// As `Stream::copy`: `src` readable and `dst` writable by the device for `len` bytes, and
/// nothing else writing them, until this returns (it synchronizes after each copy).
pub unsafe fn copy_ceiling(dst: u64, src: u64, len: usize, reps: usize) -> Result<f64, BenchError> {
    let stream = ferry::internals::cuda::Stream::new()?;
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        // SAFETY: forwarded from the caller; the copy finishes before the next line returns.
        unsafe { stream.copy(dst, src, len)? };
        stream.synchronize()?;
        runs.push(Measurement { descriptors: 1, bytes: len as u64, seconds: start.elapsed().as_secs_f64() });
    }
    Ok(median_by(runs, Measurement::gb_per_s).gb_per_s())
}

/// GB/s of one `len`-byte copy each way at once, on two fresh non-blocking streams (the two-way
/// PCIe ceiling): bytes of both over the time until both finished, median of `reps`.
///
/// # Safety
/// As [`copy_ceiling`], for both `(dst, src)` pairs, which must not overlap each other.
pub unsafe fn copy_ceiling_both(
    one: (u64, u64),
    other: (u64, u64),
    len: usize,
    reps: usize,
) -> Result<f64, BenchError> {
    let streams = [ferry::internals::cuda::Stream::new()?, ferry::internals::cuda::Stream::new()?];
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        let start = Instant::now();
        for (stream, (dst, src)) in streams.iter().zip([one, other]) {
            // SAFETY: forwarded from the caller; both copies finish before this loop's end.
            unsafe { stream.copy(dst, src, len)? };
        }
        for stream in &streams {
            stream.synchronize()?;
        }
        runs.push(Measurement { descriptors: 2, bytes: 2 * len as u64, seconds: start.elapsed().as_secs_f64() });
    }
    Ok(median_by(runs, Measurement::gb_per_s).gb_per_s())
}

/// Latency of one `len`-byte `cuMemcpyAsync` plus stream synchronize, as the CUDA runtime's
/// users see it: `samples` rounds after `warmup`, sorted, in microseconds. What ferry's
/// push-to-completion latency is compared with.
///
/// # Safety
/// As [`copy_ceiling`].
pub unsafe fn copy_latency(
    dst: u64,
    src: u64,
    len: usize,
    warmup: usize,
    samples: usize,
) -> Result<Vec<f64>, BenchError> {
    let stream = ferry::internals::cuda::Stream::new()?;
    let mut times = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let start = Instant::now();
        // SAFETY: forwarded from the caller; synchronized before the next round.
        unsafe { stream.copy(dst, src, len)? };
        stream.synchronize()?;
        if i >= warmup {
            times.push(start.elapsed().as_secs_f64() * 1e6);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Latencies of stream ordering (issue 13), `samples` rounds after `warmup` of one `len`-byte
/// descriptor a stream waits for (`Engine::stream_wait` on a stream of the engine's context,
/// already blocked in its wait when the descriptor is pushed): (push -> the stream past the
/// wait, the completion seen by the CPU -> the stream past the wait), each sorted, in us. The
/// stream's progress is an event recorded after the wait, polled.
pub fn stream_latency(
    engine: &ferry::Engine,
    queue: &mut Queue,
    d: Descriptor,
    warmup: usize,
    samples: usize,
) -> Result<(Vec<f64>, Vec<f64>), BenchError> {
    use ferry::internals::cuda::{Event, Stream};
    let stream = Stream::new()?;
    let event = Event::new()?;
    let mut out = [Completion::default()];
    let (mut pushed_to_stream, mut seen_to_stream) = (Vec::with_capacity(samples), Vec::with_capacity(samples));
    let spin_event = |what: &str| -> Result<Instant, BenchError> {
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while !event.is_done()? {
            if Instant::now() > deadline {
                return Err(BenchError::Failed(format!("stream latency: {what}: the stream did not go on within 5 s")));
            }
            std::hint::spin_loop();
        }
        Ok(Instant::now())
    };
    for i in 0..warmup + samples {
        // SAFETY: our own live stream of the engine's context (current on this thread, where the
        // rig made its buffers); the queue outlives the wait, which passes within the round.
        unsafe { engine.stream_wait(queue, stream.handle(), queue.pushed() + 1)? };
        event.record(&stream)?;
        std::thread::sleep(std::time::Duration::from_micros(100)); // the stream is in its wait
        let start = Instant::now();
        if queue.submit(std::slice::from_ref(&d.with_tag(i as u64)))? != 1 {
            return Err(BenchError::Failed("stream latency: the submission ring is full".into()));
        }
        while queue.poll(&mut out)? == 0 {
            std::hint::spin_loop();
        }
        let seen = Instant::now();
        if !out[0].is_ok() {
            return Err(BenchError::Failed(format!("stream latency: copy failed: {:?}", out[0])));
        }
        let passed = spin_event("after the completion")?;
        if i >= warmup {
            pushed_to_stream.push((passed - start).as_secs_f64() * 1e6);
            seen_to_stream.push((passed - seen).as_secs_f64() * 1e6);
        }
    }
    pushed_to_stream.sort_by(f64::total_cmp);
    seen_to_stream.sort_by(f64::total_cmp);
    Ok((pushed_to_stream, seen_to_stream))
}

/// Latency of one descriptor from push to its completion as the client sees it: `samples`
/// rounds after `warmup`, each pushing one descriptor and spinning on the completion ring.
/// Returns the sorted latencies in microseconds.
pub fn latency(
    queue: &mut Queue,
    src: RegionId,
    dst: RegionId,
    len: u64,
    warmup: usize,
    samples: usize,
) -> Result<Vec<f64>, BenchError> {
    let mut out = [Completion::default()];
    let mut times = Vec::with_capacity(samples);
    for i in 0..warmup + samples {
        let d = Descriptor::copy(src, 0, dst, 0, len).with_tag(i as u64);
        let start = Instant::now();
        if queue.submit(std::slice::from_ref(&d))? != 1 {
            return Err(BenchError::Failed("latency: the submission ring is full".into()));
        }
        while queue.poll(&mut out)? == 0 {
            std::hint::spin_loop();
        }
        let micros = start.elapsed().as_secs_f64() * 1e6;
        if !out[0].is_ok() {
            return Err(BenchError::Failed(format!("latency: copy failed: {:?}", out[0])));
        }
        if i >= warmup {
            times.push(micros);
        }
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// The value at fraction `q` (0..=1) of sorted samples.
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}
