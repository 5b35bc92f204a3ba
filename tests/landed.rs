//! The landed word that `Engine::stream_wait` waits on (the CUDA stream side is in tests/gpu.rs
//! and the Python stream tests): on a transport that cannot mark it, it follows the watermark;
//! on one that marks it behind its operations (as the CUDA transport does from its stream), the
//! worker asks for a mark only once every operation of the descriptors below it has been
//! accepted, whatever the transport took at a time, with failed descriptors counting as landed,
//! and the values only grow.

mod common;

use common::*;
use ferry::transport::{Done, Op};
use ferry::{Descriptor, Engine, QueueConfig, Transport, TransportKind};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// Descriptor `i` of the test reads from `base + i * SPACING` (its chunks inside that span).
const SPACING: u64 = 1024;

/// What the marking transport saw: chunks accepted per descriptor index, marks asked for, and
/// every broken rule.
#[derive(Default)]
struct Seen {
    accepted: HashMap<u64, u32>,
    marks: Vec<u64>,
    faults: Vec<String>,
}

/// Takes at most `room` operations per submit, finishes them at the next poll, and writes each
/// mark into its word once the operations accepted before it are finished, as a device would.
struct Marker {
    room: usize,
    base: Arc<AtomicU64>,
    /// Chunks of each descriptor index that has operations.
    chunks: Arc<HashMap<u64, u32>>,
    seen: Arc<Mutex<Seen>>,
    held: Vec<Op>,
    accepted: u64,
    finished: u64,
    marks: VecDeque<(u64, u64, u64)>,
}

impl Transport for Marker {
    fn name(&self) -> &'static str {
        "marker"
    }
    fn supports(&self, _src: u32, _dst: u32) -> bool {
        true
    }
    fn submit(&mut self, ops: &[Op]) -> usize {
        let n = ops.len().min(self.room);
        let base = self.base.load(Ordering::Relaxed);
        let mut seen = self.seen.lock().unwrap();
        for op in &ops[..n] {
            *seen.accepted.entry((op.copy().src().addr() - base) / SPACING).or_default() += 1;
        }
        self.held.extend_from_slice(&ops[..n]);
        self.accepted += n as u64;
        n
    }
    fn poll(&mut self, done: &mut [Done]) -> usize {
        let n = done.len().min(self.held.len());
        for (slot, op) in done.iter_mut().zip(self.held.drain(..n)) {
            *slot = Done::ok(op.token());
        }
        self.finished += n as u64;
        while let Some(&(before, word, value)) = self.marks.front() {
            if before > self.finished {
                break;
            }
            // SAFETY: the worker hands out the address of the landed word of a live queue's
            // header in this process, an AtomicU64.
            unsafe { (*(word as *const AtomicU64)).store(value, Ordering::Release) };
            self.marks.pop_front();
        }
        n
    }
    fn in_flight(&self) -> usize {
        self.held.len()
    }
    fn mark(&mut self, word: u64, value: u64) -> bool {
        let mut seen = self.seen.lock().unwrap();
        if let Some(&last) = seen.marks.last().filter(|&&last| value <= last) {
            seen.faults.push(format!("mark {value} after {last}"));
        }
        for (&i, &want) in self.chunks.iter() {
            let got = seen.accepted.get(&i).copied().unwrap_or(0);
            if i < value && got != want {
                seen.faults.push(format!("mark {value} with descriptor {i} at {got} of {want} chunks accepted"));
            }
        }
        seen.marks.push(value);
        self.marks.push_back((self.accepted, word, value));
        true
    }
}

#[test]
fn a_marking_transport_is_asked_only_behind_whole_descriptors() {
    // Descriptors: plain ones, strided ones of 5 chunks, and one naming no region (it fails at
    // validation and has no operation). The transport takes one operation per submit, so
    // strided descriptors are accepted across several iterations.
    const N: u64 = 60;
    let bad = 17;
    let chunks_of = |i: u64| if i % 3 == 0 { 5 } else { 1 };
    let chunks: HashMap<u64, u32> = (0..N).filter(|&i| i != bad).map(|i| (i, chunks_of(i))).collect();
    let chunks = Arc::new(chunks);
    let seen = Arc::new(Mutex::new(Seen::default()));
    let base = Arc::new(AtomicU64::new(0));
    let (c, s, b) = (chunks.clone(), seen.clone(), base.clone());
    let factory = Arc::new(move |_| -> Box<dyn Transport> {
        Box::new(Marker {
            room: 1,
            base: b.clone(),
            chunks: c.clone(),
            seen: s.clone(),
            held: Vec::new(),
            accepted: 0,
            finished: 0,
            marks: VecDeque::new(),
        })
    });
    let engine = Engine::start(config(TransportKind::Custom(factory))).unwrap();
    let client = engine.new_client();
    let buf = engine.allocate_host(client, (N * SPACING + 4096) as usize).unwrap();
    base.store(buf.as_ptr() as u64, Ordering::Relaxed);
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    queue.request_landed();
    let descs: Vec<Descriptor> = (0..N)
        .map(|i| {
            let d = Descriptor::copy(buf.id(), i * SPACING, buf.id(), N * SPACING + 64 * (i % 8), 64).with_tag(i);
            match i {
                _ if i == bad => Descriptor::copy(ferry::RegionId(0xdead), 0, buf.id(), 0, 64).with_tag(i),
                _ if chunks_of(i) > 1 => d.strided(5, 128, 64),
                _ => d,
            }
        })
        .collect();
    // Two pushes, the second once the first has landed (the word grows across them).
    queue.submit(&descs[..30]).unwrap();
    let first = collect(&mut queue, 30);
    wait_until("the first landed mark covers the first push", || queue.landed() >= 30);
    queue.submit(&descs[30..]).unwrap();
    let rest = collect(&mut queue, (N - 30) as usize);
    wait_until("every descriptor has landed", || queue.landed() == N);
    let statuses: Vec<bool> = first.iter().chain(&rest).map(|c| c.is_ok()).collect();
    assert_eq!(statuses.iter().filter(|ok| !**ok).count(), 1, "only the bad descriptor fails");
    let seen = seen.lock().unwrap();
    assert!(seen.faults.is_empty(), "{:#?}", seen.faults);
    assert_eq!(seen.marks.last(), Some(&N), "the last mark covers everything pushed");
    assert!(seen.marks.len() > 2, "marks follow the transport's progress: {:?}", seen.marks);
    println!("marks asked for: {:?}", seen.marks);
}

#[test]
fn without_marks_the_landed_word_follows_the_watermark() {
    // The host transport cannot mark: asked for or not, the worker writes the word itself; the
    // same as a custom transport (which is offered the word, and refuses it).
    let custom = Arc::new(|_| -> Box<dyn Transport> { Box::new(ferry::transport::host::HostTransport::new()) });
    for engine in [host_engine(), Engine::start(config(TransportKind::Custom(custom))).unwrap()] {
        landed_follows_the_watermark(&engine);
    }
}

fn landed_follows_the_watermark(engine: &Engine) {
    let client = engine.new_client();
    let buf = engine.allocate_host(client, 1 << 16).unwrap();
    let mut queue = engine.open_queue(client, QueueConfig::default()).unwrap();
    let copies: Vec<Descriptor> = (0..8).map(|i| Descriptor::copy(buf.id(), 0, buf.id(), 4096 + 64 * i, 64)).collect();
    queue.submit(&copies).unwrap();
    collect(&mut queue, 8);
    assert_eq!((queue.watermark(), queue.landed()), (8, 8));
    queue.request_landed();
    queue.submit(&copies[..3]).unwrap();
    collect(&mut queue, 3);
    assert_eq!((queue.watermark(), queue.landed()), (11, 11));
}
