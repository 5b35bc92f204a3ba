//! The CUDA driver, loaded at run time through cudarc's raw bindings: presence, version, and
//! the devices with the attributes ferry cares about.
//!
//! Every entry point is checked before it is called: cudarc panics on a missing library or
//! symbol, so [`Driver::load`] first asks whether `libcuda` is present, and features newer than
//! the driver are reported as absent, never called.

use cudarc::driver::sys;
use std::ffi::c_int;

/// Why CUDA cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CudaUnavailable {
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
}

fn check(call: &'static str, code: sys::CUresult) -> Result<(), CudaUnavailable> {
    if code == sys::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(CudaUnavailable::Call { call, code })
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
    pub fn load() -> Result<Driver, CudaUnavailable> {
        // SAFETY: only tries to open the library; returns false when it is absent.
        if !unsafe { sys::is_culib_present() } {
            return Err(CudaUnavailable::NoLibrary);
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

    /// Whether cuMemcpyBatchAsync exists in this driver.
    pub fn has_batch_copy(&self) -> bool {
        self.version >= BATCH_COPY_VERSION
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<Device>, CudaUnavailable> {
        let mut count: c_int = 0;
        // SAFETY: initialised driver; valid out pointer.
        check("cuDeviceGetCount", unsafe { sys::cuDeviceGetCount(&mut count) })?;
        (0..count).map(|ordinal| self.device(ordinal)).collect()
    }

    fn device(&self, ordinal: i32) -> Result<Device, CudaUnavailable> {
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
        let attribute = |attr: sys::CUdevice_attribute| -> Result<i32, CudaUnavailable> {
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
        })
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
