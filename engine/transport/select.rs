//! Which transport an engine's workers run, and what the control plane needs beside it: the
//! CUDA context (to pin, check and export memory) and the NIC (to register memory with).
//!
//! [`select`] runs once at start; [`Selected::build`] makes each worker's transport.

use super::cuda::CudaTransport;
use super::gdr::NicCounters;
#[cfg(feature = "gdr")]
use super::gdr::{GdrError, VerbsError};
use super::host::HostTransport;
use super::multi::{Lane, MultiGpu};
use super::null::NullTransport;
use super::Transport;
use crate::config::{EngineConfig, GpuConfig, GpuSet, SmBudget, TransportKind, UseGdr};
use crate::cuda_driver::{sysfs_bus_id, Context, Driver, PointerInfo};
use crate::error::Error;
use crate::region::{Keep, NicKeys};
use ferry_topology::plan::{plan, PlanConfig};
use ferry_topology::Machine;
use std::path::Path;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

/// The NIC the engine holds when its workers run the GDR transport.
#[cfg(feature = "gdr")]
pub(crate) type Nic = Arc<super::gdr::nic::Nic>;
/// Without the `gdr` feature there is never a NIC.
#[cfg(not(feature = "gdr"))]
#[derive(Clone)]
pub(crate) enum Nic {}

/// What [`select`] settled on.
pub(crate) struct Selected {
    /// The device context when the transport is the GPU's, with a CUDA driver (registration
    /// pins, checks and exports with it): the first GPU's, with several.
    pub(crate) cuda: Option<Arc<Context>>,
    /// With several GPUs ([`GpuConfig::devices`] not `One`): each one's context, in the engine's
    /// order (the first is `cuda`), and which pairs may copy between their memory
    /// (`peers[src][dst]`). Empty for one GPU configured with `device`.
    pub(crate) gpus: Vec<Arc<Context>>,
    pub(crate) peers: Vec<Vec<bool>>,
    /// The NIC, when the workers run the GDR transport (registration registers with it).
    pub(crate) nic: Option<Nic>,
    pub(crate) use_gdr: UseGdr,
    /// Each worker's share of the live SM budget, read by every CUDA transport before each
    /// batch ([`Selected::set_sm_budget`]).
    sms_per_worker: Arc<AtomicU32>,
    /// The GPU's SMs (0 without a CUDA context).
    sm_count: u32,
    /// The PCI bus id of the engine's GPU, for core placement.
    pub(crate) gpu_bus_id: Option<String>,
    /// Why the transport is what it is, where that was a choice.
    pub(crate) notes: Vec<String>,
}

/// Picks the transport for `config`. For [`TransportKind::Gpu`], the GDR/CUDA switch:
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
pub(crate) fn select(config: &EngineConfig) -> Result<Selected, Error> {
    let TransportKind::Gpu(gpu) = &config.transport else {
        return Ok(Selected {
            cuda: None,
            nic: None,
            use_gdr: UseGdr::Off,
            sms_per_worker: Arc::default(),
            sm_count: 0,
            gpu_bus_id: None,
            notes: Vec::new(),
            gpus: Vec::new(),
            peers: Vec::new(),
        });
    };
    if gpu.devices.is_many() {
        return select_many(config, gpu);
    }
    let cuda = open_device(gpu);
    let gpu_bus_id = match &cuda {
        Ok(context) => Some(context.info.pci_bus_id.clone()),
        Err(_) => gpu.bus_id.clone(),
    };
    if let (Ok(context), Some(wanted)) = (&cuda, &gpu.bus_id) {
        if !same_bus_id(&context.info.pci_bus_id, wanted) {
            return Err(Error::GpuMismatch {
                device: gpu.device,
                actual: context.info.pci_bus_id.clone(),
                configured: wanted.clone(),
            });
        }
    }
    // Without a CUDA context (GDR on host memory only) there is no kernel to budget.
    let sm_count = cuda.as_ref().map_or(0, |context| u32::try_from(context.info.sm_count).unwrap_or(1));
    let share = if sm_count > 0 { gpu.cuda.sm_budget.per_worker(sm_count, config.workers)? } else { 0 };
    let mut selected = Selected {
        cuda: None,
        nic: None,
        use_gdr: gpu.gdr.use_gdr,
        sms_per_worker: Arc::new(AtomicU32::new(share)),
        sm_count,
        gpu_bus_id,
        notes: Vec::new(),
        gpus: Vec::new(),
        peers: Vec::new(),
    };
    if gpu.gdr.use_gdr == UseGdr::Off {
        selected.cuda = Some(cuda?);
        return Ok(selected);
    }
    let preferred = planned_nic(config, selected.gpu_bus_id.as_deref());
    match super::gdr::open(&gpu.gdr, preferred.as_deref()) {
        #[allow(unreachable_patterns)] // without the `gdr` feature, open never succeeds
        Ok(nic) => {
            match cuda {
                Ok(context) => selected.cuda = Some(context),
                Err(e) => selected.notes.push(format!("no CUDA driver ({e}): only host regions can be registered")),
            }
            selected.nic = Some(nic);
            Ok(selected)
        }
        Err(reason) if gpu.gdr.use_gdr == UseGdr::On => Err(Error::Gdr(reason)),
        Err(reason) => {
            let note = format!("use_gdr = auto: GDR unavailable, using the CUDA driver's copies: {reason}");
            eprintln!("ferry: {note}");
            selected.notes.push(note);
            match cuda {
                Ok(context) => {
                    selected.cuda = Some(context);
                    Ok(selected)
                }
                Err(cuda) => Err(Error::NoDeviceTransport { gdr: reason, cuda }),
            }
        }
    }
}

/// [`select`] for several GPUs: a context for each (every one the driver lists, or the
/// configured ordinals), peer access enabled between the pairs that have it; the CUDA driver's
/// copies (GDR drives one GPU so far: `use_gdr = on` was refused by the configuration's check).
fn select_many(config: &EngineConfig, gpu: &GpuConfig) -> Result<Selected, Error> {
    let driver = Driver::load()?;
    let ordinals: Vec<i32> = match &gpu.devices {
        GpuSet::List(list) => list.iter().map(|&o| i32::try_from(o).unwrap_or(i32::MAX)).collect(),
        GpuSet::All | GpuSet::One => driver.devices()?.iter().map(|d| d.ordinal).collect(),
    };
    if ordinals.is_empty() {
        return Err(crate::cuda_driver::CudaError::NoGpu.into());
    }
    let gpus =
        ordinals.iter().map(|&ordinal| Context::new(&driver, ordinal).map(Arc::new)).collect::<Result<Vec<_>, _>>()?;
    let mut peers = vec![vec![false; gpus.len()]; gpus.len()];
    for (s, from) in gpus.iter().enumerate() {
        for (d, to) in gpus.iter().enumerate() {
            // A copy from s's memory to d's runs on d's streams: d must reach s's memory.
            peers[s][d] = to.enable_peer_access(from)?;
        }
    }
    let sm_count = gpus.iter().map(|c| u32::try_from(c.info.sm_count).unwrap_or(1)).min().unwrap_or(1);
    let share = gpu.cuda.sm_budget.per_worker(sm_count, config.workers)?;
    let mut notes = Vec::new();
    if gpu.gdr.use_gdr == UseGdr::Auto {
        notes.push(format!(
            "use_gdr = auto with {} GPUs: the CUDA driver's copies (GDR drives one GPU so far)",
            gpus.len()
        ));
    }
    gpus[0].make_current()?;
    Ok(Selected {
        cuda: Some(gpus[0].clone()),
        nic: None,
        use_gdr: UseGdr::Off,
        sms_per_worker: Arc::new(AtomicU32::new(share)),
        sm_count,
        gpu_bus_id: Some(gpus[0].info.pci_bus_id.clone()),
        notes,
        gpus,
        peers,
    })
}

fn open_device(gpu: &GpuConfig) -> Result<Arc<Context>, crate::cuda_driver::CudaError> {
    let ordinal = i32::try_from(gpu.device).unwrap_or(i32::MAX);
    Driver::load().and_then(|driver| Context::new(&driver, ordinal)).map(Arc::new)
}

/// Whether two PCI bus ids name the same device, whatever their spelling (the CUDA driver's
/// `00000000:18:00.0` or sysfs's `0000:18:00.0`, either case).
fn same_bus_id(a: &str, b: &str) -> bool {
    sysfs_bus_id(a).eq_ignore_ascii_case(&sysfs_bus_id(b))
}

/// The topology plan's NIC for the engine's GPU, if the plan has one.
fn planned_nic(config: &EngineConfig, bus: Option<&str>) -> Option<String> {
    let bus = bus?;
    let machine = Machine::read(Path::new(&config.sysfs)).ok()?;
    let planned = plan(&machine, &PlanConfig::default()).ok()?;
    planned.gpus.into_iter().find(|g| same_bus_id(&g.gpu, bus))?.nic.map(|n| n.name)
}

impl Selected {
    /// Worker `index`'s transport, and its NIC counters when it runs GDR.
    pub(crate) fn build(&self, config: &EngineConfig, index: usize) -> (Box<dyn Transport>, Option<Arc<NicCounters>>) {
        match &config.transport {
            TransportKind::Host => (Box::new(HostTransport::new()), None),
            TransportKind::Null => (Box::new(NullTransport::new()), None),
            TransportKind::Gpu(gpu) => {
                let cuda = |context: &Arc<Context>| -> Box<dyn Transport> {
                    Box::new(CudaTransport::new(context.clone(), gpu.cuda, self.sms_per_worker.clone()))
                };
                if !self.gpus.is_empty() {
                    // Several GPUs: every GPU's transport, the worker's own GPU for host copies.
                    let lanes =
                        self.gpus.iter().map(|c| Lane { context: Some(c.clone()), transport: cuda(c) }).collect();
                    let home = index / config.workers;
                    return (Box::new(MultiGpu::new(lanes, self.peers.clone(), home)), None);
                }
                match &self.nic {
                    Some(nic) => {
                        let counters = Arc::new(NicCounters::default());
                        // Under auto, a NIC marked unusable hands over to the CUDA driver.
                        let fallback = match (&self.cuda, self.use_gdr) {
                            (Some(context), UseGdr::Auto) => Some(cuda(context)),
                            _ => None,
                        };
                        (gdr_transport(nic, gpu, counters.clone(), fallback), Some(counters))
                    }
                    None => (cuda(self.cuda.as_ref().expect("select loads a context when not on the NIC")), None),
                }
            }
            TransportKind::Custom(factory) => (factory(index), None),
        }
    }

    /// Sets the copy kernel's SM budget of every CUDA transport (a total over `workers`); the
    /// next batch of each worker sees it.
    pub(crate) fn set_sm_budget(&self, budget: SmBudget, workers: usize) -> Result<(), Error> {
        if self.cuda.is_none() {
            return Err(Error::setting(
                "the SM budget",
                budget,
                "set on an engine running the GPU transport with a CUDA driver",
            ));
        }
        let share = budget.per_worker(self.sm_count, workers)?;
        // Relaxed: a setting read once per batch; nothing is published with it.
        self.sms_per_worker.store(share, Ordering::Relaxed);
        Ok(())
    }

    /// The RDMA device the workers post to, when they run the GDR transport.
    pub(crate) fn nic_name(&self) -> Option<String> {
        nic_name(self.nic.as_ref())
    }

    /// Whether host memory must be pinned for the CUDA driver: there is a context, and the
    /// driver may copy (not only the NIC, which pins what it registers; under auto the driver
    /// may take over from a failed NIC, so memory is pinned for it too).
    pub(crate) fn pins_host_memory(&self) -> bool {
        self.cuda.is_some() && (self.nic.is_none() || self.use_gdr == UseGdr::Auto)
    }

    /// Registers memory with the NIC, if there is one: GPU memory (`gpu` set) as a dma-buf
    /// first, else by its device pointer (nvidia-peermem); host memory with `ibv_reg_mr`.
    ///
    /// # Safety
    /// The memory must stay valid while the returned registration lives.
    pub(crate) unsafe fn register_with_nic(
        &self,
        addr: u64,
        len: usize,
        gpu: Option<&PointerInfo>,
    ) -> Result<(NicKeys, Option<Keep>), Error> {
        // SAFETY: forwarded from the caller.
        unsafe { nic_register(self.nic.as_ref(), self.cuda.as_deref(), addr, len, gpu) }
    }
}

#[cfg(feature = "gdr")]
fn gdr_transport(
    nic: &Nic,
    gpu: &GpuConfig,
    counters: Arc<NicCounters>,
    fallback: Option<Box<dyn Transport>>,
) -> Box<dyn Transport> {
    let transport = super::gdr::GdrTransport::new(nic.clone(), gpu.gdr.clone(), counters);
    match fallback {
        Some(fallback) => Box::new(transport.with_fallback(fallback)),
        None => Box::new(transport),
    }
}

#[cfg(not(feature = "gdr"))]
fn gdr_transport(
    nic: &Nic,
    _gpu: &GpuConfig,
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

/// Registers memory with the NIC, if there is one (see [`Selected::register_with_nic`]).
///
/// # Safety
/// The memory must stay valid while the returned registration lives.
#[cfg(feature = "gdr")]
unsafe fn nic_register(
    nic: Option<&Nic>,
    cuda: Option<&Context>,
    addr: u64,
    len: usize,
    gpu: Option<&PointerInfo>,
) -> Result<(NicKeys, Option<Keep>), Error> {
    let Some(nic) = nic else { return Ok((NicKeys::default(), None)) };
    let registered = match (gpu, cuda) {
        (Some(info), Some(context)) => {
            let dmabuf = context
                .export_dmabuf(addr, len as u64, (info.range_start, info.range_size))
                .map_err(VerbsError::from)
                // SAFETY: forwarded from the caller; the NIC holds its own reference to the
                // dma-buf, so our descriptor may close once registered.
                .and_then(|buf| unsafe {
                    use std::os::fd::AsRawFd;
                    nic.register_dmabuf(buf.fd.as_raw_fd(), buf.offset, len, addr).map_err(VerbsError::from)
                });
            match dmabuf {
                Ok(mr) => Ok(mr),
                // SAFETY: forwarded from the caller.
                Err(dmabuf) => unsafe { nic.register(addr, len) }
                    .map_err(|peermem| GdrError::GpuMemory { dmabuf, peermem: Box::new(peermem) }),
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
    _gpu: Option<&PointerInfo>,
) -> Result<(NicKeys, Option<Keep>), Error> {
    Ok((NicKeys::default(), None))
}

#[cfg(test)]
mod tests {
    use super::same_bus_id;

    #[test]
    fn bus_ids_compare_whatever_their_spelling() {
        assert!(same_bus_id("00000000:18:00.0", "0000:18:00.0"));
        assert!(same_bus_id("0000:AB:00.0", "0000:ab:00.0"));
        assert!(!same_bus_id("0000:18:00.0", "0000:19:00.0"));
    }
}
