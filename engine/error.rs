//! The engine's error type: one variant per failing operation, each saying how to fix it.

use crate::desc::RegionId;
use crate::ring::RingError;
use std::io;

/// Errors of the engine's control plane (setup, registration, queues). The data path never
/// returns these: a failed copy is a [`crate::Status`] in its completion.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is inconsistent.
    #[error("invalid configuration: {0}")]
    Config(String),
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
    /// Reading the machine's CPU list failed.
    #[error("reading the online CPU list: {0}")]
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
    /// A queue's shared memory is not a ferry queue of this ABI.
    #[error("attaching a queue: {0}")]
    QueueLayout(String),
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
        state: crate::desc::QueueState,
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
    Cuda(#[from] crate::cuda_driver::CudaError),
    /// A worker's transport failed to start on its thread.
    #[error("worker {worker}: starting the {transport} transport: {reason}")]
    TransportStart {
        /// Worker index.
        worker: usize,
        /// Transport name.
        transport: &'static str,
        /// What failed.
        reason: String,
    },
    /// A GPU memory range cannot be registered.
    #[error("registering {len} bytes of GPU memory at {addr:#x}: {reason}")]
    GpuRange {
        /// Start address.
        addr: u64,
        /// Length.
        len: u64,
        /// Why.
        reason: String,
    },
    /// A benchmark run failed (copies completed with errors, a check did not hold).
    #[error("benchmark: {0}")]
    Benchmark(String),
    /// The GDR transport cannot run (`use_gdr = on`), or the NIC refused a registration.
    #[error("GDR: {0}")]
    Gdr(String),
    /// `use_gdr = auto` found neither a usable NIC nor a CUDA driver.
    #[error("no transport for GPU copies: GDR: {gdr}; CUDA: {cuda}")]
    NoDeviceTransport {
        /// Why GDR could not run.
        gdr: String,
        /// Why the CUDA driver could not be loaded.
        cuda: crate::cuda_driver::CudaError,
    },
    /// The engine was shut down.
    #[error("the engine is shut down")]
    ShutDown,
    /// Claiming an end of a queue failed: a live process holds it (each end has one owner).
    #[error(
        "claiming the {end} end of queue {queue}: process {pid}{} holds it; each end of a queue has one owner: release it there first (drop or close the Queue, or Queue::hand_off it to this process), or wait until that process exits (an exited holder's end is taken over)",
        if *pid == std::process::id() { " (this process)" } else { "" }
    )]
    QueueEndClaimed {
        /// Queue id.
        queue: u32,
        /// The end.
        end: crate::queue::QueueEnd,
        /// The holder's process id.
        pid: u32,
    },
}
