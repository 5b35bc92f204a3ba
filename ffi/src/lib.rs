//! The C ABI of ferry.
//!
//! Conventions (as in rustls-ffi):
//! - Every function returns a [`ferry_result`] (or a plain value where nothing can fail) and
//!   never unwinds: a panic inside becomes `FERRY_RESULT_PANIC`.
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
    HostBuffer, IdlePolicy, Queue, QueueConfig, RegionId, SmBudget, Strategy, TransportKind, UseGdr,
};
use std::cell::RefCell;
use std::ffi::{c_char, c_int};
use std::os::fd::FromRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};

/// Result of a call.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ferry_result {
    /// Success.
    Ok = 0,
    /// A required pointer argument was NULL.
    NullArgument = 1,
    /// ferry panicked; the object involved should not be used again.
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
}

/// Flag: start only after every earlier descriptor of the queue completed.
pub const FERRY_FLAG_FENCE: u32 = ferry::FLAG_FENCE;

/// Engine settings for [`ferry_engine_start`]. Zero in a field means "the default".
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ferry_config {
    /// Worker threads (default 1).
    pub workers: u32,
    /// 0: host transport (CPU copies); 1: null transport (no data moves); 2: GPU (host <-> GPU
    /// over the NIC or with the CUDA driver, as `use_gdr` says).
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
    /// GPU transport, CUDA driver copies: 0 auto, 1 memcpy, 2 batch, 3 kernel.
    pub cuda_strategy: u32,
    /// GPU transport: SMs the copy kernel may use, in total over the workers (0: the default,
    /// 8; [`FERRY_SM_BUDGET_ALL`]: every SM). Fewer than `workers` is a start-up error.
    pub sm_budget: u32,
    /// GPU transport: 0 auto (GDR when a NIC passes its self-test, else the CUDA driver), 1 off
    /// (the CUDA driver), 2 on (GDR, or a start-up error naming what is missing).
    pub use_gdr: u32,
    /// GPU transport: the RDMA device for GDR (NUL-terminated), or NULL for the topology plan's.
    pub nic: *const c_char,
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
        }
    }
}

/// `ferry_config::sm_budget`: every SM of the GPU.
pub const FERRY_SM_BUDGET_ALL: u32 = u32::MAX;

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
        Error::Config(_) | Error::OutOfRange { .. } => ferry_result::InvalidArgument,
        Error::CoreOffline { .. } | Error::PinWorker { .. } | Error::Topology(_) => ferry_result::CoreUnavailable,
        Error::SpawnWorker { .. } | Error::SharedMemory { .. } => ferry_result::SystemError,
        Error::Ring(_) | Error::QueueLayout(_) => ferry_result::LayoutMismatch,
        Error::RegionTableFull { .. } => ferry_result::RegionTableFull,
        Error::BadRange { .. } => ferry_result::BadRange,
        Error::UnknownRegion { .. } => ferry_result::UnknownRegion,
        Error::RegionBusy { .. } | Error::WorkerUnresponsive { .. } => ferry_result::RegionBusy,
        Error::QueueNotOpen { .. } => ferry_result::QueueNotOpen,
        Error::Timeout { .. } => ferry_result::Timeout,
        Error::ShutDown => ferry_result::ShutDown,
        Error::Cuda(_) | Error::TransportStart { .. } | Error::Benchmark(_) => ferry_result::SystemError,
        Error::Gdr(_) | Error::NoDeviceTransport { .. } => ferry_result::SystemError,
        Error::GpuRange { .. } => ferry_result::BadRange,
        Error::QueueEndClaimed { .. } => ferry_result::InvalidArgument,
    }
}

/// Runs `f` behind the panic boundary and records the error text.
fn guard(f: impl FnOnce() -> Result<(), Error>) -> ferry_result {
    let (code, text) = match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => return ferry_result::Ok,
        Ok(Err(e)) => (code_of(&e), e.to_string()),
        Err(_) => (ferry_result::Panic, "ferry panicked; see stderr".to_owned()),
    };
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
    code
}

fn null_argument(name: &str) -> Error {
    Error::Config(format!("{name} is NULL"))
}

macro_rules! non_null {
    ($p:ident) => {
        if $p.is_null() {
            LAST_ERROR.with(|last| *last.borrow_mut() = null_argument(stringify!($p)).to_string());
            return ferry_result::NullArgument;
        }
    };
}

/// Copies the calling thread's last error text into `buf` (NUL-terminated, truncated to
/// `len - 1` bytes) and returns the full text's length in bytes.
///
/// # Safety
/// `buf` must be NULL or valid for `len` bytes.
#[no_mangle]
pub unsafe extern "C" fn ferry_last_error(buf: *mut c_char, len: usize) -> usize {
    // SAFETY: forwarded from the caller.
    LAST_ERROR.with(|last| unsafe { write_text(&last.borrow(), buf, len) })
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
    non_null!(out);
    // SAFETY: NULL or a valid ferry_config, as the caller promised.
    let c = unsafe { config.as_ref() }.copied().unwrap_or_default();
    guard(|| {
        let defaults = EngineConfig::default();
        let transport = match c.transport {
            0 => TransportKind::Host,
            1 => TransportKind::Null,
            // SAFETY: NULL or a NUL-terminated string, as the caller promised.
            2 => TransportKind::Gpu(gpu_config(&c, unsafe { optional_str(c.nic) }?)?),
            other => return Err(Error::Config(format!("transport {other} is unknown (0 host, 1 null, 2 GPU)"))),
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

/// The GPU transport's settings from the C struct: a zero field takes the Rust default.
fn gpu_config(c: &ferry_config, nic: Option<String>) -> Result<GpuConfig, Error> {
    let strategy = match c.cuda_strategy {
        0 => Strategy::Auto,
        1 => Strategy::Memcpy,
        2 => Strategy::Batch,
        3 => Strategy::Kernel,
        other => {
            return Err(Error::Config(format!(
                "cuda_strategy {other} is unknown (0 auto, 1 memcpy, 2 batch, 3 kernel)"
            )))
        }
    };
    let sm_budget = match c.sm_budget {
        0 => SmBudget::DEFAULT,
        FERRY_SM_BUDGET_ALL => SmBudget::All,
        n => SmBudget::sms(n).expect("0 is matched above"),
    };
    let use_gdr = match c.use_gdr {
        0 => UseGdr::Auto,
        1 => UseGdr::Off,
        2 => UseGdr::On,
        other => return Err(Error::Config(format!("use_gdr {other} is unknown (0 auto, 1 off, 2 on)"))),
    };
    let device = u32::try_from(c.cuda_device)
        .map_err(|_| Error::Config(format!("cuda_device {} is negative", c.cuda_device)))?;
    Ok(GpuConfig {
        device,
        cuda: CudaConfig { strategy, sm_budget, ..CudaConfig::default() },
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
    text.to_str().map(|t| Some(t.to_owned())).map_err(|_| Error::Config("the NIC name is not UTF-8".into()))
}

/// Writes the engine's transport into `buf` as text ("gdr on mlx5_0", "cuda", "host"), followed
/// by why it is what it is where that was a choice ("use_gdr = auto: ..."), NUL-terminated and
/// cut to fit; returns the full length without the NUL. `buf` may be NULL with `len` 0.
///
/// # Safety
/// `engine` must be a live engine; `buf` valid for `len` bytes of writes (or NULL with 0).
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_transport(engine: *const ferry_engine, buf: *mut c_char, len: usize) -> usize {
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
    // SAFETY: forwarded from the caller.
    unsafe { write_text(&text, buf, len) }
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
    non_null!(engine);
    non_null!(out);
    guard(|| {
        // SAFETY: live engine, as the caller promised.
        let stats = unsafe { &(*engine).0 }.stats();
        let s = stats
            .get(worker as usize)
            .ok_or_else(|| Error::Config(format!("worker {worker}: the engine has {}", stats.len())))?;
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
        };
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = value };
        Ok(())
    })
}

/// Shuts the engine down (started copies finish, queued ones are cancelled, queues close) and
/// frees it. NULL is ignored. Queues and buffers stay valid objects to free afterwards.
///
/// # Safety
/// `engine` must be NULL or come from [`ferry_engine_start`], and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_free(engine: *mut ferry_engine) {
    if engine.is_null() {
        return;
    }
    // SAFETY: the caller hands back ownership of a pointer from ferry_engine_start.
    let engine = unsafe { Box::from_raw(engine) };
    let _ = catch_unwind(AssertUnwindSafe(|| drop(engine)));
}

/// Writes a new client id to `*out`.
///
/// # Safety
/// `engine` must be a live engine; `out` valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_engine_new_client(engine: *const ferry_engine, out: *mut u32) -> ferry_result {
    non_null!(engine);
    non_null!(out);
    guard(|| {
        // SAFETY: live engine and writable `out`, as the caller promised.
        unsafe { *out = (*engine).0.new_client().0 };
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
    non_null!(engine);
    non_null!(out);
    guard(|| {
        // SAFETY: live engine, as the caller promised.
        let buffer = unsafe { &(*engine).0 }.allocate_host(ClientId(client), len)?;
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = Box::into_raw(Box::new(ferry_host_buffer(buffer))) };
        Ok(())
    })
}

/// The region id of a buffer (0 for NULL, which is never a valid id).
///
/// # Safety
/// `buffer` must be NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_buffer_region(buffer: *const ferry_host_buffer) -> u32 {
    // SAFETY: NULL or a live buffer, as the caller promised.
    unsafe { buffer.as_ref() }.map_or(0, |b| b.0.id().0)
}

/// The first byte of a buffer (NULL for NULL).
///
/// # Safety
/// `buffer` must be NULL or a live buffer.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_buffer_data(buffer: *const ferry_host_buffer) -> *mut u8 {
    // SAFETY: NULL or a live buffer, as the caller promised.
    unsafe { buffer.as_ref() }.map_or(std::ptr::null_mut(), |b| b.0.as_ptr())
}

/// Frees the buffer handle. NULL is ignored. Does not deregister the region.
///
/// # Safety
/// `buffer` must be NULL or come from [`ferry_host_alloc`], and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_host_buffer_free(buffer: *mut ferry_host_buffer) {
    if !buffer.is_null() {
        // SAFETY: the caller hands back ownership of a pointer from ferry_host_alloc.
        drop(unsafe { Box::from_raw(buffer) });
    }
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
    // SAFETY: the memory promise is the caller's, forwarded.
    let f = |e: &Engine| unsafe { e.register_host(ClientId(client), ptr, len) };
    // SAFETY: engine and out_region as the caller promised.
    unsafe { register(engine, out_region, f) }
}

/// Runs `f` (one of the engine's registrations) behind the panic boundary and writes the region
/// id it returns to `*out_region`.
///
/// # Safety
/// `engine` must be NULL or a live engine, `out_region` NULL or valid for a write, and `f`'s own
/// promises must hold.
unsafe fn register(
    engine: *const ferry_engine,
    out_region: *mut u32,
    f: impl FnOnce(&Engine) -> Result<RegionId, Error>,
) -> ferry_result {
    non_null!(engine);
    non_null!(out_region);
    guard(|| {
        // SAFETY: live engine, as the caller promised.
        let id = f(unsafe { &(*engine).0 })?;
        // SAFETY: writable `out_region`, as the caller promised.
        unsafe { *out_region = id.0 };
        Ok(())
    })
}

/// Registers `len` bytes of GPU memory at device address `ptr` (from `cuMemAlloc` or a
/// framework's allocator) for `client`; writes the region id. Needs the GPU transport; the
/// range must be device memory of the engine's GPU inside one allocation (`FERRY_RESULT_BAD_RANGE`
/// with the reason otherwise). Over GDR it is also registered with the NIC.
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
    // SAFETY: the allocation promise is the caller's, forwarded.
    let f = |e: &Engine| unsafe { e.register_gpu(ClientId(client), ptr, len) };
    // SAFETY: engine and out_region as the caller promised.
    unsafe { register(engine, out_region, f) }
}

/// Deregisters a region: `FERRY_RESULT_REGION_BUSY` while copies that use it are in flight.
///
/// # Safety
/// `engine` must be a live engine.
#[no_mangle]
pub unsafe extern "C" fn ferry_deregister(engine: *const ferry_engine, region: u32) -> ferry_result {
    non_null!(engine);
    // SAFETY: live engine, as the caller promised.
    guard(|| unsafe { &(*engine).0 }.deregister(RegionId(region)))
}

/// Opens a queue for `client` with rings of the given capacities (powers of two; 0 means 4096).
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
    non_null!(engine);
    non_null!(out);
    guard(|| {
        let defaults = QueueConfig::default();
        let config = QueueConfig {
            submit_capacity: if submit_capacity == 0 { defaults.submit_capacity } else { submit_capacity },
            complete_capacity: if complete_capacity == 0 { defaults.complete_capacity } else { complete_capacity },
            worker: None,
        };
        // SAFETY: live engine, as the caller promised.
        let queue = unsafe { &(*engine).0 }.open_queue(ClientId(client), config)?;
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = Box::into_raw(Box::new(ferry_queue(queue))) };
        Ok(())
    })
}

/// Attaches to a queue from its memfd (for example received from the engine's process). The
/// descriptor is duplicated; the caller keeps its own.
///
/// # Safety
/// `out` must be valid for a write.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_attach(fd: c_int, out: *mut *mut ferry_queue) -> ferry_result {
    non_null!(out);
    guard(|| {
        // SAFETY: F_DUPFD_CLOEXEC on a caller-supplied descriptor; failure is reported.
        let own = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if own < 0 {
            return Err(Error::SharedMemory {
                what: "duplicating the queue descriptor",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `own` is a fresh descriptor that nothing else owns.
        let file = unsafe { std::fs::File::from_raw_fd(own) };
        let queue = Queue::attach(file)?;
        // SAFETY: writable `out`, as the caller promised.
        unsafe { *out = Box::into_raw(Box::new(ferry_queue(queue))) };
        Ok(())
    })
}

/// The queue's memfd, to pass to another process (-1 for NULL). Owned by the queue.
///
/// # Safety
/// `queue` must be NULL or a live queue.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_fd(queue: *const ferry_queue) -> c_int {
    use std::os::fd::AsRawFd;
    // SAFETY: NULL or a live queue, as the caller promised.
    unsafe { queue.as_ref() }.map_or(-1, |q| q.0.file().as_raw_fd())
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
    non_null!(queue);
    non_null!(descs);
    non_null!(pushed);
    guard(|| {
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
    non_null!(queue);
    non_null!(out);
    non_null!(n);
    guard(|| {
        // SAFETY: `out` is valid for `cap` writes, as the caller promised.
        let out: &mut [Completion] = unsafe { std::slice::from_raw_parts_mut(out, cap) };
        // SAFETY: a live queue used by this thread only, as the caller promised.
        let k = unsafe { &mut (*queue).0 }.poll(out)?;
        // SAFETY: writable `n`, as the caller promised.
        unsafe { *n = k };
        Ok(())
    })
}

/// In-order watermark: every descriptor with seq below it has its completion published
/// (0 for NULL).
///
/// # Safety
/// `queue` must be NULL or a live queue.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_watermark(queue: *const ferry_queue) -> u64 {
    // SAFETY: NULL or a live queue, as the caller promised.
    unsafe { queue.as_ref() }.map_or(0, |q| q.0.watermark())
}

/// Frees a queue handle. NULL is ignored.
///
/// # Safety
/// `queue` must be NULL or come from [`ferry_queue_open`]/[`ferry_queue_attach`], and not be
/// used afterwards.
#[no_mangle]
pub unsafe extern "C" fn ferry_queue_free(queue: *mut ferry_queue) {
    if !queue.is_null() {
        // SAFETY: the caller hands back ownership.
        drop(unsafe { Box::from_raw(queue) });
    }
}
