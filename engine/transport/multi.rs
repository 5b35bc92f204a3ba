//! One worker's transport on an engine with several GPUs ([`crate::GpuConfig::devices`]): a
//! transport per GPU (the CUDA transport, each on its own context and streams), and each copy
//! routed to the GPU whose memory it touches: the destination's GPU, else the source's (a
//! host-to-host copy goes to the worker's own GPU). A copy between two GPUs' memory runs on the
//! destination's, where the driver reported peer access between them at start; otherwise the
//! engine refuses it ([`Transport::supports`] false: the descriptor completes `Unsupported`).
//!
//! Completions come back from each GPU's transport in their own order; the worker restores each
//! queue's order, as for any transport.

use super::{Done, Op, Transport};
use crate::cuda_driver::Context;
use crate::error::TransportError;
use crate::region::MemoryKind;
use std::sync::Arc;

/// One GPU's transport, and the context to make current before calling it (none in tests).
pub(crate) struct Lane {
    pub(crate) context: Option<Arc<Context>>,
    pub(crate) transport: Box<dyn Transport>,
}

/// The transports of every GPU of the engine, for one worker.
pub(crate) struct MultiGpu {
    lanes: Vec<Lane>,
    /// `peers[s][d]`: a copy from GPU `s`'s memory to GPU `d`'s may run (true when `s == d`).
    peers: Vec<Vec<bool>>,
    /// The worker's own GPU (host-to-host copies).
    home: usize,
    /// The lane whose context is current on this thread.
    current: Option<usize>,
    /// Where the next poll starts, so that no lane's completions wait behind another's.
    next_poll: usize,
}

impl MultiGpu {
    /// `lanes[g]` copies for engine GPU `g`; `peers` is square, one row per lane.
    pub(crate) fn new(lanes: Vec<Lane>, peers: Vec<Vec<bool>>, home: usize) -> MultiGpu {
        assert!(!lanes.is_empty() && home < lanes.len(), "a lane per GPU, the home GPU among them");
        assert!(peers.len() == lanes.len() && peers.iter().all(|row| row.len() == lanes.len()), "peers is square");
        MultiGpu { lanes, peers, home, current: None, next_poll: 0 }
    }

    /// The lane an operation goes to.
    fn route(&self, op: &Op) -> usize {
        self.lane_of(op.copy.src.kind, op.copy.dst.kind)
    }

    /// The lane of a copy between memory kinds `src` and `dst`.
    fn lane_of(&self, src: u32, dst: u32) -> usize {
        if MemoryKind::is_gpu(dst) {
            MemoryKind::gpu_of(dst)
        } else if MemoryKind::is_gpu(src) {
            MemoryKind::gpu_of(src)
        } else {
            self.home
        }
    }

    /// Makes lane `lane`'s context current on this thread, if another one is.
    fn enter(&mut self, lane: usize) {
        if self.current != Some(lane) {
            if let Some(context) = &self.lanes[lane].context {
                // A failure shows at the transport's next driver call, which reports it.
                let _ = context.make_current();
            }
            self.current = Some(lane);
        }
    }
}

impl Transport for MultiGpu {
    fn name(&self) -> &'static str {
        self.lanes[self.home].transport.name()
    }

    fn start(&mut self) -> Result<(), TransportError> {
        for lane in 0..self.lanes.len() {
            self.enter(lane);
            self.lanes[lane].transport.start()?;
        }
        Ok(())
    }

    fn supports(&self, src: u32, dst: u32) -> bool {
        let n = self.lanes.len();
        let gpu_ok = |kind: u32| !MemoryKind::is_gpu(kind) || MemoryKind::gpu_of(kind) < n;
        if !gpu_ok(src) || !gpu_ok(dst) {
            return false;
        }
        if MemoryKind::is_gpu(src) && MemoryKind::is_gpu(dst) {
            let (s, d) = (MemoryKind::gpu_of(src), MemoryKind::gpu_of(dst));
            if !self.peers[s][d] {
                return false;
            }
        }
        self.lanes[self.lane_of(src, dst)].transport.supports(src, dst)
    }

    fn submit(&mut self, ops: &[Op]) -> usize {
        let mut taken = 0;
        while taken < ops.len() {
            let lane = self.route(&ops[taken]);
            let run = ops[taken..].iter().take_while(|op| self.route(op) == lane).count();
            self.enter(lane);
            let took = self.lanes[lane].transport.submit(&ops[taken..taken + run]);
            taken += took;
            if took < run {
                break; // that GPU is out of room: the worker offers the rest again later
            }
        }
        taken
    }

    fn poll(&mut self, done: &mut [Done]) -> usize {
        let n = self.lanes.len();
        let mut got = 0;
        for i in 0..n {
            if got == done.len() {
                break;
            }
            let lane = (self.next_poll + i) % n;
            if self.lanes[lane].transport.in_flight() == 0 {
                continue;
            }
            self.enter(lane);
            got += self.lanes[lane].transport.poll(&mut done[got..]);
        }
        self.next_poll = (self.next_poll + 1) % n;
        got
    }

    fn in_flight(&self) -> usize {
        self.lanes.iter().map(|l| l.transport.in_flight()).sum()
    }

    fn mark(&mut self, word: u64, value: u64) -> bool {
        // One GPU's stream writing the word would not wait for another GPU's copies: with
        // several GPUs the worker writes it from the CPU.
        if self.lanes.len() != 1 {
            return false;
        }
        self.enter(0);
        self.lanes[0].transport.mark(word, value)
    }

    fn settle_marks(&mut self, word: Option<u64>) {
        for lane in 0..self.lanes.len() {
            self.enter(lane);
            self.lanes[lane].transport.settle_marks(word);
        }
    }
}

impl Drop for MultiGpu {
    fn drop(&mut self) {
        // Each GPU's transport waits for its streams on its own context.
        while let Some(lane) = self.lanes.pop() {
            if let Some(context) = &lane.context {
                let _ = context.make_current();
            }
            drop(lane.transport);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desc::{Endpoint, Status, ValidCopy};
    use crate::transport::Token;
    use std::sync::Mutex;

    /// What the recorders were given: (lane, token slot), in order.
    type Log = Arc<Mutex<Vec<(usize, u32)>>>;

    /// Records what it was given (lane, token slot) and finishes everything at the next poll;
    /// takes at most `room` operations per submit.
    struct Recorder {
        lane: usize,
        room: usize,
        log: Log,
        pending: Vec<Token>,
    }

    impl Transport for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }
        fn supports(&self, _src: u32, _dst: u32) -> bool {
            true
        }
        fn submit(&mut self, ops: &[Op]) -> usize {
            let n = ops.len().min(self.room);
            for op in &ops[..n] {
                self.log.lock().unwrap().push((self.lane, op.token.slot));
                self.pending.push(op.token);
            }
            n
        }
        fn poll(&mut self, done: &mut [Done]) -> usize {
            let n = done.len().min(self.pending.len());
            for (slot, token) in done.iter_mut().zip(self.pending.drain(..n)) {
                *slot = Done::ok(token);
            }
            n
        }
        fn in_flight(&self) -> usize {
            self.pending.len()
        }
    }

    fn multi(gpus: usize, room: usize, peers: Vec<Vec<bool>>) -> (MultiGpu, Log) {
        let log = Arc::new(Mutex::new(Vec::new()));
        let lanes = (0..gpus)
            .map(|lane| Lane {
                context: None,
                transport: Box::new(Recorder { lane, room, log: log.clone(), pending: Vec::new() }),
            })
            .collect();
        (MultiGpu::new(lanes, peers, 1), log)
    }

    fn op(slot: u32, src: u32, dst: u32) -> Op {
        let end = |kind| Endpoint::new(1, kind, 4096, 0, 0);
        // SAFETY: never copied: the recorder only looks at the token.
        Op::new(Token { queue: 0, slot }, unsafe { ValidCopy::new_unchecked(end(src), end(dst), 8) })
    }

    const HOST: u32 = MemoryKind::Host as u32;

    #[test]
    fn each_copy_goes_to_the_gpu_whose_memory_it_touches() {
        let (mut m, log) = multi(3, 64, vec![vec![true; 3]; 3]);
        let g = MemoryKind::gpu_code;
        let ops = [op(0, HOST, g(2)), op(1, g(0), HOST), op(2, HOST, HOST), op(3, g(0), g(2)), op(4, HOST, g(2))];
        assert_eq!(m.submit(&ops), 5);
        // The destination's GPU, else the source's; host to host on the home GPU (1).
        assert_eq!(*log.lock().unwrap(), vec![(2, 0), (0, 1), (1, 2), (2, 3), (2, 4)]);
        assert_eq!(m.in_flight(), 5);
        let mut done = [Done::ok(Token { queue: 0, slot: 99 }); 8];
        let mut slots: Vec<u32> = Vec::new();
        while m.in_flight() > 0 {
            let n = m.poll(&mut done);
            slots.extend(done[..n].iter().map(|d| d.token.slot));
        }
        slots.sort_unstable();
        assert_eq!(slots, vec![0, 1, 2, 3, 4], "every completion comes back once");
        assert!(done.iter().all(|d| d.status == Status::Ok));
    }

    #[test]
    fn a_full_gpu_stops_the_prefix_there() {
        let (mut m, log) = multi(2, 1, vec![vec![true; 2]; 2]);
        let g = MemoryKind::gpu_code;
        // Lane 0 takes one per submit: the second op for it ends the accepted prefix.
        assert_eq!(m.submit(&[op(0, HOST, g(0)), op(1, HOST, g(0)), op(2, HOST, g(1))]), 1);
        assert_eq!(m.submit(&[op(1, HOST, g(0)), op(2, HOST, g(1))]), 2);
        assert_eq!(*log.lock().unwrap(), vec![(0, 0), (0, 1), (1, 2)]);
    }

    #[test]
    fn copies_between_gpus_need_peer_access_and_gpus_of_the_engine() {
        let peers = vec![vec![true, true, false], vec![true, true, false], vec![false, false, true]];
        let (m, _) = multi(3, 64, peers);
        let g = MemoryKind::gpu_code;
        assert!(m.supports(g(0), g(1)) && m.supports(g(1), g(0)) && m.supports(g(2), g(2)));
        assert!(!m.supports(g(0), g(2)) && !m.supports(g(2), g(1)), "no peer access: refused");
        assert!(m.supports(HOST, g(2)) && m.supports(g(2), HOST) && m.supports(HOST, HOST));
        assert!(!m.supports(HOST, g(3)) && !m.supports(g(7), HOST), "a GPU the engine does not have");
    }

    #[test]
    fn kind_codes_name_the_gpu() {
        for gpu in [0usize, 1, 7, 200] {
            let code = MemoryKind::gpu_code(gpu);
            assert!(MemoryKind::is_gpu(code));
            assert_eq!(MemoryKind::gpu_of(code), gpu);
        }
        assert_eq!(MemoryKind::gpu_code(0), MemoryKind::Gpu as u32, "one GPU: the code it always had");
        assert!(!MemoryKind::is_gpu(MemoryKind::Host as u32));
    }
}
