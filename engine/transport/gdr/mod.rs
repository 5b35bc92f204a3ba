//! The GDR transport: GPUDirect RDMA through the NIC's DMA engine, over a reliable-connected
//! queue pair connected to itself (one per worker).
//!
//! Both directions are RDMA WRITEs: host to GPU writes from host memory (local key) to GPU
//! memory (remote key), GPU to host from GPU memory (local key) to host memory (remote key), so
//! neither direction waits on a read round trip. Descriptors become chains of work requests
//! posted with one doorbell; adjacent ranges merge into one work request's scatter/gather list;
//! one work request in [`GdrConfig::signal_every`] asks for a completion (plus the last one
//! before the transport would otherwise go quiet), and send-queue credits are counted so the
//! queue can never overflow. A work-request error fails only the descriptors of that work
//! request (a merged one is first retried unmerged), the queue pair is drained, reset and
//! reconnected, and the descriptors behind it are posted again.
//!
//! Memory is registered with the NIC on the control plane only ([`crate::Engine::register_host`],
//! [`crate::Engine::register_gpu`]): host memory with `ibv_reg_mr`, GPU memory as a dma-buf
//! (`cuMemGetHandleForAddressRange` then `ibv_reg_dmabuf_mr`) or, failing that, with
//! `ibv_reg_mr` on the device pointer (nvidia-peermem). The keys live in the region table, so a
//! descriptor naming memory the NIC does not know fails validation; nothing registers on the
//! hot path.
//!
//! Compiled with the `gdr` Cargo feature (on by default). libibverbs is loaded at run time.

pub(crate) mod error;
#[cfg(feature = "gdr")]
pub(crate) mod nic;
#[cfg(feature = "gdr")]
mod post;

pub use error::{GdrError, SelfTestFault, VerbsError};
#[cfg(feature = "gdr")]
pub use post::GdrTransport;

use crate::config::GdrConfig;
use std::sync::atomic::{AtomicU64, Ordering};

/// Per-worker NIC counters, written by the worker with Relaxed stores (statistics only:
/// nothing is ordered by them).
#[derive(Debug, Default)]
pub struct NicCounters {
    work_requests: AtomicU64,
    doorbells: AtomicU64,
    completions: AtomicU64,
    errors: AtomicU64,
    recoveries: AtomicU64,
    inline_writes: AtomicU64,
}

/// A snapshot of one worker's [`NicCounters`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NicStats {
    /// Work requests posted.
    pub work_requests: u64,
    /// `ibv_post_send` calls (one doorbell each).
    pub doorbells: u64,
    /// Work completions polled (successful and failed).
    pub completions: u64,
    /// Work completions with an error status, and failed posts.
    pub errors: u64,
    /// Times the queue pair was reset and reconnected.
    pub recoveries: u64,
    /// Work requests posted with their data inline.
    pub inline_writes: u64,
}

impl NicCounters {
    #[cfg_attr(not(feature = "gdr"), allow(dead_code))]
    fn bump(counter: &AtomicU64, n: u64) {
        // Relaxed: single writer (the worker), statistics only.
        counter.store(counter.load(Ordering::Relaxed) + n, Ordering::Relaxed);
    }

    /// A snapshot.
    pub fn snapshot(&self) -> NicStats {
        // Relaxed: statistics only.
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        NicStats {
            work_requests: get(&self.work_requests),
            doorbells: get(&self.doorbells),
            completions: get(&self.completions),
            errors: get(&self.errors),
            recoveries: get(&self.recoveries),
            inline_writes: get(&self.inline_writes),
        }
    }
}

/// `Done::detail` of an operation failed because the NIC was marked unusable.
pub const DETAIL_NIC_UNUSABLE: u32 = 0x1_0000;
/// `Done::detail` bit of an operation whose `ibv_post_send` failed (the low bits are the errno).
pub const DETAIL_POST_FAILED: u32 = 0x2_0000;

/// Opens the NIC for the engine (`preferred`: the topology plan's choice) and runs the loopback
/// self-test: one RDMA WRITE between two registered buffers, checked byte for byte. Every
/// failure names what is missing.
#[cfg(feature = "gdr")]
pub(crate) fn open(config: &GdrConfig, preferred: Option<&str>) -> Result<std::sync::Arc<nic::Nic>, GdrError> {
    let nic = nic::Nic::open(config, preferred)?;
    self_test(&nic, config).map_err(|fault| GdrError::SelfTest { device: nic.name.clone(), fault })?;
    Ok(nic)
}

/// Without the `gdr` feature there is no NIC to open.
#[cfg(not(feature = "gdr"))]
pub(crate) fn open<T>(_config: &GdrConfig, _preferred: Option<&str>) -> Result<T, GdrError> {
    Err(GdrError::NotBuilt)
}

#[cfg(feature = "gdr")]
fn self_test(nic: &std::sync::Arc<nic::Nic>, config: &GdrConfig) -> Result<(), SelfTestFault> {
    let setup = |e: GdrError| SelfTestFault::Setup(Box::new(e));
    use crate::desc::{Endpoint, ValidCopy};
    use crate::transport::{Done, Op, Token, Transport};
    const LEN: usize = 8192;
    let src: Vec<u8> = (0..LEN).map(|i| (i * 7 + 3) as u8).collect();
    let mut dst = vec![0u8; LEN];
    // SAFETY: both buffers outlive their registrations (dropped at the end of this function,
    // after the transport, which holds no reference to them once polled empty).
    let (src_mr, dst_mr) = unsafe {
        (
            nic.register(src.as_ptr() as u64, LEN).map_err(setup)?,
            nic.register(dst.as_mut_ptr() as u64, LEN).map_err(setup)?,
        )
    };
    let small = GdrConfig { send_queue_depth: 64, chain: 8, signal_every: 4, ..config.clone() };
    let mut transport = GdrTransport::new(nic.clone(), small, std::sync::Arc::default());
    transport.start().map_err(|e| match e.downcast::<GdrError>() {
        Ok(e) => SelfTestFault::Setup(e),
        Err(e) => SelfTestFault::Setup(Box::new(GdrError::Fallback(e))),
    })?;
    let end = |mr: &sideway::ibverbs::memory_region::MemoryRegion, addr: u64| Endpoint {
        region: 0,
        kind: 0,
        addr,
        lkey: mr.lkey(),
        rkey: mr.rkey(),
    };
    // Two writes: one above the inline limit, one small enough to go inline.
    let ops = [
        Op {
            token: Token { queue: 0, slot: 0 },
            copy: ValidCopy {
                src: end(&src_mr, src.as_ptr() as u64),
                dst: end(&dst_mr, dst.as_ptr() as u64),
                len: 4096,
            },
        },
        Op {
            token: Token { queue: 0, slot: 1 },
            copy: ValidCopy {
                src: end(&src_mr, src.as_ptr() as u64 + 4096),
                dst: end(&dst_mr, dst.as_ptr() as u64 + 4096),
                len: 64,
            },
        },
    ];
    if transport.submit(&ops) != ops.len() {
        return Err(SelfTestFault::Refused);
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    let mut done = [Done::ok(Token { queue: 0, slot: 0 }); 4];
    let mut seen = 0;
    while seen < ops.len() {
        let n = transport.poll(&mut done);
        for d in &done[..n] {
            if d.status != crate::desc::Status::Ok {
                return Err(SelfTestFault::Failed { status: d.status.code(), detail: d.detail });
            }
        }
        seen += n;
        if std::time::Instant::now() > deadline {
            return Err(SelfTestFault::NoCompletion);
        }
    }
    drop(transport);
    if dst[..4096 + 64] != src[..4096 + 64] || dst[4096 + 64..].iter().any(|&b| b != 0) {
        return Err(SelfTestFault::WrongBytes);
    }
    Ok(())
}
