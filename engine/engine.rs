//! The engine: start-up, the control plane (clients, regions, queues) and shutdown. Its settings
//! are in [`crate::config`], the choice of its transport in `transport/select.rs`.

use crate::config::{CorePlacement, EngineConfig, QueueConfig, SmBudget, TransportKind};
use crate::cuda_driver::{Context, HostRegistration, WaitFor, MEMORY_TYPE_DEVICE, MEMORY_TYPE_HOST};
use crate::desc::RegionId;
use crate::error::{Error, GpuRangeFault};
use crate::queue::{DeviceWords, Queue, QueueId, QueueMemory, WorkerEnd};
use crate::region::{check_range, ClientId, HostBuffer, Keep, MemoryKind, NicKeys, RegionTable};
use crate::remote::Remote;
use crate::ring::shm::SharedMemory;
use crate::transport::gdr::NicCounters;
use crate::transport::select::{select, Selected};
use crate::worker::{EngineStats, Mailbox, Worker, WorkerCounters};
use ferry_topology::cpu::format_cpulist;
use ferry_topology::plan::{host_cores, plan, PlanConfig};
use ferry_topology::Machine;
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;

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
    /// The engine GPU whose cores it runs on (0 with one GPU or none).
    gpu: usize,
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
    /// The transport chosen at start, with the CUDA context and the NIC that registration uses.
    device: Selected,
    /// The workers run a caller's transport (`TransportKind::Custom`): it may mark landed words.
    custom: bool,
    /// Set for an engine in a daemon ([`Engine::connect`]): the calls go to it.
    remote: Option<Remote>,
    /// The client of each named pool ([`Engine::shared_client`]), in this process.
    pools: Mutex<HashMap<String, ClientId>>,
    /// Serialises queue creation so that each queue lands on one worker exactly once, and orders
    /// it with stopping: a queue is either posted before the workers stop (and closed by them)
    /// or refused with [`Error::ShutDown`].
    queue_lock: Mutex<()>,
}

impl Engine {
    /// Starts the workers. Each pins itself before this returns; any failure stops the others
    /// and is returned.
    pub fn start(config: EngineConfig) -> Result<Engine, Error> {
        config.check()?;
        let device = select(&config)?;
        // With several GPUs, `workers` workers for each, on that GPU's cores.
        let buses: Vec<String> = match device.gpus.is_empty() {
            true => device.gpu_bus_id.iter().cloned().collect(),
            false => device.gpus.iter().map(|c| c.info.pci_bus_id.clone()).collect(),
        };
        let (cores, placement_notes) = place_workers(&config, &buses)?;
        let total = cores.len();
        let table = Arc::new(RegionTable::new(config.max_regions, total));
        let stop = Arc::new(AtomicBool::new(false));
        let mut engine = Engine {
            table: table.clone(),
            workers: Vec::with_capacity(total),
            stop: stop.clone(),
            next_client: AtomicU32::new(1),
            next_queue: AtomicU32::new(1),
            transport_name: "",
            placement_notes,
            device,
            custom: matches!(&config.transport, TransportKind::Custom(_)),
            remote: None,
            pools: Mutex::default(),
            queue_lock: Mutex::new(()),
        };
        let (ready_tx, ready_rx) = mpsc::channel();
        for (index, core) in cores.into_iter().enumerate() {
            let (transport, nic_counters) = engine.device.build(&config, index);
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
                        worker.transport.start().map_err(|source| Error::TransportStart {
                            worker: index,
                            transport,
                            source,
                        })
                    });
                    let ok = started.is_ok();
                    let _ = ready.send(started);
                    if ok {
                        worker.run();
                    }
                })
                .map_err(|source| Error::SpawnWorker { worker: index, source })?;
            let gpu = index / config.workers;
            engine.workers.push(WorkerHandle { thread, mailbox, counters, nic_counters, core, gpu });
        }
        drop(ready_tx);
        for _ in 0..engine.workers.len() {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(e), // Drop stops and joins the workers started so far.
                Err(_) => return Err(Error::WorkerExited),
            }
        }
        Ok(engine)
    }

    /// The engine of the `ferry serve` daemon listening at `socket`: the same calls as an engine
    /// started here, answered by the daemon. [`Engine::new_client`] is a connection (the first
    /// one is made here, so that a missing or incompatible daemon fails at once); host memory
    /// comes from the daemon ([`Engine::allocate_host`], a memfd mapped here), queues too; the
    /// data path is shared memory, as in-process; [`Engine::register_gpu`] hands the daemon the
    /// memory's CUDA IPC handle. Not available connected (yet):
    /// [`Engine::register_host`], the SM budget and stream ordering
    /// ([`Error::NotConnected`], [`Error::StreamOrdering`]); [`Engine::stats`] is empty. A daemon
    /// that dies makes the queues' polls fail with [`Error::EngineGone`].
    pub fn connect(socket: impl AsRef<Path>) -> Result<Engine, Error> {
        let remote = Remote::connect(socket.as_ref().to_path_buf())?;
        Ok(Engine {
            table: Arc::new(RegionTable::new(1, 0)),
            workers: Vec::new(),
            stop: Arc::new(AtomicBool::new(false)),
            next_client: AtomicU32::new(1),
            next_queue: AtomicU32::new(1),
            transport_name: "daemon",
            placement_notes: Vec::new(),
            device: select(&EngineConfig::default())?,
            custom: false,
            remote: Some(remote),
            pools: Mutex::default(),
            queue_lock: Mutex::new(()),
        })
    }

    /// Name of the transport the workers run ("host", "null", ...; "daemon" when connected).
    pub fn transport_name(&self) -> &'static str {
        self.transport_name
    }

    /// The core each worker is pinned to (`None`: unpinned).
    pub fn worker_cores(&self) -> Vec<Option<usize>> {
        self.workers.iter().map(|w| w.core).collect()
    }

    /// The engine GPU each worker was placed for (its place in the engine's GPU list; all 0
    /// with one GPU or none). Every worker copies for every GPU of the engine.
    pub fn worker_gpus(&self) -> Vec<usize> {
        self.workers.iter().map(|w| w.gpu).collect()
    }

    /// The CUDA context of each of the engine's GPUs, in its order ([`crate::GpuConfig::devices`];
    /// one with one GPU, none without a CUDA context).
    pub fn cuda_contexts(&self) -> Vec<Arc<Context>> {
        match self.device.gpus.is_empty() {
            true => self.device.cuda.iter().cloned().collect(),
            false => self.device.gpus.clone(),
        }
    }

    /// What automatic placement had to settle for (for example a worker on CPU 0).
    pub fn placement_notes(&self) -> &[String] {
        &self.placement_notes
    }

    /// Why the transport is what it is, where that was a choice (`use_gdr = auto` falling back
    /// to the CUDA driver, and its reason). Each note was also printed to stderr at start.
    pub fn transport_notes(&self) -> &[String] {
        &self.device.notes
    }

    /// The RDMA device the workers post to, when they run the GDR transport.
    pub fn nic_name(&self) -> Option<String> {
        self.device.nic_name()
    }

    /// A new client id. Regions and queues belong to a client. Connected to a daemon, a new
    /// connection: where it fails, client 0, which every later call refuses
    /// ([`Engine::try_new_client`] says why).
    pub fn new_client(&self) -> ClientId {
        self.try_new_client().unwrap_or(ClientId(0))
    }

    /// The client of the pool named `name`: every caller naming it gets the same client, so its
    /// regions are theirs (replicas sharing a host KV pool). Connected to a daemon, a connection
    /// that joins the pool there: the processes that join it share its regions
    /// ([`Engine::map_host`] maps one another member allocated), which live until the last
    /// member's connection ends. A name is 1 to 64 of `A-Za-z0-9._-`.
    pub fn shared_client(&self, name: &str) -> Result<ClientId, Error> {
        if let Some(remote) = &self.remote {
            return remote.shared_client(name);
        }
        crate::control::check_pool_name(name)?;
        let mut pools = self.pools.lock().unwrap_or_else(|e| e.into_inner());
        Ok(*pools.entry(name.to_owned()).or_insert_with(|| self.new_client()))
    }

    /// Connected to a daemon: maps region `id` of `client` (one another member of its pool
    /// allocated, its id passed along by the application), to read and write it here. In this
    /// process an engine's [`HostBuffer`]s are the regions already: [`Error::InvalidSetting`].
    pub fn map_host(&self, client: ClientId, id: RegionId) -> Result<HostBuffer, Error> {
        match &self.remote {
            Some(remote) => remote.map_host(client, id),
            None => Err(Error::setting(
                "map_host",
                id,
                "on an engine connected to a daemon (here the HostBuffer is the region)",
            )),
        }
    }

    /// [`Engine::new_client`], with the error of a connection that failed.
    pub fn try_new_client(&self) -> Result<ClientId, Error> {
        if let Some(remote) = &self.remote {
            return remote.new_client();
        }
        // Relaxed: a unique-id counter, orders nothing.
        Ok(ClientId(self.next_client.fetch_add(1, Ordering::Relaxed)))
    }

    /// Allocates `len` bytes of host memory (a sealed memfd, shareable with another process)
    /// and registers it for `client`. With the CUDA transport it is also pinned and mapped for
    /// the device.
    pub fn allocate_host(&self, client: ClientId, len: usize) -> Result<HostBuffer, Error> {
        if let Some(remote) = &self.remote {
            return remote.allocate_host(client, len);
        }
        let memory = SharedMemory::create("ferry-region", len)
            .map_err(|source| Error::SharedMemory { what: "a host region", source })?;
        self.register_shared(client, memory)
    }

    /// Registers the host memory of a memfd the caller made for `client` (mapped here; pinned
    /// and mapped for the device with the CUDA transport), so that another process holding the
    /// same memfd (a daemon, a client) shares its bytes. The memfd must be sealed against
    /// shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW`: nobody can truncate what the engine
    /// reads) and not empty; another kind of file is refused. Connected to a daemon, the memfd
    /// goes to the daemon, which registers it for the connection's client.
    pub fn register_memfd(&self, client: ClientId, file: std::fs::File) -> Result<HostBuffer, Error> {
        if let Some(remote) = &self.remote {
            return remote.register_memfd(client, file);
        }
        let memory =
            SharedMemory::open(file).map_err(|source| Error::SharedMemory { what: "a caller's memfd", source })?;
        self.register_shared(client, memory)
    }

    /// Registers `memory` (a mapped memfd) for `client`; the returned buffer keeps it mapped.
    fn register_shared(&self, client: ClientId, memory: SharedMemory) -> Result<HostBuffer, Error> {
        let len = memory.len();
        let memory = Arc::new(memory);
        // SAFETY: `keep` holds the mapping as long as the registration (the pinning drops first).
        let pin = unsafe { self.pin_host(memory.as_ptr(), len)? };
        // SAFETY: as above: the registration drops before the mapping.
        let (keys, nic) = unsafe { self.device.register_with_nic(memory.as_ptr() as u64, len, None)? };
        let keep: Keep = Box::new(HostKeep { _nic: nic, _pin: pin, _memory: memory.clone() });
        let host = MemoryKind::Host as u32;
        let id = self.table.register(client, host, memory.as_ptr() as u64, len as u64, keys, Some(keep))?;
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
        if self.remote.is_some() {
            return Err(Error::NotConnected { what: "registering this process's host memory (use allocate_host)" });
        }
        check_range(ptr as u64, len as u64)?;
        // SAFETY: the caller keeps the memory valid until deregistration, when `pin` drops.
        let pin = unsafe { self.pin_host(ptr, len)? };
        // SAFETY: the caller keeps the memory valid until deregistration, when `keep` drops.
        let (keys, nic) = unsafe { self.device.register_with_nic(ptr as u64, len, None)? };
        // Tuple fields drop in order: the NIC registration before the pinning.
        let keep: Keep = Box::new((nic, pin));
        self.table.register(client, MemoryKind::Host as u32, ptr as u64, len as u64, keys, Some(keep))
    }

    /// Pins host memory for the CUDA device, unless the engine has none or it is pinned already.
    ///
    /// # Safety
    /// The memory must stay mapped while the returned registration lives.
    unsafe fn pin_host(&self, ptr: *mut u8, len: usize) -> Result<Option<HostRegistration>, Error> {
        let Some(ctx) = self.device.cuda.as_ref().filter(|_| self.device.pins_host_memory()) else {
            return Ok(None);
        };
        ctx.make_current()?;
        if let Ok(info) = ctx.pointer_info(ptr as u64) {
            if info.memory_type == MEMORY_TYPE_HOST {
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
        if let Some(remote) = &self.remote {
            return remote.register_gpu(client, ptr, len);
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.register_device(client, ptr, len, None) }
    }

    /// Registers for `client` `len` bytes at `offset` of another process's GPU allocation, named
    /// by its CUDA IPC handle (what `ferry serve` does for a client's [`Engine::register_gpu`]):
    /// the allocation is opened in the engine's context and stays mapped until the region is
    /// deregistered. The handle's bytes are untrusted: a bad handle, a range past the
    /// allocation, or memory of another GPU is an error. Needs the CUDA transport.
    pub fn register_gpu_ipc(
        &self,
        client: ClientId,
        handle: &crate::cuda_driver::IpcHandle,
        offset: u64,
        len: usize,
    ) -> Result<RegionId, Error> {
        if self.remote.is_some() {
            return Err(Error::NotConnected { what: "registering a CUDA IPC handle (the daemon does that)" });
        }
        if self.device.cuda.is_none() {
            return Err(Error::GpuRange { addr: offset, len: len as u64, fault: GpuRangeFault::NoGpuTransport });
        }
        // Opened in the first context that takes it, then, with several GPUs, in the context of
        // the GPU it lives on (its copies run on that GPU's streams, not through a peer mapping).
        let contexts = self.cuda_contexts();
        let mut opened = Err(crate::cuda_driver::CudaError::NoGpu);
        for context in &contexts {
            opened = crate::cuda_driver::IpcMemory::open(context.clone(), handle);
            if opened.is_ok() {
                break;
            }
        }
        let mut memory = opened?;
        let ordinal = memory.context().pointer_info(memory.ptr()).map(|info| info.ordinal)?;
        if let Some(own) = contexts.into_iter().find(|c| c.info.ordinal == ordinal) {
            if !Arc::ptr_eq(&own, memory.context()) {
                drop(memory);
                memory = crate::cuda_driver::IpcMemory::open(own, handle)?;
            }
        }
        if offset.checked_add(len as u64).is_none_or(|end| end > memory.size()) {
            return Err(Error::setting(
                "a CUDA IPC range",
                format!("{len} bytes at offset {offset}"),
                format!("inside the allocation's {} bytes", memory.size()),
            ));
        }
        // SAFETY: `memory` keeps the allocation mapped here until the region is deregistered
        // (the region table drops it with the region).
        unsafe { self.register_device(client, memory.ptr() + offset, len, Some(Box::new(memory))) }
    }

    /// Registers device memory of the engine's GPU; `keep` (the IPC mapping) drops with the
    /// region, after the NIC's registration.
    ///
    /// # Safety
    /// As [`Engine::register_gpu`].
    unsafe fn register_device(
        &self,
        client: ClientId,
        ptr: u64,
        len: usize,
        keep: Option<Keep>,
    ) -> Result<RegionId, Error> {
        let bad = |fault: GpuRangeFault| Error::GpuRange { addr: ptr, len: len as u64, fault };
        let ctx = self.device.cuda.as_ref().ok_or_else(|| {
            bad(if self.device.nic.is_some() { GpuRangeFault::NoCudaDriver } else { GpuRangeFault::NoGpuTransport })
        })?;
        ctx.make_current()?;
        if len == 0 {
            return Err(bad(GpuRangeFault::ZeroLength));
        }
        let info = ctx.pointer_info(ptr).map_err(|e| bad(GpuRangeFault::UnknownAddress(e)))?;
        if info.memory_type != MEMORY_TYPE_DEVICE {
            return Err(bad(GpuRangeFault::NotDeviceMemory { memory_type: info.memory_type }));
        }
        let contexts = self.cuda_contexts();
        let Some(gpu) = contexts.iter().position(|c| c.info.ordinal == info.ordinal) else {
            let engine = contexts.iter().map(|c| c.info.ordinal).collect();
            return Err(bad(GpuRangeFault::OtherDevice { found: info.ordinal, engine }));
        };
        let end = ptr.checked_add(len as u64).ok_or(bad(GpuRangeFault::Wraps))?;
        if ptr < info.range_start || end > info.range_start + info.range_size {
            return Err(bad(GpuRangeFault::PastAllocation { start: info.range_start, size: info.range_size }));
        }
        // SAFETY: the caller keeps the allocation valid until deregistration, when `nic` drops.
        let (keys, nic) = unsafe { self.device.register_with_nic(ptr, len, Some(&info)) }.map_err(|e| match e {
            Error::Gdr(e) => bad(GpuRangeFault::Nic(e)),
            other => other,
        })?;
        let keep: Option<Keep> = match keep {
            // Tuple fields drop in order: the NIC registration before the mapping.
            Some(keep) => Some(Box::new((nic, keep))),
            None => nic,
        };
        self.table.register(client, MemoryKind::gpu_code(gpu), ptr, len as u64, keys, keep)
    }

    /// Changes the copy kernel's SM budget while the engine runs: a total over the workers, as
    /// [`crate::CudaConfig::sm_budget`]; every worker's next batch uses it. A server lowers it
    /// (to [`SmBudget::None`]: the copy engine alone) while its forward pass needs every SM, and
    /// raises it when the GPU has room. Fails on an engine without a CUDA context, or with a
    /// budget below the number of workers.
    pub fn set_sm_budget(&self, budget: SmBudget) -> Result<(), Error> {
        if self.remote.is_some() {
            return Err(Error::NotConnected { what: "the SM budget" });
        }
        self.device.set_sm_budget(budget, self.workers.len() / self.cuda_contexts().len().max(1))
    }

    /// The CUDA device context, when the engine runs the CUDA transport.
    pub fn cuda_context(&self) -> Option<&Arc<Context>> {
        self.device.cuda.as_ref()
    }

    /// Enqueues on the caller's CUDA stream `stream` a wait, on the GPU and without the CPU,
    /// until every descriptor of `queue` with `seq < watermark` has finished its copies
    /// ([`Queue::pushed`] after a push is the watermark of everything pushed so far). Work
    /// enqueued on `stream` after it sees every byte those descriptors copied. The wait is on
    /// the queue's landed word ([`Queue::landed`]): with the CUDA transport the worker's own
    /// stream writes it right behind the copies, so the waiting stream goes on without a round
    /// trip through the CPU (the first call asks the worker to; before, and for other
    /// transports, the worker writes it with the watermark). A failed descriptor, a gate and
    /// a notification count as finished (their completions say how they ended). 64 bits: it
    /// never wraps. Inside stream capture the wait is captured with
    /// its value: a replayed graph waits for that same watermark, which later replays find
    /// passed; a graph replayed step after step waits with [`Engine::stream_wait_slot`] instead.
    ///
    /// The queue's header (the words a stream reads and writes) is registered with the CUDA
    /// driver when the queue opens on an engine with a CUDA context, else by the first call
    /// (which then must not be inside a stream capture). Fails with [`Error::StreamOrdering`] without a CUDA context or where
    /// the device lacks 64-bit stream memory operations (naming the attribute).
    ///
    /// Launch every kernel that will run behind the wait once before (a warm-up pass, as CUDA
    /// graph capture needs anyway), or set `CUDA_MODULE_LOADING=EAGER`: CUDA loads kernels
    /// lazily by default, and loading one may wait for the context to go idle, which a stream
    /// blocked in this wait keeps it from doing until the copies complete; on the H200 a first
    /// launch behind an unpassed wait never returned. ferry loads its own kernels at start.
    ///
    /// # Safety
    /// `stream` must be a live CUDA stream of this engine's device in its primary context (the
    /// context torch and the runtime API use), or null for the legacy default stream; `queue`
    /// must stay alive (not dropped) until the stream has passed the wait.
    pub unsafe fn stream_wait(
        &self,
        queue: &mut Queue,
        stream: *mut std::ffi::c_void,
        watermark: u64,
    ) -> Result<(), Error> {
        let flush = self.device.nic.is_some();
        queue.request_landed();
        let words = self.device_words(queue)?;
        // SAFETY: the stream is live (the caller's promise); the landed word stays mapped and
        // registered while the queue lives, which the caller keeps until the wait passed.
        unsafe { crate::cuda_driver::stream_wait_value(stream, words.landed, watermark, WaitFor::AtLeast, flush) }
            .map_err(Error::Cuda)
    }

    /// Enqueues on `stream` a wait until `queue`'s notification slot `slot` holds `value` (a
    /// [`crate::Descriptor::notify`] wrote it: every descriptor pushed before the notification has
    /// completed), then a write clearing the slot, so that the queue's next notification for it
    /// can land. The same two operations whatever the step, so a captured CUDA graph replays
    /// them unchanged: push the step's copies and a notification for each slot the graph waits
    /// on, then replay. Fails and must be called as [`Engine::stream_wait`] (the slot: below
    /// [`crate::NOTIFY_SLOTS`], [`Error::InvalidSetting`]).
    ///
    /// # Safety
    /// As [`Engine::stream_wait`].
    pub unsafe fn stream_wait_slot(
        &self,
        queue: &mut Queue,
        stream: *mut std::ffi::c_void,
        slot: u32,
        value: u64,
    ) -> Result<(), Error> {
        let index = crate::queue::check_slot(slot)?;
        let flush = self.device.nic.is_some();
        let words = self.device_words(queue)?;
        let word = words.slots + 8 * index as u64;
        // SAFETY: as in stream_wait, for the slot's word.
        unsafe {
            crate::cuda_driver::stream_wait_value(stream, word, value, WaitFor::Equal, flush)?;
            crate::cuda_driver::stream_write_value(stream, word, 0)
        }
        .map_err(Error::Cuda)
    }

    /// Enqueues on `stream` a write of `value` into `queue`'s gate word: once the stream's
    /// earlier work is done (and its writes visible), a gate descriptor of the queue waiting for
    /// `value` or less opens. Values should grow from one signal to the next. Fails as
    /// [`Engine::stream_wait`].
    ///
    /// # Safety
    /// As [`Engine::stream_wait`].
    pub unsafe fn stream_signal(
        &self,
        queue: &mut Queue,
        stream: *mut std::ffi::c_void,
        value: u64,
    ) -> Result<(), Error> {
        let words = self.device_words(queue)?;
        // SAFETY: as in stream_wait, for the gate word.
        unsafe { crate::cuda_driver::stream_write_value(stream, words.gate, value) }.map_err(Error::Cuda)
    }

    /// `queue`'s header registered with the CUDA driver, registering it on first use.
    fn device_words<'q>(&self, queue: &'q mut Queue) -> Result<&'q DeviceWords, Error> {
        if queue.device_words.is_none() {
            if self.remote.is_some() {
                return Err(Error::StreamOrdering { reason: "not yet on an engine connected to a daemon".into() });
            }
            let context = self.cuda_context().ok_or_else(|| Error::StreamOrdering {
                reason: "the engine has no CUDA context (start it with the GPU transport and a CUDA driver)".into(),
            })?;
            if !context.info.stream_mem_ops_64 {
                return Err(Error::StreamOrdering {
                    reason: format!(
                        "CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS is 0 on GPU {} ({}): no 64-bit stream memory operations",
                        context.info.ordinal, context.info.name
                    ),
                });
            }
            let (span, offsets) = queue.header_span();
            // SAFETY: the header stays mapped while the queue lives, and the registration is the
            // queue's first field: it drops (unregisters) before the mapping.
            let (registration, base) = unsafe { register_header(context, span) }?;
            queue.device_words = Some(DeviceWords {
                landed: base + offsets.landed as u64,
                gate: base + offsets.gate as u64,
                slots: base + offsets.slots as u64,
                _registration: registration,
            });
        }
        Ok(queue.device_words.as_ref().expect("registered above"))
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
        if let Some(remote) = &self.remote {
            return remote.deregister(id);
        }
        self.table.deregister(id)
    }

    /// Opens a queue for `client`, served by one worker (the one with the fewest queues, unless
    /// [`QueueConfig::worker`] names one). The returned [`Queue`] holds the client end: drop it
    /// (or [`Queue::close`]) to close the queue, or [`Queue::hand_off`] it to another process.
    pub fn open_queue(&self, client: ClientId, config: QueueConfig) -> Result<Queue, Error> {
        if let Some(remote) = &self.remote {
            return remote.open_queue(client, config);
        }
        let _guard = self.queue_lock.lock().unwrap_or_else(|e| e.into_inner());
        // A6: Acquire; pairs with R6 in stop. Under queue_lock, which stop also takes: a queue
        // posted here is posted before the workers are told to stop, and they adopt it.
        if self.stop.load(Ordering::Acquire) {
            return Err(Error::ShutDown);
        }
        let gpus = self.cuda_contexts().len().max(1);
        if let Some(gpu) = config.gpu.filter(|&g| g >= gpus) {
            return Err(Error::setting("QueueConfig::gpu", gpu, format!("below the engine's {gpus} GPU(s)")));
        }
        let serves = |w: usize| config.gpu.is_none_or(|g| self.workers[w].gpu == g);
        let worker = match config.worker {
            Some(w) if w < self.workers.len() && serves(w) => w,
            Some(w) => {
                return Err(Error::setting(
                    "QueueConfig::worker",
                    w,
                    format!("below the engine's {} workers, and one of QueueConfig::gpu's", self.workers.len()),
                ))
            }
            None => (0..self.workers.len())
                .filter(|&w| serves(w))
                .min_by_key(|&w| self.workers[w].mailbox.queues())
                .unwrap_or(0),
        };
        // Relaxed: a unique-id counter.
        let id = QueueId(self.next_queue.fetch_add(1, Ordering::Relaxed));
        let memory = QueueMemory::create(id, client.0, &config)?;
        let attached = QueueMemory::attach(
            memory.file().try_clone().map_err(|source| Error::SharedMemory { what: "a queue", source })?,
        )?;
        let mut end = WorkerEnd::new(memory, client.0)?;
        (end.gate_timeout, end.close_if_client_dies) = (config.gate_timeout, config.close_if_client_dies);
        let mut queue = Queue::from_memory(attached)?;
        if let Some(context) = self.cuda_context().filter(|c| c.info.stream_mem_ops_64) {
            // Registered now, not at the first stream_wait: registering inside a CUDA graph
            // capture would fail. A failure here is reported by that stream_wait instead.
            let _ = self.device_words(&mut queue);
            // The worker's mapping too, for its stream to write the landed word; without it
            // the worker writes that word from the CPU.
            // SAFETY: the end's header stays mapped while the end lives, and its registration
            // is the end's first field: it drops (unregisters) before the mapping.
            if let Ok((registration, base)) = unsafe { register_header(context, end.memory.header_span()) } {
                let landed = base + QueueMemory::word_offsets().landed as u64;
                end.landed_word = Some((Some(registration), landed));
            }
        } else if self.custom {
            // A custom transport may mark the word too; it gets the host address.
            let (ptr, _) = end.memory.header_span();
            end.landed_word = Some((None, ptr as u64 + QueueMemory::word_offsets().landed as u64));
        }
        self.workers[worker].mailbox.post(end);
        Ok(queue)
    }

    /// Counters of each worker, and how many queues each serves.
    pub fn stats(&self) -> Vec<EngineStats> {
        self.workers
            .iter()
            .map(|w| w.counters.snapshot(w.mailbox.queues(), w.nic_counters.as_ref().map(|c| c.snapshot())))
            .collect()
    }

    /// Stops the workers and waits for them: copies the transport started complete, descriptors
    /// still in submission rings complete as [`crate::Status::Cancelled`] where the completion
    /// ring has room, and every queue is marked [`crate::QueueState::Closed`] (a queue its
    /// client had closed, [`crate::QueueState::ClosedByClient`]). The workers then free every
    /// queue's memory; a client keeps its own mapping until it drops its [`Queue`].
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        {
            let _guard = self.queue_lock.lock().unwrap_or_else(|e| e.into_inner());
            // R6: Release; pairs with S1 in the worker loop and A6 in open_queue.
            self.stop.store(true, Ordering::Release);
        }
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

/// A queue header's mapping (`span`) registered with the CUDA driver, and its device address.
///
/// # Safety
/// The mapping must stay mapped while the registration lives.
unsafe fn register_header(context: &Arc<Context>, span: (*mut u8, usize)) -> Result<(HostRegistration, u64), Error> {
    let (ptr, len) = span;
    // SAFETY: forwarded from the caller.
    let registration = unsafe { HostRegistration::new(context.clone(), ptr, len) }?;
    let base = registration.device_address(0)?;
    Ok((registration, base))
}

/// The core for each worker (`None`: unpinned), checked against the online CPUs, and notes on
/// fallbacks taken: `config.workers` workers for each GPU of `gpus` (PCI bus ids, the engine's
/// GPUs in order; none for a transport without a GPU, whose workers go anywhere), each GPU's on
/// the cores the topology plan gives it.
fn place_workers(config: &EngineConfig, gpus: &[String]) -> Result<(Vec<Option<usize>>, Vec<String>), Error> {
    let total = config.workers * gpus.len().max(1);
    match &config.cores {
        CorePlacement::Unpinned => Ok((vec![None; total], Vec::new())),
        CorePlacement::Cores(cores) => {
            if cores.len() != total {
                return Err(Error::setting(
                    "EngineConfig::cores",
                    format!("{} cores", cores.len()),
                    format!("one core per worker ({} workers for each of {} GPUs)", config.workers, gpus.len()),
                ));
            }
            let online = ferry_topology::cpu::online_cpus(Path::new(&config.sysfs))?;
            for (worker, &core) in cores.iter().enumerate() {
                if !online.contains(&core) {
                    return Err(Error::CoreOffline { worker, core, online: format_cpulist(&online) });
                }
            }
            Ok((cores.iter().map(|&c| Some(c)).collect(), Vec::new()))
        }
        CorePlacement::Auto => {
            let machine = Machine::read(Path::new(&config.sysfs))?;
            let avoid: Vec<usize> = crate::sys::pinned_cpu().into_iter().collect();
            let (cores, notes) = if gpus.is_empty() {
                host_cores(&machine, config.workers, &avoid)
            } else {
                let planned =
                    plan(&machine, &PlanConfig { workers_per_gpu: config.workers, avoid, ..PlanConfig::default() })?;
                let (mut cores, mut notes) = (Vec::new(), Vec::new());
                for bus in gpus {
                    let gpu = planned.gpus.iter().find(|g| g.gpu == *bus).ok_or_else(|| Error::GpuNotInTopology {
                        bus_id: bus.clone(),
                        found: planned.gpus.iter().map(|g| g.gpu.clone()).collect(),
                    })?;
                    cores.extend(gpu.cores.iter().take(config.workers));
                    notes.extend(gpu.notes.iter().cloned());
                }
                (cores, notes)
            };
            if cores.len() < total {
                return Err(Error::NotEnoughCores {
                    workers: total,
                    usable: cores.len(),
                    online: format_cpulist(&machine.online),
                });
            }
            Ok((cores.into_iter().map(Some).collect(), notes))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dgx() -> (EngineConfig, Vec<String>, Machine) {
        let sysfs = Path::new(env!("CARGO_MANIFEST_DIR")).join("topology/fixtures/dgx-h100");
        let machine = Machine::read(&sysfs).unwrap();
        let buses = machine.gpus.iter().map(|g| g.address.clone()).collect();
        (EngineConfig { workers: 2, sysfs, ..EngineConfig::default() }, buses, machine)
    }

    #[test]
    fn several_gpus_get_their_own_workers_on_their_own_cores() {
        // The DGX-H100-like fixture: eight GPUs, each with its NIC and its socket's cores.
        let (config, buses, machine) = dgx();
        let planned =
            plan(&machine, &PlanConfig { workers_per_gpu: 2, avoid: Vec::new(), ..PlanConfig::default() }).unwrap();
        let (cores, notes) = place_workers(&config, &buses).unwrap();
        assert!(notes.is_empty(), "{notes:?}");
        assert_eq!(cores.len(), 16, "two workers for each of eight GPUs");
        let mut seen = std::collections::BTreeSet::new();
        for (g, pair) in cores.chunks(2).enumerate() {
            let want: Vec<Option<usize>> = planned.gpus[g].cores.iter().map(|&c| Some(c)).collect();
            assert_eq!(pair, want.as_slice(), "GPU {g} ({}) gets its planned cores", buses[g]);
            for core in pair.iter().flatten() {
                assert!(seen.insert(*core), "core {core} given twice");
            }
        }
        // A subset, in the configured order: those GPUs' cores, in that order.
        let some = [buses[5].clone(), buses[1].clone()];
        let (cores, _) = place_workers(&config, &some).unwrap();
        let want: Vec<Option<usize>> =
            [5, 1].iter().flat_map(|&g| planned.gpus[g].cores.iter().map(|&c| Some(c))).collect();
        assert_eq!(cores, want);
        // A GPU the topology does not show, and an explicit list of the wrong length, are errors.
        let err = place_workers(&config, &["0000:ee:00.0".to_owned()]).unwrap_err();
        assert!(matches!(err, Error::GpuNotInTopology { .. }), "{err}");
        let listed = EngineConfig { cores: CorePlacement::Cores(vec![10, 11, 12]), ..config.clone() };
        let err = place_workers(&listed, &some).unwrap_err();
        assert!(err.to_string().contains("2 workers for each of 2 GPUs"), "{err}");
        let unpinned = EngineConfig { cores: CorePlacement::Unpinned, ..config };
        assert_eq!(place_workers(&unpinned, &buses).unwrap().0, vec![None; 16]);
    }
}
