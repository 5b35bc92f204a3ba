//! `ferry bench --load compute`: the inference server's condition, a saturating compute kernel
//! on every SM while ferry copies. The kernel (`gpu/load_kernel.cu`, loaded from its committed
//! PTX) is FMA-bound with no memory traffic; a thread of its own launches it back to back on its
//! own stream, in ferry's CUDA context, each launch sized to last about [`LAUNCH_MS`] alone, and
//! times every launch with a pair of events. The load's throughput in a window is the inverse of
//! its launches' mean duration there, so the share of it the copies took is
//! `1 - alone / during`, with `alone` measured before the copies start.

use crate::bandwidth::BenchError;
use ferry::internals::cuda::{Context, DeviceBuffer, Event, Kernel, Stream};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The load kernel's PTX, generated on the GPU machine; see `gpu/load_kernel.cu`.
const LOAD_KERNEL_PTX: &str = include_str!("../../../gpu/load_kernel.ptx");
/// Threads per block of the load kernel.
const BLOCK_THREADS: u32 = 256;
/// How long one launch lasts alone: about a GEMM of a forward pass.
pub const LAUNCH_MS: f64 = 1.0;
/// Launches queued on the load's stream at once.
const IN_FLIGHT: usize = 3;
/// Waves of blocks in one launch: a GEMM of a forward pass runs many (an 8192^3 bf16 GEMM has
/// about 2048 tiles for 132 SMs), so taking a few SMs from it costs it about their share, where
/// a one-wave grid would wait a whole extra wave for the blocks they displace.
const WAVES: u32 = 16;

/// One finished launch: when the load thread saw it finish, and how long it ran on the GPU.
#[derive(Clone, Copy, Debug)]
struct Sample {
    seen: Instant,
    ms: f64,
}

/// The running load. Dropping it stops the thread after its launches drain.
pub struct ComputeLoad {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    thread: Option<JoinHandle<Result<(), BenchError>>>,
    /// Mean duration of one launch with nothing else on the GPU, in ms.
    pub alone_ms: f64,
    /// Blocks per launch ([`WAVES`] waves of every SM at the kernel's full occupancy).
    pub grid: u32,
}

impl ComputeLoad {
    /// Loads the kernel in `context`, sizes a launch to [`LAUNCH_MS`], starts the launching
    /// thread and measures the launches' duration alone for `calibrate`.
    pub fn start(context: Arc<Context>, calibrate: Duration) -> Result<ComputeLoad, BenchError> {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let thread = {
            let (stop, samples) = (stop.clone(), samples.clone());
            std::thread::Builder::new()
                .name("ferry-bench-load".into())
                .spawn(move || run(&context, &stop, &samples, ready_tx))
                .map_err(|e| BenchError::Failed(format!("starting the load thread: {e}")))?
        };
        let grid = match ready_rx.recv() {
            Ok(grid) => grid,
            Err(_) => {
                let why = thread.join().map_err(|_| BenchError::Failed("the load thread panicked".into()))?;
                return Err(why.err().unwrap_or_else(|| BenchError::Failed("the load thread ended".into())));
            }
        };
        let mut load = ComputeLoad { stop, samples, thread: Some(thread), alone_ms: 0.0, grid };
        let t0 = Instant::now();
        std::thread::sleep(calibrate);
        load.alone_ms = load
            .mean_ms(t0, Instant::now())
            .ok_or_else(|| BenchError::Failed("the load finished no launch while calibrating".into()))?;
        Ok(load)
    }

    /// Mean duration of the launches that ran entirely inside `[from, to]` (the first one seen
    /// after `from` may have started before it and is left out).
    pub fn mean_ms(&self, from: Instant, to: Instant) -> Option<f64> {
        let samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let inside: Vec<f64> = samples.iter().filter(|s| s.seen > from && s.seen <= to).skip(1).map(|s| s.ms).collect();
        (!inside.is_empty()).then(|| inside.iter().sum::<f64>() / inside.len() as f64)
    }

    /// The share of the load's throughput lost in `[from, to]`, against its rate alone; `None`
    /// when no launch ran entirely inside the window.
    pub fn loss(&self, from: Instant, to: Instant) -> Option<f64> {
        self.mean_ms(from, to).map(|during| 1.0 - self.alone_ms / during)
    }

    /// Stops the thread and reports what it failed with, if anything.
    pub fn finish(mut self) -> Result<(), BenchError> {
        self.stop_thread()
    }

    fn stop_thread(&mut self) -> Result<(), BenchError> {
        // R1: Release; pairs with A1 in run: nothing else is published through the flag.
        self.stop.store(true, Ordering::Release);
        match self.thread.take() {
            Some(thread) => thread.join().map_err(|_| BenchError::Failed("the load thread panicked".into()))?,
            None => Ok(()),
        }
    }
}

impl Drop for ComputeLoad {
    fn drop(&mut self) {
        if let Err(e) = self.stop_thread() {
            eprintln!("ferry bench: compute load: {e}");
        }
    }
}

/// The load thread: sizes a launch, reports the grid, then keeps [`IN_FLIGHT`] launches queued
/// until `stop`, recording each one's duration.
fn run(
    context: &Context,
    stop: &AtomicBool,
    samples: &Mutex<Vec<Sample>>,
    ready: std::sync::mpsc::Sender<u32>,
) -> Result<(), BenchError> {
    context.make_current()?;
    let kernel = Kernel::load(LOAD_KERNEL_PTX, "ferry_load", BLOCK_THREADS)?;
    let grid = u32::try_from(context.info.sm_count).unwrap_or(1) * kernel.blocks_per_sm * WAVES;
    let sink = DeviceBuffer::new(grid as usize * BLOCK_THREADS as usize * 4)?;
    let stream = Stream::new()?;
    let launch = |iters: u32, start: &Event, end: &Event| -> Result<(), BenchError> {
        let mut sink_ptr = sink.ptr();
        let mut iters = iters;
        let mut params = [
            (&mut sink_ptr as *mut u64).cast::<std::ffi::c_void>(),
            (&mut iters as *mut u32).cast::<std::ffi::c_void>(),
        ];
        start.record(&stream)?;
        // SAFETY: `params` matches `ferry_load(float*, unsigned int)`; the kernel writes at most
        // `grid * BLOCK_THREADS` floats into `sink`, which outlives every launch (the stream is
        // synchronized before this function returns).
        unsafe { kernel.launch(&stream, grid, &mut params)? };
        end.record(&stream)?;
        Ok(())
    };
    // Size a launch: time a short one, scale to LAUNCH_MS.
    let (start, end) = (Event::timed()?, Event::timed()?);
    let probe = 256;
    launch(probe, &start, &end)?;
    stream.synchronize()?;
    launch(probe, &start, &end)?;
    stream.synchronize()?;
    let probe_ms = f64::from(end.elapsed_ms(&start)?).max(1e-3);
    let iters = ((f64::from(probe) * LAUNCH_MS / probe_ms) as u32).max(1);
    if ready.send(grid).is_err() {
        return Ok(());
    }
    let mut queued: VecDeque<(Event, Event)> = VecDeque::with_capacity(IN_FLIGHT);
    let mut spare: Vec<(Event, Event)> = Vec::new();
    // A1: Acquire; pairs with R1 in ComputeLoad::stop_thread.
    while !stop.load(Ordering::Acquire) {
        while queued.len() < IN_FLIGHT {
            let pair = match spare.pop() {
                Some(pair) => pair,
                None => (Event::timed()?, Event::timed()?),
            };
            launch(iters, &pair.0, &pair.1)?;
            queued.push_back(pair);
        }
        let oldest = queued.front().expect("IN_FLIGHT launches queued");
        if oldest.1.is_done()? {
            let ms = f64::from(oldest.1.elapsed_ms(&oldest.0)?);
            samples.lock().unwrap_or_else(|e| e.into_inner()).push(Sample { seen: Instant::now(), ms });
            spare.push(queued.pop_front().expect("checked above"));
        } else {
            std::thread::sleep(Duration::from_micros(20));
        }
    }
    stream.synchronize()?;
    Ok(())
}
