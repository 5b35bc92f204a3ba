//! The host transport: the worker copies with the CPU, inside `submit`.

use super::{Done, Finished, Op, Transport};
use crate::region::MemoryKind;

/// Copies host memory to host memory with `memmove`.
#[derive(Debug)]
pub struct HostTransport {
    finished: Finished,
}

impl HostTransport {
    /// A host transport.
    pub fn new() -> HostTransport {
        HostTransport { finished: Finished::with_capacity(4096) }
    }
}

impl Default for HostTransport {
    fn default() -> Self {
        Self::new()
    }
}

impl Transport for HostTransport {
    fn name(&self) -> &'static str {
        "host"
    }

    fn supports(&self, src: u32, dst: u32) -> bool {
        src == MemoryKind::Host as u32 && dst == MemoryKind::Host as u32
    }

    fn submit(&mut self, ops: &[Op]) -> usize {
        for op in ops {
            let c = &op.copy;
            // SAFETY: validation checked both ranges against live registrations, whose owners
            // promised the memory outlives them, and deregistration waits for in-flight copies.
            // Two regions may alias the same memory, so this is a memmove (ptr::copy).
            unsafe { std::ptr::copy(c.src.addr as *const u8, c.dst.addr as *mut u8, c.len as usize) };
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
