//! The SPSC ring: a proptest model against `VecDeque`, header checks on attach, and a peer
//! that publishes corrupt indices.

use ferry::internals::ring::layout::{ring_bytes, RingHeader};
use ferry::internals::ring::shm::SharedMemory;
use ferry::internals::ring::{Consumer, Producer, PushError, RingError, RingMemory};
use ferry::Descriptor;
use proptest::prelude::*;
use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;

fn ring(capacity: u64) -> (Arc<SharedMemory>, Producer<u64>, Consumer<u64>) {
    let memory = Arc::new(SharedMemory::create("ring-test", ring_bytes(capacity, 8)).unwrap());
    let ring = Arc::new(RingMemory::<u64>::create(memory.clone(), 0, capacity).unwrap());
    (memory.clone(), Producer::new(ring.clone()), Consumer::new(Arc::new(RingMemory::attach(memory, 0).unwrap())))
}

#[derive(Clone, Debug)]
enum Op {
    Push(u8),
    BatchPush(u8),
    Pop(u8),
    BatchPeekPop(u8),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        any::<u8>().prop_map(Op::Push),
        any::<u8>().prop_map(Op::BatchPush),
        any::<u8>().prop_map(Op::Pop),
        any::<u8>().prop_map(Op::BatchPeekPop),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn behaves_like_a_bounded_vecdeque(cap_log in 0u32..6, ops in proptest::collection::vec(op(), 1..200)) {
        let capacity = 1u64 << cap_log;
        let (_memory, mut producer, mut consumer) = ring(capacity);
        let mut model: VecDeque<u64> = VecDeque::new();
        let mut next = 0u64;
        for op in ops {
            match op {
                Op::Push(n) => for _ in 0..n % 8 {
                    let r = producer.push(next);
                    if (model.len() as u64) < capacity {
                        prop_assert_eq!(r, Ok(()));
                        model.push_back(next);
                    } else {
                        prop_assert_eq!(r, Err(PushError::Full(next)));
                    }
                    next += 1;
                },
                Op::BatchPush(n) => {
                    let mut batch = producer.write();
                    for _ in 0..n % 8 {
                        let full = model.len() as u64 == capacity;
                        let r = batch.push(next);
                        prop_assert_eq!(r.is_err(), full);
                        if !full { model.push_back(next); }
                        next += 1;
                    }
                    drop(batch);
                }
                Op::Pop(n) => for _ in 0..n % 8 {
                    prop_assert_eq!(consumer.pop().unwrap(), model.pop_front());
                },
                Op::BatchPeekPop(n) => {
                    let want = u64::from(n % 8);
                    let mut batch = consumer.read(want).unwrap();
                    prop_assert_eq!(batch.len() as u64, want.min(model.len() as u64));
                    while let Some(x) = batch.peek() {
                        prop_assert_eq!(Some(x), model.front().copied());
                        batch.advance();
                        model.pop_front();
                    }
                }
            }
            prop_assert_eq!(producer.pushed() - consumer.popped(), model.len() as u64);
        }
    }
}

#[test]
fn batches_publish_once_when_dropped() {
    let (_memory, mut producer, mut consumer) = ring(8);
    let mut batch = producer.write();
    batch.push(1).unwrap();
    batch.push(2).unwrap();
    assert_eq!(consumer.pop().unwrap(), None, "visible before the batch was published");
    drop(batch);
    assert_eq!(consumer.pop().unwrap(), Some(1));
    assert_eq!(consumer.pop().unwrap(), Some(2));
}

fn header(memory: &SharedMemory) -> &RingHeader {
    // SAFETY: the test created a ring header at offset 0 of this mapping.
    unsafe { &*(memory.as_ptr() as *const RingHeader) }
}

#[test]
fn attach_names_the_mismatched_field() {
    let memory = Arc::new(SharedMemory::create("ring-test", ring_bytes(16, 64)).unwrap());
    RingMemory::<Descriptor>::create(memory.clone(), 0, 16).unwrap();
    let mismatch = |e: RingError| match e {
        RingError::Mismatch { field, .. } => field,
        other => panic!("expected a mismatch, got {other}"),
    };
    // A consumer of a different slot type.
    assert_eq!(mismatch(RingMemory::<u64>::attach(memory.clone(), 0).err().unwrap()), "slot_size");
    let h = header(&memory);
    h.meta.abi_version.store(99, Ordering::Relaxed);
    let e = RingMemory::<Descriptor>::attach(memory.clone(), 0).err().unwrap();
    assert!(e.to_string().contains("abi_version is 0x63, expected 0x1"), "{e}");
    h.meta.abi_version.store(ferry::internals::ring::RING_ABI_VERSION, Ordering::Relaxed);
    h.meta.magic.store(0x1234, Ordering::Relaxed);
    assert_eq!(mismatch(RingMemory::<Descriptor>::attach(memory.clone(), 0).err().unwrap()), "magic");
    h.meta.magic.store(ferry::internals::ring::RING_MAGIC, Ordering::Relaxed);
    // A capacity that is not a power of two, and one that would run past the mapping.
    h.meta.capacity.store(12, Ordering::Relaxed);
    assert!(matches!(RingMemory::<Descriptor>::attach(memory.clone(), 0), Err(RingError::Layout(_))));
    h.meta.capacity.store(1 << 20, Ordering::Relaxed);
    assert!(matches!(RingMemory::<Descriptor>::attach(memory.clone(), 0), Err(RingError::Layout(_))));
    h.meta.capacity.store(16, Ordering::Relaxed);
    RingMemory::<Descriptor>::attach(memory.clone(), 0).unwrap();
    // Offsets: misaligned, and past the end.
    assert!(matches!(RingMemory::<Descriptor>::attach(memory.clone(), 8), Err(RingError::Layout(_))));
    assert!(matches!(RingMemory::<Descriptor>::attach(memory.clone(), memory.len()), Err(RingError::Layout(_))));
}

#[test]
fn a_peer_publishing_a_corrupt_index_is_detected() {
    let (memory, mut producer, mut consumer) = ring(8);
    producer.push(1).unwrap();
    // The "producer" claims 1000 items: more than the ring holds.
    header(&memory).tail.0.store(1000, Ordering::Release);
    assert!(matches!(consumer.pop(), Err(RingError::Corrupted { index: "tail", value: 1000, .. })));
    // A head ahead of the tail looks like a huge occupancy to the producer.
    header(&memory).head.0.store(500, Ordering::Release);
    for i in 0..7 {
        producer.push(i).unwrap();
    }
    assert!(matches!(producer.push(9), Err(PushError::Corrupted(9, RingError::Corrupted { index: "head", .. }))));
}

#[test]
fn shared_memory_is_sealed_and_unsealed_memory_is_refused() {
    let memory = SharedMemory::create("seal-test", 4096).unwrap();
    let file = memory.file().try_clone().unwrap();
    assert!(file.set_len(0).is_err(), "a peer could shrink the memfd");
    assert_eq!(SharedMemory::open(file).unwrap().len(), 4096);
    let plain = std::fs::File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(std::env::temp_dir().join("ferry-unsealed"))
        .unwrap();
    plain.set_len(4096).unwrap();
    assert!(SharedMemory::open(plain).is_err(), "an unsealed file was mapped");
}

#[test]
fn a_producer_attached_behind_a_corrupt_head_reports_it_on_its_first_push() {
    // A head the consumer never published, found by a producer that attaches to the ring (a
    // client taking over a queue that an earlier holder scribbled): too far behind the tail, and
    // ahead of it.
    let tail = 1 << 40 | 3;
    for head in [5, tail - 9, tail + 1, u64::MAX - 2] {
        let memory = Arc::new(SharedMemory::create("ring-test", ring_bytes(8, 8)).unwrap());
        let ring = Arc::new(RingMemory::<u64>::create(memory.clone(), 0, 8).unwrap());
        header(&memory).tail.0.store(tail, Ordering::Release);
        header(&memory).head.0.store(head, Ordering::Release);
        let mut producer = Producer::new(ring);
        assert!(
            matches!(producer.push(7), Err(PushError::Corrupted(7, RingError::Corrupted { index: "head", .. }))),
            "head {head}"
        );
    }
    // A head three behind the tail: five slots free.
    let memory = Arc::new(SharedMemory::create("ring-test", ring_bytes(8, 8)).unwrap());
    let ring = Arc::new(RingMemory::<u64>::create(memory.clone(), 0, 8).unwrap());
    header(&memory).tail.0.store(tail, Ordering::Release);
    header(&memory).head.0.store(tail - 3, Ordering::Release);
    let mut producer = Producer::new(ring);
    assert_eq!(producer.free(1).unwrap(), 5);
    for i in 0..5 {
        producer.push(i).unwrap();
    }
    assert!(matches!(producer.push(5), Err(PushError::Full(5))));
}
