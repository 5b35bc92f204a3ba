//! The NIC side of the GDR transport, control plane only: finding and opening the device, the
//! protection domain, loopback queue pairs and memory registration. The hot path (posting and
//! polling) is in `post.rs`.
//!
//! Bring-up follows rdma-core's `libibverbs/examples/rc_pingpong.c`: device, context, protection
//! domain, completion queue, queue pair, then INIT, RTR and RTS. Teardown is the reverse, held
//! in place by the `Arc`s each object keeps of what it was made from.

use super::error::GdrError;
use crate::config::GdrConfig;
use sideway::ibverbs::address::{AddressHandleAttribute, Gid, GidType};
use sideway::ibverbs::completion::{BasicCompletionQueue, CompletionQueue as _};
use sideway::ibverbs::device::{DeviceInfo as _, DeviceList};
use sideway::ibverbs::device_context::{DeviceContext, Mtu, PortState};
use sideway::ibverbs::memory_region::MemoryRegion;
use sideway::ibverbs::protection_domain::ProtectionDomain;
use sideway::ibverbs::queue_pair::{
    BasicQueuePair, QueuePair as _, QueuePairAttribute, QueuePairAttributeMask, QueuePairState,
};
use sideway::ibverbs::AccessFlags;
use std::sync::Arc;

/// The library that rdma-mummy-sys loads at run time.
const LIBIBVERBS: &str = "libibverbs.so.1";

/// A NIC opened for the GDR transport: one device context and protection domain, shared by the
/// workers (each makes its own queue pair on it) and by the control plane (memory registration).
pub struct Nic {
    /// The protection domain every queue pair and memory region of the engine lives in. It
    /// holds the device context alive (sideway keeps an `Arc` of it inside).
    pd: Arc<ProtectionDomain>,
    context: Arc<DeviceContext>,
    /// Device name (`mlx5_0`, `rxe0`).
    pub name: String,
    /// Port number (from 1).
    pub port: u8,
    /// GID index used for the loopback connection.
    pub gid_index: u8,
    gid: Gid,
    /// Whether the chosen GID is a RoCE v2 one.
    pub roce_v2: bool,
    /// Path MTU: the port's active MTU.
    pub mtu: Mtu,
    /// Most work requests a send queue may hold (device limit).
    pub max_qp_wr: u32,
    /// Most scatter/gather entries per work request (device limit).
    pub max_sge: u32,
    /// Most entries a completion queue may hold (device limit).
    pub max_cqe: u32,
}

impl std::fmt::Debug for Nic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nic")
            .field("name", &self.name)
            .field("port", &self.port)
            .field("gid_index", &self.gid_index)
            .field("gid", &self.gid.to_string())
            .field("mtu", &mtu_bytes(self.mtu))
            .finish()
    }
}

/// Bytes of a verbs MTU.
pub fn mtu_bytes(mtu: Mtu) -> u32 {
    match mtu {
        Mtu::Mtu256 => 256,
        Mtu::Mtu512 => 512,
        Mtu::Mtu1024 => 1024,
        Mtu::Mtu2048 => 2048,
        Mtu::Mtu4096 => 4096,
    }
}

/// Whether the dynamic loader finds libibverbs (rdma-mummy-sys's stubs do nothing without it).
fn libibverbs_present() -> bool {
    let name = std::ffi::CString::new(LIBIBVERBS).expect("no NUL in a constant");
    // SAFETY: dlopen with a valid C string; RTLD_NOLOAD is not used, so this may load the
    // library (rdma-mummy-sys's constructor already tried); the handle is released right away.
    let handle = unsafe { libc::dlopen(name.as_ptr(), libc::RTLD_LAZY | libc::RTLD_LOCAL) };
    if handle.is_null() {
        return false;
    }
    // SAFETY: a handle dlopen returned, closed once.
    unsafe { libc::dlclose(handle) };
    true
}

impl Nic {
    /// Opens the NIC: `config.nic` by name, else `preferred` (the topology plan's choice), else
    /// the first device with an active port. Every failure names what is missing.
    pub fn open(config: &GdrConfig, preferred: Option<&str>) -> Result<Arc<Nic>, GdrError> {
        if !libibverbs_present() {
            return Err(GdrError::NoLibrary);
        }
        let list = DeviceList::new().map_err(|e| GdrError::verbs("ibv_get_device_list", "", e))?;
        let names: Vec<String> = list.iter().map(|d| d.name()).collect();
        if names.is_empty() {
            return Err(GdrError::NoDevice);
        }
        let wanted = config.nic.as_deref().or(preferred);
        let candidates: Vec<String> = match wanted {
            Some(name) if names.iter().any(|n| n == name) => vec![name.to_string()],
            Some(name) if config.nic.is_some() => {
                return Err(GdrError::DeviceNotFound { name: name.to_owned(), present: names })
            }
            _ => names.clone(),
        };
        let mut tried = Vec::new();
        for name in &candidates {
            let device = list.iter().find(|d| &d.name() == name).expect("listed above");
            match Nic::open_device(config, name, &device) {
                Ok(nic) => return Ok(Arc::new(nic)),
                Err(e) => tried.push((name.clone(), e)),
            }
        }
        Err(GdrError::NoUsableDevice { tried })
    }

    fn open_device(config: &GdrConfig, name: &str, device: &sideway::ibverbs::device::Device) -> Result<Nic, GdrError> {
        let context = device.open().map_err(|e| GdrError::verbs("ibv_open_device", "", e))?;
        let attr = context.query_device().map_err(|e| GdrError::verbs("ibv_query_device", "", e))?;
        let port_attr = context
            .query_port(config.port)
            .map_err(|e| GdrError::verbs("ibv_query_port", format!(" (port {})", config.port), e))?;
        if port_attr.port_state() != PortState::Active {
            return Err(GdrError::PortInactive { port: config.port, state: format!("{:?}", port_attr.port_state()) });
        }
        let (gid_index, gid, roce_v2) = choose_gid(&context, config)?;
        let pd = context.alloc_pd().map_err(|e| GdrError::verbs("ibv_alloc_pd", "", e))?;
        Ok(Nic {
            pd,
            context,
            name: name.to_string(),
            port: config.port,
            gid_index,
            gid,
            roce_v2,
            mtu: port_attr.active_mtu(),
            max_qp_wr: attr.max_qp_wr().max(1) as u32,
            max_sge: attr.max_sge().max(1) as u32,
            max_cqe: attr.max_cqe().max(1) as u32,
        })
    }

    /// Registers `len` bytes at `addr` (host memory, or device memory when nvidia-peermem is
    /// loaded) for local writes and remote writes.
    ///
    /// # Safety
    /// The memory must stay mapped while the returned region lives.
    pub unsafe fn register(&self, addr: u64, len: usize) -> Result<Arc<MemoryRegion>, GdrError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.pd.reg_mr(addr as usize, len, access()) }
            .map_err(|e| GdrError::verbs("ibv_reg_mr", format!(" ({len} bytes at {addr:#x} on {})", self.name), e))
    }

    /// Registers a dma-buf: `len` bytes at `offset` into the buffer behind `fd`, addressed on the
    /// wire as `iova` (the device address, so descriptors' addresses work unchanged).
    ///
    /// # Safety
    /// The exporter's memory must stay allocated while the returned region lives.
    pub unsafe fn register_dmabuf(
        &self,
        fd: i32,
        offset: u64,
        len: usize,
        iova: u64,
    ) -> Result<Arc<MemoryRegion>, GdrError> {
        // SAFETY: forwarded from the caller.
        unsafe { self.pd.reg_dmabuf_mr(offset, len, iova, fd, access()) }
            .map_err(|e| GdrError::verbs("ibv_reg_dmabuf_mr", format!(" ({len} bytes on {})", self.name), e))
    }

    /// A reliable-connected queue pair with its own completion queue, connected to itself.
    /// `depth` send work requests (already within the device's limit).
    pub fn loopback(self: &Arc<Nic>, depth: u32, max_sge: u32, inline: u32) -> Result<Loopback, GdrError> {
        // Every send work request may complete with a completion (errors and flushes do, signaled
        // or not), and receives are never posted, so `depth` entries would do; twice that leaves
        // room for stale flushes after a recovery that stopped waiting for them.
        let cq = self
            .context
            .create_cq_builder()
            .setup_cqe((2 * depth).min(self.max_cqe))
            .build()
            .map_err(|e| GdrError::verbs("ibv_create_cq", format!(" ({depth} entries)"), e))?;
        let qp = self
            .pd
            .create_qp_builder()
            .setup_max_send_wr(depth)
            .setup_max_recv_wr(1)
            .setup_max_send_sge(max_sge)
            .setup_max_recv_sge(1)
            .setup_max_inline_data(inline)
            .setup_send_cq(cq.clone())
            .setup_recv_cq(cq.clone())
            .build()
            .map_err(|e| {
                GdrError::verbs(
                    "ibv_create_qp",
                    format!(" (RC, {depth} send WRs, {max_sge} SGEs, {inline} B inline)"),
                    e,
                )
            })?;
        let (_, init) =
            qp.query(QueuePairAttributeMask::Capabilities).map_err(|e| GdrError::verbs("ibv_query_qp", "", e))?;
        let mut lb = Loopback { qp, cq, nic: self.clone(), max_inline: init.max_inline_data() };
        lb.connect()?;
        Ok(lb)
    }
}

/// Access for every registration: the queue pair writes locally (a loopback write lands in a
/// region of the same protection domain) and remotely.
fn access() -> AccessFlags {
    AccessFlags::LocalWrite | AccessFlags::RemoteWrite
}

/// The GID for RoCE v2 (or InfiniBand): the configured index, else a RoCE v2 entry whose address
/// is routable (IPv4-mapped first), else a RoCE v2 link-local one (a device whose only address is
/// its IPv6 link-local), else whatever the port has at index 0.
fn choose_gid(context: &Arc<DeviceContext>, config: &GdrConfig) -> Result<(u8, Gid, bool), GdrError> {
    if let Some(index) = config.gid_index {
        let gid = context
            .query_gid(config.port, index.into())
            .map_err(|e| GdrError::verbs("ibv_query_gid", format!(" (port {}, index {index})", config.port), e))?;
        let v2 = context.query_gid_type(config.port, index.into()).map(|t| t == GidType::RoceV2 as u32);
        return Ok((index, gid, v2.unwrap_or(false)));
    }
    let table = context.query_gid_table().map_err(|e| GdrError::verbs("ibv_query_gid_table", "", e))?;
    let entries: Vec<_> =
        table.iter().filter(|e| e.port_num() == u32::from(config.port) && !e.gid().is_zero()).collect();
    let rank = |e: &&sideway::ibverbs::address::GidEntry| {
        let gid = e.gid();
        let v2 = matches!(e.gid_type(), GidType::RoceV2);
        let mapped = gid.raw[..10].iter().all(|&b| b == 0) && gid.raw[10] == 0xff && gid.raw[11] == 0xff;
        match (v2, mapped, gid.is_unicast_link_local()) {
            (true, true, _) => 0,
            (true, false, false) => 1,
            (true, false, true) => 2,
            (false, _, _) if matches!(e.gid_type(), GidType::InfiniBand) => 0,
            _ => 3,
        }
    };
    let best = entries.iter().min_by_key(|e| (rank(e), e.gid_index())).ok_or(GdrError::NoGid { port: config.port })?;
    let index = u8::try_from(best.gid_index()).map_err(|_| GdrError::GidIndex { index: best.gid_index() })?;
    Ok((index, best.gid(), matches!(best.gid_type(), GidType::RoceV2)))
}

/// A queue pair connected to itself, and its completion queue.
pub struct Loopback {
    /// Dropped before `cq` (field order), which it was made with.
    pub(crate) qp: BasicQueuePair,
    pub(crate) cq: Arc<BasicCompletionQueue>,
    /// Keeps the protection domain and context alive for the queue pair.
    pub(crate) nic: Arc<Nic>,
    /// Largest write sent inline, as granted by the device.
    pub(crate) max_inline: u32,
}

impl Loopback {
    /// Brings the queue pair from any state to RTS, connected to itself: RESET, INIT, RTR (path
    /// MTU from the port, destination = its own number and GID), RTS.
    pub fn connect(&mut self) -> Result<(), GdrError> {
        let nic = self.nic.clone();
        let step = |qp: &mut BasicQueuePair, attr: &QueuePairAttribute, what: &str| {
            qp.modify(attr).map_err(|e| GdrError::verbs("ibv_modify_qp", format!(" (to {what})"), e))
        };
        let mut reset = QueuePairAttribute::new();
        reset.setup_state(QueuePairState::Reset);
        step(&mut self.qp, &reset, "RESET")?;
        let mut init = QueuePairAttribute::new();
        init.setup_state(QueuePairState::Init).setup_pkey_index(0).setup_port(nic.port).setup_access_flags(access());
        step(&mut self.qp, &init, "INIT")?;
        let psn = 0;
        let mut ah = AddressHandleAttribute::new();
        ah.setup_dest_lid(0)
            .setup_port(nic.port)
            .setup_service_level(0)
            .setup_grh_src_gid_index(nic.gid_index)
            .setup_grh_dest_gid(&nic.gid)
            .setup_grh_hop_limit(64);
        let mut rtr = QueuePairAttribute::new();
        rtr.setup_state(QueuePairState::ReadyToReceive)
            .setup_path_mtu(nic.mtu)
            .setup_dest_qp_num(self.qp.qp_number())
            .setup_rq_psn(psn)
            .setup_max_dest_read_atomic(1)
            .setup_min_rnr_timer(12)
            .setup_address_vector(&ah);
        step(&mut self.qp, &rtr, "RTR")?;
        let mut rts = QueuePairAttribute::new();
        rts.setup_state(QueuePairState::ReadyToSend)
            .setup_sq_psn(psn)
            .setup_timeout(14)
            .setup_retry_cnt(7)
            .setup_rnr_retry(7)
            .setup_max_read_atomic(1);
        step(&mut self.qp, &rts, "RTS")
    }

    /// Moves the queue pair to the error state: everything posted completes, flushed.
    pub(crate) fn set_error_state(&mut self) -> Result<(), GdrError> {
        let mut err = QueuePairAttribute::new();
        err.setup_state(QueuePairState::Error);
        self.qp.modify(&err).map_err(|e| GdrError::verbs("ibv_modify_qp", " (to ERR)", e))
    }

    /// The raw queue pair, for `ibv_post_send`.
    pub fn raw_qp(&self) -> *mut rdma_mummy_sys::ibv_qp {
        // SAFETY: the pointer is used only while `self` (which owns the queue pair) lives.
        unsafe { self.qp.qp().as_ptr() }
    }

    /// The raw completion queue, for `ibv_poll_cq`.
    pub fn raw_cq(&self) -> *mut rdma_mummy_sys::ibv_cq {
        // SAFETY: as in raw_qp.
        unsafe { self.cq.cq().as_ptr() }
    }
}
