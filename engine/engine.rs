//! The engine: configuration, start-up, the control plane (clients, regions, queues) and
//! shutdown.

use crate::cuda::{Context, Driver, HostRegistration};
use crate::error::Error;
use crate::queue::{Queue, QueueConfig, QueueId, QueueMemory, WorkerEnd};
use crate::region::check_range;
use crate::region::Keep;
use crate::region::{ClientId, HostBuffer, MemoryKind, NicKeys, RegionTable};
use crate::ring::shm::SharedMemory;
use crate::transport::cuda::{CudaConfig, CudaTransport};
use crate::transport::gdr::{GdrConfig, NicCounters, NicStats, UseGdr};
use crate::transport::{host::HostTransport, null::NullTransport, Transport};
use crate::worker::{Mailbox, Worker};
use crate::RegionId;
use ferry_topology::cpu::format_cpulist;
use ferry_topology::plan::{host_cores, plan, PlanConfig};
use ferry_topology::Machine;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Builds one transport per worker, given the worker's index.
pub type TransportFactory = Arc<dyn Fn(usize) -> Box<dyn Transport> + Send + Sync>;

/// Which transport the workers run.
#[derive(Clone)]
pub enum TransportKind {
    /// The CPU copies host memory ([`crate::transport::host::HostTransport`]).
    Host,
    /// Completes without moving data ([`crate::transport::null::NullTransport`]).
    Null,
    /// Host <-> GPU copies: over the NIC ([`crate::transport::gdr`]) or with the CUDA driver
    /// ([`crate::transport::cuda::CudaTransport`]), as [`EngineConfig::gdr`]'s `use_gdr` says.
    /// With the CUDA driver, host regions are pinned and mapped for the device when registered;
    /// over the NIC, every region is registered with it.
    Cuda(CudaConfig),
    /// A caller-supplied transport, built once per worker.
    Custom(TransportFactory),
}

impl std::fmt::Debug for TransportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TransportKind::Host => f.write_str("Host"),
            TransportKind::Null => f.write_str("Null"),
            TransportKind::Cuda(c) => write!(f, "Cuda({c:?})"),
            TransportKind::Custom(_) => f.write_str("Custom(..)"),
        }
    }
}

/// Where the worker threads run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CorePlacement {
    /// From the topology plan: with [`EngineConfig::gpu`] set, free CPUs local to that GPU
    /// (isolated ones first); otherwise free CPUs anywhere, isolated ones first, highest-numbered
    /// first. Never CPU 0, nor the CPU the calling thread is pinned to, while anything else is
    /// left (see [`Engine::placement_notes`]).
    Auto,
    /// Worker `i` on core `cores[i]`; one core per worker.
    Cores(Vec<usize>),
    /// No pinning (tests on shared machines).
    Unpinned,
}

/// What a worker does when an iteration found no work.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// How long shutdown waits for copies a transport has started.
    pub shutdown_timeout: Duration,
    /// sysfs root, for the online CPU list and the topology plan.
    pub sysfs: std::path::PathBuf,
    /// PCI bus id (`0000:18:00.0`) of the GPU this engine serves, for [`CorePlacement::Auto`]
    /// and the NIC choice.
    pub gpu: Option<String>,
    /// GPUDirect RDMA settings, used with [`TransportKind::Cuda`]: whether copies go over the
    /// NIC (`use_gdr`), which NIC, chains and signaling.
    pub gdr: GdrConfig,
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
            gpu: None,
            gdr: GdrConfig::default(),
        }
    }
}

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
    /// The NIC's counters, when the worker runs the GDR transport.
    pub nic: Option<NicStats>,
}

/// What an engine-allocated host region keeps alive. Fields drop in order: the NIC registration
/// and the pinning are released before the mapping goes away.
struct HostKeep {
    _nic: Option<Keep>,
    _pin: Option<HostRegistration>,
    _memory: Arc<SharedMemory>,
}

struct WorkerHandle {
    thread: JoinHandle<()>,
    mailbox: Arc<Mailbox>,
    counters: Arc<WorkerCounters>,
    nic_counters: Option<Arc<NicCounters>>,
    core: Option<usize>,
    queues: AtomicU32,
}

/// A running engine. Dropping it shuts it down (see [`Engine::shutdown`]).
pub struct Engine {
    table: Arc<RegionTable>,
    workers: Vec<WorkerHandle>,
    stop: Arc<AtomicBool>,
    next_client: AtomicU32,
    next_queue: AtomicU32,
    transport_name: &'static str,
    placement_notes: Vec<String>,
    /// The device context when the transport is CUDA, or GDR with a CUDA driver (registration
    /// pins, checks and exports with it).
    cuda: Option<Arc<Context>>,
    /// The NIC, when the workers run the GDR transport (registration registers with it).
    nic: Option<Nic>,
    gdr_mode: UseGdr,
    transport_notes: Vec<String>,
    /// Serialises queue creation so that each queue lands on one worker exactly once.
    queue_lock: Mutex<()>,
}

impl Engine {
    /// Starts the workers. Each pins itself before this returns; any failure stops the others
    /// and is returned.
    pub fn start(config: EngineConfig) -> Result<Engine, Error> {
        if config.workers == 0 {
            return Err(Error::Config("workers must be at least 1".into()));
        }
        if config.burst == 0 {
            return Err(Error::Config("burst must be at least 1".into()));
        }
        if config.max_regions == 0 || config.max_regions > 1 << 16 {
            return Err(Error::Config(format!(
                "max_regions is {}; it must be between 1 and 65536",
                config.max_regions
            )));
        }
        let mut config = config;
        let mut transport_notes = Vec::new();
        let (cuda, nic) = match &config.transport {
            TransportKind::Cuda(c) => {
                let c = *c;
                choose_device_transport(&mut config, &c, &mut transport_notes)?
            }
            _ => (None, None),
        };
        let (cores, placement_notes) = place_workers(&config)?;
        let table = Arc::new(RegionTable::new(config.max_regions, config.workers));
        let stop = Arc::new(AtomicBool::new(false));
        let mut engine = Engine {
            table: table.clone(),
            workers: Vec::with_capacity(config.workers),
            stop: stop.clone(),
            next_client: AtomicU32::new(1),
            next_queue: AtomicU32::new(1),
            transport_name: "",
            placement_notes,
            cuda: cuda.clone(),
            nic: nic.clone(),
            gdr_mode: config.gdr.use_gdr,
            transport_notes,
            queue_lock: Mutex::new(()),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for (index, core) in cores.into_iter().enumerate() {
            let mut nic_counters = None;
            let transport: Box<dyn Transport> = match &config.transport {
                TransportKind::Host => Box::new(HostTransport::new()),
                TransportKind::Null => Box::new(NullTransport::new()),
                TransportKind::Cuda(c) => match &nic {
                    Some(nic) => {
                        let counters = Arc::new(NicCounters::default());
                        nic_counters = Some(counters.clone());
                        // Under auto, a NIC marked unusable hands over to the CUDA driver.
                        let fallback = match (&cuda, config.gdr.use_gdr) {
                            (Some(context), UseGdr::Auto) => {
                                Some(Box::new(CudaTransport::new(context.clone(), *c)) as Box<dyn Transport>)
                            }
                            _ => None,
                        };
                        gdr_transport(nic, &config.gdr, counters, fallback)
                    }
                    None => Box::new(CudaTransport::new(cuda.clone().expect("loaded when not on the NIC"), *c)),
                },
                TransportKind::Custom(factory) => factory(index),
            };
            engine.transport_name = transport.name();
            let mailbox = Arc::new(Mailbox::default());
            let counters = Arc::new(WorkerCounters::default());
            let mut worker = Worker {
                index,
                table: table.clone(),
                transport,
                mailbox: mailbox.clone(),
                stop: stop.clone(),
                counters: counters.clone(),
                burst: config.burst,
                max_len: config.max_len,
                idle: config.idle,
                shutdown_timeout: config.shutdown_timeout,
            };
            let ready = ready_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("ferry-worker-{index}"))
                .spawn(move || {
                    let pinned = match core {
                        Some(core) => crate::sys::pin_current_thread(core).map_err(|source| Error::PinWorker {
                            worker: index,
                            core,
                            source,
                        }),
                        None => Ok(()),
                    };
                    let started = pinned.and_then(|()| {
                        let transport = worker.transport.name();
                        worker.transport.start().map_err(|reason| Error::TransportStart {
                            worker: index,
                            transport,
                            reason,
                        })
                    });
                    let ok = started.is_ok();
                    let _ = ready.send(started);
                    if ok {
                        worker.run();
                    }
                })
                .map_err(|source| Error::SpawnWorker { worker: index, source })?;
            engine.workers.push(WorkerHandle {
                thread,
                mailbox,
                counters,
                nic_counters,
                core,
                queues: AtomicU32::new(0),
            });
        }
        drop(ready_tx);
        for _ in 0..engine.workers.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e), // Drop stops and joins the workers started so far.
                Err(_) => return Err(Error::Config("a worker thread exited during start-up".into())),
            }
        }
        Ok(engine)
    }

    /// Name of the transport the workers run ("host", "null", ...).
    pub fn transport_name(&self) -> &'static str {
        self.transport_name
    }

    /// The core each worker is pinned to (`None`: unpinned).
    pub fn worker_cores(&self) -> Vec<Option<usize>> {
        self.workers.iter().map(|w| w.core).collect()
    }

    /// What automatic placement had to settle for (for example a worker on CPU 0).
    pub fn placement_notes(&self) -> &[String] {
        &self.placement_notes
    }

    /// Why the transport is what it is, where that was a choice (`use_gdr = auto` falling back
    /// to the CUDA driver, and its reason). Each note was also printed to stderr at start.
    pub fn transport_notes(&self) -> &[String] {
        &self.transport_notes
    }

    /// The RDMA device the workers post to, when they run the GDR transport.
    pub fn nic_name(&self) -> Option<String> {
        nic_name(self.nic.as_ref())
    }

    /// A new client id. Regions and queues belong to a client.
    pub fn new_client(&self) -> ClientId {
        // Relaxed: a unique-id counter, orders nothing.
        ClientId(self.next_client.fetch_add(1, Ordering::Relaxed))
    }

    /// Allocates `len` bytes of host memory (a sealed memfd, shareable with another process)
    /// and registers it for `client`. With the CUDA transport it is also pinned and mapped for
    /// the device.
    pub fn allocate_host(&self, client: ClientId, len: usize) -> Result<HostBuffer, Error> {
        let memory = SharedMemory::create("ferry-region", len)
            .map_err(|source| Error::SharedMemory { what: "a host region", source })?;
        let memory = Arc::new(memory);
        // SAFETY: `keep` holds the mapping as long as the registration (the pinning drops first).
        let pin = unsafe { self.pin_host(memory.as_ptr(), len)? };
        // SAFETY: as above: the registration drops before the mapping.
        let (keys, nic) = unsafe { self.register_with_nic(memory.as_ptr() as u64, len, None)? };
        let keep: Keep = Box::new(HostKeep { _nic: nic, _pin: pin, _memory: memory.clone() });
        let id = self.table.register(client, MemoryKind::Host, memory.as_ptr() as u64, len as u64, keys, Some(keep))?;
        Ok(HostBuffer::new(id, memory))
    }

    /// Registers `len` bytes of the caller's host memory at `ptr` for `client` (pinned and
    /// mapped for the device with the CUDA transport, unless already pinned).
    ///
    /// # Safety
    /// The memory must stay valid for reads and writes until [`Engine::deregister`] returns
    /// `Ok` for this region (or the engine is dropped), and must not be accessed while a copy
    /// that uses it is in flight.
    pub unsafe fn register_host(&self, client: ClientId, ptr: *mut u8, len: usize) -> Result<RegionId, Error> {
        check_range(ptr as u64, len as u64)?;
        // SAFETY: the caller keeps the memory valid until deregistration, when `pin` drops.
        let pin = unsafe { self.pin_host(ptr, len)? };
        // SAFETY: the caller keeps the memory valid until deregistration, when `keep` drops.
        let (keys, nic) = unsafe { self.register_with_nic(ptr as u64, len, None)? };
        // Tuple fields drop in order: the NIC registration before the pinning.
        let keep: Keep = Box::new((nic, pin));
        self.table.register(client, MemoryKind::Host, ptr as u64, len as u64, keys, Some(keep))
    }

    /// Pins host memory for the CUDA device, unless the engine has none or it is pinned already.
    ///
    /// # Safety
    /// The memory must stay mapped while the returned registration lives.
    unsafe fn pin_host(&self, ptr: *mut u8, len: usize) -> Result<Option<HostRegistration>, Error> {
        let Some(ctx) = &self.cuda else { return Ok(None) };
        if self.nic.is_some() && self.gdr_mode != UseGdr::Auto {
            // The NIC registration pins the pages and CUDA never touches them. (Under auto the
            // CUDA driver may take over from a failed NIC, so they are pinned for it too.)
            return Ok(None);
        }
        ctx.make_current()?;
        if let Ok(info) = ctx.pointer_info(ptr as u64) {
            if info.memory_type == crate::cuda::MEMORY_TYPE_HOST {
                return Ok(None); // pinned by its owner (cudaHostAlloc, cudaHostRegister, a framework)
            }
        }
        // SAFETY: forwarded from the caller.
        Ok(Some(unsafe { HostRegistration::new(ctx.clone(), ptr, len)? }))
    }

    /// Registers `len` bytes of GPU memory at device address `ptr` (from `cuMemAlloc` or a
    /// framework's allocator) for `client`. The whole range must be device memory of the
    /// engine's GPU, inside one allocation. Needs the CUDA transport.
    ///
    /// # Safety
    /// The allocation must stay valid until [`Engine::deregister`] returns `Ok` for the region.
    pub unsafe fn register_gpu(&self, client: ClientId, ptr: u64, len: usize) -> Result<RegionId, Error> {
        let bad = |reason: String| Error::GpuRange { addr: ptr, len: len as u64, reason };
        let ctx = self.cuda.as_ref().ok_or_else(|| {
            bad(if self.nic.is_some() {
                "the engine runs the GDR transport without a CUDA driver (see Engine::transport_notes)".into()
            } else {
                "the engine does not run the cuda transport".into()
            })
        })?;
        ctx.make_current()?;
        if len == 0 {
            return Err(bad("zero length".into()));
        }
        let info = ctx.pointer_info(ptr).map_err(|e| bad(format!("the driver does not know this address ({e})")))?;
        if info.memory_type != crate::cuda::MEMORY_TYPE_DEVICE {
            return Err(bad(format!("memory type {} is not device memory", info.memory_type)));
        }
        if info.ordinal != ctx.info.ordinal {
            return Err(bad(format!(
                "the memory is on CUDA device {}, the engine serves device {}",
                info.ordinal, ctx.info.ordinal
            )));
        }
        let end = ptr.checked_add(len as u64).ok_or_else(|| bad("range wraps the address space".into()))?;
        if ptr < info.range_start || end > info.range_start + info.range_size {
            return Err(bad(format!(
                "the range runs past its allocation ({} bytes at {:#x})",
                info.range_size, info.range_start
            )));
        }
        // SAFETY: the caller keeps the allocation valid until deregistration, when `nic` drops.
        let (keys, nic) = unsafe { self.register_with_nic(ptr, len, Some(&info)) }
            .map_err(|e| bad(format!("registering it with the NIC: {e}")))?;
        self.table.register(client, MemoryKind::Gpu, ptr, len as u64, keys, nic)
    }

    /// Registers memory with the NIC when the workers run the GDR transport; `gpu`: what the
    /// CUDA driver says of device memory (exported as a dma-buf first, else registered by its
    /// device pointer, which needs nvidia-peermem).
    ///
    /// # Safety
    /// The memory must stay valid while the returned registration lives.
    unsafe fn register_with_nic(
        &self,
        addr: u64,
        len: usize,
        gpu: Option<&crate::cuda::PointerInfo>,
    ) -> Result<(NicKeys, Option<Keep>), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { nic_register(self.nic.as_ref(), self.cuda.as_deref(), addr, len, gpu) }
    }

    /// The CUDA device context, when the engine runs the CUDA transport.
    pub fn cuda_context(&self) -> Option<&Arc<Context>> {
        self.cuda.as_ref()
    }

    /// Fault injection for tests: gives a region's NIC registration a remote key the NIC does
    /// not know, as if that registration were gone while the region stays registered with the
    /// engine. Copies writing into it then fail on the NIC (a remote access error), which is
    /// how the GDR transport's recovery is tested.
    #[doc(hidden)]
    pub fn inject_stale_remote_key(&self, id: RegionId) -> Result<(), Error> {
        let keys = self.table.keys(id).ok_or(Error::UnknownRegion { id })?;
        self.table.set_keys(id, NicKeys { rkey: keys.rkey ^ 0x00ff_ff00, ..keys })
    }

    /// Fault injection for tests: as [`Engine::inject_stale_remote_key`], for the local key, so
    /// copies reading from the region fail on the NIC (a local protection error).
    #[doc(hidden)]
    pub fn inject_stale_local_key(&self, id: RegionId) -> Result<(), Error> {
        let keys = self.table.keys(id).ok_or(Error::UnknownRegion { id })?;
        self.table.set_keys(id, NicKeys { lkey: keys.lkey ^ 0x00ff_ff00, ..keys })
    }

    /// Deregisters a region. Refused with [`Error::RegionBusy`] while copies that use it are
    /// in flight; it never waits for them.
    pub fn deregister(&self, id: RegionId) -> Result<(), Error> {
        self.table.deregister(id)
    }

    /// Opens a queue for `client`, served by one worker.
    pub fn open_queue(&self, client: ClientId, config: QueueConfig) -> Result<Queue, Error> {
        // A6: Acquire; pairs with R6 in stop.
        if self.stop.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        let _guard = self.queue_lock.lock().unwrap_or_else(|e| e.into_inner());
        let worker = match config.worker {
            Some(w) if w < self.workers.len() => w,
            Some(w) => {
                return Err(Error::Config(format!(
                    "QueueConfig::worker is {w}, but the engine has {} workers",
                    self.workers.len()
                )))
            }
            // Relaxed: read and written under queue_lock.
            None => {
                (0..self.workers.len()).min_by_key(|&w| self.workers[w].queues.load(Ordering::Relaxed)).unwrap_or(0)
            }
        };
        // Relaxed: a unique-id counter.
        let id = QueueId(self.next_queue.fetch_add(1, Ordering::Relaxed));
        let memory = QueueMemory::create(id, client.0, &config)?;
        let attached = QueueMemory::attach(
            memory.file().try_clone().map_err(|source| Error::SharedMemory { what: "a queue", source })?,
        )?;
        let queue = Queue::from_memory(attached)?;
        self.workers[worker].mailbox.post(WorkerEnd::new(memory, client.0)?);
        // Relaxed: under queue_lock.
        self.workers[worker].queues.fetch_add(1, Ordering::Relaxed);
        Ok(queue)
    }

    /// Counters of each worker.
    pub fn stats(&self) -> Vec<EngineStats> {
        self.workers
            .iter()
            .map(|w| EngineStats {
                // Relaxed: statistics.
                iterations: w.counters.iterations.load(Ordering::Relaxed),
                idle_iterations: w.counters.idle_iterations.load(Ordering::Relaxed),
                descriptors: w.counters.descriptors.load(Ordering::Relaxed),
                transport_completions: w.counters.completions.load(Ordering::Relaxed),
                nic: w.nic_counters.as_ref().map(|c| c.snapshot()),
            })
            .collect()
    }

    /// Stops the workers and waits for them: copies the transport started complete, descriptors
    /// still in submission rings complete as [`crate::Status::Cancelled`] where the completion
    /// ring has room, and every queue is marked [`crate::QueueState::Closed`].
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        // R6: Release; pairs with S1 in the worker loop and A6 in open_queue.
        self.stop.store(true, Ordering::Release);
        for worker in self.workers.drain(..) {
            if worker.thread.join().is_err() {
                eprintln!("ferry: a worker thread panicked");
            }
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The core for each worker (`None`: unpinned), checked against the online CPUs, and notes on
/// fallbacks taken.
fn place_workers(config: &EngineConfig) -> Result<(Vec<Option<usize>>, Vec<String>), Error> {
    match &config.cores {
        CorePlacement::Unpinned => Ok((vec![None; config.workers], Vec::new())),
        CorePlacement::Cores(cores) => {
            if cores.len() != config.workers {
                return Err(Error::Config(format!("{} cores given for {} workers", cores.len(), config.workers)));
            }
            let online = ferry_topology::cpu::online_cpus(Path::new(&config.sysfs))?;
            for (worker, &core) in cores.iter().enumerate() {
                if !online.contains(&core) {
                    return Err(Error::CoreOffline { worker, core, online: format_cpulist(&online) });
                }
                if cores[..worker].contains(&core) {
                    return Err(Error::Config(format!("core {core} is given to two workers")));
                }
            }
            Ok((cores.iter().map(|&c| Some(c)).collect(), Vec::new()))
        }
        CorePlacement::Auto => {
            let machine = Machine::read(Path::new(&config.sysfs))?;
            let avoid: Vec<usize> = crate::sys::pinned_cpu().into_iter().collect();
            let (cores, notes) = match &config.gpu {
                Some(bus) => {
                    let planned =
                        plan(&machine, &PlanConfig { workers_per_gpu: config.workers, avoid, ..PlanConfig::default() })
                            .map_err(Error::Config)?;
                    let known: Vec<&str> = planned.gpus.iter().map(|g| g.gpu.as_str()).collect();
                    let gpu = planned.gpus.iter().find(|g| &g.gpu == bus).ok_or_else(|| {
                        Error::Config(format!(
                            "EngineConfig::gpu {bus} is not an NVIDIA GPU of this machine (found: {known:?})"
                        ))
                    })?;
                    (gpu.cores.clone(), gpu.notes.clone())
                }
                None => host_cores(&machine, config.workers, &avoid),
            };
            if cores.len() < config.workers {
                return Err(Error::Config(format!(
                    "{} workers but only {} online CPUs ({})",
                    config.workers,
                    cores.len(),
                    format_cpulist(&machine.online)
                )));
            }
            Ok((cores.into_iter().map(Some).collect(), notes))
        }
    }
}

/// The NIC the engine holds when its workers run the GDR transport.
#[cfg(feature = "gdr")]
type Nic = Arc<crate::transport::gdr::nic::Nic>;
/// Without the `gdr` feature there is never a NIC.
#[cfg(not(feature = "gdr"))]
#[derive(Clone)]
enum Nic {}

/// Picks the transport for [`TransportKind::Cuda`]: the GDR/CUDA switch.
///
/// | `gdr` feature | `use_gdr` | result |
/// |---|---|---|
/// | either | off | CUDA driver copies |
/// | off | on | start-up error |
/// | on | on | GDR, or a start-up error naming what is missing |
/// | either | auto | GDR when the NIC opens and passes its self-test, else CUDA with a note |
///
/// Running GDR, the CUDA context is loaded when a driver is there (GPU regions need it) and is
/// optional otherwise (host regions only: the Soft-RoCE tests run so).
fn choose_device_transport(
    config: &mut EngineConfig,
    cuda_config: &CudaConfig,
    notes: &mut Vec<String>,
) -> Result<(Option<Arc<Context>>, Option<Nic>), Error> {
    let cuda = Driver::load().and_then(|driver| Context::new(&driver, cuda_config.device)).map(Arc::new);
    if let (Ok(context), None) = (&cuda, &config.gpu) {
        config.gpu = Some(context.info.pci_bus_id.clone());
    }
    let use_gdr = config.gdr.use_gdr;
    if use_gdr == UseGdr::Off {
        return Ok((Some(cuda?), None));
    }
    config.gdr.check().map_err(Error::Config)?;
    let preferred = planned_nic(config);
    match crate::transport::gdr::open(&config.gdr, preferred.as_deref()) {
        #[allow(unreachable_patterns)] // without the `gdr` feature, open never succeeds
        Ok(nic) => {
            if let Err(e) = &cuda {
                notes.push(format!("no CUDA driver ({e}): only host regions can be registered"));
            }
            Ok((cuda.ok(), Some(nic)))
        }
        Err(reason) if use_gdr == UseGdr::On => Err(Error::Gdr(reason)),
        Err(reason) => {
            let note = format!("use_gdr = auto: GDR unavailable, using the CUDA driver's copies: {reason}");
            eprintln!("ferry: {note}");
            notes.push(note);
            match cuda {
                Ok(context) => Ok((Some(context), None)),
                Err(cuda) => Err(Error::NoDeviceTransport { gdr: reason, cuda }),
            }
        }
    }
}

/// The topology plan's NIC for the engine's GPU, if the plan has one.
fn planned_nic(config: &EngineConfig) -> Option<String> {
    let bus = config.gpu.as_ref()?;
    let machine = Machine::read(Path::new(&config.sysfs)).ok()?;
    let planned = plan(&machine, &PlanConfig::default()).ok()?;
    planned.gpus.into_iter().find(|g| &g.gpu == bus)?.nic.map(|n| n.name)
}

#[cfg(feature = "gdr")]
fn gdr_transport(
    nic: &Nic,
    config: &GdrConfig,
    counters: Arc<NicCounters>,
    fallback: Option<Box<dyn Transport>>,
) -> Box<dyn Transport> {
    let transport = crate::transport::gdr::GdrTransport::new(nic.clone(), config.clone(), counters);
    match fallback {
        Some(fallback) => Box::new(transport.with_fallback(fallback)),
        None => Box::new(transport),
    }
}

#[cfg(not(feature = "gdr"))]
fn gdr_transport(
    nic: &Nic,
    _config: &GdrConfig,
    _counters: Arc<NicCounters>,
    _fallback: Option<Box<dyn Transport>>,
) -> Box<dyn Transport> {
    match *nic {}
}

#[cfg(feature = "gdr")]
fn nic_name(nic: Option<&Nic>) -> Option<String> {
    nic.map(|n| n.name.clone())
}

#[cfg(not(feature = "gdr"))]
fn nic_name(_nic: Option<&Nic>) -> Option<String> {
    None
}

/// Registers memory with the NIC, if there is one: GPU memory (`gpu` set) as a dma-buf first,
/// else by its device pointer (nvidia-peermem); host memory with `ibv_reg_mr`.
///
/// # Safety
/// The memory must stay valid while the returned registration lives.
#[cfg(feature = "gdr")]
unsafe fn nic_register(
    nic: Option<&Nic>,
    cuda: Option<&Context>,
    addr: u64,
    len: usize,
    gpu: Option<&crate::cuda::PointerInfo>,
) -> Result<(NicKeys, Option<Keep>), Error> {
    let Some(nic) = nic else { return Ok((NicKeys::default(), None)) };
    let registered = match (gpu, cuda) {
        (Some(info), Some(context)) => {
            let dmabuf = context
                .export_dmabuf(addr, len as u64, (info.range_start, info.range_size))
                .map_err(|e| format!("exporting a dma-buf: {e}"))
                // SAFETY: forwarded from the caller; the NIC holds its own reference to the
                // dma-buf, so our descriptor may close once registered.
                .and_then(|buf| unsafe {
                    use std::os::fd::AsRawFd;
                    nic.register_dmabuf(buf.fd.as_raw_fd(), buf.offset, len, addr)
                });
            match dmabuf {
                Ok(mr) => Ok(mr),
                // SAFETY: forwarded from the caller.
                Err(first) => unsafe { nic.register(addr, len) }.map_err(|second| {
                    format!("as a dma-buf: {first}; by device pointer (needs nvidia-peermem): {second}")
                }),
            }
        }
        // SAFETY: forwarded from the caller.
        _ => unsafe { nic.register(addr, len) },
    };
    let mr = registered.map_err(Error::Gdr)?;
    let keys = NicKeys { lkey: mr.lkey(), rkey: mr.rkey() };
    Ok((keys, Some(Box::new(mr) as Keep)))
}

/// Without the `gdr` feature nothing is registered with a NIC.
///
/// # Safety
/// None needed; the signature matches the `gdr` build.
#[cfg(not(feature = "gdr"))]
unsafe fn nic_register(
    _nic: Option<&Nic>,
    _cuda: Option<&Context>,
    _addr: u64,
    _len: usize,
    _gpu: Option<&crate::cuda::PointerInfo>,
) -> Result<(NicKeys, Option<Keep>), Error> {
    Ok((NicKeys::default(), None))
}
