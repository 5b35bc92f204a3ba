//! `ferry`: the engine's command-line tool.
//!
//! `ferry bench` measures the engine on scattered blocks and prints a table; see `ferry help`.

mod all_gpus;
mod bandwidth;
mod crossover;
mod doctor;
#[cfg(feature = "gdr")]
mod gdr_baseline;
mod load;
mod plot;
mod serve;
mod serve_bench;
mod stat;
mod topo;

use bandwidth::{
    client_passes, copy_ceiling, copy_ceiling_both, copy_latency, drive, drive_lanes, drive_queues, latency, median_by,
    memcpy_baseline, percentile, ring_round_trip, ring_throughput, scatter, stream_latency, BenchError, Lane,
    Measurement,
};
use ferry::internals::cuda::{gpus, Context, DeviceBuffer};
use ferry::{
    CorePlacement, CudaConfig, Engine, EngineConfig, GdrConfig, GpuConfig, QueueConfig, RouteTable, SmBudget, Strategy,
    TransportKind, UseGdr,
};
use ferry_topology::{Machine, PlanConfig};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

const USAGE: &str = "\
usage: ferry bench [options]     bandwidth table of the engine on scattered blocks
       ferry --version           version and the Cargo features compiled in (gdr)
       ferry topo [--sysfs DIR] [--workers-per-gpu N]
                                 GPU x NIC matrix (nvidia-smi topo -m classes) and the plan
       ferry doctor [--sysfs DIR]
                                 what the GPU transports need: OK / WARN / FAIL with the fix
       ferry serve [--config FILE] [--socket PATH] [--transport host|null] [--workers N]
                   [--unpinned] [--allow-uid UID]... [--quiet] [--print-config]
                                 one engine for client processes (Engine::connect) over a
                                 Unix socket (mode 0600, peer uid checked); SIGTERM stops it
       ferry stat --socket PATH [--interval SECONDS] [--count N]
                                 a running daemon's counters per client and per worker, with
                                 rates, refreshed every interval (1 s)
       ferry bench-serve [--clients N] [--descriptors N] [--rounds N]
                                 client processes through `ferry serve` (null transport)
                                 against one in-process client, alternating rounds

bench runs the engine on scattered blocks and prints block size x GB/s and descriptors/s.

bench options:
  --transport host|null|cuda|gdr
                          default: cuda where a CUDA driver and GPU are present, else host;
                          host: the worker copies with the CPU;
                          null: no data moves, measures the engine's own cost per descriptor;
                          cuda: host <-> GPU through the CUDA transport, one column per
                          strategy beside the PCIe ceiling, latency (also a stream's past a
                          stream_wait), and the SM-budget sweep;
                          gdr: RDMA WRITEs between two host regions through the GDR transport,
                          beside a raw-verbs loop on the same device (default sizes 4K,64K,
                          total 16M: sized for Soft-RoCE)
  --nic NAME              RDMA device for gdr (default: the first with an active port)
  --device N              CUDA device ordinal (default 0)
  --sm-budget N           SMs the copy kernel may use in the strategy columns, in total over
                          the workers (default 2, the engine's)
  --writers N[,N]         cuda: the resident kernel's writer gate, warps per worker copying into
                          host memory at once; two: below 16 KiB, from it up (default 16,12,
                          the engine's)
  --crossover SIZE[,SIZE] cuda: blocks from this size up go to the copy engine under auto and
                          resident, smaller ones to the SMs; two sizes: H2D,D2H (default 64K).
                          Above every --sizes, the run's closing 'crossover' line names what its
                          cells call for (calibrating another GPU: --workers 1 --load compute
                          --crossover 2M --sizes 16K,32K,64K,128K,256K,1M)
  --load none|compute     cuda: after the idle table, the table again with a saturating FMA kernel
                          on every SM (default none), with the share of its throughput each cell took
  --plot FILE.svg         cuda: draw GB/s against block size per strategy and direction, idle
                          (and under the load, dashed), with the ceilings
  --all-gpus              cuda: one engine over every GPU of the host: per GPU its ceiling and
                          the engine's GB/s alone, then every GPU at once (the aggregate against
                          the sum of the per-GPU figures and the all-at-once ceiling); one
                          worker per GPU unless --workers
  --workers N             cuda: worker threads, each with its own queue and stream, fed by
                          the one client thread (default 2 where 3 or more CPUs are online: one
                          worker's loop handles 14-22 M descriptors/s on the H200's host, and 4
                          KiB blocks at PCIe speed need 13.5 M; else 1)
  --total SIZE            bytes moved per cell, per repetition (default 1G; 256M with cuda)
  --descriptors N         descriptors per repetition with --transport null (default 20M)
  --idle-queues N         null: N more queues on the worker that never get work, beside the
                          measured one (default 0): what a worker serving many clients pays
  --span SIZE             bytes in each of the source and destination regions (default 256M)
  --sizes LIST            block sizes (default 4K,16K,64K,256K,1M)
  --reps N                repetitions per cell; the median is printed (default 5)
  --worker-core N         core of the worker (default: the topology plan's choice)
  --client-core N         core of the submitting thread (default: the lowest online CPU)
SIZE and N take K, M, G suffixes (powers of 1024 for sizes, of 1000 for counts).";

#[derive(Clone)]
struct Options {
    transport: String,
    total: u64,
    descriptors: u64,
    idle_queues: usize,
    span: u64,
    sizes: Vec<u64>,
    reps: usize,
    worker_core: Option<usize>,
    client_core: Option<usize>,
    device: u32,
    sm_budget: SmBudget,
    /// The writer gates: blocks below 16 KiB, and from it up.
    writers: [u32; 2],
    route: RouteTable,
    nic: Option<String>,
    workers: usize,
    load: bool,
    plot: Option<PathBuf>,
    all_gpus: bool,
    total_given: bool,
    transport_given: bool,
    sizes_given: bool,
}

fn parse_number(text: &str, base: u64) -> Result<u64, String> {
    let (digits, scale) = match text.char_indices().last() {
        Some((i, 'K' | 'k')) => (&text[..i], base),
        Some((i, 'M' | 'm')) => (&text[..i], base * base),
        Some((i, 'G' | 'g')) => (&text[..i], base * base * base),
        _ => (text, 1),
    };
    digits.parse::<u64>().ok().and_then(|n| n.checked_mul(scale)).ok_or_else(|| format!("not a number: {text:?}"))
}

fn parse(args: &[String]) -> Result<Options, String> {
    let mut o = Options {
        transport: String::new(),
        total: 1 << 30,
        descriptors: 20_000_000,
        idle_queues: 0,
        span: 256 << 20,
        sizes: vec![4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20],
        reps: 5,
        worker_core: None,
        client_core: None,
        device: 0,
        sm_budget: SmBudget::DEFAULT,
        writers: [CudaConfig::default().resident_writers, CudaConfig::default().resident_writers_large],
        route: RouteTable::default(),
        nic: None,
        workers: 0,
        load: false,
        plot: None,
        all_gpus: false,
        total_given: false,
        transport_given: false,
        sizes_given: false,
    };
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--transport" => {
                o.transport = value()?.clone();
                o.transport_given = true;
            }
            "--total" => {
                o.total = parse_number(value()?, 1024)?;
                o.total_given = true;
            }
            "--device" => o.device = u32::try_from(parse_number(value()?, 1000)?).map_err(|e| e.to_string())?,
            "--sm-budget" => {
                o.sm_budget = match value()?.as_str() {
                    "all" => SmBudget::All,
                    n => SmBudget::sms(u32::try_from(parse_number(n, 1000)?).map_err(|e| e.to_string())?)
                        .ok_or("--sm-budget 0: give a number of SMs (at least 1) or all")?,
                }
            }
            "--writers" => {
                let warps: Vec<u32> = value()?
                    .split(',')
                    .map(|w| parse_number(w, 1000).ok().and_then(|w| u32::try_from(w).ok()).filter(|&w| w > 0))
                    .collect::<Option<_>>()
                    .unwrap_or_default();
                o.writers = match warps[..] {
                    [w] => [w, w],
                    [small, large] => [small, large],
                    _ => {
                        return Err(
                            "--writers: one number of warps, or two (below 16 KiB, from it up), each at least 1".into(),
                        )
                    }
                };
            }
            "--crossover" => {
                let sizes = value()?.split(',').map(|s| parse_number(s, 1024)).collect::<Result<Vec<_>, _>>()?;
                o.route = match sizes[..] {
                    [from] if from > 0 => RouteTable { copy_engine_from: [from, from] },
                    [h2d, d2h] if h2d > 0 && d2h > 0 => RouteTable { copy_engine_from: [h2d, d2h] },
                    _ => return Err("--crossover: one block size, or two (H2D,D2H), each at least 1 byte".into()),
                };
            }
            "--descriptors" => o.descriptors = parse_number(value()?, 1000)?,
            "--idle-queues" => o.idle_queues = usize::try_from(parse_number(value()?, 1000)?).unwrap_or(usize::MAX),
            "--span" => o.span = parse_number(value()?, 1024)?,
            "--sizes" => {
                o.sizes = value()?.split(',').map(|s| parse_number(s, 1024)).collect::<Result<_, _>>()?;
                o.sizes_given = true;
            }
            "--nic" => o.nic = Some(value()?.clone()),
            "--workers" => o.workers = parse_number(value()?, 1000)? as usize,
            "--plot" => o.plot = Some(PathBuf::from(value()?)),
            "--all-gpus" => o.all_gpus = true,
            "--load" => {
                o.load = match value()?.as_str() {
                    "none" => false,
                    "compute" => true,
                    other => return Err(format!("--load {other:?}: choose none or compute")),
                }
            }
            "--reps" => o.reps = parse_number(value()?, 1000)? as usize,
            "--worker-core" => o.worker_core = Some(parse_number(value()?, 1000)? as usize),
            "--client-core" => o.client_core = Some(parse_number(value()?, 1000)? as usize),
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    if o.transport.is_empty() {
        o.transport = match default_transport() {
            Ok(()) => "cuda".into(),
            Err(_) => "host".into(),
        };
    }
    if !matches!(o.transport.as_str(), "host" | "null" | "cuda" | "gdr") {
        return Err(format!("--transport {:?}: choose host, null, cuda or gdr", o.transport));
    }
    if o.transport == "cuda" && !o.total_given {
        o.total = 256 << 20;
    }
    if o.transport == "gdr" {
        if !o.total_given {
            o.total = 16 << 20;
        }
        if !o.sizes_given {
            o.sizes = vec![4 << 10, 64 << 10];
        }
        if o.span == 256 << 20 {
            o.span = 64 << 20;
        }
    }
    if o.all_gpus && o.transport != "cuda" {
        let why = match (o.transport_given, default_transport()) {
            (false, Err(e)) => format!(" (no GPU transport can run here: {e})"),
            _ => String::new(),
        };
        return Err(format!("--all-gpus works only with the cuda transport{why}"));
    }
    if o.workers > 1 && o.transport != "cuda" {
        return Err("--workers above 1 works only with --transport cuda".into());
    }
    if o.reps == 0 || o.sizes.is_empty() || o.sizes.iter().any(|&s| s == 0 || s > o.span) {
        return Err("--reps must be at least 1 and every block size between 1 and --span".into());
    }
    Ok(o)
}

fn human(bytes: u64) -> String {
    match bytes {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{} GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{} MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{} KiB", b >> 10),
        b => format!("{b} B"),
    }
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into())
}

/// Whether the CUDA transport can run here: `Err` says why not.
fn default_transport() -> Result<(), String> {
    gpus().map(drop).map_err(|e| e.to_string())
}

/// Why the host transport runs, in words.
fn transport_reason(o: &Options) -> String {
    if o.transport_given {
        return "asked for with --transport host".into();
    }
    match default_transport() {
        Ok(()) => "asked for".into(),
        Err(why) => format!("no GPU transport can run here: {why}"),
    }
}

fn start_engine(transport: TransportKind, worker: Option<usize>) -> Result<Engine, ferry::Error> {
    let cores = match worker {
        Some(core) => CorePlacement::Cores(vec![core]),
        None => CorePlacement::Auto,
    };
    Engine::start(EngineConfig { transport, cores, max_len: 1 << 30, ..EngineConfig::default() })
}

fn show(core: Option<usize>) -> String {
    core.map_or("unpinned".into(), |c| format!("core {c}"))
}

/// Two engine-allocated host regions of `span` bytes, every page touched once (so that no run
/// pays for first faults), and a queue, for one new client.
fn host_pair(
    engine: &Engine,
    span: usize,
) -> Result<(ferry::HostBuffer, ferry::HostBuffer, ferry::Queue), ferry::Error> {
    let client = engine.new_client();
    let src = engine.allocate_host(client, span)?;
    let dst = engine.allocate_host(client, span)?;
    src.fill(0, span, 0x5a)?;
    dst.fill(0, span, 0)?;
    Ok((src, dst, engine.open_queue(client, QueueConfig::default())?))
}

fn bench(o: &Options) -> Result<(), BenchError> {
    let machine = Machine::read(Path::new("/sys"))?;
    // The client first, so that automatic placement keeps the worker off its core.
    let client = o.client_core.or_else(|| machine.online.first().copied().filter(|_| machine.online.len() > 1));
    if let Some(core) = client {
        ferry::internals::sys::pin_current_thread(core)
            .map_err(|e| BenchError::Failed(format!("pinning the client thread to core {core}: {e}")))?;
    }
    if o.transport == "cuda" && o.all_gpus {
        let workers = o.workers.max(1);
        let all = all_gpus::AllGpus { sizes: o.sizes.clone(), span: o.span, total: o.total, reps: o.reps, workers };
        return all_gpus::bench_all_gpus(&all);
    }
    if o.transport == "cuda" {
        return bench_cuda(o, &machine, client);
    }
    if o.transport == "gdr" {
        return bench_gdr(o, &machine, client);
    }
    let (kind, reason) = match o.transport.as_str() {
        "null" => (TransportKind::Null, "asked for with --transport null: no data moves".to_owned()),
        _ => (TransportKind::Host, transport_reason(o)),
    };
    let engine = start_engine(kind, o.worker_core)?;
    let worker = engine.worker_cores()[0];
    println!("ferry bench: transport {} ({reason})", engine.transport_name());
    println!(
        "machine: {}, {} online CPUs; worker on {}, client on {}; median of {} runs",
        cpu_model(),
        machine.online.len(),
        show(worker),
        show(client),
        o.reps
    );
    for note in engine.placement_notes() {
        println!("placement: {note}");
    }
    let span = o.span as usize;
    let (src, dst, mut queue) = host_pair(&engine, span)?;
    if o.transport == "null" {
        let idle_client = engine.new_client();
        let _idle_queues = (0..o.idle_queues)
            .map(|_| engine.open_queue(idle_client, QueueConfig::default().with_capacities(16, 16)))
            .collect::<Result<Vec<_>, _>>()?;
        let ring = median_by(
            (0..o.reps).map(|_| ring_throughput(o.descriptors, client, worker)).collect::<Result<_, _>>()?,
            Measurement::per_s,
        );
        let plan = scatter(span, 4096, 1);
        let (stats, client_before) = (engine.stats(), client_passes());
        let runs = (0..o.reps)
            .map(|_| drive(&mut queue, src.id(), dst.id(), &plan, 4096, o.descriptors))
            .collect::<Result<_, _>>()?;
        let (stats_after, client_after) = (engine.stats(), client_passes());
        let engine_run = median_by(runs, Measurement::per_s);
        println!(
            "{} descriptors per run, 4 KiB each, {} idle queues beside the measured one",
            o.descriptors, o.idle_queues
        );
        println!("{:<46} {:>14}", "path", "descriptors/s");
        println!("{:<46} {:>14.0}", "raw ring push/pop (two threads, no engine)", ring.per_s());
        println!("{:<46} {:>14.0}", "engine: ring -> worker -> null -> completion", engine_run.per_s());
        println!("engine / raw ring: {:.2}", engine_run.per_s() / ring.per_s());
        let share = |idle: u64, all: u64| 100.0 * idle as f64 / all.max(1) as f64;
        println!(
            "loop passes that found no work: the worker's {:.0} %, the submitting thread's {:.0} %",
            share(
                stats_after[0].idle_iterations - stats[0].idle_iterations,
                stats_after[0].iterations - stats[0].iterations
            ),
            share(client_after.1 - client_before.1, client_after.0 - client_before.0)
        );
        // The engine's own round trip, what every transport's latency adds to its copy's, beside
        // the same two cores' handoffs through raw rings.
        let t = latency(&mut queue, src.id(), dst.id(), 4096, 500, 5000)?;
        let raw = ring_round_trip(500, 5000, client, worker)?;
        println!(
            "latency of one descriptor, push to completion (no data moves): p50 {:.2} us, p99 {:.2} us; raw rings there and back between the same cores: p50 {:.2} us, p99 {:.2} us",
            percentile(&t, 0.5),
            percentile(&t, 0.99),
            percentile(&raw, 0.5),
            percentile(&raw, 0.99)
        );
        return Ok(());
    }
    println!("{} moved per cell as scattered blocks in two {} regions", human(o.total), human(o.span));
    println!(
        "{:>8} {:>12} {:>15} {:>12} {:>14}",
        "block", "engine GB/s", "descriptors/s", "memcpy GB/s", "engine/memcpy"
    );
    for &block in &o.sizes {
        let plan = scatter(span, block as usize, block);
        let count = (o.total / block).max(1);
        let engine_runs = (0..o.reps)
            .map(|_| drive(&mut queue, src.id(), dst.id(), &plan, block, count))
            .collect::<Result<_, _>>()?;
        let memcpy_runs = (0..o.reps).map(|_| memcpy_baseline(&src, &dst, &plan, block, count)).collect();
        let e = median_by(engine_runs, Measurement::gb_per_s);
        let m = median_by(memcpy_runs, Measurement::gb_per_s);
        println!(
            "{:>8} {:>12.2} {:>15.0} {:>12.2} {:>14.2}",
            human(block),
            e.gb_per_s(),
            e.per_s(),
            m.gb_per_s(),
            e.gb_per_s() / m.gb_per_s()
        );
    }
    Ok(())
}

/// The GDR transport between two host regions, beside a raw-verbs loop on the same device.
#[cfg(feature = "gdr")]
fn bench_gdr(o: &Options, machine: &Machine, client: Option<usize>) -> Result<(), BenchError> {
    use ferry::internals::nic::Nic;
    use gdr_baseline as baseline;
    let gdr = GdrConfig { use_gdr: UseGdr::On, nic: o.nic.clone(), ..GdrConfig::default() };
    let cores = match o.worker_core {
        Some(core) => CorePlacement::Cores(vec![core]),
        None => CorePlacement::Auto,
    };
    let config = EngineConfig {
        transport: TransportKind::Gpu(GpuConfig { gdr: gdr.clone(), ..GpuConfig::default() }),
        cores,
        max_len: 1 << 30,
        ..EngineConfig::default()
    };
    let engine = Engine::start(config)?;
    let nic_name = engine.nic_name().unwrap_or_default();
    let worker = engine.worker_cores()[0];
    println!("ferry bench: transport {} on {nic_name}", engine.transport_name());
    println!(
        "machine: {}, {} online CPUs; worker on {}, client on {}; raw verbs loop on the client's thread; median of {} runs",
        cpu_model(),
        machine.online.len(),
        show(worker),
        show(client),
        o.reps
    );
    for note in engine.transport_notes().iter().chain(engine.placement_notes()) {
        println!("note: {note}");
    }
    let span = o.span as usize;
    let (src, dst, mut queue) = host_pair(&engine, span)?;
    // The baseline's own registrations of the same memory, on its own context of the device.
    let raw_nic = Nic::open(&GdrConfig { nic: Some(nic_name.clone()), ..gdr.clone() }, None)?;
    // SAFETY: `src` and `dst` outlive these registrations (dropped at the end of this function,
    // before the buffers, which are declared earlier).
    let (src_mr, dst_mr) =
        unsafe { (raw_nic.register(src.as_ptr() as u64, span)?, raw_nic.register(dst.as_ptr() as u64, span)?) };
    let raw_src = baseline::Side { addr: src.as_ptr() as u64, key: src_mr.lkey() };
    let raw_dst = baseline::Side { addr: dst.as_ptr() as u64, key: dst_mr.rkey() };
    println!(
        "{} moved per cell as scattered blocks in two {} regions; chains of {}, one completion per {}",
        human(o.total),
        human(o.span),
        gdr.chain,
        gdr.signal_every
    );
    println!(
        "{:>8} {:>12} {:>14} {:>12} {:>14} {:>10} {:>9} {:>9}",
        "block", "raw writes/s", "engine writes/s", "raw GB/s", "engine GB/s", "engine/raw", "WR/bell", "WR/CQE"
    );
    for &block in &o.sizes {
        let plan = scatter(span, block as usize, block);
        let count = (o.total / block).max(1);
        // Raw and engine runs alternate, so that both see the same phases of a noisy machine.
        let (mut raw_runs, mut engine_runs) = (Vec::new(), Vec::new());
        let before = engine.stats()[0].nic.unwrap_or_default();
        for _ in 0..o.reps {
            let chain = gdr.chain;
            let every = gdr.signal_every as u64;
            raw_runs.push(
                baseline::raw_writes(&raw_nic, raw_src, raw_dst, &plan, block, count, chain, every, 1024)
                    .map_err(BenchError::Failed)?,
            );
            engine_runs.push(drive(&mut queue, src.id(), dst.id(), &plan, block, count)?);
        }
        let after = engine.stats()[0].nic.unwrap_or_default();
        let raw = median_by(raw_runs, Measurement::per_s);
        let e = median_by(engine_runs, Measurement::per_s);
        let wrs = (after.work_requests - before.work_requests) as f64;
        println!(
            "{:>8} {:>12.0} {:>14.0} {:>12.3} {:>14.3} {:>10.2} {:>9.1} {:>9.1}",
            human(block),
            raw.per_s(),
            e.per_s(),
            raw.gb_per_s(),
            e.gb_per_s(),
            e.per_s() / raw.per_s(),
            wrs / (after.doorbells - before.doorbells).max(1) as f64,
            wrs / (after.completions - before.completions).max(1) as f64
        );
    }
    let times = latency(&mut queue, src.id(), dst.id(), 4096, 200, 2000)?;
    println!(
        "latency of one 4 KiB descriptor, push to completion: p50 {:.1} us, p99 {:.1} us",
        percentile(&times, 0.5),
        percentile(&times, 0.99)
    );
    println!("NIC counters of the run: {:?}", engine.stats()[0].nic.unwrap_or_default());
    Ok(())
}

#[cfg(not(feature = "gdr"))]
fn bench_gdr(_o: &Options, _machine: &Machine, _client: Option<usize>) -> Result<(), BenchError> {
    Err(BenchError::Failed("ferry was built without the `gdr` Cargo feature".into()))
}

/// One CUDA engine with its two regions: pinned host memory and device memory of `span` bytes,
/// and one queue per worker.
struct CudaRig {
    engine: Engine,
    queues: Vec<ferry::Queue>,
    /// Shares of the workers' loop iterations that found nothing to do, and of the submitting
    /// thread's passes that moved nothing, in the last `run`.
    idle: [f64; 2],
    host: ferry::HostBuffer,
    device_id: ferry::RegionId,
    /// Dropped after the engine (fields drop in order): no copy can touch it any more.
    device: DeviceBuffer,
    /// Keeps the primary context alive until `device` is freed.
    _context: std::sync::Arc<Context>,
}

/// `sm_budget` is the total over `workers` workers (each gets an equal share).
fn cuda_rig(o: &Options, strategy: Strategy, sm_budget: SmBudget, workers: usize) -> Result<CudaRig, BenchError> {
    cuda_rig_with(o, CudaConfig { strategy, sm_budget, ..CudaConfig::default() }, workers)
}

/// An engine of the CUDA benches: the CUDA driver's copies on `gpu` (GDR has its own bench,
/// --transport gdr), long bursts, descriptors up to 1 GiB.
fn cuda_bench_engine(workers: usize, gpu: GpuConfig, cores: CorePlacement) -> Result<Engine, ferry::Error> {
    let gpu = GpuConfig { gdr: GdrConfig { use_gdr: UseGdr::Off, ..GdrConfig::default() }, ..gpu };
    Engine::start(EngineConfig {
        workers,
        transport: TransportKind::Gpu(gpu),
        cores,
        burst: 256,
        max_len: 1 << 30,
        ..EngineConfig::default()
    })
}

fn cuda_rig_with(o: &Options, cuda: CudaConfig, workers: usize) -> Result<CudaRig, BenchError> {
    let cuda =
        CudaConfig { resident_writers: o.writers[0], resident_writers_large: o.writers[1], route: o.route, ..cuda };
    let cores = match o.worker_core {
        Some(core) if workers == 1 => CorePlacement::Cores(vec![core]),
        Some(core) => CorePlacement::Cores((core..core + workers).collect()),
        None => CorePlacement::Auto,
    };
    let engine = cuda_bench_engine(workers, GpuConfig { device: o.device, cuda, ..GpuConfig::default() }, cores)?;
    let client = engine.new_client();
    let span = o.span as usize;
    let host = engine.allocate_host(client, span)?;
    host.fill(0, span, 0x5a)?;
    let device = DeviceBuffer::new(span)?;
    device.fill(0)?;
    // SAFETY: `device` lives in the rig beside the engine, which is dropped first.
    let device_id = unsafe { engine.register_gpu(client, device.ptr(), span)? };
    // A deep queue: under load the transport batches at least 4 MiB while another batch runs, so
    // at 4 KiB the two batches on the stream and the one filling need more than 4096 descriptors.
    let queues = (0..workers)
        .map(|w| {
            engine.open_queue(
                client,
                QueueConfig {
                    submit_capacity: 16384,
                    complete_capacity: 16384,
                    worker: Some(w),
                    ..QueueConfig::default()
                },
            )
        })
        .collect::<Result<_, _>>()?;
    let _context = engine.cuda_context().expect("a cuda engine has a context").clone();
    Ok(CudaRig { engine, queues, idle: [0.0; 2], host, device_id, device, _context })
}

impl CudaRig {
    fn run(&mut self, o: &Options, block: u64, h2d: bool) -> Result<Measurement, BenchError> {
        let plan = scatter(o.span as usize, block as usize, block);
        let count = (o.total / block).max(1);
        let (src, dst) = if h2d { (self.host.id(), self.device_id) } else { (self.device_id, self.host.id()) };
        let sum = |stats: Vec<ferry::EngineStats>| {
            stats.iter().fold((0, 0), |(i, d), s| (i + s.iterations, d + s.idle_iterations))
        };
        let before = sum(self.engine.stats());
        let client_before = client_passes();
        let runs = (0..o.reps)
            .map(|_| drive_queues(&mut self.queues, src, dst, &plan, block, count))
            .collect::<Result<_, _>>()?;
        let after = sum(self.engine.stats());
        let client_after = client_passes();
        self.idle = [
            (after.1 - before.1) as f64 / (after.0 - before.0).max(1) as f64,
            (client_after.1 - client_before.1) as f64 / (client_after.0 - client_before.0).max(1) as f64,
        ];
        Ok(median_by(runs, Measurement::gb_per_s))
    }

    /// Both directions at once: half the blocks host to GPU (the first half of each region), half
    /// GPU to host (the second half), interleaved on the same queues.
    fn run_both(&mut self, o: &Options, block: u64) -> Result<Measurement, BenchError> {
        let half = o.span / 2;
        let plan = scatter(half as usize, block as usize, block);
        let count = (o.total / block).max(2);
        let (host, device) = (self.host.id(), self.device_id);
        let lanes = [
            Lane { src: host, dst: device, src_base: 0, dst_base: 0 },
            Lane { src: device, dst: host, src_base: half, dst_base: half },
        ];
        let runs = (0..o.reps)
            .map(|_| drive_lanes(&mut self.queues, &lanes, &plan, block, count))
            .collect::<Result<_, _>>()?;
        Ok(median_by(runs, Measurement::gb_per_s))
    }

    /// The one-way ceilings [H2D, D2H] and the two-way one: one `span`-byte copy each way, then
    /// one each way at once, on fresh streams, median of at least 5.
    fn ceilings(&self, o: &Options) -> Result<[f64; 3], BenchError> {
        let (host, device, span) = (self.host.as_ptr() as u64, self.device.ptr(), o.span as usize);
        let reps = o.reps.max(5);
        let half = span / 2;
        // SAFETY: both buffers are `span` bytes, alive in the rig, and no copy of the engine
        // touches them while no descriptor is pushed; the two-way copies use disjoint halves.
        unsafe {
            Ok([
                copy_ceiling(device, host, span, reps)?,
                copy_ceiling(host, device, span, reps)?,
                copy_ceiling_both((device, host), (host + half as u64, device + half as u64), half, reps)?,
            ])
        }
    }
}

/// Rounds of 500 samples each of ferry's latency and the driver's, taken in turns.
const LATENCY_ROUNDS: usize = 10;

/// The 4 KiB latency lines of `rig`'s engine (its strategy named `strategy`): push to
/// completion each way, in turns with `cuMemcpyAsync` + synchronize, and stream ordering.
fn latency_lines(rig: &mut CudaRig, strategy: &str) -> Result<Vec<String>, BenchError> {
    let mut latencies = Vec::new();
    for (h2d, name) in [(true, "H2D"), (false, "D2H")] {
        let (src, dst) = if h2d { (rig.host.id(), rig.device_id) } else { (rig.device_id, rig.host.id()) };
        let (host, device) = (rig.host.as_ptr() as u64, rig.device.ptr());
        let (to, from) = if h2d { (device, host) } else { (host, device) };
        // Taken in turns, 500 samples of each at a time, so that both see the same machine: the
        // VM's speed drifts within a call (the two medians taken one after the other, 5000 each,
        // differed by 0.2 to 2.2 us between calls of the same build, eighth session).
        let (mut t, mut raw) = (Vec::new(), Vec::new());
        for round in 0..LATENCY_ROUNDS {
            let warmup = if round == 0 { 500 } else { 50 };
            t.extend(latency(&mut rig.queues[0], src, dst, 4096, warmup, 500)?);
            // SAFETY: 4 KiB at the start of both buffers, alive in the rig; no descriptor is in flight.
            raw.extend(unsafe { copy_latency(to, from, 4096, warmup, 500)? });
        }
        t.sort_by(f64::total_cmp);
        raw.sort_by(f64::total_cmp);
        latencies.push(format!(
        "latency of one 4 KiB descriptor, push to completion ({strategy}), {name}: p50 {:.2} us, p99 {:.2} us; one cuMemcpyAsync + synchronize: p50 {:.2} us, p99 {:.2} us (in turns, {LATENCY_ROUNDS} x 500 each)",
        percentile(&t, 0.5),
        percentile(&t, 0.99),
        percentile(&raw, 0.5),
        percentile(&raw, 0.99)
    ));
    }
    // Stream ordering: a stream already waiting (stream_wait) for one 4 KiB H2D descriptor.
    let d = ferry::Descriptor::copy(rig.host.id(), 0, rig.device_id, 0, 4096);
    latencies.push(match stream_latency(&rig.engine, &mut rig.queues[0], d, 200, 2000) {
    Ok((pushed, seen)) => format!(
        "stream ordering ({strategy}), one 4 KiB H2D a stream waits for: push -> the stream past stream_wait p50 {:.2} us, p99 {:.2} us; the completion seen -> the stream past it p50 {:.2} us, p99 {:.2} us",
        percentile(&pushed, 0.5),
        percentile(&pushed, 0.99),
        percentile(&seen, 0.5),
        percentile(&seen, 0.99)
    ),
    Err(e) => format!("stream ordering latency ({strategy}): not measured ({e})"),
});
    Ok(latencies)
}

fn bench_cuda(o: &Options, machine: &Machine, client: Option<usize>) -> Result<(), BenchError> {
    let workers = match o.workers {
        0 if machine.online.len() >= 3 => 2,
        0 => 1,
        n => n,
    };
    let o = &Options { workers, ..o.clone() };
    let strategies = Strategy::ALL;
    let mut rig = cuda_rig(o, Strategy::Auto, o.sm_budget, 1)?;
    let ctx = rig.engine.cuda_context().expect("cuda engine").clone();
    println!(
        "ferry bench: transport cuda on GPU {} ({}, {} SMs, driver {})",
        ctx.info.ordinal, ctx.info.name, ctx.info.sm_count, ctx.driver_version
    );
    println!(
        "machine: {}, {} online CPUs; latency worker on {}, client on {}; median of {} runs; {} per cell as scattered blocks",
        cpu_model(),
        machine.online.len(),
        show(rig.engine.worker_cores()[0]),
        show(client),
        o.reps,
        human(o.total)
    );
    // The ceilings are measured before and after the table; the higher median of the two is
    // used, so a disturbed reading can only lower ferry's ratios, never raise them.
    let before = rig.ceilings(o)?;
    let mut latencies = latency_lines(&mut rig, "auto")?;
    drop(rig);
    // The same with the resident kernel taking every lone block (launched by the first, then
    // kept running by the next within its idle time): what a queue whose blocks keep coming sees.
    let mut rig = cuda_rig(o, Strategy::Resident, o.sm_budget, 1)?;
    latencies.extend(latency_lines(&mut rig, "resident")?);
    drop(rig);
    // One engine per strategy; results[strategy][size][direction].
    let mut results = Vec::new();
    let mut idle = Vec::new();
    let mut worker_cores = Vec::new();
    for &strategy in &strategies {
        let mut rig = cuda_rig(o, strategy, o.sm_budget, o.workers)?;
        worker_cores = rig.engine.worker_cores();
        let mut cells = Vec::new();
        for &block in &o.sizes {
            let h2d = rig.run(o, block, true)?.gb_per_s();
            let h2d_idle = rig.idle;
            cells.push([h2d, rig.run(o, block, false)?.gb_per_s()]);
            if matches!(strategy, Strategy::Auto | Strategy::Resident) {
                idle.push((strategy, block, [h2d_idle, rig.idle]));
            }
        }
        results.push(cells);
    }
    // Both directions at once, per strategy that batches: results_both[strategy][size].
    let both_strategies = [Strategy::Batch, Strategy::Kernel, Strategy::Resident, Strategy::Auto];
    let mut results_both = Vec::new();
    for &strategy in &both_strategies {
        progress(&format!("both directions: {}", strategy.name()));
        let mut rig = cuda_rig(o, strategy, o.sm_budget, o.workers)?;
        results_both
            .push(o.sizes.iter().map(|&b| Ok(rig.run_both(o, b)?.gb_per_s())).collect::<Result<Vec<_>, BenchError>>()?);
    }
    let after = cuda_rig(o, Strategy::Auto, o.sm_budget, 1)?.ceilings(o)?;
    let ceiling = [before[0].max(after[0]), before[1].max(after[1]), before[2].max(after[2])];
    let mut sweep = Vec::new();
    let all = ctx.info.sm_count as u32;
    for sms in [1, 2, 4, 8, 16, all] {
        let budget = SmBudget::sms(sms).expect("at least one SM");
        let mut rig = cuda_rig(o, Strategy::Kernel, budget, o.workers.min(sms as usize))?;
        sweep.push((sms, rig.run(o, 4096, true)?.gb_per_s(), rig.run(o, 4096, false)?.gb_per_s()));
    }
    println!(
        "ceiling: one {} cuMemcpyAsync, median of {}, measured before and after the table, the higher used:",
        human(o.span),
        o.reps.max(5)
    );
    println!("  H2D {:.2} GB/s (before {:.2}, after {:.2})", ceiling[0], before[0], after[0]);
    println!("  D2H {:.2} GB/s (before {:.2}, after {:.2})", ceiling[1], before[1], after[1]);
    println!(
        "  both ways at once (two streams, {} each way) {:.2} GB/s (before {:.2}, after {:.2})",
        human(o.span / 2),
        ceiling[2],
        before[2],
        after[2]
    );
    println!();
    let cores: Vec<String> = worker_cores.iter().map(|&c| show(c)).collect();
    println!(
        "GB/s through the engine (descriptor ring -> worker -> CUDA -> completion), kernel on at most {} SMs, {} worker(s) on {}; copy engine from {} (H2D / D2H) blocks, writer gate {} / {} warps (below / from 16 KiB)",
        o.sm_budget,
        o.workers,
        cores.join(", "),
        o.route.copy_engine_from.map(human).join(" / "),
        o.writers[0],
        o.writers[1]
    );
    let auto = strategies.iter().position(|&s| s == Strategy::Auto).expect("auto is a strategy");
    print!("{:>8} {:>4}", "block", "dir");
    for s in &strategies {
        print!(" {:>8}", s.name());
    }
    println!(" {:>8} {:>11}", "ceiling", "auto/ceil");
    for (i, &block) in o.sizes.iter().enumerate() {
        for (d, name) in ["H2D", "D2H"].iter().enumerate() {
            print!("{:>8} {:>4}", human(block), name);
            for cells in &results {
                print!(" {:>8.2}", cells[i][d]);
            }
            println!(" {:>8.2} {:>11.2}", ceiling[d], results[auto][i][d] / ceiling[d]);
        }
    }
    for (i, &block) in o.sizes.iter().enumerate() {
        print!("{:>8} {:>4}", human(block), "both");
        for strategy in &strategies {
            match both_strategies.iter().position(|b| b == strategy) {
                Some(k) => print!(" {:>8.2}", results_both[k][i]),
                None => print!(" {:>8}", "-"),
            }
        }
        println!(" {:>8.2} {:>11.2}", ceiling[2], results_both[3][i] / ceiling[2]);
    }
    println!(
        "loop passes that found no work, the worker's / the submitting thread's (H2D; D2H; counts, not time: such passes are short):"
    );
    for strategy in [Strategy::Auto, Strategy::Resident] {
        let cells: Vec<String> = idle
            .iter()
            .filter(|(s, ..)| *s == strategy)
            .map(|(_, b, [h, d])| {
                let pct = |f: f64| f * 100.0;
                format!("{} {:.0} / {:.0} %; {:.0} / {:.0} %", human(*b), pct(h[0]), pct(h[1]), pct(d[0]), pct(d[1]))
            })
            .collect();
        println!("  {:<9}{}", strategy.name(), cells.join(",  "));
    }
    println!();
    println!("kernel strategy, 4 KiB blocks, GB/s against the SM budget (in total over the workers)");
    println!("{:>8} {:>8} {:>8} {:>10}", "SMs", "H2D", "D2H", "H2D/ceil");
    for (sms, h2d, d2h) in &sweep {
        println!("{:>8} {:>8.2} {:>8.2} {:>10.2}", sms, h2d, d2h, h2d / ceiling[0]);
    }
    println!();
    for line in latencies {
        println!("{line}");
    }
    let loaded = if o.load {
        println!();
        Some(bench_cuda_under_load(o, &ctx, ceiling)?)
    } else {
        None
    };
    println!();
    println!("{}", crossover_line(o, &strategies, &results, loaded.as_deref(), ceiling));
    if let Some(path) = &o.plot {
        let svg = plot_svg(o, &ctx, &strategies, &results, loaded.as_deref(), ceiling);
        std::fs::write(path, svg)
            .map_err(|e| BenchError::Failed(format!("writing the plot to {}: {e}", path.display())))?;
        println!("plot: {}", path.display());
    }
    Ok(())
}

/// The crossover this run's cells call for (`crossover.rs`): `batch` against `resident`, idle
/// and under the load where it ran; only where the `resident` column is the SMs' path at every
/// size (the run's crossover above its largest size).
fn crossover_line(
    o: &Options,
    strategies: &[Strategy],
    idle: &[Vec<[f64; 2]>],
    loaded: Option<&[Vec<LoadedCell>]>,
    ceiling: [f64; 3],
) -> String {
    let largest = o.sizes.iter().copied().max().unwrap_or(0);
    if o.sm_budget == SmBudget::None || o.route.copy_engine_from.iter().any(|&from| from <= largest) {
        return format!(
            "crossover: not derived from this run (the resident column takes the copy engine from {}); to derive it: --crossover above {} and an SM budget",
            o.route.copy_engine_from.map(human).join(" / "),
            human(largest)
        );
    }
    let column = |name: &str| strategies.iter().position(|s| s.name() == name).expect("a strategy");
    let loaded_column = |name: &str| LOADED_COLUMNS.iter().position(|c| c.2 == name).expect("a column");
    let found: Vec<String> = ["H2D", "D2H"]
        .iter()
        .enumerate()
        .map(|(d, dir)| {
            let rates = |cells: &[[f64; 2]]| cells.iter().map(|c| c[d]).collect::<Vec<f64>>();
            let (engine, sms) = (rates(&idle[column("batch")]), rates(&idle[column("resident")]));
            let mut conditions = vec![crossover::Rates { engine: &engine, sms: &sms, cost: None }];
            // Under the load: rates, and the load's loss (not a number where it was not measured).
            let under = loaded.map(|l| {
                let (batch, resident) = (&l[loaded_column("batch")], &l[loaded_column("resident")]);
                let rate = |cells: &[LoadedCell]| cells.iter().map(|c| c[d].0).collect::<Vec<f64>>();
                let loss =
                    |cells: &[LoadedCell]| cells.iter().map(|c| c[d].1.unwrap_or(f64::NAN)).collect::<Vec<f64>>();
                [rate(batch), rate(resident), loss(batch), loss(resident)]
            });
            if let Some([engine, sms, engine_loss, sms_loss]) = &under {
                let cost = crossover::Cost { engine: engine_loss, sms: sms_loss, ceiling: ceiling[d] };
                conditions.push(crossover::Rates { engine, sms, cost: Some(cost) });
            }
            match crossover::crossover(&o.sizes, &conditions) {
                Some(from) => format!("{dir} {}", human(from)),
                None => format!("{dir} above {}", human(largest)),
            }
        })
        .collect();
    format!(
        "crossover these cells call for (the smallest block size from which the copy engine, `batch`, moves at least {:.2} of the SMs, `resident`, at every larger size, idle{}): {} (the default: {}; pass it as --crossover, CudaConfig::route or ferry_config.copy_engine_from_h2d/_d2h)",
        1.0 - crossover::SLACK,
        if loaded.is_some() {
            format!(
                " and under the load, or there at least {:.2} of the ceiling where the SMs take more than {:.0} % of the load and it does not",
                crossover::FLOOR,
                crossover::LOSS_BUDGET * 100.0
            )
        } else {
            String::new()
        },
        found.join(", "),
        RouteTable::default().copy_engine_from.map(human).join(" / ")
    )
}

/// One cell of the under-load table: [H2D, D2H, both ways] as (GB/s, share of the load lost).
type LoadedCell = [(f64, Option<f64>); 3];
/// The under-load table: per column, per block size.
type LoadedResults = Vec<Vec<LoadedCell>>;

/// The `--plot` picture: a panel per direction, each strategy idle (solid) and under the load
/// (dashed), with the ceiling.
fn plot_svg(
    o: &Options,
    ctx: &Context,
    strategies: &[Strategy],
    idle: &[Vec<[f64; 2]>],
    loaded: Option<&[Vec<LoadedCell>]>,
    ceiling: [f64; 3],
) -> String {
    let colour = |name: &str| LOADED_COLUMNS.iter().position(|c| c.2 == name).unwrap_or(0);
    let panels = ["host to GPU", "GPU to host"]
        .iter()
        .enumerate()
        .map(|(d, title)| {
            let mut series: Vec<plot::Series> = strategies
                .iter()
                .zip(idle)
                .map(|(s, cells)| plot::Series {
                    name: format!("{} idle", s.name()),
                    colour: colour(s.name()),
                    dashed: false,
                    values: cells.iter().map(|c| c[d]).collect(),
                })
                .collect();
            for (column, cells) in LOADED_COLUMNS.iter().zip(loaded.unwrap_or_default()) {
                series.push(plot::Series {
                    name: format!("{} under load", column.2),
                    colour: colour(column.2),
                    dashed: true,
                    values: cells.iter().map(|c| c[d].0).collect(),
                });
            }
            plot::Panel { title: (*title).to_owned(), ceiling: ceiling[d], series }
        })
        .collect::<Vec<_>>();
    let title = format!(
        "ferry bench on {} ({} worker(s), {} SMs for the kernel): GB/s through the engine{}",
        ctx.info.name,
        o.workers,
        o.sm_budget,
        if loaded.is_some() { "; dashed: under an FMA kernel on every SM" } else { "" }
    );
    plot::render(&title, &o.sizes, &panels)
}

/// The columns of the under-load table: each strategy; `auto` again with the live SM budget at
/// none (what a server sets during prefill). (Highest-priority streams were a column once: they
/// changed nothing, bench/results/h200.md.)
const LOADED_COLUMNS: [(Strategy, Option<SmBudget>, &str); 6] = [
    (Strategy::Memcpy, None, "memcpy"),
    (Strategy::Batch, None, "batch"),
    (Strategy::Kernel, None, "kernel"),
    (Strategy::Resident, None, "resident"),
    (Strategy::Auto, None, "auto"),
    (Strategy::Auto, Some(SmBudget::None), "auto/none"),
];

/// The table again with a saturating compute kernel on every SM (`--load compute`): copy GB/s
/// and the share of the load's throughput lost while each cell copied.
fn bench_cuda_under_load(o: &Options, ctx: &Arc<Context>, ceiling: [f64; 3]) -> Result<LoadedResults, BenchError> {
    let load = load::ComputeLoad::start(ctx.clone(), Duration::from_millis(300))?;
    let before = load.alone_ms;
    // results[column][size][direction] = (GB/s, loss)
    let mut results = Vec::new();
    for &(strategy, live_budget, name) in &LOADED_COLUMNS {
        progress(&format!("under load: {name}"));
        let cuda = CudaConfig { strategy, sm_budget: o.sm_budget, ..CudaConfig::default() };
        let mut rig = cuda_rig_with(o, cuda, o.workers)?;
        if let Some(budget) = live_budget {
            rig.engine.set_sm_budget(budget)?;
        }
        let mut cells = Vec::new();
        for &block in &o.sizes {
            // [H2D, D2H, both ways at once]
            let mut cell = [(0.0, None); 3];
            for (d, lane) in cell.iter_mut().enumerate() {
                let t0 = Instant::now();
                let m = if d == 2 { rig.run_both(o, block)? } else { rig.run(o, block, d == 0)? };
                *lane = (m.gb_per_s(), load.loss(t0, Instant::now()));
            }
            cells.push(cell);
        }
        results.push(cells);
    }
    let after = {
        let t0 = Instant::now();
        std::thread::sleep(Duration::from_millis(300));
        load.mean_ms(t0, Instant::now()).unwrap_or(f64::NAN)
    };
    println!(
        "under a compute load: an FMA kernel on every SM ({} blocks of 256 threads, 16 waves), launched back to back on its own stream in ferry's CUDA context, {:.2} ms per launch alone (before the table; {:.2} after)",
        load.grid, before, after
    );
    println!(
        "GB/s through the engine (loss: the share of the load's throughput lost while the cell copied); /none: live SM budget none"
    );
    print!("{:>8} {:>4}", "block", "dir");
    for (_, _, name) in &LOADED_COLUMNS {
        print!(" {:>15}", name);
    }
    println!(" {:>11}", "best/ceil");
    for (i, &block) in o.sizes.iter().enumerate() {
        for (d, dir) in ["H2D", "D2H", "both"].iter().enumerate() {
            print!("{:>8} {:>4}", human(block), dir);
            let mut best: f64 = 0.0;
            for cells in &results {
                let (gb, loss) = cells[i][d];
                best = best.max(gb);
                match loss {
                    Some(l) => print!(" {:>7.2} ({:>4.1}%)", gb, l * 100.0),
                    None => print!(" {:>7.2} (   - )", gb),
                }
            }
            println!(" {:>11.2}", best / ceiling[d]);
        }
    }
    load.finish()?;
    Ok(results)
}

/// One line of progress on stderr, when it is a terminal.
fn progress(text: &str) {
    use std::io::IsTerminal;
    if std::io::stderr().is_terminal() {
        eprintln!("ferry bench: {text}");
    }
}

/// Options of `topo` and `doctor`: `--sysfs DIR`, `--workers-per-gpu N`.
fn report_options(args: &[String]) -> Result<(PathBuf, usize), String> {
    let (mut sysfs, mut workers) = (PathBuf::from("/sys"), 1);
    let mut it = args.iter();
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--sysfs" => sysfs = value.into(),
            "--workers-per-gpu" => workers = value.parse().map_err(|_| format!("not a number: {value:?}"))?,
            other => return Err(format!("unknown option {other:?}")),
        }
    }
    Ok((sysfs, workers))
}

fn topo(args: &[String]) -> Result<(), String> {
    let (sysfs, workers_per_gpu) = report_options(args)?;
    let machine = Machine::read(&sysfs).map_err(|e| e.to_string())?;
    let avoid: Vec<usize> = ferry::internals::sys::pinned_cpu().into_iter().collect();
    let plan = ferry_topology::plan::plan(&machine, &PlanConfig { workers_per_gpu, avoid, ..PlanConfig::default() })
        .map_err(|e| e.to_string())?;
    println!("ferry topo (sysfs {})", sysfs.display());
    print!("{}", topo::render(&machine, &plan));
    Ok(())
}

fn doctor(args: &[String]) -> Result<(), String> {
    let (sysfs, _) = report_options(args)?;
    println!("{}; doctor (sysfs {})", version_line(), sysfs.display());
    print!("{}", doctor::run(&sysfs).render());
    Ok(())
}

fn report(name: &str, result: Result<(), String>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry {name}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `ferry 0.1.0 (features: gdr)`: what a GPU machine's script checks before it trusts a bench.
fn version_line() -> String {
    let features = if ferry::FEATURES.is_empty() { "none".to_owned() } else { ferry::FEATURES.join(", ") };
    format!("ferry {} (features: {features})", env!("CARGO_PKG_VERSION"))
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("topo") => report("topo", topo(&args[1..])),
        Some("doctor") => report("doctor", doctor(&args[1..])),
        Some("bench") => match parse(&args[1..]) {
            Ok(o) => match bench(&o) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry bench: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("ferry bench: {e}\n\n{USAGE}");
                ExitCode::from(2)
            }
        },
        Some("serve") => match serve::parse(&args[1..]) {
            Ok(o) => match serve::serve(&o) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("ferry serve: {e}");
                    ExitCode::FAILURE
                }
            },
            Err(e) => {
                eprintln!("ferry serve: {e}\n\n{}", serve::USAGE);
                ExitCode::from(2)
            }
        },
        Some("stat") => match stat::run(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry stat: {e}\n\n{}", stat::USAGE);
                ExitCode::FAILURE
            }
        },
        Some("bench-serve") => match serve_bench::run(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry bench-serve: {e}\n\n{}", serve_bench::USAGE);
                ExitCode::FAILURE
            }
        },
        // A client process of bench-serve (not for people).
        Some("bench-serve-client") => match serve_bench::client(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ferry bench-serve-client: {e}");
                ExitCode::FAILURE
            }
        },
        Some("--version" | "-V" | "version") => {
            println!("{}", version_line());
            ExitCode::SUCCESS
        }
        Some("help" | "--help" | "-h") => {
            println!("{USAGE}");
            ExitCode::SUCCESS
        }
        _ => {
            eprintln!("{USAGE}");
            ExitCode::from(2)
        }
    }
}
