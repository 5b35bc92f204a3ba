//! The CUDA driver, loaded at run time through cudarc's raw bindings: presence, version, and
//! the devices with the attributes ferry cares about.
//!
//! Every entry point is checked before it is called: cudarc panics on a missing library or
//! symbol, so [`Driver::load`] first asks whether `libcuda` is present, and features newer than
//! the driver are reported as absent, never called.

use cudarc::driver::sys;
use std::ffi::c_int;
use std::os::fd::FromRawFd;

/// Why a CUDA call failed or CUDA cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CudaError {
    /// The driver lists no GPU.
    #[error("the CUDA driver lists no GPU")]
    NoGpu,
    /// No device has this ordinal.
    #[error("no CUDA device {ordinal} (cuDeviceGetCount says fewer): check GpuConfig::device")]
    NoDevice {
        /// The ordinal asked for.
        ordinal: i32,
    },
    /// A range cannot be exported as a dma-buf.
    #[error("cannot export {len} bytes at {ptr:#x} page-aligned as a dma-buf")]
    Unexportable {
        /// Start address.
        ptr: u64,
        /// Length.
        len: u64,
    },
    /// A string handed to the driver holds a NUL byte.
    #[error("the {what} holds a NUL byte")]
    NulByte {
        /// What string.
        what: &'static str,
    },
    /// No libcuda on this machine.
    #[error("libcuda.so.1 not found: install the NVIDIA driver (no CUDA toolkit is needed)")]
    NoLibrary,
    /// A driver call failed.
    #[error("{call} failed with {code:?}")]
    Call {
        /// The driver function.
        call: &'static str,
        /// Its result.
        code: sys::CUresult,
    },
}

/// Driver API version that added cuMemcpyBatchAsync.
pub const BATCH_COPY_VERSION: i32 = 12080;

/// The first driver with `cuFuncLoad` (12.4).
const FUNC_LOAD_VERSION: i32 = 12040;

/// The loaded, initialised driver.
#[derive(Debug)]
pub struct Driver {
    version: i32,
}

/// One CUDA device as the driver reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// CUDA ordinal.
    pub ordinal: i32,
    /// Name, such as "NVIDIA H100 80GB HBM3".
    pub name: String,
    /// PCI bus id in sysfs form (`0000:00:06.0`).
    pub pci_bus_id: String,
    /// CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED.
    pub gpudirect_rdma: bool,
    /// CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED.
    pub dma_buf: bool,
    /// Streaming multiprocessors.
    pub sm_count: i32,
    /// The compute capability's major number (9 for Hopper).
    pub compute_major: i32,
    /// CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM: registered host memory has
    /// the same address on the device (what the copy kernel relies on).
    pub host_pointer_for_registered: bool,
    /// CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR, bytes.
    pub shared_per_sm: i32,
    /// CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN: the most a block may ask for.
    pub shared_per_block_optin: i32,
    /// CU_DEVICE_ATTRIBUTE_MAX_PITCH: the largest pitch a 2D copy takes, bytes.
    pub max_pitch: i32,
    /// CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS: `cuStreamWaitValue64` and
    /// `cuStreamWriteValue64` work (stream ordering, `Engine::stream_wait`).
    pub stream_mem_ops_64: bool,
}

impl CudaError {
    /// The driver's result code, for a completion's `detail` (0 when not a driver call).
    pub fn code(&self) -> u32 {
        match self {
            CudaError::Call { code, .. } => *code as u32,
            _ => 0,
        }
    }
}

fn check(call: &'static str, code: sys::CUresult) -> Result<(), CudaError> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaError::Call { call, code })
    }
}

/// `00000000:00:06.0` (CUDA's form) to `0000:00:06.0` (sysfs's).
pub fn sysfs_bus_id(cuda: &str) -> String {
    let cuda = cuda.trim().to_ascii_lowercase();
    match cuda.split_once(':') {
        Some((domain, rest)) => match u32::from_str_radix(domain, 16) {
            Ok(d) => format!("{d:04x}:{rest}"),
            Err(_) => cuda,
        },
        None => cuda,
    }
}

impl Driver {
    /// Loads libcuda and calls cuInit.
    pub fn load() -> Result<Driver, CudaError> {
        // SAFETY: only tries to open the library; returns false when it is absent.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaError::NoLibrary);
        }
        // SAFETY: the library is present; cuInit and cuDriverGetVersion exist in every driver.
        check("cuInit", unsafe { sys::cuInit(0) })?;
        let mut version: c_int = 0;
        // SAFETY: `version` is a valid out pointer.
        check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) })?;
        Ok(Driver { version })
    }

    /// Driver API version, such as 13000 for 13.0.
    pub fn version(&self) -> i32 {
        self.version
    }

    /// "13.0" for 13000.
    pub fn version_text(&self) -> String {
        format!("{}.{}", self.version / 1000, (self.version % 1000) / 10)
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<Device>, CudaError> {
        let mut count: c_int = 0;
        // SAFETY: initialised driver; valid out pointer.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
        (0..count).map(|ordinal| self.device(ordinal)).collect()
    }

    fn device(&self, ordinal: i32) -> Result<Device, CudaError> {
        let mut dev: sys::CUdevice = 0;
        // SAFETY: initialised driver; ordinal < count; valid out pointer.
        check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut dev, ordinal) })?;
        let mut name = [0 as std::ffi::c_char; 256];
        // SAFETY: the buffer holds `len` bytes.
        check("cuDeviceGetName", unsafe { sys::cuDeviceGetName(name.as_mut_ptr(), name.len() as c_int, dev) })?;
        let mut bus = [0 as std::ffi::c_char; 64];
        // SAFETY: the buffer holds `len` bytes.
        check("cuDeviceGetPCIBusId", unsafe { sys::cuDeviceGetPCIBusId(bus.as_mut_ptr(), bus.len() as c_int, dev) })?;
        let text = |buf: &[std::ffi::c_char]| {
            // SAFETY: the driver wrote a NUL-terminated string into the buffer, which ends in NUL
            // anyway (it was zeroed and the length passed leaves the last byte alone or NUL).
            unsafe { std::ffi::CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()
        };
        let attribute = |attr: sys::CUdevice_attribute| -> Result<i32, CudaError> {
            let mut value: c_int = 0;
            // SAFETY: valid device and out pointer; these attributes exist since CUDA 11.
            check("cuDeviceGetAttribute", unsafe { sys::cuDeviceGetAttribute(&mut value, attr, dev) })?;
            Ok(value)
        };
        use sys::CUdevice_attribute as A;
        Ok(Device {
            ordinal,
            name: text(&name),
            pci_bus_id: sysfs_bus_id(&text(&bus)),
            gpudirect_rdma: attribute(A::CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED)? == 1,
            dma_buf: attribute(A::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED)? == 1,
            sm_count: attribute(A::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
            compute_major: attribute(A::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            host_pointer_for_registered: attribute(A::CU_DEVICE_ATTRIBUTE_CAN_USE_HOST_POINTER_FOR_REGISTERED_MEM)?
                == 1,
            shared_per_sm: attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_MULTIPROCESSOR)?,
            shared_per_block_optin: attribute(A::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)?,
            max_pitch: attribute(A::CU_DEVICE_ATTRIBUTE_MAX_PITCH)?,
            stream_mem_ops_64: attribute(A::CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS)? == 1,
        })
    }
}

/// The GPUs the CUDA driver lists: an error when there is no driver or no GPU (the reason says
/// which).
pub fn gpus() -> Result<Vec<Device>, CudaError> {
    let devices = Driver::load()?.devices()?;
    if devices.is_empty() {
        return Err(CudaError::NoGpu);
    }
    Ok(devices)
}

/// A device's primary context, retained; made current on each thread that uses it.
#[derive(Debug)]
pub struct Context {
    device: sys::CUdevice,
    context: sys::CUcontext,
    /// The device, as listed by [`Driver::devices`].
    pub info: Device,
    /// Driver API version.
    pub driver_version: i32,
}

// SAFETY: a primary context may be made current on any thread; the handle is only passed to the
// driver, which synchronises its own state.
unsafe impl Send for Context {}
// SAFETY: as for Send.
unsafe impl Sync for Context {}

impl Context {
    /// Retains the primary context of device `ordinal` and makes it current on this thread.
    pub fn new(driver: &Driver, ordinal: i32) -> Result<Context, CudaError> {
        let devices = driver.devices()?;
        let info = devices.into_iter().find(|d| d.ordinal == ordinal).ok_or(CudaError::NoDevice { ordinal })?;
        let mut device: sys::CUdevice = 0;
        // SAFETY: initialised driver; valid ordinal; valid out pointer.
        check("cuDeviceGet", unsafe { sys::cuDeviceGet(&mut device, ordinal) })?;
        let mut context: sys::CUcontext = std::ptr::null_mut();
        // SAFETY: valid device and out pointer.
        check("cuDevicePrimaryCtxRetain", unsafe { sys::cuDevicePrimaryCtxRetain(&mut context, device) })?;
        let ctx = Context { device, context, info, driver_version: driver.version() };
        ctx.make_current()?;
        Ok(ctx)
    }

    /// Makes the context current on the calling thread.
    pub fn make_current(&self) -> Result<(), CudaError> {
        // SAFETY: `context` is a retained primary context.
        check("cuCtxSetCurrent", unsafe { sys::cuCtxSetCurrent(self.context) })
    }

    /// Lets this context's kernels and copies reach `peer`'s device memory directly, where the
    /// driver says the two devices can (`cuDeviceCanAccessPeer`, then `cuCtxEnablePeerAccess`
    /// with this context current); returns whether they can. The same device: true.
    pub fn enable_peer_access(&self, peer: &Context) -> Result<bool, CudaError> {
        if self.device == peer.device {
            return Ok(true);
        }
        let mut can: c_int = 0;
        // SAFETY: valid out pointer and device handles.
        check("cuDeviceCanAccessPeer", unsafe { sys::cuDeviceCanAccessPeer(&mut can, self.device, peer.device) })?;
        if can == 0 {
            return Ok(false);
        }
        self.make_current()?;
        // SAFETY: `peer.context` is a retained primary context; flags must be 0.
        match unsafe { sys::cuCtxEnablePeerAccess(peer.context, 0) } {
            sys::CUresult::CUDA_SUCCESS | sys::CUresult::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(true),
            code => Err(CudaError::Call { call: "cuCtxEnablePeerAccess", code }),
        }
    }

    /// Where a pointer points, per the driver (the context must be current).
    pub fn pointer_info(&self, ptr: u64) -> Result<PointerInfo, CudaError> {
        let mut memory_type: u32 = 0;
        let mut ordinal: c_int = -1;
        let mut start: u64 = 0;
        let mut size: usize = 0;
        use sys::CUpointer_attribute as P;
        for (attr, out) in [
            (P::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, &mut memory_type as *mut u32 as *mut std::ffi::c_void),
            (P::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, &mut ordinal as *mut c_int as *mut std::ffi::c_void),
            (P::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, &mut start as *mut u64 as *mut std::ffi::c_void),
            (P::CU_POINTER_ATTRIBUTE_RANGE_SIZE, &mut size as *mut usize as *mut std::ffi::c_void),
        ] {
            // SAFETY: each out pointer has the size the attribute writes (u32, int, pointer, size_t).
            check("cuPointerGetAttribute", unsafe { sys::cuPointerGetAttribute(out, attr, ptr) })?;
        }
        Ok(PointerInfo { memory_type, ordinal, range_start: start, range_size: size as u64 })
    }

    /// Exports `len` bytes of device memory at `ptr` as a dma-buf (cuMemGetHandleForAddressRange,
    /// CUDA 11.7+, and a kernel and driver that support dma-buf). The exported range is `ptr..ptr
    /// + len` widened to host pages inside `allocation` (the range the pointer lies in), so the
    /// result says where `ptr` sits in the buffer. The context must be current.
    pub fn export_dmabuf(&self, ptr: u64, len: u64, allocation: (u64, u64)) -> Result<DmaBuf, CudaError> {
        // SAFETY: sysconf has no preconditions.
        let page = (unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).max(4096) as u64;
        let (alloc_start, alloc_len) = allocation;
        let start = (ptr & !(page - 1)).max(alloc_start);
        let end = (ptr + len).next_multiple_of(page).min(alloc_start + alloc_len);
        if end <= start || ptr < start {
            return Err(CudaError::Unexportable { ptr, len });
        }
        let mut fd: c_int = -1;
        // SAFETY: `fd` is a valid out pointer for an int (the DMA_BUF_FD handle type writes an fd).
        check("cuMemGetHandleForAddressRange", unsafe {
            sys::cuMemGetHandleForAddressRange(
                &mut fd as *mut c_int as *mut std::ffi::c_void,
                start,
                (end - start) as usize,
                sys::CUmemRangeHandleType::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
                0,
            )
        })?;
        // SAFETY: the driver returned a new file descriptor that nothing else owns.
        let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        Ok(DmaBuf { fd, offset: ptr - start, exported: end - start })
    }
}

/// The bytes of a CUDA IPC memory handle (`CUipcMemHandle`, 64 bytes), as another process
/// opens it with [`IpcMemory::open`].
pub type IpcHandle = [u8; 64];

/// Device memory of this process exported for another (a `ferry serve` daemon): the IPC handle
/// of the allocation holding the range, and where the range starts in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcExport {
    /// The allocation's handle (`cuIpcGetMemHandle` on its start).
    pub handle: IpcHandle,
    /// The range's offset from the allocation's start.
    pub offset: u64,
}

/// Exports `len` bytes of device memory at `ptr` (of any context of this process: the one the
/// pointer belongs to is made current for the call, the caller's restored after) by CUDA IPC.
/// The range must lie in one allocation made by `cuMemAlloc` / `cudaMalloc` (the CUDA caching
/// allocators of torch and CuPy by default); memory from `cuMemCreate` (torch's
/// `expandable_segments`, `cudaMallocAsync` pools) has no legacy IPC handle, which the error
/// says.
pub fn export_ipc(ptr: u64, len: u64) -> Result<IpcExport, String> {
    Driver::load().map_err(|e| e.to_string())?;
    let mut context: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: a pointer-sized out value for CU_POINTER_ATTRIBUTE_CONTEXT.
    check("cuPointerGetAttribute", unsafe {
        sys::cuPointerGetAttribute(
            (&mut context as *mut sys::CUcontext).cast(),
            sys::CUpointer_attribute::CU_POINTER_ATTRIBUTE_CONTEXT,
            ptr,
        )
    })
    .map_err(|e| format!("{ptr:#x} is not device memory this process knows ({e})"))?;
    if context.is_null() {
        return Err(format!("{ptr:#x} belongs to no CUDA context (not memory of cuMemAlloc)"));
    }
    // SAFETY: a live context of this process (the driver just named it).
    check("cuCtxPushCurrent", unsafe { sys::cuCtxPushCurrent_v2(context) }).map_err(|e| e.to_string())?;
    let result = (|| {
        let (mut start, mut size): (sys::CUdeviceptr, usize) = (0, 0);
        // SAFETY: valid out pointers; the pointer's context is current.
        check("cuMemGetAddressRange", unsafe { sys::cuMemGetAddressRange_v2(&mut start, &mut size, ptr) })
            .map_err(|e| e.to_string())?;
        let end = ptr.checked_add(len).ok_or_else(|| format!("{len} bytes at {ptr:#x} wrap around"))?;
        if len == 0 || end > start + size as u64 {
            return Err(format!("{len} bytes at {ptr:#x} are not inside one allocation ({size} bytes at {start:#x})"));
        }
        let mut handle = sys::CUipcMemHandle_st { reserved: [0; 64] };
        // SAFETY: a valid out handle; `start` is the base of a live allocation.
        check("cuIpcGetMemHandle", unsafe { sys::cuIpcGetMemHandle(&mut handle, start) }).map_err(|e| {
            format!(
                "{e}: the allocation at {start:#x} cannot be shared by CUDA IPC (memory from cuMemCreate, such as torch's expandable_segments or a cudaMallocAsync pool, has no legacy IPC handle)"
            )
        })?;
        Ok(IpcExport { handle: handle.reserved.map(|b| b as u8), offset: ptr - start })
    })();
    let mut popped: sys::CUcontext = std::ptr::null_mut();
    // SAFETY: pops the context pushed above.
    unsafe { sys::cuCtxPopCurrent_v2(&mut popped) };
    result
}

/// Device memory of another process, opened here from its IPC handle (`cuIpcOpenMemHandle`)
/// in a context of this process; closed on drop.
#[derive(Debug)]
pub struct IpcMemory {
    ptr: u64,
    size: u64,
    context: std::sync::Arc<Context>,
}

// SAFETY: only the address is kept, to close the mapping (the context is made current first).
unsafe impl Send for IpcMemory {}
// SAFETY: as for Send.
unsafe impl Sync for IpcMemory {}

impl IpcMemory {
    /// Maps the allocation `handle` names into `context` (peer access enabled lazily, should it
    /// live on another device). A handle opened twice in one context is the same mapping,
    /// counted by the driver; each [`IpcMemory`] closes its own.
    pub fn open(context: std::sync::Arc<Context>, handle: &IpcHandle) -> Result<IpcMemory, CudaError> {
        context.make_current()?;
        let mut ptr: sys::CUdeviceptr = 0;
        let handle = sys::CUipcMemHandle_st { reserved: handle.map(|b| b as std::ffi::c_char) };
        // SAFETY: a valid out pointer; the driver checks the handle's bytes (untrusted: a bad
        // handle is an error, never a mapping). Flag 1: CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS.
        check("cuIpcOpenMemHandle", unsafe { sys::cuIpcOpenMemHandle_v2(&mut ptr, handle, 1) })?;
        let mut memory = IpcMemory { ptr, size: 0, context };
        memory.size = memory.context.pointer_info(ptr)?.range_size;
        Ok(memory)
    }

    /// The mapping's device address in this process.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// The allocation's bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The context it is mapped in.
    pub fn context(&self) -> &std::sync::Arc<Context> {
        &self.context
    }
}

impl Drop for IpcMemory {
    fn drop(&mut self) {
        let _ = self.context.make_current();
        // SAFETY: closes the mapping opened in `open`, once.
        let code = unsafe { sys::cuIpcCloseMemHandle(self.ptr) };
        if code != sys::CUresult::CUDA_SUCCESS {
            eprintln!("ferry: closing a CUDA IPC mapping at {:#x}: {code:?}", self.ptr);
        }
    }
}

/// A dma-buf exported from device memory.
#[derive(Debug)]
pub struct DmaBuf {
    /// The buffer's file descriptor.
    pub fd: std::os::fd::OwnedFd,
    /// Where the requested address lies in the buffer.
    pub offset: u64,
    /// Bytes exported (page-aligned).
    pub exported: u64,
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: releases the retain taken in `new`, once.
        let code = unsafe { sys::cuDevicePrimaryCtxRelease_v2(self.device) };
        if code != sys::CUresult::CUDA_SUCCESS {
            eprintln!("ferry: releasing the primary context of CUDA device {}: {code:?}", self.info.ordinal);
        }
    }
}

/// What the driver knows of a pointer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PointerInfo {
    /// CU_MEMORYTYPE_HOST (1) or CU_MEMORYTYPE_DEVICE (2).
    pub memory_type: u32,
    /// Device ordinal of device memory.
    pub ordinal: i32,
    /// Start of the allocation holding the pointer.
    pub range_start: u64,
    /// Size of that allocation.
    pub range_size: u64,
}

/// CU_MEMORYTYPE_DEVICE.
pub const MEMORY_TYPE_DEVICE: u32 = 2;
/// CU_MEMORYTYPE_HOST.
pub const MEMORY_TYPE_HOST: u32 = 1;

/// A non-blocking stream (cuMemcpyBatchAsync refuses the legacy NULL stream).
#[derive(Debug)]
pub struct Stream(pub(crate) sys::CUstream);

// SAFETY: a stream handle may be used from any thread whose current context owns it.
unsafe impl Send for Stream {}

impl Stream {
    /// A new non-blocking stream in the current context.
    pub fn new() -> Result<Stream, CudaError> {
        let mut stream: sys::CUstream = std::ptr::null_mut();
        // SAFETY: valid out pointer; 1 is CU_STREAM_NON_BLOCKING.
        check("cuStreamCreate", unsafe { sys::cuStreamCreate(&mut stream, 1) })?;
        Ok(Stream(stream))
    }

    /// The `CUstream` handle (for `Engine::stream_wait` and the like on a stream of ours).
    pub fn handle(&self) -> *mut std::ffi::c_void {
        self.0.cast()
    }

    /// Waits for everything queued so far (control plane and benchmarks only).
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: a live stream.
        check("cuStreamSynchronize", unsafe { sys::cuStreamSynchronize(self.0) })
    }

    /// Whether everything queued so far finished; never blocks. An error is the stream's (a
    /// failed copy or kernel on it).
    pub fn is_done(&self) -> Result<bool, CudaError> {
        // SAFETY: a live stream.
        match unsafe { sys::cuStreamQuery(self.0) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            code => Err(CudaError::Call { call: "cuStreamQuery", code }),
        }
    }

    /// Queues a copy of `len` bytes (unified addressing: host or device pointers).
    ///
    /// # Safety
    /// `src` must be readable and `dst` writable for `len` bytes, by the device, until the copy
    /// has finished on the stream (host memory pinned and mapped, or device memory of this
    /// context), and nothing else may write `dst` or `src` meanwhile.
    pub unsafe fn copy(&self, dst: u64, src: u64, len: usize) -> Result<(), CudaError> {
        // SAFETY: the caller's contract covers both ranges until the copy finishes.
        check("cuMemcpyAsync", unsafe { sys::cuMemcpyAsync(dst, src, len, self.0) })
    }

    /// Queues a 2D copy (unified addressing): `rows` rows of `width` bytes, row `i` from
    /// `src + i * src_pitch` to `dst + i * dst_pitch`. Both pitches must be at least `width` and
    /// at most the device's `max_pitch` (the driver refuses others).
    ///
    /// # Safety
    /// As [`Stream::copy`], for every row.
    pub unsafe fn copy_2d(
        &self,
        dst: u64,
        dst_pitch: usize,
        src: u64,
        src_pitch: usize,
        width: usize,
        rows: usize,
    ) -> Result<(), CudaError> {
        let copy = sys::CUDA_MEMCPY2D {
            srcXInBytes: 0,
            srcY: 0,
            srcMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED,
            srcHost: std::ptr::null(),
            srcDevice: src,
            srcArray: std::ptr::null_mut(),
            srcPitch: src_pitch,
            dstXInBytes: 0,
            dstY: 0,
            dstMemoryType: sys::CUmemorytype::CU_MEMORYTYPE_UNIFIED,
            dstHost: std::ptr::null_mut(),
            dstDevice: dst,
            dstArray: std::ptr::null_mut(),
            dstPitch: dst_pitch,
            WidthInBytes: width,
            Height: rows,
        };
        // SAFETY: a valid descriptor of the copy; the caller's contract covers every row until
        // the copy finishes on the stream.
        check("cuMemcpy2DAsync", unsafe { sys::cuMemcpy2DAsync_v2(&copy, self.0) })
    }

    /// Makes work queued on this stream from now on wait for `event`'s last recorded point.
    pub fn wait(&self, event: &Event) -> Result<(), CudaError> {
        // SAFETY: live stream and event of the current context; flags 0.
        check("cuStreamWaitEvent", unsafe { sys::cuStreamWaitEvent(self.0, event.0, 0) })
    }

    /// Queues `dsts.len()` copies in one call (driver 12.8+), with the hint
    /// `CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE` (leave the SMs to compute). The call costs the
    /// CPU 0.5-0.9 us per copy on the H200's VM, the first limit below 64 KiB
    /// (`gpu/probe_ce_load.cu`); with the hint, `ferry bench`'s `batch` column at 64 KiB went from
    /// 33-36 to 40-43 GB/s in one call (two rounds each, bench/results/h200.md); `gpu/probe_ce.cu`
    /// saw its cost per 16 KiB copy halve in one call and not in the next.
    ///
    /// # Safety
    /// As [`Stream::copy`], for each `(dsts[i], srcs[i], sizes[i])`.
    pub unsafe fn copy_batch(&self, dsts: &mut [u64], srcs: &mut [u64], sizes: &mut [usize]) -> Result<(), CudaError> {
        assert!(dsts.len() == srcs.len() && srcs.len() == sizes.len(), "copy_batch: arrays of different lengths");
        let mut attrs = sys::CUmemcpyAttributes {
            srcAccessOrder: sys::CUmemcpySrcAccessOrder::CU_MEMCPY_SRC_ACCESS_ORDER_STREAM,
            srcLocHint: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_INVALID, id: 0 },
            dstLocHint: sys::CUmemLocation { type_: sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_INVALID, id: 0 },
            flags: sys::CUmemcpyFlags_enum::CU_MEMCPY_FLAG_PREFER_OVERLAP_WITH_COMPUTE as std::ffi::c_uint,
        };
        let mut attr_index: usize = 0;
        let mut fail_index: usize = 0;
        // SAFETY: the three arrays have `len` entries (asserted); one attribute applies from
        // index 0; the caller's contract covers every range.
        check("cuMemcpyBatchAsync", unsafe {
            sys::cuMemcpyBatchAsync(
                dsts.as_mut_ptr(),
                srcs.as_mut_ptr(),
                sizes.as_mut_ptr(),
                dsts.len(),
                &mut attrs,
                &mut attr_index,
                1,
                &mut fail_index,
                self.0,
            )
        })
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // SAFETY: destroys a stream created in `new`, once.
        unsafe { sys::cuStreamDestroy_v2(self.0) };
    }
}

/// An event, for polling completion (and, made by [`Event::timed`], for timing).
#[derive(Debug)]
pub struct Event(sys::CUevent);

// SAFETY: as for Stream.
unsafe impl Send for Event {}

impl Event {
    /// A new event in the current context.
    pub fn new() -> Result<Event, CudaError> {
        // 2 is CU_EVENT_DISABLE_TIMING.
        Event::create(2)
    }

    fn create(flags: u32) -> Result<Event, CudaError> {
        let mut event: sys::CUevent = std::ptr::null_mut();
        // SAFETY: valid out pointer; `flags` is 0 or CU_EVENT_DISABLE_TIMING.
        check("cuEventCreate", unsafe { sys::cuEventCreate(&mut event, flags) })?;
        Ok(Event(event))
    }

    /// A new event in the current context that records time, for [`Event::elapsed_ms`].
    pub fn timed() -> Result<Event, CudaError> {
        // 0: the default, with timing.
        Event::create(0)
    }

    /// Milliseconds of GPU time from `start` to this event, both made by [`Event::timed`],
    /// recorded and completed.
    pub fn elapsed_ms(&self, start: &Event) -> Result<f32, CudaError> {
        let mut ms = 0f32;
        // SAFETY: live events of the current context; valid out pointer.
        check("cuEventElapsedTime", unsafe { sys::cuEventElapsedTime(&mut ms, start.0, self.0) })?;
        Ok(ms)
    }

    /// Marks the point in `stream` after everything queued so far.
    pub fn record(&self, stream: &Stream) -> Result<(), CudaError> {
        // SAFETY: live event and stream of the current context.
        check("cuEventRecord", unsafe { sys::cuEventRecord(self.0, stream.0) })
    }

    /// Whether the work before the recorded point finished; never blocks.
    pub fn is_done(&self) -> Result<bool, CudaError> {
        // SAFETY: a live event.
        match unsafe { sys::cuEventQuery(self.0) } {
            sys::CUresult::CUDA_SUCCESS => Ok(true),
            sys::CUresult::CUDA_ERROR_NOT_READY => Ok(false),
            code => Err(CudaError::Call { call: "cuEventQuery", code }),
        }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: destroys an event created in `new`, once.
        unsafe { sys::cuEventDestroy_v2(self.0) };
    }
}

/// A kernel loaded from PTX.
#[derive(Debug)]
pub struct Kernel {
    module: sys::CUmodule,
    function: sys::CUfunction,
    /// Resident blocks of `block_threads` threads per SM.
    pub blocks_per_sm: u32,
    /// Threads per block.
    pub block_threads: u32,
}

// SAFETY: module and function handles belong to the primary context, usable from any thread
// where it is current.
unsafe impl Send for Kernel {}

/// Loads `function`'s code onto the GPU now (`cuFuncLoad`, drivers 12.4 and newer), not at its
/// first launch. CUDA loads kernels lazily by default, and a lazy load may wait for the context
/// to go idle: a first launch by a worker while a caller's stream is blocked in
/// [`crate::Engine::stream_wait`] for that very copy would never return. Older drivers load
/// eagerly unless `CUDA_MODULE_LOADING=LAZY` is set.
fn load_now(function: sys::CUfunction) -> Result<(), CudaError> {
    let mut version: c_int = 0;
    // SAFETY: valid out pointer; cuDriverGetVersion exists in every driver.
    check("cuDriverGetVersion", unsafe { sys::cuDriverGetVersion(&mut version) })?;
    if version < FUNC_LOAD_VERSION {
        return Ok(());
    }
    // SAFETY: a function of a live module; the driver has the symbol (version checked above).
    check("cuFuncLoad", unsafe { sys::cuFuncLoad(function) })
}

impl Kernel {
    /// Loads `ptx` (NUL-free text) and finds `name` in it.
    pub fn load(ptx: &str, name: &str, block_threads: u32) -> Result<Kernel, CudaError> {
        let text = std::ffi::CString::new(ptx).map_err(|_| CudaError::NulByte { what: "PTX" })?;
        let cname = std::ffi::CString::new(name).map_err(|_| CudaError::NulByte { what: "kernel name" })?;
        let mut module: sys::CUmodule = std::ptr::null_mut();
        // SAFETY: NUL-terminated PTX text; valid out pointer.
        check("cuModuleLoadData", unsafe { sys::cuModuleLoadData(&mut module, text.as_ptr().cast()) })?;
        let mut function: sys::CUfunction = std::ptr::null_mut();
        // SAFETY: live module, NUL-terminated name, valid out pointer.
        let found =
            check("cuModuleGetFunction", unsafe { sys::cuModuleGetFunction(&mut function, module, cname.as_ptr()) });
        let loaded = found.and_then(|()| load_now(function));
        let mut blocks: c_int = 0;
        let occupancy = loaded.and_then(|()| {
            // SAFETY: live function; valid out pointer.
            check("cuOccupancyMaxActiveBlocksPerMultiprocessor", unsafe {
                sys::cuOccupancyMaxActiveBlocksPerMultiprocessor(&mut blocks, function, block_threads as c_int, 0)
            })
        });
        if let Err(e) = occupancy {
            // SAFETY: the module loaded above is unloaded once.
            unsafe { sys::cuModuleUnload(module) };
            return Err(e);
        }
        Ok(Kernel { module, function, blocks_per_sm: blocks.max(1) as u32, block_threads })
    }

    /// Launches on `stream` with `grid` blocks; `params` point at each argument's value.
    ///
    /// # Safety
    /// `params` must match the kernel's signature, each pointing at a live value of the
    /// argument's type, and every memory the kernel reads or writes through them must stay
    /// valid, and untouched by others, until the kernel has finished on the stream.
    pub unsafe fn launch(
        &self,
        stream: &Stream,
        grid: u32,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<(), CudaError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.launch_with(stream, grid, self.block_threads, 0, params) }
    }

    /// Lets launches of this kernel ask for up to `bytes` of dynamic shared memory.
    pub fn allow_dynamic_shared(&self, bytes: u32) -> Result<(), CudaError> {
        // SAFETY: a live function; the attribute takes a byte count.
        check("cuFuncSetAttribute", unsafe {
            sys::cuFuncSetAttribute(
                self.function,
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                bytes as c_int,
            )
        })
    }

    /// Launches on `stream` with `grid` blocks of `block_threads` threads and `shared` bytes of
    /// dynamic shared memory; `params` point at each argument's value.
    ///
    /// # Safety
    /// As [`Kernel::launch`].
    pub unsafe fn launch_with(
        &self,
        stream: &Stream,
        grid: u32,
        block_threads: u32,
        shared: u32,
        params: &mut [*mut std::ffi::c_void],
    ) -> Result<(), CudaError> {
        // SAFETY: live function and stream; `params` is as the caller promised and outlives the
        // call, which copies the values.
        check("cuLaunchKernel", unsafe {
            sys::cuLaunchKernel(
                self.function,
                grid,
                1,
                1,
                block_threads,
                1,
                1,
                shared,
                stream.0,
                params.as_mut_ptr(),
                std::ptr::null_mut(),
            )
        })
    }
}

impl Drop for Kernel {
    fn drop(&mut self) {
        // SAFETY: unloads the module loaded in `load`, once.
        unsafe { sys::cuModuleUnload(self.module) };
    }
}

/// Pinned host memory mapped into the device's address space (cuMemHostAlloc).
#[derive(Debug)]
pub struct PinnedBuffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: plain memory; users synchronise access through streams and events.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    /// `len` bytes, portable and device-mapped, zeroed: the driver hands pinned memory back as
    /// an earlier allocation of the process left it (an engine's completion words reused that
    /// way made another engine's first batches look done; bench/results/h200.md, ninth session).
    pub fn new(len: usize) -> Result<PinnedBuffer, CudaError> {
        let mut ptr: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: valid out pointer; flags PORTABLE (1) | DEVICEMAP (2).
        check("cuMemHostAlloc", unsafe { sys::cuMemHostAlloc(&mut ptr, len, 1 | 2) })?;
        // SAFETY: the driver returned `len` writable bytes at `ptr`, not shared with anyone yet.
        unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, len) };
        Ok(PinnedBuffer { ptr: ptr.cast(), len })
    }

    /// First byte (also its device address, under unified addressing).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        // SAFETY: frees the allocation made in `new`, once.
        unsafe { sys::cuMemFreeHost(self.ptr.cast()) };
    }
}

/// Host memory page-locked with cuMemHostRegister; unregistered on drop, on whatever thread
/// drops it (the registration makes its context current first).
#[derive(Debug)]
pub struct HostRegistration {
    ptr: *mut u8,
    /// Unregistering needs a current context; this one stays retained until then.
    context: std::sync::Arc<Context>,
}

// SAFETY: only the address is kept, to unregister.
unsafe impl Send for HostRegistration {}
// SAFETY: as for Send.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Pins `len` bytes at `ptr` for every context and maps them for the device.
    ///
    /// # Safety
    /// The memory must stay mapped until this registration drops.
    pub unsafe fn new(
        context: std::sync::Arc<Context>,
        ptr: *mut u8,
        len: usize,
    ) -> Result<HostRegistration, CudaError> {
        context.make_current()?;
        // SAFETY: the caller keeps the range mapped; flags PORTABLE (1) | DEVICEMAP (2).
        check("cuMemHostRegister", unsafe { sys::cuMemHostRegister_v2(ptr.cast(), len, 1 | 2) })?;
        Ok(HostRegistration { ptr, context })
    }
}

impl HostRegistration {
    /// The device address of byte `offset` of the registered range (unified addressing makes it
    /// the host address on current GPUs; the driver says).
    pub fn device_address(&self, offset: usize) -> Result<u64, CudaError> {
        self.context.make_current()?;
        let mut device: sys::CUdeviceptr = 0;
        // SAFETY: the range at `ptr` is registered with DEVICEMAP; flags 0; valid out pointer.
        check("cuMemHostGetDevicePointer", unsafe {
            sys::cuMemHostGetDevicePointer_v2(&mut device, self.ptr.cast(), 0)
        })?;
        Ok(device + offset as u64)
    }
}

/// What a stream's wait on a word waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitFor {
    /// The word at least the value (`CU_STREAM_WAIT_VALUE_GEQ`).
    AtLeast,
    /// The word equal to the value (`CU_STREAM_WAIT_VALUE_EQ`).
    Equal,
}

/// Enqueues on `stream` a wait until the 64-bit word at device address `addr` is `value` as
/// `until` says (`cuStreamWaitValue64`); `flush` adds CU_STREAM_WAIT_VALUE_FLUSH (makes a NIC's
/// earlier writes visible to the stream's later work, for GPUDirect RDMA).
///
/// # Safety
/// `stream` must be a live stream of the current context, and the word must stay mapped for the
/// device until the wait has passed.
pub unsafe fn stream_wait_value(
    stream: *mut std::ffi::c_void,
    addr: u64,
    value: u64,
    until: WaitFor,
    flush: bool,
) -> Result<(), CudaError> {
    const GEQ: u32 = 0;
    const EQ: u32 = 1;
    const FLUSH: u32 = 1 << 30;
    let compare = match until {
        WaitFor::AtLeast => GEQ,
        WaitFor::Equal => EQ,
    };
    let flags = compare | if flush { FLUSH } else { 0 };
    // SAFETY: forwarded from the caller.
    check("cuStreamWaitValue64", unsafe { sys::cuStreamWaitValue64_v2(stream.cast(), addr, value, flags) })
}

/// Enqueues on `stream` a write of `value` into the 64-bit word at device address `addr`
/// (`cuStreamWriteValue64`, with its default memory barrier: the stream's earlier writes are
/// visible before the word is).
///
/// # Safety
/// As [`stream_wait_value`].
pub unsafe fn stream_write_value(stream: *mut std::ffi::c_void, addr: u64, value: u64) -> Result<(), CudaError> {
    // SAFETY: forwarded from the caller.
    check("cuStreamWriteValue64", unsafe { sys::cuStreamWriteValue64_v2(stream.cast(), addr, value, 0) })
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if let Err(e) = self.context.make_current() {
            eprintln!("ferry: cuMemHostUnregister: cannot make the context current: {e}");
            return;
        }
        // SAFETY: unregisters the range registered in `new`, once.
        let code = unsafe { sys::cuMemHostUnregister(self.ptr.cast()) };
        if code != sys::CUresult::CUDA_SUCCESS {
            eprintln!("ferry: cuMemHostUnregister: {code:?}");
        }
    }
}

/// Device memory from cuMemAlloc (benchmarks and tests; applications bring their own).
#[derive(Debug)]
pub struct DeviceBuffer {
    ptr: u64,
    len: usize,
}

impl DeviceBuffer {
    /// `len` bytes of device memory in the current context.
    pub fn new(len: usize) -> Result<DeviceBuffer, CudaError> {
        let mut ptr: sys::CUdeviceptr = 0;
        // SAFETY: valid out pointer.
        check("cuMemAlloc", unsafe { sys::cuMemAlloc_v2(&mut ptr, len) })?;
        Ok(DeviceBuffer { ptr, len })
    }

    /// Device address.
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Sets every byte to `value` (synchronous).
    pub fn fill(&self, value: u8) -> Result<(), CudaError> {
        // SAFETY: the whole allocation.
        check("cuMemsetD8", unsafe { sys::cuMemsetD8_v2(self.ptr, value, self.len) })
    }

    /// Copies `data` to byte `offset` (synchronous).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), CudaError> {
        assert!(offset + data.len() <= self.len, "write past the end of a device buffer");
        // SAFETY: the range is inside the allocation (asserted).
        check("cuMemcpyHtoD", unsafe {
            sys::cuMemcpyHtoD_v2(self.ptr + offset as u64, data.as_ptr().cast(), data.len())
        })
    }

    /// Copies bytes at `offset` into `out` (synchronous).
    pub fn read(&self, offset: usize, out: &mut [u8]) -> Result<(), CudaError> {
        assert!(offset + out.len() <= self.len, "read past the end of a device buffer");
        // SAFETY: the range is inside the allocation (asserted).
        check("cuMemcpyDtoH", unsafe {
            sys::cuMemcpyDtoH_v2(out.as_mut_ptr().cast(), self.ptr + offset as u64, out.len())
        })
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        // SAFETY: frees the allocation made in `new`, once.
        unsafe { sys::cuMemFree_v2(self.ptr) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bus_ids_take_the_sysfs_form() {
        assert_eq!(sysfs_bus_id("00000000:00:06.0"), "0000:00:06.0");
        assert_eq!(sysfs_bus_id("00000001:1B:00.0"), "0001:1b:00.0");
        assert_eq!(sysfs_bus_id("garbage"), "garbage");
    }

    #[test]
    fn loading_never_panics() {
        match Driver::load() {
            Ok(driver) => {
                let devices = driver.devices().expect("a loaded driver lists its devices");
                println!("CUDA {} with {} devices", driver.version_text(), devices.len());
            }
            Err(e) => println!("SKIP: no CUDA driver here ({e}); loading reported it without panicking"),
        }
    }
}
