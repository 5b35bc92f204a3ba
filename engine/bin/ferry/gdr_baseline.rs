//! The raw-verbs baseline that `ferry bench --transport gdr` compares the engine with: one
//! thread posting chains of RDMA WRITEs straight to a loopback queue pair on the same device,
//! with the engine's chain length and signaling ratio, and no rings, validation or bookkeeping.

use crate::bandwidth::Measurement;
use ferry::internals::nic::Nic;
use rdma_mummy_sys::{ibv_poll_cq, ibv_post_send, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wr_opcode};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One side of the baseline's copies: a buffer's address and its key.
#[derive(Clone, Copy, Debug)]
pub struct Side {
    /// Address of the buffer's first byte.
    pub addr: u64,
    /// Local key (source) or remote key (destination).
    pub key: u32,
}

/// Writes `count` blocks of `block` bytes from `src` to `dst` at the plan's offsets, in chains of
/// `chain` work requests per doorbell with one completion per `signal_every`, keeping at most
/// `depth` outstanding. Fails on the first error completion or after `timeout` without one.
#[allow(clippy::too_many_arguments)]
pub fn raw_writes(
    nic: &Arc<Nic>,
    src: Side,
    dst: Side,
    plan: &[(u64, u64)],
    block: u64,
    count: u64,
    chain: usize,
    signal_every: u64,
    depth: usize,
) -> Result<Measurement, String> {
    let link = nic.loopback(depth as u32, 1, 0).map_err(|e| e.to_string())?;
    // SAFETY: plain data; all zeroes is valid.
    let mut wrs: Vec<ibv_send_wr> = (0..chain).map(|_| unsafe { std::mem::zeroed() }).collect();
    let mut sges = vec![ibv_sge { addr: 0, length: 0, lkey: 0 }; chain];
    // SAFETY: plain data; all zeroes is valid.
    let mut wcs: Vec<ibv_wc> = (0..32).map(|_| unsafe { std::mem::zeroed() }).collect();
    let (mut posted, mut completed) = (0u64, 0u64);
    let start = Instant::now();
    let mut last_progress = start;
    while completed < count {
        let room = depth as u64 - (posted - completed);
        let n = (count - posted).min(room).min(chain as u64) as usize;
        if n > 0 && (room >= chain as u64 || posted == completed) {
            let base = wrs.as_mut_ptr();
            for i in 0..n {
                let seq = posted + i as u64;
                let (s, d) = plan[(seq % plan.len() as u64) as usize];
                sges[i] = ibv_sge { addr: src.addr + s, length: block as u32, lkey: src.key };
                let wr = &mut wrs[i];
                wr.wr_id = seq;
                // SAFETY: i + 1 < n <= chain: inside `wrs`.
                wr.next = if i + 1 < n { unsafe { base.add(i + 1) } } else { std::ptr::null_mut() };
                wr.sg_list = &mut sges[i];
                wr.num_sge = 1;
                wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                let signaled = seq % signal_every == signal_every - 1 || seq + 1 == count;
                wr.send_flags = if signaled { ibv_send_flags::IBV_SEND_SIGNALED.0 } else { 0 };
                wr.wr.rdma = rdma_mummy_sys::rdma_t { remote_addr: dst.addr + d, rkey: dst.key };
            }
            let mut bad = std::ptr::null_mut();
            // SAFETY: live queue pair; a well-formed chain over registered memory.
            let rc = unsafe { ibv_post_send(link.raw_qp(), wrs.as_mut_ptr(), &mut bad) };
            if rc != 0 {
                return Err(format!("ibv_post_send failed: errno {rc}"));
            }
            posted += n as u64;
        }
        // SAFETY: live completion queue; `wcs` holds 32 entries.
        let got = unsafe { ibv_poll_cq(link.raw_cq(), wcs.len() as i32, wcs.as_mut_ptr()) };
        if got < 0 {
            return Err(format!("ibv_poll_cq failed ({got})"));
        }
        for wc in &wcs[..got as usize] {
            if wc.status != rdma_mummy_sys::ibv_wc_status::IBV_WC_SUCCESS {
                return Err(format!("work request {} completed with status {}", wc.wr_id, wc.status));
            }
            completed = completed.max(wc.wr_id + 1);
            last_progress = Instant::now();
        }
        if last_progress.elapsed() > Duration::from_secs(10) {
            return Err(format!("no completion for 10 s ({completed} of {count} done)"));
        }
    }
    Ok(Measurement { descriptors: count, bytes: count * block, seconds: start.elapsed().as_secs_f64() })
}
