//! The GDR transport's hot path: chains of RDMA WRITEs posted with one doorbell, selective
//! signaling with send-queue credits, batched completion polling, and recovery after a
//! work-request error. Nothing here allocates after construction.
//!
//! Bookkeeping: every operation gets a sequence number when its first bytes are placed in a
//! work request, and each posted work request records the operations it covers. A reliable
//! connection completes work requests in order, so one successful completion finishes every
//! work request posted before it, signaled or not.

use super::error::GdrError;
use super::nic::{Loopback, Nic};
use super::{NicCounters, DETAIL_NIC_UNUSABLE, DETAIL_POST_FAILED};
use crate::config::GdrConfig;
use crate::desc::Status;
use crate::error::TransportError;
use crate::transport::{Done, Finished, Op, Transport};
use rdma_mummy_sys::{
    ibv_poll_cq, ibv_post_send, ibv_send_flags, ibv_send_wr, ibv_sge, ibv_wc, ibv_wc_status, ibv_wr_opcode,
};
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Completions taken per `ibv_poll_cq`.
const POLL_BATCH: usize = 32;
/// How long recovery waits for the flushed work requests' completions before resetting anyway.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);

/// An operation taken from the worker and not yet finished.
#[derive(Clone, Copy, Debug)]
struct Pending {
    op: Op,
    /// Post it in a work request of its own (a merged work request with it failed).
    alone: bool,
}

/// One work request of the chain being built, or posted.
#[derive(Clone, Copy, Debug, Default)]
struct Plan {
    /// Its `wr_id` once posted.
    seq: u64,
    num_sge: usize,
    remote_addr: u64,
    rkey: u32,
    bytes: u64,
    /// Takes no more operations (its operation is alone, or split over several work requests).
    closed: bool,
    /// First operation with bytes in it.
    first_op: u64,
    /// One past the last operation with bytes in it.
    end_op: u64,
    /// Operations before this number are wholly finished once it completes.
    done_op: u64,
    signaled: bool,
}

enum State {
    Ready,
    /// A work request failed: waiting for the completion of `last` (the last one posted; all of
    /// them complete, flushed, in the error state) before resetting the queue pair.
    Draining {
        last: u64,
        since: Instant,
    },
    /// The NIC is marked unusable: every operation fails.
    Unusable,
}

/// The GDR transport of one worker.
pub struct GdrTransport {
    config: GdrConfig,
    nic: Arc<Nic>,
    /// Made on the worker's thread by `start`.
    link: Option<Loopback>,
    depth: usize,
    max_sge: usize,
    max_inline: u32,
    max_wr_bytes: u64,
    state: State,
    /// Taken from the worker, not yet wholly placed in work requests, in order.
    waiting: VecDeque<Pending>,
    /// Bytes of `waiting[0]` already placed (a descriptor split over several work requests).
    head_offset: u64,
    /// Wholly placed, not finished, in order; `inflight[0]` has sequence number `inflight_base`.
    inflight: VecDeque<Pending>,
    inflight_base: u64,
    /// Posted work requests not yet completed, in order.
    posted: VecDeque<Plan>,
    next_wr: u64,
    signaled_outstanding: usize,
    finished: Finished,
    failures_in_row: u32,
    counters: Arc<NicCounters>,
    /// Where operations go once the NIC is marked unusable (`use_gdr = auto`: the CUDA driver).
    fallback: Option<Box<dyn Transport>>,
    plans: Vec<Plan>,
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
    wcs: Vec<ibv_wc>,
}

// SAFETY: the raw pointers inside `wrs` point into this struct's own `sges` and `wrs` and are
// rewritten before each post; the verbs objects are used only from the owning worker's thread.
unsafe impl Send for GdrTransport {}

impl GdrTransport {
    /// A transport for one worker on `nic`. The queue pair is made in [`Transport::start`], on
    /// the worker's thread.
    pub fn new(nic: Arc<Nic>, config: GdrConfig, counters: Arc<NicCounters>) -> GdrTransport {
        let depth = config.send_queue_depth.min(nic.max_qp_wr as usize).max(2);
        let max_sge = config.max_sge.min(nic.max_sge as usize).max(1);
        let chain = config.chain.min(depth / 2).max(1);
        let signal_every = config.signal_every.min(depth / 2).max(1);
        GdrTransport {
            config: GdrConfig { chain, signal_every, ..config },
            nic,
            link: None,
            depth,
            max_sge,
            max_inline: 0,
            max_wr_bytes: config.max_wr_bytes.clamp(1, 1 << 30),
            state: State::Ready,
            waiting: VecDeque::with_capacity(2 * depth),
            head_offset: 0,
            inflight: VecDeque::with_capacity(2 * depth),
            inflight_base: 0,
            posted: VecDeque::with_capacity(depth),
            next_wr: 0,
            signaled_outstanding: 0,
            finished: Finished::with_capacity(4 * depth),
            failures_in_row: 0,
            counters,
            fallback: None,
            plans: vec![Plan::default(); chain],
            // SAFETY: ibv_send_wr is plain data (integers, raw pointers, unions of those): all
            // zeroes is a valid value.
            wrs: (0..chain).map(|_| unsafe { std::mem::zeroed::<ibv_send_wr>() }).collect(),
            sges: vec![ibv_sge { addr: 0, length: 0, lkey: 0 }; chain * max_sge],
            // SAFETY: ibv_wc is plain data: all zeroes is valid.
            wcs: (0..POLL_BATCH).map(|_| unsafe { std::mem::zeroed::<ibv_wc>() }).collect(),
        }
    }

    /// Sends operations to `fallback` once the NIC is marked unusable, instead of failing them.
    /// It is started with this transport, on the worker's thread.
    pub fn with_fallback(mut self, fallback: Box<dyn Transport>) -> GdrTransport {
        self.fallback = Some(fallback);
        self
    }

    /// Whether the NIC was marked unusable (repeated failures).
    pub fn unusable(&self) -> bool {
        matches!(self.state, State::Unusable)
    }

    fn next_op_seq(&self) -> u64 {
        self.inflight_base + self.inflight.len() as u64
    }

    /// Posts chains while there is work, credit and a reason not to wait: a whole chain is
    /// waiting, or no signaled work request is outstanding (no completion would come to call
    /// this again).
    fn flush(&mut self) {
        while matches!(self.state, State::Ready) && !self.waiting.is_empty() {
            let credits = self.depth - self.posted.len();
            if credits == 0 || (self.waiting.len() < self.config.chain && self.signaled_outstanding > 0) {
                return;
            }
            let n = self.plan_chain(credits.min(self.config.chain));
            self.ring(n);
        }
    }

    /// Plans at most `max_wrs` work requests from `waiting` into `plans`/`sges`, moving each
    /// operation to `inflight` once all its bytes are placed. Returns how many.
    fn plan_chain(&mut self, max_wrs: usize) -> usize {
        let mut n = 0;
        while let Some(&pending) = self.waiting.front() {
            let c = pending.op.copy;
            let offset = self.head_offset;
            let remaining = c.len - offset;
            let (src, dst) = (c.src.addr + offset, c.dst.addr + offset);
            let seq = self.next_op_seq();
            if n > 0 && offset == 0 && !pending.alone {
                let plan = &mut self.plans[n - 1];
                let base = (n - 1) * self.max_sge;
                let mergeable = !plan.closed
                    && plan.remote_addr + plan.bytes == dst
                    && plan.rkey == c.dst.rkey
                    && plan.bytes + remaining <= self.max_wr_bytes;
                let last = self.sges[base + plan.num_sge - 1];
                let placed = if !mergeable {
                    false
                } else if last.addr + u64::from(last.length) == src && last.lkey == c.src.lkey {
                    self.sges[base + plan.num_sge - 1].length += remaining as u32;
                    true
                } else if plan.num_sge < self.max_sge {
                    self.sges[base + plan.num_sge] = ibv_sge { addr: src, length: remaining as u32, lkey: c.src.lkey };
                    plan.num_sge += 1;
                    true
                } else {
                    false
                };
                if placed {
                    plan.bytes += remaining;
                    plan.end_op = seq + 1;
                    plan.done_op = seq + 1;
                    self.place_whole();
                    continue;
                }
            }
            if n == max_wrs {
                break;
            }
            let len = remaining.min(self.max_wr_bytes);
            let whole = len == remaining;
            self.sges[n * self.max_sge] = ibv_sge { addr: src, length: len as u32, lkey: c.src.lkey };
            self.plans[n] = Plan {
                seq: 0,
                num_sge: 1,
                remote_addr: dst,
                rkey: c.dst.rkey,
                bytes: len,
                closed: pending.alone || !whole || offset > 0,
                first_op: seq,
                end_op: seq + 1,
                done_op: if whole { seq + 1 } else { seq },
                signaled: false,
            };
            n += 1;
            if whole {
                self.place_whole();
            } else {
                self.head_offset += len;
            }
        }
        n
    }

    /// `waiting[0]` is wholly placed: it moves to `inflight`.
    fn place_whole(&mut self) {
        let pending = self.waiting.pop_front().expect("called with a waiting operation");
        self.inflight.push_back(pending);
        self.head_offset = 0;
    }

    /// Turns `plans[..n]` into a chain of work requests and posts it with one doorbell.
    fn ring(&mut self, n: usize) {
        if n == 0 {
            return;
        }
        let quiet_after = self.waiting.is_empty();
        let every = self.config.signal_every as u64;
        let wrs_ptr = self.wrs.as_mut_ptr();
        let mut inline = 0;
        for i in 0..n {
            let seq = self.next_wr + i as u64;
            let plan = &mut self.plans[i];
            plan.seq = seq;
            plan.signaled = seq % every == every - 1 || (i == n - 1 && quiet_after);
            let mut flags = 0;
            if plan.signaled {
                flags |= ibv_send_flags::IBV_SEND_SIGNALED.0;
            }
            if plan.bytes <= u64::from(self.max_inline) {
                flags |= ibv_send_flags::IBV_SEND_INLINE.0;
                inline += 1;
            }
            let wr = &mut self.wrs[i];
            wr.wr_id = seq;
            // SAFETY: i + 1 < n <= wrs.len() when not the last; the pointer stays inside `wrs`.
            wr.next = if i + 1 < n { unsafe { wrs_ptr.add(i + 1) } } else { std::ptr::null_mut() };
            wr.sg_list = self.sges[i * self.max_sge..].as_mut_ptr();
            wr.num_sge = plan.num_sge as i32;
            wr.opcode = ibv_wr_opcode::IBV_WR_RDMA_WRITE;
            wr.send_flags = flags;
            wr.wr.rdma = rdma_mummy_sys::rdma_t { remote_addr: plan.remote_addr, rkey: plan.rkey };
        }
        let link = self.link.as_ref().expect("started");
        let mut bad: *mut ibv_send_wr = std::ptr::null_mut();
        // SAFETY: the queue pair is live (owned by `link`); `wrs[..n]` is a well-formed chain
        // whose scatter/gather lists point at `sges`, and the memory they name is registered
        // with this protection domain (keys from the region table, whose regions outlive their
        // in-flight copies).
        let rc = unsafe { ibv_post_send(link.raw_qp(), self.wrs.as_mut_ptr(), &mut bad) };
        NicCounters::bump(&self.counters.doorbells, 1);
        let posted = if rc == 0 {
            n
        } else if bad.is_null() {
            0 // the provider did not say where it stopped: take it as nothing posted
        } else {
            // SAFETY: on failure a non-null `bad` points at the first work request not posted,
            // inside `wrs[..n]`.
            (unsafe { bad.offset_from(self.wrs.as_ptr()) }).clamp(0, n as isize) as usize
        };
        for plan in &self.plans[..posted] {
            self.posted.push_back(*plan);
            self.signaled_outstanding += usize::from(plan.signaled);
        }
        self.next_wr += posted as u64;
        NicCounters::bump(&self.counters.work_requests, posted as u64);
        NicCounters::bump(&self.counters.inline_writes, inline);
        if rc != 0 {
            NicCounters::bump(&self.counters.errors, 1);
            let failed = self.plans[posted];
            let errno = u32::try_from(rc).unwrap_or(0) & 0xffff;
            // The chain's later work requests were never posted, and nothing posted can be known
            // to have run: everything unfinished goes back to `waiting`, and the failed work
            // request's operations fail (or are retried alone). With work outstanding the queue
            // pair is moved to the error state, drained and reset.
            let outstanding = !self.posted.is_empty();
            if outstanding {
                if let Err(e) = self.link.as_mut().expect("started").set_error_state() {
                    self.mark_unusable(&e.to_string());
                    return;
                }
            }
            let drain = outstanding.then(|| self.next_wr - 1);
            self.recover(self.inflight_base, &failed, Some(DETAIL_POST_FAILED | errno), drain, outstanding);
        }
    }

    /// Operations before sequence number `end` finished successfully.
    fn finish_before(&mut self, end: u64) {
        while self.inflight_base < end {
            let Some(p) = self.inflight.pop_front() else { break };
            self.inflight_base += 1;
            self.finished.push(Done::ok(p.op.token));
        }
    }

    /// Handles one failure. Operations before `completed` finished. The operations of `failed`
    /// fail with `fail` (or, when it merged several, are retried each alone), or with `None`
    /// are simply posted again (a flushed work request). Every other unfinished operation goes
    /// back to `waiting`. The queue pair is reset once the completion of work request `drain`
    /// arrives, or now when `drain` is `None` and `reset` is set.
    fn recover(&mut self, completed: u64, failed: &Plan, fail: Option<u32>, drain: Option<u64>, reset: bool) {
        self.finish_before(completed);
        self.head_offset = 0;
        while let Some(p) = self.inflight.pop_back() {
            self.waiting.push_front(p);
        }
        let start = (failed.first_op.saturating_sub(self.inflight_base) as usize).min(self.waiting.len());
        let end = (failed.end_op.saturating_sub(self.inflight_base) as usize).min(self.waiting.len());
        if let Some(detail) = fail {
            let merged = end - start > 1 && self.waiting.range(start..end).any(|p| !p.alone);
            if merged {
                self.waiting.range_mut(start..end).for_each(|p| p.alone = true);
            } else {
                for p in self.waiting.drain(start..end) {
                    self.finished.push(Done { token: p.op.token, status: Status::TransportFailed, detail });
                }
            }
        }
        self.posted.clear();
        self.signaled_outstanding = 0;
        match drain {
            Some(last) => self.state = State::Draining { last, since: Instant::now() },
            None if reset => self.reset(),
            None => {}
        }
    }

    /// Resets and reconnects the queue pair after a failure; too many in a row, or a failed
    /// reconnection, mark the NIC unusable.
    fn reset(&mut self) {
        self.failures_in_row += 1;
        if self.failures_in_row > self.config.max_recoveries {
            let reason = format!(
                "{} failures in a row without a successful completion (max_recoveries = {})",
                self.failures_in_row, self.config.max_recoveries
            );
            self.mark_unusable(&reason);
            return;
        }
        match self.link.as_mut().expect("started").connect() {
            Ok(()) => {
                NicCounters::bump(&self.counters.recoveries, 1);
                self.state = State::Ready;
            }
            Err(reason) => self.mark_unusable(&format!("reconnecting the queue pair after an error: {reason}")),
        }
    }

    /// Marks the NIC unusable: everything held fails, and so does everything submitted later
    /// (or it goes to the fallback transport).
    fn mark_unusable(&mut self, reason: &str) {
        let then = match &self.fallback {
            Some(f) => format!("later copies go to the {} transport", f.name()),
            None => "later copies fail".to_string(),
        };
        eprintln!("ferry: gdr: {}: marked unusable: {reason}; {then}", self.nic.name);
        self.state = State::Unusable;
        self.head_offset = 0;
        self.posted.clear();
        self.signaled_outstanding = 0;
        for p in self.inflight.drain(..).chain(self.waiting.drain(..)) {
            self.finished.push(Done {
                token: p.op.token,
                status: Status::TransportFailed,
                detail: DETAIL_NIC_UNUSABLE,
            });
        }
    }

    /// Handles one work completion.
    fn complete(&mut self, seq: u64, status: u32) {
        NicCounters::bump(&self.counters.completions, 1);
        if status != ibv_wc_status::IBV_WC_SUCCESS {
            NicCounters::bump(&self.counters.errors, 1);
        }
        match self.state {
            State::Unusable => {}
            State::Draining { last, .. } => {
                if seq == last {
                    self.reset();
                }
            }
            State::Ready => {
                // A completion from before the last reset (or a stray one) matches nothing.
                if self.posted.front().is_none_or(|p| seq < p.seq) {
                    return;
                }
                if status == ibv_wc_status::IBV_WC_SUCCESS {
                    let mut done = self.inflight_base;
                    while let Some(p) = self.posted.front() {
                        if p.seq > seq {
                            break;
                        }
                        done = p.done_op;
                        self.signaled_outstanding -= usize::from(p.signaled);
                        self.posted.pop_front();
                    }
                    self.finish_before(done);
                    self.failures_in_row = 0;
                    return;
                }
                // Work requests before `seq` ran (a reliable connection completes in order);
                // `seq` failed; those after it are flushed and will each complete, the last one
                // ending the drain.
                while self.posted.front().is_some_and(|p| p.seq < seq) {
                    self.posted.pop_front();
                }
                let Some(failed) = self.posted.pop_front() else { return };
                let fail = (status != ibv_wc_status::IBV_WC_WR_FLUSH_ERR).then_some(status);
                let drain = (!self.posted.is_empty()).then(|| self.next_wr - 1);
                self.recover(failed.first_op, &failed, fail, drain, true);
            }
        }
    }
}

impl Transport for GdrTransport {
    fn name(&self) -> &'static str {
        "gdr"
    }

    fn start(&mut self) -> Result<(), TransportError> {
        let depth = self.depth as u32;
        let inline = self.config.inline_max;
        let link = self.nic.loopback(depth, self.max_sge as u32, inline)?;
        self.max_inline = link.max_inline.min(inline);
        self.link = Some(link);
        match &mut self.fallback {
            Some(fallback) => fallback.start().map_err(|e| GdrError::Fallback(e).into()),
            None => Ok(()),
        }
    }

    fn supports(&self, _src: u32, _dst: u32) -> bool {
        // Host and GPU memory are both registered with the NIC: any pair works.
        true
    }

    fn submit(&mut self, ops: &[Op]) -> usize {
        if let (true, Some(fallback)) = (self.unusable(), &mut self.fallback) {
            // Validation checked memory kinds against this transport, which takes any pair; the
            // fallback may take fewer (the CUDA driver's copies: host <-> GPU only).
            let mut i = 0;
            while i < ops.len() {
                let fits = |op: &Op| fallback.supports(op.copy.src.kind, op.copy.dst.kind);
                if !fits(&ops[i]) {
                    let token = ops[i].token;
                    self.finished.push(Done { token, status: Status::TransportFailed, detail: DETAIL_NIC_UNUSABLE });
                    i += 1;
                    continue;
                }
                let run = ops[i..].iter().take_while(|op| fits(op)).count();
                let taken = fallback.submit(&ops[i..i + run]);
                i += taken;
                if taken < run {
                    break;
                }
            }
            return i;
        }
        if self.unusable() {
            for op in ops {
                self.finished.push(Done {
                    token: op.token,
                    status: Status::TransportFailed,
                    detail: DETAIL_NIC_UNUSABLE,
                });
            }
            return ops.len();
        }
        let room = (2 * self.depth).saturating_sub(self.waiting.len() + self.inflight.len());
        let n = room.min(ops.len());
        self.waiting.extend(ops[..n].iter().map(|&op| Pending { op, alone: false }));
        self.flush();
        n
    }

    fn poll(&mut self, done: &mut [Done]) -> usize {
        if let (true, Some(fallback)) = (self.unusable(), &mut self.fallback) {
            let n = self.finished.drain_into(done);
            return n + fallback.poll(&mut done[n..]);
        }
        if let Some(link) = &self.link {
            if !self.unusable() {
                let cq = link.raw_cq();
                // SAFETY: the completion queue is live (owned by `link`); `wcs` holds
                // POLL_BATCH entries.
                let n = unsafe { ibv_poll_cq(cq, POLL_BATCH as i32, self.wcs.as_mut_ptr()) };
                if n < 0 {
                    self.mark_unusable(&format!("ibv_poll_cq failed ({n}): completion queue overrun?"));
                }
                for i in 0..n.max(0) as usize {
                    let (seq, status) = (self.wcs[i].wr_id, self.wcs[i].status);
                    self.complete(seq, status);
                }
                if let State::Draining { since, .. } = self.state {
                    if since.elapsed() > DRAIN_DEADLINE {
                        self.reset();
                    }
                }
                self.flush();
            }
        }
        self.finished.drain_into(done)
    }

    fn in_flight(&self) -> usize {
        let fallback = self.fallback.as_ref().map_or(0, |f| f.in_flight());
        self.waiting.len() + self.inflight.len() + self.finished.len() + fallback
    }
}
