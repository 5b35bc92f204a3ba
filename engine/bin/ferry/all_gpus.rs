//! `ferry bench --all-gpus`: one engine over every GPU of the host (issue 15): per GPU, the
//! ceiling (one large `cuMemcpyAsync`) and the engine's GB/s on scattered blocks with that GPU
//! alone moving; then every GPU moving at once, its aggregate against the sum of the per-GPU
//! figures and against the all-at-once ceiling (every GPU's large copy at the same time: where the
//! host's memory or a shared PCIe switch is the limit, that is it), all in one run.

use crate::bandwidth::{copy_ceiling, drive_queues, median_by, scatter, BenchError, Measurement};
use crate::{human, progress};
use ferry::internals::cuda::{Context, DeviceBuffer, Stream};
use ferry::{CorePlacement, GpuConfig, GpuSet, HostBuffer, Queue, QueueConfig, RegionId};
use std::sync::{Arc, Barrier};
use std::time::Instant;

/// What the whole-host bench is asked.
pub struct AllGpus {
    pub sizes: Vec<u64>,
    pub span: u64,
    pub total: u64,
    pub reps: usize,
    /// Workers per GPU.
    pub workers: usize,
}

/// One GPU's memory, host buffer and queues (on its own workers).
struct Gpu {
    context: Arc<Context>,
    /// The core its driving thread runs on when all GPUs move at once: the lowest local to the
    /// GPU that no worker and no other driving thread has (the workers take the highest; `None`:
    /// none is left, unpinned).
    client_core: Option<usize>,
    host: HostBuffer,
    device_id: RegionId,
    queues: Vec<Queue>,
    /// Freed after the engine (the caller drops the engine first).
    device: DeviceBuffer,
}

/// The directions, as (name, host to GPU).
const DIRECTIONS: [(&str, bool); 2] = [("H2D", true), ("D2H", false)];

impl Gpu {
    fn regions(&self, h2d: bool) -> (RegionId, RegionId) {
        if h2d {
            (self.host.id(), self.device_id)
        } else {
            (self.device_id, self.host.id())
        }
    }

    /// The engine moving `count` scattered blocks of `block` bytes through this GPU's queues.
    fn drive(&mut self, block: u64, count: u64, h2d: bool, span: u64) -> Result<Measurement, BenchError> {
        let plan = scatter(span as usize, block as usize, block);
        let (src, dst) = self.regions(h2d);
        drive_queues(&mut self.queues, src, dst, &plan, block, count)
    }

    /// (device, host) addresses of the whole buffers.
    fn pointers(&self) -> (u64, u64) {
        (self.device.ptr(), self.host.as_ptr() as u64)
    }
}

/// Bytes over the span from the earliest start to the latest end of runs made at once.
fn aggregate(runs: &[(Instant, Instant, u64)]) -> f64 {
    let start = runs.iter().map(|r| r.0).min().expect("a run per GPU");
    let end = runs.iter().map(|r| r.1).max().expect("a run per GPU");
    runs.iter().map(|r| r.2).sum::<u64>() as f64 / (end - start).as_secs_f64() / 1e9
}

/// Runs `work` on every GPU at once, a thread each, after `ready` there (not timed), `reps`
/// times: the median of the aggregate GB/s (the bytes `work` returns, over the span from the
/// first start to the last end).
fn at_once<R>(
    gpus: &mut [Gpu],
    reps: usize,
    ready: &(dyn Fn(&mut Gpu) -> Result<R, BenchError> + Sync),
    work: &(dyn Fn(&mut Gpu, R) -> Result<u64, BenchError> + Sync),
) -> Result<f64, BenchError> {
    let mut results = Vec::new();
    for _ in 0..reps {
        let barrier = Barrier::new(gpus.len());
        let runs = std::thread::scope(|scope| {
            let handles: Vec<_> = gpus
                .iter_mut()
                .map(|gpu| {
                    let barrier = &barrier;
                    scope.spawn(move || -> Result<(Instant, Instant, u64), BenchError> {
                        let prepared = ready(gpu);
                        // Every thread reaches the barrier, failed or not: none waits forever.
                        barrier.wait();
                        let prepared = prepared?;
                        let start = Instant::now();
                        let bytes = work(gpu, prepared)?;
                        Ok((start, Instant::now(), bytes))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("a bench thread panicked")).collect::<Result<Vec<_>, _>>()
        })?;
        results.push(aggregate(&runs));
    }
    results.sort_by(f64::total_cmp);
    Ok(results[results.len() / 2])
}

/// Every GPU's large copy at the same time (each thread its own stream): the host's
/// all-at-once ceiling in one direction.
fn ceiling_at_once(gpus: &mut [Gpu], span: u64, h2d: bool, reps: usize) -> Result<f64, BenchError> {
    let ready = |gpu: &mut Gpu| -> Result<Stream, BenchError> {
        gpu.context.make_current()?;
        Ok(Stream::new()?)
    };
    let work = |gpu: &mut Gpu, stream: Stream| -> Result<u64, BenchError> {
        let (device, host) = gpu.pointers();
        let (dst, src) = if h2d { (device, host) } else { (host, device) };
        // SAFETY: both buffers are `span` bytes, alive in `gpu`; no descriptor is pushed
        // meanwhile; synchronized before this returns.
        unsafe { stream.copy(dst, src, span as usize)? };
        stream.synchronize()?;
        Ok(span)
    };
    at_once(gpus, reps, &ready, &work)
}

/// Every GPU's engine queues moving blocks at once, each driven from a thread on its own core.
fn engine_at_once(gpus: &mut [Gpu], block: u64, count: u64, h2d: bool, o: &AllGpus) -> Result<f64, BenchError> {
    let ready = |gpu: &mut Gpu| -> Result<(), BenchError> {
        match gpu.client_core {
            Some(core) => ferry::internals::sys::pin_current_thread(core)
                .map_err(|e| BenchError::Failed(format!("pinning a driving thread to core {core}: {e}"))),
            None => Ok(()),
        }
    };
    let work = |gpu: &mut Gpu, ()| -> Result<u64, BenchError> { Ok(gpu.drive(block, count, h2d, o.span)?.bytes) };
    at_once(gpus, o.reps, &ready, &work)
}

pub fn bench_all_gpus(o: &AllGpus) -> Result<(), BenchError> {
    let gpu = GpuConfig { devices: GpuSet::All, ..GpuConfig::default() };
    let engine = crate::cuda_bench_engine(o.workers, gpu, CorePlacement::Auto)?;
    let client = engine.new_client();
    let span = o.span as usize;
    // Driving threads' cores: local to their GPU, off every worker's and this thread's core.
    let machine = ferry_topology::Machine::read(std::path::Path::new("/sys"))?;
    let mut taken: Vec<usize> = engine.worker_cores().into_iter().flatten().collect();
    taken.extend(ferry::internals::sys::pinned_cpu());
    let mut gpus = Vec::new();
    for (g, context) in engine.cuda_contexts().into_iter().enumerate() {
        context.make_current()?;
        let host = engine.allocate_host(client, span)?;
        host.fill(0, span, 0x5a)?;
        let device = DeviceBuffer::new(span)?;
        device.fill(0)?;
        // SAFETY: `device` is freed after the engine (dropped first below).
        let device_id = unsafe { engine.register_gpu(client, device.ptr(), span)? };
        let queues = (0..o.workers)
            .map(|w| {
                let config = QueueConfig {
                    submit_capacity: 16384,
                    complete_capacity: 16384,
                    gpu: Some(g),
                    worker: Some(g * o.workers + w),
                    ..QueueConfig::default()
                };
                engine.open_queue(client, config)
            })
            .collect::<Result<_, _>>()?;
        let bus = ferry::internals::cuda::sysfs_bus_id(&context.info.pci_bus_id);
        let local = machine.gpus.iter().find(|d| d.address.eq_ignore_ascii_case(&bus)).map(|d| machine.local_cpus(d));
        let client_core = local.unwrap_or_else(|| machine.online.clone()).into_iter().find(|c| !taken.contains(c));
        taken.extend(client_core);
        gpus.push(Gpu { context, client_core, host, device_id, queues, device });
    }
    let show = |c: Option<usize>| c.map_or("unpinned".into(), |c: usize| c.to_string());
    let cores: Vec<String> = engine.worker_cores().into_iter().map(show).collect();
    let clients: Vec<String> = gpus.iter().map(|g| show(g.client_core)).collect();
    println!(
        "ferry bench --all-gpus: one engine over {} GPU(s) ({}), {} worker(s) per GPU on cores {}; driving threads (all at once) on cores {}, alone this thread; {} per cell and GPU as scattered blocks, medians of {}",
        gpus.len(),
        gpus.iter().map(|g| g.context.info.name.clone()).collect::<Vec<_>>().join(", "),
        o.workers,
        cores.join(", "),
        clients.join(", "),
        human(o.total),
        o.reps
    );
    // Ceilings: each GPU alone, then all at once.
    let mut alone = Vec::new();
    for gpu in &gpus {
        gpu.context.make_current()?;
        let (device, host) = gpu.pointers();
        // SAFETY: both buffers are `span` bytes, alive in `gpu`; no descriptor is in flight.
        alone.push(unsafe { [copy_ceiling(device, host, span, o.reps)?, copy_ceiling(host, device, span, o.reps)?] });
    }
    let together =
        [ceiling_at_once(&mut gpus, o.span, true, o.reps)?, ceiling_at_once(&mut gpus, o.span, false, o.reps)?];
    println!("ceiling: one {} cuMemcpyAsync per GPU, GB/s", human(o.span));
    println!(
        "| dir | {} | sum alone | all GPUs at once |",
        (0..gpus.len()).map(|g| format!("GPU {g} alone")).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|{}---|---|", "---|".repeat(gpus.len()));
    for (d, (name, _)) in DIRECTIONS.iter().enumerate() {
        let each: Vec<String> = alone.iter().map(|a| format!("{:.2}", a[d])).collect();
        let sum: f64 = alone.iter().map(|a| a[d]).sum();
        println!("| {name} | {} | {sum:.2} | {:.2} |", each.join(" | "), together[d]);
    }
    println!();
    println!("GB/s through the engine (auto strategy), each GPU alone, then every GPU at once:");
    println!(
        "| block | dir | {} | sum alone | all at once | at once / min(sum of ceilings, ceiling at once) |",
        (0..gpus.len()).map(|g| format!("GPU {g} alone")).collect::<Vec<_>>().join(" | ")
    );
    println!("|---|---|{}---|---|---|", "---|".repeat(gpus.len()));
    for &block in &o.sizes {
        let count = (o.total / block).max(1);
        for (d, &(name, h2d)) in DIRECTIONS.iter().enumerate() {
            progress(&format!("all GPUs: {} {name}", human(block)));
            let mut each = Vec::new();
            for gpu in gpus.iter_mut() {
                let runs = (0..o.reps).map(|_| gpu.drive(block, count, h2d, o.span)).collect::<Result<_, _>>()?;
                each.push(median_by(runs, Measurement::gb_per_s).gb_per_s());
            }
            let at_once = engine_at_once(&mut gpus, block, count, h2d, o)?;
            let limit = alone.iter().map(|a| a[d]).sum::<f64>().min(together[d]);
            println!(
                "| {} | {name} | {} | {:.2} | {at_once:.2} | {:.2} |",
                human(block),
                each.iter().map(|x| format!("{x:.2}")).collect::<Vec<_>>().join(" | "),
                each.iter().sum::<f64>(),
                at_once / limit
            );
        }
    }
    // The engine goes before the device memory its regions name; each buffer is freed with its
    // own GPU's context current.
    let devices: Vec<(Arc<Context>, DeviceBuffer)> = gpus.into_iter().map(|g| (g.context, g.device)).collect();
    drop(engine);
    for (context, device) in devices {
        context.make_current()?;
        drop(device);
    }
    Ok(())
}
