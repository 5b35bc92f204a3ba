//! The transport trait and its implementations.
//!
//! A transport moves the bytes of validated copies. The worker that owns it calls
//! [`Transport::submit`] with a batch of operations and [`Transport::poll`] for finished ones,
//! both from its own thread, never blocking. Completions may come back in any order: the
//! worker restores each queue's order.

pub mod cuda;
pub mod fault;
pub mod gdr;
pub mod host;
pub(crate) mod multi;
pub mod null;
pub(crate) mod resident;
pub(crate) mod select;

use crate::desc::Status;
use crate::desc::ValidCopy;
use crate::error::TransportError;
use std::collections::VecDeque;

/// Copy-kernel tasks above this size are split, so that large blocks spread over warps (the
/// launched and the resident kernel alike).
pub(crate) const TASK_CHUNK: u64 = 64 << 10;

/// Identifies one operation to the worker that submitted it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// The worker's queue index.
    pub queue: u32,
    /// The slot in that queue's in-flight window.
    pub slot: u32,
}

/// One copy to perform.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Op {
    /// Handed back in the matching [`Done`].
    pub(crate) token: Token,
    /// What to copy (addresses already resolved and bounds-checked).
    pub(crate) copy: ValidCopy,
}

impl Op {
    /// `copy`, to be reported done under `token`.
    pub fn new(token: Token, copy: ValidCopy) -> Op {
        Op { token, copy }
    }

    /// Handed back in the matching [`Done`].
    pub fn token(&self) -> Token {
        self.token
    }

    /// What to copy (addresses already resolved and bounds-checked).
    pub fn copy(&self) -> &ValidCopy {
        &self.copy
    }

    /// Whether the copy goes into host memory (its destination is not GPU memory).
    pub(crate) fn goes_to_host(&self) -> bool {
        !crate::region::MemoryKind::is_gpu(self.copy.dst.kind)
    }
}

/// A finished operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Done {
    /// The operation's token.
    pub token: Token,
    /// [`Status::Ok`] or [`Status::TransportFailed`].
    pub status: Status,
    /// Transport-specific detail for a failure (an errno, a verbs status), else 0.
    pub detail: u32,
}

impl Done {
    /// A successful completion of `token`.
    pub fn ok(token: Token) -> Done {
        Done { token, status: Status::Ok, detail: 0 }
    }
}

/// A way of moving bytes. Owned by one worker; called only from that worker's thread.
pub trait Transport: Send {
    /// Short name for logs and reports ("host", "null", ...).
    fn name(&self) -> &'static str;

    /// Called once on the worker's thread before the first `submit`, to set up what must be
    /// made there (a CUDA context made current, streams). An error stops the engine's start.
    fn start(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    /// Whether this transport can copy from memory kind `src` to memory kind `dst`.
    fn supports(&self, src: u32, dst: u32) -> bool;

    /// Starts a prefix of `ops` and returns its length (fewer than `ops.len()` when the
    /// transport is out of room; the worker offers the rest again later). Must not block.
    fn submit(&mut self, ops: &[Op]) -> usize;

    /// Writes finished operations into `done`, returns how many. Must not block.
    fn poll(&mut self, done: &mut [Done]) -> usize;

    /// Operations submitted and not yet returned by `poll`.
    fn in_flight(&self) -> usize;

    /// Enqueues, behind every operation this transport has accepted so far, a write of `value`
    /// into the 64-bit word at device address `word`, made by the device itself once those
    /// operations finished there (for a stream waiting on the word: no round trip through the
    /// CPU). Marks are written in the order given. `false`: this transport cannot (the default),
    /// and then the worker writes the word from the CPU when it publishes completions.
    fn mark(&mut self, word: u64, value: u64) -> bool {
        let _ = (word, value);
        false
    }

    /// Before the memory of mark word `word` goes away (every word: `None`): drops its marks
    /// not yet enqueued and waits until those enqueued have been written. Blocks: only for
    /// freeing a closed queue and for shutdown.
    fn settle_marks(&mut self, word: Option<u64>) {
        let _ = word;
    }
}

/// Completions of a transport that finishes its work inside `submit`, waiting for `poll`.
#[derive(Debug, Default)]
pub(crate) struct Finished(VecDeque<Done>);

impl Finished {
    pub(crate) fn with_capacity(n: usize) -> Finished {
        Finished(VecDeque::with_capacity(n))
    }

    pub(crate) fn push(&mut self, done: Done) {
        self.0.push_back(done);
    }

    pub(crate) fn drain_into(&mut self, out: &mut [Done]) -> usize {
        let n = out.len().min(self.0.len());
        for (slot, done) in out.iter_mut().zip(self.0.drain(..n)) {
            *slot = done;
        }
        n
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}
