//! ferry: a polled-mode copy engine between host memory and GPU memory.
//!
//! Callers register memory once ([`Engine::allocate_host`], [`Engine::register_host`]) and get a
//! [`RegionId`]; they open a [`Queue`] and push fixed-size [`Descriptor`]s that name a source and
//! a destination by region id, offset and length. A worker thread, pinned to its own core and
//! never sleeping, pops descriptors from the queue's submission ring (single producer, single
//! consumer, in shared memory), validates them against the region table, hands them to a
//! [`Transport`] in batches and writes one [`Completion`] per descriptor, in submission order,
//! into the queue's completion ring. A queue's rings live in one memfd, so a client in another
//! process can attach to it ([`Queue::attach`]).
//!
//! # Quick start
//!
//! ```
//! use ferry::{CorePlacement, Descriptor, Engine, EngineConfig, TransportKind};
//!
//! let config = EngineConfig { transport: TransportKind::Host, cores: CorePlacement::Unpinned, ..EngineConfig::default() };
//! let engine = Engine::start(config)?;
//! let client = engine.new_client();
//! let src = engine.allocate_host(client, 1 << 20)?;
//! let dst = engine.allocate_host(client, 1 << 20)?;
//! src.write(0, b"hello")?;
//! let mut queue = engine.open_queue(client, Default::default())?;
//! queue.push(Descriptor::copy(src.id(), 0, dst.id(), 4096, 5).with_tag(7)).expect("ring has room");
//! let done = queue.wait_one(std::time::Duration::from_secs(5))?;
//! assert_eq!((done.tag, done.status()), (7, Ok(ferry::Status::Ok)));
//! let mut out = [0u8; 5];
//! dst.read(4096, &mut out)?;
//! assert_eq!(&out, b"hello");
//! # Ok::<(), ferry::Error>(())
//! ```
//!
//! # Transports
//!
//! - `host`: the worker copies with the CPU (host to host). Runs anywhere.
//! - `null`: completes every valid descriptor without moving data; measures the engine's cost.
//! - `cuda`: host <-> GPU through the CUDA driver, loaded at run time
//!   ([`transport::cuda`]): [`TransportKind::Gpu`] with [`GpuConfig::gdr`]'s `use_gdr` off (or
//!   auto, when no NIC passes its self-test). GPU memory is registered with
//!   [`Engine::register_gpu`].
//! - `gdr`: GPUDirect RDMA ([`transport::gdr`]): the same [`TransportKind::Gpu`] with `use_gdr`
//!   on (or auto, when a NIC passes its self-test); the NIC's DMA engine copies through a
//!   loopback queue pair.
//! - a caller-supplied [`Transport`] ([`TransportKind::Custom`]), such as [`FaultTransport`],
//!   which fails chosen operations to test error paths. A transport receives only copies that
//!   passed validation ([`desc::ValidCopy`]: made by the engine, or by an `unsafe` constructor).
//!
//! # Configuration
//!
//! Every setting is in [`config`]: [`EngineConfig`] holds the workers, their cores, the
//! transport (with one [`GpuConfig`] for the GPU: device, [`CudaConfig`], [`GdrConfig`]) and the
//! limits; [`QueueConfig`] sizes one queue. [`EngineConfig::check`] validates what needs no
//! hardware; [`Engine::start`] checks the rest against the machine. The copy kernel's
//! [`SmBudget`] is a total over the workers, `SmBudget::All` spelled out.
//!
//! # Errors
//!
//! Control-plane calls return [`Error`], one variant per failing operation with its context and
//! the underlying error as its source; the data path reports a [`Status`] per completion and
//! never panics on bad input.
//!
//! # Features and library dependencies
//!
//! - `gdr` (default): the GDR transport, through `sideway` and `rdma-mummy-sys`. Building needs
//!   `cmake` and `libclang`; `libibverbs.so.1` is loaded at run time, so ferry builds and runs
//!   where RDMA is absent (the transport is then unavailable, with the reason).
//! - The CUDA driver (`libcuda.so.1`) is loaded at run time through `cudarc`; nothing CUDA is
//!   needed to build.
//!
//! # Thread safety
//!
//! [`Engine`] is `Send + Sync`; registration and queue creation may be called from any thread.
//! A [`Queue`] is one single-producer single-consumer pair: it is `Send`, not `Sync`; give each
//! submitting thread its own queue. Each end of a queue is claimed in its shared header by one
//! process: a second [`Queue::attach`] of a held client end, in this process or another, fails
//! with [`Error::QueueEndClaimed`]; the end of a process that has exited is taken over by the
//! next attach ([`queue`] has the details).
//!
//! # Resource cleanup
//!
//! Dropping a [`Queue`] (or [`Queue::close`]) closes it: the worker lets the copies the
//! transport has started finish (the regions they use stay counted, so
//! [`Engine::deregister`] refuses them until then), drops the descriptors it has not started
//! without writing completions, then frees the queue's shared memory, file descriptor and
//! worker slot and stops visiting it. [`EngineStats::queues`] counts a queue until then; the
//! engine gives a new queue to the worker with the fewest. A queue handed to another process
//! with [`Queue::hand_off`] is closed by that process's [`Queue`]. A client that is killed
//! does not close its queue: it stays served until a new [`Queue::attach`] takes it over or
//! the engine shuts down.
//!
//! Dropping the [`Engine`] (or [`Engine::shutdown`]) stops the workers: work the transport has
//! started completes, descriptors still waiting in a submission ring complete as
//! [`Status::Cancelled`] where the completion ring has room, every queue is marked closed, the
//! threads are joined and the engine's mappings and file descriptors are released. A client's
//! [`Queue`] keeps its own mapping until it is dropped, in this process or another.

#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks, missing_docs)]
// The loom build (`--cfg loom`) compiles the ring's model alone: the rest of the crate, which
// uses most of the ring's API, is left out of it, so that API is dead code there.
#![cfg_attr(loom, allow(dead_code, unused_imports))]

mod sync;

#[cfg(not(loom))]
pub mod config;
#[cfg(not(loom))]
pub mod control;
#[cfg(not(loom))]
mod cuda_driver;
pub mod desc;
#[cfg(not(loom))]
pub mod engine;
#[cfg(not(loom))]
pub mod error;
#[cfg(not(loom))]
pub mod queue;
#[cfg(not(loom))]
pub mod region;
#[cfg(not(loom))]
mod remote;
mod ring;
#[cfg(not(loom))]
mod router;
#[cfg(not(loom))]
mod sys;
#[cfg(not(loom))]
pub mod transport;
#[cfg(not(loom))]
mod worker;

/// The Cargo features this build of the library was compiled with (`ferry --version` lists them).
pub const FEATURES: &[&str] = &[
    #[cfg(feature = "gdr")]
    "gdr",
];

#[cfg(not(loom))]
pub use config::{
    CorePlacement, CudaConfig, EngineConfig, GdrConfig, GpuConfig, GpuSet, IdlePolicy, QueueConfig, RouteTable,
    SmBudget, Strategy, TransportKind, UseGdr, CLIENT_CHECK_INTERVAL,
};
#[cfg(not(loom))]
pub use control::Client;
pub use desc::{
    Completion, Descriptor, QueueEnd, QueueState, RegionId, Status, FLAG_FENCE, FLAG_GATE, FLAG_NOTIFY, FLAG_STRIDED,
    MAX_CHUNKS, NOTIFY_SLOTS,
};
#[cfg(not(loom))]
pub use engine::Engine;
#[cfg(not(loom))]
pub use error::{Error, GpuRangeFault};
#[cfg(not(loom))]
pub use queue::{Queue, QueueId, QueueStats, ENGINE_CHECK_INTERVAL};
#[cfg(not(loom))]
pub use region::{ClientId, HostBuffer, MemoryKind};
pub use ring::PushError;
#[cfg(not(loom))]
pub use transport::{fault::FaultTransport, gdr::NicStats, Transport};
#[cfg(not(loom))]
pub use worker::EngineStats;

/// Unstable internals for the `ferry` command, the benches and the tests: the CUDA driver
/// layer, the rings, OS calls and the NIC. Not part of the API: they change without notice.
#[doc(hidden)]
#[cfg(not(loom))]
pub mod internals {
    /// The CUDA driver layer (loading, contexts, streams, events, kernels, pinned memory).
    pub mod cuda {
        pub use crate::cuda_driver::*;
    }
    /// The single-producer single-consumer rings and their shared memory.
    pub mod ring {
        pub use crate::ring::*;
    }
    /// Operating-system calls: pinning, resource limits, library probes.
    pub mod sys {
        pub use crate::sys::*;
    }
    /// The GDR transport's NIC (device, queue pairs, registration).
    #[cfg(feature = "gdr")]
    pub mod nic {
        pub use crate::transport::gdr::nic::*;
    }
}
