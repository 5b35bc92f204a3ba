//! A fault-injecting transport for tests: wraps another transport and fails chosen operations,
//! accepts fewer operations than offered, holds completions behind a gate, or returns them in
//! reverse order. Configured by its constructor and builder methods only.

use super::{Done, Op, Transport};
use crate::desc::Status;
use crate::error::TransportError;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Decides whether operation number `n` (counting every operation offered, from 0) fails, and
/// with which detail code.
pub type FailRule = Box<dyn FnMut(u64, &Op) -> Option<u32> + Send>;

/// Holds a [`FaultTransport`]'s completions while closed.
#[derive(Clone, Debug, Default)]
pub struct Gate(Arc<AtomicBool>);

impl Gate {
    /// A gate, open.
    pub fn new() -> Gate {
        Gate::default()
    }

    /// Hold completions from now on.
    pub fn close(&self) {
        // Relaxed: a test control; the worker sees it on a later poll, order does not matter.
        self.0.store(true, Ordering::Relaxed);
    }

    /// Release held completions.
    pub fn open(&self) {
        // Relaxed: as in close.
        self.0.store(false, Ordering::Relaxed);
    }

    fn is_closed(&self) -> bool {
        // Relaxed: as in close.
        self.0.load(Ordering::Relaxed)
    }
}

/// Wraps a transport and injects faults.
pub struct FaultTransport {
    inner: Box<dyn Transport>,
    fail: Option<FailRule>,
    accept_at_most: usize,
    reverse: bool,
    gate: Gate,
    offered: u64,
    held: Vec<Done>,
}

impl FaultTransport {
    /// Passes everything through to `inner` until configured otherwise.
    pub fn new(inner: Box<dyn Transport>) -> FaultTransport {
        FaultTransport {
            inner,
            fail: None,
            accept_at_most: usize::MAX,
            reverse: false,
            gate: Gate::new(),
            offered: 0,
            held: Vec::with_capacity(1024),
        }
    }

    /// Fails every operation for which `rule` returns `Some(detail)`, with
    /// [`Status::TransportFailed`]; such operations never reach the inner transport.
    pub fn fail_when(mut self, rule: impl FnMut(u64, &Op) -> Option<u32> + Send + 'static) -> Self {
        self.fail = Some(Box::new(rule));
        self
    }

    /// Accepts at most `n` operations per `submit`, so the worker must offer the rest again.
    pub fn accept_at_most(mut self, n: usize) -> Self {
        self.accept_at_most = n.max(1);
        self
    }

    /// Returns each poll's completions in reverse order.
    pub fn reverse_completions(mut self) -> Self {
        self.reverse = true;
        self
    }

    /// Holds completions while `gate` is closed.
    pub fn with_gate(mut self, gate: Gate) -> Self {
        self.gate = gate;
        self
    }
}

impl Transport for FaultTransport {
    fn name(&self) -> &'static str {
        "fault"
    }

    fn start(&mut self) -> Result<(), TransportError> {
        self.inner.start()
    }

    fn supports(&self, src: u32, dst: u32) -> bool {
        self.inner.supports(src, dst)
    }

    fn submit(&mut self, ops: &[Op]) -> usize {
        let mut taken = 0;
        for op in ops.iter().take(self.accept_at_most) {
            let detail = self.fail.as_mut().and_then(|rule| rule(self.offered, op));
            match detail {
                Some(detail) => self.held.push(Done { token: op.token, status: Status::TransportFailed, detail }),
                None if self.inner.submit(std::slice::from_ref(op)) == 1 => {}
                None => break,
            }
            self.offered += 1;
            taken += 1;
        }
        taken
    }

    fn poll(&mut self, done: &mut [Done]) -> usize {
        let mut scratch = [Done::ok(super::Token { queue: 0, slot: 0 }); 64];
        loop {
            let n = self.inner.poll(&mut scratch);
            self.held.extend_from_slice(&scratch[..n]);
            if n < scratch.len() {
                break;
            }
        }
        if self.gate.is_closed() {
            return 0;
        }
        let n = done.len().min(self.held.len());
        if self.reverse {
            self.held[..n].reverse();
        }
        for (slot, d) in done.iter_mut().zip(self.held.drain(..n)) {
            *slot = d;
        }
        n
    }

    fn in_flight(&self) -> usize {
        self.inner.in_flight() + self.held.len()
    }
}
