//! The engine's error type: one variant per failing operation, with the context it failed in
//! and the error underneath as its source, each message saying how to fix it.

use crate::cuda_driver::CudaError;
use crate::desc::{QueueState, RegionId};
use crate::ring::RingError;
use crate::transport::gdr::error::GdrError;
use std::io;

/// What a transport's [`crate::Transport::start`] fails with: the transport's own error.
pub type TransportError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Errors of the engine's control plane (setup, registration, queues). The data path never
/// returns these: a failed copy is a [`crate::Status`] in its completion.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A setting is out of its range or contradicts another.
    #[error("invalid configuration: {setting} is {value}; it must be {rule}")]
    InvalidSetting {
        /// The setting, as spelled in the configuration (`EngineConfig::workers`).
        setting: &'static str,
        /// Its value.
        value: String,
        /// What it must be.
        rule: String,
    },
    /// A worker's core is not an online CPU.
    #[error(
        "worker {worker}: core {core} is not online (online CPUs: {online}); pick one of those in EngineConfig::cores"
    )]
    CoreOffline {
        /// Worker index.
        worker: usize,
        /// Requested core.
        core: usize,
        /// The online CPU list.
        online: String,
    },
    /// Automatic placement found fewer usable CPUs than workers.
    #[error("{workers} workers but only {usable} usable CPUs (online: {online}): lower EngineConfig::workers")]
    NotEnoughCores {
        /// Workers asked for.
        workers: usize,
        /// CPUs placement could use.
        usable: usize,
        /// The online CPU list.
        online: String,
    },
    /// The engine's GPU is not among the NVIDIA GPUs that sysfs shows.
    #[error(
        "the engine's GPU {bus_id} is not an NVIDIA GPU of this machine's sysfs (found: {found:?}); check GpuConfig"
    )]
    GpuNotInTopology {
        /// The GPU's PCI bus id.
        bus_id: String,
        /// The NVIDIA GPUs sysfs shows.
        found: Vec<String>,
    },
    /// `GpuConfig::bus_id` names another GPU than `GpuConfig::device`.
    #[error("GpuConfig: CUDA device {device} is the GPU at {actual}, but bus_id names {configured}: set one of them")]
    GpuMismatch {
        /// The CUDA ordinal.
        device: u32,
        /// Its bus id, as the driver reports it.
        actual: String,
        /// The configured bus id.
        configured: String,
    },
    /// `sched_setaffinity` failed for a worker.
    #[error("worker {worker}: pinning to core {core} failed: {source} (is the core outside this process's cpuset?)")]
    PinWorker {
        /// Worker index.
        worker: usize,
        /// Requested core.
        core: usize,
        /// The errno.
        #[source]
        source: io::Error,
    },
    /// A worker thread could not be started.
    #[error("worker {worker}: spawning its thread failed: {source}")]
    SpawnWorker {
        /// Worker index.
        worker: usize,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A worker thread ended during start-up without saying why (it panicked).
    #[error("a worker thread exited during start-up (it panicked: see stderr)")]
    WorkerExited,
    /// A worker's transport failed to start on its thread.
    #[error("worker {worker}: starting the {transport} transport: {source}")]
    TransportStart {
        /// Worker index.
        worker: usize,
        /// Transport name.
        transport: &'static str,
        /// The transport's error.
        #[source]
        source: TransportError,
    },
    /// Reading the machine's CPUs, PCI devices or NICs from sysfs failed.
    #[error("reading the machine's topology: {0}")]
    Topology(#[from] ferry_topology::TopologyError),
    /// Creating or mapping shared memory failed.
    #[error("shared memory for {what}: {source}")]
    SharedMemory {
        /// What the memory was for.
        what: &'static str,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// A ring header did not match or a ring peer broke the protocol.
    #[error(transparent)]
    Ring(#[from] RingError),
    /// The memory handed to [`crate::Queue::attach`] is too small to hold a queue.
    #[error("attaching a queue: {len} bytes is too small for a queue header ({need} bytes): not a ferry queue")]
    QueueTooSmall {
        /// Bytes mapped.
        len: usize,
        /// Bytes a header needs.
        need: usize,
    },
    /// A queue header field differs from what this library expects.
    #[error(
        "attaching a queue: header field {field} is {found:#x}, expected {expected:#x}: not a ferry queue of this ABI (library and engine must be the same version)"
    )]
    QueueHeader {
        /// The field.
        field: &'static str,
        /// What the header holds.
        found: u64,
        /// What this library expects.
        expected: u64,
    },
    /// Every slot of the region table is in use.
    #[error("region table full ({capacity} regions): deregister unused regions or raise EngineConfig::max_regions")]
    RegionTableFull {
        /// Table capacity.
        capacity: usize,
    },
    /// A memory range cannot be registered.
    #[error("registering {len} bytes at {addr:#x}: {reason}")]
    BadRange {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// Why.
        reason: &'static str,
    },
    /// The region id names no registered region.
    #[error("{id} is not registered with this engine")]
    UnknownRegion {
        /// The id.
        id: RegionId,
    },
    /// Deregistration refused: copies that use the region have not completed.
    #[error("{id} has {in_flight} copies in flight: wait for their completions, then deregister again")]
    RegionBusy {
        /// The region.
        id: RegionId,
        /// Copies in flight when checked.
        in_flight: u64,
    },
    /// A worker did not pass through its loop in time during deregistration.
    #[error("deregistering {id}: worker {worker} did not respond within {waited_ms} ms (is it stuck in a transport?)")]
    WorkerUnresponsive {
        /// The region.
        id: RegionId,
        /// Worker index.
        worker: usize,
        /// How long we waited.
        waited_ms: u64,
    },
    /// A read or write of a [`crate::HostBuffer`] runs past its end.
    #[error("{offset} + {len} bytes runs past the end of a {size}-byte buffer")]
    OutOfRange {
        /// Offset.
        offset: u64,
        /// Length.
        len: u64,
        /// Buffer size.
        size: u64,
    },
    /// The queue no longer accepts work.
    #[error("queue {queue} is {state}")]
    QueueNotOpen {
        /// Queue id.
        queue: u32,
        /// Its state.
        state: QueueState,
    },
    /// Waiting took longer than allowed.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: &'static str,
        /// How long.
        waited: std::time::Duration,
    },
    /// CUDA is unavailable or a driver call failed.
    #[error("CUDA: {0}")]
    Cuda(#[from] CudaError),
    /// The copy kernel cannot be loaded, and the `kernel` strategy needs it.
    #[error("the copy kernel cannot run: {source}; choose another Strategy")]
    KernelUnavailable {
        /// Why it failed to load.
        #[source]
        source: CudaError,
    },
    /// The resident copy kernel cannot start.
    #[error("the resident copy kernel cannot run: {source}; choose another Strategy")]
    ResidentUnavailable {
        /// Why.
        #[source]
        source: CudaError,
    },
    /// The GPU or its driver lacks what a chosen strategy needs.
    #[error("{strategy} needs {needs}, which this GPU or driver lacks; choose another Strategy")]
    DeviceLacks {
        /// The strategy.
        strategy: &'static str,
        /// What it needs.
        needs: &'static str,
    },
    /// Ordering with CUDA streams ([`crate::Engine::stream_wait`], [`crate::Engine::stream_signal`])
    /// cannot work here.
    #[error("stream ordering is unavailable: {reason}")]
    StreamOrdering {
        /// Why: no CUDA context, or the device attribute that is 0.
        reason: String,
    },
    /// The control connection to a `ferry serve` daemon failed (connecting, sending, reading,
    /// or an answer that does not fit the protocol).
    #[error("control connection: {what}: {reason}")]
    Control {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        reason: String,
    },
    /// The daemon refused a request; its text says why.
    #[error("the daemon refused: {message}")]
    Daemon {
        /// The daemon's text.
        message: String,
    },
    /// The CUDA driver is older than a chosen strategy needs.
    #[error("{strategy} needs CUDA driver API {needed}; this driver is {found}: update the driver or choose another Strategy")]
    DriverTooOld {
        /// The strategy.
        strategy: &'static str,
        /// The version it needs.
        needed: i32,
        /// The driver's.
        found: i32,
    },
    /// A GPU memory range cannot be registered.
    #[error("registering {len} bytes of GPU memory at {addr:#x}: {fault}")]
    GpuRange {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// Why.
        #[source]
        fault: GpuRangeFault,
    },
    /// The GDR transport cannot run (`use_gdr = on`), or the NIC refused a registration.
    #[error("GDR: {0}")]
    Gdr(#[from] GdrError),
    /// `use_gdr = auto` found neither a usable NIC nor a CUDA driver.
    #[error("no transport for GPU copies: GDR: {gdr}; CUDA: {cuda}")]
    NoDeviceTransport {
        /// Why GDR could not run.
        gdr: GdrError,
        /// Why the CUDA driver could not be loaded.
        cuda: CudaError,
    },
    /// The engine was shut down.
    #[error("the engine is shut down")]
    ShutDown,
    /// An engine connected to a daemon ([`crate::Engine::connect`]) cannot do this (yet).
    #[error("{what}: not available on an engine connected to a ferry serve daemon")]
    NotConnected {
        /// What was asked.
        what: &'static str,
    },
    /// The engine serving a queue is gone: the process holding the queue's worker end (a
    /// `ferry serve` daemon, or another process's engine) exited, or the worker let the end go.
    /// The queue's copies will not complete; connect again (a restarted daemon serves new
    /// queues) and open new queues.
    #[error(
        "the engine serving queue {queue} is gone (process {pid} held its worker end{}): its copies will not complete; connect to the engine again and open a new queue",
        if *pid == 0 { ", and let it go" } else { " and exited" }
    )]
    EngineGone {
        /// Queue id.
        queue: u32,
        /// The process that held the worker end (0: none held it).
        pid: u32,
    },
    /// Claiming an end of a queue failed: a live process holds it (each end has one owner).
    #[error(
        "claiming the {end} end of queue {queue}: process {pid}{} holds it; each end of a queue has one owner: release it there first (drop or close the Queue, or Queue::hand_off it to this process), or wait until that process exits (an exited holder's end is taken over)",
        if *pid == std::process::id() { " (this process)" } else { "" }
    )]
    QueueEndClaimed {
        /// Queue id.
        queue: u32,
        /// The end.
        end: crate::desc::QueueEnd,
        /// The holder's process id.
        pid: u32,
    },
}

/// Why a GPU memory range cannot be registered ([`Error::GpuRange`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GpuRangeFault {
    /// The engine runs no GPU transport.
    #[error("the engine does not run the GPU transport (TransportKind::Gpu)")]
    NoGpuTransport,
    /// The engine runs GDR without a CUDA driver (host regions only).
    #[error("the engine runs the GDR transport without a CUDA driver: only host regions can be registered")]
    NoCudaDriver,
    /// Zero bytes.
    #[error("zero length")]
    ZeroLength,
    /// The range wraps the address space.
    #[error("the range wraps the address space")]
    Wraps,
    /// The driver does not know the address.
    #[error("the CUDA driver does not know this address ({0})")]
    UnknownAddress(#[source] CudaError),
    /// The address is not device memory.
    #[error("memory type {memory_type} is not device memory")]
    NotDeviceMemory {
        /// `CU_POINTER_ATTRIBUTE_MEMORY_TYPE`.
        memory_type: u32,
    },
    /// The memory is on a GPU the engine does not drive.
    #[error("the memory is on CUDA device {found}, the engine drives device(s) {engine:?}")]
    OtherDevice {
        /// Its device.
        found: i32,
        /// The engine's, in its order.
        engine: Vec<i32>,
    },
    /// The range runs past its allocation.
    #[error("the range runs past its allocation ({size} bytes at {start:#x})")]
    PastAllocation {
        /// The allocation's start.
        start: u64,
        /// Its size.
        size: u64,
    },
    /// The NIC refused it.
    #[error("registering it with the NIC: {0}")]
    Nic(#[source] GdrError),
    /// Connected to a daemon: the memory cannot be handed over by CUDA IPC (the reason says).
    #[error("exporting it to the daemon by CUDA IPC: {0}")]
    NotExportable(String),
}

impl Error {
    /// An [`Error::InvalidSetting`]: `setting` is `value`; it must be `rule`.
    pub fn setting(setting: &'static str, value: impl std::fmt::Display, rule: impl Into<String>) -> Error {
        Error::InvalidSetting { setting, value: value.to_string(), rule: rule.into() }
    }
}
