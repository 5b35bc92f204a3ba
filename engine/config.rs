//! Every setting of the engine, in one place: [`EngineConfig`] and what it holds (the transport
//! with its GPU, CUDA and GDR settings, core placement, idle policy), and [`QueueConfig`] for
//! one queue. Built with defaults, validated once when the engine starts ([`EngineConfig::check`]
//! for what needs no hardware; the GPU settings against the device at start).

use crate::error::Error;
use crate::transport::Transport;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

/// Builds one transport per worker, given the worker's index.
pub type TransportFactory = Arc<dyn Fn(usize) -> Box<dyn Transport> + Send + Sync>;

/// Which transport the workers run.
#[derive(Clone)]
#[non_exhaustive]
pub enum TransportKind {
    /// The CPU copies host memory ([`crate::transport::host::HostTransport`]).
    Host,
    /// Completes without moving data ([`crate::transport::null::NullTransport`]).
    Null,
    /// Host <-> GPU copies: over the NIC ([`crate::transport::gdr`]) or with the CUDA driver
    /// ([`crate::transport::cuda::CudaTransport`]), as [`GdrConfig::use_gdr`] says. With the
    /// CUDA driver, host regions are pinned and mapped for the device when registered; over the
    /// NIC, every region is registered with it.
    Gpu(GpuConfig),
    /// A caller-supplied transport, built once per worker.
    Custom(TransportFactory),
}

impl std::fmt::Debug for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportKind::Host => f.write_str("Host"),
            TransportKind::Null => f.write_str("Null"),
            TransportKind::Gpu(c) => write!(f, "Gpu({c:?})"),
            TransportKind::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// The GPU transport's settings: which GPU, how the CUDA driver copies, whether and how the NIC
/// copies.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GpuConfig {
    /// CUDA device ordinal (of the one GPU; see `devices` for several).
    pub device: u32,
    /// The engine's GPUs: [`GpuSet::One`] (`device`, the default), a list of ordinals, or every
    /// GPU the driver lists. With several, each GPU gets [`EngineConfig::workers`] workers of its
    /// own (on cores the topology plan gives that GPU), its own context and streams; every
    /// worker copies for every GPU of the engine (each copy on the streams of the GPU whose
    /// memory it touches) and [`QueueConfig::gpu`] opens a queue on one GPU's workers. GDR is
    /// not used with several GPUs yet (`use_gdr = auto` runs the CUDA driver's copies, `on` is a
    /// start-up error).
    pub devices: GpuSet,
    /// The GPU's PCI bus id (`0000:18:00.0`), optional. With a CUDA driver it must name the
    /// same GPU as `device` (checked at start); without one (GDR on host memory only) it is the
    /// GPU whose cores and NIC the topology plan gives the engine. Unset: the bus id the driver
    /// reports for `device`.
    pub bus_id: Option<String>,
    /// How the CUDA driver copies.
    pub cuda: CudaConfig,
    /// Whether copies go over the NIC, which NIC, chains and signaling.
    pub gdr: GdrConfig,
}

/// Which GPUs an engine drives ([`GpuConfig::devices`]).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum GpuSet {
    /// [`GpuConfig::device`] alone.
    #[default]
    One,
    /// These CUDA ordinals, in this order (the engine's GPU 0, 1, ...): at least one, no
    /// ordinal twice.
    List(Vec<u32>),
    /// Every GPU the CUDA driver lists, in its order.
    All,
}

impl GpuSet {
    /// Checks what needs no hardware: a list is not empty and names no ordinal twice.
    pub fn check(&self) -> Result<(), Error> {
        if let GpuSet::List(list) = self {
            if list.is_empty() {
                return Err(Error::setting("GpuConfig::devices", "an empty list", "at least one CUDA ordinal"));
            }
            if let Some(ordinal) = first_repeat(list) {
                return Err(Error::setting(
                    "GpuConfig::devices",
                    format!("{list:?}"),
                    format!("each ordinal once ({ordinal} is there twice)"),
                ));
            }
        }
        Ok(())
    }

    /// Whether this may be more than one GPU.
    pub fn is_many(&self) -> bool {
        !matches!(self, GpuSet::One)
    }
}

/// How the CUDA transport moves a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum Strategy {
    /// Route each batch (see [`crate::transport::cuda`]): a lone block by `cuMemcpyAsync`,
    /// batches of blocks from the crossover up to the copy engine, smaller ones to the resident
    /// kernel (see `Resident`; the copy kernel launched per batch where it does not load).
    #[default]
    Auto,
    /// `cuMemcpyAsync` per descriptor.
    Memcpy,
    /// `cuMemcpyBatchAsync` per batch.
    Batch,
    /// The SM copy kernel, launched per batch.
    Kernel,
    /// The resident copy kernel (launched when blocks wait for it, on the SM budget's share of
    /// SMs, fed through a ring in host memory: no launch per batch, so a busy GPU does not starve
    /// it once it runs) for blocks below [`RouteTable::copy_engine_from`], the copy engine for
    /// the others. Its SMs stay reserved while it runs; a live SM budget applies from its next
    /// launch (at least one SM while blocks wait for it).
    ///
    /// Experimental. The kernel ends by itself once it found no block for 200 us, or after
    /// [`CudaConfig::resident_life`] (20 ms; then launched again for what is left), so anything that waits for the CUDA
    /// context to go idle waits that long at most behind it: a device-wide synchronize
    /// (`cudaDeviceSynchronize`, `torch.cuda.synchronize()`), a lazy kernel load (CUDA loads
    /// kernels lazily by default), another worker's start. Each launch waits for its SMs like
    /// any kernel. `auto` sends its batches of small blocks to the same kernel.
    Resident,
}

impl Strategy {
    /// Every strategy, in the order reports list them.
    pub const ALL: [Strategy; 5] =
        [Strategy::Memcpy, Strategy::Batch, Strategy::Kernel, Strategy::Resident, Strategy::Auto];

    /// Name in reports and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Strategy::Auto => "auto",
            Strategy::Memcpy => "memcpy",
            Strategy::Batch => "batch",
            Strategy::Kernel => "kernel",
            Strategy::Resident => "resident",
        }
    }
}

/// How many SMs the copy kernel may occupy, in total over the engine's workers (each worker
/// gets an equal share; a budget smaller than the number of workers is a start-up error). Set
/// at start ([`CudaConfig::sm_budget`]) and live ([`crate::Engine::set_sm_budget`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SmBudget {
    /// Every SM of the GPU.
    All,
    /// At most this many (capped by the GPU's SM count).
    Sms(NonZeroU32),
    /// None: the copy kernel does not run; `auto` (and `kernel`) copy with the copy engine, and
    /// the GPU's SMs are all the server's.
    None,
}

impl SmBudget {
    /// The default: 2 SMs in total (so an engine of more than two workers needs a budget of its
    /// own). On the H200 the resident kernel, whose copies from host memory are staged by the TMA,
    /// moves 4-16 KiB blocks on 2 SMs at what it moves on 4 (0.9 of PCIe under a saturating
    /// compute load) for about half the load's loss (bench/results/h200.md, seventh session).
    pub const DEFAULT: SmBudget = SmBudget::Sms(NonZeroU32::new(2).unwrap());

    /// `n` SMs; `None` for 0, which is no budget at all.
    pub fn sms(n: u32) -> Option<SmBudget> {
        NonZeroU32::new(n).map(SmBudget::Sms)
    }

    /// Each of `workers` workers' share on a GPU with `sm_count` SMs (at least 1).
    pub(crate) fn per_worker(self, sm_count: u32, workers: usize) -> Result<u32, Error> {
        let workers = u32::try_from(workers).unwrap_or(u32::MAX).max(1);
        let total = match self {
            SmBudget::All => sm_count,
            SmBudget::Sms(n) => n.get().min(sm_count),
            SmBudget::None => return Ok(0),
        };
        if total < workers {
            return Err(Error::setting(
                "CudaConfig::sm_budget",
                format!("{total} SMs in total"),
                format!("at least one SM per worker ({workers} workers)"),
            ));
        }
        Ok(total / workers)
    }
}

impl Default for SmBudget {
    fn default() -> Self {
        SmBudget::DEFAULT
    }
}

impl std::fmt::Display for SmBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SmBudget::All => f.write_str("all"),
            SmBudget::Sms(n) => write!(f, "{n}"),
            SmBudget::None => f.write_str("none"),
        }
    }
}

/// Where the `auto` strategy leaves the copy kernel for the copy engine, per direction: index 0
/// host to GPU, 1 GPU to host. The measurements behind the default are in `engine/router.rs`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteTable {
    /// Batches whose mean block is at least this many bytes go to the copy engine.
    pub copy_engine_from: [u64; 2],
}

impl RouteTable {
    /// Measured on the H200 (a Hopper GPU on PCIe Gen5): the copy engine matches or beats the
    /// kernel from 64 KiB blocks up in both directions on an idle GPU and keeps its rate under a
    /// compute load; the kernel wins on an idle GPU below 64 KiB (see `engine/router.rs`).
    pub const HOPPER: RouteTable = RouteTable { copy_engine_from: [64 << 10, 64 << 10] };
}

impl Default for RouteTable {
    fn default() -> Self {
        RouteTable::HOPPER
    }
}

/// CUDA transport settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CudaConfig {
    /// Strategy.
    pub strategy: Strategy,
    /// Most SMs the copy kernel may occupy, in total over the workers.
    pub sm_budget: SmBudget,
    /// Most operations in one batch.
    pub max_batch: usize,
    /// Where `auto` switches from the copy kernel to the copy engine.
    pub route: RouteTable,
    /// How long one launch of the resident kernel (the `resident` strategy, and `auto`'s small
    /// blocks) takes new blocks before it ends and is launched again for what is left: the
    /// longest that a device-wide synchronize or a lazy kernel load waits behind a worker that is
    /// never idle (an idle one's kernel ends 200 us after its last block). Each launch waits for
    /// its SMs, so shorter costs rate under a compute load: on the H200, 5 ms moved 4-16 KiB
    /// blocks at 0.77-0.88 of PCIe where 20 ms (the default) moved them at 0.83-0.94, for the
    /// same share of the load. From 1 ms to 1 s.
    pub resident_life: Duration,
    /// The resident kernel's writer gate: at most this many of each worker's resident-kernel
    /// warps copy into host memory at once (the others wait their turn). SM stores to host memory
    /// cost a compute load beside them far more than the SMs they use, and the more warps store
    /// at once the more (`gpu/probe_sm_traffic.cu`); copies into device memory are not gated. At
    /// least 1; a value above the kernel's warps (32 per SM of the budget) leaves them ungated.
    /// It is the gate of a launch whose first tasks into host memory average below 16 KiB (from
    /// 16 KiB: `resident_writers_large`).
    pub resident_writers: u32,
    /// The writer gate of a launch whose first tasks into host memory average 16 KiB or more:
    /// fewer warps keep those blocks at the same rate (a warp holding a turn stores more of the
    /// time), for less of the load (H200, 16 KiB D2H under load: 12 warps 51.7 GB/s for 2.4 %,
    /// 16 warps 52.1 for 4.6 %; at 4 KiB 12 warps lost a tenth of the rate). At least 1.
    pub resident_writers_large: u32,
}

impl Default for CudaConfig {
    fn default() -> Self {
        CudaConfig {
            strategy: Strategy::Auto,
            sm_budget: SmBudget::DEFAULT,
            max_batch: 4096,
            route: RouteTable::HOPPER,
            resident_life: Duration::from_millis(20),
            resident_writers: 16,
            resident_writers_large: 12,
        }
    }
}

/// Whether the GPU transport runs over the NIC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum UseGdr {
    /// Never: the CUDA driver's copies.
    Off,
    /// Always: the engine's start fails, naming what is missing, when GDR cannot run.
    On,
    /// GDR when a NIC is found and a loopback self-test passes; otherwise the CUDA driver's
    /// copies, with the reason in [`crate::Engine::transport_notes`] and on stderr.
    #[default]
    Auto,
}

impl std::str::FromStr for UseGdr {
    type Err = Error;
    fn from_str(s: &str) -> Result<UseGdr, Error> {
        match s {
            "off" => Ok(UseGdr::Off),
            "on" => Ok(UseGdr::On),
            "auto" => Ok(UseGdr::Auto),
            other => Err(Error::setting("use_gdr", format!("{other:?}"), "off, on or auto")),
        }
    }
}

/// GDR settings ([`GpuConfig::gdr`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GdrConfig {
    /// Off, on or auto.
    pub use_gdr: UseGdr,
    /// RDMA device name (`mlx5_0`); `None`: the topology plan's NIC for the engine's GPU, else
    /// the first device with an active port.
    pub nic: Option<String>,
    /// Port number (from 1).
    pub port: u8,
    /// GID index; `None`: a RoCE v2 GID, routable ones first.
    pub gid_index: Option<u8>,
    /// Most work requests posted with one doorbell.
    pub chain: usize,
    /// One work request in this many asks for a completion (besides the last one before the
    /// queue would go quiet).
    pub signal_every: usize,
    /// Send-queue depth wanted (capped by the device's limit).
    pub send_queue_depth: usize,
    /// Most scatter/gather entries per work request (capped by the device's limit).
    pub max_sge: usize,
    /// Writes up to this many bytes go inline (capped by what the device grants; 0: never).
    pub inline_max: u32,
    /// Largest work request in bytes (at most 1 GiB: scatter/gather lengths are 32-bit and RDMA
    /// messages at most 2 GiB); a longer descriptor is posted as several work requests.
    pub max_wr_bytes: u64,
    /// Recoveries in a row, with no successful completion between them, after which the NIC is
    /// marked unusable.
    pub max_recoveries: u32,
}

impl Default for GdrConfig {
    fn default() -> Self {
        GdrConfig {
            use_gdr: UseGdr::Auto,
            nic: None,
            port: 1,
            gid_index: None,
            chain: 64,
            signal_every: 16,
            send_queue_depth: 1024,
            max_sge: 16,
            inline_max: 128,
            max_wr_bytes: 1 << 30,
            max_recoveries: 3,
        }
    }
}

impl GdrConfig {
    /// Checks the settings that need no device.
    pub fn check(&self) -> Result<(), Error> {
        for (setting, value) in [
            ("GdrConfig::chain", self.chain),
            ("GdrConfig::signal_every", self.signal_every),
            ("GdrConfig::max_sge", self.max_sge),
            ("GdrConfig::port", self.port.into()),
        ] {
            if value == 0 {
                return Err(Error::setting(setting, 0, "at least 1"));
            }
        }
        if self.send_queue_depth < 2 * self.signal_every.max(self.chain) {
            return Err(Error::setting(
                "GdrConfig::send_queue_depth",
                self.send_queue_depth,
                format!("at least twice chain and signal_every ({} and {})", self.chain, self.signal_every),
            ));
        }
        if self.max_wr_bytes == 0 || self.max_wr_bytes > 1 << 30 {
            return Err(Error::setting("GdrConfig::max_wr_bytes", self.max_wr_bytes, "between 1 and 1 GiB"));
        }
        Ok(())
    }
}

/// Where the worker threads run.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum CorePlacement {
    /// From the topology plan: with the GPU transport, free CPUs local to the engine's GPU
    /// (isolated ones first); otherwise free CPUs anywhere, isolated ones first,
    /// highest-numbered first. Never CPU 0, nor the CPU the calling thread is pinned to, while
    /// anything else is left (see [`crate::Engine::placement_notes`]).
    Auto,
    /// Worker `i` on core `cores[i]`; one core per worker.
    Cores(Vec<usize>),
    /// No pinning (tests on shared machines).
    Unpinned,
}

/// What a worker does when an iteration found no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum IdlePolicy {
    /// Keep spinning: the lowest latency, one core fully busy.
    Spin,
    /// After `after` empty iterations in a row, yield the CPU on each further empty one.
    Yield {
        /// Empty iterations before yielding.
        after: u32,
    },
}

/// Engine configuration.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// Worker threads.
    pub workers: usize,
    /// Their cores.
    pub cores: CorePlacement,
    /// The transport.
    pub transport: TransportKind,
    /// Most descriptors a worker takes from one queue per visit.
    pub burst: usize,
    /// Longest descriptor accepted (bytes).
    pub max_len: u64,
    /// Region table capacity (at most 65536).
    pub max_regions: usize,
    /// Idle behaviour.
    pub idle: IdlePolicy,
    /// How long shutdown, and the close of a queue, wait for copies a transport has started.
    pub shutdown_timeout: Duration,
    /// sysfs root, for the online CPU list and the topology plan.
    pub sysfs: std::path::PathBuf,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            workers: 1,
            cores: CorePlacement::Auto,
            transport: TransportKind::Host,
            burst: 64,
            max_len: 64 << 20,
            max_regions: 4096,
            idle: IdlePolicy::Spin,
            shutdown_timeout: Duration::from_secs(5),
            sysfs: "/sys".into(),
        }
    }
}

impl EngineConfig {
    /// The largest region table.
    pub const MAX_REGIONS: usize = 1 << 16;

    /// Checks every setting that needs no hardware; [`crate::Engine::start`] calls it first.
    pub fn check(&self) -> Result<(), Error> {
        if self.workers == 0 {
            return Err(Error::setting("EngineConfig::workers", 0, "at least 1"));
        }
        if self.burst == 0 {
            return Err(Error::setting("EngineConfig::burst", 0, "at least 1"));
        }
        if self.max_len == 0 {
            return Err(Error::setting("EngineConfig::max_len", 0, "at least 1"));
        }
        if self.max_regions == 0 || self.max_regions > Self::MAX_REGIONS {
            return Err(Error::setting(
                "EngineConfig::max_regions",
                self.max_regions,
                format!("between 1 and {}", Self::MAX_REGIONS),
            ));
        }
        let many = matches!(&self.transport, TransportKind::Gpu(g) if g.devices.is_many());
        if let CorePlacement::Cores(cores) = &self.cores {
            // With several GPUs the count (workers times GPUs) is checked at start.
            if cores.len() != self.workers && !many {
                return Err(Error::setting(
                    "EngineConfig::cores",
                    format!("{} cores", cores.len()),
                    format!("one core per worker ({} workers)", self.workers),
                ));
            }
            if let Some(core) = first_repeat(cores) {
                return Err(Error::setting(
                    "EngineConfig::cores",
                    format!("{cores:?}"),
                    format!("without core {core} twice"),
                ));
            }
        }
        if let TransportKind::Gpu(gpu) = &self.transport {
            if gpu.cuda.max_batch == 0 {
                return Err(Error::setting("CudaConfig::max_batch", 0, "at least 1"));
            }
            let life = gpu.cuda.resident_life;
            if !(Duration::from_millis(1)..=Duration::from_secs(1)).contains(&life) {
                return Err(Error::setting("CudaConfig::resident_life", format!("{life:?}"), "from 1 ms to 1 s"));
            }
            if gpu.cuda.resident_writers == 0 {
                return Err(Error::setting("CudaConfig::resident_writers", 0, "at least 1"));
            }
            if gpu.cuda.resident_writers_large == 0 {
                return Err(Error::setting("CudaConfig::resident_writers_large", 0, "at least 1"));
            }
            if matches!(gpu.cuda.strategy, Strategy::Kernel | Strategy::Resident)
                && gpu.cuda.sm_budget == SmBudget::None
            {
                return Err(Error::setting(
                    "CudaConfig::sm_budget",
                    SmBudget::None,
                    "at least one SM with the kernel and resident strategies",
                ));
            }
            if gpu.gdr.use_gdr != UseGdr::Off {
                gpu.gdr.check()?;
            }
            gpu.devices.check()?;
            if many {
                let refuse =
                    |setting: &'static str, value: String, rule: &str| Err(Error::setting(setting, value, rule));
                if gpu.bus_id.is_some() {
                    return refuse(
                        "GpuConfig::bus_id",
                        format!("{:?}", gpu.bus_id),
                        "unset with several GPUs (devices)",
                    );
                }
                if gpu.gdr.use_gdr == UseGdr::On {
                    return refuse(
                        "GdrConfig::use_gdr",
                        "on".into(),
                        "off or auto with several GPUs (GDR drives one GPU so far)",
                    );
                }
                if gpu.cuda.strategy == Strategy::Resident {
                    return refuse("CudaConfig::strategy", "resident".into(), "another strategy with several GPUs");
                }
            }
        }
        Ok(())
    }
}

/// Ring sizes of a new queue, and its worker.
#[derive(Clone, Copy, Debug)]
pub struct QueueConfig {
    /// Submission ring slots (a power of two). Also the most descriptors one queue has in flight.
    pub submit_capacity: u64,
    /// Completion ring slots (a power of two).
    pub complete_capacity: u64,
    /// Worker to serve the queue; `None` picks the worker with the fewest queues (of `gpu`'s
    /// workers when it is set).
    pub worker: Option<usize>,
    /// On an engine with several GPUs ([`GpuConfig::devices`]): the engine GPU (0 for the
    /// first of its list) whose workers serve the queue; `None`: any worker. Its descriptors may
    /// still name memory of every GPU of the engine.
    pub gpu: Option<usize>,
    /// How long a gate descriptor ([`crate::Descriptor::gate`]) holds the queue before it
    /// completes as [`crate::Status::GateTimeout`] and the queue goes on (default 10 s).
    pub gate_timeout: std::time::Duration,
    /// Close the queue when the process holding its client end has died (killed, crashed),
    /// as if it had closed it: the worker looks every [`CLIENT_CHECK_INTERVAL`] and frees the
    /// queue once its started copies are over. Off by default: a queue whose holder died can
    /// then be attached again (taken over) by another process.
    pub close_if_client_dies: bool,
}

impl QueueConfig {
    /// These ring capacities, each 0 keeping the one already set (C, Python and the daemon's
    /// protocol spell "the default" as 0).
    pub fn with_capacities(self, submit_capacity: u64, complete_capacity: u64) -> QueueConfig {
        let or = |v: u64, current: u64| if v == 0 { current } else { v };
        QueueConfig {
            submit_capacity: or(submit_capacity, self.submit_capacity),
            complete_capacity: or(complete_capacity, self.complete_capacity),
            ..self
        }
    }
}

/// How often a worker looks whether the holders of its `close_if_client_dies` queues are alive.
pub const CLIENT_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(20);

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            submit_capacity: 4096,
            complete_capacity: 4096,
            worker: None,
            gpu: None,
            gate_timeout: std::time::Duration::from_secs(10),
            close_if_client_dies: false,
        }
    }
}

/// The first element of `list` that an earlier one equals.
fn first_repeat<T: PartialEq>(list: &[T]) -> Option<&T> {
    list.iter().enumerate().find(|&(i, x)| list[..i].contains(x)).map(|(_, x)| x)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sm_budget_is_a_total_split_over_the_workers() {
        let eight = SmBudget::sms(8).unwrap();
        assert_eq!(eight.per_worker(132, 1).unwrap(), 8);
        assert_eq!(eight.per_worker(132, 2).unwrap(), 4);
        assert_eq!(eight.per_worker(4, 1).unwrap(), 4, "capped by the GPU's SMs");
        assert_eq!(SmBudget::All.per_worker(132, 2).unwrap(), 66);
        assert!(SmBudget::sms(1).unwrap().per_worker(132, 2).is_err(), "fewer SMs than workers");
        assert_eq!(SmBudget::sms(0), None, "0 is no budget: not expressible");
        assert_eq!(SmBudget::default(), SmBudget::sms(2).unwrap());
        assert_eq!(SmBudget::None.per_worker(132, 4).unwrap(), 0, "no SMs, whatever the workers");
    }

    #[test]
    fn check_rejects_each_bad_setting() {
        let ok = EngineConfig::default();
        ok.check().unwrap();
        let bad = [
            EngineConfig { workers: 0, ..ok.clone() },
            EngineConfig { burst: 0, ..ok.clone() },
            EngineConfig { max_len: 0, ..ok.clone() },
            EngineConfig { max_regions: 0, ..ok.clone() },
            EngineConfig { max_regions: (1 << 16) + 1, ..ok.clone() },
            EngineConfig { cores: CorePlacement::Cores(vec![1, 2]), ..ok.clone() },
            EngineConfig { workers: 2, cores: CorePlacement::Cores(vec![1, 1]), ..ok.clone() },
            EngineConfig {
                transport: TransportKind::Gpu(GpuConfig {
                    gdr: GdrConfig { chain: 0, ..GdrConfig::default() },
                    ..GpuConfig::default()
                }),
                ..ok.clone()
            },
        ];
        let life = |resident_life| EngineConfig {
            transport: TransportKind::Gpu(GpuConfig {
                cuda: CudaConfig { resident_life, ..CudaConfig::default() },
                ..GpuConfig::default()
            }),
            ..ok.clone()
        };
        let writers = |resident_writers, resident_writers_large| EngineConfig {
            transport: TransportKind::Gpu(GpuConfig {
                cuda: CudaConfig { resident_writers, resident_writers_large, ..CudaConfig::default() },
                ..GpuConfig::default()
            }),
            ..ok.clone()
        };
        let bad = bad.into_iter().chain([
            life(Duration::from_micros(999)),
            life(Duration::from_millis(1001)),
            writers(0, 12),
            writers(16, 0),
        ]);
        for edge in [Duration::from_millis(1), Duration::from_secs(1)] {
            life(edge).check().unwrap();
        }
        for config in bad {
            assert!(matches!(config.check(), Err(Error::InvalidSetting { .. })), "{config:?}");
        }
    }

    #[test]
    fn several_gpus_are_checked_before_any_hardware() {
        let gpus = |devices: GpuSet, tune: fn(GpuConfig) -> GpuConfig| EngineConfig {
            transport: TransportKind::Gpu(tune(GpuConfig { devices, ..GpuConfig::default() })),
            ..EngineConfig::default()
        };
        let same = |g: GpuConfig| g;
        for good in [gpus(GpuSet::All, same), gpus(GpuSet::List(vec![3, 0, 1]), same)] {
            good.check().unwrap();
        }
        // With several GPUs the core list covers every GPU's workers: checked at start.
        EngineConfig { cores: CorePlacement::Cores(vec![4, 5, 6]), ..gpus(GpuSet::All, same) }.check().unwrap();
        let bad = [
            (gpus(GpuSet::List(vec![]), same), "at least one"),
            (gpus(GpuSet::List(vec![0, 2, 0]), same), "0 is there twice"),
            (gpus(GpuSet::All, |g| GpuConfig { bus_id: Some("0000:18:00.0".into()), ..g }), "unset with several"),
            (
                gpus(GpuSet::All, |g| GpuConfig { gdr: GdrConfig { use_gdr: UseGdr::On, ..g.gdr }, ..g }),
                "GDR drives one GPU",
            ),
            (
                gpus(GpuSet::All, |g| GpuConfig { cuda: CudaConfig { strategy: Strategy::Resident, ..g.cuda }, ..g }),
                "another strategy",
            ),
        ];
        for (config, why) in bad {
            match config.check() {
                Err(e @ Error::InvalidSetting { .. }) => assert!(e.to_string().contains(why), "{e}"),
                other => panic!("{config:?}: expected a refusal naming {why:?}, got {other:?}"),
            }
        }
    }
}
