//! The null transport: completes every operation at once without moving data. It measures
//! what the engine itself costs per descriptor.

use super::{Done, Finished, Op, Transport};

/// Completes without copying.
#[derive(Debug)]
pub struct NullTransport {
    finished: Finished,
}

impl NullTransport {
    /// A null transport.
    pub fn new() -> NullTransport {
        NullTransport { finished: Finished::with_capacity(4096) }
    }
}

impl Default for NullTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl Transport for NullTransport {
    fn name(&self) -> &'static str {
        "null"
    }

    fn supports(&self, _src: u32, _dst: u32) -> bool {
        true
    }

    fn submit(&mut self, ops: &[Op]) -> usize {
        for op in ops {
            self.finished.push(Done::ok(op.token));
        }
        ops.len()
    }

    fn poll(&mut self, done: &mut [Done]) -> usize {
        self.finished.drain_into(done)
    }

    fn in_flight(&self) -> usize {
        self.finished.len()
    }
}
