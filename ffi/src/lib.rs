//! The C ABI of ferry.
//!
//! Conventions (as in rustls-ffi):
//! - Every export is behind the panic boundary and never unwinds. Its body is one call of a
//!   boundary helper, by what it returns: [`guard`] for a [`ferry_result`] (a panic becomes
//!   `FERRY_RESULT_PANIC`), [`guard_value`] for a plain value (a panic returns the sentinel its
//!   doc comment names), [`guard_free`] for a `_free` function (a panic is written to stderr and
//!   swallowed). The panic's text is left for [`ferry_last_error`]. `tests/boundary.rs` fails
//!   for an export that skips the boundary.
//! - Pointer arguments are checked for NULL (`FERRY_RESULT_NULL_ARGUMENT`).
//! - Output parameters are written only on success.
//! - Objects come in `_new`/`_free` (or `_start`/`_free`) pairs; `_free` accepts NULL.
//! - The text of the last error on the calling thread is available from
//!   [`ferry_last_error`].
//!
//! Thread safety: a `ferry_engine` may be used from any thread. A `ferry_queue` is one
//! single-producer single-consumer pair: use each from one thread at a time.
#![deny(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![allow(non_camel_case_types)]

use ferry::{
    ClientId, Completion, CorePlacement, CudaConfig, Descriptor, Engine, EngineConfig, Error, GdrConfig, GpuConfig,
    GpuSet, HostBuffer, IdlePolicy, Queue, QueueConfig, RegionId, RouteTable, SmBudget, Strategy, TransportKind,
    UseGdr,
};
use std::any::Any;
use std::cell::RefCell;
use std::ffi::{c_char, c_int};
use std::io::Write;
use std::os::fd::FromRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Duration;

/// Result of a call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ferry_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// ferry panicked (`ferry_last_error` says where); the object involved should not be used
    /// again.
    Panic = 2,
    /// Invalid configuration or argument.
    InvalidArgument = 3,
    /// A worker core is offline or pinning failed.
    CoreUnavailable = 4,
    /// The region table is full.
    RegionTableFull = 5,
    /// The region id is not registered.
    UnknownRegion = 6,
    /// The region has copies in flight; retry after their completions.
    RegionBusy = 7,
    /// The memory range cannot be registered.
    BadRange = 8,
    /// The queue is closed or broken.
    QueueNotOpen = 9,
    /// Waiting timed out.
    Timeout = 10,
    /// An operating-system call failed (memfd, mmap, thread creation).
    SystemError = 11,
    /// A ring or queue in shared memory is not what this library expects.
    LayoutMismatch = 12,
    /// The engine was shut down.
    ShutDown = 13,
    /// The engine serving the queue is gone (the daemon or the process holding its worker end
    /// exited): its copies will not complete; connect again and open a new queue.
    EngineGone = 14,
}

/// The version of this C ABI: the structs' layouts, the functions' signatures and what the
/// constants mean. It grows with every change to any of them; a program or binding built against
/// one `ferry.h` compares it with `ferry_abi_version()` of the library it loaded before anything
/// else (the Python package does), so that a mismatched libferry is refused, not misread.
pub const FERRY_ABI_VERSION: u32 = 1;

/// `ferry_descriptor::flags`: start only after every earlier descriptor of the queue completed.
pub const FERRY_FLAG_FENCE: u32 = 1;
const _: () = assert!(FERRY_FLAG_FENCE == ferry::FLAG_FENCE);
/// Flag: the descriptor moves `count` chunks of `len` bytes, chunk `i` from `src_offset + i *
/// src_stride` to `dst_offset + i * dst_stride`; one completion covers them all.
pub const FERRY_FLAG_STRIDED: u32 = 2;
const _: () = assert!(FERRY_FLAG_STRIDED == ferry::FLAG_STRIDED);
/// Flag: a gate, moving nothing: the queue's later descriptors start once the queue's gate word
/// reaches `src_offset` (written by `ferry_queue_stream_signal` or `ferry_queue_signal`); it
/// completes `FERRY_STATUS_OK`, or `FERRY_STATUS_GATE_TIMEOUT` after the queue's gate timeout
/// (10 s). Every field but `tag`, `flags` and `src_offset` must be 0.
pub const FERRY_FLAG_GATE: u32 = 4;
const _: () = assert!(FERRY_FLAG_GATE == ferry::FLAG_GATE);
/// Flag: a notification, moving nothing: once every earlier descriptor of the queue has its
/// completion published and the queue's notification slot `dst_offset` (below
/// `FERRY_NOTIFY_SLOTS`) reads 0, the worker writes `src_offset` (not 0) into it; it completes
/// `FERRY_STATUS_OK`, or `FERRY_STATUS_GATE_TIMEOUT` if the slot stayed set for the queue's gate
/// timeout. Later descriptors are not held. A CUDA stream waits for it and clears the slot with
/// `ferry_queue_stream_wait_slot` (the same operations every step: a CUDA graph replays them).
/// Every field but `tag`, `flags`, `src_offset` and `dst_offset` must be 0.
pub const FERRY_FLAG_NOTIFY: u32 = 8;
const _: () = assert!(FERRY_FLAG_NOTIFY == ferry::FLAG_NOTIFY);
/// How many notification slots a queue has.
pub const FERRY_NOTIFY_SLOTS: u32 = 64;
const _: () = assert!(FERRY_NOTIFY_SLOTS == ferry::NOTIFY_SLOTS);
/// The most chunks one strided descriptor may move.
pub const FERRY_MAX_CHUNKS: u32 = 4096;
const _: () = assert!(FERRY_MAX_CHUNKS == ferry::MAX_CHUNKS);

/// `ferry_config::transport`: host memory only, copied by the CPU (the default).
pub const FERRY_TRANSPORT_HOST: u32 = 0;
/// `ferry_config::transport`: no data moves (measures the engine itself).
pub const FERRY_TRANSPORT_NULL: u32 = 1;
/// `ferry_config::transport`: host <-> GPU, over the NIC or with the CUDA driver, as
/// `ferry_config::use_gdr` says.
pub const FERRY_TRANSPORT_GPU: u32 = 2;

/// `ferry_config::cuda_strategy`: `memcpy` for a lone descriptor; for more, `batch` from 64 KiB
/// blocks up and `kernel` below (the default).
pub const FERRY_CUDA_STRATEGY_AUTO: u32 = 0;
/// `ferry_config::cuda_strategy`: one `cuMemcpyAsync` per descriptor.
pub const FERRY_CUDA_STRATEGY_MEMCPY: u32 = 1;
/// `ferry_config::cuda_strategy`: one `cuMemcpyBatchAsync` per batch (driver 12.8+).
pub const FERRY_CUDA_STRATEGY_BATCH: u32 = 2;
/// `ferry_config::cuda_strategy`: ferry's SM copy kernel, on at most `sm_budget` SMs.
pub const FERRY_CUDA_STRATEGY_KERNEL: u32 = 3;
/// `ferry_config::cuda_strategy`: ferry's resident copy kernel (launched when blocks wait for
/// it, on the `sm_budget` SMs, reserved while it runs) for blocks below 64 KiB, the copy engine
/// for larger ones. Experimental. Not starved by a busy GPU once it runs; it ends by itself 200 us
/// after its last block (or after 20 ms, then launched again), and what waits for the CUDA context
/// to go idle (`cudaDeviceSynchronize`, a lazy kernel load) waits that long at most behind it.
pub const FERRY_CUDA_STRATEGY_RESIDENT: u32 = 4;

/// `ferry_config::use_gdr`: GDR when a NIC passes its self-test, else the CUDA driver (the default).
pub const FERRY_USE_GDR_AUTO: u32 = 0;
/// `ferry_config::use_gdr`: never GDR: the CUDA driver's copies.
pub const FERRY_USE_GDR_OFF: u32 = 1;
/// `ferry_config::use_gdr`: GDR, or a start-up error naming what is missing.
pub const FERRY_USE_GDR_ON: u32 = 2;

/// Engine settings for [`ferry_engine_start`]. Zero in a field means "the default".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ferry_config {
    /// Worker threads (default 1).
    pub workers: u32,
    /// `FERRY_TRANSPORT_HOST` (0, the default), `FERRY_TRANSPORT_NULL` or `FERRY_TRANSPORT_GPU`.
    pub transport: u32,
    /// 1: do not pin workers (default: pin to the highest online CPUs, never CPU 0).
    pub unpinned: u32,
    /// 1: yield the CPU after 1024 empty iterations (default: spin).
    pub yield_when_idle: u32,
    /// Longest descriptor in bytes (default 64 MiB).
    pub max_len: u64,
    /// Region table capacity (default 4096, at most 65536).
    pub max_regions: u32,
    /// GPU transport: the CUDA device ordinal (default 0).
    pub cuda_device: i32,
    /// GPU transport, CUDA driver copies: a `FERRY_CUDA_STRATEGY_*` code (default auto).
    pub cuda_strategy: u32,
    /// GPU transport: the most SMs the copy kernel may use, in total over the engine's workers
    /// (each gets an equal share), capped at the GPU's SM count. 0: the default, 2 SMs;
    /// [`FERRY_SM_BUDGET_ALL`]: every SM; [`FERRY_SM_BUDGET_NONE`]: no SM (the copy engine
    /// alone). A budget below `workers` is a start-up error (`FERRY_RESULT_INVALID_ARGUMENT`).
    /// It can be changed while the engine runs with [`ferry_engine_set_sm_budget`].
    pub sm_budget: u32,
    /// GPU transport: a `FERRY_USE_GDR_*` code (default auto: GDR when a NIC passes its
    /// self-test, else the CUDA driver).
    pub use_gdr: u32,
    /// GPU transport: the RDMA device for GDR (NUL-terminated), or NULL for the topology plan's.
    pub nic: *const c_char,
    /// GPU transport: 1: every GPU the CUDA driver lists (`cuda_device` is then unused), each
    /// with `workers` workers of its own on its cores; the engine's GPU `g` is CUDA ordinal `g`,
    /// its workers `g * workers` to `(g + 1) * workers - 1` (`ferry_queue_config::gpu` picks them).
    /// Every queue may name memory of every GPU. 0: the one GPU `cuda_device` (default).
    pub all_gpus: u32,
    /// GPU transport, `auto` strategy: batches whose mean block is at least this many bytes go
    /// to the copy engine going host to GPU (`copy_engine_from_h2d`) and GPU to host
    /// (`copy_engine_from_d2h`), smaller ones to the copy kernel. 0: the default, measured on
    /// the H200 (64 KiB each way; `RouteTable::HOPPER`); `UINT64_MAX`: never the copy engine
    /// while the SM budget allows the kernel.
    pub copy_engine_from_h2d: u64,
    /// See `copy_engine_from_h2d`.
    pub copy_engine_from_d2h: u64,
    /// GPU transport: how long one launch of the resident copy kernel (`auto`'s small blocks and
    /// the resident strategy) takes new blocks, in microseconds, before it ends and is launched
    /// again: the longest a device-wide synchronize waits behind a worker that is never idle.
    /// 0: the default, 20 ms; from 1000 (1 ms) to 1000000 (1 s), else a start-up error
    /// (`FERRY_RESULT_INVALID_ARGUMENT`).
    pub resident_life_us: u64,
    /// GPU transport: the resident copy kernel's writer gate: at most this many of each worker's
    /// resident-kernel warps copy into GPU-to-host blocks at once (SM stores to host memory cost
    /// a compute load beside them far more than the SMs they use). 0: the defaults, 16 warps
    /// for blocks below 16 KiB and 12 from 16 KiB up (`CudaConfig::resident_writers` and
    /// `resident_writers_large`); any other value is the gate for every block size; a value
    /// above the kernel's warps (32 per SM of the budget) leaves them ungated.
    pub resident_writers: u32,
}
impl Default for ferry_config {
    fn default() -> Self {
        ferry_config {
            workers: 0,
            transport: 0,
            unpinned: 0,
            yield_when_idle: 0,
            max_len: 0,
            max_regions: 0,
            cuda_device: 0,
            cuda_strategy: 0,
            sm_budget: 0,
            use_gdr: 0,
            nic: std::ptr::null(),
            all_gpus: 0,
            copy_engine_from_h2d: 0,
            copy_engine_from_d2h: 0,
            resident_life_us: 0,
            resident_writers: 0,
        }
    }
}

/// `ferry_config::sm_budget`: every SM of the GPU, in total over the engine's workers.
pub const FERRY_SM_BUDGET_ALL: u32 = u32::MAX;
/// `ferry_config::sm_budget`: no SM; the copy kernel does not run and the `auto` and `kernel`
/// strategies copy with the copy engine.
pub const FERRY_SM_BUDGET_NONE: u32 = u32::MAX - 1;

/// One worker's counters, from [`ferry_engine_stats`].
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ferry_worker_stats {
    /// Loop iterations.
    pub iterations: u64,
    /// Loop iterations that found nothing to do.
    pub idle_iterations: u64,
    /// Descriptors taken from submission rings.
    pub descriptors: u64,
    /// Copies the transport reported finished.
    pub transport_completions: u64,
    /// 1 when the worker runs the GDR transport (the fields below are its NIC counters).
    pub nic: u32,
    /// GDR: work requests posted.
    pub work_requests: u64,
    /// GDR: doorbells (`ibv_post_send` calls).
    pub doorbells: u64,
    /// GDR: work completions polled.
    pub nic_completions: u64,
    /// GDR: error completions and failed posts.
    pub nic_errors: u64,
    /// GDR: queue-pair resets after an error.
    pub recoveries: u64,
    /// GDR: work requests sent inline.
    pub inline_writes: u64,
    /// Queues the worker serves now (closed ones leave once their copies finish).
    pub queues: u64,
}

/// A running engine.
pub struct ferry_engine(Engine);
/// The client end of a queue.
pub struct ferry_queue(Queue);
/// Host memory allocated and registered by the engine.
pub struct ferry_host_buffer(HostBuffer);

thread_local! {
    static LAST_ERROR: RefCell<String> = const { RefCell::new(String::new()) };
}

fn code_of(error: &Error) -> ferry_result {
    match error {
        Error::InvalidSetting { .. } | Error::OutOfRange { .. } | Error::GpuMismatch { .. } => {
            ferry_result::InvalidArgument
        }
        Error::CoreOffline { .. }
        | Error::PinWorker { .. }
        | Error::Topology(_)
        | Error::NotEnoughCores { .. }
        | Error::GpuNotInTopology { .. } => ferry_result::CoreUnavailable,
        Error::SpawnWorker { .. } | Error::SharedMemory { .. } | Error::WorkerExited => ferry_result::SystemError,
        Error::Ring(_) | Error::QueueTooSmall { .. } | Error::QueueHeader { .. } => ferry_result::LayoutMismatch,
        Error::RegionTableFull { .. } => ferry_result::RegionTableFull,
        Error::BadRange { .. } => ferry_result::BadRange,
        Error::UnknownRegion { .. } => ferry_result::UnknownRegion,
        Error::RegionBusy { .. } | Error::WorkerUnresponsive { .. } => ferry_result::RegionBusy,
        Error::QueueNotOpen { .. } => ferry_result::QueueNotOpen,
        Error::Timeout { .. } => ferry_result::Timeout,
        Error::ShutDown => ferry_result::ShutDown,
        Error::EngineGone { .. } => ferry_result::EngineGone,
        Error::Cuda(_)
        | Error::TransportStart { .. }
        | Error::KernelUnavailable { .. }
        | Error::DeviceLacks { .. }
        | Error::DriverTooOld { .. } => ferry_result::SystemError,
        Error::Gdr(_) | Error::NoDeviceTransport { .. } => ferry_result::SystemError,
        Error::GpuRange { .. } => ferry_result::BadRange,
        // A request the daemon refused (a limit, another client's region) names its reason.
        Error::QueueEndClaimed { .. }
        | Error::StreamOrdering { .. }
        | Error::NotConnected { .. }
        | Error::Daemon { .. } => ferry_result::InvalidArgument,
        Error::Control { .. } => ferry_result::SystemError,
        // A variant newer than this mapping.
        _ => ferry_result::SystemError,
    }
}

/// Why an export failed: a NULL pointer argument (its name) or the engine's error.
enum Failure {
    Null(&'static str),
    Engine(Error),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure::Engine(error)
    }
}

/// Returns [`Failure::Null`] from the enclosing closure for the first of the pointers that is
/// NULL.
macro_rules! non_null {
    ($($p:ident),+) => {
        $(
            if $p.is_null() {
                return Err(Failure::Null(stringify!($p)));
            }
        )+
    };
}

/// The panic boundary, the one `catch_unwind` of the crate: runs `f`; a panic becomes the text
/// "`function` panicked: <its message>". Each export reaches it through [`guard`],
/// [`guard_value`] or [`guard_free`].
fn catch_panic<T>(function: &str, f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| format!("{function} panicked: {}", panic_message(payload)))
}

/// The message of a panic's payload. A payload other than the `&str` or `String` of `panic!`
/// is leaked, not dropped: its `Drop` could panic again, outside any boundary.
fn panic_message(payload: Box<dyn Any + Send>) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        return (*text).to_owned();
    }
    match payload.downcast::<String>() {
        Ok(text) => *text,
        Err(other) => {
            std::mem::forget(other);
            "a panic without a message".to_owned()
        }
    }
}

/// Makes `text` the calling thread's last error. Never panics: while the thread is being torn
/// down it has no slot left, and the text is dropped.
fn set_last_error(text: String) {
    let _ = LAST_ERROR.try_with(|last| {
        if let Ok(mut slot) = last.try_borrow_mut() {
            *slot = text;
        }
    });
}

/// The boundary of an export that returns a [`ferry_result`]: runs `f`; its failure becomes
/// the code (and the calling thread's last error text), a panic `FERRY_RESULT_PANIC`.
fn guard(function: &str, f: impl FnOnce() -> Result<(), Failure>) -> ferry_result {
    let outcome = catch_panic(function, || match f() {
        Ok(()) => None,
        Err(Failure::Null(name)) => Some((ferry_result::NullArgument, format!("{function}: {name} is NULL"))),
        Err(Failure::Engine(e)) => Some((code_of(&e), e.to_string())),
    });
    let (code, text) = match outcome {
        Ok(None) => return ferry_result::Ok,
        Ok(Some(failure)) => failure,
        Err(text) => (ferry_result::Panic, text),
    };
    set_last_error(text);
    code
}

/// The boundary of an export that returns a plain value: runs `f`; a panic returns `sentinel`
/// (the export's doc comment names it) and leaves the panic's text for [`ferry_last_error`].
fn guard_value<T>(function: &str, sentinel: T, f: impl FnOnce() -> T) -> T {
    catch_panic(function, f).unwrap_or_else(|text| {
        set_last_error(text);
        sentinel
    })
}

/// The boundary of a `_free` export, which has no way to report: runs `f`; a panic is written
/// to stderr (and left for [`ferry_last_error`]) and swallowed.
fn guard_free(function: &str, f: impl FnOnce()) {
    if let Err(text) = catch_panic(function, f) {
        // writeln! and not eprintln!, which panics when stderr is closed.
        let _ = writeln!(std::io::stderr(), "ferry: {text}");
        set_last_error(text);
    }
}

/// The C ABI version of this library: [`FERRY_ABI_VERSION`] as it was built (the same if
/// ferry panicked, which it cannot here).
#[no_mangle]
pub extern "C" fn ferry_abi_version() -> u32 {
    guard_value("ferry_abi_version", FERRY_ABI_VERSION, || FERRY_ABI_VERSION)
}

/// Copies the calling thread's last error text into `buf` (NUL-terminated, truncated to
/// `len - 1` bytes) and returns the full text's length in bytes. Returns 0 if ferry panicked
/// (`buf` is then unspecified; call again for the panic's text).
///
/// # Safety
/// `buf` must be NULL or valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn ferry_last_error(buf: *mut c_char, len: usize) -> usize {
    guard_value("ferry_last_error", 0, || {
        // SAFETY: `buf` is NULL or valid for `len` bytes, as the caller promised.
        LAST_ERROR.with(|last| unsafe { write_text(&last.borrow(), buf, len) })
    })
}

/// Copies `text` into `buf`, cut to `len - 1` bytes and NUL-terminated; returns `text`'s length.
///
/// # Safety
/// `buf` must be valid for `len` bytes of writes, or NULL.
unsafe fn write_text(text: &str, buf: *mut c_char, len: usize) -> usize {
    if !buf.is_null() && len > 0 {
        let n = text.len().min(len - 1);
        // SAFETY: the caller promised `buf` is valid for `len` bytes; n + 1 <= len.
        unsafe {
            std::ptr::copy_nonoverlapping(text.as_ptr(), buf.cast::<u8>(), n);
            *buf.add(n) = 0;
        }
    }
    text.len()
}

/// Starts an engine. `config` may be NULL for all defaults. On success `*out` owns the engine;
/// free it with [`ferry_engine_free`].
///
/// # Safety
/// `config` must be NULL or point to a `ferry_config`; `out` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_start(config: *const ferry_config, out: *mut *mut ferry_engine) -> ferry_result {
    guard("ferry_engine_start", || {
        non_null!(out);
        // SAFETY: NULL or a valid ferry_config, as the caller promised.
        let c = unsafe { config.as_ref() }.copied().unwrap_or_default();
        let defaults = EngineConfig::default();
        let transport = match c.transport {
            FERRY_TRANSPORT_HOST => TransportKind::Host,
            FERRY_TRANSPORT_NULL => TransportKind::Null,
            // SAFETY: NULL or a NUL-terminated string, as the caller promised.
            FERRY_TRANSPORT_GPU => TransportKind::Gpu(gpu_config(&c, unsafe { optional_str(c.nic) }?)?),
            other => return Err(Error::setting("ferry_config::transport", other, "0 host, 1 null or 2 GPU").into()),
        };
        let config = EngineConfig {
            workers: if c.workers == 0 { defaults.workers } else { c.workers as usize },
            cores: if c.unpinned == 1 { CorePlacement::Unpinned } else { CorePlacement::Auto },
            transport,
            idle: if c.yield_when_idle == 1 { IdlePolicy::Yield { after: 1024 } } else { IdlePolicy::Spin },
            max_len: if c.max_len == 0 { defaults.max_len } else { c.max_len },
            max_regions: if c.max_regions == 0 { defaults.max_regions } else { c.max_regions as usize },
            ..defaults
        };
        let engine = Engine::start(config)?;
        // SAFETY: `out` is valid for a write (checked non-null; the caller promised validity).
        unsafe { *out = Box::into_raw(Box::new(ferry_engine(engine))) };
        Ok(())
    })
}

/// Connects to the `ferry serve` daemon listening at the Unix socket `socket` (a NUL-terminated
/// path) and writes an engine handle to `*out`: the same calls as on an engine from
/// [`ferry_engine_start`], answered by the daemon. `ferry_engine_new_client` opens a connection
/// (the first one is made here: a missing daemon fails now, `FERRY_RESULT_SYSTEM_ERROR` with the
/// reason in [`ferry_last_error`]); host memory (`ferry_host_alloc`) and queues come from the
/// daemon as memfds mapped here; descriptors and completions go through shared memory as
/// in-process; `ferry_register_gpu` hands the daemon (on the CUDA transport) the memory's CUDA
/// IPC handle. Refused while connected (`FERRY_RESULT_INVALID_ARGUMENT`): registering this
/// process's host memory, the SM budget, stream ordering, queue settings but the capacities. A
/// daemon that dies makes the queues' polls return `FERRY_RESULT_ENGINE_GONE`. Free it with
/// [`ferry_engine_free`] (which closes the connections).
///
/// # Safety
/// `socket` must be a NUL-terminated string; `out` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_connect(socket: *const c_char, out: *mut *mut ferry_engine) -> ferry_result {
    guard("ferry_engine_connect", || {
        non_null!(socket, out);
        // SAFETY: NUL-terminated, as the caller promised.
        let path = unsafe { std::ffi::CStr::from_ptr(socket) };
        let path = path.to_str().map_err(|_| Error::setting("socket", path.to_string_lossy(), "UTF-8"))?;
        let engine = Engine::connect(path)?;
        // SAFETY: `out` is valid for a write (checked non-null; the caller promised validity).
        unsafe { *out = Box::into_raw(Box::new(ferry_engine(engine))) };
        Ok(())
    })
}

/// The GPU transport's settings from the C struct: a zero field takes the Rust default.
fn gpu_config(c: &ferry_config, nic: Option<String>) -> Result<GpuConfig, Error> {
    let strategy = match c.cuda_strategy {
        FERRY_CUDA_STRATEGY_AUTO => Strategy::Auto,
        FERRY_CUDA_STRATEGY_MEMCPY => Strategy::Memcpy,
        FERRY_CUDA_STRATEGY_BATCH => Strategy::Batch,
        FERRY_CUDA_STRATEGY_KERNEL => Strategy::Kernel,
        FERRY_CUDA_STRATEGY_RESIDENT => Strategy::Resident,
        other => {
            return Err(Error::setting(
                "ferry_config::cuda_strategy",
                other,
                "0 auto, 1 memcpy, 2 batch, 3 kernel or 4 resident",
            ))
        }
    };
    let sm_budget = match c.sm_budget {
        0 => SmBudget::DEFAULT,
        n => sm_budget_of(n),
    };
    let use_gdr = match c.use_gdr {
        FERRY_USE_GDR_AUTO => UseGdr::Auto,
        FERRY_USE_GDR_OFF => UseGdr::Off,
        FERRY_USE_GDR_ON => UseGdr::On,
        other => return Err(Error::setting("ferry_config::use_gdr", other, "0 auto, 1 off or 2 on")),
    };
    let device = u32::try_from(c.cuda_device)
        .map_err(|_| Error::setting("ferry_config::cuda_device", c.cuda_device, "0 or more"))?;
    let devices = match c.all_gpus {
        0 => GpuSet::One,
        1 => GpuSet::All,
        other => return Err(Error::setting("ferry_config::all_gpus", other, "0 (cuda_device alone) or 1 (every GPU)")),
    };
    let default_route = RouteTable::HOPPER.copy_engine_from;
    let or_default = |v: u64, i: usize| if v == 0 { default_route[i] } else { v };
    let route =
        RouteTable { copy_engine_from: [or_default(c.copy_engine_from_h2d, 0), or_default(c.copy_engine_from_d2h, 1)] };
    let resident_life = match c.resident_life_us {
        0 => CudaConfig::default().resident_life,
        us => Duration::from_micros(us),
    };
    // One gate for every block size where one is given.
    let defaults = CudaConfig::default();
    let (resident_writers, resident_writers_large) = match c.resident_writers {
        0 => (defaults.resident_writers, defaults.resident_writers_large),
        n => (n, n),
    };
    Ok(GpuConfig {
        device,
        devices,
        cuda: CudaConfig {
            strategy,
            sm_budget,
            route,
            resident_life,
            resident_writers,
            resident_writers_large,
            ..CudaConfig::default()
        },
        gdr: GdrConfig { use_gdr, nic, ..GdrConfig::default() },
        ..GpuConfig::default()
    })
}

/// The string at `p`, or `None` for NULL.
///
/// # Safety
/// `p` must be NULL or point to a NUL-terminated string.
unsafe fn optional_str(p: *const c_char) -> Result<Option<String>, Error> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: NUL-terminated, as the caller promised.
    let text = unsafe { std::ffi::CStr::from_ptr(p) };
    text.to_str()
        .map(|t| Some(t.to_owned()))
        .map_err(|_| Error::setting("ferry_config::nic", text.to_string_lossy(), "UTF-8"))
}

/// Writes the engine's transport into `buf` as text ("gdr on mlx5_0", "cuda", "host"), followed
/// by why it is what it is where that was a choice ("use_gdr = auto: ..."), NUL-terminated and
/// cut to fit; returns the full length without the NUL. `buf` may be NULL with `len` 0. Returns
/// 0 (the text is never empty) for a NULL engine, writing nothing, and if ferry panicked (the
/// panic's text is then in [`ferry_last_error`]).
///
/// # Safety
/// `engine` must be NULL or a live engine; `buf` valid for `len` bytes of writes (or NULL with 0).
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_transport(engine: *const ferry_engine, buf: *mut c_char, len: usize) -> usize {
    guard_value("ferry_engine_transport", 0, || {
        // SAFETY: NULL or a live engine, as the caller promised.
        let Some(engine) = (unsafe { engine.as_ref() }) else { return 0 };
        let engine = &engine.0;
        let mut text = engine.transport_name().to_string();
        if let Some(nic) = engine.nic_name() {
            text += &format!(" on {nic}");
        }
        for note in engine.transport_notes() {
            text += &format!("; {note}");
        }
        // SAFETY: `buf` is valid for `len` bytes or NULL, as the caller promised.
        unsafe { write_text(&text, buf, len) }
    })
}

/// Writes worker `worker`'s counters to `*out`.
///
/// # Safety
/// `engine` must be a live engine; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_stats(
    engine: *const ferry_engine,
    worker: u32,
    out: *mut ferry_worker_stats,
) -> ferry_result {
    guard("ferry_engine_stats", || {
        non_null!(engine, out);
        // SAFETY: live engine, as the caller promised.
        let stats = unsafe { &(*engine).0 }.stats();
        let s = stats
            .get(worker as usize)
            .ok_or_else(|| Error::setting("worker", worker, format!("below the engine's {} workers", stats.len())))?;
        let nic = s.nic.unwrap_or_default();
        let value = ferry_worker_stats {
            iterations: s.iterations,
            idle_iterations: s.idle_iterations,
            descriptors: s.descriptors,
            transport_completions: s.transport_completions,
            nic: u32::from(s.nic.is_some()),
            work_requests: nic.work_requests,
            doorbells: nic.doorbells,
            nic_completions: nic.completions,
            nic_errors: nic.errors,
            recoveries: nic.recoveries,
            inline_writes: nic.inline_writes,
            queues: s.queues,
        };
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = value };
        Ok(())
    })
}

/// Shuts the engine down (started copies finish, queued ones are cancelled, queues close) and
/// frees it. NULL is ignored. Queues and buffers stay valid objects to free afterwards. Never
/// unwinds: a panic while shutting down is written to stderr.
///
/// # Safety
/// `engine` must be NULL or come from [`ferry_engine_start`], and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_free(engine: *mut ferry_engine) {
    guard_free("ferry_engine_free", || {
        if !engine.is_null() {
            // SAFETY: the caller hands back ownership of a pointer from ferry_engine_start.
            drop(unsafe { Box::from_raw(engine) });
        }
    })
}

/// Writes a new client id to `*out` (on an engine from [`ferry_engine_connect`], a new
/// connection to the daemon: `FERRY_RESULT_SYSTEM_ERROR` where it fails).
///
/// # Safety
/// `engine` must be a live engine; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_new_client(engine: *const ferry_engine, out: *mut u32) -> ferry_result {
    guard("ferry_engine_new_client", || {
        non_null!(engine, out);
        // SAFETY: live engine and writable `out`, as the caller promised.
        unsafe { *out = (*engine).0.try_new_client()?.0 };
        Ok(())
    })
}

/// Allocates `len` bytes of host memory, registers it for `client` and writes the buffer to
/// `*out`. The buffer's region stays registered until [`ferry_deregister`]; the memory stays
/// mapped until both that and [`ferry_host_buffer_free`] happened.
///
/// # Safety
/// `engine` must be a live engine; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_alloc(
    engine: *const ferry_engine,
    client: u32,
    len: usize,
    out: *mut *mut ferry_host_buffer,
) -> ferry_result {
    guard("ferry_host_alloc", || {
        non_null!(engine, out);
        // SAFETY: live engine, as the caller promised.
        let buffer = unsafe { &(*engine).0 }.allocate_host(ClientId(client), len)?;
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = Box::into_raw(Box::new(ferry_host_buffer(buffer))) };
        Ok(())
    })
}

/// Writes to `*out` the client of the pool named `name` (1 to 64 of `A-Za-z0-9._-`): every caller
/// naming it gets the same client, so its regions are theirs. On an engine from
/// [`ferry_engine_connect`], a connection joined to the pool in the daemon: the processes that
/// join it share its regions ([`ferry_host_map`]), which live until the last member is gone.
///
/// # Safety
/// `engine` must be a live engine; `name` a NUL-terminated string; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_shared_client(
    engine: *const ferry_engine,
    name: *const c_char,
    out: *mut u32,
) -> ferry_result {
    guard("ferry_engine_shared_client", || {
        non_null!(engine, name, out);
        // SAFETY: NUL-terminated, as the caller promised.
        let text = unsafe { std::ffi::CStr::from_ptr(name) };
        let text = text.to_str().map_err(|_| Error::setting("pool name", text.to_string_lossy(), "UTF-8"))?;
        // SAFETY: live engine and writable `out`, as the caller promised.
        unsafe { *out = (*engine).0.shared_client(text)?.0 };
        Ok(())
    })
}

/// On an engine from [`ferry_engine_connect`]: maps region `region` of `client` (one another
/// member of the client's pool allocated) and writes the buffer to `*out`
/// (`ferry_host_buffer_len` gives its size). `FERRY_RESULT_INVALID_ARGUMENT` on an engine in
/// this process (its buffers are the regions already) or for a region not the client's.
///
/// # Safety
/// `engine` must be a live engine; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_map(
    engine: *const ferry_engine,
    client: u32,
    region: u32,
    out: *mut *mut ferry_host_buffer,
) -> ferry_result {
    guard("ferry_host_map", || {
        non_null!(engine, out);
        // SAFETY: live engine, as the caller promised.
        let buffer = unsafe { &(*engine).0 }.map_host(ClientId(client), RegionId(region))?;
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = Box::into_raw(Box::new(ferry_host_buffer(buffer))) };
        Ok(())
    })
}

/// Registers for `client` the host memory of `fd`, a memfd of the caller's sealed against
/// shrinking and growing (`F_SEAL_SHRINK | F_SEAL_GROW`), and writes the buffer to `*out`
/// (mapped here; `ferry_host_buffer_len` gives its size). The caller keeps `fd` (ferry holds
/// its own duplicate). On an engine from [`ferry_engine_connect`] the memfd goes to the daemon,
/// which registers it: the two processes share its bytes. `FERRY_RESULT_SYSTEM_ERROR` for a
/// file that is not such a memfd, with the reason.
///
/// # Safety
/// `engine` must be a live engine; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_register_memfd(
    engine: *const ferry_engine,
    client: u32,
    fd: std::ffi::c_int,
    out: *mut *mut ferry_host_buffer,
) -> ferry_result {
    guard("ferry_host_register_memfd", || {
        non_null!(engine, out);
        // SAFETY: F_DUPFD_CLOEXEC on any int: an invalid one fails (EBADF), reported below.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(Error::SharedMemory { what: "the memfd given", source: std::io::Error::last_os_error() }.into());
        }
        // SAFETY: `dup` is a new descriptor this call owns.
        let file = unsafe { std::fs::File::from_raw_fd(dup) };
        // SAFETY: live engine, as the caller promised.
        let buffer = unsafe { &(*engine).0 }.register_memfd(ClientId(client), file)?;
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = Box::into_raw(Box::new(ferry_host_buffer(buffer))) };
        Ok(())
    })
}

/// The size in bytes of a buffer; 0 for NULL and if ferry panicked.
///
/// # Safety
/// `buffer` must be NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_buffer_len(buffer: *const ferry_host_buffer) -> usize {
    guard_value("ferry_host_buffer_len", 0, || {
        // SAFETY: NULL or a live buffer, as the caller promised.
        unsafe { buffer.as_ref() }.map_or(0, |b| b.0.len())
    })
}

/// The region id of a buffer. Returns 0, which is never a valid id, for NULL and if ferry
/// panicked (the panic's text is then in [`ferry_last_error`]).
///
/// # Safety
/// `buffer` must be NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_buffer_region(buffer: *const ferry_host_buffer) -> u32 {
    guard_value("ferry_host_buffer_region", 0, || {
        // SAFETY: NULL or a live buffer, as the caller promised.
        unsafe { buffer.as_ref() }.map_or(0, |b| b.0.id().0)
    })
}

/// The first byte of a buffer. Returns NULL for NULL and if ferry panicked (the panic's text is
/// then in [`ferry_last_error`]).
///
/// # Safety
/// `buffer` must be NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_buffer_data(buffer: *const ferry_host_buffer) -> *mut u8 {
    guard_value("ferry_host_buffer_data", std::ptr::null_mut(), || {
        // SAFETY: NULL or a live buffer, as the caller promised.
        unsafe { buffer.as_ref() }.map_or(std::ptr::null_mut(), |b| b.0.as_ptr())
    })
}

/// Frees the buffer handle. NULL is ignored. Does not deregister the region. Never unwinds: a
/// panic is written to stderr.
///
/// # Safety
/// `buffer` must be NULL or come from [`ferry_host_alloc`], and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_buffer_free(buffer: *mut ferry_host_buffer) {
    guard_free("ferry_host_buffer_free", || {
        if !buffer.is_null() {
            // SAFETY: the caller hands back ownership of a pointer from ferry_host_alloc.
            drop(unsafe { Box::from_raw(buffer) });
        }
    })
}

/// Registers `len` bytes of the caller's memory at `ptr` for `client`; writes the region id.
///
/// # Safety
/// The memory must stay valid until [`ferry_deregister`] succeeds for it or the engine is
/// freed, and must not be touched while a copy that uses it is in flight.
#[no_mangle]
pub unsafe extern "C" fn ferry_register_host(
    engine: *const ferry_engine,
    client: u32,
    ptr: *mut u8,
    len: usize,
    out_region: *mut u32,
) -> ferry_result {
    guard("ferry_register_host", || {
        // SAFETY: the memory promise is the caller's, forwarded.
        let f = |e: &Engine| unsafe { e.register_host(ClientId(client), ptr, len) };
        // SAFETY: engine and out_region as the caller promised.
        unsafe { register(engine, out_region, f) }
    })
}

/// Runs `f` (one of the engine's registrations) and writes the region id it returns to
/// `*out_region`; called inside an export's boundary.
///
/// # Safety
/// `engine` must be NULL or a live engine, `out_region` NULL or valid for a write, and `f`'s own
/// promises must hold.
unsafe fn register(
    engine: *const ferry_engine,
    out_region: *mut u32,
    f: impl FnOnce(&Engine) -> Result<RegionId, Error>,
) -> Result<(), Failure> {
    non_null!(engine, out_region);
    // SAFETY: live engine, as the caller promised.
    let id = f(unsafe { &(*engine).0 })?;
    // SAFETY: writable `out_region`, as the caller promised.
    unsafe { *out_region = id.0 };
    Ok(())
}

/// Registers `len` bytes of GPU memory at device address `ptr` (from `cuMemAlloc` or a
/// framework's allocator) for `client`; writes the region id. Needs the GPU transport; the
/// range must be device memory of the engine's GPU inside one allocation (`FERRY_RESULT_BAD_RANGE`
/// with the reason otherwise). Over GDR it is also registered with the NIC. On an engine from
/// [`ferry_engine_connect`] the allocation goes to the daemon as a CUDA IPC handle (memory of
/// `cuMemAlloc` / `cudaMalloc`; not `cuMemCreate` memory) and the daemon maps it.
///
/// # Safety
/// The allocation must stay valid until [`ferry_deregister`] succeeds for the region or the
/// engine is freed.
#[no_mangle]
pub unsafe extern "C" fn ferry_register_gpu(
    engine: *const ferry_engine,
    client: u32,
    ptr: u64,
    len: usize,
    out_region: *mut u32,
) -> ferry_result {
    guard("ferry_register_gpu", || {
        // SAFETY: the allocation promise is the caller's, forwarded.
        let f = |e: &Engine| unsafe { e.register_gpu(ClientId(client), ptr, len) };
        // SAFETY: engine and out_region as the caller promised.
        unsafe { register(engine, out_region, f) }
    })
}

/// A nonzero C SM budget: a count, [`FERRY_SM_BUDGET_ALL`] or [`FERRY_SM_BUDGET_NONE`].
fn sm_budget_of(n: u32) -> SmBudget {
    match n {
        FERRY_SM_BUDGET_ALL => SmBudget::All,
        FERRY_SM_BUDGET_NONE => SmBudget::None,
        n => SmBudget::sms(n).unwrap_or(SmBudget::DEFAULT),
    }
}

/// Changes the copy kernel's SM budget while the engine runs: `sm_budget` as
/// `ferry_config::sm_budget` (a total over the workers; [`FERRY_SM_BUDGET_NONE`]: the copy
/// engine alone, every SM left to the caller's kernels; [`FERRY_SM_BUDGET_ALL`]: every SM), but 0
/// is `FERRY_RESULT_INVALID_ARGUMENT` here. Each worker's next batch uses it. A server lowers it
/// while its forward pass needs every SM (prefill) and raises it when the GPU has room.
/// `FERRY_RESULT_INVALID_ARGUMENT` also for an engine without the GPU transport's CUDA context,
/// or a budget below the number of workers.
///
/// # Safety
/// `engine` must be a live engine.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_set_sm_budget(engine: *const ferry_engine, sm_budget: u32) -> ferry_result {
    guard("ferry_engine_set_sm_budget", || {
        non_null!(engine);
        if sm_budget == 0 {
            return Err(
                Error::setting("sm_budget", 0, "a count of SMs, FERRY_SM_BUDGET_ALL or FERRY_SM_BUDGET_NONE").into()
            );
        }
        // SAFETY: live engine, as the caller promised.
        unsafe { &(*engine).0 }.set_sm_budget(sm_budget_of(sm_budget))?;
        Ok(())
    })
}

/// Deregisters a region: `FERRY_RESULT_REGION_BUSY` while copies that use it are in flight.
///
/// # Safety
/// `engine` must be a live engine.
#[no_mangle]
pub unsafe extern "C" fn ferry_deregister(engine: *const ferry_engine, region: u32) -> ferry_result {
    guard("ferry_deregister", || {
        non_null!(engine);
        // SAFETY: live engine, as the caller promised.
        unsafe { &(*engine).0 }.deregister(RegionId(region))?;
        Ok(())
    })
}

/// Queue settings for [`ferry_queue_open_with`]. Zero in a field means "the default".
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
pub struct ferry_queue_config {
    /// Submission ring slots, a power of two (0: 4096).
    pub submit_capacity: u64,
    /// Completion ring slots, a power of two (0: 4096).
    pub complete_capacity: u64,
    /// How long a `FERRY_FLAG_GATE` descriptor holds the queue before it completes
    /// `FERRY_STATUS_GATE_TIMEOUT`, in nanoseconds (0: 10 s).
    pub gate_timeout_ns: u64,
    /// 1 + the worker to serve the queue (0: the worker with the fewest queues).
    pub worker: u32,
    /// Nonzero: close the queue when the process holding its client end dies (see
    /// `QueueConfig::close_if_client_dies`).
    pub close_if_client_dies: u32,
    /// On an engine over several GPUs (`ferry_config::all_gpus`): 1 + the GPU whose workers
    /// serve the queue (0: any worker).
    pub gpu: u32,
}

/// The queue settings `c` stands for (zero fields: the defaults).
fn queue_config_of(c: &ferry_queue_config) -> QueueConfig {
    let d = QueueConfig::default().with_capacities(c.submit_capacity, c.complete_capacity);
    QueueConfig {
        worker: c.worker.checked_sub(1).map(|w| w as usize),
        gate_timeout: if c.gate_timeout_ns == 0 { d.gate_timeout } else { Duration::from_nanos(c.gate_timeout_ns) },
        close_if_client_dies: c.close_if_client_dies != 0,
        gpu: c.gpu.checked_sub(1).map(|g| g as usize),
        ..d
    }
}

/// Opens a queue for `client` with rings of the given capacities (powers of two; 0 means 4096)
/// and the other settings at their defaults.
///
/// # Safety
/// `engine` must be a live engine; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_open(
    engine: *const ferry_engine,
    client: u32,
    submit_capacity: u64,
    complete_capacity: u64,
    out: *mut *mut ferry_queue,
) -> ferry_result {
    guard("ferry_queue_open", || {
        let config = ferry_queue_config { submit_capacity, complete_capacity, ..Default::default() };
        // SAFETY: engine and out as the caller promised; `config` is a local.
        unsafe { open_queue(engine, client, &config, out) }
    })
}

/// Opens a queue for `client` with the settings in `*config` (zero fields: the defaults).
///
/// # Safety
/// `engine` must be a live engine; `config` valid for a read; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_open_with(
    engine: *const ferry_engine,
    client: u32,
    config: *const ferry_queue_config,
    out: *mut *mut ferry_queue,
) -> ferry_result {
    guard("ferry_queue_open_with", || {
        non_null!(config);
        // SAFETY: as the caller promised.
        unsafe { open_queue(engine, client, &*config, out) }
    })
}

/// Opens the queue of both `ferry_queue_open` forms; called inside an export's boundary.
///
/// # Safety
/// `engine` must be NULL or a live engine, `out` NULL or valid for a write.
unsafe fn open_queue(
    engine: *const ferry_engine,
    client: u32,
    config: &ferry_queue_config,
    out: *mut *mut ferry_queue,
) -> Result<(), Failure> {
    non_null!(engine, out);
    // SAFETY: live engine, as the caller promised.
    let queue = unsafe { &(*engine).0 }.open_queue(ClientId(client), queue_config_of(config))?;
    // SAFETY: writable `out`, as the caller promised.
    unsafe { *out = Box::into_raw(Box::new(ferry_queue(queue))) };
    Ok(())
}

/// Attaches to a queue from its memfd (for example received from the engine's process). The
/// descriptor is duplicated; the caller keeps its own.
///
/// # Safety
/// `out` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_attach(fd: c_int, out: *mut *mut ferry_queue) -> ferry_result {
    guard("ferry_queue_attach", || {
        non_null!(out);
        // SAFETY: F_DUPFD_CLOEXEC on a caller-supplied descriptor; failure is reported.
        let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if own < 0 {
            return Err(Error::SharedMemory {
                what: "duplicating the queue descriptor",
                source: std::io::Error::last_os_error(),
            }
            .into());
        }
        // SAFETY: `own` is a fresh descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(own) };
        let queue = Queue::attach(file)?;
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = Box::into_raw(Box::new(ferry_queue(queue))) };
        Ok(())
    })
}

/// The queue's memfd, owned by the queue (for `poll` and the like; to pass the queue to another
/// process use [`ferry_queue_hand_off`]: an attach fails while this handle holds the client
/// end). Returns -1 for NULL and if ferry panicked (the panic's text is then in
/// [`ferry_last_error`]).
///
/// # Safety
/// `queue` must be NULL or a live queue.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_fd(queue: *const ferry_queue) -> c_int {
    guard_value("ferry_queue_fd", -1, || {
        use std::os::fd::AsRawFd;
        // SAFETY: NULL or a live queue, as the caller promised.
        unsafe { queue.as_ref() }.map_or(-1, |q| q.0.file().as_raw_fd())
    })
}

/// Passes the queue on: releases this process's claim on its client end without closing it and
/// writes a new file descriptor of its memfd to `*fd` (the caller owns it) for another process to
/// [`ferry_queue_attach`]. Unless an argument is NULL, `queue` is freed: if the memfd cannot be duplicated the
/// queue is closed, as by [`ferry_queue_free`], and the call fails. The queue stays served until
/// the attaching client frees it, or the engine shuts down.
///
/// # Safety
/// `queue` must be a live queue, not used afterwards; `fd` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_hand_off(queue: *mut ferry_queue, fd: *mut c_int) -> ferry_result {
    guard("ferry_queue_hand_off", || {
        non_null!(queue, fd);
        // SAFETY: a live queue from ferry_queue_open or _attach, not used after this call, as the
        // caller promised.
        let queue = unsafe { Box::from_raw(queue) };
        let file = queue.0.hand_off()?;
        use std::os::fd::IntoRawFd;
        // SAFETY: `fd` is valid for a write (checked non-null; the caller promised validity).
        unsafe { *fd = file.into_raw_fd() };
        Ok(())
    })
}

/// Pushes up to `n` descriptors (`ferry_descriptor`) (as many as fit), published together; writes how many to
/// `*pushed`. Fewer than `n` means the submission ring is full: poll, then push the rest.
///
/// # Safety
/// `queue` must be a live queue used by this thread only; `descs` valid for `n` reads;
/// `pushed` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_submit(
    queue: *mut ferry_queue,
    descs: *const Descriptor,
    n: usize,
    pushed: *mut usize,
) -> ferry_result {
    guard("ferry_queue_submit", || {
        non_null!(queue, descs, pushed);
        // SAFETY: `descs` is valid for `n` reads, as the caller promised.
        let descs: &[Descriptor] = unsafe { std::slice::from_raw_parts(descs, n) };
        // SAFETY: a live queue used by this thread only, as the caller promised.
        let k = unsafe { &mut (*queue).0 }.submit(descs)?;
        // SAFETY: writable `pushed`, as the caller promised.
        unsafe { *pushed = k };
        Ok(())
    })
}

/// Moves up to `cap` ready completions into `out`; writes how many to `*n`. Never blocks.
/// `FERRY_RESULT_ENGINE_GONE` once nothing is left to read and the process serving the queue
/// (a `ferry serve` daemon) has exited: looked at now and then while polls come back empty
/// (at most every 20 ms); `ferry_queue_submit` says the same when the ring stays full.
///
/// # Safety
/// `queue` must be a live queue used by this thread only; `out` valid for `cap` writes; `n`
/// valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_poll(
    queue: *mut ferry_queue,
    out: *mut Completion,
    cap: usize,
    n: *mut usize,
) -> ferry_result {
    guard("ferry_queue_poll", || {
        non_null!(queue, out, n);
        // SAFETY: `out` is valid for `cap` writes, as the caller promised.
        let out: &mut [Completion] = unsafe { std::slice::from_raw_parts_mut(out, cap) };
        // SAFETY: a live queue used by this thread only, as the caller promised.
        let k = unsafe { &mut (*queue).0 }.poll(out)?;
        // SAFETY: writable `n`, as the caller promised.
        unsafe { *n = k };
        Ok(())
    })
}

/// Like [`ferry_queue_poll`], but waits (spinning in the calling thread) until at least `min`
/// completions are in `out` or `timeout_ns` nanoseconds have passed; writes how many it moved to
/// `*n`, fewer than `min` only after the timeout (still `FERRY_RESULT_OK`: completions taken
/// from the ring are always handed out). `min` above `cap` is `FERRY_RESULT_INVALID_ARGUMENT`;
/// `FERRY_RESULT_QUEUE_NOT_OPEN` when the queue closed with nothing left to read. A binding that
/// releases its interpreter lock around foreign calls (Python's ctypes) lets other threads run
/// while this waits.
///
/// # Safety
/// As [`ferry_queue_poll`].
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_poll_wait(
    queue: *mut ferry_queue,
    out: *mut Completion,
    cap: usize,
    min: usize,
    timeout_ns: u64,
    n: *mut usize,
) -> ferry_result {
    guard("ferry_queue_poll_wait", || {
        non_null!(queue, out, n);
        if min > cap {
            return Err(Error::setting("ferry_queue_poll_wait min", min, format!("at most cap ({cap})")).into());
        }
        // SAFETY: `out` is valid for `cap` writes, as the caller promised.
        let out: &mut [Completion] = unsafe { std::slice::from_raw_parts_mut(out, cap) };
        // SAFETY: a live queue used by this thread only, as the caller promised.
        let k = unsafe { &mut (*queue).0 }.poll_wait(out, min, Duration::from_nanos(timeout_ns))?;
        // SAFETY: writable `n`, as the caller promised.
        unsafe { *n = k };
        Ok(())
    })
}

/// Descriptors pushed on this queue so far: the watermark of everything pushed, for
/// [`ferry_queue_stream_wait`]. Returns 0 for NULL and if ferry panicked.
///
/// # Safety
/// `queue` must be NULL or a live queue.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_pushed(queue: *const ferry_queue) -> u64 {
    guard_value("ferry_queue_pushed", 0, || {
        // SAFETY: NULL or a live queue, as the caller promised.
        unsafe { queue.as_ref() }.map_or(0, |q| q.0.pushed())
    })
}

/// Enqueues on the CUDA stream `stream` (a `CUstream` / `cudaStream_t` of the engine's device in
/// its primary context; NULL: the legacy default stream) a wait, on the GPU, until the
/// descriptors with `seq < watermark` have finished their copies (the queue's landed word,
/// written by the CUDA transport's stream right behind them): work enqueued after it sees every
/// byte they copied, and the CPU never waits. Launch every kernel that runs behind the
/// wait once before (or set `CUDA_MODULE_LOADING=EAGER`): a kernel's lazy first load may wait
/// for the context to go idle, which the blocked stream prevents. `FERRY_RESULT_INVALID_ARGUMENT` without the GPU transport's CUDA
/// context, or where the GPU lacks 64-bit stream memory operations (the text names the device
/// attribute).
///
/// # Safety
/// `engine` and `queue` must be live and the queue this engine's; `stream` a live stream as
/// above; the queue must not be freed before the stream has passed the wait.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_stream_wait(
    engine: *const ferry_engine,
    queue: *mut ferry_queue,
    stream: *mut std::ffi::c_void,
    watermark: u64,
) -> ferry_result {
    guard("ferry_queue_stream_wait", || {
        non_null!(engine, queue);
        // SAFETY: live engine and queue, a live stream, the queue kept: the caller's promises.
        unsafe { (*engine).0.stream_wait(&mut (*queue).0, stream, watermark) }?;
        Ok(())
    })
}

/// Enqueues on `stream` a write of `value` into the queue's gate word, after the stream's
/// earlier work (its writes visible first): a `FERRY_FLAG_GATE` descriptor waiting for `value`
/// or less opens. Fails as [`ferry_queue_stream_wait`].
///
/// # Safety
/// As [`ferry_queue_stream_wait`].
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_stream_signal(
    engine: *const ferry_engine,
    queue: *mut ferry_queue,
    stream: *mut std::ffi::c_void,
    value: u64,
) -> ferry_result {
    guard("ferry_queue_stream_signal", || {
        non_null!(engine, queue);
        // SAFETY: as in ferry_queue_stream_wait.
        unsafe { (*engine).0.stream_signal(&mut (*queue).0, stream, value) }?;
        Ok(())
    })
}

/// Enqueues on `stream` a wait until the queue's notification slot `slot` holds `value` (a
/// `FERRY_FLAG_NOTIFY` descriptor wrote it: everything pushed before it has completed), then a
/// write clearing the slot for the next notification. Captured in a CUDA graph, a replay waits
/// for the next notification of that slot. Fails as [`ferry_queue_stream_wait`], and
/// `FERRY_RESULT_INVALID_ARGUMENT` for a slot not below `FERRY_NOTIFY_SLOTS`.
///
/// # Safety
/// As [`ferry_queue_stream_wait`].
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_stream_wait_slot(
    engine: *const ferry_engine,
    queue: *mut ferry_queue,
    stream: *mut std::ffi::c_void,
    slot: u32,
    value: u64,
) -> ferry_result {
    guard("ferry_queue_stream_wait_slot", || {
        non_null!(engine, queue);
        // SAFETY: as in ferry_queue_stream_wait.
        unsafe { (*engine).0.stream_wait_slot(&mut (*queue).0, stream, slot, value) }?;
        Ok(())
    })
}

/// Reads notification slot `slot` into `*value` (0: clear).
///
/// # Safety
/// `queue` must be a live queue and `value` writable.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_slot(queue: *const ferry_queue, slot: u32, value: *mut u64) -> ferry_result {
    guard("ferry_queue_slot", || {
        non_null!(queue, value);
        // SAFETY: a live queue and a writable out pointer, as the caller promised.
        unsafe { *value = (*queue).0.slot(slot)? };
        Ok(())
    })
}

/// Clears notification slot `slot` from the CPU, so that the queue's next notification for it
/// can land.
///
/// # Safety
/// `queue` must be a live queue.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_clear_slot(queue: *const ferry_queue, slot: u32) -> ferry_result {
    guard("ferry_queue_clear_slot", || {
        non_null!(queue);
        // SAFETY: a live queue, as the caller promised.
        unsafe { &(*queue).0 }.clear_slot(slot)?;
        Ok(())
    })
}

/// Sets the queue's gate word from the CPU (see `FERRY_FLAG_GATE`); what this thread wrote
/// before is visible to the copies behind the gate.
///
/// # Safety
/// `queue` must be a live queue.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_signal(queue: *const ferry_queue, value: u64) -> ferry_result {
    guard("ferry_queue_signal", || {
        non_null!(queue);
        // SAFETY: a live queue, as the caller promised.
        unsafe { &(*queue).0 }.signal(value);
        Ok(())
    })
}

/// In-order watermark: every descriptor with seq below it has its completion published.
/// Returns 0 for NULL and if ferry panicked (the panic's text is then in [`ferry_last_error`]):
/// 0 claims nothing complete, so a caller never reuses memory too early on it.
///
/// # Safety
/// `queue` must be NULL or a live queue.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_watermark(queue: *const ferry_queue) -> u64 {
    guard_value("ferry_queue_watermark", 0, || {
        // SAFETY: NULL or a live queue, as the caller promised.
        unsafe { queue.as_ref() }.map_or(0, |q| q.0.watermark())
    })
}

/// Frees a queue handle. NULL is ignored. Never unwinds: a panic is written to stderr.
///
/// # Safety
/// `queue` must be NULL or come from [`ferry_queue_open`]/[`ferry_queue_attach`], and not be
/// used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_free(queue: *mut ferry_queue) {
    guard_free("ferry_queue_free", || {
        if !queue.is_null() {
            // SAFETY: the caller hands back ownership of a pointer from ferry_queue_open/attach.
            drop(unsafe { Box::from_raw(queue) });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ptr::{null, null_mut};

    /// The calling thread's last error text, through the export.
    fn last_error() -> String {
        let mut buf = [0 as c_char; 512];
        // SAFETY: `buf` is valid for its length.
        let n = unsafe { ferry_last_error(buf.as_mut_ptr(), buf.len()) };
        // SAFETY: ferry_last_error NUL-terminated `buf`.
        let text = unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_str().unwrap().to_owned();
        assert_eq!(n, text.len(), "{text}");
        text
    }

    #[test]
    fn the_route_fields_set_the_crossovers_and_zero_keeps_the_default() {
        let route = |h2d, d2h| {
            let c = ferry_config { copy_engine_from_h2d: h2d, copy_engine_from_d2h: d2h, ..ferry_config::default() };
            gpu_config(&c, None).expect("valid").cuda.route.copy_engine_from
        };
        assert_eq!(route(0, 0), RouteTable::HOPPER.copy_engine_from);
        assert_eq!(route(1 << 20, 0), [1 << 20, RouteTable::HOPPER.copy_engine_from[1]]);
        assert_eq!(route(0, u64::MAX), [RouteTable::HOPPER.copy_engine_from[0], u64::MAX]);
    }

    #[test]
    fn the_resident_life_field_is_in_microseconds_and_zero_keeps_the_default() {
        let gpu = |us| gpu_config(&ferry_config { resident_life_us: us, ..ferry_config::default() }, None).unwrap();
        assert_eq!(gpu(0).cuda.resident_life, CudaConfig::default().resident_life);
        assert_eq!(gpu(5000).cuda.resident_life, Duration::from_millis(5));
        // The range is the engine's check, at start.
        let check = |us| EngineConfig { transport: TransportKind::Gpu(gpu(us)), ..EngineConfig::default() }.check();
        check(1000).unwrap();
        check(1_000_000).unwrap();
        for bad in [999, 1_000_001, u64::MAX] {
            let err = check(bad).unwrap_err();
            assert!(err.to_string().contains("resident_life"), "{err}");
        }
    }

    #[test]
    fn the_resident_writers_field_zero_keeps_the_default() {
        let gpu = |n| gpu_config(&ferry_config { resident_writers: n, ..ferry_config::default() }, None).unwrap();
        assert_eq!(gpu(0).cuda.resident_writers, CudaConfig::default().resident_writers);
        assert_eq!(gpu(1).cuda.resident_writers, 1);
        assert_eq!(gpu(u32::MAX).cuda.resident_writers, u32::MAX);
    }

    #[test]
    fn a_panic_becomes_the_panic_code_and_names_the_export() {
        assert_eq!(guard("ferry_test", || panic!("boom {}", 42)), ferry_result::Panic);
        assert_eq!(last_error(), "ferry_test panicked: boom 42");
        assert_eq!(guard("ferry_test", || panic!("a literal")), ferry_result::Panic);
        assert_eq!(last_error(), "ferry_test panicked: a literal");
    }

    #[test]
    fn failures_become_their_codes_and_success_leaves_the_text() {
        let p: *const u8 = null();
        let null_p = || {
            non_null!(p);
            Ok(())
        };
        assert_eq!(guard("ferry_test", null_p), ferry_result::NullArgument);
        assert_eq!(last_error(), "ferry_test: p is NULL");
        assert_eq!(guard("ferry_test", || Err(Error::ShutDown.into())), ferry_result::ShutDown);
        assert_eq!(last_error(), Error::ShutDown.to_string());
        assert_eq!(guard("ferry_test", || Ok(())), ferry_result::Ok);
        assert_eq!(last_error(), Error::ShutDown.to_string());
    }

    #[test]
    fn a_plain_value_returns_its_sentinel_on_a_panic() {
        assert_eq!(guard_value("ferry_test", -1, || -> c_int { panic!("boom") }), -1);
        assert_eq!(last_error(), "ferry_test panicked: boom");
        assert_eq!(guard_value("ferry_test", -1, || 5), 5);
    }

    #[test]
    fn a_free_function_swallows_a_panic() {
        guard_free("ferry_test_free", || panic!("in drop"));
        assert_eq!(last_error(), "ferry_test_free panicked: in drop");
    }

    #[test]
    fn a_payload_whose_drop_panics_stays_inside() {
        struct Bomb;
        impl Drop for Bomb {
            fn drop(&mut self) {
                panic!("the payload was dropped");
            }
        }
        assert_eq!(guard("ferry_test", || std::panic::panic_any(Bomb)), ferry_result::Panic);
        assert_eq!(last_error(), "ferry_test panicked: a panic without a message");
    }

    #[test]
    fn null_arguments_give_sentinels_and_leave_outputs_alone() {
        // SAFETY: every pointer is NULL or valid, as the exports allow.
        unsafe {
            assert_eq!(ferry_host_buffer_region(null()), 0);
            assert!(ferry_host_buffer_data(null()).is_null());
            assert_eq!(ferry_queue_fd(null()), -1);
            assert_eq!(ferry_queue_watermark(null()), 0);
            assert_eq!(ferry_engine_transport(null(), null_mut(), 0), 0);
            ferry_engine_free(null_mut());
            ferry_host_buffer_free(null_mut());
            ferry_queue_free(null_mut());
            assert_eq!(ferry_engine_start(null(), null_mut()), ferry_result::NullArgument);
            assert_eq!(last_error(), "ferry_engine_start: out is NULL");
            let mut client = 7;
            assert_eq!(ferry_engine_new_client(null(), &mut client), ferry_result::NullArgument);
            assert_eq!((client, last_error().as_str()), (7, "ferry_engine_new_client: engine is NULL"));
            let mut pushed = 7;
            assert_eq!(ferry_queue_submit(null_mut(), null(), 1, &mut pushed), ferry_result::NullArgument);
            assert_eq!((pushed, last_error().as_str()), (7, "ferry_queue_submit: queue is NULL"));
        }
    }

    #[test]
    fn a_failed_call_leaves_its_output_alone() {
        let config = ferry_config { unpinned: 1, ..ferry_config::default() };
        let mut engine = null_mut();
        // SAFETY: valid config and output.
        assert_eq!(unsafe { ferry_engine_start(&config, &mut engine) }, ferry_result::Ok);
        let mut stats = ferry_worker_stats { iterations: 7, ..ferry_worker_stats::default() };
        // SAFETY: a live engine and a valid output.
        assert_eq!(unsafe { ferry_engine_stats(engine, 5, &mut stats) }, ferry_result::InvalidArgument);
        assert_eq!(stats.iterations, 7);
        assert!(last_error().contains("worker is 5"), "{}", last_error());
        let mut region = 7;
        // SAFETY: a live engine; NULL memory is refused before it is touched.
        let refused = unsafe { ferry_register_host(engine, 0, null_mut(), 4096, &mut region) };
        assert_ne!(refused, ferry_result::Ok);
        assert_eq!(region, 7);
        // SAFETY: from ferry_engine_start, not used afterwards.
        unsafe { ferry_engine_free(engine) };
    }
}
